"""The autograd boundary: one ``torch.autograd.Function`` over kernel-layout tensors.

Everything outside it (layout changes, broadcasting of masks and biases) is ordinary
differentiable torch code, so autograd carries gradients back to the caller's shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .._config import KernelConfig
from ._kernel import Mods, attention_backward, attention_forward, log_sum_exp


class Operands(NamedTuple):
    """Kernel-layout tensors of one call (legend: ``memory_efficient_attention._spec``)."""

    q: torch.Tensor  # [Z, K, L, G, D]
    k: torch.Tensor  # [Z, K, S, D]
    v: torch.Tensor  # [Z, K, S, E]
    bias: torch.Tensor | None = None  # [Zb, Hb, Lb, Sb]
    mask: torch.Tensor | None = None  # [Zm, Hm, Lm, Sm] bool
    q_lengths: torch.Tensor | None = None  # [Z]
    kv_lengths: torch.Tensor | None = None  # [Z]
    q_segments: torch.Tensor | None = None  # [Z, L]
    kv_segments: torch.Tensor | None = None  # [Z, S]


class ChunkedAttention(torch.autograd.Function):
    """``(out, lse) = attention(q, k, v, bias, ...)``; saves inputs, output and row statistics."""

    @staticmethod
    def forward(ctx, cfg: KernelConfig, mods: Mods, seed: int, *tensors):
        ops = Operands(*tensors)
        out, row_max, row_sum = attention_forward(cfg, mods, ops, seed)
        ctx.cfg, ctx.mods, ctx.seed = cfg, mods, seed
        ctx.save_for_backward(*ops, out, row_max, row_sum)
        return out, log_sum_exp(row_max, row_sum, mods)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_lse):
        *saved, out, row_max, row_sum = ctx.saved_tensors
        ops = Operands(*saved)
        need_bias_grad = ops.bias is not None and ctx.needs_input_grad[6]
        dq, dk, dv, dbias = attention_backward(
            ctx.cfg, ctx.mods, ops, ctx.seed, out, row_max, row_sum, d_out, d_lse, need_bias_grad
        )
        return (None, None, None, dq, dk, dv, dbias) + (None,) * (len(Operands._fields) - 4)


def chunked_attention(cfg: KernelConfig, mods: Mods, seed: int, ops: Operands):
    return ChunkedAttention.apply(cfg, mods, seed, *ops)
