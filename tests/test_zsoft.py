"""The spec options ``z_loss`` (PaLM's auxiliary loss) and ``logit_softcap`` (Gemma 2's cap):
validation and serialisation, the values of every backend against an independent expectation
written here (50-digit mpmath, textbook formulas), the native lines of the equivalence table
(docs/semantics.md §10, rows sc1, sc2, zl1, zl2) executed, and the paths a head can take."""

from __future__ import annotations

import json
import math

import mpmath
import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead import formulas as F
from unihead.errors import HeadFileError, HeadSpecError
from unihead.spec import SPEC_VERSION

from .conftest import require

mpmath.mp.dps = 50


# ----------------------------------------------------------------------------- the expectation
def expected(head, z, y, sw=None):
    """Per-example weighted losses, the reduced loss and its gradient (of the sum of the
    per-example values for ``none``), probabilities: mpmath from the definitions of
    docs/semantics.md §5-§7 (softmax heads with integer or probability labels; 1-unit binary and
    multilabel heads with hard labels), independent of unihead's code."""
    z = np.asarray(z, np.float64)
    s = head.logit_softcap
    dt = np.float64 if np.asarray(z).dtype == np.float64 else np.float32
    s = None if s is None else mpmath.mpf(float(dt(s)))
    n, k = z.shape
    per, grads, probs = [], [], []
    for i in range(n):
        raw = [mpmath.mpf(float(v)) for v in z[i]]
        zc = [s * mpmath.tanh(v / s) for v in raw] if s else raw
        slope = [1 / mpmath.cosh(v / s) ** 2 for v in raw] if s else [1] * k
        w = mpmath.mpf(1) if sw is None else mpmath.mpf(float(sw[i]))
        if head.activation == "softmax":
            lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in zc))
            p = [mpmath.exp(v - lse) for v in zc]
            if head.label_format == "probabilities":
                t = [mpmath.mpf(float(v)) for v in y[i]]
            else:
                yi = int(y[i])
                if head.ignore_index is not None and yi == head.ignore_index:
                    w, yi = mpmath.mpf(0), 0
                if head.class_weights is not None:
                    w = w * mpmath.mpf(head.class_weights[yi])
                t = [mpmath.mpf(1 if j == yi else 0) for j in range(k)]
            eps = mpmath.mpf(head.label_smoothing)
            t = [(1 - eps) * tj + eps / k for tj in t]
            c = mpmath.mpf(head.z_loss)
            l = -mpmath.fsum(tj * (v - lse) for tj, v in zip(t, zc)) + c * lse**2
            g = [(p[j] * mpmath.fsum(t) - t[j] + 2 * c * lse * p[j]) * slope[j] for j in range(k)]
            per.append(w * l)
            grads.append([w * gj for gj in g])
            probs.append(p)
        else:  # hard labels, no smoothing / weights: softplus forms
            yy = [float(y[i])] if k == 1 else [float(v) for v in y[i]]
            ls, gs, ps = [], [], []
            for j in range(k):
                p = 1 / (1 + mpmath.exp(-zc[j]))
                ls.append(mpmath.log(1 + mpmath.exp(-zc[j])) if yy[j] == 1 else mpmath.log(1 + mpmath.exp(zc[j])))
                gs.append((p - yy[j]) * slope[j] / k)
                ps.append(p)
            per.append(w * mpmath.fsum(ls) / k)
            grads.append([w * gj for gj in gs])
            probs.append(ps)
    wsum = n if sw is None and head.ignore_index is None and head.class_weights is None else None
    if head.reduction == "mean":
        if wsum is None:
            weights = []
            for i in range(n):
                wi = mpmath.mpf(1) if sw is None else mpmath.mpf(float(sw[i]))
                if head.ignore_index is not None and int(y[i]) == head.ignore_index:
                    wi = 0
                elif head.class_weights is not None:
                    wi = wi * mpmath.mpf(head.class_weights[int(y[i])])
                weights.append(wi)
            wsum = mpmath.fsum(weights)
        loss = mpmath.fsum(per) / wsum
        grads = [[g / wsum for g in row] for row in grads]
    elif head.reduction == "sum":
        loss = mpmath.fsum(per)
    else:
        loss = per
    return loss, grads, probs, per


