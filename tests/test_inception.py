"""FID Inception-v3 (fixedpoint_diffusion.inception): weights-file formats, preprocessing, features, errors.

No real weights file is available offline, so the files here hold random weights in the published key format; the
key names and shapes are also checked against a hard-coded sample of the real file's entries.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixedpoint_diffusion.inception import (
    FID_INPUT_SIZE,
    InceptionV3Features,
    inception_features,
    load_inception,
    normalise_state_dict,
    resize_bilinear_tf1,
)

PT_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
FIDELITY_NAME = "weights-inception-2015-12-05-6726825d.pth"

# Entries of the published file (same key names in pytorch-fid's and torch-fidelity's), from the layer definitions of
# torchvision/models/inception.py, pytorch-fid's fid_inception_v3 (num_classes=1008, aux_logits=False) and the
# TF-name -> PyTorch-name table of torch-fidelity's utils/util_convert_inception_weights.py. Conv weights are
# (out, in, kh, kw).
REAL_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.weight": (32,),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_2a_3x3.conv.weight": (32, 32, 3, 3),
    "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3),
    "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
    "Mixed_5d.branch3x3dbl_3.bn.running_mean": (96,),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_6b.branch7x7dbl_2.conv.weight": (128, 128, 7, 1),
    "Mixed_6c.branch7x7_1.conv.weight": (160, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
    "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
    "Mixed_7c.branch3x3dbl_3a.conv.weight": (384, 384, 1, 3),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.bias": (192,),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
N_CONVS = 94  # conv+BN units in Inception-v3 without the auxiliary head
N_ENTRIES_WITH_COUNTERS = 566  # as reported for the released file: 94 x (conv + 4 BN tensors + counter) + fc (2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A full Inception-v3 forward is ~300 ops; with two intra-op threads on a loaded 2-core machine each op waits on
    the other thread (5 s per image instead of 0.25 s). Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_weights(seed: int) -> dict[str, torch.Tensor]:
    """Random weights, in the key format of InceptionV3Features (== the files), that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in InceptionV3Features().state_dict().items():
        if key.endswith("conv.weight"):
            value = torch.randn(ref.shape, generator=g) * math.sqrt(2.0 / ref[0].numel())
        elif key.endswith(("bn.weight", "bn.running_var")):
            value = 0.8 + 0.4 * torch.rand(ref.shape, generator=g)
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(0, dtype=torch.long)
        elif key.startswith("fc."):
            value = 0.01 * torch.randn(ref.shape, generator=g)
        else:  # bn.bias, bn.running_mean
            value = 0.05 * torch.randn(ref.shape, generator=g)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """The two files as they are written: a model.state_dict() (OrderedDict, BN counters: pytorch-fid's release,
    re-hosted by torch-fidelity) and a plain dict without BN counters (torch-fidelity's converter script)."""
    folder = tmp_path_factory.mktemp("inception")
    model = InceptionV3Features()
    model.load_state_dict(_random_weights(seed=1))
    full = folder / PT_FID_NAME
    torch.save(model.state_dict(), full)
    converter = folder / FIDELITY_NAME
    torch.save({k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")},
               converter)
    return full, converter


@pytest.fixture(scope="module")
def model(weights_files):
    return load_inception(weights_files[0])


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


# -------------------------------------------------------------------------------------------------- key format


def test_keys_and_shapes_match_the_published_file():
    state = InceptionV3Features().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for key, shape in REAL_SHAPES.items():
        assert shapes.get(key) == shape, key
    assert len(state) == N_ENTRIES_WITH_COUNTERS
    assert sum(k.endswith(".conv.weight") for k in state) == N_CONVS
    assert not any(k.startswith("AuxLogits") for k in state)
    pattern = re.compile(r"^(Conv2d_\w+|Mixed_\d[a-e]\.branch\w+)\.(conv\.weight|bn\.(weight|bias|running_mean|"
                         r"running_var|num_batches_tracked))$|^fc\.(weight|bias)$")
    assert all(pattern.match(k) for k in state), [k for k in state if not pattern.match(k)]
    # Only the BatchNorm counters are optional.
    assert len(normalise_state_dict({k: v for k, v in state.items() if "num_batches" not in k})) == len(state)


def test_both_file_formats_load_strictly_into_eval_mode_without_gradients(weights_files, model):
    converter = load_inception(weights_files[1], device="cpu", preprocess="torch-fidelity")
    for m in (model, converter):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())
    assert (model.preprocess, converter.preprocess) == ("pytorch-fid", "torch-fidelity")
    sa, sb = model.state_dict(), converter.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # Strict load straight into the module as well, with the BN counters and without.
    for path in weights_files:
        InceptionV3Features().load_state_dict(torch.load(path, weights_only=True), strict=True)
    # Same weights, different preprocessing: the features differ (the file cannot choose for the caller).
    image = _images(1, 32, 32, seed=5)
    with torch.inference_mode():
        fa, fb = model(image), converter(image)
    assert torch.isfinite(fb).all() and (fa - fb).abs().max() > 1e-4


