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
import torch.autograd.forward_ad as forward_ad

from .._config import KernelConfig
from . import _engines as engines
from ._higher import attention_forward_differentiable, attention_jvp, fold_vmap, unfold_vmap
from ._kernel import Mods, log_sum_exp


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


# ------------------------------------------------------------------------------------------------
# The Functions' flat arguments, addressed by name
# ------------------------------------------------------------------------------------------------

# The operands that get gradients; the others (masks, lengths, segment ids) are bool or integer.
DIFFERENTIABLE = ("q", "k", "v", "bias")
# ``Z``-led tensors of the backward that precede the operands in ``ChunkedAttentionGrad.apply``.
_BACKWARD_ROWS = ("out", "row_max", "row_sum", "d_out", "d_lse")


class _Flat:
    """The flat arguments of a ``Function.apply`` (autograd wants them flat) addressed by name:
    the leading arguments ``lead``, then (with ``operands``) one per ``Operands`` field, then
    any number of trailing tensors (the captured ones).

    ``split`` reads such a flat sequence (the arguments, ``ctx.needs_input_grad``, vmap's
    ``in_dims``, a Function's outputs) into ``(dict of lead, Operands, tuple of the rest)``;
    ``join`` builds one from names (absent names are None). No position is written anywhere
    else: a new ``Operands`` field moves nothing by hand."""

    def __init__(self, *lead: str, operands: bool = True):
        self.lead = lead
        self.operands = operands
        self._stop = len(lead) + (len(Operands._fields) if operands else 0)

    def split(self, flat) -> tuple[dict, Operands | None, tuple]:
        flat = tuple(flat)
        n = len(self.lead)
        ops = Operands._make(flat[n : self._stop]) if self.operands else None
        return dict(zip(self.lead, flat[:n])), ops, flat[self._stop :]

    def join(self, lead=None, ops=None, rest=()) -> tuple:
        """``lead``, ``ops``: mappings by name (an ``Operands`` is read by field)."""
        lead = lead or {}
        ops = (ops._asdict() if isinstance(ops, Operands) else ops) or {}
        head = tuple(lead.get(name) for name in self.lead)
        middle = tuple(ops.get(name) for name in Operands._fields) if self.operands else ()
        return head + middle + tuple(rest)


# ``ChunkedAttention.apply(cfg, mods, seed, *operands, *captured)``; its ``*tensors`` alone.
_FORWARD = _Flat("cfg", "mods", "seed")
_TENSORS = _Flat()
# ``ChunkedAttentionGrad.apply(cfg, mods, seed, need, out, ..., d_lse, *operands, *captured)``.
_BACKWARD = _Flat("cfg", "mods", "seed", "need", *_BACKWARD_ROWS)
# ``ChunkedAttentionGrad``'s outputs: the gradients of ``DIFFERENTIABLE``, then of the captured.
_GRADS = _Flat(*DIFFERENTIABLE, operands=False)


class _Need(NamedTuple):
    """Which inputs of ``ChunkedAttention`` need a gradient (a static argument of the backward)."""

    ops: Operands  # of bools: only ``DIFFERENTIABLE`` fields can be True
    captured: tuple[bool, ...]

    @classmethod
    def of(cls, needs_input_grad) -> _Need:
        _, ops, captured = _FORWARD.split(needs_input_grad)
        ops = Operands._make(bool(n) and f in DIFFERENTIABLE for f, n in zip(Operands._fields, ops))
        return cls(ops, tuple(captured))


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


