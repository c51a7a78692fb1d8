"""A head's loss written with a framework's own losses: :func:`native_loss`.

This is the one place that turns a :class:`~unihead.ClassificationHead` into PyTorch or Keras
loss code (every native line :func:`unihead.diagnose` prints comes from here).  It knows the
native-equivalence table (docs/semantics.md §10): for each option it either adds what the
framework's loss needs to give the head's numbers, or records why no native loss can, so the
answer is one of two things, never a near miss presented as a match:

* ``exact``: the code gives the head's loss (every option, every reduction) up to rounding on
  moderate logits (the native losses lose accuracy at extreme logits, docs/semantics.md §11);
  ``note`` names what still differs outside that (an all-ignored batch, ...);
* not ``exact``: ``note`` says why no native loss gives the numbers, and ``code`` is the
  *nearest* native call (the one a user would write), which tests/test_advice.py checks really
  differs.

What counts as one native call: the framework's loss (``nn.CrossEntropyLoss``,
``F.binary_cross_entropy_with_logits``, ``keras.losses.*``) on the logits (a 2-unit binary head
may pass the difference of its two logits to the 1-unit loss, docs/semantics.md §2), with the
labels transformed elementwise (a cast, smoothing, one-hot), the logits soft-capped elementwise
first for a ``logit_softcap`` head (``logits = s * tanh(logits / s)``, Gemma 2's form: the
probabilities line then reads the capped logits too), and per-example weights built from
the labels passed to the loss' own weight argument (class weights, a 0/1 mask for ignored
labels, sample weights), and at most a division by the sum of those weights (a weighted mean)
or by the number of labels.  That is what the rows of the table that name a call do.

The code is Python in the framework's own names (``torch``, ``nn``, ``F`` for
``torch.nn.functional``; ``keras``) with three free names: ``logits`` (``(N, K)``), ``labels``
(as the head takes them) and ``sample_weight`` (when asked for); its last statement assigns
``loss``.  tests/test_advice.py executes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .spec import ClassificationHead

__all__ = ["NativeLoss", "native_loss", "native_lines", "LOSS_VERB"]

#: The compiled head's method that returns the framework's loss object (``nn.Module``, Keras
#: ``Loss``), the same name on every backend.
LOSS_VERB = "loss_fn"

_NAMES = {"torch": "PyTorch", "keras": "Keras"}
_SAMPLE_WEIGHTS = (None, "example", "label")


@dataclasses.dataclass(frozen=True)
class NativeLoss:
    """What :func:`native_loss` returns (see the module docstring).

    ``code``: statements, the last one assigns ``loss``; ``labels``: what ``labels`` must hold;
    ``note``: for an exact call, what still differs (or ``""``), otherwise why no native loss
    gives the head's numbers; ``rows``: the rows of the native-equivalence table involved."""

    framework: str
    head: ClassificationHead
    sample_weight: str | None
    exact: bool
    code: tuple[str, ...]
    labels: str
    note: str
    rows: tuple[str, ...] = ()

    def text(self, in_features: int | None = None) -> str:
        """The lines a user reads: the output layer, the loss, the probabilities; or, when no
        native loss gives the head's numbers, one sentence that says so and why."""
        name = _NAMES[self.framework]
        if not self.exact:
            return f"no native {name} loss gives this head's numbers: {self.note}"
        k = self.head.num_outputs
        softmax = self.head.activation == "softmax"
        if self.framework == "torch":
            d = in_features if in_features is not None else "in_features"
            layer = f"nn.Linear({d}, {k})  # logits, no activation"
            probs = f"probabilities = {'torch.softmax(logits, -1)' if softmax else 'torch.sigmoid(logits)'}"
        else:
            layer = f"keras.layers.Dense({k})  # logits, no activation"
            probs = f"probabilities = keras.ops.{'softmax' if softmax else 'sigmoid'}(logits)"
        lines = [layer, *self.code[:-1], f"{self.code[-1]}  # labels: {self.labels}"]
        if self.code[-1] == "loss = loss_fn(labels, logits)":
            lines.append("# or: model.compile(optimizer, loss=loss_fn)")
        lines.append(probs)
        if self.note:
            lines.append(f"# note: {self.note}")
        return "\n".join(lines)


