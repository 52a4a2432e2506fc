"""The one loop that drives every solver, forward and adjoint alike."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ._solution import status_of
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
    # One entry per asked step: the image computed at that step, shaped like z0 (with autograd history when
    # recorded with grad), or None where the loop stopped earlier. None when nothing was asked.
    kept: tuple[torch.Tensor | None, ...] | None = None


def _norm(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1, keepdim=keepdim, dtype=algebra_dtype(x.dtype))


def _residual(fz: torch.Tensor, z: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``||fz - z||`` per sample, subtracting in the algebra dtype (an fp16 difference can overflow)."""
    dtype = algebra_dtype(z.dtype)
    if fz.dtype != dtype:  # a cast to the same dtype is the identity, but still a dispatched call per step
        fz = fz.to(dtype)
    if z.dtype != dtype:
        z = z.to(dtype)
    return torch.linalg.vector_norm(fz - z, dim=1, keepdim=keepdim)


def _within(residual: torch.Tensor, fz: torch.Tensor, rtol: float, atol: float, keepdim: bool = False
            ) -> torch.Tensor:
    """``residual <= atol + rtol * ||fz||``. ``rtol * ||fz||`` is a zero, positive, inf or NaN, so adding
    ``atol = 0`` changes no comparison and is skipped (one op fewer per check)."""
    bound = rtol * _norm(fz, keepdim)
    if atol:
        bound = atol + bound
    return residual <= bound


