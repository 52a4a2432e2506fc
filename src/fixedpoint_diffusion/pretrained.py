"""The trained models shipped with the package: an FPDM and a DiT of the same width trained on the embedded
Shapes dataset for equal training compute (``shapes-fpdm``, ``shapes-dit``), and the small Shapes classifier
that scores samples in place of Inception (``shapes-classifier``).

Each model is a diffusers ``save_pretrained`` folder (``config.json``, ``diffusion_pytorch_model.safetensors``)
with ``diffusion.json`` (the schedule it was trained with) and ``provenance.json`` (the command that trained it,
seed, steps, training multiply-accumulates, device, wall time, date, and its measured quality)::

    from fixedpoint_diffusion import pretrained, sample
    model, diffusion = pretrained.load("shapes-fpdm")
    images = sample(model, [0, 1, 2, 3], diffusion=diffusion, budget=48, iterations_per_timestep=2, sampler="ddim")

The command line takes the same folders: ``fpdm sample --model $(python -c "from fixedpoint_diffusion import
pretrained; print(pretrained.path('shapes-fpdm'))") ...``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .classifier import ShapesClassifier
from .diffusion import Diffusion
from .errors import InvalidValueError, MissingInputError
from .models import FPDM, DiT
from .runs import load_model

__all__ = ["MODELS", "classifier", "load", "path", "provenance"]

#: The shipped models, by name.
MODELS = ("shapes-fpdm", "shapes-dit")


def path(name: str) -> Path:
    """The folder of a shipped model (``"shapes-fpdm"``, ``"shapes-dit"``) or of ``"shapes-classifier"``."""
    if name not in (*MODELS, "shapes-classifier"):
        raise InvalidValueError(f"name must be one of {[*MODELS, 'shapes-classifier']}, got {name!r}")
    folder = Path(str(resources.files("fixedpoint_diffusion") / "pretrained" / name))
    if not folder.is_dir():
        raise MissingInputError(f"the shipped model {name!r} is missing from this installation ({folder}); "
                                f"reinstall the package")
    return folder


def load(name: str, *, device: torch.device | str = "cpu") -> tuple[DiT | FPDM, Diffusion]:
    """A shipped model in eval mode and the :class:`~fixedpoint_diffusion.Diffusion` it was trained with."""
    if name not in MODELS:
        raise InvalidValueError(f"name must be one of {list(MODELS)}, got {name!r}")
    return load_model(path(name), device=device)


def provenance(name: str) -> dict[str, Any]:
    """How a shipped model (or the classifier) was made: command, seed, steps, training MACs, device, wall time,
    date and measured quality."""
    return json.loads((path(name) / "provenance.json").read_text())


def classifier(device: torch.device | str = "cpu") -> ShapesClassifier:
    """The shipped :class:`~fixedpoint_diffusion.classifier.ShapesClassifier` (16x16 Shapes, eval mode)."""
    return ShapesClassifier.load(path("shapes-classifier") / "classifier.pt", device)
