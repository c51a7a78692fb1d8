"""``unihead diagnose`` and ``unihead port``: reading model files from the command line.

Nothing on the command line or in a model file runs as code unless the user says so:

* ``--loss`` is *parsed* (:mod:`ast`), never evaluated: a loss class unihead reads (or a Keras
  loss name) called with literal arguments only.  Anything else is refused before any file is
  opened, with the list of what is accepted.
* PyTorch files are read with ``torch.load(weights_only=True)``: tensors and plain containers
  (a ``state_dict``, a checkpoint dict holding one).  A module saved whole (``torch.save(model)``)
  is a pickle, and unpickling runs whatever code the file names: it is loaded only with
  ``--trust-pickle``.
* Keras files are loaded with ``safe_mode=True`` (no lambda code is deserialised).

What a file cannot say is said in the output: a ``state_dict`` has no activation (``--activation``
states it), a PyTorch file has no criterion and a Keras file saved before ``compile`` no loss
(``--loss`` gives it; without it the output says what was not checked).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import inspect
import math
import os
import pickle
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, NoReturn

from ._readers import _KERAS_CLASSES, _KERAS_STRINGS, TORCH_CRITERIA


class UsageError(Exception):
    """A mistake on the command line or an unreadable file: ``unihead COMMAND: error: ...``, exit 2."""


_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_HEAD_SUFFIXES = (".safetensors",)
_MODEL_HELP = ("a Keras model file (.keras, .h5); a PyTorch state_dict or checkpoint saved with torch.save "
               "(.pt, .pth, .ckpt, .bin); a PyTorch module saved whole (needs --trust-pickle)")
_ACTIVATIONS = ("none", "softmax", "sigmoid", "log_softmax")


def _choose_keras_backend() -> None:
    """Keras picks its backend once per process: keep the user's KERAS_BACKEND, else take the
    first installed of JAX, PyTorch, TensorFlow (the one that imports fastest first)."""
    if os.environ.get("KERAS_BACKEND"):
        return
    for name, module in (("jax", "jax"), ("torch", "torch"), ("tensorflow", "tensorflow")):
        if importlib.util.find_spec(module) is not None:
            os.environ["KERAS_BACKEND"] = name
            return


# ------------------------------------------------------------------------------ --loss
_MAX_LOSS_CHARS = 20_000  # class weights for a thousand classes fit; a megabyte of text does not
_MAX_ITEMS = 4096  # elements of one list argument
_MAX_STRING = 100  # characters of one string argument
_MAX_INT = 2**63  # |int| arguments (ignore_index, axis)
_PREFIXES = {"torch": ("", "nn.", "torch.nn."), "keras": ("", "keras.losses.", "tf.keras.losses.")}
_TENSOR = "torch.tensor"


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """``torch.tensor(values)`` in a ``--loss`` argument; made when the loss is built."""

    values: Any  # a number, or a list/tuple of numbers


def _q(text: str) -> str:
    """A Python string literal for ``text``, in double quotes when that needs no escape."""
    r = repr(text)
    return r if r[0] == '"' or '"' in text else f'"{r[1:-1]}"'  # a single-quoted repr has no ' inside


def _code(value: Any) -> str:
    """Python source of a parsed literal (``repr`` of a float round-trips exactly)."""
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, _Tensor):
        return f"{_TENSOR}({_code(value.values)})"
    if isinstance(value, list):
        return "[" + ", ".join(_code(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_code(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class LossText:
    """A ``--loss`` argument, parsed: a loss class of ``framework`` (``is_class``) with literal
    arguments, or a Keras loss name.  :meth:`build` makes the loss object, :meth:`code` writes it
    as Python (for the snippets ``unihead port`` prints)."""

    framework: str  # "torch" | "keras"
    name: str  # "CrossEntropyLoss", "SparseCategoricalCrossentropy" or "binary_crossentropy"
    is_class: bool
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def code(self) -> str:
        if not self.is_class:
            return _q(self.name)
        prefix = "torch.nn." if self.framework == "torch" else "keras.losses."
        parts = [_code(a) for a in self.args] + [f"{k}={_code(v)}" for k, v in self.kwargs]
        return f"{prefix}{self.name}({', '.join(parts)})"

    def build(self) -> Any:
        if not self.is_class:
            return self.name  # read by name, as Keras' model.compile(loss="...") takes it
        if self.framework == "torch":
            import torch

            cls = getattr(torch.nn, self.name)

            def value(v: Any) -> Any:
                return torch.tensor(v.values) if isinstance(v, _Tensor) else v
        else:
            _choose_keras_backend()
            import keras

            cls = getattr(keras.losses, self.name)

            def value(v: Any) -> Any:
                return v
        args = [value(a) for a in self.args]
        kwargs = {k: value(v) for k, v in self.kwargs}
        try:
            inspect.signature(cls).bind(*args, **kwargs)
        except TypeError as e:
            params = ", ".join(p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs"))
            raise UsageError(f"--loss {self.code()}: {e}. {self.name} takes: {params}.") from None
        try:
            return cls(*args, **kwargs)
        except (TypeError, ValueError, RuntimeError) as e:
            hint = " (write a tensor as torch.tensor([...]))" if self.framework == "torch" else ""
            raise UsageError(f"--loss {self.code()}: {self.name} refused its arguments: {e}{hint}") from None


def accepted_losses(framework: str) -> str:
    """What ``--loss`` takes for a ``framework`` ("torch" | "keras") model: the refusal's second half."""
    literals = "numbers, strings, True/False/None, lists or tuples of numbers"
    if framework == "torch":
        names = ", ".join(f"nn.{n}" for n in TORCH_CRITERIA)
        return (f"--loss takes a PyTorch criterion unihead reads, written as in Python: {names} (or torch.nn.X, "
                f"or X), without arguments or called with literal arguments ({literals}, and {_TENSOR}([numbers])).\n"
                "For example: --loss \"nn.CrossEntropyLoss(label_smoothing=0.1)\", "
                "--loss \"nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))\"")
    names = ", ".join(sorted(_KERAS_STRINGS))
    classes = ", ".join(_KERAS_CLASSES)
    return (f"--loss takes a Keras loss unihead reads: a name ({names}), or a class ({classes}; or "
            f"keras.losses.X) without arguments or called with literal arguments ({literals}).\n"
            "For example: --loss categorical_crossentropy, "
            "--loss \"keras.losses.SparseCategoricalCrossentropy(from_logits=True)\"")


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _source_of(node: ast.AST) -> str:
    try:
        return _short(ast.unparse(node))
    except (RecursionError, ValueError):
        return type(node).__name__


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of plain names, else None (calls, indexing, ... are not names)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _what(node: ast.AST) -> str:
    """A refused expression, in words."""
    kinds = {ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
             ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator", ast.JoinedStr: "an f-string",
             ast.Subscript: "indexing", ast.BinOp: "arithmetic", ast.BoolOp: "a boolean expression",
             ast.Compare: "a comparison", ast.IfExp: "a conditional expression", ast.Dict: "a dict",
             ast.Set: "a set", ast.NamedExpr: "an assignment", ast.Starred: "unpacking", ast.Await: "await"}
    if isinstance(node, ast.Call):
        name = _dotted(node.func)
        return f"a call to {name or _source_of(node.func)}"
    if isinstance(node, (ast.Name, ast.Attribute)):
        name = _dotted(node)
        return f"the name {name}" if name else f"attribute access ({_source_of(node)})"
    return kinds.get(type(node), f"a {type(node).__name__} expression")


