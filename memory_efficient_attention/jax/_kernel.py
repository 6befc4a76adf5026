"""The JAX kernel: chunked attention with online softmax and a FlashAttention-2 backward.

Layout (legend: ``memory_efficient_attention._spec``): the caller's sequence-major arrays with
the batch dims merged, so no O(n) copy is made (query heads ``h = k * G + g``)::

    q     [Z, L, H, D]        k  [Z, S, K, D]     v  [Z, S, K, E]
    bias  [Zb, Hb, Lb, Sb]    mask (bool) likewise; each size 1 or full
    out   [Z, L, H, E]        row_max, row_sum  [Z, L, H]  (compute dtype)

Each step moves its chunks head-major (``qi [Z, K, lc, G, D]``, scores ``[Z, K, lc, G, kc]``),
the layout the PyTorch kernel gets from strided views.

The same algorithm as ``memory_efficient_attention.torch._kernel``, with the same function names.
The loops run over the pairs the static block plan keeps (empty blocks are never visited), one
``lax.scan`` of static length per chunk shape: a shorter last chunk has its own shape (never
padding, never clamping), and static trip counts let every transform differentiate the loops.
Per-row state lives in ``[Z, L, H, ...]`` buffers, so the order of the pairs does not matter.
Lengths and segments skip blocks at run time with ``lax.cond``. The backward
differentiates the chunk's score pipeline with ``jax.vjp`` (matmul, soft cap, bias, callbacks,
mods and masks in one function), so every feature has its gradient from one definition; values
that ``score_mod``/``mask_mod`` close over arrive as operands (``close_mods``) and get theirs too.

Numerics: an excluded key's score is ``-inf`` inside a step only. The running max starts at
``finfo.min`` and rows with no key keep it (``log_sum_exp(..., finite=True)`` gives them
``finfo.min``), so no loop carry or output holds an inf (``jax.debug_infs``). Probabilities are
``exp(min(s, max) - max)`` (``_shifted``): never above 1, even for extreme finite scores.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .._config import KernelConfig, chunk_keep
from .._masks import PARTIAL
from .._spec import check_callable_result, mask_fill_value

_NEG_INF = -jnp.inf  # an excluded key's score (inside a step only; never in a loop carry)

# What score_mod and mask_mod results must broadcast to: the score chunk handed to score_mod.
_SCORE_LEGEND = "[Z, K, lc, G, kc] (batch, key/value heads, query chunk, heads per key/value head, key chunk)"


class Mods(NamedTuple):
    """User callables and the matmul precision: static (hashable) for ``jit``/``custom_vjp``.

    After ``close_mods``, ``score_mod``/``mask_mod`` take the values they closed over as extra
    trailing arguments (``Operands.consts``), so no tracer hides in a static argument."""

    score_mod: Any = None
    mask_mod: Any = None
    bias_calc_fn: Any = None
    mask_calc_fn: Any = None
    weights_calc_fn: Any = None
    precision: Any = lax.Precision.HIGHEST

    @property
    def seed_callbacks(self) -> bool:
        return any(f is not None for f in (self.bias_calc_fn, self.mask_calc_fn, self.weights_calc_fn))


class Operands(NamedTuple):
    """Kernel-layout arrays of one call (legend: ``memory_efficient_attention._spec``)."""

    q: jax.Array  # [Z, L, H, D]
    k: jax.Array  # [Z, S, K, D]
    v: jax.Array  # [Z, S, K, E]
    bias: jax.Array | None = None  # [Zb, Hb, Lb, Sb]
    mask: jax.Array | None = None  # [Zm, Hm, Lm, Sm] bool
    q_lengths: jax.Array | None = None  # [Z]
    kv_lengths: jax.Array | None = None  # [Z]
    q_segments: jax.Array | None = None  # [Z, L]
    kv_segments: jax.Array | None = None  # [Z, S]
    data: Any = None  # calc_fn_data of the seed callbacks (a pytree)
    dropout_key: jax.Array | None = None  # raw key data (uint32)
    consts: Any = None  # (score_mod's, mask_mod's) closed-over traced values (``close_mods``)


class _Chunk(NamedTuple):
    """Where one tile of a (query chunk, key chunk) pair sits. Starts may be traced; sizes and
    the kind (``_masks.FULL``: no mask work) are static."""

    i: Any
    j: Any
    q0: Any
    lc: int
    k0: Any
    kc: int
    kind: int = PARTIAL
    groups: int = 1  # G: query heads per key/value head


# ------------------------------------------------------------------------------------------------
# Loops over chunks
# ------------------------------------------------------------------------------------------------


def _pair_loop(cfg: KernelConfig, body, carry):
    """``body(chunk, carry)`` for every tile the block plan keeps: one ``lax.scan`` of static
    length per tile shape and kind (full chunks, shorter last chunks, diagonal tiles), so empty
    blocks are never visited and every JAX transform (``grad`` of ``grad``, ``jvp``, ``vmap``)
    can go through the loops."""
    for (lc, kc, kind), tiles in cfg.plan.pair_groups():

        def step(carry, t, lc=lc, kc=kc, kind=kind):
            return body(_Chunk(t[0], t[1], t[2], lc, t[3], kc, kind, cfg.dims.groups), carry), None

        xs = np.asarray([(t.i, t.j, t.q0, t.k0) for t in tiles], dtype=np.int32)
        carry, _ = lax.scan(step, carry, jnp.asarray(xs))
    return carry


def _varying_like(carry, *refs):
    """Inside ``jax.shard_map`` the loop carries must vary over the same mesh axes as the inputs
    (``check_vma``): mark freshly made zeros so. Outside it, or on older JAX, nothing happens."""
    axes = set()
    for ref in refs:
        try:
            axes |= set(jax.typeof(ref).manual_axis_type.varying)
        except AttributeError:
            pass
    if not axes:
        return carry
    axes = tuple(sorted(axes))

    def cast(x):
        have = set(jax.typeof(x).manual_axis_type.varying)
        missing = tuple(a for a in axes if a not in have)
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, carry)


def _skip_or(ops: Operands, c: _Chunk, compute, carry):
    """``compute(carry)``, or ``carry`` unchanged where lengths/segments empty the pair."""
    nonempty = _pair_nonempty(ops, c)
    if nonempty is None:
        return compute(carry)
    return lax.cond(nonempty, compute, lambda x: x, carry)


def _rows(x, c: _Chunk, dtype=None):
    """The query rows of ``c`` from a ``[Z, L, H, ...]`` array, head-major: ``[Z, K, lc, G, ...]``."""
    part = lax.dynamic_slice_in_dim(x, c.q0, c.lc, axis=1)
    part = part.reshape(*part.shape[:2], part.shape[2] // c.groups, c.groups, *part.shape[3:])
    part = jnp.swapaxes(part, 1, 2)
    return part if dtype is None else part.astype(dtype)


def _keys(x, c: _Chunk, dtype=None):
    """The keys of ``c`` from a ``[Z, S, K, ...]`` array, head-major: ``[Z, K, kc, ...]``."""
    part = jnp.swapaxes(lax.dynamic_slice_in_dim(x, c.k0, c.kc, axis=1), 1, 2)
    return part if dtype is None else part.astype(dtype)


def _seq_major(part):
    """A head-major rows chunk ``[Z, K, n, G, ...]`` -> ``[Z, n, H, ...]``."""
    z, kh, n, g = part.shape[:4]
    return jnp.swapaxes(part, 1, 2).reshape(z, n, kh * g, *part.shape[4:])


def _put_at(x, part, start):
    """``x[:, start:start+n] = part`` for a sequence-major chunk ``part [Z, n, ...]``."""
    return lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), start, axis=1)


def _add_at(x, part, start):
    """``x[:, start:start+n] += part`` for a sequence-major chunk ``part [Z, n, ...]``."""
    return _put_at(x, lax.dynamic_slice_in_dim(x, start, part.shape[1], axis=1) + part, start)


def _pair_nonempty(ops: Operands, c: _Chunk):
    """Whether lengths/segments leave any pair of the chunk for some batch element (traced), or
    None when there are no lengths or segments."""
    ok = None
    if ops.q_lengths is not None:
        ok = c.q0 < ops.q_lengths
    if ops.kv_lengths is not None:
        part = c.k0 < ops.kv_lengths
        ok = part if ok is None else ok & part
    if ops.q_segments is not None:
        qs = lax.dynamic_slice_in_dim(ops.q_segments, c.q0, c.lc, axis=1)
        ks = lax.dynamic_slice_in_dim(ops.kv_segments, c.k0, c.kc, axis=1)
        part = (qs.min(axis=1) <= ks.max(axis=1)) & (ks.min(axis=1) <= qs.max(axis=1))
        ok = part if ok is None else ok & part
    return None if ok is None else jnp.any(ok)


# ------------------------------------------------------------------------------------------------
# Chunk views
# ------------------------------------------------------------------------------------------------


def _operand_slice(x, c: _Chunk):
    """The ``[Zb, Hb, lcb, kcb]`` slice of a ``[Zb, Hb, Lb, Sb]`` operand for one chunk."""
    if x is None:
        return None
    if x.shape[2] > 1:
        x = lax.dynamic_slice_in_dim(x, c.q0, c.lc, axis=2)
    if x.shape[3] > 1:
        x = lax.dynamic_slice_in_dim(x, c.k0, c.kc, axis=3)
    return x


def _operand_chunk(x, cfg: KernelConfig):
    """``[Zb, Hb, lcb, kcb]`` -> ``[Zb, Kb, lcb, Gb, kcb]``, broadcastable to the scores."""
    if x is None:
        return None
    zb, hb, lb, sb = x.shape
    kb, gb = (cfg.dims.kv_heads, cfg.dims.groups) if hb > 1 else (1, 1)
    return x.reshape(zb, kb, gb, lb, sb).transpose(0, 1, 3, 2, 4)


def _seed_to_chunk(x, cfg: KernelConfig):
    """A callback's bias/mask ``[B..., H, lc, kc]`` (broadcastable) -> ``[Zb, Kb, lc, Gb, kc]``."""
    dims = cfg.dims
    nb = len(dims.batch)
    x = jnp.asarray(x)
    x = x.reshape((1,) * (nb + 3 - x.ndim) + x.shape)
    zb = 1
    if any(s != 1 for s in x.shape[:nb]):
        x, zb = jnp.broadcast_to(x, (*dims.batch, *x.shape[nb:])), dims.batch_size
    return _operand_chunk(x.reshape(zb, *x.shape[nb:]), cfg)


