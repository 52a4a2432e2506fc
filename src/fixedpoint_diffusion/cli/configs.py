"""``fpdm configs``: list the configs shipped with the package."""

from __future__ import annotations

import argparse
from typing import Any

import fixedpoint_diffusion as fd


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("configs", help="list the configs shipped with the package")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("\n".join(fd.list_configs()))
    return 0
