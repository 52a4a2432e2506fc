"""Experiment trackers for training metrics: TensorBoard or Weights & Biases, both optional extras, off unless
installed (``train.tracker="auto"`` picks TensorBoard when it is there) and never needing the network to start."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

__all__ = ["Tracker", "check_tracker", "tracker_available"]


def tracker_available(kind: str) -> bool:
    return importlib.util.find_spec("tensorboard" if kind == "tensorboard" else "wandb") is not None


def check_tracker(config: Config) -> None:
    """Refuse a ``train.tracker`` whose package is missing (before any compute), naming the extra to install."""
    kind = config.train.tracker
    if kind in ("tensorboard", "wandb") and not tracker_available(kind):
        raise ConfigError(f"train.tracker={kind!r} needs the {kind} package: pip install \"fixedpoint[{kind}]\" "
                          f"(or train.tracker='none')")


class Tracker:
    """The log's metrics, also sent to TensorBoard or Weights & Biases."""

    def __init__(self, kind: str, handle: Any) -> None:
        self.kind, self.handle = kind, handle

    @classmethod
    def open(cls, config: Config, out_dir: Path) -> Tracker | None:
        kind = config.train.tracker
        if kind == "auto":
            kind = "tensorboard" if tracker_available("tensorboard") else "none"
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return cls(kind, SummaryWriter(str(out_dir / "tensorboard")))
        if kind == "wandb":
            import wandb

            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fpdm"), dir=str(out_dir),
                             config=config.to_dict(), name=out_dir.name, resume="allow")
            return cls(kind, run)
        return None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.kind == "tensorboard":
            for key, value in metrics.items():
                self.handle.add_scalar(f"train/{key}", value, step)
        else:
            self.handle.log({f"train/{key}": value for key, value in metrics.items()}, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.handle.close()
        else:
            self.handle.finish()