def _num(v: Any) -> str:
    """A number as Python source that reads back as the same float."""
    return repr(float(v))


def _nums(v: Any) -> str:
    return "[" + ", ".join(_num(x) for x in v) + "]" if isinstance(v, (tuple, list)) else _num(v)


def _rows(head: ClassificationHead, mc: str, b: str, ml: str) -> str:
    return {"multiclass": mc, "binary": b, "multilabel": ml}[head.task]


def native_loss(head: ClassificationHead, framework: str, sample_weight: str | None = None) -> NativeLoss:
    """``head``'s loss in ``framework`` (``"torch"`` or ``"keras"``) with the framework's own
    losses, or why it cannot be written so.  ``sample_weight``: ``None`` (no sample weights),
    ``"example"`` (one per example, shape ``(N,)``) or ``"label"`` (multilabel: one per example
    and label, ``(N, K)``)."""
    if framework not in _NAMES:
        raise ValueError(f"framework must be 'torch' or 'keras'; got {framework!r}.")
    if sample_weight not in _SAMPLE_WEIGHTS:
        raise ValueError(f"sample_weight must be None, 'example' or 'label'; got {sample_weight!r}.")
    if sample_weight == "label" and head.task != "multilabel":
        raise ValueError("sample_weight='label' (one weight per example and label) is for multilabel heads.")
    return (_torch if framework == "torch" else _keras)(head, sample_weight)


def native_lines(head: ClassificationHead, framework: str, in_features: int | None = None) -> dict[str, str]:
    """How to write ``head`` in ``framework`` with its own layers and losses (``framework`` key:
    the code, or the sentence saying no native loss gives the head's numbers) and with unihead
    (``"unihead"`` key)."""
    if framework not in _NAMES:
        return {"unihead": f"compiled = unihead.compile(unihead.{head!r}, backend)"}
    out = {framework: native_loss(head, framework).text(in_features)}
    if framework == "torch":
        d = in_features if in_features is not None else "in_features"
        out["unihead"] = (f"compiled = unihead.compile(unihead.{head!r}, \"torch\")\n"
                          f"layer = compiled.layer({d}); criterion = compiled.{LOSS_VERB}()")
    else:
        out["unihead"] = (f"compiled = unihead.compile(unihead.{head!r}, \"keras\")\n"
                          f"layer = compiled.layer(); model.compile(optimizer, loss=compiled.{LOSS_VERB}())")
    return out


class _Build:
    """Collects the code, the reasons no native loss matches, the caveats and the table rows."""

    def __init__(self, head: ClassificationHead, framework: str, sample_weight: str | None):
        self.head, self.framework, self.sw = head, framework, sample_weight
        self.code: list[str] = []
        self.problems: list[str] = []
        self.caveats: list[str] = []
        self.rows: list[str] = []

    def cannot(self, why: str, *rows: str) -> None:
        self.problems.append(why)
        self.rows.extend(rows)

    def done(self, labels: str) -> NativeLoss:
        rows = tuple(dict.fromkeys(r for r in self.rows if r))
        if self.problems:
            return NativeLoss(self.framework, self.head, self.sw, False, tuple(self.code), labels,
                              "; ".join(self.problems) + ".", rows)
        return NativeLoss(self.framework, self.head, self.sw, True, tuple(self.code), labels,
                          "; ".join(self.caveats) + ("." if self.caveats else ""), rows)


