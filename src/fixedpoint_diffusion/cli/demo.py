"""``fpdm demo``: FPDM against DiT on the embedded dataset (see :mod:`fixedpoint_diffusion.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import fixedpoint_diffusion as fd

#: The demo's default training compute per model in part 2, shown by ``--help`` (checked against
#: :mod:`fixedpoint_diffusion.demo`'s in the tests; written here so that the parser needs no torch).
DEMO_CPU_MACS = 3e12
DEMO_GPU_MACS = 12000 * 9_175_891_968


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="FPDM against DiT on the embedded dataset: the shipped pair across budgets, then both trained "
                     "from scratch for equal compute",
        description="Part 1 samples the shipped FPDM and DiT (trained for equal compute on the embedded Shapes data) "
                    "at budgets from 6 to 96 block passes per image, with timestep smoothing, reallocation, solution "
                    "reuse and guidance, and compares them with bootstrap intervals. Part 2 trains both from scratch "
                    "for equal compute. Writes grids, plots, report.html/report.md and results.json. A rerun "
                    "resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo-results", help="results folder")
    p.add_argument("--quick", action="store_true", help="a smoke test at toy size (under a minute)")
    p.add_argument("--samples", type=int, default=None, help="images per setting (None: 400; --quick 64)")
    p.add_argument("--train-macs", type=float, default=None,
                   help=f"part 2's training compute per model, in multiply-accumulates (0: skip part 2; None: "
                        f"{DEMO_CPU_MACS:g} on CPU, about 4 minutes; {DEMO_GPU_MACS:g}, the shipped pair's, on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (None: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: only plain lines with the elapsed time between stages, for logs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = fd.DemoSettings.default(quick=args.quick, seed=args.seed, num_samples=args.samples,
                                       train_macs=args.train_macs, device=args.device)
    try:
        record = fd.run_demo(args.out, settings=settings, device=args.device, progress=not args.no_progress,
                             log_lines=True)
    except KeyboardInterrupt as err:
        print(f"fpdm demo: stopped ({err}); run the same command again to resume")
        return 130
    part1 = record["pretrained"]
    print(fd.report.summary_table(part1["rows"]))
    print("\n".join(f"- {line}" for line in fd.report.findings(part1["rows"], part1["comparisons"], part1["real"])))
    out = Path(args.out)
    print(f"report: {out / 'report.html'} ({out / 'report.md'}); every number: {out / 'results.json'}")
    return 0
