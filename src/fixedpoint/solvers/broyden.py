"""Limited-memory ("good") Broyden method with restarts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .._options import is_int
from ._base import Solver, algebra_dtype

__all__ = ["Broyden"]


class _BroydenState:  # the window cache is for speed only, see benchmarks/solvers.py
    def __init__(self, u: torch.Tensor, v: torch.Tensor) -> None:
        self.u = u  # (B, m, D); only the first `count` slots are ever read, each written before it is
        self.v = v  # (B, m, D)
        self.count = 0  # rank-one updates since the last restart (same for all samples)
        self.prev_z: torch.Tensor | None = None
        self.prev_g: torch.Tensor | None = None
        self._window: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def window(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``U, V`` of the first ``n`` updates and their transposes, ``(B, n, D)`` and ``(B, D, n)``. A step uses
        the count before its update and after it, the next step's before: the last window is kept."""
        if self._window is None or self._window[0] != n:
            u, v = self.u.narrow(1, 0, n), self.v.narrow(1, 0, n)
            self._window = (n, u, v, u.transpose(1, 2), v.transpose(1, 2))
        return self._window[1:]


def _apply(v: torch.Tensor, u_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(-I + sum_j u_j v_j^T) x`` for a batch, given ``V`` and ``U^T``: ``U^T (V x) - x`` (the same bits as
    ``-x + U^T (V x)``, one op fewer)."""
    coef = torch.bmm(v, x.unsqueeze(2))  # (B, n, 1)
    return torch.bmm(u_t, coef).squeeze(2) - x


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """Whether each row of ``x`` ``(B, D)`` is finite, shaped ``(B, 1)``. ``x - x`` is 0 where ``x`` is finite
    and NaN elsewhere, so its row sum is exactly 0 for a finite row: two passes over ``x`` where
    ``isfinite(x).all(1)`` takes five (about ten times slower for a large ``x`` on the CPU)."""
    return (x - x).sum(1, keepdim=True) == 0


def _drop_weakest(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite ``U^T V = sum_j u_j v_j^T`` (``U, V``: ``(B, m, D)``) as ``m - 1`` pairs without its smallest
    singular component (Broyden rank reduction, van de Rotten & Verduyn Lunel, 2003).

    With ``V^T = Q R`` (thin QR) and ``U^T R^T = P S Y^T`` (thin SVD), ``U^T V = (P S)(Q Y)^T``; the first
    ``m - 1`` columns of ``P S`` and ``Q Y`` are the new pairs. A sample whose factorisation is not finite
    restarts (all pairs dropped).
    """
    q, r = torch.linalg.qr(v.transpose(1, 2))  # (B, D, m), (B, m, m)
    p, sv, yh = torch.linalg.svd(torch.bmm(u.transpose(1, 2), r.transpose(1, 2)), full_matrices=False)
    keep = u.shape[1] - 1
    u_new = (p[:, :, :keep] * sv[:, None, :keep]).transpose(1, 2)
    v_new = torch.bmm(q, yh.transpose(1, 2)[:, :, :keep]).transpose(1, 2)
    ok = (_all_finite(u_new.flatten(1)) & _all_finite(v_new.flatten(1)))[:, :, None]
    return torch.where(ok, u_new, 0.0), torch.where(ok, v_new, 0.0)


@dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's "good" method on the root problem ``g(z) = f(z) - z = 0``.

    Keeps an approximation ``H = -I + sum_j u_j v_j^T`` of the inverse Jacobian of ``g`` and steps
    ``z <- z - H g(z)``. After each step the secant condition ``H dg = dz`` is imposed by the Sherman-Morrison
    update ``u = (dz - H dg) / (dz^T H dg)``, ``v = H^T dz``.

    The memory is bounded and the method stays convergent. With ``when_full="restart"`` (the default) the
    approximation restarts from ``-I`` after ``memory`` updates: no extra work, nothing that synchronises with
    the host, and in float32 at practical tolerances the fewest steps in our tests. With ``"reduce"`` each update
    past the memory first drops the weakest singular component of ``H + I`` (Broyden rank reduction): it tracks
    full-memory Broyden closely in float64 at tight tolerances (100 vs 97 steps at contraction 0.99, where
    restarting takes 129), but costs ``O(memory^2 * D)`` per step and a QR and SVD that synchronise with the host
    on CUDA. Overwriting the oldest update, as torchdeq does, breaks the secant structure and diverges on plain
    linear contractions. An update whose denominator vanishes or is not finite is skipped for that sample. The
    algebra runs in float32 or better.

    Memory: two ``(B, memory, D)`` buffers in the algebra dtype.

    Args:
        memory: rank-one updates kept, at least 1 (at least 2 with ``"reduce"``).
        when_full: ``"restart"`` (drop all updates) or ``"reduce"`` (drop the weakest component).

    Raises:
        ValueError: on an out-of-range argument.
    """

    memory: int = 30
    when_full: Literal["restart", "reduce"] = "restart"

    def __post_init__(self) -> None:
        if self.when_full not in ("reduce", "restart"):
            raise ValueError(f"Broyden: when_full must be one of ['reduce', 'restart'], got {self.when_full!r}")
        low = 2 if self.when_full == "reduce" else 1
        if not (is_int(self.memory) and self.memory >= low):
            raise ValueError(f"Broyden: memory must be an int >= {low} with when_full={self.when_full!r}, "
                             f"got {self.memory!r}")

    def init(self, z: torch.Tensor) -> _BroydenState:
        batch, dim = z.shape
        dtype = algebra_dtype(z.dtype)
        # Uninitialised: a slot is written before it is read (after a restart too), so zeroing the buffers would
        # be a pass over both of them for nothing.
        return _BroydenState(z.new_empty(batch, self.memory, dim, dtype=dtype),
                             z.new_empty(batch, self.memory, dim, dtype=dtype))

    def step(self, state: _BroydenState, z: torch.Tensor, fz: torch.Tensor, k: int) -> torch.Tensor:
        dtype = state.u.dtype
        z_a = z if z.dtype == dtype else z.to(dtype)
        g = (fz if fz.dtype == dtype else fz.to(dtype)) - z_a
        if state.prev_z is not None:
            if state.count == self.memory:
                if self.when_full == "reduce":
                    u_kept, v_kept = _drop_weakest(state.u, state.v)
                    state.u[:, : self.memory - 1] = u_kept
                    state.v[:, : self.memory - 1] = v_kept
                    state.count = self.memory - 1
                else:  # back to H = -I: the stored updates are overwritten before they are read again
                    state.count = 0
            n = state.count
            u_hist, v_hist, u_t, v_t = state.window(n)
            dz = z_a - state.prev_z
            dg = g - state.prev_g
            h_dg = _apply(v_hist, u_t, dg)  # H dg
            ht_dz = _apply(u_hist, v_t, dz)  # H^T dz
            den = (dz * h_dg).sum(1, keepdim=True)  # dz^T H dg
            u_new = (dz - h_dg) / den
            ok = _all_finite(u_new) & (den.abs() > torch.finfo(dtype).tiny)
            state.u[:, n] = torch.where(ok, u_new, 0.0)
            state.v[:, n] = torch.where(ok, ht_dz, 0.0)
            state.count = n + 1
        state.prev_z, state.prev_g = z_a, g
        _, v_hist, u_t, _ = state.window(state.count)
        # -H g = g - U^T (V g): the bits of -(-g + U^T (V g)), up to the sign of an exact zero
        step = g - torch.bmm(u_t, torch.bmm(v_hist, g.unsqueeze(2))).squeeze(2)
        z_next = z_a + step
        return z_next if z_next.dtype == z.dtype else z_next.to(z.dtype)
