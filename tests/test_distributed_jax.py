"""JAX ring attention on 8 simulated CPU devices, in a subprocess (this process has already
initialised JAX with one device): outputs and gradients against dense single-device attention in
float64, causal and not, both layouts, local lengths not a multiple of the chunk size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

jax = pytest.importorskip("jax")

from memory_efficient_attention import AttentionInputError  # noqa: E402

TOL = 1e-10  # float64

# (name, is_causal, layout): local length 12 with chunks of 8 on 8 devices (global 96).
CASES = [
    ("full-zigzag", False, "zigzag"),
    ("causal-contiguous", True, "contiguous"),
    ("causal-zigzag", True, "zigzag"),
]

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
    from memory_efficient_attention.distributed.jax import ring_attention, ring_attention_sharded

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

    # ring_attention inside the caller's own shard_map; and the check_vma requirement.
    spec = P(None, "seq")
    local = lambda q, k, v: ring_attention(q, k, v, axis_name="seq", query_chunk_size=8)
    sm = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    out = jax.jit(sm)(put(q), put(k), put(v))
    results["shard_map"] = [float(jnp.abs(out - dense(q, k, v, False)).max())]
    checked = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)  # check_vma on
    out = jax.jit(checked)(put(q), put(k), put(v))
    results["check_vma"] = [float(jnp.abs(out - dense(q, k, v, False)).max())]
    print("RESULTS", json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def ring_results():
    script = f"CASES = {CASES!r}\n" + SCRIPT
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULTS "))


@pytest.mark.parametrize("name", [c[0] for c in CASES] + ["shard_map", "check_vma", "lazy import"])
def test_ring_on_eight_devices(ring_results, name):
    errors = ring_results[name]
    assert not isinstance(errors, str), f"{name}: {errors}"
    assert max(errors) < TOL, f"{name}: max errors (out, dq, dk, dv) {errors}"


def test_layout_validation():
    from memory_efficient_attention.distributed._plan import check_layout, step_block

    with pytest.raises(AttentionInputError, match="layout must be one of"):
        check_layout("ring", is_causal=False, q_len=4, kv_len=4, world=2)
    with pytest.raises(AttentionInputError, match="even"):
        check_layout("zigzag", is_causal=True, q_len=5, kv_len=5, world=2)
    with pytest.raises(AttentionInputError, match="sharded alike"):
        check_layout("contiguous", is_causal=True, q_len=4, kv_len=6, world=2)
    assert step_block("contiguous", "after", 6, 6, is_causal=True) is None
    assert step_block("zigzag", "after", 6, 6, is_causal=True).q0 == 3


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
