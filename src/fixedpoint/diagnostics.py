"""Diagnostics for deep-equilibrium models: Jacobian penalty, spectral radius, gradient check.

Throughout, ``J = df/dz`` is the per-sample Jacobian of a map ``f: (B, ...) -> (B, ...)`` at a point ``z``; ``f``
must not mix samples (no batch statistics), so that sample ``b``'s output depends on sample ``b``'s input only.

**Jacobian penalty** (Bai, Koltun & Kolter, 2021, "Stabilizing Equilibrium Models by Jacobian Regularization").
Penalising ``||J||_F^2`` at the equilibrium keeps ``f`` well conditioned, so the forward and adjoint solves stay
short. ``||J||_F^2 = tr(J^T J)`` is estimated with Hutchinson's (1989) trace estimator: for a random ``v`` with
``E[v v^T] = I``::

    E[ ||J v||^2 ] = E[ v^T (J^T J) v ] = tr(J^T J) = ||J||_F^2.

Writing ``A = J^T J``, one draw has variance ``2 ||A||_F^2`` for Gaussian ``v`` and
``2 (||A||_F^2 - sum_i A_ii^2)`` for Rademacher ``v`` (entries +-1), since the variance is
``(E[v_i^4] - 3) sum_i A_ii^2 + 2 ||A||_F^2`` and ``E[v_i^4]`` is 3 for a Gaussian, 1 for +-1. Hutchinson showed
the Rademacher choice is the minimum-variance one among i.i.d. zero-mean unit-variance entries; it is used here.
``J v`` is one forward-mode product (``torch.func.jvp``), which composes with ordinary backward and compiles
with ``torch.compile(fullgraph=True)``; the vector-Jacobian route ``v^T J`` would need a double backward
(``autograd.grad(create_graph=True)``), which torch 2.13's compiler refuses.

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

**Gradient check.** At ``z* = f(z*, theta)`` the implicit function theorem gives, for a loss ``L(z*)`` with
``g = dL/dz*``::

    dL/dtheta = u^T df/dtheta,        u = (I - J)^{-T} g.

JFB replaces ``(I - J)^{-1}`` by ``I``, multi-step JFB by ``I + J + ... + J^{k-1}``. :func:`check_gradients`
compares a backward mode's gradient of the random probe ``L = <g, z*>`` against this exact one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ._solution import Solution
from ._solve import BACKWARDS, SOLVERS, SolverName, _check_leaf, _check_steps, solve
from .backward import Backward, Implicit
from .dropout import PassLocal, PassScope, VariationalDropout, active_scope, pass_scope
from .nn import DEQ
from .solvers import Solver

__all__ = ["GradientCheck", "ParameterCheck", "check_gradients", "jacobian_penalty", "spectral_radius"]

Map = Callable[[torch.Tensor], torch.Tensor]

#: Largest per-sample state size for which ``reference="auto"`` builds dense Jacobians (one vector-Jacobian
#: product per state element, then a batched ``n x n`` solve).
DENSE_LIMIT = 256


# --- shared validation ----------------------------------------------------------------------------------------
# The solve module's leaf and count checks; these functions take tensor states only (no tuple/dict).

def _check_state(z: object, what: str) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (diagnostics take tensor states), got {type(z).__name__}")
    return _check_leaf(z, what)


def _check_tolerance(value: object, what: str) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


def _resolve(value: object, table: Mapping[str, type], kind: type, what: str) -> object:
    """An option object, or a name from the package's read-only table of defaults."""
    if isinstance(value, kind):
        return value
    if isinstance(value, str) and value in table:
        return table[value]()
    valid = f"a {kind.__name__} or one of {sorted(table)}"
    if not isinstance(value, str):
        raise TypeError(f"{what} must be {valid}, got {type(value).__name__}")
    raise ValueError(f"{what} must be {valid}, got {value!r}")


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_generator(generator: object, device: torch.device, what: str = "generator") -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{what} must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = generator.device
    if gen_device.type != device.type or (gen_device.index is not None and device.index is not None
                                          and gen_device.index != device.index):
        raise ValueError(f"{what} must be on the state's device {device} (the draws are made there), "
                         f"got one on {gen_device}")