def ulps(got, want, dtype=np.float32, floor=0.0):
    """The largest ``|got - want|`` in ulp of ``dtype`` at ``|want|``, after an absolute allowance
    ``floor`` (the flush-to-zero allowance of docs/semantics.md §11)."""
    got = np.ravel(np.asarray(got, np.float64))
    want = np.ravel(np.array(want, dtype=object))
    worst = 0.0
    for g, w in zip(got, want):
        spacing = float(np.spacing(dtype(abs(float(w))))) or float(np.finfo(dtype).smallest_subnormal)
        worst = max(worst, max(float(abs(mpmath.mpf(float(g)) - w)) - floor, 0.0) / spacing)
    return worst


RNG = np.random.default_rng(18)
Z = (RNG.standard_normal((6, 5)) * 8).astype(np.float32)
Z[0, 0] = 90.0  # tanh(90 / 5) rounds to 1 in float32: the slope must not cancel
Z[1, 2] = -200.0
Y = RNG.integers(0, 5, 6)
SW = np.round(RNG.uniform(0.0, 2.0, 6), 3).astype(np.float32)
SW[3] = 0.0

HEADS = [
    H.multiclass(5, z_loss=1e-4),
    H.multiclass(5, logit_softcap=30.0),
    H.multiclass(5, logit_softcap=5.0, z_loss=0.01, label_smoothing=0.1, class_weights=[1, 2, 0.5, 1, 3]),
    H.multiclass(5, logit_softcap=2.5, z_loss=0.5, reduction="none"),
    H.multiclass(5, z_loss=0.1, ignore_index=-100, reduction="sum"),
]


# ------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("kw, message", [
    ({"z_loss": -1e-4}, "z_loss must be >= 0"),
    ({"z_loss": float("nan")}, "z_loss must be finite"),
    ({"z_loss": float("inf")}, "z_loss must be finite"),
    ({"z_loss": True}, "z_loss must be a real number"),
    ({"z_loss": "1e-4"}, "z_loss must be a real number"),
    ({"z_loss": None}, "z_loss must be a real number"),
    ({"z_loss": 10**400}, "z_loss must be finite"),
    ({"logit_softcap": 0.0}, "logit_softcap must be > 0"),
    ({"logit_softcap": -30.0}, "For no cap write logit_softcap=None"),
    ({"logit_softcap": float("inf")}, "logit_softcap must be finite"),
    ({"logit_softcap": float("nan")}, "logit_softcap must be finite"),
    ({"logit_softcap": np.True_}, "logit_softcap must be a real number"),
    ({"logit_softcap": [30.0]}, "logit_softcap must be a real number"),
])
def test_hostile_values_are_refused_with_unihead_s_message(kw, message):
    with pytest.raises(HeadSpecError, match=message):
        H.multiclass(3, **kw)


def test_z_loss_is_for_softmax_heads():
    with pytest.raises(HeadSpecError, match=r"binary\(binary_units=2, z_loss=\.\.\.\)"):
        H.binary(z_loss=1e-4)
    with pytest.raises(HeadSpecError, match="sigmoid has none"):
        H("multilabel", num_classes=3, z_loss=1e-4)
    with pytest.raises(TypeError):  # the readable constructor has no such option
        H.multilabel(3, z_loss=1e-4)
    assert H.binary(binary_units=2, z_loss=1e-4).z_loss == 1e-4
    assert H.multilabel(3, logit_softcap=5).logit_softcap == 5.0  # a cap applies to every task
    assert H.binary(logit_softcap=5).logit_softcap == 5.0


def test_constructors_and_from_labels_take_the_options():
    h = H.multiclass(3, z_loss=1e-4, logit_softcap=30)
    assert (h.z_loss, h.logit_softcap) == (1e-4, 30.0) and isinstance(h.logit_softcap, float)
    assert H.from_labels(np.array([0, 2, 1]), z_loss=1e-4, logit_softcap=30) == h
    assert H.from_labels(np.array([[1, 0, 1], [0, 1, 1]]), logit_softcap=5) == H.multilabel(3, logit_softcap=5)
    assert repr(h) == "ClassificationHead.multiclass(3, z_loss=0.0001, logit_softcap=30.0)"
    assert repr(H.multiclass(3)) == "ClassificationHead.multiclass(3)"


