"""Run the conformance cases on backends, compare with the independent reference, report.

* References: :class:`~unihead.conformance.reference.F64Reference` for float32 and bfloat16
  cases, :class:`~unihead.conformance.reference.MPReference` (400 digits) for float64 cases.
* Errors are in ulp of the case's dtype at the reference value (float32 for float32 and
  bfloat16 inputs, float64 for float64), absolute where the reference is 0; gradients in ulp of
  the larger of their two terms; NaN must match NaN and infinities must match exactly; on
  backends found to flush subnormals to zero, after an absolute allowance of K times the
  smallest normal number (docs/semantics.md §11).  Predictions must be identical (rows with
  NaN logits excepted: unspecified).
* The split dimension (``split_loss``, ``split_grad``): the case in uneven pieces combined
  through ``loss_weight`` and ``loss(..., normalizer=W)`` (:mod:`~unihead.conformance.adapters`),
  against the same reference (the whole batch's loss and gradient) with the same tolerances as
  ``loss`` and ``grad``.  ``split_loss`` is the worst of the combined loss, of the pieces'
  ``loss_terms`` added up (total over weight) against the reference, and of their weights against
  the sum of ``loss_weight``.
* Keras backends run in child processes (one per ``KERAS_BACKEND``), reading the cases in the
  export format.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from unihead import _ulp
from unihead.spec import ClassificationHead

from .adapters import BUILTIN, KERAS_BACKENDS, make_adapter, missing
from .cases import Case
from .reference import DBL_MIN, FLT_MIN, F64Reference, MPReference, ulp_error

__all__ = ["SHARDED_NOTE", "COLUMNS", "Results", "references", "compare", "run", "write_cases", "read_cases"]

COLUMNS = ("probabilities", "log_probabilities", "none", "loss", "predict", "grad", "split_loss", "split_grad",
           "fused", "fused_grad", "sharded")
TITLES = {
    "probabilities": "probabilities", "log_probabilities": "log-probs", "none": "per-example",
    "loss": "loss", "predict": "predictions", "grad": "gradient", "split_loss": "split loss",
    "split_grad": "split grad", "fused": "fused", "fused_grad": "fused grad",
    "sharded": "sharded",
}

#: What the split columns are (the command's footnote, the JSON report's "split")
SPLIT_NOTE = (
    "split loss/grad: each case's batch in 2, 3 or 7 uneven pieces (a piece weighing 0 where the case can "
    "weigh an example 0; empty pieces among 7), W = sum of the pieces' loss_weight, loss = sum of "
    "loss(piece, normalizer=W) (reduction='sum': of the pieces' sums; 'none': the pieces' values in place), "
    "gradient = the pieces' gradients in place; against the whole batch's reference, same tolerances; "
    "split loss includes the pieces' loss_terms added up (total / weight) and their weights against W"
)

#: What the fused columns are (the command's footnote, the JSON report's "fused")
FUSED_NOTE = (
    "fused/fused grad: compiled.linear_loss(hidden, kernel, labels, None, sample_weight) with hidden = the "
    "case's logits and kernel = the identity (hidden @ kernel is the logits exactly), chunks of 1/3 of the "
    "classes, cases of up to 4096 classes (the identity of 32000 is 4 GB); fused = the worst of its loss "
    "and its per-example values (reduction='none'), fused grad = the gradient with respect to hidden "
    "(= d loss / d logits); softmax heads with class ids only, cases with finite logits (a -inf or NaN "
    "logit times 0 in the matmul is NaN); same tolerances as loss and grad"
)

#: What the sharded column is (the command's footnote, the JSON report's "sharded")
SHARDED_NOTE = (
    "sharded: the class-sharded (vocab-parallel) loss with the classes in 2-3 uneven shards (the first "
    "holding one class), each shard's row statistics reduced by unihead._sharded.reduce_stats, the code the "
    "collectives of class_sharded_loss run (here in one process, the shards stacked); the worst of its loss "
    "and its per-example values (reduction='none'); softmax heads with class ids only (-inf logits included); "
    "same tolerances as loss"
)

# ----------------------------------------------------------------------------- references
def reference(case: Case) -> dict[str, Any]:
    """Reference outputs of one case (float64 arrays, or mpf object arrays for float64 cases)."""
    z = case.logits
    if case.dtype == "float64":
        ref = MPReference(case.head)
        out = ref.evaluate(z, case.labels, case.sample_weight)
        out.update(probabilities=ref.probabilities(z), log_probabilities=ref.log_probabilities(z))
    else:
        ref = F64Reference(case.head)
        out = ref.evaluate(z, case.labels, case.sample_weight)
        out.update(probabilities=ref.probabilities(z), log_probabilities=ref.log_probabilities(z))
    out["predict"] = MPReference(case.head).predict(z.astype(np.float64 if case.dtype == "float64" else np.float32))
    return out


def references(cases: list[Case]) -> list[dict[str, Any]]:
    return [reference(c) for c in cases]


# ----------------------------------------------------------------------------- comparison
def _errors(value: np.ndarray, ref: np.ndarray, dtype: str, scale: Any = None, floor: float = 0.0) -> float:
    """Worst ulp error of ``value`` against ``ref`` (see the module docstring; the unit is
    :mod:`unihead._ulp`'s)."""
    value = np.asarray(value)
    if value.shape != np.shape(ref):
        return math.inf
    if np.asarray(ref).dtype == object:  # mpmath reference: exact differences
        return ulp_error(value, ref, dtype, scale=scale, floor=floor)
    return _ulp.ulp_error(value, ref, dtype, scale=scale, floor=floor)


def _is_bf16_valued(x: np.ndarray) -> bool:
    """True when every value is a bfloat16 value (a gradient returned in bfloat16)."""
    import ml_dtypes

    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):
        return bool(np.all((x.astype(ml_dtypes.bfloat16).astype(np.float32) == x) | ~np.isfinite(x)))


