"""The ``generate`` job: prompts -> token ids -> engine -> JSONL records."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flexrun.errors import InputError
from flexrun.runtime.sampling import SamplingParams
from flexrun.textio import PromptRecord, read_prompts
from flexrun.weights.store import TensorStore


def load_tokenizer(store: TensorStore) -> Any:
    """The checkpoint's tokenizer, or None when the store has none (dummy weights)."""
    tok_dir = store.tokenizer_dir()
    if tok_dir is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)


def tokenize(records: list[PromptRecord], tokenizer: Any, model: str, chat: bool = False) -> list[list[int]]:
    """Token ids per record; with ``chat`` each text prompt becomes one user turn of the chat template."""
    if chat and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{model}'s tokenizer has no chat template; drop --chat")
    ids = []
    for r in records:
        if r.input_ids is not None:
            ids.append(list(r.input_ids))
        elif tokenizer is None:
            raise InputError(f'{model} has no tokenizer: give prompts as "input_ids" records instead of text')
        elif chat:
            turn = [{"role": "user", "content": r.prompt}]
            text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            assert r.prompt is not None
            ids.append(tokenizer(r.prompt)["input_ids"])
    return ids


def run_generate(
    kw: dict[str, Any],
    prompts: tuple[str, ...],
    input_file: str | None,
    output: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    seed: int,
    stop: tuple[str, ...],
    make_engine: Callable[[dict[str, Any], int, int, int], Any],
    print_summary: Callable[[Any, Any, Any, bool], None],
    chat: bool = False,
) -> None:
    use_stdin = input_file == "-" or (not prompts and not input_file and not sys.stdin.isatty())
    stdin = sys.stdin if use_stdin else None
    records = read_prompts(prompts, input_file, stdin)
    out_stream = None
    if output:
        try:
            out_stream = Path(output).open("w", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise InputError(f"cannot write {output}: {exc.strerror}") from None
    longest = max((len(r.input_ids) if r.input_ids is not None else 0) for r in records)
    store, engine = None, None
    try:
        from flexrun.weights.convert import ensure_store

        store = ensure_store(kw["model"], dtype=kw["dtype"], dummy=kw["dummy_weights"], store_root=kw["store_dir"])
        tokenizer = load_tokenizer(store)
        ids = tokenize(records, tokenizer, kw["model"], chat)
        longest = max(len(p) for p in ids)
        if longest + max_new_tokens > store.config.max_seq_len and store.config.position == "learned":
            n = max(range(len(ids)), key=lambda k: len(ids[k]))
            raise InputError(
                f"prompt {records[n].id} has {len(ids[n])} tokens; with --max-new-tokens {max_new_tokens} that exceeds "
                f"the model's {store.config.max_seq_len} positions"
            )
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )
        stop_check = None
        if stop and tokenizer is not None:

            def stop_check(n: int, toks: list[int]) -> bool:
                text = tokenizer.decode(toks, skip_special_tokens=True)
                return any(s in text for s in stop)

        _, engine = make_engine(kw, longest, max_new_tokens, len(ids))
        with engine:
            new, stats, _ = engine.generate(ids, params, stop_check=stop_check)
        stream = out_stream or sys.stdout
        for rec, prompt_ids, toks in zip(records, ids, new, strict=True):
            row: dict[str, Any] = {"id": rec.id}
            if rec.prompt is not None:
                row["prompt"] = rec.prompt
            row["input_ids"] = prompt_ids
            row["output_ids"] = toks
            if tokenizer is not None:
                text = tokenizer.decode(toks, skip_special_tokens=True)
                for s in stop:
                    if s in text:
                        text = text[: text.index(s)]
                row["text"] = text
            stream.write(json.dumps(row) + "\n")
        stream.flush()
        print_summary(store, engine, stats, False)
    finally:
        if out_stream is not None:
            out_stream.close()
