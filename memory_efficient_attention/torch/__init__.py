"""PyTorch: memory-efficient exact attention (``efficient_dot_product_attention``) and a drop-in
for ``torch.nn.functional.scaled_dot_product_attention``."""

from .._require import require

require("torch", "torch", __name__)

from ._api import efficient_dot_product_attention, explain, scaled_dot_product_attention  # noqa: E402

__all__ = ["efficient_dot_product_attention", "explain", "scaled_dot_product_attention"]
