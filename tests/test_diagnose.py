"""unihead.diagnose / unihead.infer / ClassificationHead.from_labels.

Every question in tests/data/questions is a test here: the model it describes is built (small
input shape), diagnosed, and the finding must name the question's actual problem; its correct
answers must give no finding.  The PyTorch twins of the same mistakes follow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead import HeadSpecError

from .conftest import require

# The user questions, described in the project's own words (see the README there).
QUESTIONS = Path(__file__).resolve().parent / "data" / "questions"


# ------------------------------------------------------------------------------ Keras: the questions
def keras_model(*head_layers, loss=None, in_features=8):
    keras = require("keras")
    model = keras.Sequential([keras.Input((in_features,)), keras.layers.Dense(16, activation="relu"), *head_layers])
    if loss is not None:
        model.compile(optimizer="adam", loss=loss)
    return model


def Dense(*a, **k):
    return require("keras").layers.Dense(*a, **k)


def seed_text(prefix: str) -> str:
    """The description of question ``prefix``: the test also checks that the model it builds is the
    one the question describes."""
    files = sorted(QUESTIONS.glob(f"{prefix}_*.md"))
    assert len(files) == 1, f"question {prefix}: expected one file {prefix}_*.md in {QUESTIONS}, found {files}"
    return files[0].read_text()


def squash(text: str) -> str:
    return "".join(text.split()).replace('"', "'")


# (question, the fragments of its description the model reproduces, builder, labels, expected error codes)
SEED_MISTAKES = {
    "000 Dense(1, softmax)": (
        "000", ["Dense(1, activation='softmax')", "loss='binary_crossentropy'", "labels 0/1"],
        lambda: keras_model(Dense(1, activation="softmax"), loss="binary_crossentropy"),
        np.array([0, 1, 1, 0]), {"softmax_one_unit"}),
    "001 sigmoid + binary_crossentropy on 4 classes": (
        "001", ["keras.layers.Dense(1), keras.layers.Activation('sigmoid')", "loss='binary_crossentropy'",
                "labels are the class ids 0, 1, 2, 3"],
        lambda: keras_model(Dense(1), require("keras").layers.Activation("sigmoid"), loss="binary_crossentropy"),
        np.array([0, 1, 2, 3, 2, 1, 0, 3]), {"bce_multiclass_labels"}),
    "002 categorical_crossentropy with integer labels": (
        "002", ["Dense(units=2, activation='softmax')", "loss='categorical_crossentropy'",
                "the integer labels 0/1", "the labels have to be one-hot, shape (N, 2)"],
        lambda: keras_model(Dense(2, activation="softmax"), loss="categorical_crossentropy"),
        np.array([0, 1, 1, 0]), {"ids_with_categorical_loss"}),
    "003 three sigmoids + categorical_crossentropy": (
        "003", ["Dense(3, activation='sigmoid')", "loss='categorical_crossentropy'", "one-hot labels"],
        lambda: keras_model(Dense(3, activation="sigmoid"), loss="categorical_crossentropy"),
        np.eye(3)[[0, 1, 2, 1, 0]], {"sigmoid_categorical_loss"}),
    "004 softmax + from_logits=True": (
        "004", ["activation='softmax'", "CategoricalCrossentropy(from_logits=True)", "one-hot labels"],
        lambda: keras_model(Dense(2, activation="softmax"),
                            loss=require("keras").losses.CategoricalCrossentropy(from_logits=True)),
        np.eye(2)[[0, 1, 1, 0]], {"double_activation"}),
}


@pytest.mark.parametrize("name", list(SEED_MISTAKES))
def test_each_seed_mistake_is_diagnosed(name):
    seed, quotes, build, labels, codes = SEED_MISTAKES[name]
    text = squash(seed_text(seed))
    for q in quotes:
        assert squash(q) in text, f"seed {seed} does not show {q!r}: the test does not model it"
    d = unihead.diagnose(build(), labels=labels)
    assert not d.ok
    assert {f.code for f in d.errors} == codes, str(d)
    f = d.errors[0]
    assert f.fix is not None and f.why and "keras" in f.lines and "unihead" in f.lines
    # the fix is correct by construction: diagnosing it finds nothing
    assert "from_logits=True" in f.lines["keras"]


def test_seed_fixes_name_the_right_head():
    d = unihead.diagnose(SEED_MISTAKES["001 sigmoid + binary_crossentropy on 4 classes"][2](),
                         labels=np.array([0, 1, 2, 3]))
    assert d.head == H.multiclass(4) and d.errors[0].fix == H.multiclass(4)
    assert "Dense(4)" in d.errors[0].lines["keras"] and "SparseCategoricalCrossentropy(from_logits=True)" in \
        d.errors[0].lines["keras"]
    d = unihead.diagnose(SEED_MISTAKES["000 Dense(1, softmax)"][2]())
    assert d.head == H.binary() and "output is always 1.0" not in str(d) and "always outputs 1.0" in str(d)
    d = unihead.diagnose(SEED_MISTAKES["003 three sigmoids + categorical_crossentropy"][2]())
    assert d.head == H.multiclass(3, label_format="one_hot") and "rows of 1.0" in d.errors[0].why
    # three sigmoids whose labels really are multi-hot: the fix is a multilabel head
    d = unihead.diagnose(SEED_MISTAKES["003 three sigmoids + categorical_crossentropy"][2](),
                         labels=np.array([[1, 1, 0], [0, 1, 1]]))
    assert d.head == H.multilabel(3) and "sigmoid_categorical_loss" in d.codes


SEED_CORRECT = {
    # 000's answer: two softmax units, one-hot labels, categorical cross-entropy
    "000 answer": ("000", lambda: keras_model(Dense(2, activation="softmax"), loss="categorical_crossentropy"),
                   np.eye(2)[[0, 1, 1, 0]], H.multiclass(2, label_format="one_hot")),
    # 001's answer: softmax over 4 units with sparse labels
    "001 answer": ("001", lambda: keras_model(Dense(4, activation="softmax"), loss="sparse_categorical_crossentropy"),
                   np.array([0, 1, 2, 3]), H.multiclass(4)),
    # 002's two correct variants: Dense(1, sigmoid) + binary; Dense(2, softmax) + categorical, one-hot
    "002 sigmoid": ("002", lambda: keras_model(Dense(1, activation="sigmoid"), loss="binary_crossentropy"),
                    np.array([0, 1, 1, 0]), H.binary()),
    "002 softmax": ("002", lambda: keras_model(Dense(2, activation="softmax"), loss="categorical_crossentropy"),
                    np.eye(2)[[0, 1, 1, 0]], H.multiclass(2, label_format="one_hot")),
    # 003's answer
    "003 answer": ("003", lambda: keras_model(Dense(3, activation="softmax"), loss="categorical_crossentropy"),
                   np.eye(3)[[0, 1, 2]], H.multiclass(3, label_format="one_hot")),
    # 004's answer: logits + from_logits=True
    "004 answer": ("004", lambda: keras_model(Dense(2), loss=require("keras").losses.CategoricalCrossentropy(
        from_logits=True)), np.eye(2)[[0, 1, 1, 0]], H.multiclass(2, label_format="one_hot")),
    "logits + sparse, ignore_class, smoothing": (
        None, lambda: keras_model(Dense(5), loss=require("keras").losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=-1)), np.array([0, 4, -1, 2]), H.multiclass(5, ignore_index=-1)),
    "multilabel": (None, lambda: keras_model(Dense(4, activation="sigmoid"), loss="binary_crossentropy"),
                   np.array([[1, 0, 1, 0], [0, 0, 0, 1]]), H.multilabel(4)),
}


SEED_CORRECT_QUOTES = {
    "000": ["keras.layers.Dense(2, activation='softmax')", "loss='categorical_crossentropy'", "one-hot labels"],
    "001": ["Dense(4, activation='softmax')", "loss='sparse_categorical_crossentropy'"],
    "002": ["Dense(units=1, activation='sigmoid')", "loss='binary_crossentropy'",
            "model.fit(x, keras.utils.to_categorical(y))"],
    "003": ["Dense(3, activation='softmax')", "loss='categorical_crossentropy'"],
    "004": ["Dense(2)", "CategoricalCrossentropy(from_logits=True)"],
}


def test_every_question_is_built_wrong_and_right():
    """No description in tests/data/questions goes untested: each one's mistake and its answer."""
    numbers = {p.name.split("_")[0] for p in QUESTIONS.glob("*_*.md")}
    assert {seed for seed, *_ in SEED_MISTAKES.values()} == numbers
    assert {seed for seed, *_ in SEED_CORRECT.values() if seed is not None} == numbers
    assert set(SEED_CORRECT_QUOTES) == numbers


