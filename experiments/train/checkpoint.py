"""Checkpoints: atomic saves with a `latest` pointer, exact resume, and loading a trained model.

Layout of `run_dir/checkpoints/`:

    step_<N>/
        meta.json      step, tokens seen, the process layout (world size, ep_size, ZeRO stage)
        config.yaml    the resolved run config at save time
        model.pt       the model's state dict (ZeRO-3 partitions gathered); under expert
                       parallelism without the routed experts, which are in:
        experts<e>.pt  per expert-parallel rank e (written by the first expert-parallel group):
                       its routed experts [e·E_l, (e+1)·E_l) of every MoE layer, so no rank ever
                       gathers the whole model to save it (meta.json "expert_shards": their count)
                       Both are read memory-mapped (`model_state`), so a resuming expert-parallel
                       rank reads only its experts, and a one-process load assembles them.
        rank<r>.pt     per rank: data position (the batch iterator's state_dict, global), RNG
                       states (python, numpy, torch, cuda), the parameter names of each optimizer
                       group, and the optimizer state where it is unique: every rank at ZeRO 1-3 (its
                       partition, at ZeRO-3 with its fp32 parameter partition); at ZeRO 0 only the
                       ranks of the first expert-parallel group (rank 0 alone without EP), the
                       others naming the rank whose copy they share ("optimizer_from")
    latest             one line: the name of the newest complete step_<N> directory

The learning-rate schedule is a pure function of the step and of its horizon (meta.json
"lr_horizon"), so the checkpoint restores it. A checkpoint resumes under another process layout
(world size, ep_size, ZeRO 0-2) through experiments/train/reshard.py.

Atomicity: all files are written into `.tmp-step_<N>/` and fsynced; then rank 0 renames
the directory to `step_<N>` (one rename(2)), fsyncs `checkpoints/`, and replaces
`latest` by writing `latest.tmp`, fsyncing it and renaming it over `latest`. A crash
(kill -9) at any moment leaves `latest` naming a complete directory: either the previous
one or the new one. Older `step_<N>` directories beyond `keep` are removed only after
`latest` moved on (renamed to `.trash-*` first, so a half-deleted one never looks valid).

A save that fails on any rank (disk full, quota, an I/O error) fails on every rank: the ranks
agree before the rename, the temporary directory is removed, and WriteError says where, why,
how many bytes the save needed and that the previous checkpoint is intact. Leftover `.tmp-*`
and `.trash-*` directories of a run killed mid-save are removed when the next run starts
(`remove_stale`, called by the run directory's owner).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import numpy as np
import torch

from llamoe.experiments.config import RunConfig, load_run_config
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.errors import UsageError, UserError, WriteError, write_failed
from llamoe.models.build import build_model
from llamoe.models.config import ConfigError
from llamoe.models.transformer import Transformer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


class NoCheckpoint(CheckpointError, UsageError):
    """The run directory or the checkpoint asked for does not exist (bad input: exit status 2)."""


class ShardedModelState(Mapping[str, torch.Tensor]):
    """A checkpoint's model state with its routed experts in per-rank files: a read-only mapping whose
    expert tensors are [E, ...] in global order, assembled when read; `expert_rows(key, first, stop)`
    reads experts [first, stop) from the shard files that hold them only."""

    def __init__(self, base: Mapping[str, torch.Tensor], shards: list[Mapping[str, torch.Tensor]]) -> None:
        self.base, self.shards = base, shards
        self._keys = [*base.keys(), *(k for k in shards[0] if k not in base)]

    def __contains__(self, key: object) -> bool:  # without assembling an expert tensor, as Mapping's would
        return key in self.base or key in self.shards[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self.base:
            return self.base[key]
        return torch.cat([shard[key] for shard in self.shards])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def expert_rows(self, key: str, first: int, stop: int) -> torch.Tensor:
        parts, offset = [], 0
        for shard in self.shards:
            rows = shard[key]
            lo, hi = max(first, offset), min(stop, offset + rows.size(0))
            if lo < hi:
                parts.append(rows[lo - offset : hi - offset])
            offset += rows.size(0)
        return torch.cat(parts)


def model_state(path: Path, meta: Optional[dict[str, Any]] = None) -> Mapping[str, torch.Tensor]:
    """The model state of checkpoint directory `path`, memory-mapped: model.pt, with the routed experts of
    its experts<e>.pt files when it has them (meta.json "expert_shards")."""
    meta = read_meta(path) if meta is None else meta
    base = _load_file(path / MODEL_FILE, weights_only=True, mmap=True)
    n = int(meta.get("expert_shards", 0))
    if n == 0:
        return base
    return ShardedModelState(base, [_load_file(path / expert_file(e), weights_only=True, mmap=True) for e in range(n)])


def expert_file(ep_rank: int) -> str:
    return f"experts{ep_rank}.pt"


@dataclass
class Checkpoint:
    """One loaded checkpoint: where it is, its metadata, the full model state (memory-mapped: tensors are
    read when used) and this rank's state."""

    path: Path
    step: int
    meta: dict[str, Any]
    model: Mapping[str, torch.Tensor]
    rank_state: dict[str, Any]


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- file helpers
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    _write_file(path, lambda f: f.write(text.encode()))


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step_<N> directories under checkpoints/, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors and arrays in a (nested) state: about what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _is_write_failure(error: BaseException) -> bool:
    """OSError, or torch.save's writer reporting one (it raises RuntimeError from inline_container.cc)."""
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and "inline_container" in str(error))


