"""PyTorch implementations under test, built into ``Runner`` objects (imported by the worker only).

Inputs arrive as float32 NumPy arrays ``[B, n, H, D]``; sdpa and plain attention get their own
contiguous ``[B, H, n, D]`` copies (their native layout), so no transpose is timed.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .cases import Shape
from .measure import Runner

__all__ = ["build_torch"]

_HEADS_FIRST = ("sdpa", "plain-torch")


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """softmax(q k^T / sqrt(D)) v on ``[B, H, n, D]`` with the ``[B, H, n, n]`` logits in memory."""
    scores = torch.matmul(q, k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        n_q, n_k = scores.shape[-2:]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _function(name: str, shape: Shape, seed: ModuleType | None):
    causal = shape.causal
    if name == "ours-torch":
        from memory_efficient_attention.torch import efficient_dot_product_attention

        engine = shape.engine
        return lambda q, k, v: efficient_dot_product_attention(q, k, v, is_causal=causal, engine=engine)
    if name == "sdpa":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda q, k, v: sdpa(q, k, v, is_causal=causal)
    if name == "plain-torch":
        return lambda q, k, v: _plain_attention(q, k, v, causal)
    if name == "seed-torch":
        if seed is None:
            raise RuntimeError("the seed package was not loaded")
        return seed.efficient_dot_product_attention  # its default chunk sizes, no mask
    raise ValueError(f"not a PyTorch implementation: {name}")


def build_torch(
    name: str, shape: Shape, mode: str, device: str, data: dict[str, np.ndarray], seed=None
) -> Runner:
    """A ``Runner`` for implementation ``name`` on ``data`` (``q, k, v, cot``) in ``mode``."""
    dtype = getattr(torch, shape.dtype)
    heads_first = name in _HEADS_FIRST
    dev = torch.device(device)

    def tensor(array: np.ndarray, grad: bool = False) -> torch.Tensor:
        t = torch.from_numpy(array)
        t = (t.transpose(1, 2) if heads_first else t).to(device=dev, dtype=dtype).contiguous()
        return t.requires_grad_(grad)

    grad = mode == "backward"
    q, k, v = (tensor(data[key], grad) for key in ("q", "k", "v"))
    cot = tensor(data["cot"]) if grad else None
    fn = _function(name, shape, seed)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def call() -> Any:
        if not grad:
            with torch.no_grad():
                out = fn(q, k, v)
            sync()
            return out
        for t in (q, k, v):
            t.grad = None
        # .backward() rather than autograd.grad: the seed's reentrant checkpoint rejects the latter
        (fn(q, k, v) * cot).sum().backward()
        sync()
        return q.grad, k.grad, v.grad

    def to_numpy(outputs: Any) -> list[np.ndarray]:
        tensors = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        arrays = []
        for t in tensors:
            t = t.detach().float().cpu()
            arrays.append((t.transpose(1, 2) if heads_first else t).numpy())
        return arrays

    def nbytes(outputs: Any) -> int:
        tensors = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        return sum(t.numel() * t.element_size() for t in tensors)

    runner = Runner(call=call, to_numpy=to_numpy, nbytes=nbytes)
    if name == "ours-torch":  # which engine runs: "fused" or "chunked (not fused: ...)"
        from memory_efficient_attention.torch import explain

        line = explain(q, k, v, is_causal=shape.causal, engine=shape.engine).splitlines()[0]
        runner.info["engine"] = line.removeprefix("engine: ").split(" (torch")[0]
    if dev.type == "cuda":
        runner.allocator_reset = lambda: torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        runner.allocator_peak = lambda: torch.cuda.max_memory_allocated(dev) - base
    return runner


def setup_torch(threads: int | None) -> dict[str, Any]:
    """Thread count and a description of the torch build, for the JSON."""
    if threads:
        torch.set_num_threads(threads)
    info: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
