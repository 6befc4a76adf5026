"""PyTorch: memory-efficient exact attention (``efficient_dot_product_attention``) and a drop-in
for ``torch.nn.functional.scaled_dot_product_attention``."""

from ._api import efficient_dot_product_attention, scaled_dot_product_attention

__all__ = ["efficient_dot_product_attention", "scaled_dot_product_attention"]
