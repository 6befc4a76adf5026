"""GPU checks: the kernels on CUDA against the frameworks' own attention and a float64 reference.

Marked ``cuda``: deselected by default (``-m "not cuda"`` in pyproject), run by
``scripts/device-check.sh`` on a machine with a GPU (``pytest -m cuda``).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from memory_efficient_attention.torch import (  # noqa: E402
    efficient_dot_product_attention,
    scaled_dot_product_attention,
)

from .reference import reference_attention  # noqa: E402

pytestmark = pytest.mark.cuda

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 1000, 64), (1, 4, 4096, 128)])
def test_torch_dropin_on_cuda_matches_sdpa(dtype, is_causal, shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    out = scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    assert out.device.type == "cuda" and out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r.float(), atol=10 * tol, rtol=10 * tol)


@needs_cuda
def test_torch_seed_api_on_cuda_matches_float64_reference():
    torch.manual_seed(1)
    q = torch.randn(2, 300, 4, 32, device="cuda", dtype=torch.float64)
    k = torch.randn(2, 500, 2, 32, device="cuda", dtype=torch.float64)
    v = torch.randn(2, 500, 2, 48, device="cuda", dtype=torch.float64)
    bias = torch.randn(1, 4, 300, 500, device="cuda", dtype=torch.float64)
    lengths = torch.tensor([500, 123], device="cuda")
    kwargs = dict(is_causal=True, causal_alignment="bottom_right", key_value_seq_lengths=lengths)
    out = efficient_dot_product_attention(
        q, k, v, bias=bias, query_chunk_size=128, key_chunk_size=96, **kwargs
    )
    ref = reference_attention(
        *(x.cpu().numpy() for x in (q, k, v)), bias=bias.cpu().numpy(), is_causal=True,
        causal_alignment="bottom_right", key_value_seq_lengths=lengths.cpu().numpy(),
    )  # fmt: skip
    np.testing.assert_allclose(out.cpu().numpy(), ref, atol=1e-10, rtol=1e-10)


@needs_cuda
def test_jax_on_gpu_matches_jax_nn():
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip("jax has no GPU backend here")
    import jax.numpy as jnp

    from memory_efficient_attention.jax import dot_product_attention

    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 2048, 8, 64), dtype=jnp.float32)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, is_causal=True) ** 2).sum()

    ours = jax.jit(jax.value_and_grad(loss(dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-2, rtol=2e-3)
