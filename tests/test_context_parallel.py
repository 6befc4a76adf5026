"""Hugging Face context parallelism (``integrations.context_parallel``) on 2 gloo ranks: a tiny
random Llama (causal) and Mistral (sliding window) in float64, each rank running its zigzag shard,
give the single-process ``sdpa`` model's logits and, after summing over ranks, its parameter
gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from .gloo_ranks import run_ranks  # noqa: E402

WORLD, N = 2, 24


def _model(kind: str, attn: str):
    import transformers

    common = dict(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)  # the same random weights on every rank
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=7, **common))
    return model.to(torch.float64)


def _loss(model, ids, positions, labels):
    logits = model(input_ids=ids, position_ids=positions).logits
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100
    )
    loss.backward()
    return logits


def _case(rank: int, kind: str) -> list[float]:
    import torch.distributed as dist

    from memory_efficient_attention.distributed.torch import to_zigzag
    from memory_efficient_attention.integrations.context_parallel import register, shard_sequence

    ids = torch.randint(0, 50, (2, N), generator=torch.Generator().manual_seed(1))
    # One process, torch SDPA, the whole sequence.
    ref = _model(kind, "sdpa")  # (eager takes its softmax in float32)
    positions = torch.arange(N).expand_as(ids)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    ref_logits = _loss(ref, ids, positions, labels)
    # Each rank its zigzag shard; gradients summed over the ranks.
    model = _model(kind, register(layout="zigzag"))
    shard_ids, shard_pos, shard_labels = shard_sequence(ids, labels=ids, layout="zigzag")
    logits = _loss(model, shard_ids, shard_pos, shard_labels)
    ref_shard = to_zigzag(ref_logits, WORLD, dim=1).chunk(WORLD, dim=1)[rank]
    errors = [(logits - ref_shard).abs().max().item()]
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        dist.all_reduce(p.grad)
        errors.append((p.grad - p_ref.grad).abs().max().item())
    return errors


def _worker(rank: int, world: int, results: dict) -> None:
    for kind in ("llama", "mistral"):
        try:
            results[kind] = _case(rank, kind)
        except Exception as err:
            results[kind] = f"{type(err).__name__}: {err}"
            raise


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    return run_ranks(_worker, WORLD, str(tmp_path_factory.mktemp("cp")))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_context_parallel_model_equals_one_process(cp_results, kind):
    for rank, results in enumerate(cp_results):
        errors = results[kind]
        assert not isinstance(errors, str), f"rank {rank}: {errors}"
        assert max(errors) < 1e-9, f"rank {rank}: max errors (logits, parameter gradients) {errors}"


def test_padding_is_refused():
    from memory_efficient_attention.integrations.context_parallel import _no_mask

    with pytest.raises(ValueError, match="no padding"):
        _no_mask(1, 4, 4, attention_mask=torch.tensor([[1, 1, 0, 1]]))
    assert _no_mask(1, 4, 4, attention_mask=torch.ones(1, 4)) is None
