"""`llamoe eval PATH`: load a model from wherever it lives and run the long-context suite on it.

evaluate_run(path, options, ...) -> (result, run config)
    a run directory, checkpoint, `llamoe convert` file or local Hugging Face directory
    (experiments/train/model_source.py) evaluated by experiments/evals/long_context.py's `evaluate`;
    the one path of `llamoe eval` and of sweeps
cli_main(argv) -> int
    `llamoe eval PATH [--lengths N ...] [--dtype D] [--device D] [--out DIR] [key=value ...]`
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llamoe.experiments.commands.eval_inputs import INPUT_KEYS, build_tokenizer, eval_config, heldout_text, split_inputs
from llamoe.experiments.config import RunConfig
from llamoe.experiments.errors import UserError, report
from llamoe.experiments.evals.long_context import SUITE, evaluate, write_results
from llamoe.experiments.evals.options import KEY_PREFIX, load_options, resolve_bos
from llamoe.experiments.overrides import as_layer, parse_items
from llamoe.experiments.train.model_source import HF, RUN, open_source
from llamoe.experiments.train.tensorboard_log import TensorBoardLog
from llamoe.models.config import ConfigError


def _summary(result: dict[str, Any]) -> str:
    """A table of the flat keys of the primary setting: one row per length, values with their 95% intervals."""
    columns = ("tail_nll", "delta_tail_nll", "ppl", "passkey", "needle", "mqar", "entropy")
    present = [c for c in columns if any(f"{c}@{n}" in result for n in result["lengths"])]
    width = 22
    lines = [f"{'length':>8}" + "".join(f"{c:>{width}}" for c in present)]
    for n in result["lengths"]:
        cells = []
        for c in present:
            value, ci = result.get(f"{c}@{n}"), result.get("ci95", {}).get(f"{c}@{n}")
            text = "-" if value is None else f"{value:.3f}" + (f" [{ci[0]:.2f},{ci[1]:.2f}]" if ci else "")
            cells.append(f"{text:>{width}}")
        lines.append(f"{n:>8}" + "".join(cells))
    return "\n".join(lines)


def evaluate_run(
    path: Path,
    options: Sequence[Any] = (),
    *,
    step: Optional[int] = None,
    device: Optional[str] = None,
    model_overrides: Optional[dict[str, Any]] = None,
    out_dir: Optional[Path] = None,
    suite: str = SUITE,
    dtype: Optional[torch.dtype] = None,
    inputs: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, Any], RunConfig]:
    """Evaluate a model; the one path of `llamoe eval` and sweeps.

    `path` is a run directory (its latest checkpoint, or `step`), a checkpoint, a `llamoe convert`
    file or a local Hugging Face directory (experiments/train/model_source.py). `inputs` (data.source,
    tokenizer, train_len, ...; experiments/commands/eval_inputs.py) supply what a model without a run lacks.
    Options layer as: the run config's `eval.long_context`, then each of `options` (mappings or
    `key=value` lists; experiments/overrides.py). `model_overrides` change the evaluated model's
    config (its weights load strictly). The model is built on the meta device and loaded tensor by
    tensor on `device` in `dtype` (default fp32). The result, with `run_dir` (a run's), `model`,
    `model_kind` and `step`, is written to `out_dir/<suite>.json` (default: `ModelSource.default_out_dir`,
    a run's eval/) with its plots; returns (result, the run config used).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = dict(inputs or {})
    source = open_source(path, step)
    layers = [as_layer(layer) for layer in options]
    base = source.run.eval.long_context if source.run is not None else None
    opts = load_options(base, {k: v for layer in layers for k, v in layer.items()})
    cfg = eval_config(source, inputs, opts.lengths, model_overrides)
    tokenizer = build_tokenizer(cfg, cfg.model.vocab_size)
    opts = resolve_bos(opts, tokenizer, pretrained=source.kind == HF)
    if opts.domains_count is None and cfg.data.tasks.domains:  # score the languages the run trained on
        opts = replace(opts, domains_count=cfg.data.tasks.n_domains)
    model = source.load(cfg.model, device=device, dtype=dtype)
    heldout = None
    if {"ppl", "needle", "entropy"} & set(opts.evals) or opts.temperature == "calibrate":
        heldout = heldout_text(cfg, tokenizer, whole="data.source" in inputs or source.run is None)
    print(f"evaluating {source.describe()}: {suite} at lengths {opts.resolved_lengths(cfg.train.seq_len)}", flush=True)
    result = evaluate(model, tokenizer, opts, train_len=cfg.train.seq_len, heldout=heldout)
    header = {"run_dir": str(source.run_dir)} if source.run_dir is not None else {}
    result = {**header, "model": str(path), "model_kind": source.kind, "step": source.step, **result}
    out_dir = out_dir or source.default_out_dir
    write_results(result, out_dir, plots=opts.plots, suite=suite)
    if source.kind == RUN and cfg.train.tensorboard:  # beside the run's training curves, at the checkpoint's step
        tb = TensorBoardLog(out_dir.parent)
        tb.write_eval({k: v for k, v in result.items() if "@" in k}, source.step)
        tb.close()
    return result, cfg


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cli_main(argv: list[str]) -> int:
    """`llamoe eval PATH [--suite long_context] [--lengths N ...] [--step S] [--dtype D] [--device D] [--out DIR]
    [key=value ...]`.

    Exit status: 0 done, 1 unusable checkpoint, 2 invalid options or inputs, a missing path or checkpoint.
    """
    parser = argparse.ArgumentParser(
        prog="llamoe eval",
        description="Evaluate a model at long lengths: a run directory, a checkpoint (checkpoints/step_N or its "
        "model.pt, or a `llamoe convert` file) or a local Hugging Face directory. Writes <suite>.json and PNG "
        f"plots (default: RUN_DIR/eval). key=value options are those of {KEY_PREFIX} (experiments/evals/options.py), "
        "e.g. passkey_trials=2 temperature=compare evals=[ppl,passkey], plus the inputs "
        f"{', '.join(INPUT_KEYS)} (experiments/commands/eval_inputs.py), and model.<field>=... settings that keep every "
        "weight's shape (e.g. model.attention.nope_layer_interval=4 model.attention.chunk_size=2048: a zero-shot "
        "RoPE -> iRoPE conversion, as init_from would make it).",
    )
    parser.add_argument("path", type=Path, help="run directory, checkpoint or Hugging Face model directory")
    parser.add_argument("--suite", default=SUITE, choices=[SUITE])
    parser.add_argument("--lengths", type=int, nargs="+", help="lengths in tokens (default: train length x multiples)")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="weights and activations")
    parser.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/eval, HF_DIR/eval, ...)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own choice)")
    parser.add_argument("overrides", nargs="*", help=f"key=value options of {KEY_PREFIX}, and inputs")
    # key=value words are options wherever they appear (so they may follow --lengths' numbers)
    is_option = ["=" in a and not a.startswith("-") for a in argv]
    args = parser.parse_args([a for a, opt in zip(argv, is_option) if not opt])
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        inputs, options = split_inputs(parse_items(a for a, opt in zip(argv, is_option) if opt))
        model_overrides = {k: v for k, v in options.items() if k.startswith("model.")}
        options = {k.removeprefix(f"{KEY_PREFIX}."): v for k, v in options.items() if k not in model_overrides}
        if args.lengths:
            options["lengths"] = args.lengths
        out_dir = args.out or open_source(args.path, args.step).default_out_dir
        result, _ = evaluate_run(
            args.path,
            [options],
            step=args.step,
            device=args.device,
            suite=args.suite,
            dtype=_DTYPES[args.dtype],
            inputs=inputs,
            out_dir=out_dir,
            model_overrides=model_overrides,
        )
    except ConfigError as e:
        return report("llamoe eval", e, 2, prefix="invalid options: ")
    except UserError as e:  # a missing path or checkpoint (2), an unusable one (1): experiments/errors.py
        return report("llamoe eval", e, e.exit_status)
    print(_summary(result))
    print(
        f"temperature: {result['temperature']['label']} ({result['temperature']['mode']}) | "
        f"{result['details']['seconds']['total']:.0f}s | wrote {out_dir / f'{args.suite}.json'}"
    )
    return 0
