"""The Keras backend's tests, for one Keras backend per process.

Keras binds its backend once per process, so ``tests/test_keras.py`` runs this file in a child
process for each of ``KERAS_BACKEND=jax``, ``torch`` and ``tensorflow``.  To run it directly:

    KERAS_BACKEND=torch pytest tests/keras_suite.py
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .backend_checks import assert_agrees_with_numpy64
from .cases import HEADS, labels_for
from .test_validation import ACCEPTED, REFUSED

keras = pytest.importorskip("keras")
from keras import ops  # noqa: E402

from unihead.backends.keras import HeadDense, HeadLoss  # noqa: E402

BACKEND = keras.backend.backend()
FTZ = float(ops.convert_to_numpy(ops.exp(ops.convert_to_tensor(-100.0, "float32")))) == 0.0


def compiled(head, **kw):
    return unihead.compile(head, "keras", **kw)


def value_and_grad(fn, z):
    """The loss and its gradient with respect to ``z`` with the backend's own autodiff."""
    if BACKEND == "jax":
        import jax

        return jax.value_and_grad(lambda t: fn(t).sum())(ops.convert_to_tensor(z))
    if BACKEND == "torch":
        import torch

        t = torch.tensor(z, requires_grad=True)
        out = fn(t)
        out.sum().backward()
        return out, t.grad
    import tensorflow as tf

    t = tf.Variable(z)
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(fn(t))
    return out, tape.gradient(out, t)


def numpy_of(x):
    return ops.convert_to_numpy(x)


def run(head, z, y, sw):
    c = compiled(head)
    _, grad = value_and_grad(lambda t: c.loss(t, y, sw), z)
    return {
        "probabilities": numpy_of(c.probabilities(z)),
        "log_probabilities": numpy_of(c.log_probabilities(z)),
        "loss": numpy_of(c.loss(z, y, sw)),
        "none": numpy_of(compiled(head.replace(reduction="none")).loss(z, y, sw)),
        "grad": numpy_of(grad),
        "predict": numpy_of(c.predict(z)),
    }


def test_runs_on_the_requested_backend():
    assert BACKEND == os.environ.get("KERAS_BACKEND", BACKEND)
    assert type(compiled(H.binary()).native).__name__ == {
        "jax": "JaxHead", "torch": "TorchHead", "tensorflow": "TFHead"}[BACKEND]


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("head", HEADS, ids=repr)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
def test_float32_agrees_with_numpy_float64_on_extreme_logits(head, weighted):
    assert_agrees_with_numpy64(head, run, weighted, ftz=FTZ)


