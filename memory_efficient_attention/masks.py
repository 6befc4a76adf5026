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
from typing import NamedTuple

from ._masks import BlockPlan, StructuredMask, alignment_offset, normalize_window
from ._spec import AttentionInputError

__all__ = [
    "And",
    "Causal",
    "Lengths",
    "Mask",
    "MaskMod",
    "Or",
    "Segments",
    "Window",
    "alibi_score_mod",
    "alibi_slopes",
    "and_masks",
    "causal_mask",
    "document_mask",
    "from_kwargs",
    "merge_mask_kwargs",
    "or_masks",
    "sliding_window_mask",
]

MaskModFn = Callable[..., object]
ScoreMod = Callable[..., object]


def causal_mask(b, h, q_idx, kv_idx):
    """Top-left causal: a query sees keys at or before its own position."""
    return kv_idx <= q_idx


def sliding_window_mask(left: int, right: int = 0) -> MaskModFn:
    """Keys within ``left`` positions before and ``right`` after the query (inclusive)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    return mask_mod


def document_mask(document_ids) -> MaskModFn:
    """Packed documents: ``document_ids[b, position]`` (``[Z, n]``, a torch tensor or jax array
    of the flattened batch, self-attention) — a query sees keys of its own document only. The
    ``query_segment_ids``/``key_segment_ids`` arguments do the same and skip empty blocks."""

    def mask_mod(b, h, q_idx, kv_idx):
        return document_ids[b, q_idx] == document_ids[b, kv_idx]

    return mask_mod


def and_masks(*mask_mods: MaskModFn) -> MaskModFn:
    """A key is kept iff every ``mask_mod`` keeps it."""
    if not mask_mods:
        raise ValueError("and_masks needs at least one mask_mod")

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            keep = keep & mod(b, h, q_idx, kv_idx)
        return keep

    return mask_mod


def or_masks(*mask_mods: MaskModFn) -> MaskModFn:
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


# ------------------------------------------------------------------------------------------
# Mask objects
# ------------------------------------------------------------------------------------------

_KWARG_DEFAULTS: dict[str, object] = {
    "is_causal": False,
    "causal_alignment": "top_left",
    "local_window_size": None,
    "query_seq_lengths": None,
    "key_value_seq_lengths": None,
    "query_segment_ids": None,
    "key_segment_ids": None,
    "mask_mod": None,
}


def _offset(alignment: str, q_len: int | None, kv_len: int | None, what: str) -> int:
    if alignment == "top_left":
        return 0
    if q_len is None or kv_len is None:
        raise AttentionInputError(
            f"{what} with alignment='bottom_right' is computed as a mask_mod here, which needs the "
            "sequence lengths: pass q_len and kv_len"
        )
    return alignment_offset(alignment, q_len, kv_len)


def _check_alignment(alignment: str) -> str:
    if alignment not in ("top_left", "bottom_right"):
        raise AttentionInputError(f"alignment must be 'top_left' or 'bottom_right', got {alignment!r}")
    return alignment


def _describe(x) -> str:
    shape = tuple(getattr(x, "shape", ()))
    dtype = str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")
    return f"<{dtype}[{', '.join(map(str, shape))}]>"


def _and_keep(a, b):
    return b if a is None else a & b


class _Grid(NamedTuple):
    """The numpy index grids of ``to_dense``: ``b`` over the flattened ``batch``, ``h``, ``q``,
    ``k`` as ``[Z, H, L, S]``-broadcastable arrays."""

    b: object
    h: object
    q: object
    k: object
    q_len: int
    kv_len: int
    batch: tuple[int, ...]


class Mask:
    """Base class of the mask objects: ``Causal``, ``Window``, ``Lengths``, ``Segments``,
    ``MaskMod`` and their combinations with ``&`` (intersection) and ``|`` (union).

    A mask object describes which (query, key) pairs take part, like FlexAttention's
    ``BlockMask`` or the ``AttentionBias`` classes of xformers, without holding an ``L x S``
    tensor. Pass it as ``mask=`` to either ``efficient_dot_product_attention``: it becomes the
    structured keyword arguments (``to_kwargs``), so the kernels plan it on index ranges and
    skip the blocks it empties.

    * ``a & b`` keeps a pair iff both keep it. The result plans at most one of each kind
      (one causal mask and one window sharing one alignment, one ``Lengths``, one
      ``Segments``); parts that do not fit (a second alignment, a second ``Segments``...)
      are folded into the ``mask_mod``, evaluated on every block that the planned parts keep.
    * ``a | b`` keeps a pair iff either keeps it. A union is planned where it is one part again
      (two equal parts, ``Causal | Causal``, overlapping windows of one alignment,
      ``MaskMod | MaskMod -> MaskMod(or_masks(...))``); any other union of structured parts is
      computed as a ``mask_mod``, so block skipping covers only what remains plannable.

    Mask objects are immutable; the ``mask_mod`` a folded object builds is cached per
    ``(q_len, kv_len)``, so reusing one object lets ``jax.jit`` reuse its compilation. A folded
    ``Lengths``/``Segments`` indexes its arrays with the kernel's index grids: give it arrays of
    the framework (and device) of the call, not NumPy arrays.
    """

    __slots__ = ("_cache",)
    _kind = ""

    # ----- combination ---------------------------------------------------------------------

    def _conjuncts(self) -> tuple[Mask, ...]:
        return (self,)

    def _disjuncts(self) -> tuple[Mask, ...]:
        return (self,)

    def __and__(self, other):
        if not isinstance(other, Mask):
            return NotImplemented
        return _intersect(self._conjuncts() + other._conjuncts())

    def __or__(self, other):
        if not isinstance(other, Mask):
            return NotImplemented
        return _union(self._disjuncts() + other._disjuncts())

    # ----- evaluation (overridden) --------------------------------------------------------

    def _mask_mod(self, q_len: int | None, kv_len: int | None) -> MaskModFn:
        """This mask as one ``mask_mod`` (framework-neutral)."""
        raise NotImplementedError

    def _dense(self, g: _Grid):
        """The keep mask on numpy index grids (broadcastable numpy bool array)."""
        raise NotImplementedError

    def _kwargs(self, q_len: int | None, kv_len: int | None) -> dict[str, object]:
        return {"mask_mod": self._cached_mod(q_len, kv_len)}

    def _batch_shapes(self) -> list[tuple[int, ...]]:
        return []

    def _cached_mod(self, q_len, kv_len) -> MaskModFn:
        try:
            cache = self._cache
        except AttributeError:
            cache = {}
            object.__setattr__(self, "_cache", cache)
        key = (q_len, kv_len) if self._needs_lengths() else None
        if key not in cache:
            cache[key] = self._mask_mod(q_len, kv_len)
        return cache[key]

    def _needs_lengths(self) -> bool:
        return False

    # ----- public API ----------------------------------------------------------------------

    def to_kwargs(self, q_len: int | None = None, kv_len: int | None = None) -> dict[str, object]:
        """The keyword arguments of ``efficient_dot_product_attention`` this mask stands for
        (only those it sets; ``causal_alignment`` whenever a causal mask or window is planned).

        ``q_len``/``kv_len`` are needed only when a bottom-right aligned part is folded into
        the ``mask_mod`` (its diagonal depends on the lengths); else an AttentionInputError says so.
        """
        return self._kwargs(q_len, kv_len)

    def to_dense(self, q_len: int, kv_len: int, *, batch=None, heads: int | None = None):
        """The keep mask as a numpy bool array (True = the pair takes part).

        Shape ``[L, S]``, or ``[B..., L, S]`` when lengths or segment ids give batch dims
        (``batch`` overrides them), with an ``H`` axis before ``L`` when ``heads`` is given.
        Framework arrays are read with ``np.asarray``. A ``mask_mod`` is called once on numpy
        index grids: ``b`` over the flattened batch (size 1 without batch dims), ``h`` over
        ``heads`` (size 1, ``h = 0``, without ``heads``), ``q_idx``/``kv_idx`` over ``L``/``S``.
        """
        import numpy as np

        if batch is None:
            shapes = self._batch_shapes()
            batch = np.broadcast_shapes(*shapes) if shapes else ()
        batch = tuple(int(n) for n in batch)
        z = math.prod(batch)
        nh = 1 if heads is None else int(heads)
        b = np.arange(z).reshape(z, 1, 1, 1)
        h = np.arange(nh).reshape(1, nh, 1, 1)
        q = np.arange(q_len).reshape(1, 1, q_len, 1)
        k = np.arange(kv_len).reshape(1, 1, 1, kv_len)
        dense = self._dense(_Grid(b, h, q, k, q_len, kv_len, batch))
        keep = np.broadcast_to(np.asarray(dense, dtype=bool), (z, nh, q_len, kv_len))
        shape = (*batch, q_len, kv_len) if heads is None else (*batch, nh, q_len, kv_len)
        return np.ascontiguousarray(keep).reshape(shape)

    def block_plan(self, q_len: int, kv_len: int, q_chunk: int, k_chunk: int) -> BlockPlan:
        """The ``BlockPlan`` the kernels follow for this mask in chunks of ``q_chunk x k_chunk``."""
        kw = {**_KWARG_DEFAULTS, **self.to_kwargs(q_len, kv_len)}
        structured = StructuredMask(
            q_len=q_len,
            kv_len=kv_len,
            causal=bool(kw["is_causal"]),
            window=normalize_window(kw["local_window_size"]),
            offset=alignment_offset(kw["causal_alignment"], q_len, kv_len),
            q_lengths=kw["query_seq_lengths"] is not None,
            kv_lengths=kw["key_value_seq_lengths"] is not None,
            segments=kw["query_segment_ids"] is not None,
            mask_mod=kw["mask_mod"] is not None,
        )
        return BlockPlan.build(structured, q_chunk, k_chunk)

    def block_grid(self, q_len: int, kv_len: int, q_chunk: int, k_chunk: int) -> str:
        """The block structure as text: a summary line, then one row per query chunk with ``.``
        (empty: never computed), ``+`` (partial: mask work) or ``#`` (full: no mask work).

        >>> print(Causal().block_grid(6, 6, 2, 2))
        BlockPlan(L=6, S=6, q_chunk=2, k_chunk=2, 3x3 chunks, 3 full, 3 partial, 3 empty)
          + . .
          # + .
          # # +
        """
        return str(self.block_plan(q_len, kv_len, q_chunk, k_chunk))

    def _repr_part(self) -> str:
        return repr(self)


class Causal(Mask):
    """Causal: key ``k`` is kept for query ``q`` iff ``k <= q + a``, ``a = 0`` (``"top_left"``)
    or ``S - L`` (``"bottom_right"``: the last query sees the last key, as with a KV cache).

    >>> Causal(alignment="bottom_right") & Window(128, 0, alignment="bottom_right")
    Causal(alignment='bottom_right') & Window(left=128, right=0, alignment='bottom_right')
    """

    __slots__ = ("alignment",)
    _kind = "causal"

    def __init__(self, alignment: str = "top_left"):
        object.__setattr__(self, "alignment", _check_alignment(alignment))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and other.alignment == self.alignment

    def __hash__(self):
        return hash((type(self), self.alignment))

    def __repr__(self):
        return "Causal()" if self.alignment == "top_left" else f"Causal(alignment={self.alignment!r})"

    def _needs_lengths(self):
        return self.alignment != "top_left"

    def _kwargs(self, q_len, kv_len):
        return {"is_causal": True, "causal_alignment": self.alignment}

    def _mask_mod(self, q_len, kv_len):
        a = _offset(self.alignment, q_len, kv_len, "Causal")

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + a

        return mask_mod

    def _dense(self, g):
        return g.k <= g.q + alignment_offset(self.alignment, g.q_len, g.kv_len)


class Window(Mask):
    """A local window around the aligned diagonal: keep ``q + a - left <= k <= q + a + right``;
    ``right=None`` means ``right = left`` (as ``local_window_size=w``). ``a`` as in ``Causal``."""

    __slots__ = ("alignment", "left", "right")
    _kind = "window"

    def __init__(self, left: int, right: int | None = None, alignment: str = "top_left"):
        left, right = normalize_window(left if right is None else (left, right))
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)
        object.__setattr__(self, "alignment", _check_alignment(alignment))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and (other.left, other.right, other.alignment) == (
            self.left,
            self.right,
            self.alignment,
        )

    def __hash__(self):
        return hash((type(self), self.left, self.right, self.alignment))

    def __repr__(self):
        align = "" if self.alignment == "top_left" else f", alignment={self.alignment!r}"
        return f"Window(left={self.left}, right={self.right}{align})"

    def _needs_lengths(self):
        return self.alignment != "top_left"

    def _kwargs(self, q_len, kv_len):
        return {"local_window_size": (self.left, self.right), "causal_alignment": self.alignment}

    def _mask_mod(self, q_len, kv_len):
        a = _offset(self.alignment, q_len, kv_len, "Window")
        lo, hi = a - self.left, a + self.right

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= q_idx + lo) & (kv_idx <= q_idx + hi)

        return mask_mod

    def _dense(self, g):
        a = alignment_offset(self.alignment, g.q_len, g.kv_len)
        return (g.k >= g.q + (a - self.left)) & (g.k <= g.q + (a + self.right))


class Lengths(Mask):
    """Padding at the end: integer ``[B...]`` arrays (torch tensors, jax or numpy arrays) of the
    valid query / key-value lengths; positions at or past a length are excluded."""

    __slots__ = ("key_value", "query")
    _kind = "lengths"

    def __init__(self, query=None, key_value=None):
        if query is None and key_value is None:
            raise AttentionInputError("Lengths needs query= or key_value= lengths (integer [B...] arrays)")
        object.__setattr__(self, "query", query)
        object.__setattr__(self, "key_value", key_value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and other.query is self.query and other.key_value is self.key_value

    def __hash__(self):
        return hash((type(self), id(self.query), id(self.key_value)))

    def __repr__(self):
        named = (("query", self.query), ("key_value", self.key_value))
        return f"Lengths({', '.join(f'{n}={_describe(x)}' for n, x in named if x is not None)})"

    def _batch_shapes(self):
        return [tuple(x.shape) for x in (self.query, self.key_value) if x is not None]

    def _kwargs(self, q_len, kv_len):
        kw = {}
        if self.query is not None:
            kw["query_seq_lengths"] = self.query
        if self.key_value is not None:
            kw["key_value_seq_lengths"] = self.key_value
        return kw

    def _mask_mod(self, q_len, kv_len):
        ql, kl = self.query, self.key_value

        def mask_mod(b, h, q_idx, kv_idx):
            keep = None if ql is None else q_idx < ql.reshape(-1)[b]
            if kl is not None:
                keep = _and_keep(keep, kv_idx < kl.reshape(-1)[b])
            return keep

        return mask_mod

    def _dense(self, g):
        import numpy as np

        keep = None
        for x, idx in ((self.query, g.q), (self.key_value, g.k)):
            if x is not None:
                keep = _and_keep(keep, idx < np.broadcast_to(np.asarray(x), g.batch).reshape(-1)[g.b])
        return keep


class Segments(Mask):
    """Packed documents: integer segment ids ``query`` ``[B..., L]`` and ``key_value``
    ``[B..., S]`` (default: ``query``, self-attention); a query sees only keys of its segment."""

    __slots__ = ("key_value", "query")
    _kind = "segments"

    def __init__(self, query, key_value=None):
        if query is None:
            raise AttentionInputError("Segments needs the query segment ids (integer [B..., L])")
        object.__setattr__(self, "query", query)
        object.__setattr__(self, "key_value", key_value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def _kv(self):
        return self.query if self.key_value is None else self.key_value

    def __eq__(self, other):
        return type(other) is type(self) and other.query is self.query and other._kv is self._kv

    def __hash__(self):
        return hash((type(self), id(self.query), id(self._kv)))

    def __repr__(self):
        if self.key_value is None:
            return f"Segments({_describe(self.query)})"
        return f"Segments(query={_describe(self.query)}, key_value={_describe(self.key_value)})"

    def _batch_shapes(self):
        return [tuple(self.query.shape)[:-1], tuple(self._kv.shape)[:-1]]

    def _kwargs(self, q_len, kv_len):
        return {"query_segment_ids": self.query, "key_segment_ids": self._kv}

    def _mask_mod(self, q_len, kv_len):
        qs, ks = self.query, self._kv

        def mask_mod(b, h, q_idx, kv_idx):
            return qs.reshape(-1, qs.shape[-1])[b, q_idx] == ks.reshape(-1, ks.shape[-1])[b, kv_idx]

        return mask_mod

    def _dense(self, g):
        import numpy as np

        qs = np.broadcast_to(np.asarray(self.query), (*g.batch, g.q_len)).reshape(-1, g.q_len)
        ks = np.broadcast_to(np.asarray(self._kv), (*g.batch, g.kv_len)).reshape(-1, g.kv_len)
        return qs[g.b, g.q] == ks[g.b, g.k]


class MaskMod(Mask):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = kept), evaluated by
    the kernels chunk by chunk on index grids (see the module docstring); ``name`` shows in
    the repr (default: the function's name)."""

    __slots__ = ("fn", "name")
    _kind = "mask_mod"

    def __init__(self, fn: MaskModFn, name: str | None = None):
        if not callable(fn):
            raise AttentionInputError(f"MaskMod needs a callable mask_mod(b, h, q_idx, kv_idx), got {fn!r}")
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "name", name or getattr(fn, "__name__", type(fn).__name__))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and other.fn is self.fn

    def __hash__(self):
        return hash((type(self), id(self.fn)))

    def __repr__(self):
        return f"MaskMod({self.name})"

    def _mask_mod(self, q_len, kv_len):
        return self.fn

    def _dense(self, g):
        import numpy as np

        return np.asarray(self.fn(g.b, g.h, g.q, g.k), dtype=bool)


