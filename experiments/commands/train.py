"""`llamoe train CONFIG [key=value ...] [--nproc N]`: the command over the training loop (experiments/train/).

One process trains in this one; with --nproc N, DeepSpeed's launcher starts N workers that each run this
command again (WORLD_SIZE set) and meet in `train`. Exit status as in experiments/errors.py: 0 done, 1 a failed
run, 2 an invalid config (one line naming the key), 124 / 128+N a run that stopped early after saving.
"""

from __future__ import annotations

import argparse
import os
import sys

from llamoe.experiments.config import ConfigError, load_run_config
from llamoe.experiments.errors import USAGE, exit_status, report
from llamoe.experiments.train import preflight, runctl
from llamoe.experiments.train.distributed import launch
from llamoe.experiments.train.loop import train


def cli_main(argv: list[str]) -> int:
    """`llamoe train CONFIG [key=value ...] [--nproc N]`; exit status as in experiments/errors.py."""
    parser = argparse.ArgumentParser(
        prog="llamoe train",
        description="Train a model from a run config (see experiments/configs/base.yaml for every key). "
        "Rerunning with a larger train.max_steps in the same run_dir resumes from its latest checkpoint.",
    )
    parser.add_argument("config", help="run-config YAML, merged over the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=llama4-tiny train.max_steps=100")
    parser.add_argument("--nproc", type=int, default=1, help="local processes, launched through DeepSpeed")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by some launchers
    args = parser.parse_intermixed_args(argv)

    in_worker = "WORLD_SIZE" in os.environ
    world_size = int(os.environ["WORLD_SIZE"]) if in_worker else args.nproc
    prog = "llamoe train"
    try:
        cfg = load_run_config(args.config, args.overrides, world_size=world_size)
    except ConfigError as e:
        return report(prog, e, USAGE, "invalid config: ")
    try:
        if args.nproc > 1 and not in_worker:
            runctl.check_unlocked(cfg.run_dir)
            preflight.check(cfg)  # once, before the workers start (each checks again)
            return launch(args.nproc, ["llamoe.experiments.cli", "train", args.config, *args.overrides])
        summary = train(cfg)
    except ConfigError as e:
        return report(prog, e, USAGE, "invalid config: ")
    except BaseException as e:  # re-raised unless it is a user error or a requested stop
        status = exit_status(e)
        if status is None:
            raise
        return report(prog, e, status, quiet=isinstance(e, runctl.Stopped) and os.environ.get("RANK", "0") != "0")
    if summary.get("tokens_per_s") and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: step {summary['steps']} | loss {summary['final_loss']:.4f} | val {summary['val_loss']:.4f} | "
            f"{summary['tokens_per_s']:,.0f} tok/s | {summary['wall_s']:.0f}s | {cfg.run_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
