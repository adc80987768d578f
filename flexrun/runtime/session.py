"""One conversation on the engine: a single sequence whose KV cache is kept from turn to turn.

A chat turn is the whole conversation so far, and all of it but the new message (and the template's
markers around it) was computed in earlier turns. ``SessionEngine.turn`` finds how much of the new
prompt the cache already holds (the longest common prefix with what it fed last time) and prefills only
the rest, attending over the cached keys and values as a decode step does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexrun.runtime.engine import Engine, TokenCallback, _Block
from flexrun.runtime.sampling import Sampler, SamplingParams
from flexrun.runtime.stats import RunStats, Timers


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class SessionEngine(Engine):
    """An ``Engine`` for one sequence at a time whose cache carries over from one ``turn`` to the next."""

    #: The tokens whose keys and values the cache holds, at positions 0..len-1.
    cached: list[int]

    def turn(
        self,
        ids: list[int],
        params: SamplingParams,
        seed: int = 0,
        on_step: TokenCallback | None = None,
        stop_check: Callable[[int, list[int]], bool] | None = None,
    ) -> tuple[list[int], RunStats, int]:
        """Generate after ``ids``, prefilling only what the cache does not hold. Returns the new tokens, the
        stats, and how many of ``ids`` came from the cache."""
        self._check_prompts([ids], params.max_new_tokens)
        # At least one token is fed, for the logits of the next one.
        reused = min(common_prefix(getattr(self, "cached", []), ids), len(ids) - 1)
        stats, read_before = self._start_stats(1)
        timers = Timers(self.device)
        stop_ids = self.cfg.stop_token_ids
        prompt = torch.tensor([ids])  # (1, s)
        block = _Block(prompt, torch.ones((1, len(ids)), dtype=torch.bool), [1])
        sampler = Sampler(params, [seed])
        history = prompt
        out: list[int] = []
        self.cached = ids[:reused]  # until this turn's prefill has run, only that much is sure
        with timers.time("prefill"):
            logits = self._step(block, [prompt[:, reused:]], past=reused)
        stats.prompt_tokens += len(ids) - reused
        stats.input_tokens += len(ids) - reused
        for t in range(params.max_new_tokens):
            nxt = sampler(logits, history)  # (1,)
            if t == 0:
                stats.first_token_s = timers.elapsed()
            token = int(nxt[0])
            out.append(token)
            stats.generated_tokens += 1
            done = (params.stop_at_eos and token in stop_ids) or (stop_check is not None and stop_check(0, out))
            if on_step is not None:
                on_step([0], [token])
            if done or t == params.max_new_tokens - 1:
                break
            history = torch.cat([history, nxt[:, None]], dim=1)
            block.valid = torch.cat([block.valid, torch.ones((1, 1), dtype=torch.bool)], dim=1)
            with timers.time("decode"):
                logits = self._step(block, [nxt[:, None]], past=len(ids) + t)
            stats.decode_steps += 1
        self.cached = ids + out[:-1]  # the last token sampled was never fed
        self.cache.flush()
        self.settle()
        stats.blocks = 1
        stats.prefill_s = timers.seconds["prefill"]
        stats.decode_s = timers.seconds["decode"]
        return out, self._finish_stats(stats, read_before), reused
