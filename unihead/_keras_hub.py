"""keras-hub ``*Classifier`` tasks, read for :func:`unihead.diagnose`, :func:`unihead.infer` and
:func:`unihead.port`.

A keras-hub classifier (``keras_hub.models.ImageClassifier``, ``BertTextClassifier``, ...) is a
functional Keras model whose head is ``model.output_dense``: a ``Dense(num_classes,
activation=activation)``, where ``activation=None`` (the default) outputs logits and
``"softmax"`` probabilities.  A task compiles itself when built (``Task.__init__(compile=True)``),
*before* the classifier sets its ``activation``: until it is compiled again, its loss is
``SparseCategoricalCrossentropy(from_logits=True)`` whatever the activation, so a task built
with ``activation="softmax"`` and trained without its own ``compile`` applies the softmax twice.
Its ``compile(loss="auto")`` (keras-hub 0.32) picks
``SparseCategoricalCrossentropy(from_logits=activation != softmax)``: right for ``None`` and
``"softmax"``, a double activation for ``"sigmoid"``, and over ``num_classes=1`` a categorical
loss of one class (0 on JAX, an out-of-range error on PyTorch and TensorFlow).  A loss passed to
``compile`` is not checked against ``activation`` by keras-hub: logits under
``from_logits=False`` train silently wrong on every backend, and probabilities under
``from_logits=True`` get a warning on TensorFlow only.  The checks are unihead's ordinary Keras
rules on that ``Dense`` and the compiled loss; this module reads the task and writes the fix
as keras-hub lines.  Nothing here imports keras-hub.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._native import native_loss
from ._readers import Reading, _keras_reading
from .spec import ClassificationHead

__all__ = ["keras_hub_reading", "keras_hub_lines"]


def keras_hub_reading(model: Any, loss: Any) -> Reading:
    """The :class:`Reading` of a keras-hub task: its ``output_dense`` and compiled loss."""
    import keras

    if isinstance(model, keras.layers.Dense):
        return _keras_reading(model, loss)
    dense = getattr(model, "output_dense", None)
    if not isinstance(dense, keras.layers.Dense):
        raise ValueError(
            f"keras_hub {type(model).__name__} has no classifier head (no output_dense Dense layer): it outputs "
            "features or another task's outputs, and unihead reads a classifier's head. Diagnose the classifier "
            "task built on it, e.g. keras_hub.models.ImageClassifier(backbone, num_classes=K) or the "
            "model's *TextClassifier.")
    r = _keras_reading(dense, loss if loss is not None else getattr(model, "loss", None))
    task = type(model).__name__
    where = f"keras_hub {task} (output_dense: {r.where})"
    return dataclasses.replace(r, where=where, library="keras_hub", options={"task": task})


def keras_hub_lines(head: ClassificationHead, task: str | None) -> str:
    """``head`` written with keras-hub: the task with ``activation=None`` (logits) and the
    ``compile`` that pairs it with a loss taking logits (keras-hub's ``loss="auto"`` where it is
    that loss; the Keras lines of the same finding otherwise)."""
    task = task or "ImageClassifier"
    k = head.num_outputs
    model = f"model = keras_hub.models.{task}(backbone, num_classes={k}, activation=None)  # logits"
    plain = ClassificationHead.multiclass(k) if k >= 2 else None
    if head == plain or head.task == "binary" and head.binary_units == 2 and head == ClassificationHead.binary(
            binary_units=2):
        return f"{model}\nmodel.compile()  # loss='auto': SparseCategoricalCrossentropy(from_logits=True)"
    if native_loss(head, "keras").exact:
        return f"{model}\nmodel.compile(loss=loss_fn)  # loss_fn: the Keras lines above"
    return (f"{model}\nmodel.compile(loss=compiled.loss_fn())  # compiled: the unihead lines above "
            "(no Keras loss gives this head's numbers)")
