"""`train.activation_checkpointing` and `train.compile` through `llamoe train`: the same run, and bad values named.

Checkpointing recomputes the same ops, so its metrics equal the plain run's bitwise. Compiled
blocks run inductor's fused kernels, which round differently: their losses, gradient norms and
validation losses must equal eager within a relative 1e-5 in fp32. Measured: at most ~1.5e-7
(about one fp32 ulp of the result). Inductor reorders and fuses reductions (RMSNorm, softmax,
the loss's log-sum-exp), leaving a few ulps per op, which grow through the layers and the
optimizer steps; 1e-5 leaves room for that on any CPU while an actual error, such as a wrong
mask or routing, moves the loss by far more.
"""

from pathlib import Path
from typing import Callable

import pytest

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import ConfigError, load_run_config
from llamoe.experiments.train import preflight
from llamoe.experiments.train.metrics_log import read_metrics

Args = Callable[..., list[str]]
KEYS = ("loss", "aux_loss", "grad_norm", "val_loss")


def metrics(run_dir: Path) -> dict[str, list[object]]:
    rows = read_metrics(run_dir)
    return {key: [r.get(key) for r in rows] for key in (*KEYS, "router")}


@pytest.fixture
def moe_run(run_args: Args, tiny_moe: list[str]) -> Args:
    """Four steps of two micro batches, validation at steps 2 and 4, aux loss and bias balancing on."""

    def build(run_dir: Path, *overrides: str) -> list[str]:
        return run_args(run_dir, *tiny_moe, "train.max_steps=4", "train.micro_batch_size=4", "train.val_every=2",
                        "model.moe.aux_loss_weight=0.01", "model.moe.bias_balancing=true",
                        "model.moe.bias_update_rate=0.01", *overrides)  # fmt: skip

    return build


def test_activation_checkpointing_reproduces_the_run(tmp_path: Path, moe_run: Args) -> None:
    runs = {}
    for policy in ("none", "full", "selective"):
        assert cli_main(["/dev/null", *moe_run(tmp_path / policy, f"train.activation_checkpointing={policy}")]) == 0
        runs[policy] = metrics(tmp_path / policy)
    assert len(runs["none"]["loss"]) == 4
    assert runs["full"] == runs["none"] and runs["selective"] == runs["none"]
    config = load_run_config(tmp_path / "full" / "config.yaml")
    assert config.train.activation_checkpointing == "full"


@pytest.mark.slow
def test_compiled_blocks_match_eager(tmp_path: Path, moe_run: Args) -> None:
    """Eager, compiled, and compiled with every block checkpointed (the recompute runs the compiled graphs)."""
    runs = {}
    for name, extra in {
        "eager": [],
        "compiled": ["train.compile=true"],
        "compiled_full": ["train.compile=true", "train.activation_checkpointing=full"],
    }.items():
        assert cli_main(["/dev/null", *moe_run(tmp_path / name, *extra)]) == 0
        runs[name] = metrics(tmp_path / name)
    eager = runs["eager"]
    for name in ("compiled", "compiled_full"):
        for key in KEYS:
            values = [v for v in runs[name][key] if v is not None]
            expected = [v for v in eager[key] if v is not None]
            assert values == pytest.approx(expected, rel=1e-5), (name, key)
    assert runs["compiled_full"] == runs["compiled"]  # checkpointing adds nothing on top of compiling


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["train.activation_checkpointing=attention"], "train.activation_checkpointing"),
        (["train.compile=maybe"], "train.compile"),
        (["model=llama4-tiny", "model.moe.backend=grouped_mm", "train.compile=true"], "train.compile"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], key: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as info:
        preflight.check(load_run_config(None, overrides))
    assert info.value.key == key
    assert cli_main(["/dev/null", *overrides]) == 2
    assert f"invalid config: {key}:" in capsys.readouterr().err


def test_compile_without_a_cpp_compiler_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "/no/such/g++")
    cfg = load_run_config(None, ["train.compile=true", "train.device=cpu"])
    assert cfg.train.compile
    with pytest.raises(ConfigError, match="C\\+\\+ compiler") as info:
        preflight.check(cfg)
    assert info.value.key == "train.compile"
