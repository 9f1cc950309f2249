"""The long-context evaluation suite: perplexity vs length, passkey, needle, MQAR, NoPE entropy, temperature.

Public API:
    evaluate(model, tokenizer, options, *, train_len, heldout=None) -> dict
        runs the suite on a model (the ablation code calls this after training)
    write_results(result, out_dir, suite="long_context") -> Path
        <out_dir>/<suite>.json plus PNG plots
    evaluate_run(path, options, ...) -> (result, run config)
        loads a run, checkpoint or Hugging Face model and evaluates it (`llamoe eval` and sweeps)
    cli_main(argv) -> int
        `llamoe eval PATH [--lengths N ...] [--dtype D] [--device D] [--out DIR] [key=value ...]`

Result schema (JSON): flat keys for the primary temperature setting,
    ppl@L, nll@L, tail_nll@L, delta_tail_nll@L, passkey@L, needle@L, mqar@L, entropy@L
                                        (one per evaluated length L)
    bucket_nll@<start>-<end>            (position buckets [0, T), [T, 2T), [2T, 4T), ... of the longest length)
and the same keys suffixed ":<label>" for every other setting evaluated ("off",
"fs<floor_scale>_as<attn_scale>"), plus
    ci95: {flat key: [low, high]}       95% bootstrap interval of every key but entropy
          (experiments/evals/stats.py: over held-out sequences, keys or query sequences)
    per_window: {windows_sha256, nll@L: [...], delta_tail_nll@L: [...]}
                                        the primary setting's values per held-out window (for differences
                                        paired by window between results with the same windows_sha256)
    suite, train_len, lengths, temperature (the primary setting and mode),
    details: {settings: {label: {temperature, ppl, passkey, needle, mqar, entropy}},
              calibration, nope_layers, options, seconds}.
tail_nll@L is the mean NLL over positions [L/2, L) and delta_tail_nll@L = tail_nll@L - tail_nll@T
(T = the training length, paired over the same sequences): unlike ppl@L, whose mean over [0, L)
includes the short-context start of every window, they show where length generalisation breaks.
entropy@L is the mean attention entropy (nats) of NoPE-layer queries at positions
[previous length, L); it is present only for models with NoPE layers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from omegaconf import OmegaConf

from experiments.data.corpus import Corpus
from experiments.data.tokenizer import Tokenizer
from experiments.errors import write_text_atomic
from experiments.evals.entropy import nope_attention_entropy, nope_layers
from experiments.evals.options import EVALS, LongContextEvalConfig
from experiments.evals.perplexity import heldout_windows, perplexity_vs_length
from experiments.evals.retrieval import mqar_accuracy, needle_accuracy, passkey_grid
from experiments.evals.temperature import TemperatureSetting, applied, calibrate, grid
from models.config import ConfigError
from models.transformer import Transformer

if TYPE_CHECKING:
    from experiments.config import RunConfig

log = logging.getLogger(__name__)

SUITE = "long_context"


def _candidates(model: Transformer, options: LongContextEvalConfig) -> list[TemperatureSetting]:
    """The (floor_scale, attn_scale) grid of sweeps and calibration."""
    floor_scales = options.floor_scales or [model.attention_settings.floor_scale * f for f in (0.5, 1, 2, 4)]
    return grid(floor_scales, options.attn_scales)


def _unique(settings: list[TemperatureSetting]) -> list[TemperatureSetting]:
    """Drop settings whose label repeats an earlier one (same effect), keeping the order."""
    seen: dict[str, TemperatureSetting] = {}
    for s in settings:
        seen.setdefault(s.label, s)
    return list(seen.values())


def _settings(model: Transformer, options: LongContextEvalConfig) -> list[TemperatureSetting]:
    """The settings to evaluate, primary first (calibration is resolved separately)."""
    current = TemperatureSetting.of(model)
    on, off = current.switched(True), current.switched(False)
    by_mode = {
        "config": [current],
        "on": [on],
        "off": [off],
        "compare": [on, off],
        "sweep": [current, *_candidates(model, options), off],
    }
    return _unique(by_mode[options.temperature])


def _evaluate_setting(
    model: Transformer,
    tokenizer: Tokenizer,
    options: LongContextEvalConfig,
    lengths: list[int],
    train_len: int,
    sequences: Optional[torch.Tensor],
    haystack: Any,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Every selected evaluation under the model's current temperature setting, keyed by eval name."""
    o = options
    memory = {"block": o.block, "max_batch_tokens": o.max_batch_tokens, "max_logits_bytes": o.max_logits_bytes}
    # the training length is always scored, as the reference of delta_tail_nll
    ppl_lengths = sorted({*lengths, train_len}) if train_len <= lengths[-1] else lengths
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "ppl": lambda: perplexity_vs_length(
            model, sequences[: o.sequences], ppl_lengths, train_len, window=o.window, stride=o.stride, **memory
        ),
        "passkey": lambda: passkey_grid(
            model, tokenizer, lengths, o.passkey_depths, o.passkey_trials, seed=o.seed, **memory
        ),
        "needle": lambda: needle_accuracy(
            model, tokenizer, haystack, lengths, o.needle_trials, n_needles=o.needles, seed=o.seed, **memory
        ),
        "mqar": lambda: mqar_accuracy(model, tokenizer, lengths, o.mqar_pairs, o.mqar_trials, seed=o.seed, **memory),
        "entropy": lambda: nope_attention_entropy(
            model,
            sequences[: o.entropy_sequences],
            [0, *lengths],
            queries_per_bucket=o.entropy_queries,
            block=o.block,
            max_logits_bytes=o.max_logits_bytes,
        ),
    }
    label = TemperatureSetting.of(model).label
    out: dict[str, Any] = {"temperature": TemperatureSetting.of(model).to_dict()}
    for name in EVALS:
        if name not in o.evals or (name == "entropy" and not nope_layers(model)):
            continue
        start = time.perf_counter()
        out[name] = runs[name]()
        took = time.perf_counter() - start
        seconds[name] = seconds.get(name, 0.0) + took
        log.info("%s (temperature %s) done in %.1fs", name, label, took)
    return out


