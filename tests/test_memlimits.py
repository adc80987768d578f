"""Memory budgets from where the process lives: cgroup v1 / v2 limits, rlimits, the machine (issue 25).

The unit tests fake ``/sys`` and ``/proc``; the last test puts a real ``flexrun plan`` in a 1 GiB memory
cgroup (root and a writable cgroup v1 or v2 hierarchy; skipped otherwise).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flexrun.errors import BudgetError
from flexrun.memlimits import process_memory

GiB = 1024**3
MiB = 1024**2
UNLIMITED_V1 = 9223372036854771712


def _machine(total: int = 24 * GiB, available: int = 20 * GiB):
    return lambda: (total, available)


def _no_rlimits(which: int) -> tuple[int, int]:
    return resource.RLIM_INFINITY, resource.RLIM_INFINITY


def _fake(tmp_path: Path, cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake ``/sys`` and ``/proc``: ``/proc/self/cgroup`` holds ``cgroup``; ``files`` maps paths under
    ``/sys/fs/cgroup`` to their contents."""
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    (proc_root / "self").mkdir(parents=True)
    (proc_root / "self" / "cgroup").write_text(cgroup)
    (sys_root / "fs" / "cgroup").mkdir(parents=True)
    for rel, text in files.items():
        path = sys_root / "fs" / "cgroup" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sys_root, proc_root


def _read(sys_root: Path, proc_root: Path, **kw):
    kw.setdefault("machine", _machine())
    kw.setdefault("getrlimit", _no_rlimits)
    return process_memory(sys_root=sys_root, proc_root=proc_root, **kw)


def test_no_cgroup_is_the_machine(tmp_path: Path) -> None:
    sys_root, proc_root = _fake(tmp_path, "0::/\n", {})
    mem = _read(sys_root, proc_root)
    assert mem.available == 20 * GiB
    assert mem.source == "machine available memory"
    assert mem.hard_limit is None
    assert mem.total == 24 * GiB


def test_unreadable_proc_is_the_machine(tmp_path: Path) -> None:
    mem = _read(tmp_path / "nosys", tmp_path / "noproc")
    assert mem.available == 20 * GiB and mem.hard_limit is None


def test_cgroup_v2_limit_minus_usage(tmp_path: Path) -> None:
    sys_root, proc_root = _fake(
        tmp_path,
        "0::/job\n",
        {"job/memory.max": f"{GiB}\n", "job/memory.current": f"{300 * MiB}\n", "job/memory.stat": "anon 1\n"},
    )
    mem = _read(sys_root, proc_root)
    assert mem.available == GiB - 300 * MiB
    assert mem.source.startswith("cgroup v2 ") and mem.source.endswith("job memory.max 1.0 GiB")
    assert mem.total == GiB


def test_cgroup_v2_max_is_no_limit(tmp_path: Path) -> None:
    sys_root, proc_root = _fake(tmp_path, "0::/job\n", {"job/memory.max": "max\n", "job/memory.current": "5\n"})
    mem = _read(sys_root, proc_root)
    assert mem.hard_limit is None and mem.available == 20 * GiB


def test_cgroup_v2_inactive_file_is_reclaimable(tmp_path: Path) -> None:
    stat = f"anon {100 * MiB}\nfile {600 * MiB}\ninactive_file {500 * MiB}\nactive_file {100 * MiB}\n"
    sys_root, proc_root = _fake(
        tmp_path,
        "0::/job\n",
        {"job/memory.max": f"{GiB}", "job/memory.current": f"{700 * MiB}", "job/memory.stat": stat},
    )
    assert _read(sys_root, proc_root).available == GiB - 200 * MiB


