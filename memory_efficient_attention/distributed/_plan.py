"""Framework-neutral planning of ring attention: layouts, the zigzag permutation and which block of
the local query shard meets which block of a travelling key/value shard at each ring step.

Shape legend: see ``memory_efficient_attention._spec``; ``W`` is the ring size (devices), ``r`` a
device's position in the ring, ``n`` a local sequence length (global length ``W * n``).

Layouts of a sequence of global length ``W * n`` over ``W`` devices:

* ``"contiguous"``: device ``r`` holds positions ``[r*n, (r+1)*n)``.
* ``"zigzag"``: the sequence is cut into ``2W`` chunks of ``n/2``; device ``r`` holds chunks ``r``
  and ``2W-1-r`` (in that order), so with a causal mask every device has the same work.

A device's shard is one or two *pieces* (runs of consecutive global positions, ``shard_pieces``).
At ring step ``t`` device ``r`` holds the key/value shard of device ``s = (r - t) mod W`` (the
all-gather variant holds every shard at once). The work of ``r`` against ``s`` is one block per
pair of pieces the mask does not leave empty (``pair_blocks``), each a plain kernel call whose
structured mask is the global one seen from the pieces' starts. ``RingSchedule`` lists the
distinct kinds of work (the branches a traced ring switches between), which one each pair of
devices does, and how many ring steps hold any work.

Example: causal attention over 2 devices holding 4 positions each::

    >>> s = RingSchedule.build(RingMask(8, 8, causal=True), "contiguous", 2, 4, 4)
    >>> [len(s.blocks(1, src)) for src in (0, 1)]  # device 1: a full block, a diagonal block
    [1, 1]
    >>> s.blocks(0, 1)  # device 0 never needs device 1's keys
    ()
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from .._masks import EMPTY, FULL, StructuredMask, alignment_offset
from .._spec import AttentionInputError, describe

__all__ = [
    "LAYOUTS",
    "PieceBlock",
    "RingMask",
    "RingSchedule",
    "block_arrays",
    "block_config",
    "check_layout",
    "pair_blocks",
    "shard_pieces",
    "zigzag_permutation",
]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str, *, q_len: int, kv_len: int, world: int) -> None:
    """Validate a ring call on plain ints: the layout's name, and the local lengths it needs."""
    if layout not in LAYOUTS:
        raise AttentionInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if world < 1:
        raise AttentionInputError(f"the ring needs at least one device, got {world}")
    if layout == "zigzag" and (q_len % 2 or kv_len % 2):
        raise AttentionInputError(
            f"layout='zigzag' holds two chunks per device, so local lengths must be even; got query "
            f"{q_len}, key/value {kv_len} (pad the global sequence to a multiple of 2 * {world})"
        )


@dataclass(frozen=True)
class RingMask:
    """The structured mask of a ring call over the *global* sequence (static; hashable).

    ``q_global``/``kv_global``: the global lengths ``N``/``M``; ``causal``, ``window``
    (``(left, right)``) and ``alignment`` with the kernel's meaning on global positions;
    ``q_lengths``, ``kv_lengths``, ``segments``: whether the call has global sequence lengths or
    segment ids (dynamic parts: the kernel evaluates them in each block and skips the chunks
    they leave empty).
    """

    q_global: int
    kv_global: int
    causal: bool = False
    window: tuple[int, int] | None = None
    alignment: str = "top_left"
    q_lengths: bool = False
    kv_lengths: bool = False
    segments: bool = False

    @property
    def offset(self) -> int:
        return alignment_offset(self.alignment, self.q_global, self.kv_global)


def shard_pieces(layout: str, world: int, rank: int, length: int) -> tuple[tuple[int, int, int], ...]:
    """The runs of consecutive global positions device ``rank`` holds (local length
    ``length``): ``(global start, local start, size)`` of each; one for ``"contiguous"``, two
    for ``"zigzag"``.

    >>> shard_pieces("zigzag", 2, 0, 4)  # chunks 0 and 3 of a sequence of 8
    ((0, 0, 2), (6, 2, 2))
    """
    if layout == "contiguous":
        return ((rank * length, 0, length),)
    h = length // 2
    return ((rank * h, 0, h), ((2 * world - 1 - rank) * h, h, h))


@dataclass(frozen=True)
class PieceBlock:
    """Local query rows ``[q0, q1)`` (query piece ``qp``) against local keys ``[k0, k1)`` (key
    piece ``kp``) of a shard, under ``structure`` (local positions, the diagonal offset taken
    from the pieces' global starts). Global starts are not part of it, so that equal work
    compares equal; ``RingSchedule`` keeps them."""

    qp: int
    kp: int
    q0: int
    q1: int
    k0: int
    k1: int
    structure: StructuredMask


