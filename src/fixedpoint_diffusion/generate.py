"""Sampling a trained model to a folder, over one process or many (``torchrun``): what ``fpdm sample`` runs.

The folder holds ``samples/*.png`` (one per sample index), ``samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels: the
layout ADM's FID evaluator reads), ``grid.png``, ``diagnostics.json`` (the schedule, the settings and every batch's
spent compute and residuals) and ``residuals.png``. Sample ``i``'s label and noise depend on ``(seed, i)`` only, so a
sharded run writes the same images as a single process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from fixedpoint.checks import check_int

from ._files import write_atomic, write_json_atomic
from ._runtime import check_writable_folder, init_distributed, seed_from, world_size
from .budget import Schedule
from .diffusion import Diffusion
from .errors import InvalidValueError, OutputExistsError
from .pipeline import decode_latents, image_grid, to_uint8
from .sampling import batches_for_rank, check_sampling_options, plot_residuals, sample

__all__ = ["FolderSummary", "check_output_folder", "sample_labels", "sample_to_folder"]

_RESULTS = ("samples", "samples.npz", "grid.png", "diagnostics.json", "residuals.png")


@dataclass(frozen=True)
class FolderSummary:
    """What :func:`sample_to_folder` wrote (rank 0's view; ``None`` fields on other ranks)."""

    out: Path
    num_samples: int
    block_passes_per_image: float | None
    planned_block_passes: int


def check_output_folder(out: str | os.PathLike, *, overwrite: bool = False, what: str = "out") -> None:
    """Refuse an output folder that cannot be written, or that holds an earlier run's results (unless
    ``overwrite``), before any compute. ``what`` names the argument in the message."""
    out = Path(out)
    check_writable_folder(out, what)
    found = [name for name in _RESULTS if (out / name).exists()]
    if found and not overwrite:
        raise OutputExistsError(f"{what} {str(out)!r} already holds results ({', '.join(found)}); choose another "
                                "folder or pass overwrite (--overwrite) to replace them")


def sample_labels(num_classes: int, indices: Sequence[int] | range, *, classes: Sequence[int] | None = None,
                  seed: int = 0) -> torch.Tensor:
    """The labels of samples ``indices``: ``classes`` cycled, or a uniform draw from ``(seed, i)`` per sample."""
    if classes:
        bad = [c for c in classes if not (isinstance(c, int) and 0 <= c < num_classes)]
        if bad:
            raise InvalidValueError(f"classes must be labels in [0, {num_classes}), got {bad}")
        return torch.tensor([classes[i % len(classes)] for i in indices])
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(
        seed_from(seed, 4, i)))) for i in indices])


