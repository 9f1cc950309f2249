"""Training-loop throughput of llama3.1-tiny and llama4-tiny on the stdlib corpus, against a bare step.

`llamoe train`'s loop (`llamoe.experiments.train.loop.train`: packed stdlib batches, cross-entropy + aux
loss, gradient clipping, AdamW, aux-loss-free bias update, metrics.jsonl) runs with seq_len
256 and a global batch of 16, in rounds: each round resumes the run from its checkpoint for
--round-steps more steps and reads that window's tokens/s from metrics.jsonl. Baseline in the
same process, measured right before each round: the bare training step of the same model and
batch shape (`llamoe.experiments.commands.bench.measure_training_throughput`: forward, backward, AdamW on one
fixed random batch). Interleaving the two keeps a machine whose load drifts from biasing the
ratio; the first round is warm-up. Printed: medians over the rounds, and the logged training
loss of the first and last round, to confirm it falls.

    python benchmarks/train_loop.py [--rounds 4] [--round-steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from llamoe.experiments.commands.bench import measure_training_throughput
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.loop import train
from llamoe.experiments.train.metrics_log import read_metrics

PRESETS = ("llama3.1-tiny", "llama4-tiny")
SEQ_LEN, BATCH = 256, 16


def bench(preset: str, rounds: int, round_steps: int, run_dir: Path) -> dict[str, float]:
    """Median bare and loop tokens/s and their ratio over the timed rounds, plus first/last loss."""
    total = (rounds + 1) * round_steps
    overrides = [
        f"model={preset}",
        f"run_dir={run_dir}",
        "data.source=stdlib",
        f"train.seq_len={SEQ_LEN}",
        f"train.batch_size={BATCH}",
        f"train.log_every={round_steps}",
        "train.val_every=0",
        "train.save_every=0",
        "train.progress=false",
        f"optim.decay_steps={total}",
    ]
    model_cfg = load_run_config(None, overrides).model
    bare, loop = [], []
    for r in range(rounds + 1):
        bare.append(measure_training_throughput(model_cfg, batch_size=BATCH, seq_len=SEQ_LEN, steps=3, warmup=1))
        train(load_run_config(None, [*overrides, f"train.max_steps={(r + 1) * round_steps}"]))
        loop.append(read_metrics(run_dir)[-1]["tokens_per_s"])
    rows = read_metrics(run_dir)
    bare_tps = [b.tokens_per_s for b in bare[1:]]
    return {
        "bare": statistics.median(bare_tps),
        "loop": statistics.median(loop[1:]),
        "ratio": statistics.median(lp / b for lp, b in zip(loop[1:], bare_tps)),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds per preset (after one warm-up round)")
    parser.add_argument("--round-steps", type=int, default=5, help="training steps per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq_len {SEQ_LEN}, batch {BATCH}")
    header = ("preset", "bare step tok/s", "llamoe train tok/s", "loop/bare", "loss first -> last")
    lines = ["{:<15} {:>16} {:>19} {:>10} {:>20}".format(*header)]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            r = bench(preset, args.rounds, args.round_steps, Path(tmp) / preset)
            lines.append(
                f"{preset:<15} {r['bare']:>16,.0f} {r['loop']:>19,.0f} {r['ratio']:>9.2f}x "
                f"{r['first_loss']:>9.3f} -> {r['last_loss']:.3f}"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
