"""Mask objects of ``memory_efficient_attention.masks`` (``Causal``, ``Window``, ``Lengths``,
``Segments``, ``MaskMod``, ``&``, ``|``): dense keep masks against the float64 reference,
block plans against the dense masks, the keyword round trip, and ``mask=`` in both frameworks."""

from __future__ import annotations

import numpy as np
import pytest

from memory_efficient_attention import masks as M
from memory_efficient_attention._masks import EMPTY, FULL
from memory_efficient_attention._spec import AttentionInputError

from .python_process import run_python
from .reference import reference_grads, structured_keep

BATCH = (2,)
SHAPES = [(7, 9), (9, 7), (8, 8)]


def ref(q_len, kv_len, **kw):
    """The reference keep mask ``[Z, 1, L, S]`` of structured keywords (numpy operands)."""
    return structured_keep(BATCH, 1, q_len, kv_len, **kw)


def modulo_mod(b, h, q_idx, kv_idx):
    return (q_idx + 2 * kv_idx) % 3 != 0


def batch_mod(b, h, q_idx, kv_idx):
    return (kv_idx + b) % 4 != 1


def case_arrays(q_len, kv_len):
    """Integer operands (numpy) for the cases: lengths ``[2]`` and segment ids ``[2, n]``."""
    rng = np.random.default_rng(q_len * 100 + kv_len)

    def segments(n, seed):
        return np.sort(np.random.default_rng(seed).integers(0, 3, size=(2, n)), axis=-1)

    return {
        "ql": np.array([q_len - 3, q_len]),
        "kl": np.array([kv_len, 2]),
        "ql2": np.array([q_len - 1, 4]),
        "kl2": np.array([kv_len - 4, kv_len]),
        "sq": segments(q_len, 1),
        "sk": segments(kv_len, 2),
        "sq2": np.tile(np.arange(q_len) % 2, (2, 1)),
        "sk2": np.tile(np.arange(kv_len) % 2, (2, 1)),
        "rng": rng,
    }


