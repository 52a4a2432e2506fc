"""``solve``: validate once, run the no-grad loop, hand the result to the backward mode."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import torch

from ._forward import ATOL, CHECK_EVERY, MAX_STEPS, RTOL, SOLVER, Forward, SolverName, forward_options, to_solution
from ._inputs import check_leaf, check_map
from ._options import resolve
from ._penalty import jacobian_penalty
from ._solution import Solution, State
from .backward import BACKWARDS, Backward
from .solvers import Solver

__all__ = ["BackwardName", "as_backward", "check_state", "solve", "solve_with"]

#: The names that stand alone for ``backward=`` (``"stochastic_jfb"`` needs options, see ``BACKWARDS``).
BackwardName = Literal["jfb", "implicit"]


def as_backward(backward: Backward | str | None) -> Backward | None:
    """``backward=`` of ``solve`` and ``DEQ`` as a :class:`Backward` (or ``None``)."""
    return resolve(backward, BACKWARDS, Backward, "backward", allow_none=True)


def _checked(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap ``f`` so that every output is a tensor shaped, typed and placed like ``z0``."""
    shape, dtype, device = z0.shape, z0.dtype, z0.device

    def checked(z: torch.Tensor) -> torch.Tensor:
        fz = f(z)
        if not isinstance(fz, torch.Tensor):
            raise TypeError(f"f must return a tensor like z0, got {type(fz).__name__}"
                            + (" (a tuple/dict state needs z0 of that structure)" if isinstance(fz, (tuple, dict))
                               else ""))
        if fz.shape != shape:
            raise ValueError(f"f(z) must have the shape of z0 {tuple(shape)}, got {tuple(fz.shape)}")
        if fz.device != device:
            raise ValueError(f"f(z) must be on z0's device {device}, got {fz.device}")
        if not fz.is_floating_point():
            raise TypeError(f"f(z) must be floating point, got {fz.dtype}")
        # e.g. bf16 outputs under autocast keep the state in z0's dtype (`to` of the same dtype returns fz
        # itself; the comparison spares that call on every step)
        return fz if fz.dtype == dtype else fz.to(dtype)

    return checked


# --- Tuple and dict states -------------------------------------------------------------------------------------

