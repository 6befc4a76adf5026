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
accumulators around the ring with K/V, so they arrive at their owner after ``W`` hops.
Only ``q, k, v, out, lse`` are saved.
"""

from __future__ import annotations

from .._require import require

require("jax", "jax", __name__)

import dataclasses  # noqa: E402
from collections.abc import Hashable  # noqa: E402
from functools import partial  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from .._config import KernelConfig  # noqa: E402
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
    Block,
    block_config,
    check_layout,
    check_ulysses_keywords,
    relations,
    step_block,
    ulysses_flow,
    ulysses_repeat,
    zigzag_permutation,
)

__all__ = ["from_zigzag", "ring_attention", "ring_attention_sharded", "to_zigzag", "ulysses_attention"]

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static description of one ring call (hashable: the ``custom_vjp``'s static argument)."""

    axis_name: Hashable
    world: int
    dims: Dims  # local shapes
    dtype: str
    is_causal: bool
    layout: str
    scale: float | None
    query_chunk_size: int | None
    key_chunk_size: int | None
    precision: lax.Precision | None

    def block(self, relation: str) -> Block | None:
        d = self.dims
        return step_block(self.layout, relation, d.q_len, d.kv_len, is_causal=self.is_causal)

    def config(self, blk: Block) -> KernelConfig:
        return block_config(
            self.dims, self.dtype, blk, scale=self.scale, query_chunk_size=self.query_chunk_size,
            key_chunk_size=self.key_chunk_size, device=jax.default_backend(),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# One ring step: the block of the local queries against the key/value shard held now. Arrays are
# in the kernel layout: q [Z, L, H, D], k [Z, S, K, D], v [Z, S, K, E], out [Z, L, H, E],
# lse [Z, L, H] (compute dtype).
# ------------------------------------------------------------------------------------------------


def _relation_index(ring: _Ring, t):
    """Index into ``relations(...)`` of step ``t``: 0 same, 1 before, 2 after (see ``_plan``)."""
    if len(relations(ring.is_causal, ring.world)) == 1:
        return 0
    r = lax.axis_index(ring.axis_name)
    s = (r - t) % ring.world
    return jnp.where(t == 0, 0, jnp.where(s < r, 1, 2))


def _step(ring: _Ring, t, branches, *args):
    """Run the branch of step ``t``'s relation (a ``lax.switch`` only when there is a choice).

    Inside ``jax.shard_map`` with ``check_vma`` the branches of a ``lax.switch`` must agree on the
    mesh axes their outputs vary over; a branch that skips a masked-out shard returns fresh
    constants, which vary over none, so every branch's outputs are marked varying over the
    axes its inputs vary over (a no-op outside ``shard_map`` or without ``check_vma``)."""
    if len(branches) == 1:
        return branches[0](*args)
    return lax.switch(_relation_index(ring, t), [_varying_outputs(b) for b in branches], *args)


def _varying_outputs(branch):
    """``branch`` with its outputs marked varying like its inputs (see ``_step``)."""

    def run(*args):
        return varying_like(branch(*args), *args)

    return run


def _block_forward(ring: _Ring, relation: str, q, k, v):
    """``(out, lse)`` of one step over all local rows (rows outside the block: 0 and -inf)."""
    dims, cdt = ring.dims, jnp.dtype(_compute_dtype(ring))
    out = jnp.zeros((*q.shape[:-1], dims.v_depth), cdt)
    lse = jnp.full(q.shape[:-1], _NEG_INF, cdt)
    blk = ring.block(relation)
    if blk is None:
        return out, lse
    # In the compute dtype: a block's output is merged unrounded (rounding each partial result to
    # bfloat16 made the error grow with the number of devices), and rounded once at the end.
    q_b, k_b, v_b = (
        x.astype(cdt) for x in (q[:, blk.q0 : blk.q1], k[:, blk.k0 : blk.k1], v[:, blk.k0 : blk.k1])
    )
    o, lse_b = forward_block(ring.config(blk), q_b, k_b, v_b, precision=ring.precision)
    out = out.at[:, blk.q0 : blk.q1].set(o.astype(cdt))
    return out, lse.at[:, blk.q0 : blk.q1].set(lse_b.astype(cdt))


def _block_backward(ring: _Ring, relation: str, q, k, v, out, lse, d_out):
    """``(dq, dk, dv)`` of one step's block (zeros outside it), given the *global* out and lse.

    With the global lse as the row max and 1 as the row sum the kernel's backward recomputes
    ``P = exp(S - lse)``: the block's share of the global softmax, so its gradients are exact
    parts of the global ones (``delta = rowsum(dO * O)`` uses the global output)."""
    cdt = jnp.dtype(_compute_dtype(ring))
    dq = jnp.zeros(q.shape, cdt)
    dk = jnp.zeros(k.shape, cdt)
    dv = jnp.zeros(v.shape, cdt)
    blk = ring.block(relation)
    if blk is None:
        return dq, dk, dv
    rows = slice(blk.q0, blk.q1)
    keys = slice(blk.k0, blk.k1)
    # A row with no key at all (lse = -inf) gets zero gradient.
    dq_b, dk_b, dv_b = backward_block(
        ring.config(blk), q[:, rows], k[:, keys], v[:, keys], out[:, rows], lse[:, rows],
        d_out[:, rows], precision=ring.precision,
    )  # fmt: skip
    return (
        dq.at[:, rows].set(dq_b.astype(cdt)),
        dk.at[:, keys].set(dk_b.astype(cdt)),
        dv.at[:, keys].set(dv_b.astype(cdt)),
    )


def _merge(out, lse, out_b, lse_b):
    """Merge two partial softmax results through their log-sum-exp; rows empty in both stay
    ``(0, -inf)`` (the shift by 0 avoids ``-inf - -inf``)."""
    w, w_b, new = lse_merge_weights(jnp, lse, lse_b)
    return w[..., None] * out + w_b[..., None] * out_b, new


def _compute_dtype(ring: _Ring) -> str:
    return compute_dtype_name(ring.dtype)


def _shift(ring: _Ring, *xs):
    """Send to the next device of the ring, receive from the previous one."""
    perm = [(i, (i + 1) % ring.world) for i in range(ring.world)]
    return tuple(lax.ppermute(x, ring.axis_name, perm) for x in xs)


# ------------------------------------------------------------------------------------------------
# The ring, forward and backward
# ------------------------------------------------------------------------------------------------


def _ring_forward(ring: _Ring, q, k, v):
    branches = [partial(_block_forward, ring, rel) for rel in relations(ring.is_causal, ring.world)]

    def step(t, carry):
        k, v, out, lse = carry
        k_next, v_next = _shift(ring, k, v)  # independent of this step's compute: overlaps it
        out, lse = _merge(out, lse, *_step(ring, t, branches, q, k, v))
        return k_next, v_next, out, lse

    cdt = jnp.dtype(_compute_dtype(ring))
    out = jnp.zeros((*q.shape[:-1], ring.dims.v_depth), cdt)
    lse = jnp.full(q.shape[:-1], _NEG_INF, cdt)
    _, _, out, lse = lax.fori_loop(0, ring.world, step, varying_like((k, v, out, lse), q, k, v))
    return out.astype(q.dtype), lse


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v):
    return _ring_forward(ring, q, k, v)[0]


