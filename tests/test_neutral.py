"""The framework-neutral modules (_spec, _masks, _chunks, _config) and import laziness.

Nothing here imports torch or jax in this process (the subprocess tests import them on purpose).
"""

from __future__ import annotations

import doctest
import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memory_efficient_attention import _chunks, _config, _masks, _spec
from memory_efficient_attention._chunks import choose_chunk_sizes, parse_memory
from memory_efficient_attention._masks import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockPlan,
    StructuredMask,
    Tile,
    alignment_offset,
    chunk_bounds,
    normalize_window,
)
from memory_efficient_attention._spec import AttentionInputError, Dims

from .python_process import run_python
from .reference import structured_keep

# ------------------------------------------------------------------------------------------
# Import laziness and the public names
# ------------------------------------------------------------------------------------------


def test_import_imports_no_framework():
    proc = run_python(
        """
        import sys
        import memory_efficient_attention as mea
        err = mea.AttentionInputError
        assert issubclass(err, ValueError), err
        from memory_efficient_attention import _chunks, _config, _masks, _spec
        heavy = sorted(m for m in ("torch", "jax", "jaxlib", "flax") if m in sys.modules)
        print("HEAVY", heavy)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_attention_input_error_is_the_spec_one():
    import memory_efficient_attention as mea

    assert mea.AttentionInputError is AttentionInputError
    assert issubclass(AttentionInputError, ValueError)


def test_lazy_names_resolve_to_the_framework_functions():
    proc = run_python(
        """
        import sys
        import memory_efficient_attention as mea
        from memory_efficient_attention import efficient_dot_product_attention_pt as pt
        assert "torch" in sys.modules
        import memory_efficient_attention.torch as mt
        assert mt.efficient_dot_product_attention is pt
        assert callable(mt.scaled_dot_product_attention)
        from memory_efficient_attention import efficient_dot_product_attention_jax as jx
        import memory_efficient_attention.jax as mj
        assert mj.efficient_dot_product_attention is jx
        assert callable(mj.dot_product_attention)
        assert mea.efficient_dot_product_attention_pt is pt
        assert mea.efficient_dot_product_attention_jax is jx
        print("OK")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


# ------------------------------------------------------------------------------------------
# _spec
# ------------------------------------------------------------------------------------------


def test_seed_dims_reads_shapes():
    dims = _spec.seed_dims((2, 3, 7, 4, 8), (2, 3, 9, 2, 8), (2, 3, 9, 2, 5))
    assert dims == Dims((2, 3), 7, 9, 4, 2, 8, 5)
    assert dims.groups == 2
    assert dims.batch_size == 6
    assert dims.mask_shape() == (2, 3, 4, 7, 9)
    assert _spec.seed_dims((7, 4, 8), (9, 4, 8), (9, 4, 3)).batch == ()


def test_heads_first_dims_reads_shapes():
    dims = _spec.heads_first_dims((2, 4, 7, 8), (2, 2, 9, 8), (2, 2, 9, 5), enable_gqa=True)
    assert dims == Dims((2,), 7, 9, 4, 2, 8, 5)


@pytest.mark.parametrize(
    "shapes, words",
    [
        (((7, 2, 8), (9, 2, 6), (9, 2, 8)), ["query", "key", "depth", "(7, 2, 8)", "(9, 2, 6)"]),
        (((7, 2, 8), (9, 2, 8), (10, 2, 8)), ["key", "value", "length", "(10, 2, 8)"]),
        (((7, 2, 8), (9, 2, 8), (9, 1, 8)), ["key", "value", "heads"]),
        (((7, 3, 8), (9, 2, 8), (9, 2, 8)), ["query", "heads", "multiple"]),
        (((7, 8), (9, 2, 8), (9, 2, 8)), ["query", "3 dims", "(7, 8)"]),
        (((7, 2, 8), (9, 8), (9, 2, 8)), ["key", "3 dims"]),
        (((7, 2, 8), (9, 2, 8), (8,)), ["value", "3 dims"]),
        (((2, 7, 2, 8), (3, 9, 2, 8), (3, 9, 2, 8)), ["key", "batch", "(2)", "(3)"]),
        (((2, 7, 2, 8), (2, 9, 2, 8), (1, 9, 2, 8)), ["value", "batch"]),
        (((7, 0, 8), (9, 2, 8), (9, 2, 8)), ["query", "empty", "head"]),
        (((7, 2, 8), (9, 2, 8), (9, 2, 0)), ["value", "empty", "depth"]),
    ],
)
def test_seed_dims_errors_name_the_argument(shapes, words):
    with pytest.raises(AttentionInputError) as info:
        _spec.seed_dims(*shapes)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_empty_lengths_and_batches_are_valid():
    # L = 0, S = 0 and an empty batch are valid (torch and xformers return empty / zero outputs)
    for shapes in (
        ((0, 2, 8), (9, 2, 8), (9, 2, 4)),
        ((7, 2, 8), (0, 2, 8), (0, 2, 4)),
        ((0, 7, 2, 8), (0, 9, 2, 8), (0, 9, 2, 4)),
    ):
        dims = _spec.seed_dims(*shapes)
        assert dims.empty
        # chunk sizes stay positive, the plan has no pair to compute
        qc, kc = choose_chunk_sizes(dims, "float32")
        assert qc >= 1 and kc >= 1
        plan = BlockPlan.build(StructuredMask(q_len=dims.q_len, kv_len=dims.kv_len, causal=True), qc, kc)
        assert not [t for i in range(plan.num_q_chunks) for j in range(plan.num_k_chunks)
                    for t in plan.pair_tiles(i, j)] or dims.batch_size == 0  # fmt: skip
    assert not _spec.seed_dims((7, 2, 8), (9, 2, 8), (9, 2, 4)).empty


@pytest.mark.parametrize(
    "shapes, layout",
    [
        # heads-first [B, H, L, D] tensors given to the seed layout: L != S makes heads disagree
        (((2, 4, 7, 8), (2, 4, 9, 8), (2, 4, 9, 8)), "[B..., L, H, D]"),
        # sequence-first [L, B, H, D]: the batch dims (here L and S) disagree
        (((7, 2, 4, 8), (9, 2, 4, 8), (9, 2, 4, 8)), "sequence-first"),
    ],
)
def test_seed_dims_errors_say_which_layout_is_expected(shapes, layout):
    with pytest.raises(AttentionInputError) as info:
        _spec.seed_dims(*shapes)
    assert layout in str(info.value) and "heads-first" in str(info.value)


def test_heads_first_dims_errors_say_which_layout_is_expected():
    # seed-layout [B, L, H, D] tensors given to the SDPA layout, L != S
    with pytest.raises(AttentionInputError, match=r"\[B\.\.\., H, L, D\]"):
        _spec.heads_first_dims((2, 7, 4, 8), (2, 9, 4, 8), (2, 9, 4, 8), enable_gqa=False)


def test_heads_first_dims_without_gqa_names_enable_gqa():
    with pytest.raises(AttentionInputError, match="enable_gqa"):
        _spec.heads_first_dims((1, 4, 7, 8), (1, 2, 9, 8), (1, 2, 9, 8), enable_gqa=False)
    with pytest.raises(AttentionInputError, match="multiple"):
        _spec.heads_first_dims((1, 3, 7, 8), (1, 2, 9, 8), (1, 2, 9, 8), enable_gqa=True)


@st.composite
def dims_and_operand(draw):
    nb = draw(st.integers(0, 3))
    batch = tuple(draw(st.lists(st.integers(1, 4), min_size=nb, max_size=nb)))
    kv_heads = draw(st.integers(1, 3))
    dims = Dims(
        batch,
        draw(st.integers(1, 9)),
        draw(st.integers(1, 9)),
        kv_heads * draw(st.integers(1, 3)),
        kv_heads,
        4,
        4,
    )
    target = dims.mask_shape()
    rank = draw(st.integers(0, len(target) + 1))
    shape = []
    for i in range(rank):
        j = len(target) - rank + i
        want = target[j] if j >= 0 else 1
        shape.append(draw(st.sampled_from(sorted({1, want, want + 1, 2}))))
    return dims, tuple(shape)


@given(dims_and_operand())
def test_operand_shape_matches_numpy_broadcasting(case):
    dims, shape = case
    target = dims.mask_shape()
    try:
        ok = np.broadcast_shapes(shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        with pytest.raises(AttentionInputError) as info:
            _spec.operand_shape("bias", shape, dims)
        assert "bias" in str(info.value)
        assert _spec.describe(shape) in str(info.value)
        return
    zb, hb, lb, sb = _spec.operand_shape("mask", shape, dims)
    padded = (1,) * (len(target) - len(shape)) + shape
    nb = len(dims.batch)
    assert (hb, lb, sb) == padded[nb:]
    assert zb == (1 if all(s == 1 for s in padded[:nb]) else dims.batch_size)
    full = _spec.padded_operand_shape(shape, dims)
    assert len(full) == len(target)
    assert np.broadcast_shapes(full, target) == target
    assert math.prod(full[:nb]) == zb


def test_resolve_scale():
    assert _spec.resolve_scale(None, 16) == pytest.approx(0.25)
    assert _spec.resolve_scale(0.3, 16) == 0.3
    assert _spec.resolve_scale(2, 16) == 2.0
    for bad in (True, "1", float("inf"), float("nan"), np.array([0.5, 0.5]), 1j):
        with pytest.raises(AttentionInputError, match="scale"):
            _spec.resolve_scale(bad, 16)
    # numpy scalars and concrete 0-d arrays are real numbers too (the originals accept them)
    for good in (np.float32(0.5), np.float64(0.5), np.array(0.5), np.int64(2) / 4):
        assert _spec.resolve_scale(good, 16) == 0.5
        assert type(_spec.resolve_scale(good, 16)) is float


def test_check_chunk_size():
    assert _spec.check_chunk_size("query_chunk_size", None) is None
    assert _spec.check_chunk_size("query_chunk_size", 7) == 7
    assert _spec.check_chunk_size("key_chunk_size", np.int64(5)) == 5
    for bad in (0, -3, np.int64(0), 2.5, "4"):
        with pytest.raises(AttentionInputError, match="key_chunk_size"):
            _spec.check_chunk_size("key_chunk_size", bad)


def test_check_chunk_size_rejects_bool():
    # True is an int subclass; a chunk size of True is a mistake (the code branches on bool to
    # reject it, as resolve_scale and check_dropout do)
    with pytest.raises(AttentionInputError, match="query_chunk_size"):
        _spec.check_chunk_size("query_chunk_size", True)


def test_check_float_dtypes():
    assert _spec.check_float_dtypes([("query", "float16"), ("key", "float16")]) == "float16"
    with pytest.raises(AttentionInputError, match="key.*int32"):
        _spec.check_float_dtypes([("query", "float32"), ("key", "int32")])
    with pytest.raises(AttentionInputError, match="value.*bool"):
        _spec.check_float_dtypes([("query", "float32"), ("value", "bool")])
    with pytest.raises(AttentionInputError, match="value"):
        _spec.check_float_dtypes([("query", "float32"), ("value", "float64")])
    assert _spec.check_float_dtypes([("query", "float32"), ("v", "float64")], same=False)
    assert _spec.compute_dtype_name("float64") == "float64"
    for name in ("float16", "bfloat16", "float32"):
        assert _spec.compute_dtype_name(name) == "float32"


def test_check_dropout_and_softcap():
    assert _spec.check_dropout(0) == 0.0
    assert _spec.check_dropout(0.25) == 0.25
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(AttentionInputError, match="dropout"):
            _spec.check_dropout(bad)
    assert _spec.check_softcap(None) is None
    assert _spec.check_softcap(30) == 30.0
    for bad in (0, -1.0, True, float("nan"), -math.inf, "3"):
        with pytest.raises(AttentionInputError, match="logits_soft_cap"):
            _spec.check_softcap(bad)
    # inf * tanh(s / inf) is NaN: refused with the fix (None means no cap)
    with pytest.raises(AttentionInputError, match="pass None"):
        _spec.check_softcap(math.inf)
    assert _spec.check_softcap(np.float32(2.0)) == 2.0


def test_memory_budget_must_be_finite():
    for bad in (math.inf, float("nan"), "infGB"):
        with pytest.raises(AttentionInputError, match="memory_budget"):
            parse_memory(bad)


@pytest.mark.parametrize(
    "value, want, error, words",
    [
        (None, "bool", TypeError, ["mask_mod", "None", "return"]),
        (np.zeros((2, 8), np.float32), "bool", TypeError, ["mask_mod", "float32", "bool"]),
        (np.zeros((3, 8), bool), "bool", AttentionInputError, ["mask_mod", "(3, 8)", "(2, 8)"]),
        (np.zeros((1, 2, 8), bool), "bool", AttentionInputError, ["mask_mod", "(1, 2, 8)"]),
        ("yes", "float", TypeError, ["mask_mod", "str"]),
        (np.zeros((2, 8), bool), "float", TypeError, ["mask_mod", "bool"]),
    ],
)
def test_check_callable_result_names_the_callable(value, want, error, words):
    with pytest.raises(error) as info:
        _spec.check_callable_result("mask_mod", value, (2, 8), "[lc, kc]", want=want)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_check_callable_result_accepts_what_broadcasts():
    for value in (True, np.ones((2, 1), bool), np.ones((8,), bool), np.ones((1, 1), bool)):
        _spec.check_callable_result("mask_mod", value, (2, 8), "[lc, kc]", want="bool")
    for value in (1.5, 3, np.ones((2, 8), np.float32), np.ones((1, 8), np.int32)):
        _spec.check_callable_result("score_mod", value, (2, 8), "[lc, kc]", want="float")


# ------------------------------------------------------------------------------------------
# _masks
# ------------------------------------------------------------------------------------------


@given(st.integers(0, 200), st.integers(1, 70))
def test_chunk_bounds_tile_the_axis(length, size):
    bounds = chunk_bounds(length, size)
    assert len(bounds) == math.ceil(length / size)
    covered = [i for lo, hi in bounds for i in range(lo, hi)]
    assert covered == list(range(length))
    assert all(hi - lo == size for lo, hi in bounds[:-1])
    assert all(0 < hi - lo <= size for lo, hi in bounds)


def test_alignment_offset_and_window():
    assert alignment_offset("top_left", 5, 9) == 0
    assert alignment_offset("bottom_right", 5, 9) == 4
    assert alignment_offset("bottom_right", 9, 5) == -4
    with pytest.raises(AttentionInputError, match="causal_alignment"):
        alignment_offset("center", 5, 9)
    assert normalize_window(None) is None
    assert normalize_window(3) == (3, 3)
    assert normalize_window((2, 0)) == (2, 0)
    assert normalize_window([np.int64(1), 4]) == (1, 4)
    for bad in (True, (1, 2, 3), "ab", 2.5):
        with pytest.raises(AttentionInputError, match="local_window_size"):
            normalize_window(bad)


def _static_keep(mask: StructuredMask) -> np.ndarray:
    """Brute-force [L, S] static keep, straight from the definitions."""
    q = np.arange(mask.q_len)[:, None]
    k = np.arange(mask.kv_len)[None, :]
    keep = np.ones((mask.q_len, mask.kv_len), dtype=bool)
    if mask.causal:
        keep &= k <= q + mask.offset
    if mask.window is not None:
        left, right = mask.window
        keep &= (q + mask.offset - left <= k) & (k <= q + mask.offset + right)
    return keep


@st.composite
def structured_masks(draw, nonneg_windows=False):
    q_len, kv_len = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    causal = draw(st.booleans())
    lo = 0 if nonneg_windows else -3
    window = draw(st.none() | st.tuples(st.integers(lo, 20), st.integers(lo, 20)))
    alignment = draw(st.sampled_from(["top_left", "bottom_right"]))
    flags = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    return StructuredMask(
        q_len,
        kv_len,
        causal=causal,
        window=window,
        offset=alignment_offset(alignment, q_len, kv_len),
        q_lengths=flags[0] and draw(st.booleans()),
        kv_lengths=flags[1] and draw(st.booleans()),
        segments=flags[2] and draw(st.booleans()),
        mask_mod=flags[3] and draw(st.booleans()),
    )


@given(structured_masks())
def test_structured_mask_keep_matches_definition(mask):
    q = np.arange(mask.q_len)[:, None]
    k = np.arange(mask.kv_len)[None, :]
    keep = mask.keep(q, k)
    expected = _static_keep(mask)
    if keep is None:
        assert not mask.static
        assert expected.all()
    else:
        assert mask.static
        np.testing.assert_array_equal(np.broadcast_to(keep, expected.shape), expected)
    assert mask.any == (mask.static or mask.dynamic)


def _check_plan(mask: StructuredMask, q_chunk: int, k_chunk: int, exact: bool) -> BlockPlan:
    plan = BlockPlan.build(mask, q_chunk, k_chunk)
    keep = _static_keep(mask)
    qb, kb = chunk_bounds(mask.q_len, q_chunk), chunk_bounds(mask.kv_len, k_chunk)
    assert plan.num_q_chunks == len(qb)
    assert plan.num_k_chunks == len(kb)
    assert len(plan.kinds) == len(qb) and all(len(row) == len(kb) for row in plan.kinds)
    for i, (q0, q1) in enumerate(qb):
        assert plan.q_bounds(i) == (q0, q1)
        lo, hi = mask.key_range(q0, q1)
        kept_cols = np.flatnonzero(keep[q0:q1].any(axis=0))
        if kept_cols.size:  # every kept key of these rows lies in key_range
            assert lo <= kept_cols.min() and kept_cols.max() < hi
        for j, (k0, k1) in enumerate(kb):
            assert plan.k_bounds(j) == (k0, k1)
            block = keep[q0:q1, k0:k1]
            kind = plan.kinds[i][j]
            assert kind in (EMPTY, PARTIAL, FULL)
            # soundness: a skipped block has no kept pair; a FULL block needs no mask at all
            if kind == EMPTY:
                assert not block.any(), (i, j)
            if kind == FULL:
                assert block.all() and not mask.dynamic, (i, j)
            if exact:
                if not block.any():
                    want = EMPTY
                elif block.all() and not mask.dynamic:
                    want = FULL
                else:
                    want = PARTIAL
                assert kind == want, (i, j, kind, want)
    # the chunks a row (column) visits are one contiguous range holding every non-empty one
    for i in range(plan.num_q_chunks):
        lo, hi = plan.key_chunks(i)
        nonempty = [j for j in range(plan.num_k_chunks) if plan.kinds[i][j] != EMPTY]
        assert list(range(lo, hi)) == nonempty
    for j in range(plan.num_k_chunks):
        lo, hi = plan.query_chunks(j)
        nonempty = [i for i in range(plan.num_q_chunks) if plan.kinds[i][j] != EMPTY]
        assert list(range(lo, hi)) == nonempty
    assert plan.to_dense() == [[k != EMPTY for k in row] for row in plan.kinds]
    total = plan.num_q_chunks * plan.num_k_chunks
    assert plan.count(EMPTY) + plan.count(PARTIAL) + plan.count(FULL) == total
    head = str(plan).splitlines()[0]
    assert f"{plan.count(FULL)} full, {plan.count(PARTIAL)} partial, {plan.count(EMPTY)} empty" in (head)
    return plan


@given(structured_masks(nonneg_windows=True), st.integers(1, 32), st.integers(1, 32))
def test_block_plan_is_exact_for_nonnegative_windows(mask, q_chunk, k_chunk):
    _check_plan(mask, q_chunk, k_chunk, exact=True)


@given(structured_masks(), st.integers(1, 32), st.integers(1, 32))
def test_block_plan_is_sound_for_any_window(mask, q_chunk, k_chunk):
    _check_plan(mask, q_chunk, k_chunk, exact=False)


@given(structured_masks(), st.integers(1, 32), st.integers(1, 32), st.integers(0, 8))
def test_tiles_cover_every_kept_pair_once(mask, q_chunk, k_chunk, min_tile):
    plan = BlockPlan.build(mask, q_chunk, k_chunk, min_tile)
    keep = _static_keep(mask)
    covered = np.zeros(keep.shape, dtype=int)
    groups = {shape: set(tiles) for shape, tiles in plan.pair_groups()}
    for i in range(plan.num_q_chunks):
        for j in range(plan.num_k_chunks):
            tiles = plan.pair_tiles(i, j)
            if plan.kinds[i][j] == EMPTY:
                assert tiles == []
                continue
            (q0, q1), (k0, k1) = plan.q_bounds(i), plan.k_bounds(j)
            for t in tiles:
                assert (t.i, t.j) == (i, j)
                assert q0 <= t.q0 < t.q1 <= q1 and k0 <= t.k0 < t.k1 <= k1
                assert t.kind == mask.block_kind(t.q0, t.q1, t.k0, t.k1) != EMPTY
                if t.kind == FULL:
                    assert keep[t.q0 : t.q1, t.k0 : t.k1].all()
                if t != Tile(i, j, q0, q1, k0, k1, plan.kinds[i][j]):  # split: smaller than min_tile x 2
                    assert min(t.q1 - t.q0, t.k1 - t.k0) >= min(min_tile, q1 - q0, k1 - k0) // 2
                assert t in groups[(t.q1 - t.q0, t.k1 - t.k0, t.kind)]
                covered[t.q0 : t.q1, t.k0 : t.k1] += 1
    assert covered.max() <= 1  # disjoint
    assert (covered[keep] == 1).all()  # every kept pair computed
    if min_tile == 0:
        assert all(
            len(plan.pair_tiles(i, j)) <= 1
            for i in range(plan.num_q_chunks)
            for j in range(plan.num_k_chunks)
        )


def test_tiles_split_a_causal_diagonal():
    plan = BlockPlan.build(StructuredMask(1024, 1024, causal=True), 1024, 1024, 256)
    tiles = plan.pair_tiles(0, 0)
    # 1024 -> two 512 halves (the top-right one empty) -> the two diagonal 512 blocks split again
    assert sum((t.q1 - t.q0) * (t.k1 - t.k0) for t in tiles) == 512 * 512 + 2 * 3 * 256 * 256
    assert {(t.q1 - t.q0, t.k1 - t.k0, t.kind) for t in tiles} == {(512, 512, FULL), (256, 256, FULL),
                                                                   (256, 256, PARTIAL)}  # fmt: skip
    assert BlockPlan.build(StructuredMask(1024, 1024), 1024, 1024, 256).pair_tiles(0, 0) == [
        Tile(0, 0, 0, 1024, 0, 1024, FULL)
    ]


def test_block_plan_of_unmasked_call_is_all_full():
    plan = _check_plan(StructuredMask(37, 53), 16, 8, exact=True)
    assert plan.count(FULL) == 3 * 7
    plan = _check_plan(StructuredMask(37, 53, kv_lengths=True), 16, 8, exact=True)
    assert plan.count(PARTIAL) == 3 * 7


def test_block_plan_skips_causal_blocks():
    plan = _check_plan(StructuredMask(64, 64, causal=True), 16, 16, exact=True)
    assert plan.count(EMPTY) == 6 and plan.count(PARTIAL) == 4 and plan.count(FULL) == 6
    # bottom-right with more queries than keys: the first rows see nothing at all
    mask = StructuredMask(40, 8, causal=True, offset=alignment_offset("bottom_right", 40, 8))
    plan = _check_plan(mask, 8, 8, exact=True)
    assert plan.key_chunks(0) == plan.key_chunks(1) == plan.key_chunks(2) == (0, 0)
    assert plan.key_chunks(4) == (0, 1)


def test_structured_mask_is_hashable_static():
    a = StructuredMask(5, 6, causal=True, window=(1, 2))
    b = StructuredMask(5, 6, causal=True, window=(1, 2))
    assert a == b and hash(a) == hash(b)
    assert StructuredMask(5, 6).static is False
    assert StructuredMask(5, 6, segments=True).dynamic is True


# ------------------------------------------------------------------------------------------
# _config.chunk_keep against the dense structured masks of the reference
# ------------------------------------------------------------------------------------------


@st.composite
def chunk_keep_configs(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    kv_heads = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 2))
    q_len, kv_len = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    return dict(
        batch=batch,
        kv_heads=kv_heads,
        groups=groups,
        q_len=q_len,
        kv_len=kv_len,
        causal=draw(st.booleans()),
        alignment=draw(st.sampled_from(["top_left", "bottom_right"])),
        window=draw(st.none() | st.tuples(st.integers(0, 6), st.integers(0, 6))),
        q_lengths=draw(st.booleans()),
        kv_lengths=draw(st.booleans()),
        segments=draw(st.booleans()),
        mask_mod=draw(st.booleans()),
        q_chunk=draw(st.integers(1, 8)),
        k_chunk=draw(st.integers(1, 8)),
        seed=draw(st.integers(0, 2**16)),
    )


def _mod(b, h, q, k):
    return ((q + k + b) % 3 != 0) | (h == 1)


@given(chunk_keep_configs())
def test_chunk_keep_matches_dense_masks(cfg):
    rng = np.random.default_rng(cfg["seed"])
    batch, z = cfg["batch"], math.prod(cfg["batch"])
    kh, g, L, S = cfg["kv_heads"], cfg["groups"], cfg["q_len"], cfg["kv_len"]
    h = kh * g
    q_lengths = rng.integers(0, L + 1, size=batch) if cfg["q_lengths"] else None
    kv_lengths = rng.integers(0, S + 1, size=batch) if cfg["kv_lengths"] else None
    q_seg = np.sort(rng.integers(0, 3, size=(*batch, L)), axis=-1) if cfg["segments"] else None
    k_seg = np.sort(rng.integers(0, 3, size=(*batch, S)), axis=-1) if cfg["segments"] else None
    mask_mod = _mod if cfg["mask_mod"] else None
    dense = structured_keep(
        batch, h, L, S,
        is_causal=cfg["causal"],
        causal_alignment=cfg["alignment"],
        local_window_size=cfg["window"],
        query_seq_lengths=q_lengths,
        key_value_seq_lengths=kv_lengths,
        query_segment_ids=q_seg,
        key_segment_ids=k_seg,
        mask_mod=mask_mod,
    )  # fmt: skip
    structure = StructuredMask(
        L, S,
        causal=cfg["causal"],
        window=cfg["window"],
        offset=alignment_offset(cfg["alignment"], L, S),
        q_lengths=q_lengths is not None,
        kv_lengths=kv_lengths is not None,
        segments=q_seg is not None,
        mask_mod=mask_mod is not None,
    )  # fmt: skip
    for (q0, q1), (k0, k1) in itertools.product(
        chunk_bounds(L, cfg["q_chunk"]), chunk_bounds(S, cfg["k_chunk"])
    ):
        lc, kc = q1 - q0, k1 - k0
        q_idx = np.arange(q0, q1).reshape(1, 1, lc, 1, 1)
        k_idx = np.arange(k0, k1).reshape(1, 1, 1, 1, kc)
        keep = _config.chunk_keep(
            structure,
            q_idx,
            k_idx,
            q_lengths=None if q_lengths is None else q_lengths.reshape(z, 1, 1, 1, 1),
            kv_lengths=None if kv_lengths is None else kv_lengths.reshape(z, 1, 1, 1, 1),
            q_segments=None if q_seg is None else q_seg.reshape(z, 1, L, 1, 1)[:, :, q0:q1],
            kv_segments=None if k_seg is None else k_seg.reshape(z, 1, 1, 1, S)[..., k0:k1],
            mask_mod=mask_mod,
            batch_idx=np.arange(z).reshape(z, 1, 1, 1, 1),
            head_idx=(np.arange(kh).reshape(1, kh, 1, 1, 1) * g
                      + np.arange(g).reshape(1, 1, 1, g, 1)),
        )  # fmt: skip
        # dense [Z, H, L, S] -> chunk [Z, K, lc, G, kc]
        want = dense[:, :, q0:q1, k0:k1].reshape(z, kh, g, lc, kc).transpose(0, 1, 3, 2, 4)
        if keep is None:
            assert want.all()
        else:
            np.testing.assert_array_equal(np.broadcast_to(keep, want.shape), want)


def test_kernel_config_is_hashable_and_plans():
    dims = Dims((2,), 37, 53, 4, 2, 8, 8)
    structure = StructuredMask(37, 53, causal=True)
    a = _config.KernelConfig(dims, "float16", 0.3, 16, 8, structure)
    b = _config.KernelConfig(dims, "float16", 0.3, 16, 8, structure)
    assert a == b and hash(a) == hash(b)
    assert a.compute_dtype == "float32"
    assert a.plan.kinds == BlockPlan.build(structure, 16, 8).kinds


# ------------------------------------------------------------------------------------------
# _chunks
# ------------------------------------------------------------------------------------------


@st.composite
def call_dims(draw):
    batch = tuple(draw(st.lists(st.integers(1, 8), min_size=0, max_size=2)))
    kv = draw(st.integers(1, 4))
    return Dims(
        batch,
        draw(st.integers(1, 5000)),
        draw(st.integers(1, 5000)),
        kv * draw(st.integers(1, 4)),
        kv,
        64,
        64,
    )


@given(call_dims(), st.integers(1, 70), st.integers(1, 70), st.sampled_from(["float16", "float64"]))
def test_choose_chunk_sizes_honours_explicit_sizes(dims, qc, kc, dtype):
    assert choose_chunk_sizes(dims, dtype, qc, kc) == (min(qc, dims.q_len), min(kc, dims.kv_len))
    # one explicit, one chosen: the explicit one is kept (clipped to its axis)
    got_q, got_k = choose_chunk_sizes(dims, dtype, qc, None, memory_budget="1MiB")
    assert got_q == min(qc, dims.q_len) and 1 <= got_k <= dims.kv_len
    got_q, got_k = choose_chunk_sizes(dims, dtype, None, kc, memory_budget=2**20)
    assert got_k == min(kc, dims.kv_len) and 1 <= got_q <= dims.q_len


@given(
    call_dims(),
    st.sampled_from([None, "64KiB", "1MiB", "16MiB", "1GB"]),
    st.sampled_from(["bfloat16", "float32", "float64"]),
)
def test_choose_chunk_sizes_respects_the_budget(dims, budget, dtype):
    qc, kc = choose_chunk_sizes(dims, dtype, memory_budget=budget)
    assert 1 <= qc <= dims.q_len and 1 <= kc <= dims.kv_len
    # the documented rule: queries start at 1024 and only shrink, keys grow up to 4096
    assert qc <= 1024 and kc <= 4096
    nbytes = parse_memory(budget) or _chunks.DEFAULT_MEMORY_BUDGET
    itemsize = 8 if dtype == "float64" else 4
    rows = dims.batch_size * dims.q_heads
    fits = rows * qc * kc * itemsize <= nbytes // 4
    assert fits or (qc <= 16 and kc <= 16), (qc, kc)


def test_choose_chunk_sizes_rejects_bad_sizes():
    dims = Dims((1,), 100, 100, 2, 2, 8, 8)
    for bad in (0, -1):
        with pytest.raises(AttentionInputError, match="query_chunk_size"):
            choose_chunk_sizes(dims, "float32", bad, 8)
        with pytest.raises(AttentionInputError, match="key_chunk_size"):
            choose_chunk_sizes(dims, "float32", 8, bad)
    with pytest.raises(AttentionInputError, match="memory_budget"):
        choose_chunk_sizes(dims, "float32", memory_budget="lots")


def test_parse_memory():
    assert parse_memory(None) is None
    assert parse_memory(4096) == 4096
    assert parse_memory(1.5e3) == 1500
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("2 GiB") == 2 * 2**30
    assert parse_memory("1.5GiB") == 3 * 2**29
    assert parse_memory("300k") == 300 * 2**10
    assert parse_memory("64kib") == 64 * 2**10
    assert parse_memory("7") == 7
    for bad in ("abc", "12 parsecs", "", 0, -5, True, "-3MB"):
        with pytest.raises(AttentionInputError, match="memory_budget"):
            parse_memory(bad)


@pytest.mark.parametrize("module", [_masks, _chunks, _spec, _config])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if module in (_masks, _chunks):
        assert result.attempted > 0


def test_chunk_sizes_follow_a_local_window_but_honour_explicit_sizes():
    from memory_efficient_attention._chunks import choose_chunk_sizes
    from memory_efficient_attention._spec import Dims

    dims = Dims((1,), 8192, 8192, 8, 8, 64, 64)
    assert choose_chunk_sizes(dims, "float32") == (512, 512)
    assert choose_chunk_sizes(dims, "float32", band=513) == (256, 256)
    assert choose_chunk_sizes(dims, "float32", band=9) == (64, 64)
    assert choose_chunk_sizes(dims, "float32", 1000, 300, band=9) == (1000, 300)


def test_broadcast_shapes_follows_numpy():
    import numpy as np

    from memory_efficient_attention._spec import broadcast_shapes

    rng = np.random.default_rng(0)
    for _ in range(500):
        shapes = [tuple(int(x) for x in rng.choice([0, 1, 2, 3], size=rng.integers(0, 4))) for _ in range(3)]
        try:
            want = tuple(np.broadcast_shapes(*shapes))
        except ValueError:
            want = None
        assert broadcast_shapes(*shapes) == want, shapes
