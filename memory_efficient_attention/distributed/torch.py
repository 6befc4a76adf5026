"""Ring attention on ``torch.distributed``: each rank holds a shard of the sequence; key/value
shards travel around the ring of ranks with point-to-point messages (``batch_isend_irecv``: gloo
on CPU, NCCL on CUDA) while each rank runs the chunked kernel on the block it holds, so the next
shard's transfer overlaps the current block's compute and memory per rank stays O(local length).

Shape legend (``memory_efficient_attention._spec``): ``B...`` batch dims, ``L`` local query
length, ``S`` local key/value length, ``H`` query heads, ``K`` key/value heads (``H % K == 0``),
``D`` query/key depth, ``E`` value depth, ``W`` the group's size; ``N = W * L`` a global length.

Forward: partial results ``(out, lse)`` of each ring step merge through the log-sum-exp. Backward
(one ``autograd.Function``, so every rank runs its messages in the same fixed order): each step
recomputes its block's gradients from the saved *global* ``out`` and ``lse``, accumulates ``dQ``
locally and sends the ``dK``/``dV`` accumulators around the ring, one hop behind K/V; after
``W`` hops they are back at their owner (after fewer, when the mask ends the ring early, one
message takes them home). Only ``q, k, v, out, lse`` are saved. Which blocks a rank computes
against which shard comes from ``_plan.RingSchedule`` (every structured mask, both layouts);
``variant="allgather"`` gathers K/V once instead and sums dK/dV back to their owners.
"""

from __future__ import annotations

from .._require import require

require("torch", "torch", __name__)

import dataclasses  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

from .._config import CallOptions, KernelConfig  # noqa: E402
from .._spec import (  # noqa: E402
    AttentionInputError,
    Dims,
    check_float_dtypes,
    compute_dtype_name,
    lse_merge_weights,
    seed_dims,
)
from ..torch.kernel import backward_block, forward_block  # noqa: E402
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

__all__ = ["from_zigzag", "ring_attention", "to_zigzag", "ulysses_attention"]

_NEG_INF = float("-inf")
_KV_TAG, _GRAD_TAG, _SEG_TAG = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Ring:
    """One ring call: the group, this rank's position and the static plan."""

    group: dist.ProcessGroup | None
    rank: int  # position in the group
    world: int
    dims: Dims  # local shapes
    dtype: str
    variant: str
    schedule: RingSchedule
    options: CallOptions  # scale, chunk sizes, soft cap (the mask is the schedule's)

    def peer(self, offset: int) -> int:
        """The global rank ``offset`` places further along the ring."""
        index = (self.rank + offset) % self.world
        return index if self.group is None else dist.get_global_rank(self.group, index)

    def source(self, step: int) -> int:
        """The rank whose key/value shard this rank holds at ring step ``step``."""
        return (self.rank - step) % self.world

    def config(self, blk: PieceBlock, device: torch.device) -> KernelConfig:
        return block_config(self.dims, self.dtype, blk, self.options, device=device.type)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, compute_dtype_name(self.dtype))


# ------------------------------------------------------------------------------------------------
# Messages: one flat buffer per hop (K, V and the key segment ids, or dK and dV), sent to the next
# rank while the previous rank's arrives.
# ------------------------------------------------------------------------------------------------


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: torch.Tensor, *likes: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for t in likes:
        out.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def _start_shift(ring: _Ring, send: torch.Tensor, tag: int, hops: int = 1):
    """Start sending ``send`` ``hops`` ranks along the ring and receiving its twin from ``hops``
    ranks back: returns ``(receive buffer, works)``; wait on the works before reading it."""
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.irecv, recv, ring.peer(-hops), ring.group, tag),
        dist.P2POp(dist.isend, send, ring.peer(hops), ring.group, tag),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for work in works:
        work.wait()


# ------------------------------------------------------------------------------------------------
# The work of this rank against one shard, in the kernel layout: q [Z, K, L, G, D],
# k [Z, K, S, D], v [Z, K, S, E], out [Z, K, L, G, E], lse [Z, K, L, G] (compute dtype); ``ints``
# the integer operands (kernel names; ``kv_segments`` the shard's).
# ------------------------------------------------------------------------------------------------