def test_cgroup_v2_parent_holds_the_limit(tmp_path: Path) -> None:
    """A pod's limit sits on the parent, the container's own group says max: the parent's bound counts."""
    sys_root, proc_root = _fake(
        tmp_path,
        "0::/pod/ctr\n",
        {
            "pod/memory.max": f"{2 * GiB}",
            "pod/memory.current": f"{GiB + 512 * MiB}",
            "pod/ctr/memory.max": "max",
            "pod/ctr/memory.current": f"{100 * MiB}",
        },
    )
    mem = _read(sys_root, proc_root)
    assert mem.available == 512 * MiB
    assert "pod memory.max" in mem.source and "ctr" not in mem.source


def test_nested_limits_the_tightest_wins(tmp_path: Path) -> None:
    sys_root, proc_root = _fake(
        tmp_path,
        "0::/a/b\n",
        {
            "a/memory.max": f"{4 * GiB}",
            "a/memory.current": f"{3 * GiB}",  # 1 GiB left
            "a/b/memory.max": f"{3 * GiB}",
            "a/b/memory.current": f"{GiB}",  # 2 GiB left
        },
    )
    mem = _read(sys_root, proc_root)
    assert mem.available == GiB and "/a memory.max" in mem.source
    assert mem.hard_limit is not None and mem.hard_limit.limit == 3 * GiB
    assert mem.total == 3 * GiB


def test_cgroup_v1_limit_and_unlimited(tmp_path: Path) -> None:
    cgroup = "9:pids:/\n4:memory:/docker/abc\n1:cpu,cpuacct:/\n0::/\n"
    sys_root, proc_root = _fake(
        tmp_path,
        cgroup,
        {
            "memory/memory.limit_in_bytes": f"{UNLIMITED_V1}",
            "memory/memory.usage_in_bytes": f"{5 * GiB}",
            "memory/docker/memory.limit_in_bytes": f"{UNLIMITED_V1}",
            "memory/docker/abc/memory.limit_in_bytes": f"{GiB}",
            "memory/docker/abc/memory.usage_in_bytes": f"{400 * MiB}",
            "memory/docker/abc/memory.stat": f"inactive_file {10 * MiB}\ntotal_inactive_file {100 * MiB}\n",
        },
    )
    mem = _read(sys_root, proc_root)
    assert mem.available == GiB - 300 * MiB  # usage less total_inactive_file
    assert mem.source.startswith("cgroup v1 ") and "docker/abc memory.limit_in_bytes 1.0 GiB" in mem.source
    assert len([b for b in mem.bounds if b.limit is not None]) == 1  # "unlimited" levels are no bound


def test_cgroup_v1_without_namespace_reads_the_mounts_root(tmp_path: Path) -> None:
    """In a container the path names the host's hierarchy but the mount shows the container's own group."""
    sys_root, proc_root = _fake(
        tmp_path,
        "4:memory:/docker/abc\n",
        {"memory/memory.limit_in_bytes": f"{GiB}", "memory/memory.usage_in_bytes": f"{GiB // 4}"},
    )
    assert _read(sys_root, proc_root).available == 3 * GiB // 4


def test_unreadable_limit_files_are_no_bound(tmp_path: Path) -> None:
    sys_root, proc_root = _fake(tmp_path, "0::/job\n", {"job/memory.max": "garbage\n"})
    (sys_root / "fs" / "cgroup" / "job" / "memory.current").mkdir()  # read fails with an OSError
    mem = _read(sys_root, proc_root)
    assert mem.hard_limit is None and mem.available == 20 * GiB


def test_machine_tighter_than_cgroup(tmp_path: Path) -> None:
    sys_root, proc_root = _fake(tmp_path, "0::/job\n", {"job/memory.max": f"{16 * GiB}", "job/memory.current": "0"})
    mem = _read(sys_root, proc_root, machine=_machine(24 * GiB, 2 * GiB))
    assert mem.available == 2 * GiB and mem.source == "machine available memory"
    assert mem.total == 16 * GiB  # the hard limit still caps what the process could ever hold


