"""Tests of the benchmark command: the pure parts, and one end-to-end run on a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memory_efficient_attention.bench import cli, paper, report
from memory_efficient_attention.bench.cases import (
    IMPLS,
    Case,
    Shape,
    dense_bytes,
    format_bytes,
    select_impls,
    skip_reason,
)

ROOT = Path(__file__).resolve().parents[1]


def _args(*argv: str):
    return cli.build_parser().parse_args(["bench", *argv])


def test_importing_the_bench_imports_no_framework():
    code = (
        "import sys, memory_efficient_attention.bench.cli, memory_efficient_attention.bench.run, "
        "memory_efficient_attention.bench.report, memory_efficient_attention.bench.paper, "
        "memory_efficient_attention.bench.memory_demo, memory_efficient_attention.__main__; "
        "print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_parse_lengths_accepts_powers_and_sorts():
    assert cli.parse_lengths("4096, 2^10,1024,2**8") == [256, 1024, 4096]
    with pytest.raises(Exception, match="not a length"):
        cli.parse_lengths("abc")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4GiB", 4 * 2**30), ("512MB", 512 * 10**6), ("1.5G", int(1.5 * 2**30)), ("100", 100)],
)
def test_parse_size(text, expected):
    assert cli.parse_size(text) == expected


def test_default_config():
    config = cli.config_from_args(_args("--device", "cpu"))
    assert config.lengths == cli.parse_lengths(cli.DEFAULT_LENGTHS)
    assert config.heads == 8 and config.depth == 64 and config.batch == 1
    assert config.dtype == "float32" and config.modes == ["forward", "backward"]
    assert config.impls == list(IMPLS)
    assert config.max_dense_bytes == 4 * 2**30


def test_paper_config_and_overrides():
    config = cli.config_from_args(_args("--paper", "--device", "cpu"))
    assert config.heads == 1 and config.lengths == [256, 1024, 4096, 16384, 65536]
    assert config.impls == paper.PAPER_IMPLS
    long = cli.config_from_args(_args("--paper", "--long", "--frameworks", "torch"))
    assert long.lengths[-1] == 2**18 and long.impls == ["ours-torch", "plain-torch"]
    custom = cli.config_from_args(_args("--impls", "sdpa,ours-jax", "--heads", "2", "--causal"))
    assert custom.impls == ["ours-jax", "sdpa"] and custom.heads == 2 and custom.causal


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        _args("--impls", "flash")
    with pytest.raises(SystemExit):
        _args("--modes", "sideways")
    with pytest.raises(ValueError, match="unknown implementation"):
        select_impls(["torch"], ["nope"])


def test_dense_estimate_and_skip():
    shape = Shape(n=16384, heads=8)
    assert dense_bytes(shape, "forward") == 8 * 16384**2 * 4 == 8 * 2**30
    assert dense_bytes(shape, "backward") == 3 * 8 * 2**30
    why = skip_reason(Case("plain-torch", shape, "forward"), max_dense_bytes=4 * 2**30,
                      seed_available=True)  # fmt: skip
    assert why is not None and "would need 8 GiB" in why
    assert skip_reason(Case("ours-torch", shape, "forward"), max_dense_bytes=0,
                       seed_available=True) is None  # fmt: skip
    small = Shape(n=1024, heads=1)
    assert skip_reason(Case("xla", small, "backward"), max_dense_bytes=2**30,
                       seed_available=True) is None  # fmt: skip


def test_seed_is_only_given_inputs_it_handles():
    def why(n, causal=False, available=True):
        case = Case("seed-torch", Shape(n=n, causal=causal), "forward")
        return skip_reason(case, max_dense_bytes=2**40, seed_available=available, install_hint="x")

    assert why(1024) is None
    assert "not supported" in why(1000)
    assert "not supported" in why(1024, causal=True)
    assert why(1024, available=False).startswith("not available")


def test_format_bytes_and_seconds():
    assert format_bytes(None) == "-"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30) == "3 GiB"
    assert format_bytes(-2 * 2**20) == "-2 MiB"
    assert report.format_seconds(0.0123) == "12.3 ms"
    assert report.format_seconds(2.5) == "2.5 s"
    assert report.format_seconds(5e-6) == "5 µs"


def _record(impl, n, mode, median=None, peak=None, status="ran", reason=None, error=None):
    timing = None if median is None else {"median_s": median, "ratio_to_sdpa": median / 0.01}
    memory = None if peak is None else {"peak_added_bytes": peak, "overhead_bytes": peak // 2}
    if error:
        timing = memory = {"error": error}
    return {"impl": impl, "framework": IMPLS[impl].framework, "n": n, "mode": mode,
            "io_bytes": 4096, "status": status, "reason": reason, "time": timing,
            "memory": memory}  # fmt: skip


RECORDS = [
    _record("sdpa", 1024, "forward", 0.01, 2**20),
    _record("ours-torch", 1024, "forward", 0.02, 3 * 2**20),
    _record("plain-torch", 1024, "forward", status="skipped", reason="would need 9 GiB"),
    _record("ours-jax", 1024, "forward", error="ImportError: missing"),
    _record("sdpa", 1024, "backward", 0.03, 2**21),
]


def test_table_formatting():
    text = report.format_table(RECORDS, "B=1")
    assert text.count("forward (inference) - B=1") == 1 and "forward + backward" in text
    line = next(row for row in text.splitlines() if "ours-torch" in row)
    assert "20 ms" in line and "2.00" in line and "3 MiB" in line
    assert "would need 9 GiB" in text
    assert text.count("ImportError: missing") == 1  # same error for time and memory: said once


def test_paper_tables_put_ours_next_to_the_paper():
    records = [
        _record("ours-torch", 2**14, "forward", 0.5, 20 * 2**20),
        _record("plain-torch", 2**14, "forward", 0.4, 2**30),
        _record("plain-torch", 2**16, "forward", status="skipped", reason="would need 16 GiB"),
    ]
    text = paper.format_paper_tables(records, [2**14, 2**16], ["ours-torch", "plain-torch"])
    assert "memory-efficient overhead (paper)" in text and "17MB" in text and "OOM" in text
    assert "too big" in text and "-20%" in text  # 0.4 / 0.5 - 1


def test_json_schema(tmp_path):
    machine = report.describe_machine("cpu")
    for key in ("cpu_model", "cpu_count", "memory_total_bytes", "versions", "date", "command"):
        assert key in machine
    report.write_json(tmp_path / "b.json", {"machine": machine, "results": RECORDS})
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["schema"] == report.SCHEMA
    assert {r["impl"] for r in data["results"]} == {"sdpa", "ours-torch", "plain-torch", "ours-jax"}


def test_cli_end_to_end_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("psutil")
    pytest.importorskip("tqdm")
    impls = ["ours-torch", "sdpa", "plain-torch"]
    command = [
        sys.executable, "-m", "memory_efficient_attention", "bench", "--lengths", "64",
        "--repeats", "1", "--frameworks", "torch", "--impls", ",".join(impls), "--modes", "forward",
        "--device", "cpu", "--out", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["schema"] == report.SCHEMA
    assert data["machine"]["versions"]["torch"]
    assert [r["impl"] for r in data["results"]] == impls
    for record in data["results"]:
        assert record["time"]["median_s"] > 0, record
        assert "peak_added_bytes" in record["memory"], record
    assert (tmp_path / "bench.png").stat().st_size > 1000
    for impl in impls:
        assert impl in proc.stdout


def _options(parser):
    """Every (subcommand, action) of ``parser`` and its subparsers, but ``-h``."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {where}".strip(), a) for where, a in _options(sub))
        elif not isinstance(action, argparse._HelpAction):
            yield "", action


