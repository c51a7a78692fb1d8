"""The fused linear + loss on Keras, for one Keras backend per process: ``KerasHead.linear_loss``
(values and gradients against the dense path and tests/test_fused.py's independent float64
reference), :meth:`HeadDense.linear_loss` and :class:`FusedHeadModel` (``fit`` without logits,
against the same model trained with the dense head layer and its Keras loss).

Keras binds its backend once per process: ``tests/test_keras_fused.py`` runs this file in a child
process for each of ``KERAS_BACKEND=jax``, ``torch`` and ``tensorflow``.  To run it directly:

    KERAS_BACKEND=tensorflow pytest tests/keras_fused_suite.py

The bound of a training step.  Both models compute the same float32 quantities in different
orders: the loss of a step within test_fused.py's bound for each path (``2 gamma_D max_ij a_ij +
8 u |loss|`` with ``a_ij = sum_d |h_id k_dj| + |b_j|``, ``u = 2**-24``: the float32 matmul's
floor), so the two logged losses within twice that; each gradient is a sum of at most ``n``
float32 products (``n = max(batch, classes, features)``: the longest contraction of the backward
pass), so after one SGD step of rate ``lr`` each weight differs by at most ``lr n u max|g| +
2 u |w|`` (the two updates' roundings), ``max|g|`` the dense step's largest gradient entry of
that weight.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .test_fused import U, check_errors, data, floor, ref_loss_grads

keras = pytest.importorskip("keras")
from keras import ops  # noqa: E402

from unihead.backends.keras import FusedHeadModel, HeadDense  # noqa: E402

BACKEND = keras.backend.backend()

HEADS = {
    "smooth": H.multiclass(700, label_smoothing=0.1, ignore_index=-100),
    "weights": H.multiclass(700, class_weights=[0.5 + (i % 5) / 4 for i in range(700)], ignore_index=-100),
    "focal": H.multiclass(700, focal_gamma=2.0, ignore_index=-100),
    "none": H.multiclass(700, reduction="none", ignore_index=-100),
}


def value_and_grads(fn, *arrays):
    """``fn(*arrays)`` and the gradients of its sum with respect to each array, with the Keras
    backend's own autodiff, as float64 NumPy arrays."""
    f64 = lambda x: np.asarray(ops.convert_to_numpy(x), np.float64)
    if BACKEND == "jax":  # under jit, as JAX code runs (and Keras' JAX trainer)
        import jax

        def both(*a):  # one forward pass: its value and the pullback of ones (the sum's gradient)
            out, pullback = jax.vjp(fn, *a)
            return out, pullback(jax.numpy.ones_like(out))

        out, grads = jax.jit(both)(*[jax.numpy.asarray(a) for a in arrays])
        return f64(out), [f64(g) for g in grads]
    if BACKEND == "torch":
        import torch

        args = [torch.tensor(a, requires_grad=True) for a in arrays]
        out = fn(*args)
        grads = torch.autograd.grad(out.sum(), args)
        return f64(out.detach()), [f64(g) for g in grads]
    import tensorflow as tf

    args = [tf.Variable(a) for a in arrays]
    with tf.GradientTape() as tape:
        out = fn(*args)
        total = tf.reduce_sum(out)
    return f64(out), [f64(g) for g in tape.gradient(total, args)]


def jitted(fn):
    """``fn`` under ``jax.jit`` on Keras-on-JAX (JAX code runs jitted; op by op, each of the
    fused loop's steps would compile on its own), else ``fn``."""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    return fn


def test_runs_on_the_requested_backend():
    assert BACKEND == os.environ.get("KERAS_BACKEND", BACKEND)


# ---------------------------------------------------------------- KerasHead.linear_loss
@pytest.mark.parametrize("name", ["smooth", "weights", "focal", "none"])
def test_linear_loss_matches_dense_and_float64(name):
    head = HEADS[name]
    h, w, b, y, sw = data(ignore=head.ignore_index)
    use_sw = sw if name in ("weights", "sum", "none") else None
    c = unihead.compile(head, "keras")
    fused = value_and_grads(lambda h_, w_, b_: c.linear_loss(h_, w_, y, b_, use_sw, chunk_size=128), h, w, b)
    dense = value_and_grads(lambda h_, w_, b_: c.loss(ops.matmul(h_, w_) + b_, y, use_sw), h, w, b)
    ref = ref_loss_grads(h, w, b, y, head, use_sw)
    check_errors(name, h, w, b, [fused[0], *fused[1]], [dense[0], *dense[1]], ref, per_row=head.reduction == "none")


