"""Ring attention weak scaling: the global sequence grows with the number of devices (a fixed
local length per device); per-device peak memory should stay flat.

* JAX: ``W`` simulated CPU devices in one process (``jax_num_cpu_devices``); the per-device
  memory is XLA's own account of the compiled per-device program (``memory_analysis``: arguments,
  outputs and temporaries of forward + backward).
* PyTorch: ``W`` gloo ranks spawned on this machine; the per-rank memory is the growth of the
  process's resident set over one forward + backward: the peak (``VmHWM``, reset just before)
  minus the resident set just before (inputs already allocated).

Simulated devices and ranks share this machine's cores, so times grow with ``W``: they are not a
speed measurement of a real ring. Usage::

    python benchmarks/distributed/run.py --framework both --local-len 1024 --worlds 1 2 4 \\
        --out benchmarks/distributed/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

HEADS, KV_HEADS, DEPTH = 4, 4, 64


def _dense_bytes(n: int) -> int:
    """What one device would hold for the float32 score matrix of dense attention."""
    return 4 * HEADS * n * n


# ------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------

_JAX_SCRIPT = """
import json, sys, time
import jax
W, L, VARIANT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_num_cpu_devices", W)
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from memory_efficient_attention.distributed.jax import ring_attention
H, K, D = {heads}, {kv_heads}, {depth}
mesh = jax.make_mesh((W,), ("seq",))
spec = P(None, "seq")  # inputs already in the zigzag layout, sharded: no global array anywhere
shard = NamedSharding(mesh, spec)
make = jax.jit(lambda key, heads: jax.random.normal(key, (1, W * L, heads, D), jnp.float32),
               static_argnums=1, out_shardings=shard)
q, k, v = (make(jax.random.key(i), h) for i, h in enumerate((H, K, K)))
local = jax.shard_map(
    lambda q, k, v: ring_attention(q, k, v, axis_name="seq", is_causal=True, layout="zigzag",
                                   variant=VARIANT),
    mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)

def loss(q, k, v):
    return local(q, k, v).sum()

step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
t0 = time.perf_counter()
compiled = step.lower(q, k, v).compile()
compile_s = time.perf_counter() - t0
mem = compiled.memory_analysis()
jax.block_until_ready(compiled(q, k, v))
t0 = time.perf_counter()
jax.block_until_ready(compiled(q, k, v))
run_s = time.perf_counter() - t0
print("RESULT", json.dumps(dict(
    framework="jax", variant=VARIANT, world=W, local_len=L, global_len=W * L,
    per_device_bytes=mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes,
    temp_bytes=mem.temp_size_in_bytes, compile_s=compile_s, step_s=run_s)))
"""


def run_jax(world: int, local_len: int, variant: str) -> dict:
    script = _JAX_SCRIPT.format(heads=HEADS, kv_heads=KV_HEADS, depth=DEPTH)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(world), str(local_len), variant],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"jax run W={world} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ------------------------------------------------------------------------------------------------
# PyTorch
# ------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        return _status_bytes("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _torch_worker(rank: int, world: int, local_len: int, variant: str, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from memory_efficient_attention.distributed.torch import ring_attention

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, local_len, HEADS, DEPTH, generator=gen, requires_grad=True)
    k = torch.randn(1, local_len, KV_HEADS, DEPTH, generator=gen, requires_grad=True)
    v = torch.randn(1, local_len, KV_HEADS, DEPTH, generator=gen, requires_grad=True)

    def step(q, k, v):
        out = ring_attention(q, k, v, is_causal=True, layout="zigzag", variant=variant)
        out.sum().backward()

    # warm-up on a tiny shard: loads the lazily initialised code paths without caching big buffers
    step(*(x[:, :8].detach().requires_grad_(True) for x in (q, k, v)))
    dist.barrier()
    _reset_peak_rss()
    before = _status_bytes("VmRSS")  # inputs allocated, nothing of the attention yet
    t0 = time.perf_counter()
    step(q, k, v)
    dist.barrier()
    elapsed = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    queue.put(dict(rank=rank, rss_growth=peak - before, peak_rss=peak, s=elapsed))
    dist.destroy_process_group()


def run_torch(world: int, local_len: int, variant: str) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _torch_worker, args=(world, local_len, variant, port, queue), nprocs=world, start_method="spawn"
    )
    ranks = [queue.get() for _ in range(world)]
    return dict(
        framework="torch",
        variant=variant,
        world=world,
        local_len=local_len,
        global_len=world * local_len,
        per_device_bytes=max(r["rss_growth"] for r in ranks),
        peak_rss_bytes=max(r["peak_rss"] for r in ranks),
        step_s=max(r["s"] for r in ranks),
    )


# ------------------------------------------------------------------------------------------------


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
    parser.add_argument("--local-len", type=int, default=1024, help="sequence length per device")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--variants", nargs="+", default=["ring"], choices=("ring", "allgather"))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    frameworks = ("jax", "torch") if args.framework == "both" else (args.framework,)
    results = []
    print(
        "| framework | variant | devices | global n | per-device memory (MiB) | dense scores at n (MiB) "
        "| s/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for fw in frameworks:
        for variant in args.variants:
            for world in args.worlds:
                r = (run_jax if fw == "jax" else run_torch)(world, args.local_len, variant)
                r["dense_scores_bytes"] = _dense_bytes(r["global_len"])
                results.append(r)
                print(
                    f"| {fw} | {variant} | {world} | {r['global_len']} | {_mib(r['per_device_bytes'])} | "
                    f"{_mib(r['dense_scores_bytes'])} | {r['step_s']:.2f} |",
                    flush=True,
                )
    if args.out:
        config = dict(heads=HEADS, kv_heads=KV_HEADS, depth=DEPTH, causal=True, layout="zigzag")
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), config=config, results=results), f, indent=2)


if __name__ == "__main__":
    main()
