"""Higher derivatives and ``torch.func`` transforms of the PyTorch kernel.

* ``attention_forward_differentiable``: the forward of ``_kernel`` with out-of-place operations,
  so autograd records it. The first backward never uses it; a *second* derivative (double
  backward, ``gradgradcheck``) re-runs it under autograd inside ``ChunkedAttention.backward``.
  Running it holds O(n) memory, but autograd keeps every chunk it records for the next
  derivative, as any recomputation-based double backward does.
* ``attention_jvp``: forward-mode derivative, chunk by chunk, in O(n) memory. With ``dS`` the
  tangent of a chunk's scores, ``P`` its probabilities and ``r = rowsum(P * dS)`` accumulated over
  the key chunks: ``dO = (P * (dS - r) * Z) V + (P * Z) dV`` (``Z`` the dropout scale) and
  ``d lse = r``.
* ``fold_vmap``: a ``torch.func.vmap`` rule that folds the mapped dimension into the batch.

Layout legend: see ``memory_efficient_attention.torch._kernel``.
"""

from __future__ import annotations

import dataclasses

import torch

from .._config import KernelConfig
from ._kernel import (
    _NEG_INF,
    Mods,
    _dropout_scale,
    _exp_,
    _operand_chunk,
    _pairs,
    _pairs_nonempty,
    _torch_dtype,
    _transform_scores,
    _unit,
)

# ------------------------------------------------------------------------------------------------
# Differentiable forward (for the double backward)
# ------------------------------------------------------------------------------------------------


