"""JAX kernel defects of issue 10: gradients through closures of score_mod/mask_mod (1), extreme
finite logits (5a), checked results of user callables (6), no inf under ``jax.debug_infs`` (10)
and empty lengths and batches (13/14). Every value is checked against a float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention.jax import dot_product_attention as dpa  # noqa: E402
from memory_efficient_attention.jax import efficient_dot_product_attention as attention  # noqa: E402

from .cases import assert_close  # noqa: E402
from .reference import reference_attention, reference_grads  # noqa: E402

CHUNKS = dict(query_chunk_size=8, key_chunk_size=8)


def _inputs(seed, batch=2, q_len=20, kv_len=20, heads=4, kv_heads=4, depth=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, depth))
    k = rng.standard_normal((batch, kv_len, kv_heads, depth))
    v = rng.standard_normal((batch, kv_len, kv_heads, depth))
    d_out = rng.standard_normal((batch, q_len, heads, depth))
    return q, k, v, d_out


def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _distance(q_len, kv_len):
    return np.abs(np.arange(q_len)[:, None] - np.arange(kv_len)[None, :]).astype(np.float64)


# ------------------------------------------------------------------------------------------------
# 1: closures over traced values in score_mod / mask_mod
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_score_mod_closure_over_traced_slopes_gets_the_bias_gradient(jit):
    q, k, v, d_out = _inputs(0)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    dist = _distance(20, 20)

    def with_mod(slopes, q, k, v):
        def alibi(s, b, h, q_idx, kv_idx):
            return s - slopes[h] * jnp.abs(q_idx - kv_idx).astype(s.dtype)

        out = attention(q, k, v, score_mod=alibi, **CHUNKS)
        return jnp.sum(out * d_out)

    def with_bias(slopes, q, k, v):
        bias = -slopes[:, None, None] * jnp.asarray(dist, slopes.dtype)  # [H, L, S]
        return jnp.sum(attention(q, k, v, bias=bias, **CHUNKS) * d_out)

    args = (jnp.asarray(slopes, jnp.float32), *_f32(q, k, v))
    grad_mod = jax.grad(with_mod, argnums=(0, 1, 2, 3))
    grad_bias = jax.grad(with_bias, argnums=(0, 1, 2, 3))
    if jit:
        grad_mod, grad_bias = jax.jit(grad_mod), jax.jit(grad_bias)
    got, dense = grad_mod(*args), grad_bias(*args)

    bias = -slopes[:, None, None] * dist
    _, ref = reference_grads(q, k, v, d_out, bias=bias)
    d_slopes = -np.einsum("hls,ls->h", ref["bias"], dist)
    for name, g, d, r in zip(("slopes", "query", "key", "value"), got, dense, [d_slopes, *ref.values()]):
        assert_close(g, r, "float32", f"d {name}")
        assert_close(g, d, "float32", f"d {name} (dense bias)")


def test_learnable_scalar_in_score_mod_closure_matches_finite_differences():
    q, k, v, d_out = _inputs(1)

    def loss(temperature):
        out = attention(*_f32(q, k, v), score_mod=lambda s, b, h, i, j: s * temperature, **CHUNKS)
        return jnp.sum(out.astype(jnp.float64) * d_out)

    t, eps = 0.7, 1e-5
    got = jax.grad(loss)(jnp.float32(t))

    def ref_loss(t):
        return float(np.sum(reference_attention(q, k, v, score_mod=lambda s, b, h, i, j: s * t) * d_out))

    expected = (ref_loss(t + eps) - ref_loss(t - eps)) / (2 * eps)
    assert_close(got, expected, "float32", "d temperature")
    # the native autodiff sees the closure too
    native = jax.grad(
        lambda t: jnp.sum(
            attention(*_f32(q, k, v), score_mod=lambda s, b, h, i, j: s * t, autodiff="native", **CHUNKS)
            * d_out
        )
    )(jnp.float32(t))
    assert_close(native, expected, "float32", "d temperature (native)")


def test_mask_mod_closure_over_traced_values_under_grad_and_jit():
    q, k, v, d_out = _inputs(2)
    window = 3.0

    def loss(q, k, v, window):
        def band(b, h, q_idx, kv_idx):
            return jnp.abs(q_idx - kv_idx).astype(window.dtype) <= window

        return jnp.sum(attention(q, k, v, mask_mod=band, **CHUNKS) * d_out)

    def ref_band(b, h, q_idx, kv_idx):
        return np.abs(q_idx - kv_idx) <= window

    _, ref = reference_grads(q, k, v, d_out, mask_mod=ref_band)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    for g in (grad, jax.jit(grad)):
        got = g(*_f32(q, k, v), jnp.float32(window))
        for name, x in zip(("query", "key", "value"), got):
            assert_close(x, ref[name], "float32", f"d {name}")
    # a traced window that depends on the differentiated input: no tracer leaks, no gradient
    d_win = jax.grad(loss, argnums=3)(*_f32(q, k, v), jnp.float32(window))
    assert float(d_win) == 0.0


# ------------------------------------------------------------------------------------------------
# 5a: extreme but finite logits
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunks", [{}, CHUNKS], ids=["one-chunk", "chunked"])
def test_extreme_finite_logits_stay_finite_and_match_dense(depth, chunks):
    # Scores ~1e9..1e10 in float32 (1 ulp = 512..1024): each row has one clear maximum (the
    # next key is ~1e7 lower), so dense float64 attention picks one value per row.
    rng = np.random.default_rng(3)
    sign = np.where(rng.random((1, 40, 2, 1)) < 0.5, -1.0, 1.0)
    q = np.round(sign * rng.uniform(0.5, 1.0, (1, 40, 2, 1)) * 1e5) * np.ones((1, 1, 1, depth))
    k = np.round(rng.permutation(np.linspace(3.5e4, 7e4, 40)).reshape(1, 40, 1, 1) * np.ones((1, 1, 2, 1)))
    k = k * np.ones((1, 1, 1, depth))
    v, d_out = rng.standard_normal((1, 40, 2, depth)), rng.standard_normal((1, 40, 2, depth))
    qf, kf, vf = _f32(q, k, v)
    assert np.array_equal(np.asarray(qf, np.float64), q) and np.array_equal(np.asarray(kf, np.float64), k)
    kwargs = dict(scale=1.0, **chunks)

    out = attention(qf, kf, vf, **kwargs)
    ref_out, ref = reference_grads(q, k, v, d_out, scale=1.0)
    assert_close(out, ref_out, "float32", "out")
    assert_close(out, reference_attention(q, k, v, scale=1.0), "float32", "out (numpy)")
    grads = jax.grad(lambda *x: jnp.sum(attention(*x, **kwargs) * d_out), argnums=(0, 1, 2))(qf, kf, vf)
    # d query is (dP - D) @ K: float32 rounding of dP - D (~1e-7) times |K| ~ 7e4; so relative
    # to the size of the other operand (as dense float32 attention would be)
    for name, g, size in zip(("query", "key", "value"), grads, (np.abs(k).max(), np.abs(q).max(), 1.0)):
        assert_close(np.asarray(g, np.float64) / size, ref[name] / size, "float32", f"d {name}")
    # the drop-in too
    out_dpa = dpa(qf, kf, vf, scale=1.0)
    assert_close(out_dpa, ref_out, "float32", "drop-in out")


# ------------------------------------------------------------------------------------------------
# 6: results of user callables are checked
# ------------------------------------------------------------------------------------------------


def test_mask_mod_returning_nothing_is_named():
    q, k, v = _f32(*_inputs(4)[:3])

    def forgot_return(b, h, q_idx, kv_idx):
        q_idx >= kv_idx  # noqa: B015

    with pytest.raises(TypeError, match=r"mask_mod returned None.*forget `return`"):
        attention(q, k, v, mask_mod=forgot_return, **CHUNKS)


def test_mask_mod_python_bool_broadcasts():
    q, k, v, _ = _inputs(5)
    out = attention(*_f32(q, k, v), mask_mod=lambda *a: True, **CHUNKS)
    assert_close(out, reference_attention(q, k, v), "float32", "out")


def test_mask_mod_float_result_is_a_type_error():
    q, k, v = _f32(*_inputs(4)[:3])
    with pytest.raises(TypeError, match="mask_mod must return a bool"):
        attention(q, k, v, mask_mod=lambda b, h, i, j: (i - j).astype(jnp.float32), **CHUNKS)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("score_mod", dict(score_mod=lambda s, b, h, i, j: s[..., :3])),
        ("bias_calc_fn", dict(bias_calc_fn=lambda q0, k0, bias, w, data: jnp.zeros((2, 4, 3, 5)))),
        ("mask_calc_fn", dict(mask_calc_fn=lambda q0, k0, mask, w, data: jnp.ones((2, 4, 3, 5), bool))),
        ("weights_calc_fn", dict(weights_calc_fn=lambda q0, k0, w, data: w[..., :3])),
    ],
)
def test_wrong_shaped_callable_result_names_the_callable(name, kwargs):
    q, k, v = _f32(*_inputs(4)[:3])
    with pytest.raises(AttentionInputError, match=rf"{name} returned shape .* does not broadcast"):
        attention(q, k, v, **kwargs, **CHUNKS)


def test_weights_calc_fn_result_with_one_head_broadcasts_across_heads():
    q, k, v, _ = _inputs(6)
    # every head takes head 0's scores ([B, lc, 1, kc]), each with its own values
    out = attention(*_f32(q, k, v), weights_calc_fn=lambda q0, k0, w, data: w[..., :1, :], **CHUNKS)
    q0 = np.broadcast_to(q[:, :, :1], q.shape)
    k0 = np.broadcast_to(k[:, :, :1], k.shape)
    p = reference_attention(q0, k0, np.eye(20)[None, :, None, :].repeat(2, 0).repeat(4, 2))  # [B,L,H,S]
    expected = np.einsum("blhs,bshe->blhe", p, v)
    assert_close(out, expected, "float32", "out")


def test_bias_and_mask_calc_fn_may_return_none():
    q, k, v, _ = _inputs(7)
    out = attention(
        *_f32(q, k, v),
        bias_calc_fn=lambda *a: None,
        mask_calc_fn=lambda *a: None,
        **CHUNKS,
    )
    assert_close(out, reference_attention(q, k, v), "float32", "out")


# ------------------------------------------------------------------------------------------------
# 10: no inf under jax.debug_infs
# ------------------------------------------------------------------------------------------------

_INF_CASES = {
    "plain": {},
    "causal": dict(is_causal=True),
    "kv-lengths": dict(key_value_seq_lengths=np.array([20, 9])),
    "q-lengths": dict(query_seq_lengths=np.array([20, 9])),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(_INF_CASES), ids=list(_INF_CASES))
@pytest.mark.parametrize("fn", ["drop-in", "efficient"])
def test_no_inf_under_debug_infs(fn, case, jit):
    q, k, v, d_out = _inputs(8)
    kwargs = {
        n: jnp.asarray(x, jnp.int32) if n.endswith("lengths") else x for n, x in _INF_CASES[case].items()
    }
    if fn == "efficient":
        kwargs = dict(kwargs, **CHUNKS)
        ref_kwargs = dict(_INF_CASES[case])
    else:
        ref_kwargs = dict(_INF_CASES[case])
    f = dpa if fn == "drop-in" else attention

    def loss(q, k, v):
        return jnp.sum(f(q, k, v, **kwargs) * d_out)

    run_out = (lambda *x: f(*x, **kwargs)) if not jit else jax.jit(lambda *x: f(*x, **kwargs))
    run_grad = jax.grad(loss, argnums=(0, 1, 2))
    run_grad = jax.jit(run_grad) if jit else run_grad
    with jax.debug_infs(True):
        out = run_out(*_f32(q, k, v))
        grads = run_grad(*_f32(q, k, v))
    ref_out, ref = reference_grads(q, k, v, d_out, **ref_kwargs)
    assert_close(out, ref_out, "float32", "out")
    for name, g in zip(("query", "key", "value"), grads):
        assert_close(g, ref[name], "float32", f"d {name}")


def test_drop_in_rows_with_no_key_pass_debug_infs_like_jax():
    q, k, v, d_out = _f32(*_inputs(9))
    lengths = jnp.asarray([0, 7], jnp.int32)

    def loss(f, q, k, v):
        return jnp.sum(f(q, k, v, key_value_seq_lengths=lengths) * d_out)

    with jax.debug_infs(True):
        ref = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
        ref_grads = jax.grad(loss, argnums=(1, 2, 3))(jax.nn.dot_product_attention, q, k, v)
        out, lse = dpa(q, k, v, key_value_seq_lengths=lengths, return_residual=True)
        grads = jax.grad(loss, argnums=(1, 2, 3))(dpa, q, k, v)
    _, ref_lse = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, return_residual=True)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_efficient_lse_of_a_row_with_no_key_is_still_minus_inf():
    q, k, v, _ = _inputs(10)
    lengths = np.array([20, 0])
    _, lse = attention(
        *_f32(q, k, v), key_value_seq_lengths=jnp.asarray(lengths, jnp.int32), return_lse=True, **CHUNKS
    )
    _, ref_lse = reference_attention(q, k, v, key_value_seq_lengths=lengths, return_lse=True)
    assert_close(lse, ref_lse, "float32", "lse")
    assert np.isneginf(np.asarray(lse[1])).all()


# ------------------------------------------------------------------------------------------------
# 13/14: L = 0, S = 0 and an empty batch
# ------------------------------------------------------------------------------------------------

_EMPTY = {"L=0": (2, 0, 6), "S=0": (2, 6, 0), "Z=0": (0, 6, 6)}


def _empty_inputs(shape):
    z, q_len, kv_len = shape
    rng = np.random.default_rng(11)
    q = rng.standard_normal((z, q_len, 4, 8))
    k = rng.standard_normal((z, kv_len, 2, 8))
    v = rng.standard_normal((z, kv_len, 2, 8))
    d_out = rng.standard_normal((z, q_len, 4, 8))
    return q, k, v, d_out


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fn", ["drop-in", "efficient"])
@pytest.mark.parametrize("name", list(_EMPTY))
def test_empty_lengths_and_batches(name, fn, jit):
    z, q_len, kv_len = _EMPTY[name]
    q, k, v, d_out = _empty_inputs(_EMPTY[name])
    lengths = dict(
        query_seq_lengths=jnp.full((z,), q_len, jnp.int32),
        key_value_seq_lengths=jnp.full((z,), kv_len, jnp.int32),
    )
    mask = jnp.ones((z, 4, q_len, kv_len), bool)
    if fn == "drop-in":
        kwargs = dict(mask=mask, is_causal=True, **lengths)
        f = dpa
    else:
        kwargs = dict(mask=mask, is_causal=True, bias=jnp.zeros((4, q_len, kv_len)), **lengths)
        f = attention

    def loss(q, k, v):
        return jnp.sum(f(q, k, v, **kwargs) * d_out)

    run = jax.jit(lambda *x: f(*x, **kwargs)) if jit else (lambda *x: f(*x, **kwargs))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    grad = jax.jit(grad) if jit else grad
    out = run(*_f32(q, k, v))
    grads = grad(*_f32(q, k, v))
    assert out.shape == (z, q_len, 4, 8) and out.dtype == jnp.float32
    # S = 0: no key for any row: zeros, as the reference's rule for rows with no key
    expected = np.zeros(out.shape) if kv_len == 0 else reference_attention(q, k, v, is_causal=True)
    assert_close(out, expected, "float32", "out")
    for name_, g, x in zip(("query", "key", "value"), grads, (q, k, v)):
        assert g.shape == x.shape
        assert_close(g, np.zeros(x.shape), "float32", f"d {name_}")


@pytest.mark.parametrize("name", list(_EMPTY))
def test_empty_lengths_return_lse(name):
    z, q_len, kv_len = _EMPTY[name]
    q, k, v, _ = _empty_inputs(_EMPTY[name])
    out, lse = attention(*_f32(q, k, v), return_lse=True)
    assert lse.shape == (z, q_len, 4)
    assert np.isneginf(np.asarray(lse)).all()  # no key at all (vacuous where empty)
    assert out.shape == (z, q_len, 4, 8)
    out, lse = dpa(*_f32(q, k, v), return_residual=True)
    assert lse.shape == (z, q_len, 4) and out.shape == (z, q_len, 4, 8)
    if z and q_len:
        assert np.isneginf(np.asarray(lse)).all()  # as jax: no key at all
        assert not np.asarray(out).any()


def test_empty_length_chunked_under_vmap():
    q, k, v, _ = _empty_inputs((3, 6, 0))
    out = jax.vmap(lambda q, k, v: attention(q, k, v, **CHUNKS))(*_f32(q, k, v))
    assert out.shape == (3, 6, 4, 8) and not np.asarray(out).any()
    assert math.prod(out.shape) > 0
