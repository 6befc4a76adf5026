"""Serving-shaped calls side by side (PyTorch, CPU, float32, interleaved rounds, medians).

* paged decoding: batch 8, 8192 cached tokens each, 32 query heads on 4 key/value heads (GQA 8:1),
  depth 64, pages of 256 in a shuffled pool: ``flash_attn.flash_attn_with_kvcache(block_table=...)``
  against torch SDPA on the same keys gathered into a contiguous ``[B, K, S, D]`` cache first (the
  gather timed with it) and against SDPA on an already contiguous cache (the best case).
* varlen training step: 8 documents of 256-2048 tokens (8 heads, depth 64), forward+backward:
  ``flash_attn_varlen_func(causal=True)`` on the packed tokens against padding to the longest
  document + SDPA with a boolean mask (causal & padding).

Peak memory is the RSS added in a fresh process per row. Usage: ``python benchmarks/serving/run.py
[repeats]``; writes ``results.json`` beside this file.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _decoding(torch, F, fa):
    g = torch.Generator().manual_seed(0)
    B, S, H, K, D, page = 8, 8192, 32, 4, 64, 256
    pages = B * S // page
    pool_k = torch.randn(pages, page, K, D, generator=g)
    pool_v = torch.randn(pages, page, K, D, generator=g)
    table = torch.randperm(pages, generator=g).view(B, S // page).to(torch.int32)
    q = torch.randn(B, 1, H, D, generator=g)
    lengths = torch.full((B,), S, dtype=torch.int32)
    dense_k = pool_k[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    dense_v = pool_v[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    qt = q.transpose(1, 2)

    def ours():
        return fa.flash_attn_with_kvcache(q, pool_k, pool_v, cache_seqlens=lengths, block_table=table)

    def gather_sdpa():
        k = pool_k[table.long()].flatten(1, 2).transpose(1, 2)
        v = pool_v[table.long()].flatten(1, 2).transpose(1, 2)
        return F.scaled_dot_product_attention(qt, k, v, enable_gqa=True)

    def contiguous_sdpa():
        return F.scaled_dot_product_attention(qt, dense_k, dense_v, enable_gqa=True)

    return {
        "ours (paged)": ours,
        "sdpa (gather + call)": gather_sdpa,
        "sdpa (contiguous cache)": contiguous_sdpa,
    }


def _varlen(torch, F, fa):
    g = torch.Generator().manual_seed(1)
    lengths = [2048, 256, 1024, 512, 1536, 256, 768, 1792]
    H, D, T, B, M = 8, 64, sum(lengths), len(lengths), max(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))
    pos = torch.arange(M)
    keep = (pos[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :] & torch.ones(
        M, M, dtype=torch.bool
    ).tril()

    def padded(x):
        out = x.new_zeros(B, M, H, D)
        for b in range(B):
            out[b, : lengths[b]] = x[cu[b] : cu[b + 1]]
        return out.transpose(1, 2)

    def ours():
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fa.flash_attn_varlen_func(*xs, cu, cu, M, M, causal=True)
        out.sum().backward()

    def pad_sdpa():
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*(padded(x) for x in xs), attn_mask=keep)
        out.sum().backward()

    return {"ours (varlen, packed)": ours, "sdpa (padded + mask)": pad_sdpa}


ROWS = {"paged decoding B=8 S=8192 GQA 8:1": _decoding, "varlen causal fwd+bwd 8 docs, 8128 tokens": _varlen}


def _peak_child(row: str, impl: str) -> float:
    """Peak RSS (MiB) one call of ``impl`` adds in a fresh process, after one warm-up call."""
    code = (
        "import resource, sys, torch, torch.nn.functional as F\n"
        "sys.path.insert(0, '.')\n"
        "from benchmarks.serving.run import ROWS\n"
        "from memory_efficient_attention import flash_attn as fa\n"
        f"fns = ROWS[{row!r}](torch, F, fa)\n"
        f"fn = fns[{impl!r}]; fn()\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "base = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
        "fn()\n"
        "peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
        "print((peak - base) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    import torch
    import torch.nn.functional as F

    from memory_efficient_attention import flash_attn as fa

    results = {}
    for row, build in ROWS.items():
        fns = build(torch, F, fa)
        for fn in fns.values():
            fn()
        times = {name: [] for name in fns}
        for r in range(repeats):
            names = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
            for name in names:
                time.sleep(0.1)
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
        med = {n: statistics.median(t) for n, t in times.items()}
        ref = list(med)[1]
        results[row] = {
            n: {"seconds": med[n], "ratio": med[n] / med[ref], "peak_added_mib": _peak_child(row, n)}
            for n in med
        }
        cells = [
            f"{n} {med[n] * 1e3:.1f} ms ({med[n] / med[ref]:.2f}x, "
            f"{results[row][n]['peak_added_mib']:.0f} MiB)"
            for n in med
        ]
        print(row, "  ".join(cells), flush=True)
    record = {
        "command": "python " + " ".join(sys.argv),
        "repeats": repeats,
        "ratio_to": "the second implementation of each row",
        "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_average_before": os.getloadavg(),
        "results": results,
    }
    with open(os.path.join(os.path.dirname(__file__), "results.json"), "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
