"""Stand-ins for the ``flash_attn`` package's attention functions, on any device PyTorch runs on.

Code written against flash-attention runs on CPU (or any device) by changing one import::

    from memory_efficient_attention.flash_attn import flash_attn_func  # was: from flash_attn import ...

Same signatures and semantics (flash-attn 2.x): layout ``[B, L, H, D]`` (packed ``[T, H, D]`` for
varlen), grouped-query attention (``H % K == 0``), ``causal`` and ``window_size`` aligned to the
bottom-right corner (the last query sees the last key), ``softcap``, ``alibi_slopes`` (bias
``-slope * |i + S - L - j|``), ``dropout_p``, ``softmax_scale``, ``return_attn_probs``; outputs and
gradients (q, k, v) through this package's kernel, in O(n) memory. Differences: ``deterministic``
is accepted and always true; with ``return_attn_probs`` the third result (flash-attn's dropout
pattern ``S_dmask``, for testing) is None; the lse is ``[B, H, L]`` in float32 (float64 for float64
inputs), ``-inf`` for a row with no key. ``flash_attn_with_kvcache`` takes contiguous and paged
caches (``block_table``); ``num_splits`` is ignored.

Shape legend: ``B`` batch, ``L``/``S`` query/key lengths, ``H``/``K`` query/key-value heads,
``D`` depth; varlen: ``T`` total tokens, ``cu_seqlens`` ``[B + 1]`` int32 offsets.

Example::

    >>> import torch
    >>> from memory_efficient_attention.flash_attn import flash_attn_func
    >>> q, k, v = torch.randn(3, 2, 64, 4, 16).unbind(0)
    >>> flash_attn_func(q, k, v, causal=True, window_size=(8, 0)).shape
    torch.Size([2, 64, 4, 16])
"""

from __future__ import annotations

from ._require import require

require("torch", "torch", __name__)

import torch  # noqa: E402

