"""Context parallelism for Hugging Face transformers (v5): every rank runs the model on its shard of
the sequence and the attention layers exchange keys and values with ``ring_attention``.

The recipe (every rank, under ``torchrun``; gloo on CPU, NCCL on CUDA)::

    import torch.distributed as dist
    from memory_efficient_attention.integrations.context_parallel import register, shard_sequence

    dist.init_process_group("gloo")
    name = register(layout="zigzag")                   # an attn_implementation name
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    ids, positions, labels = shard_sequence(input_ids, labels=labels, layout="zigzag")
    logits = model(input_ids=ids, position_ids=positions).logits  # this rank's shard
    loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100)
    loss.backward()                                    # the ring runs backwards too
    # then all-reduce (sum) the parameter gradients over the group, as data parallelism does

Position ids carry each token's global position (RoPE), labels are shifted on the global sequence
before sharding (a shard's last token predicts the next shard's first), and the attention of every
layer is causal over the global sequence (with the model's sliding window, if any). Memory per
rank is O(N / W) for a global length ``N`` on ``W`` ranks.

What it does not take: padding (pack the batch instead; an ``attention_mask`` with a padded
token raises), dropout while training, attention sinks, position biases; the model's own mask
functions (packed sequences detected from position ids, bidirectional prefixes) are not applied,
only causal attention and the sliding window.

Shape legend: ``B`` batch, ``N`` global length, ``W`` ranks, ``H``/``K`` query/key-value heads,
``D`` depth.
"""

from __future__ import annotations

from .._require import require

require("torch", "torch", __name__)
require("transformers", "transformers", __name__)

from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from ..distributed import LAYOUTS, VARIANTS  # noqa: E402
from ..distributed.torch import ring_attention, to_zigzag  # noqa: E402

__all__ = ["attention_forward", "register", "shard_sequence"]

IGNORE_INDEX = -100  # the label transformers' losses skip


def _no_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> None:
    """The mask function of the context-parallel implementation: no mask tensor (the ring builds
    the causal mask from global positions); padding is refused rather than lost."""
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise ValueError(
            "context-parallel attention takes no padding: the attention_mask has padded tokens "
            "(pack the sequences into one instead)"
        )
    return None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    variant: str = "ring",
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: ``ring_attention`` of this rank's shard.

    Args:
      query: ``[B, H, N/W, D]``; key, value: ``[B, K, N/W, D]`` (this rank's positions).
      attention_mask: ignored (``register``'s mask function returns None; see the module doc).
      dropout: must be 0 while the module trains (the ring has no dropout).
      scaling, softcap: the score scale and soft cap.
      sliding_window: the model's window: a query sees the ``sliding_window`` latest keys.
      group, layout, variant: the ring's (bound by ``register``).

    Returns:
      ``(out [B, N/W, H, D], None)``.
    """
    if dropout and getattr(module, "training", False):
        raise NotImplementedError("context-parallel attention has no dropout: set attention_dropout=0")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"context-parallel attention does not take {name}")
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out = ring_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), group=group,
        is_causal=bool(getattr(module, "is_causal", True)), layout=layout, variant=variant,
        scale=scaling, local_window_size=window, logits_soft_cap=softcap,
    )  # fmt: skip
    return out, None


def register(
    name: str = "memory_efficient_context_parallel",
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    variant: str = "ring",
) -> str:
    """Register context-parallel attention over ``group`` with transformers; returns ``name``
    (pass it as ``attn_implementation``). Feed each rank its shard from ``shard_sequence`` with
    the same ``layout``.

    Example::

        >>> from memory_efficient_attention.integrations.context_parallel import register
        >>> register(layout="zigzag")
        'memory_efficient_context_parallel'
    """
    if layout not in LAYOUTS or variant not in VARIANTS:
        raise ValueError(
            f"layout must be one of {LAYOUTS} and variant one of {VARIANTS}, got {layout!r}, {variant!r}"
        )
    fn = partial(attention_forward, group=group, layout=layout, variant=variant)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)
    return name


def shard_sequence(
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    layout: str = "zigzag",
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's shard of a batch ``[B, N]``: ``(input_ids, position_ids, labels)``.

    ``N`` must divide into ``W`` parts (``2W`` for ``"zigzag"``). ``labels`` (``[B, N]``, as
    given to a causal LM: the token itself) are shifted on the global sequence first, so each
    shard's targets are the next tokens (the last position's is ``-100``); None if not given.

    Example (one rank)::

        >>> import torch, torch.distributed as dist
        >>> from memory_efficient_attention.integrations.context_parallel import shard_sequence
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> tokens = torch.arange(4)[None] + 10
        >>> ids, pos, labels = shard_sequence(tokens, labels=tokens)
        >>> ids.tolist(), pos.tolist(), labels.tolist()
        ([[10, 11, 12, 13]], [[0, 1, 2, 3]], [[11, 12, 13, -100]])
        >>> dist.destroy_process_group()
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    if labels is not None:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)

    def shard(x):
        if x is None:
            return None
        x = to_zigzag(x, world, dim=1) if layout == "zigzag" else x
        return x.chunk(world, dim=1)[rank].contiguous()

    return shard(input_ids), shard(positions), shard(labels)