class ChunkedAttention(torch.autograd.Function):
    """``(out, lse, row_max, row_sum) = attention(q, k, v, bias, ...)``.

    ``tensors`` are the ``Operands`` followed by ``mods.captured`` (``_FORWARD``). Saves the
    inputs, the output and two numbers per row. First derivatives use the chunked
    FlashAttention-2 backward; a second derivative (the backward called with
    ``create_graph=True``) recomputes the forward under autograd; forward mode (``jvp``) and
    ``torch.func.vmap`` have chunked rules of their own (``_higher``), for which captured tensors
    must carry no tangent and not be mapped (``chunked_attention`` refuses those).

    The forward and the first backward run on the engine ``_engines`` picks (the fused CPU
    kernel or the chunked loop: their statistics are interchangeable). Units: base-2 unless
    ``_kernel._unit`` says otherwise; a forward in base-2 units whose scores overflowed them
    (finite scores beyond ``finfo.max / log2(e)``) is rerun in natural units."""

    @staticmethod
    def forward(cfg: KernelConfig, mods: Mods, seed: int, *tensors):
        _, ops, _ = _TENSORS.split(tensors)
        out, row_max, row_sum = engines.forward(cfg, mods, ops, seed)
        return out, log_sum_exp(row_max, row_sum, mods), row_max, row_sum

    @staticmethod
    def setup_context(ctx, inputs, output):
        static, ops, captured = _FORWARD.split(inputs)
        out, _, row_max, row_sum = output
        ctx.cfg, ctx.mods, ctx.seed = static["cfg"], static["mods"], static["seed"]
        tensors = _TENSORS.join(ops=ops, rest=captured)
        ctx.save_for_backward(*tensors, out, row_max, row_sum)
        ctx.save_for_forward(*tensors, out, row_max, row_sum)
        ctx.mark_non_differentiable(row_max, row_sum)
        ctx.lse_stride = output[1].stride()

    @staticmethod
    def backward(ctx, d_out, d_lse, _d_max, _d_sum):
        *saved, out, row_max, row_sum = ctx.saved_tensors
        _, ops, captured = _TENSORS.split(saved)
        lead = dict(
            cfg=ctx.cfg, mods=ctx.mods, seed=ctx.seed, need=_Need.of(ctx.needs_input_grad),
            out=out, row_max=row_max, row_sum=row_sum, d_out=d_out, d_lse=d_lse,
        )  # fmt: skip
        grads = ChunkedAttentionGrad.apply(*_BACKWARD.join(lead, ops, captured))
        d_ops, _, d_captured = _GRADS.split(grads)
        return _FORWARD.join(ops=d_ops, rest=d_captured)

    @staticmethod
    def jvp(ctx, *tangents):
        # Captured tensors carry no tangent (``chunked_attention`` refuses those that do); torch.func
        # hands zeros for them.
        *saved, out, row_max, row_sum = ctx.saved_tensors
        _, ops, _ = _TENSORS.split(saved)
        _, t_ops, _ = _FORWARD.split(tangents)
        d_out, d_lse = attention_jvp(ctx.cfg, ctx.mods, ops, ctx.seed, out, row_max, row_sum, t_ops)
        # A tangent laid out as its primal (the fused engine's ``out`` is a transposed view):
        # forward-mode AD on dual tensors requires it.
        return _like(d_out, out.stride()), _like(d_lse, ctx.lse_stride), None, None

    @staticmethod
    def vmap(info, in_dims, cfg: KernelConfig, mods: Mods, seed: int, *tensors):
        _, dims_ops, dims_captured = _FORWARD.split(in_dims)
        if any(d is not None for d in dims_captured):
            raise NotImplementedError(
                "torch.func.vmap over a tensor captured by score_mod or a calc_fn is not supported"
            )
        _, ops, captured = _TENSORS.split(tensors)
        cfg, folded = fold_vmap(info.batch_size, dims_ops._asdict(), cfg, ops._asdict())
        outputs = ChunkedAttention.apply(cfg, mods, seed, *_TENSORS.join(ops=folded, rest=captured))
        size = info.batch_size
        return tuple(x.reshape(size, x.shape[0] // size, *x.shape[1:]) for x in outputs), (0,) * len(outputs)


class ChunkedAttentionGrad(torch.autograd.Function):
    """The chunked backward as a function of ``(d_out, d_lse, q, k, v, bias, *captured)``: its own
    backward (a second derivative) recomputes the forward under autograd and differentiates
    twice. ``need`` (a ``_Need``) says which of ``(q, k, v, bias, *captured)`` need a gradient.
    Arguments: ``_BACKWARD``; outputs: ``_GRADS``."""

    @staticmethod
    def forward(cfg, mods, seed, need: _Need, out, row_max, row_sum, d_out, d_lse, *tensors):
        _, ops, _ = _TENSORS.split(tensors)
        # The captured tensors as the callables hold them (autograd differentiates those objects).
        captured = [t for t, n in zip(mods.captured, need.captured) if n]
        dq, dk, dv, dbias, *held = engines.backward(
            cfg, mods, ops, seed, out, row_max, row_sum, d_out, d_lse,
            ops.bias is not None and need.ops.bias, captured=captured,
        )  # fmt: skip
        d_ops = Operands(q=dq, k=dk, v=dv, bias=dbias)
        (d_held,) = held or [()]  # the captured tensors' gradients come last when asked for
        by_captured = iter(d_held)
        d_captured = tuple(next(by_captured) if n else None for n in need.captured)
        kept = {f: getattr(d_ops, f) if getattr(need.ops, f) else None for f in DIFFERENTIABLE}
        return _GRADS.join(kept, rest=d_captured)

    @staticmethod
    def setup_context(ctx, inputs, output):
        lead, ops, captured = _BACKWARD.split(inputs)
        ctx.cfg, ctx.mods, ctx.seed, ctx.need = lead["cfg"], lead["mods"], lead["seed"], lead["need"]
        ctx.save_for_backward(lead["d_out"], lead["d_lse"], *_TENSORS.join(ops=ops, rest=captured))

    @staticmethod
    def backward(ctx, *grad_grads):
        d_out, d_lse, *saved = ctx.saved_tensors
        _, ops, _ = _TENSORS.split(saved)
        gg_ops, _, gg_captured = _GRADS.split(grad_grads)
        need = ctx.need
        # The differentiable operands present, and those of them whose first gradient is asked for.
        present = [f for f in DIFFERENTIABLE if getattr(ops, f) is not None]
        firsts = [f for f in present if getattr(need.ops, f)]
        # Captured tensors: differentiated where the callables hold them (not replaced by leaves).
        captured = [t if t.requires_grad else None for t in ctx.mods.captured]
        cap_firsts = [n for n, t in enumerate(captured) if t is not None and need.captured[n]]
        with torch.enable_grad():
            d_out_l, d_lse_l = (t.detach().requires_grad_(True) for t in (d_out, d_lse))
            leaves = {f: getattr(ops, f).detach().requires_grad_(True) for f in present}
            inputs = ops._replace(**leaves)
            out, lse = attention_forward_differentiable(ctx.cfg, ctx.mods, inputs, ctx.seed)
            wrt = [leaves[f] for f in firsts] + [captured[n] for n in cap_firsts]
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
            gg = [gg_ops[f] for f in firsts] + [gg_captured[n] for n in cap_firsts]
            total = sum((f * g).sum() for f, g in zip(first, gg) if f is not None and g is not None)
            targets = [d_out_l, d_lse_l, *leaves.values()] + [t for t in captured if t is not None]
            second = (
                torch.autograd.grad(total, targets, allow_unused=True)
                if torch.is_tensor(total) and total.requires_grad
                else [None] * len(targets)
            )
        second = iter(second)
        d_d_out, d_d_lse = next(second), next(second)
        by_input = {f: next(second) for f in present}
        by_captured = [next(second) if t is not None else None for t in captured]
        lead = {"d_out": d_d_out, "d_lse": d_d_lse}
        return _BACKWARD.join(lead, by_input, by_captured)

    @staticmethod
    def vmap(info, in_dims, cfg, mods, seed, need: _Need, *tensors):
        size = info.batch_size
        dims_lead, dims_ops, dims_captured = _BACKWARD.split(in_dims)
        if any(need.captured) or any(d is not None for d in dims_captured):
            raise NotImplementedError(
                "torch.func.vmap of the backward with a tensor captured by score_mod or a calc_fn "
                "that needs a gradient is not supported (one gradient per mapped instance)"
            )
        lead, ops, captured = _BACKWARD.split((cfg, mods, seed, need, *tensors))
        # Z-led: out, row_max, row_sum, d_out, d_lse, then the operands (mask may stay broadcast;
        # the bias is expanded so that every mapped instance gets its own gradient).
        names = (*_BACKWARD_ROWS, *Operands._fields)
        zled = {**lead, **ops._asdict()}
        dims = {**dims_lead, **dims_ops._asdict()}
        cfg2, folded = fold_vmap(
            size, {n: dims[n] for n in names}, cfg, {n: zled[n] for n in names}, broadcast=("mask",)
        )
        grads = ChunkedAttentionGrad.apply(*_BACKWARD.join({**lead, **folded, "cfg": cfg2}, folded, captured))
        d_ops, _, d_captured = _GRADS.split(grads)
        zb = cfg.dims.batch_size
        if ops.bias is not None:
            bias, bias_dim = ops.bias, dims_ops.bias
            zb = (bias.shape if bias_dim is None else bias.movedim(bias_dim, 0).shape[1:])[0]
        z = cfg.dims.batch_size
        unfolded = {f: unfold_vmap(size, d_ops[f], zb if f == "bias" else z) for f in DIFFERENTIABLE}
        out = _GRADS.join(unfolded, rest=(None,) * len(d_captured))
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
    if _forward_only(ops, mods.captured):
        return engines.forward_only(cfg, mods, ops, seed)
    out, lse, _, _ = ChunkedAttention.apply(cfg, mods, seed, *ops, *mods.captured)
    return out, lse


def _like(tangent, stride):
    """``tangent`` laid out with its primal's ``stride`` (a dense layout, maybe permuted)."""
    if tangent.stride() == stride:
        return tangent
    laid = torch.empty_strided(tangent.shape, stride, dtype=tangent.dtype, device=tangent.device)
    return laid.copy_(tangent)


def _forward_only(ops: Operands, captured) -> bool:
    """Whether no derivative of this call can be asked for (no tensor requires grad, or grad mode
    is off; no forward-mode dual level; no torch.func transform): then the engine runs without
    the autograd Function and its saved statistics (inference, e.g. decoding under no_grad)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*ops, *captured)):
        return False
    # (a torch without these private flags takes the Function: always correct)
    no_dual_level = getattr(forward_ad, "_current_level", 0) < 0
    transforms = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
    return no_dual_level and not transforms()
