"""``return_weights=True``: the attention probabilities ``[B..., H, L, S]`` of both seed functions
against the float64 reference (every row sums to 1 or is 0; masks, bias, score_mod, sinks), with
gradients, and JAX-vs-PyTorch parity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from .cases import ALL_CASES, assert_close, make_inputs
from .reference import reference_attention_torch

torch = pytest.importorskip("torch")

CASES = [c for c in ALL_CASES if c.dtype == "float64" and c.name in (
    "basic", "no_batch", "gqa", "mask_bias", "masked_rows", "causal", "window_int", "segments_sorted",
    "lengths", "score_mod_alibi", "decoding", "cross",
)][:10]  # fmt: skip


def _reference_weights(case, x):
    """Dense float64 probabilities from the reference's own pipeline, via one-hot values."""
    q = torch.tensor(x["query"])
    k = torch.tensor(x["key"])
    S = k.shape[-3]
    eye = torch.eye(S, dtype=torch.float64)
    v = eye.view(*(1,) * (k.dim() - 3), S, 1, S).expand(*k.shape[:-1], S)
    bias = None if x["bias"] is None else torch.tensor(x["bias"])
    mask = None if x["mask"] is None else torch.tensor(x["mask"])
    from .reference import mask_value_for

    out = reference_attention_torch(
        q, k, v, mask=mask, bias=bias, mask_value=mask_value_for(case.dtype), **x["kwargs"]
    )
    return out.movedim(-2, -3)  # [B..., H, L, S]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_torch_weights_match_the_reference(case):
    from memory_efficient_attention.torch import efficient_dot_product_attention as attention

    from .test_torch import tensor, torch_kwargs

    x = make_inputs(case)
    q, k, v = (tensor(x[n], case.dtype) for n in ("query", "key", "value"))
    mask = None if x["mask"] is None else torch.as_tensor(x["mask"])
    chunks = dict(query_chunk_size=case.q_chunk, key_chunk_size=case.k_chunk)
    bias = tensor(x["bias"], case.dtype)
    out, weights = attention(q, k, v, mask, bias, return_weights=True, **chunks, **torch_kwargs(x["kwargs"]))
    assert weights.shape == (*case.batch, case.H, case.L, case.S)
    assert_close(weights.numpy(), _reference_weights(case, x).numpy(), case.dtype, "weights")
    # the weights reproduce the output
    vr = v.repeat_interleave(case.H // case.K, -2).movedim(-2, -3)
    assert_close(torch.einsum("...hls,...hse->...lhe", weights, vr).numpy(), out.numpy(), case.dtype, "out")


def test_weights_with_sinks_gradients_and_jax_parity():
    jax = pytest.importorskip("jax")
    from memory_efficient_attention.jax import efficient_dot_product_attention as jax_attention
    from memory_efficient_attention.torch import efficient_dot_product_attention as attention

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s) for s in ((2, 9, 4, 8), (2, 13, 2, 8), (2, 13, 2, 8)))
    sinks = rng.standard_normal(4)
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    tk, tv, ts = torch.tensor(k), torch.tensor(v), torch.tensor(sinks)
    keep = torch.ones(9, 13, dtype=torch.bool).tril(13 - 9)

    def dense(tq):  # probabilities with the sink column, the sink's share dropped
        s = torch.einsum("blhd,bshd->bhls", tq, tk.repeat_interleave(2, 2)) / math.sqrt(8)
        full = torch.cat([s.masked_fill(~keep, -math.inf), ts.view(1, 4, 1, 1).expand(2, 4, 9, 1)], -1)
        return full.softmax(-1)[..., :-1]

    tq = torch.tensor(q, requires_grad=True)
    out, w = attention(tq, tk, tv, sinks=ts, return_weights=True, **kw)
    want = dense(tq)
    torch.testing.assert_close(w, want, atol=1e-12, rtol=1e-12)
    (g,) = torch.autograd.grad(w.square().sum(), tq)
    (g_ref,) = torch.autograd.grad(want.square().sum(), tq)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    j_out, j_w = jax_attention(q, k, v, sinks=sinks, return_weights=True, **kw)
    np.testing.assert_allclose(np.asarray(j_w), w.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(np.asarray(j_out), out.detach().numpy(), atol=1e-12)


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: c.id)
def test_jax_weights_match_the_reference(case):
    pytest.importorskip("jax")
    import jax

    from memory_efficient_attention.jax import efficient_dot_product_attention as jax_attention

    jax.config.update("jax_enable_x64", True)
    x = make_inputs(case)
    chunks = dict(query_chunk_size=case.q_chunk, key_chunk_size=case.k_chunk)
    args = (x["query"], x["key"], x["value"], x["mask"], x["bias"])
    out, weights = jax_attention(*args, return_weights=True, **chunks, **x["kwargs"])
    assert_close(np.asarray(weights), _reference_weights(case, x).numpy(), case.dtype, "weights")
