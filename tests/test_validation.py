"""Bad input: every error names the argument, the offending value and index, and the fix."""

from __future__ import annotations

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .conftest import require

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
        (H.multiclass(4), Z4, np.array([True, False, True, True, False]), None, TypeError,
         r"class ids for label_format='sparse' \(integers, or floats with whole values\); got dtype "
         r"bool\. Pass labels\.astype\(int\), or use ClassificationHead\.binary\(\)"),
        (H.multiclass(4), Z4, np.array([0.0, 1.0, 2.5, 3.0, 0.0]), None, ValueError,
         r"labels\[2\] = 2\.5 is not a class id: ids are whole numbers in \[0, 4\) for num_classes=4 "
         r"\(integers, or floats with whole values\); pass integer class ids\."),
        (H.multiclass(4), Z4, np.array([0.0, 1.0, np.nan, 3.0, 0.0]), None, ValueError,
         r"labels\[2\] = nan is not a class id"),
        (H.multiclass(4), Z4, np.array([0.0, 1.0, 4.0, 3.0, 0.0]), None, ValueError,
         r"labels\[2\] = 4\.0 is not a class id: ids must be in \[0, 4\)"),
        (H.multiclass(4), Z4, np.array([[0], [1], [4], [3], [0]]), None, ValueError,
         r"labels\[2, 0\] = 4 is not a class id: ids must be in \[0, 4\)"),
        (H.multiclass(3000), np.zeros((2, 3000), np.float32), np.zeros(2, np.float16), None, TypeError,
         r"labels of dtype float16 cannot hold every class id of num_classes=3000 exactly \(whole "
         r"numbers only up to 2048\): pass integer class ids"),
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
    with pytest.raises(TypeError, match="class ids for label_format='sparse'"):
        loss(head, z, y.astype(bool), validate=False)


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


# ------------------------------------------------------------ one label rule on every backend
def _array(backend, x):
    """``x`` (NumPy) as the backend's array; None stays None."""
    if x is None or backend == "numpy":
        return x
    if backend == "torch":
        return require("torch").as_tensor(x)
    return require("jax.numpy").asarray(x)


def _result(backend, head, z, y, w=None):
    """The loss as a NumPy value, or the error raised: ``(type, message)``."""
    try:
        out = unihead.compile(head, backend).loss(_array(backend, z), _array(backend, y), _array(backend, w))
    except (ValueError, TypeError) as exc:
        return type(exc), str(exc)
    return np.asarray(out.detach() if hasattr(out, "detach") else out)


IDS = np.array([0, 3, 1, 2, 0])
# Labels in the forms the rule accepts besides integer ids of shape (...): (head, logits, labels,
# the same labels as integer ids of shape (...)).
ACCEPTED = [
    (H.multiclass(4), Z4, IDS[:, None], IDS),  # Keras' (N, 1)
    (H.multiclass(4), Z4, IDS.astype(np.float32), IDS),  # float ids with whole values
    (H.multiclass(4), Z4, IDS.astype(np.float64)[:, None], IDS),
    (H.multiclass(4, ignore_index=-100, label_smoothing=0.1, class_weights=[1, 2, 3, 4]), Z4,
     np.array([0, -100, 1, 2, 3], np.float32)[:, None], np.array([0, -100, 1, 2, 3])),
    (H.multiclass(4), np.zeros((2, 3, 4), np.float32), np.array([[0, 1, 2], [3, 0, 1]])[..., None],
     np.array([[0, 1, 2], [3, 0, 1]])),
    (H.multiclass(2048), np.zeros((2, 2048), np.float32), np.array([0, 2047], np.float16),
     np.array([0, 2047])),  # float16 holds every id of 2048 classes
    (H.binary(), Z1, np.array([[0], [1], [1], [0], [1]], np.float32), np.array([0, 1, 1, 0, 1])),
]

