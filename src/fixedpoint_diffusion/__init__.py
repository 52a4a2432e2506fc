"""Fixed Point Diffusion Models (FPDM) on top of :mod:`fixedpoint`. The models, training and sampling land in
later releases; this package currently only reserves the name."""

__version__ = "0.1.0"
