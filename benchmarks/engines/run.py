"""The engines side by side with torch's fused SDPA, on the shapes of the "fused engines" issue.

Each row times ours with ``engine="auto"`` (what users get), ``engine="chunked"`` and torch SDPA
given the same mask (as ``is_causal`` or a boolean ``attn_mask``) in interleaved rounds, medians;
float32, batch 1, 8 heads, depth 64. ``--busy`` runs one busy process (``while True: pass``) on
the other core for the whole run. ``--rows`` picks rows by name prefix.

Usage: ``python benchmarks/engines/run.py [--repeats 5] [--busy] [--rows plain,causal,...]
[--no-chunked] [--out NAME.json]``; writes ``results[-busy].json`` (or ``NAME.json``) beside this
file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from types import SimpleNamespace


def _rows(torch):
    """name -> (L, S, K, ours kwargs, sdpa kwargs builder, modes)."""

    def causal_br(L, S):
        return {"attn_mask": torch.ones(L, S, dtype=torch.bool).tril(S - L)}

    def window(L, S, left):
        i, j = torch.arange(L)[:, None], torch.arange(S)[None]
        return {"attn_mask": (j <= i) & (j >= i - left)}

    both = ("forward", "forward+backward")
    docs = torch.arange(4096).view(1, -1) // 512  # 8 packed documents of 512

    def segments(L, S):
        return {"attn_mask": docs[0].view(-1, 1) == docs[0].view(1, -1)}

    def kv_length(L, S):
        return {"attn_mask": (torch.arange(S) < 3000).view(1, -1).expand(L, S)}

    return {
        "plain 4096": (4096, 4096, 8, {}, lambda L, S: {}, both),
        "causal 4096": (4096, 4096, 8, {"is_causal": True}, lambda L, S: {"is_causal": True}, both),
        "plain 16384": (16384, 16384, 8, {}, lambda L, S: {}, both),
        "causal 16384": (16384, 16384, 8, {"is_causal": True}, lambda L, S: {"is_causal": True}, both),
        "bottom-right causal 4096 x 8192": (
            4096, 8192, 8, {"is_causal": True, "causal_alignment": "bottom_right"}, causal_br, both,
        ),
        "window (256, 0) 16384": (
            16384, 16384, 8, {"local_window_size": (256, 0)}, lambda L, S: window(L, S, 256), both,
        ),
        "segments 4096 (8 documents)": (
            4096, 4096, 8, {"query_segment_ids": docs, "key_segment_ids": docs}, segments, both,
        ),
        "lengths 4096 (keys < 3000)": (
            4096, 4096, 8, {"key_value_seq_lengths": torch.tensor([3000])}, kv_length, both,
        ),
        "decoding 1 x 65536": (1, 65536, 8, {}, lambda L, S: {}, ("forward",)),
        "decoding 1 x 65536 GQA 8:1": (1, 65536, 1, {}, lambda L, S: {"enable_gqa": True}, ("forward",)),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--rows", default="")
    parser.add_argument("--no-chunked", action="store_true", help="skip engine='chunked'")
    parser.add_argument("--out", default="", help="JSON file name (default results[-busy].json)")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    from memory_efficient_attention.bench.measure import time_round_robin
    from memory_efficient_attention.torch import efficient_dot_product_attention as ours
    from memory_efficient_attention.torch import explain

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    results = {}
    try:
        for name, (L, S, K, kwargs, sdpa_kwargs, modes) in _rows(torch).items():
            if args.rows and not any(name.startswith(p) for p in args.rows.split(",")):
                continue
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(1, L, 8, 64, generator=gen)
            k = torch.randn(1, S, K, 64, generator=gen)
            v = torch.randn(1, S, K, 64, generator=gen)
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            extra = sdpa_kwargs(L, S)
            engine = explain(q, k, v, **kwargs).splitlines()[0]
            for mode in modes:
                backward = mode == "forward+backward"

                def run_of(fn, *xs, **kw):
                    def run():
                        leaves = [x.detach().requires_grad_(backward) for x in xs]
                        with torch.set_grad_enabled(backward):
                            out = fn(*leaves, **kw)
                            if backward:
                                out.backward(torch.ones_like(out))

                    return run

                cases = {"ours": run_of(ours, q, k, v, **kwargs)}
                if not args.no_chunked:
                    cases["ours-chunked"] = run_of(ours, q, k, v, engine="chunked", **kwargs)
                cases["sdpa"] = run_of(F.scaled_dot_product_attention, qt, kt, vt, **extra)
                for run in cases.values():
                    run()
                runners = {c: SimpleNamespace(call=run) for c, run in cases.items()}
                times = time_round_robin(runners, args.repeats)  # order rotated every round
                med = {c: statistics.median(t) for c, t in times.items()}
                results[f"{name}, {mode}"] = {
                    "engine": engine,
                    **{c: {"seconds": med[c], "ratio_to_sdpa": med[c] / med["sdpa"]} for c in med},
                }
                row = "  ".join(f"{c} {med[c] * 1e3:8.1f} ms ({med[c] / med['sdpa']:.2f}x)" for c in med)
                print(f"{name:34s} {mode:17s} {row}", flush=True)
    finally:
        if busy is not None:
            busy.kill()
    record = {
        "command": "python " + " ".join(sys.argv),
        "repeats": args.repeats,
        "busy_core": args.busy,
        "shape": "batch 1, 8 query heads, depth 64, float32",
        "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_average_before": os.getloadavg(),
        "results": results,
    }
    name = args.out or f"results{'-busy' if args.busy else ''}.json"
    out = os.path.join(os.path.dirname(__file__), name)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
