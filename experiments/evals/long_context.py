"""The long-context evaluation suite: perplexity vs length, passkey, needle, MQAR, NoPE entropy, temperature,
and the domains task's languages (the MoE positive control).

Public API:
    evaluate(model, tokenizer, options, *, train_len, heldout=None) -> dict
        runs the suite on a model (the ablation code calls this after training)
    write_results(result, out_dir, suite="long_context") -> Path
        <out_dir>/<suite>.json plus PNG plots
`llamoe eval` and sweeps load a run, checkpoint or Hugging Face model and call `evaluate` through
experiments/commands/eval.py's `evaluate_run`.

Result schema (JSON): flat keys for the primary temperature setting,
    ppl@L, nll@L, tail_nll@L, delta_tail_nll@L, passkey@L, needle@L, mqar@L, entropy@L
                                        (one per evaluated length L)
    domains@T, domains_nll@T            (T = the training length; experiments/evals/domains.py)
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

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from llamoe.config_error import ConfigError
from llamoe.experiments.data.corpus import Corpus
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.errors import write_text_atomic
from llamoe.experiments.evals.domains import domains_score
from llamoe.experiments.evals.entropy import nope_attention_entropy, nope_layers
from llamoe.experiments.evals.options import EVALS, LongContextEvalConfig
from llamoe.experiments.evals.perplexity import heldout_windows, perplexity_vs_length
from llamoe.experiments.evals.retrieval import mqar_accuracy, needle_accuracy, passkey_grid
from llamoe.experiments.evals.temperature import TemperatureSetting, applied, calibrate, grid
from llamoe.models.transformer import Transformer

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
        "domains": lambda: domains_score(
            model, tokenizer, _domains_count(o), train_len, o.domains_sequences, seed=o.seed, **memory
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


def _domains_count(options: LongContextEvalConfig) -> int:
    if options.domains_count is None:
        raise ConfigError(
            "eval.long_context.domains_count",
            "the domains evaluation needs the number of languages the model trained on; set it, or evaluate "
            "a run that trained with data.tasks.domains",
        )
    return options.domains_count


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
    if "domains" in result:
        r = result["domains"]
        put(f"domains@{r['lengths'][0]}", r["accuracy"][0], r["accuracy_ci"][0])
        put(f"domains_nll@{r['lengths'][0]}", r["nll"][0], r["nll_ci"][0])
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
        from llamoe.experiments.evals.plots import plot_passkey, plot_perplexity, plot_position_nll

        settings = result["details"]["settings"]
        primary = next(iter(settings.values()))
        if "ppl" in primary:
            with_ppl = {label: s["ppl"] for label, s in settings.items() if "ppl" in s}
            plot_perplexity(with_ppl, result["train_len"], out_dir / f"{suite}_ppl.png")
            plot_position_nll(primary["ppl"], out_dir / f"{suite}_position_nll.png")
        if "passkey" in primary:
            plot_passkey(primary["passkey"], out_dir / f"{suite}_passkey.png")
    return path
