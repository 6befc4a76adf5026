"""The PyTorch kernel: chunked attention with online softmax and a FlashAttention-2 backward.

Kernel layout (see ``memory_efficient_attention._spec``)::

    q     [Z, K, L, G, D]     k  [Z, K, S, D]     v  [Z, K, S, E]
    bias  [Zb, Hb, Lb, Sb]    mask (bool) likewise; each size 1 or full
    out   [Z, K, L, G, E]     row_max, row_sum  [Z, K, L, G]  (compute dtype)

A query chunk ``q[:, :, l0:l1]`` is the strided view ``[Z*K, lc*G, D]``; its scores against a key
chunk are one ``baddbmm`` into a reused buffer ``[Z*K, lc*G, kc]`` (viewed ``[Z, K, lc, G, kc]``
for masks and biases), with the scale fused. The forward saves only the inputs, the output and
two numbers per row (the running max and sum, i.e. the log-sum-exp in a form that stays exact for
rows whose every score is ``finfo.min``). The backward recomputes each chunk's probabilities.

The JAX kernel (``memory_efficient_attention.jax._kernel``) is the same algorithm with the same
function names, in JAX's dialect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._config import KernelConfig, chunk_keep
from .._masks import EMPTY, PARTIAL, Tile
from .._spec import check_callable_result, mask_fill_value

_NEG_INF = float("-inf")
_LOG2E = 1.4426950408889634


def _unit(mods) -> float:
    """Scores are kept in base-2 units (``log2(e) * score``, so the softmax uses ``exp2``, about
    three times cheaper than ``exp`` on CPUs) unless user callables must see natural scores, or
    scores so large that ``log2(e) * score`` would overflow (``Mods.natural``, see
    ``scores_may_overflow``) need natural units."""
    return 1.0 if mods.needs_autograd or mods.natural else _LOG2E


def _exp_(x, unit: float):
    return x.exp2_() if unit != 1.0 else x.exp_()


@dataclass
class Mods:
    """The user callables of one call (not hashable data: kept apart from ``KernelConfig``)."""

    score_mod: Any = None
    mask_mod: Any = None
    bias_calc_fn: Any = None
    mask_calc_fn: Any = None
    weights_calc_fn: Any = None
    calc_fn_data: Any = None
    # Tensors the callables capture that require grad (``_function.captured_tensors``): extra
    # inputs of the autograd Function, whose gradients the backward accumulates chunk by chunk.
    captured: tuple = ()
    # Natural units although no callable needs them: finite scores beyond finfo.max / log2(e).
    natural: bool = False
    # The engine the forward ran on (``_engines.forward``), read by the backward.
    engine: str | None = None

    @property
    def seed_callbacks(self) -> bool:
        return any(f is not None for f in (self.bias_calc_fn, self.mask_calc_fn, self.weights_calc_fn))

    @property
    def needs_autograd(self) -> bool:
        """Whether the backward differentiates the score pipeline with autograd, chunk by chunk
        (user callables), instead of the hand-written rule."""
        return self.seed_callbacks or self.score_mod is not None


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------------
# Chunk views
# ------------------------------------------------------------------------------------------------


def _operand_chunk(x: torch.Tensor | None, cfg: KernelConfig, q0, q1, k0, k1):
    """``[Zb, Hb, Lb, Sb]`` -> the chunk as ``[Zb, Kb, lcb, Gb, kcb]``, broadcastable to scores."""
    if x is None:
        return None
    zb, hb, lb, sb = x.shape
    rows = slice(q0, q1) if lb > 1 else slice(None)
    cols = slice(k0, k1) if sb > 1 else slice(None)
    x = x[:, :, rows, cols]
    kb, gb = (cfg.dims.kv_heads, cfg.dims.groups) if hb > 1 else (1, 1)
    return x.reshape(zb, kb, gb, x.shape[2], x.shape[3]).permute(0, 1, 3, 2, 4)


def _seed_to_chunk(x: torch.Tensor, cfg: KernelConfig) -> torch.Tensor:
    """A callback's bias/mask ``[B..., H, lc, kc]`` (broadcastable) -> ``[Zb, Kb, lc, Gb, kc]``."""
    dims = cfg.dims
    nb = len(dims.batch)
    x = x.reshape((1,) * (nb + 3 - x.dim()) + tuple(x.shape))
    if any(s != 1 for s in x.shape[:nb]):
        x = x.expand(*dims.batch, *x.shape[nb:])
    x = x.reshape(-1, *x.shape[nb:])
    zb, hb, lb, sb = x.shape
    kb, gb = (dims.kv_heads, dims.groups) if hb > 1 else (1, 1)
    return x.reshape(zb, kb, gb, lb, sb).permute(0, 1, 3, 2, 4)


