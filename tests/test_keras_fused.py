"""The fused linear + loss on Keras (``KerasHead.linear_loss``, ``HeadDense.linear_loss``,
``FusedHeadModel``) on each Keras backend: tests/keras_fused_suite.py runs in a child process per
``KERAS_BACKEND`` (Keras binds its backend once per process), as tests/test_keras.py runs
tests/keras_suite.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_keras_fused_suite(backend):
    require("keras")
    require({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend])
    require("torch")  # the suite reuses tests/test_fused.py's float64 reference, which imports it
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/keras_fused_suite.py", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::DeprecationWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
    assert out.returncode == 0, f"Keras on {backend}:\n{tail}"
    assert " passed" in out.stdout and " skipped" not in out.stdout, tail
