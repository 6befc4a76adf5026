"""Ready-made ``mask_mod`` and ``score_mod`` functions, and ways to combine them.

They follow FlexAttention's convention and work unchanged in both frameworks (only operators and
indexing are used): ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and
``score_mod(score, b, h, q_idx, kv_idx) -> score``, written as for scalars and evaluated by the
kernels on broadcastable index grids of one chunk: ``b`` indexes the flattened batch dims, ``h``
the query head, ``q_idx``/``kv_idx`` absolute positions.

Prefer the dedicated arguments where one exists (``is_causal``, ``local_window_size``, the
sequence lengths and segment ids): the kernels plan those on index ranges and skip empty blocks,
whereas a ``mask_mod`` is evaluated on every block it may touch.

Example::

    >>> import torch
    >>> from memory_efficient_attention.torch import efficient_dot_product_attention
    >>> from memory_efficient_attention.masks import alibi_slopes, alibi_score_mod, and_masks
    >>> from memory_efficient_attention.masks import causal_mask, sliding_window_mask
    >>> q, k, v = torch.randn(3, 50, 4, 16).unbind(0)
    >>> out = efficient_dot_product_attention(
    ...     q, k, v,
    ...     mask_mod=and_masks(causal_mask, sliding_window_mask(8)),
    ...     score_mod=alibi_score_mod(torch.tensor(alibi_slopes(4))),
    ...     key_chunk_size=16)
    >>> out.shape
    torch.Size([50, 4, 16])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = [
    "alibi_score_mod",
    "alibi_slopes",
    "and_masks",
    "causal_mask",
    "document_mask",
    "or_masks",
    "sliding_window_mask",
]

MaskMod = Callable[..., object]
ScoreMod = Callable[..., object]


def causal_mask(b, h, q_idx, kv_idx):
    """Top-left causal: a query sees keys at or before its own position."""
    return kv_idx <= q_idx


def sliding_window_mask(left: int, right: int = 0) -> MaskMod:
    """Keys within ``left`` positions before and ``right`` after the query (inclusive)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    return mask_mod


def document_mask(document_ids) -> MaskMod:
    """Packed documents: ``document_ids[b, position]`` (``[Z, n]``, a torch tensor or jax array
    of the flattened batch, self-attention) — a query sees keys of its own document only. The
    ``query_segment_ids``/``key_segment_ids`` arguments do the same and skip empty blocks."""

    def mask_mod(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return mask_mod


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A key is kept iff every ``mask_mod`` keeps it."""
    if not mask_mods:
        raise ValueError("and_masks needs at least one mask_mod")

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            keep = keep & mod(b, h, q_idx, kv_idx)
        return keep

    return mask_mod


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A key is kept iff some ``mask_mod`` keeps it."""
    if not mask_mods:
        raise ValueError("or_masks needs at least one mask_mod")

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            keep = keep | mod(b, h, q_idx, kv_idx)
        return keep

    return mask_mod


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi head slopes of Press et al. (2022), geometric from ``2^(-8/n)``; for a head
    count that is not a power of two, the slopes of the next lower power of two followed by every
    other slope of the next higher one (as in the reference implementation).

    >>> alibi_slopes(4)
    [0.25, 0.0625, 0.015625, 0.00390625]
    """

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    lower = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower]


def alibi_score_mod(slopes: Sequence[float] | object) -> ScoreMod:
    """ALiBi: ``score + slopes[h] * (kv_idx - q_idx)``. ``slopes`` is a 1-D torch tensor or jax
    array with one slope per query head (see ``alibi_slopes``)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return score_mod
