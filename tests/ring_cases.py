"""The mask x variant x layout cases of the ring tests, shared by JAX (8 simulated devices) and
PyTorch (gloo ranks), with their inputs and a float64 dense reference built from global positions
(numpy; each framework differentiates its own copy of ``dense``)."""

from __future__ import annotations

import numpy as np

# (name, variant, layout, options, global query length factor, lengths, segments): global
# lengths are ``world * local``; ``q_factor`` 0.5 halves the query (bottom-right causal).
CASES = [
    ("window-contiguous-ring", "ring", "contiguous", {"local_window_size": (5, 0)}, 1, False, False),
    ("window2-zigzag-ring", "ring", "zigzag", {"local_window_size": (7, 3)}, 1, False, False),
    ("causal-window-zigzag-allgather", "allgather", "zigzag",
     {"is_causal": True, "local_window_size": (20, 0)}, 1, False, False),
    ("bottom-right-contiguous-ring", "ring", "contiguous",
     {"is_causal": True, "causal_alignment": "bottom_right"}, 0.5, False, False),
    ("lengths-contiguous-allgather", "allgather", "contiguous", {}, 1, True, False),
    ("lengths-causal-zigzag-ring", "ring", "zigzag", {"is_causal": True}, 1, True, False),
    ("segments-causal-zigzag-ring", "ring", "zigzag", {"is_causal": True}, 1, False, True),
    ("segments-lengths-softcap-contiguous-ring", "ring", "contiguous",
     {"logits_soft_cap": 2.0}, 1, True, True),
    ("segments-causal-contiguous-allgather", "allgather", "contiguous", {"is_causal": True}, 1, False, True),
    ("causal-zigzag-allgather", "allgather", "zigzag", {"is_causal": True}, 1, False, False),
    ("full-contiguous-allgather", "allgather", "contiguous", {}, 1, False, False),
    ("bottom-right-window-zigzag-allgather", "allgather", "zigzag",
     {"is_causal": True, "causal_alignment": "bottom_right", "local_window_size": (10, 0)},
     0.5, False, False),
]  # fmt: skip


def inputs(world: int, local: int, q_factor: float, lengths: bool, segments: bool, seed: int = 0):
    """Global float64 ``q [2, N, 4, 4]``, ``k/v [2, M, 2, 4|3]`` (GQA 2:1), ``d_out`` and the
    integer arrays (natural order): lengths ``[2]``, segment ids ``[2, N]``/``[2, M]``."""
    rng = np.random.default_rng(seed)
    m = world * local
    n = int(m * q_factor)
    arrays = {
        "q": rng.standard_normal((2, n, 4, 4)),
        "k": rng.standard_normal((2, m, 2, 4)),
        "v": rng.standard_normal((2, m, 2, 3)),
        "d_out": rng.standard_normal((2, n, 4, 3)),
    }
    ints = {}
    if lengths:
        ints["query_seq_lengths"] = np.array([n - n // 3, n])
        ints["key_value_seq_lengths"] = np.array([m, m // 2 + 1])
    if segments:  # documents of random lengths, crossing shard boundaries
        ids = np.cumsum(rng.random((2, m)) < 0.08, axis=1)
        ints["query_segment_ids"] = ids[:, m - n :] if n < m else ids
        ints["key_segment_ids"] = ids
    return arrays, ints


def keep_mask(options: dict, n: int, m: int, ints: dict) -> np.ndarray:
    """``[2, N, M]`` True where a query may see a key, from global positions."""
    qi, ki = np.arange(n)[:, None], np.arange(m)[None, :]
    off = m - n if options.get("causal_alignment") == "bottom_right" else 0
    keep = np.ones((2, n, m), bool)
    if options.get("is_causal"):
        keep &= ki <= qi + off
    if options.get("local_window_size"):
        left, right = options["local_window_size"]
        keep &= (ki >= qi + off - left) & (ki <= qi + off + right)
    if "query_seq_lengths" in ints:
        keep &= qi[None] < ints["query_seq_lengths"][:, None, None]
        keep &= ki[None] < ints["key_value_seq_lengths"][:, None, None]
    if "query_segment_ids" in ints:
        keep &= ints["query_segment_ids"][:, :, None] == ints["key_segment_ids"][:, None, :]
    return keep


def dense(xp, q, k, v, keep, softcap=None):
    """Dense attention ``[2, N, 4, E]`` with ``keep [2, N, M]``; rows with no key output 0.
    ``xp``: ``jax.numpy`` or ``torch`` (``repeat``-free: heads grouped by reshape)."""
    b, n, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, n, kh, h // kh, d)
    s = xp.einsum("bqkgd,bskd->bkgqs", qg, k) / d**0.5
    if softcap:
        s = softcap * xp.tanh(s / softcap)
    mask = keep[:, None, None]
    s = xp.where(mask, s, -1e300)
    p = xp.exp(s) * mask  # scores of unit-normal inputs are small: no max shift needed
    denom = p.sum(-1)[..., None]
    p = p / xp.where(denom > 0, denom, 1.0)
    out = xp.einsum("bkgqs,bskd->bqkgd", p, v)
    return out.reshape(b, n, h, v.shape[-1])
