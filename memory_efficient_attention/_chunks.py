"""Chunk sizes: explicit ones are honoured, missing ones are chosen from shapes and a budget.

The rule (documented in the README):

1. One step holds a score chunk of ``Z * H * q_chunk * k_chunk`` elements of the compute dtype;
   the backward keeps about three at once (probabilities, dP, dS). The memory budget for it is
   ``memory_budget / 4`` (default budget: 64 MiB).
2. Speed wants large steps that still fit the last-level cache: on a CPU about 2^21 elements
   (8 MiB of float32 scores; measured on 2 cores at n = 4096, 8 heads: 512 x 512 chunks ran
   forward+backward 1.14x the time of torch's fused SDPA against 1.22x for 128 x 512, and 2.0x
   faster than ``jax.nn.dot_product_attention`` against 1.8x), on an accelerator up to 2^24.
   The target is the smaller of this and the budget.
3. Start from ``k_chunk = min(S, 512)`` and ``q_chunk = min(L, 1024)``; halve ``q_chunk`` then
   ``k_chunk`` until the chunk fits the target (never below 16); where queries are few (decoding)
   grow ``k_chunk`` up to 4096 while it still fits.
4. A local window of ``band = left + right + 1`` keys caps both chunks at ``max(64, band // 2)``:
   coarser chunks would compute mostly-empty blocks along the band (measured at n = 8192, window
   (256, 256): 0.20x the unmasked time with 512-chunks, 0.11x with 256-chunks).
5. Even out the chunks: ``ceil(L / q_chunk)`` chunks of equal size (rounded up to a multiple of
   8 when that keeps the count) instead of a short tail, same for keys.
6. Partial pairs (a causal diagonal, a window's edges) split into tiles down to
   ``tile_size = max(256, min(q_chunk, k_chunk) // 2)`` and drop their empty quadrants (see
   ``_masks``), explicit chunk sizes included. Smaller tiles cost more in per-step overhead than
   they save here (measured, causal forward, 8 heads: n = 4096 with 512-chunks 0.60x the unmasked
   time untiled, 0.66x with 256-tiles; n = 16384, 1 head, 1024 x 2048 chunks: 0.65x untiled,
   0.60x with 512-tiles).

Example::

    >>> from memory_efficient_attention._spec import Dims
    >>> choose_chunk_sizes(Dims((1,), 16384, 16384, 8, 8, 64, 64), "float32")
    (512, 512)
    >>> choose_chunk_sizes(Dims((), 1, 65536, 8, 8, 64, 64), "float32")
    (1, 4096)
    >>> choose_chunk_sizes(Dims((), 16384, 16384, 1, 1, 64, 64), "float32")
    (1024, 2048)
    >>> parse_memory("512MB"), parse_memory("1.5GiB"), parse_memory(4096)
    (512000000, 1610612736, 4096)
"""

from __future__ import annotations

import math
import re

from ._spec import AttentionInputError, Dims, check_chunk_size, compute_dtype_name

__all__ = ["DEFAULT_MEMORY_BUDGET", "choose_chunk_sizes", "parse_memory"]

DEFAULT_MEMORY_BUDGET = 64 * 2**20
_MIN_CHUNK = 16
_MAX_Q_CHUNK = 1024
_START_K_CHUNK = 512
_MAX_K_CHUNK = 4096
_CPU_TARGET = 2**21
_ACCELERATOR_TARGET = 2**24
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


_MIN_TILE = 256


def tile_size(q_chunk: int, k_chunk: int) -> int:
    """The smallest tile a partial pair is split into (rule 6).

    >>> tile_size(512, 512), tile_size(1024, 2048)
    (256, 512)
    """
    return max(_MIN_TILE, min(q_chunk, k_chunk) // 2)


def parse_memory(budget: int | float | str | None) -> int | None:
    """Bytes from an int or a string such as ``"512MB"``, ``"2 GiB"``, ``"300k"``."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise AttentionInputError(f"memory_budget must be bytes or a string like '512MB', got {budget!r}")
    if isinstance(budget, (int, float)):
        value = float(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(budget))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise AttentionInputError(
                f"memory_budget must be bytes or a string like '512MB' or '2GiB', got {budget!r}"
            )
        value = float(match.group(1)) * _UNITS[unit]
    if not value > 0 or not math.isfinite(value):
        raise AttentionInputError(
            f"memory_budget must be a positive finite number of bytes (or a string like '512MB'), "
            f"got {budget!r}; pass None for the default ({DEFAULT_MEMORY_BUDGET // 2**20} MiB)"
        )
    return int(value)


def _even(length: int, size: int) -> int:
    """The smallest chunk size that cuts ``length`` into as many chunks as ``size`` does."""
    count = math.ceil(length / size)
    even = math.ceil(length / count)
    rounded = -(-even // 8) * 8
    return rounded if math.ceil(length / rounded) == count and rounded <= size else even


def choose_chunk_sizes(
    dims: Dims,
    dtype_name: str,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
    memory_budget: int | float | str | None = None,
    device: str = "cpu",
    band: int | None = None,
) -> tuple[int, int]:
    """``(q_chunk, k_chunk)`` for a call of ``dims``; explicit sizes are returned unchanged
    (clipped to the lengths, since a chunk never exceeds its axis). ``device`` is ``"cpu"`` or
    anything else for an accelerator; ``band`` the width of a local window, if any."""
    q_chunk = check_chunk_size("query_chunk_size", query_chunk_size)
    k_chunk = check_chunk_size("key_chunk_size", key_chunk_size)
    budget = parse_memory(memory_budget) or DEFAULT_MEMORY_BUDGET
    itemsize = 8 if compute_dtype_name(dtype_name) == "float64" else 4
    rows = dims.batch_size * dims.q_heads
    max_elems = max(budget // 4 // itemsize, 1)
    target = min(max_elems, _CPU_TARGET if device == "cpu" else _ACCELERATOR_TARGET)

    auto_q, auto_k = q_chunk is None, k_chunk is None
    # An empty axis (L = 0 or S = 0) still gets a chunk size of 1: its plan has no chunks.
    qc = max(1, min(dims.q_len, q_chunk or _MAX_Q_CHUNK))
    kc = max(1, min(dims.kv_len, k_chunk or _START_K_CHUNK))
    rows = max(rows, 1)
    while auto_q and qc > _MIN_CHUNK and rows * qc * kc > target:
        qc = max(_MIN_CHUNK, qc // 2)
    while auto_k and kc > _MIN_CHUNK and rows * qc * kc > target:
        kc = max(_MIN_CHUNK, kc // 2)
    while auto_k and kc < min(dims.kv_len, _MAX_K_CHUNK) and rows * qc * kc * 2 <= target:
        kc = min(dims.kv_len, kc * 2)
    if dims.q_len == 0 or dims.kv_len == 0:
        return qc, kc
    if band is not None:
        cap = max(64, band // 2)
        qc = min(qc, cap) if auto_q else qc
        kc = min(kc, cap) if auto_k else kc
    if auto_q:
        qc = _even(dims.q_len, qc)
    if auto_k:
        kc = _even(dims.kv_len, kc)
    return qc, kc
