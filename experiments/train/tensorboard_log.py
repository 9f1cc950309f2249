"""TensorBoard event files beside `metrics.jsonl` (`train.tensorboard: true`, the `tb` extra).

metrics.jsonl stays the source of truth; this mirrors its rows as scalars under `run_dir/tb` so a
researcher can watch runs live. Every numeric field of a row becomes a scalar at the row's step:
`train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s`, `train/peak_mem_gib`,
`train/val_loss`, the MoE means (`train/load_imbalance`, ...), and per MoE layer
`router/<layer>/<stat>` (each expert's share of tokens as `router/<layer>/expert_<i>_share`).
Evaluation results (`llamoe eval`, sweeps) go in as `eval/<key>` at the checkpoint's step.
A resumed run purges the events after its checkpoint's step, as the JSON log is cut back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from llamoe.config_error import ConfigError
from llamoe.experiments.train.metrics_log import number

DIR = "tb"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl row (tag -> value), without its step."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if key == "router" and isinstance(value, dict):
            for layer, stats in value.items():
                for name, stat in stats.items():
                    if name == "tokens_per_expert" and isinstance(stat, list) and sum(stat) > 0:
                        total = float(sum(stat))
                        out.update({f"router/{layer}/expert_{i}_share": n / total for i, n in enumerate(stat)})
                    elif number(stat) is not None:
                        out[f"router/{layer}/{name}"] = float(stat)
        elif (scalar := number(value)) is not None:
            out[f"train/{key}"] = scalar
    return out


class TensorBoardLog:
    """Writes metrics rows and evaluation keys as scalars to `run_dir/tb` (one writer per process)."""

    def __init__(self, run_dir: Union[str, Path], purge_step: Optional[int] = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError when the tensorboard package is missing
            raise ConfigError(
                "train.tensorboard", "needs the tensorboard package: pip install -e '.[tb]' (or set it to false)"
            ) from None
        self.writer = SummaryWriter(str(Path(run_dir) / DIR), purge_step=purge_step)

    def write_row(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row at its step."""
        step = int(row["step"])
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def write_eval(self, keys: dict[str, Any], step: int) -> None:
        """Flat evaluation keys (`nll@256`, `passkey@1024`, ...) as `eval/<key>` at a checkpoint's step."""
        for key, value in keys.items():
            if (scalar := number(value)) is not None:
                self.writer.add_scalar(f"eval/{key}", scalar, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(run_dir: Union[str, Path]) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in `run_dir/tb` as tag -> [(step, value), ...] in step order (tests and notebooks)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
