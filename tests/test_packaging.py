"""Packaging: one import tree from three folders, in editable and wheel installs; `import unihead`
imports no framework; the console script works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import numpy as np

import unihead

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "jaxlib", "keras", "tensorflow", "optax", "flax", "mpmath")


def run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kw)


def test_import_unihead_imports_no_framework():
    code = (
        "import sys, unihead, numpy as np\n"
        "c = unihead.compile(unihead.ClassificationHead.multiclass(3), 'numpy')\n"
        "c.loss(np.zeros((2, 3), 'f4'), np.array([0, 1]))\n"
        "import unihead.backends, unihead.conformance\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_names_are_not_shadowed_by_modules():
    """``unihead.port``, ``unihead.diagnose`` and ``unihead.validation`` are functions; the modules
    that define them are private, so that importing a module never rebinds a public name."""
    import importlib
    import types

    for name in ("port", "diagnose", "validation", "compile", "load", "save", "infer"):
        assert isinstance(getattr(unihead, name), types.FunctionType), name
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"unihead.{name}")
    for name in ("_port", "_diagnose", "_validation"):
        importlib.import_module(f"unihead.{name}")
    assert isinstance(unihead.port, types.FunctionType)  # still the function after the imports


def test_backends_and_conformance_are_subpackages_of_unihead():
    import unihead.backends.numpy as nb
    import unihead.conformance.reference as ref

    assert nb.__name__ == "unihead.backends.numpy"
    here = Path(unihead.__file__).resolve().parent
    backends_dir = Path(nb.__file__).resolve().parent
    conformance_dir = Path(ref.__file__).resolve().parent
    if here == ROOT / "unihead":  # editable install of this checkout: the folders are mapped
        assert backends_dir == ROOT / "backends"
        assert conformance_dir == ROOT / "conformance"
    else:  # a wheel: everything lives under unihead/
        assert backends_dir == here / "backends"
        assert conformance_dir == here / "conformance"


@pytest.mark.slow
def test_wheel_contains_and_imports_the_whole_tree(tmp_path):
    """Build a wheel from this checkout and import it in isolation (no editable finder)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "dist"), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    wheel = next((tmp_path / "dist").glob("unihead-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in (
        "unihead/__init__.py", "unihead/formulas.py", "unihead/backends/__init__.py",
        "unihead/backends/numpy.py", "unihead/conformance/__init__.py", "unihead/conformance/reference.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("backends/", "conformance/", "tests/")) for n in names)
    assert any(n.endswith("entry_points.txt") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # -S: no site processing, so the editable install's finder is not loaded; dependencies come
    # from this interpreter's site-packages, unihead from the unpacked wheel.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]))
    code = (
        "import unihead, unihead.backends.numpy as nb, unihead.conformance.reference as r\n"
        "import numpy as np\n"
        "print(unihead.__file__); print(nb.__file__)\n"
        "c = unihead.compile(unihead.ClassificationHead.binary(), 'numpy')\n"
        "print(float(c.loss(np.zeros((2, 1), 'f4'), np.array([0, 1]))))\n"
    )
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site / "unihead" / "backends"))
    assert abs(float(lines[2]) - 0.6931471805599453) < 1e-6

    # the command line from the wheel: write a head file, port it (checked), diagnose a Keras model
    head = unihead.ClassificationHead.multiclass(3)
    unihead.save(tmp_path / "head.safetensors", head, {"kernel": np.ones((4, 3), "f4"), "bias": np.zeros(3, "f4")})
    cmd = [sys.executable, "-S", "-m", "unihead"]
    res = subprocess.run([*cmd, "port", "head.safetensors", "--to", "numpy"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0 and "port numpy -> numpy" in res.stdout, res.stderr
    keras = require("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="softmax")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.save(tmp_path / "m.keras")
    res = subprocess.run([*cmd, "diagnose", "m.keras"], capture_output=True, text=True,
                         env=dict(env, KERAS_BACKEND="jax"), cwd=tmp_path, timeout=300)
    assert res.returncode == 1 and "softmax_one_unit" in res.stdout, res.stderr[-2000:]


def test_console_script():
    exe = shutil.which("unihead") or str(Path(sys.executable).parent / "unihead")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"unihead {unihead.__version__}"
    out = subprocess.run([sys.executable, "-m", "unihead", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: unihead" in out.stdout


def test_unknown_and_missing_backends_are_explained(monkeypatch):
    with pytest.raises(ValueError, match="Unknown backend 'mxnet'.*available"):
        unihead.compile(unihead.ClassificationHead.binary(), "mxnet")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(unihead.BackendNotAvailableError, match=r"pip install unihead\[torch\]"):
        unihead.compile(unihead.ClassificationHead.binary(), "torch")
    with pytest.raises(TypeError, match="takes a ClassificationHead"):
        unihead.compile("binary", "numpy")
