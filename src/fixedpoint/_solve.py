"""``solve``: validate once, run the no-grad loop, hand the result to the backward mode."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import Literal

import torch

from ._solution import Solution
from .backward import JFB, Backward, Implicit
from .backward._base import Forward, to_solution
from .solvers import Anderson, Broyden, Iteration, Solver

__all__ = ["BACKWARDS", "SOLVERS", "solve"]

SolverName = Literal["iteration", "anderson", "broyden"]
BackwardName = Literal["jfb", "implicit"]

#: Names accepted for ``solver=``, each with its default options.
SOLVERS: MappingProxyType[str, type[Solver]] = MappingProxyType(
    {"iteration": Iteration, "anderson": Anderson, "broyden": Broyden})
#: Names accepted for ``backward=``. ``StochasticJFB`` has no defaults to stand for, so it has no name.
BACKWARDS: MappingProxyType[str, type[Backward]] = MappingProxyType({"jfb": JFB, "implicit": Implicit})


def _as_solver(solver: Solver | str, what: str = "solver") -> Solver:
    if isinstance(solver, Solver):
        return solver
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise ValueError(f"{what} must be a Solver or one of {sorted(SOLVERS)}, got {solver!r}")
        return SOLVERS[solver]()
    raise TypeError(f"{what} must be a Solver or one of {sorted(SOLVERS)}, got {type(solver).__name__}")


def _as_backward(backward: Backward | str | None) -> Backward | None:
    if backward is None or isinstance(backward, Backward):
        return backward
    if isinstance(backward, str):
        if backward not in BACKWARDS:
            raise ValueError(f"backward must be None, a Backward or one of {sorted(BACKWARDS)}, got {backward!r}")
        return BACKWARDS[backward]()
    raise TypeError(f"backward must be None, a Backward or one of {sorted(BACKWARDS)}, "
                    f"got {type(backward).__name__}")


def _check_steps(value: object, what: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")


def _check_tol(value: object, what: str) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


def forward_options(*, solver: Solver | str, max_steps: int, rtol: float, atol: float, check_every: int,
                    trace: bool, on_nonfinite: str) -> Forward:
    """Validate the forward options of ``solve``/``DEQ`` (the one place that does) and bundle them."""
    _check_steps(max_steps, "max_steps")
    _check_tol(rtol, "rtol")
    _check_tol(atol, "atol")
    _check_steps(check_every, "check_every")
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
    if on_nonfinite not in ("report", "raise"):
        raise ValueError(f"on_nonfinite must be one of ['raise', 'report'], got {on_nonfinite!r}")
    return Forward(solver=_as_solver(solver), max_steps=max_steps, rtol=float(rtol), atol=float(atol),
                   check_every=check_every, trace=trace, on_nonfinite=on_nonfinite)  # type: ignore[arg-type]


def _checked(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``f`` so that every output is a tensor shaped, typed and placed like ``z0``."""
    shape, dtype, device = z0.shape, z0.dtype, z0.device

    def checked(z: torch.Tensor) -> torch.Tensor:
        fz = f(z)
        if not isinstance(fz, torch.Tensor):
            raise TypeError(f"f must return a tensor, got {type(fz).__name__}")
        if fz.shape != shape:
            raise ValueError(f"f(z) must have the shape of z0 {tuple(shape)}, got {tuple(fz.shape)}")
        if fz.device != device:
            raise ValueError(f"f(z) must be on z0's device {device}, got {fz.device}")
        if not fz.is_floating_point():
            raise TypeError(f"f(z) must be floating point, got {fz.dtype}")
        # e.g. bf16 outputs under autocast keep the state in z0's dtype (`to` of the same dtype returns fz
        # itself; the comparison spares that call on every step)
        return fz if fz.dtype == dtype else fz.to(dtype)

    return checked


def check_state(z0: object, what: str = "z0") -> torch.Tensor:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise TypeError(f"{what} must have a floating-point dtype, got {z0.dtype}")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"{what} must have a non-empty leading batch dimension, got shape {tuple(z0.shape)}")
    return z0


def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    solver: Solver | SolverName = "anderson",
    backward: Backward | BackwardName | None = None,
    max_steps: int = 50,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    check_every: int = 1,
    trace: bool = False,
    on_nonfinite: Literal["report", "raise"] = "report",
) -> Solution:
    """Find ``z`` with ``f(z) = z`` for each sample of a batch, and make it differentiable.

    ``f`` maps a tensor shaped like ``z0`` to the same shape; inputs and parameters reach it through the
    closure. It must not modify its input in place, and must return a tensor it will not overwrite later (clone
    the output of a callable that reuses a static buffer, such as one captured in a CUDA graph). The leading
    dimension is the batch: residuals, convergence and stopping are per sample, and
    samples never mix, so a sample that produces NaN/Inf cannot corrupt the others.

    A sample has converged when ``||f(z) - z|| <= atol + rtol * ||f(z)||``, with ``||.||`` the Euclidean norm
    over all of a sample's elements (computed in float32, or float64 for float64 states). The solve stops once
    every sample has converged or gone non-finite, checking every ``check_every`` steps (one host-device sync
    each), and returns ``f`` applied to each sample's lowest-residual iterate. With ``rtol=0`` and ``atol=0`` it
    runs exactly ``max_steps`` applications of ``f`` with no check and no sync (compiles with
    ``torch.compile(fullgraph=True)``) and returns the image of the last iterate.

    Args:
        f: the map, ``(B, ...) -> (B, ...)``.
        z0: initial iterate ``(B, ...)``, floating point (bf16/fp16 states keep their dtype; norms and solver
            algebra run in float32). Pass a previous ``Solution.z`` to warm-start.
        solver: a :class:`Solver` instance or one of ``"iteration"``, ``"anderson"``, ``"broyden"``.
        backward: how gradients flow: ``None`` (no gradient; the result is the same whatever the grad mode), a
            :class:`Backward` instance (:class:`JFB`, :class:`StochasticJFB`, :class:`Implicit`), or ``"jfb"`` /
            ``"implicit"``.
        max_steps: the most applications of ``f`` in the forward solve, at least 1.
        rtol, atol: convergence tolerances, non-negative; both 0 selects fixed-step mode.
        check_every: steps between convergence checks, at least 1.
        trace: also return each step's residual, ``Solution.trace`` of shape ``(steps, B)``.
        on_nonfinite: ``"report"`` flags non-finite samples in ``Solution.status``; ``"raise"`` raises
            ``FloatingPointError`` instead (one sync at the end).

    Returns:
        A :class:`Solution`.

    Raises:
        TypeError: ``z0`` is not a floating-point tensor, ``f`` returns a non-tensor or non-float, or an option
            has the wrong type.
        ValueError: an option is out of range or unknown, or ``f(z)`` is not shaped like ``z0``.
        FloatingPointError: with ``on_nonfinite="raise"``, when a sample goes non-finite.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    z0 = check_state(z0)
    options = forward_options(solver=solver, max_steps=max_steps, rtol=rtol, atol=atol, check_every=check_every,
                              trace=trace, on_nonfinite=on_nonfinite)
    return solve_with(f, z0, options, _as_backward(backward))


def solve_with(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, options: Forward,
               backward: Backward | None) -> Solution:
    """:func:`solve` on already-validated options (used by ``DEQ``, which validates at construction)."""
    f = _checked(f, z0)
    if backward is None:
        return to_solution(options.run(f, z0))
    return backward.solve(f, z0, options)