def _labels_text(head: ClassificationHead) -> str:
    k, fmt = head.num_outputs, head.label_format
    ignore = f" (or {head.ignore_index})" if head.ignore_index is not None else ""
    return {
        "sparse": f"integer class ids 0..{k - 1}{ignore}, shape (N,)",
        "binary": f"0/1 per example{ignore}, shape (N,)",
        "one_hot": f"one-hot rows, shape (N, {k})",
        "multi_hot": f"0/1 rows, shape (N, {k})",
        "probabilities": ("P(class 1) per example, shape (N,)" if head.task == "binary"
                          else f"rows of probabilities, shape (N, {k})"),
    }[fmt]


# ------------------------------------------------------------------------------ PyTorch
_NO_TORCH_FOCAL = ("PyTorch has no focal loss (torchvision.ops.sigmoid_focal_loss is a separate package, "
                   "for sigmoid heads, and applies the focal factor to the whole cross-entropy)")


def _softcap_and_z_loss(b: _Build, tanh: str) -> None:
    """The options outside the frameworks' losses: a soft-cap is a line before the loss (rows
    sc1, sc2); no native loss has a z-loss (rows zl1, zl2)."""
    h = b.head
    if h.logit_softcap is not None:
        s = _num(h.logit_softcap)
        b.code.append(f"logits = {s} * {tanh}(logits / {s})  # logit_softcap: the head reads capped logits")
        b.rows.append("sc1" if h.activation == "softmax" else "sc2")
    if h.z_loss:
        lse = "torch.logsumexp(logits, -1)" if b.framework == "torch" else "keras.ops.logsumexp(logits, axis=-1)"
        b.cannot(f"no {_NAMES[b.framework]} loss has PaLM's z-loss: add {_num(h.z_loss)} * {lse} ** 2 to "
                 f"each example's reduction='none' loss, then weight and reduce (docs/semantics.md §10, "
                 f"rows zl1 and zl2)", "zl1")


def _torch(h: ClassificationHead, sw: str | None) -> NativeLoss:
    b = _Build(h, "torch", sw)
    _softcap_and_z_loss(b, "torch.tanh")
    if h.focal_gamma:
        b.cannot(_NO_TORCH_FOCAL, _rows(h, "mc14", "b6", "ml7"))
    two_unit_ce = (h.task == "binary" and h.binary_units == 2 and h.label_format == "binary"
                   and h.pos_weight is None and not (h.label_smoothing and h.class_weights) and sw is None)
    if h.task == "multiclass" or two_unit_ce:
        _torch_cross_entropy(b)
    else:
        _torch_bce(b)
    return b.done(_labels_text(h))


def _torch_cross_entropy(b: _Build) -> None:
    h = b.head
    fmt, cw, eps = h.label_format, h.class_weights, h.label_smoothing
    if fmt == "binary":
        target = "labels.long()"
    elif fmt == "one_hot" and cw is not None:
        target = "labels.argmax(-1)"  # class weights weight examples: the id path does that
    else:
        target = "labels"
    ids = fmt in ("sparse", "binary") or target == "labels.argmax(-1)"
    b.rows.append({"sparse": "mc1", "binary": "b2", "one_hot": "mc9", "probabilities": "mc10"}[fmt])
    args = []
    if cw is not None:
        args.append(f"weight=torch.tensor({_nums(cw)})")
        if not ids:
            b.cannot("with probability targets, CrossEntropyLoss(weight=) weights each class's term inside the "
                     "sum and divides by N, while unihead weights each example by its label's class weights "
                     "and divides by their sum (docs/semantics.md §10, row mc11)", "mc11")
        elif eps:
            b.cannot("CrossEntropyLoss(weight=, label_smoothing=) also weights the smoothing term per class "
                     "((1-eps) w_y NLL + eps/K sum_c w_c (-log p_c)), while unihead weights each example by its "
                     "true class (docs/semantics.md §10, row mc8)", "mc8")
        else:
            b.rows.append("mc4")
    if h.ignore_index is not None:
        args.append(f"ignore_index={h.ignore_index}")
        b.rows.append("mc5" if cw is None else "mc6")
        if h.reduction == "mean":
            b.caveats.append(f"a batch whose labels are all {h.ignore_index} gives NaN in PyTorch and 0 in "
                             "unihead (docs/semantics.md §10, row mc15)")
    if eps:
        args.append(f"label_smoothing={_num(eps)}")
        b.rows.append("mc7")
    if h.reduction != "mean":
        args.append(f"reduction={h.reduction!r}")
    if b.sw is not None:
        b.cannot("CrossEntropyLoss takes no per-example weights (its weight= is per class): multiply its "
                 "reduction='none' losses by the weights and divide by their sum yourself "
                 "(docs/semantics.md §10, row mc12)", "mc12")
    b.code += [f"criterion = nn.CrossEntropyLoss({', '.join(args)})", f"loss = criterion(logits, {target})"]


