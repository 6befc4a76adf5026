"""bfloat16 error of sequence-parallel attention against the number of devices (JAX, simulated CPU
devices): the ring (partial results merged in float32 whatever the input dtype) and Ulysses, each
against the float64 attention of the same bfloat16-rounded inputs. The error must not grow with
the number of devices.

Usage: ``python benchmarks/distributed/bf16_error.py`` (sets 8 CPU devices itself); writes
``results_bf16_error.json`` beside this file.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial


def main() -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from memory_efficient_attention.distributed.jax import ring_attention_sharded, ulysses_attention
    from memory_efficient_attention.jax import efficient_dot_product_attention

    n, heads, depth = 2048, 8, 64
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, n, heads, depth)), jnp.bfloat16) for _ in range(3))
    exact = efficient_dot_product_attention(*(x.astype(jnp.float64) for x in (q, k, v)), is_causal=True)
    single = efficient_dot_product_attention(q, k, v, is_causal=True).astype(jnp.float64)
    results = {"one device": _errors(single, exact)}
    for world in (2, 4, 8):
        mesh = jax.make_mesh((world,), ("seq",), devices=jax.devices()[:world])
        spec = P(None, "seq")
        ring = ring_attention_sharded(q, k, v, mesh, "seq", is_causal=True, layout="zigzag")
        results[f"ring, {world} devices"] = _errors(ring.astype(jnp.float64), exact)
        put = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)]
        local = partial(ulysses_attention, axis_name="seq", is_causal=True)
        uly = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))(*put)
        results[f"ulysses, {world} devices"] = _errors(uly.astype(jnp.float64), exact)
    for name, err in results.items():
        print(f"{name:22s} max |err| {err['max']:.3e}  mean |err| {err['mean']:.3e}")
    record = {
        "command": "python " + " ".join(sys.argv),
        "shape": f"causal, 1 x {n} tokens, {heads} heads, depth {depth}, bfloat16 inputs",
        "reference": "float64 attention of the same bfloat16-rounded inputs",
        "results": results,
    }
    with open(os.path.join(os.path.dirname(__file__), "results_bf16_error.json"), "w") as f:
        json.dump(record, f, indent=2)


def _errors(got, want) -> dict:
    import numpy as np

    err = np.abs(np.asarray(got) - np.asarray(want))
    return {"max": float(err.max()), "mean": float(err.mean())}


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
