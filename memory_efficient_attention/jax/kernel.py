"""The JAX kernel's documented internal API: what the library's other layers (``distributed``,
``integrations``) use, so that none of them reaches into private modules.

Internal: for this library's own layers, over kernel-layout arrays; not part of the public API
(``memory_efficient_attention.jax``), and it may change with the kernel.

Kernel layout (legend: ``memory_efficient_attention._spec``)::

    q    [Z, L, H, D]     k  [Z, S, K, D]     v  [Z, S, K, E]
    out  [Z, L, H, E]     lse  [Z, L, H]  (natural log)

``Z`` the batch dims flattened, ``H`` query heads, ``K`` key/value heads (``H % K == 0``),
``L``/``S`` query/key lengths, ``D`` query/key depth, ``E`` value depth. ``cfg`` is a
``KernelConfig`` (``_config.make_config``, or ``distributed._plan.block_config`` for a ring
block); ``precision`` the matmul precision (``jax.lax.Precision`` or None).
"""

from __future__ import annotations

import jax.numpy as jnp

from .._config import KernelConfig
from ._kernel import Mods, Operands, _varying_like, attention_backward, attention_forward, log_sum_exp

__all__ = ["backward_block", "forward_block", "varying_like"]

_DEFAULT_PRECISION = Mods().precision


def varying_like(carry, *refs):
    """``carry`` (a pytree) with every array marked varying over the mesh axes that ``refs``
    vary over. Inside ``jax.shard_map`` with ``check_vma``, loop carries and the outputs of
    ``lax.switch`` branches must agree with their inputs on those axes; freshly made constants
    vary over none. Outside ``shard_map``, or on a JAX without varying-axis types, ``carry`` is
    returned unchanged."""
    return _varying_like(carry, *refs)


def forward_block(cfg: KernelConfig, q, k, v, *, precision=_DEFAULT_PRECISION, **arrays):
    """``(out [Z, L, H, E], lse [Z, L, H])`` of one block (no mask beyond ``cfg``'s, no bias):
    ``out`` in the input dtype, ``lse`` in natural log, ``-inf`` for a row with no key.

    ``arrays``: the dynamic parts of ``cfg``'s structured mask, as ``Operands`` names them:
    ``q_lengths``/``kv_lengths`` ``[Z]``, ``q_segments`` ``[Z, L]``, ``kv_segments`` ``[Z, S]``."""
    ops = Operands(q=q, k=k, v=v, **arrays)
    out, row_max, row_sum = attention_forward(cfg, Mods(precision=precision), ops)
    return out, log_sum_exp(row_max, row_sum)


def backward_block(cfg: KernelConfig, q, k, v, out, lse, d_out, *, precision=_DEFAULT_PRECISION, **arrays):
    """``(dq, dk, dv)`` (layouts of ``q, k, v``; their dtype) of one block, given ``out`` and the
    natural ``lse`` of the rows over *all* their keys (e.g. a ring's global ones).

    With ``lse`` as the row max and 1 as the row sum the backward recomputes
    ``P = exp(S - lse)``: the block's share of the whole softmax, so its gradients are exact
    parts of the whole ones (``delta = rowsum(dO * O)`` uses the given ``out``). Rows with
    ``lse = -inf`` (no key at all) get zero gradient. ``arrays``: as in ``forward_block``."""
    has_keys = lse > -jnp.inf
    row_max = jnp.where(has_keys, lse, 0.0)
    row_sum = has_keys.astype(lse.dtype)
    mods = Mods(precision=precision)
    dq, dk, dv, _, _ = attention_backward(
        cfg, mods, Operands(q=q, k=k, v=v, **arrays), out, row_max, row_sum, d_out, None
    )
    return dq, dk, dv