def parse_loss(text: str, framework: str) -> LossText:
    """Parse a ``--loss`` argument for a ``framework`` ("torch" | "keras") model without running
    any of it; raise :class:`UsageError` (with what is accepted) for anything but a known loss
    with literal arguments."""

    def refuse(why: str) -> NoReturn:
        raise UsageError(f"--loss {_short(text)!r} is refused: {why}.\n{accepted_losses(framework)}")

    if len(text) > _MAX_LOSS_CHARS:
        refuse(f"it is {len(text)} characters long (at most {_MAX_LOSS_CHARS})")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        refuse("it is not a Python expression")

    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "binary_crossentropy"
        if framework == "keras" and node.value in _KERAS_STRINGS:
            return LossText("keras", node.value, False)
        if framework == "keras" and node.value in _KERAS_CLASSES:  # compile(loss="BinaryCrossentropy")
            return LossText("keras", node.value, True)
        refuse(f"{node.value!r} is not a loss name unihead reads")
    call = node if isinstance(node, ast.Call) else None
    name = _dotted(call.func if call else node)
    if name is None:
        refuse(f"it is {_what(node)}, not a loss")
    prefix, _, last = name.rpartition(".")
    known_class = last in (TORCH_CRITERIA if framework == "torch" else _KERAS_CLASSES)
    known_name = framework == "keras" and last in _KERAS_STRINGS  # keras.losses.binary_crossentropy
    if (prefix + "." if prefix else "") not in _PREFIXES[framework] or not (known_class or known_name):
        other = "keras" if framework == "torch" else "torch"
        if last in (TORCH_CRITERIA if other == "torch" else (*_KERAS_CLASSES, *_KERAS_STRINGS)):
            refuse(f"{name} is a {'PyTorch' if other == 'torch' else 'Keras'} loss, and this model is "
                   f"a {'PyTorch' if framework == 'torch' else 'Keras'} one")
        refuse(f"{'it calls ' if call else ''}{name}, which is not a loss unihead reads")
    if known_name:
        if call is not None:
            refuse(f"{name} is a function: give its name ({last!r}) or call the class instead")
        return LossText("keras", last, False)
    if call is None:
        return LossText(framework, last, True)
    args = tuple(_literal(a, framework, f"argument {i + 1}", refuse) for i, a in enumerate(call.args))
    kwargs = []
    for kw in call.keywords:
        if kw.arg is None:
            refuse(f"**{_source_of(kw.value)} unpacks keywords: write each one as name=value")
        kwargs.append((kw.arg, _literal(kw.value, framework, kw.arg, refuse)))
    return LossText(framework, last, True, args, tuple(kwargs))