# -------------------------------------------------------------------------------------------------- features


def test_features_shape_finite_deterministic_and_independent_of_batch(model):
    images = _images(2, 45, 64)
    with torch.inference_mode():
        batch = model(images)
        again = model(images)
        alone = model(images[1:])
    assert batch.shape == (2, 2048) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    assert batch.std() > 0.01 and (batch[0] - batch[1]).abs().max() > 1e-3  # neither dead nor constant
    assert torch.equal(batch, again)
    scale = batch.abs().max()
    torch.testing.assert_close(alone[0], batch[1], rtol=1e-5, atol=1e-5 * scale)


def test_inception_features_numpy_nhwc_equals_tensor_nchw_in_any_batch_size(model):
    images = _images(2, 40, 40, seed=3)
    nhwc = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
    nhwc.setflags(write=False)  # like a memory-mapped npz: must not trip torch.from_numpy's warning
    from_numpy = inception_features(model, nhwc, batch_size=1)
    from_tensor = inception_features(model, images, batch_size=50, device="cpu")
    assert from_numpy.dtype == np.float64 and from_numpy.shape == (2, 2048)
    np.testing.assert_allclose(from_numpy, from_tensor, rtol=1e-5, atol=1e-5 * np.abs(from_tensor).max())
    assert inception_features(model, nhwc[:0]).shape == (0, 2048)


# -------------------------------------------------------------------------------------------------- preprocessing


def test_pytorch_fid_preprocessing_is_torch_bilinear_then_minus_one_to_one():
    m = InceptionV3Features(preprocess="pytorch-fid")
    images = _images(2, 37, 50, seed=7)
    expected = 2 * F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(m.preprocess_images(images), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("how, expected", [("pytorch-fid", lambda x: 2 * (x / 255) - 1),
                                           ("torch-fidelity", lambda x: (x - 128) / 128)])
def test_a_299_input_is_not_resized(how, expected):
    images = _images(2, FID_INPUT_SIZE, FID_INPUT_SIZE, seed=8)
    out = InceptionV3Features(preprocess=how).preprocess_images(images)
    assert torch.equal(out, expected(images.float()))
    # ... which is what either resize would have done at scale 1.
    x = images.float()
    assert torch.equal(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False), x)


def test_torch_fidelity_preprocessing_is_tf1_resize_then_centred_on_128():
    m = InceptionV3Features(preprocess="torch-fidelity")
    images = _images(1, 32, 20, seed=9)
    out = m.preprocess_images(images)
    ref = (_tf1_resize_reference(images.double().numpy(), 299, 299) - 128) / 128
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5)


