"""Differentiable fixed points for PyTorch: solvers, backward modes and a deep-equilibrium layer."""

from ._solution import Solution, Status
from ._solve import BACKWARDS, SOLVERS, solve
from .backward import JFB, Backward, Implicit, StochasticJFB
from .nn import DEQ
from .solvers import Anderson, Broyden, Iteration, Solver

__version__ = "0.1.0"

__all__ = [
    "BACKWARDS", "DEQ", "JFB", "SOLVERS", "Anderson", "Backward", "Broyden", "Implicit", "Iteration", "Solution",
    "Solver", "Status", "StochasticJFB", "solve",
]
