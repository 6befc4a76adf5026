"""The FlexAttention engine: one ``torch.nn.attention.flex_attention`` call per call.

``engine="flex"`` hands the whole call to FlexAttention, which compiles the score pipeline into
one fused kernel on CUDA (FlashAttention-style, forward and backward, block-sparse):

* ``score_mod``: the call's pipeline in ``_spec.SCORE_PIPELINE`` order after the scale (which
  flex fuses): soft cap, bias (indexed at its broadcast shape; flex differentiates captured
  tensors), the dense boolean mask (excluded keys: ``-inf``), the user's ``score_mod``;
* ``mask_mod``: the structured masks, lengths, segment ids and the user's ``mask_mod``
  (``_config.chunk_keep``, the same predicate as every other engine);
* ``block_mask``: ``BlockMask.from_kv_blocks`` from our static block plan at 128 x 128 (empty
  blocks skipped, full blocks without the mask_mod), never an L x S mask.

Our ``score_mod``/``mask_mod`` signatures are FlexAttention's (``(score, b, h, q_idx, kv_idx)``
and ``(b, h, q_idx, kv_idx)``, ``b`` the flattened batch index, ``h`` the query head), so user
callables pass through unchanged. Autograd is FlexAttention's own: no forward mode or double
backward (use the chunked engine), no dropout, no seed callbacks, no seed-rule dense mask.
FlexAttention runs its backward on CUDA only; on CPU this engine runs forward passes (eagerly,
O(L x S), for tests); on CUDA ``flex_attention`` is compiled once (``torch.compile``).

Layouts (legend: ``_spec``)::

    q5 [Z, K, L, G, D] -> q [Z, H, L, D]     k, v [Z, K, S, D / E]
    flex -> out [Z, H, L, E], lse [Z, H, L] (natural log) -> out5 [Z, K, L, G, E], lse [Z, K, L, G]

Example (CPU, forward only)::

    >>> import torch
    >>> from memory_efficient_attention.torch import efficient_dot_product_attention as attention
    >>> q = torch.randn(1, 200, 4, 16); k = v = torch.randn(1, 200, 2, 16)
    >>> out = attention(q, k, v, is_causal=True, engine="flex")
    >>> bool(torch.allclose(out, attention(q, k, v, is_causal=True, engine="chunked"), atol=1e-5))
    True
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from .._config import KernelConfig, chunk_keep
from .._masks import EMPTY, FULL, BlockPlan, StructuredMask

__all__ = ["BLOCK", "attention", "block_mask", "describe", "refusal"]

BLOCK = 128  # FlexAttention's default sparse block size


def _flex():
    """FlexAttention's module, or None in a torch without it."""
    try:
        from torch.nn.attention import flex_attention
    except ImportError:
        return None
    return flex_attention if hasattr(flex_attention, "BlockMask") else None


def refusal(cfg: KernelConfig, mods, ops, *, needs_grad: bool) -> str | None:
    """Why ``engine="flex"`` cannot run this call (None: it can)."""
    if _flex() is None:
        return f"no torch.nn.attention.flex_attention in torch {torch.__version__}"
    if cfg.dropout:
        return "dropout (FlexAttention has none)"
    if mods.seed_callbacks:
        return "the seed's callbacks (bias_calc_fn, mask_calc_fn, weights_calc_fn work on chunks)"
    if ops.mask is not None and cfg.mask_fill == "min":
        return "a dense mask with the seed's finfo.min rule (mask_fill='min')"
    if needs_grad and ops.q.device.type != "cuda":
        return f"gradients on {ops.q.device.type} (FlexAttention runs its backward on CUDA only)"
    return None


@functools.lru_cache(maxsize=64)
def _block_lists(mask: StructuredMask):
    """``(kv_num_blocks, kv_indices, full_num_blocks, full_indices)`` as nested lists from the
    static plan at ``BLOCK`` x ``BLOCK``: partial blocks first in each row, then padding."""
    plan = BlockPlan.build(mask, BLOCK, BLOCK)
    nk = plan.num_k_chunks
    counts, partial, full_counts, full = [], [], [], []
    for row in plan.kinds:
        part = [j for j, kind in enumerate(row) if kind not in (EMPTY, FULL)]
        whole = [j for j, kind in enumerate(row) if kind == FULL]
        counts.append(len(part))
        full_counts.append(len(whole))
        partial.append(part + [0] * (nk - len(part)))
        full.append(whole + [0] * (nk - len(whole)))
    return counts, partial, full_counts, full