def _tf1_resize_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear, align_corners=False, no half-pixel centres, written out per output coordinate:
    source = dst * in / out (float32), neighbours floor(source) and the next one clamped to the edge."""

    def taps(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        lo, hi, t = [], [], []
        for i in range(n_out):
            src = np.float32(i) * scale
            lo.append(math.floor(src))
            hi.append(min(lo[-1] + 1, n_in - 1))
            t.append(float(src) - lo[-1])
        return np.array(lo), np.array(hi), np.array(t)

    y0, y1, ty = taps(x.shape[2], out_h)
    x0, x1, tx = taps(x.shape[3], out_w)
    ty = ty[:, None]
    top = x[:, :, y0][:, :, :, x0] * (1 - tx) + x[:, :, y0][:, :, :, x1] * tx
    bottom = x[:, :, y1][:, :, :, x0] * (1 - tx) + x[:, :, y1][:, :, :, x1] * tx
    return top * (1 - ty) + bottom * ty


def test_tf1_resize_hand_worked_example():
    row = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2)
    # TF1: sources 0, .5, 1, 1.5 (-> clamped neighbour) ; PyTorch: half-pixel sources -.25, .25, .75, 1.25.
    assert resize_bilinear_tf1(row, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    torch_half_pixel = F.interpolate(row, size=(1, 4), mode="bilinear", align_corners=False)
    assert torch_half_pixel.flatten().tolist() == [0.0, 2.5, 7.5, 10.0]
    # Downsampling picks every other pixel instead of averaging pairs.
    assert resize_bilinear_tf1(torch.arange(4.0).view(1, 1, 1, 4), (1, 2)).flatten().tolist() == [0.0, 2.0]


def test_tf1_resize_matches_tensorflow_values():
    """TensorFlow outputs for resize_bilinear(align_corners=False), 2x3x2 (HWC) -> 4x5x2, as recorded in
    tensorflow/tfjs tfjs-core/src/ops/resize_bilinear_test.ts ('matches tensorflow w/ random numbers')."""
    hwc = torch.tensor([1.19074044, 0.91373104, 2.01611669, -0.52270832, 0.38725395, 1.30809779,
                        0.61835143, 3.49600659, 2.09230986, 0.56473997, 0.03823943, 1.19864896]).view(2, 3, 2)
    expected = torch.tensor([
        1.19074047, 0.91373104, 1.68596613, 0.05186744, 1.69034398, -0.15654698, 0.7130264, 0.94193673,
        0.38725394, 1.30809784, 0.9045459, 2.20486879, 1.59434628, 0.89455694, 1.68591988, 0.26748738,
        0.58103991, 1.00690198, 0.21274668, 1.25337338, 0.6183514, 3.49600649, 1.50272655, 1.73724651,
        1.68149579, 0.69152176, 0.44905344, 1.07186723, 0.03823943, 1.19864893, 0.6183514, 3.49600649,
        1.50272655, 1.73724651, 1.68149579, 0.69152176, 0.44905344, 1.07186723, 0.03823943, 1.19864893]).view(4, 5, 2)
    out = resize_bilinear_tf1(hwc.permute(2, 0, 1).unsqueeze(0), (4, 5))[0].permute(1, 2, 0)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_hw, out_hw", [((32, 32), (299, 299)), ((7, 5), (3, 11)), ((300, 301), (299, 299)),
                                           ((1, 4), (3, 2))])
def test_tf1_resize_matches_a_numpy_reference(in_hw, out_hw):
    x = torch.randn(2, 3, *in_hw, generator=torch.Generator().manual_seed(11)) * 100
    out = resize_bilinear_tf1(x, out_hw)
    assert out.shape == (2, 3, *out_hw) and out.dtype == x.dtype
    np.testing.assert_allclose(out.numpy(), _tf1_resize_reference(x.double().numpy(), *out_hw), rtol=0, atol=1e-4)
    assert resize_bilinear_tf1(x, in_hw) is x


# -------------------------------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere" / PT_FID_NAME
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_inception(path)


def test_wrong_keys_are_named(tmp_path):
    state = InceptionV3Features().state_dict()
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "torchvision_like.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        load_inception(path)
    message = str(info.value)
    for part in (str(path), "missing keys: Mixed_7c.branch_pool.conv.weight", "unexpected keys: AuxLogits.fc.weight",
                 "fc.weight (1000, 2048) (expected (1008, 2048))", "torchvision's ImageNet Inception-v3"):
        assert part in message, part


@pytest.mark.parametrize("content", [b"not a pickle", [torch.zeros(2)], {"state_dict": {"a": torch.zeros(1)}}])
def test_files_that_are_not_a_state_dict_are_named(tmp_path, content):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_inception(path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="preprocess"):
        InceptionV3Features(preprocess="tensorflow")
    m = InceptionV3Features()
    with pytest.raises(TypeError, match="uint8"):
        m.preprocess_images(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m.preprocess_images(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        inception_features(m, np.zeros((1, 3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="floating-point"):
        resize_bilinear_tf1(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), (3, 3))