def _flat_keys(result: dict[str, Any], suffix: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(flat values, their 95% intervals) for one setting: ppl@L, nll@L, tail_nll@L, delta_tail_nll@L,
    bucket_nll@<start>-<end> (the longest length's buckets), passkey@L, needle@L, mqar@L, entropy@L."""
    flat: dict[str, float] = {}
    ci: dict[str, list[float]] = {}

    def put(key: str, value: float, interval: Any = None) -> None:
        flat[key + suffix] = value
        if interval is not None:
            ci[key + suffix] = [float(interval[0]), float(interval[1])]

    if "ppl" in result:
        ppl = result["ppl"]
        for i, length in enumerate(ppl["lengths"]):
            put(f"ppl@{length}", ppl["ppl"][i], [math.exp(x) for x in ppl["nll_ci"][i]])
            put(f"nll@{length}", ppl["nll"][i], ppl["nll_ci"][i])
            put(f"tail_nll@{length}", ppl["tail_nll"][i], ppl["tail_nll_ci"][i])
            if ppl["delta_tail_nll"]:
                put(f"delta_tail_nll@{length}", ppl["delta_tail_nll"][i], ppl["delta_tail_nll_ci"][i])
        for bucket in ppl["buckets"][-1]:
            put(f"bucket_nll@{bucket['start']}-{bucket['end']}", bucket["nll"], bucket["ci"])
    for name in ("passkey", "needle", "mqar"):
        if name in result:
            r = result[name]
            for length, acc, interval in zip(r["lengths"], r["accuracy"], r["accuracy_ci"]):
                put(f"{name}@{length}", acc, interval)
    if "entropy" in result:
        for bucket in result["entropy"]["buckets"]:
            put(f"entropy@{bucket['end']}", bucket["entropy"])
    return flat, ci


def _per_window(result: dict[str, Any], sequences: torch.Tensor) -> dict[str, Any]:
    """nll@L and delta_tail_nll@L per held-out window, and a digest of the windows' tokens: two results
    with the same digest were scored on the same windows, so their difference can be paired by window."""
    if "ppl" not in result:
        return {}
    ppl = result["ppl"]
    out: dict[str, Any] = {
        "windows_sha256": hashlib.sha256(sequences[: ppl["sequences"]].numpy().tobytes()).hexdigest()
    }
    for i, length in enumerate(ppl["lengths"]):
        out[f"nll@{length}"] = ppl["nll_per_sequence"][i]
        if ppl["delta_tail_nll_per_sequence"]:
            out[f"delta_tail_nll@{length}"] = ppl["delta_tail_nll_per_sequence"][i]
    return out


def evaluate(
    model: Transformer,
    tokenizer: Tokenizer,
    options: Optional[LongContextEvalConfig] = None,
    *,
    train_len: int,
    heldout: Optional[Corpus] = None,
) -> dict[str, Any]:
    """Run the long-context suite on `model`; see the module docstring for the result schema.

    `heldout` (a validation split) supplies the perplexity and entropy sequences and the needle
    haystack; it is required when those evaluations are selected. The model is left with the
    temperature setting it came with.
    """
    options = options or LongContextEvalConfig()
    options.validate()
    lengths = options.resolved_lengths(train_len)
    model.eval()
    started = time.perf_counter()
    needs_text = {"ppl", "needle", "entropy"} & set(options.evals)
    calibrating_nll = options.temperature == "calibrate" and options.calibrate_by == "nll"
    if (needs_text or calibrating_nll) and heldout is None:
        raise ValueError(
            f"the {sorted(needs_text) or ['calibration']} evaluations need held-out text: pass heldout=<val Corpus>"
        )
    sequences = calibration_sequences = None
    if heldout is not None and ({"ppl", "entropy"} & set(options.evals) or calibrating_nll):
        n_eval = max(options.sequences, options.entropy_sequences)
        bos_id = tokenizer.bos_id if options.bos else None
        sequences, calibration_sequences = heldout_windows(
            heldout.tokens, heldout.doc_offsets, lengths[-1] + 1, n_eval, options.calibration_sequences, bos_id
        )
    has_nope = bool(nope_layers(model))
    calibration: Optional[dict[str, Any]] = None
    if not has_nope:
        settings = [TemperatureSetting.of(model)]
    elif options.temperature == "calibrate":
        calibration = _calibrate(model, tokenizer, options, lengths[-1], train_len, calibration_sequences)
        current = TemperatureSetting.of(model)
        settings = _unique([calibration["best"], current, current.switched(False)])
    else:
        settings = _settings(model, options)

    seconds: dict[str, float] = {}
    per_setting: dict[str, dict[str, Any]] = {}
    flat: dict[str, float] = {}
    intervals: dict[str, list[float]] = {}
    per_window: dict[str, Any] = {}
    haystack = heldout.tokens if heldout is not None else None
    for i, setting in enumerate(settings):
        with applied(model, setting):
            result = _evaluate_setting(model, tokenizer, options, lengths, train_len, sequences, haystack, seconds)
        per_setting[setting.label] = result
        if i == 0 and sequences is not None:
            per_window = _per_window(result, sequences)
        values, cis = _flat_keys(result, "" if i == 0 else f":{setting.label}")
        flat.update(values)
        intervals.update(cis)
    seconds["total"] = time.perf_counter() - started
    if calibration is not None:
        calibration = dict(calibration, best=calibration["best"].to_dict())
    return {
        "suite": SUITE,
        "train_len": train_len,
        "lengths": lengths,
        "temperature": dict(settings[0].to_dict(), mode=options.temperature if has_nope else "config"),
        **flat,
        "ci95": intervals,
        "per_window": per_window,
        "details": {
            "settings": per_setting,
            "calibration": calibration,
            "nope_layers": nope_layers(model),
            "options": OmegaConf.to_container(OmegaConf.structured(options)),
            "seconds": seconds,
        },
    }


def _calibrate(
    model: Transformer,
    tokenizer: Tokenizer,
    options: LongContextEvalConfig,
    longest: int,
    train_len: int,
    sequences: Optional[torch.Tensor],
) -> dict[str, Any]:
    """Pick the temperature setting among off + the grid, on data disjoint from the evaluation data."""
    candidates = _unique([TemperatureSetting.of(model).switched(False), *_candidates(model, options)])
    memory = dict(
        block=options.block, max_batch_tokens=options.max_batch_tokens, max_logits_bytes=options.max_logits_bytes
    )
    if options.calibrate_by == "nll":
        if sequences is None:
            raise ValueError("calibrate_by=nll needs held-out text: pass heldout=<val Corpus>")
        result = calibrate(
            model,
            candidates,
            lambda: perplexity_vs_length(
                model, sequences, [longest], train_len, window=options.window, stride=options.stride, **memory
            )["nll"][0],
            maximize=False,
        )
    else:
        result = calibrate(
            model,
            candidates,
            lambda: passkey_grid(
                model,
                tokenizer,
                [longest],
                options.passkey_depths,
                options.passkey_trials,
                seed=options.seed,
                stream="calibration",
                **memory,
            )["accuracy"][0],
            maximize=True,
        )
    log.info("calibration (%s at length %d) picked %s", options.calibrate_by, longest, result["best"].label)
    return dict(result, criterion=options.calibrate_by, length=longest)


def write_results(result: dict[str, Any], out_dir: Path, *, plots: bool = True, suite: str = SUITE) -> Path:
    """Write <out_dir>/<suite>.json and, when asked, the PNG plots next to it; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    write_text_atomic(path, json.dumps(result, indent=1), "the evaluation results")
    if plots:
        from experiments.evals.plots import plot_passkey, plot_perplexity, plot_position_nll

        settings = result["details"]["settings"]
        primary = next(iter(settings.values()))
        if "ppl" in primary:
            with_ppl = {label: s["ppl"] for label, s in settings.items() if "ppl" in s}
            plot_perplexity(with_ppl, result["train_len"], out_dir / f"{suite}_ppl.png")
            plot_position_nll(primary["ppl"], out_dir / f"{suite}_position_nll.png")
        if "passkey" in primary:
            plot_passkey(primary["passkey"], out_dir / f"{suite}_passkey.png")
    return path


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
    file or a local Hugging Face directory (experiments/model_source.py). `inputs` (data.source,
    tokenizer, train_len, ...; experiments/evals/inputs.py) supply what a model without a run lacks.
    Options layer as: the run config's `eval.long_context`, then each of `options` (mappings or
    `key=value` lists; experiments/overrides.py). `model_overrides` change the evaluated model's
    config (its weights load strictly). The model is built on the meta device and loaded tensor by
    tensor on `device` in `dtype` (default fp32). The result, with `run_dir` (a run's), `model`,
    `model_kind` and `step`, is written to `out_dir/<suite>.json` (default: `ModelSource.default_out_dir`,
    a run's eval/) with its plots; returns (result, the run config used).
    """
    from experiments.evals.inputs import build_tokenizer, eval_config, heldout_text
    from experiments.evals.options import load_options, resolve_bos
    from experiments.model_source import HF, RUN, open_source
    from experiments.overrides import as_layer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inputs = dict(inputs or {})
    source = open_source(path, step)
    layers = [as_layer(layer) for layer in options]
    base = source.run.eval.long_context if source.run is not None else None
    opts = load_options(base, {k: v for layer in layers for k, v in layer.items()})
    cfg = eval_config(source, inputs, opts.lengths, model_overrides)
    tokenizer = build_tokenizer(cfg, cfg.model.vocab_size)
    opts = resolve_bos(opts, tokenizer, pretrained=source.kind == HF)
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
        from experiments.tensorboard_log import TensorBoardLog

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
    from experiments.errors import UserError, report
    from experiments.evals.inputs import INPUT_KEYS, split_inputs
    from experiments.evals.options import KEY_PREFIX
    from experiments.model_source import open_source
    from experiments.overrides import parse_items

    parser = argparse.ArgumentParser(
        prog="llamoe eval",
        description="Evaluate a model at long lengths: a run directory, a checkpoint (checkpoints/step_N or its "
        "model.pt, or a `llamoe convert` file) or a local Hugging Face directory. Writes <suite>.json and PNG "
        f"plots (default: RUN_DIR/eval). key=value options are those of {KEY_PREFIX} (experiments/evals/options.py), "
        "e.g. passkey_trials=2 temperature=compare evals=[ppl,passkey], plus the inputs "
        f"{', '.join(INPUT_KEYS)} (experiments/evals/inputs.py), and model.<field>=... settings that keep every "
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
