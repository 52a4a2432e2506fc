"""The record a solve returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Solution", "Status"]


class Status(enum.IntEnum):
    """Why a sample's solve stopped. ``Solution.status`` holds these codes, one per sample."""

    CONVERGED = 0
    """The residual met ``atol + rtol * ||f(z)||``."""
    MAX_STEPS = 1
    """The step limit was reached first (always the case in fixed-step mode unless the residual is exactly met)."""
    NONFINITE = 2
    """``f`` produced NaN or Inf for this sample; the best finite iterate seen (if any) is returned."""


@dataclass(frozen=True, eq=False)
class Solution:
    """Result of :func:`fixedpoint.solve` and :class:`fixedpoint.DEQ`.

    Attributes:
        z: the solution, shaped and typed like ``z0``. It is ``f`` applied to the solver's lowest-residual iterate
            (the last iterate in fixed-step mode), followed by the backward mode's with-grad steps, if any. With
            a backward mode and autograd recording, gradients flow through it.
        residual: ``(B,)`` float32 (float64 for float64 states): ``||f(z_k) - z_k||_2`` of the solver iterate
            ``z_k`` whose image was returned, measured before any with-grad steps. The norm is the Euclidean norm
            over all non-batch elements. For a map with Lipschitz constant ``L < 1`` the returned point is within
            ``L / (1 - L) * residual`` of the fixed point.
        converged: ``(B,)`` bool, ``residual <= atol + rtol * ||f(z_k)||``.
        status: ``(B,)`` int64 codes of :class:`Status`.
        num_steps: applications of ``f`` spent, the backward mode's with-grad ones included (the same for every
            sample: the batch is evaluated together).
        trace: ``(num_solver_steps, B)`` residual of each solver iterate, when ``trace=True`` was asked for, else
            ``None``.

    Solutions compare by identity (comparing tensor fields elementwise has no single truth value).
    """

    z: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    num_steps: int
    trace: torch.Tensor | None = None

    def statuses(self) -> list[Status]:
        """Per-sample :class:`Status` values as Python objects (reads the device: one sync)."""
        return [Status(code) for code in self.status.tolist()]
