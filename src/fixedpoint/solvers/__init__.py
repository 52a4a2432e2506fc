"""Fixed-point solvers behind the :class:`Solver` step interface."""

from ._base import Solver
from .anderson import Anderson
from .broyden import Broyden
from .iteration import Iteration

__all__ = ["Anderson", "Broyden", "Iteration", "Solver"]
