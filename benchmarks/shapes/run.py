"""Shapes other than self-attention, side by side: decoding and cross-attention.

Decoding: 1 query against a long KV cache (batch 1, 8 heads, depth 64), forward only (inference).
Cross-attention: 1024 queries against 16384 keys, forward and forward+backward. Ours (torch, jax)
against torch's fused SDPA and ``jax.nn.dot_product_attention`` (xla), interleaved repeats,
medians; float32. Usage: ``python benchmarks/shapes/run.py [repeats]``; writes
``results.json`` beside this file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from memory_efficient_attention.jax import efficient_dot_product_attention as ours_jax
    from memory_efficient_attention.torch import efficient_dot_product_attention as ours_torch

    shapes = {
        "decoding 1 x 65536": (1, 65536, ("forward",)),
        "cross 1024 x 16384": (1024, 16384, ("forward", "forward+backward")),
    }
    results = {}
    for name, (L, S, modes) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, L, 8, 64, generator=gen)
        k = torch.randn(1, S, 8, 64, generator=gen)
        v = torch.randn(1, S, 8, 64, generator=gen)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        qj, kj, vj = (jnp.asarray(x.numpy()) for x in (q, k, v))
        for mode in modes:
            backward = mode == "forward+backward"

            def torch_run(fn, *args):
                def run():
                    xs = [x.detach().requires_grad_(backward) for x in args]
                    with torch.set_grad_enabled(backward):
                        out = fn(*xs)
                        if backward:
                            out.backward(torch.ones_like(out))

                return run

            def jax_run(fn):
                f = jax.jit(jax.grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)) if backward else fn)
                return lambda: jax.block_until_ready(f(qj, kj, vj))

            cases = {
                "ours-torch": torch_run(ours_torch, q, k, v),
                "sdpa": torch_run(F.scaled_dot_product_attention, qt, kt, vt),
                "ours-jax": jax_run(ours_jax),
                "xla": jax_run(jax.nn.dot_product_attention),
            }
            for run in cases.values():
                run()
            times = {c: [] for c in cases}
            for _ in range(repeats):
                for c, run in cases.items():
                    time.sleep(0.2)  # untimed: XLA's threads park before a torch call (bench.measure)
                    start = time.perf_counter()
                    run()
                    times[c].append(time.perf_counter() - start)
            med = {c: statistics.median(t) for c, t in times.items()}
            results[f"{name}, {mode}"] = {
                c: {"seconds": med[c], "ratio_to_sdpa": med[c] / med["sdpa"]} for c in med
            }
            row = "  ".join(f"{c} {med[c] * 1e3:8.1f} ms ({med[c] / med['sdpa']:.2f}x)" for c in med)
            print(f"{name:20s} {mode:17s} {row}", flush=True)
    record = {
        "command": "python " + " ".join(sys.argv),
        "repeats": repeats,
        "shape": "batch 1, 8 heads, depth 64, float32",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_average_before": os.getloadavg(),
        "results": results,
    }
    with open(os.path.join(os.path.dirname(__file__), "results.json"), "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
