"""The interface every backward mode implements."""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from .._forward import Forward
from .._options import OptionsMeta
from .._solution import Solution

__all__ = ["Backward"]


class Backward(metaclass=OptionsMeta):
    """A way to differentiate through a fixed-point solve.

    Subclasses decide which steps run with autograd; the forward iterations always run through
    :meth:`Forward.run`, without autograd.
    """

    @abc.abstractmethod
    def solve(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, forward: Forward) -> Solution:
        """Solve ``z = f(z)`` from ``z0`` with the options in ``forward`` and attach this mode's gradient."""
