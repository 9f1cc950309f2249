"""Where a model's weights come from: a run directory, a llamoe checkpoint or a local Hugging Face directory.

`llamoe eval PATH` and `init_from: PATH` accept the same four kinds of PATH:

    run         a run directory (`checkpoints/latest`, or `checkpoints/step_<N>` with a step)
    checkpoint  one checkpoint of a run: a `checkpoints/step_<N>` directory or the `model.pt` in it
                (the model config comes from the `config.yaml` beside it)
    file        a `llamoe convert from-hf` file (`save_checkpoint`): torch.save of {"model_config": the
                ModelConfig as a plain dict (a preset name or a partial dict is read too), "model": the
                Transformer's state dict (tied heads share one tensor)}
    hf          a local Hugging Face directory: `config.json` (LlamaForCausalLM or Llama4ForCausalLM
                text) and safetensors files, sharded or not

`open_source(path)` reads configs only (cheap, nothing is allocated); `ModelSource.weights()` is the
state dict in llamoe keys, read lazily (memory-mapped model.pt, memory-mapped safetensors through
models/hf.py), so building a model from it with `llamoe.models.build.build_model` copies one tensor at a time
and never holds a second copy of the model in host memory. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from llamoe.experiments.config import RunConfig
from llamoe.experiments.errors import UsageError
from llamoe.experiments.train import checkpoint as ckpt_io
from llamoe.models import presets
from llamoe.models.build import build_model
from llamoe.models.config import ModelConfig, model_config_from_dict, model_config_to_dict
from llamoe.models.transformer import Transformer

RUN, CHECKPOINT, FILE, HF = "run", "checkpoint", "file", "hf"
# where HF Llama repositories ship Meta's file, then the Hugging Face tokenizer file most repositories ship alone
HF_TOKENIZER_FILES = ("original/tokenizer.model", "tokenizer.model", "tokenizer.json")


@dataclass
class ModelSource:
    """A model to load: its kind and path, its ModelConfig and, for a run's checkpoint, the run config and step."""

    kind: str
    path: Path
    model: ModelConfig
    run: Optional[RunConfig] = None
    step: Optional[int] = None
    weights_path: Optional[Path] = None  # model.pt, or the converted file; None for an HF directory
    hf_model_type: Optional[str] = None  # config.json's model_type (llama | llama4 | llama4_text)

    @property
    def run_dir(self) -> Optional[Path]:
        """The run directory this checkpoint belongs to (run and checkpoint kinds)."""
        if self.kind == RUN:
            return self.path
        step_dir = self.weights_path.parent if self.weights_path is not None else None
        if self.kind == CHECKPOINT and step_dir is not None and step_dir.parent.name == ckpt_io.CHECKPOINTS:
            return step_dir.parent.parent  # run_dir/checkpoints/step_N/model.pt
        return None

    @property
    def default_out_dir(self) -> Path:
        """Where `llamoe eval` writes without --out: RUN_DIR/eval, RUN_DIR/eval/step_N for one checkpoint of a
        run, HF_DIR/eval, or <stem>_eval beside anything else (a converted file)."""
        run_dir = self.run_dir
        if self.kind == RUN and run_dir is not None:
            return run_dir / "eval"
        if run_dir is not None:
            return run_dir / "eval" / f"step_{self.step}"
        if self.kind == HF:
            return self.path / "eval"
        return self.path.with_name(f"{self.path.stem}_eval")

    def describe(self) -> str:
        what = {RUN: "run directory", CHECKPOINT: "checkpoint", FILE: "converted checkpoint", HF: "Hugging Face model"}
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.path} ({what[self.kind]}{step})"

    def weights(self) -> Mapping[str, torch.Tensor]:
        """The state dict in llamoe keys, read lazily (see the module docstring)."""
        if self.kind == HF:
            from llamoe.models.hf import HFStateDict  # the hf extra; _hf_source checked that it is installed
            from llamoe.models.safetensors_dir import SafetensorsDir

            return HFStateDict(SafetensorsDir(self.path), self.model)
        assert self.weights_path is not None
        if self.kind == FILE:
            return _torch_load(self.weights_path)["model"]
        return ckpt_io.model_state(self.weights_path.parent)  # model.pt (+ per-rank expert files)

    def load(
        self,
        cfg: Optional[ModelConfig] = None,
        *,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
    ) -> Transformer:
        """The model in eval mode, built on the meta device and filled tensor by tensor on `device` in `dtype`
        (default fp32). `cfg` (default: the source's) may change settings that keep every parameter shape."""
        try:
            model = build_model(cfg or self.model, device=device, dtype=dtype, state_dict=self.weights())
        except RuntimeError as e:
            raise ckpt_io.CheckpointError(
                f"{self.describe()} does not match its model config: {str(e)[:300]}"
            ) from None
        return model.eval()


