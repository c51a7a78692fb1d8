"""Checks of logits, labels and sample weights, with errors that say what is wrong and what to
write instead.  One implementation for every backend (it runs on the backend's own arrays
through :class:`~unihead._ops.Ops`).

Shape and dtype checks are free.  Value checks (label ranges, one-hot rows, probability sums,
NaN, negative weights) read values, which on an accelerator is a device synchronisation: they
run by default and are skipped with ``validate=False`` (per compiled head, or globally with
:func:`set_validation`), and they are skipped automatically when the arrays have no values yet
(JAX tracing).  Nothing is ever clipped, wrapped or zeroed silently.

Logits are model output, not user input: NaN/inf logits are not errors (see docs/semantics.md).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator

from ._ops import Ops
from .spec import ClassificationHead

__all__ = [
    "set_validation",
    "validation_enabled",
    "validation",
    "check_inputs",
    "value_errors",
    "check_logits",
    "logits_dtype_error",
]

_state = threading.local()


def set_validation(enabled: bool) -> None:
    """Turn value checks on or off for every compiled head in this thread (default: on)."""
    _state.enabled = bool(enabled)


def validation_enabled() -> bool:
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def validation(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_validation`."""
    old = validation_enabled()
    set_validation(enabled)
    try:
        yield
    finally:
        set_validation(old)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _fmt_index(idx: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, idx)) + "]"


def _first(ops: Ops, bad: Any) -> tuple[int, ...]:
    """Index of the first True element of ``bad`` (error path only)."""
    import numpy as np

    arr = np.asarray(ops.to_numpy(bad))
    flat = int(np.argmax(arr.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, arr.shape)) if arr.ndim else ()


def _value(ops: Ops, x: Any, idx: tuple[int, ...]) -> Any:
    import numpy as np

    v = np.asarray(ops.to_numpy(x))[idx]
    if isinstance(v, np.ndarray):
        return np.array2string(v, threshold=12, separator=", ")
    return str(v)  # numpy's shortest repr of the value in its own dtype (1.2, not 1.2000000476837158)


