"""Tensor-parallel ranks on one machine share its memory and disk: each rank's budget is its part (of a flag's
figure or of what is free), in ``plan --tp``, in the engine's ledger and in its refusals; a bound each process
has to itself (an rlimit) is not divided; a rank's slice of a whole store, written at load, is counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexrun.errors import BudgetError
from flexrun.memlimits import MemoryBound, ProcessMemory
from flexrun.parallel import Shard, slice_bytes, write_shard
from flexrun.runtime.tiers import RUNTIME_RSS, Budgets, Ledger
from tests.helpers import run, save_and_convert
from tests.hf_decoders import tiny_decoder

GiB, MiB = 1 << 30, 1 << 20
RESIDENT = 100 * MiB
# The machine has 8 GiB free, the cgroup 3 of its 4 GiB, the address-space rlimit 9 of its 10 GiB.
MEMORY = ProcessMemory(
    16 * GiB,
    (
        MemoryBound("machine available memory", None, 8 * GiB),
        MemoryBound("cgroup v2 /sys/fs/cgroup/job memory.max", 4 * GiB, 3 * GiB),
        MemoryBound("RLIMIT_AS", 10 * GiB, 9 * GiB, per_process=True),
    ),
    RESIDENT,
)


def test_a_rank_holds_its_part_of_what_the_machine_and_cgroup_leave() -> None:
    # One process may hold what the cgroup leaves plus its own resident memory; two ranks in the cgroup each
    # half of what it leaves; the rlimit, each process's own, would allow more and is not divided.
    assert MEMORY.share(1) == 3 * GiB + RESIDENT
    assert MEMORY.share(2) == 3 * GiB // 2 + RESIDENT
    tight = ProcessMemory(16 * GiB, (*MEMORY.bounds[:2], MemoryBound("RLIMIT_AS", GiB, GiB // 2, per_process=True)))
    assert tight.share(2) == GiB // 2  # the rlimit is tighter than half the cgroup: every rank has the whole rlimit
    one = Budgets(memory=MEMORY).host_budget()
    two = Budgets(memory=MEMORY, ranks=2).host_budget()
    assert one.buffers == int((3 * GiB + RESIDENT) * 0.9) - RESIDENT - RUNTIME_RSS
    assert two.buffers == int((3 * GiB // 2 + RESIDENT) * 0.9) - RESIDENT - RUNTIME_RSS
    assert "each of 2 local ranks may hold" in two.source and "cgroup v2" in two.source


def test_flags_and_free_disk_are_divided_and_say_so(tmp_path: Path) -> None:
    budgets = Budgets(host=2 * GiB, disk=6 * GiB, ranks=2, memory=MEMORY, free_disk=100 * GiB)
    sizes, sources = budgets.described(tmp_path, has_cuda=False)
    assert sizes["host"] == GiB and sizes["disk"] == 3 * GiB
    assert sources["host"] == "1/2 of --host-mem 2.0 GiB, one of 2 local ranks' part"
    assert sources["disk"] == "1/2 of --disk-mem 6.0 GiB, one of 2 local ranks' part"
    sizes, sources = Budgets(ranks=4, memory=MEMORY, free_disk=100 * GiB).described(tmp_path, has_cuda=False)
    assert sizes["disk"] == 25 * GiB and sources["disk"].startswith("1/4 of free space under")
    # One process: the flags' budgets and sources as before.
    _, sources = Budgets(host=GiB, disk=GiB, memory=MEMORY, free_disk=100 * GiB).described(tmp_path, False)
    assert sources["host"] == "--host-mem" and sources["disk"] == "--disk-mem"


def test_a_host_flag_over_a_ranks_part_of_the_cgroup_is_refused() -> None:
    # 3 GiB fits the 4 GiB cgroup for one process, but two ranks in it get 1.5 GiB each of its 2 GiB part.
    Budgets(host=3 * GiB, memory=MEMORY).host_budget()
    Budgets(host=3 * GiB, ranks=2, memory=MEMORY).host_budget()
    with pytest.raises(BudgetError, match=r"--host-mem 2\.0 GiB per rank .* exceed its memory limit 2\.0 GiB \(1/2 of"):
        Budgets(host=4 * GiB, ranks=2, memory=MEMORY).host_budget()


def test_the_ledger_refusal_names_the_ranks_part(tmp_path: Path) -> None:
    budgets = Budgets(disk=GiB, ranks=2, memory=MEMORY, free_disk=100 * GiB)
    sizes, sources = budgets.described(tmp_path, has_cuda=False)
    ledger = Ledger()
    ledger.add("disk", "this rank's slice of the store", 600 * MiB)
    with pytest.raises(BudgetError, match=r"budget is 512\.0 MiB \(1/2 of --disk-mem 1\.0 GiB, one of 2 local"):
        ledger.check(sizes, tmp_path, sources)


def test_slice_bytes_is_what_slicing_writes(tmp_path: Path) -> None:
    store = save_and_convert(tiny_decoder("llama", seed=1, num_attention_heads=4, num_key_value_heads=2), tmp_path)
    for rank in range(2):
        out = write_shard(store, Shard(rank, 2), tmp_path / f"r{rank}")
        written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and f.name != "index.json")
        # The estimate pads each tensor as the store does (the rank's store pads its files alike).
        assert written <= slice_bytes(store, Shard(rank, 2)) <= written + 4096


PLAN = ["plan", "--model", "facebook/opt-1.3b", "--hardware", "cpu", "--json", "--prompt-len", "64", "--gen-len", "8"]
PLAN += ["--max-block-size", "4", "--compress-weight", "none", "--compress-cache", "none"]


def test_plan_tp_divides_a_machines_budgets_among_its_ranks() -> None:
    flags = ["--host-mem", "8GiB", "--disk-mem", "100GiB"]
    two = json.loads(run(*PLAN, *flags, "--tp", "2").stdout)
    assert two["budgets"]["host"] == 4 * GiB and two["budgets"]["disk"] == 50 * GiB
    assert two["budget_sources"]["host"] == "1/2 of --host-mem 8.0 GiB, one of 2 local ranks' part"
    assert two["tensor_parallel"]["local_ranks"] == 2
    # Two machines, one rank each: each has its machine's budgets whole.
    apart = json.loads(run(*PLAN, *flags, "--tp", "2", "--nodes", "2").stdout)
    assert apart["budgets"]["host"] == 8 * GiB and apart["tensor_parallel"]["nodes"] == 2
    # Nothing fits: the budgets the refusal names are a rank's, the flags the machine's.
    r = run(*PLAN, "--host-mem", "100MiB", "--disk-mem", "100MiB", "--tp", "2")
    assert r.exit_code == 1 and "(now 50.0 MiB)" in r.stderr
    assert "each one of 2 local tensor-parallel ranks' part: --host-mem and --disk-mem give the machine's" in r.stderr
    r = run(*PLAN, "--tp", "4", "--nodes", "3")
    assert r.exit_code == 2 and "--tp 4 ranks do not spread evenly over 3 machines" in r.output
