"""`llamoe plan MODEL`: what one rank of a training run holds in memory and sends per step, from the config alone.

The figures follow what this code does (experiments/train/loop.py, experiments/train/distributed.py):

- Weights, gradients and AdamW moments are fp32; `--dtype bf16` is autocast (train.precision=bf16),
  which adds bf16 copies of the matmul weights (`weight_casts`) and halves most activations.
- Expert parallelism (`--ep E`): each group of E consecutive ranks holds one copy of the routed
  experts, num_experts/E per MoE layer on each rank; everything else is replicated. So
  params_per_rank = non-expert parameters + routed-expert parameters / E, exactly.
- ZeRO (DeepSpeed): 0 keeps full gradients and moments (8 bytes a parameter). 1 and 2 shard the
  optimizer: each rank keeps an fp32 master copy and both moments of its partition (12 bytes an
  element) of every optimizer group, padded to a multiple of 2 elements per rank as DeepSpeed pads
  them. The groups are those of `optim.param_groups` (matrices; norm gains and embeddings), with the
  routed experts as their own group under EP, sharded over the expert-data-parallel group
  (gpus/E ranks) while the rest is sharded over all gpus. ZeRO-1 holds the full gradient at the
  end of backward and copies its partition out of it; ZeRO-2 keeps the partition only (DeepSpeed
  also keeps whole gradients of the parameters that straddle a partition edge, not counted). During
  backward both reduce through buckets of 5e8 fp32 elements, two with overlap_comm on GPU (`buffers`).
  ZeRO-3 (dense models only) also shards the weights and gradients (an estimate; per-tensor padding
  and prefetch buffers are not counted).
- Activations: the tensors autograd saves for backward, counted tensor by tensor from the forward
  (norms, attention with RoPE/QK-norm/temperature, FFN or router + experts + shared expert, head
  and loss). Attention is assumed to be flash or memory-efficient (q, k, v, output and a log-sum-exp
  are saved, never the L x L scores): SDPA's flash kernels on GPU with bf16, and SDPA on CPU. With
  `--activation-checkpointing` (full: every block recomputed in backward) each block keeps its input,
  plus the larger of the head's tensors and one block's recompute. The loss's backward working set
  (two fp32 [tokens, vocab] gradients) is added where it coincides with the peak. Routing is
  assumed balanced. On CPU the saved bytes match autograd's count exactly for a tiny Llama 4
  (tests/experiments/test_plan.py).
- The all-to-all moves each routed token-slot to the rank of its expert and back: forward dispatch
  (fp32: the normed hidden state) and combine (the activation dtype), the same in backward, and
  the forward again when checkpointing; (E-1)/E of the slots leave the rank. Counted as bytes a rank
  sends (it receives as many), split by whether the peer is on the same node.
- The step-time lower bound is max(compute, NVLink traffic, InfiniBand traffic), each at its peak:
  compute = flops_per_token x tokens / peak FLOP/s (x4/3 with checkpointing); gradient reduction is
  counted as an ideal hierarchical all-reduce (2(n-1)/n of the gradients per link level, 3(n-1)/n at
  ZeRO-3). No real step is faster; real steps are slower.

One step is one micro batch of `--micro-batch` sequences of `--seq-len` tokens per rank.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from llamoe.experiments.commands.bench import PEAK_TFLOPS
from llamoe.experiments.config import resolve_model
from llamoe.experiments.errors import UsageError
from llamoe.models import ModelConfig
from llamoe.models.loss import chunk_positions
from llamoe.models.presets import names as preset_names

GIB = 2**30
FP32 = 4
INDEX = 8  # int64 ids autograd keeps for gathers and scatters
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (distributed.py keeps it)
ZERO_ALIGN = 2  # DeepSpeed pads a flat ZeRO group to a multiple of 2 x (data-parallel size) elements


@dataclass(frozen=True)
class Gpu:
    """Spec-sheet figures of one GPU: memory, NVLink (both directions together) and InfiniBand (one direction)."""

    name: str  # the device-name key of experiments/commands/bench.py PEAK_TFLOPS
    memory_gib: float
    nvlink_gbps: float
    ib_gbps: float
    source: str

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak (no sparsity): bf16 tensor cores for bf16 autocast, plain fp32 otherwise."""
        return PEAK_TFLOPS[(self.name, torch.bfloat16 if dtype == "bf16" else torch.float32)]


# Memory is the datasheet's capacity in GB, which CUDA reports as about as many GiB (an 80 GB H100: 79.6 GiB).
GPUS = {
    "h100": Gpu("H100", 80, 900, 50, "NVIDIA H100 SXM5 80GB datasheet; one 400 Gb/s NDR NIC per GPU (DGX H100)"),
    "h200": Gpu("H200", 141, 900, 50, "NVIDIA H200 SXM 141GB datasheet; one 400 Gb/s NDR NIC per GPU"),
    "a100": Gpu("A100", 80, 600, 25, "NVIDIA A100 SXM4 80GB datasheet; one 200 Gb/s HDR NIC per GPU (DGX A100)"),
    "b200": Gpu(
        "B200", 180, 1800, 50, "NVIDIA HGX/DGX B200 datasheets (1,440 GB per 8 GPUs; 1000 W); 400 Gb/s per GPU"
    ),
}


@dataclass(frozen=True)
class Layout:
    """How the run is laid out; `overlap_comm` is what distributed.py sets on GPU (False on CPU)."""

    gpus: int
    gpus_per_node: int = 8
    ep: int = 1
    zero: int = 0
    seq_len: int = 8192
    micro_batch: int = 1
    checkpointing: bool = False
    dtype: str = "bf16"
    gpu: str = "h100"
    overlap_comm: bool = True

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def check_layout(cfg: ModelConfig, lay: Layout) -> None:
    """Raise UsageError naming the option for a layout this code cannot run."""

    def need(cond: bool, option: str, msg: str) -> None:
        if not cond:
            raise UsageError(f"{option}: {msg}")

    for option, value in (("--gpus", lay.gpus), ("--gpus-per-node", lay.gpus_per_node), ("--ep", lay.ep)):
        need(value >= 1, option, f"must be >= 1, got {value}")
    need(lay.seq_len >= 1, "--seq-len", f"must be >= 1, got {lay.seq_len}")
    need(lay.micro_batch >= 1, "--micro-batch", f"must be >= 1, got {lay.micro_batch}")
    need(lay.zero in (0, 1, 2, 3), "--zero", f"must be 0, 1, 2 or 3, got {lay.zero}")
    need(lay.dtype in ("bf16", "fp32"), "--dtype", f"must be bf16 or fp32, got {lay.dtype!r}")
    need(lay.gpu in GPUS, "--gpu", f"must be one of {'|'.join(GPUS)}, got {lay.gpu!r}")
    need(lay.gpus % lay.ep == 0, "--ep", f"{lay.ep} must divide --gpus {lay.gpus}")
    if cfg.moe is None:
        need(lay.ep == 1, "--ep", f"{lay.ep} needs an MoE model; this model has no routed experts")
    else:
        need(cfg.moe.num_experts % lay.ep == 0, "--ep", f"{lay.ep} must divide num_experts={cfg.moe.num_experts}")
        need(lay.zero < 3, "--zero", "MoE + ZeRO-3 is unsupported; use --zero 1 or 2 with --ep")


