"""Layering (issue 11, item 5): ``integrations``, ``distributed`` and ``torch.modules`` import only
public names or the kernels' documented internal API (``memory_efficient_attention.torch.kernel``,
``memory_efficient_attention.jax.kernel``), never an underscore-prefixed name of another
subpackage; and that internal API computes what the public functions compute (float64)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import memory_efficient_attention

PACKAGE = memory_efficient_attention.__name__
ROOT = Path(memory_efficient_attention.__file__).parent
# The layers above the kernels. ``torch/modules.py`` sits inside ``torch`` but is a layer too:
# it may not use that subpackage's private modules or names either.
LAYER_FILES = sorted(
    [
        *(ROOT / "integrations").glob("*.py"),
        *(ROOT / "distributed").glob("*.py"),
        ROOT / "torch" / "modules.py",
    ]
)
# Imports of a public name from a kernel subpackage's private module that are tolerated (none now).
ALLOWED_PRIVATE_MODULES: set[tuple[str, str]] = set()


def _imports(path: Path, source: str):
    """``(line, absolute module parts, imported names)`` of every import in ``source`` (``path``)."""
    package = [PACKAGE, *path.relative_to(ROOT).parent.parts]
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            yield node.lineno, module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split("."), []


def _violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    own = None if rel == "torch/modules.py" else path.relative_to(ROOT).parts[0]
    found = []
    for line, module, names in _imports(path, path.read_text() if source is None else source):
        if module[:1] != [PACKAGE] or len(module) < 2 or module[1] == own:
            continue  # another library, the package root itself, or the file's own subpackage
        where = f"{rel}:{line} imports from {'.'.join(module)}"
        private = [n for n in names if n.startswith("_")]
        if private:
            found.append(f"{where} the private name(s) {private}")
        # Root modules (``_spec``, ``_config``, ...) are the shared core; a subpackage's private
        # modules are its own.
        if not module[1].startswith("_") and any(p.startswith("_") for p in module[2:]):
            if (rel, ".".join(module)) not in ALLOWED_PRIVATE_MODULES:
                found.append(f"{where}: a private module of a kernel subpackage")
    return found


def test_layers_import_only_public_or_documented_internal_names():
    assert LAYER_FILES and all(p.exists() for p in LAYER_FILES)
    found = [v for path in LAYER_FILES for v in _violations(path)]
    assert not found, "\n".join(found)


def test_the_scan_sees_a_private_import():
    """The checker itself: a relative import of a private name from another subpackage fails
    (twice: the name and the module); a public name of a root module passes."""
    source = "from ..torch._api import _attention\nfrom .._spec import seed_dims\n"
    found = _violations(ROOT / "integrations" / "probe.py", source)
    assert len(found) == 2 and "_attention" in found[0] and "private module" in found[1]


# ------------------------------------------------------------------------------------------------
# The internal API against the public functions (float64)
# ------------------------------------------------------------------------------------------------

B, L, S, H, K, D, E = 2, 7, 6, 4, 2, 5, 3
CHUNKS = dict(query_chunk_size=3, key_chunk_size=4)
TOL = dict(rtol=1e-12, atol=1e-12)


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    q, k, v, d_out = (
        rng.standard_normal(shape) for shape in ((B, L, H, D), (B, S, K, D), (B, S, K, E), (B, L, H, E))
    )
    return q, k, v, d_out


def test_torch_internal_api_matches_public():
    torch = pytest.importorskip("torch")
    from memory_efficient_attention._config import make_config
    from memory_efficient_attention._spec import seed_dims
    from memory_efficient_attention.torch import efficient_dot_product_attention, kernel

    q, k, v, d_out = (torch.tensor(x, dtype=torch.float64) for x in _arrays())
    dims = seed_dims(q.shape, k.shape, v.shape)
    g = H // K

    def to5(x):  # [B, L, H, .] -> [B, K, L, G, .]
        return x.reshape(B, L, K, g, x.shape[-1]).permute(0, 2, 1, 3, 4)

    def from5(x):
        return x.permute(0, 2, 1, 3, 4).reshape(B, L, H, x.shape[-1])

    def from4(x):  # [B, K, S, .] -> [B, S, K, .]
        return x.transpose(1, 2)

    q5, k4, v4 = to5(q), k.transpose(1, 2), v.transpose(1, 2)

    # attention: the public pipeline on kernel-layout tensors (the seed's mask rule and exclusion).
    ref, ref_lse = efficient_dot_product_attention(q, k, v, is_causal=True, return_lse=True, **CHUNKS)
    out, lse = kernel.attention(q5, k4, v4, dims, mask_fill="min", is_causal=True, **CHUNKS)
    torch.testing.assert_close(from5(out), ref, **TOL)
    torch.testing.assert_close(lse.permute(0, 2, 1, 3).reshape(B, L, H), ref_lse, **TOL)
    keep = torch.rand(B, H, L, S, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every row keeps a key: "exclude" and "min" then agree
    out, _ = kernel.attention(q5, k4, v4, dims, mask=keep, **CHUNKS)
    torch.testing.assert_close(
        from5(out), efficient_dot_product_attention(q, k, v, mask=keep, **CHUNKS), **TOL
    )

    # check_qkv: the public checks.
    for bad in ((1, k, v), (q, k.to(torch.int64), v)):
        with pytest.raises(Exception) as public:
            efficient_dot_product_attention(*bad)
        with pytest.raises(type(public.value), match="."):
            kernel.check_qkv(*bad)

    # forward_block / backward_block: one block, natural lse, gradients of the public function.
    cfg = make_config(dims, "float64", is_causal=True, **CHUNKS)
    out5, lse = kernel.forward_block(cfg, q5, k4, v4)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref, ref_lse = efficient_dot_product_attention(*leaves, is_causal=True, return_lse=True, **CHUNKS)
    torch.testing.assert_close(from5(out5), ref.detach(), **TOL)
    torch.testing.assert_close(lse.permute(0, 2, 1, 3).reshape(B, L, H), ref_lse.detach(), **TOL)
    dq5, dk4, dv4 = kernel.backward_block(cfg, q5, k4, v4, out5, lse, to5(d_out))
    ref_grads = torch.autograd.grad(ref, leaves, d_out)
    for got, want in zip((from5(dq5), from4(dk4), from4(dv4)), ref_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_jax_internal_api_matches_public():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from memory_efficient_attention._config import make_config
    from memory_efficient_attention._spec import seed_dims
    from memory_efficient_attention.jax import efficient_dot_product_attention, kernel

    q, k, v, d_out = (jnp.asarray(x, jnp.float64) for x in _arrays())
    dims = seed_dims(q.shape, k.shape, v.shape)
    cfg = make_config(dims, "float64", is_causal=True, device=jax.default_backend(), **CHUNKS)

    def public(q, k, v):
        return efficient_dot_product_attention(q, k, v, is_causal=True, return_lse=True, **CHUNKS)

    (ref, ref_lse), vjp = jax.vjp(public, q, k, v)
    out, lse = kernel.forward_block(cfg, q, k, v)
    np.testing.assert_allclose(out, ref, **TOL)
    np.testing.assert_allclose(lse, ref_lse, **TOL)
    grads = kernel.backward_block(cfg, q, k, v, out, lse, d_out)
    for got, want in zip(grads, vjp((d_out, jnp.zeros_like(ref_lse)))):
        np.testing.assert_allclose(got, want, **TOL)

    # varying_like: outside shard_map the carry comes back unchanged.
    carry = (jnp.zeros(3), {"x": jnp.ones(2)})
    same = kernel.varying_like(carry, q, k)
    assert jax.tree.structure(same) == jax.tree.structure(carry)
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(carry)))
