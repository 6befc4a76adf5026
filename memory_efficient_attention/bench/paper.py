"""``--paper``: the setup and the numbers of Rabe & Staats (arXiv 2112.05682), tables 1 and 2.

The paper measured one TPUv3 chip, one head, depth 64, bf16 q/k/v with a float32 output;
"overhead" is peak memory minus the size of inputs and outputs and "standard" is Flax attention.
We rerun the same shapes with this package's kernels (``ours-*``) against dense attention
(``plain-torch``, ``xla``) on this machine and print the two side by side.
"""

from __future__ import annotations

from typing import Any

from .cases import MODE_LABELS, format_bytes
from .report import format_seconds

__all__ = ["CAVEAT", "PAPER", "PAPER_IMPLS", "format_paper_tables", "paper_lengths"]

PAPER_IMPLS = ["ours-torch", "ours-jax", "plain-torch", "xla"]
OURS_VS_STANDARD = {"ours-torch": "plain-torch", "ours-jax": "xla"}

CAVEAT = (
    "Paper: one TPUv3 chip, bf16 inputs, float32 output, Flax attention as the standard. "
    "Here: {device}, {dtype} (--dtype), the dense standard is plain-torch / xla. Absolute times "
    "are not comparable; the shape of the memory curves is."
)

_COLUMNS = [8, 10, 12, 14, 16, 18, 20]  # log2(n) of the paper's columns
# Rows of the paper's tables, as printed there (OOM = over 16 GB).
PAPER: dict[str, dict[str, list[str]]] = {
    "forward": {
        "inputs + outputs": ["160KB", "640KB", "2.5MB", "10MB", "40MB", "160MB", "640MB"],
        "standard overhead": ["270KB", "4.0MB", "64MB", "1GB", "OOM", "OOM", "OOM"],
        "memory-efficient overhead": ["270KB", "4.0MB", "16MB", "17MB", "21MB", "64MB", "256MB"],
        "time": ["0.06ms", "0.11ms", "0.7ms", "11.3ms", "177ms", "2.82s", "45.2s"],
        "relative speed vs standard": ["±5%", "±5%", "-8±2%", "-13±2%", "-", "-", "-"],
    },
    "backward": {
        "inputs + outputs": ["192KB", "768KB", "2.9MB", "12MB", "47MB", "188MB", "750MB"],
        "standard overhead": ["532KB", "8.0MB", "128MB", "2.0GB", "OOM", "OOM", "OOM"],
        "memory-efficient overhead": ["532KB", "8.0MB", "41MB", "64MB", "257MB", "1.0GB", "4.0GB"],
        "time": ["0.1ms", "0.18ms", "1.4ms", "21ms", "336ms", "5.3s", "85s"],
        "relative speed vs standard": ["±5%", "±5%", "-30±5%", "-35±5%", "-", "-", "-"],
    },
}


def paper_lengths(long: bool) -> list[int]:
    """The paper's columns we run: 2^8 .. 2^16, or up to 2^18 with ``--long``."""
    return [2**e for e in _COLUMNS if e <= (18 if long else 16)]


def _paper_cell(mode: str, row: str, n: int) -> str:
    exponent = n.bit_length() - 1
    if n != 2**exponent or exponent not in _COLUMNS:
        return ""
    return PAPER[mode][row][_COLUMNS.index(exponent)]


def _paper_row(mode: str, row: str, lengths: list[int], label: str = "") -> list[str]:
    return [f"{label or row} (paper)", *[_paper_cell(mode, row, n) for n in lengths]]


def _cell(record: dict[str, Any] | None, part: str, key: str) -> str:
    if record is None:
        return ""
    if record["status"] == "skipped":
        return "skip" if not record["reason"].startswith("would need") else "too big"
    entry = record.get(part) or {}
    if entry.get("error"):
        return "error" if not entry["error"].startswith("timeout") else "timeout"
    value = entry.get(key)
    if value is None:
        return "-"
    return format_seconds(value) if part == "time" else format_bytes(value)


def _relative(ours: dict[str, Any] | None, standard: dict[str, Any] | None) -> str:
    try:
        t_ours, t_std = ours["time"]["median_s"], standard["time"]["median_s"]
    except (KeyError, TypeError):
        return "-"
    return f"{100 * (t_std / t_ours - 1):+.0f}%"


def format_paper_tables(records: list[dict[str, Any]], lengths: list[int], impls: list[str]) -> str:
    """The paper's two tables, each paper row followed by ours measured here."""
    blocks = []
    for mode in dict.fromkeys(record["mode"] for record in records):
        find = {(r["impl"], r["n"]): r for r in records if r["mode"] == mode}
        rows: list[list[str]] = [["n", *[f"2^{n.bit_length() - 1}" for n in lengths]]]

        rows.append(_paper_row(mode, "inputs + outputs", lengths))
        io_by_n = {r["n"]: r["io_bytes"] for r in records if r["mode"] == mode}
        rows.append(["inputs + outputs (here)", *[format_bytes(io_by_n.get(n)) for n in lengths]])
        rows.append(_paper_row(mode, "standard overhead", lengths))
        for impl in [i for i in impls if i not in OURS_VS_STANDARD]:
            cells = [_cell(find.get((impl, n)), "memory", "overhead_bytes") for n in lengths]
            rows.append([f"  {impl} overhead", *cells])
        rows.append(_paper_row(mode, "memory-efficient overhead", lengths))
        for impl in [i for i in impls if i in OURS_VS_STANDARD]:
            cells = [_cell(find.get((impl, n)), "memory", "overhead_bytes") for n in lengths]
            rows.append([f"  {impl} overhead", *cells])
        rows.append(_paper_row(mode, "time", lengths, "time (TPUv3)"))
        for impl in impls:
            cells = [_cell(find.get((impl, n)), "time", "median_s") for n in lengths]
            rows.append([f"  {impl} time", *cells])
        rows.append(_paper_row(mode, "relative speed vs standard", lengths))
        for ours, standard in OURS_VS_STANDARD.items():
            if ours in impls and standard in impls:
                cells = [_relative(find.get((ours, n)), find.get((standard, n))) for n in lengths]
                rows.append([f"  {ours} vs {standard}", *cells])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [MODE_LABELS.get(mode, mode)]
        for row in rows:
            lines.append("  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip())  # fmt: skip
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
