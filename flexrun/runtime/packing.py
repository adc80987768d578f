"""Scoring requests packed into rows, each row a prefix tree of its requests' tokens, every shared prefix once.

A row lays out the trie of its requests' input sequences (context then continuation, less the last token,
which is only predicted) in depth-first order:
a token shared by several requests' prefixes (a multiple-choice question's context, the few-shot examples
a task repeats) is one entry, computed once. A token attends to its ancestors in the trie and itself (a
node's subtree is the row range [node, end)), and sits at its depth as position, so each request scores
exactly as if it ran alone while its shared prefix is prefilled once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexrun.errors import InputError


@dataclass(frozen=True)
class ScoreRequest:
    """The log-likelihood of ``continuation`` after ``context`` (token ids, neither empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.context + self.continuation

    @property
    def inputs(self) -> tuple[int, ...]:
        """What the model reads: every token but the last, which is only predicted."""
        return self.tokens[:-1]

    def __len__(self) -> int:
        """The tokens the model reads."""
        return len(self.context) + len(self.continuation) - 1


@dataclass
class Row:
    """One packed row: trie nodes in depth-first order. ``ends[i]``: the row index where node i's subtree
    ends; ``scored[k]``: the nodes whose next-token distributions score member k's continuation."""

    members: list[int] = field(default_factory=list)  # request indices
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # each node's depth
    ends: list[int] = field(default_factory=list)
    scored: list[list[int]] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """The length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _build(requests: list[ScoreRequest], members: list[int]) -> Row:
    """The trie row of ``members``, whose token sequences are in sorted order."""
    row = Row(members=list(members))
    path: list[int] = []  # the previous sequence's nodes, by depth
    prev: tuple[int, ...] = ()
    open_nodes: list[int] = []  # nodes whose subtree is still open, by depth
    for r in members:
        req = requests[r]
        seq = req.inputs
        keep = _common(prev, seq)
        # Nodes deeper than the shared part are closed: their subtrees end here.
        for node in open_nodes[keep:]:
            row.ends[node] = len(row.tokens)
        del open_nodes[keep:], path[keep:]
        for depth in range(keep, len(seq)):
            node = len(row.tokens)
            row.tokens.append(seq[depth])
            row.positions.append(depth)
            row.ends.append(-1)
            path.append(node)
            open_nodes.append(node)
        c = len(req.context)
        row.scored.append(path[c - 1 :])  # the token before each continuation token
        row.targets.append(list(req.continuation))
        prev = seq
    for node in open_nodes:
        row.ends[node] = len(row.tokens)
    return row


def pack(requests: list[ScoreRequest], limit: int, share: bool = True) -> list[Row]:
    """Rows for ``requests``, longest first, each at most ``limit`` tokens (a single request may fill one).

    With ``share``, requests in sorted order join one row while each shares with the one before it at
    least half of its context (the choices of one question share all of it; questions after the same
    few-shot examples most of it) and the row stays within ``limit``; without, each request is a row of
    its own (its tokens all computed, as a plain forward pass would).
    """
    for n, req in enumerate(requests):
        if not req.context or not req.continuation:
            raise InputError(f"request {n}: empty {'context' if not req.context else 'continuation'}")
    order = sorted(range(len(requests)), key=lambda n: requests[n].inputs)
    groups: list[list[int]] = []
    length = 0  # the current row's length
    for n in order:
        req = requests[n]
        if groups and share:
            common = _common(requests[groups[-1][-1]].inputs, req.inputs)
            grown = length + len(req) - common
            if common >= 1 and 2 * common >= len(req.context) and grown <= limit:
                groups[-1].append(n)
                length = grown
                continue
        groups.append([n])
        length = len(req)
    rows = [_build(requests, g) for g in groups]
    rows.sort(key=lambda row: -len(row))
    return rows


def tree_mask(positions: torch.Tensor, ends: torch.Tensor, dtype: torch.dtype, window: int = 0) -> torch.Tensor:
    """The additive attention mask of packed rows: (b, 1, s, s) from each node's position and subtree end
    (b, s), both row indices of the padded row (padding: end 0). A query sees the keys whose subtree holds
    it, its ancestors and itself (and, with ``window`` > 0, only those fewer than ``window`` positions
    back); 0 where it may attend, the dtype's most negative value elsewhere (finite: a padding query gives
    garbage, not NaN)."""
    b, s = ends.shape
    idx = torch.arange(s, device=ends.device)
    allowed = (idx.view(1, 1, s) <= idx.view(1, s, 1)) & (idx.view(1, s, 1) < ends[:, None, :])  # (b, q, k)
    if window > 0:
        allowed &= positions[:, :, None] - positions[:, None, :] < window
    mask = torch.zeros(b, 1, s, s, dtype=dtype, device=ends.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
