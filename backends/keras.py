"""Keras 3 backend: ``unihead.compile(head, "keras")``.

The same numbers on every Keras backend: on JAX and PyTorch the compiled head runs unihead's
JAX and PyTorch backends (Keras hands them its native arrays), on TensorFlow the shared formulas
run on TF tensors with ``tf.custom_gradient``, and on the NumPy Keras backend (inference) the
NumPy backend.  What a Keras user gets:

* ``compiled.layer()`` -> :class:`HeadDense`, a ``keras.layers.Dense`` producing logits that
  carries its spec (usable in ``Sequential`` and functional models).  Its kernel is ``(in, out)``,
  unihead's canonical layout: ``get_weights()`` is Keras' own list ``[kernel, bias]`` (so
  ``model.get_weights()`` and Keras' tools see an ordinary ``Dense``), ``set_weights`` also takes
  the canonical ``{"kernel", "bias"}`` mapping of the other backends' layers, and
  ``get_canonical_weights()`` / ``set_canonical_weights()`` are the names every backend's layer
  has;
* ``compiled.loss_fn()`` -> :class:`HeadLoss`, a ``keras.losses.Loss`` with unihead's semantics
  (the weighted mean of docs/semantics.md: ``fit(sample_weight=...)`` and
  ``fit(class_weight=...)`` give what the head's own options give);
* ``compiled.keras_metrics()`` -> ``[HeadAccuracy]``: accuracy under the head's decision rule
  (the compiled head's ``predict``);
* ``compiled.compile_model(model, optimizer)`` puts all three into ``model.compile``;
* ``compiled.linear_loss(hidden, kernel, labels, bias)`` (the fused linear + loss, without the
  ``(N, V)`` logits) on Keras tensors, and :class:`FusedHeadModel`, a ``keras.Model`` ``backbone
  -> HeadDense`` whose ``fit`` trains with it (``predict`` still emits logits);
* :class:`GradientAccumulation` wraps a Keras optimizer: it applies one update every ``steps``
  micro-batches with the whole window's weighted-mean gradient (``model.fit`` as usual), in place
  of ``gradient_accumulation_steps=``, which averages the micro-batches' mean gradients uniformly.

All five are registered Keras serializables (package ``"unihead"``): a model saved with
``model.save("m.keras")`` loads with ``keras.models.load_model`` without ``custom_objects`` once
``unihead`` is imported (``import unihead`` registers them when Keras is imported, without
importing Keras itself).  The layer and the loss keep the options of the compiled head they
came from (``validate``, and ``fused``/``keep`` for Keras on PyTorch/JAX) in their configs.

``unihead.compile(head, "keras")`` says once (a ``UserWarning``) when Keras runs on the backend
it falls back to, TensorFlow, because nothing chose one: neither ``KERAS_BACKEND`` nor
``~/.keras/keras.json`` (as Keras itself wrote it).

Labels reach a Keras loss the way Keras pipelines produce them: sparse ids with a trailing axis
of 1, or as floats with whole values.  unihead's one label rule accepts both on every backend
(docs/semantics.md §9): :class:`HeadLoss` hands labels to the compiled head as they come.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
import weakref
from typing import Any, Mapping

import keras
import numpy as np
from keras import ops

from unihead.compiled import CompiledHead, canonical_weights, check_choice
from unihead.spec import ClassificationHead

__all__ = ["compile_head", "KerasHead", "HeadDense", "HeadLoss", "HeadAccuracy", "GradientAccumulation",
           "FusedHeadModel"]

_PACKAGE = "unihead"


def _native(head: ClassificationHead, validate: bool, options: Mapping[str, Any] | None = None) -> CompiledHead:
    """The compiled head of the array library Keras runs on; ``options``: ``fused`` (PyTorch)
    and ``keep`` (JAX), each passed where it applies."""
    name = keras.backend.backend()
    options = options or {}
    if name == "jax":
        from unihead.backends.jax import JaxHead

        return JaxHead(head, validate=validate, **{k: v for k, v in options.items() if k == "keep"})
    if name == "torch":
        from unihead.backends.torch import TorchHead

        return TorchHead(head, validate=validate, **{k: v for k, v in options.items() if k == "fused"})
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


def _tensor(x: Any) -> Any:
    """A Keras variable as the current backend's tensor (its value: differentiable where the
    backend differentiates it, traced under Keras' stateless JAX scope); anything else as it is."""
    return x.value if isinstance(x, keras.Variable) else x


