"""RunConfig loading: defaults <- YAML <- key=value, the model section, saving, and every bad input."""

import builtins
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import ConfigError, RunConfig, load_run_config, validate
from llamoe.experiments.train import preflight
from llamoe.models import presets

BASE_YAML = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "base.yaml"


def test_base_yaml_documents_exactly_the_defaults() -> None:
    assert load_run_config(BASE_YAML) == load_run_config(None) == RunConfig()
    written = yaml.safe_load(BASE_YAML.read_text())
    assert set(written) == set(RunConfig().to_dict())


def test_yaml_then_overrides_take_precedence(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  seq_len: 128\n  max_steps: 50\noptim:\n  lr: 1.0e-3\n")
    cfg = load_run_config(path, ["train.max_steps=7", "optim.warmup_steps=3"])
    assert (cfg.train.seq_len, cfg.train.max_steps, cfg.optim.lr, cfg.optim.warmup_steps) == (128, 7, 1e-3, 3)
    assert cfg.train.batch_size == RunConfig().train.batch_size  # untouched default


def test_model_preset_with_field_overrides_is_stored_in_full() -> None:
    cfg = load_run_config({"model": "llama4-tiny"}, ["model.dim=128", "model.moe.top_k=2"])
    preset = presets.get("llama4-tiny")
    assert preset.moe is not None
    expected = replace(preset, dim=128, moe=replace(preset.moe, top_k=2))
    assert cfg.model == expected and cfg.model_preset == "llama4-tiny"
    saved = cfg.to_dict()["model"]
    assert saved["preset"] == "llama4-tiny" and saved["dim"] == 128 and saved["moe"]["top_k"] == 2


def test_model_forms_and_start_over_rule() -> None:
    nested = load_run_config({"model": {"preset": "llama4-tiny", "n_layers": 2}})
    dotted = load_run_config({"model.preset": "llama4-tiny", "model.n_layers": 2})
    assert nested.model == dotted.model and nested.model.n_layers == 2
    # naming a preset later starts the model over: earlier field overrides are dropped
    cfg = load_run_config({"model": {"preset": "llama4-tiny", "n_layers": 2}}, ["model=llama3.1-tiny"])
    assert cfg.model == presets.get("llama3.1-tiny") and cfg.model_preset == "llama3.1-tiny"
    # a mapping without a preset is ModelConfig's defaults plus those fields
    bare = load_run_config({"model": {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 320}})
    assert bare.model_preset is None and bare.model.dim == 64 and bare.model.multiple_of == 256


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    cfg = load_run_config(None, ["model=llama4-tiny", "model.moe.num_experts=4", "train.seq_len=64", "run_dir=x"])
    cfg.save(tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg
    # a resolved config given back with a new preset starts over from that preset
    assert load_run_config(tmp_path / "config.yaml", ["model=llama3.1-tiny"]).model.moe is None


def test_config_of_a_multi_process_run_reads_back_in_one_process(tmp_path: Path) -> None:
    cfg = load_run_config(None, ["model=llama4-tiny", "distributed.ep_size=2"], world_size=2)
    cfg.save(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="distributed.ep_size"):
        load_run_config(tmp_path / "config.yaml")  # as a layout for one process
    assert load_run_config(tmp_path / "config.yaml", world_size=None) == cfg  # as a record (load_model)


def test_batch_layout_helpers() -> None:
    cfg = load_run_config(None, ["train.batch_size=16", "train.micro_batch_size=2"], world_size=2)
    assert cfg.micro_batch(2) == 2 and cfg.grad_accum_steps(2) == 4
    cfg = load_run_config(None, ["train.batch_size=16"], world_size=4)
    assert cfg.micro_batch(4) == 4 and cfg.grad_accum_steps(4) == 1


BAD_INPUTS = [
    # (overrides, --nproc, the key the error must name)
    (["train.max_stepz=3"], 1, "train.max_stepz"),
    (["nosuchsection.x=1"], 1, "nosuchsection"),
    (["model.nosuchfield=1"], 1, "model.nosuchfield"),
    (["model=llama4-tiny", "model.moe.nosuch=1"], 1, "model.moe.nosuch"),
    (["train.max_steps=ten"], 1, "train.max_steps"),
    (["optim.lr=fast"], 1, "optim.lr"),
    (["train=3"], 1, "train"),
    (["model.dim=100"], 1, "model.dim"),  # 100 % n_heads=8 != 0
    (["model.n_heads=6"], 1, "model.n_kv_heads"),  # 6 heads cannot share 4 kv heads
    (["model=llama9-huge"], 1, "model.preset"),
    (["model=7"], 1, "model"),
    (["model.vocab_size=100"], 1, "model.vocab_size"),  # smaller than the tokenizer
    (["distributed.ep_size=2"], 2, "distributed.ep_size"),  # dense model: no experts
    (["model=llama4-tiny", "distributed.ep_size=3", "train.batch_size=12"], 3, "distributed.ep_size"),  # 8 experts
    (["model=llama4-tiny", "distributed.ep_size=2"], 1, "distributed.ep_size"),  # does not divide 1 process
    (["model=llama4-tiny", "distributed.ep_size=4", "train.batch_size=12"], 6, "distributed.ep_size"),
    (["train.batch_size=15"], 2, "train.batch_size"),
    (["train.batch_size=16", "train.micro_batch_size=3"], 2, "train.micro_batch_size"),
    (["distributed.zero_stage=4"], 1, "distributed.zero_stage"),
    (["train.precision=fp16"], 1, "train.precision"),
    (["train.seq_len=100000"], 1, "train.seq_len"),  # beyond model.max_seq_len
    (["optim.warmup_steps=-1"], 1, "optim.warmup_steps"),
    (["data.tasks.passkey=0.8", "data.tasks.mqar=0.5"], 1, "data.tasks"),
    (["model_preset=llama4-tiny"], 1, "model_preset"),
    (["train.max_steps"], 1, "train.max_steps"),  # not key=value
]


@pytest.mark.parametrize(("overrides", "nproc", "key"), BAD_INPUTS)
def test_bad_input_names_the_key(overrides: list[str], nproc: int, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(BASE_YAML, overrides, world_size=nproc)
    assert info.value.key == key


@pytest.mark.parametrize(("overrides", "nproc", "key"), BAD_INPUTS[::3])
def test_cli_exits_2_naming_the_key_without_traceback(
    overrides: list[str], nproc: int, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main([str(BASE_YAML), *overrides, "--nproc", str(nproc)]) == 2  # checked before any launch
    err = capsys.readouterr().err
    assert f"invalid config: {key}:" in err and "Traceback" not in err


def test_zero3_is_for_dense_models_and_moe_is_told_the_alternative(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_run_config(BASE_YAML, ["distributed.zero_stage=3"], world_size=2).distributed.zero_stage == 3
    assert cli_main([str(BASE_YAML), "model=llama4-tiny", "distributed.zero_stage=3", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "invalid config: distributed.zero_stage:" in err and "Traceback" not in err
    assert "MoE" in err and "distributed.zero_stage=1 or 2" in err and "distributed.ep_size" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_names_the_key() -> None:
    cfg = load_run_config(None, ["train.device=cuda"])  # a config, readable anywhere
    assert cfg.train.device == "cuda"
    with pytest.raises(ConfigError) as info:
        preflight.check(cfg)  # where it would run
    assert info.value.key == "train.device"
    assert cli_main(["/dev/null", "train.device=cuda"]) == 2


def test_cli_missing_and_malformed_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([str(tmp_path / "missing.yaml")]) == 2
    assert "CONFIG:" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert cli_main([str(tmp_path / "list.yaml")]) == 2
    (tmp_path / "broken.yaml").write_text("train: {max_steps: [\n")
    assert cli_main([str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("CONFIG:") == 2 and "Traceback" not in err


def test_console_command_exits_2_without_traceback(tmp_path: Path) -> None:
    """The real `python -m llamoe.experiments.cli train` process: status 2, the key on stderr, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llamoe.experiments.cli",
            "train",
            str(BASE_YAML),
            "model.dim=100",
            f"run_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert "model.dim:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_a_loaded_run_config_is_frozen_and_changes_go_through_validation_again() -> None:
    import dataclasses

    cfg = load_run_config(None, ["train.seq_len=64"])
    for obj, name in ((cfg, "run_dir"), (cfg.train, "seq_len"), (cfg.optim, "lr"), (cfg.data.tasks, "mqar"),
                      (cfg.eval.long_context, "sequences"), (cfg.model, "dim")):  # fmt: skip
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, getattr(obj, name))
    changed = load_run_config(cfg.to_dict(), {"train.seq_len": 128})  # the validated way to change one
    assert changed.train.seq_len == 128 and cfg.train.seq_len == 64
    with pytest.raises(ConfigError, match="train.seq_len"):
        load_run_config(cfg.to_dict(), {"train.seq_len": 0})


MACHINE_KEYS = [
    (["tokenizer.kind=hf", "tokenizer.path=/no/such/tokenizer.json", "model.vocab_size=128256"], "tokenizer.path"),
    (["data.source=/no/such/corpus"], "data.source"),
    (["init_from=/no/such/run"], "init_from"),
]


def _forbid_io(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"config validation touched the file system: {args[:2]}")

    for target in (Path, os):
        monkeypatch.setattr(target, "stat", refuse)
    monkeypatch.setattr(os, "scandir", refuse)
    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("overrides,key", MACHINE_KEYS)
def test_validation_reads_no_file_and_the_run_start_names_the_key(
    overrides: list[str], key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config naming files this machine lacks is a valid config (readable on any machine); the check happens
    where the run starts, with the same one-line error and exit 2."""
    cfg = load_run_config(None, [*overrides, f"run_dir={tmp_path / 'run'}"])
    with monkeypatch.context() as m:
        _forbid_io(m)
        validate(cfg)
    with pytest.raises(ConfigError) as info:
        preflight.check(cfg)
    assert info.value.key == key
    assert cli_main(["/dev/null", *overrides, f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"invalid config: {key}:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_io_guard_catches_a_file_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Positive control for the guard above: the checks preflight makes do trip it."""
    cfg = load_run_config(None, ["data.source=/no/such/corpus"])
    _forbid_io(monkeypatch)
    with pytest.raises(AssertionError, match="touched the file system"):
        preflight.check(cfg)
