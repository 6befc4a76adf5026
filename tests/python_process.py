"""Run a snippet in a fresh interpreter with this checkout first on ``PYTHONPATH`` (import
laziness, missing frameworks: what one process cannot undo once it has imported something)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def jax_results(script: str) -> dict:
    """Run a script on simulated JAX CPU devices (it sets ``jax_num_cpu_devices`` itself) and
    return the JSON it printed after ``RESULTS ``."""
    import json

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULTS "))