def compare(case: Case, out: dict[str, np.ndarray], ref: dict[str, Any], ftz: bool) -> dict[str, float | None]:
    """Errors per column (``None``: the backend does not provide that output)."""
    floor = 0.0
    if ftz:
        floor = case.head.num_outputs * (DBL_MIN if case.dtype == "float64" else FLT_MIN)
    errs: dict[str, float | None] = {}
    for col in ("probabilities", "log_probabilities", "none", "loss"):
        errs[col] = _errors(out[col], ref[col], case.dtype, floor=floor) if col in out else None
    if "grad" in out:
        # autodiff returns the gradient in the logits' dtype: bfloat16 logits get a bfloat16
        # gradient, measured in bfloat16 ulp (an accurate float32 gradient, rounded, is <= 0.5)
        gdtype = "bfloat16" if case.dtype == "bfloat16" and _is_bf16_valued(out["grad"]) else case.dtype
        errs["grad"] = _errors(out["grad"], ref["grad"], gdtype, scale=ref["grad_scale"], floor=floor)
    else:
        errs["grad"] = None
    errs.update(_split_errors(case, out, ref, floor))
    errs.update(_fused_errors(case, out, ref, floor))
    errs["sharded"] = None
    if "sharded_loss" in out:
        errs["sharded"] = max(_errors(out["sharded_loss"], ref["loss"], case.dtype, floor=floor),
                              _errors(out["sharded_none"], ref["none"], case.dtype, floor=floor))
    got, want = np.asarray(out["predict"]), np.asarray(ref["predict"])
    if got.shape != want.shape:
        errs["predict"] = math.inf
    else:
        nan_rows = np.isnan(case.logits).any(-1)
        if case.head.task == "multilabel":
            nan_rows = np.broadcast_to(nan_rows[..., None], want.shape)
        errs["predict"] = float(np.sum((got != want) & ~nan_rows))
    return errs


def _split_errors(case: Case, out: dict[str, np.ndarray], ref: dict[str, Any], floor: float) -> dict[str, float | None]:
    """The split dimension's errors (module docstring); ``None`` where the backend gave none."""
    if "split_loss" not in out:
        return {"split_loss": None, "split_grad": None}
    dtype = case.dtype
    loss = _errors(out["split_loss"], ref["loss"], dtype, floor=floor)
    if case.head.reduction == "none":  # the terms' total is the sum of the per-example values
        total = np.asarray(ref["none"])
        terms_ref = np.asarray(sum(total.ravel().tolist(), total.ravel()[0] * 0) if total.dtype == object
                               else np.sum(total, dtype=np.float64), dtype=total.dtype)
    else:
        terms_ref = ref["loss"]
    terms = _errors(out["split_terms"], terms_ref, dtype, floor=floor)
    # the weights loss_terms gives, added up, are the sum of loss_weight
    weights = _errors(out["split_weight"], np.asarray(out["split_W"], np.float64), dtype)
    errs: dict[str, float | None] = {"split_loss": max(loss, terms, weights), "split_grad": None}
    if "split_grad" in out:
        gdtype = "bfloat16" if dtype == "bfloat16" and _is_bf16_valued(out["split_grad"]) else dtype
        errs["split_grad"] = _errors(out["split_grad"], ref["grad"], gdtype, scale=ref["grad_scale"], floor=floor)
    return errs