def _autocast_enabled_before_2_4(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)`` for torch 2.2/2.3, whose ``is_autocast_enabled()`` takes no
    argument and answers for CUDA (from 2.4 on, ``is_autocast_cpu_enabled`` is deprecated)."""
    return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


try:
    torch.is_autocast_enabled("cpu")  # torch >= 2.4: one query for every device type
    _autocast_enabled = torch.is_autocast_enabled
except TypeError:
    _autocast_enabled = _autocast_enabled_before_2_4


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The solver's own algebra runs outside the caller's autocast (bmm would drop to bf16/fp16 there); ``f``
    keeps the caller's context.

    Entering ``torch.autocast(enabled=False)`` costs a few microseconds of Python on every step, so when autocast
    is already off on this device (the usual case) there is nothing to switch off and a no-op context is
    returned. Asked once per loop: ``f`` runs in the caller's context, and its own ``autocast`` blocks restore the
    state they found on exit. Under ``torch.compile`` the answer is guarded like the rest of the autocast state.
    """
    if device.type in ("cpu", "cuda") and _autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


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
    nonfinite = ~(residual < math.inf)  # a norm is >= 0, inf or NaN: `< inf` is isfinite in one op
    converged = _within(residual, fz, rtol, atol)
    if on_nonfinite == "raise":
        _raise_if_nonfinite(nonfinite, num_steps)
    return residual, converged, status_of(converged, nonfinite)


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
    keep: tuple[int, ...] | None = None,
    keep_grad: bool = False,
) -> LoopResult:
    """Iterate ``solver`` on ``f`` from ``z0`` without autograd. ``max_steps >= 1``.

    With ``early_stop`` the lowest-residual iterate of each sample is tracked and the loop stops, checking every
    ``check_every`` steps (the only host-device sync), once every sample has converged or gone non-finite.
    Without it, exactly ``max_steps`` applications run with no sync and the last iterate's image is returned;
    ``rtol``/``atol`` then only decide the reported ``converged``. ``f`` must return a tensor shaped and typed
    like ``z0`` (:func:`fixedpoint.solve` wraps the user's map to guarantee it).

    At each step ``k`` (from 1) listed in ``keep`` the image ``f(z_{k-1})`` is kept, computed with autograd if
    ``keep_grad`` (its input, an iterate of this no-grad loop, has no history), and the loop goes on with its
    detached value: no extra application of ``f`` and no sync.
    """
    shape, dtype = z0.shape, z0.dtype
    batch = shape[0]

    if z0.dim() == 2:  # already (B, D): the view and reshape below would be identities, two calls per step
        apply = f
    else:

        def apply(z_flat: torch.Tensor) -> torch.Tensor:
            return f(z_flat.view(shape)).reshape(batch, -1)

    # loop index (step - 1) -> position in `keep`; an empty dict when nothing is kept, so that the per-step
    # membership test is all the plain loop pays
    slots = {} if keep is None else {step - 1: i for i, step in enumerate(keep)}
    kept: list[torch.Tensor | None] = [None] * len(slots)

    def apply_kept(z_flat: torch.Tensor, k: int) -> torch.Tensor:
        with torch.set_grad_enabled(keep_grad):
            fz_kept = apply(z_flat)
            kept[slots[k]] = fz_kept.reshape(shape)  # a view made under no_grad would cut the graph
        return fz_kept.detach()

    no_autocast = _no_autocast(z0.device)
    z = z0.reshape(batch, -1)
    with no_autocast:
        state = solver.init(z)
    residuals: list[torch.Tensor] = []

    if not early_stop:
        for k in range(max_steps - 1):
            fz = apply_kept(z, k) if k in slots else apply(z)
            with no_autocast:
                if trace:
                    residuals.append(_residual(fz, z))
                z = solver.step(state, z, fz, k)
        fz = apply_kept(z, max_steps - 1) if max_steps - 1 in slots else apply(z)
        with no_autocast:
            residual, converged, status = report(fz, z, rtol=rtol, atol=atol, on_nonfinite=on_nonfinite,
                                                 num_steps=max_steps)
        if trace:
            residuals.append(residual)
        return LoopResult(z=fz.view(shape), residual=residual, converged=converged, status=status,
                          num_steps=max_steps, trace=torch.stack(residuals) if trace else None,
                          kept=None if keep is None else tuple(kept))

    # Per-sample quantities are kept as (B, 1) columns, so that they broadcast against (B, D) without a view.
    best_fz = torch.empty_like(z)
    best_res = torch.full((batch, 1), math.inf, dtype=algebra_dtype(dtype), device=z.device)
    # The largest residual so far. torch.maximum propagates NaN, so it is finite exactly while every residual has
    # been: one op per step where a non-finite flag takes three (isfinite alone is a four-op composite).
    peak = torch.zeros((batch, 1), dtype=best_res.dtype, device=z.device)
    num_steps = 0
    for k in range(max_steps):
        fz = apply_kept(z, k) if k in slots else apply(z)
        num_steps += 1
        with no_autocast:
            res = _residual(fz, z, keepdim=True)
            if trace:
                residuals.append(res)
            better = res < best_res  # NaN never compares better, so a non-finite step cannot replace the best
            if k == 0:
                best_fz.copy_(fz)  # a sample that is non-finite from the start returns its (non-finite) first image
            torch.where(better, fz, best_fz, out=best_fz)
            torch.where(better, res, best_res, out=best_res)
            torch.maximum(peak, res, out=peak)
            last = k == max_steps - 1
            if last or (k + 1) % check_every == 0:
                converged = _within(best_res, best_fz, rtol, atol, keepdim=True)
                # finite <= converged (on bools: not finite, or converged): every sample has converged or gone
                # non-finite
                if bool((peak < math.inf).le(converged).all()):  # the one host-device sync
                    break
            if not last:
                z = solver.step(state, z, fz, k)
    converged = converged.view(batch)
    nonfinite = ~((peak.view(batch) < math.inf) | converged)  # went non-finite at some step, and not converged
    if on_nonfinite == "raise":
        _raise_if_nonfinite(nonfinite, num_steps)
    return LoopResult(
        z=best_fz.view(shape), residual=best_res.view(batch), converged=converged,
        status=status_of(converged, nonfinite), num_steps=num_steps,
        trace=torch.stack(residuals).view(-1, batch) if trace else None,
        kept=None if keep is None else tuple(kept),
    )
