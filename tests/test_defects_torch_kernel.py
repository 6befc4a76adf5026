"""PyTorch kernel defects of issue 10: gradients of tensors captured by ``score_mod`` (item 1),
extreme finite logits (5b), checks on what user callables return (6), empty lengths and batches
(13). Every expected value comes from the dense float64 reference (``tests/reference.py``)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention.torch import efficient_dot_product_attention as attention  # noqa: E402
from memory_efficient_attention.torch import scaled_dot_product_attention as sdpa  # noqa: E402

from .cases import assert_close  # noqa: E402
from .reference import reference_attention_torch  # noqa: E402

F64 = torch.float64


def _rand(*shape, seed, dtype=F64, grad=True):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_(grad)


def _qkv(batch=(2,), L=13, S=21, H=4, K=2, D=8, E=6, seed=0, dtype=F64):
    return (
        _rand(*batch, L, H, D, seed=seed, dtype=dtype),
        _rand(*batch, S, K, D, seed=seed + 1, dtype=dtype),
        _rand(*batch, S, K, E, seed=seed + 2, dtype=dtype),
    )


def _distance(L, S):
    return (torch.arange(L).view(L, 1) - torch.arange(S).view(1, S)).abs().to(F64)


def _grads(out, inputs, d_out, **kw):
    return torch.autograd.grad(out, inputs, d_out, allow_unused=True, **kw)


def _check(got, want, what, dtype="float64"):
    assert got is not None and want is not None, what
    assert_close(got.detach().double().numpy(), want.detach().double().numpy(), dtype, what)


# ------------------------------------------------------------------------------------------------
# 1. Tensors captured by score_mod get their gradients
# ------------------------------------------------------------------------------------------------

CAPTURE_SETTINGS = {
    "plain": {},
    "causal": {"is_causal": True},
    "causal_br_window": {"is_causal": True, "causal_alignment": "bottom_right", "local_window_size": 5},
    "lengths": {"key_value_seq_lengths": torch.tensor([17, 9])},
}


@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (3, 3)], ids=["gqa", "mqa", "mha"])
@pytest.mark.parametrize("setting", list(CAPTURE_SETTINGS), ids=list(CAPTURE_SETTINGS))
def test_alibi_slopes_captured_by_score_mod_get_gradients(setting, heads):
    H, K = heads
    L, S = 13, 21  # not multiples of the chunk sizes
    kwargs = CAPTURE_SETTINGS[setting]
    q, k, v = _qkv(L=L, S=S, H=H, K=K, seed=3)
    slopes = torch.linspace(0.3, 1.1, H, dtype=F64).requires_grad_(True)

    def alibi(s, b, h, q_idx, kv_idx):
        return s - slopes[h] * (q_idx - kv_idx).abs()

    out = attention(q, k, v, score_mod=alibi, query_chunk_size=5, key_chunk_size=4, **kwargs)
    d_out = _rand(*out.shape, seed=9, grad=False)
    got = _grads(out, (q, k, v, slopes), d_out)

    ref_kwargs = {n: (x.numpy() if torch.is_tensor(x) else x) for n, x in kwargs.items()}
    bias = -slopes.view(H, 1, 1) * _distance(L, S)
    ref = reference_attention_torch(q, k, v, bias=bias, **ref_kwargs)
    want = _grads(ref, (q, k, v, slopes), d_out)
    _check(out, ref, "output")
    for name, g, w in zip(("dq", "dk", "dv", "dslopes"), got, want):
        _check(g, w, name)
    # the same bias passed densely gets the same gradient through the kernel's own rule
    bias = -slopes.view(H, 1, 1) * _distance(L, S)
    dense = attention(q, k, v, bias=bias, query_chunk_size=5, key_chunk_size=4, **kwargs)
    _check(_grads(dense, (slopes,), d_out)[0], got[3], "dslopes (dense bias)")


def test_non_leaf_capture_propagates_to_its_leaf():
    q, k, v = _qkv(seed=5)
    param = torch.tensor([0.2, 0.4, 0.1, 0.3], dtype=F64, requires_grad=True)

    def run(fn_of_slopes):
        slopes = param.exp() * 2  # a non-leaf: the gradient must reach ``param``
        return fn_of_slopes(slopes)

    def kernel(slopes):
        return attention(
            q,
            k,
            v,
            is_causal=True,
            query_chunk_size=4,
            key_chunk_size=8,
            score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs(),
        )

    def dense(slopes):
        bias = -slopes.view(4, 1, 1) * _distance(13, 21)
        return reference_attention_torch(q, k, v, is_causal=True, bias=bias)

    out = run(kernel)
    d_out = _rand(*out.shape, seed=1, grad=False)
    (got,) = _grads(out, (param,), d_out)
    (want,) = _grads(run(dense), (param,), d_out)
    _check(got, want, "dparam")


class ALiBi(torch.nn.Module):
    """A score_mod as a module with a learnable slope per head."""

    def __init__(self, heads):
        super().__init__()
        self.log_slopes = torch.nn.Parameter(torch.linspace(-2.0, 0.0, heads, dtype=F64))
        self.register_buffer("offset", torch.tensor(0.5, dtype=F64))

    def forward(self, s, b, h, q_idx, kv_idx):
        return s - self.log_slopes.exp()[h] * ((q_idx - kv_idx).abs() + self.offset)

    def bias(self, L, S):
        return -self.log_slopes.exp().view(-1, 1, 1) * (_distance(L, S) + self.offset)


def _module_case(score_mod_of, module, **kwargs):
    q, k, v = _qkv(seed=11)
    out = attention(q, k, v, score_mod=score_mod_of(module), query_chunk_size=6, key_chunk_size=5, **kwargs)
    d_out = _rand(*out.shape, seed=2, grad=False)
    got = _grads(out, (q, module.log_slopes), d_out)
    ref = reference_attention_torch(q, k, v, bias=module.bias(13, 21), **kwargs)
    want = _grads(ref, (q, module.log_slopes), d_out)
    _check(out, ref, "output")
    _check(got[0], want[0], "dq")
    _check(got[1], want[1], "dlog_slopes")


def test_module_score_mod_parameter_gets_gradient():
    _module_case(lambda m: m, ALiBi(4), is_causal=True)


def test_bound_method_score_mod_parameter_gets_gradient():
    _module_case(lambda m: m.forward, ALiBi(4))


def test_partial_and_nested_closure_captures_get_gradients():
    module = ALiBi(4)

    def outer(m):
        def inner(s, b, h, q_idx, kv_idx, *, mod):
            return mod(s, b, h, q_idx, kv_idx)

        return functools.partial(inner, mod=m)

    _module_case(outer, module)


_GLOBAL_SLOPES = torch.linspace(0.1, 0.7, 4, dtype=F64).requires_grad_(True)


def _global_alibi(s, b, h, q_idx, kv_idx):
    return s - _GLOBAL_SLOPES[h] * (q_idx - kv_idx).abs()


def test_global_tensor_read_by_score_mod_gets_gradient():
    q, k, v = _qkv(seed=13)
    out = attention(q, k, v, score_mod=_global_alibi, query_chunk_size=4, key_chunk_size=4)
    d_out = _rand(*out.shape, seed=3, grad=False)
    (got,) = _grads(out, (_GLOBAL_SLOPES,), d_out)
    ref = reference_attention_torch(q, k, v, bias=-_GLOBAL_SLOPES.view(4, 1, 1) * _distance(13, 21))
    (want,) = _grads(ref, (_GLOBAL_SLOPES,), d_out)
    _check(got, want, "dslopes")


def test_calc_fn_data_requiring_grad_gets_gradient():
    q, k, v = _qkv(batch=(), L=11, S=9, H=2, K=1, seed=17)
    bias = _rand(2, 11, 9, seed=4)

    def bias_fn(q0, k0, bias_chunk, w, data):
        return data[:, q0 : q0 + w.shape[-3], k0 : k0 + w.shape[-1]]

    out = attention(q, k, v, query_chunk_size=4, key_chunk_size=5, bias_calc_fn=bias_fn, calc_fn_data=bias)
    d_out = _rand(*out.shape, seed=5, grad=False)
    got = _grads(out, (q, bias), d_out)
    ref = reference_attention_torch(q, k, v, bias=bias)
    want = _grads(ref, (q, bias), d_out)
    _check(got[0], want[0], "dq")
    _check(got[1], want[1], "dbias")


def test_double_backward_with_captured_slopes():
    q, k, v = _qkv(batch=(1,), L=7, S=9, H=2, K=1, D=4, E=3, seed=19)
    slopes = torch.tensor([0.3, 0.8], dtype=F64, requires_grad=True)
    d_out = _rand(1, 7, 2, 3, seed=6, grad=False)

    def penalty(out):  # a gradient penalty: d/dslopes of |dq|^2 needs the mixed derivative
        (dq,) = torch.autograd.grad(out, q, d_out, create_graph=True)
        return (dq**2).sum()

    out = attention(
        q,
        k,
        v,
        query_chunk_size=3,
        key_chunk_size=4,
        score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs(),
    )
    got = torch.autograd.grad(penalty(out), (slopes, k))
    ref = reference_attention_torch(q, k, v, bias=-slopes.view(2, 1, 1) * _distance(7, 9))
    want = torch.autograd.grad(penalty(ref), (slopes, k))
    _check(got[0], want[0], "d penalty / d slopes")
    _check(got[1], want[1], "d penalty / d k")


def test_forward_mode_through_captured_tensor_is_refused():
    import torch.autograd.forward_ad as fwAD

    q, k, v = (t.detach() for t in _qkv(seed=23))
    with fwAD.dual_level():
        slopes = fwAD.make_dual(torch.ones(4, dtype=F64), torch.ones(4, dtype=F64))
        with pytest.raises(NotImplementedError, match="captured by score_mod"):
            attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs())


def test_torch_func_transforms_of_captured_tensor_are_refused():
    q, k, v = (t.detach() for t in _qkv(seed=23))

    def run(slopes):
        return attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs()).sum()

    ones = torch.ones(4, dtype=F64)
    for transform in (lambda: torch.func.grad(run)(ones), lambda: torch.func.jvp(run, (ones,), (ones,))):
        with pytest.raises(NotImplementedError, match="captured by score_mod"):
            transform()


def test_jvp_in_q_with_a_captured_parameter():
    """A captured tensor that requires grad but has no tangent: forward mode in q still works."""
    q, k, v = (t.detach() for t in _qkv(seed=23))
    slopes = torch.linspace(0.2, 0.9, 4, dtype=F64).requires_grad_(True)
    tangent = _rand(*q.shape, seed=24, grad=False)
    _, got = torch.func.jvp(
        lambda q: attention(
            q,
            k,
            v,
            query_chunk_size=5,
            key_chunk_size=4,
            score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki).abs(),
        ),
        (q,),
        (tangent,),
    )
    bias = (-slopes.view(4, 1, 1) * _distance(13, 21)).detach()
    _, want = torch.func.jvp(lambda q: reference_attention_torch(q, k, v, bias=bias), (q,), (tangent,))
    _check(got, want, "tangent")


# ------------------------------------------------------------------------------------------------
# 5b. Extreme but finite logits: what dense attention handles, the kernel handles
# ------------------------------------------------------------------------------------------------


def _extreme_case(kind):
    """float32 inputs whose scores or bias go past finfo(float32).max / log2(e) ~ 2.36e38."""
    L, S = 5, 6
    q = torch.randn(1, L, 1, 4, generator=torch.Generator().manual_seed(1))
    k = torch.randn(1, S, 1, 4, generator=torch.Generator().manual_seed(2))
    v = torch.randn(1, S, 1, 3, generator=torch.Generator().manual_seed(3))
    bias = None
    if kind == "bias":
        bias = torch.zeros(1, L, S)
        bias[0, 0, :3] = torch.tensor([3e38, 1e38, 0.0])  # the row
        bias[0, 1, :] = -3e38  # every key beyond -finfo.max / log2(e) ...
        bias[0, 1, 2] = -2.5e38  # ... this one the least negative
        bias[0, 2, 4] = 2.9e38
    else:  # D = 1 and scale 1: the score is one product q * k, exactly representable
        q = torch.tensor([2.6e19, -2.5e19, 1e-3, 2.1e19, -1.0]).view(1, L, 1, 1)
        k = torch.tensor([1.0e19, 1.1e19, 1.2e19, 1.3e19, 0.5, -0.2]).view(1, S, 1, 1)
    return q, k, v, bias


@pytest.mark.parametrize(
    "extra",
    [{}, {"is_causal": True, "causal_alignment": "bottom_right"}, {"mask": "half"}],
    ids=["plain", "causal", "dense_mask"],
)
@pytest.mark.parametrize("kind", ["bias", "scores"])
def test_extreme_finite_logits_match_dense(kind, extra):
    q, k, v, bias = _extreme_case(kind)
    L, S = q.shape[1], k.shape[1]
    extra = dict(extra)
    if extra.get("mask") == "half":
        mask = torch.ones(L, S, dtype=torch.bool)
        mask[:, -1] = False
        extra["mask"] = mask
    scale = 1.0 if kind == "scores" else None
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)] + (
        [bias.clone().requires_grad_(True)] if bias is not None else []
    )
    out = attention(
        *leaves[:3],
        bias=leaves[3] if bias is not None else None,
        scale=scale,
        query_chunk_size=2,
        key_chunk_size=4,
        **extra,
    )
    assert torch.isfinite(out).all()
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = _grads(out, leaves, d_out)

    refs = [t.double().requires_grad_(True) for t in leaves]
    ref_kwargs = {n: (x.numpy() if torch.is_tensor(x) else x) for n, x in extra.items()}
    ref = reference_attention_torch(
        *refs[:3], bias=refs[3] if bias is not None else None, scale=scale, **ref_kwargs
    )
    want = _grads(ref, refs, d_out.double())
    _check(out, ref, "output", "float32")
    for name, g, w in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert torch.isfinite(g).all(), name
        # relative to the gradient's own scale (the inputs span 1e-3 .. 1e19)
        scale_w = max(1.0, float(w.abs().max()))
        assert_close((g.double() / scale_w).numpy(), (w / scale_w).detach().numpy(), "float32", name)


def test_extreme_logits_drop_in_matches_torch_sdpa():
    q, k, v, bias = _extreme_case("bias")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    ours = sdpa(q, k, v, attn_mask=bias.unsqueeze(0))
    mask = bias.double().unsqueeze(0)
    theirs = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    _check(ours, theirs, "output", "float32")


def test_ordinary_inputs_keep_base2_units():
    """The overflow check is a bound, not a blanket fallback: ordinary inputs stay in base 2."""
    from memory_efficient_attention._config import make_config
    from memory_efficient_attention._spec import seed_dims
    from memory_efficient_attention.torch._function import Operands
    from memory_efficient_attention.torch._kernel import scores_may_overflow

    q, k, v = _qkv(dtype=torch.float32)
    q5 = q.detach().reshape(2, 13, 2, 2, 8).permute(0, 2, 1, 3, 4)
    k4, v4 = (t.detach().transpose(1, 2) for t in (k, v))
    cfg = make_config(seed_dims(q.shape, k.shape, v.shape), "float32")
    assert not scores_may_overflow(cfg, Operands(q5, k4, v4, torch.full((1, 1, 1, 21), 1e30)))
    assert scores_may_overflow(cfg, Operands(q5, k4, v4, torch.full((1, 1, 1, 21), 2e38)))
    assert scores_may_overflow(cfg, Operands(q5 * 1e19, k4 * 1e19, v4))


# ------------------------------------------------------------------------------------------------
# 6. What user callables return is checked
# ------------------------------------------------------------------------------------------------


def _small():
    return _qkv(batch=(2,), L=9, S=11, H=2, K=1, D=4, E=4, seed=29)


def test_mask_mod_returning_none_is_an_error():
    q, k, v = _small()

    def forgot_return(b, h, q_idx, kv_idx):
        q_idx >= kv_idx  # noqa: B015

    with pytest.raises(TypeError, match=r"mask_mod returned None.*forget `return`"):
        attention(q, k, v, mask_mod=forgot_return)


@pytest.mark.parametrize("value", [True, False])
def test_mask_mod_python_bool_broadcasts(value):
    q, k, v = _small()
    out = attention(q, k, v, mask_mod=lambda *a: value, query_chunk_size=4, key_chunk_size=4)
    d_out = _rand(*out.shape, seed=7, grad=False)
    got = _grads(out, (q, k, v), d_out)
    ref = reference_attention_torch(q, k, v, mask_mod=lambda *a: np.asarray(value))
    want = _grads(ref, (q, k, v), d_out)
    _check(out, ref, "output")
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        if w is None:  # every key excluded: no gradient path in the reference
            assert not value and (g is None or (g == 0).all()), name
        else:
            _check(g, w, name)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mask_mod": lambda b, h, qi, ki: (qi >= ki).float()}, TypeError, r"mask_mod must return a bool"),
        (
            {"mask_mod": lambda b, h, qi, ki: torch.ones(3, 1, 1, 1, 1, dtype=torch.bool)},
            AttentionInputError,
            r"mask_mod returned shape \(3, 1, 1, 1, 1\).*\[Z, K, lc, G, kc\]",
        ),
        ({"score_mod": lambda s, b, h, qi, ki: None}, TypeError, r"score_mod returned None"),
        ({"score_mod": lambda s, b, h, qi, ki: s > 0}, TypeError, r"score_mod must return a float"),
        (
            {"score_mod": lambda s, b, h, qi, ki: s[..., :1, :, :1].expand(2, 1, 3, 2, 1)},
            AttentionInputError,
            r"score_mod returned shape \(2, 1, 3, 2, 1\), which does not broadcast to \(2, 1, 4, 2, 4\)",
        ),
        (
            {"bias_calc_fn": lambda q0, k0, b, w, d: torch.zeros(3, 1, 1)},
            AttentionInputError,
            r"bias_calc_fn returned shape \(3, 1, 1\).*\[B\.\.\., H, lc, kc\]",
        ),
        (
            {"mask_calc_fn": lambda q0, k0, m, w, d: torch.ones(1, 4, 4)},
            TypeError,
            r"mask_calc_fn must return a bool",
        ),
        (
            {"mask_calc_fn": lambda q0, k0, m, w, d: torch.ones(2, 2, 5, 4, dtype=torch.bool)},
            AttentionInputError,
            r"mask_calc_fn returned shape \(2, 2, 5, 4\)",
        ),
        ({"weights_calc_fn": lambda q0, k0, w, d: None}, TypeError, r"weights_calc_fn returned None"),
        (
            {"weights_calc_fn": lambda q0, k0, w, d: w[..., :2]},
            AttentionInputError,
            r"weights_calc_fn returned shape \(2, 4, 2, 2\).*\[B\.\.\., lc, H, kc\]",
        ),
    ],
    ids=[
        "mask_mod_float",
        "mask_mod_shape",
        "score_mod_none",
        "score_mod_bool",
        "score_mod_shape",
        "bias_fn_shape",
        "mask_fn_float",
        "mask_fn_shape",
        "weights_fn_none",
        "weights_fn_shape",
    ],
)
def test_bad_callable_results_name_the_callable(kwargs, error, match):
    q, k, v = _small()
    with pytest.raises(error, match=match):
        attention(q, k, v, query_chunk_size=4, key_chunk_size=4, **kwargs)


def test_weights_calc_fn_result_broadcasts_across_heads():
    """``[..., lc, 1, kc]`` from weights_calc_fn applies to every head (here: head 0's logits)."""
    q, k, v = _small()  # H = 2, K = 1
    out = attention(
        q, k, v, query_chunk_size=4, key_chunk_size=3, weights_calc_fn=lambda q0, k0, w, d: w[..., :1, :]
    )
    d_out = _rand(*out.shape, seed=8, grad=False)
    got = _grads(out, (q, k, v), d_out)
    ref = reference_attention_torch(q[..., :1, :].expand(q.shape), k, v)
    want = _grads(ref, (q, k, v), d_out)
    _check(out, ref, "output")
    assert (got[0][..., 1, :] == 0).all()  # head 1's query takes no part
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        _check(g, w, name)


def test_score_mod_python_scalar_broadcasts():
    q, k, v = _small()
    out = attention(q, k, v, score_mod=lambda s, b, h, qi, ki: 0.0, query_chunk_size=4, key_chunk_size=4)
    ref = reference_attention_torch(q, k, v, score_mod=lambda s, *a: torch.zeros_like(s))
    _check(out, ref, "output")


# ------------------------------------------------------------------------------------------------
# 13. Empty lengths and batches
# ------------------------------------------------------------------------------------------------

EMPTY_SHAPES = {"L0": ((2,), 0, 7), "S0": ((2,), 5, 0), "Z0": ((0,), 5, 7), "B2x0": ((2, 0), 5, 7)}
EMPTY_EXTRAS = {
    "none": {},
    "causal": {"is_causal": True, "causal_alignment": "bottom_right"},
    "bias": {"bias": "full"},
    "score_mod": {"score_mod": lambda s, b, h, qi, ki: s * 0.5 - (qi - ki).abs() * 0.1},
    "mask": {"mask": "full"},
}


def _empty_inputs(shape, extra):
    batch, L, S = shape
    q, k, v = _qkv(batch=batch, L=L, S=S, H=4, K=2, D=3, E=5, seed=31)
    extra = dict(extra)
    if extra.get("bias") == "full":
        extra["bias"] = _rand(*batch, 4, L, S, seed=32)
    if extra.get("mask") == "full":
        extra["mask"] = torch.ones(*batch, 4, L, S, dtype=torch.bool)
    return q, k, v, extra


@pytest.mark.parametrize("extra", list(EMPTY_EXTRAS), ids=list(EMPTY_EXTRAS))
@pytest.mark.parametrize("shape", list(EMPTY_SHAPES), ids=list(EMPTY_SHAPES))
def test_empty_lengths_and_batches(shape, extra):
    q, k, v, kwargs = _empty_inputs(EMPTY_SHAPES[shape], EMPTY_EXTRAS[extra])
    out, lse = attention(q, k, v, return_lse=True, query_chunk_size=2, key_chunk_size=3, **kwargs)
    batch, L, S = EMPTY_SHAPES[shape]
    assert out.shape == (*batch, L, 4, 5) and lse.shape == (*batch, L, 4)
    ref_kwargs = {n: x for n, x in kwargs.items() if n != "mask"}
    if "mask" in kwargs:
        ref_kwargs["mask"] = kwargs["mask"].numpy()
    if S == 0:  # every key missing: output 0, lse -inf (the reference cannot reduce over S = 0)
        assert (out == 0).all() and (lse == -math.inf).all()
    else:
        _check(out, reference_attention_torch(q, k, v, **ref_kwargs), "output")
    leaves = [q, k, v] + ([kwargs["bias"]] if "bias" in kwargs else [])
    d_out = _rand(*out.shape, seed=33, grad=False)
    got = torch.autograd.grad((out, lse), leaves, (d_out, torch.ones_like(lse)), create_graph=True)
    for t, g in zip(leaves, got):
        assert g.shape == t.shape and (g == 0).all()
    # double backward: a penalty on dq, differentiated again
    total = sum((g**2).sum() for g in got)
    second = torch.autograd.grad(total, leaves, allow_unused=True)
    assert all(s is None or (s.shape == t.shape and (s == 0).all()) for s, t in zip(second, leaves))
    # forward mode
    primals = tuple(t.detach() for t in (q, k, v))
    tangents = tuple(torch.ones_like(t) for t in primals)
    extra_kwargs = {n: (x.detach() if torch.is_tensor(x) else x) for n, x in kwargs.items()}
    fwd, tan = torch.func.jvp(
        lambda a, b, c: attention(a, b, c, query_chunk_size=2, **extra_kwargs), primals, tangents
    )
    assert fwd.shape == out.shape and tan.shape == out.shape and (tan == 0).all()


@pytest.mark.parametrize("shape", list(EMPTY_SHAPES), ids=list(EMPTY_SHAPES))
@pytest.mark.parametrize("is_causal", [False, True])
def test_empty_drop_in_matches_torch_sdpa(shape, is_causal):
    batch, L, S = EMPTY_SHAPES[shape]
    if is_causal and L != S and 0 not in batch and L and S:
        pytest.skip("torch's causal mask is top-left")
    gen = torch.Generator().manual_seed(37)
    q, k, v = (torch.randn(*batch, 2, n, 4, generator=gen, dtype=F64).requires_grad_(True) for n in (L, S, S))
    ours = sdpa(q, k, v, is_causal=is_causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert ours.shape == theirs.shape
    _check(ours, theirs, "output")
    d_out = torch.randn(ours.shape, generator=gen, dtype=F64)
    for name, g, w in zip("qkv", _grads(ours, (q, k, v), d_out), _grads(theirs, (q, k, v), d_out)):
        _check(g if g is not None else torch.zeros_like(w), w if w is not None else torch.zeros_like(g), name)
