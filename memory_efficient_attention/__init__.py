"""memory-efficient-attention: exact attention that never holds an n x n tensor, forward or
backward, in PyTorch and JAX.

Importing this package imports neither torch nor jax; the framework functions load on first use::

    >>> import memory_efficient_attention as mea
    >>> mea.__version__
    '0.2.0'

* ``efficient_dot_product_attention_pt`` / ``memory_efficient_attention.torch``: PyTorch.
* ``efficient_dot_product_attention_jax`` / ``memory_efficient_attention.jax``: JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._spec import AttentionInputError

__version__ = "0.2.0"
__all__ = [
    "AttentionInputError",
    "__version__",
    "efficient_dot_product_attention_jax",
    "efficient_dot_product_attention_pt",
]

_LAZY = {
    "efficient_dot_product_attention_pt": (
        "memory_efficient_attention.torch",
        "efficient_dot_product_attention",
    ),
    "efficient_dot_product_attention_jax": (
        "memory_efficient_attention.jax",
        "efficient_dot_product_attention",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memory_efficient_attention' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
