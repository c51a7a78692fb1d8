"""Hostile input: spec texts (``ClassificationHead.from_json``/``from_dict``/the constructor) and
head files (``unihead.load``) that are malformed, lying or huge end in unihead's own error
(``HeadSpecError`` for spec text, ``HeadFileError`` for files) that says what is wrong -- never in
another exception, a hang or a crash.  Hand-written cases for each kind of hostility, then
hypothesis fuzzing (fixed budget, derandomized) of real head files written by ``unihead.save``
(NumPy weights: framework-free) and of spec texts written by ``to_json``."""

from __future__ import annotations

import json
import struct
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unihead
from unihead import ClassificationHead as H
from unihead import HeadFileError, HeadSpecError
from unihead import headfile
from unihead.spec import MAX_INDEX

FUZZ = settings(
    max_examples=300, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

HEADS = [
    H.binary(),
    H.binary(binary_units=2, pos_weight=2.5, ignore_index=-100, threshold=0.3),
    H.multiclass(3, class_weights=[1.0, 2.0, 0.5], label_smoothing=0.1, ignore_index=-1),
    H.multiclass(5, label_format="one_hot", focal_gamma=2.0, reduction="sum"),
    H.multilabel(4, pos_weight=[1.0, 2.0, 3.0, 0.0], label_format="probabilities", reduction="none"),
]


def _weights(head: H, in_features: int, dtype) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(in_features)
    k = head.num_outputs
    return {"kernel": rng.normal(size=(in_features, k)).astype(dtype), "bias": rng.normal(size=k).astype(dtype)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Real head files (bytes) written by unihead.save, and a scratch path for mutated copies."""
    d = tmp_path_factory.mktemp("heads")
    out = []
    for i, (head, dtype) in enumerate(zip(HEADS, [np.float32, np.float16, np.float64, np.float32, np.float16])):
        p = d / f"h{i}.safetensors"
        unihead.save(p, head, _weights(head, 3 + i, dtype))
        out.append(p.read_bytes())
    return out, d / "fuzzed.safetensors"


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data: bytes, *, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _load_or_refuse(path, raw: bytes) -> None:
    """The property: loading ``raw`` gives a valid, round-tripping head file or a HeadFileError."""
    path.write_bytes(raw)
    try:
        loaded = unihead.load(path)
    except HeadFileError as e:
        assert str(e).startswith(str(path)) and len(str(e)) < 2000, str(e)[:3000]
        return
    head, w = loaded
    assert isinstance(head, H) and H.from_json(head.to_json()) == head
    assert set(w) == {"kernel", "bias"}
    assert w["kernel"].ndim == 2 and w["kernel"].shape[1] == head.num_outputs
    assert w["bias"].shape == (head.num_outputs,)
    assert w["kernel"].dtype.kind == "f" and w["bias"].dtype.kind == "f"
    again = path.with_suffix(".again.safetensors")
    unihead.save(again, head, w)
    head2, w2 = unihead.load(again)
    assert head2 == head
    for k in w:  # bit-exact, NaN payloads included
        assert w2[k].dtype == w[k].dtype and w2[k].tobytes() == w[k].tobytes()


# ------------------------------------------------------------------------------ hostile JSON values
DEEP = "[" * 100_000 + "]" * 100_000
RAW_VALUES = [  # JSON fragments spliced into a spec text in place of one value
    "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "-" + "9" * 5000, "1" + "0" * 23,
    str(2**31), str(2**31 - 1), str(-(2**31) - 1), str(2**63), "true", "false", "null", "3.0", "-0.0",
    "2.5e-324", '"x"', '"' + "y" * 200_000 + '"', '"\\ud800"', '"\\u0000"', "[]", "{}", "[1, [2]]",
    '{"a": 1, "a": 2}', DEEP, "[" * 40 + "]" * 40, "[" * 31 + "]" * 31, '[1, "2", null]',
]


def json_values() -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=12)


def _spec_text_with(head: H, key: str, raw: str) -> str:
    d = head.to_dict()
    d[key] = "\x00RAW\x00"
    return json.dumps(d).replace('"\\u0000RAW\\u0000"', raw)


def _parse_or_refuse(text) -> None:
    """The property for spec text: a valid head that round-trips, or a HeadSpecError."""
    try:
        head = H.from_json(text)
    except HeadSpecError as e:
        assert len(str(e)) < 2000, str(e)[:3000]
        return
    assert isinstance(head, H)
    assert H.from_json(head.to_json()) == head == H.from_dict(head.to_dict())


# ------------------------------------------------------------------------------ spec text: hand-written
@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, r"100000 levels deep"),
    ('{"task": "multiclass", "num_classes": 3, "class_weights": ' + "[" * 500 + "]" * 500 + "}", "501 levels deep"),
    ('{"task": "multiclass", "num_classes": ' + "9" * 5000 + "}", "integer of 5000 digits"),
    ('{"task": "multiclass", "num_classes": 100000000000000000000000}', r"num_classes = 10{23} is out of range: it must be at most 2147483647"),
    ('{"task": "multiclass", "num_classes": 2147483648}', "at most 2147483647"),
    ('{"task": "multiclass", "num_classes": 3, "ignore_index": -2147483649}', "ignore_index .* at least -2147483648"),
    ('{"task": "multiclass", "num_classes": 3, "ignore_index": 2147483648}', "ignore_index .* at most 2147483647"),
    ('{"task": "binary", "binary_units": 100000000000000000000}', "binary_units .* out of range"),
    ('{"task": "multiclass", "num_classes": 3, "num_classes": 4}', "key 'num_classes' twice"),
    ('{"task": "multiclass", "task": "multiclass", "num_classes": 3}', "key 'task' twice"),
    ('{"task": "binary", "label_smoothing": NaN}', "NaN"),
    ('{"task": "binary", "focal_gamma": Infinity}', "Infinity"),
    ('{"task": "binary", "focal_gamma": -Infinity}', "-Infinity"),
    ('{"task": "binary", "label_smoothing": 1e999}', "label_smoothing must be finite"),
    ('{"task": "binary", "focal_gamma": -1}', "focal_gamma must be >= 0"),
    ('{"task": "binary", "class_weights": [1, -1]}', r"class_weights\[1\] = -1.0 is negative"),
    ('{"task": "multiclass", "num_classes": true}', "Key 'num_classes' must be an integer or null, got True"),
    ('{"task": "multiclass", "num_classes": 3.0}', "Key 'num_classes' must be an integer"),
    ('{"task": "multiclass", "num_classes": 3, "ignore_index": -1.0}', "Key 'ignore_index' must be an integer"),
    ('{"task": "binary", "binary_units": false}', "Key 'binary_units' must be an integer"),
    ('{"task": "binary", "threshold": true}', "Key 'threshold' must be a number"),
    ('{"task": "binary", "pos_weight": [true]}', "Key 'pos_weight'"),
    ('{"task": "binary", "reduction": ["mean"]}', "Key 'reduction' must be a string"),
    ('{"task": "binary", "label_format": 1}', "Key 'label_format' must be a string or null"),
    ('{"task": "multiclass", "num_classes": 3, "version": 1.0}', "'version' must be an integer"),
    ('{"task": "multiclass", "num_classes": 3, "format": ["x"]}', "'format' must be"),
    ('{"task": "' + "x" * 10_000_000 + '"}', r"Unknown task 'xxxx.*\.\.\..*xxx'"),
    ('{"task": "multiclass", "num_classes": 3, "' + "k" * 1_000_000 + '": 1}', r"Unknown key 'kkk.*\.\.\."),
    (b'{"task": "bin\xffary"}', r"not UTF-8 text \(byte 13"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"task": "binary"} trailing', "not valid JSON"),
    ('{"task": "binary"', "not valid JSON"),
    ("", "not valid JSON"),
    ('"binary"', "must be a dict, got str"),
    ("[1, 2]", "must be a dict, got list"),
    (None, "must be a str or bytes holding JSON, got NoneType"),
    (12, "must be a str or bytes holding JSON, got int"),
    ({"task": "binary"}, "must be a str or bytes holding JSON, got dict"),
])
def test_hostile_spec_texts_are_refused_with_a_head_spec_error(text, match):
    t = time.perf_counter()
    with pytest.raises(HeadSpecError, match=match) as info:
        H.from_json(text)
    assert time.perf_counter() - t < 2.0
    assert len(str(info.value)) < 1000  # hostile values are shown cut short


def test_deep_nesting_is_refused_even_with_a_raised_recursion_limit():
    """With the recursion limit raised, ``json.loads`` would overflow the C stack (a crash)
    instead of raising RecursionError: unihead counts the nesting first."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10**6)
    try:
        with pytest.raises(HeadSpecError, match="1000000 levels deep"):
            H.from_json("[" * 10**6)
        # brackets inside strings are not nesting: the text parses and fails on the value
        with pytest.raises(HeadSpecError, match="Unknown task"):
            H.from_json(json.dumps({"task": "[" * 1000}))
    finally:
        sys.setrecursionlimit(old)


def test_bounds_are_the_int32_index_range_and_the_limits_themselves_are_valid():
    assert MAX_INDEX == 2**31 - 1
    assert H.multiclass(MAX_INDEX).num_classes == MAX_INDEX
    assert H.multilabel(MAX_INDEX).num_outputs == MAX_INDEX
    assert H.multiclass(3, ignore_index=-(2**31)).ignore_index == -(2**31)
    assert H.multiclass(3, ignore_index=MAX_INDEX).ignore_index == MAX_INDEX
    assert H.from_json(H.multiclass(MAX_INDEX).to_json()) == H.multiclass(MAX_INDEX)
    for bad in (MAX_INDEX + 1, 10**23, 10**5000):
        with pytest.raises(HeadSpecError, match="num_classes = .* out of range: it must be at most 2147483647"):
            H.multiclass(bad)
    with pytest.raises(HeadSpecError, match=r"<an integer of 16610 bits>"):
        H.multilabel(10**5000)  # shown without str() of the integer (refused past 4300 digits)
    for bad in (-(2**31) - 1, 2**31):
        with pytest.raises(HeadSpecError, match="ignore_index = .* out of range"):
            H.multiclass(3, ignore_index=bad)


@pytest.mark.parametrize("kwargs, match", [
    ({"label_smoothing": 10**400}, r"label_smoothing must be finite, got <an integer of 1329 bits> \(too large for a float\)"),
    ({"threshold": np.True_}, "threshold must be a real number"),
    ({"focal_gamma": np.bool_(False)}, "focal_gamma must be a real number"),
    ({"binary_units": np.True_}, "binary_units must be an integer"),
    ({"ignore_index": np.float64(-1.0)}, "ignore_index must be an integer"),
    ({"ignore_index": np.float32(-1.0)}, "ignore_index must be an integer"),
    ({"label_smoothing": b"0.1"}, "label_smoothing must be a real number"),
    ({"label_smoothing": float("nan")}, "label_smoothing must be finite"),
    ({"class_weights": [1.0, float("inf")]}, r"class_weights\[1\] must be finite"),
    ({"class_weights": iter(range(10**12))}, "class_weights must have length 2 .*, got more than 2"),
    ({"class_weights": range(10**12)}, "class_weights must have length 2 .*, got 1000000000000"),
    ({"pos_weight": range(10**12)}, "A binary head takes one pos_weight .* got 1000000000000 values"),
    ({"pos_weight": [1.0, 2.0]}, "A binary head takes one pos_weight"),
    ({"class_weights": np.ones((2, 1))}, "one-dimensional"),
    ({"reduction": "x" * 1_000_000}, r"Unknown reduction 'xxx.*\.\.\..*'"),
])
def test_hostile_python_values_are_refused_quickly(kwargs, match):
    t = time.perf_counter()
    with pytest.raises(HeadSpecError, match=match) as info:
        H.binary(**kwargs)
    assert time.perf_counter() - t < 1.0
    assert len(str(info.value)) < 1000


def test_from_dict_refuses_non_string_keys_and_shows_them_short():
    with pytest.raises(HeadSpecError, match=r"Unknown key 1 in head description"):
        H.from_dict({"task": "binary", 1: 2})
    with pytest.raises(HeadSpecError, match=r"Unknown key \('a', 'b'\)"):
        H.from_dict({"task": "binary", ("a", "b"): 2})
    with pytest.raises(HeadSpecError, match=r"got \[\[\[\[...\]\]\]\] \(list\)"):
        H.from_dict({"task": [[[[[[["binary"]]]]]]]})


@pytest.mark.parametrize("raw", RAW_VALUES, ids=lambda r: r[:12])
@pytest.mark.parametrize("key", ["task", "num_classes", "label_format", "binary_units", "label_smoothing",
                                 "class_weights", "pos_weight", "ignore_index", "focal_gamma", "reduction",
                                 "threshold", "version", "format", "unknown"])
def test_every_field_with_every_hostile_value(key, raw):
    for head in (HEADS[1], HEADS[2], HEADS[4]):
        _parse_or_refuse(_spec_text_with(head, key, raw))


# ------------------------------------------------------------------------------ spec text: fuzz
def spec_texts() -> st.SearchStrategy:
    heads = st.sampled_from(HEADS)
    keys = st.sampled_from(sorted(HEADS[0].to_dict()) + ["extra"])
    plausible = (st.integers(-3, 6).map(str) | st.floats(0, 3).map(repr) | st.sampled_from(
        ['"binary"', '"multiclass"', '"sparse"', '"probabilities"', '"sum"', "[1, 2]", "[0.5, 1, 2]", "null"]))
    raw = st.sampled_from(RAW_VALUES) | json_values().map(lambda v: json.dumps(v)) | plausible
    spliced = st.builds(_spec_text_with, heads, keys, raw)
    texts = heads.map(lambda h: h.to_json())

    @st.composite
    def mutated(draw):
        text = draw(texts | spliced)
        for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3]))):  # 0: a spliced value alone
            op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "bytes"]))
            i = draw(st.integers(0, len(text)))
            if op == "replace" and text:
                i = min(i, len(text) - 1)
                text = text[:i] + draw(st.sampled_from('{}[]",:0123456789-.eE \\ntfu')) + text[i + 1:]
            elif op == "insert":
                text = text[:i] + draw(st.text(max_size=8) | st.sampled_from(RAW_VALUES[:8])) + text[i:]
            elif op == "delete":
                text = text[:i] + text[i + draw(st.integers(1, 8)):]
            elif op == "truncate":
                text = text[:i]
            else:  # as bytes, some of them not UTF-8
                b = text.encode("utf-8", "surrogatepass")
                j = min(i, len(b))
                return b[:j] + draw(st.binary(min_size=1, max_size=4)) + b[j:]
        return text

    return mutated()