# ------------------------------------------------------------------------------ layer
def test_layer_in_sequential_and_functional_models_with_canonical_weights():
    head = H.multiclass(3)
    c = compiled(head)
    rng = np.random.default_rng(0)
    w = {"kernel": rng.normal(size=(5, 3)).astype("float32"), "bias": rng.normal(size=3).astype("float32")}
    layer = c.layer(5, w)
    assert isinstance(layer, keras.layers.Dense) and layer.head == head and layer.activation is keras.activations.linear
    x = rng.normal(size=(4, 5)).astype("float32")
    seq = keras.Sequential([keras.Input((5,)), layer])
    np.testing.assert_allclose(seq.predict(x, verbose=0), x @ w["kernel"] + w["bias"], rtol=1e-5, atol=1e-6)
    out = c.layer(name="head")(keras.layers.Dense(8)(inp := keras.Input((5,))))
    functional = keras.Model(inp, out)
    assert functional.output_shape == (None, 3)
    got = layer.get_canonical_weights()
    np.testing.assert_array_equal(got["kernel"], w["kernel"])
    np.testing.assert_array_equal(got["bias"], w["bias"])
    # Keras' own pair is unchanged: the variables' list, which is the canonical (in, out) layout
    native = layer.get_weights()
    assert isinstance(native, list) and len(native) == 2
    np.testing.assert_array_equal(native[0], w["kernel"])
    layer.set_weights([np.zeros((5, 3), "float32"), np.ones(3, "float32")])
    np.testing.assert_array_equal(seq.predict(x, verbose=0), np.ones((4, 3)))
    assert [a.shape for a in seq.get_weights()] == [(5, 3), (3,)]
    seq.set_weights([w["kernel"], w["bias"]])  # model-level, untouched by unihead
    np.testing.assert_array_equal(layer.get_canonical_weights()["kernel"], w["kernel"])
    # set_weights also takes the canonical mapping the other backends' layers return
    layer.set_weights({"kernel": np.ones((5, 3), "float32"), "bias": np.zeros(3, "float32")})
    np.testing.assert_allclose(seq.predict(x, verbose=0), x.sum(-1, keepdims=True) * np.ones((1, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not built yet"):
        c.layer().set_canonical_weights(w)
    with pytest.raises(ValueError, match="emits logits"):
        unihead.backends.keras.HeadDense(head, activation="softmax")
    with pytest.raises(ValueError, match="looks transposed"):
        c.layer(5, {"kernel": w["kernel"].T, "bias": w["bias"]})


# ------------------------------------------------------------------------------ training
def synthetic(task, n=512, d=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = rng.normal(size=(d, k))
    s = x @ w + 0.3 * np.sin(3 * x[:, :k])
    if task == "multiclass":
        return x, s.argmax(-1)
    if task == "binary":
        return x, (s[:, 0] > 0).astype("float32")
    return x, (s > 0).astype("float32")


def build(head, d=6, seed=0):
    keras.utils.set_random_seed(seed)
    c = compiled(head)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(32, activation="relu"), c.layer()])
    return c.compile_model(model, keras.optimizers.Adam(0.02))


@pytest.mark.parametrize(
    "head",
    [H.multiclass(4), H.binary(), H.binary(binary_units=2), H.multilabel(4)],
    ids=["multiclass", "binary-1", "binary-2", "multilabel"],
)
def test_fit_trains_to_95_percent(head):
    x, y = synthetic(head.task)
    model = build(head)
    model.fit(x, y, epochs=30, batch_size=64, verbose=0, sample_weight=np.ones(len(x), "float32"))
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    assert result["accuracy"] > 0.95, result
    pred = np.asarray(compiled(head).predict(model.predict(x, verbose=0)))
    assert (pred == y).mean() > 0.95


def test_loss_and_metrics_match_the_compiled_head_with_sample_weights():
    head = H.multiclass(4, label_smoothing=0.1)
    x, y = synthetic("multiclass", n=64)
    model = build(head)
    sw = np.linspace(0.0, 2.0, 64).astype("float32")
    result = model.evaluate(x, y, sample_weight=sw, batch_size=64, verbose=0, return_dict=True)
    logits = model.predict(x, verbose=0)
    want = unihead.compile(head, "numpy").loss(logits, y, sw)
    np.testing.assert_allclose(result["loss"], want, rtol=2e-6)
    acc = (np.argmax(logits, -1) == y).astype(float)
    # Keras gives sample weights to weighted_metrics only; metrics= (ours) are unweighted
    np.testing.assert_allclose(result["accuracy"], acc.mean(), rtol=1e-6)


def test_fit_class_weight_equals_the_heads_class_weights():
    """Keras turns class_weight into sample weights w[y]; HeadLoss divides by their sum, so one
    training step equals the head with class_weights (Keras' own losses divide by N instead)."""
    x, y = synthetic("multiclass", n=64)
    cw = {0: 0.5, 1: 2.0, 2: 1.0, 3: 3.0}
    losses = []
    for head, kwargs in ((H.multiclass(4), {"class_weight": cw}), (H.multiclass(4, class_weights=list(cw.values())), {})):
        model = build(head, seed=1)
        model.compile(optimizer=keras.optimizers.SGD(0.0), **compiled(head).compile_kwargs())
        losses.append(model.fit(x, y, epochs=1, batch_size=64, verbose=0, **kwargs).history["loss"][0])
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-6)
    native = build(H.multiclass(4), seed=1)
    native.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras_own = native.fit(x, y, epochs=1, batch_size=64, verbose=0, class_weight=cw).history["loss"][0]
    w = np.array(list(cw.values()))[y]
    np.testing.assert_allclose(keras_own, losses[0] * w.sum() / len(y), rtol=2e-6)  # documented


@pytest.mark.parametrize("head, z, y, ids", ACCEPTED, ids=lambda v: repr(v)[:40])
def test_keras_label_conventions_are_the_one_label_rule(head, z, y, ids):
    """(N, 1) ids and float ids, as Keras pipelines give them, are unihead's one label rule
    (tests/test_validation.py runs the same cases on NumPy, PyTorch and JAX): the loss, HeadLoss
    included, equals the one of integer ids (...)."""
    c = compiled(head)
    z = ops.convert_to_tensor(np.random.default_rng(1).normal(size=z.shape).astype("float32"))
    ref = numpy_of(c.loss(z, ops.convert_to_tensor(ids)))
    np.testing.assert_array_equal(numpy_of(c.loss(z, ops.convert_to_tensor(y))), ref)
    np.testing.assert_array_equal(numpy_of(c.loss_fn()(ops.convert_to_tensor(y), z)), ref)
    per = numpy_of(c.loss_fn().call(ops.convert_to_tensor(y), z))
    assert per.shape == tuple(z.shape[:-1])


def test_loss_fn_is_a_keras_loss_carrying_the_compiled_heads_options(tmp_path):
    head = H.multiclass(3, label_smoothing=0.1)
    c = compiled(head, validate=False, fused=False, keep="stats")
    options = {"validate": False, "fused": False, "keep": "stats"}
    assert c.options() == options
    # the native head gets the options that apply to it
    assert c.native.options() == {"jax": {"validate": False, "keep": "stats", "checkify": False},
                                  "torch": {"validate": False, "fused": False},
                                  "tensorflow": {"validate": False}}[BACKEND]
    loss = c.loss_fn()
    assert isinstance(loss, keras.losses.Loss) and loss.compiled() is c
    z = ops.convert_to_tensor(np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], "float32"))
    np.testing.assert_allclose(numpy_of(loss(np.array([1, 2]), z)), unihead.compile(head, "numpy").loss(numpy_of(z), np.array([1, 2])), rtol=1e-6)
    # serialization (get_config), pickling and a saved model keep them
    assert keras.losses.deserialize(keras.losses.serialize(loss)).compiled().options() == options
    assert pickle.loads(pickle.dumps(loss)).compiled().options() == options
    layer = c.layer(5)
    assert layer.compiled() is c and layer.compiled(validate=True).options() == {**options, "validate": True}
    assert HeadDense.from_config(layer.get_config()).compiled().options() == options
    model = keras.Sequential([keras.Input((5,)), layer])
    c.compile_model(model, "sgd")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.layers[-1].compiled().options() == options and loaded.loss.compiled().options() == options
    # a layer and a loss without options have none in their configs (older files load as before)
    assert "compile_options" not in HeadDense(head).get_config()
    assert HeadLoss(head).compiled().options() == {"validate": True}
    with pytest.raises(ValueError, match="fused must be one of"):
        compiled(head, fused="yes")
    # the old name still works, with a DeprecationWarning naming the new one
    with pytest.warns(DeprecationWarning, match="loss_fn"):
        assert c.keras_loss().compiled() is c


