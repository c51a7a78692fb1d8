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

from ._untrusted import show as _show
from .errors import HeadSpecError
from .spec import _ALL_FORMATS, _DEFAULT_FORMAT, MAX_INDEX, TASKS, ClassificationHead, _as_int, _suggest

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
            name = {"one_hot": "one-hot", "multi_hot": "multi-hot", "probability_rows": "probability"}[self.kind]
            return f"{name} rows of width {self.width}, shape {self.shape}"
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
class _Fit:
    """A head a label array fits: ``task``, ``label_format``, and its ``num_classes`` -- exactly
    ``k``, or (integer ids, multiclass) any ``K >= k``."""

    task: str
    label_format: str
    k: int
    at_least: bool = False

    def call(self, k: int | None = None) -> str:
        k = self.k if k is None else k
        if self.task == "binary":
            return "ClassificationHead.binary(" + ("label_format='probabilities')" if self.label_format != "binary" else ")")
        fmt = "" if self.label_format == _DEFAULT_FORMAT[self.task] else f", label_format={self.label_format!r}"
        return f"ClassificationHead.{self.task}({k}{fmt})"


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
    """The head a label array calls for (see :meth:`ClassificationHead.from_labels`).

    The labels give the heads they fit, most natural first (0/1 ids: ``binary`` then
    ``multiclass(2)``; one-hot rows: ``multiclass(K, "one_hot")``, and, when asked for with
    ``task``/``label_format``, the multilabel and probability readings of the same rows);
    ``task``, ``label_format`` and ``num_classes`` choose among them, and the first that the other
    options fit is built.  A choice no reading of the labels fits is an error that says what the
    labels are and what to pass instead."""
    fields = {f.name for f in dataclasses.fields(ClassificationHead)} - {"num_classes"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"from_labels() got unexpected options {unknown}; options are ClassificationHead's "
            f"fields: {', '.join(sorted(fields))}." + _suggest(unknown[0], sorted(fields))
        )
    task = options.pop("task", None)
    fmt = options.pop("label_format", None)
    if task is not None and (not isinstance(task, str) or task not in TASKS):
        ClassificationHead(task)  # raises the constructor's own message for a wrong task
    if fmt is not None and (not isinstance(fmt, str) or fmt not in _ALL_FORMATS):
        raise HeadSpecError(
            f"Unknown label_format {_show(fmt)}: write one of {', '.join(map(repr, _ALL_FORMATS))}."
            + (_suggest(fmt, _ALL_FORMATS) if isinstance(fmt, str) else "")
        )
    num_classes = _as_int("num_classes", num_classes, allow_none=True)
    ignore = _as_int("ignore_index", options["ignore_index"]) if options.get("ignore_index") is not None else None

    s = describe_labels(y)
    if s.kind == "ids":
        desc, fits, extra = _id_fits(y, s, num_classes, ignore, task, fmt, options)
    elif s.kind == "other":
        raise HeadSpecError(
            f"labels are {s.describe()}: neither class ids, one-hot/multi-hot rows nor probabilities. "
            f"Choose between ClassificationHead.multiclass(K) (integer ids 0..K-1), "
            f"ClassificationHead.multilabel(K) (0/1 rows) and label_format='probabilities' (values in [0, 1])."
        )
    else:
        desc, k = s.describe(), s.width
        natural = read_labels(s)  # the one reading of rows (diagnose reads labels with it too)
        assert natural is not None and natural.num_classes is not None
        fits = [_Fit(natural.task, natural.label_format, natural.num_classes)]
        extra = {  # the same values read another way: only when task/label_format ask for it
            "one_hot": [_Fit("multiclass", "probabilities", k), _Fit("multilabel", "multi_hot", k),
                        _Fit("multilabel", "probabilities", k)],
            "multi_hot": [_Fit("multilabel", "probabilities", k)],
            "probability_rows": [_Fit("multilabel", "probabilities", k)],
            "probabilities": [],
        }[s.kind]

    # ---- task and label_format choose among the readings of the labels
    def chosen(f: _Fit) -> bool:
        return (task is None or f.task == task) and (fmt is None or f.label_format == fmt)

    picked = [f for f in fits if chosen(f)] or [f for f in extra if chosen(f)]
    if not picked:
        given = [(n, v) for n, v in (("task", task), ("label_format", fmt)) if v is not None]
        raise HeadSpecError(
            f"labels are {desc}, which fit {' or '.join(f.call() for f in fits)}, not "
            f"{', '.join(f'{n}={v!r}' for n, v in given)}. {_conversion_hint(s, task, fmt)}Or leave out "
            f"{' and '.join(n for n, _ in given)} to get {fits[0].call()}."
        )

    # ---- num_classes must be the one the labels imply
    if num_classes is not None:
        sized = [f for f in picked if (f.k <= num_classes if f.at_least else f.k == num_classes)]
        if not sized:
            f = picked[0]
            if f.at_least:
                raise HeadSpecError(
                    f"labels have ids up to {f.k - 1} but num_classes={num_classes}: pass "
                    f"num_classes={f.k} or more, or fix the labels."
                )
            if f.task == "binary":
                raise HeadSpecError(
                    f"labels are {desc}, which fit a binary head (2 classes), but num_classes={num_classes}: "
                    f"leave num_classes out (or pass 2); for {num_classes} classes give rows of "
                    f"{num_classes} values per example, or integer ids 0..{num_classes - 1}."
                )
            raise HeadSpecError(
                f"labels are {desc}, but num_classes={num_classes}: rows of labels have one column per "
                f"class, so pass num_classes={f.k} (or leave it out), or fix the labels."
            )
        picked = sized

    # ---- the first reading the other options fit
    failures: list[tuple[str, str]] = []
    for f in picked:
        k = num_classes if num_classes is not None else f.k
        try:
            return ClassificationHead(f.task, num_classes=None if f.task == "binary" else k,
                                      label_format=f.label_format, **options)
        except HeadSpecError as e:
            failures.append((f.call(k), str(e)))
    if len(failures) == 1:
        raise HeadSpecError(f"labels are {desc}, which call for {failures[0][0]}, but with these options: "
                            f"{failures[0][1]}")
    raise HeadSpecError(
        f"labels are {desc}; no head they fit takes these options: "
        + " ".join(f"{call}: {msg}" for call, msg in failures)
    )


