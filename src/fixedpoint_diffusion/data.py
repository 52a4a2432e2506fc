"""Training data without network access: the embedded ``shapes`` dataset (generated, class-conditional), a folder
of images (pixel space), and precomputed VAE latents written by :func:`extract_latents`.

Every dataset returns ``(x, y)`` with ``x`` a float32 tensor (C, H, W) (images in [-1, 1]; latents already
multiplied by the VAE's scaling factor) and ``y`` an int64 class index, and implements ``__getitems__`` so that a
whole batch is fetched at once. Random augmentation (horizontal flips) is *not* done here but by the trainer, from
the step's seeded generator, so that runs are reproducible and independent of the number of processes and
workers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._runtime import check_writable_folder, default_device, seed_from
from .errors import InvalidValueError, MissingInputError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "LatentDataset", "Shapes", "extract_latents"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_MANIFEST = "manifest.json"


class Shapes(Dataset):
    """The embedded default dataset: anti-aliased RGB images of 4 shapes (disc, square, ring, cross) in a warm or
    a cool colour on a dark background, 8 classes (``class = 2 * shape + colour``), with random position, size,
    hue, saturation and brightness. Generated in memory from ``seed`` in well under a second; nothing is
    downloaded or stored.

    Args:
        num_samples: dataset size.
        image_size: side of the square images.
        seed: the same seed gives the same images.
    """

    classes = ("disc-warm", "disc-cool", "square-warm", "square-cool", "ring-warm", "ring-cool", "cross-warm",
               "cross-cool")
    num_classes = 8

    def __init__(self, num_samples: int = 8192, image_size: int = 16, seed: int = 0) -> None:
        if not (isinstance(num_samples, int) and num_samples >= 1):
            raise InvalidValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not (isinstance(image_size, int) and image_size >= 4):
            raise InvalidValueError(f"image_size must be an int >= 4, got {image_size!r}")
        g = torch.Generator().manual_seed(seed)
        n = num_samples
        labels = torch.randint(0, self.num_classes, (n,), generator=g)

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)

        cx, cy, r = uniform(-0.3, 0.3), uniform(-0.3, 0.3), uniform(0.35, 0.6)
        warm_hue, cool_hue = uniform(0.0, 0.14), uniform(0.5, 0.7)
        sat, val, bg = uniform(0.7, 1.0), uniform(0.75, 1.0), uniform(0.05, 0.25)
        axis = (torch.arange(image_size) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
        dy, dx = axis.view(1, -1, 1) - cy, axis.view(1, 1, -1) - cx  # (n, S, 1), (n, 1, S)
        dist = (dx**2 + dy**2).sqrt()  # (n, S, S)
        ax, ay = dx.abs(), dy.abs()
        signed = torch.stack([  # > 0 inside; one candidate per shape, picked by the label
            r - dist,
            0.8 * r - torch.maximum(ax, ay),
            torch.minimum(dist - 0.55 * r, r - dist),
            torch.maximum(torch.minimum(0.3 * r - ax, r - ay), torch.minimum(0.3 * r - ay, r - ax)),
        ], dim=1)  # (n, 4, S, S)
        shape = (labels // 2).view(n, 1, 1, 1).expand(n, 1, image_size, image_size)
        mask = torch.sigmoid(signed.gather(1, shape) * image_size * 1.5)  # (n, 1, S, S), soft edges
        hue = torch.where((labels % 2 == 0).view(n, 1, 1), warm_hue, cool_hue)
        colour = _hsv_to_rgb(hue, sat, val)  # (n, 3, 1, 1)
        images = bg.unsqueeze(1) * (1 - mask) + colour * mask  # (n, 3, S, S) in [0, 1]
        self.images = (images * 2 - 1).contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n, 1, 1) hue/saturation/value in [0, 1] -> (n, 3, 1, 1) RGB."""
    k = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (k + h.unsqueeze(1) * 6) % 6
    return v.unsqueeze(1) - v.unsqueeze(1) * s.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class names and sorted (relative path, class) pairs of an image folder."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"image folder {str(root)!r} does not exist or is not a folder")
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        classes = subdirs
        items = [(str(p.relative_to(root)), c) for c, name in enumerate(classes)
                 for p in sorted((root / name).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
    else:  # a flat folder: one class (unconditional data)
        classes = [root.name]
        items = [(p.name, 0) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not items:
        raise InvalidValueError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), neither "
                                f"directly nor in class sub-folders")
    return classes, items


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """An image file as a (3, S, S) float32 tensor in [-1, 1]: centre-cropped to a square, then resized with a
    bicubic filter (box-filtered first when shrinking a lot, as ADM does)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        while img.width >= 2 * image_size:
            img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


class ImageFolder(Dataset):
    """A folder of images, one sub-folder per class (sorted names give the class indices), or a flat folder of
    images (a single class). Images are centre-cropped and resized to ``image_size``; values in [-1, 1].

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no images.
    """

    def __init__(self, root: str | os.PathLike, image_size: int) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.classes, self.items = _scan_image_folder(root)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rel, label = self.items[index]
        return load_image(self.root / rel, self.image_size), torch.tensor(label)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self[i] for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class LatentDataset(Dataset):
    """Latents written by :func:`extract_latents`: reads ``manifest.json`` and memory-maps every shard (so a
    dataset larger than RAM works), after checking that all shards are there with the shapes the manifest says.

    Attributes:
        classes: the class names, in label order.
        num_classes: ``len(classes)``.
        latent_shape: ``(C, H, W)`` of one latent.
        scaling_factor, shift_factor: the VAE's, from its config (stored latents are
            ``(z - shift_factor) * scaling_factor``; ``shift_factor`` may be ``None``).
        vae: the VAE folder the latents were made with.

    Raises:
        FileNotFoundError: no folder or no manifest (not an ``extract-latents`` output).
        ValueError: a missing or truncated shard, or wrong latent shapes.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingInputError(f"latent folder {str(root)!r} does not exist or is not a folder")
        manifest_path = self.root / _MANIFEST
        if not manifest_path.is_file():
            raise MissingInputError(f"{str(manifest_path)!r} not found: {str(root)!r} is not a folder written by "
                                    f"`fpdm extract-latents`")
        meta = json.loads(manifest_path.read_text())
        self.meta = meta
        self.classes: list[str] = meta["classes"]
        self.num_classes = len(self.classes)
        self.latent_shape = tuple(meta["latent_shape"])
        self.scaling_factor, self.shift_factor = meta["scaling_factor"], meta.get("shift_factor")
        self.vae = meta.get("vae")
        self._latents, self._labels = [], []
        for shard in meta["shards"]:
            latents_path, labels_path = self.root / shard["latents"], self.root / shard["labels"]
            for path in (latents_path, labels_path):
                if not path.is_file():
                    raise InvalidValueError(f"latent folder {str(root)!r}: shard file {path.name!r} is missing (did "
                                            f"every rank of `fpdm extract-latents` finish?)")
            latents = np.load(latents_path, mmap_mode="r")
            labels = np.load(labels_path)
            if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
                raise InvalidValueError(f"latent folder {str(root)!r}: {latents_path.name} holds latents of shape "
                                        f"{tuple(latents.shape)}, expected "
                                        f"(N, {', '.join(map(str, self.latent_shape))})")
            if latents.shape[0] != shard["count"] or labels.shape != (shard["count"],):
                raise InvalidValueError(f"latent folder {str(root)!r}: {latents_path.name} holds {latents.shape[0]} "
                                        f"latents and {labels.shape[0]} labels, the manifest says {shard['count']}")
            self._latents.append(latents)
            self._labels.append(labels)
        self._offsets = np.cumsum([0] + [a.shape[0] for a in self._latents])
        if self._offsets[-1] == 0:
            raise InvalidValueError(f"latent folder {str(root)!r} holds no latents")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return shard, index - int(self._offsets[shard])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        shard, row = self._locate(int(index))
        x = torch.from_numpy(np.array(self._latents[shard][row], dtype=np.float32))
        return x, torch.tensor(int(self._labels[shard][row]))

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch with one sorted fancy-index read per shard (memory-mapped reads in file order)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} latents")
        shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
        x = np.empty((idx.size, *self.latent_shape), dtype=np.float32)
        y = np.empty(idx.size, dtype=np.int64)
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            rows = idx[where] - self._offsets[shard]
            order = np.argsort(rows, kind="stable")
            x[where[order]] = self._latents[shard][rows[order]]
            y[where[order]] = self._labels[shard][rows[order]]
        return torch.from_numpy(x), torch.from_numpy(y)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def check_vae_folder(vae: str | os.PathLike, subfolder: str | None = None, *, what: str = "vae") -> None:
    """Refuse (naming ``what``) a folder that holds no diffusers config at ``subfolder``, before anything loads."""
    config_file = Path(vae) / (subfolder or "") / "config.json"
    if not config_file.is_file():
        raise MissingInputError(f"{what} {str(vae)!r}: no config.json{' in ' + subfolder if subfolder else ''}; "
                                f"give a local AutoencoderKL folder (saved with save_pretrained)")
    try:
        json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidValueError(f"{what} {str(vae)!r}: {config_file} is not JSON ({err})") from None


