"""``CallOptions``: the frozen, framework-neutral description of a call's static options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from memory_efficient_attention._config import (
    ArrayShapes,
    CallArrays,
    CallOptions,
    make_config,
    split_arguments,
)
from memory_efficient_attention._spec import AttentionInputError, seed_dims

DIMS = seed_dims((2, 7, 4, 5), (2, 6, 2, 5), (2, 6, 2, 3))


def test_options_are_frozen_and_hashable():
    options = CallOptions(is_causal=True, local_window_size=3, query_chunk_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.is_causal = False  # type: ignore[misc]
    assert hash(options) == hash(CallOptions(is_causal=True, local_window_size=(3, 3), query_chunk_size=4))
    assert len({options, CallOptions(is_causal=True, local_window_size=[3, 3], query_chunk_size=4)}) == 1


def test_options_are_normalised():
    options = CallOptions(
        scale=np.float32(0.5),
        query_chunk_size=np.int64(8),
        local_window_size=[2, 1],
        logits_soft_cap=30,
        dropout_rate=0,
    )
    assert options.scale == 0.5 and type(options.scale) is float
    assert options.query_chunk_size == 8 and type(options.query_chunk_size) is int
    assert options.local_window_size == (2, 1)
    assert options.logits_soft_cap == 30.0 and type(options.logits_soft_cap) is float
    assert options.dropout_rate == 0.0 and type(options.dropout_rate) is float
    assert CallOptions().scale is None  # the default 1/sqrt(D) is resolved with the shapes


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(is_causal=1), "is_causal must be a bool"),
        (dict(causal_alignment="left"), "causal_alignment must be 'top_left' or 'bottom_right'"),
        (dict(local_window_size=True), "local_window_size must be an int or (left, right)"),
        (dict(local_window_size="ab"), "local_window_size must be an int or a pair"),
        (dict(query_chunk_size=0), "query_chunk_size must be a positive int or None"),
        (dict(key_chunk_size=2.5), "key_chunk_size must be a positive int or None"),
        (dict(memory_budget="lots"), "memory_budget must be bytes or a string like"),
        (dict(mask_fill="zero"), "mask_fill must be one of"),
        (dict(scale="x"), "scale must be a real number or None"),
        (dict(scale=float("nan")), "scale must be finite"),
        (dict(logits_soft_cap=-1.0), "logits_soft_cap must be a positive finite float or None"),
        (dict(logits_soft_cap=float("inf")), "logits_soft_cap=inf is not a cap"),
        (dict(dropout_rate=1.0), "dropout rate must be a float in [0, 1)"),
    ],
)
def test_options_validate_like_the_public_functions(kwargs, words):
    with pytest.raises(AttentionInputError) as built:
        CallOptions(**kwargs)
    assert words in str(built.value)
    with pytest.raises(AttentionInputError) as keywords:
        make_config(DIMS, "float32", **kwargs)  # the keyword form builds the same object
    assert str(keywords.value) == str(built.value)


def test_public_functions_raise_the_same_messages():
    torch = pytest.importorskip("torch")
    from memory_efficient_attention.torch import efficient_dot_product_attention

    q, k, v = torch.zeros(2, 7, 4, 5), torch.zeros(2, 6, 2, 5), torch.zeros(2, 6, 2, 3)
    for kwargs in (dict(is_causal=1), dict(dropout_rate=2.0), dict(logits_soft_cap=0.0)):
        with pytest.raises(AttentionInputError) as public:
            efficient_dot_product_attention(q, k, v, **kwargs)
        with pytest.raises(AttentionInputError) as built:
            CallOptions(**kwargs)
        assert str(public.value) == str(built.value)


def test_equal_options_give_equal_configs():
    a = CallOptions(is_causal=True, local_window_size=2, query_chunk_size=3, key_chunk_size=4, scale=0.25)
    b = CallOptions(
        is_causal=True, local_window_size=(2, 2), query_chunk_size=3, key_chunk_size=4, scale=0.25
    )
    assert a == b
    shapes = ArrayShapes(kv_lengths=(2,))
    cfg_a = make_config(DIMS, "float32", a, "cpu", shapes)
    cfg_b = make_config(DIMS, "float32", b, "cpu", ArrayShapes(kv_lengths=(2,)))
    assert cfg_a == cfg_b and hash(cfg_a) == hash(cfg_b)
    keywords = make_config(
        DIMS, "float32", is_causal=True, local_window_size=2, query_chunk_size=3, key_chunk_size=4, scale=0.25
    )
    assert keywords == make_config(DIMS, "float32", a)
    assert make_config(DIMS, "float32", CallOptions(is_causal=False)) != make_config(DIMS, "float32", a)


def test_config_reads_the_options():
    options = CallOptions(mask_fill="exclude", logits_soft_cap=5.0, dropout_rate=0.1, query_chunk_size=3)
    cfg = make_config(DIMS, "float32", options)
    assert (cfg.mask_fill, cfg.softcap, cfg.dropout, cfg.q_chunk) == ("exclude", 5.0, 0.1, 3)
    assert cfg.scale == pytest.approx(1 / np.sqrt(DIMS.qk_depth))
    with pytest.raises(TypeError):
        make_config(DIMS, "float32", options, is_causal=True)


def test_shapes_are_checked_by_make_config():
    with pytest.raises(AttentionInputError, match="key_value_seq_lengths has shape"):
        make_config(DIMS, "float32", CallOptions(), "cpu", ArrayShapes(kv_lengths=(3,)))
    with pytest.raises(AttentionInputError, match="go together"):
        make_config(DIMS, "float32", CallOptions(), "cpu", ArrayShapes(q_segments=(2, 7)))
    with pytest.raises(AttentionInputError, match="mask_mod must be callable"):
        make_config(DIMS, "float32", CallOptions(), "cpu", None, mask_mod=3)


def test_split_arguments():
    lengths = np.array([3, 6])
    options, arrays, rest = split_arguments(
        dict(is_causal=True, key_value_seq_lengths=lengths, score_mod=abs, operand_names=("a", "b"))
    )
    assert options == CallOptions(is_causal=True)
    assert arrays.key_value_seq_lengths is lengths and arrays.mask is None
    assert arrays.shapes() == ArrayShapes(kv_lengths=(2,))
    assert rest == dict(score_mod=abs, operand_names=("a", "b"))
    assert CallArrays().shapes() == ArrayShapes()
