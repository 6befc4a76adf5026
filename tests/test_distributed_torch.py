"""PyTorch ring attention: one spawned group of gloo ranks runs every subtest in float64; each rank
compares its shard of the output and of the gradients with the single-process kernel on the global
arrays and reports the errors back through a file."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from memory_efficient_attention import AttentionInputError  # noqa: E402

from .gloo_ranks import run_ranks  # noqa: E402
from .ring_cases import CASES as MASK_CASES  # noqa: E402

WORLD = 3
TOL = 1e-10  # float64

# (name, is_causal, layout, local query length, local key/value length, chunk size). Local lengths
# are not multiples of the chunk size; zigzag needs them even.
SUBTESTS = [
    ("full-contiguous", False, "contiguous", 6, 6, 4),
    ("full-cross", False, "contiguous", 6, 5, 4),
    ("full-zigzag", False, "zigzag", 6, 6, 4),
    ("causal-contiguous", True, "contiguous", 6, 6, 4),
    ("causal-zigzag", True, "zigzag", 6, 6, 4),
    ("causal-zigzag-one-chunk", True, "zigzag", 10, 10, 16),
]


# Ulysses (all-to-all over heads): (name, kernel keywords, key/value heads, packed documents);
# 6 query heads on 3 ranks, local length 7.
ULYSSES_SUBTESTS = [
    ("ulysses-causal", {"is_causal": True}, 3, False),
    ("ulysses-window-segments", {"local_window_size": (4, 1)}, 3, True),
    ("ulysses-gqa-1-kv-head-lengths", {"key_value_seq_lengths": [21, 9], "is_causal": True}, 1, False),
    ("ulysses-lse", {"return_lse": True, "logits_soft_cap": 2.0}, 6, False),
]


def _ulysses_subtest(rank: int, world: int, kwargs: dict, kv_heads: int, segments: bool):
    from memory_efficient_attention.distributed.torch import ulysses_attention
    from memory_efficient_attention.torch import efficient_dot_product_attention

    gen = torch.Generator().manual_seed(99)
    shape = dict(dtype=torch.float64, generator=gen)
    n = 7 * world
    q = torch.randn(2, n, 6, 8, **shape)
    k = torch.randn(2, n, kv_heads, 8, **shape)
    v = torch.randn(2, n, kv_heads, 5, **shape)
    kwargs = {name: (torch.tensor(x) if isinstance(x, list) else x) for name, x in kwargs.items()}
    ids = torch.tensor([0] * 5 + [1] * 12 + [2] * 4).repeat(2, 1) if segments else None
    lse = kwargs.get("return_lse", False)

    def loss(result):
        if not lse:
            return result.square().sum()
        return result[0].square().sum() + torch.nan_to_num(result[1], neginf=0.0).sum()

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    seg = {} if ids is None else dict(query_segment_ids=ids, key_segment_ids=ids)
    ref = efficient_dot_product_attention(*leaves, **seg, **kwargs)
    ref_grads = torch.autograd.grad(loss(ref), leaves)

    def shard(x):  # the sequence axis is 1 for q, k, v, out, lse and the ids
        return x.chunk(world, dim=1)[rank]

    local = [shard(x).clone().requires_grad_(True) for x in (q, k, v)]
    local_seg = {} if ids is None else dict(query_segment_ids=shard(ids), key_segment_ids=shard(ids))
    got = ulysses_attention(*local, **local_seg, **kwargs)
    grads = torch.autograd.grad(loss(got), local)
    outs = list(got) if lse else [got]
    refs = [ref[0], ref[1]] if lse else [ref]
    errors = [(a - shard(b)).nan_to_num(0.0).abs().max().item() for a, b in zip(outs, refs)]
    return errors + [(g - shard(r)).abs().max().item() for g, r in zip(grads, ref_grads)]


def _bf16_ratio(rank: int, world: int) -> float:
    """This rank's mean bfloat16 error in the ring over the single process's (same rows)."""
    from memory_efficient_attention.distributed.torch import ring_attention
    from memory_efficient_attention.torch import efficient_dot_product_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 96 * world, 4, 16, generator=gen).bfloat16() for _ in range(3))
    exact = efficient_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    one = efficient_dot_product_attention(q, k, v, is_causal=True)
    local = [x.chunk(world, dim=1)[rank] for x in (q, k, v)]
    ring = ring_attention(*local, is_causal=True)
    mine = exact.chunk(world, dim=1)[rank]
    return (
        (ring.double() - mine).abs().mean() / (one.chunk(world, dim=1)[rank].double() - mine).abs().mean()
    ).item()


def _subtest(rank: int, world: int, is_causal: bool, layout: str, lq: int, lk: int, chunk: int):
    """Max abs errors of this rank's shards of ``out, dq, dk, dv`` against the single process."""
    from memory_efficient_attention.distributed.torch import from_zigzag, ring_attention, to_zigzag
    from memory_efficient_attention.torch import efficient_dot_product_attention

    gen = torch.Generator().manual_seed(1234)  # the same global arrays on every rank
    shape = dict(dtype=torch.float64, generator=gen)
    q = torch.randn(2, world * lq, 4, 8, **shape)  # [B, N, H, D]; GQA: 2 key/value heads
    k = torch.randn(2, world * lk, 2, 8, **shape)
    v = torch.randn(2, world * lk, 2, 6, **shape)
    d_out = torch.randn(2, world * lq, 4, 6, **shape)

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = efficient_dot_product_attention(*leaves, is_causal=is_causal)
    ref_grads = torch.autograd.grad(ref, leaves, d_out)

    def shard(x):
        x = to_zigzag(x, world) if layout == "zigzag" else x
        return x.chunk(world, dim=-3)[rank]

    local = [shard(x).clone().requires_grad_(True) for x in (q, k, v)]
    out = ring_attention(
        *local, is_causal=is_causal, layout=layout, query_chunk_size=chunk, key_chunk_size=chunk
    )
    grads = torch.autograd.grad(out, local, shard(d_out))
    errors = [(out - shard(ref)).abs().max().item()]
    errors += [(g - shard(r)).abs().max().item() for g, r in zip(grads, ref_grads)]
    if layout == "zigzag":  # the helpers invert each other
        errors.append((from_zigzag(to_zigzag(q, world), world) - q).abs().max().item())
    return errors


