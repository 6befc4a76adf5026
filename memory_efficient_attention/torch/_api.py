"""Public PyTorch functions.

Shape legend (``memory_efficient_attention._spec``): ``B...`` batch dims (any number, or none),
``L`` query length, ``S`` key length, ``H`` query heads, ``K`` key/value heads (``H % K == 0``),
``D`` query/key depth, ``E`` value depth.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .._config import CallArrays, CallOptions, make_config
from .._spec import (
    AttentionInputError,
    Dims,
    additive_mask_error,
    broadcast_shapes,
    check_float_dtypes,
    check_page_range,
    check_sinks,
    describe,
    heads_first_dims,
    operand_shape,
    padded_operand_shape,
    paged_key_shapes,
    seed_dims,
)
from . import _engines as engines
from ._function import Operands, chunked_attention
from ._kernel import Mods

__all__ = ["efficient_dot_product_attention", "explain", "scaled_dot_product_attention"]


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _check_qkv(query, key, value) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_float_dtypes([(n, _dtype_name(t)) for n, t in (("query", query), ("key", key), ("value", value))])
    devices = {t.device for t in (query, key, value)}
    if len(devices) > 1:
        raise AttentionInputError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )


def _operand(name: str, x, dims: Dims, like: torch.Tensor, *, boolean: bool) -> torch.Tensor | None:
    """A mask/bias broadcastable to ``[B..., H, L, S]`` -> kernel shape ``[Zb, Hb, Lb, Sb]``."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor) and x.device != like.device:
        raise AttentionInputError(f"{name} is on {x.device} but query is on {like.device}")
    x = torch.as_tensor(x, device=like.device)
    if boolean:
        if x.is_floating_point() and x.numel() and bool(((x != 0) & (x != 1)).any()):
            raise additive_mask_error(name, x.dtype)
        if x.dtype != torch.bool:
            x = x != 0  # Flax's rule: any nonzero value keeps
    elif not x.is_floating_point():
        raise AttentionInputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    zb, hb, lb, sb = operand_shape(name, x.shape, dims)
    x = x.reshape((1,) * (len(dims.mask_shape()) - x.dim()) + tuple(x.shape))
    x = x.expand(padded_operand_shape(x.shape, dims))
    return x.reshape(zb, hb, lb, sb)


