"""The spectral radius of a map's Jacobian, by power iteration with a Rayleigh-Ritz step.

``J = df/dz`` is the per-sample Jacobian of a map ``f: (B, ...) -> (B, ...)`` at a point ``z``; ``f`` must not mix
samples (no batch statistics), so that sample ``b``'s output depends on sample ``b``'s input only.

**Spectral radius.** ``f`` contracts near ``z`` when ``rho(J) < 1``. Power iteration ``v <- J^T v / ||J^T v||``
(one vector-Jacobian product of a single recorded ``f(z)`` per step; ``J^T`` has ``J``'s eigenvalues) turns ``v``
towards the dominant invariant subspace. The dominant eigenvalue of a real matrix is either real or one of a
complex-conjugate pair, and for a pair (or for ``+-r``) the iterate rotates in a plane instead of converging, so a
Rayleigh quotient ``v^T J^T v`` oscillates. The estimate therefore comes from the Ritz values of the
2-dimensional Krylov space ``span{v, J^T v}`` after the power steps: the eigenvalues ``theta`` of the ``2 x 2``
matrix ``H = Q^T J^T Q`` (``Q`` an orthonormal basis), exact whenever that plane is invariant and converging at the
rate ``|lambda_3 / lambda_1|^k`` otherwise. Each comes with its Ritz residual ``||J^T Q y - theta Q y||`` (free
from the Arnoldi recurrence), and the estimate is the largest ``|theta|`` among those whose residual is within a
factor 2 of the smallest (or below ``sqrt(eps) ||J^T v||``): once a real dominant eigenvector has converged, the
other Ritz value comes from a direction that cannot represent the next (possibly complex) eigenvalues, and for a
non-normal ``J`` its modulus can exceed ``rho``; its large residual gives it away. When ``J^T v`` is parallel to
``v`` the plane degenerates to the line and the estimate is ``|v^T J^T v|``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._inputs import check_generator, check_map, check_output, check_tensor
from ._options import check_int
from .solvers._base import algebra_dtype

__all__ = ["spectral_radius"]

Map = Callable[[torch.Tensor], torch.Tensor]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


def _unit(a: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    # a zero vector (J nilpotent on it) stays zero instead of becoming NaN
    return a / norm.clamp_min(torch.finfo(a.dtype).tiny)


def spectral_radius(f: Map, z: torch.Tensor, *, num_iterations: int = 50,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Estimate the spectral radius ``max |lambda(J_f(z))|`` per sample, by power iteration.

    Records ``f(z)`` once, then spends ``num_iterations + 2`` batched vector-Jacobian products on it (each one
    backward pass through ``f`` for the whole batch, no further evaluations of ``f``): ``num_iterations`` power
    steps, then two for the Rayleigh-Ritz step on ``span{v, J^T v}`` described in the module docstring, which
    handles a complex-conjugate or ``+-r`` dominant pair. No host syncs; the result carries no gradient, and
    no ``.grad`` is touched. A value near or above 1 means ``f`` is not a contraction near ``z``.

    Convergence: the error falls like ``|lambda_3 / lambda_1|^k`` (eigenvalues by decreasing modulus), so
    ``k = log(accuracy) / log|lambda_3 / lambda_1|`` steps suffice. Before that, and for a strongly non-normal
    ``J`` with a small gap, estimates can overshoot (Ritz values lie in the field of values, which can reach
    beyond the spectrum); raise ``num_iterations`` until the estimate settles.

    Args:
        f: the map ``(B, ...) -> (B, ...)``, returning a tensor shaped like ``z``.
        z: the point ``(B, ...)``, floating point.
        num_iterations: power steps, at least 1.
        generator: source of the random start vector, on ``z``'s device; ``None`` uses the global one.

    Returns:
        ``(B,)`` float32 (float64 for float64 ``z``), non-negative.

    Raises:
        TypeError: ``f`` is not callable or returns a non-tensor, ``z`` is not a floating-point tensor,
            ``generator`` is not a ``torch.Generator``.
        ValueError: ``num_iterations`` is not an int >= 1, ``generator`` is on another device, or ``f(z)`` is
            not shaped like ``z``.
        RuntimeError: called under ``torch.inference_mode`` (the products need autograd).
    """
    check_map(f)
    z = check_tensor(z, "z")
    check_int(num_iterations, "num_iterations", 1)
    check_generator(generator, z.device)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("spectral_radius needs autograd for its vector-Jacobian products; call it outside "
                           "torch.inference_mode (torch.no_grad is fine)")
    batch, dtype = z.shape[0], algebra_dtype(z.dtype)
    z_in = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = check_output(f(z_in), batch)
    if fz.shape != z.shape:
        raise ValueError(f"f(z) must be shaped like z {tuple(z.shape)}, got {tuple(fz.shape)}")

    def vjp(u: torch.Tensor) -> torch.Tensor:  # u -> J^T u, flattened per sample
        if not fz.requires_grad:
            return torch.zeros_like(u)  # f ignores z as far as autograd can see: J = 0
        (ju,) = torch.autograd.grad(fz, z_in, u.reshape(fz.shape).to(fz.dtype), retain_graph=True,
                                    allow_unused=True)
        return torch.zeros_like(u) if ju is None else ju.reshape(batch, -1).to(dtype)

    with torch.no_grad():
        n = z[0].numel()
        v = _unit(torch.randn(batch, n, generator=generator, device=z.device, dtype=z.dtype).to(dtype))
        for _ in range(num_iterations):
            v = _unit(vjp(v))
        # Rayleigh-Ritz on span{q1, A q1}, A = J^T: two Arnoldi steps, each re-orthogonalised once for accuracy
        tiny = torch.finfo(dtype).tiny
        q1, w1 = v, vjp(v)
        scale = torch.linalg.vector_norm(w1, dim=1)
        h11 = _dot(q1, w1)
        r = w1 - h11[:, None] * q1
        correction = _dot(q1, r)
        r, h11 = r - correction[:, None] * q1, h11 + correction
        h21 = torch.linalg.vector_norm(r, dim=1)
        # Below rounding level r is noise, not a Krylov direction: the line through q1 is invariant.
        degenerate = h21 <= 100 * torch.finfo(dtype).eps * math.sqrt(n) * scale
        h21 = torch.where(degenerate, 0.0, h21)
        q2 = torch.where(degenerate[:, None], 0.0, r / h21.clamp_min(tiny)[:, None])
        w2 = vjp(q2)
        h12, h22 = _dot(q1, w2), _dot(q2, w2)
        r2 = w2 - h12[:, None] * q1 - h22[:, None] * q2
        r2 = r2 - _dot(q1, r2)[:, None] * q1 - _dot(q2, r2)[:, None] * q2
        h32 = torch.linalg.vector_norm(r2, dim=1)
        # Ritz values theta = t +- sqrt(t^2 - det) of H = [[h11, h12], [h21, h22]], in real arithmetic
        half_trace, det = (h11 + h22) / 2, h11 * h22 - h12 * h21
        disc = half_trace.square() - det
        root, imag2 = disc.clamp_min(0).sqrt(), (-disc).clamp_min(0)  # disc < 0: a conjugate pair
        moduli, residuals = [], []
        for sign in (1.0, -1.0):
            theta = half_trace + sign * root  # the real part, for a conjugate pair
            moduli.append(torch.where(disc >= 0, theta.abs(), det.clamp_min(0).sqrt()))  # |theta|^2 = det
            # Ritz residual ||A Q y - theta Q y|| = h32 |y_2| for the unit eigenvector y ~ (theta - h22, h21)
            residuals.append(h32 * h21 / ((theta - h22).square() + imag2 + h21.square()).sqrt().clamp_min(tiny))
        modulus, residual = torch.stack(moduli, 1), torch.stack(residuals, 1)  # (B, 2) each
        # One real vector cannot represent a subdominant conjugate pair, so after a real eigenvector has
        # converged the other Ritz value is not an eigenvalue estimate at all, and for a non-normal J its modulus
        # can exceed rho. Keep the Ritz values whose residual is near the smallest, or converged (both members of
        # a dominant pair qualify), and take the largest modulus among them.
        keep = residual <= torch.maximum(2 * residual.amin(1), torch.finfo(dtype).eps ** 0.5 * scale)[:, None]
        return torch.where(keep, modulus, 0.0).amax(1)
