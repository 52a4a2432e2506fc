"""Budgeted sampling (paper Sec. 3.3): timestep smoothing, compute reallocation across timesteps, solution reuse,
DDPM and DDIM, classifier-free guidance.

The budget is counted in transformer-block forward passes per image, the paper's unit (footnote 4): a timestep of
FPDM costs ``pre_depth + iterations + post_depth`` passes, one of DiT ``depth``. :func:`~.budget.plan` turns a
budget into a :class:`~.budget.Schedule` (which timesteps, how many fixed-point iterations at each) without
touching the model's weights; :func:`sample` runs it on any :class:`Denoiser`. Guidance doubles the batch, not
the chain, so it does not change the block-pass count; the multiply-accumulates reported (``macs``) are what was
really computed, guidance included.

Determinism: every sample ``i`` draws its initial noise and its DDPM noise from its own generator seeded by
``(seed, i)`` (or, with ``noise="counter"``, from a counter-based generator keyed by ``(seed, i, step)``), so a
sample does not depend on which other samples share its batch; with the same batches (see
:func:`batches_for_rank`), sharding a job over processes gives bit-identical images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ._runtime import seed_from

# The budget allocation lives in .budget; these names stay importable from here as before.
from .budget import (
    ALLOCATIONS,
    DEFAULT_ITERATIONS_PER_TIMESTEP,
    DEFAULT_NUM_TIMESTEPS,
    Schedule,
    fill_schedule_defaults,
    is_fixed_point_model,
    plan,
    spaced_timesteps,
)
from .diffusion import Diffusion, gather_at
from .errors import InvalidValueError
from .models import Cost
from .noise import counter_normal

__all__ = ["ALLOCATIONS", "DEFAULT_ITERATIONS_PER_TIMESTEP", "DEFAULT_NUM_TIMESTEPS", "Denoiser", "DenoiserOutput",
           "SampleOutput", "Schedule", "batches_for_rank", "fill_schedule_defaults", "plan", "sample",
           "spaced_timesteps"]


class DenoiserOutput(Protocol):
    """What a :class:`Denoiser` call returns (:class:`~fixedpoint_diffusion.ModelOutput` is one).

    Attributes:
        out: (B, C_out, H, W) prediction; the first ``in_channels`` channels are the target (v or epsilon), the
            rest (with ``learn_sigma``) the variance interpolation values.
        cost: what the call spent (``block_passes``, ``macs``), or ``None`` if unknown (then no MACs are
            reported and a fixed-point model's iterations are taken as asked).
        z: fixed-point models: the state (B, T, D) that starts the next timestep's solve (reuse); ``None``
            turns reuse off.
        residual: fixed-point models: (B,) last-step residual, or ``None``.
    """

    out: torch.Tensor
    cost: Cost | None
    z: torch.Tensor | None
    residual: torch.Tensor | None


@runtime_checkable
class Denoiser(Protocol):
    """The model contract of :func:`sample` and :func:`~.budget.plan`, met by :class:`~fixedpoint_diffusion.DiT`
    and :class:`~fixedpoint_diffusion.FPDM`.

    Called as ``model(x_t, t, y, **kwargs)`` with ``x_t`` (B, C, H, W), integer timesteps ``t`` (B,) and labels
    ``y`` (B,) (``num_classes`` is the null class for guidance). A fixed-point model also gets ``z0=`` (reuse)
    and either ``num_iterations=`` (exactly that many iterations) or ``rtol=``, ``atol=``, ``max_steps=`` (the
    adaptive allocation); an explicit model gets no keywords.

    Attributes:
        config: ``in_channels``, ``input_size``, ``num_classes`` and optionally ``learn_sigma``.
        is_fixed_point: whether the model takes the fixed-point keywords above and returns ``z``/``residual``.
        explicit_passes: block passes per timestep outside any fixed point (DiT: ``depth``; FPDM:
            ``pre_depth + post_depth``), or ``None`` if unknown (budgets are then refused).
    """

    config: Any
    is_fixed_point: bool
    explicit_passes: int | None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> DenoiserOutput: ...


def batches_for_rank(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """Sample-index ranges (batches) that process ``rank`` of ``world_size`` generates: the job is cut into
    batches of ``batch_size`` (the last one partial) and they are dealt round-robin, so every batch, hence every
    image, is the same whatever the number of processes."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise InvalidValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
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
    a = gather_at(diffusion.alphas_cumprod, tt, x)
    if diffusion.prediction == "v":
        x0 = a.sqrt() * x - (1 - a).sqrt() * pred
        eps = (1 - a).sqrt() * x + a.sqrt() * pred
    else:
        eps = pred
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    if t_prev < 0:
        return x0
    a_prev = gather_at(diffusion.alphas_cumprod, torch.full_like(tt, t_prev), x)
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).clamp_min(0).sqrt()
    out = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp_min(0).sqrt() * eps
    if eta > 0:
        out = out + sigma * noise
    return out


