"""The fused linear + loss on Keras (``KerasHead.linear_loss``, ``HeadDense.linear_loss``,
``FusedHeadModel``) on each Keras backend: tests/keras_fused_suite.py runs in a child process per
``KERAS_BACKEND`` (Keras binds its backend once per process), as tests/test_keras.py runs
tests/keras_suite.py."""

from __future__ import annotations

import pytest

from .conftest import require, run_keras_suite


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_keras_fused_suite(backend):
    require("keras")
    require({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend])
    require("torch")  # the suite reuses tests/test_fused.py's float64 reference, which imports it
    run_keras_suite("tests/keras_fused_suite.py", backend, timeout=900)
