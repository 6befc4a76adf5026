"""Hugging Face transformers integration: tiny random models, ours against ``"eager"``."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import masking_utils as hf_masks  # noqa: E402

from memory_efficient_attention.integrations.transformers import (  # noqa: E402
    StructuredAttentionMask,
    attention_forward,
    register,
    structured_mask,
)

NAME = register()
VOCAB, B, N = 100, 3, 14
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)


def _batch(left: bool = False):
    """Ids ``[B, N]`` and a padding mask with lengths N, 9, 5 (right or left padded)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (B, N), generator=g)
    lengths = torch.tensor([N, 9, 5])
    pos = torch.arange(N)
    mask = (pos >= N - lengths[:, None]) if left else (pos < lengths[:, None])
    return ids, mask.long()


def _logits_and_grads(model, name: str, ids, mask):
    model.set_attn_implementation(name)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    (logits[real].square().mean()).backward()  # a loss on real tokens only
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits[real].detach(), grads


def _check_against_eager(model, ids, mask, atol=1e-4):
    ours, ours_g = _logits_and_grads(model, NAME, ids, mask)
    ref, ref_g = _logits_and_grads(model, "eager", ids, mask)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=1e-4)
    assert ours_g.keys() == ref_g.keys() and ref_g
    for n in ref_g:
        torch.testing.assert_close(ours_g[n], ref_g[n], atol=atol, rtol=1e-3, msg=n)


def _model(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(**SMALL, **kw)
    return model_cls(config).eval()  # eval: no dropout; gradients still flow


def test_llama_gqa_right_and_left_padding():
    model = _model(
        transformers.LlamaConfig, transformers.LlamaForCausalLM, num_attention_heads=4, num_key_value_heads=2
    )
    for left in (False, True):
        _check_against_eager(model, *_batch(left))


def test_mistral_sliding_window():
    model = _model(
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=1,
        sliding_window=4,
    )
    _check_against_eager(model, *_batch())


def test_gemma2_softcap_and_sliding_layers():
    model = _model(
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=5,
        attn_logit_softcapping=1.5,  # small, so that the cap changes the scores
        query_pre_attn_scalar=16,
    )
    _check_against_eager(model, *_batch())


def test_bert_encoder_padding():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        **SMALL, num_attention_heads=4, max_position_embeddings=32, attention_probs_dropout_prob=0.0
    )
    model = transformers.BertForMaskedLM(config).eval()
    _check_against_eager(model, *_batch())


def test_config_argument_dense_masks_and_dropout():
    """``Config(attn_implementation=name)``; ``structured_masks=False``; dropout in training."""
    dense = register("memory_efficient_dense", structured_masks=False)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5, attn_implementation=NAME
    )
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == NAME
    ids, mask = _batch()
    ours = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(dense)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, ours, atol=1e-5, rtol=1e-5)
    model.set_attn_implementation(NAME)
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(1)
    b = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)  # reproducible from torch's global RNG
    assert not torch.allclose(a, ours, atol=1e-3)  # and dropout did something


def test_generate_matches_eager():
    """Decoding with a KV cache: queries at an offset (bottom-right diagonal), left padding."""
    model = _model(
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=6,
    )
    ids, mask = _batch(left=True)
    out = {}
    for name in (NAME, "eager"):
        model.set_attn_implementation(name)
        out[name] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    torch.testing.assert_close(out[NAME], out["eager"])


SPY = register("memory_efficient_spy")
_SEEN_MASKS: list = []


def _spy_attention(module, query, key, value, attention_mask, **kwargs):
    _SEEN_MASKS.append(attention_mask)
    return attention_forward(module, query, key, value, attention_mask, **kwargs)


transformers.AttentionInterface.register(SPY, _spy_attention)

CACHES = ["dynamic", "static", "offloaded", "offloaded_static", "quantized"]


# transformers' QuantizedCache takes full-attention layers only: no (mistral, quantized) case
ARCH_CACHES = [
    pytest.param(arch, cache, marks=[pytest.mark.cuda] if cache.startswith("offloaded") else [])
    for arch in ("llama", "mistral")
    for cache in CACHES
    if not (arch == "mistral" and cache == "quantized")
]


