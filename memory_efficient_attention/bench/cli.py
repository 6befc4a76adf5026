"""Command line: ``memory-efficient-attention bench [options]`` and ``... memory [options]``.

Examples::

    python -m memory_efficient_attention bench                      # defaults, ~2 min on 2 cores
    python -m memory_efficient_attention bench --lengths 512,2048 --frameworks torch
    python -m memory_efficient_attention bench --paper              # the paper's tables
    python -m memory_efficient_attention memory                     # the acceptance check
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .cases import DTYPES, IMPLS, MODES, select_impls
from .run import (
    DEFAULT_SEED_DIR,
    BenchConfig,
    count_jobs,
    run_cases,
    seed_available,
    seed_install_command,
)

__all__ = ["build_parser", "config_from_args", "main", "parse_lengths", "parse_size"]

DEFAULT_LENGTHS = "512,1024,2048"
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20,
               "g": 2**30, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}  # fmt: skip


def parse_lengths(text: str) -> list[int]:
    """``"1024,2^12,4096"`` -> ``[1024, 4096, 4096]`` minus duplicates, sorted."""
    lengths = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        base, _, exponent = item.replace("**", "^").partition("^")
        try:
            value = int(base) ** int(exponent) if exponent else int(base)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a length: {item!r} (use 1024 or 2^10)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"lengths must be positive, got {item!r}")
        lengths.add(value)
    if not lengths:
        raise argparse.ArgumentTypeError("no lengths given")
    return sorted(lengths)


def parse_size(text: str) -> int:
    """``"4GiB"``, ``"512MB"``, ``"1.5G"`` or a plain byte count -> bytes."""
    number = text.strip().lower().rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text.strip().lower()[len(number) :].strip()
    if unit not in _SIZE_UNITS or not number:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MB)")
    return int(float(number) * _SIZE_UNITS[unit])


def _csv(choices: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(choices)}")
        return items

    return parse


def _default_device() -> str:
    """``cuda`` when an NVIDIA driver is visible, else ``cpu`` (decided without importing torch)."""
    visible = Path("/proc/driver/nvidia/gpus").exists() or shutil.which("nvidia-smi")
    return "cuda" if visible else "cpu"


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``bench`` subcommand."""
    shape = parser.add_argument_group("shapes (self-attention)")
    shape.add_argument(
        "--lengths",
        type=parse_lengths,
        default=None,
        help=f"sequence lengths, comma separated (default {DEFAULT_LENGTHS}; --paper: its own)",
    )
    shape.add_argument("--heads", type=int, default=None, help="heads (default 8; 1 with --paper)")
    shape.add_argument("--depth", type=int, default=64, help="depth per head (default 64)")
    shape.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    shape.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="dtype of q, k and v (default float32)"
    )
    shape.add_argument("--causal", action="store_true", help="causal (top-left) attention")
    shape.add_argument(
        "--engine",
        choices=("auto", "chunked", "fused"),
        default="auto",
        help="ours' engine (default auto; each row's note says which ran; JAX has only chunked)",
    )
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--frameworks",
        type=_csv(("torch", "jax")),
        default=["torch", "jax"],
        help="torch and/or jax, comma separated: run only their implementations (default both)",
    )
    what.add_argument(
        "--impls",
        type=_csv(list(IMPLS)),
        default=None,
        help=f"implementations (default all): {','.join(IMPLS)}",
    )
    what.add_argument(
        "--modes",
        type=_csv(MODES),
        default=list(MODES),
        help="forward (inference) and/or backward (forward + backward), comma separated (default both)",
    )
    what.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; 3 with --paper)")
    what.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    what.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pin each worker to this many cores (default: all)",
    )
    what.add_argument(
        "--no-time",
        dest="measure_time",
        action="store_false",
        help="do not time: measure only memory (the time columns stay empty)",
    )
    what.add_argument(
        "--no-memory",
        dest="measure_memory",
        action="store_false",
        help="do not measure memory: only time (the memory columns stay empty)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-dense-memory",
        type=parse_size,
        default=4 * 2**30,
        help="skip dense cases whose n x n logits exceed this (default 4GiB)",
    )
    limits.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per case and subprocess (default 300)"
    )
    limits.add_argument(
        "--time-budget",
        type=float,
        default=15.0,
        help="seconds of timed rounds per (n, mode) (default 15); fewer repeats if over (3, or 1 "
        "when one round alone is over)",
    )
    limits.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="memory subprocesses run at once (default 2; timing always runs alone)",
    )
    seed = parser.add_argument_group("the seed package 0.1.3")
    seed.add_argument(
        "--seed-dir",
        default=DEFAULT_SEED_DIR,
        help="folder the seed is installed in, with pip install --target (default %(default)s); "
        "its cases are skipped when it is not there",
    )
    seed.add_argument(
        "--install-seed",
        action="store_true",
        help="pip install the seed into --seed-dir first (needs PyPI; if that fails the "
        "benchmark runs without the seed)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        help="folder for bench.json, .png and .txt (default bench-out/)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    special = parser.add_argument_group("special runs")
    special.add_argument(
        "--paper", action="store_true", help="the paper's tables: 1 head, depth 64, n = 2^8 .. 2^16"
    )
    special.add_argument("--long", action="store_true", help="with --paper: up to 2^18")
    special.add_argument(
        "--memory-check",
        action="store_true",
        help="only the acceptance memory check (same as the memory command)",
    )
    # fmt: on


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with the ``bench`` and ``memory`` subcommands."""
    from .memory_demo import add_memory_arguments

    parser = argparse.ArgumentParser(
        prog="memory-efficient-attention",
        description="Benchmarks of memory_efficient_attention against dense attention.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_bench_arguments(commands.add_parser("bench", help="time and memory benchmark"))
    add_memory_arguments(commands.add_parser("memory", help="forward+backward memory check"))
    return parser


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Resolve defaults (which differ under ``--paper``) into a ``BenchConfig``."""
    from .paper import PAPER_IMPLS, paper_lengths

    if args.paper:
        lengths = args.lengths or paper_lengths(args.long)
        impls = select_impls(args.frameworks, args.impls or PAPER_IMPLS)
        heads, repeats = args.heads or 1, args.repeats or 3
    else:
        lengths = args.lengths or parse_lengths(DEFAULT_LENGTHS)
        impls = select_impls(args.frameworks, args.impls)
        heads, repeats = args.heads or 8, args.repeats or 5
    return BenchConfig(
        lengths=lengths,
        impls=impls,
        modes=args.modes,
        batch=args.batch,
        heads=heads,
        depth=args.depth,
        dtype=args.dtype,
        causal=args.causal,
        engine=args.engine,
        repeats=repeats,
        device=args.device or _default_device(),
        threads=args.threads,
        max_dense_bytes=args.max_dense_memory,
        timeout_s=args.timeout,
        time_budget_s=args.time_budget,
        seed_dir=args.seed_dir,
        jobs=args.jobs,
        measure_time=args.measure_time,
        measure_memory=args.measure_memory,
    )


def _install_seed(seed_dir: str, timeout_s: float = 300.0) -> bool:
    """``pip install`` the seed into ``seed_dir`` (unless it is there); whether it is there now.

    Never raises: without network (or pip) the benchmark goes on and skips the seed's cases."""
    if seed_available(seed_dir):
        print(f"seed 0.1.3 already in {seed_dir}", file=sys.stderr)
        return True
    command = seed_install_command(seed_dir)
    print("$", shlex.join(command), file=sys.stderr)
    try:
        subprocess.run(command, check=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"warning: could not install the seed ({err}); running without it", file=sys.stderr)
    return seed_available(seed_dir)


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command: run, print the table, write JSON, PNG and the table text."""
    from . import report
    from .paper import CAVEAT, format_paper_tables

    if args.memory_check:
        from .memory_demo import run_memory_check

        return run_memory_check(device=args.device or "cpu", timeout_s=args.timeout)
    if args.install_seed:
        _install_seed(args.seed_dir, timeout_s=args.timeout)
    config = config_from_args(args)
    machine = report.describe_machine(config.device)
    cores = machine["cpu_count"] or 1
    if machine["load_average"] and machine["load_average"][0] > 0.5 * cores:
        print(f"warning: load average {machine['load_average'][0]:.2f} on {cores} cores; "
              "another process is busy and timings will be noisy", file=sys.stderr)  # fmt: skip
    if any(IMPLS[name].seed for name in config.impls) and not seed_available(config.seed_dir):
        print("note: seed 0.1.3 not found in --seed-dir; its cases are reported as not "
              f"available. Install: {shlex.join(seed_install_command(config.seed_dir))}"
              " (or pass --install-seed)", file=sys.stderr)  # fmt: skip

    from tqdm import tqdm

    with tqdm(total=count_jobs(config), file=sys.stderr, disable=args.no_progress,
              unit="job", dynamic_ncols=True) as bar:  # fmt: skip

        def progress(label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update()

        records, worker_info = run_cases(config, progress)

    if worker_info.get("interrupted"):
        print("interrupted: writing the cases measured so far", file=sys.stderr)
    machine.update(worker_info)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    name = "paper" if args.paper else "bench"
    engine = "" if config.engine == "auto" else f", engine={config.engine}"
    title = (f"B={config.batch} H={config.heads} D={config.depth} {config.dtype}"
             f"{' causal' if config.causal else ''}{engine} on {config.device}")  # fmt: skip
    text = report.format_table(records, title)
    payload: dict[str, Any] = {"machine": machine, "config": vars(config), "results": records}
    if args.paper:
        caveat = CAVEAT.format(device=config.device, dtype=config.dtype)
        paper_text = format_paper_tables(records, config.lengths, config.impls)
        text = f"{caveat}\n\n{paper_text}\n\nAll cases:\n{text}"
        payload["paper"] = {"caveat": caveat, "tables": paper_text}
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.txt").write_text(f"$ {machine['command']}\n\n{text}\n")
    report.write_json(args.out / f"{name}.json", payload)
    report.plot_results(args.out / f"{name}.png", records, title)
    print(f"\nwrote {args.out / name}.json, .png, .txt", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``memory-efficient-attention {bench,memory} ...``."""
    args = build_parser().parse_args(argv)
    if args.command == "memory":
        from .memory_demo import run_memory_check

        return run_memory_check(
            n=args.n, heads=args.heads, depth=args.depth, dtype=args.dtype, device=args.device,
            limit_mib=args.limit_mib, timeout_s=args.timeout, dense=not args.no_dense,
            causal=args.causal,
        )  # fmt: skip
    return run_bench(args)
