"""Ring attention across devices: the sequence is sharded, key/value shards travel around a ring
of devices, and each device runs the chunked kernel on its block (Liu et al., 2023).

* ``memory_efficient_attention.distributed.jax``: ``ring_attention`` inside ``jax.shard_map``,
  ``ring_attention_sharded`` on global arrays and a mesh, ``to_zigzag`` / ``from_zigzag``.
* ``memory_efficient_attention.distributed.torch``: ``ring_attention`` on each rank's shard over
  ``torch.distributed`` point-to-point (gloo on CPU, NCCL on CUDA), ``to_zigzag`` /
  ``from_zigzag``.

Importing this package imports neither framework; each submodule loads on first use::

    >>> import memory_efficient_attention.distributed as dist_attention
    >>> dist_attention.LAYOUTS
    ('contiguous', 'zigzag')
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._plan import LAYOUTS, zigzag_permutation

__all__ = ["LAYOUTS", "jax", "torch", "zigzag_permutation"]


def __getattr__(name: str) -> ModuleType:
    if name in ("jax", "torch"):
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"jax", "torch"})
