"""Jacobian-free backpropagation: JFB, multi-step JFB and the paper's stochastic JFB (Algorithm 1)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._forward import Forward, to_solution
from .._loop import report
from .._options import check_int
from .._solution import Solution
from ._base import Backward

__all__ = ["JFB", "StochasticJFB"]


def _unroll(f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        z = f(z)
    return z


@dataclass(frozen=True)
class JFB(Backward):
    """Jacobian-free backpropagation (Fung et al., 2022; FPDM Sec. 3.4).

    The solve runs without autograd; then ``steps`` more applications of ``f`` run with autograd from the
    solution, and the gradient flows through those alone. With ``steps=1`` this replaces the inverse Jacobian
    ``(I - J)^{-1}`` of the implicit gradient by ``I``; ``steps=k`` (multi-step JFB) by the truncated Neumann
    series ``I + J + ... + J^{k-1}``. Memory saved for backward: ``steps`` activations of ``f``.

    The extra steps also run when autograd is off, so a layer gives the same values in training and in eval.

    Args:
        steps: with-grad applications of ``f``, at least 1.
    """

    steps: int = 1

    def __post_init__(self) -> None:
        check_int(self.steps, "JFB: steps", 1)

    def solve(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, forward: Forward) -> Solution:
        result = forward.run(f, z0)
        return to_solution(result, z=_unroll(f, result.z, self.steps), extra_steps=self.steps)


@dataclass(frozen=True)
class StochasticJFB(Backward):
    """Stochastic Jacobian-free backpropagation, FPDM Algorithm 1.

    While autograd is recording, each call draws ``n ~ U{min_no_grad..max_no_grad}`` and
    ``m ~ U{min_with_grad..max_with_grad}``, runs exactly ``n`` solver steps under ``torch.no_grad`` (nothing
    saved for backward), then ``m`` applications of ``f`` with autograd, through which the gradient flows. When
    autograd is not recording it solves normally with the forward options (tolerances and ``max_steps``).
    With ``keep``, the kept steps up to ``n`` are the images of those no-grad steps (each recorded with
    autograd, see :attr:`fixedpoint.Solution.kept`); later ones are the final solution.

    The draws come from ``generator`` (a CPU ``torch.Generator``; the global CPU generator if ``None``), never
    from Python's ``random``: seed the same generator on every DDP rank and all ranks draw the same ``n, m``.

    Args:
        max_no_grad: ``N``, the largest number of no-grad steps, at least ``min_no_grad``.
        max_with_grad: ``M``, the largest number of with-grad steps, at least ``min_with_grad``.
        min_with_grad: the smallest number of with-grad steps, at least 1.
        generator: source of the draws.
        min_no_grad: the smallest number of no-grad steps, at least 0 (the paper: 0).
    """

    max_no_grad: int
    max_with_grad: int
    min_with_grad: int = 1
    generator: torch.Generator | None = None
    min_no_grad: int = 0

    def __post_init__(self) -> None:
        check_int(self.min_no_grad, "StochasticJFB: min_no_grad", 0)
        check_int(self.max_no_grad, "StochasticJFB: max_no_grad", self.min_no_grad)
        check_int(self.min_with_grad, "StochasticJFB: min_with_grad", 1)
        check_int(self.max_with_grad, "StochasticJFB: max_with_grad", self.min_with_grad)
        if self.generator is not None:
            if not isinstance(self.generator, torch.Generator):
                raise TypeError(f"StochasticJFB: generator must be a torch.Generator or None, "
                                f"got {type(self.generator).__name__}")
            if self.generator.device.type != "cpu":
                raise ValueError(f"StochasticJFB: generator must be a CPU generator (draws are made on the host), "
                                 f"got one on {self.generator.device}")

    def draw(self) -> tuple[int, int]:
        """Draw ``(n, m)``: no-grad and with-grad step counts for one call."""
        n = int(torch.randint(self.min_no_grad, self.max_no_grad + 1, (1,), generator=self.generator))
        m = int(torch.randint(self.min_with_grad, self.max_with_grad + 1, (1,), generator=self.generator))
        return n, m

    def solve(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, forward: Forward) -> Solution:
        if not torch.is_grad_enabled():
            return to_solution(forward.run(f, z0))
        n, m = self.draw()
        if n > 0:
            result = forward.run(f, z0, max_steps=n, early_stop=False)
            return to_solution(result, z=_unroll(f, result.z, m), extra_steps=m)
        # No solver step: the first with-grad application gives z0's residual.
        z0 = z0.detach()
        fz = f(z0)
        batch = z0.shape[0]
        with torch.no_grad():
            residual, converged, status = report(fz.detach().reshape(batch, -1), z0.reshape(batch, -1),
                                                 rtol=forward.rtol, atol=forward.atol,
                                                 on_nonfinite=forward.on_nonfinite, num_steps=1)
        trace = residual[None] if forward.trace else None
        z = _unroll(f, fz, m - 1)
        kept = None if forward.keep is None else (z,) * len(forward.keep)  # no solver step was reached
        return Solution(z=z, residual=residual, converged=converged, status=status, num_steps=m, trace=trace,
                        kept=kept)
