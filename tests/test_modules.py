"""``memory_efficient_attention.torch.modules`` against a plain dense implementation."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention.torch.modules import MultiheadAttention, apply_rotary  # noqa: E402

C, H, B, L, S = 32, 4, 2, 13, 9


def dense_reference(layer: MultiheadAttention, x, kv=None, kv_lengths=None):
    """The same layer with the attention written out: ``[B, L, C]``, O(L*S) memory."""
    kv = x if kv is None else kv
    q = layer.q_proj(x).unflatten(-1, (layer.num_heads, layer.head_dim))
    k = layer.k_proj(kv).unflatten(-1, (layer.num_kv_heads, layer.head_dim))
    v = layer.v_proj(kv).unflatten(-1, (layer.num_kv_heads, layer.head_dim))
    n, m = q.shape[1], k.shape[1]
    if layer.rotary:
        q, k = apply_rotary(q, torch.arange(n)), apply_rotary(k, torch.arange(m))
    g = layer.num_heads // layer.num_kv_heads
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("blhd,bshd->bhls", q, k) / layer.head_dim**0.5
    qi, ki = torch.arange(n)[:, None], torch.arange(m)[None, :]
    if layer.alibi_slopes is not None:
        s = s + layer.alibi_slopes[:, None, None].to(s.dtype) * (ki - qi)
    keep = torch.ones(x.shape[0], 1, n, m, dtype=torch.bool)
    if layer.is_causal:
        keep = keep & (ki <= qi)
    if kv_lengths is not None:
        keep = keep & (ki < kv_lengths[:, None, None, None])
    p = s.masked_fill(~keep, float("-inf")).softmax(-1)
    out = torch.einsum("bhls,bshd->blhd", p, v).flatten(-2)
    return layer.out_proj(out)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_kv_heads=4, is_causal=True),
        dict(num_kv_heads=2, is_causal=True, rotary=True, bias=True),
        dict(num_kv_heads=1, alibi=True, is_causal=True),
        dict(num_kv_heads=2, alibi=True, rotary=True),
    ],
)
def test_matches_dense_reference_with_grads(kw):
    torch.manual_seed(0)
    layer = MultiheadAttention(C, H, key_chunk_size=4, query_chunk_size=5, dtype=torch.float64, **kw)
    x = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([L, 6])
    ours = layer(x, key_value_seq_lengths=lengths)
    ref = dense_reference(layer, x, kv_lengths=lengths)
    torch.testing.assert_close(ours, ref)
    params = [x, *layer.parameters()]
    for a, b in zip(
        torch.autograd.grad(ours.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)
    ):
        torch.testing.assert_close(a, b)


def test_cross_attention_and_dropout():
    torch.manual_seed(0)
    layer = MultiheadAttention(C, H, 2, kv_dim=24, rotary=True, dropout=0.5, dtype=torch.float64)
    x, y = torch.randn(B, L, C, dtype=torch.float64), torch.randn(B, S, 24, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x, y), dense_reference(layer, x, y))
    layer.train()
    a = layer(x, y, generator=torch.Generator().manual_seed(3))
    b = layer(x, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, layer.eval()(x, y))


def test_bad_configurations():
    with pytest.raises(AttentionInputError, match="num_kv_heads"):
        MultiheadAttention(C, 4, 3)
    with pytest.raises(AttentionInputError, match="head_dim"):
        MultiheadAttention(30, 4)
    with pytest.raises(AttentionInputError, match="even"):
        MultiheadAttention(C, 4, head_dim=7, rotary=True)
    assert "num_kv_heads=2" in repr(MultiheadAttention(C, 4, 2))
