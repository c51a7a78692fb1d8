"""unihead.port, head files (unihead.save / unihead.load) and the 'diagnose' / 'port' commands."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead import HeadFileError, HeadSpecError, PortCheckError
from unihead._ulp import ulp_error
from unihead.cli import main

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]


def float32_logits(kernel, bias, x):
    """Logits of basis-vector features: an exact product plus one float32 rounding of the sum,
    the same in every IEEE framework."""
    return (x.astype(np.float64) @ kernel.astype(np.float64) + bias.astype(np.float64)).astype(np.float32)


def exact_p1(head, z):
    """Float64 probabilities of float32 logits (P(class 1) for a binary head): an expectation
    written here, independent of unihead (float64 errors are far below a float32 ulp)."""
    z = np.asarray(z, np.float64)
    if head.activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    e = np.exp(z - z.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return p[..., 1:] if head.task == "binary" else p


def ulp32(value, ref):
    """Float32 ulp of ``ref`` (the unit tests/test_ulp.py checks), below the smallest normal
    float32 nothing (the port check's allowance)."""
    return ulp_error(value, ref, "float32", floor=2.0**-126)


def basis_features(d, n=64, seed=3):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, d), np.float32)
    x[np.arange(n), rng.integers(0, d, n)] = rng.choice([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], n)
    return x


def keras_head_model(units, activation, loss, seed=0):
    keras = require("keras")
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(24, activation="relu"),
                              keras.layers.Dense(units, activation=activation)])
    model.compile(optimizer="adam", loss=loss)
    dense = model.layers[-1]  # "trained" weights with confident logits (|z| up to ~40)
    rng = np.random.default_rng(seed)
    dense.kernel.assign(rng.normal(0, 6, dense.kernel.shape).astype("float32"))
    dense.bias.assign(rng.normal(0, 2, dense.bias.shape).astype("float32"))
    return model


@pytest.mark.parametrize("units, activation, loss, head", [
    (5, "softmax", "sparse_categorical_crossentropy", H.multiclass(5)),
    (1, "sigmoid", "binary_crossentropy", H.binary()),
    (2, "softmax", "sparse_categorical_crossentropy", H.binary(binary_units=2)),
    (4, "sigmoid", "binary_crossentropy", H.multilabel(4)),
])
def test_keras_head_to_torch_to_jax_and_back_keeps_probabilities(units, activation, loss, head):
    require("torch"), require("jax")
    model = keras_head_model(units, activation, loss)
    kernel, bias = (np.asarray(v) for v in (model.layers[-1].kernel, model.layers[-1].bias))
    to_torch = unihead.port(model, to="torch")
    to_jax = unihead.port(to_torch.layer, to="jax")
    back = unihead.port((to_jax.head, to_jax.params), to="keras")
    assert to_torch.head == to_jax.head == back.head == head
    for p in (to_torch, to_jax, back):  # the function's own check
        assert p.check.passed and p.check.worst_ulp <= 4 and p.check.logits_identical, str(p.check)
    # weights travel bit for bit, in each framework's own layout
    np.testing.assert_array_equal(to_torch.layer.weight.detach().numpy(), kernel.T)
    np.testing.assert_array_equal(np.asarray(to_jax.params["kernel"]), kernel)
    np.testing.assert_array_equal(np.asarray(back.layer.kernel), kernel)
    # independent expectation: float64 probabilities from the original weights
    x = basis_features(24)
    z = float32_logits(kernel, bias, x)
    ref = exact_p1(head, z)
    import torch

    z_torch = to_torch.layer(torch.as_tensor(x))
    z_jax = to_jax.layer.apply(to_jax.params, x)
    z_keras = back.layer(x)
    for zz in (z_torch.detach(), z_jax, z_keras):
        np.testing.assert_array_equal(np.asarray(zz), z)
    p_torch = to_torch.compiled.probabilities(z_torch).detach().numpy()
    p_jax = np.asarray(to_jax.compiled.probabilities(z_jax))
    p_keras = np.asarray(back.compiled.probabilities(z_keras))
    for p in (p_torch, p_jax, p_keras):
        p = p[..., 1:] if head.task == "binary" and head.binary_units == 2 else p
        assert ulp32(p, ref) <= 4
    assert ulp32(p_torch, p_jax) <= 4 and ulp32(p_jax, p_keras) <= 4


