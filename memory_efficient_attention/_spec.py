"""Framework-neutral shapes, validation and numerics.

Everything here works on plain integer shapes and dtype names, so it runs before any framework
call and is tested without torch or jax.

Shape legend (used by every module of the package)::

    B...  batch dims: any number of them, or none;  Z = prod(B...)
    L     query length                S  key/value length
    H     query heads                 K  key/value heads (H % K == 0);  G = H // K
    D     query/key depth             E  value depth

Public layouts:

* seed layout (``efficient_dot_product_attention_*``, ``jax.nn.dot_product_attention``):
  query ``[B..., L, H, D]``, key ``[B..., S, K, D]``, value ``[B..., S, K, E]``.
* heads-first layout (``torch.nn.functional.scaled_dot_product_attention``):
  query ``[B..., H, L, D]``, key ``[B..., K, S, D]``, value ``[B..., K, S, E]``.

Masks and biases broadcast to ``[B..., H, L, S]`` in both layouts.

Kernel layout (private): query ``[Z, K, L, G, D]``, key ``[Z, K, S, D]``, value ``[Z, K, S, E]``;
a query chunk ``[:, :, l0:l1]`` is then one strided view ``[Z*K, (l1-l0)*G, D]`` for a batched
matmul against a key chunk, so grouped heads never repeat K/V. The PyTorch kernel takes these
as strided views of the caller's arrays; JAX has no views, so its kernel takes the sequence-major
``[Z, L, H, D]`` / ``[Z, S, K, D]`` and moves each chunk head-major inside the step (no O(n)
copy). A bias or mask becomes ``[Zb, Hb, Lb, Sb]`` where each size is 1 (broadcast) or the full
size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["AttentionInputError", "Dims"]


class AttentionInputError(ValueError):
    """Bad input to an attention function: the message names the argument, the shape (or value)
    it has, the one it needs and, where there is one, the fix."""


# --------------------------------------------------------------------------------------------
# Numerics, stated once.
#
# * Scores, softmax statistics and accumulators are float32 for float16/bfloat16 inputs and
#   float64 for float64 inputs (``compute_dtype_name``); outputs are cast back to the input dtype.
# * A dense ``mask`` in the seed's semantics replaces a masked score by the most negative finite
#   number of the compute dtype (``finfo.min``): the key stays inside the softmax with weight
#   exp(finfo.min - max) == 0 unless *every* key of the row is masked, in which case the row
#   averages the values (as Flax does).
# * Structured masks (causal, windows, lengths, segments, mask_mod) and boolean masks of the
#   drop-ins *exclude* keys (score -inf). A row with no key left outputs 0, has lse = -inf and
#   gets zero gradient. The JAX kernel starts each running max at finfo.min (no inf is ever
#   held, so it runs under jax.debug_infs); the torch kernel guards exp(-inf - -inf); no NaN.
# * Every finite input that dense attention handles gives a finite result: huge scores switch
#   the torch kernel from base-2 to natural units; the JAX kernel shifts by min(s, max) - max.
# --------------------------------------------------------------------------------------------

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# The score pipeline, in the order every engine applies it to ``scale * q.k`` (the chunked
# engines step by step per chunk; the fused engine takes only calls whose pipeline is the scores
# plus an additive mask, see ``_spans.fused_refusal``).
SCORE_PIPELINE = (
    "soft cap: cap * tanh(s / cap)",
    "bias: s + bias (or the seed's bias_calc_fn)",
    "dense mask: masked scores become mask_fill_value (or the seed's mask_calc_fn)",
    "seed weights_calc_fn",
    "score_mod(s, b, h, q_idx, kv_idx)",
    "structured masks and mask_mod: excluded keys become -inf",
)


def check_sinks(shape: Sequence[int] | None, dtype_name: str | None, dims: Dims) -> None:
    """Attention sinks (gpt-oss, StreamingLLM): one logit per query head, ``[H]``, that joins
    every row's softmax and carries no value. With the row's log-sum-exp ``lse`` over its keys,
    the output becomes ``out * sigmoid(lse - sink)`` and the lse ``logaddexp(lse, sink)`` (a
    row with no key outputs 0); both frameworks apply exactly this after their kernel, so every
    engine, mask and derivative takes sinks, the sink's own gradient included.

    >>> check_sinks((4,), "float32", Dims((2,), 5, 5, 4, 2, 8, 8))
    >>> try:
    ...     check_sinks((2, 4), "float32", Dims((2,), 5, 5, 4, 2, 8, 8))
    ... except AttentionInputError as err:
    ...     print(err)
    sinks has shape (2, 4), but needs (4) = [H]: one logit per query head
    """
    if shape is None:
        return
    if tuple(shape) != (dims.q_heads,):
        raise AttentionInputError(
            f"sinks has shape {describe(shape)}, but needs {describe((dims.q_heads,))} = [H]: one logit "
            "per query head"
        )
    if dtype_name not in FLOAT_DTYPES:
        raise AttentionInputError(f"sinks must be floating point, got dtype {dtype_name}")


def paged_key_shapes(q_shape, k_shape, v_shape, table_shape, table_dtype: str):
    """Check a paged KV cache and give the shapes of its gathered keys and values.

    ``key``/``value`` are page pools ``[P, page, K, D]`` / ``[P, page, K, E]``; ``block_table``
    (integer ``[B..., n]``, the query's batch dims) lists each row's pages in order, so row ``b``
    sees ``n * page`` keys (``key_value_seq_lengths`` says how many are filled). Returns the
    shapes ``[B..., n * page, K, D]`` / ``[B..., n * page, K, E]``.

    >>> paged_key_shapes((2, 1, 8, 16), (10, 4, 2, 16), (10, 4, 2, 16), (2, 3), "int32")
    ((2, 12, 2, 16), (2, 12, 2, 16))
    """
    if not table_dtype.startswith(("int", "uint")):
        raise AttentionInputError(f"block_table must hold integers, got dtype {table_dtype}")
    if len(k_shape) != 4 or len(v_shape) != 4 or tuple(k_shape[:3]) != tuple(v_shape[:3]):
        raise AttentionInputError(
            f"with block_table, key and value are page pools [P, page, K, D] / [P, page, K, E]; got "
            f"key {describe(k_shape)}, value {describe(v_shape)}"
        )
    batch = tuple(q_shape[:-3])
    if len(table_shape) < 1 or tuple(table_shape[:-1]) != batch:
        raise AttentionInputError(
            f"block_table has shape {describe(table_shape)}, but needs "
            f"({', '.join(str(b) for b in (*batch, 'n'))}) = [B..., pages per row] (the query's batch dims)"
        )
    keys = table_shape[-1] * k_shape[1]
    return (*batch, keys, *k_shape[2:]), (*batch, keys, *v_shape[2:])


def check_page_range(low: int, high: int, pages: int) -> None:
    """The page indices of a ``block_table`` (its min and max) must address the pools' ``pages``."""
    if low < 0 or high >= pages:
        raise AttentionInputError(
            f"block_table holds page indices from {low} to {high}, but the pools have {pages} pages"
        )


def mask_fill_value(mask_fill: str, finfo_min: float) -> float:
    """The score a dense mask gives a masked pair: ``finfo_min`` of the compute dtype under the
    seed's rule ``"min"`` (the key stays in the softmax with weight 0 unless its whole row is
    masked), ``-inf`` under ``"exclude"`` (the drop-ins' rule: the key is removed)."""
    return finfo_min if mask_fill == "min" else -math.inf


def compute_dtype_name(dtype_name: str) -> str:
    """The dtype scores and accumulators are kept in for inputs of ``dtype_name``."""
    return "float64" if dtype_name == "float64" else "float32"


def lse_merge_weights(xp, lse_a, lse_b):
    """How two partial softmax results over disjoint keys merge: ``(w_a, w_b, lse)`` with
    ``out = w_a[..., None] * out_a + w_b[..., None] * out_b`` and ``lse`` the merged log-sum-exp.

    ``xp`` is the array namespace (``torch``, ``jax.numpy`` or ``numpy``: only ``maximum``,
    ``where``, ``exp`` and ``log`` are used). Natural-log lse; a row empty on both sides stays
    ``(0, -inf)``: the shifts by 0 avoid ``-inf - -inf``. Used by ring attention in both
    frameworks::

        >>> import numpy as np
        >>> a, b = np.array([0.0, -np.inf]), np.array([np.log(3), -np.inf])
        >>> with np.errstate(divide="ignore"):  # log(0) for the empty row
        ...     w_a, w_b, lse = lse_merge_weights(np, a, b)
        >>> np.round(w_a, 12).tolist(), np.round(w_b, 12).tolist(), bool(np.isclose(lse[0], np.log(4)))
        ([0.25, 0.0], [0.75, 0.0], True)
        >>> float(lse[1])
        -inf
    """
    m = xp.maximum(lse_a, lse_b)
    m = xp.where(m == -math.inf, 0.0, m)
    lse = m + xp.log(xp.exp(lse_a - m) + xp.exp(lse_b - m))
    safe = xp.where(lse == -math.inf, 0.0, lse)
    return xp.exp(lse_a - safe), xp.exp(lse_b - safe), lse


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...] | None:
    """The broadcast of ``shapes`` (NumPy's rule), or None where they do not broadcast: plain
    Python, for the per-call path (``torch.broadcast_shapes`` costs tens of microseconds).

    >>> broadcast_shapes((2, 1, 5), (3, 1), ())
    (2, 3, 5)
    >>> broadcast_shapes((2,), (3,)) is None
    True
    """
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for i, n in enumerate(shape, start=rank - len(shape)):
            if n != 1:
                if out[i] not in (1, n):
                    return None
                out[i] = n
    return tuple(out)


