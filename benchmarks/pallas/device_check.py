"""The Pallas engine on an accelerator (GPU or TPU), compiled rather than interpreted: first its
outputs and gradients against the chunked engine (float32, small shapes with every feature it
covers: lengths not multiples of the blocks, GQA, causal/windows, lengths, segments, soft cap,
score_mod, mask_mod); then forward and forward+backward times (bfloat16, B=1, H=8, D=64,
n = 4096..65536, causal and not, with a score_mod) against ``jax.nn.dot_product_attention`` with
``implementation="xla"`` and, on a GPU, ``"cudnn"``. Medians of interleaved rounds.

Usage: ``python benchmarks/pallas/device_check.py OUT_DIR [--lengths 4096,16384,65536]``; writes
``OUT_DIR/pallas.json``. Exits 1 if a correctness check fails (the times are then not taken).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from memory_efficient_attention.jax import efficient_dot_product_attention as attention


def _score_mod(s, b, h, q_idx, kv_idx):
    return s - 0.01 * jnp.abs(q_idx - kv_idx).astype(s.dtype)


CHECKS = {
    "causal-softcap-gqa": dict(is_causal=True, logits_soft_cap=20.0),
    "window-bottom-right": dict(is_causal=True, causal_alignment="bottom_right", local_window_size=(100, 0)),
    "lengths-segments": dict(lengths=True, segments=True),
    "score_mod-mask_mod": dict(score_mod=_score_mod, mask_mod=lambda b, h, q, k: (q + k) % 5 != 0),
}


def correctness() -> dict:
    rng = np.random.default_rng(0)
    errors = {}
    for name, options in CHECKS.items():
        options = dict(options)
        L, S = 333, 517
        q = jnp.asarray(rng.standard_normal((2, L, 8, 64)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((2, S, 2, 64)), jnp.float32) for _ in range(2))
        if options.pop("lengths", False):
            options.update(query_seq_lengths=jnp.array([L, 200]), key_value_seq_lengths=jnp.array([S, 77]))
        if options.pop("segments", False):
            options.update(
                query_segment_ids=jnp.asarray(np.sort(rng.integers(0, 5, (2, L)))),
                key_segment_ids=jnp.asarray(np.sort(rng.integers(0, 5, (2, S)))),
            )
        results = []
        for engine in ("pallas", "chunked"):
            f = jax.jit(lambda q, k, v, e=engine: attention(q, k, v, engine=e, **options))
            out, vjp = jax.vjp(f, q, k, v)
            results.append([out, *vjp(jnp.ones_like(out))])
        errors[name] = [float(jnp.abs(a - b).max()) for a, b in zip(*results)]
    return errors


def timings(lengths, rounds: int = 5) -> list[dict]:
    gpu = jax.default_backend() == "gpu"
    rows = []
    for n in lengths:
        key = jax.random.split(jax.random.key(n), 3)
        q, k, v = (jax.random.normal(kk, (1, n, 8, 64), jnp.bfloat16) for kk in key)
        for causal in (False, True):
            impls = {
                "pallas": lambda q, k, v: attention(q, k, v, is_causal=causal, engine="pallas"),
                "pallas+score_mod": lambda q, k, v: attention(
                    q, k, v, is_causal=causal, engine="pallas", score_mod=_score_mod
                ),
                "xla": lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=causal, implementation="xla"
                ),
            }
            if gpu:
                impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=causal, implementation="cudnn"
                )
            for mode in ("fwd", "fwd+bwd"):
                calls = {}
                for name, f in impls.items():
                    if mode == "fwd":
                        calls[name] = jax.jit(f)
                    else:
                        calls[name] = jax.jit(
                            jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
                        )
                times = {name: [] for name in calls}
                for name, c in list(calls.items()):
                    try:
                        jax.block_until_ready(c(q, k, v))
                    except Exception as err:
                        times[name] = f"{type(err).__name__}: {str(err)[:200]}"
                        del calls[name]
                for _ in range(rounds):
                    for name, c in calls.items():
                        t0 = time.perf_counter()
                        jax.block_until_ready(c(q, k, v))
                        times[name].append(time.perf_counter() - t0)
                row = dict(n=n, causal=causal, mode=mode)
                row.update(
                    {
                        name: t if isinstance(t, str) else statistics.median(t) * 1e3
                        for name, t in times.items()
                    }
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--lengths", default="4096,16384,65536")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    record = dict(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])
    record["errors"] = errors = correctness()
    print(json.dumps(errors), flush=True)
    ok = all(max(e) < 2e-3 for e in errors.values())
    if ok:
        record["times_ms"] = timings([int(x) for x in args.lengths.split(",")])
    with open(os.path.join(args.out, "pallas.json"), "w") as f:
        json.dump(record, f, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
