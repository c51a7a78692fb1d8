"""The training-step section of ``benchmarks/run.py``: what a user sees.

A small MLP (``in -> 128 -> 128 -> K``, ReLU) trains on scikit-learn's bundled data sets with the
framework's own optimizer (SGD), once with the native loss of the native-equivalence table
(docs/semantics.md §10) and once with the compiled unihead head's loss, interleaved in one
process; the ratio is the median over blocks of steps of (unihead step time / native step time).

Tasks: ``multiclass`` (digits, 10 classes, integer labels), ``binary-1`` and ``binary-2``
(breast cancer, one sigmoid unit or two softmax units, 0/1 labels), ``multilabel`` (digits, four
properties of the digit: even, at least 5, prime, a multiple of 3).  Batch sizes 32, 64, 256.

Paths: ``torch`` (eager), ``torch-compile`` (``torch.compile`` of the model and loss; backward and
optimizer eager), ``jax`` (one ``jax.jit`` step: ``value_and_grad`` and an optax update), and
``keras-*`` (``model.fit`` for one epoch of a fixed number of batches per call; the time per step
is the call's time over its batches, so it includes what ``fit`` adds per call).

unihead heads run with their defaults (``validate=True``); on PyTorch the head's compiled kernel
is built first with ``warmup()`` (the build time is reported as "build s": it happens once per
head and machine; ``fused="auto"`` does it in the background after a head's first calls).
"""

from __future__ import annotations

import statistics
import time
import types
from typing import Any, Callable

import numpy as np

TASKS = ("multiclass", "binary-1", "binary-2", "multilabel")
BATCHES = (32, 64, 256)
TARGET = {"torch": 1.10, "torch-compile": 1.05, "jax": 1.05}  # keras-*: 1.10
HIDDEN = 128


