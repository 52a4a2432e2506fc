"""``fpdm extract-latents``: encode an image folder into VAE latents for training."""

from __future__ import annotations

import argparse
from typing import Any

import fixedpoint_diffusion as fd


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "extract-latents", help="encode an image folder into VAE latents for training",
        description="Encode images (class sub-folders) with a local diffusers AutoencoderKL. Under torchrun each "
                    "process encodes its share and writes its own shard.")
    p.add_argument("--images", required=True, help="image folder (one sub-folder per class, or flat)")
    p.add_argument("--vae", required=True, help="local AutoencoderKL folder, e.g. a download of "
                                                "stabilityai/sd-vae-ft-ema")
    p.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' for a pipeline folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--flip", action="store_true", help="also store horizontally flipped images' latents")
    p.add_argument("--posterior", choices=["sample", "mean"], default="sample")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = fd.extract_latents(args.images, args.vae, args.out, image_size=args.image_size,
                             batch_size=args.batch_size, flip=args.flip, posterior=args.posterior, seed=args.seed,
                             dtype=args.dtype, device=args.device, vae_subfolder=args.vae_subfolder,
                             progress=not args.no_progress)
    print(f"latents written to {out}")
    return 0