@pytest.mark.parametrize("name", list(SEED_CORRECT))
@pytest.mark.parametrize("with_labels", [True, False])
def test_correct_heads_raise_nothing(name, with_labels):
    seed, build, labels, head = SEED_CORRECT[name]
    if seed in SEED_CORRECT_QUOTES:
        text = squash(seed_text(seed))
        assert all(squash(q) in text for q in SEED_CORRECT_QUOTES[seed])
    d = unihead.diagnose(build(), labels=labels if with_labels else None)
    assert d.findings == (), str(d)
    assert d.ok and "OK" in str(d)
    if with_labels or head.task != "multiclass" or head.num_classes != 2:
        assert d.head == head


def test_keras_options_are_read_from_the_loss():
    keras = require("keras")
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction="sum")
    head, w = unihead.infer(keras_model(Dense(3), loss=loss))
    assert head == H.multiclass(3, label_format="one_hot", label_smoothing=0.1, reduction="sum")
    focal = keras.losses.CategoricalFocalCrossentropy(gamma=1.5)
    d = unihead.diagnose(keras_model(Dense(3, activation="softmax"), loss=focal))
    assert d.head.focal_gamma == 1.5 and d.ok and d.codes == ("differs_from_native",)  # Keras' alpha=0.25


def test_infer_returns_the_canonical_weights():
    model = keras_model(Dense(3), loss="categorical_crossentropy")
    dense = model.layers[-1]
    head, w = unihead.infer(model)
    np.testing.assert_array_equal(w["kernel"], np.asarray(dense.kernel))
    np.testing.assert_array_equal(w["bias"], np.asarray(dense.bias))
    assert w["kernel"].shape == (16, 3)
    # a Dense passed on its own, with the loss given separately
    assert unihead.infer(dense, loss="sparse_categorical_crossentropy").head == H.multiclass(3)


