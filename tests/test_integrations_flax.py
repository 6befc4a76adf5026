"""Flax integration: our ``attention_fn`` against each module's default attention."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

from memory_efficient_attention.integrations.flax import dot_product_attention  # noqa: E402

B, L, S, F = 2, 12, 9, 16


def _inputs():
    kq, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kq, (B, L, F))
    y = jax.random.normal(kk, (B, S, F))
    valid = jnp.arange(L)[None, :] < jnp.array([L, 7])[:, None]  # second sequence padded
    return x, y, valid


def _linen_pair(**kw):
    return (
        nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=dot_product_attention, **kw),
        nn.MultiHeadDotProductAttention(num_heads=4, **kw),
    )


def test_linen_causal_and_padding_mask_with_grads():
    x, _, valid = _inputs()
    mask = nn.combine_masks(nn.make_causal_mask(valid), nn.make_attention_mask(valid, valid))
    ours, ref = _linen_pair()
    params = ref.init(jax.random.key(1), x, mask=mask)

    def value_and_grad(module):
        return jax.jit(jax.value_and_grad(lambda p: (module.apply(p, x, mask=mask) ** 2).sum()))(params)

    (a, ga), (b, gb) = value_and_grad(ours), value_and_grad(ref)
    assert jnp.allclose(a, b, rtol=1e-5)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert jnp.allclose(u, v, atol=1e-4, rtol=1e-4)


def test_linen_cross_attention_fully_masked_row_and_dtype():
    x, y, valid = _inputs()
    kv_valid = jnp.arange(S)[None, :] < jnp.array([S, 4])[:, None]
    mask = nn.make_attention_mask(valid, kv_valid)  # padded queries: rows with no key kept
    ours, ref = _linen_pair()
    params = ref.init(jax.random.key(1), x, y, mask=mask)
    a, b = ours.apply(params, x, y, mask=mask), ref.apply(params, x, y, mask=mask)
    assert jnp.allclose(a, b, atol=1e-5)  # including Flax's "average the values" rows
    ours16, ref16 = _linen_pair(dtype=jnp.bfloat16)
    a, b = ours16.apply(params, x, y, mask=mask), ref16.apply(params, x, y, mask=mask)
    assert a.dtype == b.dtype == jnp.bfloat16
    assert jnp.allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=5e-2)


def test_linen_dropout_uses_the_given_rng():
    x, _, _ = _inputs()
    mask = nn.make_causal_mask(jnp.ones((B, L)))
    ours, ref = _linen_pair(dropout_rate=0.5)
    params = ref.init(jax.random.key(1), x, mask=mask, deterministic=True)
    det = ours.apply(params, x, mask=mask, deterministic=True)
    assert jnp.allclose(det, ref.apply(params, x, mask=mask, deterministic=True), atol=1e-5)

    def run(seed):
        return ours.apply(params, x, mask=mask, deterministic=False, rngs={"dropout": jax.random.key(seed)})

    assert jnp.array_equal(run(3), run(3))
    assert not jnp.allclose(run(3), run(4))
    assert not jnp.allclose(run(3), det, atol=1e-3)


@pytest.mark.parametrize("with_mask", [False, True])
def test_nnx_gqa_is_causal(with_mask):
    x, _, valid = _inputs()
    layer = nnx.MultiHeadAttention(num_heads=4, num_kv_heads=2, in_features=F, decode=False, rngs=nnx.Rngs(0))
    mask = nn.make_attention_mask(valid, valid) if with_mask else None
    ref = layer(x, mask=mask, is_causal=True)
    layer.attention_fn = dot_product_attention
    ours = layer(x, mask=mask, is_causal=True)
    assert jnp.allclose(ours, ref, atol=1e-5)
    with pytest.raises(NotImplementedError, match="sow_weights"):
        layer(x, mask=mask, sow_weights=True)


def test_nnx_dropout():
    x, _, _ = _inputs()
    layer = nnx.MultiHeadAttention(
        num_heads=4,
        in_features=F,
        dropout_rate=0.5,
        decode=False,
        rngs=nnx.Rngs(0, dropout=1),
        attention_fn=dot_product_attention,
    )
    det = layer(x, deterministic=True)
    out = layer(x, deterministic=False)
    assert out.shape == det.shape and not jnp.allclose(out, det, atol=1e-3)


def test_float_mask_with_any_nonzero_values_keeps_like_flax():
    """Flax keeps a score where the mask is nonzero; the kernel itself refuses float masks with
    values other than 0/1 (an additive mask there would be inverted), so the integration hands
    it a bool mask."""
    x, _, valid = _inputs()
    scale = jax.random.uniform(jax.random.key(7), (B, 1, L, L), minval=0.5, maxval=2.0)
    mask = nn.make_attention_mask(valid, valid) * scale  # float32, values 0 and (0.5, 2)
    ours, ref = _linen_pair()
    params = ref.init(jax.random.key(1), x, mask=mask)
    assert jnp.allclose(ours.apply(params, x, mask=mask), ref.apply(params, x, mask=mask), atol=1e-5)


def test_mask_objects_are_planned_as_structured_masks():
    from memory_efficient_attention.integrations.flax import dot_product_attention
    from memory_efficient_attention.jax import efficient_dot_product_attention
    from memory_efficient_attention.masks import Causal, Window

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 20, 4, 8)) for i in range(3))
    got = dot_product_attention(q, k, v, mask=Window(3, 0))
    want = efficient_dot_product_attention(q, k, v, local_window_size=(3, 0))
    assert jnp.allclose(got, want, atol=1e-6)
    got = dot_product_attention(q, k, v, mask=Window(3, 3), is_causal=True)
    want = efficient_dot_product_attention(q, k, v, mask=Causal() & Window(3, 3))
    assert jnp.allclose(got, want, atol=1e-6)
    assert not jnp.allclose(got, dot_product_attention(q, k, v, mask=Window(3, 3)), atol=1e-3)