def _int_array(name: str, x, like: torch.Tensor) -> torch.Tensor | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor) and x.device != like.device:
        raise AttentionInputError(
            f"{name} is on device {x.device} but query is on {like.device}; move it to {like.device}"
        )
    x = torch.as_tensor(x, device=like.device)
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise AttentionInputError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def _attention(
    q5: torch.Tensor,
    k4: torch.Tensor,
    v4: torch.Tensor,
    dims: Dims,
    options: CallOptions,
    arrays: CallArrays | None = None,
    mods: Mods | None = None,
    *,
    generator=None,
    operand_names: tuple[str, str] = ("mask", "bias"),
    sinks: torch.Tensor | None = None,
):
    """Validate the rest, build the config and run the kernel on kernel-layout q/k/v.

    ``options``: the call's validated static options; ``arrays``: its optional arrays; ``mods``:
    its callables (``score_mod``, ``mask_mod``, the seed's callbacks); ``sinks``: ``[H]``
    attention-sink logits (``_spec.check_sinks``)."""
    arrays = arrays or CallArrays()
    mods = mods or Mods()
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    ints = CallArrays(
        query_seq_lengths=_int_array("query_seq_lengths", arrays.query_seq_lengths, q5),
        key_value_seq_lengths=_int_array("key_value_seq_lengths", arrays.key_value_seq_lengths, q5),
        query_segment_ids=_int_array("query_segment_ids", arrays.query_segment_ids, q5),
        key_segment_ids=_int_array("key_segment_ids", arrays.key_segment_ids, q5),
    )
    qlen, kvlen, qseg, kvseg = (
        ints.query_seq_lengths,
        ints.key_value_seq_lengths,
        ints.query_segment_ids,
        ints.key_segment_ids,
    )
    cfg = make_config(dims, _dtype_name(q5), options, q5.device.type, ints.shapes(), mods.mask_mod)
    if mods.score_mod is not None and not callable(mods.score_mod):
        raise AttentionInputError(
            f"score_mod must be callable(score, b, h, q_idx, kv_idx), got {mods.score_mod!r}"
        )
    z = dims.batch_size
    ops = Operands(
        q5,
        k4,
        v4,
        _operand(operand_names[1], arrays.bias, dims, q5, boolean=False),
        _operand(operand_names[0], arrays.mask, dims, q5, boolean=True),
        None if qlen is None else qlen.reshape(z),
        None if kvlen is None else kvlen.reshape(z),
        None if qseg is None else qseg.reshape(z, dims.q_len),
        None if kvseg is None else kvseg.reshape(z, dims.kv_len),
    )
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor or None, got {type(sinks).__name__}")
    check_sinks(
        None if sinks is None else tuple(sinks.shape), None if sinks is None else _dtype_name(sinks), dims
    )
    if _PLAN_ONLY.get():
        raise _PlanReady(engines.explain(cfg, mods, ops))
    seed = 0
    if cfg.dropout:
        device = generator.device if generator is not None else q5.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    if cfg.engine == "flex":
        out, lse = engines.flex_attention(cfg, mods, ops)
    else:
        out, lse = chunked_attention(cfg, mods, seed, ops)
    return (out, lse) if sinks is None else _with_sinks(out, lse, sinks, dims)


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor, dims: Dims):
    """``(out * sigmoid(lse - sink), logaddexp(lse, sink))`` on kernel-layout ``out [Z, K, L, G, E]``
    and ``lse [Z, K, L, G]`` (``_spec.check_sinks``); differentiable in all three."""
    sink = sinks.to(device=lse.device, dtype=lse.dtype).view(1, dims.kv_heads, 1, dims.groups)
    keep = torch.sigmoid(lse - sink)
    return (out.to(lse.dtype) * keep.unsqueeze(-1)).to(out.dtype), torch.logaddexp(lse, sink)


class _PlanReady(Exception):
    """Carries ``explain``'s text out of ``_attention`` (nothing computed)."""


_PLAN_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("plan_only", default=False)