def _torch_bce(b: _Build) -> None:
    h = b.head
    ml = h.task == "multilabel"
    k = h.num_outputs
    z = {1: "logits.squeeze(-1)", 2: "logits[..., 1] - logits[..., 0]"}.get(h.binary_units, "logits")
    if ml:
        z = "logits"
    y = "labels.to(logits.dtype)"
    weights: list[str] = []  # per-example (or per-element) weights known only with the labels
    if h.ignore_index is not None:
        b.code.append(f"keep = labels != {h.ignore_index}")
        y = "torch.where(keep, labels, 0).to(logits.dtype)"
        weights.append("keep.to(logits.dtype)")
    cw = h.class_weights
    if cw is not None and not ml:
        b.code.append(f"y = {y}")
        y = "y"
        weights.append(f"({_num(cw[0])} * (1 - y) + {_num(cw[1])} * y)")
        b.rows.append("b5")
    if b.sw == "example":
        weights.append("sample_weight[..., None]" if ml else "sample_weight")
    elif b.sw == "label":
        weights.append("sample_weight")
    if cw is not None and ml and weights:
        b.code.append(f"class_weights = torch.tensor({_nums(cw)})")
        weights.append("class_weights")
    target = y
    if h.label_smoothing:
        target = f"{y} * (1 - {_num(h.label_smoothing)}) + {_num(h.label_smoothing)} / 2"
        b.rows.append(_rows(h, "", "b4", "ml6"))
    pos = ""
    if h.pos_weight is not None:
        pos = f", pos_weight=torch.tensor({_nums(h.pos_weight)})"
        b.rows.append(_rows(h, "", "b3", "ml4"))
    if h.task == "binary" and h.binary_units == 2:
        b.rows.append("b2")  # the 2-unit head is the 1-unit head on z1 - z0 (docs/semantics.md §2)
    red = h.reduction
    # what turns PyTorch's per-element reduction into unihead's (multilabel: mean over the labels)
    after = {("sum", True): f" / {k}", ("none", True): ".mean(-1)"}.get((red, ml), "")
    if ml and red != "mean":
        b.rows.append("ml2" if red == "sum" else "ml3")
    if not weights:
        args = ""
        if cw is not None:  # multilabel class weights: a constant per label
            b.code.append(f"class_weights = torch.tensor({_nums(cw)})")
            # PyTorch's mean divides by N*K, unihead's by the sum of the weights
            args = "weight=class_weights / class_weights.mean()" if red == "mean" else "weight=class_weights"
            b.rows.append("ml5")
        args += pos if args else pos[2:]
        if red != "mean":
            args += f"{', ' if args else ''}reduction={red!r}"
        b.code += [f"criterion = nn.BCEWithLogitsLoss({args})", f"loss = criterion({z}, {target}){after}"]
        return
    b.code.append(f"weight = {' * '.join(weights)}")
    call = f"F.binary_cross_entropy_with_logits({z}, {target}, weight=weight{pos}"
    if red == "mean":
        total = "weight.expand_as(logits).sum()" if ml else "weight.sum()"
        b.code.append(f"loss = {call}, reduction='sum') / {total}")
        if h.ignore_index is not None or b.sw is not None:
            b.caveats.append("when every weight is 0 (every label ignored) this is 0/0 = NaN in PyTorch and 0 in "
                             "unihead")
    else:
        b.code.append(f"loss = {call}, reduction={red!r}){after}")


