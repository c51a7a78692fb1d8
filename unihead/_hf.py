"""Hugging Face transformers models, read without importing transformers: what a
``PreTrainedModel``'s config says about its head, what its own ``forward`` does with ``labels``,
what its pipelines apply to the logits, and the config fields that make a model agree with a
unihead head (:func:`hf_config`).

The rules are transformers' own (read in transformers 5.24's source and measured on tiny models
built from configs, tests/test_hf_models.py):

* ``*ForSequenceClassification``, ``*ForImageClassification`` (and the other models whose
  ``forward`` uses ``ForSequenceClassificationLoss`` or a copy of it): with
  ``config.problem_type`` unset, the first ``forward`` with labels *sets* it, and every later
  call follows it: ``num_labels == 1`` -> ``"regression"`` (``MSELoss``, whatever the labels);
  labels of dtype ``torch.long``/``torch.int`` -> ``"single_label_classification"``
  (``CrossEntropyLoss``, ignoring -100; PyTorch's cross-entropy then refuses int32 targets); any other dtype (float, but also ``uint8``, ``int16``,
  ``bool``) -> ``"multi_label_classification"`` (``BCEWithLogitsLoss`` on float rows).
* ``*ForTokenClassification``: ``CrossEntropyLoss`` over the tokens (ignoring -100), whatever
  ``problem_type`` says.
* the ``text-classification`` and ``image-classification`` pipelines apply, by default
  (``function_to_apply``): nothing for ``problem_type="regression"``; a sigmoid for
  ``"multi_label_classification"`` or ``num_labels == 1``; otherwise a softmax.
* ``PretrainedConfig`` refuses ``problem_type="single_label_classification"`` with
  ``num_labels=1`` (a ``ValueError`` at config time); ``num_labels`` is ``len(id2label)``.

Nothing here imports a framework: the model is read through its attributes (duck typing on
``config`` and ``PreTrainedModel`` in its class's MRO), by :mod:`unihead._readers`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import HeadSpecError
from .spec import ClassificationHead

__all__ = ["HFInfo", "is_hf_model", "hf_info", "hf_config", "config_head", "effective_problem_type",
           "pipeline_activation", "labels_are_int", "PROBLEM_TYPES", "HF_IGNORE_INDEX", "HEAD_ATTRIBUTES"]

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
HF_IGNORE_INDEX = -100
#: The attributes transformers' task models keep their classification layer in (the last
#: ``nn.Linear`` inside one that is a module: RoBERTa's ``classifier.out_proj``, BART's
#: ``classification_head.out_proj``).
HEAD_ATTRIBUTES = ("classifier", "score", "classification_head", "head")


def is_hf_model(obj: Any) -> bool:
    """A transformers ``PreTrainedModel`` (without importing transformers: its class's MRO)."""
    if not hasattr(obj, "config"):
        return False
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(obj).__mro__)


@dataclasses.dataclass(frozen=True)
class HFInfo:
    """What a transformers model's config and class say about its head."""

    model_class: str
    kind: str  # "sequence" (ForSequenceClassificationLoss's rule) | "token" (always cross-entropy)
    num_labels: int | None
    problem_type: str | None
    id2label: dict[Any, Any] | None
    label2id: dict[Any, Any] | None
    layer_path: str

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """``id2label`` as class names, when it names ids ``0 .. num_labels - 1`` with distinct
        non-empty strings that are not transformers' placeholders ``LABEL_i``."""
        m = self.id2label
        if not isinstance(m, dict) or not m or set(m) != set(range(len(m))):
            return None
        names = [m[i] for i in range(len(m))]
        if names == [f"LABEL_{i}" for i in range(len(m))]:
            return None
        if not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names):
            return None
        return tuple(names)

    def describe(self) -> str:
        return f"{self.model_class}(num_labels={self.num_labels}, problem_type={self.problem_type!r})"


def hf_info(model: Any, layer_path: str) -> HFInfo:
    config = model.config
    name = type(model).__name__
    kind = "token" if name.endswith("ForTokenClassification") else "sequence"
    id2label = getattr(config, "id2label", None)
    label2id = getattr(config, "label2id", None)
    return HFInfo(name, kind, getattr(config, "num_labels", None), getattr(config, "problem_type", None),
                  dict(id2label) if isinstance(id2label, dict) else None,
                  dict(label2id) if isinstance(label2id, dict) else None, layer_path)


def labels_are_int(labels: Any) -> bool | None:
    """Whether transformers reads ``labels`` as class ids: dtype ``torch.long`` or ``torch.int``
    (int64/int32; NumPy's are converted to those by a collator).  ``None`` without labels."""
    if labels is None:
        return None
    if not hasattr(labels, "dtype"):
        import numpy as np

        labels = np.asarray(labels)
    name = str(labels.dtype).replace("torch.", "")
    return name in ("int64", "int32")