def _merge_blocks(ring: _Ring, source: int, out, lse, q, k, v, ints) -> None:
    """Attend this rank's queries to ``source``'s shard and merge the result into
    ``(out, lse)`` in place, through the log-sum-exp (rows empty on both sides stay
    ``(0, -inf)``: no ``-inf - -inf``)."""
    for blk in ring.schedule.blocks(ring.rank, source):
        # In the compute dtype: each block's output is merged unrounded and rounded once at the
        # end (rounding partial results to bfloat16 made the error grow with the number of ranks).
        parts = (q[:, :, blk.q0 : blk.q1], k[:, :, blk.k0 : blk.k1], v[:, :, blk.k0 : blk.k1])
        q_b, k_b, v_b = (x.to(ring.compute_dtype) for x in parts)
        arrays = block_arrays(ring.schedule, blk, ring.rank, source, ints, torch)
        o_b, lse_b = forward_block(ring.config(blk, q.device), q_b, k_b, v_b, **arrays)
        o_acc, l_acc = out[:, :, blk.q0 : blk.q1], lse[:, :, blk.q0 : blk.q1]
        w_acc, w_b, new = lse_merge_weights(torch, l_acc, lse_b)
        o_acc.mul_(w_acc.unsqueeze(-1)).add_(o_b.to(o_acc.dtype) * w_b.unsqueeze(-1))
        l_acc.copy_(new)


def _add_grads(ring: _Ring, source: int, dq, dk, dv, q, k, v, out, lse, d_out, ints) -> bool:
    """Add this rank's share of the gradients against ``source``'s shard into ``dq`` and the
    shard's ``dk``/``dv``, given the *global* out and lse: each block's share of the global
    softmax (``backward_block``), so its gradients are exact parts of the global ones. Returns
    whether there was any work."""
    blocks = ring.schedule.blocks(ring.rank, source)
    for blk in blocks:
        rows, keys = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
        arrays = block_arrays(ring.schedule, blk, ring.rank, source, ints, torch)
        g_q, g_k, g_v = backward_block(
            ring.config(blk, q.device), q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
            lse[:, :, rows], d_out[:, :, rows], **arrays,
        )  # fmt: skip
        dq[:, :, rows] += g_q
        dk[:, :, keys] += g_k
        dv[:, :, keys] += g_v
    return bool(blocks)


# ------------------------------------------------------------------------------------------------
# The ring
# ------------------------------------------------------------------------------------------------


def _shards(ring: _Ring, k, v, seg):
    """``(source, k, v, kv_segments)`` of every shard this rank visits, in order: travelling
    around the ring (each next shard's transfer overlaps the current one's use) or, for the
    all-gather variant, gathered at once."""
    if ring.variant == "allgather":
        gathered = [_all_gather(ring, x) for x in (k, v, seg)]
        for source in range(ring.world):
            yield source, *(None if x is None else x[source] for x in gathered)
        return
    kv = _pack(k, v)
    for step in range(ring.schedule.steps):
        last = step == ring.schedule.steps - 1
        if not last:
            kv_next, works = _start_shift(ring, kv, _KV_TAG)
            if seg is not None:
                seg_next, seg_works = _start_shift(ring, seg, _SEG_TAG)
        yield ring.source(step), *_unpack(kv, k, v), seg
        if not last:
            _wait(works)
            kv = kv_next
            if seg is not None:
                _wait(seg_works)
                seg = seg_next


def _all_gather(ring: _Ring, x):
    if x is None:
        return None
    parts = [torch.empty_like(x) for _ in range(ring.world)]
    dist.all_gather(parts, x.contiguous(), group=ring.group)
    return parts


def _ring_forward(ring: _Ring, q, k, v, ints):
    cdt = ring.compute_dtype
    out = torch.zeros(*q.shape[:-1], ring.dims.v_depth, dtype=cdt, device=q.device)
    lse = torch.full(q.shape[:-1], _NEG_INF, dtype=cdt, device=q.device)
    for source, k_s, v_s, seg_s in _shards(ring, k, v, ints.get("kv_segments")):
        _merge_blocks(ring, source, out, lse, q, k_s, v_s, {**ints, "kv_segments": seg_s})
    return out.to(q.dtype), lse