# Labels the rule refuses: (head, logits, labels, sample weight).  float32 and int32 values, so
# that JAX without x64 holds the same values as NumPy and PyTorch.
REFUSED = [
    (H.multiclass(4), Z4, np.array([0, 1, 2.5, 1, 0], np.float32), None),
    (H.multiclass(4), Z4, np.array([[0], [1], [np.nan], [1], [0]], np.float32), None),
    (H.multiclass(4), Z4, np.array([[0], [1], [4], [1], [0]], np.int32), None),
    (H.multiclass(4), Z4, np.array([0, 1, 4, 1, 0], np.float32), None),
    (H.multiclass(4, ignore_index=-100), Z4, np.array([0, -100, -1, 2, 0], np.float32), None),
    (H.multiclass(4), Z4, np.array([True, False, True, True, False]), None),
    (H.multiclass(3000), np.zeros((2, 3000), np.float32), np.zeros(2, np.float16), None),
    (H.multiclass(4), Z4, np.zeros((5, 2), np.int32), None),
    (H.multiclass(4), Z4, np.zeros((5, 1, 1), np.int32), None),
    (H.binary(), Z1, np.array([[0], [1], [3], [1], [0]], np.float32), None),
    (H.binary(), Z1, np.array([[0], [1], [0.5], [1], [0]], np.float32), None),
    (H.multiclass(4), Z4, np.zeros(5, np.int32), np.array([1, 1, np.nan, 1, 1], np.float32)),
    # half precision is read as float32 on every backend (Ops.to_numpy): one message
    (H.multiclass(4), Z4, np.zeros(5, np.int32), np.array([1, 1, -0.1, 1, 1], np.float16)),
    (H.multiclass(4, label_format="one_hot"), Z4,
     np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], np.int32), None),
    (H.multiclass(4, label_format="probabilities"), Z4, np.full((5, 4), 0.3, np.float32), None),
]


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("head, z, y, ids", ACCEPTED, ids=lambda v: repr(v)[:40])
def test_one_label_rule_accepts_the_same_forms_on_every_backend(backend, head, z, y, ids):
    require({"numpy": "numpy", "torch": "torch", "jax": "jax"}[backend])
    rng = np.random.default_rng(1)
    z = rng.normal(size=z.shape).astype(np.float32)
    want = _result(backend, head, z, ids)
    assert isinstance(want, np.ndarray) and np.isfinite(want)
    np.testing.assert_array_equal(_result(backend, head, z, y), want)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("head, z, y, w", REFUSED, ids=lambda v: repr(v)[:40])
def test_refused_labels_get_the_same_error_on_every_backend(backend, head, z, y, w):
    require(backend)
    want = _result("numpy", head, z, y, w)
    assert isinstance(want, tuple), "the rule refuses this input"
    assert _result(backend, head, z, y, w) == want


def test_torch_fast_path_takes_labels_in_normal_form_only(monkeypatch):
    """TorchHead.loss hands labels of exact shape and a kernel dtype to the compiled kernel as
    they are; (N, 1) ids and float ids take the general path, which validates and converts them
    (int64 ids reach the kernel there)."""
    torch = require("torch")
    c = unihead.compile(H.multiclass(4), "torch")
    asked = []
    monkeypatch.setattr(c._kernels.aot, "runner", lambda *a, **k: asked.append((a, k)) or None)
    z = torch.randn(8, 4)
    ids = torch.randint(0, 4, (8,))
    c.loss(z, ids)
    assert asked[0] == ((0, torch.int64), {})  # the short path
    for y in (ids[:, None], ids.float(), ids.double()[:, None]):
        asked.clear()
        out = c.loss(z, y)
        assert asked and all("count" in k and a[1] == torch.int64 for a, k in asked), (y.shape, y.dtype)
        assert torch.equal(out, c.loss(z, ids))


def test_torch_kernel_label_dtypes_are_the_ones_validation_takes_as_they_are():
    torch = require("torch")
    from unihead.backends.torch import _kernel_labels

    candidates = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for head in (H.multiclass(3), H.binary(), H.multilabel(3), H.multiclass(3, label_format="one_hot"),
                 H.multiclass(3, label_format="probabilities"), H.binary(label_format="probabilities")):
        c = unihead.compile(head, "torch", fused=False)
        z = torch.zeros(4, head.num_outputs)
        y = {"sparse": torch.tensor([0, 1, 2, 0]), "binary": torch.tensor([0, 1, 1, 0]),
             "multi_hot": torch.eye(3)[[0, 1, 2, 0]], "one_hot": torch.eye(3)[[0, 1, 2, 0]],
             "probabilities": torch.eye(3)[[0, 1, 2, 0]] if head.task == "multiclass" else torch.tensor([0.0, 1, 0.5, 0])}[head.label_format]
        taken = set(_kernel_labels(head))
        assert taken <= set(candidates)
        for dtype in candidates:
            try:
                normalised, _ = c._inputs(z, y.to(dtype), None)
            except TypeError:
                assert dtype not in taken
                continue
            # what the kernel takes, validation passes on unconverted (apart from the cast to the
            # logits' dtype the kernel does itself); sparse float ids are converted: not the kernel's
            if dtype in taken:
                assert head.label_format != "sparse" or normalised.dtype == dtype
            else:
                assert dtype in (torch.float16, torch.bfloat16) or (
                    head.label_format == "sparse" and dtype.is_floating_point)


