"""PyTorch: the backend of the shared tests (``BACKEND``, see test_backends.py) and what only
PyTorch has: the SDPA drop-in against torch's own function, the seed callbacks, bad inputs (to
both functions), the dropout generator."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import memory_efficient_attention  # noqa: E402
from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention import efficient_dot_product_attention_pt as attention  # noqa: E402
from memory_efficient_attention.torch import scaled_dot_product_attention as sdpa  # noqa: E402

from .backends import Backend  # noqa: E402
from .cases import (  # noqa: E402
    ALL_CASES,
    GRID,
    STRUCTURED,
    TOLERANCES,
    Case,
    assert_close,
    chunk_kwargs,
    make_inputs,
    reference_for,
    round_to,
)
from .reference import reference_attention, reference_grads  # noqa: E402

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_INDEX_ARGS = ("query_seq_lengths", "key_value_seq_lengths", "query_segment_ids", "key_segment_ids")


def tensor(x, dtype: str, grad: bool = False):
    if x is None:
        return None
    t = torch.tensor(np.asarray(x, dtype=np.float64)).to(TORCH_DTYPES[dtype])
    return t.requires_grad_(grad)


def torch_kwargs(kwargs: dict) -> dict:
    return {k: torch.as_tensor(v) if k in _INDEX_ARGS else v for k, v in kwargs.items()}


def run_case(case: Case, x: dict, *, grads: bool = True, **extra):
    """Our function on the case's inputs: ``(out, grads dict or None)`` as float64 NumPy."""
    q, k, v = (tensor(x[n], case.dtype, grads) for n in ("query", "key", "value"))
    bias = tensor(x["bias"], case.dtype, grads)
    mask = None if x["mask"] is None else torch.as_tensor(x["mask"])
    out = attention(q, k, v, mask, bias, **chunk_kwargs(case), **torch_kwargs(x["kwargs"]), **extra)
    if isinstance(out, tuple):
        out = out[0]
    assert out.dtype == q.dtype
    assert out.shape == (*case.batch, case.L, case.H, case.E)
    if not grads:
        return out.detach().double().numpy(), None
    leaves = {"query": q, "key": k, "value": v}
    if bias is not None:
        leaves["bias"] = bias
    d_out = tensor(x["d_out"], case.dtype)
    got = torch.autograd.grad(out, list(leaves.values()), d_out)
    for name, g in zip(leaves, got):
        assert g.dtype == leaves[name].dtype and g.shape == leaves[name].shape, name
    return out.detach().double().numpy(), {n: g.double().numpy() for n, g in zip(leaves, got)}


