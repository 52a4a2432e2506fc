"""Anderson acceleration (type II), with a scale-free ridge and a float32-or-better small system."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._options import check_fraction, check_int, check_tol
from ._base import Solver, algebra_dtype

__all__ = ["Anderson"]


# --- view caches --------------------------------------------------------------------------------------------
# Speed only, no numerics: on small problems every dispatched call (a slice, an index, a constant) costs about as
# much as the arithmetic of a step, so the views a step needs are made once and reused. `benchmarks/solvers.py`
# measures the overhead they remove (its TARGETS); the Anderson algebra itself is in `Anderson.step` below.

class _Slots:
    """Views into the history for one step: ring-buffer slot ``i`` written, slots ``0..n-1`` in use.

    Made on first use of each ``(i, n)`` pair (``2 * memory - 1`` pairs, from ``memory`` per-slot and ``memory``
    per-window sets of views) and reused, so that a step spends no calls on slicing, indexing or constants.
    """

    def __init__(self, state: _AndersonState, i: int, n: int) -> None:
        self.x_i, self.g_i, self.g_col = state.slot(i)  # (B, D), (B, D), (B, D, 1)
        self.x_hist, self.g_hist, self.gram, self.diagonal, self.ridge, self.ones = state.window(n)
        self.gram_row = state.gram.select(1, i).narrow(1, 0, n).unsqueeze(2)  # (B, n, 1)
        self.gram_col = state.gram.narrow(1, 0, n).narrow(2, i, 1)  # (B, n, 1)
        self.plain = state.eye.narrow(0, 0, n).narrow(1, i, 1)  # (n, 1): the weights of a plain step from slot i


class _AndersonState:
    def __init__(self, x: torch.Tensor, g: torch.Tensor, gram: torch.Tensor, regularization: float) -> None:
        self.x = x  # (B, m, D) past iterates z_i (slots 0..n-1 in use)
        self.g = g  # (B, m, D) past residuals g_i = f(z_i) - z_i
        self.gram = gram  # (B, m, m) g_i . g_j, kept up to date one row per step
        batch, memory, _ = x.shape
        like = {"dtype": x.dtype, "device": x.device}
        self.eye = torch.eye(memory, **like)
        self.ridge = regularization * self.eye
        self.ones = torch.ones(batch, memory, 1, **like)  # right-hand side of the small system
        self.one = torch.ones((), **like)
        self._slots: dict[tuple[int, int], _Slots] = {}
        self._slot: dict[int, tuple[torch.Tensor, ...]] = {}
        self._window: dict[int, tuple[torch.Tensor, ...]] = {}

    def slots(self, i: int, n: int) -> _Slots:
        found = self._slots.get((i, n))
        if found is None:
            found = self._slots[i, n] = _Slots(self, i, n)
        return found

    def slot(self, i: int) -> tuple[torch.Tensor, ...]:
        if i not in self._slot:
            x_i, g_i = self.x.select(1, i), self.g.select(1, i)
            self._slot[i] = (x_i, g_i, g_i.unsqueeze(2))
        return self._slot[i]

    def window(self, n: int) -> tuple[torch.Tensor, ...]:
        if n not in self._window:
            gram = self.gram.narrow(1, 0, n).narrow(2, 0, n)  # (B, n, n)
            self._window[n] = (self.x.narrow(1, 0, n), self.g.narrow(1, 0, n), gram,
                               torch.diagonal(gram, dim1=1, dim2=2).unsqueeze(1),  # (B, 1, n)
                               self.ridge.narrow(0, 0, n).narrow(1, 0, n), self.ones.narrow(1, 0, n))
        return self._window[n]

# --- end of the view caches ----------------------------------------------------------------------------------


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
        regularization: relative ridge, finite and non-negative.

    Raises:
        ValueError: on an out-of-range argument.
    """

    memory: int = 5
    damping: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self) -> None:
        check_int(self.memory, "Anderson: memory", 1)
        check_fraction(self.damping, "Anderson: damping")
        check_tol(self.regularization, "Anderson: regularization")

    def init(self, z: torch.Tensor) -> _AndersonState:
        batch, dim = z.shape
        dtype = algebra_dtype(z.dtype)
        # Uninitialised: only slots in use are read, each written first (zeroing would be a pass for nothing).
        x = z.new_empty(batch, self.memory, dim, dtype=dtype)
        g = z.new_empty(batch, self.memory, dim, dtype=dtype)
        gram = z.new_empty(batch, self.memory, self.memory, dtype=dtype)
        return _AndersonState(x, g, gram, self.regularization)

    def step(self, state: _AndersonState, z: torch.Tensor, fz: torch.Tensor, k: int) -> torch.Tensor:
        # Every call is counted: on small problems each costs about as much as the arithmetic it does. The views,
        # the ridge, the right-hand side and the fallback weights are made once per (slot, slots in use) pair.
        dtype = state.x.dtype
        i = k % self.memory  # ring-buffer slot of this iterate
        n = min(k + 1, self.memory)  # slots in use: 0..n-1
        s = state.slots(i, n)
        s.x_i.copy_(z)  # z in the algebra dtype (exact: the cast only widens)
        # g = f(z) - z into its slot (not sub(out=) on the slot: torch.compile refuses a non-contiguous out=)
        s.g_i.copy_((fz if fz.dtype == dtype else fz.to(dtype)) - s.x_i)
        row = torch.bmm(s.g_hist, s.g_col)  # (B, n, 1): g_j . g
        s.gram_row.copy_(row)
        s.gram_col.copy_(row)
        # Solve on the Gram matrix divided by its mean diagonal: the ridge is then relative, and neither tiny nor
        # huge residuals (nor exactly zero ones, at a converged sample) can overflow or underflow the system.
        scale = s.diagonal.mean(2, keepdim=True)  # (B, 1, 1)
        positive = scale > 0
        safe = torch.where(positive, scale, state.one)
        system = torch.addcdiv(s.ridge, s.gram, safe)  # gram / safe + ridge
        w, info = torch.linalg.solve_ex(system, s.ones)  # (B, n, 1)
        alpha = w / w.sum(1, keepdim=True)
        # A sample takes the plain step where the system is singular, its residuals are all zero, or a weight is
        # not finite (which covers sum(w) = 0: each w_j / 0 is then inf or NaN). x - x is 0 for finite x and NaN
        # otherwise, so one sum tells whether all n weights are finite (isfinite and all would take five ops).
        ok = ((alpha - alpha).sum(1, keepdim=True) == 0) & positive & (info == 0).view(-1, 1, 1)
        alpha = torch.where(ok, alpha, s.plain).transpose(1, 2)  # (B, 1, n)
        mixed = torch.bmm(alpha, s.x_hist)  # (B, 1, D)
        mixed = torch.baddbmm(mixed, alpha, s.g_hist, alpha=self.damping).squeeze(1)
        return mixed if mixed.dtype == z.dtype else mixed.to(z.dtype)
