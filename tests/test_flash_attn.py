"""``memory_efficient_attention.flash_attn`` against a float64 re-implementation of flash-attn's
semantics (written from its documentation: bottom-right causal and windows, softcap, ALiBi
``-slope * |i + S - L - j|``, rows with no key output 0), outputs, lse and gradients; varlen against
the same reference per sequence; and a small model written against the flash_attn API."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from memory_efficient_attention import flash_attn as fa  # noqa: E402
from memory_efficient_attention._spec import AttentionInputError  # noqa: E402


def reference(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None):
    """Float64, one batch ``[B, L, H, D]``: ``(out, lse [B, H, L])``."""
    q, k, v = (x.double() for x in (q, k, v))
    B, L, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    kr, vr = k.repeat_interleave(H // K, 2), v.repeat_interleave(H // K, 2)
    s = torch.einsum("blhd,bshd->bhls", q, kr) * (scale if scale is not None else 1 / math.sqrt(D))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    diag = i + S - L
    if alibi is not None:
        slopes = alibi.double().view(-1 if alibi.dim() == 1 else B, *(() if alibi.dim() == 1 else (H,)))
        slopes = slopes.view(1, H, 1, 1) if alibi.dim() == 1 else slopes.view(B, H, 1, 1)
        s = s - slopes * (diag - j).abs()
    left, right = window
    if causal:
        right = 0
    keep = torch.ones(L, S, dtype=torch.bool)
    if left >= 0:
        keep &= j >= diag - left
    if right >= 0:
        keep &= j <= diag + right
    s = s.masked_fill(~keep, -math.inf)
    lse = s.logsumexp(-1)
    p = torch.where(keep.any(-1, keepdim=True), (s - lse.nan_to_num(neginf=0).unsqueeze(-1)).exp(), 0.0)
    return torch.einsum("bhls,bshd->blhd", p, vr), lse


SETTINGS = [
    dict(),
    dict(causal=True),
    dict(window=(5, 2)),
    dict(causal=True, window=(7, -1)),
    dict(softcap=2.0, causal=True),
    dict(alibi="heads"),
    dict(alibi="batch", causal=True),
]


def _inputs(B=2, L=23, S=31, H=4, K=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, L, H, D), (B, S, K, D), (B, S, K, D))
    ]


def _alibi(kind, B, H):
    if kind is None:
        return None
    slopes = torch.linspace(0.1, 0.8, H, dtype=torch.float64)
    return slopes if kind == "heads" else torch.stack([slopes, slopes * 2])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}" for k in s) or "plain")
@pytest.mark.parametrize("shape", [(23, 31), (31, 23)], ids=["L<S", "L>S"])
def test_flash_attn_func_matches_flash_attn_semantics(setting, shape):
    L, S = shape
    q, k, v = _inputs(L=L, S=S)
    setting = dict(setting)
    alibi = _alibi(setting.pop("alibi", None), 2, 4)
    kwargs = dict(causal=setting.get("causal", False), window_size=setting.get("window", (-1, -1)),
                  softcap=setting.get("softcap", 0.0), alibi_slopes=alibi)  # fmt: skip
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, probs = fa.flash_attn_func(*leaves, return_attn_probs=True, **kwargs)
    assert probs is None and lse.shape == (2, 4, L)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = reference(*ref_leaves, alibi=alibi, **setting)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    d_out = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, leaves, d_out), torch.autograd.grad(ref, ref_leaves, d_out)
    ):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_packed_variants_equal_the_unpacked_call():
    q, k, v = _inputs(L=17, S=17, K=4)
    want = fa.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(fa.flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), causal=True), want)
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), causal=True), want)


VARLEN = [dict(), dict(causal=True), dict(window=(3, 1)), dict(causal=True, alibi="heads")]


@pytest.mark.parametrize("setting", VARLEN, ids=["plain", "causal", "window", "causal-alibi"])
def test_varlen_equals_each_sequence_alone(setting):
    """Three sequences with different query and key lengths, packed; each row must equal the
    unpacked call on its own sequence (bottom-right alignment per sequence), gradients too."""
    setting = dict(setting)
    alibi = _alibi(setting.pop("alibi", None), 1, 4)
    q_lens, k_lens = [5, 9, 1], [7, 9, 4]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(k_lens), 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(k_lens), 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cu_q = torch.tensor([0, 5, 14, 15], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 16, 20], dtype=torch.int32)
    kwargs = dict(
        causal=setting.get("causal", False), window_size=setting.get("window", (-1, -1)), alibi_slopes=alibi
    )
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, return_attn_probs=True, **kwargs)
    assert lse.shape == (4, 15)
    d_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    refs, ref_lses = [], []
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        r, r_lse = reference(q[qs][None], k[ks][None], v[ks][None], alibi=alibi, **setting)
        refs.append(r[0])
        ref_lses.append(r_lse[0])
    ref = torch.cat(refs)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, torch.cat(ref_lses, dim=1), atol=1e-10, rtol=1e-10)
    want = torch.autograd.grad(ref, (q, k, v), d_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_bad_inputs_are_refused_with_the_argument_named():
    q, k, v = _inputs()
    with pytest.raises(AttentionInputError, match="q must be a 4-d tensor"):
        fa.flash_attn_func(q[0], k, v)
    with pytest.raises(AttentionInputError, match="window_size must be a pair"):
        fa.flash_attn_func(q, k, v, window_size=3)
    with pytest.raises(AttentionInputError, match="alibi_slopes has shape"):
        fa.flash_attn_func(q, k, v, alibi_slopes=torch.ones(3))
    with pytest.raises(AttentionInputError, match="cu_seqlens_q must start at 0"):
        fa.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 5]), torch.tensor([0, 31]), 5, 31)
    with pytest.raises(AttentionInputError, match="max_seqlen_q"):
        fa.flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 23]), torch.tensor([0, 31]), 5, 31)


class _TinyFlashModel(torch.nn.Module):
    """A decoder block written against the flash_attn API (as models using flash-attn are)."""

    def __init__(self, attn, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.attn, self.heads, self.kv_heads = attn, heads, kv_heads
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * (dim // heads))
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, L, dim = x.shape
        d = dim // self.heads
        q, k, v = self.qkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        y = self.attn(q.view(B, L, self.heads, d), k.view(B, L, self.kv_heads, d),
                      v.view(B, L, self.kv_heads, d), causal=True, window_size=(8, 0))  # fmt: skip
        return self.out(y.reshape(B, L, dim))


def test_a_model_written_against_flash_attn_runs_by_changing_one_import():
    def dense(q, k, v, causal, window_size):
        return reference(q, k, v, causal=causal, window=window_size)[0].to(q.dtype)

    torch.manual_seed(0)
    ours = _TinyFlashModel(fa.flash_attn_func).double()
    ref = _TinyFlashModel(dense).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    out, want = ours(x), ref(x)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, p), r in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-9, rtol=1e-9, msg=name)


# ------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ------------------------------------------------------------------------------------------


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding written out per pair of dims (the reference's own)."""
    out = x.clone()
    half = cos.shape[1]
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            c, s = cos[positions[b, i]], sin[positions[b, i]]
            for m in range(half):
                a, bb = (2 * m, 2 * m + 1) if interleaved else (m, m + half)
                xa, xb = x[b, i, :, a], x[b, i, :, bb]
                out[b, i, :, a] = xa * c[m] - xb * s[m]
                out[b, i, :, bb] = xa * s[m] + xb * c[m]
    return out


