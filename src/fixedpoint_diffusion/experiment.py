"""Small-scale experiments: train models for equal time, then measure sample quality against compute.

The building blocks of ``fpdm demo`` and ``benchmarks/quality.py``, usable on their own:

* :func:`calibrate` measures each config's seconds per training step, interleaved so that a busy spell of the
  machine slows every config alike; :func:`train_for` turns one wall-time allowance into a step count per
  config from that measurement and trains (or resumes) each run. Equal *measured* time rather than a stopwatch
  keeps the comparison fair when other work shares the machine, and makes a rerun train the same steps.
* :class:`Scorer` holds the small Shapes classifier and the features of held-out real images, and
  :meth:`Scorer.score` samples a model under a budget and returns Fréchet distance, KID, class accuracy, the
  compute spent and the per-timestep fixed-point residuals.
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

import numpy as np
import torch

from .config import Config
from .evaluation import ShapesClassifier, classifier_features, evaluate_samples, train_classifier
from .pipeline import to_uint8
from .sampling import sample
from .train import Trainer, TrainSummary, latest_checkpoint

__all__ = ["Scorer", "calibrate", "train_for"]


def calibrate(configs: Mapping[str, Config], *, steps: int = 6, rounds: int = 3,
              device: torch.device | str | None = None) -> dict[str, float]:
    """Seconds per training step of each config, on throwaway copies (nothing is written).

    Each round times ``steps`` steps of every config in turn (after one warm-up step); a config's figure is its
    fastest round, the one least disturbed by other work on the machine. The steps use the configs' own data,
    seeds and draws, so FPDM's stochastic-JFB step counts vary across them as in training.
    """
    if not configs:
        raise ValueError("configs is empty")
    trainers = {}
    for name, config in configs.items():
        config = copy.deepcopy(config)
        config.train.out_dir = str(Path(tempfile.gettempdir()) / "fpdm-calibrate-never-written")
        trainer = Trainer(config, device=device, progress=False)
        trainer._setup()
        trainers[name] = trainer
    best = {name: float("inf") for name in configs}
    G = {name: cfg.train.global_batch_size for name, cfg in configs.items()}
    for r in range(rounds + 1):
        for name, trainer in trainers.items():
            n = 1 if r == 0 else steps  # round 0 warms up every config
            batches = [_batch(trainer.dataset, range(i * G[name], (i + 1) * G[name])) for i in range(n)]
            sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            for i, (x, y) in enumerate(batches):
                trainer._train_step(x, y, r * steps + i)
            sync()
            if r:
                best[name] = min(best[name], (time.perf_counter() - start) / n)
    return best


def _batch(dataset: Any, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    indices = [i % len(dataset) for i in indices]
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items])


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
        The :class:`Plan` and each config's :class:`~fixedpoint_diffusion.train.TrainSummary`.

    Raises:
        KeyboardInterrupt: a run was stopped by Ctrl-C or SIGTERM (after writing its checkpoint); the configs
            after it are not started.
    """
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes must be a number > 0, got {minutes!r}")
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


class Scorer:
    """Sample quality on the Shapes dataset, with a small classifier standing in for Inception.

    Args:
        classifier: a trained :class:`~fixedpoint_diffusion.evaluation.ShapesClassifier`.
        reference: its features of real held-out images, (M, D).
        kid_subsets: subsets averaged by KID.
    """

    def __init__(self, classifier: ShapesClassifier, reference: np.ndarray, kid_subsets: int = 20) -> None:
        self.classifier, self.reference, self.kid_subsets = classifier, reference, kid_subsets

    @classmethod
    def build(cls, image_size: int, folder: str | Path, *, num_reference: int = 2000, seed: int = 0,
              classifier_steps: int = 400, device: torch.device | str | None = None,
              progress: bool = False) -> Scorer:
        """Train the classifier and compute reference features, or read both from ``folder`` if there."""
        from .data import Shapes

        folder = Path(folder)
        path = folder / "classifier.pt"
        if path.is_file():
            classifier = ShapesClassifier.load(path, device)
        else:
            classifier, accuracy = train_classifier(image_size, steps=classifier_steps, seed=seed, device=device,
                                                    progress=progress)
            classifier.save(path, accuracy=accuracy)
            classifier.info = {"accuracy": accuracy}
        real = Shapes(num_reference, image_size, seed=3_000_017 + seed)  # neither training nor classifier data
        reference, _ = classifier_features(classifier, to_uint8(real.images))
        return cls(classifier, reference)

    def score(self, model: Any, diffusion: Any, *, num_samples: int = 500, batch_size: int = 500, seed: int = 0,
              device: torch.device | str | None = None, keep: int = 0, **sampling: Any) -> dict[str, Any]:
        """Sample ``num_samples`` images (classes balanced) and score them.

        Args:
            model: a trained DiT or FPDM (in eval mode).
            diffusion: the schedule it was trained with.
            keep: also return the first ``keep`` images (uint8 NHWC) under ``"images"``.
            **sampling: :func:`~fixedpoint_diffusion.sampling.sample` arguments (``budget``, ``iters_per_step``,
                ``sampler``, ``reuse``, ...).

        Returns:
            ``fd``, ``kid``, ``kid_std``, ``accuracy`` (see :func:`evaluate_samples`), ``block_passes`` per image,
            ``num_steps``, ``iters_per_step`` (FPDM), ``residual`` (mean relative Δ_t per timestep), ``seconds``.
        """
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 2 - (name == "batch_size")):
                raise ValueError(f"{name} must be an int >= {2 - (name == 'batch_size')}, got {value!r}")
        num_classes = model.config.num_classes
        labels = torch.arange(num_samples) % num_classes
        images, residuals, out = [], [], None
        start = time.perf_counter()
        for lo in range(0, num_samples, batch_size):
            idx = range(lo, min(lo + batch_size, num_samples))
            out = sample(model, labels[idx.start:idx.stop], diffusion=diffusion, seed=seed, indices=idx,
                         device=device, **sampling)
            images.append(to_uint8(out.samples))
            if out.residuals is not None:
                residuals.append(out.residuals.float().cpu())
        seconds = time.perf_counter() - start
        images = np.concatenate(images)
        result = evaluate_samples(images, labels.numpy(), self.classifier, self.reference,
                                  kid_subsets=self.kid_subsets, kid_subset_size=min(1000, num_samples), seed=seed)
        schedule = out.schedule
        result.update(block_passes=schedule.block_passes, num_steps=schedule.num_steps,
                      iterations=list(schedule.iterations) if schedule.iterations is not None else None,
                      residual=torch.cat(residuals, 1).mean(1).tolist() if residuals else None,
                      seconds=seconds)
        if keep:
            result["images"] = images[:keep]
        return result
