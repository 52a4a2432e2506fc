import json

import numpy as np
import pytest
import torch
from PIL import Image

import fixedpoint_diffusion as fd
from fixedpoint_diffusion.data import load_image


def test_shapes_is_deterministic_and_class_dependent():
    a, b = fd.Shapes(512, 16, seed=3), fd.Shapes(512, 16, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, fd.Shapes(512, 16, seed=4).images)
    assert a.images.shape == (512, 3, 16, 16) and a.images.dtype == torch.float32
    assert a.images.min() >= -1 and a.images.max() <= 1
    counts = torch.bincount(a.labels, minlength=8)
    assert counts.min() > 30  # all 8 classes present, roughly balanced
    # Colour family: warm classes (even) are redder than blue, cool classes (odd) bluer than red.
    red_minus_blue = (a.images[:, 0] - a.images[:, 2]).flatten(1).sum(1)
    assert (red_minus_blue[a.labels % 2 == 0] > 0).all() and (red_minus_blue[a.labels % 2 == 1] < 0).all()
    x, y = a.__getitems__(list(range(512)))
    assert torch.equal(x, a.images) and torch.equal(y, a.labels)


def _write_images(root, per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_image_folder(tmp_path):
    _write_images(tmp_path / "imgs")
    ds = fd.ImageFolder(tmp_path / "imgs", 16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and int(y) == 1 and -1 <= x.min() and x.max() <= 1
    xs, ys = ds.__getitems__([0, 5])
    assert torch.equal(xs[1], ds[5][0]) and ys.tolist() == [0, 1]
    # Independent route: PIL centre crop + resize of the same file.
    img = Image.open(tmp_path / "imgs" / "dog" / "1.png").convert("RGB").crop((5, 0, 35, 30))
    ref = torch.from_numpy(np.asarray(img.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32))
    assert torch.allclose(ds[4][0], ref.permute(2, 0, 1) / 127.5 - 1)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fd.ImageFolder(tmp_path / "nope", 16)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        fd.ImageFolder(tmp_path / "empty", 16)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path, vae.eval()


def test_extract_latents_matches_the_vae_and_is_shard_independent(tmp_path, tiny_vae):
    vae_path, vae = tiny_vae
    _write_images(tmp_path / "imgs", per_class=3)
    out = fd.extract_latents(tmp_path / "imgs", vae_path, tmp_path / "mean", image_size=16, batch_size=4,
                             posterior="mean", progress=False)
    ds = fd.LatentDataset(out)
    assert len(ds) == 6 and ds.latent_shape == (4, 8, 8) and ds.classes == ["cat", "dog"]
    assert ds.scaling_factor == 0.5
    x = torch.stack([load_image(tmp_path / "imgs" / f"{c}/{i}.png", 16) for c in ("cat", "dog") for i in range(3)])
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean * 0.5
    got, labels = ds.__getitems__(list(range(6)))
    assert torch.allclose(got, ref, atol=1e-5) and labels.tolist() == [0, 0, 0, 1, 1, 1]

    # Posterior samples with flips: two ranks write the same latents as one process.
    kw = {"image_size": 16, "batch_size": 2, "flip": True, "posterior": "sample", "seed": 7, "progress": False}
    fd.extract_latents(tmp_path / "imgs", vae_path, tmp_path / "one", **kw)
    for rank in (0, 1):
        fd.extract_latents(tmp_path / "imgs", vae_path, tmp_path / "two", rank=rank, world_size=2, **kw)

    def by_index(folder):
        meta = json.loads((folder / "manifest.json").read_text())
        lat = {}
        for shard in meta["shards"]:
            for i, z in zip(np.load(folder / shard["index"]), np.load(folder / shard["latents"])):
                lat[int(i)] = z
        return lat

    one, two = by_index(tmp_path / "one"), by_index(tmp_path / "two")
    assert sorted(one) == sorted(two) == sorted([*range(6), *range(-6, 0)])
    for key in one:
        assert np.allclose(one[key], two[key], atol=1e-6)
    assert not np.allclose(one[0], one[-1])  # the flipped image has other latents
    two = fd.LatentDataset(tmp_path / "two")
    assert len(two) == 12
    order = [11, 0, 5, 6, 3, 3, 10]  # across both shards, unsorted, with a repeat
    xs, ys = two.__getitems__(order)
    for k, i in enumerate(order):
        assert torch.equal(xs[k], two[i][0]) and ys[k] == two[i][1]


def test_latent_dataset_errors(tmp_path, tiny_vae):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fd.LatentDataset(tmp_path / "none")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not a folder written by"):
        fd.LatentDataset(tmp_path / "plain")
    _write_images(tmp_path / "imgs", per_class=2)
    out = fd.extract_latents(tmp_path / "imgs", tiny_vae[0], tmp_path / "lat", image_size=16, rank=0, world_size=2,
                             progress=False)
    with pytest.raises(ValueError, match="shard file .* is missing"):
        fd.LatentDataset(out)
    fd.extract_latents(tmp_path / "imgs", tiny_vae[0], out, image_size=16, rank=1, world_size=2, progress=False)
    assert len(fd.LatentDataset(out)) == 4
    shard = out / "latents-00001-of-00002.npy"
    np.save(shard, np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="expected"):
        fd.LatentDataset(out)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fd.extract_latents(tmp_path / "imgs", tmp_path / "plain", tmp_path / "x", image_size=16, progress=False)
    with pytest.raises(ValueError, match="multiple of 8"):
        fd.extract_latents(tmp_path / "imgs", tiny_vae[0], tmp_path / "x", image_size=12, progress=False)
