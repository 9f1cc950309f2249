"""`llamoe eval` at a real vocabulary stays within a memory bound with default options: the logits of one
forward are cut to eval.long_context.max_logits_bytes whatever the vocabulary (experiments/evals/scoring.py).

The evaluation runs in a fresh process, so its peak RSS (getrusage) is the evaluation's alone; the process
runs under an address-space limit so that code without the budget fails fast instead of swapping the host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamoe.experiments.evals.perplexity import perplexity_vs_length
from llamoe.experiments.evals.scoring import fit_to_budget
from tests.experiments.test_long_context import tiny_model

REPO = Path(__file__).resolve().parents[2]
VOCAB = 128256  # Llama 3's vocabulary
PEAK_RSS_BOUND = 3 * 2**30  # the stated bound: torch (~0.5 GiB) + model + 2 x 512 MiB of logits, with room
ADDRESS_SPACE_LIMIT = 12 * 2**30  # virtual memory; without the budget one forward asks for 8.4 GB of logits

_MEASURE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from llamoe.experiments.cli import main
status = main(sys.argv[1:])
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(status)
"""


def test_fit_to_budget_bounds_rows_times_block_times_vocab() -> None:
    assert fit_to_budget(64, 1024, 320, 512 * 2**20) == (64, 1024)  # tiny vocabularies: nothing changes
    rows, block = fit_to_budget(64, 1024, VOCAB, 512 * 2**20)
    assert rows == 64 and rows * block * VOCAB * 4 <= 512 * 2**20 and block == 16
    assert fit_to_budget(64, 1024, VOCAB, 1) == (1, 1)  # at least one token per forward
    with pytest.raises(ValueError, match="max_logits_bytes"):
        fit_to_budget(1, 1, VOCAB, 0)


def test_a_small_budget_gives_the_same_scores() -> None:
    """The budget changes how many rows and positions one forward takes, never a score."""
    model = tiny_model()
    sequences = torch.randint(0, 256, (6, 129))
    free = perplexity_vs_length(model, sequences, [64, 128], train_len=64)
    tight = perplexity_vs_length(model, sequences, [64, 128], train_len=64, max_logits_bytes=3 * 7 * 320 * 4)
    assert np.allclose(free["nll_per_sequence"], tight["nll_per_sequence"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_eval_at_a_128k_vocabulary_stays_under_the_bound_with_default_options(tmp_path: Path) -> None:
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(600)))
    out = tmp_path / "out"
    args = [str(tmp_path / "hf"), "--lengths", "128", "256", "evals=[ppl]", "tokenizer=byte_level",
            f"data.source={text}", f"data.cache_dir={tmp_path / 'cache'}", "--out", str(out)]  # fmt: skip
    script = _MEASURE.format(limit=ADDRESS_SPACE_LIMIT)
    proc = subprocess.run(
        [sys.executable, "-c", script, "eval", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.split("PEAK_RSS_KIB")[-1].split()[0]) * 1024
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / 2**30:.2f} GiB"
    result = json.loads((out / "long_context.json").read_text())
    assert (
        next(iter(result["details"]["settings"].values()))["ppl"]["sequences"] == 64
    )  # the default: all 64 windows scored
