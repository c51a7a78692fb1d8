"""Packaging: one import tree from three folders, in editable and wheel installs; `import unihead`
imports no framework; the console script works; the license and the type marker ship; the extras
install what the documentation imports."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import numpy as np

import unihead

from .conftest import pyproject, require

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
        "unihead/py.typed",  # PEP 561: type checkers read the package's hints
    ):
        assert expected in names, expected
    assert not any(n.startswith(("backends/", "conformance/", "tests/")) for n in names)
    # the license: its text in the dist-info (PEP 639) and its SPDX expression in the metadata
    with zipfile.ZipFile(wheel) as zf:
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(license_file) == (ROOT / "LICENSE").read_bytes()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = zf.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers and "License-File: LICENSE" in headers
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


# The SHA-256 of the Apache License 2.0 as the ASF publishes it
# (https://www.apache.org/licenses/LICENSE-2.0.txt), appendix placeholders included.
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_file_is_the_license_pyproject_declares():
    import hashlib

    from packaging.requirements import Requirement

    meta = pyproject()
    assert meta["project"]["license"] == "Apache-2.0" and meta["project"]["license-files"] == ["LICENSE"]
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_0_SHA256
    # a string `license` (an SPDX expression, PEP 639) and `license-files` are understood from
    # setuptools 77.0.0 on; 76 refuses the string ("must be valid exactly by one definition")
    (setuptools,) = [r for r in map(Requirement, meta["build-system"]["requires"]) if r.name == "setuptools"]
    assert "77.0.0" in setuptools.specifier and "76.1.0" not in setuptools.specifier, setuptools


# ------------------------------------------------------------------------------ extras and the docs
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
EXAMPLE_FILES = sorted((ROOT / "examples").rglob("*.py"))
FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1", re.S | re.M)
IMPORT = re.compile(r"^\s*(?:>>>\s*|\.\.\.\s*)?(?:from\s+([A-Za-z_]\w*)[\w.]*\s+import\b|import\s+([^#;\n]+))", re.M)


def normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def imported_modules(code: str) -> set[str]:
    """The top-level modules that the import statements in ``code`` name (any text: a code block
    need not be valid Python as a whole, e.g. a command's printed output)."""
    found = set()
    for from_module, names in IMPORT.findall(code):
        if from_module:
            found.add(from_module)
        else:
            found.update(part.split()[0].split(".")[0] for part in names.split(",") if part.split())
    return {m for m in found if m.isidentifier()}


def requirement_names(requirements: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {normalized(Requirement(r).name) for r in requirements}


def test_the_extras_install_what_the_documentation_imports():
    """Every module a README/docs code block or an example imports is the standard library,
    unihead, or installed by unihead's dependencies or one of its extras (not `test`: the docs are
    for users); so is every module of a distribution pyproject.toml names that the docs' inline
    code uses (`optax.smooth_labels`)."""
    import ast

    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    provided = requirement_names(project["dependencies"]).union(
        *(requirement_names(r) for extra, r in extras.items() if extra != "test"))
    declared = requirement_names(project["dependencies"]).union(*map(requirement_names, extras.values()))
    module_dists = {module: {normalized(d) for d in dists}
                    for module, dists in importlib.metadata.packages_distributions().items()}
    declared_modules = {module for module, dists in module_dists.items() if dists & declared}

    used: dict[str, set[str]] = {}  # module -> the files that use it
    for path in DOC_FILES:
        text, where = path.read_text(), str(path.relative_to(ROOT))
        modules = set().union(*(imported_modules(block.group(2)) for block in FENCE.finditer(text)))
        for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
            modules |= imported_modules(span)
            modules |= declared_modules.intersection(re.findall(r"(?<![\w.\-/])([A-Za-z_]\w*)\.[A-Za-z_]", span))
        for module in modules:
            used.setdefault(module, set()).add(where)
    for path in EXAMPLE_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                used.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    assert "unihead" in used, sorted(used)  # the scan reads the docs

    missing = {}
    for module, where in sorted(used.items()):
        if module in sys.stdlib_module_names or module == "unihead":
            continue
        # a module this environment lacks (timm: it has an environment of its own, tests/test_timm.py)
        # is matched by the distribution of its name
        dists = module_dists.get(module) or {normalized(module)} & declared
        if not dists & provided:
            missing[module] = (sorted(dists) or "not installed", sorted(where))
    assert not missing, f"the docs use modules that no extra installs (add them to one): {missing}"


def test_the_extras_the_docs_and_messages_name_exist():
    """`pip install unihead[jax]` in the docs, or in an error message, names a real extra (extra
    names are lower case, PEP 685)."""
    extras = set(pyproject()["project"]["optional-dependencies"])
    sources = [*DOC_FILES, *EXAMPLE_FILES, *sorted(ROOT.glob("unihead/*.py")), *sorted(ROOT.glob("backends/*.py")),
               *sorted(ROOT.glob("conformance/*.py"))]
    # unihead[jax], ".[all,test]", or a bare `[jax]` in inline code
    extras_named = re.compile(r"(?:\bunihead|(?<=[\s'\"])\.)\[([a-z0-9,\s-]+)\]|(?<!`)`\[([a-z0-9,-]+)\]`(?!`)")
    named = {}
    for path in sources:
        for group in extras_named.findall(path.read_text()):
            for extra in ",".join(group).split(","):
                if extra.strip():
                    named.setdefault(extra.strip(), set()).add(str(path.relative_to(ROOT)))
    assert {"torch", "jax", "keras", "all", "test"} <= set(named), named
    unknown = {e: sorted(w) for e, w in named.items() if e not in extras}
    assert not unknown, f"extras named but not defined in pyproject.toml: {unknown}"