def run_lse(case: Case, x: dict):
    """``(attention(..., return_lse=True), attention(...))`` on the case's inputs."""
    q, k, v = (tensor(x[n], case.dtype) for n in ("query", "key", "value"))
    mask = None if x["mask"] is None else torch.as_tensor(x["mask"])
    args = (q, k, v, mask, tensor(x["bias"], case.dtype))
    kwargs = {**chunk_kwargs(case), **torch_kwargs(x["kwargs"])}
    return attention(*args, **kwargs, return_lse=True), attention(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# Reference, layouts and defaults
# ------------------------------------------------------------------------------------------


def test_reference_numpy_and_torch_agree_on_every_case():
    for case in ALL_CASES[::3]:
        x = make_inputs(case)
        out = reference_attention(
            x["query"], x["key"], x["value"], mask=x["mask"], bias=x["bias"], **x["kwargs"]
        )
        out_t, _ = reference_grads(
            x["query"], x["key"], x["value"], x["d_out"], mask=x["mask"], bias=x["bias"], **x["kwargs"]
        )
        np.testing.assert_allclose(out_t, out, rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    case = Case("basic", dtype="float64", H=2, K=2)
    x, ref_out, _, ref_grads = reference_for(case)
    # build q/k/v as transposed views of differently laid out storage
    q, k, v = (
        tensor(np.ascontiguousarray(np.swapaxes(x[n], -2, -3)), "float64")
        .transpose(-2, -3)
        .requires_grad_(False)
        for n in ("query", "key", "value")
    )
    assert not q.is_contiguous()
    out = attention(q, k, v, query_chunk_size=16, key_chunk_size=8)
    assert_close(out.numpy(), reference_attention(x["query"], x["key"], x["value"]), "float64")


def test_no_grad_inference_and_default_chunks():
    case = Case("basic", dtype="float32")
    x, ref_out, _, _ = reference_for(case)
    with torch.no_grad():
        q, k, v = (tensor(x[n], "float32") for n in ("query", "key", "value"))
        out = attention(q, k, v)
    assert_close(out.numpy(), ref_out, "float32")


# ------------------------------------------------------------------------------------------
# Seed callbacks
# ------------------------------------------------------------------------------------------


def test_callbacks_slice_full_mask_and_bias_per_chunk():
    case = Case(
        "callbacks",
        batch=(2,),
        L=37,
        S=53,
        H=2,
        K=2,
        dtype="float64",
        mask_shape=(2, 2, 37, 53),
        bias_shape=(2, 2, 37, 53),
    )
    x = make_inputs(case)
    mask_full, bias_full = torch.as_tensor(x["mask"]), tensor(x["bias"], "float64")
    calls = []

    def bias_fn(q0, k0, bias_chunk, w, data):
        assert data is bias_full
        assert bias_chunk is None
        lc, kc = w.shape[-3], w.shape[-1]
        assert w.shape == (2, lc, 2, kc)
        calls.append(("bias", int(q0), int(k0), lc, kc))
        return data[..., q0 : q0 + lc, k0 : k0 + kc]

    def mask_fn(q0, k0, mask_chunk, w, data):
        lc, kc = w.shape[-3], w.shape[-1]
        calls.append(("mask", int(q0), int(k0), lc, kc))
        return mask_full[..., q0 : q0 + lc, k0 : k0 + kc]

    q, k, v = (tensor(x[n], "float64") for n in ("query", "key", "value"))
    with torch.no_grad():
        out = attention(
            q,
            k,
            v,
            query_chunk_size=16,
            key_chunk_size=8,
            bias_calc_fn=bias_fn,
            mask_calc_fn=mask_fn,
            calc_fn_data=bias_full,
        )
    ref = reference_attention(x["query"], x["key"], x["value"], mask=x["mask"], bias=x["bias"])
    assert_close(out.numpy(), ref, "float64")
    expected = {
        (q0, k0, min(16, 37 - q0), min(8, 53 - k0))
        for q0, k0 in itertools.product(range(0, 37, 16), range(0, 53, 8))
    }
    for kind in ("bias", "mask"):
        got = [c[1:] for c in calls if c[0] == kind]
        assert sorted(got) == sorted(expected), kind  # once per chunk pair


def test_weights_callback_sees_scaled_logits():
    case = Case("weights_cb", batch=(), L=11, S=13, H=2, K=1, dtype="float64")
    x = make_inputs(case)
    q, k, v = (tensor(x[n], "float64", True) for n in ("query", "key", "value"))
    shift = torch.linspace(-1, 1, 13, dtype=torch.float64)
    seen = []

    def weights_fn(q0, k0, w, data):
        lc, kc = w.shape[-3], w.shape[-1]
        # w is [qc, H, kc]: the scaled logits of the chunk
        logits = torch.einsum(
            "lhd,shd->lhs", q[q0 : q0 + lc].detach(), k[k0 : k0 + kc].detach().repeat_interleave(2, dim=-2)
        ) / math.sqrt(8)
        seen.append(torch.allclose(w.detach(), logits, rtol=1e-12, atol=1e-12))
        return w + data[k0 : k0 + kc]

    out = attention(
        q, k, v, query_chunk_size=4, key_chunk_size=5, weights_calc_fn=weights_fn, calc_fn_data=shift
    )
    assert seen and all(seen)
    bias = np.broadcast_to(shift.numpy(), (2, 11, 13))
    ref, ref_grads = reference_grads(x["query"], x["key"], x["value"], x["d_out"], bias=bias)
    assert_close(out.detach().numpy(), ref, "float64")
    got = torch.autograd.grad(out, (q, k, v), tensor(x["d_out"], "float64"))
    for name, g in zip(("query", "key", "value"), got):
        assert_close(g.numpy(), ref_grads[name], "float64", f"d{name}")


# ------------------------------------------------------------------------------------------
# The drop-in for torch.nn.functional.scaled_dot_product_attention
# ------------------------------------------------------------------------------------------

SDPA_CASES = {
    # name: (q shape, k shape, v shape, mask kind, mask shape, kwargs)
    "basic": ((2, 3, 17, 8), (2, 3, 23, 8), (2, 3, 23, 6), None, None, {}),
    "bool_mask": ((2, 3, 17, 8), (2, 3, 23, 8), (2, 3, 23, 8), "bool", (17, 23), {}),
    "bool_mask_empty_rows": ((2, 2, 9, 8), (2, 2, 12, 8), (2, 2, 12, 8), "bool_rows", (2, 1, 9, 12), {}),
    "float_mask": ((2, 3, 17, 8), (2, 3, 23, 8), (2, 3, 23, 8), "float", (2, 1, 17, 23), {}),
    "float_mask_full": ((2, 2, 9, 4), (2, 2, 12, 4), (2, 2, 12, 4), "float", (2, 2, 9, 12), {}),
    "float_mask_inf_rows": ((1, 2, 9, 8), (1, 2, 12, 8), (1, 2, 12, 8), "float_inf_rows", (1, 2, 9, 12), {}),
    "causal_l_lt_s": ((2, 2, 13, 8), (2, 2, 21, 8), (2, 2, 21, 8), None, None, {"is_causal": True}),
    "causal_l_gt_s": ((2, 2, 21, 8), (2, 2, 13, 8), (2, 2, 13, 8), None, None, {"is_causal": True}),
    "causal_scale": (
        (1, 2, 16, 8),
        (1, 2, 16, 8),
        (1, 2, 16, 8),
        None,
        None,
        {"is_causal": True, "scale": 0.3},
    ),
    "gqa": ((2, 4, 11, 8), (2, 2, 15, 8), (2, 2, 15, 8), "bool", (2, 4, 11, 15), {"enable_gqa": True}),
    "mqa_float_mask": ((1, 4, 11, 8), (1, 1, 15, 8), (1, 1, 15, 5), "float", (11, 15), {"enable_gqa": True}),
    "extra_batch_dims": ((2, 3, 2, 7, 4), (2, 3, 2, 9, 4), (2, 3, 2, 9, 4), "bool", (3, 1, 7, 9), {}),
    "three_dims": ((2, 7, 4), (2, 9, 4), (2, 9, 6), None, None, {}),
    "single": ((1, 1, 1, 4), (1, 1, 1, 4), (1, 1, 1, 4), None, None, {}),
    "all_rows_masked": ((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4), "bool_none", (5, 6), {}),
}


def _sdpa_inputs(name, dtype):
    q_shape, k_shape, v_shape, kind, m_shape, kwargs = SDPA_CASES[name]
    rng = np.random.default_rng([7, len(name), sum(map(ord, name))])
    q, k, v = (round_to(rng.standard_normal(s), dtype) for s in (q_shape, k_shape, v_shape))
    d_out = round_to(rng.standard_normal((*q_shape[:-1], v_shape[-1])), dtype)
    mask = None
    if kind in ("bool", "bool_rows", "bool_none"):
        mask = rng.random(m_shape) < 0.7
        if kind == "bool_rows":
            mask[..., [0, 4], :] = False
        if kind == "bool_none":
            mask[...] = False
        mask = torch.as_tensor(mask)
    elif kind in ("float", "float_inf_rows"):
        mask = round_to(rng.standard_normal(m_shape), dtype)
        if kind == "float_inf_rows":
            mask[..., 2, :] = -np.inf
            mask[..., 5, ::2] = -np.inf
        mask = tensor(mask, dtype, True)
    return q, k, v, d_out, mask, kwargs


def _run_sdpa(fn, q, k, v, d_out, mask, kwargs, dtype):
    q, k, v = (tensor(a, dtype, True) for a in (q, k, v))
    leaves = [q, k, v] + ([mask] if mask is not None and mask.is_floating_point() else [])
    out = fn(q, k, v, attn_mask=mask, **kwargs)
    grads = torch.autograd.grad(out, leaves, tensor(d_out, dtype))
    return out, grads


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa_drop_in_matches_torch(name, dtype):
    q, k, v, d_out, mask, kwargs = _sdpa_inputs(name, dtype)
    ours, our_grads = _run_sdpa(sdpa, q, k, v, d_out, mask, kwargs, dtype)
    theirs, their_grads = _run_sdpa(F.scaled_dot_product_attention, q, k, v, d_out, mask, kwargs, dtype)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.isfinite(ours).all()
    assert_close(ours.detach().numpy(), theirs.detach().double().numpy(), dtype, "output", 2.0)
    for i, (a, b) in enumerate(zip(our_grads, their_grads)):
        assert a.shape == b.shape
        assert_close(a.double().numpy(), b.double().numpy(), dtype, f"grad {i}", 2.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["basic", "bool_mask_empty_rows", "float_mask", "gqa", "causal_l_gt_s"])
def test_sdpa_drop_in_low_precision(name, dtype):
    q, k, v, d_out, mask, kwargs = _sdpa_inputs(name, dtype)
    ours, our_grads = _run_sdpa(sdpa, q, k, v, d_out, mask, kwargs, dtype)
    # torch's own function on the same (rounded) numbers in float64
    mask64 = mask
    if mask is not None and mask.is_floating_point():
        mask64 = mask.detach().double().requires_grad_(True)
    ref, ref_grads = _run_sdpa(F.scaled_dot_product_attention, q, k, v, d_out, mask64, kwargs, "float64")
    assert ours.dtype == TORCH_DTYPES[dtype]
    assert_close(ours.detach().double().numpy(), ref.detach().numpy(), dtype, "output")
    for i, (a, b) in enumerate(zip(our_grads, ref_grads)):
        assert_close(a.double().numpy(), b.numpy(), dtype, f"grad {i}")


def test_sdpa_fully_masked_rows_are_zero_with_zero_grad():
    q, k, v, d_out, mask, kwargs = _sdpa_inputs("bool_mask_empty_rows", "float64")
    out, grads = _run_sdpa(sdpa, q, k, v, d_out, mask, kwargs, "float64")
    assert torch.all(out[..., [0, 4], :] == 0)
    assert torch.all(grads[0][..., [0, 4], :] == 0)
    assert all(torch.isfinite(g).all() for g in grads)


def test_sdpa_dropout_follows_torch_manual_seed():
    q, k, v, _, _, _ = _sdpa_inputs("basic", "float64")
    q, k, v = (tensor(a, "float64") for a in (q, k, v))
    torch.manual_seed(3)
    a = sdpa(q, k, v, dropout_p=0.4)
    torch.manual_seed(3)
    b = sdpa(q, k, v, dropout_p=0.4)
    c = sdpa(q, k, v, dropout_p=0.4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, sdpa(q, k, v))
    assert torch.isfinite(a).all()


# ------------------------------------------------------------------------------------------
# Bad input: AttentionInputError (a ValueError) naming the argument, before any computation
# ------------------------------------------------------------------------------------------

_COMPUTE_OPS = {
    "mm",
    "bmm",
    "baddbmm",
    "addmm",
    "matmul",
    "exp",
    "_softmax",
    "softmax",
    "amax",
    "max",
    "logsumexp",
    "tanh",
    "einsum",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_attention_math",
}


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _raises_before_compute(fn, *args, words, **kwargs):
    calls = []

    def spy(b, h, q_idx, kv_idx):  # would run during the computation
        calls.append(1)
        return kv_idx >= 0

    if fn is attention:
        kwargs.setdefault("mask_mod", spy)
    with _RecordOps() as rec, pytest.raises(AttentionInputError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert not calls, "mask_mod ran before validation"
    ran = set(rec.ops) & _COMPUTE_OPS
    assert not ran, f"computation ran before the error: {ran}"
    return message


def _qkv(q_shape=(2, 7, 2, 8), k_shape=(2, 9, 2, 8), v_shape=(2, 9, 2, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=g, dtype=dtype) for s in (q_shape, k_shape, v_shape))


def _hf(*shapes):  # heads-first shapes for the SDPA drop-in
    return _qkv(*shapes)


def _hf_from_seed(*shapes):  # the seed layout's [B..., L, H, D] shapes, heads first
    return _hf(*((*s[:-3], s[-2], s[-3], s[-1]) for s in shapes))


def test_bad_depth():
    _raises_before_compute(attention, *_qkv(k_shape=(2, 9, 2, 6)), words=["query", "key"])
    _raises_before_compute(sdpa, *_hf((2, 2, 7, 8), (2, 2, 9, 6), (2, 2, 9, 8)), words=["query", "key"])


def test_sdpa_heads_differ_without_enable_gqa():
    _raises_before_compute(sdpa, *_hf((2, 4, 7, 8), (2, 2, 9, 8), (2, 2, 9, 8)), words=["enable_gqa"])


@pytest.mark.parametrize("shape", [(7, 8), (3, 7, 9), (2, 2, 1, 7, 9), (3, 2, 7, 9)])
def test_bad_mask_and_bias_shapes(shape):
    q, k, v = _qkv()
    _raises_before_compute(
        attention, q, k, v, mask=torch.ones(shape, dtype=torch.bool), words=["mask", str(shape[-1])]
    )
    _raises_before_compute(attention, q, k, v, bias=torch.zeros(shape), words=["bias"])
    hq, hk, hv = _hf((2, 2, 7, 8), (2, 2, 9, 8), (2, 2, 9, 8))
    _raises_before_compute(sdpa, hq, hk, hv, attn_mask=torch.zeros(shape), words=["attn_mask"])


@pytest.mark.parametrize("position", [0, 1, 2])
def test_too_few_dims(position):
    name = ("query", "key", "value")[position]
    args = list(_qkv((7, 2, 8), (9, 2, 8), (9, 2, 8)))
    args[position] = args[position][0]
    _raises_before_compute(attention, *args, words=[name])
    # the drop-in takes what torch takes down to 2-D ([L, D] against [B, S, D] broadcasts);
    # 1-D is refused by both
    args = list(_hf((2, 7, 8), (2, 9, 8), (2, 9, 8)))
    args[position] = args[position][0, 0]
    _raises_before_compute(sdpa, *args, words=[name])


@pytest.mark.parametrize("position", [1, 2])
def test_mixed_dtypes(position):
    name = ("query", "key", "value")[position]
    args = list(_qkv())
    args[position] = args[position].double()
    _raises_before_compute(attention, *args, words=[name])
    args = list(_hf((2, 2, 7, 8), (2, 2, 9, 8), (2, 2, 9, 8)))
    args[position] = args[position].half()
    _raises_before_compute(sdpa, *args, words=[name])


# ------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_dropout_is_reproducible_per_generator_state():
    case = Case("drop", batch=(2,), L=13, S=17, H=2, K=1, dtype="float64", q_chunk=4, k_chunk=8)
    x = make_inputs(case)
    q, k, v = (tensor(x[n], "float64") for n in ("query", "key", "value"))
    a = attention(q, k, v, dropout_rate=0.3, generator=_gen(1), query_chunk_size=4, key_chunk_size=8)
    b = attention(q, k, v, dropout_rate=0.3, generator=_gen(1), query_chunk_size=4, key_chunk_size=8)
    c = attention(q, k, v, dropout_rate=0.3, generator=_gen(2), query_chunk_size=4, key_chunk_size=8)
    plain = attention(q, k, v)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, plain)
    assert torch.isfinite(a).all()
    _, lse_drop = attention(q, k, v, dropout_rate=0.3, generator=_gen(1), return_lse=True)
    _, lse = attention(q, k, v, return_lse=True)
    torch.testing.assert_close(lse_drop, lse, rtol=1e-12, atol=1e-12)


def test_dropout_statistics():
    """With one-hot values the output is the dropped, rescaled probability matrix itself."""
    p, seeds = 0.25, 200
    L, S = 3, 5
    rng = np.random.default_rng(11)
    q = torch.tensor(rng.standard_normal((L, 1, 4)))
    k = torch.tensor(rng.standard_normal((S, 1, 4)))
    v = torch.eye(S, dtype=torch.float64).reshape(S, 1, S)
    probs = attention(q, k, v)[:, 0]  # [L, S]: the softmax itself
    outs = torch.stack([attention(q, k, v, dropout_rate=p, generator=_gen(s))[:, 0] for s in range(seeds)])
    kept = outs != 0
    # every kept entry is p_ij / (1 - p), every dropped one exactly 0
    expected = (probs / (1 - p)).expand_as(outs)
    torch.testing.assert_close(outs[kept], expected[kept], rtol=1e-12, atol=1e-12)
    frac = 1 - kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / outs.numel())
    assert abs(frac - p) < 5 * sigma, frac
    # the mean over seeds approaches the no-dropout output
    mean = outs.mean(0)
    bound = 5 * probs * math.sqrt(p / (1 - p) / seeds) + 1e-12
    assert torch.all((mean - probs).abs() <= bound), (mean, probs)


def test_dropout_gradients_use_the_forward_mask():
    case = Case(
        "drop_grad",
        batch=(2,),
        L=9,
        S=11,
        H=2,
        K=2,
        dtype="float64",
        q_chunk=4,
        k_chunk=4,
        bias_shape=(1, 2, 9, 11),
    )
    x = make_inputs(case)
    q, k, v = (tensor(x[n], "float64", True) for n in ("query", "key", "value"))
    bias = tensor(x["bias"], "float64", True)
    d_out = tensor(x["d_out"], "float64")

    def f(q, k, v, bias):
        return attention(
            q,
            k,
            v,
            bias=bias,
            dropout_rate=0.3,
            generator=_gen(5),
            query_chunk_size=4,
            key_chunk_size=4,
            is_causal=True,
        )

    out = f(q, k, v, bias)
    gq, gk, gv, gb = torch.autograd.grad(out, (q, k, v, bias), d_out)
    # out is linear in v for a fixed dropout mask
    assert torch.allclose((d_out * out).sum(), (gv * v).sum(), rtol=1e-10, atol=1e-10)
    # directional derivatives by central differences (same generator seed each call)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for leaf, grad in ((q, gq), (k, gk), (bias, gb)):
        direction = torch.tensor(rng.standard_normal(leaf.shape))
        with torch.no_grad():
            args = {"q": q, "k": k, "v": v, "bias": bias}
            name = next(n for n, t in args.items() if t is leaf)
            plus = f(**{**args, name: leaf + eps * direction})
            minus = f(**{**args, name: leaf - eps * direction})
        numeric = ((plus - minus) * d_out).sum() / (2 * eps)
        analytic = (grad * direction).sum()
        assert torch.allclose(numeric, analytic, rtol=1e-5, atol=1e-6), (name, numeric, analytic)


def test_tolerance_table_covers_dtypes():
    assert set(TOLERANCES) == set(TORCH_DTYPES)
    assert len({c.id for c in GRID + STRUCTURED}) == len(GRID + STRUCTURED)


BACKEND = Backend(
    name="torch",
    fn=attention,
    module=memory_efficient_attention.torch,
    alias="efficient_dot_product_attention_pt",
    attention=run_case,
    attention_lse=run_lse,
    numpy=lambda t: t.detach().double().numpy(),
    dtype=lambda t: str(t.dtype).removeprefix("torch."),
    raises_before_compute=_raises_before_compute,
    qkv=_qkv,
    drop_in=sdpa,
    drop_in_qkv=_hf_from_seed,
    drop_in_gqa={"enable_gqa": True},
    as_dtype=lambda t, name: t.to(getattr(torch, name)),
    chunk_sweep=((1, 1), (3, 7), (16, 8), (8, 16), (64, 64), (None, None)),
)