def _ring_backward(ring: _Ring, q, k, v, out, lse, d_out, ints):
    cdt = ring.compute_dtype
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    if ring.variant == "allgather":
        dkv_all = torch.zeros(ring.world, k.numel() + v.numel(), dtype=cdt, device=q.device)
        for source, k_s, v_s, seg_s in _shards(ring, k, v, ints.get("kv_segments")):
            dk_s, dv_s = _unpack(dkv_all[source], k, v)
            step_ints = {**ints, "kv_segments": seg_s}
            _add_grads(ring, source, dq, dk_s, dv_s, q, k_s, v_s, out, lse, d_out, step_ints)
        dk, dv = _unpack(_reduce_scatter(ring, dkv_all), k, v)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    dkv = torch.zeros(k.numel() + v.numel(), dtype=cdt, device=q.device)  # travels with kv
    grad_hop = None  # (buffer, works) of the accumulator in flight
    for source, k_s, v_s, seg_s in _shards(ring, k, v, ints.get("kv_segments")):
        if grad_hop is not None:  # the accumulator of this shard, sent one step ago
            dkv, works = grad_hop
            _wait(works)
        dk_acc, dv_acc = _unpack(dkv, k, v)
        step_ints = {**ints, "kv_segments": seg_s}
        _add_grads(ring, source, dq, dk_acc, dv_acc, q, k_s, v_s, out, lse, d_out, step_ints)
        if ring.world > 1:  # dK/dV follow their shard, overlapping the next step's compute
            grad_hop = _start_shift(ring, dkv, _GRAD_TAG)
    if grad_hop is not None:
        dkv, works = grad_hop
        _wait(works)
    steps = ring.schedule.steps
    if ring.world > 1 and steps % ring.world:  # after fewer than W hops, one message takes it home
        dkv, works = _start_shift(ring, dkv, _GRAD_TAG, hops=-steps)
        _wait(works)
    dk, dv = _unpack(dkv, k, v)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _reduce_scatter(ring: _Ring, parts: torch.Tensor) -> torch.Tensor:
    """Row ``r`` of the sum over ranks of ``parts [W, n]``, on rank ``r`` (gloo has no
    reduce-scatter: it sums everything and keeps its row)."""
    if dist.get_backend(ring.group) == "gloo":
        dist.all_reduce(parts, group=ring.group)
        return parts[ring.rank]
    mine = torch.empty_like(parts[0])
    dist.reduce_scatter_tensor(mine, parts.reshape(-1), group=ring.group)
    return mine


