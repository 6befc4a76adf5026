"""The PyTorch engines: the chunked loop and the fused CPU kernel per span, each against the
float64 reference on the shared grid, the choice between them (``engine=``, ``explain``, the
fallbacks of the backward) and the span plan (``_spans``)."""

from __future__ import annotations

import functools
import logging
import math
import types
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from memory_efficient_attention._masks import FULL, PARTIAL, StructuredMask  # noqa: E402
from memory_efficient_attention._spans import DIAGONAL, SpanPlan  # noqa: E402
from memory_efficient_attention._spec import AttentionInputError  # noqa: E402
from memory_efficient_attention.torch import _engines, _fused, _span_kernels, explain  # noqa: E402
from memory_efficient_attention.torch import efficient_dot_product_attention as attention  # noqa: E402
from memory_efficient_attention.torch import kernel as torch_kernel  # noqa: E402

from .cases import ALL_CASES, assert_close, chunk_kwargs, empty_rows, reference_for  # noqa: E402
from .cuda_fakes import FakeCudaOps  # noqa: E402
from .reference import reference_attention, reference_grads, structured_keep  # noqa: E402
from .test_torch import run_case, tensor, torch_kwargs  # noqa: E402


def fused_eligible(case) -> bool:
    """What the fused engine takes: no per-element user work, no seed-rule dense mask, E = D."""
    plain = case.score_mod is None and case.logits_soft_cap is None
    return plain and case.mask_shape is None and case.E == case.D


def _explained(case, x, **extra) -> str:
    q, k, v = (tensor(x[n], case.dtype) for n in ("query", "key", "value"))
    mask = None if x["mask"] is None else torch.as_tensor(x["mask"])
    bias = tensor(x["bias"], case.dtype)
    return explain(q, k, v, mask, bias, **chunk_kwargs(case), **torch_kwargs(x["kwargs"]), **extra)


# ------------------------------------------------------------------------------------------
# The grid on each engine
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, engine",
    [pytest.param(c, "chunked", id=f"chunked-{c.id}") for c in ALL_CASES]
    + [pytest.param(c, "fused", id=f"fused-{c.id}") for c in ALL_CASES if fused_eligible(c)],
)
def test_grid_on_each_engine(case, engine):
    x, ref_out, _, ref_grads = reference_for(case)
    if engine == "fused":
        assert _explained(case, x, engine="fused").startswith("engine: fused")
    _run_grid_case(case, x, ref_out, ref_grads, engine)


def _run_grid_case(case, x, ref_out, ref_grads, engine):
    out, grads = run_case(case, x, engine=engine)
    assert_close(out, ref_out, case.dtype, "output")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, case.dtype, f"d{name}")
    empty = empty_rows(case, x)
    if empty.any():
        assert np.all(out[empty] == 0) and np.all(grads["query"][empty] == 0)


def test_auto_picks_fused_for_plain_and_structured_calls_and_chunked_otherwise():
    q = torch.randn(2, 50, 4, 16)
    assert explain(q, q, q).startswith("engine: fused")
    assert explain(q, q, q, is_causal=True, local_window_size=(2048, 0)).startswith("engine: fused")
    docs = torch.arange(50).repeat(2, 1) // 10
    packed = explain(q, q, q, query_segment_ids=docs, key_segment_ids=docs)
    assert packed.startswith("engine: chunked") and "segment ids" in packed
    narrow = explain(q, q, q, is_causal=True, local_window_size=5)
    assert narrow.startswith("engine: chunked") and "local window of 11 keys" in narrow
    for kwargs, words in [
        (dict(logits_soft_cap=20.0), "soft cap"),
        (dict(score_mod=lambda s, b, h, i, j: s), "score_mod"),
        (dict(dropout_rate=0.1), "dropout"),
        (dict(mask=torch.ones(50, 50, dtype=torch.bool)), "finfo.min"),
        (dict(engine="chunked"), "engine='chunked'"),
    ]:
        text = explain(q, q, q, **kwargs)
        assert text.startswith("engine: chunked") and words in text, text
    v = torch.randn(2, 50, 4, 8)
    assert "value depth E=8" in explain(q, q, v)
    bias = torch.zeros(50, 50)
    assert explain(q, q, q, bias=bias).startswith("engine: fused")
    bias[3, :] = -math.inf
    assert "-inf" in explain(q, q, q, bias=bias)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(logits_soft_cap=20.0), "soft cap"),
        (dict(score_mod=lambda s, b, h, i, j: s * 2), "score_mod"),
        (dict(dropout_rate=0.5), "dropout"),
        (dict(mask=torch.ones(9, 9, dtype=torch.bool)), "mask_fill='min'"),
    ],
)
def test_forced_fused_engine_refuses_what_it_cannot_run(kwargs, words):
    q = torch.randn(1, 9, 2, 8)
    with pytest.raises(AttentionInputError, match="engine='fused' cannot run") as err:
        attention(q, q, q, engine="fused", **kwargs)
    assert words in str(err.value)