def test_every_option_has_help():
    import argparse

    options = list(_options(cli.build_parser()))
    flags = {flag for _, action in options for flag in action.option_strings}
    assert {"--frameworks", "--modes", "--no-time", "--no-memory", "--seed-dir", "--limit-mib"} <= flags
    missing = [
        f"{where} {'/'.join(action.option_strings) or action.dest}"
        for where, action in options
        if action.option_strings and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert not missing, f"options without help: {missing}"


def _seed_records(tmp_path, lengths=(512, 1024), modes=("forward", "backward")):
    """Records of a run with the seed missing from ``--seed-dir`` (nothing measured)."""
    from memory_efficient_attention.bench.run import BenchConfig, run_cases

    config = BenchConfig(lengths=list(lengths), impls=["ours-torch", "seed-torch", "seed-jax"],
                         modes=list(modes), seed_dir=str(tmp_path / "no-seed"),
                         measure_time=False, measure_memory=False)  # fmt: skip
    records, _ = run_cases(config)
    return records


def test_missing_seed_is_said_once_under_the_table(tmp_path):
    records = _seed_records(tmp_path)
    reasons = {r["reason"] for r in records if r["impl"].startswith("seed")}
    assert len(reasons) == 1  # one note, in every seed row of the JSON
    reason = reasons.pop()
    assert reason.startswith("not available") and "--install-seed" in reason and len(reason) > 100
    text = report.format_table(records, "B=1")
    lines = text.splitlines()
    assert text.count(reason) == 1
    note_line = lines.index(f"[1] {reason}")
    rows = [i for i, line in enumerate(lines) if "seed-" in line and "[1]" not in line[:4]]
    assert len(rows) == 8 and max(rows) < note_line  # 2 lengths x 2 modes x 2 seed impls, above
    for i in rows:
        assert lines[i].endswith("not available [1]"), lines[i]
    assert all(len(line) < 120 for line in lines if line not in (f"[1] {reason}",))


def test_only_long_shared_notes_become_footnotes():
    long_error = "RuntimeError: " + "x" * 60
    records = [
        _record("sdpa", 512, "forward", error="ImportError: missing"),
        _record("ours-torch", 512, "forward", error="ImportError: missing"),  # short: stays inline
        _record("xla", 512, "forward", status="skipped", reason="would need " + "9" * 40),  # once
        _record("plain-torch", 512, "forward", error=long_error),
        _record("ours-jax", 512, "backward", error=long_error),
    ]
    assert report.footnotes(records) == {long_error: 1}
    text = report.format_table(records)
    assert text.count("ImportError: missing") == 2 and text.count("9" * 40) == 1
    assert text.count(long_error) == 1 and text.count("RuntimeError [1]") == 2


def test_install_seed_failure_does_not_stop_the_benchmark(tmp_path, monkeypatch, capsys):
    seed_dir = str(tmp_path / "seed")
    monkeypatch.setattr(cli, "seed_install_command", lambda d: [sys.executable, "-c", "exit(1)"])
    assert cli._install_seed(seed_dir) is False  # pip failed (offline): a warning, no exception
    monkeypatch.setattr(cli, "seed_install_command", lambda d: [str(tmp_path / "no-such-pip")])
    assert cli._install_seed(seed_dir) is False
    assert capsys.readouterr().err.count("could not install the seed") == 2
    package = tmp_path / "seed" / "memory_efficient_attention"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(cli, "seed_install_command", lambda d: pytest.fail("installed again"))
    assert cli._install_seed(seed_dir) is True


def test_cli_without_seed_prints_its_note_once(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    command = [
        sys.executable, "-m", "memory_efficient_attention", "bench", "--no-time", "--no-memory",
        "--frameworks", "torch", "--impls", "ours-torch,seed-torch", "--device", "cpu",
        "--seed-dir", str(tmp_path / "no-seed"), "--out", str(tmp_path / "out"), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    hint = [i for i, line in enumerate(lines) if "memory-efficient-attention==0.1.3" in line]
    seed_rows = [i for i, line in enumerate(lines) if "seed-torch" in line]
    assert len(hint) == 1 and len(seed_rows) == 6 and max(seed_rows) < hint[0], proc.stdout
    assert (tmp_path / "out" / "bench.txt").read_text().count("memory-efficient-attention==0.1.3") == 1


@pytest.mark.parametrize("engine", ["auto", "chunked", "fused"])
def test_engine_option_is_passed_and_recorded_per_row(tmp_path, engine):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    command = [
        sys.executable, "-m", "memory_efficient_attention", "bench", "--lengths", "64",
        "--repeats", "1", "--impls", "ours-torch,ours-jax", "--modes", "forward", "--device", "cpu",
        "--out", str(tmp_path), "--no-progress", "--no-memory", "--engine", engine,
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["impl"]: r for r in data["results"]}
    want = "chunked (not fused: engine='chunked' was asked for)" if engine == "chunked" else "fused"
    assert rows["ours-torch"]["time"]["engine"] == want
    if engine == "fused":
        assert rows["ours-jax"]["status"] == "skipped" and "no fused engine" in rows["ours-jax"]["reason"]
    else:
        assert rows["ours-jax"]["time"]["engine"] == "chunked"
    assert f"engine: {want}" in proc.stdout
