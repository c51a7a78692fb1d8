"""The Flax backend: ``unihead.compile(head, "flax")``, its ``nnx`` layer (``HeadLinear``) and its
``linen`` layer (``HeadDense``) in Flax models: parameters in Flax's layout, training with
optax under ``nnx.jit``/``nnx.grad``, orbax checkpoints, canonical weights, port into Flax, and
a small model trained on scikit-learn's digits."""

from __future__ import annotations

import time

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .conftest import require

jax = require("jax")
jnp = require("jax.numpy")
nnx = require("flax.nnx")
linen = require("flax.linen")
optax = require("optax")

from unihead.backends.flax import FlaxHead, HeadDense, HeadLinear  # noqa: E402

HEADS = [H.binary(), H.binary(binary_units=2), H.multiclass(5, label_smoothing=0.1), H.multilabel(4)]


def labels_for(head, n, rng):
    if head.task == "multilabel":
        return rng.integers(0, 2, (n, head.num_outputs)).astype(np.float32)
    return rng.integers(0, head.num_classes if head.task == "multiclass" else 2, n)


def loss_gradient_numpy(head, z, y):
    """The head's loss and its gradient with respect to the logits, by the NumPy backend (its
    analytic gradient, float64 here): the expectation the Flax model's autodiff is checked with."""
    return unihead.compile(head, "numpy").loss_and_gradient(np.asarray(z, np.float64), y)


# ------------------------------------------------------------------------------ the nnx layer
@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_head_linear_is_nnx_linear_with_the_heads_outputs(head):
    compiled = unihead.compile(head, "flax")
    assert isinstance(compiled, FlaxHead) and compiled.backend == "flax"
    layer = compiled.layer(6, rngs=nnx.Rngs(0))
    plain = nnx.Linear(6, head.num_outputs, rngs=nnx.Rngs(0))  # what a Flax user writes
    assert isinstance(layer, nnx.Linear) and isinstance(layer.kernel, nnx.Param) and isinstance(layer.bias, nnx.Param)
    assert layer.kernel.shape == (6, head.num_outputs) and layer.bias.shape == (head.num_outputs,)
    # nnx.Linear's initialisation, from the same rngs
    np.testing.assert_array_equal(np.asarray(layer.kernel[...]), np.asarray(plain.kernel[...]))
    np.testing.assert_array_equal(np.asarray(layer.bias[...]), np.asarray(plain.bias[...]))
    assert layer.head == head and layer.compiled() is compiled
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    k, b = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(np.asarray(layer(x)), x @ k + b, rtol=1e-5, atol=1e-6)
    # the state is nnx.Linear's: two Params, nothing else
    assert set(nnx.state(layer, nnx.Param).keys()) == {"kernel", "bias"}


