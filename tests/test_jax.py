"""JAX backend: pure functions and pytrees, transforms, x64 on and off, validation under tracing,
dtypes, Flax interop, the optax rows of the native-equivalence table, end-to-end training."""

from __future__ import annotations

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .backend_checks import assert_agrees_with_numpy64
from .cases import HEADS, labels_for
from .conftest import require

jax = require("jax")
jnp = require("jax.numpy")
optax = require("optax")


def compiled(head, **kw):
    return unihead.compile(head, "jax", **kw)


# XLA on CPU flushes subnormal numbers to zero (measured here, not assumed)
FTZ = float(jnp.exp(jnp.float32(-100.0))) == 0.0


def runner(keep):
    def run(head, z, y, sw):
        c = compiled(head, keep=keep)
        value, grad = jax.value_and_grad(lambda t: c.loss(t, y, sw).sum())(jnp.asarray(z))
        return {
            "probabilities": c.probabilities(z),
            "log_probabilities": c.log_probabilities(z),
            "loss": c.loss(z, y, sw),
            "none": compiled(head.replace(reduction="none")).loss(z, y, sw),
            "grad": grad,
            "predict": c.predict(z),
        }

    return run


@pytest.mark.parametrize("head", HEADS, ids=repr)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
def test_float32_agrees_with_numpy_float64_on_extreme_logits(head, weighted):
    assert_agrees_with_numpy64(head, runner("inputs"), weighted, ftz=FTZ)


@pytest.mark.parametrize("head", HEADS[::3], ids=repr)
def test_saved_statistics_variant_agrees_too(head):
    assert_agrees_with_numpy64(head, runner("stats"), weighted=True, ftz=FTZ)


def test_jit_grad_value_and_grad_vmap():
    head = H.multiclass(5, label_smoothing=0.1, class_weights=[1, 2, 3, 4, 5])
    c = compiled(head)
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, (4, 6)))
    eager = c.loss(z[0], y[0])
    assert float(jax.jit(c.loss)(z[0], y[0])) == pytest.approx(float(eager), rel=1e-6)
    v, g = jax.value_and_grad(c.loss)(z[0], y[0])
    gj = jax.jit(jax.grad(c.loss))(z[0], y[0])
    np.testing.assert_allclose(gj, g, rtol=1e-6, atol=1e-9)
    ref = unihead.compile(head, "numpy").loss_and_gradient(np.asarray(z[0]), np.asarray(y[0]))
    np.testing.assert_allclose(v, ref[0], rtol=1e-6)
    np.testing.assert_allclose(g, ref[1], rtol=1e-5, atol=1e-8)
    batched = jax.vmap(c.loss)(z, y)
    np.testing.assert_allclose(batched, [c.loss(z[i], y[i]) for i in range(4)], rtol=1e-6)
    gb = jax.jit(jax.vmap(jax.grad(c.loss)))(z, y)
    np.testing.assert_allclose(gb[2], jax.grad(c.loss)(z[2], y[2]), rtol=1e-6, atol=1e-9)
    # a pure function: the same inputs, the same output
    assert float(c.loss(z[0], y[0])) == float(eager)


def test_x64_on_and_off():
    head = H.multilabel(3, focal_gamma=2.0)
    c = compiled(head)
    z = np.random.default_rng(1).normal(size=(5, 3))
    y = (z > 0).astype(np.float64)
    assert c.loss(z, y).dtype == jnp.float32  # x64 off: float64 input becomes float32
    ref = unihead.compile(head, "numpy").loss_and_gradient(z, y)
    with jax.enable_x64(True):
        z64 = jnp.asarray(z, jnp.float64)
        value, grad = jax.jit(jax.value_and_grad(c.loss))(z64, y)
        assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
        np.testing.assert_allclose(value, ref[0], rtol=1e-14)
        np.testing.assert_allclose(grad, ref[1], rtol=1e-13, atol=1e-16)
        sparse = compiled(H.multiclass(3, ignore_index=-1))
        yi = jnp.asarray([0, 2, -1, 1, 0], jnp.int64)
        assert np.isfinite(float(jax.jit(sparse.loss)(z64, yi)))
        # float32 logits with x64 on: the float32 formulas (the polynomial exponential's 2**n
        # from int32 exponent bits), whatever width Python integers get
        v32, g32 = jax.jit(jax.value_and_grad(sparse.loss))(jnp.asarray(z, jnp.float32), yi)
    ref32 = unihead.compile(H.multiclass(3, ignore_index=-1), "numpy").loss_and_gradient(
        z.astype(np.float32).astype(np.float64), np.asarray([0, 2, -1, 1, 0]))
    assert v32.dtype == jnp.float32 and g32.dtype == jnp.float32
    np.testing.assert_allclose(v32, ref32[0], rtol=1e-6)
    np.testing.assert_allclose(g32, ref32[1], rtol=1e-5, atol=1e-7)