def _ddpm_step(ddpm: Any, acp: torch.Tensor, pred: torch.Tensor, x: torch.Tensor, t: int,
               noise: torch.Tensor) -> torch.Tensor:
    """diffusers' ``DDPMScheduler.step`` (the configurations :func:`scheduler_from_diffusion` makes:
    learned-range or fixed-small variance, v or epsilon prediction, no clipping) with the noise given instead of
    drawn from generators, on the scheduler's tables ``acp`` (its ``alphas_cumprod``, moved to the device once by
    the caller); ``tests/test_sampling.py`` checks it against diffusers' step with the same noise."""
    channels = x.shape[1]
    learned = pred.shape[1] == 2 * channels and ddpm.config.variance_type == "learned_range"
    out = pred[:, :channels]
    prev_t = ddpm.previous_timestep(t)
    a_t = acp[t]
    a_prev = acp[prev_t] if prev_t >= 0 else torch.ones((), device=x.device)
    alpha_t, beta_t = a_t / a_prev, 1 - a_t / a_prev
    if ddpm.config.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
    else:
        x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
    mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + (alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)) * x
    if t <= 0:
        return mean
    variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
    if learned:
        frac = (pred[:, channels:] + 1) / 2
        return mean + torch.exp(0.5 * (frac * beta_t.log() + (1 - frac) * variance.log())) * noise
    return mean + variance.sqrt() * noise


def check_sampling_options(*, sampler: str = "ddpm", eta: float = 0.0, guidance_scale: float = 1.0,
                           guidance_channels: str = "all", seed: int = 0, noise: str = "generators") -> None:
    """Refuse (naming the argument) a sampling option :func:`sample` cannot use; it runs this before any compute,
    and so can a caller that has something to lose first (:func:`~fixedpoint_diffusion.sample_to_folder` before it
    clears a folder)."""
    if sampler not in ("ddpm", "ddim"):
        raise InvalidValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if guidance_channels not in ("all", "official_3"):
        raise InvalidValueError(f"guidance_channels must be 'all' or 'official_3', got {guidance_channels!r}")
    for name, value, minimum in (("eta", eta, 0.0), ("guidance_scale", guidance_scale, None)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (minimum is None or value >= minimum)):
            raise InvalidValueError(f"{name} must be a finite number{'' if minimum is None else ' >= 0'}, "
                                    f"got {value!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise InvalidValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if noise not in ("generators", "counter"):
        raise InvalidValueError(f"noise must be 'generators' or 'counter', got {noise!r}")


def _sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed_from(seed, 3, int(i))) for i in indices]