class KerasHead(CompiledHead):
    """The compiled head on Keras (see :class:`unihead.CompiledHead` for the methods).

    ``fused`` and ``keep`` are the options of the PyTorch and JAX backends, used when Keras runs
    on PyTorch or JAX (``None``: their defaults).  On the other Keras backends they change
    nothing, so a model saved with them loads on every backend."""

    backend = "keras"

    def __init__(self, head: ClassificationHead, *, validate: bool = True, fused: Any = None, keep: str | None = None):
        super().__init__(head, validate=validate)
        self._native_options: dict[str, Any] = {}
        if fused is not None:
            self._native_options["fused"] = check_choice("fused", fused, ("auto", True, False))
        if keep is not None:
            self._native_options["keep"] = check_choice("keep", keep, ("inputs", "stats"))
        self.native = _native(head, self.validate, self._native_options)
        self.ops = self.native.ops

    def linear_loss(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any = None, sample_weight: Any = None, *,
        normalizer: Any = None, chunk_size: int | None = None,
    ) -> Any:
        """The loss of ``hidden @ kernel + bias`` without the ``(N, V)`` logits or their gradient
        (:meth:`unihead.CompiledHead.linear_loss`) on the current Keras backend's tensors (Keras
        variables too), differentiable with its autodiff: the JAX backend's ``jax.custom_vjp`` on
        Keras-on-JAX, the PyTorch backend's ``autograd.Function`` on Keras-on-PyTorch, and on
        TensorFlow the same chunked passes (:mod:`unihead._fused`) under ``tf.custom_gradient``.
        In a Keras model, :class:`FusedHeadModel` calls it with its :class:`HeadDense`'s weights
        (:meth:`HeadDense.linear_loss`)."""
        return self.native.linear_loss(
            _tensor(hidden), _tensor(kernel), labels, _tensor(bias), sample_weight,
            normalizer=normalizer, chunk_size=chunk_size,
        )

    def linear_loss_terms(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any = None, sample_weight: Any = None, *,
        chunk_size: int | None = None,
    ) -> tuple[Any, Any]:
        """``(total, weight)`` of :meth:`linear_loss` (see
        :meth:`unihead.CompiledHead.linear_loss_terms`)."""
        return self.native.linear_loss_terms(
            _tensor(hidden), _tensor(kernel), labels, _tensor(bias), sample_weight, chunk_size=chunk_size
        )

    def options(self) -> dict[str, Any]:
        return {"validate": self.validate, **self._native_options}

    @property
    def keras_backend(self) -> str:
        return keras.backend.backend()

    def probabilities(self, logits: Any) -> Any:
        return self.native.probabilities(logits)

    def log_probabilities(self, logits: Any) -> Any:
        return self.native.log_probabilities(logits)

    def predict(self, logits: Any) -> Any:
        return self.native.predict(logits)

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None, *, normalizer: Any = None) -> Any:
        """The loss on the current Keras backend's tensors (differentiable with its autodiff);
        ``normalizer``: see :meth:`unihead.CompiledHead.loss`."""
        return self.native.loss(logits, labels, sample_weight, normalizer=normalizer)

    def loss_terms(self, logits: Any, labels: Any, sample_weight: Any = None) -> tuple[Any, Any]:
        return self.native.loss_terms(logits, labels, sample_weight)

    def loss_weight(self, labels: Any, sample_weight: Any = None, *, dtype: Any = None) -> Any:
        return self.native.loss_weight(labels, sample_weight, dtype=dtype)

    def layer(self, in_features: int | None = None, weights: Any = None, **kwargs: Any) -> "HeadDense":
        """A :class:`HeadDense` producing logits; ``weights`` in the canonical layout
        (``kernel (in, out)``, ``bias (out,)``).  Keyword arguments go to ``keras.layers.Dense``.
        ``layer.compiled()`` is this compiled head (its options are in the layer's config)."""
        layer = HeadDense(self, **kwargs)
        if weights is not None or in_features is not None:
            if in_features is None:
                in_features = int(np.asarray(weights["kernel"] if isinstance(weights, dict) else weights[0]).shape[0])
            layer.build((None, in_features))
            if weights is not None:
                layer.set_canonical_weights(weights)
        return layer

    def loss_fn(self, **kwargs: Any) -> "HeadLoss":
        """The loss as a ``keras.losses.Loss`` (:class:`HeadLoss`) computing with this compiled
        head and its options; ``kwargs`` go to :class:`HeadLoss` (``name``, ``dtype``,
        ``reduction``)."""
        return HeadLoss(self, **kwargs)

    def keras_loss(self, **kwargs: Any) -> "HeadLoss":
        """Deprecated: :meth:`loss_fn`."""
        warnings.warn("KerasHead.keras_loss() is deprecated; use loss_fn().", DeprecationWarning, stacklevel=2)
        return self.loss_fn(**kwargs)

    def keras_metrics(self) -> list:
        return [HeadAccuracy(self)]

    def compile_kwargs(self) -> dict[str, Any]:
        """``{"loss": ..., "metrics": [...]}`` for ``model.compile(optimizer, **kwargs)``."""
        return {"loss": self.loss_fn(), "metrics": self.keras_metrics()}

    def compile_model(self, model: Any, optimizer: Any = "adam", **kwargs: Any) -> Any:
        """``model.compile(optimizer, loss=..., metrics=[...], **kwargs)``; returns the model."""
        model.compile(optimizer=optimizer, **self.compile_kwargs(), **kwargs)
        return model


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HeadDense(keras.layers.Dense):
    """``keras.layers.Dense(head.num_outputs)`` without activation, carrying its
    :class:`ClassificationHead`: the layer emits logits, the head applies the activation in its
    loss and ``probabilities``.  Its kernel is ``(in, out)``: unihead's canonical layout.

    ``head``: the spec (or its ``to_dict()``), or the compiled :class:`KerasHead` it comes from;
    ``compile_options``: the options of :meth:`compiled` (taken from a compiled head when one is
    given), saved in the layer's config.

    Weights: Keras' ``get_weights()`` / ``set_weights([kernel, bias])`` are unchanged (they list
    the layer's variables, as ``model.get_weights()`` expects); ``set_weights`` also takes the
    canonical mapping ``{"kernel": (in, out), "bias": (out,)}`` that the other backends' layers
    return, and ``get_canonical_weights()`` / ``set_canonical_weights()`` are the canonical pair
    every backend's layer has."""

    def __init__(self, head: Any, compile_options: Mapping[str, Any] | None = None, **kwargs: Any):
        compiled = head if isinstance(head, KerasHead) else None
        if compiled is not None:
            head = compiled.head
            compile_options = {**compiled.options(), **(compile_options or {})}
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
        self._compile_options = tuple(sorted(dict(compile_options or {}).items()))
        self._compiled_head = compiled

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.pop("units", None)
        config.pop("activation", None)
        config["head"] = self.head.to_dict()
        if self._compile_options:
            config["compile_options"] = dict(self._compile_options)
        return config

    def get_canonical_weights(self) -> dict[str, np.ndarray]:
        """``{"kernel": (in, out), "bias": (out,)}`` as NumPy arrays."""
        return {"kernel": ops.convert_to_numpy(self.kernel), "bias": ops.convert_to_numpy(self.bias)}

    def set_canonical_weights(self, weights: Any) -> None:
        """Load canonical-layout weights (a ``{"kernel", "bias"}`` mapping or a ``(kernel, bias)``
        pair, from any backend's layer) into the built layer."""
        if not self.built:
            raise ValueError(
                "this HeadDense is not built yet, so it has no weights to set: build it first "
                "(layer.build((None, in_features)), or call it on data), or pass the weights to "
                "compiled.layer(in_features, weights)."
            )
        in_features = int(self.kernel.shape[0])
        kernel, bias = canonical_weights(self.head, in_features, weights)
        self.kernel.assign(kernel.astype(self.kernel.dtype))
        self.bias.assign(bias.astype(self.bias.dtype))

    def set_weights(self, weights: Any) -> None:
        """Keras' ``set_weights`` (a list of arrays in the order of ``layer.weights``), or the
        canonical ``{"kernel", "bias"}`` mapping other backends' layers return."""
        if isinstance(weights, Mapping):
            return self.set_canonical_weights(weights)
        return super().set_weights(weights)

    def linear_loss(
        self, hidden: Any, labels: Any, sample_weight: Any = None, *, normalizer: Any = None,
        chunk_size: int | None = None,
    ) -> Any:
        """The head's loss of this layer's logits for ``hidden`` (its inputs), computed without
        them: :meth:`KerasHead.linear_loss` with this layer's ``kernel`` and ``bias``,
        differentiable with respect to ``hidden`` and both weights.  ``hidden`` is cast to the
        layer's compute dtype as :meth:`call` casts its inputs (the kernel too, under a mixed
        precision policy); ``sample_weight`` may have the trailing axis of 1 Keras pipelines give.
        What :class:`FusedHeadModel` computes in ``fit``."""
        if not self.built:
            raise ValueError(
                "this HeadDense is not built yet, so it has no kernel to compute the loss with: "
                "build it first (layer.build((None, in_features)), or call it on data)."
            )
        dtype = self.compute_dtype
        if hasattr(hidden, "dtype") and keras.backend.is_float_dtype(hidden.dtype):
            hidden = ops.cast(hidden, dtype)
        kernel = ops.cast(self.kernel, dtype) if self.kernel.dtype != dtype else self.kernel
        bias = self.bias
        if bias is not None and bias.dtype != dtype:
            bias = ops.cast(bias, dtype)
        return self.compiled().linear_loss(
            hidden, kernel, labels, bias, _per_example(self.head, sample_weight, hidden),
            normalizer=normalizer, chunk_size=chunk_size,
        )

    def compiled(self, **options: Any) -> KerasHead:
        """The compiled head of this layer: the one it was built from (or one with its saved
        ``compile_options``); ``options`` change some of them."""
        compiled = self.__dict__.get("_compiled_head")
        if compiled is None:
            compiled = KerasHead(self.head, **dict(self._compile_options))
            object.__setattr__(self, "_compiled_head", compiled)  # a plain attribute, untracked
        return compiled._with_options(**options)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HeadLoss(keras.losses.Loss):
    """A ``keras.losses.Loss`` computing a head's loss from logits, with unihead's reduction:
    ``loss(y_true, y_pred, sample_weight)``.  Keras' own losses divide a weighted sum by the
    number of examples; this one divides by the sum of the weights (docs/semantics.md §7), so
    ``fit(class_weight={c: w_c})`` equals the head's ``class_weights`` for integer and one-hot
    labels.  Padding is left out with ``sample_weight`` 0 or ``ignore_index`` (Keras masks attached
    to the predictions are not read: their accessor is not public API).

    ``head``: the spec (or its ``to_dict()``), or the compiled :class:`KerasHead` it comes from
    (what ``compiled.loss_fn()`` passes), whose options it keeps; ``validate``, ``fused`` and
    ``keep`` override them (see :class:`KerasHead`).  All are in the loss's config.

    ``reduction`` (Keras' argument) sets the head's reduction: ``"mean_with_sample_weight"`` is the
    head's ``"mean"`` (the weighted mean), ``"sum"`` its ``"sum"``, ``None``/``"none"`` its
    ``"none"``; without it, the head's own.  Keras' ``"sum_over_batch_size"`` and ``"mean"`` divide
    by the number of examples, which no head does: they are refused, with how to write it.
    ``loss.reduction`` is the Keras name of the head's reduction."""

    def __init__(
        self,
        head: Any,
        validate: bool | None = None,
        name: str = "unihead_loss",
        reduction: Any = "from_head",
        dtype: Any = None,
        *,
        fused: Any = None,
        keep: str | None = None,
    ):
        compiled = head if isinstance(head, KerasHead) else None
        head = _as_head(compiled.head if compiled is not None else head)
        if not (isinstance(reduction, str) and reduction == "from_head"):
            head = head.replace(reduction=_head_reduction(head, reduction))
        super().__init__(name=name, reduction=_KERAS_REDUCTION[head.reduction], dtype=dtype)
        options = {} if compiled is None else compiled.options()
        options.update({k: v for k, v in (("validate", validate), ("fused", fused), ("keep", keep)) if v is not None})
        self.head = head
        self.validate = bool(options.get("validate", True))
        self._options = options
        if compiled is not None and compiled.head == head:  # share it (and its kernels)
            self.__dict__["_heads"] = {head: compiled._with_options(**options)}
        else:
            self._compiled(head)  # the options are checked now, not at the first call

    def _compiled(self, head: ClassificationHead) -> KerasHead:
        # one compiled head per spec, kept: the PyTorch one holds its fused kernels, which
        # torch.compile builds on first use (a new one per call would recompile every step)
        cache = self.__dict__.setdefault("_heads", {})
        if head not in cache:
            cache[head] = KerasHead(head, **self._options)
        return cache[head]

    def compiled(self) -> KerasHead:
        """The compiled head this loss computes with."""
        return self._compiled(self.head)

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        sample_weight = _per_example(self.head, sample_weight, y_pred)
        compiled = self._compiled(self.head)
        if _ACCUMULATING:  # a GradientAccumulation weights this micro-batch by its loss weight
            _record_weight(self, compiled, y_true, sample_weight)
        return compiled.loss(y_pred, y_true, sample_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """Per-example values (``reduction="none"``)."""
        return self._compiled(self.head.replace(reduction="none")).loss(y_pred, y_true)

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "head": self.head.to_dict(), "reduction": self.reduction, **self._options,
                "validate": self.validate}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HeadLoss":
        return cls(**config)


