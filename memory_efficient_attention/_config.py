"""The static configuration of one kernel call, and the per-chunk mask logic both kernels share.

``CallOptions`` is the frozen, framework-neutral description of a call's static (non-array)
options, validated once where a public function builds it; ``CallArrays`` holds its optional
array inputs. ``make_config`` turns them, with the shapes, into a ``KernelConfig``: frozen and
hashable, so JAX takes it as a static argument; the PyTorch kernel reads the same fields. Shape
legend: see ``_spec``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from ._chunks import choose_chunk_sizes, parse_memory, tile_size
from ._masks import BlockPlan, StructuredMask, alignment_offset, normalize_window
from ._spans import check_engine
from ._spec import (
    AttentionInputError,
    Dims,
    check_chunk_size,
    check_dropout,
    check_softcap,
    compute_dtype_name,
    describe,
    resolve_scale,
)

__all__ = [
    "ArrayShapes",
    "CallArrays",
    "CallOptions",
    "KernelConfig",
    "chunk_keep",
    "make_config",
    "split_arguments",
]

# How a dense boolean ``mask`` treats False: "min" replaces the score by finfo.min (the seed's and
# Flax's semantics: a fully masked row averages the values); "exclude" removes the key (torch SDPA).
MASK_FILL = ("min", "exclude")


@dataclass(frozen=True)
class CallOptions:
    """The static options of one call, named as the public keywords; validated (and normalised:
    numbers as Python numbers, ``local_window_size`` as ``(left, right)``) when built, so equal
    options compare and hash equal. ``scale`` None means ``1/sqrt(D)``; a traced JAX scale is
    folded into the query before (``jax._api._fold_array_scale``)."""

    scale: float | None = None
    query_chunk_size: int | None = None
    key_chunk_size: int | None = None
    memory_budget: int | float | str | None = None
    is_causal: bool = False
    causal_alignment: str = "top_left"
    local_window_size: tuple[int, int] | None = None
    mask_fill: str = "min"
    logits_soft_cap: float | None = None
    dropout_rate: float = 0.0
    engine: str = "auto"

    def __post_init__(self):
        if not isinstance(self.is_causal, bool):
            raise AttentionInputError(f"is_causal must be a bool, got {self.is_causal!r}")
        alignment_offset(self.causal_alignment, 0, 0)
        set_ = object.__setattr__
        set_(self, "local_window_size", normalize_window(self.local_window_size))
        set_(self, "query_chunk_size", check_chunk_size("query_chunk_size", self.query_chunk_size))
        set_(self, "key_chunk_size", check_chunk_size("key_chunk_size", self.key_chunk_size))
        parse_memory(self.memory_budget)
        if self.mask_fill not in MASK_FILL:
            raise AttentionInputError(f"mask_fill must be one of {MASK_FILL}, got {self.mask_fill!r}")
        if self.scale is not None:
            set_(self, "scale", resolve_scale(self.scale, 1))
        set_(self, "logits_soft_cap", check_softcap(self.logits_soft_cap))
        set_(self, "dropout_rate", check_dropout(self.dropout_rate))
        check_engine(self.engine)


@dataclass(frozen=True)
class CallArrays:
    """The optional array inputs of one call (framework arrays, or None): a dense ``mask`` and
    ``bias``, the sequence lengths and the segment ids, as the public keywords name them."""

    mask: Any = None
    bias: Any = None
    query_seq_lengths: Any = None
    key_value_seq_lengths: Any = None
    query_segment_ids: Any = None
    key_segment_ids: Any = None

    def shapes(self) -> ArrayShapes:
        """The shapes of the integer arrays (None where absent), for ``make_config``."""
        return ArrayShapes(
            *(
                None if x is None else tuple(x.shape)
                for x in (
                    self.query_seq_lengths,
                    self.key_value_seq_lengths,
                    self.query_segment_ids,
                    self.key_segment_ids,
                )
            )
        )


@dataclass(frozen=True)
class ArrayShapes:
    """The shapes of a call's optional integer arrays (None if absent): lengths ``B...``, segment
    ids ``[B..., L]`` / ``[B..., S]``."""

    q_lengths: tuple[int, ...] | None = None
    kv_lengths: tuple[int, ...] | None = None
    q_segments: tuple[int, ...] | None = None
    kv_segments: tuple[int, ...] | None = None


_OPTION_NAMES = tuple(f.name for f in fields(CallOptions))
_ARRAY_NAMES = tuple(f.name for f in fields(CallArrays))


def split_arguments(kwargs: dict) -> tuple[CallOptions, CallArrays, dict]:
    """Keyword arguments named as the public ones -> ``(CallOptions, CallArrays, the rest)``
    (callables and framework-specific arguments stay in the rest)."""
    rest = dict(kwargs)
    arrays = CallArrays(**{n: rest.pop(n) for n in _ARRAY_NAMES if n in rest})
    options = CallOptions(**{n: rest.pop(n) for n in _OPTION_NAMES if n in rest})
    return options, arrays, rest


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
    engine: str = "auto"  # ``_spans.ENGINES``

    @cached_property
    def plan(self) -> BlockPlan:
        # Dropout draws its keep mask per chunk pair, the same in every pass: no tiles then.
        min_tile = 0 if self.dropout else tile_size(self.q_chunk, self.k_chunk)
        return BlockPlan.build(self.structure, self.q_chunk, self.k_chunk, min_tile)

    @property
    def compute_dtype(self) -> str:
        return compute_dtype_name(self.dtype)


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
    options: CallOptions | None = None,
    device: str = "cpu",
    shapes: ArrayShapes | None = None,
    mask_mod=None,
    **keywords,
) -> KernelConfig:
    """Check the shape-dependent arguments of a call and build its ``KernelConfig``.

    ``options``: the call's ``CallOptions`` (already validated); or, instead, its fields as
    ``keywords`` (``make_config(dims, dtype, is_causal=True, query_chunk_size=64)``).
    ``device`` is ``"cpu"`` or an accelerator's platform name (it steers the chunk sizes).
    ``shapes``: the shapes of the optional integer arrays; ``mask_mod``: the call's, if any.
    """
    if options is None:
        options = CallOptions(**keywords)
    elif keywords:
        raise TypeError(f"make_config takes options or keywords, not both: {sorted(keywords)}")
    shapes = shapes or ArrayShapes()
    offset = alignment_offset(options.causal_alignment, dims.q_len, dims.kv_len)
    window = options.local_window_size
    batch = tuple(dims.batch)
    for name, shape, need in (
        ("query_seq_lengths", shapes.q_lengths, batch),
        ("key_value_seq_lengths", shapes.kv_lengths, batch),
        ("query_segment_ids", shapes.q_segments, (*batch, dims.q_len)),
        ("key_segment_ids", shapes.kv_segments, (*batch, dims.kv_len)),
    ):
        if shape is not None and tuple(shape) != need:
            raise AttentionInputError(
                f"{name} has shape {describe(shape)}, but needs {describe(need)} "
                f"({'B...' if len(need) == len(batch) else '[B..., length]'} of the query's batch dims)"
            )
    if (shapes.q_segments is None) != (shapes.kv_segments is None):
        raise AttentionInputError(
            "query_segment_ids and key_segment_ids go together: pass both or neither "
            "(for self-attention pass the same ids twice)"
        )
    if mask_mod is not None and not callable(mask_mod):
        raise AttentionInputError(f"mask_mod must be callable(b, h, q_idx, kv_idx), got {mask_mod!r}")
    structure = StructuredMask(
        q_len=dims.q_len,
        kv_len=dims.kv_len,
        causal=options.is_causal,
        window=window,
        offset=offset,
        q_lengths=shapes.q_lengths is not None,
        kv_lengths=shapes.kv_lengths is not None,
        segments=shapes.q_segments is not None,
        mask_mod=mask_mod is not None,
    )
    q_chunk, k_chunk = choose_chunk_sizes(
        dims,
        dtype,
        options.query_chunk_size,
        options.key_chunk_size,
        options.memory_budget,
        device,
        None if window is None else max(0, window[0]) + max(0, window[1]) + 1,
    )
    return KernelConfig(
        dims=dims,
        dtype=dtype,
        scale=resolve_scale(options.scale, dims.qk_depth),
        q_chunk=q_chunk,
        k_chunk=k_chunk,
        structure=structure,
        mask_fill=options.mask_fill,
        softcap=options.logits_soft_cap,
        dropout=options.dropout_rate,
        engine=options.engine,
    )
