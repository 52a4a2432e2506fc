"""``DEQ``: a deep-equilibrium layer as a drop-in ``nn.Module``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ._solution import Solution
from ._solve import BackwardName, SolverName, _as_backward, check_state, forward_options, solve_with
from .backward import Backward
from .solvers import Solver

__all__ = ["DEQ"]


class DEQ(nn.Module):
    """A layer whose output is the fixed point ``z* = f(z*, x)`` of a module ``f``.

    Its parameters are ``f``'s. The options are those of :func:`fixedpoint.solve` and are checked here, once.
    There is no hidden state: to warm-start (e.g. from the previous training step or video frame), pass the
    previous :class:`Solution` or its ``z`` as ``z0``.

    Example::

        layer = DEQ(Cell(64), solver="anderson", backward="implicit")
        sol = layer(x)            # sol.z: (B, 64); sol.converged, sol.residual, sol.num_steps
        sol = layer(x, z0=sol)    # warm start

    Args:
        f: a module called as ``f(z, x)`` and returning a tensor shaped like ``z``.
        solver, max_steps, rtol, atol, check_every, trace, on_nonfinite: as in :func:`fixedpoint.solve`.
        backward: as in :func:`fixedpoint.solve`, but defaulting to ``"implicit"`` (the exact gradient); pass
            ``None`` for a layer that is not differentiated.

    Raises:
        TypeError, ValueError: on a bad option, at construction.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: Solver | SolverName = "anderson",
        backward: Backward | BackwardName | None = "implicit",
        max_steps: int = 50,
        rtol: float = 1e-4,
        atol: float = 1e-6,
        check_every: int = 1,
        trace: bool = False,
        on_nonfinite: Literal["report", "raise"] = "report",
    ) -> None:
        super().__init__()
        if not isinstance(f, nn.Module):
            raise TypeError(f"f must be an nn.Module called as f(z, x), got {type(f).__name__}")
        self.f = f
        self.options = forward_options(solver=solver, max_steps=max_steps, rtol=rtol, atol=atol,
                                       check_every=check_every, trace=trace, on_nonfinite=on_nonfinite)
        self.backward_mode = _as_backward(backward)

    def forward(self, x: torch.Tensor, z0: torch.Tensor | Solution | None = None) -> Solution:
        """Solve ``z = f(z, x)``.

        Args:
            x: the layer input (the injection), any shape ``f`` accepts.
            z0: initial state; ``None`` starts from zeros shaped like ``x``. A :class:`Solution` or tensor warm
                starts from it (detached: no gradient flows into the previous solve).

        Returns:
            A :class:`Solution` whose ``z`` carries this layer's gradient.
        """
        if isinstance(z0, Solution):
            z0 = z0.z
        if z0 is None:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"x must be a floating-point tensor when z0 is None (the state starts at "
                                f"zeros_like(x)), got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}; "
                                f"pass z0 explicitly")
            z0 = torch.zeros_like(x)
        else:
            z0 = check_state(z0, "z0").detach()
        return solve_with(lambda z: self.f(z, x), z0, self.options, self.backward_mode)

    def extra_repr(self) -> str:
        o = self.options
        return (f"solver={o.solver}, backward={self.backward_mode}, max_steps={o.max_steps}, rtol={o.rtol}, "
                f"atol={o.atol}")
