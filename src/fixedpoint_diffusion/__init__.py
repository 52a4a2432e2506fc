"""Fixed Point Diffusion Models (FPDM) on top of :mod:`fixedpoint`: DiT and FPDM networks, the paper's diffusion
objective, training (one process or many under ``torchrun``) and its data tools, budgeted sampling."""

from .checkpoints import load_official_checkpoint
from .config import Config, ConfigError, DataConfig, DiffusionConfig, TrainConfig, list_configs, load_config
from .data import ImageFolder, LatentDataset, Shapes, extract_latents
from .diffusion import Diffusion, Loss
from .models import FPDM, PRESETS, Cost, DiT, ModelOutput, create_model
from .pipeline import FPDMPipeline, FPDMPipelineOutput, diffusion_from_scheduler, scheduler_from_diffusion
from .sampling import SampleOutput, Schedule, batches_for_rank, plan, plot_residuals, sample
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
