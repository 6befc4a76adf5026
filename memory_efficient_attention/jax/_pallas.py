"""The Pallas engine: one fused kernel per pass (FlashAttention-2 style) with the call's score
pipeline traced into its body: scale, soft cap, ``score_mod``, the structured masks (causal and
windows with block skipping from the static plan, lengths, segment ids, ``mask_mod``), GQA without
repeating K/V, and the lse saved for the backward.

Forward: grid ``(Z, H, L / bq)``; each program keeps its ``bq`` query rows and runs the online
softmax over the key blocks the static mask leaves (loop bounds from ``_masks.StructuredMask``).
Backward: ``delta = rowsum(dO * O) - dlse``; one kernel for ``dQ`` (grid over query blocks, loop
over key blocks) and one for ``dK``/``dV`` (grid ``(Z, K, S / bk)``, loop over the ``G`` query
heads of the key/value head and the query blocks that see the block). Scores are recomputed as
``P = exp(s - lse)``; the soft cap's and ``score_mod``'s derivatives come from ``jax.vjp`` of the
pipeline inside the kernel.

Layouts inside (legend: ``memory_efficient_attention._spec``): ``q [Z, H, Lp, D]``,
``k [Z, K, Sp, D]``, ``v [Z, K, Sp, E]``, ``out [Z, H, Lp, E]``, ``lse [Z, H, Lp]``; ``Lp``/``Sp``
pad the lengths to whole blocks (padded keys are masked, padded rows dropped).

Dropout: the keep mask of each pair is a counter-based hash of ``(seed, b, h, q, k)``
(``dropout_keep``), regenerated in the backward (a different mask from the chunked engine's, with
the same law). A ``bias`` ``[Zb, Hb, Lb, Sb]`` (each dim 1 or full) is read block by block and
gets its gradient at its own shape (the dQ kernel writes it per batch row and head,
``O(Z * H * Lb * Sb)``, then the broadcast dims are summed). Not covered (the chunked engine runs
these; ``refusal`` names which): a dense boolean ``mask``, the seed's callbacks,
``score_mod``/``mask_mod`` that close over traced values, float64 on an accelerator.

Lowering: on CPU the kernels run interpreted (``INTERPRET_ON_CPU``: tests, debugging; the TPU
interpreter too); on GPU/TPU they compile through Pallas (untested: no accelerator was lent).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from .._config import KernelConfig, chunk_keep
from ._kernel import Mods, Operands

__all__ = ["block_sizes", "pallas_attention", "refusal"]

_INTS = ("q_lengths", "kv_lengths", "q_segments", "kv_segments", "seed")

# How the kernels run on a CPU: ``True`` is Pallas' generic interpreter; set it to
# ``jax.experimental.pallas.tpu.InterpretParams()`` to run them through the TPU interpreter (what
# ``pltpu.force_tpu_interpret_mode()`` does for TPU kernels: TPU memory spaces and semantics).
INTERPRET_ON_CPU = True


def refusal(cfg: KernelConfig, mods: Mods, ops: Operands) -> str | None:
    """Why the Pallas engine cannot run this call, or None if it can."""
    if ops.mask is not None:
        return "a dense mask (use the structured arguments or mask_mod)"
    if mods.seed_callbacks:
        return "the seed's per-chunk callbacks"
    if any(jax.tree.leaves(ops.consts)):
        return "a score_mod/mask_mod that closes over traced arrays (pass them as constants)"
    if cfg.compute_dtype == "float64" and jax.default_backend() != "cpu":
        return "float64 on an accelerator"
    return None


def block_sizes(cfg: KernelConfig) -> tuple[int, int]:
    """Query and key block sizes: the chunk-size rule's, capped at 128 and rounded down to a
    power of two of at least 16 (what the GPU lowering tiles)."""

    def fit(n: int) -> int:
        n = max(16, min(128, n))
        return 1 << (n.bit_length() - 1)

    return fit(cfg.q_chunk), fit(cfg.k_chunk)


def _mix(x):
    """murmur3's 32-bit finaliser: every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def dropout_keep(seed, rate: float, b, h, q_idx, k_idx):
    """The dropout keep mask of pairs ``(q_idx, k_idx)`` of batch row ``b``, query head ``h``: a
    counter-based hash of ``(seed, b, h, q, k)`` (``seed``: the two uint32 words of the key), so
    the backward regenerates exactly the forward's mask, block by block, in any order.
    ``P(keep) = 1 - rate`` (to 2**-24)."""
    u32 = jnp.uint32
    x = _mix(seed[0] ^ _mix(jnp.asarray(b).astype(u32) * u32(0x9E3779B1) + jnp.asarray(h).astype(u32)))
    x = _mix(x ^ (jnp.asarray(q_idx).astype(u32) * u32(0x27D4EB2F)) ^ seed[1])
    x = _mix(x ^ jnp.asarray(k_idx).astype(u32) * u32(0x165667B1))
    threshold = u32(min(int(rate * 2**24), 2**24))
    return (x >> 8) >= threshold


