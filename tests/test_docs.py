"""Every code block in README.md and docs/*.md runs as written.

* ```python blocks are self-contained (a reader copies one block into a file and runs it): each
  runs from a file of its own (``_block_<line>.py``: ``torch.multiprocessing.spawn`` re-imports
  the main module from its file, which ``python -c`` has not) in a fresh interpreter, in a
  scratch folder shared by the blocks of its file, in order (a block may write a file that a
  later ``console`` block of the same file reads).
* ```console blocks are shell sessions: each ``$ command`` line runs (``unihead`` and ``python``
  are this interpreter's), and the lines after it are its expected output. An expected line
  ``...`` stands for any number of lines; a line ending in ``...`` for any line it begins.
  The exit status must be 0 unless the block's directive says ``status=N``.
* ```bash blocks are the README's two commands: tests/test_cli.py checks that they are what
  ``.ci/run`` runs (running them here would install the project inside its own tests).
* ```text blocks are not code (formats, tables of figures).

A directive in an HTML comment just before a block sets its environment:
``<!-- docs-test: KERAS_BACKEND=torch -->``, or its expected exit status:
``<!-- docs-test: status=1 -->``, or the environment it runs in: ``<!-- docs-test: python=timm -->``
marks the block ``timm`` (pytest's marker): the main run leaves it out and the timm environment
runs it (``pytest -m timm tests/test_docs.py``, the README's test commands), since timm cannot
load in the main environment (see tests/test_timm.py). Blocks that use Keras without a directive
run on Keras' JAX backend (the fastest to start), which the reader's default TensorFlow gives the
same numbers as.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
LANGUAGES = {"python", "console", "bash", "text"}
ENVIRONMENTS = ("timm",)  # the test environments besides the main one (python=NAME in a directive)


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str
    env: dict[str, str] = field(default_factory=dict)
    status: int = 0
    python: str = ""  # "timm": runs in the timm environment (marker `timm`)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        b = Block(path, line, m.group(1), m.group(2))
        d = DIRECTIVE.search(before)
        if d:
            for item in d.group(1).split():
                key, _, value = item.partition("=")
                if key == "status":
                    b.status = int(value)
                elif key == "python":
                    assert value in ENVIRONMENTS, f"{b.id}: python={value!r}: one of {ENVIRONMENTS}"
                    b.python = value
                else:
                    b.env[key] = value
        out.append(b)
    return out


ALL = [b for p in DOCS for b in blocks(p)]
RUNNABLE = [b for b in ALL if b.language in ("python", "console")]
PARAMS = [pytest.param(b, id=b.id, marks=[getattr(pytest.mark, b.python)] if b.python else []) for b in RUNNABLE]


def test_every_block_says_what_it_is():
    """A block without a language, or with one the test does not know, would go unchecked."""
    unknown = [f"{b.id} ({b.language or 'no language'})" for b in ALL if b.language not in LANGUAGES]
    assert not unknown, f"code blocks need one of {sorted(LANGUAGES)}: {unknown}"


def test_bash_blocks_are_the_two_commands():
    """The only shell commands not run here are the README's two (tests/test_cli.py checks them
    against .ci/run)."""
    bash = [b.id for b in ALL if b.language == "bash"]
    assert len(bash) == 2 and all(i.startswith("README.md:") for i in bash), bash


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folders: dict[Path, Path] = {}

    def folder(path: Path) -> Path:
        if path not in folders:
            folders[path] = tmp_path_factory.mktemp(path.stem)
        return folders[path]

    return folder


def environment(block: Block) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "jax")
    env.update(block.env)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONWARNINGS"] = "error::DeprecationWarning:unihead"  # docs use no deprecated name
    env.pop("PYTHONPATH", None)
    return env


def run_python(block: Block, cwd: Path) -> None:
    script = cwd / f"_block_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    out = subprocess.run([sys.executable, script.name], cwd=cwd, env=environment(block),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == block.status, f"{block.id} exited {out.returncode}:\n{out.stderr[-3000:]}"


def sessions(code: str) -> list[tuple[str, list[str]]]:
    """``$ command`` lines and the output lines after each."""
    out: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"a console block starts with '$ ': {line!r}")
    return out


def matches(expected: list[str], actual: list[str]) -> bool:
    """``...`` lines match any lines; a line ending in ``...`` matches a line it begins."""
    expected = [e.rstrip() for e in expected]
    while expected and not expected[-1]:
        expected.pop()
    actual = [a.rstrip() for a in actual]
    while actual and not actual[-1]:
        actual.pop()

    def at(i: int, j: int) -> bool:
        if i == len(expected):
            return j == len(actual)
        e = expected[i]
        if e == "...":
            return any(at(i + 1, k) for k in range(j, len(actual) + 1))
        if j == len(actual):
            return False
        a = actual[j]
        ok = a.startswith(e[:-3]) if e.endswith("...") else a == e
        return ok and at(i + 1, j + 1)

    return at(0, 0)


def run_console(block: Block, cwd: Path) -> None:
    env = environment(block)
    for command, expected in sessions(block.code):
        argv = shlex.split(command)
        if argv[0] == "python":
            argv[0] = sys.executable
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        actual = (out.stdout + out.stderr).splitlines()
        assert out.returncode == block.status, (
            f"{block.id}: `{command}` exited {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        assert matches(expected, actual), (
            f"{block.id}: `{command}` printed\n" + "\n".join(actual) + "\n\nexpected\n" + "\n".join(expected))


def test_blocks_that_import_timm_run_in_its_environment():
    """timm cannot load in the main environment: a block that imports it says python=timm, so the
    main run leaves it out and the timm run runs it, rather than either failing or skipping it."""
    from .test_packaging import imported_modules

    wrong = [b.id for b in RUNNABLE if ("timm" in imported_modules(b.code)) != (b.python == "timm")]
    assert not wrong, f"blocks that import timm need <!-- docs-test: python=timm --> (and only they): {wrong}"
    assert any(b.python == "timm" for b in RUNNABLE), "docs/timm.md's blocks run in the timm environment"


@pytest.mark.parametrize("block", PARAMS)
def test_block_runs(block: Block, scratch):
    cwd = scratch(block.path)
    (run_python if block.language == "python" else run_console)(block, cwd)


def test_the_matcher():
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "...", "d"], ["a", "d"])
    assert not matches(["a", "...", "d"], ["a", "b"])
    assert matches(["port keras -> numpy: ..."], ["port keras -> numpy: within 3 ulp"])
    assert not matches(["x"], ["x", "y"])


def test_relative_links_lead_somewhere():
    """Every relative link in the docs names a file of the repository (and a heading, for #anchors)."""
    broken = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and dest.suffix == ".md":
                slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                         for h in re.findall(r"^#+ (.*)$", dest.read_text(encoding="utf-8"), re.M)}
                if anchor not in slugs:
                    broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, broken
