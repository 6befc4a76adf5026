"""Ring attention on ``jax.sharding``: the sequence is sharded over one mesh axis; key/value shards
travel around the ring with ``lax.ppermute`` while each device attends its local queries to the
shard it holds, with the chunked kernel (memory per device stays O(local length)).

Shape legend (``memory_efficient_attention._spec``): ``B...`` batch dims, ``L`` local query
length, ``S`` local key/value length, ``H`` query heads, ``K`` key/value heads (``H % K == 0``),
``D`` query/key depth, ``E`` value depth, ``W`` the size of the ring's mesh axis; ``N = W * L``
a global length.

Forward: partial results ``(out, lse)`` of each ring step merge through the log-sum-exp. Backward
(a ``custom_vjp``): every step recomputes its block's gradients from the saved *global* ``out``
and ``lse`` (``P = exp(S - lse)``), accumulates ``dQ`` locally and sends the ``dK``/``dV``
accumulators around the ring with K/V, so they arrive at their owner after ``W`` hops (after
fewer, when the mask ends the ring early, one ``ppermute`` takes them home). Only
``q, k, v, out, lse`` are saved. Which blocks a device computes against which shard comes from
``_plan.RingSchedule`` (every structured mask, both layouts; a ``lax.switch`` over its distinct
kinds of work); ``variant="allgather"`` gathers K/V once instead and reduce-scatters dK/dV.
"""

from __future__ import annotations

from .._require import require

require("jax", "jax", __name__)

import dataclasses  # noqa: E402
from collections.abc import Hashable  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from .._config import CallOptions, KernelConfig  # noqa: E402
from .._spec import (  # noqa: E402
    AttentionInputError,
    Dims,
    check_float_dtypes,
    compute_dtype_name,
    lse_merge_weights,
    seed_dims,
)
from ..jax.kernel import backward_block, forward_block, varying_like  # noqa: E402
from ._plan import (  # noqa: E402
    PieceBlock,
    RingSchedule,
    block_arrays,
    block_config,
    check_ulysses_keywords,
    ring_ints,
    ring_plan,
    ulysses_flow,
    ulysses_repeat,
    zigzag_permutation,
)

__all__ = ["from_zigzag", "ring_attention", "ring_attention_sharded", "to_zigzag", "ulysses_attention"]

