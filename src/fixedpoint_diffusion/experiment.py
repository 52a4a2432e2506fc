"""Small-scale experiments on the embedded Shapes dataset: the one pipeline behind ``fpdm demo``,
``benchmarks/quality.py`` and ``examples/budget_sweep.py``.

* **Training for equal compute.** :func:`train_equal_compute` gives every config the same number of training
  multiply-accumulates (:meth:`FPDM.training_macs <fixedpoint_diffusion.FPDM.training_macs>`), so the same seed
  trains the same steps and gives the same numbers on any machine. :func:`train_for` (equal *measured* wall time,
  from an interleaved :func:`calibrate`) remains for comparisons in seconds, which no rerun reproduces exactly.
* **The scoring protocol, defined once.** :class:`Scorer` holds the small Shapes classifier (standing in for
  Inception) and the features of held-out real images (seed :data:`HELD_OUT_SEED`, never trained on);
  :meth:`Scorer.score` samples a model under one :class:`Setting` (classes balanced, DDIM, the same noise for every
  model) and returns Fréchet distance, KID, class accuracy, compute spent and per-timestep residuals, with the
  per-sample features kept for :func:`bootstrap` intervals and :func:`paired_difference` between two settings
  sampled from the same seeds.
* :func:`score_settings` scores a list of settings into a results folder, skipping what a previous run already
  wrote, so an interrupted job resumes.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fixedpoint.checks import check_int, check_positive

from .config import Config
from .errors import InvalidValueError
from .evaluation import HELD_OUT_SEED
from .models import create_model
from .runs import latest_checkpoint
from .scoring import Scorer, Setting, bootstrap, paired_difference, score_settings
from .training import Trainer, TrainState, TrainSummary, fetch_batch

__all__ = ["HELD_OUT_SEED", "MICRO_MODEL", "Scorer", "Setting", "bootstrap", "calibrate", "paired_difference",
           "score_settings", "train_equal_compute", "train_for", "training_steps"]

#: The toy model size of ``--quick``/``--tiny`` runs and of the test suite: 8x8 images, width 32.
MICRO_MODEL = {"input_size": 8, "in_channels": 3, "num_classes": 8, "hidden_size": 32, "num_heads": 2}


def calibrate(configs: Mapping[str, Config], *, steps: int = 6, rounds: int = 3,
              device: torch.device | str | None = None) -> dict[str, float]:
    """Seconds per training step of each config, on throwaway copies (nothing is written).

    Each round times ``steps`` steps of every config in turn (after one warm-up step); a config's figure is its
    fastest round, the one least disturbed by other work on the machine. The steps use the configs' own data,
    seeds and draws, so FPDM's stochastic-JFB step counts vary across them as in training.
    """
    if not configs:
        raise InvalidValueError("configs is empty")
    trainers = {}
    for name, config in configs.items():
        config = copy.deepcopy(config)
        config.train.out_dir = str(Path(tempfile.gettempdir()) / "fpdm-calibrate-never-written")
        trainer = Trainer(config, device=device, progress=False)
        trainer.setup()
        trainers[name] = trainer
    best = {name: float("inf") for name in configs}
    G = {name: cfg.train.global_batch_size for name, cfg in configs.items()}
    for r in range(rounds + 1):
        for name, trainer in trainers.items():
            n = 1 if r == 0 else steps  # round 0 warms up every config
            batches = [fetch_batch(trainer.dataset, range(i * G[name], (i + 1) * G[name])) for i in range(n)]
            sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            for i, (x, y) in enumerate(batches):
                trainer.train_step(x, y, r * steps + i)
            sync()
            if r:
                best[name] = min(best[name], (time.perf_counter() - start) / n)
    return best


@dataclass
class Plan:
    """Steps per config for one wall-time allowance, and the measurement they come from."""

    minutes: float
    seconds_per_step: dict[str, float]
    steps: dict[str, int] = field(default_factory=dict)


def train_for(configs: Mapping[str, Config], minutes: float, *, device: torch.device | str | None = None,
              plan_file: str | Path | None = None, progress: bool = True,
              ) -> tuple[Plan, dict[str, TrainSummary]]:
    """Train every config for the same measured wall time: ``minutes * 60 / seconds_per_step`` steps each.

    Each config trains in its own ``train.out_dir``; a run that already has checkpoints is resumed, so calling
    this again after an interruption finishes the job. The calibration is stored in ``plan_file`` (JSON) and
    reused when the allowance and configs are unchanged, so a resumed job trains the same step counts.

    Returns:
        The :class:`Plan` and each config's :class:`~fixedpoint_diffusion.training.TrainSummary`.

    Raises:
        KeyboardInterrupt: a run was stopped by Ctrl-C or SIGTERM (after writing its checkpoint); the configs
            after it are not started.
    """
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise InvalidValueError(f"minutes must be a number > 0, got {minutes!r}")
    # Where the runs live is not part of what they train: a moved or copied folder keeps its plan.
    signature = {name: _without_out_dir(cfg.to_dict()) for name, cfg in configs.items()}
    plan = None
    if plan_file is not None and Path(plan_file).is_file():
        stored = json.loads(Path(plan_file).read_text())
        if stored.get("configs") == json.loads(json.dumps(signature)) and stored.get("minutes") == minutes:
            plan = Plan(minutes, stored["seconds_per_step"], stored["steps"])
    if plan is None:
        plan = Plan(minutes, calibrate(configs, device=device))
        plan.steps = {name: max(1, round(minutes * 60 / s)) for name, s in plan.seconds_per_step.items()}
        if plan_file is not None:
            Path(plan_file).parent.mkdir(parents=True, exist_ok=True)
            Path(plan_file).write_text(json.dumps({"minutes": minutes, "seconds_per_step": plan.seconds_per_step,
                                                   "steps": plan.steps, "configs": signature}, indent=1))
    summaries = {}
    for name, config in configs.items():
        config = copy.deepcopy(config)
        config.train.max_steps = plan.steps[name]
        config.train.checkpoint_every = min(config.train.checkpoint_every, max(1, plan.steps[name] // 4))
        resume = latest_checkpoint(config.train.out_dir) is not None
        summaries[name] = Trainer(config, resume=resume, device=device, progress=progress).run()
        if summaries[name].interrupted:  # Ctrl-C or SIGTERM: the run saved its checkpoint; stop the whole job
            raise KeyboardInterrupt(f"training {name!r} was interrupted at step {summaries[name].step}; "
                                    "run again to resume")
    return plan, summaries


def _without_out_dir(raw: dict[str, Any]) -> dict[str, Any]:
    return {**raw, "train": {k: v for k, v in raw["train"].items() if k != "out_dir"}}


def _training_macs_per_step(config: Config) -> float:
    model_args = dict(config.model)
    name = model_args.pop("name")
    with torch.device("meta"):  # only the config matters: nothing is allocated
        model = create_model(name, **model_args)
    return model.training_macs(config.train.global_batch_size)


def training_steps(configs: Mapping[str, Config], macs: float) -> dict[str, int]:
    """Optimizer steps that spend ``macs`` training multiply-accumulates in each config (at least one), from the
    models' expected cost per step (:meth:`FPDM.training_macs <fixedpoint_diffusion.FPDM.training_macs>`)."""
    check_positive(macs, "macs", error=InvalidValueError)
    return {name: max(1, round(macs / _training_macs_per_step(cfg))) for name, cfg in configs.items()}