class _RingAttention(torch.autograd.Function):
    """``out = ring_attention(q, k, v)`` in the kernel layout; saves ``q, k, v, out, lse`` (and
    the integer operands)."""

    @staticmethod
    def forward(ctx, ring: _Ring, q, k, v, ints):
        out, lse = _ring_forward(ring, q, k, v, ints)
        ctx.ring, ctx.ints = ring, ints
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _ring_backward(ctx.ring, q, k, v, out, lse, d_out.contiguous(), ctx.ints)
        return (None, *grads, None)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    layout: str = "contiguous",
    variant: str = "ring",
    scale: float | None = None,
    causal_alignment: str = "top_left",
    local_window_size: int | tuple[int, int] | None = None,
    query_seq_lengths: torch.Tensor | None = None,
    key_value_seq_lengths: torch.Tensor | None = None,
    query_segment_ids: torch.Tensor | None = None,
    key_segment_ids: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group``; every rank calls
    it with its own shard, in the same order (it sends and receives point-to-point messages).

    Args:
      query: this rank's shard ``[B..., L, H, D]``.
      key: this rank's shard ``[B..., S, K, D]``; ``K`` divides ``H`` (grouped-query attention).
      value: this rank's shard ``[B..., S, K, E]``.
      group: the process group forming the ring, in group-rank order (default: the world).
      is_causal: causal mask over the global positions (``causal_alignment``: ``"top_left"``,
        or ``"bottom_right"`` for a global query shorter than the keys).
      layout: ``"contiguous"`` (rank ``r`` holds positions ``[r*L, (r+1)*L)``) or ``"zigzag"``
        (the sequence in ``2W`` chunks; rank ``r`` holds chunks ``r`` and ``2W-1-r``: causal work
        is balanced). Convert with ``to_zigzag`` / ``from_zigzag``.
      variant: ``"ring"`` (K/V shards travel around the ring, overlapped with compute; memory
        O(L + S)) or ``"allgather"`` (every rank gathers all K/V once and the gradients are
        summed back to their owners, the "llama3" scheme: memory O(L + W*S)).
      scale: score scale, default ``1/sqrt(D)``.
      local_window_size: ``w`` or ``(left, right)`` over global positions.
      query_seq_lengths, key_value_seq_lengths: ``[B...]`` global lengths (the same on every
        rank): positions at or beyond them are masked out.
      query_segment_ids, key_segment_ids: this rank's shards ``[B..., L]`` / ``[B..., S]`` of
        the global segment ids (packed documents may cross shard boundaries).
      logits_soft_cap: ``cap * tanh(scores / cap)`` before the mask.
      query_chunk_size, key_chunk_size: the kernel's chunk sizes inside each rank's block.

    Returns:
      this rank's shard of the output, ``[B..., L, H, E]``. Differentiable (first order) in
      query, key and value; the backward also runs the ring, so every rank must call it.

    The masks are planned over the global positions (``_plan.RingSchedule``, the same plan as
    ``distributed.jax.ring_attention``): a rank skips shards its mask leaves empty, ring steps
    in which every rank would skip are not run (no message, no compute), and lengths and
    segment ids skip the chunks they empty inside each block.

    Example (a ring of one rank here; under ``torchrun --nproc-per-node W`` each rank passes
    its shard, e.g. ``x.chunk(W, dim=-3)[rank]`` of a global ``x``)::

        >>> import torch, torch.distributed as dist
        >>> from memory_efficient_attention.distributed.torch import ring_attention
        >>> # under torchrun: dist.init_process_group("gloo") (or "nccl")
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> q, k, v = torch.randn(3, 2, 64, 4, 16).unbind(0)
        >>> out = ring_attention(q, k, v, is_causal=True)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(
        ...     q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        >>> bool(torch.allclose(out, ref.transpose(1, 2), atol=1e-5))
        True
        >>> dist.destroy_process_group()
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    names = ("query", "key", "value")
    dtype = check_float_dtypes(
        [(n, str(t.dtype).removeprefix("torch.")) for n, t in zip(names, (query, key, value))]
    )
    dims = seed_dims(query.shape, key.shape, value.shape)
    if not dist.is_available() or not dist.is_initialized():
        raise AttentionInputError(
            "ring_attention needs torch.distributed: call torch.distributed.init_process_group "
            "(torchrun sets up its environment) before it"
        )
    world = dist.get_world_size(group)
    schedule, options, arrays = ring_plan(
        dims, dtype, world=world, layout=layout, variant=variant, scale=scale, is_causal=is_causal,
        causal_alignment=causal_alignment, local_window_size=local_window_size,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
        logits_soft_cap=logits_soft_cap, query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
    )  # fmt: skip
    ring = _Ring(group, dist.get_rank(group), world, dims, dtype, variant, schedule, options)
    z, kh, g = dims.batch_size, dims.kv_heads, dims.groups
    q5 = query.reshape(z, dims.q_len, kh, g, dims.qk_depth).permute(0, 2, 1, 3, 4).contiguous()
    k4 = key.reshape(z, dims.kv_len, kh, dims.qk_depth).transpose(1, 2).contiguous()
    v4 = value.reshape(z, dims.kv_len, kh, dims.v_depth).transpose(1, 2).contiguous()
    ints = ring_ints(arrays, dims, partial(_flat, device=q5.device))
    out = _RingAttention.apply(ring, q5, k4, v4, ints)
    return out.permute(0, 2, 1, 3, 4).reshape(*dims.batch, dims.q_len, dims.q_heads, dims.v_depth)


def _flat(x, shape, *, device):
    """An integer tensor flattened to the kernel's ``[Z]`` / ``[Z, n]`` (None stays None)."""
    if x is None:
        return None
    return torch.as_tensor(x, device=device).to(torch.int64).reshape(shape).contiguous()


def to_zigzag(x: torch.Tensor, world: int, *, dim: int = -3) -> torch.Tensor:
    """Reorder the sequence dim (default ``-3``: ``[B..., N, H, D]``) from natural order to the
    zigzag layout for ``world`` ranks; rank ``r`` then takes ``x.chunk(world, dim)[r]``.

    Example::

        >>> import torch
        >>> to_zigzag(torch.arange(8), 2, dim=0).tolist()
        [0, 1, 6, 7, 2, 3, 4, 5]
    """
    idx = torch.as_tensor(zigzag_permutation(x.shape[dim], world), device=x.device)
    return x.index_select(dim, idx)


def from_zigzag(x: torch.Tensor, world: int, *, dim: int = -3) -> torch.Tensor:
    """Inverse of ``to_zigzag``.

    Example::

        >>> import torch
        >>> x = torch.arange(12)
        >>> bool((from_zigzag(to_zigzag(x, 3, dim=0), 3, dim=0) == x).all())
        True
    """
    idx = torch.as_tensor(zigzag_permutation(x.shape[dim], world).argsort(), device=x.device)
    return x.index_select(dim, idx)


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outs = [torch.empty_like(parts[0]) for _ in range(world)]
    dist.all_to_all(outs, parts, group=group)
    return torch.cat(outs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Scatter ``scatter_dim`` over the group, gather the pieces along ``gather_dim``; its
    backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


def ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    query_segment_ids: torch.Tensor | None = None,
    key_segment_ids: torch.Tensor | None = None,
    ring_group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
    variant: str = "ring",
    **kernel_arguments,
):
    """Exact attention over a sequence sharded over the ranks of ``group`` by all-to-all over
    heads (DeepSpeed-Ulysses); the same as ``distributed.jax.ulysses_attention``.

    Each rank holds a contiguous part of the sequence, ``[B..., L/W, H, D]`` (rank ``r`` positions
    ``[r*L/W, (r+1)*L/W)``). One all-to-all gives every rank the whole sequence for ``H/W`` heads,
    the kernel attends with every structured mask of the whole sequence, and one all-to-all brings
    the output back, ``[B..., L/W, H, E]``; the backward exchanges the gradients the same way.

    Args:
      query, key, value: the local shards ``[B..., L/W, H, D]``, ``[B..., S/W, K, D]``,
        ``[B..., S/W, K, E]``; ``H`` a multiple of ``W``; ``K`` a multiple or a divisor of ``W``
        (fewer key/value heads than ranks are repeated).
      group: the process group (default: the whole world).
      query_segment_ids, key_segment_ids: local shards ``[B..., L/W]`` / ``[B..., S/W]``.
      kernel_arguments: ``scale``, ``is_causal``, ``causal_alignment``, ``local_window_size``,
        ``query_seq_lengths``, ``key_value_seq_lengths`` (global, ``[B...]``), ``logits_soft_cap``,
        the chunk sizes, ``memory_budget``, ``engine``, ``return_lse`` (the lse sharded like the
        output, ``[B..., L/W, H]``).
      ring_group: a second process group of ``R`` ranks for the Ulysses x ring hybrid, as in
        ``distributed.jax.ulysses_attention``: the sequence is sharded ring-major (the rank at
        position ``u`` of ``group`` and ``r`` of ``ring_group`` holds part ``u`` of ring shard
        ``r``); after the all-to-all over ``group``, ``ring_attention`` over ``ring_group``
        attends with the ring's keywords.
      layout, variant: the ring's (with ``ring_group`` only).

    Example: 4 ranks as 2 (Ulysses) x 2 (ring); ranks ``{0, 1}`` and ``{2, 3}`` exchange heads,
    ``{0, 2}`` and ``{1, 3}`` form rings (every rank creates every group, as
    ``torch.distributed.new_group`` requires)::

        uly = [dist.new_group(g) for g in ([0, 1], [2, 3])][rank // 2]
        ring = [dist.new_group(g) for g in ([0, 2], [1, 3])][rank % 2]
        out = ulysses_attention(q, k, v, group=uly, ring_group=ring, is_causal=True)
    """
    from ..torch import efficient_dot_product_attention

    ring = ring_group is not None
    check_ulysses_keywords(kernel_arguments, () if ring else ("engine",), ring=ring, layout=layout,
                           variant=variant)  # fmt: skip
    attention = efficient_dot_product_attention
    if ring:
        attention = partial(ring_attention, group=ring_group, layout=layout, variant=variant)
    if not dist.is_initialized():
        raise RuntimeError("ulysses_attention needs torch.distributed initialised (init_process_group)")
    world = dist.get_world_size(group)
    repeat = ulysses_repeat(query.shape, key.shape, world, "ranks")
    if repeat > 1:
        key, value = (x.repeat_interleave(repeat, dim=-2) for x in (key, value))

    def to_heads(x):  # [B..., n/W, X, ...] -> [B..., n, X/W, ...]
        return _AllToAll.apply(x, group, x.dim() - 2, x.dim() - 3)

    def gather(ids):
        if ids is None:
            return None
        parts = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(parts, ids.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    def to_sequence(x, seq_axis):
        return _AllToAll.apply(x, group, seq_axis, seq_axis + 1)

    return ulysses_flow(attention, to_heads, to_sequence, gather, query, key, value, query_segment_ids,
                        key_segment_ids, kernel_arguments)  # fmt: skip
