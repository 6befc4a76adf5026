"""Public JAX functions.

Shape legend (``memory_efficient_attention._spec``): ``B...`` batch dims (any number, or none),
``L`` query length, ``S`` key length, ``H`` query heads, ``K`` key/value heads (``H % K == 0``),
``D`` query/key depth, ``E`` value depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from .._config import CallArrays, CallOptions, make_config
from .._spans import check_engine
from .._spec import (
    AttentionInputError,
    Dims,
    additive_mask_error,
    check_float_dtypes,
    check_page_range,
    check_sinks,
    describe,
    operand_shape,
    padded_operand_shape,
    paged_key_shapes,
    seed_dims,
)
from ._function import chunked_attention
from ._kernel import _FEW_ROWS, Mods, Operands, attention_forward, close_mods, log_sum_exp, no_key

AUTODIFF = ("vjp", "native")

__all__ = ["dot_product_attention", "efficient_dot_product_attention"]


def _dtype_name(x) -> str:
    return jnp.dtype(x.dtype).name


def _check_qkv(query, key, value):
    arrays = []
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        arrays.append(jnp.asarray(x))
    check_float_dtypes([(n, _dtype_name(x)) for n, x in zip(("query", "key", "value"), arrays)])
    return arrays


def _operand(name: str, x, dims: Dims, *, boolean: bool):
    """A mask/bias broadcastable to ``[B..., H, L, S]`` -> kernel shape ``[Zb, Hb, Lb, Sb]``."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if boolean:
        if x.dtype != jnp.bool_:
            x = x != 0  # Flax's rule: any nonzero value keeps
    elif not jnp.issubdtype(x.dtype, jnp.floating):
        raise AttentionInputError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    kernel_shape = operand_shape(name, x.shape, dims)
    x = x.reshape((1,) * (len(dims.mask_shape()) - x.ndim) + x.shape)
    return jnp.broadcast_to(x, padded_operand_shape(x.shape, dims)).reshape(kernel_shape)


def _arrays(**named) -> dict:
    """Array arguments given as lists or scalars, as JAX arrays (None and arrays unchanged)."""
    return {
        name: x if x is None or isinstance(x, (jax.Array, np.ndarray)) else jnp.asarray(x)
        for name, x in named.items()
    }


def _int_array(name: str, x):
    if x is None:
        return None
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise AttentionInputError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x


def _dropout_key(rng):
    if rng is None:
        raise AttentionInputError("dropout_rate > 0 needs dropout_rng (a jax.random key)")
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise AttentionInputError(
            f"dropout_rng must be a jax.random.key or PRNGKey, got dtype {rng.dtype} shape "
            f"{describe(rng.shape)}"
        )
    return rng


def _check_mask_values(mask) -> None:
    """A float ``mask`` keeps a score where it is nonzero (Flax's rule), so an additive 0/-inf
    mask would silently come out inverted: refuse one holding anything but 0 and 1. Only concrete
    values can be checked; a mask traced under ``jit``/``vmap``/``grad`` is taken as given.
    Integer masks are not checked (as in the torch function)."""
    if mask is None or isinstance(mask, jax.core.Tracer):
        return
    if not hasattr(mask, "dtype"):
        mask = np.asarray(mask)
    if not jnp.issubdtype(mask.dtype, jnp.floating) or mask.size == 0:
        return
    if not bool(jnp.all((mask == 0) | (mask == 1))):
        raise additive_mask_error("mask", mask.dtype, "array")


def _fold_array_scale(q, scale):
    """A ``scale`` that is a JAX array (traced under ``jit``, or concrete) cannot be a static
    number: multiply the query by it (in the query's dtype, as the kernel applies a static scale)
    and run the kernel with scale 1. Gradients w.r.t. the query and the scale then flow through
    this product. Returns ``(q, static scale or None)``."""
    if not isinstance(scale, jax.Array):
        return q, scale
    if scale.shape != ():
        raise AttentionInputError(f"scale must be a scalar, got an array of shape {describe(scale.shape)}")
    if not (jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer)):
        raise AttentionInputError(f"scale must be a real number or None, got an array of dtype {scale.dtype}")
    return q * scale.astype(q.dtype), 1.0