def save_checkpoint(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Write a `llamoe convert` file in the format above (via a temporary file, so a crash leaves no partial file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"model_config": model_config_to_dict(cfg), "model": state_dict}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a converted checkpoint: its ModelConfig and state dict (memory-mapped: tensors are read when used)."""
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise KeyError(f"{path} is not a llamoe checkpoint: no {key!r} entry")
    spec = ckpt["model_config"]
    cfg = presets.get(spec) if isinstance(spec, str) else model_config_from_dict(spec)
    return cfg, ckpt["model"]


def _torch_load(path: Path) -> dict:
    """torch.load of a weights file, memory-mapped; CheckpointError naming the path when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ckpt_io.CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None


def open_source(path: Union[str, Path], step: Optional[int] = None) -> ModelSource:
    """The ModelSource at `path` (configs only; see the module docstring for the kinds).

    `step` picks a checkpoint of a run directory. Raises NoCheckpoint (a missing path, a run without
    that checkpoint), CheckpointError (an unreadable one) or ConfigError (an HF config llamoe cannot
    express, naming the HF field).
    """
    path = Path(path).expanduser()
    if step is not None and (path.is_file() or (path / "config.json").is_file() or (path / "meta.json").is_file()):
        raise ckpt_io.NoCheckpoint(f"--step picks a checkpoint of a run directory; {path} is one model already")
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_source(path)
    if path.is_dir() and (path / "meta.json").is_file():
        return _checkpoint_source(path, CHECKPOINT)
    if path.is_file() and path.name == "model.pt" and (path.parent / "meta.json").is_file():
        return _checkpoint_source(path.parent, CHECKPOINT)
    if path.is_file():
        return _file_source(path)
    source = _checkpoint_source(ckpt_io.checkpoint_path(path, step), RUN)  # NoCheckpoint when there is none
    source.path = path
    return source


def _checkpoint_source(step_dir: Path, kind: str) -> ModelSource:
    run = ckpt_io.load_config(step_dir)
    meta = ckpt_io.read_meta(step_dir)
    return ModelSource(kind, step_dir, run.model, run=run, step=int(meta["step"]), weights_path=step_dir / "model.pt")


def _file_source(path: Path) -> ModelSource:
    try:
        cfg, _ = load_checkpoint(str(path))
    except KeyError as e:
        raise ckpt_io.NoCheckpoint(
            f"{path} is not a model: {e.args[0]}; give a run directory, a checkpoints/step_N directory or its "
            "model.pt, a `llamoe convert` file or a Hugging Face model directory"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ckpt_io.NoCheckpoint(f"{path} is not a readable model file ({type(e).__name__}: {e})") from None
    return ModelSource(FILE, path, cfg, weights_path=path)


def _hf_source(path: Path) -> ModelSource:
    try:
        from llamoe.models.hf import read_hf_config  # transformers and safetensors: the optional hf extra
    except ModuleNotFoundError as e:
        raise UsageError(f"reading {path} needs {e.name}: pip install 'llamoe[hf]'") from None
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    return ModelSource(HF, path, read_hf_config(str(path)), hf_model_type=model_type)


def hf_tokenizer_file(directory: Path) -> Optional[Path]:
    """The tokenizer file of an HF directory: Meta's `original/tokenizer.model`, else `tokenizer.model`, else the
    Hugging Face `tokenizer.json`."""
    for name in HF_TOKENIZER_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


__all__ = ["CHECKPOINT", "FILE", "HF", "RUN", "ModelSource", "hf_tokenizer_file", "open_source"]