def _chunk_to_seed(x, cfg: KernelConfig):
    """A ``[Zb, Hb, lcb, kcb]`` slice -> ``[B..., Hb, lcb, kcb]`` for a callback."""
    if x is None:
        return None
    batch = cfg.dims.batch if x.shape[0] > 1 else (1,) * len(cfg.dims.batch)
    return x.reshape(*batch, *x.shape[1:])


def _index_grids(cfg: KernelConfig, c: _Chunk, lc: int, kc: int):
    dims = cfg.dims
    q_idx = c.q0 + lax.broadcasted_iota(jnp.int32, (1, 1, lc, 1, 1), 2)
    k_idx = c.k0 + lax.broadcasted_iota(jnp.int32, (1, 1, 1, 1, kc), 4)
    b_idx = lax.broadcasted_iota(jnp.int32, (dims.batch_size, 1, 1, 1, 1), 0)
    h_idx = jnp.arange(dims.q_heads, dtype=jnp.int32).reshape(1, dims.kv_heads, 1, dims.groups, 1)
    return q_idx, k_idx, b_idx, h_idx


def _full_size(s, cfg: KernelConfig, c: _Chunk):
    """Mods see one shape for every chunk (``[Z, K, q_chunk, G, k_chunk]``): a shorter last chunk is
    padded for the call and the result cut back, so a mod traced once serves all chunks."""
    pad_q, pad_k = cfg.q_chunk - c.lc, cfg.k_chunk - c.kc
    if s is not None and (pad_q or pad_k):
        s = jnp.pad(s, ((0, 0), (0, 0), (0, pad_q), (0, 0), (0, pad_k)))
    return s, _index_grids(cfg, c, cfg.q_chunk, cfg.k_chunk)


