"""Fixed Point Diffusion Models (FPDM) on top of :mod:`fixedpoint`: DiT and FPDM networks (training, budgeted
sampling and evaluation come in later releases)."""

from .checkpoints import load_official_checkpoint
from .diffusion import Diffusion, Loss
from .models import FPDM, PRESETS, Cost, DiT, ModelOutput, create_model

__version__ = "0.1.0"

__all__ = [
           "FPDM",
           "PRESETS",
           "Cost",
           "DiT",
           "Diffusion",
           "Loss",
           "ModelOutput",
           "create_model",
           "load_official_checkpoint",
]
