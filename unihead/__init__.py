"""unihead: one classification-head spec, the same numbers in every framework.

    >>> import unihead
    >>> head = unihead.ClassificationHead.multiclass(4)
    >>> compiled = unihead.compile(head, "numpy")       # or "torch", "jax", "flax", "keras"

``import unihead`` imports no deep-learning framework; backends are loaded on first use.
"""

from ._registry import available_backends, compile
from ._version import __version__
from .compiled import CompiledHead
from ._diagnose import Diagnosis, Finding, diagnose, diagnose_code, infer
from .errors import BackendNotAvailableError, HeadFileError, HeadSpecError, PortCheckError
from .headfile import load, save
from ._port import Ported, port
from .spec import ClassificationHead
from ._validation import set_validation, validation

from . import _keras_hook

_keras_hook.install()  # registers unihead's Keras classes when Keras is imported
del _keras_hook

__all__ = [
    "__version__",
    "ClassificationHead",
    "CompiledHead",
    "compile",
    "available_backends",
    "set_validation",
    "validation",
    "infer",
    "diagnose",
    "diagnose_code",
    "Diagnosis",
    "Finding",
    "port",
    "Ported",
    "save",
    "load",
    "HeadSpecError",
    "HeadFileError",
    "BackendNotAvailableError",
    "PortCheckError",
]
