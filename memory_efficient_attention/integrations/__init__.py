"""Adapters that plug memory-efficient attention into the libraries people already run.

* ``memory_efficient_attention.integrations.transformers``: Hugging Face transformers (v5),
  ``register()`` then ``attn_implementation="memory_efficient"``.
* ``memory_efficient_attention.integrations.flax``: ``dot_product_attention``, an
  ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and
  ``flax.nnx.MultiHeadAttention``.

Importing this package imports no framework; each submodule imports its own when it is
imported itself (``tests/test_integrations_*.py`` check this in a fresh interpreter).
"""

from __future__ import annotations

__all__: list[str] = []
