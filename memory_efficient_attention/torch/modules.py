"""``torch.nn`` layers built on memory-efficient attention.

Shape legend: ``B...`` batch dims, ``L`` query length, ``S`` key length, ``C`` embedding
(``embed_dim``), ``H`` query heads, ``K`` key/value heads (``H % K == 0``), ``D`` head depth.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._spec import AttentionInputError
from ..masks import alibi_score_mod, alibi_slopes
from ._api import efficient_dot_product_attention

__all__ = ["MultiheadAttention", "apply_rotary"]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (RoFormer; the "rotate half" layout of Llama/GPT-NeoX).

    Args:
      x: ``[B..., L, H, D]`` with ``D`` even.
      positions: integer ``[L]`` or ``[B..., L]``.
      base: the frequency base.

    Returns:
      ``[B..., L, H, D]``: channel pairs ``(i, i + D/2)`` rotated by ``position * base^(-2i/D)``.

    Example::

        >>> x = torch.randn(2, 5, 4, 8)
        >>> y = apply_rotary(x, torch.arange(5))
        >>> bool(torch.allclose(y[:, 0], x[:, 0]))  # position 0 is not rotated
        True
    """
    d = x.shape[-1]
    if d % 2:
        raise AttentionInputError(f"rotary embeddings need an even head depth, got {d}")
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)  # [D/2]
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [..., L, D/2]
    angles = torch.cat([angles, angles], dim=-1)[..., None, :]  # [..., L, 1, D]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class MultiheadAttention(nn.Module):
    """Multi-head attention whose attention never holds an ``L x S`` tensor, forward or backward.

    Projects the inputs to ``H`` query and ``K`` key/value heads (grouped-query attention when
    ``K < H``; K/V are not repeated), optionally rotates queries and keys (rotary) or adds ALiBi
    biases (through ``score_mod``), attends with ``efficient_dot_product_attention`` and projects
    back to ``C``.

    Args:
      embed_dim: ``C``, the input and output width.
      num_heads: ``H``.
      num_kv_heads: ``K`` (default ``H``); must divide ``H``.
      head_dim: ``D`` (default ``C // H``).
      kv_dim: width of the key/value input for cross-attention (default ``C``).
      bias: whether the projections have biases.
      is_causal: top-left causal masking (a query sees keys at or before its position).
      rotary: apply rotary embeddings to queries and keys (``rotary_base`` their frequency base).
      alibi: add ALiBi position biases ``slope_h * (k - q)`` (slopes from ``alibi_slopes``).
      dropout: dropout rate on the attention probabilities while training.
      query_chunk_size, key_chunk_size, memory_budget: passed to the kernel.
      device, dtype: of the parameters.

    Example::

        >>> import torch
        >>> from memory_efficient_attention.torch.modules import MultiheadAttention
        >>> layer = MultiheadAttention(64, num_heads=8, num_kv_heads=2, is_causal=True, rotary=True)
        >>> x = torch.randn(2, 100, 64)
        >>> layer(x).shape
        torch.Size([2, 100, 64])
        >>> lengths = torch.tensor([100, 37])  # padded batch
        >>> layer(x, key_value_seq_lengths=lengths).shape
        torch.Size([2, 100, 64])
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        bias: bool = False,
        is_causal: bool = False,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        alibi: bool = False,
        dropout: float = 0.0,
        query_chunk_size: int | None = None,
        key_chunk_size: int | None = None,
        memory_budget: int | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise AttentionInputError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        if head_dim is None:
            if embed_dim % num_heads:
                raise AttentionInputError(
                    f"embed_dim ({embed_dim}) is not divisible by num_heads ({num_heads}): pass head_dim"
                )
            head_dim = embed_dim // num_heads
        if rotary and head_dim % 2:
            raise AttentionInputError(f"rotary embeddings need an even head_dim, got {head_dim}")
        if not 0.0 <= dropout < 1.0:
            raise AttentionInputError(f"dropout must be in [0, 1), got {dropout}")
        kv_dim = embed_dim if kv_dim is None else kv_dim
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = (
            embed_dim, num_heads, num_kv_heads, head_dim
        )  # fmt: skip
        self.is_causal, self.rotary, self.rotary_base, self.dropout = is_causal, rotary, rotary_base, dropout
        self.chunking = {
            "query_chunk_size": query_chunk_size,
            "key_chunk_size": key_chunk_size,
            "memory_budget": memory_budget,
        }
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(kv_dim, num_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)
        slopes = torch.tensor(alibi_slopes(num_heads), device=device, dtype=torch.float32) if alibi else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, is_causal={self.is_causal}, rotary={self.rotary}, "
            f"alibi={self.alibi_slopes is not None}, dropout={self.dropout}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor | None = None,
        *,
        query_positions: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        query_seq_lengths: torch.Tensor | None = None,
        key_value_seq_lengths: torch.Tensor | None = None,
        query_segment_ids: torch.Tensor | None = None,
        key_segment_ids: torch.Tensor | None = None,
        mask_mod: Callable | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Attend from ``query`` to ``key_value`` (default: to itself).

        Args:
          query: ``[B..., L, C]``.
          key_value: ``[B..., S, kv_dim]`` for cross-attention, or None for self-attention.
          query_positions, key_positions: integer ``[L]`` / ``[S]`` (or with batch dims) for the
            rotary embeddings; default ``arange``.
          query_seq_lengths, key_value_seq_lengths: integer ``[B...]``: padding at and past
            the length is excluded (padded query rows output the output projection's bias).
          query_segment_ids, key_segment_ids: integer ``[B..., L]`` / ``[B..., S]``: packed
            documents (a query sees keys of its own segment).
          mask_mod: an extra ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
          generator: the dropout generator (default: torch's global one).

        Returns:
          ``[B..., L, C]``.
        """
        key_value = query if key_value is None else key_value
        batch, length, kv_length = query.shape[:-2], query.shape[-2], key_value.shape[-2]
        q = self.q_proj(query).unflatten(-1, (self.num_heads, self.head_dim))  # [B..., L, H, D]
        k = self.k_proj(key_value).unflatten(-1, (self.num_kv_heads, self.head_dim))  # [B..., S, K, D]
        v = self.v_proj(key_value).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rotary:
            if query_positions is None:
                query_positions = torch.arange(length, device=query.device)
            if key_positions is None:
                key_positions = torch.arange(kv_length, device=query.device)
            q = apply_rotary(q, query_positions, self.rotary_base)
            k = apply_rotary(k, key_positions, self.rotary_base)
        score_mod = None if self.alibi_slopes is None else alibi_score_mod(self.alibi_slopes)
        out = efficient_dot_product_attention(
            q,
            k,
            v,
            is_causal=self.is_causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            query_segment_ids=query_segment_ids,
            key_segment_ids=key_segment_ids,
            score_mod=score_mod,
            mask_mod=mask_mod,
            dropout_rate=self.dropout if self.training else 0.0,
            generator=generator,
            **self.chunking,
        )  # [B..., L, H, D]
        return self.out_proj(out.reshape(*batch, length, self.num_heads * self.head_dim))