def _mask_subtest(rank: int, world: int, variant, layout, options, q_factor, lengths, segments):
    """Max abs errors of this rank's shards against the float64 dense reference of the global
    positions (``ring_cases``): every structured mask, both variants and layouts."""
    from memory_efficient_attention.distributed.torch import ring_attention, to_zigzag

    from .ring_cases import dense, inputs, keep_mask

    arrays, ints = inputs(world, 12, q_factor, lengths, segments)
    q, k, v, d_out = (torch.as_tensor(arrays[x]) for x in ("q", "k", "v", "d_out"))
    keep = torch.as_tensor(keep_mask(options, q.shape[1], k.shape[1], ints))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = dense(torch, *leaves, keep, options.get("logits_soft_cap"))
    ref_grads = torch.autograd.grad(ref, leaves, d_out)

    def shard(x, dim=-3):
        x = to_zigzag(x, world, dim=dim) if layout == "zigzag" else x
        return x.chunk(world, dim=dim)[rank]

    given = {n: torch.as_tensor(x) for n, x in ints.items()}
    for name in ("query_segment_ids", "key_segment_ids"):
        if name in given:
            given[name] = shard(given[name], dim=-1)
    local = [shard(x).clone().requires_grad_(True) for x in (q, k, v)]
    out = ring_attention(
        *local, layout=layout, variant=variant, query_chunk_size=8, key_chunk_size=8, **options, **given
    )
    grads = torch.autograd.grad(out, local, shard(d_out))
    errors = [(out - shard(ref)).abs().max().item()]
    return errors + [(g - shard(r)).abs().max().item() for g, r in zip(grads, ref_grads)]