def effective_problem_type(info: HFInfo, labels_int: bool | None) -> str | None:
    """The ``problem_type`` the model's own ``forward`` uses with these labels (token models:
    ``"single_label_classification"`` always); ``None`` when it depends on labels not given."""
    if info.kind == "token":
        return "single_label_classification"
    if info.problem_type is not None:
        return info.problem_type
    if info.num_labels == 1:
        return "regression"
    if labels_int is None:
        return None
    return "single_label_classification" if labels_int else "multi_label_classification"


def pipeline_activation(info: HFInfo) -> str:
    """What the ``text-classification``/``image-classification`` pipelines apply to the logits
    by default (their ``function_to_apply``): ``"none"``, ``"sigmoid"`` or ``"softmax"``; the
    ``token-classification`` pipeline always applies a softmax."""
    if info.kind == "token":
        return "softmax"
    if info.problem_type == "regression":
        return "none"
    if info.problem_type == "multi_label_classification" or info.num_labels == 1:
        return "sigmoid"
    return "softmax"


def config_head(info: HFInfo) -> ClassificationHead:
    """The head the model's config implies for training (what ``trainer_loss(model)`` computes):
    token models and ``single_label_classification`` (or unset, ``num_labels >= 2``): softmax
    cross-entropy over ``num_labels`` (``binary(binary_units=2)`` for 2), labels -100 ignored;
    ``multi_label_classification``: ``multilabel(num_labels)`` (``binary()`` for one label).
    A regression config (``num_labels=1`` with ``problem_type`` unset, or ``"regression"``) has
    no classification head: refused, saying which config to write."""
    k = info.num_labels
    names = info.class_names
    pt = "single_label_classification" if info.kind == "token" else info.problem_type
    if not isinstance(k, int) or k < 1:
        raise HeadSpecError(f"{info.describe()} has no classification outputs (num_labels={k!r}).")
    if pt == "regression" or pt is None and k == 1:
        raise HeadSpecError(
            f"{info.describe()} is a regression model: its forward trains an MSE loss on one output "
            + ("(num_labels=1 with problem_type unset means 'regression')" if pt is None else "")
            + ", not a classifier. For two classes write the config with "
            "num_labels=2, problem_type='single_label_classification' (two logits, softmax), or "
            "num_labels=1, problem_type='multi_label_classification' (one logit, sigmoid; float labels "
            "of shape (N, 1)): unihead.backends.transformers.hf_config(ClassificationHead.binary()) gives "
            "the fields."
        )
    if pt == "multi_label_classification":
        head = ClassificationHead.binary() if k == 1 else ClassificationHead.multilabel(k)
    elif k == 1:  # a token model with one label: cross-entropy over one logit
        raise HeadSpecError(
            f"{info.describe()} has one output, and its forward's cross-entropy over one logit is always 0: "
            "nothing is learned. Write num_labels=2 (or more: one per class)."
        )
    elif k == 2:
        head = ClassificationHead.binary(binary_units=2, ignore_index=HF_IGNORE_INDEX)
    else:
        head = ClassificationHead.multiclass(k, ignore_index=HF_IGNORE_INDEX)
    if names is not None and len(names) == (2 if head.task == "binary" else head.num_classes):
        try:
            head = head.replace(class_names=names)
        except HeadSpecError:  # names unihead cannot carry (too long): the head without them
            pass
    return head


def hf_config(head: ClassificationHead) -> dict[str, Any]:
    """The config fields that make a transformers model agree with ``head``: ``num_labels``
    (the head's outputs), ``problem_type`` (the loss its forward and the pipelines' activation
    follow) and ``id2label``/``label2id`` (the head's ``class_names``, else transformers'
    ``LABEL_i``).  Pass them to ``AutoConfig.from_pretrained(..., **fields)`` or
    ``AutoModelFor...from_pretrained(..., **fields)``.

    The model's own loss then has the head's *structure* (softmax cross-entropy, or sigmoid
    binary cross-entropy); the head's loss options (smoothing, weights, focal loss, ...) are
    unihead's: train with ``compute_loss_func=trainer_loss(model_or_head)``.  A 1-unit binary
    head is ``num_labels=1, problem_type="multi_label_classification"`` (one sigmoid; its labels
    float, shape ``(N, 1)``): ``num_labels=1`` alone would be a regression."""
    if not isinstance(head, ClassificationHead):
        raise TypeError(f"hf_config takes a ClassificationHead, got {type(head).__name__}.")
    if head.task == "multiclass" or head.task == "binary" and head.binary_units == 2:
        problem_type = "single_label_classification"
    else:
        problem_type = "multi_label_classification"
    k = head.num_outputs
    names = head.class_names
    if names is None or len(names) != k:  # a 1-unit binary head has 2 names and one output
        id2label = {i: f"LABEL_{i}" for i in range(k)}
        if names is not None and head.task == "binary":
            id2label = {0: names[1]}  # the one output is P(positive): it is named after that class
    else:
        id2label = dict(enumerate(names))
    return {"num_labels": k, "problem_type": problem_type, "id2label": id2label,
            "label2id": {v: i for i, v in id2label.items()}}