# ------------------------------------------------------------------------------------------------
# The score pipeline of one chunk: the scaled matmul, then soft cap, bias, seed callbacks, dense
# mask, score_mod, structured masks. The part after the matmul is a pure function of (scores,
# bias slice, data): jax.vjp gives all of its gradients in the backward.
# ------------------------------------------------------------------------------------------------


def _scores(cfg: KernelConfig, mods: Mods, ops: Operands, c: _Chunk, qi, kj, bias_s, data):
    """The scores of one chunk, ``[Z, K, lc, G, kc]``."""
    s = jnp.einsum(
        "zklgd,zksd->zklgs", qi * jnp.asarray(cfg.scale, qi.dtype), kj, precision=mods.precision,
        preferred_element_type=qi.dtype,
    )  # fmt: skip
    return _score_pipeline(cfg, mods, ops, c, s, bias_s, data)


# Few query rows per key/value head (decoding): XLA on CPU runs the batched matrix-vector
# products of the two einsums as slow loops; a block-diagonal GEMM over all key/value heads does K
# times the FLOPs and still runs ~4x faster (1 x 65536 keys, 8 heads: 27 ms against 101 ms).
_FEW_ROWS = 8


def _few_rows(c: _Chunk) -> bool:
    return c.lc * c.groups <= _FEW_ROWS


def _seq_keys(x, c: _Chunk, dtype):
    """The keys of ``c`` from a ``[Z, S, K, ...]`` array, sequence-major (no transpose)."""
    return lax.dynamic_slice_in_dim(x, c.k0, c.kc, axis=1).astype(dtype)