def test_validation_runs_eagerly_and_never_breaks_tracing():
    c = compiled(H.multiclass(4))
    z = jnp.zeros((3, 4))
    bad = np.array([0, 7, 1])
    with pytest.raises(ValueError, match=r"labels\[1\] = 7 is not a class id"):
        c.loss(z, bad)
    # labels closed over as constants are still checked at trace time...
    with pytest.raises(ValueError, match=r"labels\[1\] = 7"):
        jax.jit(lambda t: c.loss(t, bad))(z)
    # ...labels that are traced have no values: the check is skipped, never a ConcretizationTypeError
    out = jax.jit(c.loss)(z, jnp.asarray([0, 3, 1]))
    assert np.isfinite(float(out))
    jax.jit(c.loss)(z, jnp.asarray(bad))  # unchecked under tracing (documented)
    jax.vmap(c.loss)(jnp.zeros((2, 3, 4)), jnp.asarray([[0, 1, 2], [3, 2, 1]]))
    # shape errors still raise under tracing (shapes are static)
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        jax.jit(c.loss)(z, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"sample_weight\[0\] = -1"):
        c.loss(z, np.array([0, 1, 2]), np.array([-1.0, 1, 1]))


def test_same_errors_as_numpy():
    for head, z, y in [
        (H.multiclass(4), np.zeros((5, 4), np.float32), np.array([0, 1, 4, 2, 0])),
        (H.binary(), np.zeros((5, 1), np.float32), np.array([0, 1, 3, 1, 0])),
        (H.multiclass(4), np.zeros((5, 4), np.int32), np.zeros(5, np.int32)),
        (H.multiclass(4), np.zeros((5, 3), np.float32), np.zeros(5, np.int32)),
    ]:
        with pytest.raises((ValueError, TypeError)) as a:
            compiled(head).loss(jnp.asarray(z), jnp.asarray(y))
        with pytest.raises((ValueError, TypeError)) as b:
            unihead.compile(head, "numpy").loss(z, y)
        assert str(a.value) == str(b.value) and type(a.value) is type(b.value)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_computed_in_float32(dtype):
    c = compiled(H.multiclass(3))
    z32 = jnp.asarray([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    z = z32.astype(dtype)
    value, grad = jax.value_and_grad(c.loss)(z, jnp.asarray([1, 2]))
    assert value.dtype == jnp.float32 and grad.dtype == dtype
    assert float(value) == float(c.loss(z.astype(jnp.float32), jnp.asarray([1, 2])))
    assert c.probabilities(z).dtype == jnp.float32


def test_layer_params_are_a_flax_style_pytree():
    head = H.multiclass(4)
    layer = compiled(head).layer(8)
    params = layer.init(jax.random.PRNGKey(0))
    assert set(params) == {"kernel", "bias"}
    assert params["kernel"].shape == (8, 4) and params["bias"].shape == (4,)
    x = jnp.ones((2, 3, 8))
    assert layer.apply(params, x).shape == (2, 3, 4)
    np.testing.assert_allclose(layer.apply(params, x), x @ params["kernel"] + params["bias"], rtol=1e-6)
    # the params are a pytree optax can update
    tx = optax.sgd(0.1)
    state = tx.init(params)
    grads = jax.grad(lambda p: compiled(head).loss(layer.apply(p, x[0]), jnp.asarray([0, 1, 3])))(params)
    updates, _ = tx.update(grads, state)
    new = optax.apply_updates(params, updates)
    assert not np.allclose(new["kernel"], params["kernel"])
    # canonical weights in and out
    rng = np.random.default_rng(0)
    w = {"kernel": rng.normal(size=(8, 4)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
    p2 = compiled(head).layer(8, w).init(jax.random.PRNGKey(1))
    out = layer.get_weights(p2)
    assert type(layer).get_weights(p2).keys() == out.keys()  # also a static method, as before
    np.testing.assert_array_equal(out["kernel"], w["kernel"])
    np.testing.assert_array_equal(out["bias"], w["bias"])
    with pytest.raises(ValueError, match="looks transposed"):
        compiled(head).layer(8, {"kernel": w["kernel"].T, "bias": w["bias"]})


def test_init_takes_a_sample_input_like_flax():
    layer = compiled(H.multiclass(4)).layer(8)
    key = jax.random.PRNGKey(3)
    want = layer.init(key)
    for x in (jnp.ones((2, 8)), np.ones((5, 3, 8), np.float32), jax.ShapeDtypeStruct((7, 8), jnp.float32)):
        got = layer.init(key, x)
        assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))
    with pytest.raises(ValueError, match=r"x has 5 features .*in_features=8.*compiled.layer\(5\)"):
        layer.init(key, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="no feature axis"):
        layer.init(key, jnp.float32(1.0))
    # under jit the shape check is static (no concrete values needed)
    params = jax.jit(layer.init)(key, jnp.ones((2, 8)))
    assert params["kernel"].shape == (8, 4)


def test_get_and_set_weights_are_pure_functions_of_params():
    head = H.multiclass(3)
    layer = compiled(head).layer(4, dtype=jnp.bfloat16)
    params = layer.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    w = {"kernel": rng.normal(size=(4, 3)).astype(np.float32), "bias": rng.normal(size=3).astype(np.float32)}
    new = layer.set_weights(params, w)
    assert new is not params and not np.array_equal(np.asarray(params["kernel"], np.float32), np.asarray(new["kernel"], np.float32))
    assert new["kernel"].dtype == jnp.bfloat16 and new["bias"].dtype == jnp.bfloat16  # the params' dtype
    np.testing.assert_array_equal(np.asarray(new["kernel"], np.float32), w["kernel"].astype(jnp.bfloat16).astype(np.float32))
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    # the pair form (Keras' get_weights() lists [kernel, bias]) and the canonical names
    assert layer.set_canonical_weights is not None
    f32 = compiled(head).layer(4)
    p32 = f32.set_canonical_weights(f32.init(jax.random.PRNGKey(1)), (w["kernel"], w["bias"]))
    out = f32.get_canonical_weights(p32)
    np.testing.assert_array_equal(out["kernel"], w["kernel"])
    np.testing.assert_array_equal(out["bias"], w["bias"])
    assert isinstance(out["kernel"], np.ndarray)
    with pytest.raises(ValueError, match="looks transposed"):
        f32.set_weights(p32, {"kernel": w["kernel"].T, "bias": w["bias"]})
    with pytest.raises(TypeError, match="params must be this layer's"):
        f32.set_weights({"params": p32}, w)
    # a head's params as one entry of a model's params
    model = {"encoder": {"w": jnp.ones((2, 4))}, "head": p32}
    model["head"] = f32.set_weights(model["head"], f32.get_weights(p32))
    np.testing.assert_array_equal(f32.get_weights(model["head"])["kernel"], w["kernel"])


def test_loss_fn_is_the_loss_as_a_plain_function():
    head = H.multiclass(4, label_smoothing=0.1)
    c = compiled(head, keep="stats")
    loss_fn = c.loss_fn()
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=6))
    sw = jnp.asarray(rng.uniform(0.5, 2, size=6), jnp.float32)
    assert float(loss_fn(z, y)) == float(c.loss(z, y))
    assert float(jax.jit(loss_fn)(z, y, sw)) == float(jax.jit(c.loss)(z, y, sw))
    assert float(loss_fn(z, y, sample_weight=sw)) == float(c.loss(z, y, sw))
    np.testing.assert_array_equal(jax.grad(loss_fn)(z, y), jax.grad(c.loss)(z, y))
    # in optax code: a loss function of (logits, labels)
    layer = c.layer(4)
    params = layer.init(jax.random.PRNGKey(0))
    tx = optax.sgd(0.5)
    state = tx.init(params)

    @jax.jit
    def step(p, s, x, t):
        value, g = jax.value_and_grad(lambda q: loss_fn(layer.apply(q, x), t))(p)
        updates, s = tx.update(g, s)
        return optax.apply_updates(p, updates), s, value

    first = step(params, state, z, y)[2]
    for _ in range(20):
        params, state, value = step(params, state, z, y)
    assert float(value) < float(first)
    # NumPy: a callable too
    n = unihead.compile(head, "numpy")
    assert float(n.loss_fn()(np.asarray(z), np.asarray(y))) == float(n.loss(np.asarray(z), np.asarray(y)))


