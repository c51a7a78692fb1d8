"""The Keras backend on each Keras backend: tests/keras_suite.py runs in a child process per
``KERAS_BACKEND`` (Keras binds its backend once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]


def _run_suite(backend: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/keras_suite.py", "-q", "-p", "no:cacheprovider", "-W",
         "ignore::DeprecationWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_keras_suite(backend):
    require("keras")
    require({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend])
    out = _run_suite(backend)
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
    assert out.returncode == 0, f"Keras on {backend}:\n{tail}"
    assert " passed" in out.stdout and " skipped" not in out.stdout, tail


def test_keras_numpy_backend_runs_inference(tmp_path):
    """The NumPy Keras backend cannot train; a head's layer and probabilities still work."""
    require("keras")
    code = (
        "import numpy as np, unihead, keras\n"
        "assert keras.backend.backend() == 'numpy'\n"
        "c = unihead.compile(unihead.ClassificationHead.multiclass(3), 'keras')\n"
        "m = keras.Sequential([keras.Input((4,)), c.layer()])\n"
        "z = m.predict(np.ones((2, 4), 'float32'), verbose=0)\n"
        "p = np.asarray(c.probabilities(z))\n"
        "assert p.shape == (2, 3) and np.allclose(p.sum(-1), 1)\n"
        "assert float(c.loss(z, np.array([0, 2]))) > 0\n"
        "print('ok')\n"
    )
    env = dict(os.environ, KERAS_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
