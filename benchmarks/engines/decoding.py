"""Decoding (few query rows x many keys, 8 query heads, D = 64, float32), torch.

Rows, timed side by side (interleaved rounds, medians), for each number of key/value heads and
of keys:

* ``sdpa``: torch SDPA on heads-first *contiguous* K/V (what issue 12's target compares with);
* ``sdpa-same-layout``: torch SDPA on the seed-layout K/V ``[B, S, K, D]`` seen heads-first (a
  strided view: what SDPA does given the tensors our seed-layout function gets);
* ``ours``: ``efficient_dot_product_attention`` on the seed layout (``engine="auto"``);
* ``ours-heads-first``: our ``scaled_dot_product_attention`` drop-in on the contiguous heads-first
  K/V (Hugging Face's KV cache);
* ``bmm-strided``: the bare minimum in torch ops: one batched matmul per product on the strided
  views (scores, softmax, weighted sum);
* ``read-k-and-v``: ``k.sum() + v.sum()``: reading K and V once, sequentially (the memory-speed
  floor).

Usage: ``python benchmarks/engines/decoding.py [--kv-heads 1,2,4,8] [--keys 4096,16384,65536]
[--queries 1] [--rounds 15]``. With 8 key/value heads on the seed layout the keys are strided per
head, and every torch op reading them (SDPA's kernel, a bare batched matmul) takes about twice
the contiguous time: issue 12's 1.1x target is out of reach there without a kernel of our own.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from memory_efficient_attention.torch import efficient_dot_product_attention as attention
from memory_efficient_attention.torch import scaled_dot_product_attention as sdpa_dropin


def measure(S: int, K: int, L: int, rounds: int) -> dict[str, float]:
    """Median milliseconds of each row for ``L`` queries x ``S`` keys on ``K`` key/value heads."""
    H, D = 8, 64
    g = H // K
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, L, H, D, generator=gen)
    k, v = (torch.randn(1, S, K, D, generator=gen) for _ in range(2))
    k_first, v_first = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    q_first = q.transpose(1, 2)

    def bmm_strided():
        kh, vh = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [K, S, D], strided
        s = torch.bmm(q[0].reshape(L, K, g, D).permute(1, 0, 2, 3).reshape(K, L * g, D), kh.transpose(1, 2))
        p = (s.mul_(D**-0.5) - s.amax(-1, keepdim=True)).exp_()
        o = torch.bmm(p, vh) / p.sum(-1, keepdim=True)
        return o.reshape(K, L, g, D).permute(0, 2, 1, 3).reshape(1, H, L, D)

    rows = {
        "sdpa": lambda: F.scaled_dot_product_attention(q_first, k_first, v_first, enable_gqa=g > 1),
        "sdpa-same-layout": lambda: F.scaled_dot_product_attention(
            q_first, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=g > 1
        ),
        "ours": lambda: attention(q, k, v).transpose(1, 2),
        "ours-heads-first": lambda: sdpa_dropin(q_first, k_first, v_first, enable_gqa=g > 1),
        "bmm-strided": bmm_strided,
        "read-k-and-v": lambda: k.sum() + v.sum(),
    }
    want = rows["sdpa"]()
    for name in ("sdpa-same-layout", "ours", "ours-heads-first", "bmm-strided"):
        got = rows[name]().reshape(want.shape)
        assert torch.allclose(got, want, atol=1e-5), name
    times = {name: [] for name in rows}
    for fn in rows.values():
        fn()
    for _ in range(rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kv-heads", default="1,2,4,8")
    parser.add_argument("--keys", default="4096,16384,65536")
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"decoding {args.queries} queries, 8 query heads, D=64, float32: ms (x sdpa)")
    for S in (int(x) for x in args.keys.split(",")):
        for K in (int(x) for x in args.kv_heads.split(",")):
            ms = measure(S, K, args.queries, args.rounds)
            cells = "  ".join(f"{n} {t:.2f} ({t / ms['sdpa']:.2f}x)" for n, t in ms.items() if n != "sdpa")
            print(f"S={S} K={K}: sdpa {ms['sdpa']:.2f}  {cells}", flush=True)


if __name__ == "__main__":
    main()
