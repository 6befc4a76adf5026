"""JAX: the backend of the shared tests (``BACKEND``, see test_backends.py) and what only JAX has:
eager (un-jitted) runs, precision, jit / vmap / grad, the seed callbacks, the drop-in for
jax.nn.dot_product_attention against jax's own function, bad inputs, dropout keys."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import memory_efficient_attention  # noqa: E402
from memory_efficient_attention import AttentionInputError  # noqa: E402
from memory_efficient_attention import efficient_dot_product_attention_jax as attention  # noqa: E402
from memory_efficient_attention.jax import dot_product_attention as dpa  # noqa: E402

from .backends import Backend  # noqa: E402
from .cases import (  # noqa: E402
    ALL_CASES,
    Case,
    alibi_score,
    assert_close,
    chunk_kwargs,
    make_inputs,
    reference_for,
    round_to,
    tagged,
)
from .reference import reference_attention, reference_grads, structured_keep  # noqa: E402

assert jax.config.jax_enable_x64, "tests/conftest.py enables 64-bit JAX"

JAX_DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "float64": jnp.float64,
}
_INDEX_ARGS = ("query_seq_lengths", "key_value_seq_lengths", "query_segment_ids", "key_segment_ids")


def arr(x, dtype: str):
    if x is None:
        return None
    return jnp.asarray(np.asarray(x, dtype=np.float64), dtype=JAX_DTYPES[dtype])


def jax_kwargs(kwargs: dict) -> dict:
    return {k: jnp.asarray(v, dtype=jnp.int32) if k in _INDEX_ARGS else v for k, v in kwargs.items()}


def to64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float64))


def _split_static(kwargs: dict):
    """(static, dynamic): arrays are traced under jit, everything else is a static argument."""
    static = {k: v for k, v in kwargs.items() if not isinstance(v, (np.ndarray, jax.Array))}
    dynamic = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
    return static, dynamic


def run_case(case: Case, x: dict, *, grads: bool = True, jit: bool = True, **extra):
    """Our function on the case's inputs: ``(out, grads dict or None)`` as float64 NumPy.

    With ``jit`` the forward and the vjp are compiled as one function (mask, bias, lengths and
    segment ids traced), which also tests the function under ``jax.jit``."""
    q, k, v = (arr(x[n], case.dtype) for n in ("query", "key", "value"))
    bias = arr(x["bias"], case.dtype)
    mask = None if x["mask"] is None else jnp.asarray(x["mask"])
    static, dynamic = _split_static({**chunk_kwargs(case), **jax_kwargs(x["kwargs"]), **extra})

    def forward_and_vjp(q, k, v, bias, mask, dynamic, d_out):
        def f(q, k, v, bias):
            return attention(q, k, v, mask, bias, **static, **dynamic)

        if d_out is None:
            return f(q, k, v, bias), None
        out, vjp = jax.vjp(f, q, k, v, bias)
        return out, vjp(d_out)

    if jit:
        forward_and_vjp = jax.jit(forward_and_vjp)
    d_out = arr(x["d_out"], case.dtype) if grads else None
    out, got = forward_and_vjp(q, k, v, bias, mask, dynamic, d_out)
    assert out.dtype == q.dtype
    assert out.shape == (*case.batch, case.L, case.H, case.E)
    if not grads:
        return to64(out), None
    leaves = {"query": q, "key": k, "value": v, "bias": bias}
    result = {}
    for name, g in zip(leaves, got):
        if leaves[name] is None:
            continue
        assert g.dtype == leaves[name].dtype and g.shape == leaves[name].shape, name
        result[name] = to64(g)
    return to64(out), result


def run_lse(case: Case, x: dict):
    """``(attention(..., return_lse=True), attention(...))`` on the case's inputs, under one jit."""
    q, k, v = (arr(x[n], case.dtype) for n in ("query", "key", "value"))
    mask = None if x["mask"] is None else jnp.asarray(x["mask"])
    static, dynamic = _split_static({**chunk_kwargs(case), **jax_kwargs(x["kwargs"])})

    @jax.jit
    def both(q, k, v, mask, bias, dynamic):
        return (
            attention(q, k, v, mask, bias, return_lse=True, **static, **dynamic),
            attention(q, k, v, mask, bias, **static, **dynamic),
        )

    return both(q, k, v, mask, arr(x["bias"], case.dtype), dynamic)


