"""Backward modes: how gradients pass through a fixed-point solve."""

from ._base import Backward
from .implicit import Implicit
from .jfb import JFB, StochasticJFB

__all__ = ["JFB", "Backward", "Implicit", "StochasticJFB"]
