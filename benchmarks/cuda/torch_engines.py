"""The PyTorch engines on a CUDA GPU against torch's own attention kernels.

Forward and forward+backward times (CUDA events, medians of interleaved rounds) and peak
allocator memory for B=1, H=8, D=64, causal and not, float16 and bfloat16, n = 4096..65536:

* ``ours``: ``efficient_dot_product_attention`` with ``engine="auto"`` (the fused engine:
  FlashAttention-2 spans, the memory-efficient kernel where a span needs a mask);
* ``ours-chunked``: ``engine="chunked"`` (n <= 16384: it is a loop of small kernels);
* ``ours-flex``: ``engine="flex"`` (rows with a ``score_mod``: FlexAttention compiled);
* ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn``: ``F.scaled_dot_product_attention`` with
  one backend forced (``torch.nn.attention.sdpa_kernel``), heads-first inputs;
* ``flex``: ``torch.compile(flex_attention)`` with a causal ``BlockMask`` (at ``--flex-lengths``,
  default 16384: each compiles), and the same with a ``score_mod`` (``ours`` then runs the
  chunked engine: the fused kernels take no ``score_mod``).

Before the times, ``check()`` compares ``ours`` with SDPA (outputs and gradients) for a few
masks, GQA and lengths not multiples of anything. Usage::

    python benchmarks/cuda/torch_engines.py OUT_DIR [--lengths 4096,16384,65536] [--rounds 5]

writes ``OUT_DIR/torch-engines.json`` and prints a table. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from memory_efficient_attention.torch import efficient_dot_product_attention as attention
from memory_efficient_attention.torch import explain

H, D = 8, 64
DEVICE = "cuda"  # --device cpu: a dry run of this script on a machine without a GPU


def _score_mod(s, b, h, q_idx, kv_idx):
    return s - 0.01 * (q_idx - kv_idx).abs()


def check() -> dict:
    """Max differences (relative to the largest reference entry) of ours (auto) against SDPA's
    math backend in float64 (outputs and q/k/v gradients), float32 and bfloat16 inputs, seed
    layout, GQA 4:1, L=1000, S=1500."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    errors = {}
    for name, kw in {
        "plain": {},
        "causal": dict(is_causal=True),
        "bottom_right": dict(is_causal=True, causal_alignment="bottom_right"),
        "window": dict(local_window_size=(200, 0)),
    }.items():
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(2, 1000, 8, 64, device=DEVICE, generator=gen, dtype=dtype, requires_grad=True)
            k, v = (torch.randn(2, 1500, 2, 64, device=DEVICE, generator=gen, dtype=dtype, requires_grad=True)
                    for _ in range(2))  # fmt: skip
            out = attention(q, k, v, **kw)
            d_out = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v), d_out)
            # the reference: SDPA (math, float64) on heads-first copies with the same mask
            i = torch.arange(1000, device=DEVICE)[:, None]
            j = torch.arange(1500, device=DEVICE)[None, :]
            keep = torch.ones(1000, 1500, dtype=torch.bool, device=DEVICE)
            if kw.get("is_causal"):
                keep &= j <= i + (500 if kw.get("causal_alignment") == "bottom_right" else 0)
            if "local_window_size" in kw:
                keep &= (j >= i - 200) & (j <= i)
            ref_in = [x.detach().double().transpose(1, 2).requires_grad_() for x in (q, k, v)]
            with sdpa_kernel(SDPBackend.MATH):
                ref = F.scaled_dot_product_attention(*ref_in, attn_mask=keep, enable_gqa=True)
            ref_grads = torch.autograd.grad(ref, ref_in, d_out.double().transpose(1, 2))
            pairs = [(out, ref), *zip(grads, ref_grads)]
            errs = [float((a.double() - b.transpose(1, 2)).abs().max() / b.abs().max()) for a, b in pairs]
            errors[f"{name}-{str(dtype).removeprefix('torch.')}"] = {
                "engine": explain(q, k, v, **kw).splitlines()[0],
                "max_rel_err_out_dq_dk_dv": errs,
            }
    return errors


