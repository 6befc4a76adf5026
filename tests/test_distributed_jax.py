"""JAX ring attention on 8 simulated CPU devices, in a subprocess (this process has already
initialised JAX with one device): outputs and gradients against dense single-device attention in
float64, causal and not, both layouts, local lengths not a multiple of the chunk size; and
``ring_attention`` inside the caller's own ``jax.shard_map`` for every layout x causal x
``check_vma`` combination (issue 10, #19: causal contiguous under ``check_vma=True`` raised)."""

from __future__ import annotations

import textwrap

import pytest

jax = pytest.importorskip("jax")

from memory_efficient_attention import AttentionInputError  # noqa: E402

from .python_process import jax_results  # noqa: E402

TOL = 1e-10  # float64

# (name, is_causal, layout): local length 12 with chunks of 8 on 8 devices (global 96).
CASES = [
    ("full-zigzag", False, "zigzag"),
    ("causal-contiguous", True, "contiguous"),
    ("causal-zigzag", True, "zigzag"),
]
# ring_attention in the caller's jax.shard_map: (name, is_causal, layout, check_vma, dtype); the
# float32 case is checked against the float64 reference of its rounded inputs.
SHARD_MAP_CASES = [
    (f"shard_map-{'causal' if causal else 'full'}-{layout}-vma={vma}", causal, layout, vma, "float64")
    for layout in ("contiguous", "zigzag")
    for causal in (False, True)
    for vma in (False, True)
] + [("shard_map-causal-contiguous-vma=True-float32", True, "contiguous", True, "float32")]
SHARD_MAP_CASES = [(*c, "ring") for c in SHARD_MAP_CASES] + [
    ("shard_map-causal-zigzag-vma=True-allgather", True, "zigzag", True, "float64", "allgather"),
    ("shard_map-full-contiguous-vma=True-allgather", False, "contiguous", True, "float64", "allgather"),
]
TOL_FLOAT32 = 1e-4

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import memory_efficient_attention.distributed as mead
    lazy = not any(m in sys.modules for m in ("jax", "torch"))  # importing it loads no framework

    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from memory_efficient_attention.distributed.jax import (
        from_zigzag, ring_attention, ring_attention_sharded, to_zigzag)

    W, N = 8, 96
    mesh = jax.make_mesh((W,), ("seq",))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, N, 4, 4)))  # GQA: 4 query heads on 2 key/value heads
    k = jnp.asarray(rng.standard_normal((1, N, 2, 4)))
    v = jnp.asarray(rng.standard_normal((1, N, 2, 3)))
    d_out = jnp.asarray(rng.standard_normal((1, N, 4, 3)))

    def dense(q, k, v, causal):
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        if causal:
            s = jnp.where(jnp.tril(jnp.ones((N, N), bool)), s, -jnp.inf)
        return jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(s, axis=-1), v)

    def out_and_grads(f):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(d_out))

    results = {"lazy import": [0.0 if lazy else 1.0]}
    for name, causal, layout in CASES:
        ring = lambda q, k, v: ring_attention_sharded(
            q, k, v, mesh, "seq", is_causal=causal, layout=layout,
            query_chunk_size=8, key_chunk_size=8)
        got = jax.jit(lambda: out_and_grads(ring))()
        want = out_and_grads(lambda q, k, v: dense(q, k, v, causal))
        results[name] = [float(jnp.abs(a - b).max()) for a, b in zip(got, want)]

    # ring_attention inside the caller's own shard_map, with and without check_vma: the
    # arrays go in (and come out) in the layout's order; compare in natural order.
    spec = P(None, "seq")
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    for name, causal, layout, vma, dtype, variant in SHARD_MAP_CASES:
        local = lambda q, k, v: ring_attention(
            q, k, v, axis_name="seq", is_causal=causal, layout=layout, variant=variant,
            query_chunk_size=8, key_chunk_size=8)
        sm = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=vma)
        to = (lambda x: to_zigzag(x, W)) if layout == "zigzag" else (lambda x: x)
        back = (lambda x: from_zigzag(x, W)) if layout == "zigzag" else (lambda x: x)
        try:
            @jax.jit
            def run(q, k, v, d_out):
                out, vjp = jax.vjp(sm, q, k, v)
                return (out, *vjp(d_out))
            args = [x.astype(dtype) for x in (q, k, v, d_out)]
            got = [back(x) for x in run(*(put(to(x)) for x in args))]
        except Exception as err:  # reported per case, not as one failed fixture
            results[name] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        assert all(x.dtype == dtype for x in got), (name, [x.dtype for x in got])
        q64, k64, v64, d64 = (x.astype("float64") for x in args)
        out, vjp = jax.vjp(lambda q, k, v: dense(q, k, v, causal), q64, k64, v64)
        want = (out, *vjp(d64))
        results[name] = [float(jnp.abs(a - b).max()) for a, b in zip(got, want)]
    print("RESULTS", json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def ring_results():
    return jax_results(f"CASES = {CASES!r}\nSHARD_MAP_CASES = {SHARD_MAP_CASES!r}\n" + SCRIPT)


@pytest.mark.parametrize("name", [c[0] for c in CASES + SHARD_MAP_CASES] + ["lazy import"])
def test_ring_on_eight_devices(ring_results, name):
    errors = ring_results[name]
    assert not isinstance(errors, str), f"{name}: {errors}"
    tol = TOL_FLOAT32 if name.endswith("float32") else TOL
    assert max(errors) < tol, f"{name}: max errors (out, dq, dk, dv) {errors}"


def test_layout_validation():
    from memory_efficient_attention.distributed._plan import check_layout

    with pytest.raises(AttentionInputError, match="layout must be one of"):
        check_layout("ring", q_len=4, kv_len=4, world=2)
    with pytest.raises(AttentionInputError, match="even"):
        check_layout("zigzag", q_len=5, kv_len=5, world=2)


def test_schedule_skips_what_the_mask_leaves_empty():
    from memory_efficient_attention.distributed._plan import RingMask, RingSchedule

    causal = RingSchedule.build(RingMask(12, 12, causal=True), "contiguous", 2, 6, 6)
    assert causal.blocks(0, 1) == ()  # contiguous: device 0 never needs device 1's keys
    assert causal.blocks(1, 0)[0].structure.causal is False  # a full block, no mask work
    zigzag = RingSchedule.build(RingMask(12, 12, causal=True), "zigzag", 2, 6, 6)
    # Device 0 holds chunks 0 and 3, device 1 chunks 1 and 2: chunk 3 sees both, in one call.
    (blk,) = zigzag.blocks(0, 1)
    assert (blk.q0, blk.q1, blk.k0, blk.k1) == (3, 6, 0, 6)
    (blk,) = zigzag.blocks(1, 0)  # chunks 1 and 2 see chunk 0 (chunk 3 comes after them)
    assert (blk.q0, blk.q1, blk.k0, blk.k1) == (0, 6, 0, 3)
    # A window of 5 keys over shards of 12 on 8 devices: two ring steps, not eight.
    window = RingSchedule.build(RingMask(96, 96, window=(5, 0)), "contiguous", 8, 12, 12)
    assert window.steps == 2
    assert RingSchedule.build(RingMask(96, 96, window=(13, 0)), "contiguous", 8, 12, 12).steps == 3
    # Work that is the same for every pair of devices is one branch (plus "nothing").
    assert len(RingSchedule.build(RingMask(96, 96), "zigzag", 8, 12, 12).branches) == 2


def test_ring_argument_checks():
    import numpy as np

    from memory_efficient_attention._spec import seed_dims
    from memory_efficient_attention.distributed._plan import ring_plan

    dims = seed_dims((2, 6, 4, 8), (2, 6, 2, 8), (2, 6, 2, 8))
    with pytest.raises(AttentionInputError, match="variant must be one of"):
        ring_plan(dims, "float32", world=2, layout="contiguous", variant="tree")
    with pytest.raises(
        AttentionInputError, match=r"query_segment_ids has shape \(2, 12\), but needs \(2, 6\)"
    ):
        ring_plan(dims, "float32", world=2, layout="contiguous", variant="ring",
                  query_segment_ids=np.zeros((2, 12)), key_segment_ids=np.zeros((2, 6)))  # fmt: skip
    with pytest.raises(AttentionInputError, match="local_window_size"):
        ring_plan(dims, "float32", world=2, layout="contiguous", variant="ring",
                  local_window_size="wide")  # fmt: skip


def test_outside_shard_map_is_an_input_error():
    import jax.numpy as jnp

    from memory_efficient_attention.distributed.jax import ring_attention

    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(AttentionInputError, match=r"inside jax\.shard_map"):
        ring_attention(q, q, q, axis_name="nope")


def test_zigzag_helpers_round_trip():
    import jax.numpy as jnp

    from memory_efficient_attention.distributed.jax import from_zigzag, to_zigzag

    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3, 1)
    z = to_zigzag(x, 3)
    assert (z[:, 4:8] == x[:, 20:24]).all()  # device 0: chunks 0 and 5
    assert (from_zigzag(z, 3) == x).all()