def _few_rows_scores(qi, k_seq, mods: Mods):
    """``q.k`` as ``[Z, K, lc, G, kc]`` from ``qi [Z, K, lc, G, D]`` and ``k_seq [Z, kc, K, D]``:
    the keys ``[Z, kc, K*D]`` times the block-diagonal queries ``[Z, K*D, K*lc*G]``."""
    z, kh, lc, g, d = qi.shape
    kc = k_seq.shape[1]
    blocks = jnp.einsum("zklgd,kj->zkdjlg", qi, jnp.eye(kh, dtype=qi.dtype)).reshape(z, kh * d, kh * lc * g)
    s = _matmul("zsx,zxr->zsr", k_seq.reshape(z, kc, kh * d), blocks, mods)
    return jnp.moveaxis(s.reshape(z, kc, kh, lc, g), 1, -1)


def _few_rows_values(p, v_seq, mods: Mods):
    """``p @ v`` as ``[Z, K, lc, G, E]`` from ``p [Z, K, lc, G, kc]`` and ``v_seq [Z, kc, K, E]``:
    one GEMM ``[Z, K*lc*G, kc] x [Z, kc, K*E]``, then each head's own diagonal block."""
    z, kh, lc, g, kc = p.shape
    e = v_seq.shape[-1]
    full = _matmul("zrs,zsx->zrx", p.reshape(z, kh * lc * g, kc), v_seq.reshape(z, kc, kh * e), mods)
    return jnp.einsum("zklgke->zklge", full.reshape(z, kh, lc, g, kh, e))


def _shifted(s, m, *, round_scores: bool = False, clamp: bool = True):
    """``s - m`` for scores ``s`` and a max ``m`` (broadcast), never above 0, so ``exp`` never
    overflows; its derivative is that of ``s - m`` (``m`` is a ``stop_gradient``-ed max) in every
    order, and an excluded key (``s = -inf``) stays ``-inf`` (no NaN).

    Two roundings matter at extreme finite scores (~1e9 in float32, where an ulp is hundreds):
    the backward's recomputed scores may exceed the forward's max by a rounding (another
    summation order): the value is clamped at 0 (``x - stop_gradient(max(x, 0))``, two fused
    elementwise ops; ``min(x, 0)`` would halve the derivative at the tie ``x = 0``); the plain
    forward, whose max is taken over these very scores, needs no clamp (``clamp=False``). And with
    depth 1 (``round_scores``) XLA turns the matmul into a multiply and fuses it into the
    subtraction as one FMA, which sees the unrounded product, up to half an ulp below or above
    the max taken from the rounded one: ``min(s, m)`` rounds it first, so the row's max key
    gets exactly ``exp(0)``. That form costs more elementwise work (measured: the forward at
    n = 4096 ran 2.0x SDPA's time instead of 1.3x beside torch), so only depth 1 pays for it; a
    real matmul rounds its output. (A ``custom_jvp`` would be simpler, but JAX mis-differentiates
    one inside ``lax.scan`` under forward-over-reverse, ``hessian``.)"""
    m = lax.stop_gradient(m)
    if round_scores:
        top = s >= m
        s_top = jnp.where(top, s, m)
        return jnp.where(top, s_top - lax.stop_gradient(s_top), jnp.minimum(s, m) - m)
    x = s - m
    return x - lax.stop_gradient(jnp.maximum(x, 0)) if clamp else x


def _plain_scores(cfg: KernelConfig, mods: Mods, ops: Operands, c: _Chunk) -> bool:
    """Whether the scores of ``c`` are the scaled matmul alone (nothing after it to differentiate)."""
    return (
        cfg.softcap is None
        and ops.bias is None
        and ops.mask is None
        and not mods.seed_callbacks
        and mods.score_mod is None
        and (c.kind != PARTIAL or not cfg.structure.any)
    )


def _score_pipeline(
    cfg: KernelConfig, mods: Mods, ops: Operands, c: _Chunk, s, bias_s, data, keys_first: bool = False
):
    """Soft cap, bias, seed callbacks, dense mask, score_mod and structured masks (in
    ``_spec.SCORE_PIPELINE``'s order) on the raw scores ``s [Z, K, lc, G, kc]``, or
    ``s [Z, K, kc, lc, G]`` with ``keys_first`` (the backward's layout: operands are brought to
    it, so no score chunk is transposed on the way)."""
    cdt = s.dtype

    def lay(x):  # [Z, K, lc, G, kc] -> the layout of s
        return x.transpose(0, 1, 4, 2, 3) if keys_first and x.ndim == 5 else x

    def unlay(x):
        return x.transpose(0, 1, 3, 4, 2) if keys_first else x

    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    mask_s = _operand_slice(ops.mask, c)
    if mods.seed_callbacks:
        s = lay(_seed_callbacks(unlay(s), cfg, mods, c, bias_s, mask_s, data))
    else:
        if bias_s is not None:
            s = s + lay(_operand_chunk(bias_s, cfg)).astype(cdt)
        if mask_s is not None:
            s = jnp.where(lay(_operand_chunk(mask_s, cfg)), s, _fill_value(cfg, cdt))
    if mods.score_mod is not None:
        full, (q_idx, k_idx, b_idx, h_idx) = _full_size(unlay(s), cfg, c)
        modded = mods.score_mod(full, b_idx, h_idx, q_idx, k_idx, *_consts(ops, 0))
        check_callable_result("score_mod", modded, full.shape, _SCORE_LEGEND, want="float")
        full = jnp.broadcast_to(modded, full.shape)
        s = lay(full[:, :, : c.lc, :, : c.kc].astype(cdt))
    if c.kind == PARTIAL and cfg.structure.any:
        s = jnp.where(lay(_keep(cfg, mods, ops, c)), s, _NEG_INF)
    return s


