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
``W`` hops they are back at their owner. Only ``q, k, v, out, lse`` are saved.
"""

from __future__ import annotations

from .._require import require

require("torch", "torch", __name__)

import dataclasses  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

from .._config import KernelConfig  # noqa: E402
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
    Block,
    block_config,
    check_layout,
    check_ulysses_keywords,
    step_block,
    ulysses_flow,
    ulysses_repeat,
    zigzag_permutation,
)

__all__ = ["from_zigzag", "ring_attention", "to_zigzag", "ulysses_attention"]

_NEG_INF = float("-inf")
_KV_TAG, _GRAD_TAG = 0, 1


@dataclasses.dataclass(frozen=True)
class _Ring:
    """One ring call: the group, this rank's neighbours and the static configuration."""

    group: dist.ProcessGroup | None
    rank: int  # position in the group
    world: int
    dims: Dims  # local shapes
    dtype: str
    is_causal: bool
    layout: str
    scale: float | None
    query_chunk_size: int | None
    key_chunk_size: int | None

    def peer(self, offset: int) -> int:
        """The global rank ``offset`` places further along the ring."""
        index = (self.rank + offset) % self.world
        return index if self.group is None else dist.get_global_rank(self.group, index)

    def block(self, step: int) -> Block | None:
        """The block of ring step ``step`` (keys from the rank ``step`` places back)."""
        source = (self.rank - step) % self.world
        relation = "same" if step == 0 else ("before" if source < self.rank else "after")
        d = self.dims
        return step_block(self.layout, relation, d.q_len, d.kv_len, is_causal=self.is_causal)

    def config(self, blk: Block, device: torch.device) -> KernelConfig:
        return block_config(
            self.dims, self.dtype, blk, scale=self.scale, query_chunk_size=self.query_chunk_size,
            key_chunk_size=self.key_chunk_size, device=device.type,
        )  # fmt: skip

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, compute_dtype_name(self.dtype))


# ------------------------------------------------------------------------------------------------
# Messages: one flat buffer per hop (K and V, or dK and dV), sent to the next rank while the
# previous rank's arrives.
# ------------------------------------------------------------------------------------------------


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: torch.Tensor, *likes: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for t in likes:
        out.append(flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def _start_shift(ring: _Ring, send: torch.Tensor, tag: int):
    """Start sending ``send`` to the next rank and receiving its twin from the previous one:
    returns ``(receive buffer, works)``; wait on the works before reading the buffer."""
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.irecv, recv, ring.peer(-1), ring.group, tag),
        dist.P2POp(dist.isend, send, ring.peer(1), ring.group, tag),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for work in works:
        work.wait()


# ------------------------------------------------------------------------------------------------
# One block, in the kernel layout: q [Z, K, L, G, D], k [Z, K, S, D], v [Z, K, S, E],
# out [Z, K, L, G, E], lse [Z, K, L, G] (compute dtype).
# ------------------------------------------------------------------------------------------------


def _merge_block(ring: _Ring, blk: Block, out, lse, q, k, v) -> None:
    """Attend the block's rows to its keys and merge the result into ``(out, lse)`` in place,
    through the log-sum-exp (rows empty on both sides stay ``(0, -inf)``: no ``-inf - -inf``)."""
    # In the compute dtype: each block's output is merged unrounded and rounded once at the end
    # (rounding partial results to bfloat16 made the error grow with the number of ranks).
    blocks = (q[:, :, blk.q0 : blk.q1], k[:, :, blk.k0 : blk.k1], v[:, :, blk.k0 : blk.k1])
    q_b, k_b, v_b = (x.to(ring.compute_dtype) for x in blocks)
    o_b, lse_b = forward_block(ring.config(blk, q.device), q_b, k_b, v_b)
    o_acc, l_acc = out[:, :, blk.q0 : blk.q1], lse[:, :, blk.q0 : blk.q1]
    w_acc, w_b, new = lse_merge_weights(torch, l_acc, lse_b)
    o_acc.mul_(w_acc.unsqueeze(-1)).add_(o_b.to(o_acc.dtype) * w_b.unsqueeze(-1))
    l_acc.copy_(new)


