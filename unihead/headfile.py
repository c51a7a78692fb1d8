"""Head files: one ``.safetensors`` file holding a head's weights in the canonical layout
(``kernel (in, out)``, ``bias (out,)``) and its spec as JSON in the file's metadata.

The format is plain safetensors (an 8-byte little-endian header length, a JSON header, the raw
little-endian tensor bytes), written and read here without the ``safetensors`` package, so
``import unihead`` stays dependency-free; any safetensors reader (``safetensors.numpy.load_file``,
``safetensors.torch.load_file``, ``safe_open``) reads the tensors, and the metadata's ``spec``
is ``ClassificationHead.to_json()``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, NamedTuple

import numpy as np

from ._version import __version__
from .compiled import canonical_weights, host_weights
from .errors import HeadFileError, HeadSpecError
from .spec import ClassificationHead

__all__ = ["save", "load", "HeadFile", "FORMAT", "FORMAT_VERSION"]

FORMAT = "unihead.head"
FORMAT_VERSION = "1"
_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_NAMES = {v.newbyteorder("="): k for k, v in _DTYPES.items()}
_MAX_HEADER = 16 * 2**20


class HeadFile(NamedTuple):
    """What :func:`load` returns: the spec and ``{"kernel": (in, out), "bias": (out,)}``."""

    head: ClassificationHead
    weights: dict[str, np.ndarray]


def save(path: str | os.PathLike, head: ClassificationHead, weights: Any) -> None:
    """Write ``head`` and its ``weights`` (``{"kernel", "bias"}`` or a pair, canonical layout;
    float16/32/64, kept as they are) to ``path`` as a safetensors file."""
    if not isinstance(head, ClassificationHead):
        raise TypeError(f"save() takes a ClassificationHead, got {type(head).__name__}.")
    kernel, bias = canonical_weights(head, None, host_weights(weights))
    tensors = {"kernel": kernel, "bias": bias}
    header: dict[str, Any] = {
        "__metadata__": {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": head.to_json(),
            "layout": "kernel (in_features, num_outputs), bias (num_outputs,)",
            "unihead_version": __version__,
        }
    }
    blobs, offset = [], 0
    for name, arr in tensors.items():
        dt = arr.dtype.newbyteorder("=")
        if dt not in _NAMES:
            raise TypeError(f"{name} must be float16, float32 or float64 to be saved; got {arr.dtype}.")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> HeadFile:
    """Read a head file written by :func:`save`; returns ``HeadFile(head, weights)``.  Refuses a
    file without unihead metadata, with a malformed header or spec, or whose tensors do not have
    the shapes the spec needs (:class:`~unihead.errors.HeadFileError`)."""
    name = os.fspath(path)
    with open(name, "rb") as f:
        raw = f.read()

    def bad(msg: str) -> HeadFileError:
        return HeadFileError(f"{name}: {msg}")

    if len(raw) < 8:
        raise bad("too short to be a safetensors file.")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(_MAX_HEADER, len(raw) - 8):
        raise bad(f"header length {n} does not fit the file ({len(raw)} bytes): not a safetensors file.")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the safetensors header is not valid JSON ({e}).") from None
    if not isinstance(header, dict):
        raise bad("the safetensors header is not a JSON object.")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or "spec" not in meta:
        raise bad(
            "no unihead metadata: this is a safetensors file, but not a head file (it has no 'spec' "
            "entry in __metadata__). Write head files with unihead.save(path, head, weights)."
        )
    if meta.get("format") != FORMAT:
        raise bad(f"metadata format is {meta.get('format')!r}, not {FORMAT!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise bad(f"head file format version {meta.get('format_version')!r}; this unihead reads "
                  f"version {FORMAT_VERSION}. Upgrade unihead.")
    try:
        head = ClassificationHead.from_json(meta["spec"])
    except (HeadSpecError, TypeError, ValueError) as e:
        raise bad(f"the spec in the metadata is not valid: {e}") from None
    data = memoryview(raw)[8 + n:]
    weights: dict[str, np.ndarray] = {}
    for key in ("kernel", "bias"):
        info = header.get(key)
        if not isinstance(info, dict):
            raise bad(f"no tensor {key!r} (a head file holds 'kernel' and 'bias').")
        dtype = _DTYPES.get(info.get("dtype"))
        shape, offs = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise bad(f"tensor {key!r} has dtype {info.get('dtype')!r}; head files hold F16, F32 or F64.")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)
                and isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise bad(f"tensor {key!r} has a malformed entry {info!r}.")
        begin, end = offs
        if not 0 <= begin <= end <= len(data) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise bad(f"tensor {key!r}: offsets {offs} do not match its shape {shape} and dtype "
                      f"{info['dtype']} (or run past the end of the file).")
        weights[key] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    extra = sorted(set(header) - {"kernel", "bias"})
    if extra:
        raise bad(f"unexpected tensors {extra}: a head file holds only 'kernel' and 'bias'.")
    try:
        canonical_weights(head, None, weights)
    except (ValueError, TypeError) as e:
        raise bad(f"the tensors do not match the spec {head!r}: {e}") from None
    return HeadFile(head, weights)
