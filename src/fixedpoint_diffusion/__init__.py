"""Fixed Point Diffusion Models (FPDM) on top of :mod:`fixedpoint`: DiT and FPDM networks, the paper's diffusion
objective, training (one process or many under ``torchrun``) and its data tools."""

from .checkpoints import load_official_checkpoint
from .config import Config, ConfigError, DataConfig, DiffusionConfig, TrainConfig, list_configs, load_config
from .data import ImageFolder, LatentDataset, Shapes, extract_latents
from .diffusion import Diffusion, Loss
from .models import FPDM, PRESETS, Cost, DiT, ModelOutput, create_model
from .train import Trainer, TrainState, TrainSummary, latest_checkpoint, train

__version__ = "0.1.0"

__all__ = [
    "FPDM",
    "PRESETS",
    "Config",
    "ConfigError",
    "Cost",
    "DataConfig",
    "DiT",
    "Diffusion",
    "DiffusionConfig",
    "ImageFolder",
    "LatentDataset",
    "Loss",
    "ModelOutput",
    "Shapes",
    "TrainConfig",
    "TrainState",
    "TrainSummary",
    "Trainer",
    "create_model",
    "extract_latents",
    "latest_checkpoint",
    "list_configs",
    "load_config",
    "load_official_checkpoint",
    "train",
]