def _fill_value(cfg: KernelConfig, dtype):
    return mask_fill_value(cfg.mask_fill, float(jnp.finfo(dtype).min))


def _consts(ops: Operands, which: int):
    """The closed-over values ``close_mods`` took out of score_mod (0) or mask_mod (1)."""
    return () if ops.consts is None else ops.consts[which]


def close_mods(cfg: KernelConfig, mods: Mods):
    """``(mods, consts)``: ``score_mod``/``mask_mod`` closure-converted (``jax.closure_convert``)
    on the grids the kernel calls them with, and the traced values they closed over (an ALiBi
    slope under ``grad``, a threshold under ``jit``), for ``Operands.consts``. Static ``Mods``
    then hold no tracer, and float consts get gradients through the score pipeline's ``vjp``
    (as ``calc_fn_data`` does). ``consts`` is None without mods."""
    if mods.score_mod is None and mods.mask_mod is None:
        return mods, None
    dims, sds, idx = cfg.dims, jax.ShapeDtypeStruct, jnp.int32
    kh, g = dims.kv_heads, dims.groups
    grids = (
        sds((dims.batch_size, 1, 1, 1, 1), idx),
        sds((1, kh, 1, g, 1), idx),
        sds((1, 1, cfg.q_chunk, 1, 1), idx),
        sds((1, 1, 1, 1, cfg.k_chunk), idx),
    )
    score_mod, score_consts = mods.score_mod, ()
    if score_mod is not None:
        scores = sds((dims.batch_size, kh, cfg.q_chunk, g, cfg.k_chunk), jnp.dtype(cfg.compute_dtype))
        score_mod, score_consts = jax.closure_convert(score_mod, scores, *grids)
    mask_mod, mask_consts = mods.mask_mod, ()
    if mask_mod is not None:
        mask_mod, mask_consts = jax.closure_convert(mask_mod, *grids)
    return mods._replace(score_mod=score_mod, mask_mod=mask_mod), (tuple(score_consts), tuple(mask_consts))


def _keep(cfg: KernelConfig, mods: Mods, ops: Operands, c: _Chunk):
    q_idx, k_idx, b_idx, h_idx = _index_grids(cfg, c, c.lc, c.kc)
    mask_mod = None
    if mods.mask_mod is not None:
        _, (fq, fk, fb, fh) = _full_size(None, cfg, c)
        need = (cfg.dims.batch_size, cfg.dims.kv_heads, cfg.q_chunk, cfg.dims.groups, cfg.k_chunk)
        keep = mods.mask_mod(fb, fh, fq, fk, *_consts(ops, 1))
        check_callable_result("mask_mod", keep, need, _SCORE_LEGEND, want="bool")
        mod_keep = jnp.broadcast_to(keep, need)[:, :, : c.lc, :, : c.kc]

        def mask_mod(*_):
            return mod_keep

    z = cfg.dims.batch_size
    return chunk_keep(
        cfg.structure,
        q_idx,
        k_idx,
        q_lengths=None if ops.q_lengths is None else ops.q_lengths.reshape(z, 1, 1, 1, 1),
        kv_lengths=None if ops.kv_lengths is None else ops.kv_lengths.reshape(z, 1, 1, 1, 1),
        q_segments=None
        if ops.q_segments is None
        else lax.dynamic_slice_in_dim(ops.q_segments, c.q0, c.lc, 1).reshape(z, 1, c.lc, 1, 1),
        kv_segments=None
        if ops.kv_segments is None
        else lax.dynamic_slice_in_dim(ops.kv_segments, c.k0, c.kc, 1).reshape(z, 1, 1, 1, c.kc),
        mask_mod=mask_mod,
        batch_idx=b_idx,
        head_idx=h_idx,
    )


