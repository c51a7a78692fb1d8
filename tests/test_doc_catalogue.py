"""docs/diagnose-and-port.md catalogues every finding code ``unihead.diagnose`` can emit.

The codes are collected from the source (every ``Finding`` made in unihead/_diagnose.py, by
``_Ctx.add(code, severity, ...)`` or ``Finding(code, severity, ...)``), not from a list kept by
hand: a new code without its catalogue entry, an entry for a code that no longer exists, or a
severity the catalogue misstates fails here.  (That each entry's trigger really emits its code
is checked by the catalogue's own code block, run by tests/test_docs.py.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "unihead" / "_diagnose.py"
DOC = ROOT / "docs" / "diagnose-and-port.md"
SEVERITIES = ("error", "warning", "info")


def emitted() -> dict[str, set[str]]:
    """``{code: {severities}}`` of every finding the module makes."""
    tree = ast.parse(SOURCE.read_text(encoding="utf-8"))
    # _Ctx.add passes its own arguments on to Finding: the codes are at its callers
    adder = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "_Ctx")
    add = next(n for n in adder.body if isinstance(n, ast.FunctionDef) and n.name == "add")
    inside_add = {id(n) for n in ast.walk(add)}
    codes: dict[str, set[str]] = {}
    calls = 0
    for node in ast.walk(tree):
        if id(node) in inside_add:
            continue
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        is_add = isinstance(f, ast.Attribute) and f.attr == "add" and isinstance(f.value, ast.Name) \
            and f.value.id == "c"
        is_finding = isinstance(f, ast.Name) and f.id == "Finding"
        if not (is_add or is_finding):
            continue
        calls += 1
        code, severity = node.args[0], node.args[1]
        # a code or severity computed at run time could not be catalogued from the source
        assert isinstance(code, ast.Constant) and isinstance(code.value, str), ast.unparse(node)[:200]
        assert isinstance(severity, ast.Constant) and severity.value in SEVERITIES, ast.unparse(node)[:200]
        codes.setdefault(code.value, set()).add(severity.value)
    assert calls >= len(codes) > 0
    return codes


def catalogue() -> dict[str, set[str]]:
    """``{code: {severities}}`` from the doc's catalogue: a ``### `code``` heading per code, with
    a ``* **Severity:** ...`` line below it."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"^## Catalogue of finding codes\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "docs/diagnose-and-port.md has no '## Catalogue of finding codes' section"
    section = m.group(1)
    entries: dict[str, set[str]] = {}
    parts = re.split(r"^### `(\w+)`[ \t]*$", section, flags=re.M)
    for code, body in zip(parts[1::2], parts[2::2]):
        assert code not in entries, f"{code} is catalogued twice"
        sev = re.search(r"^\* \*\*Severity:\*\* (.+)$", body, re.M)
        assert sev, f"the catalogue entry {code} has no '* **Severity:**' line"
        entries[code] = {s for s in SEVERITIES if re.search(rf"\b{s}\b", sev.group(1))}
    # the summary table at the top of the section lists the same codes
    table = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert table == set(entries), f"summary table vs entries: {sorted(table ^ set(entries))}"
    return entries


def test_every_emitted_code_is_catalogued_and_nothing_else():
    code, doc = emitted(), catalogue()
    assert sorted(set(code) - set(doc)) == [], "codes diagnose emits that the catalogue lacks"
    assert sorted(set(doc) - set(code)) == [], "catalogued codes diagnose never emits"


def test_catalogued_severities_are_the_emitted_ones():
    code, doc = emitted(), catalogue()
    wrong = {c: (sorted(doc[c]), sorted(code[c])) for c in code if doc.get(c) != code[c]}
    assert not wrong, f"code: (catalogue, source) severities differ: {wrong}"


def test_no_other_module_makes_findings():
    """The catalogue reads one module: a Finding made elsewhere would go uncatalogued."""
    others = [p.relative_to(ROOT).as_posix() for p in (ROOT / "unihead").rglob("*.py")
              if p != SOURCE and re.search(r"\bFinding\(", p.read_text(encoding="utf-8"))]
    assert others == []
