"""``fpdm sample``: budgeted sampling to PNGs, an image grid and an ADM-evaluator ``.npz``, over one process or
many (``torchrun``); ``--dry-run`` prints the schedule and its cost without loading weights."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._runtime import check_writable_folder, default_device, init_distributed, seed_from, world_size

if TYPE_CHECKING:  # imported where used: `fpdm --help` builds this parser without loading torch
    import torch

__all__ = ["add_parser", "load_model", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sample", help="sample a trained model under a compute budget",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Sample a model folder (a run's ema/ folder, or any DiT/FPDM save_pretrained "
                                   "folder) under a budget of transformer-block passes per image. Writes "
                                   "samples/*.png, grid.png, samples.npz (arr_0: uint8 NHWC, arr_1: labels, the "
                                   "layout ADM's FID evaluator reads), diagnostics.json and residuals.png.")
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
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--guidance-channels", choices=["all", "official_3"], default="all")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse each timestep's fixed-point solution to start the next (default on)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda:1 (None: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--dry-run", action="store_true", help="print the schedule and its cost, run nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --out (refused otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _model_class(folder: Path):
    from .models import FPDM, DiT

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--model {str(folder)!r}: no config.json (give a run's ema/ folder or a "
                                f"save_pretrained folder)")
    try:
        name = json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"--model {str(folder)!r}: {config_path.name} is not a JSON object ({err})") from None
    classes = {"FPDM": FPDM, "DiT": DiT}
    if name not in classes:
        raise ValueError(f"--model {str(folder)!r}: config.json names class {name!r}, expected FPDM or DiT")
    return classes[name]


def load_model(folder: str | os.PathLike, *, weights: bool | str = True, device: str | torch.device = "cpu"):
    """A DiT/FPDM from a folder, and the :class:`Diffusion` it was trained with (``diffusion.json`` beside the
    weights, or the run folder's ``config.json``; the paper's defaults otherwise). ``weights=False`` builds it on
    the meta device (for planning only).

    ``folder`` may also be a training checkpoint file (``checkpoints/step-XXXXXXXX.pt``): its EMA weights are
    loaded, or the raw training weights when ``weights="model"``.
    """
    import torch

    folder = Path(folder)
    if folder.is_file():
        return _load_checkpoint_file(folder, weights, device)
    cls = _model_class(folder)
    if weights:
        files = [f for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                 if (folder / f).is_file()]
        if not files:
            raise FileNotFoundError(f"--model {str(folder)!r}: no weights (diffusion_pytorch_model.safetensors)")
        try:
            model = cls.from_pretrained(folder, low_cpu_mem_usage=False).to(device).eval()
        except (OSError, RuntimeError, EnvironmentError) as err:
            raise ValueError(f"--model {str(folder)!r}: the weights in {files[0]} cannot be read "
                             f"({str(err).splitlines()[0]})") from None
    else:
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(folder))
    settings: dict[str, Any] = {}
    if (folder / "diffusion.json").is_file():
        settings = json.loads((folder / "diffusion.json").read_text())
    elif (folder.parent / "config.json").is_file():
        settings = json.loads((folder.parent / "config.json").read_text()).get("diffusion", {})
    return model, _diffusion(settings, model)


def _diffusion(settings: dict[str, Any], model: Any):
    """The sampling schedule from saved diffusion settings (``Diffusion.from_config``: an unknown key is an
    error); ``learn_sigma`` follows the model."""
    from .diffusion import Diffusion

    return Diffusion.from_config(settings, learn_sigma=model.config.learn_sigma)


def _load_checkpoint_file(path: Path, weights: bool | str, device: Any):
    import torch

    from .models import create_model

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise ValueError(f"--model {str(path)!r}: not a readable training checkpoint "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not (isinstance(ckpt, dict) and {"model", "ema", "config"} <= set(ckpt)):
        raise ValueError(f"--model {str(path)!r}: not a training checkpoint written by fpdm train (give a "
                         "model folder, e.g. a run's ema/, or checkpoints/step-XXXXXXXX.pt)")
    model_args = dict(ckpt["config"]["model"])
    name = model_args.pop("name")
    if weights is False:
        with torch.device("meta"):
            model = create_model(name, **model_args)
    else:
        model = create_model(name, **model_args)
        model.load_state_dict(ckpt["model"] if weights == "model" else ckpt["ema"])
        model = model.to(device).eval()
    return model, _diffusion(ckpt["config"].get("diffusion", {}), model)


def _labels(args, num_classes: int, indices: range) -> torch.Tensor:
    import torch

    if args.classes:
        chosen = [int(c) for c in args.classes.split(",")]
        return torch.tensor([chosen[i % len(chosen)] for i in indices])
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        seed_from(args.seed, 4, i)))) for i in indices])


def run(args: argparse.Namespace) -> int:
    from .sampling import fill_schedule_defaults, plan, plot_residuals, sample

    allocation: Any = args.allocation
    if "," in allocation or allocation.isdigit():
        parts = [k.strip() for k in allocation.split(",")]
        if not all(k.isdigit() for k in parts):
            raise ValueError(f"--allocation must be constant, increasing, decreasing, adaptive or comma-separated "
                             f"iteration counts, got {args.allocation!r}")
        allocation = [int(k) for k in parts]
    device = default_device(args.device)  # refused here, before anything is loaded or written
    out = Path(args.out)
    if not args.dry_run:
        _check_out(out, args.overwrite)
    model, diffusion = load_model(args.model, weights=False)
    budget, iters, num_timesteps = fill_schedule_defaults(model, args.budget, args.iters, args.num_timesteps,
                                                          allocation)
    try:
        schedule = plan(model, budget=budget, iterations_per_timestep=iters, num_timesteps=num_timesteps,
                        allocation=allocation,
                        ratio=args.ratio, tol=args.tol, num_train_timesteps=diffusion.num_timesteps)
    except ValueError as err:  # in the command's own words
        message = str(err)
        for name, flag in (("iterations_per_timestep", "--iters"), ("num_timesteps", "--timesteps"),
                           ("budget", "--budget"),
                           ("allocation", "--allocation"), ("ratio", "--ratio"), ("tol", "--tol")):
            message = re.sub(rf"(?<![\w-]){name}(?=[ =,]|$)" if "_" not in name else rf"\b{name}\b", flag, message)
        raise ValueError(message) from None
    num_classes = model.config.num_classes
    if args.classes:
        bad = [c for c in args.classes.split(",") if not (c.strip().isdigit() and int(c) < num_classes)]
        if bad:
            raise ValueError(f"--classes must be labels in [0, {num_classes}), got {bad}")
    if args.cfg_scale != 1.0 and num_classes < 2:
        raise ValueError(f"--cfg-scale {args.cfg_scale} needs a class-conditional model (num_classes={num_classes})")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    latent = model.config.in_channels != 3
    if latent and args.vae is None and not args.dry_run:
        raise ValueError(f"the model has {model.config.in_channels} input channels (a latent model): give --vae, "
                         f"a local AutoencoderKL folder, to decode its samples")
    if args.dry_run:
        print(schedule.describe())
        print(f"{args.num_samples} samples: {schedule.block_passes * args.num_samples} block passes in all")
        return 0

    import torch.distributed as dist
    from tqdm.auto import tqdm

    from .pipeline import decode_latents, to_uint8

    world = world_size()
    rank = init_distributed(device)
    model, diffusion = load_model(args.model, device=device, weights="model" if args.weights == "model" else True)
    diffusion.to(device)
    vae = None
    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.vae_subfolder, local_files_only=True,
                                            low_cpu_mem_usage=False)
        vae = vae.to(device).eval()
    if rank == 0 and args.overwrite:
        _clear_results(out)
    if dist.is_initialized():
        dist.barrier()
    (out / "samples").mkdir(parents=True, exist_ok=True)
    from .sampling import batches_for_rank

    batches = batches_for_rank(args.num_samples, args.batch_size, rank, world)
    records, residual_runs = [], []
    for idx in tqdm(batches, desc=f"sample (rank {rank})", disable=args.no_progress):
        labels = _labels(args, num_classes, idx)
        result = sample(model, labels, diffusion=diffusion, schedule=schedule, sampler=args.sampler, eta=args.eta,
                        guidance_scale=args.cfg_scale, guidance_channels=args.guidance_channels, reuse=args.reuse,
                        seed=args.seed, indices=list(idx), device=device)
        images = decode_latents(vae, result.samples) if vae is not None else result.samples
        from PIL import Image

        for i, arr in zip(idx, to_uint8(images)):
            Image.fromarray(arr).save(out / "samples" / f"{i:06d}.png")
        records.append({"indices": [idx.start, idx.stop], "labels": labels.tolist(), **result.diagnostics()})
        residual_runs.append(result)
    (out / f"diagnostics-rank{rank:03d}.json").write_text(json.dumps(records))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _finish(out, args, schedule, world)
        if residual_runs and residual_runs[0].residuals is not None:
            plot_residuals({f"reuse={'on' if args.reuse else 'off'} (first batch)": residual_runs[0]},
                           str(out / "residuals.png"))
        spent = sum(r.block_passes * r.samples.shape[0] for r in residual_runs) / max(
            1, sum(r.samples.shape[0] for r in residual_runs))
        planned = "" if spent == schedule.block_passes else f" of the {schedule.block_passes} allowed"
        print(f"{args.num_samples} samples in {out} ({spent:g} block passes per image spent{planned}, "
              f"{schedule.num_timesteps} timesteps)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


_RESULTS = ("samples", "samples.npz", "grid.png", "diagnostics.json", "residuals.png")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot be written, or that holds an earlier run's results (unless
    ``--overwrite``), before any compute."""
    check_writable_folder(out, "--out")
    found = [name for name in _RESULTS if (out / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} already holds results ({', '.join(found)}); choose another "
                              "folder or pass --overwrite to replace them")


