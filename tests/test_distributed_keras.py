"""Keras: gradient accumulation and ``keras.distribution.DataParallel`` give the whole batch's step.

Keras binds its backend once per process: tests/keras_distributed_child.py trains on one
backend per child process (the three run at once) and prints the weights after each way of
training; here they are checked against one SGD step computed in float64 NumPy, independently of
unihead and Keras.

The bound.  Every float32 result is the float64 step ``theta0 - lr * g`` up to rounding: the
logits, softmax and per-example terms (a few roundings each) and the float32 sums over the N
examples (at most ``N u sum|terms|``, u = 2**-24, in any summation order).  So each parameter must
be within ``(N + 10) u (|theta0| + lr A)``, where ``A = sum_j |d(w_j l_j)/d theta| / W`` is the
gradient's absolute mass (computed with the reference).  Two results within that bound of the
reference are within twice it of each other, whatever order each summed in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import require
from .distributed_keras_data import HEAD, LR, STEPS, initial_weights, training_data

ROOT = Path(__file__).resolve().parents[1]
U = 2.0 ** -24
BACKENDS = ["jax", "torch", "tensorflow"]


# ------------------------------------------------------------------------------ float64 reference
def _step(x, y, sw):
    """``(theta, A)``: the weights after one SGD step on the head's weighted mean over these
    examples (float64), and the gradient's absolute mass; ``theta0`` where nothing counts."""
    w0 = initial_weights()
    k = HEAD["num_classes"]
    eps, cw = HEAD["label_smoothing"], np.asarray(HEAD["class_weights"], np.float64)
    x = np.asarray(x, np.float64)
    z = x @ w0["kernel"].astype(np.float64) + w0["bias"].astype(np.float64)
    valid = y != HEAD["ignore_index"]
    label = np.where(valid, y, 0)
    weight = np.asarray(sw, np.float64) * cw[label] * valid
    target = (1 - eps) * np.eye(k)[label] + eps / k
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    g = weight[:, None] * (p - target)  # d(sum_j w_j l_j) / dz
    total = weight.sum()
    if total == 0:
        zero = {n: np.zeros_like(v, np.float64) for n, v in w0.items()}
        return {n: v.astype(np.float64) for n, v in w0.items()}, zero, zero
    grad = {"kernel": x.T @ g / total, "bias": g.sum(0) / total}
    mass = {"kernel": np.abs(x).T @ np.abs(g) / total, "bias": np.abs(g).sum(0) / total}
    theta = {n: w0[n].astype(np.float64) - LR * grad[n] for n in w0}
    return theta, mass, grad


def whole_batch(n):
    x, y, sw = training_data(n)
    theta, mass, grad = _step(x, y, sw)
    return theta, mass, grad


