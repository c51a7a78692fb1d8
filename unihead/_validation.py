"""Checks of logits, labels and sample weights, with errors that say what is wrong and what to
write instead.  One implementation for every backend (it runs on the backend's own arrays
through :class:`~unihead._ops.Ops`).

Shape and dtype checks are free.  Value checks (label ranges, one-hot rows, probability sums,
NaN, negative weights) read values, which on an accelerator is a device synchronisation: they
run by default and are skipped with ``validate=False`` (per compiled head, or globally with
:func:`set_validation`).  Where the arrays have no values yet (tracing) they become in-graph
checks on backends that have them (JAX: ``checkify``) and are skipped elsewhere
(docs/semantics.md §9 says where).  Nothing is ever clipped, wrapped or zeroed silently.

Each rule exists once: the label dtypes and shapes in :func:`label_kinds` and
:func:`_label_form`, every value rule (with its message) in :func:`_rules`, which
:func:`value_errors` (one reduction, also inside the compiled PyTorch kernels), the eager error
path and the ``checkify`` checks all read.

Logits are model output, not user input: NaN/inf logits are not errors (see docs/semantics.md).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator, NamedTuple

from ._ops import Ops
from .spec import ClassificationHead

__all__ = [
    "has_class_axis",
    "set_validation",
    "validation_enabled",
    "validation",
    "check_inputs",
    "value_errors",
    "label_kinds",
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


def _first(ops: Ops, bad: Any) -> tuple[int, ...]:
    """Index of the first True element of ``bad`` (error path only)."""
    import numpy as np

    arr = np.asarray(ops.to_numpy(bad))
    flat = int(np.argmax(arr.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, arr.shape)) if arr.ndim else ()


def _same(a: tuple, b: tuple) -> bool:
    """Shapes equal, an unknown dimension (``None``, while tracing) matching anything."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _any(ops: Ops, x: Any) -> bool:
    return bool(ops.xp.any(x))


def _dtype_str(dtype: Any) -> str:
    """A dtype's name, the same on every backend (``float16``, not ``torch.float16`` or
    ``<dtype: 'float16'>``)."""
    return str(dtype).replace("torch.", "").replace("<dtype: '", "").replace("'>", "")


def _dtype_name(x: Any) -> str:
    return _dtype_str(getattr(x, "dtype", type(x).__name__))


def logits_dtype_error(dtype: Any) -> TypeError:
    """The error for logits of a dtype no backend computes in (one message for every backend)."""
    return TypeError(
        f"logits must be a floating-point array of float16, bfloat16, float32 or float64 (the "
        f"output layer's values before any activation); got dtype {_dtype_str(dtype)}."
    )


