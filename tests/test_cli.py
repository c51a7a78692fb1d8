"""The command line, and the README's promises about it.

``unihead diagnose`` / ``unihead port`` read files a user was given: nothing in ``--loss`` or in
a model file may run as code unless the user says so (``--trust-pickle``), and what a file
cannot say (a PyTorch file has no criterion, a state_dict no activation) is said in the output.
The snippets ``unihead port`` prints are run in tests/test_port.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead._cli_heads import LossText, UsageError, parse_loss
from unihead.cli import main

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"unihead {unihead.__version__}"
    assert main([]) == 0
    assert "usage: unihead" in capsys.readouterr().out


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) == 2, "the README gives exactly two commands"
    main, timm = blocks[1].strip().splitlines()
    assert main.endswith("&& pytest")
    # timm's own environment runs the tests the main run leaves out (-m 'not timm' in pyproject.toml)
    assert ".venv-timm" in timm and " -m timm " in timm and "tests/test_timm.py" in timm
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert main in ci and timm in ci and ci.index(main) < ci.index(timm)


def run(capsys, *argv):
    """``unihead ARGV`` in this process: (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------ --loss is parsed, not run
def torch_files(tmp_path, out=3, softmax=True):
    """A PyTorch model saved whole and as a state_dict."""
    torch = require("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, out), *([torch.nn.Softmax(dim=-1)] if softmax else []))
    torch.save(model, tmp_path / "whole.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    return model


ACCEPTED_TORCH = [
    ("CrossEntropyLoss", "CrossEntropyLoss", {}),
    ("nn.CrossEntropyLoss", "CrossEntropyLoss", {}),
    ("torch.nn.CrossEntropyLoss(label_smoothing=0.1)", "CrossEntropyLoss", {"label_smoothing": 0.1}),
    ("nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=-1, reduction='sum')",
     "CrossEntropyLoss", {"weight": [1.0, 2.0, 0.5], "ignore_index": -1, "reduction": "sum"}),
    ("nn.CrossEntropyLoss(torch.tensor([1.0, 2.0]))", "CrossEntropyLoss", {"weight": [1.0, 2.0]}),
    ("nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))", "BCEWithLogitsLoss", {"pos_weight": [2.0]}),
    ("nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.5))", "BCEWithLogitsLoss", {"pos_weight": 2.5}),
    ("nn.NLLLoss(ignore_index=+3)", "NLLLoss", {"ignore_index": 3}),
    (" nn.BCELoss( ) ", "BCELoss", {}),
]


@pytest.mark.parametrize("text, cls, attrs", ACCEPTED_TORCH)
def test_every_legitimate_torch_loss_form_is_accepted(text, cls, attrs):
    torch = require("torch")
    parsed = parse_loss(text, "torch")
    loss = parsed.build()
    assert type(loss) is getattr(torch.nn, cls)
    for name, value in attrs.items():
        got = getattr(loss, name)
        if torch.is_tensor(got):
            np.testing.assert_array_equal(got.numpy(), np.asarray(value, np.float32))
        else:
            assert got == value
    # the code the port snippets print is the same loss, and parses back to itself
    assert parsed.code().startswith(f"torch.nn.{cls}(")
    assert parse_loss(parsed.code(), "torch") == parsed


ACCEPTED_KERAS = [
    ("binary_crossentropy", "binary_crossentropy", None),
    ("'categorical_crossentropy'", "categorical_crossentropy", None),
    ('"sparse_categorical_crossentropy"', "sparse_categorical_crossentropy", None),
    ("keras.losses.binary_crossentropy", "binary_crossentropy", None),
    ("SparseCategoricalCrossentropy", "SparseCategoricalCrossentropy", {"from_logits": False}),
    ("'CategoricalCrossentropy'", "CategoricalCrossentropy", {"from_logits": False}),
    ("keras.losses.SparseCategoricalCrossentropy(from_logits=True)", "SparseCategoricalCrossentropy",
     {"from_logits": True}),
    ("tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)", "CategoricalCrossentropy",
     {"from_logits": True, "label_smoothing": 0.1}),
    ("BinaryFocalCrossentropy(gamma=3.0, from_logits=True)", "BinaryFocalCrossentropy",
     {"gamma": 3.0, "from_logits": True}),
]


@pytest.mark.parametrize("text, name, config", ACCEPTED_KERAS)
def test_every_legitimate_keras_loss_form_is_accepted(text, name, config):
    parsed = parse_loss(text, "keras")
    assert parse_loss(parsed.code(), "keras") == parsed
    if config is None:
        assert parsed == LossText("keras", name, False) and parsed.build() == name
        return
    keras = require("keras")
    loss = parsed.build()
    assert type(loss) is getattr(keras.losses, name)
    cfg = loss.get_config()
    assert {k: cfg[k] for k in config} == config


HOSTILE = [  # (--loss, words the refusal must contain); "MARK" is a file the string would create
    ("__import__('os').system('touch MARK')", "a call to __import__"),
    ("().__class__.__bases__[0].__subclasses__()", "__subclasses__"),
    ("nn.CrossEntropyLoss(weight=open('MARK', 'w'))", "weight=open('MARK', 'w') is a call to open"),
    ("nn.CrossEntropyLoss.__init__.__globals__['os'].system('touch MARK')", "not a loss"),
    ("nn.CrossEntropyLoss(reduction=__import__('os').system('touch MARK'))", "a call to __import__"),
    ("nn.CrossEntropyLoss(reduction=f\"{__import__('os').system('touch MARK')}\")", "an f-string"),
    ("nn.CrossEntropyLoss(weight=torch.tensor([open('MARK', 'w')]))", "list elements must be numbers"),
    ("lambda: __import__('os').system('touch MARK')", "a lambda"),
    ("[__import__('os').system('touch MARK') for _ in 'x']", "a comprehension"),
    ("torch.load('whole.pt', weights_only=False)", "torch.load, which is not a loss"),
    ("getattr(nn, 'CrossEntropyLoss')()", "a call to getattr(nn, 'CrossEntropyLoss')"),
    ("nn.Module()", "nn.Module, which is not a loss"),
    ("nn.modules.loss.CrossEntropyLoss()", "not a loss unihead reads"),
    ("nn.CrossEntropyLoss(**{'weight': None})", "unpacks keywords"),
    ("nn.CrossEntropyLoss(reduction=nn.__name__)", "the name nn.__name__"),
    ("nn.CrossEntropyLoss(weight=torch.tensor([1.0] * 10**9))", "arithmetic"),
    ("nn.CrossEntropyLoss(ignore_index=" + "9" * 30 + ")", "out of range"),
    ("nn.CrossEntropyLoss(label_smoothing=1e999)", "out of range"),
    ("nn.CrossEntropyLoss(weight=torch.tensor([" + ", ".join(["1"] * 5000) + "]))", "5000 elements"),
    ("nn.CrossEntropyLoss(reduction='" + "m" * 500 + "')", "a string of 500 characters"),
    ("nn.CrossEntropyLoss(weight=torch.tensor([1.0]" + " " * 30000 + "))", "characters long"),
    ("nn.CrossEntropyLoss(weight=torch.tensor([1.0], device='cuda'))", "takes one list of numbers"),
    ("nn.CrossEntropyLoss(weight=(1.0, (2.0,)))", "list elements must be numbers"),
    ("nn.CrossEntropyLoss(weight=b'x')", "a bytes literal"),
    ("keras.losses.CategoricalCrossentropy()", "is a Keras loss"),
    ("binary_crossentropy", "is a Keras loss"),
    ("nn.CrossEntropyLoss(", "not a Python expression"),
    ("breakpoint()", "breakpoint, which is not a loss"),
]


_AUDIT: dict = {"on": False, "events": [], "installed": False}
_WATCHED = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "builtins.breakpoint", "pickle.find_class", "os.remove")


def _audit(event, args):
    if _AUDIT["on"] and (event in _WATCHED or event == "open" and "MARK" in str(args[0])):
        _AUDIT["events"].append((event, args))


@pytest.fixture
def audit_events():
    """The security-relevant audit events (sys.addaudithook) raised while the test records."""
    if not _AUDIT["installed"]:
        sys.addaudithook(_audit)  # one hook for the session (hooks cannot be removed): it records only when on
        _AUDIT["installed"] = True
    _AUDIT["events"] = []
    yield _AUDIT
    _AUDIT["on"] = False


@pytest.mark.parametrize("text, words", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_loss_is_refused_and_nothing_runs(tmp_path, monkeypatch, capsys, audit_events, text, words):
    torch_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    audit_events["on"] = True
    code, out, err = run(capsys, "diagnose", "sd.pt", "--loss", text)
    code2, _, err2 = run(capsys, "port", "sd.pt", "--to", "numpy", "--loss", text)
    audit_events["on"] = False
    assert code == code2 == 2 and out == ""
    assert "is refused" in err and words in err, err
    assert "--loss takes a PyTorch criterion" in err and "nn.BCEWithLogitsLoss" in err  # what is accepted
    assert err2.replace("unihead port", "unihead diagnose") == err
    assert audit_events["events"] == [], audit_events["events"]
    assert not any(p.name.startswith("MARK") for p in tmp_path.iterdir())


def test_the_loss_is_refused_before_any_file_is_read(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # neither file exists: the refusal comes first
    code, _, err = run(capsys, "diagnose", "model.keras", "--loss", "__import__('os').system('touch MARK')")
    assert code == 2 and "is refused" in err and "--loss takes a Keras loss" in err
    assert "categorical_crossentropy" in err and "SparseCategoricalCrossentropy" in err
    code, _, err = run(capsys, "diagnose", "model.keras", "--loss", "nn.CrossEntropyLoss()")
    assert code == 2 and "nn.CrossEntropyLoss is a PyTorch loss, and this model is a Keras one" in err
    code, _, err = run(capsys, "diagnose", "model.keras", "--loss", "mse")
    assert code == 2 and "mse, which is not a loss unihead reads" in err
    code, _, err = run(capsys, "diagnose", "model.keras", "--loss", "binary_crossentropy()")
    assert code == 2 and "is a function" in err
    assert list(tmp_path.iterdir()) == []


def test_arguments_the_loss_does_not_take_are_explained(tmp_path, capsys):
    torch_files(tmp_path)
    code, _, err = run(capsys, "diagnose", tmp_path / "sd.pt", "--loss", "nn.CrossEntropyLoss(wieght=None)")
    assert code == 2 and "wieght" in err and "CrossEntropyLoss takes: weight," in err
    code, _, err = run(capsys, "diagnose", tmp_path / "sd.pt", "--loss", "nn.BCEWithLogitsLoss(pos_weight=2.0)")
    assert code == 2 and "BCEWithLogitsLoss refused its arguments" in err and "torch.tensor([...])" in err
    with pytest.raises(UsageError, match="takes: from_logits"):
        parse_loss("BinaryCrossentropy(logits=True)", "keras").build()


# ------------------------------------------------------------------------------ pickles need --trust-pickle
class _RunsCode:
    """A pickle that calls os.system when it is loaded: what a hostile .pt file looks like."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_whole_module_is_not_unpickled_without_trust_pickle(tmp_path, capsys):
    torch = require("torch")
    torch_files(tmp_path)
    for argv in (["diagnose", tmp_path / "whole.pt"], ["port", tmp_path / "whole.pt", "--to", "torch"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == ""
        assert "is a PyTorch module saved whole (torch.save(model))" in err, err
        assert "torch.nn.modules.container.Sequential" in err  # what the pickle would import
        assert "unpickling runs whatever code the file names" in err and "--trust-pickle" in err
        assert "a state_dict (torch.save(model.state_dict(), path))" in err and "head file" in err
    # a hostile file is not run (and its payload is named)
    marker = tmp_path / "RAN"
    torch.save({"weight": torch.zeros(2, 2), "payload": _RunsCode(marker)}, tmp_path / "hostile.pt")
    code, _, err = run(capsys, "diagnose", tmp_path / "hostile.pt")
    assert code == 2 and "system" in err and "--trust-pickle" in err and not marker.exists()
    code, _, err = run(capsys, "port", tmp_path / "hostile.pt", "--out", tmp_path / "h.safetensors")
    assert code == 2 and not marker.exists() and not (tmp_path / "h.safetensors").exists()
    # the flag's help says why
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--trust-pickle" in help_text and "unpickling runs whatever code the file names" in help_text
    assert "only for files you trust" in help_text


def test_diagnose_of_a_whole_module_without_loss_says_what_was_not_checked(tmp_path, capsys):
    torch_files(tmp_path)
    code, out, err = run(capsys, "diagnose", tmp_path / "whole.pt", "--trust-pickle")
    assert code == 0, err
    # what the structure alone shows: a softmax output, which PyTorch's categorical criteria do not take
    assert "nn.Linear(5, 3) + nn.Softmax() (no loss given): OK as far as checked (the loss was not), 1 warning" in out
    assert "WARNING [probabilities_output]" in out and "nn.Linear(5, 3)  # logits, no activation" in out
    # what could not be checked, and how to check it
    assert "NOT CHECKED: the loss. A PyTorch file holds no criterion" in out
    assert "what nn.Linear(5, 3) + nn.Softmax() outputs (probabilities)" in out
    command = re.search(r"to check them: (.*)", out).group(1)
    assert command == f"unihead diagnose {tmp_path / 'whole.pt'} --trust-pickle --loss 'nn.CrossEntropyLoss()'"
    # the command it gives runs, and finds the loss-dependent error
    code, out, _ = run(capsys, *command.split()[1:-2], "--loss", "nn.CrossEntropyLoss()")
    assert code == 1 and "ERROR [double_activation]" in out and "NOT CHECKED" not in out
    # the same finding through the Python API
    d = unihead.diagnose(torch_files(tmp_path))
    assert d.ok and d.codes == ("probabilities_output", "loss_not_checked")


def test_diagnose_of_a_state_dict(tmp_path, capsys):
    torch = require("torch")
    model = torch_files(tmp_path)
    code, out, err = run(capsys, "diagnose", tmp_path / "sd.pt")  # no flag needed
    assert code == 0, err
    assert "read: 0.weight (3, 5) and 0.bias, the last linear layer of the state_dict" in out
    assert "assumed: nothing follows that layer, it outputs logits" in out and "--activation" in out
    assert "NOT CHECKED: the loss" in out and "--trust-pickle" not in out
    code, out, _ = run(capsys, "diagnose", tmp_path / "sd.pt", "--activation", "softmax",
                       "--loss", "nn.CrossEntropyLoss(label_smoothing=0.1)")
    assert code == 1 and "ERROR [double_activation] nn.Linear(5, 3) + nn.Softmax()" in out
    assert "head: ClassificationHead.multiclass(3, label_smoothing=0.1)" in out and "NOT CHECKED" not in out
    code, out, _ = run(capsys, "diagnose", tmp_path / "sd.pt", "--activation", "softmax")
    assert "1 warning" in out and "WARNING [probabilities_output]" in out
    # a checkpoint holding a state_dict, and a unihead layer's state_dict (its spec travels in it)
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    code, out, _ = run(capsys, "diagnose", tmp_path / "ckpt.pt", "--loss", "nn.CrossEntropyLoss()")
    assert code == 0 and "under 'state_dict'" in out and "head: ClassificationHead.multiclass(3)" in out
    head = H.multiclass(4, label_smoothing=0.2, ignore_index=-1)
    layer = unihead.compile(head, "torch").layer(6, weights={"kernel": np.ones((6, 4), np.float32),
                                                             "bias": np.zeros(4, np.float32)})
    torch.save(torch.nn.Sequential(torch.nn.ReLU(), layer).state_dict(), tmp_path / "uni.pt")
    code, out, _ = run(capsys, "diagnose", tmp_path / "uni.pt")
    assert code == 0 and f"head: {head!r}" in out and "NOT CHECKED" not in out
    # a spec that does not fit its weights, a spec that is not one
    torch.save({"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3), "fc._extra_state": head.to_json()},
               tmp_path / "misfit.pt")
    code, _, err = run(capsys, "diagnose", tmp_path / "misfit.pt")
    assert code == 2 and "the weights of fc do not load into HeadLinear(5, ...)" in err and "size mismatch" in err
    torch.save({"fc.weight": torch.zeros(3, 5), "fc.bias": torch.zeros(3), "fc._extra_state": "{nope"},
               tmp_path / "nospec.pt")
    code, _, err = run(capsys, "diagnose", tmp_path / "nospec.pt")
    assert code == 2 and "fc._extra_state is not a valid unihead spec" in err
    # files with nothing to read
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    code, _, err = run(capsys, "diagnose", tmp_path / "empty.pt")
    assert code == 2 and "no layer weights" in err and "'epoch'" in err
    torch.save({"0.weight": torch.zeros(3, 5, 2, 2)}, tmp_path / "conv.pt")
    code, _, err = run(capsys, "diagnose", tmp_path / "conv.pt")
    assert code == 2 and "no layer weights" in err


def test_keras_file_without_a_loss_says_what_was_not_checked(tmp_path, capsys):
    keras = require("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "uncompiled.keras")
    code, out, err = run(capsys, "diagnose", tmp_path / "uncompiled.keras")
    assert code == 0, err
    assert "NOT CHECKED: the loss. The Keras file has no compiled loss" in out
    assert "--loss sparse_categorical_crossentropy" in out
    code, out, _ = run(capsys, "diagnose", tmp_path / "uncompiled.keras",
                       "--loss", "keras.losses.SparseCategoricalCrossentropy(from_logits=True)")
    assert code == 1 and "ERROR [double_activation]" in out and "NOT CHECKED" not in out
    code, _, err = run(capsys, "diagnose", tmp_path / "uncompiled.keras", "--activation", "softmax")
    assert code == 2 and "--activation is for PyTorch state_dicts" in err


def test_unreadable_input_gets_a_message_not_a_traceback(tmp_path, capsys):
    require("torch")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk" * 20)
    code, _, err = run(capsys, "diagnose", tmp_path / "junk.pt")
    assert code == 2 and "junk.pt" in err and "Traceback" not in err
    code, _, err = run(capsys, "diagnose", tmp_path / "missing.pt")
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, "diagnose", tmp_path / "model.onnx")
    assert code == 2 and "unknown file type '.onnx'" in err
    torch_files(tmp_path)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _, err = run(capsys, "diagnose", tmp_path / "sd.pt", "--labels", tmp_path / "objects.npy")
    assert code == 2 and "without unpickling" in err
    h = tmp_path / "h.safetensors"
    unihead.save(h, H.multiclass(3), {"kernel": np.zeros((5, 3), np.float32), "bias": np.zeros(3, np.float32)})
    code, _, err = run(capsys, "diagnose", h)
    assert code == 2 and "is a head file" in err
    code, _, err = run(capsys, "port", h, "--to", "numpy", "--loss", "nn.CrossEntropyLoss()")
    assert code == 2 and "--loss and --activation do not apply" in err
    code, _, err = run(capsys, "port", tmp_path / "sd.pt")
    assert code == 2 and "give --to FRAMEWORK, --out HEAD.safetensors, or both" in err
