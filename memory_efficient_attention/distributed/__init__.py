"""Attention across devices: the sequence is sharded; ring attention (Liu et al., 2023) sends
key/value shards around a ring of devices (or gathers them once: ``variant="allgather"``) while
each device runs the chunked kernel on its blocks, with every structured mask; Ulysses exchanges
heads for sequence with all-to-alls.

* ``memory_efficient_attention.distributed.jax``: ``ring_attention`` and ``ulysses_attention``
  inside ``jax.shard_map``, ``ring_attention_sharded`` on global arrays and a mesh,
  ``to_zigzag`` / ``from_zigzag``.
* ``balance_documents`` / ``device_work`` / ``token_order`` (numpy): an order of packed
  documents that spreads causal work evenly over the devices (``documents``).
* ``memory_efficient_attention.distributed.torch``: ``ring_attention`` and ``ulysses_attention``
  on each rank's shard over ``torch.distributed`` (gloo on CPU, NCCL on CUDA), ``to_zigzag`` /
  ``from_zigzag``.

Importing this package imports neither framework; each submodule loads on first use::

    >>> import memory_efficient_attention.distributed as dist_attention
    >>> dist_attention.LAYOUTS, dist_attention.VARIANTS
    (('contiguous', 'zigzag'), ('ring', 'allgather'))
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._plan import LAYOUTS, VARIANTS, zigzag_permutation
from .documents import balance_documents, device_work, token_order

__all__ = [
    "LAYOUTS",
    "VARIANTS",
    "balance_documents",
    "device_work",
    "jax",
    "token_order",
    "torch",
    "zigzag_permutation",
]


def __getattr__(name: str) -> ModuleType:
    if name in ("jax", "torch"):
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"jax", "torch"})