def _check_map(f: object) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")


def _check_output(fz: object, batch: int) -> torch.Tensor:
    if not isinstance(fz, torch.Tensor):
        raise TypeError(f"f must return a tensor, got {type(fz).__name__}")
    if fz.dim() < 1 or fz.shape[0] != batch:
        raise ValueError(f"f(z) must keep the batch dimension {batch} of z, got shape {tuple(fz.shape)}")
    return fz


# --- 1. Jacobian penalty --------------------------------------------------------------------------------------

def _rademacher(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Entries +-1 with probability 1/2 each, on ``like``'s device and in its dtype."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device, dtype=like.dtype)
    return 2 * bits - 1


def _load_jvp_decompositions() -> None:
    """Load torch's forward-AD decompositions with its deprecation warning silenced.

    torch (2.13) registers them on the first forward-mode product by calling ``torch.jit.script``, which warns
    that it is deprecated; under warnings-as-errors (pytest with ``filterwarnings = error``) that first product
    would fail. Importing the module once, here, is what torch would do anyway. Under ``torch.compile`` the
    eager call that precedes tracing has loaded them already.
    """
    if torch.compiler.is_compiling() or "torch._decomp.decompositions_for_jvp" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")


def jacobian_penalty(f: Map, z: torch.Tensor, *, num_projections: int = 1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased Hutchinson estimate of ``||J_f(z)||_F^2`` per sample (Bai et al., 2021).

    Averages ``||J v||^2`` over ``num_projections`` Rademacher vectors ``v`` (lower variance than Gaussian ones;
    see the module docstring), each one forward-mode product through ``f`` (``num_projections`` evaluations of
    ``f``). Bai et al. divide by the state size ``d``; this returns the plain Frobenius norm, so divide by
    ``z[0].numel()`` to use their loss weights.

    Gradients: the result is differentiable with respect to ``f``'s parameters and the inputs ``f`` closes
    over, so it can be added to a loss. It is differentiated with respect to ``z`` exactly when ``z`` requires
    grad (``z`` is used as it is, never marked as requiring grad here): passing the differentiable
    ``Solution.z`` also carries the penalty's gradient through the solve's backward mode, while ``z.detach()``
    treats the equilibrium as a constant, as Bai et al. do (and costs no extra backward through the solve).

    Under ``torch.compile(fullgraph=True)`` pass ``generator=None``: torch 2.13's compiler cannot trace a
    ``torch.Generator`` argument. The global generator then supplies the draws (seed it with
    ``torch.manual_seed``); compiled random numbers may differ from eager ones.

    Every operation in ``f`` needs a forward-mode derivative. In torch 2.13 some have none and raise
    ``NotImplementedError``: ``scaled_dot_product_attention``'s fused kernel on CPU, so FPDM's attention block
    (CUDA unchecked; select the math kernel around the call, ``with torch.nn.attention.sdpa_kernel(
    torch.nn.attention.SDPBackend.MATH):``, which has forward-mode derivatives: checked on CPU), and ``out=`` ops
    such as a nested early-stopping :func:`fixedpoint.solve` inside ``f`` (use a fixed-step inner solve).

    Args:
        f: the map ``(B, ...) -> (B, ...)``; its output may have another shape, but must keep the batch.
        z: the point ``(B, ...)``, floating point, usually the equilibrium.
        num_projections: random vectors per sample, at least 1 (the variance falls as ``1/num_projections``).
        generator: source of the projections, on ``z``'s device; ``None`` uses that device's global generator.

    Returns:
        ``(B,)`` float32 (float64 for float64 ``z``), ``||J v||^2`` averaged over the projections.

    Raises:
        TypeError: ``f`` is not callable or returns a non-tensor, ``z`` is not a floating-point tensor,
            ``generator`` is not a ``torch.Generator``.
        ValueError: ``num_projections`` is not an int >= 1, ``generator`` is on another device, ``f(z)``
            lost the batch dimension.
    """
    _check_map(f)
    z = _check_state(z, "z")
    _check_steps(num_projections, "num_projections")
    _check_generator(generator, z.device)
    batch = z.shape[0]
    dtype = _accumulation_dtype(z.dtype)
    _load_jvp_decompositions()
    v = _rademacher((num_projections, *z.shape), z, generator)
    # forward AD refuses primals whose elements share memory (e.g. from expand); a copy only when needed
    z = z.contiguous()
    total = torch.zeros(batch, dtype=dtype, device=z.device)
    for p in range(num_projections):  # one JVP each; a Python loop unrolls under torch.compile
        _, jv = torch.func.jvp(f, (z,), (v[p],))
        jv = _check_output(jv, batch)
        total = total + jv.reshape(batch, -1).to(dtype).square().sum(dim=1)
    return total / num_projections


# --- 2. Spectral radius ---------------------------------------------------------------------------------------

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
    _check_map(f)
    z = _check_state(z, "z")
    _check_steps(num_iterations, "num_iterations")
    _check_generator(generator, z.device)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("spectral_radius needs autograd for its vector-Jacobian products; call it outside "
                           "torch.inference_mode (torch.no_grad is fine)")
    batch, dtype = z.shape[0], _accumulation_dtype(z.dtype)
    z_in = z.detach().requires_grad_()
    with torch.enable_grad():
        fz = _check_output(f(z_in), batch)
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


# --- 3. Gradient check ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParameterCheck:
    """One parameter's row of a :class:`GradientCheck`.

    Attributes:
        name: the parameter's name in the layer (``"x"`` for the layer input), or ``"params[i]"`` for a map.
        shape: the parameter's shape.
        cosine: cosine similarity between the tested and the exact gradient; NaN when either is zero.
        relative_error: ``||tested - exact|| / ||exact||``; 0 when both are zero, inf when only the exact one is.
        reached: whether the tested backward mode produced a gradient for it at all.
    """

    name: str
    shape: tuple[int, ...]
    cosine: float
    relative_error: float
    reached: bool


@dataclass(frozen=True)
class GradientCheck:
    """The result of :func:`check_gradients`. Printing it gives a table.

    Attributes:
        cosine: cosine similarity of all tested gradients (concatenated) with the exact ones.
        relative_error: ``||tested - exact|| / ||exact||`` over all of them.
        per_parameter: one :class:`ParameterCheck` per parameter, in the order given.
        converged: whether the tested mode's forward solve converged for every sample.
        reference_converged: whether the reference's tight solve did (if not, the "exact" gradient is not).
        backward: the backward mode tested.
        reference: how the exact gradient was computed, in words.
    """

    cosine: float
    relative_error: float
    per_parameter: tuple[ParameterCheck, ...]
    converged: bool
    reference_converged: bool
    backward: Backward
    reference: str

    def __str__(self) -> str:
        yes = {True: "yes", False: "NO"}
        overall = (f"  overall: cosine {self.cosine:.6f}, relative error {self.relative_error:.3e}; "
                   f"forward converged: {yes[self.converged]}, reference converged: {yes[self.reference_converged]}")
        lines = [f"check_gradients: {self.backward} vs {self.reference}", overall]
        width = max([len("parameter")] + [len(p.name) for p in self.per_parameter])
        lines.append(f"  {'parameter':<{width}}  {'shape':<14}  {'cosine':>9}  {'rel. error':>10}")
        for p in self.per_parameter:
            row = f"  {p.name:<{width}}  {p.shape!s:<14}  {p.cosine:>9.6f}  {p.relative_error:>10.3e}"
            lines.append(row if p.reached else row + "  no gradient reached it")
        return "\n".join(lines)


def _compare(tested: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    tested, exact = tested.double().flatten(), exact.double().flatten()
    tested_norm, exact_norm = tested.norm().item(), exact.norm().item()
    diff = (tested - exact).norm().item()
    cosine = (tested @ exact).item() / (tested_norm * exact_norm) if tested_norm and exact_norm else math.nan
    if exact_norm:
        relative = diff / exact_norm
    else:
        relative = 0.0 if tested_norm == 0 else math.inf
    return cosine, relative


def _tight_rtol(dtype: torch.dtype) -> float:
    """A relative residual the solvers reach reliably in ``dtype``, far below any backward mode's error."""
    return {torch.float64: 1e-11, torch.float32: 1e-6}.get(dtype, 1e-2)


def _grads(out: torch.Tensor, params: list[torch.Tensor], grad_out: torch.Tensor
           ) -> list[torch.Tensor | None]:
    if not out.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(out, params, grad_out, allow_unused=True))


def _dense_reference(f: Map, z_star: torch.Tensor, g: torch.Tensor, params: list[torch.Tensor]
                     ) -> list[torch.Tensor | None]:
    """``u^T df/dtheta`` with ``u = (I - J)^{-T} g`` from per-sample dense Jacobians (one VJP per row).

    The Jacobian rows come from ``f`` in its own dtype; the dense algebra runs in float64 (there is no LU for
    bf16/fp16, and float32 would cost digits on a nearly singular ``I - J``), and ``u`` is cast back to ``f``'s
    dtype for the final vector-Jacobian product.
    """
    batch, n = z_star.shape[0], z_star[0].numel()
    z_in = z_star.detach().requires_grad_()
    with torch.enable_grad():
        fz = f(z_in)
    jac = torch.zeros(batch, n, n, dtype=torch.float64, device=fz.device)  # jac[b, i, :] = d f_i / d z (sample b)
    if fz.requires_grad:
        for i in range(n):
            e = torch.zeros(batch, n, dtype=fz.dtype, device=fz.device)
            e[:, i] = 1
            (row,) = torch.autograd.grad(fz, z_in, e.reshape(fz.shape), retain_graph=True, allow_unused=True)
            if row is not None:
                jac[:, i, :] = row.reshape(batch, n).to(torch.float64)
    eye = torch.eye(n, dtype=jac.dtype, device=jac.device)
    u = torch.linalg.solve((eye - jac).transpose(1, 2), g.reshape(batch, n, 1).to(jac.dtype))
    return _grads(fz, params, u.reshape(fz.shape).to(fz.dtype))


def _reference(fn: Map, z0: torch.Tensor, g: torch.Tensor, params: list[torch.Tensor], solver: Solver,
               max_steps: int, dense: bool) -> tuple[list[torch.Tensor | None], Solution, str]:
    """The exact gradient of ``<g, z*>`` for ``params``: a tight solve, then the dense or the Implicit adjoint."""
    tight = _tight_rtol(z0.dtype)
    if dense:
        with torch.no_grad():
            ref_sol = solve(fn, z0, solver=solver, max_steps=max_steps, rtol=tight, atol=0.0)
        return _dense_reference(fn, ref_sol.z, g, params), ref_sol, "exact gradient, dense per-sample (I - J)^-T g"
    adjoint = Implicit(solver=solver, max_steps=max_steps, rtol=tight, atol=0.0)
    with torch.enable_grad():
        ref_sol = solve(fn, z0, solver=solver, backward=adjoint, max_steps=max_steps, rtol=tight, atol=0.0)
        exact = _grads(ref_sol.z, params, g)
    return exact, ref_sol, f"exact gradient, Implicit adjoint to rtol {tight:g}"


_Saved = list[tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]]


