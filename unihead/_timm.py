"""timm models and losses, read for :func:`unihead.diagnose`, :func:`unihead.infer` and
:func:`unihead.port`.

A timm classifier is an ``nn.Module`` whose class lives in ``timm.models``; its head is what
``model.get_classifier()`` returns (an ``nn.Linear`` of ``model.num_classes`` outputs, or
``nn.Identity`` when the model was made with ``num_classes=0``: a feature extractor, refused).
timm's own losses (``timm.loss``) are read option by option from their source (timm 1.0):

* ``LabelSmoothingCrossEntropy(smoothing)``: ``(1-s)*nll + s*mean_k(-log p_k)`` on integer ids,
  i.e. the categorical smoothing ``t(1-s) + s/K`` of unihead (and of PyTorch's
  ``label_smoothing``); no ``ignore_index``, no weights, always the mean.
* ``SoftTargetCrossEntropy()``: ``sum_k -t_k log p_k``, mean over the batch, on probability rows
  (Mixup/CutMix targets): unihead's ``multiclass(K, label_format="probabilities")``.
* ``BinaryCrossEntropy(smoothing=0.1, target_threshold, weight, reduction, sum_classes,
  pos_weight, smooth_dense)``: integer ids are one-hot encoded over the *K outputs* with
  ``off = s/K``, ``on = 1 - s + s/K`` (not the symmetric ``y(1-s) + s/2`` of binary smoothing),
  dense targets are smoothed only with ``smooth_dense=True`` (towards 0.5), then
  ``target > target_threshold`` (if set) makes them 0/1 again, then
  ``F.binary_cross_entropy_with_logits`` over all ``N*K`` elements (or summed over the classes
  with ``sum_classes=True``).  Note the default ``smoothing=0.1``.

Every other ``timm.loss`` class is refused with the reason: unihead reads cross-entropies whose
numbers a :class:`~unihead.ClassificationHead` describes.  Nothing here imports timm: models and
losses are recognised by their class's module (unihead/_readers.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._readers import LossReading, Reading, _torch_reading
from .spec import ClassificationHead

__all__ = ["timm_reading", "timm_loss", "bce_targets", "timm_lines", "TIMM_LOSSES"]

#: The ``timm.loss`` classes unihead reads.
TIMM_LOSSES = ("LabelSmoothingCrossEntropy", "SoftTargetCrossEntropy", "BinaryCrossEntropy")


def _architecture(model: Any) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__.lower())


def timm_reading(model: Any, loss: Any) -> Reading:
    """The :class:`Reading` of a timm classifier: its ``get_classifier()`` ``nn.Linear``."""
    from torch import nn

    arch = _architecture(model)
    if not callable(getattr(model, "get_classifier", None)):
        return _torch_reading(model, loss)  # a timm layer, not a model: read as PyTorch
    clf = model.get_classifier()
    made = f"timm.create_model('{arch}', num_classes=K)"
    if isinstance(clf, (tuple, list)):
        raise ValueError(
            f"timm {arch} has {len(clf)} classifiers ({', '.join(type(c).__name__ for c in clf)}: a distilled "
            "model's class and distillation heads), and unihead reads one output head. Diagnose each one: "
            f"unihead.diagnose(model.get_classifier()[0], loss=...).")
    if isinstance(clf, nn.Identity) or getattr(model, "num_classes", None) == 0:
        raise ValueError(
            f"timm {arch} has no classifier: it was made with num_classes=0 (get_classifier() is "
            f"{type(clf).__name__}), so it outputs pooled features, not class scores, and there is no head "
            f"to read. Give it one: model.reset_classifier(K), or {made}.")
    if not isinstance(clf, nn.Linear):
        raise ValueError(
            f"timm {arch}'s classifier is {type(clf).__name__}, not an nn.Linear: unihead reads a linear output "
            "layer (weights (K, in_features) and a bias). Pass the model's last nn.Linear instead, or a "
            f"model whose get_classifier() is one ({made}).")
    r = _torch_reading(clf, loss)
    attr = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    where = f"timm {arch} ({attr}: {r.where})"
    return dataclasses.replace(r, where=where, library="timm",
                               options={"architecture": arch, "num_classes": getattr(model, "num_classes", None)})


def _tensor(x: Any) -> Any:
    if x is None:
        return None
    vals = tuple(float(v) for v in x.detach().cpu().reshape(-1))
    return vals[0] if len(vals) == 1 and x.dim() == 0 else vals


def timm_loss(loss: Any) -> LossReading:
    """A ``timm.loss`` object as a :class:`LossReading` (see the module docstring)."""
    cls = type(loss).__name__
    if cls == "LabelSmoothingCrossEntropy":
        s = float(loss.smoothing)
        return LossReading("sparse_ce", True, cls, label_smoothing=s, library="timm",
                           call=f"timm.loss.LabelSmoothingCrossEntropy(smoothing={s!r})")
    if cls == "SoftTargetCrossEntropy":
        return LossReading("categorical_ce", True, cls, library="timm", call="timm.loss.SoftTargetCrossEntropy()")
    if cls == "BinaryCrossEntropy":
        opts = {"smoothing": float(loss.smoothing), "target_threshold": loss.target_threshold,
                "sum_classes": bool(loss.sum_classes), "smooth_dense": bool(getattr(loss, "smooth_dense", False)),
                "one_hot_ids": True}
        args = [f"smoothing={opts['smoothing']!r}"]
        if loss.target_threshold is not None:
            args.append(f"target_threshold={loss.target_threshold!r}")
        if opts["sum_classes"]:
            args.append("sum_classes=True")
        if opts["smooth_dense"]:
            args.append("smooth_dense=True")
        pw = _tensor(loss.pos_weight)
        if pw is not None:
            args.append(f"pos_weight={pw!r}")
        if loss.weight is not None:
            args.append("weight=...")
        red = "mean" if opts["sum_classes"] else loss.reduction
        if red != "mean":
            args.append(f"reduction={red!r}")
        return LossReading("binary_ce", True, cls, class_weights=_tensor(loss.weight) if loss.weight is not None
                           and loss.weight.dim() > 0 else None, pos_weight=pw, reduction=red, library="timm",
                           call=f"timm.loss.BinaryCrossEntropy({', '.join(args)})", options=opts)
    raise ValueError(
        f"unihead does not read timm.loss.{cls}: it reads timm's cross-entropies "
        f"({', '.join(TIMM_LOSSES)}) and PyTorch's criteria, the losses whose numbers a ClassificationHead "
        f"describes. {cls} is another objective; diagnose the model without it (loss=None), or with the "
        "cross-entropy it stands in for.")


def bce_targets(options: dict[str, Any], num_outputs: int, ids: bool) -> tuple[float, float]:
    """``(off, on)``: the targets timm's ``BinaryCrossEntropy`` trains a 0 and a 1 towards, for
    integer ids (``ids=True``: one-hot encoded over ``num_outputs``) or dense 0/1 targets."""
    s = options["smoothing"]
    if ids:
        off = s / num_outputs
        on = 1.0 - s + off
    elif options["smooth_dense"] and s:
        off, on = 0.5 * s, 1.0 - 0.5 * s
    else:
        off, on = 0.0, 1.0
    t = options["target_threshold"]
    if t is not None:
        off, on = float(off > t), float(on > t)
    return off, on


def _num(v: Any) -> str:
    return repr(float(v)) if not isinstance(v, tuple) else "[" + ", ".join(repr(float(x)) for x in v) + "]"


def timm_lines(head: ClassificationHead, architecture: str | None) -> str:
    """``head`` written with timm: the model (``timm.create_model(..., num_classes=K)``) and the
    loss (timm's, or PyTorch's where timm uses it), or the sentence saying no timm loss gives the
    head's numbers (then the PyTorch lines of the same finding are the way)."""
    arch = architecture or "ARCHITECTURE"
    h = head
    model = f"model = timm.create_model('{arch}', num_classes={h.num_outputs})  # logits"
    none = "no timm loss gives this head's numbers ({}); use the PyTorch lines (or unihead's loss)."
    if h.focal_gamma or h.class_weights is not None or h.ignore_index is not None or h.reduction != "mean":
        what = [n for n, on in (("focal_gamma", h.focal_gamma), ("class_weights", h.class_weights is not None),
                                ("ignore_index", h.ignore_index is not None),
                                (f"reduction={h.reduction!r}", h.reduction != "mean")) if on]
        return none.format("timm's losses have no " + ", ".join(what))
    s = h.label_smoothing
    categorical = h.task == "multiclass" or h.task == "binary" and h.binary_units == 2
    if categorical and h.label_format in ("sparse", "binary"):
        loss = (f"loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing={s!r})" if s
                else "loss_fn = nn.CrossEntropyLoss()  # timm's train.py uses it without smoothing")
        return f"{model}\n{loss}\nloss = loss_fn(logits, labels)  # labels: integer class ids, shape (N,)"
    if categorical:
        if s:
            return none.format("SoftTargetCrossEntropy does not smooth; smooth the rows before it (Mixup does)")
        return (f"{model}\nloss_fn = timm.loss.SoftTargetCrossEntropy()\n"
                "loss = loss_fn(logits, labels)  # labels: probability rows, shape (N, K)")
    args = [f"smoothing={s!r}"] + (["smooth_dense=True"] if s else [])
    if h.pos_weight is not None:
        args.append(f"pos_weight={_num(h.pos_weight)}")
    if h.label_format == "probabilities" and s:
        return none.format("its smoothing applies to probability targets only with smooth_dense=True, "
                           "which moves them towards 0.5 like unihead's")
    if h.task == "binary":
        return (f"{model}\nloss_fn = timm.loss.BinaryCrossEntropy({', '.join(args)})\n"
                "loss = loss_fn(logits, labels.to(logits.dtype).unsqueeze(-1))  # labels: 0/1 as a float column (N, 1)")
    return (f"{model}\nloss_fn = timm.loss.BinaryCrossEntropy({', '.join(args)})\n"
            "loss = loss_fn(logits, labels.to(logits.dtype))  # labels: 0/1 rows, shape (N, K)")