# Eager calls (outside any JAX transformation) run one ``jax.jit``-compiled function per static
# configuration: without it every eager call re-traces the chunk loops (``lax.scan`` of fresh
# closures), compiles them again and keeps the executables (~1 s and ~2 MiB a call).
_DYNAMIC = object()  # marks an array leaf in the static key


def _at_top_level() -> bool:
    """True outside every JAX trace (``jit``, ``grad``, ``vmap``, ...). Under a trace the
    functions run inline: user callables may close over that trace's tracers, which a cached
    compiled function must never capture. Unknown (private API moved): False, i.e. inline."""
    try:
        from jax._src import core

        return bool(core.trace_state_clean())
    except Exception:  # pragma: no cover - depends on the JAX version
        return False


@partial(jax.jit, static_argnums=(0, 1, 2))
def _compiled(impl, treedef, key, dynamic):
    arrays = iter(dynamic)
    leaves = [next(arrays) if k is _DYNAMIC else k[1] for k in key]
    return impl(**jax.tree.unflatten(treedef, leaves))


def _dispatch(impl, kwargs: dict):
    """``impl(**kwargs)``; at top level through ``_compiled``: array leaves (anywhere in the
    arguments, ``calc_fn_data`` included) are its traced inputs, every other leaf (numbers,
    strings, callables by identity) and the tree structure are the static key, so a repeated eager
    call with the same shapes and static arguments reuses one executable, as ``jax.jit`` would.
    Callables are keyed by identity: like any jitted function, they must be pure."""
    if not _at_top_level():
        return impl(**kwargs)
    leaves, treedef = jax.tree.flatten(kwargs)
    dynamic, key = [], []
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            if isinstance(leaf, jax.core.Tracer):  # a leaked tracer: let JAX report it inline
                return impl(**kwargs)
            dynamic.append(leaf)
            key.append(_DYNAMIC)
        else:
            key.append((type(leaf), leaf))  # the type too: True and 1 must not share an entry
    key = tuple(key)
    try:
        hash(key)
    except TypeError:  # an unhashable static argument: no cache entry, run eagerly
        return impl(**kwargs)
    return _compiled(impl, treedef, key, tuple(dynamic))


# Decoding (few query rows per key/value head, see _kernel._FEW_ROWS): all keys in one chunk when
# its scores stay this small. One block-diagonal GEMM per product then replaces a scan (1 x 65536
# keys, 8 heads: 28 ms with one chunk, 43 ms with 4096-key chunks, 70 ms with 16384).
_DECODING_SCORES = 2**21


def _decoding_chunks(options: CallOptions, dims: Dims) -> CallOptions:
    few_rows = dims.q_len * dims.groups <= _FEW_ROWS
    small = dims.batch_size * dims.q_heads * dims.q_len * dims.kv_len <= _DECODING_SCORES
    automatic = options.key_chunk_size is None and options.memory_budget is None
    if few_rows and small and automatic and options.local_window_size is None and dims.kv_len > 0:
        return dataclasses.replace(options, key_chunk_size=dims.kv_len)
    return options