def mean_of_means(n):
    """What Keras' ``gradient_accumulation_steps`` applies: the mean over the micro-batches of
    each one's mean gradient (0 for a micro-batch where nothing counts)."""
    x, y, sw = training_data(n)
    m = -(-n // STEPS)
    w0 = initial_weights()
    grads, masses = [], []
    for i in range(STEPS):
        piece = slice(i * m, (i + 1) * m)
        _, mass, grad = _step(x[piece], y[piece], sw[piece])
        grads.append(grad)
        masses.append(mass)
    grad = {k: sum(g[k] for g in grads) / STEPS for k in w0}
    mass = {k: sum(a[k] for a in masses) / STEPS for k in w0}
    theta = {k: w0[k].astype(np.float64) - LR * grad[k] for k in w0}
    return theta, mass, grad


def tolerance(n, mass):
    w0 = initial_weights()
    return {k: (n + 10) * U * (np.abs(w0[k]) + LR * mass[k]) for k in w0}


def deviation(got, theta, tol):
    """``max |got - theta| / tol`` over the parameters (<= 1: within the bound)."""
    return max(float(np.max(np.abs(np.asarray(got[k]) - theta[k]) / tol[k])) for k in theta)


def gradient_error(got, grad):
    """The relative error of the gradient a result applied, ``|g - g_whole| / |g_whole|``."""
    w0 = initial_weights()
    applied = np.concatenate([(w0[k].astype(np.float64) - np.asarray(got[k])).ravel() / LR for k in grad])
    whole = np.concatenate([grad[k].ravel() for k in grad])
    return float(np.linalg.norm(applied - whole) / np.linalg.norm(whole))


# ------------------------------------------------------------------------------ the children
@pytest.fixture(scope="module")
def results():
    """Each backend's child's RESULT (the three run at once), and their wall times."""
    require("keras")
    for module in ("jax", "torch", "tensorflow"):
        require(module)
    started = time.perf_counter()
    procs = {}
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("PYTHONPATH", None)
        if backend == "jax":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
        procs[backend] = subprocess.Popen(
            [sys.executable, "-m", "tests.keras_distributed_child"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for backend, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"Keras on {backend}:\n{stderr[-4000:]}"
        line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
        out[backend] = json.loads(line[len("RESULT "):])
    print(f"\nthe three Keras children (run at once): {time.perf_counter() - started:.1f} s wall")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulation_gives_the_whole_batch_step_and_keras_own_does_not(results, backend):
    """30 examples in 4 micro-batches of 8, 8, 8 and 6 (fit's last batch), one of them all ignored
    labels, one with five zero sample weights, class weights and label smoothing: after the one
    update, GradientAccumulation's weights are the whole batch's step (within the bound), also
    when the model was saved and loaded in the middle of the window.  Keras'
    ``gradient_accumulation_steps`` applies the mean of the micro-batches' means instead,
    measurably different (and it is that, within the same bound)."""
    res = results[backend]
    assert res["backend"] == backend
    got = res["accumulation"]
    n = 30
    theta, mass, grad = whole_batch(n)
    tol = tolerance(n, mass)
    for name in ("full", "helper", "helper_saved_midway"):
        assert deviation(got[name], theta, tol) <= 1.0, (backend, name, deviation(got[name], theta, tol))
    naive_theta, naive_mass, _ = mean_of_means(n)
    assert deviation(got["keras_default"], naive_theta, tolerance(n, naive_mass)) <= 1.0
    helper_error = gradient_error(got["helper"], grad)
    keras_error = gradient_error(got["keras_default"], grad)
    full_error = gradient_error(got["full"], grad)
    print(f"\nKeras on {backend}: relative error of the applied gradient vs the whole batch's (float64): "
          f"whole batch {full_error:.1e}, GradientAccumulation {helper_error:.1e}, "
          f"gradient_accumulation_steps={STEPS} {keras_error:.3f}; max |helper - whole| / bound "
          f"{deviation(got['helper'], theta, tol):.3f}")
    assert helper_error < 1e-6 and keras_error > 0.1
    # the helper and the whole-batch step, both float32, within twice the bound of each other
    for k in theta:
        assert np.all(np.abs(np.asarray(got["helper"][k]) - np.asarray(got["full"][k])) <= 2 * tol[k])


@pytest.mark.slow
def test_data_parallel_fit_step_equals_the_single_device_step(results):
    """JAX over 8 host devices (``keras.distribution.DataParallel``; the child checks the model's
    variables live on the 8): one ``fit`` step of 32 examples with ignored labels and zero sample
    weights equals the single-device step, and GradientAccumulation over 4 micro-batches of 8 (one
    example per device) equals them too; Keras' own accumulation does not."""
    got = results["jax"]["dp"]
    n = 32
    theta, mass, grad = whole_batch(n)
    tol = tolerance(n, mass)
    for name in ("single_device", "data_parallel", "data_parallel_helper"):
        assert deviation(got[name], theta, tol) <= 1.0, (name, deviation(got[name], theta, tol))
    for k in theta:
        for name in ("data_parallel", "data_parallel_helper"):
            assert np.all(np.abs(np.asarray(got[name][k]) - np.asarray(got["single_device"][k])) <= 2 * tol[k])
    naive_theta, naive_mass, _ = mean_of_means(n)
    assert deviation(got["data_parallel_keras_default"], naive_theta, tolerance(n, naive_mass)) <= 1.0
    dp_error = gradient_error(got["data_parallel"], grad)
    keras_error = gradient_error(got["data_parallel_keras_default"], grad)
    print(f"\nDataParallel over 8 devices: relative gradient error, fit step {dp_error:.1e}, "
          f"GradientAccumulation {gradient_error(got['data_parallel_helper'], grad):.1e}, "
          f"gradient_accumulation_steps={STEPS} {keras_error:.3f}")
    assert keras_error > 0.1


@pytest.mark.slow
def test_wrong_uses_say_what_to_write(results):
    said = results["jax"]["errors"]
    assert len(said) == 8
    assert all("steps must be an integer >= 1" in s for s in said[:2])
    assert "GradientAccumulation(keras.optimizers.Adam(1e-3), steps=2)" in said[2]
    assert "GradientAccumulation(SGD(...), steps=4) without it" in said[3]
    assert "loss_scale_factor" in said[4]
    assert "clipnorm" in said[5] and "inner optimizer" in said[5]
    assert "no HeadLoss ran" in said[6] and "loss=compiled.loss_fn()" in said[6]
    assert "reduction='sum'" in said[7] and "reduction='mean'" in said[7]
