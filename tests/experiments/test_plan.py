"""`llamoe plan`: exact parameter counts, state bytes equal to what DeepSpeed allocates, activations as measured.

Activation memory is measured two ways on CPU, for a tiny Llama 4 (RoPE + chunked + QK-norm layers, a
NoPE layer with temperature tuning, dense and MoE FFNs with a shared expert, bias balancing):
- saved tensors: every tensor autograd packs for backward (torch.autograd.graph.saved_tensors_hooks),
  kept only if still alive once the loss is computed, counted once per storage, parameters excluded;
  plus the logits the caller holds. That is the activation memory of the forward, and bf16 copies of
  the weights (autocast) are picked out and checked against `weight_casts`.
- peak memory growth: a TorchDispatchMode that records the storage of every tensor an op returns
  during one forward and backward, and after each op sums the bytes of those still alive (storage weak
  references); the maximum over the step, with parameters and existing gradients excluded.
"""

import gc
import json
import weakref
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from llamoe.experiments.cli import main as llamoe
from llamoe.experiments.commands.plan import (
    Layout,
    activation_bytes,
    alltoall_bytes,
    params_per_rank,
    plan,
    state_bytes,
    weight_cast_bytes,
    zero_partition,
)
from llamoe.experiments.config import load_run_config, resolve_model
from llamoe.experiments.train.distributed import launch
from llamoe.experiments.train.loop import lm_loss
from llamoe.models import ModelConfig, Transformer, presets

WORKER = Path(__file__).resolve().parent / "plan_worker.py"
TINY = ["dim=64", "n_layers=4", "n_heads=4", "n_kv_heads=2", "multiple_of=16", "attention.chunk_size=64",
        "moe.num_experts=4", "moe.expert_hidden_dim=64", "moe.interleave_step=2"]  # fmt: skip
# dim 42 makes the norm/embedding group 320·42 + 5·42 = 13650 elements: DeepSpeed pads it for 2 ranks
SMALL_MOE = ["model=llama4-tiny", "model.dim=42", "model.n_layers=2", "model.n_heads=3", "model.n_kv_heads=1",
             "model.multiple_of=16", "model.attention.chunk_size=16", "model.attention.nope_layer_interval=2",
             "model.moe.num_experts=4", "model.moe.expert_hidden_dim=64", "model.moe.interleave_step=1",
             "train.batch_size=2", "train.seq_len=16"]  # fmt: skip


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = llamoe(["plan", *args])
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------------- exact counts
def test_scout_on_16_gpus_with_ep16_holds_the_non_expert_params_and_a_16th_of_the_experts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, out, _ = run_cli(["llama4-scout", "--gpus", "16", "--ep", "16", "--json"], capsys)
    assert status == 0
    result = json.loads(out)
    routed = 48 * 16 * 3 * 5120 * 8192  # all 48 layers MoE, 16 experts of SwiGLU 5120 -> 8192
    non_expert = 107_769_861_120 - routed  # shared/REFERENCE.md total
    assert result["params"] == {"total": 107_769_861_120, "non_expert": non_expert, "routed_experts": routed}
    assert result["params_per_rank"] == non_expert + routed // 16 == 17_172_894_720
    assert set(result["memory_gib"]) >= {"params", "grads", "optimizer", "activations", "total"}
    assert result["fits"] is False  # fp32 weights and gradients alone need 128 GiB


