"""Issue 10, the JAX public functions (``efficient_dot_product_attention`` and the drop-in
``dot_product_attention``): value depth, ``implementation="cudnn"``, array and traced scales,
numeric masks, eager-call compilation caching and empty shapes. Compared with
``jax.nn.dot_product_attention`` and the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention.jax import _api  # noqa: E402
from memory_efficient_attention.jax import dot_product_attention as dpa  # noqa: E402
from memory_efficient_attention.jax import efficient_dot_product_attention as attention  # noqa: E402

from .reference import reference_attention  # noqa: E402

B, L, S, H, D = 2, 12, 10, 4, 8


def _qkv(b=B, l=L, s=S, h=H, kh=H, d=D, e=D, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (b, l, h, d), dtype=jnp.float32),
        jax.random.normal(kk, (b, s, kh, d), dtype=jnp.float32),
        jax.random.normal(kv, (b, s, kh, e), dtype=jnp.float32),
    )


def _close(a, b, atol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=2e-5)


# ---------------------------------------------------------------- 11: value depth != key depth


def test_dropin_value_depth_other_than_key_depth_raises_like_jax():
    q, k, v = _qkv(e=12)
    with pytest.raises(ValueError):
        jax.nn.dot_product_attention(q, k, v)
    with pytest.raises(AttentionInputError, match=r"value .*\(2, 10, 4, 12\).*H=12"):
        dpa(q, k, v)
    with pytest.raises(AttentionInputError, match="value"):
        jax.jit(dpa)(q, k, v)
    # the seed-layout function supports it: against the float64 reference
    ref = reference_attention(*(np.asarray(x, np.float64) for x in (q, k, v)))
    _close(attention(q, k, v), ref, atol=1e-5)


# ---------------------------------------------------------------- 12: implementation="cudnn"


def test_cudnn_implementation_raises_like_jax_without_cudnn():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv())  # a dtype cuDNN takes, where there is one
    try:
        expected = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except RuntimeError as e:  # no cuDNN GPU backend (jax: "cuDNN is not detected.")
        with pytest.raises(RuntimeError, match="cuDNN is not detected"):
            dpa(q, k, v, implementation="cudnn")
        if jax.default_backend() != "gpu":
            assert "cuDNN is not detected" in str(e)
    else:  # a cuDNN GPU: our kernel runs in its place
        _close(
            dpa(q, k, v, implementation="cudnn").astype(jnp.float32), expected.astype(jnp.float32), atol=3e-2
        )
    with pytest.raises(ValueError, match="Unsupported implementation"):
        dpa(q, k, v, implementation="flash")


# ---------------------------------------------------------------- 15: scales jax.nn accepts


@pytest.mark.parametrize(
    "make_scale", [np.float32, np.float64, lambda x: jnp.asarray(x, jnp.float32), lambda x: np.asarray(x)]
)
def test_scale_numpy_and_jax_scalars(make_scale):
    q, k, v = _qkv()
    scale = make_scale(0.3)
    ref = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    _close(dpa(q, k, v, scale=scale), ref)
    _close(attention(q, k, v, scale=scale), ref)


@pytest.mark.parametrize("fn", ["drop-in", "seed"])
def test_traced_scale_under_jit_with_gradients(fn):
    q, k, v = _qkv()
    causal_ours = (
        (lambda q, k, v, s: dpa(q, k, v, scale=s, is_causal=True))
        if fn == "drop-in"
        else (lambda q, k, v, s: attention(q, k, v, scale=s, is_causal=True, key_chunk_size=4))
    )

    def loss(f):
        return lambda q, s: (f(q, k, v, s) ** 2).sum()

    def theirs(q, k, v, s):
        return jax.nn.dot_product_attention(q, k, v, scale=s, is_causal=True)

    scale = jnp.asarray(0.45, jnp.float32)
    out = jax.jit(causal_ours)(q, k, v, scale)
    _close(out, theirs(q, k, v, scale))
    (gq, gs) = jax.jit(jax.grad(loss(causal_ours), argnums=(0, 1)))(q, scale)
    (rq, rs) = jax.grad(loss(theirs), argnums=(0, 1))(q, scale)
    _close(gq, rq, atol=1e-4)
    _close(gs, rs, atol=1e-3)
    assert abs(float(gs)) > 1e-3  # a real gradient, not a stopped one
    # and under vmap over scales
    scales = jnp.asarray([0.2, 0.7], jnp.float32)
    batched = jax.vmap(lambda s: causal_ours(q, k, v, s))(scales)
    for i in range(2):
        _close(batched[i], theirs(q, k, v, scales[i]))


def test_array_scale_must_be_a_real_scalar():
    q, k, v = _qkv()
    with pytest.raises(AttentionInputError, match=r"scale must be a scalar.*\(2\)"):
        jax.jit(lambda s: attention(q, k, v, scale=s))(jnp.ones(2))
    with pytest.raises(AttentionInputError, match="scale"):
        jax.jit(lambda s: dpa(q, k, v, scale=s))(jnp.asarray(True))


# ---------------------------------------------------------------- 7: numeric masks in the seed API


def test_additive_float_mask_is_refused():
    q, k, v = _qkv()
    keep = jnp.tril(jnp.ones((L, S), dtype=bool))
    additive = jnp.where(keep, 0.0, -jnp.inf).astype(jnp.float32)
    with pytest.raises(AttentionInputError, match="bias="):
        attention(q, k, v, mask=additive)
    with pytest.raises(AttentionInputError, match="bias="):
        attention(q, k, v, mask=np.where(np.asarray(keep), 0.0, -1e9))
    # as a bias it is what the user meant
    _close(attention(q, k, v, bias=additive), jax.nn.dot_product_attention(q, k, v, mask=keep))


def test_zero_one_float_and_int_masks_keep_the_nonzero_rule():
    q, k, v = _qkv()
    keep = jax.random.bernoulli(jax.random.key(5), 0.6, (B, 1, L, S))
    expected = attention(q, k, v, mask=keep)
    for mask in (keep.astype(jnp.float32), keep.astype(jnp.int32), np.asarray(keep, np.float64)):
        _close(attention(q, k, v, mask=mask), expected, atol=0)
    # integer masks are not value-checked: nonzero keeps
    _close(attention(q, k, v, mask=keep.astype(jnp.int32) * 3), expected, atol=0)
    # traced: the values cannot be checked, the nonzero rule applies
    _close(jax.jit(lambda m: attention(q, k, v, mask=m))(keep.astype(jnp.float32)), expected, atol=1e-6)


# ---------------------------------------------------------------- 18: eager calls compile once


def test_repeated_eager_calls_do_not_retrace_or_recompile():
    q, k, v = _qkv()
    traces = []

    def score_mod(s, b, h, qi, ki):
        traces.append(1)  # runs only while tracing
        return s - 0.1 * jnp.abs(qi - ki)

    first = attention(q, k, v, score_mod=score_mod, key_chunk_size=4)
    n_traces = len(traces)
    assert n_traces > 0
    for _ in range(3):
        again = attention(q, k, v, score_mod=score_mod, key_chunk_size=4)
    assert len(traces) == n_traces  # not traced again
    n_cache = _api._compiled._cache_size()
    attention(q, k, v, score_mod=score_mod, key_chunk_size=4)
    assert _api._compiled._cache_size() == n_cache  # not compiled again
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
    # same result as under the user's own jit (inline), and new values reuse the executable
    _close(jax.jit(lambda q: attention(q, k, v, score_mod=score_mod, key_chunk_size=4))(q), first)
    q2 = q + 1.0
    attention(q2, k, v, score_mod=score_mod, key_chunk_size=4)
    assert _api._compiled._cache_size() == n_cache

    drop_in = dpa(q, k, v, is_causal=True)
    n_cache = _api._compiled._cache_size()
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(dpa(q, k, v, is_causal=True)), np.asarray(drop_in))
    assert _api._compiled._cache_size() == n_cache
    _close(drop_in, jax.nn.dot_product_attention(q, k, v, is_causal=True))


def test_eager_cache_keys_static_arguments_and_dropout_key():
    q, k, v = _qkv()
    a = attention(q, k, v, is_causal=True)
    b = attention(q, k, v, is_causal=False)
    _close(a, jax.nn.dot_product_attention(q, k, v, is_causal=True))
    _close(b, jax.nn.dot_product_attention(q, k, v))
    with pytest.raises(AttentionInputError, match="is_causal"):
        attention(q, k, v, is_causal=1)  # not served by the cache entry of is_causal=True
    d1 = attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
    d2 = attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(2))
    assert not np.allclose(np.asarray(d1), np.asarray(d2))  # the key is an input, not baked in
    np.testing.assert_array_equal(
        np.asarray(d1), np.asarray(attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1)))
    )


def test_closure_over_traced_value_runs_inline():
    """q, k, v are concrete (closure constants) but score_mod closes over jit's tracer: the call
    must run inline, a cached executable would keep a stale tracer."""
    q, k, v = _qkv()

    @jax.jit
    def ours(a):
        return attention(q, k, v, score_mod=lambda s, *_: s * a)

    for alpha in (0.5, 1.5):
        expected = jax.nn.dot_product_attention(q, k, v, scale=alpha / np.sqrt(D))
        _close(ours(jnp.float32(alpha)), expected)

        # under grad (q, k, v concrete, only the closure traced): inline too, with the gradient
        def loss(f, a):
            return (f(a) ** 2).sum()

        got = jax.grad(lambda a: loss(lambda a: attention(q, k, v, score_mod=lambda s, *_: s * a), a))(alpha)
        want = jax.grad(
            lambda a: loss(lambda a: jax.nn.dot_product_attention(q, k, v, scale=a / np.sqrt(D)), a)
        )(alpha)
        _close(got, want, atol=1e-3)


def test_calc_fn_data_arrays_are_inputs_of_the_cached_function():
    q, k, v = _qkv()

    def bias_calc_fn(q0, k0, bias, weights, data):
        return data["b"]

    outs = [
        attention(q, k, v, bias_calc_fn=bias_calc_fn, calc_fn_data={"b": jnp.float32(c)}, key_chunk_size=5)
        for c in (0.0, 3.0)
    ]
    _close(outs[0], outs[1])  # a constant bias does not change softmax
    ramp = jnp.arange(S, dtype=jnp.float32)

    def ramp_fn(q0, k0, bias, weights, data):
        return data * jax.lax.dynamic_slice_in_dim(ramp, k0, 5)

    for c in (0.0, 0.3):
        got = attention(q, k, v, bias_calc_fn=ramp_fn, calc_fn_data=jnp.float32(c), key_chunk_size=5)
        _close(got, jax.nn.dot_product_attention(q, k, v, bias=c * ramp))


# ---------------------------------------------------------------- 13/14: empty shapes


@pytest.mark.parametrize("empty", ["B", "L", "S"])
def test_empty_shapes_pass_through_like_jax(empty):
    b, l, s = (0 if empty == "B" else B), (0 if empty == "L" else L), (0 if empty == "S" else S)
    q, k, v = _qkv(b=b, l=l, s=s)
    out, res = dpa(q, k, v, return_residual=True)
    ref, ref_res = jax.nn.dot_product_attention(q, k, v, return_residual=True)
    assert out.shape == ref.shape and res.shape == ref_res.shape
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))  # S = 0: zeros, as jax
    np.testing.assert_array_equal(np.asarray(res), np.asarray(ref_res))  # S = 0: -inf, as jax
    seed = attention(q, k, v)
    assert seed.shape == (b, l, H, D) and not np.isnan(np.asarray(seed)).any()
    if empty == "S":
        assert not np.asarray(seed).any()
    lengths = jnp.full((b,), l, jnp.int32)
    _close(dpa(q, k, v, query_seq_lengths=lengths, is_causal=True), ref)

    def loss(f):
        return lambda q, k, v: (f(q, k, v) ** 2).sum() + f(q, k, v).sum()

    grads = jax.grad(loss(dpa), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_public_functions_are_typed():
    # py.typed ships: type checkers read these annotations (item 20)
    import typing

    for fn in (_api.efficient_dot_product_attention, _api.dot_product_attention):
        hints = typing.get_type_hints(fn)
        for name in ("query", "key", "value", "return"):
            assert name in hints and hints[name] is not typing.Any, (fn.__name__, name)
