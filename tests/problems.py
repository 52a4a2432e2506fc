"""Problems with known answers, shared by the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Affine:
    """``f(z) = z W^T + x`` with ``W = Q diag(spectrum) Q^T``: contraction factor ``max|spectrum|``.

    The fixed point is ``z* = x (I - W^T)^{-1}``, i.e. ``z*^T = (I - W)^{-1} x^T``.
    """

    w: torch.Tensor
    x: torch.Tensor

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.w.T + self.x

    @property
    def solution(self) -> torch.Tensor:
        eye = torch.eye(self.w.shape[0], dtype=self.w.dtype)
        return torch.linalg.solve(eye - self.w, self.x.T).T

    def scaled(self, factor: float) -> Affine:
        return Affine(self.w, self.x * factor)


def affine(rho: float, *, batch: int = 4, dim: int = 32, dtype: torch.dtype = torch.float64, seed: int = 0,
           symmetric_spectrum: bool = True) -> Affine:
    """A random affine map whose Jacobian has eigenvalues spread over ``[-rho, rho]`` (or ``[0, rho]``)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    lo = -rho if symmetric_spectrum else 0.0
    w = q @ torch.diag(torch.linspace(lo, rho, dim, dtype=torch.float64)) @ q.T
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return Affine(w.to(dtype), x.to(dtype))


def tanh_layer(*, batch: int = 3, dim: int = 5, scale: float = 0.6, seed: int = 0,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (spectral norm ``scale``) and input for ``f(z) = tanh(z W^T + x)``, both requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    w = scale * w / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return w.to(dtype).requires_grad_(), x.to(dtype).requires_grad_()


def tanh_map(w: torch.Tensor, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: torch.tanh(z @ w.T + x)


def dense_implicit_grad(w: torch.Tensor, x: torch.Tensor, z_star: torch.Tensor,
                        grad_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(dL/dW, dL/dx)`` for ``z* = tanh(z* W^T + x)`` from dense per-sample Jacobians (float64)."""
    gw, gx = torch.zeros_like(w), torch.zeros_like(x)
    for b in range(z_star.shape[0]):
        zb = z_star[b].detach()
        jac = torch.autograd.functional.jacobian(lambda z: torch.tanh(z @ w.T + x[b]), zb)
        eye = torch.eye(zb.numel(), dtype=jac.dtype)
        u = torch.linalg.solve((eye - jac).T, grad_z[b])  # u = (I - J)^{-T} g
        a, c = torch.autograd.grad(torch.tanh(zb @ w.T + x[b]), (w, x), u)
        gw, gx = gw + a, gx + c
    return gw, gx


@dataclass
class TwoLeaf:
    """A contraction on a 2-leaf state ``(h, c)``, ``h: (B, 3)``, ``c: (B, 2, 2)``, and the same map written on
    the concatenated ``(B, 7)`` tensor (``h`` first, then ``c`` flattened), the independent route to compare.

    ``h' = tanh(h A^T + vec(c) C^T + x)``, ``c' = 0.5 tanh(h E^T + c)`` (reshaped). Weights and ``x`` require
    grad."""

    a: torch.Tensor
    c: torch.Tensor
    e: torch.Tensor
    x: torch.Tensor

    def f(self, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        batch = h.shape[0]
        h_new = torch.tanh(h @ self.a.T + c.reshape(batch, 4) @ self.c.T + self.x)
        c_new = 0.5 * torch.tanh(h @ self.e.T + c.reshape(batch, 4)).reshape(batch, 2, 2)
        return h_new, c_new

    def f_cat(self, z: torch.Tensor) -> torch.Tensor:
        h_new, c_new = self.f((z[:, :3], z[:, 3:].reshape(-1, 2, 2)))
        return torch.cat([h_new, c_new.reshape(-1, 4)], dim=1)

    def zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.x.shape[0]
        return torch.zeros(batch, 3, dtype=self.x.dtype), torch.zeros(batch, 2, 2, dtype=self.x.dtype)

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return self.a, self.c, self.e, self.x


def two_leaf(*, batch: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> TwoLeaf:
    gen = torch.Generator().manual_seed(seed)

    def weight(rows: int, cols: int) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        return (0.4 * w / torch.linalg.matrix_norm(w, ord=2)).to(dtype).requires_grad_()

    x = torch.randn(batch, 3, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return TwoLeaf(weight(3, 3), weight(3, 4), weight(4, 3), x)