def test_rlimits(tmp_path: Path) -> None:
    sys_root, proc_root = _fake(tmp_path, "0::/\n", {})
    limits = {resource.RLIMIT_AS: (8 * GiB, 8 * GiB), resource.RLIMIT_DATA: (6 * GiB, resource.RLIM_INFINITY)}

    def getrlimit(which: int) -> tuple[int, int]:
        return limits.get(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    mem = _read(sys_root, proc_root, getrlimit=getrlimit, in_use=lambda: (7 * GiB, GiB))
    assert mem.available == GiB and mem.source == "RLIMIT_AS 8.0 GiB"  # 8 - 7 beats 6 - 1
    assert mem.total == 6 * GiB
    assert {b.source for b in mem.bounds} == {"machine available memory", "RLIMIT_AS", "RLIMIT_DATA"}


def test_budgets_refuse_a_host_mem_above_the_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import flexrun.runtime.tiers as tiers

    sys_root, proc_root = _fake(tmp_path, "0::/job\n", {"job/memory.max": f"{GiB}", "job/memory.current": "0"})
    fake = _read(sys_root, proc_root)
    monkeypatch.setattr(tiers, "process_memory", lambda: fake)
    auto = tiers.Budgets().host_budget()
    # The fake /proc has no status: the baseline is the runtime's allowance alone, and the process's planned
    # peak (baseline + buffers) is 90% of the limit.
    assert auto.baseline == tiers.RUNTIME_RSS and auto.peak == int(GiB * 0.9)
    assert auto.buffers == int(GiB * 0.9) - tiers.RUNTIME_RSS
    assert (
        auto.source.startswith("90% of the 1.0 GiB this process may hold (cgroup v2 ")
        and "less its baseline" in auto.source
    )
    assert tiers.Budgets(host=512 * MiB).host_budget() == tiers.HostBudget(512 * MiB, tiers.RUNTIME_RSS, "--host-mem")
    with pytest.raises(
        BudgetError, match=r"--host-mem 2\.0 GiB and .* baseline .* exceed its memory limit 1\.0 GiB \(cgroup v2 .*job"
    ):
        tiers.Budgets(host=2 * GiB).resolved(tmp_path, has_cuda=False)
    # Below the limit alone but not with the baseline beside it: refused too.
    with pytest.raises(BudgetError, match=r"exceed its memory limit"):
        tiers.Budgets(host=GiB - tiers.RUNTIME_RSS // 2).host_budget()


def test_device_budget_is_the_free_memory_the_driver_reports(tmp_path: Path) -> None:
    from flexrun.runtime.tiers import Budgets

    def fake_info() -> tuple[int, int]:
        return 6 * GiB, 80 * GiB  # (free, total): another process holds the rest of the card

    sizes, sources = Budgets(host=MiB).described(tmp_path, has_cuda=True, mem_get_info=fake_info)
    assert sizes["device"] == int(6 * GiB * 0.9)
    assert sources["device"] == "90% of the free memory CUDA reports (6.0 GiB of 80.0 GiB)"
    assert sources["host"] == "--host-mem" and sources["disk"] == f"free space under {tmp_path}"
    sizes, sources = Budgets(device=GiB, host=MiB).described(tmp_path, has_cuda=True, mem_get_info=fake_info)
    assert sizes["device"] == GiB and sources["device"] == "--device-mem"
    sizes, sources = Budgets(host=MiB).described(tmp_path, has_cuda=False, mem_get_info=fake_info)
    assert sizes["device"] == 0 and "no CUDA device" in sources["device"]


def _mountinfo(proc_root: Path, *lines: str) -> None:
    (proc_root / "self" / "mountinfo").write_text("".join(f"{line}\n" for line in lines))


def test_cgroup_v2_mounted_elsewhere_is_found_through_mountinfo(tmp_path: Path) -> None:
    # A hybrid host: v1 controllers under /sys/fs/cgroup, the v2 hierarchy at /sys/fs/cgroup/unified.
    sys_root, proc_root = _fake(tmp_path, "0::/job\n4:memory:/\n", {"unified/job/memory.max": f"{GiB}\n"})
    _mountinfo(
        proc_root,
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755",
        "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory",
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
    )
    mem = _read(sys_root, proc_root)
    assert mem.hard_limit is not None and mem.hard_limit.limit == GiB
    assert "unified/job memory.max" in mem.source
    # Outside /sys altogether, in a directory whose name mountinfo escapes.
    (tmp_path / "my cg2" / "job").mkdir(parents=True)
    (tmp_path / "my cg2" / "job" / "memory.max").write_text(f"{2 * GiB}\n")
    _mountinfo(proc_root, "50 1 0:40 / /my\\040cg2 rw - cgroup2 none rw")
    mem = _read(sys_root, proc_root)
    assert mem.hard_limit is not None and mem.hard_limit.limit == 2 * GiB and "my cg2" in mem.source


def test_a_mount_of_part_of_the_hierarchy_is_read_from_its_root(tmp_path: Path) -> None:
    # A container's view: the v1 memory hierarchy mounted with /docker/abc as its root, while
    # /proc/self/cgroup names the full path.
    sys_root, proc_root = _fake(
        tmp_path, "4:memory:/docker/abc/job\n", {"memory/job/memory.limit_in_bytes": f"{GiB}\n"}
    )
    _mountinfo(proc_root, "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory")
    mem = _read(sys_root, proc_root)
    assert mem.hard_limit is not None and mem.hard_limit.limit == GiB
    assert mem.source.endswith("memory/job memory.limit_in_bytes 1.0 GiB")


def _memory_cgroup() -> tuple[Path, str] | None:
    """A fresh memory cgroup this test may create (its directory, its limit file), or None."""
    if os.geteuid() != 0:
        return None
    name = f"flexrun-test-{uuid.uuid4().hex[:8]}"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").is_file():
        return v1 / name, "memory.limit_in_bytes"
    v2 = Path("/sys/fs/cgroup")
    try:
        if "memory" in (v2 / "cgroup.subtree_control").read_text().split():
            return v2 / name, "memory.max"
    except OSError:
        pass
    return None


def test_plan_inside_a_1gib_cgroup_reports_its_limit(tmp_path: Path) -> None:
    found = _memory_cgroup()
    if found is None:
        pytest.skip("needs root and a writable cgroup v1 or v2 memory hierarchy")
    group, limit_file = found
    try:
        group.mkdir()
        (group / limit_file).write_text(str(GiB))
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup: {exc}")

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    def flexrun(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flexrun", *args, "-m", "opt-125m", "--prompt-len", "32", "--gen-len", "8"],
            capture_output=True,
            text=True,
            preexec_fn=enter,
            timeout=300,
            env={**os.environ, "FLEXRUN_CACHE_DIR": str(tmp_path / "cache")},
        )

    def plan(*extra: str) -> subprocess.CompletedProcess[str]:
        return flexrun("plan", *extra)

    try:
        ok = plan()
        assert ok.returncode == 0, ok.stderr
        budgets = next(line for line in ok.stdout.splitlines() if line.startswith("budgets:"))
        host = budgets.split("host ", 1)[1].split(",")[0]
        value, unit = host.split()
        assert unit == "MiB" and 500 < float(value) < 1024, budgets  # 90% of what 1 GiB less the process leaves
        assert f"{group} {limit_file} 1.0 GiB" in ok.stdout
        refused = plan("--host-mem", "2GiB")
        assert refused.returncode == 1
        assert "exceed its memory limit 1.0 GiB" in refused.stderr and str(group) in refused.stderr
        assert "Traceback" not in refused.stderr
        # A job asking for more than the limit is refused before its (dummy) store is written.
        stores = tmp_path / "stores"
        job = flexrun("bench", "--dummy-weights", "--store-dir", str(stores), "--host-mem", "2GiB")
        assert job.returncode == 1 and "exceed its memory limit 1.0 GiB" in job.stderr, job.stderr
        assert not stores.exists() or not any(stores.iterdir())
    finally:
        group.rmdir()


def test_the_planned_peak_counts_the_baseline_and_the_blocks_buffers(tmp_path: Path) -> None:
    from flexrun.costmodel.equations import block_bytes, cost_terms
    from flexrun.costmodel.hardware import PRESETS
    from flexrun.jobs.report import summary_text
    from flexrun.placement import Placement, Shares
    from flexrun.runtime.engine import Engine
    from flexrun.runtime.sampling import SamplingParams
    from flexrun.runtime.tiers import RUNTIME_RSS, Budgets
    from flexrun.weights.convert import write_dummy_store
    from flexrun.weights.store import TensorStore
    from tests.hf_reference import tiny_opt_config

    cfg = tiny_opt_config(name="t")
    store = TensorStore(write_dummy_store(cfg, tmp_path / "store", progress=False))
    placement = Placement(Shares.parse("host=100"), gpu_batch_size=2, num_gpu_batches=3)
    with Engine(store, placement, 16, budgets=Budgets(host=GiB), offload_dir=tmp_path) as engine:
        host = dict(engine.ledger.items["host"])
        # The whole block's (6 sequences') logits, three float32 copies, beside one micro-batch's working memory.
        assert host["block logits and rows (device)"] == block_bytes(engine.cfg, 6) > 3 * 6 * cfg.vocab_size * 4
        _, stats, _ = engine.generate([[5, 6, 7]] * 6, SamplingParams(max_new_tokens=2))
    assert stats.base_rss > 0
    assert stats.planned_peak == stats.base_rss + RUNTIME_RSS + sum(host.values())
    assert stats.budget_sources["host"] == "--host-mem"
    text = summary_text(engine.cfg, placement, stats)
    assert "planned peak resident memory: " in text and "of 1.0 GiB (--host-mem)" in text
    # The planner counts the same buffers: its host memory grows with the block by exactly that much.
    small, big = (cost_terms(cfg, PRESETS["cpu"], 2, nb, 8, 8).memory["host"].const for nb in (1, 3))
    assert big - small == block_bytes(cfg, 6) - block_bytes(cfg, 2)


def test_a_manual_placement_that_cannot_fit_is_refused_before_the_store_naming_flags_that_fit(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flexrun.cli import cli

    stores = tmp_path / "stores"
    args = ["bench", "-m", "opt-125m", "--dummy-weights", "--store-dir", str(stores), "--prompt-len", "32"]
    args += ["--gen-len", "8", "--placement", "manual", "--weights", "host=100", "--gpu-batch-size", "64"]
    args += ["--offload-dir", str(tmp_path / "off"), "--hardware", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--host-mem", "400MiB"])
    assert result.exit_code == 1
    assert "placement does not fit: the host tier needs about" in result.output, result.output
    assert "these flags fit: --weights " in result.output and "--gpu-batch-size" in result.output
    assert not stores.exists() or not any(stores.iterdir())  # refused before the dummy store was written
    # Nothing fits at all: said so, with the budgets that would.
    result = CliRunner().invoke(cli, [*args, "--host-mem", "100MiB"])
    assert result.exit_code == 1 and "no placement fits these budgets" in result.output, result.output
    assert not stores.exists() or not any(stores.iterdir())


def test_a_held_block_that_cannot_fit_names_flags_that_fit(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from flexrun.cli import cli

    stores = tmp_path / "stores"
    args = ["bench", "-m", "opt-125m", "--dummy-weights", "--store-dir", str(stores), "--hardware", "cpu"]
    args += ["--host-mem", "400MiB", "--gpu-batch-size", "64", "--num-gpu-batches", "8", "--prompt-len", "32"]
    result = CliRunner().invoke(cli, [*args, "--gen-len", "8", "--offload-dir", str(tmp_path / "off")])
    assert result.exit_code == 1 and "no placement of opt-125m fits" in result.output, result.output
    assert "these flags fit: --weights " in result.output and "--num-gpu-batches" in result.output
    assert not stores.exists() or not any(stores.iterdir())
