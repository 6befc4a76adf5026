"""The JAX Ulysses x ring hybrid on a 4 (ring) x 2 (Ulysses) mesh of simulated CPU devices, in a
subprocess: outputs and gradients against the float64 dense reference of ``ring_cases`` for
causal (both layouts), windows with packed documents, lengths with the all-gather ring, and GQA
with one key/value head (repeated for the all-to-all)."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("jax")

from .python_process import ROOT, jax_results

# (name, layout, variant, options, lengths, segments, key/value heads, query length factor)
CASES = [
    ("hybrid-causal-zigzag", "zigzag", "ring", {"is_causal": True}, False, False, 2, 1),
    ("hybrid-window-segments", "contiguous", "ring", {"local_window_size": (9, 2)}, False, True, 2, 1),
    ("hybrid-lengths-allgather", "contiguous", "allgather", {"is_causal": True}, True, False, 2, 1),
    ("hybrid-gqa-one-kv-head", "zigzag", "ring", {"is_causal": True}, False, False, 1, 1),
    ("hybrid-bottom-right-window", "contiguous", "ring",
     {"is_causal": True, "causal_alignment": "bottom_right", "local_window_size": (11, 0)},
     False, False, 2, 0.5),
]  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, ROOT)
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from memory_efficient_attention.distributed.jax import from_zigzag, to_zigzag, ulysses_attention
    from tests.ring_cases import dense, inputs, keep_mask

    R, U = 4, 2
    mesh = jax.make_mesh((R, U), ("ring", "uly"))
    spec = P(None, ("ring", "uly"))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
    results = {}
    for name, layout, variant, options, lengths, segments, kv_heads, q_factor in CASES:
        arrays, ints = inputs(R * U, 12, q_factor, lengths, segments)
        q, k, v, d_out = (jnp.asarray(arrays[x]) for x in ("q", "k", "v", "d_out"))
        k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
        keep = jnp.asarray(keep_mask(options, q.shape[1], k.shape[1], ints))
        to = (lambda x, axis=-3: to_zigzag(x, R, axis=axis)) if layout == "zigzag" else (lambda x, axis=-3: x)
        back = (lambda x: from_zigzag(x, R)) if layout == "zigzag" else (lambda x: x)
        names = [n for n in ("query_segment_ids", "key_segment_ids") if n in ints]
        ids = [put(to(jnp.asarray(ints[n]), axis=-1)) for n in names]
        glob = {n: jnp.asarray(x) for n, x in ints.items() if "lengths" in n}

        def local(q, k, v, *ids):
            seg = dict(query_segment_ids=ids[0], key_segment_ids=ids[1]) if ids else {}
            return ulysses_attention(
                q, k, v, axis_name="uly", ring_axis_name="ring", layout=layout, variant=variant,
                query_chunk_size=8, key_chunk_size=8, **seg, **glob, **options)

        sm = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * (3 + len(ids)), out_specs=spec)

        @jax.jit
        def run(q, k, v, d_out):
            out, vjp = jax.vjp(lambda q, k, v: sm(q, k, v, *ids), q, k, v)
            return (out, *vjp(d_out))

        try:
            got = [back(x) for x in run(*(put(to(x)) for x in (q, k, v, d_out)))]
        except Exception as err:
            results[name] = f"{type(err).__name__}: {str(err)[:600]}"
            continue
        out, vjp = jax.vjp(lambda q, k, v: dense(jnp, q, k, v, keep), q, k, v)
        want = (out, *vjp(d_out))
        results[name] = [float(jnp.abs(a - b).max()) for a, b in zip(got, want)]
    print("RESULTS", json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def hybrid_results():
    return jax_results(f"ROOT = {str(ROOT)!r}\nCASES = {CASES!r}\n" + SCRIPT)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ulysses_ring_hybrid_on_four_by_two_devices(hybrid_results, name):
    errors = hybrid_results[name]
    assert not isinstance(errors, str), f"{name}: {errors}"
    assert max(errors) < 1e-10, f"{name}: max errors (out, dq, dk, dv) {errors}"


def test_ring_layout_needs_a_ring():
    import jax.numpy as jnp

    from memory_efficient_attention import AttentionInputError
    from memory_efficient_attention.distributed.jax import ulysses_attention

    x = jnp.ones((1, 8, 2, 4))
    with pytest.raises(AttentionInputError, match="hybrid"):
        ulysses_attention(x, x, x, axis_name="seq", layout="zigzag")
    with pytest.raises(TypeError, match="with a ring.*\\['return_lse'\\]"):
        ulysses_attention(x, x, x, axis_name="seq", ring_axis_name="ring", return_lse=True)
