"""Peak memory of the loss (head + cross-entropy, forward and backward): chunked vs the plain path.

    .venv/bin/python benchmarks/loss_memory.py [--tokens 2048] [--dim 256] [--vocab 32768 131072]

Each case runs in a fresh process under bf16 autocast, as training does: hidden states [N, D]
(requiring grad) through an untied fp32 head [V, D] to the mean cross-entropy, then backward.
"plain" is the loss train.py used before (`F.cross_entropy(logits.float(), ...)`),
"chunked" is `llamoe.models.loss.chunked_cross_entropy`. On CPU the peak is the process's maximum
resident set size minus its size once the inputs, the head and its gradient buffer exist, so
it counts what the loss itself allocates (glibc returns large blocks to the system when freed).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_case(path: str, tokens: int, dim: int, vocab: int) -> dict[str, float]:
    """One forward + backward of the loss; bytes above the baseline at its peak, and seconds."""
    from llamoe.models.loss import chunked_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(tokens, dim, requires_grad=True)
    head = nn.Linear(dim, vocab, bias=False)
    targets = torch.randint(0, vocab, (tokens,))
    head.weight.grad = torch.zeros_like(head.weight)  # the gradient buffer exists before the step
    hidden.grad = torch.zeros_like(hidden)
    baseline = _current_rss_bytes()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if path == "plain":
            loss = F.cross_entropy(head(hidden).float(), targets)
        else:
            loss = chunked_cross_entropy(hidden, head, targets, vocab)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"peak_bytes": _rss_bytes() - baseline, "seconds": seconds, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--case", nargs=2, metavar=("PATH", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], args.tokens, args.dim, int(args.case[1]))))
        return
    print(f"N = {args.tokens} tokens, D = {args.dim}, bf16 autocast; peak above the inputs, head and grads")
    print("| vocab | plain peak | chunked peak | ratio | plain s | chunked s | fp32 [N, V] |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in args.vocab:
        res = {}
        for path in ("plain", "chunked"):
            cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--dim", str(args.dim)]
            out = subprocess.run([*cmd, "--case", path, str(vocab)], check=True, capture_output=True, text=True)
            res[path] = json.loads(out.stdout)
        assert abs(res["plain"]["loss"] - res["chunked"]["loss"]) < 1e-4, res
        mib = 2**20
        plain, chunked = res["plain"]["peak_bytes"], res["chunked"]["peak_bytes"]
        print(
            f"| {vocab:,} | {plain / mib:,.0f} MiB | {chunked / mib:,.0f} MiB | {plain / chunked:.1f}x "
            f"| {res['plain']['seconds']:.2f} | {res['chunked']['seconds']:.2f} | {4 * args.tokens * vocab / mib:,.0f} MiB |"
        )


if __name__ == "__main__":
    main()
