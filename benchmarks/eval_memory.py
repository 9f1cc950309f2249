"""Peak host memory of `llamoe eval` on a 2-layer Llama (hidden 64) at a given vocabulary, default options.

    .venv/bin/python benchmarks/eval_memory.py --vocab 32768 131072 [--limit-gib 12] [-- key=value ...]

Each evaluation runs in a fresh process (peak RSS from getrusage is the evaluation's alone) under an
address-space limit, so a run that would exhaust the host fails instead ("over the limit").
The model is a random LlamaForCausalLM saved as a Hugging Face directory; the text is synthetic.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_MEASURE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from llamoe.experiments.cli import main
status = main(sys.argv[1:])
print("PEAK_RSS_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(status)
"""


def measure(vocab: int, limit_bytes: int, extra: list[str]) -> str:
    """Peak RSS of one evaluation, formatted (or why it failed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(Path(tmp) / "hf")
        text = Path(tmp) / "text.txt"
        text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(600)))
        args = [str(Path(tmp) / "hf"), "--lengths", "128", "256", "evals=[ppl]", "tokenizer=byte_level",
                f"data.source={text}", f"data.cache_dir={tmp}/cache", "--out", f"{tmp}/out", *extra]  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURE.format(limit=limit_bytes), "eval", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        return f"over the limit (exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:120]})"
    return f"{int(proc.stdout.split('PEAK_RSS_KIB')[-1].split()[0]) / 2**20:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 128256])
    parser.add_argument("--limit-gib", type=float, default=12.0, help="address-space limit of the evaluation")
    parser.add_argument("extra", nargs="*", help="key=value options passed to llamoe eval")
    args = parser.parse_args()
    for vocab in args.vocab:
        print(f"vocab {vocab}: peak RSS {measure(vocab, int(args.limit_gib * 2**30), args.extra)}", flush=True)


if __name__ == "__main__":
    main()
