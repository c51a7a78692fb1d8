"""A batch in pieces (docs/semantics.md §7, "A batch in pieces"): micro-batches combined through
``loss_weight`` and ``loss(..., normalizer=W)`` give the whole batch's loss and gradient, on
NumPy, PyTorch and JAX, for every task and label format with every option; the naive mean of the
pieces' means does not.  Then the contract itself: ``loss_terms``, ``loss_weight`` against an
independent NumPy expectation, the all-ignored batch, hostile normalizers, no gradient through
the weight, ``torch.compile`` and ``jax.jit``.

The measure (:func:`_ulps`): per element, ``|g_split - g_full|`` in units of the float32 spacing
at ``max(|g_full|, |g_split|)`` (both 0: they must be equal); the loss likewise.  Why the bounds:
a row's gradient is computed by the same row-wise kernel in a piece and in the whole batch; only
its scale differs.  The whole batch divides by its own weight (one accurately rounded sum), a
piece by ``W``, the sum of the ``P`` pieces' float32 weights (``P - 1`` more roundings of ½ ulp),
and the framework applies the division in its own order (the weight's share ``w / sum(w)``, or
``1 / W`` into the upstream gradient): up to 4 roundings of ½ ulp.  Hence ``GRAD_ULP(P) = 2 +
ceil((P - 1) / 2)``: 3, 3 and 5 ulp for 2, 3 and 7 pieces.  The loss adds ``P`` quotients
(``P`` divisions and ``P - 1`` additions of positive terms, ½ ulp each of the sum) against one
division, with ``W``'s ``P - 1`` roundings: ``LOSS_ULP(P) = 1 + (P - 1)``.  Measured worst over
the matrix (NumPy, PyTorch; JAX on every format with every option): 2.0 ulp for the loss and 2.0 ulp for the gradient.  Keras runs
the same split in the conformance suite (its workers; ``unihead conformance``'s split columns).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .conftest import require



def GRAD_ULP(p: int) -> float:  # noqa: N802 - the bounds of the module docstring
    return 2.0 + math.ceil((p - 1) / 2)


def LOSS_ULP(p: int) -> float:  # noqa: N802
    return 1.0 + (p - 1)


#: the naive mean of means must be off by at least this (relative): far above rounding
NAIVE_MIN = 1e-2

N = 10
#: uneven micro-batch sizes (few distinct sizes: JAX compiles its operations once per shape);
#: the piece DEAD[p] of each split weighs nothing at all
SPLITS = {2: [3, 7], 3: [2, 1, 7], 7: [1, 2, 1, 3, 1, 1, 1]}
DEAD = {2: 0, 3: 1, 7: 3}
K = 5
CW = [0.5, 2.0, 1.25, 3.0, 0.75]


def _heads() -> list[tuple[str, H]]:
    """Every task and label format, each plain (only ignored labels or zero sample weights) and
    with every option at once (ignore_index, class weights, label smoothing, focal, pos_weight)."""
    out = []
    for units in (1, 2):
        out.append((f"binary-{units}u", H.binary(binary_units=units, ignore_index=-1)))
        out.append((f"binary-{units}u-all", H.binary(binary_units=units, ignore_index=-1, class_weights=[0.7, 2.5],
                                                     label_smoothing=0.1, focal_gamma=2.0, pos_weight=1.5)))
    out.append(("binary-probabilities", H.binary(label_format="probabilities", class_weights=[0.7, 2.5],
                                                 focal_gamma=1.0)))
    out.append(("multiclass-sparse", H.multiclass(K, ignore_index=-100)))
    out.append(("multiclass-sparse-all", H.multiclass(K, ignore_index=-100, class_weights=CW, label_smoothing=0.1,
                                                      focal_gamma=2.0)))
    for fmt in ("one_hot", "probabilities"):
        out.append((f"multiclass-{fmt}", H.multiclass(K, label_format=fmt)))
        out.append((f"multiclass-{fmt}-all", H.multiclass(K, label_format=fmt, class_weights=CW, label_smoothing=0.2,
                                                          focal_gamma=2.0)))
    for fmt in ("multi_hot", "probabilities"):
        out.append((f"multilabel-{fmt}", H.multilabel(K, label_format=fmt)))
        out.append((f"multilabel-{fmt}-all", H.multilabel(K, label_format=fmt, class_weights=CW, label_smoothing=0.1,
                                                          focal_gamma=2.0, pos_weight=[1.0, 2.0, 0.5, 1.5, 3.0])))
    return out


HEADS = _heads()
#: the heads with no option but the ignored labels or zero weights (JAX runs the others: every
#: task and format with every option)
PLAIN = {name for name, _ in HEADS if not name.endswith("-all") and name != "binary-probabilities"}


def _labels(head: H, n: int, rng: np.random.Generator) -> np.ndarray:
    k = head.num_classes
    if head.task == "multiclass":
        ids = rng.integers(0, k, n)
        if head.label_format == "sparse":
            return ids
        if head.label_format == "one_hot":
            return np.eye(k, dtype=np.float32)[ids]
        return rng.dirichlet(np.ones(k), n).astype(np.float32)
    if head.task == "binary":
        if head.label_format == "binary":
            return (rng.uniform(size=n) < 0.5).astype(np.float32)
        return rng.uniform(size=n).astype(np.float32)
    if head.label_format == "multi_hot":
        return (rng.uniform(size=(n, k)) < 0.4).astype(np.float32)
    return rng.uniform(size=(n, k)).astype(np.float32)


def _dead(p: int) -> slice:
    sizes = SPLITS[p]
    return slice(sum(sizes[:DEAD[p]]), sum(sizes[:DEAD[p] + 1]))


def batch(head: H, p: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits, labels and sample weights (zeros included) of N examples whose piece ``DEAD[p]``
    of the ``p``-piece split weighs nothing: its labels ignored where the head has an
    ignore_index, else its weights 0; a further 20% of the other labels ignored (and every
    fourth weight 0)."""
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(N, head.num_outputs)) * 3).astype(np.float32)
    y = _labels(head, N, rng)
    sw = np.round(rng.uniform(0.0, 2.0, N), 3).astype(np.float32)
    sw[::4] = 0.0
    dead = _dead(p)
    if head.ignore_index is not None:
        y = y.astype(np.int64 if head.task == "multiclass" else np.float32)
        y[rng.uniform(size=N) < 0.2] = head.ignore_index
        y[dead] = head.ignore_index
    else:
        sw[dead] = 0.0
    return z, y, sw