def _chunk_to_seed(x: torch.Tensor | None, cfg: KernelConfig):
    """Inverse of ``_seed_to_chunk`` for the bias/mask chunk handed to a callback."""
    if x is None:
        return None
    zb, kb, lb, gb, sb = x.shape
    batch = cfg.dims.batch if zb > 1 else (1,) * len(cfg.dims.batch)
    return x.permute(0, 1, 3, 2, 4).reshape(*batch, kb * gb, lb, sb)


def _index_grids(cfg: KernelConfig, c: Tile, device):
    dims = cfg.dims
    q_idx = torch.arange(c.q0, c.q1, device=device).view(1, 1, -1, 1, 1)
    k_idx = torch.arange(c.k0, c.k1, device=device).view(1, 1, 1, 1, -1)
    b_idx = torch.arange(dims.batch_size, device=device).view(-1, 1, 1, 1, 1)
    h_idx = torch.arange(dims.q_heads, device=device).view(1, dims.kv_heads, 1, dims.groups, 1)
    return q_idx, k_idx, b_idx, h_idx


# ------------------------------------------------------------------------------------------------
# The score pipeline of one chunk, in ``_spec.SCORE_PIPELINE``'s order: scale (fused in the
# matmul), soft cap, bias, seed callbacks, dense mask, score_mod, structured masks. ``s`` is
# modified in place and returned, in the units of ``_unit`` (the matmul's alpha includes them).
# ------------------------------------------------------------------------------------------------


def _fill_value(cfg: KernelConfig, dtype) -> float:
    """A dense mask's value for masked scores (``_spec.mask_fill_value``)."""
    return mask_fill_value(cfg.mask_fill, torch.finfo(dtype).min)


# What score_mod and mask_mod results must broadcast to: the score chunk handed to score_mod.
_SCORE_LEGEND = "[Z, K, lc, G, kc] (batch, key/value heads, query chunk, heads per key/value head, key chunk)"


def _checked_mask_mod(mods: Mods, need, device):
    """``mods.mask_mod`` with its result checked (bool, broadcastable to the chunk) and made a
    tensor (a Python bool broadcasts)."""

    def mask_mod(b, h, q_idx, kv_idx):
        keep = mods.mask_mod(b, h, q_idx, kv_idx)
        check_callable_result("mask_mod", keep, need, _SCORE_LEGEND, want="bool")
        return torch.as_tensor(keep, device=device)

    return mask_mod


def _transform_scores(s, cfg: KernelConfig, mods: Mods, ops, c: Tile, bias_c, mask_c):
    dims = cfg.dims
    s5 = s.view(dims.batch_size, dims.kv_heads, c.q1 - c.q0, dims.groups, c.k1 - c.k0)
    unit = _unit(mods)
    if cfg.softcap is not None:
        cap = cfg.softcap * unit
        if s.requires_grad:  # under autograd (user callables): keep tanh's output intact
            s5.copy_(torch.tanh(s5 / cap) * cap)
        else:
            s5.div_(cap).tanh_().mul_(cap)
    if mods.seed_callbacks:
        s5, mask_c = _seed_callbacks(s5, cfg, mods, c, bias_c, mask_c)
    elif bias_c is not None:
        s5.add_(bias_c, alpha=unit)
    if mask_c is not None:
        s5.masked_fill_(mask_c.logical_not(), _fill_value(cfg, s.dtype))
    grids = None
    if mods.score_mod is not None:
        grids = _index_grids(cfg, c, s.device)
        q_idx, k_idx, b_idx, h_idx = grids
        modded = mods.score_mod(s5, b_idx, h_idx, q_idx, k_idx)
        check_callable_result("score_mod", modded, s5.shape, _SCORE_LEGEND, want="float")
        if isinstance(modded, torch.Tensor):
            s5.copy_(modded)  # broadcasts a mod that returns fewer dims
        else:
            s5.fill_(float(modded))
    if c.kind == PARTIAL:
        keep = structured_keep(cfg, mods, ops, c, grids or _index_grids(cfg, c, s.device), s5.shape)
        if keep is not None:
            s5.masked_fill_(keep.logical_not(), _NEG_INF)
    return s


