"""The JAX Pallas engine (``engine="pallas"``) in interpret mode on CPU: outputs, gradients and the
lse's gradient against the float64 dense reference, on shapes whose lengths are not multiples of
the blocks, with GQA, cross-attention, value depth != key depth, every structured mask, soft cap,
``score_mod`` and ``mask_mod``, a bias with its gradient at every broadcast shape, dropout; the
TPU interpreter; plus what it refuses and how ``engine="auto"`` chooses it."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("torch")  # the float64 reference's gradients

import jax.numpy as jnp  # noqa: E402

from memory_efficient_attention import AttentionInputError  # noqa: E402

from .reference import reference_grads  # noqa: E402


def _score_mod(s, b, h, q_idx, kv_idx):  # a relative bias per head, written for both frameworks
    distance = abs(q_idx - kv_idx) * (h + 1) + 0 * s  # in the scores' dtype before the product
    return s - 0.1 * distance


def _mask_mod(b, h, q_idx, kv_idx):
    return (q_idx + kv_idx + b) % 3 != 0


# (name, batch, L, S, H, K, D, E, options, segments): lengths are in options as lists
CASES = [
    ("causal-softcap-segments-lengths", (2,), 37, 37, 4, 2, 8, 8,
     dict(is_causal=True, logits_soft_cap=2.0, query_seq_lengths=[30, 37],
          key_value_seq_lengths=[37, 19]), True),
    ("bottom-right-window-mods-cross", (2,), 21, 45, 4, 1, 8, 5,
     dict(is_causal=True, causal_alignment="bottom_right", local_window_size=(9, 0), score_mod=_score_mod,
          mask_mod=_mask_mod), False),
    ("plain-no-batch-dims", (), 23, 40, 2, 2, 8, 6, dict(), False),
]  # fmt: skip
SLOW_CASES = [
    ("two-sided-window-batch-dims", (2, 1), 33, 33, 4, 2, 8, 8, dict(local_window_size=(5, 4)), False),
    ("segments-only-gqa-4", (1,), 29, 29, 8, 2, 8, 8, dict(), True),
]


def _inputs(batch, L, S, H, K, D, E, segments, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((*batch, n, h, d)) for n, h, d in ((L, H, D), (S, K, D), (S, K, E)))
    d_out = rng.standard_normal((*batch, L, H, E))
    ids = {}
    if segments:
        ids = dict(
            query_segment_ids=np.sort(rng.integers(0, 4, (*batch, L)), axis=-1),
            key_segment_ids=np.sort(rng.integers(0, 4, (*batch, S)), axis=-1),
        )
    return q, k, v, d_out, ids


def _ours(q, k, v, d_out, d_lse, options, engine="pallas"):
    from memory_efficient_attention.jax import efficient_dot_product_attention

    jax.config.update("jax_enable_x64", True)
    kw = {n: (jnp.asarray(x) if isinstance(x, (list, np.ndarray)) else x) for n, x in options.items()}

    def f(q, k, v):
        return efficient_dot_product_attention(
            q, k, v, engine=engine, query_chunk_size=16, key_chunk_size=16, return_lse=True, **kw
        )

    (out, lse), vjp = jax.vjp(f, *(jnp.asarray(x) for x in (q, k, v)))
    fin = jnp.isfinite(lse)
    grads = vjp((jnp.asarray(d_out), jnp.where(fin, jnp.asarray(d_lse), 0.0)))
    return [np.asarray(x) for x in (out, lse, *grads)]


def _check(case):
    name, batch, L, S, H, K, D, E, options, segments = case
    q, k, v, d_out, ids = _inputs(batch, L, S, H, K, D, E, segments)
    options = {**options, **ids}
    d_lse = np.random.default_rng(1).standard_normal((*batch, L, H))
    out, lse, dq, dk, dv = _ours(q, k, v, d_out, d_lse, options)
    ref_kw = {n: (np.asarray(x) if isinstance(x, list) else x) for n, x in options.items()}
    want_out, want = reference_grads(q, k, v, d_out, **ref_kw)
    np.testing.assert_allclose(out, want_out, atol=1e-10, err_msg=name)
    for got, n in zip((dq, dk, dv), ("query", "key", "value")):
        # the reference's gradients are of sum(out * d_out) only; the lse's part comes next
        assert got.shape == want[n].shape, (name, n)
    # with d_lse = 0 the gradients equal the reference's exactly
    _, _, dq0, dk0, dv0 = _ours(q, k, v, d_out, np.zeros_like(d_lse), options)
    for got, n in zip((dq0, dk0, dv0), ("query", "key", "value")):
        np.testing.assert_allclose(got, want[n], atol=1e-10, err_msg=f"{name} d{n}")
    # the lse and its gradient: equal to the chunked engine's (tested against the reference)
    _, lse_c, dq_c, dk_c, dv_c = _ours(q, k, v, d_out, d_lse, options, engine="chunked")
    np.testing.assert_allclose(lse, lse_c, atol=1e-10, err_msg=f"{name} lse")
    for got, ref, n in zip((dq, dk, dv), (dq_c, dk_c, dv_c), "qkv"):
        np.testing.assert_allclose(got, ref, atol=1e-10, err_msg=f"{name} d{n} with the lse's gradient")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pallas_engine_matches_the_reference(case):
    _check(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=[c[0] for c in SLOW_CASES])
def test_pallas_engine_matches_the_reference_more_shapes(case):
    _check(case)


def test_pallas_float32_against_the_float64_reference():
    from memory_efficient_attention.jax import efficient_dot_product_attention

    q, k, v, _, _ = _inputs((1,), 19, 19, 2, 2, 8, 8, False)
    out = efficient_dot_product_attention(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), is_causal=True, engine="pallas"
    )
    want, _ = reference_grads(q, k, v, np.zeros((1, 19, 2, 8)), is_causal=True)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)


def test_what_the_pallas_engine_refuses_is_named():
    from memory_efficient_attention.jax import efficient_dot_product_attention

    x = jnp.ones((1, 8, 2, 4))
    with pytest.raises(AttentionInputError, match="engine='pallas' cannot run this call: it has a dense"):
        efficient_dot_product_attention(x, x, x, mask=jnp.ones((1, 2, 8, 8), bool), engine="pallas")
    with pytest.raises(AttentionInputError, match="it has the seed's per-chunk callbacks"):
        efficient_dot_product_attention(x, x, x, weights_calc_fn=lambda *a: a[2], engine="pallas")


def test_torch_refuses_the_pallas_engine():
    torch = pytest.importorskip("torch")
    from memory_efficient_attention.torch import efficient_dot_product_attention

    x = torch.ones(1, 8, 2, 4)
    with pytest.raises(AttentionInputError, match="engine='pallas' is the JAX functions'"):
        efficient_dot_product_attention(x, x, x, engine="pallas")


def test_auto_takes_pallas_only_on_validated_platforms(monkeypatch):
    from memory_efficient_attention.jax import _api, _pallas, efficient_dot_product_attention

    calls = []
    real = _pallas.pallas_attention
    monkeypatch.setattr(_pallas, "pallas_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 2, 8)), jnp.float32)
    efficient_dot_product_attention(q, q, q, engine="auto", key_chunk_size=8)  # CPU: chunked
    assert calls == []
    monkeypatch.setattr(_api, "PALLAS_AUTO_PLATFORMS", ("cpu",))
    efficient_dot_product_attention(q, q, q, engine="auto", is_causal=True, key_chunk_size=16)
    assert calls == [1]
    mask = jnp.ones((1, 2, 16, 16), bool)  # something Pallas does not cover: "auto" falls back
    efficient_dot_product_attention(q, q, q, mask=mask, engine="auto", key_chunk_size=16)
    assert calls == [1]


def test_jax_drop_in_takes_implementation_pallas():
    from memory_efficient_attention.jax import dot_product_attention

    q, k, v = jax.random.normal(jax.random.key(1), (3, 2, 40, 4, 16))
    lengths = jnp.array([40, 17], dtype=jnp.int32)
    kw = dict(is_causal=True, key_value_seq_lengths=lengths)
    out = dot_product_attention(q, k, v, implementation="pallas", **kw)
    np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v, **kw), atol=2e-6)


def test_pallas_dropout_keep_mask_has_the_right_law():
    from memory_efficient_attention.jax._pallas import dropout_keep

    seed = jax.random.key_data(jax.random.key(3))
    grid = ((2, (2, 1, 1, 1)), (4, (1, 4, 1, 1)), (96, (1, 1, 96, 1)), (96, (1, 1, 1, 96)))
    b, h, q, k = (jnp.arange(n).reshape(shape) for n, shape in grid)
    keep = np.asarray(dropout_keep(seed, 0.3, b, h, q, k))
    n = keep.size
    assert abs(keep.mean() - 0.7) < 4 * np.sqrt(0.21 / n)  # within 4 sigma of 1 - rate
    # neighbours are not correlated: P(keep both of two adjacent keys) ~ 0.49
    both = (keep[..., 1:] & keep[..., :-1]).mean()
    assert abs(both - 0.49) < 4 * np.sqrt(0.25 / keep[..., 1:].size)
    other = np.asarray(dropout_keep(jax.random.key_data(jax.random.key(4)), 0.3, b, h, q, k))
    assert 0.4 < (keep == other).mean() < 0.6 + 0.05  # another seed: another mask (~0.58 agree)


@pytest.mark.parametrize("interpreter", ["generic", pytest.param("tpu", marks=pytest.mark.slow)])
def test_pallas_dropout_forward_and_backward_use_one_mask(monkeypatch, interpreter):
    """Outputs and gradients equal dense attention with the same keep mask (float64)."""
    from memory_efficient_attention.jax import _pallas, efficient_dot_product_attention
    from memory_efficient_attention.jax._pallas import dropout_keep

    if interpreter == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        monkeypatch.setattr(_pallas, "INTERPRET_ON_CPU", pltpu.InterpretParams())

    rate, rng_key = 0.25, jax.random.key(7)
    # (another query length per interpreter: eager calls are compiled once per configuration)
    L, S = (21, 27) if interpreter == "generic" else (20, 27)
    q, k, v, d_out, _ = _inputs((2,), L, S, 4, 2, 8, 6, False)
    q, k, v, d_out = (jnp.asarray(x) for x in (q, k, v, d_out))
    seed = jax.random.key_data(rng_key)
    keep = dropout_keep(
        seed, rate, jnp.arange(2)[:, None, None, None], jnp.arange(4)[None, :, None, None],
        jnp.arange(L)[None, None, :, None], jnp.arange(S)[None, None, None, :],
    )  # fmt: skip  # [B, H, L, S]

    def dense(q, k, v):
        kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("blhd,bshd->bhls", q, kk) / np.sqrt(8)
        s = jnp.where(jnp.arange(S)[None, :] <= jnp.arange(L)[:, None] + S - L, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1) * keep / (1 - rate)
        return jnp.einsum("bhls,bshe->blhe", p, vv)

    def ours(q, k, v):
        return efficient_dot_product_attention(
            q, k, v, is_causal=True, causal_alignment="bottom_right", dropout_rate=rate,
            dropout_rng=rng_key, engine="pallas", query_chunk_size=16, key_chunk_size=16,
        )  # fmt: skip

    got_out, got_vjp = jax.vjp(ours, q, k, v)
    want_out, want_vjp = jax.vjp(dense, q, k, v)
    np.testing.assert_allclose(got_out, want_out, atol=1e-10)
    for got, want, n in zip(got_vjp(d_out), want_vjp(d_out), "qkv"):
        np.testing.assert_allclose(got, want, atol=1e-10, err_msg=f"d{n}")


def test_pallas_engine_under_the_tpu_interpreter(monkeypatch):
    """The kernels through Pallas' TPU interpreter (TPU memory spaces and semantics, as
    ``pltpu.force_tpu_interpret_mode`` runs TPU kernels) at TPU-shaped blocks (128 x 128, depth
    128): outputs and gradients equal the chunked engine's."""
    from jax.experimental.pallas import tpu as pltpu

    from memory_efficient_attention.jax import _pallas, efficient_dot_product_attention

    monkeypatch.setattr(_pallas, "INTERPRET_ON_CPU", pltpu.InterpretParams())
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((1, 200, 4, 128)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 300, 2, 128)), jnp.float32) for _ in range(2))
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (1, 300))))
    kw = dict(
        is_causal=True, causal_alignment="bottom_right", logits_soft_cap=5.0, query_chunk_size=128,
        key_chunk_size=128, query_segment_ids=ids[:, 100:], key_segment_ids=ids,
    )  # fmt: skip
    results = []
    for engine in ("pallas", "chunked"):
        f = lambda q, k, v, e=engine: efficient_dot_product_attention(q, k, v, engine=e, **kw)  # noqa: E731
        out, vjp = jax.vjp(f, q, k, v)
        results.append([out, *vjp(jnp.cos(out))])
    for got, want, name in zip(*results, ("out", "dq", "dk", "dv")):
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("shape", [(2, 4, 21, 27), (1, 4, 21, 27), (2, 1, 1, 27), (1, 4, 21, 1)],
                         ids=["full", "batch-broadcast", "key-padding-like", "per-query"])  # fmt: skip
