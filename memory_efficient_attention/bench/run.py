"""The parent side: plan the worker jobs, run them in subprocesses, collect one result per case.

``timeout_s`` is per case: a memory subprocess gets it, a timing subprocess gets it times the
number of implementations it times; an implementation whose first (warm-up) call takes over a
third of it is left out of the timing as too slow, and the rounds are cut to fit.

Memory is measured in one fresh subprocess per (implementation, n, mode); time in one subprocess
per (n, mode) holding every implementation, timed round-robin so the ratio to torch SDPA compares
calls made side by side. Timing jobs run one at a time, after the memory jobs (which may run
``--jobs`` at a time: they do not disturb each other's measurement, only each other's speed).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cases import IMPLS, Case, Shape, skip_reason

__all__ = ["BenchConfig", "run_cases", "seed_available", "seed_install_command"]

SEED_VERSION = "0.1.3"
DEFAULT_SEED_DIR = f"~/.cache/memory-efficient-attention/seed-{SEED_VERSION}"


@dataclass
class BenchConfig:
    """Everything a benchmark run needs; built by ``cli`` from the command line."""

    lengths: list[int]
    impls: list[str]
    modes: list[str]
    batch: int = 1
    heads: int = 8
    depth: int = 64
    dtype: str = "float32"
    causal: bool = False
    engine: str = "auto"
    repeats: int = 5
    device: str = "cpu"
    threads: int | None = None
    max_dense_bytes: int = 4 * 2**30
    timeout_s: float = 300.0
    time_budget_s: float = 15.0
    seed_dir: str = DEFAULT_SEED_DIR
    jobs: int = 1
    measure_time: bool = True
    measure_memory: bool = True

    def shape(self, n: int) -> Shape:
        return Shape(n, self.batch, self.heads, self.depth, self.dtype, self.causal, self.engine)


def seed_install_command(seed_dir: str) -> list[str]:
    """The pip command that installs the seed package into its own folder."""
    return [
        sys.executable, "-m", "pip", "install", "--no-deps", "--target",
        str(Path(seed_dir).expanduser()), f"memory-efficient-attention=={SEED_VERSION}",
    ]  # fmt: skip


def seed_available(seed_dir: str) -> bool:
    return (Path(seed_dir).expanduser() / "memory_efficient_attention" / "__init__.py").exists()


def _worker_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def run_worker(job: dict[str, Any], timeout_s: float, threads: int | None) -> dict[str, Any]:
    """Run one job in a fresh subprocess; a crash or timeout becomes ``{"failure": reason}``."""
    with tempfile.TemporaryDirectory(prefix="mea-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "memory_efficient_attention.bench.worker"]
        try:
            proc = subprocess.run(
                [*command, json.dumps(job), str(result_path)],
                env=_worker_env(threads),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return {"failure": f"timeout: no result within {timeout_s:.0f} s"}
        if proc.returncode != 0 or not result_path.exists():
            lines = proc.stderr.strip().splitlines()
            why = lines[-1] if lines else ""
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode} (out of memory?) {why}"
            return {"failure": f"worker exited with code {proc.returncode}: {why}"[:500]}
        return json.loads(result_path.read_text())


def _base_job(config: BenchConfig, shape: Shape, mode: str) -> dict[str, Any]:
    return {
        "shape": shape.to_dict(),
        "mode": mode,
        "device": config.device,
        "threads": config.threads,
        "seed_dir": config.seed_dir,
    }


def plan_cases(config: BenchConfig) -> list[tuple[Case, str | None]]:
    """Every case with the reason it is skipped (None when it runs)."""
    has_seed = seed_available(config.seed_dir)
    command = shlex.join(seed_install_command(config.seed_dir)).replace(sys.executable, "python")
    hint = f"install: {command} (or --install-seed)"
    planned = []
    for n in config.lengths:
        for mode in config.modes:
            for name in config.impls:
                case = Case(name, config.shape(n), mode)
                why = skip_reason(
                    case,
                    max_dense_bytes=config.max_dense_bytes,
                    seed_available=has_seed,
                    install_hint=hint,
                )
                planned.append((case, why))
    return planned


def run_cases(
    config: BenchConfig, progress: Callable[[str], None] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the benchmark; return one record per case and what the workers said about themselves.

    ``progress(label)`` is called after each worker job (for the progress bar).
    """
    planned = plan_cases(config)
    records: dict[tuple[str, int, str], dict[str, Any]] = {}
    for case, why in planned:
        records[(case.impl, case.shape.n, case.mode)] = {
            "impl": case.impl,
            "framework": IMPLS[case.impl].framework,
            "n": case.shape.n,
            "mode": case.mode,
            "io_bytes": case.io_bytes(),
            "status": "skipped" if why else "ran",
            "reason": why,
            "time": None,
            "memory": None,
        }
    runnable = [case for case, why in planned if why is None]
    info: dict[str, Any] = {}
    tick = progress or (lambda label: None)

    def memory_job(case: Case) -> None:
        job = {**_base_job(config, case.shape, case.mode), "kind": "memory", "impls": [case.impl]}
        result = run_worker(job, config.timeout_s, config.threads)
        record = records[(case.impl, case.shape.n, case.mode)]
        failure = {"error": result.get("failure")}
        record["memory"] = result.get("memory", {}).get(case.impl) or failure
        info.update(result.get("info", {}))
        tick(f"memory {case.impl} n={case.shape.n} {case.mode}")

    try:
        _run_phases(config, runnable, records, info, memory_job, tick)
    except KeyboardInterrupt:  # Ctrl-C: keep what was measured; the rest stays empty
        info["interrupted"] = True
    return list(records.values()), info


def _run_phases(
    config: BenchConfig,
    runnable: list[Case],
    records: dict[tuple[str, int, str], dict[str, Any]],
    info: dict[str, Any],
    memory_job: Callable[[Case], None],
    tick: Callable[[str], None],
) -> None:
    """The memory subprocesses (``config.jobs`` at a time), then the timing ones, one by one."""
    if config.measure_memory:
        pool = ThreadPoolExecutor(max_workers=max(1, config.jobs))
        try:
            for future in [pool.submit(memory_job, case) for case in runnable]:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    if config.measure_time:  # small n first, so an interrupted run keeps the most cases
        for n in config.lengths:
            for mode in config.modes:
                names = [c.impl for c in runnable if c.shape.n == n and c.mode == mode]
                if not names:
                    continue
                job = {
                    **_base_job(config, config.shape(n), mode),
                    "kind": "time",
                    "impls": names,
                    "repeats": config.repeats,
                    "time_budget_s": config.time_budget_s,
                    "timeout_s": config.timeout_s * len(names),
                    "max_call_s": config.timeout_s / 3,
                }
                result = run_worker(job, job["timeout_s"], config.threads)
                info.update(result.get("info", {}))
                for name in names:
                    timing = result.get("time", {}).get(name) or {"error": result.get("failure")}
                    records[(name, n, mode)]["time"] = timing
                tick(f"time n={n} {mode}")


def count_jobs(config: BenchConfig) -> int:
    """How many worker subprocesses ``run_cases`` will start (the progress bar's total)."""
    runnable = [case for case, why in plan_cases(config) if why is None]
    total = len(runnable) if config.measure_memory else 0
    if config.measure_time:
        total += len({(case.shape.n, case.mode) for case in runnable})
    return total