def check_logits(ops: Ops, head: ClassificationHead, z: Any) -> None:
    """Logits (half precision already widened, :meth:`Ops.widen_half`) must be float32 or
    float64 with shape ``(..., num_outputs)``."""
    xp = ops.xp
    if not (z.dtype == xp.float32 or z.dtype == xp.float64):
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
    dtype.

    Shape and dtype checks always run.  Value checks run when ``validate`` and the global switch
    are on, on the values as given (before any conversion, which could round an invalid value to
    a valid one): where the arrays have values, one reduction (:func:`value_errors`) and one read
    of its result, and only when it finds something the checks that locate and describe the first
    bad value; where they are traced, the backend's in-graph checks if it has them
    (:attr:`Ops.traced_checks`: ``checkify`` on JAX), else none."""
    lead = tuple(z.shape[:-1])
    on = validate and validation_enabled()
    with ops.eager():
        y, kind = _label_form(ops, head, z, lead, labels)
        sw = None if sample_weight is None else _weight_form(ops, head, z, lead, sample_weight)
        if on:
            _check_values(ops, head, labels, sample_weight)
        if head.label_format != "sparse":
            y = ops.astype(y, z)
        elif kind == "real floating":  # ids as floats, checked: integer ids (as given otherwise)
            y = ops.xp.astype(y, ops.index_dtype())
        return y, (None if sw is None else ops.astype(sw, z))


def has_class_axis(head: ClassificationHead) -> bool:
    """Whether ``head``'s labels have the class axis of the logits (one-hot, multi-hot and
    multiclass/multilabel probabilities); else one label per example (docs/semantics.md §2)."""
    fmt = head.label_format
    return fmt in ("one_hot", "multi_hot") or (fmt == "probabilities" and head.task != "binary")


# ------------------------------------------------------------------------------- label dtypes
def label_kinds(head: ClassificationHead) -> tuple[str, ...]:
    """The dtype kinds (Array API ``isdtype`` names) labels of ``head``'s label format are taken
    in as they are (docs/semantics.md §2, §9).  Sparse ids may also come as floats with whole
    values (Keras pipelines make them): those are checked and converted to integer ids by
    :func:`check_inputs`, and are not in this list."""
    fmt = head.label_format
    if fmt == "sparse":
        return ("integral",)
    if fmt == "probabilities":
        return ("real floating",)
    return ("integral", "real floating", "bool")


def _kind(ops: Ops, x: Any) -> str | None:
    """``x``'s dtype kind ("integral", "real floating", "bool"), or None (not a real number, or
    a dtype the array library cannot classify)."""
    try:
        if ops.is_floating(x):
            return "real floating"
        if ops.is_integer(x):
            return "integral"
        if ops.is_bool(x):
            return "bool"
    except (TypeError, ValueError):  # e.g. NumPy's isdtype on an ml_dtypes dtype
        pass
    return None


#: The floating dtypes labels may have (as logits), each with the magnitude up to which it holds
#: every integer exactly (class ids given as floats).
_EXACT_INTEGERS = {"bfloat16": 2**8, "float16": 2**11, "float32": 2**24, "float64": 2**53}


def _exact_integers(y: Any) -> int | None:
    """Up to which magnitude the floating dtype of ``y`` holds every integer exactly; None for a
    dtype other than those of ``_EXACT_INTEGERS`` (float8, NumPy's long double)."""
    name = getattr(getattr(y, "dtype", None), "name", None)  # NumPy's and TF's: float32 for >f4
    return _EXACT_INTEGERS.get(name if isinstance(name, str) else _dtype_name(y))


# ------------------------------------------------------------------------------ label shapes
def _label_form(
    ops: Ops, head: ClassificationHead, z: Any, lead: tuple[int, ...], y: Any
) -> tuple[Any, str]:
    """The shape and dtype rules of labels: ``y`` with the trailing axis of 1 that per-example
    labels may have removed, in its own dtype (values are checked as given, then converted), and
    its dtype kind."""
    fmt = head.label_format
    k = head.num_classes
    shape = tuple(y.shape)
    kind = _kind(ops, y)
    if kind is None:
        if "bfloat16" in _dtype_name(y):  # ml_dtypes' bfloat16 in NumPy, which NumPy cannot classify
            raise TypeError(
                f"labels of dtype bfloat16 are not taken by the {ops.name} backend: cast them to "
                "float32 (class ids: to an integer dtype)."
            )
        raise TypeError(f"labels must be a numeric array; got dtype {_dtype_name(y)}.")
    if kind == "real floating" and _exact_integers(y) is None:  # float8, long double
        raise TypeError(
            f"labels of a floating-point dtype must be float16, bfloat16, float32 or float64; got "
            f"dtype {_dtype_name(y)}: cast them (class ids: to an integer dtype)."
        )

    per_example = fmt in ("sparse", "binary") or head.task == "binary"
    if per_example:  # one label per example: (...) or (..., 1), Keras' convention
        if not _same(shape, lead):
            if not _same(shape, lead + (1,)):
                raise ValueError(_per_example_shape_error(head, z, lead, shape))
            y = y[..., 0]
    elif not _same(shape, lead + (k,)):
        hint = ""
        if _same(shape, lead) and kind == "integral":
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

    if kind in label_kinds(head):
        return y, kind
    if fmt == "sparse" and kind == "real floating":  # ids as floats: whole values, checked
        limit = _exact_integers(y)
        largest = max(k - 1, abs(head.ignore_index) if head.ignore_index is not None else 0)
        if largest > limit:
            raise TypeError(
                f"labels of dtype {_dtype_name(y)} cannot hold every class id of num_classes={k} "
                f"exactly (whole numbers only up to {limit}): pass integer class ids."
            )
        return y, kind
    if fmt == "sparse":
        raise TypeError(
            f"labels must be class ids for label_format='sparse' (integers, or floats with whole "
            f"values); got dtype {_dtype_name(y)}. Pass labels.astype(int), or use "
            f"ClassificationHead.binary() for 0/1 labels."
        )
    raise TypeError(
        f"labels must be floating-point for label_format='probabilities'; got dtype "
        f"{_dtype_name(y)}."
    )


def _per_example_shape_error(
    head: ClassificationHead, z: Any, lead: tuple[int, ...], shape: tuple[int, ...]
) -> str:
    fmt = head.label_format
    k = head.num_classes
    want = f"{_fmt_shape(lead)} or {_fmt_shape(lead + (1,))}"
    if fmt == "probabilities":  # binary probabilities: one P(class 1) per example
        return (
            f"labels must have shape {want} (P(class 1) per example) for a binary head with "
            f"label_format='probabilities'; got {_fmt_shape(shape)}."
        )
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
    return (
        f"labels must have shape {want} (one {'class id' if fmt == 'sparse' else '0/1 label'} per "
        f"example) to match logits of shape {_fmt_shape(tuple(z.shape))}; got "
        f"{_fmt_shape(shape)}.{hint}"
    )


# ----------------------------------------------------------------------- sample weight shape
def _weight_form(ops: Ops, head: ClassificationHead, z: Any, lead: tuple[int, ...], sw: Any) -> Any:
    """The shape and dtype rules of sample weights (``sw`` is returned as given)."""
    if _kind(ops, sw) is None:
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
    return sw


# ------------------------------------------------------------------------------- value rules
class _Rule(NamedTuple):
    """One value rule of docs/semantics.md §9 on one argument, stated once as array operations.

    ``bad`` is where the rule is broken (elementwise, or one entry per row).  ``says()`` gives,
    lazily (only when an error is described): the arrays the message shows (aligned with ``bad``;
    ``row``: with one more axis, a row per entry) and the message variants ``(when, template)``: ``when`` is None or a function of the shown values
    at the first bad entry, exactly one variant holding there.  Templates are ``str.format``
    strings with ``{where}`` (the index), ``{row}`` and ``!s`` fields: the same string is formatted
    with values read on the host (:func:`_raise_first`) and by ``checkify`` under tracing
    (:func:`_emit_checks`), so a message is the same in both."""

    arg: Any  # the argument the rule is about (its array as given)
    name: str  # "labels" or "sample_weight"
    bad: Any
    says: Callable[[], tuple[dict[str, Any], list[tuple[Callable[[dict], Any] | None, str]]]]


def _isnan(v: dict) -> Any:
    return v["value"] != v["value"]


def _not_nan(v: dict) -> Any:
    return v["value"] == v["value"]


def _rules(ops: Ops, head: ClassificationHead, y: Any, sw: Any = None) -> list[_Rule]:
    """The value rules of labels ``y`` and sample weight ``sw`` as given, in the order they are
    reported (docs/semantics.md §9)."""
    xp = ops.xp
    fmt = head.label_format
    k = head.num_classes
    ign = head.ignore_index
    rules: list[_Rule] = []

    def counted(bad: Any) -> Any:  # an ignored label breaks no rule
        return bad if ign is None else bad & (y != ign)

    def or_ignore() -> str:
        return f" (or ignore_index={ign})" if ign is not None else ""

    if fmt == "sparse":
        if ops.is_floating(y):  # ids as floats: whole numbers (NaN is not: NaN != round(NaN))
            rules.append(_Rule(y, "labels", y != xp.round(y), lambda: ({"value": y}, [(None, (
                f"labels{{where}} = {{value!s}} is not a class id: ids are whole numbers in [0, {k}) "
                f"for num_classes={k}{or_ignore()} (integers, or floats with whole values); pass "
                f"integer class ids."))])))
        rules.append(_Rule(y, "labels", counted((y < 0) | (y >= k)), lambda: ({"value": y}, [(None, (
            f"labels{{where}} = {{value!s}} is not a class id: ids must be in [0, {k}) for "
            f"num_classes={k}{or_ignore() or ' (set ignore_index=... to leave examples out)'}."))])))
    elif fmt == "binary":
        if not ops.is_bool(y):

            def says_binary() -> tuple:
                not_binary = (f"labels{{where}} = {{value!s}} is not a binary label: a binary head "
                              f"takes 0 or 1 per example{or_ignore()}.")
                return {"value": y}, [
                    (_isnan, "labels{where} is NaN; binary labels must be 0 or 1."),
                    (lambda v: (v["value"] > 0) & (v["value"] < 1),  # a soft target
                     not_binary + " Soft targets in [0, 1] need label_format='probabilities'."),
                    (lambda v: (v["value"] < 0) | (v["value"] > 1),
                     not_binary + " Labels outside {{0, 1}} make binary cross-entropy negative; for "
                     "more than two classes use ClassificationHead.multiclass(num_classes) with "
                     "integer labels."),
                ]

            rules.append(_Rule(y, "labels", counted((y != 0) & (y != 1)), says_binary))
    elif fmt in ("one_hot", "multi_hot"):
        if not ops.is_bool(y):  # booleans are 0/1
            rules.append(_Rule(y, "labels", (y != 0) & (y != 1), lambda: ({"value": y}, [
                (_isnan, "labels{where} is NaN."),
                (_not_nan, f"labels{{where}} = {{value!s}} is not 0 or 1 (label_format={fmt!r}). "
                           "Soft targets need label_format='probabilities'."),
            ])))
        if fmt == "one_hot":
            count = xp.sum(xp.astype(y != 0, ops.index_dtype()), axis=-1)
            not_one_hot = (
                "labels{where} = {row} is not one-hot: each row must have exactly one 1 and zeros "
                "elsewhere (found {n!s})."
            )
            rules.append(_Rule(y, "labels", count != 1, lambda: ({"row": y, "n": count}, [
                (lambda v: v["n"] > 1, not_one_hot + " A row with {n!s} ones is multi-label: use "
                 f"ClassificationHead.multilabel({k}) with a sigmoid per label."),
                (lambda v: v["n"] < 1, not_one_hot + " Every example needs exactly one class (give it "
                 "sample_weight 0 to leave it out, or use integer labels with ignore_index)."),
            ])))
    else:  # probabilities
        rules.append(_Rule(y, "labels", ~((y >= 0) & (y <= 1)), lambda: ({"value": y}, [  # NaN too
            (_isnan, "labels{where} is NaN."),
            (_not_nan, "labels{where} = {value!s} is not a probability: soft labels must be in [0, 1]."),
        ])))
        if head.task == "multiclass":
            tol = k * max(float(xp.finfo(y.dtype).eps), 2.0**-23)
            total = xp.sum(y, axis=-1)
            rules.append(_Rule(y, "labels", xp.abs(total - 1) > tol, lambda: ({"value": total}, [(None, (
                f"labels{{where}} sums to {{value!s}}, not 1: each row of label_format='probabilities' "
                f"is a distribution over the {k} classes (allowed rounding: {tol:.2g}). For independent "
                f"per-label probabilities use ClassificationHead.multilabel({k}, "
                f"label_format='probabilities')."))])))
    if sw is not None:
        rules.append(_Rule(sw, "sample_weight", ~(xp.isfinite(sw) & (sw >= 0)), lambda: ({"value": sw}, [
            (_isnan, "sample_weight{where} = NaN: weights must be finite and >= 0 (0 leaves the example out)."),
            (_not_nan, "sample_weight{where} = {value!s}: weights must be finite and >= 0 (0 leaves the "
                       "example out)."),
        ])))
    return rules


def value_errors(ops: Ops, head: ClassificationHead, labels: Any, sample_weight: Any = None) -> Any:
    """Whether any value of the labels or the sample weight, as given (before conversion to the
    logits' dtype, which could round an invalid value to a valid one), breaks docs/semantics.md
    §9: one 0-d boolean array computed with array operations only (the rules of :func:`_rules`).
    No value is read on the host, so it can run inside a compiled kernel or under tracing."""
    xp = ops.xp
    flag = None
    for rule in _rules(ops, head, labels, sample_weight):
        b = xp.any(rule.bad)
        flag = b if flag is None else flag | b
    return xp.asarray(False) if flag is None else flag


def _check_values(ops: Ops, head: ClassificationHead, labels: Any, sample_weight: Any) -> None:
    """Raise the error of the first bad value (labels first, then the sample weight)."""
    if ops.is_concrete(labels) and (sample_weight is None or ops.is_concrete(sample_weight)):
        if _any(ops, value_errors(ops, head, labels, sample_weight)):
            for rule in _rules(ops, head, labels, sample_weight):
                _raise_first(ops, rule)
            raise AssertionError("unihead: value_errors found a bad value no rule describes")
        return
    # tracing: what has values is checked now; traced arrays in the graph, where the backend can
    for rule in _rules(ops, head, labels, sample_weight):
        if ops.is_concrete(rule.arg):
            _raise_first(ops, rule)
        elif ops.traced_checks:
            _emit_checks(ops, rule)


def _row_columns(width: int) -> list[int | None]:
    """The columns of a row a message shows: all of them, or for long rows the first and last
    three around ``...`` (as NumPy prints them)."""
    return list(range(width)) if width <= 12 else [0, 1, 2, None, width - 3, width - 2, width - 1]


def _template(template: str, ndim: int, shows: dict[str, Any]) -> str:
    """``template`` with ``{where}`` spelled out for an index of ``ndim`` coordinates and
    ``{row}`` for the columns :func:`_row_columns` shows of ``shows["row"]``."""
    where = "" if ndim == 0 else "[" + ", ".join(f"{{i{d}!s}}" for d in range(ndim)) + "]"
    text = template.replace("{where}", where)
    if "row" in shows:
        cols = _row_columns(shows["row"].shape[-1])
        text = text.replace("{row}", "[" + ", ".join("..." if c is None else f"{{row{c}!s}}" for c in cols) + "]")
    return text


def _located(shows: dict[str, Any], at: Any) -> dict[str, Any]:
    """The shown values at the first bad entry (``at(array)`` reads it), a row's columns spread
    out as ``row0``, ``row1``..."""
    out: dict[str, Any] = {}
    for key, arr in shows.items():
        if key == "row":
            row = at(arr)
            out.update({f"row{c}": row[c] for c in _row_columns(arr.shape[-1]) if c is not None})
        else:
            out[key] = at(arr)
    return out


def _raise_first(ops: Ops, rule: _Rule) -> None:
    """If ``rule`` is broken, raise ``ValueError`` naming its first bad entry (values read on the
    host)."""
    import numpy as np

    if not _any(ops, rule.bad):
        return
    i = _first(ops, rule.bad)
    shows, variants = rule.says()
    host = {key: np.asarray(ops.to_numpy(arr)) for key, arr in shows.items()}
    values = _located(host, lambda arr: arr[i])
    values.update({f"i{d}": c for d, c in enumerate(i)})
    for when, template in variants:
        if when is None or bool(when(values)):
            raise ValueError(_template(template, len(i), shows).format(**values))
    raise AssertionError(f"unihead: no message for {rule.name}{list(i)}")  # pragma: no cover


def _emit_checks(ops: Ops, rule: _Rule) -> None:
    """``rule`` as in-graph checks (:meth:`Ops.check`): the message of :func:`_raise_first`, its
    index and values computed in the graph."""
    xp = ops.xp
    bad = rule.bad
    shape = tuple(bad.shape)
    if 0 in shape:  # no values, nothing to check (and no first entry)
        return
    first = xp.argmax(xp.reshape(xp.astype(bad, xp.int8), (-1,)))  # the first True
    i = []
    flat = first
    for d in reversed(shape):
        i.append(flat % d)
        flat = flat // d
    i = tuple(reversed(i))
    shows, variants = rule.says()
    # half-precision values as float32, as the host path reads them (Ops.to_numpy)
    wide = {key: ops.widen_half(a) for key, a in shows.items()}
    if i:
        # the values at the first bad entry as masked sums over its axes, not arr[i]: an index
        # computed in the graph into an array sharded along that axis is refused by JAX (a jit
        # over batch-sharded arrays on a mesh of explicit axes, jax.make_mesh's default)
        at_first = xp.reshape(xp.arange(math.prod(shape)), shape) == first

        def at(arr: Any) -> Any:
            extra = len(arr.shape) - len(shape)  # a row's class axis
            mask = xp.reshape(at_first, shape + (1,) * extra)
            picked = xp.where(mask, arr, xp.zeros((), dtype=arr.dtype))
            axes = tuple(range(len(shape)))
            return xp.any(picked, axis=axes) if ops.is_bool(arr) else xp.sum(picked, axis=axes)

        values = _located(wide, at)
    else:
        values = _located(wide, lambda arr: arr)
    values.update({f"i{d}": c for d, c in enumerate(i)})
    broken = xp.any(bad)
    for when, template in variants:
        fails = broken if when is None else broken & when(values)
        ops.check(~fails, _template(template, len(shape), shows), **values)
