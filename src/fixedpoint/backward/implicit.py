"""Implicit differentiation: the exact gradient at the fixed point, through an adjoint solve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .._forward import Forward, to_solution
from .._options import check_int, check_tol, resolve
from .._solution import Solution
from ..solvers import SOLVERS, Solver
from ._base import Backward
from .linear import GMRES, Neumann

__all__ = ["AdjointState", "Implicit"]


class AdjointState:
    """A caller-held record of the adjoint solves of one :class:`Implicit` mode, and their optional warm start.

    Pass it as ``Implicit(state=...)``. Every backward pass through that mode records here its adjoint ``u``, the
    residual of ``u J + g = u`` per sample, whether it converged, its status and the vector-Jacobian products it
    spent: an adjoint that did not converge gives a wrong gradient, and this is where that shows, without a host
    sync (the fields are device tensors; read them when convenient, e.g. ``bool(state.converged.all())``).

    With ``warm_start=True`` each adjoint solve starts from the previous recorded ``u`` when its shape, dtype and
    device match the incoming gradient's (else from ``g``, or zero for GMRES). Only the starting point changes:
    the solve still runs to the mode's tolerance. Successive training steps on similar batches typically need
    fewer adjoint steps; GMRES falls back to a cold start per sample when the previous ``u`` is worse than zero.

    Re-entrant use: if one mode with one state appears several times in a graph (the same layer applied twice),
    each backward reads and then overwrites the state, so it holds the most recent solve and every solve starts
    from the one before it. Gradients stay correct; only the starting points differ. Give each layer its own
    state for warm starts that match.

    Nothing on a module changes: the state lives where the caller keeps it; :meth:`clear` forgets it.

    The attributes below are read-only, and ``None`` until the first backward pass (``num_solves``: 0).

    Args:
        warm_start: start each adjoint solve from the previous one's ``u``.

    Attributes:
        u: the last adjoint (a detached copy), in the layout the backward mode works in: shaped like ``z`` for a
            tensor state; for a tuple or dict state, the flat ``(B, D)`` concatenation of the leaves, each
            flattened per sample, in the state's order (``D`` the sum of the leaves' per-sample sizes), in their
            promoted dtype (``torch.promote_types``), as :func:`fixedpoint.solve` lays such a state out.
        residual: ``(B,)`` float32 (float64 for float64 states). For :class:`GMRES`, ``||g - u (I - J)||`` of
            ``u`` itself; for a fixed-point solver, ``||u_k J + g - u_k||`` of the iterate ``u_k`` whose image
            ``u = u_k J + g`` was returned (as ``Solution.residual`` is for the forward).
        converged: ``(B,)`` bool, against the mode's tolerances (as documented for the solver used).
        status: ``(B,)`` int64 codes of :class:`fixedpoint.Status`.
        num_steps: vector-Jacobian products spent by the last solve (a Python int).
        num_solves: backward passes recorded since construction or :meth:`clear` (a Python int).
    """

    __slots__ = ("_converged", "_num_solves", "_num_steps", "_residual", "_status", "_u", "_warm_start")

    def __init__(self, *, warm_start: bool = True) -> None:
        if not isinstance(warm_start, bool):
            raise TypeError(f"AdjointState: warm_start must be a bool, got {type(warm_start).__name__}")
        self._warm_start = warm_start
        self.clear()

    def clear(self) -> None:
        """Forget the recorded solves (the next solve starts cold)."""
        self._u: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None
        self._converged: torch.Tensor | None = None
        self._status: torch.Tensor | None = None
        self._num_steps: int | None = None
        self._num_solves = 0

    @property
    def warm_start(self) -> bool:
        return self._warm_start

    @property
    def u(self) -> torch.Tensor | None:
        return self._u

    @property
    def residual(self) -> torch.Tensor | None:
        return self._residual

    @property
    def converged(self) -> torch.Tensor | None:
        return self._converged

    @property
    def status(self) -> torch.Tensor | None:
        return self._status

    @property
    def num_steps(self) -> int | None:
        return self._num_steps

    @property
    def num_solves(self) -> int:
        return self._num_solves

    def start_for(self, g: torch.Tensor) -> torch.Tensor | None:
        """The warm start for an adjoint solve with right-hand side ``g``, or ``None`` for a cold start."""
        u = self._u
        if not self._warm_start or u is None:
            return None
        if u.shape != g.shape or u.dtype != g.dtype or u.device != g.device:
            return None
        return u

    def record(self, u: torch.Tensor, residual: torch.Tensor, converged: torch.Tensor, status: torch.Tensor,
               num_steps: int) -> None:
        """Keep one adjoint solve's outcome (called by :class:`Implicit` in the backward pass)."""
        # A copy: the u handed to autograd may become (and be accumulated into) a leaf's .grad.
        self._u = u.detach().clone()
        self._residual, self._converged, self._status = residual, converged, status
        self._num_steps = num_steps
        self._num_solves += 1

    def __repr__(self) -> str:
        return f"AdjointState(warm_start={self._warm_start}, num_solves={self._num_solves})"