def _fused_errors(case: Case, out: dict[str, np.ndarray], ref: dict[str, Any], floor: float) -> dict[str, float | None]:
    """The fused columns' errors (:data:`FUSED_NOTE`); ``None`` where the backend gave none."""
    if "fused_loss" not in out:
        return {"fused": None, "fused_grad": None}
    dtype = case.dtype
    loss = max(_errors(out["fused_loss"], ref["loss"], dtype, floor=floor),
               _errors(out["fused_none"], ref["none"], dtype, floor=floor))
    grad = None
    if "fused_grad" in out:
        gdtype = "bfloat16" if dtype == "bfloat16" and _is_bf16_valued(out["fused_grad"]) else dtype
        grad = _errors(out["fused_grad"], ref["grad"], gdtype, scale=ref["grad_scale"], floor=floor)
    return {"fused": loss, "fused_grad": grad}


def passes(case: Case, errs: dict[str, float | None]) -> bool:
    for col, e in errs.items():
        if e is None:
            continue
        if col == "predict":
            if e != 0:
                return False
        elif not e <= case.tolerance_of(col):
            return False
    return True


# ----------------------------------------------------------------------------- export format
def write_cases(directory: str | Path, cases: list[Case], refs: list[dict] | None = None, **meta: Any) -> Path:
    """Write cases (and reference outputs) as ``index.json`` plus one ``.npz`` per case."""
    from unihead import __version__

    d = Path(directory)
    (d / "cases").mkdir(parents=True, exist_ok=True)
    index = []
    for i, case in enumerate(cases):
        arrays = {"logits": case.logits, "labels": case.labels}
        if case.sample_weight is not None:
            arrays["sample_weight"] = case.sample_weight
        if refs is not None:
            for key, value in refs[i].items():
                arr = np.asarray(value)
                if arr.dtype == object:  # mpmath values, rounded to float64 for the file
                    arr = np.vectorize(float, otypes=[np.float64])(arr) if arr.size else arr.astype(np.float64)
                arrays[f"reference_{'per_example' if key == 'none' else key}"] = arr
        name = f"cases/{i:05d}.npz"
        np.savez(d / name, **arrays)
        index.append({
            "id": case.id, "file": name, "head": case.head.to_dict(), "dtype": case.dtype,
            "regime": case.regime, "tolerance_ulp": case.tolerance, "gradient_tolerance_ulp": case.tolerance_of("grad"),
            "ulp_of": "float64" if case.dtype == "float64" else "float32",
        })
    (d / "index.json").write_text(json.dumps({
        "format": "unihead.conformance", "version": 1, "unihead": __version__, **meta,
        "outputs": {
            "reference_probabilities": "softmax/sigmoid of the logits, (..., K)",
            "reference_log_probabilities": "(..., K)",
            "reference_per_example": "reduction='none' values, (...)",
            "reference_loss": "the head's reduction",
            "reference_grad": "d loss / d logits (of sum(per-example) for reduction='none')",
            "reference_grad_scale": "the larger of the gradient's two terms: its ulp is taken there",
            "reference_predict": "class ids (...) or 0/1 (..., K)",
        },
        "cases": index,
    }, indent=1))
    return d


def read_cases(directory: str | Path) -> list[Case]:
    d = Path(directory)
    index = json.loads((d / "index.json").read_text())
    cases = []
    for entry in index["cases"]:
        data = np.load(d / entry["file"])
        cases.append(Case(
            entry["id"], ClassificationHead.from_dict(entry["head"]), entry["dtype"], entry["regime"],
            data["logits"], data["labels"], data["sample_weight"] if "sample_weight" in data else None,
        ))
    return cases


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class BackendResult:
    name: str
    status: str = "ok"  # ok | not installed | error
    detail: str = ""
    ftz: bool = False
    has_grad: bool = True
    errors: list[dict[str, float | None]] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)  # ids of failing cases
    crashed: dict[str, str] = dataclasses.field(default_factory=dict)  # id -> exception
    seconds: float = 0.0


