"""timm models and timm's losses: what ``infer``/``diagnose``/``port`` read, checked against
timm's own numbers.

timm needs torchvision, whose registry wheels link the CUDA build of PyTorch; the main test
environment has the CPU build, which cannot load them. These tests therefore run in an
environment of their own (``.venv-timm``, made by ``.ci/run``; see the README's test section):
every test here is marked ``timm``, which the main run deselects (``-m "not timm"`` in
pyproject.toml) and the timm run selects (``pytest -m timm``). Nothing imports timm at
collection, so the main run collects this file without it.

The expectations are independent of unihead: each head's loss (computed by unihead's NumPy
backend) is compared with the value of the timm loss object it was read from, in float64 on
random logits; and the timm lines a finding prints are executed and compared the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .conftest import require

pytestmark = pytest.mark.timm

N = 12


@pytest.fixture(scope="module")
def timm():
    require("torchvision")
    t = require("timm")
    import timm.loss  # noqa: F401  (timm's losses are a submodule `import timm` does not load)

    return t


def resnet(timm, k: int):
    import torch

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=k)


def logits(k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, (N, k))


def ids(k: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, N)


def timm_value(loss, z: np.ndarray, y: np.ndarray) -> float:
    import torch

    yt = torch.as_tensor(y) if np.issubdtype(np.asarray(y).dtype, np.integer) else torch.as_tensor(y, dtype=torch.float64)
    return float(loss(torch.as_tensor(z, dtype=torch.float64), yt))


def unihead_value(head: H, z: np.ndarray, y: np.ndarray) -> float:
    return float(unihead.compile(head, "numpy").loss(z, y))


# ------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("k, head", [(1, H.binary()), (2, H.binary(binary_units=2)), (10, H.multiclass(10))])
def test_the_classifier_is_read_with_its_weights(timm, k, head):
    model = resnet(timm, k)
    inferred = unihead.infer(model)
    assert inferred.head == head
    fc = model.get_classifier()
    np.testing.assert_array_equal(inferred.weights["kernel"], fc.weight.detach().numpy().T)
    np.testing.assert_array_equal(inferred.weights["bias"], fc.bias.detach().numpy())
    d = unihead.diagnose(model)
    assert d.codes == ("loss_not_checked",) and d.where.startswith("timm resnet18 (fc: nn.Linear(512, ")


def test_a_model_without_classifier_is_refused_with_the_way_to_give_it_one(timm):
    model = resnet(timm, 0)
    for call in (unihead.infer, unihead.diagnose):
        with pytest.raises(ValueError, match=r"num_classes=0.*reset_classifier\(K\)"):
            call(model)
    model.reset_classifier(3)
    assert unihead.infer(model).head == H.multiclass(3)


def test_port_checks_the_probabilities(timm):
    model = resnet(timm, 10)
    ported = unihead.port(model, "numpy", loss=timm.loss.LabelSmoothingCrossEntropy(0.1))
    assert ported.head == H.multiclass(10, label_smoothing=0.1)
    assert ported.check.worst_ulp <= ported.check.tolerance
    np.testing.assert_array_equal(ported.weights["kernel"], model.fc.weight.detach().numpy().T)


# ------------------------------------------------------------------------------ the losses that map
@pytest.mark.parametrize("k", [2, 10])
@pytest.mark.parametrize("s", [0.1, 0.3])
def test_label_smoothing_cross_entropy_is_categorical_smoothing(timm, k, s):
    loss = timm.loss.LabelSmoothingCrossEntropy(smoothing=s)
    d = unihead.diagnose(resnet(timm, k), loss, labels=ids(k))
    assert d.findings == ()
    assert d.head == (H.binary(binary_units=2, label_smoothing=s) if k == 2 else H.multiclass(k, label_smoothing=s))
    z, y = logits(k), ids(k)
    assert unihead_value(d.head, z, y) == pytest.approx(timm_value(loss, z, y), rel=1e-12)


def test_soft_target_cross_entropy_takes_probability_rows(timm):
    loss = timm.loss.SoftTargetCrossEntropy()
    rows = np.random.default_rng(2).dirichlet(np.ones(10), N)  # Mixup/CutMix targets
    d = unihead.diagnose(resnet(timm, 10), loss, labels=rows)
    assert d.findings == () and d.head == H.multiclass(10, label_format="probabilities")
    z = logits(10)
    assert unihead_value(d.head, z, rows) == pytest.approx(timm_value(loss, z, rows), rel=1e-12)
    wrong = unihead.diagnose(resnet(timm, 10), loss, labels=ids(10))
    assert wrong.codes == ("ids_with_categorical_loss",)


@pytest.mark.parametrize("k, kwargs, head", [
    (10, dict(smoothing=0.0), H.multilabel(10)),
    (2, dict(smoothing=0.1), H.multilabel(2, label_smoothing=0.1)),  # K = 2: s/K = s/2, the same targets
    (10, dict(smoothing=0.0, pos_weight=2.5), H.multilabel(10, pos_weight=2.5)),
])
def test_binary_cross_entropy_on_ids_is_multilabel_on_one_hot_rows(timm, k, kwargs, head):
    loss = timm.loss.BinaryCrossEntropy(**kwargs)
    y = ids(k)
    d = unihead.diagnose(resnet(timm, k), loss, labels=y)
    assert d.findings == () and d.head == head
    z = logits(k)
    assert unihead_value(head, z, np.eye(k)[y]) == pytest.approx(timm_value(loss, z, y), rel=1e-12)


def test_binary_cross_entropy_default_smoothing_has_no_unihead_twin(timm):
    """BinaryCrossEntropy() smooths by 0.1 (nn.BCEWithLogitsLoss does not), and over K > 2 ids its
    targets s/K and 1 - s + s/K are not any symmetric smoothing."""
    loss = timm.loss.BinaryCrossEntropy()
    d = unihead.diagnose(resnet(timm, 10), loss, labels=ids(10))
    assert d.codes == ("timm_bce_smoothing",) and d.ok and d.head == H.multilabel(10)
    assert "0.01 and 0.91" in d.findings[0].what
    z, y = logits(10), ids(10)
    value = timm_value(loss, z, y)
    for s in (0.0, 0.02, 0.1, 0.2):  # the nearest candidates: none is timm's loss
        assert abs(unihead_value(H.multilabel(10, label_smoothing=s), z, np.eye(10)[y]) - value) > 1e-3


def test_target_threshold_cancels_the_smoothing(timm):
    loss = timm.loss.BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)  # the ResNet-strikes-back recipe
    d = unihead.diagnose(resnet(timm, 10), loss, labels=ids(10))
    assert d.codes == ("timm_bce_smoothing_cancelled",) and d.ok and d.head == H.multilabel(10)
    z, y = logits(10), ids(10)
    assert unihead_value(d.head, z, np.eye(10)[y]) == pytest.approx(timm_value(loss, z, y), rel=1e-12)
    assert "smoothing=0.0" in d.findings[0].lines["timm"]


def test_a_threshold_above_the_targets_removes_the_labels(timm):
    loss = timm.loss.BinaryCrossEntropy(smoothing=0.1, target_threshold=0.95)
    d = unihead.diagnose(resnet(timm, 10), loss, labels=ids(10))
    assert d.codes == ("timm_bce_constant_targets",) and not d.ok
    z, y = logits(10), ids(10)
    # what timm trains on: every target 0, whatever the label
    assert timm_value(loss, z, y) == pytest.approx(unihead_value(H.multilabel(10), z, np.zeros((N, 10))), rel=1e-12)


def test_sum_classes_is_k_times_the_mean(timm):
    loss = timm.loss.BinaryCrossEntropy(smoothing=0.0, sum_classes=True)
    d = unihead.diagnose(resnet(timm, 10), loss, labels=ids(10))
    assert d.codes == ("timm_bce_sum_classes",) and d.head == H.multilabel(10)
    z, y = logits(10), ids(10)
    assert timm_value(loss, z, y) == pytest.approx(10 * unihead_value(d.head, z, np.eye(10)[y]), rel=1e-12)


def test_dense_targets_are_not_smoothed_unless_smooth_dense(timm):
    rows = (np.random.default_rng(3).random((N, 10)) < 0.3).astype(float)
    z = logits(10)
    plain = timm.loss.BinaryCrossEntropy(smoothing=0.1)
    d = unihead.diagnose(resnet(timm, 10), plain, labels=rows)
    assert d.codes == ("timm_bce_smoothing_ignored",) and d.head == H.multilabel(10)
    assert unihead_value(d.head, z, rows) == pytest.approx(timm_value(plain, z, rows), rel=1e-12)
    dense = timm.loss.BinaryCrossEntropy(smoothing=0.1, smooth_dense=True)
    d = unihead.diagnose(resnet(timm, 10), dense, labels=rows)
    assert d.findings == () and d.head == H.multilabel(10, label_smoothing=0.1)
    assert unihead_value(d.head, z, rows) == pytest.approx(timm_value(dense, z, rows), rel=1e-12)


def test_one_output_with_integer_labels(timm):
    """Over num_classes=1, timm one-hot encodes ids over one output: 0 becomes a positive and 1 fails."""
    import torch

    loss = timm.loss.BinaryCrossEntropy(smoothing=0.0)
    y = np.array([0, 1, 1, 0] * 3)
    d = unihead.diagnose(resnet(timm, 1), loss, labels=y)
    assert d.codes == ("timm_bce_ids_one_output",) and not d.ok and d.errors[0].fix == H.binary()
    with pytest.raises(RuntimeError):
        timm_value(loss, logits(1), y)
    z = logits(1)
    assert timm_value(loss, z, np.zeros(N, np.int64)) == pytest.approx(unihead_value(H.binary(), z, np.ones(N)))
    assert unihead.diagnose(resnet(timm, 1), loss).findings[0].severity == "warning"  # no labels: assumed ids
    column = y[:, None].astype(float)  # the fix: a float column of the logits' shape
    ok = unihead.diagnose(resnet(timm, 1), loss, labels=column)
    assert ok.findings == () and ok.head == H.binary()
    assert unihead_value(H.binary(), z, y) == pytest.approx(timm_value(loss, z, column), rel=1e-12)
    assert torch.is_tensor(loss.pos_weight) or loss.pos_weight is None


def test_categorical_losses_over_one_output(timm):
    for loss in (timm.loss.LabelSmoothingCrossEntropy(0.1), timm.loss.SoftTargetCrossEntropy()):
        d = unihead.diagnose(resnet(timm, 1), loss)
        assert d.codes == ("categorical_loss_one_unit",), loss
    z = logits(1)  # the reason: over one logit the categorical cross-entropy is 0
    assert timm_value(timm.loss.LabelSmoothingCrossEntropy(0.1), z, np.zeros(N, np.int64)) == 0.0


def test_other_timm_losses_are_refused_with_the_reason(timm):
    with pytest.raises(ValueError, match=r"does not read timm\.loss\.JsdCrossEntropy.*LabelSmoothingCrossEntropy"):
        unihead.diagnose(resnet(timm, 10), timm.loss.JsdCrossEntropy())


# ------------------------------------------------------------------------------ the timm lines run
@pytest.mark.parametrize("head", [
    H.binary(), H.binary(label_smoothing=0.2, pos_weight=3.0), H.binary(binary_units=2, label_smoothing=0.1),
    H.multiclass(10), H.multiclass(10, label_smoothing=0.1), H.multiclass(10, label_format="probabilities"),
    H.multilabel(10), H.multilabel(10, label_smoothing=0.1, pos_weight=2.0),
], ids=repr)
def test_the_timm_lines_give_the_heads_numbers(timm, head):
    import torch
    from torch import nn

    from unihead._timm import timm_lines

    code = timm_lines(head, "resnet18")
    assert "no timm loss" not in code, code
    k = head.num_outputs
    rng = np.random.default_rng(4)
    labels = {"sparse": ids(k), "binary": rng.integers(0, 2, N), "probabilities": rng.dirichlet(np.ones(k), N),
              "multi_hot": (rng.random((N, k)) < 0.3).astype(float)}[head.label_format]
    z = logits(k)
    ns = {"timm": timm, "torch": torch, "nn": nn, "logits": torch.as_tensor(z),
          "labels": torch.as_tensor(labels) if labels.dtype.kind == "i" else torch.as_tensor(labels, dtype=torch.float64)}
    exec(code, ns)
    assert ns["model"].get_classifier().out_features == k
    assert float(ns["loss"]) == pytest.approx(unihead_value(head, z, labels), rel=1e-12)


def test_heads_without_timm_lines_say_so(timm):
    from unihead._timm import timm_lines

    for head in (H.multiclass(10, class_weights=[1.0] * 10), H.multiclass(10, ignore_index=-1),
                 H.multiclass(10, label_format="probabilities", label_smoothing=0.1)):
        assert timm_lines(head, "resnet18").startswith("no timm loss gives this head's numbers"), head
