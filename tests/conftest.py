"""Shared test configuration.

* Keras binds its backend once per process; the main test process uses JAX (tests for the other
  Keras backends run in child processes).
* In CI (``CI=true``) or with ``UNIHEAD_REQUIRE_ALL=1`` every framework must be installed: a test
  that would skip for a missing framework fails instead, so nothing is silently skipped there.
* Hypothesis runs derandomized (fixed seed): the suite is deterministic.
* Compiled PyTorch kernels go to a cache directory of the run's own and are never built in the
  background; the tests of that mechanism build them on purpose.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled PyTorch kernels (backends/_torch_aot.py): a cache of this run's own, and no builds in the
# background (a head the suite calls 500 times would start one); tests/test_torch_aot.py builds
# the kernels it checks explicitly.
if "UNIHEAD_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["UNIHEAD_CACHE_DIR"] = tempfile.mkdtemp(prefix="unihead-test-cache-")
    atexit.register(shutil.rmtree, os.environ["UNIHEAD_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("UNIHEAD_TORCH_HOT_CALLS", str(10**9))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "unihead",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("unihead")

REQUIRE_ALL = os.environ.get("UNIHEAD_REQUIRE_ALL") == "1" or os.environ.get("CI", "").lower() == "true"


def require(module: str):
    """Import ``module`` or skip the test (fail in CI, where every framework is installed)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if REQUIRE_ALL:
            pytest.fail(f"{module} must be installed for this run (CI): {exc}")
        pytest.skip(f"{module} is not installed")


def run_keras_suite(suite: str, backend: str, timeout: float = 1800) -> None:
    """Run the pytest file ``suite`` (relative to the repository) in a child process with
    ``KERAS_BACKEND=backend`` (Keras binds its backend once per process); fail with the tail of
    its output unless it ran and passed every test, skipping none."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", suite, "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=timeout,
    )
    tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
    assert out.returncode == 0, f"{suite} with Keras on {backend}:\n{tail}"
    assert " passed" in out.stdout and " skipped" not in out.stdout, tail


def pyproject() -> dict:
    """The repository's pyproject.toml, parsed (``tomllib`` from Python 3.11; on 3.10 pytest itself
    depends on ``tomli``, the same parser)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
