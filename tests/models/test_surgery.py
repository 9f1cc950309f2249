"""Architecture surgery (models/surgery.py): every documented guarantee of upcycling and RoPE -> iRoPE conversion,
and plans that cannot map fail naming the tensor."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llamoe.attention.rope import rope_angles
from llamoe.models import ConfigError, ModelConfig, MoEConfig
from llamoe.models.build import build_model
from llamoe.models.config import AttentionConfig, RopeConfig
from llamoe.models.surgery import COPY, INIT, TRANSFORM, apply, plan
from llamoe.moe.layer import MoE

D, F = 32, 96  # model dim, dense FFN hidden


def dense(**fields: object) -> ModelConfig:
    base = ModelConfig(
        dim=D, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=F, max_seq_len=256,
        rope=RopeConfig(theta=10000.0),
    )  # fmt: skip
    return replace(base, **fields)


def moe_target(source: ModelConfig, **moe: object) -> ModelConfig:
    return replace(source, moe=MoEConfig(**{"num_experts": 4, "expert_hidden_dim": F, **moe}))


def upcycled(source: ModelConfig, target: ModelConfig, mode: str, noise: float = 0.0, seed: int = 0, **build):
    """(source model, target model built with its own init then filled by the plan)."""
    src = randomized(build_model(source, seed=1))
    tgt = build_model(target, seed=2, **build)
    apply(plan(source, target, mode), src.state_dict(), tgt, noise=noise, seed=seed)
    return src.eval(), tgt.eval()


@torch.no_grad()
def randomized(model):
    """Weights well away from the small init (std 0.3, norm gains around 1), so every difference shows."""
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.normal_(1.0, 0.2, generator=gen) if p.dim() == 1 else p.normal_(0.0, 0.3, generator=gen)
    return model


def positive_tokens(n: int = 50) -> torch.Tensor:
    """Inputs with every coordinate positive, so a router with large positive weights scores exactly 1."""
    return torch.rand(1, n, D) + 0.1


def unit_gates(layer: MoE) -> None:
    """Router weights that make every sigmoid gate exactly 1.0 in fp32 on positive inputs (logits > 100)."""
    with torch.no_grad():
        layer.router.gate.weight.fill_(10.0)


# ----------------------------------------------------------------------------- upcycling guarantees


@pytest.mark.parametrize("shared", [0, 1])
def test_partition_with_every_expert_active_and_unit_gates_is_the_dense_ffn(shared: int) -> None:
    source = dense()
    expert_hidden = (F - 32 * shared) // 4  # shared expert 32 units (when present) + 4 experts
    target = moe_target(
        source, top_k=4, expert_hidden_dim=expert_hidden, num_shared_experts=shared, shared_expert_hidden_dim=32
    )
    src, tgt = upcycled(source, target, "partition")
    layer = tgt.layers[0].feed_forward
    unit_gates(layer)
    x = positive_tokens()
    flat = x.reshape(-1, D)
    routing = layer.router(flat)
    assert torch.equal(routing.weights, torch.ones_like(routing.weights))  # the guarantee's premise, exactly
    with torch.no_grad():
        want = src.layers[0].feed_forward(x)
        got = layer(x).out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and the premise matters: with the fresh router's gates (not all 1) the output differs
    with torch.no_grad():
        fresh = upcycled(source, target, "partition")[1].layers[0].feed_forward(x).out
    assert (fresh - want).abs().max() > 0.1 * want.abs().max()


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("top_k", [2, 4])  # top-1 renormalised is refused: its gate is a constant 1
def test_copy_with_gates_summing_to_one_on_the_output_is_the_dense_ffn(shared: int, top_k: int) -> None:
    source = dense()
    target = moe_target(
        source, top_k=top_k, num_shared_experts=shared, score_func="softmax", score_on="output", renormalize=True
    )
    src, tgt = upcycled(source, target, "copy")
    x = torch.randn(2, 30, D)  # any input; the fresh router's routing, whatever it is
    with torch.no_grad():
        torch.testing.assert_close(
            tgt.layers[1].feed_forward(x).out, src.layers[1].feed_forward(x), rtol=1e-5, atol=1e-6
        )


def test_copy_experts_equal_the_dense_ffn_and_halve_w2_beside_a_shared_expert() -> None:
    source = dense()
    for shared, scale in ((0, 1.0), (1, 0.5)):
        src, tgt = upcycled(source, moe_target(source, num_shared_experts=shared), "copy")
        ffn, layer = src.layers[0].feed_forward, tgt.layers[0].feed_forward
        for e in range(4):
            assert torch.equal(layer.experts.w1[e], ffn.w1.weight.t())
            assert torch.equal(layer.experts.w3[e], ffn.w3.weight.t())
            assert torch.equal(layer.experts.w2[e], ffn.w2.weight.t() * scale)
        if shared:
            assert torch.equal(layer.shared_expert.w2.weight, ffn.w2.weight * scale)
            assert torch.equal(layer.shared_expert.w1.weight, ffn.w1.weight)


def test_partition_assigns_consecutive_hidden_units_shared_first() -> None:
    source = dense()
    target = moe_target(source, expert_hidden_dim=16, num_shared_experts=1, shared_expert_hidden_dim=32)
    src, tgt = upcycled(source, target, "partition")
    ffn, layer = src.layers[1].feed_forward, tgt.layers[1].feed_forward
    assert torch.equal(layer.shared_expert.w3.weight, ffn.w3.weight[:32])
    for e in range(4):
        units = slice(32 + 16 * e, 48 + 16 * e)
        assert torch.equal(layer.experts.w3[e], ffn.w3.weight[units].t())
        assert torch.equal(layer.experts.w2[e], ffn.w2.weight[:, units].t())


def test_router_and_balancing_state_start_fresh_and_everything_else_is_copied() -> None:
    source = dense()
    target = moe_target(source, num_shared_experts=0, bias_balancing=True)
    p = plan(source, target, "copy")
    fresh_names = ("router.gate.weight", "router.expert_bias", "router.expert_load")
    assert sorted(p.names(INIT)) == sorted(f"layers.{i}.feed_forward.{n}" for i in (0, 1) for n in fresh_names)
    assert p.names(TRANSFORM) == [f"layers.{i}.feed_forward.experts.{m}" for i in (0, 1) for m in ("w1", "w3", "w2")]
    src, tgt = upcycled(source, target, "copy")
    fresh = build_model(target, seed=2).state_dict()
    for key, value in tgt.state_dict().items():
        if key in p.names(COPY):
            assert torch.equal(value, src.state_dict()[key]), key
        elif key in p.names(INIT):
            assert torch.equal(value, fresh[key]), key  # the model's own init, untouched


def test_noise_is_relative_seeded_and_sharded_consistently() -> None:
    source = dense()
    target = moe_target(source, num_shared_experts=1)
    src, a = upcycled(source, target, "copy", noise=0.01, seed=5)
    _, b = upcycled(source, target, "copy", noise=0.01, seed=5)
    _, c = upcycled(source, target, "copy", noise=0.01, seed=6)
    w1 = src.layers[0].feed_forward.w1.weight.t()
    experts = a.layers[0].feed_forward.experts.w1
    assert torch.equal(experts, b.layers[0].feed_forward.experts.w1)  # same seed, same experts
    assert not torch.equal(experts, c.layers[0].feed_forward.experts.w1)
    deviations = [((experts[e] - w1).std() / w1.std()).item() for e in range(4)]
    assert all(0.008 < d < 0.012 for d in deviations), deviations
    assert not torch.equal(experts[0], experts[1])  # the copies are no longer identical
    assert torch.equal(a.layers[0].feed_forward.shared_expert.w1.weight, src.layers[0].feed_forward.w1.weight)
    _, shard = upcycled(source, target, "copy", noise=0.01, seed=5, ep_rank=1, ep_size=2)
    assert torch.equal(shard.layers[0].feed_forward.experts.w1, experts[2:])  # rank 1 holds experts 2 and 3


# ----------------------------------------------------------------------------- RoPE -> iRoPE


IROPE = AttentionConfig(nope_layer_interval=2, chunk_size=16, qk_norm=True, temperature_tuning=True, floor_scale=8.0)


def test_rope_to_irope_copies_every_tensor_unchanged() -> None:
    source = dense(n_layers=4)
    target = replace(source, attention=IROPE, rope=RopeConfig(theta=500000.0))
    p = plan(source, target)
    assert {s.action for s in p.steps} == {COPY}  # QK-norm and temperature have no weights
    assert "attention.nope_layer_interval: None -> 2" in p.notes and "rope.theta: 10000.0 -> 500000.0" in p.notes
    src, tgt = upcycled(source, target, "copy")
    for key, value in tgt.state_dict().items():
        assert torch.equal(value, src.state_dict()[key]), key


def _attention_output(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.size(1))
    with torch.no_grad():
        return model.layers[layer].attention(x, rope_angles(model.rope_freqs, positions), 0, None)


def test_rope_layers_without_qk_norm_are_unchanged_within_one_chunk() -> None:
    source = dense(n_layers=4)
    target = replace(source, attention=replace(IROPE, qk_norm=False))
    src, tgt = upcycled(source, target, "copy")
    x = torch.randn(2, 40, D)
    for layer in (0, 2):  # the RoPE (chunked) layers
        inside = (_attention_output(tgt, layer, x[:, :16]), _attention_output(src, layer, x[:, :16]))
        torch.testing.assert_close(*inside, rtol=1e-5, atol=1e-6)
        beyond = _attention_output(tgt, layer, x)[:, 16:] - _attention_output(src, layer, x)[:, 16:]
        assert beyond.abs().max() > 1e-3  # past the first chunk the mask differs
    assert (_attention_output(tgt, 1, x) - _attention_output(src, 1, x)).abs().max() > 1e-3  # NoPE drops the rotation


def test_a_larger_chunk_and_no_nope_layers_keep_the_logits_up_to_the_chunk_size() -> None:
    source = dense(n_layers=2)
    target = replace(source, attention=AttentionConfig(chunk_size=32))
    src, tgt = upcycled(source, target, "copy")
    tokens = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(tgt(tokens).logits, src(tokens).logits, rtol=1e-5, atol=1e-5)


def test_temperature_is_one_below_floor_scale() -> None:
    target = replace(dense(n_layers=2), attention=replace(IROPE, qk_norm=False))
    model = randomized(build_model(target, seed=3)).eval()
    x = torch.randn(1, 20, D)
    with_temperature = _attention_output(model, 1, x)
    model.set_attention(temperature_tuning=False)
    without = _attention_output(model, 1, x)
    torch.testing.assert_close(with_temperature[:, :7], without[:, :7], rtol=0, atol=0)  # p < floor_scale - 1
    assert (with_temperature[:, 7:] - without[:, 7:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- what cannot map


@pytest.mark.parametrize(
    ("source", "target", "mode", "tensor"),
    [
        (dense(), moe_target(dense(), expert_hidden_dim=20, num_shared_experts=0), "partition", "experts.w1"),
        (dense(), moe_target(dense(), expert_hidden_dim=48), "copy", "layers.0.feed_forward.experts.w1"),
        (dense(), moe_target(dense(), shared_expert_hidden_dim=48), "copy", "shared_expert.w1.weight"),
        (moe_target(dense()), dense(), "copy", "layers.0.feed_forward.w1.weight"),
        (dense(), dense(dim=64, n_heads=4), "copy", "tok_embeddings.weight"),
        (dense(), dense(vocab_size=65), "copy", "tok_embeddings.weight"),
        (dense(n_layers=3), dense(), "copy", "layers.2.attention_norm.weight"),
        (dense(), dense(n_layers=3), "copy", "layers.2.attention_norm.weight"),
        (dense(), dense(tie_embeddings=True), "copy", "output.weight"),
        (moe_target(dense(), num_experts=4), moe_target(dense(), num_experts=8), "copy", "router.gate.weight"),
    ],
)
def test_a_mapping_that_cannot_be_made_names_the_tensor(source, target, mode: str, tensor: str) -> None:
    with pytest.raises(ConfigError, match=tensor) as err:
        plan(source, target, mode)
    assert err.value.key == "init_from"


def test_a_tied_source_fills_an_untied_head_and_moe_layers_copy() -> None:
    source = moe_target(dense(tie_embeddings=True), interleave_step=2)
    target = moe_target(dense(), interleave_step=1)  # layer 0: dense -> MoE, layer 1: MoE -> MoE
    p = plan(source, target)
    assert "layers.1.feed_forward.experts.w1" in p.names(COPY) and "output.weight" in p.names(COPY)
    src, tgt = upcycled(source, target, "copy")
    assert torch.equal(tgt.output.weight, src.tok_embeddings.weight)
    assert torch.equal(tgt.layers[1].feed_forward.router.gate.weight, src.layers[1].feed_forward.router.gate.weight)