def pair_blocks(mask: RingMask, layout: str, world: int, rank: int, source: int, q_len: int, kv_len: int):
    """The blocks of device ``rank``'s queries against device ``source``'s keys: one per pair of
    pieces the static mask does not leave empty. A block the static mask keeps whole gets no
    static mask (no causal, no window), so such blocks compare equal whatever their distance."""
    if _one_causal_block(mask, rank, source, q_len, kv_len):
        flags = dict(q_lengths=False, kv_lengths=False, segments=mask.segments)
        return (PieceBlock(0, 0, 0, q_len, 0, kv_len, StructuredMask(q_len, kv_len, True, **flags)),)
    blocks = []
    for qp, (gq, lq, nq) in enumerate(shard_pieces(layout, world, rank, q_len)):
        for kp, (gk, lk, nk) in enumerate(shard_pieces(layout, world, source, kv_len)):
            static = StructuredMask(nq, nk, mask.causal, mask.window, gq - gk + mask.offset)
            kind = static.block_kind(0, nq, 0, nk)
            if kind == EMPTY or nq == 0 or nk == 0:
                continue
            if kind == FULL:
                static = StructuredMask(nq, nk)
            structure = dataclasses.replace(
                static, q_lengths=mask.q_lengths, kv_lengths=mask.kv_lengths, segments=mask.segments
            )
            blocks.append(PieceBlock(qp, kp, lq, lq + nq, lk, lk + nk, structure))
    return _merge_full(blocks, mask)


def _one_causal_block(mask: RingMask, rank: int, source: int, q_len: int, kv_len: int) -> bool:
    """Whether a device's own shard under a plain top-left causal mask is one causal block: its
    positions increase along the shard (both layouts), so global order is local order; lengths
    would need the pieces apart (they are clipped per piece)."""
    plain = mask.causal and mask.window is None and mask.offset == 0 and q_len == kv_len
    return plain and rank == source and not (mask.q_lengths or mask.kv_lengths)


def _merge_full(blocks: list[PieceBlock], mask: RingMask) -> tuple[PieceBlock, ...]:
    """Join two blocks without a static mask that are adjacent in the local layout (same rows
    and consecutive keys, or the other way round) into one kernel call, unless lengths need
    the pieces apart (they are clipped per piece)."""
    merged = True
    while merged:
        merged = False
        for a in range(len(blocks)):
            for b in range(len(blocks)):
                x, y = blocks[a], blocks[b]
                if a == b or x.structure.static or y.structure.static:
                    continue
                keys = (x.q0, x.q1) == (y.q0, y.q1) and x.k1 == y.k0 and not mask.kv_lengths
                rows = (x.k0, x.k1) == (y.k0, y.k1) and x.q1 == y.q0 and not mask.q_lengths
                if keys or rows:
                    q1, k1 = (x.q1, y.k1) if keys else (y.q1, x.k1)
                    st = dataclasses.replace(x.structure, q_len=q1 - x.q0, kv_len=k1 - x.k0)
                    join = PieceBlock(x.qp, x.kp, x.q0, q1, x.k0, k1, st)
                    blocks = [join] + [c for i, c in enumerate(blocks) if i not in (a, b)]
                    merged = True
                    break
            if merged:
                break
    return tuple(sorted(blocks, key=lambda c: (c.q0, c.k0)))


@dataclass(frozen=True)
class RingSchedule:
    """Which work each device does against each device's shard.

    ``branches[b]``: the blocks of one kind of step (``branches[0] == ()``: nothing to do);
    ``table[rank][source]``: the branch of device ``rank`` against device ``source``'s keys
    (a traced ring switches on it); ``steps``: the ring steps that hold any work (trailing steps
    where every device meets a masked-out shard are not run: no transfer, no compute);
    ``q_starts[rank][piece]`` / ``kv_starts``: the pieces' global starts.
    """

    branches: tuple[tuple[PieceBlock, ...], ...]
    table: tuple[tuple[int, ...], ...]
    steps: int
    q_starts: tuple[tuple[int, ...], ...]
    kv_starts: tuple[tuple[int, ...], ...]

    @classmethod
    @functools.lru_cache(maxsize=64)  # a ring runs the same plan call after call
    def build(cls, mask: RingMask, layout: str, world: int, q_len: int, kv_len: int) -> RingSchedule:
        """The schedule of ``world`` devices with local lengths ``q_len``/``kv_len``.

        >>> s = RingSchedule.build(RingMask(8, 8, causal=True), "contiguous", 2, 4, 4)
        >>> s.table, s.steps, len(s.branches)  # branches: nothing, diagonal, full
        (((1, 0), (2, 1)), 2, 3)
        >>> w = RingSchedule.build(RingMask(32, 32, window=(3, 0)), "contiguous", 4, 8, 8)
        >>> w.steps  # each device needs its own shard and the previous one's: two steps of four
        2
        """
        branches: dict[tuple[PieceBlock, ...], int] = {(): 0}
        table = tuple(
            tuple(
                branches.setdefault(pair_blocks(mask, layout, world, r, s, q_len, kv_len), len(branches))
                for s in range(world)
            )
            for r in range(world)
        )
        busy = [t for t in range(world) if any(table[r][(r - t) % world] for r in range(world))]
        q_starts, kv_starts = (
            tuple(tuple(g for g, _, _ in shard_pieces(layout, world, r, n)) for r in range(world))
            for n in (q_len, kv_len)
        )
        return cls(tuple(branches), table, busy[-1] + 1 if busy else 1, q_starts, kv_starts)

    def blocks(self, rank: int, source: int) -> tuple[PieceBlock, ...]:
        return self.branches[self.table[rank][source]]


