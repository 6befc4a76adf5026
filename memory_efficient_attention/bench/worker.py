"""The worker subprocess: ``python -m memory_efficient_attention.bench.worker JOB RESULT_PATH``.

A job is either ``memory`` (one implementation, measured once in this fresh process) or ``time``
(several implementations timed round-robin in this process). Torch and JAX are imported here, never
in the parent. The result is written as JSON to ``RESULT_PATH``; a per-implementation failure is
recorded as ``{"error": ...}`` so one broken case does not lose the others.

The seed package 0.1.3 has the same import name as this package, so it is loaded from
``seed_dir`` under a private module name (``_mea_seed``) with its two submodules imported
separately: a torch-only worker never imports jax and vice versa.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .cases import IMPLS, REFERENCE_IMPL, Shape
from .measure import Runner, measure_memory, summarize_times, time_round_robin

_STARTED = time.perf_counter()
WARMUP_N = 64  # length of the tiny warm-up run before a memory measurement
ACCURACY_REFERENCES = (REFERENCE_IMPL, "plain-torch", "xla")  # the first one present is used
SEED_MODULE = "_mea_seed"


def load_seed(seed_dir: str, framework: str) -> types.ModuleType:
    """The seed's ``attention_torch`` or ``attention_jax`` module, loaded from ``seed_dir``."""
    package_dir = Path(seed_dir).expanduser() / "memory_efficient_attention"
    if not (package_dir / "__init__.py").exists():
        raise FileNotFoundError(f"no seed package under {package_dir}")
    if SEED_MODULE not in sys.modules:
        package = types.ModuleType(SEED_MODULE)
        package.__path__ = [str(package_dir)]  # a package whose __init__ is never run
        sys.modules[SEED_MODULE] = package
    submodule = "attention_torch" if framework == "torch" else "attention_jax"
    return importlib.import_module(f"{SEED_MODULE}.{submodule}")


def make_data(shape: Shape, seed: int = 0) -> dict[str, np.ndarray]:
    """q, k, v and the cotangent: standard normal float32 ``[B, n, H, D]``."""
    rng = np.random.default_rng(seed)
    size = (shape.batch, shape.n, shape.heads, shape.depth)
    return {key: rng.standard_normal(size, dtype=np.float32) for key in ("q", "k", "v", "cot")}


def _error(exc: BaseException) -> dict[str, str]:
    lines = traceback.format_exception_only(type(exc), exc)
    return {"error": lines[-1].strip()[:500]}


class _Builders:
    """Imports the frameworks the job needs and builds runners for its implementations."""

    def __init__(self, job: dict[str, Any]):
        self.job = job
        self.info: dict[str, Any] = {}
        frameworks = {IMPLS[name].framework for name in job["impls"]}
        self.modules: dict[str, Any] = {}
        if "torch" in frameworks:
            from . import torch_impls

            self.info.update(torch_impls.setup_torch(job.get("threads")))
            self.modules["torch"] = torch_impls.build_torch
        if "jax" in frameworks:
            from . import jax_impls

            self.info.update(jax_impls.setup_jax(job["shape"]["dtype"]))
            self.modules["jax"] = jax_impls.build_jax

    def build(self, name: str, shape: Shape, mode: str, data: dict[str, np.ndarray]) -> Runner:
        impl = IMPLS[name]
        seed = load_seed(self.job["seed_dir"], impl.framework) if impl.seed else None
        return self.modules[impl.framework](name, shape, mode, self.job["device"], data, seed)


def run_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Measure one implementation's peak memory (see ``measure``)."""
    (name,) = job["impls"]
    shape, mode = Shape(**job["shape"]), job["mode"]
    builders = _Builders(job)
    result: dict[str, Any] = {"info": builders.info}
    try:
        tiny = Shape(**{**job["shape"], "n": min(shape.n, WARMUP_N)})
        builders.build(name, tiny, mode, make_data(tiny)).call()  # thread pools, kernel caches
        runner = builders.build(name, shape, mode, make_data(shape))
        gc.collect()
        memory = measure_memory(runner)
        memory.update(runner.info)
        result["memory"] = {name: memory}
    except Exception as exc:
        result["memory"] = {name: _error(exc)}
    return result


def _max_abs_diff(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(a - b))) for a, b in zip(outputs, reference, strict=True))


def _affordable_repeats(job: dict[str, Any], round_s: float) -> int:
    """``job["repeats"]``, cut down to fit ``time_budget_s`` (not below 3 unless one round alone
    is over the budget) and the time left before the parent's timeout (not below 1)."""
    round_s = max(round_s, 1e-9)
    floor = 3 if round_s <= job["time_budget_s"] else 1
    repeats = min(job["repeats"], max(floor, int(job["time_budget_s"] / round_s)))
    left = 0.8 * job["timeout_s"] - (time.perf_counter() - _STARTED)
    return max(1, min(repeats, int(left / round_s)))


def run_time(job: dict[str, Any]) -> dict[str, Any]:
    """Time several implementations round-robin; check their outputs against the reference."""
    shape, mode = Shape(**job["shape"]), job["mode"]
    builders = _Builders(job)
    data = make_data(shape)
    timing: dict[str, dict[str, Any]] = {}
    runners: dict[str, Runner] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for name in job["impls"]:
        try:
            runner = builders.build(name, shape, mode, data)
            start = time.perf_counter()
            outputs[name] = runner.to_numpy(runner.call())  # warm-up, and the accuracy check
            first_call = time.perf_counter() - start
            timing[name] = {"first_call_s": first_call, **runner.info}
            if first_call > job["max_call_s"]:
                timing[name]["error"] = (
                    f"too slow: one call took {first_call:.1f} s (> {job['max_call_s']:.0f} s)"
                )
                continue
            runners[name] = runner
        except Exception as exc:
            timing[name] = _error(exc)
    reference = next((name for name in ACCURACY_REFERENCES if name in outputs), None)
    for name, out in outputs.items():
        if reference is not None:
            timing[name]["max_abs_diff"] = _max_abs_diff(out, outputs[reference])
            timing[name]["accuracy_reference"] = reference
    outputs.clear()
    gc.collect()
    if runners:
        repeats = _affordable_repeats(job, sum(timing[name]["first_call_s"] for name in runners))
        times = time_round_robin(runners, repeats)
        for name, samples in times.items():
            timing[name].update(summarize_times(samples))
        if REFERENCE_IMPL in times:
            ref = timing[REFERENCE_IMPL]["median_s"]
            for name in times:
                timing[name]["ratio_to_" + REFERENCE_IMPL] = timing[name]["median_s"] / ref
    return {"info": builders.info, "time": timing}


def _pin_threads(threads: int | None) -> None:
    if threads and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        os.sched_setaffinity(0, cpus)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the subprocess: run the job, write the result JSON, exit 0."""
    job_json, result_path = argv if argv is not None else sys.argv[1:]
    job = json.loads(job_json)
    _pin_threads(job.get("threads"))
    warnings.simplefilter("ignore")  # the seed's checkpoint warnings would flood stderr
    result = run_memory(job) if job["kind"] == "memory" else run_time(job)
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