# ------------------------------------------------------------------------------ Keras
def _keras(h: ClassificationHead, sw: str | None) -> NativeLoss:
    b = _Build(h, "keras", sw)
    _softcap_and_z_loss(b, "keras.ops.tanh")
    if h.pos_weight is not None:
        b.cannot("Keras' losses have no pos_weight (docs/semantics.md §10, rows b3 and ml4)",
                 _rows(h, "", "b3", "ml4"))
    if h.activation == "softmax":
        _keras_categorical(b)
    else:
        _keras_binary(b)
    return b.done(_labels_text(h))


def _keras_reduction(b: _Build, args: list[str], weights: list[str]) -> None:
    red = b.head.reduction
    if red == "sum":
        args.append('reduction="sum"')
    elif red == "none":
        args.append("reduction=None")
    elif weights:  # Keras' default divides by N; unihead's mean by the sum of the weights
        args.append('reduction="mean_with_sample_weight"')


def _keras_call(b: _Build, cls: str, args: list[str], target: str, weights: list[str]) -> None:
    if b.sw == "example":
        weights.append("sample_weight")
    _keras_reduction(b, args, weights)
    b.code.append(f"loss_fn = keras.losses.{cls}({', '.join(args)})")
    sample = ""
    if weights:
        # keras.ops.multiply and where promote dtypes on every backend (TensorFlow's * does not)
        product = weights[-1]
        for w in reversed(weights[1:-1] if weights[0] == "keep" else weights[:-1]):
            product = f"keras.ops.multiply({w}, {product})"
        if weights[0] == "keep":  # ignored labels: weight 0
            product = f"keras.ops.where(keep, {product if len(weights) > 1 else '1.0'}, 0.0)"
        sample = f", sample_weight={product}"
    b.code.append(f"loss = loss_fn({target}, logits{sample})")