def test_serialisation_and_its_versions():
    h = H.binary(binary_units=2, z_loss=1e-3, logit_softcap=2.5)
    d = h.to_dict()
    assert d["version"] == 2 == SPEC_VERSION and d["z_loss"] == 1e-3 and d["logit_softcap"] == 2.5
    assert H.from_dict(d) == h == H.from_json(h.to_json())
    # a head without the options is written as version 1, without their keys: older unihead reads it
    plain = H.multiclass(3).to_dict()
    assert plain["version"] == 1 and "z_loss" not in plain and "logit_softcap" not in plain
    assert json.loads(H.multiclass(3, logit_softcap=5).to_json())["version"] == 2
    with pytest.raises(HeadSpecError, match="'z_loss' is new in spec version 2"):
        H.from_dict({"version": 1, "task": "multiclass", "num_classes": 3, "z_loss": 0.1})
    with pytest.raises(HeadSpecError, match="Key 'logit_softcap' must be a number or null"):
        H.from_dict({"task": "multiclass", "num_classes": 3, "logit_softcap": "30"})
    with pytest.raises(HeadSpecError, match="Key 'z_loss' must be a number"):
        H.from_dict({"task": "multiclass", "num_classes": 3, "z_loss": None})
    with pytest.raises(HeadSpecError, match="Upgrade unihead"):
        H.from_dict({"version": 3, "task": "multiclass", "num_classes": 3})
    assert H.from_dict({"task": "multiclass", "num_classes": 3, "logit_softcap": None}) == H.multiclass(3)