def structured_keep(cfg: KernelConfig, mods: Mods, ops, c: Tile, grids, need):
    """The structured masks' keep mask of tile ``c`` (``_config.chunk_keep`` on the index grids
    of ``_index_grids``; the lengths, segment ids and ``mask_mod`` of the call), broadcastable to
    ``need`` ``[Z, K, lc, G, kc]``; None if nothing is masked."""
    q_idx, k_idx, b_idx, h_idx = grids
    lc, kc = c.q1 - c.q0, c.k1 - c.k0
    qs, ks = ops.q_segments, ops.kv_segments
    return chunk_keep(
        cfg.structure,
        q_idx,
        k_idx,
        q_lengths=None if ops.q_lengths is None else ops.q_lengths.view(-1, 1, 1, 1, 1),
        kv_lengths=None if ops.kv_lengths is None else ops.kv_lengths.view(-1, 1, 1, 1, 1),
        q_segments=None if qs is None else qs[:, c.q0 : c.q1].view(-1, 1, lc, 1, 1),
        kv_segments=None if ks is None else ks[:, c.k0 : c.k1].view(-1, 1, 1, 1, kc),
        mask_mod=None if mods.mask_mod is None else _checked_mask_mod(mods, need, q_idx.device),
        batch_idx=b_idx,
        head_idx=h_idx,
    )


def _seed_callbacks(s5, cfg: KernelConfig, mods: Mods, c: Tile, bias_c, mask_c):
    """The seed's callbacks, in the seed's order and layout ``[B..., lc, H, kc]``."""
    dims = cfg.dims
    lc, kc = c.q1 - c.q0, c.k1 - c.k0

    def seed_weights(x):
        return x.permute(0, 2, 1, 3, 4).reshape(*dims.batch, lc, dims.q_heads, kc)

    def from_seed_weights(w):
        w = (
            w.expand(*dims.batch, lc, dims.q_heads, kc)
            if w.shape != (*dims.batch, lc, dims.q_heads, kc)
            else w
        )
        return w.reshape(dims.batch_size, lc, dims.kv_heads, dims.groups, kc).permute(0, 2, 1, 3, 4)

    # A bias or mask callback may return None (the seed's "no bias/mask for this chunk").
    chunk = (*dims.batch, dims.q_heads, lc, kc)
    data = mods.calc_fn_data
    if mods.bias_calc_fn is not None:
        bias = mods.bias_calc_fn(c.q0, c.k0, _chunk_to_seed(bias_c, cfg), seed_weights(s5), data)
        if bias is not None:
            check_callable_result("bias_calc_fn", bias, chunk, "[B..., H, lc, kc]", want="float")
        bias_c = None if bias is None else _seed_to_chunk(torch.as_tensor(bias, device=s5.device), cfg)
    if bias_c is not None:
        s5.add_(bias_c)
    if mods.mask_calc_fn is not None:
        mask = mods.mask_calc_fn(c.q0, c.k0, _chunk_to_seed(mask_c, cfg), seed_weights(s5), data)
        if mask is not None:
            check_callable_result("mask_calc_fn", mask, chunk, "[B..., H, lc, kc]", want="bool")
        mask_c = None if mask is None else _seed_to_chunk(torch.as_tensor(mask, device=s5.device), cfg)
    if mask_c is not None:
        s5.masked_fill_(mask_c.logical_not(), _fill_value(cfg, s5.dtype))
        mask_c = None
    if mods.weights_calc_fn is not None:
        w = mods.weights_calc_fn(c.q0, c.k0, seed_weights(s5), data)
        need = (*dims.batch, lc, dims.q_heads, kc)
        check_callable_result("weights_calc_fn", w, need, "[B..., lc, H, kc]", want="float")
        w = torch.as_tensor(w, device=s5.device)
        s5.copy_(from_seed_weights(w.to(s5.dtype).reshape((1,) * (len(need) - w.dim()) + tuple(w.shape))))
    return s5, mask_c


