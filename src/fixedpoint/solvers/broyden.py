"""Limited-memory ("good") Broyden method with restarts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Solver, algebra_dtype

__all__ = ["Broyden"]


class _BroydenState:
    def __init__(self, u: torch.Tensor, v: torch.Tensor) -> None:
        self.u = u  # (B, m, D)
        self.v = v  # (B, m, D)
        self.count = 0  # rank-one updates since the last restart (same for all samples)
        self.prev_z: torch.Tensor | None = None
        self.prev_g: torch.Tensor | None = None


def _apply(h_u: torch.Tensor, h_v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(-I + sum_j u_j v_j^T) x`` for a batch: ``-x + U^T (V x)``."""
    coef = torch.bmm(h_v, x.unsqueeze(2))  # (B, n, 1)
    return -x + torch.bmm(h_u.transpose(1, 2), coef).squeeze(2)


@dataclass(frozen=True)
class Broyden(Solver):
    """Broyden's "good" method on the root problem ``g(z) = f(z) - z = 0``.

    Keeps an approximation ``H = -I + sum_j u_j v_j^T`` of the inverse Jacobian of ``g`` and steps
    ``z <- z - H g(z)``. After each step the secant condition ``H dg = dz`` is imposed by the Sherman-Morrison
    update ``u = (dz - H dg) / (dz^T H dg)``, ``v = H^T dz``.

    The memory is bounded: after ``memory`` updates the approximation restarts from ``-I``. (Overwriting the
    oldest update instead, as torchdeq does, breaks the secant structure and diverges on plain linear
    contractions.) An update whose denominator vanishes or is not finite is skipped for that sample. The
    algebra runs in float32 or better.

    Memory: two ``(B, memory, D)`` buffers in the algebra dtype.

    Args:
        memory: rank-one updates kept before a restart, at least 1.

    Raises:
        ValueError: if ``memory`` is not an int >= 1.
    """

    memory: int = 30

    def __post_init__(self) -> None:
        if not (isinstance(self.memory, int) and not isinstance(self.memory, bool) and self.memory >= 1):
            raise ValueError(f"Broyden: memory must be an int >= 1, got {self.memory!r}")

    def init(self, z: torch.Tensor) -> _BroydenState:
        batch, dim = z.shape
        dtype = algebra_dtype(z.dtype)
        return _BroydenState(z.new_zeros(batch, self.memory, dim, dtype=dtype),
                             z.new_zeros(batch, self.memory, dim, dtype=dtype))

    def step(self, state: _BroydenState, z: torch.Tensor, fz: torch.Tensor, k: int) -> torch.Tensor:
        dtype = state.u.dtype
        z_a = z.to(dtype)
        g = fz.to(dtype) - z_a
        if state.prev_z is not None:
            if state.count == self.memory:  # restart from H = -I
                state.u.zero_()
                state.v.zero_()
                state.count = 0
            n = state.count
            u_hist, v_hist = state.u[:, :n], state.v[:, :n]
            dz = z_a - state.prev_z
            dg = g - state.prev_g
            h_dg = _apply(u_hist, v_hist, dg)  # H dg
            ht_dz = _apply(v_hist, u_hist, dz)  # H^T dz
            den = (dz * h_dg).sum(1, keepdim=True)  # dz^T H dg
            u_new = (dz - h_dg) / den
            ok = torch.isfinite(u_new).all(1, keepdim=True) & (den.abs() > torch.finfo(dtype).tiny)
            state.u[:, n] = torch.where(ok, u_new, 0.0)
            state.v[:, n] = torch.where(ok, ht_dz, 0.0)
            state.count = n + 1
        state.prev_z, state.prev_g = z_a, g
        n = state.count
        step = -_apply(state.u[:, :n], state.v[:, :n], g)  # -H g
        return (z_a + step).to(z.dtype)