def test_head_files_round_trip(tmp_path):
    h = H.multiclass(4, z_loss=1e-4, logit_softcap=30.0, ignore_index=-100)
    w = {"kernel": RNG.standard_normal((3, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)}
    unihead.save(tmp_path / "h.safetensors", h, w)
    f = unihead.load(tmp_path / "h.safetensors")
    assert f.head == h
    np.testing.assert_array_equal(f.weights["kernel"], w["kernel"])
    # a spec whose cap is not valid is the file's error, with the spec's message
    raw = (tmp_path / "h.safetensors").read_bytes().replace(b'logit_softcap\\": 30.0', b'logit_softcap\\": -1.0')
    (tmp_path / "bad.safetensors").write_bytes(raw)
    with pytest.raises(HeadFileError, match="logit_softcap must be > 0"):
        unihead.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------ the formulas
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_caps_slope_is_accurate_where_tanh_saturates(dtype):
    """``sech**2`` from ``exp(-2|x|)`` with the division's rounding carried: a few ulp at every
    ``z``, where ``1 - tanh**2`` is 0 (float32 from |z/s| = 9 on) or all rounding."""
    ops = unihead.compile(H.multiclass(2), "numpy").ops
    s = 5.0
    z = np.array([0.0, 1e-30, 0.37, -3.3, 12.1, 45.7, -89.9, 201.3, 404.0, -1e4, np.inf, -np.inf], dtype)
    got = F.softcap_slope(ops, z, s)
    capped = F.softcap(ops, z, s)
    for g, c, v in zip(got, capped, z):
        x = mpmath.mpf(float(v)) / s
        want = 1 / mpmath.cosh(x) ** 2 if math.isfinite(v) else mpmath.mpf(0)
        assert ulps(g, want, dtype) <= 3, (v, g, want)
        assert ulps(c, s * mpmath.tanh(x), dtype) <= 2, (v, c)
    naive = 1 - np.tanh(z / dtype(s)) ** 2
    assert naive[7] == 0 and got[7] > 0  # the cancellation the formula avoids


# ------------------------------------------------------------------------------ the values
def _torch_loss_grad(head, z, y, sw, **options):
    torch = require("torch")
    c = unihead.compile(head, "torch", **options)
    zt = torch.tensor(z, requires_grad=True)
    loss = c.loss(zt, torch.as_tensor(y), None if sw is None else torch.as_tensor(sw))
    loss.sum().backward()
    return loss.detach().numpy(), zt.grad.numpy(), c.probabilities(torch.tensor(z)).numpy()


def _jax_loss_grad(head, z, y, sw):
    jax = require("jax")
    c = unihead.compile(head, "jax")
    f = jax.jit(lambda q: c.loss(q, y, sw).sum())
    g = jax.grad(f)(z)
    return np.asarray(c.loss(z, y, sw)), np.asarray(g), np.asarray(c.probabilities(z))


def _numpy_loss_grad(head, z, y, sw):
    c = unihead.compile(head, "numpy")
    loss, grad = c.loss_and_gradient(z, y, sw)
    if head.reduction == "none":
        grad = grad  # the gradient of the sum of the per-example values
    return loss, grad, c.probabilities(z)


@pytest.mark.parametrize("head", HEADS, ids=repr)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_values_hold_the_tolerance_table_under_the_wide_policy(head, backend):
    """float32 logits evaluated in float64 and rounded once (NumPy, PyTorch on the CPU): the
    tolerance table of docs/semantics.md §11 (4 ulp values, 6 ulp gradients)."""
    sw = SW if head.ignore_index is None else None
    y = np.where(np.arange(6) == 2, -100, Y) if head.ignore_index is not None else Y
    loss, grad, probs = (_numpy_loss_grad if backend == "numpy" else _torch_loss_grad)(head, Z, y, sw)
    want_loss, want_grad, want_p, _ = expected(head, Z, y, sw)
    assert ulps(loss, want_loss) <= 4
    assert ulps(probs, want_p) <= 4
    assert ulps(grad, want_grad) <= 6


# ------------------------------------------------------- the capped logits in double length
def _cap_points(s, dtype, rng):
    """Logits whose ``|z / s|`` covers [0, 1e-8], 0.5, 1, 5, 20, 400, the switch points of
    :func:`unihead.formulas.softcap2` and +-inf, both signs."""
    mags = np.concatenate([
        rng.uniform(0, 1e-8, 20), rng.uniform(0.45, 0.55, 40), rng.uniform(0.9, 1.1, 40),
        rng.uniform(4.5, 5.5, 40), rng.uniform(18, 22, 30), rng.uniform(350, 450, 10),
        rng.uniform(0, 40, 120), np.exp(rng.uniform(-25, 3, 60)),
        [0.0, 2.0**-8, 2.0**-17, 0.0866, 0.1733, 31.99, 32.01, 63.99, 64.01, np.inf]])
    z = (mags * s * rng.choice([-1.0, 1.0], mags.size)).astype(dtype)
    return z[np.isfinite(z) | np.isinf(mags)]


CAPS = (0.75, 1.0, 2.5, 5.0, 15.0, 30.0, 50.0, 128.0, 256.0)


def _check_softcap2(z, hi, lo, s, dtype):
    """``hi + lo`` within ``2**-p / 16`` of ``s tanh(z / s)`` (absolute), ``hi`` the sum rounded
    (``|lo| <= ulp(hi) / 2``)."""
    p = 24 if dtype == np.float32 else 53
    sd = mpmath.mpf(float(dtype(s)))  # the cap in the logits' dtype (docs/semantics.md §5)
    hi, lo = np.asarray(hi, np.float64), np.asarray(lo, np.float64)
    worst = 0.0
    for v, h, l in zip(z, hi, lo):
        want = sd * mpmath.tanh(mpmath.mpf(float(v)) / sd) if math.isfinite(v) else math.copysign(1, v) * sd
        err = abs(mpmath.mpf(float(h)) + mpmath.mpf(float(l)) - want) * mpmath.mpf(2) ** p
        worst = max(worst, float(err))
        assert abs(l) <= float(np.spacing(dtype(abs(h)))) / 2, (v, h, l)
    assert worst <= 1 / 16, (s, worst)
    return worst


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softcap2_carries_the_capped_logits_to_far_below_an_ulp(dtype):
    """``softcap2`` against 50-digit mpmath: absolute error at most ``2**-p / 16`` for caps 0.75 to
    256 (measured: under ``2**-p / 32``), where the rounded cap is off by up to ``ulp(s) / 2``;
    non-finite logits give ``(+-s, 0)`` and NaN."""
    ops = unihead.compile(H.multiclass(2), "numpy").ops
    rng = np.random.default_rng(7)
    for s in CAPS:
        z = _cap_points(s, dtype, rng)
        hi, lo = F.softcap2(ops, z, s)
        assert hi.dtype == dtype and lo.dtype == dtype
        _check_softcap2(z, hi, lo, s, dtype)
    hi, lo = F.softcap2(ops, np.array([np.nan, np.inf, -np.inf, 0.0], dtype), 3.0)
    assert np.isnan(hi[0]) and list(hi[1:]) == [3.0, -3.0, 0.0] and list(lo[1:]) == [0.0, 0.0, 0.0]


def test_softcap2_under_jit_and_in_torch():
    """The same bound where float32 has no float64 to lean on (JAX's default, under ``jit``:
    XLA must keep the error-free sequences in order and flushes subnormals) and in PyTorch."""
    jax = require("jax")
    torch = require("torch")
    from unihead.backends.jax import JaxOps
    from unihead.backends.torch import TorchOps

    rng = np.random.default_rng(8)
    jops, tops = JaxOps(), TorchOps()
    for s in (0.75, 30.0, 256.0):
        z = _cap_points(s, np.float32, rng)
        hi, lo = jax.jit(lambda q: F.softcap2(jops, q, s))(z)
        _check_softcap2(z, hi, lo, s, np.float32)
        for dtype in (np.float32, np.float64):
            zz = z.astype(dtype)
            hi, lo = F.softcap2(tops, torch.tensor(zz), s)
            _check_softcap2(zz, hi.numpy(), lo.numpy(), s, dtype)


# A soft-capped batch with a near-certain class (row 0: 1 - p ~ 1e-8 at s = 30, a tiny loss for
# its target), saturated logits (row 1) and ordinary ones.
ZC = (np.random.default_rng(19).standard_normal((6, 5)) * 12).astype(np.float32)
ZC[0] = [60.0, 0.0, 5.0, -3.0, 10.0]
ZC[1] = [-200.0, 7.0, 3.3, 1e4, -1.0]
YC = np.array([0, 3, 1, 4, 2, 0])
YML = (ZC > 0).astype(np.float32)  # multilabel: mostly the confident side (tiny losses)
YML[2, 1] = 1.0 - YML[2, 1]
YML[4, 3] = 1.0 - YML[4, 3]

CAPPED_HEADS = [  # (head, logits columns, labels) for every task
    (H.multiclass(5, logit_softcap=30.0, reduction="none"), 5, YC),
    (H.multiclass(5, logit_softcap=4.0, z_loss=0.01, label_smoothing=0.1, class_weights=[1, 2, 0.5, 1, 3]), 5, YC),
    (H.binary(logit_softcap=7.5), 1, (YC % 2).astype(np.float32)),
    (H.binary(binary_units=2, logit_softcap=15.0, z_loss=1e-3, reduction="none"), 2, YC % 2),
    (H.multilabel(5, logit_softcap=50.0, reduction="none"), 5, YML),
]


def _run(backend, head, z, y):
    """(loss, gradient of its sum, probabilities, log-probabilities) on ``backend``."""
    if backend == "numpy":
        c = unihead.compile(head, "numpy")
        loss, grad = c.loss_and_gradient(z, y)
        return loss, grad, c.probabilities(z), c.log_probabilities(z)
    if backend == "torch":
        torch = require("torch")
        c = unihead.compile(head, "torch")
        zt = torch.tensor(z, requires_grad=True)
        loss = c.loss(zt, torch.as_tensor(y))
        loss.sum().backward()
        zd = torch.tensor(z)
        return loss.detach().numpy(), zt.grad.numpy(), c.probabilities(zd).numpy(), c.log_probabilities(zd).numpy()
    jax = require("jax")
    with jax.enable_x64(z.dtype == np.float64):
        c = unihead.compile(head, "jax")
        zj = jax.numpy.asarray(z)
        loss = jax.jit(lambda q: c.loss(q, y))(zj)
        grad = jax.jit(jax.grad(lambda q: c.loss(q, y).sum()))(zj)
        out = [np.asarray(v) for v in (loss, grad, c.probabilities(zj), c.log_probabilities(zj))]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("case", CAPPED_HEADS, ids=lambda c: repr(c[0]))
def test_soft_capped_heads_hold_the_tolerance_table(case, backend, dtype):
    """Loss (per example for ``none``: a confident row's tiny loss), probabilities,
    log-probabilities (a near-certain class's ``log p ~ -1e-8``) and the gradient against 50-digit
    mpmath: 4 ulp values, 6 ulp gradients (docs/semantics.md §11), in float32 (JAX: computed in
    float32; NumPy, PyTorch: in float64) and float64, on every task.  Rounded capped logits miss
    these by up to ``s / 2`` ulp."""
    head, k, y = case
    z = ZC[:, :k].astype(dtype)
    loss, grad, probs, logp = _run(backend, head, z, y)
    want_loss, want_grad, want_p, _ = expected(head, z, y)
    want_lp = [[mpmath.log(p) for p in row] for row in want_p]
    tiny = np.finfo(dtype).tiny
    floor = k * tiny if backend == "jax" else 0.0  # XLA on CPU flushes subnormals (§11)
    assert loss.dtype == dtype and grad.dtype == dtype
    assert ulps(loss, want_loss, dtype) <= 4
    assert ulps(probs, want_p, dtype, floor) <= 4
    assert ulps(logp, want_lp, dtype) <= 4
    assert ulps(grad, want_grad, dtype, floor) <= 6


def test_reduction_none_and_weights_multiply_the_whole_example_loss():
    """``none`` returns ``w_i (l_i + c lse_i**2)``: the z term is weighted like the rest, and an
    ignored or zero-weight example has neither loss nor gradient (NaN logits included)."""
    head = H.multiclass(5, z_loss=0.3, logit_softcap=4.0, ignore_index=-100, reduction="none")
    z = Z.copy()
    z[3] = np.nan  # weight 0 below
    y = np.where(np.arange(6) == 4, -100, Y)
    c = unihead.compile(head, "numpy")
    per, grad = c.loss_and_gradient(z, y, SW)
    assert per[3] == 0 and per[4] == 0 and np.all(grad[3] == 0) and np.all(grad[4] == 0)
    _, want_grad, _, want_per = expected(head, np.where(np.isnan(z), 0, z), y, SW)
    keep = [0, 1, 2, 5]
    assert ulps(per[keep], [want_per[i] for i in keep]) <= 4
    assert ulps(grad[keep], [want_grad[i] for i in keep]) <= 6
    total, weight = c.loss_terms(z, y, SW)
    assert np.isclose(total, per.sum(), rtol=1e-6) and weight == pytest.approx(float(SW[[0, 1, 2, 5]].sum()))


def test_a_2_unit_binary_head_with_z_loss_is_the_multiclass_head_on_its_labels():
    zb = Z[:, :2]
    yb = (Y % 2).astype(np.float64)
    b = unihead.compile(H.binary(binary_units=2, z_loss=0.05, logit_softcap=3.0), "numpy")
    m = unihead.compile(H.multiclass(2, z_loss=0.05, logit_softcap=3.0), "numpy")
    lb, gb = b.loss_and_gradient(zb, yb)
    lm, gm = m.loss_and_gradient(zb, yb.astype(int))
    np.testing.assert_array_equal(lb, lm)
    np.testing.assert_array_equal(gb, gm)


def test_predictions_read_the_capped_logits():
    z = np.array([[1e6, 1e7], [3.0, -2.0], [0.5, 0.4]], np.float32)  # capped, the first row ties in float32
    c = unihead.compile(H.multiclass(2, logit_softcap=1.0), "numpy")
    assert c.probabilities(z)[0, 0] == c.probabilities(z)[0, 1]
    np.testing.assert_array_equal(c.predict(z), [1, 0, 0])  # c(z) is increasing: argmax of z
    # a 1-unit cut beyond the cap: never positive; inside it, c(z) > logit(threshold)
    never = unihead.compile(H.binary(logit_softcap=1.0, threshold=0.8), "numpy")  # logit(0.8) = 1.386 > 1
    np.testing.assert_array_equal(never.predict(np.array([[1e9], [3.0]], np.float32)), [0, 0])
    t = 0.6
    cut = math.log(t / (1 - t))
    h = unihead.compile(H.binary(logit_softcap=2.0, threshold=t), "numpy")
    zs = np.array([[0.4], [0.42], [0.43], [5.0], [-1.0]], np.float32)
    want = [int(2.0 * math.tanh(float(v) / 2.0) > cut) for v in zs[:, 0]]
    np.testing.assert_array_equal(h.predict(zs), want)
    two = unihead.compile(H.binary(binary_units=2, logit_softcap=2.0, threshold=t), "numpy")
    z2 = np.concatenate([np.zeros_like(zs), zs], axis=1)
    np.testing.assert_array_equal(two.predict(z2), want)


# ------------------------------------------------------------------------------ the paths
def test_torch_paths_all_compute_the_options():
    """Eager (float64 logits), wide, fused (large inputs) and torch.compile: no path ignores
    the options (each against the NumPy backend, float64 within float32 rounding)."""
    torch = require("torch")
    head = H.multiclass(8, z_loss=0.02, logit_softcap=6.0, label_smoothing=0.1)
    c = unihead.compile(head, "torch")
    ref = unihead.compile(head, "numpy")
    rng = np.random.default_rng(3)
    big = (rng.standard_normal((1 << 15, 8)) * 6).astype(np.float32)  # 2**18 elements: "fused"
    yb = rng.integers(0, 8, 1 << 15)
    assert c._mode(torch.tensor(big)) in ("fused", "wide")
    zt = torch.tensor(big, requires_grad=True)
    loss = c.loss(zt, torch.tensor(yb))
    loss.backward()
    want, want_g = ref.loss_and_gradient(big.astype(np.float64), yb)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-5)
    np.testing.assert_allclose(zt.grad.numpy(), want_g, rtol=1e-4, atol=1e-12)
    small = torch.tensor(Z[:, :5].repeat(2, 1)[:, :8] if False else rng.standard_normal((4, 8)) * 6)
    for z in (small, small.float()):  # float64 eager; float32 wide
        zz = z.clone().requires_grad_(True)
        l = c.loss(zz, torch.tensor([0, 3, 7, 1]))
        l.backward()
        w, wg = ref.loss_and_gradient(z.double().numpy(), np.array([0, 3, 7, 1]))
        np.testing.assert_allclose(l.item(), w, rtol=1e-6)
        np.testing.assert_allclose(zz.grad.double().numpy(), wg, rtol=1e-5, atol=1e-12)
    f = torch.compile(lambda z, y: c.loss(z, y), fullgraph=True)
    zz = small.float().clone().requires_grad_(True)
    l = f(zz, torch.tensor([0, 3, 7, 1]))
    l.backward()
    w, wg = ref.loss_and_gradient(small.float().double().numpy(), np.array([0, 3, 7, 1]))
    np.testing.assert_allclose(l.item(), w, rtol=1e-5)
    np.testing.assert_allclose(zz.grad.numpy(), wg, rtol=1e-4, atol=1e-10)


