"""What every benchmark script records beside its numbers, and where it writes them.

Each script writes one JSON record (``--out``, under ``benchmarks/results/`` by default, which git ignores) and a
matplotlib figure beside it with the same stem and ``.png``. The record starts with :func:`environment`: the
device, library versions, date and the exact command line, so a figure in ``docs/benchmarks.md`` can always be
traced to the run that produced it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_device(device: str | None) -> torch.device:
    """``device`` if given, else the GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device``: the GPU's name, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def environment(script: str, argv: list[str] | None, device: torch.device) -> dict[str, object]:
    """The record's header: the command that reproduces the run, the device, versions and the date.

    Args:
        script: the script's path from the repository root, e.g. ``"benchmarks/solvers.py"``.
        argv: the arguments ``main`` was called with (``None``: ``sys.argv[1:]``).
        device: the device measured.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    return {"command": shlex.join(["python", script, *args]), "device": str(device),
            "device_name": device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
            "fixedpoint": _version("fixedpoint"), "torchdeq": _version("torchdeq"),
            "diffusers": _version("diffusers"), "python": platform.python_version()}


def write(record: dict[str, object], out: Path | str) -> Path:
    """Write ``record`` as JSON to ``out`` (creating its folder) and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    return out


def figure_path(out: Path | str) -> Path:
    """Where the figure of a run whose JSON goes to ``out`` is written: same folder and stem, ``.png``."""
    return Path(out).with_suffix(".png")


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path | str) -> Path:
    """Save ``fig`` next to the JSON ``out``, close it, and return the PNG's path."""
    path = figure_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
