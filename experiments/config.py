"""RunConfig: everything one training run uses, as typed OmegaConf dataclasses.

Loading goes defaults <- a partial YAML file <- `key=value` overrides -> validation,
and the resolved config is saved as `run_dir/config.yaml`, so a run directory always
says exactly what produced it (loading that file again gives the same config).

The model section is special. `model` is either a preset name or a mapping of
ModelConfig fields, and `model.<field>=value` changes one field:

    model: llama4-tiny                    # a preset
    model: {preset: llama4-tiny, dim: 128} # a preset with fields changed
    model: {dim: 128, n_layers: 2, ...}   # ModelConfig defaults with fields changed (no preset)
    model=llama4-tiny model.moe.top_k=2   # the same on the command line

A layer that gives the model as a whole (a name, a mapping, or `model.preset=`) starts
the model over; dotted `model.<field>` overrides change the model built so far. The
resolved config stores the full field mapping plus `model.preset`, the preset it
started from (null when none).

Every error is a `ConfigError(key, message)`: it names the dotted key and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from omegaconf.errors import OmegaConfBaseException

from llamoe.experiments.data.task_mix import TaskMix
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.errors import write_text_atomic
from llamoe.experiments.evals.options import LongContextEvalConfig
from llamoe.experiments.overrides import as_layer, merge, omegaconf_message, read_yaml_file, to_dataclass, unflatten
from llamoe.models import presets
from llamoe.models.checkpointing import POLICIES
from llamoe.models.config import ConfigError, ModelConfig, model_config_from_dict
from llamoe.models.surgery import UPCYCLE_MODES

DEFAULT_PRESET = "llama3.1-tiny"
TOKENIZER_KINDS = ("byte_level", "llama3", "llama4", "hf")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer turns text into ids: the file-free byte-level default, Meta's tokenizer.model, or a Hugging
    Face tokenizer.json (kind hf; bos/eos/pad from the tokenizer_config.json beside it)."""

    kind: str = "byte_level"  # byte_level | llama3 | llama4 | hf
    path: Optional[str] = None  # the tokenizer.model file (llama3 / llama4) or tokenizer.json (hf)

    def build(self) -> Tokenizer:
        """The tokenizer this section describes."""
        if self.kind == "byte_level":
            return Tokenizer.byte_level()
        assert self.path is not None
        return Tokenizer.from_file(self.path, kind=self.kind)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DataConfig:
    """Where training text comes from (see experiments/data/corpus.py for the source kinds).

    `tasks` mixes synthetic task batches (passkey, needle, MQAR, domains;
    experiments/data/tasks.py) into training: each is a fraction of the batches, and the
    corpus supplies the rest. Validation loss is always measured on the corpus.
    """

    source: str = "stdlib"  # stdlib | text file | directory | .jsonl | .u16.bin/.u32.bin | `llamoe data prepare` dir
    val_fraction: float = 0.05  # share of documents held out for validation (hash-based split)
    bos: bool = False  # start every document with the tokenizer's bos (as pretrained Llamas were trained)
    cache_dir: str = "~/.cache/llamoe/data"  # tokenised corpora, keyed by content and tokenizer
    tasks: TaskMix = field(default_factory=TaskMix)  # synthetic long-context tasks mixed into training


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay, linear warmup then cosine decay, gradient clipping.

    The learning rate rises linearly over `warmup_steps` to `lr`, then follows a cosine
    down to `lr * min_lr_ratio` at step `decay_steps` (null: the train.max_steps the run started
    with, kept in its checkpoints) and stays there. Resuming with a larger train.max_steps keeps
    that horizon, so the extra steps run at the floor; set `decay_steps` to stretch the cosine.
    Weight decay applies to matrices only: not to norm gains (1-D) or the embedding table.
    """

    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    decay_steps: Optional[int] = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass(frozen=True)
class TrainConfig:
    """The loop: how long, how big a batch, how often to log, validate and save."""

    max_steps: int = 1000  # optimizer steps; rerun with a larger value to continue a run
    batch_size: int = 16  # global batch in sequences per optimizer step (all ranks together)
    micro_batch_size: Optional[int] = None  # sequences per rank per forward; null: batch_size / world size
    seq_len: int = 256
    seed: int = 0
    log_every: int = 10
    val_every: int = 100  # steps between validation losses; 0: only at the end
    val_batches: int = 8  # micro batches per rank in one validation
    save_every: int = 200  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest step_N directories kept
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights, gradients and optimizer stay fp32)
    tf32: bool = True  # on CUDA, fp32 matmuls and convolutions may use TF32 (torch's allow_tf32); false: full fp32
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    progress: Optional[bool] = None  # progress bar; null: only on an interactive terminal
    time_limit_s: Optional[float] = None  # wall clock of one invocation; stops and saves before it (exit 124)
    tensorboard: bool = False  # also write TensorBoard events under run_dir/tb (the `tb` extra)
    activation_checkpointing: str = "none"  # none | full | selective (even blocks); models/checkpointing.py
    compile: bool = False  # torch.compile each block (models/compile.py)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluations run on a finished run (`llamoe eval RUN_DIR`); each suite adds its own section."""

    long_context: LongContextEvalConfig = field(default_factory=LongContextEvalConfig)  # experiments/evals/


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process training through DeepSpeed (`llamoe train CONFIG --nproc N`).

    Every rank is data parallel for the dense parameters. With ep_size > 1 each group of
    ep_size consecutive ranks splits the routed experts between them (tokens travel by
    all-to-all); ep_size must divide the world size and every MoE layer's expert count.
    """

    ep_size: int = 1
    zero_stage: int = 0  # 0 | 1 (optimizer states sharded) | 2 (+ gradients) | 3 (+ parameters; dense models)
    backend: str = "auto"  # auto: nccl on GPU, gloo on CPU


@dataclass(frozen=True)
class UpcycleConfig:
    """How `init_from` turns a dense FFN of the source into an MoE layer of this model (models/surgery.py)."""

    experts: str = "copy"  # copy: every expert is the dense FFN | partition: the experts split its hidden units
    noise: float = 0.0  # Gaussian noise on each routed expert, std = noise x the weight's std (seeded by train.seed)


@dataclass(frozen=True)
class RunConfig:
    """One training run. See experiments/configs/base.yaml for every key with its default."""

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=lambda: presets.get(DEFAULT_PRESET))
    model_preset: Optional[str] = DEFAULT_PRESET  # saved as `model.preset`
    init_from: Optional[str] = None  # a fresh run starts from these weights (experiments/train/init_from.py)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    # ------------------------------------------------------------------ derived layout
    def micro_batch(self, world_size: int) -> int:
        """Sequences per rank per forward pass."""
        return self.train.micro_batch_size or self.train.batch_size // world_size

    def grad_accum_steps(self, world_size: int) -> int:
        """Forward/backward passes per optimizer step on each rank."""
        return self.train.batch_size // (world_size * self.micro_batch(world_size))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, with the model section as `{preset, ...fields}` (the config.yaml form)."""
        data = asdict(self)
        data["model"] = {"preset": data.pop("model_preset"), **data["model"]}
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Union[str, Path]) -> None:
        """Write the resolved config atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, self.to_yaml(), "the run config")


# ---------------------------------------------------------------------- loading
def load_run_config(
    source: Union[str, Path, Mapping[str, Any], None] = None,
    overrides: Union[Mapping[str, Any], Sequence[str]] = (),
    world_size: Optional[int] = 1,
) -> RunConfig:
    """Defaults <- `source` (a YAML path or a mapping) <- overrides, then validate; ConfigError names the key.

    `overrides`: a mapping of (dotted or nested) keys to values, applied in order, or `key=value` items
    (experiments/overrides.py). The batch layout and expert-parallel size are checked against `world_size`,
    the run's process count (None skips that, to read a run trained on any count). Nothing here reads a file
    but `source`: what depends on this machine (tokenizer and data files, init_from, CUDA) is checked where a
    run starts (experiments/train/preflight.py).
    """
    layers: list[dict[str, Any]] = []
    if source is not None:
        layers.append(_read_source(source))
    layers.append(_unflatten(as_layer(overrides)))

    sections = [f.name for f in fields(RunConfig) if f.name not in ("model", "model_preset")]
    model = _ModelBuilder()
    run: dict[str, Any] = {}
    for layer in layers:
        if "model_preset" in layer:
            raise ConfigError("model_preset", "set the preset as `model: NAME` or `model.preset=NAME`")
        for op in layer.pop("model", []):
            model.apply(op)
        for key in layer:
            if key not in sections:
                raise ConfigError(key, f"unknown section; the run config has: model, {', '.join(sections)}")
        run = merge(run, layer)
    cfg = to_dataclass(RunConfig, [run])
    built, preset = model.build()
    cfg = replace(cfg, model=built, model_preset=preset)  # frozen from here on
    validate(cfg, world_size)
    return cfg


def _read_source(source: Union[str, Path, Mapping[str, Any]]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return _unflatten(source)
    try:
        return _unflatten(read_yaml_file(source, "CONFIG"))
    except ConfigError as e:
        raise ConfigError("CONFIG", f"{str(e).split(': ', 1)[1]}; pass a run-config YAML file") from None


def _unflatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Expand dotted keys ({"train.seq_len": 128}) into nested mappings; `model` becomes a list of _ModelOps
    in the order given (a preset starts the model over, a field changes the model built so far)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        head, dot, rest = key.partition(".")
        if head == "model":
            out.setdefault("model", []).append(_ModelOp.parse(rest if dot else None, value))
        else:
            out = merge(out, unflatten({key: value}))
    return out


@dataclass
class _ModelOp:
    """One step of building the model: start over from a preset (or defaults), and/or set fields."""

    start: bool
    preset: Optional[str] = None  # when start: the preset (None: ModelConfig defaults)
    fields: dict[str, Any] = field(default_factory=dict)  # nested field values to merge
    key: str = "model"  # the key to blame for a bad value

    @classmethod
    def parse(cls, path: Optional[str], value: Any) -> _ModelOp:
        """`model: value` (path None) or `model.<path>: value`."""
        if path is None and isinstance(value, dict):
            rest = dict(value)
            return cls(start=True, preset=rest.pop("preset", None), fields=rest)
        if path is None or path == "preset":
            if isinstance(value, str):
                return cls(start=True, preset=value, key="model.preset")
            raise ConfigError("model", f"must be a preset name or a mapping of model fields, got {value!r}")
        node: Any = value
        for part in reversed(path.split(".")):
            node = {part: node}
        return cls(start=False, fields=node, key=f"model.{path}")


class _ModelBuilder:
    """Folds the model ops of every layer, in order, into one ModelConfig and its preset."""

    def __init__(self) -> None:
        self.preset: Optional[str] = DEFAULT_PRESET
        self.fields: dict[str, Any] = asdict(presets.get(DEFAULT_PRESET))
        self.last_key = "model"

    def apply(self, op: _ModelOp) -> None:
        if op.start:
            if op.preset is None:
                base = ModelConfig()
            elif isinstance(op.preset, str) and op.preset in presets.names():
                base = presets.get(op.preset)
            else:
                valid = ", ".join(presets.names())
                raise ConfigError("model.preset", f"unknown preset {op.preset!r}; valid presets: {valid}")
            self.preset = op.preset
            self.fields = asdict(base)
        self.fields = merge(self.fields, op.fields)
        self.last_key = op.key

    def build(self) -> tuple[ModelConfig, Optional[str]]:
        """One type-checked merge of all the fields, then ModelConfig's own validation."""
        try:
            return model_config_from_dict(self.fields), self.preset
        except OmegaConfBaseException as e:
            key = f"model.{e.full_key}" if e.full_key else self.last_key
            raise ConfigError(key, omegaconf_message(e)) from None
        except ConfigError as e:
            raise ConfigError(f"model.{e.key}", str(e).split(": ", 1)[-1]) from None


def resolve_model(preset: str, overrides: Union[Mapping[str, Any], Sequence[str]] = ()) -> ModelConfig:
    """A preset plus model-field overrides (`moe.top_k=2`, `model.moe.top_k=2` or a mapping), by the run
    config's model rules (`llamoe bench` uses this); errors name `model.<field>`."""
    builder = _ModelBuilder()
    builder.apply(_ModelOp.parse(None, preset))
    for key, value in as_layer(overrides).items():
        builder.apply(_ModelOp.parse(key.removeprefix("model.") if key != "model" else None, value))
    return builder.build()[0]


# ---------------------------------------------------------------------- validation
def validate(cfg: RunConfig, world_size: Optional[int] = 1) -> None:
    """Cross-field checks of the config alone (no file, no device); raise ConfigError naming the first bad key
    and the fix."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(key, msg)

    need(bool(cfg.run_dir.strip()), "run_dir", "must be a directory path")

    tok = cfg.tokenizer
    need(tok.kind in TOKENIZER_KINDS, "tokenizer.kind", f"must be one of {'|'.join(TOKENIZER_KINDS)}, got {tok.kind!r}")
    if tok.kind == "byte_level":
        need(tok.path is None, "tokenizer.path", "the byte_level tokenizer needs no file; set it to null")
    else:
        need(
            tok.path is not None,
            "tokenizer.path",
            f"the {tok.kind} tokenizer needs its {'tokenizer.json' if tok.kind == 'hf' else 'tokenizer.model'} file",
        )
    if tok.kind == "byte_level":  # a file's vocabulary is checked where it is read (preflight)
        vocab = tok.build().vocab_size
        need(
            vocab <= cfg.model.vocab_size,
            "model.vocab_size",
            f"={cfg.model.vocab_size} is smaller than the byte_level tokenizer's {vocab} ids; "
            f"set model.vocab_size={vocab}",
        )

    data = cfg.data
    need(bool(data.source), "data.source", "must be 'stdlib' or a path")
    need(0.0 <= data.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {data.val_fraction}")
    data.tasks.validate()
    cfg.eval.long_context.validate()
    up = cfg.upcycle
    need(up.experts in UPCYCLE_MODES, "upcycle.experts", f"must be copy|partition, got {up.experts!r}")
    need(up.noise >= 0, "upcycle.noise", f"must be >= 0, got {up.noise}")
    if cfg.init_from is not None:
        need(bool(cfg.init_from.strip()), "init_from", "must be a path, or null to start from a fresh init")

    o = cfg.optim
    need(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(o.decay_steps is None or o.decay_steps >= 1, "optim.decay_steps", "must be null or >= 1")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0.0 <= o.beta1 < 1.0, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
    need(0.0 <= o.beta2 < 1.0, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
    need(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping), got {o.grad_clip}")

    t = cfg.train
    need(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    need(t.seq_len >= 1, "train.seq_len", f"must be >= 1, got {t.seq_len}")
    need(
        t.seq_len <= cfg.model.max_seq_len,
        "train.seq_len",
        f"{t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; lower it or raise model.max_seq_len",
    )
    need(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
    need(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    need(t.val_every >= 0, "train.val_every", f"must be >= 0 (0: validate only at the end), got {t.val_every}")
    need(t.val_batches >= 1, "train.val_batches", f"must be >= 1, got {t.val_batches}")
    need(t.save_every >= 0, "train.save_every", f"must be >= 0 (0: save only at the end), got {t.save_every}")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", f"must be >= 1, got {t.keep_checkpoints}")
    limit = t.time_limit_s
    need(limit is None or limit > 0, "train.time_limit_s", f"must be > 0 seconds or null, got {limit}")
    need(t.precision in PRECISIONS, "train.precision", f"must be one of {'|'.join(PRECISIONS)}, got {t.precision!r}")
    need(t.device in DEVICES, "train.device", f"must be one of {'|'.join(DEVICES)}, got {t.device!r}")
    need(
        t.activation_checkpointing in POLICIES,
        "train.activation_checkpointing",
        f"must be one of {'|'.join(POLICIES)}, got {t.activation_checkpointing!r}",
    )
    need(
        not (t.compile and cfg.model.moe is not None and cfg.model.moe.backend == "grouped_mm"),
        "train.compile",
        "cannot trace model.moe.backend=grouped_mm in training: torch 2.13 traces torch._grouped_mm with bf16 "
        "inputs only, and the experts get fp32 activations; set model.moe.backend=torch or train.compile=false",
    )
    need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    if t.micro_batch_size is not None:
        need(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1 or null, got {t.micro_batch_size}")
    if world_size is not None:
        _validate_layout(cfg, world_size)

    d = cfg.distributed
    need(d.zero_stage in (0, 1, 2, 3), "distributed.zero_stage", f"must be 0, 1, 2 or 3, got {d.zero_stage}")
    need(
        d.zero_stage < 3 or cfg.model.moe is None,
        "distributed.zero_stage",
        "=3 is not supported for MoE models: DeepSpeed's MoE support (expert-parallel gradients and "
        "optimizer groups) requires ZeRO stage <= 2. Use distributed.zero_stage=1 or 2 with expert "
        "parallelism (distributed.ep_size) to shard the expert state instead",
    )
    need(d.backend in ("auto", "gloo", "nccl"), "distributed.backend", f"must be auto|gloo|nccl, got {d.backend!r}")
    need(d.ep_size >= 1, "distributed.ep_size", f"must be >= 1, got {d.ep_size}")
    if d.ep_size > 1:
        moe = cfg.model.moe
        need(moe is not None, "distributed.ep_size", f"={d.ep_size} needs an MoE model; this model has no experts")
        assert moe is not None
        need(
            moe.num_experts % d.ep_size == 0,
            "distributed.ep_size",
            f"={d.ep_size} must divide model.moe.num_experts={moe.num_experts}",
        )


def _validate_layout(cfg: RunConfig, world_size: int) -> None:
    """The checks that depend on the number of processes: batch split and expert-parallel groups."""
    t, d = cfg.train, cfg.distributed
    if world_size < 1:
        raise ConfigError("--nproc", f"must be >= 1, got {world_size}")
    if t.batch_size % world_size != 0:
        raise ConfigError(
            "train.batch_size",
            f"the global batch {t.batch_size} must be divisible by the number of processes {world_size}",
        )
    per_rank = t.batch_size // world_size
    if t.micro_batch_size is not None and per_rank % t.micro_batch_size != 0:
        raise ConfigError(
            "train.micro_batch_size",
            f"train.batch_size={t.batch_size} over {world_size} process(es) gives {per_rank} sequences per rank, "
            f"which is not a multiple of micro_batch_size={t.micro_batch_size}; "
            "batch_size must be divisible by world size x micro batch size",
        )
    if d.ep_size > 1 and world_size % d.ep_size != 0:
        raise ConfigError(
            "distributed.ep_size",
            f"={d.ep_size} must divide the number of processes {world_size}; launch with --nproc {d.ep_size} "
            "(or a multiple of it)",
        )


__all__ = [
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "OptimConfig",
    "RunConfig",
    "TokenizerConfig",
    "TrainConfig",
    "UpcycleConfig",
    "load_run_config",
    "resolve_model",
    "validate",
]
