"""Every row of the native-equivalence table (docs/semantics.md §10) that names a call.

unihead's value (NumPy backend, float64) against the framework's own call on the same moderate
logits.  PyTorch runs in float64 (agreement to 1e-12); Keras (JAX backend in this process) and
optax run in float32 (agreement to a few float32 ulp).  Rows marked "none" in the table are
checked to really differ where the table says so.
"""

from __future__ import annotations

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .conftest import require

N, K = 12, 5
RNG = np.random.default_rng(2024)
Z = RNG.normal(size=(N, K)) * 2
Y = RNG.integers(0, K, N)
Y[0] = 0
T_SOFT = RNG.dirichlet(np.ones(K), size=N)
W = np.array([0.5, 2.0, 1.0, 3.0, 0.25])
S = RNG.uniform(0.0, 2.0, N)
ZB = RNG.normal(size=N) * 2
YB = (RNG.uniform(size=N) < 0.5).astype(np.float64)
QB = RNG.uniform(size=N)
ZM = RNG.normal(size=(N, K)) * 2
YM = (RNG.uniform(size=(N, K)) < 0.4).astype(np.float64)
QM = RNG.uniform(size=(N, K))
Z3 = RNG.normal(size=(3, 4, K)) * 2
Y3 = RNG.integers(0, K, (3, 4))
Y_IGN = np.where(np.arange(N) % 3 == 1, -100, Y)
EPS, GAMMA, ALPHA, PW = 0.1, 2.0, 0.25, 3.0
CAP = 2.5  # logit_softcap: small enough that the cap changes every loss
PWM = np.array([1.0, 2.0, 0.5, 4.0, 1.5])


def ours(head, z, y, sw=None):
    return unihead.compile(head, "numpy").loss(np.asarray(z, np.float64), y, sw)


def onehot(y, k=K):
    return np.eye(k)[y]


# --------------------------------------------------------------------------- native callers
def torch_call(fn):
    def run():
        torch = require("torch")
        F = torch.nn.functional
        t = lambda a: torch.as_tensor(np.asarray(a))  # noqa: E731
        return np.asarray(fn(torch, F, t))

    return run


def keras_call(fn):
    def run():
        keras = require("keras")
        L = keras.losses
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        return np.asarray(keras.ops.convert_to_numpy(fn(L, f32)))

    return run


def optax_call(fn):
    def run():
        optax = require("optax")
        jnp = require("jax.numpy")
        return np.asarray(fn(optax, jnp))

    return run


