"""``unihead diagnose`` and ``unihead port``: reading model files from the command line."""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any

_MODEL_HELP = ("a Keras model file (.keras, .h5), a PyTorch module saved whole with torch.save (.pt, .pth), "
               "or a head file (.safetensors) written by 'unihead port --out'")


def _choose_keras_backend() -> None:
    """Keras picks its backend once per process: keep the user's KERAS_BACKEND, else take the
    first installed of JAX, PyTorch, TensorFlow (the one that imports fastest first)."""
    if os.environ.get("KERAS_BACKEND"):
        return
    for name, module in (("jax", "jax"), ("torch", "torch"), ("tensorflow", "tensorflow")):
        if importlib.util.find_spec(module) is not None:
            os.environ["KERAS_BACKEND"] = name
            return


def _loss_from_text(text: str | None, framework: str) -> Any:
    """``--loss``: a Keras identifier ('categorical_crossentropy') or an expression such as
    ``CategoricalCrossentropy(from_logits=True)`` / ``nn.CrossEntropyLoss(label_smoothing=0.1)``."""
    if text is None:
        return None
    if framework == "keras":
        import keras

        if "(" not in text:
            return text
        namespace = {"keras": keras, **{k: getattr(keras.losses, k) for k in dir(keras.losses) if k[0].isupper()}}
    else:
        import torch
        from torch import nn

        namespace = {"torch": torch, "nn": nn, **{k: getattr(nn, k) for k in dir(nn) if k.endswith("Loss")}}
        if "(" not in text:
            text = text + "()"
    try:
        return eval(text, {"__builtins__": {}}, namespace)  # the user's own command line
    except Exception as e:  # noqa: BLE001 - reported as a usage error
        raise SystemExit(f"unihead: --loss {text!r} is not a loss I can build: {e}") from None


def _load_model(path: str, loss_text: str | None) -> tuple[Any, Any]:
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"unihead: {path}: no such file.")
    suffix = p.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        _choose_keras_backend()
        import keras

        import unihead  # noqa: F401 - registers unihead's Keras classes

        import warnings

        with warnings.catch_warnings():  # optimizer slots are irrelevant to the head
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.saving.load_model(p, compile=True)
        return model, _loss_from_text(loss_text, "keras")
    if suffix in (".pt", ".pth"):
        import torch

        # a whole module (torch.save(model)) is a pickle: load it only from files you trust
        model = torch.load(p, weights_only=False, map_location="cpu")
        if not isinstance(model, torch.nn.Module):
            raise SystemExit(
                f"unihead: {path} holds a {type(model).__name__}, not a module: unihead reads a module saved "
                "whole (torch.save(model, path)); a state_dict has no layers to read."
            )
        return model, _loss_from_text(loss_text, "torch")
    raise SystemExit(f"unihead: {path}: unknown file type {suffix!r}; expected {_MODEL_HELP}.")


def add_diagnose(sub: Any) -> None:
    p = sub.add_parser(
        "diagnose", help="say what is wrong with a model's output head, and the fix",
        description="Read the model's last dense layer, its activation and its loss; print the findings "
                    "(error / warning / info) with the fix. Exit 1 when there is an error.")
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--labels", help="a .npy file of training labels (enables the label checks)")
    p.add_argument("--loss", help="the loss, if the model file has none: a Keras name "
                                  "('categorical_crossentropy'), a Keras class call or a PyTorch criterion "
                                  "('nn.CrossEntropyLoss(label_smoothing=0.1)')")
    p.set_defaults(func=run_diagnose)


def run_diagnose(args: argparse.Namespace) -> int:
    import numpy as np

    from ._diagnose import diagnose

    model, loss = _load_model(args.model, args.loss)
    labels = np.load(args.labels, allow_pickle=False) if args.labels else None
    d = diagnose(model, loss, labels=labels)
    print(d)
    return 0 if d.ok else 1


def add_port(sub: Any) -> None:
    p = sub.add_parser(
        "port", help="move a trained head to another framework (checked), or write it to a head file",
        description="Read a model's head (or a head file), check that the target framework gives the same "
                    "probabilities within 4 ulp, and write a head file (--out) and/or print how to load it "
                    "in the target framework (--to).")
    p.add_argument("source", help=_MODEL_HELP)
    p.add_argument("--to", choices=["torch", "jax", "keras", "numpy"],
                   help="the framework to load the head in (checked here when it is installed)")
    p.add_argument("--out", help="write the head file (.safetensors: weights + spec)")
    p.add_argument("--loss", help="as for 'unihead diagnose'")
    p.add_argument("--binary-units", type=int, choices=[1, 2], help="convert a binary head to 1 or 2 units")
    p.set_defaults(func=run_port)


_SNIPPETS = {
    "torch": ('layer = compiled.layer({d}, weights=weights)   # nn.Linear({d}, {k}) producing logits\n'
              'criterion = compiled.loss_fn()                    # criterion(logits, labels)\n'
              'probabilities = compiled.probabilities(layer(x))'),
    "jax": ('layer = compiled.layer({d}, weights=weights)\n'
            'params = layer.init(jax.random.key(0))  # {{"kernel": ({d}, {k}), "bias": ({k},)}}, Flax layout\n'
            'logits = layer.apply(params, x); loss = compiled.loss(logits, labels)'),
    "keras": ('layer = compiled.layer({d}, weights=weights)   # keras.layers.Dense({k}) producing logits\n'
              'model.compile(optimizer, **compiled.compile_kwargs())'),
    "numpy": ('layer = compiled.layer({d}, weights=weights)\n'
              'probabilities = compiled.probabilities(layer(x))'),
}


def run_port(args: argparse.Namespace) -> int:
    from ._registry import BUILTIN_BACKENDS
    from .headfile import save
    from ._port import port

    if not args.to and not args.out:
        raise SystemExit("unihead port: give --to FRAMEWORK, --out HEAD.safetensors, or both.")
    if Path(args.source).suffix.lower() == ".safetensors":
        source, loss = args.source, None
    else:
        source, loss = _load_model(args.source, args.loss)
    target = args.to or "numpy"
    framework = BUILTIN_BACKENDS[target][1]
    if framework is not None and importlib.util.find_spec(framework) is None:
        print(f"({target} is not installed here: checked with NumPy instead)")
        target = "numpy"
    if target == "keras":
        _choose_keras_backend()
    ported = port(source, to=target, loss=loss, binary_units=args.binary_units)
    print(ported.check)
    k = ported.head.num_outputs
    d = int(ported.weights["kernel"].shape[0])
    if args.out:
        save(args.out, ported.head, ported.weights)
        print(f"wrote {args.out}: {ported.head!r}, kernel ({d}, {k}), bias ({k},)")
    if args.to:
        path = args.out or args.source
        print(f"\nLoad it in {args.to}:\n")
        print("import unihead" + ("\nimport jax" if args.to == "jax" else ""))
        print(f'head, weights = unihead.load("{path}")')
        print(f'compiled = unihead.compile(head, "{args.to}")')
        print(_SNIPPETS[args.to].format(d=d, k=k))
    return 0
