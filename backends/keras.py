"""Keras 3 backend: ``unihead.compile(head, "keras")``.

The same numbers on every Keras backend: on JAX and PyTorch the compiled head runs unihead's
JAX and PyTorch backends (Keras hands them its native arrays), on TensorFlow the shared formulas
run on TF tensors with ``tf.custom_gradient``, and on the NumPy Keras backend (inference) the
NumPy backend.  What a Keras user gets:

* ``compiled.layer()`` -> :class:`HeadDense`, a ``keras.layers.Dense`` producing logits that
  carries its spec (usable in ``Sequential`` and functional models);
* ``compiled.keras_loss()`` -> :class:`HeadLoss`, a ``keras.losses.Loss`` with unihead's semantics
  (the weighted mean of docs/semantics.md: ``fit(sample_weight=...)`` and
  ``fit(class_weight=...)`` give what the head's own options give);
* ``compiled.keras_metrics()`` -> ``[HeadAccuracy]``: accuracy under the head's decision rule
  (threshold for binary and multilabel heads, argmax for multiclass; 1- and 2-unit binary alike);
* ``compiled.compile_model(model, optimizer)`` puts all three into ``model.compile``.

All three are registered Keras serializables (package ``"unihead"``): a model saved with
``model.save("m.keras")`` loads with ``keras.models.load_model`` without ``custom_objects`` once
``unihead`` is imported (``import unihead`` registers them when Keras is imported, without
importing Keras itself).

Labels reach a Keras loss the way Keras pipelines produce them: sparse ids with a trailing axis
of 1, or as floats with whole values.  unihead's one label rule accepts both on every backend
(docs/semantics.md §9): :class:`HeadLoss` hands labels to the compiled head as they come.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from unihead.compiled import CompiledHead, canonical_weights
from unihead.spec import ClassificationHead

__all__ = ["compile_head", "KerasHead", "HeadDense", "HeadLoss", "HeadAccuracy"]

_PACKAGE = "unihead"


def _native(head: ClassificationHead, validate: bool) -> CompiledHead:
    """The compiled head of the array library Keras runs on."""
    name = keras.backend.backend()
    if name == "jax":
        from unihead.backends.jax import JaxHead

        return JaxHead(head, validate=validate)
    if name == "torch":
        from unihead.backends.torch import TorchHead

        return TorchHead(head, validate=validate)
    if name == "tensorflow":
        from unihead.backends._tensorflow import TFHead

        return TFHead(head, validate=validate)
    if name == "numpy":
        from unihead.backends.numpy import NumpyHead

        return NumpyHead(head, validate=validate)
    raise NotImplementedError(
        f"unihead supports Keras on the jax, torch, tensorflow and numpy backends; this Keras runs "
        f"on {name!r}."
    )


def _as_head(head: Any) -> ClassificationHead:
    return head if isinstance(head, ClassificationHead) else ClassificationHead.from_dict(head)


class KerasHead(CompiledHead):
    """The compiled head on Keras (see :class:`unihead.CompiledHead` for the methods)."""

    backend = "keras"

    def __init__(self, head: ClassificationHead, *, validate: bool = True):
        super().__init__(head, validate=validate)
        self.native = _native(head, validate)
        self.ops = self.native.ops

    @property
    def keras_backend(self) -> str:
        return keras.backend.backend()

    def probabilities(self, logits: Any) -> Any:
        return self.native.probabilities(logits)

    def log_probabilities(self, logits: Any) -> Any:
        return self.native.log_probabilities(logits)

    def predict(self, logits: Any) -> Any:
        return self.native.predict(logits)

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None) -> Any:
        """The loss on the current Keras backend's tensors (differentiable with its autodiff)."""
        return self.native.loss(logits, labels, sample_weight)

    def layer(self, in_features: int | None = None, weights: Any = None, **kwargs: Any) -> "HeadDense":
        """A :class:`HeadDense` producing logits; ``weights`` in the canonical layout
        (``kernel (in, out)``, ``bias (out,)``).  Keyword arguments go to ``keras.layers.Dense``."""
        layer = HeadDense(self.head, **kwargs)
        if weights is not None or in_features is not None:
            if in_features is None:
                in_features = int(np.asarray(weights["kernel"] if isinstance(weights, dict) else weights[0]).shape[0])
            layer.build((None, in_features))
            if weights is not None:
                layer.set_canonical_weights(weights)
        return layer

    def keras_loss(self, **kwargs: Any) -> "HeadLoss":
        return HeadLoss(self.head, validate=self.validate, **kwargs)

    def keras_metrics(self) -> list:
        return [HeadAccuracy(self.head)]

    def compile_kwargs(self) -> dict[str, Any]:
        """``{"loss": ..., "metrics": [...]}`` for ``model.compile(optimizer, **kwargs)``."""
        return {"loss": self.keras_loss(), "metrics": self.keras_metrics()}

    def compile_model(self, model: Any, optimizer: Any = "adam", **kwargs: Any) -> Any:
        """``model.compile(optimizer, loss=..., metrics=[...], **kwargs)``; returns the model."""
        model.compile(optimizer=optimizer, **self.compile_kwargs(), **kwargs)
        return model


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HeadDense(keras.layers.Dense):
    """``keras.layers.Dense(head.num_outputs)`` without activation, carrying its
    :class:`ClassificationHead`: the layer emits logits, the head applies the activation in its
    loss and ``probabilities``.  Its kernel is ``(in, out)``: unihead's canonical layout."""

    def __init__(self, head: Any, **kwargs: Any):
        head = _as_head(head)
        if kwargs.pop("activation", None) not in (None, "linear"):
            raise ValueError(
                "HeadDense emits logits: leave out activation= (the head applies "
                f"{head.activation} in its loss and probabilities)."
            )
        units = kwargs.pop("units", head.num_outputs)
        if units != head.num_outputs:
            raise ValueError(f"units={units} does not match the head's num_outputs={head.num_outputs}.")
        super().__init__(units=head.num_outputs, activation=None, **kwargs)
        self.head = head

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("units", None)
        config.pop("activation", None)
        config["head"] = self.head.to_dict()
        return config

    def get_canonical_weights(self) -> dict[str, np.ndarray]:
        """``{"kernel": (in, out), "bias": (out,)}`` as NumPy arrays."""
        return {"kernel": ops.convert_to_numpy(self.kernel), "bias": ops.convert_to_numpy(self.bias)}

    def set_canonical_weights(self, weights: Any) -> None:
        in_features = int(self.kernel.shape[0])
        kernel, bias = canonical_weights(self.head, in_features, weights)
        self.kernel.assign(kernel.astype(self.kernel.dtype))
        self.bias.assign(bias.astype(self.bias.dtype))

    def compiled(self, **options: Any) -> KerasHead:
        return KerasHead(self.head, **options)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HeadLoss(keras.losses.Loss):
    """A ``keras.losses.Loss`` computing a head's loss from logits, with unihead's reduction:
    ``loss(y_true, y_pred, sample_weight)``.  Keras' own losses divide a weighted sum by the
    number of examples; this one divides by the sum of the weights (docs/semantics.md §7), so
    ``fit(class_weight={c: w_c})`` equals the head's ``class_weights`` for integer and one-hot
    labels.  Padding is left out with ``sample_weight`` 0 or ``ignore_index`` (Keras masks attached
    to the predictions are not read: their accessor is not public API)."""

    def __init__(self, head: Any, validate: bool = True, name: str = "unihead_loss", **kwargs: Any):
        kwargs.pop("reduction", None)  # unihead's reduction comes from the head
        super().__init__(name=name, **kwargs)
        self.head = _as_head(head)
        self.validate = bool(validate)

    def _compiled(self, head: ClassificationHead) -> KerasHead:
        # one compiled head per spec, kept: the PyTorch one holds its fused kernels, which
        # torch.compile builds on first use (a new one per call would recompile every step)
        cache = self.__dict__.setdefault("_heads", {})
        if head not in cache:
            cache[head] = KerasHead(head, validate=self.validate)
        return cache[head]

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        if sample_weight is not None and len(sample_weight.shape) == len(y_pred.shape) and sample_weight.shape[-1] == 1 \
                and self.head.task != "multilabel":
            sample_weight = ops.squeeze(sample_weight, axis=-1)
        return self._compiled(self.head).loss(y_pred, y_true, sample_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """Per-example values (``reduction="none"``)."""
        return self._compiled(self.head.replace(reduction="none")).loss(y_pred, y_true)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "head": self.head.to_dict(), "validate": self.validate}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HeadLoss":
        return cls(**config)


