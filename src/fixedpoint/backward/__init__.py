"""Backward modes: how gradients pass through a fixed-point solve."""

from ._base import Backward
from .implicit import AdjointState, Implicit
from .jfb import JFB, StochasticJFB
from .linear import GMRES, Neumann

__all__ = ["GMRES", "JFB", "AdjointState", "Backward", "Implicit", "Neumann", "StochasticJFB"]