def test_compiled_heads_and_layers_keep_their_options_through_pickling():
    import pickle

    head = H.multilabel(3, pos_weight=2.0)
    c = compiled(head, validate=False, keep="stats", checkify=True)
    back = pickle.loads(pickle.dumps(c))
    assert type(back) is type(c) and back.head == head
    assert back.options() == {"validate": False, "keep": "stats", "checkify": True}
    assert back.ops.traced_checks and not compiled(head).ops.traced_checks
    layer = c.layer(5)
    assert layer.compiled() is c
    assert layer.compiled(keep="inputs").options() == {"validate": False, "keep": "inputs", "checkify": True}
    assert pickle.loads(pickle.dumps(layer)).compiled().options() == c.options()
    n = unihead.compile(head, "numpy", validate=False)
    assert pickle.loads(pickle.dumps(n)).options() == {"validate": False}
    nl = n.layer(5, seed=0)
    assert nl.compiled() is n and pickle.loads(pickle.dumps(nl)).compiled().options() == {"validate": False}
    with pytest.raises(ValueError, match="keep must be one of 'inputs', 'stats'"):
        compiled(head, keep="all")


def _layers(head, d):
    """``name -> (get canonical, set canonical, get native, set native, logits(x))`` for every
    backend's layer (the JAX layer's params held in a box: they are values, not state)."""
    torch = require("torch")
    keras = require("keras")
    out = {}
    nl = unihead.compile(head, "numpy").layer(d, seed=1)
    out["numpy"] = (nl.get_canonical_weights, nl.set_canonical_weights, nl.get_weights, nl.set_weights, nl)
    tl = unihead.compile(head, "torch").layer(d)

    def torch_logits(x):
        with torch.no_grad():
            return tl(torch.as_tensor(x)).numpy()

    out["torch"] = (tl.get_canonical_weights, tl.set_canonical_weights, tl.get_weights, tl.set_weights, torch_logits)
    jl = unihead.compile(head, "jax").layer(d)
    box = {"params": jl.init(jax.random.PRNGKey(5))}

    def jax_set(w):
        box["params"] = jl.set_canonical_weights(box["params"], w)

    def jax_get():
        return jl.get_canonical_weights(box["params"])

    out["jax"] = (jax_get, jax_set, jax_get, jax_set, lambda x: np.asarray(jl.apply(box["params"], x)))
    kl = unihead.compile(head, "keras").layer(d)
    out["keras"] = (kl.get_canonical_weights, kl.set_canonical_weights, kl.get_weights, kl.set_weights,
                    lambda x: keras.ops.convert_to_numpy(kl(x)))
    return out


