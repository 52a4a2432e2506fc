"""The project's own input errors: a bad config, option, path or file from the user.

Each is also the built-in exception Python code expects (``ValueError``, ``TypeError``, ``FileNotFoundError``,
``FileExistsError``, ``PermissionError``), so ``except ValueError`` keeps working; all share the base
:class:`InputError`, which the ``fpdm`` command prints as one line with exit code 2. Any other exception is a bug
(or the machine's) and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError", "InvalidTypeError", "InvalidValueError", "MissingInputError", "NotWritableError",
           "OutputExistsError"]


class InputError(Exception):
    """Base of every error caused by the user's input rather than by the code."""


class InvalidValueError(InputError, ValueError):
    """A value (argument, option, config entry, file content) that cannot be used; the message names it."""


class InvalidTypeError(InputError, TypeError):
    """A value of the wrong type (in a config file, say, where Python would raise ``TypeError``)."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the input names does not exist or lacks what it must hold."""


class OutputExistsError(InputError, FileExistsError):
    """An output path that holds something that would be overwritten, or is a file where a folder must go."""


class NotWritableError(InputError, PermissionError):
    """An output path that cannot be written."""