@functools.lru_cache(maxsize=256)  # each ring step of each call asks again; configs cache their plans
def block_config(dims, dtype: str, blk: PieceBlock, options, *, device: str):
    """The kernel configuration of one block: the local shapes with the block's lengths, the
    call's options (scale, chunk sizes, soft cap) and the block's structured mask."""
    from .._config import ArrayShapes, make_config

    st = blk.structure
    batch = tuple(dims.batch)
    shapes = ArrayShapes(
        q_lengths=batch if st.q_lengths else None,
        kv_lengths=batch if st.kv_lengths else None,
        q_segments=(*batch, st.q_len) if st.segments else None,
        kv_segments=(*batch, st.kv_len) if st.segments else None,
    )
    block_dims = dataclasses.replace(dims, q_len=st.q_len, kv_len=st.kv_len)
    cfg = make_config(block_dims, dtype, options, device, shapes)
    return dataclasses.replace(cfg, structure=st)


def block_arrays(schedule: RingSchedule, blk: PieceBlock, rank, source, arrays: dict, xp) -> dict:
    """The block's dynamic operands (kernel names) from the call's: the pieces' local lengths
    (``clip(global length - piece start, 0, size)``) and slices of the segment ids ``[Z, n]``.
    ``rank``/``source`` may be traced (then ``xp`` indexes the start tables)."""
    st, out = blk.structure, {}
    for name, starts, piece, size in (
        ("q_lengths", schedule.q_starts, blk.qp, st.q_len),
        ("kv_lengths", schedule.kv_starts, blk.kp, st.kv_len),
    ):
        if arrays.get(name) is not None:
            who = rank if name == "q_lengths" else source
            start = starts[who][piece] if isinstance(who, int) else xp.asarray(starts)[who, piece]
            out[name] = xp.clip(arrays[name] - start, 0, size)
    if arrays.get("q_segments") is not None:
        out["q_segments"] = arrays["q_segments"][:, blk.q0 : blk.q1]
        out["kv_segments"] = arrays["kv_segments"][:, blk.k0 : blk.k1]
    return out


