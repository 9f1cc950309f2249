"""`llamoe generate RUN_DIR --prompt TEXT`: continue a prompt with a trained run's model and tokenizer."""

from __future__ import annotations

import argparse
import sys

import torch

from llamoe.experiments.errors import report
from llamoe.experiments.train.checkpoint import CheckpointError, load_model, load_tokenizer
from llamoe.models.generate import generate


def cli_main(argv: list[str]) -> int:
    """Print the prompt followed by the generated continuation; exit status 2 for a missing run directory or
    checkpoint, 1 for an unusable one (experiments/errors.py)."""
    parser = argparse.ArgumentParser(prog="llamoe generate", description="Generate text from a trained run.")
    parser.add_argument("run_dir", help="a run directory with checkpoints/")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("need --max-new-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")

    try:
        model, _ = load_model(args.run_dir, args.step, device=args.device)
        tokenizer = load_tokenizer(args.run_dir, args.step)
    except CheckpointError as e:
        return report("llamoe generate", e, e.exit_status)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        parser.error("--prompt must not be empty")
    prompt = torch.tensor([prompt_ids], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new = generate(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    ids = [i for i in new[0].tolist() if i != tokenizer.eos_id]
    print(args.prompt + tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
