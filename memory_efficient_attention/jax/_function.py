"""The differentiation boundary: one ``jax.custom_vjp`` over kernel-layout arrays (see ``_kernel``).

Everything outside it (layout changes, broadcasting of masks and biases) is ordinary JAX code,
so autodiff carries gradients back to the caller's shapes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .._config import KernelConfig
from ._kernel import Mods, Operands, attention_backward, attention_forward, log_sum_exp


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunked_attention(cfg: KernelConfig, mods: Mods, ops: Operands):
    """``(out, lse)``, ``lse`` finite (``finfo.min`` for a row with no key: ``_kernel.no_key``);
    the forward saves inputs, output and two numbers per row."""
    out, row_max, row_sum = attention_forward(cfg, mods, ops)
    return out, log_sum_exp(row_max, row_sum, finite=True)


def _fwd(cfg: KernelConfig, mods: Mods, ops: Operands):
    out, row_max, row_sum = attention_forward(cfg, mods, ops)
    return (out, log_sum_exp(row_max, row_sum, finite=True)), (ops, out, row_max, row_sum)


def _float0_like(x):
    return None if x is None else np.zeros(jnp.shape(x), dtype=jax.dtypes.float0)


def _bwd(cfg: KernelConfig, mods: Mods, residuals, cotangents):
    ops, out, row_max, row_sum = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, dbias, (ddata, dconsts) = attention_backward(
        cfg, mods, ops, out, row_max, row_sum, d_out, d_lse
    )
    return (
        Operands(
            dq,
            dk,
            dv,
            dbias,
            _float0_like(ops.mask),
            _float0_like(ops.q_lengths),
            _float0_like(ops.kv_lengths),
            _float0_like(ops.q_segments),
            _float0_like(ops.kv_segments),
            ddata,
            _float0_like(ops.dropout_key),
            dconsts,
        ),
    )


chunked_attention.defvjp(_fwd, _bwd)
