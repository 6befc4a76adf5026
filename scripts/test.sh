#!/usr/bin/env bash
# Everything the tests need, on a fresh machine: a virtual environment in .venv with the CPU build
# of torch pinned first (a bare `torch` requirement would pull a multi-GB CUDA build), then the
# package with its [testing] extra, then lint and the default test suite (slow tests: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[testing]"
.venv/bin/ruff check memory_efficient_attention tests
.venv/bin/ruff format --check memory_efficient_attention tests
.venv/bin/python -m pytest -n 2 "$@"
