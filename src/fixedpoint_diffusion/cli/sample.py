"""``fpdm sample``: budgeted sampling of a trained model to PNGs, an image grid and an ADM-evaluator ``.npz``, over
one process or many (``torchrun``); ``--dry-run`` prints the schedule and its cost without loading weights."""

from __future__ import annotations

import argparse
import re
from typing import Any

import fixedpoint_diffusion as fd

from .._runtime import default_device, is_rank_zero
from ..errors import InvalidValueError

# The planner's argument names, as this command's flags (its errors are reworded with them).
_FLAGS = (("iterations_per_timestep", "--iters"), ("num_timesteps", "--timesteps"), ("budget", "--budget"),
          ("allocation", "--allocation"), ("ratio", "--ratio"), ("tol", "--tol"), ("guidance_scale", "--cfg-scale"),
          ("eta", "--eta"), ("seed", "--seed"))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample", help="sample a trained model under a compute budget",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Sample a model folder (a run's ema/ folder, or any DiT/FPDM save_pretrained folder) under a "
                    "budget of transformer-block passes per image. Writes samples/*.png, grid.png, samples.npz "
                    "(arr_0: uint8 NHWC, arr_1: labels, the layout ADM's FID evaluator reads), diagnostics.json and "
                    "residuals.png.")
    p.add_argument("--model", required=True, help="model folder (config.json + weights), e.g. a run's ema/, or a "
                                                  "training checkpoint file checkpoints/step-XXXXXXXX.pt")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="with a checkpoint file: its EMA weights or the raw training weights")
    p.add_argument("--vae", default=None, help="local AutoencoderKL folder, for latent models")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' for a pipeline folder")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--num-samples", type=int, default=64, help="images to sample")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward")
    p.add_argument("--classes", default=None, help="comma-separated labels, cycled (default: random per sample)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise depends on (seed, i) only")
    p.add_argument("--budget", type=int, default=None, help="block passes per image (with neither --budget nor "
                                                             "--timesteps: 50 timesteps)")
    p.add_argument("--iters", type=int, default=None,
                   help="fixed-point iterations per timestep (FPDM; 2 when the schedule needs it)")
    p.add_argument("--timesteps", type=int, default=None, dest="num_timesteps", help="timesteps")
    p.add_argument("--num-steps", type=int, default=None, dest="num_timesteps", help=argparse.SUPPRESS)  # old name
    p.add_argument("--allocation", default="constant",
                   help="constant, increasing, decreasing, adaptive, or comma-separated iterations per timestep")
    p.add_argument("--ratio", type=float, default=3.0, help="last/first weight of increasing/decreasing")
    p.add_argument("--tol", type=float, default=1e-3, help="adaptive: relative residual to stop at")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise")
    p.add_argument("--noise", choices=["generators", "counter"], default="generators",
                   help="per-sample CPU generators, or counter-based noise drawn on the device (other images; sample "
                        "i's noise depends on (seed, i) either way)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--guidance-channels", choices=["all", "official_3"], default="all",
                   help="guide the whole prediction, or its first 3 channels as DiT's and the official FPDM code do")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse each timestep's fixed-point solution to start the next")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:1 (None: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks (None: on CUDA; the first batch pays the compilation)")
    p.add_argument("--dry-run", action="store_true", help="print the schedule and its cost, run nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (refused otherwise)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: plain lines instead (images done, speed, time left), for logs")
    p.set_defaults(func=run)


def _allocation(text: str) -> str | list[int]:
    if "," not in text and not text.isdigit():
        return text
    parts = [k.strip() for k in text.split(",")]
    if not all(k.isdigit() for k in parts):
        raise InvalidValueError(f"--allocation must be constant, increasing, decreasing, adaptive or comma-separated "
                                f"iteration counts, got {text!r}")
    return [int(k) for k in parts]


def _classes(text: str | None, num_classes: int) -> list[int] | None:
    if not text:
        return None
    bad = [c for c in text.split(",") if not (c.strip().isdigit() and int(c) < num_classes)]
    if bad:
        raise InvalidValueError(f"--classes must be labels in [0, {num_classes}), got {bad}")
    return [int(c) for c in text.split(",")]


