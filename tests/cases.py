"""The one grid of cases shared by the PyTorch, JAX and parity tests.

Cases are plain data: shapes, chunk sizes, mask/bias shapes, structured-mask settings and a dtype.
``make_inputs`` turns a case into NumPy float64 arrays that are *already rounded* to the case's
dtype, so the float64 reference sees exactly the numbers the kernels see. Every array comes from a
``numpy.random.default_rng`` seeded by ``BASE_SEED`` and the case's id: reruns are identical.

Nothing here imports torch or jax.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

BASE_SEED = 20240611

DTYPES = ("float16", "bfloat16", "float32", "float64")
LOW_PRECISION = ("float16", "bfloat16")

# (atol factor, rtol): |actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|.
# The expected values are float64 references computed from the same rounded inputs.
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-5, 1e-5),
    "float16": (4e-3, 4e-3),
    "bfloat16": (3e-2, 3e-2),
}


def np_dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and returned as float64 (exactly representable in ``dtype``)."""
    return np.asarray(x).astype(np_dtype(dtype)).astype(np.float64)


def assert_close(actual, expected, dtype: str, what: str = "", factor: float = 1.0) -> None:
    """Assert ``actual`` (any array-like, any float dtype) matches the float64 ``expected``."""
    actual = np.asarray(np.asarray(actual).astype(np.float64))
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    atol, rtol = TOLERANCES[dtype]
    atol, rtol = atol * factor, rtol * factor
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite), f"{what}: non-finite entries differ"
    assert np.array_equal(actual[~finite], expected[~finite]), f"{what}: infinities differ"
    if not finite.any():
        return
    a, e = actual[finite], expected[finite]
    scale = max(1.0, float(np.max(np.abs(e))))
    err = np.abs(a - e)
    bound = atol * scale + rtol * np.abs(e)
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (
        f"{what} ({dtype}): max abs err {err.max():.3g}, worst entry {a[worst]!r} vs {e[worst]!r}, "
        f"bound {bound[worst]:.3g}"
    )


# ------------------------------------------------------------------------------------------
# Functions handed to score_mod / mask_mod. They only use operators, so the same function
# runs on NumPy (reference), torch and jax index arrays. Module-level: hashable, jit-static.
# ------------------------------------------------------------------------------------------


def alibi_score(s, b, h, q_idx, kv_idx):
    """ALiBi-like: a per-head linear penalty on distance, plus a per-batch shift."""
    return s - abs(q_idx - kv_idx) * ((h + 1) * 0.0625) + b * 0.25


def halve_score(s, b, h, q_idx, kv_idx):
    return s * 0.5


def band_mask(b, h, q_idx, kv_idx):
    """Keys within 6 positions (either side)."""
    return abs(q_idx - kv_idx) <= 6


def head_batch_mask(b, h, q_idx, kv_idx):
    """Even heads see everything; odd heads skip keys that are multiples of (b + 2)."""
    return (h % 2 == 0) | ((kv_idx % (b + 2)) != 0)


def empty_rows_mask(b, h, q_idx, kv_idx):
    """Query rows 1, 5, 9, ... see no key at all: they must output 0 with zero gradient."""
    return (q_idx % 4 != 1) & (kv_idx >= 0)


SCORE_MODS = {"alibi": alibi_score, "halve": halve_score}
MASK_MODS = {"band": band_mask, "head_batch": head_batch_mask, "empty_rows": empty_rows_mask}


