"""Finding backends: the built-in ones and third-party ones registered under the
``unihead.backends`` entry-point group (``name = "package.module:compile_head"``)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

from .errors import BackendNotAvailableError
from .spec import ClassificationHead

__all__ = ["compile", "available_backends", "BUILTIN_BACKENDS", "load_backend"]

#: Built-in backend name -> (module, framework import name, pip extra).
BUILTIN_BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "numpy": ("unihead.backends.numpy", None, None),
    "torch": ("unihead.backends.torch", "torch", "unihead[torch]"),
    "jax": ("unihead.backends.jax", "jax", "unihead[jax]"),
    "flax": ("unihead.backends.flax", "flax", "unihead[flax]"),
    "keras": ("unihead.backends.keras", "keras", "unihead[keras]"),
}


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="unihead.backends")}


def available_backends() -> list[str]:
    """Names accepted by :func:`compile`: built-in backends and registered entry points."""
    return sorted(set(BUILTIN_BACKENDS) | set(_entry_points()))


def load_backend(name: str) -> Callable[..., Any]:
    """The ``compile_head(head, **options)`` callable of backend ``name`` (or ``"module:object"``)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}.")
    if name in BUILTIN_BACKENDS:
        module_name, framework, extra = BUILTIN_BACKENDS[name]
        if framework is not None and importlib.util.find_spec(framework) is None:
            raise BackendNotAvailableError(
                f"The {name!r} backend needs {framework}, which is not installed: pip install {extra}"
            )
        return importlib.import_module(module_name).compile_head
    eps = _entry_points()
    if name in eps:
        obj = eps[name].load()
    elif ":" in name:
        module_name, _, attr = name.partition(":")
        obj = getattr(importlib.import_module(module_name), attr)
    else:
        raise ValueError(
            f"Unknown backend {name!r}; available: {', '.join(available_backends())} "
            f"(or 'package.module:compile_head' for a third-party implementation)."
        )
    return getattr(obj, "compile_head", obj)


def compile(head: ClassificationHead, backend: str = "numpy", **options: Any) -> Any:
    """Compile ``head`` for ``backend`` (``"numpy"``, ``"torch"``, ``"jax"``, ``"flax"``, ``"keras"`` or a
    registered third-party backend).  Returns a :class:`~unihead.CompiledHead`."""
    if not isinstance(head, ClassificationHead):
        raise TypeError(f"compile() takes a ClassificationHead, got {type(head).__name__}.")
    return load_backend(backend)(head, **options)