class _Combined(Mask):
    """Shared parts of ``And`` and ``Or``: a tuple of parts."""

    __slots__ = ("parts",)
    _op = ""

    def __init__(self, parts):
        object.__setattr__(self, "parts", tuple(parts))

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return type(other) is type(self) and other.parts == self.parts

    def __hash__(self):
        return hash((type(self), self.parts))

    def __repr__(self):
        return f" {self._op} ".join(p._repr_part() for p in self.parts)

    def _repr_part(self):
        return f"({self!r})"

    def _needs_lengths(self):
        return any(p._needs_lengths() for p in self.parts)

    def _batch_shapes(self):
        return [s for p in self.parts for s in p._batch_shapes()]


class And(_Combined):
    """The intersection of parts (built by ``&``): the planned parts (at most one of each kind,
    the causal mask and window sharing one alignment) first, then those folded into the
    ``mask_mod``, in the attribute ``folded``."""

    __slots__ = ("folded",)
    _op = "&"

    def __init__(self, planned, folded=()):
        super().__init__((*planned, *folded))
        object.__setattr__(self, "folded", tuple(folded))

    def _conjuncts(self):
        return self.parts

    def _kwargs(self, q_len, kv_len):
        kw: dict[str, object] = {}
        for p in self.parts[: len(self.parts) - len(self.folded)]:
            kw.update(p._kwargs(q_len, kv_len))
        if self.folded:
            kw["mask_mod"] = self._cached_mod(q_len, kv_len)
        return kw

    def _mask_mod(self, q_len, kv_len):
        mods = [p._cached_mod(q_len, kv_len) for p in self.folded]
        return mods[0] if len(mods) == 1 else and_masks(*mods)

    def _dense(self, g):
        keep = None
        for p in self.parts:
            keep = _and_keep(keep, p._dense(g))
        return keep