def test_head_loss_reduction_gives_the_heads_numbers_or_is_refused():
    """Keras' reduction argument sets the head's reduction where they mean the same thing (the
    independent expectation: Keras' own loss with that reduction, docs/semantics.md §10)."""
    head = H.multiclass(4)
    rng = np.random.default_rng(7)
    z = ops.convert_to_tensor(rng.normal(size=(8, 4)).astype("float32"))
    y = rng.integers(0, 4, 8)
    sw = ops.convert_to_tensor(rng.uniform(0.2, 2.0, size=8).astype("float32"))
    for reduction, head_reduction in (("sum", "sum"), ("mean_with_sample_weight", "mean"), (None, "none"), ("none", "none")):
        loss = compiled(head).loss_fn(reduction=reduction)
        assert loss.head == head.replace(reduction=head_reduction)
        assert loss.reduction == {"sum": "sum", "mean": "mean_with_sample_weight", "none": "none"}[head_reduction]
        keras_own = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
        for weight in (None, sw):
            np.testing.assert_allclose(numpy_of(loss(y, z, sample_weight=weight)), numpy_of(keras_own(y, z, sample_weight=weight)),
                                       rtol=3e-6, err_msg=str(reduction))
        # the setting survives serialization (it is the head's)
        assert keras.losses.deserialize(keras.losses.serialize(loss)).head == loss.head
    # without reduction=, the head's own
    assert compiled(head.replace(reduction="sum")).loss_fn().head.reduction == "sum"
    # Keras' mean over the batch size is no head's reduction: refused, with what to write
    for reduction in ("sum_over_batch_size", "mean"):
        with pytest.raises(ValueError, match=r"divides the weighted sum of the losses by the number of examples.*"
                           r"Set the reduction in the head spec: ClassificationHead\.multiclass\(\.\.\., reduction='mean'\)"):
            compiled(head).loss_fn(reduction=reduction)
    with pytest.raises(ValueError, match="is not a reduction"):
        HeadLoss(head, reduction="avg")
    # in fit/evaluate: one batch, so the reported loss is the batch's
    x, labels = synthetic("multiclass", n=32)
    model = build(head)
    model.compile(optimizer="sgd", loss=HeadLoss(head, reduction="sum"))
    got = model.evaluate(x, labels, batch_size=32, verbose=0, return_dict=True)["loss"]
    want = unihead.compile(head.replace(reduction="sum"), "numpy").loss(model.predict(x, verbose=0), labels)
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_compiled_heads_pickle_as_their_class_with_their_options():
    head = H.binary(binary_units=2, label_smoothing=0.1)
    c = compiled(head, validate=False, keep="stats")
    back = pickle.loads(pickle.dumps(c))
    assert type(back) is type(c) and back.head == head and back.options() == c.options()
    assert type(back.native) is type(c.native)
    # the head Keras runs on: the TensorFlow head on TensorFlow (not a registered backend name)
    native = back.native
    again = pickle.loads(pickle.dumps(native))
    assert type(again) is type(native) and again.options() == native.options() and again.head == head
    z = np.array([[0.5, -1.0], [2.0, 1.0]], "float32")
    np.testing.assert_array_equal(numpy_of(again.probabilities(z)), numpy_of(native.probabilities(z)))
    # every backend's head
    for name, options in (("numpy", {"validate": False}), ("torch", {"validate": False, "fused": False}),
                          ("jax", {"validate": False, "keep": "stats", "checkify": True}), ("keras", {"validate": False, "fused": True})):
        h = unihead.compile(head, name, **options)
        b = pickle.loads(pickle.dumps(h))
        assert type(b) is type(h) and b.options() == options, name


