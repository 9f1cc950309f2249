"""The one build path (models/build.py): meta -> shard -> to_empty -> init or load."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llamoe.attention.rope import rope_frequencies
from llamoe.config_error import ConfigError
from llamoe.models import ModelConfig, Transformer, presets
from llamoe.models.build import build_model
from llamoe.moe.experts.base import Experts


def _moe() -> ModelConfig:
    return replace(presets.get("llama4-tiny"), dim=64, n_heads=4, n_kv_heads=2, vocab_size=97)


def _expert_keys(model: Transformer) -> set[str]:
    return {f"{p}.{n}" for p, m in model.named_modules() if isinstance(m, Experts) for n in ("w1", "w3", "w2")}


@pytest.mark.parametrize("name", ["llama3.1-tiny", "llama4-tiny"])
def test_meta_build_equals_the_reference_init_and_leaves_the_global_rng_alone(name: str) -> None:
    cfg = presets.get(name)
    reference = Transformer(cfg)  # built eagerly on the CPU, then initialised from the seed
    torch.manual_seed(7)
    reference.init_weights()
    rng = torch.get_rng_state()
    built = build_model(cfg, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert built.training and all(t.device.type == "cpu" for t in built.state_dict().values())
    for (key, a), (_, b) in zip(reference.state_dict().items(), built.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    other = build_model(cfg, seed=8).state_dict()
    for key in _expert_keys(built) | {"tok_embeddings.weight"}:  # the seed decides every random tensor
        assert not torch.equal(other[key], built.state_dict()[key]), key


@pytest.mark.parametrize("ep_size", [2, 4])
def test_an_expert_parallel_rank_gets_exactly_its_slice_of_the_unsharded_init(ep_size: int) -> None:
    cfg = _moe()
    full = build_model(cfg, seed=3).state_dict()
    local = cfg.moe.num_experts // ep_size
    for rank in range(ep_size):
        shard = build_model(cfg, seed=3, ep_rank=rank, ep_size=ep_size)
        experts = _expert_keys(shard)
        assert experts and set(shard.state_dict()) == set(full)
        for key, value in shard.state_dict().items():
            want = full[key][rank * local : (rank + 1) * local] if key in experts else full[key]
            assert torch.equal(value, want), (rank, key)


def test_a_rank_allocates_only_its_experts() -> None:
    cfg = _moe()
    with torch.device("meta"):
        meta = Transformer(cfg)
    routed = sum(p.numel() for m in meta.modules() if isinstance(m, Experts) for p in m.parameters())
    assert sum(p.numel() for p in meta.parameters()) == cfg.num_params()
    shard = build_model(cfg, ep_rank=1, ep_size=4)
    assert all(p.device.type == "cpu" for p in shard.parameters())
    assert sum(p.numel() for p in shard.parameters()) == cfg.num_params() - routed + routed // 4
    with pytest.raises(ConfigError, match="distributed.ep_size"):
        build_model(cfg, ep_size=3)


def test_cast_keeps_the_rope_table_fp32_and_logits_match_a_bf16_build() -> None:
    cfg = presets.get("llama4-tiny")
    exact = rope_frequencies(cfg.head_size, cfg.rope)
    assert not torch.equal(exact.bfloat16().float(), exact)  # a rounded table would be detectably wrong
    model = build_model(cfg, seed=1)
    state = model.state_dict()
    model.to(torch.bfloat16)
    assert model.rope_freqs.dtype == torch.float32 and torch.equal(model.rope_freqs, exact)
    tokens = torch.randint(0, cfg.vocab_size, (2, 70))
    cast = build_model(cfg, dtype=torch.bfloat16, state_dict=state)
    assert cast.tok_embeddings.weight.dtype == torch.bfloat16 and cast.rope_freqs.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, cast.eval()(tokens).logits)


@pytest.mark.parametrize("name", ["llama3.1-tiny", "llama4-tiny"])
def test_a_loaded_state_dict_gives_identical_logits(name: str, tmp_path: Path) -> None:
    cfg = presets.get(name)
    saved = build_model(cfg, seed=5).eval()
    torch.save(saved.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True, mmap=True)
    loaded = build_model(cfg, seed=6, state_dict=state).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        assert torch.equal(saved(tokens).logits, loaded(tokens).logits)
    del state["norm.weight"]
    with pytest.raises(RuntimeError, match="norm.weight"):
        build_model(cfg, state_dict=state)


def test_a_shard_loads_its_experts_from_the_whole_models_state_dict(tmp_path: Path) -> None:
    cfg = _moe()
    full = build_model(cfg, seed=2).state_dict()
    torch.save(full, tmp_path / "model.pt")
    mapped = torch.load(tmp_path / "model.pt", weights_only=True, mmap=True)  # as a resume reads a checkpoint
    shard = build_model(cfg, seed=9, state_dict=mapped, ep_rank=1, ep_size=2)
    local = cfg.moe.num_experts // 2
    for key, value in shard.state_dict().items():
        want = full[key][local:] if key in _expert_keys(shard) else full[key]
        assert torch.equal(value, want), key


def test_tied_embeddings_stay_tied_after_materialising() -> None:
    cfg = replace(presets.get("llama3.1-tiny"), tie_embeddings=True)
    for model in (build_model(cfg), build_model(cfg, state_dict=build_model(cfg, seed=1).state_dict())):
        assert model.output.weight is model.tok_embeddings.weight
        assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