@torch.no_grad()
def sample(model: Denoiser, class_labels: torch.Tensor | Sequence[int] | None, *,
           diffusion: Diffusion | None = None, schedule: Schedule | None = None, budget: int | None = None,
           iterations_per_timestep: int | None = None, num_timesteps: int | None = None,
           allocation: str | Sequence[int] = "constant", ratio: float = 3.0,
           tol: float = 1e-3, sampler: str = "ddpm", eta: float = 0.0, guidance_scale: float = 1.0,
           guidance_channels: str = "all", reuse: bool = True, seed: int = 0,
           indices: Sequence[int] | None = None, num_samples: int | None = None, device: torch.device | None = None,
           progress: bool = False, compile: bool | None = None, noise: str = "generators") -> SampleOutput:
    """Sample from a DiT, an FPDM or any module with their forward signature
    ``model(x_t, t, y, [num_iterations=, z0=, rtol=, max_steps=]) -> ModelOutput`` (the :class:`Denoiser`
    contract).

    Args:
        model: the denoiser (evaluated under ``torch.no_grad``; put it in eval mode yourself).
        class_labels: (B,) labels in ``[0, num_classes)``, or ``None`` for an unconditional model (then give
            ``num_samples``; the null class is used).
        diffusion: the schedule the model was trained with (default: ``Diffusion()``, the paper's).
        schedule: a :class:`Schedule` from :func:`plan`; otherwise ``budget``/``iterations_per_timestep``/
            ``num_timesteps``/``allocation``/``ratio``/``tol`` are passed to :func:`plan`.
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
        noise: where sample ``i``'s noise comes from, a function of ``(seed, indices[i])`` either way:
            ``"generators"`` (one CPU generator per sample, copied to the device each step: the default, whose
            samples earlier versions reproduce) or ``"counter"`` (:func:`~fixedpoint_diffusion.noise.counter_normal`,
            drawn for the whole batch on the device in one call; other numbers, the same distribution).
        compile: compile the model's transformer blocks in place first (``compile_blocks``: once per model; the
            fixed-point loop stays eager; samples equal eager ones to float tolerance). ``None``: on CUDA only,
            where compiled blocks measured 1.3x (FPDM-XL/2) to 1.7x (DiT-XL/2) the eager images/s on an H200; the
            first call pays the compilation. ``False`` keeps the model as it is.

    Raises:
        ValueError: bad labels, guidance with an unconditional model, or a bad schedule (before any compute).
    """
    diffusion = diffusion or Diffusion()
    cfg = getattr(model, "config", None)
    fixed_point = is_fixed_point_model(model)
    if schedule is None:
        schedule = plan(model, budget=budget, iterations_per_timestep=iterations_per_timestep,
                        num_timesteps=num_timesteps, allocation=allocation, ratio=ratio, tol=tol,
                        num_train_timesteps=diffusion.num_timesteps)
    if schedule.iterations is not None and not fixed_point:
        raise InvalidValueError("the schedule has fixed-point iterations but the model is not a fixed-point model "
                                "(is_fixed_point)")
    check_sampling_options(sampler=sampler, eta=eta, guidance_scale=guidance_scale,
                           guidance_channels=guidance_channels, seed=seed, noise=noise)
    if device is not None:
        device = torch.device(device)
        if device.type == "meta" or (device.type == "cuda" and not torch.cuda.is_available()):
            raise InvalidValueError(f"device {str(device)!r} cannot run sampling"
                                    + (" (CUDA is not available)" if device.type == "cuda" else ""))
    num_classes = getattr(cfg, "num_classes", None)
    if device is None:
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
    if class_labels is None:
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise InvalidValueError("without class_labels, give num_samples >= 1")
        if num_classes is None:
            raise InvalidValueError("class_labels=None needs a model with config.num_classes (its null class)")
        labels = torch.full((num_samples,), num_classes, dtype=torch.long)
    else:
        raw = torch.as_tensor(class_labels)
        if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
            raise InvalidValueError(f"class_labels must be integer class indices, got {raw.dtype} values")
        labels = raw.to(torch.long).flatten()
        if labels.numel() == 0:
            raise InvalidValueError("class_labels is empty")
        if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
            raise InvalidValueError(f"class_labels must be in [0, {num_classes}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
    if guidance_scale != 1.0 and (class_labels is None or num_classes is None or num_classes < 2):
        raise InvalidValueError(f"guidance_scale={guidance_scale} needs a class-conditional model "
                                f"(config.num_classes >= 2 "
                                f"with a trained null class) and class_labels")
    if compile is None:
        compile = device.type == "cuda"
    elif not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool or None, got {type(compile).__name__}")
    if compile and hasattr(model, "compile_blocks"):
        model.compile_blocks()
    batch = labels.shape[0]
    indices = list(range(batch)) if indices is None else list(indices)
    if len(indices) != batch:
        raise InvalidValueError(f"indices has {len(indices)} entries for {batch} samples")
    channels, size = int(cfg.in_channels), int(cfg.input_size)
    learned_sigma = bool(getattr(cfg, "learn_sigma", False))

    gens = _sample_generators(seed, indices) if noise == "generators" else None
    counter_indices = torch.tensor(indices, dtype=torch.long)

    def draw(step: int) -> torch.Tensor:
        """Step ``step``'s noise for the batch (step 0: the initial x_T)."""
        if gens is not None:
            return torch.stack([torch.randn(channels, size, size, generator=g) for g in gens]).to(device)
        return counter_normal(seed, counter_indices, step, (channels, size, size), device=device)

    x = draw(0)
    labels = labels.to(device)
    guided = guidance_scale != 1.0
    y_in = torch.cat([labels, torch.full_like(labels, num_classes)]) if guided else labels
    ddpm = scheduler_from_diffusion(diffusion, learned_sigma) if sampler == "ddpm" else None
    if ddpm is not None:
        ddpm.set_timesteps(timesteps=list(schedule.timesteps), device=device)
        ddpm_acp = ddpm.alphas_cumprod.to(device)  # the counter path's own step reads the tables on the device

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
                kwargs["num_iterations"] = allowance
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
                "num_iterations", 0)
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
            if gens is not None:
                x = ddpm.step(pred, t, x, generator=gens).prev_sample
            else:
                x = _ddpm_step(ddpm, ddpm_acp, pred, x, t, draw(i + 1).to(x.dtype))
        else:
            step_noise = None
            if eta > 0 and t_prev >= 0:
                step_noise = draw(i + 1).to(x.dtype)
            x = _ddim_step(diffusion, pred[:, :channels].to(x.dtype), x, t, t_prev, eta, step_noise)
    if not fixed_point:
        spent_iterations = [0] * len(steps)
    return SampleOutput(samples=x, labels=labels, schedule=schedule, iterations=spent_iterations,
                        residuals=torch.stack(residuals) if residuals else None, block_passes=block_passes,
                        macs=macs)