def _per_example(head: ClassificationHead, sample_weight: Any, rows: Any) -> Any:
    """A sample weight as Keras hands it to a loss (``(..., 1)`` for ``rows`` of shape ``(...,
    width)``: logits or hidden states) without its trailing axis, for a head with one weight per
    example (not multilabel, whose weights may also be per label)."""
    if sample_weight is not None and hasattr(sample_weight, "shape") and len(sample_weight.shape) == len(rows.shape) \
            and sample_weight.shape[-1] == 1 and head.task != "multilabel":
        return ops.squeeze(sample_weight, axis=-1)
    return sample_weight


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FusedHeadModel(keras.Model):
    """``backbone -> head_layer`` (a :class:`HeadDense`) as a Keras model whose training loss is
    the head's fused linear + loss: ``fit`` never forms the ``(batch, ..., num_outputs)`` logits
    or their gradient (docs/large-vocabulary.md, "Keras").

    * ``model(x)``, ``predict`` and ``evaluate`` return / use the logits, as any model ending in
      :class:`HeadDense` (probabilities come from the compiled head as usual);
    * ``fit(x, y, sample_weight=..., class_weight=...)`` computes, in each training step,
      ``head_layer.linear_loss(hidden, y, sample_weight)`` (:meth:`HeadDense.linear_loss`): the
      head's loss, reduction and weights exactly, from the backbone's hidden states and the head
      layer's kernel and bias.

    Why a model and not a loss or an endpoint layer: Keras hands a loss only ``(y_true,
    y_pred)``, so a ``keras.losses.Loss`` sees logits that would already exist; an endpoint layer
    calling ``add_loss`` would need the labels and sample weights as model inputs.  The documented
    hook that gets ``x``, ``y``, the model's output and ``fit``'s sample weight is
    :meth:`compute_loss`; in a training step (``training=True``) :meth:`call` stops at the
    backbone's hidden states, which :meth:`compute_loss` turns into the fused loss.  Metrics
    compiled with the model need logits: they are computed in ``evaluate`` and on
    ``validation_data`` (``val_accuracy``) and left out of the training steps' logs.

    ``backbone``: a Keras layer or model mapping the inputs to hidden states ``(..., in_features)``
    (called with ``training=``); ``head_layer``: a :class:`HeadDense` of a head the fused loss
    supports (softmax heads with class ids; not ``reduction="none"``, which gives no training
    loss).  Its weights are those of the plain layer, so they port both ways with
    ``get_weights``/``set_weights`` (the model's list is the backbone's, then ``[kernel, bias]``).
    ``chunk_size``: classes per chunk (None: chosen from the sizes).  Compile without ``loss=``
    (the loss is the head's): ``model.compile(optimizer, metrics=compiled.keras_metrics())``.
    Saved and loaded with ``model.save`` / ``keras.models.load_model`` (a registered
    serializable)."""

    def __init__(self, backbone: Any, head_layer: Any, *, chunk_size: int | None = None, **kwargs: Any):
        from unihead import _fused

        super().__init__(**kwargs)
        if not isinstance(backbone, keras.layers.Layer):
            raise TypeError(
                f"FusedHeadModel(backbone, head_layer): backbone must be a Keras layer or model "
                f"mapping the inputs to hidden states; got {type(backbone).__name__}."
            )
        if not isinstance(head_layer, HeadDense):
            raise TypeError(
                f"FusedHeadModel(backbone, head_layer): head_layer must be a unihead HeadDense "
                f"(compiled.layer(in_features), or HeadDense(head)); got "
                f"{type(head_layer).__name__}."
            )
        problem = _fused.unsupported(head_layer.head)
        if problem is not None:
            raise ValueError(
                f"FusedHeadModel trains with the fused linear + loss, which this head does not "
                f"have: {problem} In Keras: keras.Sequential([backbone, head_layer]) compiled "
                f"with compiled.loss_fn()."
            )
        if head_layer.head.reduction == "none":
            raise ValueError(
                "FusedHeadModel trains on the head's loss, and this head has reduction='none' (a "
                "loss per example, no training objective): use reduction='mean' (the default) or "
                "'sum' in the head spec."
            )
        if chunk_size is not None:
            chunk_size = _fused.check_chunk_size(chunk_size)
        self.backbone = backbone
        self.head_layer = head_layer
        self.chunk_size = chunk_size
        self._head_loss = head_layer.compiled().loss_fn()  # evaluation: the loss of the logits

    def call(self, inputs: Any, training: Any = None) -> Any:
        hidden = self.backbone(inputs, training=training)
        if training:  # a training step: the fused loss takes the hidden states (compute_loss)
            if not self.head_layer.built:
                self.head_layer.build(tuple(hidden.shape))
            return hidden
        return self.head_layer(hidden)

    def compute_loss(
        self, x: Any = None, y: Any = None, y_pred: Any = None, sample_weight: Any = None,
        training: bool = True,
    ) -> Any:
        """The head's loss: in a training step the fused loss of the hidden states ``y_pred``
        (:meth:`HeadDense.linear_loss`), in evaluation that of the logits (:class:`HeadLoss`);
        plus the losses of the layers (``add_loss``, regularizers), as Keras' own."""
        object.__setattr__(self, "_fused_step", bool(training))  # for compute_metrics, same step
        if y is None:
            raise ValueError(
                "FusedHeadModel computes its head's loss from the labels: pass them to fit / "
                "evaluate (model.fit(x, y), or a dataset of (x, y) or (x, y, sample_weight))."
            )
        if training:
            layer = self.head_layer
            if _ACCUMULATING:  # a GradientAccumulation weights this micro-batch by its loss weight
                _record_weight(self._head_loss, layer.compiled(), y, _per_example(layer.head, sample_weight, y_pred))
            loss = layer.linear_loss(y_pred, y, sample_weight, chunk_size=self.chunk_size)
        else:
            loss = self._head_loss(y, y_pred, sample_weight)
        extra = [self._aggregate_additional_loss(extra) for extra in self.losses]
        return loss if not extra else ops.sum(ops.stack([loss, *[ops.cast(e, loss.dtype) for e in extra]]))

    def compute_metrics(self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None) -> dict:
        """Keras' metrics; in a training step, whose ``y_pred`` are hidden states (no logits were
        formed), all but the metrics compiled with the model."""
        if not self.__dict__.get("_fused_step", False):
            return super().compute_metrics(x, y, y_pred, sample_weight)
        return self._results(lambda metric, compiled: metric is compiled)

    def get_metrics_result(self) -> dict:
        """Keras' metric results, without the compiled metrics while no evaluation has built
        them (only training steps ran)."""
        return self._results(lambda metric, compiled: metric is compiled and not metric.built)

    def _results(self, skip: Any) -> dict:
        compiled = getattr(self, "_compile_metrics", None)
        results: dict = {}
        for metric in self.metrics:
            if skip(metric, compiled):
                continue
            value = metric.result()
            results.update(value if isinstance(value, dict) else {metric.name: value})
        return results

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, **kwargs: Any) -> None:
        """``keras.Model.compile`` without ``loss`` (the model's loss is its head's)."""
        if loss is not None:
            raise ValueError(
                "FusedHeadModel's loss is its head layer's (fused in training): compile it "
                "without loss=, e.g. model.compile(optimizer, metrics=compiled.keras_metrics())."
            )
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        """What ``keras.models.load_model`` calls with the saved compile arguments (Keras' own,
        which only skips models whose ``compile`` is overridden: this one's only refuses
        ``loss=``, which a saved FusedHeadModel has not)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if hasattr(self, "optimizer") and self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self) -> dict[str, Any]:
        config = {"name": self.name, "trainable": self.trainable,
                  "backbone": keras.saving.serialize_keras_object(self.backbone),
                  "head_layer": keras.saving.serialize_keras_object(self.head_layer)}
        if self.chunk_size is not None:
            config["chunk_size"] = self.chunk_size
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "FusedHeadModel":
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"), custom_objects=custom_objects)
        head_layer = keras.saving.deserialize_keras_object(config.pop("head_layer"), custom_objects=custom_objects)
        return cls(backbone, head_layer, **config)


#: The Keras name of each head reduction (``HeadLoss.reduction``), and back.
_KERAS_REDUCTION = {"mean": "mean_with_sample_weight", "sum": "sum", "none": "none"}
_FROM_KERAS = {"mean_with_sample_weight": "mean", "sum": "sum", "none": "none", None: "none"}


def _head_reduction(head: ClassificationHead, reduction: Any) -> str:
    """The head reduction that gives what Keras' ``reduction`` means, or a ValueError."""
    if reduction is None or (isinstance(reduction, str) and reduction in _FROM_KERAS):
        return _FROM_KERAS[reduction]
    spec = f"ClassificationHead.{head.task}(..., reduction='mean')"
    if isinstance(reduction, str) and reduction in ("sum_over_batch_size", "mean"):
        raise ValueError(
            f"HeadLoss(reduction={reduction!r}): Keras' {reduction!r} divides the weighted sum of "
            f"the losses by the number of examples; a unihead loss divides by the sum of the "
            f"weights (docs/semantics.md §7: sample and class weights are relative, ignored labels "
            f"do not dilute the batch). Set the reduction in the head spec: {spec} (the weighted "
            f"mean, Keras' 'mean_with_sample_weight'), 'sum' or 'none'; or leave reduction out of "
            f"HeadLoss."
        )
    raise ValueError(
        f"HeadLoss(reduction={reduction!r}) is not a reduction: set it in the head spec, {spec}, "
        f"'sum' or 'none' (Keras' names 'mean_with_sample_weight', 'sum' and None are accepted "
        f"here too)."
    )


