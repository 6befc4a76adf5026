"""One small interface over the PyTorch and JAX kernels, so a test written once runs on both.

``test_torch.py`` and ``test_jax.py`` each define a ``BACKEND``; ``load`` imports the framework
(skipping when it is missing) and returns it. ``backend_cases`` parametrises ``(backend, case)``
pairs, the cases chosen by their tags (``Case.tags`` in ``cases.py``). Nothing here imports torch or
jax at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest

BACKENDS = ("torch", "jax")


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable  # the seed-layout function, efficient_dot_product_attention
    module: ModuleType  # memory_efficient_attention.<framework>
    alias: str  # the function's name on the top-level package
    # (case, x, *, grads=True, **extra) -> (out, {leaf: grad} or None) as float64 NumPy; also checks
    # the output's and the gradients' dtypes and shapes
    attention: Callable
    # (case, x) -> (fn(..., return_lse=True), fn(...)) as framework arrays
    attention_lse: Callable
    numpy: Callable  # framework array -> float64 NumPy
    dtype: Callable  # framework array -> dtype name ("float32")
    # (fn, *args, words, **kwargs): fn raises AttentionInputError naming ``words`` before computing
    raises_before_compute: Callable
    qkv: Callable  # (q_shape, k_shape, v_shape) -> float32 query, key, value (seed layout)
    drop_in: Callable  # the drop-in for the framework's own attention function
    drop_in_qkv: Callable  # like ``qkv`` (seed-layout shapes), laid out as ``drop_in`` takes them
    drop_in_gqa: dict  # what ``drop_in`` needs to accept fewer key/value heads than query heads
    as_dtype: Callable  # (array, dtype name) -> array
    chunk_sweep: tuple  # the (query_chunk_size, key_chunk_size) settings tried per case


def load(name: str) -> Backend:
    pytest.importorskip(name)
    return importlib.import_module(f"{__package__}.test_{name}").BACKEND


def backend_cases(cases, tag: str | None = None) -> list:
    """``pytest.param(backend name, case)`` for every backend and every case ``tag`` applies to."""
    return [
        pytest.param(b, c, id=f"{b}-{c.id}")
        for b in BACKENDS
        for c in cases
        if tag is None or c.tagged(tag, b)
    ]
