"""``class_names`` in the spec: validated with unihead's messages, serialised (spec version 2,
only when set), carried by head files and compiled heads, and returned by ``predict_names``."""

from __future__ import annotations

import json

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead.errors import HeadSpecError

from .conftest import require

NAMES = ("cat", "dog", "eel")


@pytest.mark.parametrize("head", [H.multiclass(3, class_names=NAMES), H.multilabel(3, class_names=list(NAMES)),
                                  H.binary(class_names=["no", "yes"]), H.binary(binary_units=2, class_names=("no", "yes"))])
def test_round_trips(head, tmp_path):
    assert isinstance(head.class_names, tuple)
    d = head.to_dict()
    assert d["version"] == 2 and d["class_names"] == list(head.class_names)
    assert H.from_dict(d) == head == H.from_json(head.to_json())
    assert eval(repr(head), {"ClassificationHead": H}) == head
    weights = {"kernel": np.ones((4, head.num_outputs), np.float32), "bias": np.zeros(head.num_outputs, np.float32)}
    unihead.save(tmp_path / "h.safetensors", head, weights)
    assert unihead.load(tmp_path / "h.safetensors").head == head
    assert head.replace(label_smoothing=0.1).class_names == head.class_names


def test_a_head_without_names_is_still_version_1():
    d = H.multiclass(3).to_dict()
    assert d["version"] == 1 and "class_names" not in d
    assert H.from_dict({"task": "multiclass", "num_classes": 3, "version": 1}) == H.multiclass(3)
    with pytest.raises(HeadSpecError, match="'class_names' is new in spec version 2"):
        H.from_dict({"task": "multiclass", "num_classes": 3, "version": 1, "class_names": list(NAMES)})
    with pytest.raises(HeadSpecError, match="spec version 3.*Upgrade unihead"):
        H.from_dict({"task": "multiclass", "num_classes": 3, "version": 3})


@pytest.mark.parametrize("names, message", [
    (["a", "b"], r"length 3 \(one per class\), got 2"),
    (["a", "b", "c", "d"], r"length 3 \(one per class\), got 4"),
    (["a", "b", "a"], r"class_names\[0\] and class_names\[2\] are both 'a'"),
    (["a", " ", "c"], r"class_names\[1\] is empty"),
    (["a", 2, "c"], r"class_names\[1\] must be a string, got 2 \(int\)"),
    ("abc", "must be a sequence of 3 .* got str"),
    ({0: "a", 1: "b", 2: "c"}, "id2label"),
    (["a", "b", "x" * 1001], "at most 1000"),
    (iter(str(i) for i in range(10**9)), r"got more than 3"),
])
def test_bad_names_are_refused_with_what_to_write(names, message):
    with pytest.raises(HeadSpecError, match=message):
        H.multiclass(3, class_names=names)


def test_from_dict_refuses_names_of_the_wrong_json_type():
    with pytest.raises(HeadSpecError, match="'class_names' must be a list of strings or null"):
        H.from_dict({"task": "binary", "version": 2, "class_names": ["a", 1]})
    with pytest.raises(HeadSpecError, match="length 2 \\(the negative class, then the positive one\\)"):
        H.from_json(json.dumps({"task": "binary", "version": 2, "class_names": ["a"]}))


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "keras"])
def test_predict_names(backend):
    if backend != "numpy":
        require(backend)
    logits = np.array([[0.0, 2.0, 1.0], [3.0, -1.0, 0.5]], np.float32)
    names = unihead.compile(H.multiclass(3, class_names=NAMES), backend).predict_names(logits)
    assert isinstance(names, np.ndarray) and names.tolist() == ["dog", "cat"]
    multi = unihead.compile(H.multilabel(3, class_names=NAMES), backend).predict_names(logits - 0.75)
    assert multi.shape == (2,) and multi.tolist() == [("dog", "eel"), ("cat",)]
    tokens = unihead.compile(H.multiclass(3, class_names=NAMES), backend).predict_names(np.stack([logits, -logits]))
    assert tokens.shape == (2, 2) and tokens.tolist() == [["dog", "cat"], ["cat", "dog"]]
    for units in (1, 2):
        head = H.binary(binary_units=units, class_names=["no", "yes"])
        z = np.array([[-1.0], [2.0]], np.float32)
        z = z if units == 1 else np.concatenate([np.zeros_like(z), z], -1)
        assert unihead.compile(head, backend).predict_names(z).tolist() == ["no", "yes"]
    with pytest.raises(ValueError, match=r"class names.*head.replace\(class_names=\[...\]\)"):
        unihead.compile(H.multiclass(3), backend).predict_names(logits)