def _head_accuracy(y_true: Any, y_pred: Any, compiled: KerasHead) -> Any:
    """Per-example accuracy of the compiled head's ``predict`` (its decision rule, computed
    once for every backend) against the labels."""
    head = compiled.head
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.convert_to_tensor(y_true)
    pred = ops.cast(compiled.predict(y_pred), "int32")
    fmt = head.label_format
    if head.task == "multilabel":
        target = ops.cast(ops.greater(ops.cast(y_true, "float32"), 0.5), "int32")
        return ops.mean(ops.cast(ops.equal(pred, target), "float32"), axis=-1)
    if head.task == "binary":
        y = ops.cast(y_true, "float32")
        if len(y.shape) == len(y_pred.shape):
            y = y[..., 0]
        target = ops.cast(ops.greater(y, 0.5), "int32")
        return ops.cast(ops.equal(pred, target), "float32")
    if fmt == "sparse":
        y = y_true
        if len(y.shape) == len(y_pred.shape):
            y = ops.squeeze(y, axis=-1)
        target = ops.cast(y, "int32")
    else:
        target = ops.argmax(y_true, axis=-1)
    return ops.cast(ops.equal(pred, ops.cast(target, "int32")), "float32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HeadAccuracy(keras.metrics.MeanMetricWrapper):
    """Accuracy of a head's predictions (its compiled head's ``predict``) against its labels."""

    def __init__(self, head: Any, name: str = "accuracy", dtype: Any = None):
        compiled = head if isinstance(head, KerasHead) else KerasHead(_as_head(head))
        super().__init__(fn=_head_accuracy, name=name, dtype=dtype, compiled=compiled)
        self.head = compiled.head
        self._direction = "up"

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "head": self.head.to_dict()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HeadAccuracy":
        return cls(**config)


# ------------------------------------------------------------------------------ accumulation
#: The GradientAccumulation optimizers alive: while there is one, every HeadLoss call records its
#: micro-batch's loss weight (nothing is recorded, or computed, otherwise).
_ACCUMULATING: "weakref.WeakSet[GradientAccumulation]" = weakref.WeakSet()
_RECORDS = threading.local()


def _record_weight(loss: "HeadLoss", compiled: KerasHead, y_true: Any, sample_weight: Any) -> None:
    """Record what this micro-batch's mean divides by (``loss_weight``: from the labels and the
    sample weight alone, so never a function of the parameters being differentiated) for the
    training step's ``GradientAccumulation.scale_loss``, which Keras' trainers call right after
    the loss (so the latest record is the step's own)."""
    if loss.head.reduction != "mean":
        raise ValueError(
            f"GradientAccumulation reproduces the weighted mean of the whole accumulation window, "
            f"and this HeadLoss has reduction={loss.head.reduction!r}: compile the head with "
            f"reduction='mean' (the default), or leave reduction= out of HeadLoss."
        )
    _RECORDS.latest = compiled.loss_weight(y_true, sample_weight)


_NO_HEAD_LOSS = (
    "GradientAccumulation weights each micro-batch by the loss weight its unihead HeadLoss "
    "computes, and no HeadLoss ran in this training step: compile the model with a head's loss, "
    "model.compile(optimizer=GradientAccumulation(...), loss=compiled.loss_fn()) (or "
    "compiled.compile_model(model, GradientAccumulation(...))). For a loss that is not a unihead "
    "head, Keras' own optimizer(gradient_accumulation_steps=n) is the uniform average of the "
    "micro-batches' gradients."
)


def _from_another_trace(weight: Any, loss: Any) -> bool:
    """Whether ``weight`` was computed in a traced function that is not the one computing
    ``loss``: a JAX tracer whose trace is not ``loss``'s or one it was differentiated in, a TF graph
    tensor of another graph.  (PyTorch runs eagerly: a weight left by a HeadLoss outside the step
    is used once, and the next step says that no HeadLoss ran.)"""
    trace = getattr(weight, "_trace", None)
    if trace is not None:  # JAX
        current = getattr(loss, "_trace", None)
        while current is not None and current is not trace:
            current = getattr(current, "parent_trace", None)
        return current is None
    graph = getattr(weight, "graph", None)  # TF graph tensors (eager ones have none)
    return graph is not None and getattr(loss, "graph", None) is not graph


def _take_recorded_weight() -> Any:
    """The loss weight the model's HeadLoss recorded for this step (and forget it)."""
    weight = _RECORDS.__dict__.pop("latest", None)
    if weight is None:
        raise ValueError(_NO_HEAD_LOSS)
    return weight


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GradientAccumulation(keras.optimizers.Optimizer):
    """Gradient accumulation whose update is the whole window's weighted-mean gradient.

    ``GradientAccumulation(inner_optimizer, steps)`` wraps a Keras optimizer (like
    ``keras.optimizers.LossScaleOptimizer``): ``model.fit`` runs one micro-batch per step, as with
    Keras' ``gradient_accumulation_steps=steps``, and every ``steps`` micro-batches the inner
    optimizer applies ``sum_i grad(total_i) / sum_i weight_i``: the gradient of the head's mean
    loss over all the window's examples, as if they had been one batch (docs/scaling-out.md).
    Keras' own ``gradient_accumulation_steps`` applies ``sum_i grad(mean_i) / steps``, a mean of
    means: a micro-batch with few counted labels (ignored labels, zero sample weights, small class
    weights) weighs as much as a full one.

    How: the model's loss must be one unihead :class:`HeadLoss` (``compiled.loss_fn()``).  It
    reports each micro-batch's ``loss_weight`` (from the labels and sample weights), the
    optimizer's ``scale_loss`` (which Keras' trainers apply to the loss before differentiating it)
    multiplies the loss by it, so the step's gradient is ``grad(total_i)``; the optimizer adds up
    those gradients and the weights in its own variables and divides once, at the update.  The
    loss ``fit`` logs is the micro-batch's mean, as without accumulation.  Regularisation losses
    are weighted the same way, so the update also carries their gradient once.  A window whose
    every label is ignored applies a zero gradient (the head's mean is 0 there).

    Under ``keras.distribution.DataParallel`` (JAX) each step's batch is the global one, its loss
    weight the global sum: the update is the same as on one device.

    ``inner_optimizer``: a Keras optimizer (or its name or config; not one with
    ``gradient_accumulation_steps``, which this replaces, nor a ``LossScaleOptimizer``, whose
    dynamic scale may change between micro-batches: set ``loss_scale_factor`` on the inner
    optimizer for a fixed scale).  ``steps``: micro-batches per update (an integer >= 1).
    ``learning_rate`` and ``iterations`` (the number of updates) are the inner optimizer's; the
    accumulators are this optimizer's variables (saved with the model, like Keras' own)."""

    def __init__(self, inner_optimizer: Any, steps: int, name: str | None = None, **kwargs: Any):
        if kwargs:
            raise ValueError(
                f"GradientAccumulation takes inner_optimizer, steps and name; got "
                f"{', '.join(sorted(kwargs))}: set the optimizer's own options on the inner "
                f"optimizer."
            )
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (micro-batches per update); got {steps!r}.")
        inner = inner_optimizer
        if isinstance(inner, (str, dict)):
            inner = keras.optimizers.get(inner)
        if not isinstance(inner, keras.optimizers.Optimizer):
            raise TypeError(
                f"GradientAccumulation wraps a Keras optimizer, e.g. "
                f"GradientAccumulation(keras.optimizers.Adam(1e-3), steps={steps}); got "
                f"{type(inner_optimizer).__name__}."
            )
        if isinstance(inner, (GradientAccumulation, keras.optimizers.LossScaleOptimizer)):
            raise ValueError(
                f"GradientAccumulation cannot wrap a {type(inner).__name__}: "
                + ("wrap the plain optimizer once." if isinstance(inner, GradientAccumulation) else
                   "its dynamic loss scale may change between the micro-batches of a window; set a "
                   "fixed loss_scale_factor on the inner optimizer instead.")
            )
        if inner.gradient_accumulation_steps:
            raise ValueError(
                f"the inner optimizer has gradient_accumulation_steps="
                f"{inner.gradient_accumulation_steps}: GradientAccumulation replaces it. Write "
                f"GradientAccumulation({type(inner).__name__}(...), "
                f"steps={inner.gradient_accumulation_steps}) without it."
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        self.steps = int(steps)
        self._pending_weight = None
        _ACCUMULATING.add(self)

    # -- state --------------------------------------------------------------------------------
    def build(self, var_list: list) -> None:
        self._accumulated = [self.add_variable_from_reference(v, name="accumulated_gradient") for v in var_list]
        self._accumulated_weight = self.add_variable(
            shape=(), dtype="float32", initializer="zeros", aggregation="none", name="accumulated_weight"
        )
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self) -> list:
        return self._variables + self.inner_optimizer.variables

    @property
    def learning_rate(self) -> Any:
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self) -> Any:
        """The number of updates applied (the inner optimizer's iterations)."""
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list: list) -> None:
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- one micro-batch ----------------------------------------------------------------------
    def scale_loss(self, loss: Any) -> Any:
        """The micro-batch's loss times its loss weight (its gradient: the gradient of the
        micro-batch's total), then the inner optimizer's scaling.  Keras' trainers call this on
        the loss before differentiating it; the weight is kept for :meth:`apply`."""
        weight = _take_recorded_weight()
        if _from_another_trace(weight, loss):  # recorded by a HeadLoss outside this step
            raise ValueError(_NO_HEAD_LOSS)
        self._pending_weight = weight
        return self.inner_optimizer.scale_loss(ops.multiply(loss, ops.cast(weight, loss.dtype)))

    def _take_pending_weight(self) -> Any:
        weight, self._pending_weight = self._pending_weight, None
        if weight is None:
            raise ValueError(
                "GradientAccumulation.apply() got gradients without their micro-batch's loss "
                "weight: they must be the gradients of the loss its scale_loss() returned "
                "(model.fit does this; a custom train_step calls loss = "
                "optimizer.scale_loss(loss) before taking the gradients)."
            )
        return ops.cast(weight, "float32")

    def _mean(self, sums: list, weight: Any) -> list:
        """The accumulated gradients over the accumulated weight (0 gradients for weight 0,
        whose gradients are all 0: every micro-batch's was scaled by its weight)."""
        safe = ops.where(ops.greater(weight, 0.0), weight, ops.ones_like(weight))
        return [ops.divide(s, ops.cast(safe, s.dtype)) for s in sums]

    def _is_update(self, iteration: Any) -> Any:
        return ops.equal(ops.mod(ops.add(iteration, 1), self.steps), 0)

    def apply(self, grads: list, trainable_variables: Any = None) -> None:
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        variables = list(trainable_variables) if trainable_variables is not None else self._trainable_variables
        if keras.backend.backend() == "jax":  # stateless at heart: compute, then assign
            own = [v.value for v in self.variables]
            new_vars, new_own = self.stateless_apply(own, grads, [v.value for v in variables])
            for v, value in zip(list(variables) + self.variables, list(new_vars) + list(new_own)):
                v.assign(value)
            return
        weight = self._take_pending_weight()
        accumulated = [self._accumulated[self._get_variable_index(v)] for v in variables]
        sums = [a.value if g is None else ops.add(a.value, g) for a, g in zip(accumulated, grads)]
        total_weight = ops.add(self._accumulated_weight.value, weight)

        def update() -> None:
            self.inner_optimizer.apply(self._mean(sums, total_weight), variables)
            for a in accumulated:
                a.assign(ops.zeros_like(a.value))
            self._accumulated_weight.assign(0.0)

        def accumulate() -> None:
            for a, s in zip(accumulated, sums):
                a.assign(s)
            self._accumulated_weight.assign(total_weight)

        ops.cond(self._is_update(self._iterations), update, accumulate)
        self._iterations.assign_add(1)

    def stateless_apply(self, optimizer_variables: list, grads: list, trainable_variables: list) -> tuple[list, list]:
        if not self.built:
            raise ValueError(
                "To call stateless_apply, GradientAccumulation must be built (its variables "
                "created): optimizer.build(trainable_variables)."
            )
        weight = self._take_pending_weight()
        n_own = len(self._variables)
        own, inner = list(optimizer_variables[:n_own]), list(optimizer_variables[n_own:])
        mapping = list(zip(self._variables, own))
        with keras.StatelessScope(state_mapping=mapping):
            iteration = self._iterations.value
            accumulated = [a.value for a in self._accumulated]
            total_weight = ops.add(self._accumulated_weight.value, weight)
        sums = [a if g is None else ops.add(a, g) for a, g in zip(accumulated, grads)]

        def update() -> tuple:
            new_vars, new_inner = self.inner_optimizer.stateless_apply(
                inner, self._mean(sums, total_weight), trainable_variables)
            return list(new_vars), list(new_inner), [ops.zeros_like(s) for s in sums], ops.zeros_like(total_weight)

        def accumulate() -> tuple:
            return list(trainable_variables), inner, sums, total_weight

        new_vars, new_inner, new_sums, new_weight = ops.cond(self._is_update(iteration), update, accumulate)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            for a, s in zip(self._accumulated, new_sums):
                a.assign(s)
            self._accumulated_weight.assign(new_weight)
            self._iterations.assign(ops.add(iteration, 1))
        return new_vars, [scope.get_current_value(v) for v in self._variables] + list(new_inner)

    # -- serialization ------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "steps": self.steps}

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "GradientAccumulation":
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        return cls(inner, **config)


