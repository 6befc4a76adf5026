"""The PyTorch engines behind one seam: which one runs a call, forward and backward.

Every engine takes the call's ``KernelConfig``, ``Mods`` and kernel-layout ``Operands`` and
returns ``(out, row_max, row_sum)`` forward and ``(dq, dk, dv, dbias[, d_captured])`` backward,
the backward reading the *global* ``out`` and statistics (``_kernel.log_sum_exp`` turns them into
the natural-log lse). Engines (see ``_spans``):

* ``chunked`` (``_kernel``): everything; the universal fallback.
* ``fused`` (``_fused``): torch's fused kernels per span (``_span_kernels``: the flash CPU
  kernel; on CUDA FlashAttention-2 and the memory-efficient kernel); plain scores, structured
  masks, a dense boolean mask that excludes keys, a bias without gradient.

``engine="auto"`` (the default) takes ``fused`` where ``fused_refusal`` has no objection and
``chunked`` otherwise; its backward falls back to ``chunked`` when it needs what the fused kernel
cannot give (a bias gradient; a gradient of the returned lse in float16/bfloat16). The choice is
logged at DEBUG level on the ``memory_efficient_attention`` logger; ``explain`` prints it with the
plan.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .._config import KernelConfig
from .._spans import fused_refusal, fused_slower
from .._spec import AttentionInputError
from . import _flex, _fused, _span_kernels
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

log = logging.getLogger("memory_efficient_attention")
_warned: set[str] = set()


def fused_refusal_of(cfg: KernelConfig, mods: Mods, ops) -> str | None:
    """Why this call cannot run on the fused engine (None: it can)."""
    reason = fused_refusal(
        dims=cfg.dims,
        softcap=cfg.softcap,
        dropout=cfg.dropout,
        callables=mods.needs_autograd,
        dense_mask_fill=cfg.mask_fill if ops.mask is not None else None,
        device=ops.q.device.type,
    )
    device, dtype, depth = ops.q.device.type, ops.q.dtype, cfg.dims.qk_depth
    if reason is None:
        reason = _span_kernels.no_fit(device, dtype, depth)
    if reason is None:
        reason = _span_kernels.broken(device, dtype, depth)
        if reason is not None and reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"{reason}: memory_efficient_attention uses its chunked engine", stacklevel=4)
    if reason is None and ops.bias is not None and bool(torch.isneginf(ops.bias).any()):
        reason = "a bias with -inf entries (pass a boolean mask for excluded keys)"
    return reason


def choose(cfg: KernelConfig, mods: Mods, ops) -> tuple[str, str | None]:
    """``(engine, why not fused)`` for a call (``cfg.engine``: ``auto``, ``chunked``, ``fused``)."""
    if cfg.engine == "chunked":
        return "chunked", "engine='chunked' was asked for"
    if cfg.engine == "pallas":
        raise AttentionInputError(
            "engine='pallas' is the JAX functions' Pallas kernel; the PyTorch functions take "
            "engine='auto', 'fused', 'chunked' or 'flex'"
        )
    if cfg.engine == "flex":  # (whole calls go to flex_attention before any Function)
        raise AttentionInputError("engine='flex' runs whole calls; the tile interface takes the others")
    if cfg.dims.empty:
        return "chunked", "an empty batch, query or key axis"
    reason = fused_refusal_of(cfg, mods, ops)
    if reason is not None and cfg.engine == "fused":
        raise AttentionInputError(
            f"engine='fused' cannot run this call: it has {reason}; pass engine='auto' (chooses "
            "per call) or engine='chunked'"
        )
    if reason is None and cfg.engine == "auto" and ops.q.device.type == "cpu":
        # (measured on CPU; on CUDA the chunked engine's many small kernels cannot compete)
        reason = fused_slower(cfg.structure) or _strided_decoding(cfg, ops)
    return ("fused" if reason is None else "chunked"), reason


STRIDED_MIN_KEYS = 32768


def _strided_decoding(cfg: KernelConfig, ops) -> str | None:
    """Few query rows, one per key/value head, against keys laid out ``[B..., S, K, D]`` (the seed
    layout): torch's fused kernel reads each head's keys strided, and the chunked engine measured
    faster (decoding 1 x 65536, 8 heads: 27 ms against 34 ms; heads-first keys, as in Hugging
    Face's KV cache, take 10 ms fused, as SDPA). With grouped queries the fused kernel wins
    (8192 keys x 8 rows, 32 heads on 4: 29 ms against 58 ms), and with fewer keys too (4096:
    1.5 ms fused against 3.0 chunked; 16384: 8.0 against 8.9; ``benchmarks/engines/decoding.py``)."""
    dims = cfg.dims
    few = dims.q_len * dims.groups <= 8 and dims.groups == 1 and dims.kv_len >= STRIDED_MIN_KEYS
    if few and dims.kv_heads > 1 and ops.k.stride(2) != dims.qk_depth:
        return "few query rows against keys strided per head ([B..., S, K, D]: chunked measured faster)"
    return None


def _forward_engine(cfg: KernelConfig, mods: Mods, ops) -> str:
    """The forward's engine (``choose``), remembered in ``mods.engine`` and logged."""
    engine, reason = choose(cfg, mods, ops)
    mods.engine = engine
    if log.isEnabledFor(logging.DEBUG):
        log.debug("forward: %s engine%s", engine, "" if reason is None else f" ({reason})")
    return engine


def forward(cfg: KernelConfig, mods: Mods, ops, seed: int):
    """``(out, row_max, row_sum)`` by the engine ``choose`` picks (remembered in ``mods.engine``)."""
    if _forward_engine(cfg, mods, ops) == "fused":
        out, lse = _fused.fused_forward(cfg, mods, ops)
        limit = torch.finfo(lse.dtype).max / 4
        if _unit(mods) != 1.0 and not bool(lse.nan_to_num(neginf=0.0).abs().amax() <= limit):
            mods.natural = True  # an lse beyond base-2 units: the statistics in natural units
        return (out, *_fused.statistics(lse, _unit(mods)))
    return _chunked_forward(cfg, mods, ops, seed)


def forward_only(cfg: KernelConfig, mods: Mods, ops, seed: int):
    """``(out, lse)`` when no derivative can follow (``_function._forward_only``): the fused
    engine's lse as it comes, no statistics kept."""
    if _forward_engine(cfg, mods, ops) == "fused":
        return _fused.fused_forward(cfg, mods, ops)
    out, row_max, row_sum = _chunked_forward(cfg, mods, ops, seed)
    return out, log_sum_exp(row_max, row_sum, mods)


def _chunked_forward(cfg: KernelConfig, mods: Mods, ops, seed: int):
    # Natural units ahead of the forward when scores or bias could overflow base-2 units and the
    # pipeline has more than the plain scores (the plain forward is checked after the fact).
    if _unit(mods) != 1.0 and cfg.dtype != "float16" and not _is_plain(cfg, mods, ops):
        mods.natural = scores_may_overflow(cfg, ops)
    out, row_max, row_sum = attention_forward(cfg, mods, ops, seed)
    if (
        _unit(mods) != 1.0
        and cfg.dtype != "float16"  # |scale * q.k| <= D * 65504^2 * scale: far from overflow
        and base2_overflowed(cfg, row_sum)
        and scores_may_overflow(cfg, ops)
    ):
        mods.natural = True
        out, row_max, row_sum = attention_forward(cfg, mods, ops, seed)
    return out, row_max, row_sum


def _lse_gradient_fits(ops, d_lse, d_out) -> bool:
    """Whether the fused backward can take ``d_lse`` (``_fused.fused_backward``): float32 or
    float64, and every row with ``d_lse != 0`` has a nonzero ``dO`` (one reduction, one sync)."""
    if d_out is None or ops.q.dtype not in (torch.float32, torch.float64):
        return False
    norm = d_out.to(d_lse.dtype).square().sum(-1)
    return not bool(((d_lse != 0) & (norm == 0)).any())


def backward_engine(cfg: KernelConfig, mods: Mods, ops, d_lse, need_bias_grad: bool, captured,
                    d_out=None) -> str:  # fmt: skip
    """The engine of a backward: the forward's, unless it needs what the fused kernel lacks."""
    engine = mods.engine or choose(cfg, mods, ops)[0]
    if engine != "fused":
        return "chunked"
    why = None
    if need_bias_grad:
        why = "a bias gradient"
    elif captured:
        why = "gradients of captured tensors"
    elif d_lse is not None and bool(d_lse.any()) and not _lse_gradient_fits(ops, d_lse, d_out):
        why = "a gradient of the returned lse (in float16/bfloat16, or on a row whose dO is 0)"
    if why is not None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("backward: chunked engine (it needs %s)", why)
        return "chunked"
    return "fused"


def backward(cfg: KernelConfig, mods: Mods, ops, seed, out, row_max, row_sum, d_out, d_lse,
             need_bias_grad: bool, captured=None):  # fmt: skip
    """Gradients (see ``_kernel.attention_backward``) by ``backward_engine``'s choice."""
    if backward_engine(cfg, mods, ops, d_lse, need_bias_grad, captured, d_out) == "fused":
        if log.isEnabledFor(logging.DEBUG):
            log.debug("backward: fused engine")
        d_lse = d_lse if d_lse is not None and bool(d_lse.any()) else None
        dq, dk, dv = _fused.fused_backward(cfg, mods, ops, out, row_max, row_sum, d_out, _unit(mods), d_lse)
        return (dq, dk, dv, None, []) if captured else (dq, dk, dv, None)
    return attention_backward(cfg, mods, ops, seed, out, row_max, row_sum, d_out, d_lse,
                              need_bias_grad, captured=captured)  # fmt: skip


def _flex_refusal(cfg: KernelConfig, mods: Mods, ops) -> str | None:
    tensors = [ops.q, ops.k, ops.v, ops.bias]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _flex.refusal(cfg, mods, ops, needs_grad=needs_grad)


def flex_attention(cfg: KernelConfig, mods: Mods, ops):
    """``(out, lse)`` of a call by FlexAttention (``engine="flex"``; see ``_flex``)."""
    reason = _flex_refusal(cfg, mods, ops)
    if reason is not None:
        raise AttentionInputError(
            f"engine='flex' cannot run this call: it has {reason}; pass engine='auto' or 'chunked'"
        )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("forward: flex engine")
    return _flex.attention(cfg, mods, ops)


def explain(cfg: KernelConfig, mods: Mods, ops) -> str:
    """The engine a call runs on and its plan, as text."""
    if cfg.engine == "flex":
        reason = _flex_refusal(cfg, mods, ops)
        if reason is not None:
            return f"engine: flex cannot run this call ({reason})"
        return f"engine: flex (torch.nn.attention.flex_attention, one call)\n{_flex.describe(cfg)}"
    engine, reason = choose(cfg, mods, ops)
    if engine == "fused":
        plain, masked = _fused._kernels(ops)
        plan = _fused.span_plan(cfg, ops)
        if _fused.splits_keys(cfg, ops, plan):
            parts = _fused.key_parts(cfg.dims.kv_len)
            head = (
                f"engine: fused (decoding: the keys in {parts} part{'s' * (parts > 1)}, batched "
                f"matmuls, merged by lse; torch's {plain.name} for the backward)"
            )
            return f"{head}\n{plan}"
        kernels = f"{plain.name} per span"
        if plain is not masked:
            kernels += f" without a mask, {masked.name} with one"
        head = f"engine: fused (torch's {kernels}, merged by lse)"
        return f"{head}\n{plan}"
    why = f" (not fused: {reason})" if reason else ""
    return f"engine: chunked{why}\n{cfg.plan}"
