"""Torch's fused attention kernels, one span at a time, behind one small interface.

The fused engine (``_fused``) computes every span of a call with one library kernel that returns
its log-sum-exp, and the span's share of dQ/dK/dV with that kernel's backward, which it feeds the
*global* ``out`` and ``lse``. A ``SpanKernel`` hides each kernel's calling convention:

* ``CpuFlash``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (every float dtype, an
  additive mask, grouped heads).
* ``CudaFlash``: ``aten._scaled_dot_product_flash_attention`` (FlashAttention-2: float16 and
  bfloat16, head depth <= 256, no mask, grouped heads natively).
* ``CudaEfficient``: ``aten._scaled_dot_product_efficient_attention`` (the memory-efficient
  CUTLASS kernel: float32 too, an additive mask; its lse padded to a multiple of 32 rows; grouped
  heads repeated: ``gqa=False``, which ``SpanKernel.forward``/``backward`` handle for any kernel).

Layouts (``Z`` batch, ``H`` query heads, ``K`` key/value heads, ``lq`` rows and ``kc`` keys of
a span, ``D`` depth)::

    q [Z, H, lq, D]   k, v [Z, K, kc, D]   add [Zm, Hm, lq, kc] or None (0 / -inf, plus a bias)
    forward -> out [Z, H, lq, D] (q's dtype), lse [Z, H, lq] (natural log, float32 or float64)

The private operators may change between torch versions; ``broken(device, dtype, depth)`` runs each
kernel once on a tiny input on the device (forward and backward against the dense formula) and
says why it cannot be used, so that a changed operator falls back to the chunked engine instead
of giving wrong results. ``OPS`` is the operator namespace (the tests swap in stand-ins that
follow the CUDA operators' contracts, so the CUDA plumbing runs on CPU).

Example (CPU)::

    >>> import torch
    >>> kernel = kernels_for("cpu", torch.float32)[0]
    >>> q = torch.randn(1, 2, 5, 8); k = v = torch.randn(1, 1, 7, 8)
    >>> out, lse = kernel.forward(q, k, v, False, None, 0.35)
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5]))
"""

from __future__ import annotations

import functools

import torch

__all__ = ["CpuFlash", "CudaEfficient", "CudaFlash", "SpanKernel", "broken", "kernels_for", "no_fit"]

OPS = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)


class SpanKernel:
    """One library kernel for one span (see the module docstring for the layouts)."""

    name = "kernel"
    op = ""  # the forward operator's name in ``OPS``
    dtypes: tuple[torch.dtype, ...] = ()
    max_depth = 1 << 30
    depth_multiple = 1
    takes_mask = True  # an additive mask
    gqa = True  # fewer key/value heads than query heads, natively
    square_causal_only = False  # ``causal`` only on spans with as many keys as rows
    zero_empty_rows = True  # a row with no key outputs 0 (otherwise the engine zeroes it)

    def fits(self, dtype: torch.dtype, depth: int) -> bool:
        return dtype in self.dtypes and depth <= self.max_depth and depth % self.depth_multiple == 0

    def mask_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def __init__(self, *, gqa: bool | None = None):
        if gqa is not None:
            self.gqa = gqa

    def forward(self, q, k, v, causal: bool, add, scale: float):
        """``(out, lse)`` of one span."""
        if not self.gqa and k.shape[1] != q.shape[1]:
            k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
        return self._forward(q, k, v, causal, add, scale)

    def backward(self, d_out, q, k, v, out, lse, causal: bool, add, scale: float):
        """``(dq, dk, dv)``: the span's share, from the global ``out`` and ``lse``."""
        kh = k.shape[1]
        if self.gqa or kh == q.shape[1]:
            return self._backward(d_out, q, k, v, out, lse, causal, add, scale)
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
        dq, dk, dv = self._backward(d_out, q, k, v, out, lse, causal, add, scale)
        # the repeated heads' gradients summed back onto their key/value head
        return dq, dk.unflatten(1, (kh, -1)).sum(2), dv.unflatten(1, (kh, -1)).sum(2)

    def _forward(self, q, k, v, causal: bool, add, scale: float):
        raise NotImplementedError

    def _backward(self, d_out, q, k, v, out, lse, causal: bool, add, scale: float):
        raise NotImplementedError

    def __repr__(self) -> str:
        heads = "" if self.gqa else ", K/V heads repeated"
        return f"{self.name} (aten.{self.op}{heads})"


