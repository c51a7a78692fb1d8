"""Reading untrusted input: strict JSON (:func:`loads`) and short, safe displays of the values it
holds (:func:`show`), shared by spec texts (``ClassificationHead.from_json``) and head files
(``unihead.load``).

Untrusted text must end in unihead's own error, whatever it holds: the standard ``json`` module
raises ``RecursionError`` on deeply nested text (or overflows the C stack when the recursion limit
has been raised), ``ValueError`` on integers of more than 4300 digits, and silently keeps the last
of duplicate keys; error messages that quote a value must not print megabytes, nor fail on an
integer too long for ``str()``.
"""

from __future__ import annotations

import json
import re
import reprlib
from typing import Any, Callable

__all__ = ["loads", "show"]

#: The deepest nesting any unihead JSON needs is 3 (a head file's header: object > object >
#: list); this leaves room and stays far from Python's recursion limit.
MAX_DEPTH = 32
#: No integer in unihead JSON needs more digits than this (the bounds are int32/int64 values and
#: byte offsets); longer ones are refused before ``int()`` is asked to convert them.
MAX_INT_DIGITS = 40

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _bracket_depth(text: bytes) -> int:
    import numpy as np

    codes = np.frombuffer(text.translate(None, _NOT_BRACKETS), np.int8)
    # "[" (91) and "{" (123) have bit 1 set, "]" (93) and "}" (125) do not: +1 opens, -1 closes
    steps = (codes & 2).astype(np.int32) - 1
    return int(np.cumsum(steps).max(initial=0))


def _depth(text: bytes, limit: int) -> int:
    """Greatest nesting depth of ``[``/``{`` outside strings, once it may exceed ``limit``
    (linear and in C: ``bytes.translate``, a regex, NumPy)."""
    depth = _bracket_depth(text)  # counting brackets inside strings too: an upper bound
    if depth > limit and b'"' in text:
        depth = _bracket_depth(_STRING.sub(b"", text))
    return depth


def loads(text: str | bytes, *, error: Callable[[str], Exception], what: str) -> Any:
    """``json.loads(text)`` that accepts only plain JSON and raises ``error(message)`` for
    anything else: bytes that are not UTF-8, NaN/Infinity, duplicate keys in an object, integers
    of more than :data:`MAX_INT_DIGITS` digits, nesting deeper than :data:`MAX_DEPTH`.  ``what``
    names the text in the messages ("Head JSON", "the safetensors header")."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(
                f"{what} is not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r}): "
                f"write it as UTF-8 JSON."
            ) from None
    elif isinstance(text, str):
        raw = None
    else:
        raise error(f"{what} must be a str or bytes holding JSON, got {type(text).__name__}.")

    # only count brackets when there are enough of them to nest too deeply (never, for real text)
    if text.count("[") + text.count("{") > MAX_DEPTH:
        if raw is None:
            raw = text.encode("utf-8", "surrogatepass")
        depth = _depth(raw, MAX_DEPTH)
        if depth > MAX_DEPTH:
            raise error(
                f"{what} nests arrays/objects {depth} levels deep; unihead's JSON never nests more "
                f"than a few levels (at most {MAX_DEPTH} are read). This is not a unihead file."
            )

    def constant(name: str) -> Any:
        raise error(f"{what} contains {name}, which is not a valid value here: write a finite number.")

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise error(
                f"{what} contains an integer of {len(digits.lstrip('-'))} digits "
                f"({digits[:12]}...); no value in it can be that large."
            )
        return int(digits)

    def obj(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise error(
                    f"{what} has the key {show(key)} twice in one object; JSON readers disagree on "
                    f"which one counts, so unihead reads neither. Keep one."
                )
            out[key] = value
        return out

    try:
        return json.loads(text, parse_constant=constant, parse_int=integer, object_pairs_hook=obj)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON: {e}.") from None
    except RecursionError:  # only when called with the stack already nearly full
        raise error(f"{what} is nested too deeply to be read here.") from None


class _Repr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = 60
        self.maxother = 60
        self.maxlist = self.maxtuple = 8
        self.maxdict = 6

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # str() of a long integer is quadratic (and refused over 4300 digits)
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _Repr()


def show(value: Any) -> str:
    """``repr(value)`` cut to a readable length: at most ~60 characters of a string, 8 items of a
    list, 3 levels of nesting; never fails."""
    try:
        return _REPR.repr(value)
    except Exception:  # a hostile __repr__; the type is enough to say what is wrong
        return f"<{type(value).__name__}>"