# Each case: (name, build(a) -> mask object, reference(a, L, S) -> keep [Z, 1, L, S], planned)
# ``a`` maps the operand names of ``case_arrays`` to framework arrays; ``planned``: to_kwargs has
# no mask_mod (the object is planned entirely on index ranges).
CASES = [
    ("causal", lambda a: M.Causal(), lambda a, L, S: ref(L, S, is_causal=True), True),
    (
        "causal_br",
        lambda a: M.Causal("bottom_right"),
        lambda a, L, S: ref(L, S, is_causal=True, causal_alignment="bottom_right"),
        True,
    ),
    ("window", lambda a: M.Window(2), lambda a, L, S: ref(L, S, local_window_size=2), True),
    (
        "window_br",
        lambda a: M.Window(3, 0, alignment="bottom_right"),
        lambda a, L, S: ref(L, S, local_window_size=(3, 0), causal_alignment="bottom_right"),
        True,
    ),
    (
        "lengths",
        lambda a: M.Lengths(a["ql"], a["kl"]),
        lambda a, L, S: ref(L, S, query_seq_lengths=a["ql"], key_value_seq_lengths=a["kl"]),
        True,
    ),
    (
        "kv_lengths",
        lambda a: M.Lengths(key_value=a["kl"]),
        lambda a, L, S: ref(L, S, key_value_seq_lengths=a["kl"]),
        True,
    ),
    (
        "segments",
        lambda a: M.Segments(a["sq"], a["sk"]),
        lambda a, L, S: ref(L, S, query_segment_ids=a["sq"], key_segment_ids=a["sk"]),
        True,
    ),
    ("mask_mod", lambda a: M.MaskMod(modulo_mod), lambda a, L, S: ref(L, S, mask_mod=modulo_mod), False),
    ("batch_mod", lambda a: M.MaskMod(batch_mod), lambda a, L, S: ref(L, S, mask_mod=batch_mod), False),
    (
        "causal&window",
        lambda a: M.Causal() & M.Window(2, 1),
        lambda a, L, S: ref(L, S, is_causal=True, local_window_size=(2, 1)),
        True,
    ),
    (
        "causal_br&window_br",
        lambda a: M.Causal("bottom_right") & M.Window(4, 0, "bottom_right"),
        lambda a, L, S: ref(L, S, is_causal=True, local_window_size=(4, 0), causal_alignment="bottom_right"),
        True,
    ),
    (
        "causal_br&window(folded)",
        lambda a: M.Causal("bottom_right") & M.Window(2, 0),
        lambda a, L, S: (
            ref(L, S, is_causal=True, causal_alignment="bottom_right") & ref(L, S, local_window_size=(2, 0))
        ),
        False,
    ),
    (
        "causal&causal_br(folded)",
        lambda a: M.Causal() & M.Causal("bottom_right"),
        lambda a, L, S: (
            ref(L, S, is_causal=True) & ref(L, S, is_causal=True, causal_alignment="bottom_right")
        ),
        False,
    ),
    (
        "window&window",
        lambda a: M.Window(4) & M.Window(1, 6),
        lambda a, L, S: ref(L, S, local_window_size=4) & ref(L, S, local_window_size=(1, 6)),
        True,
    ),
    (
        "lengths&lengths(merged)",
        lambda a: M.Lengths(query=a["ql"]) & M.Lengths(key_value=a["kl"]),
        lambda a, L, S: ref(L, S, query_seq_lengths=a["ql"]) & ref(L, S, key_value_seq_lengths=a["kl"]),
        True,
    ),
    (
        "lengths&lengths(folded)",
        lambda a: M.Lengths(a["ql"], a["kl"]) & M.Lengths(a["ql2"], a["kl2"]),
        lambda a, L, S: (
            ref(L, S, query_seq_lengths=a["ql"], key_value_seq_lengths=a["kl"])
            & ref(L, S, query_seq_lengths=a["ql2"], key_value_seq_lengths=a["kl2"])
        ),
        False,
    ),
    (
        "segments&segments(folded)",
        lambda a: M.Segments(a["sq"], a["sk"]) & M.Segments(a["sq2"], a["sk2"]),
        lambda a, L, S: (
            ref(L, S, query_segment_ids=a["sq"], key_segment_ids=a["sk"])
            & ref(L, S, query_segment_ids=a["sq2"], key_segment_ids=a["sk2"])
        ),
        False,
    ),
    (
        "all kinds",
        lambda a: (
            M.Causal() & M.Lengths(key_value=a["kl"]) & M.Segments(a["sq"], a["sk"]) & M.MaskMod(batch_mod)
        ),
        lambda a, L, S: ref(
            L,
            S,
            is_causal=True,
            key_value_seq_lengths=a["kl"],
            query_segment_ids=a["sq"],
            key_segment_ids=a["sk"],
            mask_mod=batch_mod,
        ),
        False,
    ),
    (
        "causal|window",
        lambda a: M.Causal() | M.Window(1, 3),
        lambda a, L, S: ref(L, S, is_causal=True) | ref(L, S, local_window_size=(1, 3)),
        False,
    ),
    (
        "mask_mod|mask_mod",
        lambda a: M.MaskMod(modulo_mod) | M.MaskMod(batch_mod),
        lambda a, L, S: ref(L, S, mask_mod=modulo_mod) | ref(L, S, mask_mod=batch_mod),
        False,
    ),
    (
        "window|window(merged)",
        lambda a: M.Window(2) | M.Window(1, 4),
        lambda a, L, S: ref(L, S, local_window_size=2) | ref(L, S, local_window_size=(1, 4)),
        True,
    ),
    (
        "(causal_br|lengths)&window",
        lambda a: (M.Causal("bottom_right") | M.Lengths(key_value=a["kl"])) & M.Window(3),
        lambda a, L, S: (
            (
                ref(L, S, is_causal=True, causal_alignment="bottom_right")
                | ref(L, S, key_value_seq_lengths=a["kl"])
            )
            & ref(L, S, local_window_size=3)
        ),
        False,
    ),
    (
        "(causal&segments)|window",
        lambda a: (M.Causal() & M.Segments(a["sq"], a["sk"])) | M.Window(0, 0, "bottom_right"),
        lambda a, L, S: (
            ref(L, S, is_causal=True, query_segment_ids=a["sq"], key_segment_ids=a["sk"])
            | ref(L, S, local_window_size=0, causal_alignment="bottom_right")
        ),
        False,
    ),
]
IDS = [c[0] for c in CASES]


