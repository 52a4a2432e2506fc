"""Checks of the tensor and callable arguments shared by ``solve`` and the diagnostics."""

from __future__ import annotations

import torch

__all__ = ["check_generator", "check_leaf", "check_map", "check_output", "check_tensor"]


def check_map(f: object) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")


def check_leaf(leaf: object, what: str) -> torch.Tensor:
    """``leaf`` if it is a floating-point tensor with a non-empty leading batch dimension."""
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(leaf).__name__}")
    if not leaf.is_floating_point():
        raise TypeError(f"{what} must have a floating-point dtype, got {leaf.dtype}")
    if leaf.dim() < 1 or leaf.shape[0] == 0:
        raise ValueError(f"{what} must have a non-empty leading batch dimension, got shape {tuple(leaf.shape)}")
    return leaf


def check_tensor(z: object, what: str) -> torch.Tensor:
    """:func:`check_leaf` for the diagnostics, which take tensor states only (no tuple/dict)."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (diagnostics take tensor states), got {type(z).__name__}")
    return check_leaf(z, what)


def check_output(fz: object, batch: int) -> torch.Tensor:
    """``fz`` if it is a tensor that keeps the batch dimension ``batch``."""
    if not isinstance(fz, torch.Tensor):
        raise TypeError(f"f must return a tensor, got {type(fz).__name__}")
    if fz.dim() < 1 or fz.shape[0] != batch:
        raise ValueError(f"f(z) must keep the batch dimension {batch} of z, got shape {tuple(fz.shape)}")
    return fz


def check_generator(generator: object, device: torch.device, what: str = "generator") -> None:
    """``None``, or a ``torch.Generator`` on ``device`` (where the draws are made)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{what} must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = generator.device
    if gen_device.type != device.type or (gen_device.index is not None and device.index is not None
                                          and gen_device.index != device.index):
        raise ValueError(f"{what} must be on the state's device {device} (the draws are made there), "
                         f"got one on {gen_device}")
