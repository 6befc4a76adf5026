"""Results out: the machine's description, the terminal table, the JSON file and the PNG plot."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from .cases import IMPLS, MODE_LABELS, REFERENCE_IMPL, format_bytes

__all__ = [
    "SCHEMA",
    "describe_machine",
    "format_seconds",
    "format_table",
    "plot_results",
    "write_json",
]

SCHEMA = "memory-efficient-attention-bench/1"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def command_line() -> str:
    """The command as typed: ``python -m memory_efficient_attention bench ...`` under ``-m``."""
    program = Path(sys.argv[0]).name
    if program == "__main__.py":
        program = "python -m " + Path(sys.argv[0]).resolve().parent.name
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def describe_machine(device: str) -> dict[str, Any]:
    """CPU, cores, memory, load, library versions, device, date and the exact command line.

    Reads versions from package metadata, so it imports neither torch nor jax.
    """
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_total_bytes": _memory_total(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name) for name in ("memory-efficient-attention", "torch", "jax", "jaxlib", "numpy")
        },
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "argv": list(sys.argv),
    }


def format_seconds(seconds: float | None) -> str:
    """``0.0123 -> '12.3 ms'``; ``None -> '-'``."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            return f"{seconds / scale:.3g} {unit}"
    raise AssertionError("unreachable")


def _note(record: dict[str, Any]) -> str:
    if record["status"] == "skipped":
        return record["reason"] or ""
    errors = {part: (record.get(part) or {}).get("error") for part in ("time", "memory")}
    if errors["time"] and errors["time"] == errors["memory"]:
        return errors["time"]
    parts = [f"{part}: {error}" for part, error in errors.items() if error]
    engine = (record.get("time") or {}).get("engine")
    return "; ".join(([f"engine: {engine}"] if engine else []) + parts)


def _spread(timing: dict[str, Any]) -> str:
    """Half the interquartile range relative to the median: ``±3%`` (``-`` below 2 repeats)."""
    if timing.get("repeats", 0) < 2 or not timing.get("median_s"):
        return "-"
    return f"±{50 * (timing['q3_s'] - timing['q1_s']) / timing['median_s']:.0f}%"


FOOTNOTE_MIN_CHARS = 40
"""A note at least this long that more than one row shares is printed once, under the tables."""


def footnotes(records: list[dict[str, Any]]) -> dict[str, int]:
    """The notes printed once under the tables (long ones shared by rows), numbered from 1."""
    counts: dict[str, int] = {}
    for record in records:
        note = _note(record)
        counts[note] = counts.get(note, 0) + 1
    shared = [note for note, count in counts.items() if count > 1 and len(note) >= FOOTNOTE_MIN_CHARS]
    return {note: number for number, note in enumerate(shared, 1)}


def _short_note(note: str, number: int) -> str:
    """A row's stand-in for footnote ``number``: the note's head (``not available``) and ``[1]``."""
    head = note.split(":", 1)[0] if ":" in note else ""
    return f"{head} [{number}]" if 0 < len(head) <= 24 else f"[{number}]"


def table_rows(records: list[dict[str, Any]], notes: dict[str, int] | None = None) -> list[list[str]]:
    """The table's cells, one row per case (strings), in the records' order; a note in ``notes``
    (see ``footnotes``) is replaced by its number."""
    notes = notes or {}
    rows = []
    ratio_key, diff_key = "ratio_to_" + REFERENCE_IMPL, "max_abs_diff"
    for record in records:
        timing, memory = record.get("time") or {}, record.get("memory") or {}
        ratio = timing.get(ratio_key)
        diff = timing.get(diff_key)
        rows.append([
            str(record["n"]),
            record["impl"],
            format_seconds(timing.get("median_s")),
            _spread(timing),
            "-" if ratio is None else f"{ratio:.2f}",
            format_bytes(memory.get("peak_added_bytes")),
            format_bytes(memory.get("overhead_bytes")),
            "-" if diff is None else f"{diff:.1e}",
            _short_note(note, notes[note]) if (note := _note(record)) in notes else note,
        ])  # fmt: skip
    return rows


HEADER = ["n", "impl", "time", "spread", f"x {REFERENCE_IMPL}", "peak added", "overhead", "max|diff|", "note"]


def format_table(records: list[dict[str, Any]], title: str = "") -> str:
    """A plain-text table per mode: median time, its spread, ratio to SDPA, memory, accuracy.

    A long note that several rows share (the seed is not installed, the same failure) is printed
    once, numbered, under the tables; those rows say only its number."""
    notes = footnotes(records)
    blocks = []
    for mode in dict.fromkeys(record["mode"] for record in records):
        rows = table_rows([r for r in records if r["mode"] == mode], notes)
        widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER) - 1)]
        lines = [f"{MODE_LABELS.get(mode, mode)}{' - ' + title if title else ''}"]
        for row in [HEADER, *rows]:
            cells = [
                cell.rjust(w) if i in (0, 2, 3, 4, 5, 6, 7) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=False))
            ]
            lines.append("  ".join([*cells, row[-1]]).rstrip())
        blocks.append("\n".join(lines))
    if notes:
        blocks.append("\n".join(f"[{number}] {note}" for note, number in notes.items()))
    return "\n\n".join([*blocks, LEGEND])


LEGEND = (
    f"time: median over rounds timed round-robin in one process; spread: half the interquartile\n"
    f"range; x {REFERENCE_IMPL}: time / {REFERENCE_IMPL}'s time in the same rounds; peak added: "
    "peak RSS minus the baseline\n(after imports, inputs and warm-up) in a fresh process; overhead: "
    "peak added minus the outputs;\nmax|diff|: largest absolute difference of the outputs "
    f"(forward) or gradients to {REFERENCE_IMPL}\n(else plain-torch, else xla)."
)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the full results (``payload`` plus the schema tag), indented."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, **payload}, indent=2) + "\n")


def plot_results(path: Path, records: list[dict[str, Any]], title: str = "") -> None:
    """Time and peak added memory against n (log-log): a column per mode, a line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(record["mode"] for record in records))
    impls = list(dict.fromkeys(record["impl"] for record in records))
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        for row, (part, key, scale, label) in enumerate([
            ("time", "median_s", 1e3, "median time [ms]"),
            ("memory", "peak_added_bytes", 2.0**-20, "peak memory added [MiB]"),
        ]):  # fmt: skip
            ax = axes[row][col]
            for impl in impls:
                points = sorted(
                    (r["n"], r[part][key] * scale)
                    for r in records
                    if r["impl"] == impl and r["mode"] == mode
                    and (r.get(part) or {}).get(key) is not None and r[part][key] > 0
                )  # fmt: skip
                if points:
                    xs, ys = zip(*points, strict=True)
                    color = f"C{list(IMPLS).index(impl) % 10}" if impl in IMPLS else None
                    ax.plot(xs, ys, marker="o", label=impl, color=color)  # same color everywhere
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n")
            ax.set_ylabel(label)
            ax.set_title(MODE_LABELS.get(mode, mode))
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_lines():  # nothing measured (all skipped, --no-time): no empty legend
                ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
