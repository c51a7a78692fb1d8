"""Deterministic test cases shared by the tests: heads covering every task and option, and logits
in the regimes where naive formulas fail."""

from __future__ import annotations

import numpy as np

from unihead import ClassificationHead as H

# Every task x label format x option, each at least once (reductions are covered by the
# per-example values and the reduced loss of each head).
HEADS = [
    H.multiclass(4),
    H.multiclass(5, reduction="sum"),
    H.multiclass(10, label_smoothing=0.1),
    H.multiclass(4, class_weights=[0.5, 2.0, 1.0, 3.0]),
    H.multiclass(4, ignore_index=-100),
    H.multiclass(4, focal_gamma=2.0),
    H.multiclass(6, focal_gamma=0.5, label_smoothing=0.2, class_weights=[1, 2, 3, 4, 5, 6]),
    H.multiclass(5, label_format="one_hot", reduction="none"),
    H.multiclass(5, label_format="probabilities"),
    H.multiclass(5, label_format="probabilities", label_smoothing=0.3, focal_gamma=1.0),
    H.binary(),
    H.binary(binary_units=2),
    H.binary(label_smoothing=0.2, pos_weight=3.0),
    H.binary(binary_units=2, label_smoothing=0.2, pos_weight=3.0),
    H.binary(class_weights=[0.25, 0.75], focal_gamma=2.0),
    H.binary(binary_units=2, class_weights=[0.25, 0.75], focal_gamma=2.0, reduction="sum"),
    H.binary(label_format="probabilities", focal_gamma=1.5),
    H.binary(binary_units=2, label_format="probabilities", label_smoothing=0.1),
    H.binary(ignore_index=-1, reduction="none"),
    H.multilabel(6),
    H.multilabel(6, label_smoothing=0.1, focal_gamma=1.5),
    H.multilabel(4, pos_weight=[1.0, 2.0, 0.5, 4.0], class_weights=[1, 0, 2, 1], reduction="sum"),
    H.multilabel(4, label_format="probabilities", reduction="none"),
]


def extreme_logits(k: int, rng: np.random.Generator) -> np.ndarray:
    """Rows in the regimes of the foundation issue: ordinary; large scale (+-30, +-1e4); a
    confident correct class 0 at gaps 30, 89 and 104; ties; large offsets.  float64 values."""
    rows = [
        rng.normal(size=k) * 3,
        rng.uniform(-30, 30, size=k),
        rng.uniform(-1e4, 1e4, size=k),
    ]
    for gap, offset in ((30.0, 0.0), (89.0, 0.0), (104.0, -50.0), (35.0, 1e4), (20.0, -1e4)):
        r = rng.normal(size=k) + offset
        r[0] = r.max() + gap
        rows.append(r)
    rows.append(np.zeros(k))  # all tied
    r = np.full(k, 7.25)
    r[1:] = 7.25 - 89  # one class 89 above the rest, all others tied
    rows.append(r)
    if k > 2:
        r = rng.normal(size=k)
        r[:2] = r.max() + 5  # two tied maxima
        rows.append(r)
    return np.array(rows)


def labels_for(head, n: int, rng: np.random.Generator) -> np.ndarray:
    """Labels of the head's format: the confident rows' class 0 is the true class for half of
    them (true loss tiny), the other half the worst class (large loss)."""
    k = head.num_classes
    fmt = head.label_format
    if fmt == "sparse":
        y = np.where(np.arange(n) % 2 == 0, 0, rng.integers(0, k, n))
        if head.ignore_index is not None:
            y[3] = head.ignore_index
        return y
    if fmt == "one_hot":
        return np.eye(k)[np.where(np.arange(n) % 2 == 0, 0, rng.integers(0, k, n))]
    if fmt == "binary":
        y = (np.arange(n) % 2 == 0).astype(np.float64)
        if head.ignore_index is not None:
            y[3] = head.ignore_index
        return y
    if fmt == "multi_hot":
        y = (rng.uniform(size=(n, k)) < 0.5).astype(np.float64)
        y[::2, 0] = 1
        return y
    # probabilities
    if head.task == "multiclass":
        return rng.dirichlet(np.ones(k), size=n)
    shape = (n,) if head.task == "binary" else (n, k)
    return rng.uniform(size=shape)


def sample_weights_for(head, n: int, rng: np.random.Generator) -> np.ndarray:
    shape = (n, head.num_classes) if head.task == "multilabel" else (n,)
    w = rng.uniform(0.5, 2.0, size=shape)
    w.reshape(-1)[1] = 0.0  # a zero weight
    return w
