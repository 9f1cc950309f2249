"""`llamoe data prepare` throughput: tokens/s with 1 worker (in-process, the baseline) vs N spawned workers.

The corpus is generated: a JSONL file of --mb MB of sentences over a 5,000-word made-up vocabulary,
one document per record (1-8 KB each). Tokenizers:
  llama3      Meta's tiktoken path (`Tokenizer.from_file(kind="llama3")`) with a byte-level BPE of 8,192 ranks
              trained here on the first MB of the corpus with the `tokenizers` library, converted to the
              tokenizer.model format (no tokenizer file ships with the repository, and nothing downloads);
  hf          the same trained BPE as a Hugging Face tokenizer.json (kind "hf");
  byte_level  the file-free default, where tokenising is a memcpy and the figure measures the pipeline.
For each tokenizer and worker count the script runs `prepare()` into a fresh directory (best of --repeat;
the time includes starting the worker processes), prints tokens/s and the ratio to 1 worker, and checks
that every worker count wrote the same shards. The script imports no torch, like `llamoe data prepare`,
so spawned workers start in a fraction of a second.

    python benchmarks/data_prepare.py                    # 32 MB, 1 vs 2 workers
    python benchmarks/data_prepare.py --mb 64 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from llamoe.experiments.data.prepare import prepare
from llamoe.experiments.data.tokenizer import Tokenizer


def write_corpus(path: Path, megabytes: int) -> None:
    rng = random.Random(0)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(5000)]
    with open(path, "w") as f:
        written = 0
        while written < megabytes << 20:
            sentences = [" ".join(rng.choices(words, k=rng.randint(5, 15))).capitalize() + "." for _ in range(40)]
            text = "\n".join(" ".join(sentences[i : i + 5]) for i in range(0, 40, rng.randint(5, 8)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)


def train_tokenizers(corpus: Path, out: Path) -> dict[str, Tokenizer]:
    """An 8,192-rank byte-level BPE as tokenizer.json (hf) and as a tiktoken tokenizer.model (llama3)."""
    sample = []
    with open(corpus) as f:
        while sum(map(len, sample)) < 1 << 20:
            sample.append(json.loads(f.readline())["text"])
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        sample, trainers.BpeTrainer(vocab_size=8192, initial_alphabet=alphabet, show_progress=False)
    )
    tok.add_special_tokens(["<|end_of_text|>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    # GPT-2's byte <-> printable-character table, inverted, turns the vocab back into byte strings
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + i for i in range(256 - len(printable))]
    byte_of = {chr(c): b for b, c in zip(printable + [b for b in range(256) if b not in printable], chars)}
    vocab = {t: i for t, i in tok.get_vocab().items() if t != "<|end_of_text|>"}
    lines = [f"{base64.b64encode(bytes(byte_of[c] for c in t)).decode()} {i}" for t, i in vocab.items()]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return {
        "llama3": Tokenizer.from_file(out / "tokenizer.model", kind="llama3"),
        "hf": Tokenizer.from_file(out / "tokenizer.json", kind="hf"),
        "byte_level": Tokenizer.byte_level(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=32, help="corpus size in MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2, help="runs per setting; the fastest counts")
    parser.add_argument("--tokenizers", nargs="+", default=["llama3", "hf", "byte_level"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_corpus(root / "corpus.jsonl", args.mb)
        tokenizers = train_tokenizers(root / "corpus.jsonl", root)
        print(f"corpus: {(root / 'corpus.jsonl').stat().st_size / 2**20:.1f} MiB JSONL\n")
        print(f"{'tokenizer':<11} {'workers':>7} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'vs 1 worker':>11}")
        for name in args.tokenizers:
            baseline, manifests = None, []
            for workers in args.workers:
                best = float("inf")
                for run in range(args.repeat):
                    out = root / f"out-{name}-{workers}-{run}"
                    start = time.perf_counter()
                    manifest = prepare(root / "corpus.jsonl", out, tokenizers[name], workers=workers)
                    best = min(best, time.perf_counter() - start)
                manifests.append(manifest)
                rate = manifest["totals"]["n_tokens"] / best
                baseline = baseline or rate
                print(f"{name:<11} {workers:>7} {manifest['totals']['n_tokens']:>12,} {best:>8.2f} {rate:>12,.0f} "
                      f"{rate / baseline:>10.2f}x")  # fmt: skip
            assert all(m == manifests[0] for m in manifests), "worker counts wrote different shards"


if __name__ == "__main__":
    main()