def numpy_arrays(q_len, kv_len):
    return case_arrays(q_len, kv_len)


# ------------------------------------------------------------------------------------------
# Framework-neutral: dense masks, block plans, keywords, repr
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
@pytest.mark.parametrize("name,build,reference,planned", CASES, ids=IDS)
def test_to_dense_equals_reference(name, build, reference, planned, q_len, kv_len):
    a = numpy_arrays(q_len, kv_len)
    obj = build(a)
    want = reference(a, q_len, kv_len)[:, 0]  # [Z, L, S]
    got = obj.to_dense(q_len, kv_len, batch=BATCH)
    assert got.shape == (*BATCH, q_len, kv_len) and got.dtype == bool
    np.testing.assert_array_equal(got, want)
    # with heads: the same mask for each head (no case depends on h)
    got_h = obj.to_dense(q_len, kv_len, batch=BATCH, heads=3)
    assert got_h.shape == (*BATCH, 3, q_len, kv_len)
    np.testing.assert_array_equal(got_h, np.broadcast_to(want[:, None], got_h.shape))


def test_to_dense_shapes_without_batch():
    assert M.Causal().to_dense(3, 5).shape == (3, 5)
    np.testing.assert_array_equal(M.Causal().to_dense(3, 5), np.tril(np.ones((3, 5), bool)))
    np.testing.assert_array_equal(
        M.Causal("bottom_right").to_dense(3, 5), np.tril(np.ones((3, 5), bool), k=2)
    )
    lengths = M.Lengths(np.array([[1, 2, 3]]))  # [B...] = [1, 3]
    dense = lengths.to_dense(4, 2)
    assert dense.shape == (1, 3, 4, 2)
    np.testing.assert_array_equal(dense[0, :, :, 0].sum(-1), [1, 2, 3])
    # a head-dependent mask_mod is evaluated on h over `heads` (h = 0 without)
    by_head = M.MaskMod(lambda b, h, q, k: k <= h)
    np.testing.assert_array_equal(by_head.to_dense(2, 3), [[True, False, False]] * 2)
    np.testing.assert_array_equal(by_head.to_dense(2, 3, heads=2)[1], [[True, True, False]] * 2)


@pytest.mark.parametrize("chunks", [(2, 3), (4, 4), (3, 2)])
@pytest.mark.parametrize("q_len,kv_len", SHAPES)
@pytest.mark.parametrize("name,build,reference,planned", CASES, ids=IDS)
def test_block_grid_agrees_with_dense(name, build, reference, planned, q_len, kv_len, chunks):
    a = numpy_arrays(q_len, kv_len)
    obj = build(a)
    dense = obj.to_dense(q_len, kv_len, batch=BATCH).reshape(-1, q_len, kv_len)
    q_chunk, k_chunk = chunks
    plan = obj.block_plan(q_len, kv_len, q_chunk, k_chunk)
    text = obj.block_grid(q_len, kv_len, q_chunk, k_chunk)
    rows = [line.split() for line in text.splitlines()[1:]]
    assert text.splitlines()[0] == str(plan).splitlines()[0]
    glyphs = {".": EMPTY, "+": 1, "#": FULL}
    assert [[glyphs[g] for g in row] for row in rows] == [list(r) for r in plan.kinds]
    for i, row in enumerate(plan.kinds):
        for j, kind in enumerate(row):
            (q0, q1), (k0, k1) = plan.q_bounds(i), plan.k_bounds(j)
            block = dense[:, q0:q1, k0:k1]
            if kind == EMPTY:
                assert not block.any(), (i, j)
            if kind == FULL:
                assert block.all(), (i, j)
    if planned and not any(
        isinstance(p, (M.Lengths, M.Segments)) for p in getattr(obj, "parts", (obj,))
    ):  # static only: every block is exactly empty or partial/full as the dense mask says
        for i, row in enumerate(plan.kinds):
            for j, kind in enumerate(row):
                (q0, q1), (k0, k1) = plan.q_bounds(i), plan.k_bounds(j)
                block = dense[:, q0:q1, k0:k1]
                assert (kind == EMPTY) == (not block.any())
                assert (kind == FULL) == bool(block.all())


