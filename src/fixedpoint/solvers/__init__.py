"""Fixed-point solvers behind the :class:`Solver` step interface, and their name table."""

from types import MappingProxyType

from ._base import Solver
from .anderson import Anderson
from .broyden import Broyden
from .iteration import Iteration

__all__ = ["SOLVERS", "Anderson", "Broyden", "Iteration", "Solver"]

#: Names accepted for ``solver=``, each standing for the class with its default options; ``SOLVERS[name](**options)``
#: builds one with options. Read-only.
SOLVERS: MappingProxyType[str, type[Solver]] = MappingProxyType(
    {"iteration": Iteration, "anderson": Anderson, "broyden": Broyden})