# ----------------------------------------------------------------------------- backends
class Backend:
    """The loss of a head and its gradient with respect to the logits, by the framework."""

    name = "?"

    def array(self, x: np.ndarray):
        return x

    def numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def value_and_grad(self, c, z, y, sw, normalizer=None):
        raise NotImplementedError


class NumpyBackend(Backend):
    name = "numpy"

    def value_and_grad(self, c, z, y, sw, normalizer=None):
        if normalizer is None:
            return c.loss_and_gradient(z, y, sw)
        # NumPy has no autodiff: the chain rule of total / W, the total's analytic gradient over W
        _, g = unihead.compile(c.head.replace(reduction="sum"), "numpy").loss_and_gradient(z, y, sw)
        w = np.float32(normalizer)
        return c.loss(z, y, sw, normalizer=normalizer), (g / w if w > 0 else np.zeros_like(g))


class TorchBackend(Backend):
    name = "torch"

    def array(self, x):
        import torch

        return torch.as_tensor(x)

    def numpy(self, x):
        return x.detach().numpy()

    def value_and_grad(self, c, z, y, sw, normalizer=None):
        z = z.detach().requires_grad_()
        loss = c.loss(z, y, sw, normalizer=normalizer)
        loss.backward()
        return loss, z.grad


class JaxBackend(Backend):
    name = "jax"

    def array(self, x):
        import jax.numpy as jnp

        return jnp.asarray(x)

    def value_and_grad(self, c, z, y, sw, normalizer=None):
        import jax

        return jax.value_and_grad(lambda t: c.loss(t, y, sw, normalizer=normalizer))(z)


