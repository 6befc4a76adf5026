"""JAX: memory-efficient exact attention (``efficient_dot_product_attention``) and a drop-in for
``jax.nn.dot_product_attention``."""

from .._require import require

require("jax", "jax", __name__)

from ._api import dot_product_attention, efficient_dot_product_attention  # noqa: E402

__all__ = ["dot_product_attention", "efficient_dot_product_attention"]