@pytest.mark.parametrize("arch, cache", ARCH_CACHES)
def test_generate_every_cache_implementation_matches_sdpa(arch, cache):
    """``generate(cache_implementation=...)``: tokens and logits as ``"sdpa"``, structured masks.

    Static caches make ``generate`` build the masks ahead (``create_masks_for_generate``) and
    pass them back into ``forward``, where transformers reads ``attention_mask.ndim``.
    """
    if cache.startswith("offloaded") and not torch.cuda.is_available():
        pytest.skip("offloaded caches need CUDA (marked `cuda`: scripts/device-check.sh runs them)")
    kw = dict(num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":
        model = _model(transformers.LlamaConfig, transformers.LlamaForCausalLM, **kw)
    else:
        model = _model(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=4, **kw)
    device = "cuda" if cache.startswith("offloaded") else "cpu"
    model.to(device)
    ids, mask = (t.to(device) for t in _batch(left=True))
    extra = {"cache_config": {"backend": "fp8"}} if cache == "quantized" else {}
    out = {}
    for name in (SPY, "sdpa"):
        model.set_attn_implementation(name)
        _SEEN_MASKS.clear()
        out[name] = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=7,
            do_sample=False,
            pad_token_id=0,
            cache_implementation=cache,
            output_logits=True,
            return_dict_in_generate=True,
            **extra,
        )
        if name == SPY:  # never a silent dense fallback
            assert _SEEN_MASKS and all(isinstance(m, StructuredAttentionMask) for m in _SEEN_MASKS)
    torch.testing.assert_close(out[SPY].sequences, out["sdpa"].sequences)
    ours, ref = (torch.stack(out[n].logits) for n in (SPY, "sdpa"))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_prepared_structured_mask_is_returned_as_is():
    m = structured_mask(2, 1, 9, q_offset=torch.tensor(8), attention_mask=torch.ones(2, 9))
    assert m.ndim == m.dim() == 4
    assert structured_mask(2, 1, 9, 8, attention_mask=m) is m
    with pytest.raises(ValueError, match="prepared StructuredAttentionMask"):
        structured_mask(2, 2, 9, 7, attention_mask=m)