# ------------------------------------------------------------------------------------------
# Eager (un-jitted) runs and defaults
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", tagged(ALL_CASES, "eager", "jax"), ids=lambda c: c.id)
def test_eager_output_and_grads_match_reference(case):
    x, ref_out, _, ref_grads = reference_for(case)
    out, grads = run_case(case, x, jit=False)
    assert_close(out, ref_out, case.dtype, "output")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, case.dtype, f"d{name}")


@pytest.mark.parametrize("case", tagged(ALL_CASES, "eager_lse", "jax"), ids=lambda c: c.id)
def test_return_lse_eagerly(case):
    x, ref_out, ref_lse, _ = reference_for(case)
    q, k, v = (arr(x[n], case.dtype) for n in ("query", "key", "value"))
    mask = None if x["mask"] is None else jnp.asarray(x["mask"])
    kwargs = {**chunk_kwargs(case), **jax_kwargs(x["kwargs"])}
    eager_out, eager_lse = attention(q, k, v, mask, arr(x["bias"], case.dtype), return_lse=True, **kwargs)
    lse_dtype = "float64" if case.dtype == "float64" else "float32"
    assert_close(to64(eager_lse), ref_lse, lse_dtype, "eager lse")
    assert_close(to64(eager_out), ref_out, case.dtype, "eager output")


def test_numpy_inputs_and_default_chunks():
    case = Case("basic", dtype="float32")
    x, ref_out, _, _ = reference_for(case)
    q, k, v = (np.asarray(x[n], dtype=np.float32) for n in ("query", "key", "value"))
    out = attention(q, k, v)
    assert out.dtype == jnp.float32
    assert_close(to64(out), ref_out, "float32")


def test_precision_positional_argument():
    case = Case("basic", dtype="float32", bias_shape=(2, 2, 37, 53))
    x, ref_out, _, _ = reference_for(case)
    q, k, v = (arr(x[n], "float32") for n in ("query", "key", "value"))
    out = attention(q, k, v, None, arr(x["bias"], "float32"), jax.lax.Precision.HIGHEST, 16, 8)
    ref = reference_attention(x["query"], x["key"], x["value"], bias=x["bias"])
    assert_close(to64(out), ref, "float32")


# ------------------------------------------------------------------------------------------
# jit / vmap / grad
# ------------------------------------------------------------------------------------------


def _structured_case():
    return Case(
        "jit",
        batch=(2,),
        L=21,
        S=26,
        H=4,
        K=2,
        dtype="float64",
        q_chunk=8,
        k_chunk=8,
        bias_shape=(2, 4, 21, 26),
        mask_shape=(21, 26),
        q_lengths="random",
        kv_lengths="random",
        segments="sorted",
        is_causal=True,
        causal_alignment="bottom_right",
        score_mod="alibi",
        mask_mod="band",
        logits_soft_cap=3.0,
    )


def test_jit_with_traced_lengths_segments_and_bias():
    case = _structured_case()
    x = make_inputs(case)
    kw = dict(x["kwargs"])
    static = {k: kw.pop(k) for k in list(kw) if k not in _INDEX_ARGS}
    traced = jax_kwargs(kw)

    @jax.jit
    def f(q, k, v, mask, bias, traced):
        return attention(q, k, v, mask, bias, query_chunk_size=8, key_chunk_size=8, **static, **traced)

    args = [arr(x[n], "float64") for n in ("query", "key", "value")]
    out = f(*args, jnp.asarray(x["mask"]), arr(x["bias"], "float64"), traced)
    ref = reference_attention(x["query"], x["key"], x["value"], mask=x["mask"], bias=x["bias"], **x["kwargs"])
    assert_close(to64(out), ref, "float64")
    # new lengths, same shapes: no retrace needed, new result
    traced2 = dict(traced, key_value_seq_lengths=jnp.asarray([5, 26], dtype=jnp.int32))
    out2 = f(*args, jnp.asarray(x["mask"]), arr(x["bias"], "float64"), traced2)
    ref2 = reference_attention(
        x["query"],
        x["key"],
        x["value"],
        mask=x["mask"],
        bias=x["bias"],
        **{**x["kwargs"], "key_value_seq_lengths": np.array([5, 26])},
    )
    assert_close(to64(out2), ref2, "float64")


def test_grad_and_jit_of_grad():
    case = _structured_case()
    x = make_inputs(case)
    kwargs = jax_kwargs(x["kwargs"])
    d_out = arr(x["d_out"], "float64")
    mask = jnp.asarray(x["mask"])

    def loss(q, k, v, bias):
        out = attention(q, k, v, mask, bias, query_chunk_size=8, key_chunk_size=8, **kwargs)
        return jnp.sum(out * d_out)

    args = [arr(x[n], "float64") for n in ("query", "key", "value", "bias")]
    _, ref_grads = reference_grads(
        x["query"], x["key"], x["value"], x["d_out"], mask=x["mask"], bias=x["bias"], **x["kwargs"]
    )
    for fn in (jax.grad(loss, argnums=(0, 1, 2, 3)), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))):
        grads = fn(*args)
        for name, g in zip(("query", "key", "value", "bias"), grads):
            assert_close(to64(g), ref_grads[name], "float64", f"d{name}")


def test_vmap_over_an_extra_axis():
    case = Case(
        "vmap",
        batch=(3,),
        L=13,
        S=17,
        H=2,
        K=1,
        dtype="float64",
        q_chunk=4,
        k_chunk=8,
        bias_shape=(3, 2, 13, 17),
        q_lengths="random",
        is_causal=True,
    )
    x = make_inputs(case)
    q, k, v, bias = (arr(x[n], "float64") for n in ("query", "key", "value", "bias"))
    qlen = jnp.asarray(x["kwargs"]["query_seq_lengths"], dtype=jnp.int32)

    def single(q, k, v, bias, qlen):  # no batch dims inside: lengths are scalars
        return attention(
            q, k, v, bias=bias, query_chunk_size=4, key_chunk_size=8, is_causal=True, query_seq_lengths=qlen
        )

    out = jax.vmap(single)(q, k, v, bias, qlen)
    ref = reference_attention(
        x["query"],
        x["key"],
        x["value"],
        bias=x["bias"],
        is_causal=True,
        query_seq_lengths=x["kwargs"]["query_seq_lengths"],
    )
    assert_close(to64(out), ref, "float64", "vmap")
    # shared key/value across the mapped axis, under jit
    out_shared = jax.jit(jax.vmap(lambda q: attention(q, k[0], v[0], query_chunk_size=4, key_chunk_size=8)))(
        q
    )
    for i in range(3):
        ref_i = reference_attention(x["query"][i], x["key"][0], x["value"][0])
        assert_close(to64(out_shared[i]), ref_i, "float64", f"vmap shared {i}")
    # grad through vmap
    g = jax.grad(lambda q: jnp.sum(jax.vmap(single)(q, k, v, bias, qlen) * arr(x["d_out"], "float64")))(q)
    _, ref_grads = reference_grads(
        x["query"],
        x["key"],
        x["value"],
        x["d_out"],
        bias=x["bias"],
        is_causal=True,
        query_seq_lengths=x["kwargs"]["query_seq_lengths"],
    )
    assert_close(to64(g), ref_grads["query"], "float64", "dquery")