def remove_stale(run_dir: Union[str, Path]) -> list[Path]:
    """Remove `.tmp-*` / `.trash-*` leftovers of a save that was killed; only the directory's owner may call it."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith((".tmp-", ".trash-", f"{LATEST}.tmp"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def _remove(path: Path) -> None:
    """Delete a directory by renaming it out of the way first, so it never looks half-complete."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------- save
def save_checkpoint(
    run_dir: Union[str, Path],
    step: int,
    *,
    model_state: Optional[dict[str, torch.Tensor]],
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    expert_shard: Optional[tuple[int, dict[str, torch.Tensor]]] = None,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    all_ok: Callable[[bool], bool] = lambda ok: ok,
    keep: int = 2,
) -> Path:
    """Save step `step` atomically (see the module docstring); every rank calls this.

    `model_state` (the model, or without its routed experts when they come as shards) is needed on
    rank 0 only; `expert_shard` is (expert-parallel rank, its routed experts) on the ranks that write
    one (meta must then say "expert_shards"); `rank_state` is this rank's own; `config_yaml` is the
    resolved run config (`RunConfig.to_yaml()`); `barrier` synchronises the ranks and `all_ok` tells
    every rank whether all of them succeeded (both trivial in one process). Returns the new path; WriteError (on every rank) if the save failed.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"step_{step}"
    tmp, final = root / f".tmp-{name}", root / name
    previous = latest_checkpoint(run_dir) if rank == 0 else None
    failure: Optional[BaseException] = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        _write_file(tmp / f"rank{rank}.pt", lambda f: torch.save(rank_state, f))
        if expert_shard is not None:
            _write_file(tmp / expert_file(expert_shard[0]), lambda f: torch.save(expert_shard[1], f))
        if rank == 0:
            assert model_state is not None, "rank 0 must pass the model state"
            _write_file(tmp / MODEL_FILE, lambda f: torch.save(model_state, f))
            _write_text(tmp / "config.yaml", config_yaml)
            _write_text(
                tmp / "meta.json", json.dumps({**meta, "step": step, "format": FORMAT_VERSION}, indent=1) + "\n"
            )
    except Exception as e:  # filtered just below; every rank must reach all_ok
        if not _is_write_failure(e):
            raise
        failure = e
    if all_ok(failure is None) and rank == 0:
        try:
            _publish(root, tmp, final)
        except OSError as e:
            failure = e
    if not all_ok(failure is None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        needed = _nbytes(rank_state) + _nbytes(model_state) + _nbytes(expert_shard)
        raise _save_failed(final, failure, needed, previous)
    if rank == 0:
        _prune(root, keep, current=final)
    barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final` and point `latest` at it; on failure `latest` is unchanged."""
    _fsync_dir(tmp)
    if final.exists():
        _remove(final)  # a leftover of an earlier attempt at this step; `latest` never names it here
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f"{LATEST}.tmp"
    try:
        _write_text(pointer, final.name + "\n")
        os.replace(pointer, root / LATEST)
    except OSError:
        pointer.unlink(missing_ok=True)
        os.rename(final, tmp)  # `latest` still names the previous checkpoint; the caller removes tmp
        raise
    _fsync_dir(root)


def _save_failed(final: Path, error: Optional[BaseException], needed: int, previous: Optional[Path]) -> WriteError:
    """The one-line error of a failed save (a rank whose own writes succeeded reports another rank's failure)."""
    if error is None:
        return WriteError(f"could not write checkpoint {final}: another rank's save failed (see its message)")
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    base = write_failed("checkpoint", final, error, needed)
    return WriteError(f"{base}; {kept}. Free space, then rerun the same command to resume")


def _prune(root: Path, keep: int, current: Path) -> None:
    """Remove all but the newest `keep` step directories (never `current`), and stale temporaries."""
    for _, path in _step_dirs(root)[:-keep]:
        if path != current:
            _remove(path)
    for path in root.iterdir():
        if path.name.startswith(".trash-") or (path.name.startswith(".tmp-") and path != current):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- load