@pytest.mark.parametrize(
    "head",
    [H.multiclass(4), H.multiclass(4, label_format="one_hot"), H.binary(), H.binary(threshold=0.3),
     H.binary(binary_units=2, threshold=0.7), H.multilabel(3, threshold=0.2)],
    ids=repr,
)
def test_accuracy_metric_counts_the_compiled_heads_predictions(head):
    c = compiled(head)
    rng = np.random.default_rng(3)
    z = rng.normal(size=(64, head.num_outputs)).astype("float32")
    if head.task != "multiclass":  # logits on and next to the decision threshold
        cut = np.float32(np.log(head.threshold / (1 - head.threshold)))
        col = 1 if head.num_outputs == 2 and head.task == "binary" else 0
        if col:
            z[:12, 0] = 0.0
        z[:4, col] = cut
        # the neighbouring floats (the smallest normal ones around a cut of 0: XLA and TensorFlow
        # flush subnormal numbers to zero on CPU, docs/semantics.md §11)
        tiny = np.finfo(np.float32).tiny
        z[4:8, col] = np.nextafter(cut, np.float32(np.inf)) if cut else tiny
        z[8:12, col] = np.nextafter(cut, np.float32(-np.inf)) if cut else -tiny
    else:
        z[:6, 1] = z[:6, 2] = z[:6].max(-1) + 1  # ties: the first index of the maximum
    y = labels_for(head, 64, rng)
    metric = c.keras_metrics()[0]
    metric.update_state(y, z)
    pred = numpy_of(c.predict(z))
    np.testing.assert_array_equal(pred, unihead.compile(head, "numpy").predict(z))
    target = y.argmax(-1) if head.label_format == "one_hot" else y
    assert float(numpy_of(metric.result())) == pytest.approx(float((pred == target).mean()), rel=1e-6)