def test_head_linear_takes_nnx_linears_dtype_options():
    head = H.multiclass(3)
    layer = HeadLinear(head, 4, rngs=nnx.Rngs(1), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                       kernel_init=nnx.initializers.zeros_init(), bias_init=nnx.initializers.ones_init())
    assert layer.kernel.dtype == jnp.float32 and layer(jnp.ones((2, 4))).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(layer(jnp.ones((2, 4))), np.float32), np.ones((2, 3)))
    # bfloat16 logits: the loss is computed in float32 (the JAX head's rule)
    assert layer.compiled().loss(layer(jnp.ones((2, 4))), jnp.array([0, 2])).dtype == jnp.float32
    half = unihead.compile(head, "flax").layer(4, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert half.kernel.dtype == jnp.bfloat16


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_loss_and_gradients_in_an_nnx_model_are_the_heads(head):
    """In an nnx model under nnx.jit and nnx.value_and_grad: the loss is the JAX head's on the
    layer's logits (bit for bit), and the head layer's parameter gradients are the chain rule of
    the NumPy backend's analytic logit gradient (x^T g, 1^T g)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    y = labels_for(head, 16, rng)
    layer = unihead.compile(head, "flax").layer(8, rngs=nnx.Rngs(2))

    @nnx.jit
    def value_and_grad(layer, x, y):
        return nnx.value_and_grad(lambda m: m.compiled().loss(m(x), y))(layer)

    value, grads = value_and_grad(layer, x, y)
    z = layer(x)
    assert float(value) == float(unihead.compile(head, "jax").loss(z, y))
    loss64, g = loss_gradient_numpy(head, z, y)
    assert float(value) == pytest.approx(float(loss64), rel=1e-5)
    np.testing.assert_allclose(np.asarray(grads["kernel"][...]), x.astype(np.float64).T @ g, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads["bias"][...]), g.sum(0), rtol=2e-4, atol=1e-7)


class MLP(nnx.Module):
    def __init__(self, head, rngs, hidden=32, d=8):
        self.hidden = nnx.Linear(d, hidden, rngs=rngs)
        self.head = unihead.compile(head, "flax").layer(hidden, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.hidden(x)))


def test_nnx_optimizer_trains_the_model_with_the_heads_loss():
    head = H.multiclass(3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5)
    model = MLP(head, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    before = model.head.get_canonical_weights()

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: m.head.compiled().loss(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    assert not np.array_equal(before["kernel"], model.head.get_canonical_weights()["kernel"])  # trained in place
    assert model.head.head == head  # the spec stays static through nnx.jit


def test_a_rebuilt_model_reuses_the_nnx_jit_trace():
    """The head is static in the module's graph definition: layers of equal heads (built by other
    compile() calls, or directly) have equal graph definitions, and nnx.jit traces once."""
    traces = []

    @nnx.jit
    def loss(layer, x, y):
        traces.append(1)
        return layer.compiled().loss(layer(x), y)

    x, y = jnp.ones((2, 4)), jnp.array([0, 2])
    layers = [unihead.compile(H.multiclass(3), "flax").layer(4, rngs=nnx.Rngs(i)) for i in range(2)]
    layers.append(HeadLinear(H.multiclass(3), 4, rngs=nnx.Rngs(2)))
    values = [float(loss(layer, x, y)) for layer in layers]
    assert len(traces) == 1 and len(set(values)) == 3
    assert unihead.compile(H.multiclass(3), "flax") == layers[2].compiled()
    assert unihead.compile(H.multiclass(3), "flax") != unihead.compile(H.multiclass(3), "flax", keep="stats")
    loss(unihead.compile(H.multiclass(3, label_smoothing=0.1), "flax").layer(4, rngs=nnx.Rngs(0)), x, y)
    assert len(traces) == 2  # another head: another program


# ------------------------------------------------------------------------------ canonical weights
def test_canonical_weights_round_trip_and_move_between_backends():
    head = H.multiclass(3)
    rng = np.random.default_rng(0)
    w = {"kernel": rng.standard_normal((5, 3)).astype(np.float32), "bias": rng.standard_normal(3).astype(np.float32)}
    layer = unihead.compile(head, "flax").layer(5, weights=w)  # no rngs needed with weights
    got = layer.get_canonical_weights()
    assert isinstance(got["kernel"], np.ndarray)
    np.testing.assert_array_equal(got["kernel"], w["kernel"]) and np.testing.assert_array_equal(got["bias"], w["bias"])
    # into the plain JAX layer and the NumPy one: the same logits
    x = rng.standard_normal((4, 5)).astype(np.float32)
    dense = unihead.compile(head, "jax").layer(5, weights=layer.get_canonical_weights())
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(dense.apply(dense.init(jax.random.key(0)), x)))
    # set_canonical_weights: in place, in the layer's param_dtype
    half = unihead.compile(head, "flax").layer(5, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    half.set_canonical_weights((w["kernel"], w["bias"]))
    assert half.kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(half.kernel[...], np.float32),
                                  np.asarray(jnp.asarray(w["kernel"], jnp.bfloat16), np.float32))


def test_wrong_weights_and_arguments_get_unihead_messages():
    head = H.multiclass(3)
    layer = unihead.compile(head, "flax").layer(5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"looks transposed.*weight\.T"):
        layer.set_canonical_weights({"kernel": np.zeros((3, 5), np.float32), "bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        layer.set_canonical_weights((np.zeros((5, 3), np.float32), np.zeros(4, np.float32)))
    with pytest.raises(TypeError, match=r"rngs=nnx.Rngs\(0\).*weights="):
        unihead.compile(head, "flax").layer(5)
    with pytest.raises(TypeError, match=r"out_features cannot be set.*head.num_outputs"):
        HeadLinear(head, 5, out_features=4, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"use_bias cannot be set"):
        HeadLinear(head, 5, use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"rngs must be an nnx.Rngs.*nnx.Rngs\(params=key\)"):
        HeadLinear(head, 5, rngs=jax.random.key(0))
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        HeadLinear(head, 0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="ClassificationHead or a FlaxHead"):
        HeadLinear("multiclass", 5, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"compile it for Flax, unihead.compile\(compiled.head, 'flax'\)"):
        HeadLinear(unihead.compile(head, "jax"), 5, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="ClassificationHead or a FlaxHead"):
        HeadDense(3)


# ------------------------------------------------------------------------------ orbax
def test_orbax_checkpoint_restores_into_an_abstract_model(tmp_path):
    ocp = require("orbax.checkpoint")
    head = H.multiclass(3, label_smoothing=0.1)
    model = MLP(head, nnx.Rngs(0))
    model.head.set_canonical_weights({"kernel": np.arange(96, dtype=np.float32).reshape(32, 3) / 96,
                                      "bias": np.array([0.5, -1.0, 2.0], np.float32)})
    _, state = nnx.split(model)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", state)
    checkpointer.wait_until_finished()

    abstract = nnx.eval_shape(lambda: MLP(head, nnx.Rngs(1)))  # another seed: nothing comes from it
    graphdef, abstract_state = nnx.split(abstract)
    restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "ckpt", abstract_state))
    for key in ("kernel", "bias"):
        np.testing.assert_array_equal(restored.head.get_canonical_weights()[key], model.head.get_canonical_weights()[key])
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
    assert restored.head.head == head and restored.head.compiled().head == head


# ------------------------------------------------------------------------------ linen
def test_linen_head_dense_has_dense_params_and_trains_with_optax():
    head = H.multiclass(4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.integers(0, 4, 32)
    layer = unihead.compile(head, "flax").linen_layer()
    variables = layer.init(jax.random.key(0), x)
    dense = linen.Dense(4).init(jax.random.key(0), x)  # what linen.Dense holds, from the same key
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, dense)
    np.testing.assert_array_equal(np.asarray(variables["params"]["kernel"]), np.asarray(dense["params"]["kernel"]))
    params = variables["params"]
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)),
                               x.astype(np.float64) @ np.asarray(params["kernel"], np.float64), rtol=1e-5, atol=1e-6)

    compiled = layer.compiled()
    assert isinstance(compiled, FlaxHead) and compiled.head == head

    def loss(p):
        return compiled.loss(layer.apply({"params": p}, x), y)

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    z = layer.apply({"params": params}, x)
    _, g = loss_gradient_numpy(head, z, y)
    np.testing.assert_allclose(np.asarray(grads["kernel"]), x.astype(np.float64).T @ g, rtol=2e-4, atol=1e-7)

    w = {"kernel": rng.standard_normal((6, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)}
    new = layer.set_canonical_weights(params, w)
    np.testing.assert_array_equal(HeadDense.get_canonical_weights(new)["kernel"], w["kernel"])
    assert not np.array_equal(np.asarray(params["kernel"]), w["kernel"])  # pure: params unchanged


# ------------------------------------------------------------------------------ port into Flax
@pytest.mark.parametrize("units,criterion", [(1, "bce"), (4, "ce")])
def test_port_from_pytorch_into_flax_holds_the_check(units, criterion):
    torch = require("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, units))
    loss = torch.nn.BCEWithLogitsLoss() if criterion == "bce" else torch.nn.CrossEntropyLoss()
    ported = unihead.port(model, "flax", loss=loss)
    assert isinstance(ported.layer, HeadLinear) and isinstance(ported.compiled, FlaxHead)
    assert ported.check.passed and ported.check.logits_identical and ported.check.worst_ulp <= 4
    linear = model[-1]
    np.testing.assert_array_equal(ported.layer.get_canonical_weights()["kernel"], linear.weight.detach().numpy().T)
    # the probabilities of the ported nnx layer against float64 ones of the torch layer's logits
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    z_torch = linear(torch.as_tensor(x)).detach().numpy().astype(np.float64)
    p = np.asarray(ported.compiled.probabilities(ported.layer(x)), np.float64)
    expected = 1 / (1 + np.exp(-z_torch)) if units == 1 else np.exp(z_torch) / np.exp(z_torch).sum(-1, keepdims=True)
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-7)


def test_port_from_keras_into_flax_holds_the_check():
    keras = require("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(24, activation="relu"), keras.layers.Dense(5)])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ported = unihead.port(model, "flax")
    assert ported.head == H.multiclass(5) and isinstance(ported.layer, HeadLinear)
    assert ported.check.passed and ported.check.logits_identical and ported.check.worst_ulp <= 4
    np.testing.assert_array_equal(ported.layer.get_canonical_weights()["kernel"], np.asarray(model.layers[-1].kernel))


def test_port_from_a_hugging_face_classifier_into_flax_keeps_the_check_and_class_names(monkeypatch):
    """A tiny RoBERTa sequence classifier built from a config (nothing downloaded): its
    classifier.out_proj is an nn.Linear, ported like any PyTorch head, with id2label as the
    head's class names."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=16, max_position_embeddings=16, num_labels=3,
                                        id2label={0: "neg", 1: "neutral", 2: "pos"})
    model = transformers.RobertaForSequenceClassification(config).eval()
    ported = unihead.port(model, "flax")
    assert ported.check.passed and ported.check.logits_identical and ported.check.worst_ulp <= 4
    assert isinstance(ported.layer, HeadLinear) and ported.layer.head.class_names == ("neg", "neutral", "pos")
    np.testing.assert_array_equal(ported.layer.get_canonical_weights()["kernel"],
                                  model.classifier.out_proj.weight.detach().numpy().T)


