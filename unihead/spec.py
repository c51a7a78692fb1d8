"""The declarative description of a classification output head: :class:`ClassificationHead`.

A head is plain data: what the task is, how wide the output layer is, what the labels look
like, and which loss options apply.  It is immutable, validated on construction (every
contradiction is rejected with a message that says what to write instead), and serialisable
to a versioned dict/JSON form that is safe to read from untrusted input.

The meaning of every field is written down in ``docs/semantics.md``; the numbers are computed
by the backends (``unihead.compile(head, "numpy" | "torch" | "jax" | "keras")``).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import operator
from typing import Any, Callable, Mapping, Sequence

from ._untrusted import loads as _loads, show as _show
from .errors import HeadSpecError

__all__ = ["ClassificationHead", "TASKS", "LABEL_FORMATS", "REDUCTIONS", "SPEC_VERSION", "MAX_INDEX", "MAX_NAME_LENGTH"]

TASKS = ("binary", "multiclass", "multilabel")
LABEL_FORMATS = {
    "binary": ("binary", "probabilities"),
    "multiclass": ("sparse", "one_hot", "probabilities"),
    "multilabel": ("multi_hot", "probabilities"),
}
_DEFAULT_FORMAT = {"binary": "binary", "multiclass": "sparse", "multilabel": "multi_hot"}
REDUCTIONS = ("mean", "sum", "none")

#: Version of the dict/JSON form written by :meth:`ClassificationHead.to_dict`: the newest this
#: unihead reads.  Version 2 added ``class_names``, ``z_loss`` and ``logit_softcap``; a head that
#: uses none of them is written as version 1 (without those keys), so that older unihead versions
#: still read it, and one that uses them is refused by those with "written with spec version 2;
#: upgrade unihead".
SPEC_VERSION = 2
_SINCE = {"class_names": 2, "z_loss": 2, "logit_softcap": 2}  # keys newer than version 1
_FORMAT_TAG = "unihead.ClassificationHead"

_ALL_FORMATS = tuple(sorted({f for fs in LABEL_FORMATS.values() for f in fs}))

#: The largest class id, class count or tensor width a head may have: ``2**31 - 1``, the largest
#: int32.  JAX indexes with int32 unless x64 is enabled and Keras casts sparse labels to int32, so
#: a head must stay addressable by an int32 index to mean the same thing on every backend.  Bounds
#: ``num_classes`` (ids ``0 .. MAX_INDEX - 1``), ``ignore_index`` (any int32) and, in head files,
#: ``in_features``.
MAX_INDEX = 2**31 - 1
_MIN_INDEX = -(2**31)


def _suggest(value: str, choices: Sequence[str]) -> str:
    if len(value) > 100:  # no name is that long; difflib's cost grows with the length
        return ""
    close = difflib.get_close_matches(value, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _is_bool(value: Any) -> bool:
    """``bool`` or a NumPy/array boolean scalar (``np.True_``): never a number in a spec."""
    return isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b"


def _as_int(
    name: str, value: Any, *, allow_none: bool = False, lo: int = _MIN_INDEX, hi: int = MAX_INDEX
) -> int | None:
    """``value`` as an int in ``[lo, hi]`` (by default any int32: every integer field of a spec
    indexes or compares with int32 labels on some backend)."""
    if value is None and allow_none:
        return None
    if _is_bool(value) or isinstance(value, float):
        raise HeadSpecError(f"{name} must be an integer, got {_show(value)} ({type(value).__name__}).")
    try:
        out = operator.index(value)
    except TypeError:
        raise HeadSpecError(
            f"{name} must be an integer, got {_show(value)} ({type(value).__name__})."
        ) from None
    if not lo <= out <= hi:
        bound = f"at most {hi}" if out > hi else f"at least {lo}"
        raise HeadSpecError(
            f"{name} = {_show(out)} is out of range: it must be {bound}. Class ids, class counts and "
            f"ignore_index must fit int32 (MAX_INDEX = 2**31 - 1), the index dtype of JAX without "
            f"x64 and of Keras' sparse labels, so that the head means the same on every backend."
        )
    return out


def _as_real(name: str, value: Any) -> float:
    if _is_bool(value) or isinstance(value, (str, bytes)) or value is None:
        raise HeadSpecError(f"{name} must be a real number, got {_show(value)} ({type(value).__name__}).")
    try:
        out = float(value)
    except OverflowError:
        raise HeadSpecError(f"{name} must be finite, got {_show(value)} (too large for a float).") from None
    except (TypeError, ValueError):
        raise HeadSpecError(
            f"{name} must be a real number, got {_show(value)} ({type(value).__name__})."
        ) from None
    if not math.isfinite(out):
        raise HeadSpecError(f"{name} must be finite, got {out!r}.")
    return out


def _as_reals(
    name: str, value: Any, max_len: int, length_error: Callable[[int | str], str]
) -> tuple[float, ...]:
    """``value`` as a tuple of finite floats; more than ``max_len`` values are refused before any
    is converted, with the message ``length_error(how_many)``."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise HeadSpecError(
            f"{name} must be a sequence of numbers (list, tuple or 1-D array), got "
            f"{type(value).__name__}."
        )
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) != 1:
        raise HeadSpecError(f"{name} must be one-dimensional, got an array of shape {tuple(shape)}.")
    items = tuple(itertools.islice(value, max_len + 1))
    if len(items) > max_len:
        n = len(value) if hasattr(value, "__len__") else f"more than {max_len}"
        raise HeadSpecError(length_error(n))
    return tuple(_as_real(f"{name}[{i}]", v) for i, v in enumerate(items))


