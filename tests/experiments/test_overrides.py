"""The one override mechanism (experiments/overrides.py): values mean the same in run configs, eval
options, sweeps and bench, and every error names the key."""

import pytest

from llamoe.config_error import ConfigError
from llamoe.experiments.config import load_run_config, resolve_model
from llamoe.experiments.evals.options import load_options
from llamoe.experiments.overrides import flatten, parse_items, read_yaml, unflatten
from llamoe.experiments.sweeps.spec import SweepError, parse_sweep


def test_values_parse_as_yaml_with_dotless_exponents() -> None:
    assert parse_items(["a=3", "b=null", "c=1e-3", "d=[1, 2]", "e=llama4-tiny", "f="]) == {
        "a": 3, "b": None, "c": 1e-3, "d": [1, 2], "e": "llama4-tiny", "f": ""
    }  # fmt: skip
    assert read_yaml("lr: 1e-3") == {"lr": 1e-3}  # a float, as OmegaConf reads it (plain YAML 1.1: a string)


def test_flatten_and_unflatten_are_inverse() -> None:
    nested = {"train": {"seq_len": 8, "batch_size": 2}, "model": {"moe": {"top_k": 2}}, "run_dir": "x"}
    flat = flatten(nested)
    assert flat == {"train.seq_len": 8, "train.batch_size": 2, "model.moe.top_k": 2, "run_dir": "x"}
    assert unflatten(flat) == nested


def test_a_mapping_and_the_same_items_give_the_same_run_config() -> None:
    items = ["model=llama4-tiny", "model.moe.top_k=2", "train.seq_len=64", "optim.lr=1e-3"]
    mapping = {"model": "llama4-tiny", "model.moe.top_k": 2, "train.seq_len": 64, "optim.lr": 1e-3}
    assert load_run_config(None, items).to_dict() == load_run_config(None, mapping).to_dict()
    assert load_run_config(None, mapping).model.moe.top_k == 2
    assert resolve_model("llama4-tiny", ["moe.top_k=2"]) == load_run_config(None, mapping).model


@pytest.mark.parametrize(
    "load, key",
    [
        (lambda: load_run_config(None, ["train.seq_lenn=3"]), "train.seq_lenn"),
        (lambda: load_run_config(None, {"train.seq_len": "long"}), "train.seq_len"),
        (lambda: load_run_config(None, ["model=llama4-tiny", "model.moe.top_kk=2"]), "model.moe.top_kk"),
        (lambda: load_options(None, ["passkey_trails=3"]), "eval.long_context.passkey_trails"),
        (lambda: load_options(None, {"sequences": "many"}), "eval.long_context.sequences"),
        (lambda: resolve_model("llama4-tiny", ["moe.top_k=x"]), "model.moe.top_k"),
        (lambda: parse_items(["train.max_steps"]), "train.max_steps"),
        (lambda: parse_sweep({"name": "s", "base": {}, "overrides": [1], "runs": {"a": {}}}), "overrides"),
        (lambda: parse_sweep({"name": "s", "base": {}, "runs": {"a": {"train": {1: 2}}}}), "runs.a.train"),
    ],
)
def test_every_error_names_the_key(load, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load()
    assert info.value.key == key and str(info.value).startswith(f"{key}: ")


def test_a_sweep_error_is_a_config_error() -> None:
    assert issubclass(SweepError, ConfigError)
