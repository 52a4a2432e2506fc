"""``fpdm train``: train FPDM or DiT from a config, in one process or one per GPU under ``torchrun``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import fixedpoint_diffusion as fd

from .._runtime import is_rank_zero


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="train FPDM or DiT (single process, or one per GPU under torchrun)",
        description="Train from a config (a shipped name, see `fpdm configs`, or a TOML file) with section.key=value "
                    "overrides, e.g. `fpdm train --config tiny train.max_steps=500 model.hidden_size=128`. "
                    "Multi-GPU: `torchrun --nproc_per_node=8 -m fixedpoint_diffusion train --config ...`.")
    p.add_argument("--config", required=True, help="shipped config name or path to a TOML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--out", help="run folder (same as train.out_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: plain lines instead (step, loss, speed, time left), for logs")
    p.set_defaults(func=run)


def is_override(word: str) -> bool:
    """Whether a stray command-line word is a ``section.key=value`` override."""
    return "=" in word and "." in word.split("=")[0] and not word.startswith("-")


def run(args: argparse.Namespace) -> int:
    config = fd.load_config(args.config, args.overrides)
    if args.out is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=args.out))
        config.validate()
    summary = fd.train(config, resume=args.resume, device=args.device, progress=not args.no_progress,
                       log_lines=args.no_progress)
    if summary.out_dir is not None and is_rank_zero():  # under torchrun: rank 0 only
        print(summary)
    return 130 if summary.interrupted else 0
