"""Baseline: Hugging Face transformers `generate`, the whole model in memory. One JSON line per run."""

from __future__ import annotations

from hf_common import emit, parser, prompts, random_model, timed_generate

if __name__ == "__main__":
    args = parser(__doc__ or "").parse_args()
    model = random_model(args.model, args.dtype)
    ids = prompts(model.config.vocab_size, args.batch, args.prompt_len)
    emit("hf-generate", args, timed_generate(model, ids, args.gen_len))
