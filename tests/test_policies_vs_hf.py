"""Every supported decoder family against Hugging Face transformers: tiny random checkpoints, converted
with flexrun's converter, generated in float32 under several placements with left-padded batches."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from flexrun.resolver import config_from_path
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.store import TensorStore
from tests.helpers import place, save_and_convert
from tests.hf_decoders import FAMILIES, tiny_decoder
from tests.hf_reference import hf_greedy, hf_param_bytes, logits_by_prompt

# Mixed lengths, so blocks are left-padded; the longest exceeds GPT-Neo's local window of 3.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24], [40, 41]]
NEW = 5


PLACEMENTS = {
    "all-host": place("host=100", "host=100", b=8, n=1),
    "weights-disk-microbatches": place("disk=100", "host=50,disk=50", b=1, n=3),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model = tiny_decoder(request.param, seed=3)
    d = tmp_path_factory.mktemp(request.param)
    save_and_convert(model, d)
    tokens, logits = hf_greedy(model, PROMPTS, NEW)
    return {"name": request.param, "model": model, "dir": d, "tokens": tokens, "logits": logits}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_greedy_tokens_and_logits_match_hf(family: dict[str, Any], placement: str) -> None:
    pl = PLACEMENTS[placement]
    d = family["dir"]
    with Engine(TensorStore(d / "store"), pl, max_seq_len=16, offload_dir=d / "offload") as engine:
        out, stats, logits = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=NEW, stop_at_eos=False), return_logits=True
        )
    assert out == family["tokens"]
    # Per-step logits of each prompt, rebuilt from the blocks (sequences run longest first).
    got = logits_by_prompt(logits, PROMPTS, pl.block_size, NEW)
    for n in range(len(PROMPTS)):
        # float32 on both sides: only summation order differs (fused QKV, SDPA vs HF's eager kernels,
        # padding columns), about 1e-6 relative on logits of magnitude ~10.
        torch.testing.assert_close(got[n], family["logits"][n], rtol=1e-4, atol=1e-4)
    if "disk" in pl.weights.spec():
        assert stats.disk_bytes_read > 0


def test_model_bytes_equal_hf_parameter_count(family: dict[str, Any]) -> None:
    cfg = config_from_path(family["dir"] / "ckpt")
    cfg = dataclasses.replace(cfg, dtype="float32")
    # HF counts a tied LM head once, as model_bytes does.
    assert cfg.model_bytes() == hf_param_bytes(family["model"], 4)
    kv_heads = getattr(family["model"].config, "num_key_value_heads", None) or cfg.n_head
    assert cfg.cache_bytes(2, 10) == 2 * cfg.num_hidden_layers * 2 * 10 * kv_heads * cfg.head_dim * 4


def test_store_config_round_trips(family: dict[str, Any]) -> None:
    store = TensorStore(family["dir"] / "store")
    assert store.config == config_from_path(family["dir"] / "ckpt")
    assert json.loads((family["dir"] / "store" / "index.json").read_text())["config"]["arch"] == family["name"]