#: The longest class name a spec takes (in characters): names are labels for people, and a head
#: file's JSON header stays small enough to read before it is checked.
MAX_NAME_LENGTH = 1000


def _as_names(value: Any, task: str, expected: int) -> tuple[str, ...] | None:
    """``class_names`` as a tuple of ``expected`` distinct non-empty strings (or ``None``)."""
    if value is None:
        return None
    what = {"binary": "2 (the negative class, then the positive one)",
            "multiclass": f"{expected} (one per class)", "multilabel": f"{expected} (one per label)"}[task]
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        hint = (" For Hugging Face's id2label write [id2label[i] for i in range(len(id2label))]."
                if isinstance(value, Mapping) else "")
        raise HeadSpecError(
            f"class_names must be a sequence of {what} strings (a list or tuple), got "
            f"{type(value).__name__}.{hint}"
        )
    names = tuple(itertools.islice(value, expected + 1))
    if len(names) != expected:
        n = len(value) if hasattr(value, "__len__") else f"more than {expected}"
        raise HeadSpecError(f"class_names must have length {what}, got {n if len(names) > expected else len(names)}.")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise HeadSpecError(
                f"class_names[{i}] must be a string, got {_show(name)} ({type(name).__name__})."
            )
        if not name.strip():
            raise HeadSpecError(f"class_names[{i}] is empty: every class needs a name people can read.")
        if len(name) > MAX_NAME_LENGTH:
            raise HeadSpecError(
                f"class_names[{i}] has {len(name)} characters; a class name has at most {MAX_NAME_LENGTH}."
            )
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise HeadSpecError(
                f"class_names[{seen[name]}] and class_names[{i}] are both {_show(name)}: each class needs "
                "its own name, or a predicted name would not say which class it is."
            )
        seen[name] = i
    return tuple(str(n) for n in names)


