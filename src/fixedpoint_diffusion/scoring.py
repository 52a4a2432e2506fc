"""The scoring protocol of the small-scale experiments, defined once: a :class:`Setting` (budget, iterations,
reuse, allocation, guidance), a :class:`Scorer` that samples a model under it and scores the images with the small
Shapes classifier against held-out real images, :func:`bootstrap` intervals, :func:`paired_difference` between two
settings sampled from the same seeds, and :func:`score_settings`, which scores a list of settings into a resumable
results folder. See :mod:`fixedpoint_diffusion.experiment` for the whole pipeline."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._files import write_atomic, write_json_atomic
from .budget import plan
from .classifier import ShapesClassifier, classifier_features, train_classifier
from .data import Shapes
from .errors import InvalidValueError
from .evaluation import HELD_OUT_SEED, evaluate_samples, frechet_distance
from .pipeline import to_uint8
from .sampling import sample

__all__ = ["Scorer", "Setting", "bootstrap", "paired_difference", "score_settings"]


@dataclass(frozen=True)
class Setting:
    """One sampling configuration of a model: a budget in block passes per image, FPDM's iterations per timestep
    ``k`` (timestep smoothing) and how they are spread over timesteps (reallocation), solution reuse, and
    classifier-free guidance.

    Attributes:
        model: a name of the models being compared (e.g. ``"FPDM"``, ``"DiT"``).
        budget: block passes per image (the paper's footnote 4).
        iters_per_step: FPDM's average fixed-point iterations per timestep; ``None`` for an explicit model. (Named
            as in the result files earlier runs wrote, which the demo resumes from; ``sample`` calls it
            ``iterations_per_timestep``. Rows likewise keep ``num_steps`` for the number of timesteps.)
        reuse: start each solve from the previous timestep's solution.
        allocation: ``"constant"``, ``"increasing"`` or ``"decreasing"`` (see :func:`~fixedpoint_diffusion.plan`).
        guidance_scale: classifier-free guidance (1: none; guided sampling runs the model on twice the batch).
    """

    model: str
    budget: int
    iters_per_step: int | None = None
    reuse: bool = True
    allocation: str = "constant"
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.model, str) and self.model):
            raise InvalidValueError(f"Setting: model must be a non-empty name, got {self.model!r}")
        for name, value in (("budget", self.budget), ("iters_per_step", self.iters_per_step)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise InvalidValueError(f"Setting: {name} must be an int >= 1, got {value!r}")
        if self.allocation not in ("constant", "increasing", "decreasing"):
            raise InvalidValueError(f"Setting: allocation must be 'constant', 'increasing' or 'decreasing', got "
                                    f"{self.allocation!r}")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise InvalidValueError(f"Setting: guidance_scale must be a finite number, got {self.guidance_scale!r}")

    @property
    def key(self) -> str:
        """A unique, file-name-safe name."""
        parts = [self.model, f"b{self.budget}"]
        if self.iters_per_step is not None:
            parts += [f"k{self.iters_per_step}", "reuse" if self.reuse else "noreuse"]
            if self.allocation != "constant":
                parts.append(self.allocation)
        if self.guidance_scale != 1.0:
            parts.append(f"cfg{self.guidance_scale:g}")
        return "-".join(parts)

    @property
    def label(self) -> str:
        """The curve this setting belongs to (everything but the budget), for legends and tables."""
        text = self.model
        if self.iters_per_step is not None:
            text += f" k={self.iters_per_step}" + ("" if self.reuse else ", no reuse")
            if self.allocation != "constant":
                text += f", {self.allocation}"
        if self.guidance_scale != 1.0:
            text += f", guidance {self.guidance_scale:g}"
        return text

    def sampling_arguments(self) -> dict[str, Any]:
        """The :func:`~fixedpoint_diffusion.sample` arguments of this setting (DDIM, eta 0)."""
        return {"budget": self.budget, "iterations_per_timestep": self.iters_per_step, "reuse": self.reuse,
                "allocation": self.allocation, "guidance_scale": self.guidance_scale, "sampler": "ddim"}


class Scorer:
    """Sample quality on the Shapes dataset, with a small classifier standing in for Inception.

    Args:
        classifier: a trained :class:`~fixedpoint_diffusion.classifier.ShapesClassifier`.
        reference: its features of real held-out images, (M, D).
        kid_subsets: subsets averaged by KID.
    """

    def __init__(self, classifier: ShapesClassifier, reference: np.ndarray, kid_subsets: int = 20) -> None:
        self.classifier, self.reference, self.kid_subsets = classifier, reference, kid_subsets

    @classmethod
    def from_classifier(cls, classifier: ShapesClassifier, *, num_reference: int = 2000, seed: int = 0) -> Scorer:
        """A scorer around a trained classifier (e.g. :func:`fixedpoint_diffusion.pretrained.classifier`), with
        the features of ``num_reference`` held-out real images."""
        real = Shapes(num_reference, classifier.config["image_size"], seed=HELD_OUT_SEED + seed)
        reference, _ = classifier_features(classifier, to_uint8(real.images))
        return cls(classifier, reference)

    @classmethod
    def build(cls, image_size: int, folder: str | Path, *, num_reference: int = 2000, seed: int = 0,
              classifier_steps: int = 400, device: torch.device | str | None = None,
              progress: bool = False) -> Scorer:
        """Train the classifier (or read it from ``folder`` if there) and compute reference features."""
        folder = Path(folder)
        path = folder / "classifier.pt"
        if path.is_file():
            classifier = ShapesClassifier.load(path, device)
        else:
            classifier, _ = train_classifier(image_size, steps=classifier_steps, seed=seed, device=device,
                                                    progress=progress)
            classifier.save(path)
        return cls.from_classifier(classifier, num_reference=num_reference, seed=seed)

    def score(self, model: Any, diffusion: Any, *, num_samples: int = 500, batch_size: int = 500, seed: int = 0,
              device: torch.device | str | None = None, keep: int = 0, **sampling: Any) -> dict[str, Any]:
        """Sample ``num_samples`` images (classes balanced) and score them.

        Args:
            model: a trained DiT or FPDM (in eval mode).
            diffusion: the schedule it was trained with.
            keep: also return the first ``keep`` images (uint8 NHWC) under ``"images"``.
            **sampling: :func:`~fixedpoint_diffusion.sampling.sample` arguments (``budget``,
                ``iterations_per_timestep``,
                ``sampler``, ``reuse``, ...).

        Returns:
            ``fd``, ``kid``, ``kid_std``, ``accuracy`` (see :func:`evaluate_samples`), ``block_passes`` per image,
            ``num_steps``, ``iterations`` (FPDM, per timestep), ``residual`` (mean relative Δ_t per timestep),
            ``seconds``, and two arrays for :func:`bootstrap`: ``features`` (N, D) and ``correct`` (N,) bool.
        """
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 2 - (name == "batch_size")):
                raise InvalidValueError(f"{name} must be an int >= {2 - (name == 'batch_size')}, got {value!r}")
        num_classes = model.config.num_classes
        labels = torch.arange(num_samples) % num_classes
        images, residuals, out = [], [], None
        start = time.perf_counter()
        for lo in range(0, num_samples, batch_size):
            idx = range(lo, min(lo + batch_size, num_samples))
            # Eager unless asked: these small models sample in seconds, and compiling each batch shape costs more.
            out = sample(model, labels[idx.start:idx.stop], diffusion=diffusion, seed=seed, indices=idx,
                         device=device, **{"compile": False, **sampling})
            images.append(to_uint8(out.samples))
            if out.residuals is not None:
                residuals.append(out.residuals.float().cpu())
        seconds = time.perf_counter() - start
        images = np.concatenate(images)
        result = evaluate_samples(images, labels.numpy(), self.classifier, self.reference, keep_features=True,
                                  kid_subsets=self.kid_subsets, kid_subset_size=min(1000, num_samples), seed=seed)
        schedule = out.schedule
        result.update(block_passes=schedule.block_passes, num_steps=schedule.num_timesteps,
                      iterations=list(schedule.iterations) if schedule.iterations is not None else None,
                      residual=torch.cat(residuals, 1).mean(1).tolist() if residuals else None,
                      seconds=seconds)
        if keep:
            result["images"] = images[:keep]
        return result

    def real_baseline(self, num_samples: int, *, seed: int = 0) -> dict[str, Any]:
        """The score of ``num_samples`` real images that are neither the reference nor training data: the best a
        model can reach at this sample count (FD is biased upwards at small counts, so compare at equal counts)."""
        image_size = self.classifier.config["image_size"]
        real = Shapes(num_samples, image_size, seed=HELD_OUT_SEED + 1_000 + seed)
        return evaluate_samples(to_uint8(real.images), real.labels.numpy(), self.classifier, self.reference,
                                keep_features=True, kid_subsets=self.kid_subsets,
                                kid_subset_size=min(1000, num_samples), seed=seed)


def bootstrap(features: np.ndarray, correct: np.ndarray, reference: np.ndarray, *, resamples: int = 200,
              seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals over the generated samples (the reference set held fixed): percentile intervals for
    the accuracy; for FD the basic (reversed percentile) interval ``[2 fd - q_high, 2 fd - q_low]``, because
    resampling with replacement duplicates samples, which alone raises FD (at 400 samples by about as much as the
    interval is wide), and the basic interval undoes that shift (its lower end is clipped at 0, which FD cannot go
    below).

    Returns:
        ``{"fd": (low, high), "accuracy": (low, high)}`` at ``level``, and ``"fd_resampled"``: the FD of every
        resample (the indices depend only on the sample count, ``resamples`` and ``seed``, so two settings of
        the same size resampled with the same seed are paired).
    """
    _check_level(level)
    if len(correct) != len(features):
        raise InvalidValueError(f"correct must hold one entry per sample ({len(features)}), got {len(correct)}")
    idx = _resample_indices(len(features), resamples, seed)
    fd = _resampled_fd(features, idx, reference)
    acc = correct[idx].mean(1)
    estimate = frechet_distance(np.asarray(features, dtype=np.float64), reference)
    lo, hi = _interval(fd, level, estimate)
    return {"fd": (max(0.0, lo), hi), "accuracy": _interval(acc, level), "fd_resampled": fd}  # FD >= 0


