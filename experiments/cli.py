"""The `llamoe` command: train | eval | ablate | bench | plan | convert | generate | data.

Each subcommand lives in its own module and exposes `cli_main(argv) -> int`;
this file only routes, so importing it stays cheap and the modules stay independent.
`python -m llamoe.experiments.cli` is the same command.

Exit status (experiments/errors.py): 0 done, 1 a failed run, 2 bad input, 124 / 128+N a run
that stopped early after saving. Errors a user can cause print one line; `--debug` (anywhere
on the command line) or LLAMOE_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

from llamoe.experiments.errors import exit_status, report

COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "llamoe.experiments.commands.train",
        "train a model from a run config: CONFIG [key=value ...] [--nproc N]",
    ),
    "eval": (
        "llamoe.experiments.commands.eval",
        "evaluate a run directory: RUN_DIR [--suite ...] [key=value ...]",
    ),
    "ablate": (
        "llamoe.experiments.commands.ablate",
        "run a sweep: SWEEP.yaml or a built-in sweep name [--executor local|slurm|debug]",
    ),
    "bench": ("llamoe.experiments.commands.bench", "measure training throughput and MFU of a model config"),
    "plan": (
        "llamoe.experiments.commands.plan",
        "memory per rank, all-to-all bytes, FLOPs and a step-time bound: MODEL --gpus N",
    ),
    "convert": ("llamoe.experiments.commands.convert", "convert checkpoints between llamoe and Hugging Face formats"),
    "generate": ("llamoe.experiments.commands.generate", "generate text from a trained run: RUN_DIR --prompt ..."),
    "data": (
        "llamoe.experiments.data.prepare",
        "tokenise a corpus into shards for data.source=OUT: prepare SOURCE OUT",
    ),
}


def _usage() -> str:
    lines = ["usage: llamoe <command> [args...]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`llamoe <command> --help` shows a command's options; --debug shows tracebacks.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the console script."""
    args = sys.argv[1:] if argv is None else argv
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["LLAMOE_DEBUG"] = "1"  # inherited by worker processes
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"llamoe: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.cli_main(rest) or 0)
    except BaseException as e:  # a user error or a requested stop not handled by the subcommand
        status = exit_status(e)
        if status is None or isinstance(e, SystemExit):
            raise
        return report(f"llamoe {name}", e, status)


if __name__ == "__main__":
    sys.exit(main())