# ------------------------------------------------------------------------------------------------
# Dropout: a keep mask regenerated from (seed, i, j) in forward and backward, never stored.
# ------------------------------------------------------------------------------------------------


def _dropout_scale(shape, cfg: KernelConfig, seed: int, c: Tile, device, dtype):
    """``keep / (1 - p)`` for one chunk, a function of (seed, i, j) alone."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + 0x9E3779B97F4A7C15 * (c.i + 1) + 0xBF58476D1CE4E5B9 * (c.j + 1)) % 2**63)
    keep = torch.rand(shape, generator=gen, device=device, dtype=dtype) >= cfg.dropout
    return keep.to(dtype).div_(1.0 - cfg.dropout)


# ------------------------------------------------------------------------------------------------
# The plan of chunk pairs, with run-time skips from lengths and segments.
# ------------------------------------------------------------------------------------------------


def _pairs_nonempty(cfg: KernelConfig, ops) -> list[list[bool]] | None:
    """Which pairs lengths/segments leave non-empty for some batch element (one device sync)."""
    if ops.q_lengths is None and ops.kv_lengths is None and ops.q_segments is None:
        return None
    plan = cfg.plan
    dev = ops.q.device
    q_starts = torch.tensor([plan.q_bounds(i)[0] for i in range(plan.num_q_chunks)], device=dev)
    k_starts = torch.tensor([plan.k_bounds(j)[0] for j in range(plan.num_k_chunks)], device=dev)
    z = cfg.dims.batch_size
    ok = torch.ones(z, len(q_starts), len(k_starts), dtype=torch.bool, device=dev)
    if ops.q_lengths is not None:
        ok &= (q_starts.view(1, -1) < ops.q_lengths.view(-1, 1)).view(z, -1, 1)
    if ops.kv_lengths is not None:
        ok &= (k_starts.view(1, -1) < ops.kv_lengths.view(-1, 1)).view(z, 1, -1)
    if ops.q_segments is not None:
        q_mm = [ops.q_segments[:, a:b].aminmax(dim=1) for a, b in map(plan.q_bounds, range(len(q_starts)))]
        k_mm = [ops.kv_segments[:, a:b].aminmax(dim=1) for a, b in map(plan.k_bounds, range(len(k_starts)))]
        q_min, q_max = (torch.stack(t, dim=1).view(z, -1, 1) for t in zip(*q_mm))
        k_min, k_max = (torch.stack(t, dim=1).view(z, 1, -1) for t in zip(*k_mm))
        ok &= (q_min <= k_max) & (k_min <= q_max)
    return ok.any(dim=0).tolist()


def _pairs(cfg: KernelConfig, nonempty, *, by_key: bool, tiles: bool = True):
    """The tiles to compute (whole chunk pairs unless ``tiles``), grouped by query chunk
    (forward) or by key chunk (backward): yields ``(outer, [Tile, ...])``."""
    plan = cfg.plan
    outer_n = plan.num_k_chunks if by_key else plan.num_q_chunks
    for o in range(outer_n):
        lo, hi = plan.query_chunks(o) if by_key else plan.key_chunks(o)
        chunks = []
        for inner in range(lo, hi):
            i, j = (inner, o) if by_key else (o, inner)
            kind = plan.kinds[i][j]
            if kind == EMPTY or (nonempty is not None and not nonempty[i][j]):
                continue
            if tiles:
                chunks.extend(plan.pair_tiles(i, j))
            else:
                chunks.append(Tile(i, j, *plan.q_bounds(i), *plan.k_bounds(j), kind))
        yield o, chunks


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def _is_plain(cfg: KernelConfig, mods: Mods, ops) -> bool:
    """No bias, dense mask, soft cap or user callable: only partial blocks of the structured
    masks need score work."""
    return ops.bias is None and ops.mask is None and cfg.softcap is None and not mods.needs_autograd


def scores_may_overflow(cfg: KernelConfig, ops) -> bool:
    """Whether some finite score could leave the range of base-2 units (``|score| * log2(e)``
    near ``finfo.max`` of the compute dtype), from a bound on ``|scale * q.k| <= scale * |q| |k|``
    (or the soft cap) plus ``max |bias|``: one reduction over q, k and the bias, one sync."""
    if cfg.dims.empty:
        return False
    cdt = _torch_dtype(cfg.compute_dtype)
    if cfg.softcap is not None:
        bound = torch.tensor(cfg.softcap, dtype=cdt)
    else:
        norms = [torch.linalg.vector_norm(t, dim=-1, dtype=cdt).amax() for t in (ops.q, ops.k)]
        bound = norms[0] * norms[1] * abs(cfg.scale)
    if ops.bias is not None and ops.bias.numel():
        low, high = (x.to(cdt) for x in torch.aminmax(ops.bias))
        bound = bound.to(low.device) + torch.maximum(-low, high)
    # Half of the limit: room for the softmax's own sums of two scores.
    return not bool(bound <= torch.finfo(cdt).max / _LOG2E / 2)


def base2_overflowed(cfg: KernelConfig, row_sum: torch.Tensor) -> bool:
    """After a plain forward in base-2 units: whether a row may have overflowed (a non-finite
    row sum, or, with structured masks, a row with no key left, which a row whose every score is
    below ``-finfo.max / log2(e)`` also looks like). One reduction over the rows, one sync."""
    if row_sum.numel() == 0:
        return False
    bad = ~torch.isfinite(row_sum)
    if cfg.structure.any:
        bad = bad | (row_sum == 0)
    return bool(bad.any())


def attention_forward(cfg: KernelConfig, mods: Mods, ops, seed: int):
    """Returns ``out [Z, K, L, G, E]`` (input dtype), ``row_max``, ``row_sum`` ``[Z, K, L, G]``."""
    dims = cfg.dims
    z, kh, g, d, e = dims.batch_size, dims.kv_heads, dims.groups, dims.qk_depth, dims.v_depth
    cdt = _torch_dtype(cfg.compute_dtype)
    q, k, v = (t.to(cdt) for t in (ops.q, ops.k, ops.v))
    dev = q.device
    out = torch.empty(z, kh, dims.q_len, g, e, dtype=cdt, device=dev)
    row_max = torch.zeros(z, kh, dims.q_len, g, dtype=cdt, device=dev)
    row_sum = torch.zeros(z, kh, dims.q_len, g, dtype=cdt, device=dev)
    buf = torch.empty(z * kh * cfg.q_chunk * g * cfg.k_chunk, dtype=cdt, device=dev)
    nonempty = _pairs_nonempty(cfg, ops)
    unit = _unit(mods)

    plain = _is_plain(cfg, mods, ops)
    guard = not plain or cfg.structure.any
    for i, chunks in _pairs(cfg, nonempty, by_key=False):
        q0, q1 = cfg.plan.q_bounds(i)
        rows = (q1 - q0) * g
        if not chunks:  # every key excluded: output 0, lse -inf
            out[:, :, q0:q1] = 0.0
            continue
        qi = q[:, :, q0:q1].reshape(z * kh, rows, d)
        m = torch.empty(z * kh, rows, 1, dtype=cdt, device=dev)
        l = torch.empty(z * kh, rows, 1, dtype=cdt, device=dev)
        acc = torch.empty(z * kh, rows, e, dtype=cdt, device=dev)
        # The first tile overwrites the state when it covers every row; otherwise start empty.
        fresh = chunks[0].q0 == q0 and chunks[0].q1 == q1
        if not fresh:
            m.fill_(_NEG_INF)
            l.zero_()
            acc.zero_()
        for n, c in enumerate(chunks):
            kc = c.k1 - c.k0
            r0, r1 = (c.q0 - q0) * g, (c.q1 - q0) * g
            kj = k[:, :, c.k0 : c.k1].reshape(z * kh, kc, d)
            vj = v[:, :, c.k0 : c.k1].reshape(z * kh, kc, e)
            s = buf[: z * kh * (r1 - r0) * kc].view(z * kh, r1 - r0, kc)
            torch.baddbmm(s, qi[:, r0:r1], kj.transpose(1, 2), beta=0, alpha=cfg.scale * unit, out=s)
            if not (plain and c.kind != PARTIAL):
                s = _transform_scores(
                    s, cfg, mods, ops, c, _operand_chunk(ops.bias, cfg, c.q0, c.q1, c.k0, c.k1),
                    _operand_chunk(ops.mask, cfg, c.q0, c.q1, c.k0, c.k1),
                )  # fmt: skip
            m_t, l_t, acc_t = m[:, r0:r1], l[:, r0:r1], acc[:, r0:r1]
            m_chunk = s.amax(dim=-1, keepdim=True)
            first = n == 0 and fresh
            m_new = m_chunk if first else torch.maximum(m_t, m_chunk)
            # Rows with no key so far have max -inf: shift by 0 instead (exp(-inf) = 0, no NaN).
            m_safe = m_new if not guard else m_new.masked_fill(m_new == _NEG_INF, 0.0)
            p = _exp_(s.sub_(m_safe), unit)
            p_sum = p.sum(dim=-1, keepdim=True)
            if cfg.dropout:
                p = p.mul_(_dropout_scale(p.shape, cfg, seed, c, dev, cdt))
            if first:  # nothing to rescale yet
                l_t.copy_(p_sum)
                torch.bmm(p, vj, out=acc_t)
            else:
                alpha = _exp_(m_t - m_safe, unit)
                l_t.mul_(alpha).add_(p_sum)
                acc_t.mul_(alpha).baddbmm_(p, vj)
            m_t.copy_(m_new)
        m_safe = m.masked_fill(m == _NEG_INF, 0.0)
        inv_l = torch.where(l > 0, l.reciprocal(), torch.zeros((), dtype=cdt, device=dev))
        out[:, :, q0:q1] = acc.mul_(inv_l).view(z, kh, q1 - q0, g, e)
        row_max[:, :, q0:q1] = m_safe.view(z, kh, q1 - q0, g)
        row_sum[:, :, q0:q1] = l.view(z, kh, q1 - q0, g)
    return out.to(ops.q.dtype), row_max, row_sum


def log_sum_exp(row_max: torch.Tensor, row_sum: torch.Tensor, mods: Mods) -> torch.Tensor:
    """The natural log-sum-exp ``max + log(sum)`` (``max`` in the units of ``_unit``); ``-inf``
    for rows with no key left. A row whose every score is the dense mask's ``finfo.min`` keeps it
    (that fill value is the same in both units)."""
    fill = torch.finfo(row_max.dtype).min
    lse = torch.where(row_max == fill, row_max, row_max / _unit(mods)) + row_sum.log()
    return torch.where(row_sum > 0, lse, torch.full_like(row_sum, _NEG_INF))


# ------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2): outer loop over key chunks, dQ accumulated in place.
# ------------------------------------------------------------------------------------------------


def attention_backward(cfg: KernelConfig, mods: Mods, ops, seed, out, row_max, row_sum, d_out,
                       d_lse, need_bias_grad: bool, captured=None):  # fmt: skip
    """Gradients ``dq, dk, dv`` (kernel layout, input dtype) and ``dbias`` (its own shape).

    ``d_lse`` (the gradient of the returned log-sum-exp, or None) enters through the row term:
    d lse / d s = P, so it shifts ``D = rowsum(dO * O)`` to ``D - d_lse``.

    ``captured``: tensors the user callables capture (see ``Mods.captured``) to differentiate as
    well; with it, a fifth result holds their gradients (each summed over the chunks; None where
    no chunk reaches the tensor)."""
    dims = cfg.dims
    z, kh, g, d, e = dims.batch_size, dims.kv_heads, dims.groups, dims.qk_depth, dims.v_depth
    cdt = _torch_dtype(cfg.compute_dtype)
    q, k, v = (t.to(cdt) for t in (ops.q, ops.k, ops.v))
    dev = q.device
    # Rows scaled by 1/sum: P = exp(s - max) / sum, so with dO' = dO / sum and D' = D / sum
    # dV = P~^T dO', dP' = dO' V^T, dS = P~ * (dP' - D'), P~ = exp(s - max): exact for every row.
    inv_l = torch.where(row_sum > 0, row_sum.reciprocal(), torch.zeros((), dtype=cdt, device=dev))
    d_out_c = d_out.to(cdt)
    delta = torch.linalg.vecdot(d_out_c, out.to(cdt))  # rowsum(dO * O) without an n x E temporary
    if d_lse is not None:
        delta = delta - torch.nan_to_num(d_lse.to(cdt), nan=0.0, posinf=0.0, neginf=0.0)
    inv_l = inv_l.reshape(z * kh, dims.q_len * g, 1)
    delta_s = delta.reshape(z * kh, dims.q_len * g, 1) * inv_l
    row_max = row_max.reshape(z * kh, dims.q_len * g, 1)

    dq = torch.zeros(z, kh, dims.q_len, g, d, dtype=cdt, device=dev)
    dk = torch.zeros(z, kh, dims.kv_len, d, dtype=cdt, device=dev)
    dv = torch.zeros(z, kh, dims.kv_len, e, dtype=cdt, device=dev)
    dbias = torch.zeros(ops.bias.shape, dtype=cdt, device=dev) if need_bias_grad else None
    size = z * kh * cfg.q_chunk * g * cfg.k_chunk
    s_buf = torch.empty(size, dtype=cdt, device=dev)
    dp_buf = torch.empty(size, dtype=cdt, device=dev)
    nonempty = _pairs_nonempty(cfg, ops)
    unit = _unit(mods)
    plain = _is_plain(cfg, mods, ops)
    captured = list(captured or ())
    d_captured = [None] * len(captured)

    for j, chunks in _pairs(cfg, nonempty, by_key=True):
        k0, k1 = cfg.plan.k_bounds(j)
        kc = k1 - k0
        kj = k[:, :, k0:k1].reshape(z * kh, kc, d)
        vj = v[:, :, k0:k1].reshape(z * kh, kc, e)
        dk_j = torch.zeros(z * kh, kc, d, dtype=cdt, device=dev)
        dv_j = torch.zeros(z * kh, kc, e, dtype=cdt, device=dev)
        for c in chunks:
            rows, tc = (c.q1 - c.q0) * g, c.k1 - c.k0
            r0, r1 = c.q0 * g, c.q1 * g
            c0, c1 = c.k0 - k0, c.k1 - k0  # the tile's keys within the chunk
            qi = q[:, :, c.q0 : c.q1].reshape(z * kh, rows, d)
            kt, vt = kj[:, c0:c1], vj[:, c0:c1]
            bias_c = _operand_chunk(ops.bias, cfg, c.q0, c.q1, c.k0, c.k1)
            mask_c = _operand_chunk(ops.mask, cfg, c.q0, c.q1, c.k0, c.k1)
            s = s_buf[: z * kh * rows * tc].view(z * kh, rows, tc)
            torch.baddbmm(s, qi, kt.transpose(1, 2), beta=0, alpha=cfg.scale * unit, out=s)
            if mods.needs_autograd:
                s_raw, s, bias_leaf = _scores_with_graph(s, cfg, mods, ops, c, bias_c, mask_c,
                                                         need_bias_grad)  # fmt: skip
                p = _exp_(s.detach().sub(row_max[:, r0:r1]), unit)
            else:
                tanh = s.div(cfg.softcap * unit).tanh_() if cfg.softcap is not None else None
                if not (plain and c.kind != PARTIAL):
                    s = _transform_scores(s, cfg, mods, ops, c, bias_c, mask_c)
                p = _exp_(s.sub_(row_max[:, r0:r1]), unit)
            pd = p
            if cfg.dropout:
                drop = _dropout_scale(p.shape, cfg, seed, c, dev, cdt)
                pd = p * drop
            # dO' = dO / sum for this chunk's rows (made per pair: no second copy of dO is kept)
            d_out_s = d_out_c[:, :, c.q0 : c.q1].reshape(z * kh, rows, e) * inv_l[:, r0:r1]
            dv_j[:, c0:c1].baddbmm_(pd.transpose(1, 2), d_out_s)
            dp = dp_buf[: z * kh * rows * tc].view(z * kh, rows, tc)
            torch.bmm(d_out_s, vt.transpose(1, 2), out=dp)
            if cfg.dropout:
                dp.mul_(drop)
            ds = dp.sub_(delta_s[:, r0:r1]).mul_(p)
            if mods.needs_autograd:
                leaves = [s_raw] + ([bias_leaf] if bias_leaf is not None else [])
                grads = torch.autograd.grad(s, leaves + captured, ds, allow_unused=True)
                ds = grads[0] if grads[0] is not None else torch.zeros_like(s_raw)
                if bias_leaf is not None:
                    _accumulate_bias_grad(dbias, grads[1], cfg, c)
                for n, grad in enumerate(grads[len(leaves) :]):
                    if grad is not None:
                        d_captured[n] = grad if d_captured[n] is None else d_captured[n].add_(grad)
            else:
                if mask_c is not None and cfg.mask_fill == "min":
                    ds5 = ds.view(z, kh, c.q1 - c.q0, g, tc)
                    ds5.masked_fill_(mask_c.logical_not(), 0.0)
                if need_bias_grad:
                    _accumulate_bias_grad(dbias, ds.view(z, kh, c.q1 - c.q0, g, tc), cfg, c)
                if tanh is not None:
                    ds.mul_(1.0 - tanh.square_())
            dq[:, :, c.q0 : c.q1].view(z * kh, rows, d).baddbmm_(ds, kt, alpha=cfg.scale)
            dk_j[:, c0:c1].baddbmm_(ds.transpose(1, 2), qi, alpha=cfg.scale)
        dk[:, :, k0:k1] = dk_j.view(z, kh, kc, d)
        dv[:, :, k0:k1] = dv_j.view(z, kh, kc, e)
    dt = ops.q.dtype
    grads = dq.to(dt), dk.to(dt), dv.to(dt), None if dbias is None else dbias.to(ops.bias.dtype)
    return grads if not captured else (*grads, d_captured)


def _scores_with_graph(s, cfg, mods, ops, c, bias_c, mask_c, need_bias_grad):
    """Recompute a chunk's pipeline under autograd (user callables): returns the raw-score leaf,
    the final scores and the bias leaf (or None)."""
    with torch.enable_grad():
        s_raw = s.detach().clone().requires_grad_(True)
        bias_leaf = None
        if need_bias_grad and bias_c is not None:
            bias_leaf = bias_c.detach().requires_grad_(True)
            bias_c = bias_leaf
        final = _transform_scores(s_raw.clone(), cfg, mods, ops, c, bias_c, mask_c)
    return s_raw, final, bias_leaf


def _accumulate_bias_grad(dbias, ds5, cfg: KernelConfig, c: Tile):
    """Add a chunk's dS (``[Z, K, lc, G, kc]`` or already reduced) into ``dbias [Zb, Hb, Lb, Sb]``,
    summed over the axes along which the bias broadcasts."""
    target = _operand_chunk(dbias, cfg, c.q0, c.q1, c.k0, c.k1)
    dims = [a for a in range(5) if target.shape[a] == 1 and ds5.shape[a] != 1]
    target.add_(ds5.sum(dim=dims, keepdim=True) if dims else ds5)