@pytest.mark.parametrize("head", [H.multiclass(4), H.binary(), H.multilabel(3)], ids=repr)
def test_canonical_weights_round_trip_between_every_backends_layers(head):
    """get_canonical_weights() of any backend's layer loads with set_canonical_weights() into any
    other's, bit for bit; so does each framework's get_weights() / set_weights() pair (Keras'
    own lists [kernel, bias]; the others return the canonical mapping)."""
    d = 6
    rng = np.random.default_rng(11)
    w = {"kernel": rng.normal(size=(d, head.num_outputs)).astype(np.float32),
         "bias": rng.normal(size=head.num_outputs).astype(np.float32)}
    x = np.eye(d, dtype=np.float32)  # basis vectors: every framework's logits are exact
    want = x @ w["kernel"] + w["bias"]
    layers = _layers(head, d)
    for pair in ("canonical", "native"):
        for src, (get, put, get_native, put_native, _) in layers.items():
            (put if pair == "canonical" else put_native)(w if src != "keras" or pair == "canonical" else [w["kernel"], w["bias"]])
            exported = get() if pair == "canonical" else get_native()
            for dst, (dget, dput, _, dput_native, logits) in layers.items():
                if dst == src:
                    continue
                (dput if pair == "canonical" else dput_native)(exported)
                got = dget()
                np.testing.assert_array_equal(got["kernel"], w["kernel"], err_msg=f"{pair} {src} -> {dst}")
                np.testing.assert_array_equal(got["bias"], w["bias"], err_msg=f"{pair} {src} -> {dst}")
                np.testing.assert_array_equal(logits(x), want, err_msg=f"{pair} {src} -> {dst}")
                rng_w = {"kernel": rng.normal(size=w["kernel"].shape).astype(np.float32),
                         "bias": rng.normal(size=w["bias"].shape).astype(np.float32)}
                dput(rng_w)  # scramble it again, so the next load is seen


