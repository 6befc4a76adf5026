"""Packed documents across devices (``distributed.documents``): the work model against a brute-force
count of causal pairs from segment ids, the balancing search, and the token gather."""

from __future__ import annotations

import numpy as np
import pytest

from memory_efficient_attention import AttentionInputError
from memory_efficient_attention.distributed import (
    balance_documents,
    device_work,
    token_order,
    zigzag_permutation,
)


def _brute_force(lengths, world, layout, window):
    """Pairs per device from the dense same-document causal mask of the packed sequence."""
    ids = np.repeat(np.arange(len(lengths)), lengths)
    n = ids.size
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    keep = (ids[:, None] == ids[None, :]) & (k <= q)
    if window is not None:
        keep &= k >= q - window
    rows = keep.sum(1)
    if layout == "zigzag":
        rows = rows[zigzag_permutation(n, world)]
    return rows.reshape(world, -1).sum(1)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("window", [None, 5])
def test_device_work_counts_the_causal_pairs(layout, window):
    rng = np.random.default_rng(3)
    for world in (1, 2, 3):
        lengths = rng.integers(1, 20, size=9)
        parts = world * (2 if layout == "zigzag" else 1)
        lengths[-1] += (-lengths.sum()) % parts
        got = device_work(lengths, world, layout=layout, window=window)
        np.testing.assert_array_equal(got, _brute_force(lengths, world, layout, window))


def test_balance_documents_evens_out_a_skewed_pack():
    rng = np.random.default_rng(0)
    lengths = np.maximum(16, rng.lognormal(6.5, 1.0, 200).astype(int))
    lengths[-1] += (-lengths.sum()) % 8
    natural = device_work(lengths, 8)
    order = balance_documents(lengths, 8)
    balanced = device_work(lengths[order], 8)
    assert natural.max() / natural.mean() > 1.3
    assert balanced.max() / balanced.mean() < 1.01
    assert balanced.sum() == natural.sum()  # the same work, spread
    np.testing.assert_array_equal(order, balance_documents(lengths, 8))  # deterministic


def test_token_order_keeps_each_document_whole_and_in_order():
    lengths = [3, 1, 4, 2]
    idx = token_order(lengths, [2, 0, 3, 1])
    ids = np.repeat(np.arange(4), lengths)
    assert ids[idx].tolist() == [2, 2, 2, 2, 0, 0, 0, 3, 3, 1]
    assert idx.tolist() == [4, 5, 6, 7, 0, 1, 2, 8, 9, 3]
    with pytest.raises(AttentionInputError, match="permutation"):
        token_order(lengths, [0, 0, 1, 2])


def test_bad_packs_are_refused():
    with pytest.raises(AttentionInputError, match="cannot split into 4 equal parts"):
        device_work([3, 4], 2, layout="zigzag")
    with pytest.raises(AttentionInputError, match="positive"):
        balance_documents([3, 0, 1], 2)