def test_pallas_bias_gets_its_gradient_at_its_shape(shape):
    from memory_efficient_attention.jax import efficient_dot_product_attention

    q, k, v, d_out, ids = _inputs((2,), 21, 27, 4, 2, 8, 6, True)
    bias = np.random.default_rng(2).standard_normal(shape)
    # segment ids too; in row 0 two documents aligned with the 16-blocks, so blocks whose ids
    # cannot meet are skipped (their bias gradient must stay 0), in row 1 random ones
    ids["query_segment_ids"][0] = np.repeat([0, 1], [16, 5])
    ids["key_segment_ids"][0] = np.repeat([0, 1], [16, 11])
    kw = dict(is_causal=True, causal_alignment="bottom_right", logits_soft_cap=3.0, **ids)

    def f(q, k, v, b):
        return efficient_dot_product_attention(
            q, k, v, bias=b, engine="pallas", query_chunk_size=16, key_chunk_size=16, **kw
        )

    out, vjp = jax.vjp(f, *(jnp.asarray(x) for x in (q, k, v, bias)))
    grads = vjp(jnp.asarray(d_out))
    want_out, want = reference_grads(q, k, v, d_out, bias=bias, **kw)
    np.testing.assert_allclose(out, want_out, atol=1e-10)
    for got, name in zip(grads, ("query", "key", "value", "bias")):
        assert got.shape == want[name].shape, name
        np.testing.assert_allclose(got, want[name], atol=1e-10, err_msg=name)


