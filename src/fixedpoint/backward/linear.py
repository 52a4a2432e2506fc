"""Linear solvers for the adjoint system of the implicit gradient, ``u (I - J) = g``: GMRES and a truncated
Neumann series.

Both see ``J`` only through ``apply_j(u) = u J``, one vector-Jacobian product per call, on row vectors flattened
per sample to ``(B, D)``; every sample has its own ``J`` and the samples never mix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._options import OptionsMeta, check_int
from .._solution import status_of
from ..solvers._base import algebra_dtype

__all__ = ["GMRES", "LinearResult", "Neumann"]

ApplyJ = Callable[[torch.Tensor], torch.Tensor]


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1)


@dataclass(frozen=True, eq=False)
class LinearResult:
    """What :meth:`GMRES.solve` returns.

    Attributes:
        u: ``(B, D)``, in ``g``'s dtype: the solution.
        residual: ``(B,)``, in the algebra dtype (float32, or float64 for float64 ``g``): the true residual
            ``||g - u (I - J)||`` of the returned ``u``, recomputed with one more product, not the Krylov estimate.
        converged: ``(B,)`` bool, ``residual <= atol + rtol * ||g||``.
        status: ``(B,)`` int64 codes of :class:`fixedpoint.Status`.
        num_steps: applications of ``J`` (vector-Jacobian products) spent, all of them.
        num_iterations: Arnoldi steps among them (each restart cycle adds one product for its true residual, and a
            warm start one more).
    """

    u: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    num_steps: int
    num_iterations: int


@dataclass(frozen=True)
class GMRES(metaclass=OptionsMeta):
    """Restarted GMRES (Saad and Schultz, 1986) on ``u (I - J) = g``, batched: one Krylov space per sample.

    Each cycle starts from the residual ``r = g - u (I - J)``, ``beta = ||r||``, and builds orthonormal rows
    ``V`` spanning ``{r, r A, ..., r A^(m-1)}`` with ``A = I - J``, by Arnoldi with modified Gram-Schmidt, so
    that ``V_m A = H^T V_(m+1)`` with ``H`` the ``(m+1) x m`` upper Hessenberg matrix. The update ``u += y V_m``
    minimises ``||r - y V_m A|| = ||beta e_1 - H y||`` (Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., Alg. 6.9);
    Givens rotations keep ``H`` triangular as it grows, so each step's residual norm is read off the rotated
    right-hand side without forming ``y``. Without restarts (``restart >= D``) a ``D``-dimensional system is
    solved in at most ``D`` steps, in exact arithmetic, whatever the spectrum of ``J``.

    Restarts trade that guarantee for memory. Restarted GMRES converges when ``I - J`` is positive definite
    (its symmetric part is, e.g. when ``||J|| < 1``; Saad, Sec. 6.11.4), but it can stall when ``I - J`` is indefinite,
    as it may be where ``J`` has spectral radius above 1: every cycle then reduces the residual by almost
    nothing. For instance (one draw), ``D = 60`` and ``J`` with i.i.d. entries ``N(0, 1.5^2 / D)`` (spectral radius about
    1.5), ``rtol = 1e-6``: with ``restart = 20``, two of three samples are still at 60% and 90% relative error
    after 1000 steps; with ``restart = 60`` all three converge in 60. A stall is reported, not hidden: such
    samples end with ``converged`` False and status ``MAX_STEPS`` (through :class:`Implicit`, read
    :attr:`AdjointState.converged`); raise ``restart`` for them.

    Per sample: a sample stops taking part once its estimated residual meets its tolerance, or when its Krylov
    space closes (the new basis vector is rounding noise: the exact solution lies in the space already built), or
    when it goes non-finite. From then on each step gives it the column ``e_(j+1)``, whose rotation is a plain
    swap: its coefficient is exactly 0 and its residual estimate carries over, so later steps cannot change its
    ``u`` (no division by a zero norm, no NaN). A space that closes on a singular ``I - J`` (the least-squares
    problem is rank-deficient there) stalls the sample for good: restarting would build the same space again. So
    does a cycle that leaves a sample's true residual larger than it found it (rounding on a nearly singular
    ``I - J``): that sample's cycle is undone. A stalled sample reports ``MAX_STEPS``.

    Host syncs: one every ``check_every`` steps (have all samples stopped?) and one per restart cycle (have all
    converged?), none at all in fixed-step mode (``rtol = atol = 0``). Memory: ``restart + 1`` vectors per sample.

    Args:
        restart: Arnoldi steps per cycle, at least 1; after each cycle the true residual is recomputed and the
            space is rebuilt from it. Convergence is guaranteed for any nonsingular ``I - J`` only with
            ``restart >= D``; below that it may stall (see above).
    """

    restart: int = 20

    def __post_init__(self) -> None:
        check_int(self.restart, "GMRES: restart", 1)

    def solve(self, apply_j: ApplyJ, g: torch.Tensor, u0: torch.Tensor | None = None, *, max_steps: int,
              rtol: float, atol: float, check_every: int = 1) -> LinearResult:
        """Solve ``u (I - J) = g`` for each sample.

        Args:
            apply_j: ``u -> u J`` on ``(B, D)`` tensors of ``g``'s dtype; ``J`` may differ per sample.
            g: ``(B, D)`` floating point, the right-hand side.
            u0: ``(B, D)`` starting point, or ``None`` for zero. A sample whose start has a larger residual than
                zero (``||g - u0 (I - J)|| > ||g||``, e.g. a stale warm start) starts from zero instead.
            max_steps: the most Arnoldi steps in all cycles together, at least 1.
            rtol, atol: a sample has converged when ``||g - u (I - J)|| <= atol + rtol * ||g||``. Both 0: fixed
                steps, exactly ``max_steps`` Arnoldi steps and no host sync.
            check_every: Arnoldi steps between checks whether every sample has stopped, at least 1.

        Returns:
            A :class:`LinearResult`.
        """
        dtype = algebra_dtype(g.dtype)
        b = g.to(dtype)
        early_stop = rtol > 0 or atol > 0
        bound = atol + rtol * _norm(b)  # (B,)
        num_steps = 0

        def apply_a(v: torch.Tensor) -> torch.Tensor:  # v (I - J)
            return v - apply_j(v.to(g.dtype)).to(dtype)

        if u0 is None:
            u, r = torch.zeros_like(b), b
        else:
            u = u0.to(dtype)
            r = b - apply_a(u)
            num_steps += 1
            # `not <=` also drops a non-finite start.
            worse = ~(_norm(r) <= _norm(b))[:, None]
            u, r = torch.where(worse, 0.0, u), torch.where(worse, b, r)
        stalled = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
        iterations = 0
        while True:
            beta = _norm(r)
            if iterations == max_steps:
                break
            if early_stop and bool(((beta <= bound) | ~(beta < math.inf) | stalled).all()):  # sync per cycle
                break
            steps = min(self.restart, max_steps - iterations)
            u_next, taken = self._cycle(apply_a, u, r, beta, bound, stalled, steps, early_stop, check_every)
            iterations += taken
            r_next = b - apply_a(u_next)
            num_steps += taken + 1
            # In exact arithmetic a cycle never increases the residual. When it does, rounding has met a nearly
            # singular I - J (a pivot of ~1e-13 relative gave huge coefficients): undo that sample's cycle and
            # stall it, since a restart would repeat it. `>` is False for NaN, so a NaN sample keeps its NaN.
            worse = _norm(r_next) > beta
            stalled |= worse
            u = torch.where(worse[:, None], u, u_next)
            r = torch.where(worse[:, None], r, r_next)
        converged = beta <= bound
        status = status_of(converged, ~(beta < math.inf))
        return LinearResult(u=u.to(g.dtype), residual=beta, converged=converged, status=status,
                            num_steps=num_steps, num_iterations=iterations)

    @staticmethod
    def _cycle(apply_a: ApplyJ, u: torch.Tensor, r: torch.Tensor, beta: torch.Tensor, bound: torch.Tensor,
               stalled: torch.Tensor, steps: int, early_stop: bool, check_every: int) -> tuple[torch.Tensor, int]:
        """One restart cycle of at most ``steps`` Arnoldi steps from residual ``r`` (norm ``beta``). Updates
        ``stalled`` in place; returns the new ``u`` and the number of steps taken."""
        batch, dim = r.shape
        eps = torch.finfo(r.dtype).eps
        active = (beta > bound) & (beta < math.inf) & ~stalled  # (B,)
        basis = r.new_zeros(batch, steps + 1, dim)  # V, one row per basis vector
        basis[:, 0] = torch.where(active[:, None], r / torch.where(active, beta, 1.0)[:, None], 0.0)
        tri = r.new_zeros(batch, steps, steps)  # H after the rotations: the upper triangular R
        rhs = r.new_zeros(batch, steps + 1)  # beta e_1 after the rotations; |rhs[j + 1]| is the residual estimate
        rhs[:, 0] = torch.where(active, beta, 0.0)
        cos, sin = r.new_zeros(batch, steps), r.new_zeros(batch, steps)
        taken = steps
        for j in range(steps):
            w = apply_a(basis[:, j])
            w_norm = _norm(w)
            h = []  # column j of H, entries 0..j
            for i in range(j + 1):  # modified Gram-Schmidt
                h_i = torch.linalg.vecdot(w, basis[:, i])
                w = w - h_i[:, None] * basis[:, i]
                h.append(h_i)
            h_next = _norm(w)
            for i in range(j):  # the earlier rotations, in order
                h[i], h[i + 1] = cos[:, i] * h[i] + sin[:, i] * h[i + 1], cos[:, i] * h[i + 1] - sin[:, i] * h[i]
            rho = torch.hypot(h[j], h_next)
            # Relative to ||v A||: below eps the new direction is rounding noise (the space is invariant), and a
            # zero diagonal after rotation means a singular least-squares problem.
            closed = h_next <= eps * w_norm
            singular = rho <= eps * w_norm
            ok = active & ~singular & (rho < math.inf)  # NaN compares False, so non-finite samples drop out
            stalled |= active & singular & (w_norm < math.inf)
            # A sample that is not ok takes the column e_(j+1): c = 0, s = 1 swaps its residual down a row and
            # leaves 0 on this row of the right-hand side, so its coefficient for this step is exactly 0.
            safe_rho = torch.where(ok, rho, 1.0)
            c = torch.where(ok, h[j] / safe_rho, 0.0)
            s = torch.where(ok, h_next / safe_rho, 1.0)
            for i in range(j):
                tri[:, i, j] = torch.where(ok, h[i], 0.0)
            tri[:, j, j] = safe_rho
            cos[:, j], sin[:, j] = c, s
            rhs[:, j + 1] = -s * rhs[:, j]
            rhs[:, j] = c * rhs[:, j]
            grows = ok & ~closed
            basis[:, j + 1] = torch.where(grows[:, None], w / torch.where(grows, h_next, 1.0)[:, None], 0.0)
            active = grows & (rhs[:, j + 1].abs() > bound)
            if early_stop and j + 1 < steps and (j + 1) % check_every == 0 and not bool(active.any()):  # sync
                taken = j + 1
                break
        # y = R^{-1} rhs; a stopped sample's rows are (e_j, 0), so its y is 0 there and its u stays put.
        y = torch.linalg.solve_triangular(tri[:, :taken, :taken], rhs[:, :taken, None], upper=True)  # (B, k, 1)
        return u + (y * basis[:, :taken]).sum(1), taken


@dataclass(frozen=True)
class Neumann(metaclass=OptionsMeta):
    """Truncated Neumann series for the adjoint: ``u = g (I + J + J^2 + ... + J^order)``.

    Since ``(I - J)^{-1} = sum_k J^k`` when the spectral radius of ``J`` is below 1, this approximates the
    implicit gradient with exactly ``order`` vector-Jacobian products, no tolerance and no host sync (it compiles).
    It is the gradient that ``order + 1`` with-grad steps of ``f`` give (:class:`fixedpoint.JFB` with
    ``steps=order + 1``; the "phantom gradient" of Geng et al., 2021, without damping), but it saves one
    activation of ``f`` instead of ``order + 1``; ``order = 0`` gives ``u = g``, 1-step JFB.

    Args:
        order: the highest power of ``J`` in the series, at least 0.
    """

    order: int

    def __post_init__(self) -> None:
        check_int(self.order, "Neumann: order", 0)

    def solve(self, apply_j: ApplyJ, g: torch.Tensor) -> torch.Tensor:
        """The series for ``g`` of shape ``(B, D)``, summed in the algebra dtype and returned in ``g``'s.

        Args:
            apply_j: ``u -> u J`` on ``(B, D)`` tensors of ``g``'s dtype.
            g: ``(B, D)`` floating point.
        """
        term, total = g, g.to(algebra_dtype(g.dtype))
        for _ in range(self.order):
            term = apply_j(term)
            total = total + term
        return total.to(g.dtype)