def paired_difference(a: Mapping[str, Any], b: Mapping[str, Any], reference: np.ndarray, *, resamples: int = 200,
                      seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """``a - b`` for FD and accuracy, with a paired bootstrap interval (basic for FD, percentile for accuracy, as
    in :func:`bootstrap`): sample ``i`` of both was drawn for the same class from the same seed, so both are
    resampled with the same indices and the shared noise cancels.

    Args:
        a, b: :meth:`Scorer.score` results (``features``, ``correct``, ``fd``, ``accuracy``) of equal size.

    Returns:
        ``{"fd": (difference, low, high), "accuracy": (difference, low, high)}``.
    """
    _check_level(level)
    n = len(a["features"])
    if len(b["features"]) != n:
        raise InvalidValueError(f"a and b must hold the same number of samples, got {n} and {len(b['features'])}")
    idx = _resample_indices(n, resamples, seed)
    fd = _fd_samples(a, idx, reference, seed) - _fd_samples(b, idx, reference, seed)
    acc = a["correct"][idx].mean(1) - b["correct"][idx].mean(1)
    return {"fd": (a["fd"] - b["fd"], *_interval(fd, level, a["fd"] - b["fd"])),
            "accuracy": (a["accuracy"] - b["accuracy"], *_interval(acc, level))}


def _fd_samples(row: Mapping[str, Any], idx: np.ndarray, reference: np.ndarray, seed: int) -> np.ndarray:
    cached = row.get("fd_resampled")
    if cached is not None and len(cached) == len(idx) and row.get("bootstrap_seed") == seed:
        return np.asarray(cached)
    return _resampled_fd(row["features"], idx, reference)


def _resampled_fd(features: np.ndarray, idx: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Fréchet distance of ``features[idx[r]]`` to ``reference`` for every resample ``r``, batched: the
    reference's statistics and covariance square root are computed once, and
    ``tr((S_r S_ref)^{1/2}) = sum sqrt(eig(S_ref^{1/2} S_r S_ref^{1/2}))`` (the formula of
    :func:`~fixedpoint_diffusion.evaluation.frechet_distance`, which the tests compare against)."""
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    mu_ref, cov_ref = ref.mean(0), torch.cov(ref.T)
    values, vectors = torch.linalg.eigh(cov_ref)
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    features = torch.as_tensor(np.asarray(features, dtype=np.float64))
    out = []
    for chunk in np.array_split(idx, max(1, len(idx) // 50)):  # about 50 resamples at a time bounds memory
        x = features[torch.as_tensor(chunk)]  # (R, n, D)
        mu = x.mean(1)
        centred = x - mu[:, None]
        cov = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)  # (R, D, D)
        middle = root @ cov @ root
        cross = torch.linalg.eigvalsh((middle + middle.transpose(1, 2)) / 2).clamp_min(0).sqrt().sum(1)
        diff = mu - mu_ref
        out.append((diff * diff).sum(1) + cov.diagonal(dim1=1, dim2=2).sum(1) + cov_ref.trace() - 2 * cross)
    return torch.cat(out).numpy()


def _check_level(level: Any) -> None:
    if not (isinstance(level, float) and 0 < level < 1):
        raise InvalidValueError(f"level must be a float in (0, 1), e.g. 0.95, got {level!r}")


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    if n < 2:
        raise InvalidValueError(f"need at least 2 samples to bootstrap, got {n}")
    if not (isinstance(resamples, int) and resamples >= 10):
        raise InvalidValueError(f"resamples must be an int >= 10, got {resamples!r}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(values: Any, level: float, estimate: float | None = None) -> tuple[float, float]:
    """Percentile interval of bootstrap ``values``, or the basic interval around ``estimate`` if given."""
    lo, hi = np.quantile(np.asarray(values), [(1 - level) / 2, (1 + level) / 2])
    if estimate is not None:
        lo, hi = 2 * estimate - hi, 2 * estimate - lo
    return float(lo), float(hi)


def score_settings(models: Mapping[str, tuple[Any, Any]], settings: list[Setting], scorer: Scorer, *,
                   num_samples: int, seed: int = 0, device: torch.device | str | None = None,
                   folder: str | Path | None = None, keep: int = 0, on_start: Any = None,
                   on_result: Any = None) -> dict[str, dict[str, Any]]:
    """Score every setting, classes balanced, every model from the same seeds, with bootstrap intervals.

    Args:
        models: name -> ``(model, diffusion)`` (the :attr:`Setting.model` names).
        folder: where each finished setting is written (``scores/<key>.json`` and ``scores/<key>.npz`` with its
            features); a setting already there is read back instead of sampled again, so a rerun resumes.
        keep: also keep the first ``keep`` images (uint8 NHWC) of each setting under ``"images"`` (sampled
            settings only; read-back ones have none).
        on_start: called as ``on_start(index, setting)`` before a setting is sampled.
        on_result: called as ``on_result(setting, row)`` after each setting.

    Returns:
        key -> row: the setting's fields, :meth:`Scorer.score`'s numbers, ``fd_ci``/``accuracy_ci`` (95%
        bootstrap), ``timesteps``, and the arrays ``features``/``correct``/``fd_resampled`` (not in the JSON).
    """
    store = Path(folder) / "scores" if folder is not None else None
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    for index, setting in enumerate(settings):
        if setting.model not in models:
            raise InvalidValueError(f"setting {setting.key!r} names model {setting.model!r}; models: {sorted(models)}")
        json_path = store / f"{setting.key}.json" if store is not None else None
        if json_path is not None and json_path.is_file() and json_path.with_suffix(".npz").is_file():
            row = json.loads(json_path.read_text())
            with np.load(json_path.with_suffix(".npz")) as arrays:
                row.update({k: arrays[k] for k in _ARRAYS})
        else:
            if on_start is not None:
                on_start(index, setting)
            model, diffusion = models[setting.model]
            score = scorer.score(model, diffusion, num_samples=num_samples, batch_size=min(256, num_samples),
                                 seed=seed, device=device, keep=keep, **setting.sampling_arguments())
            images = score.pop("images", None)
            intervals = bootstrap(score["features"], score["correct"], scorer.reference, seed=seed)
            score["fd_resampled"] = intervals.pop("fd_resampled")
            timesteps = list(plan(model, budget=setting.budget, iterations_per_timestep=setting.iters_per_step,
                                  allocation=setting.allocation).timesteps)
            row = {**dataclasses.asdict(setting), "key": setting.key, "label": setting.label,
                   **{k: v for k, v in score.items() if k not in _ARRAYS},
                   "fd_ci": intervals["fd"], "accuracy_ci": intervals["accuracy"], "timesteps": timesteps,
                   "bootstrap_seed": seed}
            if json_path is not None:
                _save_npz(json_path.with_suffix(".npz"), **{k: score[k] for k in _ARRAYS})
                _write_json(row, json_path)
            row.update({k: score[k] for k in _ARRAYS})
            if images is not None:
                row["images"] = images
        rows[setting.key] = row
        if on_result is not None:
            on_result(setting, row)
    return rows


_ARRAYS = ("features", "correct", "fd_resampled")  # per-row arrays, kept out of the JSON


def _write_json(obj: Any, path: Path) -> None:
    write_json_atomic(path, obj)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    write_atomic(path, lambda fh: np.savez(fh, **arrays))
