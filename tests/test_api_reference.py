"""docs/api.md names the whole public API, with every signature as the code has it.

Introspects the package and each backend (the frameworks are imported: all are installed in CI)
and checks the reference page against it:

* every name in ``unihead.__all__``, and every public attribute (fields, properties, methods) of
  ``ClassificationHead``, ``CompiledHead``, each backend's compiled head and each backend's layer
  and loss classes, appears in code on the page;
* every public callable has its signature written out, exactly as ``inspect`` reads it (without
  type hints): a new argument, a renamed one or a changed default fails here until the page says
  it;
* each backend's row of the compile-options table lists exactly the keyword options its
  ``compile_head`` accepts, with their defaults;
* the deprecated names are in the table of deprecated names, with their replacements.

Runnable examples on the page are checked by tests/test_docs.py.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

import unihead
from unihead.spec import ClassificationHead

from .conftest import require

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api.md"


@pytest.fixture(scope="module")
def page() -> str:
    return API.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def code(page: str) -> str:
    """The page's code: inline spans and fenced blocks (where names are written as code)."""
    blocks = re.findall(r"^```\w*\n(.*?)^```", page, re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```\w*\n.*?^```", "", page, flags=re.S | re.M))
    return "\n".join(blocks + spans)


@pytest.fixture(scope="module")
def backends() -> dict:
    """Each backend's module (importing its framework)."""
    require("torch"), require("jax"), require("keras")
    from unihead.backends import jax as bj
    from unihead.backends import keras as bk
    from unihead.backends import numpy as bn
    from unihead.backends import torch as bt

    require("flax")
    from unihead.backends import flax as bf

    return {"numpy": bn, "torch": bt, "jax": bj, "flax": bf, "keras": bk}


# ----------------------------------------------------------------------------- rendering signatures
def _spell(value: object) -> str:
    """A default value as the page writes it."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # double quotes, as in the rest of the page's code
    if value is np.float32:
        return "np.float32"
    jnp = __import__("sys").modules.get("jax.numpy")
    if jnp is not None and value is jnp.float32:
        return "jnp.float32"
    raise AssertionError(f"no spelling for the default {value!r}: add one to _spell")


def signature(fn: object) -> str:
    """``(a, b=1, *, c=None, **kw)``: ``fn``'s parameters without type hints or ``self``/``cls``."""
    sig = inspect.signature(fn)
    out: list[str] = []
    star = False
    for i, p in enumerate(sig.parameters.values()):
        if i == 0 and p.name in ("self", "cls") and not isinstance(fn, staticmethod):
            continue
        if p.kind is p.VAR_POSITIONAL:
            out.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            out.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name if p.default is p.empty else f"{p.name}={_spell(p.default)}")
    return f"({', '.join(out)})"


