"""keras-hub classifiers on each Keras backend: tests/keras_hub_suite.py runs in a child process
per ``KERAS_BACKEND`` (Keras binds its backend once per process)."""

from __future__ import annotations

import pytest

from .conftest import require, run_keras_suite


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_keras_hub_suite(backend):
    require("keras_hub")
    require({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend])
    run_keras_suite("tests/keras_hub_suite.py", backend)