def zigzag_permutation(length: int, world: int) -> np.ndarray:
    """Indices ``idx`` with ``zigzag = contiguous[idx]`` along the sequence axis (global length
    ``length``, a multiple of ``2 * world``). Its inverse is ``np.argsort(idx)``.

    Example::

        >>> zigzag_permutation(8, 2).tolist()  # device 0: chunks 0, 3; device 1: chunks 1, 2
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    if world < 1 or length % (2 * world):
        raise AttentionInputError(
            f"layout='zigzag' cuts the sequence into 2 * world = {2 * world} equal chunks, but its "
            f"length is {length}; pad it to a multiple of {2 * world}"
        )
    chunks = np.arange(length).reshape(2 * world, length // (2 * world))
    order = [c for r in range(world) for c in (r, 2 * world - 1 - r)]
    return chunks[order].reshape(-1)


# The kernel arguments Ulysses passes on (with the global sequence's meaning), in both frameworks.
ULYSSES_KEYWORDS = (
    "scale", "is_causal", "causal_alignment", "local_window_size", "query_seq_lengths",
    "key_value_seq_lengths", "logits_soft_cap", "query_chunk_size", "key_chunk_size",
    "memory_budget", "return_lse",
)  # fmt: skip


# What Ulysses passes on to a ring (the hybrid): the ring's own keywords.
RING_KEYWORDS = (
    "scale", "is_causal", "causal_alignment", "local_window_size", "query_seq_lengths",
    "key_value_seq_lengths", "logits_soft_cap", "query_chunk_size", "key_chunk_size",
)  # fmt: skip


def check_ulysses_keywords(kernel_arguments, extra=(), *, ring: bool = False, layout="contiguous",
                           variant="ring") -> None:  # fmt: skip
    """``TypeError`` for a keyword Ulysses does not pass on (``ULYSSES_KEYWORDS`` + ``extra``;
    with a ``ring``, the ring's ``RING_KEYWORDS`` + ``extra``); ``AttentionInputError`` for a
    ring ``layout``/``variant`` without a ring."""
    allowed = (*(RING_KEYWORDS if ring else ULYSSES_KEYWORDS), *extra)
    unknown = sorted(set(kernel_arguments) - set(allowed))
    if unknown:
        where = "with a ring" if ring else ""
        raise TypeError(
            f"ulysses_attention {where}got unexpected keyword arguments {unknown}; it takes "
            f"{', '.join(allowed)} and the segment ids"
        )
    if not ring and (layout != "contiguous" or variant != "ring"):
        raise AttentionInputError(
            f"layout={layout!r} and variant={variant!r} choose how the ring of the Ulysses x ring "
            "hybrid runs: pass the ring's mesh axis (JAX) or process group (torch) with them"
        )


def ulysses_repeat(q_shape, k_shape, world: int, where: str) -> int:
    """Check the heads of a Ulysses call: ``H`` a multiple of the ``world`` devices/ranks, ``K``
    a multiple or a divisor of it. Returns how often to repeat each key/value head (1: none)."""
    heads, kv_heads = q_shape[-2], k_shape[-2]
    if heads % world:
        raise AttentionInputError(
            f"query has {heads} heads (shape {describe(q_shape)}); Ulysses needs a multiple of "
            f"the {world} {where}"
        )
    if kv_heads % world == 0:
        return 1
    if world % kv_heads:
        raise AttentionInputError(
            f"key/value have {kv_heads} heads (shape {describe(k_shape)}); Ulysses needs a "
            f"multiple or a divisor of the {world} {where}"
        )
    return world // kv_heads


def ulysses_flow(attention, to_heads, to_sequence, gather, query, key, value, q_ids, k_ids, kernel_arguments):
    """The Ulysses steps, framework-neutral: heads for sequence (``to_heads``), attention over the
    whole sequence with the gathered segment ids, sequence back (``to_sequence(x, seq_axis)``)
    for the output ``[B..., n, H/W, E]`` and, with ``return_lse``, the lse ``[B..., n, H/W]``."""
    result = attention(
        to_heads(query), to_heads(key), to_heads(value), query_segment_ids=gather(q_ids),
        key_segment_ids=gather(k_ids), **kernel_arguments,
    )  # fmt: skip
    if kernel_arguments.get("return_lse"):
        out, lse = result
        return to_sequence(out, out.ndim - 3), to_sequence(lse, lse.ndim - 2)
    return to_sequence(result, result.ndim - 3)


VARIANTS = ("ring", "allgather")


def ring_plan(dims, dtype: str, *, world: int, layout: str, variant: str, **keywords):
    """Validate a ring call and plan it: ``(RingSchedule, CallOptions, CallArrays)``.

    ``dims``: the local shapes; ``keywords``: the ring's mask and kernel keywords as the public
    functions name them (global lengths ``[B...]``, local segment ids, scale, soft cap, chunk
    sizes)."""
    from .._config import make_config, split_arguments

    if variant not in VARIANTS:
        raise AttentionInputError(f"variant must be one of {VARIANTS}, got {variant!r}")
    options, arrays, rest = split_arguments(keywords)
    if rest:
        raise TypeError(f"ring_attention got unexpected keyword arguments {sorted(rest)}")
    check_layout(layout, q_len=dims.q_len, kv_len=dims.kv_len, world=world)  # (CallOptions: is_causal)
    shapes = arrays.shapes()
    make_config(dims, dtype, options, "cpu", shapes)  # the arrays' shapes against the local ones
    mask = RingMask(
        world * dims.q_len, world * dims.kv_len, options.is_causal, options.local_window_size,
        options.causal_alignment, shapes.q_lengths is not None, shapes.kv_lengths is not None,
        shapes.q_segments is not None,
    )  # fmt: skip
    return RingSchedule.build(mask, layout, world, dims.q_len, dims.kv_len), options, arrays


def ring_ints(arrays, dims, flat) -> dict:
    """The integer operands of a ring call by kernel name (absent ones None), each flattened to
    ``[Z]`` / ``[Z, n]`` by the framework's ``flat(x, shape)``."""
    z = dims.batch_size
    return {
        "q_lengths": flat(arrays.query_seq_lengths, (z,)),
        "kv_lengths": flat(arrays.key_value_seq_lengths, (z,)),
        "q_segments": flat(arrays.query_segment_ids, (z, dims.q_len)),
        "kv_segments": flat(arrays.key_segment_ids, (z, dims.kv_len)),
    }
