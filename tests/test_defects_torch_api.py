"""Issue 10, PyTorch public functions: what ``torch.nn.functional.scaled_dot_product_attention``
accepts (CausalBias masks, float32 masks, broadcast batch dims, jagged nested tensors, empty
inputs) gives torch's results through the drop-in, and unclear inputs get our errors."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
from torch.nn.attention.bias import causal_lower_right, causal_upper_left  # noqa: E402

from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention.torch import efficient_dot_product_attention as attention  # noqa: E402
from memory_efficient_attention.torch import scaled_dot_product_attention as sdpa  # noqa: E402


def _leaves(*shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=dtype, generator=gen).requires_grad_(True) for s in shapes]


def _value_and_grads(fn, inputs, d_out):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, d_out, allow_unused=True)
    return out, grads


def _check_against_torch(q_shape, kv_shape, v_shape=None, atol=1e-10, **kwargs):
    """Our drop-in against torch's SDPA in float64: output and gradients."""
    q, k, v = _leaves(q_shape, kv_shape, v_shape or kv_shape)
    ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
    d_out = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    ref, ref_grads = _value_and_grads(
        lambda *t: F.scaled_dot_product_attention(*t, **kwargs), [q, k, v], d_out
    )
    out, grads = _value_and_grads(lambda *t: sdpa(*t, **kwargs), [q, k, v], d_out)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-7)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape, name
        torch.testing.assert_close(g, r, atol=atol, rtol=1e-7, msg=f"gradient of {name}")
    return out


# ------------------------------------------------------------------------------------------------
# 9. CausalBias masks (torch.nn.attention.bias)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [causal_lower_right, causal_upper_left])
@pytest.mark.parametrize("lengths", [(5, 9), (5, 5), (9, 5)])
def test_causal_bias_matches_torch(factory, lengths):
    q_len, kv_len = lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower right with L > S warns about NaNs (torch gives 0)
        bias = factory(q_len, kv_len)
    _check_against_torch((2, 3, q_len, 8), (2, 3, kv_len, 8), attn_mask=bias)


@pytest.mark.parametrize("factory", [causal_lower_right, causal_upper_left])
def test_causal_bias_with_scale_and_gqa(factory):
    _check_against_torch((2, 4, 5, 8), (2, 2, 9, 8), attn_mask=factory(5, 9), scale=0.3, enable_gqa=True)


@pytest.mark.parametrize(
    ("factory", "alignment"), [(causal_lower_right, "bottom_right"), (causal_upper_left, "top_left")]
)
def test_causal_bias_with_dropout(factory, alignment):
    """Dropout draws from torch's global RNG: the same draws as the seed-layout function with the
    matching ``causal_alignment``; and it really is dropout (differs from no dropout)."""
    q, k, v = _leaves((2, 2, 5, 8), (2, 2, 9, 8), (2, 2, 9, 8))
    torch.manual_seed(3)
    out = sdpa(q, k, v, attn_mask=factory(5, 9), dropout_p=0.4)
    torch.manual_seed(3)
    ref = attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=True, causal_alignment=alignment, dropout_rate=0.4,
    ).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    no_dropout = F.scaled_dot_product_attention(q, k, v, attn_mask=factory(5, 9))
    assert not torch.allclose(out, no_dropout)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_causal_bias_errors():
    q, k, v = _leaves((1, 2, 5, 8), (1, 2, 9, 8), (1, 2, 9, 8))
    with pytest.raises(AttentionInputError, match=r"CausalBias.*\(5, 7\).*L=5.*S=9"):
        sdpa(q, k, v, attn_mask=causal_lower_right(5, 7))
    with pytest.raises(AttentionInputError, match="is_causal"):
        sdpa(q, k, v, attn_mask=causal_upper_left(5, 9), is_causal=True)
    with pytest.raises(ValueError):  # torch refuses the pair too
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(5, 9), is_causal=True)


