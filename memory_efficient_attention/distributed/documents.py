"""Packed documents across devices: an order of the documents that spreads causal attention work
evenly over the devices of a ring (numpy only; no framework).

With packed documents (segment ids) and a causal mask, a query attends to the earlier keys of its
own document: a token at position ``i`` of its document costs ``i + 1`` pairs (``min(i, left) + 1``
with a sliding window ``(left, 0)``). Sharding the packed sequence contiguously can leave one
device with all of a long document's late tokens while another holds short documents; the ring
then waits for the busiest device. Reordering whole documents changes no result (each stays
contiguous and in order, so the causal mask within it is the same) but moves the work.

``balance_documents`` searches an order (candidates, then seeded pairwise swaps that lower the
busiest device's work), ``device_work`` measures an order, ``token_order`` turns an order into
gather indices for the packed tokens (apply it to ids, labels, segment ids alike).

Example: one document of 12 tokens and six of 2, on 2 devices (12 tokens each)::

    >>> import numpy as np
    >>> lengths = [12, 2, 2, 2, 2, 2, 2]
    >>> device_work(lengths, 2).tolist()          # natural order: device 0 holds the long one
    [78, 18]
    >>> order = balance_documents(lengths, 2)
    >>> device_work(np.asarray(lengths)[order], 2).tolist()  # the best any order does here
    [42, 54]
    >>> token_order([3, 2], [1, 0]).tolist()      # document 1's tokens first, then document 0's
    [3, 4, 0, 1, 2]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._spec import AttentionInputError
from ._plan import LAYOUTS

__all__ = ["balance_documents", "device_work", "token_order"]


def _check(lengths, world: int, layout: str) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if lengths.size == 0 or (lengths <= 0).any():
        raise AttentionInputError(f"lengths must be positive document lengths, got {lengths.tolist()[:8]}")
    if layout not in LAYOUTS:
        raise AttentionInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = world * (2 if layout == "zigzag" else 1)
    if world < 1 or int(lengths.sum()) % parts:
        raise AttentionInputError(
            f"the documents hold {int(lengths.sum())} tokens, which layout={layout!r} cannot split into "
            f"{parts} equal parts for {world} devices; pad the pack"
        )
    return lengths


def _pairs(m, cap):
    """Work of the first ``m`` tokens of a document: ``sum(min(i, cap) + 1 for i < m)``."""
    m = np.asarray(m, dtype=np.int64)
    if cap is None:
        return m * (m + 1) // 2
    c = cap + 1
    return np.where(m <= c, m * (m + 1) // 2, c * (c + 1) // 2 + (m - c) * c)


def device_work(
    lengths: Sequence[int], world: int, *, layout: str = "contiguous", window: int | None = None
) -> np.ndarray:
    """Causal (query, key) pairs each of ``world`` devices computes when documents of these
    ``lengths`` are packed in this order and sharded by ``layout`` (``window``: a sliding
    window's left size). Returns ``[world]`` integers."""
    lengths = _check(lengths, world, layout)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    parts = world * (2 if layout == "zigzag" else 1)
    bounds = np.arange(parts + 1) * (int(ends[-1]) // parts)
    # Work of all tokens before each bound: whole documents, then the part of the one it cuts.
    doc = np.searchsorted(ends, bounds, side="right")  # documents wholly before each bound
    whole = np.concatenate([[0], np.cumsum(_pairs(lengths, window))])[doc]
    cut = np.minimum(doc, lengths.size - 1)
    partial = np.where(doc < lengths.size, _pairs(bounds - starts[cut], window), 0)
    chunk = np.diff(whole + partial)
    if layout == "contiguous":
        return chunk
    return chunk[:world] + chunk[world:][::-1]


def balance_documents(
    lengths: Sequence[int],
    world: int,
    *,
    layout: str = "contiguous",
    window: int | None = None,
    iterations: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """An order of the documents (indices into ``lengths``) whose packed sequence, sharded by
    ``layout`` over ``world`` devices, puts as little causal work on the busiest device as the
    search finds: sorted and interleaved candidates, then up to ``iterations`` seeded pairwise
    swaps, each kept when it lowers the busiest device's work (ties: the spread). Deterministic
    for a given ``seed``."""
    lengths = _check(lengths, world, layout)

    def score(order):
        work = device_work(lengths[order], world, layout=layout, window=window)
        return int(work.max()), int(np.square(work).sum())

    by_size = np.argsort(-lengths, kind="stable")
    interleaved = np.empty_like(by_size)
    interleaved[0::2] = by_size[: (by_size.size + 1) // 2]
    interleaved[1::2] = by_size[(by_size.size + 1) // 2 :][::-1]
    candidates = [np.arange(lengths.size), by_size, by_size[::-1], interleaved]
    best = min(candidates, key=score)
    best_score = score(best)
    rng = np.random.default_rng(seed)
    for _ in range(iterations if lengths.size > 1 else 0):
        i, j = rng.choice(lengths.size, size=2, replace=False)
        if lengths[best[i]] == lengths[best[j]]:
            continue
        trial = best.copy()
        trial[[i, j]] = trial[[j, i]]
        trial_score = score(trial)
        if trial_score < best_score:
            best, best_score = trial, trial_score
    return best


def token_order(lengths: Sequence[int], order: Sequence[int]) -> np.ndarray:
    """Gather indices that pack the documents (of ``lengths``, packed in their natural order) in
    ``order``: ``packed[..., token_order(lengths, order)]``."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if sorted(order.tolist()) != list(range(lengths.size)):
        raise AttentionInputError(f"order must be a permutation of the {lengths.size} documents")
    starts = np.cumsum(lengths) - lengths
    return np.concatenate([np.arange(starts[d], starts[d] + lengths[d]) for d in order])
