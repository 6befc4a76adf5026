"""Engines, and the span plan of a fused engine, framework-neutral.

An *engine* computes one call's ``(out, lse)`` and its gradients over kernel-layout arrays (see
``_spec``); every engine follows the same numerics (``_spec``: natural-log lse at its boundary,
the merge of partial results by ``lse_merge_weights``, gradients from the *global* ``out`` and
``lse``). Two kinds exist:

* ``"chunked"``: the universal engine, a loop over the block plan (``_masks.BlockPlan``) with the
  whole score pipeline per chunk pair (bias, masks, soft cap, ``score_mod``, dropout, callbacks,
  every derivative). Each framework has one (``torch._kernel``, ``jax._kernel``).
* ``"fused"``: one fused library kernel per *span* (a large rectangle of queries x keys), the
  spans' results merged by their lse. It takes only what the library kernel does: the plain
  scores with an additive mask. ``fused_refusal`` says, from the static description of a call,
  why a call cannot use it; ``SpanPlan`` cuts the call into spans from its structured mask.

A span is ``FULL`` (no mask), ``DIAGONAL`` (top-left causal inside the span: the library kernel's
``is_causal``) or ``PARTIAL`` (an additive mask of the span, built chunk-keep style, O(span)).
Empty regions are never visited.

Example::

    >>> from memory_efficient_attention._masks import StructuredMask
    >>> print(SpanPlan.build(StructuredMask(6, 8, causal=True, offset=2)))
    SpanPlan(L=6, S=8, 1 query span, 2 calls: 1 full, 1 diagonal, 0 partial)
      q[0:6]: full k[0:2], diagonal k[2:8]
    >>> print(SpanPlan.build(StructuredMask(8, 12, window=(6, 6)), span_q=4))
    SpanPlan(L=8, S=12, 2 query spans, 5 calls: 2 full, 0 diagonal, 3 partial)
      q[0:4]: full k[0:7], partial k[7:10]
      q[4:8]: partial k[0:1], full k[1:11], partial k[11:12]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

from ._masks import FULL, PARTIAL, StructuredMask
from ._spec import AttentionInputError

__all__ = ["DIAGONAL", "ENGINES", "Span", "SpanPlan", "check_engine", "fused_refusal", "fused_slower"]

# "fused" (torch's fused kernels per span) and "flex" (FlexAttention): PyTorch; "pallas": JAX
ENGINES = ("auto", "chunked", "fused", "flex", "pallas")
DIAGONAL = 3
_NAMES = {FULL: "full", DIAGONAL: "diagonal", PARTIAL: "partial"}

# A partial span's additive mask holds at most this many elements (per broadcast batch x head
# slice of the call's masks): 2**22 float32 values are 16 MiB.
MASK_ELEMENTS = 2**22


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise AttentionInputError(f"engine must be one of {ENGINES}, got {engine!r}")
    return engine


def fused_refusal(
    *,
    dims,
    softcap: float | None,
    dropout: float,
    callables: bool,
    dense_mask_fill: str | None,
    device: str,
) -> str | None:
    """Why a call cannot run on the fused engine (None: it can).

    ``callables``: the call has ``score_mod`` or the seed's callbacks (per-element user work);
    ``dense_mask_fill``: the fill rule of its dense boolean mask (None without one): the seed's
    ``"min"`` keeps a fully masked row averaging the values, which spans merged by lse cannot
    reproduce. ``device``: the arrays' device type.

    >>> from memory_efficient_attention._spec import Dims
    >>> dims = Dims((1,), 10, 10, 2, 2, 8, 8)
    >>> fused_refusal(dims=dims, softcap=None, dropout=0.0, callables=False, dense_mask_fill=None,
    ...               device="cpu") is None
    True
    >>> fused_refusal(dims=dims, softcap=30.0, dropout=0.0, callables=False, dense_mask_fill=None,
    ...               device="cpu")
    'a logits soft cap'
    """
    if device not in ("cpu", "cuda"):
        return f"arrays on {device} (the fused engine runs on CPU and CUDA)"
    if dims.qk_depth != dims.v_depth:
        return f"a value depth E={dims.v_depth} different from the key depth D={dims.qk_depth}"
    if softcap is not None:
        return "a logits soft cap"
    if dropout:
        return "dropout"
    if callables:
        return "score_mod or a seed callback (per-element user work)"
    if dense_mask_fill == "min":
        return "a dense mask with the seed's finfo.min rule (mask_fill='min')"
    return None


# A window narrower than this runs faster on the chunked engine (its tiles follow the band; a
# span computes a whole span_q x (span_q + band) rectangle): measured at n = 16384, 8 heads,
# window (256, 0), forward: chunked 199 ms, fused 361 ms. Lengths and segment ids likewise (n =
# 4096, 8 documents: chunked 46 ms, fused 278 ms; keys < 3000: 257 vs 282 ms): benchmarks/engines.
FUSED_MIN_BAND = 2048


def fused_slower(mask: StructuredMask) -> str | None:
    """Why ``engine="auto"`` keeps a call that the fused engine could run on the chunked engine
    because it measured faster there (None: fused is the faster one).

    >>> fused_slower(StructuredMask(8192, 8192, window=(256, 0)))
    'a local window of 257 keys (narrower than 2048: the chunked engine measured faster)'
    >>> fused_slower(StructuredMask(8192, 8192, causal=True)) is None
    True
    """
    if mask.dynamic:
        return (
            "lengths, segment ids or a mask_mod (the chunked engine skips the blocks they empty at "
            "run time: measured faster)"
        )
    if mask.window is not None:
        band = max(0, mask.window[0]) + max(0, mask.window[1]) + 1
        if band < FUSED_MIN_BAND:
            return (
                f"a local window of {band} keys (narrower than {FUSED_MIN_BAND}: the chunked "
                "engine measured faster)"
            )
    return None


class Span(NamedTuple):
    """Queries ``[q0, q1)`` against keys ``[k0, k1)``; ``kind`` FULL, DIAGONAL or PARTIAL."""

    q0: int
    q1: int
    k0: int
    k1: int
    kind: int

    def __str__(self) -> str:
        return f"{_NAMES[self.kind]} k[{self.k0}:{self.k1}]"


def _cuts(lo: int, hi: int, size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` in ``ceil(width / size)`` nearly equal parts."""
    n = max(1, math.ceil((hi - lo) / size))
    edges = [lo + (hi - lo) * i // n for i in range(n + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


@dataclass(frozen=True)
class SpanPlan:
    """The spans of one call: ``rows`` holds ``(q0, q1, spans)`` per query span (a query span
    with no spans has no key: its rows output 0 with lse ``-inf``)."""

    q_len: int
    kv_len: int
    rows: tuple[tuple[int, int, tuple[Span, ...]], ...]

    @classmethod
    def build(
        cls,
        mask: StructuredMask,
        *,
        span_q: int = 1024,
        span_k: int | None = None,
        partial_k: int = 1024,
        dense: bool = False,
    ) -> SpanPlan:
        """Cut a call into spans.

        ``span_q``: the query rows of a span when anything needs a mask or a window bounds the
        keys (otherwise one query span covers all rows: the library kernel tiles internally, in
        O(span) memory); ``span_k``: the most keys of a full span (None: unbounded);
        ``partial_k``: the most keys of a partial span (its mask is ``rows x partial_k``);
        ``dense``: a dense mask or bias is sliced into every span (so no query span covers
        more than ``span_q`` rows).
        """
        if not (mask.window is not None or mask.dynamic or dense):
            # One query span, unless it needs a mask (a causal diagonal starting before key 0).
            row = cls._row(mask, 0, mask.q_len, span_k, partial_k)
            if all(s.kind != PARTIAL for s in row):
                return cls(mask.q_len, mask.kv_len, ((0, mask.q_len, tuple(row)),))
        cuts = _cuts(0, mask.q_len, span_q)
        rows = tuple((q0, q1, tuple(cls._row(mask, q0, q1, span_k, partial_k))) for q0, q1 in cuts)
        return cls(mask.q_len, mask.kv_len, rows)

    @staticmethod
    def _row(mask: StructuredMask, q0: int, q1: int, span_k: int | None, partial_k: int) -> list[Span]:
        lo, hi = mask.key_range(q0, q1)
        if lo >= hi or q1 <= q0:
            return []
        if mask.dynamic:
            return [Span(q0, q1, a, b, PARTIAL) for a, b in _cuts(lo, hi, partial_k)]
        # The keys every row of the span keeps (static part): full; the rest of [lo, hi) partial.
        flo, fhi = lo, hi
        if mask.causal:
            fhi = min(fhi, q0 + mask.offset + 1)
        if mask.window is not None:
            left, right = mask.window
            flo = max(flo, q1 - 1 + mask.offset - left)
            fhi = min(fhi, q0 + mask.offset + right + 1)
        full_size = span_k or max(hi - lo, 1)
        if flo >= fhi:
            return [Span(q0, q1, a, b, PARTIAL) for a, b in _cuts(lo, hi, partial_k)]
        spans = [Span(q0, q1, a, b, PARTIAL) for a, b in _cuts(lo, flo, partial_k)] if flo > lo else []
        diagonal = mask.causal and mask.window is None and fhi < hi
        if diagonal:  # the diagonal span starts at the first row's last key: is_causal inside
            fhi -= 1
        spans += [Span(q0, q1, a, b, FULL) for a, b in _cuts(flo, fhi, full_size)] if fhi > flo else []
        if diagonal:
            spans.append(Span(q0, q1, fhi, hi, DIAGONAL))
        elif fhi < hi:
            spans += [Span(q0, q1, a, b, PARTIAL) for a, b in _cuts(fhi, hi, partial_k)]
        return spans

    @property
    def spans(self) -> list[Span]:
        return [s for _, _, spans in self.rows for s in spans]

    def count(self, kind: int) -> int:
        return sum(s.kind == kind for s in self.spans)

    def __str__(self) -> str:
        n = len(self.rows)
        head = (
            f"SpanPlan(L={self.q_len}, S={self.kv_len}, {n} query span{'s' * (n != 1)}, "
            f"{len(self.spans)} calls: {self.count(FULL)} full, {self.count(DIAGONAL)} diagonal, "
            f"{self.count(PARTIAL)} partial)"
        )
        lines = [f"  q[{q0}:{q1}]: " + (", ".join(map(str, s)) or "no key") for q0, q1, s in self.rows]
        if len(lines) > 64:
            lines = [*lines[:32], f"  ... {len(lines) - 64} more ...", *lines[-32:]]
        return "\n".join([head, *lines])
