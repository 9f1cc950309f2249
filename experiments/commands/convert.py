"""`llamoe convert`: local Hugging Face Llama / Llama 4 directories <-> llamoe checkpoint files.

    llamoe convert from-hf HF_DIR OUT.pt
    llamoe convert to-hf CHECKPOINT.pt OUT_DIR [--architecture llama|llama4]

The llamoe checkpoint file's format is experiments/train/model_source.py's (`save_checkpoint`,
`load_checkpoint`); run-directory training checkpoints are a separate format (experiments/train/checkpoint.py).

Only local paths are read; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

from llamoe.experiments.train.model_source import load_checkpoint, save_checkpoint
from llamoe.models.build import build_model
from llamoe.models.config import ConfigError


def _from_hf(args: argparse.Namespace) -> None:
    from llamoe.models.hf import load_hf

    model = load_hf(args.src)
    save_checkpoint(model.cfg, model.state_dict(), args.dst)
    print(f"wrote {args.dst}: {model.cfg.num_params():,} parameters")


def _to_hf(args: argparse.Namespace) -> None:
    from llamoe.models.hf import save_hf

    cfg, state_dict = load_checkpoint(args.src)
    dtype = state_dict["tok_embeddings.weight"].dtype
    model = build_model(cfg, dtype=dtype, state_dict=state_dict)  # checks the keys and shapes
    save_hf(model, args.dst, architecture=args.architecture)
    print(f"wrote {args.dst}: config.json + model.safetensors")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamoe convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    from_hf = sub.add_parser("from-hf", help="HF directory (config.json + safetensors) -> llamoe checkpoint file")
    from_hf.add_argument("src", help="local HF model directory")
    from_hf.add_argument("dst", help="output checkpoint file (.pt)")
    from_hf.set_defaults(run=_from_hf)
    to_hf = sub.add_parser("to-hf", help="llamoe checkpoint file -> HF directory")
    to_hf.add_argument("src", help="llamoe checkpoint file (.pt)")
    to_hf.add_argument("dst", help="output directory")
    to_hf.add_argument(
        "--architecture",
        choices=["llama", "llama4"],
        default=None,
        help="HF class to write (default: LlamaForCausalLM for dense RoPE models, else Llama4ForCausalLM)",
    )
    to_hf.set_defaults(run=_to_hf)
    return parser


def cli_main(argv: list[str]) -> int:
    """Run `llamoe convert`; exit status 2 on a bad config, path or checkpoint."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except ModuleNotFoundError as err:
        print(
            f"llamoe convert: {err.name} is not installed; the Hugging Face adapters need it: "
            "pip install 'llamoe[hf]' (transformers, safetensors)",
            file=sys.stderr,
        )
        return 2
    except (ConfigError, KeyError, FileNotFoundError) as err:
        print(f"llamoe convert: {err}", file=sys.stderr)
        return 2
    return 0
