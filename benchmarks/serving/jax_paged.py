"""Paged decoding in JAX (CPU, float32, interleaved rounds, medians): batch 8, 8192 cached tokens
each, 32 query heads on 4 key/value heads (GQA 8:1), depth 64, pages of 256 in a shuffled pool.

* ours: ``efficient_dot_product_attention(q, pool_k, pool_v, block_table=...,
  key_value_seq_lengths=...)`` under ``jax.jit`` (gathers the rows' pages, then the kernel);
* gather + xla: the same gather written by hand, then ``jax.nn.dot_product_attention``;
* contiguous xla: ``jax.nn.dot_product_attention`` on an already contiguous cache (the best case).

Usage: ``python benchmarks/serving/jax_paged.py [rounds]``; writes ``results_jax_paged.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from memory_efficient_attention.jax import efficient_dot_product_attention


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    B, S, H, K, D, page = 8, 8192, 32, 4, 64, 256
    pages = B * S // page
    keys = jax.random.split(jax.random.key(0), 4)
    pool_k = jax.random.normal(keys[0], (pages, page, K, D))
    pool_v = jax.random.normal(keys[1], (pages, page, K, D))
    table = jax.random.permutation(keys[2], pages).reshape(B, S // page).astype(jnp.int32)
    q = jax.random.normal(keys[3], (B, 1, H, D))
    lengths = jnp.full((B,), S, jnp.int32)
    dense_k = pool_k[table].reshape(B, S, K, D)
    dense_v = pool_v[table].reshape(B, S, K, D)

    ours = jax.jit(
        lambda q, pk, pv, t: efficient_dot_product_attention(
            q, pk, pv, block_table=t, key_value_seq_lengths=lengths
        )
    )
    gather_xla = jax.jit(
        lambda q, pk, pv, t: jax.nn.dot_product_attention(
            q, pk[t].reshape(B, S, K, D), pv[t].reshape(B, S, K, D)
        )
    )
    contiguous = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
    calls = {
        "ours (paged)": lambda: ours(q, pool_k, pool_v, table),
        "gather + xla": lambda: gather_xla(q, pool_k, pool_v, table),
        "contiguous xla": lambda: contiguous(q, dense_k, dense_v),
    }
    want = calls["contiguous xla"]()
    for name, call in calls.items():  # compile, and check the outputs agree
        err = float(jnp.abs(call() - want).max())
        assert err < 1e-4, (name, err)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            time.sleep(0.2)
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    base = med["gather + xla"]
    for name, ms in med.items():
        print(f"{name:16s} {ms:7.2f} ms  {ms / base:5.2f}x gather + xla")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_jax_paged.json")
    with open(out, "w") as f:
        json.dump(
            dict(
                command=" ".join(["python", *sys.argv]), load=os.getloadavg()[0], median_ms=med, rounds=rounds
            ),
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
