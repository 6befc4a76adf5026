"""Stand-ins for torch's fused CUDA attention operators that run on CPU, so that the fused
engine's CUDA plumbing (``torch/_span_kernels.py``: which kernel takes which span, the padded
lse of the memory-efficient kernel, its aligned mask, repeated heads, the backward's placeholder
arguments) is tested on machines without a GPU.

Each stand-in checks the contract of the real operator as torch 2.13 declares it (schemas of
``aten._scaled_dot_product_flash_attention[_backward]`` and
``aten._scaled_dot_product_efficient_attention[_backward]``, output shapes of their meta
kernels) and what the CUDA kernels require (FlashAttention-2: no mask, equal-length causal spans
only, since FA2 aligns a non-square causal mask bottom-right; the memory-efficient kernel: a
``[B, H, L, S]`` bias of the query dtype whose rows are 16-element aligned, equal head counts,
lse padded to a multiple of 32 rows, NaN for a row whose keys are all masked), then computes in
float64 with the dense formula. ``calls`` records which operator ran, with its span shape.
"""

from __future__ import annotations

import torch


def _rows32(n: int) -> int:
    return -(-n // 32) * 32


def _dense(q, k, v, bias, causal, scale):
    """``(out, lse, s)`` in float64; K/V heads shared by ``H / K`` query heads (``h // G``)."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if causal:  # top-left
        keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = s.logsumexp(-1)
    p = (s - lse.unsqueeze(-1)).exp()
    return p @ v, lse, s


def _grads(d_out, q, k, v, out, lse, bias, causal, scale):
    """The span's share of dQ/dK/dV from the global ``out`` and ``lse`` (FA2's backward)."""
    g = q.shape[1] // k.shape[1]
    kr = k.double().repeat_interleave(g, dim=1)
    vr = v.double().repeat_interleave(g, dim=1)
    _, _, s = _dense(q, k, v, bias, causal, scale)
    p = (s - lse.double().unsqueeze(-1)).exp()
    do = d_out.double()
    dv = p.transpose(-1, -2) @ do
    dp = do @ vr.transpose(-1, -2)
    delta = (do * out.double()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = ds @ kr * scale
    dk = ds.transpose(-1, -2) @ q.double() * scale
    if g > 1:
        dk = dk.unflatten(1, (k.shape[1], g)).sum(2)
        dv = dv.unflatten(1, (k.shape[1], g)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FakeCudaOps:
    """The operator namespace ``_span_kernels.OPS`` for the tests (see the module docstring)."""

    FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float64)  # float64 stands in for half

    def __init__(self, broken: str | None = None, flash_gqa: bool = True):
        self.calls: list[tuple[str, int, int, bool, bool]] = []
        self.heads: list[tuple[int, int]] = []  # (query heads, key/value heads) of each call
        self.broken = broken  # "flash" or "efficient": that operator returns a wrong lse
        self.flash_gqa = flash_gqa  # False: the flash operator refuses grouped heads

    def _common(self, q, k, v, scale):
        assert q.dim() == k.dim() == v.dim() == 4, "4-D [B, H, L, D] operands"
        assert q.dtype == k.dtype == v.dtype, "one dtype"
        assert k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[-1] == k.shape[-1]
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "the last dimension contiguous"
        assert isinstance(scale, float)

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout_p=0.0, is_causal=False,
                                            return_debug_mask=False, *, scale=None):  # fmt: skip
        self._common(q, k, v, scale)
        assert q.dtype in self.FLASH_DTYPES and q.shape[-1] <= 256 and q.shape[1] % k.shape[1] == 0
        assert self.flash_gqa or q.shape[1] == k.shape[1], "grouped heads"
        self.heads.append((q.shape[1], k.shape[1]))
        assert dropout_p == 0.0 and return_debug_mask is False
        assert not is_causal or q.shape[2] == k.shape[2], "FA2 aligns non-square causal bottom-right"
        self.calls.append(("flash", q.shape[2], k.shape[2], is_causal, False))
        out, lse, _ = _dense(q, k, v, None, is_causal, scale)
        if self.broken == "flash":
            lse = lse / 0.6931471805599453  # log2
        rng = torch.zeros(2, dtype=torch.uint64)
        z = q.new_empty(0)
        lse = lse if q.dtype == torch.float64 else lse.float()  # float32 (float64 for the stand-in)
        return out.to(q.dtype), lse, None, None, q.shape[2], k.shape[2], rng, rng[0], z

    def _scaled_dot_product_flash_attention_backward(self, d_out, q, k, v, out, lse, cum_seq_q,
            cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *,
            scale=None):  # fmt: skip
        self._common(q, k, v, scale)
        assert cum_seq_q is None and cum_seq_k is None and (max_q, max_k) == (q.shape[2], k.shape[2])
        assert philox_seed.dtype == philox_offset.dtype == torch.uint64 and dropout_p == 0.0
        assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
        assert lse.shape == q.shape[:3] and out.shape == q.shape
        assert not is_causal or q.shape[2] == k.shape[2]
        return _grads(d_out, q, k, v, out, lse, None, is_causal, scale)

    def _check_bias(self, q, k, bias):
        if bias is None:
            return
        want = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        assert tuple(bias.shape) == want, f"attn_bias {tuple(bias.shape)}, needs {want}"
        assert bias.dtype == q.dtype, "attn_bias in the query dtype"
        assert bias.stride(-1) == 1 and bias.stride(-2) % 16 == 0, "16-aligned attn_bias rows"

    def _scaled_dot_product_efficient_attention(self, q, k, v, attn_bias, compute_log_sumexp,
                                                dropout_p=0.0, is_causal=False, *, scale=None):  # fmt: skip
        self._common(q, k, v, scale)
        assert q.shape[1] == k.shape[1], "equal head counts"
        assert compute_log_sumexp is True and dropout_p == 0.0
        self.heads.append((q.shape[1], k.shape[1]))
        self._check_bias(q, k, attn_bias)
        self.calls.append(("efficient", q.shape[2], k.shape[2], is_causal, attn_bias is not None))
        out, lse, _ = _dense(q, k, v, attn_bias, is_causal, scale)
        if self.broken == "efficient":
            lse = lse / 0.6931471805599453
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        padded = torch.full((*lse.shape[:-1], _rows32(lse.shape[-1])), float("nan"), dtype=lse_dtype)
        padded[..., : lse.shape[-1]] = lse
        seed = torch.zeros((), dtype=torch.int64)
        return out.to(q.dtype), padded, seed, seed

    def _scaled_dot_product_efficient_attention_backward(self, d_out, q, k, v, attn_bias, out, lse,
            philox_seed, philox_offset, dropout_p, grad_input_mask, is_causal=False, *,
            scale=None):  # fmt: skip
        self._common(q, k, v, scale)
        assert q.shape[1] == k.shape[1] and dropout_p == 0.0
        assert list(grad_input_mask) == [True, True, True, False]
        assert philox_seed.dtype == philox_offset.dtype == torch.int64
        assert lse.shape == (*q.shape[:2], _rows32(q.shape[2])) and lse.is_contiguous()
        self._check_bias(q, k, attn_bias)
        rows = lse[..., : q.shape[2]]
        return (*_grads(d_out, q, k, v, out, rows, attn_bias, is_causal, scale), None)
