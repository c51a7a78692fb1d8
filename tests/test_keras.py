"""The Keras backend on each Keras backend: tests/keras_suite.py runs in a child process per
``KERAS_BACKEND`` (Keras binds its backend once per process)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from .conftest import require, run_keras_suite


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
def test_keras_suite(backend):
    require("keras")
    require({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend])
    run_keras_suite("tests/keras_suite.py", backend)


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


_ANNOUNCE = (
    "import warnings, unihead, keras\n"
    "with warnings.catch_warnings(record=True) as seen:\n"
    "    warnings.simplefilter('always')\n"
    "    for _ in range(2):\n"
    "        unihead.compile(unihead.ClassificationHead.multiclass(3), 'keras')\n"
    "said = [str(w.message) for w in seen if issubclass(w.category, UserWarning) and 'unihead' in str(w.message)]\n"
    "print('RESULT', keras.backend.backend(), len(said), repr(said[0] if said else ''))\n"
)


def _announce(tmp_path, keras_home, backend=None):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(keras_home), TF_CPP_MIN_LOG_LEVEL="3")
    if backend:
        env["KERAS_BACKEND"] = backend
    out = subprocess.run([sys.executable, "-c", _ANNOUNCE], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")][-1]
    _, name, count, message = result.split(" ", 3)
    return name, int(count), ast.literal_eval(message)


@pytest.mark.slow
def test_compile_says_once_which_backend_keras_fell_back_to(tmp_path):
    """Without KERAS_BACKEND or a keras.json of the user's, Keras imports TensorFlow (seconds, and
    its logs): unihead.compile says so once, and how to choose; a choice silences it."""
    require("keras")
    require("tensorflow")
    home = tmp_path / "keras_home"
    name, count, message = _announce(tmp_path, home)  # no keras.json: Keras writes its own
    assert (name, count) == ("tensorflow", 1), message
    assert "KERAS_BACKEND=jax" in message and "KERAS_BACKEND=torch" in message and "keras.json" in message
    assert str(home / "keras.json") in message
    assert (home / "keras.json").exists()  # what Keras wrote is its default, chosen by nobody:
    assert _announce(tmp_path, home)[:2] == ("tensorflow", 1)
    # a choice, either way, silences it
    require("jax")
    assert _announce(tmp_path, home, backend="jax")[:2] == ("jax", 0)
    assert _announce(tmp_path, home, backend="tensorflow")[:2] == ("tensorflow", 0)
    chosen = tmp_path / "chosen"
    chosen.mkdir()
    (chosen / "keras.json").write_text('{"backend": "jax"}')
    assert _announce(tmp_path, chosen)[:2] == ("jax", 0)