class Or(_Combined):
    """The union of parts (built by ``|``), computed as one ``mask_mod``: the kernels skip only
    the blocks that the planned parts of an enclosing ``&`` empty."""

    __slots__ = ()
    _op = "|"

    def _disjuncts(self):
        return self.parts

    def _mask_mod(self, q_len, kv_len):
        return or_masks(*(_as_mod(p, q_len, kv_len) for p in self.parts))

    def _dense(self, g):
        keep = None
        for p in self.parts:
            part = p._dense(g)
            keep = part if keep is None else keep | part
        return keep


def _as_mod(mask: Mask, q_len, kv_len) -> MaskModFn:
    """Any mask (planned parts included) as one ``mask_mod``."""
    if isinstance(mask, And):
        mods = [_as_mod(p, q_len, kv_len) for p in mask.parts]
        return mods[0] if len(mods) == 1 else and_masks(*mods)
    return mask._cached_mod(q_len, kv_len)


def _intersect(parts: tuple[Mask, ...]) -> Mask:
    """Plan what can be planned: one causal (the first one's alignment), the windows of that
    alignment intersected into one, one ``Lengths`` per side, one ``Segments``; fold the rest."""
    planned: dict[str, Mask] = {}
    folded: list[Mask] = []
    alignment = next((p.alignment for p in parts if isinstance(p, (Causal, Window))), None)
    for p in parts:
        if isinstance(p, (Causal, Window)) and p.alignment == alignment:
            old = planned.get(p._kind)
            if isinstance(p, Window) and old is not None:
                p = Window(min(old.left, p.left), min(old.right, p.right), alignment)
            planned[p._kind] = p
        elif isinstance(p, Lengths) and "lengths" in planned:
            old = planned["lengths"]
            clash = [
                (a is not None and b is not None and a is not b)
                for a, b in ((old.query, p.query), (old.key_value, p.key_value))
            ]
            if any(clash):
                folded.append(p)
            else:
                planned["lengths"] = Lengths(
                    old.query if old.query is not None else p.query,
                    old.key_value if old.key_value is not None else p.key_value,
                )
        elif isinstance(p, Segments) and "segments" in planned:
            if p != planned["segments"]:
                folded.append(p)
        elif isinstance(p, (Lengths, Segments)):
            planned[p._kind] = p
        elif p not in folded:
            folded.append(p)
    order = [planned[k] for k in ("causal", "window", "lengths", "segments") if k in planned]
    if not folded and len(order) == 1:
        return order[0]
    if not order and len(folded) == 1:
        return folded[0]
    return And(order, folded)


