"""The static configuration of one kernel call, and the per-chunk mask logic both kernels share.

``KernelConfig`` is frozen and hashable, so JAX takes it as a static argument; the PyTorch kernel
reads the same fields. Shape legend: see ``_spec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ._chunks import choose_chunk_sizes, tile_size
from ._masks import BlockPlan, StructuredMask, alignment_offset, normalize_window
from ._spec import (
    AttentionInputError,
    Dims,
    check_dropout,
    check_softcap,
    describe,
    resolve_scale,
)

__all__ = ["KernelConfig", "chunk_keep", "make_config"]

# How a dense boolean ``mask`` treats False: "min" replaces the score by finfo.min (the seed's and
# Flax's semantics: a fully masked row averages the values); "exclude" removes the key (torch SDPA).
MASK_FILL = ("min", "exclude")


@dataclass(frozen=True)
class KernelConfig:
    """Everything static about one call: shapes, scale, chunking, masks, numerics."""

    dims: Dims
    dtype: str  # input dtype name
    scale: float
    q_chunk: int
    k_chunk: int
    structure: StructuredMask
    mask_fill: str = "min"
    softcap: float | None = None
    dropout: float = 0.0

    @cached_property
    def plan(self) -> BlockPlan:
        # Dropout draws its keep mask per chunk pair, the same in every pass: no tiles then.
        min_tile = 0 if self.dropout else tile_size(self.q_chunk, self.k_chunk)
        return BlockPlan.build(self.structure, self.q_chunk, self.k_chunk, min_tile)

    @property
    def compute_dtype(self) -> str:
        return "float64" if self.dtype == "float64" else "float32"


def chunk_keep(
    structure: StructuredMask,
    q_idx,
    k_idx,
    *,
    q_lengths=None,
    kv_lengths=None,
    q_segments=None,
    kv_segments=None,
    mask_mod=None,
    batch_idx=None,
    head_idx=None,
):
    """Which pairs of one chunk are kept by the structured masks (True = kept), or None if all.

    Every argument is an array broadcastable to the chunk's scores ``[Z, K, lc, G, kc]`` (numpy,
    torch or jax: only operators are used): ``q_idx`` ``[1, 1, lc, 1, 1]`` and ``k_idx``
    ``[1, 1, 1, 1, kc]`` hold absolute positions, ``q_lengths``/``kv_lengths`` ``[Z, 1, 1, 1, 1]``,
    ``q_segments`` ``[Z, 1, lc, 1, 1]``, ``kv_segments`` ``[Z, 1, 1, 1, kc]``, ``batch_idx``
    ``[Z, 1, 1, 1, 1]`` and ``head_idx`` ``[1, K, 1, G, 1]`` (query head = kv head * G + group).
    """
    keep = structure.keep(q_idx, k_idx)
    parts = []
    if q_lengths is not None:
        parts.append(q_idx < q_lengths)
    if kv_lengths is not None:
        parts.append(k_idx < kv_lengths)
    if q_segments is not None:
        parts.append(q_segments == kv_segments)
    if mask_mod is not None:
        parts.append(mask_mod(batch_idx, head_idx, q_idx, k_idx))
    for part in parts:
        keep = part if keep is None else keep & part
    return keep


def make_config(
    dims: Dims,
    dtype: str,
    *,
    scale=None,
    query_chunk_size=None,
    key_chunk_size=None,
    memory_budget=None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    local_window_size=None,
    q_lengths_shape=None,
    kv_lengths_shape=None,
    q_segments_shape=None,
    kv_segments_shape=None,
    mask_mod=None,
    mask_fill: str = "min",
    logits_soft_cap=None,
    dropout_rate: float = 0.0,
    device: str = "cpu",
) -> KernelConfig:
    """Validate the framework-independent arguments of a call and build its ``KernelConfig``.

    ``device`` is ``"cpu"`` or an accelerator's platform name (it steers the chunk sizes).
    The ``*_shape`` arguments are the shapes of the optional integer arrays (None if absent):
    lengths must have the batch shape ``B...``, segment ids ``[B..., L]`` / ``[B..., S]``.
    """
    if not isinstance(is_causal, bool):
        raise AttentionInputError(f"is_causal must be a bool, got {is_causal!r}")
    offset = alignment_offset(causal_alignment, dims.q_len, dims.kv_len)
    window = normalize_window(local_window_size)
    batch = tuple(dims.batch)
    for name, shape, need in (
        ("query_seq_lengths", q_lengths_shape, batch),
        ("key_value_seq_lengths", kv_lengths_shape, batch),
        ("query_segment_ids", q_segments_shape, (*batch, dims.q_len)),
        ("key_segment_ids", kv_segments_shape, (*batch, dims.kv_len)),
    ):
        if shape is not None and tuple(shape) != need:
            raise AttentionInputError(
                f"{name} has shape {describe(shape)}, but needs {describe(need)} "
                f"({'B...' if len(need) == len(batch) else '[B..., length]'} of the query's batch dims)"
            )
    if (q_segments_shape is None) != (kv_segments_shape is None):
        raise AttentionInputError(
            "query_segment_ids and key_segment_ids go together: pass both or neither "
            "(for self-attention pass the same ids twice)"
        )
    if mask_mod is not None and not callable(mask_mod):
        raise AttentionInputError(f"mask_mod must be callable(b, h, q_idx, kv_idx), got {mask_mod!r}")
    structure = StructuredMask(
        q_len=dims.q_len,
        kv_len=dims.kv_len,
        causal=is_causal,
        window=window,
        offset=offset,
        q_lengths=q_lengths_shape is not None,
        kv_lengths=kv_lengths_shape is not None,
        segments=q_segments_shape is not None,
        mask_mod=mask_mod is not None,
    )
    q_chunk, k_chunk = choose_chunk_sizes(
        dims,
        dtype,
        query_chunk_size,
        key_chunk_size,
        memory_budget,
        device,
        None if window is None else max(0, window[0]) + max(0, window[1]) + 1,
    )
    if mask_fill not in MASK_FILL:
        raise AttentionInputError(f"mask_fill must be one of {MASK_FILL}, got {mask_fill!r}")
    return KernelConfig(
        dims=dims,
        dtype=dtype,
        scale=resolve_scale(scale, dims.qk_depth),
        q_chunk=q_chunk,
        k_chunk=k_chunk,
        structure=structure,
        mask_fill=mask_fill,
        softcap=check_softcap(logits_soft_cap),
        dropout=check_dropout(dropout_rate),
    )
