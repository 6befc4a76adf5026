"""The fused engine: torch's own fused attention kernels, one call per span.

Each span of ``_spans.SpanPlan`` is computed by one library kernel that returns ``(out, lse)``
(``_span_kernels``: the flash CPU kernel behind CPU SDPA; on CUDA FlashAttention-2 for spans
without a mask and the memory-efficient kernel for spans with one, or in float32); the spans are
merged by their lse (``_spec.lse_merge_weights``). A partial span gets an additive mask (0 /
-inf, plus a bias) of its own size, O(span). The kernels' backward takes the *global* ``out`` and
``lse`` and gives a span's share of dQ/dK/dV. Grouped-query attention runs without repeating K/V
where the kernel maps query head ``h`` to key/value head ``h // G`` itself.

Layouts (legend: ``_spec``)::

    q5 [Z, K, L, G, D] -> heads view [Z, H, L, D]      k, v [Z, K, S, D]
    out [Z, K, L, G, E] (E = D)      row_max = lse * unit, row_sum = 1 (0 for a row with no key)

The statistics match the chunked engine's (``exp(s - row_max) / row_sum`` in its units is P), so
every path that reads them (the chunked backward, forward mode, double backward) takes a fused
forward's too.
"""

from __future__ import annotations

import functools

import torch

from .._config import KernelConfig
from .._masks import FULL, Tile
from .._spans import DIAGONAL, MASK_ELEMENTS, SpanPlan
from .._spec import lse_merge_weights
from ._span_kernels import SpanKernel, kernels_for

_NEG_INF = float("-inf")
SPAN_Q = 1024  # query rows of a span where a mask or a window needs spans


def _kernels(ops) -> tuple[SpanKernel, SpanKernel]:
    """``(kernel for spans without a mask, kernel for spans with one)`` for this call's arrays
    (``_engines`` has checked that a kernel that takes a mask is usable)."""
    usable = kernels_for(ops.q.device.type, ops.q.dtype, ops.q.shape[-1])
    return usable[0], next(kern for kern in usable if kern.takes_mask)


def _kernel_of(span, add, plain: SpanKernel, masked: SpanKernel) -> SpanKernel:
    """The kernel of one span: the plain one unless the span has a mask (or is a causal span
    with fewer keys than rows, which the plain kernel may align differently)."""
    q0, q1, k0, k1, kind = span
    uneven = kind == DIAGONAL and plain.square_causal_only and q1 - q0 != k1 - k0
    return masked if add is not None or uneven else plain


