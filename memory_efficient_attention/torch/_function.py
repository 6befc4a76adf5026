"""The autograd boundary: one ``torch.autograd.Function`` over kernel-layout tensors.

Everything outside it (layout changes, broadcasting of masks and biases) is ordinary
differentiable torch code, so autograd carries gradients back to the caller's shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._config import KernelConfig
from ._higher import attention_forward_differentiable, attention_jvp, fold_vmap, unfold_vmap
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
    """``(out, lse, row_max, row_sum) = attention(q, k, v, bias, ...)``.

    Saves the inputs, the output and two numbers per row. First derivatives use the chunked
    FlashAttention-2 backward; a second derivative (the backward called with
    ``create_graph=True``) recomputes the forward under autograd; forward mode (``jvp``) and
    ``torch.func.vmap`` have chunked rules of their own (``_higher``)."""

    @staticmethod
    def forward(cfg: KernelConfig, mods: Mods, seed: int, *tensors):
        out, row_max, row_sum = attention_forward(cfg, mods, Operands(*tensors), seed)
        return out, log_sum_exp(row_max, row_sum, mods), row_max, row_sum

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg, mods, seed, *tensors = inputs
        out, _, row_max, row_sum = output
        ctx.cfg, ctx.mods, ctx.seed = cfg, mods, seed
        ctx.save_for_backward(*tensors, out, row_max, row_sum)
        ctx.save_for_forward(*tensors, out, row_max, row_sum)
        ctx.mark_non_differentiable(row_max, row_sum)

    @staticmethod
    def backward(ctx, d_out, d_lse, _d_max, _d_sum):
        *saved, out, row_max, row_sum = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[3:7])
        grads = ChunkedAttentionGrad.apply(
            ctx.cfg, ctx.mods, ctx.seed, need, out, row_max, row_sum, d_out, d_lse, *saved
        )
        return (None, None, None, *grads) + (None,) * (len(Operands._fields) - 4)

    @staticmethod
    def jvp(ctx, _cfg, _mods, _seed, *tangents):
        *saved, out, row_max, row_sum = ctx.saved_tensors
        d_out, d_lse = attention_jvp(
            ctx.cfg, ctx.mods, Operands(*saved), ctx.seed, out, row_max, row_sum, tangents
        )
        return d_out, d_lse, None, None

    @staticmethod
    def vmap(info, in_dims, cfg: KernelConfig, mods: Mods, seed: int, *tensors):
        cfg, folded = fold_vmap(info.batch_size, in_dims[3:], cfg, tensors)
        outputs = ChunkedAttention.apply(cfg, mods, seed, *folded)
        size = info.batch_size
        return tuple(x.reshape(size, x.shape[0] // size, *x.shape[1:]) for x in outputs), (0, 0, 0, 0)


class ChunkedAttentionGrad(torch.autograd.Function):
    """The chunked backward as a function of ``(d_out, d_lse, q, k, v, bias)``: its own backward
    (a second derivative) recomputes the forward under autograd and differentiates twice."""

    @staticmethod
    def forward(cfg, mods, seed, need, out, row_max, row_sum, d_out, d_lse, *tensors):
        ops = Operands(*tensors)
        dq, dk, dv, dbias = attention_backward(
            cfg, mods, ops, seed, out, row_max, row_sum, d_out, d_lse,
            ops.bias is not None and need[3],
        )  # fmt: skip
        return tuple(g if n else None for g, n in zip((dq, dk, dv, dbias), need))

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg, mods, seed, need, _out, _max, _sum, d_out, d_lse, *tensors = inputs
        ctx.cfg, ctx.mods, ctx.seed, ctx.need = cfg, mods, seed, need
        ctx.save_for_backward(d_out, d_lse, *tensors)

    @staticmethod
    def backward(ctx, *grad_grads):
        d_out, d_lse, *saved = ctx.saved_tensors
        ops = Operands(*saved)
        firsts = [i for i, (t, n) in enumerate(zip(ops[:4], ctx.need)) if t is not None and n]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (d_out, d_lse, *ops[:4]) if t is not None]
            d_out_l, d_lse_l, *rest = leaves
            inputs = list(ops)
            for i, leaf in zip([i for i, t in enumerate(ops[:4]) if t is not None], rest):
                inputs[i] = leaf
            out, lse = attention_forward_differentiable(ctx.cfg, ctx.mods, Operands(*inputs), ctx.seed)
            first = torch.autograd.grad(
                (out, lse), [inputs[i] for i in firsts], (d_out_l, d_lse_l), create_graph=True,
                allow_unused=True,
            )  # fmt: skip
            total = sum(
                (f * grad_grads[i]).sum()
                for f, i in zip(first, firsts)
                if f is not None and grad_grads[i] is not None
            )
            second = (
                torch.autograd.grad(total, leaves, allow_unused=True)
                if torch.is_tensor(total) and total.requires_grad
                else [None] * len(leaves)
            )
        second = iter(second)
        d_d_out, d_d_lse = next(second), next(second)
        by_input = [next(second) if t is not None else None for t in ops[:4]]
        return (None,) * 7 + (d_d_out, d_d_lse, *by_input) + (None,) * (len(Operands._fields) - 4)

    @staticmethod
    def vmap(info, in_dims, cfg, mods, seed, need, *tensors):
        size = info.batch_size
        # Z-led: out, row_max, row_sum, d_out, d_lse, then the operands (mask may stay broadcast;
        # the bias is expanded so that every mapped instance gets its own gradient).
        cfg2, folded = fold_vmap(size, in_dims[4:], cfg, tensors, broadcast=(9,))
        grads = ChunkedAttentionGrad.apply(cfg2, mods, seed, need, *folded)
        bias, bias_dim = tensors[8], in_dims[4 + 8]
        zb = cfg.dims.batch_size
        if bias is not None:
            zb = (bias.shape if bias_dim is None else bias.movedim(bias_dim, 0).shape[1:])[0]
        z = cfg.dims.batch_size
        out = tuple(unfold_vmap(size, g, zb if i == 3 else z) for i, g in enumerate(grads))
        return out, tuple(None if g is None else 0 for g in out)


def chunked_attention(cfg: KernelConfig, mods: Mods, seed: int, ops: Operands):
    """``(out, lse)`` of the kernel (see ``ChunkedAttention``)."""
    out, lse, _, _ = ChunkedAttention.apply(cfg, mods, seed, *ops)
    return out, lse