# ---------------------------------------------------------------------- parameters and ZeRO
def zero_partition(numel: int, dp: int) -> int:
    """Elements of a flat group of `numel` that DeepSpeed allocates on each of `dp` ranks (padding included)."""
    return -(-numel // (ZERO_ALIGN * dp)) * ZERO_ALIGN


def param_groups(cfg: ModelConfig, lay: Layout) -> list[tuple[str, int, int]]:
    """(group, parameters a rank holds in it, ranks it is sharded over) for the optimizer groups of
    optim.param_groups: matrices, then norm gains and embeddings; under EP the routed experts split off
    (deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer)."""
    no_decay = cfg.vocab_size * cfg.dim + (2 * cfg.n_layers + 1) * cfg.dim
    decay = cfg.num_params() - no_decay
    if lay.ep == 1:
        return [("decay", decay, lay.gpus), ("no_decay", no_decay, lay.gpus)]
    experts = cfg.num_expert_params()
    return [
        ("decay", decay - experts, lay.gpus),
        ("no_decay", no_decay, lay.gpus),
        ("experts", experts // lay.ep, lay.gpus // lay.ep),
    ]


def params_per_rank(cfg: ModelConfig, lay: Layout) -> int:
    """Parameters a rank holds: its share of the routed experts plus everything else (ZeRO-3: its partition)."""
    groups = param_groups(cfg, lay)
    if lay.zero == 3:
        return sum(zero_partition(n, dp) for _, n, dp in groups)
    return sum(n for _, n, _ in groups)


def state_bytes(cfg: ModelConfig, lay: Layout) -> dict[str, int]:
    """Bytes of fp32 weights, gradients, optimizer state and DeepSpeed's reduce buckets on one rank."""
    held = params_per_rank(cfg, lay)
    part = sum(zero_partition(n, dp) for _, n, dp in param_groups(cfg, lay))
    buckets = REDUCE_BUCKET * FP32 * (2 if lay.overlap_comm else 1) if lay.zero > 0 else 0
    return {
        "params": FP32 * held,
        "grads": FP32 * {0: held, 1: held + part}.get(lay.zero, part),
        "optimizer": 2 * FP32 * held if lay.zero == 0 else 3 * FP32 * part,
        "buckets": buckets,
    }


def weight_cast_bytes(cfg: ModelConfig, lay: Layout) -> int:
    """bf16 copies autocast makes of the matmul weights and keeps for backward: not the embedding, the norms, the
    fp32 routers (moe/precision.py), or the output head, whose copy the chunked loss remakes per chunk."""
    if lay.dtype != "bf16":
        return 0
    vocab = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)  # embedding and head
    routers = sum(cfg.is_moe(i) for i in range(cfg.n_layers)) * cfg.moe.num_experts * cfg.dim if cfg.moe else 0
    return 2 * (params_per_rank(cfg, lay) - vocab - routers - (2 * cfg.n_layers + 1) * cfg.dim)


# ---------------------------------------------------------------------- activations
def _inputs(linears: int, numel: int, act: int) -> int:
    """An fp32 input read by `linears` matmuls: saved once in fp32, or as one bf16 cast per matmul."""
    return FP32 * numel if act == FP32 else linears * act * numel


def _norm(cfg: ModelConfig, t: int) -> int:
    return 2 * FP32 * t * cfg.dim + FP32 * t  # its fp32 input, the normalised x and 1/rms


def attention_bytes(cfg: ModelConfig, layer: int, batch: int, seq_len: int, act: int) -> int:
    """Saved by attention_norm and Attention: the projections' input, QK-norm's input (RoPE keeps only the shared
    cos/sin table, temperature only its scale), q/k/v as the kernel reads them, its output and log-sum-exp, and
    wo's input, a copy only where chunks were concatenated (attention/chunked.py)."""
    t = batch * seq_len
    hq, hk = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    n = _norm(cfg, t) + _inputs(3, t * cfg.dim, act)
    if cfg.uses_rope(layer) and cfg.attention.qk_norm:
        n += FP32 * t * (hq + hk) + FP32 * t * (cfg.n_heads + cfg.kv_heads)  # fp32 input and 1/rms
    if not cfg.uses_rope(layer) and cfg.attention.temperature_tuning:
        n += FP32 * seq_len
    n += act * t * (hq + 2 * hk)  # q, k, v
    padded = seq_len
    chunk = cfg.attention.chunk_size
    if cfg.is_chunked(layer) and chunk is not None and seq_len > chunk:
        padded = chunk + -(-(seq_len - chunk) // chunk) * chunk
        n += act * t * hq  # wo reads a copy of the concatenated chunks
        if padded > seq_len:  # the last chunk is padded: q, k, v after the first chunk are copies
            n += act * batch * (padded - chunk) * (hq + 2 * hk)
    return n + (act * hq + FP32 * cfg.n_heads) * batch * padded  # output, log-sum-exp


def ffn_bytes(cfg: ModelConfig, layer: int, t: int, act: int) -> int:
    """Saved by ffn_norm and the dense SwiGLU or the MoE layer (router, routed experts, shared expert)."""
    n = _norm(cfg, t)
    if not cfg.is_moe(layer):
        return n + _inputs(2, t * cfg.dim, act) + 4 * act * t * cfg.ffn_hidden
    moe = cfg.moe
    assert moe is not None
    slots = t * moe.top_k  # dropless and balanced: every token-slot is computed once
    shared = moe.shared_expert_hidden
    n += FP32 * t * cfg.dim  # the router reads the normed input in fp32 (moe/precision.py)
    n += 2 * act * t * cfg.dim * (shared > 0 and act != FP32)  # the shared expert's casts of it
    n += FP32 * t * moe.num_experts + INDEX * slots  # router scores; the chosen ids
    n += FP32 * t * moe.num_experts + FP32 * t  # the z-loss's logsumexp input and output (kept even at weight 0)
    if moe.aux_loss_weight > 0 and moe.score_func == "sigmoid":
        n += FP32 * t  # the scores' sum, normalising them for the aux loss
    n += 2 * INDEX * slots  # slot and token ids
    if moe.score_on == "input":  # the weights multiply the slots in the compute dtype
        n += act * slots + act * slots * cfg.dim  # the weights and the permuted slots, kept by the multiply
        n += act * slots * cfg.dim  # the scaled slots the experts read
        n += FP32 * slots * cfg.dim  # the experts' output in the stream's dtype, kept by the scatter-add
    else:
        n += act * slots * cfg.dim  # the permuted slots the experts read
        n += FP32 * slots + FP32 * slots * cfg.dim  # the weights and the experts' fp32 output, kept by the multiply
        n += FP32 * slots * cfg.dim  # the weighted output, kept by the scatter-add back to tokens
    n += 4 * act * slots * moe.expert_hidden_dim  # w1 and w3 outputs, silu, their product
    return n + 4 * act * t * shared


def block_bytes(cfg: ModelConfig, layer: int, batch: int, seq_len: int, act: int) -> int:
    return attention_bytes(cfg, layer, batch, seq_len, act) + ffn_bytes(cfg, layer, batch * seq_len, act)


def activation_bytes(
    cfg: ModelConfig, batch: int, seq_len: int, dtype: str = "bf16", checkpointing: bool = False
) -> dict[str, int]:
    """Activation memory of one forward and backward of `batch` x `seq_len` tokens, weight casts aside.

    "saved": the most bytes autograd keeps for backward at once (at the end of the forward; with
    checkpointing, each block's input plus the head's tensors or one recomputed block). "peak" adds
    the loss's backward working set (two fp32 [tokens, vocab] gradients) where it coincides.
    """
    t = batch * seq_len
    act = 2 if dtype == "bf16" else FP32
    held = INDEX * t + FP32 * seq_len * cfg.head_size  # ids, RoPE table
    head = _norm(cfg, t) + FP32 * t * cfg.dim + INDEX * t  # the final norm, its output (the loss's input), targets
    c = min(t, chunk_positions(cfg.vocab_size))  # the loss recomputes one chunk's logits at a time (models/loss.py)
    loss = 3 * FP32 * c * cfg.vocab_size  # the chunk's fp32 log-softmax, its gradient and the logits' gradient
    if act != FP32:
        loss += act * c * (cfg.dim + cfg.vocab_size)  # the head's bf16 input and logits
    blocks = [block_bytes(cfg, i, batch, seq_len, act) for i in range(cfg.n_layers)]
    if not checkpointing:
        saved = held + head + sum(blocks)
        return {"saved": saved, "peak": saved + loss}
    inputs = held + cfg.n_layers * FP32 * t * cfg.dim
    return {"saved": inputs + max(head, *blocks), "peak": inputs + max(head + loss, *blocks)}


# ---------------------------------------------------------------------- communication
def _nodes(ranks: Sequence[int], per_node: int) -> tuple[int, int]:
    """(most ranks of `ranks` on one node, nodes they span)."""
    counts: dict[int, int] = {}
    for r in ranks:
        counts[r // per_node] = counts.get(r // per_node, 0) + 1
    return max(counts.values()), len(counts)


def alltoall_bytes(cfg: ModelConfig, lay: Layout) -> dict[str, int]:
    """Bytes one rank sends per step in the expert all-to-alls (the busiest rank by inter-node bytes)."""
    if cfg.moe is None or lay.ep == 1:
        return {"intra_node": 0, "inter_node": 0}
    act = 2 if lay.dtype == "bf16" else FP32
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.n_layers))
    passes = 3 if lay.checkpointing else 2  # forward, backward, and the recomputed forward
    per_rank = (
        moe_layers * passes * lay.tokens * cfg.moe.top_k * cfg.dim * 2 * act
    )  # dispatch + combine (moe/precision.py)
    worst = (0, 0)
    for rank in range(lay.gpus):
        group = range(rank - rank % lay.ep, rank - rank % lay.ep + lay.ep)
        same = sum(p // lay.gpus_per_node == rank // lay.gpus_per_node for p in group if p != rank)
        worst = max(worst, (lay.ep - 1 - same, same))
    inter, intra = worst
    return {"intra_node": per_rank * intra // lay.ep, "inter_node": per_rank * inter // lay.ep}


def allreduce_bytes(cfg: ModelConfig, lay: Layout) -> dict[str, int]:
    """Bytes one rank sends per step reducing fp32 gradients (and gathering weights), as an ideal hierarchical
    all-reduce: 2(g-1)/g over NVLink among the g ranks of a node, 2(n-1)/n of a 1/g share over n nodes."""
    factor = 2 if lay.zero < 3 else (4 if lay.checkpointing else 3)
    total = {"intra_node": 0.0, "inter_node": 0.0}
    for name, numel, dp in param_groups(cfg, lay):
        stride = lay.ep if name == "experts" else 1  # expert-data-parallel ranks: same place in their EP group
        g, n = _nodes(range(0, dp * stride, stride), lay.gpus_per_node)
        size = FP32 * numel
        total["intra_node"] += factor * (g - 1) / g * size
        total["inter_node"] += factor * (n - 1) / n * size / g
    return {k: int(v) for k, v in total.items()}


# ---------------------------------------------------------------------- the plan
def plan(cfg: ModelConfig, lay: Layout, model: str = "") -> dict[str, Any]:
    """Everything `llamoe plan` reports for one rank, as plain JSON-able values."""
    check_layout(cfg, lay)
    gpu = GPUS[lay.gpu]
    state = state_bytes(cfg, lay)
    acts = activation_bytes(cfg, lay.micro_batch, lay.seq_len, lay.dtype, lay.checkpointing)
    memory = {
        "params": state["params"],
        "grads": state["grads"],
        "optimizer": state["optimizer"],
        "activations": acts["peak"],
        "weight_casts": weight_cast_bytes(cfg, lay),
        "buffers": state["buckets"],
    }
    memory["total"] = sum(memory.values())
    a2a, reduce = alltoall_bytes(cfg, lay), allreduce_bytes(cfg, lay)
    flops = cfg.flops_per_token(lay.seq_len)
    peak = gpu.peak_tflops(lay.dtype)
    bound = {
        "compute_s": flops * lay.tokens * (4 / 3 if lay.checkpointing else 1) / (peak * 1e12),
        "nvlink_s": (a2a["intra_node"] + reduce["intra_node"]) / (gpu.nvlink_gbps / 2 * 1e9),
        "ib_s": (a2a["inter_node"] + reduce["inter_node"]) / (gpu.ib_gbps * 1e9),
    }
    experts = cfg.num_expert_params()
    return {
        "model": model,
        "layout": {k: v for k, v in asdict(lay).items() if k != "overlap_comm"},
        "params_per_rank": params_per_rank(cfg, lay),
        "params": {"total": cfg.num_params(), "non_expert": cfg.num_params() - experts, "routed_experts": experts},
        "memory_bytes": memory,
        "memory_gib": {k: round(v / GIB, 2) for k, v in memory.items()},
        "fits": memory["total"] <= gpu.memory_gib * GIB,
        "alltoall_bytes_per_step": a2a,
        "grad_reduce_bytes_per_step": reduce,
        "flops_per_token": flops,
        "tokens_per_rank_per_step": lay.tokens,
        "step_time_lower_bound_s": max(bound.values()),
        "bound_terms_s": bound,
        "assumptions": {
            "gpu": gpu.name,
            "memory_gib": gpu.memory_gib,
            "peak_tflops": peak,
            "nvlink_GBps_both_directions": gpu.nvlink_gbps,
            "infiniband_GBps_per_direction": gpu.ib_gbps,
            "source": gpu.source,
            "notes": "fp32 weights, gradients and AdamW; balanced routing; flash-style attention; "
            "a lower bound: every resource at its peak, compute and communication fully overlapped",
        },
    }


def format_plan(p: dict[str, Any]) -> str:
    """The plan as an aligned table for a terminal."""
    lay, mem, a = p["layout"], p["memory_gib"], p["assumptions"]
    gib = lambda key: f"{mem[key]:,.2f} GiB"  # noqa: E731
    gb = lambda d: f"{d['intra_node'] / 1e9:,.2f} GB intra-node, {d['inter_node'] / 1e9:,.2f} GB inter-node"  # noqa: E731
    bound = p["bound_terms_s"]
    rows = [
        ("model", f"{p['model']} ({p['params']['total']:,} params, {p['params']['routed_experts']:,} in routed experts)"),
        ("layout", f"{lay['gpus']} x {a['gpu']} ({lay['gpus_per_node']} per node), ep {lay['ep']}, "
                   f"ZeRO-{lay['zero']}, {lay['micro_batch']} x {lay['seq_len']} tokens per rank, {lay['dtype']}"
                   + (", activation checkpointing" if lay["checkpointing"] else "")),
        ("params_per_rank", f"{p['params_per_rank']:,}"),
        *((f"memory {key}", gib(key)) for key in mem if key != "total"),
        ("memory total", f"{gib('total')} of {a['memory_gib']} GiB: " + ("fits" if p["fits"] else "does NOT fit")),
        ("all-to-all per step", gb(p["alltoall_bytes_per_step"])),
        ("grad reduce per step", gb(p["grad_reduce_bytes_per_step"])),
        ("flops_per_token", f"{p['flops_per_token']:.4g}"),
        ("step time >=", f"{p['step_time_lower_bound_s']:.3f} s (compute {bound['compute_s']:.3f}, "
                         f"NVLink {bound['nvlink_s']:.3f}, InfiniBand {bound['ib_s']:.3f})"),
        ("assuming", f"{a['peak_tflops']} TFLOP/s peak, NVLink {a['nvlink_GBps_both_directions']:g} GB/s "
                     f"(both directions), InfiniBand {a['infiniband_GBps_per_direction']:g} GB/s a direction"),
        ("source", a["source"]),
        ("note", a["notes"]),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options as one-line UsageErrors (exit 2), like every llamoe command."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)


def cli_main(argv: list[str]) -> int:
    parser = _Parser(prog="llamoe plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=f"preset: {', '.join(preset_names())}")
    parser.add_argument("overrides", nargs="*", help="model field overrides, e.g. moe.num_experts=32")
    parser.add_argument("--gpus", type=int, required=True, help="ranks in the run")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (distributed.ep_size)")
    parser.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (distributed.zero_stage)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--activation-checkpointing", action="store_true", help="full: recompute every block")
    parser.add_argument("--dtype", default="bf16", help="bf16 (autocast, train.precision=bf16) | fp32")
    parser.add_argument("--gpu", default="h100", help="|".join(GPUS))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.model not in preset_names():
        raise UsageError(f"MODEL: unknown model preset {args.model!r}; valid presets: {', '.join(preset_names())}")
    try:
        cfg = resolve_model(args.model, args.overrides)
    except (KeyError, ValueError) as e:  # ConfigError names the field
        raise UsageError(str(e)) from None
    lay = Layout(
        gpus=args.gpus,
        gpus_per_node=args.gpus_per_node,
        ep=args.ep,
        zero=args.zero,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        checkpointing=args.activation_checkpointing,
        dtype=args.dtype,
        gpu=args.gpu,
    )
    result = plan(cfg, lay, args.model)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


__all__ = [
    "GPUS",
    "Gpu",
    "Layout",
    "activation_bytes",
    "allreduce_bytes",
    "alltoall_bytes",
    "attention_bytes",
    "block_bytes",
    "check_layout",
    "cli_main",
    "ffn_bytes",
    "format_plan",
    "param_groups",
    "params_per_rank",
    "plan",
    "state_bytes",
    "weight_cast_bytes",
    "zero_partition",
]
