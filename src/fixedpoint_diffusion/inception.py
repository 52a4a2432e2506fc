"""Inception-v3 pool3 features for FID, computed offline from a weights file already on disk.

Nothing here downloads anything: the caller names the weights file. (Over the project's ~400-line guide: one
network definition and its weight-file conversion, which read best together.)

What is reproduced
------------------
The "FID Inception": the network in TensorFlow's ``inception-2015-12-05`` graph (``classify_image_graph_def.pb``),
which the original FID code (TTUR) and ADM's evaluator run, as ported to PyTorch by pytorch-fid. Its layout is
torchvision's Inception-v3 (without the auxiliary classifier) with these differences, all reproduced here:

* the 3x3 stride-1 average pools that feed ``branch_pool`` in Mixed_5b/5c/5d, Mixed_6b-6e and Mixed_7b leave the zero
  padding out of the average (TensorFlow's behaviour; ``count_include_pad=False``);
* Mixed_7c's pool branch uses a 3x3 stride-1 *max* pool instead;
* the classifier has 1008 outputs (``fc``: 2048 -> 1008). It is loaded, so that the file loads strictly, but unused.

Every convolution has no bias and is followed by BatchNorm (eps = 1e-3) and ReLU. The 2048-d features are the global
average of Mixed_7c's 8x8 output (TensorFlow's ``pool_3``), returned in float32.

Weights files
-------------
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
use the same key names (torchvision's: ``Conv2d_1a_3x3.conv.weight`` ... ``Mixed_7c.branch_pool.bn.running_var``,
``fc.weight``, ``fc.bias``); torch-fidelity re-hosts pytorch-fid's checkpoint, and the two published files are
reported to have the same SHA-256 (``6726825d0af5...``). So the file cannot tell which preprocessing is wanted:
choose it with ``preprocess``. The one key-level variation in circulation is whether each BatchNorm carries a
``num_batches_tracked`` counter (a ``model.state_dict()`` has them; torch-fidelity's converter script writes none);
:func:`normalise_state_dict` accepts both.

Preprocessing (``preprocess=``)
-------------------------------
Input is always uint8 RGB, (N, 3, H, W), values 0..255, any H and W.

``"pytorch-fid"``
    ``x / 255`` in float32, bilinear resize to 299x299 with ``F.interpolate(mode="bilinear", align_corners=False)``
    (half-pixel centres, no antialiasing), then ``2 * x - 1``.
``"torch-fidelity"``
    float32 in 0..255, TensorFlow 1.x ``ResizeBilinear(align_corners=False)`` to 299x299 (no half-pixel centres:
    source coordinate ``dst * in / out``; :func:`resize_bilinear_tf1`), then ``(x - 128) / 128``. torch-fidelity
    implements these as the ops the TF graph applies after its ``ExpandDims`` input, which is where ADM's evaluator
    feeds its (float, 0..255) images; so this is the choice closer to ADM's numbers.

A 299x299 input is not resized under either (both resizes are the identity at scale 1).

What is not reproduced
----------------------
* TensorFlow's own convolution/BatchNorm numerics: ADM's evaluator runs the TF graph, so FID from these features
  differs slightly from ADM's numbers (pytorch-fid reports 0.08 absolute on one LSUN test, put down to
  interpolation and library backends; torch-fidelity reports ~1e-4 relative error on pool3 features with the TF-style resize).
* sFID (ADM's ``mixed_6/conv`` spatial features), Inception Score logits, precision/recall.
* Antialiasing when downsampling large images: neither reference does it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidValueError, MissingInputError

__all__ = [
    "FID_INPUT_SIZE",
    "PREPROCESSING",
    "InceptionV3Features",
    "inception_features",
    "load_inception",
    "normalise_state_dict",
    "resize_bilinear_tf1",
]

FID_INPUT_SIZE = 299
PREPROCESSING = ("pytorch-fid", "torch-fidelity")
_NUM_CLASSES = 1008  # the 2015-12-05 graph's softmax has 1008 outputs (1000 ImageNet classes and 8 unused)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class _ConvBN(nn.Module):
    """Bias-free convolution, BatchNorm (eps 1e-3) and ReLU; state-dict keys ``conv.weight`` and ``bn.*``."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _run(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 'same' average pool that, like TensorFlow's, divides by the number of real (unpadded) inputs."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _max_pool_reduce(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


class _Mixed35(nn.Module):
    """Mixed_5b/5c/5d (35x35 grid). Output channels 64 + 64 + 96 + ``pool_channels``."""

    def __init__(self, cin: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            _run(x, self.branch5x5_1, self.branch5x5_2),
            _run(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            self.branch_pool(_avg_pool_tf(x)),
        ], dim=1)


class _Reduce35to17(nn.Module):
    """Mixed_6a: 35x35x288 -> 17x17x768."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            _run(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
            _max_pool_reduce(x),
        ], dim=1)


class _Mixed17(nn.Module):
    """Mixed_6b-6e (17x17 grid, factorised 7x7 convolutions with ``mid`` channels). Output 4 x 192 channels."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 convolution
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, mid, 1)
        self.branch7x7_2 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7_3 = _ConvBN(mid, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_3 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7dbl_4 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_5 = _ConvBN(mid, 192, row[0], padding=row[1])
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            _run(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _run(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5),
            self.branch_pool(_avg_pool_tf(x)),
        ], dim=1)


