"""What a backward mode receives from :func:`fixedpoint.solve`."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from .._loop import LoopResult, run_loop
from .._options import OptionsMeta
from .._solution import Solution
from ..solvers._base import Solver

__all__ = ["Backward", "Forward"]


@dataclass(frozen=True)
class Forward:
    """The validated forward options of one ``solve`` call."""

    solver: Solver
    max_steps: int
    rtol: float
    atol: float
    check_every: int
    trace: bool
    on_nonfinite: Literal["report", "raise"]
    keep: tuple[int, ...] | None = None  # solver steps (from 1) whose images are returned, see Solution.kept
    num_jacobian_projections: int = 0  # > 0: Solution.jacobian_penalty is estimated with this many projections

    @property
    def early_stop(self) -> bool:
        return self.rtol > 0 or self.atol > 0

    def run(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, max_steps: int | None = None,
            early_stop: bool | None = None, keep_grad: bool | None = None) -> LoopResult:
        """Solve without autograd with these options (``max_steps``/``early_stop`` overridable).

        The images at the ``keep`` steps are recorded with autograd when ``keep_grad`` is true; ``None`` asks
        whether autograd is recording here (the loop itself runs under ``no_grad``, so it is asked now).
        """
        return run_loop(
            f, z0, self.solver,
            max_steps=self.max_steps if max_steps is None else max_steps,
            rtol=self.rtol, atol=self.atol,
            early_stop=self.early_stop if early_stop is None else early_stop,
            check_every=self.check_every, trace=self.trace, on_nonfinite=self.on_nonfinite,
            keep=self.keep, keep_grad=torch.is_grad_enabled() if keep_grad is None else keep_grad,
        )

    def with_(self, **changes: object) -> Forward:
        """These options with ``changes``, for a solve derived from the caller's (e.g. the implicit adjoint).
        ``keep`` is dropped unless given: recorded iterates belong to the caller's forward solve alone."""
        return replace(self, **{"keep": None, **changes})


def to_solution(result: LoopResult, z: torch.Tensor | None = None, extra_steps: int = 0) -> Solution:
    """A :class:`Solution` from a loop result, optionally with the with-grad ``z`` and its step count. Kept steps
    the loop did not reach get the final ``z`` (see :attr:`Solution.kept`)."""
    final = result.z if z is None else z
    kept = None if result.kept is None else tuple(final if image is None else image for image in result.kept)
    return Solution(
        z=final, residual=result.residual, converged=result.converged, status=result.status,
        num_steps=result.num_steps + extra_steps, trace=result.trace, kept=kept,
    )


class Backward(metaclass=OptionsMeta):
    """A way to differentiate through a fixed-point solve.

    Subclasses decide which steps run with autograd; the forward iterations always run through
    :meth:`Forward.run`, without autograd.
    """

    @abc.abstractmethod
    def solve(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, forward: Forward) -> Solution:
        """Solve ``z = f(z)`` from ``z0`` with the options in ``forward`` and attach this mode's gradient."""