BACKENDS = {"numpy": NumpyBackend, "torch": TorchBackend, "jax": JaxBackend}


def _ulps(got: np.ndarray, want: np.ndarray) -> float:
    """The measure of the module docstring: worst per-element difference in float32 ulp at the
    larger magnitude of the two (float64 arithmetic; exact for float32 values)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    big = np.maximum(np.abs(got), np.abs(want))
    ulp = np.spacing(big.astype(np.float32)).astype(np.float64)
    err = np.where(big == 0, 0.0, np.abs(got - want) / np.where(big == 0, 1.0, ulp))
    return float(err.max()) if err.size else 0.0


def split_run(be: Backend, c, z, y, sw, sizes, naive: bool = True):
    """The contract's accumulation: W = sum of the pieces' loss_weight (before any forward pass),
    then loss(piece, normalizer=W) per piece; the losses added, the gradients in place.  Beside
    it (``naive``) the naive mean of means: each piece's own loss, the mean of those, gradients
    averaged."""
    bounds = np.cumsum([0] + sizes)
    pieces = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    arr = be.array
    weights = [c.loss_weight(arr(y[p]), arr(sw[p])) for p in pieces]
    big_w = weights[0]
    for w in weights[1:]:
        big_w = big_w + w
    loss, grad = None, []
    naive_loss, naive_grad = 0.0, []
    for p in pieces:
        zl, yl, swl = arr(z[p]), arr(y[p]), arr(sw[p])
        l_i, g_i = be.value_and_grad(c, zl, yl, swl, big_w)
        loss = l_i if loss is None else loss + l_i
        grad.append(be.numpy(g_i))
        if not naive:
            continue
        m_i, gm_i = be.value_and_grad(c, zl, yl, swl)
        naive_loss += float(be.numpy(m_i)) / len(pieces)
        naive_grad.append(be.numpy(gm_i) / len(pieces))
    return be.numpy(loss), np.concatenate(grad), naive_loss, naive_grad and np.concatenate(naive_grad), be.numpy(big_w)


MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_micro_batches_give_the_full_batch_loss_and_gradient(backend):
    require(backend)
    be = BACKENDS[backend]()
    worst = {"loss": 0.0, "grad": 0.0}
    naive = {"loss": math.inf, "grad": math.inf, "loss_max": 0.0, "grad_max": 0.0}
    for hi, (name, head) in enumerate(HEADS):
        if backend == "jax" and name in PLAIN:  # JAX compiles per shape: every format, every option
            continue
        c = unihead.compile(head, backend)
        for p, sizes in SPLITS.items():
            z, y, sw = batch(head, p, seed=100 * hi + p)
            full_loss, full_grad = be.value_and_grad(c, be.array(z), be.array(y), be.array(sw))
            full_loss, full_grad = float(be.numpy(full_loss)), be.numpy(full_grad)
            loss, grad, n_loss, n_grad, big_w = split_run(be, c, z, y, sw, sizes, naive=backend != "jax")
            where = f"{name}, {p} pieces {sizes}"
            assert full_loss > 0 and np.abs(full_grad).max() > 0, where
            # W is the whole batch's weight, and the dead piece's gradient is exactly 0
            _, weight = c.loss_terms(be.array(z), be.array(y), be.array(sw))
            assert _ulps(big_w, be.numpy(weight)) <= 1.0, where
            assert np.all(grad[_dead(p)] == 0), where
            e_loss, e_grad = _ulps(loss, full_loss), _ulps(grad, full_grad)
            assert e_loss <= LOSS_ULP(p), (where, e_loss)
            assert e_grad <= GRAD_ULP(p), (where, e_grad)
            worst["loss"], worst["grad"] = max(worst["loss"], e_loss), max(worst["grad"], e_grad)
            if backend == "jax":  # the naive numbers are the data's, not the framework's: measured on the others
                continue
            # the naive mean of means is off by a real amount on the same data
            d_loss = abs(n_loss - full_loss) / full_loss
            d_grad = float(np.abs(n_grad - full_grad).max() / np.abs(full_grad).max())
            assert d_loss > NAIVE_MIN and d_grad > NAIVE_MIN, (where, d_loss, d_grad)
            naive["loss"], naive["grad"] = min(naive["loss"], d_loss), min(naive["grad"], d_grad)
            naive["loss_max"], naive["grad_max"] = max(naive["loss_max"], d_loss), max(naive["grad_max"], d_grad)
    MEASURED[backend] = (worst, naive)
    if backend == "jax":
        print(f"\njax: contract worst {worst['loss']:.2f} ulp (loss), {worst['grad']:.2f} ulp (gradient)")
        return
    print(f"\n{backend}: contract worst {worst['loss']:.2f} ulp (loss), {worst['grad']:.2f} ulp (gradient); naive "
          f"mean of means off by {naive['loss']:.3g}..{naive['loss_max']:.3g} (loss, relative), "
          f"{naive['grad']:.3g}..{naive['grad_max']:.3g} (gradient, relative to its largest entry)")


# ----------------------------------------------------------------------------- the contract
def expected_weight(head: H, y: np.ndarray, sw: np.ndarray | None) -> float:
    """docs/semantics.md §6-7 in NumPy, independently of unihead: each example counts its
    sample weight x its class weight x 0 if ignored; a multilabel example the mean of its
    labels' weights."""
    y = np.asarray(y, np.float64)
    n = y.shape[0]
    cw = None if head.class_weights is None else np.asarray(head.class_weights, np.float64)
    if head.task == "multilabel":
        w = np.ones(y.shape)
        if sw is not None:
            w = w * np.asarray(sw, np.float64).reshape(n, -1)
        if cw is not None:
            w = w * cw
        return float(w.mean(-1).sum())
    w = np.ones(n) if sw is None else np.asarray(sw, np.float64)
    valid = np.ones(n, bool) if head.ignore_index is None else y != head.ignore_index
    if cw is not None:
        if head.task == "binary":
            q = np.where(valid, y, 0.0)
            w = w * (cw[0] * (1 - q) + cw[1] * q)
        elif head.label_format == "sparse":
            w = w * cw[np.where(valid, y, 0).astype(int)]
        else:
            w = w * (y * cw).sum(-1)
    return float(np.where(valid, w, 0.0).sum())


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_loss_terms_and_loss_weight_against_numpy(backend):
    require(backend)
    be = BACKENDS[backend]()
    for hi, (name, head) in enumerate(HEADS):
        c = unihead.compile(head, backend)
        summed = unihead.compile(head.replace(reduction="sum"), backend)
        z, y, sw = batch(head, 3, seed=hi)
        for weights in (None, sw):
            zz, yy = be.array(z), be.array(y)
            ww = None if weights is None else be.array(weights)
            total, weight = c.loss_terms(zz, yy, ww)
            # the total is reduction="sum", bit for bit; the weight the semantics' denominator
            assert float(be.numpy(total)) == float(be.numpy(summed.loss(zz, yy, ww))), name
            want = expected_weight(head, y, weights)
            assert abs(float(be.numpy(weight)) - want) <= 4 * np.spacing(np.float32(want)), (name, weight, want)
            assert float(be.numpy(c.loss_weight(yy, ww))) == float(be.numpy(weight)), name
            # the mean is total / weight: the rounded total, weight and quotient, <= 1.5 ulp apart
            mean = float(be.numpy(c.loss(zz, yy, ww)))
            assert _ulps(mean, float(be.numpy(total)) / float(be.numpy(weight))) <= 1.5, name


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_an_all_ignored_batch_weighs_0_and_normalizer_0_gives_0(backend):
    require(backend)
    be = BACKENDS[backend]()
    head = H.multiclass(K, ignore_index=-100, class_weights=CW)
    c = unihead.compile(head, backend)
    z = be.array(np.random.default_rng(0).normal(size=(4, K)).astype(np.float32))
    y = be.array(np.full(4, -100))
    total, weight = c.loss_terms(z, y)
    assert float(be.numpy(total)) == 0.0 and float(be.numpy(weight)) == 0.0
    assert float(be.numpy(c.loss_weight(y))) == 0.0
    loss, grad = be.value_and_grad(c, z, y, None, 0.0)
    assert float(be.numpy(loss)) == 0.0 and np.all(be.numpy(grad) == 0)
    # an all-zero sample weight too, and normalizer given as the 0-d array loss_weight returns
    sw = be.array(np.zeros(4, np.float32))
    loss, grad = be.value_and_grad(c, z, be.array(np.arange(4) % K), sw, c.loss_weight(be.array(np.arange(4) % K), sw))
    assert float(be.numpy(loss)) == 0.0 and np.all(be.numpy(grad) == 0)