@FUZZ
@given(spec_texts())
def test_fuzzed_spec_texts_parse_to_a_valid_head_or_raise_head_spec_error(text):
    _parse_or_refuse(text)


# ------------------------------------------------------------------------------ head files: hand-written
def _header_cases(header: dict, data: bytes):
    def edit(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return _join(h, data)

    spec = json.loads(header["__metadata__"]["spec"])
    n = len(json.dumps(header).encode())
    return {
        "empty file": (b"", "too short"),
        "length only": (struct.pack("<Q", 0), "not valid JSON"),
        "length past the end": (_join(header, data, length=n + len(data) + 1), "header length field says"),
        "length 2**64-1": (_join(header, data, length=2**64 - 1), "header length field says 18446744073709551615"),
        "length into the data": (_join(header, data, length=n + 8), "not UTF-8|not valid JSON"),
        "length short of the header": (_join(header, data, length=n - 3), "not valid JSON"),
        "header is a list": (_join(b"[1, 2]", data), "a JSON list, not an object"),
        "header deeply nested": (_join(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", data), "levels deep"),
        "header huge integer": (_join(b'{"a": ' + b"7" * 5000 + b"}", data), "integer of 5000 digits"),
        "header duplicate key": (_join(b'{"kernel": 1, "kernel": 2}', data), "key 'kernel' twice"),
        "header NaN": (_join(b'{"kernel": NaN}', data), "NaN"),
        "header not UTF-8": (_join(b'{"\xff": 1}', data), "not UTF-8"),
        "trailing garbage": (_join(header, data + b"\x00" * 3), "3 bytes of trailing garbage"),
        "truncated payload": (_join(header, data[:-1]), "truncated"),
        "no payload": (_join(header, b""), "truncated"),
        "metadata not an object": (edit(lambda h: h.update(__metadata__=["spec"])), "no unihead metadata"),
        "metadata value not a string": (edit(lambda h: h["__metadata__"].update(layout=[1])), r"__metadata__\['layout'\] is a list"),
        "spec as an object": (edit(lambda h: h["__metadata__"].update(spec=spec)), r"__metadata__\['spec'\] is a dict"),
        "spec deeply nested": (edit(lambda h: h["__metadata__"].update(spec="[" * 5000)), "spec in the metadata is not valid: .*levels deep"),
        "spec with num_classes 10**23": (edit(lambda h: h["__metadata__"].update(spec=json.dumps({**spec, "num_classes": 10**23}))), "spec in the metadata is not valid: .*out of range"),
        "spec with a duplicate key": (edit(lambda h: h["__metadata__"].update(spec=h["__metadata__"]["spec"][:-1] + ', "task": "binary"}')), "key 'task' twice"),
        "format huge string": (edit(lambda h: h["__metadata__"].update(format="f" * 1_000_000)), r"metadata format is 'fff.*\.\.\."),
        "format version as a number": (edit(lambda h: h["__metadata__"].update(format_version=1)), r"__metadata__\['format_version'\] is a int"),
        "dtype as a list": (edit(lambda h: h["kernel"].update(dtype=["F32"])), r"tensor 'kernel' has dtype \['F32'\]"),
        "dtype integer": (edit(lambda h: h["bias"].update(dtype="I64")), "dtype 'I64'; head files hold F16, F32 or F64"),
        "dtype bfloat16": (edit(lambda h: h["bias"].update(dtype="BF16")), "dtype 'BF16'"),
        "dtype of another width": (edit(lambda h: h["kernel"].update(dtype="F64" if h["kernel"]["dtype"] != "F64" else "F32")), "do not hold its shape"),
        "shape with a bool": (edit(lambda h: h["kernel"].update(shape=[True, h["kernel"]["shape"][1]])), "a shape is a list of integers"),
        "shape with a float": (edit(lambda h: h["kernel"].update(shape=[3.0, h["kernel"]["shape"][1]])), "a shape is a list of integers"),
        "shape negative": (edit(lambda h: h["kernel"].update(shape=[-3, h["kernel"]["shape"][1]])), "a shape is a list of integers"),
        "shape 2**32 x 2**32": (edit(lambda h: h["kernel"].update(shape=[2**32, 2**32])), r"in \[0, 2147483647\]"),
        "shape 2**31 x 0": (edit(lambda h: h["kernel"].update(shape=[2**31, 0], data_offsets=[0, 0])), r"in \[0, 2147483647\]"),
        "shape rank 3": (edit(lambda h: h["kernel"].update(shape=h["kernel"]["shape"] + [1])), "kernel is 2-D"),
        "shape rank 0": (edit(lambda h: h["bias"].update(shape=[])), "bias is 1-D"),
        "shape transposed": (edit(lambda h: h["kernel"].update(shape=h["kernel"]["shape"][::-1])), "do not match the spec"),
        "shape of another width": (edit(lambda h: h["bias"].update(shape=[h["bias"]["shape"][0] + 1])), "do not hold its shape"),
        "offsets as strings": (edit(lambda h: h["kernel"].update(data_offsets=["0", "8"])), "two integers"),
        "offsets with a bool": (edit(lambda h: h["kernel"].update(data_offsets=[False, h["kernel"]["data_offsets"][1]])), "two integers"),
        "offsets negative": (edit(lambda h: h["kernel"].update(data_offsets=[-4, h["kernel"]["data_offsets"][1] - 4])), "do not hold"),
        "offsets reversed": (edit(lambda h: h["kernel"].update(data_offsets=h["kernel"]["data_offsets"][::-1])), "do not hold"),
        "offsets overlapping": (edit(lambda h: h["bias"].update(data_offsets=[0, h["bias"]["data_offsets"][1] - h["bias"]["data_offsets"][0]])), "without gaps or overlaps"),
        "offsets three": (edit(lambda h: h["kernel"].update(data_offsets=[0, 1, 2])), "two integers"),
        "tensor entry not an object": (edit(lambda h: h.update(bias=[1, 2])), "no tensor 'bias'"),
        "tensor entry extra field": (edit(lambda h: h["bias"].update(extra=1)), "unknown fields"),
        "extra tensor": (edit(lambda h: h.update(other={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})), r"unexpected tensors \['other'\]"),
        "missing kernel": (edit(lambda h: h.pop("kernel")), "no tensor 'kernel'"),
    }


def test_hostile_head_files_are_refused_with_a_head_file_error(files):
    raws, path = files
    for raw in raws[:3]:
        header, data = _split(raw)
        for name, (bad, match) in _header_cases(header, data).items():
            path.write_bytes(bad)
            t = time.perf_counter()
            with pytest.raises(HeadFileError, match=match) as info:
                unihead.load(path)
            assert time.perf_counter() - t < 2.0, name
            assert len(str(info.value)) < 2000, name


def test_a_head_file_and_its_data_are_read_as_they_are(files):
    """The unmodified files load, with the 8-byte alignment padding save() adds, and the reader
    accepts the header's keys in any order (as safetensors writers differ)."""
    raws, path = files
    for raw in raws:
        header, data = _split(raw)
        assert (8 + struct.unpack("<Q", raw[:8])[0]) % 8 == 0
        _load_or_refuse(path, raw)
        reordered = {k: header[k] for k in reversed(list(header))}
        path.write_bytes(_join(reordered, data))
        assert unihead.load(path).head == H.from_json(header["__metadata__"]["spec"])


def test_save_refuses_a_header_over_the_safetensors_limit(tmp_path, monkeypatch):
    """The limit on a header (100 MB, safetensors' own) is the same on save and load: a head file
    unihead writes, it reads."""
    head = H.multiclass(50, class_weights=[1.0] * 50)
    w = _weights(head, 2, np.float32)
    unihead.save(tmp_path / "ok.safetensors", head, w)
    n = struct.unpack("<Q", (tmp_path / "ok.safetensors").read_bytes()[:8])[0]
    monkeypatch.setattr(headfile, "_MAX_HEADER", n - 1)
    with pytest.raises(ValueError, match="more than a safetensors header may hold"):
        unihead.save(tmp_path / "big.safetensors", head, w)
    assert not (tmp_path / "big.safetensors").exists()
    with pytest.raises(HeadFileError, match="header length field says"):
        unihead.load(tmp_path / "ok.safetensors")


# ------------------------------------------------------------------------------ head files: fuzz
@st.composite
def mutated_files(draw, raws):
    raw = draw(st.sampled_from(raws))
    header, data = _split(raw)
    op = draw(st.sampled_from(["flip", "flip_data", "truncate", "append", "length", "header_value",
                               "spec_value", "spec_text"]))
    if op == "flip":  # anywhere: the length field, the header, the tensors
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if op == "flip_data":  # in a weight: a valid file (NaN and infinity included)
        i = draw(st.integers(len(raw) - len(data), len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if op == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if op == "append":
        return raw + draw(st.binary(min_size=1, max_size=16))
    if op == "length":
        n = draw(st.integers(0, 2**64 - 1) | st.integers(0, len(raw)))
        return struct.pack("<Q", n) + raw[8:]
    if op == "header_value":  # one entry of the header replaced by any JSON value
        h = json.loads(json.dumps(header))
        where = draw(st.sampled_from([("kernel", "dtype"), ("kernel", "shape"), ("kernel", "data_offsets"),
                                      ("bias", "dtype"), ("bias", "shape"), ("bias", "data_offsets"),
                                      ("__metadata__", "format"), ("__metadata__", "format_version"),
                                      ("__metadata__", "spec"), ("kernel",), ("bias",), ("__metadata__",)]))
        value = draw(json_values() | st.integers(-(2**64), 2**64).map(lambda i: [i, i]))
        if len(where) == 1:
            h[where[0]] = value
        else:
            h[where[0]][where[1]] = value
        return _join(h, data)
    if op == "spec_value":  # one spec field replaced by a hostile JSON fragment
        h = json.loads(json.dumps(header))
        head = H.from_json(h["__metadata__"]["spec"])
        key = draw(st.sampled_from(sorted(head.to_dict()) + ["extra"]))
        fragment = draw(st.sampled_from([r for r in RAW_VALUES if len(r) < 10_000])
                        | json_values().map(json.dumps))
        h["__metadata__"]["spec"] = _spec_text_with(head, key, fragment)
        return _join(h, data)
    # the spec text cut or spliced
    h = json.loads(json.dumps(header))
    text = h["__metadata__"]["spec"]
    i = draw(st.integers(0, len(text)))
    h["__metadata__"]["spec"] = text[:i] + draw(st.text(max_size=6)) + text[i + draw(st.integers(0, 6)):]
    return _join(h, data)


def test_fuzzed_head_files_load_validly_or_raise_head_file_error(files):
    raws, path = files

    @FUZZ
    @given(mutated_files(raws))
    def run(raw):
        _load_or_refuse(path, raw)

    run()
