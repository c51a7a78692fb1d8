"""What a label array says about the head it needs.

:func:`describe_labels` reads the facts (integer ids, one-hot / multi-hot / probability rows,
probabilities), :func:`read_labels` turns them into a task, label format and class count (the
one rule set: :meth:`ClassificationHead.from_labels` and :func:`unihead.diagnose` both use it),
and :func:`head_from_labels` is ``ClassificationHead.from_labels``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import HeadSpecError
from .spec import ClassificationHead

__all__ = ["LabelSummary", "LabelReading", "describe_labels", "read_labels", "head_from_labels"]


@dataclasses.dataclass(frozen=True)
class LabelSummary:
    """Facts about a label array (values read once, on the host).

    ``kind``: ``"ids"`` (integers, one per example; ``(N,)`` or ``(N, 1)``), ``"one_hot"``
    (rows with exactly one 1), ``"multi_hot"`` (0/1 rows, not all with exactly one 1),
    ``"probability_rows"`` (rows in [0, 1] summing to 1), ``"probabilities"`` (values in [0, 1],
    one per example or rows not summing to 1), ``"other"``."""

    kind: str
    shape: tuple[int, ...]
    integral: bool
    min: float
    max: float
    width: int | None  # K for row labels
    classes: int | None  # number of classes the values imply (ids: max + 1)
    negatives: tuple[int, ...] = ()  # distinct negative ids (ignore markers?)
    distinct: int | None = None  # ids: how many distinct non-negative ids occur

    def describe(self) -> str:
        if self.kind == "ids":
            neg = f", plus {list(self.negatives)}" if self.negatives else ""
            return f"integer class ids {int(self.min) if not self.negatives else 0}..{int(self.max)}{neg}, shape {self.shape}"
        if self.kind in ("one_hot", "multi_hot", "probability_rows"):
            return f"{self.kind.replace('_', '-')} rows of width {self.width}, shape {self.shape}"
        if self.kind == "probabilities":
            return f"probabilities in [0, 1], shape {self.shape}"
        return f"values in [{self.min:g}, {self.max:g}], shape {self.shape}"


def describe_labels(y: Any) -> LabelSummary:
    arr = np.asarray(y)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"labels must be a numeric array; got dtype {arr.dtype}.")
    if arr.size == 0:
        raise ValueError("labels are empty: nothing to infer from.")
    a = arr.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("labels contain NaN or infinity.")
    shape = tuple(arr.shape)
    integral = bool(np.all(a == np.round(a)))
    lo, hi = float(a.min()), float(a.max())
    rows = a.ndim >= 2 and shape[-1] > 1
    if not rows:
        flat = a.reshape(-1) if a.ndim <= 1 or shape[-1] == 1 else a
        if integral:
            neg = tuple(sorted({int(v) for v in np.unique(flat) if v < 0}))
            pos = flat[flat >= 0]
            top = int(pos.max()) if pos.size else -1
            return LabelSummary("ids", shape, True, lo, hi, None, top + 1, neg, int(np.unique(pos).size))
        if 0.0 <= lo and hi <= 1.0:
            return LabelSummary("probabilities", shape, False, lo, hi, None, 2)
        return LabelSummary("other", shape, False, lo, hi, None, None)
    k = shape[-1]
    binary_values = bool(np.all((a == 0) | (a == 1)))
    if binary_values:
        ones = a.sum(-1)
        if np.all(ones == 1):
            return LabelSummary("one_hot", shape, True, lo, hi, k, k)
        return LabelSummary("multi_hot", shape, True, lo, hi, k, k)
    if 0.0 <= lo and hi <= 1.0:
        sums = a.sum(-1)
        if np.all(np.abs(sums - 1) <= k * 2.0**-23):
            return LabelSummary("probability_rows", shape, False, lo, hi, k, k)
        return LabelSummary("probabilities", shape, False, lo, hi, k, k)
    return LabelSummary("other", shape, integral, lo, hi, k, None)


@dataclasses.dataclass(frozen=True)
class LabelReading:
    """What labels say the head is: ``task``, ``label_format`` and ``num_classes`` (``None``:
    the labels cannot tell, e.g. ids that are all the same class)."""

    task: str
    label_format: str
    num_classes: int | None

    def head(self, **options: Any) -> ClassificationHead:
        """The head, with ``options`` for the constructor.  The label format is passed only when
        it is not the task's default (as ``from_labels`` always did: a ``label_format`` option is
        taken for integer ids and 0/1 rows, and clashes with one-hot or probability rows)."""
        default = self.label_format in ("sparse", "binary", "multi_hot")
        fmt = {} if default else {"label_format": self.label_format}
        if self.task == "binary":
            return ClassificationHead.binary(**fmt, **options)
        return ClassificationHead(self.task, num_classes=self.num_classes, **fmt, **options)


def read_labels(s: LabelSummary, *, num_classes: int | None = None, outputs: int | None = None,
                exclusive: bool | None = None) -> LabelReading | None:
    """The one rule set from label facts to a head's task, label format and class count.

    Hints from elsewhere settle what labels alone cannot: ``num_classes`` (given by the user:
    integer ids are then ``multiclass(num_classes)``, even for two classes), ``outputs`` (the
    width of an existing output layer: a batch need not show every class, so ids are read as at
    least that many classes) and ``exclusive`` (``True``: the model scores exclusive classes, a
    softmax or a categorical loss; ``False``: independent labels, sigmoids with binary
    cross-entropy).  Rows with exactly one 1, or rows of probabilities summing to 1, are
    exclusive classes unless ``exclusive`` is ``False`` (a multilabel batch can look like that);
    rows with several 1s are always multilabel.  ``None`` for labels that are none of these
    (``s.kind == "other"``); negative ids are ignore markers and count for nothing here."""
    if s.kind == "ids":
        if num_classes is not None:
            return LabelReading("multiclass", "sparse", num_classes)
        k = max(s.classes or 0, outputs or 0)
        if outputs is None and (s.distinct or 0) < 2:
            return LabelReading("multiclass", "sparse", None)  # one class seen: how many are there?
        if k <= 2:
            return LabelReading("binary", "binary", 2)
        return LabelReading("multiclass", "sparse", k)
    if s.kind == "multi_hot" or s.kind == "one_hot" and exclusive is False:
        return LabelReading("multilabel", "multi_hot", s.width)
    if s.kind == "one_hot":
        return LabelReading("multiclass", "one_hot", s.width)
    if s.kind == "probability_rows":
        return LabelReading("multilabel" if exclusive is False else "multiclass", "probabilities", s.width)
    if s.kind == "probabilities":
        if s.width is None:
            return LabelReading("binary", "probabilities", 2)
        return LabelReading("multilabel", "probabilities", s.width)
    return None


def head_from_labels(y: Any, num_classes: int | None = None, **options: Any) -> ClassificationHead:
    """The head a label array calls for (see :meth:`ClassificationHead.from_labels`)."""
    s = describe_labels(y)
    if s.kind == "ids" and s.negatives:
        marker = s.negatives[0]
        raise HeadSpecError(
            f"labels contain negative ids {list(s.negatives)}: if {marker} marks examples to leave out, "
            f"write ClassificationHead.multiclass(K, ignore_index={marker}) (or binary(ignore_index={marker})); "
            f"otherwise the labels are not class ids."
        )
    reading = read_labels(s, num_classes=num_classes)
    if reading is None:
        raise HeadSpecError(
            f"labels are {s.describe()}: neither class ids, one-hot/multi-hot rows nor probabilities. "
            f"Choose between ClassificationHead.multiclass(K) (integer ids 0..K-1), "
            f"ClassificationHead.multilabel(K) (0/1 rows) and label_format='probabilities' (values in [0, 1])."
        )
    if reading.num_classes is None or reading.num_classes < 2:
        raise HeadSpecError(
            f"labels only contain class {int(s.max)}: the number of classes cannot be told. Pass "
            f"num_classes=K, or choose ClassificationHead.binary() (two classes) or "
            f"ClassificationHead.multiclass(K)."
        )
    return reading.head(**options)