def explain(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> str:
    """The engine and plan that ``efficient_dot_product_attention(query, key, value, *args,
    **kwargs)`` would run, as text; the arguments are checked, nothing is computed.

    Example::

        >>> import torch
        >>> from memory_efficient_attention.torch import explain
        >>> q = torch.randn(1, 3000, 8, 64)
        >>> print(explain(q, q, q, is_causal=True, causal_alignment="bottom_right"))
        engine: fused (torch's flash-attention CPU kernel per span, merged by lse)
        SpanPlan(L=3000, S=3000, 1 query span, 1 calls: 0 full, 1 diagonal, 0 partial)
          q[0:3000]: diagonal k[0:3000]
        >>> print(explain(q[:, :8], q[:, :8], q[:, :8], logits_soft_cap=30.0, key_chunk_size=4))
        engine: chunked (not fused: a logits soft cap)
        BlockPlan(L=8, S=8, q_chunk=8, k_chunk=4, 1x2 chunks, 2 full, 0 partial, 0 empty)
          # #
    """
    token = _PLAN_ONLY.set(True)
    try:
        efficient_dot_product_attention(query, key, value, *args, **kwargs)
    except _PlanReady as plan:
        return str(plan)
    finally:
        _PLAN_ONLY.reset(token)
    raise AssertionError("explain: the call returned without reaching the kernel")  # pragma: no cover


def _gather_pages(query, key, value, block_table):
    """The keys and values of each row of a paged cache, ``[B..., n * page, K, D|E]``: one
    gather of the rows' own pages (``_spec.paged_key_shapes``)."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    k_shape, v_shape = paged_key_shapes(
        query.shape, key.shape, value.shape, block_table.shape, _dtype_name(block_table)
    )
    pages = block_table.to(device=key.device, dtype=torch.long)
    if pages.numel():
        check_page_range(int(pages.min()), int(pages.max()), key.shape[0])
    return key[pages].reshape(k_shape), value[pages].reshape(v_shape)


def efficient_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    bias_calc_fn: Callable | None = None,
    mask_calc_fn: Callable | None = None,
    weights_calc_fn: Callable | None = None,
    calc_fn_data: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    local_window_size: int | tuple[int, int] | None = None,
    query_seq_lengths: torch.Tensor | None = None,
    key_value_seq_lengths: torch.Tensor | None = None,
    query_segment_ids: torch.Tensor | None = None,
    key_segment_ids: torch.Tensor | None = None,
    score_mod: Callable | None = None,
    mask_mod: Callable | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0,
    generator: torch.Generator | None = None,
    return_lse: bool = False,
    memory_budget: int | str | None = None,
    engine: str = "auto",
    sinks: torch.Tensor | None = None,
    return_weights: bool = False,
    block_table: torch.Tensor | None = None,
):
    """Exact attention in O(n) memory, forward and backward (seed-compatible signature).

    Args:
      query: ``[B..., L, H, D]``.
      key: ``[B..., S, K, D]``; ``K`` divides ``H`` (grouped-query attention without repeating
        K/V: query head ``h`` uses key/value head ``h // (H // K)``).
      value: ``[B..., S, K, E]``.
      mask: bool, broadcastable to ``[B..., H, L, S]``; False masks a score to ``finfo.min`` (the
        seed's and Flax's rule: a row masked everywhere averages the values). Dense masks cost
        O(L*S) memory: prefer the structured arguments below. Or a mask object of
        ``memory_efficient_attention.masks`` (``Causal() & Window(128)``...): it stands for the
        structured arguments (``to_kwargs``; one given explicitly with another value raises).
      bias: float, broadcastable to ``[B..., H, L, S]``, added to the scores; gets a gradient.
      query_chunk_size, key_chunk_size: chunk sizes; None chooses them from the shapes and
        ``memory_budget`` (see the README). Any length works: the last chunk is shorter.
      bias_calc_fn, mask_calc_fn, weights_calc_fn, calc_fn_data: the seed's per-chunk callbacks,
        called once per (query chunk, key chunk) with ``attn_weights`` ``[B..., lc, H, kc]``:
        ``bias_calc_fn(q_offset, k_offset, bias_chunk, attn_weights, calc_fn_data) -> bias``,
        ``mask_calc_fn(q_offset, k_offset, mask_chunk, attn_weights, calc_fn_data) -> mask``
        (both ``[B..., H, lc, kc]``), ``weights_calc_fn(q_offset, k_offset, attn_weights,
        calc_fn_data) -> attn_weights``.
      scale: score scale, default ``1/sqrt(D)``.
      is_causal: keep key ``k`` for query ``q`` iff ``k <= q + a``; ``causal_alignment``
        ``"top_left"`` (``a = 0``) or ``"bottom_right"`` (``a = S - L``: the last query sees the
        last key, as with a KV cache).
      local_window_size: ``w`` or ``(left, right)``: keep ``q + a - left <= k <= q + a + right``.
      query_seq_lengths, key_value_seq_lengths: integer ``[B...]``: positions at or past the
        length are padding (excluded).
      query_segment_ids, key_segment_ids: integer ``[B..., L]`` / ``[B..., S]``: a query sees only
        keys of its own segment (packed documents).
      score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on broadcastable index tensors
        (``b`` indexes the flattened batch, ``h`` the query head); see
        ``memory_efficient_attention.masks``.
      mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` likewise; False excludes the key.
      logits_soft_cap: ``cap * tanh(score / cap)`` before bias and masks.
      dropout_rate, generator: dropout on the normalised probabilities, reproducible from the
        generator's state; the backward regenerates the keep mask instead of storing it.
      return_lse: also return the log-sum-exp of each row, ``[B..., L, H]`` in float32 (float64
        for float64 inputs); ``-inf`` for a row with no key left. It is differentiable.
      memory_budget: bytes or a string like ``"512MB"`` for the automatic chunk sizes.
      engine: ``"auto"`` (default), ``"fused"``, ``"chunked"`` or ``"flex"``. ``"auto"`` runs
        torch's fused kernels (flash-attention on CPU; FlashAttention-2 and the memory-efficient
        kernel on CUDA) on large spans merged by their lse when the call needs no per-element
        work of ours (no ``score_mod``, callbacks, soft cap, dropout, bias gradient, seed-rule
        dense mask, or value depth != key depth), and the chunked engine otherwise; ``"fused"``
        raises if it cannot. ``"flex"`` hands the whole call, ``score_mod`` and ``mask_mod``
        included, to ``torch.nn.attention.flex_attention`` (compiled on CUDA; on CPU forward
        only; its own autograd: no forward mode or double backward). ``explain(...)`` prints the
        choice and the plan.
      sinks: ``[H]`` attention-sink logits (gpt-oss, StreamingLLM): one extra logit per head in
        every row's softmax that takes probability mass but has no value; differentiable. With
        ``return_lse`` the lse includes the sink.
      return_weights: also return the attention probabilities ``[B..., H, L, S]`` (before
        dropout, with every mask, bias and callable of the call; differentiable), for debugging
        and visualisation: an O(L*S) result by the caller's choice, computed a block of keys at a
        time by the same kernel (no other O(L*S) temporary). Returned last.
      block_table: integer ``[B..., n]``: a paged KV cache. ``key``/``value`` are then page pools
        ``[P, page, K, D]`` / ``[P, page, K, E]`` and row ``b`` sees its pages ``block_table[b]``
        in order (``n * page`` keys; pass ``key_value_seq_lengths`` for how many are filled).
        Only the rows' own pages are read (one gather of O(their pages), never the whole pool);
        gradients flow back into the pools.

    Structured masks exclude keys: a query row with no key left outputs 0 with zero gradient.

    Returns:
      ``[B..., L, H, E]`` in the input dtype (and the lse with ``return_lse``).

    Example::

        >>> import torch
        >>> from memory_efficient_attention.torch import efficient_dot_product_attention
        >>> q, k, v = torch.randn(3, 2, 100, 4, 16).unbind(0)
        >>> out = efficient_dot_product_attention(q, k, v, is_causal=True, key_chunk_size=32)
        >>> out.shape
        torch.Size([2, 100, 4, 16])
        >>> ref = torch.nn.functional.scaled_dot_product_attention(
        ...     q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        >>> bool(torch.allclose(out, ref.transpose(1, 2), atol=1e-5))
        True
    """
    _check_qkv(query, key, value)
    if block_table is not None:
        key, value = _gather_pages(query, key, value, block_table)
    dims = seed_dims(query.shape, key.shape, value.shape)
    from ..masks import merge_mask_kwargs  # a mask object (masks.Causal, ...) -> the keywords

    mask, structured = merge_mask_kwargs(mask, dict(
        is_causal=is_causal, causal_alignment=causal_alignment, local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids, mask_mod=mask_mod,
    ), query.shape, key.shape)  # fmt: skip
    options = CallOptions(
        scale=scale, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
        memory_budget=memory_budget, is_causal=structured["is_causal"],
        causal_alignment=structured["causal_alignment"],
        local_window_size=structured["local_window_size"], mask_fill="min",
        logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate, engine=engine,
    )  # fmt: skip
    arrays = CallArrays(
        mask=mask, bias=bias, query_seq_lengths=structured["query_seq_lengths"],
        key_value_seq_lengths=structured["key_value_seq_lengths"],
        query_segment_ids=structured["query_segment_ids"], key_segment_ids=structured["key_segment_ids"],
    )  # fmt: skip
    z, kh, g = dims.batch_size, dims.kv_heads, dims.groups
    q5 = query.reshape(z, dims.q_len, kh, g, dims.qk_depth).permute(0, 2, 1, 3, 4)
    k4 = key.reshape(z, dims.kv_len, kh, dims.qk_depth).transpose(1, 2)
    v4 = value.reshape(z, dims.kv_len, kh, dims.v_depth).transpose(1, 2)
    mods = Mods(
        score_mod=score_mod,
        mask_mod=structured["mask_mod"],
        bias_calc_fn=bias_calc_fn,
        mask_calc_fn=mask_calc_fn,
        weights_calc_fn=weights_calc_fn,
        calc_fn_data=calc_fn_data,
    )
    out, lse = _attention(q5, k4, v4, dims, options, arrays, dataclasses.replace(mods), generator=generator,
                          sinks=sinks)  # fmt: skip
    out = out.permute(0, 2, 1, 3, 4).reshape(*dims.batch, dims.q_len, dims.q_heads, dims.v_depth)
    results = [out]
    if return_lse:
        results.append(lse.permute(0, 2, 1, 3).reshape(*dims.batch, dims.q_len, dims.q_heads))
    if return_weights:
        options = dataclasses.replace(options, dropout_rate=0.0)
        weights = attention_weights(q5, k4, dims, options, arrays, mods, sinks=sinks)
        results.append(weights.reshape(*dims.batch, *weights.shape[1:]))
    return results[0] if len(results) == 1 else tuple(results)


def attention_weights(q5, k4, dims: Dims, options: CallOptions, arrays: CallArrays, mods: Mods, **extra):
    """The probabilities ``[Z, H, L, S]`` of a call, computed by the kernel itself.

    Running the kernel with one-hot values (value column ``c`` is key ``j0 + c``) gives the
    columns ``j0...`` of the probability matrix with exactly the call's masks, bias, callables and
    rules (a row with no key left is 0), and their gradients. Keys go ``width`` at a time, so no
    ``S x S`` one-hot matrix is built; the result itself is O(Z * H * L * S), which the caller
    asked for. ``extra``: more keywords of ``_attention`` (``sinks``, ``operand_names``)."""
    z, kh, S = dims.batch_size, dims.kv_heads, dims.kv_len
    width = max(1, min(S, max(dims.q_len, 128)))
    blocks = []
    for j0 in range(0, S, width):
        c = min(width, S - j0)
        onehot = torch.zeros(S, c, dtype=q5.dtype, device=q5.device)
        onehot[torch.arange(j0, j0 + c, device=q5.device), torch.arange(c, device=q5.device)] = 1
        block_dims = dataclasses.replace(dims, v_depth=c)
        p, _ = _attention(q5, k4, onehot.expand(z, kh, S, c), block_dims, options, arrays,
                          dataclasses.replace(mods), **extra)  # fmt: skip
        blocks.append(p.permute(0, 1, 3, 2, 4).reshape(z, dims.q_heads, dims.q_len, c))
    return torch.cat(blocks, dim=-1)


def _causal_bias_alignment(attn_mask, query: torch.Tensor, key: torch.Tensor) -> str | None:
    """``"top_left"``/``"bottom_right"`` for a ``torch.nn.attention.bias.CausalBias`` (checked
    against L and S), None for anything else. Touches no torch function: a CausalBias intercepts
    them all."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover (torch < 2.2)
        return None
    if not isinstance(attn_mask, CausalBias):
        return None
    q_len, kv_len = query.shape[-2:-1].numel(), key.shape[-2:-1].numel()  # (1 dim: the shape check)
    if min(query.dim(), key.dim()) >= 2 and (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (q_len, kv_len):
        raise AttentionInputError(
            f"attn_mask is a CausalBias for (L, S) = ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}), "
            f"but query has L={q_len} (shape {describe(query.shape)}) and key has S={kv_len} "
            f"(shape {describe(key.shape)}); build it with the query and key lengths"
        )
    if attn_mask.variant == CausalVariant.UPPER_LEFT:
        return "top_left"
    if attn_mask.variant == CausalVariant.LOWER_RIGHT:
        return "bottom_right"
    raise AttentionInputError(f"attn_mask has an unknown CausalBias variant {attn_mask.variant!r}")


def _broadcast_heads_first(query, key, value, enable_gqa: bool):
    """Torch SDPA's broadcasting of ``[B..., H, L, D]`` operands: the dims before the last two
    broadcast between query, key and value (a missing head axis is one head). Returns expanded
    views with one batch shape, the ``enable_gqa`` to check them with (True where key/value keep a
    single head shared by every query head) and the output's shape before ``(L, E)``; or None
    where they do not broadcast (``heads_first_dims`` then says why)."""
    shapes = [tuple(t.shape) for t in (query, key, value)]
    if min(len(s) for s in shapes) < (3 if enable_gqa else 2):
        return None
    rank = max(3, *(len(s) for s in shapes))
    padded = [(1,) * (rank - len(s)) + s for s in shapes]
    batch_shape = broadcast_shapes(*(s[:-3] for s in padded))
    if batch_shape is None:
        return None
    hq, hk, hv = (s[-3] for s in padded)
    gqa = enable_gqa
    if enable_gqa:
        if hk != hv and 1 in (hk, hv):
            hk = hv = max(hk, hv)
        heads, out_lead = (hq, hk, hv), (*batch_shape, hq)
    else:
        out_lead = broadcast_shapes(*(s[:-2] for s in shapes))
        if out_lead is None:
            return None
        h = max(hq, hk, hv)
        if hk == hv == 1 and hq > 1:
            heads, gqa = (hq, 1, 1), True  # one key/value head shared by all: no copies
        else:
            heads = (h, h, h)
    tensors = []
    for t, s, heads_t in zip((query, key, value), padded, heads):
        t = t.reshape(s) if t.dim() < rank else t
        if s[:-3] != batch_shape or s[-3] != heads_t:
            t = t.expand(*batch_shape, heads_t, *s[-2:])
        tensors.append(t)
    return tensors, gqa, out_lead


def _jagged_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Jagged nested tensors ``[B, H, j, D]`` (``torch.jagged`` layout, ragged dim 2, as torch
    SDPA takes them): packed into one sequence ``[1, total, H, D]`` with segment ids, so each
    sequence attends only to its own keys; returns a jagged ``[B, H, j, E]`` with the query's
    offsets. Differentiable."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not (isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged):
            kind = (
                "a strided nested tensor"
                if isinstance(t, torch.Tensor) and t.is_nested
                else (f"a {'dense tensor' if isinstance(t, torch.Tensor) else type(t).__name__}")
            )
            raise AttentionInputError(
                f"{name} is {kind}; nested inputs must all be jagged nested tensors "
                "(torch.nested.nested_tensor(..., layout=torch.jagged)). For padded or packed "
                "batches use efficient_dot_product_attention with key_value_seq_lengths= or "
                "query_segment_ids=/key_segment_ids="
            )
        if t.dim() != 4 or t._ragged_idx != 2:
            raise AttentionInputError(
                f"{name} is a jagged nested tensor of shape {tuple(t.shape)} with ragged dim "
                f"{t._ragged_idx}; it needs [B, H, j, D] with the ragged length at dim 2 (a "
                "jagged [B, j, H, D] needs .transpose(1, 2))"
            )
        if t._lengths is not None:
            raise AttentionInputError(
                f"{name} is a non-contiguous jagged nested tensor (with holes); call .contiguous()"
            )
    if attn_mask is not None:
        raise AttentionInputError(
            "attn_mask is not supported with nested tensors (nor by torch); use "
            "efficient_dot_product_attention with query_segment_ids=/key_segment_ids= and bias="
        )
    q_off, k_off, v_off = query.offsets(), key.offsets(), value.offsets()
    if k_off is not v_off and not torch.equal(k_off, v_off):
        raise AttentionInputError("key and value need the same sequence lengths (offsets)")
    if q_off.shape != k_off.shape:
        raise AttentionInputError(f"query has {q_off.numel() - 1} sequences but key has {k_off.numel() - 1}")
    if is_causal and q_off is not k_off and not torch.equal(q_off, k_off):
        raise AttentionInputError(
            "is_causal=True with nested tensors needs query and key of the same sequence lengths"
        )
    hq, hk = query.shape[1], key.shape[1]
    if hq != hk and not enable_gqa:
        raise AttentionInputError(
            f"query has {hq} heads (shape {tuple(query.shape)}) but key has {hk} (shape "
            f"{tuple(key.shape)}); pass enable_gqa=True for grouped-query attention"
        )
    b = q_off.numel() - 1
    q_vals, k_vals, v_vals = (t.transpose(1, 2).values() for t in (query, key, value))  # [T, H, D]
    ids = torch.arange(b, device=q_off.device)
    q_seg = torch.repeat_interleave(ids, q_off.diff(), output_size=q_vals.shape[0])
    k_seg = torch.repeat_interleave(ids, k_off.diff(), output_size=k_vals.shape[0])
    out = efficient_dot_product_attention(
        q_vals[None], k_vals[None], v_vals[None],
        scale=scale, is_causal=is_causal, dropout_rate=dropout_p,
        query_segment_ids=q_seg[None].to(query.device), key_segment_ids=k_seg[None].to(query.device),
    )  # fmt: skip
    return torch.nested.nested_tensor_from_jagged(out[0], offsets=q_off).transpose(1, 2)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, computed in O(n) memory.

    Args:
      query: ``[B..., H, L, D]``.
      key: ``[B..., K, S, D]`` (``K == H``, or ``H % K == 0`` with ``enable_gqa=True``).
      value: ``[B..., K, S, E]``.
        As in torch, the dims before ``(L, D)`` broadcast between query, key and value (expanded
        as views; gradients are summed back to each input's shape), and jagged nested tensors
        ``[B, H, j, D]`` (``layout=torch.jagged``, after ``.transpose(1, 2)``) are taken: packed
        into one sequence with segment ids, returned jagged with the query's offsets.
      attn_mask: broadcastable to ``[B..., H, L, S]``: bool (True takes part) or float (added to
        the scores; float32 or the query's dtype), or ``torch.nn.attention.bias``'s
        ``causal_upper_left(L, S)`` / ``causal_lower_right(L, S)`` (computed as ``is_causal``
        with the matching alignment, never materialised).
      dropout_p: dropout on the attention probabilities (uses torch's global RNG).
      is_causal: top-left causal mask (``tril``); not together with ``attn_mask``.
      scale: default ``1/sqrt(D)``.
      enable_gqa: allow fewer key/value heads than query heads.

    A row with every key masked returns 0 and gets zero gradient, as torch does since 2.5.
    Unlike the fused kernels, this one supports double-precision, bias gradients and any device.

    Returns:
      ``[B..., H, L, E]``.

    Example::

        >>> import torch
        >>> from memory_efficient_attention.torch import scaled_dot_product_attention
        >>> q, k, v = torch.randn(3, 1, 8, 300, 64).unbind(0)
        >>> out = scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> bool(torch.allclose(out, ref, atol=1e-5))
        True
    """
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        return _jagged_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _check_qkv(query, key, value)
    causal_alignment = _causal_bias_alignment(attn_mask, query, key)
    if causal_alignment is not None:
        if is_causal:
            raise AttentionInputError(
                "attn_mask is a CausalBias and is_causal=True; pass one of them (as in torch)"
            )
        attn_mask, is_causal = None, True
    else:
        causal_alignment = "top_left"
    if is_causal and attn_mask is not None:
        raise AttentionInputError(
            "is_causal=True and attn_mask are exclusive (as in torch); fold causality into the mask"
        )
    mask = bias = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype == torch.bool:
            mask = attn_mask
        elif attn_mask.dtype not in (query.dtype, torch.float32):
            raise AttentionInputError(
                f"attn_mask has dtype {attn_mask.dtype}; it must be bool, float32 or the query's "
                f"dtype {query.dtype} (as in torch)"
            )
        else:
            bias = attn_mask
    broadcast = _broadcast_heads_first(query, key, value, enable_gqa)
    out_lead = None
    if broadcast is not None:
        (query, key, value), enable_gqa, out_lead = broadcast
    dims = heads_first_dims(query.shape, key.shape, value.shape, enable_gqa=enable_gqa)
    z, kh, g = dims.batch_size, dims.kv_heads, dims.groups
    q5 = query.reshape(z, kh, g, dims.q_len, dims.qk_depth).transpose(2, 3)
    k4 = key.reshape(z, kh, dims.kv_len, dims.qk_depth)
    v4 = value.reshape(z, kh, dims.kv_len, dims.v_depth)
    options = CallOptions(
        scale=scale, is_causal=is_causal, causal_alignment=causal_alignment, mask_fill="exclude",
        dropout_rate=dropout_p,
    )  # fmt: skip
    out, _ = _attention(
        q5, k4, v4, dims, options, CallArrays(mask=mask, bias=bias), operand_names=("attn_mask", "attn_mask")
    )
    out = out.transpose(2, 3).reshape(*dims.batch, dims.q_heads, dims.q_len, dims.v_depth)
    return out if out_lead is None else out.reshape(*out_lead, dims.q_len, dims.v_depth)
