"""Reading an existing head: :func:`infer` (the spec it implements or was evidently meant to
implement, with its weights) and :func:`diagnose` (what is wrong with it, in plain words, with
the fix as a :class:`~unihead.ClassificationHead` and as framework lines).

The rules, in the terms of docs/semantics.md: a head's layer produces *logits*, *probabilities*
(a softmax/sigmoid after it) or *log-probabilities* (``LogSoftmax``), and its loss expects one
of them (``from_logits=True``, PyTorch ``CrossEntropyLoss``/``BCEWithLogitsLoss``: logits;
Keras' default ``from_logits=False``, ``BCELoss``: probabilities; ``NLLLoss``:
log-probabilities).  A mismatch, an activation that cannot describe the classes (softmax over
one unit, independent sigmoids under a categorical loss) or labels that do not fit the loss
(ids > 1 under binary cross-entropy, one-hot rows under a sparse loss, ...) is an *error*:
training gives wrong numbers.  A *warning* is a choice that works but is rarely what is meant; an
*info* finding says where the framework's numbers differ from unihead's spec for the same
options (the native-equivalence table, docs/semantics.md §10), or, without a loss, what was not
checked (``loss_not_checked``).

Labels are read by :func:`unihead.labels.read_labels`, the rules of ``from_labels``, with the
layer's width and activation as hints; the native lines of a fix come from
:mod:`unihead._native`, which knows the native-equivalence table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ._hf import HF_IGNORE_INDEX, HFInfo, effective_problem_type, hf_config, labels_are_int, pipeline_activation
from ._native import native_lines, native_loss
from ._readers import LossReading, Reading, read_model
from ._untrusted import show
from .errors import HeadSpecError
from .labels import LabelSummary, describe_labels, read_labels
from .spec import ClassificationHead

__all__ = ["Finding", "Diagnosis", "Inferred", "infer", "diagnose", "diagnose_code", "native_lines"]

_FRAMEWORK = {"torch": "PyTorch", "keras": "Keras"}
_CATEGORICAL = ("categorical_ce", "sparse_ce", "ce", "nll")
#: how a key of ``Finding.lines`` is printed: the framework's or the model library's name
_LINES_LABEL = {"keras": "Keras", "torch": "PyTorch", "unihead": "unihead", "timm": "timm", "keras_hub": "keras-hub"}
_PRODUCES = {"linear": "logits", "softmax": "probabilities", "sigmoid": "probabilities",
             "log_softmax": "log-probabilities"}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: ``code`` (stable identifier), ``severity`` (``"error"``, ``"warning"``,
    ``"info"``), ``what`` is wrong, ``why`` it matters, the ``fix`` as a head, and ``lines``:
    how to write the fix natively and with unihead (``{"keras"|"torch": ..., "unihead": ...}``,
    from :func:`unihead._native.native_lines`: the native entry is code only where a native loss
    gives the fix's numbers, otherwise the sentence saying that none does, and why), and for a
    model of a model library also with that library (``"timm"``, ``"keras_hub"``)."""

    code: str
    severity: str
    what: str
    why: str
    fix: ClassificationHead | None = None
    lines: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        out = [f"{self.severity.upper()} [{self.code}] {self.what}", f"    why: {self.why}"]
        if self.fix is not None or self.lines:
            out.append(f"    fix: {self.fix!r}" if self.fix is not None else "    fix:")
            for k, v in self.lines.items():
                label = _LINES_LABEL.get(k, k)
                body = v.replace("\n", "\n" + " " * (7 + max(8, len(label) + 1)))  # under the first line
                out.append(f"      {label + ':':<8} {body}")
        return "\n".join(out)