def test_the_lean_formulas_are_not_taken_with_the_options():
    from unihead._engine import Engine

    ops = unihead.compile(H.multiclass(3), "numpy").ops
    assert Engine(H.multiclass(3), ops)._lean == "sparse"
    assert Engine(H.multiclass(3, z_loss=1e-4), ops)._lean is None
    assert Engine(H.binary(logit_softcap=3.0), ops)._lean is None


# ------------------------------------------------------------------- the native-equivalence table
def _np_loss(head, z, y):
    return unihead.compile(head, "numpy").loss(np.asarray(z, np.float64), y)


def test_zl1_native_lines_reproduce_the_z_loss():
    torch = require("torch")
    F_ = torch.nn.functional
    c = 1e-2
    z, y = Z.astype(np.float64), Y
    want = _np_loss(H.multiclass(5, z_loss=c), z, y)
    zt, yt = torch.tensor(z), torch.tensor(y)
    got = (F_.cross_entropy(zt, yt, reduction="none") + c * torch.logsumexp(zt, -1) ** 2).mean()
    np.testing.assert_allclose(got.item(), want, rtol=1e-12)
    optax, jax = require("optax"), require("jax")
    got = (optax.softmax_cross_entropy_with_integer_labels(z, y) + c * jax.nn.logsumexp(z, -1) ** 2).mean()
    np.testing.assert_allclose(float(got), want, rtol=3e-6)
    # the nearest single call (without the z term) really differs
    assert abs(F_.cross_entropy(zt, yt).item() - want) > 1e-3 * want


