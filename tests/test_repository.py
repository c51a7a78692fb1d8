"""The repository is self-contained: no test reads a file outside it.

The README's test command has to pass in a fresh clone with nothing beside it. Two checks:

* a scan of the test sources for paths that climb out of the repository (a ``parents[k]`` or a
  ``.parent`` chain above the root, ``..`` components, ``os.pardir``, absolute paths);
* the tests that read data files, run from a copy of the repository in an otherwise empty
  directory, importing the copy's own ``unihead``, with an audit hook that reports every file or
  directory the run opens beside the copy or in this checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import pyproject, require

ROOT = Path(__file__).resolve().parents[1]
TEST_SOURCES = sorted((ROOT / "tests").rglob("*.py"))

# The test files the copy runs: the ones that read files of the repository (questions, README,
# .ci/run). test_diagnose.py once read its questions from a folder beside the checkout.
ISOLATED_TESTS = ("tests/test_diagnose.py", "tests/test_cli.py")
# Frameworks those tests use: the child runs with UNIHEAD_REQUIRE_ALL=1, so a test that cannot
# import one there fails instead of skipping (a skip would hide a broken import path).
ISOLATED_FRAMEWORKS = ("keras", "torch")


# ------------------------------------------------------------------------------ the static scan
def escapes(path: Path, source: str) -> list[str]:
    """The expressions in ``source`` (the file at ``path``) that name a path outside the repository."""
    depth = len(path.relative_to(ROOT).parts)  # tests/x.py: parents[1] (or two .parent) is the root
    found = [m.group(0) for m in re.finditer(r"parents\[\s*(\d+)\s*\]", source) if int(m.group(1)) >= depth]
    found += [m.group(0) for m in re.finditer(r"(?:\.parent\b(?:\.resolve\(\))?)+", source)
              if m.group(0).count(".parent") > depth]
    found += re.findall(r"""(?:^|[/\\'"])\.\.(?:[/\\'"]|$)""", source, re.M)  # a ".." path component
    found += re.findall(r"\bos\.pardir\b", source)
    found += re.findall(r"""['"](?:[A-Za-z]:)?[/\\](?:work|home|Users|mnt|srv|opt|root|tmp)\b[^'"]*['"]""", source)
    found += re.findall(r"""\bshared\W{1,6}seeds\b""", source)
    return found


def test_the_scan_finds_paths_that_leave_the_repository():
    here = ROOT / "tests" / "test_x.py"
    for bad in ('Path(__file__).resolve().parents[2] / "shared"', "Path(__file__).parent.parent.parent",
                'open("../data.txt")', 'ROOT / ".." / "x"', "os.path.join(ROOT, os.pardir)",
                'Path("/work/shared/seeds")', "SEEDS = ROOT / 'shared/seeds'"):
        assert escapes(here, bad), bad
    for good in ("Path(__file__).resolve().parents[1] / 'README.md'", "Path(__file__).parent.parent / 'docs'",
                 "x[..., 0]", "'...'", "tmp_path / 'a'", 'Path(__file__).parent / "data" / "questions"'):
        assert not escapes(here, good), good


def test_no_test_source_names_a_path_outside_the_repository():
    # (this file is left out: it spells such paths out, as examples the scan must catch)
    found = {str(p.relative_to(ROOT)): hits for p in TEST_SOURCES
             if p != Path(__file__).resolve() and (hits := escapes(p, p.read_text()))}
    assert not found, f"tests must read only files of the repository (tests/data/ for test data): {found}"


# ------------------------------------------------------------------------------ the isolated run
def repository_files() -> list[Path]:
    """The files of a fresh clone: git's tracked files plus new, not ignored ones (so the check
    covers the work in progress); without git, the tree minus the usual build products."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        out = None
    if out is not None and out.returncode == 0 and out.stdout:
        return [ROOT / f for f in out.stdout.split("\0") if f and (ROOT / f).is_file()]
    skip = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


# Runs in the child, in the copy: maps the import tree to the copy's folders the way the editable
# install maps it to this checkout ([tool.setuptools] package-dir), records what is opened
# outside the copy, runs the tests and reports.
CHILD = r"""
import importlib.util, json, os, sys
copy, original, venv, mapping, report = sys.argv[1:4] + [json.loads(sys.argv[4]), sys.argv[5]]
args, beside = sys.argv[6:], os.path.dirname(copy)

def within(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)

class CopyFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in mapping:
            folder = mapping[name]
            return importlib.util.spec_from_file_location(
                name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        return None

sys.meta_path.insert(0, CopyFinder)
outside, busy = set(), [False]

def audit(event, event_args):
    if busy[0] or event not in ("open", "os.listdir", "os.scandir", "glob.glob") or not event_args:
        return
    target = event_args[0]
    if not isinstance(target, (str, bytes, os.PathLike)):
        return  # a file descriptor
    busy[0] = True
    try:
        path = os.path.realpath(os.fsdecode(target))
        if (within(path, beside) and not within(path, copy)) or (
                within(path, original) and not within(path, venv) and not within(path, copy)):
            outside.add(event + " " + path)
    finally:
        busy[0] = False

sys.addaudithook(audit)
import pytest
code = pytest.main(args)
modules = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())
           if name == "unihead" or name.startswith("unihead.")}
with open(report, "w") as f:
    json.dump({"exit": int(code), "outside": sorted(outside),
               "foreign_modules": {n: p for n, p in modules.items() if p and not within(os.path.realpath(p), copy)},
               "modules": sorted(modules)}, f)
"""


@pytest.mark.slow
def test_the_tests_that_read_data_pass_from_a_copy_with_nothing_beside_it(tmp_path):
    """A fresh clone in an empty directory: the copy's tests pass, import the copy's unihead, and
    open nothing beside the copy and nothing in this checkout (but the interpreter's packages)."""
    for module in ISOLATED_FRAMEWORKS:
        require(module)
    beside = tmp_path / "alone"
    copy = beside / "unihead"
    for f in repository_files():
        (copy / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, copy / f.relative_to(ROOT))
    assert sorted(p.name for p in beside.iterdir()) == ["unihead"]
    copy = copy.resolve()

    mapping = {name: str(copy / folder) for name, folder in pyproject()["tool"]["setuptools"]["package-dir"].items()}
    report = tmp_path / "report.json"
    # -S: no site processing, so the editable install's finder (which maps unihead to this checkout)
    # is not loaded; the installed packages come from PYTHONPATH, unihead from the copy.
    paths = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), UNIHEAD_REQUIRE_ALL="1")
    args = [*ISOLATED_TESTS, "-q", "-p", "no:cacheprovider"]
    # The environment's own folder may lie inside this checkout (.venv): its files are not the repository's.
    venv = os.path.realpath(sys.prefix)
    res = subprocess.run([sys.executable, "-S", "-c", CHILD, str(copy), str(ROOT), venv, json.dumps(mapping),
                          str(report), *args], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert report.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["exit"] == 0, res.stdout[-5000:]
    summary = res.stdout.strip().splitlines()[-1]
    # every test passed: nothing skipped, failed or deselected
    assert re.fullmatch(r"\d+ passed(?:, \d+ warnings?)? in [\d.]+s(?: \(.*\))?", summary), summary
    assert {"unihead", "unihead.backends", "unihead._diagnose"} <= set(result["modules"])
    assert result["foreign_modules"] == {}, "the copy imported unihead from elsewhere"
    assert result["outside"] == [], "the tests opened files outside the repository"