def test_linear_loss_terms_leading_dims_and_no_bias():
    head = H.multiclass(700, ignore_index=-100, label_smoothing=0.1)
    h, w, b, y, sw = data(n=24, ignore=-100)
    c = unihead.compile(head, "keras")
    n = lambda x: float(ops.convert_to_numpy(x))
    total, weight = jitted(lambda: c.linear_loss_terms(h, w, y, b, sw, chunk_size=200))()
    dtotal, dweight = jitted(lambda: c.loss_terms(h @ w + b, y, sw))()
    assert n(weight) == n(dweight)
    assert abs(n(total) - n(dtotal)) <= 8 * U * abs(n(dtotal)) + 2 * floor(h, w, b).sum()
    rows = unihead.compile(head.replace(reduction="none"), "keras")
    got = ops.convert_to_numpy(jitted(lambda: rows.linear_loss(h.reshape(4, 6, -1), w, y.reshape(4, 6)))())
    want = ops.convert_to_numpy(jitted(lambda: rows.loss(h @ w, y))())
    assert got.shape == (4, 6)
    bound = 2 * (2 * h.shape[1] * U) * floor(h, w, 0 * b) / U + 8 * U * np.abs(want)
    assert np.all(np.abs(got.reshape(-1) - want) <= bound)


# ---------------------------------------------------------------- FusedHeadModel in fit
F, D = 8, 16


def pair(head, seed=1, chunk_size=128):
    """A dense model (backbone + HeadDense, compiled with the head's Keras loss) and the
    FusedHeadModel of the same layers and weights, both with SGD(lr)."""
    c = unihead.compile(head, "keras")
    models = []
    for fused in (False, True):
        keras.utils.set_random_seed(seed)
        backbone = keras.Sequential([keras.Input((F,)), keras.layers.Dense(D, activation="tanh")])
        layer = c.layer(D)
        if fused:
            model = FusedHeadModel(backbone, layer, chunk_size=chunk_size)
            model.compile(keras.optimizers.SGD(LR), metrics=c.keras_metrics())
        else:
            model = keras.Sequential([backbone, layer])
            c.compile_model(model, keras.optimizers.SGD(LR))
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    return models


LR = 0.5


def inputs(n=32, k=300, seed=0, ignore=-100):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, F)).astype("float32")
    y = rng.integers(0, k, n)
    if ignore is not None:
        y[::5] = ignore
    sw = rng.uniform(0.5, 2.0, n).astype("float32")
    return x, y, sw


@pytest.mark.parametrize("head", [
    H.multiclass(300, label_smoothing=0.1, ignore_index=-100),
    H.multiclass(300, focal_gamma=1.5, ignore_index=-100, reduction="sum"),
], ids=["smooth-mean", "focal-sum"])
def test_one_fit_step_equals_the_dense_model(head):
    dense, fused = pair(head)
    x, y, sw = inputs()
    before = dense.get_weights()
    hidden = ops.convert_to_numpy(dense.layers[0](x))
    kernel, bias = before[-2:]
    logs = [m.fit(x, y, sample_weight=sw, batch_size=len(x), epochs=1, shuffle=False, verbose=0).history["loss"][0]
            for m in (dense, fused)]
    d = hidden.shape[1]
    gamma_d = d * U / (1 - d * U)
    # the weighted mean / sum of the rows' bounds (test_fused.py): the worst row's, times the total weight
    wsum = float((sw * (y != -100)).sum()) if head.reduction == "sum" else 1.0
    assert abs(logs[0] - logs[1]) <= 2 * (2 * gamma_d * floor(hidden, kernel, bias).max() / U * U * wsum
                                         + 8 * U * abs(logs[0])), logs
    n_terms = max(len(x), head.num_outputs, F, D)
    for w0, wd, wf in zip(before, dense.get_weights(), fused.get_weights()):
        g = np.abs(wd - w0).max() / LR  # the dense step's largest gradient entry
        assert g > 0
        assert np.all(np.abs(wf - wd) <= LR * n_terms * U * g + 2 * U * np.abs(wd)), np.abs(wf - wd).max()