def _id_fits(
    y: Any, s: LabelSummary, num_classes: int | None, ignore: int | None, task: str | None,
    fmt: str | None, options: dict[str, Any],
) -> tuple[str, list[_Fit], list[_Fit]]:
    """Description and readings of integer ids (``ignore`` values left out)."""
    values = np.unique(np.asarray(y, dtype=np.float64))
    ignored = ignore is not None and bool(np.any(values == ignore))
    if ignore is not None:
        values = values[values != ignore]
    negatives = [int(v) for v in values[values < 0]]
    if negatives:
        marker = negatives[0]
        if ignore is None:
            raise HeadSpecError(
                f"labels contain negative ids {negatives}: if {marker} marks examples to leave out, "
                f"write ClassificationHead.multiclass(K, ignore_index={marker}) (or binary(ignore_index={marker})); "
                f"otherwise the labels are not class ids."
            )
        raise HeadSpecError(
            f"labels contain negative ids {negatives}, and ignore_index={ignore} is not among them: "
            + (f"pass ignore_index={marker} if {marker} marks examples to leave out; " if len(negatives) == 1
               else "one value can mark examples to leave out; ")
            + "otherwise the labels are not class ids."
        )
    if values.size == 0:
        raise HeadSpecError(
            f"every label is ignore_index={ignore}: there are no class ids to infer a head from. "
            f"Write the head: ClassificationHead.multiclass(K, ignore_index={ignore}) or binary(ignore_index={ignore})."
        )
    top = int(values.max())
    if top >= MAX_INDEX:
        raise HeadSpecError(
            f"labels have ids up to {top}, but class ids must be below {MAX_INDEX} (2**31 - 1, so that "
            f"they fit int32 on every backend): fix the labels."
        )
    desc = f"integer class ids {int(values.min())}..{top}" + (f" and ignore_index {ignore}" if ignored else "") + \
        f", shape {s.shape}"
    binary = [_Fit("binary", "binary", 2)] if top <= 1 else []
    multiclass = [_Fit("multiclass", "sparse", max(top + 1, 2), at_least=True)]
    units = options.get("binary_units")
    wants_binary = task == "binary" or fmt == "binary" or (units is not None and units != 1)
    if values.size < 2 and num_classes is None and not (binary and wants_binary):
        raise HeadSpecError(
            f"labels only contain class {top}: the number of classes cannot be told. Pass "
            f"num_classes=K, or choose ClassificationHead.binary() (two classes; task='binary') or "
            f"ClassificationHead.multiclass(K)."
        )
    # 0/1 ids are a binary head, unless num_classes=K says multiclass (the binary reading stays
    # second, for options only a binary head takes: binary_units, pos_weight, threshold)
    fits = binary + multiclass if num_classes is None or wants_binary else multiclass + binary
    extra = [_Fit("binary", "probabilities", 2)] if top <= 1 and not ignored else []
    return desc, fits, extra


def _conversion_hint(s: LabelSummary, task: str | None, fmt: str | None) -> str:
    """How to turn these labels into the ones ``task``/``label_format`` take ('' if no recipe)."""
    wants_rows = task == "multilabel" or fmt in ("one_hot", "multi_hot") or (
        fmt == "probabilities" and task != "binary" and s.kind == "ids")
    wants_ids = task == "binary" or fmt in ("sparse", "binary")
    if s.kind == "ids" and task == "binary":
        return "A binary head takes 0/1 labels; more classes are ClassificationHead.multiclass(K). "
    if s.kind == "ids" and wants_rows:
        return "To give rows, convert the ids: np.eye(K)[y] (one-hot). "
    if s.kind in ("one_hot", "probability_rows") and wants_ids:
        return "To give class ids, convert the rows: y.argmax(-1). "
    if s.kind == "multi_hot" and (task in ("multiclass", "binary") or wants_ids):
        return "Rows with several 1s (or none) are several labels per example: a multilabel head. "
    if s.kind == "probabilities" and s.width is None and task in ("multiclass", "multilabel"):
        return "One probability per example is a binary head; multiclass and multilabel heads take rows (N, K). "
    if s.kind == "probabilities" and s.width and task == "multiclass":
        return "Multiclass probability rows sum to 1; these do not. "
    return ""
