"""What the benchmark runs: implementations, shapes, modes, and which cases are skipped.

Framework-free (no torch, no jax): the parent process plans with these and hands them to the
worker subprocess as plain JSON.

Shape legend (as in ``memory_efficient_attention._spec``)::

    B  batch          n  sequence length (self-attention: L = S = n)
    H  heads          D  depth of queries, keys and values
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "DTYPES",
    "IMPLS",
    "MODES",
    "REFERENCE_IMPL",
    "Case",
    "Impl",
    "Shape",
    "dense_bytes",
    "format_bytes",
    "select_impls",
    "skip_reason",
]

DTYPES = ("float16", "bfloat16", "float32", "float64")
"""The dtypes of q, k and v the benchmark accepts (``Shape.itemsize`` knows their sizes)."""

MODES = ("forward", "backward")
"""``forward``: inference, no autograd. ``backward``: forward + backward, the gradient of
``sum(out * cotangent)`` with respect to q, k and v."""

MODE_LABELS = {"forward": "forward (inference)", "backward": "forward + backward"}


@dataclass(frozen=True)
class Impl:
    """One implementation under test."""

    name: str
    framework: str  # "torch" or "jax"
    description: str
    dense: bool = False  # materialises the B*H*n*n logits
    seed: bool = False  # the 0.1.3 seed package, loaded from --seed-dir


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        Impl("ours-torch", "torch", "memory_efficient_attention.torch (this package)"),
        Impl("ours-jax", "jax", "memory_efficient_attention.jax (this package)"),
        Impl("sdpa", "torch", "torch.nn.functional.scaled_dot_product_attention"),
        Impl("plain-torch", "torch", "softmax(q k^T / sqrt(D)) v, logits materialised", dense=True),
        Impl("xla", "jax", "jax.nn.dot_product_attention(implementation='xla')", dense=True),
        Impl("seed-torch", "torch", "memory-efficient-attention 0.1.3, PyTorch", seed=True),
        Impl("seed-jax", "jax", "memory-efficient-attention 0.1.3, JAX", seed=True),
    )
}

REFERENCE_IMPL = "sdpa"
"""Times are also reported as a ratio to this implementation, timed in the same round-robin."""


@dataclass(frozen=True)
class Shape:
    """Self-attention inputs: q, k, v of ``[B, n, H, D]`` (``[B, H, n, D]`` for sdpa/plain)."""

    n: int
    batch: int = 1
    heads: int = 8
    depth: int = 64
    dtype: str = "float32"
    causal: bool = False
    engine: str = "auto"  # ours' engine= ("auto", "chunked", "fused"; JAX: no "fused")

    @property
    def itemsize(self) -> int:
        return {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[self.dtype]

    @property
    def tensor_bytes(self) -> int:
        """Bytes of one of q, k, v or the output."""
        return self.batch * self.n * self.heads * self.depth * self.itemsize

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    """One measurement: an implementation at a shape in a mode."""

    impl: str
    shape: Shape
    mode: str

    def io_bytes(self) -> int:
        """Inputs + outputs: q, k, v, out; for ``backward`` also the cotangent and dq, dk, dv."""
        return (4 if self.mode == "forward" else 8) * self.shape.tensor_bytes


def dense_bytes(shape: Shape, mode: str) -> int:
    """Estimated memory of the materialised logits: ``B*H*n*n`` float32 (float64 for float64),
    three such tensors for forward + backward (probabilities, their gradient, the logits')."""
    per = shape.batch * shape.heads * shape.n * shape.n * max(4, shape.itemsize)
    return per * (3 if mode == "backward" else 1)


def format_bytes(num: float | None) -> str:
    """``1536 -> '1.5 KiB'``; ``None -> '-'``; negative values keep their sign."""
    if num is None:
        return "-"
    sign, num = ("-" if num < 0 else ""), abs(float(num))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{sign}{num:.0f} {unit}" if unit == "B" else f"{sign}{num:.3g} {unit}"
        num /= 1024
    raise AssertionError("unreachable")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def skip_reason(
    case: Case, *, max_dense_bytes: int, seed_available: bool, install_hint: str = ""
) -> str | None:
    """Why ``case`` is not run (a short sentence for the table), or None to run it."""
    impl = IMPLS[case.impl]
    if case.impl == "ours-jax" and case.shape.engine == "fused":
        return "not supported: JAX has no fused engine (--engine fused is for ours-torch)"
    if impl.seed:
        if not seed_available:
            return "not available: seed 0.1.3 not installed" + (f"; {install_hint}" if install_hint else "")
        if case.shape.causal:
            return "not supported: the seed has no causal option (a dense mask would be n x n)"
        if not _is_power_of_two(case.shape.n):
            return "not supported: seed 0.1.3 is wrong when n is not a multiple of its chunks"
    if impl.dense:
        need = dense_bytes(case.shape, case.mode)
        if need > max_dense_bytes:
            return f"would need {format_bytes(need)} for the n x n logits (> --max-dense-memory)"
    return None


def select_impls(frameworks: list[str], impls: list[str] | None) -> list[str]:
    """The implementations to run, in ``IMPLS`` order, filtered by framework."""
    chosen = list(IMPLS) if not impls else impls
    unknown = [name for name in chosen if name not in IMPLS]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; choose from {list(IMPLS)}")
    return [name for name in IMPLS if name in chosen and IMPLS[name].framework in frameworks]
