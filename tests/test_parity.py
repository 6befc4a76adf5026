"""PyTorch vs JAX on identical inputs over the shared grid: outputs and gradients agree.

Both are also checked against the float64 reference in their own files; agreeing with each other
to within twice the per-dtype tolerance catches a difference that both references would allow
in opposite directions, and compares the two kernels' handling of every case directly."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("jax")

from .cases import ALL_CASES, assert_close, ids, make_inputs
from .test_jax import run_case as run_jax
from .test_torch import run_case as run_torch


@pytest.mark.parametrize("case", ALL_CASES, ids=ids(ALL_CASES))
def test_torch_and_jax_agree(case):
    x = make_inputs(case)
    out_t, grads_t = run_torch(case, x)
    out_j, grads_j = run_jax(case, x)
    assert_close(out_t, out_j, case.dtype, "output", factor=2.0)
    assert set(grads_t) == set(grads_j)
    for name in grads_t:
        assert_close(grads_t[name], grads_j[name], case.dtype, f"d{name}", factor=2.0)
    # both zero the same rows exactly (no key left) and agree on which entries are exactly 0
    np.testing.assert_array_equal(out_t == 0, out_j == 0)


@pytest.mark.parametrize(
    "case",
    [c for c in ALL_CASES if c.name in ("everything", "masked_rows", "causal_br_l_gt_s")],
    ids=lambda c: c.id,
)
def test_torch_and_jax_lse_agree(case):
    import jax.numpy as jnp
    import torch

    from memory_efficient_attention import (
        efficient_dot_product_attention_jax,
        efficient_dot_product_attention_pt,
    )

    from .cases import chunk_kwargs
    from .test_jax import arr, jax_kwargs
    from .test_torch import tensor, torch_kwargs

    x = make_inputs(case)
    mask_t = None if x["mask"] is None else torch.as_tensor(x["mask"])
    mask_j = None if x["mask"] is None else jnp.asarray(x["mask"])
    _, lse_t = efficient_dot_product_attention_pt(
        *(tensor(x[n], case.dtype) for n in ("query", "key", "value")),
        mask_t,
        tensor(x["bias"], case.dtype),
        **chunk_kwargs(case),
        **torch_kwargs(x["kwargs"]),
        return_lse=True,
    )
    _, lse_j = efficient_dot_product_attention_jax(
        *(arr(x[n], case.dtype) for n in ("query", "key", "value")),
        mask_j,
        arr(x["bias"], case.dtype),
        **chunk_kwargs(case),
        **jax_kwargs(x["kwargs"]),
        return_lse=True,
    )
    assert str(lse_t.dtype).removeprefix("torch.") == str(lse_j.dtype)
    lse_dtype = "float64" if case.dtype == "float64" else "float32"
    factor = 2.0 if case.dtype in ("float32", "float64") else 100.0
    assert_close(lse_t.double().numpy(), np.asarray(lse_j, dtype=np.float64), lse_dtype, "lse", factor=factor)
