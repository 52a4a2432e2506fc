"""Implicit differentiation: the exact gradient at the fixed point, through an adjoint fixed-point solve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._solution import Solution
from ..solvers._base import Solver
from ._base import Backward, Forward, to_solution

__all__ = ["Implicit"]


class _ImplicitGradient(torch.autograd.Function):
    """Identity on the value ``z*``; swaps the incoming gradient ``g`` for the adjoint ``u``.

    By the implicit function theorem, at ``z* = f(z*, theta)``::

        dL/dtheta = g (I - J)^{-1} df/dtheta,        J = df/dz at z*.

    Writing ``u = g (I - J)^{-1}`` (row vectors), ``u`` is the fixed point of the linear map ``u -> u J + g``,
    which is solved with the backward solver using vector-Jacobian products of one recorded application
    ``fz = f(z_in)``, ``z_in = z*``. Returning ``u`` as the gradient of ``fz`` then lets autograd carry
    ``u df/dtheta`` (and ``u df/dx`` for inputs closed over by ``f``) to the parameters as usual, so DDP sees
    ordinary gradient accumulation. Each call has its own node, so one layer may appear many times in a graph.
    """

    @staticmethod
    def forward(ctx: Any, fz: torch.Tensor, z_in: torch.Tensor, z_star: torch.Tensor,  # type: ignore[override]
                adjoint: Forward) -> torch.Tensor:
        # Not save_for_backward: the backward needs fz's autograd graph, which saved tensors do not carry.
        ctx.fz, ctx.z_in, ctx.adjoint = fz, z_in, adjoint
        return z_star.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the adjoint solve would enter the new graph as a constant and second-order
            # terms through it would be silently dropped, so refuse rather than return a wrong derivative.
            raise RuntimeError("Implicit: backward with create_graph=True (double backward) through an implicit "
                               "gradient is not supported; use JFB or StochasticJFB for higher-order derivatives")
        fz, z_in = ctx.fz, ctx.z_in

        def adjoint_map(u: torch.Tensor) -> torch.Tensor:  # u -> u J + g
            (u_j,) = torch.autograd.grad(fz, z_in, u, retain_graph=True, allow_unused=True)
            return grad if u_j is None else u_j + grad  # None: f does not depend on z, J = 0

        u = ctx.adjoint.run(adjoint_map, grad).z  # start at g, the first term of the Neumann series
        return u, None, None, None


def _depends_on_other_leaves(out: torch.Tensor, z_in: torch.Tensor) -> bool:
    """Whether ``out``'s autograd graph reaches a tensor requiring grad other than ``z_in`` (a parameter, or an
    input closed over by ``f``). Stops at the first one found, so for a trainable ``f`` only a few nodes are
    visited."""
    if out.grad_fn is None:
        return False
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and variable is not z_in:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


@dataclass(frozen=True)
class Implicit(Backward):
    """Implicit-function-theorem gradient (Bai et al., 2019; FPDM Sec. 3.4, the equality before JFB's approximation).

    The forward solve runs without autograd; one more application ``f(z*)`` is recorded, and in the backward
    pass the adjoint ``u = u J + g`` is solved to the given tolerance, giving the exact gradient up to the
    residuals of both solves. The returned value is ``z*`` itself. Memory: one activation of ``f``. A backward
    with ``create_graph=True`` raises ``RuntimeError`` (second-order terms through the adjoint are not supported).

    Args:
        solver: adjoint solver (an instance or a name); ``None`` uses the forward's.
        max_steps: adjoint step limit; ``None`` uses the forward's.
        rtol, atol: adjoint tolerances, relative to ``||u||``; ``None`` uses the forward's.
    """

    solver: Solver | str | None = None
    max_steps: int | None = None
    rtol: float | None = None
    atol: float | None = None

    def __post_init__(self) -> None:
        from .._solve import _as_solver, _check_steps, _check_tol  # the shared validators

        if self.solver is not None:
            object.__setattr__(self, "solver", _as_solver(self.solver, "Implicit: solver"))
        if self.max_steps is not None:
            _check_steps(self.max_steps, "Implicit: max_steps")
        if self.rtol is not None:
            _check_tol(self.rtol, "Implicit: rtol")
        if self.atol is not None:
            _check_tol(self.atol, "Implicit: atol")

    def adjoint_options(self, forward: Forward) -> Forward:
        """The adjoint solve's options: this mode's where given, else the forward's."""
        return forward.with_(
            solver=forward.solver if self.solver is None else self.solver,
            max_steps=forward.max_steps if self.max_steps is None else self.max_steps,
            rtol=forward.rtol if self.rtol is None else self.rtol,
            atol=forward.atol if self.atol is None else self.atol,
            trace=False, on_nonfinite="report",
        )

    def solve(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, forward: Forward) -> Solution:
        result = forward.run(f, z0)
        if not torch.is_grad_enabled():
            return to_solution(result)
        z_in = result.z.detach().requires_grad_()
        with torch.enable_grad():
            fz = f(z_in)  # the one recorded application; the adjoint's vector-Jacobian products reuse its graph
        if not _depends_on_other_leaves(fz, z_in):  # nothing to differentiate: a frozen layer stays frozen
            return to_solution(result, extra_steps=1)
        z = _ImplicitGradient.apply(fz, z_in, result.z, self.adjoint_options(forward))
        return to_solution(result, z=z, extra_steps=1)