def test_zl2_native_lines_reproduce_z_loss_with_ignored_labels_and_class_weights():
    torch = require("torch")
    F_ = torch.nn.functional
    c, w = 0.05, np.array([0.5, 2.0, 1.0, 3.0, 0.25])
    y = np.where(np.arange(6) % 3 == 1, -100, Y)
    z = Z.astype(np.float64)
    want = _np_loss(H.multiclass(5, z_loss=c, ignore_index=-100, class_weights=w), z, y)
    zt, yt, wt = torch.tensor(z), torch.tensor(y), torch.tensor(w)
    keep = yt != -100
    w_y = wt[torch.where(keep, yt, 0)] * keep
    per = F_.cross_entropy(zt, yt, ignore_index=-100, reduction="none") + c * torch.logsumexp(zt, -1) ** 2
    got = (per * w_y).sum() / w_y.sum()
    np.testing.assert_allclose(got.item(), want, rtol=1e-12)


def test_sc_native_lines_reproduce_the_soft_cap():
    torch = require("torch")
    F_ = torch.nn.functional
    s = 5.0
    z, y = Z.astype(np.float64), Y
    zt = torch.tensor(z)
    want = _np_loss(H.multiclass(5, logit_softcap=s), z, y)
    np.testing.assert_allclose(F_.cross_entropy(s * torch.tanh(zt / s), torch.tensor(y)).item(), want, rtol=1e-12)
    ym = (RNG.uniform(size=(6, 5)) < 0.4).astype(np.float64)
    want = _np_loss(H.multilabel(5, logit_softcap=s), z, ym)
    got = F_.binary_cross_entropy_with_logits(s * torch.tanh(zt / s), torch.tensor(ym))
    np.testing.assert_allclose(got.item(), want, rtol=1e-12)