def plot_residuals(outputs: dict[str, SampleOutput], path: str) -> None:
    """Per-timestep last-step residual ``Delta_t`` (mean over samples) for several runs, e.g. with and without
    reuse (paper Fig. 6b/c), and the iterations each timestep spent; saved with matplotlib. When every run spent
    the same iterations at every timestep, that number goes into the title instead of a flat second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {name: out for name, out in outputs.items() if out.residuals is not None}
    counts = {k for out in runs.values() for k in out.iterations}
    constant = len(counts) <= 1
    fig, axes = plt.subplots(1, 1 if constant else 2, figsize=(5.5 if constant else 10, 3.6), squeeze=False)
    ax1 = axes[0, 0]
    for name, out in runs.items():
        ts = list(out.schedule.timesteps)
        ax1.plot(ts, out.residuals.mean(1).numpy(), marker=".", label=name)
        if not constant:
            axes[0, 1].plot(ts, out.iterations, marker=".", label=name)
    title = "last-step residual" + (f" ({counts.pop()} iterations per timestep)" if len(counts) == 1 else "")
    ax1.set(xlabel="timestep t", ylabel=r"$\Delta_t$ (relative)", yscale="log", title=title)
    if not constant:
        ax2 = axes[0, 1]
        ax2.set(xlabel="timestep t", ylabel="iterations", title="iterations per timestep",
                ylim=(0, max(max(out.iterations) for out in runs.values()) + 1))
        ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat:
        ax.invert_xaxis()
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