# ------------------------------------------------------------------- JAX: checks inside jit
_VALUE_ERRORS = [case for case in REFUSED if _result("numpy", *case)[0] is ValueError
                 and "shape" not in _result("numpy", *case)[1]]
_VALUE_ERRORS += [
    # a long one-hot row is shown summarised, the same in both
    (H.multiclass(20, label_format="one_hot"), np.zeros((2, 20), np.float32),
     np.stack([np.eye(20, dtype=np.float32)[3], np.eye(20, dtype=np.float32)[3] * 0]), None),
    (H.multilabel(4), Z4, np.zeros((5, 4), np.float32), np.array([[1, 1, 1, 1]] * 4 + [[1, 1, -1, 1]], np.float32)),
    (H.binary(), Z1, np.array([0, 1, np.nan, 1, 0], np.float32), None),
    (H.multiclass(4, label_format="probabilities"), np.zeros((2, 3, 4), np.float32),
     np.full((2, 3, 4), 0.25, np.float32) * np.array([1, 1, 1, 1, 1, 1.5]).reshape(2, 3, 1).astype(np.float32), None),
]


@pytest.mark.parametrize("head, z, y, w", _VALUE_ERRORS, ids=lambda v: repr(v)[:40])
def test_jax_checkify_catches_bad_values_inside_jit_with_the_eager_message(head, z, y, w):
    jax = require("jax")
    from jax.experimental import checkify

    kind, message = _result("numpy", head, z, y, w)
    assert kind is ValueError
    c = unihead.compile(head, "jax", checkify=True)
    args = tuple(_array("jax", a) for a in (z, y, w))
    for step in (jax.jit(c.loss), jax.jit(jax.grad(lambda t, *a: c.loss(t, *a).sum()))):
        err, _ = checkify.checkify(step)(*args)
        assert err.get() == message + " (`check` failed)"  # JAX appends its own suffix
        with pytest.raises(ValueError) as raised:  # checkify's JaxRuntimeError is a ValueError
            err.throw()
        assert str(raised.value).startswith(message)
    # also with the checks inside jit, and through vmap: a batch of one bad and one good input
    if w is None:
        good = _array("jax", np.asarray(_ok_labels(head, y), y.dtype))
        err, _ = jax.jit(checkify.checkify(jax.vmap(c.loss)))(
            jax.numpy.stack([args[0]] * 2), jax.numpy.stack([good, args[1]]))
        assert err.get() == message + " (`check` failed)"  # the index within the example


def _ok_labels(head, y):
    """Valid labels of ``y``'s shape for ``head``."""
    if head.label_format == "one_hot":
        return np.eye(y.shape[-1])[np.zeros(y.shape[:-1], int)]
    if head.label_format == "probabilities":
        return np.full(y.shape, 1 / y.shape[-1])
    return np.zeros(y.shape)