def test_block_grid_skips_the_planned_part_of_a_fold():
    obj = M.Causal() & M.Window(2, 0, "bottom_right")  # the window is folded into the mask_mod
    plan = obj.block_plan(8, 8, 2, 2)
    assert plan.count(FULL) == 0  # a mask_mod exists
    assert plan.count(EMPTY) == M.Causal().block_plan(8, 8, 2, 2).count(EMPTY) > 0


@pytest.mark.parametrize("q_len,kv_len", SHAPES)
@pytest.mark.parametrize("name,build,reference,planned", CASES, ids=IDS)
def test_to_kwargs_plans_and_round_trips(name, build, reference, planned, q_len, kv_len):
    a = numpy_arrays(q_len, kv_len)
    obj = build(a)
    kw = obj.to_kwargs(q_len, kv_len)
    assert set(kw) <= set(M._KWARG_DEFAULTS)
    assert ("mask_mod" not in kw) == planned, kw
    want = reference(a, q_len, kv_len)
    np.testing.assert_array_equal(ref(q_len, kv_len, **kw), want)
    back = M.from_kwargs(**kw)
    np.testing.assert_array_equal(back.to_dense(q_len, kv_len, batch=BATCH), want[:, 0])
    assert _same_kwargs(back.to_kwargs(q_len, kv_len), kw)
    if planned:
        assert back == obj and repr(back) == repr(obj)


def _same_kwargs(a, b):
    return a.keys() == b.keys() and all(
        (a[n] == b[n]) if isinstance(a[n], (bool, str, tuple)) else a[n] is b[n] for n in a
    )


def test_from_kwargs_builds_the_objects():
    ql, seg = np.array([3, 4]), np.zeros((2, 5), int)
    assert M.from_kwargs() is None
    assert M.from_kwargs(causal_alignment="bottom_right") is None
    assert M.from_kwargs(is_causal=True) == M.Causal()
    assert M.from_kwargs(local_window_size=3) == M.Window(3, 3)
    assert M.from_kwargs(local_window_size=(3, 1), causal_alignment="bottom_right") == M.Window(
        3, 1, "bottom_right"
    )
    assert M.from_kwargs(query_seq_lengths=ql) == M.Lengths(ql)
    assert M.from_kwargs(query_segment_ids=seg, key_segment_ids=seg) == M.Segments(seg)
    assert M.from_kwargs(mask_mod=modulo_mod) == M.MaskMod(modulo_mod)
    kw = dict(
        is_causal=True, causal_alignment="bottom_right", local_window_size=(4, 0), key_value_seq_lengths=ql
    )
    obj = M.from_kwargs(**kw)
    assert obj == M.Causal("bottom_right") & M.Window(4, 0, "bottom_right") & M.Lengths(key_value=ql)
    assert obj.to_kwargs() == kw
    with pytest.raises(TypeError, match="bias"):
        M.from_kwargs(bias=1)
    with pytest.raises(AttentionInputError, match="key_segment_ids"):
        M.from_kwargs(key_segment_ids=seg)


