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
import math
import os
import struct
from typing import Any, Callable, NamedTuple

import numpy as np

from ._version import __version__
from .compiled import canonical_weights, host_weights
from .errors import HeadFileError, HeadSpecError
from ._untrusted import loads as _loads, show as _show
from .spec import MAX_INDEX, ClassificationHead

__all__ = ["save", "load", "HeadFile", "FORMAT", "FORMAT_VERSION"]

FORMAT = "unihead.head"
FORMAT_VERSION = "1"
_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
_NAMES = {v.newbyteorder("="): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


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
    if len(text) > _MAX_HEADER:
        raise ValueError(f"the head's spec is {len(text)} bytes of JSON, more than a safetensors "
                         f"header may hold ({_MAX_HEADER}): too many class weights to save in a head file.")
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def load(path: str | os.PathLike) -> HeadFile:
    """Read a head file written by :func:`save` (or by any safetensors writer with unihead's
    metadata); returns ``HeadFile(head, weights)``.

    Safe on untrusted files: anything that is not exactly a head file -- a header length that
    lies, a header that is not plain JSON (deep nesting, duplicate keys, huge integers, bytes that
    are not UTF-8), metadata that is not strings, an invalid spec, tensors of another dtype,
    rank or shape than the spec needs, offsets that overlap, leave gaps or run past the end,
    trailing bytes -- is refused with :class:`~unihead.errors.HeadFileError` saying what is
    wrong.  Only the header is read before it is checked."""
    name = os.fspath(path)

    def bad(msg: str) -> HeadFileError:
        return HeadFileError(f"{name}: {msg}")

    with open(name, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"too short to be a safetensors file ({len(prefix)} bytes; it starts with an "
                      f"8-byte header length).")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(_MAX_HEADER, size - 8):
            raise bad(f"the header length field says {n} bytes, but the file has {size - 8} after it "
                      f"(and safetensors headers are at most {_MAX_HEADER}): not a safetensors file.")
        header = _loads(f.read(n), error=bad, what="the safetensors header")
        if not isinstance(header, dict):
            raise bad(f"the safetensors header is a JSON {type(header).__name__}, not an object.")
        meta = header.pop("__metadata__", None)
        head = _head_of(meta, bad)
        entries = _tensor_entries(header, bad)
        data_size = size - 8 - n
        end = max(e[2] for e in entries.values())
        if end != data_size:
            raise bad(f"the tensors end at byte {end} of the data, but the file holds {data_size} "
                      f"bytes of data: " + ("truncated." if end > data_size else
                                             f"{data_size - end} bytes of trailing garbage."))
        data = f.read(data_size)
    if len(data) != data_size:  # the file changed while being read
        raise bad(f"the file shrank while being read ({len(data)} of {data_size} data bytes).")
    weights: dict[str, np.ndarray] = {}
    for key, (dtype, begin, end_, shape) in entries.items():
        weights[key] = np.frombuffer(data, dtype=dtype, count=(end_ - begin) // dtype.itemsize,
                                     offset=begin).reshape(shape).astype(dtype.newbyteorder("="))
    try:
        canonical_weights(head, None, weights)
    except (ValueError, TypeError) as e:
        raise bad(f"the tensors do not match the spec {head!r}: {e}") from None
    return HeadFile(head, weights)


def _head_of(meta: Any, bad: Callable[[str], HeadFileError]) -> ClassificationHead:
    """The spec in a header's ``__metadata__`` (a ``{str: str}`` object, as safetensors requires)."""
    if not isinstance(meta, dict) or "spec" not in meta:
        raise bad(
            "no unihead metadata: this is a safetensors file, but not a head file (it has no 'spec' "
            "entry in __metadata__). Write head files with unihead.save(path, head, weights)."
        )
    for key, value in meta.items():
        if not isinstance(value, str):
            raise bad(f"__metadata__[{_show(key)}] is a {type(value).__name__}; safetensors metadata "
                      f"values are strings.")
    if meta.get("format") != FORMAT:
        raise bad(f"metadata format is {_show(meta.get('format'))}, not {FORMAT!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise bad(f"head file format version {_show(meta.get('format_version'))}; this unihead reads "
                  f"version {FORMAT_VERSION}. Upgrade unihead.")
    try:
        return ClassificationHead.from_json(meta["spec"])
    except HeadSpecError as e:
        raise bad(f"the spec in the metadata is not valid: {e}") from None


def _tensor_entries(
    header: dict[str, Any], bad: Callable[[str], HeadFileError]
) -> dict[str, tuple[np.dtype, int, int, tuple[int, ...]]]:
    """``{"kernel", "bias"}`` -> ``(dtype, begin, end, shape)``, checked: known dtype, the rank
    of a head's tensors, widths an int32 can index, sizes that match the offsets, and offsets that tile the data from
    byte 0 without gaps or overlaps (as safetensors requires)."""
    extra = sorted(set(header) - {"kernel", "bias"})
    if extra:
        raise bad(f"unexpected tensors {_show(extra)}: a head file holds only 'kernel' and 'bias'.")
    entries = {}
    for key, rank in (("kernel", 2), ("bias", 1)):
        info = header.get(key)
        if not isinstance(info, dict):
            raise bad(f"no tensor {key!r} (a head file holds 'kernel' and 'bias').")
        unknown = sorted(set(info) - {"dtype", "shape", "data_offsets"})
        if unknown:
            raise bad(f"tensor {key!r} has unknown fields {_show(unknown)}; a safetensors entry has "
                      f"'dtype', 'shape' and 'data_offsets'.")
        code, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        dtype = _DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise bad(f"tensor {key!r} has dtype {_show(code)}; head files hold F16, F32 or F64.")
        if not (isinstance(shape, list) and all(_is_index(s) for s in shape)):
            raise bad(f"tensor {key!r} has shape {_show(shape)}; a shape is a list of integers in "
                      f"[0, {MAX_INDEX}].")
        if len(shape) != rank:
            raise bad(f"tensor {key!r} has shape {shape}; a head file's {key} is "
                      + ("2-D (in_features, num_outputs)." if rank == 2 else "1-D (num_outputs,)."))
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                  for o in offs)):
            raise bad(f"tensor {key!r} has data_offsets {_show(offs)}; they are [begin, end], two integers.")
        begin, end = offs
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise bad(f"tensor {key!r}: data_offsets {offs} do not hold its shape {shape} and dtype "
                      f"{code} ({nbytes} bytes).")
        entries[key] = (dtype, begin, end, tuple(shape))
    spans = sorted((e[1], e[2], k) for k, e in entries.items())
    at = 0
    for begin, end, key in spans:
        if begin != at:
            raise bad(f"tensor {key!r} starts at data byte {begin}, but the previous one ends at {at}: "
                      f"the tensors must follow each other without gaps or overlaps.")
        at = end
    return entries


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INDEX
