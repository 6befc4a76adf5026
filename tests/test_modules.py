"""``memory_efficient_attention.torch.modules`` against ``torch.nn.MultiheadAttention`` (float64,
loaded from the same state dict) and, for the extras torch lacks, a dense implementation."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import memory_efficient_attention.torch.modules as modules  # noqa: E402
from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention.torch.modules import MultiheadAttention, apply_rotary  # noqa: E402

C, H, B, L, S = 16, 4, 2, 7, 5
F64 = torch.float64


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Nonzero values everywhere (torch initialises the biases to 0, which would hide their use)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def pair(seed: int = 0, **kw):
    """A torch layer with random parameters and ours loaded from its state dict (strict)."""
    ref = nn.MultiheadAttention(C, H, dtype=F64, **kw)
    randomize(ref, seed)
    ours = MultiheadAttention(C, H, dtype=F64, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(batch_first: bool, kdim: int = C, vdim: int = C, batched: bool = True, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shapes = [(L, C), (S, kdim), (S, vdim)]
    if batched:
        shapes = [(B, *s) if batch_first else (s[0], B, s[1]) for s in shapes]
    return [torch.randn(s, generator=g, dtype=F64, requires_grad=True) for s in shapes]


def masks(kind: str, batched: bool = True, seed: int = 2):
    """(attn_mask, key_padding_mask) of one kind; no row is masked everywhere (torch gives NaN)."""
    g = torch.Generator().manual_seed(seed)
    b = (B,) if batched else ()
    keep_first = torch.zeros(S, dtype=torch.bool)
    keep_first[1:] = True  # True = masked out; key 0 always stays

    def bool_mask(shape):
        return (torch.rand(shape, generator=g) < 0.4) & keep_first

    def float_mask(shape):
        return torch.randn(shape, generator=g, dtype=F64)

    heads = (B * H,) if batched else (H,)
    return {
        "none": (None, None),
        "bool_2d": (bool_mask((L, S)), None),
        "float_2d": (float_mask((L, S)), None),
        "bool_3d": (bool_mask((*heads, L, S)), None),
        "float_3d": (float_mask((*heads, L, S)), None),
        "kpm_bool": (None, bool_mask((*b, S))),
        "kpm_float": (None, float_mask((*b, S))),
        "both_bool": (bool_mask((L, S)), bool_mask((*b, S))),
        "both_float": (float_mask((*heads, L, S)), float_mask((*b, S))),
    }[kind]


def assert_same_grads(ours, ref, out_ours, out_ref, tensors):
    """d(sum(out * w))/d(inputs and every parameter), for a fixed random w."""
    w = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    names = [n for n, _ in ref.named_parameters()]
    p_ours = dict(ours.named_parameters())
    ga = torch.autograd.grad((out_ours * w).sum(), [*tensors, *(p_ours[n] for n in names)])
    gb = torch.autograd.grad((out_ref * w).sum(), [*tensors, *ref.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


LAYERS = [
    dict(batch_first=True),
    dict(batch_first=False),
    dict(batch_first=True, kdim=6, vdim=10),
    dict(batch_first=False, add_bias_kv=True),
    dict(batch_first=True, add_zero_attn=True, bias=False),
    dict(batch_first=False, add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=6),
]
MASKS = [
    "none",
    "bool_2d",
    "float_2d",
    "bool_3d",
    "float_3d",
    "kpm_bool",
    "kpm_float",
    "both_bool",
    "both_float",
]


@pytest.mark.parametrize("kw", LAYERS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_matches_torch_outputs_weights_and_grads(kw, mask_kind):
    ours, ref = pair(**kw)
    ours.train(), ref.train()  # dropout is 0: train and eval agree, and torch takes no fast path
    q, k, v = inputs(kw["batch_first"], kw.get("kdim", C), kw.get("vdim", C))
    attn_mask, kpm = masks(mask_kind)
    for need, average in [(True, True), (True, False), (False, True)]:
        args = dict(
            attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need, average_attn_weights=average
        )
        out, weights = ours(q, k, v, **args)
        out_ref, weights_ref = ref(q, k, v, **args)
        torch.testing.assert_close(out, out_ref)
        if need:
            torch.testing.assert_close(weights, weights_ref)
        else:
            assert weights is None and weights_ref is None
    assert_same_grads(ours, ref, out, out_ref, [q, k, v])
    if need:  # the weights are differentiable too
        w_ours = ours(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, average_attn_weights=False)[1]
        w_ref = ref(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, average_attn_weights=False)[1]
        assert_same_grads(ours, ref, w_ours, w_ref, [q, k, v])


@pytest.mark.parametrize("mask_kind", ["none", "bool_2d", "float_3d", "kpm_bool", "both_float"])
@pytest.mark.parametrize("kw", [dict(), dict(kdim=6, vdim=10, add_bias_kv=True, add_zero_attn=True)])
def test_unbatched_inputs_match_torch(mask_kind, kw):
    ours, ref = pair(batch_first=True, **kw)
    q, k, v = inputs(True, kw.get("kdim", C), kw.get("vdim", C), batched=False)
    attn_mask, kpm = masks(mask_kind, batched=False)
    for average in (True, False):
        a = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=average)
        b = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=average)
        assert a[0].shape == (L, C) and a[1].shape == b[1].shape
        torch.testing.assert_close(a, b)
    assert_same_grads(ours, ref, a[0], b[0], [q, k, v])


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_takes_the_packed_path_and_matches(batch_first):
    ours, ref = pair(batch_first=batch_first)
    x = inputs(batch_first)[0]
    for need in (True, False):
        torch.testing.assert_close(ours(x, x, x, need_weights=need), ref(x, x, x, need_weights=need))
    assert_same_grads(ours, ref, ours(x, x, x)[0], ref(x, x, x)[0], [x])


def test_state_dicts_load_both_ways_strict():
    for kw in [dict(), dict(kdim=6, vdim=10, add_bias_kv=True), dict(bias=False, add_zero_attn=True)]:
        ref = nn.MultiheadAttention(C, H, **kw)
        ours = MultiheadAttention(C, H, **kw)
        assert list(ours.state_dict()) == list(ref.state_dict())
        for (n, a), (m, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
            assert n == m and a.shape == b.shape
        assert type(ours.out_proj) is type(ref.out_proj)
        randomize(ours, 3)
        ref.load_state_dict(ours.state_dict(), strict=True)
        for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
            assert torch.equal(a, b)
        assert ours._qkv_same_embed_dim == ref._qkv_same_embed_dim
        assert (ours.in_proj_weight is None) == (ref.in_proj_weight is None)


def test_initialisation_follows_torch():
    ours = MultiheadAttention(C, H, add_bias_kv=True)
    assert torch.count_nonzero(ours.in_proj_bias) == 0 and torch.count_nonzero(ours.out_proj.bias) == 0
    bound = (6 / (C + 3 * C)) ** 0.5  # xavier_uniform_ on [3C, C]
    assert ours.in_proj_weight.abs().max() <= bound and ours.in_proj_weight.std() > bound / 4
    assert torch.count_nonzero(ours.bias_k) > 0


def test_single_argument_is_self_attention_and_returns_the_tuple():
    """``out, w = attn(x)`` used to unpack a batch of 2 silently; it now gets (output, weights)."""
    ours, _ = pair(batch_first=True)
    x, ctx = inputs(True)[0], inputs(True, seed=5)[0][:, :S]
    out, weights = ours(x)
    assert out.shape == (B, L, C) and weights.shape == (B, L, L)
    torch.testing.assert_close((out, weights), ours(x, x, x))
    torch.testing.assert_close(ours(x, ctx), ours(x, ctx, ctx))
    torch.testing.assert_close(ours(x, key_value=ctx), ours(x, ctx, ctx))


@pytest.mark.parametrize("kw", [dict(), dict(add_bias_kv=True, add_zero_attn=True)])
def test_is_causal_equals_torch_with_the_causal_mask(kw):
    ours, ref = pair(batch_first=True, **kw)
    x = inputs(True)[0]
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True = not allowed
    kpm = torch.nn.functional.pad(masks("kpm_bool")[1], (0, L - S))
    for need in (True, False):
        for pad in (None, kpm):
            # torch's result for the mask itself (given is_causal=True, need_weights=False and no
            # padding mask, torch replaces the mask by SDPA's causal flag, which also hides the
            # appended bias_k/zero keys from the first queries: its two paths then disagree)
            expected = ref(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=need)
            # the hint with its mask, as torch wants, and is_causal alone (torch would raise)
            got = ours(x, x, x, attn_mask=causal, key_padding_mask=pad, need_weights=need, is_causal=True)
            alone = ours(x, x, x, key_padding_mask=pad, need_weights=need, is_causal=True)
            torch.testing.assert_close(got, expected)
            torch.testing.assert_close(alone, expected)
    # the layer-wide is_causal extra does the same
    always = MultiheadAttention(C, H, dtype=F64, batch_first=True, is_causal=True, **kw)
    always.load_state_dict(ours.state_dict())
    torch.testing.assert_close(always(x), ref(x, x, x, attn_mask=causal))


def test_a_row_with_every_key_masked_outputs_the_bias_like_torch_without_weights():
    ours, ref = pair(batch_first=True)
    q, k, v = inputs(True)
    attn_mask = torch.zeros(L, S, dtype=torch.bool)
    attn_mask[3] = True
    out, weights = ours(q, k, v, attn_mask=attn_mask)
    torch.testing.assert_close(out, ref(q, k, v, attn_mask=attn_mask, need_weights=False)[0])
    torch.testing.assert_close(out[:, 3], ours.out_proj.bias.expand(B, C))
    assert torch.all(weights[:, 3] == 0) and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1)[:, [0, 1, 2, 4, 5, 6]], torch.ones(B, 6, dtype=F64))


def test_need_weights_false_never_builds_the_weights(monkeypatch):
    ours, _ = pair(batch_first=True)
    x = inputs(True)[0]

    def fail(*args, **kwargs):
        raise AssertionError("dense weights computed with need_weights=False")

    monkeypatch.setattr(modules, "_attention_weights", fail)
    assert ours(x, need_weights=False)[1] is None


def count_kernel_calls(monkeypatch):
    calls = []
    kernel = modules._attention

    def spy(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(modules, "_attention", spy)
    return calls


@pytest.mark.parametrize("norm_first", [False, True])
def test_inside_transformer_encoder_layer(monkeypatch, norm_first):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        C, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first, dtype=F64
    )
    randomize(ref)
    ours = nn.TransformerEncoderLayer(
        C, H, 32, dropout=0.0, batch_first=True, norm_first=norm_first, dtype=F64
    )
    ours.load_state_dict(ref.state_dict())
    ours.self_attn = MultiheadAttention(C, H, batch_first=True, dtype=F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    calls = count_kernel_calls(monkeypatch)
    x = torch.randn(B, L, C, dtype=F64)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    for kwargs in [{}, dict(src_key_padding_mask=kpm), dict(src_mask=causal, is_causal=True)]:
        ours.train(), ref.train()
        torch.testing.assert_close(ours(x, **kwargs), ref(x, **kwargs))
        ours.eval(), ref.eval()
        with torch.no_grad():  # the conditions of torch's fused inference path
            n = len(calls)
            torch.testing.assert_close(ours(x, **kwargs), ref(x, **kwargs))
            assert len(calls) == n + 1  # our kernel ran; the fused path did not bypass it
    ours.train(), ref.train()
    xg = x.clone().requires_grad_()
    a, b = ours(xg, src_key_padding_mask=kpm), ref(xg, src_key_padding_mask=kpm)
    torch.testing.assert_close(torch.autograd.grad(a.sum(), xg), torch.autograd.grad(b.sum(), xg))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_inside_transformer_encoder_with_its_nested_inference_path(monkeypatch):
    """In eval without grad and with a padding mask, nn.TransformerEncoder nests the batch."""
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(C, H, 32, batch_first=True, dtype=F64), 2)
    randomize(ref)
    ours = nn.TransformerEncoder(nn.TransformerEncoderLayer(C, H, 32, batch_first=True, dtype=F64), 2)
    for layer in ours.layers:
        layer.self_attn = MultiheadAttention(C, H, batch_first=True, dtype=F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval(), ref.eval()
    calls = count_kernel_calls(monkeypatch)
    x = torch.randn(B, L, C, dtype=F64)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(ours(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm))
    assert len(calls) == 2


def test_inside_transformer_decoder_layer():
    ref = nn.TransformerDecoderLayer(C, H, 32, dropout=0.0, dtype=F64)  # batch_first=False
    randomize(ref)
    ours = nn.TransformerDecoderLayer(C, H, 32, dropout=0.0, dtype=F64)
    ours.self_attn = MultiheadAttention(C, H, dtype=F64)
    ours.multihead_attn = MultiheadAttention(C, H, dtype=F64)
    ours.load_state_dict(ref.state_dict(), strict=True)
    tgt, memory = torch.randn(L, B, C, dtype=F64), torch.randn(S, B, C, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    mkpm = torch.tensor([[False] * S, [False] * 3 + [True] * (S - 3)])
    for mode in ("train", "eval"):
        ours.train(mode == "train"), ref.train(mode == "train")
        args = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mkpm)
        torch.testing.assert_close(ours(tgt, memory, **args), ref(tgt, memory, **args))


def test_bad_inputs_name_the_argument_and_the_shapes():
    ours = MultiheadAttention(C, H)
    with pytest.raises(AttentionInputError, match=r"query has shape \(16,\).*\[L, C\]"):
        ours(torch.randn(C))
    with pytest.raises(AttentionInputError, match=r"query has shape \(2, 3, 4, 16\)"):
        ours(torch.randn(2, 3, 4, C))
    with pytest.raises(AttentionInputError, match=r"key has shape \(5, 2, 8\).*\[S, B, 16\]"):
        ours(torch.randn(L, B, C), torch.randn(S, B, 8))
    with pytest.raises(
        AttentionInputError, match=r"attn_mask has shape \(5, 7\).*\(7, 5\).*\(2 \* 4, 7, 5\)"
    ):
        ours(torch.randn(L, B, C), torch.randn(S, B, C), attn_mask=torch.zeros(S, L, dtype=torch.bool))
    with pytest.raises(AttentionInputError, match=r"key_padding_mask has shape \(5,\).*\(2, 5\)"):
        ours(torch.randn(L, B, C), torch.randn(S, B, C), key_padding_mask=torch.zeros(S, dtype=torch.bool))
    with pytest.raises(AttentionInputError, match="attn_mask must be bool or floating"):
        ours(torch.randn(L, C), attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        ours([[1.0] * C])


def test_bad_configurations():
    with pytest.raises(AttentionInputError, match="num_kv_heads"):
        MultiheadAttention(C, 4, 3)  # the old positional num_kv_heads is now torch's dropout
    with pytest.raises(AttentionInputError, match="num_kv_heads"):
        MultiheadAttention(C, 4, num_kv_heads=3)
    with pytest.raises(AttentionInputError, match="head_dim"):
        MultiheadAttention(30, 4)
    with pytest.raises(AttentionInputError, match="even"):
        MultiheadAttention(C, 4, head_dim=7, rotary=True)
    assert "num_kv_heads=2" in repr(MultiheadAttention(C, 4, num_kv_heads=2, batch_first=False))


# ---- the extras torch lacks, against the same layer written out densely -------------------------


def dense_reference(layer: MultiheadAttention, x, kv=None, kv_lengths=None):
    """``[B, L, C]`` batch-first; returns (output, per-head weights ``[B, H, L, S]``)."""
    kv = x if kv is None else kv
    h, kh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    if layer.in_proj_weight is not None:
        wq, wk, wv = layer.in_proj_weight.split([h * d, kh * d, kh * d])
    else:
        wq, wk, wv = layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight
    bq, bk, bv = (
        (None,) * 3 if layer.in_proj_bias is None else layer.in_proj_bias.split([h * d, kh * d, kh * d])
    )
    lin = torch.nn.functional.linear
    q = lin(x, wq, bq).unflatten(-1, (h, d))
    k = lin(kv, wk, bk).unflatten(-1, (kh, d))
    v = lin(kv, wv, bv).unflatten(-1, (kh, d))
    n, m = q.shape[1], k.shape[1]
    if layer.rotary:
        q, k = apply_rotary(q, torch.arange(n)), apply_rotary(k, torch.arange(m))
    k, v = k.repeat_interleave(h // kh, dim=2), v.repeat_interleave(h // kh, dim=2)
    s = torch.einsum("blhd,bshd->bhls", q, k) / d**0.5
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
    return layer.out_proj(out), p


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_kv_heads=4, is_causal=True),
        dict(num_kv_heads=2, is_causal=True, rotary=True),
        dict(num_kv_heads=1, alibi=True, is_causal=True, bias=False),
        dict(num_kv_heads=2, alibi=True, rotary=True, head_dim=6),
    ],
)
def test_extras_match_dense_reference_with_grads(kw):
    torch.manual_seed(0)
    layer = MultiheadAttention(C, H, batch_first=True, key_chunk_size=2, query_chunk_size=3, dtype=F64, **kw)
    randomize(layer)
    x = torch.randn(B, L, C, dtype=F64, requires_grad=True)
    lengths = torch.tensor([L, 4])
    ours, weights = layer(x, key_value_seq_lengths=lengths, average_attn_weights=False)
    ref, p = dense_reference(layer, x, kv_lengths=lengths)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(weights, p)
    torch.testing.assert_close(layer(x, key_value_seq_lengths=lengths)[1], p.mean(1))
    params = [x, *layer.parameters()]
    for a, b in zip(
        torch.autograd.grad(ours.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)
    ):
        torch.testing.assert_close(a, b)
    # unbatched: the lengths lose their batch dim too
    one, w_one = layer(x[1], key_value_seq_lengths=lengths[1], average_attn_weights=False)
    torch.testing.assert_close((one, w_one), (ours[1], weights[1]))


def test_cross_attention_kv_dim_and_dropout():
    torch.manual_seed(0)
    layer = MultiheadAttention(C, H, 0.5, batch_first=True, num_kv_heads=2, kv_dim=24, rotary=True, dtype=F64)
    randomize(layer)
    assert layer.kdim == layer.vdim == 24
    x, y = torch.randn(B, L, C, dtype=F64), torch.randn(B, S, 24, dtype=F64)
    layer.eval()
    torch.testing.assert_close(layer(x, y, average_attn_weights=False), dense_reference(layer, x, y))
    layer.train()
    a = layer(x, y, need_weights=False, generator=torch.Generator().manual_seed(3))[0]
    b = layer(x, y, need_weights=False, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, layer.eval()(x, y)[0])


def test_extras_with_appended_keys_keep_them_visible():
    """add_bias_kv with key lengths: torch pads key_padding_mask with 'keep' for the bias key."""
    ours, ref = pair(batch_first=True, add_bias_kv=True, add_zero_attn=True)
    q, k, v = inputs(True)
    lengths = torch.tensor([S, 2])
    kpm = torch.arange(S)[None, :] >= lengths[:, None]
    torch.testing.assert_close(
        ours(q, k, v, key_value_seq_lengths=lengths), ref(q, k, v, key_padding_mask=kpm)
    )
    with pytest.raises(AttentionInputError, match="key_segment_ids"):
        ours(q, k, v, query_segment_ids=torch.zeros(B, L, dtype=torch.long),
             key_segment_ids=torch.zeros(B, S, dtype=torch.long))  # fmt: skip


def test_old_checkpoints_with_separate_linears_still_load():
    torch.manual_seed(0)
    ours = MultiheadAttention(C, H, dtype=F64)
    randomize(ours)
    wq, wk, wv = ours.in_proj_weight.detach().chunk(3)
    bq, bk, bv = ours.in_proj_bias.detach().chunk(3)
    out_w, out_b = ours.out_proj.weight.detach(), ours.out_proj.bias.detach()
    old = {"q_proj.weight": wq, "k_proj.weight": wk, "v_proj.weight": wv,
           "q_proj.bias": bq, "k_proj.bias": bk, "v_proj.bias": bv,
           "out_proj.weight": out_w, "out_proj.bias": out_b}  # fmt: skip
    fresh = MultiheadAttention(C, H, dtype=F64)
    fresh.load_state_dict(old, strict=True)
    for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)
    gqa = MultiheadAttention(C, H, bias=False, num_kv_heads=2, dtype=F64, batch_first=False)
    gqa.load_state_dict({"q_proj.weight": wq, "k_proj.weight": wk[:8], "v_proj.weight": wv[:8],
                         "out_proj.weight": out_w}, strict=True)  # fmt: skip
    assert torch.equal(gqa.k_proj_weight, wk[:8])


def test_layer_built_the_0_2_way_warns_that_the_layout_changed():
    # 0.2's layer took [B, L, C] and returned the output alone; built with its extras and no
    # batch_first, the layer says what changed (and the warning stops once batch_first is given)
    with pytest.warns(FutureWarning, match="batch_first=True"):
        layer = MultiheadAttention(32, 4, num_kv_heads=2, is_causal=True)
    assert layer.batch_first is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiheadAttention(32, 4, num_kv_heads=2, is_causal=True, batch_first=True)
        MultiheadAttention(32, 4)  # a torch-style layer never warns


@pytest.mark.parametrize("lengths", [(0, 5), (4, 0), (0, 0)])
@pytest.mark.parametrize("need_weights", [True, False])
def test_empty_lengths_match_torch(lengths, need_weights):
    # L = 0 or S = 0 (item 13): torch returns empty outputs / zero rows; so do we, with gradients
    tgt, src = lengths
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True, dtype=F64)
    ours = MultiheadAttention(16, 4, batch_first=True, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    q = torch.randn(2, tgt, 16, dtype=F64, requires_grad=True)
    kv = torch.randn(2, src, 16, dtype=F64, requires_grad=True)
    with torch.no_grad():  # nonzero output bias: S = 0 rows are out_proj(0) = the bias, in both
        ref.out_proj.bias.normal_()
        ours.out_proj.bias.copy_(ref.out_proj.bias)
    out, w = ours(q, kv, kv, need_weights=need_weights)
    out_ref, w_ref = ref(q, kv, kv, need_weights=need_weights)
    torch.testing.assert_close(out, out_ref)
    assert (w is None) == (w_ref is None)
    if w is not None:
        assert w.shape == w_ref.shape and not w.any()
    out.sum().backward()
    assert q.grad.shape == q.shape and not torch.isnan(q.grad).any()
