"""A Hugging Face model trained with context parallelism: every rank runs a tiny random Llama on its
zigzag shard of the sequence, the attention layers exchange keys and values around the ring, and
the summed gradients equal one process's on the whole sequence.

    torchrun --standalone --nproc-per-node 2 benchmarks/distributed/hf_context_parallel.py

(gloo on CPU; with CUDA devices NCCL and one GPU per rank.) No weights are downloaded: the model is
built from a config with random weights, the same on every rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import transformers

from memory_efficient_attention.integrations.context_parallel import register, shard_sequence


def tiny_llama(attn_implementation: str, device) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device, torch.float64)


def loss_of(model, ids, positions, labels):
    logits = model(input_ids=ids, position_ids=positions).logits
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100
    )


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    n = 512 * world  # global length: a multiple of 2 * world for the zigzag layout
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1)).to(device)

    # Context parallel: this rank's shard (global position ids, labels shifted globally).
    model = tiny_llama(register(layout="zigzag"), device)
    shard_ids, shard_pos, shard_labels = shard_sequence(ids, labels=ids, layout="zigzag")
    loss = loss_of(model, shard_ids, shard_pos, shard_labels)
    loss.backward()
    dist.all_reduce(loss)
    for p in model.parameters():  # as data parallelism would: sum the ranks' gradients
        dist.all_reduce(p.grad)

    # One process on the whole sequence, for comparison only.
    ref = tiny_llama("sdpa", device)
    positions = torch.arange(n, device=device)[None]
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    ref_loss = loss_of(ref, ids, positions, labels)
    ref_loss.backward()
    grad_error = max(
        (p.grad - r.grad).abs().max().item() for p, r in zip(model.parameters(), ref.parameters())
    )
    print(
        f"rank {rank}/{world}: {shard_ids.shape[1]} of {n} tokens, loss {loss.item():.6f} "
        f"(one process {ref_loss.item():.6f}), max parameter-gradient error {grad_error:.2e}",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
