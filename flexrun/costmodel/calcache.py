"""The calibration cache: one file per machine fingerprint holding its measured spec, its disks (one entry
per filesystem), its probes of real layers (``costmodel.layerprobe``, one per layer shape, dtype and shape
bucket) and the runs recorded since (predicted against measured per phase), from which the planner corrects
its constants.

A file is ``<cache dir>/calibration/<fingerprint key>.json``. A calibration whose fingerprint does not
match this machine's is never read (another key); a new calibration starts the run records afresh (they
compare measurements with the predictions of the spec they were recorded under).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexrun.costmodel.hardware import HardwareSpec
from flexrun.costmodel.machine_id import fingerprint_key
from flexrun.errors import ConfigError
from flexrun.paths import cache_dir

log = logging.getLogger(__name__)

VERSION = 1
MAX_RUNS = 50  # records kept, newest last
RECENT = 20  # records a correction is fitted to
# A correction moves a constant at most this factor either way, and one record moves it at most half its
# log-ratio (the median of n records is shrunk by n / (n + 1) toward no change).
MAX_CORRECTION = 4.0
# What bounds a phase, as the corrections group them: the compute of each phase, the disk, the links
# between host and device.
CLASSES = ("prefill compute", "decode compute", "disk", "link")
MAX_PROBES = 100  # probe records kept, newest last


def calibration_dir() -> Path:
    return cache_dir() / "calibration"


def path_for(fingerprint: dict[str, str]) -> Path:
    """Where the calibration of the machine with ``fingerprint`` is kept."""
    return calibration_dir() / f"{fingerprint_key(fingerprint)}.json"


def busy(run: dict[str, Any]) -> bool:
    """Whether a run was recorded on a busy machine: other work alone above its cores, by the load average
    when the run was planned (before its own threads ran) or at its end less its own threads. Its phase
    times then say more about the others than about the machine; a record without loads counts as quiet."""
    try:
        cores = float(run["cores"])
        start = run.get("load")
        end = run.get("load_end")
        others_end = float(end) - min(float(run.get("threads", 0)), cores) if end is not None else 0.0
        return (start is not None and float(start) > cores) or others_end > cores
    except (KeyError, TypeError, ValueError):
        return False


def bound_class(phase: str, bottleneck: str) -> str:
    """The correction class of a phase bounded by ``bottleneck`` (``PhaseTime.bottleneck``)."""
    if bottleneck in ("disk->host", "host->disk"):
        return "disk"
    if bottleneck in ("host->device", "device->host"):
        return "link"
    return f"{phase} compute"


@dataclass
class DiskFigures:
    """One filesystem's measured disk: medians of the samples, and whether reads bypassed the page cache."""

    read_bw: float
    write_bw: float
    read_samples: list[float] = field(default_factory=list)
    direct: bool = True
    measured: str = ""
    read_by_size: dict[str, float] = field(default_factory=dict)  # bytes per read call -> bytes/s

    def spread(self) -> tuple[float, float]:
        samples = self.read_samples or [self.read_bw]
        return min(samples), max(samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "read_bw": self.read_bw,
            "write_bw": self.write_bw,
            "read_samples": self.read_samples,
            "direct": self.direct,
            "measured": self.measured,
            "read_by_size": self.read_by_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskFigures:
        return cls(
            float(data["read_bw"]),
            float(data["write_bw"]),
            [float(x) for x in data.get("read_samples", [])],
            bool(data.get("direct", True)),
            str(data.get("measured", "")),
            {str(k): float(v) for k, v in dict(data.get("read_by_size", {})).items()},
        )


@dataclass
class Calibration:
    """One machine's entry: its fingerprint, measured spec, disks by filesystem and recorded runs."""

    fingerprint: dict[str, str]
    spec: HardwareSpec
    disks: dict[str, DiskFigures] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)  # by ``layerprobe.probe_key``

    @property
    def path(self) -> Path:
        return path_for(self.fingerprint)

    def save(self) -> Path:
        """Write this entry atomically (a reader never sees half a file)."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "spec": self.spec.to_dict(),
            "disks": {k: d.to_dict() for k, d in self.disks.items()},
            "runs": self.runs[-MAX_RUNS:],
            "probes": dict(list(self.probes.items())[-MAX_PROBES:]),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def record(self, run: dict[str, Any]) -> None:
        """Add one run's record (``run_record``) and save."""
        self.runs.append({"when": time.strftime("%Y-%m-%dT%H:%M:%S"), **run})
        self.save()

    def corrections(self, probe: dict[str, Any] | None = None) -> dict[str, tuple[float, int]]:
        """{class: (measured / predicted factor, run records it rests on)} from the recent runs recorded on a
        quiet machine (``busy``), bounded.

        The median of n records is shrunk by n / (n + 1) toward a seed: no change, or, given ``probe`` (a
        probe record of the job's layer, ``jobs.layerprobe``), the probe's factor for each compute class,
        which then only runs of that layer in that dtype move (other models' overheads differ)."""
        seeds = _probe_logs(probe)
        quiet = [r for r in self.runs if not busy(r)]
        ratios = _log_ratios(quiet[-RECENT:])
        if seeds and probe is not None:
            same = [r for r in quiet if r.get("layer") == probe.get("layer") and r.get("dtype") == probe.get("dtype")]
            ratios.update({c: logs for c, logs in _log_ratios(same[-RECENT:]).items() if c in seeds})
        out: dict[str, tuple[float, int]] = {}
        bound = math.log(MAX_CORRECTION)
        for cls, logs in ratios.items():
            if logs or cls in seeds:
                n, seed = len(logs), seeds.get(cls, 0.0)
                shrunk = seed + (statistics.median(logs) - seed) * n / (n + 1) if logs else seed
                out[cls] = (math.exp(max(-bound, min(bound, shrunk))), n)
        return out


