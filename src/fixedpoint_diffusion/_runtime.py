"""What training, sampling and latent extraction share about where and how they run: derived seeds, the default
device of a process, and the process group under ``torchrun``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidValueError, NotWritableError, OutputExistsError

if TYPE_CHECKING:  # torch is imported where it is used: the fpdm command's start-up stays light
    import torch


def seed_from(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing), e.g. ``(seed, purpose, step)``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (a bare ``"cuda"`` becomes this process's GPU); otherwise ``cuda:LOCAL_RANK`` when CUDA
    is available, else the CPU."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidValueError(f"device {device!r} is not a device torch knows (e.g. 'cpu', 'cuda', "
                                f"'cuda:1')") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidValueError(f"device {str(device)!r}: CUDA is not available on this machine (use 'cpu')")
        if device.index is None:
            return torch.device(f"cuda:{local}")
        if device.index >= torch.cuda.device_count():
            raise InvalidValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                                    f"device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidValueError(f"device {str(device)!r}: MPS is not available on this machine (use 'cpu')")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InvalidValueError(f"device {str(device)!r} cannot run training or sampling here (use 'cpu' or 'cuda')")
    return device


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of a ``torchrun`` job (or runs alone), from ``RANK``: known before the
    process group is joined."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> int:
    """Join the process group when several processes run (NCCL on GPUs, gloo on CPU); returns this rank."""
    import torch
    import torch.distributed as dist

    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def cpu_threads(requested: int = 0) -> int:
    """Intra-op threads for a CPU run: ``requested`` if > 0, else ``OMP_NUM_THREADS`` when set, else half the cores
    this process may use, shared among the ``torchrun`` processes on this machine (``LOCAL_WORLD_SIZE``), at
    least 1. Half, because on a machine with other work one thread per busy core oversubscribes it (measured on
    2 cores: one thread 6x faster than two while another job ran; two 1.4x faster on an idle machine)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cores // (2 * local))


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Raise ``FileExistsError``/``PermissionError`` naming ``what`` when ``path`` cannot become a writable
    folder (it is a file, lies under a file, or its nearest existing parent is not writable). Nothing is
    created."""
    from pathlib import Path

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{what} {str(path)!r} is a file, not a folder")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise OutputExistsError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NotWritableError(f"{what} {str(path)!r}: {str(parent)!r} is not writable")


class StopFlag(contextlib.AbstractContextManager):
    """Turns SIGINT/SIGTERM into a flag checked at step boundaries (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              f"(press Ctrl-C again to abort without one)", file=sys.stderr)

    def __enter__(self) -> StopFlag:  # noqa: PYI034 - never subclassed
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
