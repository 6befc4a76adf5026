"""The autograd boundary: one ``torch.autograd.Function`` over kernel-layout tensors.

Everything outside it (layout changes, broadcasting of masks and biases) is ordinary
differentiable torch code, so autograd carries gradients back to the caller's shapes.

Tensors that the user callables (``score_mod``, the seed's callbacks, ``calc_fn_data``) capture
and that require grad are extra inputs of the Function (``captured_tensors``): the backward
differentiates the score pipeline with respect to them chunk by chunk and sums.
"""

from __future__ import annotations

import functools
import itertools
import types
from typing import NamedTuple

import torch

from .._config import KernelConfig
from ._higher import attention_forward_differentiable, attention_jvp, fold_vmap, unfold_vmap
from ._kernel import (
    Mods,
    _is_plain,
    _unit,
    attention_backward,
    attention_forward,
    base2_overflowed,
    log_sum_exp,
    scores_may_overflow,
)


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


_N = len(Operands._fields)  # the Function's tensors: the operands, then the captured tensors


# ------------------------------------------------------------------------------------------------
# Tensors captured by user callables
# ------------------------------------------------------------------------------------------------

_MAX_DEPTH = 8
_MAX_OBJECTS = 10_000


def _has_tangent(t: torch.Tensor) -> bool:
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def _code_names(code: types.CodeType):
    """Global names a function's code (and the code of functions defined inside it) reads."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def captured_tensors(*objects) -> tuple[torch.Tensor, ...]:
    """The tensors that require grad (or carry a forward-mode tangent) reachable from
    ``objects`` (the user callables and ``calc_fn_data``), each once, in a fixed order.

    Followed: tensors themselves; a function's closure cells, defaults, keyword defaults and the
    module globals its code names; ``functools.partial`` (function, args, keywords); a bound
    method's function and ``__self__``; ``nn.Module`` parameters, buffers and attributes;
    attributes of other objects (callable instances); lists, tuples, sets and dict values; all
    recursively (to a depth of 8). Not followed: tensors reached only through Python modules,
    classes, or attributes computed on access (properties)."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad or _has_tangent(obj):
                found.setdefault(id(obj), obj)
            return
        if (
            obj is None
            or depth > _MAX_DEPTH
            or id(obj) in seen
            or len(seen) > _MAX_OBJECTS
            or isinstance(obj, (str, bytes, int, float, complex, type, types.ModuleType))
        ):
            return
        seen.add(id(obj))
        nxt = depth + 1
        if isinstance(obj, torch.nn.Module):
            for t in itertools.chain(obj.parameters(), obj.buffers()):
                visit(t, nxt)
        if isinstance(obj, functools.partial):
            children = [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, types.MethodType):
            children = [obj.__func__, obj.__self__]
        elif isinstance(obj, types.FunctionType):
            children = [cell.cell_contents for cell in obj.__closure__ or () if _filled(cell)]
            children += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
            names = set(_code_names(obj.__code__))
            children += [obj.__globals__[n] for n in sorted(names) if n in obj.__globals__]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif isinstance(obj, dict):
            children = list(obj.values())
        else:
            children = list(getattr(obj, "__dict__", {}).values())
        for child in children:
            visit(child, nxt)

    for obj in objects:
        visit(obj, 0)
    return tuple(found.values())


def _functorch_wrapped(t: torch.Tensor) -> bool:
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped is not None and is_wrapped(t))


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # a cell not yet assigned
        return False
    return True


def _choose_units(cfg: KernelConfig, mods: Mods, ops: Operands) -> None:
    """Natural units ahead of the forward when scores or bias could overflow base-2 units and the
    pipeline has more than the plain scores (the plain forward is checked after the fact)."""
    if _unit(mods) != 1.0 and cfg.dtype != "float16" and not _is_plain(cfg, mods, ops):
        mods.natural = scores_may_overflow(cfg, ops)


class ChunkedAttention(torch.autograd.Function):
    """``(out, lse, row_max, row_sum) = attention(q, k, v, bias, ...)``.

    ``tensors`` are the ``Operands`` followed by ``mods.captured``. Saves the inputs, the output
    and two numbers per row. First derivatives use the chunked FlashAttention-2 backward; a
    second derivative (the backward called with ``create_graph=True``) recomputes the forward
    under autograd; forward mode (``jvp``) and ``torch.func.vmap`` have chunked rules of their
    own (``_higher``), for which captured tensors must carry no tangent and not be mapped
    (``chunked_attention`` refuses those).

    Units: base-2 unless ``_kernel._unit`` says otherwise; a forward in base-2 units whose scores
    overflowed them (finite scores beyond ``finfo.max / log2(e)``) is rerun in natural units."""

    @staticmethod
    def forward(cfg: KernelConfig, mods: Mods, seed: int, *tensors):
        ops = Operands(*tensors[:_N])
        _choose_units(cfg, mods, ops)
        out, row_max, row_sum = attention_forward(cfg, mods, ops, seed)
        if (
            _unit(mods) != 1.0
            and cfg.dtype != "float16"  # |scale * q.k| <= D * 65504^2 * scale: far from overflow
            and base2_overflowed(cfg, row_sum)
            and scores_may_overflow(cfg, ops)
        ):
            mods.natural = True
            out, row_max, row_sum = attention_forward(cfg, mods, ops, seed)
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
        need = tuple(ctx.needs_input_grad[3:7]) + tuple(ctx.needs_input_grad[3 + _N :])
        grads = ChunkedAttentionGrad.apply(
            ctx.cfg, ctx.mods, ctx.seed, need, out, row_max, row_sum, d_out, d_lse, *saved
        )
        return (None, None, None, *grads[:4]) + (None,) * (_N - 4) + tuple(grads[4:])

    @staticmethod
    def jvp(ctx, _cfg, _mods, _seed, *tangents):
        # Captured tensors carry no tangent (``chunked_attention`` refuses those that do); torch.func
        # hands zeros for them.
        *saved, out, row_max, row_sum = ctx.saved_tensors
        d_out, d_lse = attention_jvp(
            ctx.cfg, ctx.mods, Operands(*saved[:_N]), ctx.seed, out, row_max, row_sum, tangents[:_N]
        )
        return d_out, d_lse, None, None

    @staticmethod
    def vmap(info, in_dims, cfg: KernelConfig, mods: Mods, seed: int, *tensors):
        if any(d is not None for d in in_dims[3 + _N :]):
            raise NotImplementedError(
                "torch.func.vmap over a tensor captured by score_mod or a calc_fn is not supported"
            )
        cfg, folded = fold_vmap(info.batch_size, in_dims[3 : 3 + _N], cfg, tensors[:_N])
        outputs = ChunkedAttention.apply(cfg, mods, seed, *folded, *tensors[_N:])
        size = info.batch_size
        return tuple(x.reshape(size, x.shape[0] // size, *x.shape[1:]) for x in outputs), (0, 0, 0, 0)


class ChunkedAttentionGrad(torch.autograd.Function):
    """The chunked backward as a function of ``(d_out, d_lse, q, k, v, bias, *captured)``: its own
    backward (a second derivative) recomputes the forward under autograd and differentiates
    twice. ``need`` says which of ``(q, k, v, bias, *captured)`` need a gradient."""

    @staticmethod
    def forward(cfg, mods, seed, need, out, row_max, row_sum, d_out, d_lse, *tensors):
        ops = Operands(*tensors[:_N])
        # The captured tensors as the callables hold them (autograd differentiates those objects).
        captured = [t for t, n in zip(mods.captured, need[4:]) if n]
        grads = attention_backward(
            cfg, mods, ops, seed, out, row_max, row_sum, d_out, d_lse,
            ops.bias is not None and need[3], captured=captured,
        )  # fmt: skip
        by_captured = iter(grads[4] if captured else ())
        d_captured = tuple(next(by_captured) if n else None for n in need[4:])
        return tuple(g if n else None for g, n in zip(grads[:4], need)) + d_captured

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg, mods, seed, need, _out, _max, _sum, d_out, d_lse, *tensors = inputs
        ctx.cfg, ctx.mods, ctx.seed, ctx.need = cfg, mods, seed, need
        ctx.save_for_backward(d_out, d_lse, *tensors)

    @staticmethod
    def backward(ctx, *grad_grads):
        d_out, d_lse, *saved = ctx.saved_tensors
        ops = Operands(*saved[:_N])
        firsts = [i for i, (t, n) in enumerate(zip(ops[:4], ctx.need)) if t is not None and n]
        # Captured tensors: differentiated where the callables hold them (not replaced by leaves).
        captured = [t if t.requires_grad else None for t in ctx.mods.captured]
        cap_firsts = [n for n, t in enumerate(captured) if t is not None and ctx.need[4 + n]]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (d_out, d_lse, *ops[:4]) if t is not None]
            d_out_l, d_lse_l, *rest = leaves
            inputs = list(ops)
            for i, leaf in zip([i for i, t in enumerate(ops[:4]) if t is not None], rest):
                inputs[i] = leaf
            out, lse = attention_forward_differentiable(ctx.cfg, ctx.mods, Operands(*inputs), ctx.seed)
            wrt = [inputs[i] for i in firsts] + [captured[n] for n in cap_firsts]
            first = (
                torch.autograd.grad(
                    (out, lse),
                    wrt,
                    (d_out_l, d_lse_l),
                    create_graph=True,
                    allow_unused=True,
                )
                if out.requires_grad or lse.requires_grad
                else [None] * len(wrt)  # no query row or no key (L = 0, S = 0): nothing recorded
            )
            total = sum(
                (f * grad_grads[i]).sum()
                for f, i in zip(first, firsts + [4 + n for n in cap_firsts])
                if f is not None and grad_grads[i] is not None
            )
            targets = leaves + [t for t in captured if t is not None]
            second = (
                torch.autograd.grad(total, targets, allow_unused=True)
                if torch.is_tensor(total) and total.requires_grad
                else [None] * len(targets)
            )
        second = iter(second)
        d_d_out, d_d_lse = next(second), next(second)
        by_input = [next(second) if t is not None else None for t in ops[:4]]
        by_captured = [next(second) if t is not None else None for t in captured]
        return (None,) * 7 + (d_d_out, d_d_lse, *by_input) + (None,) * (_N - 4) + tuple(by_captured)

    @staticmethod
    def vmap(info, in_dims, cfg, mods, seed, need, *tensors):
        size = info.batch_size
        if any(need[4:]) or any(d is not None for d in in_dims[4 + 5 + _N :]):
            raise NotImplementedError(
                "torch.func.vmap of the backward with a tensor captured by score_mod or a calc_fn "
                "that needs a gradient is not supported (one gradient per mapped instance)"
            )
        # Z-led: out, row_max, row_sum, d_out, d_lse, then the operands (mask may stay broadcast;
        # the bias is expanded so that every mapped instance gets its own gradient).
        fold = 5 + _N
        cfg2, folded = fold_vmap(size, in_dims[4 : 4 + fold], cfg, tensors[:fold], broadcast=(9,))
        grads = ChunkedAttentionGrad.apply(cfg2, mods, seed, need, *folded, *tensors[fold:])
        bias, bias_dim = tensors[8], in_dims[4 + 8]
        zb = cfg.dims.batch_size
        if bias is not None:
            zb = (bias.shape if bias_dim is None else bias.movedim(bias_dim, 0).shape[1:])[0]
        z = cfg.dims.batch_size
        out = tuple(unfold_vmap(size, g, zb if i == 3 else z) for i, g in enumerate(grads[:4]))
        out += (None,) * len(grads[4:])
        return out, tuple(None if g is None else 0 for g in out)


def chunked_attention(cfg: KernelConfig, mods: Mods, seed: int, ops: Operands):
    """``(out, lse)`` of the kernel (see ``ChunkedAttention``). Tensors that the callables
    capture and that require grad become inputs of the Function (``captured_tensors``)."""
    if mods.needs_autograd:
        mods.captured = captured_tensors(
            mods.score_mod, mods.bias_calc_fn, mods.weights_calc_fn, mods.mask_calc_fn, mods.calc_fn_data
        )
        if any(_functorch_wrapped(t) or _has_tangent(t) for t in mods.captured):
            raise NotImplementedError(
                "forward mode (jvp) and torch.func transforms (grad, jvp, vmap) with respect to a "
                "tensor captured by score_mod or a calc_fn are not supported; differentiate it "
                "with torch.autograd (.backward(), torch.autograd.grad), or pass that term as a "
                "dense bias"
            )
    out, lse, _, _ = ChunkedAttention.apply(cfg, mods, seed, *ops, *mods.captured)
    return out, lse
