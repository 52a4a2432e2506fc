"""The forward options of a solve: their defaults, their validation, and the record a backward mode receives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ._loop import LoopResult, run_loop
from ._options import check_int, check_tol, is_int, resolve
from ._solution import Solution
from .solvers import SOLVERS, Solver

__all__ = ["ATOL", "CHECK_EVERY", "MAX_STEPS", "RTOL", "SOLVER", "Forward", "SolverName", "forward_options",
           "to_solution"]

SolverName = Literal["iteration", "anderson", "broyden"]

# The defaults of solve's forward options, for solve, DEQ and check_gradients alike. The docs build shows their
# values in those signatures (docs/_griffe/markdown_docstrings.py).
SOLVER: SolverName = "anderson"
MAX_STEPS = 50
RTOL = 1e-4
ATOL = 1e-6
CHECK_EVERY = 1


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


def _check_keep(keep: object, max_steps: int) -> tuple[int, ...] | None:
    allowed = f"None or a list/tuple/range of distinct ints in 1..max_steps={max_steps}"
    if keep is None:
        return None
    if not isinstance(keep, (list, tuple, range)):
        raise TypeError(f"keep must be {allowed}, got {type(keep).__name__}")
    for step in keep:
        if not (is_int(step) and 1 <= step <= max_steps):
            raise ValueError(f"keep must be {allowed}, got {list(keep)!r} (bad entry {step!r})")
    if len(set(keep)) != len(keep):
        raise ValueError(f"keep must be {allowed}, got {list(keep)!r} (repeated entries)")
    return tuple(keep)


def forward_options(*, solver: Solver | str = SOLVER, max_steps: int = MAX_STEPS, rtol: float = RTOL,
                    atol: float = ATOL, check_every: int = CHECK_EVERY, trace: bool = False,
                    on_nonfinite: str = "report", keep: Sequence[int] | None = None,
                    num_jacobian_projections: int = 0) -> Forward:
    """Validate the forward options of ``solve``/``DEQ``/``check_gradients`` (the one place that does) and
    bundle them."""
    check_int(max_steps, "max_steps", 1)
    rtol = check_tol(rtol, "rtol")
    atol = check_tol(atol, "atol")
    check_int(check_every, "check_every", 1)
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
    if on_nonfinite not in ("report", "raise"):
        raise ValueError(f"on_nonfinite must be one of ['raise', 'report'], got {on_nonfinite!r}")
    check_int(num_jacobian_projections, "num_jacobian_projections", 0)
    return Forward(solver=resolve(solver, SOLVERS, Solver, "solver"), max_steps=max_steps, rtol=rtol, atol=atol,
                   check_every=check_every, trace=trace, on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
                   keep=_check_keep(keep, max_steps), num_jacobian_projections=num_jacobian_projections)


def to_solution(result: LoopResult, z: torch.Tensor | None = None, extra_steps: int = 0) -> Solution:
    """A :class:`Solution` from a loop result, optionally with the with-grad ``z`` and its step count. Kept steps
    the loop did not reach get the final ``z`` (see :attr:`Solution.kept`)."""
    final = result.z if z is None else z
    kept = None if result.kept is None else tuple(final if image is None else image for image in result.kept)
    return Solution(
        z=final, residual=result.residual, converged=result.converged, status=result.status,
        num_steps=result.num_steps + extra_steps, trace=result.trace, kept=kept,
    )