def _keras_categorical(b: _Build) -> None:
    h = b.head
    k, fmt, cw, eps, ii = h.num_outputs, h.label_format, h.class_weights, h.label_smoothing, h.ignore_index
    weights: list[str] = []
    binary = h.task == "binary"
    if fmt in ("sparse", "binary") and not eps and not h.focal_gamma:
        # integer ids: SparseCategoricalCrossentropy, with ignore_class
        y = 'keras.ops.cast(labels, "int32")' if binary else "labels"
        args = ["from_logits=True"]
        if ii is not None:
            args.append(f"ignore_class={ii}")
            b.rows.append(_rows(h, "mc5" if cw is None else "mc6", "mc5", ""))
        if cw is not None:
            if binary:
                weights.append(f"({_num(cw[0])} * (1 - labels) + {_num(cw[1])} * labels)")
            else:
                b.code.append(f"class_weights = keras.ops.convert_to_tensor({_nums(cw)})")
                ids = "labels" if ii is None else f"keras.ops.clip(labels, 0, {k - 1})"  # ignored: masked anyway
                weights.append(f"keras.ops.take(class_weights, {ids})")
            b.rows.append(_rows(h, "mc4", "b5", ""))
        b.rows.append(_rows(h, "mc1", "b2", ""))
        _keras_call(b, "SparseCategoricalCrossentropy", args, y, weights)
        return
    # rows of targets: CategoricalCrossentropy (label smoothing) or CategoricalFocalCrossentropy
    y = "labels"
    if ii is not None:  # no ignore_class on the categorical losses: a 0/1 weight
        b.code.append(f"keep = keras.ops.not_equal(labels, {ii})")
        b.code.append("y = keras.ops.where(keep, labels, 0)")
        weights.append("keep")
        y = "y"
    if fmt == "sparse":
        target = f"keras.ops.one_hot({y}, {k})"
    elif fmt == "binary":
        target = f'keras.ops.one_hot(keras.ops.cast({y}, "int32"), 2)'
    elif binary:  # probabilities of class 1
        target = "keras.ops.stack([1 - labels, labels], -1)"
    else:
        target = "labels"
    if cw is not None:
        if fmt == "sparse":
            b.code.append(f"class_weights = keras.ops.convert_to_tensor({_nums(cw)})")
            weights.append(f"keras.ops.take(class_weights, {y})")
        elif binary:
            weights.append(f"({_num(cw[0])} * (1 - {y}) + {_num(cw[1])} * {y})")
        else:  # one-hot or probability rows: the example's weight is its row times the class weights
            b.code.append(f"class_weights = keras.ops.convert_to_tensor({_nums(cw)})")
            weights.append("keras.ops.matmul(labels, class_weights)")
        b.rows.append(_rows(h, "mc11" if fmt == "probabilities" else "mc8" if eps else "mc4", "b5", ""))
    args = ["from_logits=True"]
    if h.focal_gamma:
        cls = "CategoricalFocalCrossentropy"
        args = ["alpha=1.0", f"gamma={_num(h.focal_gamma)}", *args]  # Keras' default alpha=0.25 scales the loss
        b.rows.append("mc14")
    else:
        cls = "CategoricalCrossentropy"
        b.rows.append("mc9" if fmt == "one_hot" else "mc10" if fmt == "probabilities" else "mc7")
    if eps:
        args.append(f"label_smoothing={_num(eps)}")
    _keras_call(b, cls, args, target, weights)


def _keras_binary(b: _Build) -> None:
    h = b.head
    ml = h.task == "multilabel"
    cw, eps, ii = h.class_weights, h.label_smoothing, h.ignore_index
    weights: list[str] = []
    y = "labels"
    if ii is not None:  # binary labels; BinaryCrossentropy has no ignore_class: a 0/1 weight
        b.code.append(f"keep = keras.ops.not_equal(labels, {ii})")
        b.code.append("y = keras.ops.where(keep, labels, 0)")
        weights.append("keep")
        y = "y"
    if cw is not None:
        if ml:
            b.cannot("BinaryCrossentropy averages over the labels before any weight applies, so per-label "
                     "class weights cannot be passed to it (docs/semantics.md §10, row ml5)", "ml5")
        else:
            weights.append(f"({_num(cw[0])} * (1 - {y}) + {_num(cw[1])} * {y})")
            b.rows.append("b5")
    if b.sw == "label":
        b.cannot("BinaryCrossentropy averages over the labels before any weight applies, so weights per label "
                 "(sample_weight of shape (N, K)) cannot be passed to it")
    target = y if ml else f"keras.ops.expand_dims({y}, -1)"
    args = ["from_logits=True"]
    if h.focal_gamma:
        cls = "BinaryFocalCrossentropy"
        args = [f"gamma={_num(h.focal_gamma)}", *args]
        b.rows.append(_rows(h, "", "b6", "ml7"))
        if eps or h.label_format == "probabilities":
            b.cannot("BinaryFocalCrossentropy multiplies the whole cross-entropy by (1 - p_t)^gamma, while "
                     "unihead weights each term by its own class's factor (docs/semantics.md §5): the two differ "
                     f"for {'smoothed' if eps else 'soft'} labels")
    else:
        cls = "BinaryCrossentropy"
        b.rows.append(_rows(h, "", "b1", "ml8" if h.label_format == "probabilities" else "ml1"))
    if eps:
        args.append(f"label_smoothing={_num(eps)}")
        b.rows.append(_rows(h, "", "b4", "ml6"))
    _keras_call(b, cls, args, target, weights)