def sample_to_folder(model: torch.nn.Module, diffusion: Diffusion, schedule: Schedule, out: str | os.PathLike, *,
                     num_samples: int = 64, batch_size: int = 32, classes: Sequence[int] | None = None,
                     seed: int = 0, sampler: str = "ddpm", eta: float = 0.0, guidance_scale: float = 1.0,
                     guidance_channels: str = "all", reuse: bool = True, vae: Any = None,
                     device: torch.device | str = "cpu", overwrite: bool = False, progress: bool = True,
                     log_lines: bool = False, compile: bool | None = None, noise: str = "generators",
                     settings: Mapping[str, Any] | None = None) -> FolderSummary:
    """Sample ``num_samples`` images under ``schedule`` into ``out``; every process of a ``torchrun`` job calls it
    and takes its share of the batches.

    Args:
        model, diffusion: a trained model on ``device`` and its diffusion (:func:`~fixedpoint_diffusion.load_model`).
        schedule: timesteps and iterations (:func:`~fixedpoint_diffusion.plan`).
        out: the folder; earlier results in it are refused unless ``overwrite``.
        num_samples, batch_size: images in all, and per forward.
        classes: labels cycled over the samples (default: a random label per sample from ``(seed, i)``).
        seed, sampler, eta, guidance_scale, guidance_channels, reuse, compile, noise: as in
            :func:`~fixedpoint_diffusion.sample` (``compile=None``: the blocks are compiled on CUDA).
        vae: a diffusers ``AutoencoderKL`` that decodes a latent model's samples.
        progress: a progress bar per process.
        log_lines: without a bar, print plain lines a log can follow (rank 0): after the first batch and at least
            every 30 s, the images done, the speed and the time left.
        settings: recorded in ``diagnostics.json`` (the command line's options, say).
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        check_int(value, name, 1, error=InvalidValueError)
    check_sampling_options(sampler=sampler, eta=eta, guidance_scale=guidance_scale,
                           guidance_channels=guidance_channels, seed=seed, noise=noise)  # before anything is cleared
    sample_labels(model.config.num_classes, range(1), classes=classes)  # bad classes refused now, too
    out = Path(out)
    check_output_folder(out, overwrite=overwrite)
    world = world_size()
    rank = init_distributed(torch.device(device))
    if dist.is_initialized():  # every rank has checked the folder before any writes to it
        dist.barrier()
    if rank == 0 and overwrite:
        _clear_results(out)
    if dist.is_initialized():
        dist.barrier()
    (out / "samples").mkdir(parents=True, exist_ok=True)
    records, runs = [], []
    batches = batches_for_rank(num_samples, batch_size, rank, world)
    lines = _ProgressLines(sum(len(idx) for idx in batches)) if log_lines and not progress and rank == 0 else None
    for idx in tqdm(batches, desc=f"sample (rank {rank})", disable=not progress):
        labels = sample_labels(model.config.num_classes, idx, classes=classes, seed=seed)
        result = sample(model, labels, diffusion=diffusion, schedule=schedule, sampler=sampler, eta=eta,
                        guidance_scale=guidance_scale, guidance_channels=guidance_channels, reuse=reuse, seed=seed,
                        indices=list(idx), device=device, compile=compile, noise=noise)
        images = decode_latents(vae, result.samples) if vae is not None else result.samples
        for i, arr in zip(idx, to_uint8(images)):
            Image.fromarray(arr).save(out / "samples" / f"{i:06d}.png")
        records.append({"indices": [idx.start, idx.stop], "labels": labels.tolist(), **result.diagnostics()})
        runs.append(result)
        if lines is not None:
            lines.update(len(idx))
    (out / f"diagnostics-rank{rank:03d}.json").write_text(json.dumps(records))
    if dist.is_initialized():
        dist.barrier()
    spent = None
    if rank == 0:
        _gather(out, num_samples, schedule, world, dict(settings or {}))
        if runs and runs[0].residuals is not None:
            plot_residuals({f"reuse={'on' if reuse else 'off'} (first batch)": runs[0]}, str(out / "residuals.png"))
        spent = sum(r.block_passes * r.samples.shape[0] for r in runs) / max(1, sum(r.samples.shape[0] for r in runs))
    if dist.is_initialized():
        dist.barrier()  # every rank leaves together, after rank 0 has gathered the folder
        dist.destroy_process_group()
    return FolderSummary(out=out, num_samples=num_samples, block_passes_per_image=spent,
                         planned_block_passes=schedule.block_passes)


class _ProgressLines:
    """Plain progress lines for logs: after the first batch, then at most every 30 s."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.start = self.last = time.perf_counter()

    def update(self, count: int) -> None:
        first, self.done = self.done == 0, self.done + count
        now = time.perf_counter()
        if not (first or now - self.last >= 30 or self.done == self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate
        print(f"[{time.strftime('%H:%M:%S')}] sampled {self.done}/{self.total} images (this process)  "
              f"{rate:.2f} images/s  about {int(left // 60)} min {int(left % 60)} s left", flush=True)


def _clear_results(out: Path) -> None:
    shutil.rmtree(out / "samples", ignore_errors=True)
    for name in _RESULTS[1:]:
        (out / name).unlink(missing_ok=True)


def _gather(out: Path, num_samples: int, schedule: Schedule, world: int, settings: dict[str, Any]) -> None:
    """Rank 0: gather every rank's PNGs into samples.npz and grid.png, and the diagnostics into one file."""
    records = []
    for r in range(world):
        records += json.loads((out / f"diagnostics-rank{r:03d}.json").read_text())
        (out / f"diagnostics-rank{r:03d}.json").unlink()
    records.sort(key=lambda rec: rec["indices"][0])
    labels = np.array([lab for rec in records for lab in rec["labels"]], dtype=np.int64)

    def read(i: int) -> np.ndarray:
        with Image.open(out / "samples" / f"{i:06d}.png") as img:
            return np.asarray(img.convert("RGB"))

    arrays = np.stack([read(i) for i in range(num_samples)])
    write_atomic(out / "samples.npz", lambda fh: np.savez(fh, arr_0=arrays, arr_1=labels))
    grid = image_grid(arrays[:64], scale=max(1, 64 // arrays.shape[1]))  # small images: tiles of at least 64 px
    Image.fromarray(grid).save(out / "grid.png")
    summary = {"schedule": {"timesteps": list(schedule.timesteps), "iterations": schedule.iterations,
                            "allocation": schedule.allocation, "budget": schedule.budget,
                            "block_passes_per_image": schedule.block_passes},
               "settings": settings, "batches": records}
    write_json_atomic(out / "diagnostics.json", summary)
