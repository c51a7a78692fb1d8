"""unihead against the frameworks' own losses: speed, memory, accuracy and small-size overhead.

    python benchmarks/run.py            # the full run (the README's table)
    python benchmarks/run.py --quick    # one large shape, fewer repeats: a few minutes
    python benchmarks/run.py --json results.json [--paths torch,jax,keras-jax]

Paths (each installed one runs; Keras binds its backend once per process, so every path runs in
its own child process): ``torch`` (eager) and ``torch-compile`` (``torch.compile``), ``jax``
(``jax.jit``), ``keras-jax`` / ``keras-tensorflow`` (the loss inside the compiled step Keras
builds on that backend: ``jax.jit`` / ``tf.function(jit_compile=True)``), ``keras-torch`` (eager,
Keras' default on PyTorch).  Heads: multiclass with integer labels, binary with one logit,
multilabel; the native call is the native-equivalence table's (docs/semantics.md §10).

1. Speed: forward+backward (loss and gradient with respect to the logits) of unihead and of the
   native call, interleaved in blocks in one process; median times and the ratio
   unihead/native (median of the per-block ratios).  Shapes (N, K): (4096, 10), (4096, 1000),
   (256, 32000), (64, 128000); a binary head gets the same number of logits as (N*K, 1).
   unihead runs with ``validate=False`` (no label checks in the hot path; the overhead table
   shows the default too).
2. Memory of forward+backward, as a ratio: PyTorch, the bytes autograd saves for the backward
   pass plus the output (``torch.autograd.graph.saved_tensors_hooks``); JAX, XLA's temporary and
   output buffers of the compiled step (``memory_analysis()``).  Not measurable here: compiled
   PyTorch graphs (hooks do not see inside) and TensorFlow on CPU (no allocator statistics).
3. Accuracy: per-example losses against the float64 reference of the conformance suite (itself
   checked against 400-digit mpmath), worst and median float32 ulp, in the ordinary
   (N(0, 3) logits), large-scale (uniform ±30 and ±1e4) and confident-correct (the true class
   20..89 above the rest) regimes.  On paths that flush subnormals to zero (XLA and TensorFlow on
   CPU; probe: exp(-100) == 0) errors are measured after the conformance suite's allowance of K
   times the smallest normal float32 (docs/semantics.md §11), for unihead and native alike.
4. Overhead: per-call time at (32, 10), where Python dispatch dominates.
5. Large vocabulary (``--sections large-vocab``, paths ``torch``, ``jax``, ``keras-jax``): the fused
   ``compiled.linear_loss`` against the dense path and PyTorch's ``F.linear_cross_entropy``
   (benchmarks/large_vocab.py says what is measured).

Targets: speed ratio <= 1.25 for PyTorch eager, <= 1.10 for compiled paths; memory ratio <= 1.0;
accuracy <= 4 ulp.  A miss is marked in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from unihead._ulp import ulp_errors  # imports no framework

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("torch", "torch-compile", "jax", "keras-jax", "keras-torch", "keras-tensorflow")
SHAPES = ((4096, 10), (4096, 1000), (256, 32000), (64, 128000))
QUICK_SHAPES = ((4096, 1000),)
TASKS = ("multiclass", "binary", "multilabel")
REGIMES = ("ordinary", "large30", "large1e4", "confident")
SPEED_TARGET = {"torch": 1.25, "keras-torch": 1.25, "keras-tensorflow": 1.25}  # others (compiled) 1.10
OVERHEAD_TARGET = {"torch": 2.0}  # per-call time at (32, 10) over native's, eager PyTorch
FLT_MIN = 2.0**-126


# ------------------------------------------------------------------------------ data
def make_data(task: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, Any]:
    """Logits, labels and the head for ``task`` at ``(n, k)`` (binary: ``(n*k, 1)``)."""
    from unihead import ClassificationHead as H

    rng = np.random.default_rng(seed)
    if task == "binary":
        z = (rng.normal(size=(n * k, 1)) * 3).astype(np.float32)
        return z, (rng.uniform(size=n * k) < 0.5).astype(np.float32), H.binary()
    z = (rng.normal(size=(n, k)) * 3).astype(np.float32)
    if task == "multiclass":
        return z, rng.integers(0, k, n).astype(np.int32), H.multiclass(k)
    return z, (rng.uniform(size=(n, k)) < 0.1).astype(np.float32), H.multilabel(k)


def regime_data(task: str, regime: str, n: int, k: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, Any]:
    """Logits of a conformance regime with labels (confident: the labels are the right answer)."""
    from unihead import ClassificationHead as H

    rng = np.random.default_rng([seed, len(regime), k])
    kk = 1 if task == "binary" else k
    shape = (n, kk)
    if regime != "confident":  # the conformance suite's regimes
        from unihead.conformance.cases import regime_logits

        z = regime_logits(regime, shape, rng, task == "multiclass")
    else:  # every example (every label) confident and right, at a random class
        z = rng.normal(size=shape)
        gap = rng.choice([20.0, 30.0, 60.0, 89.0], size=shape[:-1])
        if task == "multiclass":
            ids = rng.integers(0, k, n)
            z[np.arange(n), ids] = z.max(-1) + gap
        else:
            z = np.where(rng.uniform(size=shape) < 0.5, 1.0, -1.0) * gap[:, None] + rng.normal(size=shape)
    z = z.astype(np.float32)
    if task == "multiclass":
        y = np.argmax(z, -1) if regime == "confident" else rng.integers(0, k, n)
        return z, y.astype(np.int32), H.multiclass(k)
    y = (z > 0) if regime == "confident" else (rng.uniform(size=shape) < 0.3)
    if task == "binary":
        return z, y[:, 0].astype(np.float32), H.binary()
    return z, y.astype(np.float32), H.multilabel(k)


def reference_none(head: Any, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    from unihead.conformance.reference import F64Reference

    return np.asarray(F64Reference(head.replace(reduction="none")).evaluate(z.astype(np.float64), y)["none"])


def blocks(ours: Callable[[], Any], native: Callable[[], Any], repeats: int, sync: Callable[[Any], Any]
           ) -> tuple[float, float, float]:
    """Interleaved timing: short blocks of unihead calls and native calls alternate; returns
    median times and the median of the per-block ratios.  Blocks of three calls, at least five
    pairs of them: on a shared machine whose speed drifts within seconds, many short pairs give
    a steadier median ratio than two or three long ones."""
    def run(fn: Callable[[], Any], n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            sync(fn())
            out.append(time.perf_counter() - t)
        return out

    for _ in range(2):
        sync(ours()), sync(native())
    block = 3
    a, b, ratios = [], [], []
    for _ in range(max(5, repeats // block)):
        ta, tb = run(ours, block), run(native, block)
        a += ta
        b += tb
        ratios.append(statistics.median(ta) / statistics.median(tb))
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


# ------------------------------------------------------------------------------ framework adapters
class Adapter:
    """One path: builds unihead's and the native loss-and-gradient callables."""

    name = "?"
    compiled = True

    def steps(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Callable, Callable]:
        raise NotImplementedError

    def per_example(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        raise NotImplementedError

    def memory(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
        return None

    @staticmethod
    def sync(x: Any) -> Any:
        return x

    def flushes_subnormals(self) -> bool:
        return False


class TorchAdapter(Adapter):
    def __init__(self, compile_: bool):
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.compiled = compile_
        self.name = "torch-compile" if compile_ else "torch"
        self.target = SPEED_TARGET.get(self.name, 1.10)

    def _fns(self, head: Any, validate: bool = False) -> tuple[Callable, Callable]:
        import torch.nn.functional as F

        import unihead

        if self.compiled:
            # each row as a script of its own (benchmarks/train.py says why): the sizes Dynamo
            # has seen and the compiled code of the row before are forgotten
            self.torch._dynamo.reset()
        c = unihead.compile(head, "torch", validate=validate)
        if not self.compiled:
            c.warmup()  # its compiled kernel (else fused="auto" builds it in the background, mid-run)
        if head.task == "multiclass":
            native = lambda x, t: F.cross_entropy(x, t)  # noqa: E731
        elif head.task == "binary":
            native = lambda x, t: F.binary_cross_entropy_with_logits(x[..., 0], t)  # noqa: E731
        else:
            native = lambda x, t: F.binary_cross_entropy_with_logits(x, t)  # noqa: E731
        ours = c.loss
        if self.compiled:
            ours, native = self.torch.compile(ours, fullgraph=True), self.torch.compile(native, fullgraph=True)
        return ours, native

    def _tensors(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        t = self.torch
        zt = t.as_tensor(z)
        yt = t.as_tensor(y.astype(np.int64) if head.task == "multiclass" else y)
        return zt, yt

    def steps(self, head: Any, z: np.ndarray, y: np.ndarray, validate: bool = False) -> tuple[Callable, Callable]:
        ours, native = self._fns(head, validate)
        zt, yt = self._tensors(head, z, y)

        def step(fn: Callable) -> Callable:
            def run() -> Any:
                x = zt.detach().requires_grad_()
                loss = fn(x, yt)
                loss.backward()
                return x.grad
            return run

        return step(ours), step(native)

    def per_example(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        import torch.nn.functional as F

        import unihead

        zt, yt = self._tensors(head, z, y)
        c = unihead.compile(head.replace(reduction="none"), "torch")
        if not self.compiled:
            c.warmup()  # the compiled kernel a hot head runs (a sigmoid head's: the float32 formulas)
        ours = c.loss(zt, yt)
        if head.task == "multiclass":
            nat = F.cross_entropy(zt, yt, reduction="none")
        elif head.task == "binary":
            nat = F.binary_cross_entropy_with_logits(zt[..., 0], yt, reduction="none")
        else:
            nat = F.binary_cross_entropy_with_logits(zt, yt, reduction="none").mean(-1)
        return ours.detach().numpy(), nat.detach().numpy()

    def memory(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
        if self.compiled:
            return None
        t = self.torch
        ours, native = self._fns(head)
        zt, yt = self._tensors(head, z, y)

        def saved_bytes(fn: Callable) -> float:
            seen: dict[Any, int] = {}

            def pack(x: Any) -> Any:
                if isinstance(x, t.Tensor):
                    st = x.untyped_storage()
                    seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
                return x

            x = zt.detach().requires_grad_()
            with t.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
                loss = fn(x, yt)
            # the input (held by the caller anyway) is not counted; the output and saved tensors are
            seen.pop(x.untyped_storage().data_ptr(), None)
            seen.pop(yt.untyped_storage().data_ptr(), None)
            loss.backward()
            return float(sum(seen.values()) + loss.untyped_storage().nbytes() + x.grad.untyped_storage().nbytes())

        return saved_bytes(ours), saved_bytes(native)

    def overhead_steps(self, head: Any, z: np.ndarray, y: np.ndarray) -> dict[str, tuple[Callable, Callable]]:
        out = {"validate=False": self.steps(head, z, y)}
        if not self.compiled:
            out["validate=True"] = self.steps(head, z, y, validate=True)
        return out


class JaxAdapter(Adapter):
    name = "jax"
    target = SPEED_TARGET.get("jax", 1.10)

    def __init__(self) -> None:
        import jax

        self.jax = jax

    def sync(self, x: Any) -> Any:
        return self.jax.block_until_ready(x)

    def flushes_subnormals(self) -> bool:
        return float(self.jax.numpy.exp(self.jax.numpy.float32(-100.0))) == 0.0

    def _native(self, head: Any) -> Callable:
        import optax

        if head.task == "multiclass":
            return lambda x, t: optax.softmax_cross_entropy_with_integer_labels(x, t).mean()
        if head.task == "binary":
            return lambda x, t: optax.sigmoid_binary_cross_entropy(x[..., 0], t).mean()
        return lambda x, t: optax.sigmoid_binary_cross_entropy(x, t).mean()

    def _jitted(self, head: Any, validate: bool = False) -> tuple[Callable, Callable]:
        import unihead

        c = unihead.compile(head, "jax", validate=validate)
        jax = self.jax
        return (jax.jit(jax.value_and_grad(lambda x, t: c.loss(x, t))),
                jax.jit(jax.value_and_grad(self._native(head))))

    def steps(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Callable, Callable]:
        ours, native = self._jitted(head)
        zj, yj = self.jax.numpy.asarray(z), self.jax.numpy.asarray(y)
        return (lambda: ours(zj, yj)), (lambda: native(zj, yj))

    def per_example(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        import optax

        import unihead

        ours = unihead.compile(head.replace(reduction="none"), "jax").loss(z, y)
        if head.task == "multiclass":
            nat = optax.softmax_cross_entropy_with_integer_labels(z, y)
        elif head.task == "binary":
            nat = optax.sigmoid_binary_cross_entropy(z[..., 0], y)
        else:
            nat = optax.sigmoid_binary_cross_entropy(z, y).mean(-1)
        return np.asarray(ours), np.asarray(nat)

    def memory(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
        ours, native = self._jitted(head)

        def size(fn: Callable) -> float:
            m = fn.lower(z, y).compile().memory_analysis()
            return float(m.temp_size_in_bytes + m.output_size_in_bytes)

        return size(ours), size(native)

    def overhead_steps(self, head: Any, z: np.ndarray, y: np.ndarray) -> dict[str, tuple[Callable, Callable]]:
        return {"jit": self.steps(head, z, y)}


class KerasAdapter(Adapter):
    def __init__(self) -> None:
        import keras

        self.keras = keras
        self.backend = keras.backend.backend()
        self.name = f"keras-{self.backend}"
        self.compiled = self.backend != "torch"
        self.target = SPEED_TARGET.get(self.name, 1.10)
        self.how = {"jax": "jax.jit", "tensorflow": "tf.function(jit_compile=True)",
                    "torch": "eager (Keras' default on torch)"}[self.backend]

    def flushes_subnormals(self) -> bool:
        ops = self.keras.ops
        return float(ops.convert_to_numpy(ops.exp(ops.convert_to_tensor(-100.0, "float32")))) == 0.0

    def _losses(self, head: Any, reduction: str = "sum_over_batch_size", validate: bool = False) -> tuple[Any, Any]:
        import unihead

        losses = self.keras.losses
        c = unihead.compile(head if reduction != "none" else head.replace(reduction="none"), "keras", validate=validate)
        red = None if reduction == "none" else reduction
        if head.task == "multiclass":
            native = losses.SparseCategoricalCrossentropy(from_logits=True, reduction=red)
        else:
            native = losses.BinaryCrossentropy(from_logits=True, reduction=red)
        return c.loss_fn(), native

    def _labels(self, head: Any, y: np.ndarray) -> np.ndarray:
        return y[:, None] if head.task == "binary" else y

    def steps(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Callable, Callable]:
        ours, native = self._losses(head)
        yn = self._labels(head, y)
        if self.backend == "jax":
            import jax

            f_o = jax.jit(jax.value_and_grad(lambda x, t: ours(t, x)))
            f_n = jax.jit(jax.value_and_grad(lambda x, t: native(t, x)))
            zj, yo, ynj = jax.numpy.asarray(z), jax.numpy.asarray(y), jax.numpy.asarray(yn)
            self.sync = jax.block_until_ready  # type: ignore[method-assign]
            return (lambda: f_o(zj, yo)), (lambda: f_n(zj, ynj))
        if self.backend == "tensorflow":
            import tensorflow as tf

            def make(loss: Any) -> Callable:
                @tf.function(jit_compile=True)
                def step(x: Any, t: Any) -> Any:
                    with tf.GradientTape() as tape:
                        tape.watch(x)
                        v = loss(t, x)
                    return v, tape.gradient(v, x)
                return step

            f_o, f_n = make(ours), make(native)
            zt, yo, ynt = tf.constant(z), tf.constant(y), tf.constant(yn)
            self.sync = lambda r: r[1].numpy()  # type: ignore[method-assign]
            return (lambda: f_o(zt, yo)), (lambda: f_n(zt, ynt))
        import torch

        zt = torch.as_tensor(z)
        yo = torch.as_tensor(y.astype(np.int64) if head.task == "multiclass" else y)
        ynt = torch.as_tensor(yn.astype(np.int64) if head.task == "multiclass" else yn)

        def step(loss: Any, t: Any) -> Callable:
            def run() -> Any:
                x = zt.detach().requires_grad_()
                loss(t, x).backward()
                return x.grad
            return run

        return step(ours, yo), step(native, ynt)

    def per_example(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        ours, native = self._losses(head, "none")
        ops = self.keras.ops
        return (ops.convert_to_numpy(ours(y, z)), ops.convert_to_numpy(native(self._labels(head, y), z)))

    def memory(self, head: Any, z: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
        if self.backend != "jax":
            return None
        import jax

        ours, native = self._losses(head)
        yn = self._labels(head, y)

        def size(fn: Callable, t: Any) -> float:
            m = jax.jit(jax.value_and_grad(lambda x, tt: fn(tt, x))).lower(z, t).compile().memory_analysis()
            return float(m.temp_size_in_bytes + m.output_size_in_bytes)

        return size(ours, y), size(native, yn)

    def overhead_steps(self, head: Any, z: np.ndarray, y: np.ndarray) -> dict[str, tuple[Callable, Callable]]:
        return {self.how.split(" ")[0]: self.steps(head, z, y)}


def adapter(path: str) -> Adapter:
    if path in ("torch", "torch-compile"):
        return TorchAdapter(path == "torch-compile")
    if path == "jax":
        return JaxAdapter()
    return KerasAdapter()


# ------------------------------------------------------------------------------ worker
def worker(path: str, quick: bool, sections: set[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if "train" in sections:
        import train

        rows += train.run(path, quick)
    if "large-vocab" in sections:
        import large_vocab

        rows += large_vocab.run(path, quick)
    if "loss" not in sections:
        return rows
    a = adapter(path)
    shapes = QUICK_SHAPES if quick else SHAPES
    repeats = 10 if quick else 30
    how = getattr(a, "how", "torch.compile(fullgraph=True)" if path == "torch-compile" else
                  "jax.jit" if path == "jax" else "eager")
    ftz = a.flushes_subnormals()
    for task in TASKS:
        sizes: set[int] = set()
        for n, k in shapes:
            if task == "binary" and n * k in sizes:
                continue  # (256, 32000) and (64, 128000) are the same (N*K, 1) binary problem
            sizes.add(n * k)
            z, y, head = make_data(task, n, k)
            t0 = time.perf_counter()
            ours, native = a.steps(head, z, y)
            a.sync(ours()), a.sync(native())
            first = time.perf_counter() - t0
            # a full run: at least 10 pairs of blocks a row, 100 for rows of 40960 logits (calls of
            # 0.2-0.5 ms); 10 pairs of 12 ms blocks there, and 5 pairs for the largest rows, were
            # too few for a steady median on a shared machine (--quick: 33 and 5 pairs)
            reps = repeats * 10 if n * k <= 4096 * 10 else repeats
            tu, tn, ratio = blocks(ours, native, reps, a.sync)
            rows.append({"kind": "speed", "path": path, "how": how, "task": task, "shape": [n, k],
                         "unihead_ms": tu * 1e3, "native_ms": tn * 1e3, "ratio": ratio, "target": a.target,
                         "met": ratio <= a.target, "first_call_s": first})
            mem = a.memory(head, z, y)
            if mem is not None:
                rows.append({"kind": "memory", "path": path, "task": task, "shape": [n, k],
                             "unihead_mb": mem[0] / 2**20, "native_mb": mem[1] / 2**20,
                             "extra_kb": (mem[0] - mem[1]) / 2**10, "ratio": mem[0] / mem[1], "target": 1.0,
                             "met": round(mem[0] / mem[1], 2) <= 1.0})
            del ours, native
        # accuracy: per-example losses in each regime
        for regime in REGIMES:
            errs_u, errs_n = [], []
            for n, k in ((512, 10), (32, 1000)):
                z, y, head = regime_data(task, regime, n, k)
                ref = reference_none(head, z, y)
                ours, nat = a.per_example(head, z, y)
                floor = z.shape[-1] * FLT_MIN if ftz else 0.0
                errs_u.append(ulp_errors(ours, ref, floor=floor).ravel())
                errs_n.append(ulp_errors(nat, ref, floor=floor).ravel())
            eu, en = np.concatenate(errs_u), np.concatenate(errs_n)
            rows.append({"kind": "accuracy", "path": path, "task": task, "regime": regime, "ftz": ftz,
                         "unihead_worst": float(eu.max()), "unihead_median": float(np.median(eu)),
                         "native_worst": float(en.max()), "native_median": float(np.median(en)),
                         "target": 4.0, "met": float(eu.max()) <= 4.0})
        # overhead at (32, 10)
        z, y, head = make_data(task, 32, 10) if task != "binary" else make_data(task, 32, 1)
        for label, (ours, native) in a.overhead_steps(head, z, y).items():
            tu, tn, ratio = blocks(ours, native, 200 if quick else 600, a.sync)
            target = OVERHEAD_TARGET.get(path)
            rows.append({"kind": "overhead", "path": path, "task": task, "mode": label,
                         "unihead_us": tu * 1e6, "native_us": tn * 1e6, "extra_us": (tu - tn) * 1e6,
                         "ratio": ratio, "target": target, "met": target is None or ratio <= target})
    return rows


def installed(path: str) -> bool:
    import importlib.util

    need = {"torch": ["torch"], "torch-compile": ["torch"], "jax": ["jax", "optax"],
            "keras-jax": ["keras", "jax"], "keras-torch": ["keras", "torch"],
            "keras-tensorflow": ["keras", "tensorflow"]}[path]
    return all(importlib.util.find_spec(m) is not None for m in need)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("unihead", "numpy", "torch", "jax", "optax", "keras", "tensorflow"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "versions": versions}


# ------------------------------------------------------------------------------ table
def fmt_shape(s: list[int], task: str) -> str:
    n, k = s
    return f"({n * k}, 1)" if task == "binary" else f"({n}, {k})"


def table(rows: list[dict[str, Any]], info: dict[str, Any], seconds: float, quick: bool) -> str:
    out = [f"unihead benchmarks{' (--quick)' if quick else ''}: {info['cpu']}, {info['cores']} cores, "
           f"Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
           + f"; {seconds:.0f} s"]

    def section(title: str, header: list[str], body: list[list[str]]) -> None:
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
        out.append("")
        out.append(title)
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        out.append("  ".join("-" * w for w in widths))
        out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body)

    tr = [r for r in rows if r["kind"] == "train"]
    if tr:
        section("Training step: MLP on scikit-learn data, unihead head / native loss (median of interleaved blocks)",
                ["path", "task", "batch", "ratio", "target", "", "unihead us", "native us", "first call s"],
                [[r["path"], r["task"], str(r["batch"]), f"{r['ratio']:.3f}", f"<= {r['target']:.2f}",
                  "ok" if r["met"] else "MISS", f"{r['unihead_us']:.0f}", f"{r['native_us']:.0f}",
                  f"{r['first_call_s']:.1f}"] for r in tr])
    sp = [r for r in rows if r["kind"] == "speed"]
    section("Speed: forward+backward, unihead / native (median of interleaved blocks)",
            ["path", "task", "logits", "ratio", "target", "", "unihead ms", "native ms", "first call s"],
            [[r["path"], r["task"], fmt_shape(r["shape"], r["task"]), f"{r['ratio']:.2f}", f"<= {r['target']:.2f}",
              "ok" if r["met"] else "MISS", f"{r['unihead_ms']:.2f}", f"{r['native_ms']:.2f}",
              f"{r['first_call_s']:.1f}"] for r in sp])
    mem = [r for r in rows if r["kind"] == "memory"]
    section("Memory: forward+backward, unihead / native (torch: saved tensors + outputs; jax: XLA temp + output)",
            ["path", "task", "logits", "ratio", "target", "", "unihead MiB", "native MiB", "extra KiB"],
            [[r["path"], r["task"], fmt_shape(r["shape"], r["task"]), f"{r['ratio']:.2f}", "<= 1.00",
              "ok" if r["met"] else "MISS", f"{r['unihead_mb']:.1f}", f"{r['native_mb']:.1f}",
              f"{r['extra_kb']:+.0f}"] for r in mem])
    acc = [r for r in rows if r["kind"] == "accuracy"]
    section("Accuracy: per-example loss, float32 ulp from the float64 reference (worst / median; "
            "FTZ paths after K x 1.2e-38)",
            ["path", "task", "regime", "unihead worst", "median", "", "native worst", "median"],
            [[r["path"], r["task"], r["regime"], f"{r['unihead_worst']:.3g}", f"{r['unihead_median']:.2g}",
              "ok" if r["met"] else "MISS", f"{r['native_worst']:.3g}", f"{r['native_median']:.2g}"] for r in acc])
    ov = [r for r in rows if r["kind"] == "overhead"]
    section("Overhead: per call at (32, 10), forward+backward (target for eager PyTorch: <= 2x native)",
            ["path", "task", "mode", "ratio", "", "extra us", "unihead us", "native us"],
            [[r["path"], r["task"], r["mode"], f"{r['ratio']:.2f}",
              "" if r.get("target") is None else ("ok" if r["met"] else "MISS"), f"{r['extra_us']:+.1f}",
              f"{r['unihead_us']:.1f}", f"{r['native_us']:.1f}"] for r in ov])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import large_vocab

    large_vocab.table(rows, section)
    skipped = info.get("skipped", [])
    if skipped:
        out.append("")
        out.append("not run: " + "; ".join(skipped))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one large shape (4096, 1000) and fewer repeats")
    ap.add_argument("--json", metavar="FILE", help="write every measurement and the machine to FILE")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--sections", default="train,loss",
                    help="comma-separated: train (training step), loss (speed, memory, accuracy, overhead), "
                         "large-vocab (the fused linear_loss against the dense path: benchmarks/large_vocab.py)")
    ap.add_argument("--cache", metavar="DIR",
                    help="reuse compiled PyTorch kernels from DIR (default: a new directory, so that "
                         "first-call and build times are those of a new machine)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if args.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        print(json.dumps(worker(args.worker, args.quick, sections)))
        return 0
    import tempfile

    cache = args.cache or tempfile.mkdtemp(prefix="unihead-bench-cache-")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    info = machine()
    info["skipped"] = []
    for path in args.paths.split(","):
        if path not in PATHS:
            ap.error(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
        if not installed(path):
            info["skipped"].append(f"{path} (not installed)")
            continue
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", UNIHEAD_CACHE_DIR=cache)
        if path.startswith("keras-"):
            env["KERAS_BACKEND"] = path.split("-", 1)[1]
        t = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--sections", args.sections] \
            + (["--quick"] if args.quick else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            info["skipped"].append(f"{path} (failed: {res.stderr.strip().splitlines()[-1] if res.stderr else '?'})")
            print(res.stderr[-3000:], file=sys.stderr)
            continue
        rows += json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  {path}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    seconds = time.perf_counter() - start
    text = table(rows, info, seconds, args.quick)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "quick": args.quick, "seconds": seconds,
                                               "rows": rows, "table": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