# ------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One attention call in the seed layout.

    ``mask_shape``/``bias_shape`` broadcast to ``[B..., H, L, S]``; with ``masked_rows`` some
    query rows of the dense mask are False everywhere (the row then averages the values). The
    structured fields are the keyword arguments of the same names; ``q_lengths``/``kv_lengths``
    are ``"random"`` (one per batch element, some full, some short) or a tuple of values;
    ``segments`` is ``"sorted"`` (packed documents) or ``"random"``.

    ``tags`` choose the subsets that tests and the grid use (see ``tagged``): ``"lse"`` tags every
    dtype of the case for both backends, ``"lse@float32,bfloat16"`` only those dtypes,
    ``"lse/torch"`` only the PyTorch backend (``"lse/torch@float16"`` both narrowed). In use:
    ``also_float32``/``also_low_precision`` (the grid's extra dtypes), ``chunks`` (chunk-size
    independence), ``extreme_chunks``, ``lse`` (``return_lse``), ``eager``/``eager_lse`` (JAX
    without jit).
    """

    name: str
    batch: tuple[int, ...] = (2,)
    L: int = 37
    S: int = 53
    H: int = 2
    K: int = 2
    D: int = 8
    E: int = 8
    q_chunk: int | None = 16
    k_chunk: int | None = 8
    mask_shape: tuple[int, ...] | None = None
    bias_shape: tuple[int, ...] | None = None
    masked_rows: bool = False
    dtype: str = "float32"
    scale: float | None = None
    is_causal: bool = False
    causal_alignment: str = "top_left"
    local_window_size: int | tuple[int, int] | None = None
    q_lengths: str | tuple | None = None
    kv_lengths: str | tuple | None = None
    segments: str | None = None
    score_mod: str | None = None
    mask_mod: str | None = None
    logits_soft_cap: float | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.name}-{self.dtype}"

    def with_(self, **changes) -> Case:
        return dataclasses.replace(self, **changes)

    def tagged(self, tag: str, backend: str | None = None) -> bool:
        """Whether ``tag`` applies to this case (its dtype) and ``backend``."""
        for entry in self.tags:
            entry, _, dtypes = entry.partition("@")
            entry, _, only = entry.partition("/")
            if entry == tag and only in ("", backend) and (not dtypes or self.dtype in dtypes.split(",")):
                return True
        return False

    @property
    def has_structure(self) -> bool:
        return bool(
            self.is_causal
            or self.local_window_size is not None
            or self.q_lengths is not None
            or self.kv_lengths is not None
            or self.segments is not None
            or self.mask_mod is not None
        )


def _dtyped(cases, dtypes):
    return [c.with_(dtype=d) for c in cases for d in dtypes]


# Shapes, chunking, broadcasting of mask/bias, dense masks (seed semantics).
_SHAPE_CASES = [
    Case(
        "basic",
        tags=(
            "also_float32",
            "chunks/torch@float64",
            "extreme_chunks@float64",
            "lse@float32",
            "lse/torch@float64",
            "eager@float32",
            "eager_lse@float32",
        ),
    ),
    Case(
        "no_batch",
        batch=(),
        L=19,
        S=19,
        H=3,
        K=3,
        D=4,
        E=4,
        q_chunk=8,
        k_chunk=8,
        tags=("also_float32", "lse@float32", "lse/torch@float64"),
    ),
    Case("batch_2x3", batch=(2, 3), L=9, S=13, H=2, K=2, D=4, E=4, q_chunk=4, k_chunk=5),
    Case("cross_e_ne_d", batch=(1,), L=21, S=50, D=16, E=6, q_chunk=8, k_chunk=16),
    Case("gqa", L=33, S=33, H=4, K=2, q_chunk=16, k_chunk=16, tags=("also_float32", "chunks/torch@float64")),
    Case("mqa", L=17, S=29, H=4, K=1, q_chunk=5, k_chunk=7, tags=("also_float32",)),
    Case("bias_head_row", bias_shape=(1, 2, 1, 53), tags=("also_float32",)),
    Case("mask_ls", mask_shape=(37, 53)),
    Case(
        "mask_bias_full",
        L=23,
        S=31,
        mask_shape=(2, 2, 23, 31),
        bias_shape=(2, 2, 23, 31),
        tags=("chunks@float64",),
    ),
    Case(
        "batch_mixed",
        batch=(2, 3),
        L=11,
        S=14,
        q_chunk=4,
        k_chunk=6,
        mask_shape=(2, 1, 1, 11, 14),
        bias_shape=(1, 3, 2, 1, 14),
        tags=("also_float32", "chunks/torch@float64", "eager@float64"),
    ),
    Case(
        "masked_rows",
        L=21,
        S=26,
        mask_shape=(2, 1, 21, 26),
        bias_shape=(2, 2, 21, 26),
        masked_rows=True,
        tags=("also_float32", "lse@float64", "lse/torch@float32"),
    ),
    Case("single", batch=(3,), L=1, S=1, H=1, K=1, D=4, E=5, q_chunk=1, k_chunk=1),
    Case("tiny_chunks", L=5, S=7, H=2, K=1, q_chunk=1, k_chunk=2),
    Case("default_chunks", L=70, S=61, H=2, K=2, q_chunk=None, k_chunk=None, tags=("also_float32",)),
    Case("chunk_gt_len", L=9, S=11, q_chunk=128, k_chunk=64, bias_shape=(9, 11)),
    Case("scale", L=13, S=17, scale=0.7, bias_shape=(2, 1, 1, 17)),
    # few query rows per key/value head (JAX runs them as block-diagonal GEMMs)
    Case("decoding", L=1, S=53, H=8, K=2, k_chunk=16, bias_shape=(2, 8, 1, 53), tags=("also_float32",)),
    Case(
        "decoding_causal",
        L=3,
        S=41,
        H=4,
        K=4,
        D=8,
        E=6,
        q_chunk=None,
        k_chunk=8,
        is_causal=True,
        causal_alignment="bottom_right",
    ),
]

# The same structures in the low-precision dtypes (inputs rounded first).
_LOW_PRECISION_CASES = [
    Case("basic", tags=("lse@bfloat16", "lse/torch@float16")),
    Case("gqa", L=33, S=33, H=4, K=2, q_chunk=16, k_chunk=16),
    Case("mask_bias", L=21, S=26, mask_shape=(21, 26), bias_shape=(1, 2, 1, 26)),
    Case(
        "masked_rows",
        L=21,
        S=26,
        mask_shape=(2, 1, 21, 26),
        masked_rows=True,
        tags=("lse@float16", "lse/torch@bfloat16", "eager@bfloat16"),
    ),
]


def tagged(cases, tag: str, backend: str | None = None) -> list[Case]:
    """The cases (in order) that ``tag`` applies to, for ``backend`` (see ``Case.tags``)."""
    return [c for c in cases if c.tagged(tag, backend)]


# every shape case in float64 (tight: catches algorithmic slips), the main ones
# ("also_float32") in float32 too
GRID = (
    _dtyped(_SHAPE_CASES, ("float64",))
    + _dtyped(tagged(_SHAPE_CASES, "also_float32"), ("float32",))
    + _dtyped(_LOW_PRECISION_CASES, LOW_PRECISION)
)

# Structured masks (they exclude keys), score_mod, soft cap and their combinations.
_S = dict(batch=(2,), L=29, S=37, H=4, K=2, D=8, E=8, q_chunk=8, k_chunk=16)
_T = dict(batch=(1,), H=2, q_chunk=512, k_chunk=512)
_STRUCTURED = [
    Case("causal_tl", **_S, is_causal=True),
    Case(
        "causal_br",
        **_S,
        is_causal=True,
        causal_alignment="bottom_right",
        tags=("also_float32", "chunks/torch@float64"),
    ),
    Case(
        "causal_br_l_gt_s",
        **{**_S, "L": 37, "S": 29},
        is_causal=True,
        causal_alignment="bottom_right",
        tags=("chunks@float64", "lse"),
    ),
    Case("causal_self", **{**_S, "L": 33, "S": 33}, is_causal=True),
    Case("window_int", **_S, local_window_size=5),
    Case("window_left", **_S, local_window_size=(7, 0)),
    Case(
        "window_br",
        **_S,
        local_window_size=(0, 3),
        causal_alignment="bottom_right",
        tags=("chunks/torch@float64",),
    ),
    Case("window_causal", **_S, local_window_size=(4, 4), is_causal=True, tags=("also_low_precision",)),
    Case("q_lengths", **_S, q_lengths="random", tags=("also_float32",)),
    Case("kv_lengths", **_S, kv_lengths=(0, 20), tags=("lse",)),
    Case("both_lengths", **_S, q_lengths=(29, 7), kv_lengths=(11, 37)),
    Case("segments_sorted", **_S, segments="sorted", tags=("chunks/torch@float64",)),
    Case("segments_random", **_S, segments="random"),
    Case("mask_mod_band", **_S, mask_mod="band"),
    Case("mask_mod_head_batch", **_S, mask_mod="head_batch"),
    Case(
        "mask_mod_empty_rows",
        **_S,
        mask_mod="empty_rows",
        tags=("also_float32", "chunks/torch@float64", "lse@float32", "lse/torch@float64"),
    ),
    Case("score_mod_alibi", **_S, score_mod="alibi"),
    Case("soft_cap", **_S, logits_soft_cap=0.8),
    Case(
        "soft_cap_bias_mask_causal",
        **_S,
        logits_soft_cap=1.5,
        is_causal=True,
        bias_shape=(2, 4, 29, 37),
        mask_shape=(2, 1, 29, 37),
    ),
    Case("no_batch_lengths", **{**_S, "batch": ()}, q_lengths=(20,), kv_lengths=(30,), is_causal=True),
    Case(
        "batch_2x3_all",
        batch=(2, 3),
        L=10,
        S=12,
        H=2,
        K=1,
        D=4,
        E=4,
        q_chunk=4,
        k_chunk=4,
        q_lengths="random",
        kv_lengths="random",
        segments="sorted",
        is_causal=True,
        causal_alignment="bottom_right",
        tags=("lse",),
    ),
    # Lengths past 512-chunks: partial pairs split into 256-tiles (``_chunks.tile_size``).
    Case(
        "tiles_causal_br",
        **_T,
        L=700,
        S=600,
        K=1,
        is_causal=True,
        causal_alignment="bottom_right",
        tags=("also_float32",),
    ),
    Case(
        "tiles_window_bias",
        **_T,
        L=700,
        S=600,
        K=2,
        local_window_size=(200, 0),
        bias_shape=(1, 2, 700, 600),
        logits_soft_cap=3.0,
    ),
    Case(
        "tiles_causal_lengths",
        **{**_T, "batch": (2,)},
        L=530,
        S=530,
        K=2,
        is_causal=True,
        kv_lengths="random",
        score_mod="alibi",
    ),
    Case(
        "everything",
        **_S,
        is_causal=True,
        causal_alignment="bottom_right",
        local_window_size=(12, 2),
        q_lengths="random",
        kv_lengths="random",
        segments="sorted",
        mask_mod="head_batch",
        score_mod="alibi",
        logits_soft_cap=2.0,
        bias_shape=(1, 4, 1, 37),
        mask_shape=(29, 37),
        tags=(
            "also_float32",
            "also_low_precision",
            "chunks@float64",
            "extreme_chunks@float64",
            "lse@float64,bfloat16",
            "lse/torch@float32,float16",
            "eager@float64",
        ),
    ),
]

STRUCTURED = (
    _dtyped(_STRUCTURED, ("float64",))
    + _dtyped(tagged(_STRUCTURED, "also_float32"), ("float32",))
    + _dtyped(tagged(_STRUCTURED, "also_low_precision"), LOW_PRECISION)
)

ALL_CASES = GRID + STRUCTURED


def ids(cases) -> list[str]:
    return [c.id for c in cases]


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def rng_for(case: Case, salt: str = "") -> np.random.Generator:
    return np.random.default_rng([BASE_SEED, zlib.crc32((case.id + salt).encode())])


def _lengths(spec, batch, full, rng):
    if spec is None:
        return None
    if spec == "random":
        lengths = rng.integers(0, full + 1, size=batch)
        flat = lengths.reshape(-1)
        if flat.size > 1:
            flat[0] = full  # one full row
            flat[-1] = max(1, full // 3)  # one short one
        return flat.reshape(batch).astype(np.int64)
    return np.asarray(spec, dtype=np.int64).reshape(batch)


def _segments(kind, batch, length, rng, boundaries=None):
    if kind == "random":
        return rng.integers(0, 3, size=(*batch, length)).astype(np.int64)
    # packed documents: sorted ids with the given boundaries
    ids_ = np.zeros((*batch, length), dtype=np.int64)
    for cut in boundaries:
        ids_[..., cut:] += 1
    return ids_


def make_inputs(case: Case) -> dict:
    """NumPy inputs of ``case``: float64 arrays exactly representable in ``case.dtype``.

    Keys: query, key, value, d_out (cotangent of the output), mask, bias (None when absent),
    and the structured keyword arguments (``kwargs``) with NumPy int64 / bool values."""
    rng = rng_for(case)
    batch = case.batch
    q = rng.standard_normal((*batch, case.L, case.H, case.D))
    k = rng.standard_normal((*batch, case.S, case.K, case.D))
    v = rng.standard_normal((*batch, case.S, case.K, case.E))
    d_out = rng.standard_normal((*batch, case.L, case.H, case.E))
    mask = bias = None
    if case.mask_shape is not None:
        mask = rng.random(case.mask_shape) < 0.7
        if case.masked_rows:
            assert case.mask_shape[-2] == case.L
            mask[..., 0, :] = False
            mask[..., case.L // 2, :] = False
            mask[..., -1, :] = False
    if case.bias_shape is not None:
        bias = round_to(0.5 * rng.standard_normal(case.bias_shape), case.dtype)
    kwargs = {}
    if case.scale is not None:
        kwargs["scale"] = case.scale
    if case.is_causal:
        kwargs["is_causal"] = True
    if case.causal_alignment != "top_left":
        kwargs["causal_alignment"] = case.causal_alignment
    if case.local_window_size is not None:
        kwargs["local_window_size"] = case.local_window_size
    if case.q_lengths is not None:
        kwargs["query_seq_lengths"] = _lengths(case.q_lengths, batch, case.L, rng)
    if case.kv_lengths is not None:
        kwargs["key_value_seq_lengths"] = _lengths(case.kv_lengths, batch, case.S, rng)
    if case.segments is not None:
        kwargs["query_segment_ids"] = _segments(case.segments, batch, case.L, rng, boundaries=(5, 17, 18))
        kwargs["key_segment_ids"] = _segments(case.segments, batch, case.S, rng, boundaries=(9, 20, 30))
    if case.score_mod is not None:
        kwargs["score_mod"] = SCORE_MODS[case.score_mod]
    if case.mask_mod is not None:
        kwargs["mask_mod"] = MASK_MODS[case.mask_mod]
    if case.logits_soft_cap is not None:
        kwargs["logits_soft_cap"] = case.logits_soft_cap
    return {
        "query": round_to(q, case.dtype),
        "key": round_to(k, case.dtype),
        "value": round_to(v, case.dtype),
        "d_out": round_to(d_out, case.dtype),
        "mask": mask,
        "bias": bias,
        "kwargs": kwargs,
    }


def chunk_kwargs(case: Case) -> dict:
    return {"query_chunk_size": case.q_chunk, "key_chunk_size": case.k_chunk}


_REFERENCE_CACHE: dict = {}


def reference_for(case: Case):
    """``(inputs, out, lse, grads)`` of the float64 reference for ``case`` (cached per process)."""
    from .reference import mask_value_for, reference_attention, reference_grads

    if case not in _REFERENCE_CACHE:
        x = make_inputs(case)
        fill = mask_value_for(case.dtype)
        out, lse = reference_attention(
            x["query"],
            x["key"],
            x["value"],
            mask=x["mask"],
            bias=x["bias"],
            return_lse=True,
            mask_value=fill,
            **x["kwargs"],
        )
        out_t, grads = reference_grads(
            x["query"],
            x["key"],
            x["value"],
            x["d_out"],
            mask=x["mask"],
            bias=x["bias"],
            mask_value=fill,
            **x["kwargs"],
        )
        np.testing.assert_allclose(out_t, out, rtol=1e-12, atol=1e-12)
        _REFERENCE_CACHE[case] = (x, out, lse, grads)
    return _REFERENCE_CACHE[case]


def empty_rows(case: Case, x: dict) -> np.ndarray:
    """Boolean ``[B..., L, H]``: rows with no key left after the structured masks."""
    from .reference import structured_keep

    kw = {k: v for k, v in x["kwargs"].items() if k not in ("scale", "score_mod", "logits_soft_cap")}
    keep = structured_keep(case.batch, case.H, case.L, case.S, **kw)
    z = math.prod(case.batch)
    return (~keep.any(-1)).reshape(z, case.H, case.L).transpose(0, 2, 1).reshape(*case.batch, case.L, case.H)
