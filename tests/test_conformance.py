"""The conformance suite: the quick suite on every backend, the reference checked against
mpmath, a wrong backend caught, the export format, and the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import unihead
from unihead.conformance import adapters
from unihead.conformance.cases import generate
from unihead.conformance.reference import F64Reference, MPReference, ulp_error
from unihead.conformance.suite import compare, failure_details, matrix, read_cases, reference, run, write_cases

from .conftest import require

QUICK = generate(0, quick=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(adapters.BUILTIN))
def test_quick_suite_passes_on_every_backend(backend):
    for module in adapters.BUILTIN[backend][1]:
        require(module)
    results = run([backend], QUICK, progress=False)
    b = results.backends[backend]
    assert b.status == "ok", b.detail
    assert not b.crashed, b.crashed
    assert not b.failures, failure_details(results)
    assert results.ok


def test_cases_cover_every_task_format_option_regime_and_dtype():
    full = generate(0)
    heads = {c.head for c in full}
    assert {(h.task, h.label_format) for h in heads} == {
        ("binary", "binary"), ("binary", "probabilities"), ("multiclass", "sparse"), ("multiclass", "one_hot"),
        ("multiclass", "probabilities"), ("multilabel", "multi_hot"), ("multilabel", "probabilities")}
    assert {h.binary_units for h in heads if h.task == "binary"} == {1, 2}
    assert {h.num_classes for h in heads if h.task != "binary"} >= {2, 3, 10, 1000, 32000}
    assert any(h.label_smoothing for h in heads) and any(h.class_weights for h in heads)
    assert any(h.pos_weight is not None for h in heads) and any(h.ignore_index is not None for h in heads)
    assert any(h.focal_gamma for h in heads) and {h.reduction for h in heads} == {"mean", "sum", "none"}
    assert any(c.sample_weight is not None and (c.sample_weight == 0).any() for c in full)
    assert {c.regime for c in full} == {"ordinary", "large30", "large1e4", "huge", "confident", "ties", "masked", "leading"}
    assert {c.dtype for c in full} == {"float32", "float64", "bfloat16"}
    assert any("all-ignored" in c.id for c in full)
    assert any(c.logits.ndim == 3 for c in full) and any(np.isneginf(c.logits).any() for c in full)
    # deterministic
    again = generate(0)
    assert [c.id for c in again] == [c.id for c in full]
    assert all(np.array_equal(a.logits, b.logits) for a, b in zip(again, full))


def test_float64_reference_agrees_with_mpmath_on_a_sample():
    """The float64 reference (used for float32 cases) against 400-digit mpmath."""
    sample = [c for c in generate(0) if c.dtype == "float32" and c.head.num_outputs <= 10][::9]
    assert len(sample) > 40
    worst = 0.0
    for case in sample:
        mp, f64 = MPReference(case.head), F64Reference(case.head)
        a, b = mp.evaluate(case.logits, case.labels, case.sample_weight), f64.evaluate(case.logits, case.labels, case.sample_weight)
        for key in ("none", "loss", "grad"):
            scale = np.ravel(a["grad_scale"]) if key == "grad" else [None] * np.size(a[key])
            worst = max(worst, max(ulp_error(x, r, "float32", scale=s)
                                   for x, r, s in zip(np.ravel(b[key]), np.ravel(a[key]), scale)))
        for fm, ff in ((mp.probabilities, f64.probabilities), (mp.log_probabilities, f64.log_probabilities)):
            worst = max(worst, max(ulp_error(x, r) for x, r in zip(np.ravel(ff(case.logits)), np.ravel(fm(case.logits)))))
    assert worst < 1e-3, worst  # in float32 ulp: the reference's own error is invisible


def test_a_wrong_backend_is_caught_and_its_cases_named(capsys):
    name = "tests.wrong_backend:compile_head"
    results = run([name], QUICK, progress=False)
    b = results.backends[name]
    assert b.status == "ok" and not results.ok
    smoothed = {c.id for c in QUICK if c.head.label_smoothing and c.head.activation == "softmax"}
    assert smoothed and set(b.failures) == smoothed  # exactly the softmax cases with smoothing
    text = matrix(results)
    assert "FAIL" in text and name in text
    details = failure_details(results)
    assert all(cid in details for cid in b.failures[:10])  # the first ten, in order, then a count
    assert len(b.failures) <= 10 or f"and {len(b.failures) - 10} more" in details
    # through the command: exit status 1
    from unihead.conformance.cli import main

    assert main(["--quick", "--backend", name, "--no-progress", "--task", "multiclass"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_nan_is_compared_explicitly():
    case = QUICK[0]
    ref = reference(case)
    out = {k: np.asarray(v, np.float64) for k, v in ref.items() if k != "grad_scale"}
    assert case.head.reduction == "mean"
    out.update(split_loss=out["loss"], split_grad=out["grad"], split_terms=out["loss"],
               split_weight=np.asarray(3.0), split_W=np.asarray(3.0),
               fused_loss=out["loss"], fused_none=out["none"], fused_grad=out["grad"],
               sharded_loss=out["loss"], sharded_none=out["none"])
    assert all(e in (0, 0.0) for e in compare(case, out, ref, ftz=False).values())
    bad = dict(out, probabilities=np.full_like(out["probabilities"], np.nan))
    assert compare(case, bad, ref, ftz=False)["probabilities"] == np.inf
    bad = dict(out, loss=np.asarray(np.inf))
    assert compare(case, bad, ref, ftz=False)["loss"] == np.inf
    # the split: its loss, its terms and its weights each count; no split output: not measured
    for key, value in (("split_loss", np.nan), ("split_terms", np.inf), ("split_weight", 3.5)):
        assert compare(case, dict(out, **{key: np.asarray(value)}), ref, ftz=False)["split_loss"] > 1e3, key
    assert compare(case, dict(out, split_grad=-out["grad"]), ref, ftz=False)["split_grad"] > 1
    plain = {k: v for k, v in out.items() if not k.startswith("split")}
    assert compare(case, plain, ref, ftz=False)["split_loss"] is None
    # the fused columns: the loss and the per-example values each count; none given: not measured
    for key in ("fused_loss", "fused_none"):
        assert compare(case, dict(out, **{key: np.full_like(out[key], np.nan)}), ref, ftz=False)["fused"] > 1e3, key
    assert compare(case, dict(out, fused_grad=-out["grad"]), ref, ftz=False)["fused_grad"] > 1
    unfused = {k: v for k, v in out.items() if not k.startswith("fused")}
    assert compare(case, unfused, ref, ftz=False)["fused"] is None
    # the sharded column: likewise
    for key in ("sharded_loss", "sharded_none"):
        assert compare(case, dict(out, **{key: np.full_like(out[key], np.nan)}), ref, ftz=False)["sharded"] > 1e3, key
    unsharded = {k: v for k, v in out.items() if not k.startswith("sharded")}
    assert compare(case, unsharded, ref, ftz=False)["sharded"] is None


def test_sharded_bounds_are_uneven_and_cover_every_class():
    from unihead.conformance.cases import sharded_bounds

    assert sharded_bounds(2) == (0, 1, 2)
    for k in range(2, 40):
        b = sharded_bounds(k)
        assert b[0] == 0 and b[-1] == k and all(x < y for x, y in zip(b, b[1:])) and len(b) - 1 in (2, 3)
        if k >= 4:
            assert len({y - x for x, y in zip(b, b[1:])}) > 1  # uneven


def test_split_pieces_cover_each_case_unevenly_with_a_weightless_piece():
    from unihead.conformance.cases import _dead_rows, split_pieces

    full = generate(0)
    counts, weightless = set(), 0
    for case in full:
        pieces = split_pieces(case)
        n = case.logits.shape[0]
        assert sorted(np.concatenate(pieces).tolist()) == list(range(n)), case.id  # each example once
        sizes = [len(p) for p in pieces]
        counts.add(len(pieces))
        assert len(set(sizes)) > 1 or n < len(pieces) + 1, case.id  # uneven
        dead = _dead_rows(case)
        if dead.any():  # the case can weigh an example 0, and does: a piece of weight 0
            assert dead[pieces[0]].all() and len(pieces[0]) == 1, case.id
            weightless += 1
        assert split_pieces(case)[0].tolist() == pieces[0].tolist()  # deterministic
    assert counts == {2, 3, 7} and weightless > 100


def test_export_round_trip(tmp_path):
    cases = QUICK[:6]
    refs = [reference(c) for c in cases]
    write_cases(tmp_path, cases, refs, seed=0)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "unihead.conformance" and len(index["cases"]) == 6
    entry = index["cases"][0]
    data = np.load(tmp_path / entry["file"])
    for key in ("logits", "labels", "reference_probabilities", "reference_log_probabilities",
                "reference_per_example", "reference_loss", "reference_grad", "reference_grad_scale",
                "reference_predict"):
        assert key in data.files, key
    assert unihead.ClassificationHead.from_dict(entry["head"]) == cases[0].head
    back = read_cases(tmp_path)
    assert [c.id for c in back] == [c.id for c in cases]
    assert all(np.array_equal(a.logits, b.logits) for a, b in zip(back, cases))
    # an implementation in any language checks itself against the files: here, NumPy
    c = unihead.compile(back[0].head, "numpy")
    np.testing.assert_allclose(c.probabilities(data["logits"]), data["reference_probabilities"], rtol=1e-6)


def test_backends_not_installed_are_reported_not_passed(monkeypatch):
    monkeypatch.setattr(adapters, "missing", lambda name: ["somelib"] if name == "torch" else [])
    import unihead.conformance.suite as suite

    monkeypatch.setattr(suite, "missing", adapters.missing)
    results = run(["numpy", "torch"], QUICK[:3], progress=False)
    assert results.backends["torch"].status == "not installed"
    assert "not installed" in matrix(results)
    assert results.ok  # numpy passed; a missing backend is neither a pass nor a failure
    results = run(["torch"], QUICK[:3], progress=False)
    from unihead.conformance.cli import main

    assert main(["--quick", "--backend", "torch", "--no-progress"]) == 1  # nothing installed ran


def test_entry_point_backends_are_run_by_default(monkeypatch):
    import unihead._registry as reg
    from unihead.conformance import cli

    class EP:
        name = "wrongone"

        def load(self):
            from . import wrong_backend

            return wrong_backend.compile_head

    monkeypatch.setattr(reg, "_entry_points", lambda: {"wrongone": EP()})
    assert "wrongone" in cli.default_backends() and "wrongone" in unihead.available_backends()
    assert unihead.compile(unihead.ClassificationHead.multiclass(3), "wrongone").head.num_classes == 3


@pytest.mark.slow
def test_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "unihead.conformance", "--quick", "--backend", "numpy", "--json", str(tmp_path / "r.json"),
         "--no-progress"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "numpy" in out.stdout and "PASS" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backends"]["numpy"]["passed"] and len(report["backends"]["numpy"]["cases"]) == len(QUICK)
    out = subprocess.run([sys.executable, "-m", "unihead", "conformance", "--export", str(tmp_path / "x"), "--quick"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and (tmp_path / "x" / "index.json").exists()


@pytest.mark.slow
def test_quick_suite_passes_under_xla_on_tensorflow():
    """Keras trains on TensorFlow with XLA (``jit_compile``): there unihead takes XLA's float32
    ``log`` and ``log1p`` (float64 ones outside XLA).  The quick cases, each as one XLA program,
    hold the same tolerances (a child process: Keras binds its backend once)."""
    require("tensorflow")
    script = (
        "from unihead.conformance.adapters import KerasAdapter\n"
        "from unihead.conformance.cases import generate\n"
        "from unihead.conformance.suite import compare, passes, reference, run_cases\n"
        "a = KerasAdapter(xla=True)\n"
        "assert a.xla\n"
        "cases = generate(0, quick=True)\n"
        "outs, crashed, ftz = run_cases(a, cases)\n"
        "assert not crashed, crashed\n"
        "bad = [c.id for c, o in zip(cases, outs) if not passes(c, compare(c, o, reference(c), ftz))]\n"
        "assert not bad, bad\n"
        "print('ok', len(cases))\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].startswith("ok ")