def test_binary_heads_convert_between_one_and_two_units():
    rng = np.random.default_rng(7)
    w = {"kernel": rng.normal(0, 4, (6, 1)).astype(np.float32), "bias": np.array([1.5], np.float32)}
    two = unihead.port((H.binary(label_smoothing=0.1), w), to="numpy", binary_units=2)
    assert two.head == H.binary(binary_units=2, label_smoothing=0.1)
    np.testing.assert_array_equal(two.weights["kernel"], np.concatenate([np.zeros_like(w["kernel"]), w["kernel"]], 1))
    np.testing.assert_array_equal(two.weights["bias"], [0.0, 1.5])
    x = basis_features(6)
    one_c = unihead.compile(H.binary(label_smoothing=0.1), "numpy")
    z1 = x @ w["kernel"] + w["bias"]
    z2 = two.layer(x)
    np.testing.assert_array_equal(z2[:, 1:], z1)  # exact: logit z <=> logits [0, z]
    assert ulp32(two.compiled.probabilities(z2)[:, 1], one_c.probabilities(z1)[:, 0]) <= 1
    y = (rng.random(len(x)) < 0.5).astype(np.int64)
    np.testing.assert_allclose(two.compiled.loss(z2, y), one_c.loss(z1, y), rtol=1e-6)
    # and back: w1 - w0 rounds once
    back = unihead.port(two.layer, to="numpy", binary_units=1)  # a unihead NumPy layer as the source
    np.testing.assert_array_equal(back.weights["kernel"], w["kernel"])
    assert back.check.passed and back.check.source_ulp <= 4


