"""The one loop that drives every solver, forward and adjoint alike."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ._solution import Status
from .solvers._base import Solver, algebra_dtype

__all__ = ["LoopResult", "run_loop"]


@dataclass(frozen=True)
class LoopResult:
    z: torch.Tensor  # shaped like z0, no autograd history
    residual: torch.Tensor  # (B,)
    converged: torch.Tensor  # (B,) bool
    status: torch.Tensor  # (B,) int64
    num_steps: int
    trace: torch.Tensor | None


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=algebra_dtype(x.dtype))


def _residual(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``||fz - z||`` per sample, subtracting in the algebra dtype (an fp16 difference can overflow)."""
    dtype = algebra_dtype(z.dtype)
    return torch.linalg.vector_norm(fz.to(dtype) - z.to(dtype), dim=1)


def _no_autocast(device: torch.device):
    """The solver's own algebra runs outside the caller's autocast (bmm would drop to bf16/fp16 there); ``f``
    keeps the caller's context."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _status(converged: torch.Tensor, nonfinite: torch.Tensor) -> torch.Tensor:
    status = torch.where(nonfinite, int(Status.NONFINITE), int(Status.MAX_STEPS))
    return torch.where(converged, int(Status.CONVERGED), status)


def _raise_if_nonfinite(nonfinite: torch.Tensor, num_steps: int) -> None:
    if bool(nonfinite.any()):
        bad = nonfinite.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"solve: f produced non-finite values (NaN or Inf) for batch samples {bad[:10]}"
            f"{'...' if len(bad) > 10 else ''} within {num_steps} steps (on_nonfinite='raise')"
        )


def report(fz: torch.Tensor, z: torch.Tensor, *, rtol: float, atol: float, on_nonfinite: str,
           num_steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual, convergence and status of the iterate ``z`` (B, D) whose image is ``fz`` (B, D); raises for a
    non-finite sample when asked to (one sync)."""
    residual = _residual(fz, z)
    nonfinite = ~torch.isfinite(residual)
    converged = residual <= atol + rtol * _norm(fz)
    if on_nonfinite == "raise":
        _raise_if_nonfinite(nonfinite, num_steps)
    return residual, converged, _status(converged, nonfinite)


@torch.no_grad()
def run_loop(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    solver: Solver,
    *,
    max_steps: int,
    rtol: float,
    atol: float,
    early_stop: bool,
    check_every: int,
    trace: bool,
    on_nonfinite: Literal["report", "raise"],
) -> LoopResult:
    """Iterate ``solver`` on ``f`` from ``z0`` without autograd. ``max_steps >= 1``.

    With ``early_stop`` the lowest-residual iterate of each sample is tracked and the loop stops, checking every
    ``check_every`` steps (the only host-device sync), once every sample has converged or gone non-finite.
    Without it, exactly ``max_steps`` applications run with no sync and the last iterate's image is returned;
    ``rtol``/``atol`` then only decide the reported ``converged``. ``f`` must return a tensor shaped and typed
    like ``z0`` (:func:`fixedpoint.solve` wraps the user's map to guarantee it).
    """
    shape, dtype = z0.shape, z0.dtype
    batch = shape[0]

    def apply(z_flat: torch.Tensor) -> torch.Tensor:
        return f(z_flat.view(shape)).reshape(batch, -1)

    no_autocast = _no_autocast(z0.device)
    z = z0.reshape(batch, -1)
    with no_autocast:
        state = solver.init(z)
    residuals: list[torch.Tensor] = []

    if not early_stop:
        for k in range(max_steps):
            fz = apply(z)
            with no_autocast:
                if trace and k < max_steps - 1:
                    residuals.append(_residual(fz, z))
                if k < max_steps - 1:
                    z = solver.step(state, z, fz, k)
        with no_autocast:
            residual, converged, status = report(fz, z, rtol=rtol, atol=atol, on_nonfinite=on_nonfinite,
                                                 num_steps=max_steps)
        if trace:
            residuals.append(residual)
        return LoopResult(z=fz.view(shape), residual=residual, converged=converged, status=status,
                          num_steps=max_steps, trace=torch.stack(residuals) if trace else None)

    best_fz = torch.empty_like(z)
    best_res = torch.full((batch,), float("inf"), dtype=algebra_dtype(dtype), device=z.device)
    nonfinite = torch.zeros(batch, dtype=torch.bool, device=z.device)
    num_steps = 0
    for k in range(max_steps):
        fz = apply(z)
        num_steps += 1
        with no_autocast:
            res = _residual(fz, z)
            if trace:
                residuals.append(res)
            better = res < best_res  # NaN never compares better, so a non-finite step cannot replace the best
            if k == 0:
                best_fz.copy_(fz)  # a sample that is non-finite from the start returns its (non-finite) first image
            torch.where(better[:, None], fz, best_fz, out=best_fz)
            torch.where(better, res, best_res, out=best_res)
            nonfinite |= ~torch.isfinite(res)
            last = k == max_steps - 1
            if last or (k + 1) % check_every == 0:
                converged = best_res <= atol + rtol * _norm(best_fz)
                if bool((converged | nonfinite).all()):  # the one host-device sync
                    break
            if not last:
                z = solver.step(state, z, fz, k)
    nonfinite &= ~converged
    if on_nonfinite == "raise":
        _raise_if_nonfinite(nonfinite, num_steps)
    return LoopResult(
        z=best_fz.view(shape), residual=best_res, converged=converged, status=_status(converged, nonfinite),
        num_steps=num_steps, trace=torch.stack(residuals) if trace else None,
    )