def _seed_callbacks(s, cfg: KernelConfig, mods: Mods, c: _Chunk, bias_s, mask_s, data):
    """The seed's callbacks, in the seed's order and layout ``[B..., lc, H, kc]``; ``bias_s`` and
    ``mask_s`` are operand slices ``[Zb, Hb, lcb, kcb]`` (or None)."""
    dims = cfg.dims
    seed_shape = (*dims.batch, c.lc, dims.q_heads, c.kc)

    def seed_weights(x):
        return x.transpose(0, 2, 1, 3, 4).reshape(seed_shape)

    def from_seed_weights(w):
        w = jnp.broadcast_to(w, seed_shape)
        w = w.reshape(dims.batch_size, c.lc, dims.kv_heads, dims.groups, c.kc)
        return w.transpose(0, 2, 1, 3, 4)

    # The seed's offsets were JAX's default integer (int64 with x64): callbacks mix them with ints.
    index = jax.dtypes.canonicalize_dtype(jnp.int64)
    c = c._replace(q0=jnp.asarray(c.q0, index), k0=jnp.asarray(c.k0, index))
    # A bias or mask callback may return None (the seed's "no bias/mask for this chunk").
    chunk = (*dims.batch, dims.q_heads, c.lc, c.kc)
    bias_c = _operand_chunk(bias_s, cfg)
    if mods.bias_calc_fn is not None:
        bias = mods.bias_calc_fn(c.q0, c.k0, _chunk_to_seed(bias_s, cfg), seed_weights(s), data)
        if bias is not None:
            check_callable_result("bias_calc_fn", bias, chunk, "[B..., H, lc, kc]", want="float")
        bias_c = None if bias is None else _seed_to_chunk(bias, cfg)
    if bias_c is not None:
        s = s + bias_c.astype(s.dtype)
    mask_c = _operand_chunk(mask_s, cfg)
    if mods.mask_calc_fn is not None:
        mask = mods.mask_calc_fn(c.q0, c.k0, _chunk_to_seed(mask_s, cfg), seed_weights(s), data)
        if mask is not None:
            check_callable_result("mask_calc_fn", mask, chunk, "[B..., H, lc, kc]", want="bool")
        mask_c = None if mask is None else _seed_to_chunk(mask, cfg)
    if mask_c is not None:
        s = jnp.where(mask_c, s, _fill_value(cfg, s.dtype))
    if mods.weights_calc_fn is not None:
        w = mods.weights_calc_fn(c.q0, c.k0, seed_weights(s), data)
        check_callable_result("weights_calc_fn", w, seed_shape, "[B..., lc, H, kc]", want="float")
        s = from_seed_weights(w).astype(s.dtype)
    return s


# ------------------------------------------------------------------------------------------------
# Dropout: a keep mask regenerated from (key, i, j) in forward and backward, never stored.
# ------------------------------------------------------------------------------------------------


def _dropout_scale(shape, cfg: KernelConfig, key_data, c: _Chunk, dtype):
    key = jax.random.wrap_key_data(key_data)
    key = jax.random.fold_in(jax.random.fold_in(key, c.i), c.j)
    keep = jax.random.bernoulli(key, 1.0 - cfg.dropout, shape)
    return keep.astype(dtype) / jnp.asarray(1.0 - cfg.dropout, dtype)


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