def _same(a: tuple, b: tuple) -> bool:
    """Shapes equal, an unknown dimension (``None``, while tracing) matching anything."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _any(ops: Ops, x: Any) -> bool:
    return bool(ops.xp.any(x))


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")


def logits_dtype_error(dtype: Any) -> TypeError:
    """The error for non-floating logits (one message for every backend)."""
    name = str(dtype).replace("torch.", "").replace("<dtype: '", "").replace("'>", "")
    return TypeError(
        f"logits must be a floating-point array (the output layer's values before any "
        f"activation); got dtype {name}."
    )


def check_logits(ops: Ops, head: ClassificationHead, z: Any) -> None:
    """Logits must be floating with shape ``(..., num_outputs)``."""
    if not ops.is_floating(z):
        raise logits_dtype_error(z.dtype)
    k = head.num_outputs
    shape = tuple(z.shape)
    if len(shape) == 0 or shape[-1] != k:
        hint = ""
        if head.task == "binary" and head.binary_units == 1 and (len(shape) == 0 or shape[-1] != 1):
            hint = (
                " A 1-unit binary head's logits have a trailing axis of size 1: write "
                "logits[..., None] if you squeezed it"
                + (", or use binary_units=2 for two logits." if shape and shape[-1] == 2 else ".")
            )
        elif head.task == "binary" and head.binary_units == 2 and shape and shape[-1] == 1:
            hint = " This is a 2-unit (softmax) binary head; a single logit needs binary_units=1."
        elif head.task == "multiclass" and shape and shape[-1] == 1:
            hint = (
                " A one-unit output cannot be a softmax over classes (it is always 1.0): for two "
                "classes use ClassificationHead.binary()."
            )
        raise ValueError(
            f"logits must have shape (..., {k}) for this head (num_outputs={k}, "
            f"{head.activation}); got shape {_fmt_shape(shape)}.{hint}"
        )


def check_inputs(
    ops: Ops,
    head: ClassificationHead,
    z: Any,
    labels: Any,
    sample_weight: Any = None,
    *,
    validate: bool = True,
) -> tuple[Any, Any]:
    """Validate labels and sample weights against logits ``z`` (already checked) and return them
    normalised: labels in the shape and dtype the engine takes, the sample weight in ``z``'s
    dtype.  Value checks run when ``validate`` and the global switch are on and values exist:
    one reduction (:func:`value_errors`, on the values as given, before any conversion) and one
    read of its result; only when it finds something do the checks that locate and describe the
    first bad value run."""
    lead = tuple(z.shape[:-1])
    on = validate and validation_enabled()
    with ops.eager():
        raw_labels, raw_weight = labels, sample_weight
        labels = _check_labels(ops, head, z, lead, labels, False)
        if sample_weight is not None:
            sample_weight = _check_sample_weight(ops, head, z, lead, sample_weight, False)
        concrete = on and ops.is_concrete(labels) and (sample_weight is None or ops.is_concrete(sample_weight))
        if concrete and _any(ops, value_errors(ops, head, raw_labels, raw_weight)):
            # the message names the value as it was given (3, not 3.0)
            _check_labels(ops, head, z, lead, raw_labels, True)
            if raw_weight is not None:
                _check_sample_weight(ops, head, z, lead, raw_weight, True)
    return labels, sample_weight


def value_errors(ops: Ops, head: ClassificationHead, labels: Any, sample_weight: Any = None) -> Any:
    """Whether any value of the labels or the sample weight, as given (before conversion to the
    logits' dtype, which could round an invalid value to a valid one), breaks docs/semantics.md
    §9: one 0-d boolean array computed with array operations only.  No value is read on the
    host, so it can run inside a compiled kernel or under tracing."""
    xp = ops.xp
    y = labels
    fmt = head.label_format
    k = head.num_classes
    checks = []
    if fmt == "sparse":
        bad = (y < 0) | (y >= k)
        checks.append(bad if head.ignore_index is None else bad & (y != head.ignore_index))
    elif fmt == "binary":
        if not ops.is_bool(y):
            # y (y - 1) is 0 exactly for 0 and 1, and NaN (true) for NaN
            bad = y * (y - 1)
            checks.append(bad if head.ignore_index is None else ops.where0(y != head.ignore_index, bad))
    elif fmt in ("one_hot", "multi_hot"):
        if not ops.is_bool(y):  # booleans are 0/1
            checks.append(y * (y - 1))
        if fmt == "one_hot":
            checks.append(xp.sum(xp.astype(y != 0, ops.index_dtype()), axis=-1) != 1)
    else:  # probabilities
        checks.append(~((y >= 0) & (y <= 1)))  # NaN is neither
        if head.task == "multiclass":
            tol = k * max(float(xp.finfo(y.dtype).eps), 2.0**-23)
            checks.append(xp.abs(xp.sum(y, axis=-1) - 1) > tol)
    if sample_weight is not None:
        checks.append(~(xp.isfinite(sample_weight) & (sample_weight >= 0)))
    if not checks:
        return xp.asarray(False)
    flag = xp.any(checks[0])
    for c in checks[1:]:
        flag = flag | xp.any(c)
    return flag


# ------------------------------------------------------------------------------------ labels
def _check_labels(
    ops: Ops, head: ClassificationHead, z: Any, lead: tuple[int, ...], y: Any, values: bool
) -> Any:
    xp = ops.xp
    fmt = head.label_format
    k = head.num_classes
    shape = tuple(y.shape)
    if not (ops.is_floating(y) or ops.is_integer(y) or ops.is_bool(y)):
        raise TypeError(f"labels must be a numeric array; got dtype {_dtype_name(y)}.")

    if fmt in ("sparse", "binary"):
        if fmt == "binary" and _same(shape, lead + (1,)):
            y = y[..., 0]
            shape = lead
        if not _same(shape, lead):
            want = _fmt_shape(lead)
            hint = ""
            if fmt == "sparse" and _same(shape, lead + (k,)):
                hint = (
                    " These look like one-hot rows: write label_format='one_hot' (or pass "
                    "labels.argmax(-1))."
                )
            elif fmt == "binary" and _same(shape, lead + (2,)):
                hint = (
                    " A binary head takes one 0/1 label per example, also with binary_units=2: "
                    "pass labels.argmax(-1) instead of one-hot rows."
                )
            raise ValueError(
                f"labels must have shape {want} (one "
                f"{'class id' if fmt == 'sparse' else '0/1 label'} per example"
                f"{', or ' + _fmt_shape(lead + (1,)) if fmt == 'binary' else ''}) to match logits "
                f"of shape {_fmt_shape(tuple(z.shape))}; got {_fmt_shape(shape)}.{hint}"
            )
        if fmt == "sparse":
            if not ops.is_integer(y):
                raise TypeError(
                    f"labels must be integer class ids for label_format='sparse'; got dtype "
                    f"{_dtype_name(y)}. Cast them (labels.astype(int)), or set label_format="
                    f"'one_hot'/'probabilities' if each row is a distribution over classes."
                )
            if values:
                bad = (y < 0) | (y >= k)
                if head.ignore_index is not None:
                    bad = bad & (y != head.ignore_index)
                if _any(ops, bad):
                    i = _first(ops, bad)
                    ign = (
                        f" (or ignore_index={head.ignore_index})"
                        if head.ignore_index is not None
                        else " (set ignore_index=... to leave examples out)"
                    )
                    raise ValueError(
                        f"labels{_fmt_index(i)} = {_value(ops, y, i)} is not a class id: ids must be "
                        f"in [0, {k}) for num_classes={k}{ign}."
                    )
            return y
        # binary labels: 0/1 (any numeric dtype) or ignore_index; checked in their own dtype
        if values and not ops.is_bool(y):
            if ops.is_floating(y) and _any(ops, xp.isnan(y)):
                i = _first(ops, xp.isnan(y))
                raise ValueError(f"labels{_fmt_index(i)} is NaN; binary labels must be 0 or 1.")
            bad = (y != 0) & (y != 1)
            if head.ignore_index is not None:
                bad = bad & (y != head.ignore_index)
            if _any(ops, bad):
                i = _first(ops, bad)
                v = _value(ops, y, i)
                within = _any(ops, bad & (y > 0) & (y < 1))
                hint = (
                    " Soft targets in [0, 1] need label_format='probabilities'."
                    if within
                    else " Labels outside {0, 1} make binary cross-entropy negative; for more than "
                    "two classes use ClassificationHead.multiclass(num_classes) with integer labels."
                )
                raise ValueError(
                    f"labels{_fmt_index(i)} = {v} is not a binary label: a binary head takes 0 or 1 "
                    f"per example{' (or ignore_index=' + str(head.ignore_index) + ')' if head.ignore_index is not None else ''}.{hint}"
                )
        return ops.astype(y, z)

    # dense formats
    if head.task == "binary":  # binary probabilities: one P(class 1) per example
        if _same(shape, lead + (1,)):
            y = y[..., 0]
            shape = lead
        if not _same(shape, lead):
            raise ValueError(
                f"labels must have shape {_fmt_shape(lead)} or {_fmt_shape(lead + (1,))} (P(class 1) "
                f"per example) for a binary head with label_format='probabilities'; got "
                f"{_fmt_shape(shape)}."
            )
    elif not _same(shape, lead + (k,)):
        hint = ""
        if _same(shape, lead) and ops.is_integer(y):
            hint = (
                " These look like integer class ids: "
                + (
                    "use label_format='sparse' (the multiclass default)."
                    if head.task == "multiclass"
                    else "a multilabel head needs one 0/1 column per label."
                )
            )
        raise ValueError(
            f"labels must have shape {_fmt_shape(lead + (k,))} (one row of {k} values per example, "
            f"label_format={fmt!r}) to match logits of shape {_fmt_shape(tuple(z.shape))}; got "
            f"{_fmt_shape(shape)}.{hint}"
        )
    if fmt == "probabilities" and not ops.is_floating(y):
        raise TypeError(
            f"labels must be floating-point for label_format='probabilities'; got dtype "
            f"{_dtype_name(y)}."
        )
    if values:
        _check_dense_values(ops, head, y)
    return ops.astype(y, z)


def _check_dense_values(ops: Ops, head: ClassificationHead, y: Any) -> None:
    """Value checks of one-hot, multi-hot and probability labels, in their own dtype."""
    xp = ops.xp
    fmt = head.label_format
    k = head.num_classes
    if ops.is_floating(y) and _any(ops, xp.isnan(y)):
        i = _first(ops, xp.isnan(y))
        raise ValueError(f"labels{_fmt_index(i)} is NaN.")
    if fmt in ("one_hot", "multi_hot"):
        bad = (y != 0) & (y != 1)
        if _any(ops, bad):
            i = _first(ops, bad)
            hint = " Soft targets need label_format='probabilities'."
            raise ValueError(
                f"labels{_fmt_index(i)} = {_value(ops, y, i)} is not 0 or 1 "
                f"(label_format={fmt!r}).{hint}"
            )
        if fmt == "one_hot":
            count = xp.sum(xp.astype(y != 0, ops.index_dtype()), axis=-1)
            bad_rows = count != 1
            if _any(ops, bad_rows):
                i = _first(ops, bad_rows)
                n = int(_value(ops, count, i))
                if n > 1:
                    hint = (
                        f" A row with {n} ones is multi-label: use "
                        f"ClassificationHead.multilabel({k}) with a sigmoid per label."
                    )
                else:
                    hint = (
                        " Every example needs exactly one class (give it sample_weight 0 to leave it "
                        "out, or use integer labels with ignore_index)."
                    )
                raise ValueError(
                    f"labels{_fmt_index(i)} = {_value(ops, y, i)} is not one-hot: each row must have "
                    f"exactly one 1 and zeros elsewhere (found {n}).{hint}"
                )
        return
    # probabilities
    bad = (y < 0) | (y > 1)
    if _any(ops, bad):
        i = _first(ops, bad)
        raise ValueError(
            f"labels{_fmt_index(i)} = {_value(ops, y, i)} is not a probability: soft labels must be "
            f"in [0, 1]."
        )
    if head.task == "multiclass":
        tol = k * max(float(ops.xp.finfo(y.dtype).eps), 2.0**-23)
        total = xp.sum(y, axis=-1)
        bad_rows = xp.abs(total - 1) > tol
        if _any(ops, bad_rows):
            i = _first(ops, bad_rows)
            raise ValueError(
                f"labels{_fmt_index(i)} sums to {_value(ops, total, i)}, not 1: each row of "
                f"label_format='probabilities' is a distribution over the {k} classes (allowed "
                f"rounding: {tol:.2g}). For independent per-label probabilities use "
                f"ClassificationHead.multilabel({k}, label_format='probabilities')."
            )


# ----------------------------------------------------------------------------- sample weight
def _check_sample_weight(
    ops: Ops, head: ClassificationHead, z: Any, lead: tuple[int, ...], sw: Any, values: bool
) -> Any:
    xp = ops.xp
    if not (ops.is_floating(sw) or ops.is_integer(sw) or ops.is_bool(sw)):
        raise TypeError(f"sample_weight must be a numeric array; got dtype {_dtype_name(sw)}.")
    shape = tuple(sw.shape)
    full = lead + ((head.num_classes,) if head.task == "multilabel" else ())
    if not _same(shape, full[: len(shape)]):
        also = (
            f", or up to {_fmt_shape(full)} for one weight per label" if head.task == "multilabel" else ""
        )
        raise ValueError(
            f"sample_weight must have shape {_fmt_shape(lead)} (one weight per example), or a leading "
            f"part of it that is broadcast over the rest{also}; got {_fmt_shape(shape)} for logits of "
            f"shape {_fmt_shape(tuple(z.shape))}."
        )
    sw = ops.astype(sw, z)
    if values:
        bad = ~xp.isfinite(sw) | (sw < 0)
        if _any(ops, bad):
            i = _first(ops, bad)
            v = _value(ops, sw, i)
            what = "NaN" if math.isnan(float(v)) else v
            raise ValueError(
                f"sample_weight{_fmt_index(i)} = {what}: weights must be finite and >= 0 "
                f"(0 leaves the example out)."
            )
    return sw
