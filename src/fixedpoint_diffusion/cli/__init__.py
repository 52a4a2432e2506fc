"""The ``fpdm`` command: one module per subcommand, each holding its argument parser and what it prints, over the
library's public API. No library module imports from here.

Each command module has ``register(subparsers)`` (adds its parser, with ``func`` set to its ``run(args) -> int``).
The modules import the library as ``import fixedpoint_diffusion as fd``, whose names load on first use, so building
the parser (``fpdm --help``, an argument error) loads neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import InputError
from . import configs, demo, evaluate, extract_latents, sample, train

__all__ = ["build_parser", "main"]

#: The subcommands in the order ``fpdm --help`` lists them.
COMMANDS = (demo, train, extract_latents, sample, evaluate, configs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpdm", description="Fixed Point Diffusion Models: training and data tools.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `fpdm train` takes section.key=value overrides anywhere on the line, as users type them
        if args.command == "train" and all(train.is_override(e) for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except InputError as err:  # the user's input: one clear line; anything else keeps its traceback
        print(f"fpdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged: stopped without writing non-finite weights
        print(f"fpdm {args.command}: error: {err}", file=sys.stderr)
        return 1
