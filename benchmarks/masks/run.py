"""Block skipping, measured: causal and sliding-window attention against unmasked, same run
(and torch SDPA's own causal against unmasked, for reference).

Interleaved repeats (full, causal, window, full, ...), medians; forward+backward, float32,
batch 1, 8 heads, depth 64. Usage: python benchmarks/masks/run.py [n] [window] [repeats]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    import jax
    import jax.numpy as jnp
    import torch

    from memory_efficient_attention.jax import efficient_dot_product_attention as attention_jax
    from memory_efficient_attention.torch import efficient_dot_product_attention as attention_torch

    variants = {
        "full": {},
        "causal": {"is_causal": True},
        f"window {window}": {"local_window_size": (window, window)},
        f"causal window {window}": {"is_causal": True, "local_window_size": (window, 0)},
    }
    q, k, v = (torch.randn(1, n, 8, 64, requires_grad=True) for _ in range(3))
    qj, kj, vj = (jnp.asarray(x.detach().numpy()) for x in (q, k, v))

    def torch_case(kw):
        def run():
            out = attention_torch(q, k, v, **kw)
            out.backward(torch.ones_like(out))

        return run

    def jax_case(kw):
        grad = jax.jit(jax.grad(lambda q, k, v: attention_jax(q, k, v, **kw).sum(), argnums=(0, 1, 2)))

        def run():
            jax.block_until_ready(grad(qj, kj, vj))

        return run

    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))

    def sdpa_case(kw):  # torch's fused kernel, for reference: it has no window argument
        def run():
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, **kw)
            out.backward(torch.ones_like(out))

        return run

    results = {}
    for framework, make in (("torch", torch_case), ("jax", jax_case), ("sdpa", sdpa_case)):
        kinds = variants if framework != "sdpa" else {k: variants[k] for k in ("full", "causal")}
        cases = {name: make(kw) for name, kw in kinds.items()}
        for run in cases.values():
            run()  # warm up / compile
        times = {name: [] for name in cases}
        for _ in range(repeats):
            for name, run in cases.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        results[framework] = {
            name: {"seconds": med[name], "ratio_to_full": med[name] / med["full"]} for name in med
        }
        for name in med:
            print(f"{framework:6s} {name:22s} {med[name]:8.3f} s   {med[name] / med['full']:.3f} x full")
    record = {
        "command": "python " + " ".join(sys.argv),
        "n": n,
        "window": window,
        "repeats": repeats,
        "mode": "forward+backward",
        "shape": "batch 1, 8 heads, depth 64, float32",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_average_before": os.getloadavg(),
        "results": results,
    }
    with open(os.path.join(os.path.dirname(__file__), f"results-n{n}.json"), "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
