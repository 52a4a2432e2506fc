"""Backward modes: how gradients pass through a fixed-point solve, and their name table."""

from types import MappingProxyType

from ._base import Backward
from .implicit import AdjointState, Implicit
from .jfb import JFB, StochasticJFB
from .linear import GMRES, Neumann

__all__ = ["BACKWARDS", "GMRES", "JFB", "AdjointState", "Backward", "Implicit", "Neumann", "StochasticJFB"]

#: Names of the backward modes; ``BACKWARDS[name](**options)`` builds one with options. ``"jfb"`` and
#: ``"implicit"`` also stand alone for ``backward=`` (their default options); ``StochasticJFB`` has no defaults
#: for its step ranges, so ``backward="stochastic_jfb"`` is refused with a message asking for the options. Read-only.
BACKWARDS: MappingProxyType[str, type[Backward]] = MappingProxyType(
    {"jfb": JFB, "implicit": Implicit, "stochastic_jfb": StochasticJFB})
