"""Registering unihead's Keras serializables without importing Keras.

A model saved with a unihead head refers to ``unihead>HeadDense`` (and ``HeadLoss``,
``HeadAccuracy``); Keras finds such classes only in its registry.  ``import unihead`` must not
import Keras (or any framework), so the classes are registered when Keras is imported: now, if it
already is, or right after ``import keras`` completes, through a one-shot import hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any


def _register() -> None:
    try:
        import unihead.backends.keras  # noqa: F401  (the decorators register the classes)
    except Exception as exc:  # never break `import keras` because of unihead
        warnings.warn(f"unihead could not register its Keras classes: {exc}", RuntimeWarning, stacklevel=2)


class _KerasImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # one shot; the real finders locate keras
        spec = importlib.util.find_spec("keras")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    if "keras" in sys.modules:
        _register()
    elif not any(isinstance(f, _KerasImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _KerasImportHook())