# ------------------------------------------------------------------------------------------------
# The score pipeline and the block ranges, on traced block indices
# ------------------------------------------------------------------------------------------------


def _pipeline(cfg: KernelConfig, mods: Mods, b, h, q_idx, k_idx):
    """``(scores, bias block or None) -> scores`` after the matmul: soft cap, bias, then
    ``score_mod`` (``SCORE_PIPELINE``)."""

    def run(s, bias=None):
        if cfg.softcap is not None:
            s = cfg.softcap * jnp.tanh(s / cfg.softcap)
        if bias is not None:
            s = s + bias.astype(s.dtype)
        if mods.score_mod is not None:
            s = jnp.broadcast_to(mods.score_mod(s, b, h, q_idx, k_idx), s.shape).astype(s.dtype)
        return s

    return run


def _keep(cfg: KernelConfig, mods: Mods, ints: dict, b, h, q_idx, k_idx, shape):
    """Which pairs of the block are kept (structured masks, padding of the keys)."""
    keep = chunk_keep(
        cfg.structure, q_idx, k_idx, q_lengths=ints.get("q_lengths"), kv_lengths=ints.get("kv_lengths"),
        q_segments=ints.get("q_segments"), kv_segments=ints.get("kv_segments"), mask_mod=mods.mask_mod,
        batch_idx=b, head_idx=h,
    )  # fmt: skip
    real = (k_idx < cfg.dims.kv_len) & (q_idx < cfg.dims.q_len)  # not the padding of the blocks
    return jnp.broadcast_to(real if keep is None else keep & real, shape)


def _key_blocks(cfg: KernelConfig, q0, q1, bk: int, nk: int):
    """``[lo, hi)`` key blocks the static mask lets queries ``[q0, q1)`` see (traced)."""
    st = cfg.structure
    lo, hi = 0, cfg.dims.kv_len
    if st.causal:
        hi = jnp.minimum(hi, q1 + st.offset)
    if st.window is not None:
        left, right = st.window
        lo = jnp.maximum(lo, q0 + st.offset - left)
        hi = jnp.minimum(hi, q1 - 1 + st.offset + right + 1)
    lo_b = jnp.clip(jnp.floor_divide(lo, bk), 0, nk)
    hi_b = jnp.clip(jnp.floor_divide(hi + bk - 1, bk), 0, nk)
    return lo_b, jnp.maximum(lo_b, hi_b)


def _query_blocks(cfg: KernelConfig, k0, k1, bq: int, nq: int):
    """``[lo, hi)`` query blocks that see keys ``[k0, k1)`` under the static mask (traced)."""
    st = cfg.structure
    lo, hi = 0, cfg.dims.q_len
    if st.causal:
        lo = jnp.maximum(lo, k0 - st.offset)
    if st.window is not None:
        left, right = st.window
        lo = jnp.maximum(lo, k0 - st.offset - right)
        hi = jnp.minimum(hi, k1 - 1 - st.offset + left + 1)
    lo_b = jnp.clip(jnp.floor_divide(lo, bq), 0, nq)
    hi_b = jnp.clip(jnp.floor_divide(hi + bq - 1, bq), 0, nq)
    return lo_b, jnp.maximum(lo_b, hi_b)