def _clear_results(out: Path) -> None:
    import shutil

    shutil.rmtree(out / "samples", ignore_errors=True)
    for name in _RESULTS[1:]:
        (out / name).unlink(missing_ok=True)


def _finish(out: Path, args, schedule, world: int) -> None:
    """Rank 0: gather every rank's PNGs into samples.npz and grid.png, and the diagnostics into one file."""
    from PIL import Image

    from .pipeline import image_grid

    records = []
    for r in range(world):
        records += json.loads((out / f"diagnostics-rank{r:03d}.json").read_text())
        (out / f"diagnostics-rank{r:03d}.json").unlink()
    records.sort(key=lambda rec: rec["indices"][0])
    labels = np.array([lab for rec in records for lab in rec["labels"]], dtype=np.int64)
    def read(i: int) -> np.ndarray:
        with Image.open(out / "samples" / f"{i:06d}.png") as img:
            return np.asarray(img.convert("RGB"))

    arrays = np.stack([read(i) for i in range(args.num_samples)])
    tmp = out / "samples.tmp.npz"
    np.savez(tmp, arr_0=arrays, arr_1=labels)
    os.replace(tmp, out / "samples.npz")
    grid = image_grid(arrays[:64], scale=max(1, 64 // arrays.shape[1]))  # small images: tiles of at least 64 px
    Image.fromarray(grid).save(out / "grid.png")
    summary = {"schedule": {"timesteps": list(schedule.timesteps), "iterations": schedule.iterations,
                            "allocation": schedule.allocation, "budget": schedule.budget,
                            "block_passes_per_image": schedule.block_passes},
               "settings": {k: v for k, v in vars(args).items() if k != "func"}, "batches": records}
    (out / "diagnostics.json").write_text(json.dumps(summary, indent=1))