def test_fit_logs_and_predict_evaluate_with_logits():
    """fit's steps report the loss (compiled metrics need logits: left out there), predict and
    evaluate run the dense head (the same numbers as the dense model), validation_data gives the
    metrics; a last partial batch (an unknown batch size in a TensorFlow trace) trains too."""
    head = H.multiclass(300, label_smoothing=0.1, ignore_index=-100)
    dense, fused = pair(head)
    x, y, sw = inputs(n=40)
    history = fused.fit(x, y, sample_weight=sw, batch_size=16, epochs=2, verbose=0, shuffle=False,
                        validation_data=(x, y, sw), validation_batch_size=40).history
    dense.fit(x, y, sample_weight=sw, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert set(history) == {"loss", "val_loss", "val_accuracy"}, history
    assert np.isfinite(history["loss"]).all() and history["loss"][1] < history["loss"][0]
    # the same three SGD steps an epoch (the last of 8 rows), twice: equal up to rounding grown
    # over six steps (a loose check; the one-step test above is the tight one)
    for wd, wf in zip(dense.get_weights(), fused.get_weights()):
        np.testing.assert_allclose(wf, wd, rtol=1e-4, atol=1e-6)
    # model(x) is the logits too (eager; predict's are compiled: the same float32 matmuls in
    # their own orders, within 2 D u max|z| of each other)
    eager = ops.convert_to_numpy(fused(x))
    np.testing.assert_allclose(fused.predict(x, verbose=0), eager, rtol=0, atol=2 * D * U * np.abs(eager).max())
    # one batch: Keras averages the batches' losses by their sizes, not by the head's weights
    got = fused.evaluate(x, y, sample_weight=sw, batch_size=40, verbose=0, return_dict=True)
    logits = ops.convert_to_numpy(fused.predict(x, verbose=0))
    assert logits.shape == (40, 300)
    want = unihead.compile(head, "numpy").loss(logits, y, sw)
    np.testing.assert_allclose(got["loss"], want, rtol=2e-6)
    assert got["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).mean()))
    assert history["val_loss"][-1] == pytest.approx(got["loss"], rel=1e-6)


def test_fit_on_an_unbuilt_model_with_class_weight():
    """A model built by fit itself; Keras' class_weight reaches the fused loss as sample weights
    (the head's class weights, docs/semantics.md §7)."""
    k = 200
    cw = {i: 0.5 + (i % 3) for i in range(k)}
    keras.utils.set_random_seed(3)
    model = FusedHeadModel(keras.Sequential([keras.layers.Dense(D)]), HeadDense(H.multiclass(k)))
    model.compile(keras.optimizers.SGD(0.1))
    x, y, _ = inputs(n=24, k=k, ignore=None)
    loss = model.fit(x, y, class_weight=cw, batch_size=24, epochs=1, verbose=0).history["loss"][0]
    assert model.built and model.head_layer.built
    # the step's loss is the class-weighted head's (computed before its update): re-derive it
    # from a model with the initial weights
    keras.utils.set_random_seed(3)
    fresh = FusedHeadModel(keras.Sequential([keras.layers.Dense(D)]), HeadDense(H.multiclass(k)))
    logits = ops.convert_to_numpy(fresh(x))
    weighted = unihead.compile(H.multiclass(k, class_weights=[cw[i] for i in range(k)]), "numpy")
    assert loss == pytest.approx(float(weighted.loss(logits, y)), rel=1e-5)


# ---------------------------------------------------------------- saving and porting
def test_config_save_load_and_weights_port_to_the_dense_layer(tmp_path):
    head = H.multiclass(300, label_smoothing=0.1, ignore_index=-100)
    dense, fused = pair(head, chunk_size=100)
    x, y, sw = inputs()
    fused.fit(x, y, sample_weight=sw, epochs=1, verbose=0)
    clone = FusedHeadModel.from_config(fused.get_config())
    assert clone.chunk_size == 100 and clone.head_layer.head == head and isinstance(clone.head_layer, HeadDense)
    path = tmp_path / "fused.keras"
    fused.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: unihead registered the class
    assert type(loaded) is FusedHeadModel and loaded.chunk_size == 100
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), fused.predict(x, verbose=0))
    assert type(loaded.optimizer).__name__ == "SGD"
    # weights port both ways with the plain dense model (backbone, then [kernel, bias])
    dense.set_weights(fused.get_weights())
    np.testing.assert_array_equal(dense.predict(x, verbose=0), fused.predict(x, verbose=0))
    np.testing.assert_array_equal(loaded.head_layer.get_canonical_weights()["kernel"],
                                  dense.layers[-1].get_canonical_weights()["kernel"])
    loaded.fit(x, y, sample_weight=sw, epochs=1, verbose=0)  # trains on after loading