def _meet(q_segments, k_segments):
    """Whether a query block's and a key block's segment ids can hold an equal pair (their
    ranges overlap): blocks whose ids cannot meet are skipped, as the chunked engine does."""
    return (q_segments.min() <= k_segments.max()) & (k_segments.min() <= q_segments.max())


def _when_segments_meet(body, meet):
    """``body(j, carry)``, skipped (carry unchanged) where ``meet(j)`` is False; ``body`` itself
    when there are no segment ids (``meet`` None)."""
    if meet is None:
        return body
    return lambda j, carry: lax.cond(meet(j), lambda c: body(j, c), lambda c: c, carry)


def _within_lengths(ints: dict, lo, hi, q0, bk: int):
    """Key blocks ``[lo, hi)`` cut to the row's key length, none for a query block past its query
    length: the dynamic part of block skipping (lengths are per batch row, known in the kernel)."""
    if "kv_lengths" in ints:
        hi = jnp.maximum(lo, jnp.minimum(hi, (ints["kv_lengths"] + bk - 1) // bk))
    if "q_lengths" in ints:
        hi = jnp.where(q0 < ints["q_lengths"], hi, lo)
    return lo, hi


def _dot(a, b, cdt, trans_b=False):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=cdt)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


def _int_refs(names, refs):
    """The integer operands' refs by name (``names``: those present, in order)."""
    return dict(zip(names, refs))


def _dropped(cfg, int_refs, b, h, q_idx, k_idx, p):
    """``p`` with the call's dropout applied (kept entries scaled by ``1 / (1 - rate)``)."""
    if not cfg.dropout:
        return p
    seed = (int_refs["seed"][0], int_refs["seed"][1])
    keep = dropout_keep(seed, cfg.dropout, b, h, q_idx, k_idx)
    return jnp.where(keep, p / (1.0 - cfg.dropout), 0.0)


def _bias_rows(int_refs, j, bk: int, wide: bool):
    """The bias block ``(bq | 1, bk | 1)`` of key block ``j`` for a query block's program (None
    without a bias). ``wide``: the bias varies over keys."""
    if "bias" not in int_refs:
        return None
    ref = int_refs["bias"]
    return ref[:, pl.ds(j * bk, bk)] if wide else ref[...]


def _key_meet(ints: dict, int_refs, bk: int):
    """``meet(j)`` for the key blocks of a query block's program (None without segment ids)."""
    if "q_segments" not in ints:
        return None
    return lambda j: _meet(ints["q_segments"], int_refs["kv_segments"][pl.ds(j * bk, bk)])


def _row_ints(int_refs, b) -> dict:
    """The integer operands of a program that owns a query block (its segment ids' block)."""
    ints = {}
    for name in ("q_lengths", "kv_lengths"):
        if name in int_refs:
            ints[name] = int_refs[name][b]
    if "q_segments" in int_refs:
        ints["q_segments"] = int_refs["q_segments"][...][:, None]
    return ints


def _with_key_segments(ints: dict, int_refs, j, bk: int) -> dict:
    """``ints`` with the key segment ids of key block ``j`` (from the whole row's)."""
    if "kv_segments" not in int_refs:
        return ints
    return {**ints, "kv_segments": int_refs["kv_segments"][pl.ds(j * bk, bk)][None, :]}


def _forward_kernel(cfg, mods, names, bq, bk, nk, bias_wide, *refs):
    q_ref, k_ref, v_ref, *rest = refs
    int_refs, (o_ref, lse_ref) = _int_refs(names, rest[: len(names)]), rest[len(names) :]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cdt = jnp.dtype(cfg.compute_dtype)
    q = q_ref[...].astype(cdt)
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    ints = _row_ints(int_refs, b)

    def body(j, carry):
        m, l, acc = carry
        k = k_ref[pl.ds(j * bk, bk), :].astype(cdt)
        v = v_ref[pl.ds(j * bk, bk), :].astype(cdt)
        k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        block_ints = _with_key_segments(ints, int_refs, j, bk)
        bias = _bias_rows(int_refs, j, bk, bias_wide)
        s = _pipeline(cfg, mods, b, h, q_idx, k_idx)(_dot(q, k, cdt, trans_b=True) * cfg.scale, bias)
        keep = _keep(cfg, mods, block_ints, b, h, q_idx, k_idx, s.shape)
        s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - shift[:, None])
        alpha = jnp.exp(jnp.where(m == -jnp.inf, -jnp.inf, m - shift))
        p_v = _dropped(cfg, int_refs, b, h, q_idx, k_idx, p)  # dropout after normalising: same sum
        return m_new, l * alpha + p.sum(axis=1), acc * alpha[:, None] + _dot(p_v, v, cdt)

    lo, hi = _within_lengths(ints, *_key_blocks(cfg, i * bq, (i + 1) * bq, bk, nk), i * bq, bk)
    init = (
        jnp.full((bq,), -jnp.inf, cdt),
        jnp.zeros((bq,), cdt),
        jnp.zeros((bq, v_ref.shape[-1]), cdt),
    )
    m, l, acc = lax.fori_loop(lo, hi, _when_segments_meet(body, _key_meet(ints, int_refs, bk)), init)
    kept = l > 0
    o_ref[...] = jnp.where(kept[:, None], acc / jnp.where(kept, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(kept, m + jnp.log(jnp.where(kept, l, 1.0)), jnp.finfo(cdt).min).astype(cdt)


def _probabilities(cfg, mods, ints, b, h, q, k, q_idx, k_idx, lse, cdt, bias=None):
    """``(P, s_raw, pipeline)`` of one block, recomputed from the saved lse."""
    s_raw = _dot(q, k, cdt, trans_b=True) * cfg.scale
    run = _pipeline(cfg, mods, b, h, q_idx, k_idx)
    s = run(s_raw, bias)
    keep = _keep(cfg, mods, ints, b, h, q_idx, k_idx, s.shape)
    p = jnp.where(keep, jnp.exp(jnp.where(keep, s, 0.0) - lse[:, None]), 0.0)
    return p, s_raw, run


def _raw_grad(cfg, mods, run, s_raw, ds, bias=None):
    """The gradients of the raw scores (before soft cap, bias and ``score_mod``) and of the bias
    block (None without one)."""
    if mods.score_mod is None:  # the bias's gradient is the scores' own
        d_raw = ds if cfg.softcap is None else jax.vjp(run, s_raw)[1](ds)[0]
        return d_raw, (None if bias is None else ds)
    if bias is None:
        return jax.vjp(run, s_raw)[1](ds)[0], None
    d_raw, d_bias = jax.vjp(lambda s, c: run(s, c), s_raw, bias.astype(s_raw.dtype))[1](ds)
    return d_raw, d_bias


def _dq_kernel(cfg, mods, names, bq, bk, nk, bias_shape, *refs):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    int_refs, outs = _int_refs(names, rest[: len(names)]), rest[len(names) :]
    dq_ref, dbias_ref = outs if len(outs) == 2 else (outs[0], None)
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cdt = jnp.dtype(cfg.compute_dtype)
    q, do = q_ref[...].astype(cdt), do_ref[...].astype(cdt)
    lse, delta = lse_ref[...].astype(cdt), delta_ref[...].astype(cdt)
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    ints = _row_ints(int_refs, b)
    tall, wide = (bias_shape[2] > 1, bias_shape[3] > 1) if bias_shape else (False, False)
    if dbias_ref is not None:
        dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)  # blocks the mask skips

    def body(j, carry):
        dq, d_col = carry
        k = k_ref[pl.ds(j * bk, bk), :].astype(cdt)
        v = v_ref[pl.ds(j * bk, bk), :].astype(cdt)
        k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        block_ints = _with_key_segments(ints, int_refs, j, bk)
        bias = _bias_rows(int_refs, j, bk, wide)
        p, s_raw, run = _probabilities(cfg, mods, block_ints, b, h, q, k, q_idx, k_idx, lse, cdt, bias)
        dp = _dropped(cfg, int_refs, b, h, q_idx, k_idx, _dot(do, v, cdt, trans_b=True))
        d_raw, d_bias = _raw_grad(cfg, mods, run, s_raw, p * (dp - delta[:, None]), bias)
        if d_bias is not None:
            d_bias = d_bias if tall else d_bias.sum(axis=0, keepdims=True)
            if wide:
                dbias_ref[:, pl.ds(j * bk, bk)] = d_bias.astype(dbias_ref.dtype)
            else:
                d_col = d_col + d_bias.sum(axis=1, keepdims=True)
        return dq + _dot(d_raw, k, cdt) * cfg.scale, d_col

    lo, hi = _within_lengths(ints, *_key_blocks(cfg, i * bq, (i + 1) * bq, bk, nk), i * bq, bk)
    d_col = jnp.zeros((bq if tall else 1, 1), cdt)
    body = _when_segments_meet(body, _key_meet(ints, int_refs, bk))
    dq, d_col = lax.fori_loop(lo, hi, body, (jnp.zeros(q.shape, cdt), d_col))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    if dbias_ref is not None and not wide:
        dbias_ref[...] = d_col.astype(dbias_ref.dtype)


def _dkv_kernel(cfg, mods, names, bq, bk, nq, groups, bias_shape, *refs):
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest = refs
    int_refs, (dk_ref, dv_ref) = _int_refs(names, rest[: len(names)]), rest[len(names) :]
    b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cdt = jnp.dtype(cfg.compute_dtype)
    k, v = k_ref[...].astype(cdt), v_ref[...].astype(cdt)
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    ints = {}
    if "kv_lengths" in int_refs:
        ints["kv_lengths"] = int_refs["kv_lengths"][b]
    if "kv_segments" in int_refs:
        ints["kv_segments"] = int_refs["kv_segments"][...][None, :]
    if "q_lengths" in int_refs:
        ints["q_lengths"] = int_refs["q_lengths"][b]
    lo, hi = _query_blocks(cfg, j * bk, (j + 1) * bk, bq, nq)
    if "q_lengths" in ints:  # query blocks past the row's length, or a key block past its own
        hi = jnp.minimum(hi, (ints["q_lengths"] + bq - 1) // bq)
    if "kv_lengths" in ints:
        hi = jnp.where(j * bk < ints["kv_lengths"], hi, lo)
    dk, dv = jnp.zeros(k.shape, cdt), jnp.zeros(v.shape, cdt)
    for g in range(groups):  # the query heads of this key/value head
        h = kh * groups + g

        def body(i, carry, g=g, h=h):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q = q_ref[g, rows, :].astype(cdt)
            do = do_ref[g, rows, :].astype(cdt)
            lse, delta = lse_ref[g, rows].astype(cdt), delta_ref[g, rows].astype(cdt)
            q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            block_ints = dict(ints)
            if "q_segments" in int_refs:
                block_ints["q_segments"] = int_refs["q_segments"][rows][:, None]
            bias = None
            if "bias" in int_refs:  # [G | 1, Lp | 1, bk | 1] of this key block
                head = g if bias_shape[1] > 1 else 0
                bias = int_refs["bias"][head, rows, :] if bias_shape[2] > 1 else int_refs["bias"][head]
            p, s_raw, run = _probabilities(cfg, mods, block_ints, b, h, q, k, q_idx, k_idx, lse, cdt, bias)
            dv = dv + _dot(_dropped(cfg, int_refs, b, h, q_idx, k_idx, p).T, do, cdt)
            dp = _dropped(cfg, int_refs, b, h, q_idx, k_idx, _dot(do, v, cdt, trans_b=True))
            ds, _ = _raw_grad(cfg, mods, run, s_raw, p * (dp - delta[:, None]), bias)
            return dk + _dot(ds.T, q, cdt) * cfg.scale, dv

        meet = None
        if "q_segments" in int_refs:
            meet = lambda i: _meet(int_refs["q_segments"][pl.ds(i * bq, bq)], ints["kv_segments"])  # noqa: E731
        dk, dv = lax.fori_loop(lo, hi, _when_segments_meet(body, meet), (dk, dv))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------------
# The calls
# ------------------------------------------------------------------------------------------------


def _pad(x, axis: int, size: int):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


class _Layout:
    """Block sizes and padded lengths of one call."""

    def __init__(self, cfg: KernelConfig):
        d = cfg.dims
        self.bq, self.bk = block_sizes(cfg)
        self.nq, self.nk = -(-d.q_len // self.bq), -(-d.kv_len // self.bk)
        self.lp, self.sp = self.nq * self.bq, self.nk * self.bk
        self.groups = d.q_heads // d.kv_heads


def _int_inputs(ints: dict, lay: _Layout, *, keys_blocked: bool, rows_blocked: bool, bias=None):
    """``(names, arrays, specs)`` of the integer operands present (and the bias, last); segment
    ids and bias padded to whole blocks (the padding is masked anyway). ``keys_blocked`` /
    ``rows_blocked``: whether the grid's third axis walks key blocks (dK/dV) or query blocks
    (forward, dQ)."""
    names, arrays, specs = [], [], []
    for name in _INTS:
        x = ints.get(name)
        if x is None:
            continue
        names.append(name)
        if name == "seed":  # the dropout key's two uint32 words
            arrays.append(x)
            specs.append(pl.BlockSpec((2,), lambda b, h, i: (0,)))
            continue
        if name.endswith("lengths"):
            arrays.append(x.astype(jnp.int32))
            specs.append(pl.BlockSpec(x.shape, lambda b, h, i: (0,)))
            continue
        query = name == "q_segments"
        size, block = (lay.lp, lay.bq) if query else (lay.sp, lay.bk)
        arrays.append(_pad(x.astype(jnp.int32), 1, size))
        walked = rows_blocked if query else keys_blocked
        if walked:
            specs.append(pl.BlockSpec((None, block), lambda b, h, i: (b, i)))
        else:
            specs.append(pl.BlockSpec((None, size), lambda b, h, i: (b, 0)))
    if bias is not None:
        names.append("bias")
        zb, hb, lb, sb = bias.shape
        tall, wide = lb > 1, sb > 1
        padded = _pad(bias, 2, lay.lp) if tall else bias
        arrays.append(_pad(padded, 3, lay.sp) if wide else padded)
        if rows_blocked:  # program (b, h, query block i): its rows, every key
            block = (None, None, lay.bq if tall else 1, lay.sp if wide else 1)
            specs.append(pl.BlockSpec(
                block, lambda b, h, i: (b if zb > 1 else 0, h if hb > 1 else 0, i if tall else 0, 0)
            ))  # fmt: skip
        else:  # program (b, key/value head, key block j): the G heads' rows, its keys
            block = (None, lay.groups if hb > 1 else 1, lay.lp if tall else 1, lay.bk if wide else 1)
            specs.append(pl.BlockSpec(
                block, lambda b, kh, j: (b if zb > 1 else 0, kh if hb > 1 else 0, 0, j if wide else 0)
            ))  # fmt: skip
    return names, arrays, specs


def _forward(cfg: KernelConfig, mods: Mods, interpret: bool, q, k, v, bias, ints):
    """``(out [Z, L, H, E], lse [Z, L, H] finite)`` from kernel-layout ``q, k, v`` (``bias``
    ``[Zb, Hb, Lb, Sb]`` or None)."""
    d, lay = cfg.dims, _Layout(cfg)
    cdt = jnp.dtype(cfg.compute_dtype)
    qt = _pad(jnp.swapaxes(q, 1, 2), 2, lay.lp)  # [Z, H, Lp, D]
    kt = _pad(jnp.swapaxes(k, 1, 2), 2, lay.sp)  # [Z, K, Sp, D]
    vt = _pad(jnp.swapaxes(v, 1, 2), 2, lay.sp)
    names, arrays, int_specs = _int_inputs(ints, lay, keys_blocked=False, rows_blocked=True, bias=bias)
    G = lay.groups
    wide = bias is not None and bias.shape[3] > 1
    out, lse = pl.pallas_call(
        partial(_forward_kernel, cfg, mods, tuple(names), lay.bq, lay.bk, lay.nk, wide),
        grid=(d.batch_size, d.q_heads, lay.nq),
        in_specs=[
            pl.BlockSpec((None, None, lay.bq, d.qk_depth), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, lay.sp, d.qk_depth), lambda b, h, i: (b, h // G, 0, 0)),
            pl.BlockSpec((None, None, lay.sp, d.v_depth), lambda b, h, i: (b, h // G, 0, 0)),
            *int_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, lay.bq, d.v_depth), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, lay.bq), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((d.batch_size, d.q_heads, lay.lp, d.v_depth), q.dtype),
            jax.ShapeDtypeStruct((d.batch_size, d.q_heads, lay.lp), cdt),
        ],
        interpret=interpret,
    )(qt, kt, vt, *arrays)
    return jnp.swapaxes(out[:, :, : d.q_len], 1, 2), jnp.swapaxes(lse[:, :, : d.q_len], 1, 2)


def _backward(cfg: KernelConfig, mods: Mods, interpret: bool, q, k, v, bias, ints, out, lse, d_out, d_lse):
    d, lay = cfg.dims, _Layout(cfg)
    cdt = jnp.dtype(cfg.compute_dtype)
    delta = jnp.sum(d_out.astype(cdt) * out.astype(cdt), axis=-1)  # [Z, L, H]
    if d_lse is not None:
        delta = delta - d_lse.astype(cdt)
    qt = _pad(jnp.swapaxes(q, 1, 2), 2, lay.lp)
    dot_ = _pad(jnp.swapaxes(d_out, 1, 2), 2, lay.lp)
    lse_t = _pad(jnp.swapaxes(lse, 1, 2), 2, lay.lp)
    delta_t = _pad(jnp.swapaxes(delta, 1, 2), 2, lay.lp)
    kt = _pad(jnp.swapaxes(k, 1, 2), 2, lay.sp)
    vt = _pad(jnp.swapaxes(v, 1, 2), 2, lay.sp)
    G, D, E = lay.groups, d.qk_depth, d.v_depth
    names, arrays, int_specs = _int_inputs(ints, lay, keys_blocked=False, rows_blocked=True, bias=bias)
    bias_shape = None if bias is None else tuple(bias.shape)
    row = lambda width: pl.BlockSpec((None, None, lay.bq, width), lambda b, h, i: (b, h, i, 0))  # noqa: E731
    whole_kv = lambda width: pl.BlockSpec((None, None, lay.sp, width), lambda b, h, i: (b, h // G, 0, 0))  # noqa: E731
    row_vec = pl.BlockSpec((None, None, lay.bq), lambda b, h, i: (b, h, i))
    out_specs, out_shape = [row(D)], [jax.ShapeDtypeStruct(qt.shape, q.dtype)]
    if bias is not None:  # dbias per (batch row, head, query block), summed to its shape below
        tall, wide = bias_shape[2] > 1, bias_shape[3] > 1
        block = (None, None, lay.bq if tall else 1, lay.sp if wide else 1)
        out_specs.append(pl.BlockSpec(block, lambda b, h, i: (b, h, i, 0)))
        full = (d.batch_size, d.q_heads, lay.lp if tall else lay.nq, lay.sp if wide else 1)
        out_shape.append(jax.ShapeDtypeStruct(full, cdt))
    dq, *dbias = pl.pallas_call(
        partial(_dq_kernel, cfg, mods, tuple(names), lay.bq, lay.bk, lay.nk, bias_shape),
        grid=(d.batch_size, d.q_heads, lay.nq),
        in_specs=[row(D), whole_kv(D), whole_kv(E), row(E), row_vec, row_vec, *int_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
    )(qt, kt, vt, dot_, lse_t, delta_t, *arrays)
    names, arrays, int_specs = _int_inputs(ints, lay, keys_blocked=True, rows_blocked=False, bias=bias)
    group_rows = lambda width: pl.BlockSpec((None, G, lay.lp, width), lambda b, h, j: (b, h, 0, 0))  # noqa: E731
    group_vec = pl.BlockSpec((None, G, lay.lp), lambda b, h, j: (b, h, 0))
    key_block = lambda width: pl.BlockSpec((None, None, lay.bk, width), lambda b, h, j: (b, h, j, 0))  # noqa: E731
    dk, dv = pl.pallas_call(
        partial(_dkv_kernel, cfg, mods, tuple(names), lay.bq, lay.bk, lay.nq, G, bias_shape),
        grid=(d.batch_size, d.kv_heads, lay.nk),
        in_specs=[group_rows(D), key_block(D), key_block(E), group_rows(E), group_vec, group_vec, *int_specs],
        out_specs=[key_block(D), key_block(E)],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        interpret=interpret,
    )(qt, kt, vt, dot_, lse_t, delta_t, *arrays)
    unpad = lambda x, n: jnp.swapaxes(x[:, :, :n], 1, 2)  # noqa: E731
    grads = (unpad(dq, d.q_len), unpad(dk, d.kv_len), unpad(dv, d.kv_len))
    return (*grads, None if bias is None else _bias_grad(dbias[0], bias, d))


def _bias_grad(full, bias, d):
    """The bias's gradient at its own shape ``[Zb, Hb, Lb, Sb]`` from the dQ kernel's
    ``[Z, H, Lp | query blocks, Sp | 1]``: padding dropped, broadcast dims summed."""
    zb, hb, lb, sb = bias.shape
    full = full[:, :, : d.q_len] if lb > 1 else full.sum(axis=2, keepdims=True)
    full = full[..., : d.kv_len] if sb > 1 else full
    if zb == 1:
        full = full.sum(axis=0, keepdims=True)
    if hb == 1:
        full = full.sum(axis=1, keepdims=True)
    return full.astype(bias.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(cfg: KernelConfig, mods: Mods, interpret: bool, q, k, v, bias, ints):
    return _forward(cfg, mods, interpret, q, k, v, bias, ints)


def _fwd(cfg, mods, interpret, q, k, v, bias, ints):
    out, lse = _forward(cfg, mods, interpret, q, k, v, bias, ints)
    return (out, lse), (q, k, v, bias, ints, out, lse)


def _bwd(cfg, mods, interpret, residuals, cotangents):
    q, k, v, bias, ints, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, dbias = _backward(cfg, mods, interpret, q, k, v, bias, ints, out, lse, d_out, d_lse)
    zeros = {n: None if x is None else np.zeros(x.shape, jax.dtypes.float0) for n, x in ints.items()}
    return dq, dk, dv, dbias, zeros


_attention.defvjp(_fwd, _bwd)


def pallas_attention(cfg: KernelConfig, mods: Mods, ops: Operands, *, interpret: bool | None = None):
    """``(out [Z, L, H, E], lse [Z, L, H])`` by the Pallas kernels (``lse`` finite:
    ``finfo.min`` for a row with no key, as ``_function.chunked_attention``); differentiable in
    q, k, v (first order; the lse's cotangent included). ``interpret``: None runs interpreted
    on CPU (``INTERPRET_ON_CPU``) and compiled elsewhere."""
    if interpret is None:
        interpret = INTERPRET_ON_CPU if jax.default_backend() == "cpu" else False
    ints = {n: getattr(ops, n) for n in _INTS if n != "seed"}
    ints["seed"] = ops.dropout_key if cfg.dropout else None
    return _attention(cfg, mods, interpret, ops.q, ops.k, ops.v, ops.bias, ints)