def _save_buffers(module: torch.nn.Module | None) -> _Saved:
    """Each buffer of ``module`` with a copy of its value (a spectral norm's ``u, v``, BatchNorm statistics)."""
    if module is None:
        return []
    return [(m, name, buf, buf.detach().clone()) for m in module.modules() for name, buf in m._buffers.items()
            if buf is not None]


def _restore_buffers(saved: _Saved) -> None:
    with torch.no_grad():
        for m, name, buf, value in saved:
            m._buffers[name] = buf  # the same tensor object: state_dict, DDP and optimizers may hold it
            buf.copy_(value)


def _pass_state(module: torch.nn.Module) -> list[torch.Tensor | None]:
    """For each stabiliser in ``module`` (``.modules()`` order), the dropout mask of the pass it is in, if any.
    Read inside the tested solve's scope, before it exits and drops the masks."""
    masks: list[torch.Tensor | None] = []
    for m in module.modules():
        if isinstance(m, PassLocal):
            scope = active_scope(m) if isinstance(m, VariationalDropout) else None
            masks.append(None if scope is None else scope.mask(m))
    return masks


def _replay_pass(scope: PassScope, module: torch.nn.Module, masks: list[torch.Tensor | None]) -> None:
    """Make ``scope`` (entered on ``module``, a deep copy of the tested map) the pass the tested solve ran in:
    each dropout reuses the tested mask, and each spectral norm counts as having taken its power step already
    (the copy was taken after that step, so its ``u, v`` are the ones the tested solve used)."""
    stabilisers = [m for m in module.modules() if isinstance(m, PassLocal)]
    assert len(stabilisers) == len(masks)  # a deep copy has the same modules in the same order
    for m, mask in zip(stabilisers, masks):
        if mask is not None:
            scope._state[id(m)] = mask  # what VariationalDropout stores on its first call in a scope
        else:
            scope.claim(m)