def test_params_drop_into_flax():
    flax = require("flax")
    from flax import linen, nnx

    head = H.multilabel(5)
    layer = compiled(head).layer(7)
    params = layer.init(jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)), jnp.float32)
    dense = linen.Dense(features=head.num_outputs)
    np.testing.assert_allclose(dense.apply({"params": params}, x), layer.apply(params, x), rtol=1e-6)
    fparams = dense.init(jax.random.PRNGKey(1), x)["params"]
    assert jax.tree_util.tree_structure(fparams) == jax.tree_util.tree_structure(params)
    lin = nnx.Linear(7, 5, rngs=nnx.Rngs(0))
    lin.kernel[...] = params["kernel"]
    lin.bias[...] = params["bias"]
    np.testing.assert_allclose(lin(x), layer.apply(params, x), rtol=1e-6)
    assert flax.__version__


def test_optax_rows_of_the_native_equivalence_table_on_the_jax_backend():
    """The optax column of docs/semantics.md §10, computed by unihead's JAX backend."""
    from . import test_native_equivalence as T

    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731

    def ours(head, z, y, sw=None):
        return compiled(head).loss(f32(z), y, sw)

    o = optax
    pairs = [
        (ours(H.multiclass(T.K), T.Z, T.Y), o.softmax_cross_entropy_with_integer_labels(f32(T.Z), T.Y).mean()),
        (ours(H.multiclass(T.K, reduction="none"), T.Z, T.Y), o.softmax_cross_entropy_with_integer_labels(f32(T.Z), T.Y)),
        (ours(H.multiclass(T.K, label_smoothing=T.EPS), T.Z, T.Y),
         o.softmax_cross_entropy(f32(T.Z), o.smooth_labels(f32(np.eye(T.K)[T.Y]), T.EPS)).mean()),
        (ours(H.multiclass(T.K, label_format="probabilities"), T.Z, T.T_SOFT),
         o.softmax_cross_entropy(f32(T.Z), f32(T.T_SOFT)).mean()),
        (ours(H.multiclass(T.K), T.Z3, T.Y3), o.softmax_cross_entropy_with_integer_labels(f32(T.Z3), T.Y3).mean()),
        (ours(H.binary(), T.ZB[:, None], T.YB), o.sigmoid_binary_cross_entropy(f32(T.ZB), f32(T.YB)).mean()),
        (ours(H.binary(binary_units=2), T.Z[:, :2], T.YB),
         o.softmax_cross_entropy_with_integer_labels(f32(T.Z[:, :2]), T.YB.astype(int)).mean()),
        (ours(H.binary(focal_gamma=T.GAMMA), T.ZB[:, None], T.YB),
         o.sigmoid_focal_loss(f32(T.ZB), f32(T.YB), gamma=T.GAMMA).mean()),
        (ours(H.binary(focal_gamma=T.GAMMA, class_weights=[1 - T.ALPHA, T.ALPHA], reduction="sum"), T.ZB[:, None], T.YB),
         o.sigmoid_focal_loss(f32(T.ZB), f32(T.YB), alpha=T.ALPHA, gamma=T.GAMMA).sum()),
        (ours(H.multilabel(T.K), T.ZM, T.YM), o.sigmoid_binary_cross_entropy(f32(T.ZM), f32(T.YM)).mean()),
        (ours(H.multilabel(T.K, reduction="sum"), T.ZM, T.YM), o.sigmoid_binary_cross_entropy(f32(T.ZM), f32(T.YM)).mean(-1).sum()),
        (ours(H.multilabel(T.K, focal_gamma=T.GAMMA), T.ZM, T.YM), o.sigmoid_focal_loss(f32(T.ZM), f32(T.YM), gamma=T.GAMMA).mean()),
    ]
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=3e-6, atol=0)


