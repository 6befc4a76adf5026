"""JAX ring attention with every structured mask, both variants and layouts, on 8 simulated CPU
devices (a subprocess): outputs and gradients against a float64 dense reference built from
global positions (``ring_cases``), plus the schedule's step count for windows."""

from __future__ import annotations

import textwrap

import pytest

pytest.importorskip("jax")

from .python_process import ROOT, jax_results
from .ring_cases import CASES

TOL = 1e-10  # float64
LOCAL = 12  # local key/value length on each of 8 devices (chunks of 8: not a multiple)

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, ROOT)
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from memory_efficient_attention.distributed.jax import ring_attention_sharded
    from tests.ring_cases import CASES, dense, inputs, keep_mask

    W = 8
    mesh = jax.make_mesh((W,), ("seq",))
    results = {}
    for name, variant, layout, options, q_factor, lengths, segments in CASES:
        arrays, ints = inputs(W, LOCAL, q_factor, lengths, segments)
        q, k, v, d_out = (jnp.asarray(arrays[x]) for x in ("q", "k", "v", "d_out"))
        keep = keep_mask(options, q.shape[1], k.shape[1], ints)
        given = {n: jnp.asarray(x) for n, x in ints.items()}

        def ring(q, k, v):
            return ring_attention_sharded(
                q, k, v, mesh, "seq", layout=layout, variant=variant, query_chunk_size=8,
                key_chunk_size=8, **options, **given)

        def ref(q, k, v):
            return dense(jnp, q, k, v, jnp.asarray(keep), options.get("logits_soft_cap"))

        try:
            got = jax.jit(lambda q, k, v: (lambda o, f: (o, *f(d_out)))(*jax.vjp(ring, q, k, v)))(q, k, v)
        except Exception as err:  # reported per case
            results[name] = f"{type(err).__name__}: {str(err)[:600]}"
            continue
        out, vjp = jax.vjp(ref, q, k, v)
        want = (out, *vjp(d_out))
        results[name] = [float(jnp.abs(a - b).max()) for a, b in zip(got, want)]
    print("RESULTS", json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def mask_results():
    return jax_results(f"ROOT = {str(ROOT)!r}\nLOCAL = {LOCAL}\n" + SCRIPT)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ring_masks_on_eight_devices(mask_results, name):
    errors = mask_results[name]
    assert not isinstance(errors, str), f"{name}: {errors}"
    assert max(errors) < TOL, f"{name}: max errors (out, dq, dk, dv) {errors}"
