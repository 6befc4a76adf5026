"""Helpers kept from the 0.1.3 package for users' callbacks."""

from __future__ import annotations

__all__ = ["dynamic_slice"]


def dynamic_slice(x, starts, sizes):
    """``x[starts[0]:starts[0]+sizes[0], ...]`` for a torch tensor, like ``jax.lax.dynamic_slice``.

    As in JAX (and the 0.1.3 package), a start is clamped so that the slice fits:
    ``start = clip(start, 0, x.shape[i] - size)``. Returns a view (the seed copied with
    ``index_select``).

    >>> import torch
    >>> dynamic_slice(torch.arange(10), (8,), (4,)).tolist()
    [6, 7, 8, 9]
    """
    index = []
    for dim, (start, size) in enumerate(zip(starts, sizes)):
        start = max(0, min(int(start), x.shape[dim] - int(size)))
        index.append(slice(start, start + int(size)))
    return x[tuple(index)]