def test_keras_label_conventions():
    c = compiled(H.multiclass(3))
    loss = c.loss_fn()
    z = ops.convert_to_tensor(np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], "float32"))
    ref = float(numpy_of(c.loss(z, np.array([1, 2]))))
    assert float(numpy_of(loss(np.array([[1], [2]]), z))) == pytest.approx(ref, rel=1e-6)
    assert float(numpy_of(loss(np.array([1.0, 2.0], "float32"), z))) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match="not a class id"):
        loss(np.array([1.5, 2.0], "float32"), z)
    per = numpy_of(loss.call(np.array([1, 2]), z))
    assert per.shape == (2,)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head", [H.multiclass(3, label_format="probabilities"), H.binary(label_format="probabilities"),
                                  H.multilabel(3), H.multiclass(3)], ids=repr)
def test_half_precision_labels_give_the_float32_labels_loss(head, dtype):
    """Labels in float16 or bfloat16 (values they hold exactly) give the loss of float32 labels on
    every Keras backend (bfloat16 probability labels failed on TensorFlow in NumPy's finfo)."""
    z = ops.convert_to_tensor(np.random.default_rng(2).normal(size=(4, head.num_outputs)).astype("float32"))
    y = labels_for(head, 4, np.random.default_rng(3))
    if head.label_format == "probabilities":  # quarters: exact in bfloat16
        y = (np.array([[0.5, 0.25, 0.25], [1, 0, 0], [0, 0.75, 0.25], [0.25, 0.25, 0.5]])
             if head.task == "multiclass" else np.array([0, 0.25, 0.5, 1]))
    want = float(numpy_of(compiled(head).loss(z, ops.convert_to_tensor(np.asarray(y, "float32")))))
    got = compiled(head).loss(z, ops.cast(ops.convert_to_tensor(np.asarray(y, "float32")), dtype))
    assert float(numpy_of(got)) == want


@pytest.mark.parametrize("head, z, y, w", REFUSED + [
    (H.multiclass(4), np.zeros((5, 4), "float32"), np.array([0, 1, 4, 2, 0]), None),
    (H.binary(), np.zeros((5, 1), "float32"), np.array([0, 1, 3, 1, 0]), None),
    (H.multiclass(4), np.zeros((5, 3), "float32"), np.zeros(5, "int32"), None),
], ids=lambda v: repr(v)[:40])
def test_same_errors_as_numpy(head, z, y, w):
    """What the one label rule refuses is refused with NumPy's error, by the compiled head and by
    HeadLoss alike."""
    with pytest.raises((ValueError, TypeError)) as want:
        unihead.compile(head, "numpy").loss(z, y, w)
    tensor = lambda a: None if a is None else ops.convert_to_tensor(a)
    for loss in (lambda: compiled(head).loss(tensor(z), tensor(y), tensor(w)),
                 lambda: compiled(head).loss_fn()(tensor(y), tensor(z), tensor(w))):
        with pytest.raises((ValueError, TypeError)) as got:
            loss()
        assert type(got.value) is type(want.value)
        assert str(got.value) == str(want.value)


# ------------------------------------------------------------------------------ saving
def test_save_and_load_without_custom_objects(tmp_path):
    head = H.binary(binary_units=2, label_smoothing=0.1)
    x, y = synthetic("binary", n=128)
    model = build(head)
    model.fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: unihead registered its classes
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert isinstance(loaded.layers[-1], unihead.backends.keras.HeadDense) and loaded.layers[-1].head == head
    assert isinstance(loaded.loss, unihead.backends.keras.HeadLoss) and loaded.loss.head == head
    np.testing.assert_allclose(
        loaded.evaluate(x, y, verbose=0, return_dict=True)["loss"],
        model.evaluate(x, y, verbose=0, return_dict=True)["loss"], rtol=1e-6)
    cfg = keras.saving.serialize_keras_object(compiled(head).keras_metrics()[0])
    assert keras.saving.deserialize_keras_object(cfg).head == head


