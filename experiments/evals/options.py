"""`LongContextEvalConfig`: the options of the long-context evaluation suite (`eval.long_context`).

A structured OmegaConf dataclass, so a run config's `eval.long_context` section and
`llamoe eval RUN_DIR key=value ...` overrides are type-checked, and `validate()` names
the offending key and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Union

from llamoe.config_error import ConfigError
from llamoe.experiments.data.tokenizer import Tokenizer
from llamoe.experiments.evals.scoring import DEFAULT_MAX_LOGITS_BYTES
from llamoe.experiments.overrides import as_layer, to_dataclass

EVALS = ("ppl", "passkey", "needle", "mqar", "entropy", "domains")
DEFAULT_EVALS = ("ppl", "passkey", "needle", "mqar", "entropy")  # domains scores a run trained on them
TEMPERATURE_MODES = ("config", "on", "off", "compare", "sweep", "calibrate")
CALIBRATION_CRITERIA = ("nll", "passkey")
KEY_PREFIX = "eval.long_context"


@dataclass(frozen=True)
class LongContextEvalConfig:
    """Options of the long-context suite (shared/REFERENCE.md, "Long-context evaluation protocols").

    Lengths: `lengths`, or train_len × `multiples` when empty.
    evals: which of ppl | passkey | needle | mqar | entropy | domains to run (default: all but domains).
    BOS: `bos` starts every perplexity / entropy window with the tokenizer's bos token, then L tokens of text
      (a pretrained model is scored as it was trained: its first position is bos, its attention sink);
      null (auto) = on for a pretrained model (a Hugging Face directory) whose tokenizer starts texts with
      bos itself (Meta's tokenizers; a tokenizer.json whose post-processor adds one), off for llamoe runs,
      which train without bos.
    Perplexity: `sequences` held-out windows (64 keep the 95% interval of delta_tail_nll under
      +-0.05 nats for the tiny presets); `window`/`stride` switch lengths above `window` to a
      sliding window (null: full context for every length).
    Memory: `block` tokens per prefill forward; `max_batch_tokens` tokens per batch (rows = this
      // length, at least 1), so 16x-64x lengths run at batch 1 through the bounded caches;
      `max_logits_bytes` caps the fp32 logits of one forward (rows x block x vocab x 4 bytes; rows
      and block shrink to fit, at least one token), so memory stays bounded at any vocabulary: the
      default 512 MiB peaks near 1 GiB of logits with the log-softmax copy (experiments/evals/scoring.py).
    Passkey: `passkey_depths` × lengths grid, `passkey_trials` keys per cell.
    Needle: `needle_trials` per length with `needles` needles each.
    MQAR: `mqar_pairs` pairs (capped by what fits; as many as training used keeps the question one of
      distance), `mqar_trials` sequences.
    Domains: NLL and accuracy on `domains_sequences` fresh chains of the `domains_count` languages a run
      trained on (data.tasks.domains), at the training length only (null: the run's data.tasks.n_domains).
    Entropy: `entropy_sequences` sequences, `entropy_queries` sampled queries per position bucket.
    Temperature (NoPE query scaling, applied at eval time):
      config   the model's own setting
      on | off that setting switched on / off
      compare  on, then off
      sweep    config, then every (floor_scales × attn_scales) point, then off
      calibrate  pick the best of off + the grid on held-out data disjoint from the evaluation
                 data (`calibrate_by`: nll = lowest NLL at the longest length on
                 `calibration_sequences` windows; passkey = highest passkey accuracy at the longest
                 length on keys of a separate seed stream; ties go to the earlier candidate, off
                 first), evaluate with it, and compare with config and off.
      `floor_scales` empty means the model's floor_scale × {0.5, 1, 2, 4}.
    """

    lengths: list[int] = field(default_factory=list)
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    evals: list[str] = field(default_factory=lambda: list(DEFAULT_EVALS))
    sequences: int = 64
    window: Optional[int] = None
    bos: Optional[bool] = None
    stride: int = 256
    block: int = 1024
    max_batch_tokens: int = 32768
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 2
    needle_trials: int = 8
    needles: int = 4
    mqar_pairs: int = 16
    mqar_trials: int = 4
    entropy_sequences: int = 1
    entropy_queries: int = 32
    domains_count: Optional[int] = None
    domains_sequences: int = 256
    temperature: str = "config"
    floor_scales: list[float] = field(default_factory=list)
    attn_scales: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    calibrate_by: str = "nll"
    calibration_sequences: int = 2
    seed: int = 0
    plots: bool = True

    def resolved_lengths(self, train_len: int) -> list[int]:
        """The evaluation lengths, sorted."""
        return sorted(set(self.lengths or [train_len * m for m in self.multiples]))

    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{KEY_PREFIX}.{key}", msg)

        need(all(n >= 1 for n in self.lengths), "lengths", f"must be positive token counts, got {self.lengths}")
        need(
            bool(self.lengths) or (bool(self.multiples) and all(m >= 1 for m in self.multiples)),
            "multiples",
            f"must be a non-empty list of positive integers when lengths is empty, got {self.multiples}",
        )
        unknown = [e for e in self.evals if e not in EVALS]
        need(
            not unknown and bool(self.evals), "evals", f"must be a non-empty subset of {list(EVALS)}, got {self.evals}"
        )
        for key in (
            "sequences",
            "block",
            "max_batch_tokens",
            "max_logits_bytes",
            "passkey_trials",
            "needle_trials",
            "needles",
            "mqar_pairs",
            "mqar_trials",
            "entropy_sequences",
            "entropy_queries",
            "domains_sequences",
            "stride",
        ):
            need(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        need(
            self.window is None or self.window >= self.stride,
            "window",
            f"must be null or >= stride={self.stride}, got {self.window}",
        )
        need(
            all(0.0 <= d <= 1.0 for d in self.passkey_depths) and bool(self.passkey_depths),
            "passkey_depths",
            f"must be depths in [0, 1], got {self.passkey_depths}",
        )
        need(
            self.temperature in TEMPERATURE_MODES,
            "temperature",
            f"must be one of {'|'.join(TEMPERATURE_MODES)}, got {self.temperature!r}",
        )
        need(all(f > 0 for f in self.floor_scales), "floor_scales", f"must be > 0, got {self.floor_scales}")
        need(
            all(a >= 0 for a in self.attn_scales) and bool(self.attn_scales),
            "attn_scales",
            f"must be a non-empty list of values >= 0, got {self.attn_scales}",
        )
        need(
            self.calibrate_by in CALIBRATION_CRITERIA,
            "calibrate_by",
            f"must be one of {'|'.join(CALIBRATION_CRITERIA)}, got {self.calibrate_by!r}",
        )
        need(self.calibration_sequences >= 1, "calibration_sequences", "must be >= 1")
        need(
            self.domains_count is None or self.domains_count >= 1,
            "domains_count",
            f"must be null or >= 1, got {self.domains_count}",
        )
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


def load_options(base: Any = None, overrides: Union[Mapping[str, Any], Sequence[str]] = ()) -> LongContextEvalConfig:
    """Options from `base` (a mapping or LongContextEvalConfig, e.g. a run config's eval.long_context) plus
    overrides (a mapping or `key=value` items; experiments/overrides.py), validated; errors name the key."""
    options = to_dataclass(LongContextEvalConfig, [base or {}, as_layer(overrides)], prefix=KEY_PREFIX)
    options.validate()
    return options


def resolve_bos(options: LongContextEvalConfig, tokenizer: Tokenizer, *, pretrained: bool) -> LongContextEvalConfig:
    """`options` with `bos` decided (null: on for a pretrained model whose tokenizer starts texts with its bos);
    ConfigError on eval.long_context.bos when bos is asked of a tokenizer without one."""
    if options.bos is None:
        return replace(options, bos=pretrained and tokenizer.adds_bos and tokenizer.bos_id is not None)
    if options.bos and tokenizer.bos_id is None:
        raise ConfigError(
            f"{KEY_PREFIX}.bos", f"{tokenizer!r} defines no bos token; set {KEY_PREFIX}.bos=false (or null)"
        )
    return options