def _repeat_heads(x, heads: int):
    """``[Z, K, n, D]`` -> ``[Z, H, n, D]`` (query head ``h`` reads key/value head ``h // G``)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


class CpuFlash(SpanKernel):
    name = "flash-attention CPU kernel"
    op = "_scaled_dot_product_flash_attention_for_cpu"
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

    def mask_dtype(self, dtype):
        return torch.float32 if dtype in _HALF else dtype

    def _forward(self, q, k, v, causal, add, scale):
        return getattr(OPS, self.op)(q, k, v, 0.0, causal, attn_mask=add, scale=scale)

    def _backward(self, d_out, q, k, v, out, lse, causal, add, scale):
        bop = getattr(OPS, self.op + "_backward")
        return bop(d_out, q, k, v, out, lse, 0.0, causal, attn_mask=add, scale=scale)


class CudaFlash(SpanKernel):
    name = "FlashAttention-2 CUDA kernel"
    op = "_scaled_dot_product_flash_attention"
    dtypes = _HALF
    max_depth = 256
    depth_multiple = 8
    takes_mask = False
    square_causal_only = True  # FA2 aligns a non-square causal mask to the bottom right

    def _forward(self, q, k, v, causal, add, scale):
        assert add is None
        out, lse, *_ = getattr(OPS, self.op)(q, k, v, 0.0, causal, False, scale=scale)
        return out, lse

    def _backward(self, d_out, q, k, v, out, lse, causal, add, scale):
        bop = getattr(OPS, self.op + "_backward")
        # Without dropout the random state is unused; without packed sequences so are cum_seq_*.
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        lq, kc = q.shape[2], k.shape[2]
        return bop(d_out, q, k, v, out, lse, None, None, lq, kc, 0.0, causal, seed, offset, scale=scale)


def _rows32(n: int) -> int:
    return -(-n // 32) * 32


class CudaEfficient(SpanKernel):
    name = "memory-efficient CUDA kernel"
    op = "_scaled_dot_product_efficient_attention"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    depth_multiple = 8
    gqa = False
    zero_empty_rows = False

    @staticmethod
    def _aligned(q, k, add):
        """The mask at ``[Z, H, lq, kc]`` (stride-0 views) over storage whose rows are padded to
        a multiple of 16 elements (the kernel's alignment)."""
        if add is None:
            return None
        z, h, lq, _ = q.shape
        kc = k.shape[2]
        pad = -(-kc // 16) * 16
        if pad != kc or add.stride(-2) % 16 or add.stride(-1) != 1:
            store = add.new_empty(*add.shape[:-1], pad)
            store[..., :kc] = add
            add = store[..., :kc]
        return add.expand(z, h, lq, kc)

    def _forward(self, q, k, v, causal, add, scale):
        add = self._aligned(q, k, add)
        out, lse, *_ = getattr(OPS, self.op)(q, k, v, add, True, 0.0, causal, scale=scale)
        return out, lse[..., : q.shape[2]]

    def _backward(self, d_out, q, k, v, out, lse, causal, add, scale):
        add = self._aligned(q, k, add)
        lq = q.shape[2]
        padded = lse.new_zeros(*lse.shape[:-1], _rows32(lq))
        padded[..., :lq] = lse
        seed = torch.zeros((), dtype=torch.int64)
        offset = torch.zeros((), dtype=torch.int64)
        bop = getattr(OPS, self.op + "_backward")
        dq, dk, dv, _ = bop(
            d_out, q, k, v, add, out, padded, seed, offset, 0.0, [True, True, True, False], causal,
            scale=scale,
        )  # fmt: skip
        return dq, dk, dv


KERNELS: dict[str, tuple[SpanKernel, ...]] = {
    "cpu": (CpuFlash(),),
    # FlashAttention-2 maps query heads to key/value heads itself; should this torch's operator
    # refuse grouped heads (its check fails), the second one repeats them.
    "cuda": (CudaFlash(), CudaFlash(gqa=False), CudaEfficient()),
}


def kernels_for(device: str, dtype: torch.dtype, depth: int = 64) -> tuple[SpanKernel, ...]:
    """The usable kernels for arrays of ``dtype`` and head ``depth`` on ``device``, preferred
    first (a span without a mask takes the first; a span with one the first that
    ``takes_mask``): those that fit and whose check (``broken``) passed."""
    return tuple(kern for kern in _fitting(device, dtype, depth) if _check(kern, device, dtype) is None)


def _fitting(device: str, dtype: torch.dtype, depth: int) -> list[SpanKernel]:
    return [kern for kern in KERNELS.get(device, ()) if kern.fits(dtype, depth)]


def no_fit(device: str, dtype: torch.dtype, depth: int) -> str | None:
    """Why no kernel takes such arrays, by design (None: one does). Every span can run when a
    kernel that takes a mask fits."""
    if not any(kern.takes_mask for kern in _fitting(device, dtype, depth)):
        name = str(dtype).removeprefix("torch.")
        masked = [k for k in KERNELS.get(device, ()) if k.takes_mask]
        if not masked:
            return f"arrays on {device} (torch has no fused {device} kernel this engine uses)"
        want = ", ".join(str(d).removeprefix("torch.") for d in masked[0].dtypes)
        return (
            f"{name} arrays with head depth {depth} on {device} (torch's fused {device} kernels "
            f"take {want}, depth a multiple of {masked[0].depth_multiple})"
        )
    return None


def broken(device: str, dtype: torch.dtype, depth: int) -> str | None:
    """Why the kernels that fit cannot be used in this torch (None: they can): an operator
    missing, or its signature or results not what this engine was written against (each checked
    once, on a tiny input on the device)."""
    masked = [kern for kern in _fitting(device, dtype, depth) if kern.takes_mask]
    reasons = [_check(kern, device, dtype) for kern in masked]
    return None if any(r is None for r in reasons) else reasons[0]


@functools.cache
def _check(kern: SpanKernel, device: str, dtype: torch.dtype) -> str | None:
    """Run ``kern`` once on a tiny input (two query heads on one key/value head, a causal span
    and, if it takes one, a mask) against the dense formula in float64: None if it agrees."""
    version = torch.__version__
    if getattr(OPS, kern.op, None) is None or getattr(OPS, kern.op + "_backward", None) is None:
        return f"torch {version} has no aten.{kern.op}"
    try:
        bad = _disagreement(kern, device, dtype)
    except Exception as err:  # a changed signature or a refused input
        return f"torch {version}'s aten.{kern.op} does not behave as expected ({err})"
    return None if bad is None else f"torch {version}'s aten.{kern.op} gave unexpected {bad}"


def _disagreement(kern: SpanKernel, device: str, dtype: torch.dtype) -> str | None:
    gen = torch.Generator().manual_seed(0)
    s = 5 if kern.square_causal_only else 7
    q, d_out = (torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 1, s, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    keep = torch.ones(5, s, dtype=torch.bool).tril()  # top-left causal: the span's diagonal
    extra = torch.ones(5, s, dtype=torch.bool)
    if kern.takes_mask:
        extra[1, 0] = extra[3, 2:4] = False
    add = torch.zeros(1, 1, 5, s, dtype=torch.float64).masked_fill(~extra, float("-inf"))
    keep &= extra
    causal = True
    # The dense formula and its gradients written out (no autograd: a first call may come from
    # inside an autograd.Function, inference mode or a torch.func transform).
    k2, v2 = k.expand(1, 2, s, 8), v.expand(1, 2, s, 8)
    scores = (q @ k2.transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf"))
    p = scores.softmax(-1)
    want_out = p @ v2
    d_s = p * (d_out @ v2.transpose(-1, -2) - (d_out * want_out).sum(-1, keepdim=True))
    want_grads = [
        d_s @ k2 * 0.5,
        (d_s.transpose(-1, -2) @ q * 0.5).sum(1, keepdim=True),
        (p.transpose(-1, -2) @ d_out).sum(1, keepdim=True),
    ]
    want_lse = scores.logsumexp(-1)
    cast = [x.to(device=device, dtype=dtype) for x in (q, k, v, d_out)]
    mask = add.to(device=device, dtype=kern.mask_dtype(dtype)) if kern.takes_mask else None
    with torch.no_grad():
        out, lse = kern.forward(*cast[:3], causal, mask, 0.5)
        grads = kern.backward(cast[3], *cast[:3], out, lse, causal, mask, 0.5)
    tol = 1e-9 if dtype == torch.float64 else 2e-3 if dtype == torch.float32 else 3e-2
    pairs = [("outputs", out, want_out), ("lse", lse, want_lse)]
    pairs += [(f"d{n}", g, w) for n, g, w in zip("qkv", grads, want_grads)]
    for what, got, want in pairs:
        if tuple(got.shape) != tuple(want.shape):
            return f"{what} shape {tuple(got.shape)} (expected {tuple(want.shape)})"
        if not torch.allclose(got.detach().to("cpu", torch.float64), want.detach(), atol=tol, rtol=tol):
            return what
    return None