KVCACHE = [
    dict(causal=True),
    dict(),
    dict(window=(3, 0), causal=True),
    dict(causal=True, alibi="batch"),
    dict(causal=True, rotary=True),
    dict(rotary=True, interleaved=False),
    dict(causal=True, leftpad=True),
    dict(leftpad=True, alibi="batch"),
    dict(window=(4, 1), causal=True, rotary=True, leftpad=True),
]


@pytest.mark.parametrize("setting", KVCACHE, ids=lambda s: "-".join(s) or "plain")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_with_kvcache_appends_in_place_and_matches_the_reference(setting, paged):
    setting = dict(setting)
    g = torch.Generator().manual_seed(2)
    B, L, H, K, D, S = 3, 2, 4, 2, 8, 24
    cache_k = torch.randn(B, S, K, D, generator=g, dtype=torch.float64)
    cache_v = torch.randn(B, S, K, D, generator=g, dtype=torch.float64)
    q = torch.randn(B, L, H, D, generator=g, dtype=torch.float64)
    k_new = torch.randn(B, L, K, D, generator=g, dtype=torch.float64)
    v_new = torch.randn(B, L, K, D, generator=g, dtype=torch.float64)
    seqlens = torch.tensor([5, 0, 17], dtype=torch.int32)
    cos = sin = None
    interleaved = setting.pop("interleaved", True)
    if setting.pop("rotary", False):
        angles = torch.rand(S, 3, generator=g, dtype=torch.float64) * 6
        cos, sin = angles.cos(), angles.sin()
    alibi = _alibi(setting.pop("alibi", None), B, H)
    if alibi is not None:
        alibi = torch.cat([alibi, alibi[:1] * 3])  # [B, H] with B = 3
    # left padding: row b's cache starts at leftpad[b] (flash-attn's cache_leftpad)
    leftpad = torch.tensor([3, 0, 9]) if setting.pop("leftpad", False) else None
    # the reference: append by hand (rotated keys), then dense attention on each row's prefix
    moving = setting.get("causal", False) or "window" in setting
    pos = seqlens.long()[:, None] + torch.arange(L)
    q_pos = pos if moving else seqlens.long()[:, None].expand(B, L)
    q_ref = q if cos is None else _rotate(q, cos, sin, q_pos, interleaved)
    k_ref = k_new if cos is None else _rotate(k_new, cos, sin, pos, interleaved)
    want_k, want_v = cache_k.clone(), cache_v.clone()
    refs = []
    for b in range(B):
        n = int(seqlens[b])
        lp = 0 if leftpad is None else int(leftpad[b])
        want_k[b, n : n + L], want_v[b, n : n + L] = k_ref[b], v_new[b]
        a = None if alibi is None else alibi[b]
        keys = slice(lp, n + L)
        row = (q_ref[b : b + 1], want_k[b : b + 1, keys], want_v[b : b + 1, keys])
        refs.append(reference(*row, alibi=a, **setting)[0])
    if paged:  # pages of 4 positions, scattered in a pool
        page = 4
        order = torch.randperm(B * S // page, generator=g)
        pool_k = torch.zeros(B * S // page + 2, page, K, D, dtype=torch.float64)
        pool_v = torch.zeros_like(pool_k)
        table = order.view(B, S // page).to(torch.int32)
        pool_k[table.long()] = cache_k.view(B, S // page, page, K, D)
        pool_v[table.long()] = cache_v.view(B, S // page, page, K, D)
        caches, extra = (pool_k, pool_v), dict(block_table=table)
    else:
        caches, extra = (cache_k, cache_v), {}
    out = fa.flash_attn_with_kvcache(
        q, *caches, k=k_new, v=v_new, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
        causal=setting.get("causal", False), window_size=setting.get("window", (-1, -1)),
        alibi_slopes=alibi, rotary_interleaved=interleaved, cache_leftpad=leftpad, **extra,
    )  # fmt: skip
    torch.testing.assert_close(out, torch.cat(refs), atol=1e-10, rtol=1e-10)
    got_k = caches[0][table.long()].flatten(1, 2) if paged else caches[0]
    torch.testing.assert_close(got_k, want_k)  # appended in place


def test_with_kvcache_without_new_keys_reads_the_cache_as_is():
    q, k, v = _inputs(B=2, L=1, S=16)
    out, lse = fa.flash_attn_with_kvcache(
        q, k, v, cache_seqlens=torch.tensor([16, 9]), return_softmax_lse=True
    )
    ref0, _ = reference(q[:1], k[:1], v[:1])
    ref1, lse1 = reference(q[1:], k[1:, :9], v[1:, :9])
    torch.testing.assert_close(out, torch.cat([ref0, ref1]))
    torch.testing.assert_close(lse[1], lse1[0])


ONE_LENGTH = [dict(causal=True), dict(window=(4, 1)), dict(causal=True, alibi="batch")]


@pytest.mark.parametrize("setting", ONE_LENGTH, ids=["causal", "window", "causal-alibi"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_with_kvcache_one_length_for_all_rows(setting, paged):
    """Every row at the same length (the structured-mask path): equal to the per-row reference."""
    setting = dict(setting)
    alibi = _alibi(setting.pop("alibi", None), 2, 4)
    q, k, v = _inputs(B=2, L=3, S=16)
    n = 11
    extra = {}
    caches = (k, v)
    if paged:
        table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
        pool_k = torch.zeros(4, 8, 2, 8, dtype=torch.float64)
        pool_v = torch.zeros_like(pool_k)
        pool_k[table.long()] = k.view(2, 2, 8, 2, 8)
        pool_v[table.long()] = v.view(2, 2, 8, 2, 8)
        caches, extra = (pool_k, pool_v), dict(block_table=table)
    kwargs = dict(causal=setting.get("causal", False), window_size=setting.get("window", (-1, -1)))
    out = fa.flash_attn_with_kvcache(q, *caches, cache_seqlens=n, alibi_slopes=alibi, **kwargs, **extra)
    want = reference(q, k[:, :n], v[:, :n], alibi=alibi, **setting)[0]
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