def _ring_attention_fwd(ring: _Ring, q, k, v):
    out, lse = _ring_forward(ring, q, k, v)
    return out, (q, k, v, out, lse)


def _ring_attention_bwd(ring: _Ring, residuals, d_out):
    q, k, v, out, lse = residuals
    branches = [partial(_block_backward, ring, rel) for rel in relations(ring.is_causal, ring.world)]

    def step(t, carry):
        k, v, dq, dk, dv = carry
        k_next, v_next = _shift(ring, k, v)
        dq_b, dk_b, dv_b = _step(ring, t, branches, q, k, v, out, lse, d_out)
        # dk/dv travel with the shard they belong to; after W hops they are back at its owner.
        dk, dv = _shift(ring, dk + dk_b, dv + dv_b)
        return k_next, v_next, dq + dq_b, dk, dv

    cdt = jnp.dtype(_compute_dtype(ring))
    init = (k, v, jnp.zeros(q.shape, cdt), jnp.zeros(k.shape, cdt), jnp.zeros(v.shape, cdt))
    _, _, dq, dk, dv = lax.fori_loop(0, ring.world, step, varying_like(init, q, k, v))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


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
    scale: float | None = None,
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
      is_causal: global top-left causal mask (query and key/value sharded alike, ``L == S``).
      layout: ``"contiguous"`` (device ``r`` holds positions ``[r*L, (r+1)*L)``) or ``"zigzag"``
        (the sequence in ``2W`` chunks; device ``r`` holds chunks ``r`` and ``2W-1-r``: causal
        work is balanced). Convert with ``to_zigzag`` / ``from_zigzag``. Without ``is_causal``
        the layout only names which positions a device holds; the result is the same.
      scale: score scale, default ``1/sqrt(D)``.
      query_chunk_size, key_chunk_size: the kernel's chunk sizes inside each device's block.
      precision: ``jax.lax.Precision`` of the matmuls.

    Returns:
      the local shard of the output, ``[B..., L, H, E]``.

    Works inside ``jax.shard_map`` with or without ``check_vma``. Gradients work through
    ``jax.grad``; memory per device is O(L + S), never O(N^2) nor O(L*S).

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
    check_layout(layout, is_causal=is_causal, q_len=dims.q_len, kv_len=dims.kv_len, world=world)
    ring = _Ring(
        axis_name, world, dims, dtype, is_causal, layout, scale, query_chunk_size, key_chunk_size, precision
    )
    z, kh = dims.batch_size, dims.kv_heads
    q4 = query.reshape(z, dims.q_len, dims.q_heads, dims.qk_depth)
    k4 = key.reshape(z, dims.kv_len, kh, dims.qk_depth)
    v4 = value.reshape(z, dims.kv_len, kh, dims.v_depth)
    out = _ring_attention(ring, q4, k4, v4)
    return out.reshape(*dims.batch, dims.q_len, dims.q_heads, dims.v_depth)


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
    scale: float | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
    """``ring_attention`` on global arrays: shards the sequence over ``mesh``'s axis ``axis_name``
    (other mesh axes replicate), runs the ring and returns the global output.

    Args:
      query: ``[B..., N, H, D]`` in natural order, ``N`` divisible by the axis size ``W`` (by
        ``2W`` for ``layout="zigzag"``).
      key: ``[B..., M, K, D]``; value ``[B..., M, K, E]`` (``M == N`` if ``is_causal``).
      value: see key.
      mesh, axis_name: the mesh and its axis to shard the sequence over.
      layout: how positions are spread over devices; inputs and output stay in natural order
        (``"zigzag"`` permutes them in and out: prefer it with ``is_causal``).
      is_causal, scale, query_chunk_size, key_chunk_size, precision: as in ``ring_attention``.

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
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim < 3 or x.shape[-3] % (world * (2 if layout == "zigzag" else 1)):
            parts = world * (2 if layout == "zigzag" else 1)
            raise AttentionInputError(
                f"{name} has shape {tuple(x.shape)}: its sequence axis (-3) must split into {parts} "
                f"equal parts for layout={layout!r} on {world} devices; pad it"
            )
    if layout == "zigzag":
        query, key, value = (to_zigzag(x, world) for x in (query, key, value))
    spec = PartitionSpec(*([None] * (query.ndim - 3)), axis_name)
    sharding = NamedSharding(mesh, spec)
    query, key, value = (jax.device_put(x, sharding) for x in (query, key, value))
    local = partial(
        ring_attention,
        axis_name=axis_name,
        is_causal=is_causal,
        layout=layout,
        scale=scale,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
        precision=precision,
    )
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(
        query, key, value
    )
    return from_zigzag(out, world) if layout == "zigzag" else out


def ulysses_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    axis_name: Hashable,
    query_segment_ids: jax.Array | None = None,
    key_segment_ids: jax.Array | None = None,
    **kernel_arguments,
) -> jax.Array:
    """Exact attention over a sequence sharded along ``axis_name`` by all-to-all over heads
    (DeepSpeed-Ulysses); call it inside ``jax.shard_map`` on each device's shard.

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

    check_ulysses_keywords(kernel_arguments)
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

    return ulysses_flow(efficient_dot_product_attention, to_heads, to_sequence, gather, query, key, value,
                        query_segment_ids, key_segment_ids, kernel_arguments)  # fmt: skip