HOSTILE = [
    (-1.0, ValueError, "finite and >= 0"), (float("nan"), ValueError, "finite and >= 0"),
    (float("inf"), ValueError, "finite and >= 0"), (True, TypeError, "a number or a 0-d array"),
    ("12", TypeError, "a number or a 0-d array"), (np.ones(2, np.float32), ValueError, "scalar"),
    ([3.0], TypeError, "a number or a 0-d array"), (np.array(np.nan, np.float32), ValueError, "finite and >= 0"),
    (np.array(-2.0), ValueError, "finite and >= 0"), (np.array(np.inf), ValueError, "finite and >= 0"),
    (np.array(True), TypeError, "0-d array of numbers"), (None, None, None),
]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_hostile_normalizers_get_unihead_errors(backend):
    require(backend)
    be = BACKENDS[backend]()
    c = unihead.compile(H.multiclass(3), backend)
    z, y = be.array(np.zeros((2, 3), np.float32)), be.array(np.array([0, 2]))
    for bad, exc, words in HOSTILE:
        if exc is None:
            continue
        with pytest.raises(exc, match="normalizer must") as info:
            c.loss(z, y, normalizer=bad)
        assert words in str(info.value), (bad, str(info.value))
    if backend == "torch":  # the framework's own scalar tensors, checked alike
        import torch

        with pytest.raises(ValueError, match="finite and >= 0"):
            c.loss(z, y, normalizer=torch.tensor(float("nan")))
        assert float(c.loss(z, y, normalizer=torch.tensor(2))) > 0  # an integer count is a weight
    none = unihead.compile(H.multiclass(3, reduction="none"), backend)
    with pytest.raises(ValueError, match="reduction='none'"):
        none.loss(z, y, normalizer=2.0)
    with pytest.raises(ValueError, match="dtype must be"):
        c.loss_weight(y, dtype="int32")


