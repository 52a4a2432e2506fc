"""Damped fixed-point (Picard) iteration."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._options import check_fraction
from ._base import Solver

__all__ = ["Iteration"]


@dataclass(frozen=True)
class Iteration(Solver):
    """``z <- (1 - damping) * z + damping * f(z)``.

    Converges linearly for contractions, at the rate of the map's Lipschitz constant. It keeps no history, so it
    is the cheapest solver per step and the one FPDM uses (``damping=1``: ``z <- f(z)``).

    Args:
        damping: mixing weight in ``(0, 1]``. Values below 1 can stabilise maps whose Jacobian has eigenvalues
            near -1.

    Raises:
        ValueError: if ``damping`` is outside ``(0, 1]``.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        check_fraction(self.damping, "Iteration: damping")

    def init(self, z: torch.Tensor) -> None:
        return None

    def step(self, state: None, z: torch.Tensor, fz: torch.Tensor, k: int) -> torch.Tensor:
        if self.damping == 1.0:
            return fz
        return torch.lerp(z, fz, self.damping)
