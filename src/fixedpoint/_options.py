"""Shared checks for the small option objects (solvers and backward modes)."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any


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
