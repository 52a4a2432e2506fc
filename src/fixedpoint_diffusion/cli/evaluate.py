"""``fpdm eval``: FID (Inception features from a local weights file) or the small-classifier Fréchet distance and
KID (the embedded Shapes dataset) between two image sets (see :func:`fixedpoint_diffusion.evaluate`).

    fpdm eval samples.npz imagenet-ref.npz --inception pt_inception-2015-12-05-6726825d.pth
    fpdm eval real-folder/ --inception pt_inception-2015-12-05-6726825d.pth --save-stats ref-stats.npz
    fpdm eval samples/samples.npz shapes --classifier shapes   # embedded dataset: its reference, shipped classifier
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import fixedpoint_diffusion as fd

from .._files import write_text_atomic
from .._runtime import check_writable_folder
from ..errors import MissingInputError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="FID / small-classifier Fréchet distance and KID between two image sets",
        description="FID on Inception features from a local weights file, or the Fréchet distance and KID on a "
                    "small Shapes classifier's features, between two image sets. Each set is an .npz of images "
                    "(arr_0 uint8 NHWC, optional arr_1 labels: what fpdm sample writes and ADM's evaluator reads), a "
                    "folder of images, or an .npz of statistics (mu, sigma) written by --save-stats or pytorch-fid. "
                    "KID needs images on both sides.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n" + __doc__.split("\n\n")[1])
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out:  # before any compute
        parent = Path(args.out).resolve().parent
        if not parent.is_dir():
            raise MissingInputError(f"--out {args.out!r}: the folder {str(parent)!r} does not exist")
        check_writable_folder(parent, "--out")
    result = fd.evaluate(args.first, args.second, inception=args.inception, preprocess=args.preprocess,
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
        write_text_atomic(args.out, json.dumps({**result, "first": args.first, "second": args.second}, indent=1)
                          + "\n")
    return 0