ROWS = {
    # id: (unihead value thunk, {framework: native value thunk})
    "mc1": (lambda: ours(H.multiclass(K), Z, Y), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(Y))),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True)(Y, f(Z))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy_with_integer_labels(Z, Y).mean()),
    }),
    "mc2": (lambda: ours(H.multiclass(K, reduction="sum"), Z, Y), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(Y), reduction="sum")),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")(Y, f(Z))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy_with_integer_labels(Z, Y).sum()),
    }),
    "mc3": (lambda: ours(H.multiclass(K, reduction="none"), Z, Y), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(Y), reduction="none")),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(Y, f(Z))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy_with_integer_labels(Z, Y)),
    }),
    "mc4": (lambda: ours(H.multiclass(K, class_weights=W), Z, Y), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(Y), weight=t(W))),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight")(Y, f(Z), sample_weight=f(W[Y]))),
        "optax": optax_call(lambda o, jnp: (W[Y] * o.softmax_cross_entropy_with_integer_labels(Z, Y)).sum() / W[Y].sum()),
    }),
    "mc5": (lambda: ours(H.multiclass(K, ignore_index=-100), Z, Y_IGN), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(Y_IGN), ignore_index=-100)),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)(Y_IGN, f(Z))),
    }),
    "mc6": (lambda: ours(H.multiclass(K, class_weights=W, ignore_index=-100), Z, Y_IGN), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(Y_IGN), weight=t(W), ignore_index=-100)),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-100, reduction="mean_with_sample_weight")(
                Y_IGN, f(Z), sample_weight=f(W[np.clip(Y_IGN, 0, K - 1)]))),
    }),
    "mc7": (lambda: ours(H.multiclass(K, label_smoothing=EPS), Z, Y), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(Y), label_smoothing=EPS)),
        "keras": keras_call(lambda L, f: L.CategoricalCrossentropy(from_logits=True, label_smoothing=EPS)(f(onehot(Y)), f(Z))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy(Z, o.smooth_labels(onehot(Y), EPS)).mean()),
    }),
    "mc8": (lambda: ours(H.multiclass(K, label_smoothing=EPS, class_weights=W), Z, Y), {
        "keras": keras_call(lambda L, f: L.CategoricalCrossentropy(
            from_logits=True, label_smoothing=EPS, reduction="mean_with_sample_weight")(
                f(onehot(Y)), f(Z), sample_weight=f(W[Y]))),
    }),
    "mc9": (lambda: ours(H.multiclass(K, label_format="one_hot"), Z, onehot(Y)), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(onehot(Y)))),
        "keras": keras_call(lambda L, f: L.CategoricalCrossentropy(from_logits=True)(f(onehot(Y)), f(Z))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy(Z, onehot(Y)).mean()),
    }),
    "mc10": (lambda: ours(H.multiclass(K, label_format="probabilities"), Z, T_SOFT), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z), t(T_SOFT))),
        "keras": keras_call(lambda L, f: L.CategoricalCrossentropy(from_logits=True)(f(T_SOFT), f(Z))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy(Z, T_SOFT).mean()),
    }),
    "mc11": (lambda: ours(H.multiclass(K, label_format="probabilities", class_weights=W), Z, T_SOFT), {
        "keras": keras_call(lambda L, f: L.CategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight")(f(T_SOFT), f(Z), sample_weight=f(T_SOFT @ W))),
    }),
    "mc12": (lambda: ours(H.multiclass(K), Z, Y, S), {
        "torch": torch_call(lambda torch, F, t: (F.cross_entropy(t(Z), t(Y), reduction="none") * t(S)).sum() / t(S).sum()),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight")(Y, f(Z), sample_weight=f(S))),
    }),
    "mc12-keras-default": (lambda: ours(H.multiclass(K, reduction="sum"), Z, Y, S) / N, {
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True)(Y, f(Z), sample_weight=f(S))),
    }),
    "mc13": (lambda: ours(H.multiclass(K), Z3, Y3), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z3).movedim(-1, 1), t(Y3))),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True)(Y3, f(Z3))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy_with_integer_labels(Z3, Y3).mean()),
    }),
    "mc14": (lambda: ours(H.multiclass(K, focal_gamma=GAMMA), Z, Y), {
        "keras": keras_call(lambda L, f: L.CategoricalFocalCrossentropy(alpha=1.0, gamma=GAMMA, from_logits=True)(
            f(onehot(Y)), f(Z))),
    }),
    "mc15": (lambda: ours(H.multiclass(K, ignore_index=-100), Z, np.full(N, -100)), {
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100)(
            np.full(N, -100), f(Z))),
    }),
    "b1": (lambda: ours(H.binary(), ZB[:, None], YB), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZB), t(YB))),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True)(f(YB[:, None]), f(ZB[:, None]))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(ZB, YB).mean()),
    }),
    "b2": (lambda: ours(H.binary(binary_units=2), Z[:, :2], YB), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(t(Z[:, :2]), t(YB.astype(int)))),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True)(YB.astype(int), f(Z[:, :2]))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy_with_integer_labels(Z[:, :2], YB.astype(int)).mean()),
    }),
    "b3": (lambda: ours(H.binary(pos_weight=PW), ZB[:, None], YB), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(
            t(ZB), t(YB), pos_weight=torch.tensor(PW, dtype=torch.float64))),
    }),
    "b4": (lambda: ours(H.binary(label_smoothing=EPS), ZB[:, None], YB), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZB), t(YB * (1 - EPS) + EPS / 2))),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True, label_smoothing=EPS)(
            f(YB[:, None]), f(ZB[:, None]))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(ZB, YB * (1 - EPS) + EPS / 2).mean()),
    }),
    "b5": (lambda: ours(H.binary(class_weights=W[:2]), ZB[:, None], YB), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(
            t(ZB), t(YB), weight=t(W[YB.astype(int)]), reduction="sum") / W[YB.astype(int)].sum()),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True, reduction="mean_with_sample_weight")(
            f(YB[:, None]), f(ZB[:, None]), sample_weight=f(W[YB.astype(int)]))),
    }),
    "b6": (lambda: ours(H.binary(focal_gamma=GAMMA), ZB[:, None], YB), {
        "keras": keras_call(lambda L, f: L.BinaryFocalCrossentropy(gamma=GAMMA, from_logits=True)(
            f(YB[:, None]), f(ZB[:, None]))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_focal_loss(ZB, YB, gamma=GAMMA).mean()),
    }),
    "b7": (lambda: ours(H.binary(focal_gamma=GAMMA, class_weights=[1 - ALPHA, ALPHA], reduction="sum"), ZB[:, None], YB), {
        "keras": keras_call(lambda L, f: L.BinaryFocalCrossentropy(
            apply_class_balancing=True, alpha=ALPHA, gamma=GAMMA, from_logits=True, reduction="sum")(
                f(YB[:, None]), f(ZB[:, None]))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_focal_loss(ZB, YB, alpha=ALPHA, gamma=GAMMA).sum()),
    }),
    "ml1": (lambda: ours(H.multilabel(K), ZM, YM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZM), t(YM))),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True)(f(YM), f(ZM))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(ZM, YM).mean()),
    }),
    "ml2": (lambda: ours(H.multilabel(K, reduction="sum"), ZM, YM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZM), t(YM), reduction="sum") / K),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True, reduction="sum")(f(YM), f(ZM))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(ZM, YM).mean(-1).sum()),
    }),
    "ml3": (lambda: ours(H.multilabel(K, reduction="none"), ZM, YM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZM), t(YM), reduction="none").mean(-1)),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True, reduction=None)(f(YM), f(ZM))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(ZM, YM).mean(-1)),
    }),
    "ml4": (lambda: ours(H.multilabel(K, pos_weight=PWM), ZM, YM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZM), t(YM), pos_weight=t(PWM))),
    }),
    "ml5": (lambda: ours(H.multilabel(K, class_weights=W), ZM, YM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZM), t(YM), weight=t(W / W.mean()))),
    }),
    "ml6": (lambda: ours(H.multilabel(K, label_smoothing=EPS), ZM, YM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZM), t(YM * (1 - EPS) + EPS / 2))),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True, label_smoothing=EPS)(f(YM), f(ZM))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(ZM, YM * (1 - EPS) + EPS / 2).mean()),
    }),
    "ml7": (lambda: ours(H.multilabel(K, focal_gamma=GAMMA), ZM, YM), {
        "keras": keras_call(lambda L, f: L.BinaryFocalCrossentropy(gamma=GAMMA, from_logits=True)(f(YM), f(ZM))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_focal_loss(ZM, YM, gamma=GAMMA).mean()),
    }),
    "ml8": (lambda: ours(H.multilabel(K, label_format="probabilities"), ZM, QM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(t(ZM), t(QM))),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True)(f(QM), f(ZM))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(ZM, QM).mean()),
    }),
    # logit_softcap: the row's call on the capped logits (docs/semantics.md §5); the z-loss rows
    # name no call (their lines are run by tests/test_zsoft.py)
    "sc1": (lambda: ours(H.multiclass(K, logit_softcap=CAP), Z, Y), {
        "torch": torch_call(lambda torch, F, t: F.cross_entropy(CAP * torch.tanh(t(Z) / CAP), t(Y))),
        "keras": keras_call(lambda L, f: L.SparseCategoricalCrossentropy(from_logits=True)(
            f(Y), CAP * __import__("keras").ops.tanh(f(Z) / CAP))),
        "optax": optax_call(lambda o, jnp: o.softmax_cross_entropy_with_integer_labels(
            CAP * jnp.tanh(Z / CAP), Y).mean()),
    }),
    "sc2": (lambda: ours(H.multilabel(K, logit_softcap=CAP), ZM, YM), {
        "torch": torch_call(lambda torch, F, t: F.binary_cross_entropy_with_logits(CAP * torch.tanh(t(ZM) / CAP), t(YM))),
        "keras": keras_call(lambda L, f: L.BinaryCrossentropy(from_logits=True)(
            f(YM), CAP * __import__("keras").ops.tanh(f(ZM) / CAP))),
        "optax": optax_call(lambda o, jnp: o.sigmoid_binary_cross_entropy(CAP * jnp.tanh(ZM / CAP), YM).mean()),
    }),
}