# ------------------------------------------------------------------------------ PyTorch twins
def torch_model(*tail, out=3):
    torch = require("torch")
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out), *tail)


TORCH_MISTAKES = {
    "softmax before CrossEntropyLoss": (lambda nn: (torch_model(nn.Softmax(dim=1)), nn.CrossEntropyLoss()),
                                        np.array([0, 1, 2]), "double_activation", H.multiclass(3)),
    "sigmoid before BCEWithLogitsLoss": (lambda nn: (torch_model(nn.Sigmoid(), out=1), nn.BCEWithLogitsLoss()),
                                         np.array([0.0, 1.0]), "double_activation", H.binary()),
    "BCELoss without a sigmoid": (lambda nn: (torch_model(out=1), nn.BCELoss()), np.array([0.0, 1.0]),
                                  "loss_expects_probabilities", H.binary()),
    "NLLLoss without LogSoftmax": (lambda nn: (torch_model(), nn.NLLLoss()), np.array([0, 1, 2]),
                                   "nll_without_log_softmax", H.multiclass(3)),
    "NLLLoss after Softmax": (lambda nn: (torch_model(nn.Softmax(-1)), nn.NLLLoss()), None,
                              "nll_on_probabilities", H.multiclass(3)),
    "LogSoftmax over one unit": (lambda nn: (torch_model(nn.LogSoftmax(-1), out=1), nn.NLLLoss()), None,
                                 "softmax_one_unit", H.binary()),
    "CrossEntropyLoss on one logit": (lambda nn: (torch_model(out=1), nn.CrossEntropyLoss()), None,
                                      "categorical_loss_one_unit", H.binary()),
    "BCE with 4 classes": (lambda nn: (torch_model(nn.Sigmoid(), out=1), nn.BCELoss()), np.array([0, 1, 2, 3]),
                           "bce_multiclass_labels", H.multiclass(4)),
    "one-hot labels into NLLLoss": (lambda nn: (torch_model(nn.LogSoftmax(-1)), nn.NLLLoss()), np.eye(3),
                                    "one_hot_with_sparse_loss", H.multiclass(3, label_format="one_hot")),
    "labels wider than the layer": (lambda nn: (torch_model(), nn.CrossEntropyLoss()), np.array([0, 1, 4]),
                                    "width_mismatch", H.multiclass(5)),
    "label rows narrower than the layer": (lambda nn: (torch_model(out=4), nn.BCEWithLogitsLoss()),
                                           np.array([[0, 1, 1], [1, 0, 0]]), "width_mismatch", H.multilabel(3)),
    "-1 labels without ignore_index": (lambda nn: (torch_model(), nn.CrossEntropyLoss()), np.array([0, -1, 2]),
                                       "negative_labels", H.multiclass(3)),
}


