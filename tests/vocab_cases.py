"""The cases of the class-sharded loss tests (tests/test_vocab_parallel.py on PyTorch,
tests/test_vocab_parallel_jax.py on JAX): multiclass sparse heads with every option, their data,
uneven class shards, and the tolerance table of docs/semantics.md §11.  No framework imported."""

from __future__ import annotations

import numpy as np

import unihead
from unihead import ClassificationHead as H

V, N, D = 40, 24, 5  # 40 classes: 8 devices of 5 (JAX), uneven shards on PyTorch
BOUNDS = {2: (0, 15, 40), 4: (0, 5, 14, 30, 40), 3: (0, 1, 20, 40)}

CASES: dict[str, dict] = {
    "plain": dict(task="multiclass", num_classes=V),
    "smooth_ignore_cw": dict(task="multiclass", num_classes=V, label_smoothing=0.1, ignore_index=-100,
                             class_weights=tuple(np.round(np.linspace(0.5, 2.0, V), 3))),
    "focal_sw": dict(task="multiclass", num_classes=V, focal_gamma=2.0),
    "sum": dict(task="multiclass", num_classes=V, reduction="sum", label_smoothing=0.05),
    "none": dict(task="multiclass", num_classes=V, reduction="none", ignore_index=3),
    # z_loss and logit_softcap (docs/semantics.md §5): every worker caps its own logits, the z-loss
    # reads lse from the reduced statistics
    "zloss_cap_smooth": dict(task="multiclass", num_classes=V, z_loss=1e-2, logit_softcap=8.0,
                             label_smoothing=0.1, ignore_index=-100,
                             class_weights=tuple(np.round(np.linspace(0.5, 2.0, V), 3))),
    "zloss_cap_focal_none": dict(task="multiclass", num_classes=V, z_loss=1e-3, logit_softcap=8.0,
                                 focal_gamma=2.0, reduction="none", ignore_index=3),
}


def data(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits (N, V) float32 (a few confident rows), labels, sample weights (or None)."""
    rng = np.random.default_rng(seed + len(name))
    z = (rng.normal(size=(N, V)) * 3).astype(np.float32)
    y = rng.integers(0, V, N)
    z[:4, :] -= 40.0
    z[np.arange(4), y[:4]] += 70.0  # confident rows: tiny losses
    spec = CASES[name]
    if spec.get("ignore_index") is not None:
        y[[5, 9]] = spec["ignore_index"]
    sw = None
    if name in ("focal_sw", "sum", "zloss_cap_focal_none"):
        sw = rng.uniform(0.25, 2.0, N).astype(np.float32)
        sw[7] = 0.0
    return z, y, sw


def tolerance(name: str, column: str) -> float:
    base = 6.0 if column == "grad" else 4.0
    return base + 2.0 * CASES[name].get("focal_gamma", 0.0)




def reference(name: str, z: np.ndarray, y: np.ndarray, sw, normalizer: float | None = None) -> dict:
    """The unsharded float64 loss and logits' gradient (NumPy's dense path on float64 logits,
    exact to float32's resolution), and the gradient's scale ``max(|g|, scale * p)`` (the larger
    of its two terms; with a z-loss ``c``, ``scale * p * max(1, 2 c |lse|)``; with a soft-cap,
    ``p`` of the capped logits and the scale times the cap's slope)."""
    head = H(**CASES[name])
    c = unihead.compile(head, "numpy")
    z64 = z.astype(np.float64)
    sw64 = None if sw is None else sw.astype(np.float64)
    if normalizer is not None:
        summed = unihead.compile(H(**dict(CASES[name], reduction="sum")), "numpy")
        loss, g = summed.loss_and_gradient(z64, y, sw64)
        loss, g = loss / normalizer, g / normalizer
    else:
        loss, g = c.loss_and_gradient(z64, y, sw64)
    zc, slope = z64, 1.0
    if head.logit_softcap is not None:
        s = head.logit_softcap
        zc, slope = s * np.tanh(z64 / s), 1.0 / np.cosh(z64 / s) ** 2
    m = zc.max(-1, keepdims=True)
    p = np.exp(zc - m)
    lse = m + np.log(p.sum(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p = p * np.maximum(1.0, 2.0 * head.z_loss * np.abs(lse)) * slope
    valid = np.ones(len(y), bool) if head.ignore_index is None else (y != head.ignore_index)
    w = np.ones(len(y)) if sw is None else sw64
    cw = np.ones(len(y)) if head.class_weights is None else np.asarray(head.class_weights)[np.where(valid, y, 0)]
    r = np.where(valid, w * cw, 0.0)
    if normalizer is not None:
        r = r / normalizer
    elif head.reduction == "mean":
        r = r / r.sum()
    return {"loss": np.asarray(loss), "grad": g, "scale": np.maximum(np.abs(g), p * r[:, None])}
