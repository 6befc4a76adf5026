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
@pytest.mark.parametrize("is_causal", [False, True, "mask"])
@pytest.mark.parametrize("shape", [(2, 8, 1000, 64), (1, 4, 4096, 128)])
def test_torch_dropin_on_cuda_matches_sdpa(dtype, is_causal, shape):
    """The drop-in (the fused engine: FlashAttention-2 spans, the memory-efficient kernel for a
    boolean mask and float32) against torch's own SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    kw = dict(is_causal=is_causal) if is_causal != "mask" else {}
    if is_causal == "mask":  # excludes ~20% of the keys, never a whole row
        mask = torch.rand(shape[-2], shape[-2], device="cuda") > 0.2
        kw["attn_mask"] = mask | torch.eye(shape[-2], dtype=torch.bool, device="cuda")
    out = scaled_dot_product_attention(q, k, v, **kw)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
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


# ------------------------------------------------------------------------------------------
# The fused engine on CUDA: torch's FlashAttention-2 and memory-efficient kernels per span
# ------------------------------------------------------------------------------------------

FUSED_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bottom_right": dict(is_causal=True, causal_alignment="bottom_right"),
    "window": dict(local_window_size=(64, 16)),
    "lengths": dict(key_value_seq_lengths=[500, 123]),
    "segments": dict(segments=True),
    "bias": dict(bias=True),
}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_cuda_kernels_pass_their_check(dtype):
    from memory_efficient_attention.torch import _span_kernels

    assert _span_kernels.broken("cuda", dtype, 64) is None
    kernels = _span_kernels.kernels_for("cuda", dtype, 64)
    names = [(k.name, k.gqa) for k in kernels]
    want = [("memory-efficient CUDA kernel", False)]
    if dtype != torch.float32:  # FlashAttention-2 with grouped heads natively (and repeated)
        want = [("FlashAttention-2 CUDA kernel", True), ("FlashAttention-2 CUDA kernel", False), *want]
    assert names == want


@needs_cuda
@pytest.mark.parametrize(
    "dtype, lengths",
    [(torch.float32, (300, 500)), (torch.bfloat16, (300, 500)), (torch.bfloat16, (2100, 2100))],
    ids=["float32-300x500", "bfloat16-300x500", "bfloat16-2100"],
)
@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_engine_on_cuda_matches_float64_reference(dtype, name, lengths):
    """Outputs and q/k/v gradients (GQA 4:1) against the float64 reference; the long case
    cuts the call into several spans (1024 query rows) where a mask needs them."""
    from memory_efficient_attention.torch import explain

    from .cases import assert_close
    from .reference import reference_grads

    L, S = lengths
    gen = torch.Generator().manual_seed(L + len(name))
    host = [torch.randn(2, n, h, 64, generator=gen) for n, h in ((L, 8), (S, 2), (S, 2))]
    q, k, v = (x.to("cuda", dtype).requires_grad_() for x in host)
    kwargs = dict(FUSED_CASES[name])
    ref_kwargs = {}
    if kwargs.pop("segments", False):
        qs, ks = torch.arange(L).repeat(2, 1) * 3 // L, torch.arange(S).repeat(2, 1) * 3 // S
        kwargs.update(query_segment_ids=qs.cuda(), key_segment_ids=ks.cuda())
        ref_kwargs.update(query_segment_ids=qs.numpy(), key_segment_ids=ks.numpy())
    if "key_value_seq_lengths" in kwargs:
        lens = torch.tensor([min(x, S) for x in kwargs.pop("key_value_seq_lengths")])
        kwargs["key_value_seq_lengths"] = lens.cuda()
        ref_kwargs["key_value_seq_lengths"] = lens.numpy()
    if kwargs.pop("bias", False):
        bias = torch.randn(1, 8, L, S, generator=gen)
        kwargs["bias"] = bias.to("cuda", dtype)
        ref_kwargs["bias"] = kwargs["bias"].double().cpu().numpy()
    ref_kwargs.update({n: x for n, x in kwargs.items() if not torch.is_tensor(x)})
    text = explain(q, k, v, engine="fused", **kwargs)
    assert text.startswith("engine: fused (torch's"), text
    assert explain(q, k, v, **kwargs).startswith("engine: fused"), "auto takes fused on CUDA"
    out = efficient_dot_product_attention(q, k, v, engine="fused", **kwargs)
    d_out = torch.randn(out.shape, generator=gen).to("cuda", dtype)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    numpy = [x.detach().double().cpu().numpy() for x in (q, k, v, d_out)]
    ref_out, ref_grads = reference_grads(*numpy, **ref_kwargs)
    dt = str(dtype).removeprefix("torch.")
    assert_close(out.detach().cpu().float().numpy(), ref_out, dt, "output")
    for g, n in zip(grads, ("query", "key", "value")):
        assert_close(g.cpu().float().numpy(), ref_grads[n], dt, f"d{n}", factor=4.0)


# ------------------------------------------------------------------------------------------
# The FlexAttention engine on CUDA (compiled), gradients included
# ------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flex_engine_on_cuda_matches_the_chunked_engine(dtype):
    """score_mod with a learnable captured tensor (ALiBi slopes), mask_mod, lengths, bottom-right
    causal, a bias with gradient, GQA 4:1: outputs, lse and every gradient against the chunked
    engine (float32 accumulation in both)."""
    gen = torch.Generator().manual_seed(5)
    host = [torch.randn(2, n, h, 64, generator=gen) for n, h in ((600, 8), (900, 2), (900, 2))]
    results = {}
    for engine in ("flex", "chunked"):
        q, k, v = (x.to("cuda", dtype).requires_grad_() for x in host)
        slopes = torch.linspace(0.05, 0.4, 8, device="cuda", requires_grad=True)
        bias = (0.1 * torch.randn(1, 8, 600, 900, generator=gen)).to("cuda", dtype).requires_grad_()

        def alibi(s, b, h, i, j, slopes=slopes):
            return s - slopes[h] * (i - j).abs()

        kw = dict(
            score_mod=alibi, mask_mod=lambda b, h, i, j: (i + j) % 7 != 0, is_causal=True,
            causal_alignment="bottom_right", key_value_seq_lengths=torch.tensor([900, 333], device="cuda"),
        )  # fmt: skip
        out, lse = efficient_dot_product_attention(q, k, v, bias=bias, engine=engine, return_lse=True, **kw)
        d_out = torch.randn(out.shape, generator=gen).to("cuda", dtype)
        grads = torch.autograd.grad((out * d_out).sum() + lse.sum(), (q, k, v, bias, slopes))
        results[engine] = [out, lse, *grads]
    tol = 2e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(*results.values()):
        scale = b.float().abs().max().clamp(min=1.0)
        assert float((a.float() - b.float()).abs().max() / scale) < tol
