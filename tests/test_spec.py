"""ClassificationHead: construction, contradictions, derived fields, serialisation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unihead import ClassificationHead as H
from unihead import HeadSpecError


# ----------------------------------------------------------------------------- construction
def test_readable_constructors_and_derived_fields():
    b1 = H.binary()
    assert (b1.task, b1.num_classes, b1.num_outputs, b1.activation, b1.label_format) == (
        "binary", 2, 1, "sigmoid", "binary")
    b2 = H.binary(binary_units=2)
    assert (b2.num_outputs, b2.activation, b2.label_format) == (2, "softmax", "binary")
    mc = H.multiclass(10)
    assert (mc.num_outputs, mc.activation, mc.label_format) == (10, "softmax", "sparse")
    ml = H.multilabel(5)
    assert (ml.num_outputs, ml.activation, ml.label_format) == (5, "sigmoid", "multi_hot")
    # the generic constructor is the same thing
    assert H("multiclass", num_classes=10) == mc
    assert H("binary", num_classes=2) == b1
    # multiclass with 2 classes is allowed (it equals a 2-unit binary head with sparse labels)
    assert H.multiclass(2).num_outputs == 2


def test_normalisation_of_values():
    h = H.multiclass(np.int64(3), class_weights=np.array([1, 2, 3]), label_smoothing=np.float32(0.25))
    assert h.num_classes == 3 and isinstance(h.num_classes, int)
    assert h.class_weights == (1.0, 2.0, 3.0)
    assert h.label_smoothing == 0.25
    assert H.binary(pos_weight=[2.0]).pos_weight == 2.0
    assert H.multilabel(3, pos_weight=[1, 2, 3]).pos_weight == (1.0, 2.0, 3.0)
    assert H.multilabel(3, pos_weight=[4]).pos_weight == 4.0


def test_immutable_and_replace():
    h = H.multiclass(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.num_classes = 5  # type: ignore[misc]
    assert h.replace(label_smoothing=0.1).label_smoothing == 0.1
    with pytest.raises(HeadSpecError, match="label_smoothing"):
        h.replace(label_smoothing=1.0)
    b = H.binary(label_smoothing=0.1, class_weights=[1, 3], focal_gamma=2.0)
    b2 = b.with_binary_units(2)
    assert b2.binary_units == 2 and b2.class_weights == (1.0, 3.0) and b2.focal_gamma == 2.0
    assert b2.with_binary_units(1) == b
    with pytest.raises(HeadSpecError, match="binary heads"):
        h.with_binary_units(2)


def test_hashable_and_equal():
    assert len({H.multiclass(3), H.multiclass(3), H.multilabel(3)}) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="multiclas"), "Unknown task .multiclas.*Did you mean .multiclass."),
        (dict(task=3), "task must be a string"),
        (dict(task="multiclass", num_classes=1), "num_classes >= 2.*always 1.0.*binary"),
        (dict(task="multiclass", num_classes=0), "num_classes >= 2"),
        (dict(task="multiclass"), "needs num_classes"),
        (dict(task="multiclass", num_classes=2.0), "num_classes must be an integer"),
        (dict(task="multiclass", num_classes=True), "num_classes must be an integer"),
        (dict(task="multilabel", num_classes=1), "binary head"),
        (dict(task="binary", num_classes=1), "exactly 2 classes.*binary_units=1"),
        (dict(task="binary", num_classes=4), "exactly 2 classes.*multiclass\\(4\\)"),
        (dict(task="binary", binary_units=3), "binary_units must be 1.*or 2.*multiclass\\(3\\)"),
        (dict(task="binary", binary_units=0), "binary_units must be 1"),
        (dict(task="multiclass", num_classes=3, binary_units=2), "binary_units applies to binary heads"),
        (dict(task="binary", label_format="sparse"), "not a binary label format.*'binary'"),
        (dict(task="binary", label_format="one_hot"), "never needs one-hot"),
        (dict(task="multiclass", num_classes=3, label_format="multi_hot"), "multilabel"),
        (dict(task="multiclass", num_classes=3, label_format="binary"), "sparse"),
        (dict(task="multilabel", num_classes=3, label_format="one_hot"), "multiclass"),
        (dict(task="multilabel", num_classes=3, label_format="sparse"), "multiclass"),
        (dict(task="multiclass", num_classes=3, label_format="onehot"), "Did you mean 'one_hot'"),
        (dict(task="multiclass", num_classes=3, label_smoothing=1.0), "label_smoothing must be in \\[0, 1\\)"),
        (dict(task="multiclass", num_classes=3, label_smoothing=-0.1), "label_smoothing must be in"),
        (dict(task="multiclass", num_classes=3, label_smoothing=float("nan")), "label_smoothing must be finite"),
        (dict(task="multiclass", num_classes=3, label_smoothing="0.1"), "label_smoothing must be a real number"),
        (dict(task="multiclass", num_classes=3, class_weights=[1, 2]), "length 3 \\(one per class\\)"),
        (dict(task="binary", class_weights=[1, 2, 3]), "length 2 \\(for class 0 and class 1\\)"),
        (dict(task="multilabel", num_classes=3, class_weights=[1]), "one per label"),
        (dict(task="multiclass", num_classes=3, class_weights=[1, -2, 3]), "class_weights\\[1\\] = -2.0 is negative"),
        (dict(task="multiclass", num_classes=2, class_weights=[0, 0]), "all zero"),
        (dict(task="multiclass", num_classes=2, class_weights="ab"), "sequence of numbers"),
        (dict(task="multiclass", num_classes=2, class_weights=[1, float("inf")]), "must be finite"),
        (dict(task="multiclass", num_classes=2, class_weights=np.ones((2, 1))), "one-dimensional"),
        (dict(task="multiclass", num_classes=3, pos_weight=2.0), "pos_weight is for sigmoid heads.*class_weights"),
        (dict(task="binary", pos_weight=[1.0, 2.0]), "one pos_weight"),
        (dict(task="binary", pos_weight=-1.0), "negative"),
        (dict(task="multilabel", num_classes=3, pos_weight=[1.0, 2.0]), "one number or 3 numbers"),
        (dict(task="multilabel", num_classes=2, pos_weight=[1.0, -2.0]), "pos_weight\\[1\\]"),
        (dict(task="multiclass", num_classes=3, label_format="one_hot", ignore_index=-100), "ignore_index only works with integer labels.*sample_weight 0"),
        (dict(task="multilabel", num_classes=3, ignore_index=-1), "ignore_index only works"),
        (dict(task="binary", ignore_index=1), "ignore every example of class 1"),
        (dict(task="multiclass", num_classes=3, ignore_index=1.5), "ignore_index must be an integer"),
        (dict(task="multiclass", num_classes=3, focal_gamma=-1), "focal_gamma must be >= 0"),
        (dict(task="multiclass", num_classes=3, reduction="avg"), "Unknown reduction 'avg'"),
        (dict(task="multiclass", num_classes=3, reduction="sum_over_batch_size"), "weighted mean"),
        (dict(task="multiclass", num_classes=3, reduction=None), "reduction='none'"),
        (dict(task="binary", threshold=1.0), "strictly between 0 and 1"),
        (dict(task="binary", threshold=0.0), "strictly between 0 and 1"),
        (dict(task="multiclass", num_classes=3, threshold=0.7), "most probable class"),
    ],
)
def test_contradictions_are_rejected_with_a_fix(kwargs, message):
    kwargs = dict(kwargs)
    task = kwargs.pop("task")
    with pytest.raises(HeadSpecError, match=message):
        H(task, **kwargs)


def test_errors_are_value_errors():
    assert issubclass(HeadSpecError, ValueError)


def test_repr_shows_non_defaults():
    assert repr(H.multiclass(10)) == "ClassificationHead.multiclass(10)"
    assert repr(H.binary(binary_units=2, label_smoothing=0.1)) == (
        "ClassificationHead.binary(binary_units=2, label_smoothing=0.1)")
    assert repr(H.multilabel(3, class_weights=[1, 2, 3])) == (
        "ClassificationHead.multilabel(3, class_weights=[1.0, 2.0, 3.0])")


# ----------------------------------------------------------------------------- serialisation
reals = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def heads(draw):
    task = draw(st.sampled_from(["binary", "multiclass", "multilabel"]))
    kw = {}
    if task == "binary":
        kw["binary_units"] = draw(st.sampled_from([1, 2]))
        kw["label_format"] = draw(st.sampled_from([None, "binary", "probabilities"]))
        k = 2
        if draw(st.booleans()):
            kw["pos_weight"] = draw(reals)
        if kw["label_format"] != "probabilities" and draw(st.booleans()):
            kw["ignore_index"] = draw(st.integers(-1000, -1) | st.integers(2, 1000))
        kw["threshold"] = draw(st.floats(0.01, 0.99))
    else:
        k = draw(st.integers(2, 50))
        kw["num_classes"] = k
        if task == "multiclass":
            kw["label_format"] = draw(st.sampled_from([None, "sparse", "one_hot", "probabilities"]))
            if kw["label_format"] in (None, "sparse") and draw(st.booleans()):
                kw["ignore_index"] = draw(st.integers(-(2**40), 2**40))
        else:
            kw["label_format"] = draw(st.sampled_from([None, "multi_hot", "probabilities"]))
            if draw(st.booleans()):
                kw["pos_weight"] = draw(reals | st.lists(reals, min_size=k, max_size=k))
            kw["threshold"] = draw(st.floats(0.01, 0.99))
    if draw(st.booleans()):
        kw["class_weights"] = draw(
            st.lists(reals, min_size=k, max_size=k).filter(lambda ws: any(w > 0 for w in ws)))
    kw["label_smoothing"] = draw(st.floats(0.0, 0.999))
    kw["focal_gamma"] = draw(st.floats(0.0, 10.0))
    kw["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    return H(task, **kw)


@given(heads())
def test_dict_and_json_round_trip(head):
    d = head.to_dict()
    assert d["format"] == "unihead.ClassificationHead" and d["version"] == 1
    assert H.from_dict(d) == head
    text = head.to_json()
    assert H.from_json(text) == head
    # plain data only: JSON text, no objects
    assert json.loads(text) == json.loads(json.dumps(d))
    # a round trip keeps every float bit-exactly
    again = H.from_json(text)
    assert again.to_json() == text


@pytest.mark.parametrize(
    "data, message",
    [
        ({"task": "multiclass", "num_classes": 3, "loss": "ce"}, "Unknown key 'loss'"),
        ({"num_classes": 3}, "no 'task'"),
        ({"task": "multiclass", "num_classes": "3"}, "Key 'num_classes' must be an integer"),
        ({"task": "multiclass", "num_classes": 3.0}, "Key 'num_classes' must be an integer"),
        ({"task": "multiclass", "num_classes": True}, "Key 'num_classes' must be an integer"),
        ({"task": "multiclass", "num_classes": 3, "class_weights": [1, "2", 3]}, "Key 'class_weights'"),
        ({"task": "multiclass", "num_classes": 3, "class_weights": {"a": 1}}, "Key 'class_weights'"),
        ({"task": "multiclass", "num_classes": 3, "label_smoothing": None}, "Key 'label_smoothing' must be a number"),
        ({"task": "multiclass", "num_classes": 3, "version": 99}, "spec version 99"),
        ({"task": "multiclass", "num_classes": 3, "version": "1"}, "'version' must be an integer"),
        ({"task": "multiclass", "num_classes": 3, "format": "other"}, "'format' must be"),
        ({"task": ["multiclass"], "num_classes": 3}, "Key 'task' must be a string"),
        ({"task": "multiclass", "num_classes": 3, "__class__": "x"}, "Unknown key '__class__'"),
    ],
)
def test_from_dict_rejects_malformed_input(data, message):
    with pytest.raises(HeadSpecError, match=message):
        H.from_dict(data)


def test_from_json_rejects_non_json_and_nan():
    with pytest.raises(HeadSpecError, match="not valid JSON"):
        H.from_json("{task: multiclass}")
    with pytest.raises(HeadSpecError, match="NaN"):
        H.from_json('{"task": "multiclass", "num_classes": 3, "label_smoothing": NaN}')
    with pytest.raises(HeadSpecError, match="must be a dict"):
        H.from_json("[1, 2]")
    # a contradiction in stored data is caught by the same validation as the constructor
    with pytest.raises(HeadSpecError, match="always 1.0"):
        H.from_json('{"task": "multiclass", "num_classes": 1}')


# ----------------------------------------------------------------------------- from_labels
IDS5 = np.array([0, 5, 2, 1])  # ids up to 5: multiclass(6)
ONE_HOT4 = np.eye(4)[[0, 1, 3]]
MULTI_HOT3 = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]])
PROB_ROWS2 = np.array([[0.2, 0.8], [0.5, 0.5]])
PROB_ROWS3_FREE = np.array([[0.2, 0.9, 0.0], [0.5, 0.1, 1.0]])  # rows not summing to 1
PROBS = np.array([0.2, 0.7, 1.0])  # one probability per example
Y01 = np.array([0, 1, 1, 0])
COL01 = Y01[:, None]  # an (N, 1) column


@pytest.mark.parametrize("labels, kwargs, head", [
    # num_classes that agrees with the labels
    (IDS5, {"num_classes": 6}, H.multiclass(6)),
    (IDS5, {"num_classes": 9}, H.multiclass(9)),  # classes that never occur in this sample
    (ONE_HOT4, {"num_classes": 4}, H.multiclass(4, label_format="one_hot")),
    (MULTI_HOT3, {"num_classes": 3}, H.multilabel(3)),
    (PROB_ROWS2, {"num_classes": 2}, H.multiclass(2, label_format="probabilities")),
    (PROB_ROWS3_FREE, {"num_classes": 3}, H.multilabel(3, label_format="probabilities")),
    (PROBS, {"num_classes": 2}, H.binary(label_format="probabilities")),
    (COL01, {"num_classes": 3}, H.multiclass(3)),
    (COL01, {}, H.binary()),
    (Y01, {"num_classes": 2}, H.multiclass(2)),  # num_classes=K asks for multiclass(K)
    # task / label_format choose among the readings of the same values
    (ONE_HOT4, {"task": "multilabel"}, H.multilabel(4)),
    (ONE_HOT4, {"label_format": "probabilities"}, H.multiclass(4, label_format="probabilities")),
    (ONE_HOT4, {"task": "multilabel", "label_format": "probabilities"}, H.multilabel(4, label_format="probabilities")),
    (MULTI_HOT3, {"label_format": "probabilities"}, H.multilabel(3, label_format="probabilities")),
    (PROB_ROWS2, {"task": "multilabel"}, H.multilabel(2, label_format="probabilities")),
    (Y01, {"task": "multiclass"}, H.multiclass(2)),
    (Y01, {"label_format": "sparse"}, H.multiclass(2)),
    (Y01, {"label_format": "probabilities"}, H.binary(label_format="probabilities")),
    (np.array([1, 1, 1]), {"task": "binary"}, H.binary()),  # one class present, but binary is said
    # options only a binary head takes pick the binary reading of 0/1 ids, also with num_classes=2
    (Y01, {"num_classes": 2, "binary_units": 2}, H.binary(binary_units=2)),
    (Y01, {"num_classes": 2, "pos_weight": 3.0}, H.binary(pos_weight=3.0)),
    (Y01, {"binary_units": 2, "label_smoothing": 0.1}, H.binary(binary_units=2, label_smoothing=0.1)),
    # ids equal to ignore_index are not classes
    (np.array([0, 1, -1, 2]), {"ignore_index": -1}, H.multiclass(3, ignore_index=-1)),
    (np.array([0, 3, 255, 2]), {"ignore_index": 255}, H.multiclass(4, ignore_index=255)),
    (np.array([0, 1, -100, 1]), {"ignore_index": -100}, H.binary(ignore_index=-100)),
])
def test_from_labels_with_options_that_agree_gives_the_right_head(labels, kwargs, head):
    assert H.from_labels(labels, **kwargs) == head


@pytest.mark.parametrize("labels, kwargs, message", [
    # num_classes contradicting the labels, with what to pass instead
    (IDS5, {"num_classes": 3},
     r"^labels have ids up to 5 but num_classes=3: pass num_classes=6 or more, or fix the labels\.$"),
    (np.array([[0], [4], [1]]), {"num_classes": 2}, r"ids up to 4 but num_classes=2: pass num_classes=5 or more"),
    (ONE_HOT4, {"num_classes": 7},
     r"one-hot rows of width 4, shape \(3, 4\), but num_classes=7: .* pass num_classes=4 \(or leave it out\)"),
    (ONE_HOT4, {"num_classes": 3}, r"one-hot rows of width 4.*pass num_classes=4"),
    (MULTI_HOT3, {"num_classes": 2}, r"multi-hot rows of width 3.*but num_classes=2.*pass num_classes=3"),
    (PROB_ROWS2, {"num_classes": 3}, r"probability rows of width 2.*pass num_classes=2"),
    (PROB_ROWS3_FREE, {"num_classes": 5}, r"probabilities in \[0, 1\], shape \(2, 3\), but num_classes=5.*pass num_classes=3"),
    (PROBS, {"num_classes": 3},
     r"fit a binary head \(2 classes\), but num_classes=3: leave num_classes out \(or pass 2\); for 3 classes give rows"),
    (Y01, {"num_classes": 1}, r"ids up to 1 but num_classes=1: pass num_classes=2 or more"),
    # task / label_format that no reading of the labels fits
    (IDS5, {"task": "binary"}, r"ids 0\.\.5.*fit ClassificationHead\.multiclass\(6\), not task='binary'\. A binary head takes 0/1"),
    (IDS5, {"task": "multilabel"}, r"not task='multilabel'\. To give rows, convert the ids: np\.eye\(K\)\[y\]"),
    (IDS5, {"label_format": "one_hot"}, r"not label_format='one_hot'.*np\.eye\(K\)\[y\].*leave out label_format to get ClassificationHead\.multiclass\(6\)"),
    (IDS5, {"label_format": "probabilities"}, r"not label_format='probabilities'"),
    (ONE_HOT4, {"task": "binary"}, r"not task='binary'\. To give class ids, convert the rows: y\.argmax\(-1\)"),
    (ONE_HOT4, {"label_format": "sparse"}, r"not label_format='sparse'.*y\.argmax\(-1\)"),
    (MULTI_HOT3, {"task": "multiclass"}, r"fit ClassificationHead\.multilabel\(3\), not task='multiclass'\. Rows with several 1s"),
    (MULTI_HOT3, {"label_format": "one_hot"}, r"not label_format='one_hot'"),
    (PROB_ROWS3_FREE, {"task": "multiclass"}, r"not task='multiclass'\. Multiclass probability rows sum to 1"),
    (PROBS, {"task": "multiclass"}, r"not task='multiclass'\. One probability per example is a binary head"),
    (PROBS, {"label_format": "binary"}, r"not label_format='binary'"),
    (Y01, {"task": "multilabel"}, r"fit ClassificationHead\.binary\(\) or ClassificationHead\.multiclass\(2\), not task='multilabel'"),
    (Y01, {"task": "binary", "label_format": "sparse"}, r"not task='binary', label_format='sparse'.*leave out task and label_format"),
    # options the head the labels call for does not take
    (IDS5, {"pos_weight": 2.0}, r"call for ClassificationHead\.multiclass\(6\), but with these options: pos_weight is for sigmoid heads"),
    (IDS5, {"class_weights": [1.0, 2.0]}, r"multiclass\(6\), but with these options: class_weights must have length 6"),
    (ONE_HOT4, {"ignore_index": -1}, r"one_hot.*but with these options: ignore_index only works with integer labels"),
    (Y01, {"num_classes": 2, "pos_weight": -1.0},
     r"no head they fit takes these options: ClassificationHead\.multiclass\(2\): pos_weight is for sigmoid.*ClassificationHead\.binary\(\): pos_weight = -1\.0 is negative"),
    # ignore_index against the labels
    (np.array([0, 1, -1, 2]), {"ignore_index": -100}, r"negative ids \[-1\], and ignore_index=-100 is not among them: pass ignore_index=-1"),
    (np.array([0, -2, -1, 2]), {"ignore_index": -1}, r"negative ids \[-2\]"),
    (np.array([255, 255]), {"ignore_index": 255}, r"every label is ignore_index=255"),
    # ids an int32 cannot hold
    (np.array([0, 2**40]), {}, r"ids up to 1099511627776, but class ids must be below 2147483647"),
    # values that are options of their own
    (IDS5, {"num_classes": 2**31}, r"num_classes = 2147483648 is out of range"),
    (IDS5, {"num_classes": 6.0}, r"num_classes must be an integer"),
    (IDS5, {"task": "multiclas"}, r"Unknown task 'multiclas'.*Did you mean 'multiclass'"),
    (IDS5, {"label_format": "onehot"}, r"Unknown label_format 'onehot'.*Did you mean 'one_hot'"),
])
def test_from_labels_contradictions_are_errors_that_say_what_to_pass(labels, kwargs, message):
    with pytest.raises(HeadSpecError, match=message):
        H.from_labels(labels, **kwargs)


def test_from_labels_unknown_options_are_type_errors_with_a_suggestion():
    with pytest.raises(TypeError, match=r"unexpected options \['smoothing'\].*Did you mean 'label_smoothing'"):
        H.from_labels(Y01, smoothing=0.1)
