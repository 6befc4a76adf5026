"""Public PyTorch functions.

Shape legend (``memory_efficient_attention._spec``): ``B...`` batch dims (any number, or none),
``L`` query length, ``S`` key length, ``H`` query heads, ``K`` key/value heads (``H % K == 0``),
``D`` query/key depth, ``E`` value depth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._config import make_config
from .._spec import (
    AttentionInputError,
    Dims,
    check_float_dtypes,
    heads_first_dims,
    operand_shape,
    padded_operand_shape,
    seed_dims,
)
from ._function import Operands, chunked_attention
from ._kernel import Mods

__all__ = ["efficient_dot_product_attention", "scaled_dot_product_attention"]


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
    x = torch.as_tensor(x, device=like.device)
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise AttentionInputError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def _attention(
    q5: torch.Tensor,
    k4: torch.Tensor,
    v4: torch.Tensor,
    dims: Dims,
    *,
    mask=None,
    bias=None,
    mask_fill: str = "min",
    query_chunk_size=None,
    key_chunk_size=None,
    memory_budget=None,
    scale=None,
    is_causal=False,
    causal_alignment="top_left",
    local_window_size=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    query_segment_ids=None,
    key_segment_ids=None,
    score_mod=None,
    mask_mod=None,
    logits_soft_cap=None,
    dropout_rate=0.0,
    generator=None,
    mods: Mods | None = None,
    operand_names: tuple[str, str] = ("mask", "bias"),
):
    """Validate the rest, build the config and run the kernel on kernel-layout q/k/v."""
    qlen = _int_array("query_seq_lengths", query_seq_lengths, q5)
    kvlen = _int_array("key_value_seq_lengths", key_value_seq_lengths, q5)
    qseg = _int_array("query_segment_ids", query_segment_ids, q5)
    kvseg = _int_array("key_segment_ids", key_segment_ids, q5)
    cfg = make_config(
        dims,
        _dtype_name(q5),
        scale=scale,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
        memory_budget=memory_budget,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        local_window_size=local_window_size,
        q_lengths_shape=None if qlen is None else tuple(qlen.shape),
        kv_lengths_shape=None if kvlen is None else tuple(kvlen.shape),
        q_segments_shape=None if qseg is None else tuple(qseg.shape),
        kv_segments_shape=None if kvseg is None else tuple(kvseg.shape),
        mask_mod=mask_mod,
        mask_fill=mask_fill,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        device=q5.device.type,
    )
    if score_mod is not None and not callable(score_mod):
        raise AttentionInputError(
            f"score_mod must be callable(score, b, h, q_idx, kv_idx), got {score_mod!r}"
        )
    mods = mods or Mods()
    mods.score_mod, mods.mask_mod = score_mod, mask_mod
    z = dims.batch_size
    ops = Operands(
        q5,
        k4,
        v4,
        _operand(operand_names[1], bias, dims, q5, boolean=False),
        _operand(operand_names[0], mask, dims, q5, boolean=True),
        None if qlen is None else qlen.reshape(z),
        None if kvlen is None else kvlen.reshape(z),
        None if qseg is None else qseg.reshape(z, dims.q_len),
        None if kvseg is None else kvseg.reshape(z, dims.kv_len),
    )
    seed = 0
    if cfg.dropout:
        device = generator.device if generator is not None else q5.device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())
    return chunked_attention(cfg, mods, seed, ops)


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
):
    """Exact attention in O(n) memory, forward and backward (seed-compatible signature).

    Args:
      query: ``[B..., L, H, D]``.
      key: ``[B..., S, K, D]``; ``K`` divides ``H`` (grouped-query attention without repeating
        K/V: query head ``h`` uses key/value head ``h // (H // K)``).
      value: ``[B..., S, K, E]``.
      mask: bool, broadcastable to ``[B..., H, L, S]``; False masks a score to ``finfo.min`` (the
        seed's and Flax's rule: a row masked everywhere averages the values). Dense masks cost
        O(L*S) memory: prefer the structured arguments below.
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
    dims = seed_dims(query.shape, key.shape, value.shape)
    z, kh, g = dims.batch_size, dims.kv_heads, dims.groups
    q5 = query.reshape(z, dims.q_len, kh, g, dims.qk_depth).permute(0, 2, 1, 3, 4)
    k4 = key.reshape(z, dims.kv_len, kh, dims.qk_depth).transpose(1, 2)
    v4 = value.reshape(z, dims.kv_len, kh, dims.v_depth).transpose(1, 2)
    out, lse = _attention(
        q5,
        k4,
        v4,
        dims,
        mask=mask,
        bias=bias,
        mask_fill="min",
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
        memory_budget=memory_budget,
        scale=scale,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids,
        key_segment_ids=key_segment_ids,
        score_mod=score_mod,
        mask_mod=mask_mod,
        logits_soft_cap=logits_soft_cap,
        dropout_rate=dropout_rate,
        generator=generator,
        mods=Mods(
            bias_calc_fn=bias_calc_fn,
            mask_calc_fn=mask_calc_fn,
            weights_calc_fn=weights_calc_fn,
            calc_fn_data=calc_fn_data,
        ),
    )
    out = out.permute(0, 2, 1, 3, 4).reshape(*dims.batch, dims.q_len, dims.q_heads, dims.v_depth)
    if not return_lse:
        return out
    return out, lse.permute(0, 2, 1, 3).reshape(*dims.batch, dims.q_len, dims.q_heads)


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
      attn_mask: broadcastable to ``[B..., H, L, S]``: bool (True takes part) or float (added to
        the scores, same dtype as query).
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
    _check_qkv(query, key, value)
    dims = heads_first_dims(query.shape, key.shape, value.shape, enable_gqa=enable_gqa)
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
        elif attn_mask.dtype != query.dtype:
            raise AttentionInputError(
                f"a float attn_mask must have the query's dtype {query.dtype}, got {attn_mask.dtype}"
            )
        else:
            bias = attn_mask
    z, kh, g = dims.batch_size, dims.kv_heads, dims.groups
    q5 = query.reshape(z, kh, g, dims.q_len, dims.qk_depth).transpose(2, 3)
    k4 = key.reshape(z, kh, dims.kv_len, dims.qk_depth)
    v4 = value.reshape(z, kh, dims.kv_len, dims.v_depth)
    out, _ = _attention(
        q5, k4, v4, dims, mask=mask, bias=bias, mask_fill="exclude", scale=scale,
        is_causal=is_causal, dropout_rate=dropout_p, operand_names=("attn_mask", "attn_mask"),
    )  # fmt: skip
    return out.transpose(2, 3).reshape(*dims.batch, dims.q_heads, dims.q_len, dims.v_depth)
