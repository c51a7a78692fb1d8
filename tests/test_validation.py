"""Bad input: every error names the argument, the offending value and index, and the fix."""

from __future__ import annotations

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

Z4 = np.zeros((5, 4), np.float32)
Z1 = np.zeros((5, 1), np.float32)
Z2 = np.zeros((5, 2), np.float32)


def loss(head, z, y, w=None, **kw):
    return unihead.compile(head, "numpy", **kw).loss(z, y, w)


@pytest.mark.parametrize(
    "head, z, y, w, exc, message",
    [
        # logits
        (H.multiclass(4), np.zeros((5, 4), np.int64), np.zeros(5, int), None, TypeError,
         "logits must be a floating-point array"),
        (H.multiclass(4), np.zeros((5, 3), np.float32), np.zeros(5, int), None, ValueError,
         r"logits must have shape \(\.\.\., 4\).*got shape \(5, 3\)"),
        (H.multiclass(4), np.float32(0.0), np.zeros(5, int), None, ValueError, "got shape ()"),
        (H.binary(), np.zeros(5, np.float32), np.zeros(5), None, ValueError,
         r"trailing axis of size 1.*logits\[\.\.\., None\]"),
        (H.binary(), Z2, np.zeros(5), None, ValueError, "binary_units=2 for two logits"),
        (H.binary(binary_units=2), Z1, np.zeros(5), None, ValueError, "single logit needs binary_units=1"),
        # sparse labels
        (H.multiclass(4), Z4, np.array([0, 1, 4, 2, 0]), None, ValueError,
         r"labels\[2\] = 4 is not a class id: ids must be in \[0, 4\) for num_classes=4"),
        (H.multiclass(4), Z4, np.array([0, -1, 3, 2, 0]), None, ValueError,
         r"labels\[1\] = -1 is not a class id.*set ignore_index"),
        (H.multiclass(4, ignore_index=-100), Z4, np.array([0, -100, -1, 2, 0]), None, ValueError,
         r"labels\[2\] = -1.*or ignore_index=-100"),
        (H.multiclass(4), Z4, np.array([0.0, 1.0, 2.0, 3.0, 0.0]), None, TypeError,
         r"integer class ids for label_format='sparse'; got dtype float64.*astype\(int\)"),
        (H.multiclass(4), Z4, np.eye(4)[[0, 1, 2, 3, 0]], None, ValueError,
         r"labels must have shape \(5,\).*got \(5, 4\).*label_format='one_hot'"),
        (H.multiclass(4), Z4, np.zeros(6, int), None, ValueError, r"shape \(5,\).*got \(6,\)"),
        (H.multiclass(4), Z4, np.array(["a"] * 5), None, TypeError, "labels must be a numeric array"),
        (H.multiclass(4), np.zeros((2, 3, 4), np.float32), np.array([[0, 1, 2], [3, 9, 0]]), None,
         ValueError, r"labels\[1, 1\] = 9"),
        # binary labels
        (H.binary(), Z1, np.array([0, 1, 3, 1, 0]), None, ValueError,
         r"labels\[2\] = 3(\.0)? is not a binary label.*negative.*multiclass\(num_classes\)"),
        (H.binary(), Z1, np.array([0, 1, 0.5, 1, 0]), None, ValueError,
         r"labels\[2\] = 0\.5 is not a binary label.*label_format='probabilities'"),
        (H.binary(), Z1, np.array([0, 1, -1, 1, 0]), None, ValueError, r"labels\[2\] = -1"),
        (H.binary(), Z1, np.array([0, 1, np.nan, 1, 0]), None, ValueError, r"labels\[2\] is NaN"),
        (H.binary(binary_units=2), Z2, np.eye(2)[[0, 1, 0, 1, 0]], None, ValueError,
         r"one 0/1 label per example, also with binary_units=2.*argmax"),
        (H.binary(), Z1, np.zeros((5, 3)), None, ValueError, r"shape \(5,\).*or \(5, 1\)"),
        # one-hot
        (H.multiclass(4, label_format="one_hot"), Z4, np.array([[1, 0, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]), None,
         ValueError, r"labels\[1\] = \[1, 1, 0, 1\] is not one-hot.*found 3.*multilabel\(4\)"),
        (H.multiclass(4, label_format="one_hot"), Z4, np.zeros((5, 4)), None, ValueError,
         r"labels\[0\] = .* is not one-hot.*found 0"),
        (H.multiclass(4, label_format="one_hot"), Z4, np.full((5, 4), 0.25), None, ValueError,
         r"labels\[0, 0\] = 0\.25 is not 0 or 1.*'probabilities'"),
        (H.multiclass(4, label_format="one_hot"), Z4, np.array([0, 1, 2, 3, 0]), None, ValueError,
         r"shape \(5, 4\).*integer class ids.*label_format='sparse'"),
        # probabilities
        (H.multiclass(4, label_format="probabilities"), Z4, np.full((5, 4), 0.3), None, ValueError,
         r"labels\[0\] sums to 1\.2.*not 1.*multilabel\(4, label_format='probabilities'\)"),
        (H.multiclass(4, label_format="probabilities"), Z4, np.tile([1.5, -0.5, 0, 0], (5, 1)), None,
         ValueError, r"labels\[0, 0\] = 1\.5 is not a probability"),
        (H.multiclass(4, label_format="probabilities"), Z4, np.eye(4, dtype=int)[[0, 1, 2, 3, 0]], None,
         TypeError, "floating-point for label_format='probabilities'"),
        (H.multiclass(4, label_format="probabilities"), Z4, np.where(np.eye(4)[[0, 1, 2, 3, 0]] > 0, np.nan, 0), None,
         ValueError, r"labels\[0, 0\] is NaN"),
        (H.binary(label_format="probabilities"), Z1, np.array([0, 0.3, 1.2, 1, 0]), None, ValueError,
         r"labels\[2\] = 1\.2 is not a probability"),
        (H.multilabel(4, label_format="probabilities"), Z4, np.full((5, 4), -0.1), None, ValueError,
         r"labels\[0, 0\] = -0\.1 is not a probability"),
        # multi-hot
        (H.multilabel(4), Z4, np.full((5, 4), 2.0), None, ValueError,
         r"labels\[0, 0\] = 2\.0 is not 0 or 1 \(label_format='multi_hot'\)"),
        (H.multilabel(4), Z4, np.zeros(5, int), None, ValueError,
         r"shape \(5, 4\).*one 0/1 column per label"),
        # sample weights
        (H.multiclass(4), Z4, np.zeros(5, int), np.ones(4), ValueError,
         r"sample_weight must have shape \(5,\).*got \(4,\)"),
        (H.multiclass(4), Z4, np.zeros(5, int), np.ones((5, 4)), ValueError, r"got \(5, 4\)"),
        (H.multiclass(4), Z4, np.zeros(5, int), np.array([1, 1, -1.0, 1, 1]), ValueError,
         r"sample_weight\[2\] = -1\.0: weights must be finite and >= 0"),
        (H.multiclass(4), Z4, np.zeros(5, int), np.array([1, 1, np.nan, 1, 1]), ValueError,
         r"sample_weight\[2\] = NaN"),
        (H.multiclass(4), Z4, np.zeros(5, int), np.array([1, 1, np.inf, 1, 1]), ValueError,
         r"sample_weight\[2\] = inf"),
        (H.multiclass(4), Z4, np.zeros(5, int), np.array(["x"] * 5), TypeError,
         "sample_weight must be a numeric array"),
        (H.multilabel(4), Z4, np.zeros((5, 4)), np.ones((5, 3)), ValueError,
         r"or up to \(5, 4\) for one weight per label"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(head, z, y, w, exc, message):
    with pytest.raises(exc, match=message):
        loss(head, z, y, w)


def test_valid_shapes_are_accepted():
    # binary labels with a trailing axis of 1; sample weights broadcast from a leading prefix
    assert np.isfinite(loss(H.binary(), Z1, np.zeros((5, 1))))
    z = np.zeros((2, 3, 4), np.float32)
    y = np.zeros((2, 3), int)
    a = loss(H.multiclass(4), z, y, np.array([1.0, 3.0]))
    b = loss(H.multiclass(4), z, y, np.array([[1.0] * 3, [3.0] * 3]))
    assert a == b
    assert np.isfinite(loss(H.multilabel(4), Z4, np.zeros((5, 4)), np.ones((5, 4))))
    assert np.isfinite(loss(H.multiclass(4), Z4, np.zeros(5, int), np.float32(2.0)))
    # bool and integer 0/1 labels are fine for binary and multi-hot heads
    assert np.isfinite(loss(H.binary(), Z1, np.array([True, False, True, True, False])))
    assert np.isfinite(loss(H.multilabel(4), Z4, np.zeros((5, 4), np.int8)))


def test_validation_can_be_switched_off_without_changing_valid_results():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    head = H.multiclass(4)
    ref = loss(head, z, y)
    assert loss(head, z, y, validate=False) == ref
    with unihead.validation(False):
        assert loss(head, z, y) == ref
        # out-of-range ids are not checked by unihead when validation is off (documented): what
        # happens is the array library's business (NumPy raises its own IndexError)
        with pytest.raises(IndexError):
            loss(head, z, np.array([0, 1, 2, 3, 0, 7]))
    with pytest.raises(ValueError, match="not a class id"):
        loss(head, z, np.array([0, 1, 2, 3, 0, 7]))
    unihead.set_validation(False)
    try:
        with pytest.raises(IndexError):
            loss(head, z, np.array([0, 1, 2, 3, 0, 7]))
    finally:
        unihead.set_validation(True)
    # shape and dtype checks always run
    with pytest.raises(TypeError, match="integer class ids"):
        loss(head, z, y.astype(float), validate=False)


def test_canonical_weights_errors():
    c = unihead.compile(H.multiclass(3), "numpy")
    layer = c.layer(8, seed=0)
    assert layer.kernel.shape == (8, 3) and layer.bias.shape == (3,)
    w = layer.get_weights()
    assert set(w) == {"kernel", "bias"}
    with pytest.raises(ValueError, match=r"looks transposed.*weight\.T"):
        c.layer(8, {"kernel": np.zeros((3, 8)), "bias": np.zeros(3)})
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        c.layer(8, {"kernel": np.zeros((8, 3)), "bias": np.zeros(4)})
    with pytest.raises(ValueError, match="keys 'kernel'"):
        c.layer(8, {"w": np.zeros((8, 3))})
    with pytest.raises(TypeError, match="floating-point"):
        c.layer(8, (np.zeros((8, 3), int), np.zeros(3)))


def test_boolean_one_hot_rows_are_checked_too():
    y = np.zeros((5, 4), bool)
    y[:, 0] = True
    assert np.isfinite(loss(H.multiclass(4, label_format="one_hot"), Z4, y))
    y[2, 1] = True
    with pytest.raises(ValueError, match=r"labels\[2\] .* is not one-hot.*found 2"):
        loss(H.multiclass(4, label_format="one_hot"), Z4, y)
