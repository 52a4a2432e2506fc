"""Anderson acceleration (type II), with a scale-free ridge and a float32-or-better small system."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Solver, algebra_dtype

__all__ = ["Anderson"]


class _AndersonState:
    def __init__(self, x: torch.Tensor, g: torch.Tensor, gram: torch.Tensor) -> None:
        self.x = x  # (B, m, D) past iterates z_i
        self.g = g  # (B, m, D) past residuals g_i = f(z_i) - z_i
        self.gram = gram  # (B, m, m) g_i . g_j, kept up to date one row per step


@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration over the last ``memory`` iterates.

    With residuals ``g_i = f(z_i) - z_i`` of the stored iterates, each step solves the small problem
    ``min_a ||sum_i a_i g_i||^2 + lam ||a||^2`` subject to ``sum_i a_i = 1``, whose solution is
    ``a = w / sum(w)`` with ``(G G^T + lam I) w = 1``, and moves to ``z <- sum_i a_i (z_i + damping * g_i)``
    (Walker & Ni, 2011). It mixes from the first step (with one stored iterate it is a damped iteration step).

    Robustness, where common implementations break:
      * the ridge is relative, ``lam = regularization * trace(G G^T) / m``, so scaling the problem by any factor
        leaves every step unchanged;
      * the Gram matrix is updated one row per step and the ``m x m`` system is solved in float32 (float64 for
        float64 states) even for bf16/fp16 states; the history is kept in that precision too;
      * a singular or non-finite system, or all-zero residuals, never raise: that sample takes a plain damped
        step instead.

    Memory: two ``(B, memory, D)`` buffers in the algebra dtype.

    Args:
        memory: number of past iterates mixed, at least 1 (1 is damped iteration).
        damping: weight of the residual in the mix, in ``(0, 1]``.
        regularization: relative ridge, non-negative.

    Raises:
        ValueError: on an out-of-range argument.
    """

    memory: int = 5
    damping: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self) -> None:
        if not (isinstance(self.memory, int) and not isinstance(self.memory, bool) and self.memory >= 1):
            raise ValueError(f"Anderson: memory must be an int >= 1, got {self.memory!r}")
        if not (isinstance(self.damping, (int, float)) and 0.0 < self.damping <= 1.0):
            raise ValueError(f"Anderson: damping must be a number in (0, 1], got {self.damping!r}")
        if not (isinstance(self.regularization, (int, float)) and self.regularization >= 0.0):
            raise ValueError(f"Anderson: regularization must be a number >= 0, got {self.regularization!r}")

    def init(self, z: torch.Tensor) -> _AndersonState:
        batch, dim = z.shape
        dtype = algebra_dtype(z.dtype)
        x = z.new_zeros(batch, self.memory, dim, dtype=dtype)
        g = z.new_zeros(batch, self.memory, dim, dtype=dtype)
        gram = z.new_zeros(batch, self.memory, self.memory, dtype=dtype)
        return _AndersonState(x, g, gram)

    def step(self, state: _AndersonState, z: torch.Tensor, fz: torch.Tensor, k: int) -> torch.Tensor:
        dtype = state.x.dtype
        i = k % self.memory  # ring-buffer slot of this iterate
        n = min(k + 1, self.memory)  # slots in use: 0..n-1
        z_a = z.to(dtype)
        g = fz.to(dtype) - z_a
        state.x[:, i] = z_a
        state.g[:, i] = g
        row = torch.bmm(state.g[:, :n], g.unsqueeze(2)).squeeze(2)  # (B, n): g_j . g
        state.gram[:, i, :n] = row
        state.gram[:, :n, i] = row
        gram = state.gram[:, :n, :n]  # (B, n, n)
        # Solve on the Gram matrix divided by its mean diagonal: the ridge is then relative, and neither tiny nor
        # huge residuals (nor exactly zero ones, at a converged sample) can overflow or underflow the system.
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1)  # (B,)
        safe = torch.where(scale > 0, scale, 1.0)
        eye = torch.eye(n, dtype=dtype, device=z.device)
        system = gram / safe[:, None, None] + self.regularization * eye
        ones = torch.ones(z.shape[0], n, 1, dtype=dtype, device=z.device)
        w, info = torch.linalg.solve_ex(system, ones)  # (B, n, 1)
        total = w.sum(1)  # (B, 1)
        alpha = w / total[:, :, None]
        ok = (info == 0) & (scale > 0) & (total[:, 0] != 0) & torch.isfinite(alpha).all(1)[:, 0]
        plain = torch.zeros_like(alpha)
        plain[:, i] = 1.0  # a damped iteration step from the newest iterate
        alpha = torch.where(ok[:, None, None], alpha, plain).transpose(1, 2)  # (B, 1, n)
        mixed = torch.bmm(alpha, state.x[:, :n])  # (B, 1, D)
        mixed = torch.baddbmm(mixed, alpha, state.g[:, :n], alpha=self.damping).squeeze(1)
        return mixed.to(z.dtype)