class _Layout:
    """Where each leaf of a tuple or dict state lives in one ``(B, D)`` tensor, and the way back.

    Leaf ``i`` occupies columns ``offset_i .. offset_i + numel_i`` of each sample's row, in ``z0``'s order, so
    the solvers, the loop and every backward mode see a plain tensor. The flat state has the promoted dtype of
    the leaves (``torch.promote_types``: float32 for bf16 with fp16); ``f`` receives, and the solution returns,
    each leaf in its own dtype, as a contiguous tensor.
    """

    def __init__(self, z0: tuple[torch.Tensor, ...] | dict[Hashable, torch.Tensor], what: str = "z0") -> None:
        if isinstance(z0, dict):
            self.keys: tuple[Any, ...] = tuple(z0)
            self.labels = tuple(f"[{key!r}]" for key in self.keys)
            leaves = [z0[key] for key in self.keys]
        else:
            self.keys = tuple(range(len(z0)))
            self.labels = tuple(f"[{i}]" for i in self.keys)
            leaves = list(z0)
        if not leaves:
            raise ValueError(f"{what} must hold at least one tensor, got an empty {type(z0).__name__}")
        self.is_dict = isinstance(z0, dict)
        self.key_set = frozenset(self.keys) if self.is_dict else frozenset()
        # A namedtuple comes back as itself (its fields by position); other tuples as plain tuples.
        self.make = type(z0)._make if hasattr(type(z0), "_fields") else tuple
        for label, leaf in zip(self.labels, leaves):
            check_leaf(leaf, f"{what}{label}")
        first = leaves[0]
        self.batch, self.device = first.shape[0], first.device
        for label, leaf in zip(self.labels[1:], leaves[1:]):
            if leaf.shape[0] != self.batch:
                raise ValueError(f"{what}{label} has batch size {leaf.shape[0]} but {what}{self.labels[0]} has "
                                 f"{self.batch}: every leaf of a tuple/dict state must lead with the same batch")
            if leaf.device != self.device:
                raise ValueError(f"{what}{label} is on {leaf.device} but {what}{self.labels[0]} is on {self.device}: "
                                 f"every leaf of a tuple/dict state must be on one device")
        self.shapes = tuple(leaf.shape for leaf in leaves)
        self.dtypes = tuple(leaf.dtype for leaf in leaves)
        self.sizes = tuple(math.prod(leaf.shape[1:]) for leaf in leaves)
        dtype = self.dtypes[0]
        for other in self.dtypes[1:]:
            dtype = torch.promote_types(dtype, other)
        self.dtype = dtype

    def _leaves(self, state: object, what: str) -> list[object]:
        """The leaves of ``state`` in ``z0``'s order, after checking that it has ``z0``'s structure."""
        if self.is_dict:
            if not isinstance(state, dict):
                raise TypeError(f"{what} must be a dict with z0's keys {list(self.keys)}, got {type(state).__name__}")
            missing = [key for key in self.keys if key not in state]
            extra = [key for key in state if key not in self.key_set]
            if missing or extra:
                raise ValueError(f"{what} must have z0's keys {list(self.keys)}, got {list(state)}"
                                 f"{f'; missing {missing}' if missing else ''}{f'; unexpected {extra}' if extra else ''}")
            return [state[key] for key in self.keys]
        if not isinstance(state, tuple):
            raise TypeError(f"{what} must be a tuple of {len(self.keys)} tensors like z0, got {type(state).__name__}")
        if len(state) != len(self.keys):
            raise ValueError(f"{what} must be a tuple of {len(self.keys)} tensors like z0, got {len(state)}")
        return list(state)

    def flatten(self, state: object, what: str = "f(z)") -> torch.Tensor:
        """``(B, D)`` in the flat dtype, after checking each leaf's type, shape and device against ``z0``'s."""
        parts = []
        for label, shape, leaf in zip(self.labels, self.shapes, self._leaves(state, what)):
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"{what}{label} must be a tensor, got {type(leaf).__name__}")
            if leaf.shape != shape:
                raise ValueError(f"{what}{label} must have the shape of z0{label} {tuple(shape)}, "
                                 f"got {tuple(leaf.shape)}")
            if leaf.device != self.device:
                raise ValueError(f"{what}{label} must be on z0's device {self.device}, got {leaf.device}")
            if not leaf.is_floating_point():
                raise TypeError(f"{what}{label} must be floating point, got {leaf.dtype}")
            part = leaf.reshape(self.batch, -1)
            parts.append(part if part.dtype == self.dtype else part.to(self.dtype))
        return torch.cat(parts, dim=1)

    def unflatten(self, z: torch.Tensor) -> State:
        """The state structured like ``z0`` from its ``(B, D)`` form (differentiable)."""
        leaves = []
        for part, shape, dtype in zip(z.split(self.sizes, dim=1), self.shapes, self.dtypes):
            # Contiguous: a column block of the flat state is a strided view, and f may call .view on its input.
            leaf = part.reshape(shape).contiguous()
            leaves.append(leaf if leaf.dtype == dtype else leaf.to(dtype))
        return dict(zip(self.keys, leaves)) if self.is_dict else self.make(leaves)

    def wrap(self, f: Callable[[State], State]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f`` as a map on the flat state, checking every output against ``z0``'s structure."""
        return lambda z: self.flatten(f(self.unflatten(z)))

    def unflatten_solution(self, sol: Solution) -> Solution:
        z = self.unflatten(sol.z)
        kept = None if sol.kept is None else tuple(z if image is sol.z else self.unflatten(image)
                                                     for image in sol.kept)
        return dataclasses.replace(sol, z=z, kept=kept)


def check_state(z0: object, what: str = "z0") -> _Layout | None:
    """Check ``z0``: a tensor (``None`` returned) or a tuple/dict of tensors (its :class:`_Layout` returned)."""
    if isinstance(z0, (tuple, dict)):
        return _Layout(z0, what)
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, a tuple of tensors or a dict of tensors, "
                        f"got {type(z0).__name__}")
    check_leaf(z0, what)
    return None


