"""Child process of tests/test_distributed_keras.py: Keras training steps on one Keras backend.

Keras binds its backend once per process, so the test runs this file once per ``KERAS_BACKEND``
(for JAX with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``, for
``keras.distribution.DataParallel``) and checks what it prints: one line ``RESULT {json}`` with
the weights after each way of training, as float32 values written exactly.  The expectations
(a float64 NumPy reference) are computed by the test, not here.

    KERAS_BACKEND=jax python -m tests.keras_distributed_child
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

from tests.distributed_keras_data import HEAD, LR, STEPS, initial_weights, training_data

import keras  # noqa: E402  (after the data module: it imports no framework)

import unihead  # noqa: E402
from unihead.backends.keras import GradientAccumulation  # noqa: E402

BACKEND = keras.backend.backend()
COMPILED = unihead.compile(unihead.ClassificationHead.from_dict(HEAD), "keras")


def model(weights):
    m = keras.Sequential([keras.Input((weights["kernel"].shape[0],)), COMPILED.layer(weights=weights)])
    return m


def fit(optimizer, x, y, sw, batch_size, m=None):
    """One epoch of ``fit`` from the initial weights (or on ``m``); the final canonical weights."""
    if m is None:
        m = model(initial_weights())
        m.compile(optimizer=optimizer, loss=COMPILED.loss_fn())
    m.fit(x, y, sample_weight=sw, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return m


def weights_of(m):
    w = m.layers[-1].get_canonical_weights()
    return {k: np.asarray(v, np.float32).astype(float).tolist() for k, v in w.items()}


def accumulation(n: int) -> dict:
    """The whole batch in one step; the helper and Keras' own accumulation over STEPS
    micro-batches; and the helper saved with ``model.save`` in the middle of a window, loaded and
    continued."""
    x, y, sw = training_data(n)
    micro = -(-n // STEPS)
    out = {
        "full": weights_of(fit(keras.optimizers.SGD(LR), x, y, sw, n)),
        "helper": weights_of(fit(GradientAccumulation(keras.optimizers.SGD(LR), STEPS), x, y, sw, micro)),
        "keras_default": weights_of(
            fit(keras.optimizers.SGD(LR, gradient_accumulation_steps=STEPS), x, y, sw, micro)),
    }
    # saved half-way through the window (its accumulators hold two micro-batches), reloaded
    m = model(initial_weights())
    m.compile(optimizer=GradientAccumulation(keras.optimizers.SGD(LR), STEPS), loss=COMPILED.loss_fn())
    half = 2 * micro
    fit(None, x[:half], y[:half], sw[:half], micro, m)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        m.save(path)
        loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, GradientAccumulation) and loaded.optimizer.steps == STEPS
    assert int(loaded.optimizer.iterations) == 0  # no update applied yet: the window is open
    fit(None, x[half:], y[half:], sw[half:], micro, loaded)
    assert int(loaded.optimizer.iterations) == 1
    out["helper_saved_midway"] = weights_of(loaded)
    return out


def data_parallel(n: int) -> dict:
    """JAX: one ``fit`` step of the whole batch, and the helper over STEPS micro-batches, under
    ``keras.distribution.DataParallel`` over the 8 host devices; the same on one device."""
    import jax

    assert jax.device_count() == 8, jax.devices()
    x, y, sw = training_data(n)
    micro = n // STEPS
    out = {"single_device": weights_of(fit(keras.optimizers.SGD(LR), x, y, sw, n))}
    dp = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    with dp.scope():
        m = fit(keras.optimizers.SGD(LR), x, y, sw, n)
        kernel = m.layers[-1].kernel.value
        assert len(kernel.sharding.device_set) == 8, kernel.sharding  # the model lives on 8 devices
        out["data_parallel"] = weights_of(m)
        out["data_parallel_helper"] = weights_of(
            fit(GradientAccumulation(keras.optimizers.SGD(LR), STEPS), x, y, sw, micro))
        out["data_parallel_keras_default"] = weights_of(
            fit(keras.optimizers.SGD(LR, gradient_accumulation_steps=STEPS), x, y, sw, micro))
    return out


def errors() -> list[str]:
    """What a wrong use says (each message, for the test to read)."""
    said = []

    def expect(exc, fn):
        try:
            fn()
        except exc as e:
            said.append(str(e))
        else:
            raise AssertionError(f"{fn} did not raise {exc.__name__}")

    sgd = keras.optimizers.SGD
    expect(ValueError, lambda: GradientAccumulation(sgd(0.1), 0))
    expect(ValueError, lambda: GradientAccumulation(sgd(0.1), True))
    expect(TypeError, lambda: GradientAccumulation(object(), 2))
    expect(ValueError, lambda: GradientAccumulation(sgd(0.1, gradient_accumulation_steps=4), 4))
    expect(ValueError, lambda: GradientAccumulation(keras.optimizers.LossScaleOptimizer(sgd(0.1)), 2))
    expect(ValueError, lambda: GradientAccumulation(sgd(0.1), 2, clipnorm=1.0))
    x, y, sw = training_data(8)

    def plain_keras_loss():
        m = model(initial_weights())
        m.compile(optimizer=GradientAccumulation("sgd", 2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(x, np.maximum(y, 0), batch_size=4, epochs=1, verbose=0)

    def summed_head():
        m = model(initial_weights())
        m.compile(optimizer=GradientAccumulation("sgd", 2), loss=COMPILED.loss_fn(reduction="sum"))
        m.fit(x, y, batch_size=4, epochs=1, verbose=0)

    for case in (plain_keras_loss, summed_head):
        expect(ValueError, case)
    return said


def main() -> None:
    out = {"backend": BACKEND, "accumulation": accumulation(30)}
    if BACKEND == "jax":
        out["dp"] = data_parallel(32)
        out["errors"] = errors()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