def test_engine_argument_is_checked():
    q = torch.randn(1, 9, 2, 8)
    with pytest.raises(AttentionInputError, match="engine must be one of"):
        attention(q, q, q, engine="flash")


def test_debug_log_names_the_engines(caplog):
    q, k, v = (torch.randn(1, 20, 2, 8, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, 20, 20, requires_grad=True)
    with caplog.at_level(logging.DEBUG, logger="memory_efficient_attention"):
        attention(q, k, v).sum().backward()
        attention(q, k, v, bias=bias).sum().backward()
    text = caplog.text
    assert "forward: fused engine" in text and "backward: fused engine" in text
    assert "backward: chunked engine (it needs a bias gradient)" in text


# ------------------------------------------------------------------------------------------
# Paths the grid does not reach: many spans, dense boolean masks, bias without gradient, the
# backward's fallbacks, higher derivatives on a fused forward
# ------------------------------------------------------------------------------------------


def _qkv(b=2, L=70, S=90, H=4, K=2, D=8, dtype=torch.float64, grad=True):
    gen = torch.Generator().manual_seed(L * 1000 + S)
    shapes = [(b, L, H, D), (b, S, K, D), (b, S, K, D)]
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_(grad) for s in shapes]


def _check_against_reference(q, k, v, *, ref_kwargs, factor=1.0, **kwargs):
    out = attention(q, k, v, **kwargs)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    numpy = {n: x.detach().double().numpy() for n, x in zip(("q", "k", "v"), (q, k, v))}
    ref_out, ref_grads = reference_grads(*numpy.values(), d_out.double().numpy(), **ref_kwargs)
    dtype = str(q.dtype).removeprefix("torch.")
    assert_close(out.detach().double().numpy(), ref_out, dtype, "output", factor)
    for g, name in zip(grads, ("query", "key", "value")):
        assert_close(g.double().numpy(), ref_grads[name], dtype, f"d{name}", factor)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(is_causal=True),
        dict(is_causal=True, causal_alignment="bottom_right"),
        dict(local_window_size=(9, 4)),
        dict(is_causal=True, local_window_size=(30, 0), causal_alignment="bottom_right"),
        dict(query_seq_lengths=[70, 33], key_value_seq_lengths=[90, 41]),
        dict(segments=True),
        dict(mask_mod="band"),
    ],
    ids=lambda kw: "-".join(kw),
)
@pytest.mark.parametrize("shape", [(70, 90), (90, 70)], ids=["L<S", "L>S"])
def test_many_spans_merged_by_lse(monkeypatch, kwargs, shape):
    """Tiny spans (16 query rows, 128-key partial spans) so that every row merges several spans."""
    monkeypatch.setattr(_fused, "SPAN_Q", 16)
    monkeypatch.setattr(_fused, "MASK_ELEMENTS", 1)
    L, S = shape
    q, k, v = _qkv(L=L, S=S)
    kwargs = dict(kwargs)
    if kwargs.pop("segments", False):
        kwargs["query_segment_ids"] = torch.arange(L).repeat(2, 1) * 3 // L
        kwargs["key_segment_ids"] = torch.arange(S).repeat(2, 1) * 3 // S
    if kwargs.get("mask_mod") == "band":
        kwargs["mask_mod"] = lambda b, h, i, j: abs(i - j) <= 12
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kwargs:
            kwargs[name] = torch.tensor([min(x, L if name[0] == "q" else S) for x in kwargs[name]])
    text = explain(q, k, v, engine="fused", **kwargs)
    assert text.startswith("engine: fused") and "calls" in text
    ref_kwargs = {n: (x.numpy() if torch.is_tensor(x) else x) for n, x in kwargs.items()}
    _check_against_reference(q, k, v, ref_kwargs=ref_kwargs, engine="fused", **kwargs)


