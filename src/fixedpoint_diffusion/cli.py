"""The ``fpdm`` command: ``fpdm demo``, ``fpdm train``, ``fpdm extract-latents``, ``fpdm sample``, ``fpdm eval``
and ``fpdm configs``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.overrides)
    if args.out is not None:
        config.train.out_dir = args.out
        config.validate()
    summary = train(config, resume=args.resume, device=args.device, progress=not args.no_progress,
                    log_lines=args.no_progress)
    from ._runtime import is_rank_zero

    if summary.out_dir is not None and is_rank_zero():  # under torchrun: rank 0 only
        print(summary)
    return 130 if summary.interrupted else 0


def _extract(args: argparse.Namespace) -> int:
    from .data import extract_latents

    out = extract_latents(args.images, args.vae, args.out, image_size=args.image_size, batch_size=args.batch_size,
                          flip=args.flip, posterior=args.posterior, seed=args.seed, dtype=args.dtype,
                          device=args.device, vae_subfolder=args.vae_subfolder, progress=not args.no_progress)
    print(f"latents written to {out}")
    return 0


def _configs(args: argparse.Namespace) -> int:
    from .config import list_configs

    print("\n".join(list_configs()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo
    from .report import findings, summary_table

    settings = DemoSettings.default(quick=args.quick, seed=args.seed, num_samples=args.samples,
                                    train_macs=args.train_macs, device=args.device)
    try:
        record = run_demo(args.out, settings=settings, device=args.device, progress=not args.no_progress)
    except KeyboardInterrupt as err:
        print(f"fpdm demo: stopped ({err}); run the same command again to resume")
        return 130
    part1 = record["pretrained"]
    print(summary_table(part1["rows"]))
    print("\n".join(f"- {line}" for line in findings(part1["rows"], part1["comparisons"], part1["real"])))
    out = Path(args.out)
    print(f"report: {out / 'report.html'} ({out / 'report.md'}); every number: {out / 'results.json'}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="FPDM against DiT on the embedded dataset: the shipped pair across budgets, "
                                    "then both trained from scratch for equal compute",
                       description="Part 1 samples the shipped FPDM and DiT (trained for equal compute on the "
                                   "embedded Shapes data) at budgets from 6 to 96 block passes per image, with "
                                   "timestep smoothing, reallocation, solution reuse and guidance, and compares them "
                                   "with bootstrap intervals. Part 2 trains both from scratch for equal compute. "
                                   "Writes grids, plots, report.html/report.md and results.json. A rerun resumes.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="demo-results", help="results folder")
    p.add_argument("--quick", action="store_true", help="a smoke test at toy size (under a minute)")
    p.add_argument("--samples", type=int, default=None, help="images per setting (None: 400; --quick 64)")
    p.add_argument("--train-macs", type=float, default=None,
                   help=f"part 2's training compute per model, in multiply-accumulates (0: skip part 2; None: "
                        f"{DEMO_CPU_MACS:g} on CPU, about 4 minutes; {DEMO_GPU_MACS:g}, the shipped pair's, on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (None: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or time lines")
    p.set_defaults(func=_demo)


#: The demo's default training compute per model in part 2 (checked against fixedpoint_diffusion.demo's in the
#: tests; written here so that `fpdm --help` needs no import of the library).
DEMO_CPU_MACS = 3e12
DEMO_GPU_MACS = 12000 * 9_175_891_968


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fpdm", description="Fixed Point Diffusion Models: training and data tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train FPDM or DiT (single process, or one per GPU under torchrun)",
                       description="Train from a config (a shipped name, see `fpdm configs`, or a TOML file) with "
                                   "section.key=value overrides, e.g. `fpdm train --config tiny "
                                   "train.max_steps=500 model.hidden_size=128`. Multi-GPU: `torchrun "
                                   "--nproc_per_node=8 -m fixedpoint_diffusion train --config ...`.")
    p.add_argument("--config", required=True, help="shipped config name or path to a TOML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--out", help="run folder (same as train.out_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run folder")
    p.add_argument("--device", help="e.g. cpu, cuda:0 (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: plain lines instead (step, loss, speed, time left), for logs")
    p.set_defaults(func=_train)

    p = sub.add_parser("extract-latents", help="encode an image folder into VAE latents for training",
                       description="Encode images (class sub-folders) with a local diffusers AutoencoderKL. Under "
                                   "torchrun each process encodes its share and writes its own shard.")
    p.add_argument("--images", required=True, help="image folder (one sub-folder per class, or flat)")
    p.add_argument("--vae", required=True, help="local AutoencoderKL folder, e.g. a download of "
                                                "stabilityai/sd-vae-ft-ema")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' for a pipeline folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--flip", action="store_true", help="also store horizontally flipped images' latents")
    p.add_argument("--posterior", choices=["sample", "mean"], default="sample")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_extract)

    from .sample_cli import add_parser as add_sample

    add_sample(sub)

    from .eval_cli import add_parser as add_eval

    add_eval(sub)

    _add_demo(sub)

    p = sub.add_parser("configs", help="list the configs shipped with the package")
    p.set_defaults(func=_configs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `fpdm train` takes section.key=value overrides anywhere on the line, as users type them
        if args.command == "train" and all("=" in e and "." in e.split("=")[0] and not e.startswith("-")
                                           for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        # Input errors: one clear line, no traceback.
        print(f"fpdm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # training diverged: stopped without writing non-finite weights
        print(f"fpdm {args.command}: error: {err}", file=sys.stderr)
        return 1
