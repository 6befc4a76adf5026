"""``torch.nn`` layers built on memory-efficient attention.

Shape legend: ``B`` batch, ``L`` query length, ``S`` key length, ``C`` embedding (``embed_dim``),
``H`` query heads, ``K`` key/value heads (``H % K == 0``), ``D`` head depth.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .._config import chunk_keep
from .._masks import StructuredMask
from .._spec import AttentionInputError, seed_dims
from ..masks import alibi_score_mod, alibi_slopes
from .kernel import attention as _attention

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


def _no_fused_transformer_path(module, args):
    """A no-op forward pre-hook: its presence turns off nn.TransformerEncoderLayer's fused path."""
    return None


def _mask_parts(name: str, m, dtype):
    """torch's mask convention -> (keep, bias): bool True = masked out; float = added."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
    if m.dtype == torch.bool:
        return ~m, None
    if not m.is_floating_point():
        raise AttentionInputError(f"{name} must be bool or floating point (as in torch), got dtype {m.dtype}")
    return None, m.to(dtype)


def _torch_masks(attn_mask, key_padding_mask, bsz, heads, tgt_len, src_len, extra, batched, dtype):
    """``attn_mask``/``key_padding_mask`` -> kernel ``mask`` (bool keep) and ``bias``, each
    broadcastable to ``[B, H, L, S + extra]`` (the appended keys are kept, bias 0)."""
    keeps, biases = [], []
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (tgt_len, src_len):
            shaped = attn_mask.view(1, 1, tgt_len, src_len)
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (
            bsz * heads if batched else heads,
            tgt_len,
            src_len,
        ):
            shaped = attn_mask.view(bsz, heads, tgt_len, src_len)
        else:
            three = (
                f"({bsz} * {heads}, {tgt_len}, {src_len}) = [B*num_heads, L, S]"
                if batched
                else (f"({heads}, {tgt_len}, {src_len}) = [num_heads, L, S]")
            )
            raise AttentionInputError(
                f"attn_mask has shape {tuple(attn_mask.shape)}, needs "
                f"({tgt_len}, {src_len}) = [L, S] or {three}"
            )
        keep, bias = _mask_parts("attn_mask", shaped, dtype)
        keeps.append(keep), biases.append(bias)
    if key_padding_mask is not None:
        want = (bsz, src_len) if batched else (src_len,)
        if tuple(key_padding_mask.shape) != want:
            raise AttentionInputError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, needs {want} = "
                + ("[B, S]" if batched else "[S] (unbatched)")
            )
        keep, bias = _mask_parts("key_padding_mask", key_padding_mask.view(-1, 1, 1, src_len), dtype)
        keeps.append(keep), biases.append(bias)
    keeps = [F.pad(x, (0, extra), value=True) for x in keeps if x is not None]
    biases = [F.pad(x, (0, extra), value=0.0) for x in biases if x is not None]
    mask = None if not keeps else keeps[0] if len(keeps) == 1 else keeps[0] & keeps[1]
    bias = None if not biases else biases[0] if len(biases) == 1 else biases[0] + biases[1]
    return mask, bias


def _source_only_mask(mask_mod, src_len, causal, kv_lengths, bsz, device):
    """Causality and key lengths on the first ``src_len`` keys only, and ``mask_mod``, as one mask_mod."""
    lengths = None
    if kv_lengths is not None:
        lengths = torch.as_tensor(kv_lengths, device=device)
        if lengths.numel() != bsz:
            raise AttentionInputError(
                f"key_value_seq_lengths has shape {tuple(lengths.shape)}, needs ({bsz},) = [B]"
            )
        lengths = lengths.reshape(bsz)

    def combined(b, h, q_idx, kv_idx):
        source = None
        if causal:
            source = kv_idx <= q_idx
        if lengths is not None:
            part = kv_idx < lengths[b]
            source = part if source is None else source & part
        keep = (kv_idx >= src_len) | source
        return keep if mask_mod is None else keep & mask_mod(b, h, q_idx, kv_idx)

    return combined


def _attention_weights(q, k, mask, bias, score_mod, structured, average, chunk):
    """The softmax weights ``[B, H, L, S]`` (or ``[B, L, S]`` averaged), one query chunk at a
    time, through the kernel's score pipeline: scale, bias, dense mask, score_mod, structured
    masks. A row with no key left gets weights 0."""
    bsz, tgt_len, heads, depth = q.shape
    src_len, groups = k.shape[1], heads // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)  # [B, S, H, D]: O(S), the weights are O(L*S) anyway
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if bsz * tgt_len * src_len == 0:  # no query or no key: empty weights, or rows of zeros
        shape = (bsz, tgt_len, src_len) if average else (bsz, heads, tgt_len, src_len)
        return (q.sum() * 0 + k.sum() * 0).to(q.dtype).expand(shape).contiguous()
    if chunk is None:
        chunk = max(1, (1 << 22) // max(1, bsz * heads * src_len))
    dev = q.device
    b_idx = torch.arange(bsz, device=dev).view(-1, 1, 1, 1)
    h_idx = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    k_idx = torch.arange(src_len, device=dev).view(1, 1, 1, -1)
    # The kernel's structured-mask rule (``chunk_keep``) on [B, H, lc, S] grids.
    causal = StructuredMask(q_len=tgt_len, kv_len=src_len, causal=structured["is_causal"])

    def as_grid(x, shape):
        return None if x is None else torch.as_tensor(x, device=dev).reshape(shape)

    q_lens = as_grid(structured["query_seq_lengths"], (-1, 1, 1, 1))
    kv_lens = as_grid(structured["key_value_seq_lengths"], (-1, 1, 1, 1))
    q_segs, kv_segs = structured["query_segment_ids"], structured["key_segment_ids"]
    if q_segs is None or kv_segs is None:
        q_segs = kv_segs = None
    q_segs, kv_segs = as_grid(q_segs, (bsz, 1, -1, 1)), as_grid(kv_segs, (bsz, 1, 1, -1))
    rows = []
    for q0 in range(0, tgt_len, chunk):
        q1 = min(tgt_len, q0 + chunk)
        q_idx = torch.arange(q0, q1, device=dev).view(1, 1, -1, 1)
        s = torch.einsum("blhd,bshd->bhls", q[:, q0:q1].to(compute), k.to(compute)) * depth**-0.5
        if bias is not None:
            s = s + (bias if bias.shape[-2] == 1 else bias[..., q0:q1, :]).to(compute)
        if score_mod is not None:
            s = score_mod(s, b_idx, h_idx, q_idx, k_idx)
        keep = [] if mask is None else [mask if mask.shape[-2] == 1 else mask[..., q0:q1, :]]
        structural = chunk_keep(
            causal,
            q_idx,
            k_idx,
            q_lengths=q_lens,
            kv_lengths=kv_lens,
            q_segments=None if q_segs is None else q_segs[:, :, q0:q1],
            kv_segments=kv_segs,
            mask_mod=structured["mask_mod"],
            batch_idx=b_idx,
            head_idx=h_idx,
        )
        if structural is not None:
            keep.append(structural)
        for part in keep:
            s = s.masked_fill(~part, float("-inf"))
        top = s.amax(-1, keepdim=True).detach()
        e = (s - torch.where(torch.isfinite(top), top, 0.0)).exp()
        total = e.sum(-1, keepdim=True)
        p = e / torch.where(total > 0, total, 1.0)
        rows.append(p.mean(1) if average else p)
    return torch.cat(rows, dim=-2).to(q.dtype)


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` whose attention never holds an ``L x S`` tensor.

    Same constructor, parameters (names, shapes, initialisation), ``state_dict`` keys and forward
    as ``torch.nn.MultiheadAttention``: it loads a torch layer's ``state_dict`` (strict) and a
    torch layer loads its, and it can replace ``self_attn`` / ``multihead_attn`` in
    ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``. The attention runs through
    this library's chunked kernel: O(L + S) memory forward and backward.

    Differences from torch, all chosen to keep torch-valid calls giving torch's results:

    * ``need_weights=True`` (torch's default) still returns the weights: they are computed one
      query chunk at a time next to the kernel (the output stays O(n)), but the returned tensor is
      ``[B, (H,) L, S]``. Pass ``need_weights=False`` (as the transformer layers do) for O(n)
      memory. While training with ``dropout > 0`` the weights are the probabilities *before*
      dropout (torch returns them after its dropout, whose random mask cannot be shared).
    * ``is_causal=True`` applies top-left causal masking itself; torch treats it as a hint that
      requires ``attn_mask``. Given both, both are applied (equal to torch when the hint is right).
    * A query row with every key masked outputs ``out_proj.bias`` and weights 0 (torch gives NaN
      with ``need_weights=True`` and the same result as ours with ``need_weights=False``).
    * ``key`` and ``value`` may be omitted: ``attn(x)`` is self-attention and ``attn(x, ctx)``
      uses ``ctx`` as key and value. The result is always the tuple ``(output, weights)``.
    * The torch fast paths (``torch._native_multi_head_attention``, the transformer layers'
      fused ``_transformer_encoder_layer_fwd``) are disabled so the kernel always runs. The
      nested batch ``nn.TransformerEncoder`` builds from a padding mask in inference is padded,
      attended with its lengths and nested again.

    Args (torch's, same order):
      embed_dim: ``C``, the query and output width.
      num_heads: ``H``.
      dropout: dropout rate on the attention probabilities while training.
      bias: input/output projection biases.
      add_bias_kv: learned key/value rows appended to the keys (``bias_k``, ``bias_v``).
      add_zero_attn: a zero key/value row appended after them.
      kdim, vdim: key/value input widths (default ``C``); when either differs from ``C`` the
        input projection is ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` instead of
        the packed ``in_proj_weight``, as in torch.
      batch_first: inputs ``[B, L, C]`` instead of ``[L, B, C]`` (default False, as in torch; a layer
        built with the 0.2 extras and no ``batch_first`` warns that the default changed).
      device, dtype: of the parameters.

    Keyword-only extras (not in torch):
      num_kv_heads: ``K`` key/value heads (default ``H``; grouped-query attention when ``K < H``,
        K/V are not repeated). With ``K != H`` or ``head_dim * H != C`` the projections are
        separate (``q_proj_weight`` ``[H*D, C]``, ``k_proj_weight``/``v_proj_weight``
        ``[K*D, kdim/vdim]``, ``in_proj_bias`` ``[(H + 2K) * D]``).
      head_dim: ``D`` (default ``C // H``).
      kv_dim: old name for ``kdim = vdim``.
      is_causal: always apply top-left causal masking.
      rotary, rotary_base: rotary embeddings on queries and keys (``apply_rotary``).
      alibi: ALiBi position biases ``slope_h * (k - q)`` (through ``score_mod``).
      query_chunk_size, key_chunk_size, memory_budget: passed to the kernel.

    Example::

        >>> import torch
        >>> from memory_efficient_attention.torch.modules import MultiheadAttention
        >>> torch_layer = torch.nn.MultiheadAttention(64, 8, batch_first=True)
        >>> layer = MultiheadAttention(64, 8, batch_first=True)
        >>> _ = layer.load_state_dict(torch_layer.state_dict())
        >>> x = torch.randn(2, 100, 64)
        >>> out, weights = layer(x, x, x)
        >>> out.shape, weights.shape
        (torch.Size([2, 100, 64]), torch.Size([2, 100, 100]))
        >>> bool(torch.allclose(out, torch_layer(x, x, x)[0], atol=1e-5))
        True
        >>> gqa = MultiheadAttention(64, 8, batch_first=True, num_kv_heads=2, is_causal=True, rotary=True)
        >>> out, none = gqa(x, need_weights=False, key_value_seq_lengths=torch.tensor([100, 37]))
        >>> out.shape, none
        (torch.Size([2, 100, 64]), None)
    """

    __constants__: ClassVar[list[str]] = ["batch_first"]
    bias_k: torch.Tensor | None
    bias_v: torch.Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        kv_dim: int | None = None,
        is_causal: bool = False,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        alibi: bool = False,
        query_chunk_size: int | None = None,
        key_chunk_size: int | None = None,
        memory_budget: int | str | None = None,
    ) -> None:
        super().__init__()
        # 0.2's layer took [B, L, C] and returned the output alone: built with its extras and no
        # batch_first, the layer says what changed (once it is valid, at the end of __init__)
        legacy = batch_first is None and (
            num_kv_heads is not None or kv_dim is not None or is_causal or rotary or alibi
        )
        batch_first = bool(batch_first)
        if embed_dim <= 0 or num_heads <= 0:
            raise AttentionInputError(
                f"embed_dim and num_heads must be positive, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            hint = (
                "; the third positional argument is torch's dropout: pass num_kv_heads by keyword"
                if isinstance(dropout, int) and not isinstance(dropout, bool) and dropout >= 1
                else ""
            )
            raise AttentionInputError(f"dropout must be a float in [0, 1), got {dropout!r}{hint}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
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
        if kv_dim is not None:
            if (kdim is not None and kdim != kv_dim) or (vdim is not None and vdim != kv_dim):
                raise AttentionInputError(
                    f"kv_dim ({kv_dim}) is the old name of kdim = vdim; got kdim={kdim}, vdim={vdim} too"
                )
            kdim = vdim = kv_dim
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = (
            embed_dim, num_heads, num_kv_heads, head_dim
        )  # fmt: skip
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), batch_first, add_zero_attn
        self.is_causal, self.rotary, self.rotary_base = is_causal, rotary, rotary_base
        self.chunking = {
            "query_chunk_size": query_chunk_size,
            "key_chunk_size": key_chunk_size,
            "memory_budget": memory_budget,
        }
        q_width, kv_width = num_heads * head_dim, num_kv_heads * head_dim
        # torch's layout exactly when the shapes are torch's; otherwise separate weights, which
        # also keeps torch's fused paths (they read in_proj_weight) away from this layer.
        self._qkv_same_embed_dim = (
            self.kdim == embed_dim and self.vdim == embed_dim and q_width == embed_dim and kv_width == q_width
        )
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(q_width, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(kv_width, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(kv_width, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(q_width + 2 * kv_width, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(q_width, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, kv_width, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, kv_width, **factory))
        else:
            self.bias_k = self.bias_v = None
        slopes = torch.tensor(alibi_slopes(num_heads), device=device, dtype=torch.float32) if alibi else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self._reset_parameters()
        # nn.TransformerEncoderLayer skips its fused kernel (which would read in_proj_weight and
        # bypass this layer) when a module has forward hooks; this no-op hook is that signal.
        self.register_forward_pre_hook(_no_fused_transformer_path)
        if legacy:
            warnings.warn(
                "MultiheadAttention now follows torch.nn.MultiheadAttention: inputs are [L, B, C] "
                "unless batch_first=True, and forward returns (output, weights). Pass "
                "batch_first=True for [B, L, C] inputs (and need_weights=False for O(n) memory); "
                "this warning goes away once batch_first is given.",
                FutureWarning,
                stacklevel=2,
            )

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases, Xavier-normal bias_k/v."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of the layer before it became a torch drop-in (q_proj/k_proj/v_proj Linears).
        old = [f"{prefix}{n}_proj.weight" for n in "qkv"]
        if all(k in state_dict for k in old):
            weights = [state_dict.pop(k) for k in old]
            if self._qkv_same_embed_dim:
                state_dict[prefix + "in_proj_weight"] = torch.cat(weights)
            else:
                for n, w in zip("qkv", weights):
                    state_dict[f"{prefix}{n}_proj_weight"] = w
            old_biases = [f"{prefix}{n}_proj.bias" for n in "qkv"]
            if all(k in state_dict for k in old_biases):
                state_dict[prefix + "in_proj_bias"] = torch.cat([state_dict.pop(k) for k in old_biases])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    merge_masks = nn.MultiheadAttention.merge_masks

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}, "
            f"dropout={self.dropout}, add_bias_kv={self.bias_k is not None}, "
            f"add_zero_attn={self.add_zero_attn}, is_causal={self.is_causal}, rotary={self.rotary}, "
            f"alibi={self.alibi_slopes is not None}"
        )

    def _in_projection(self, query, key, value, self_attention: bool):
        """``[B, L, H*D]``, ``[B, S, K*D]``, ``[B, S, K*D]`` (torch's packed/separate split)."""
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        sizes = [q_width, kv_width, kv_width]
        b = [None] * 3 if self.in_proj_bias is None else self.in_proj_bias.split(sizes)
        if self.in_proj_weight is not None:
            if self_attention:
                return F.linear(query, self.in_proj_weight, self.in_proj_bias).split(sizes, dim=-1)
            w = self.in_proj_weight.split(sizes)
        else:
            w = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        key_value: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        query_seq_lengths: torch.Tensor | None = None,
        key_value_seq_lengths: torch.Tensor | None = None,
        query_segment_ids: torch.Tensor | None = None,
        key_segment_ids: torch.Tensor | None = None,
        mask_mod: Callable | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``query`` to ``key``/``value``; torch's arguments, then extras.

        Args:
          query: ``[L, B, C]`` (``[B, L, C]`` with ``batch_first``) or unbatched ``[L, C]``.
          key: ``[S, B, kdim]`` / ``[B, S, kdim]`` / ``[S, kdim]``; default ``query``.
          value: ``[S, B, vdim]`` / ``[B, S, vdim]`` / ``[S, vdim]``; default ``key``.
          key_padding_mask: ``[B, S]`` (unbatched ``[S]``): bool, True = padding (ignored); or
            float, added to the scores.
          need_weights: also return the attention weights (O(L*S) memory, see the class doc).
          attn_mask: ``[L, S]`` or ``[B*H, L, S]`` (unbatched ``[H, L, S]``): bool, True = not
            allowed to attend; or float, added to the scores.
          average_attn_weights: average the weights over heads (``[B, L, S]``) instead of
            returning them per head (``[B, H, L, S]``); unbatched inputs drop the ``B``.
          is_causal: top-left causal masking (see the class doc).

        Keyword-only extras (batch dims first whatever ``batch_first``; unbatched inputs drop them):
          key_value: old name for passing ``key = value``.
          query_positions, key_positions: integer ``[L]`` / ``[S]`` (or ``[B, L]`` / ``[B, S]``)
            for the rotary embeddings; default ``arange``.
          query_seq_lengths, key_value_seq_lengths: integer ``[B]``: positions at or past the
            length are padding (excluded; padded query rows output ``out_proj.bias``).
          query_segment_ids, key_segment_ids: integer ``[B, L]`` / ``[B, S]``: packed documents
            (a query sees keys of its own segment).
          mask_mod: an extra ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
          generator: the dropout generator (default: torch's global one).

        Returns:
          ``(output, weights)``: output shaped like ``query`` with width ``C``; weights as above,
          or None with ``need_weights=False``.
        """
        if key_value is not None:
            if key is not None or value is not None:
                raise TypeError("pass key_value (the old name) or key/value, not both")
            key = value = key_value
        key = query if key is None else key
        value = key if value is None else value
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.is_nested or key.is_nested or value.is_nested:
            # nn.TransformerEncoder (eval, no grad, src_key_padding_mask) hands its layers a
            # nested batch of the unpadded sequences: attend on the padded batch with lengths.
            if not (query is key and key is value and self.batch_first and query.dim() == 3):
                raise AttentionInputError(
                    "nested tensors are accepted only for batch_first self-attention (query is key is "
                    "value, [B, j, C]); pass padded tensors and key_padding_mask instead"
                )
            if query_seq_lengths is not None or key_value_seq_lengths is not None:
                raise AttentionInputError("a nested query carries its lengths: pass no *_seq_lengths")
            lengths = torch.tensor([t.shape[0] for t in query.unbind()], device=query.device)
            padded = query.to_padded_tensor(0.0)
            out, weights = self.forward(
                padded, padded, padded, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal, query_positions=query_positions,
                key_positions=key_positions, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                query_segment_ids=query_segment_ids, key_segment_ids=key_segment_ids,
                mask_mod=mask_mod, generator=generator,
            )  # fmt: skip
            return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths.tolist())]), weights
        layout = "[B, L, C]" if self.batch_first else "[L, B, C]"
        if query.dim() not in (2, 3):
            raise AttentionInputError(
                f"query has shape {tuple(query.shape)}, needs {layout} (batched, batch_first="
                f"{self.batch_first}) or [L, C] (unbatched) with C = embed_dim = {self.embed_dim}"
            )
        batched = query.dim() == 3
        for name, t, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if t.dim() != query.dim() or t.shape[-1] != width:
                want = (
                    ("[B, S, {w}]" if self.batch_first else "[S, B, {w}]") if batched else "[S, {w}]"
                ).format(w=width)
                want = want.replace("S", "L") if name == "query" else want
                raise AttentionInputError(
                    f"{name} has shape {tuple(t.shape)}, needs {want} (query has shape {tuple(query.shape)})"
                )
        self_attention = query is key and key is value
        if batched and not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        elif not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise AttentionInputError(
                f"query, key and value need the same batch size and key/value the same length: got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} "
                f"(as [B, L or S, width])"
            )
        bsz, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]
        h, kh, d = self.num_heads, self.num_kv_heads, self.head_dim

        q, k, v = self._in_projection(query, key, value, self_attention)
        q = q.unflatten(-1, (h, d))  # [B, L, H, D]
        k = k.unflatten(-1, (kh, d))  # [B, S, K, D]
        v = v.unflatten(-1, (kh, d))
        if self.rotary:
            if query_positions is None:
                query_positions = torch.arange(tgt_len, device=q.device)
            if key_positions is None:
                key_positions = torch.arange(src_len, device=q.device)
            q = apply_rotary(q, query_positions, self.rotary_base)
            k = apply_rotary(k, key_positions, self.rotary_base)
        extra = 0  # keys appended after the source: bias_k/bias_v, then a zero row
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.unflatten(-1, (kh, d)).expand(bsz, 1, kh, d)], dim=1)
            v = torch.cat([v, self.bias_v.unflatten(-1, (kh, d)).expand(bsz, 1, kh, d)], dim=1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, 1, kh, d)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz, 1, kh, d)], dim=1)
            extra += 1

        mask, bias = _torch_masks(
            attn_mask, key_padding_mask, bsz, h, tgt_len, src_len, extra, batched, q.dtype
        )
        causal = bool(is_causal) or self.is_causal
        if not batched:
            query_seq_lengths, key_value_seq_lengths = (
                None if x is None else torch.as_tensor(x).reshape(1)
                for x in (query_seq_lengths, key_value_seq_lengths)
            )  # fmt: skip
            query_segment_ids, key_segment_ids = (
                None if x is None else x.reshape(1, -1) for x in (query_segment_ids, key_segment_ids)
            )  # fmt: skip
        if extra and (causal or key_value_seq_lengths is not None):
            # The appended keys stay visible to every query (torch pads its masks with "keep"):
            # express causality / key lengths on the source keys only as a mask_mod.
            mask_mod = _source_only_mask(mask_mod, src_len, causal, key_value_seq_lengths, bsz, q.device)
            causal, key_value_seq_lengths = False, None
        if extra and key_segment_ids is not None:
            raise AttentionInputError(
                "key_segment_ids cannot be combined with add_bias_kv / add_zero_attn (the appended "
                "keys have no segment)"
            )
        score_mod = None if self.alibi_slopes is None else alibi_score_mod(self.alibi_slopes)
        structured = {
            "is_causal": causal,
            "query_seq_lengths": query_seq_lengths,
            "key_value_seq_lengths": key_value_seq_lengths,
            "query_segment_ids": query_segment_ids,
            "key_segment_ids": key_segment_ids,
            "mask_mod": mask_mod,
        }

        dims = seed_dims(q.shape, k.shape, v.shape)
        g = h // kh
        q5 = q.reshape(bsz, tgt_len, kh, g, d).permute(0, 2, 1, 3, 4)  # kernel layout [Z, K, L, G, D]
        out, _ = _attention(
            q5,
            k.transpose(1, 2),
            v.transpose(1, 2),
            dims,
            mask=mask,
            bias=bias,
            mask_fill="exclude",
            score_mod=score_mod,
            dropout_rate=self.dropout if self.training else 0.0,
            generator=generator,
            operand_names=("attn_mask/key_padding_mask", "attn_mask/key_padding_mask"),
            **structured,
            **self.chunking,
        )  # [Z, K, L, G, D]
        out = self.out_proj(out.permute(0, 2, 1, 3, 4).reshape(bsz, tgt_len, h * d))
        weights = None
        if need_weights:
            weights = _attention_weights(
                q,
                k,
                mask,
                bias,
                score_mod,
                structured,
                average_attn_weights,
                self.chunking["query_chunk_size"],
            )
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights
