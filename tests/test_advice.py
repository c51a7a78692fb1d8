"""The advice unihead prints is right (issue 16).

1. Every native line ``unihead.diagnose`` prints comes from one generator
   (``unihead._native.native_loss``); here each one is *executed*, in PyTorch (in this process,
   float64) and in Keras (a child process per Keras backend: JAX, PyTorch, TensorFlow; float64
   inputs, some steps rounded to float32 by Keras), for every head and sample-weight combination
   the conformance cases cover plus every pair of options with every reduction, and must give
   the head's loss within the tolerances of tests/test_native_equivalence.py.  Where the
   generator says no native loss gives the head's numbers, the nearest native call it names is
   executed too and must really differ.  Its verdicts agree with the native-equivalence table
   (docs/semantics.md §10).
2. ``diagnose`` without a loss says what it could not check and still flags what the structure
   shows.
3. ``diagnose`` and ``ClassificationHead.from_labels`` read labels with one rule set.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead._native import LOSS_VERB, native_lines, native_loss

from .conftest import require
from .test_native_equivalence import RTOL

ROOT = Path(__file__).resolve().parents[1]
N = 12
# A "no native loss" claim: the nearest call is off by more than 100 times the agreement asked of
# an exact line.
DIFFERS = {fw: 100 * rtol for fw, rtol in RTOL.items()}


# ------------------------------------------------------------------------------ the combinations
FORMATS = [("binary", "binary", 1), ("binary", "binary", 2), ("binary", "probabilities", 1),
           ("binary", "probabilities", 2), ("multiclass", "sparse", None), ("multiclass", "one_hot", None),
           ("multiclass", "probabilities", None), ("multilabel", "multi_hot", None),
           ("multilabel", "probabilities", None)]
OPTIONS = ("smooth", "cw", "pw", "ignore", "focal", "sw")


def _grid_head(task, fmt, units, options, reduction, k=4):
    kw = {"label_format": fmt, "reduction": reduction}
    if task == "binary":
        kw["binary_units"] = units
    else:
        kw["num_classes"] = k
    n_cw = 2 if task == "binary" else k
    for o in options:
        if o == "smooth":
            kw["label_smoothing"] = 0.1
        elif o == "cw":
            kw["class_weights"] = [0.5, 2.0, 1.25, 3.0][:n_cw]
        elif o == "pw":
            kw["pos_weight"] = 2.5 if task == "binary" else [1.5, 3.0, 0.5, 2.0][:k]
        elif o == "ignore":
            kw["ignore_index"] = -100 if task == "multiclass" else -1
        elif o == "focal":
            kw["focal_gamma"] = 2.0
    return H(task, **kw)


def combinations():
    """(head, sample_weight) pairs: the conformance cases' heads, and every option alone and in
    pairs for every label format, with each reduction."""
    from unihead.conformance.cases import generate

    out = {}
    for c in generate(0):
        sw = None
        if c.sample_weight is not None:
            sw = "label" if c.head.task == "multilabel" and c.sample_weight.shape == c.logits.shape else "example"
        out[(c.head, sw)] = None
    for task, fmt, units in FORMATS:
        for n in (0, 1, 2):
            for options in itertools.combinations(OPTIONS, n):
                if "pw" in options and task == "multiclass" or "ignore" in options and fmt not in ("sparse", "binary"):
                    continue
                sws = [None]
                if "sw" in options:
                    sws = ["example", "label"] if task == "multilabel" else ["example"]
                for reduction in ("mean", "sum", "none"):
                    for sw in sws:
                        out[(_grid_head(task, fmt, units, options, reduction), sw)] = None
    return list(out)


COMBOS = combinations()
COMBO_IDS = [f"{h!r}|sw={sw}" for h, sw in COMBOS]
# every label ignored: the heads give 0 (mean and sum), PyTorch's mean NaN (docs/semantics.md §7)
ALL_IGNORED = [(h, sw) for h, sw in COMBOS if h.ignore_index is not None]
KERAS_CASES = [(h, sw, False) for h, sw in COMBOS] + [
    (h, sw, True) for h, sw in ALL_IGNORED if native_loss(h, "keras", sw).exact]


def case_data(head, sw, all_ignored=False):
    """Moderate logits, valid labels (some ignored where the head ignores a label; all of them
    with ``all_ignored``), sample weights (one zero): deterministic per combination, so the Keras
    child sees the same data."""
    rng = np.random.default_rng(zlib.crc32(f"{head!r}|{sw}".encode()))
    k, fmt = head.num_outputs, head.label_format
    z = rng.normal(size=(N, k)) * 2
    if fmt == "sparse":
        y = rng.integers(0, k, N)
    elif fmt == "one_hot":
        y = np.eye(k)[rng.integers(0, k, N)]
    elif fmt == "binary":
        y = (np.arange(N) % 2).astype(np.float64)[rng.permutation(N)]
    elif fmt == "multi_hot":
        y = (rng.uniform(size=(N, k)) < 0.4).astype(np.float64)
    elif head.task == "multiclass":
        y = rng.dirichlet(np.ones(k), size=N)
    else:
        y = rng.uniform(size=(N, k) if head.task == "multilabel" else N)
    if head.ignore_index is not None:
        y = np.where((np.arange(N) % 4 == 1) | all_ignored, head.ignore_index, y)
    s = None
    if sw is not None:
        s = rng.uniform(0.25, 2.0, (N, k) if sw == "label" else N)
        s.reshape(-1)[3] = 0.0
    return z, y, s


def head_values(head, sw, all_ignored=False):
    """What the head gives (NumPy backend, float64): loss and probabilities."""
    z, y, s = case_data(head, sw, all_ignored)
    c = unihead.compile(head, "numpy")
    return np.asarray(c.loss(z, y, s)), np.asarray(c.probabilities(z))


def check(framework, head, sw, got, want):
    """An exact line must give the head's numbers; the nearest call of a "none" line must not."""
    nl = native_loss(head, framework, sw)
    if nl.exact:
        assert isinstance(got, np.ndarray), f"{framework} line failed: {got}\n{nl.text()}"
        assert got.shape == want.shape, (got.shape, want.shape, nl.text())
        np.testing.assert_allclose(got, want, rtol=RTOL[framework], atol=1e-30, err_msg=nl.text())
    else:
        assert isinstance(got, np.ndarray), f"nearest {framework} call failed: {got}\n{nl.code}"
        assert got.shape == want.shape, (got.shape, want.shape, nl.code)
        rel = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12))
        assert rel > DIFFERS[framework], \
            f"{framework}: claimed no native loss, but the nearest call matches:\n{nl.code}\n{nl.note}"


# ------------------------------------------------------------------------------ PyTorch
def run_torch(head, sw, all_ignored=False):
    """Executes the printed PyTorch text (layer, loss, probabilities) in float64; a "none"
    verdict runs the nearest call instead.  Returns (loss, probabilities) or an error string."""
    torch = require("torch")
    z, y, s = case_data(head, sw, all_ignored)
    nl = native_loss(head, "torch", sw)
    code = nl.text() if nl.exact else "\n".join(nl.code)
    ns = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, "in_features": 8,
          "logits": torch.tensor(z), "labels": torch.as_tensor(y),
          "sample_weight": None if s is None else torch.tensor(s)}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the constants in the code follow the logits' dtype
    try:
        exec(compile(code, "<torch line>", "exec"), ns)  # noqa: S102 - the line under test
    except Exception as e:  # noqa: BLE001 - reported by the assertion
        return f"{type(e).__name__}: {e}", None
    finally:
        torch.set_default_dtype(previous)
    p = ns.get("probabilities")
    return ns["loss"].detach().numpy(), None if p is None else p.detach().numpy()


@pytest.mark.parametrize("head, sw", COMBOS, ids=COMBO_IDS)
def test_pytorch_line_gives_the_heads_numbers(head, sw):
    want, p_want = head_values(head, sw)
    got, p_got = run_torch(head, sw)
    check("torch", head, sw, got, want)
    if native_loss(head, "torch", sw).exact:
        np.testing.assert_allclose(p_got, p_want, rtol=RTOL["torch"])


@pytest.mark.parametrize("head, sw", [(h, sw) for h, sw in ALL_IGNORED if native_loss(h, "torch", sw).exact],
                         ids=repr)
def test_pytorch_line_on_an_all_ignored_batch(head, sw):
    """The caveat the exact lines carry is true: a mean over no example is NaN in PyTorch (0 in
    unihead); sum and none give unihead's zeros."""
    want, _ = head_values(head, sw, all_ignored=True)
    got, _ = run_torch(head, sw, all_ignored=True)
    nl = native_loss(head, "torch", sw)
    if head.reduction == "mean":
        assert "NaN in PyTorch and 0 in unihead" in nl.note
        assert np.isnan(got) and want == 0
    else:
        assert not np.any(np.isnan(got)) and "NaN" not in nl.note
        np.testing.assert_allclose(got, want, rtol=RTOL["torch"], atol=1e-30)


# ------------------------------------------------------------------------------ Keras
def _keras_child(combos_path: str, out_path: str) -> None:
    """In a child process with KERAS_BACKEND set: executes every Keras text (or nearest call)
    on float64 tensors of the backend and saves the results.  float64 (``floatx`` and the dtype
    policy; the PyTorch lines run with the default dtype float64) keeps float32 cancellation
    out of small per-example losses; Keras still rounds some steps to float32 (``keras.ops.mean``
    computes in float32 on the JAX and PyTorch backends), so the Keras tolerance of
    tests/test_native_equivalence.py applies."""
    import keras

    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")

    combos = json.loads(Path(combos_path).read_text())
    results, errors = {}, {}
    for i, (head_dict, sw, all_ignored) in enumerate(combos):
        head = H.from_dict(head_dict)
        z, y, s = case_data(head, sw, all_ignored)
        nl = native_loss(head, "keras", sw)
        code = nl.text() if nl.exact else "\n".join(nl.code)
        y = y.astype(np.int32) if head.label_format == "sparse" else y
        ns = {"keras": keras, "logits": keras.ops.convert_to_tensor(z), "labels": keras.ops.convert_to_tensor(y),
              "sample_weight": None if s is None else keras.ops.convert_to_tensor(s)}
        try:
            exec(compile(code, "<keras line>", "exec"), ns)  # noqa: S102 - the line under test
            results[f"{i}/loss"] = keras.ops.convert_to_numpy(ns["loss"]).astype(np.float64)
            if "probabilities" in ns:
                results[f"{i}/p"] = keras.ops.convert_to_numpy(ns["probabilities"]).astype(np.float64)
        except Exception as e:  # noqa: BLE001 - reported by the parent
            errors[str(i)] = f"{type(e).__name__}: {e}"
    np.savez(out_path, errors=json.dumps(errors), **results)


_KERAS_RUNS: dict[str, tuple] = {}


def keras_results(backend, tmp_dir):
    if backend not in _KERAS_RUNS:
        require("keras")
        require({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend])
        combos = tmp_dir / f"combos-{backend}.json"
        out = tmp_dir / f"keras-{backend}.npz"
        combos.write_text(json.dumps([[h.to_dict(), sw, a] for h, sw, a in KERAS_CASES]))
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", JAX_ENABLE_X64="1")
        code = f"from tests.test_advice import _keras_child; _keras_child({str(combos)!r}, {str(out)!r})"
        run = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"Keras on {backend}:\n{run.stderr[-3000:]}"
        with np.load(out) as f:
            _KERAS_RUNS[backend] = (json.loads(str(f["errors"])), {k: f[k] for k in f.files if k != "errors"})
    return _KERAS_RUNS[backend]


@pytest.fixture(scope="module")
def keras_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("keras-lines")


@pytest.mark.parametrize("backend", ["jax", "torch", "tensorflow"])
@pytest.mark.parametrize("index", range(len(KERAS_CASES)),
                         ids=[f"{h!r}|sw={sw}" + "|all-ignored" * a for h, sw, a in KERAS_CASES])
def test_keras_line_gives_the_heads_numbers(backend, index, keras_dir):
    """As the PyTorch lines; an all-ignored batch included (Keras gives unihead's 0 there)."""
    head, sw, all_ignored = KERAS_CASES[index]
    errors, results = keras_results(backend, keras_dir)
    want, p_want = head_values(head, sw, all_ignored)
    got = results.get(f"{index}/loss", errors.get(str(index)))
    check("keras", head, sw, got, want)
    if native_loss(head, "keras", sw).exact:
        np.testing.assert_allclose(results[f"{index}/p"], p_want, rtol=RTOL["keras"])


# ------------------------------------------------------------------------------ the table
def table_verdicts():
    """{row: {framework: names a call}} from docs/semantics.md §10."""
    doc = (ROOT / "docs" / "semantics.md").read_text()
    table = {}
    for line in doc.splitlines():
        m = re.match(r"\| (mc\d+|b\d+|ml\d+|sc\d+|zl\d+) \|", line)
        if m:
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[m.group(1)] = {fw: not cell.startswith("none") for fw, cell in zip(("torch", "keras"), cells[2:4])}
    return table


K = 5
W5 = [0.5, 2.0, 1.0, 3.0, 0.25]
TABLE_HEADS = {  # the rows that are a head (and sample weights); mc13 (leading dims) and mc15
    "mc1": (H.multiclass(K), None),  # (an all-ignored batch) are inputs, not heads
    "mc2": (H.multiclass(K, reduction="sum"), None),
    "mc3": (H.multiclass(K, reduction="none"), None),
    "mc4": (H.multiclass(K, class_weights=W5), None),
    "mc5": (H.multiclass(K, ignore_index=-100), None),
    "mc6": (H.multiclass(K, class_weights=W5, ignore_index=-100), None),
    "mc7": (H.multiclass(K, label_smoothing=0.1), None),
    "mc8": (H.multiclass(K, label_smoothing=0.1, class_weights=W5), None),
    "mc9": (H.multiclass(K, label_format="one_hot"), None),
    "mc10": (H.multiclass(K, label_format="probabilities"), None),
    "mc11": (H.multiclass(K, label_format="probabilities", class_weights=W5), None),
    "mc12": (H.multiclass(K), "example"),
    "mc14": (H.multiclass(K, focal_gamma=2.0), None),
    "b1": (H.binary(), None),
    "b2": (H.binary(binary_units=2), None),
    "b3": (H.binary(pos_weight=3.0), None),
    "b4": (H.binary(label_smoothing=0.1), None),
    "b5": (H.binary(class_weights=[0.5, 2.0]), None),
    "b6": (H.binary(focal_gamma=2.0), None),
    "b7": (H.binary(focal_gamma=2.0, class_weights=[0.75, 0.25], reduction="sum"), None),
    "ml1": (H.multilabel(K), None),
    "ml2": (H.multilabel(K, reduction="sum"), None),
    "ml3": (H.multilabel(K, reduction="none"), None),
    "ml4": (H.multilabel(K, pos_weight=[1.0, 2.0, 0.5, 4.0, 1.5]), None),
    "ml5": (H.multilabel(K, class_weights=W5), None),
    "ml6": (H.multilabel(K, label_smoothing=0.1), None),
    "ml7": (H.multilabel(K, focal_gamma=2.0), None),
    "ml8": (H.multilabel(K, label_format="probabilities"), None),
    "sc1": (H.multiclass(K, logit_softcap=2.5), None),
    "sc2": (H.multilabel(K, logit_softcap=2.5), None),
    "zl1": (H.multiclass(K, z_loss=0.01), None),
    "zl2": (H.multiclass(K, z_loss=0.01, ignore_index=-100, class_weights=W5), None),
}


def test_the_generator_agrees_with_the_native_equivalence_table():
    table = table_verdicts()
    assert set(TABLE_HEADS) | {"mc13", "mc15"} == set(table)
    for row, (head, sw) in TABLE_HEADS.items():
        for fw in ("torch", "keras"):
            nl = native_loss(head, fw, sw)
            assert nl.exact == table[row][fw], \
                f"row {row}, {fw}: table {table[row][fw]}, generator {nl.exact}: {nl.note}"
            if not nl.exact:
                assert nl.note and nl.rows, (row, fw)  # a "none" says why, and where the table says so


# ------------------------------------------------------------------------------ the printed text
def test_diagnose_prints_the_generators_lines():
    torch = require("torch")
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.Softmax(-1))
    d = unihead.diagnose(model, nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1))
    f = next(f for f in d.findings if f.code == "double_activation")
    assert f.fix == H.multiclass(3, class_weights=[1.0, 2.0, 0.5], label_smoothing=0.1)
    assert f.lines == native_lines(f.fix, "torch", 16)
    text = str(d)
    assert "no native PyTorch loss gives this head's numbers" in text and "row mc8" in text
    assert "nn.CrossEntropyLoss(weight=" not in f.lines["torch"]  # the near miss is not offered as the fix
    assert f"criterion = compiled.{LOSS_VERB}()" in f.lines["unihead"] and LOSS_VERB == "loss_fn"


@pytest.mark.parametrize("head, sw", COMBOS[::7], ids=COMBO_IDS[::7])
def test_the_unihead_line_names_the_same_head(head, sw):
    for fw in ("torch", "keras"):
        uni = native_lines(head, fw, 16)["unihead"]
        spec = re.search(r"unihead\.compile\(unihead\.(.*), \"(torch|keras)\"\)", uni).group(1)
        assert eval(spec, {"ClassificationHead": H}) == head  # noqa: S307 - our own repr
        compile(uni, "<unihead line>", "exec")


def test_a_native_loss_read_as_a_head_it_cannot_give_is_reported():
    """diagnose's "differs_from_native" comes from the same generator: CrossEntropyLoss(weight=)
    on probability targets reads as a head no PyTorch loss gives (row mc11)."""
    torch = require("torch")
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 3))
    rows = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    d = unihead.diagnose(model, nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])), labels=rows)
    assert d.head == H.multiclass(3, label_format="probabilities", class_weights=[1.0, 2.0, 0.5])
    assert d.ok and d.codes == ("differs_from_native",) and "row mc11" in str(d)
    assert unihead.diagnose(model, nn.CrossEntropyLoss(), labels=rows).findings == ()


# ------------------------------------------------------------------------------ 2. without a loss
def torch_net(*tail, out=3):
    torch = require("torch")
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out), *tail)


def test_without_a_loss_pytorch_says_what_it_did_not_check():
    torch = require("torch")
    nn = torch.nn
    d = unihead.diagnose(torch_net(nn.Softmax(-1)))
    assert d.ok and d.codes == ("probabilities_output", "loss_not_checked"), str(d)
    text = str(d)
    assert "OK as far as checked (the loss was not)" in text and ": OK," not in text
    assert "loss=nn.CrossEntropyLoss(" in text and "nn.CrossEntropyLoss (like unihead's losses) takes logits" in text
    warn = d.findings[0]
    assert warn.severity == "warning" and warn.fix == H.multiclass(3)
    assert warn.lines == native_lines(H.multiclass(3), "torch", 16)
    # what the warning says holds: the losses that take logits are wrong after the module, the
    # loss on probabilities is not an error
    assert "double_activation" in unihead.diagnose(torch_net(nn.Softmax(-1)), nn.CrossEntropyLoss()).codes
    assert "nll_on_probabilities" in unihead.diagnose(torch_net(nn.Softmax(-1)), nn.NLLLoss()).codes
    assert "double_activation" in unihead.diagnose(torch_net(nn.Sigmoid(), out=1), nn.BCEWithLogitsLoss()).codes
    assert unihead.diagnose(torch_net(nn.Sigmoid(), out=1), nn.BCELoss()).findings == ()
    # with the loss, nothing is left unchecked
    assert "loss_not_checked" not in unihead.diagnose(torch_net(), nn.CrossEntropyLoss()).codes


def test_without_a_loss_the_structure_still_shows_errors():
    torch = require("torch")
    nn = torch.nn
    model = torch_net(nn.Softmax(-1), out=1)
    d = unihead.diagnose(model)
    assert not d.ok and d.codes == ("softmax_one_unit", "loss_not_checked"), str(d)
    assert d.head == H.binary() and "always outputs 1.0" in str(d)
    out = model(torch.randn(5, 8)).detach().numpy()  # the claim itself
    np.testing.assert_array_equal(out, np.ones((5, 1), np.float32))
    d = unihead.diagnose(torch_net(nn.Sigmoid(), out=1))
    assert d.ok and d.codes == ("probabilities_output", "loss_not_checked")
    d = unihead.diagnose(torch_net(nn.LogSoftmax(-1)))  # NLLLoss's input: nothing to say without the loss
    assert d.codes == ("loss_not_checked",)
    d = unihead.diagnose(torch_net())
    assert d.ok and d.codes == ("loss_not_checked",) and d.head == H.multiclass(3)
    layer = unihead.compile(H.multilabel(4), "torch").layer(8)
    assert unihead.diagnose(nn.Sequential(layer)).codes == ("loss_not_checked",)
    # labels are still checked
    d = unihead.diagnose(torch_net(), labels=np.array([0, 1, 4]))
    assert "width_mismatch" in d.codes and d.head == H.multiclass(5)


