"""The resident hot set (issue 25): which weights a small budget keeps resident, the tables read by rows from
disk, and the bytes a decode step reads, as the engine counts them against the cost model's prediction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexrun.costmodel.hardware import PRESETS
from flexrun.costmodel.prediction import predict
from flexrun.diskio import ALIGN
from flexrun.layout import GATHERED, stack_layout
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.weights import RowTable
from flexrun.weights.store import TensorStore
from tests.helpers import place, save_and_convert
from tests.hf_decoders import tiny_decoder
from tests.hf_reference import hf_greedy, tiny_opt

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [40, 41]]
NEW = 5


@pytest.fixture(scope="module")
def opt(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, TensorStore, Path]:
    """A tiny OPT: tied head, learned positions; a vocabulary of 1000 rows of 256 bytes (62 pages)."""
    _, model = tiny_opt(seed=3, hidden_size=64, n_head=4, vocab_size=1000)
    d = tmp_path_factory.mktemp("opt")
    return model, save_and_convert(model, d), d


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, TensorStore, Path]:
    """A tiny Llama: an untied head, rotary positions."""
    model = tiny_decoder("llama", seed=4, tie_word_embeddings=False)
    d = tmp_path_factory.mktemp("llama")
    return model, save_and_convert(model, d), d


def _tiers(store: TensorStore, shares: str) -> dict[str, str]:
    with Engine(store, place(weights=shares, b=1), max_seq_len=16) as engine:
        return dict(engine.weights.tier)


def test_the_head_is_kept_resident_first_and_the_tables_read_by_rows_go_to_disk_first(opt, llama) -> None:
    # OPT's tied embeddings are the head a step reads whole: the first tensor a host share keeps.
    _, store, _ = opt
    order = stack_layout(store.config).residency_order({n: m.nbytes for n, m in store.tensors.items()}, GATHERED)
    assert order[0] == "embed_tokens" and order[-1] == "embed_positions"
    share = 100 * store.meta("embed_tokens").nbytes / store.total_bytes()
    tiers = _tiers(store, f"host={share + 1:.3f},disk={99 - share:.3f}")
    assert tiers["embed_tokens"] == "host" and tiers["layers.0.qkv_w"] == "disk"
    # The untied Llama: its input embeddings (read by rows) the first to go to disk (its layers, bigger
    # than its head, come first).
    _, store, _ = llama
    order = stack_layout(store.config).residency_order({n: m.nbytes for n, m in store.tensors.items()}, GATHERED)
    assert order[:2] == ["layers.0.ln1_w", "layers.0.qkv_w"] and order[-1] == "embed_tokens"
    tiers = _tiers(store, "host=90,disk=10")
    assert tiers["embed_tokens"] == "disk" and tiers["lm_head"] == "host"
    assert all(t == "host" for n, t in tiers.items() if n != "embed_tokens")


def test_a_table_read_by_rows_gives_the_rows_and_reads_only_their_pages(opt) -> None:
    _, store, _ = opt
    table = RowTable(store, "embed_tokens")
    table.allocate()
    full = store.read("embed_tokens")
    assert isinstance(full, torch.Tensor)
    ids = torch.tensor([[7, 8, 9, 999], [7, 500, 0, 8]])
    before = store.bytes_read
    torch.testing.assert_close(table.lookup(ids), F.embedding(ids, full), rtol=0, atol=0)
    # Rows 0, 7-9 share the first page; 500 and 999 one each (256-byte rows, 16 a page).
    assert store.bytes_read - before == 3 * ALIGN
    with pytest.raises(IndexError):
        table.lookup(torch.tensor([1000]))


@pytest.mark.parametrize("weights", ["disk=100", "host=30,disk=70", "host=70,disk=30"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_decode_reads_what_the_cost_model_predicts_and_the_tokens_match_hf(
    family: str, weights: str, opt, llama
) -> None:
    model, store, d = opt if family == "opt" else llama
    placement = place(weights=weights, b=2, n=2)
    with Engine(store, placement, max_seq_len=16, offload_dir=d / "off") as engine:
        out, stats, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False))
        whole = engine.weights.bytes_read_per_step
        padding = whole - sum(store.meta(n).nbytes for names in engine.weights._disk for n in names)
        gathered = list(engine.weights.rows)
    assert out == hf_greedy(model, PROMPTS, NEW)[0]
    measured = stats.decode_bytes_read / stats.decode_steps  # the cache is on the host: weights only
    rows = len(gathered) * placement.block_size * ALIGN  # at most a page per row of a table read by rows
    assert whole <= measured <= whole + rows  # each tensor on disk read once, padded to the page
    # The cost model's prediction leaves out the padding (the tiny model's biases are mostly padding),
    # prorates the rows by the disk share and, at a split, puts tensors on tiers by their midpoints (within
    # half the largest tensor either way).
    cfg = dataclasses.replace(store.config, compute_dtype="")
    pred = predict(cfg, PRESETS["cpu"], placement, prompt_len=7, gen_len=NEW)
    split = 0 if weights == "disk=100" else max(m.nbytes for m in store.tensors.values()) / 2
    assert abs(pred.step_weight_reads - (measured - padding)) <= rows + split


def test_a_disk_resident_table_is_not_read_whole_each_step(opt) -> None:
    """Before the hot set, a disk-resident embedding table was read whole by each step's input group, and
    a tied one again by the head: now its rows, and the head once."""
    _, store, d = opt
    with Engine(store, place(weights="disk=100", b=4), max_seq_len=16, offload_dir=d / "off") as engine:
        _, stats, _ = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False))
    per_step = stats.decode_bytes_read / stats.decode_steps
    padded = {n: m.padded_nbytes for n, m in store.tensors.items()}
    whole = sum(padded.values()) - padded["embed_positions"]  # the tied table once, by the head
    assert whole <= per_step <= whole + 2 * 4 * ALIGN  # and a page per row of the 4 sequences of each table