def _record(results: dict, name: str, fn, *args) -> None:
    try:
        results[name] = fn(*args)
    except Exception as err:  # reported to the parent, which fails the test
        results[name] = f"{type(err).__name__}: {err}"
        raise


def _worker(rank: int, world: int, results: dict) -> None:
    for name, *args in SUBTESTS:
        _record(results, name, _subtest, rank, world, *args)
    for name, kwargs, kv_heads, segments in ULYSSES_SUBTESTS:
        _record(results, name, _ulysses_subtest, rank, world, kwargs, kv_heads, segments)
    for name, *args in MASK_CASES:
        _record(results, name, _mask_subtest, rank, world, *args)
    results["bf16-error-ratio"] = [_bf16_ratio(rank, world)]
    # A subgroup of two ranks forms its own ring (the others skip it, as collectives require).
    sub = dist.new_group([0, 1])
    if rank in (0, 1):
        from memory_efficient_attention.distributed.torch import ring_attention

        gen = torch.Generator().manual_seed(7)
        q, k, v = torch.randn(3, 1, 8, 2, 4, dtype=torch.float64, generator=gen).unbind(0)
        out = ring_attention(q.chunk(2, 1)[rank], k.chunk(2, 1)[rank], v.chunk(2, 1)[rank], group=sub)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
        results["subgroup"] = [(out - ref.chunk(2, 1)[rank]).abs().max().item()]


@pytest.fixture(scope="module")
def ring_results(tmp_path_factory):
    return run_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("ring")))


def test_bf16_ring_error_does_not_grow_with_ranks(ring_results):
    for rank in range(WORLD):
        (ratio,) = ring_results[rank]["bf16-error-ratio"]
        assert ratio < 1.02, f"rank {rank}: bfloat16 ring error {ratio:.3f}x the single process's"


@pytest.mark.parametrize("name", [s[0] for s in SUBTESTS + ULYSSES_SUBTESTS + MASK_CASES] + ["subgroup"])
def test_ring_matches_single_process(ring_results, name):
    ranks = (0, 1) if name == "subgroup" else range(WORLD)
    for rank in ranks:
        errors = ring_results[rank][name]
        assert not isinstance(errors, str), f"rank {rank}: {errors}"
        assert max(errors) < TOL, f"rank {rank}: max errors (out, dq, dk, dv) {errors}"


def test_needs_an_initialised_process_group():
    from memory_efficient_attention.distributed.torch import ring_attention

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(AttentionInputError, match="init_process_group"):
        ring_attention(q, q, q)


def test_zigzag_helpers_round_trip():
    from memory_efficient_attention.distributed.torch import from_zigzag, to_zigzag

    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3, 1)
    z = to_zigzag(x, 3)
    assert z[:, :4].equal(x[:, :4]) and z[:, 4:8].equal(x[:, 20:24])  # rank 0: chunks 0 and 5
    assert from_zigzag(z, 3).equal(x)
    with pytest.raises(AttentionInputError, match="multiple of 6"):
        to_zigzag(torch.zeros(1, 10, 1, 1), 3)


def test_ulysses_argument_checks():
    from memory_efficient_attention.distributed._plan import ulysses_repeat
    from memory_efficient_attention.distributed.torch import ulysses_attention

    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['mask'\\]"):
        ulysses_attention(q, q, q, mask=None)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ulysses_attention(q, q, q)
    assert ulysses_repeat((1, 4, 8, 8), (1, 4, 2, 8), 4, "ranks") == 2
    with pytest.raises(AttentionInputError, match="query has 6 heads .* multiple of the 4 ranks"):
        ulysses_repeat((1, 4, 6, 8), (1, 4, 2, 8), 4, "ranks")
    with pytest.raises(AttentionInputError, match="key/value have 3 heads"):
        ulysses_repeat((1, 4, 12, 8), (1, 4, 3, 8), 4, "ranks")