def _log_ratios(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """log(measured / predicted) of every phase of ``runs``, by class."""
    ratios: dict[str, list[float]] = {c: [] for c in CLASSES}
    for run in runs:
        for phase in run.get("phases", {}).values():
            try:
                predicted, measured = float(phase["predicted_s"]), float(phase["measured_s"])
                cls = str(phase["class"])
            except (KeyError, TypeError, ValueError):
                continue
            if cls in ratios and predicted > 0 and measured > 0:
                ratios[cls].append(math.log(measured / predicted))
    return ratios


def _probe_logs(probe: dict[str, Any] | None) -> dict[str, float]:
    """log(measured / predicted) of a probe record's phases by compute class, bounded before any run weighs in
    (a wild probe moves a constant no further than wild runs could); {} without a probe."""
    bound, seeds = math.log(MAX_CORRECTION), {}
    for phase, figures in (probe or {}).get("phases", {}).items():
        try:
            ratio = float(figures["measured_s"]) / float(figures["predicted_s"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue
        if ratio > 0:
            seeds[f"{phase} compute"] = max(-bound, min(bound, math.log(ratio)))
    return seeds


def load(fingerprint: dict[str, str]) -> Calibration | None:
    """This machine's calibration, or None when there is none (or it is unreadable, or another machine's)."""
    path = path_for(fingerprint)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring calibration %s: %s", path, exc)
        return None
    try:
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ConfigError(f"version {data.get('version') if isinstance(data, dict) else None!r}")
        if data.get("fingerprint") != fingerprint:
            raise ConfigError("measured on another machine")
        spec = HardwareSpec.from_dict(dict(data["spec"]), origin=str(path))
        disks = {str(k): DiskFigures.from_dict(v) for k, v in dict(data.get("disks", {})).items()}
        runs = [r for r in data.get("runs", []) if isinstance(r, dict)]
        probes = {str(k): p for k, p in dict(data.get("probes", {})).items() if isinstance(p, dict)}
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring calibration %s: %s", path, exc)
        return None
    return Calibration(dict(fingerprint), spec, disks, runs, probes)