def _unbound(cls: type, name: str) -> object:
    """The function ``cls.name`` as defined (``inspect.signature`` of the function, with ``self``)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            return attr.__func__ if isinstance(attr, (classmethod, staticmethod)) else attr
    raise AttributeError(name)


def documented_callables(b: dict) -> list[tuple[str, object]]:
    """(how the page writes the callable, the callable) for every public callable."""
    H, C = ClassificationHead, unihead.CompiledHead
    bn, bt, bj, bk, bf = b["numpy"], b["torch"], b["jax"], b["keras"], b["flax"]
    out: list[tuple[str, object]] = [
        ("unihead.compile", unihead.compile),
        ("unihead.available_backends", unihead.available_backends),
        ("unihead.set_validation", unihead.set_validation),
        ("unihead.validation", unihead.validation),
        ("unihead.save", unihead.save),
        ("unihead.load", unihead.load),
        ("unihead.infer", unihead.infer),
        ("unihead.diagnose", unihead.diagnose),
        ("unihead.diagnose_code", unihead.diagnose_code),
        ("unihead.port", unihead.port),
        ("ClassificationHead", H),
        ("CompiledHead", C),
    ]
    for name in ("binary", "multiclass", "multilabel", "from_labels", "replace", "with_binary_units",
                 "to_dict", "from_dict", "to_json", "from_json"):
        out.append((f"ClassificationHead.{name}", _unbound(H, name)))
    for name in ("probabilities", "log_probabilities", "loss", "predict", "loss_fn", "layer", "options"):
        out.append((f"compiled.{name}", _unbound(C, name)))
    # the compiled heads: constructors, and methods whose signature differs from the base class's
    for cls in (bn.NumpyHead, bt.TorchHead, bj.JaxHead, bf.FlaxHead, bk.KerasHead):
        out.append((cls.__name__, cls))
        for name in public(cls):
            fn = getattr(cls, name)
            if not callable(fn) or name in DEPRECATED:
                continue
            if hasattr(C, name) and signature(_unbound(cls, name)) == signature(_unbound(C, name)):
                continue  # the page's `compiled.<name>(...)` line is this one
            out.append((f"compiled.{name}", _unbound(cls, name)))
    # layers, losses, metrics
    out += [
        ("Dense", bn.Dense), ("dense.get_weights", bn.Dense.get_weights),
        ("dense.set_weights", bn.Dense.set_weights), ("dense.compiled", bn.Dense.compiled),
        ("HeadLinear", bt.HeadLinear), ("HeadLoss", bt.HeadLoss),
        ("criterion.forward", bt.HeadLoss.forward),
        ("global_normalizer", bt.global_normalizer), ("global_loss", bt.global_loss),
        ("Dense", bj.Dense), ("dense.init", bj.Dense.init), ("dense.apply", bj.Dense.apply),
        ("Dense.get_weights", _unbound(bj.Dense, "get_weights")),
        ("global_normalizer", bj.global_normalizer),
        ("dense.set_weights", bj.Dense.set_weights), ("dense.compiled", bj.Dense.compiled),
        ("HeadDense", bk.HeadDense), ("HeadLoss", bk.HeadLoss), ("HeadAccuracy", bk.HeadAccuracy),
        ("GradientAccumulation", bk.GradientAccumulation),
        ("HeadLinear", bf.HeadLinear.__init__), ("layer.get_canonical_weights", bf.HeadLinear.get_canonical_weights),
        ("layer.set_canonical_weights", bf.HeadLinear.set_canonical_weights),
        ("layer.compiled", bf.HeadLinear.compiled),
        ("HeadDense.get_canonical_weights", _unbound(bf.HeadDense, "get_canonical_weights")),
        ("dense.set_canonical_weights", bf.HeadDense.set_canonical_weights),
        ("dense.compiled", bf.HeadDense.compiled),
    ]
    return out


def public(cls: type, stop: tuple[type, ...] = ()) -> list[str]:
    """Public attributes ``cls`` defines or inherits from unihead classes, except those of
    ``stop``, the framework's base classes (``nn.Linear``'s methods, and unihead's overrides of
    them such as ``extra_repr``, are PyTorch's API, documented by PyTorch)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or klass in stop or not klass.__module__.startswith("unihead"):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
    names -= {n for base in stop for n in dir(base)}
    if hasattr(cls, "__dataclass_fields__"):
        names |= set(cls.__dataclass_fields__)
    return sorted(names)


DEPRECATED = {"loss_module": "loss_fn", "keras_loss": "loss_fn"}


# ----------------------------------------------------------------------------- the tests
def test_every_name_in_all_is_documented(code: str):
    missing = [n for n in unihead.__all__ if not re.search(rf"\b{re.escape(n)}\b", code)]
    assert not missing, f"docs/api.md does not name {missing} (in code)"


def test_every_public_attribute_is_documented(code: str, backends: dict):
    import keras
    import torch
    from flax import linen, nnx

    b = backends
    classes = [
        (ClassificationHead, ()), (unihead.CompiledHead, ()),
        (b["numpy"].NumpyHead, ()), (b["torch"].TorchHead, ()), (b["jax"].JaxHead, ()),
        (b["keras"].KerasHead, ()),
        (b["numpy"].Dense, ()), (b["jax"].Dense, ()),
        (b["torch"].HeadLinear, (torch.nn.Linear, torch.nn.Module)),
        (b["torch"].HeadLoss, (torch.nn.Module,)),
        (b["keras"].HeadDense, (keras.layers.Dense,)), (b["keras"].HeadLoss, (keras.losses.Loss,)),
        (b["keras"].HeadAccuracy, (keras.metrics.MeanMetricWrapper,)),
        (b["keras"].GradientAccumulation, (keras.optimizers.Optimizer,)),
        (b["flax"].FlaxHead, ()), (b["flax"].HeadLinear, (nnx.Linear, nnx.Module)),
        (b["flax"].HeadDense, (linen.Module,)),
        (unihead.Diagnosis, ()), (unihead.Finding, ()), (unihead.Ported, ()),
        (type(unihead.port((ClassificationHead.binary(), ([[1.0]], [0.0])), to="numpy").check), ()),
    ]
    missing = {}
    for cls, stop in classes:
        gone = [n for n in public(cls, stop) if not re.search(rf"\b{re.escape(n)}\b", code)]
        if gone:
            missing[f"{cls.__module__}.{cls.__qualname__}"] = gone
    assert not missing, f"docs/api.md does not name these public attributes (in code): {missing}"


