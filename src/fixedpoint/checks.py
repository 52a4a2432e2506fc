"""The option rules of ``fixedpoint``, for code built on it: the checks ``solve``, the solvers, the backward modes,
``DEQ`` and the diagnostics run on their numeric options, so that a library configuring them (FPDM does) refuses
what ``fixedpoint`` refuses, with the same message. An ``int`` never accepts a ``bool``; each check names the
argument (``what``) and raises ``error``, a ``ValueError`` subclass of the caller's choice (default ``ValueError``).
"""

from ._options import check_fraction, check_int, check_positive, check_tol, is_int, is_number

__all__ = ["check_fraction", "check_int", "check_positive", "check_tol", "is_int", "is_number"]