def test_the_generator_writes_the_cap_line_and_refuses_the_z_loss():
    from unihead._native import native_loss

    capped = native_loss(H.multiclass(5, logit_softcap=30.0), "torch")
    assert capped.exact and capped.code[0].startswith("logits = 30.0 * torch.tanh(logits / 30.0)")
    assert "sc1" in capped.rows
    zl = native_loss(H.multiclass(5, z_loss=1e-4), "keras")
    assert not zl.exact and "z-loss" in zl.note and "zl1" in zl.rows
    torch = require("torch")
    ns = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional,
          "logits": torch.tensor(Z.astype(np.float64)), "labels": torch.tensor(Y)}
    exec(compile("\n".join(capped.code), "<line>", "exec"), ns)  # noqa: S102 - the line under test
    np.testing.assert_allclose(ns["loss"].item(), _np_loss(H.multiclass(5, logit_softcap=30.0), Z, Y), rtol=1e-12)


def test_port_keeps_a_capped_heads_weights_and_refuses_2_to_1_units():
    torch = require("torch")
    head = H.binary(binary_units=2, logit_softcap=2.0)
    w = {"kernel": RNG.standard_normal((4, 2)).astype(np.float32), "bias": np.array([0.5, -1.0], np.float32)}
    out = unihead.port((head, w), "numpy")
    np.testing.assert_array_equal(out.weights["kernel"], w["kernel"])
    assert out.check.passed and out.head == head
    up = unihead.port((H.binary(logit_softcap=2.0), {"kernel": w["kernel"][:, 1:], "bias": w["bias"][1:]}),
                      "numpy", binary_units=2)  # logit z <=> [0, z]: capped, [0, c(z)]
    assert up.check.passed
    with pytest.raises(HeadSpecError, match="soft-capped 2-unit head"):
        unihead.port((head, w), "numpy", binary_units=1)