from ._spec import AttentionInputError, describe  # noqa: E402
from .torch import efficient_dot_product_attention  # noqa: E402

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _window(window_size, causal: bool) -> tuple[int, int] | None:
    """flash-attn's ``window_size`` (``-1``: unbounded on that side) as ``(left, right)`` or None."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise AttentionInputError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    big = 2**31 - 1
    return (big if left < 0 else left, big if right < 0 else right)


def _slopes(alibi_slopes, heads: int, batch: int) -> torch.Tensor | None:
    """``alibi_slopes`` checked: ``[H]`` or ``[B, H]`` (flash-attn's shapes), or None."""
    if alibi_slopes is None:
        return None
    slopes = torch.as_tensor(alibi_slopes).detach()
    if slopes.shape not in ((heads,), (batch, heads)):
        raise AttentionInputError(
            f"alibi_slopes has shape {describe(slopes.shape)}, but needs ({heads}) or ({batch}, {heads})"
        )
    return slopes


def _alibi(slopes, batch_of, distance):
    """A ``score_mod`` adding ``-slope * |distance(b, q_idx, kv_idx)|`` (``batch_of(b, q_idx)``:
    the row of ``[B, H]`` slopes), or None."""
    if slopes is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        slope = slopes[h] if slopes.dim() == 1 else slopes[batch_of(b, q_idx), h]
        return score - slope.to(score.dtype) * distance(b, q_idx, kv_idx).abs().to(score.dtype)

    return score_mod


def _check_scalars(dropout_p, softcap) -> None:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise AttentionInputError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if float(softcap) < 0:
        raise AttentionInputError(f"softcap must be >= 0 (0: no cap), got {softcap!r}")


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """``flash_attn.flash_attn_func``: q ``[B, L, H, D]``, k/v ``[B, S, K, D]`` -> ``[B, L, H, D]``
    (with ``return_attn_probs``: ``(out, lse [B, H, L], None)``)."""
    _check_scalars(dropout_p, softcap)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = describe(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AttentionInputError(
                f"{name} must be a 4-d tensor [B, L, H, D] (flash-attn's layout), got {shape}"
            )
    L, S = q.shape[1], k.shape[1]
    window = _window(window_size, causal)
    out = efficient_dot_product_attention(
        q, k, v, scale=softmax_scale, is_causal=bool(causal), causal_alignment="bottom_right",
        local_window_size=window, logits_soft_cap=float(softcap) or None,
        score_mod=_alibi(
            _slopes(alibi_slopes, q.shape[2], q.shape[0]), lambda b, i: b, lambda b, i, j: i + (S - L) - j
        ),
        dropout_rate=float(dropout_p), return_lse=return_attn_probs,
    )  # fmt: skip
    if not return_attn_probs:
        return out
    out, lse = out
    return out, lse.transpose(1, 2), None


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):  # fmt: skip
    """``flash_attn.flash_attn_qkvpacked_func``: ``qkv [B, L, 3, H, D]``."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise AttentionInputError(f"qkv must be [B, L, 3, H, D], got shape {describe(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)  # fmt: skip


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p=0.0, softmax_scale=None,
                             causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):  # fmt: skip
    """``flash_attn.flash_attn_kvpacked_func``: ``kv [B, S, 2, K, D]``."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise AttentionInputError(f"kv must be [B, S, 2, K, D], got shape {describe(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)  # fmt: skip


def _sequence_positions(cu_seqlens: torch.Tensor, total: int, name: str):
    """``(sequence id [T], position within the sequence [T], lengths [B])`` of packed tokens."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise AttentionInputError(f"{name} must be a 1-d int tensor [B + 1] of offsets, got {cu_seqlens!r}")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) != total:
        raise AttentionInputError(
            f"{name} must start at 0, never decrease and end at the packed length {total}, got "
            f"{cu_seqlens.tolist()}"
        )
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    return seq, torch.arange(total, device=cu.device) - cu[seq], lengths


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
):
    """``flash_attn.flash_attn_varlen_func``: packed q ``[T, H, D]``, k/v ``[Tk, K, D]``; sequence
    ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` against its own keys. Nothing is padded: the
    sequences are segments of one packed axis (chunk pairs across two sequences are skipped), and
    causal/window are aligned to each sequence's own bottom-right corner. With
    ``return_attn_probs``: ``(out, lse [H, T], None)``."""
    if block_table is not None:
        raise NotImplementedError("block_table (a paged KV cache) is not supported yet")
    _check_scalars(dropout_p, softcap)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise AttentionInputError(f"{name} must be a packed 3-d tensor [T, H, D], got {x!r:.80}")
    q_seq, q_pos, q_lens = _sequence_positions(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    k_seq, k_pos, k_lens = _sequence_positions(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if len(q_lens) != len(k_lens):
        raise AttentionInputError(
            f"cu_seqlens_q has {len(q_lens) + 1} offsets and cu_seqlens_k {len(k_lens) + 1}: one per "
            "sequence (+1) in both"
        )
    longest_q, longest_k = int(q_lens.max()), int(k_lens.max())
    if longest_q > max_seqlen_q or longest_k > max_seqlen_k:
        raise AttentionInputError(
            f"max_seqlen_q={max_seqlen_q} / max_seqlen_k={max_seqlen_k} are below the longest sequence "
            f"({longest_q} / {longest_k})"
        )
    window = _window(window_size, causal)
    # Query position i of sequence b sees key j of it where j - (S_b - L_b) ... (bottom-right).
    shift = (k_lens - q_lens)[q_seq]  # per query token: its sequence's S_b - L_b
    mask_mod = None
    if causal or window is not None:
        left, right = window if window is not None else (2**31 - 1, 0)

        def mask_mod(b, h, q_idx, kv_idx):
            diag = q_pos[q_idx] + shift[q_idx]
            return (k_pos[kv_idx] <= diag + right) & (k_pos[kv_idx] >= diag - left)

    score_mod = _alibi(
        _slopes(alibi_slopes, q.shape[1], len(q_lens)),
        lambda b, i: q_seq[i],
        lambda b, i, j: q_pos[i] + shift[i] - k_pos[j],
    )
    out = efficient_dot_product_attention(
        q[None], k[None], v[None], scale=softmax_scale, query_segment_ids=q_seq[None],
        key_segment_ids=k_seq[None], mask_mod=mask_mod, score_mod=score_mod,
        logits_soft_cap=float(softcap) or None, dropout_rate=float(dropout_p),
        return_lse=return_attn_probs,
    )  # fmt: skip
    if not return_attn_probs:
        return out[0]
    out, lse = out
    return out[0], lse[0].transpose(0, 1), None


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):  # fmt: skip
    """``flash_attn.flash_attn_varlen_qkvpacked_func``: ``qkv [T, 3, H, D]``."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise AttentionInputError(f"qkv must be [T, 3, H, D], got shape {describe(qkv.shape)}")
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)  # fmt: skip


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):  # fmt: skip
    """``flash_attn.flash_attn_varlen_kvpacked_func``: ``kv [Tk, 2, K, D]``."""
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise AttentionInputError(f"kv must be [Tk, 2, K, D], got shape {describe(kv.shape)}")
    k, v = kv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)  # fmt: skip


def _rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool
):
    """flash-attn's rotary embedding of ``x [B, L, H, D]`` at ``positions [B, L]``: the first
    ``2 * cos.shape[1]`` dims rotate, in halves (GPT-NeoX) or in interleaved pairs (GPT-J)."""
    half = cos.shape[-1]
    c = cos[positions].unsqueeze(2).to(x.dtype)  # [B, L, 1, half]
    s = sin[positions].unsqueeze(2).to(x.dtype)
    rot = x[..., : 2 * half]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([out, x[..., 2 * half :]], dim=-1)


def _gather_pages(pool: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The pages of each row as ``[B, S, K, D]``: one copy of the rows' own pages, never of the
    whole pool (a gather in the pool's own layout: 25 ms for 64 MiB here, where gathering straight
    into a heads-first layout took 65 ms)."""
    return pool[block_table.long()].flatten(1, 2)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """``flash_attn.flash_attn_with_kvcache``: q ``[B, L, H, D]`` against a KV cache, after
    appending the new ``k``/``v`` ``[B, L_new, K, D]`` in place at ``cache_seqlens``.

    The cache is ``[B_cache, S, K, D]`` (rows ``cache_batch_idx``, default the first ``B``) or
    paged: ``[num_pages, page, K, D]`` with ``block_table [B, pages per sequence]``; a paged
    sequence is gathered page by page (memory O(its pages), never the whole cache). Each batch
    row ``b`` attends to its first ``cache_seqlens[b] (+ L_new)`` keys, causal/window aligned to
    that length's bottom-right corner. ``rotary_cos``/``rotary_sin`` ``[positions, R / 2]``
    rotate the new keys at their positions and q at ``cache_seqlens + i`` (causal or windowed) or
    at ``cache_seqlens`` (otherwise), as flash-attn does. ``cache_leftpad`` ``[B]``: row ``b``'s
    cache starts at that position (keys before it are left padding, excluded; the causal/window
    diagonal stays aligned to the last key). Returns ``out`` (and the lse ``[B, H, L]`` with
    ``return_softmax_lse``).
    """
    _check_scalars(0.0, softcap)
    if q.dim() != 4:
        raise AttentionInputError(f"q must be a 4-d tensor [B, L, H, D], got shape {describe(q.shape)}")
    B, L = q.shape[:2]
    dev = q.device
    if block_table is not None:
        page = k_cache.shape[1]
        S = block_table.shape[1] * page
    else:
        S = k_cache.shape[1]
    if cache_seqlens is None:
        seqlens = torch.full((B,), S if k is None else 0, dtype=torch.long, device=dev)
    else:
        seqlens = torch.as_tensor(cache_seqlens, device=dev).long().expand(B)
    rows = torch.arange(B, device=dev) if cache_batch_idx is None else cache_batch_idx.long()
    new = 0 if k is None else k.shape[1]
    if (k is None) != (v is None):
        raise AttentionInputError("k and v go together: pass both new keys and values, or neither")
    if k is not None:
        positions = seqlens[:, None] + torch.arange(new, device=dev)
        if int(positions.max()) >= S:
            raise AttentionInputError(
                f"the cache holds {S} positions; appending {new} at cache_seqlens {seqlens.tolist()} "
                "overflows it"
            )
        if rotary_cos is not None:
            k = _rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        with torch.no_grad():
            if block_table is not None:
                pages = block_table.long().gather(1, positions // page)
                k_cache[pages, positions % page] = k.to(k_cache.dtype)
                v_cache[pages, positions % page] = v.to(v_cache.dtype)
            else:
                k_cache[rows[:, None], positions] = k.to(k_cache.dtype)
                v_cache[rows[:, None], positions] = v.to(v_cache.dtype)
    total = seqlens + new
    leftpad = None
    if cache_leftpad is not None:
        leftpad = torch.as_tensor(cache_leftpad, device=dev).long().expand(B)
        if bool((leftpad < 0).any()) or bool((leftpad > seqlens).any()):
            raise AttentionInputError(
                f"cache_leftpad must lie in [0, cache_seqlens]; got {leftpad.tolist()} for cache_seqlens "
                f"{seqlens.tolist()}"
            )
    if rotary_cos is not None:
        moving = causal or tuple(window_size) != (-1, -1)
        steps = torch.arange(L, device=dev) if moving else torch.zeros(L, dtype=torch.long, device=dev)
        q = _rotary(q, rotary_cos, rotary_sin, seqlens[:, None] + steps, rotary_interleaved)
    if block_table is not None:
        keys, values = (_gather_pages(c, block_table) for c in (k_cache, v_cache))
    else:
        keys, values = (c[rows] if cache_batch_idx is not None else c[:B] for c in (k_cache, v_cache))
    window = _window(window_size, causal)
    slopes = _slopes(alibi_slopes, q.shape[2], B)
    options = dict(scale=softmax_scale, logits_soft_cap=float(softcap) or None, return_lse=True)
    if leftpad is None and bool((total == total[0]).all()):  # one length: structured masks
        n = int(total[0])
        alibi = _alibi(slopes, lambda b, i: b, lambda b, i, j: i + (n - L) - j)
        out, lse = efficient_dot_product_attention(
            q, keys[:, :n], values[:, :n], is_causal=bool(causal), causal_alignment="bottom_right",
            local_window_size=window, score_mod=alibi, **options,
        )  # fmt: skip
        return (out, lse.transpose(1, 2)) if return_softmax_lse else out
    offset = total - L  # query i of row b sits at key position offset[b] + i
    mask_mod = None
    if window is not None or causal or leftpad is not None:
        left, right = window if window is not None else (2**31 - 1, 0 if causal else 2**31 - 1)
        first = leftpad if leftpad is not None else torch.zeros_like(total)

        def mask_mod(b, h, q_idx, kv_idx):
            diag = offset[b] + q_idx  # leftpad shifts keys and length alike: the diagonal stays
            return (kv_idx <= diag + right) & (kv_idx >= diag - left) & (kv_idx >= first[b])

    score_mod = _alibi(slopes, lambda b, i: b, lambda b, i, j: i + offset[b] - j)
    out, lse = efficient_dot_product_attention(
        q, keys, values, key_value_seq_lengths=total, mask_mod=mask_mod, score_mod=score_mod, **options
    )
    return (out, lse.transpose(1, 2)) if return_softmax_lse else out
