"""The PyTorch Ulysses x ring hybrid on 4 gloo ranks, as 2 (Ulysses) x 2 (ring): outputs and
gradients of each rank's shard against the float64 dense reference of ``ring_cases``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from .gloo_ranks import run_ranks  # noqa: E402

# (name, layout, variant, options, lengths, segments, key/value heads, query length factor)
CASES = [
    ("hybrid-causal-zigzag", "zigzag", "ring", {"is_causal": True}, False, False, 2, 1),
    ("hybrid-window-segments", "contiguous", "ring", {"local_window_size": (9, 2)}, False, True, 2, 1),
    ("hybrid-lengths-allgather", "contiguous", "allgather", {"is_causal": True}, True, False, 1, 1),
    ("hybrid-bottom-right-window", "contiguous", "ring",
     {"is_causal": True, "causal_alignment": "bottom_right", "local_window_size": (11, 0)},
     False, False, 2, 0.5),
]  # fmt: skip
ULYSSES, RING = 2, 2


def _hybrid(rank, layout, variant, options, lengths, segments, kv_heads, q_factor, groups):
    from memory_efficient_attention.distributed.torch import to_zigzag, ulysses_attention

    from .ring_cases import dense, inputs, keep_mask

    uly, ring = groups
    arrays, ints = inputs(ULYSSES * RING, 12, q_factor, lengths, segments)
    q, k, v, d_out = (torch.as_tensor(arrays[x]) for x in ("q", "k", "v", "d_out"))
    k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
    keep = torch.as_tensor(keep_mask(options, q.shape[1], k.shape[1], ints))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = dense(torch, *leaves, keep)
    ref_grads = torch.autograd.grad(ref, leaves, d_out)

    def shard(x, dim=-3):  # ring-major: rank = ring position * ULYSSES + Ulysses position
        x = to_zigzag(x, RING, dim=dim) if layout == "zigzag" else x
        return x.chunk(ULYSSES * RING, dim=dim)[rank]

    given = {n: torch.as_tensor(x) for n, x in ints.items()}
    for name in ("query_segment_ids", "key_segment_ids"):
        if name in given:
            given[name] = shard(given[name], dim=-1)
    local = [shard(x).clone().requires_grad_(True) for x in (q, k, v)]
    out = ulysses_attention(
        *local, group=uly, ring_group=ring, layout=layout, variant=variant, query_chunk_size=8,
        key_chunk_size=8, **options, **given,
    )  # fmt: skip
    grads = torch.autograd.grad(out, local, shard(d_out))
    errors = [(out - shard(ref)).abs().max().item()]
    return errors + [(g - shard(r)).abs().max().item() for g, r in zip(grads, ref_grads)]


def _worker(rank: int, world: int, results: dict) -> None:
    import torch.distributed as dist

    # Every rank creates every group (new_group is collective), then keeps its own.
    ulysses = [dist.new_group([r * ULYSSES + u for u in range(ULYSSES)]) for r in range(RING)]
    rings = [dist.new_group([r * ULYSSES + u for r in range(RING)]) for u in range(ULYSSES)]
    groups = (ulysses[rank // ULYSSES], rings[rank % ULYSSES])
    for name, *args in CASES:
        try:
            results[name] = _hybrid(rank, *args, groups)
        except Exception as err:
            results[name] = f"{type(err).__name__}: {err}"
            raise


@pytest.fixture(scope="module")
def hybrid_results(tmp_path_factory):
    return run_ranks(_worker, ULYSSES * RING, str(tmp_path_factory.mktemp("hybrid")))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ulysses_ring_hybrid_on_two_by_two_ranks(hybrid_results, name):
    for rank, results in enumerate(hybrid_results):
        errors = results[name]
        assert not isinstance(errors, str), f"rank {rank}: {errors}"
        assert max(errors) < 1e-10, f"rank {rank}: max errors (out, dq, dk, dv) {errors}"
