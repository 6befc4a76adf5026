"""The FlexAttention engine (``engine="flex"``): the float64 grid (forward: FlexAttention runs no
backward on CPU; the gradients are checked on CUDA in ``test_cuda.py``), its block mask against
the structured masks, and what it refuses."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")

from memory_efficient_attention._config import make_config  # noqa: E402
from memory_efficient_attention._spec import AttentionInputError, Dims  # noqa: E402
from memory_efficient_attention.torch import _flex, explain  # noqa: E402
from memory_efficient_attention.torch import efficient_dot_product_attention as attention  # noqa: E402

from .cases import ALL_CASES, assert_close, chunk_kwargs, reference_for  # noqa: E402
from .reference import structured_keep  # noqa: E402
from .test_torch import tensor, torch_kwargs  # noqa: E402


def flex_eligible(case) -> bool:
    """What the flex engine takes: no seed-rule dense mask (the seed function's masks)."""
    return case.mask_shape is None


@pytest.mark.parametrize("case", [c for c in ALL_CASES if flex_eligible(c)], ids=lambda c: c.id)
def test_grid_forward_and_lse_on_flex(case):
    x, ref_out, ref_lse, _ = reference_for(case)
    q, k, v = (tensor(x[n], case.dtype, False) for n in ("query", "key", "value"))
    kwargs = {**chunk_kwargs(case), **torch_kwargs(x["kwargs"])}
    out, lse = attention(q, k, v, None, tensor(x["bias"], case.dtype, False), return_lse=True,
                         engine="flex", **kwargs)  # fmt: skip
    assert_close(out.double().numpy(), ref_out, case.dtype, "output")
    assert_close(lse.double().numpy(), ref_lse, case.dtype, "lse")


@pytest.mark.parametrize("seed", range(30))
def test_block_mask_covers_the_kept_pairs_and_skips_only_empty_blocks(seed):
    """From the plan: every kept pair lies in a listed block; full blocks keep every pair;
    blocks left out keep none (checked against the reference's dense structured mask)."""
    rng = np.random.default_rng(seed)
    L, S = (int(x) for x in rng.integers(1, 700, size=2))
    kw = {}
    if rng.random() < 0.7:
        kw.update(is_causal=True, causal_alignment=str(rng.choice(["top_left", "bottom_right"])))
    if rng.random() < 0.5:
        kw["local_window_size"] = tuple(int(x) for x in rng.integers(-1, 300, size=2))
    cfg = make_config(Dims((1,), L, S, 1, 1, 8, 8), "float32", **kw)
    counts, partial, full_counts, full = _flex._block_lists(cfg.structure)
    keep = np.broadcast_to(structured_keep((1,), 1, L, S, **kw), (1, 1, L, S))[0, 0]
    b = _flex.BLOCK
    for i, (n, row, nf, frow) in enumerate(zip(counts, partial, full_counts, full)):
        listed = set(row[:n]) | set(frow[:nf])
        assert not set(row[:n]) & set(frow[:nf])
        for j in range(-(-S // b)):
            block = keep[i * b : (i + 1) * b, j * b : (j + 1) * b]
            if j in frow[:nf]:
                assert block.all()
            elif j not in listed:
                assert not block.any()
    mask = _flex.block_mask(cfg, lambda b_, h, q, k: q >= 0, "cpu")
    dense = mask.to_dense()[0, 0].numpy()  # [q blocks, kv blocks]: 1 where listed
    assert dense.shape == (len(counts), -(-S // b))
    assert all(dense[i].sum() == counts[i] + full_counts[i] for i in range(len(counts)))


def test_flex_runs_score_mod_mask_mod_and_captured_tensors():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 150, 4, 16, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 190, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)

    def alibi(s, b, h, i, j):
        return s - slopes[h] * (i - j).abs()

    def band(b, h, i, j):
        return (i - j).abs() <= 40

    lengths = torch.tensor([190, 77])
    kw = dict(score_mod=alibi, mask_mod=band, key_value_seq_lengths=lengths, is_causal=True)
    assert explain(q, k, v, engine="flex", **kw).startswith("engine: flex (")
    with torch.no_grad():
        out, lse = attention(q, k, v, engine="flex", return_lse=True, **kw)
        ref = attention(q, k, v, engine="chunked", return_lse=True, **kw)
    torch.testing.assert_close(out, ref[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref[1], atol=1e-12, rtol=1e-12)


def test_flex_sdpa_style_boolean_mask_and_sinks():
    from memory_efficient_attention.torch import kernel as torch_kernel

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 40, 1, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 3, 50, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(1, 3, 40, 50, generator=gen) > 0.4
    mask[:, :, 7] = False  # a row with no key: 0
    dims = Dims((1,), 40, 50, 3, 3, 8, 8)
    names = ("attn_mask", "attn_mask")
    with torch.no_grad():
        got, ref = (
            torch_kernel.attention(q, k, v, dims, mask=mask, operand_names=names, engine=e)[0]
            for e in ("flex", "chunked")
        )
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    assert torch.all(got[:, :, 7] == 0)
    sinks = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    q4, k4 = torch.randn(2, 30, 3, 8, dtype=torch.float64), torch.randn(2, 30, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        a = attention(q4, k4, k4, sinks=sinks, is_causal=True, engine="flex")
        b = attention(q4, k4, k4, sinks=sinks, is_causal=True, engine="chunked")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dropout_rate=0.1), "dropout"),
        (dict(mask=torch.ones(20, 20, dtype=torch.bool)), "finfo.min"),
        (dict(bias_calc_fn=lambda *a: a[2]), "seed's callbacks"),
        (dict(grad=True), "gradients on cpu"),
    ],
    ids=["dropout", "seed-mask", "callbacks", "grad-on-cpu"],
)
def test_flex_refuses_what_it_cannot_run(kwargs, words):
    kwargs = dict(kwargs)
    q = torch.randn(1, 20, 2, 8, requires_grad=kwargs.pop("grad", False))
    with pytest.raises(AttentionInputError, match="engine='flex' cannot run this call") as err:
        attention(q, q, q, engine="flex", **kwargs)
    assert words in str(err.value)
    assert words in explain(q, q, q, engine="flex", **kwargs)


def test_explain_shows_the_block_mask():
    q = torch.randn(1, 1000, 2, 8)
    text = explain(q, q, q, is_causal=True, engine="flex")
    # 8 query blocks x 8 key blocks, causal: 28 full below the diagonal, 8 partial on it
    assert text.splitlines()[1] == "BlockMask(128 x 128 blocks: 28 full, 8 partial, 28 empty (skipped))"


def test_jax_refuses_the_flex_engine():
    jnp = pytest.importorskip("jax.numpy")
    from memory_efficient_attention.jax import efficient_dot_product_attention as jax_attention

    q = jnp.ones((1, 4, 1, 8))
    with pytest.raises(AttentionInputError, match="engine='flex' is the PyTorch functions'"):
        jax_attention(q, q, q, engine="flex")
