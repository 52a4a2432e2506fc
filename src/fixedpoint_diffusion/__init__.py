"""Fixed Point Diffusion Models (FPDM) on top of :mod:`fixedpoint`: DiT and FPDM networks, the paper's diffusion
objective, training (one process or many under ``torchrun``) and its data tools, budgeted sampling."""

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use instead, so that `fpdm --help` starts without loading torch
    from .checkpoints import load_official_checkpoint
    from .config import Config, ConfigError, DataConfig, DiffusionConfig, TrainConfig, list_configs, load_config
    from .data import ImageFolder, LatentDataset, Shapes, extract_latents
    from .diffusion import Diffusion, Loss
    from .models import FPDM, PRESETS, Cost, DiT, ModelOutput, create_model
    from .pipeline import FPDMPipeline, FPDMPipelineOutput, diffusion_from_scheduler, scheduler_from_diffusion
    from .budget import Schedule, plan
    from .sampling import Denoiser, SampleOutput, batches_for_rank, plot_residuals, sample
    from .train import Trainer, TrainState, TrainSummary, latest_checkpoint, train

__version__ = "0.1.0"

__all__ = [
    "FPDM",
    "PRESETS",
    "Config",
    "ConfigError",
    "Cost",
    "DataConfig",
    "Denoiser",
    "DiT",
    "Diffusion",
    "DiffusionConfig",
    "FPDMPipeline",
    "FPDMPipelineOutput",
    "ImageFolder",
    "LatentDataset",
    "Loss",
    "ModelOutput",
    "SampleOutput",
    "Schedule",
    "Shapes",
    "TrainConfig",
    "TrainState",
    "TrainSummary",
    "Trainer",
    "batches_for_rank",
    "create_model",
    "diffusion_from_scheduler",
    "extract_latents",
    "latest_checkpoint",
    "list_configs",
    "load_config",
    "load_official_checkpoint",
    "plan",
    "plot_residuals",
    "sample",
    "scheduler_from_diffusion",
    "train",
]


# name -> the module that defines it
_LAZY = {
    'Config': 'config',
    'ConfigError': 'config',
    'Cost': 'models',
    'DataConfig': 'config',
    'Denoiser': 'sampling',
    'DiT': 'models',
    'Diffusion': 'diffusion',
    'DiffusionConfig': 'config',
    'FPDM': 'models',
    'FPDMPipeline': 'pipeline',
    'FPDMPipelineOutput': 'pipeline',
    'ImageFolder': 'data',
    'LatentDataset': 'data',
    'Loss': 'diffusion',
    'ModelOutput': 'models',
    'PRESETS': 'models',
    'SampleOutput': 'sampling',
    'Schedule': 'budget',
    'Shapes': 'data',
    'TrainConfig': 'config',
    'TrainState': 'train',
    'TrainSummary': 'train',
    'Trainer': 'train',
    'batches_for_rank': 'sampling',
    'create_model': 'models',
    'diffusion_from_scheduler': 'pipeline',
    'extract_latents': 'data',
    'latest_checkpoint': 'train',
    'list_configs': 'config',
    'load_config': 'config',
    'load_official_checkpoint': 'checkpoints',
    'plan': 'budget',
    'plot_residuals': 'sampling',
    'sample': 'sampling',
    'scheduler_from_diffusion': 'pipeline',
    'train': 'train',
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """Importing a submodule binds it on the package; ``train`` names both a submodule and the function it
    defines, and the package attribute must stay the function (as it was when everything was imported eagerly)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