# ------------------------------------------------------------------------------------------------
# 9. float32 attn_mask with other query dtypes: torch takes bool, float32 or the query's dtype
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "atol"), [(torch.float16, 3e-3), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)]
)
def test_float32_attn_mask(dtype, atol):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, s, 8, generator=gen).to(dtype) for s in (7, 9, 9))
    mask = torch.randn(3, 7, 9, generator=gen)  # float32
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    out = sdpa(q, k, v, attn_mask=mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # torch accepts it too
    torch.testing.assert_close(out.double(), torch_out.double(), atol=2 * atol, rtol=0)


def test_float32_attn_mask_gradient_with_float64_query():
    q, k, v = _leaves((2, 3, 7, 8), (2, 3, 9, 8), (2, 3, 9, 8))
    mask = torch.randn(3, 7, 9).requires_grad_(True)
    out = sdpa(q, k, v, attn_mask=mask)
    (g_mask,) = torch.autograd.grad(out.sum(), mask)
    mask64 = mask.detach().double().requires_grad_(True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask64)
    (r_mask,) = torch.autograd.grad(ref.sum(), mask64)
    assert g_mask.dtype == torch.float32
    torch.testing.assert_close(g_mask.double(), r_mask, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "mask_dtype"),
    [(torch.float32, torch.float64), (torch.bfloat16, torch.float16), (torch.float32, torch.int64)],
)
def test_attn_mask_dtypes_torch_refuses(dtype, mask_dtype):
    q = torch.randn(1, 2, 4, 8, dtype=dtype)
    mask = torch.zeros(4, 4, dtype=mask_dtype)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with pytest.raises(AttentionInputError, match=r"attn_mask has dtype .*bool, float32 or the query"):
        sdpa(q, q, q, attn_mask=mask)


# ------------------------------------------------------------------------------------------------
# 9. batch dims that broadcast between query and key/value
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q_shape", "kv_shape", "v_shape", "kwargs"),
    [
        ((4, 3, 8), (2, 4, 6, 8), None, {}),
        ((2, 4, 3, 8), (1, 4, 6, 8), None, {}),
        ((1, 4, 3, 8), (2, 4, 6, 8), None, {}),
        ((5, 2, 4, 3, 8), (2, 4, 6, 8), None, {}),
        ((2, 4, 3, 8), (2, 4, 6, 8), (1, 4, 6, 8), {}),
        ((2, 4, 3, 8), (2, 1, 6, 8), None, {}),  # one key/value head for all query heads
        ((2, 1, 3, 8), (2, 4, 6, 8), None, {}),  # one query head against four
        ((2, 4, 3, 8), (2, 1, 6, 8), (2, 4, 6, 8), {}),
        ((3, 8), (6, 8), None, {}),  # no head axis at all
        ((8, 3, 8), (2, 2, 6, 8), None, {"enable_gqa": True}),
        ((2, 4, 3, 8), (1, 2, 6, 8), None, {"enable_gqa": True, "is_causal": True}),
    ],
)
def test_broadcast_batch_matches_torch(q_shape, kv_shape, v_shape, kwargs):
    _check_against_torch(q_shape, kv_shape, v_shape, **kwargs)


def test_broadcast_batch_with_mask():
    mask = torch.rand(2, 1, 3, 6, generator=torch.Generator().manual_seed(2)) > 0.3
    _check_against_torch((4, 3, 8), (2, 4, 6, 8), attn_mask=mask)


def test_broadcast_does_not_hide_bad_shapes():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8)
    with pytest.raises(AttentionInputError, match="enable_gqa=True"):
        sdpa(q, k, k)
    q, k = torch.randn(3, 4, 3, 8), torch.randn(2, 4, 6, 8)
    with pytest.raises(AttentionInputError, match=r"batch dims \(2\).*\(3\)"):
        sdpa(q, k, k)


# ------------------------------------------------------------------------------------------------
# 7. a float mask in the seed API must be 0/1 (an additive mask would be inverted)
# ------------------------------------------------------------------------------------------------


def _seed_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, 3, 8, generator=gen) for n in (5, 7, 7)]


def test_additive_float_mask_refused():
    q, k, v = _seed_inputs()
    keep = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    with pytest.raises(
        AttentionInputError, match=r"mask is a float tensor.*values other than 0 and 1.*bias="
    ):
        attention(q, k, v, mask=additive)
    with pytest.raises(AttentionInputError, match="bias="):
        attention(q, k, v, mask=additive.masked_fill(~keep, -1e9))
    # as bias it is what was meant: the bool mask's result
    ref = attention(q, k, v, mask=keep)
    torch.testing.assert_close(attention(q, k, v, bias=additive), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int64, torch.int32, torch.uint8])