def test_repr():
    ql, seg = np.array([3, 4]), np.zeros((2, 5), np.int32)
    assert repr(M.Causal()) == "Causal()"
    assert repr(M.Causal("bottom_right") & M.Window(128, 0, "bottom_right")) == (
        "Causal(alignment='bottom_right') & Window(left=128, right=0, alignment='bottom_right')"
    )
    assert repr(M.Window(5)) == "Window(left=5, right=5)"
    assert repr(M.Lengths(key_value=ql)) == "Lengths(key_value=<int64[2]>)"
    assert repr(M.Segments(seg)) == "Segments(<int32[2, 5]>)"
    assert repr(M.MaskMod(modulo_mod)) == "MaskMod(modulo_mod)"
    assert repr(M.MaskMod(modulo_mod) | M.MaskMod(batch_mod)) == "MaskMod(or_masks(modulo_mod, batch_mod))"
    assert repr(M.Causal() | M.Window(2)) == "Causal() | Window(left=2, right=2)"
    assert repr(M.Window(2) & (M.Causal() | M.MaskMod(modulo_mod))) == (
        "Window(left=2, right=2) & (Causal() | MaskMod(modulo_mod))"
    )
    # planned parts first, folded ones after
    assert repr(M.MaskMod(modulo_mod) & M.Causal()) == "Causal() & MaskMod(modulo_mod)"


def test_combination_rules():
    assert M.Causal() & M.Causal() == M.Causal()
    assert M.Causal() | M.Causal() == M.Causal()
    assert M.Window(4) & M.Window(1, 6) == M.Window(1, 4)
    assert M.Window(2) | M.Window(1, 4) == M.Window(2, 4)
    assert isinstance(M.Window(0, -3) | M.Window(-5, 8), M.Or)  # disjoint bands stay a union
    assert isinstance(M.MaskMod(modulo_mod) | M.MaskMod(batch_mod), M.MaskMod)
    folded = M.Causal() & M.Causal("bottom_right")
    assert isinstance(folded, M.And) and folded.folded == (M.Causal("bottom_right"),)
    with pytest.raises(AttentionInputError, match="q_len and kv_len"):
        folded.to_kwargs()
    assert "mask_mod" in folded.to_kwargs(4, 6) and folded.to_kwargs(4, 6)["is_causal"] is True
    # the folded mask_mod is cached per lengths: one object, one compilation under jax.jit
    assert folded.to_kwargs(4, 6)["mask_mod"] is folded.to_kwargs(4, 6)["mask_mod"]
    union = M.Causal() | M.Window(2)
    assert union.to_kwargs()["mask_mod"] is union.to_kwargs()["mask_mod"]
    with pytest.raises(TypeError):
        M.Causal() & np.ones((2, 2), bool)
    with pytest.raises(AttributeError):
        M.Causal().alignment = "bottom_right"
    with pytest.raises(AttentionInputError, match="alignment"):
        M.Causal("bottom")
    with pytest.raises(AttentionInputError, match="local_window_size"):
        M.Window(True)
    with pytest.raises(AttentionInputError, match="callable"):
        M.MaskMod(3)


def test_merge_mask_kwargs_conflicts():
    ql = np.array([3, 4])
    base = dict(M._KWARG_DEFAULTS)
    dense = np.ones((3, 3), bool)
    assert M.merge_mask_kwargs(dense, base) == (dense, base)
    assert M.merge_mask_kwargs(None, base) == (None, base)
    mask, kw = M.merge_mask_kwargs(M.Causal() & M.Lengths(ql), {**base, "local_window_size": 2})
    assert mask is None and kw["is_causal"] and kw["query_seq_lengths"] is ql and kw["local_window_size"] == 2
    folded = M.Causal() & M.Causal("bottom_right")
    _, kw = M.merge_mask_kwargs(folded, base, (2, 4, 1, 8), (2, 6, 1, 8))  # L = 4, S = 6 from the shapes
    assert kw["mask_mod"] is folded.to_kwargs(4, 6)["mask_mod"]
    # the same value given twice is fine
    M.merge_mask_kwargs(M.Window(2), {**base, "local_window_size": (2, 2)})
    M.merge_mask_kwargs(M.Lengths(ql), {**base, "query_seq_lengths": ql})
    for obj, explicit in [
        (M.Window(2), {"local_window_size": 3}),
        (M.Lengths(ql), {"query_seq_lengths": np.array([3, 4])}),
        (M.MaskMod(modulo_mod), {"mask_mod": batch_mod}),
        (M.Causal(), {"causal_alignment": "bottom_right"}),
        (M.Causal("bottom_right"), {"is_causal": True}),  # explicit causal uses top_left
        (M.Window(1, alignment="bottom_right"), {"local_window_size": 2}),
    ]:
        with pytest.raises(AttentionInputError, match="mask="):
            M.merge_mask_kwargs(obj, {**base, **explicit})