TPU_FEATURES = {
    "bias-score_mod": dict(bias=(1, 4, 200, 300), score_mod=_score_mod),
    "mask_mod-lengths-window": dict(mask_mod=_mask_mod, local_window_size=(150, 20),
                                    query_seq_lengths=[200], key_value_seq_lengths=[250]),
    "plain-gqa": dict(),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("feature", list(TPU_FEATURES))
def test_pallas_features_under_the_tpu_interpreter(monkeypatch, feature):
    """More of the score pipeline through the TPU interpreter (slow: ~20 s each)."""
    from jax.experimental.pallas import tpu as pltpu

    from memory_efficient_attention.jax import _pallas, efficient_dot_product_attention

    monkeypatch.setattr(_pallas, "INTERPRET_ON_CPU", pltpu.InterpretParams())
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.standard_normal((1, 200, 4, 128)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 300, 2, 128)), jnp.float32) for _ in range(2))
    kw = dict(TPU_FEATURES[feature])
    bias = kw.pop("bias", None)
    bias = None if bias is None else jnp.asarray(rng.standard_normal(bias), jnp.float32)
    kw = {n: (jnp.asarray(x) if isinstance(x, list) else x) for n, x in kw.items()}
    results = []
    for engine in ("pallas", "chunked"):

        def f(q, k, v, b, e=engine):
            return efficient_dot_product_attention(
                q, k, v, bias=b, engine=e, query_chunk_size=128, key_chunk_size=128, **kw
            )

        args = (q, k, v, bias) if bias is not None else (q, k, v)
        g = f if bias is not None else (lambda q, k, v, f=f: f(q, k, v, None))
        out, vjp = jax.vjp(g, *args)
        results.append([out, *vjp(jnp.cos(out))])
    for got, want, name in zip(*results, ("out", "dq", "dk", "dv", "dbias")):
        np.testing.assert_allclose(got, want, atol=3e-5, err_msg=name)
