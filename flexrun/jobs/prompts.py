"""A job's prompts as token ids: tokenized (or chat-templated), checked against the model, one ``Sequence``
per completion asked for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from flexrun.config import OptConfig
from flexrun.errors import CheckpointError, InputError
from flexrun.jobs.options import JobOptions
from flexrun.jobs.textio import PromptRecord, id_key
from flexrun.runtime.stack import token_problem


@dataclass
class Sequence:
    """One sequence to generate: a prompt's token ids and which of its return sequences this is."""

    record: PromptRecord
    ids: list[int]
    seq: int
    seed_index: int  # seeds the sampler: the same for this sequence in every run of the job
    truncated: int = 0  # tokens cut off the front of the prompt (--truncate left)

    @property
    def key(self) -> tuple[str, int]:
        return id_key(self.record.id), self.seq


class HasTokenizer(Protocol):
    """A tensor store, or a model source before its store (``resolver.ModelSource``)."""

    def tokenizer_dir(self) -> Path | None: ...


def load_tokenizer(model: HasTokenizer) -> Any:
    """The model's tokenizer, or None when it has none (dummy weights). Code shipped with a checkpoint
    (``auto_map``) is never run: ``trust_remote_code`` stays off."""
    tok_dir = model.tokenizer_dir()
    if tok_dir is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    except Exception as exc:  # transformers raises many classes for a tokenizer it cannot build
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{tok_dir}: cannot load the tokenizer ({exc.__class__.__name__}: {first}); "
            'give prompts as "input_ids" records instead'
        ) from None


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (from ``chat_template.jinja``, ``chat_template.json`` or
    ``tokenizer_config.json``, wherever the checkpoint kept it)."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def prepare(records: list[PromptRecord], tokenizer: Any, cfg: OptConfig, job: JobOptions) -> list[Sequence]:
    """Token ids for every sequence of the job, each prompt checked (vocabulary, length) against the model."""
    max_new = job.params.max_new_tokens
    room = cfg.max_seq_len - max_new
    if room < 1:
        raise InputError(
            f"--max-new-tokens {max_new} leaves no room for a prompt in the model's {cfg.max_seq_len} positions"
        )
    if job.chat and tokenizer is not None and not has_chat_template(tokenizer):
        raise InputError(f"{cfg.name}'s tokenizer has no chat template; drop --chat")
    seqs: list[Sequence] = []
    for r in records:
        if r.input_ids is not None:
            ids = list(r.input_ids)
        elif tokenizer is None:
            raise InputError(f'{r.where}: {cfg.name} has no tokenizer: give prompts as "input_ids" records instead')
        elif job.chat:
            turn = [{"role": "user", "content": r.prompt}]
            text = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(r.prompt)["input_ids"])
        problem = token_problem(ids, cfg.vocab_size)
        if problem:
            raise InputError(f"{r.where}: {problem}")
        cut = 0
        if len(ids) > room:
            if job.truncate != "left":
                raise InputError(
                    f"{r.where}: prompt has {len(ids)} tokens; with --max-new-tokens {max_new} that exceeds the "
                    f"model's {cfg.max_seq_len} positions (--truncate left keeps its last {room} tokens)"
                )
            cut = len(ids) - room
            ids = ids[cut:]
        n = job.num_return_sequences
        seqs.extend(Sequence(r, ids, k, r.index * n + k, cut) for k in range(n))
    return seqs