def test_import_is_lazy():
    code = """
        import sys
        import numpy as np
        from memory_efficient_attention import masks
        obj = (masks.Causal() & masks.Lengths(np.array([2]))) | masks.Window(1)
        obj.to_dense(4, 4), obj.block_grid(4, 4, 2, 2), obj.to_kwargs()
        print("HEAVY", sorted(m for m in ("torch", "jax", "jaxlib", "flax") if m in sys.modules))
    """
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------------
# mask= in the seed-layout functions
# ------------------------------------------------------------------------------------------


def qkv(q_len, kv_len, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((*BATCH, q_len, 4, 8))
    k = rng.standard_normal((*BATCH, kv_len, 2, 8))
    v = rng.standard_normal((*BATCH, kv_len, 2, 8))
    d_out = rng.standard_normal((*BATCH, q_len, 4, 8))
    return q, k, v, d_out


def reference_of(keep):
    """Float64 reference output and gradients for a keep mask ``[Z, 1, L, S]``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, 0, q_idx, kv_idx]

    return mask_mod


ATTN_SHAPES = [(7, 9), (9, 7)]


@pytest.mark.parametrize("q_len,kv_len", ATTN_SHAPES)
@pytest.mark.parametrize("name,build,reference,planned", CASES, ids=IDS)
def test_torch_mask_object(name, build, reference, planned, q_len, kv_len):
    torch = pytest.importorskip("torch")
    from memory_efficient_attention.torch import efficient_dot_product_attention as attention

    np_a = numpy_arrays(q_len, kv_len)
    a = {n: torch.as_tensor(x) if isinstance(x, np.ndarray) else x for n, x in np_a.items()}
    q, k, v, d_out = qkv(q_len, kv_len)
    want, want_grads = reference_grads(q, k, v, d_out, mask_mod=reference_of(reference(np_a, q_len, kv_len)))

    def run(**kw):
        qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
        out = attention(qt, kt, vt, query_chunk_size=4, key_chunk_size=3, **kw)
        grads = torch.autograd.grad(out, (qt, kt, vt), torch.as_tensor(d_out))
        return out.detach().numpy(), [g.numpy() for g in grads]

    obj = build(a)
    out, grads = run(mask=obj)
    np.testing.assert_allclose(out, want, atol=1e-10)
    for g, n in zip(grads, ("query", "key", "value")):
        np.testing.assert_allclose(g, want_grads[n], atol=1e-10)
    out_kw, grads_kw = run(**obj.to_kwargs(q_len, kv_len))  # the equivalent keywords
    np.testing.assert_allclose(out, out_kw, atol=1e-12)
    for g, g_kw in zip(grads, grads_kw):
        np.testing.assert_allclose(g, g_kw, atol=1e-12)


@pytest.mark.parametrize("q_len,kv_len", ATTN_SHAPES)
@pytest.mark.parametrize("name,build,reference,planned", CASES, ids=IDS)
def test_jax_mask_object(name, build, reference, planned, q_len, kv_len):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from memory_efficient_attention.jax import efficient_dot_product_attention as attention

    np_a = numpy_arrays(q_len, kv_len)
    a = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in np_a.items()}
    q, k, v, d_out = qkv(q_len, kv_len, seed=1)
    want, want_grads = reference_grads(q, k, v, d_out, mask_mod=reference_of(reference(np_a, q_len, kv_len)))

    def run(**kw):
        def loss(q, k, v):
            out = attention(q, k, v, query_chunk_size=4, key_chunk_size=3, **kw)
            return jnp.sum(out * d_out), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            *(jnp.asarray(x, jnp.float64) for x in (q, k, v))
        )
        return np.asarray(out), [np.asarray(g) for g in grads]

    obj = build(a)
    out, grads = run(mask=obj)
    np.testing.assert_allclose(out, want, atol=1e-10)
    for g, n in zip(grads, ("query", "key", "value")):
        np.testing.assert_allclose(g, want_grads[n], atol=1e-10)
    out_kw, grads_kw = run(**obj.to_kwargs(q_len, kv_len))
    np.testing.assert_allclose(out, out_kw, atol=1e-12)
    for g, g_kw in zip(grads, grads_kw):
        np.testing.assert_allclose(g, g_kw, atol=1e-12)


def test_jax_mask_object_under_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from memory_efficient_attention.jax import efficient_dot_product_attention as attention

    q, k, v, _ = qkv(6, 6)
    lengths = np.array([4, 6])
    keep = ref(6, 6, is_causal=True, key_value_seq_lengths=lengths)
    want, _ = reference_grads(q, k, v, np.zeros_like(q), mask_mod=reference_of(keep))

    @jax.jit
    def f(q, k, v, lengths):
        return attention(q, k, v, mask=M.Causal() & M.Lengths(key_value=lengths), key_chunk_size=4)

    np.testing.assert_allclose(np.asarray(f(q, k, v, jnp.asarray(lengths))), want, atol=1e-10)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_mask_object_conflicts_and_dense_masks_in_the_api(framework):
    mod = pytest.importorskip(framework)
    if framework == "torch":
        from memory_efficient_attention.torch import efficient_dot_product_attention as attention

        arr = mod.as_tensor
    else:
        from memory_efficient_attention.jax import efficient_dot_product_attention as attention

        arr = mod.numpy.asarray
    q, k, v, _ = qkv(5, 5)
    q, k, v = arr(q), arr(k), arr(v)
    with pytest.raises(AttentionInputError, match="local_window_size"):
        attention(q, k, v, mask=M.Window(2), local_window_size=3)
    with pytest.raises(AttentionInputError, match="causal_alignment"):
        attention(q, k, v, mask=M.Causal("bottom_right"), local_window_size=3)
    with pytest.raises(AttentionInputError, match="mask_mod"):
        attention(q, k, v, mask=M.MaskMod(modulo_mod), mask_mod=batch_mod)
    # the same value twice, and an explicit keyword combined with an object: fine
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v, mask=M.Causal(), is_causal=True, local_window_size=1)),
        np.asarray(attention(q, k, v, is_causal=True, local_window_size=1)),
        atol=1e-12,
    )
    # a dense boolean mask keeps the seed's finfo.min rule: a row masked everywhere averages
    dense = np.tril(np.ones((5, 5), bool))
    dense[2] = False
    out = np.asarray(attention(q, k, v, mask=arr(dense)))
    np.testing.assert_allclose(
        out[:, 2], np.broadcast_to(np.asarray(v).mean(1).repeat(2, axis=1), out[:, 2].shape)
    )


def test_docstring_examples_run():
    pytest.importorskip("torch")  # the module docstring's example runs attention in torch
    import doctest

    result = doctest.testmod(M, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 5


def test_folded_mask_mod_follows_the_lengths():
    # a bottom-right part inside a union: its mask_mod depends on (L, S), cached per lengths
    obj = (M.Causal("bottom_right") & M.Lengths(key_value=np.array([3]))) | M.Window(0, 0)
    for q_len, kv_len in [(4, 6), (4, 4), (4, 6)]:
        mod = obj.to_kwargs(q_len, kv_len)["mask_mod"]
        b, h = np.zeros((1, 1, 1, 1), int), np.zeros((1, 1, 1, 1), int)
        q, k = np.arange(q_len).reshape(1, 1, -1, 1), np.arange(kv_len).reshape(1, 1, 1, -1)
        got = np.broadcast_to(np.asarray(mod(b, h, q, k)), (1, 1, q_len, kv_len))
        np.testing.assert_array_equal(got[0, 0], obj.to_dense(q_len, kv_len, batch=(1,))[0])