def load_vae(vae: str | os.PathLike, *, subfolder: str | None = None, device: str | torch.device = "cpu",
             what: str = "vae") -> Any:
    """A diffusers ``AutoencoderKL`` from a local folder (``subfolder="vae"`` of a pipeline folder), in eval mode;
    never downloads."""
    from diffusers import AutoencoderKL

    check_vae_folder(vae, subfolder, what=what)
    try:
        model = AutoencoderKL.from_pretrained(Path(vae), subfolder=subfolder, local_files_only=True,
                                              low_cpu_mem_usage=False)
    except OSError as err:
        raise InvalidValueError(f"{what} {str(vae)!r}: cannot be loaded as an AutoencoderKL "
                                f"({str(err).splitlines()[0]})") from None
    return model.to(device).eval()


@torch.no_grad()
def extract_latents(images: str | os.PathLike, vae: str | os.PathLike, out: str | os.PathLike, *,
                    image_size: int = 256, batch_size: int = 32, flip: bool = False, posterior: str = "sample",
                    seed: int = 0, dtype: str = "float32", device: str | torch.device | None = None,
                    vae_subfolder: str | None = None, rank: int | None = None, world_size: int | None = None,
                    progress: bool = True) -> Path:
    """Encode an image folder into VAE latents for training (``data.kind = "latents"``).

    The images are listed in sorted order (class sub-folders, then files); process ``rank`` of ``world_size``
    (by default from torchrun's ``RANK``/``WORLD_SIZE``) encodes every ``world_size``-th of them and writes its own
    shard, and rank 0 writes ``manifest.json``, so ``torchrun --nproc_per_node=8 -m fixedpoint_diffusion
    extract-latents ...`` splits the work without any communication. The VAE is diffusers' ``AutoencoderKL`` read
    from a local folder (``vae``, optionally ``vae_subfolder="vae"`` of a pipeline folder); latents are
    ``(z - shift_factor) * scaling_factor`` with both factors from its config.

    Args:
        images: image folder (class sub-folders, or flat for one class).
        vae: local ``AutoencoderKL`` folder (e.g. ``stabilityai/sd-vae-ft-ema`` downloaded beforehand).
        out: output folder.
        image_size: centre crop and resize to this side (256 -> 32x32x4 latents with the SD VAE).
        batch_size: images per VAE call.
        flip: also store the latents of the horizontally flipped images (doubles the dataset).
        posterior: ``"sample"`` (one draw of the VAE posterior per image, seeded by ``seed`` and the image's
            index, so it does not depend on the number of ranks) or ``"mean"``.
        dtype: ``"float32"`` or ``"float16"`` storage.

    Returns:
        The output folder.
    """
    from tqdm.auto import tqdm

    if posterior not in ("sample", "mean"):
        raise InvalidValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
    if dtype not in ("float32", "float16"):
        raise InvalidValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise InvalidValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(image_size, int) and image_size >= 8 and image_size % 8 == 0):
        raise InvalidValueError(f"image_size must be a multiple of 8 (the VAE downsamples by 8), got {image_size!r}")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise InvalidValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    classes, items = _scan_image_folder(images)  # errors on a missing/empty folder before the VAE is loaded
    check_vae_folder(vae, vae_subfolder)
    device = default_device(device)
    check_writable_folder(out, "out")
    model = load_vae(vae, subfolder=vae_subfolder, device=device)
    scaling = float(model.config.scaling_factor)
    shift = getattr(model.config, "shift_factor", None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(items), world_size))
    latent_side = image_size // (2 ** (len(model.config.block_out_channels) - 1))
    latent_shape = [model.config.latent_channels, latent_side, latent_side]
    variants = (False, True) if flip else (False,)
    shards = []
    for r in range(world_size):
        count = len(range(r, len(items), world_size)) * len(variants)
        shards.append({"latents": f"latents-{r:05d}-of-{world_size:05d}.npy",
                       "labels": f"labels-{r:05d}-of-{world_size:05d}.npy",
                       "index": f"index-{r:05d}-of-{world_size:05d}.npy", "count": count})
    if rank == 0:
        manifest: dict[str, Any] = {
            "format": 1, "classes": classes, "files": [rel for rel, _ in items], "image_size": image_size,
            "latent_shape": latent_shape, "scaling_factor": scaling, "shift_factor": shift, "vae": str(Path(vae)),
            "vae_subfolder": vae_subfolder, "flip": flip, "posterior": posterior, "seed": seed, "dtype": dtype,
            "world_size": world_size, "shards": shards}
        tmp = out / (_MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / _MANIFEST)
    np_dtype = np.float32 if dtype == "float32" else np.float16
    latents_out = np.empty([len(mine) * len(variants), *latent_shape], dtype=np_dtype)
    labels_out = np.empty(len(mine) * len(variants), dtype=np.int64)
    index_out = np.empty(len(mine) * len(variants), dtype=np.int64)  # global image index, negative = flipped
    row = 0
    root = Path(images)
    bar = tqdm(total=math.ceil(len(mine) / batch_size), desc=f"encode (rank {rank})", disable=not progress)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        x = torch.stack([load_image(root / items[i][0], image_size) for i in chunk]).to(device)
        for flipped in variants:
            xs = x.flip(-1) if flipped else x
            dist = model.encode(xs.to(model.dtype)).latent_dist
            z = dist.mean
            if posterior == "sample":
                noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(
                    seed_from(seed, 5, i, int(flipped)))) for i in chunk]).to(device, z.dtype)
                z = z + dist.std * noise
            z = (z - (shift or 0.0)) * scaling
            n = len(chunk)
            latents_out[row:row + n] = z.float().cpu().numpy().astype(np_dtype)
            labels_out[row:row + n] = [items[i][1] for i in chunk]
            index_out[row:row + n] = [-(i + 1) if flipped else i for i in chunk]
            row += n
        bar.update(1)
    bar.close()
    shard = shards[rank]
    _save_npy_atomic(out / shard["latents"], latents_out)
    _save_npy_atomic(out / shard["labels"], labels_out)
    _save_npy_atomic(out / shard["index"], index_out)
    return out