def _union(parts: tuple[Mask, ...]) -> Mask:
    """Merge what stays one part (equal parts, causal masks or overlapping windows of one
    alignment, mask_mods); anything else is an ``Or``, computed as a ``mask_mod``."""
    merged: list[Mask] = []
    for p in parts:
        for i, old in enumerate(merged):
            if old == p:
                break
            if isinstance(p, Window) and isinstance(old, Window) and p.alignment == old.alignment:
                # bands [-left, right] around the diagonal: one band iff they touch
                if max(-p.left, -old.left) <= min(p.right, old.right) + 1:
                    merged[i] = Window(max(p.left, old.left), max(p.right, old.right), p.alignment)
                    break
        else:
            merged.append(p)
    mods = [p for p in merged if isinstance(p, MaskMod)]
    if len(mods) > 1:
        joined = MaskMod(or_masks(*(m.fn for m in mods)), name=f"or_masks({', '.join(m.name for m in mods)})")
        merged = [p for p in merged if not isinstance(p, MaskMod)] + [joined]
    return merged[0] if len(merged) == 1 else Or(merged)


def from_kwargs(**kwargs) -> Mask | None:
    """The mask object of the structured keyword arguments of ``efficient_dot_product_attention``
    (``is_causal``, ``causal_alignment``, ``local_window_size``, ``query_seq_lengths``,
    ``key_value_seq_lengths``, ``query_segment_ids``, ``key_segment_ids``, ``mask_mod``); None
    when they mask nothing. ``from_kwargs(**m.to_kwargs())`` plans as ``m`` does.

    >>> from_kwargs(is_causal=True, local_window_size=(4, 0), causal_alignment="bottom_right")
    Causal(alignment='bottom_right') & Window(left=4, right=0, alignment='bottom_right')
    """
    unknown = sorted(set(kwargs) - set(_KWARG_DEFAULTS))
    if unknown:
        raise TypeError(
            f"from_kwargs got unexpected keyword arguments {unknown}; it takes {list(_KWARG_DEFAULTS)}"
        )
    kw = {**_KWARG_DEFAULTS, **kwargs}
    alignment = kw["causal_alignment"]
    parts: list[Mask] = []
    if kw["is_causal"]:
        parts.append(Causal(alignment))
    if kw["local_window_size"] is not None:
        parts.append(Window(*normalize_window(kw["local_window_size"]), alignment=alignment))
    if kw["query_seq_lengths"] is not None or kw["key_value_seq_lengths"] is not None:
        parts.append(Lengths(kw["query_seq_lengths"], kw["key_value_seq_lengths"]))
    if kw["key_segment_ids"] is not None and kw["query_segment_ids"] is None:
        raise AttentionInputError(
            "key_segment_ids needs query_segment_ids (pass both, or the query ids alone)"
        )
    if kw["query_segment_ids"] is not None:
        parts.append(Segments(kw["query_segment_ids"], kw["key_segment_ids"]))
    if kw["mask_mod"] is not None:
        parts.append(MaskMod(kw["mask_mod"]))
    if not parts:
        return None
    return _intersect(tuple(parts))


