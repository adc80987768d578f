"""lm-evaluation-harness on flexrun: a model registered as ``flexrun`` whose log-likelihoods come from the
scorer (shared prefixes computed once) and whose generations come from the engine, and ``run_cli``, which
runs lm-eval's own command line with it registered (lm-eval has no plugin hook for models).

Needs the optional ``eval`` extra (``pip install 'flexrun[eval]'``). Requests are tokenized as lm-eval's
``hf`` backend tokenizes them (``TemplateLM``'s pairing, its rolling windows, its stop sequences), so the
two give the same per-sample results on the same weights.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from flexrun.errors import InputError
from flexrun.jobs.autoplace import build_engine, plan_job
from flexrun.jobs.options import EngineOptions, ModelOptions, PlacementRequest
from flexrun.jobs.prompts import load_tokenizer
from flexrun.jobs.score import score_requests
from flexrun.placement import Shares
from flexrun.runtime.packing import ScoreRequest
from flexrun.runtime.sampling import SamplingParams
from flexrun.runtime.tiers import Budgets, compute_device
from flexrun.units import parse_size


def _shares(value: Any, name: str) -> Shares | None:
    """Tier shares as --model_args spells them (its commas separate arguments): ``host:40/disk:60``."""
    if value is None:
        return None
    try:
        return Shares.parse(str(value).replace(":", "=").replace("/", ","))
    except ValueError as exc:
        raise InputError(f"{name}={value}: {exc} (shares are spelled host:40/disk:60 in --model_args)") from None


def _size(value: Any) -> int | None:
    return None if value is None else parse_size(str(value))


@register_model("flexrun")
class FlexrunLM(TemplateLM):
    """flexrun as an lm-eval model: ``--model flexrun --model_args pretrained=MODEL[,option=value...]``.

    Options: dtype, compute_dtype (auto), dummy_weights, store_dir, offload_dir, placement (auto|manual),
    weights / activations (tier shares, host:40/disk:60), gpu_batch_size (also lm-eval's --batch_size),
    num_gpu_batches, overlap, compress_weight (none by default: evaluations compare weights as they are),
    device_mem / host_mem / disk_mem (e.g. 8GiB), max_length (the model's context by default),
    share_prefixes (true)."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        compute_dtype: str = "auto",
        dummy_weights: bool = False,
        store_dir: str | None = None,
        offload_dir: str | None = None,
        placement: str = "auto",
        weights: str | None = None,
        activations: str | None = None,
        gpu_batch_size: int | None = None,
        num_gpu_batches: int | None = None,
        overlap: bool = True,
        compress_weight: str = "none",
        device_mem: str | None = None,
        host_mem: str | None = None,
        disk_mem: str | None = None,
        max_length: int | None = None,
        share_prefixes: bool = True,
    ) -> None:
        super().__init__()
        if batch_size not in (None, "auto") and gpu_batch_size is None:
            gpu_batch_size = int(str(batch_size).split(":")[0])  # lm-eval's N or auto:N
        self.opts = EngineOptions(
            model=ModelOptions(
                model=str(pretrained),
                dtype=dtype,
                compute_dtype=compute_dtype,
                dummy_weights=bool(dummy_weights),
                store_dir=store_dir,
                compress_weight="" if compress_weight == "none" else compress_weight,
            ),
            placement=PlacementRequest(
                mode=placement,
                weights=_shares(weights, "weights"),
                activations=_shares(activations, "activations"),
                gpu_batch_size=gpu_batch_size,
                num_gpu_batches=num_gpu_batches,
                overlap=bool(overlap),
            ),
            budgets=Budgets(device=_size(device_mem), host=_size(host_mem), disk=_size(disk_mem)),
            offload_dir=offload_dir,
        )
        self.source = self.opts.model.source("generate")
        self.tokenizer = load_tokenizer(self.source)
        if self.tokenizer is None:
            raise InputError(f"{pretrained} has no tokenizer; lm-eval's tasks are text")
        self.cfg = self.source.config
        self._max_length = int(max_length) if max_length else self.cfg.max_seq_len
        self.share = bool(share_prefixes)

    # ---- what TemplateLM asks for --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.eot_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As the hf backend encodes: the tokenizer's own special tokens unless told, none before a text that
        already starts with the prefix token."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        return list(self.tokenizer.encode(string, **special))

    def tok_decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _scores(self, requests: list[ScoreRequest]) -> list[tuple[float, bool]]:
        if not requests:
            return []
        results, _, _ = score_requests(self.opts, requests, self.share)
        return [(r.logprob, r.is_greedy) for r in results]

    def _request(self, context: list[int], continuation: list[int]) -> ScoreRequest:
        """As lm-eval's hf backend reads a pair: its last max_length + 1 tokens (the context cut on the left)."""
        if len(continuation) > self.max_length:
            raise InputError(f"a continuation of {len(continuation)} tokens is over max_length {self.max_length}")
        whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
        return ScoreRequest(tuple(whole[: len(whole) - len(continuation)]), tuple(continuation))

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[Any]:
        scores = self._scores([self._request(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, scores, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[ScoreRequest] = []
        counts = []
        for (string,) in (req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            disjoint = [lm_utils.make_disjoint_window(p) for p in pairs]
            windows += [ScoreRequest(tuple(ctx), tuple(cont)) for ctx, cont in disjoint]
            counts.append(len(disjoint))
        scores = self._scores(windows)
        out, at = [], 0
        for req, n in zip(requests, counts, strict=True):
            total = sum(lp for lp, _ in scores[at : at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generations grouped by their settings, each group one engine run; text cut at the stop sequences
        (the EOS text among them) as the hf backend cuts it."""
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_new
            if room < 1:
                raise InputError(f"max_gen_toks {max_new} leaves no room in max_length {self.max_length}")
            prompts = [self.tok_encode(requests[n].args[0])[-room:] or [self.prefix_token_id] for n in members]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature, stop=tuple(until))
            for n, toks in zip(members, self._generate(prompts, params), strict=True):
                text = postprocess_generated_text(self.tok_decode(toks), until, None)
                out[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        longest = max(map(len, prompts))
        settled = plan_job(self.opts, self.source, longest, params.max_new_tokens, len(prompts))
        store = settled.opts.model.open_store("generate", progress=False)
        cfg = settled.opts.model.run_config(store, compute_device())
        engine, _ = build_engine(
            store, cfg, settled.opts, longest, params.max_new_tokens, len(prompts), settled.planned
        )
        stop = params.stop

        def stop_check(member: int, toks: list[int]) -> bool:
            text = self.tokenizer.decode(toks[-8 * max(map(len, stop)) - 1 :], skip_special_tokens=False)
            return any(s in text for s in stop)

        with engine:
            new, _, _ = engine.generate(prompts, params, stop_check=stop_check if stop else None)
        return new


def run_cli(args: list[str]) -> None:
    """lm-eval's own command line (``lm-eval run ARGS``) with the ``flexrun`` model registered; ``--model``
    defaults to it."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    if not any(a == "--model" or a.startswith("--model=") for a in args) and not {"-h", "--help"} & set(args):
        args = ["--model", "flexrun", *args]
    argv = sys.argv
    sys.argv = ["flexrun eval", "run", *args]
    try:
        setup_logging()
        cli = HarnessCLI()
        cli.execute(cli.parse_args())
    finally:
        sys.argv = argv
