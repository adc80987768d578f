"""What the cost model knows about a machine: a frozen ``HardwareSpec``, presets, and JSON load/save.

A spec holds the memory of each tier, the bandwidth of each link between tiers and the compute rates of
the device (and of the host, for attention over a host-resident KV cache). ``flexrun calibrate``
measures one for this machine and saves it in the calibration cache (``calcache``), where
``machine.hardware_for(None)`` finds it; the presets below describe known machines, each saying where its figures come from.

Units: bytes, bytes/s and FLOP/s. FlexGen's constants are quoted in its units, where GB = 2**30 bytes and
T = 1e12, and are converted here exactly as its cost model does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexrun.errors import ConfigError, FlexrunError

log = logging.getLogger(__name__)

GiB = 1 << 30  # FlexGen's "GB"
TFLOPS = 1e12

# Links between tiers, in the order the cost model names them.
LINKS = ("disk->host", "host->disk", "host->device", "device->host")
# The figures that depend on the dtype the device computes in (``HardwareSpec.rates_by_dtype``).
COMPUTE_RATES = ("mm_flops_prefill", "mm_flops_decode", "bmm_flops_prefill", "bmm_flops_decode", "host_attn_flops")
# A CPU's compressed-weight linears (``HardwareSpec.quant_rates``), per kind: values/s dequantized chunk
# by chunk into the compute dtype, FLOP/s of torch's fused weight-only op at decode shapes, and values/s
# repacked into that op's layout (int4 read from disk).
QUANT_RATES = ("dequant", "fused_mm_flops", "repack")
_NOT_FIGURES = (
    "name",
    "source",
    "dtype",
    "device_is_host",
    "rates_by_dtype",
    "decode_by_batch",
    "quant_rates",
    "disk_read_by_size",
)


@dataclass(frozen=True)
class HardwareSpec:
    """Memory per tier (bytes), link bandwidths (bytes/s) and compute rates (FLOP/s) of one machine.

    ``device_is_host``: a CPU-only machine, where the compute device is the CPU and its memory is host
    RAM; there are two real tiers (host, disk), ``device_mem`` is 0 and host<->device copies cost nothing.
    Matmul rates are for the model's linear layers at prefill-like (many tokens) and decode-like (one
    token per sequence) shapes; "bmm" rates are for attention (batched matmul over the KV cache).
    ``device_mem_bw`` is the device's own memory bandwidth: a micro-batch's matmuls read the layer's
    weights once, so small micro-batches are bounded by it rather than by the FLOP rate.
    """

    name: str
    source: str
    device_mem: int
    host_mem: int
    disk_mem: int
    disk_to_host_bw: float
    host_to_disk_bw: float
    host_to_device_bw: float
    device_to_host_bw: float
    device_mem_bw: float
    mm_flops_prefill: float
    mm_flops_decode: float
    bmm_flops_prefill: float
    bmm_flops_decode: float
    host_attn_flops: float
    device_is_host: bool = False
    # FlexGen fits slower links for KV-cache writes (many small strided copies) than for activations;
    # None means the same as the main figure.
    device_to_host_cache_bw: float | None = None
    host_to_disk_cache_bw: float | None = None
    # The dtype the compute rates were measured (or quoted) in.
    dtype: str = "float16"
    # Compute rates per dtype, {dtype: {one of COMPUTE_RATES: FLOP/s}}: a CPU without bf16 hardware runs
    # float32 matmuls several times faster than bfloat16, so the rates of one dtype mislead the cost
    # model about a model stored in another. ``for_dtype`` picks a model's; empty: the fields above only.
    rates_by_dtype: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Decode matmul FLOP/s per block size (rows: a decode step's matmul spans the block), per dtype:
    # {dtype: {"4": FLOP/s, ...}}. On a CPU a one-token-per-sequence matmul falls off the BLAS fast paths
    # at small batches (several times slower at 1 row than at 64), so one rate misleads the model.
    # ``mm_decode_rate`` interpolates; empty: ``mm_flops_decode`` at every size.
    decode_by_batch: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # A CPU device's compressed-weight linears, {"int4" | "int8": {one of QUANT_RATES: rate}}. Empty:
    # dequantization is priced as passes over memory (the GPU's reference path).
    quant_rates: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Tensor parallelism: the ranks a model is split over (each with the figures above) and the interconnect
    # between them, bytes/s and seconds per all-reduce (0: gloo over loopback's, see costmodel.equations).
    tp_ranks: int | float = 1  # a whole number (float: calibrate passes its figures as one float mapping)
    interconnect_bw: float = 0.0
    interconnect_latency: float = 0.0
    # The disk's read rate by bytes per read call, {"16777216": bytes/s, ...}: the engine reads a tensor a call,
    # and small calls read slower. ``disk_read_rate`` interpolates; empty: ``disk_to_host_bw`` at every size.
    disk_read_by_size: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _NOT_FIGURES:
                continue
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"hardware spec {self.name!r}: {f.name} must be a number >= 0, got {value!r}")
        rates = ["disk_to_host_bw", "host_to_disk_bw", "device_mem_bw", "mm_flops_prefill", "mm_flops_decode"]
        rates += ["bmm_flops_prefill", "bmm_flops_decode", "host_attn_flops"]
        if not self.device_is_host:
            rates += ["host_to_device_bw", "device_to_host_bw"]
        for key in rates:
            if getattr(self, key) <= 0:
                raise ConfigError(f"hardware spec {self.name!r}: {key} must be > 0")
        for table, known in (("rates_by_dtype", COMPUTE_RATES), ("quant_rates", QUANT_RATES)):
            if not isinstance(getattr(self, table), Mapping):
                raise ConfigError(f"hardware spec {self.name!r}: {table} must map a dtype (or kind) to its rates")
            for which, measured in getattr(self, table).items():
                for key, value in dict(measured).items():
                    if key not in known:
                        raise ConfigError(f"hardware spec {self.name!r}: {table}[{which!r}] has unknown rate {key!r}")
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                        raise ConfigError(f"hardware spec {self.name!r}: {table}[{which!r}][{key!r}] must be > 0")
        for size, value in dict(self.disk_read_by_size).items():
            if not str(size).isdigit() or int(size) < 1 or isinstance(value, bool) or not value > 0:
                raise ConfigError(
                    f"hardware spec {self.name!r}: disk_read_by_size must map bytes per read >= 1 to bytes/s > 0, "
                    f"got {size!r}: {value!r}"
                )
        for dtype, curve in dict(self.decode_by_batch).items():
            for size, value in dict(curve).items():
                if not str(size).isdigit() or int(size) < 1 or isinstance(value, bool) or not value > 0:
                    raise ConfigError(
                        f"hardware spec {self.name!r}: decode_by_batch[{dtype!r}] must map batch sizes >= 1 to "
                        f"FLOP/s > 0, got {size!r}: {value!r}"
                    )
        if self.device_is_host and self.device_mem:
            # The device tier is host RAM: one budget, the host's.
            object.__setattr__(self, "device_mem", 0)

    # ---- derived -------------------------------------------------------------------------------
    def tiers(self) -> tuple[str, ...]:
        """The real tiers: (host, disk) on a CPU-only machine, else (device, host, disk)."""
        return ("host", "disk") if self.device_is_host else ("device", "host", "disk")

    def memory(self, tier: str) -> int:
        return int({"device": self.device_mem, "host": self.host_mem, "disk": self.disk_mem}[tier])

    def cache_write_bw(self, link: str) -> float:
        """Bandwidth of KV-cache writes over ``device->host`` or ``host->disk``."""
        if link == "device->host":
            return self.device_to_host_cache_bw or self.device_to_host_bw
        return self.host_to_disk_cache_bw or self.host_to_disk_bw

    def link_bw(self, link: str) -> float:
        return {
            "disk->host": self.disk_to_host_bw,
            "host->disk": self.host_to_disk_bw,
            "host->device": self.host_to_device_bw,
            "device->host": self.device_to_host_bw,
        }[link]

    def disk_read_rate(self, request: float) -> float:
        """Disk read bytes/s in calls of ``request`` bytes: interpolated (log-log) between the measured sizes,
        clamped at the ends; ``disk_to_host_bw`` without them."""
        curve = sorted((int(k), float(v)) for k, v in dict(self.disk_read_by_size).items())
        return _interpolate(curve, request) if curve else self.disk_to_host_bw

    def mm_decode_rate(self, batch: int) -> float:
        """Decode matmul FLOP/s for ``batch`` rows (sequences) in this spec's dtype: interpolated
        (log-log) between the calibrated sizes, clamped at the ends; ``mm_flops_decode`` without a curve."""
        curve = sorted((int(k), float(v)) for k, v in dict(self.decode_by_batch.get(self.dtype, {})).items())
        if not curve:
            return self.mm_flops_decode
        exact = dict(curve).get(batch)
        if exact is not None:
            return exact
        if batch <= curve[0][0]:
            return curve[0][1]
        for (b0, r0), (b1, r1) in zip(curve, curve[1:], strict=False):
            if batch <= b1:
                t = math.log(batch / b0) / math.log(b1 / b0)
                return math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0)))
        return curve[-1][1]

    def has_rates(self, dtype: str) -> bool:
        """Whether this spec knows the compute rates of ``dtype`` (its own dtype's, or measured ones)."""
        return dtype == self.dtype or bool(self.rates_by_dtype.get(dtype))

    def quant_rate(self, kind: str, key: str) -> float | None:
        """The ``QUANT_RATES`` figure ``key`` of compressed weights of ``kind``, None when unknown."""
        value = dict(self.quant_rates.get(kind, {})).get(key)
        return float(value) if value else None

    def for_dtype(self, dtype: str) -> HardwareSpec:
        """This spec with the compute rates measured in ``dtype``; unchanged when it has none for it."""
        rates = self.rates_by_dtype.get(dtype)
        if dtype == self.dtype or not rates:
            return self
        changes: dict[str, Any] = {**rates, "dtype": dtype}
        return dataclasses.replace(self, **changes)

    def with_memory(self, device: int | None = None, host: int | None = None, disk: int | None = None) -> HardwareSpec:
        """This spec with the given tier budgets replacing its memory figures (``None`` keeps one)."""
        if device is not None and self.device_is_host:
            log.info("no separate device on %s: the device tier is host RAM, the device budget is ignored", self.name)
            device = None
        return dataclasses.replace(
            self,
            device_mem=self.device_mem if device is None else int(device),
            host_mem=self.host_mem if host is None else int(host),
            disk_mem=self.disk_mem if disk is None else int(disk),
        )

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rates_by_dtype"] = {d: dict(r) for d, r in self.rates_by_dtype.items()}
        data["decode_by_batch"] = {d: dict(c) for d, c in self.decode_by_batch.items()}
        data["quant_rates"] = {k: dict(r) for k, r in self.quant_rates.items()}
        data["disk_read_by_size"] = dict(self.disk_read_by_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "hardware spec") -> HardwareSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{origin}: unknown field(s) {', '.join(unknown)}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{origin}: missing field(s) {', '.join(missing)}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> HardwareSpec:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read hardware spec {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of hardware figures")
        return cls.from_dict(data, origin=str(path))


# ---- presets ---------------------------------------------------------------------------------------
# Data-sheet presets are de-rated by these factors (FlexGen's note: constants fitted to real runs beat
# data sheets; these are for planning before `flexrun calibrate` has been run on such a machine).
_DERATE = {
    "mm_prefill": 0.5,  # of dense bf16 tensor-core peak: large GEMMs reach 50-70%
    "mm_decode": 0.3,  # skinny GEMMs (one token per sequence) reach less
    "bmm_prefill": 0.25,  # of dense peak: attention with a mask through SDPA / batched matmul
    "bmm_decode": 0.25,  # FLOP/byte x memory bandwidth: decode attention reads the cache once, 1 FLOP/byte
    "mem_bw": 0.8,  # of peak HBM bandwidth
    "pcie": 0.75,  # of PCIe peak per direction
}


def _datasheet(
    name: str, device_mem: float, host_mem: float, dense_tflops: float, hbm_gbs: float, pcie_gbs: float, source: str
) -> HardwareSpec:
    """A GPU preset from data-sheet figures (GB/s and TFLOP/s, decimal), de-rated by ``_DERATE``."""
    hbm = hbm_gbs * 1e9
    pcie = pcie_gbs * 1e9 * _DERATE["pcie"]
    return HardwareSpec(
        name=name,
        source=source + "; de-rated: " + ", ".join(f"{k} x{v:g}" for k, v in _DERATE.items()),
        device_mem=int(device_mem * GiB),
        host_mem=int(host_mem * GiB),
        disk_mem=int(1500 * GiB),
        # A local PCIe 4 NVMe SSD: ~4 GB/s read, ~2 GB/s write sustained on data sheets, halved.
        disk_to_host_bw=2.0e9,
        host_to_disk_bw=1.0e9,
        host_to_device_bw=pcie,
        device_to_host_bw=pcie,
        device_mem_bw=hbm * _DERATE["mem_bw"],
        mm_flops_prefill=dense_tflops * TFLOPS * _DERATE["mm_prefill"],
        mm_flops_decode=dense_tflops * TFLOPS * _DERATE["mm_decode"],
        bmm_flops_prefill=dense_tflops * TFLOPS * _DERATE["bmm_prefill"],
        bmm_flops_decode=hbm * _DERATE["bmm_decode"],
        # FlexGen's fitted T4-host figure (0.0123 TFLOP/s) doubled for a newer many-core host: a guess.
        host_attn_flops=0.025 * TFLOPS,
        dtype="bfloat16",
    )


_PRESET_LIST = [
    # The CPU-only box flexrun is developed on: 2 cores (AMD EPYC), 24 GiB RAM, a virtual block device.
    # Measured with `flexrun calibrate` (bfloat16, 2 threads; three runs agreed within 10%, disk writes
    # within 30%). torch runs bfloat16 F.linear there at ~21 GFLOP/s against ~130-160 in float32.
    HardwareSpec(
        name="cpu",
        source="measured by `flexrun calibrate` (bfloat16) on a 2-core AMD EPYC VM, 24 GiB RAM (2026-11)",
        device_mem=0,
        host_mem=24 * GiB,
        disk_mem=64 * GiB,
        disk_to_host_bw=2.2e9,
        host_to_disk_bw=0.5e9,
        host_to_device_bw=0.0,
        device_to_host_bw=0.0,
        device_mem_bw=28e9,
        mm_flops_prefill=21e9,
        mm_flops_decode=21e9,
        bmm_flops_prefill=115e9,
        bmm_flops_decode=3.6e9,
        host_attn_flops=3.6e9,
        device_is_host=True,
        dtype="bfloat16",
        # The same VM in float32 (it has no bf16 hardware), and the decode matmul rate per micro-batch size,
        # from a quiet-machine `flexrun calibrate` (2026-11-25), rounded.
        rates_by_dtype={
            "float32": {
                "mm_flops_prefill": 105e9,
                "mm_flops_decode": 56e9,
                "bmm_flops_prefill": 93e9,
                "bmm_flops_decode": 7.1e9,
                "host_attn_flops": 7.1e9,
            },
        },
        decode_by_batch={
            "bfloat16": {"1": 17.4e9, "4": 17.4e9, "16": 18.0e9, "64": 20.5e9},
            "float32": {"1": 7.6e9, "2": 7.3e9, "4": 9.3e9, "8": 19.5e9, "16": 28.0e9, "32": 45.9e9, "64": 64.3e9},
        },
        # Compressed weights on the same VM, OPT-1.3B's fc1 (2048 x 8192): torch's fused ops at 8 rows in
        # 6.6 ms (int4) and 4.7 ms (int8), ~40 and ~57 GFLOP/s (benchmarks/README.md, "Compression");
        # dequantized chunk by chunk into float32, ~0.6e9 (int4) and ~1.2e9 (int8) values/s, and an int4
        # weight read from disk repacked for the fused op at ~1.5e9 values/s (2026-12-03, at b0e9738).
        quant_rates={
            "int4": {"dequant": 0.6e9, "fused_mm_flops": 40e9, "repack": 1.5e9},
            "int8": {"dequant": 1.2e9, "fused_mm_flops": 57e9},
        },
    ),
    # FlexGen's fitted constants (its cost_model.py, GCP T4 machine) and the paper's memory figures.
    HardwareSpec(
        name="t4",
        source=(
            "FlexGen (Sheng et al. 2023) constants fitted on a GCP NVIDIA T4 16 GB box, 208 GB RAM, 1.5 TB SSD; "
            "device memory bandwidth from the T4 data sheet (320 GB/s) x0.8"
        ),
        device_mem=15 * GiB,
        host_mem=204 * GiB,
        disk_mem=1500 * GiB,
        disk_to_host_bw=0.473 * GiB,
        host_to_disk_bw=2.015 * GiB,
        host_to_device_bw=12.89 * GiB,
        device_to_host_bw=4.82 * GiB,
        device_mem_bw=320e9 * 0.8,
        mm_flops_prefill=21.24 * TFLOPS,
        mm_flops_decode=4.3 * TFLOPS,
        bmm_flops_prefill=9.97 * TFLOPS,
        bmm_flops_decode=0.079 * TFLOPS,
        host_attn_flops=0.0123 * TFLOPS,
        device_to_host_cache_bw=0.97 * GiB,
        host_to_disk_cache_bw=0.746 * GiB,
        dtype="float16",
    ),
    _datasheet(
        "a100-40gb",
        40,
        85,
        312,
        1555,
        32,
        "NVIDIA A100 40GB SXM data sheet (312 TFLOP/s bf16 dense, 1555 GB/s HBM2, PCIe 4 x16 32 GB/s); "
        "85 GiB RAM as a GCP a2-highgpu-1g",
    ),
    _datasheet(
        "a100-80gb",
        80,
        170,
        312,
        2039,
        32,
        "NVIDIA A100 80GB SXM data sheet (312 TFLOP/s bf16 dense, 2039 GB/s HBM2e, PCIe 4 x16 32 GB/s); "
        "170 GiB RAM as a GCP a2-ultragpu-1g",
    ),
    _datasheet(
        "h100-80gb",
        80,
        234,
        989,
        3350,
        64,
        "NVIDIA H100 80GB SXM data sheet (989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, PCIe 5 x16 64 GB/s); "
        "234 GiB RAM, an eighth of a GCP a3-highgpu-8g",
    ),
]
PRESETS: dict[str, HardwareSpec] = {spec.name: spec for spec in _PRESET_LIST}


def _interpolate(curve: list[tuple[int, float]], x: float) -> float:
    """``curve`` (sorted (x, y) points) at ``x``, log-log between points, clamped at the ends."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x <= x1:
            t = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return curve[-1][1]


def preset_names() -> list[str]:
    return list(PRESETS)


def load_hardware(spec: str) -> HardwareSpec:
    """The hardware spec named by ``spec``: a preset name or a JSON file (from ``flexrun calibrate --out``).
    Raises FlexrunError when nothing matches, listing the presets. This machine's own spec, calibrated on
    first use, is ``costmodel.machine.hardware_for(None)``."""
    names = ", ".join(PRESETS)
    key = spec.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec).expanduser()
    if path.is_file() or spec.endswith(".json"):
        return HardwareSpec.load(path)
    raise FlexrunError(f"unknown hardware {spec!r}: use a preset ({names}) or a JSON file from `flexrun calibrate`")
