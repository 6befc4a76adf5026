"""JAX Ulysses attention (all-to-all over heads) on 8 simulated CPU devices, in a subprocess:
outputs and gradients equal single-device attention (float64) for causal, windows, packed
documents crossing shard boundaries, lengths, soft cap, and GQA with fewer key/value heads than
devices; plus the argument checks."""

from __future__ import annotations

import textwrap

import pytest

jax = pytest.importorskip("jax")

from .python_process import jax_results  # noqa: E402

CASES = {
    "causal": dict(is_causal=True),
    "window-bottom-right": dict(local_window_size=(5, 2), is_causal=True, causal_alignment="bottom_right"),
    "segments": dict(segments=True, is_causal=True),
    "lengths-softcap": dict(query_seq_lengths=[64, 40], key_value_seq_lengths=[64, 23], logits_soft_cap=3.0),
    "gqa-2-kv-heads": dict(kv_heads=2, is_causal=True),
    "gqa-8-kv-heads-lse": dict(kv_heads=8, return_lse=True),
}

SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from memory_efficient_attention.distributed.jax import ulysses_attention
    from memory_efficient_attention.jax import efficient_dot_product_attention

    W, N, H = 8, 64, 8
    mesh = jax.make_mesh((W,), ("seq",))
    spec = P(None, "seq")
    results = {}
    for name, case in CASES.items():
        case = dict(case)
        kv = case.pop("kv_heads", 4)
        rng = np.random.default_rng(len(name))
        q = jnp.asarray(rng.standard_normal((2, N, H, 4)))
        k = jnp.asarray(rng.standard_normal((2, N, kv, 4)))
        v = jnp.asarray(rng.standard_normal((2, N, kv, 3)))
        kwargs = {n: (jnp.asarray(x) if isinstance(x, list) else x) for n, x in case.items()}
        ids = None
        if kwargs.pop("segments", False):
            ids = jnp.asarray(np.repeat(np.arange(4), [5, 30, 20, 9])[None].repeat(2, 0))
        lse = kwargs.get("return_lse", False)

        def local(q, k, v, *ids):
            seg = dict(query_segment_ids=ids[0], key_segment_ids=ids[0]) if ids else {}
            chunks = dict(query_chunk_size=16, key_chunk_size=16)
            return ulysses_attention(q, k, v, axis_name="seq", **chunks, **seg, **kwargs)

        outs = (spec, P(None, "seq")) if lse else spec
        extra = () if ids is None else (ids,)
        in_specs = (spec,) * (3 + len(extra))
        sm = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=outs)
        put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
        extra = tuple(put(x) for x in extra)

        def full(q, k, v):
            seg = {} if ids is None else dict(query_segment_ids=ids, key_segment_ids=ids)
            return efficient_dot_product_attention(q, k, v, **seg, **kwargs)

        def loss(f):
            def run(q, k, v):
                r = f(q, k, v)
                if not lse:
                    return jnp.sum(r**2)
                return jnp.sum(r[0] ** 2) + jnp.sum(jnp.where(jnp.isfinite(r[1]), r[1], 0.0))
            return run

        try:
            sharded = tuple(put(x) for x in (q, k, v))
            ours = lambda q, k, v: sm(q, k, v, *extra)
            got_out = jax.jit(ours)(*sharded)
            got_grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(*sharded)
        except Exception as err:
            results[name] = f"{type(err).__name__}: {str(err)[:400]}"
            continue
        want_out = full(q, k, v)
        want_grads = jax.grad(loss(full), argnums=(0, 1, 2))(q, k, v)
        pairs = list(zip(jax.tree.leaves(got_out), jax.tree.leaves(want_out)))
        pairs += list(zip(got_grads, want_grads))
        errs = []
        for a, b in pairs:
            a, b = np.asarray(a), np.asarray(b)
            fin = np.isfinite(b)
            assert np.array_equal(np.isfinite(a), fin)
            errs.append(float(np.abs(a[fin] - b[fin]).max()) if fin.any() else 0.0)
        results[name] = errs
    # bfloat16: the ring merges unrounded partial results, so its error is the single device's
    from memory_efficient_attention.distributed.jax import ring_attention_sharded
    rng = np.random.default_rng(5)
    qb, kb, vb = (jnp.asarray(rng.standard_normal((1, 256, 4, 16)), jnp.bfloat16) for _ in range(3))
    exact = efficient_dot_product_attention(*(x.astype(jnp.float64) for x in (qb, kb, vb)), is_causal=True)
    one = efficient_dot_product_attention(qb, kb, vb, is_causal=True)
    ring = ring_attention_sharded(qb, kb, vb, mesh, "seq", is_causal=True, layout="zigzag")
    err = lambda x: float(jnp.abs(x.astype(jnp.float64) - exact).mean())
    results["bf16 ring / one device mean error"] = err(ring) / err(one)
    print("RESULTS", json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def ulysses_results():
    return jax_results(f"CASES = {CASES!r}\n" + SCRIPT)


@pytest.mark.parametrize("name", list(CASES))
def test_ulysses_on_eight_devices_equals_one_device(ulysses_results, name):
    errors = ulysses_results[name]
    assert not isinstance(errors, str), f"{name}: {errors}"
    assert max(errors) < 1e-10, f"{name}: max errors (outputs, dq, dk, dv) {errors}"


def test_ulysses_argument_checks():
    import jax.numpy as jnp

    from memory_efficient_attention import AttentionInputError
    from memory_efficient_attention.distributed.jax import ulysses_attention

    x = jnp.ones((1, 8, 2, 4))
    with pytest.raises(AttentionInputError, match="not a mesh axis"):
        ulysses_attention(x, x, x, axis_name="seq")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['mask'\\]"):
        ulysses_attention(x, x, x, axis_name="seq", mask=None)


def test_bf16_ring_error_does_not_grow_with_devices(ulysses_results):
    ratio = ulysses_results["bf16 ring / one device mean error"]
    assert ratio < 1.02, f"bfloat16 ring on 8 devices: mean error {ratio:.3f}x one device's"
