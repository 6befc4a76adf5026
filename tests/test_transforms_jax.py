"""Every JAX transform of the chunked kernel, in float64 against dense attention.

jit, vmap over any axis, grad, grad of grad (default ``custom_vjp``), and forward mode (jvp,
jacfwd, hessian, linearize) with ``autodiff="native"``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memory_efficient_attention.jax import efficient_dot_product_attention as attention

CHUNKS = dict(query_chunk_size=4, key_chunk_size=5)


def dense(q, k, v, bias=None, *, is_causal=False, logits_soft_cap=None):
    groups = q.shape[-2] // k.shape[-2]
    k = jnp.repeat(k, groups, axis=-2)
    v = jnp.repeat(v, groups, axis=-2)
    s = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
    if logits_soft_cap:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    if bias is not None:
        s = s + bias
    if is_causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(s, axis=-1), v)


@pytest.fixture()
def inputs():
    rng = np.random.default_rng(0)
    shapes = [(2, 11, 2, 4), (2, 13, 1, 4), (2, 13, 1, 3), (2, 1, 11, 13)]
    return tuple(jnp.asarray(rng.standard_normal(s), jnp.float64) for s in shapes)


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("features", [dict(), dict(is_causal=True), dict(logits_soft_cap=1.5)])
def test_grad_of_grad_matches_dense(inputs, features):
    q, k, v, b = inputs

    def second(fn):
        def loss(q, k, v, b):
            grads = jax.grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2, 3))(q, k, v, b)
            return sum((g**2).sum() for g in grads)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, b)

    ours = second(jax.jit(lambda q, k, v, b: attention(q, k, v, bias=b, **CHUNKS, **features)))
    ref = second(lambda q, k, v, b: dense(q, k, v, b, **features))
    for a, r in zip(ours, ref, strict=True):
        close(a, r, 1e-8)


@pytest.mark.parametrize("features", [dict(), dict(is_causal=True), dict(logits_soft_cap=1.5)])
def test_forward_mode_with_native_autodiff(inputs, features):
    q, k, v, b = inputs
    rng = np.random.default_rng(1)
    tangents = tuple(jnp.asarray(rng.standard_normal(x.shape)) for x in inputs)

    def ours(q, k, v, b):
        return attention(q, k, v, bias=b, autodiff="native", **CHUNKS, **features)

    out, tan = jax.jvp(ours, inputs, tangents)
    ref_out, ref_tan = jax.jvp(lambda q, k, v, b: dense(q, k, v, b, **features), inputs, tangents)
    close(out, ref_out)
    close(tan, ref_tan)
    close(jax.jacfwd(lambda q: ours(q, k, v, b))(q), jax.jacrev(lambda q: dense(q, k, v, b, **features))(q))
    _, lin = jax.linearize(lambda q: ours(q, k, v, b), q)
    _, ref_lin = jax.linearize(lambda q: dense(q, k, v, b, **features), q)
    close(lin(tangents[0]), ref_lin(tangents[0]))


def test_hessian_with_native_autodiff(inputs):
    q, k, v, b = inputs

    def loss(fn):
        return lambda x: (fn(q.at[0, :2, 0].set(x), k, v, b) ** 2).sum()

    ours = jax.hessian(
        loss(lambda q, k, v, b: attention(q, k, v, bias=b, autodiff="native", is_causal=True, **CHUNKS))
    )
    ref = jax.hessian(loss(lambda q, k, v, b: dense(q, k, v, b, is_causal=True)))
    close(ours(q[0, :2, 0]), ref(q[0, :2, 0]), 1e-9)


def test_default_autodiff_refuses_forward_mode_clearly(inputs):
    q, k, v, _ = inputs
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda q: attention(q, k, v, **CHUNKS), (q,), (q,))


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_vmap_over_any_axis(inputs, axis):
    q, k, v, b = inputs
    qs = jnp.stack([q, 2 * q, -q], axis=axis)
    out = jax.vmap(lambda q: attention(q, k, v, bias=b, is_causal=True, **CHUNKS), in_axes=axis)(qs)
    for n in range(3):
        close(out[n], dense(jnp.take(qs, n, axis=axis), k, v, b, is_causal=True))


def test_vmap_of_grad_and_jit(inputs):
    q, k, v, b = inputs
    biases = jnp.stack([b, 2 * b])
    grads = jax.jit(jax.vmap(jax.grad(lambda b: attention(q, k, v, bias=b, **CHUNKS).sum())))(biases)
    for bias, grad in zip(biases, grads, strict=True):
        close(grad, jax.grad(lambda b: dense(q, k, v, b).sum())(bias))
