"""Hugging Face transformers (v5): memory-efficient attention as an ``attn_implementation``.

The two lines a user writes::

    from memory_efficient_attention.integrations.transformers import register
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())

``register`` adds ``attention_forward`` to ``transformers.AttentionInterface`` and
``structured_mask`` to ``transformers.AttentionMaskInterface`` under one name. The mask function
returns a ``StructuredAttentionMask``: a small description (pattern, offsets, the 2-D padding
mask) instead of a ``B x 1 x L x S`` tensor, and ``attention_forward`` turns it into the kernel's
structured arguments (``is_causal``, ``local_window_size``, segment ids), so long contexts stay
O(n) in memory, forward and backward.

Shape legend: ``B`` batch, ``H`` query heads, ``K`` key/value heads (``H % K == 0``; K/V are never
repeated), ``L`` query length, ``S`` key length, ``D`` query/key depth, ``E`` value depth.

Semantics follow ``attn_implementation="sdpa"``: masked keys are excluded, so a query row whose
every key is masked (left padding) outputs 0 where ``"eager"`` averages the values; the rows of
real tokens agree with both.

Example::

    >>> import torch, transformers
    >>> from memory_efficient_attention.integrations.transformers import register
    >>> name = register()
    >>> config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
    ...     attn_implementation=name)
    >>> model = transformers.LlamaForCausalLM(config).eval()
    >>> ids = torch.randint(0, 100, (2, 10))
    >>> logits = model(ids, attention_mask=torch.ones_like(ids)).logits
    >>> model.set_attn_implementation("eager")
    >>> bool(torch.allclose(logits, model(ids).logits, atol=1e-5))
    True
"""

from __future__ import annotations

from .._require import require

require("torch", "torch", __name__)
require("transformers", "transformers", __name__)

from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers import masking_utils as hf_masks  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from .._spec import heads_first_dims  # noqa: E402
from ..torch import kernel  # noqa: E402

__all__ = ["StructuredAttentionMask", "attention_forward", "register", "structured_mask"]


def _closure(fn: Callable) -> dict[str, Any]:
    """The free variables a closure captured, by name (empty for a plain function)."""
    cells = getattr(fn, "__closure__", None) or ()
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in cells)))


def _is_overlay(fn: Callable, factory: Callable) -> bool:
    return getattr(fn, "__qualname__", "") == f"{factory.__name__}.<locals>.inner_mask"


def _recognize(mask_function: Callable) -> tuple[str, int | None] | None:
    """The known pattern of one of transformers' mask functions, as ``(kind, window)``, or None.

    Kinds: ``"causal"``, ``"full"`` (bidirectional), ``"sliding_causal"`` (``kv > q - w``,
    ``kv <= q``), ``"sliding_full"`` (``|q - kv| <= w``). Anything else (packed sequences,
    ``or_mask_function`` overlays, ...) is evaluated chunk by chunk as a ``mask_mod``.
    """
    if mask_function is hf_masks.causal_mask_function:
        return "causal", None
    if mask_function is hf_masks.bidirectional_mask_function:
        return "full", None
    parts = _closure(mask_function).get("mask_functions")
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask" or not parts:
        return None
    parts = tuple(parts)
    if len(parts) != 2:
        return None
    overlay, base = parts
    window = _closure(overlay).get("sliding_window")
    if not isinstance(window, int):
        return None
    if base is hf_masks.causal_mask_function and _is_overlay(overlay, hf_masks.sliding_window_overlay):
        return "sliding_causal", window
    if base is hf_masks.bidirectional_mask_function and _is_overlay(
        overlay, hf_masks.sliding_window_bidirectional_overlay
    ):
        return "sliding_full", window
    return None