def check_gradients(
    f: DEQ | Map,
    z0: torch.Tensor | Solution | None = None,
    *,
    x: torch.Tensor | None = None,
    params: Iterable[torch.Tensor] | None = None,
    backward: Backward | Literal["jfb", "implicit"] | None = None,
    solver: Solver | SolverName | None = None,
    max_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    reference: Literal["auto", "dense", "implicit"] = "auto",
    generator: torch.Generator | None = None,
) -> GradientCheck:
    """Are my gradients flowing, and how close are they to the exact implicit gradient?

    Draws a random probe ``g = torch.randn(z0.shape, generator=generator, dtype=z0.dtype, device=z0.device)``
    (``x``'s shape for a layer without ``z0``), differentiates ``L = <g, z*>`` with the
    backward mode under test, and compares with the exact implicit gradient ``u^T df/dtheta``,
    ``u = (I - J)^{-T} g`` (module docstring), per parameter and overall. Two ways to call it::

        check_gradients(layer, x=x)                          # a DEQ: its parameters, its options
        check_gradients(f, z0, params=[w, b], backward=JFB())  # a map f(z) closing over w, b

    The reference solves ``z* = f(z*)`` tightly (relative residual 1e-11 in float64, 1e-6 in float32, 1e-2 in bf16/fp16, up to
    ``max(10 * max_steps, 500)`` steps with the same solver) and then, with ``reference="dense"`` (``"auto"``
    when a sample has at most 256 elements), builds each sample's Jacobian with one vector-Jacobian product per
    element and solves ``(I - J)^T u = g`` densely; with ``"implicit"`` it uses :class:`Implicit` with the same
    tight tolerances (for large states). For a :class:`DEQ` the reference runs on a float64 deep copy of
    ``layer.f`` (and of ``x``); a map cannot be copied, so its reference runs in its own dtype: pass a float64
    map for the sharpest check. The dense Jacobian algebra runs in float64 whatever the map's dtype (bf16 and
    fp16 maps included). ``f`` must not mix samples for the dense route.

    One pass, no side effects. The whole check is one forward pass of the map, as ``layer(x)`` is: the tested
    solve runs inside :func:`fixedpoint.pass_scope` on ``layer.f`` (masks drawn from ``generator``), so a
    training-mode :class:`~fixedpoint.VariationalDropout` draws one mask and a training-mode
    :func:`~fixedpoint.spectral_norm` takes one power step, and the reference differentiates that same map: the
    float64 copy is taken after the power step and runs in a scope of its own that reuses the tested solve's
    masks and takes no further step. Called inside your own ``pass_scope`` covering ``layer.f``, that scope
    decides (its masks are used, drawn now if not drawn yet). A map ``f(z)`` that is an ``nn.Module`` gets one
    scope around both solves; a map that merely closes over such modules (a lambda) is not seen, so call the
    check inside your own ``pass_scope`` covering them, which then serves both solves. Anything else random in
    ``f`` (``torch.nn.Dropout``) makes the comparison meaningless. Afterwards the buffers of ``layer.f`` (or of a
    module map) hold their values from before the call (a spectral norm's ``u, v``, BatchNorm statistics); an
    :class:`Implicit` mode's ``state`` is neither read nor written (the check runs the mode with
    ``state=None``, so no warm start from it and no record in it). Nothing is accumulated into ``.grad``.

    Args:
        f: a :class:`fixedpoint.DEQ` layer, or a map ``f(z)`` with ``(B, ...) -> (B, ...)``.
        z0: for a map, the initial state ``(B, ...)`` (required); for a layer, an optional warm start
            (default: zeros shaped like ``x``, as the layer does).
        x: the layer input; required for a layer, not allowed for a map (a map closes over its inputs).
        params: tensors requiring grad to differentiate. Required for a map; for a layer, defaults to its
            parameters that require grad, and may list any of them and ``x``.
        backward: the mode under test (:class:`JFB`, :class:`StochasticJFB`, :class:`Implicit`, or ``"jfb"``
            / ``"implicit"``). For a layer, ``None`` tests the layer's own mode; for a map it is required.
        solver, max_steps, rtol, atol: forward options of the tested solve; ``None`` takes the layer's (or
            :func:`fixedpoint.solve`'s defaults for a map).
        reference: ``"auto"``, ``"dense"`` or ``"implicit"``, as above.
        generator: source of the probe ``g`` and then of the pass's dropout masks, on the state's device;
            ``None`` uses the global one.

    Returns:
        A :class:`GradientCheck` (floats, read from the device once at the end).

    Raises:
        TypeError: a wrong type for ``f``, ``z0``, ``x``, ``params``, ``backward``, ``solver`` or ``generator``.
        ValueError: a missing or disallowed argument for the calling form, a parameter that does not require
            grad (or, for a layer, is neither its parameter nor ``x``), an option out of range.
    """
    # ---- validate everything before any compute
    if not isinstance(reference, str) or reference not in ("auto", "dense", "implicit"):
        raise ValueError(f"reference must be one of ['auto', 'dense', 'implicit'], got {reference!r}")
    if isinstance(z0, Solution):
        z0 = z0.z
    if isinstance(f, DEQ):
        layer = f
        if x is None:
            raise ValueError("x is required when checking a DEQ layer: the layer is called as layer(x)")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        z0 = torch.zeros_like(x) if z0 is None else _check_state(z0, "z0").detach()
        names = {id(p): name for name, p in layer.f.named_parameters()}
        if params is None:
            param_list = [p for p in layer.f.parameters() if p.requires_grad]
            if not param_list:
                raise ValueError("the layer has no parameters that require grad; pass params= (e.g. [x] with "
                                 "x.requires_grad_())")
        else:
            param_list = _check_params(params)
        for i, p in enumerate(param_list):
            if id(p) not in names and p is not x:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is neither a parameter of the layer's f "
                                 f"nor x")
        labels = [names.get(id(p), "x") for p in param_list]
        mode = layer.backward_mode if backward is None else _resolve(backward, BACKWARDS, Backward, "backward")
        if mode is None:
            raise ValueError("the layer was built with backward=None (not differentiated); pass backward= to "
                             "choose the mode to test")
        o = layer.options
        solver_ = o.solver if solver is None else _resolve(solver, SOLVERS, Solver, "solver")
        max_steps_ = o.max_steps if max_steps is None else max_steps
        rtol_ = o.rtol if rtol is None else rtol
        atol_ = o.atol if atol is None else atol
        check_every = o.check_every
        fn: Map = lambda z: layer.f(z, x)
    else:
        _check_map(f)
        if x is not None:
            raise ValueError("x is only for a DEQ layer; a map f(z) closes over its inputs (list them in params)")
        if z0 is None:
            raise ValueError("z0 is required when checking a map f(z)")
        z0 = _check_state(z0, "z0").detach()
        if params is None:
            raise ValueError("params is required when checking a map f(z): the tensors f closes over that "
                             "should receive gradients")
        param_list = _check_params(params)
        labels = [f"params[{i}]" for i in range(len(param_list))]
        if backward is None:
            raise ValueError("backward is required when checking a map f(z): the mode to test, e.g. JFB() or "
                             "'implicit'")
        mode = _resolve(backward, BACKWARDS, Backward, "backward")
        solver_ = _resolve("anderson" if solver is None else solver, SOLVERS, Solver, "solver")
        max_steps_ = 50 if max_steps is None else max_steps
        rtol_ = 1e-4 if rtol is None else rtol
        atol_ = 1e-6 if atol is None else atol
        check_every = 1
        fn = f  # type: ignore[assignment]
        layer = None
    _check_steps(max_steps_, "max_steps")
    _check_tolerance(rtol_, "rtol")
    _check_tolerance(atol_, "atol")
    _check_generator(generator, z0.device)
    assert mode is not None

    # The check is side-effect free: the caller's AdjointState records real training solves, so the tested mode
    # runs without it (no warm start from it, no record in it); the report names the mode as given.
    tested_mode = dataclasses.replace(mode, state=None) if isinstance(mode, Implicit) else mode
    # One pass of the map for the whole check, as layer(x) runs it: one dropout mask, one spectral-norm power step
    # (a map that keeps moving has no equilibrium to check). A map f(z) that is a module gets the same.
    module = layer.f if layer is not None else f if isinstance(f, torch.nn.Module) else None
    use_dense = reference == "dense" or (reference == "auto" and z0[0].numel() <= DENSE_LIMIT)
    ref_steps = max(10 * max_steps_, 500)
    saved = _save_buffers(module)
    try:
        with contextlib.nullcontext() if module is None else pass_scope(module, generator=generator):
            # ---- the tested mode
            g = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
            with torch.enable_grad():
                sol = solve(fn, z0, solver=solver_, backward=tested_mode, max_steps=max_steps_, rtol=rtol_,
                            atol=atol_, check_every=check_every)
                tested = _grads(sol.z, param_list, g)
            if layer is None:
                # ---- the exact gradient of a map: in its own dtype (it cannot be copied), in the same pass
                exact, ref_sol, how = _reference(fn, z0, g, param_list, solver_, ref_steps, use_dense)
                precision = f", {str(z0.dtype)[6:]}"
            else:
                # Copied after the tested solve's power steps, with the masks it drew, for the reference below.
                f_ref = copy.deepcopy(layer.f).to(torch.float64)
                masks = _pass_state(layer.f)
        if layer is not None:
            # ---- the exact gradient of a layer, on a float64 copy that sees the tested solve's map
            ref_params_by_name = dict(f_ref.named_parameters())
            x_ref = x.detach().to(torch.float64).requires_grad_(x.requires_grad)  # type: ignore[union-attr]
            ref_params = [x_ref if p is x else ref_params_by_name[label] for label, p in zip(labels, param_list)]
            with pass_scope(f_ref) as ref_scope:
                _replay_pass(ref_scope, f_ref, masks)
                exact, ref_sol, how = _reference(lambda z: f_ref(z, x_ref), z0.to(torch.float64),
                                                 g.to(torch.float64), ref_params, solver_, ref_steps, use_dense)
            precision = ", float64 copy of the layer"
    finally:
        _restore_buffers(saved)

    # ---- compare (host reads from here on)
    rows, all_tested, all_exact = [], [], []
    for label, p, t, e in zip(labels, param_list, tested, exact):
        t_flat = torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if t is None else t.double().flatten()
        e_flat = torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if e is None else e.double().flatten()
        cosine, relative = _compare(t_flat, e_flat)
        rows.append(ParameterCheck(name=label, shape=tuple(p.shape), cosine=cosine, relative_error=relative,
                                   reached=t is not None))
        all_tested.append(t_flat)
        all_exact.append(e_flat)
    cosine, relative = _compare(torch.cat(all_tested), torch.cat(all_exact))
    return GradientCheck(cosine=cosine, relative_error=relative, per_parameter=tuple(rows),
                         converged=bool(sol.converged.all()), reference_converged=bool(ref_sol.converged.all()),
                         backward=mode, reference=how + precision)


def _check_params(params: object) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"params must be an iterable of tensors (e.g. a list), got {type(params).__name__}")
    param_list = list(params)
    if not param_list:
        raise ValueError("params must not be empty")
    for i, p in enumerate(param_list):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad; nothing can reach it")
    return param_list
