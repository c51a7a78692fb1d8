"""The array primitives the formulas share, on NumPy, PyTorch and JAX arrays: the compensated
total (unihead._ops; "numpy-paired": each tree level's sums and errors in one array from the
second level on, JAX's form up to 1024 terms) against math.fsum (an exactly rounded sum), and
the shifted exponential (unihead.formulas.shifted_exp) against 50-digit mpmath, both of its
forms: ``exp`` with a TwoSum correction (NumPy, PyTorch) and the polynomial exponential (JAX; and
on NumPy and PyTorch arrays, "numpy-poly"/"torch-poly", where it runs without fused multiply-adds
or flush-to-zero)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from unihead.backends.numpy import NumpyOps
from unihead.conformance.reference import FLT_MIN, ulp_error

from .conftest import require


def _poly(ops):
    ops.poly_exp = True  # an instance attribute: the shared backend instances are untouched
    return ops


def _paired(ops):
    ops.pair_tree_upto = 2**40  # every tree paired from its second level (JAX: up to 1024 terms)
    return ops


def _ops(name):
    if name in ("numpy", "numpy-poly"):
        return (_poly(NumpyOps()) if name == "numpy-poly" else NumpyOps()), np.asarray
    if name == "numpy-paired":
        return _paired(NumpyOps()), np.asarray
    if name in ("torch", "torch-poly"):
        torch = require("torch")
        from unihead.backends.torch import TorchOps

        return (_poly(TorchOps()) if name == "torch-poly" else TorchOps()), torch.as_tensor
    require("jax")
    import jax.numpy as jnp

    from unihead.backends.jax import JaxOps

    return JaxOps(), jnp.asarray


@pytest.mark.parametrize("backend", ["numpy", "numpy-paired", "torch", "jax"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097, 16000, 123457])  # padded (1000, 16000) and in pieces
def test_compensated_total_is_nearly_correctly_rounded(backend, n):
    ops, arr = _ops(backend)
    rng = np.random.default_rng(n)
    # mixed signs and magnitudes over 2**40: a plain float32 sum loses most of these
    x = (rng.normal(size=n) * np.exp2(rng.integers(-20, 20, size=n))).astype(np.float32)
    exact = math.fsum(float(v) for v in x)
    got = float(np.asarray(ops.compensated_total(arr(x))))
    assert got == pytest.approx(exact, abs=float(np.spacing(np.float32(abs(exact)))))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy on inf - inf
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # +-3.4e38 pairs
def test_paired_tree_is_the_same_arithmetic():
    """Ops.pair_tree_upto changes the arrays, not the operations: bit for bit the unpaired sum,
    at lengths that are padded, cut into pieces or neither, with infinities and NaN."""
    plain, paired = NumpyOps(), _paired(NumpyOps())
    rng = np.random.default_rng(7)
    for n in [1, 2, 3, 4, 5, 17, 255, 256, 257, 999, 1000, 1023, 1024, 1025, 3000, 4097]:
        x = (rng.normal(size=n) * np.exp2(rng.integers(-60, 60, size=n))).astype(np.float32)
        specials = [x]
        if n >= 4:
            specials += [np.where(np.arange(n) == 3, np.float32(np.inf), x),
                         np.where(np.arange(n) % 2 == 0, np.float32(3.4e38), np.float32(-3.4e38)),
                         np.where(np.arange(n) == n - 1, np.float32(np.nan), x)]
        for v in specials:
            a = np.asarray(plain.compensated_total(v))
            b = np.asarray(paired.compensated_total(v))
            assert a.tobytes() == b.tobytes(), (n, a, b)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy on inf - inf
@pytest.mark.parametrize("backend", ["numpy", "numpy-paired", "torch", "jax"])
def test_compensated_total_passes_infinities_and_nan_through(backend):
    ops, arr = _ops(backend)
    f = lambda v: float(np.asarray(ops.compensated_total(arr(np.asarray(v, np.float32)))))  # noqa: E731
    assert f([1.0, np.inf, 2.0]) == np.inf
    assert f([-np.inf, 1.0, 2.0, 3.0, 4.0]) == -np.inf
    assert math.isnan(f([np.inf, 1.0, -np.inf]))
    assert math.isnan(f([1.0, np.nan, 2.0]))
    assert f([]) == 0.0


EXP_FORMS = ["numpy", "torch", "jax", "numpy-poly", "torch-poly"]


@pytest.mark.parametrize("backend", EXP_FORMS)
@pytest.mark.parametrize("s", [0.0, 0.3, 7.0, -20.0, -1.7e-3, 123456.8, -1000003.0, 2.0**24 + 2, -(2.0**25)])
def test_shifted_exp_recovers_the_subtraction_error(backend, s):
    """``exp(z - m)`` against 50-digit mpmath: the rounding of ``z - m`` costs up to ~50 ulp at
    ``|z - m| ~ 87`` uncorrected; restored, what is left is the exponential's own error (about
    1 ulp) and one rounding."""
    from unihead.formulas import shifted_exp

    ops, arr = _ops(backend)
    rng = np.random.default_rng(int(abs(s)) % 1000)
    # offsets over the whole normal range of the result, with full-precision fractions, and
    # logits of both signs around the shift (z > m is not a softmax input, but the identity holds)
    t = np.concatenate([rng.uniform(-87.0, 20.0, 2000), rng.uniform(-1.0, 1.0, 200)])
    z = (s + t).astype(np.float32)
    s = float(np.float32(s))
    got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(np.float32(s)))), np.float64)
    mpmath.mp.dps = 50
    exact = [mpmath.exp(mpmath.mpf(float(zi)) - mpmath.mpf(s)) for zi in z]
    # subnormal results are flushed on XLA: only normal ones are compared
    worst = max(ulp_error(g, e) for g, e in zip(got, exact) if e >= FLT_MIN)
    assert worst <= 1.5


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy: -3e38 - 3e38
@pytest.mark.parametrize("backend", EXP_FORMS)
def test_shifted_exp_far_below_the_shift_is_exactly_zero(backend):
    """Masked (``-inf``) logits and logits far below the shift give 0, not NaN, also where the
    shift is so large that its spacing exceeds the underflow gap (there the clamp used to give
    every logit of the row ``exp(0) = 1``)."""
    from unihead.formulas import shifted_exp

    ops, arr = _ops(backend)
    for s in (0.0, -20.0, 1e10, -1e10, 3e38):
        s32 = np.float32(s)
        # the next float below s is far below it for the large shifts (spacing 1024 at 1e10)
        far = [-np.inf, -3e38] + ([np.nextafter(s32, -np.inf)] if abs(s) > 1e9 else [s - 200.0])
        z = np.array(far + [s], np.float32)
        got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(s32))))
        assert got.tolist() == [0.0] * len(far) + [1.0], s


@pytest.mark.parametrize("backend", EXP_FORMS)
def test_shifted_exp_at_the_underflow_edge(backend):
    """Around ``z - m = -87.3`` (``exp`` = the smallest normal float32) and the polynomial's cut at
    -88: normal results keep their accuracy, and what is below the smallest normal number is 0
    or a subnormal no larger than it, never garbage from an exponent field out of range."""
    from unihead.formulas import shifted_exp

    ops, arr = _ops(backend)
    s = np.float32(3.25)
    t = np.linspace(-89.0, -86.0, 3001)
    z = (np.float64(s) + t).astype(np.float32)
    got = np.asarray(ops.to_numpy(shifted_exp(ops, arr(z), arr(s))), np.float64)
    mpmath.mp.dps = 50
    exact = [mpmath.exp(mpmath.mpf(float(zi)) - mpmath.mpf(float(s))) for zi in z]
    for g, e in zip(got, exact):
        if e >= FLT_MIN:
            assert ulp_error(g, e) <= 1.5
        else:
            assert 0.0 <= g <= FLT_MIN


def test_polynomial_exponential_constants():
    """The Cody-Waite split of ln 2: ``n * ln2_hi`` exact for ``|n| <= 2**9`` (at most 15
    significant bits), and ``ln2_hi + ln2_lo`` = ln 2 to within half an ulp of ``ln2_lo``
    (``2**-44``): at ``|n| <= 127`` that is below ``2**-37``, far below float32 resolution."""
    from unihead.formulas import exp_poly_coefficients

    c = exp_poly_coefficients()
    mant, _ = math.frexp(c["ln2_hi"])
    assert (mant * 2**15).is_integer()
    assert float(np.float32(c["ln2_lo"])) == c["ln2_lo"]
    mpmath.mp.dps = 50
    assert abs(mpmath.mpf(c["ln2_hi"]) + mpmath.mpf(c["ln2_lo"]) - mpmath.log(2)) <= 2.0**-44
    assert all(float(np.float32(q)) == q for q in c["q"])


def test_polynomial_coefficients_are_the_fit_the_tool_makes():
    """The shipped ``Q`` is what ``tools/fit_exp_polynomial.py`` fits (each coefficient within one
    float32 spacing: 400 rounds of least squares may round differently under another BLAS), and
    the float32 evaluation, Horner with fused multiply-adds, stays below 0.75 ulp on
    ``|r| <= ln(2)/2`` plus margin (0.737 measured)."""
    import importlib.util
    from pathlib import Path

    from unihead.formulas import exp_poly_coefficients

    path = Path(__file__).resolve().parents[1] / "tools" / "fit_exp_polynomial.py"
    spec = importlib.util.spec_from_file_location("fit_exp_polynomial", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shipped = np.asarray(exp_poly_coefficients()["q"], np.float32)
    fitted = tool.fit()
    assert np.all(np.abs(fitted - shipped) <= np.spacing(shipped))
    assert tool.float32_error(shipped) < 0.75


_TF_BLOCKED_SUMS = r'''
import math
import re
import numpy as np
import tensorflow as tf
from unihead import ClassificationHead as H
from unihead.backends import _tensorflow as T
from unihead.backends.numpy import compile_head as numpy_head
from unihead import _ulp
from unihead.conformance.reference import ulp_error

ops = T.TFOps()
rng = np.random.default_rng(7)
assert T.BLOCKED_SUM_FROM <= 3 * 70001 and 300 * 333 >= T.BLOCKED_SUM_FROM

def worst(got, rows):  # float32 results against exactly rounded sums (math.fsum)
    return max(ulp_error(g, math.fsum(map(float, r))) for g, r in zip(np.ravel(got), rows))

# row sums over 70001 classes (a length that is not a multiple of the block) and totals of
# 99900 and 2**17 elements, in one XLA program; each float32 result within half an ulp
x = rng.normal(size=(3, 70001)).astype(np.float32) * np.float32(1e3)
t = rng.exponential(size=(300, 333)).astype(np.float32)
v = rng.normal(size=(1 << 17,)).astype(np.float32)
f = tf.function(lambda x, t, v: (ops.row_sum(x), ops.total(t), ops.total(v)), jit_compile=True)
rs, tt, tv = (r.numpy() for r in f(x, t, v))
assert rs.shape == (3, 1) and worst(rs, x) <= 0.501, worst(rs, x)
assert worst(tt, [t.ravel()]) <= 0.501 and worst(tv, [v]) <= 0.501, (worst(tt, [t.ravel()]), worst(tv, [v]))
# what XLA writes (the arrays of the program's top level): float64 block sums, no float64 copy
# of an input (the conversion written out whole, as TensorFlow 2.21's XLA does for one-stage sums)
hlo = f.experimental_get_compiler_ir(x, t, v)(stage="optimized_hlo")
written = set(re.findall(r"= (f64\[[0-9,]*\])", hlo[hlo.index("ENTRY"):]))
assert not written & {"f64[3,70001]", "f64[300,333]", "f64[99900]", "f64[131072]"}, written
assert {"f64[3,2187]", "f64[4096]"} <= written, written
# a wide class axis whose rows are not counted when traced (as Keras' fit traces its step)
g = tf.function(lambda x: (ops.row_sum(x), ops.total(x)), jit_compile=True,
                input_signature=[tf.TensorSpec([None, 1000], tf.float32)])
xs = rng.normal(size=(200, 1000)).astype(np.float32)
rs, tt = (r.numpy() for r in g(xs))
assert worst(rs, xs) <= 0.501 and worst(tt, [xs.ravel()]) <= 0.501
written = set(re.findall(r"= (f64\[[0-9,]*\])", g.experimental_get_compiler_ir(xs)(stage="optimized_hlo").split("ENTRY")[1]))
assert "f64[200,1000]" not in written, written
# the gradient passes through the barrier
with tf.GradientTape() as tape:
    xv = tf.constant(v[:64])
    tape.watch(xv)
    out = tf.reduce_sum(3.0 * T._xla_barrier(xv))
assert np.all(tape.gradient(out, xv).numpy() == 3.0)
# heads whose sums are blocked under XLA: loss and gradient as the NumPy backend's (float64)
for head, n, k in ((H.multilabel(1024), 80, 1024), (H.multiclass(1000), 80, 1000)):
    z = (rng.normal(size=(n, k)) * 4).astype(np.float32)
    y = (rng.random((n, k)) < 0.2).astype(np.float32) if head.task == "multilabel" else rng.integers(0, k, n)
    c = T.compile_head(head, validate=False)

    @tf.function(jit_compile=True)
    def step(z, y):
        with tf.GradientTape() as tape:
            tape.watch(z)
            value = c.loss(z, y)
        return value, tape.gradient(value, z)

    value, grad = (r.numpy() for r in step(tf.constant(z), tf.constant(y)))
    ref, ref_grad = numpy_head(head, validate=False).loss_and_gradient(z.astype(np.float64), y)
    assert ulp_error(value, float(ref)) <= 1.0, (head.task, float(value), float(ref))
    g = _ulp.ulp_error(grad.ravel().tolist(), ref_grad.ravel().tolist(), "float32")
    assert g <= 4.0, (head.task, g)
print("ok")
'''


@pytest.mark.slow
def test_tensorflow_float64_sums_under_xla_are_taken_in_blocks():
    """Keras on TensorFlow under XLA: float32 row sums and totals accumulated in float64 over
    2**16 elements or more are summed in blocks (TFOps.row_sum / total), so XLA does not write a
    float64 copy of the input; the results stay within half an ulp of the exactly rounded sums,
    and a head's loss and gradient match the NumPy backend's (a child process: TensorFlow)."""
    import os
    import subprocess
    import sys

    require("tensorflow")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", _TF_BLOCKED_SUMS], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]
