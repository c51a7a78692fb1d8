"""Exceptions raised by unihead.  All are subclasses of the built-in ones users already catch."""

from __future__ import annotations

__all__ = ["HeadSpecError", "BackendNotAvailableError"]


class HeadSpecError(ValueError):
    """A :class:`~unihead.ClassificationHead` description is contradictory or malformed."""


class BackendNotAvailableError(ImportError):
    """The framework a backend needs is not installed (``pip install unihead[<framework>]``)."""