def _attention(q5, k4, v4, dims: Dims, options: CallOptions, arrays: CallArrays | None = None,
               mods: Mods | None = None, *, dropout_rng=None, calc_fn_data=None, autodiff="vjp"):  # fmt: skip
    """Validate the rest, build the config and run the kernel on q/k/v in its layout ([Z, L, H, ...]).

    ``options``: the call's validated static options (a JAX-array scale already folded into
    ``q5``, see ``_fold_array_scale``); ``arrays``: its optional arrays; ``mods``: its callables
    and matmul precision.

    Returns ``(out, lse)``; ``lse`` is finite, ``finfo.min`` for a row with no key left
    (``_kernel.no_key``), so no inf arises unless a caller makes one (``jax.debug_infs``)."""
    arrays = arrays or CallArrays()
    mods = Mods(precision=None) if mods is None else mods  # (the default precision of this layer)
    ints = CallArrays(
        query_seq_lengths=_int_array("query_seq_lengths", arrays.query_seq_lengths),
        key_value_seq_lengths=_int_array("key_value_seq_lengths", arrays.key_value_seq_lengths),
        query_segment_ids=_int_array("query_segment_ids", arrays.query_segment_ids),
        key_segment_ids=_int_array("key_segment_ids", arrays.key_segment_ids),
    )
    qlen, kvlen = ints.query_seq_lengths, ints.key_value_seq_lengths
    qseg, kvseg = ints.query_segment_ids, ints.key_segment_ids
    options = _decoding_chunks(options, dims)
    cfg = make_config(dims, _dtype_name(q5), options, jax.default_backend(), ints.shapes(), mods.mask_mod)
    if mods.score_mod is not None and not callable(mods.score_mod):
        raise AttentionInputError(
            f"score_mod must be callable(score, b, h, q_idx, kv_idx), got {mods.score_mod!r}"
        )
    z = dims.batch_size
    ops = Operands(
        q5,
        k4,
        v4,
        _operand("bias", arrays.bias, dims, boolean=False),
        _operand("mask", arrays.mask, dims, boolean=True),
        None if qlen is None else qlen.reshape(z),
        None if kvlen is None else kvlen.reshape(z),
        None if qseg is None else qseg.reshape(z, dims.q_len),
        None if kvseg is None else kvseg.reshape(z, dims.kv_len),
        calc_fn_data,
        _dropout_key(dropout_rng) if cfg.dropout else None,
    )
    # score_mod/mask_mod closure-converted: traced values they close over become operands
    user_mods = mods
    mods, consts = close_mods(cfg, mods)
    ops = ops._replace(consts=consts)
    if autodiff not in AUTODIFF:
        raise AttentionInputError(f"autodiff must be one of {AUTODIFF}, got {autodiff!r}")
    if autodiff == "native":  # JAX differentiates the chunked loops itself, in every mode
        out, row_max, row_sum = attention_forward(cfg, mods, ops)
        return out, log_sum_exp(row_max, row_sum, finite=True)
    if _use_pallas(cfg, mods, ops):  # (its kernels trace the user's own callables, shape-free)
        from ._pallas import pallas_attention

        return pallas_attention(cfg, user_mods, ops)
    return chunked_attention(cfg, mods, ops)


# ``engine="auto"`` picks the Pallas kernel on these platforms once a device run has validated it
# (``scripts/device-check.sh``); until then it is opt-in everywhere (``engine="pallas"``).
PALLAS_AUTO_PLATFORMS: tuple[str, ...] = ()


def _use_pallas(cfg, mods, ops) -> bool:
    """Whether the call runs on the Pallas engine: ``engine="pallas"`` (an error if it cannot),
    or ``"auto"`` on a platform of ``PALLAS_AUTO_PLATFORMS`` where it can."""
    if cfg.engine not in ("pallas", "auto") or cfg.dims.empty:
        if cfg.engine == "pallas":
            raise AttentionInputError("engine='pallas' needs non-empty batch, query and key axes")
        return False
    if cfg.engine == "auto" and jax.default_backend() not in PALLAS_AUTO_PLATFORMS:
        return False
    from ._pallas import refusal

    reason = refusal(cfg, mods, ops)
    if reason is not None and cfg.engine == "pallas":
        raise AttentionInputError(
            f"engine='pallas' cannot run this call: it has {reason}; pass engine='auto' or 'chunked'"
        )
    return reason is None