def attention_forward_differentiable(cfg: KernelConfig, mods: Mods, ops, seed: int):
    """``(out, lse)`` like ``attention_forward`` + ``log_sum_exp``, recorded by autograd."""
    dims = cfg.dims
    z, kh, g, d, e = dims.batch_size, dims.kv_heads, dims.groups, dims.qk_depth, dims.v_depth
    cdt = _torch_dtype(cfg.compute_dtype)
    q, k, v = (t.to(cdt) for t in (ops.q, ops.k, ops.v))
    unit = _unit(mods)
    fill = torch.finfo(cdt).min
    outs, lses = [], []
    for i, chunks in _pairs(cfg, _pairs_nonempty(cfg, ops), by_key=False, tiles=False):
        q0, q1 = cfg.plan.q_bounds(i)
        rows = (q1 - q0) * g
        qi = q[:, :, q0:q1].reshape(z * kh, rows, d)
        m = l = acc = None
        for c in chunks:
            kj = k[:, :, c.k0 : c.k1].reshape(z * kh, c.k1 - c.k0, d)
            vj = v[:, :, c.k0 : c.k1].reshape(z * kh, c.k1 - c.k0, e)
            s = torch.bmm(qi, kj.transpose(1, 2)) * (cfg.scale * unit)
            s = _transform_scores(
                s, cfg, mods, ops, c, _operand_chunk(ops.bias, cfg, c.q0, c.q1, c.k0, c.k1),
                _operand_chunk(ops.mask, cfg, c.q0, c.q1, c.k0, c.k1),
            )  # fmt: skip
            # The running max only stabilises: the result does not depend on it.
            m_chunk = s.detach().amax(dim=-1, keepdim=True)
            m_new = m_chunk if m is None else torch.maximum(m, m_chunk)
            m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            p = _exp_(s - m_safe, unit)
            p_sum = p.sum(dim=-1, keepdim=True)
            if cfg.dropout:
                p = p * _dropout_scale(p.shape, cfg, seed, c, p.device, cdt)
            if m is None:
                l, acc = p_sum, torch.bmm(p, vj)
            else:
                alpha = _exp_(m - m_safe, unit)
                l, acc = l * alpha + p_sum, acc * alpha + torch.bmm(p, vj)
            m = m_new
        if m is None:
            outs.append(qi.new_zeros(z * kh, rows, e))
            lses.append(qi.new_full((z * kh, rows, 1), _NEG_INF))
            continue
        kept = l > 0
        l_safe = torch.where(kept, l, torch.ones_like(l))
        outs.append(acc / l_safe * kept)
        m_safe = m.masked_fill(m == _NEG_INF, 0.0)
        m_nat = torch.where(m_safe == fill, m_safe, m_safe / unit)
        lses.append(torch.where(kept, m_nat + l_safe.log(), torch.full_like(l, _NEG_INF)))
    if not outs:  # L = 0: no query chunk
        return q.new_zeros(z, kh, 0, g, e).to(ops.q.dtype), q.new_zeros(z, kh, 0, g)
    out = torch.cat([o.view(z, kh, o.shape[1] // g, g, e) for o in outs], dim=2)
    lse = torch.cat([x.view(z, kh, x.shape[1] // g, g) for x in lses], dim=2)
    return out.to(ops.q.dtype), lse


# ------------------------------------------------------------------------------------------------
# Forward mode
# ------------------------------------------------------------------------------------------------


def attention_jvp(cfg: KernelConfig, mods: Mods, ops, seed: int, out, row_max, row_sum, tangents):
    """Tangents ``(d_out, d_lse)`` of the outputs for input tangents ``tangents`` (an
    ``Operands`` of tangents or None: its fields q, k, v and bias are used)."""
    dims = cfg.dims
    z, kh, g, d, e = dims.batch_size, dims.kv_heads, dims.groups, dims.qk_depth, dims.v_depth
    cdt = _torch_dtype(cfg.compute_dtype)
    q, k, v = (t.to(cdt) for t in (ops.q, ops.k, ops.v))
    tq, tk, tv = (None if t is None else t.to(cdt) for t in (tangents.q, tangents.k, tangents.v))
    tbias = tangents.bias
    unit = _unit(mods)
    inv_l = torch.where(row_sum > 0, row_sum.reciprocal(), torch.zeros((), dtype=cdt, device=q.device))
    out_c = out.to(cdt)
    d_outs, d_lses = [], []  # assembled out of place (torch.func transforms may batch the tangents)
    for i, chunks in _pairs(cfg, _pairs_nonempty(cfg, ops), by_key=False, tiles=False):
        q0, q1 = cfg.plan.q_bounds(i)
        rows = (q1 - q0) * g
        qi = q[:, :, q0:q1].reshape(z * kh, rows, d)
        tqi = None if tq is None else tq[:, :, q0:q1].reshape(z * kh, rows, d)
        r = torch.zeros(z * kh, rows, 1, dtype=cdt, device=q.device)
        acc = torch.zeros(z * kh, rows, e, dtype=cdt, device=q.device)
        for c in chunks:
            kj = k[:, :, c.k0 : c.k1].reshape(z * kh, c.k1 - c.k0, d)
            vj = v[:, :, c.k0 : c.k1].reshape(z * kh, c.k1 - c.k0, e)
            bias_c = _operand_chunk(ops.bias, cfg, c.q0, c.q1, c.k0, c.k1)
            mask_c = _operand_chunk(ops.mask, cfg, c.q0, c.q1, c.k0, c.k1)
            tbias_c = _operand_chunk(tbias, cfg, c.q0, c.q1, c.k0, c.k1)
            ds_raw = None  # tangent of scale * q.k^T, natural units
            if tqi is not None:
                ds_raw = torch.bmm(tqi, kj.transpose(1, 2))
            if tk is not None:
                tkj = tk[:, :, c.k0 : c.k1].reshape(z * kh, c.k1 - c.k0, d)
                term = torch.bmm(qi, tkj.transpose(1, 2))
                ds_raw = term if ds_raw is None else ds_raw + term
            if ds_raw is not None:
                ds_raw = ds_raw * cfg.scale
            s_raw = torch.bmm(qi, kj.transpose(1, 2)) * (cfg.scale * unit)
            s, ds = _scores_and_tangent(s_raw, ds_raw, cfg, mods, ops, c, bias_c, mask_c, tbias_c)
            p = _exp_(s - row_max[:, :, q0:q1].reshape(z * kh, rows, 1), unit)
            p = p * inv_l[:, :, q0:q1].reshape(z * kh, rows, 1)
            drop = _dropout_scale(p.shape, cfg, seed, c, p.device, cdt) if cfg.dropout else None
            if ds is not None:
                pds = p * ds
                r = r + pds.sum(dim=-1, keepdim=True)
                acc = acc + torch.bmm(pds if drop is None else pds * drop, vj)
            if tv is not None:
                tvj = tv[:, :, c.k0 : c.k1].reshape(z * kh, c.k1 - c.k0, e)
                acc = acc + torch.bmm(p if drop is None else p * drop, tvj)
        # The normalisation's term: -r * (P * Z) V = -r * O.
        o_i = out_c[:, :, q0:q1].reshape(z * kh, rows, e)
        d_outs.append((acc - r * o_i).view(z, kh, q1 - q0, g, e))
        d_lses.append(r.view(z, kh, q1 - q0, g))
    if not d_outs:  # L = 0: no query chunk
        return out.new_zeros(out.shape), row_max.new_zeros(row_max.shape)
    return torch.cat(d_outs, dim=2).to(out.dtype), torch.cat(d_lses, dim=2)


def _scores_and_tangent(s_raw, ds_raw, cfg, mods, ops, c, bias_c, mask_c, tbias_c):
    """A chunk's final scores (units of ``_unit``) and their tangent (natural units; None if
    zero). Keys that masks remove have tangent 0."""
    if mods.needs_autograd:  # user callables: forward-mode AD of the pipeline itself
        primals, tans = [s_raw], [torch.zeros_like(s_raw) if ds_raw is None else ds_raw]
        if bias_c is not None:
            primals.append(bias_c.detach())
            tans.append(torch.zeros_like(bias_c) if tbias_c is None else tbias_c)

        def pipeline(s, *bias):
            return _transform_scores(s.clone(), cfg, mods, ops, c, bias[0] if bias else None, mask_c)

        s, ds = torch.func.jvp(pipeline, tuple(primals), tuple(tans))
        return s, ds
    if cfg.softcap is not None and ds_raw is not None:
        t = torch.tanh(s_raw / (cfg.softcap * _unit(mods)))
        ds_raw = ds_raw * (1.0 - t * t)
    s = _transform_scores(s_raw, cfg, mods, ops, c, bias_c, mask_c)
    ds5 = None if ds_raw is None else _5d(ds_raw, cfg, c)
    if tbias_c is not None:
        ds5 = tbias_c.expand_as(_5d(s, cfg, c)) if ds5 is None else ds5 + tbias_c
    if ds5 is not None and mask_c is not None:  # a dense mask replaces the score: no tangent
        ds5 = ds5.masked_fill(mask_c.logical_not(), 0.0)
    # Excluded keys (-inf) have probability 0, so their tangent never counts.
    return s, None if ds5 is None else ds5.reshape(s.shape)


def _5d(x, cfg: KernelConfig, c):
    dims = cfg.dims
    return x.reshape(dims.batch_size, dims.kv_heads, c.q1 - c.q0, dims.groups, c.k1 - c.k0)


# ------------------------------------------------------------------------------------------------
# torch.func.vmap: fold the mapped dimension into the batch
# ------------------------------------------------------------------------------------------------


def fold_vmap(size: int, in_dims, cfg: KernelConfig, tensors, broadcast=("bias", "mask")):
    """Kernel-layout tensors by name (a dict: the ``Operands`` fields, optionally after other
    ``Z``-led tensors), each led by the batch ``Z``, with a vmapped dim (``in_dims``, the same
    names; None = not mapped) -> the matching config and the tensors (a dict) with that dim merged
    into ``Z`` (now ``size * Z``). The tensors named in ``broadcast`` (mask, bias) stay as they
    are when not mapped and broadcast over the batch; everything else is expanded (a view where
    possible)."""
    z = cfg.dims.batch_size
    folded = {}
    for name, x in tensors.items():
        dim = in_dims[name]
        if x is None:
            folded[name] = None
            continue
        if dim is None and name in broadcast and x.shape[0] == 1:
            folded[name] = x
            continue
        x = x.movedim(dim, 0) if dim is not None else x.unsqueeze(0)
        x = x.expand(size, z, *x.shape[2:])
        folded[name] = x.reshape(size * z, *x.shape[2:])
    dims = dataclasses.replace(cfg.dims, batch=(size * z,))
    return dataclasses.replace(cfg, dims=dims), folded


def unfold_vmap(size: int, x, batch: int):
    """``[size * Z, ...]`` -> ``[size, batch, ...]``: ``batch`` is ``Z``, or 1 for a gradient of a
    broadcast operand (summed over ``Z``)."""
    if x is None:
        return None
    x = x.reshape(size, x.shape[0] // size, *x.shape[1:])
    return x.sum(dim=1, keepdim=True) if batch == 1 and x.shape[1] != 1 else x