def solve(
    f: Callable[[State], State],
    z0: State,
    *,
    solver: Solver | SolverName = SOLVER,
    backward: Backward | BackwardName | None = None,
    max_steps: int = MAX_STEPS,
    rtol: float = RTOL,
    atol: float = ATOL,
    check_every: int = CHECK_EVERY,
    trace: bool = False,
    on_nonfinite: Literal["report", "raise"] = "report",
    keep: Sequence[int] | None = None,
    num_jacobian_projections: int = 0,
) -> Solution:
    """Find ``z`` with ``f(z) = z`` for each sample of a batch, and make it differentiable.

    ``f`` maps a state shaped like ``z0`` to the same shape; inputs and parameters reach it through the
    closure. It must not modify its input in place, and must return tensors it will not overwrite later (clone
    the output of a callable that reuses a static buffer, such as one captured in a CUDA graph). The leading
    dimension is the batch: residuals, convergence and stopping are per sample, and
    samples never mix, so a sample that produces NaN/Inf cannot corrupt the others.

    The state is a tensor, a tuple of tensors or a dict of tensors (e.g. a hidden and a cell state). For a
    tuple or dict, ``f`` receives the same structure (a tuple, the same namedtuple, or a dict with ``z0``'s keys
    in ``z0``'s order) and must return one: a tuple of the same length or a dict with the same keys (in any
    order), each leaf shaped like ``z0``'s. Every leaf leads with the same batch size ``B`` and sits on one
    device; leaf shapes may differ. Internally each sample's leaves are concatenated into one row, so solvers,
    tolerances and norms treat them as one vector. Dtype rule: all leaves are floating point; the solver state
    has their promoted dtype (``torch.promote_types``, e.g. float32 for a bf16 leaf with a float32 leaf), and
    each leaf is cast back to its own dtype whenever ``f`` receives it and in ``Solution.z``.

    A sample has converged when ``||f(z) - z|| <= atol + rtol * ||f(z)||``, with ``||.||`` the Euclidean norm
    over all of a sample's elements (computed in float32, or float64 for float64 states). The solve stops once
    every sample has converged or gone non-finite, checking every ``check_every`` steps (one host-device sync
    each), and returns ``f`` applied to each sample's lowest-residual iterate. With ``rtol=0`` and ``atol=0`` it
    runs exactly ``max_steps`` applications of ``f`` with no check and no sync (compiles with
    ``torch.compile(fullgraph=True)``) and returns the image of the last iterate.

    Trajectory supervision: ``keep=[k_1, k_2, ...]`` also returns ``Solution.kept``, the images ``f(z_{k_i-1})``
    the solver computed at steps ``k_i``, in the order asked, each with a 1-step JFB gradient (see
    :attr:`Solution.kept`): a loss on them trains ``f`` as in deep-equilibrium optical flow. The length is always
    ``len(keep)``: a step the solve did not reach (it converged first) gets the final solution ``z``.

    Args:
        f: the map, ``(B, ...) -> (B, ...)``, on a tensor or on a tuple/dict of tensors.
        z0: initial iterate ``(B, ...)``, or a tuple/dict of them, floating point (bf16/fp16 states keep their
            dtype; norms and solver algebra run in float32). Pass a previous ``Solution.z`` to warm-start.
        solver: a :class:`Solver` instance or one of ``"iteration"``, ``"anderson"``, ``"broyden"``.
        backward: how gradients flow: ``None`` (no gradient; the result is the same whatever the grad mode), a
            :class:`Backward` instance (:class:`JFB`, :class:`StochasticJFB`, :class:`Implicit`), or ``"jfb"`` /
            ``"implicit"``.
        max_steps: the most applications of ``f`` in the forward solve, at least 1.
        rtol, atol: convergence tolerances, non-negative; both 0 selects fixed-step mode.
        check_every: steps between convergence checks, at least 1.
        trace: also return each step's residual, ``Solution.trace`` of shape ``(steps, B)``.
        on_nonfinite: ``"report"`` flags non-finite samples in ``Solution.status``; ``"raise"`` raises
            ``FloatingPointError`` instead (one sync at the end).
        keep: solver steps whose images to return in ``Solution.kept``: distinct ints in ``1..max_steps``, in any
            order (a list, tuple or range). ``None`` (the default) records nothing. The kept images carry
            gradients only with a backward mode and autograd recording. Adds no application of ``f`` and no sync.
        num_jacobian_projections: when ``> 0``, also return ``Solution.jacobian_penalty``, the Hutchinson
            estimate of ``||J_f(z)||_F^2`` per sample at the returned ``z`` with this many random projections (see
            :func:`fixedpoint.jacobian_penalty`; one forward-mode product of ``f`` each, no sync). It is
            differentiable with respect to ``f``'s parameters and inputs, so ``loss + gamma * penalty.mean()``
            regularises the map towards contraction (Bai et al., 2021). Like a stochastic-JFB draw it is a
            training-time quantity: under ``torch.no_grad``/``inference_mode`` it is not computed (``None``;
            call :func:`fixedpoint.jacobian_penalty` for a diagnostic). ``0`` (the default) computes nothing.

    Returns:
        A :class:`Solution`, its ``z`` (and ``kept``) structured like ``z0``.

    Raises:
        TypeError: ``z0`` is not a floating-point tensor or a tuple/dict of them, ``f`` returns a non-tensor,
            non-float or a different structure, or an option has the wrong type.
        ValueError: an option is out of range or unknown, the leaves of ``z0`` differ in batch size or device, or
            ``f(z)`` is not shaped like ``z0`` (a leaf of another shape, a missing or unexpected key).
        FloatingPointError: with ``on_nonfinite="raise"``, when a sample goes non-finite.
    """
    check_map(f)
    layout = check_state(z0)
    options = forward_options(solver=solver, max_steps=max_steps, rtol=rtol, atol=atol, check_every=check_every,
                              trace=trace, on_nonfinite=on_nonfinite, keep=keep,
                              num_jacobian_projections=num_jacobian_projections)
    return solve_with(f, z0, options, as_backward(backward), layout)


def solve_with(f: Callable[[State], State], z0: State, options: Forward, backward: Backward | None,
               layout: _Layout | None = None) -> Solution:
    """:func:`solve` on an already-checked ``z0`` (``layout`` from :func:`check_state`) and validated options
    (used by ``DEQ``, which validates its options at construction)."""
    if layout is None:
        flat_f, flat_z0 = _checked(f, z0), z0
    else:
        flat_f = layout.wrap(f)
        with torch.no_grad():  # no gradient ever flows into z0 (the solve runs without autograd)
            flat_z0 = layout.flatten(z0, "z0")
    if backward is None:
        sol = to_solution(options.run(flat_f, flat_z0, keep_grad=False))
    else:
        sol = backward.solve(flat_f, flat_z0, options)
    if options.num_jacobian_projections and torch.is_grad_enabled():
        # At the returned point, as a constant: the penalty trains f's parameters (and inputs), not the solve.
        penalty = jacobian_penalty(flat_f, sol.z.detach(), num_projections=options.num_jacobian_projections)
        sol = dataclasses.replace(sol, jacobian_penalty=penalty)
    return sol if layout is None else layout.unflatten_solution(sol)
