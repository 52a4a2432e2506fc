"""Shared checks for the small option objects (solvers, backward modes, the forward options of ``solve``).

Every rule for a number-like option is written here once: ``bool`` is never a number (``True`` is an ``int`` to
Python, but ``max_steps=True`` or ``damping=True`` is a mistake, not a 1), and each check raises ``ValueError``
naming the argument, the value received and what is allowed.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["OptionsMeta", "UnknownOptionError", "check_fraction", "check_int", "check_positive", "check_tol",
           "is_int", "is_number", "required_options", "resolve"]


class UnknownOptionError(ValueError, TypeError):
    """An option that the solver or backward mode does not have. Both a ``ValueError`` and a ``TypeError`` (what
    Python raises for an unexpected keyword), so either ``except`` clause catches it."""


class OptionsMeta(abc.ABCMeta):
    """Checks keyword names before a dataclass ``__init__`` runs, so an unknown one names the valid ones."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if dataclasses.is_dataclass(cls):
            valid = [f.name for f in dataclasses.fields(cls) if f.init]
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise UnknownOptionError(f"{cls.__name__}: unknown option(s) {unknown}; valid options are {valid}")
        return super().__call__(*args, **kwargs)


# --- numbers ---------------------------------------------------------------------------------------------------

def is_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or a ``float`` and not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: object, what: str, minimum: int = 0, *, error: type[ValueError] = ValueError) -> int:
    """``value`` if it is an int ``>= minimum``; else ``error`` (a ``ValueError`` subclass) naming ``what``."""
    if not (is_int(value) and value >= minimum):  # type: ignore[operator]
        raise error(f"{what} must be an int >= {minimum}, got {value!r}")
    return value  # type: ignore[return-value]


def check_tol(value: object, what: str, *, error: type[ValueError] = ValueError) -> float:
    """``value`` as a float if it is a finite number ``>= 0`` (a tolerance, a ridge); else ``error``."""
    if not (is_number(value) and math.isfinite(value) and value >= 0):  # type: ignore[arg-type,operator]
        raise error(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_positive(value: object, what: str, *, error: type[ValueError] = ValueError) -> float:
    """``value`` as a float if it is a finite number ``> 0``; else ``error``."""
    if not (is_number(value) and math.isfinite(value) and value > 0):  # type: ignore[arg-type,operator]
        raise error(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_fraction(value: object, what: str, *, error: type[ValueError] = ValueError) -> float:
    """``value`` as a float if it is a number in ``(0, 1]`` (a damping); else ``error``."""
    if not (is_number(value) and 0.0 < value <= 1.0):  # type: ignore[operator]
        raise error(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


# --- names -----------------------------------------------------------------------------------------------------

def required_options(cls: type) -> list[str]:
    """The fields of the option class ``cls`` that have no default."""
    return [f.name for f in dataclasses.fields(cls)
            if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def resolve(value: object, table: Mapping[str, type], kind: type, what: str, *, allow_none: bool = False) -> Any:
    """An option object: ``value`` itself if it is a ``kind`` (or ``None`` with ``allow_none``), else the
    default-constructed object named ``value`` in ``table`` (one of the package's read-only name tables).

    Raises:
        TypeError: ``value`` is neither a ``kind`` nor a string.
        ValueError: ``value`` is a string that ``table`` does not hold, or names a class with required options
            (those have no default object; construct it with its options instead).
    """
    if isinstance(value, kind) or (allow_none and value is None):
        return value
    valid = f"{'None, ' if allow_none else ''}a {kind.__name__} or one of {sorted(table)}"
    if not isinstance(value, str):
        raise TypeError(f"{what} must be {valid}, got {type(value).__name__}")
    if value not in table:
        raise ValueError(f"{what} must be {valid}, got {value!r}")
    cls = table[value]
    try:
        return cls()
    except TypeError:  # asked only on failure: a solve compiled with fullgraph=True resolves names too
        required = required_options(cls)
        if not required:
            raise
        raise ValueError(f"{what}={value!r} has no default options (it needs {required}); pass "
                         f"{cls.__name__}({', '.join(f'{name}=...' for name in required)}) instead") from None