CASES = [(row, fw) for row, (_, natives) in ROWS.items() for fw in natives]
RTOL = {"torch": 1e-12, "keras": 3e-6, "optax": 3e-6}


@pytest.mark.parametrize("row, framework", CASES, ids=[f"{r}-{f}" for r, f in CASES])
def test_native_call_gives_the_same_number(row, framework):
    ours_value, natives = ROWS[row]
    want = ours_value()
    got = natives[framework]()
    assert np.shape(got) == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=RTOL[framework], atol=1e-30)


def test_every_table_row_that_names_a_call_is_tested():
    """The table in docs/semantics.md and this file list the same calls."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "semantics.md").read_text()
    table = {}
    for line in doc.splitlines():
        m = re.match(r"\| (mc\d+|b\d+|ml\d+|sc\d+|zl\d+) \|", line)
        if m:
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[m.group(1)] = {
                fw: not cell.startswith("none") for fw, cell in zip(("torch", "keras", "optax"), cells[2:5])
            }
    assert len(table) == 34
    for rid, names in table.items():
        tested = set(ROWS.get(rid, (None, {}))[1])
        if rid == "mc12":
            tested |= {"torch"}  # the documented recipe is tested as the torch entry of mc12
        for fw, named in names.items():
            if named and rid != "mc15":
                assert fw in tested, f"row {rid} names a {fw} call that is not tested"


# ------------------------------------------------------------------- the documented differences
def test_where_the_table_says_none_the_frameworks_really_differ():
    torch = require("torch")
    F = torch.nn.functional
    t = torch.as_tensor
    # mc8: PyTorch weights the smoothing term per class
    a = ours(H.multiclass(K, label_smoothing=EPS, class_weights=W), Z, Y)
    b = F.cross_entropy(t(Z), t(Y), weight=t(W), label_smoothing=EPS).item()
    assert abs(a - b) > 1e-3
    # mc11: PyTorch's probability-target path weights classes inside the sum and divides by N
    a = ours(H.multiclass(K, label_format="probabilities", class_weights=W), Z, T_SOFT)
    b = F.cross_entropy(t(Z), t(T_SOFT), weight=t(W)).item()
    assert abs(a - b) > 1e-3
    # mc15: every example ignored: PyTorch NaN, unihead 0
    assert np.isnan(F.cross_entropy(t(Z), t(np.full(N, -100)), ignore_index=-100).item())
    assert ours(H.multiclass(K, ignore_index=-100), Z, np.full(N, -100)) == 0
    # ml2: PyTorch sums over labels, Keras and unihead average them
    a = ours(H.multilabel(K, reduction="sum"), ZM, YM)
    b = F.binary_cross_entropy_with_logits(t(ZM), t(YM), reduction="sum").item()
    np.testing.assert_allclose(b, K * a, rtol=1e-12)
