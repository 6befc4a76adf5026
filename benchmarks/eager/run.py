"""Eager (outside ``jit``) calls of the JAX functions: warm call time against
``jax.nn.dot_product_attention`` and resident memory over many identical calls.

    python benchmarks/eager/run.py [rounds] [calls] [--out FILE]

Times are medians over ``rounds`` interleaved rounds (each implementation once per round, order
alternating) after two warm-up calls each; memory is the RSS growth (``/proc/self/status``
VmRSS) over ``calls`` identical calls after the warm-up, for each implementation in turn.
Shape ``[1, 64, 2, 8]`` float32 (the issue's), ours also with dropout and with a ``score_mod``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import memory_efficient_attention
from memory_efficient_attention.jax import dot_product_attention, efficient_dot_product_attention

SHAPE = (1, 64, 2, 8)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _score_mod(s, b, h, q, k):
    return s - 0.01 * (q - k)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("rounds", type=int, nargs="?", default=30)
    p.add_argument("calls", type=int, nargs="?", default=200)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    q, k, v = jax.random.normal(jax.random.key(0), (3, *SHAPE), dtype=jnp.float32)
    rng = jax.random.key(1)
    impls = {
        "jax.nn": lambda: jax.nn.dot_product_attention(q, k, v),
        "ours drop-in": lambda: dot_product_attention(q, k, v),
        "ours seed": lambda: efficient_dot_product_attention(q, k, v),
        "ours seed dropout": lambda: efficient_dot_product_attention(
            q, k, v, dropout_rate=0.1, dropout_rng=rng
        ),
        "ours seed score_mod": lambda: efficient_dot_product_attention(q, k, v, score_mod=_score_mod),
    }
    first = {}
    for name, f in impls.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        first[name] = time.perf_counter() - t0
        jax.block_until_ready(f())
    times = {name: [] for name in impls}
    names = list(impls)
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            jax.block_until_ready(impls[name]())
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    growth = {}
    for name, f in impls.items():
        before = rss_mib()
        for _ in range(a.calls):
            jax.block_until_ready(f())
        growth[name] = rss_mib() - before
    base = med["jax.nn"]
    print(f"shape {SHAPE} float32, {a.rounds} rounds, {a.calls} calls for memory; jax {jax.__version__}")
    print(f"{'impl':22} {'first call':>11} {'warm median':>12} {'/ jax.nn':>9} {'RSS growth':>11}")
    for name in impls:
        print(
            f"{name:22} {first[name] * 1e3:9.1f}ms {med[name] * 1e3:10.3f}ms {med[name] / base:9.2f} "
            f"{growth[name]:8.1f}MiB"
        )
    if a.out:
        result = {
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "uptime_before": uptime_before,
            "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "package": os.path.dirname(memory_efficient_attention.__file__),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__},
            "shape": SHAPE,
            "rounds": a.rounds,
            "calls": a.calls,
            "first_call_s": first,
            "warm_median_s": med,
            "warm_ratio_to_jax_nn": {n: m / base for n, m in med.items()},
            "rss_growth_mib": growth,
        }
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
