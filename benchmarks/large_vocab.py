"""The "large vocabulary" section of benchmarks/run.py (``--sections large-vocab``): the fused
linear + loss, ``compiled.linear_loss(hidden, kernel, labels, bias)``, against the dense unihead
path, ``compiled.loss(hidden @ kernel + bias, labels)``, measured side by side in one process.

* Memory (forward+backward), as the loss section measures it.  PyTorch: the bytes autograd saves
  for the backward pass plus the loss (``saved_tensors_hooks``, each storage once), reported with
  the inputs ``hidden``, ``kernel``, ``bias`` (which both paths save: the matmul needs them) and
  without them; the target (fused <= 1/10 of dense) is on the figure without the inputs, which
  is what each path adds.  JAX: XLA's temporary and output buffers of the ``jax.jit`` step
  (``memory_analysis()``; outputs include the three gradients, the same for both).
* Speed: forward+backward of each path (and the gradients with respect to hidden, kernel and
  bias), alternated call by call; medians, and the median of the per-pair ratios.
* PyTorch's own fused call, ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (its chunked path), at N=1024, D=512, V=131072 (fewer repeats: a call takes a minute here),
  and optax's dense ``softmax_cross_entropy_with_integer_labels`` on the JAX path, for reference.

Shapes (N, D, V) float32: (4096, 1024, 131072) and (4096, 1024, 32000).  ``--quick``: memory at
those shapes (one forward pass each on PyTorch; compilation only on JAX), speed at (1024, 512,
32000) and the comparison with ``F.linear_cross_entropy`` at its shape with one call each.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

SHAPES = ((4096, 1024, 131072), (4096, 1024, 32000))
QUICK_SHAPES = ((1024, 512, 32000),)
NATIVE_SHAPE = (1024, 512, 131072)
MEMORY_TARGET = 0.1
SPEED_TARGET = 1.15
NATIVE_TARGET = 0.1  # fused time / F.linear_cross_entropy (chunked) time


def data(n: int, d: int, v: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = (rng.standard_normal((d, v), dtype=np.float32) / np.float32(np.sqrt(d)))
    b = (rng.standard_normal(v, dtype=np.float32) * np.float32(0.1))
    y = rng.integers(0, v, n)
    return h, w, b, y


def pairs(a: Callable[[], Any], b: Callable[[], Any], repeats: int, sync: Callable[[Any], Any]) -> tuple[float, float, float]:
    """Alternating calls of ``a`` and ``b`` (after one warm-up call each): median times and the
    median of the per-pair ratios (a step here takes seconds: pairs, not blocks)."""
    def timed(fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        sync(fn())
        return time.perf_counter() - t

    sync(a()), sync(b())
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


# ---------------------------------------------------------------------------------------- torch
def _torch_setup(n: int, d: int, v: int) -> tuple:
    import torch

    import unihead
    from unihead import ClassificationHead

    c = unihead.compile(ClassificationHead.multiclass(v), "torch", validate=False)
    h, w, b, y = (torch.from_numpy(x) for x in data(n, d, v))
    params = [t.requires_grad_() for t in (h, w, b)]
    return c, h, w, b, y, params


def torch_memory(n: int, d: int, v: int) -> dict[str, Any]:
    """The saved-tensor bytes of each path at one shape (one forward pass each)."""
    import torch

    c, h, w, b, y, _ = _torch_setup(n, d, v)

    def saved(fn: Callable[[], Any]) -> tuple[float, float]:
        seen: dict[int, int] = {}

        def pack(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                st = x.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn()
        total = float(sum(seen.values()) + loss.untyped_storage().nbytes())
        inputs = sum(seen.get(t.untyped_storage().data_ptr(), 0) for t in (h, w, b, y))
        del loss
        return total, total - inputs

    mf = saved(lambda: c.linear_loss(h, w, y, b))
    md = saved(lambda: c.loss(h @ w + b, y))
    return {"kind": "lv-memory", "path": "torch", "shape": [n, d, v],
            "fused_mb": mf[1] / 2**20, "dense_mb": md[1] / 2**20, "ratio": mf[1] / md[1],
            "fused_with_inputs_mb": mf[0] / 2**20, "dense_with_inputs_mb": md[0] / 2**20,
            "ratio_with_inputs": mf[0] / md[0], "target": MEMORY_TARGET, "met": mf[1] / md[1] <= MEMORY_TARGET}


def torch_speed(n: int, d: int, v: int, repeats: int = 3) -> dict[str, Any]:
    """Forward+backward of the fused and the dense path, alternated (the gradients of hidden,
    kernel and bias)."""
    import torch

    c, h, w, b, y, params = _torch_setup(n, d, v)

    def fused() -> Any:
        loss = c.linear_loss(h, w, y, b)
        return loss, torch.autograd.grad(loss, params)

    def dense() -> Any:
        loss = c.loss(h @ w + b, y)
        return loss, torch.autograd.grad(loss, params)

    tf, td, ratio = pairs(fused, dense, repeats, lambda x: x)
    return {"kind": "lv-speed", "path": "torch", "against": "unihead dense", "shape": [n, d, v],
            "fused_s": tf, "other_s": td, "ratio": ratio, "target": SPEED_TARGET, "met": ratio <= SPEED_TARGET}


def torch_native(n: int, d: int, v: int, repeats: int = 1) -> dict[str, Any]:
    """The fused path against ``F.linear_cross_entropy`` with its chunked path opted in."""
    import warnings

    import torch

    c, h, w, b, y, params = _torch_setup(n, d, v)
    wt = w.detach().T.contiguous().requires_grad_()  # PyTorch's (out, in) layout, its own parameter
    options = torch.nn.LinearCrossEntropyOptions()

    def fused() -> Any:
        loss = c.linear_loss(h, w, y, b)
        return loss, torch.autograd.grad(loss, params)

    def native() -> Any:
        loss = torch.nn.functional.linear_cross_entropy(h, wt, y, linear_bias=b, options=options)
        return loss, torch.autograd.grad(loss, [h, wt, b])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf, tn, ratio = pairs(fused, native, repeats, lambda x: x)
    return {"kind": "lv-speed", "path": "torch", "against": "F.linear_cross_entropy (chunked)",
            "shape": [n, d, v], "fused_s": tf, "other_s": tn, "ratio": ratio, "target": NATIVE_TARGET,
            "met": ratio <= NATIVE_TARGET}


def _torch(quick: bool) -> list[dict[str, Any]]:
    rows = [torch_memory(*s) for s in SHAPES]
    rows += [torch_speed(*s) for s in (QUICK_SHAPES if quick else SHAPES)]
    rows.append(torch_native(*NATIVE_SHAPE))
    return rows


# ------------------------------------------------------------------------------------------ jax
def _jax(quick: bool) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import optax

    import unihead
    from unihead import ClassificationHead

    rows: list[dict[str, Any]] = []
    for n, d, v in SHAPES + (QUICK_SHAPES if quick else ()):
        timed = (n, d, v) in (QUICK_SHAPES if quick else SHAPES)
        measured = (n, d, v) in SHAPES
        c = unihead.compile(ClassificationHead.multiclass(v), "jax", validate=False)
        h, w, b, y = (jnp.asarray(x) for x in data(n, d, v))
        step = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        fused = step(lambda h_, w_, b_, y_: c.linear_loss(h_, w_, y_, b_))
        dense = step(lambda h_, w_, b_, y_: c.loss(h_ @ w_ + b_, y_))
        native = step(lambda h_, w_, b_, y_: optax.softmax_cross_entropy_with_integer_labels(h_ @ w_ + b_, y_).mean())

        def size(fn: Callable) -> float:
            m = fn.lower(h, w, b, y).compile().memory_analysis()
            return float(m.temp_size_in_bytes + m.output_size_in_bytes)

        if measured:
            sf, sd, so = size(fused), size(dense), size(native)
            grads = 4.0 * (n * d + d * v + v) + 4  # the outputs: the loss and three gradients, alike
            rows.append({"kind": "lv-memory", "path": "jax", "shape": [n, d, v],
                         "fused_mb": (sf - grads) / 2**20, "dense_mb": (sd - grads) / 2**20,
                         "ratio": (sf - grads) / (sd - grads),
                         "fused_with_inputs_mb": sf / 2**20, "dense_with_inputs_mb": sd / 2**20,
                         "ratio_with_inputs": sf / sd, "optax_mb": (so - grads) / 2**20,
                         "target": MEMORY_TARGET, "met": (sf - grads) / (sd - grads) <= MEMORY_TARGET})
        if not timed:
            continue
        sync = jax.block_until_ready
        tf, td, ratio = pairs(lambda: fused(h, w, b, y), lambda: dense(h, w, b, y), 3, sync)
        rows.append({"kind": "lv-speed", "path": "jax", "against": "unihead dense", "shape": [n, d, v],
                     "fused_s": tf, "other_s": td, "ratio": ratio, "target": SPEED_TARGET, "met": ratio <= SPEED_TARGET})
        tf, to, ratio = pairs(lambda: fused(h, w, b, y), lambda: native(h, w, b, y), 3, sync)
        rows.append({"kind": "lv-speed", "path": "jax", "against": "optax dense", "shape": [n, d, v],
                     "fused_s": tf, "other_s": to, "ratio": ratio, "target": None, "met": True})
    return rows


# ---------------------------------------------------------------------------------------- keras
def _keras_jax(quick: bool) -> list[dict[str, Any]]:
    """Keras on JAX: the Keras head's ``linear_loss`` (what ``FusedHeadModel`` trains with)
    against Keras' own dense ``SparseCategoricalCrossentropy(from_logits=True)`` of
    ``keras.ops.matmul(h, W) + b``, both differentiated by ``jax.value_and_grad`` under
    ``jax.jit`` (Keras' train step on JAX): memory at the section's shapes, speed at the quick
    shape (Keras has no fused loss of its own)."""
    import jax
    import jax.numpy as jnp
    import keras

    import unihead
    from unihead import ClassificationHead

    rows: list[dict[str, Any]] = []
    for n, d, v in SHAPES + QUICK_SHAPES:
        c = unihead.compile(ClassificationHead.multiclass(v), "keras", validate=False)
        native_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        h, w, b, y = (jnp.asarray(x) for x in data(n, d, v))
        step = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        fused = step(lambda h_, w_, b_, y_: c.linear_loss(h_, w_, y_, b_))
        native = step(lambda h_, w_, b_, y_: native_loss(y_, keras.ops.matmul(h_, w_) + b_))
        if (n, d, v) in SHAPES:
            grads = 4.0 * (n * d + d * v + v) + 4
            m = [fn.lower(h, w, b, y).compile().memory_analysis() for fn in (fused, native)]
            sf, sn = (float(x.temp_size_in_bytes + x.output_size_in_bytes) for x in m)
            rows.append({"kind": "lv-memory", "path": "keras-jax", "against": "Keras dense", "shape": [n, d, v],
                         "fused_mb": (sf - grads) / 2**20, "dense_mb": (sn - grads) / 2**20,
                         "ratio": (sf - grads) / (sn - grads),
                         "fused_with_inputs_mb": sf / 2**20, "dense_with_inputs_mb": sn / 2**20,
                         "ratio_with_inputs": sf / sn, "target": None, "met": True})  # a reference
        else:
            tf, tn, ratio = pairs(lambda: fused(h, w, b, y), lambda: native(h, w, b, y), 3, jax.block_until_ready)
            rows.append({"kind": "lv-speed", "path": "keras-jax", "against": "Keras dense (jax.jit)", "shape": [n, d, v],
                         "fused_s": tf, "other_s": tn, "ratio": ratio, "target": None, "met": True})
    return rows


def run(path: str, quick: bool) -> list[dict[str, Any]]:
    """The section's rows for one path of benchmarks/run.py: ``torch``, ``jax`` and
    ``keras-jax`` (the Keras head on JAX against Keras' dense loss); none for the others."""
    if path == "torch":
        return _torch(quick)
    if path == "jax":
        return _jax(quick)
    if path == "keras-jax":
        return _keras_jax(quick)
    return []


def table(rows: list[dict[str, Any]], section: Callable[[str, list[str], list[list[str]]], None]) -> None:
    """The section's two tables, through run.py's ``section`` printer."""
    fmt = lambda s: "N={}, D={}, V={}".format(*s)
    mem = [r for r in rows if r["kind"] == "lv-memory"]
    if mem:
        section("Large vocabulary: memory of forward+backward, fused linear_loss / dense loss(h @ W + b) "
                "(torch: saved tensors + loss, without / with the inputs h, W, b; jax: XLA temp + output, "
                "without / with the three gradients)",
                ["path", "shape", "ratio", "target", "", "fused MiB", "dense MiB", "ratio with inputs",
                 "fused MiB", "dense MiB"],
                [[r["path"] + (f" (vs {r['against']})" if "against" in r else ""), fmt(r["shape"]), f"{r['ratio']:.4f}", "" if r["target"] is None else f"<= {r['target']:.2f}",
                  "" if r["target"] is None else ("ok" if r["met"] else "MISS"),
                  f"{r['fused_mb']:.1f}", f"{r['dense_mb']:.1f}", f"{r['ratio_with_inputs']:.3f}",
                  f"{r['fused_with_inputs_mb']:.1f}", f"{r['dense_with_inputs_mb']:.1f}"] for r in mem])
    sp = [r for r in rows if r["kind"] == "lv-speed"]
    if sp:
        section("Large vocabulary: forward+backward time, fused linear_loss / other (median of alternated calls)",
                ["path", "against", "shape", "ratio", "target", "", "fused s", "other s"],
                [[r["path"], r["against"], fmt(r["shape"]), f"{r['ratio']:.3f}",
                  "" if r["target"] is None else f"<= {r['target']:.2f}",
                  "" if r["target"] is None else ("ok" if r["met"] else "MISS"),
                  f"{r['fused_s']:.2f}", f"{r['other_s']:.2f}"] for r in sp])
