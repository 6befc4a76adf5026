"""Structured masks on index ranges, and the block plan both kernels follow.

A structured mask says which (query, key) pairs take part without ever building an ``L x S``
tensor. Its static part (causal and local windows, relative to an aligned diagonal) is decided
here on plain integers; its dynamic parts (sequence lengths, segment ids, ``mask_mod``) are
evaluated by the kernels chunk by chunk.

Alignment: the diagonal of query ``q`` is key ``q + offset``; ``offset = 0`` is top-left (the
first query sees the first key), ``offset = S - L`` is bottom-right (the last query sees the
last key: decoding with a KV cache, chunked prefill).

* causal keeps ``k <= q + offset``;
* a window ``(left, right)`` keeps ``q + offset - left <= k <= q + offset + right``.

Block plan: the queries are cut into chunks of ``q_chunk`` rows and the keys into chunks of
``k_chunk`` columns (the last chunk of each shorter). A (query chunk, key chunk) pair is

* ``EMPTY``: no pair in it is kept; never computed, forward or backward;
* ``FULL``: every pair is kept by the static part and no dynamic part exists: no mask work;
* ``PARTIAL``: the chunk's mask is built from index ranges.

Tiles: a partial pair whose corner lies outside the static mask (the diagonal blocks of causal
attention, the edges of a window band) is split into quadrants, recursively down to ``min_tile``
rows or columns, and its empty quadrants are dropped: a causal diagonal block of 1024 x 1024 costs
3/4 of a block in tiles of 512 instead of a whole one. Kernels run the ``pair_tiles`` of the plan.

Example::

    >>> plan = BlockPlan.build(StructuredMask(q_len=6, kv_len=6, causal=True), 2, 2)
    >>> print(plan)
    BlockPlan(L=6, S=6, q_chunk=2, k_chunk=2, 3x3 chunks, 3 full, 3 partial, 3 empty)
      + . .
      # + .
      # # +
    >>> plan.key_chunks(1)
    (0, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from ._spec import AttentionInputError

__all__ = ["EMPTY", "FULL", "PARTIAL", "BlockPlan", "StructuredMask", "Tile", "chunk_bounds"]

EMPTY, PARTIAL, FULL = 0, 1, 2
_GLYPH = {EMPTY: ".", PARTIAL: "+", FULL: "#"}


def chunk_bounds(length: int, size: int) -> tuple[tuple[int, int], ...]:
    """``[start, stop)`` of each chunk of ``size`` over ``length`` items; the last one shorter.

    >>> chunk_bounds(5, 2)
    ((0, 2), (2, 4), (4, 5))
    """
    return tuple((s, min(s + size, length)) for s in range(0, length, size))


def alignment_offset(alignment: str, q_len: int, kv_len: int) -> int:
    if alignment == "top_left":
        return 0
    if alignment == "bottom_right":
        return kv_len - q_len
    raise AttentionInputError(f"causal_alignment must be 'top_left' or 'bottom_right', got {alignment!r}")


def normalize_window(window: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``local_window_size`` as ``(left, right)``; an int ``w`` means ``(w, w)``."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise AttentionInputError(f"local_window_size must be an int or (left, right), got {window!r}")
    if isinstance(window, int):
        window = (window, window)
    try:
        left, right = (int(w.__index__()) for w in window)
    except (TypeError, ValueError, AttributeError):
        raise AttentionInputError(
            f"local_window_size must be an int or a pair (left, right) of ints, got {window!r}"
        ) from None
    return left, right


@dataclass(frozen=True)
class StructuredMask:
    """The static description of the structured masks of one call (hashable: a jit static).

    ``causal`` and ``window`` are decided here; ``q_lengths``, ``kv_lengths``, ``segments`` and
    ``mask_mod`` only say that a dynamic part exists, so that no pair can be planned ``FULL``.
    """

    q_len: int
    kv_len: int
    causal: bool = False
    window: tuple[int, int] | None = None
    offset: int = 0
    q_lengths: bool = False
    kv_lengths: bool = False
    segments: bool = False
    mask_mod: bool = False

    @property
    def static(self) -> bool:
        """Whether causal or a window restricts pairs."""
        return self.causal or self.window is not None

    @property
    def dynamic(self) -> bool:
        return self.q_lengths or self.kv_lengths or self.segments or self.mask_mod

    @property
    def any(self) -> bool:
        return self.static or self.dynamic

    def key_range(self, q0: int, q1: int) -> tuple[int, int]:
        """The keys ``[lo, hi)`` any query of ``[q0, q1)`` may see under the static part."""
        lo, hi = 0, self.kv_len
        if self.causal:
            hi = min(hi, q1 - 1 + self.offset + 1)
        if self.window is not None:
            left, right = self.window
            lo = max(lo, q0 + self.offset - left)
            hi = min(hi, q1 - 1 + self.offset + right + 1)
        return lo, max(lo, hi)

    def block_kind(self, q0: int, q1: int, k0: int, k1: int) -> int:
        lo, hi = self.key_range(q0, q1)
        if k1 <= lo or k0 >= hi:
            return EMPTY
        if self.dynamic:
            return PARTIAL
        full = True
        if self.causal:
            full &= k1 - 1 <= q0 + self.offset
        if self.window is not None:
            left, right = self.window
            full &= k0 >= q1 - 1 + self.offset - left and k1 - 1 <= q0 + self.offset + right
        return FULL if full else PARTIAL

    def keep(self, q_idx, k_idx):
        """The static part on broadcastable index arrays (numpy, torch or jax): True = kept.

        Returns None when there is no static part."""
        keep = None
        if self.causal:
            keep = k_idx <= q_idx + self.offset
        if self.window is not None:
            left, right = self.window
            win = (k_idx >= q_idx + (self.offset - left)) & (k_idx <= q_idx + (self.offset + right))
            keep = win if keep is None else keep & win
        return keep


class Tile(NamedTuple):
    """One rectangle of a chunk pair ``(i, j)`` to compute: queries ``[q0, q1)``, keys ``[k0, k1)``."""

    i: int
    j: int
    q0: int
    q1: int
    k0: int
    k1: int
    kind: int


def _split(mask: StructuredMask, t: Tile, min_tile: int) -> list[Tile]:
    """``t`` itself, or the non-empty quadrants of a partial ``t`` (recursively) when a split
    drops an empty one."""
    if t.kind != PARTIAL or min_tile <= 0:
        return [t]
    qs = _halves(t.q0, t.q1, min_tile)
    ks = _halves(t.k0, t.k1, min_tile)
    if len(qs) == len(ks) == 1:
        return [t]
    parts = [Tile(t.i, t.j, a, b, c, d, mask.block_kind(a, b, c, d)) for a, b in qs for c, d in ks]
    if all(p.kind != EMPTY for p in parts):
        return [t]
    return [x for p in parts if p.kind != EMPTY for x in _split(mask, p, min_tile)]


def _halves(lo: int, hi: int, min_tile: int) -> list[tuple[int, int]]:
    if hi - lo < 2 * min_tile:
        return [(lo, hi)]
    mid = lo + (hi - lo + 1) // 2
    return [(lo, mid), (mid, hi)]


@dataclass(frozen=True)
class BlockPlan:
    """Which (query chunk, key chunk) pairs are empty, partial or full.

    ``kinds[i][j]`` is the kind of query chunk ``i`` against key chunk ``j``. The kept pairs of
    each row (and column) are contiguous, so loops run over ``key_chunks(i)`` (``query_chunks(j)``).
    """

    q_len: int
    kv_len: int
    q_chunk: int
    k_chunk: int
    kinds: tuple[tuple[int, ...], ...] = field(repr=False)
    mask: StructuredMask = field(repr=False)
    min_tile: int = 0

    @classmethod
    def build(cls, mask: StructuredMask, q_chunk: int, k_chunk: int, min_tile: int = 0) -> BlockPlan:
        """The plan of ``mask`` in chunks of ``q_chunk x k_chunk``; partial pairs split into tiles
        down to ``min_tile`` (0: never split)."""
        qb = chunk_bounds(mask.q_len, q_chunk)
        kb = chunk_bounds(mask.kv_len, k_chunk)
        kinds = tuple(tuple(mask.block_kind(q0, q1, k0, k1) for k0, k1 in kb) for q0, q1 in qb)
        return cls(mask.q_len, mask.kv_len, q_chunk, k_chunk, kinds, mask, min_tile)

    def pair_tiles(self, i: int, j: int) -> list[Tile]:
        """The tiles of pair ``(i, j)`` (none if it is empty), ordered by query then key.

        >>> plan = BlockPlan.build(StructuredMask(8, 8, causal=True), 8, 8, min_tile=2)
        >>> [(t.q0, t.q1, t.k0, t.k1) for t in plan.pair_tiles(0, 0)][:4]
        [(0, 2, 0, 2), (2, 4, 0, 2), (2, 4, 2, 4), (4, 8, 0, 4)]
        """
        kind = self.kinds[i][j]
        if kind == EMPTY:
            return []
        t = Tile(i, j, *self.q_bounds(i), *self.k_bounds(j), kind)
        return sorted(_split(self.mask, t, self.min_tile), key=lambda x: (x.q0, x.k0))

    @property
    def num_q_chunks(self) -> int:
        return len(self.kinds)

    @property
    def num_k_chunks(self) -> int:
        return math.ceil(self.kv_len / self.k_chunk)

    def q_bounds(self, i: int) -> tuple[int, int]:
        return i * self.q_chunk, min((i + 1) * self.q_chunk, self.q_len)

    def k_bounds(self, j: int) -> tuple[int, int]:
        return j * self.k_chunk, min((j + 1) * self.k_chunk, self.kv_len)

    def key_chunks(self, i: int) -> tuple[int, int]:
        """``[lo, hi)``: the key chunks query chunk ``i`` must visit (empty range if none)."""
        row = [j for j, kind in enumerate(self.kinds[i]) if kind != EMPTY]
        return (row[0], row[-1] + 1) if row else (0, 0)

    def query_chunks(self, j: int) -> tuple[int, int]:
        """``[lo, hi)``: the query chunks that visit key chunk ``j``."""
        col = [i for i in range(self.num_q_chunks) if self.kinds[i][j] != EMPTY]
        return (col[0], col[-1] + 1) if col else (0, 0)

    def pair_groups(self) -> list[tuple[tuple[int, int, int], tuple[Tile, ...]]]:
        """The tiles to compute, grouped by shape and kind: ``[((lc, kc, kind), tiles), ...]``.

        Online softmax and the gradient sums do not depend on the order of the tiles, so a kernel
        may run each group as one loop of static length (JAX: a ``scan`` that every transform can
        differentiate), with mask work only in the partial groups.

        >>> groups = BlockPlan.build(StructuredMask(5, 5, causal=True), 2, 4).pair_groups()
        >>> [(shape, [(t.i, t.j) for t in tiles]) for shape, tiles in groups]
        [((2, 4, 1), [(0, 0), (1, 0)]), ((1, 4, 2), [(2, 0)]), ((1, 1, 2), [(2, 1)])]
        """
        groups: dict[tuple[int, int, int], list[Tile]] = {}
        for i, row in enumerate(self.kinds):
            for j in range(len(row)):
                for t in self.pair_tiles(i, j):
                    groups.setdefault((t.q1 - t.q0, t.k1 - t.k0, t.kind), []).append(t)
        return [(shape, tuple(tiles)) for shape, tiles in groups.items()]

    def count(self, kind: int) -> int:
        return sum(row.count(kind) for row in self.kinds)

    def to_dense(self) -> list[list[bool]]:
        """The chunk-level keep matrix (True where a pair is computed), for debugging."""
        return [[kind != EMPTY for kind in row] for row in self.kinds]

    def __str__(self) -> str:
        head = (
            f"BlockPlan(L={self.q_len}, S={self.kv_len}, q_chunk={self.q_chunk}, "
            f"k_chunk={self.k_chunk}, {self.num_q_chunks}x{self.num_k_chunks} chunks, "
            f"{self.count(FULL)} full, {self.count(PARTIAL)} partial, {self.count(EMPTY)} empty)"
        )
        if self.num_q_chunks * self.num_k_chunks > 64 * 64:
            return head
        rows = ["  " + " ".join(_GLYPH[k] for k in row) for row in self.kinds]
        return "\n".join([head, *rows])
