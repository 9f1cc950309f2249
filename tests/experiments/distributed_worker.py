"""Run by test_distributed.py under DeepSpeed's launcher: several `llamoe train` runs in one process group.

Usage: distributed_worker.py PLAN.json, where the plan is a list of runs, each a list of
key=value run-config overrides. They run one after the other through `llamoe train`'s entry
point inside the same worker processes, so the process start-up is paid once.
"""

import json
import sys
from pathlib import Path

from llamoe.experiments.commands.train import cli_main


def main(plan_path: str) -> int:
    for overrides in json.loads(Path(plan_path).read_text()):
        status = cli_main(["/dev/null", *overrides])
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