_NEG_INF = -jnp.inf
# The integer operands of a call (kernel names); ``kv_segments`` travels with K/V.
_INTS = ("q_lengths", "kv_lengths", "q_segments", "kv_segments")


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring call (hashable: the ``custom_vjp``'s static argument)."""

    axis_name: Hashable
    world: int
    dims: Dims  # local shapes
    dtype: str
    variant: str
    schedule: RingSchedule
    options: CallOptions  # scale, chunk sizes, soft cap (the mask is the schedule's)
    precision: lax.Precision | None

    def config(self, blk: PieceBlock) -> KernelConfig:
        return block_config(self.dims, self.dtype, blk, self.options, device=jax.default_backend())

    @property
    def compute_dtype(self):
        return jnp.dtype(compute_dtype_name(self.dtype))


# ------------------------------------------------------------------------------------------------
# The work of this device against one shard: the schedule's blocks, in the kernel layout
# q [Z, L, H, D], k [Z, S, K, D], v [Z, S, K, E], out [Z, L, H, E], lse [Z, L, H] (compute
# dtype); ``ints`` the integer operands (dict of ``_INTS``, absent ones None).
# ------------------------------------------------------------------------------------------------


def _switch(ring: _Ring, source, work, *args):
    """Run ``work(blocks, ...)`` with the blocks of this device against device ``source``'s
    shard: a ``lax.switch`` over the schedule's branches when the devices differ in their work.

    Inside ``jax.shard_map`` with ``check_vma`` the branches of a ``lax.switch`` must agree on the
    mesh axes their outputs vary over; a branch that skips a masked-out shard returns fresh
    constants, which vary over none, so every branch's outputs are marked varying like its
    inputs (a no-op outside ``shard_map`` or without ``check_vma``)."""
    sched = ring.schedule
    used = sorted({b for row in sched.table for b in row})
    if len(used) == 1:
        return work(sched.branches[used[0]], *args)
    index = jnp.asarray([[used.index(b) for b in row] for row in sched.table])
    rank = lax.axis_index(ring.axis_name)

    def branch(blocks):
        return lambda *a: varying_like(work(blocks, *a), *jax.tree.leaves(a))

    return lax.switch(index[rank, source], [branch(sched.branches[b]) for b in used], *args)


def _arrays(ring: _Ring, blk: PieceBlock, source, ints) -> dict:
    rank = lax.axis_index(ring.axis_name)
    return block_arrays(ring.schedule, blk, rank, source, ints, jnp)


def _blocks_forward(ring: _Ring, blocks, source, q, k, v, ints):
    """``(out, lse)`` of this device's queries against one shard (rows without keys: 0, -inf)."""
    cdt = ring.compute_dtype
    out = jnp.zeros((*q.shape[:-1], ring.dims.v_depth), cdt)
    lse = jnp.full(q.shape[:-1], _NEG_INF, cdt)
    for blk in blocks:
        # In the compute dtype: a block's output is merged unrounded (rounding each partial
        # result to bfloat16 made the error grow with the number of devices), rounded at the end.
        rows, keys = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
        o, lse_b = forward_block(
            ring.config(blk), q[:, rows].astype(cdt), k[:, keys].astype(cdt), v[:, keys].astype(cdt),
            precision=ring.precision, **_arrays(ring, blk, source, ints),
        )  # fmt: skip
        o_m, lse_m = _merge(out[:, rows], lse[:, rows], o.astype(cdt), lse_b.astype(cdt))
        out, lse = out.at[:, rows].set(o_m), lse.at[:, rows].set(lse_m)
    return out, lse


def _blocks_backward(ring: _Ring, blocks, source, q, k, v, out, lse, d_out, ints):
    """``(dq, dk, dv)`` of this device's queries against one shard (zeros outside its blocks),
    given the *global* out and lse: each block's share of the global softmax
    (``backward_block``), so its gradients are exact parts of the global ones."""
    cdt = ring.compute_dtype
    dq, dk, dv = (jnp.zeros(x.shape, cdt) for x in (q, k, v))
    for blk in blocks:
        rows, keys = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
        dq_b, dk_b, dv_b = backward_block(
            ring.config(blk), q[:, rows], k[:, keys], v[:, keys], out[:, rows], lse[:, rows],
            d_out[:, rows], precision=ring.precision, **_arrays(ring, blk, source, ints),
        )  # fmt: skip
        dq = dq.at[:, rows].add(dq_b.astype(cdt))
        dk, dv = dk.at[:, keys].add(dk_b.astype(cdt)), dv.at[:, keys].add(dv_b.astype(cdt))
    return dq, dk, dv


def _merge(out, lse, out_b, lse_b):
    """Merge two partial softmax results through their log-sum-exp; rows empty in both stay
    ``(0, -inf)`` (the shift by 0 avoids ``-inf - -inf``)."""
    w, w_b, new = lse_merge_weights(jnp, lse, lse_b)
    return w[..., None] * out + w_b[..., None] * out_b, new


def _shift(ring: _Ring, xs, hops: int = 1):
    """Send every array of ``xs`` (None stays None) ``hops`` devices along the ring."""
    perm = [(i, (i + hops) % ring.world) for i in range(ring.world)]
    return tuple(None if x is None else lax.ppermute(x, ring.axis_name, perm) for x in xs)


def _gather(ring: _Ring, x, axis: int = 1):
    return None if x is None else lax.all_gather(x, ring.axis_name, axis=axis, tiled=True)


def _source_shard(x, source, size: int):
    """Device ``source``'s shard of a gathered ``[Z, W*size, ...]`` (None stays None)."""
    return None if x is None else lax.dynamic_slice_in_dim(x, source * size, size, axis=1)


def _add_shard(x, part, source, size: int):
    """``x`` with ``part`` added to device ``source``'s shard."""
    return lax.dynamic_update_slice_in_dim(x, _source_shard(x, source, size) + part, source * size, 1)


# ------------------------------------------------------------------------------------------------
# The ring and the all-gather variant, forward and backward
# ------------------------------------------------------------------------------------------------


def _attention_forward(ring: _Ring, q, k, v, ints):
    cdt = ring.compute_dtype
    out = jnp.zeros((*q.shape[:-1], ring.dims.v_depth), cdt)
    lse = jnp.full(q.shape[:-1], _NEG_INF, cdt)
    rank = lax.axis_index(ring.axis_name)
    if ring.variant == "allgather":
        kv_all = (_gather(ring, k), _gather(ring, v), _gather(ring, ints["kv_segments"]))

        def visit(source, carry):
            k_s, v_s, seg_s = (_source_shard(x, source, ring.dims.kv_len) for x in kv_all)
            step_ints = {**ints, "kv_segments": seg_s}
            o, l = _switch(ring, source, partial(_blocks_forward, ring), source, q, k_s, v_s, step_ints)
            return _merge(*carry, o, l)

        out, lse = lax.fori_loop(0, ring.world, visit, varying_like((out, lse), q, k, v))
        return out.astype(q.dtype), lse

    def step(t, carry):
        k, v, seg, out, lse = carry
        k_next, v_next, seg_next = _shift(ring, (k, v, seg))  # overlaps this step's compute
        source = (rank - t) % ring.world
        step_ints = {**ints, "kv_segments": seg}
        o, l = _switch(ring, source, partial(_blocks_forward, ring), source, q, k, v, step_ints)
        return (k_next, v_next, seg_next, *_merge(out, lse, o, l))

    init = varying_like((k, v, ints["kv_segments"], out, lse), q, k, v)
    *_, out, lse = lax.fori_loop(0, ring.schedule.steps, step, init)
    return out.astype(q.dtype), lse


def _attention_backward(ring: _Ring, q, k, v, out, lse, d_out, ints):
    cdt = ring.compute_dtype
    rank = lax.axis_index(ring.axis_name)
    dq = jnp.zeros(q.shape, cdt)
    work = partial(_blocks_backward, ring)
    if ring.variant == "allgather":
        kv_all = (_gather(ring, k), _gather(ring, v), _gather(ring, ints["kv_segments"]))
        n = ring.dims.kv_len

        def visit(source, carry):
            dq, dk_all, dv_all = carry
            k_s, v_s, seg_s = (_source_shard(x, source, n) for x in kv_all)
            step_ints = {**ints, "kv_segments": seg_s}
            dq_b, dk_b, dv_b = _switch(ring, source, work, source, q, k_s, v_s, out, lse, d_out, step_ints)
            dk_all = lax.dynamic_update_slice_in_dim(
                dk_all, _source_shard(dk_all, source, n) + dk_b, source * n, 1
            )
            dv_all = lax.dynamic_update_slice_in_dim(
                dv_all, _source_shard(dv_all, source, n) + dv_b, source * n, 1
            )
            return dq + dq_b, dk_all, dv_all

        init = (dq, jnp.zeros(kv_all[0].shape, cdt), jnp.zeros(kv_all[1].shape, cdt))
        dq, dk_all, dv_all = lax.fori_loop(0, ring.world, visit, varying_like(init, q, k, v))
        # Each device's share of every shard's gradient, summed at the shard's owner.
        dk, dv = (
            lax.psum_scatter(x, ring.axis_name, scatter_dimension=1, tiled=True) for x in (dk_all, dv_all)
        )
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    def step(t, carry):
        k, v, seg, dq, dk, dv = carry
        k_next, v_next, seg_next = _shift(ring, (k, v, seg))
        source = (rank - t) % ring.world
        step_ints = {**ints, "kv_segments": seg}
        dq_b, dk_b, dv_b = _switch(ring, source, work, source, q, k, v, out, lse, d_out, step_ints)
        # dk/dv travel with the shard they belong to.
        dk, dv = _shift(ring, (dk + dk_b, dv + dv_b))
        return k_next, v_next, seg_next, dq + dq_b, dk, dv

    init = (k, v, ints["kv_segments"], dq, jnp.zeros(k.shape, cdt), jnp.zeros(v.shape, cdt))
    steps = ring.schedule.steps
    *_, dq, dk, dv = lax.fori_loop(0, steps, step, varying_like(init, q, k, v))
    if steps % ring.world:  # after fewer than W hops, one message takes them home
        dk, dv = _shift(ring, (dk, dv), hops=-steps)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, ints):
    return _attention_forward(ring, q, k, v, ints)[0]