def test_jit_with_static_callables():
    case = Case("jit_cb", batch=(2,), L=19, S=23, H=2, K=2, dtype="float32", q_chunk=8, k_chunk=8)
    x = make_inputs(case)
    q, k, v = (arr(x[n], "float32") for n in ("query", "key", "value"))
    f = jax.jit(
        attention,
        static_argnames=("query_chunk_size", "key_chunk_size", "score_mod", "mask_mod", "is_causal"),
    )
    out = f(q, k, v, query_chunk_size=8, key_chunk_size=8, score_mod=alibi_score, is_causal=True)
    ref = reference_attention(x["query"], x["key"], x["value"], score_mod=alibi_score, is_causal=True)
    assert_close(to64(out), ref, "float32")


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
    calls = []

    def bias_fn(q0, k0, bias_chunk, w, data):
        mask_full, bias_full = data
        lc, kc = w.shape[-3], w.shape[-1]
        assert w.shape == (2, lc, 2, kc)
        calls.append(("bias", lc, kc))
        return jax.lax.dynamic_slice(bias_full, (0, 0, q0, k0), (2, 2, lc, kc))

    def mask_fn(q0, k0, mask_chunk, w, data):
        mask_full, bias_full = data
        lc, kc = w.shape[-3], w.shape[-1]
        calls.append(("mask", lc, kc))
        return jax.lax.dynamic_slice(mask_full, (0, 0, q0, k0), (2, 2, lc, kc))

    q, k, v = (arr(x[n], "float64") for n in ("query", "key", "value"))
    data = (jnp.asarray(x["mask"]), arr(x["bias"], "float64"))
    out = attention(
        q,
        k,
        v,
        query_chunk_size=16,
        key_chunk_size=8,
        bias_calc_fn=bias_fn,
        mask_calc_fn=mask_fn,
        calc_fn_data=data,
    )
    ref = reference_attention(x["query"], x["key"], x["value"], mask=x["mask"], bias=x["bias"])
    assert_close(to64(out), ref, "float64")
    chunk_shapes = {
        (min(16, 37 - q0), min(8, 53 - k0)) for q0, k0 in itertools.product(range(0, 37, 16), range(0, 53, 8))
    }
    assert {c[1:] for c in calls if c[0] == "bias"} == chunk_shapes
    assert {c[1:] for c in calls if c[0] == "mask"} == chunk_shapes


def test_weights_callback_grads():
    case = Case("weights_cb", batch=(), L=11, S=13, H=2, K=1, dtype="float64")
    x = make_inputs(case)
    shift = jnp.linspace(-1, 1, 13, dtype=jnp.float64)

    def weights_fn(q0, k0, w, data):
        kc = w.shape[-1]
        return w + jax.lax.dynamic_slice(data, (k0,), (kc,))

    def f(q, k, v):
        return attention(
            q, k, v, query_chunk_size=4, key_chunk_size=5, weights_calc_fn=weights_fn, calc_fn_data=shift
        )

    args = [arr(x[n], "float64") for n in ("query", "key", "value")]
    out, vjp = jax.vjp(f, *args)
    bias = np.broadcast_to(np.asarray(shift), (2, 11, 13))
    ref, ref_grads = reference_grads(x["query"], x["key"], x["value"], x["d_out"], bias=bias)
    assert_close(to64(out), ref, "float64")
    for name, g in zip(("query", "key", "value"), vjp(arr(x["d_out"], "float64"))):
        assert_close(to64(g), ref_grads[name], "float64", f"d{name}")


# ------------------------------------------------------------------------------------------
# The drop-in for jax.nn.dot_product_attention
# ------------------------------------------------------------------------------------------

