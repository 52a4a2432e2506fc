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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "FeatureStats", "ShapesClassifier", "classifier_features", "evaluate_samples", "frechet_distance",
    "kernel_inception_distance", "load_images", "train_classifier",
]

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
            raise ValueError(f"features needs at least 2 rows for a covariance, got {features.shape[0]}")
        return cls(features.mean(0), np.cov(features, rowvar=False), features.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma`` and ``num`` to the ``.npz`` file ``path``."""
        np.savez(path, mu=self.mu, sigma=self.sigma, num=self.num)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics written by :meth:`save` or by pytorch-fid (``num`` is then unknown, -1)."""
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: a statistics file needs arrays 'mu' and 'sigma', found {sorted(f.files)}")
            stats = cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                        int(f["num"]) if "num" in f else -1)
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            raise ValueError(f"{path}: the statistics hold non-finite values")
        if stats.mu.ndim != 1 or stats.sigma.shape != (stats.mu.shape[0],) * 2:
            raise ValueError(f"{path}: mu must be (D,) and sigma (D, D), got {stats.mu.shape} and {stats.sigma.shape}")
        return stats


def _as_features(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains non-finite values")
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
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} and {b.mu.shape[0]}")
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
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    if not (isinstance(subsets, int) and subsets >= 1):
        raise ValueError(f"subsets must be an int >= 1, got {subsets!r}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {a.shape[0]} and {b.shape[0]}")
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
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{path}: no image files ({', '.join(_IMAGE_SUFFIXES)}) found")
        from PIL import Image

        arrays = []
        for file in files:
            with Image.open(file) as img:
                arrays.append(np.asarray(img.convert("RGB")))
            if arrays[-1].shape != arrays[0].shape:
                raise ValueError(f"{file}: size {arrays[-1].shape[:2]} differs from {files[0]}'s "
                                 f"{arrays[0].shape[:2]}; all images must have the same size")
        return np.stack(arrays), None
    try:
        with np.load(path) as f:
            if "arr_0" not in f:
                raise ValueError(f"{path}: an image .npz needs 'arr_0' (uint8 N x H x W x 3), found "
                                 f"{sorted(f.files)}")
            images, labels = f["arr_0"], f.get("arr_1")
    except (OSError, EOFError, ValueError) as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: not a readable .npz of images ({str(err).splitlines()[0]})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise ValueError(f"{path}: arr_1 must hold one label per image ({len(images)}), got shape {labels.shape}")
    return images, labels


def _batches(images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device):
    """uint8 NHWC arrays (or NCHW uint8 tensors) as float NCHW batches in [-1, 1] on ``device``."""
    for i in range(0, images.shape[0], batch_size):
        chunk = images[i:i + batch_size]
        x = torch.as_tensor(chunk) if isinstance(chunk, np.ndarray) else chunk
        if isinstance(chunk, np.ndarray):
            x = x.permute(0, 3, 1, 2)
        yield x.to(device=device, dtype=torch.float32) / 127.5 - 1


# --------------------------------------------------------------------------------------------- classifier ---


class ShapesClassifier(nn.Module):
    """A small CNN for the embedded Shapes dataset; its penultimate features replace Inception's at small scale.

    Three stages of two 3x3 convolutions (``width``, ``2 width``, ``4 width`` channels, GroupNorm, SiLU), average
    pooling between stages, global average pooling to ``4 width`` features, a linear head.

    Args:
        image_size: side of the input images (the network is fully convolutional; the size is recorded so that a
            saved classifier is only used on the images it was trained for).
        num_classes: classes of the head.
        width: channels of the first stage.
    """

    def __init__(self, image_size: int = 16, num_classes: int = 8, width: int = 32) -> None:
        super().__init__()
        self.config = {"image_size": image_size, "num_classes": num_classes, "width": width}
        layers: list[nn.Module] = []
        cin = 3
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            if stage:
                layers.append(nn.AvgPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
                cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        self.num_features = cin

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 4 width) of images ``x`` in [-1, 1], (N, 3, H, W)."""
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.features(x))

    def save(self, path: str | os.PathLike, **info: object) -> None:
        """Write the weights, the constructor arguments and ``info`` (e.g. held-out accuracy) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"config": self.config, "state_dict": self.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> ShapesClassifier:
        """Read a classifier written by :meth:`save`, in eval mode without gradients."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such classifier file")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
            raise ValueError(f"{path}: not a ShapesClassifier file ({str(err).splitlines()[0]})") from None
        if not (isinstance(blob, dict) and {"config", "state_dict"} <= set(blob)):
            raise ValueError(f"{path}: not a ShapesClassifier file (expected keys 'config' and 'state_dict')")
        model = cls(**blob["config"])
        model.load_state_dict(blob["state_dict"])
        model.info = blob.get("info", {})
        return model.to(device or "cpu").eval().requires_grad_(False)


def train_classifier(image_size: int = 16, *, steps: int = 400, batch_size: int = 128, lr: float = 3e-3,
                     num_train: int = 16384, num_test: int = 2048, seed: int = 0,
                     device: torch.device | str | None = None, progress: bool = False,
                     ) -> tuple[ShapesClassifier, float]:
    """Train a :class:`ShapesClassifier` on freshly generated Shapes images and measure it on held-out ones.

    The training and test images come from seeds derived from ``seed`` and offset far from the seeds training
    runs use for their data, so the classifier never sees the images a diffusion model was trained on. Training
    is deterministic for a given seed and device. On 2 CPU cores the defaults take about 15 s and reach about
    95% test accuracy.

    Returns:
        ``(classifier, test_accuracy)``; the classifier is in eval mode without gradients.
    """
    from .data import Shapes

    for name, value, minimum in [("image_size", image_size, 1), ("steps", steps, 1), ("batch_size", batch_size, 1),
                                 ("num_train", num_train, 1), ("num_test", num_test, 1)]:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    device = torch.device(device or "cpu")
    train = Shapes(num_train, image_size, seed=1_000_003 + seed)
    test = Shapes(num_test, image_size, seed=2_000_003 + seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesClassifier(image_size, Shapes.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # OneCycleLR divides by zero when the warm-up is exactly one step (steps=10 at 10%)
    warmup = 0.1 if 0.1 * steps != 1 else 0.2
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup)
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="classifier", disable=not progress, leave=False):
        idx = torch.randint(0, num_train, (batch_size,), generator=g)
        x, y = train.images[idx], train.labels[idx]
        x = torch.where(torch.rand(batch_size, 1, 1, 1, generator=g) < 0.5, x.flip(3), x)  # the trainer's flips
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    with torch.inference_mode():
        correct = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum())
                      for x, y in zip(test.images.split(512), test.labels.split(512)))
    return model, correct / num_test


def classifier_features(model: ShapesClassifier, images: np.ndarray | torch.Tensor, *, batch_size: int = 512,
                        device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64) and predicted classes of uint8 NHWC images (or a uint8 NCHW tensor).

    Returns:
        ``(features (N, D), predictions (N,))``.
    """
    if images.shape[0] == 0:
        raise ValueError("images is empty")
    size = model.config["image_size"]
    spatial = images.shape[1:3] if isinstance(images, np.ndarray) else images.shape[2:4]
    if tuple(spatial) != (size, size):
        raise ValueError(f"the classifier was trained on {size}x{size} images, got {tuple(spatial)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    feats, preds = [], []
    with torch.inference_mode():
        for x in _batches(images, batch_size, device):
            h = model.features(x)
            feats.append(h.double().cpu())
            preds.append(model.head(h).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


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