@pytest.mark.parametrize("name", ["llama4-scout", "llama4-maverick", "llama4-tiny"])
def test_routed_expert_count_equals_the_experts_of_the_built_model(name: str) -> None:
    cfg = presets.get(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert cfg.num_expert_params() == experts
    assert presets.get("llama3.1-8b").num_expert_params() == 0


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_plans_for_several_layouts(name: str) -> None:
    cfg = presets.get(name)
    experts = cfg.moe.num_experts if cfg.moe else 1
    layouts = [
        Layout(gpus=8),
        Layout(gpus=64, ep=min(experts, 8), zero=1, checkpointing=True),
        Layout(gpus=128, ep=min(experts, 128), zero=2, gpu="b200", dtype="fp32", seq_len=4096, micro_batch=2),
    ]
    if cfg.moe is None:
        layouts.append(Layout(gpus=16, zero=3, gpu="a100"))
    for lay in layouts:
        p = plan(cfg, lay, name)
        mem = p["memory_bytes"]
        assert mem["total"] == sum(v for k, v in mem.items() if k != "total") > 0
        assert p["params_per_rank"] <= cfg.num_params()
        assert p["step_time_lower_bound_s"] >= p["bound_terms_s"]["compute_s"] > 0
        assert isinstance(p["fits"], bool) and p["flops_per_token"] == cfg.flops_per_token(lay.seq_len)
        json.dumps(p)


def test_zero3_shards_a_dense_model_and_the_table_prints(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = presets.get("llama3.1-405b")
    zero3 = plan(cfg, Layout(gpus=64, zero=3))
    no_decay = (128256 + 2 * 126 + 1) * 16384  # embedding and norm gains
    shards = zero_partition(405_853_388_800 - no_decay, 64) + zero_partition(no_decay, 64)
    assert zero3["params_per_rank"] == shards == 405_853_388_800 // 64  # both groups split evenly
    assert zero3["memory_bytes"]["optimizer"] == 3 * zero3["memory_bytes"]["params"]
    status, out, _ = run_cli(["llama3.1-405b", "--gpus", "64", "--zero", "3", "--activation-checkpointing"], capsys)
    assert status == 0 and "params_per_rank" in out and "step time >=" in out and "989.4 TFLOP/s" in out


# ---------------------------------------------------------------------- communication
def test_alltoall_bytes_split_by_node() -> None:
    scout = presets.get("llama4-scout")
    per_rank = 48 * 2 * 8192 * 5120 * (2 + 2)  # MoE layers x (fwd, bwd) x slots x dim x (bf16 dispatch + combine)
    assert alltoall_bytes(scout, Layout(gpus=16, ep=16)) == {
        "intra_node": per_rank * 7 // 16,  # 7 of the 15 peers share the node
        "inter_node": per_rank * 8 // 16,
    }
    assert alltoall_bytes(scout, Layout(gpus=16, ep=8)) == {"intra_node": per_rank * 7 // 8, "inter_node": 0}
    with_ckpt = alltoall_bytes(scout, Layout(gpus=16, ep=8, checkpointing=True))
    assert with_ckpt["intra_node"] == per_rank * 3 // 2 * 7 // 8  # the recomputed forward exchanges again
    assert alltoall_bytes(scout, Layout(gpus=16)) == {"intra_node": 0, "inter_node": 0}


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["llama4-nope", "--gpus", "8"], "MODEL"),
        (["llama4-scout", "--gpus", "16", "--ep", "3"], "--ep"),
        (["llama4-scout", "--gpus", "32", "--ep", "32"], "--ep"),  # divides the gpus, not the 16 experts
        (["llama3.1-8b", "--gpus", "8", "--ep", "2"], "--ep"),
        (["llama3.1-8b", "--gpus", "8", "--zero", "4"], "--zero"),
        (["llama4-scout", "--gpus", "16", "--ep", "16", "--zero", "3"], "--zero"),
        (["llama3.1-8b", "--gpus", "8", "--gpu", "v100"], "--gpu"),
        (["llama3.1-8b", "--gpus", "eight"], "--gpus"),
        (["llama3.1-8b"], "--gpus"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_option(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_cli(args, capsys)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and option in err and err.startswith("llamoe plan: ")


def test_moe_with_zero3_says_what_to_use_instead(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run_cli(["llama4-maverick", "--gpus", "64", "--ep", "8", "--zero", "3"], capsys)
    assert "MoE + ZeRO-3 is unsupported; use --zero 1 or 2 with --ep" in err


# ---------------------------------------------------------------------- activations
def tiny_model(extra: tuple[str, ...] = (), seq_len: int = 128) -> tuple[ModelConfig, Transformer, torch.Tensor]:
    """A tiny Llama 4 and 2 sequences of `seq_len` + 1 tokens (128: two chunks of 64; 200: a padded last chunk)."""
    torch.manual_seed(0)
    cfg = resolve_model("llama4-tiny", [*TINY, *extra])
    return cfg, Transformer(cfg), torch.randint(0, cfg.vocab_size, (2, seq_len + 1))


def loss_of(model: Transformer, tokens: torch.Tensor, dtype: str) -> tuple[Any, torch.Tensor]:
    """The training loop's forward (autocast for bf16) and loss (train.lm_loss: head and fp32 cross-entropy in
    checkpointed chunks, outside autocast)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(tokens[:, :-1])
    return out, lm_loss(out, tokens[:, 1:]) + out.aux_loss


VARIANT = ("moe.score_on=output", "moe.aux_loss_weight=0.01", "moe.top_k=2", "attention.qk_norm=false")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(("extra", "seq_len"), [((), 128), (VARIANT, 200)])
def test_activation_estimate_equals_the_bytes_autograd_saves(dtype: str, extra: tuple[str, ...], seq_len: int) -> None:
    cfg, model, tokens = tiny_model(extra, seq_len)
    packed: list[weakref.ref[torch.Tensor]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, loss = loss_of(model, tokens, dtype)
    gc.collect()
    alive = [t for t in (ref() for ref in packed) if t is not None]  # the graph still holds them
    storages = {t.untyped_storage().data_ptr(): t for t in alive}
    for p in model.parameters():
        storages.pop(p.untyped_storage().data_ptr(), None)
    weights = [w for p in model.parameters() if p.dim() > 1 for w in (p.unbind() if p.dim() == 3 else [p])]
    weights += [w.t() for w in weights]  # matmuls keep some transposed; experts are cast one by one

    def is_cast(t: torch.Tensor) -> bool:
        return t.dtype == torch.bfloat16 and any(t.shape == w.shape and torch.equal(t, w.bfloat16()) for w in weights)

    casts = sum(t.untyped_storage().nbytes() for t in storages.values() if is_cast(t))
    saved = sum(t.untyped_storage().nbytes() for t in storages.values()) - casts
    assert saved == pytest.approx(activation_bytes(cfg, 2, seq_len, dtype)["saved"], rel=0.01)
    assert casts == weight_cast_bytes(cfg, Layout(gpus=1, dtype=dtype))
    assert loss.requires_grad


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages created under this mode that are alive at once, checked after every op."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip = skip
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.skip and (key not in self.live or self.live[key][0].expired()):
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def checkpoint_blocks(model: Transformer) -> None:
    """Full activation checkpointing: every block's forward recomputed in backward (non-reentrant)."""
    for block in model.layers:
        forward: Callable[..., Any] = block.forward
        block.forward = lambda *a, f=forward: checkpoint(f, *a, use_reentrant=False)  # type: ignore[method-assign]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_within_25_percent_of_peak_memory_growth(checkpointing: bool) -> None:
    cfg, model, tokens = tiny_model()
    if checkpointing:
        checkpoint_blocks(model)
    loss_of(model, tokens, "fp32")[1].backward()  # gradients exist: the measured step accumulates into them
    existing = {t.untyped_storage().data_ptr() for p in model.parameters() for t in (p, p.grad) if t is not None}
    with PeakMemory(existing) as memory:
        out, loss = loss_of(model, tokens, "fp32")
        loss.backward()
        del out, loss
    estimate = activation_bytes(cfg, 2, 128, "fp32", checkpointing)["peak"]
    assert estimate == pytest.approx(memory.peak, rel=0.25)
    assert (estimate < activation_bytes(cfg, 2, 128, "fp32")["peak"] / 2) == checkpointing


# ---------------------------------------------------------------------- against DeepSpeed
@pytest.mark.distributed
@pytest.mark.slow
def test_state_bytes_equal_what_two_gloo_ranks_allocate(tmp_path: Path) -> None:
    """Parameters, gradients, optimizer state and reduce buckets of each rank of a 2-process run, data parallel
    (ep 1) and expert parallel (ep 2), ZeRO 0-2, against `state_bytes` (fp32; gloo runs without overlap_comm).
    ZeRO-2's gradients are its partition (DeepSpeed also keeps whole gradients of edge-straddling parameters)."""
    layouts = [(ep, zero) for ep in (1, 2) for zero in (0, 1, 2)]
    runs = [[*SMALL_MOE, f"distributed.ep_size={ep}", f"distributed.zero_stage={zero}"] for ep, zero in layouts]
    (tmp_path / "plan.json").write_text(json.dumps(runs))
    assert launch(2, [str(WORKER), str(tmp_path / "plan.json"), str(tmp_path)], module=False, timeout=600) == 0
    cfg = load_run_config(None, SMALL_MOE, world_size=2).model
    assert cfg.dim * (cfg.vocab_size + 2 * cfg.n_layers + 1) % 4 == 2  # a padded ZeRO group
    for i, (ep, zero) in enumerate(layouts):
        lay = Layout(gpus=2, ep=ep, zero=zero, dtype="fp32", overlap_comm=False)
        planned = state_bytes(cfg, lay)
        for rank in (0, 1):
            got = json.loads((tmp_path / f"{i}_rank{rank}.json").read_text())
            where = f"ep={ep} zero={zero} rank={rank}"
            assert got["params"] == params_per_rank(cfg, lay), where
            assert planned["params"] == 4 * got["params"], where
            grads = {0: got["peak_grads"], 1: got["peak_grads"] + got["partition"], 2: got["partition"]}[zero]
            assert planned["grads"] == 4 * grads, where
            assert planned["optimizer"] == 4 * (got["masters"] + got["moments"]), where
            assert planned["buckets"] == 4 * got["buckets"], where
