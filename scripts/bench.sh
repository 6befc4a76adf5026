#!/usr/bin/env bash
# The main job on a fresh machine: install (CPU torch pinned first) and run the benchmark with its
# embedded defaults; extra arguments go to `python -m memory_efficient_attention bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
.venv/bin/python -m memory_efficient_attention bench "$@"
