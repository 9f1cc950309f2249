"""`init_from`: a fresh run starts from a run, a checkpoint or an HF directory, with surgery; a mapping that cannot be
made fails at config time (exit 2, naming the tensor); a resume ignores it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamoe.experiments.commands.train import cli_main
from llamoe.experiments.config import ConfigError, load_run_config
from llamoe.experiments.train import init_from, preflight
from llamoe.experiments.train.checkpoint import load_model
from llamoe.experiments.train.loop import train
from llamoe.experiments.train.metrics_log import read_metrics
from llamoe.experiments.train.optim import lr_at
from llamoe.models.build import build_model

Args = Callable[..., list[str]]
DENSE = [
    "model=llama3.1-tiny",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.multiple_of=16",
]  # fmt: skip (conftest's tiny_dense, for a module-scoped run)
# llama3.1-tiny at dim 64 has a dense FFN of 176 hidden units (2/3 x 4 x 64 rounded up to 16)
COPY_MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_hidden_dim=176",
            "model.moe.num_shared_experts=0", "model.moe.score_func=softmax", "model.moe.score_on=output",
            "model.moe.renormalize=true"]  # fmt: skip
PARTITION_MOE = ["model.moe.num_experts=4", "model.moe.expert_hidden_dim=40", "model.moe.shared_expert_hidden_dim=16",
                 "upcycle.experts=partition"]  # fmt: skip


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    """A tiny dense run trained for 10 steps: the source of the upcycling tests."""
    run_dir = tmp_path_factory.mktemp("dense") / "run"
    args = [f"run_dir={run_dir}", *corpus, *DENSE, "train.seq_len=32", "train.batch_size=8", "train.max_steps=10",
            "train.val_every=0", "train.save_every=0", "optim.warmup_steps=2", "train.progress=false"]  # fmt: skip
    train(load_run_config(None, args))
    return run_dir


def test_copy_upcycling_from_a_run_keeps_the_dense_models_logits(dense_run: Path, tmp_path: Path, run_args: Args,
                                                                  tiny_dense: list[str]) -> None:  # fmt: skip
    cfg = load_run_config(None, run_args(tmp_path / "moe", *tiny_dense, *COPY_MOE, f"init_from={dense_run}"))
    model = build_model(cfg.model, seed=cfg.train.seed)
    text = init_from.load(model, cfg)
    dense, _ = load_model(dense_run)
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens).logits, dense(tokens).logits, rtol=1e-5, atol=1e-5)
    assert "6 transformed" in text and "2 freshly initialised" in text
    assert "freshly initialised: layers.[0-1].feed_forward.router.gate.weight" in text
    assert "layers.[0-1].feed_forward.experts.w1" in text and "<- layers.[0-1].feed_forward.w1.weight" in text


def test_a_fresh_run_loads_prints_and_starts_its_schedule_over_and_a_resume_ignores_it(
    dense_run: Path, tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = run_args(tmp_path / "moe", *tiny_dense, *PARTITION_MOE, f"init_from={dense_run}", "train.max_steps=2")
    assert cli_main(["/dev/null", *args]) == 0
    out = capsys.readouterr().out
    assert f"init_from {dense_run} (run directory, step 10)" in out and "partition upcycling" in out
    rows = read_metrics(tmp_path / "moe")
    assert rows[0]["step"] == 1 and rows[0]["lr"] == lr_at(0, load_run_config(None, args).optim, 2)
    fresh = run_args(tmp_path / "scratch", *tiny_dense, *PARTITION_MOE, "train.max_steps=2")
    assert cli_main(["/dev/null", *fresh]) == 0
    assert rows[0]["loss"] < read_metrics(tmp_path / "scratch")[0]["loss"] - 0.5  # it starts from trained weights
    assert cli_main(["/dev/null", *args[:-1], "train.max_steps=3"]) == 0  # resumes its own checkpoint
    out = capsys.readouterr().out
    assert "init_from" not in out and "resuming from" in out
    assert "init_from:" in (tmp_path / "moe" / "config.yaml").read_text()


def _hf_llama(directory: Path) -> LlamaForCausalLM:
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.15)
    hf.save_pretrained(directory)
    return hf


def test_an_hf_directory_is_copied_and_rope_becomes_irope(tmp_path: Path, run_args: Args) -> None:
    hf = _hf_llama(tmp_path / "hf")
    same = ["model=llama3.1-tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_hidden_dim=176", "model.rope.theta=10000.0", "model.rope.scaling=null"]  # fmt: skip
    cfg = load_run_config(None, run_args(tmp_path / "a", *same, f"init_from={tmp_path / 'hf'}"))
    model = build_model(cfg.model)
    text = init_from.load(model, cfg)
    tokens = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens).logits, hf(tokens).logits, rtol=1e-4, atol=1e-4)
    assert "0 transformed, 0 freshly initialised" in text and "changed without weights" not in text
    irope = ["model.attention.nope_layer_interval=2", "model.attention.chunk_size=16", "model.attention.qk_norm=true"]
    cfg = load_run_config(None, run_args(tmp_path / "b", *same, *irope, f"init_from={tmp_path / 'hf'}"))
    text = init_from.load(build_model(cfg.model), cfg)
    assert "0 transformed" in text and "changed without weights: attention.qk_norm: False -> True" in text


def test_a_mapping_that_cannot_be_made_exits_2_naming_the_tensor(
    dense_run: Path, tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = run_args(tmp_path / "x", *tiny_dense, "model.n_layers=3", f"init_from={dense_run}")
    with pytest.raises(ConfigError, match="layers.2.attention_norm.weight") as err:
        preflight.check(load_run_config(None, bad))
    assert err.value.key == "init_from"
    assert cli_main(["/dev/null", *bad]) == 2
    assert "cannot map layers.2.attention_norm.weight" in capsys.readouterr().err
    uneven = run_args(tmp_path / "x", *tiny_dense, *PARTITION_MOE, "model.moe.expert_hidden_dim=32",
                      f"init_from={dense_run}")  # fmt: skip
    assert cli_main(["/dev/null", *uneven]) == 2
    assert "layers.0.feed_forward.experts.w1" in capsys.readouterr().err
    assert cli_main(["/dev/null", *run_args(tmp_path / "x", f"init_from={tmp_path / 'nowhere'}")]) == 2
    assert "init_from" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing started
