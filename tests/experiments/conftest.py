"""Fixtures for training-run tests: a small learnable corpus and CPU-sized model overrides."""

import importlib.util
import os
import random
from pathlib import Path
from typing import Callable

import pytest

# key=value overrides for models that train in milliseconds per step (fixtures tiny_dense / tiny_moe)
TINY_DENSE = ["model=llama3.1-tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.multiple_of=16"]  # fmt: skip
TINY_MOE = ["model=llama4-tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.multiple_of=16", "model.attention.chunk_size=16", "model.attention.nope_layer_interval=2",
            "model.moe.num_experts=4", "model.moe.expert_hidden_dim=64", "model.moe.interleave_step=1"]  # fmt: skip


def write_corpus(root: Path) -> Path:
    """A directory of 60 small documents of simple, learnable text."""
    words = "the a cat dog sat ran on under mat tree big small red blue and then it was".split()
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(25)]
        (root / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides pointing a run at the small corpus, with its own token cache."""
    root = tmp_path_factory.mktemp("corpus")
    return [f"data.source={write_corpus(root / 'docs')}", f"data.cache_dir={root / 'cache'}", "data.val_fraction=0.2"]


@pytest.fixture
def tiny_dense() -> list[str]:
    return list(TINY_DENSE)


@pytest.fixture
def tiny_moe() -> list[str]:
    return list(TINY_MOE)


@pytest.fixture
def run_args(corpus: list[str]) -> Callable[..., list[str]]:
    """run_args(run_dir, *overrides): a short run on the corpus, seq_len 32, global batch 8, a metrics
    row every step, no periodic validation or saves, then `overrides`."""

    def build(run_dir: Path, *overrides: str) -> list[str]:
        return [f"run_dir={run_dir}", *corpus, "train.seq_len=32", "train.batch_size=8", "train.log_every=1",
                "train.val_every=0", "train.val_batches=2", "train.save_every=0", "optim.warmup_steps=2",
                "train.progress=false", *overrides]  # fmt: skip

    return build


def meta_tokenizer_file(generation: str) -> Path:
    """Meta's real tokenizer.model of `generation` (llama3 | llama4): $LLAMOE_<GEN>_TOKENIZER, or the file in
    the llama-models wheel (a dev dependency; read, never imported: its top-level `models` package sits
    beside llamoe.models)."""
    env = os.environ.get(f"LLAMOE_{generation.upper()}_TOKENIZER")
    if env and Path(env).is_file():
        return Path(env)
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            f"Meta's {generation} tokenizer.model is not here: set LLAMOE_{generation.upper()}_TOKENIZER to it, "
            "or install the dev extra (`pip install -e '.[dev]'` brings llama-models==0.3.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / generation / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"this llama-models version has no {generation}/tokenizer.model")
    return path


@pytest.fixture
def meta_tokenizer() -> Callable[[str], Path]:
    """meta_tokenizer(generation) -> the path of Meta's tokenizer.model (skips, saying how, without one)."""
    return meta_tokenizer_file