def span_plan(cfg: KernelConfig, ops) -> SpanPlan:
    """The spans of a call: query spans of 1024 rows where masks or windows need them, partial
    spans narrow enough that their additive mask stays within ``MASK_ELEMENTS`` per
    broadcast slice."""
    dims = cfg.dims
    span_q = min(SPAN_Q, max(dims.q_len, 1))
    slices = 1
    for x in (ops.bias, ops.mask):
        if x is not None:
            slices = max(slices, x.shape[0] * x.shape[1])
    if cfg.structure.dynamic:
        slices = max(slices, dims.batch_size * (dims.q_heads if cfg.structure.mask_mod else 1))
    partial_k = max(128, MASK_ELEMENTS // (span_q * slices))
    dense = ops.bias is not None or ops.mask is not None
    return _plan(cfg.structure, span_q, partial_k, dense)


@functools.lru_cache(maxsize=256)
def _plan(structure, span_q: int, partial_k: int, dense: bool) -> SpanPlan:
    return SpanPlan.build(structure, span_q=span_q, partial_k=partial_k, dense=dense)


def _heads(x5: torch.Tensor) -> torch.Tensor:
    """``[Z, K, L, G, X]`` -> the view ``[Z, H, L, X]`` (query head ``h = k * G + g``)."""
    return x5.transpose(2, 3).flatten(1, 2)


def _span_mask(cfg: KernelConfig, mods, ops, span, dtype):
    """``(additive mask [Zm, Hm, lq, kc] or None, rows_with_a_key [Zr, Hr, lq] or None)`` of one
    span: the structured masks (unless the span is full or diagonal), the dense mask and the bias."""
    from ._kernel import _index_grids, _operand_chunk, structured_keep

    dims = cfg.dims
    q0, q1, k0, k1, kind = span
    keep = None
    if kind not in (FULL, DIAGONAL) or (kind == DIAGONAL and ops.mask is not None):
        tile = Tile(0, 0, q0, q1, k0, k1, kind)
        need = (dims.batch_size, dims.kv_heads, q1 - q0, dims.groups, k1 - k0)
        keep = structured_keep(cfg, mods, ops, tile, _index_grids(cfg, tile, ops.q.device), need)
    dense = _operand_chunk(ops.mask, cfg, q0, q1, k0, k1)
    if dense is not None:
        keep = dense if keep is None else keep & dense
    bias = _operand_chunk(ops.bias, cfg, q0, q1, k0, k1)
    if keep is None and bias is None:
        return None, None
    rows = None
    if keep is not None:
        keep = torch.as_tensor(keep, device=ops.q.device)
        keep = keep.reshape((1,) * (5 - keep.dim()) + tuple(keep.shape))
        keep = keep.expand(keep.shape[0], keep.shape[1], q1 - q0, keep.shape[3], k1 - k0)
        rows = _to_heads(keep.any(dim=-1, keepdim=True), dims)[..., 0]
        add = torch.zeros((), dtype=dtype, device=ops.q.device).masked_fill(~keep, _NEG_INF)
        add = add if bias is None else add + bias.to(dtype)
    else:
        add = bias.to(dtype)
    return _to_heads(add, dims), rows


def _to_heads(x5: torch.Tensor, dims) -> torch.Tensor:
    """A chunk broadcastable to ``[Z, K, lc, G, kc]`` -> ``[Zx, Hx, lc, kc]`` (Hx = 1 if it does
    not vary over heads)."""
    zx, kx, lc, gx, kc = x5.shape
    if kx == 1 and gx == 1:
        return x5.reshape(zx, 1, lc, kc)
    return _heads(x5.expand(zx, dims.kv_heads, lc, dims.groups, kc))


# Decoding with grouped heads (few query rows per key/value head, many keys, no mask): the keys
# split in parts of SPLIT_KEYS, all parts' scores by one batched matmul per product, merged by
# lse (flash-decoding). Measured (benchmarks/engines/decoding.py, 1 x 65536 keys, 8 heads on 1:
# 0.3x SDPA's time; on 2 and 4: 0.5-0.7x; at 16384 keys 0.6-0.9x; on 8 heads (no groups) or at
# 4096 keys torch's kernel is as fast or faster).
SPLIT_KEYS = 4096
SPLIT_MIN_KEYS = 8192
SPLIT_MAX_ROWS = 64  # query rows per key/value head (L * G)
SPLIT_MAX_SCORES = 2**23  # Z * K * L * G * S: the scores it holds at once (32 MiB in float32)


def splits_keys(cfg: KernelConfig, ops, plan: SpanPlan) -> bool:
    """Whether ``fused_forward`` takes the split-keys (decoding) path for this call."""
    dims = cfg.dims
    rows = dims.q_len * dims.groups
    spans = plan.rows[0][2] if len(plan.rows) == 1 else ()
    return (
        all(span.kind == FULL for span in spans)
        and sum(span.k1 - span.k0 for span in spans) == dims.kv_len  # every key, every row
        and ops.bias is None
        and ops.mask is None
        and dims.groups > 1
        and rows <= SPLIT_MAX_ROWS
        and dims.kv_len >= SPLIT_MIN_KEYS
        and dims.batch_size * dims.kv_heads * rows * dims.kv_len <= SPLIT_MAX_SCORES
        and ops.q.dtype in (torch.float32, torch.float64)
        and ops.k.stride(2) == dims.qk_depth
        and ops.v.stride(2) == dims.v_depth
    )


def key_parts(kv_len: int) -> int:
    """How many parts the split-keys path cuts ``kv_len`` keys into (the last takes the rest)."""
    return max(1, kv_len // SPLIT_KEYS)


def _split_keys_forward(cfg: KernelConfig, ops):
    """``fused_forward`` for decoding (``splits_keys``): ``q [Z, K, 1, L*G, D]`` against the keys
    as ``[Z, K, P, c, D]`` (plus the remainder as one more part), each part's softmax statistics
    kept, the parts merged by their lse."""
    dims = cfg.dims
    z, kh, L, g = dims.batch_size, dims.kv_heads, dims.q_len, dims.groups
    S, parts = dims.kv_len, key_parts(dims.kv_len)
    c = S // parts
    main = parts * c
    q = (ops.q * cfg.scale).reshape(z, kh, 1, L * g, dims.qk_depth)
    pieces = [(ops.k[:, :, :main].unflatten(2, (parts, c)), ops.v[:, :, :main].unflatten(2, (parts, c)))]
    if main < S:
        pieces.append((ops.k[:, :, main:].unsqueeze(2), ops.v[:, :, main:].unsqueeze(2)))
    maxes, sums, outs = [], [], []
    for k, v in pieces:
        s = torch.matmul(q, k.transpose(-1, -2))  # [Z, K, P, L*G, c]
        m = s.amax(-1, keepdim=True)
        p = s.sub_(m).exp_()
        maxes.append(m)
        sums.append(p.sum(-1, keepdim=True))
        outs.append(torch.matmul(p, v))
    m, l, o = (torch.cat(x, dim=2) if len(x) > 1 else x[0] for x in (maxes, sums, outs))
    top = m.amax(2, keepdim=True)
    w = (m - top).exp_()
    den = (l * w).sum(2)  # [Z, K, L*G, 1]
    out = (o * w).sum(2).div_(den)
    lse = top.squeeze(2) + den.log()
    return out.view(z, kh, L, g, dims.v_depth), lse.view(z, kh, L, g)


def fused_forward(cfg: KernelConfig, mods, ops):
    """``out [Z, K, L, G, E]`` (input dtype) and the natural-log ``lse [Z, K, L, G]`` (compute
    dtype; ``-inf`` for a row with no key)."""
    plan = span_plan(cfg, ops)
    if splits_keys(cfg, ops, plan):
        return _split_keys_forward(cfg, ops)
    plain, masked = _kernels(ops)
    dims = cfg.dims
    z, kh, g, e = dims.batch_size, dims.kv_heads, dims.groups, dims.v_depth
    cdt = getattr(torch, cfg.compute_dtype)
    q = _heads(ops.q)
    dev = q.device
    mask_dtype = masked.mask_dtype(ops.q.dtype)
    out = lse = None
    if len(plan.rows) > 1 or not plan.rows[0][2]:
        # Output in [Z, L, H, E] memory, seen as [Z, H, L, E]: the seed layout's order.
        out = torch.empty(z, dims.q_len, dims.q_heads, e, dtype=ops.q.dtype, device=dev).transpose(1, 2)
        lse = torch.empty(z, dims.q_heads, dims.q_len, dtype=cdt, device=dev)
    for q0, q1, spans in plan.rows:
        if not spans:
            out[:, :, q0:q1] = 0.0
            lse[:, :, q0:q1] = _NEG_INF
            continue
        acc = acc_lse = None
        for span in spans:
            add, rows = _span_mask(cfg, mods, ops, span, mask_dtype)
            kern = _kernel_of(span, add, plain, masked)
            o, l = kern.forward(
                q[:, :, q0:q1], ops.k[:, :, span.k0 : span.k1], ops.v[:, :, span.k0 : span.k1],
                span.kind == DIAGONAL, add, cfg.scale,
            )  # fmt: skip
            l = l.to(cdt)
            if rows is not None:  # a row with no key in the span: lse -inf (the kernel says 0)
                l = l.masked_fill(~rows, _NEG_INF)
                if not kern.zero_empty_rows:
                    o = o.masked_fill(~rows.unsqueeze(-1), 0.0)
            if acc is None:
                acc, acc_lse = o, l
                continue
            w_a, w_b, acc_lse = lse_merge_weights(torch, acc_lse, l)
            # (the kernel outputs 0 for a row with no key in the span; its weight is 0 too)
            acc = acc.to(cdt) * w_a.unsqueeze(-1) + o.to(cdt) * w_b.unsqueeze(-1)
        if out is None:  # one query span: the kernel's (or the merged) result is the output
            out, lse = acc.to(ops.q.dtype), acc_lse
            break
        out[:, :, q0:q1] = acc
        lse[:, :, q0:q1] = acc_lse
    return out.unflatten(1, (kh, g)).transpose(2, 3), lse.unflatten(1, (kh, g)).transpose(2, 3)


def statistics(lse: torch.Tensor, unit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_max, row_sum)`` in the chunked engine's form for a natural-log ``lse``: ``lse``
    in the units of ``unit`` and 1 (0 and 0 for a row with no key)."""
    has_key = ~lse.isneginf()
    row_max = torch.where(has_key, lse * unit, torch.zeros((), dtype=lse.dtype, device=lse.device))
    return row_max, has_key.to(lse.dtype)


def fused_backward(cfg: KernelConfig, mods, ops, out5, row_max, row_sum, d_out5, unit: float, d_lse=None):
    """``dq [Z, K, L, G, D], dk, dv [Z, K, S, D]`` (input dtype) from the global ``out`` and
    statistics (see ``fused_forward``).

    ``d_lse`` (``[Z, K, L, G]``, the gradient of the returned lse, or None) enters as the kernel's
    row term: its backward reads ``out`` only in ``D = rowsum(dO * out)``, and d lse / d s = P
    turns ``D`` into ``D - d_lse``, so ``out - (d_lse / |dO|^2) dO`` is passed for ``out`` (rows
    with ``d_lse != 0`` need ``dO != 0``: ``_engines.backward_engine`` checks)."""
    plain, masked = _kernels(ops)
    dims = cfg.dims
    dt = ops.q.dtype
    cdt = getattr(torch, cfg.compute_dtype)
    dev = ops.q.device
    lse_dtype = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    # A row with no key: lse +inf makes every exp(s - lse) 0 (no NaN, zero gradient).
    lse = torch.where(row_sum > 0, row_max / unit + row_sum.log(), torch.full_like(row_max, float("inf")))
    lse = _heads(lse.unsqueeze(-1))[..., 0].to(lse_dtype).contiguous()
    q, out, d_out = _heads(ops.q), _heads(out5.to(dt)), _heads(d_out5.to(dt))
    if d_lse is not None:
        dl = _heads(torch.nan_to_num(d_lse.to(cdt), nan=0.0, posinf=0.0, neginf=0.0).unsqueeze(-1))[..., 0]
        norm = d_out.to(cdt).square().sum(-1)
        shift = torch.where(norm > 0, dl / torch.where(norm > 0, norm, 1.0), 0.0)
        out = (out.to(cdt) - shift.unsqueeze(-1) * d_out.to(cdt)).to(dt)
    plan = span_plan(cfg, ops)
    spans = plan.spans
    mask_dtype = masked.mask_dtype(dt)
    dq = dk = dv = None
    for span in spans:
        q0, q1, k0, k1, kind = span
        add, _ = _span_mask(cfg, mods, ops, span, mask_dtype)
        gq, gk, gv = _kernel_of(span, add, plain, masked).backward(
            d_out[:, :, q0:q1], q[:, :, q0:q1], ops.k[:, :, k0:k1], ops.v[:, :, k0:k1],
            out[:, :, q0:q1], lse[:, :, q0:q1], kind == DIAGONAL, add, cfg.scale,
        )  # fmt: skip
        if len(spans) == 1 and (q0, q1, k0, k1) == (0, dims.q_len, 0, dims.kv_len):
            dq, dk, dv = gq, gk, gv  # one span covers the call: its gradients are the gradients
            break
        if dq is None:  # sums over the spans, in the compute dtype
            dq = torch.zeros(q.shape, dtype=cdt, device=dev)
            dk = torch.zeros(ops.k.shape, dtype=cdt, device=dev)
            dv = torch.zeros(ops.v.shape, dtype=cdt, device=dev)
        dq[:, :, q0:q1] += gq
        dk[:, :, k0:k1] += gk
        dv[:, :, k0:k1] += gv
    if dq is None:  # no span: no query sees a key
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(ops.k), torch.zeros_like(ops.v)
    dq5 = dq.unflatten(1, (dims.kv_heads, dims.groups)).transpose(2, 3)
    return dq5.to(dt), dk.to(dt), dv.to(dt)