def _impls(n: int, causal: bool, score_mod: bool, flex: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}
    kw = dict(is_causal=causal)
    if score_mod:
        impls["ours"] = lambda q, k, v: attention(q, k, v, score_mod=_score_mod, **kw)
        impls["ours-flex"] = lambda q, k, v: attention(q, k, v, score_mod=_score_mod, engine="flex", **kw)
    else:
        impls["ours"] = lambda q, k, v: attention(q, k, v, **kw)
        if n <= 16384:
            impls["ours-chunked"] = lambda q, k, v: attention(q, k, v, engine="chunked", **kw)
        for name, backend in (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ):

            def run(q, k, v, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
                    ).transpose(1, 2)

            impls[name] = run
    if flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            block_mask = None
            if causal:
                block_mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, n, n, device=DEVICE)
            mod = _score_mod if score_mod else None

            def run_flex(q, k, v):
                out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=mod,
                           block_mask=block_mask)  # fmt: skip
                return out.transpose(1, 2)

            impls["flex"] = run_flex
        except Exception as err:  # a torch without FlexAttention
            print(f"flex unavailable: {err}", file=sys.stderr)
    return impls


def _time(fn, q, k, v, backward: bool) -> tuple[float, float]:
    """``(milliseconds, peak MiB above the inputs)`` of one call."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        out = fn(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return (time.perf_counter() - start) * 1e3, float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn(q, k, v)
    if backward:
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop), (torch.cuda.max_memory_allocated() - base) / 2**20


def _measure(impls: dict, qkv, backward: bool, rounds: int) -> dict:
    """``{"ms": medians, "peak_mib": ...}`` over interleaved rounds (one warm-up call each; an
    implementation that refuses the case is left out, with its error printed)."""
    times = {}
    for name, fn in impls.items():
        try:
            _time(fn, *qkv, backward)
            times[name] = []
        except Exception as err:
            print(f"{name}: {type(err).__name__}: {err}"[:300], file=sys.stderr)
    mem = {}
    for _ in range(rounds):
        for name in times:
            t, mem[name] = _time(impls[name], *qkv, backward)
            times[name].append(t)
    return {"ms": {name: statistics.median(t) for name, t in times.items()}, "peak_mib": mem}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--flex-lengths", default="16384", help="lengths with flex rows (each compiles)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    os.makedirs(args.out_dir, exist_ok=True)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    result = {"device": name, "torch": torch.__version__, "check": check()}
    bad = [n for n, r in result["check"].items() if max(r["max_rel_err_out_dq_dk_dv"]) > 0.03]
    print(json.dumps(result["check"], indent=1))
    if bad:
        print(f"checks failed: {bad}", file=sys.stderr)
        with open(os.path.join(args.out_dir, "torch-engines.json"), "w") as f:
            json.dump(result, f, indent=1)
        return 1
    rows = []
    path = os.path.join(args.out_dir, "torch-engines.json")
    for dtype_name in args.dtypes.split(","):
        for n in (int(x) for x in args.lengths.split(",")):
            for causal, score_mod in ((False, False), (True, False), (True, True)):
                impls = _impls(n, causal, score_mod, str(n) in args.flex_lengths.split(","))
                qkv = [torch.randn(1, n, H, D, device=DEVICE, dtype=getattr(torch, dtype_name),
                                   requires_grad=True) for _ in range(3)]  # fmt: skip
                for mode in ("fwd", "fwd+bwd"):
                    row = dict(dtype=dtype_name, n=n, causal=causal, score_mod=score_mod, mode=mode)
                    row.update(_measure(impls, qkv, mode == "fwd+bwd", args.rounds))
                    rows.append(row)
                    cells = "  ".join(f"{k_} {v_:.2f}" for k_, v_ in row["ms"].items())
                    print(f"{dtype_name} n={n} causal={causal} score_mod={score_mod} {mode}: {cells}")
                del qkv
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
                with open(path, "w") as f:
                    json.dump({**result, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