def test_causal_bottom_right_with_more_queries_than_keys_plans_no_dense_mask():
    plan = _fused.span_plan(_config(L=5000, S=3000, causal="bottom_right"), _no_operands(5000))
    assert all(span.k1 - span.k0 <= 1024 or span.kind != PARTIAL for span in plan.spans)
    assert all(q1 - q0 <= _fused.SPAN_Q for q0, q1, _ in plan.rows)
    # the first 2000 rows see no key: no span at all
    assert all(not spans for q0, q1, spans in plan.rows if q1 <= 2000)


def _config(L, S, causal):
    from memory_efficient_attention._config import make_config
    from memory_efficient_attention._spec import Dims

    return make_config(Dims((1,), L, S, 1, 1, 8, 8), "float32", is_causal=True, causal_alignment=causal)


def _no_operands(L):
    from memory_efficient_attention.torch._function import Operands

    return Operands(q=torch.zeros(1, 1, L, 1, 8), k=None, v=None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sdpa_drop_in_boolean_masks_on_the_fused_engine(dtype):
    """Boolean masks exclude keys (torch's rule): rows masked everywhere give 0, and the fused
    engine agrees with torch's own SDPA and with the chunked engine."""
    from memory_efficient_attention.torch import scaled_dot_product_attention as sdpa

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=gen).to(dt).requires_grad_() for _ in range(3))
    mask = torch.rand(2, 1, 33, 33, generator=gen) > 0.3
    mask[:, :, 5] = False
    out = sdpa(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (got,) = torch.autograd.grad(out.float().square().sum(), q)
    (want,) = torch.autograd.grad(ref.float().square().sum(), q)
    assert torch.all(out[:, :, 5] == 0) and torch.all(got[:, :, 5] == 0)
    tol = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol * 10)
    q5 = q.unflatten(1, (4, 1)).transpose(2, 3)
    k4, v4 = k, v
    from memory_efficient_attention._spec import heads_first_dims

    dims = heads_first_dims(q.shape, k.shape, v.shape, enable_gqa=False)
    names = ("attn_mask", "attn_mask")
    both = [
        torch_kernel.attention(q5, k4, v4, dims, mask=mask, operand_names=names, engine=e)[0]
        for e in ("fused", "chunked")
    ]
    torch.testing.assert_close(both[0], both[1], atol=tol, rtol=tol)


def test_bias_without_gradient_runs_fused_both_ways_and_with_gradient_falls_back(caplog):
    q, k, v = _qkv()
    bias = torch.randn(2, 4, 70, 90, dtype=torch.float64)
    _check_against_reference(q, k, v, bias=bias, ref_kwargs=dict(bias=bias.numpy()), engine="fused")
    bias.requires_grad_(True)
    with caplog.at_level(logging.DEBUG, logger="memory_efficient_attention"):
        out = attention(q, k, v, bias=bias, engine="fused")
        d_out = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, bias), d_out)
    assert "backward: chunked engine" in caplog.text
    n = {x: t.detach().numpy() for x, t in zip("qkvb", (q, k, v, bias))}
    _, ref = reference_grads(n["q"], n["k"], n["v"], d_out.numpy(), bias=n["b"])
    for g, name in zip(got, ("query", "key", "value", "bias")):
        assert_close(g.numpy(), ref[name], "float64", name)