def _ring_attention_fwd(ring: _Ring, q, k, v, ints):
    out, lse = _attention_forward(ring, q, k, v, ints)
    return out, (q, k, v, out, lse, ints)


def _ring_attention_bwd(ring: _Ring, residuals, d_out):
    q, k, v, out, lse, ints = residuals
    grads = _attention_backward(ring, q, k, v, out, lse, d_out, ints)
    no_grad = {n: None if x is None else np.zeros(x.shape, jax.dtypes.float0) for n, x in ints.items()}
    return (*grads, no_grad)


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def ring_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: Hashable,
    is_causal: bool = False,
    layout: str = "contiguous",
    variant: str = "ring",
    scale: float | None = None,
    causal_alignment: str = "top_left",
    local_window_size: int | tuple[int, int] | None = None,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
    """Exact attention over a sequence sharded along the mesh axis ``axis_name``; call it inside
    ``jax.shard_map`` on each device's shard (for global arrays see ``ring_attention_sharded``).

    Args:
      query: the local shard ``[B..., L, H, D]``.
      key: the local shard ``[B..., S, K, D]``; ``K`` divides ``H`` (grouped-query attention).
      value: the local shard ``[B..., S, K, E]``.
      axis_name: the mesh axis the sequence is sharded over (``W`` devices, in axis order).
      is_causal: causal mask over the global positions (``causal_alignment``: ``"top_left"``, or
        ``"bottom_right"`` for a global query shorter than the keys).
      layout: ``"contiguous"`` (device ``r`` holds positions ``[r*L, (r+1)*L)``) or ``"zigzag"``
        (the sequence in ``2W`` chunks; device ``r`` holds chunks ``r`` and ``2W-1-r``: causal
        work is balanced). Convert with ``to_zigzag`` / ``from_zigzag``.
      variant: ``"ring"`` (K/V shards travel around the ring, one hop per step, overlapped with
        compute; memory O(L + S)) or ``"allgather"`` (every device gathers all K/V once and the
        gradients are reduce-scattered back, the "llama3" scheme: memory O(L + W*S), fewer and
        larger messages; suits varlen-heavy work where most shards are masked out anyway).
      scale: score scale, default ``1/sqrt(D)``.
      local_window_size: ``w`` or ``(left, right)`` over global positions.
      query_seq_lengths, key_value_seq_lengths: ``[B...]`` global lengths (the same on every
        device): positions at or beyond them are masked out.
      query_segment_ids, key_segment_ids: the local shards ``[B..., L]`` / ``[B..., S]`` of the
        global segment ids (packed documents; they may cross shard boundaries): a query attends
        only to keys of its segment.
      logits_soft_cap: ``cap * tanh(scores / cap)`` before the mask.
      query_chunk_size, key_chunk_size: the kernel's chunk sizes inside each device's block.
      precision: ``jax.lax.Precision`` of the matmuls.

    Returns:
      the local shard of the output, ``[B..., L, H, E]``.

    The masks are planned over the global positions (``_plan.RingSchedule``): a device skips a
    shard its mask leaves empty (no compute), ring steps in which every device would skip are
    not run (a window of ``w < L`` keys needs two steps of ``W``), and lengths and segment ids
    skip the chunks they empty inside each block. Works inside ``jax.shard_map`` with or
    without ``check_vma``; gradients work through ``jax.grad``.

    Example (one device here; on a mesh of ``W`` devices the same code runs a ring of ``W``)::

        >>> import jax, numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from memory_efficient_attention.distributed.jax import ring_attention
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("seq",))
        >>> spec = P(None, "seq")  # [B, L, H, D] sharded along L
        >>> x = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 16), dtype=np.float32)
        >>> q, k, v = (jax.device_put(t, NamedSharding(mesh, spec)) for t in x)
        >>> f = jax.shard_map(
        ...     lambda q, k, v: ring_attention(q, k, v, axis_name="seq", is_causal=True),
        ...     mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
        >>> out = jax.jit(f)(q, k, v)
        >>> ref = jax.nn.dot_product_attention(*x, is_causal=True)
        >>> bool(np.allclose(out, ref, atol=1e-5))
        True
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    dtype = check_float_dtypes([(n, jnp.dtype(x.dtype).name) for n, x in zip("qkv", (query, key, value))])
    dims = seed_dims(query.shape, key.shape, value.shape)
    try:
        world = lax.axis_size(axis_name)
    except NameError as err:
        raise AttentionInputError(
            f"axis_name {axis_name!r} is not a mesh axis here: call ring_attention inside "
            "jax.shard_map over a mesh with that axis (or use ring_attention_sharded)"
        ) from err
    schedule, options, arrays = ring_plan(
        dims, dtype, world=world, layout=layout, variant=variant, scale=scale, is_causal=is_causal,
        causal_alignment=causal_alignment, local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
        logits_soft_cap=logits_soft_cap, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
    )  # fmt: skip
    ring = _Ring(axis_name, world, dims, dtype, variant, schedule, options, precision)
    z, kh = dims.batch_size, dims.kv_heads
    q4 = query.reshape(z, dims.q_len, dims.q_heads, dims.qk_depth)
    k4 = key.reshape(z, dims.kv_len, kh, dims.qk_depth)
    v4 = value.reshape(z, dims.kv_len, kh, dims.v_depth)
    ints = ring_ints(arrays, dims, _flat)
    out = _ring_attention(ring, q4, k4, v4, ints)
    return out.reshape(*dims.batch, dims.q_len, dims.q_heads, dims.v_depth)


def _flat(x, shape):
    """An integer array flattened to the kernel's ``[Z]`` / ``[Z, n]`` (None stays None)."""
    return None if x is None else jnp.asarray(x).astype(jnp.int32).reshape(shape)