def efficient_dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    mask: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    precision: lax.PrecisionLike = lax.Precision.HIGHEST,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    bias_calc_fn: Callable | None = None,
    mask_calc_fn: Callable | None = None,
    weights_calc_fn: Callable | None = None,
    calc_fn_data: Any = None,
    *,
    scale: float | ArrayLike | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    local_window_size: int | tuple[int, int] | None = None,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    query_segment_ids: ArrayLike | None = None,
    key_segment_ids: ArrayLike | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: ArrayLike | None = None,
    return_lse: bool = False,
    memory_budget: int | str | None = None,
    autodiff: str = "vjp",
    engine: str = "auto",
    sinks: ArrayLike | None = None,
    return_weights: bool = False,
    block_table: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """Exact attention in O(n) memory, forward and backward (seed-compatible signature).

    Args:
      query: ``[B..., L, H, D]``.
      key: ``[B..., S, K, D]``; ``K`` divides ``H`` (grouped-query attention without repeating
        K/V: query head ``h`` uses key/value head ``h // (H // K)``).
      value: ``[B..., S, K, E]``.
      mask: bool, broadcastable to ``[B..., H, L, S]``; False masks a score to ``finfo.min`` (the
        seed's and Flax's rule: a row masked everywhere averages the values). A numeric mask
        keeps where nonzero (Flax's rule); a float one must hold only 0 and 1: anything else (an
        additive 0 / -inf mask belongs in ``bias``) raises ``AttentionInputError``, where the
        values are concrete (a mask traced under ``jit`` cannot be checked). Dense masks cost
        O(L*S) memory: prefer the structured arguments below. Or a mask object of
        ``memory_efficient_attention.masks`` (``Causal() & Window(128)``...): it stands for the
        structured arguments (``to_kwargs``; one given explicitly with another value raises).
      bias: float, broadcastable to ``[B..., H, L, S]``, added to the scores; gets a gradient.
      precision: ``jax.lax.Precision`` of the matmuls (default HIGHEST).
      query_chunk_size, key_chunk_size: chunk sizes; None chooses them from the shapes and
        ``memory_budget`` (see the README). Any length works: the last chunk is shorter.
      bias_calc_fn, mask_calc_fn, weights_calc_fn, calc_fn_data: the seed's per-chunk callbacks,
        called once per (query chunk, key chunk) with ``attn_weights`` ``[B..., lc, H, kc]``
        and traced offsets (see the torch function for their signatures). Traced values reach
        them through ``calc_fn_data``, whose float leaves get gradients.
      scale, is_causal, causal_alignment, local_window_size, query_seq_lengths,
      key_value_seq_lengths, query_segment_ids, key_segment_ids, score_mod, mask_mod,
      logits_soft_cap: as in ``memory_efficient_attention.torch.efficient_dot_product_attention``.
        ``score_mod``/``mask_mod`` are traced once per call on ``[Z, K, q_chunk, G, k_chunk]``
        grids and may close over arrays, traced ones too (a learnable ALiBi slope): those are
        taken out with ``jax.closure_convert`` and get gradients under ``grad``. Their results
        are checked (dtype, a shape broadcastable to that grid), as are the callbacks'.
      dropout_rate, dropout_rng: dropout on the normalised probabilities from a ``jax.random``
        key; the backward regenerates the keep mask instead of storing it.
      return_lse: also return the log-sum-exp of each row, ``[B..., L, H]`` (float32; float64 for
        float64 inputs), ``-inf`` for a row with no key left. It is differentiable.
      memory_budget: bytes or a string like ``"512MB"`` for the automatic chunk sizes.
      autodiff: ``"vjp"`` (default): a ``custom_vjp`` with the chunked FlashAttention-2 backward
        (reverse mode in O(n) memory; ``grad`` of ``grad`` works too). JAX refuses forward mode
        (``jvp``, ``jacfwd``, ``hessian``, ``linearize``) on any ``custom_vjp``, so
        ``"native"`` lets JAX differentiate the chunked loops itself: forward mode then runs
        chunk by chunk in O(n) memory, and every mode and order works, but reverse mode in this
        setting stores each chunk's probabilities (memory like dense attention).
      engine: ``"auto"`` (default) or ``"chunked"``: the chunked engine (XLA loops, every
        feature, every platform); ``"pallas"``: one fused Pallas kernel per pass with the score
        pipeline inside (``jax._pallas``: structured masks with block skipping, lengths, segment
        ids, soft cap, bias with its gradient, dropout, ``score_mod``/``mask_mod``, GQA, lse;
        not a dense boolean mask, the seed's callbacks, or callables that close over traced
        arrays: those raise). It runs
        interpreted on CPU (slow: for tests and debugging) and compiled on GPU/TPU, where it has
        not run yet, so ``"auto"`` does not pick it. ``"fused"`` raises (the PyTorch functions'
        name for torch's fused CPU kernel).
      sinks: ``[H]`` attention-sink logits (gpt-oss, StreamingLLM): one extra logit per head in
        every row's softmax that takes probability mass but has no value; differentiable. With
        ``return_lse`` the lse includes the sink.
      return_weights: also return the attention probabilities ``[B..., H, L, S]`` (before
        dropout, with every mask, bias and callable of the call; differentiable), computed a
        block of keys at a time by the same kernel: an O(L*S) result by the caller's choice.
        Returned last.
      block_table: integer ``[B..., n]``: a paged KV cache. ``key``/``value`` are then page pools
        ``[P, page, K, D]`` / ``[P, page, K, E]`` and row ``b`` sees its pages ``block_table[b]``
        in order (``n * page`` keys; pass ``key_value_seq_lengths`` for how many are filled).
        Only the rows' own pages are read (one gather of O(their pages)); gradients flow back
        into the pools. Concrete tables are checked against the pool size.

    ``scale`` may be a number, a numpy scalar or a 0-d JAX array, traced too (under ``jit``,
    with a gradient): an array scale multiplies the query before the kernel.

    Structured masks exclude keys: a query row with no key left outputs 0 with zero gradient.
    Works under ``jit``, ``vmap``, ``grad`` (and ``grad`` of ``grad``). Called eagerly (outside
    any transformation), it runs one ``jax.jit``-compiled function per static configuration
    (shapes, dtypes, the non-array arguments, callables by identity), so repeated eager calls do
    not recompile; as with ``jax.jit``, callables must be pure (a global they read is baked in).

    Returns:
      ``[B..., L, H, E]`` in the input dtype (and the lse with ``return_lse``).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from memory_efficient_attention.jax import efficient_dot_product_attention
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 100, 4, 16))
        >>> out = efficient_dot_product_attention(q, k, v, is_causal=True, key_chunk_size=32)
        >>> out.shape
        (2, 100, 4, 16)
        >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
    """
    kwargs = dict(locals())  # every argument (nothing else is defined yet)
    query, key, value = _check_qkv(query, key, value)
    if kwargs.pop("block_table") is not None:
        key, value = kwargs["key"], kwargs["value"] = _gather_pages(query, key, value, block_table)
    if sinks is not None:
        sinks = jnp.asarray(sinks)
        check_sinks(tuple(sinks.shape), _dtype_name(sinks), seed_dims(query.shape, key.shape, value.shape))
        kwargs["sinks"] = sinks
    if check_engine(engine) in ("fused", "flex"):
        raise AttentionInputError(
            f"engine={engine!r} is the PyTorch functions' (torch's fused kernels, FlexAttention); "
            "JAX takes engine='auto' or 'chunked' (the chunked engine) or 'pallas'"
        )
    from ..masks import merge_mask_kwargs  # a mask object (masks.Causal, ...) -> the keywords

    mask, kwargs = merge_mask_kwargs(mask, kwargs, query.shape, key.shape)
    kwargs.update(query=query, key=key, value=value, **_arrays(mask=mask, bias=bias,
        **{n: kwargs[n] for n in ("query_seq_lengths", "key_value_seq_lengths", "query_segment_ids",
        "key_segment_ids")}))  # fmt: skip
    _check_mask_values(kwargs["mask"])
    return _dispatch(_efficient_dot_product_attention, kwargs)


