"""The step interface every solver implements."""

from __future__ import annotations

import abc
from typing import Any

import torch

from .._options import OptionsMeta

__all__ = ["Solver", "algebra_dtype"]


def algebra_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for norms and solver algebra: at least float32 (bf16/fp16 states are upcast), float64 stays."""
    return torch.promote_types(dtype, torch.float32)


class Solver(metaclass=OptionsMeta):
    """A fixed-point solver, driven one step at a time by :func:`fixedpoint.solve`.

    The loop owns the calls to ``f``; a solver only proposes the next iterate. All tensors are flattened per
    sample to ``(B, D)``. To add a solver, subclass this and implement :meth:`init` and :meth:`step`; the loop
    gives it per-sample stopping, best-iterate tracking, non-finite handling and every backward mode for free.

    Rules for implementations: never mutate ``z`` or ``fz``; no host-device syncs (no ``.item()``, no Python
    branching on tensor values) so that fixed-step solves compile; keep the work per sample (no mixing across
    the batch) so that a diverging sample cannot affect the others.
    """

    @abc.abstractmethod
    def init(self, z: torch.Tensor) -> Any:
        """Create the solver state for the flattened initial iterate ``z`` of shape ``(B, D)``."""

    @abc.abstractmethod
    def step(self, state: Any, z: torch.Tensor, fz: torch.Tensor, k: int) -> torch.Tensor:
        """Return the next iterate ``(B, D)`` given iterate ``z``, its image ``fz = f(z)`` and step index ``k``.

        ``state`` may be updated in place. ``k`` counts from 0 and is a Python int.
        """