def latest_checkpoint(run_dir: Union[str, Path]) -> Optional[Path]:
    """The directory `checkpoints/latest` names, or None when the run has no checkpoint yet."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{pointer} should name a step_<N> directory but holds {name[:80]!r}; fix or delete it")
    path = root / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path}, which does not exist; point it at an existing step_<N>")
    return path


def checkpoint_path(run_dir: Union[str, Path], step: Optional[int] = None) -> Path:
    """The checkpoint of `step`, or the latest one; CheckpointError if there is none."""
    if step is None:
        path = latest_checkpoint(run_dir)
        if not Path(run_dir).is_dir():
            raise NoCheckpoint(f"{run_dir} has no checkpoint: that run directory does not exist")
        if path is None:
            raise NoCheckpoint(f"{run_dir} has no checkpoint ({Path(run_dir) / CHECKPOINTS / LATEST} is missing)")
        return path
    path = Path(run_dir) / CHECKPOINTS / f"step_{step}"
    if not path.is_dir():
        have = [s for s, _ in _step_dirs(Path(run_dir) / CHECKPOINTS)]
        raise NoCheckpoint(f"{path} does not exist; this run has checkpoints at steps {have}")
    return path


def _load_file(path: Path, weights_only: bool, mmap: bool = False) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"checkpoint file {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "delete that checkpoint directory and point checkpoints/latest at an earlier step_<N>"
        ) from None


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint directory."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'meta.json'} is missing or corrupt ({e}); the checkpoint is unusable") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, this code reads {FORMAT_VERSION}")
    return meta


def read_rank_state(path: Path, rank: int) -> dict[str, Any]:
    """Rank `rank`'s file of checkpoint directory `path` (full unpickling: it holds optimizer objects)."""
    return _load_file(path / f"rank{rank}.pt", weights_only=False)


def load_checkpoint(path: Path, rank: int = 0, all_ok: Callable[[bool], bool] = lambda ok: ok) -> Checkpoint:
    """Read a checkpoint directory: metadata, full model state and rank `rank`'s state.

    Every rank calls this; if any rank cannot read its part (a corrupt or missing shard), every
    rank raises CheckpointError (`all_ok` tells each whether all succeeded), so none waits forever.
    The rank file holds optimizer objects (DeepSpeed's ZeRO state among them), so it is
    read with full unpickling: load only checkpoints you wrote.
    """
    error: Optional[CheckpointError] = None
    try:
        meta = read_meta(path)
        model = model_state(path, meta)
        rank_state = read_rank_state(path, rank)
        if "optimizer_from" in rank_state:  # a ZeRO-0 replica: the optimizer state is another rank's copy
            rank_state["optimizer"] = read_rank_state(path, rank_state["optimizer_from"])["optimizer"]
    except CheckpointError as e:
        error = e
    if not all_ok(error is None):
        raise error or CheckpointError(f"{path}: another rank could not read its part (see its message)")
    return Checkpoint(path=path, step=int(meta["step"]), meta=meta, model=model, rank_state=rank_state)


def check_resumable(path: Path, saved: RunConfig, cfg: RunConfig) -> None:
    """Refuse (ConfigError naming the key) to resume checkpoint `path` when its model or data layout differs
    from this run's. The process layout may differ (experiments/train/reshard.py)."""
    current, before = cfg.to_dict(), saved.to_dict()
    keys = ["train.seq_len", "train.batch_size", "train.seed", "data.source", "data.val_fraction", "tokenizer.kind"]
    if before.get("model") != current["model"]:
        raise ConfigError("model", f"{path} holds a different model than this config; use a new run_dir")
    for key in keys:
        section, name = key.split(".")
        if before.get(section, {}).get(name) != current[section][name]:
            raise ConfigError(
                key,
                f"{path} was trained with {key}={before.get(section, {}).get(name)!r}, this run has "
                f"{current[section][name]!r}; use the same value to resume, or a new run_dir",
            )


def load_config(path: Path, model_overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """The resolved run config stored with a checkpoint, with eval-time `model_overrides` applied (and
    validated again) when given."""
    try:
        cfg = load_run_config(path / "config.yaml", world_size=None)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.yaml'} cannot be loaded: {e}") from None
    if model_overrides:
        cfg = load_run_config(cfg.to_dict(), model_overrides, world_size=None)
    return cfg


def load_model(
    run_dir: Union[str, Path],
    step: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    model_overrides: Optional[dict[str, Any]] = None,
) -> tuple[Transformer, RunConfig]:
    """The trained model of a run (latest checkpoint, or `step`) in eval mode, with its run config.

    Works for runs trained with any number of processes: the checkpoint holds the whole model (its
    routed experts assembled from the expert-parallel ranks' files when it has them).
    `model_overrides` ({"model.attention.chunk_size": 64, ...}) change the config the weights load
    into; the load is strict, so an override that changes a parameter shape fails loudly.
    """
    path = checkpoint_path(run_dir, step)
    cfg = load_config(path, model_overrides)
    state = model_state(path)
    try:
        model = build_model(cfg.model, device=device, state_dict=state)
    except RuntimeError as e:
        raise CheckpointError(f"{path / MODEL_FILE} does not match its config.yaml: {str(e)[:300]}") from None
    return model.eval(), cfg


def load_tokenizer(run_dir: Union[str, Path], step: Optional[int] = None) -> Tokenizer:
    """The tokenizer a run was trained with."""
    return load_config(checkpoint_path(run_dir, step)).tokenizer.build()


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "NoCheckpoint",
    "ShardedModelState",
    "check_resumable",
    "checkpoint_path",
    "expert_file",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_state",
    "read_meta",
    "read_rank_state",
    "remove_stale",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