def _block_grads(ring: _Ring, blk: Block, q, k, v, out, lse, d_out):
    """``(dq, dk, dv)`` of the block's rows and keys, given the *global* out and lse: the block's
    share of the global softmax (``backward_block``), so its gradients are exact parts of the
    global ones. Rows with no key at all get zero gradient."""
    rows, keys = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
    return backward_block(
        ring.config(blk, q.device), q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
        lse[:, :, rows], d_out[:, :, rows],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The ring
# ------------------------------------------------------------------------------------------------


def _ring_forward(ring: _Ring, q, k, v):
    cdt = ring.compute_dtype
    out = torch.zeros(*q.shape[:-1], ring.dims.v_depth, dtype=cdt, device=q.device)
    lse = torch.full(q.shape[:-1], _NEG_INF, dtype=cdt, device=q.device)
    kv = _pack(k, v)
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:
            kv_next, works = _start_shift(ring, kv, _KV_TAG)
        blk = ring.block(step)
        if blk is not None:
            k_s, v_s = _unpack(kv, k, v)
            _merge_block(ring, blk, out, lse, q, k_s, v_s)
        if not last:
            _wait(works)
            kv = kv_next
    return out.to(q.dtype), lse


def _ring_backward(ring: _Ring, q, k, v, out, lse, d_out):
    cdt = ring.compute_dtype
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dkv = torch.zeros(k.numel() + v.numel(), dtype=cdt, device=q.device)  # travels with kv
    kv = _pack(k, v)
    grad_hop = None  # (buffer, works) of the accumulator in flight
    for step in range(ring.world):
        last = step == ring.world - 1
        if not last:
            kv_next, kv_works = _start_shift(ring, kv, _KV_TAG)
        blk = ring.block(step)
        grads = None
        if blk is not None:
            k_s, v_s = _unpack(kv, k, v)
            grads = _block_grads(ring, blk, q, k_s, v_s, out, lse, d_out)
        if grad_hop is not None:  # the accumulator of this step's shard, sent one step ago
            dkv, works = grad_hop
            _wait(works)
        if grads is not None:
            dq[:, :, blk.q0 : blk.q1] += grads[0]
            dk_acc, dv_acc = _unpack(dkv, k, v)
            dk_acc[:, :, blk.k0 : blk.k1] += grads[1]
            dv_acc[:, :, blk.k0 : blk.k1] += grads[2]
        if ring.world > 1:  # dK/dV follow their shard, overlapping the next step's compute
            grad_hop = _start_shift(ring, dkv, _GRAD_TAG)
        if not last:
            _wait(kv_works)
            kv = kv_next
    if grad_hop is not None:  # after W hops the accumulator is home
        dkv, works = grad_hop
        _wait(works)
    dk, dv = _unpack(dkv, k, v)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """``out = ring_attention(q, k, v)`` in the kernel layout; saves ``q, k, v, out, lse``."""

    @staticmethod
    def forward(ctx, ring: _Ring, q, k, v):
        out, lse = _ring_forward(ring, q, k, v)
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (None, *_ring_backward(ctx.ring, q, k, v, out, lse, d_out.contiguous()))


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
    scale: float | None = None,
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
      is_causal: global top-left causal mask (query and key/value sharded alike, ``L == S``).
      layout: ``"contiguous"`` (rank ``r`` holds positions ``[r*L, (r+1)*L)``) or ``"zigzag"``
        (the sequence in ``2W`` chunks; rank ``r`` holds chunks ``r`` and ``2W-1-r``: causal work
        is balanced). Convert with ``to_zigzag`` / ``from_zigzag``.
      scale: score scale, default ``1/sqrt(D)``.
      query_chunk_size, key_chunk_size: the kernel's chunk sizes inside each rank's block.

    Returns:
      this rank's shard of the output, ``[B..., L, H, E]``. Differentiable (first order) in
      query, key and value; the backward also runs the ring, so every rank must call it.

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
    check_layout(layout, is_causal=is_causal, q_len=dims.q_len, kv_len=dims.kv_len, world=world)
    ring = _Ring(
        group, dist.get_rank(group), world, dims, dtype, is_causal, layout, scale,
        query_chunk_size, key_chunk_size,
    )  # fmt: skip
    z, kh, g = dims.batch_size, dims.kv_heads, dims.groups
    q5 = query.reshape(z, dims.q_len, kh, g, dims.qk_depth).permute(0, 2, 1, 3, 4).contiguous()
    k4 = key.reshape(z, dims.kv_len, kh, dims.qk_depth).transpose(1, 2).contiguous()
    v4 = value.reshape(z, dims.kv_len, kh, dims.v_depth).transpose(1, 2).contiguous()
    out = _RingAttention.apply(ring, q5, k4, v4)
    return out.permute(0, 2, 1, 3, 4).reshape(*dims.batch, dims.q_len, dims.q_heads, dims.v_depth)


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
    """
    from ..torch import efficient_dot_product_attention

    check_ulysses_keywords(kernel_arguments, extra=("engine",))
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

    return ulysses_flow(efficient_dot_product_attention, to_heads, to_sequence, gather, query, key, value,
                        query_segment_ids, key_segment_ids, kernel_arguments)  # fmt: skip