def _head_accuracy(y_true: Any, y_pred: Any, head: ClassificationHead) -> Any:
    """Per-example accuracy under the head's decision rule (on logits)."""
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.convert_to_tensor(y_true)
    cut = math.log(head.threshold / (1.0 - head.threshold))
    fmt = head.label_format
    if head.task == "multilabel":
        target = ops.cast(ops.greater(ops.cast(y_true, "float32"), 0.5), "float32")
        pred = ops.cast(ops.greater(ops.cast(y_pred, "float32"), cut), "float32")
        return ops.mean(ops.cast(ops.equal(pred, target), "float32"), axis=-1)
    if head.task == "binary":
        z = ops.cast(y_pred, "float32")
        d = z[..., 1] - z[..., 0] if head.binary_units == 2 else z[..., 0]
        pred = ops.cast(ops.greater(d, cut), "float32")
        y = ops.cast(y_true, "float32")
        if len(y.shape) == len(z.shape):
            y = y[..., 0]
        target = ops.cast(ops.greater(y, 0.5), "float32")
        return ops.cast(ops.equal(pred, target), "float32")
    pred = ops.argmax(y_pred, axis=-1)
    if fmt == "sparse":
        y = y_true
        if len(y.shape) == len(y_pred.shape):
            y = ops.squeeze(y, axis=-1)
        target = ops.cast(y, "int32")
    else:
        target = ops.argmax(y_true, axis=-1)
    return ops.cast(ops.equal(ops.cast(pred, "int32"), ops.cast(target, "int32")), "float32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HeadAccuracy(keras.metrics.MeanMetricWrapper):
    """Accuracy of a head's predictions (``predict``'s rule) against its labels."""

    def __init__(self, head: Any, name: str = "accuracy", dtype: Any = None):
        head = _as_head(head)
        super().__init__(fn=_head_accuracy, name=name, dtype=dtype, head=head)
        self.head = head
        self._direction = "up"

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "head": self.head.to_dict()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HeadAccuracy":
        return cls(**config)


def compile_head(head: ClassificationHead, *, validate: bool = True) -> KerasHead:
    return KerasHead(head, validate=validate)