@pytest.mark.parametrize("name", list(TORCH_MISTAKES))
def test_pytorch_twins_are_diagnosed(name):
    torch = require("torch")
    build, labels, code, fixed = TORCH_MISTAKES[name]
    model, loss = build(torch.nn)
    d = unihead.diagnose(model, loss, labels=labels)
    assert code in {f.code for f in d.errors}, str(d)
    assert d.head == fixed, str(d)
    f = next(f for f in d.errors if f.code == code)
    assert "torch" in f.lines and "nn.Linear(16," in f.lines["torch"]


def test_pytorch_correct_heads_raise_nothing():
    torch = require("torch")
    nn = torch.nn
    cases = [
        (torch_model(), nn.CrossEntropyLoss(), np.array([0, 1, 2, -100]), H.multiclass(3, ignore_index=-100)),
        (torch_model(), nn.CrossEntropyLoss(label_smoothing=0.1), np.array([0, 1, 2]),
         H.multiclass(3, label_smoothing=0.1)),
        (torch_model(nn.LogSoftmax(-1)), nn.NLLLoss(), np.array([0, 1, 2]), H.multiclass(3)),
        (torch_model(out=1), nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0])), np.array([0.0, 1.0]),
         H.binary(pos_weight=3.0)),
        (torch_model(nn.Sigmoid(), out=1), nn.BCELoss(), np.array([0.0, 1.0]), H.binary()),
        (torch_model(out=2), nn.CrossEntropyLoss(), np.array([0, 1, 1]), H.binary(binary_units=2)),
        (torch_model(out=4), nn.BCEWithLogitsLoss(), np.array([[0, 1, 1, 0], [1, 0, 0, 0]]), H.multilabel(4)),
        (torch_model(), nn.CrossEntropyLoss(), np.eye(3, dtype=np.float32), H.multiclass(3, label_format="one_hot")),
    ]
    for model, loss, labels, head in cases:
        d = unihead.diagnose(model, loss, labels=labels)
        assert d.findings == () and d.head == head, str(d)


def test_pytorch_infer_reads_options_and_transposes_weights():
    torch = require("torch")
    nn = torch.nn
    model = torch_model()
    loss = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), ignore_index=-1, reduction="sum")
    head, w = unihead.infer(model, loss)
    assert head == H.multiclass(3, class_weights=[1.0, 2.0, 0.5], ignore_index=-1, reduction="sum")
    np.testing.assert_array_equal(w["kernel"], model[-1].weight.detach().numpy().T)
    np.testing.assert_array_equal(w["bias"], model[-1].bias.detach().numpy())
    # the default ignore_index=-100 is not an option the user chose
    assert unihead.infer(model, nn.CrossEntropyLoss()).head == H.multiclass(3)
    # a unihead layer carries its spec
    layer = unihead.compile(H.multilabel(4, label_smoothing=0.2), "torch").layer(8)
    assert unihead.infer(layer).head == H.multilabel(4, label_smoothing=0.2)


