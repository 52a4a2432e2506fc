"""``FPDMPipeline``: a diffusers ``DiffusionPipeline`` around :func:`fixedpoint_diffusion.sampling.sample`, with an
optional ``AutoencoderKL`` for latent models; ``save_pretrained``/``from_pretrained`` folders work offline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline

from .diffusion import Diffusion
from .errors import InvalidValueError
from .sampling import SampleOutput, fill_schedule_defaults, sample, scheduler_from_diffusion

__all__ = ["FPDMPipeline", "FPDMPipelineOutput", "diffusion_from_scheduler", "scheduler_from_diffusion"]


def diffusion_from_scheduler(scheduler: Any) -> Diffusion:
    """Our float64 :class:`Diffusion` tables from a diffusers scheduler's config: the inverse of
    :func:`~fixedpoint_diffusion.sampling.scheduler_from_diffusion` (``learn_sigma`` from a learned-range
    variance; ``mean_loss``, a training option, stays the default)."""
    cfg = scheduler.config
    if cfg.beta_schedule != "linear":
        raise InvalidValueError(f"only the linear beta schedule is supported, got {cfg.beta_schedule!r}")
    prediction = {"v_prediction": "v", "epsilon": "epsilon"}.get(cfg.prediction_type)
    if prediction is None:
        raise InvalidValueError(f"prediction_type must be 'v_prediction' or 'epsilon', got {cfg.prediction_type!r}")
    return Diffusion.from_config({"num_timesteps": cfg.num_train_timesteps, "beta_start": cfg.beta_start,
                                  "beta_end": cfg.beta_end, "prediction": prediction,
                                  "zero_terminal_snr": bool(cfg.get("rescale_betas_zero_snr", False)),
                                  "learn_sigma": cfg.variance_type == "learned_range"})


@dataclass
class FPDMPipelineOutput:
    """``images``: a list of PIL images, a (B, H, W, 3) uint8 array (``"np"``), or the raw samples (``"latent"``,
    ``"pt"``); ``result``: the :class:`~fixedpoint_diffusion.sampling.SampleOutput` (schedule, iterations,
    residuals, block passes, MACs)."""

    images: Any
    result: SampleOutput


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 (the layout of ADM's evaluator ``.npz``)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int | None = None, scale: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, 3) into one (rows * H * scale, columns * W * scale, 3) image, row by row.

    Args:
        columns: images per row (default: ceil(sqrt(N)), a near-square grid); empty cells stay black.
        scale: integer nearest-neighbour upscaling (small images stay crisp in a viewer).
    """
    n, h, w = images.shape[:3]
    if n == 0:
        raise InvalidValueError("images is empty")
    if not (isinstance(scale, int) and scale >= 1):
        raise InvalidValueError(f"scale must be an int >= 1, got {scale!r}")
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for k in range(n):
        grid[(k // columns) * h:(k // columns + 1) * h, (k % columns) * w:(k % columns + 1) * w] = images[k]
    return grid.repeat(scale, 0).repeat(scale, 1) if scale > 1 else grid


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents written by training/extraction (``(z - shift_factor) * scaling_factor``) -> images in [-1, 1]
    through an ``AutoencoderKL``, both factors from its config."""
    cfg = vae.config
    z = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    return vae.decode(z.to(vae.dtype)).sample


class FPDMPipeline(DiffusionPipeline):
    """Class-conditional sampling from an FPDM (or DiT) under a compute budget.

    Components: ``transformer`` (an :class:`~fixedpoint_diffusion.FPDM` or :class:`~fixedpoint_diffusion.DiT`),
    ``scheduler`` (a ``DDPMScheduler`` whose config is the training schedule) and, for latent models, ``vae``
    (an ``AutoencoderKL``; its ``scaling_factor``/``shift_factor`` undo the latent scaling).

    Example::

        pipe = FPDMPipeline(transformer=model, scheduler=scheduler_from_diffusion(fd.Diffusion()), vae=vae)
        out = pipe([207, 360], budget=280, iterations_per_timestep=8, guidance_scale=4.0, seed=0)
        out.images[0].save("dog.png"); print(out.result.block_passes)
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]  # noqa: RUF012 - diffusers' class attribute

    def __init__(self, transformer, scheduler, vae=None, id2label: dict[int | str, str] | None = None) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.labels: dict[str, int] = {}
        for key, names in (id2label or {}).items():
            for name in str(names).split(","):  # "tabby, tabby cat" -> both names
                self.labels[name.strip()] = int(key)

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class indices of class names (as diffusers' ``DiTPipeline.get_label_ids``); the names come from the
        ``id2label`` given at construction."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            known = ", ".join(sorted(self.labels)) or "none: pass id2label= when building the pipeline"
            raise InvalidValueError(f"FPDMPipeline.get_label_ids: unknown label(s) {unknown}; known: {known}")
        return [self.labels[n] for n in names]

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [-1, 1]: through the VAE for a latent model, unchanged for a pixel model."""
        return samples if self.vae is None else decode_latents(self.vae, samples)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int] | torch.Tensor | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True,
                 num_samples: int | None = None, budget: int | None = None,
                 iterations_per_timestep: int | None = None, seed: int | None = None,
                 **sampling: Any) -> FPDMPipelineOutput | tuple:
        """Sample and decode, with diffusers' argument names.

        Args:
            class_labels: class indices (see :meth:`get_label_ids`), or ``None`` with ``num_samples`` for an
                unconditional model.
            num_inference_steps: timesteps. With neither this nor ``budget``: 50 timesteps, and for an FPDM
                ``iterations_per_timestep`` 2 unless given.
            guidance_scale: classifier-free guidance (1: off).
            generator: a ``torch.Generator`` from which the seed is drawn (sample ``i``'s noise then depends only
                on that seed and ``i``, so sharded runs agree); or give ``seed``. Default: seed 0.
            output_type: ``"pil"``, ``"np"`` (uint8), ``"pt"`` (decoded, [-1, 1]) or ``"latent"``.
            return_dict: ``False`` returns ``(images,)``.
            budget, iterations_per_timestep: the compute budget (block passes per image) and FPDM's iterations
                per timestep, as in :func:`~fixedpoint_diffusion.plan`.
            sampling: other :func:`~fixedpoint_diffusion.sample` options (``allocation``, ``sampler``, ``eta``,
                ``reuse``, ``guidance_channels``, ``tol``, ``ratio``, ``indices``, ``progress``, ``compile``: the
                transformer's blocks are compiled on CUDA unless ``compile=False``).

        Raises:
            TypeError: an argument this pipeline does not take (named).
        """
        unknown = sorted(set(sampling) - _SAMPLE_OPTIONS)
        if unknown:
            raise TypeError(f"FPDMPipeline got unexpected argument(s) {unknown}; it takes class_labels, "
                            f"num_inference_steps, guidance_scale, generator, output_type, return_dict, num_samples, "
                            f"budget, iterations_per_timestep, seed and {sorted(_SAMPLE_OPTIONS)}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InvalidValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if generator is not None and seed is not None:
            raise InvalidValueError("give generator or seed, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"FPDMPipeline: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        if "num_timesteps" in sampling:  # sample()'s name for it
            if num_inference_steps is not None:
                raise InvalidValueError("give num_inference_steps or num_timesteps, not both")
            num_inference_steps = sampling.pop("num_timesteps")
        if "schedule" not in sampling:
            budget, iterations_per_timestep, num_inference_steps = fill_schedule_defaults(
                self.transformer, budget, iterations_per_timestep, num_inference_steps,
                sampling.get("allocation", "constant"))
        diffusion = diffusion_from_scheduler(self.scheduler).to(self.device)
        self.transformer.eval()
        result = sample(self.transformer, class_labels, diffusion=diffusion, num_samples=num_samples,
                        device=self.device, budget=budget, iterations_per_timestep=iterations_per_timestep,
                        num_timesteps=num_inference_steps, guidance_scale=guidance_scale, seed=seed or 0, **sampling)
        if output_type == "latent":
            images: Any = result.samples
        else:
            images = self.decode(result.samples)
            if output_type in ("np", "pil"):
                images = to_uint8(images)
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(a) for a in images]
        if not return_dict:
            return (images,)
        return FPDMPipelineOutput(images=images, result=result)


_SAMPLE_OPTIONS = frozenset({"allocation", "sampler", "eta", "reuse", "guidance_channels", "tol", "ratio", "indices",
                             "progress", "schedule", "num_timesteps", "compile"})