def attention_forward(cfg: KernelConfig, mods: Mods, ops: Operands):
    """Returns ``out [Z, L, H, E]`` (input dtype), ``row_max``, ``row_sum`` ``[Z, L, H]``
    (a row with no key: 0, ``finfo.min``, 0).

    The running max, sum and accumulator of every row live in ``[Z, L, H, ...]`` buffers; each
    tile reads and writes back the rows of its query chunk."""
    dims = cfg.dims
    z, h, e = dims.batch_size, dims.q_heads, dims.v_depth
    cdt = jnp.dtype(cfg.compute_dtype)

    def pair(c: _Chunk, state):
        def compute(state):
            m_all, l_all, acc_all = state
            qi, bias_s = _rows(ops.q, c, cdt), _operand_slice(ops.bias, c)
            if _few_rows(c):  # decoding: each product one GEMM (see _few_rows_scores)
                s = _few_rows_scores(qi * jnp.asarray(cfg.scale, cdt), _seq_keys(ops.k, c, cdt), mods)
                s = _score_pipeline(cfg, mods, ops, c, s, bias_s, ops.data)
            else:
                s = _scores(cfg, mods, ops, c, qi, _keys(ops.k, c, cdt), bias_s, ops.data)
            m, l, acc = _rows(m_all, c), _rows(l_all, c), _rows(acc_all, c)
            # The running max only stabilises (the result does not depend on it). It starts at
            # finfo.min: an excluded key (-inf) then gets exp(-inf - m) = 0 with no -inf - -inf,
            # and no loop carry holds an inf (jax.debug_infs).
            m_new = lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
            # The max is over these very scores: no clamp on the plain path (a pipeline that
            # XLA fuses into the subtraction could still round above it).
            depth1, plain = cfg.dims.qk_depth == 1, _plain_scores(cfg, mods, ops, c)
            p = jnp.exp(_shifted(s, m_new[..., None], round_scores=depth1, clamp=not plain))
            alpha = jnp.exp(m - m_new)
            l = alpha * l + p.sum(axis=-1)
            if cfg.dropout:
                p = p * _dropout_scale(p.shape, cfg, ops.dropout_key, c, cdt)
            if _few_rows(c):
                pv = _few_rows_values(p, _seq_keys(ops.v, c, cdt), mods)
            else:
                pv = _matmul("zklgs,zkse->zklge", p, _keys(ops.v, c, cdt), mods)
            acc = alpha[..., None] * acc + pv
            return (
                _put_at(m_all, _seq_major(m_new), c.q0),
                _put_at(l_all, _seq_major(l), c.q0),
                _put_at(acc_all, _seq_major(acc), c.q0),
            )

        return _skip_or(ops, c, compute, state)

    init = (
        jnp.full((z, dims.q_len, h), jnp.finfo(cdt).min, cdt),
        jnp.zeros((z, dims.q_len, h), cdt),
        jnp.zeros((z, dims.q_len, h, e), cdt),
    )
    m, l, acc = _pair_loop(cfg, pair, _varying_like(init, ops.q, ops.k, ops.v))
    kept = l > 0
    out = acc / jnp.where(kept, l, 1.0)[..., None] * kept[..., None]
    return out.astype(ops.q.dtype), m, l


def log_sum_exp(row_max, row_sum, *, finite: bool = False):
    """``lse = max + log(sum)``; for rows with no key left ``-inf`` or, with ``finite``,
    ``finfo.min`` (``no_key`` tells them; a row with keys stays above it): no inf anywhere
    (``jax.debug_infs``) unless a caller asks for the ``-inf``."""
    kept = row_sum > 0
    lse = row_max + jnp.log(jnp.where(kept, row_sum, 1.0))
    if not finite:
        return jnp.where(kept, lse, _NEG_INF)
    lo = jnp.finfo(lse.dtype).min
    return jnp.where(kept, jnp.maximum(lse, np.nextafter(lo, np.zeros((), lo.dtype))), lo)


def no_key(lse):
    """Where a ``log_sum_exp(..., finite=True)`` row had no key left."""
    return lse == jnp.finfo(lse.dtype).min


# ------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2): outer loop over key chunks, dQ accumulated in the loop carry.
# ------------------------------------------------------------------------------------------------


