"""What training, sampling and latent extraction share about where and how they run: derived seeds, the default
device of a process, and the process group under ``torchrun``."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def seed_from(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing), e.g. ``(seed, purpose, step)``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (a bare ``"cuda"`` becomes this process's GPU); otherwise ``cuda:LOCAL_RANK`` when CUDA
    is available, else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device(f"cuda:{local}")
    return device


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> int:
    """Join the process group when several processes run (NCCL on GPUs, gloo on CPU); returns this rank."""
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0