def test_native_differences_are_reported_as_info():
    torch = require("torch")
    nn = torch.nn
    d = unihead.diagnose(torch_model(), nn.CrossEntropyLoss(weight=torch.ones(3) * 2, label_smoothing=0.1))
    assert d.ok and d.codes == ("differs_from_native",) and "mc8" in str(d)
    d = unihead.diagnose(torch_model(out=4), nn.BCEWithLogitsLoss(reduction="sum"))
    assert d.ok and "4x unihead's 'sum'" in str(d)


def test_mismatched_unihead_layer_and_loss():
    torch = require("torch")
    layer = unihead.compile(H.multiclass(3), "torch").layer(8)
    loss = unihead.compile(H.multiclass(3, label_smoothing=0.1), "torch").loss_fn()
    d = unihead.diagnose(torch.nn.Sequential(layer), loss)
    assert d.codes == ("head_mismatch",)
    assert unihead.diagnose(torch.nn.Sequential(layer), layer.compiled().loss_fn()).findings == ()


def test_unreadable_models_are_explained():
    with pytest.raises(TypeError, match="Keras models and layers, PyTorch modules"):
        unihead.diagnose(object())
    torch = require("torch")
    with pytest.raises(ValueError, match="No nn.Linear found"):
        unihead.diagnose(torch.nn.Sequential(torch.nn.ReLU()))


# ------------------------------------------------------------------------------ from_labels
@pytest.mark.parametrize("labels, head", [
    (np.array([0, 3, 1, 2]), H.multiclass(4)),
    (np.array([[0], [2], [1]]), H.multiclass(3)),
    (np.array([0, 1, 1, 0]), H.binary()),
    (np.array([0.0, 1.0, 1.0]), H.binary()),
    (np.eye(4)[[0, 2, 3]], H.multiclass(4, label_format="one_hot")),
    (np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]]), H.multilabel(3)),
    (np.array([[0.2, 0.8], [0.5, 0.5]]), H.multiclass(2, label_format="probabilities")),
    (np.array([[0.2, 0.9], [0.5, 0.1]]), H.multilabel(2, label_format="probabilities")),
    (np.array([0.25, 0.75, 1.0]), H.binary(label_format="probabilities")),
])
def test_from_labels(labels, head):
    assert H.from_labels(labels) == head


def test_from_labels_options_and_num_classes():
    assert H.from_labels(np.array([0, 1, 1]), num_classes=5, label_smoothing=0.1) == H.multiclass(5, label_smoothing=0.1)
    assert H.from_labels(np.array([0, 1]), num_classes=2) == H.multiclass(2)


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 1, -1, 2]), r"ignore_index=-1"),
    (np.array([2, 2, 2]), r"num_classes=K.*binary\(\).*multiclass\(K\)"),
    (np.array([0.5, 2.5, -1.0]), r"multiclass\(K\).*multilabel\(K\).*probabilities"),
])
def test_from_labels_ambiguous_input_says_what_to_choose(labels, match):
    with pytest.raises(HeadSpecError, match=match):
        H.from_labels(labels)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_infer_reads_half_precision_pytorch_weights_as_float32(dtype):
    """Half-precision weights are read by the backend's one rule (as float32), the bias too (a
    bfloat16 tensor has no NumPy dtype of its own)."""
    torch = require("torch")
    lin = torch.nn.Linear(4, 3).to(getattr(torch, dtype))
    head, w = unihead.infer(torch.nn.Sequential(lin), torch.nn.CrossEntropyLoss())
    assert head == H.multiclass(3)
    kernel, bias = (w["kernel"], w["bias"]) if isinstance(w, dict) else w
    assert kernel.dtype == bias.dtype == np.float32
    np.testing.assert_array_equal(kernel, lin.weight.detach().float().numpy().T)
    np.testing.assert_array_equal(bias, lin.bias.detach().float().numpy())