def test_every_signature_is_written_as_the_code_has_it(code: str, backends: dict):
    wrong = []
    for written, fn in documented_callables(backends):
        expected = f"{written}{signature(fn)}"
        if expected not in code:
            near = sorted(set(re.findall(rf"{re.escape(written)}\([^\n]*?\)(?=\s|$|`)", code)))
            wrong.append(f"{expected}  (the page has: {near or 'nothing'})")
    assert not wrong, "docs/api.md lacks these signatures, or has them otherwise:\n" + "\n".join(wrong)


def test_the_options_table_lists_each_backends_options(page: str, backends: dict):
    for name, mod in backends.items():
        rows = [line for line in page.splitlines() if line.startswith(f'| `"{name}"` |')]
        assert len(rows) == 1, f"docs/api.md needs one row of the compile-options table for {name!r}"
        written = re.findall(r"`(\w+)=([^`]*)`", rows[0].split("|")[2])
        params = [p for p in inspect.signature(mod.compile_head).parameters.values()
                  if p.kind is p.KEYWORD_ONLY]
        expected = [(p.name, _spell(p.default)) for p in params]
        assert written == expected, f"{name}: the table says {written}, compile_head takes {expected}"


def test_compile_head_signatures_are_written(page: str, backends: dict):
    for name, mod in backends.items():
        line = f"compile_head{signature(mod.compile_head)}"
        assert line in page, f"docs/api.md should give the {name} backend's `{line}`"


def test_deprecated_names_are_listed_with_their_replacements(page: str, backends: dict):
    rows = {line for line in page.splitlines() if line.startswith("| `") and "Head." in line}
    for cls in (backends["torch"].TorchHead, backends["keras"].KerasHead):
        for old, new in DEPRECATED.items():
            if old in vars(cls):
                assert any(f"`{cls.__name__}.{old}(" in r and f"{new}(" in r for r in rows), (
                    f"{cls.__name__}.{old} is deprecated: docs/api.md's table of deprecated names "
                    f"should list it with {new}")
    with pytest.warns(DeprecationWarning, match="loss_fn"):
        unihead.compile(ClassificationHead.binary(), "torch").loss_module()


def test_the_transformers_integration_is_documented(code: str):
    """unihead.backends.transformers (Hugging Face Trainer): its public names and signatures."""
    require("transformers"), require("accelerate")
    from unihead.backends import transformers as bh

    written = [("trainer_loss", bh.trainer_loss), ("TrainerLoss", bh.TrainerLoss),
               ("loss_func.count_is_weight", bh.TrainerLoss.count_is_weight),
               ("loss_func.weight", bh.TrainerLoss.weight), ("loss_func.loss", bh.TrainerLoss.loss),
               ("loss_func", bh.TrainerLoss.__call__), ("HeadTrainer", bh.HeadTrainer),
               ("HeadTrainerMixin", bh.HeadTrainerMixin)]
    wrong = [f"{name}{signature(fn)}" for name, fn in written if f"{name}{signature(fn)}" not in code]
    assert not wrong, f"docs/api.md lacks these signatures: {wrong}"
    names = set(bh.__all__) | set(public(bh.TrainerLoss)) | set(public(bh.HeadTrainerMixin))
    missing = sorted(n for n in names if not re.search(rf"\b{re.escape(n)}\b", code))
    assert not missing, f"docs/api.md does not name {missing} (in code)"


def test_the_signature_renderer():
    def f(a, b=1, *args, c=None, **kw):  # noqa: ANN001
        pass

    def g(x, *, y="s", z=True):  # noqa: ANN001
        pass

    assert signature(f) == "(a, b=1, *args, c=None, **kw)"
    assert signature(g) == '(x, *, y="s", z=True)'
    with pytest.raises(AssertionError):
        _spell(enum.Enum)