def to_zigzag(x: jax.Array, world: int, *, axis: int = -3) -> jax.Array:
    """Reorder the sequence axis (default ``-3``: ``[B..., N, H, D]``) from natural order to the
    zigzag layout for ``world`` devices; shard the result contiguously over the devices.

    Example::

        >>> import jax.numpy as jnp
        >>> to_zigzag(jnp.arange(8), 2, axis=0).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    return _permute(x, zigzag_permutation(x.shape[axis], world), axis)


def from_zigzag(x: jax.Array, world: int, *, axis: int = -3) -> jax.Array:
    """Inverse of ``to_zigzag``.

    Example::

        >>> import jax.numpy as jnp
        >>> x = jnp.arange(12)
        >>> bool((from_zigzag(to_zigzag(x, 3, axis=0), 3, axis=0) == x).all())
        True
    """
    return _permute(x, zigzag_permutation(x.shape[axis], world).argsort(), axis)


def _permute(x: jax.Array, order, axis: int) -> jax.Array:
    """``x`` reordered along ``axis``; its gradient is the inverse reordering (a gather, not the
    scatter-add autodiff would make, which a sharded array on an explicit mesh cannot place)."""
    inverse = order.argsort()

    @jax.custom_vjp
    def permute(x):
        return _take(x, order, axis)

    def permute_fwd(x):
        return _take(x, order, axis), None

    def permute_bwd(_, ct):
        return (_take(ct, inverse, axis),)

    permute.defvjp(permute_fwd, permute_bwd)
    return permute(x)


def _take(x: jax.Array, indices, axis: int) -> jax.Array:
    """``x`` reordered along ``axis``; an array sharded on an explicit mesh keeps its sharding
    (the gather then moves data between devices)."""
    x = jnp.asarray(x)
    index = [slice(None)] * x.ndim
    index[axis] = jnp.asarray(indices)
    sharding = jax.typeof(x).sharding
    if any(part is not None for part in getattr(sharding, "spec", ())):
        return x.at[tuple(index)].get(out_sharding=sharding)
    return x[tuple(index)]


def ring_attention_sharded(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mesh: Mesh,
    axis_name: Hashable,
    *,
    is_causal: bool = False,
    layout: str = "contiguous",
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    **ring_arguments,
) -> jax.Array:
    """``ring_attention`` on global arrays: shards the sequence over ``mesh``'s axis ``axis_name``
    (other mesh axes replicate), runs the ring and returns the global output.

    Args:
      query: ``[B..., N, H, D]`` in natural order, ``N`` divisible by the axis size ``W`` (by
        ``2W`` for ``layout="zigzag"``).
      key: ``[B..., M, K, D]``; value ``[B..., M, K, E]``.
      value: see key.
      mesh, axis_name: the mesh and its axis to shard the sequence over.
      layout: how positions are spread over devices; inputs and output stay in natural order
        (``"zigzag"`` permutes them in and out: prefer it with ``is_causal``).
      query_segment_ids, key_segment_ids: global ``[B..., N]`` / ``[B..., M]``, natural order.
      is_causal, ring_arguments: as in ``ring_attention`` (``variant``, ``scale``,
        ``causal_alignment``, ``local_window_size``, ``query_seq_lengths``,
        ``key_value_seq_lengths``, ``logits_soft_cap``, the chunk sizes, ``precision``).

    Returns:
      ``[B..., N, H, E]``, sharded like the query.

    Example::

        >>> import jax, numpy as np
        >>> from memory_efficient_attention.distributed.jax import ring_attention_sharded
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("seq",))
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 64, 2, 8), dtype=np.float32)
        >>> out = ring_attention_sharded(q, k, v, mesh, "seq", is_causal=True, layout="zigzag")
        >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        >>> bool(np.allclose(out, ref, atol=1e-5))
        True
    """
    if axis_name not in mesh.axis_names:
        raise AttentionInputError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    world = mesh.shape[axis_name]
    parts = world * (2 if layout == "zigzag" else 1)
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim < 3 or x.shape[-3] % parts:
            raise AttentionInputError(
                f"{name} has shape {tuple(x.shape)}: its sequence axis (-3) must split into {parts} "
                f"equal parts for layout={layout!r} on {world} devices; pad it"
            )
    ids = [None if x is None else jnp.asarray(x) for x in (query_segment_ids, key_segment_ids)]
    for name, x, like in (("query_segment_ids", ids[0], query), ("key_segment_ids", ids[1], key)):
        if x is not None and tuple(x.shape) != tuple(like.shape[:-2]):
            raise AttentionInputError(
                f"{name} has shape {tuple(x.shape)}, but needs {tuple(like.shape[:-2])} ([B..., length])"
            )
    if layout == "zigzag":
        query, key, value = (to_zigzag(x, world) for x in (query, key, value))
        ids = [None if x is None else to_zigzag(x, world, axis=-1) for x in ids]
    spec = PartitionSpec(*([None] * (query.ndim - 3)), axis_name)
    sharding = NamedSharding(mesh, spec)
    query, key, value = (jax.device_put(x, sharding) for x in (query, key, value))
    ids = [None if x is None else jax.device_put(x, sharding) for x in ids]

    present = [x is not None for x in ids]

    def local(q, k, v, *given):
        it = iter(given)
        q_ids, k_ids = (next(it) if p else None for p in present)
        return ring_attention(
            q, k, v, axis_name=axis_name, is_causal=is_causal, layout=layout, query_segment_ids=q_ids,
            key_segment_ids=k_ids, **ring_arguments,
        )  # fmt: skip

    given = [x for x in ids if x is not None]
    out = jax.shard_map(
        local, mesh=mesh, in_specs=(spec,) * (3 + len(given)), out_specs=spec, check_vma=False
    )(query, key, value, *given)
    return from_zigzag(out, world) if layout == "zigzag" else out


def ulysses_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: Hashable,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    ring_axis_name: Hashable | None = None,
    layout: str = "contiguous",
    variant: str = "ring",
    **kernel_arguments,
) -> jax.Array:
    """Exact attention over a sequence sharded along ``axis_name`` by all-to-all over heads
    (DeepSpeed-Ulysses), optionally with a ring over a second mesh axis (the Ulysses x ring
    hybrid, "USP"); call it inside ``jax.shard_map`` on each device's shard.

    Each device holds a contiguous part of the sequence, ``[B..., L/W, H, D]``. One all-to-all
    turns that into the whole sequence for ``H/W`` heads, the kernel attends locally with every
    structured mask of the whole sequence, and one all-to-all brings the output back:
    ``[B..., L/W, H, E]``. Memory per device is O(L * H / W), communication two all-to-alls each
    way (differentiable: their transposes are all-to-alls).

    Args:
      query, key, value: the local shards ``[B..., L/W, H, D]``, ``[B..., S/W, K, D]``,
        ``[B..., S/W, K, E]``; ``H`` divisible by ``W``. Fewer key/value heads than devices
        (``W % K == 0``) are repeated to ``W`` before the exchange (GQA; each device then holds
        one), otherwise ``K`` must be divisible by ``W``.
      axis_name: the mesh axis the sequence is sharded over.
      query_segment_ids, key_segment_ids: the local shards ``[B..., L/W]`` / ``[B..., S/W]``
        (packed documents across shard boundaries are fine: they are gathered).
      kernel_arguments: the kernel's own, with the global sequence's meaning: ``scale``,
        ``is_causal``, ``causal_alignment``, ``local_window_size``, ``query_seq_lengths``,
        ``key_value_seq_lengths`` (``[B...]``, global positions), ``logits_soft_cap``, the chunk
        sizes, ``memory_budget``, ``precision``, ``return_lse`` (the lse comes back sharded
        like the output, ``[B..., L/W, H]``).
      ring_axis_name: a second mesh axis of ``R`` devices for the hybrid: the sequence is
        sharded over ``(ring_axis_name, axis_name)``, ring-major (device ``(r, u)`` holds part
        ``u`` of ring shard ``r``); the all-to-all over ``axis_name`` gives each device ring
        shard ``r`` for ``H/W`` heads, and ``ring_attention`` over ``ring_axis_name`` attends
        it to the whole sequence with the ring's keywords (``memory_budget`` and
        ``return_lse`` are not among them). Memory per device O(L * H / (W * R)).
      layout, variant: the ring's (with ``ring_axis_name`` only); for ``layout="zigzag"`` the
        global sequence is ``to_zigzag(x, R)`` before it is sharded.

    Example (one device here; on ``W`` devices the same code exchanges heads)::

        >>> import jax, numpy as np
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from memory_efficient_attention.distributed.jax import ulysses_attention
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("seq",))
        >>> spec = P(None, "seq")
        >>> x = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 16), dtype=np.float32)
        >>> q, k, v = (jax.device_put(t, NamedSharding(mesh, spec)) for t in x)
        >>> f = jax.shard_map(lambda q, k, v: ulysses_attention(q, k, v, axis_name="seq", is_causal=True),
        ...                   mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        >>> ref = jax.nn.dot_product_attention(*x, is_causal=True)
        >>> bool(np.allclose(jax.jit(f)(q, k, v), ref, atol=1e-5))
        True
    """
    from ..jax import efficient_dot_product_attention

    ring = ring_axis_name is not None
    check_ulysses_keywords(kernel_arguments, ("precision",), ring=ring, layout=layout, variant=variant)
    attention = efficient_dot_product_attention
    if ring:
        attention = partial(ring_attention, axis_name=ring_axis_name, layout=layout, variant=variant)
    try:
        world = lax.axis_size(axis_name)
    except NameError as err:
        raise AttentionInputError(
            f"axis_name {axis_name!r} is not a mesh axis here: call ulysses_attention inside "
            "jax.shard_map over a mesh with that axis"
        ) from err
    repeat = ulysses_repeat(query.shape, key.shape, world, f"devices of axis {axis_name!r}")
    if repeat > 1:
        key, value = (jnp.repeat(x, repeat, axis=-2) for x in (key, value))

    def to_heads(x):  # [B..., n/W, X, ...] -> [B..., n, X/W, ...]
        return lax.all_to_all(x, axis_name, split_axis=x.ndim - 2, concat_axis=x.ndim - 3, tiled=True)

    def to_sequence(x, seq_axis):  # the inverse, for [B..., n, X/W(, E)]
        return lax.all_to_all(x, axis_name, split_axis=seq_axis, concat_axis=seq_axis + 1, tiled=True)

    def gather(ids):
        return None if ids is None else lax.all_gather(ids, axis_name, axis=ids.ndim - 1, tiled=True)

    return ulysses_flow(attention, to_heads, to_sequence, gather, query, key, value, query_segment_ids,
                        key_segment_ids, kernel_arguments)  # fmt: skip