def _gather_pages(query, key, value, block_table):
    """The keys and values of each row of a paged cache, ``[B..., n * page, K, D|E]``: one
    gather of the rows' own pages (``_spec.paged_key_shapes``)."""
    pages = jnp.asarray(block_table)
    k_shape, v_shape = paged_key_shapes(query.shape, key.shape, value.shape, pages.shape, _dtype_name(pages))
    if not isinstance(pages, jax.core.Tracer) and pages.size:
        check_page_range(int(pages.min()), int(pages.max()), key.shape[0])
    return key[pages].reshape(k_shape), value[pages].reshape(v_shape)


def _efficient_dot_product_attention(
    *, query, key, value, mask, bias, precision, query_chunk_size, key_chunk_size, bias_calc_fn,
    mask_calc_fn, weights_calc_fn, calc_fn_data, scale, is_causal, causal_alignment,
    local_window_size, query_seq_lengths, key_value_seq_lengths, query_segment_ids,
    key_segment_ids, score_mod, mask_mod, logits_soft_cap, dropout_rate, dropout_rng, return_lse,
    memory_budget, autodiff, engine, sinks, return_weights,
):  # fmt: skip
    """The body of ``efficient_dot_product_attention`` (compiled once per static configuration
    when called eagerly, see ``_dispatch``)."""
    dims = seed_dims(query.shape, key.shape, value.shape)
    z, kh = dims.batch_size, dims.kv_heads
    q4 = query.reshape(z, dims.q_len, dims.q_heads, dims.qk_depth)
    k4 = key.reshape(z, dims.kv_len, kh, dims.qk_depth)
    v4 = value.reshape(z, dims.kv_len, kh, dims.v_depth)
    q4, scale = _fold_array_scale(q4, scale)
    options = CallOptions(
        scale=scale, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
        memory_budget=memory_budget, is_causal=is_causal, causal_alignment=causal_alignment,
        local_window_size=local_window_size, mask_fill="min", logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate, engine=engine,
    )  # fmt: skip
    arrays = CallArrays(
        mask=mask, bias=bias, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, query_segment_ids=query_segment_ids,
        key_segment_ids=key_segment_ids,
    )  # fmt: skip
    mods = Mods(score_mod, mask_mod, bias_calc_fn, mask_calc_fn, weights_calc_fn, precision)
    out, lse = _attention(
        q4, k4, v4, dims, options, arrays, mods, dropout_rng=dropout_rng, calc_fn_data=calc_fn_data,
        autodiff=autodiff,
    )  # fmt: skip
    weights = None
    if return_weights:
        no_dropout = dataclasses.replace(options, dropout_rate=0.0)
        weights = _attention_weights(
            q4, k4, dims, no_dropout, arrays, mods, calc_fn_data=calc_fn_data, autodiff=autodiff
        )
    if sinks is not None:  # (_spec.check_sinks): out * sigmoid(lse - sink), logaddexp(lse, sink)
        sink = jnp.asarray(sinks).astype(lse.dtype)
        keep = jax.nn.sigmoid(lse - sink)  # [Z, L, H]
        out = (out.astype(lse.dtype) * keep[..., None]).astype(out.dtype)
        if weights is not None:
            weights = (weights * jnp.swapaxes(keep, 1, 2)[..., None]).astype(weights.dtype)
        lse = jnp.where(no_key(lse), sink + jnp.zeros_like(lse), jnp.logaddexp(lse, sink))
    results = [out.reshape(*dims.batch, dims.q_len, dims.q_heads, dims.v_depth)]
    if return_lse:
        lse = jnp.where(no_key(lse), -jnp.inf, lse)  # the documented lse of a row with no key
        results.append(lse.reshape(*dims.batch, dims.q_len, dims.q_heads))
    if return_weights:
        results.append(weights.reshape(*dims.batch, *weights.shape[1:]))
    return results[0] if len(results) == 1 else tuple(results)


