"""Mixture-of-experts routing: which experts each token goes to and with what weight, as transformers'
Mixtral and Qwen2-MoE routers compute it (softmax over the experts in float32, the top k kept, renormalised
to sum to 1 when the model asks), and the set of experts a block's tokens need."""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, E) -> the top-k experts' weights (n, k) in float32 and their indices (n, k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    if renormalise:
        top /= top.sum(dim=-1, keepdim=True)
    return top, idx


def routed(idx: torch.Tensor, rows: torch.Tensor | None) -> list[int]:
    """The experts ``idx`` (n, k) sends the tokens of ``rows`` (n,) bool (None: every token) to, ascending: the
    union a layer must read. Padding is left out: its output is never attended to."""
    live = idx if rows is None else idx[rows]
    return [int(e) for e in torch.unique(live)]
