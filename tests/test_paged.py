"""Paged KV caches in the seed-layout functions (``block_table=``), both frameworks, float64: the
output equals the call on the explicitly gathered keys (and a dense reference), gradients flow back
into the page pools (each page's gradient the sum over the rows that read it), GQA, a page shared
by two rows, and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from memory_efficient_attention import AttentionInputError

from .backends import BACKENDS, load

P, PAGE, K, H, D, E = 9, 4, 2, 4, 8, 6
TABLE = np.array([[5, 0, 7], [2, 5, 1]])  # page 5 is shared by both rows
LENGTHS = np.array([10, 7])


def _inputs():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, H, D))  # [B, L, H, D]: a 3-token decoding step
    kp = rng.standard_normal((P, PAGE, K, D))
    vp = rng.standard_normal((P, PAGE, K, E))
    d_out = rng.standard_normal((2, 3, H, E))
    return q, kp, vp, d_out


def _dense(q, k, v, lengths):
    """Causal attention aligned to the last of the ``S`` keys (bottom-right), over each row's
    first ``lengths[b]`` keys (numpy)."""
    out = np.zeros((*q.shape[:-1], v.shape[-1]))
    for b in range(q.shape[0]):
        n, L, S = lengths[b], q.shape[1], k.shape[1]
        kk, vv = np.repeat(k[b, :n], H // K, axis=1), np.repeat(v[b, :n], H // K, axis=1)
        s = np.einsum("lhd,shd->hls", q[b], kk) / np.sqrt(D)
        s = np.where(np.arange(n)[None, None] <= np.arange(L)[None, :, None] + S - L, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b] = np.einsum("hls,she->lhe", p / p.sum(-1, keepdims=True), vv)
    return out


def _run(backend, q, k, v, d_out, **kw):
    """(out, dq, dk, dv) as float64 numpy."""
    if backend == "torch":
        import torch

        from memory_efficient_attention.torch import efficient_dot_product_attention as fn

        leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
        kw = {n: torch.as_tensor(x) for n, x in kw.items()}
        out = fn(*leaves, is_causal=True, causal_alignment="bottom_right", **kw)
        grads = torch.autograd.grad(out, leaves, torch.tensor(d_out))
        return [x.detach().numpy() for x in (out, *grads)]
    import jax
    import jax.numpy as jnp

    from memory_efficient_attention.jax import efficient_dot_product_attention as fn

    jax.config.update("jax_enable_x64", True)
    kw = {n: jnp.asarray(x) for n, x in kw.items()}
    f = lambda q, k, v: fn(q, k, v, is_causal=True, causal_alignment="bottom_right", **kw)  # noqa: E731
    out, vjp = jax.vjp(f, *(jnp.asarray(x) for x in (q, k, v)))
    return [np.asarray(x) for x in (out, *vjp(jnp.asarray(d_out)))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_cache_equals_the_gathered_keys(backend):
    load(backend)
    q, kp, vp, d_out = _inputs()
    k, v = kp[TABLE].reshape(2, -1, K, D), vp[TABLE].reshape(2, -1, K, E)
    out, dq, dkp, dvp = _run(backend, q, kp, vp, d_out, key_value_seq_lengths=LENGTHS, block_table=TABLE)
    want, wq, wk, wv = _run(backend, q, k, v, d_out, key_value_seq_lengths=LENGTHS)
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(out, _dense(q, k, v, LENGTHS), atol=1e-12)
    np.testing.assert_allclose(dq, wq, atol=1e-12)
    # each page's gradient: the sum over the rows (and positions) that read it
    want_dkp, want_dvp = np.zeros_like(kp), np.zeros_like(vp)
    np.add.at(want_dkp, TABLE, wk.reshape(2, 3, PAGE, K, D))
    np.add.at(want_dvp, TABLE, wv.reshape(2, 3, PAGE, K, E))
    np.testing.assert_allclose(dkp, want_dkp, atol=1e-12)
    np.testing.assert_allclose(dvp, want_dvp, atol=1e-12)
    assert np.abs(dkp[5]).sum() > 0 and np.abs(dkp[3]).sum() == 0  # shared page read, unused page not


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_block_tables_are_refused(backend):
    load(backend)
    q, kp, vp, d_out = _inputs()
    with pytest.raises(AttentionInputError, match=r"block_table has shape \(3\), but needs \(2, n\)"):
        _run(backend, q, kp, vp, d_out, block_table=np.array([0, 1, 2]))
    with pytest.raises(AttentionInputError, match="page indices from 0 to 9, but the pools have 9 pages"):
        _run(backend, q, kp, vp, d_out, block_table=np.array([[0, 9], [1, 2]]))
    with pytest.raises(AttentionInputError, match="block_table must hold integers"):
        _run(backend, q, kp, vp, d_out, block_table=np.array([[0.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(AttentionInputError, match="page pools"):
        _run(backend, q, kp[None], vp[None], d_out, block_table=TABLE)