# ------------------------------------------------------------------------------ digits
def test_an_nnx_model_with_the_head_learns_digits():
    """64 -> 128 -> unihead head on scikit-learn's digits (shipped inside scikit-learn): 30 epochs
    of adam, batches of 64, seeded; test split: the last 25% of a seeded permutation."""
    datasets = require("sklearn.datasets")
    start = time.monotonic()
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(x))
    n_train = int(0.75 * len(x))
    train, test = order[:n_train], order[n_train:]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(64, 128, rngs=rngs)
            self.head = unihead.compile(H.multiclass(10), "flax").layer(128, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.hidden(x)))

    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, xb, yb):
        loss, grads = nnx.value_and_grad(lambda m: m.head.compiled().loss(m(xb), yb))(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(1)
    batch = 64
    for _ in range(30):
        perm = rng.permutation(train)
        for i in range(0, len(perm) - batch + 1, batch):  # full batches: one compiled step
            step(model, optimizer, x[perm[i:i + batch]], y[perm[i:i + batch]])
    predicted = np.asarray(model.head.compiled().predict(model(x[test])))
    accuracy = float(np.mean(predicted == y[test]))
    elapsed = time.monotonic() - start
    print(f"digits: test accuracy {accuracy:.4f} on {len(test)} examples, {elapsed:.1f} s")
    assert accuracy >= 0.95
    assert elapsed < 20


# ------------------------------------------------------------------------------ packaging
def test_flax_is_optional_for_unihead_and_the_jax_backend():
    import subprocess
    import sys

    code = ("import sys, unihead, unihead.backends.jax\n"
            "unihead.compile(unihead.ClassificationHead.binary(), 'jax')\n"
            "print('flax' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_missing_flax_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flax" else real(name, *a))
    with pytest.raises(unihead.BackendNotAvailableError, match=r"pip install unihead\[flax\]"):
        unihead.compile(H.binary(), "flax")