# name: (B, T, S, N, K, H, bias shape, mask shape, kwargs)
DPA_CASES = {
    "basic": (2, 13, 17, 4, 4, 8, None, None, {}),
    "gqa_bias": (2, 13, 17, 4, 2, 8, (2, 4, 13, 17), None, {}),
    "bias_broadcast": (2, 13, 17, 4, 2, 8, (1, 4, 1, 17), None, {}),
    "mqa_mask_rows": (2, 11, 14, 4, 1, 8, None, (2, 1, 11, 14), {"rows": True}),
    "mask_and_bias": (2, 11, 14, 2, 2, 8, (1, 2, 11, 14), (1, 1, 11, 14), {}),
    "causal": (2, 13, 17, 2, 2, 8, None, None, {"is_causal": True}),
    "causal_l_gt_s": (1, 17, 13, 2, 2, 8, None, None, {"is_causal": True, "scale": 0.5}),
    "q_lengths": (3, 13, 17, 2, 2, 8, None, None, {"query_seq_lengths": [13, 4, 0]}),
    "kv_lengths": (3, 13, 17, 2, 2, 8, None, None, {"key_value_seq_lengths": [17, 3, 0]}),
    "both_lengths_causal": (
        2,
        13,
        13,
        2,
        1,
        8,
        (2, 2, 13, 13),
        None,
        {"query_seq_lengths": [9, 13], "key_value_seq_lengths": [13, 6], "is_causal": True},
    ),
    "window_int": (2, 15, 15, 2, 2, 8, None, None, {"local_window_size": 3}),
    "window_pair_causal": (2, 15, 19, 2, 2, 8, None, None, {"local_window_size": (4, 1), "is_causal": True}),
    "everything": (
        2,
        12,
        16,
        4,
        2,
        8,
        (2, 1, 12, 16),
        (2, 4, 12, 16),
        {
            "rows": True,
            "is_causal": True,
            "local_window_size": (5, 2),
            "query_seq_lengths": [12, 7],
            "key_value_seq_lengths": [9, 16],
        },
    ),
    "tnh": (None, 13, 17, 2, 2, 8, None, None, {}),
    "tnh_bias_mask": (None, 9, 10, 2, 1, 4, (1, 2, 9, 10), (1, 1, 9, 10), {"is_causal": True}),
    "single": (1, 1, 1, 1, 1, 4, None, None, {}),
}