class _ImplicitGradient(torch.autograd.Function):
    """Identity on the value ``z*``; swaps the incoming gradient ``g`` for the adjoint ``u``.

    By the implicit function theorem, at ``z* = f(z*, theta)``::

        dL/dtheta = g (I - J)^{-1} df/dtheta,        J = df/dz at z*.

    Writing ``u = g (I - J)^{-1}`` (row vectors), ``u`` solves ``u (I - J) = g``, equivalently is the fixed point
    of ``u -> u J + g``; the mode's solver finds it with vector-Jacobian products ``u -> u J`` of one recorded
    application ``fz = f(z_in)``, ``z_in = z*``. Returning ``u`` as the gradient of ``fz`` then lets autograd
    carry ``u df/dtheta`` (and ``u df/dx`` for inputs closed over by ``f``) to the parameters as usual, so DDP
    sees ordinary gradient accumulation. Each call has its own node, so one layer may appear many times in a graph.
    """

    @staticmethod
    def forward(ctx: Any, fz: torch.Tensor, z_in: torch.Tensor, z_star: torch.Tensor,  # type: ignore[override]
                mode: Implicit, adjoint: Forward) -> torch.Tensor:
        # Not save_for_backward: the backward needs fz's autograd graph, which saved tensors do not carry.
        ctx.fz, ctx.z_in, ctx.mode, ctx.adjoint = fz, z_in, mode, adjoint
        return z_star.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():
            # create_graph=True: the adjoint solve would enter the new graph as a constant and second-order
            # terms through it would be silently dropped, so refuse rather than return a wrong derivative.
            raise RuntimeError("Implicit: backward with create_graph=True (double backward) through an implicit "
                               "gradient is not supported; use JFB or StochasticJFB for higher-order derivatives")
        fz, z_in = ctx.fz, ctx.z_in

        def apply_j(u: torch.Tensor) -> torch.Tensor:  # u -> u J, shaped like z
            (u_j,) = torch.autograd.grad(fz, z_in, u, retain_graph=True, allow_unused=True)
            return torch.zeros_like(u) if u_j is None else u_j  # None: f does not depend on z, J = 0

        return ctx.mode.solve_adjoint(apply_j, grad, ctx.adjoint), None, None, None, None


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
    pass the adjoint ``u (I - J) = g`` is solved, ``J = df/dz`` at ``z*``; ``u df/dtheta`` is then the exact
    gradient ``g (I - J)^{-1} df/dtheta`` up to the residuals of both solves. The returned value is ``z*``
    itself. Memory: one activation of ``f``, plus the adjoint solver's own. A backward with
    ``create_graph=True`` raises ``RuntimeError`` (second-order terms through the adjoint are not supported).

    The adjoint solver is one of:

    * a fixed-point :class:`Solver` (``"iteration"``, ``"anderson"``, ``"broyden"`` or an instance) on
      ``u -> u J + g``, started at ``g``; converged when ``||u J + g - u|| <= atol + rtol * ||u J + g||``, as in
      :func:`fixedpoint.solve`. ``max_steps`` counts vector-Jacobian products.
    * :class:`GMRES` on ``u (I - J) = g``, started at zero; converged when ``||g - u (I - J)|| <= atol +
      rtol * ||g||``. ``max_steps`` counts Arnoldi steps; each restart cycle spends one product more. It does
      not need a contraction the way the fixed-point solvers do, but it is guaranteed to converge only without
      restarts: with ``restart >= D`` (``D`` the per-sample state size) it solves any nonsingular ``I - J`` in at
      most ``D`` steps (in exact arithmetic), also where ``J`` has spectral radius above 1 and plain iteration
      diverges. Restarted GMRES (``restart < D``) can stall when ``I - J`` is indefinite (eigenvalues of ``J``
      beyond 1), and then stops at ``max_steps`` with status ``MAX_STEPS`` (see :class:`GMRES` for an example):
      pass an :class:`AdjointState` and read its ``converged``, and raise ``restart`` if it reports a stall.
    * :class:`Neumann`: ``u = g (I + J + ... + J^order)``, exactly ``order`` products, no tolerance and no sync;
      ``max_steps``, ``rtol``, ``atol`` and ``state`` do not apply to it and must stay ``None``.

    Args:
        solver: the adjoint solver (an instance or a fixed-point solver's name); ``None`` uses the forward's.
        max_steps: adjoint step limit; ``None`` uses the forward's.
        rtol, atol: adjoint tolerances; ``None`` uses the forward's. The adjoint runs the forward's
            ``check_every``.
        state: an :class:`AdjointState` that records every adjoint solve (residual, convergence, steps) and, if
            it was made with ``warm_start=True``, starts each solve from the previous one. ``None``: no record.

    Raises:
        ValueError, TypeError: on a bad option, naming it.
    """

    solver: Solver | GMRES | Neumann | str | None = None
    max_steps: int | None = None
    rtol: float | None = None
    atol: float | None = None
    state: AdjointState | None = None

    def __post_init__(self) -> None:
        if isinstance(self.solver, str) and self.solver not in SOLVERS:
            # Strings name the fixed-point solvers only; the linear solvers take options, so they are instances.
            raise ValueError(f"Implicit: solver must be None, a Solver, a GMRES(...) or Neumann(order=...) instance, "
                             f"or one of {sorted(SOLVERS)} (names of fixed-point solvers), got {self.solver!r}")
        if isinstance(self.solver, (str, Solver)):
            object.__setattr__(self, "solver", resolve(self.solver, SOLVERS, Solver, "Implicit: solver"))
        elif self.solver is not None and not isinstance(self.solver, (GMRES, Neumann)):
            raise TypeError(f"Implicit: solver must be None, a Solver, GMRES, Neumann or one of {sorted(SOLVERS)}, "
                            f"got {type(self.solver).__name__}")
        if self.max_steps is not None:
            check_int(self.max_steps, "Implicit: max_steps", 1)
        if self.rtol is not None:
            check_tol(self.rtol, "Implicit: rtol")
        if self.atol is not None:
            check_tol(self.atol, "Implicit: atol")
        if self.state is not None and not isinstance(self.state, AdjointState):
            raise TypeError(f"Implicit: state must be None or an AdjointState, got {type(self.state).__name__}")
        if isinstance(self.solver, Neumann):
            for name in ("max_steps", "rtol", "atol", "state"):
                if getattr(self, name) is not None:
                    raise ValueError(f"Implicit: {name} does not apply to solver={self.solver} (a fixed number of "
                                     f"terms: no tolerance, no residual, no warm start); leave it None, "
                                     f"got {getattr(self, name)!r}")

    def adjoint_options(self, forward: Forward) -> Forward:
        """The adjoint solve's options: this mode's where given, else the forward's. Its ``solver`` is the
        fixed-point solver used; with :class:`GMRES` or :class:`Neumann` it is the forward's, and unused."""
        return forward.with_(
            solver=self.solver if isinstance(self.solver, Solver) else forward.solver,
            max_steps=forward.max_steps if self.max_steps is None else self.max_steps,
            rtol=forward.rtol if self.rtol is None else self.rtol,
            atol=forward.atol if self.atol is None else self.atol,
            trace=False, on_nonfinite="report",
        )

    def solve_adjoint(self, apply_j: Callable[[torch.Tensor], torch.Tensor], g: torch.Tensor,
                      adjoint: Forward) -> torch.Tensor:
        """Solve ``u (I - J) = g`` with this mode's solver and record the outcome in ``state``.

        Args:
            apply_j: ``u -> u J`` on tensors shaped like ``g``.
            g: the incoming gradient, shaped like the (flat, for a tuple or dict state) solution ``z``.
            adjoint: the options from :meth:`adjoint_options`.

        Returns:
            ``u``, shaped and typed like ``g``.
        """
        batch, shape = g.shape[0], g.shape
        if isinstance(self.solver, Neumann):
            return self.solver.solve(lambda v: apply_j(v.reshape(shape)).reshape(batch, -1), g.reshape(batch, -1)
                                     ).reshape(shape)
        start = None if self.state is None else self.state.start_for(g)
        if isinstance(self.solver, GMRES):
            result = self.solver.solve(
                lambda v: apply_j(v.reshape(shape)).reshape(batch, -1), g.reshape(batch, -1),
                None if start is None else start.reshape(batch, -1),
                max_steps=adjoint.max_steps, rtol=adjoint.rtol, atol=adjoint.atol, check_every=adjoint.check_every)
            u = result.u.reshape(shape)
        else:
            # Cold, the iteration starts at g: the first term of the Neumann series.
            result = adjoint.run(lambda v: apply_j(v) + g, g if start is None else start)
            u = result.z
        if self.state is not None:
            self.state.record(u, result.residual, result.converged, result.status, result.num_steps)
        return u

    def solve(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, forward: Forward) -> Solution:
        result = forward.run(f, z0)
        if not torch.is_grad_enabled():
            return to_solution(result)
        z_in = result.z.detach().requires_grad_()
        with torch.enable_grad():
            fz = f(z_in)  # the one recorded application; the adjoint's vector-Jacobian products reuse its graph
        if not _depends_on_other_leaves(fz, z_in):  # nothing to differentiate: a frozen layer stays frozen
            return to_solution(result, extra_steps=1)
        z = _ImplicitGradient.apply(fz, z_in, result.z, self, self.adjoint_options(forward))
        return to_solution(result, z=z, extra_steps=1)