def test_jax_checks_inside_jit_are_opt_in_and_validate_false_emits_none():
    """Without checkify=True a jitted loss has no effects (jit keeps its fast dispatch path) and
    nothing for checkify to find; with it, the compiled program is the same (the checks' operands
    are dropped) but the function carries checkify's effect."""
    jax = require("jax")
    import re

    from jax.experimental import checkify

    head = H.multiclass(4, ignore_index=-100)
    jnp = jax.numpy
    z, y = jnp.zeros((5, 4)), jnp.asarray([0, 1, 7, 2, 0])
    w = jnp.asarray([1.0, 1, 1, np.nan, 1])

    def step(**options):
        return jax.value_and_grad(unihead.compile(head, "jax", **options).loss)

    def program(**options):
        text = re.sub(r", metadata=\{[^}]*\}", "", jax.jit(step(**options)).lower(z, y, w).compile().as_text())
        ops = [line.strip() for line in text.splitlines() if re.match(r"\s*(ROOT )?%\S+ = ", line)]
        return sorted(re.sub(r"%([A-Za-z_]+)[.\d]*", r"%\1", op) for op in ops)  # names aside

    # the default: no effect in the traced function, nothing for checkify to find
    assert not jax.make_jaxpr(step())(z, y, w).effects
    err, _ = checkify.checkify(jax.jit(unihead.compile(head, "jax").loss))(z, y, w)
    assert err.get() is None
    # checkify=True: an effect (the checks), and the same compiled program
    assert jax.make_jaxpr(step(checkify=True))(z, y, w).effects
    assert program(checkify=True) == program()
    jax.jit(unihead.compile(head, "jax", checkify=True).loss)(z, y, w)  # plain jit: no error
    # validate=False, or validation switched off while tracing: nothing for checkify to find
    err, _ = checkify.checkify(jax.jit(unihead.compile(head, "jax", validate=False, checkify=True).loss))(z, y, w)
    assert err.get() is None
    assert not jax.make_jaxpr(step(validate=False, checkify=True))(z, y, w).effects
    with unihead.validation(False):
        err, _ = checkify.checkify(jax.jit(unihead.compile(head, "jax", checkify=True).loss))(z, y, w)
    assert err.get() is None
    # valid inputs: checkify finds nothing, and the loss is the eager one
    good = jnp.asarray([0, 1, -100, 2, 0])
    c = unihead.compile(head, "jax", checkify=True)
    err, out = checkify.checkify(jax.jit(c.loss))(z, good, w.at[3].set(2.0))
    assert err.get() is None
    assert float(out) == float(unihead.compile(head, "jax").loss(z, good, w.at[3].set(2.0)))
    with pytest.raises(ValueError, match="checkify must be one of False, True"):
        unihead.compile(head, "jax", checkify="yes")


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_logits_of_a_dtype_no_backend_computes_in_get_the_same_error(backend):
    """Floating dtypes other than float16, bfloat16, float32 and float64 (float8, NumPy's long
    double) are refused up front with unihead's TypeError, not a crash inside the formulas."""
    require(backend)
    z = np.zeros((5, 4), np.float32)
    if backend == "numpy":
        z, name = z.astype(np.longdouble), np.dtype(np.longdouble).name
    elif backend == "torch":
        torch = require("torch")
        z, name = torch.as_tensor(z).to(torch.float8_e4m3fn), "float8_e4m3fn"
    else:
        jnp = require("jax.numpy")
        z, name = jnp.asarray(z, jnp.float8_e4m3fn), "float8_e4m3fn"
    c = unihead.compile(H.multiclass(4), backend)
    for call in (c.probabilities, c.predict, lambda z: c.loss(z, np.zeros(5, np.int32))):
        with pytest.raises(TypeError, match=rf"float16, bfloat16, float32 or float64 .*got dtype {name}\."):
            call(z)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("head", [H.multiclass(3), H.binary(), H.multilabel(3), H.multiclass(3, label_format="probabilities")],
                         ids=repr)
def test_labels_of_a_dtype_no_backend_computes_in_get_unihead_error(backend, head):
    """Floating labels of float8 are refused as logits are, with unihead's TypeError: before, sparse
    float8 ids failed with a KeyError and float8 probabilities inside PyTorch's comparison kernel."""
    require(backend)
    rows = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    y = {"sparse": np.array([0.0, 1, 2, 0], np.float32), "binary": np.array([0.0, 1, 1, 0], np.float32)}.get(
        head.label_format, rows)
    if backend == "torch":
        torch = require("torch")
        y, z = torch.as_tensor(y).to(torch.float8_e4m3fn), torch.zeros(4, head.num_outputs)
    else:
        jnp = require("jax.numpy")
        y, z = jnp.asarray(y, jnp.float8_e4m3fn), jnp.zeros((4, head.num_outputs))
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64; got dtype float8_e4m3fn: cast"):
        unihead.compile(head, backend).loss(z, y)


@pytest.mark.parametrize("order", [">", "<"])
def test_float_labels_in_either_byte_order_are_taken(order):
    """NumPy float16/32/64 labels of either byte order are those dtypes (their str is '>f4')."""
    for head in (H.multiclass(3), H.binary(), H.multilabel(3)):
        y = np.eye(3)[[0, 1, 2, 1]] if head.task == "multilabel" else np.array([0.0, 1, 1, 0])
        z = np.random.default_rng(1).normal(size=(4, head.num_outputs)).astype(np.float32)
        want = unihead.compile(head, "numpy").loss(z, y.astype(np.float64))
        for size in (2, 4, 8):
            got = unihead.compile(head, "numpy").loss(z, y.astype(f"{order}f{size}"))
            assert float(got) == float(want)


def test_bfloat16_labels_on_numpy_get_an_error_that_says_what_to_do():
    """NumPy cannot classify ml_dtypes' bfloat16 (np.isdtype refuses it): labels in it are refused
    with what to write instead, not as "not a numeric array"."""
    ml_dtypes = require("ml_dtypes")
    z = np.zeros((3, 3), np.float32)
    with pytest.raises(TypeError, match=r"labels of dtype bfloat16 are not taken by the numpy backend: cast them to float32"):
        unihead.compile(H.multilabel(3), "numpy").loss(z, np.eye(3).astype(ml_dtypes.bfloat16))
