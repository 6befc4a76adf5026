"""Dense float64 references for the attention contract (never chunked, never clever).

Layout (the seed's): query ``[B..., L, H, D]``, key ``[B..., S, K, D]``, value ``[B..., S, K, E]``,
output ``[B..., L, H, E]``; ``mask``/``bias`` broadcast to ``[B..., H, L, S]``; query head ``h``
uses key/value head ``h // (H // K)``.

Score pipeline (in this order):

1. ``s = scale * q.k`` (``scale`` defaults to ``1 / sqrt(D)``);
2. ``logits_soft_cap``: ``s = cap * tanh(s / cap)``;
3. ``s += bias``;
4. dense ``mask`` (seed/Flax semantics): a masked score becomes ``finfo.min`` of the compute
   dtype (float32, or float64 for float64 inputs: ``mask_value``), finite: the key stays in the
   softmax, so a row masked everywhere averages the values;
5. ``score_mod(s, b, h, q_idx, kv_idx)`` (``b`` indexes the flattened batch, ``h`` the query head);
6. structured masks *exclude* keys: causal, local window, sequence lengths, segment ids,
   ``mask_mod(b, h, q_idx, kv_idx)``. A row with no key left outputs 0 (lse = -inf).

``reference_attention`` is NumPy; ``reference_attention_torch`` is the same computation in torch
float64 so that autograd gives reference gradients (``reference_grads``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "MASK_VALUE",
    "mask_value_for",
    "reference_attention",
    "reference_attention_torch",
    "reference_grads",
    "structured_keep",
]

# The finite value a dense-masked score takes (seed/Flax semantics: finfo.min of the compute dtype,
# float32 for float16/bfloat16/float32 inputs; float64 inputs use ``mask_value_for("float64")``).
MASK_VALUE = float(np.finfo(np.float32).min)


def mask_value_for(dtype: str) -> float:
    """``finfo.min`` of the compute dtype of inputs of ``dtype``."""
    return float(np.finfo(np.float64 if dtype == "float64" else np.float32).min)


def _alignment(causal_alignment: str, q_len: int, kv_len: int) -> int:
    if causal_alignment == "top_left":
        return 0
    if causal_alignment == "bottom_right":
        return kv_len - q_len
    raise ValueError(causal_alignment)


def structured_keep(
    batch: tuple[int, ...],
    q_heads: int,
    q_len: int,
    kv_len: int,
    *,
    is_causal=False,
    causal_alignment="top_left",
    local_window_size=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    query_segment_ids=None,
    key_segment_ids=None,
    mask_mod=None,
) -> np.ndarray:
    """Boolean ``[Z, H, L, S]`` (Z = prod(batch)): True where the structured masks keep a pair."""
    z = math.prod(batch)
    b = np.arange(z).reshape(z, 1, 1, 1)
    h = np.arange(q_heads).reshape(1, q_heads, 1, 1)
    qi = np.arange(q_len).reshape(1, 1, q_len, 1)
    ki = np.arange(kv_len).reshape(1, 1, 1, kv_len)
    keep = np.ones((z, q_heads, q_len, kv_len), dtype=bool)
    a = _alignment(causal_alignment, q_len, kv_len)
    if is_causal:
        keep &= ki <= qi + a
    if local_window_size is not None:
        if isinstance(local_window_size, (int, np.integer)):
            left = right = int(local_window_size)
        else:
            left, right = (int(w) for w in local_window_size)
        keep &= (ki >= qi + a - left) & (ki <= qi + a + right)
    if query_seq_lengths is not None:
        lengths = np.broadcast_to(np.asarray(query_seq_lengths), batch).reshape(z, 1, 1, 1)
        keep &= qi < lengths
    if key_value_seq_lengths is not None:
        lengths = np.broadcast_to(np.asarray(key_value_seq_lengths), batch).reshape(z, 1, 1, 1)
        keep &= ki < lengths
    if query_segment_ids is not None or key_segment_ids is not None:
        qs = np.asarray(query_segment_ids).reshape(z, 1, q_len, 1)
        ks = np.asarray(key_segment_ids).reshape(z, 1, 1, kv_len)
        keep &= qs == ks
    if mask_mod is not None:
        keep &= np.broadcast_to(np.asarray(mask_mod(b, h, qi, ki), dtype=bool), keep.shape)
    return keep


def _check_layout(q, k, v):
    assert q.ndim >= 3 and k.ndim == q.ndim and v.ndim == q.ndim
    batch = tuple(q.shape[:-3])
    q_len, q_heads, depth = q.shape[-3:]
    kv_len, kv_heads, _ = k.shape[-3:]
    assert q_heads % kv_heads == 0
    return batch, q_len, kv_len, q_heads, kv_heads


def reference_attention(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    scale=None,
    is_causal=False,
    causal_alignment="top_left",
    local_window_size=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    query_segment_ids=None,
    key_segment_ids=None,
    logits_soft_cap=None,
    score_mod=None,
    mask_mod=None,
    return_lse=False,
    mask_value=MASK_VALUE,
):
    """Dense float64 NumPy attention in the seed layout (module docstring: the semantics)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, q_len, kv_len, q_heads, kv_heads = _check_layout(q, k, v)
    z, groups = math.prod(batch), q_heads // kv_heads
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    k_rep = np.repeat(k, groups, axis=-2)  # query head h -> kv head h // groups
    v_rep = np.repeat(v, groups, axis=-2)
    s = scale * np.einsum("...lhd,...shd->...hls", q, k_rep)  # [B..., H, L, S]
    if logits_soft_cap is not None:
        s = logits_soft_cap * np.tanh(s / logits_soft_cap)
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)
    if mask is not None:
        s = np.where(np.asarray(mask, dtype=bool), s, mask_value)
    s = np.broadcast_to(s, (*batch, q_heads, q_len, kv_len)).reshape(z, q_heads, q_len, kv_len)
    if score_mod is not None:
        b = np.arange(z).reshape(z, 1, 1, 1)
        h = np.arange(q_heads).reshape(1, q_heads, 1, 1)
        qi = np.arange(q_len).reshape(1, 1, q_len, 1)
        ki = np.arange(kv_len).reshape(1, 1, 1, kv_len)
        s = np.broadcast_to(np.asarray(score_mod(s, b, h, qi, ki), dtype=np.float64), s.shape)
    keep = structured_keep(
        batch,
        q_heads,
        q_len,
        kv_len,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids,
        key_segment_ids=key_segment_ids,
        mask_mod=mask_mod,
    )
    any_key = keep.any(axis=-1, keepdims=True)
    m = np.where(any_key, np.max(np.where(keep, s, -np.inf), axis=-1, keepdims=True), 0.0)
    p = np.where(keep, np.exp(np.where(keep, s, m) - m), 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    p = p / np.where(any_key, denom, 1.0)
    v_z = v_rep.reshape(z, kv_len, q_heads, v.shape[-1])
    out = np.einsum("zhls,zshe->zlhe", p, v_z).reshape(*batch, q_len, q_heads, v.shape[-1])
    if not return_lse:
        return out
    with np.errstate(divide="ignore"):
        lse = np.where(any_key, m + np.log(np.where(any_key, denom, 1.0)), -np.inf)
    lse = lse[..., 0].transpose(0, 2, 1).reshape(*batch, q_len, q_heads)
    return out, lse


def reference_attention_torch(
    q,
    k,
    v,
    *,
    mask=None,
    bias=None,
    scale=None,
    is_causal=False,
    causal_alignment="top_left",
    local_window_size=None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    query_segment_ids=None,
    key_segment_ids=None,
    logits_soft_cap=None,
    score_mod=None,
    mask_mod=None,
    mask_value=MASK_VALUE,
):
    """``reference_attention`` in torch float64 (differentiable in q, k, v and bias).

    q, k, v, bias are float64 torch tensors; mask, lengths and segment ids may be NumPy."""
    import torch

    batch, q_len, kv_len, q_heads, kv_heads = _check_layout(q, k, v)
    z, groups = math.prod(batch), q_heads // kv_heads
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    k_rep = torch.repeat_interleave(k, groups, dim=-2)
    v_rep = torch.repeat_interleave(v, groups, dim=-2)
    s = scale * torch.einsum("...lhd,...shd->...hls", q, k_rep)
    if logits_soft_cap is not None:
        s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        mask_t = torch.as_tensor(np.asarray(mask, dtype=bool))
        s = torch.where(mask_t, s, torch.tensor(mask_value, dtype=torch.float64))
    s = s.expand(*batch, q_heads, q_len, kv_len).reshape(z, q_heads, q_len, kv_len)
    if score_mod is not None:
        b = torch.arange(z).reshape(z, 1, 1, 1)
        h = torch.arange(q_heads).reshape(1, q_heads, 1, 1)
        qi = torch.arange(q_len).reshape(1, 1, q_len, 1)
        ki = torch.arange(kv_len).reshape(1, 1, 1, kv_len)
        s = score_mod(s, b, h, qi, ki).to(torch.float64).expand(s.shape)
    keep = torch.as_tensor(
        structured_keep(
            batch,
            q_heads,
            q_len,
            kv_len,
            is_causal=is_causal,
            causal_alignment=causal_alignment,
            local_window_size=local_window_size,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            query_segment_ids=query_segment_ids,
            key_segment_ids=key_segment_ids,
            mask_mod=mask_mod,
        )
    )
    any_key = keep.any(dim=-1, keepdim=True)
    m = torch.where(keep, s, torch.full((), -math.inf, dtype=s.dtype)).amax(-1, keepdim=True)
    m = torch.where(any_key, m, torch.zeros((), dtype=s.dtype)).detach()
    s_kept = torch.where(keep, s, m)  # unkept entries: exp(0), never inf (no 0 * inf in backward)
    p = torch.where(keep, torch.exp(s_kept - m), torch.zeros((), dtype=s.dtype))
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(any_key, denom, torch.ones((), dtype=s.dtype))
    v_z = v_rep.reshape(z, kv_len, q_heads, v.shape[-1])
    out = torch.einsum("zhls,zshe->zlhe", p, v_z)
    return out.reshape(*batch, q_len, q_heads, v.shape[-1])


def reference_grads(q, k, v, d_out, *, bias=None, **kwargs):
    """Float64 gradients of ``sum(out * d_out)`` w.r.t. q, k, v (and bias at its own shape).

    Arguments are NumPy arrays; returns ``(out, {"query", "key", "value"[, "bias"]})``."""
    import torch

    def leaf(x):
        return torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=True)

    tensors = {"query": leaf(q), "key": leaf(k), "value": leaf(v)}
    if bias is not None:
        tensors["bias"] = leaf(bias)
    out = reference_attention_torch(
        tensors["query"], tensors["key"], tensors["value"], bias=tensors.get("bias"), **kwargs
    )
    grads = torch.autograd.grad(
        out, list(tensors.values()), torch.as_tensor(np.asarray(d_out, dtype=np.float64))
    )
    return out.detach().numpy(), {n: g.numpy() for n, g in zip(tensors, grads)}
