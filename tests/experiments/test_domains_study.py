"""The domains task end to end: a run trained on it learns its languages, and `llamoe eval` scores the
languages the run trained on (the MoE positive control's measure; experiments/evals/domains.py)."""

import json
from pathlib import Path
from typing import Callable

import pytest

from llamoe.experiments.commands.eval import cli_main as eval_main
from llamoe.experiments.config import load_run_config
from llamoe.experiments.train.loop import train

Args = Callable[..., list[str]]


@pytest.mark.slow
def test_a_run_trained_on_domains_learns_them_and_eval_scores_its_own_languages(
    tmp_path: Path, run_args: Args, tiny_dense: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    task = ["data.tasks.domains=1.0", "data.tasks.n_domains=4", "train.seq_len=64", "train.batch_size=16"]
    train(load_run_config(None, run_args(run, *tiny_dense, *task, "train.max_steps=250", "optim.lr=3e-3")))
    assert eval_main([str(run), "evals=[domains]", "multiples=[1]", "domains_sequences=32", "plots=false"]) == 0
    result = json.loads((run / "eval" / "long_context.json").read_text())
    assert next(iter(result["details"]["settings"].values()))["domains"]["domains"] == 4  # data.tasks.n_domains
    # four languages of 2 successors a letter: learned close to the ln 2 floor, far below ln 26
    assert result["domains_nll@64"] < 1.0 and result["domains@64"] > 0.9, result
    # scored against another number of languages (other tables), the same model is at a loss
    assert eval_main([str(run), "evals=[domains]", "multiples=[1]", "domains_count=64", "plots=false"]) == 0
    other = json.loads((run / "eval" / "long_context.json").read_text())
    assert other["domains_nll@64"] > result["domains_nll@64"] + 0.5
    # a run that never trained on domains must be told how many to score, naming the key
    plain = tmp_path / "plain"
    train(load_run_config(None, run_args(plain, *tiny_dense, "train.max_steps=2")))
    capsys.readouterr()
    assert eval_main([str(plain), "evals=[domains]", "multiples=[1]", "plots=false"]) == 2
    err = capsys.readouterr().err
    assert "eval.long_context.domains_count" in err and "Traceback" not in err
