"""Exceptions raised by unihead.  All are subclasses of the built-in ones users already catch."""

from __future__ import annotations

__all__ = ["HeadSpecError", "BackendNotAvailableError", "HeadFileError", "PortCheckError"]


class HeadSpecError(ValueError):
    """A :class:`~unihead.ClassificationHead` description is contradictory or malformed."""


class BackendNotAvailableError(ImportError):
    """The framework a backend needs is not installed (``pip install unihead[<framework>]``)."""


class HeadFileError(ValueError):
    """A head file (``unihead.save``/``unihead.load``) is missing its spec, malformed, or its
    tensors do not match the spec."""


# ------------------------------------------------------------------------------ unihead.port
class PortCheckError(ValueError):
    """:func:`unihead.port` moved a head, but the ported layer's probabilities are not the
    source's within the check's tolerance; ``check`` is the measurement (a ``PortCheck``)."""

    def __init__(self, message: str, check: object = None) -> None:
        super().__init__(message)
        self.check = check