def test_zero_one_masks_keep_working(dtype):
    q, k, v = _seed_inputs()
    keep = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.4
    ref = attention(q, k, v, mask=keep)
    torch.testing.assert_close(attention(q, k, v, mask=keep.to(dtype)), ref, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# 13. empty lengths and batches pass through both functions
# ------------------------------------------------------------------------------------------------

_EMPTY = [
    ((2, 3, 0, 8), (2, 3, 6, 8)),  # L = 0
    ((2, 3, 4, 8), (2, 3, 0, 8)),  # S = 0: zeros, zero gradients
    ((0, 3, 4, 8), (0, 3, 6, 8)),  # batch 0
    ((2, 0, 3, 4, 8), (2, 0, 3, 6, 8)),  # an empty batch dim among others
]


@pytest.mark.parametrize(("q_shape", "kv_shape"), _EMPTY)
@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}])
def test_empty_sdpa(q_shape, kv_shape, kwargs):
    out = _check_against_torch(q_shape, kv_shape, **kwargs)
    if kv_shape[-2] == 0:
        assert out.shape[-2] > 0 and bool((out == 0).all())


@pytest.mark.parametrize(("q_shape", "kv_shape"), _EMPTY)
def test_empty_seed_api(q_shape, kv_shape):
    q, k, v = _leaves(q_shape, kv_shape, kv_shape)
    d_out = torch.randn(q_shape, dtype=torch.float64)
    ref, ref_grads = _value_and_grads(F.scaled_dot_product_attention, [q, k, v], d_out)

    def seed(q, k, v):
        out = attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2))
        return out.transpose(-3, -2)

    out, grads = _value_and_grads(seed, [q, k, v], d_out)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(torch.zeros_like(r) if g is None else g, r, atol=1e-12, rtol=0)
    out, lse = attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), return_lse=True)
    assert lse.shape == out.shape[:-1]
    if kv_shape[-2] == 0:
        assert bool((lse == -math.inf).all())


# ------------------------------------------------------------------------------------------------
# 16. unclear errors
# ------------------------------------------------------------------------------------------------


def test_generator_must_be_a_generator():
    q, k, v = _seed_inputs()
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator.*str"):
        attention(q, k, v, dropout_rate=0.1, generator="seed")
    with pytest.raises(TypeError, match="generator"):
        attention(q, k, v, generator=1234)


@pytest.mark.parametrize("name", ["query_seq_lengths", "key_value_seq_lengths", "segments"])
def test_index_arrays_on_another_device(name):
    q, k, v = _seed_inputs()
    if name == "segments":
        kwargs = {
            "query_segment_ids": torch.zeros(2, 5, dtype=torch.long, device="meta"),
            "key_segment_ids": torch.zeros(2, 7, dtype=torch.long),
        }
        name = "query_segment_ids"
    else:
        kwargs = {name: torch.tensor([3, 4], device="meta")}
    with pytest.raises(AttentionInputError, match=rf"{name} is on device meta but query is on cpu"):
        attention(q, k, v, **kwargs)


def test_infinite_memory_budget():
    q, k, v = _seed_inputs()
    with pytest.raises(AttentionInputError, match="memory_budget"):
        attention(q, k, v, memory_budget=float("inf"))


# ------------------------------------------------------------------------------------------------
# 4. logits_soft_cap=inf
# ------------------------------------------------------------------------------------------------


def test_infinite_soft_cap():
    q, k, v = _seed_inputs()
    with pytest.raises(AttentionInputError, match="logits_soft_cap"):
        attention(q, k, v, logits_soft_cap=math.inf)


# ------------------------------------------------------------------------------------------------
# 3. layout hints
# ------------------------------------------------------------------------------------------------


def test_sequence_first_to_seed_api_names_the_layout():
    q, k = torch.randn(10, 2, 4, 8), torch.randn(12, 2, 4, 8)  # [L, B, H, D] / [S, B, K, D]
    with pytest.raises(AttentionInputError, match=r"seed layout \[B\.\.\., L, H, D\].*movedim\(0, -3\)"):
        attention(q, k, k)