def test_without_a_loss_keras_uncompiled_models():
    keras = require("keras")

    def model(*layers):
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), *layers])

    d = unihead.diagnose(model(keras.layers.Dense(3, activation="softmax")))
    assert d.ok and d.codes == ("probabilities_output", "loss_not_checked"), str(d)
    info = d.findings[0]
    assert info.severity == "info" and "from_logits=False, Keras' default" in info.what  # Keras' idiom: not wrong
    assert "compile the model with its loss" in str(d) and "OK as far as checked" in str(d)
    d = unihead.diagnose(model(keras.layers.Dense(1, activation="softmax")))
    assert not d.ok and d.codes == ("softmax_one_unit", "loss_not_checked")
    d = unihead.diagnose(model(keras.layers.Dense(3, activation="sigmoid")), labels=np.eye(3)[[0, 2, 1]])
    assert d.codes == ("sigmoid_exclusive_labels", "probabilities_output", "loss_not_checked")
    compiled = model(keras.layers.Dense(3, activation="softmax"))
    compiled.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert unihead.diagnose(compiled).findings == ()


# ------------------------------------------------------------------------------ 3. one label reading
LABEL_ARRAYS = [
    np.array([0, 3, 1, 2]),
    np.array([[0], [2], [1]]),
    np.array([0, 1, 1, 0]),
    np.array([0.0, 1.0, 1.0]),
    np.eye(4)[[0, 2, 3]],
    np.eye(2)[[0, 1, 1]],
    np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]]),
    np.array([[0.2, 0.8], [0.5, 0.5]]),
    np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]),
    np.array([[0.2, 0.9], [0.5, 0.1]]),
    np.array([0.25, 0.75, 1.0]),
    np.array([[0.25], [0.75]]),
]


@pytest.mark.parametrize("labels", LABEL_ARRAYS, ids=lambda a: str(a.tolist()))
def test_diagnose_and_from_labels_read_labels_alike(labels):
    """The same label array gives the same head through from_labels and through diagnose (a
    layer of the head's width, no activation, no loss: nothing but the labels decides)."""
    torch = require("torch")
    head = H.from_labels(labels)
    model = torch.nn.Sequential(torch.nn.Linear(8, head.num_outputs))
    assert unihead.diagnose(model, labels=labels).head == head
    assert unihead.infer(model, labels=labels).head == head
    if head.task == "binary":  # two logits: the same head with two units
        two = torch.nn.Sequential(torch.nn.Linear(8, 2))
        assert unihead.diagnose(two, labels=labels).head == head.with_binary_units(2)


def test_the_models_structure_is_a_hint_to_the_same_rules():
    """What labels cannot tell, the layer can: its width (a batch need not show every class) and
    whether it scores exclusive classes.  read_labels takes both as hints."""
    from unihead.labels import describe_labels, read_labels

    torch = require("torch")
    nn = torch.nn
    ids = np.array([0, 1, 1, 0])
    assert H.from_labels(ids) == H.binary()
    assert unihead.diagnose(torch_net(out=5), nn.CrossEntropyLoss(), labels=ids).head == H.multiclass(5)
    assert read_labels(describe_labels(ids), outputs=5).head() == H.multiclass(5)
    one_hot = np.eye(3)[[0, 2, 1]]
    assert H.from_labels(one_hot) == H.multiclass(3, label_format="one_hot")
    assert unihead.diagnose(torch_net(out=3), nn.BCEWithLogitsLoss(), labels=one_hot).head == H.multilabel(3)
    assert read_labels(describe_labels(one_hot), exclusive=False).head() == H.multilabel(3)
    same = np.array([2, 2, 2])
    with pytest.raises(unihead.HeadSpecError, match="num_classes=K"):
        H.from_labels(same)
    assert read_labels(describe_labels(same)).num_classes is None
    assert unihead.diagnose(torch_net(out=4), nn.CrossEntropyLoss(), labels=same).head == H.multiclass(4)
    assert H.from_labels(same, num_classes=4) == H.multiclass(4)