def test_port_refuses_a_head_with_errors():
    keras = require("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="softmax")])
    model.compile(optimizer="adam", loss="binary_crossentropy")
    with pytest.raises(HeadSpecError, match="softmax_one_unit"):
        unihead.port(model, to="numpy")


def test_port_reports_the_source_activation_and_dense_features():
    torch = require("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 6)
    with torch.no_grad():
        lin.weight.mul_(40)
    p = unihead.port(torch.nn.Sequential(lin), to="numpy", loss=torch.nn.CrossEntropyLoss())
    c = p.check
    assert c.passed and c.source == "torch" and c.target == "numpy"
    assert c.source_native_ulp is not None and c.dense_ulp >= 0 and c.exact_ulp <= 4
    assert "basis-vector" in str(c)


# ------------------------------------------------------------------------------ head files
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_head_file_round_trip_and_every_backend_takes_it(tmp_path, dtype):
    head = H.multiclass(3, label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5], ignore_index=-1)
    rng = np.random.default_rng(0)
    w = {"kernel": rng.normal(size=(5, 3)).astype(dtype), "bias": rng.normal(size=3).astype(dtype)}
    path = tmp_path / "head.safetensors"
    unihead.save(path, head, w)
    loaded = unihead.load(path)
    assert loaded.head == head
    for k in w:
        assert loaded.weights[k].dtype == dtype
        np.testing.assert_array_equal(loaded.weights[k], w[k])
    require("torch"), require("jax"), require("keras")
    x = np.ones((2, 5), np.float32)
    expected = x.astype(np.float64) @ w["kernel"].astype(np.float64) + w["bias"]
    import torch

    outs = {
        "numpy": unihead.compile(loaded.head, "numpy").layer(5, weights=loaded.weights)(x),
        "torch": unihead.compile(loaded.head, "torch").layer(5, weights=loaded.weights)(torch.as_tensor(x)).detach(),
        "keras": unihead.compile(loaded.head, "keras").layer(5, weights=loaded.weights)(x),
    }
    jl = unihead.compile(loaded.head, "jax").layer(5, weights=loaded.weights)
    outs["jax"] = jl.apply(jl.init(None), x)
    for name, z in outs.items():
        np.testing.assert_allclose(np.asarray(z, np.float64), expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_head_files_are_plain_safetensors(tmp_path):
    st = require("safetensors.numpy")
    head = H.binary(pos_weight=2.0)
    w = {"kernel": np.arange(4, dtype=np.float32).reshape(4, 1), "bias": np.array([0.5], np.float32)}
    unihead.save(tmp_path / "a.safetensors", head, w)
    read = st.load_file(str(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(read["kernel"], w["kernel"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "np") as f:
        assert H.from_json(f.metadata()["spec"]) == head
    # a file written by the safetensors package with unihead metadata loads
    meta = {"format": "unihead.head", "format_version": "1", "spec": head.to_json()}
    st.save_file(w, str(tmp_path / "b.safetensors"), metadata=meta)
    assert unihead.load(tmp_path / "b.safetensors").head == head


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_bad_head_files_are_refused_with_a_clear_error(tmp_path):
    head = H.multiclass(3)
    good = {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}
    data = good["kernel"].tobytes() + good["bias"].tobytes()
    tensors = {"kernel": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
               "bias": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}
    meta = {"format": "unihead.head", "format_version": "1", "spec": head.to_json()}
    cases = {
        "no metadata": ({**tensors}, data, "no unihead metadata"),
        "malformed spec": ({"__metadata__": {**meta, "spec": "{not json"}, **tensors}, data, "spec .* not valid"),
        "spec of another width": ({"__metadata__": {**meta, "spec": H.multiclass(4).to_json()}, **tensors}, data,
                                  "do not match the spec"),
        "offsets past the end": ({"__metadata__": meta, **tensors}, data[:30], "offsets"),
        "missing bias": ({"__metadata__": meta, "kernel": tensors["kernel"]}, data, "no tensor 'bias'"),
        "integer dtype": ({"__metadata__": meta, **tensors, "bias": {**tensors["bias"], "dtype": "I32"}}, data,
                          "dtype 'I32'"),
        "newer format": ({"__metadata__": {**meta, "format_version": "9"}, **tensors}, data, "Upgrade unihead"),
    }
    for name, (header, payload, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _write_raw(path, header, payload)
        with pytest.raises(HeadFileError, match=match):
            unihead.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(HeadFileError, match="not a safetensors file"):
        unihead.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"kernel must have shape \(in_features, 3\)"):
        unihead.save(tmp_path / "x.safetensors", head, {"kernel": np.zeros((2, 4)), "bias": np.zeros(3)})


# ------------------------------------------------------------------------------ a failed check
BASIS_SCALES = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)


def every_basis_feature(d):
    """Every feature the check uses when 6 * d <= 512: s * e_i for each i and scale s, and x = 0."""
    x = np.zeros((6 * d + 1, d), np.float32)
    for i in range(d):
        for j, s in enumerate(BASIS_SCALES):
            x[6 * i + j, i] = s
    return x


def corrupt_one_weight(monkeypatch, row=2, col=1, factor=1.001):
    """Change one kernel entry of the ported layer between reading the source and checking it."""
    from unihead import _port

    real = _port._convert_units

    def corrupted(head, weights, units):
        head, weights = real(head, weights, units)
        weights = {k: v.copy() for k, v in weights.items()}
        weights["kernel"][row, col] = weights["kernel"][row, col] * np.float32(factor)
        return head, weights

    monkeypatch.setattr(_port, "_convert_units", corrupted)


def test_a_failed_port_check_raises_port_check_error_with_the_figures(monkeypatch):
    torch = require("torch")
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    kernel, bias = lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy()
    corrupt_one_weight(monkeypatch)
    with pytest.raises(PortCheckError) as info:
        unihead.port(lin, to="numpy", loss=torch.nn.CrossEntropyLoss())
    err, c = info.value, info.value.check
    assert isinstance(err, ValueError) and not isinstance(err, AssertionError)
    # independent expectation: float64 probabilities of the float32 logits, source vs corrupted weights
    bad = kernel.copy()
    bad[2, 1] = bad[2, 1] * np.float32(1.001)
    x = every_basis_feature(6)
    head = H.multiclass(4)
    p_src, p_bad = exact_p1(head, float32_logits(kernel, bias, x)), exact_p1(head, float32_logits(bad, bias, x))
    expected_ulp = ulp_error(p_bad, p_src, "float32")
    assert expected_ulp > 100  # a real mismatch, far beyond the tolerance
    # both sides' float32 probabilities are within 4 ulp of the float64 ones
    assert abs(c.worst_ulp - expected_ulp) <= 8, (c.worst_ulp, expected_ulp)
    assert 0 < c.worst_abs <= np.max(np.abs(p_bad - p_src)) * 1.01
    assert c.n_features == len(x) and not c.passed and not c.logits_identical
    message = str(err)
    for words in ("port torch -> numpy failed its check", "probabilities", f"{c.worst_ulp:.4g} float32 ulp",
                  f"{c.worst_abs:.3g} absolute", "the tolerance is 4 ulp", "e_2:", "the torch source's",
                  "NOT bit-identical"):
        assert words in message, (words, message)


def test_the_cli_reports_a_failed_port_check(monkeypatch, tmp_path, capsys):
    torch = require("torch")
    torch.save(torch.nn.Linear(6, 4).state_dict(), tmp_path / "sd.pt")
    corrupt_one_weight(monkeypatch)
    code = main(["port", str(tmp_path / "sd.pt"), "--to", "torch", "--out", str(tmp_path / "h.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "PortCheckError: port torch -> torch failed its check" in err and "Traceback" not in err
    assert not (tmp_path / "h.safetensors").exists()


# ------------------------------------------------------------------------------ command line: the snippets run
def snippet_of(stdout):
    """The Python 'unihead port --to' printed (everything after its intro line)."""
    m = re.search(r"^(Load it in \w+:|Port it in Python \(.*\):)\n\n", stdout, re.M)
    assert m, stdout
    return stdout[m.end():]


def run_snippet(code):
    """Run the printed code as it is, in a namespace of its own; return what it defined."""
    namespace: dict = {}
    exec(compile(code, "<printed by unihead port>", "exec"), namespace)
    return namespace


def logits_in(to, ns, x):
    layer = ns["layer"]
    if to == "torch":
        import torch

        return layer(torch.as_tensor(x)).detach().numpy()
    if to == "jax":
        return np.asarray(layer.apply(ns["params"], x))
    if to == "keras":
        return np.asarray(require("keras").ops.convert_to_numpy(layer(x)))
    return np.asarray(layer(x))


def keras_source(tmp_path):
    model = keras_head_model(4, None, require("keras").losses.SparseCategoricalCrossentropy(from_logits=True))
    model.save(tmp_path / "m.keras")
    dense = model.layers[-1]
    return "m.keras", np.asarray(dense.kernel), np.asarray(dense.bias)


def torch_source(tmp_path, name, out, tail=(), whole=False, checkpoint=False):
    torch = require("torch")
    torch.manual_seed(1)
    lin = torch.nn.Linear(24, out)
    with torch.no_grad():
        lin.weight.mul_(30)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), lin, *tail)
    if whole:
        torch.save(model, tmp_path / name)
    elif checkpoint:
        torch.save({"epoch": 7, "state_dict": model.state_dict()}, tmp_path / name)
    else:
        torch.save(model.state_dict(), tmp_path / name)
    return name, lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy()


def unihead_layer_source(tmp_path, head):
    torch = require("torch")
    rng = np.random.default_rng(4)
    w = {"kernel": rng.normal(0, 5, (24, head.num_outputs)).astype(np.float32),
         "bias": rng.normal(0, 1, head.num_outputs).astype(np.float32)}
    layer = unihead.compile(head, "torch").layer(24, weights=w)
    torch.save(torch.nn.Sequential(torch.nn.Linear(12, 24), layer).state_dict(), tmp_path / "uni.pt")
    return "uni.pt", w["kernel"], w["bias"]


def head_file_source(tmp_path, head):
    rng = np.random.default_rng(5)
    w = {"kernel": rng.normal(0, 5, (24, head.num_outputs)).astype(np.float32),
         "bias": rng.normal(0, 1, head.num_outputs).astype(np.float32)}
    unihead.save(tmp_path / "given.safetensors", head, w)
    return "given.safetensors", w["kernel"], w["bias"]


def two_units(kernel, bias):
    return np.concatenate([np.zeros_like(kernel), kernel], 1), np.concatenate([np.zeros_like(bias), bias])


def _nn():
    return require("torch").nn


SNIPPET_CASES = {  # name: (make the source, extra arguments, target, expected head, to 2 units)
    "keras file -> torch, ported in Python": (keras_source, [], "torch", H.multiclass(4), False),
    "keras file -> jax, head file": (keras_source, ["--out", "h.safetensors"], "jax", H.multiclass(4), False),
    "state_dict + log_softmax + NLLLoss(weight=) -> keras": (
        lambda t: torch_source(t, "sd.pt", 3), ["--activation", "log_softmax", "--loss",
                                                 "nn.NLLLoss(weight=torch.tensor([1.0, 2.0, 0.5]))"],
        "keras", H.multiclass(3, class_weights=(1.0, 2.0, 0.5)), False),
    "module saved whole -> numpy": (
        lambda t: torch_source(t, "whole.pt", 5, tail=(_nn().Softmax(-1),), whole=True),
        ["--trust-pickle"], "numpy", H.multiclass(5), False),
    "binary state_dict to 2 units -> torch": (
        lambda t: torch_source(t, "bin.pt", 1), ["--loss", "nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))",
                                                  "--binary-units", "2"],
        "torch", H.binary(binary_units=2, pos_weight=2.0), True),
    "checkpoint -> numpy, head file": (
        lambda t: torch_source(t, "ckpt.pt", 4, checkpoint=True),
        ["--loss", "BCEWithLogitsLoss", "--out", "ml.safetensors"], "numpy", H.multilabel(4), False),
    "unihead layer's state_dict -> jax": (
        lambda t: unihead_layer_source(t, H.multiclass(3, label_smoothing=0.05)), [], "jax",
        H.multiclass(3, label_smoothing=0.05), False),
    "state_dict + CrossEntropyLoss(label_smoothing=) -> flax, ported in Python": (
        lambda t: torch_source(t, "sd.pt", 3), ["--loss", "nn.CrossEntropyLoss(label_smoothing=0.1)"],
        "flax", H.multiclass(3, label_smoothing=0.1), False),
    "keras file -> flax, head file": (keras_source, ["--out", "h.safetensors"], "flax", H.multiclass(4), False),
    "head file -> torch": (
        lambda t: head_file_source(t, H.multilabel(3, pos_weight=(1.0, 2.0, 3.0))), [], "torch",
        H.multilabel(3, pos_weight=(1.0, 2.0, 3.0)), False),
}


@pytest.mark.parametrize("name", list(SNIPPET_CASES))
def test_the_snippet_port_prints_runs_and_gives_the_ported_layer(name, tmp_path, monkeypatch, capsys):
    """Every snippet is run as printed (relative paths, from the directory the command ran in) and
    must give the head with the source's weights: bit-identical logits and probabilities within 4
    ulp of float64 ones computed here from the source's weights."""
    make, extra, to, head, to_two = SNIPPET_CASES[name]
    if to != "numpy":
        require(to)
    monkeypatch.chdir(tmp_path)
    path, kernel, bias = make(tmp_path)
    files = sorted(tmp_path.iterdir())
    code = main(["port", path, "--to", to, *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    snippet = snippet_of(out.out)
    if "--out" in extra or path.endswith(".safetensors"):  # load the head file
        assert "unihead.load(" in snippet and "unihead.port(" not in snippet
    else:  # nothing written: port from the model file
        assert "unihead.port(" in snippet and "unihead.load(" not in snippet
        assert sorted(tmp_path.iterdir()) == files
    ns = run_snippet(snippet)
    assert ns["compiled"].head == head
    if to_two:
        kernel, bias = two_units(kernel, bias)
    x = basis_features(kernel.shape[0])
    z = logits_in(to, ns, x)
    np.testing.assert_array_equal(z, float32_logits(kernel, bias, x))
    p = np.asarray(require("keras").ops.convert_to_numpy(ns["compiled"].probabilities(z)) if to == "keras"
                   else ns["compiled"].probabilities(z))
    p = p[..., 1:] if head.task == "binary" and head.binary_units == 2 else p
    assert ulp32(p, exact_p1(head, z)) <= 4
    if to == "flax":  # an nnx module
        assert type(ns["layer"]).__name__ == "HeadLinear" and isinstance(ns["layer"], require("flax.nnx").Linear)
    if to == "torch":  # the criterion line runs too
        assert type(ns["criterion"]).__name__ == "HeadLoss" and ns["criterion"].head == head


def cli(*args, cwd=None):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "unihead", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


@pytest.mark.slow
def test_cli_diagnose_and_port(tmp_path):
    """The installed command end to end, in fresh processes; the printed snippet in another one."""
    keras = require("keras")
    require("torch")
    bad = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="sigmoid")])
    bad.compile(optimizer="adam", loss="categorical_crossentropy")
    bad.save(tmp_path / "seed003.keras")
    good = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    good.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    good.save(tmp_path / "good.keras")
    np.save(tmp_path / "y.npy", np.array([0, 3, 1, 2]))
    np.save(tmp_path / "y5.npy", np.array([0, 4, 1, 2]))

    out = cli("diagnose", str(tmp_path / "seed003.keras"))
    assert out.returncode == 1 and "sigmoid_categorical_loss" in out.stdout, out.stderr[-2000:]
    out = cli("diagnose", str(tmp_path / "good.keras"), "--labels", str(tmp_path / "y.npy"))
    assert out.returncode == 0 and ": OK" in out.stdout and "multiclass(4)" in out.stdout, out.stderr[-2000:]
    assert "NOT CHECKED" not in out.stdout  # the loss is in the file
    out = cli("diagnose", str(tmp_path / "good.keras"), "--labels", str(tmp_path / "y5.npy"))
    assert out.returncode == 1 and "width_mismatch" in out.stdout

    head_file = tmp_path / "head.safetensors"
    out = cli("port", str(tmp_path / "good.keras"), "--out", str(head_file))
    assert out.returncode == 0 and head_file.exists(), out.stderr[-2000:]
    assert unihead.load(head_file).head == H.multiclass(4)
    np.testing.assert_array_equal(unihead.load(head_file).weights["kernel"], np.asarray(good.layers[-1].kernel))
    out = cli("port", "head.safetensors", "--to", "torch", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "port numpy -> torch" in out.stdout and 'unihead.load("head.safetensors")' in out.stdout
    assert "compiled.layer(6, weights=weights)" in out.stdout
    # without --out: nothing is written, and the printed Python ports from the model file
    out = cli("port", "good.keras", "--to", "torch", cwd=tmp_path)
    assert out.returncode == 0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "good.keras", "head.safetensors", "seed003.keras", "y.npy", "y5.npy"], out.stderr[-2000:]
    snippet = snippet_of(out.stdout)
    assert 'keras.saving.load_model("good.keras")' in snippet and 'unihead.port(model, to="torch")' in snippet
    code = "import torch\n" + snippet + "\nprint(tuple(layer.weight.shape), tuple(compiled.probabilities(layer(torch.ones(2, 6))).shape))\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 0 and run.stdout.strip() == "(4, 6) (2, 4)", run.stderr[-2000:]

    out = cli("port", str(tmp_path / "seed003.keras"), "--out", str(tmp_path / "no.safetensors"))
    assert out.returncode == 1 and "sigmoid_categorical_loss" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "no.safetensors").exists()
