"""The tests that are the same in PyTorch and JAX, written once and run on both (``backend``):
the shared grid against the float64 reference, chunk-size independence, the log-sum-exp, the
module aliases and the input checks common to both frameworks' functions. Case subsets are chosen
by the cases' tags (``Case.tags``)."""

from __future__ import annotations

import numpy as np
import pytest

import memory_efficient_attention

from .backends import BACKENDS, backend_cases, load
from .cases import ALL_CASES, assert_close, empty_rows, reference_for


@pytest.fixture
def backend(request):
    return load(request.param)


# ------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, case", backend_cases(ALL_CASES), indirect=["backend"])
def test_output_and_grads_match_reference(backend, case):
    x, ref_out, _, ref_grads = reference_for(case)
    out, grads = backend.attention(case, x)
    assert_close(out, ref_out, case.dtype, "output")
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, case.dtype, f"d{name}")
    empty = empty_rows(case, x)
    if empty.any():  # rows with no key left: exactly 0, zero gradient, no NaN
        assert np.all(out[empty] == 0)
        assert np.all(grads["query"][empty] == 0)


def _check_chunk_settings(backend, case, settings, budget=False):
    x, ref_out, _, ref_grads = reference_for(case)
    runs = [backend.attention(case.with_(q_chunk=qc, k_chunk=kc), x) for qc, kc in settings]
    if budget:
        runs.append(backend.attention(case.with_(q_chunk=None, k_chunk=None), x, memory_budget="4KiB"))
    for out, grads in runs:
        assert_close(out, ref_out, "float64", "output")
        for name in ref_grads:
            assert_close(grads[name], ref_grads[name], "float64", f"d{name}")


@pytest.mark.parametrize("backend, case", backend_cases(ALL_CASES, "chunks"), indirect=["backend"])
def test_result_does_not_depend_on_chunk_sizes(backend, case):
    _check_chunk_settings(backend, case, backend.chunk_sweep, budget=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend, case", backend_cases(ALL_CASES, "extreme_chunks"), indirect=["backend"])
def test_extreme_chunk_sizes(backend, case):
    _check_chunk_settings(backend, case, [(1, 1), (1, 64), (64, 1)])


@pytest.mark.parametrize("backend, case", backend_cases(ALL_CASES, "lse"), indirect=["backend"])
def test_return_lse(backend, case):
    x, ref_out, ref_lse, _ = reference_for(case)
    result, plain = backend.attention_lse(case, x)
    assert isinstance(result, tuple) and len(result) == 2
    out, lse = result
    assert lse.shape == (*case.batch, case.L, case.H)
    # lse is kept in float32 at least: tighter than the output for low precision inputs
    lse_dtype = "float64" if case.dtype == "float64" else "float32"
    assert backend.dtype(lse) == lse_dtype
    assert_close(backend.numpy(out), ref_out, case.dtype, "output")
    factor = 1.0 if case.dtype in ("float32", "float64") else 50.0
    assert_close(backend.numpy(lse), ref_lse, lse_dtype, "lse", factor=factor)
    assert backend.dtype(plain) == backend.dtype(out)
    np.testing.assert_array_equal(backend.numpy(plain), backend.numpy(out))


# ------------------------------------------------------------------------------------------
# The package
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_module_aliases(backend):
    assert backend.module.efficient_dot_product_attention is backend.fn
    assert getattr(memory_efficient_attention, backend.alias) is backend.fn


# ------------------------------------------------------------------------------------------
# Bad input: AttentionInputError (a ValueError) naming the argument, before any computation
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("which", ["query_chunk_size", "key_chunk_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_bad_chunk_sizes(backend, which, value):
    q, k, v = backend.qkv((2, 7, 2, 8), (2, 9, 2, 8), (2, 9, 2, 8))
    backend.raises_before_compute(backend.fn, q, k, v, words=[which], **{which: value})


def _call(backend, function, *shapes):
    """``(fn, (query, key, value))`` for the seed function or the drop-in, from seed-layout shapes."""
    if function == "efficient":
        return backend.fn, backend.qkv(*shapes)
    return backend.drop_in, backend.drop_in_qkv(*shapes)


FUNCTIONS = ["efficient", "drop_in"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_kv_lengths(backend, function):
    fn, qkv = _call(backend, function, (2, 7, 2, 8), (2, 9, 2, 8), (2, 10, 2, 8))
    backend.raises_before_compute(fn, *qkv, words=["key", "value"])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_gqa_heads(backend, function):
    fn, qkv = _call(backend, function, (2, 7, 3, 8), (2, 9, 2, 8), (2, 9, 2, 8))
    kwargs = backend.drop_in_gqa if function == "drop_in" else {}
    backend.raises_before_compute(fn, *qkv, words=["query", "heads"], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("function", FUNCTIONS)
@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_non_float_inputs(backend, function, dtype, position):
    name = ("query", "key", "value")[position]
    fn, qkv = _call(backend, function, (2, 7, 2, 8), (2, 9, 2, 8), (2, 9, 2, 8))
    args = list(qkv)
    args[position] = backend.as_dtype(args[position] > 0, dtype)
    backend.raises_before_compute(fn, *args, words=[name])
