"""Framework-neutral planning of ring attention: layouts, the zigzag permutation and which block of
the local query shard meets which block of a travelling key/value shard at each ring step.

Shape legend: see ``memory_efficient_attention._spec``; ``W`` is the ring size (devices), ``r`` a
device's position in the ring, ``n`` a local sequence length (global length ``W * n``).

Layouts of a sequence of global length ``W * n`` over ``W`` devices:

* ``"contiguous"``: device ``r`` holds positions ``[r*n, (r+1)*n)``.
* ``"zigzag"``: the sequence is cut into ``2W`` chunks of ``n/2``; device ``r`` holds chunks ``r``
  and ``2W-1-r`` (in that order), so with a causal mask every device has the same work.

At ring step ``t`` device ``r`` holds the key/value shard of device ``s = (r - t) mod W``. Under a
causal mask the pair is one of three *relations*: ``"same"`` (``t == 0``), ``"before"`` (the keys'
device precedes ``r``: ``s < r``) or ``"after"`` (``s > r``). Each relation needs at most one
rectangular block of attention (``step_block``), with no mask or a top-left causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._spec import AttentionInputError, describe

__all__ = ["LAYOUTS", "RELATIONS", "Block", "check_layout", "step_block", "zigzag_permutation"]

LAYOUTS = ("contiguous", "zigzag")
RELATIONS = ("same", "before", "after")


@dataclass(frozen=True)
class Block:
    """Local query rows ``[q0, q1)`` attend to local key rows ``[k0, k1)`` of the travelling
    shard, with a top-left causal mask if ``causal`` (else no mask)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool

    @property
    def q_len(self) -> int:
        return self.q1 - self.q0

    @property
    def kv_len(self) -> int:
        return self.k1 - self.k0


def check_layout(layout: str, *, is_causal: bool, q_len: int, kv_len: int, world: int) -> None:
    """Validate a ring call on plain ints: the layout's name, and the local lengths it needs."""
    if layout not in LAYOUTS:
        raise AttentionInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(is_causal, bool):
        raise AttentionInputError(f"is_causal must be a bool, got {is_causal!r}")
    if world < 1:
        raise AttentionInputError(f"the ring needs at least one device, got {world}")
    if is_causal and q_len != kv_len:
        raise AttentionInputError(
            f"is_causal=True needs query and key/value sharded alike: the local query length is "
            f"{q_len} but the local key/value length is {kv_len}"
        )
    if layout == "zigzag" and (q_len % 2 or kv_len % 2):
        raise AttentionInputError(
            f"layout='zigzag' holds two chunks per device, so local lengths must be even; got query "
            f"{q_len}, key/value {kv_len} (pad the global sequence to a multiple of 2 * {world})"
        )


def step_block(layout: str, relation: str, q_len: int, kv_len: int, *, is_causal: bool) -> Block | None:
    """The block of one ring step, or None when the keys' shard is entirely masked out.

    Without a causal mask every step is one full block. With one (``q_len == kv_len == n``):

    ========== ============================== ====================================
    relation   contiguous                     zigzag (chunks of ``h = n/2``)
    ========== ============================== ====================================
    same       causal ``[0, n) x [0, n)``     causal ``[0, n) x [0, n)``
    before     full ``[0, n) x [0, n)``       full ``[0, n) x [0, h)`` (first chunk)
    after      None                           full ``[h, n) x [0, n)`` (second chunk)
    ========== ============================== ====================================

    (Zigzag ``same``: the local positions increase, so the four chunk pairs diagonal / empty /
    full / diagonal are exactly one top-left causal block.)
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if not is_causal:
        return Block(0, q_len, 0, kv_len, False)
    n, h = q_len, q_len // 2
    if relation == "same":
        return Block(0, n, 0, n, True)
    if layout == "contiguous":
        return Block(0, n, 0, n, False) if relation == "before" else None
    return Block(0, n, 0, h, False) if relation == "before" else Block(h, n, 0, n, False)


def relations(is_causal: bool, world: int) -> tuple[str, ...]:
    """The relations a ring of ``world`` devices meets (the branches a traced ring needs)."""
    if not is_causal:
        return ("same",)
    return RELATIONS if world > 1 else ("same",)


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


def block_config(dims, dtype: str, blk: Block, *, scale, query_chunk_size, key_chunk_size, device: str):
    """The kernel configuration of one ring block: the local shapes with the block's lengths and,
    for a diagonal block, a top-left causal mask."""
    import dataclasses

    from .._config import CallOptions, make_config

    options = CallOptions(
        scale=scale, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size, is_causal=blk.causal
    )
    return make_config(dataclasses.replace(dims, q_len=blk.q_len, kv_len=blk.kv_len), dtype, options, device)


# The kernel arguments Ulysses passes on (with the global sequence's meaning), in both frameworks.
ULYSSES_KEYWORDS = (
    "scale", "is_causal", "causal_alignment", "local_window_size", "query_seq_lengths",
    "key_value_seq_lengths", "logits_soft_cap", "query_chunk_size", "key_chunk_size",
    "memory_budget", "return_lse",
)  # fmt: skip


def check_ulysses_keywords(kernel_arguments, extra=()) -> None:
    """``TypeError`` for a keyword Ulysses does not pass on (``ULYSSES_KEYWORDS`` + ``extra``)."""
    allowed = (*ULYSSES_KEYWORDS, *extra)
    unknown = sorted(set(kernel_arguments) - set(allowed))
    if unknown:
        raise TypeError(
            f"ulysses_attention got unexpected keyword arguments {unknown}; it takes "
            f"{', '.join(allowed)} and the segment ids"
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
