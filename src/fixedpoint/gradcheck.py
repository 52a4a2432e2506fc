"""The gradient check: a backward mode's gradient against the exact implicit one. (Slightly over the project's
~400-line guide: one tool, its two calling forms and its replay of dropout masks and parametrizations.)

``J = df/dz`` is the per-sample Jacobian of a map ``f: (B, ...) -> (B, ...)`` at a point ``z``; ``f`` must not mix
samples (no batch statistics), so that sample ``b``'s output depends on sample ``b``'s input only.

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
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from ._forward import ATOL, CHECK_EVERY, MAX_STEPS, RTOL, SOLVER, Forward, SolverName, forward_options
from ._inputs import check_generator, check_map, check_tensor
from ._options import resolve
from ._solution import Solution
from ._solve import solve
from .backward import BACKWARDS, Backward, Implicit
from .dropout import PassLocal, PassScope, VariationalDropout, active_scope, pass_scope
from .nn import DEQ
from .solvers import Solver

__all__ = ["GradientCheck", "ParameterCheck", "check_gradients"]

Map = Callable[[torch.Tensor], torch.Tensor]

#: Largest per-sample state size for which ``reference="auto"`` builds dense Jacobians (one vector-Jacobian
#: product per state element, then a batched ``n x n`` solve).
DENSE_LIMIT = 256


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
    return [(m, name, buf, buf.detach().clone()) for m in module.modules()
            for name, buf in m.named_buffers(recurse=False)]


def _restore_buffers(saved: _Saved) -> None:
    with torch.no_grad():
        for m, name, buf, value in saved:
            setattr(m, name, buf)  # the same tensor object: state_dict, DDP and optimizers may hold it
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
            scope.set_mask(m, mask)  # type: ignore[arg-type]
        else:
            scope.claim(m)


@dataclass(frozen=True, eq=False)
class _Target:
    """What one gradient check differentiates, whichever way it was called."""

    fn: Map  # z -> f(z), the map of the tested solve
    z0: torch.Tensor
    params: list[torch.Tensor]
    labels: list[str]
    mode: Backward
    options: Forward
    layer: DEQ | None = None
    x: torch.Tensor | None = None
    module: torch.nn.Module | None = None  # whose pass (dropout masks, power steps, buffers) the check is


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
    ``u = (I - J)^{-T} g`` (the module docstring of ``fixedpoint.gradcheck``), per parameter and overall. Two ways to call it::

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
    forward = {"solver": solver, "max_steps": max_steps, "rtol": rtol, "atol": atol}
    if isinstance(f, DEQ):
        target = _layer_target(f, z0, x, params, backward, forward)
    else:
        target = _map_target(f, z0, x, params, backward, forward)
    check_generator(generator, target.z0.device)
    return _check(target, reference, generator)


def _layer_target(layer: DEQ, z0: object, x: object, params: Iterable[torch.Tensor] | None,
                  backward: object, forward: dict[str, object]) -> _Target:
    """``check_gradients(layer, x=x, ...)``: the layer's parameters and options unless given."""
    if x is None:
        raise ValueError("x is required when checking a DEQ layer: the layer is called as layer(x)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    z0 = torch.zeros_like(x) if z0 is None else check_tensor(z0, "z0").detach()
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
    mode = layer.backward_mode if backward is None else resolve(backward, BACKWARDS, Backward, "backward")
    if mode is None:
        raise ValueError("the layer was built with backward=None (not differentiated); pass backward= to "
                         "choose the mode to test")
    o = layer.options
    options = forward_options(**{name: getattr(o, name) if value is None else value
                                 for name, value in forward.items()}, check_every=o.check_every)
    return _Target(fn=lambda z: layer.f(z, x), z0=z0, params=param_list,
                   labels=[names.get(id(p), "x") for p in param_list], mode=mode, options=options,
                   layer=layer, x=x, module=layer.f)


def _map_target(f: object, z0: object, x: object, params: Iterable[torch.Tensor] | None, backward: object,
                forward: dict[str, object]) -> _Target:
    """``check_gradients(f, z0, params=..., backward=...)``: :func:`fixedpoint.solve`'s defaults unless given."""
    check_map(f)
    if x is not None:
        raise ValueError("x is only for a DEQ layer; a map f(z) closes over its inputs (list them in params)")
    if z0 is None:
        raise ValueError("z0 is required when checking a map f(z)")
    z0 = check_tensor(z0, "z0").detach()
    if params is None:
        raise ValueError("params is required when checking a map f(z): the tensors f closes over that "
                         "should receive gradients")
    param_list = _check_params(params)
    if backward is None:
        raise ValueError("backward is required when checking a map f(z): the mode to test, e.g. JFB() or "
                         "'implicit'")
    mode = resolve(backward, BACKWARDS, Backward, "backward")
    defaults = {"solver": SOLVER, "max_steps": MAX_STEPS, "rtol": RTOL, "atol": ATOL}
    options = forward_options(**{name: defaults[name] if value is None else value
                                 for name, value in forward.items()}, check_every=CHECK_EVERY)
    return _Target(fn=f, z0=z0, params=param_list,  # type: ignore[arg-type]
                   labels=[f"params[{i}]" for i in range(len(param_list))], mode=mode, options=options,
                   module=f if isinstance(f, torch.nn.Module) else None)


def _check(target: _Target, reference: str, generator: torch.Generator | None) -> GradientCheck:
    """The check itself, for either calling form."""
    fn, z0, param_list, mode, o = target.fn, target.z0, target.params, target.mode, target.options
    # The check is side-effect free: the caller's AdjointState records real training solves, so the tested mode
    # runs without it (no warm start from it, no record in it); the report names the mode as given.
    tested_mode = dataclasses.replace(mode, state=None) if isinstance(mode, Implicit) else mode
    # One pass of the map for the whole check, as layer(x) runs it: one dropout mask, one spectral-norm power step
    # (a map that keeps moving has no equilibrium to check). A map f(z) that is a module gets the same.
    module, layer = target.module, target.layer
    use_dense = reference == "dense" or (reference == "auto" and z0[0].numel() <= DENSE_LIMIT)
    ref_steps = max(10 * o.max_steps, 500)
    saved = _save_buffers(module)
    try:
        with contextlib.nullcontext() if module is None else pass_scope(module, generator=generator):
            # ---- the tested mode
            g = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
            with torch.enable_grad():
                sol = solve(fn, z0, solver=o.solver, backward=tested_mode, max_steps=o.max_steps, rtol=o.rtol,
                            atol=o.atol, check_every=o.check_every)
                tested = _grads(sol.z, param_list, g)
            if layer is None:
                # ---- the exact gradient of a map: in its own dtype (it cannot be copied), in the same pass
                exact, ref_sol, how = _reference(fn, z0, g, param_list, o.solver, ref_steps, use_dense)
                precision = f", {str(z0.dtype)[6:]}"
            else:
                # Copied after the tested solve's power steps, with the masks it drew, for the reference below.
                f_ref = copy.deepcopy(layer.f).to(torch.float64)
                masks = _pass_state(layer.f)
        if layer is not None:
            # ---- the exact gradient of a layer, on a float64 copy that sees the tested solve's map
            x = target.x
            ref_params_by_name = dict(f_ref.named_parameters())
            x_ref = x.detach().to(torch.float64).requires_grad_(x.requires_grad)  # type: ignore[union-attr]
            ref_params = [x_ref if p is x else ref_params_by_name[label]
                          for label, p in zip(target.labels, param_list)]
            with pass_scope(f_ref) as ref_scope:
                _replay_pass(ref_scope, f_ref, masks)
                exact, ref_sol, how = _reference(lambda z: f_ref(z, x_ref), z0.to(torch.float64),
                                                 g.to(torch.float64), ref_params, o.solver, ref_steps, use_dense)
            precision = ", float64 copy of the layer"
    finally:
        _restore_buffers(saved)

    # ---- compare (host reads from here on)
    rows, all_tested, all_exact = [], [], []
    for label, p, t, e in zip(target.labels, param_list, tested, exact):
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
