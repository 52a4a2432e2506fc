"""``fpdm eval``: FID (Inception features from a local weights file) or the small-classifier Fréchet distance and
KID (the embedded Shapes dataset) between two image sets.

Each side is an ``.npz`` of images (``arr_0`` uint8 NHWC, optional ``arr_1`` labels: what ``fpdm sample`` writes
and ADM's evaluator reads), a folder of images, or an ``.npz`` of precomputed statistics (``mu``, ``sigma``: what
``--save-stats`` and pytorch-fid's ``--save-stats`` write). KID needs features on both sides, so it is skipped
when a side is statistics only.

    fpdm eval samples.npz imagenet-ref.npz --inception pt_inception-2015-12-05-6726825d.pth
    fpdm eval real-folder/ --inception pt_inception-2015-12-05-6726825d.pth --save-stats ref-stats.npz
    fpdm eval samples/samples.npz shapes --classifier shapes   # embedded dataset: its reference, shipped classifier
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ._runtime import check_writable_folder

__all__ = ["SHAPES_REFERENCE", "add_parser", "evaluate"]

#: Give this as an image set for the embedded Shapes dataset's held-out real images, and as ``--classifier`` for
#: the classifier shipped with the package.
SHAPES_REFERENCE = "shapes"


def _side(path: str, extract, what: str, image_size: int | None = None) -> tuple[Any, np.ndarray | None]:
    """(features or FeatureStats, labels) of one side; ``"shapes"`` is the embedded dataset's held-out
    reference (2000 real images at the classifier's size)."""
    from .evaluation import FeatureStats, load_images

    if path == SHAPES_REFERENCE:
        from .data import Shapes
        from .experiment import HELD_OUT_SEED
        from .pipeline import to_uint8

        if image_size is None:
            raise ValueError(f"{what}: the {SHAPES_REFERENCE!r} reference needs --classifier (its image size)")
        real = Shapes(2000, image_size, seed=HELD_OUT_SEED)
        return extract(to_uint8(real.images)), real.labels.numpy()
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        try:
            with np.load(p) as f:
                stats_only = "mu" in f and "sigma" in f and "arr_0" not in f
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(f"{what}: {p} is not a readable .npz ({str(err).splitlines()[0]})") from None
        if stats_only:
            return FeatureStats.load(p), None
    if not p.exists():
        raise FileNotFoundError(f"{what}: {p}: no such file or folder")
    images, labels = load_images(p)
    return extract(images), labels


def evaluate(first: str, second: str | None, *, inception: str | None = None, preprocess: str = "pytorch-fid",
             classifier: str | None = None, batch_size: int = 50, device: str | None = None,
             kid_subsets: int = 100, kid_subset_size: int = 1000, save_stats: str | None = None,
             seed: int = 0) -> dict[str, Any]:
    """What ``fpdm eval`` computes, as a dict (see the module docstring for the inputs).

    Exactly one of ``inception`` (a weights file) and ``classifier`` (a ShapesClassifier file) picks the features.
    Returns ``fid`` (Inception) or ``fd`` (classifier), ``kid``/``kid_std`` when both sides have features,
    ``accuracy`` for the classifier when the first side has labels, and the sample counts.
    """
    from .evaluation import (
        FeatureStats,
        ShapesClassifier,
        classifier_features,
        frechet_distance,
        kernel_inception_distance,
    )

    if (inception is None) == (classifier is None):
        raise ValueError("give exactly one of --inception (FID on Inception features) and --classifier "
                         "(the small Shapes classifier)")
    if second is None and save_stats is None:
        raise ValueError("give a second image set to compare with, or --save-stats to only write statistics")
    for name, value in (("batch_size", batch_size), ("kid_subsets", kid_subsets),
                        ("kid_subset_size", kid_subset_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, path in (("first", first), ("second", second)):  # before loading any network
        if path is not None and path != SHAPES_REFERENCE and not Path(path).exists():
            raise FileNotFoundError(f"{name} image set: {path}: no such file or folder")
    if save_stats is not None:
        target = Path(save_stats).resolve()
        inputs = [Path(p).resolve() for p in (first, second) if p is not None]
        if target in inputs:
            raise FileExistsError(f"--save-stats {save_stats!r} is one of the inputs: it would be replaced")
        if target.exists():
            raise FileExistsError(f"--save-stats {save_stats!r} already exists; choose another file")
        check_writable_folder(target.parent, "--save-stats")
    predictions: list[np.ndarray] = []  # the classifier's, per side in order
    if inception is not None:
        from .inception import inception_features, load_inception

        net = load_inception(inception, device, preprocess=preprocess)

        def extract(images: np.ndarray) -> np.ndarray:
            return inception_features(net, images, batch_size=batch_size)

        metric = "fid"
    else:
        if classifier == SHAPES_REFERENCE:
            from . import pretrained

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
            raise ValueError(f"--save-stats: {first} already holds statistics")
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


def _run(args: argparse.Namespace) -> int:
    if args.out:  # before any compute
        parent = Path(args.out).resolve().parent
        if not parent.is_dir():
            raise FileNotFoundError(f"--out {args.out!r}: the folder {str(parent)!r} does not exist")
        check_writable_folder(parent, "--out")
    result = evaluate(args.first, args.second, inception=args.inception, preprocess=args.preprocess,
                      classifier=args.classifier, batch_size=args.batch_size, device=args.device,
                      kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                      save_stats=args.save_stats, seed=args.seed)
    names = {"fid": "FID", "fd": "Fréchet distance (small classifier)"}
    for key, name in names.items():
        if key in result:
            print(f"{name}: {result[key]:.4f}  ({result['num_first']} vs {result['num_second']} images)")
    if "kid" in result:
        print(f"KID: {result['kid']:.6f} ± {result['kid_std']:.6f}")
    elif args.second is not None:
        print("KID: skipped (one side is statistics only)")
    if "accuracy" in result:
        print(f"class accuracy of the first set: {result['accuracy']:.4f}")
    if "saved_stats" in result:
        print(f"statistics of {args.first} written to {result['saved_stats']}")
    if args.out:
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(json.dumps({**result, "first": args.first, "second": args.second}, indent=1) + "\n")
        os.replace(tmp, args.out)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``fpdm eval`` on the ``fpdm`` sub-command parser."""
    p = sub.add_parser("eval", help="FID / small-classifier Fréchet distance and KID between two image sets",
                       description="FID on Inception features from a local weights file, or the Fréchet distance "
                                   "and KID on a small Shapes classifier's features, between two image sets. Each "
                                   "set is an .npz of images (arr_0 uint8 NHWC, optional arr_1 labels: what fpdm "
                                   "sample writes and ADM's evaluator reads), a folder of images, or an .npz of "
                                   "statistics (mu, sigma) written by --save-stats or pytorch-fid. KID needs "
                                   "images on both sides.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n" + __doc__.split("\n\n")[2])
    p.add_argument("first", help="images (.npz with arr_0, or a folder) or statistics (.npz with mu, sigma)")
    p.add_argument("second", nargs="?", help="the set to compare with (same forms), or 'shapes': 2000 held-out real "
                                             "images of the embedded dataset")
    p.add_argument("--inception", metavar="WEIGHTS",
                   help="local FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or "
                        "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (never downloaded)")
    p.add_argument("--preprocess", choices=["pytorch-fid", "torch-fidelity"], default="pytorch-fid",
                   help="resize/normalisation for Inception: pytorch-fid's, or torch-fidelity's TF1-style one "
                        "(closer to ADM's TensorFlow evaluator)")
    p.add_argument("--classifier", metavar="FILE", help="a small Shapes classifier file, or 'shapes' for the one "
                                                        "shipped with the package (16x16)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="default: cpu")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--save-stats", metavar="NPZ", help="write the first set's mu/sigma (pytorch-fid layout)")
    p.add_argument("--seed", type=int, default=0, help="seed of KID's subsets")
    p.add_argument("--out", help="also write the results as JSON")
    p.set_defaults(func=_run)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["eval", *sys.argv[1:]]))
