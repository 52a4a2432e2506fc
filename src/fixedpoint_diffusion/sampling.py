"""Budgeted sampling (paper Sec. 3.3): timestep smoothing, compute reallocation across timesteps, solution reuse,
DDPM and DDIM, classifier-free guidance.

The budget is counted in transformer-block forward passes per image, the paper's unit (footnote 4): a timestep of
FPDM costs ``pre_depth + iterations + post_depth`` passes, one of DiT ``depth``. :func:`plan` turns a budget into a
:class:`Schedule` (which timesteps, how many fixed-point iterations at each) without touching the model's weights;
:func:`sample` runs it. Guidance doubles the batch, not the chain, so it does not change the block-pass count; the
multiply-accumulates reported (``macs``) are what was really computed, guidance included.

Determinism: every sample ``i`` draws its initial noise and its DDPM noise from its own generator seeded by
``(seed, i)``, so a sample does not depend on which other samples share its batch's random draws; with the same
batches (see :func:`batches_for_rank`), sharding a job over processes gives bit-identical images.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._runtime import seed_from
from .diffusion import Diffusion, _gather

__all__ = ["ALLOCATIONS", "SampleOutput", "Schedule", "batches_for_rank", "plan", "sample"]

ALLOCATIONS = ("constant", "increasing", "decreasing", "adaptive")


@dataclass(frozen=True)
class Schedule:
    """Which timesteps a sampler visits and how many fixed-point iterations each gets.

    Attributes:
        timesteps: training-timestep indices, from noisiest to cleanest.
        iterations: fixed-point iterations per timestep (``None`` for explicit models such as DiT); for
            ``"adaptive"`` the per-timestep allowance before unused iterations are carried forward.
        explicit_passes: block passes per timestep outside the fixed point (``pre + post``, or DiT's depth).
        budget: the budget asked for (``None`` if none was given).
        allocation: how iterations were spread (``"constant"``, ``"increasing"``, ``"decreasing"``,
            ``"custom"``, ``"adaptive"``).
        tol: adaptive only: the relative residual at which a timestep's solve stops.
    """

    timesteps: tuple[int, ...]
    iterations: tuple[int, ...] | None
    explicit_passes: int
    budget: int | None
    allocation: str
    tol: float | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def block_passes(self) -> int:
        """Block passes per image if every timestep spends its allowance (the most an adaptive run spends)."""
        return self.num_steps * self.explicit_passes + (sum(self.iterations) if self.iterations else 0)

    def describe(self) -> str:
        """A readable table of the schedule and its cost."""
        lines = [f"{self.num_steps} timesteps, {self.block_passes} block passes per image"
                 + (f" (budget {self.budget})" if self.budget is not None else "")
                 + f", allocation {self.allocation}" + (f", tol {self.tol:g}" if self.tol is not None else "")]
        lines.append("step  timestep  iterations  block passes")
        for i, t in enumerate(self.timesteps):
            it = self.iterations[i] if self.iterations else 0
            lines.append(f"{i:4d}  {t:8d}  {it if self.iterations else '-':>10}  {self.explicit_passes + it:12d}")
        return "\n".join(lines)


def _is_fixed_point_model(model: Any) -> bool:
    forward = getattr(model, "forward", model)
    try:
        return "num_steps" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


#: What a caller that gives neither a budget nor a number of timesteps gets: 50 timesteps (diffusers' default),
#: and for a fixed-point model 2 iterations at each.
DEFAULT_NUM_STEPS = 50
DEFAULT_ITERS_PER_STEP = 2


def fill_schedule_defaults(model: Any, budget: int | None, iters_per_step: int | None, num_steps: int | None,
                           allocation: str | Sequence[int] = "constant") -> tuple[int | None, int | None, int | None]:
    """``(budget, iters_per_step, num_steps)`` completed with the defaults where a user gave too little for
    :func:`plan`: no budget and no timesteps -> :data:`DEFAULT_NUM_STEPS` timesteps; a fixed-point model still
    short of a second quantity (and not given per-timestep iterations) -> :data:`DEFAULT_ITERS_PER_STEP`. What
    was given is kept, so inconsistent input still reaches :func:`plan` and its errors."""
    if budget is None and num_steps is None:
        num_steps = DEFAULT_NUM_STEPS
    if (_is_fixed_point_model(model) and iters_per_step is None and isinstance(allocation, str)
            and (budget is None or num_steps is None)):
        iters_per_step = DEFAULT_ITERS_PER_STEP
    return budget, iters_per_step, num_steps


def _explicit_passes(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if _is_fixed_point_model(model):
        return int(getattr(cfg, "pre_depth", 0)) + int(getattr(cfg, "post_depth", 0))
    depth = getattr(cfg, "depth", None)
    return int(depth) if depth is not None else None


def spaced_timesteps(num_train_timesteps: int, num_steps: int) -> tuple[int, ...]:
    """``num_steps`` evenly spaced training timesteps from ``T - 1`` down to 0 (ADM's respacing, diffusers'
    ``"linspace"``); a single step is taken at ``T - 1``."""
    if num_steps == 1:
        return (num_train_timesteps - 1,)
    return tuple(int(t) for t in np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1])


def _distribute(total: int, weights: Sequence[float], prefer_late: bool = True) -> list[int]:
    """Split ``total`` iterations over the steps: one each, the rest in proportion to ``weights`` (largest
    remainders; ties to the larger weight, then to the later step if ``prefer_late`` else the earlier), so
    non-decreasing weights with ``prefer_late`` (non-increasing without) give monotone counts summing to
    ``total``."""
    n = len(weights)
    extra = total - n
    w = np.asarray(weights, dtype=np.float64)
    quota = extra * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    left = extra - int(counts.sum())
    # Remainders are compared to 1e-9: a reversed ramp's quotas differ in the last bits, which would otherwise
    # decide ties and make "decreasing" other than the mirror of "increasing".
    remainder = np.round(quota - counts, 9)
    order = sorted(range(n), key=lambda i: (-remainder[i], -w[i], -i if prefer_late else i))
    for i in order[:left]:
        counts[i] += 1
    return [1 + int(c) for c in counts]


def plan(model: Any = None, *, budget: int | None = None, iters_per_step: int | None = None,
         num_steps: int | None = None, allocation: str | Sequence[int] = "constant", ratio: float = 3.0,
         tol: float = 1e-3, num_train_timesteps: int = 1000, explicit_passes: int | None = None) -> Schedule:
    """A sampling schedule from a compute budget.

    For a fixed-point model (one whose forward takes ``num_steps``, such as FPDM), give two of:

    * ``budget`` and ``iters_per_step``: the number of timesteps follows, ``budget // (explicit + k)``
      ("timestep smoothing": fewer iterations, more timesteps);
    * ``budget`` and ``num_steps``: the iterations follow, ``budget - num_steps * explicit`` spread over them;
    * ``num_steps`` and ``iters_per_step``: ``k`` iterations at each of ``num_steps`` timesteps.

    ``allocation`` spreads the iterations: ``"constant"`` (``k`` each when ``iters_per_step`` is given, otherwise
    as even as possible), ``"increasing"``/``"decreasing"`` (linear weights from 1 to ``ratio`` towards the clean /
    the noisy end, paper Sec. 3.3), a list of per-timestep counts (``"custom"``), or ``"adaptive"``: each timestep
    may spend its even share plus whatever earlier timesteps left unused, and stops as soon as the relative
    residual falls below ``tol``. The total never exceeds the budget and every timestep gets at least one iteration.

    For an explicit model (DiT) the budget buys ``budget // depth`` timesteps.

    Args:
        model: the model (only its config is read: ``pre_depth``/``post_depth`` or ``depth``); or give
            ``explicit_passes`` and no model for a fixed-point schedule.

    Raises:
        ValueError: a budget too small for one timestep (with at least one iteration), ``iters_per_step < 1``,
            an unknown allocation, or an inconsistent combination.
    """
    fixed_point = explicit_passes is not None if model is None else _is_fixed_point_model(model)
    explicit = explicit_passes if model is None else _explicit_passes(model)
    for name, value in (("budget", budget), ("iters_per_step", iters_per_step), ("num_steps", num_steps)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    custom = None
    if not isinstance(allocation, str):
        custom = list(allocation) if isinstance(allocation, (list, tuple)) else None
        if not custom or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in custom):
            raise ValueError(f"allocation must be a name or a non-empty list of ints >= 1 (iterations per "
                             f"timestep), got {allocation!r}")
        if iters_per_step is not None:
            raise ValueError(f"a custom allocation sets every timestep's iterations; iters_per_step="
                             f"{iters_per_step} would be ignored: give one of them")
        allocation_name = "custom"
    elif allocation in ALLOCATIONS:
        allocation_name = allocation
    else:
        raise ValueError(f"allocation must be one of {list(ALLOCATIONS)} or a list of per-timestep iterations, "
                         f"got {allocation!r}")
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio >= 1):
        raise ValueError(f"ratio must be a finite number >= 1, got {ratio!r}")

    if not fixed_point:
        if explicit is None:
            if budget is not None:
                raise ValueError("budget needs a model whose per-timestep cost is known (config.depth); give "
                                 "num_steps instead")
            explicit = 0
        if iters_per_step is not None or custom is not None or allocation_name != "constant":
            raise ValueError("iters_per_step and allocations apply to fixed-point models only (this model has no "
                             "num_steps argument)")
        if budget is not None:
            steps = budget // explicit
            if steps < 1:
                raise ValueError(f"budget {budget} is too small for one timestep ({explicit} block passes each)")
            if num_steps is not None and num_steps != steps:
                raise ValueError(f"budget {budget} buys {steps} timesteps of {explicit} block passes, not "
                                 f"num_steps={num_steps}; give one of them")
        elif num_steps is None:
            raise ValueError("give budget or num_steps")
        else:
            steps = num_steps
        _check_steps(steps, num_train_timesteps)
        return Schedule(spaced_timesteps(num_train_timesteps, steps), None, explicit, budget, "constant")

    if custom is not None:
        steps = len(custom)
        if num_steps is not None and num_steps != steps:
            raise ValueError(f"the custom allocation has {steps} entries but num_steps={num_steps}")
        if budget is not None and steps * explicit + sum(custom) > budget:
            raise ValueError(f"the custom allocation costs {steps * explicit + sum(custom)} block passes, over "
                             f"the budget of {budget}")
        _check_steps(steps, num_train_timesteps)
        return Schedule(spaced_timesteps(num_train_timesteps, steps), tuple(custom), explicit, budget, "custom")

    given = sum(v is not None for v in (budget, iters_per_step, num_steps))
    if given != 2:
        raise ValueError("give exactly two of budget, iters_per_step and num_steps (got "
                         f"budget={budget}, iters_per_step={iters_per_step}, num_steps={num_steps})")
    if budget is None:
        steps, total = num_steps, num_steps * iters_per_step
    elif num_steps is None:
        steps = budget // (explicit + iters_per_step)
        if steps < 1:
            raise ValueError(f"budget {budget} is too small for one timestep of {explicit} explicit block passes "
                             f"+ {iters_per_step} iterations")
        total = steps * iters_per_step if allocation_name == "constant" else budget - steps * explicit
    else:
        steps = num_steps
        total = budget - steps * explicit
        if total < steps:
            raise ValueError(f"budget {budget} is too small for {steps} timesteps: each needs {explicit} explicit "
                             f"block passes + at least 1 iteration ({steps * (explicit + 1)} in all)")
    _check_steps(steps, num_train_timesteps)
    if allocation_name in ("constant", "adaptive"):
        weights = [1.0] * steps
    else:
        ramp = np.linspace(1.0, ratio, steps) if steps > 1 else np.ones(1)
        weights = list(ramp if allocation_name == "increasing" else ramp[::-1])
    iterations = _distribute(total, weights, prefer_late=allocation_name != "decreasing")
    if allocation_name == "adaptive" and not tol > 0:
        raise ValueError(f"tol must be > 0 for the adaptive allocation, got {tol!r}")
    return Schedule(spaced_timesteps(num_train_timesteps, steps), tuple(iterations), explicit, budget,
                    allocation_name, tol if allocation_name == "adaptive" else None)


def _check_steps(steps: int, num_train_timesteps: int) -> None:
    if steps > num_train_timesteps:
        raise ValueError(f"{steps} timesteps exceed the {num_train_timesteps} training timesteps")


def batches_for_rank(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """Sample-index ranges (batches) that process ``rank`` of ``world_size`` generates: the job is cut into
    batches of ``batch_size`` (the last one partial) and they are dealt round-robin, so every batch, hence every
    image, is the same whatever the number of processes."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    starts = range(0, num_samples, batch_size)
    return [range(s, min(s + batch_size, num_samples)) for i, s in enumerate(starts) if i % world_size == rank]


@dataclass
class SampleOutput:
    """What :func:`sample` returns.

    Attributes:
        samples: (B, C, H, W) final samples (latents for a latent model, [-1, 1] pixels for a pixel model).
        labels: (B,) class labels used.
        schedule: the :class:`Schedule` that was run.
        iterations: fixed-point iterations actually spent per timestep (adaptive runs spend less than allowed).
        residuals: (steps, B) last-step fixed-point residual ``Delta_t`` per timestep and sample (the change
            made by the last iteration, relative to the state's norm); ``None`` for explicit models.
        block_passes: block passes spent per image (the budget's unit).
        macs: multiply-accumulates actually computed (the whole batch, guidance included), if the model
            reports them.
    """

    samples: torch.Tensor
    labels: torch.Tensor
    schedule: Schedule
    iterations: list[int] = field(default_factory=list)
    residuals: torch.Tensor | None = None
    block_passes: int = 0
    macs: int | None = 0

    def diagnostics(self) -> dict[str, Any]:
        """JSON-able per-timestep record (timestep, iterations, mean residual) and totals."""
        res = self.residuals.mean(1).tolist() if self.residuals is not None else [None] * len(self.iterations)
        return {"block_passes": self.block_passes, "macs": self.macs, "allocation": self.schedule.allocation,
                "budget": self.schedule.budget,
                "steps": [{"timestep": t, "iterations": k, "residual": r}
                          for t, k, r in zip(self.schedule.timesteps, self.iterations, res)]}


def scheduler_from_diffusion(diffusion: Diffusion, learn_sigma: bool = True):
    """The diffusers ``DDPMScheduler`` holding the same schedule: learned-range variance (or fixed-small),
    v- or epsilon-prediction, zero terminal SNR, ``clip_sample=False``, linspace spacing. DDPM sampling steps with
    it, and a pipeline folder saves its config."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=diffusion.num_timesteps, beta_start=diffusion.beta_start,
                         beta_end=diffusion.beta_end, beta_schedule="linear",
                         variance_type="learned_range" if learn_sigma else "fixed_small",
                         prediction_type="v_prediction" if diffusion.prediction == "v" else "epsilon",
                         rescale_betas_zero_snr=diffusion.zero_terminal_snr, clip_sample=False,
                         timestep_spacing="linspace")


def _ddim_step(diffusion: Diffusion, pred: torch.Tensor, x: torch.Tensor, t: int, t_prev: int, eta: float,
               noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM step from ``t`` to ``t_prev`` (``-1``: to the data), with ``x0`` and ``eps`` written so that zero
    terminal SNR needs no division by zero under v-prediction."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    a = _gather(diffusion.alphas_cumprod, tt, x)
    if diffusion.prediction == "v":
        x0 = a.sqrt() * x - (1 - a).sqrt() * pred
        eps = (1 - a).sqrt() * x + a.sqrt() * pred
    else:
        eps = pred
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    if t_prev < 0:
        return x0
    a_prev = _gather(diffusion.alphas_cumprod, torch.full_like(tt, t_prev), x)
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
    out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
    if eta > 0:
        out = out + sigma * noise
    return out


def _sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_from(seed, 3, int(i))) for i in indices]


@torch.no_grad()
def sample(model: Any, class_labels: torch.Tensor | Sequence[int] | None, *, diffusion: Diffusion | None = None,
           schedule: Schedule | None = None, budget: int | None = None, iters_per_step: int | None = None,
           num_steps: int | None = None, allocation: str | Sequence[int] = "constant", ratio: float = 3.0,
           tol: float = 1e-3, sampler: str = "ddpm", eta: float = 0.0, guidance_scale: float = 1.0,
           guidance_channels: str = "all", reuse: bool = True, seed: int = 0,
           indices: Sequence[int] | None = None, num_samples: int | None = None, device: torch.device | None = None,
           progress: bool = False) -> SampleOutput:
    """Sample from a DiT, an FPDM or any module with their forward signature
    ``model(x_t, t, y, [num_steps=, z0=, rtol=, max_steps=]) -> ModelOutput``.

    Args:
        model: the denoiser (evaluated under ``torch.no_grad``; put it in eval mode yourself).
        class_labels: (B,) labels in ``[0, num_classes)``, or ``None`` for an unconditional model (then give
            ``num_samples``; the null class is used).
        diffusion: the schedule the model was trained with (default: ``Diffusion()``, the paper's).
        schedule: a :class:`Schedule` from :func:`plan`; otherwise ``budget``/``iters_per_step``/``num_steps``/
            ``allocation``/``ratio``/``tol`` are passed to :func:`plan`.
        sampler: ``"ddpm"`` (diffusers' ``DDPMScheduler``: learned-range variance when the model predicts it,
            ``clip_sample=False``) or ``"ddim"`` (our step, correct for any number of steps; ``eta`` adds noise).
        guidance_scale: classifier-free guidance (1: off); the null class is ``num_classes``.
        guidance_channels: ``"all"`` (guide the whole prediction) or ``"official_3"`` (the first 3 channels only,
            as DiT's and the official FPDM code do, to reproduce their numbers).
        reuse: start each timestep's fixed-point solve from the previous timestep's solution (per sample, and per
            guidance branch); off: from the pre-blocks' output. The state lives in this call only.
        seed, indices: sample ``i`` (``indices[i]``, default ``range(B)``) draws its noise from a generator
            seeded by ``(seed, indices[i])``.
        progress: show a tqdm bar over timesteps.

    Raises:
        ValueError: bad labels, guidance with an unconditional model, or a bad schedule (before any compute).
    """
    diffusion = diffusion or Diffusion()
    cfg = getattr(model, "config", None)
    fixed_point = _is_fixed_point_model(model)
    if schedule is None:
        schedule = plan(model, budget=budget, iters_per_step=iters_per_step, num_steps=num_steps,
                        allocation=allocation, ratio=ratio, tol=tol, num_train_timesteps=diffusion.num_timesteps)
    if schedule.iterations is not None and not fixed_point:
        raise ValueError("the schedule has fixed-point iterations but the model takes no num_steps")
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if guidance_channels not in ("all", "official_3"):
        raise ValueError(f"guidance_channels must be 'all' or 'official_3', got {guidance_channels!r}")
    for name, value, minimum in (("eta", eta, 0.0), ("guidance_scale", guidance_scale, None)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (minimum is None or value >= minimum)):
            raise ValueError(f"{name} must be a finite number{'' if minimum is None else ' >= 0'}, got {value!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if device is not None:
        device = torch.device(device)
        if device.type == "meta" or (device.type == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"device {str(device)!r} cannot run sampling"
                             + (" (CUDA is not available)" if device.type == "cuda" else ""))
    num_classes = getattr(cfg, "num_classes", None)
    if device is None:
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    if class_labels is None:
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise ValueError("without class_labels, give num_samples >= 1")
        if num_classes is None:
            raise ValueError("class_labels=None needs a model with config.num_classes (its null class)")
        labels = torch.full((num_samples,), num_classes, dtype=torch.long)
    else:
        raw = torch.as_tensor(class_labels)
        if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
            raise ValueError(f"class_labels must be integer class indices, got {raw.dtype} values")
        labels = raw.to(torch.long).flatten()
        if labels.numel() == 0:
            raise ValueError("class_labels is empty")
        if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class_labels must be in [0, {num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    if guidance_scale != 1.0 and (class_labels is None or num_classes is None or num_classes < 2):
        raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional model (config.num_classes >= 2 "
                         f"with a trained null class) and class_labels")
    batch = labels.shape[0]
    indices = list(range(batch)) if indices is None else list(indices)
    if len(indices) != batch:
        raise ValueError(f"indices has {len(indices)} entries for {batch} samples")
    channels, size = int(cfg.in_channels), int(cfg.input_size)
    learned_sigma = bool(getattr(cfg, "learn_sigma", False))

    gens = _sample_generators(seed, indices)
    x = torch.stack([torch.randn(channels, size, size, generator=g) for g in gens]).to(device)
    labels = labels.to(device)
    guided = guidance_scale != 1.0
    y_in = torch.cat([labels, torch.full_like(labels, num_classes)]) if guided else labels
    ddpm = scheduler_from_diffusion(diffusion, learned_sigma) if sampler == "ddpm" else None
    if ddpm is not None:
        ddpm.set_timesteps(timesteps=list(schedule.timesteps), device=device)

    from tqdm.auto import tqdm

    z_state, carry = None, 0
    spent_iterations: list[int] = []
    residuals: list[torch.Tensor] = []
    block_passes, macs = 0, 0
    steps = list(schedule.timesteps)
    for i in tqdm(range(len(steps)), desc="sample", disable=not progress, leave=False):
        t = steps[i]
        x_in = torch.cat([x, x]) if guided else x
        t_in = torch.full((x_in.shape[0],), t, device=device, dtype=torch.long)
        kwargs: dict[str, Any] = {}
        if fixed_point:
            if reuse and z_state is not None:
                kwargs["z0"] = z_state
            allowance = schedule.iterations[i]
            if schedule.allocation == "adaptive":
                allowance += carry
                kwargs.update(rtol=schedule.tol, atol=0.0, max_steps=allowance)
            else:
                kwargs["num_steps"] = allowance
        out = model(x_in, t_in, y_in, **kwargs)
        pred = out.out
        if guided:
            cond, uncond = pred.chunk(2)
            k = channels if guidance_channels == "all" else min(3, channels)
            pred = torch.cat([uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
        cost = getattr(out, "cost", None)
        if cost is not None:
            block_passes += int(cost.block_passes)
            macs = None if macs is None or cost.macs is None else macs + int(cost.macs)
        else:
            macs = None
        if fixed_point:
            spent = int(cost.block_passes) - schedule.explicit_passes if cost is not None else kwargs.get(
                "num_steps", 0)
            spent_iterations.append(spent)
            if schedule.allocation == "adaptive":
                carry = allowance - spent
            z_state = out.z
            if out.residual is not None and out.z is not None:
                rel = out.residual.float() / out.z.float().flatten(1).norm(dim=1).clamp_min(1e-12)
                residuals.append(rel[:batch].cpu())
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        if sampler == "ddpm":
            if not learned_sigma:
                pred = pred[:, :channels]
            x = ddpm.step(pred, t, x, generator=gens).prev_sample
        else:
            noise = None
            if eta > 0 and t_prev >= 0:
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(device, x.dtype)
            x = _ddim_step(diffusion, pred[:, :channels].to(x.dtype), x, t, t_prev, eta, noise)
    if not fixed_point:
        spent_iterations = [0] * len(steps)
    return SampleOutput(samples=x, labels=labels, schedule=schedule, iterations=spent_iterations,
                        residuals=torch.stack(residuals) if residuals else None, block_passes=block_passes,
                        macs=macs)


def plot_residuals(outputs: dict[str, SampleOutput], path: str) -> None:
    """Per-timestep last-step residual ``Delta_t`` (mean over samples) for several runs, e.g. with and without
    reuse (paper Fig. 6b/c), and the iterations each timestep spent; saved with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, out in outputs.items():
        if out.residuals is None:
            continue
        ts = list(out.schedule.timesteps)
        ax1.plot(ts, out.residuals.mean(1).numpy(), marker=".", label=name)
        ax2.plot(ts, out.iterations, marker=".", label=name)
    ax1.set(xlabel="timestep t", ylabel=r"$\Delta_t$ (relative)", yscale="log", title="last-step residual")
    ax2.set(xlabel="timestep t", ylabel="iterations", title="iterations per timestep")
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