def test_lse_gradient_runs_fused_and_equals_the_chunked_backward(caplog):
    q, k, v = _qkv()
    outs = {}
    for engine in ("fused", "chunked"):
        with caplog.at_level(logging.DEBUG, logger="memory_efficient_attention"):
            out, lse = attention(q, k, v, is_causal=True, return_lse=True, engine=engine)
            outs[engine] = torch.autograd.grad((out.sum() + lse.square().sum()), (q, k, v))
        numpy = (t.detach().numpy() for t in (q, k, v))
        ref_out, ref_lse = reference_attention(*numpy, is_causal=True, return_lse=True)
        assert_close(out.detach().numpy(), ref_out, "float64", "out")
        assert_close(lse.detach().numpy(), ref_lse, "float64", "lse")
    for a, b in zip(outs["fused"], outs["chunked"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert "backward: fused engine" in caplog.text
    # half precision, or a row whose dO is 0 while its lse has a gradient: the chunked backward
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="memory_efficient_attention"):
        out, lse = attention(q, k, v, is_causal=True, return_lse=True, engine="fused")
        got = torch.autograd.grad(lse.sum(), (q, k, v))  # dO = 0 everywhere
    assert "backward: chunked engine (it needs a gradient of the returned lse" in caplog.text
    _, lse_c = attention(q, k, v, is_causal=True, return_lse=True, engine="chunked")
    for a, b in zip(got, torch.autograd.grad(lse_c.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_second_derivatives_and_forward_mode_after_a_fused_forward():
    q, k, v = _qkv(L=20, S=30)
    results = {}
    for engine in ("fused", "chunked"):
        kwargs = dict(is_causal=True, causal_alignment="bottom_right", engine=engine)
        out = attention(q, k, v, **kwargs)
        (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        (ddk,) = torch.autograd.grad(dq.sum(), k)
        tangents = tuple(torch.ones_like(t) for t in (q, k, v))
        primals = (q.detach(), k.detach(), v.detach())
        _, jvp = torch.func.jvp(functools.partial(attention, **kwargs), primals, tangents)
        results[engine] = (dq, ddk, jvp)
    for a, b in zip(results["fused"], results["chunked"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.fixture
def fresh_checks(monkeypatch):
    """Kernel checks and warnings from scratch, and again after the test."""
    _span_kernels._check.cache_clear()
    monkeypatch.setattr(_engines, "_warned", set())
    yield
    _span_kernels._check.cache_clear()


def test_missing_fused_kernel_falls_back_once_with_a_warning(monkeypatch, fresh_checks):
    monkeypatch.setattr(_span_kernels, "OPS", types.SimpleNamespace())  # a torch without the op
    q = torch.randn(1, 12, 2, 8)
    with pytest.warns(UserWarning, match="has no aten._scaled_dot_product_flash_attention_for_cpu: "
                      "memory_efficient_attention uses its chunked"):  # fmt: skip
        out = attention(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, q, q)  # said once
    torch.testing.assert_close(out, attention(q, q, q, engine="chunked"))
    with pytest.raises(AttentionInputError, match="_for_cpu"):
        attention(q, q, q, engine="fused")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_fused_kernel_check_passes_on_this_torch(dtype):
    assert _span_kernels.broken("cpu", dtype, 8) is None
    assert [k.name for k in _span_kernels.kernels_for("cpu", dtype, 8)] == ["flash-attention CPU kernel"]


# ------------------------------------------------------------------------------------------
# The CUDA kernels' plumbing, on CPU (stand-ins following the CUDA operators' contracts)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch, fresh_checks):
    """CPU arrays take the CUDA kernels, whose operators are ``cuda_fakes.FakeCudaOps``
    (float64 admitted everywhere, any depth, so the float64 reference applies)."""
    ops = FakeCudaOps()
    monkeypatch.setattr(_span_kernels, "OPS", ops)
    kernels = []
    for kern in (
        _span_kernels.CudaFlash(),
        _span_kernels.CudaFlash(gqa=False),
        _span_kernels.CudaEfficient(),
    ):
        kern.dtypes = (*kern.dtypes, torch.float64)
        kern.depth_multiple = 1
        kernels.append(kern)
    monkeypatch.setitem(_span_kernels.KERNELS, "cpu", tuple(kernels))
    assert len(_span_kernels.kernels_for("cpu", torch.float64, 8)) == 3  # their checks, done
    ops.calls.clear()
    return ops


def test_cuda_kernels_pass_their_check_on_the_stand_ins(fake_cuda):
    assert _span_kernels.broken("cpu", torch.float64, 8) is None
    names = [repr(k) for k in _span_kernels.kernels_for("cpu", torch.float64, 8)]
    assert names == [
        "FlashAttention-2 CUDA kernel (aten._scaled_dot_product_flash_attention)",
        "FlashAttention-2 CUDA kernel (aten._scaled_dot_product_flash_attention, K/V heads repeated)",
        "memory-efficient CUDA kernel (aten._scaled_dot_product_efficient_attention, K/V heads repeated)",
    ]
    text = explain(*_qkv(L=30, S=30), is_causal=True, causal_alignment="bottom_right")
    assert text.startswith("engine: fused (torch's FlashAttention-2 CUDA kernel per span without a mask, "
                           "memory-efficient CUDA kernel with one")  # fmt: skip


@pytest.mark.parametrize("case", [c for c in ALL_CASES if fused_eligible(c)], ids=lambda c: c.id)
def test_grid_on_the_cuda_kernels(case, fake_cuda):
    x, ref_out, _, ref_grads = reference_for(case)
    _run_grid_case(case, x, ref_out, ref_grads, "fused")
    assert fake_cuda.calls, "the CUDA operators ran"


def test_cuda_kernels_take_the_spans_they_can(fake_cuda, monkeypatch):
    """Full and square causal spans go to FlashAttention-2; masked spans and a causal span with
    more rows than keys (top-left) go to the memory-efficient kernel; GQA is repeated there."""
    q, k, v = _qkv(L=40, S=30)  # 4 query heads on 2 key/value heads
    _check_against_reference(q, k, v, is_causal=True, ref_kwargs=dict(is_causal=True), engine="fused")
    assert {c[:4] for c in fake_cuda.calls} == {("efficient", 40, 30, True)}  # forward and none else
    fake_cuda.calls.clear()
    q, k, v = _qkv(L=30, S=50)
    kw = dict(is_causal=True, causal_alignment="bottom_right")
    _check_against_reference(q, k, v, ref_kwargs=kw, engine="fused", **kw)
    assert fake_cuda.calls == [("flash", 30, 20, False, False), ("flash", 30, 30, True, False)]
    fake_cuda.calls.clear()
    monkeypatch.setattr(_fused, "SPAN_Q", 16)
    monkeypatch.setattr(_fused, "MASK_ELEMENTS", 1)
    kw = dict(local_window_size=(9, 4), key_value_seq_lengths=torch.tensor([50, 17]))
    ref = dict(local_window_size=(9, 4), key_value_seq_lengths=np.array([50, 17]))
    _check_against_reference(q, k, v, ref_kwargs=ref, engine="fused", **kw)
    assert {c[0] for c in fake_cuda.calls} == {"efficient"} and all(c[4] for c in fake_cuda.calls)


@pytest.mark.parametrize(
    "kwargs",
    [dict(is_causal=True), dict(local_window_size=(9, 4)), dict(segments=True)],
    ids=lambda kw: "-".join(kw),
)
def test_many_spans_on_the_cuda_kernels(fake_cuda, monkeypatch, kwargs):
    test_many_spans_merged_by_lse(monkeypatch, kwargs, (70, 90))
    want = {"is_causal": {"flash"}, "local_window_size": {"flash", "efficient"}, "segments": {"efficient"}}
    assert {c[0] for c in fake_cuda.calls} == want[next(iter(kwargs))]


def test_cuda_lse_gradient_and_bias_on_the_cuda_kernels(fake_cuda):
    q, k, v = _qkv()
    bias = torch.randn(2, 4, 70, 90, dtype=torch.float64)
    _check_against_reference(q, k, v, bias=bias, ref_kwargs=dict(bias=bias.numpy()), engine="fused")
    out, lse = attention(q, k, v, is_causal=True, return_lse=True, engine="fused")
    got = torch.autograd.grad(out.sum() + lse.square().sum(), (q, k, v))
    out, lse = attention(q, k, v, is_causal=True, return_lse=True, engine="chunked")
    for a, b in zip(got, torch.autograd.grad(out.sum() + lse.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_a_wrong_flash_kernel_leaves_its_spans_to_the_efficient_one(fake_cuda):
    fake_cuda.broken = "flash"
    _span_kernels._check.cache_clear()
    for flash in _span_kernels.KERNELS["cpu"][:2]:
        assert "gave unexpected lse" in _span_kernels._check(flash, "cpu", torch.float64)
    fake_cuda.calls.clear()
    q, k, v = _qkv(L=30, S=30)
    _check_against_reference(q, k, v, ref_kwargs={}, engine="fused")
    assert {c[0] for c in fake_cuda.calls} == {"efficient"}


def test_flash_refusing_grouped_heads_gets_them_repeated(fake_cuda):
    fake_cuda.flash_gqa = False
    _span_kernels._check.cache_clear()
    usable = _span_kernels.kernels_for("cpu", torch.float64, 8)
    assert [k.gqa for k in usable] == [False, False]  # the native-GQA flash failed its check
    fake_cuda.calls.clear()
    fake_cuda.heads.clear()
    q, k, v = _qkv(L=30, S=30)  # 4 query heads on 2 key/value heads
    _check_against_reference(q, k, v, ref_kwargs={}, engine="fused")
    assert {c[0] for c in fake_cuda.calls} == {"flash"} and set(fake_cuda.heads) == {(4, 4)}


def test_a_wrong_efficient_kernel_sends_calls_to_the_chunked_engine(fake_cuda):
    fake_cuda.broken = "efficient"
    _span_kernels._check.cache_clear()
    q, k, v = _qkv(L=30, S=30)
    with pytest.warns(UserWarning, match="efficient_attention gave unexpected lse: memory_efficient_at"):
        out = attention(q, k, v)
    assert explain(q, k, v).startswith("engine: chunked (not fused: torch")
    torch.testing.assert_close(out, attention(q, k, v, engine="chunked"))


def test_what_the_fused_engine_takes_per_device():
    from memory_efficient_attention._spans import fused_refusal
    from memory_efficient_attention._spec import Dims

    dims = Dims((1,), 10, 10, 2, 2, 8, 8)
    base = dict(dims=dims, softcap=None, dropout=0.0, callables=False, dense_mask_fill=None)
    assert fused_refusal(device="cuda", **base) is None
    assert "runs on CPU and CUDA" in fused_refusal(device="mps", **base)
    no_fit = _span_kernels.no_fit
    assert no_fit("cuda", torch.float16, 64) is None and no_fit("cuda", torch.float32, 256) is None
    assert "float64 arrays" in no_fit("cuda", torch.float64, 64)
    assert "depth a multiple of 8" in no_fit("cuda", torch.bfloat16, 12)
    assert no_fit("cpu", torch.float64, 12) is None
    flash, _, efficient = _span_kernels.KERNELS["cuda"]
    assert flash.fits(torch.float16, 256) and not flash.fits(torch.float16, 264)
    assert not flash.fits(torch.float32, 64) and efficient.fits(torch.float32, 264)


# ------------------------------------------------------------------------------------------
# The span plan (framework-neutral)
# ------------------------------------------------------------------------------------------


def _plan_keep(plan: SpanPlan, L: int, S: int) -> np.ndarray:
    """How many spans cover each (query, key) pair, with what each span keeps of it."""
    count = np.zeros((L, S), dtype=int)
    for span in plan.spans:
        block = np.ones((span.q1 - span.q0, span.k1 - span.k0), dtype=int)
        if span.kind == DIAGONAL:
            block = np.tril(block)
        count[span.q0 : span.q1, span.k0 : span.k1] += block
    return count


@pytest.mark.parametrize("seed", range(40))
def test_span_plan_covers_each_kept_pair_once(seed):
    rng = np.random.default_rng(seed)
    L, S = (int(x) for x in rng.integers(1, 90, size=2))
    causal = bool(rng.integers(2))
    window = None if rng.integers(3) == 0 else (int(rng.integers(0, 40)), int(rng.integers(0, 40)))
    alignment = ("top_left", "bottom_right")[int(rng.integers(2))]
    offset = 0 if alignment == "top_left" else S - L
    mask = StructuredMask(L, S, causal=causal, window=window, offset=offset)
    plan = SpanPlan.build(mask, span_q=int(rng.integers(1, 30)), span_k=int(rng.integers(1, 50)), partial_k=7)
    structure = dict(is_causal=causal, causal_alignment=alignment, local_window_size=window)
    keep = structured_keep((1,), 1, L, S, **structure).reshape(L, S)
    count = _plan_keep(plan, L, S)
    covered = count > 0
    partial = np.zeros((L, S), dtype=bool)
    for span in plan.spans:
        if span.kind == PARTIAL:
            partial[span.q0 : span.q1, span.k0 : span.k1] = True
            assert span.k1 - span.k0 <= 7
    # every kept pair is covered exactly once; a non-partial span covers only kept pairs
    assert np.all(count[keep] == 1)
    assert np.all(count <= 1)
    assert not np.any(covered & ~keep & ~partial)
    for span in plan.spans:
        if span.kind == FULL:
            assert keep[span.q0 : span.q1, span.k0 : span.k1].all()


def test_jax_takes_the_engine_keyword_and_has_no_fused_engine_yet():
    jnp = pytest.importorskip("jax.numpy")
    from memory_efficient_attention.jax import efficient_dot_product_attention as jax_attention

    q = jnp.ones((1, 6, 2, 4))
    a = jax_attention(q, q, q, engine="auto")
    b = jax_attention(q, q, q, engine="chunked")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(AttentionInputError, match="engine='fused' is the PyTorch functions'"):
        jax_attention(q, q, q, engine="fused")
    with pytest.raises(AttentionInputError, match="engine must be one of"):
        jax_attention(q, q, q, engine="triton")  # ("pallas" is JAX's Pallas engine: test_pallas)


def test_decoding_picks_the_engine_by_the_key_layout(monkeypatch):
    monkeypatch.setattr(_engines, "STRIDED_MIN_KEYS", 400)
    q = torch.randn(1, 1, 8, 16)
    seed_layout = torch.randn(1, 500, 8, 16)  # [B, S, K, D]: each head's keys strided
    assert "strided per head" in explain(q, seed_layout, seed_layout)
    assert explain(q, seed_layout[:, :399], seed_layout[:, :399]).startswith("engine: fused")  # few keys
    heads_first = torch.randn(1, 8, 500, 16).transpose(1, 2)  # a heads-first cache, seen [B, S, K, D]
    assert explain(q, heads_first, heads_first).startswith("engine: fused")
    gqa = torch.randn(1, 500, 1, 16)
    assert explain(q, gqa, gqa).startswith("engine: fused")
    grouped = torch.randn(1, 500, 2, 16)  # 4 query heads per key/value head, strided: fused
    assert explain(q, grouped, grouped).startswith("engine: fused")


@pytest.mark.parametrize("engine", ["fused", "chunked"])
def test_forward_only_path_equals_the_autograd_path(engine, monkeypatch):
    """Without any tensor that needs a gradient the engine runs without the autograd Function
    (no saved statistics): same outputs and lse, dropout included."""
    runs = []
    only = _engines.forward_only
    monkeypatch.setattr(_engines, "forward_only", lambda *a: runs.append(1) or only(*a))
    q, k, v = _qkv(grad=False)
    kwargs = dict(is_causal=True, engine=engine, return_lse=True)
    if engine == "chunked":
        kwargs["dropout_rate"] = 0.2
    a = attention(q, k, v, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(runs) == 1  # no tensor needs a gradient: the forward-only path
    b = attention(q.requires_grad_(), k, v, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(runs) == 1  # q needs one: the autograd Function
    with torch.no_grad():
        c = attention(q, k, v, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(runs) == 2  # grad mode off: forward only again
    assert a[0].grad_fn is None and c[0].grad_fn is None and b[0].grad_fn is not None
    for x, y in zip((*a, *c), (*b, *b)):
        torch.testing.assert_close(x, y.detach(), atol=1e-14, rtol=1e-14)
    with torch.autograd.forward_ad.dual_level():  # forward mode: through the Function (its jvp)
        dual = torch.autograd.forward_ad.make_dual(q.detach(), torch.ones_like(q))
        out = attention(dual, k, v, is_causal=True, engine=engine)
        assert torch.autograd.forward_ad.unpack_dual(out).tangent is not None


@pytest.mark.parametrize("L, K, S", [(1, 1, 37), (3, 2, 40), (2, 4, 64)])
def test_decoding_splits_the_keys_and_merges_by_lse(monkeypatch, L, K, S):
    """Few query rows per key/value head, many keys: the keys in parts (and a remainder), the
    parts merged by lse; outputs, lse and gradients (the backward on torch's kernel) against the
    float64 reference."""
    monkeypatch.setattr(_fused, "SPLIT_KEYS", 8)
    monkeypatch.setattr(_fused, "SPLIT_MIN_KEYS", 16)
    runs = []
    split = _fused._split_keys_forward
    monkeypatch.setattr(_fused, "_split_keys_forward", lambda *a: runs.append(1) or split(*a))
    gen = torch.Generator().manual_seed(L * 100 + K)
    q = torch.randn(2, L, 8, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    heads_first = torch.randn(2, 2, K, S, 16, generator=gen, dtype=torch.float64)
    k, v = (x.transpose(1, 2).requires_grad_() for x in heads_first)  # [B, S, K, D] views
    text = explain(q, k, v)
    assert text.startswith(f"engine: fused (decoding: the keys in {S // 8} parts"), text
    _check_against_reference(q, k, v, ref_kwargs={})
    assert runs == [1]  # the forward took the split path
    out, lse = attention(q.detach(), k.detach(), v.detach(), return_lse=True)
    _, ref_lse = reference_attention(*(t.detach().numpy() for t in (q, k, v)), return_lse=True)
    assert_close(lse.numpy(), ref_lse, "float64", "lse")
    # not for: a mask or bias, one query head per key/value head, half precision, keys strided
    for kwargs in (dict(is_causal=True, causal_alignment="top_left"), dict(bias=torch.zeros(S))):
        assert "decoding" not in explain(q, k, v, **kwargs)
    causal = dict(is_causal=True, causal_alignment="top_left")  # row i sees keys 0..i only
    _check_against_reference(q, k, v, ref_kwargs=causal, **causal)
    one = q[:, :, :K]
    assert "decoding" not in explain(one, k, v)
    assert "decoding" not in explain(q.float().half(), k.half(), v.half())
    if K > 1:
        strided = torch.randn(2, S, K, 16, dtype=torch.float64)
        assert "decoding" not in explain(q, strided, strided)


def test_the_kernel_check_works_in_inference_mode_and_inside_transforms(fresh_checks):
    """The first call may run the kernel check anywhere: inference mode, under vmap."""
    q = torch.randn(3, 2, 20, 2, 8)
    with torch.inference_mode():
        out = attention(q[0], q[0], q[0])
        assert _span_kernels.broken("cpu", torch.float32, 8) is None
    _span_kernels._check.cache_clear()
    batched = torch.func.vmap(lambda x: attention(x, x, x))(q)
    assert _span_kernels.broken("cpu", torch.float32, 8) is None
    torch.testing.assert_close(batched[0], out)