def test_heads_first_to_seed_api_names_the_layout():
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 12, 8)  # [B, H, L, D] / [B, K, S, D]
    with pytest.raises(AttentionInputError, match=r"seed layout.*heads-first.*transpose\(-3, -2\)"):
        attention(q, k, k)


def test_seed_layout_to_sdpa_names_the_layout():
    q, k = torch.randn(2, 10, 4, 8), torch.randn(2, 12, 4, 8)  # [B, L, H, D] / [B, S, K, D]
    with pytest.raises(AttentionInputError, match=r"SDPA's layout \[B\.\.\., H, L, D\].*transpose\(-3, -2\)"):
        sdpa(q, k, k)


# ------------------------------------------------------------------------------------------------
# 17. jagged nested tensors
# ------------------------------------------------------------------------------------------------


def _njt(lengths, heads=2, depth=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, heads, depth, dtype=torch.float64, generator=gen) for n in lengths]
    return torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=True)  # [B, j, H, D]


def _njt_weights(out):
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("kwargs", [{}, {"scale": 0.4}])
def test_jagged_matches_torch(kwargs):
    q, k, v = _njt((3, 5, 1)), _njt((4, 6, 2), seed=1), _njt((4, 6, 2), seed=2)
    results = []
    for fn in (F.scaled_dot_product_attention, sdpa):
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
        assert out.is_nested and out.shape[:2] == (3, 2) and out._ragged_idx == 2
        values = out.transpose(1, 2).values()
        grads = torch.autograd.grad((values * _njt_weights(values)).sum(), (q, k, v))
        results.append((values, *(g.values() for g in grads)))
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("kv_lengths", "kwargs"),
    [
        ((3, 5), {"is_causal": True}),
        ((4, 2), {"enable_gqa": True}),
        ((3, 5), {"is_causal": True, "enable_gqa": True}),
    ],
)
def test_jagged_matches_per_sequence(kv_lengths, kwargs):
    """torch has no CPU backend for causal or grouped-query jagged inputs: compare with each
    sequence alone."""
    kv_heads = 1 if kwargs.get("enable_gqa") else 2
    q, k, v = _njt((3, 5)), _njt(kv_lengths, kv_heads, seed=1), _njt(kv_lengths, kv_heads, seed=2)
    out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)
    values = out.transpose(1, 2).values()
    grads = torch.autograd.grad((values * _njt_weights(values)).sum(), (q, k, v))
    ref_values, ref_grads = [], [[], [], []]
    weights = _njt_weights(values)
    offsets = q.offsets().tolist()
    for i, (qi, ki, vi) in enumerate(zip(q.unbind(), k.unbind(), v.unbind())):
        leaves = [t.detach().transpose(0, 1).requires_grad_(True) for t in (qi, ki, vi)]
        ref = F.scaled_dot_product_attention(*leaves, **kwargs).transpose(0, 1)
        w = weights[offsets[i] : offsets[i + 1]]
        for acc, g in zip(ref_grads, torch.autograd.grad((ref * w).sum(), leaves)):
            acc.append(g.transpose(0, 1))
        ref_values.append(ref)
    torch.testing.assert_close(values, torch.cat(ref_values), atol=1e-10, rtol=1e-7)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.values(), torch.cat(r), atol=1e-10, rtol=1e-7)


def test_nested_errors():
    q = _njt((3, 5))
    with pytest.raises(AttentionInputError, match=r"ragged dim 1.*\.transpose\(1, 2\)"):
        sdpa(q, q, q)
    qt = q.transpose(1, 2)
    with pytest.raises(AttentionInputError, match="attn_mask is not supported with nested"):
        sdpa(qt, qt, qt, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # strided nested tensors are a prototype
        strided = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)])
    with pytest.raises(AttentionInputError, match=r"strided nested tensor.*key_value_seq_lengths"):
        sdpa(strided, strided, strided)
    with pytest.raises(AttentionInputError, match=r"key is a dense tensor"):
        sdpa(qt, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))
    k = _njt((4, 6))
    with pytest.raises(AttentionInputError, match="is_causal=True with nested tensors"):
        sdpa(qt, k.transpose(1, 2), k.transpose(1, 2), is_causal=True)
