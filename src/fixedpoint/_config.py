"""Solver and backward-mode objects to and from JSON-able dicts, for configuration files and checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .backward import BACKWARDS, GMRES, Backward, Neumann
from .solvers import SOLVERS, Solver

__all__ = ["from_config", "to_config"]

# Every option object with a name: the two public tables, and the adjoint's linear solvers, which appear only
# nested (as Implicit's solver). The names do not overlap.
_NAMED: Mapping[str, type] = MappingProxyType({**SOLVERS, **BACKWARDS, "gmres": GMRES, "neumann": Neumann})
_NAME_OF: Mapping[type, str] = MappingProxyType({cls: name for name, cls in _NAMED.items()})
_TOP = sorted({**SOLVERS, **BACKWARDS})


def to_config(obj: Solver | Backward) -> dict[str, Any]:
    """The options of a solver or backward mode as a JSON-able dict, ``{"name": ..., option: value, ...}``.

    ``name`` is the object's key in :data:`fixedpoint.SOLVERS` or :data:`fixedpoint.BACKWARDS`, and every option
    is listed, defaults included, so a saved config does not change meaning when a default does. A nested option
    object (:class:`Implicit`'s ``solver``: a solver, :class:`GMRES` or :class:`Neumann`) becomes a nested dict
    (``"gmres"``/``"neumann"`` for the linear solvers). :func:`from_config` builds the object back::

        fp.to_config(fp.StochasticJFB(max_no_grad=4, max_with_grad=2))
        # {'name': 'stochastic_jfb', 'max_no_grad': 4, 'max_with_grad': 2, 'min_with_grad': 1,
        #  'generator': None, 'min_no_grad': 0}

    Args:
        obj: an instance of a class named in ``SOLVERS`` or ``BACKWARDS`` (not of a subclass).

    Returns:
        A new dict of JSON types only (``str``, ``int``, ``float``, ``bool``, ``None`` and nested dicts).

    Raises:
        TypeError: ``obj`` is not such an instance, or one of its options holds something without a JSON form (a
            ``torch.Generator``, an :class:`AdjointState`): build the object without it, or add it after
            :func:`from_config` with ``dataclasses.replace``.
    """
    if type(obj) not in _NAME_OF or type(obj) in (GMRES, Neumann):
        raise TypeError(f"to_config: obj must be a solver or backward mode named in SOLVERS or BACKWARDS "
                        f"({_TOP}), got {type(obj).__name__}")
    return _to_dict(obj)


def _to_dict(obj: object) -> dict[str, Any]:
    config: dict[str, Any] = {"name": _NAME_OF[type(obj)]}
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        if field.init:
            config[field.name] = _to_json(getattr(obj, field.name), f"{type(obj).__name__}.{field.name}")
    return config


def _to_json(value: object, what: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value) in _NAME_OF:
        return _to_dict(value)
    raise TypeError(f"to_config: {what} holds a {type(value).__name__}, which has no JSON form; build the object "
                    f"without it (e.g. {what.split('.')[-1]}=None) and set it after from_config with "
                    f"dataclasses.replace")


def from_config(config: Mapping[str, Any]) -> Solver | Backward:
    """Build the solver or backward mode that :func:`to_config` describes.

    The class is ``SOLVERS[config["name"]]`` or ``BACKWARDS[config["name"]]``, and the other keys are its options,
    passed to the constructor, which checks them as always; options left out take their defaults. A nested dict
    (with its own ``"name"``) is built the same way first.

    Args:
        config: a mapping with ``"name"`` and options, e.g. ``{"name": "anderson", "memory": 3}``.

    Returns:
        A new :class:`Solver` or :class:`Backward`.

    Raises:
        TypeError: ``config`` is not a mapping, or an option has the wrong type.
        ValueError: the name is missing or unknown, or an option is out of range (an unknown option raises the
            constructor's ``UnknownOptionError``, which is both).
    """
    return _build(config, _TOP, "config")


def _build(config: object, names: list[str], what: str) -> Any:
    if not isinstance(config, Mapping):
        raise TypeError(f"from_config: {what} must be a mapping with a 'name', got {type(config).__name__}")
    name = config.get("name")
    if name not in names:
        raise ValueError(f"from_config: {what}['name'] must be one of {names}, got {name!r}")
    options = {key: _build(value, sorted(_NAMED), f"{what}[{key!r}]") if isinstance(value, Mapping) else value
               for key, value in config.items() if key != "name"}
    return _NAMED[name](**options)