def _attention_weights(q4, k4, dims: Dims, options: CallOptions, arrays: CallArrays, mods, **extra):
    """The probabilities ``[Z, H, L, S]`` of a call, by the kernel itself: with one-hot values
    (value column ``c`` is key ``j0 + c``) it gives columns ``j0...`` of the probability matrix
    with the call's masks, bias, callables and rules; keys go ``width`` at a time, so no ``S x S``
    one-hot matrix is built (as ``torch._api.attention_weights``)."""
    z, kh, S = dims.batch_size, dims.kv_heads, dims.kv_len
    width = max(1, min(S, max(dims.q_len, 128)))
    blocks = []
    for j0 in range(0, S, width):
        c = min(width, S - j0)
        onehot = (jnp.arange(S)[:, None] == j0 + jnp.arange(c)[None, :]).astype(q4.dtype)  # [S, c]
        values = jnp.broadcast_to(onehot[None, :, None, :], (z, S, kh, c))
        block_dims = dataclasses.replace(dims, v_depth=c)
        p, _ = _attention(q4, k4, values, block_dims, options, arrays, mods, **extra)
        blocks.append(jnp.swapaxes(p, 1, 2))  # [Z, H, L, c]
    return jnp.concatenate(blocks, axis=-1)


def _check_cudnn() -> None:
    """``implementation="cudnn"`` where jax would fail: no CUDA GPU backend with cuDNN."""
    try:
        from jax._src.lib import cuda_versions
    except ImportError:  # pragma: no cover - depends on the JAX version
        cuda_versions = None
    if cuda_versions is None or jax.default_backend() != "gpu":
        raise RuntimeError(
            "cuDNN is not detected. implementation='cudnn' needs a CUDA GPU with cuDNN (backend "
            f"here: {jax.default_backend()}); pass implementation=None or 'xla' to run anywhere"
        )