def attention_backward(cfg: KernelConfig, mods: Mods, ops: Operands, out, row_max, row_sum, d_out, d_lse):
    """Gradients ``dq, dk, dv`` (layout of q, k, v; their dtype), ``dbias`` (its own shape) and
    ``(d data, d consts)``: those of the callbacks' ``data`` and of ``ops.consts`` (float leaves;
    zeros elsewhere).

    Rows are scaled by 1/sum: P = exp(s - max) / sum, so with dO' = dO / sum and D' = D / sum,
    dV = P~^T dO', dP' = dO' V^T, dS = P~ * (dP' - D'), P~ = exp(s - max): exact for every row.
    ``d_lse`` enters as ``D - d_lse`` (d lse / d s = P)."""
    dims = cfg.dims
    z, h, kh, d, e = dims.batch_size, dims.q_heads, dims.kv_heads, dims.qk_depth, dims.v_depth
    cdt = jnp.dtype(cfg.compute_dtype)
    inv_l = jnp.where(row_sum > 0, 1.0 / jnp.where(row_sum > 0, row_sum, 1.0), 0.0).astype(cdt)
    delta = jnp.einsum("zlhe,zlhe->zlh", d_out.astype(cdt), out.astype(cdt))
    if d_lse is not None:
        delta = delta - jnp.nan_to_num(d_lse.astype(cdt), nan=0.0, posinf=0.0, neginf=0.0)
    delta_s = delta * inv_l
    # calc_fn_data and the mods' closed-over values: their float leaves get gradients.
    diff = (ops.data, ops.consts)
    data_grad_mask, data_zero = _data_grad_setup(diff)

    scale = jnp.asarray(cfg.scale, cdt)

    def pair(c: _Chunk, carry):
        def compute(carry):
            dq, dk, dv, dbias, ddata = carry
            qi, kj, vj = _rows(ops.q, c, cdt) * scale, _keys(ops.k, c, cdt), _keys(ops.v, c, cdt)
            # dO' = dO / sum, made per tile (no scaled copy of dO is kept)
            do_i = _rows(d_out, c, cdt) * _rows(inv_l, c)[..., None]
            dl_i = _rows(delta_s, c)
            # Transposed scores [Z, K, kc, lc, G]: every large matmul operand is then row-major
            # for XLA's dot (no transposed copy of a chunk), and the small ones are transposed.
            s = _matmul("zksd,zklgd->zkslg", kj, qi, mods)
            bias_s, data_f = _operand_slice(ops.bias, c), _data_split(diff, data_grad_mask)
            plain = _plain_scores(cfg, mods, ops, c)
            if not plain:

                def pipeline(s, bias_s, data_f):
                    data, consts = _data_merge(diff, data_f, data_grad_mask)
                    o = ops._replace(consts=consts)
                    return _score_pipeline(cfg, mods, o, c, s, bias_s, data, keys_first=True)

                s, pipeline_vjp = jax.vjp(pipeline, s, bias_s, data_f)
            p = jnp.exp(_shifted(s, _rows(row_max, c)[:, :, None], round_scores=cfg.dims.qk_depth == 1))
            pd = p
            if cfg.dropout:
                drop = _dropout_scale(p.shape[:2] + p.shape[3:] + p.shape[2:3], cfg, ops.dropout_key, c, cdt)
                drop = drop.transpose(0, 1, 4, 2, 3)
                pd = p * drop
            dv_j = _matmul("zkslg,zklge->zkse", pd, do_i, mods)
            dp = _matmul("zkse,zklge->zkslg", vj, do_i, mods)
            if cfg.dropout:
                dp = dp * drop
            ds = p * (dp - dl_i[:, :, None])
            if not plain:
                ds, dbias_s, ddata_f = pipeline_vjp(ds)
                if dbias is not None:
                    dbias = _add_operand_slice(dbias, dbias_s, c)
                ddata = jax.tree.map(jnp.add, ddata, ddata_f)
            dkj = _matmul("zkslg,zklgd->zksd", ds, qi, mods)
            dqi = _matmul("zksd,zkslg->zkdlg", kj * scale, ds, mods).transpose(0, 1, 3, 4, 2)
            dq = _add_at(dq, _seq_major(dqi), c.q0)
            dk = _add_at(dk, jnp.swapaxes(dkj, 1, 2), c.k0)
            dv = _add_at(dv, jnp.swapaxes(dv_j, 1, 2), c.k0)
            return dq, dk, dv, dbias, ddata

        return _skip_or(ops, c, compute, carry)

    init = (
        jnp.zeros((z, dims.q_len, h, d), cdt),
        jnp.zeros((z, dims.kv_len, kh, d), cdt),
        jnp.zeros((z, dims.kv_len, kh, e), cdt),
        None if ops.bias is None else jnp.zeros(ops.bias.shape, ops.bias.dtype),
        data_zero,
    )
    dq, dk, dv, dbias, ddata = _pair_loop(cfg, pair, _varying_like(init, ops.q, ops.k, ops.v, d_out))
    dt = ops.q.dtype
    return dq.astype(dt), dk.astype(dt), dv.astype(dt), dbias, _data_merge_grad(diff, ddata, data_grad_mask)


def _matmul(spec: str, x, y, mods: Mods):
    return jnp.einsum(spec, x, y, precision=mods.precision, preferred_element_type=x.dtype)


def _add_operand_slice(full, part, c: _Chunk):
    """``full[..., q-slice, k-slice] += part`` for a ``[Zb, Hb, Lb, Sb]`` operand."""
    q0 = c.q0 if full.shape[2] > 1 else 0
    k0 = c.k0 if full.shape[3] > 1 else 0
    start = tuple(jnp.asarray(x, jnp.int32) for x in (0, 0, q0, k0))
    cur = lax.dynamic_slice(full, start, part.shape)
    return lax.dynamic_update_slice(full, cur + part.astype(full.dtype), start)


# calc_fn_data: its float leaves are differentiated (a callback may read a bias from it); the
# others (masks, indices) are passed through and get float0 cotangents.


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _data_grad_setup(data):
    mask = jax.tree.map(_is_float, data)
    zero = jax.tree.map(lambda x, f: jnp.zeros(jnp.shape(x), jnp.result_type(x)) if f else None, data, mask)
    return mask, zero


def _data_split(data, mask):
    return jax.tree.map(lambda x, f: x if f else None, data, mask)


def _data_merge(data, data_f, mask):
    return jax.tree.map(lambda x, f, y: y if f else x, data, mask, data_f, is_leaf=lambda x: x is None)


def _data_merge_grad(data, ddata, mask):
    def leaf(x, f, dx):
        if x is None:
            return None
        if f:
            return dx
        return np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)

    return jax.tree.map(leaf, data, mask, ddata, is_leaf=lambda x: x is None)