def _in_flags(err: ValueError) -> InvalidValueError:
    """The planner's message with its argument names replaced by this command's flags."""
    message = str(err)
    for name, flag in _FLAGS:
        message = re.sub(rf"(?<![\w-]){name}(?=[ =,]|$)" if "_" not in name else rf"\b{name}\b", flag, message)
    return InvalidValueError(message)


def run(args: argparse.Namespace) -> int:
    allocation = _allocation(args.allocation)
    device = default_device(args.device)  # refused here, before anything is loaded or written
    if not args.dry_run:
        fd.check_output_folder(args.out, overwrite=args.overwrite, what="--out")
    model, diffusion = fd.load_model(args.model, weights=False, what="--model")
    budget, iters, num_timesteps = fd.fill_schedule_defaults(model, args.budget, args.iters, args.num_timesteps,
                                                             allocation)
    try:
        schedule = fd.plan(model, budget=budget, iterations_per_timestep=iters, num_timesteps=num_timesteps,
                           allocation=allocation, ratio=args.ratio, tol=args.tol,
                           num_train_timesteps=diffusion.num_timesteps)
    except ValueError as err:  # in the command's own words
        raise _in_flags(err) from None
    try:
        fd.sampling.check_sampling_options(sampler=args.sampler, eta=args.eta, guidance_scale=args.cfg_scale,
                                           guidance_channels=args.guidance_channels, seed=args.seed, noise=args.noise)
    except ValueError as err:
        raise _in_flags(err) from None
    num_classes = model.config.num_classes
    classes = _classes(args.classes, num_classes)
    if args.cfg_scale != 1.0 and num_classes < 2:
        raise InvalidValueError(f"--cfg-scale {args.cfg_scale} needs a class-conditional model "
                                f"(num_classes={num_classes})")
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InvalidValueError(f"{flag} must be >= 1, got {value}")
    if model.config.in_channels != 3 and args.vae is None and not args.dry_run:
        raise InvalidValueError(f"the model has {model.config.in_channels} input channels (a latent model): give "
                                f"--vae, a local AutoencoderKL folder, to decode its samples")
    if args.vae is not None and not args.dry_run:
        fd.data.check_vae_folder(args.vae, args.vae_subfolder, what="--vae")  # before the weights are read
    if args.dry_run:
        print(schedule.describe())
        print(f"{args.num_samples} samples: {schedule.block_passes * args.num_samples} block passes in all")
        return 0

    model, diffusion = fd.load_model(args.model, device=device, weights="model" if args.weights == "model" else True,
                                     what="--model")
    diffusion.to(device)
    compile_blocks = device.type == "cuda" if args.compile is None else args.compile
    if compile_blocks and is_rank_zero():
        print("compiling the transformer blocks (torch.compile; --no-compile to skip): the first batch includes "
              "the compilation", flush=True)
    vae = None
    if args.vae is not None:
        vae = fd.load_vae(args.vae, subfolder=args.vae_subfolder, device=device, what="--vae")
    summary = fd.sample_to_folder(
        model, diffusion, schedule, args.out, num_samples=args.num_samples, batch_size=args.batch_size,
        classes=classes, seed=args.seed, sampler=args.sampler, eta=args.eta, guidance_scale=args.cfg_scale,
        guidance_channels=args.guidance_channels, reuse=args.reuse, vae=vae, device=device,
        overwrite=args.overwrite, progress=not args.no_progress, log_lines=args.no_progress, compile=compile_blocks,
        noise=args.noise,
        settings={k: v for k, v in vars(args).items() if k != "func"})
    if summary.block_passes_per_image is not None:  # rank 0
        spent = summary.block_passes_per_image
        planned = "" if spent == schedule.block_passes else f" of the {schedule.block_passes} allowed"
        print(f"{args.num_samples} samples in {summary.out} ({spent:g} block passes per image spent{planned}, "
              f"{schedule.num_timesteps} timesteps)")
    return 0
