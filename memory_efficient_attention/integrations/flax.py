"""Flax: an ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and
``flax.nnx.MultiHeadAttention`` computed in O(n) memory.

The two lines a user writes::

    from memory_efficient_attention.integrations.flax import dot_product_attention
    layer = nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=dot_product_attention)

Shape legend: ``B...`` batch dims, ``L`` query length, ``S`` key length, ``H`` query heads, ``K``
key/value heads (``H % K == 0``), ``D`` query/key depth, ``E`` value depth.

Semantics are Flax's: a mask entry keeps its score iff it is nonzero (``make_causal_mask`` and
``make_attention_mask`` return float32), masked scores become ``finfo(dtype).min`` (so a row with
every key masked averages the values), ``is_causal`` is top-left. The one difference: dropout
draws an independent keep mask per batch element and head even when ``broadcast_dropout=True``
(Flax shares one ``[L, S]`` mask across them); the kernel regenerates its keep mask chunk by
chunk and cannot broadcast it. Both are unbiased dropout at the same rate.
"""

from __future__ import annotations

from .._require import require

require("jax", "jax", __name__)

from typing import Any  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from ..jax import efficient_dot_product_attention  # noqa: E402

__all__ = ["dot_product_attention"]


def dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    broadcast_dropout: bool = True,
    dropout_rng: Any = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    is_causal: bool = False,
    *,
    query_chunk_size: int | None = None,
    key_chunk_size: int | None = None,
) -> Any:
    """Drop-in for ``flax.linen.dot_product_attention`` / ``flax.nnx.dot_product_attention``.

    Flax modules pass only the keyword arguments named here, so every one is explicit.

    Args:
      query: ``[B..., L, H, D]``.
      key: ``[B..., S, K, D]``; ``K < H`` (grouped-query, as ``nnx.MultiHeadAttention`` with
        ``num_kv_heads`` passes it) is computed without repeating K/V.
      value: ``[B..., S, K, E]``.
      bias: float, broadcastable to ``[B..., H, L, S]``, added to the scores.
      mask: broadcastable to ``[B..., H, L, S]``; nonzero / True keeps. Or a mask object of
        ``memory_efficient_attention.masks`` (``Causal() & Window(128)``...), planned as
        structured masks: their excluded keys leave the softmax (a row with none left outputs 0).
      broadcast_dropout: accepted; dropout is never broadcast (see the module docstring).
      dropout_rng: ``jax.random`` key for dropout.
      dropout_rate: dropout on the attention probabilities when not ``deterministic``.
      deterministic: True disables dropout.
      dtype: computation dtype; query, key and value are promoted to it (default: their
        common type).
      precision: ``jax.lax.Precision`` of the matmuls.
      module: must be None: sowing attention weights needs the ``L x S`` matrix this function
        never builds.
      force_fp32_for_softmax: accepted; the softmax always accumulates in float32 (float64 for
        float64 inputs).
      is_causal: top-left causal mask (``nnx``), combined with ``mask``.
      query_chunk_size, key_chunk_size: chunk sizes (default: chosen automatically); bind them
        with ``functools.partial``.

    Returns:
      ``[B..., L, H, E]`` in the computation dtype.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from memory_efficient_attention.integrations.flax import dot_product_attention
        >>> x = jax.random.normal(jax.random.key(0), (2, 10, 16))
        >>> mask = nn.make_causal_mask(jnp.ones((2, 10)))
        >>> ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=dot_product_attention)
        >>> ref = nn.MultiHeadDotProductAttention(num_heads=4)
        >>> params = ref.init(jax.random.key(1), x, mask=mask)
        >>> y = ours.apply(params, x, mask=mask)
        >>> bool(jnp.allclose(y, ref.apply(params, x, mask=mask), atol=1e-5))
        True
    """
    if module is not None:
        raise NotImplementedError(
            "sow_weights needs the L x S attention weights, which memory-efficient attention never "
            "builds; call the layer with sow_weights=False"
        )
    if dtype is None:
        dtype = jnp.result_type(query, key, value)
    query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
    from ..masks import Causal, Mask

    if isinstance(mask, Mask):  # a mask object: planned as structured masks (excluded keys)
        mask = mask & Causal() if is_causal else mask
        is_causal = False
    elif mask is not None:
        # Flax's rule: any nonzero entry keeps (make_causal_mask / make_attention_mask return
        # float32 0/1). The kernel takes this bool mask as given (it refuses float masks holding
        # other values than 0/1, which Flax would read as "keep").
        mask = jnp.asarray(mask) != 0
    if mask is not None and is_causal:
        # Flax folds causality into the dense mask (finfo.min fill): do the same, so that a row
        # the mask empties behaves exactly as in Flax.
        length, kv_length = query.shape[-3], key.shape[-3]
        mask = mask & jnp.tril(jnp.ones((length, kv_length), dtype=bool))
        is_causal = False
    if deterministic or dropout_rate == 0.0:
        dropout_rate, dropout_rng = 0.0, None
    return efficient_dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        bias=bias,
        precision=precision,
        query_chunk_size=query_chunk_size,
        key_chunk_size=key_chunk_size,
        is_causal=is_causal,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
