"""Fixed Point Diffusion Models (FPDM) on top of :mod:`fixedpoint`: DiT and FPDM networks, the paper's diffusion
objective, training (one process or many under ``torchrun``) and its data tools, budgeted sampling."""

import importlib
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use instead, so that `fpdm --help` starts without loading torch
    from .budget import Schedule, fill_schedule_defaults, plan
    from .checkpoints import load_official_checkpoint
    from .config import Config, ConfigError, DataConfig, DiffusionConfig, TrainConfig, list_configs, load_config
    from .data import ImageFolder, LatentDataset, Shapes, extract_latents, load_vae
    from .demo import DemoSettings, run_demo
    from .diffusion import Diffusion, Loss
    from .errors import (
        InputError,
        InvalidTypeError,
        InvalidValueError,
        MissingInputError,
        NotWritableError,
        OutputExistsError,
    )
    from .evaluation import evaluate
    from .generate import FolderSummary, check_output_folder, sample_to_folder
    from .models import FPDM, PRESETS, Cost, DiT, ModelOutput, create_model
    from .pipeline import FPDMPipeline, FPDMPipelineOutput, diffusion_from_scheduler, scheduler_from_diffusion
    from .runs import RunFolder, latest_checkpoint, load_model
    from .sampling import Denoiser, SampleOutput, batches_for_rank, plot_residuals, sample
    from .training import Trainer, TrainState, TrainSummary, train

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it
    "load_official_checkpoint": "checkpoints",
    **dict.fromkeys(["Config", "ConfigError", "DataConfig", "DiffusionConfig", "TrainConfig", "list_configs",
                     "load_config"], "config"),
    **dict.fromkeys(["ImageFolder", "LatentDataset", "Shapes", "extract_latents", "load_vae"], "data"),
    **dict.fromkeys(["DemoSettings", "run_demo"], "demo"),
    **dict.fromkeys(["Diffusion", "Loss"], "diffusion"),
    **dict.fromkeys(["InputError", "InvalidTypeError", "InvalidValueError", "MissingInputError", "NotWritableError",
                     "OutputExistsError"], "errors"),
    "evaluate": "evaluation",
    **dict.fromkeys(["FolderSummary", "check_output_folder", "sample_to_folder"], "generate"),
    **dict.fromkeys(["FPDM", "PRESETS", "Cost", "DiT", "ModelOutput", "create_model"], "models"),
    **dict.fromkeys(["FPDMPipeline", "FPDMPipelineOutput", "diffusion_from_scheduler", "scheduler_from_diffusion"],
                    "pipeline"),
    **dict.fromkeys(["RunFolder", "latest_checkpoint", "load_model"], "runs"),
    **dict.fromkeys(["Schedule", "fill_schedule_defaults", "plan"], "budget"),
    **dict.fromkeys(["Denoiser", "SampleOutput", "batches_for_rank", "plot_residuals", "sample"], "sampling"),
    **dict.fromkeys(["Trainer", "TrainState", "TrainSummary", "train"], "training"),
}

__all__ = [
    "Config", "ConfigError", "Cost", "DataConfig", "DemoSettings", "Denoiser", "DiT", "Diffusion", "DiffusionConfig",
    "FPDM", "FPDMPipeline", "FPDMPipelineOutput", "FolderSummary", "ImageFolder", "InputError", "InvalidTypeError",
    "InvalidValueError", "LatentDataset", "Loss", "MissingInputError", "ModelOutput", "NotWritableError",
    "OutputExistsError", "PRESETS", "RunFolder", "SampleOutput", "Schedule", "Shapes", "TrainConfig", "TrainState",
    "TrainSummary", "Trainer", "batches_for_rank", "check_output_folder", "create_model", "diffusion_from_scheduler",
    "evaluate", "extract_latents", "fill_schedule_defaults", "latest_checkpoint", "list_configs", "load_config",
    "load_model", "load_official_checkpoint", "load_vae", "plan", "plot_residuals", "run_demo", "sample",
    "sample_to_folder", "scheduler_from_diffusion", "train",
]

def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. fd.pretrained.load(...)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