def describe(cfg: KernelConfig) -> str:
    """The block mask's plan as text (counts of its 128 x 128 blocks by kind)."""
    counts, _, full_counts, _ = _block_lists(cfg.structure)
    partial, full = sum(counts), sum(full_counts)
    total = len(counts) * math.ceil(cfg.dims.kv_len / BLOCK)
    return (
        f"BlockMask({BLOCK} x {BLOCK} blocks: {full} full, {partial} partial, "
        f"{total - full - partial} empty (skipped))"
    )


def block_mask(cfg: KernelConfig, mask_mod, device):
    """The ``BlockMask`` of a call (None when nothing is masked): from the block plan, never
    from the dense mask."""
    if mask_mod is None:
        return None
    counts, partial, full_counts, full = _block_lists(cfg.structure)

    def ints(x):
        return torch.tensor(x, dtype=torch.int32, device=device)[None, None]

    return _flex().BlockMask.from_kv_blocks(
        ints(counts), ints(partial), ints(full_counts), ints(full), BLOCK_SIZE=BLOCK,
        mask_mod=mask_mod, seq_lengths=(cfg.dims.q_len, cfg.dims.kv_len),
    )  # fmt: skip


def _at(x, b, h, q_idx, kv_idx):
    """``x[b, h, q_idx, kv_idx]`` of a mask or bias ``[Zb, Hb, Lb, Sb]`` (an axis of size 1 is
    indexed at 0)."""
    index = (b, h, q_idx, kv_idx)
    return x[tuple(i if n > 1 else 0 for i, n in zip(index, x.shape))]


def _mods(cfg: KernelConfig, mods, ops):
    """``(score_mod or None, mask_mod or None)`` for FlexAttention."""
    cap = cfg.softcap
    bias, dense, user = ops.bias, ops.mask, mods.score_mod
    score_mod = None
    if cap is not None or bias is not None or dense is not None or user is not None:

        def score_mod(s, b, h, q_idx, kv_idx):
            if cap is not None:
                s = torch.tanh(s / cap) * cap
            if bias is not None:
                s = s + _at(bias, b, h, q_idx, kv_idx).to(s.dtype)
            if dense is not None:
                s = torch.where(_at(dense, b, h, q_idx, kv_idx), s, float("-inf"))
            if user is not None:
                s = user(s, b, h, q_idx, kv_idx)
            return s

    lengths = (ops.q_lengths, ops.kv_lengths)
    segments = (ops.q_segments, ops.kv_segments)
    structure = cfg.structure
    if not (structure.causal or structure.window is not None or structure.dynamic):
        return score_mod, None

    def mask_mod(b, h, q_idx, kv_idx):
        keep = chunk_keep(
            structure, q_idx, kv_idx,
            q_lengths=None if lengths[0] is None else lengths[0][b],
            kv_lengths=None if lengths[1] is None else lengths[1][b],
            q_segments=None if segments[0] is None else segments[0][b, q_idx],
            kv_segments=None if segments[1] is None else segments[1][b, kv_idx],
            mask_mod=mods.mask_mod, batch_idx=b, head_idx=h,
        )  # fmt: skip
        return keep

    return score_mod, mask_mod


@functools.cache
def _compiled():
    return torch.compile(_flex().flex_attention, dynamic=False)


def attention(cfg: KernelConfig, mods, ops):
    """``(out [Z, K, L, G, E], lse [Z, K, L, G])`` by FlexAttention (differentiable by its
    autograd; the lse in the compute dtype)."""
    flex = _flex()
    dims = cfg.dims
    score_mod, mask_mod = _mods(cfg, mods, ops)
    q = ops.q.transpose(2, 3).flatten(1, 2)  # [Z, H, L, D]
    run = _compiled() if q.device.type == "cuda" else flex.flex_attention
    with warnings.catch_warnings():  # (eager on CPU: said in the module docstring)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out, aux = run(
            q, ops.k, ops.v, score_mod=score_mod, block_mask=block_mask(cfg, mask_mod, q.device),
            scale=cfg.scale, enable_gqa=dims.groups > 1, return_aux=flex.AuxRequest(lse=True),
        )  # fmt: skip
    lse = aux.lse.to(getattr(torch, cfg.compute_dtype))
    out5 = out.unflatten(1, (dims.kv_heads, dims.groups)).transpose(2, 3)
    lse4 = lse.unflatten(1, (dims.kv_heads, dims.groups)).transpose(2, 3)
    return out5, lse4
