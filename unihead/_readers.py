"""Reading an existing model's output head: its last dense layer, the activation after it, and
the loss it is trained with, as a framework-neutral :class:`Reading`.

Frameworks are imported only when their objects are passed in (``import unihead`` stays free
of them).  Keras: the last ``Dense`` of the model (or a ``Dense`` given directly), its
``activation`` or a following ``Activation``/``Softmax`` layer, and the compiled loss
(``model.loss``: a string, a function or a ``Loss`` with ``from_logits``, ``label_smoothing``,
``ignore_class``).  PyTorch: the last ``nn.Linear`` in registration order, a trailing
``nn.Softmax``/``nn.Sigmoid``/``nn.LogSoftmax`` in a ``Sequential``, and the criterion passed as
``loss`` (``nn.CrossEntropyLoss``, ``BCEWithLogitsLoss``, ``BCELoss``, ``NLLLoss``).  Activations
applied inside a custom ``forward`` (``F.softmax(...)``) cannot be seen.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from .spec import ClassificationHead

__all__ = ["Reading", "LossReading", "read_model", "read_loss"]


@dataclasses.dataclass
class LossReading:
    """The loss, normalised.  ``kind``: ``"binary_ce"`` (binary cross-entropy), ``"categorical_ce"``
    (one-hot/probability targets), ``"sparse_ce"`` (integer targets), ``"ce"`` (PyTorch
    ``CrossEntropyLoss``: integer or probability targets), ``"nll"`` (log-probabilities in),
    ``"unihead"`` or ``"other"``.  ``from_logits``: whether it applies the activation itself."""

    kind: str
    from_logits: bool | None
    name: str
    label_smoothing: float = 0.0
    ignore_index: int | None = None
    class_weights: tuple[float, ...] | None = None
    pos_weight: Any = None
    focal_gamma: float = 0.0
    reduction: str = "mean"
    head: ClassificationHead | None = None
    #: the library the loss comes from when it is not the framework's own (``"timm"``), how it is
    #: written (``"timm.loss.BinaryCrossEntropy(smoothing=0.1)"``) and its library-specific options
    library: str | None = None
    call: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Reading:
    framework: str  # the layer's framework: "keras" | "torch" | "numpy" (a unihead layer has ``head``)
    units: int
    in_features: int | None
    kernel: np.ndarray | None  # canonical (in, out)
    bias: np.ndarray | None
    activation: str  # "linear" | "softmax" | "sigmoid" | "log_softmax" | other name
    where: str  # how the layer and activation are written, for messages
    loss: LossReading | None
    head: ClassificationHead | None = None  # a unihead layer carries its spec
    layer: Any = None
    hf: Any = None  # a transformers model: its config's reading (unihead._hf.HFInfo)
    #: a model of a model library (``"timm"``, ``"keras_hub"``): its classifier is the layer read
    library: str | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


# ------------------------------------------------------------------------------ Keras
def _is_keras(obj: Any) -> bool:
    return "keras" in sys.modules and isinstance(obj, sys.modules["keras"].layers.Layer)


def _keras_reading(model: Any, loss: Any) -> Reading:
    import keras

    layers = [model] if isinstance(model, keras.layers.Dense) else list(getattr(model, "layers", []))
    dense_i = max((i for i, l in enumerate(layers) if isinstance(l, keras.layers.Dense)), default=None)
    if dense_i is None:
        raise ValueError("No Dense layer found: unihead reads a model's last Dense layer as its output head.")
    dense = layers[dense_i]
    act = _name(dense.activation)
    where = f"Dense({dense.units}" + (f", activation='{act}')" if act != "linear" else ")")
    for later in layers[dense_i + 1:]:
        if isinstance(later, keras.layers.Softmax):
            act, where = "softmax", where + " + Softmax()"
        elif isinstance(later, keras.layers.Activation):
            name = _name(later.activation)
            if name != "linear":
                act, where = name, where + f" + Activation('{name}')"
    head = getattr(dense, "head", None)
    if not dense.built:
        kernel = bias = None
        in_features = None
    else:
        kernel = keras.ops.convert_to_numpy(dense.kernel)
        bias = keras.ops.convert_to_numpy(dense.bias) if dense.use_bias else np.zeros(dense.units, kernel.dtype)
        in_features = int(kernel.shape[0])
    if loss is None:
        loss = getattr(model, "loss", None)
    return Reading("keras", int(dense.units), in_features, kernel, bias, act, where,
                   read_loss(loss) if loss is not None else None, head, dense)


_KERAS_STRINGS = {
    "binary_crossentropy": "binary_ce", "bce": "binary_ce", "categorical_crossentropy": "categorical_ce",
    "sparse_categorical_crossentropy": "sparse_ce", "binary_focal_crossentropy": "binary_ce",
    "categorical_focal_crossentropy": "categorical_ce",
}
_KERAS_CLASSES = {
    "BinaryCrossentropy": "binary_ce", "CategoricalCrossentropy": "categorical_ce",
    "SparseCategoricalCrossentropy": "sparse_ce", "BinaryFocalCrossentropy": "binary_ce",
    "CategoricalFocalCrossentropy": "categorical_ce",
}


def _keras_loss(loss: Any) -> LossReading:
    if isinstance(loss, str) or callable(loss) and not hasattr(loss, "get_config"):
        name = loss if isinstance(loss, str) else _name(loss)
        kind = _KERAS_STRINGS.get(name, "other")
        gamma = 2.0 if "focal" in name else 0.0
        return LossReading(kind, False if kind != "other" else None, name, focal_gamma=gamma)
    cls = type(loss).__name__
    if cls == "HeadLoss":
        return LossReading("unihead", True, "HeadLoss", head=loss.head)
    cfg = loss.get_config() if hasattr(loss, "get_config") else {}
    kind = _KERAS_CLASSES.get(cls, "other")
    red = cfg.get("reduction", "sum_over_batch_size")
    reduction = {"sum": "sum", None: "none", "none": "none"}.get(red, "mean")
    return LossReading(
        kind, bool(cfg.get("from_logits", False)) if kind != "other" else None, cls,
        label_smoothing=float(cfg.get("label_smoothing", 0.0) or 0.0),
        ignore_index=cfg.get("ignore_class"),
        focal_gamma=float(cfg.get("gamma", 0.0)) if "Focal" in cls else 0.0,
        reduction=reduction,
    )


# ------------------------------------------------------------------------------ PyTorch
def _is_torch(obj: Any) -> bool:
    return "torch" in sys.modules and isinstance(obj, sys.modules["torch"].nn.Module)


def _leaves(module: Any) -> list:
    children = list(module.children())
    if not children:
        return [module]
    out = []
    for c in children:
        out.extend(_leaves(c))
    return out


def _torch_reading(model: Any, loss: Any) -> Reading:
    from torch import nn

    leaves = _leaves(model)
    lin_i = max((i for i, m in enumerate(leaves) if isinstance(m, nn.Linear)), default=None)
    if lin_i is None:
        raise ValueError("No nn.Linear found: unihead reads a model's last nn.Linear as its output head.")
    lin = leaves[lin_i]
    act, where = "linear", f"nn.Linear({lin.in_features}, {lin.out_features})"
    for later in leaves[lin_i + 1:]:
        if isinstance(later, nn.Softmax):
            act, where = "softmax", where + " + nn.Softmax()"
        elif isinstance(later, nn.LogSoftmax):
            act, where = "log_softmax", where + " + nn.LogSoftmax()"
        elif isinstance(later, nn.Sigmoid):
            act, where = "sigmoid", where + " + nn.Sigmoid()"
    from unihead.backends.torch import TorchHead

    to_numpy = TorchHead.ops.to_numpy  # the backend's one rule: half precision read as float32
    kernel = np.ascontiguousarray(to_numpy(lin.weight.detach()).T)
    bias = to_numpy(lin.bias.detach()) if lin.bias is not None else np.zeros(lin.out_features, kernel.dtype)
    head = getattr(lin, "head", None)
    return Reading("torch", int(lin.out_features), int(lin.in_features), kernel, bias, act,
                   where, read_loss(loss) if loss is not None else None, head, lin)


#: The PyTorch criteria read here (their subclasses too), by class name: with the Keras names above,
#: what ``unihead diagnose/port --loss`` accepts.
TORCH_CRITERIA = ("CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss")


def _torch_loss(loss: Any) -> LossReading:
    from torch import nn

    def arr(x: Any) -> Any:
        return None if x is None else tuple(float(v) for v in x.detach().cpu().reshape(-1))

    cls = type(loss).__name__
    red = getattr(loss, "reduction", "mean")
    if cls == "HeadLoss":
        return LossReading("unihead", True, cls, head=loss.head)
    if isinstance(loss, nn.CrossEntropyLoss):
        return LossReading("ce", True, cls, label_smoothing=float(loss.label_smoothing),
                           ignore_index=int(loss.ignore_index), class_weights=arr(loss.weight), reduction=red)
    if isinstance(loss, nn.NLLLoss):
        return LossReading("nll", None, cls, ignore_index=int(loss.ignore_index), class_weights=arr(loss.weight),
                           reduction=red)
    if isinstance(loss, nn.BCEWithLogitsLoss):
        pw = arr(loss.pos_weight)
        return LossReading("binary_ce", True, cls, class_weights=arr(loss.weight),
                           pos_weight=(pw[0] if pw and len(pw) == 1 else pw), reduction=red)
    if isinstance(loss, nn.BCELoss):
        return LossReading("binary_ce", False, cls, class_weights=arr(loss.weight), reduction=red)
    return LossReading("other", None, cls, reduction=red)


# ------------------------------------------------------------------------------ Hugging Face
def _hf_reading(model: Any, loss: Any) -> Reading:
    """A transformers ``PreTrainedModel``: its classification layer (the last ``nn.Linear`` of
    ``classifier``, ``score``, ``classification_head`` or ``head``), read as a PyTorch layer,
    with its config (:class:`unihead._hf.HFInfo`).  The loss is the one passed; the model's own
    (which depends on the labels) is read by :func:`unihead.diagnose`."""
    from torch import nn

    from ._hf import HEAD_ATTRIBUTES, hf_info

    for attr in HEAD_ATTRIBUTES:
        module = getattr(model, attr, None)
        if not isinstance(module, nn.Module):
            continue
        if isinstance(module, nn.Linear):
            layer, path = module, attr
            break
        named = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if named:
            layer, path = named[-1][1], f"{attr}.{named[-1][0]}"
            break
    else:
        raise ValueError(
            f"{type(model).__name__} has no classification layer unihead knows: it reads the last nn.Linear "
            f"of the model's {', '.join(HEAD_ATTRIBUTES)} attribute (transformers' *ForSequenceClassification, "
            "*ForImageClassification and *ForTokenClassification models). For another model, pass its output "
            "nn.Linear itself."
        )
    r = _torch_reading(layer, loss)
    info = hf_info(model, path)
    r.hf = info
    r.where = f"{info.describe()}.{path} = {r.where}"
    return r


# ------------------------------------------------------------------------------ entry points
def _library(obj: Any) -> str:
    """The top-level package an object's class comes from (``"timm"``, ``"keras_hub"``): model
    libraries are recognised by it, so that none of them is imported to check."""
    return type(obj).__module__.partition(".")[0]


def read_loss(loss: Any) -> LossReading:
    if isinstance(loss, LossReading):
        return loss
    head = getattr(loss, "head", None)
    if isinstance(head, ClassificationHead) and type(loss).__name__ == "TrainerLoss":
        return LossReading("unihead", True, "trainer_loss", head=head)
    if _library(loss) == "timm":
        from ._timm import timm_loss

        return timm_loss(loss)
    if _is_torch(loss):
        return _torch_loss(loss)
    return _keras_loss(loss)


def read_model(model: Any, loss: Any = None) -> Reading:
    """The :class:`Reading` of a Keras model/``Dense``, a PyTorch module/``nn.Linear`` or a
    Hugging Face transformers ``PreTrainedModel``; a timm model (its ``get_classifier()``) or a
    keras-hub ``*Classifier`` task (its output ``Dense`` and ``activation``) is read through its
    library's own accessors (unihead/_timm.py, unihead/_keras_hub.py)."""
    from ._hf import is_hf_model

    if _is_torch(model) and is_hf_model(model):
        return _hf_reading(model, loss)
    if _library(model) == "keras_hub" and _is_keras(model):
        from ._keras_hub import keras_hub_reading

        return keras_hub_reading(model, loss)
    if _is_keras(model):
        return _keras_reading(model, loss)
    if _library(model) == "timm" and _is_torch(model):
        from ._timm import timm_reading

        return timm_reading(model, loss)
    if _is_torch(model):
        return _torch_reading(model, loss)
    head = getattr(model, "head", None)
    if isinstance(head, ClassificationHead) and hasattr(model, "kernel"):  # NumPy Dense
        k = np.asarray(model.kernel)
        return Reading("numpy", head.num_outputs, int(k.shape[0]), k, np.asarray(model.bias), "linear",
                       "unihead Dense", read_loss(loss) if loss is not None else None, head, model)
    raise TypeError(
        f"unihead reads Keras models and layers, PyTorch modules and Hugging Face transformers models; "
        f"got {type(model).__name__}."
    )