def _dpa_inputs(name, dtype):
    b, t, s, n, kh, h, b_shape, m_shape, kwargs = DPA_CASES[name]
    kwargs = dict(kwargs)
    rows = kwargs.pop("rows", False)
    rng = np.random.default_rng([13, sum(map(ord, name))])
    lead = () if b is None else (b,)
    q = round_to(rng.standard_normal((*lead, t, n, h)), dtype)
    k = round_to(rng.standard_normal((*lead, s, kh, h)), dtype)
    v = round_to(rng.standard_normal((*lead, s, kh, h)), dtype)
    d_out = round_to(rng.standard_normal((*lead, t, n, h)), dtype)
    bias = None if b_shape is None else round_to(rng.standard_normal(b_shape), dtype)
    mask = None
    if m_shape is not None:
        mask = rng.random(m_shape) < 0.7
        if rows:
            mask[..., [0, t // 2], :] = False
    for key in ("query_seq_lengths", "key_value_seq_lengths"):
        if key in kwargs:
            kwargs[key] = np.asarray(kwargs[key], dtype=np.int32)
    return q, k, v, d_out, bias, mask, kwargs


def _run_dpa(fn, q, k, v, d_out, bias, mask, kwargs, dtype, residual=False, jit=True):
    """``fn``'s output, vjp and (with ``residual``) lse, compiled as one function."""
    q, k, v, bias, d_out = (arr(a, dtype) for a in (q, k, v, bias, d_out))
    mask = None if mask is None else jnp.asarray(mask)
    static, dynamic = _split_static(
        {key: jnp.asarray(val) if isinstance(val, np.ndarray) else val for key, val in kwargs.items()}
    )

    def run(q, k, v, bias, mask, dynamic, d_out):
        def f(q, k, v, bias):
            return fn(q, k, v, bias, mask, **static, **dynamic)

        out, vjp = jax.vjp(f, q, k, v, bias)
        lse = None
        if residual:
            out2, lse = fn(q, k, v, bias, mask, return_residual=True, **static, **dynamic)
            out = (out, out2)
        return out, vjp(d_out), lse

    if jit:
        run = jax.jit(run)
    out, grads, lse = run(q, k, v, bias, mask, dynamic, d_out)
    if residual:
        out, out2 = out
        np.testing.assert_array_equal(to64(out2), to64(out))
    return out, grads, lse


@pytest.mark.parametrize(
    "name, dtype",
    [(name, "float32") for name in DPA_CASES]
    + [(name, "float64") for name in ("basic", "mqa_mask_rows", "everything", "tnh_bias_mask")],
)
def test_dpa_drop_in_matches_jax(name, dtype):
    q, k, v, d_out, bias, mask, kwargs = _dpa_inputs(name, dtype)
    ours, our_grads, our_lse = _run_dpa(dpa, q, k, v, d_out, bias, mask, kwargs, dtype, True)
    theirs, their_grads, their_lse = _run_dpa(
        jax.nn.dot_product_attention, q, k, v, d_out, bias, mask, kwargs, dtype, True
    )
    # jax computes the softmax in float32 even for float64 inputs
    tol = "float32"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert our_lse.dtype == their_lse.dtype and our_lse.shape == their_lse.shape
    assert_close(to64(ours), to64(theirs), tol, "output", 2.0)
    assert_close(to64(our_lse), to64(their_lse), tol, "residual", 2.0)
    for i, (a, b) in enumerate(zip(our_grads, their_grads)):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape
        assert_close(to64(a), to64(b), tol, f"grad {i}", 2.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["gqa_bias", "mqa_mask_rows", "everything"])
def test_dpa_drop_in_low_precision(name, dtype):
    q, k, v, d_out, bias, mask, kwargs = _dpa_inputs(name, dtype)
    ours, our_grads, _ = _run_dpa(dpa, q, k, v, d_out, bias, mask, kwargs, dtype)
    # jax's own function: eagerly (under jit its float16 dot falls over on CPU: "The precision
    # 'F16_F16_F32' is not supported by dot_general on CPU")
    theirs, their_grads, _ = _run_dpa(
        jax.nn.dot_product_attention, q, k, v, d_out, bias, mask, kwargs, dtype, jit=False
    )
    assert ours.dtype == JAX_DTYPES[dtype]
    assert_close(to64(ours), to64(theirs), dtype, "output", 2.0)
    for i, (a, b) in enumerate(zip(our_grads, their_grads)):
        if b is not None:
            assert_close(to64(a), to64(b), dtype, f"grad {i}", 2.0)


@pytest.mark.parametrize(
    "name",
    [
        "mqa_mask_rows",
        "q_lengths",
        "kv_lengths",
        "everything",
        "both_lengths_causal",
        "tnh_bias_mask",
        "window_pair_causal",
    ],
)
def test_dpa_drop_in_semantics_in_float64(name):
    """Against the float64 reference: jax's masks are finite (a row masked everywhere averages
    the values), rows past query_seq_lengths are zeroed (and get no gradient)."""
    q, k, v, d_out, bias, mask, kwargs = _dpa_inputs(name, "float64")
    b, t, s, n, kh, h = DPA_CASES[name][:6]
    batch = (1,) if b is None else (b,)
    window = kwargs.get("local_window_size")
    keep = structured_keep(
        batch,
        n,
        t,
        s,
        is_causal=kwargs.get("is_causal", False),
        local_window_size=window,
        key_value_seq_lengths=kwargs.get("key_value_seq_lengths"),
    )
    combined = keep.reshape(*batch, n, t, s)
    if mask is not None:
        combined = combined & mask
    q_rows = np.ones((*batch, t, 1, 1), dtype=bool)
    if "query_seq_lengths" in kwargs:
        q_rows = np.arange(t)[None, :, None, None] < kwargs["query_seq_lengths"][:, None, None, None]
    lead = (lambda a: a[None]) if b is None else (lambda a: a)
    ref_bias = None if bias is None else bias
    ref_out, ref_grads = reference_grads(
        lead(q),
        lead(k),
        lead(v),
        lead(d_out) * q_rows,
        mask=combined,
        bias=ref_bias,
        scale=kwargs.get("scale"),
    )
    ref_out = ref_out * q_rows
    ours, grads, _ = _run_dpa(dpa, q, k, v, d_out, bias, mask, kwargs, "float64")
    unlead = (lambda a: a[0]) if b is None else (lambda a: a)
    assert_close(to64(ours), unlead(ref_out), "float64", "output")
    for name_, g in zip(("query", "key", "value", "bias"), grads):
        if name_ in ref_grads:
            ref = ref_grads[name_] if name_ == "bias" else unlead(ref_grads[name_])
            assert_close(to64(g), ref, "float64", f"d{name_}")


# ------------------------------------------------------------------------------------------
# Bad input: AttentionInputError (a ValueError) naming the argument, before any computation
# ------------------------------------------------------------------------------------------


def _raises_before_compute(fn, *args, words, **kwargs):
    calls = []

    def spy(b, h, q_idx, kv_idx):  # traced/called during the computation
        calls.append(1)
        return kv_idx >= 0

    if fn is attention:
        kwargs.setdefault("mask_mod", spy)
    with pytest.raises(AttentionInputError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert not calls, "mask_mod ran before validation"
    return message


def _qkv(q_shape=(2, 7, 2, 8), k_shape=(2, 9, 2, 8), v_shape=(2, 9, 2, 8), dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal(s), dtype=dtype) for s in (q_shape, k_shape, v_shape))


FNS = [pytest.param(attention, id="efficient"), pytest.param(dpa, id="drop_in")]


@pytest.mark.parametrize("fn", FNS)
def test_bad_depth(fn):
    # jax's drop-in needs value shaped like key: change both
    _raises_before_compute(fn, *_qkv(k_shape=(2, 9, 2, 6), v_shape=(2, 9, 2, 6)), words=["query", "key"])


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("shape", [(1, 1, 7, 8), (1, 3, 7, 9), (3, 2, 7, 9)])
def test_bad_mask_and_bias_shapes(fn, shape):
    q, k, v = _qkv()
    _raises_before_compute(fn, q, k, v, mask=jnp.ones(shape, dtype=bool), words=["mask"])
    _raises_before_compute(fn, q, k, v, bias=jnp.zeros(shape, dtype=jnp.float32), words=["bias"])


@pytest.mark.parametrize("position", [0, 1, 2])
def test_too_few_dims(position):
    name = ("query", "key", "value")[position]
    args = list(_qkv((7, 2, 8), (9, 2, 8), (9, 2, 8)))
    args[position] = args[position][0]
    _raises_before_compute(attention, *args, words=[name])
    if position == 0:
        # jax.nn.dot_product_attention pads any query rank up to 4 dims; the drop-in matches it.
        np.testing.assert_allclose(dpa(*args), jax.nn.dot_product_attention(*args), rtol=1e-6, atol=1e-6)
    else:
        _raises_before_compute(dpa, *args, words=[name])


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("position", [1, 2])
def test_mixed_dtypes(fn, position):
    name = ("query", "key", "value")[position]
    args = list(_qkv())
    args[position] = args[position].astype(jnp.float16)
    _raises_before_compute(fn, *args, words=[name])


# ------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------


def test_dropout_is_reproducible_per_key():
    case = Case("drop", batch=(2,), L=13, S=17, H=2, K=1, dtype="float64")
    x = make_inputs(case)
    q, k, v = (arr(x[n], "float64") for n in ("query", "key", "value"))
    f = functools.partial(attention, dropout_rate=0.3, query_chunk_size=8, key_chunk_size=8)

    @jax.jit
    def run(q, key):
        out, lse_drop = f(q, k, v, dropout_rng=key, return_lse=True)
        _, lse = attention(q, k, v, return_lse=True)
        return out, lse_drop, lse, attention(q, k, v)

    a, lse_drop, lse, plain = run(q, jax.random.key(1))
    b = run(q, jax.random.key(1))[0]
    c = run(q, jax.random.key(2))[0]
    np.testing.assert_array_equal(to64(a), to64(b))
    assert not np.array_equal(to64(a), to64(c))
    assert not np.allclose(to64(a), to64(plain))
    assert np.isfinite(to64(a)).all()
    # dropout acts on the normalised probabilities: the log-sum-exp does not change
    np.testing.assert_allclose(to64(lse_drop), to64(lse), rtol=1e-12, atol=1e-12)


def test_dropout_statistics():
    """With one-hot values the output is the dropped, rescaled probability matrix itself."""
    p, seeds = 0.25, 200
    L, S = 3, 5
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.standard_normal((L, 1, 4)))
    k = jnp.asarray(rng.standard_normal((S, 1, 4)))
    v = jnp.eye(S, dtype=jnp.float64).reshape(S, 1, S)
    probs = to64(attention(q, k, v)[:, 0])
    run = jax.jit(lambda key: attention(q, k, v, dropout_rate=p, dropout_rng=key)[:, 0])
    outs = np.stack([to64(run(jax.random.key(s))) for s in range(seeds)])
    kept = outs != 0
    expected = np.broadcast_to(probs / (1 - p), outs.shape)
    np.testing.assert_allclose(outs[kept], expected[kept], rtol=1e-12, atol=1e-12)
    frac = 1 - kept.mean()
    sigma = math.sqrt(p * (1 - p) / outs.size)
    assert abs(frac - p) < 5 * sigma, frac
    mean = outs.mean(0)
    bound = 5 * probs * math.sqrt(p / (1 - p) / seeds) + 1e-12
    assert np.all(np.abs(mean - probs) <= bound), (mean, probs)


def test_dropout_gradients_use_the_forward_mask():
    case = Case(
        "drop_grad",
        batch=(2,),
        L=9,
        S=11,
        H=2,
        K=2,
        dtype="float64",
        q_chunk=5,
        k_chunk=6,
        bias_shape=(1, 2, 9, 11),
    )
    x = make_inputs(case)
    q, k, v, bias = (arr(x[n], "float64") for n in ("query", "key", "value", "bias"))
    d_out = arr(x["d_out"], "float64")

    def f(q, k, v, bias):
        return attention(
            q,
            k,
            v,
            bias=bias,
            dropout_rate=0.3,
            dropout_rng=jax.random.key(5),
            query_chunk_size=5,
            key_chunk_size=6,
            is_causal=True,
        )

    out, (gq, gk, gv, gb) = jax.jit(lambda *a: (f(*a), jax.vjp(f, *a)[1](d_out)))(q, k, v, bias)
    f = jax.jit(f)
    np.testing.assert_allclose(float(jnp.sum(d_out * out)), float(jnp.sum(gv * v)), rtol=1e-10)
    rng = np.random.default_rng(0)
    eps = 1e-6
    args = [q, k, v, bias]
    for i, grad in ((0, gq), (1, gk), (3, gb)):
        direction = jnp.asarray(rng.standard_normal(args[i].shape))
        plus = f(*[a + eps * direction if j == i else a for j, a in enumerate(args)])
        minus = f(*[a - eps * direction if j == i else a for j, a in enumerate(args)])
        numeric = float(jnp.sum((plus - minus) * d_out) / (2 * eps))
        analytic = float(jnp.sum(grad * direction))
        assert math.isclose(numeric, analytic, rel_tol=1e-5, abs_tol=1e-6), (i, numeric, analytic)


BACKEND = Backend(
    name="jax",
    fn=attention,
    module=memory_efficient_attention.jax,
    alias="efficient_dot_product_attention_jax",
    attention=run_case,
    attention_lse=run_lse,
    numpy=to64,
    dtype=lambda a: str(a.dtype),
    raises_before_compute=_raises_before_compute,
    qkv=_qkv,
    drop_in=dpa,
    drop_in_qkv=_qkv,
    drop_in_gqa={},
    as_dtype=lambda a, name: a.astype(name),
    chunk_sweep=((3, 7), (8, 16), (None, None)),
)
