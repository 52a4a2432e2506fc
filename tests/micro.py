"""A training config small enough for tests (a few hundred milliseconds per step on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def micro_raw(out_dir: Path, *, model: str = "FPDM-S/2", **sections: dict[str, Any]) -> dict[str, Any]:
    fpdm = model.startswith("FPDM")
    raw: dict[str, Any] = {
        "model": {"name": model, "input_size": 8, "in_channels": 3, "num_classes": 8, "hidden_size": 32,
                  "num_heads": 2,
                  **({"backward": {"name": "stochastic_jfb", "max_no_grad": 2, "max_with_grad": 2}} if fpdm
                     else {"depth": 2})},
        "data": {"kind": "shapes", "image_size": 8, "num_samples": 64},
        "train": {"global_batch_size": 8, "max_steps": 4, "lr": 1e-3, "ema_decay": 0.9, "log_every": 2,
                  "checkpoint_every": 2, "out_dir": str(out_dir)},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw
