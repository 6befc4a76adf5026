"""The PyTorch kernel's documented internal API: what the library's other layers (``integrations``,
``distributed``, ``torch.modules``) use, so that none of them reaches into private modules.

Internal: for this library's own layers, over kernel-layout tensors; not part of the public API
(``memory_efficient_attention.torch``), and it may change with the kernel. The log-sum-exp is in
natural log at this boundary (the kernel's base-2 units never leave it).

Kernel layout (legend: ``memory_efficient_attention._spec``)::

    q5, q  [Z, K, L, G, D]     k4, k  [Z, K, S, D]     v4, v  [Z, K, S, E]
    out    [Z, K, L, G, E]     lse    [Z, K, L, G]

``Z`` the batch dims flattened, ``K`` key/value heads, ``G = H // K`` query heads per key/value
head (query head ``h = k * G + g``), ``L``/``S`` query/key lengths, ``D`` query/key depth,
``E`` value depth. ``dims`` is the ``Dims`` of the call (``_spec.seed_dims`` or
``_spec.heads_first_dims``); ``cfg`` a ``KernelConfig`` (``_config.make_config``, or
``distributed._plan.block_config`` for a ring block).
"""

from __future__ import annotations

import torch

from .._config import KernelConfig, split_arguments
from .._spec import Dims
from ._api import _attention, _check_qkv
from ._api import attention_weights as _attention_weights
from ._function import Operands
from ._kernel import Mods, _unit, attention_backward, attention_forward, log_sum_exp

__all__ = ["attention", "attention_weights", "backward_block", "check_qkv", "forward_block"]

_NEG_INF = float("-inf")


def check_qkv(query, key, value) -> None:
    """The checks of the public functions on ``query``, ``key`` and ``value`` (any layout): each a
    ``torch.Tensor`` (else ``TypeError``), of supported float dtypes and on one device (else
    ``AttentionInputError``)."""
    _check_qkv(query, key, value)


def attention(
    q5: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, dims: Dims, *, mask_fill: str = "exclude", **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [Z, K, L, G, E], lse [Z, K, L, G])`` of kernel-layout ``q5, k4, v4``: the whole
    pipeline of ``efficient_dot_product_attention`` (checks of the other arguments, config,
    kernel, autograd) without its layout changes.

    ``mask_fill``: ``"exclude"`` (default: a dense ``mask``'s False removes the key, as the
    drop-ins ``scaled_dot_product_attention`` and the integrations do; a row with no key left
    outputs 0) or ``"min"`` (the seed's rule: the score becomes ``finfo.min``).
    ``options``: the keyword arguments of ``efficient_dot_product_attention`` with its meaning
    (``mask``, ``bias``, ``scale``, ``is_causal``, ``causal_alignment``, ``local_window_size``,
    the sequence lengths and segment ids, ``score_mod``, ``mask_mod``, ``logits_soft_cap``,
    ``dropout_rate``, ``generator``, ``query_chunk_size``, ``key_chunk_size``,
    ``memory_budget``), and ``operand_names`` (the names of ``(mask, bias)`` in error messages).
    They become the call's ``CallOptions``, ``CallArrays`` and ``Mods`` (``_config.split_arguments``).
    """
    options, arrays, rest = split_arguments({"mask_fill": mask_fill, **options})
    mods = Mods(score_mod=rest.pop("score_mod", None), mask_mod=rest.pop("mask_mod", None))
    return _attention(q5, k4, v4, dims, options, arrays, mods, **rest)


def attention_weights(
    q5: torch.Tensor, k4: torch.Tensor, dims: Dims, *, mask_fill: str = "exclude", **options
):
    """The probabilities ``[Z, H, L, S]`` of the call ``attention(q5, k4, v4, dims, **options)``
    would make (before dropout; sinks, masks, bias and callables included), a block of keys at a
    time (``_api.attention_weights``). ``dims``: the call's; its value depth is not used."""
    options, arrays, rest = split_arguments({"mask_fill": mask_fill, **options, "dropout_rate": 0.0})
    mods = Mods(score_mod=rest.pop("score_mod", None), mask_mod=rest.pop("mask_mod", None))
    rest.pop("generator", None)
    return _attention_weights(q5, k4, dims, options, arrays, mods, **rest)


def forward_block(cfg: KernelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **arrays):
    """``(out [Z, K, L, G, E], lse [Z, K, L, G])`` of one block (no mask beyond ``cfg``'s, no
    bias, no autograd): ``out`` in the input dtype, ``lse`` in natural log and the compute dtype,
    ``-inf`` for a row with no key.

    ``arrays``: the dynamic parts of ``cfg``'s structured mask, as ``Operands`` names them:
    ``q_lengths``/``kv_lengths`` ``[Z]``, ``q_segments`` ``[Z, L]``, ``kv_segments`` ``[Z, S]``."""
    mods = Mods()
    out, row_max, row_sum = attention_forward(cfg, mods, Operands(q=q, k=k, v=v, **arrays), 0)
    return out, log_sum_exp(row_max, row_sum, mods)


def backward_block(
    cfg: KernelConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    **arrays,
):
    """``(dq, dk, dv)`` (layouts of ``q, k, v``; their dtype) of one block, given ``out`` and the
    natural ``lse`` of the rows over *all* their keys (e.g. a ring's global ones).

    The backward recomputes ``P = exp(S - lse)``: the block's share of the whole softmax, so its
    gradients are exact parts of the whole ones (``delta = rowsum(dO * O)`` uses the given
    ``out``). Rows with ``lse = -inf`` (no key at all) get zero gradient. ``arrays``: as in
    ``forward_block``."""
    mods = Mods()
    has_keys = lse > _NEG_INF
    row_max = torch.where(has_keys, lse * _unit(mods), torch.zeros((), dtype=lse.dtype))
    row_sum = has_keys.to(lse.dtype)
    dq, dk, dv, _ = attention_backward(
        cfg, mods, Operands(q=q, k=k, v=v, **arrays), 0, out, row_max, row_sum, d_out, None, False
    )
    return dq, dk, dv
