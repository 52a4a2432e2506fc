"""Differentiable fixed points for PyTorch: solvers, backward modes and a deep-equilibrium layer."""

from ._solution import Solution, Status
from ._solve import BACKWARDS, SOLVERS, solve
from .backward import GMRES, JFB, AdjointState, Backward, Implicit, Neumann, StochasticJFB
from .diagnostics import GradientCheck, ParameterCheck, check_gradients, jacobian_penalty, spectral_radius
from .dropout import PassScope, VariationalDropout, pass_scope
from .nn import DEQ
from .norm import remove_norm, spectral_norm, weight_norm
from .solvers import Anderson, Broyden, Iteration, Solver

__version__ = "0.1.0"

__all__ = [
    "BACKWARDS", "DEQ", "GMRES", "JFB", "SOLVERS", "AdjointState", "Anderson", "Backward", "Broyden", "Implicit",
    "Iteration", "Neumann", "Solution", "Solver", "Status", "StochasticJFB", "solve",
    "GradientCheck", "ParameterCheck", "check_gradients", "jacobian_penalty", "spectral_radius",
    "PassScope", "VariationalDropout", "pass_scope", "remove_norm", "spectral_norm", "weight_norm",
]
