"""What a label array says about the head it needs: :func:`describe_labels` and
:func:`head_from_labels` (``ClassificationHead.from_labels``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .errors import HeadSpecError
from .spec import ClassificationHead

__all__ = ["LabelSummary", "describe_labels", "head_from_labels"]


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
            return LabelSummary("ids", shape, True, lo, hi, None, top + 1, neg)
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


def head_from_labels(y: Any, num_classes: int | None = None, **options: Any) -> ClassificationHead:
    """The head a label array calls for (see :meth:`ClassificationHead.from_labels`)."""
    s = describe_labels(y)
    if s.kind == "ids":
        if s.negatives:
            marker = s.negatives[0]
            raise HeadSpecError(
                f"labels contain negative ids {list(s.negatives)}: if {marker} marks examples to leave out, "
                f"write ClassificationHead.multiclass(K, ignore_index={marker}) (or binary(ignore_index={marker})); "
                f"otherwise the labels are not class ids."
            )
        distinct = np.unique(np.asarray(y))
        k = num_classes or s.classes
        if k is None or k < 2 or (num_classes is None and distinct.size < 2):
            raise HeadSpecError(
                f"labels only contain class {int(s.max)}: the number of classes cannot be told. Pass "
                f"num_classes=K, or choose ClassificationHead.binary() (two classes) or "
                f"ClassificationHead.multiclass(K)."
            )
        if k == 2 and num_classes is None:
            return ClassificationHead.binary(**options)
        return ClassificationHead.multiclass(k, **options)
    if s.kind == "one_hot":
        return ClassificationHead.multiclass(s.width, label_format="one_hot", **options)
    if s.kind == "multi_hot":
        return ClassificationHead.multilabel(s.width, **options)
    if s.kind == "probability_rows":
        return ClassificationHead.multiclass(s.width, label_format="probabilities", **options)
    if s.kind == "probabilities":
        if s.width is None:
            return ClassificationHead.binary(label_format="probabilities", **options)
        return ClassificationHead.multilabel(s.width, label_format="probabilities", **options)
    raise HeadSpecError(
        f"labels are {s.describe()}: neither class ids, one-hot/multi-hot rows nor probabilities. "
        f"Choose between ClassificationHead.multiclass(K) (integer ids 0..K-1), "
        f"ClassificationHead.multilabel(K) (0/1 rows) and label_format='probabilities' (values in [0, 1])."
    )