class Inferred(NamedTuple):
    """What :func:`infer` returns: the ``head`` and its ``weights`` in the canonical layout
    (``{"kernel": (in, out), "bias": (out,)}`` NumPy arrays; ``None`` for an unbuilt layer)."""

    head: ClassificationHead
    weights: dict[str, np.ndarray] | None


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` (and :func:`diagnose_code`) returns.  ``ok`` is true when there is no
    error (warnings and info findings do not make a head wrong); ``str(diagnosis)`` is the report
    the CLI prints.  ``head`` is None for training code, which holds no head."""

    head: ClassificationHead | None
    weights: dict[str, np.ndarray] | None
    findings: tuple[Finding, ...]
    where: str
    framework: str
    assumptions: tuple[str, ...] = ()

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(f.code for f in self.findings)

    def __str__(self) -> str:
        n_err = len(self.errors)
        n_warn = sum(f.severity == "warning" for f in self.findings)
        status = "OK" if self.ok else f"{n_err} error{'s' * (n_err != 1)}"
        if self.ok and "loss_not_checked" in self.codes:
            status = "OK as far as checked (the loss was not)"
        lines = [f"unihead diagnose: {self.where}: {status}"
                 + (f", {n_warn} warning{'s' * (n_warn != 1)}" if n_warn else "")]
        for f in self.findings:
            lines.append(str(f))
        if self.head is not None:
            lines.append(f"head: {self.head!r}")
        lines.extend(f"  (assumed: {a})" for a in self.assumptions)
        return "\n".join(lines)


# ------------------------------------------------------------------------------ inference
def _labels_summary(labels: Any) -> LabelSummary | None:
    if labels is None:
        return None
    if hasattr(labels, "detach"):  # torch tensor
        labels = labels.detach().cpu().numpy()
    return describe_labels(labels)


def _exclusive(r: Reading) -> bool | None:
    """What the model says about its classes: exclusive (a softmax, a categorical loss),
    independent (sigmoids over several outputs with binary cross-entropy or no loss), or ``None``."""
    kind = r.loss.kind if r.loss is not None else None
    if kind in _CATEGORICAL or r.activation in ("softmax", "log_softmax"):
        return True
    if r.units >= 2 and (kind == "binary_ce" and r.activation in ("sigmoid", "linear")
                         or kind is None and r.activation == "sigmoid"):
        return False
    return None


def _structure(r: Reading, s: LabelSummary | None) -> tuple[ClassificationHead, list[str]]:
    """The head ``r`` implements or evidently was meant to, before loss options.  Labels, when
    given, are read by :func:`unihead.labels.read_labels` (the rules of ``from_labels``) with the
    layer's width and activation as hints; the layer's width and loss decide the rest."""
    u, act = r.units, r.activation
    kind = r.loss.kind if r.loss is not None else None
    notes: list[str] = []
    reading = read_labels(s, outputs=u, exclusive=_exclusive(r)) if s is not None else None
    if reading is not None and reading.num_classes is not None:
        if reading.task == "binary" or u == 1 and reading.num_classes == 2:
            fmt = reading.label_format if reading.task == "binary" else "binary"
            return ClassificationHead.binary(label_format=fmt, binary_units=2 if u == 2 else 1), notes
        return reading.head(), notes
    # no labels (or labels that are not class labels): the layer and the loss
    if u == 1:
        return ClassificationHead.binary(), notes
    if _exclusive(r) is False:
        return ClassificationHead.multilabel(u), notes
    fmt = "one_hot" if kind in ("categorical_ce", "binary_ce") else "sparse"
    if kind is None and act == "linear":
        notes.append(f"no loss given: {u} linear outputs read as multiclass logits")
    if u == 2 and fmt == "sparse":
        return ClassificationHead.binary(binary_units=2), notes
    return ClassificationHead.multiclass(u, label_format=fmt), notes


def _with_options(head: ClassificationHead, loss: LossReading | None, s: LabelSummary | None,
                  notes: list[str]) -> ClassificationHead:
    if loss is None:
        return head
    if loss.kind == "unihead" and loss.head is not None:
        return loss.head
    opts: dict[str, Any] = {}
    if loss.label_smoothing:
        opts["label_smoothing"] = loss.label_smoothing
    if loss.ignore_index is not None:
        negatives = s.negatives if s is not None else ()
        default_unused = loss.name in ("CrossEntropyLoss", "NLLLoss") and loss.ignore_index == -100 \
            and -100 not in negatives
        if not default_unused:
            opts["ignore_index"] = int(loss.ignore_index)
    if loss.class_weights is not None:
        if head.task == "binary" and loss.kind == "binary_ce":
            notes.append("BCE weight= rescales elements, not classes: not carried over")
        else:
            opts["class_weights"] = loss.class_weights
    if loss.pos_weight is not None:
        opts["pos_weight"] = loss.pos_weight
    if loss.focal_gamma:
        opts["focal_gamma"] = loss.focal_gamma
    if loss.reduction != "mean":
        opts["reduction"] = loss.reduction
    for key, value in opts.items():
        try:
            head = head.replace(**{key: value})
        except (HeadSpecError, ValueError, TypeError) as e:
            notes.append(f"{key}={value!r} from the loss does not fit {head!r}: {e}")
    return head


def _weights(r: Reading) -> dict[str, np.ndarray] | None:
    if r.kernel is None:
        return None
    return {"kernel": np.asarray(r.kernel), "bias": np.asarray(r.bias)}


def infer(model: Any, loss: Any = None, labels: Any = None) -> Inferred:
    """The :class:`~unihead.ClassificationHead` an existing Keras model/``Dense`` or PyTorch
    module/``nn.Linear`` implements (or was evidently meant to implement: a softmax over one unit
    reads as the binary head it was meant to be; run :func:`diagnose` to see what is wrong), with
    its weights in the canonical layout.  ``loss``: the PyTorch criterion, or a Keras loss to
    use instead of the compiled one; ``labels`` (optional) settle the label format and width."""
    r, s, _, _, notes = _read(model, loss, labels)
    return Inferred(_head(r, s, notes), _weights(r))


def _one_hot_ids(r: Reading, labels: Any, notes: list[str]) -> tuple[Reading, Any]:
    """A loss that one-hot encodes integer ids over the outputs itself (timm's
    ``BinaryCrossEntropy``) trains on 0/1 rows: the labels are read as those rows, and the
    targets it smooths and thresholds them to decide the head's ``label_smoothing`` (none when
    no unihead smoothing gives them; the rules say so)."""
    from ._timm import bce_targets

    L, u = r.loss, r.units
    if labels is None:
        ids = True
        notes.append(f"{L.name} given integer class ids (timm's train.py without Mixup/CutMix): it one-hot "
                     f"encodes them over the {u} output{'s' * (u != 1)}")
    else:
        if hasattr(labels, "detach"):
            labels = labels.detach().cpu().numpy()
        arr = np.asarray(labels)
        ids = arr.ndim == 1 or arr.ndim == 2 and arr.shape[-1] != u
        if ids and u >= 2 and arr.ndim == 1 and arr.size and np.issubdtype(arr.dtype, np.integer) \
                and arr.min() >= 0 and arr.max() < u:
            labels = np.eye(u, dtype=np.float32)[arr]
    off, on = bce_targets(L.options, u, ids)
    hard = (off, on) == (0.0, 1.0)
    symmetric = not hard and off < on and abs(on + off - 1.0) < 1e-9
    smoothing = 2.0 * off if symmetric else 0.0
    smoothed = bce_targets(dict(L.options, target_threshold=None), u, ids)
    opts = dict(L.options, ids=ids, targets=(off, on), smoothed=smoothed, representable=hard or symmetric)
    return dataclasses.replace(r, loss=dataclasses.replace(L, label_smoothing=smoothing, options=opts)), labels


def _head(r: Reading, s: LabelSummary | None, notes: list[str]) -> ClassificationHead:
    if r.head is not None:
        return r.head
    head, more = _structure(r, s)
    notes.extend(more)
    head = _with_options(head, r.loss, s, notes)
    names = r.hf.class_names if r.hf is not None else None
    if names is not None and head.class_names is None and \
            len(names) == (2 if head.task == "binary" else head.num_classes):
        try:
            head = head.replace(class_names=names)  # the config's id2label
        except HeadSpecError as e:
            notes.append(f"id2label not carried as class names: {e}")
    return head


def _read(model: Any, loss: Any, labels: Any) -> tuple[Reading, LabelSummary | None, Any, bool, list[str]]:
    """The model's reading and its labels' summary.  A transformers model without ``loss`` is
    read with its own ``forward``'s loss, which transformers chooses from the config and the
    labels' dtype (unihead._hf); its token labels are read one per token.  Also returns whether
    the labels are int64/int32 (transformers' class ids; ``None`` without labels) with their
    dtype and shape, whether the loss is the model's own, and what was assumed (``notes``).  A
    loss that one-hot encodes integer ids itself (timm's ``BinaryCrossEntropy``) has its labels
    read as the rows it trains on (:func:`_one_hot_ids`)."""
    r = read_model(model, loss)
    notes: list[str] = []
    if r.hf is None:
        if r.loss is not None and r.loss.options.get("one_hot_ids"):
            r, labels = _one_hot_ids(r, labels, notes)
        return r, _labels_summary(labels), None, False, notes
    labels_int = labels_are_int(labels)
    raw = None if labels is None else (
        labels_int, str(labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype),
        tuple(labels.shape) if hasattr(labels, "shape") else np.shape(labels))
    if labels is not None and r.hf.kind == "token":
        labels = np.reshape(labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels),
                            -1)  # one label per token
    s = _labels_summary(labels)
    own = r.loss is None
    if own:
        pt = effective_problem_type(r.hf, True if labels_int is None else labels_int)
        r.loss = {
            "regression": LossReading("other", None, "MSELoss"),
            # the forward flattens the labels (labels.view(-1)): class ids only, never rows
            "single_label_classification": LossReading("sparse_ce", True, "CrossEntropyLoss",
                                                       ignore_index=HF_IGNORE_INDEX),
            "multi_label_classification": LossReading("binary_ce", True, "BCEWithLogitsLoss"),
        }.get(pt, LossReading("other", None, f"problem_type={pt!r}"))
    return r, s, raw, own, notes


# ------------------------------------------------------------------------------ rules
class _Ctx:
    def __init__(self, r: Reading, s: LabelSummary | None, head: ClassificationHead):
        self.r, self.s, self.head = r, s, head
        self.fw = r.framework
        self.findings: list[Finding] = []

    def add(self, code: str, severity: str, what: str, why: str, fix: ClassificationHead | None = None) -> None:
        fix = self.head if fix is None and severity != "info" else fix
        if fix is None:
            lines = {}
        elif self.r.hf is not None:
            lines = _hf_lines(fix, self.r.hf, self.r.units)
        else:
            lines = native_lines(fix, self.fw, self.r.in_features)
        if fix is not None and self.r.library == "timm":
            from ._timm import timm_lines

            lines["timm"] = timm_lines(fix, self.r.options.get("architecture"))
        elif fix is not None and self.r.library == "keras_hub":
            from ._keras_hub import keras_hub_lines

            lines["keras_hub"] = keras_hub_lines(fix, self.r.options.get("task"))
        self.findings.append(Finding(code, severity, what, why, fix, lines))

    def errors_found(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    @property
    def loss_name(self) -> str:
        lr = self.r.loss
        if lr is None:
            return ""
        if lr.call:
            return lr.call
        if self.fw == "keras" and lr.name[:1].islower():
            return f"'{lr.name}'"
        return lr.name + ("(from_logits=True)" if self.fw == "keras" and lr.from_logits and lr.kind != "unihead"
                          else "()" if self.fw == "keras" or lr.name.endswith("Loss") else "")


def _rules(c: _Ctx) -> None:
    r, s, L = c.r, c.s, c.r.loss
    u, act = r.units, r.activation
    kind = L.kind if L is not None else None
    produces = _PRODUCES.get(act)

    # a unihead layer / loss: the spec is the contract; only a mismatch between them is an error
    if r.head is not None or kind == "unihead":
        if r.head is not None and kind == "unihead" and L.head != r.head:
            c.add("head_mismatch", "error",
                  f"the layer was built for {r.head!r} but the loss for {L.head!r}.",
                  "the loss reads the layer's outputs with a different meaning (width, task or labels).",
                  r.head)
        if r.head is not None and L is not None and kind != "unihead":
            c.add("native_loss_on_head", "warning",
                  f"a unihead layer ({r.head!r}) is trained with {c.loss_name or L.name}.",
                  "the layer emits logits; a native loss must take logits and match the spec's options "
                  "(the native-equivalence table, docs/semantics.md §10); the head's own loss always does.")
        return

    if produces is None:
        c.add("not_a_probability_activation", "error",
              f"the output layer ends in '{act}', which does not turn scores into class probabilities.",
              "a classification head needs logits (then a loss that takes logits) or a softmax/sigmoid; "
              f"'{act}' outputs are neither, so the loss reads them with the wrong meaning.")
        return

    # ---- the activation alone
    if act in ("softmax", "log_softmax") and u == 1:
        c.add("softmax_one_unit", "error",
              f"{r.where}: a {act.replace('_', ' ')} over a single unit always outputs "
              f"{'1.0' if act == 'softmax' else '0.0'}.",
              "softmax normalises across the units of a row: with one unit it is exp(z)/exp(z) = 1 for every "
              "input, so the model predicts the same thing for every example and its gradient is zero. "
              "For two classes use one unit with a sigmoid (binary cross-entropy), or two units with a softmax.")
    # ---- activation vs what the loss expects
    if L is not None and kind != "other":
        expects = ("log-probabilities" if kind == "nll" else "logits" if L.from_logits else "probabilities")
        if act == "log_softmax" and kind == "ce":
            pass  # log_softmax is idempotent under CrossEntropyLoss: redundant, not wrong
        elif produces == "probabilities" and expects == "logits":
            c.add("double_activation", "error",
                  f"{r.where} outputs probabilities, but {c.loss_name} expects logits and applies the "
                  f"{'softmax' if kind in _CATEGORICAL else 'sigmoid'} itself.",
                  "the activation is applied twice: the loss sees squashed values in [0, 1], its gradient "
                  "shrinks towards zero and training stalls (or is stuck at chance)."
                  + (" (Keras on TensorFlow takes the logits behind a softmax/sigmoid layer and only warns, so "
                     "the same model trains right there and wrong on JAX and PyTorch.)" if c.fw == "keras" else "")
                  + (" A keras-hub task compiles itself when built, before its activation is set, with "
                     "from_logits=True: built with an activation and not compiled again, it trains so."
                     if r.library == "keras_hub" and L.from_logits else ""))
        elif produces == "logits" and expects == "probabilities":
            c.add("loss_expects_probabilities", "error",
                  f"{r.where} outputs logits, but {c.loss_name} expects probabilities "
                  f"({'from_logits=False' if c.fw == 'keras' else 'after a sigmoid'}).",
                  "logits are not in [0, 1]: the loss clips or rejects them, the numbers are wrong and the "
                  "gradient vanishes outside [0, 1]. Tell the loss it gets logits (or add the activation).")
        elif produces == "logits" and expects == "log-probabilities":
            c.add("nll_without_log_softmax", "error",
                  f"{r.where} outputs logits, but NLLLoss expects log-probabilities (nn.LogSoftmax before it).",
                  "NLLLoss just picks -input[y]: on raw logits the loss is unbounded below, so training "
                  "pushes the true logit to infinity instead of learning probabilities.")
        elif produces == "probabilities" and expects == "log-probabilities":
            c.add("nll_on_probabilities", "error",
                  f"{r.where} outputs probabilities, but NLLLoss expects log-probabilities.",
                  "NLLLoss picks -p[y]: a loss in [-1, 0] whose gradient ignores how wrong the prediction is; "
                  "it is not cross-entropy.")
        elif produces == "log-probabilities" and expects != "log-probabilities":
            c.add("log_probabilities_into_loss", "error",
                  f"{r.where} outputs log-probabilities, but {c.loss_name} expects {expects}.",
                  "log-probabilities are <= 0: read as probabilities they are clipped to the smallest value.")

    if L is not None and act == "sigmoid" and u >= 2 and kind in _CATEGORICAL and not L.from_logits \
            and kind != "nll":
        c.add("sigmoid_categorical_loss", "error",
              f"{r.where}: {u} independent sigmoids trained with {c.loss_name}.",
              "a categorical loss needs outputs that sum to 1; independent sigmoids do not, so the loss "
              "renormalises them and nothing stops every output from rising together: predictions become "
              "rows of 1.0. Use a softmax for exclusive classes (sigmoids only for multilabel, with "
              "binary cross-entropy).")
    if L is not None and kind in _CATEGORICAL and u == 1 and act not in ("softmax", "log_softmax"):
        c.add("categorical_loss_one_unit", "error",
              f"{r.where} has one output, but {c.loss_name} is a categorical loss over the output units.",
              "over a single unit the categorical cross-entropy is always 0 (the one 'class' has "
              "probability 1), so nothing is learned. One unit means binary cross-entropy.")
    if L is not None and kind == "binary_ce" and act == "softmax" and u >= 2 and not (
            s is not None and s.kind == "ids" and (s.classes or 0) > 2):
        c.add("binary_loss_on_softmax", "warning",
              f"{r.where} is trained with {c.loss_name}, which scores each of the {u} softmax outputs as an "
              "independent yes/no.",
              "for exclusive classes the matching loss is categorical cross-entropy (and Keras' 'accuracy' "
              "becomes binary accuracy per output, which looks better than it is).")

    # ---- a model library's own loss
    if L is not None and L.library == "timm" and L.name == "BinaryCrossEntropy":
        if _timm_bce_rules(c):
            return

    # ---- labels
    if s is not None:
        _label_rules(c, s)

    # ---- where the framework's numbers differ from the spec's
    if L is not None:
        _native_differences(c, L)


def _timm_bce_rules(c: _Ctx) -> bool:
    """timm's ``BinaryCrossEntropy``: how it builds its targets (unihead/_timm.py).  True when
    the targets it trains on are unusable (the label rules then have nothing to add)."""
    r, L = c.r, c.r.loss
    o, u = L.options, r.units
    off, on = o["targets"]
    s, t = o["smoothing"], o["target_threshold"]
    if u == 1 and o["ids"]:
        why = ("timm's BinaryCrossEntropy one-hot encodes integer targets over the outputs: over one output "
               f"label 0 becomes the target {on:g} (a positive: every example is trained as class 1) and label 1 "
               "is out of range (RuntimeError: index 1 is out of bounds). A one-output binary model needs its "
               "0/1 labels as a float column of the logits' shape (N, 1).")
        if c.s is not None:
            c.add("timm_bce_ids_one_output", "error",
                  f"{c.loss_name} on {r.where}, one output, with integer labels ({c.s.describe()}).", why)
        else:
            c.add("timm_bce_ids_one_output", "warning",
                  f"{c.loss_name} on {r.where}, one output: integer labels (assumed: none given) are misread.", why)
        return True
    if off == on:
        c.add("timm_bce_constant_targets", "error",
              f"{c.loss_name}: target_threshold={t!r} turns every target into {on:g} (the smoothed targets are "
              f"{o['smoothed'][0]:g} and {o['smoothed'][1]:g}, both {'above' if on else 'at or below'} it).",
              "target > target_threshold is the same for positives and negatives, so the labels are lost and "
              "the model learns a constant. The threshold must lie between the smoothed targets "
              f"({o['smoothed'][0]:g} <= t < {o['smoothed'][1]:g}).")
        return True
    if s and t is not None and (off, on) == (0.0, 1.0) and (o["ids"] or o["smooth_dense"]):
        c.add("timm_bce_smoothing_cancelled", "warning",
              f"{c.loss_name}: target_threshold={t!r} turns the smoothed targets back into 0 and 1, so "
              f"smoothing={s!r} has no effect.",
              "the threshold is applied after the smoothing: the model trains on hard 0/1 targets (the head "
              "shown has no smoothing). Drop one of the two: smoothing=0.0 says what is trained.")
    elif s and not o["ids"] and not o["smooth_dense"]:
        c.add("timm_bce_smoothing_ignored", "info",
              f"{c.loss_name}: smoothing={s!r} is not applied: the targets already have the logits' shape.",
              "timm smooths only the integer ids it one-hot encodes itself; targets of shape (N, K) (Mixup/CutMix "
              "output, multi-hot rows) are used as given unless smooth_dense=True.")
    elif not o["representable"]:
        c.add("timm_bce_smoothing", "info",
              f"{c.loss_name} on integer ids over {u} outputs trains towards {off:g} and {on:g}: no unihead "
              "head gives these numbers (the head shown has no smoothing).",
              f"timm spreads smoothing={s!r} like a categorical smoothing (off = s/K, on = 1 - s + s/K, so each "
              "target row sums to 1); the binary and multilabel smoothing of unihead (and of Keras' "
              "BinaryCrossentropy) is symmetric, y(1 - s) + s/2, the same only for K = 2.")
    if o["sum_classes"]:
        c.add("timm_bce_sum_classes", "info",
              f"{c.loss_name} sums the loss over the {u} classes: it is {u}x unihead's mean.",
              "unihead (and Keras) average the labels of an example, then the examples; sum_classes=True adds the "
              f"labels instead, so the loss and its gradients are {u} times larger (the effective learning rate too).")
    return False


def _label_rules(c: _Ctx, s: LabelSummary) -> None:
    r, L = c.r, c.r.loss
    u = r.units
    kind = L.kind if L is not None else None
    if kind == "binary_ce" and (s.kind == "ids" and (s.max > 1 or s.negatives) or s.kind == "other"):
        too_wide = s.kind == "ids" and (s.classes or 0) > 2 and u < (s.classes or 0)
        c.add("bce_multiclass_labels", "error",
              f"binary cross-entropy with labels {s.describe()}"
              + (f", on {u} output{'s' * (u != 1)}" if too_wide else "") + ".",
              "binary cross-entropy -y*log(p) - (1-y)*log(1-p) is only a loss for y in [0, 1]: with y = 2 or 3 "
              "the (1-y) term turns negative, the loss is unbounded below and training runs it to "
              "-infinity." + (f" {s.classes} classes also need {s.classes} outputs, not {u}." if too_wide else ""))
        return
    sparse_loss = kind in ("sparse_ce", "nll")
    if s.kind in ("one_hot", "multi_hot", "probability_rows") and sparse_loss:
        c.add("one_hot_with_sparse_loss", "error",
              f"{c.loss_name} expects integer class ids, but the labels are {s.describe()}.",
              "a sparse loss reads each label as a class id: one-hot rows fail with a shape error or are "
              "misread. Use the categorical loss for one-hot rows, or pass np.argmax(labels, -1).")
        return
    if s.kind == "ids" and kind == "categorical_ce":
        c.add("ids_with_categorical_loss", "error",
              f"{c.loss_name} expects one-hot rows of width {u}, but the labels are {s.describe()}.",
              "a categorical loss multiplies the label row with the log-probabilities: integer ids fail with "
              "a shape error or broadcast into a wrong loss. Use the sparse loss for integer ids (or one-hot "
              "encode them).")
        return
    if s.kind == "ids" and kind == "binary_ce" and u >= 2:
        c.add("ids_with_row_loss", "error",
              f"binary cross-entropy over {u} outputs expects 0/1 rows of width {u}, but the labels are "
              f"{s.describe()}.",
              "the label column is broadcast against every output: each output is trained on the same id.")
        return
    if s.kind == "ids" and s.negatives and (c.head.ignore_index is None or
                                            any(n != c.head.ignore_index for n in s.negatives)):
        c.add("negative_labels", "error",
              f"the labels contain negative ids {list(s.negatives)}, and the loss ignores none of them.",
              "a negative id is not a class: the loss indexes out of range or reads the wrong class. If it "
              "marks examples to leave out, set ignore_index (ignore_class in Keras).")
    if s.kind == "ids" and u >= 2 and (s.classes or 0) > u:
        c.add("width_mismatch", "error",
              f"the labels go up to class {s.classes - 1}, but the layer has {u} outputs.",
              f"{s.classes} classes need {s.classes} outputs: ids >= {u} have no output to score them "
              "(an index error, or silently wrong losses on some devices).")
    elif s.width is not None and u >= 2 and s.width != u:
        c.add("width_mismatch", "error",
              f"the label rows have width {s.width}, but the layer has {u} outputs.",
              f"every output needs its column in the labels: {s.width} columns for {s.width} classes.")
    if r.activation == "sigmoid" and u >= 2 and s.kind == "one_hot" and kind in ("binary_ce", None):
        c.add("sigmoid_exclusive_labels", "warning",
              f"{r.where} scores {u} classes independently, but every label row has exactly one 1.",
              "exclusive classes are what a softmax describes: independent sigmoids give probabilities "
              "that need not sum to 1 and waste capacity on a constraint the labels already carry.",
              ClassificationHead.multiclass(u, label_format="one_hot"))


def _native_differences(c: _Ctx, L: LossReading) -> None:
    h = c.head
    if c.fw in ("torch", "keras") and L.kind not in ("unihead", "other"):
        nl = native_loss(h, c.fw)
        if not nl.exact:  # the loss was read as h, and no native loss gives h's numbers
            c.add("differs_from_native", "info",
                  f"{c.loss_name or L.name} does not give the numbers of {h!r}, the head its options describe: "
                  + nl.note,
                  f"the same options give different losses and gradients in {_FRAMEWORK[c.fw]} and in unihead.")
    if L.name in ("BCEWithLogitsLoss", "BinaryCrossEntropy") and h.task == "multilabel":
        if L.reduction == "sum":
            c.add("differs_from_native", "info",
                  f"{L.name}(reduction='sum') sums over the {h.num_outputs} labels too: it is "
                  f"{h.num_outputs}x unihead's 'sum' (docs/semantics.md §10, row ml2).",
                  "unihead (and Keras) average the labels of an example, then sum the examples.")
        if L.class_weights is not None:
            c.add("differs_from_native", "info",
                  f"{L.name}(weight=w) divides by N*K, not by the weights: it is mean(w) times "
                  "unihead's class_weights=w (docs/semantics.md §10, row ml5).",
                  "the loss scale (and so the effective learning rate) differs by mean(w).")
    if L.name == "CategoricalFocalCrossentropy":
        c.add("differs_from_native", "info",
              "CategoricalFocalCrossentropy multiplies the loss by alpha (0.25 by default); unihead's focal "
              "loss has no alpha (it equals alpha=1.0, docs/semantics.md §10, row mc14).",
              "the loss and its gradients are alpha times unihead's.")


# ------------------------------------------------------------------------------ Hugging Face
def _hf_lines(fix: ClassificationHead, info: HFInfo, width: int) -> dict[str, str]:
    """The fix as transformers' own lines (the config fields, the labels the model's forward then
    needs) and with unihead (its Trainer loss).  A fix of another width than the layer's
    (``width``) loads the checkpoint with a new classification layer."""
    fields = hf_config(fix)
    args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    new = fields["num_labels"] != width
    lines = [f"model = {info.model_class}.from_pretrained(checkpoint, {args}"
             + (", ignore_mismatched_sizes=True)  # a new classifier: the old one is not this head's" if new else ")")]
    if fix.task == "multiclass" and fix.label_format != "sparse" or fix.task == "binary" and \
            fix.binary_units == 2 and fix.label_format != "binary":
        lines.append("labels = labels.argmax(-1)  # int64 class ids: the forward's CrossEntropyLoss")
    elif fix.task == "binary" and fix.binary_units == 1:
        lines.append("labels = labels.float().reshape(-1, 1)  # one float 0/1 per example: BCEWithLogitsLoss")
    elif fix.task == "multilabel":
        lines.append("labels = labels.float()  # float 0/1 rows: BCEWithLogitsLoss")
    else:
        lines.append("labels = labels.long()  # int64 class ids: the forward's CrossEntropyLoss")
    plain = fix.replace(label_format=None, ignore_index=None, class_names=None)
    options = plain != type(fix)(fix.task, fix.num_classes, binary_units=fix.binary_units)
    if options:
        lines.append("# the model's own loss has none of the head's options: train with unihead's (below)")
    # without options the config's head (trainer_loss(model)) is the fix; with them, the fix itself
    of = f"unihead.{fix!r}" if options else "model"
    return {"transformers": "\n".join(lines),
            "unihead": "from unihead.backends.transformers import trainer_loss\n"
                       f"trainer = Trainer(model, args, train_dataset=..., compute_loss_func=trainer_loss({of}))"}


def _inverse(mapping: dict) -> dict | None:
    """``{value: key}`` of ``mapping``, or None when its values are not distinct and hashable."""
    try:
        inverse = {v: k for k, v in mapping.items()}
    except TypeError:
        return None
    return inverse if len(inverse) == len(mapping) else None


def _hf_rules(c: _Ctx, raw: Any, own: bool) -> None:
    """The traps of transformers' models (unihead._hf has the rules they follow).  ``raw``: the
    labels as given, ``(is int64/int32, dtype, shape)``, or None."""
    r, s, info = c.r, c.s, c.r.hf
    u = r.units
    labels_int = None if raw is None else raw[0]
    if info.num_labels != u:
        c.add("hf_num_labels_mismatch", "error",
              f"config.num_labels = {info.num_labels}, but the model's {info.layer_path} has {u} outputs.",
              "the config was changed after the model was built (num_labels is len(id2label)): the forward still "
              f"computes {u} logits, while pipelines and id2label name {info.num_labels} classes, and a model "
              "saved now does not load back with its weights. Build the model from the config you mean "
              "(from_pretrained(checkpoint, num_labels=...)).",
              c.head)
    ids = info.id2label
    if ids is not None and set(ids) != set(range(len(ids))):
        c.add("hf_id2label_mismatch", "error",
              f"config.id2label has the ids {show(sorted(ids, key=str))}, not 0..{len(ids) - 1}.",
              "output i of the model is named id2label[i]: an output without an entry fails in pipelines "
              "(KeyError), and the names are shifted against the outputs. Number the classes from 0.")
    elif ids is not None and (_inverse(ids) is None or not all(isinstance(v, str) and v for v in ids.values())):
        c.add("hf_id2label_mismatch", "error",
              f"config.id2label does not give each output a name of its own: {show(ids)}.",
              "pipelines report id2label[i] for output i: two outputs with one name (or a name that is not a "
              "string) make a prediction that does not say which class it is. Give every class its own name.")
    elif ids is not None and info.label2id is not None and info.label2id != _inverse(ids):
        c.add("hf_id2label_mismatch", "error",
              "config.label2id is not the inverse of config.id2label.",
              "datasets are encoded with label2id and predictions decoded with id2label: a class encoded as "
              "one id comes back under another name. Write label2id = {name: i for i, name in id2label.items()}.")
    if own:
        pt = effective_problem_type(info, True if labels_int is None else labels_int)
        if pt == "regression":
            one = u == 1
            c.add("hf_regression_head", "error",
                  f"{info.describe()}: its forward trains a regression (MSELoss on the "
                  f"{'logit' if one else 'logits'}), not a classifier"
                  + (" (num_labels=1 with problem_type unset is 'regression', whatever the labels)."
                     if info.problem_type is None else "."),
                  "the output is never turned into a probability: mean squared error on 0/1 targets learns "
                  "a score, not P(class), and the text/image-classification pipelines apply a sigmoid to it "
                  "before the first training step but nothing after it (the forward sets problem_type="
                  "'regression' in the config). For two classes: num_labels=2 (softmax), or num_labels=1 with "
                  "problem_type='multi_label_classification' (one sigmoid).",
                  ClassificationHead.binary(binary_units=2) if one else c.head)
        elif info.kind == "sequence" and pt == "multi_label_classification" and s is not None and \
                s.kind in ("one_hot", "probability_rows"):
            implicit = info.problem_type is None
            fix = ClassificationHead.multiclass(u, label_format="one_hot" if s.kind == "one_hot" else "probabilities")
            what = (f"{info.describe()} gets float labels ({s.describe()}), so its forward trains a multi-label "
                    "BCEWithLogitsLoss (problem_type unset: any labels but int64/int32 mean multi-label).")
            why = ("the labels say every example has exactly one class, but each output is trained as an "
                   "independent yes/no: softmax semantics are lost, the probabilities need not sum to 1, and "
                   "the forward writes problem_type='multi_label_classification' into the config, so pipelines "
                   "apply sigmoids from then on.")
            if implicit:
                c.add("hf_one_hot_multilabel", "error", what, why, fix)
            else:
                c.add("hf_one_hot_multilabel", "warning",
                      f"{info.describe()} is a multi-label model, but every label row has exactly one 1 "
                      f"({s.describe()}).", why, fix)
        elif info.kind == "sequence" and info.problem_type is None and u >= 2:
            c.add("hf_problem_type_unset", "info",
                  f"{info.describe()}: the forward picks its loss from the dtype of the first labels it sees and "
                  "writes it into config.problem_type for every later call.",
                  "int64/int32 labels make it CrossEntropyLoss (softmax), any other dtype (float, but also uint8, "
                  "int16 or bool) BCEWithLogitsLoss (sigmoids); pipelines follow what was written. Set "
                  "problem_type in the config (unihead.backends.transformers.hf_config(head) gives it).")
        if raw is not None and not c.errors_found() and pt in ("single_label_classification",
                                                               "multi_label_classification"):
            dtype, shape = raw[1].replace("torch.", ""), raw[2]
            single = pt == "single_label_classification"
            # PyTorch's cross-entropy takes int64 (or uint8) targets: int32, which transformers counts
            # as class ids when it picks the loss, then fails inside it (measured, torch 2.13)
            fits = dtype in ("int64", "uint8") if single else (dtype.startswith(("float", "bfloat"))
                                                              and len(shape) == 2 and shape[-1] == u)
            if not fits:
                c.add("hf_labels_mismatch", "error",
                      f"{info.describe()}'s forward trains {c.loss_name} on these labels ({dtype}, shape {shape}), "
                      "which it cannot take: "
                      + ("its CrossEntropyLoss needs int64 class ids, one per example (int32 ids make "
                         "transformers pick it, and PyTorch's cross-entropy then refuses them)." if single else
                         f"its BCEWithLogitsLoss needs float 0/1 rows of shape (N, {u}), one column per output."),
                      "the first training step fails with a dtype or shape error from inside the model's forward. "
                      + ("Pass labels.long()." if single else f"Pass labels.float(), shape (N, {u})."))
        if info.kind == "token" and info.problem_type not in (None, "single_label_classification"):
            c.add("hf_problem_type_ignored", "warning",
                  f"{info.describe()}: a token classifier's forward ignores problem_type; it always trains "
                  "CrossEntropyLoss over the tokens (softmax).",
                  "the config says one thing, the loss does another: a multi-label or regression token model "
                  "needs a loss of its own (compute_loss_func=trainer_loss(head)).")
    elif info.kind == "token" or info.problem_type != "regression":
        act, expected = pipeline_activation(info), c.head.activation
        if act != expected and info.kind == "token":
            c.add("hf_pipeline_activation", "error",
                  f"the token classifier is trained as {c.head!r} ({expected} probabilities), but the "
                  "token-classification pipeline applies a softmax to every token's logits.",
                  "that pipeline has no function_to_apply and ignores problem_type: its scores are a softmax of "
                  f"logits trained for a {expected}. Post-process the logits yourself "
                  "(compiled.probabilities(logits), compiled.predict_names(logits)) instead of the pipeline.")
        elif act != expected:
            c.add("hf_pipeline_activation", "error",
                  f"the model is trained as {c.head!r} ({expected} probabilities), but its config "
                  f"(num_labels={info.num_labels}, problem_type={info.problem_type!r}) makes the "
                  f"text/image-classification pipelines apply a {act}.",
                  f"pipelines choose function_to_apply from the config, not from the loss: every score they "
                  f"return is a {act} of logits trained for a {expected}. Write the config for the head "
                  "(unihead.backends.transformers.hf_config(head)).")


def _without_loss(c: _Ctx) -> None:
    """No loss: say what was not checked, and what the output layer alone shows."""
    r = c.r
    act, keras_ = r.activation, c.fw == "keras"
    shown = {"softmax_one_unit", "not_a_probability_activation"} & {f.code for f in c.findings}
    if act in ("softmax", "sigmoid") and r.head is None and not shown:
        own = "softmax" if act == "softmax" else "sigmoid"
        if keras_:
            c.add("probabilities_output", "info",
                  f"{r.where} outputs probabilities, so the loss must take probabilities "
                  "(from_logits=False, Keras' default).",
                  f"a loss with from_logits=True, or unihead's loss, would apply the {own} a second time. "
                  "Keras' losses on probabilities clip them to [1e-7, 1 - 1e-7], which caps the loss (and "
                  "kills the gradient) of confident mistakes; logits out and from_logits=True do not.", c.head)
        else:
            c.add("probabilities_output", "warning",
                  f"{r.where} outputs probabilities, so the loss must take probabilities.",
                  f"nn.{'CrossEntropyLoss' if act == 'softmax' else 'BCEWithLogitsLoss'} (like unihead's losses) "
                  f"takes logits and applies the {own} itself: after this module it is applied twice and training "
                  "stalls. The loss that takes probabilities "
                  f"({'torch.log then nn.NLLLoss' if act == 'softmax' else 'nn.BCELoss'}) "
                  f"is less accurate and loses the gradient of confident mistakes. Output logits and apply the "
                  f"{own} only to predict.", c.head)
    how = ("compile the model with its loss (or pass loss=)" if keras_
           else "pass the criterion: diagnose(model, loss=nn.CrossEntropyLoss(...))" if c.fw == "torch"
           else "pass loss=")
    c.findings.append(Finding(
        "loss_not_checked", "info",
        f"no loss given: the loss, and whether it fits the output ({r.where}) and the labels, were not checked.",
        "most wrong heads are a loss that does not fit the output activation (an activation applied twice, "
        f"a categorical loss over one unit, ...) or the labels. To check them, {how}."))


def diagnose(model: Any, loss: Any = None, labels: Any = None) -> Diagnosis:
    """Findings on an existing head (see the module docstring): a Keras model/``Dense`` (its
    activation or a following ``Activation``/``Softmax`` layer, and its compiled loss, or
    ``loss``), or a PyTorch module/``nn.Linear`` with its criterion as ``loss``.  ``labels``
    (a label array, optional) enable the label checks.  A correct head gives no finding."""
    r, s, raw, own, notes = _read(model, loss, labels)
    head = _head(r, s, notes)
    ctx = _Ctx(r, s, head)
    _rules(ctx)
    if r.hf is not None:
        _hf_rules(ctx, raw, own)
        if own and labels is None and r.hf.kind == "sequence" and r.hf.problem_type is None and r.units >= 2:
            notes.append("no labels given: read with int64 class ids, which make the model's forward use "
                         "CrossEntropyLoss (float labels would make it BCEWithLogitsLoss)")
    if r.loss is None:
        _without_loss(ctx)
    where = r.where + (f" + {ctx.loss_name}" if r.loss is not None else " (no loss given)")
    if own:
        where = r.where + f" + its forward's {ctx.loss_name}"
    return Diagnosis(head, _weights(r), tuple(ctx.findings), where, ctx.fw, tuple(notes))


# ------------------------------------------------------------------------------ training code
_ACCUMULATION_FIX = {
    "torch": ("W = sum(compiled.loss_weight(y) for x, y in micro_batches)  # the step's weight, before the forwards\n"
              "loss = compiled.loss(model(x), y, normalizer=W)  # each micro-batch; no / accumulation_steps\n"
              "loss.backward()  # the gradients add up to the full batch's mean gradient"),
    "keras": ("W = sum(compiled.loss_weight(y) for x, y in micro_batches)  # the step's weight\n"
              "loss = compiled.loss(model(x), y, normalizer=W)  # each micro-batch, gradients summed, not averaged\n"
              "# (the Keras accumulation step in docs/scaling-out.md does this in place of gradient_accumulation_steps)"),
    "jax": ("W = sum(compiled.loss_weight(y) for x, y in micro_batches)  # the step's weight\n"
            "loss = compiled.loss(apply(params, x), y, normalizer=W)  # each micro-batch\n"
            "optax.MultiSteps(opt, every_k_schedule=k, use_grad_mean=False)  # sum the micro-gradients"),
}


def diagnose_code(source: str, filename: str | None = None) -> Diagnosis:
    """Findings on training code (Python source text, parsed with :mod:`ast`, never run): a loss
    reduced to a mean over each micro-batch and accumulated over several micro-batches before
    one optimizer step (``mean_of_micro_batch_means``), in a PyTorch loop, a Keras optimizer
    with ``gradient_accumulation_steps``, or ``optax.MultiSteps``.  What can and cannot be seen
    is listed in docs/scaling-out.md ("What `diagnose` can see").  ``filename`` names the code
    in the report.  The fix is unihead's contract: the step's weight summed with
    ``compiled.loss_weight`` over the micro-batches, and ``loss(..., normalizer=W)``."""
    from ._code import read_accumulation

    if not isinstance(source, str):
        raise TypeError(f"diagnose_code takes Python source text (a str); got {type(source).__name__}. "
                        "For a file: diagnose_code(Path(path).read_text(), path).")
    name = filename or "<code>"
    found = read_accumulation(source, name)
    findings: list[Finding] = []
    for a in found:
        what = (f"line {a.line}: {a.text} back-propagates {a.loss}, a mean over one micro-batch, and several "
                f"micro-batches make one optimizer step: {a.how}.")
        lines = {"unihead": _ACCUMULATION_FIX[a.framework]}
        if a.varies:
            findings.append(Finding(
                "mean_of_micro_batch_means", "error", what,
                f"{a.varies}: the step's gradient is a mean of the micro-batches' means, so an example in a "
                "micro-batch with fewer kept labels (or less weight) counts more than one in a fuller micro-batch; "
                "it is not the gradient of the full batch's mean.", None, lines))
        else:
            findings.append(Finding(
                "mean_of_micro_batch_means", "warning", what,
                "each micro-batch divides by its own number of examples: the step is the full batch's mean only "
                "when every micro-batch has the same size (an epoch's last one often has fewer) and no label is "
                "left out (nn.CrossEntropyLoss and F.cross_entropy leave out labels -100 by default).",
                None, lines))
    framework = found[0].framework if found else "code"
    return Diagnosis(None, None, tuple(findings), f"{name} (training code, read, not run)", framework)