def _large_negative(dtype) -> float:
    """``jax.nn.dot_product_attention``'s masked logit: -0.7 * max of the logits dtype, capped to
    the float32 range (logits are float32, or float64 for float64 inputs)."""
    logits = jnp.promote_types(dtype, jnp.float32)
    return -0.7 * min(float(jnp.finfo(logits).max), float(jnp.finfo(jnp.float32).max))


def dot_product_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | ArrayLike | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Drop-in for ``jax.nn.dot_product_attention`` with its exact semantics, in O(n) memory.

    Args:
      query: ``[B, T, N, H]`` or ``[T, N, H]``.
      key, value: ``[B, S, K, H]`` or ``[S, K, H]``; ``N % K == 0`` (grouped-query attention).
      bias: added to the logits, broadcastable to ``[B, N, T, S]``.
      mask: bool, broadcastable to ``[B, N, T, S]``; True takes part.
      scale: default ``1/sqrt(H)``; a number, a numpy scalar or a 0-d JAX array (traced under
        ``jit`` too, with a gradient).
      is_causal: top-left causal mask.
      query_seq_lengths, key_value_seq_lengths: integer ``[B]``.
      local_window_size: ``w`` or ``(left, right)``: query ``t`` sees keys ``t-left .. t+right``.
      implementation: None or ``"xla"``: our kernel. ``"cudnn"`` raises ``RuntimeError`` as jax
        does where no cuDNN GPU backend is present; where one is, our kernel runs in its place
        (cuDNN's flash attention is not called, and its shape/dtype limits do not apply).
        ``"pallas"`` (ours, not jax's): the Pallas engine (``engine="pallas"`` of
        ``efficient_dot_product_attention``; interpreted on CPU); a boolean ``mask`` refuses it.
      return_residual: also return the log-sum-exp ``[B, T, N]`` (no gradient), as jax does.

    As in jax, masked logits are a large finite negative number, so a row whose every key is
    masked returns the mean of the values; rows past ``query_seq_lengths`` are zero. Our kernel
    excludes masked keys (so it can skip whole blocks) and then applies exactly that rule.
    Empty shapes pass as in jax: ``B``, ``T`` or ``S`` may be 0 (``S = 0``: zeros, residual
    ``-inf``). Eager calls are compiled once per static configuration (see
    ``efficient_dot_product_attention``).

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from memory_efficient_attention.jax import dot_product_attention
        >>> q, k, v = jax.random.normal(jax.random.key(1), (3, 2, 300, 4, 32))
        >>> lengths = jnp.array([300, 120], dtype=jnp.int32)
        >>> out = dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
        >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
        >>> bool(jnp.allclose(out, ref, atol=1e-5))
        True
    """
    if implementation not in (None, "xla", "cudnn", "pallas"):
        raise AttentionInputError(f"Unsupported implementation option: {implementation!r}")
    if implementation == "cudnn":
        _check_cudnn()
    kwargs = dict(locals())  # every argument (and implementation checked)
    kwargs["engine"] = "pallas" if implementation == "pallas" else "auto"
    query, key, value = _check_qkv(query, key, value)
    kwargs.update(query=query, key=key, value=value, **_arrays(mask=mask, bias=bias,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths))  # fmt: skip
    del kwargs["implementation"]
    return _dispatch(_dot_product_attention, kwargs)


def _dot_product_attention(
    *, query, key, value, bias, mask, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
    local_window_size, return_residual, engine,
):  # fmt: skip
    """The body of ``dot_product_attention`` (compiled once per static configuration when called
    eagerly, see ``_dispatch``)."""
    output_shape = query.shape

    def ensure_4d(x):
        return x if x is None or x.ndim >= 4 else x.reshape((1,) * (4 - x.ndim) + x.shape)

    query, key, value = (ensure_4d(x) for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise AttentionInputError(
                f"{name} must be [B, T, N, H] or [T, N, H], got shape {describe(x.shape)}"
            )
    if value.shape[-1] != key.shape[-1]:
        # jax.nn.dot_product_attention needs value.shape == key.shape ([B, S, K, H]).
        raise AttentionInputError(
            f"value must have the depth H of key (jax.nn.dot_product_attention needs value shape "
            f"== key shape [B, S, K, H]): key has shape {describe(key.shape)} (H={key.shape[-1]}), "
            f"value has shape {describe(value.shape)} (H={value.shape[-1]}); for a different value "
            "depth use efficient_dot_product_attention"
        )
    if mask is not None:
        if mask.dtype != jnp.bool_:
            raise AttentionInputError(f"mask must be a bool array (True takes part), got dtype {mask.dtype}")
        mask = ensure_4d(mask)
    if bias is not None:
        bias = ensure_4d(bias)
    dims = seed_dims(query.shape, key.shape, value.shape)
    z, g = dims.batch_size, dims.groups
    q4, k4, v4 = query, key, value
    q4, scale = _fold_array_scale(q4, scale)
    options = CallOptions(
        scale=scale,
        is_causal=is_causal,
        local_window_size=local_window_size,
        mask_fill="exclude",
        engine=engine,
    )
    arrays = CallArrays(
        mask=mask, bias=bias, query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths
    )
    out, lse = _attention(q4, k4, v4, dims, options, arrays, Mods(precision=None))
    # jax's rule for rows with no key left: every logit is the same finite number, so the row
    # averages all values (and its lse is that number + log S).
    # With S = 0 there is nothing to average: jax gives zeros (and lse -inf), as the kernel does.
    empty = no_key(lse)  # [Z, T, N]
    if dims.kv_len:
        mean_v = v4.astype(jnp.promote_types(v4.dtype, jnp.float32)).mean(axis=1)  # [Z, K, H]
        mean_v = jnp.repeat(mean_v, g, axis=1)  # query head n = k * G + g
        out = jnp.where(empty[..., None], mean_v[:, None].astype(out.dtype), out)
    if query_seq_lengths is not None:
        rows = jnp.arange(dims.q_len).reshape(1, -1, 1, 1)
        out = out * (rows < jnp.asarray(query_seq_lengths).reshape(z, 1, 1, 1)).astype(out.dtype)
    out = out.reshape(output_shape)
    if not return_residual:
        return out
    large_neg = _large_negative(query.dtype)
    if dims.kv_len:
        lse = jnp.where(empty, large_neg + np.log(dims.kv_len), lse)
    else:
        lse = jnp.full_like(lse, -jnp.inf)
    lse = lax.stop_gradient(lse.reshape(output_shape[:-1]).astype(key.dtype))
    return out, lse
