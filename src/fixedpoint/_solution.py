"""The record a solve returns."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass

import torch

__all__ = ["Solution", "State", "Status", "status_of"]

#: A fixed-point state: one tensor, a tuple of tensors or a dict of tensors, every leaf with the batch leading.
State = torch.Tensor | tuple[torch.Tensor, ...] | dict[Hashable, torch.Tensor]


class Status(enum.IntEnum):
    """Why a sample's solve stopped. ``Solution.status`` holds these codes, one per sample."""

    CONVERGED = 0
    """The residual met ``atol + rtol * ||f(z)||``."""
    MAX_STEPS = 1
    """The step limit was reached first (always the case in fixed-step mode unless the residual is exactly met)."""
    NONFINITE = 2
    """``f`` produced NaN or Inf for this sample; the best finite iterate seen (if any) is returned."""


def status_of(converged: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    """The :class:`Status` codes ``(B,)`` int64 from ``(B,)`` bool flags: converged wins, then non-finite."""
    status = torch.where(nonfinite, int(Status.NONFINITE), int(Status.MAX_STEPS))
    return torch.where(converged, int(Status.CONVERGED), status)


@dataclass(frozen=True, eq=False)
class Solution:
    """Result of :func:`fixedpoint.solve` and :class:`fixedpoint.DEQ`.

    Attributes:
        z: the solution, with the structure of ``z0``: a tensor, or a tuple/dict of tensors with the same length or
            keys (in ``z0``'s order), each leaf shaped and typed like ``z0``'s. It is ``f`` applied to the solver's
            lowest-residual iterate (the last iterate in fixed-step mode), followed by the backward mode's with-grad
            steps, if any. With a backward mode and autograd recording, gradients flow through it.
        residual: ``(B,)`` float32 (float64 for float64 states): ``||f(z_k) - z_k||_2`` of the solver iterate
            ``z_k`` whose image was returned, measured before any with-grad steps. The norm is the Euclidean norm
            over all non-batch elements (of all leaves together for a tuple/dict state). For a map with Lipschitz
            constant ``L < 1`` the returned point is within ``L / (1 - L) * residual`` of the fixed point.
        converged: ``(B,)`` bool, ``residual <= atol + rtol * ||f(z_k)||``.
        status: ``(B,)`` int64 codes of :class:`Status`.
        num_steps: applications of ``f`` spent, the backward mode's with-grad ones included (the same for every
            sample: the batch is evaluated together).
        trace: ``(num_solver_steps, B)`` residual of each solver iterate, when ``trace=True`` was asked for, else
            ``None``.
        kept: with ``keep=[k_1, k_2, ...]``, a tuple of ``len(keep)`` states structured like ``z``, in the order
            asked, else ``None``. Entry ``i`` is the image ``f(z_{k_i - 1})`` that the solver loop computed at its
            step ``k_i`` (counting from 1), where ``z_{k-1}`` is the iterate the solver proposed after step
            ``k - 1`` (``z_0 = z0``). For ``Iteration`` without damping that is the iterate ``z_k`` itself; for
            ``Anderson``, ``Broyden`` and damped iteration it is ``f`` of the solver's proposal, not the proposal.
            With a backward mode and autograd recording, that application of ``f`` runs with autograd from the
            detached ``z_{k-1}``: its gradient is the 1-step JFB gradient at ``z_{k-1}`` (to ``f``'s parameters
            and inputs; nothing flows into earlier steps), and it costs one activation of ``f`` and no extra
            application. When the solver loop stopped before step ``k_i`` (it converged, every sample went
            non-finite, or ``StochasticJFB`` drew fewer no-grad steps), entry ``i`` is ``z`` itself, the final
            solution with its backward mode's gradient, so the length is always ``len(keep)``.
        jacobian_penalty: with ``num_jacobian_projections=n > 0``, ``(B,)`` float32 (float64 for float64 states):
            an unbiased Hutchinson estimate of ``||J_f(z)||_F^2`` per sample at the returned ``z`` from ``n``
            random projections, differentiable with respect to ``f``'s parameters and inputs (``z`` is held
            constant); else (or when autograd was not recording) ``None``. Divide by the state size for Bai et
            al.'s normalisation.

    Solutions compare by identity (comparing tensor fields elementwise has no single truth value).
    """

    z: State
    residual: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    num_steps: int
    trace: torch.Tensor | None = None
    kept: tuple[State, ...] | None = None
    jacobian_penalty: torch.Tensor | None = None

    def statuses(self) -> list[Status]:
        """Per-sample :class:`Status` values as Python objects (reads the device: one sync)."""
        return [Status(code) for code in self.status.tolist()]
