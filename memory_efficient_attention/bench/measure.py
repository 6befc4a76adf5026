"""Measurements taken inside the worker subprocess: process memory, allocator peaks, timing.

Framework-free: the framework-specific parts come in through a ``Runner`` built by
``torch_impls`` or ``jax_impls``.

Memory: the worker is a fresh process per case. After imports, input creation, compilation and a
tiny warm-up (thread pools, kernel caches), it records its resident set (``VmRSS``), resets the
kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), runs the case once and reads
``VmHWM``: *peak added* = HWM - baseline. Where the high-water mark cannot be reset it falls back to
``getrusage(RUSAGE_SELF).ru_maxrss`` (then the baseline is the larger of RSS and the peak so far, so
a temporary peak during setup can hide a smaller one during the run; the method is recorded).

Time: ``time_round_robin`` calls every runner once per round, in an order rotated each round
(A B C, B C A, ...), so slow drifts of a shared machine hit all implementations alike; the median
over rounds is reported.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Runner", "measure_memory", "summarize_times", "time_round_robin"]


@dataclass
class Runner:
    """One implementation, ready to run on prepared inputs.

    ``call()`` runs once and returns only after the device has finished (synchronised);
    it returns the outputs (``out``, or ``(dq, dk, dv)``). ``to_numpy(outputs)`` gives them as
    float32 NumPy arrays in the ``[B, n, H, D]`` layout for comparison; ``nbytes(outputs)`` their
    size. ``allocator_reset``/``allocator_peak`` read the framework's own peak where it has one
    (CUDA, or a JAX device with ``memory_stats()``). ``info`` holds extras (compile time, XLA's
    planned temporary buffer size).
    """

    call: Callable[[], Any]
    to_numpy: Callable[[Any], list[Any]]
    nbytes: Callable[[Any], int]
    allocator_reset: Callable[[], None] | None = None
    allocator_peak: Callable[[], int | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def current_rss() -> int | None:
    """Resident set size of this process in bytes (None where /proc is missing)."""
    rss = _status_kib("VmRSS")
    return None if rss is None else rss * 1024


def measure_memory(runner: Runner) -> dict[str, Any]:
    """Run ``runner`` once and return its memory figures in bytes (see the module docstring)."""
    baseline = current_rss()
    if _reset_hwm() and baseline is not None:
        method = "VmHWM after clear_refs"
    else:
        method = "ru_maxrss"
        baseline = max(baseline or 0, _maxrss_bytes())
    if runner.allocator_reset is not None:
        runner.allocator_reset()
    outputs = runner.call()
    peak = _status_kib("VmHWM") * 1024 if method.startswith("VmHWM") else _maxrss_bytes()
    output_bytes = runner.nbytes(outputs)
    allocator_peak = runner.allocator_peak() if runner.allocator_peak is not None else None
    return {
        "method": method,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_added_bytes": peak - baseline,
        "output_bytes": output_bytes,
        "overhead_bytes": peak - baseline - output_bytes,
        "allocator_peak_added_bytes": allocator_peak,
    }


# A pause before each timed call. XLA's CPU worker threads keep spinning for a while after a call;
# a torch call right behind a JAX one then shares its cores with them (measured at n = 4096,
# forward: ours-torch 1.27-1.36x SDPA when it followed xla in every round, 1.06x with torch alone).
_SETTLE_S = 0.2


def time_round_robin(
    runners: dict[str, Runner], repeats: int, *, on_round: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Seconds per call for each runner, ``repeats`` rounds, order rotated every round."""
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            time.sleep(_SETTLE_S)  # untimed: let the previous call's worker threads park
            start = time.perf_counter()
            runners[name].call()
            times[name].append(time.perf_counter() - start)
        if on_round is not None:
            on_round()
    return times


def summarize_times(times: list[float]) -> dict[str, Any]:
    """Median, min, max and quartiles (seconds) of one implementation's calls."""
    ordered = sorted(times)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {
        "median_s": statistics.median(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "q1_s": quartiles[0],
        "q3_s": quartiles[2],
        "repeats": len(ordered),
        "times_s": times,
    }