def describe(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


@dataclass(frozen=True)
class Dims:
    """The sizes of one attention call, read off query/key/value shapes (legend in module doc)."""

    batch: tuple[int, ...]
    q_len: int
    kv_len: int
    q_heads: int
    kv_heads: int
    qk_depth: int
    v_depth: int

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def batch_size(self) -> int:
        return math.prod(self.batch)

    @property
    def empty(self) -> bool:
        """No output element or no key: ``Z``, ``L`` or ``S`` is 0 (the kernels then return an
        empty output, or zeros for ``S = 0``, with zero gradients)."""
        return self.batch_size == 0 or self.q_len == 0 or self.kv_len == 0

    def mask_shape(self) -> tuple[int, ...]:
        """The shape a mask or bias broadcasts to: ``[B..., H, L, S]``."""
        return (*self.batch, self.q_heads, self.q_len, self.kv_len)


def _check_rank(name: str, shape: Sequence[int], legend: str) -> None:
    if len(shape) < 3:
        raise AttentionInputError(
            f"{name} must have at least 3 dims {legend}, got shape {describe(shape)} "
            f"({len(shape)} dims); add a length/head axis"
        )


def _dims(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    v_shape: Sequence[int],
    *,
    heads_axis: int,
    length_axis: int,
    legend: tuple[str, str, str],
    allow_gqa: bool,
    gqa_hint: str,
    layout_hint: str = "",
) -> Dims:
    for name, shape, leg in zip(("query", "key", "value"), (q_shape, k_shape, v_shape), legend):
        _check_rank(name, shape, leg)
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    batch = q_shape[:-3]
    for name, shape, leg in (("key", k_shape, legend[1]), ("value", v_shape, legend[2])):
        if shape[:-3] != batch:
            raise AttentionInputError(
                f"{name} has batch dims {describe(shape[:-3])} (shape {describe(shape)}), but query "
                f"has {describe(batch)} (shape {describe(q_shape)}); {name} needs {leg} with the "
                "same batch dims" + layout_hint
            )
    # Empty lengths (L = 0 or S = 0) and empty batches are valid: the kernels return an empty
    # output, or zeros where every key is missing (S = 0), with zero gradients, as torch does.
    # Heads and depths must not be empty: there is nothing to attend with.
    for name, shape, leg in zip(("query", "key", "value"), (q_shape, k_shape, v_shape), legend):
        if shape[heads_axis] == 0 or shape[-1] == 0:
            raise AttentionInputError(
                f"{name} has an empty head or depth axis: shape {describe(shape)}, needs {leg} "
                "with at least one head and a depth of at least 1"
            )
    q_len, k_len, v_len = q_shape[length_axis], k_shape[length_axis], v_shape[length_axis]
    hq, hk, hv = q_shape[heads_axis], k_shape[heads_axis], v_shape[heads_axis]
    dq, dk, dv = q_shape[-1], k_shape[-1], v_shape[-1]
    if dq != dk:
        raise AttentionInputError(
            f"query and key need the same depth D: query has shape {describe(q_shape)} "
            f"(D={dq}), key has shape {describe(k_shape)} (D={dk})" + layout_hint
        )
    if k_len != v_len:
        raise AttentionInputError(
            f"key and value need the same length S: key has shape {describe(k_shape)} "
            f"(S={k_len}), value has shape {describe(v_shape)} (S={v_len})" + layout_hint
        )
    if hk != hv:
        raise AttentionInputError(
            f"key and value need the same number of heads K: key has shape {describe(k_shape)} "
            f"(K={hk}), value has shape {describe(v_shape)} (K={hv})" + layout_hint
        )
    if hq != hk:
        if not allow_gqa:
            raise AttentionInputError(
                f"query has {hq} heads (shape {describe(q_shape)}) but key/value have {hk} "
                f"(shape {describe(k_shape)}); {gqa_hint}" + layout_hint
            )
        if hq % hk:
            raise AttentionInputError(
                f"query heads H={hq} (shape {describe(q_shape)}) must be a multiple of key/value "
                f"heads K={hk} (shape {describe(k_shape)}) for grouped-query attention" + layout_hint
            )
    return Dims(batch, q_len, k_len, hq, hk, dq, dv)


def seed_dims(q_shape, k_shape, v_shape) -> Dims:
    """Dims of query ``[B..., L, H, D]``, key ``[B..., S, K, D]``, value ``[B..., S, K, E]``."""
    return _dims(
        q_shape,
        k_shape,
        v_shape,
        heads_axis=-2,
        length_axis=-3,
        legend=("[B..., L, H, D]", "[B..., S, K, D]", "[B..., S, K, E]"),
        allow_gqa=True,
        gqa_hint="",
        layout_hint=(
            ". These functions take the seed layout [B..., L, H, D] (length before heads): "
            "heads-first tensors [B, H, L, D] (torch SDPA, FlexAttention) need .transpose(-3, -2) "
            "(or use memory_efficient_attention.torch.scaled_dot_product_attention), "
            "sequence-first tensors [L, B, H, D] need .movedim(0, -3)"
        ),
    )


def heads_first_dims(q_shape, k_shape, v_shape, *, enable_gqa: bool) -> Dims:
    """Dims of query ``[B..., H, L, D]``, key ``[B..., K, S, D]``, value ``[B..., K, S, E]``."""
    return _dims(
        q_shape,
        k_shape,
        v_shape,
        heads_axis=-3,
        length_axis=-2,
        legend=("[B..., H, L, D]", "[B..., K, S, D]", "[B..., K, S, E]"),
        allow_gqa=enable_gqa,
        gqa_hint="pass enable_gqa=True for grouped-query attention",
        layout_hint=(
            ". This function takes torch SDPA's layout [B..., H, L, D] (heads before length): "
            "tensors in the seed layout [B, L, H, D] need .transpose(-3, -2) (or use "
            "efficient_dot_product_attention)"
        ),
    )


def operand_shape(name: str, shape: Sequence[int], dims: Dims) -> tuple[int, int, int, int]:
    """Check that a mask/bias of ``shape`` broadcasts to ``[B..., H, L, S]``.

    Returns its kernel shape ``(Zb, Hb, Lb, Sb)``: each size 1 or the full size. A batch part that
    mixes broadcast and full dims (say ``(1, 3)`` against ``(2, 3)``) maps to ``Zb = Z``; the
    framework code expands it before flattening.
    """
    target = dims.mask_shape()
    shape = tuple(int(s) for s in shape)
    need = f"{describe(target)} = [B..., H, L, S]"
    if len(shape) > len(target):
        raise AttentionInputError(
            f"{name} has shape {describe(shape)} with {len(shape)} dims, more than the "
            f"{len(target)} of the shape it must broadcast to, {need}"
        )
    padded = (1,) * (len(target) - len(shape)) + shape
    for have, want in zip(padded, target):
        if have not in (1, want):
            raise AttentionInputError(
                f"{name} has shape {describe(shape)}, which does not broadcast to {need}; "
                "each dim must be 1 or equal to the target's"
            )
    nb = len(dims.batch)
    zb = 1 if all(s == 1 for s in padded[:nb]) else dims.batch_size
    return (zb, *padded[nb:])


def padded_operand_shape(shape: Sequence[int], dims: Dims) -> tuple[int, ...]:
    """``shape`` with leading 1s to the rank of ``[B..., H, L, S]`` and, where its batch part
    mixes 1s and full sizes, the batch part expanded (what the framework code expands to)."""
    target = dims.mask_shape()
    padded = (1,) * (len(target) - len(shape)) + tuple(int(s) for s in shape)
    nb = len(dims.batch)
    if any(s != 1 for s in padded[:nb]):
        padded = (*dims.batch, *padded[nb:])
    return padded


def resolve_scale(scale, depth: int) -> float:
    """``scale`` as a Python float (default ``1/sqrt(depth)``).

    Accepts any real number: ``float``, ``int``, numpy scalars and concrete 0-d arrays (torch,
    numpy or jax). A traced scale (under ``jax.jit``) cannot be static: the JAX functions take it
    apart before calling this."""
    if scale is None:
        return 1.0 / math.sqrt(depth)
    if isinstance(scale, (bool, str, bytes)):
        raise AttentionInputError(f"scale must be a real number or None, got {scale!r}")
    shape = getattr(scale, "shape", ())
    if tuple(shape) != ():
        raise AttentionInputError(f"scale must be a scalar, got an array of shape {describe(shape)}")
    dtype_name = str(getattr(scale, "dtype", "float")).lower()
    if "complex" in dtype_name or "bool" in dtype_name:
        raise AttentionInputError(f"scale must be a real number or None, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise AttentionInputError(f"scale must be a real number or None, got {scale!r}") from None
    if not math.isfinite(value):
        raise AttentionInputError(f"scale must be finite, got {scale!r}")
    return value


def check_chunk_size(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise AttentionInputError(f"{name} must be a positive int or None, got {value!r}")
    if not isinstance(value, int):
        # numpy integers are fine: accept anything that indexes like an int
        try:
            value = int(value.__index__())  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            raise AttentionInputError(f"{name} must be a positive int or None, got {value!r}") from None
    if value <= 0:
        raise AttentionInputError(f"{name} must be a positive int or None, got {value}")
    return value


def check_float_dtypes(names_and_dtypes: Sequence[tuple[str, str]], *, same: bool = True) -> str:
    """Check that q/k/v (name, dtype name) pairs are floating point and, with ``same``, equal.

    Returns the common dtype name."""
    for name, dt in names_and_dtypes:
        if dt not in FLOAT_DTYPES:
            raise AttentionInputError(
                f"{name} must be a floating-point tensor ({', '.join(FLOAT_DTYPES)}), got dtype {dt}"
            )
    first_name, first = names_and_dtypes[0]
    if same:
        for name, dt in names_and_dtypes[1:]:
            if dt != first:
                raise AttentionInputError(
                    f"{first_name} has dtype {first} but {name} has dtype {dt}; "
                    "query, key and value need one dtype (cast them first)"
                )
    return first


def additive_mask_error(name: str, dtype, noun: str = "tensor") -> AttentionInputError:
    """The error for a float ``mask`` holding values other than 0 and 1. A mask keeps a score
    where it is nonzero (the seed's and Flax's rule), so an additive 0/-inf mask given as ``mask``
    would silently come out inverted; both frameworks refuse it with this message."""
    return AttentionInputError(
        f"{name} is a float {noun} (dtype {dtype}) with values other than 0 and 1: a {name} keeps "
        f"a score where it is True/nonzero, so an additive mask (0 / -inf or 0 / -1e9) would be "
        f"inverted; pass additive masks as bias=, or a bool {name}"
    )


def check_dropout(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise AttentionInputError(f"dropout rate must be a float in [0, 1), got {rate!r}")
    return float(rate)


def check_softcap(cap: float | None) -> float | None:
    """A soft cap ``cap * tanh(score / cap)``: a positive finite number, or None for no cap
    (``math.inf`` would give ``inf * tanh(0)`` = NaN; pass None instead)."""
    if cap is None:
        return None
    if isinstance(cap, (bool, str, bytes)):
        raise AttentionInputError(f"logits_soft_cap must be a positive float or None, got {cap!r}")
    try:
        value = float(cap)
    except (TypeError, ValueError):
        raise AttentionInputError(f"logits_soft_cap must be a positive float or None, got {cap!r}") from None
    if math.isinf(value) and value > 0:
        raise AttentionInputError(
            "logits_soft_cap=inf is not a cap (inf * tanh(score / inf) is NaN); pass None for no cap"
        )
    if not value > 0 or not math.isfinite(value):
        raise AttentionInputError(f"logits_soft_cap must be a positive finite float or None, got {cap!r}")
    return value


# --------------------------------------------------------------------------------------------
# Results of user callables (score_mod, mask_mod and the seed's per-chunk callbacks)
# --------------------------------------------------------------------------------------------


def _dtype_kind(value) -> str | None:
    """``"bool"``, ``"int"``, ``"float"``, ``"complex"`` or None, read off any framework's dtype
    name (``torch.float32``, ``float32``, ``bfloat16``, ``bool``) or a Python scalar."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.").lower()
    for kind in ("bool", "complex", "float", "int"):
        if kind in name:
            return kind
    return None


def check_callable_result(name: str, value, need: Sequence[int], legend: str, *, want: str) -> None:
    """Check what a user callable returned before the kernel uses it.

    ``want`` is ``"bool"`` (a mask: bool only) or ``"float"`` (scores, biases, weights: float or
    integer values). ``need`` is the shape the result must broadcast to, ``legend`` names its
    axes. Python scalars of the right kind are accepted (they broadcast). Raises ``TypeError`` for
    a wrong type or dtype and ``AttentionInputError`` for a shape that does not broadcast.

    >>> check_callable_result("mask_mod", None, (2, 8), "[lc, kc]", want="bool")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: mask_mod returned None; it must return a bool array ... (did you forget `return`?)
    """
    need = tuple(int(s) for s in need)
    target = f"{describe(need)} = {legend}"
    if value is None:
        raise TypeError(
            f"{name} returned None; it must return a {want} array broadcastable to {target} "
            "(did you forget `return`?)"
        )
    kind = _dtype_kind(value)
    ok = ("bool",) if want == "bool" else ("float", "int")
    if kind not in ok:
        what = f"dtype {value.dtype}" if hasattr(value, "dtype") else f"a {type(value).__name__}"
        hint = " (compare, e.g. q_idx >= kv_idx, to get one)" if want == "bool" else ""
        raise TypeError(f"{name} must return a {want} array broadcastable to {target}, got {what}{hint}")
    shape = tuple(int(s) for s in getattr(value, "shape", ()))
    padded = (1,) * (len(need) - len(shape)) + shape
    if len(shape) > len(need) or any(have not in (1, want_) for have, want_ in zip(padded, need)):
        raise AttentionInputError(
            f"{name} returned shape {describe(shape)}, which does not broadcast to {target}; "
            "each dim must be 1 or equal to the target's"
        )