def test_load_in_a_fresh_process_that_imports_unihead_first(tmp_path):
    import subprocess
    import sys

    model = build(H.multilabel(4))
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.ones((2, 6), "float32")
    np.save(tmp_path / "want.npy", model.predict(x, verbose=0))
    code = (
        "import numpy as np, unihead, keras\n"
        f"m = keras.models.load_model({str(path)!r})\n"
        f"np.testing.assert_array_equal(m.predict(np.ones((2, 6), 'float32'), verbose=0), np.load({str(tmp_path / 'want.npy')!r}))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ------------------------------------------------------------------------------ mixed precision
def test_mixed_bfloat16_computes_the_loss_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        head = H.multiclass(4)
        c = compiled(head)
        x, y = synthetic("multiclass", n=128)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"), c.layer()])
        c.compile_model(model, keras.optimizers.Adam(0.02))
        assert model.layers[-1].compute_dtype == "bfloat16"
        logits = model(x[:8])
        assert "bfloat16" in str(logits.dtype)
        value = c.loss_fn()(y[:8], logits)
        assert "float32" in str(value.dtype)
        ref = unihead.compile(head, "numpy").loss(numpy_of(ops.cast(logits, "float32")), y[:8])
        np.testing.assert_allclose(numpy_of(value), ref, rtol=1e-6)
        history = model.fit(x, y, epochs=3, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ------------------------------------------------------------------------------ native rows
def test_keras_rows_of_the_native_equivalence_table_on_this_backend():
    """The Keras column of docs/semantics.md §10: Keras' own losses on this backend against
    unihead's Keras backend on the same data."""
    from . import test_native_equivalence as T

    L = keras.losses
    f = lambda a: ops.convert_to_tensor(np.asarray(a, "float32"))  # noqa: E731

    def ours(head, z, y, sw=None):
        return numpy_of(compiled(head).loss(f(z), y, None if sw is None else f(sw)))

    oh = np.eye(T.K)[T.Y]
    wy = T.W[T.Y]
    wb = T.W[T.YB.astype(int)]
    pairs = [
        (ours(H.multiclass(T.K), T.Z, T.Y), L.SparseCategoricalCrossentropy(from_logits=True)(T.Y, f(T.Z))),
        (ours(H.multiclass(T.K, reduction="sum"), T.Z, T.Y),
         L.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")(T.Y, f(T.Z))),
        (ours(H.multiclass(T.K, reduction="none"), T.Z, T.Y),
         L.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(T.Y, f(T.Z))),
        (ours(H.multiclass(T.K, class_weights=T.W), T.Z, T.Y),
         L.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")(T.Y, f(T.Z), sample_weight=f(wy))),
        (ours(H.multiclass(T.K, ignore_index=-100), T.Z, T.Y_IGN),
         L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)(T.Y_IGN, f(T.Z))),
        (ours(H.multiclass(T.K, label_smoothing=T.EPS), T.Z, T.Y),
         L.CategoricalCrossentropy(from_logits=True, label_smoothing=T.EPS)(f(oh), f(T.Z))),
        (ours(H.multiclass(T.K, label_smoothing=T.EPS, class_weights=T.W), T.Z, T.Y),
         L.CategoricalCrossentropy(from_logits=True, label_smoothing=T.EPS, reduction="mean_with_sample_weight")(f(oh), f(T.Z), sample_weight=f(wy))),
        (ours(H.multiclass(T.K, label_format="probabilities"), T.Z, T.T_SOFT),
         L.CategoricalCrossentropy(from_logits=True)(f(T.T_SOFT), f(T.Z))),
        (ours(H.multiclass(T.K, label_format="probabilities", class_weights=T.W), T.Z, T.T_SOFT),
         L.CategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")(f(T.T_SOFT), f(T.Z), sample_weight=f(T.T_SOFT @ T.W))),
        (ours(H.multiclass(T.K), T.Z, T.Y, T.S),
         L.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")(T.Y, f(T.Z), sample_weight=f(T.S))),
        (ours(H.multiclass(T.K), T.Z3, T.Y3), L.SparseCategoricalCrossentropy(from_logits=True)(T.Y3, f(T.Z3))),
        (ours(H.multiclass(T.K, focal_gamma=T.GAMMA), T.Z, T.Y),
         L.CategoricalFocalCrossentropy(alpha=1.0, gamma=T.GAMMA, from_logits=True)(f(oh), f(T.Z))),
        (ours(H.multiclass(T.K, ignore_index=-100), T.Z, np.full(T.N, -100)),
         L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)(np.full(T.N, -100), f(T.Z))),
        (ours(H.binary(), T.ZB[:, None], T.YB), L.BinaryCrossentropy(from_logits=True)(f(T.YB[:, None]), f(T.ZB[:, None]))),
        (ours(H.binary(binary_units=2), T.Z[:, :2], T.YB),
         L.SparseCategoricalCrossentropy(from_logits=True)(T.YB.astype(int), f(T.Z[:, :2]))),
        (ours(H.binary(label_smoothing=T.EPS), T.ZB[:, None], T.YB),
         L.BinaryCrossentropy(from_logits=True, label_smoothing=T.EPS)(f(T.YB[:, None]), f(T.ZB[:, None]))),
        (ours(H.binary(class_weights=T.W[:2]), T.ZB[:, None], T.YB),
         L.BinaryCrossentropy(from_logits=True, reduction="mean_with_sample_weight")(f(T.YB[:, None]), f(T.ZB[:, None]), sample_weight=f(wb))),
        (ours(H.binary(focal_gamma=T.GAMMA), T.ZB[:, None], T.YB),
         L.BinaryFocalCrossentropy(gamma=T.GAMMA, from_logits=True)(f(T.YB[:, None]), f(T.ZB[:, None]))),
        (ours(H.binary(focal_gamma=T.GAMMA, class_weights=[1 - T.ALPHA, T.ALPHA], reduction="sum"), T.ZB[:, None], T.YB),
         L.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=T.ALPHA, gamma=T.GAMMA, from_logits=True, reduction="sum")(f(T.YB[:, None]), f(T.ZB[:, None]))),
        (ours(H.multilabel(T.K), T.ZM, T.YM), L.BinaryCrossentropy(from_logits=True)(f(T.YM), f(T.ZM))),
        (ours(H.multilabel(T.K, reduction="sum"), T.ZM, T.YM),
         L.BinaryCrossentropy(from_logits=True, reduction="sum")(f(T.YM), f(T.ZM))),
        (ours(H.multilabel(T.K, reduction="none"), T.ZM, T.YM),
         L.BinaryCrossentropy(from_logits=True, reduction=None)(f(T.YM), f(T.ZM))),
        (ours(H.multilabel(T.K, label_smoothing=T.EPS), T.ZM, T.YM),
         L.BinaryCrossentropy(from_logits=True, label_smoothing=T.EPS)(f(T.YM), f(T.ZM))),
        (ours(H.multilabel(T.K, focal_gamma=T.GAMMA), T.ZM, T.YM),
         L.BinaryFocalCrossentropy(gamma=T.GAMMA, from_logits=True)(f(T.YM), f(T.ZM))),
        (ours(H.multilabel(T.K, label_format="probabilities"), T.ZM, T.QM),
         L.BinaryCrossentropy(from_logits=True)(f(T.QM), f(T.ZM))),
    ]
    for i, (got, want) in enumerate(pairs):
        np.testing.assert_allclose(got, numpy_of(want), rtol=3e-6, atol=0, err_msg=f"pair {i}")


def test_compiled_head_methods_return_backend_tensors():
    c = compiled(H.multilabel(3))
    z = ops.convert_to_tensor(np.zeros((2, 3), "float32"))
    for out in (c.probabilities(z), c.log_probabilities(z), c.predict(z), c.loss(z, np.ones((2, 3), "float32"))):
        assert ops.is_tensor(out)
    assert labels_for(H.binary(), 4, np.random.default_rng(0)).shape == (4,)


def test_diagnose_and_port_on_this_backend():
    """The seeds' softmax-over-one-unit is found, and a head round-trips through a head file with
    bit-identical logits and probabilities within 4 ulp (the port's own check)."""
    bad = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="softmax")])
    bad.compile(optimizer="adam", loss="binary_crossentropy")
    assert unihead.diagnose(bad).codes == ("softmax_one_unit",)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    to_np = unihead.port(model, to="numpy")
    assert to_np.head == H.multiclass(5) and to_np.check.passed and to_np.check.logits_identical
    back = unihead.port((to_np.head, to_np.weights), to="keras")
    assert back.check.passed and back.check.logits_identical, str(back.check)
    np.testing.assert_array_equal(ops.convert_to_numpy(back.layer.kernel), ops.convert_to_numpy(model.layers[-1].kernel))


def test_head_loss_keeps_its_compiled_head_between_calls():
    """A new compiled head per call would rebuild (on PyTorch: recompile) its kernels every step."""
    loss = compiled(H.multiclass(3)).loss_fn()
    z = np.zeros((2, 3), "float32")
    loss(np.array([0, 1]), z)
    first = loss._compiled(loss.head)
    loss(np.array([0, 2]), z)
    assert loss._compiled(loss.head) is first
