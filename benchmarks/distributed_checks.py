"""Multi-process training checks for benchmarks/RESULTS.md: gradient accumulation 4 vs 1, what a ZeRO-0 save
writes per rank, and a resharded resume (EP 2 on 2 processes -> 1 process) against the unchanged resume.

Usage: python benchmarks/distributed_checks.py OUT_DIR   (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "experiments")]

from conftest import TINY_MOE, write_corpus  # noqa: E402

from llamoe.experiments.commands.train import cli_main  # noqa: E402
from llamoe.experiments.train.distributed import launch  # noqa: E402
from llamoe.experiments.train.metrics_log import read_metrics  # noqa: E402

WORKER = ROOT / "tests" / "experiments" / "distributed_worker.py"


def common(out: Path, run: str, *extra: str) -> list[str]:
    return [f"run_dir={out / run}", f"data.source={out / 'docs'}", f"data.cache_dir={out / 'cache'}",
            "data.val_fraction=0.2", "train.seq_len=64", "train.batch_size=8", "train.log_every=1",
            "train.val_every=0", "train.val_batches=2", "train.progress=false", "optim.warmup_steps=2", *extra]  # fmt: skip


def run_plan(out: Path, name: str, plan: list[list[str]]) -> None:
    (out / f"{name}.json").write_text(json.dumps(plan))
    assert launch(2, [str(WORKER), str(out / f"{name}.json")], module=False, timeout=900) == 0


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_corpus(out / "docs")
    moe = [*TINY_MOE, "model.moe.bias_balancing=true", "distributed.zero_stage=1", "distributed.ep_size=2"]
    accum = {
        a: common(out, f"accum{a}", *moe, "train.max_steps=10", f"train.micro_batch_size={4 // a}") for a in (1, 4)
    }
    dense = ["model=llama3.1-tiny", "model.dim=512", "model.n_layers=8", "train.max_steps=2"]
    base = common(out, "reshard_base", *moe, "train.max_steps=5", "train.save_every=5")
    run_plan(out, "first", [*accum.values(), common(out, "save_zero0", *dense), base])
    for name in ("reshard_same", "reshard_one"):
        shutil.copytree(out / "reshard_base", out / name)
    run_plan(out, "second", [common(out, "reshard_same", *moe, "train.max_steps=10")])
    assert cli_main(["/dev/null", *common(out, "reshard_one", *TINY_MOE, "model.moe.bias_balancing=true",
                                          "train.max_steps=10")]) == 0  # fmt: skip

    rows = {a: read_metrics(out / f"accum{a}") for a in accum}
    print("| step | loss, accumulation 1 | loss, accumulation 4 | grad norm 1 | grad norm 4 |\n|---|---|---|---|---|")
    for r1, r4 in zip(rows[1], rows[4]):
        print(f"| {r1['step']} | {r1['loss']:.6f} | {r4['loss']:.6f} | {r1['grad_norm']:.6f} | {r4['grad_norm']:.6f} |")
    ckpt = out / "save_zero0" / "checkpoints" / "step_2"
    sizes = {p.name: p.stat().st_size for p in sorted(ckpt.glob("*.pt"))}
    peak = read_metrics(out / "save_zero0")[-1]["peak_mem_gib"]
    print(f"\nZeRO-0 save of a {sizes['model.pt'] / 4e6:.1f}M-parameter dense model: file bytes {sizes}; "
          f"rank 0 peak_mem_gib {peak:.3f}")  # fmt: skip
    same, one = read_metrics(out / "reshard_same"), read_metrics(out / "reshard_one")
    print("\n| step | loss, resumed unchanged (2 proc, EP 2, ZeRO 1) | loss, resumed on 1 process | rel. diff |")
    print("|---|---|---|---|")
    for a, b in zip(same[5:], one[5:]):
        print(f"| {a['step']} | {a['loss']:.6f} | {b['loss']:.6f} | {abs(a['loss'] - b['loss']) / a['loss']:.1e} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
