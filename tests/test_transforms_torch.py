"""Every PyTorch transform of the chunked kernel, in float64 against dense attention.

Double backward (gradgradcheck), forward mode (torch.func.jvp, jacfwd), torch.func.vmap (also of
grad and jacrev) and torch.compile. The fused SDPA kernels fail most of these; ours must not.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from memory_efficient_attention.torch import efficient_dot_product_attention as attention

CHUNKS = dict(query_chunk_size=4, key_chunk_size=5)


def dense(q, k, v, bias=None, mask=None, *, is_causal=False, logits_soft_cap=None):
    """Dense float64 attention in the seed layout with the kernel's semantics."""
    groups = q.shape[-2] // k.shape[-2]
    k = k.repeat_interleave(groups, dim=-2)
    v = v.repeat_interleave(groups, dim=-2)
    s = torch.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
    if logits_soft_cap:
        s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    if is_causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.einsum("...hqk,...khd->...qhd", s.softmax(-1), v)


@pytest.fixture()
def inputs():
    gen = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)

    # GQA (2 query heads on 1 kv head), lengths not multiples of the chunks, E != D.
    return make(2, 11, 2, 4), make(2, 13, 1, 4), make(2, 13, 1, 3), make(2, 1, 11, 13)


FEATURES = [
    dict(),
    dict(is_causal=True),
    dict(logits_soft_cap=1.5),
    dict(mask=torch.rand(11, 13, generator=torch.Generator().manual_seed(1)) > 0.4),
]


@pytest.mark.parametrize("features", FEATURES, ids=["plain", "causal", "softcap", "mask"])
def test_double_backward_gradgradcheck(features):
    # Numerical second derivatives cost (number of input elements)^2: keep them tiny, still with
    # GQA, E != D and lengths that are not multiples of the chunks (2 and 4).
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 5, 2, 3), (1, 6, 1, 3), (1, 6, 1, 2), (1, 1, 5, 6)]
    inputs = tuple(torch.randn(s, dtype=torch.float64, generator=gen, requires_grad=True) for s in shapes)
    if "mask" in features:
        features = dict(mask=torch.rand(5, 6, generator=gen) > 0.4)

    def fn(q, k, v, b):
        return attention(q, k, v, bias=b, query_chunk_size=2, key_chunk_size=4, **features)

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_double_backward_matches_dense(inputs):
    q, k, v, b = inputs
    ours = attention(q, k, v, bias=b, is_causal=True, **CHUNKS)
    ref = dense(q, k, v, b, is_causal=True)
    g_ours = torch.autograd.grad((ours**2).sum(), (q, k, v, b), create_graph=True)
    g_ref = torch.autograd.grad((ref**2).sum(), (q, k, v, b), create_graph=True)
    gg_ours = torch.autograd.grad(sum((g**2).sum() for g in g_ours), (q, k, v, b))
    gg_ref = torch.autograd.grad(sum((g**2).sum() for g in g_ref), (q, k, v, b))
    for a, r in zip(gg_ours, gg_ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("features", FEATURES, ids=["plain", "causal", "softcap", "mask"])
def test_jvp_matches_dense(inputs, features):
    primals = tuple(x.detach() for x in inputs)
    gen = torch.Generator().manual_seed(2)
    tangents = tuple(torch.randn(x.shape, dtype=x.dtype, generator=gen) for x in primals)
    out, tan = torch.func.jvp(
        lambda q, k, v, b: attention(q, k, v, bias=b, **CHUNKS, **features), primals, tangents
    )
    ref_out, ref_tan = torch.func.jvp(lambda q, k, v, b: dense(q, k, v, b, **features), primals, tangents)
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-9, atol=1e-11)


def test_jvp_of_lse_and_score_mod(inputs):
    q, k, v, _ = (x.detach() for x in inputs)
    tq = torch.ones_like(q)

    def lse(q):
        return attention(q, k, v, score_mod=lambda s, *_: 0.7 * s, return_lse=True, **CHUNKS)[1]

    def lse_ref(q):
        kk = k.repeat_interleave(2, dim=-2)
        s = 0.7 * torch.einsum("...qhd,...khd->...qhk", q, kk) / 2.0
        return torch.logsumexp(s, dim=-1)

    _, tan = torch.func.jvp(lse, (q,), (tq,))
    _, ref = torch.func.jvp(lse_ref, (q,), (tq,))
    torch.testing.assert_close(tan, ref, rtol=1e-9, atol=1e-11)


def test_jacfwd_equals_jacrev_equals_dense(inputs):
    q, k, v, _ = (x.detach() for x in inputs)
    jf = torch.func.jacfwd(lambda q: attention(q, k, v, is_causal=True, **CHUNKS))(q)
    jr = torch.func.jacrev(lambda q: attention(q, k, v, is_causal=True, **CHUNKS))(q)
    ref = torch.func.jacrev(lambda q: dense(q, k, v, is_causal=True))(q)
    torch.testing.assert_close(jf, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(jr, ref, rtol=1e-9, atol=1e-11)


def test_vmap_and_per_example_grads(inputs):
    _, k, v, b = (x.detach() for x in inputs)
    qs = torch.randn(3, 2, 11, 2, 4, dtype=torch.float64)
    out = torch.func.vmap(lambda q: attention(q, k, v, bias=b, is_causal=True, **CHUNKS))(qs)
    ref = torch.stack([dense(q, k, v, b, is_causal=True) for q in qs])
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)

    # A mapped bias gets a gradient per mapped instance.
    biases = torch.randn(3, 1, 2, 11, 13, dtype=torch.float64)
    grads = torch.func.vmap(torch.func.grad(lambda b: attention(qs[0], k, v, bias=b, **CHUNKS).sum()))(biases)
    for bias, grad in zip(biases, grads, strict=True):
        bias = bias.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(dense(qs[0], k, v, bias).sum(), bias)
        torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_torch_compile_gives_the_same_results():
    q, k, v = (torch.randn(2, 37, 4, 8, requires_grad=True) for _ in range(3))

    def fn(q, k, v):
        return attention(q, k, v, is_causal=True, query_chunk_size=16, key_chunk_size=8)

    compiled = torch.compile(fn)
    out, ref = compiled(q, k, v), fn(q, k, v)
    torch.testing.assert_close(out, ref)
    for a, r in zip(
        torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v)), strict=True
    ):
        torch.testing.assert_close(a, r)