class _Reduce17to8(nn.Module):
    """Mixed_7a: 17x17x768 -> 8x8x1280."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            _run(x, self.branch3x3_1, self.branch3x3_2),
            _run(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            _max_pool_reduce(x),
        ], dim=1)


class _Mixed8(nn.Module):
    """Mixed_7b/7c (8x8 grid, split 1x3/3x1 branches). Output 320 + 768 + 768 + 192 = 2048 channels.

    ``max_pool=True`` is Mixed_7c of the FID graph, whose pool branch max-pools where every other block averages.
    """

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = _run(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = _max_pool_same(x) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Resizing and preprocessing
# ----------------------------------------------------------------------------------------------------------------


def _tf1_axis(n_in: int, n_out: int, device: torch.device):
    """Source indices and weights along one axis for TF1 bilinear resizing (align_corners=False, no half-pixel).

    TensorFlow computes, in float32, ``scale = in / out`` and ``src = dst * scale``; it reads ``floor(src)`` and the
    next pixel (clamped to the last one) and weights the latter by ``src - floor(src)``.
    """
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = torch.arange(n_out, dtype=torch.float32) * scale
    base = torch.floor(src)
    frac = src - base
    lo = base.long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo.to(device), hi.to(device), frac.to(device)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a float (N, C, H, W) tensor as TensorFlow 1.x ``tf.image.resize_bilinear`` does it with
    ``align_corners=False`` (and no half-pixel centres).

    Output pixel ``i`` samples the input at ``i * in / out`` (PyTorch's ``align_corners=False`` samples at
    ``(i + 0.5) * in / out - 0.5`` instead). Interpolation is along the width first, then the height, each as
    ``a + (b - a) * t``, in the input's dtype; the coordinates are float32 as in TensorFlow.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise InvalidValueError(f"resize_bilinear_tf1 expects a floating-point (N, C, H, W) tensor, got {x.dtype} "
                                f"of shape {tuple(x.shape)}")
    out_h, out_w = (int(s) for s in size)
    in_h, in_w = x.shape[-2:]
    if (out_h, out_w) == (in_h, in_w):
        return x
    y0, y1, ty = _tf1_axis(in_h, out_h, x.device)
    x0, x1, tx = _tf1_axis(in_w, out_w, x.device)
    tx = tx.to(x.dtype)
    ty = ty.to(x.dtype).view(-1, 1)
    top, bottom = x.index_select(2, y0), x.index_select(2, y1)
    top = top.index_select(3, x0) + (top.index_select(3, x1) - top.index_select(3, x0)) * tx
    bottom = bottom.index_select(3, x0) + (bottom.index_select(3, x1) - bottom.index_select(3, x0)) * tx
    return top + (bottom - top) * ty


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of uint8 images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images with values 0..255, got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise InvalidValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")


def _preprocess(images: torch.Tensor, how: str) -> torch.Tensor:
    size = (FID_INPUT_SIZE, FID_INPUT_SIZE)
    resize = tuple(images.shape[-2:]) != size
    if how == "pytorch-fid":
        x = images.to(torch.float32) / 255
        if resize:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return 2 * x - 1
    x = images.to(torch.float32)
    if resize:
        x = resize_bilinear_tf1(x, size)
    return (x - 128) / 128


# ----------------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------------


class InceptionV3Features(nn.Module):
    """The FID Inception-v3, mapping uint8 images to 2048-d pool3 features.

    Its state-dict keys are those of the pytorch-fid and torch-fidelity weights files (torchvision's names), so
    ``load_state_dict`` takes either file's contents strictly; see :func:`normalise_state_dict`.

    ``preprocess`` picks how uint8 images become network input (see the module docstring); it can be changed after
    loading, since the weights are the same for both.
    """

    def __init__(self, preprocess: str = "pytorch-fid") -> None:
        super().__init__()
        self.preprocess = preprocess
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _Mixed35(192, pool_channels=32)
        self.Mixed_5c = _Mixed35(256, pool_channels=64)
        self.Mixed_5d = _Mixed35(288, pool_channels=64)
        self.Mixed_6a = _Reduce35to17(288)
        self.Mixed_6b = _Mixed17(768, mid=128)
        self.Mixed_6c = _Mixed17(768, mid=160)
        self.Mixed_6d = _Mixed17(768, mid=160)
        self.Mixed_6e = _Mixed17(768, mid=192)
        self.Mixed_7a = _Reduce17to8(768)
        self.Mixed_7b = _Mixed8(1280, max_pool=False)
        self.Mixed_7c = _Mixed8(2048, max_pool=True)
        self.fc = nn.Linear(2048, _NUM_CLASSES)

    @property
    def preprocess(self) -> str:
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: str) -> None:
        if value not in PREPROCESSING:
            raise InvalidValueError(f"preprocess must be one of {PREPROCESSING}, got {value!r}")
        self._preprocess = value

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) network input, per ``self.preprocess``."""
        _check_images(images)
        return _preprocess(images, self.preprocess)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed float input (N, 3, 299, 299) -> (N, 2048) pool3 features."""
        x = _run(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = _max_pool_reduce(x)                                   # 147 -> 73
        x = _run(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = _max_pool_reduce(x)                                   # 71 -> 35
        x = _run(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                 self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                 self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)      # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W), values 0..255, any H and W -> float32 (N, 2048) pool3 features."""
        param = self.fc.weight
        x = self.preprocess_images(images.to(param.device))
        return self.pool3(x.to(param.dtype)).to(torch.float32)

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after :func:`normalise_state_dict` (BatchNorm counters optional)."""
        return super().load_state_dict(normalise_state_dict(state_dict), strict=strict, assign=assign)


def normalise_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The one key mapping between the weights files in circulation and :class:`InceptionV3Features`.

    * pytorch-fid's file and torch-fidelity's file: no renaming is needed. torch-fidelity's
      ``FeatureExtractorInceptionV3`` names its layers exactly as pytorch-fid (torchvision) does, and its extra
      modules (``MaxPool_1``, ``MaxPool_2``, ``AvgPool``) hold no parameters, so they add no keys.
    * ``<prefix>.bn.num_batches_tracked``: present in a ``model.state_dict()`` (such as the released file, reported to
      hold 566 entries = 94 BatchNorms x 5 + 94 counters + 2 fc), absent from the output of torch-fidelity's converter
      script (472 entries). Missing counters are added as 0; they are only used when training.

    Anything else passes through unchanged, so that a strict load reports it.
    """
    out = dict(state_dict.items())
    for key in list(out):
        if key.endswith(".bn.running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            out.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loading and batched extraction
# ----------------------------------------------------------------------------------------------------------------


def _mismatch_report(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {given[k]} (expected {expected[k]})" for k in expected if k in given and given[k] != expected[k]]
    if not (missing or unexpected or shapes):
        return None

    def some(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {some(unexpected)}")
    if shapes:
        parts.append(f"wrong shapes: {some(shapes)}")
    if any(k.startswith("AuxLogits.") for k in given):
        parts.append("this looks like torchvision's ImageNet Inception-v3, whose weights are not the FID network's")
    return "; ".join(parts)


def load_inception(path: str | os.PathLike, device: torch.device | str | None = None, *,
                   preprocess: str = "pytorch-fid") -> InceptionV3Features:
    """Load the FID Inception-v3 from a local weights file; never downloads.

    ``path`` is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` (or a state dict of the same keys, with or without BatchNorm
    ``num_batches_tracked``). ``preprocess`` is ``"pytorch-fid"`` or ``"torch-fidelity"``; the file cannot tell
    which is wanted (see the module docstring). Returns the model in eval mode without gradients, on ``device``
    (default: CPU).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"Inception weights file not found: {path} (give the path of pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
                                "weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InvalidValueError(f"{path}: cannot be read as a PyTorch state dict "
                                f"(torch.load(weights_only=True) failed: {err})") from err
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise InvalidValueError(f"{path}: expected a state dict (a mapping of parameter names to tensors), got a "
                                f"{type(state_dict).__name__} that is not one")
    state_dict = normalise_state_dict(state_dict)
    model = InceptionV3Features(preprocess=preprocess)
    problem = _mismatch_report(model, state_dict)
    if problem is not None:
        raise InvalidValueError(f"{path}: not an FID Inception-v3 state dict (neither pytorch-fid's nor "
                                f"torch-fidelity's format): {problem}")
    model.load_state_dict(state_dict)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def inception_features(model: nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 50,
                       device: torch.device | str | None = None) -> np.ndarray:
    """Pool3 features of ``images`` as a float64 (N, 2048) array.

    ``images`` is uint8: a numpy array in NHWC layout (the ADM ``.npz`` convention, ``arr_0``; memory-mapped arrays
    work and are read one batch at a time) or a torch tensor in NCHW layout, of any height and width. Batches of
    ``batch_size`` go through ``model`` under ``torch.inference_mode()`` on ``device`` (default: the model's
    device; the model is moved there). A model in training mode is put in eval mode for the call and restored.
    """
    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidValueError(f"expected a uint8 numpy array of shape (N, H, W, 3), got {images.dtype} "
                                    f"{images.shape}")
    elif isinstance(images, torch.Tensor):
        _check_images(images)
    else:
        raise TypeError(f"expected a numpy array (NHWC) or torch tensor (NCHW) of uint8 images, "
                        f"got {type(images).__name__}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    n = images.shape[0]
    out = np.empty((n, 2048), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = images[start:start + batch_size]
                if isinstance(chunk, np.ndarray):
                    # A copy: the slice of a memory-mapped or read-only array cannot back a tensor.
                    batch = torch.from_numpy(np.array(chunk, dtype=np.uint8, copy=True)).to(device)
                    batch = batch.permute(0, 3, 1, 2)
                else:
                    batch = chunk.to(device)
                feats = model(batch)
                out[start:start + len(chunk)] = feats.to(torch.float64).cpu().numpy()
    finally:
        model.train(was_training)
    return out
