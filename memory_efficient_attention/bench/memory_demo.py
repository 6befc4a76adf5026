"""The acceptance measurement: forward + backward peak memory at n = 16384, 1 head, depth 64.

``python -m memory_efficient_attention memory`` (or ``bench --memory-check``) measures, each in a
fresh subprocess, how many MiB the process grows over its baseline (after imports and inputs)
while it computes the gradient of ``sum(out * cotangent)`` w.r.t. q, k and v, for our kernels and
for dense attention. The dense logits alone are ``n * n * 4`` bytes = 1 GiB; ours must stay well
under ``--limit`` (256 MiB). Exit status 1 when one of ours does not.
"""

from __future__ import annotations

import argparse
import sys

from .cases import DTYPES, Shape, format_bytes
from .run import DEFAULT_SEED_DIR, run_worker

__all__ = ["add_memory_arguments", "run_memory_check"]

OURS = ("ours-torch", "ours-jax")
DENSE = ("plain-torch", "xla")


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``memory`` subcommand."""
    parser.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    parser.add_argument("--heads", type=int, default=1, help="heads (default 1)")
    parser.add_argument("--depth", type=int, default=64, help="depth per head (default 64)")
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="dtype of q, k and v (default float32)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default cpu)")
    parser.add_argument(
        "--limit-mib", type=float, default=256.0, help="pass mark for ours, MiB (default 256)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per subprocess (default 300)")
    parser.add_argument("--no-dense", action="store_true", help="measure only ours")
    parser.add_argument("--causal", action="store_true", help="causal (top-left) attention")


def run_memory_check(
    n: int = 16384,
    heads: int = 1,
    depth: int = 64,
    dtype: str = "float32",
    device: str = "cpu",
    limit_mib: float = 256.0,
    timeout_s: float = 300.0,
    dense: bool = True,
    causal: bool = False,
) -> int:
    """Measure and print; return the exit status (0 when all of ours are under the limit)."""
    shape = Shape(n=n, batch=1, heads=heads, depth=depth, dtype=dtype, causal=causal)
    logits = shape.heads * n * n * 4
    print(
        f"forward + backward{', causal' if causal else ''}, n={n}, heads={heads}, depth={depth}, "
        f"{dtype}, {device}; "
        f"dense logits alone: {format_bytes(logits)}; pass mark for ours: {limit_mib:g} MiB"
    )
    status = 0
    for impl in OURS + (DENSE if dense else ()):
        job = {
            "kind": "memory", "impls": [impl], "shape": shape.to_dict(), "mode": "backward",
            "device": device, "threads": None, "seed_dir": DEFAULT_SEED_DIR,
        }  # fmt: skip
        result = run_worker(job, timeout_s, None)
        memory = result.get("memory", {}).get(impl) or {"error": result.get("failure")}
        if memory.get("error"):
            print(f"  {impl:12s} error: {memory['error']}")
            status = 1 if impl in OURS else status
            continue
        added = memory["peak_added_bytes"] / 2**20
        verdict = ""
        if impl in OURS:
            verdict = "ok" if added < limit_mib else f"FAIL (>= {limit_mib:g} MiB)"
            status = status if added < limit_mib else 1
        print(
            f"  {impl:12s} {added:9.1f} MiB added over baseline "
            f"(outputs {format_bytes(memory['output_bytes'])}, "
            f"overhead {format_bytes(memory['overhead_bytes'])}) {verdict}".rstrip()
        )
        sys.stdout.flush()
    return status