def _number(node: ast.AST) -> int | float | None:
    """The value of a number literal (``-0.5`` included), or None for anything else."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return sign * node.value
    return None


def _literal(node: ast.AST, framework: str, where: str, refuse: Callable[[str], NoReturn]) -> Any:
    """A literal argument: a number, string, bool or None, a flat list/tuple of numbers, or
    (PyTorch) ``torch.tensor(<number or list of numbers>)``; anything else is refused."""

    def number(n: ast.AST) -> int | float:
        v = _number(n)
        if v is None:
            refuse(f"{where}: {_source_of(n)} is {_what(n)}; list elements must be numbers")
        return _checked(v)

    def _checked(v: int | float) -> int | float:
        if isinstance(v, float) and not math.isfinite(v) or isinstance(v, int) and abs(v) > _MAX_INT:
            refuse(f"{where}: {v!r:.40} is out of range (finite numbers, integers below 2**63)")
        return v

    def numbers(n: ast.AST) -> list | tuple:
        if len(n.elts) > _MAX_ITEMS:
            refuse(f"{where}: a list of {len(n.elts)} elements (at most {_MAX_ITEMS})")
        items = [number(e) for e in n.elts]
        return items if isinstance(n, ast.List) else tuple(items)

    if isinstance(node, ast.Constant):
        v = node.value
        if v is None or isinstance(v, bool):
            return v
        if type(v) in (int, float):
            return _checked(v)
        if isinstance(v, str):
            if len(v) > _MAX_STRING:
                refuse(f"{where}: a string of {len(v)} characters (at most {_MAX_STRING})")
            return v
        refuse(f"{where}: a {type(v).__name__} literal is not an argument a loss takes")
    v = _number(node)
    if v is not None:
        return _checked(v)
    if isinstance(node, (ast.List, ast.Tuple)):
        return numbers(node)
    if framework == "torch" and isinstance(node, ast.Call) and _dotted(node.func) == _TENSOR:
        if len(node.args) != 1 or node.keywords:
            refuse(f"{where}: {_TENSOR}(...) takes one list of numbers here (no other arguments)")
        inner = node.args[0]
        return _Tensor(numbers(inner) if isinstance(inner, (ast.List, ast.Tuple)) else number(inner))
    refuse(f"{where}={_source_of(node)} is {_what(node)}; arguments must be literals")


# ------------------------------------------------------------------------------ model files
@dataclasses.dataclass
class Source:
    """A model file as the command read it: ``model`` is what :func:`unihead.diagnose` and
    :func:`unihead.port` take (None for a head file); ``code`` rebuilds it in Python (for the
    snippets), ``notes`` say what the file could not tell and what was assumed."""

    path: str
    kind: str  # "keras" | "torch_module" | "state_dict" | "head_file"
    model: Any = None
    loss: LossText | None = None
    loss_object: Any = None
    notes: list[str] = dataclasses.field(default_factory=list)
    code: list[str] = dataclasses.field(default_factory=list)
    imports: list[str] = dataclasses.field(default_factory=list)

    @property
    def framework(self) -> str:
        return {"keras": "keras", "torch_module": "torch", "state_dict": "torch"}.get(self.kind, "numpy")


def load_source(path: str, loss_text: str | None, *, trust_pickle: bool = False,
                activation: str | None = None) -> Source:
    """Read ``path`` (the ``--loss`` text is parsed first: a refused loss opens no file)."""
    suffix = Path(path).suffix.lower()
    if suffix in _HEAD_SUFFIXES:
        if loss_text is not None or activation is not None:
            raise UsageError(f"{path} is a head file: its spec says what the layer outputs and how it is trained, "
                             "so --loss and --activation do not apply to it.")
        if not Path(path).is_file():
            raise UsageError(f"{path}: no such file.")
        return Source(path, "head_file")
    if suffix not in _KERAS_SUFFIXES + _TORCH_SUFFIXES:
        raise UsageError(f"{path}: unknown file type {suffix!r}; expected {_MODEL_HELP}, or a head file "
                         "(.safetensors) written by 'unihead port --out'.")
    framework = "keras" if suffix in _KERAS_SUFFIXES else "torch"
    loss = parse_loss(loss_text, framework) if loss_text is not None else None
    if activation is not None and framework == "keras":
        raise UsageError("--activation is for PyTorch state_dicts, which hold weights only; a Keras model "
                         "file records its activation.")
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file.")
    if framework == "keras":
        src = _load_keras(path)
    else:
        src = _load_torch(path, trust_pickle, activation)
    src.loss = loss
    src.loss_object = loss.build() if loss is not None else None
    return src


def _load_keras(path: str) -> Source:
    _choose_keras_backend()
    import warnings

    import keras

    import unihead  # noqa: F401 - registers unihead's Keras classes

    with warnings.catch_warnings():  # optimizer slots are irrelevant to the head
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        try:
            model = keras.saving.load_model(path, compile=True, safe_mode=True)
        except Exception as e:  # noqa: BLE001 - any failure to read the file is reported as such
            raise UsageError(f"{path}: Keras could not load it: {e}") from None
    return Source(path, "keras", model, code=[f"model = keras.saving.load_model({_q(path)})"], imports=["keras"])


def _load_torch(path: str, trust_pickle: bool, activation: str | None) -> Source:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        trusted = False
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise UsageError(_pickle_refusal(path)) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"{path}: torch.load could not read it: {_short(str(e).splitlines()[0], 300)}") from None
        trusted = True
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UsageError(f"{path}: torch.load could not read it: {_short(str(e).splitlines()[0], 300)}") from None
    if isinstance(obj, torch.nn.Module):
        if activation is not None:
            raise UsageError("--activation is for state_dicts, which hold weights only; a module saved whole "
                             "records its activation layers.")
        return Source(path, "torch_module", obj, imports=["torch"], code=[
            f"model = torch.load({_q(path)}, map_location=\"cpu\", weights_only=False)  "
            "# unpickles: only for files you trust"])
    if isinstance(obj, Mapping):
        return _state_dict_source(path, obj, activation, trusted)
    raise UsageError(f"{path} holds a {type(obj).__name__}, not a module or a state_dict: unihead reads "
                     "torch.save(model.state_dict(), path) (or a module saved whole, with --trust-pickle).")


def _pickle_refusal(path: str) -> str:
    """Why a file that needs the full unpickler is not loaded, what is in it, and what loads instead."""
    import torch

    names: list[str] | None = None
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if scan is not None:
        try:
            names = list(scan(path))  # reads the pickle's opcodes; runs nothing
        except Exception:  # noqa: BLE001 - not a zip-format torch.save file: damaged, foreign or legacy
            names = None
    if names is None:
        what = (f"{path}: torch.load(weights_only=True) cannot read it, and it is not a torch.save file whose "
                "contents unihead can list: a damaged or foreign file, or a module saved whole by an old "
                "PyTorch (legacy format)")
    elif any(n.startswith("torch.nn.") for n in names):
        what = (f"{path} is a PyTorch module saved whole (torch.save(model)), a pickle that names "
                f"{_short(', '.join(names), 300)}")
    else:
        what = f"{path} is a pickle that names Python objects to import and call: {_short(', '.join(names), 300)}"
    return (f"{what}.\nunihead does not unpickle it: unpickling runs whatever code the file names, with your "
            "permissions. If you trust where the file comes from, pass --trust-pickle to load it.\n"
            "These load without it: a state_dict (torch.save(model.state_dict(), path)), a head file "
            "(.safetensors, from 'unihead port --out'), a Keras .keras file.")


def _state_dict_in(path: str, obj: Mapping) -> tuple[str | None, Mapping]:
    """The state_dict in a loaded file: the mapping itself, or a checkpoint's ``state_dict`` /
    ``model_state_dict`` / ``model`` entry."""
    import torch

    def has_weights(m: Any) -> bool:
        return isinstance(m, Mapping) and any(torch.is_tensor(v) and v.ndim == 2 for v in m.values())

    if has_weights(obj):
        return None, obj
    for key in ("state_dict", "model_state_dict", "model"):
        if has_weights(obj.get(key)):
            return key, obj[key]
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise UsageError(f"{path} holds a dict ({keys}) with no layer weights: unihead reads a state_dict "
                     "(torch.save(model.state_dict(), path)), at the top level or under 'state_dict', "
                     "'model_state_dict' or 'model'.")


def _state_dict_source(path: str, obj: Mapping, activation: str | None, trusted: bool) -> Source:
    """The last linear layer of a state_dict as an ``nn.Linear`` (a unihead ``HeadLinear`` when the
    state_dict carries its spec), followed by ``--activation``: a state_dict has no activations."""
    import torch

    from .spec import ClassificationHead

    key, state = _state_dict_in(path, obj)
    found = None
    for name, v in state.items():
        if not (name == "weight" or name.endswith(".weight")) or not torch.is_tensor(v) or v.ndim != 2 \
                or not v.is_floating_point():
            continue
        prefix = name[: -len("weight")]
        b = state.get(prefix + "bias")
        if b is None or torch.is_tensor(b) and tuple(b.shape) == (v.shape[0],):
            found = prefix, v, b
    if found is None:
        raise UsageError(f"{path}: no linear layer in the state_dict (a 2-D floating-point '...weight' with "
                         "its '...bias'): unihead reads the last one as the output head.")
    prefix, w, b = found
    out_f, in_f = (int(n) for n in w.shape)
    extra = state.get(prefix + "_extra_state")
    state_expr = "state" if key is None else f"state[{_q(key)}]"
    code = [f"state = torch.load({_q(path)}, map_location=\"cpu\", weights_only=True)"]
    if trusted:
        code[0] = (f"state = torch.load({_q(path)}, map_location=\"cpu\", weights_only=False)  "
                   "# unpickles: only for files you trust")
    entries = {"weight": w} | ({"bias": b} if b is not None else {})
    dtype = "" if w.dtype == torch.float32 else f", dtype={w.dtype}"
    if isinstance(extra, str) and b is not None:  # a unihead HeadLinear: the spec travels as extra state
        try:
            head = ClassificationHead.from_json(extra)
        except (ValueError, TypeError) as e:
            raise UsageError(f"{path}: {prefix}_extra_state is not a valid unihead spec: {e}") from None
        from ._registry import compile

        linear = compile(head, "torch").layer(in_f, dtype=w.dtype)
        entries["_extra_state"] = extra
        code.append(f"head = unihead.ClassificationHead.from_json({state_expr}[{_q(prefix + '_extra_state')}])")
        code.append(f"linear = unihead.compile(head, \"torch\").layer({in_f}{dtype})")
    else:
        linear = torch.nn.Linear(in_f, out_f, bias=b is not None, dtype=w.dtype)
        code.append(f"linear = torch.nn.Linear({in_f}, {out_f}{'' if b is not None else ', bias=False'}{dtype})")
    try:
        linear.load_state_dict(entries)
    except (RuntimeError, ValueError) as e:  # a spec whose width is not the weights', ...
        raise UsageError(f"{path}: the weights of {prefix.rstrip('.') or 'the layer'} do not load into "
                         f"{type(linear).__name__}({in_f}, ...): {_short(str(e), 300)}") from None
    code.append("linear.load_state_dict({" + ", ".join(
        f"{_q(k)}: {state_expr}[{_q(prefix + k)}]" for k in entries) + "})")
    where = f"under {key!r} in {path}" if key is not None else f"in {path}"
    notes = [f"read: {prefix}weight {tuple(w.shape)}"
             + (f" and {prefix}bias" if b is not None else " (no bias)")
             + f", the last linear layer of the state_dict {where}"]
    act = activation or "none"
    modules = {"softmax": ("torch.nn.Softmax(dim=-1)", torch.nn.Softmax(dim=-1)),
               "sigmoid": ("torch.nn.Sigmoid()", torch.nn.Sigmoid()),
               "log_softmax": ("torch.nn.LogSoftmax(dim=-1)", torch.nn.LogSoftmax(dim=-1))}
    if act == "none":
        model = linear
        code.append("model = linear")
    else:
        text, module = modules[act]
        model = torch.nn.Sequential(linear, module)
        code.append(f"model = torch.nn.Sequential(linear, {text})")
    if activation is None:
        notes.append("assumed: nothing follows that layer, it outputs logits (a state_dict holds weights, not "
                     "activations); if a softmax, sigmoid or log-softmax follows it, say so with "
                     "--activation softmax|sigmoid|log_softmax")
    else:
        notes.append(f"activation after it: {act} (from --activation)")
    imports = ["torch"] + (["unihead"] if "_extra_state" in entries else [])
    return Source(path, "state_dict", model, notes=notes, code=code, imports=imports)


# ------------------------------------------------------------------------------ diagnose
def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help="load a PyTorch module saved whole (torch.save(model)). Such a file is a pickle, and "
                        "unpickling runs whatever code the file names: use this only for files you trust. "
                        "A state_dict, a head file or a .keras file loads without it.")
    p.add_argument("--activation", choices=_ACTIVATIONS,
                   help="for a PyTorch state_dict (weights only): what follows its last linear layer "
                        "(default: none, the layer outputs logits)")


_LOSS_HELP = ("the loss, if the model file has none (a PyTorch file never has one): a PyTorch criterion "
              "('nn.CrossEntropyLoss(label_smoothing=0.1)', 'nn.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0]))'), "
              "a Keras loss name ('categorical_crossentropy') or class "
              "('keras.losses.SparseCategoricalCrossentropy(from_logits=True)'), with literal arguments only: "
              "it is parsed, never run")


def add_diagnose(sub: Any) -> None:
    p = sub.add_parser(
        "diagnose", help="say what is wrong with a model's output head, and the fix",
        description="Read the model's last dense layer, its activation and its loss; print the findings "
                    "(error / warning / info) with the fix, and what could not be checked. Exit 1 when there "
                    "is an error.")
    p.add_argument("model", help=_MODEL_HELP + "; or a training script (.py: read, never run) to check how "
                   "its loss is combined over micro-batches")
    p.add_argument("--labels", help="a .npy file of training labels (enables the label checks)")
    p.add_argument("--loss", help=_LOSS_HELP)
    _add_source_options(p)
    p.set_defaults(func=run_diagnose)


_LOSS_EXAMPLES = {  # (framework, activation, one unit) -> an example --loss for the "to check" line
    ("torch", "linear", False): "nn.CrossEntropyLoss()", ("torch", "linear", True): "nn.BCEWithLogitsLoss()",
    ("torch", "softmax", False): "nn.CrossEntropyLoss()", ("torch", "sigmoid", False): "nn.BCELoss()",
    ("torch", "sigmoid", True): "nn.BCELoss()", ("torch", "log_softmax", False): "nn.NLLLoss()",
    ("keras", "linear", False): "keras.losses.SparseCategoricalCrossentropy(from_logits=True)",
    ("keras", "linear", True): "keras.losses.BinaryCrossentropy(from_logits=True)",
    ("keras", "softmax", False): "sparse_categorical_crossentropy", ("keras", "sigmoid", True): "binary_crossentropy",
    ("keras", "sigmoid", False): "binary_crossentropy",
}


def _not_checked(src: Source, args: argparse.Namespace, argv_path: str) -> str | None:
    """When the loss is missing (or is one unihead does not read): what that leaves unchecked and
    the command that checks it."""
    from ._diagnose import _PRODUCES
    from ._readers import read_model

    r = read_model(src.model, src.loss_object)
    if r.head is not None or r.loss is not None and r.loss.kind != "other":
        return None
    if r.loss is not None:
        why = f"the loss {r.loss.name} is not one unihead reads"
    elif src.framework == "torch":
        why = "a PyTorch file holds no criterion and none was given with --loss"
    else:
        why = "the Keras file has no compiled loss (saved before model.compile) and none was given with --loss"
    produces = _PRODUCES.get(r.activation, r.activation)
    fallback = "nn.CrossEntropyLoss()" if src.framework == "torch" else "sparse_categorical_crossentropy"
    example = _LOSS_EXAMPLES.get((src.framework, r.activation, r.units == 1), fallback)
    command = ["unihead", "diagnose", argv_path]
    if args.trust_pickle:
        command.append("--trust-pickle")
    if args.activation:
        command += ["--activation", args.activation]
    if args.labels:
        command += ["--labels", args.labels]
    command += ["--loss", example]
    return (f"NOT CHECKED: the loss. {why[0].upper() + why[1:]}, so whether it takes what {r.where} outputs "
            f"({produces}), and the options it carries (label smoothing, class weights, ignored labels), were "
            "not checked.\n"
            f"    to check them: {shlex.join(command)}\n"
            "    (with the loss you train with, as you write it in Python; --loss is parsed, never run)")


def run_diagnose(args: argparse.Namespace) -> int:
    import numpy as np

    from ._diagnose import diagnose, diagnose_code

    if Path(args.model).suffix.lower() == ".py":
        given = [o for o, v in (("--loss", args.loss), ("--labels", args.labels), ("--activation", args.activation),
                                ("--trust-pickle", args.trust_pickle)) if v]
        if given:
            raise UsageError(f"{args.model} is training code: {', '.join(given)} apply to a model file. For the "
                             "code, diagnose reads how the loss is combined over micro-batches.")
        try:
            source = Path(args.model).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{args.model}: cannot be read as UTF-8 Python source: {e}") from None
        d = diagnose_code(source, args.model)
        print(d)
        return 0 if d.ok else 1
    src = load_source(args.model, args.loss, trust_pickle=args.trust_pickle, activation=args.activation)
    if src.kind == "head_file":
        raise UsageError(f"{args.model} is a head file: its spec is unihead's own and was checked when it was "
                         "written; diagnose reads Keras and PyTorch models. unihead.load(path).head is its spec.")
    labels = None
    if args.labels:
        try:
            labels = np.load(args.labels, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"--labels {args.labels}: not a .npy array file NumPy can read without "
                             f"unpickling: {e}") from None
    d = diagnose(src.model, src.loss_object, labels=labels)
    print(d)
    for note in src.notes:
        print(f"  ({note})")
    unchecked = _not_checked(src, args, args.model)
    if unchecked:
        print(unchecked)
    return 0 if d.ok else 1


# ------------------------------------------------------------------------------ port
def add_port(sub: Any) -> None:
    p = sub.add_parser(
        "port", help="move a trained head to another framework (checked), or write it to a head file",
        description="Read a model's head (or a head file), check that the target framework gives the same "
                    "probabilities within 4 ulp, write a head file (--out) and print the Python that loads it "
                    "in the target framework (--to). Without --out nothing is written, and the Python printed "
                    "ports the head from the model file itself.")
    p.add_argument("source", help=_MODEL_HELP + "; or a head file (.safetensors) written by 'unihead port --out'")
    p.add_argument("--to", choices=["torch", "jax", "flax", "keras", "numpy"],
                   help="the framework to load the head in (checked here when it is installed)")
    p.add_argument("--out", help="write the head file (.safetensors: weights + spec)")
    p.add_argument("--loss", help="as for 'unihead diagnose'")
    p.add_argument("--binary-units", type=int, choices=[1, 2], help="convert a binary head to 1 or 2 units")
    _add_source_options(p)
    p.set_defaults(func=run_port)


_LAYERS = {"torch": "nn.Linear({d}, {k}) producing logits", "keras": "keras.layers.Dense({k}) producing logits",
           "jax": "logits = layer.apply(params, x)",
           "flax": "an nnx.Linear({d}, {k}) producing logits: logits = layer(x)", "numpy": "logits = layer(x)"}
_USAGE = {
    "torch": ["criterion = compiled.loss_fn()  # loss = criterion(layer(x), labels)",
              "# probabilities = compiled.probabilities(layer(x))"],
    "jax": ["# loss = compiled.loss(layer.apply(params, x), labels)",
            "# probabilities = compiled.probabilities(layer.apply(params, x))"],
    "flax": ["# loss = compiled.loss(layer(x), labels)  # in your nnx.Module: self.head = layer",
             "# probabilities = compiled.probabilities(layer(x))"],
    "keras": ["# model.compile(optimizer, **compiled.compile_kwargs())  # the head's loss and accuracy",
              "# probabilities = compiled.probabilities(layer(x))"],
    "numpy": ["# probabilities = compiled.probabilities(layer(x))"],
}


def port_snippet(src: Source, to: str, out: str | None, binary_units: int | None, d: int, k: int) -> str:
    """The Python that gives ``compiled`` and ``layer`` (and ``params`` in JAX) in ``to``: from the
    head file when there is one, else by porting from the model file as this command did."""
    layer_note = _LAYERS[to].format(d=d, k=k)
    if out is not None or src.kind == "head_file":
        intro = f"Load it in {to}:"
        imports = {"unihead"} | ({"jax"} if to == "jax" else set())
        path = out if out is not None else src.path
        body = [f"head, weights = unihead.load({_q(path)})",
                f"compiled = unihead.compile(head, {_q(to)})",
                f"layer = compiled.layer({d}, weights=weights)  # {layer_note}"]
        if to == "jax":
            body.append(f"params = layer.init(jax.random.key(0))  # the weights, Flax layout: "
                        f'{{"kernel": ({d}, {k}), "bias": ({k},)}}')
    else:
        needs = " and ".join(dict.fromkeys(("torch" if src.framework == "torch" else "keras", to)))
        intro = (f"Port it in Python (this needs {needs}; for a file that loads without "
                 f"{src.framework}, pass --out HEAD.safetensors):")
        imports = {"unihead", *src.imports}  # the source's framework: its loss is written with it too
        call = ["model", f"to={_q(to)}"]
        if src.loss is not None:
            call.append(f"loss={src.loss.code()}")
        if binary_units is not None:
            call.append(f"binary_units={binary_units}")
        body = [*src.code, f"ported = unihead.port({', '.join(call)})",
                f"compiled, layer = ported.compiled, ported.layer  # {layer_note}"]
        if to == "jax":
            body.append(f'params = ported.params  # Flax layout: {{"kernel": ({d}, {k}), "bias": ({k},)}}')
    lines = [f"import {m}" for m in sorted(imports)] + body + _USAGE[to]
    return intro + "\n\n" + "\n".join(lines)


def run_port(args: argparse.Namespace) -> int:
    from ._port import port
    from ._registry import BUILTIN_BACKENDS
    from .headfile import save

    if not args.to and not args.out:
        raise UsageError("give --to FRAMEWORK, --out HEAD.safetensors, or both.")
    src = load_source(args.source, args.loss, trust_pickle=args.trust_pickle, activation=args.activation)
    for note in src.notes:
        print(f"({note})")
    target = args.to or "numpy"
    framework = BUILTIN_BACKENDS[target][1]
    if framework is not None and importlib.util.find_spec(framework) is None:
        print(f"({target} is not installed here: checked with NumPy instead)")
        target = "numpy"
    if target == "keras":
        _choose_keras_backend()
    source = src.path if src.kind == "head_file" else src.model
    ported = port(source, to=target, loss=src.loss_object, binary_units=args.binary_units)
    print(ported.check)
    k = ported.head.num_outputs
    d = int(ported.weights["kernel"].shape[0])
    if args.out:
        save(args.out, ported.head, ported.weights)
        print(f"wrote {args.out}: {ported.head!r}, kernel ({d}, {k}), bias ({k},)")
    if args.to:
        print()
        print(port_snippet(src, args.to, args.out, args.binary_units, d, k))
    return 0