def test_float64_weights_with_dtype():
    """A float64 model with class weights and integer labels: loss_weight(dtype=float64) is the
    float64 mean's denominator (float32 class weights are not)."""
    head = H.multiclass(3, class_weights=[0.1, 0.7, 1.3])
    c = unihead.compile(head, "numpy")
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(9, 3)), rng.integers(0, 3, 9)
    w64 = c.loss_weight(y, dtype=np.float64)
    assert w64.dtype == np.float64 and w64 == c.loss_terms(z, y)[1]
    assert c.loss_weight(y).dtype == np.float32
    pieces = [slice(0, 4), slice(4, 9)]
    big_w = sum(c.loss_weight(y[p], dtype="float64") for p in pieces)
    split = sum(c.loss(z[p], y[p], normalizer=big_w) for p in pieces)
    assert _ulps64(split, c.loss(z, y)) <= 2.0


def _ulps64(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / np.spacing(max(abs(a), abs(b)))


def test_the_weight_is_not_differentiated():
    torch = require("torch")
    jax = require("jax")
    head = H.multiclass(3, class_weights=[1.0, 2.0, 0.5])
    z = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    y, sw = np.array([0, 1, 2, 1]), np.array([0.5, 1.0, 0.0, 2.0], np.float32)
    c = unihead.compile(head, "torch")
    tsw = torch.tensor(sw, requires_grad=True)
    total, weight = c.loss_terms(torch.tensor(z, requires_grad=True), torch.tensor(y), tsw)
    assert total.requires_grad and not weight.requires_grad
    assert not c.loss_weight(torch.tensor(y), tsw).requires_grad
    j = unihead.compile(head, "jax")
    g = jax.grad(lambda s: j.loss_terms(z, y, s)[1])(jax.numpy.asarray(sw))
    assert np.all(np.asarray(g) == 0)
    g = jax.grad(lambda s: j.loss_weight(y, s))(jax.numpy.asarray(sw))
    assert np.all(np.asarray(g) == 0)
    # nor the normalizer: d/dW of loss(normalizer=W) is 0
    g = jax.grad(lambda w: j.loss(z, y, sw, normalizer=w))(jax.numpy.asarray(3.0))
    assert float(g) == 0.0


def test_jax_jit_with_a_traced_normalizer():
    jax = require("jax")
    head = H.multilabel(4, class_weights=[1.0, 2.0, 0.5, 1.5], focal_gamma=1.0)
    c = unihead.compile(head, "jax")
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    y = (rng.uniform(size=(6, 4)) < 0.5).astype(np.float32)
    sw = rng.uniform(0, 2, 6).astype(np.float32)
    terms = jax.jit(c.loss_terms)(z, y, sw)
    eager = c.loss_terms(z, y, sw)
    assert all(_ulps(np.asarray(a), np.asarray(b)) <= 1.0 for a, b in zip(terms, eager))

    @jax.jit
    def step(z, y, sw):  # W from the labels, traced
        w = c.loss_weight(y[:2], sw[:2]) + c.loss_weight(y[2:], sw[2:])
        return sum(jax.value_and_grad(lambda t, p=p: c.loss(t, y[p], sw[p], normalizer=w))(z[p])[0]
                   for p in (slice(0, 2), slice(2, 6)))

    assert _ulps(np.asarray(step(z, y, sw)), np.asarray(c.loss(z, y, sw))) <= LOSS_ULP(2)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_a_normalizer():
    """The first call is compiled (the head's "sum" twin exists before Dynamo traces)."""
    torch = require("torch")
    head = H.multiclass(5, ignore_index=-100, class_weights=CW, label_smoothing=0.1)
    c = unihead.compile(head, "torch")
    rng = np.random.default_rng(3)
    z = torch.tensor(rng.normal(size=(8, 5)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 5, 8))
    y[2] = -100
    sw = torch.tensor(rng.uniform(0, 2, 8), dtype=torch.float32)
    w = c.loss_weight(y[:3], sw[:3]) + c.loss_weight(y[3:], sw[3:])

    def step(z, y, sw, w):
        return c.loss(z, y, sw, normalizer=w)

    compiled = torch.compile(step, fullgraph=True)  # a graph break is an error
    outs = []
    for fn in (compiled, step):
        zz = z.clone().requires_grad_()
        loss = fn(zz[:3], y[:3], sw[:3], w) + fn(zz[3:], y[3:], sw[3:], w)
        loss.backward()
        outs.append((loss.detach(), zz.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=2.0**-22, atol=0)