def dataset(task: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Features (float32, standardised), labels and the unihead head of ``task``."""
    from sklearn.datasets import load_breast_cancer, load_digits

    from unihead import ClassificationHead as H

    if task.startswith("binary"):
        x, y = load_breast_cancer(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        head = H.binary() if task == "binary-1" else H.binary(binary_units=2)
        return x.astype(np.float32), y.astype(np.float32 if task == "binary-1" else np.int64), head
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    if task == "multiclass":
        return x, y.astype(np.int64), H.multiclass(10)
    props = np.stack([y % 2 == 0, y >= 5, np.isin(y, [2, 3, 5, 7]), y % 3 == 0], axis=1)
    return x, props.astype(np.float32), H.multilabel(4)


def interleave(ours: Callable[[], Any], native: Callable[[], Any], rounds: int, block: int = 3
               ) -> tuple[float, float, float]:
    """Median step times and the median of per-block ratios, blocks of ``block`` steps
    alternating (a shared machine drifts within seconds: many short pairs)."""
    a, b, ratios = [], [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(block):
            ours()
        ta = (time.perf_counter() - t) / block
        t = time.perf_counter()
        for _ in range(block):
            native()
        tb = (time.perf_counter() - t) / block
        a.append(ta)
        b.append(tb)
        ratios.append(ta / tb)
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


def first_calls(ours: Callable[[], Any], native: Callable[[], Any], warm: int = 20) -> float:
    """Time unihead's first call (compilation included), then warm both up."""
    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    native()
    for _ in range(warm):
        ours(), native()
    return first


def batches(x: np.ndarray, y: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    n = (len(x) // size) * size
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


# ------------------------------------------------------------------------------ PyTorch
def torch_steps(task: str, batch: int, compiled_model: bool) -> tuple[Callable, Callable, float]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import unihead

    x, y, head = dataset(task)
    k = head.num_outputs
    if compiled_model:
        # each row as a script of its own: Dynamo keeps the sizes it has seen per code (code
        # objects that compare equal share them), and would trace the batch axis as symbolic
        # (automatic dynamic shapes) from the second batch size on, on both sides
        torch._dynamo.reset()
    c = unihead.compile(head, "torch")
    t0 = time.perf_counter()
    c.warmup(label_dtype=torch.as_tensor(y[:1]).dtype)
    build = time.perf_counter() - t0
    if task == "multiclass" or task == "binary-2":
        native = F.cross_entropy
    elif task == "binary-1":
        def native(z: Any, t: Any) -> Any:
            return F.binary_cross_entropy_with_logits(z[..., 0], t)
    else:
        native = F.binary_cross_entropy_with_logits

    def make(loss: Callable) -> Callable:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                              nn.Linear(HIDDEN, k))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        def forward(xb: Any, yb: Any) -> Any:
            return loss(model(xb), yb)

        if compiled_model:
            # Dynamo caches compiled code per code object, at most 8 entries (then it runs the
            # frame uncompiled): every model gets a code object of its own, as separate training
            # scripts would have, so that neither side checks the other's guards
            forward = torch.compile(types.FunctionType(
                forward.__code__.replace(), forward.__globals__, "forward", None, forward.__closure__))
        data = [(torch.as_tensor(a), torch.as_tensor(b)) for a, b in batches(x, y, batch)]
        state = {"i": 0}

        def step() -> None:
            xb, yb = data[state["i"] % len(data)]
            state["i"] += 1
            opt.zero_grad()
            forward(xb, yb).backward()
            opt.step()

        return step

    ours, nat = make(c.loss), make(native)
    return ours, nat, build + first_calls(ours, nat)


# ------------------------------------------------------------------------------ JAX
def jax_steps(task: str, batch: int) -> tuple[Callable, Callable, float]:
    import jax
    import jax.numpy as jnp
    import optax

    import unihead

    x, y, head = dataset(task)
    k = head.num_outputs
    c = unihead.compile(head, "jax")
    if task in ("multiclass", "binary-2"):
        def native(z: Any, t: Any) -> Any:
            return optax.softmax_cross_entropy_with_integer_labels(z, t).mean()
    elif task == "binary-1":
        def native(z: Any, t: Any) -> Any:
            return optax.sigmoid_binary_cross_entropy(z[..., 0], t).mean()
    else:
        def native(z: Any, t: Any) -> Any:
            return optax.sigmoid_binary_cross_entropy(z, t).mean()

    def init(key: Any) -> dict[str, Any]:
        sizes = [x.shape[1], HIDDEN, HIDDEN, k]
        keys = jax.random.split(key, len(sizes) - 1)
        return {f"l{i}": {"kernel": jax.nn.initializers.lecun_normal()(keys[i], (a, b)), "bias": jnp.zeros(b)}
                for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

    def apply(params: dict[str, Any], xb: Any) -> Any:
        h = xb
        for i in range(3):
            h = h @ params[f"l{i}"]["kernel"] + params[f"l{i}"]["bias"]
            if i < 2:
                h = jax.nn.relu(h)
        return h

    opt = optax.sgd(0.01)

    def make(loss: Callable) -> Callable:
        params = init(jax.random.key(0))
        state = {"p": params, "o": opt.init(params), "i": 0}

        @jax.jit
        def step(p: Any, o: Any, xb: Any, yb: Any) -> Any:
            value, grads = jax.value_and_grad(lambda q: loss(apply(q, xb), yb))(p)
            updates, o = opt.update(grads, o, p)
            return optax.apply_updates(p, updates), o, value

        data = [(jnp.asarray(a), jnp.asarray(b)) for a, b in batches(x, y, batch)]

        def run() -> None:
            xb, yb = data[state["i"] % len(data)]
            state["i"] += 1
            state["p"], state["o"], value = step(state["p"], state["o"], xb, yb)
            jax.block_until_ready(value)

        return run

    ours, nat = make(lambda z, t: c.loss(z, t)), make(native)
    return ours, nat, first_calls(ours, nat)


# ------------------------------------------------------------------------------ Keras
def keras_steps(task: str, batch: int, steps_per_call: int) -> tuple[Callable, Callable, float, int]:
    import keras

    import unihead

    x, y, head = dataset(task)
    k = head.num_outputs
    c = unihead.compile(head, "keras")
    losses = keras.losses
    if task in ("multiclass", "binary-2"):
        native = losses.SparseCategoricalCrossentropy(from_logits=True)
        yn = y.astype(np.int64)
    else:
        native = losses.BinaryCrossentropy(from_logits=True)
        yn = y[:, None] if task == "binary-1" else y
    if keras.backend.backend() == "torch":
        from unihead.backends.torch import TorchHead

        import torch

        t0 = time.perf_counter()
        warm = TorchHead(head)  # the kernels HeadLoss's compiled head then loads from the cache
        for dtype in {torch.as_tensor(y[:1]).dtype, torch.int32 if head.label_format == "sparse" else torch.float32}:
            warm.warmup(label_dtype=dtype)
        build = time.perf_counter() - t0
    else:
        build = 0.0
    n = min(len(x) // batch, steps_per_call) * batch
    xs, ys, yns = x[:n], y[:n], yn[:n]

    def make(loss: Any, labels: np.ndarray) -> Callable:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(HIDDEN, activation="relu"),
                                  keras.layers.Dense(HIDDEN, activation="relu"), keras.layers.Dense(k)])
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)

        def run() -> None:
            model.fit(xs, labels, batch_size=batch, epochs=1, verbose=0, shuffle=False)

        return run

    ours, nat = make(c.loss_fn(), ys), make(native, yns)
    return ours, nat, build + first_calls(ours, nat, warm=1), n // batch


def run(path: str, quick: bool) -> list[dict[str, Any]]:
    """The training-step rows of one path (this process runs that path)."""
    rows = []
    tasks = TASKS
    sizes = (64,) if quick else BATCHES
    for task in tasks:
        for b in sizes:
            per_call = 1  # steps per timed call
            if path in ("torch", "torch-compile"):
                ours, nat, first = torch_steps(task, b, path == "torch-compile")
                rounds = 60 if quick else 200
            elif path == "jax":
                ours, nat, first = jax_steps(task, b)
                rounds = 60 if quick else 200
            else:
                ours, nat, first, per_call = keras_steps(task, b, 16)
                rounds = 8 if quick else 24
            tu, tn, ratio = interleave(ours, nat, rounds, block=1 if path.startswith("keras") else 3)
            target = TARGET.get(path, 1.10)
            rows.append({"kind": "train", "path": path, "task": task, "batch": b,
                         "unihead_us": tu / per_call * 1e6, "native_us": tn / per_call * 1e6,
                         "ratio": ratio, "target": target, "met": ratio <= target, "first_call_s": first})
    return rows
