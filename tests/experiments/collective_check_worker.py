"""Run by test_collectives.py under DeepSpeed's launcher: the distributed_worker plan, with every
`torch.distributed` collective checked the way NCCL would check it.

Each call records (function, the file that issued it, the devices of its tensors) to
OUT/rank<r>.jsonl. The test then requires every collective llamoe issues to come from
experiments/train/collectives.py (which moves tensors to the backend's device) or from the MoE
all-to-all (activations, already on the compute device), and every tensor to sit on the backend's
device. DeepSpeed's own collectives are recorded as issued by DeepSpeed.
"""

import functools
import json
import os
import sys
from pathlib import Path

import distributed_worker
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ["all_reduce", "barrier", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "all_to_all_single", "reduce", "all_gather_object", "broadcast_object_list"]  # fmt: skip


def _issuer() -> str:
    """The innermost caller outside torch.distributed: a repository path, or 'deepspeed'."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if "deepspeed" in path.parts:
            return "deepspeed"
        if ROOT in path.parents and "tests" not in path.relative_to(ROOT).parts:
            return str(path.relative_to(ROOT))
        if "torch" not in path.parts:
            return str(path)
        frame = frame.f_back
    return "?"


def _install(out: Path) -> None:
    log = open(out / f"rank{os.environ['RANK']}.jsonl", "a")
    for name in CHECKED:
        original = getattr(dist, name)

        @functools.wraps(original)
        def checked(*args, __original=original, __name=name, **kwargs):
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            group = kwargs.get("group")
            required = "cuda" if dist.get_backend(group) == dist.Backend.NCCL else "cpu"
            row = {"fn": __name, "by": _issuer(), "devices": sorted({t.device.type for t in tensors}),
                   "required": required}  # fmt: skip
            log.write(json.dumps(row) + "\n")
            log.flush()
            return __original(*args, **kwargs)

        setattr(dist, name, checked)


if __name__ == "__main__":
    _install(Path(sys.argv[2]))
    sys.exit(distributed_worker.main(sys.argv[1]))