def train_equal_compute(configs: Mapping[str, Config], macs: float, *, device: torch.device | str | None = None,
                        progress: bool = True, hooks: Mapping[str, Any] | None = None,
                        checkpoints: int = 4) -> dict[str, TrainSummary]:
    """Train every config for the same training compute: :func:`training_steps` steps each.

    Each config trains in its own ``train.out_dir`` with ``train.max_steps`` set to its step count (a cosine
    schedule decays on that horizon) and at least ``checkpoints`` checkpoints; a run that already has checkpoints
    is resumed, so calling this again after an interruption finishes the job and trains the same steps.

    Args:
        hooks: per config name, a list of :class:`~fixedpoint_diffusion.training.Trainer` hooks (called with the
            trainer's :class:`~fixedpoint_diffusion.training.TrainState` and the trainer itself bound first).

    Raises:
        KeyboardInterrupt: a run was stopped by Ctrl-C or SIGTERM (after writing its checkpoint); the configs
            after it are not started.
    """
    check_int(checkpoints, "checkpoints", 1, error=InvalidValueError)
    steps = training_steps(configs, macs)
    summaries = {}
    for name, config in configs.items():
        config = copy.deepcopy(config)
        config.train.max_steps = steps[name]
        config.train.checkpoint_every = min(config.train.checkpoint_every, max(1, steps[name] // checkpoints))
        resume = latest_checkpoint(config.train.out_dir) is not None
        trainer = Trainer(config, resume=resume, device=device, progress=progress)
        for hook in (hooks or {}).get(name, ()):
            trainer.hooks.append(_bind(hook, trainer))
        summaries[name] = trainer.run()
        if summaries[name].interrupted:
            raise KeyboardInterrupt(f"training {name!r} was interrupted at step {summaries[name].step}; "
                                    "run again to resume")
    return summaries


def _bind(hook: Any, trainer: Trainer) -> Any:
    def call(state: TrainState) -> None:
        hook(trainer, state)

    return call


