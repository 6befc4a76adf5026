"""Attention sinks (``sinks=[H]``): one extra logit per head in every row's softmax, with no value.
Both frameworks against a float64 reference that appends the sink as a column of the scores,
outputs, lse and gradients (the sinks' too), with masks, GQA and fully masked rows; parity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memory_efficient_attention._spec import AttentionInputError

from .cases import assert_close
from .reference import structured_keep

torch = pytest.importorskip("torch")


def reference(q, k, v, sinks, *, keep=None):
    """Dense float64 attention with a sink column: ``(out [B, L, H, E], lse [B, L, H])``."""
    q, k, v, sinks = (
        x.double() if torch.is_tensor(x) else torch.tensor(np.asarray(x, np.float64))
        for x in (q, k, v, sinks)
    )
    g = q.shape[-2] // k.shape[-2]
    kr, vr = k.repeat_interleave(g, -2), v.repeat_interleave(g, -2)
    s = torch.einsum("blhd,bshd->bhls", q, kr) / math.sqrt(q.shape[-1])
    if keep is not None:
        s = s.masked_fill(~torch.as_tensor(keep), -math.inf)
    sink = sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    full = torch.cat([s, sink], dim=-1)
    p = full.softmax(-1)[..., :-1]
    return torch.einsum("bhls,bshe->blhe", p, vr), full.logsumexp(-1).transpose(1, 2)


KWARGS = [
    {},
    {"is_causal": True},
    {"is_causal": True, "causal_alignment": "bottom_right", "local_window_size": (3, 0)},
    {"key_value_seq_lengths": [11, 0]},  # the second batch element has no key: its rows output 0
]


def _inputs(L=9, S=11, H=4, K=2, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s) for s in ((2, L, H, 8), (2, S, K, 8), (2, S, K, 6)))
    return q, k, v, rng.standard_normal(H) * 2


def _keep(kwargs, L, S, H):
    structure = {n: (np.asarray(x) if isinstance(x, list) else x) for n, x in kwargs.items()}
    return structured_keep((2,), H, L, S, **structure)


@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda kw: "-".join(kw) or "plain")
@pytest.mark.parametrize("engine", ["auto", "chunked"])
def test_torch_sinks_match_the_reference(kwargs, engine):
    from memory_efficient_attention.torch import efficient_dot_product_attention as attention

    q, k, v, sinks = _inputs()
    keep = _keep(kwargs, 9, 11, 4)
    ref_out, ref_lse = reference(q, k, v, sinks, keep=keep)
    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
    targs = {n: (torch.tensor(x) if isinstance(x, list) else x) for n, x in kwargs.items()}
    out, lse = attention(*leaves[:3], sinks=leaves[3], return_lse=True, engine=engine, **targs)
    assert_close(out.detach().numpy(), ref_out.numpy(), "float64", "out")
    assert_close(lse.detach().numpy(), ref_lse.numpy(), "float64", "lse")
    d_out = torch.randn_like(out)
    got = torch.autograd.grad((out * d_out).sum() + lse.sum(), leaves)
    ref_leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
    r_out, r_lse = reference(*ref_leaves, keep=keep)
    r_lse = torch.where(torch.isinf(r_lse), torch.zeros_like(r_lse), r_lse)
    want = torch.autograd.grad((r_out * d_out).sum() + r_lse.sum(), ref_leaves)
    for g, w, name in zip(got, want, ("q", "k", "v", "sinks")):
        assert_close(g.numpy(), w.numpy(), "float64", f"d{name}")
    if "key_value_seq_lengths" in kwargs:
        assert torch.all(out[1] == 0)


@pytest.mark.parametrize("kwargs", KWARGS, ids=lambda kw: "-".join(kw) or "plain")
def test_jax_sinks_match_the_reference_and_torch(kwargs):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from memory_efficient_attention.jax import efficient_dot_product_attention as attention

    jax.config.update("jax_enable_x64", True)
    q, k, v, sinks = _inputs(seed=1)
    keep = _keep(kwargs, 9, 11, 4)
    ref_out, ref_lse = reference(q, k, v, sinks, keep=keep)
    jargs = {n: (jnp.asarray(x) if isinstance(x, list) else x) for n, x in kwargs.items()}
    out, lse = attention(q, k, v, sinks=sinks, return_lse=True, **jargs)
    assert_close(np.asarray(out), ref_out.numpy(), "float64", "out")
    assert_close(np.asarray(lse), ref_lse.numpy(), "float64", "lse")

    def loss(q, k, v, sinks):
        return jnp.sum(attention(q, k, v, sinks=sinks, **jargs) ** 2)

    got = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
    ref_leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v, sinks)]
    want = torch.autograd.grad(reference(*ref_leaves, keep=keep)[0].square().sum(), ref_leaves)
    for g, w, name in zip(got, want, ("q", "k", "v", "sinks")):
        assert_close(np.asarray(g), w.numpy(), "float64", f"d{name}")
    from memory_efficient_attention.torch import efficient_dot_product_attention as torch_attention

    targs = {n: (torch.tensor(x) if isinstance(x, list) else x) for n, x in kwargs.items()}
    t_out = torch_attention(*(torch.tensor(x) for x in (q, k, v)), sinks=torch.tensor(sinks), **targs)
    np.testing.assert_allclose(np.asarray(out), t_out.numpy(), atol=1e-12)


def test_sinks_are_checked_before_computing():
    from memory_efficient_attention.torch import efficient_dot_product_attention as attention

    q = torch.randn(1, 5, 4, 8)
    with pytest.raises(AttentionInputError, match=r"sinks has shape \(2\), but needs \(4\) = \[H\]"):
        attention(q, q, q, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match="sinks must be a torch.Tensor"):
        attention(q, q, q, sinks=[0.0] * 4)
    jnp = pytest.importorskip("jax.numpy")
    from memory_efficient_attention.jax import efficient_dot_product_attention as jax_attention

    with pytest.raises(AttentionInputError, match=r"sinks has shape \(1, 4\)"):
        jax_attention(
            jnp.ones((1, 5, 4, 8)), jnp.ones((1, 5, 4, 8)), jnp.ones((1, 5, 4, 8)), sinks=jnp.zeros((1, 4))
        )


def test_low_precision_sinks_match_float64():
    from memory_efficient_attention.torch import efficient_dot_product_attention as attention

    q, k, v, sinks = _inputs(L=40, S=40, seed=2)
    ref_out, _ = reference(q, k, v, sinks, keep=_keep({"is_causal": True}, 40, 40, 4))
    for dtype in ("bfloat16", "float32"):
        dt = getattr(torch, dtype)
        out = attention(
            *(torch.tensor(x).to(dt) for x in (q, k, v)), sinks=torch.tensor(sinks).to(dt), is_causal=True
        )
        assert out.dtype == dt
        np.testing.assert_allclose(
            out.double().numpy(), ref_out.numpy(), atol=3e-2 if dtype == "bfloat16" else 1e-5
        )
