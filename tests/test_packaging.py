"""Packaging: type information, extras, and the message a missing framework gives.

Nothing here imports torch or jax in this process (the subprocess tests import them on purpose).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import tomllib

from .python_process import run_python

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_ships_py_typed():
    assert resources.files("memory_efficient_attention").joinpath("py.typed").is_file()
    data = _pyproject()["tool"]["setuptools"]["package-data"]["memory_efficient_attention"]
    assert "py.typed" in data


def test_all_extra_covers_every_documented_integration():
    extras = _pyproject()["project"]["optional-dependencies"]
    all_ = extras["all"][0]
    for extra in ("torch", "jax", "bench", "transformers", "flax"):
        assert extra in all_.split("[")[1], (extra, all_)
    # the package metadata stays permissive: no pinned torch (the install scripts pin it)
    assert not any("==" in req for req in extras["torch"])


@pytest.mark.parametrize(
    "module, missing, extra",
    [
        ("memory_efficient_attention.torch", "torch", "torch"),
        ("memory_efficient_attention.jax", "jax", "jax"),
        ("memory_efficient_attention.torch.modules", "torch", "torch"),
        ("memory_efficient_attention.integrations.transformers", "transformers", "transformers"),
        ("memory_efficient_attention.integrations.transformers", "torch", "torch"),
        ("memory_efficient_attention.integrations.flax", "jax", "jax"),
        ("memory_efficient_attention.distributed.torch", "torch", "torch"),
        ("memory_efficient_attention.distributed.jax", "jax", "jax"),
    ],
)
def test_missing_framework_names_the_extra(module, missing, extra):
    # sys.modules[name] = None makes `import name` fail as if it were not installed
    code = f"""
        import sys
        sys.modules[{missing!r}] = None
        try:
            import {module}
        except ModuleNotFoundError as err:
            print("MESSAGE:", err)
        else:
            print("IMPORTED")
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert f'pip install "memory-efficient-attention[{extra}]"' in proc.stdout, proc.stdout


def test_seed_name_without_torch_names_the_extra():
    code = """
        import sys
        sys.modules["torch"] = None
        import memory_efficient_attention as mea
        try:
            mea.efficient_dot_product_attention_pt
        except ModuleNotFoundError as err:
            print("MESSAGE:", err)
    """
    proc = run_python(code)
    assert 'memory-efficient-attention[torch]"' in proc.stdout, (proc.stdout, proc.stderr)