def _real_rows(weights, mask):
    """The ``[B, H, L, S]`` entries of query rows that have a key left (not left padding)."""
    return mask.bool()[:, None, :, None].expand_as(weights)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_output_attentions_match_eager(arch):
    kw = dict(num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":
        model = _model(transformers.LlamaConfig, transformers.LlamaForCausalLM, **kw)
    elif arch == "mistral":
        model = _model(transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=4, **kw)
    else:
        model = _model(
            transformers.Gemma2Config,
            transformers.Gemma2ForCausalLM,
            head_dim=8,
            sliding_window=5,
            attn_logit_softcapping=1.5,
            query_pre_attn_scalar=16,
            **kw,
        )
    ids, mask = _batch(left=True)
    probe = torch.randn(B, 4, N, N, generator=torch.Generator().manual_seed(3))
    got, grads = {}, {}
    for name in (NAME, "eager"):
        model.set_attn_implementation(name)
        model.zero_grad()
        got[name] = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        loss = sum((w * probe)[_real_rows(w, mask)].sum() for w in got[name])
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(got[NAME]) == len(got["eager"]) == 2
    for ours, ref in zip(got[NAME], got["eager"]):
        assert ours.shape == ref.shape == (B, 4, N, N)
        real = _real_rows(ours, mask)
        torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
        assert not ours[~real].any()  # rows with no key left: 0 (sdpa semantics), not uniform
    for n in grads["eager"]:
        torch.testing.assert_close(grads[NAME][n], grads["eager"][n], atol=1e-5, rtol=1e-4, msg=n)
    # config.output_attentions reaches the attention function only through transformers' collector
    model.config.output_attentions = True
    for name in (NAME, "eager"):
        model.set_attn_implementation(name)
        with torch.no_grad():
            got[name] = model(input_ids=ids, attention_mask=mask).attentions
    for ours, ref in zip(got[NAME], got["eager"], strict=True):
        real = _real_rows(ours, mask)
        torch.testing.assert_close(ours[real], ref[real], atol=1e-5, rtol=1e-5)
    model.config.output_attentions = False
    model.set_attn_implementation(NAME)
    assert model(input_ids=ids, attention_mask=mask).attentions is None


def test_output_attentions_while_decoding_with_a_static_cache():
    """Weights over the static cache's ``max_cache_len`` keys, at an offset, sliding window."""
    model = _model(
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    ids, mask = _batch()
    ids, mask = ids[:1], mask[:1]  # no padding: every row has keys
    out = {}
    for name in (NAME, "eager"):
        model.set_attn_implementation(name)
        out[name] = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
            output_attentions=True,
            return_dict_in_generate=True,
        )
    torch.testing.assert_close(out[NAME].sequences, out["eager"].sequences)
    assert len(out[NAME].attentions) == len(out["eager"].attentions) == 4
    for step_ours, step_ref in zip(out[NAME].attentions, out["eager"].attentions):
        for ours, ref in zip(step_ours, step_ref, strict=True):
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def _run_with_mask(mask, q, k, v, module_causal=False):
    module = torch.nn.Module()
    module.is_causal = module_causal
    module.eval()
    out, weights = attention_forward(module, q, k, v, mask)
    assert weights is None
    return out


@pytest.mark.parametrize(
    "q_len, kv_len, q_offset, kv_offset, pattern",
    [
        (6, 6, 0, 0, "causal"),
        (3, 9, 6, 0, "causal"),  # decoding chunk with a cache: bottom-right
        (4, 9, 7, 2, "causal"),  # sliding cache: keys start at an offset
        (1, 9, 8, 0, "causal"),
        (7, 7, 0, 0, "sliding"),
        (3, 9, 6, 0, "sliding"),
        (2, 5, 9, 6, "sliding"),
        (7, 7, 0, 0, "sliding_full"),
        (5, 8, 0, 0, "full"),
        (7, 7, 0, 0, "custom"),
    ],
)
def test_structured_mask_matches_its_dense_form(q_len, kv_len, q_offset, kv_offset, pattern):
    fn = {
        "causal": hf_masks.causal_mask_function,
        "sliding": hf_masks.sliding_window_causal_mask_function(3),
        "sliding_full": hf_masks.sliding_window_bidirectional_mask_function(2),
        "full": hf_masks.bidirectional_mask_function,
        "custom": hf_masks.or_masks(hf_masks.causal_mask_function, lambda b, h, q, kv: kv == 6),
    }[pattern]
    g = torch.Generator().manual_seed(1)
    padding = torch.rand(2, kv_offset + kv_len, generator=g) > 0.3
    padding[:, -1] = True  # no row without keys: there eager and sdpa semantics differ
    m = structured_mask(2, q_len, kv_len, q_offset, kv_offset, mask_function=fn, attention_mask=padding)
    assert isinstance(m, StructuredAttentionMask) and m.shape == (2, 1, q_len, kv_len)
    assert "StructuredAttentionMask(" in repr(m)
    args = m.kernel_arguments(torch.device("cpu"))
    assert ("mask_mod" in args) == (pattern == "custom")
    q = torch.randn(2, 4, q_len, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, kv_len, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    dense = m.to_dense()
    ours = _run_with_mask(m, q, k, v)
    ref = _run_with_mask(dense, q, k, v)  # the dense bool path (exclusion semantics)
    torch.testing.assert_close(ours, ref)
    # and a plain float64 reference
    kr, vr = (x.repeat_interleave(2, dim=1) for x in (k, v))
    s = (q @ kr.transpose(-1, -2)) / 8**0.5
    s = s.masked_fill(~dense, float("-inf"))
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)
    torch.testing.assert_close(ours, (p @ vr).transpose(1, 2))
    gq, gk = torch.autograd.grad(ours.sum(), (q, k))
    rq, rk = torch.autograd.grad(ref.sum(), (q, k))
    torch.testing.assert_close(gq, rq)
    torch.testing.assert_close(gk, rk)


def test_none_mask_uses_module_is_causal_and_sliding_window():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64) for _ in "qkv")
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(_run_with_mask(None, q, k, v, True), _run_with_mask(causal, q, k, v))
    torch.testing.assert_close(
        _run_with_mask(None, q, k, v, False),
        _run_with_mask(torch.ones(6, 6, dtype=torch.bool), q, k, v),
    )
    module = torch.nn.Module()
    module.is_causal = True
    window = causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)  # 3 latest keys
    out, _ = attention_forward(module, q, k, v, None, sliding_window=3)
    torch.testing.assert_close(out, _run_with_mask(window, q, k, v))


def test_importing_integrations_imports_no_framework():
    code = (
        "import sys, memory_efficient_attention.integrations;"
        "bad = {'torch', 'jax', 'flax', 'transformers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpt_oss_attention_sinks_match_eager():
    """gpt-oss: sinks (a learnable logit per head), sliding and full layers, GQA; logits and
    every gradient (the sinks' included) against "eager"."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        **{**SMALL, "num_hidden_layers": 2}, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        sliding_window=4, num_local_experts=2, num_experts_per_tok=1,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():  # sinks large enough to take visible mass
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    ours, ours_g = _logits_and_grads(model, NAME, *_batch())
    ref, ref_g = _logits_and_grads(model, "eager", *_batch())
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    sinks = [n for n in ref_g if n.endswith("sinks")]
    assert len(sinks) == 2 and all(ref_g[n].abs().max() > 0 for n in sinks)
    assert ours_g.keys() == ref_g.keys()
    for n in ref_g:
        torch.testing.assert_close(ours_g[n], ref_g[n], atol=1e-4, rtol=1e-3, msg=n)