@dataclass(frozen=True, eq=False)
class StructuredAttentionMask:
    """A ``[B, 1, L, S]`` boolean attention mask that is never materialised.

    Keeps the pair (query ``i``, key ``j``) iff
    ``mask_function(b, 0, i + q_offset, j + kv_offset)`` and ``padding_mask[b, j + kv_offset]``,
    exactly as ``transformers.masking_utils.sdpa_mask`` would. ``to_dense()`` builds that tensor
    (for debugging); ``kernel_arguments()`` gives the structured arguments of our kernel.

    Attributes:
      batch_size, q_length, kv_length: ``B``, ``L``, ``S``.
      q_offset, kv_offset: absolute position of the first query / key (a KV cache).
      mask_function: transformers' ``mask_function(batch_idx, head_idx, q_idx, kv_idx)``.
      padding_mask: bool ``[B, >= kv_offset + S]`` (True = real token) or None.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    mask_function: Callable
    padding_mask: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    # Tensor-like rank: transformers reads ``attention_mask.ndim`` to tell a 2-D padding mask from
    # a prepared 4-D one (``generate`` builds the masks ahead with static caches and passes them
    # back into the model's forward); ``structured_mask`` then returns such a mask unchanged.
    ndim = 4

    def dim(self) -> int:
        return 4

    def __repr__(self) -> str:
        pattern = _recognize(self.mask_function)
        kind = "custom mask_function" if pattern is None else f"{pattern[0]}, window={pattern[1]}"
        return (
            f"StructuredAttentionMask(B={self.batch_size}, L={self.q_length}, S={self.kv_length}, "
            f"q_offset={self.q_offset}, kv_offset={self.kv_offset}, {kind}, "
            f"padding={'no' if self.padding_mask is None else 'yes'})"
        )

    def to_dense(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The bool ``[B, 1, L, S]`` mask ``sdpa_mask`` would build (True = attend)."""
        if device is None:
            device = "cpu" if self.padding_mask is None else self.padding_mask.device
        return hf_masks.sdpa_mask(
            batch_size=self.batch_size,
            q_length=self.q_length,
            kv_length=self.kv_length,
            q_offset=self.q_offset,
            kv_offset=self.kv_offset,
            mask_function=self.mask_function,
            attention_mask=self.padding_mask,
            allow_is_causal_skip=False,
            device=device,
        )

    def _key_padding(self) -> torch.Tensor | None:
        """``[B, S]`` bool (True = real token) of the keys of this call, or None."""
        if self.padding_mask is None:
            return None
        pad = hf_masks.prepare_padding_mask(self.padding_mask, self.kv_length, self.kv_offset)
        return pad[:, self.kv_offset : self.kv_offset + self.kv_length]

    def kernel_arguments(self, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of the kernel that reproduce this mask without an ``L x S`` tensor.

        Causal and sliding-window patterns become ``is_causal``/``local_window_size`` (the
        kernel then skips blocks with no kept pair); padding becomes segment ids (queries in
        segment 0, real keys 0, padded keys -1); other mask functions become a ``mask_mod``.
        """
        L, S = self.q_length, self.kv_length
        a = int(self.q_offset) - int(self.kv_offset)  # the diagonal: key q + a faces query q
        args: dict[str, Any] = {}
        pattern = _recognize(self.mask_function)
        if pattern is None:
            fn, qo, ko = self.mask_function, int(self.q_offset), int(self.kv_offset)

            def mask_mod(b, h, q_idx, kv_idx):
                return fn(b, torch.zeros_like(h), q_idx + qo, kv_idx + ko)

            args["mask_mod"] = mask_mod
        else:
            kind, w = pattern
            if kind == "causal" and a == 0:
                args.update(is_causal=True, causal_alignment="top_left")
            elif kind == "causal" and a == S - L:
                args.update(is_causal=True, causal_alignment="bottom_right")
            elif kind == "causal":
                args["local_window_size"] = (L + S + abs(a), a)
            elif kind == "sliding_causal":  # kv > q + a - w and kv <= q + a
                args["local_window_size"] = (w - 1 - a, a)
            elif kind == "sliding_full":  # |q + a - kv| <= w
                args["local_window_size"] = (w - a, w + a)
        pad = self._key_padding()
        if pad is not None:
            pad = pad.to(device)
            args["query_segment_ids"] = torch.zeros(pad.shape[0], L, dtype=torch.int32, device=device)
            args["key_segment_ids"] = pad.to(torch.int32) - 1  # real keys 0, padding -1
        return args


def structured_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = hf_masks.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> StructuredAttentionMask:
    """An ``AttentionMaskInterface`` function: ``sdpa_mask``'s signature, a lazy result.

    Args:
      batch_size, q_length, kv_length, q_offset, kv_offset, mask_function: as in
        ``transformers.masking_utils.sdpa_mask``.
      attention_mask: the 2-D padding mask ``[B, kv_offset + S]`` (True or 1 = real token).
      kwargs: the rest of what transformers passes (``local_size``, ``allow_is_causal_skip``,
        ``dtype``, ``config``, ``device``, ``use_vmap``...): not needed.

    Returns:
      A ``StructuredAttentionMask``; no ``L x S`` tensor is built. An ``attention_mask`` that is
      already a ``StructuredAttentionMask`` (a mask prepared ahead, as ``generate`` does with
      static caches) is returned as it is, as transformers returns a prepared 4-D tensor.
    """
    if isinstance(attention_mask, StructuredAttentionMask):
        if attention_mask.shape != (batch_size, 1, q_length, kv_length):
            raise ValueError(
                f"a prepared StructuredAttentionMask of shape {attention_mask.shape} was passed where "
                f"transformers expects a mask of shape {(batch_size, 1, q_length, kv_length)}"
            )
        return attention_mask
    if isinstance(q_offset, torch.Tensor):  # static caches pass a tensor offset
        q_offset = int(q_offset)
    if attention_mask is not None:
        attention_mask = attention_mask.to(torch.bool)
    return StructuredAttentionMask(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask
    )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: StructuredAttentionMask | torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An ``AttentionInterface`` function computed by our O(n)-memory kernel.

    Args:
      module: the calling attention module (``is_causal`` and ``training`` are read from it).
      query: ``[B, H, L, D]``.
      key: ``[B, K, S, D]``, value ``[B, K, S, E]`` (not repeated for grouped-query attention).
      attention_mask: a ``StructuredAttentionMask`` (from ``structured_mask``); a bool tensor
        broadcastable to ``[B, H, L, S]`` (True = attend; False keys are excluded); a float
        tensor added to the scores (eager's additive masks); or None: causal iff
        ``is_causal`` (else ``module.is_causal``) and ``L > 1``, top-left, as ``"sdpa"`` does.
      dropout: dropout rate on the probabilities; applied only while ``module.training``.
      scaling: score scale, default ``1/sqrt(D)``.
      sliding_window: used only when ``attention_mask`` is None (a mask already encodes it):
        a query sees the ``sliding_window`` latest keys up to itself.
      softcap: ``softcap * tanh(score / softcap)`` before masking (Gemma 2).
      is_causal: overrides ``module.is_causal`` when the mask is None.
      position_bias: float ``[B or 1, H, L, S]`` added to the scores (T5-style); gets a gradient.
      kwargs: ignored (``position_ids``, ...), except ``output_attentions`` (below) and
        attention sinks ``s_aux`` (gpt-oss: one logit per head in every row's softmax, with no
        value; forward and backward, the sinks' gradient included).

    Returns:
      ``(out [B, L, H, E], weights)``. ``weights`` is None unless the attention weights were
      asked for (``output_attentions=True`` given to the model's ``forward``, or
      ``config.output_attentions``): then the probabilities ``[B, H, L, S]`` in the query dtype,
      before dropout, computed key block by key block by the same kernel (an extra
      ``O(B * H * L * S)`` result, since the caller asked for it). They match ``"eager"``'s on
      every row with a key left; a row with no key left (left padding) is 0, not uniform.
    """
    kernel.check_qkv(query, key, value)
    dims = heads_first_dims(query.shape, key.shape, value.shape, enable_gqa=True)
    B, L, S = dims.batch_size, dims.q_len, dims.kv_len
    kh, g = dims.kv_heads, dims.groups
    mask = bias = None
    structure: dict[str, Any] = {}
    if isinstance(attention_mask, StructuredAttentionMask):
        structure = attention_mask.kernel_arguments(query.device)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        mask = attention_mask
    elif isinstance(attention_mask, torch.Tensor):
        bias = attention_mask.to(query.dtype)
    elif attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and L > 1
        structure["is_causal"] = causal
        if sliding_window is not None and S > sliding_window:
            right = 0 if causal or L == 1 else sliding_window - 1
            structure["local_window_size"] = (sliding_window - 1, right)
            structure["causal_alignment"] = "top_left" if L > 1 else "bottom_right"
    else:
        raise TypeError(
            "attention_mask must be a StructuredAttentionMask, a torch.Tensor or None, got "
            f"{type(attention_mask).__name__}"
        )
    if position_bias is not None:
        bias = position_bias if bias is None else bias + position_bias
    training = getattr(module, "training", True)
    q5 = query.reshape(B, kh, g, L, dims.qk_depth).transpose(2, 3).contiguous()
    k4 = key.reshape(B, kh, S, dims.qk_depth).contiguous()
    v4 = value.reshape(B, kh, S, dims.v_depth).contiguous()
    kernel_args: dict[str, Any] = dict(
        mask=mask,
        bias=bias,
        mask_fill="exclude",
        scale=scaling,
        logits_soft_cap=softcap,
        dropout_rate=float(dropout) if training else 0.0,
        sinks=kwargs.get("s_aux"),
    )
    kernel_args.update(structure)
    out, _ = kernel.attention(q5, k4, v4, dims, **kernel_args)  # [B, K, L, G, E]
    out = out.permute(0, 2, 1, 3, 4).reshape(B, L, dims.q_heads, dims.v_depth)
    weights = None
    if _attentions_requested(kwargs):
        weights = kernel.attention_weights(q5, k4, dims, **kernel_args)
    return out, weights


def _attentions_requested(kwargs: dict[str, Any]) -> bool:
    """Whether the caller asked for the attention weights.

    transformers v5 forwards ``output_attentions=True`` given to ``forward`` down to the attention
    function; ``config.output_attentions=True`` is not forwarded, but then its output collector
    (``transformers.utils.output_capturing``) is collecting ``attentions``.
    """
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers version: only the keyword argument counts
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and any(str(k).endswith("attentions") for k in collected)


def register(name: str = "memory_efficient", *, structured_masks: bool = True) -> str:
    """Register memory-efficient attention with transformers under ``name``; returns ``name``.

    Afterwards ``from_pretrained(..., attn_implementation=name)``,
    ``model.set_attn_implementation(name)`` and ``SomeConfig(..., attn_implementation=name)``
    select it. Registers ``attention_forward`` with ``AttentionInterface`` and a mask function
    with ``AttentionMaskInterface`` (without one, transformers passes no mask at all and padding
    is silently lost).

    Args:
      name: the ``attn_implementation`` name.
      structured_masks: True (default): masks are ``StructuredAttentionMask`` objects, O(n)
        memory. False: transformers' own ``sdpa_mask`` (dense ``[B, 1, L, S]`` bool tensors),
        for models that inspect or edit the mask tensor themselves.

    Example::

        >>> from memory_efficient_attention.integrations.transformers import register
        >>> register()
        'memory_efficient'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, structured_mask if structured_masks else hf_masks.sdpa_mask)
    return name