def _same(name: str, a, b) -> bool:
    if name == "local_window_size":
        return normalize_window(a) == normalize_window(b)
    if isinstance(a, (bool, str)) and isinstance(b, (bool, str)):
        return a == b
    return a is b


def merge_mask_kwargs(mask, kwargs: dict, query_shape=(), key_shape=()):
    """``(mask, kwargs)`` for the seed-layout functions: a mask object becomes its structured
    keyword arguments (``to_kwargs``) merged into a copy of ``kwargs``, and the dense mask None;
    anything else (None, a dense boolean array) is returned as it is, with ``kwargs``.
    ``query_shape``/``key_shape`` (``[B..., L, H, D]``, ``[B..., S, K, D]``) give the lengths.

    A keyword that ``kwargs`` sets (to other than its default) with a different value than the
    mask object raises ``AttentionInputError``, and so does a ``causal_alignment`` the object
    needs that differs from the one an explicit ``is_causal``/``local_window_size`` uses.
    """
    if not isinstance(mask, Mask):
        return mask, kwargs
    q_len = query_shape[-3] if len(query_shape) >= 3 else None
    kv_len = key_shape[-3] if len(key_shape) >= 3 else None
    own = mask.to_kwargs(q_len, kv_len)
    for name, value in own.items():
        given = kwargs.get(name, _KWARG_DEFAULTS[name])
        if name == "causal_alignment":
            users = [
                n
                for n in ("is_causal", "local_window_size")
                if kwargs.get(n, _KWARG_DEFAULTS[n]) not in (None, False)
            ]
            if given != value and (users or given != _KWARG_DEFAULTS[name]):
                raise AttentionInputError(
                    f"mask={mask!r} needs causal_alignment={value!r}, but the explicit "
                    f"{' and '.join(f'{n}=' for n in users)} use causal_alignment={given!r}"
                )
        elif given is not _KWARG_DEFAULTS[name] and given is not False and not _same(name, given, value):
            raise AttentionInputError(
                f"mask={mask!r} sets {name}, which is also given explicitly as {name}="
                f"{_describe(given) if hasattr(given, 'shape') else repr(given)}; pass it in one place"
            )
    return None, {**kwargs, **own}