@pytest.mark.parametrize("keep", ["inputs", "stats"])
def test_sparse_step_keeps_no_logits_sized_intermediate(keep):
    """jit(value_and_grad(loss)) of a sparse multiclass head: the accurate softmax runs in the
    same passes as optax's (one (N, K) array of exponentials, which XLA places in the gradient's
    buffer), so the step needs no more memory than optax's beyond a few per-row vectors."""
    n, k = 512, 1000
    z, y = jnp.zeros((n, k), jnp.float32), jnp.zeros((n,), jnp.int32)
    c = compiled(H.multiclass(k), keep=keep)

    def memory(f):
        m = jax.jit(jax.value_and_grad(f)).lower(z, y).compile().memory_analysis()
        return m.temp_size_in_bytes, m.output_size_in_bytes

    ours = memory(lambda x, t: c.loss(x, t))
    native = memory(lambda x, t: optax.softmax_cross_entropy_with_integer_labels(x, t).mean())
    assert ours[1] == native[1]
    assert ours[0] <= native[0] + 8 * n * 4, (ours, native)  # at most 8 more float32 (N,) vectors
    assert ours[0] < n * k * 4 // 8, ours  # nothing near an (N, K) buffer


# ------------------------------------------------------------------------------ end to end
def _mlp_train(head, x, y, steps=400):
    c = compiled(head)
    layer = c.layer(32)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
        "hidden": {"kernel": jax.random.normal(k1, (x.shape[1], 32)) * (2 / x.shape[1]) ** 0.5, "bias": jnp.zeros(32)},
        "head": layer.init(k2),
    }

    def logits(p, xb):
        return layer.apply(p["head"], jax.nn.relu(xb @ p["hidden"]["kernel"] + p["hidden"]["bias"]))

    tx = optax.adam(0.02)
    state = tx.init(params)
    xt, yt = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    yt.block_until_ready()
    c.loss(logits(params, xt[:8]), yt[:8])  # validate labels once, eagerly

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(lambda q: c.loss(logits(q, xb), yb))(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    for i in range(steps):
        j = (i * 64) % len(x)
        params, state, _ = step(params, state, xt[j : j + 64], yt[j : j + 64])
    return np.asarray(c.predict(logits(params, xt)))


@pytest.mark.parametrize(
    "head",
    [H.multiclass(4), H.binary(), H.binary(binary_units=2), H.multilabel(4)],
    ids=["multiclass", "binary-1", "binary-2", "multilabel"],
)
def test_small_mlp_trains_to_95_percent_with_optax(head):
    from .test_torch import synthetic

    x, y = synthetic(head.task)
    acc = (_mlp_train(head, x, y) == y).mean()
    assert acc > 0.95, acc


def test_labels_of_every_format_work_under_jit():
    rng = np.random.default_rng(5)
    for head in HEADS:
        c = compiled(head)
        z = jnp.asarray(rng.normal(size=(6, head.num_outputs)), jnp.float32)
        y = jnp.asarray(labels_for(head, 6, rng))
        assert np.all(np.isfinite(np.asarray(jax.jit(c.loss)(z, y))))