@dataclasses.dataclass
class Results:
    cases: list[Case]
    backends: dict[str, BackendResult]
    seed: int
    quick: bool

    @property
    def ok(self) -> bool:
        return all(b.status != "error" and not b.failures and not b.crashed for b in self.backends.values()
                   if b.status != "not installed")

    def worst(self, name: str, col: str, focal: bool | None = None) -> float | None:
        b = self.backends[name]
        vals = [e[col] for c, e in zip(self.cases, b.errors)
                if e and e.get(col) is not None and (focal is None or (c.head.focal_gamma > 0) == focal)]
        return max(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            return v

        return {
            "seed": self.seed, "quick": self.quick, "cases": len(self.cases),
            "tolerance": "values 4 ulp, gradients 6 ulp at the scale of their terms (focal: +2 gamma); predictions exact",
            "split": SPLIT_NOTE,
            "fused": FUSED_NOTE,
            "sharded": SHARDED_NOTE,
            "backends": {
                name: {
                    "status": b.status, "detail": b.detail, "flushes_subnormals": b.ftz, "seconds": round(b.seconds, 2),
                    "passed": b.status == "ok" and not b.failures and not b.crashed,
                    "worst": {col: clean(self.worst(name, col)) for col in COLUMNS} if b.status == "ok" else {},
                    "cases": [
                        {"id": c.id, "tolerance": {k: c.tolerance_of(k) for k in COLUMNS if k != "predict"},
                         "errors": {k: clean(v) for k, v in e.items()},
                         "pass": passes(c, e) and c.id not in b.crashed, **({"exception": b.crashed[c.id]} if c.id in b.crashed else {})}
                        for c, e in zip(self.cases, b.errors)
                    ] if b.status == "ok" else [],
                }
                for name, b in self.backends.items()
            },
        }


# ----------------------------------------------------------------------------- progress
class Progress:
    def __init__(self, total: dict[str, int], enabled: bool) -> None:
        self.total = total
        self.done = {k: 0 for k in total}
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, name: str, n: int) -> None:
        self.done[name] = n
        now = time.monotonic()
        if not self.enabled or (not self.tty and now - self._last < 10) or (self.tty and now - self._last < 0.1):
            return
        self._last = now
        parts = []
        for k, t in self.total.items():
            frac = self.done[k] / t if t else 1.0
            bar = "#" * int(frac * 10)
            parts.append(f"{k} [{bar:<10}] {self.done[k]}/{t}")
        line = "  ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line[: 200].ljust(200))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * 200 + "\r")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- running
def run_cases(adapter: Any, cases: list[Case], progress: Any = None) -> tuple[list[dict], dict[str, str], bool]:
    """Outputs of ``cases`` on one adapter (in this process)."""
    outputs, crashed = [], {}
    for i, case in enumerate(cases):
        try:
            outputs.append(adapter.run(case))
        except Exception as exc:  # a backend failing a case is a result, not a suite crash
            outputs.append({})
            crashed[case.id] = f"{type(exc).__name__}: {exc}"
        if progress:
            progress(i + 1)
    return outputs, crashed, adapter.flushes_subnormals()


def _start_keras_child(backend: str, case_dir: Path, out_file: Path) -> subprocess.Popen:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        [sys.executable, "-m", "unihead.conformance.worker", str(case_dir), str(out_file), f"keras-{backend}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )


def _read_child(out_file: Path, cases: list[Case]) -> tuple[list[dict], dict[str, str], bool, bool]:
    meta = json.loads(out_file.with_suffix(".json").read_text())
    data = np.load(out_file)
    outputs = []
    for i in range(len(cases)):
        prefix = f"{i}/"
        outputs.append({k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)})
    return outputs, meta["crashed"], meta["ftz"], meta["has_grad"]


