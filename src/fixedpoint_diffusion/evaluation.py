"""Sample quality: Fréchet distance, KID, and a small classifier whose features stand in for Inception's.

Two feature extractors feed the same metrics:

* **Inception-v3** (:mod:`fixedpoint_diffusion.inception`), from a weights file on disk, for FID on real data
  such as ImageNet. Nothing is downloaded.
* **A small classifier trained on the embedded Shapes dataset** (:class:`ShapesClassifier`, trained in seconds
  on a CPU by :func:`train_classifier`). Inception features of 16-pixel synthetic shapes mean little. This network
  knows exactly what distinguishes the 8 classes. Its penultimate features give a Fréchet distance and a KID for
  the small-scale experiments (``fpdm demo``, ``benchmarks/quality.py``), and its predictions give the class
  accuracy of conditional samples.

The metrics work on features of any extractor:

* :func:`frechet_distance` is ``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})``. The trace of the matrix
  square root is computed as the sum of square roots of the eigenvalues of ``S_a^{1/2} S_b S_a^{1/2}``, which is
  symmetric positive semi-definite, so no general ``sqrtm`` (and no SciPy) is needed and no imaginary parts appear.
* :func:`kernel_inception_distance` (KID) is the unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets, as in Binkowski et al. (2018). Unlike the Fréchet
  distance it is unbiased, so it stays meaningful with a few hundred samples.

Images enter as uint8 arrays ``(N, H, W, 3)``: the convention of ``.npz`` sample files (``arr_0``) used by ADM's
evaluator and written by ``fpdm sample`` (:func:`~fixedpoint_diffusion.pipeline.to_uint8` converts
samples in [-1, 1]). Quantising samples to 8 bits before evaluation matches how FID is
computed in the literature.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import pretrained
from ._runtime import check_writable_folder
from .classifier import ShapesClassifier, classifier_features, train_classifier
from .data import Shapes
from .errors import InputError, InvalidValueError, MissingInputError, OutputExistsError
from .inception import inception_features, load_inception
from .pipeline import to_uint8

__all__ = [
    "HELD_OUT_SEED", "SHAPES_REFERENCE", "FeatureStats", "ShapesClassifier", "classifier_features", "evaluate",
    "evaluate_samples", "frechet_distance", "kernel_inception_distance", "load_images", "train_classifier",
]

#: Seed of the embedded dataset's held-out real images (the reference of every Shapes score): far from the seeds of
#: training data (``train.seed``) and of the classifier's own images.
HELD_OUT_SEED = 3_000_017

#: Give this as an image set for the embedded Shapes dataset's held-out real images, and as ``classifier`` for the
#: classifier shipped with the package.
SHAPES_REFERENCE = "shapes"

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------------- metrics ---


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a set of feature vectors, what the Fréchet distance needs.

    Saved as ``.npz`` with keys ``mu`` and ``sigma``, the layout pytorch-fid's ``--save-stats`` writes, so reference
    statistics computed once can be reused (and exchanged with pytorch-fid).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        """Statistics of ``features`` (N, D), N >= 2; the covariance is the unbiased one (``ddof=1``)."""
        features = _as_features(features, "features")
        if features.shape[0] < 2:
            raise InvalidValueError(f"features needs at least 2 rows for a covariance, got {features.shape[0]}")
        return cls(features.mean(0), np.cov(features, rowvar=False), features.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma`` and ``num`` to the ``.npz`` file ``path``."""
        np.savez(path, mu=self.mu, sigma=self.sigma, num=self.num)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by :meth:`save` or by pytorch-fid (``num`` is then unknown, -1)."""
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise InvalidValueError(f"{path}: a statistics file needs arrays 'mu' and 'sigma', found "
                                        f"{sorted(f.files)}")
            stats = cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                        int(f["num"]) if "num" in f else -1)
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            raise InvalidValueError(f"{path}: the statistics hold non-finite values")
        if stats.mu.ndim != 1 or stats.sigma.shape != (stats.mu.shape[0],) * 2:
            raise InvalidValueError(f"{path}: mu must be (D,) and sigma (D, D), got {stats.mu.shape} and "
                                    f"{stats.sigma.shape}")
        return stats


def _as_features(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidValueError(f"{what} must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise InvalidValueError(f"{what} contains non-finite values")
    return x


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: FeatureStats | np.ndarray, b: FeatureStats | np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (FID when the features are Inception's).

    Args:
        a, b: :class:`FeatureStats`, or raw features (N, D) whose statistics are taken.

    Returns:
        ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})``, computed in float64.
    """
    a = a if isinstance(a, FeatureStats) else FeatureStats.from_features(a)
    b = b if isinstance(b, FeatureStats) else FeatureStats.from_features(b)
    if a.mu.shape != b.mu.shape:
        raise InvalidValueError(f"feature dimensions differ: {a.mu.shape[0]} and {b.mu.shape[0]}")
    root_a = _psd_sqrt(a.sigma)
    middle = root_a @ b.sigma @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * cross)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased MMD^2 between two feature sets with the kernel ``(x.y / d + 1)^3``.

    Args:
        a, b: features (N_a, D) and (N_b, D).
        subsets: number of random subset pairs averaged.
        subset_size: rows per subset, capped at ``min(N_a, N_b)`` (which must be at least 2).
        seed: seed of the subset draws.

    Returns:
        ``(mean, std)`` over the subsets. The mean is an unbiased estimate of MMD^2, so it can be slightly
        negative when the two sets come from the same distribution.
    """
    a, b = _as_features(a, "a"), _as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise InvalidValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if not (isinstance(subsets, int) and subsets >= 1):
        raise InvalidValueError(f"subsets must be an int >= 1, got {subsets!r}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise InvalidValueError(f"KID needs at least 2 samples on each side, got {a.shape[0]} and {b.shape[0]}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.sum() / (m * m))
    return float(np.mean(values)), float(np.std(values))


# ------------------------------------------------------------------------------------------------- images ---


def load_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images from an ``.npz`` file or a folder, as uint8 ``(N, H, W, 3)``.

    Args:
        path: an ``.npz`` with ``arr_0`` (uint8 NHWC images, ADM's convention and what ``fpdm sample`` writes) and
            optionally ``arr_1`` (class labels); or a folder searched recursively for PNG/JPEG/BMP/WebP files, read
            in sorted path order. All images must have the same size; grayscale and RGBA are converted to RGB.

    Returns:
        ``(images, labels)``, ``labels`` being ``None`` when the source has none.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InvalidValueError(f"{path}: no image files ({', '.join(_IMAGE_SUFFIXES)}) found")
        from PIL import Image

        arrays = []
        for file in files:
            try:
                with Image.open(file) as img:
                    arrays.append(np.asarray(img.convert("RGB")))
            except OSError as err:  # PIL's UnidentifiedImageError included: a truncated or mislabelled file
                raise InvalidValueError(f"{file}: not a readable image ({str(err).splitlines()[0]})") from None
            if arrays[-1].shape != arrays[0].shape:
                raise InvalidValueError(f"{file}: size {arrays[-1].shape[:2]} differs from {files[0]}'s "
                                        f"{arrays[0].shape[:2]}; all images must have the same size")
        return np.stack(arrays), None
    try:
        with open(path, "rb") as fh, np.load(fh) as f:  # our handle: closed even when numpy's zip reader fails
            if "arr_0" not in f:
                raise InvalidValueError(f"{path}: an image .npz needs 'arr_0' (uint8 N x H x W x 3), found "
                                        f"{sorted(f.files)}")
            images, labels = f["arr_0"], f.get("arr_1")
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:  # unreadable, truncated, not an .npz
        raise InvalidValueError(f"{path}: not a readable .npz of images ({str(err).splitlines()[0]})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidValueError(f"{path}: arr_0 must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise InvalidValueError(f"{path}: arr_1 must hold one label per image ({len(images)}), got shape "
                                f"{labels.shape}")
    return images, labels


def evaluate_samples(images: np.ndarray, labels: np.ndarray | Sequence[int] | None, classifier: ShapesClassifier,
                     reference: np.ndarray, *, kid_subsets: int = 50, kid_subset_size: int = 1000,
                     seed: int = 0, keep_features: bool = False) -> dict[str, Any]:
    """Quality of generated Shapes images against reference features, with the small classifier.

    Args:
        images: generated images, uint8 (N, H, W, 3).
        labels: the classes the samples were conditioned on (for the accuracy), or ``None``.
        classifier: the feature extractor.
        reference: classifier features of real images, (M, D).

    Returns:
        ``fd`` (Fréchet distance), ``kid`` and ``kid_std`` (x 1e3 is the usual way to print them), ``accuracy``
        (fraction of samples classified as their conditioning class; NaN without labels) and ``num``; with
        ``keep_features`` also the per-sample arrays behind them, ``features`` (N, D) float32 and ``correct``
        (N,) bool (``None`` without labels), for bootstrap intervals.
    """
    feats, preds = classifier_features(classifier, images)
    kid, kid_std = kernel_inception_distance(feats, reference, subsets=kid_subsets, subset_size=kid_subset_size,
                                             seed=seed)
    accuracy = math.nan if labels is None else float((preds == np.asarray(labels)).mean())
    result: dict[str, Any] = {"fd": frechet_distance(feats, reference), "kid": kid, "kid_std": kid_std,
                              "accuracy": accuracy, "num": int(images.shape[0])}
    if keep_features:
        result.update(features=feats.astype(np.float32),
                      correct=None if labels is None else preds == np.asarray(labels))
    return result


# ------------------------------------------------------------------------------------ two image sets ---


def _side(path: str, extract, what: str, image_size: int | None = None) -> tuple[Any, np.ndarray | None]:
    """(features or FeatureStats, labels) of one side; ``"shapes"`` is the embedded dataset's held-out
    reference (2000 real images at the classifier's size)."""
    if path == SHAPES_REFERENCE:
        if image_size is None:
            raise InvalidValueError(f"{what}: the {SHAPES_REFERENCE!r} reference needs --classifier (its image size)")
        real = Shapes(2000, image_size, seed=HELD_OUT_SEED)
        return extract(to_uint8(real.images)), real.labels.numpy()
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        try:
            with open(p, "rb") as fh, np.load(fh) as f:  # our handle: closed even when numpy's zip reader fails
                stats_only = "mu" in f and "sigma" in f and "arr_0" not in f
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            raise InvalidValueError(f"{what}: {p} is not a readable .npz ({str(err).splitlines()[0]})") from None
        if stats_only:
            return FeatureStats.load(p), None
    if not p.exists():
        raise MissingInputError(f"{what}: {p}: no such file or folder")
    images, labels = load_images(p)
    return extract(images), labels


def evaluate(first: str, second: str | None, *, inception: str | None = None, preprocess: str = "pytorch-fid",
             classifier: str | None = None, batch_size: int = 50, device: str | None = None,
             kid_subsets: int = 100, kid_subset_size: int = 1000, save_stats: str | None = None,
             seed: int = 0) -> dict[str, Any]:
    """Compare two image sets (what ``fpdm eval`` computes), as a dict.

    Each side is an ``.npz`` of images (``arr_0`` uint8 NHWC, optional ``arr_1`` labels: what ``fpdm sample`` writes
    and ADM's evaluator reads), a folder of images, an ``.npz`` of precomputed statistics (``mu``, ``sigma``: what
    ``save_stats`` and pytorch-fid's ``--save-stats`` write), or ``"shapes"``, the embedded dataset's held-out real
    images. KID needs features on both sides, so it is skipped when a side is statistics only.

    Exactly one of ``inception`` (a weights file) and ``classifier`` (a ShapesClassifier file) picks the features.
    Returns ``fid`` (Inception) or ``fd`` (classifier), ``kid``/``kid_std`` when both sides have features,
    ``accuracy`` for the classifier when the first side has labels, and the sample counts.
    """
    if (inception is None) == (classifier is None):
        raise InvalidValueError("give exactly one of --inception (FID on Inception features) and --classifier "
                                "(the small Shapes classifier)")
    if second is None and save_stats is None:
        raise InvalidValueError("give a second image set to compare with, or --save-stats to only write statistics")
    for name, value in (("batch_size", batch_size), ("kid_subsets", kid_subsets),
                        ("kid_subset_size", kid_subset_size)):
        if value < 1:
            raise InvalidValueError(f"{name} must be >= 1, got {value}")
    for name, path in (("first", first), ("second", second)):  # before loading any network
        if path is not None and path != SHAPES_REFERENCE and not Path(path).exists():
            raise MissingInputError(f"{name} image set: {path}: no such file or folder")
    if save_stats is not None:
        target = Path(save_stats).resolve()
        inputs = [Path(p).resolve() for p in (first, second) if p is not None]
        if target in inputs:
            raise OutputExistsError(f"--save-stats {save_stats!r} is one of the inputs: it would be replaced")
        if target.exists():
            raise OutputExistsError(f"--save-stats {save_stats!r} already exists; choose another file")
        check_writable_folder(target.parent, "--save-stats")
    predictions: list[np.ndarray] = []  # the classifier's, per side in order
    if inception is not None:
        net = load_inception(inception, device, preprocess=preprocess)

        def extract(images: np.ndarray) -> np.ndarray:
            return inception_features(net, images, batch_size=batch_size)

        metric = "fid"
    else:
        if classifier == SHAPES_REFERENCE:
            net = pretrained.classifier(device or "cpu")
        else:
            net = ShapesClassifier.load(classifier, device)

        def extract(images: np.ndarray) -> np.ndarray:
            feats, predicted = classifier_features(net, images, batch_size=batch_size)
            predictions.append(predicted)
            return feats

        metric = "fd"
    size = None if inception is not None else net.config["image_size"]
    a, labels_a = _side(first, extract, "first image set", size)
    result: dict[str, Any] = {"features": "inception" if inception else "shapes-classifier"}
    if save_stats is not None:
        if isinstance(a, FeatureStats):
            raise InvalidValueError(f"--save-stats: {first} already holds statistics")
        FeatureStats.from_features(a).save(save_stats)
        result["saved_stats"] = str(save_stats)
    if second is not None:
        b, _ = _side(second, extract, "second image set", size)
        result[metric] = frechet_distance(a, b)
        result["num_first"] = a.num if isinstance(a, FeatureStats) else int(a.shape[0])
        result["num_second"] = b.num if isinstance(b, FeatureStats) else int(b.shape[0])
        if not isinstance(a, FeatureStats) and not isinstance(b, FeatureStats):
            result["kid"], result["kid_std"] = kernel_inception_distance(
                a, b, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    if classifier is not None and labels_a is not None and not isinstance(a, FeatureStats):
        result["accuracy"] = float((predictions[0] == labels_a).mean())
    return result
