"""The decisions of docs/semantics.md, each checked on values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H


def c(head):
    return unihead.compile(head, "numpy")


def lse(v):
    m = max(v)
    return m + math.log(sum(math.exp(x - m) for x in v))


Z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, -4.0]])
Y = np.array([1, 2, 0])


def per_example_ce(z, y, eps=0.0):
    out = []
    for row, t in zip(z, y):
        l = lse(row)
        k = len(row)
        out.append(sum(((1 - eps) * (c == t) + eps / k) * (l - row[c]) for c in range(k)))
    return np.array(out)


def test_multiclass_cross_entropy_and_reductions():
    ce = per_example_ce(Z, Y)
    np.testing.assert_allclose(c(H.multiclass(3)).loss(Z, Y), ce.mean(), rtol=1e-14)
    np.testing.assert_allclose(c(H.multiclass(3, reduction="sum")).loss(Z, Y), ce.sum(), rtol=1e-14)
    np.testing.assert_allclose(c(H.multiclass(3, reduction="none")).loss(Z, Y), ce, rtol=1e-14)


def test_label_smoothing_is_eps_over_k():
    ce = per_example_ce(Z, Y, eps=0.3)
    np.testing.assert_allclose(c(H.multiclass(3, label_smoothing=0.3)).loss(Z, Y), ce.mean(), rtol=1e-14)


def test_binary_smoothing_is_eps_over_two_for_both_unit_counts():
    z = np.array([0.7, -2.0])
    y = np.array([1.0, 0.0])
    eps = 0.2
    q = y * (1 - eps) + eps / 2
    want = np.mean(q * np.log1p(np.exp(-z)) + (1 - q) * np.log1p(np.exp(z)))
    np.testing.assert_allclose(c(H.binary(label_smoothing=eps)).loss(z[:, None], y), want, rtol=1e-14)
    z2 = np.stack([np.zeros_like(z), z], -1)
    np.testing.assert_allclose(c(H.binary(binary_units=2, label_smoothing=eps)).loss(z2, y), want, rtol=1e-14)


def test_class_weights_weight_the_example_and_the_mean_divides_by_the_weights():
    w = [0.5, 2.0, 3.0]
    ce = per_example_ce(Z, Y, eps=0.1)
    wy = np.array(w)[Y]
    head = H.multiclass(3, class_weights=w, label_smoothing=0.1)
    np.testing.assert_allclose(c(head).loss(Z, Y), (wy * ce).sum() / wy.sum(), rtol=1e-14)
    np.testing.assert_allclose(c(head.replace(reduction="sum")).loss(Z, Y), (wy * ce).sum(), rtol=1e-14)
    np.testing.assert_allclose(c(head.replace(reduction="none")).loss(Z, Y), wy * ce, rtol=1e-14)
    # soft labels: the class weight is the expected class weight under the (unsmoothed) target
    t = np.array([[0.2, 0.8, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    soft = H.multiclass(3, class_weights=w, label_format="probabilities", reduction="none")
    ce_soft = np.array([sum(tc * (lse(r) - r[j]) for j, tc in enumerate(row)) for r, row in zip(Z, t)])
    np.testing.assert_allclose(c(soft).loss(Z, t), (t @ np.array(w)) * ce_soft, rtol=1e-14)


def test_sample_weights_and_the_weighted_mean():
    s = np.array([1.0, 0.0, 3.0])
    ce = per_example_ce(Z, Y)
    np.testing.assert_allclose(c(H.multiclass(3)).loss(Z, Y, s), (s * ce).sum() / s.sum(), rtol=1e-14)
    # sum(none) == sum; mean == sum / sum(w)
    n = c(H.multiclass(3, reduction="none")).loss(Z, Y, s)
    np.testing.assert_allclose(n.sum(), c(H.multiclass(3, reduction="sum")).loss(Z, Y, s), rtol=1e-14)
    # a leading-prefix sample weight broadcasts over the rest
    z3 = np.stack([Z, Z[::-1]])  # (2, 3, 3)
    y3 = np.stack([Y, Y[::-1]])
    a = c(H.multiclass(3)).loss(z3, y3, np.array([1.0, 2.0]))
    b = c(H.multiclass(3)).loss(z3, y3, np.array([[1.0] * 3, [2.0] * 3]))
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_ignore_index_and_the_all_ignored_batch():
    y = np.array([1, -100, 0])
    head = H.multiclass(3, ignore_index=-100)
    ce = per_example_ce(Z, np.array([1, 0, 0]))
    np.testing.assert_allclose(c(head).loss(Z, y), (ce[0] + ce[2]) / 2, rtol=1e-14)
    loss, grad = c(head).loss_and_gradient(Z, y)
    assert np.all(grad[1] == 0)
    # every example ignored: loss 0 and gradient 0, not NaN
    loss, grad = c(head).loss_and_gradient(Z, np.full(3, -100))
    assert loss == 0 and np.all(grad == 0)
    loss, grad = c(H.multiclass(3)).loss_and_gradient(Z, Y, np.zeros(3))
    assert loss == 0 and np.all(grad == 0)
    # a real class can be the ignored one (Keras' ignore_class)
    np.testing.assert_allclose(
        c(H.multiclass(3, ignore_index=0)).loss(Z, Y), per_example_ce(Z, Y)[:2].mean(), rtol=1e-14)


def test_zero_weight_examples_contribute_exactly_zero_whatever_their_logits():
    z = Z.copy()
    z[1] = [np.nan, np.inf, -np.inf]
    head = H.multiclass(3, ignore_index=-100)
    loss, grad = c(head).loss_and_gradient(z, np.array([1, -100, 0]))
    ce = per_example_ce(Z, np.array([1, 0, 0]))
    np.testing.assert_allclose(loss, (ce[0] + ce[2]) / 2, rtol=1e-14)
    assert np.all(grad[1] == 0) and np.all(np.isfinite(grad))
    z[1] = -np.inf  # an all-masked padding row
    loss, grad = c(H.multiclass(3)).loss_and_gradient(z, Y, np.array([1.0, 0.0, 1.0]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and np.all(grad[1] == 0)


def test_masked_classes():
    z = np.array([[1.0, -np.inf, 0.0], [-np.inf, 2.0, -np.inf]])
    head = c(H.multiclass(3, reduction="none"))
    p = head.probabilities(z)
    assert p[0, 1] == 0 and p[1, 0] == 0 and p[1, 1] == 1
    np.testing.assert_allclose(p[0], [math.exp(1) / (math.exp(1) + 1), 0, 1 / (math.exp(1) + 1)], rtol=1e-14)
    assert head.log_probabilities(z)[0, 1] == -np.inf
    loss, grad = head.loss_and_gradient(z, np.array([0, 1]))
    np.testing.assert_allclose(loss, [math.log1p(math.exp(-1)), 0.0], rtol=1e-14, atol=0)
    assert np.all(np.isfinite(grad)) and grad[0, 1] == 0
    # target mass on an impossible class: +inf (and with smoothing every class has mass)
    assert np.isinf(head.loss(z, np.array([1, 1]))[0])
    smooth = c(H.multiclass(3, reduction="none", label_smoothing=0.1))
    assert np.all(np.isinf(smooth.loss(z, np.array([0, 1]))))


def test_non_finite_softmax_rows_are_nan_and_stay_in_their_row():
    z = np.array([[1.0, np.inf, 0.0], [0.0, 1.0, 2.0], [np.nan, 0.0, 0.0], [-np.inf] * 3])
    head = c(H.multiclass(3, reduction="none"))
    loss = head.loss(z, np.array([0, 2, 1, 0]))
    assert np.isnan(loss[0]) and np.isfinite(loss[1]) and np.isnan(loss[2]) and np.isnan(loss[3])
    assert np.all(np.isnan(head.probabilities(z)[[0, 2, 3]]))
    assert np.isnan(c(H.multiclass(3)).loss(z, np.array([0, 2, 1, 0])))


def test_sigmoid_infinities_are_limits():
    z = np.array([[np.inf], [-np.inf], [np.inf], [-np.inf]])
    y = np.array([1.0, 0.0, 0.0, 1.0])
    head = c(H.binary(reduction="none"))
    np.testing.assert_array_equal(head.probabilities(z)[:, 0], [1, 0, 1, 0])
    np.testing.assert_array_equal(head.loss(z, y), [0, 0, np.inf, np.inf])
    _, grad = head.loss_and_gradient(z[:2], y[:2])
    np.testing.assert_array_equal(grad, [[0], [0]])


def test_multilabel_mean_is_the_mean_over_all_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 3))
    q = (rng.uniform(size=(4, 3)) < 0.5).astype(float)
    el = q * np.log1p(np.exp(-z)) + (1 - q) * np.log1p(np.exp(z))
    np.testing.assert_allclose(c(H.multilabel(3)).loss(z, q), el.mean(), rtol=1e-14)
    np.testing.assert_allclose(c(H.multilabel(3, reduction="none")).loss(z, q), el.mean(-1), rtol=1e-14)
    np.testing.assert_allclose(c(H.multilabel(3, reduction="sum")).loss(z, q), el.mean(-1).sum(), rtol=1e-14)
    # per-label weights: a 0 masks a missing label
    w = np.ones((4, 3))
    w[0, 1] = 0
    np.testing.assert_allclose(c(H.multilabel(3)).loss(z, q, w), (w * el).sum() / w.sum(), rtol=1e-14)
    cw = np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(
        c(H.multilabel(3, class_weights=cw)).loss(z, q), (cw * el).sum() / (4 * cw.sum()), rtol=1e-14)
    pw = np.array([3.0, 1.0, 0.5])
    el_pw = pw * q * np.log1p(np.exp(-z)) + (1 - q) * np.log1p(np.exp(z))
    np.testing.assert_allclose(c(H.multilabel(3, pos_weight=pw)).loss(z, q), el_pw.mean(), rtol=1e-14)


def test_focal_loss_formula():
    z = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 1.0]])
    y = np.array([0, 2])
    g = 2.0
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.array([-(1 - p[i, t]) ** g * np.log(p[i, t]) for i, t in enumerate(y)])
    np.testing.assert_allclose(c(H.multiclass(3, focal_gamma=g, reduction="none")).loss(z, y), want, rtol=1e-14)
    # sigmoid: per term; alpha as class weights [1 - a, a]
    zb = np.array([1.5, -0.3, 2.0])
    yb = np.array([1.0, 0.0, 0.0])
    pb = 1 / (1 + np.exp(-zb))
    a = 0.25
    fl = np.where(yb == 1, -(1 - pb) ** g * np.log(pb), -(pb**g) * np.log(1 - pb))
    at = np.where(yb == 1, a, 1 - a)
    head = H.binary(focal_gamma=g, class_weights=[1 - a, a], reduction="sum")
    np.testing.assert_allclose(c(head).loss(zb[:, None], yb), (at * fl).sum(), rtol=1e-14)


def test_predictions():
    assert list(c(H.multiclass(3)).predict(np.array([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]]))) == [1, 0]
    b = c(H.binary(threshold=0.7))
    cut = math.log(0.7 / 0.3)
    assert list(b.predict(np.array([[cut - 1e-9], [cut + 1e-9], [0.0]]))) == [0, 1, 0]
    b2 = c(H.binary(binary_units=2))
    assert list(b2.predict(np.array([[0.0, 0.0], [1.0, 1.5], [2.0, -1.0]]))) == [0, 1, 0]
    ml = c(H.multilabel(3, threshold=0.5)).predict(np.array([[0.1, -0.1, 0.0]]))
    assert ml.tolist() == [[1, 0, 0]] and ml.dtype.kind == "i"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_are_computed_in_float32(dtype):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy; a dependency of JAX)

    z32 = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
    z = z32.astype(dtype)
    head = c(H.multiclass(3))
    loss, grad = head.loss_and_gradient(z, np.array([1, 2]))
    assert loss.dtype == np.float32 and head.probabilities(z).dtype == np.float32
    np.testing.assert_array_equal(loss, head.loss(z.astype(np.float32), np.array([1, 2])))


def test_gradient_upstream_for_none():
    head = c(H.multiclass(3, reduction="none"))
    _, g1 = head.loss_and_gradient(Z, Y)
    _, g2 = head.loss_and_gradient(Z, Y, upstream=np.array([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(g2, g1 * np.array([[1.0], [0.0], [2.0]]), rtol=1e-14)
    # without focal loss the gradient is p - t'
    p = head.probabilities(Z)
    np.testing.assert_allclose(g1, p - np.eye(3)[Y], rtol=1e-14, atol=1e-16)


def test_leading_dimensions():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2, 5, 4))
    y = rng.integers(0, 4, size=(2, 5))
    a = c(H.multiclass(4, reduction="none")).loss(z, y)
    b = c(H.multiclass(4, reduction="none")).loss(z.reshape(10, 4), y.reshape(10))
    assert a.shape == (2, 5)
    np.testing.assert_array_equal(a.reshape(10), b)