# ------------------------------------------------------------------------------ training code
ACCUMULATION = {  # real training-loop code: (the finding's severity, or None for no finding)
    "torch_ignore_index_divided_by_steps": ("error", """
import torch
from torch import nn
criterion = nn.CrossEntropyLoss(ignore_index=-100)
for i, (x, y) in enumerate(loader):
    loss = criterion(model(x), y) / accumulation_steps
    loss.backward()
    if (i + 1) % accumulation_steps == 0:
        optimizer.step()
        optimizer.zero_grad()
"""),
    "torch_default_mean_summed": ("warning", """
import torch.nn.functional as F
for step, batches in enumerate(steps):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
"""),
    "torch_masked_ratio_with_amp": ("error", """
for i, batch in enumerate(loader):
    per_token = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    loss = (per_token * batch["mask"]).sum() / batch["mask"].sum()
    scaler.scale(loss / 4).backward()
    if i % 4 == 3:
        scaler.step(optimizer)
        scaler.update()
"""),
    "hf_accelerate_model_loss": ("error", """
for batch in train_dataloader:
    with accelerator.accumulate(model):
        outputs = model(**batch)
        loss = outputs.loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
"""),
    "keras_gradient_accumulation_masked": ("error", """
import keras
model.compile(optimizer=keras.optimizers.Adam(1e-3, gradient_accumulation_steps=4),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1))
"""),
    "keras_gradient_accumulation": ("warning", """
import tensorflow as tf
model.compile(optimizer=tf.keras.optimizers.SGD(0.1, gradient_accumulation_steps=n), loss="mse")
"""),
    "optax_multisteps_masked_mean": ("error", """
import optax, jax.numpy as jnp
opt = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4)
def loss_fn(params, x, y, mask):
    l = optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)
    return jnp.sum(l * mask) / jnp.sum(mask)
"""),
    # the correct patterns: unihead's contract, and no accumulation at all
    "unihead_normalizer": (None, """
import unihead
compiled = unihead.compile(head, "torch")
criterion = compiled.loss_fn()
for step, batches in enumerate(steps):
    W = sum(compiled.loss_weight(y) for _, y in batches)
    for x, y in batches:
        loss = compiled.loss(model(x), y, normalizer=W)
        loss.backward()
        criterion(model(x), y, normalizer=W).backward()
    optimizer.step()
"""),
    "unihead_loss_terms": (None, """
for step, batches in enumerate(steps):
    for x, y in batches:
        total, weight = compiled.loss_terms(model(x), y)
        total.backward()
    optimizer.step()
"""),
    "one_step_per_batch": (None, """
criterion = nn.CrossEntropyLoss(ignore_index=-100)
for x, y in loader:
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
"""),
    "keras_no_accumulation": (None, """
model.compile(optimizer=keras.optimizers.Adam(1e-3, gradient_accumulation_steps=None), loss="mse")
"""),
}


@pytest.mark.parametrize("name", sorted(ACCUMULATION))
def test_a_mean_accumulated_over_micro_batches_is_found_in_code(name):
    severity, code = ACCUMULATION[name]
    d = unihead.diagnose_code(code, f"{name}.py")
    if severity is None:
        assert d.findings == () and d.ok, str(d)
        return
    assert d.codes == ("mean_of_micro_batch_means",), str(d)
    f = d.findings[0]
    assert f.severity == severity and d.ok == (severity != "error")
    assert "normalizer=W" in f.lines["unihead"] and "loss_weight" in f.lines["unihead"]
    assert d.head is None and "\nhead:" not in str(d) and f"{name}.py (training code" in str(d)


def test_diagnose_code_refuses_what_is_not_code():
    with pytest.raises(ValueError, match="not Python code unihead can read.*line 1"):
        unihead.diagnose_code("for x in :", "bad.py")
    with pytest.raises(TypeError, match="Python source text"):
        unihead.diagnose_code(b"x = 1")


def test_cli_diagnoses_a_training_script(tmp_path, capsys):
    from unihead.cli import main

    script = tmp_path / "train.py"
    script.write_text(ACCUMULATION["torch_ignore_index_divided_by_steps"][1])
    assert main(["diagnose", str(script)]) == 1
    out = capsys.readouterr().out
    assert "ERROR [mean_of_micro_batch_means] line 7" in out and "normalizer=W" in out
    script.write_text(ACCUMULATION["unihead_normalizer"][1])
    assert main(["diagnose", str(script)]) == 0
    assert main(["diagnose", str(script), "--loss", "nn.CrossEntropyLoss()"]) == 2
    assert "training code" in capsys.readouterr().err
