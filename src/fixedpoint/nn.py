"""``DEQ``: a deep-equilibrium layer as a drop-in ``nn.Module``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from ._forward import ATOL, CHECK_EVERY, MAX_STEPS, RTOL, SOLVER, SolverName, forward_options
from ._solution import Solution, State
from ._solve import BackwardName, as_backward, check_state, solve_with
from .backward import Backward
from .dropout import one_pass
from .solvers import Solver

__all__ = ["DEQ"]


class DEQ(nn.Module):
    """A layer whose output is the fixed point ``z* = f(z*, x)`` of a module ``f``.

    Its parameters are ``f``'s. The options are those of :func:`fixedpoint.solve` and are checked here, once.
    There is no hidden state: to warm-start (e.g. from the previous training step or video frame), pass the
    previous :class:`Solution` or its ``z`` as ``z0``.

    Each call is one forward pass for the stabilisers inside ``f``: a :class:`VariationalDropout` draws one mask
    and a :func:`spectral_norm` takes one power step, shared by every fixed-point iteration and the backward
    mode's steps (the call enters :func:`pass_scope`; wrap the call in your own ``pass_scope(layer.f,
    generator=g)`` to seed the masks).

    The state may be a tuple or dict of tensors (e.g. an LSTM-like ``(h, c)``), under the rules of
    :func:`fixedpoint.solve`; its initial value must then be passed as ``z0`` (there is no way to guess its
    structure from ``x``), and a previous :class:`Solution` warm-starts it.

    Example::

        layer = DEQ(Cell(64), solver="anderson", backward="implicit")
        sol = layer(x)            # sol.z: (B, 64); sol.converged, sol.residual, sol.num_steps
        sol = layer(x, z0=sol)    # warm start
        pair = DEQ(LSTMCell(64), keep=[2, 4])(x, z0=(h0, c0))  # pair.z == (h, c); pair.kept: 2 states

    Args:
        f: a module called as ``f(z, x)`` and returning a state structured like ``z``.
        solver, max_steps, rtol, atol, check_every, trace, on_nonfinite, keep, num_jacobian_projections: as in
            :func:`fixedpoint.solve`.
        backward: as in :func:`fixedpoint.solve`, but defaulting to ``"implicit"`` (the exact gradient); pass
            ``None`` for a layer that is not differentiated.

    Raises:
        TypeError, ValueError: on a bad option, at construction.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: Solver | SolverName = SOLVER,
        backward: Backward | BackwardName | None = "implicit",
        max_steps: int = MAX_STEPS,
        rtol: float = RTOL,
        atol: float = ATOL,
        check_every: int = CHECK_EVERY,
        trace: bool = False,
        on_nonfinite: Literal["report", "raise"] = "report",
        keep: Sequence[int] | None = None,
        num_jacobian_projections: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module called as f(z, x), got {type(f).__name__}")
        self.f = f
        self.options = forward_options(solver=solver, max_steps=max_steps, rtol=rtol, atol=atol,
                                       check_every=check_every, trace=trace, on_nonfinite=on_nonfinite,
                                       keep=keep, num_jacobian_projections=num_jacobian_projections)
        self.backward_mode = as_backward(backward)

    def forward(self, x: torch.Tensor, z0: State | Solution | None = None) -> Solution:
        """Solve ``z = f(z, x)``.

        Args:
            x: the layer input (the injection), any shape ``f`` accepts.
            z0: initial state: a tensor, a tuple or dict of tensors, or a :class:`Solution` whose ``z`` warm
                starts the solve (detached: no gradient flows into the previous solve). ``None`` starts from
                zeros shaped like ``x``, a tensor state; a tuple/dict state needs an explicit ``z0``.

        Returns:
            A :class:`Solution` whose ``z`` (structured like ``z0``) carries this layer's gradient.

        Raises:
            TypeError, ValueError: ``z0`` is not a valid state, or ``f`` returns a state not structured like it.
        """
        if isinstance(z0, Solution):
            z0 = z0.z
        if z0 is None:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"x must be a floating-point tensor when z0 is None (the state starts at "
                                f"zeros_like(x)), got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}; "
                                f"pass z0 explicitly")
            z0, layout = torch.zeros_like(x), None
        else:
            layout = check_state(z0, "z0")
            if layout is None:
                z0 = z0.detach()  # a tuple/dict state is flattened without autograd
        # One forward pass: variational-dropout masks and spectral-norm power steps inside f are drawn once and
        # shared by every iteration (an enclosing pass_scope, e.g. one with a seeded generator, takes precedence).
        with one_pass(self.f):
            return solve_with(lambda z: self.f(z, x), z0, self.options, self.backward_mode, layout)

    def extra_repr(self) -> str:
        o = self.options
        return (f"solver={o.solver}, backward={self.backward_mode}, max_steps={o.max_steps}, rtol={o.rtol}, "
                f"atol={o.atol}" + ("" if o.keep is None else f", keep={list(o.keep)}"))
