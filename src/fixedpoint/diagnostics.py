"""The three diagnostics under one name, for code written before they had a module each: the Jacobian penalty
(:mod:`fixedpoint._penalty`), the spectral radius (:mod:`fixedpoint.spectral`) and the gradient check
(:mod:`fixedpoint.gradcheck`). Everything here is also a top-level name of :mod:`fixedpoint`."""

from ._penalty import jacobian_penalty
from .gradcheck import GradientCheck, ParameterCheck, check_gradients
from .spectral import spectral_radius

__all__ = ["GradientCheck", "ParameterCheck", "check_gradients", "jacobian_penalty", "spectral_radius"]
