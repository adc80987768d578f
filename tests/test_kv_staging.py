"""A disk-resident KV cache on a CPU reads a layer's micro-batches all at once (issue 25): a small cache read
queued behind a streamed weight read waits for it, so the wait is paid once a layer, not once a micro-batch."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

from flexrun import diskio
from flexrun.layout import KV_STAGE_BYTES, kv_stage_depth
from flexrun.runtime.engine import Engine, _CacheWalk
from flexrun.runtime.iopool import done
from flexrun.runtime.sampling import SamplingParams
from tests.helpers import place, save_and_convert
from tests.hf_reference import tiny_opt


def test_a_turn_per_micro_batch_and_one_more_within_the_staging_bytes() -> None:
    assert kv_stage_depth(1, 4096, device_is_host=True) == 2
    assert kv_stage_depth(8, 4096, device_is_host=True) == 9
    # Slots so big that only a few fit the staging bytes; never fewer than two (double buffering).
    assert kv_stage_depth(8, KV_STAGE_BYTES // 8, device_is_host=True) == 4
    assert kv_stage_depth(8, KV_STAGE_BYTES, device_is_host=True) == 2
    # Where staging takes device memory too, the cache stays double-buffered.
    assert kv_stage_depth(8, 4096, device_is_host=False) == 2


class _FakeCache:
    depth = 4

    def __init__(self) -> None:
        self.fetched: list[tuple[int, int]] = []

    def fetch(self, i: int, j: int, b: int, length: int, window: int = 0) -> Future:
        self.fetched.append((i, j))
        return done(((i, j), len(self.fetched) - 1))


def test_the_walk_keeps_every_spare_turn_reading() -> None:
    cache = _FakeCache()
    walk = _CacheWalk(cache, [1, 1, 1], [0, 0], past=5)  # type: ignore[arg-type]
    assert cache.fetched == [(0, 0), (0, 1), (0, 2)]  # depth - 1 in flight before the first is used
    assert walk.next()[0] == (0, 0)
    assert cache.fetched[-1] == (1, 0)  # the next layer's first read starts while layer 0 computes
    for _ in range(5):
        walk.next()
    assert len(cache.fetched) == 6  # every (layer, micro-batch) fetched once, none past the end


def test_a_disk_cache_stages_a_layer_and_matches_the_synchronous_run(tmp_path: Path) -> None:
    _, model = tiny_opt(seed=3)
    store = save_and_convert(model, tmp_path)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18], [19, 20, 21]]
    params = SamplingParams(max_new_tokens=6, stop_at_eos=False)
    outs = []
    for overlap in (True, False):
        pl = place(cache="disk=100", b=1, n=5, overlap=overlap)
        with Engine(store, pl, max_seq_len=16, offload_dir=tmp_path / "offload") as engine:
            assert engine.cache.depth == 6
            staged = engine.ledger.items["host"]["kv staging"]
            assert staged == 2 * 6 * diskio.padded(engine.cache.slot_bytes)
            outs.append(engine.generate(prompts, params)[0])
    assert outs[0] == outs[1]
