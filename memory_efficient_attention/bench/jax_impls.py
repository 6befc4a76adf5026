"""JAX implementations under test, built into ``Runner`` objects (imported by the worker only).

Every case is ``jax.jit``-compiled ahead of time (``lower().compile()``) before it is timed or its
memory measured; the compile time and XLA's planned temporary buffer size are kept in
``Runner.info``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .cases import Shape
from .measure import Runner

__all__ = ["build_jax"]


def _function(name: str, shape: Shape, seed):
    if name == "ours-jax":
        from memory_efficient_attention.jax import efficient_dot_product_attention

        engine = "chunked" if shape.engine == "chunked" else "auto"
        return partial(efficient_dot_product_attention, is_causal=shape.causal, engine=engine)
    if name == "xla":
        return partial(jax.nn.dot_product_attention, is_causal=shape.causal, implementation="xla")
    if name == "seed-jax":
        if seed is None:
            raise RuntimeError("the seed package was not loaded")
        return seed.efficient_dot_product_attention  # its default chunk sizes, no mask
    raise ValueError(f"not a JAX implementation: {name}")


def jax_device(device: str):
    """The first JAX device of the platform matching ``device`` (``cpu`` or ``cuda``)."""
    return jax.devices("gpu" if device == "cuda" else "cpu")[0]


def build_jax(
    name: str, shape: Shape, mode: str, device: str, data: dict[str, np.ndarray], seed=None
) -> Runner:
    """A ``Runner`` for implementation ``name`` on ``data`` (``q, k, v, cot``) in ``mode``."""
    dev = jax_device(device)
    dtype = jnp.dtype(shape.dtype)
    keys = ("q", "k", "v", "cot") if mode == "backward" else ("q", "k", "v")
    args = [jax.device_put(np.asarray(data[key]).astype(dtype), dev) for key in keys]
    fn = _function(name, shape, seed)

    if mode == "backward":

        def grads(q, k, v, cot):
            _, vjp = jax.vjp(fn, q, k, v)
            return vjp(cot)

        jitted = jax.jit(grads)
    else:
        jitted = jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    info: dict[str, Any] = {"compile_s": time.perf_counter() - start}
    try:
        info["xla_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        pass

    def call() -> Any:
        return jax.block_until_ready(compiled(*args))

    def leaves(outputs: Any) -> list[Any]:
        return jax.tree_util.tree_leaves(outputs)

    def to_numpy(outputs: Any) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.float32) for x in leaves(outputs)]

    def nbytes(outputs: Any) -> int:
        return sum(x.nbytes for x in leaves(outputs))

    if name == "ours-jax":
        info["engine"] = "chunked"  # JAX's only engine
    runner = Runner(call=call, to_numpy=to_numpy, nbytes=nbytes, info=info)
    if dev.memory_stats() is not None:
        state = {"base": 0}

        def reset() -> None:
            state["base"] = dev.memory_stats().get("bytes_in_use", 0)

        def peak() -> int | None:
            stats = dev.memory_stats()
            if "peak_bytes_in_use" not in stats:
                return None
            return stats["peak_bytes_in_use"] - state["base"]

        runner.allocator_reset, runner.allocator_peak = reset, peak
    return runner


def setup_jax(dtype: str) -> dict[str, Any]:
    """Enable float64 when asked; describe the jax build for the JSON."""
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    return {"jax": jax.__version__, "jax_backend": jax.default_backend()}