def run(
    backends: Iterable[str],
    cases: list[Case],
    *,
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    refs: list[dict] | None = None,
) -> Results:
    """Run ``cases`` on ``backends`` (built-in names, ``keras-<backend>``, entry points or
    ``module:object``) and compare with the reference."""
    backends = list(backends)
    results = {name: BackendResult(name) for name in backends}
    runnable = []
    for name in backends:
        gone = missing(name)
        if gone:
            results[name].status = "not installed"
            results[name].detail = f"needs {', '.join(gone)}"
        else:
            runnable.append(name)
    prog = Progress({n: len(cases) for n in runnable}, progress)
    with tempfile.TemporaryDirectory(prefix="unihead-conformance-") as tmp:
        tmp_path = Path(tmp)
        children = {}
        keras_names = [n for n in runnable if n.startswith("keras-") and n[6:] in KERAS_BACKENDS]
        if keras_names:
            write_cases(tmp_path / "cases", cases)
            for name in keras_names:
                children[name] = (_start_keras_child(name[6:], tmp_path / "cases", tmp_path / f"{name}.npz"), time.monotonic())
        sel = selectors.DefaultSelector()
        for name, (proc, _) in children.items():
            os.set_blocking(proc.stdout.fileno(), False)
            sel.register(proc.stdout, selectors.EVENT_READ, name)

        def poll_children() -> None:
            for key, _ in sel.select(timeout=0):
                chunk = key.fileobj.read() or ""
                for line in chunk.splitlines():
                    if line.startswith("progress "):
                        prog.update(key.data, int(line.split()[1]))

        if refs is None:
            refs = []
            for case in cases:
                refs.append(reference(case))
                poll_children()
        for name in runnable:
            if name in children:
                continue
            start = time.monotonic()
            try:
                adapter = make_adapter(name)
            except Exception as exc:
                results[name].status, results[name].detail = "error", f"{type(exc).__name__}: {exc}"
                continue

            def tick(n: int, name: str = name) -> None:
                prog.update(name, n)
                poll_children()

            outputs, crashed, ftz = run_cases(adapter, cases, tick)
            _collect(results[name], cases, refs, outputs, crashed, ftz, adapter.has_grad is not False)
            results[name].seconds = time.monotonic() - start
        for name, (proc, start) in children.items():
            while proc.poll() is None:
                poll_children()
                time.sleep(0.05)
            poll_children()
            err = proc.stderr.read()
            out_file = tmp_path / f"{name}.npz"
            if proc.returncode != 0 or not out_file.exists():
                results[name].status = "error"
                results[name].detail = (err or "").strip().splitlines()[-1:] and (err or "").strip().splitlines()[-1] or f"exit {proc.returncode}"
                continue
            outputs, crashed, ftz, has_grad = _read_child(out_file, cases)
            _collect(results[name], cases, refs, outputs, crashed, ftz, has_grad)
            results[name].seconds = time.monotonic() - start
        prog.close()
    return Results(cases, results, seed, quick)


def _collect(res: BackendResult, cases: list[Case], refs: list[dict], outputs: list[dict],
             crashed: dict[str, str], ftz: bool, has_grad: bool) -> None:
    res.ftz, res.has_grad, res.crashed = ftz, has_grad, dict(crashed)
    for case, out, ref in zip(cases, outputs, refs):
        if case.id in crashed or not out:
            res.errors.append({})
            continue
        errs = compare(case, out, ref, ftz)
        res.errors.append(errs)
        if not passes(case, errs):
            res.failures.append(case.id)


# ----------------------------------------------------------------------------- report
def matrix(results: Results) -> str:
    """The table people read at a glance."""
    names = list(results.backends)
    label = {n: BUILTIN.get(n, (n,))[0] for n in names}
    head = ["backend", "cases"] + [TITLES[c] for c in COLUMNS] + ["result"]
    rows = []
    for n in names:
        b = results.backends[n]
        if b.status != "ok":
            rows.append([label[n], "-"] + ["-"] * len(COLUMNS) + [b.status + (f" ({b.detail})" if b.detail else "")])
            continue
        cells = []
        for col in COLUMNS:
            w = results.worst(n, col)
            bad = any(not passes(c, {col: e.get(col)}) for c, e in zip(results.cases, b.errors) if e)
            if col in ("grad", "split_grad", "fused_grad") and not b.has_grad:
                cells.append("n/a")
            elif col == "predict":
                cells.append("exact" if not bad else f"{int(w)} wrong")
            else:
                cells.append(("-" if w is None else f"{w:.2f}") + (" FAIL" if bad else ""))
        status = "PASS" if not b.failures and not b.crashed else f"FAIL ({len(b.failures) + len(b.crashed)} cases)"
        rows.append([label[n], str(len(results.cases))] + cells + [status])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def failure_details(results: Results, limit: int = 10) -> str:
    out = []
    for n, b in results.backends.items():
        for cid in list(b.crashed)[:limit]:
            out.append(f"{n}: {cid}: raised {b.crashed[cid]}")
        for cid in b.failures[:limit]:
            i = next(i for i, c in enumerate(results.cases) if c.id == cid)
            errs = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in b.errors[i].items()
                    if v is not None and not passes(results.cases[i], {k: v})}
            tol = {k: results.cases[i].tolerance_of(k) for k in errs}
            out.append(f"{n}: {cid}: {errs} (tolerance {tol} ulp)")
        extra = max(0, len(b.failures) - limit) + max(0, len(b.crashed) - limit)  # not shown above
        if extra > 0:
            out.append(f"{n}: ... and {extra} more (see --json)")
    return "\n".join(out)
