"""Differentiable fixed points for PyTorch: solvers, backward modes and a deep-equilibrium layer."""

from . import checks  # noqa: F401 - the public submodule fixedpoint.checks, reachable as fp.checks
from ._config import from_config, to_config
from ._penalty import jacobian_penalty
from ._solution import Solution, Status
from ._solve import solve
from .backward import BACKWARDS, GMRES, JFB, AdjointState, Backward, Implicit, Neumann, StochasticJFB
from .dropout import PassScope, VariationalDropout, pass_scope
from .gradcheck import GradientCheck, ParameterCheck, check_gradients
from .nn import DEQ
from .norm import remove_norm, spectral_norm, weight_norm
from .solvers import SOLVERS, Anderson, Broyden, Iteration, Solver
from .spectral import spectral_radius

__version__ = "0.1.0"

__all__ = [
    "BACKWARDS", "DEQ", "GMRES", "JFB", "SOLVERS", "AdjointState", "Anderson", "Backward", "Broyden", "GradientCheck",
    "Implicit", "Iteration", "Neumann", "ParameterCheck", "PassScope", "Solution", "Solver", "Status", "StochasticJFB",
    "VariationalDropout", "check_gradients", "from_config", "jacobian_penalty", "pass_scope", "remove_norm", "solve",
    "spectral_norm", "spectral_radius", "to_config", "weight_norm",
]