# ---------------------------------------------------------------- hostile inputs
def test_hostile_inputs_get_uniheads_errors():
    c = unihead.compile(H.multiclass(300), "keras")
    backbone = keras.Sequential([keras.Input((F,)), keras.layers.Dense(D)])
    with pytest.raises(TypeError, match="backbone must be a Keras layer"):
        FusedHeadModel(lambda x: x, c.layer(D))
    with pytest.raises(TypeError, match="head_layer must be a unihead HeadDense"):
        FusedHeadModel(backbone, keras.layers.Dense(300))
    with pytest.raises(ValueError, match=r"independent sigmoids.*compiled\.loss_fn\(\)"):
        FusedHeadModel(backbone, unihead.compile(H.multilabel(300), "keras").layer(D))
    with pytest.raises(ValueError, match="reduction='none'"):
        FusedHeadModel(backbone, unihead.compile(H.multiclass(300, reduction="none"), "keras").layer(D))
    with pytest.raises(ValueError, match="chunk_size"):
        FusedHeadModel(backbone, c.layer(D), chunk_size=0)
    model = FusedHeadModel(backbone, c.layer(D))
    with pytest.raises(ValueError, match="without loss="):
        model.compile("sgd", loss="sparse_categorical_crossentropy")
    model.compile("sgd")
    x, y, _ = inputs()
    with pytest.raises(ValueError, match="not a class id"):
        model.head_layer.linear_loss(backbone(x), np.full(len(x), 300))
    with pytest.raises(ValueError, match="not built yet"):
        c.layer().linear_loss(backbone(x), y)
    h, w, b, yy, _ = data(n=4, k=300)
    with pytest.raises(ValueError, match=r"transposed"):
        c.linear_loss(h, w.T.copy(), yy, b)
    with pytest.raises(ValueError, match="input features"):
        c.linear_loss(h[:, :5], w, yy, b)
    if BACKEND != "jax":  # JAX without x64 has no float64: its arrays of float64 data are float32
        with pytest.raises(TypeError, match="one dtype"):
            c.linear_loss(h.astype("float64"), w, yy, b)
    with pytest.raises(ValueError, match=r"compiled\.loss\(hidden @ kernel \+ bias, labels\)"):
        unihead.compile(H.multiclass(300, label_format="one_hot"), "keras").linear_loss(h, w, np.eye(300)[yy], b)
    with pytest.raises(ValueError, match="labels"):
        model.fit(x, epochs=1, verbose=0)


def test_gradient_accumulation_weighs_the_fused_micro_batches_as_the_dense_ones():
    """GradientAccumulation (the window's weighted-mean gradient) reads each micro-batch's loss
    weight from the model's loss: FusedHeadModel reports it as HeadLoss does, so two micro-batches
    make the dense model's update."""
    from unihead.backends.keras import GradientAccumulation

    head = H.multiclass(300, label_smoothing=0.1, ignore_index=-100)
    dense, fused = pair(head)
    for model in (dense, fused):
        loss = model.loss if model is dense else None
        model.compile(GradientAccumulation(keras.optimizers.SGD(LR), steps=2), loss=loss)
    x, y, sw = inputs()
    y[:16:2] = -100  # the micro-batches weigh differently
    before = dense.get_weights()
    for model in (dense, fused):
        model.fit(x, y, sample_weight=sw, batch_size=16, epochs=1, shuffle=False, verbose=0)
    n_terms = max(len(x), head.num_outputs, F, D)
    for w0, wd, wf in zip(before, dense.get_weights(), fused.get_weights()):
        g = np.abs(wd - w0).max() / LR
        assert g > 0
        assert np.all(np.abs(wf - wd) <= LR * n_terms * U * g + 2 * U * np.abs(wd)), np.abs(wf - wd).max()


def test_mixed_bfloat16_trains_on_the_same_loss():
    """Under Keras' mixed_bfloat16 policy the head layer computes in bfloat16: its fused loss
    takes bfloat16 hidden states and the kernel cast as Dense casts it (bfloat16 matmuls, the
    loss in float32), the same bfloat16 logits as the dense layer's, so the step's loss is the
    dense model's within test_fused.py's bfloat16 bound (8 u |loss|)."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        head = H.multiclass(300, label_smoothing=0.1, ignore_index=-100)
        dense, fused = pair(head)
        x, y, sw = inputs()
        hidden = fused.backbone(x)
        assert str(ops.dtype(hidden)) == "bfloat16"
        assert str(ops.dtype(fused.head_layer.linear_loss(hidden, y, sw))) == "float32"
        logs = [m.fit(x, y, sample_weight=sw, batch_size=len(x), epochs=1, shuffle=False, verbose=0).history["loss"][0]
                for m in (dense, fused)]
        assert abs(logs[1] - logs[0]) <= 8 * U * abs(logs[0]), logs
        assert all(np.isfinite(w).all() for w in fused.get_weights())
    finally:
        keras.mixed_precision.set_global_policy("float32")