def compile_head(head: ClassificationHead, *, validate: bool = True, fused: Any = None,
                 keep: str | None = None) -> KerasHead:
    """``unihead.compile(head, "keras", validate=True, fused=None, keep=None)`` (see
    :class:`KerasHead`)."""
    _announce_default_backend()
    return KerasHead(head, validate=validate, fused=fused, keep=keep)


#: What Keras writes to ``keras.json`` when it finds none: its defaults, chosen by nobody.
_KERAS_WRITTEN_CONFIG = {"floatx": "float32", "epsilon": 1e-07, "backend": "tensorflow", "image_data_format": "channels_last"}
_announced = False


def _keras_config_path() -> str:
    try:
        from keras.src.backend.config import keras_home  # where this Keras read its keras.json
        home = keras_home()
    except Exception:  # its documented rule: $KERAS_HOME, else ~/.keras
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.expanduser(os.path.join(home, "keras.json"))


def _backend_chosen(path: str) -> bool:
    """Whether the user chose Keras' backend: ``KERAS_BACKEND``, or a ``keras.json`` naming a
    backend that is not the file Keras writes itself on its first import (its defaults)."""
    if os.environ.get("KERAS_BACKEND"):
        return True
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "backend" in config and config != _KERAS_WRITTEN_CONFIG


def _announce_default_backend() -> None:
    """Say once which backend Keras fell back to, and how to choose, when nothing chose it:
    importing TensorFlow takes seconds and logs of its own, and JAX or PyTorch may be what the
    user has.  A ``UserWarning`` (shown once; ``warnings`` filters silence it)."""
    global _announced
    if _announced:
        return
    _announced = True
    path = _keras_config_path()
    if _backend_chosen(path):
        return
    warnings.warn(
        f"unihead: Keras is running on {keras.backend.backend()!r}, its default backend, because "
        f"nothing chose one (no KERAS_BACKEND environment variable; {path} is missing or as Keras "
        f"wrote it). To run Keras on JAX or PyTorch, set KERAS_BACKEND=jax or KERAS_BACKEND=torch "
        f"before Keras is imported, or \"backend\" in {path}; KERAS_BACKEND="
        f"{keras.backend.backend()} keeps this one and silences this message.",
        UserWarning,
        stacklevel=4,
    )