@dataclasses.dataclass(frozen=True)
class ClassificationHead:
    """One classification output head: the output layer's width and activation, the label format,
    and the loss options.  Layers built from it emit logits; every loss takes logits.

    Prefer the readable constructors :meth:`binary`, :meth:`multiclass` and :meth:`multilabel`.

    Fields (see ``docs/semantics.md`` for the formulas):

    - ``task``: ``"binary"`` | ``"multiclass"`` | ``"multilabel"``.
    - ``num_classes``: number of classes (multiclass, >= 2) or labels (multilabel, >= 2);
      binary heads always have 2 classes (``None`` or ``2``).  At most :data:`MAX_INDEX`
      (``2**31 - 1``): class ids must fit int32, the index dtype of JAX (without x64) and of
      Keras' sparse labels, for a head to mean the same on every backend.
    - ``label_format``: binary ``"binary"`` (0/1 per example) or ``"probabilities"`` (P(class 1)
      per example); multiclass ``"sparse"`` (integer ids), ``"one_hot"`` or ``"probabilities"``;
      multilabel ``"multi_hot"`` or ``"probabilities"``.  ``None`` picks the first.
    - ``binary_units``: binary only: 1 (one logit, sigmoid) or 2 (two logits, softmax).  Both give
      the same probabilities and losses for equivalent logits (z  <=>  [0, z]).
    - ``label_smoothing``: epsilon in [0, 1); categorical ``t(1-eps) + eps/K``, binary and
      multilabel ``y(1-eps) + eps/2``.
    - ``class_weights``: one non-negative weight per class (binary: 2, for class 0 and class 1;
      multiclass: K; multilabel: one per label).
    - ``pos_weight``: binary: one number; multilabel: one number or one per label.  Multiplies
      the positive term of the binary cross-entropy (as PyTorch's ``BCEWithLogitsLoss``).
    - ``ignore_index``: a label value whose examples are left out (sparse and binary labels);
      an int32 (``-2**31 .. 2**31 - 1``), like the labels it is compared with.
    - ``focal_gamma``: focal-loss exponent (0 = plain cross-entropy).
    - ``reduction``: ``"mean"`` (weighted mean), ``"sum"`` or ``"none"`` (per example).
    - ``threshold``: decision threshold on P(positive) for binary and multilabel heads.
    - ``z_loss``: coefficient ``c >= 0`` of PaLM's auxiliary loss ``c * logsumexp(z)**2``, added
      to each example's loss (softmax heads only: multiclass, binary with ``binary_units=2``).
    - ``logit_softcap``: ``s > 0`` or None: the logits become ``s * tanh(z / s)`` (Gemma 2) before
      everything else (probabilities, predictions, the loss and its gradient); every task.
    - ``class_names``: optional names of the classes, distinct non-empty strings, one per class:
      multiclass K, multilabel K (one per label), binary 2 (the negative class, then the
      positive one).  They change no number; ``predict_names`` returns them, and they travel
      with the head (head files, ports, Hugging Face ``id2label``).
    """

    task: str
    num_classes: int | None = None
    label_format: str | None = None
    binary_units: int = 1
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    pos_weight: float | tuple[float, ...] | None = None
    ignore_index: int | None = None
    focal_gamma: float = 0.0
    reduction: str = "mean"
    threshold: float = 0.5
    z_loss: float = 0.0
    logit_softcap: float | None = None
    class_names: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        set_ = object.__setattr__
        task = self.task
        if not isinstance(task, str):
            raise HeadSpecError(f"task must be a string, one of {TASKS}; got {_show(task)}.")
        if task not in TASKS:
            raise HeadSpecError(
                f"Unknown task {_show(task)}: write one of {', '.join(map(repr, TASKS))}."
                + _suggest(task, TASKS)
            )

        # ---- widths
        num_classes = _as_int("num_classes", self.num_classes, allow_none=True)
        binary_units = _as_int("binary_units", self.binary_units)
        if task == "binary":
            if num_classes not in (None, 2):
                hint = (
                    " For one output write ClassificationHead.binary() (binary_units=1, a sigmoid)."
                    if num_classes == 1
                    else f" For {num_classes} classes write ClassificationHead.multiclass({num_classes})."
                )
                raise HeadSpecError(
                    f"A binary head has exactly 2 classes, got num_classes={num_classes}." + hint
                )
            num_classes = 2
            if binary_units not in (1, 2):
                raise HeadSpecError(
                    f"binary_units must be 1 (one logit + sigmoid) or 2 (two logits + softmax), "
                    f"got {binary_units}."
                    + (
                        f" For {binary_units} classes write ClassificationHead.multiclass({binary_units})."
                        if binary_units > 2
                        else ""
                    )
                )
        else:
            if binary_units != 1:
                raise HeadSpecError(
                    f"binary_units applies to binary heads only; a {task} head has one output per "
                    f"class (num_classes). Remove binary_units={binary_units}."
                )
            if num_classes is None:
                ctor = "multiclass" if task == "multiclass" else "multilabel"
                raise HeadSpecError(
                    f"A {task} head needs num_classes: write ClassificationHead.{ctor}(num_classes=K)."
                )
            if task == "multiclass" and num_classes < 2:
                raise HeadSpecError(
                    f"A multiclass head needs num_classes >= 2, got {num_classes}: a softmax over "
                    f"one output is always 1.0. For a yes/no problem write "
                    f"ClassificationHead.binary() (one logit + sigmoid)."
                )
            if task == "multilabel" and num_classes < 2:
                raise HeadSpecError(
                    f"A multilabel head needs num_classes >= 2, got {num_classes}. A single "
                    f"independent yes/no label is a binary head: write ClassificationHead.binary()."
                )
        set_(self, "num_classes", num_classes)
        set_(self, "binary_units", binary_units)

        # ---- label format
        fmt = self.label_format
        allowed = LABEL_FORMATS[task]
        if fmt is None:
            fmt = _DEFAULT_FORMAT[task]
        elif not isinstance(fmt, str):
            raise HeadSpecError(f"label_format must be a string, got {_show(fmt)}.")
        elif fmt not in allowed:
            if fmt in _ALL_FORMATS:
                extra = {
                    ("binary", "sparse"): " Integer 0/1 labels are label_format='binary' (the default), "
                    "whatever binary_units is.",
                    ("binary", "one_hot"): " A binary head never needs one-hot labels: pass 0/1 per "
                    "example (label_format='binary'), also for binary_units=2.",
                    ("multiclass", "binary"): " Integer class ids are label_format='sparse'.",
                    ("multiclass", "multi_hot"): " Several 1s per row is a multilabel problem: write "
                    "ClassificationHead.multilabel(K).",
                    ("multilabel", "one_hot"): " Exactly one 1 per row is a multiclass problem: write "
                    "ClassificationHead.multiclass(K, label_format='one_hot').",
                    ("multilabel", "sparse"): " Integer class ids (one class per example) are a "
                    "multiclass problem: write ClassificationHead.multiclass(K).",
                }.get((task, fmt), "")
            else:
                extra = _suggest(fmt, allowed)
            raise HeadSpecError(
                f"label_format={_show(fmt)} is not a {task} label format; write one of "
                f"{', '.join(map(repr, allowed))}.{extra}"
            )
        set_(self, "label_format", fmt)

        # ---- label smoothing
        eps = _as_real("label_smoothing", self.label_smoothing)
        if not 0.0 <= eps < 1.0:
            raise HeadSpecError(
                f"label_smoothing must be in [0, 1), got {eps}. It is the probability mass moved "
                f"from the labels to the uniform distribution (0.1 is common)."
            )
        set_(self, "label_smoothing", eps)

        # ---- class weights
        cw = self.class_weights
        if cw is not None:
            expected = 2 if task == "binary" else num_classes
            what = {
                "binary": "2 (for class 0 and class 1)",
                "multiclass": f"{num_classes} (one per class)",
                "multilabel": f"{num_classes} (one per label)",
            }[task]
            def cw_length(n: int | str) -> str:
                return f"class_weights must have length {what}, got {n}."

            cw = _as_reals("class_weights", cw, expected, cw_length)
            if len(cw) != expected:
                raise HeadSpecError(cw_length(len(cw)))
            for i, w in enumerate(cw):
                if w < 0:
                    raise HeadSpecError(f"class_weights[{i}] = {w} is negative; weights must be >= 0.")
            if not any(w > 0 for w in cw):
                raise HeadSpecError("class_weights are all zero: at least one class must count.")
        set_(self, "class_weights", cw)

        # ---- pos weight
        pw = self.pos_weight
        if pw is not None:
            if task == "multiclass":
                raise HeadSpecError(
                    "pos_weight is for sigmoid heads (binary and multilabel): it weights the "
                    "positive term of a binary cross-entropy. For a multiclass head use "
                    "class_weights=[...] (one weight per class)."
                )
            if isinstance(pw, (str, bytes)) or not hasattr(pw, "__iter__"):
                pw = _as_real("pos_weight", pw)
                if pw < 0:
                    raise HeadSpecError(f"pos_weight = {pw} is negative; it must be >= 0.")
            else:
                def pw_length(n: int | str) -> str:
                    if task == "binary":
                        return f"A binary head takes one pos_weight (a number), got {n} values."
                    return (f"pos_weight must be one number or {num_classes} numbers (one per label), "
                            f"got {n}.")

                pw = _as_reals("pos_weight", pw, 1 if task == "binary" else num_classes, pw_length)
                if task == "binary":
                    if len(pw) != 1:
                        raise HeadSpecError(pw_length(len(pw)))
                    pw = pw[0]
                    if pw < 0:
                        raise HeadSpecError(f"pos_weight = {pw} is negative; it must be >= 0.")
                else:
                    if len(pw) == 1:
                        pw = pw[0]
                        if pw < 0:
                            raise HeadSpecError(f"pos_weight = {pw} is negative; it must be >= 0.")
                    elif len(pw) != num_classes:
                        raise HeadSpecError(pw_length(len(pw)))
                    else:
                        for i, w in enumerate(pw):
                            if w < 0:
                                raise HeadSpecError(
                                    f"pos_weight[{i}] = {w} is negative; weights must be >= 0."
                                )
        set_(self, "pos_weight", pw)

        # ---- ignore index
        ii = self.ignore_index
        if ii is not None:
            ii = _as_int("ignore_index", ii)
            if fmt not in ("sparse", "binary"):
                raise HeadSpecError(
                    f"ignore_index only works with integer labels (label_format 'sparse' or "
                    f"'binary'); this head has label_format={fmt!r}. To leave examples out with "
                    f"{fmt} labels, give them sample_weight 0."
                )
            if fmt == "binary" and ii in (0, 1):
                raise HeadSpecError(
                    f"ignore_index={ii} would ignore every example of class {ii} of a binary head. "
                    f"Pick a value that is not a label, e.g. ignore_index=-100."
                )
        set_(self, "ignore_index", ii)

        # ---- focal gamma, reduction, threshold
        gamma = _as_real("focal_gamma", self.focal_gamma)
        if gamma < 0:
            raise HeadSpecError(f"focal_gamma must be >= 0, got {gamma} (0 is plain cross-entropy; 2 is common).")
        set_(self, "focal_gamma", gamma)

        red = self.reduction
        if not isinstance(red, str) or red not in REDUCTIONS:
            alias = {"sum_over_batch_size": "mean", "mean_with_sample_weight": "mean", "auto": "mean"}
            hint = (
                " unihead's 'mean' is the weighted mean sum(w*l)/sum(w)."
                if isinstance(red, str) and red in alias
                else (_suggest(red, REDUCTIONS) if isinstance(red, str) else "")
            )
            if red is None:
                hint = " For per-example losses write reduction='none'."
            raise HeadSpecError(
                f"Unknown reduction {_show(red)}: write one of {', '.join(map(repr, REDUCTIONS))}.{hint}"
            )

        thr = _as_real("threshold", self.threshold)
        if not 0.0 < thr < 1.0:
            raise HeadSpecError(f"threshold must be strictly between 0 and 1, got {thr}.")
        if task == "multiclass" and thr != 0.5:
            raise HeadSpecError(
                "threshold applies to binary and multilabel heads (a cut on P(positive)); a "
                "multiclass head predicts the most probable class. Remove threshold."
            )
        set_(self, "threshold", thr)
        set_(self, "class_names", _as_names(self.class_names, task, 2 if task == "binary" else num_classes))

        # ---- z-loss, logit soft-capping
        zl = _as_real("z_loss", self.z_loss)
        if zl < 0:
            raise HeadSpecError(
                f"z_loss must be >= 0, got {zl}: it is the coefficient c of c * logsumexp(z)**2 "
                f"added to each example's loss (0 turns it off; PaLM uses 1e-4)."
            )
        if zl != 0.0 and self.activation != "softmax":
            raise HeadSpecError(
                "z_loss applies to softmax heads: it penalises log(sum(exp(z))), the softmax's "
                "normaliser, and a sigmoid has none. Remove z_loss"
                + (", or write ClassificationHead.binary(binary_units=2, z_loss=...) (two logits "
                   "+ softmax)." if task == "binary" else
                   " (a multilabel head is K independent sigmoids).")
            )
        set_(self, "z_loss", zl)
        cap = self.logit_softcap
        if cap is not None:
            cap = _as_real("logit_softcap", cap)
            if cap <= 0:
                raise HeadSpecError(
                    f"logit_softcap must be > 0 (the cap s of s * tanh(z / s); Gemma 2 uses 30.0), "
                    f"got {cap}. For no cap write logit_softcap=None."
                )
        set_(self, "logit_softcap", cap)

    # ------------------------------------------------------------------ readable constructors
    @classmethod
    def binary(
        cls,
        *,
        binary_units: int = 1,
        label_format: str | None = None,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        pos_weight: float | None = None,
        ignore_index: int | None = None,
        focal_gamma: float = 0.0,
        reduction: str = "mean",
        threshold: float = 0.5,
        z_loss: float = 0.0,
        logit_softcap: float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> "ClassificationHead":
        """A two-class head.  ``binary_units=1``: one logit + sigmoid; ``2``: two logits + softmax.
        Labels are 0/1 per example either way."""
        return cls(
            "binary",
            label_format=label_format,
            binary_units=binary_units,
            label_smoothing=label_smoothing,
            class_weights=class_weights,
            pos_weight=pos_weight,
            ignore_index=ignore_index,
            focal_gamma=focal_gamma,
            reduction=reduction,
            threshold=threshold,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            class_names=class_names,
        )

    @classmethod
    def multiclass(
        cls,
        num_classes: int,
        *,
        label_format: str | None = None,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        ignore_index: int | None = None,
        focal_gamma: float = 0.0,
        reduction: str = "mean",
        z_loss: float = 0.0,
        logit_softcap: float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> "ClassificationHead":
        """Exactly one of ``num_classes`` classes per example: K logits + softmax."""
        return cls(
            "multiclass",
            num_classes=num_classes,
            label_format=label_format,
            label_smoothing=label_smoothing,
            class_weights=class_weights,
            ignore_index=ignore_index,
            focal_gamma=focal_gamma,
            reduction=reduction,
            z_loss=z_loss,
            logit_softcap=logit_softcap,
            class_names=class_names,
        )

    @classmethod
    def multilabel(
        cls,
        num_classes: int,
        *,
        label_format: str | None = None,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        pos_weight: float | Sequence[float] | None = None,
        focal_gamma: float = 0.0,
        reduction: str = "mean",
        threshold: float = 0.5,
        logit_softcap: float | None = None,
        class_names: Sequence[str] | None = None,
    ) -> "ClassificationHead":
        """Any subset of ``num_classes`` independent labels per example: K logits + sigmoid each."""
        return cls(
            "multilabel",
            num_classes=num_classes,
            label_format=label_format,
            label_smoothing=label_smoothing,
            class_weights=class_weights,
            pos_weight=pos_weight,
            focal_gamma=focal_gamma,
            reduction=reduction,
            threshold=threshold,
            logit_softcap=logit_softcap,
            class_names=class_names,
        )

    @classmethod
    def from_labels(cls, labels: Any, num_classes: int | None = None, **options: Any) -> "ClassificationHead":
        """The head a label array calls for: integer ids -> ``multiclass`` (``binary`` for 0/1),
        one-hot rows -> ``multiclass(K, label_format="one_hot")``, rows with several 1s ->
        ``multilabel(K)``, floats in [0, 1] -> ``label_format="probabilities"`` (rows summing to 1:
        multiclass; otherwise multilabel, or binary for one value per example).  Ambiguous labels
        raise an error that says what to choose between.

        ``num_classes`` and ``options`` (the constructor's fields) must agree with the labels:
        ``num_classes`` at least the largest id + 1 (ids) or the row width (rows); ``task`` and
        ``label_format`` choose among the readings of the labels (one-hot rows with
        ``task="multilabel"`` give ``multilabel(K)``; 0/1 ids with ``num_classes=2`` give
        ``multiclass(2)``, or ``binary`` with options only a binary head takes); ids equal to
        ``ignore_index`` are left out.  A contradiction is a :class:`HeadSpecError` that says what
        the labels are and what to pass instead; an unknown option is a ``TypeError``."""
        from .labels import head_from_labels

        return head_from_labels(labels, num_classes=num_classes, **options)

    # ------------------------------------------------------------------ derived
    @property
    def num_outputs(self) -> int:
        """Width of the output layer (number of logits per example)."""
        return self.binary_units if self.task == "binary" else self.num_classes  # type: ignore[return-value]

    @property
    def activation(self) -> str:
        """The output activation that turns logits into probabilities: ``"sigmoid"`` or ``"softmax"``."""
        if self.task == "multiclass" or (self.task == "binary" and self.binary_units == 2):
            return "softmax"
        return "sigmoid"

    @property
    def sparse_labels(self) -> bool:
        """True when labels are one integer per example (label formats ``sparse`` and ``binary``)."""
        return self.label_format in ("sparse", "binary")

    def replace(self, **changes: Any) -> "ClassificationHead":
        """A copy with some fields changed (validated like a new head)."""
        return dataclasses.replace(self, **changes)

    def with_binary_units(self, units: int) -> "ClassificationHead":
        """The same binary head with 1 or 2 output units (same probabilities and losses)."""
        if self.task != "binary":
            raise HeadSpecError(f"with_binary_units applies to binary heads; this head is {self.task}.")
        return self.replace(binary_units=units)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain, versioned, JSON-compatible form.  ``from_dict(to_dict())`` gives an equal head.
        A head without ``class_names`` is written as version 1 (without the key), which every
        unihead reads; with them, as version 2."""
        pw = self.pos_weight
        newer = {k: getattr(self, k) for k in _SINCE if getattr(self, k) != _FIELD_DEFAULTS[k]}
        if "class_names" in newer:
            newer["class_names"] = list(self.class_names)
        return {
            "format": _FORMAT_TAG,
            "version": max((_SINCE[k] for k in newer), default=1),
            "task": self.task,
            "num_classes": self.num_classes,
            "label_format": self.label_format,
            "binary_units": self.binary_units,
            "label_smoothing": self.label_smoothing,
            "class_weights": list(self.class_weights) if self.class_weights is not None else None,
            "pos_weight": list(pw) if isinstance(pw, tuple) else pw,
            "ignore_index": self.ignore_index,
            "focal_gamma": self.focal_gamma,
            "reduction": self.reduction,
            "threshold": self.threshold,
            **newer,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClassificationHead":
        """Read the form written by :meth:`to_dict`.  Only plain data is accepted: unknown keys,
        wrong types and newer versions are refused with an error naming the key."""
        if not isinstance(data, Mapping):
            raise HeadSpecError(f"A head description must be a dict, got {type(data).__name__}.")
        data = dict(data)
        tag = data.pop("format", _FORMAT_TAG)
        if tag != _FORMAT_TAG:
            raise HeadSpecError(f"'format' must be {_FORMAT_TAG!r}, got {_show(tag)}.")
        version = data.pop("version", SPEC_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise HeadSpecError(f"'version' must be an integer, got {_show(version)}.")
        if version > SPEC_VERSION or version < 1:
            raise HeadSpecError(
                f"This head was written with spec version {_show(version)}; this unihead reads versions "
                f"1..{SPEC_VERSION}. Upgrade unihead to read it."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if not isinstance(key, str) or key not in fields:
                raise HeadSpecError(
                    f"Unknown key {_show(key)} in head description; known keys: "
                    f"{', '.join(sorted(fields | {'format', 'version'}))}."
                )
        if "task" not in data:
            raise HeadSpecError("Head description has no 'task' key.")
        for key, since in _SINCE.items():
            if key in data and version < since:
                raise HeadSpecError(
                    f"Key {key!r} is new in spec version {since}, and this description says version "
                    f"{version}: write 'version': {since} (or leave 'version' out)."
                )

        def check(key: str, ok: bool, expected: str) -> None:
            if not ok:
                raise HeadSpecError(
                    f"Key {key!r} must be {expected}, got {_show(data[key])} ({type(data[key]).__name__})."
                )

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num_list(v: Any) -> bool:
            return isinstance(v, list) and all(is_num(x) for x in v)

        schema = {
            "task": (lambda v: isinstance(v, str), "a string"),
            "num_classes": (lambda v: v is None or is_int(v), "an integer or null"),
            "label_format": (lambda v: v is None or isinstance(v, str), "a string or null"),
            "binary_units": (is_int, "an integer"),
            "label_smoothing": (is_num, "a number"),
            "class_weights": (lambda v: v is None or is_num_list(v), "a list of numbers or null"),
            "pos_weight": (lambda v: v is None or is_num(v) or is_num_list(v), "a number, a list of numbers or null"),
            "ignore_index": (lambda v: v is None or is_int(v), "an integer or null"),
            "focal_gamma": (is_num, "a number"),
            "reduction": (lambda v: isinstance(v, str), "a string"),
            "threshold": (is_num, "a number"),
            "z_loss": (is_num, "a number"),
            "logit_softcap": (lambda v: v is None or is_num(v), "a number or null"),
            "class_names": (lambda v: v is None or isinstance(v, list) and all(isinstance(x, str) for x in v),
                            "a list of strings or null"),
        }
        for key, value in data.items():
            ok, expected = schema[key]
            check(key, ok(value), expected)
        return cls(**data)

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (keyword arguments go to :func:`json.dumps`)."""
        kwargs.setdefault("sort_keys", True)
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ClassificationHead":
        """Read :meth:`to_json` output (``str``, or UTF-8 ``bytes``).  Safe on untrusted text:
        anything but the plain form (NaN/Infinity, duplicate keys, deep nesting, huge integers,
        bytes that are not UTF-8) is refused with :class:`~unihead.errors.HeadSpecError`, like
        every contradiction :meth:`from_dict` finds."""
        return cls.from_dict(_loads(text, error=HeadSpecError, what="Head JSON"))

    # ------------------------------------------------------------------ display
    def __repr__(self) -> str:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        defaults["label_format"] = _DEFAULT_FORMAT[self.task]
        parts: list[str] = []
        if self.task != "binary":
            parts.append(str(self.num_classes))
        for f in dataclasses.fields(self):
            if f.name in ("task", "num_classes"):
                continue
            value = getattr(self, f.name)
            if value != defaults[f.name]:
                parts.append(f"{f.name}={list(value) if isinstance(value, tuple) else value!r}")
        return f"ClassificationHead.{self.task}({', '.join(parts)})"


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ClassificationHead)}
