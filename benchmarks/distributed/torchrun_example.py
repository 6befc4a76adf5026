"""Ring attention under torchrun: every rank builds the same global tensors, keeps its zigzag
shard, runs forward + backward on the ring and checks its shard against one process's result.

    torchrun --standalone --nproc-per-node 2 benchmarks/distributed/torchrun_example.py

(gloo on CPU; with CUDA devices it uses NCCL and one GPU per rank.)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from memory_efficient_attention.distributed.torch import ring_attention, to_zigzag
from memory_efficient_attention.torch import efficient_dot_product_attention


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    n = 256 * world  # global length: a multiple of 2 * world for the zigzag layout
    gen = torch.Generator().manual_seed(0)  # the same global tensors on every rank
    q, k, v = (torch.randn(2, n, 8, 64, generator=gen, dtype=torch.float64) for _ in range(3))

    def shard(x):  # [B, N, H, D] -> this rank's zigzag shard [B, N / world, H, D]
        return to_zigzag(x, world).chunk(world, dim=1)[rank].to(device).requires_grad_(True)

    q_l, k_l, v_l = shard(q), shard(k), shard(v)
    out = ring_attention(q_l, k_l, v_l, is_causal=True, layout="zigzag")
    out.square().sum().backward()

    # The single-process result, for comparison only (it holds the whole sequence).
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = efficient_dot_product_attention(*leaves, is_causal=True)
    ref.square().sum().backward()
    errors = [
        (out.detach().cpu() - shard(ref.detach()).detach().cpu()).abs().max().item(),
        *(
            (x.grad.cpu() - shard(r.grad).detach().cpu()).abs().max().item()
            for x, r in zip((q_l, k_l, v_l), leaves)
        ),
    ]
    print(f"rank {rank}/{world}: max error of out, dq, dk, dv: {max(errors):.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
