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

from flexrun.config import OptConfig
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


def _build(seqs: list[tuple[int, ...]], members: list[int], starts: list[int]) -> Row:
    """The trie row of ``members``, whose sequences ``seqs[m]`` are in sorted order; ``starts[m]``: the depth
    from which member m's nodes are recorded in ``scored``."""
    row = Row(members=list(members))
    path: list[int] = []  # the previous sequence's nodes, by depth
    prev: tuple[int, ...] = ()
    open_nodes: list[int] = []  # nodes whose subtree is still open, by depth
    for r in members:
        seq = seqs[r]
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
        row.scored.append(path[starts[r] :])
        prev = seq
    for node in open_nodes:
        row.ends[node] = len(row.tokens)
    return row


def _groups(seqs: list[tuple[int, ...]], need: list[int], limit: int, share: bool) -> list[list[int]]:
    """The sequences in sorted order, grouped into rows: each joins the row before while it shares with the
    sequence before it at least one token and half of the ``need`` (the part worth sharing) of one of the
    two, and the row's trie stays within ``limit`` tokens."""
    order = sorted(range(len(seqs)), key=lambda n: seqs[n])
    groups: list[list[int]] = []
    length = 0  # the current row's length
    for n in order:
        if groups and share:
            prev = groups[-1][-1]
            common = _common(seqs[prev], seqs[n])
            grown = length + len(seqs[n]) - common
            if common >= 1 and 2 * common >= min(need[prev], need[n]) and grown <= limit:
                groups[-1].append(n)
                length = grown
                continue
        groups.append([n])
        length = len(seqs[n])
    return groups


def pack(requests: list[ScoreRequest], limit: int, share: bool = True) -> list[Row]:
    """Rows for ``requests``, longest first, each at most ``limit`` tokens (a single request may fill one).

    With ``share``, requests in sorted order join one row while each shares with the one before it at
    least half of its context or of that one's (the choices of one question share all of it; questions after the same
    few-shot examples most of it) and the row stays within ``limit``; without, each request is a row of
    its own (its tokens all computed, as a plain forward pass would).
    """
    for n, req in enumerate(requests):
        if not req.context or not req.continuation:
            raise InputError(f"request {n}: empty {'context' if not req.context else 'continuation'}")
    seqs = [req.inputs for req in requests]
    starts = [len(req.context) - 1 for req in requests]  # the token before each continuation token
    rows = []
    for group in _groups(seqs, [len(req.context) for req in requests], limit, share):
        row = _build(seqs, group, starts)
        row.targets = [list(requests[m].continuation) for m in group]
        rows.append(row)
    rows.sort(key=lambda row: -len(row))
    return rows


def pack_prompts(prompts: list[list[int]], limit: int) -> list[Row]:
    """Prompts to generate after, packed as ``pack`` packs requests (a prompt joins a row while it shares
    half of itself, or of the prompt before it, with that prompt), longest row first; ``scored[k]``: member k's every node, the
    last one the position its first new token is predicted from."""
    seqs = [tuple(p) for p in prompts]
    rows = [_build(seqs, group, [0] * len(seqs)) for group in _groups(seqs, list(map(len, seqs)), limit, True)]
    rows.sort(key=lambda row: -len(row))
    return rows


def row_tensors(rows: list[Row], fill: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Rows as a left-padded batch: ids (fill in the padding), positions (-1 in the padding) and subtree ends
    as row indices of the padded row (0 in the padding), each (b, s); and each row's padding."""
    s, n = max(len(row) for row in rows), len(rows)
    ids = torch.full((n, s), fill, dtype=torch.long)
    positions = torch.full((n, s), -1, dtype=torch.long)
    ends = torch.zeros((n, s), dtype=torch.long)
    pad = [s - len(row) for row in rows]
    for r, row in enumerate(rows):
        ids[r, pad[r] :] = torch.tensor(row.tokens)
        positions[r, pad[r] :] = torch.tensor(row.positions)
        ends[r, pad[r] :] = torch.tensor(row.ends) + pad[r]
    return ids, positions, ends, pad


#: Rotary scalings whose frequencies depend on the sequence's length: a shared prefix would be rotated
#: for one length only, so their sequences are never packed together.
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def can_share(cfg: OptConfig) -> bool:
    """Whether sequences may share a prefix: not under a rotary scaling that depends on the length."""
    return cfg.position != "rotary" or cfg.rope_type not in _LENGTH_DEPENDENT


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
