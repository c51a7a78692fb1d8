"""How the conformance suite runs one case on one backend.

Every adapter returns, as NumPy arrays: ``probabilities``, ``log_probabilities``, ``none`` (the
per-example losses), ``loss`` (the head's reduction), ``predict`` and ``grad`` (the gradient of the
loss, or of the sum of per-example losses, with respect to the logits, by the framework's *own*
autodiff).  Logits are passed in the case's dtype (bfloat16 as the framework's bfloat16).

The "split" dimension (:func:`~unihead.conformance.cases.split_pieces`): the case's batch is also
evaluated in uneven pieces, combined the way the contract of docs/semantics.md §7 says a training
step does: ``W`` = the sum of the pieces' ``loss_weight``, each piece's
``loss(piece, normalizer=W)`` (a ``reduction="mean"`` head; a ``"sum"`` head adds its pieces'
losses, a ``"none"`` head's per-example values are the pieces' values put back in place), the
pieces' losses added up in the framework, and each piece's gradient by the framework's autodiff
(NumPy: its analytic gradient of the total, over ``W``), put back in place.  Beside it the
pieces' ``loss_terms`` are added up: ``split_terms`` (sum of totals over the sum of weights; the
total for ``"sum"`` and ``"none"``) and ``split_weight`` (the sum of their weights, which must be
``split_W``, the sum of ``loss_weight``).

Third-party implementations plug in with ``--backend package.module:compile_head`` or an entry
point in the ``unihead.backends`` group: the object is called as ``compile_head(head)`` and must
return an object with the :class:`unihead.CompiledHead` methods; the gradient is read from its
``loss_and_gradient(logits, labels, sample_weight)`` if it has one (NumPy-style).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import numpy as np

from .cases import Case, sharded_bounds, split_pieces

__all__ = ["BUILTIN", "Adapter", "make_adapter", "KERAS_BACKENDS"]

KERAS_BACKENDS = ("jax", "torch", "tensorflow")
#: name -> (display name, import names that must be installed)
BUILTIN = {
    "numpy": ("numpy", ()),
    "torch": ("torch", ("torch",)),
    "jax": ("jax", ("jax",)),
    "flax": ("flax", ("jax", "flax")),
    "keras-jax": ("keras (jax)", ("keras", "jax")),
    "keras-torch": ("keras (torch)", ("keras", "torch")),
    "keras-tensorflow": ("keras (tensorflow)", ("keras", "tensorflow")),
}


def missing(name: str) -> list[str]:
    """The framework imports ``name`` needs that are not installed."""
    needs = BUILTIN.get(name, ("", ()))[1]
    return [m for m in needs if importlib.util.find_spec(m) is None]


#: The fused columns run cases of at most this many classes: their kernel is the ``K x K``
#: identity, 64 MiB at 4096 classes in float32 and 4 GB at 32000, where a full run on a 24 GB
#: machine ran out of memory (the fused path at large class counts: tests/test_fused.py and the
#: large-vocabulary benchmark).
FUSED_MAX_CLASSES = 4096


class Adapter:
    """Runs cases on one backend.  Subclasses implement :meth:`arrays` and :meth:`compile`."""

    name = "?"
    has_grad = True

    def __init__(self) -> None:
        self._cache: dict[Any, Any] = {}

    def compiled(self, head: Any) -> Any:
        if head not in self._cache:
            self._cache[head] = self.compile(head)
        return self._cache[head]

    def compile(self, head: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def flushes_subnormals(self) -> bool:
        """Probe: sigmoid(-100) = 3.7e-44 is a float32 subnormal; flush-to-zero gives 0."""
        from unihead.spec import ClassificationHead

        head = ClassificationHead.binary()
        p = self.to_numpy(self.compiled(head).probabilities(self.logits(np.array([[-100.0]], np.float32), "float32")))
        return float(np.ravel(p)[0]) == 0.0

    def logits(self, z: np.ndarray, dtype: str) -> Any:
        return z.astype(dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        """An output on the host as NumPy, half precision as float32 (NumPy has no bfloat16 of its
        own): the backend's own reading (:meth:`unihead._ops.Ops.to_numpy`) where its compiled
        heads have unihead's primitives, else ``np.asarray``."""
        ops = self.__dict__.get("_ops", False)
        if ops is False:
            from unihead._ops import Ops
            from unihead.spec import ClassificationHead

            ops = getattr(self.compiled(ClassificationHead.binary()), "ops", None)
            ops = self._ops = ops if isinstance(ops, Ops) else None
        if ops is not None:
            return np.asarray(ops.to_numpy(x))
        x = np.asarray(x)
        return x.astype(np.float32) if x.dtype.name in ("bfloat16", "float16") else x

    def value_and_grad(self, compiled: Any, z: Any, y: Any, sw: Any, normalizer: Any = None) -> tuple[Any, Any]:
        """The loss (``normalizer`` passed on) and its gradient with respect to ``z`` (of the sum
        of the per-example values for ``reduction="none"``)."""
        raise NotImplementedError  # pragma: no cover

    def splits(self, compiled: Any) -> bool:
        """Whether this backend's heads have the contract the split dimension runs through."""
        return hasattr(compiled, "loss_weight") and hasattr(compiled, "loss_terms")

    def split(self, c: Any, zs: list, ys: list, sws: list, dtype: str) -> dict[str, Any]:
        """The pieces combined through the contract, as the backend's arrays (see the module
        docstring); ``dtype``: the case's compute dtype, ``loss_weight``'s."""
        wdtype = "float64" if dtype == "float64" else "float32"
        big_w = _added([self.piece_weight(c, y, sw, wdtype) for y, sw in zip(ys, sws)])
        pieces = [self.piece(c, z, y, sw, big_w) for z, y, sw in zip(zs, ys, sws)]
        losses = [p[0] for p in pieces]
        return {
            "W": big_w, "terms_total": _added([p[2] for p in pieces]), "terms_weight": _added([p[3] for p in pieces]),
            "loss": losses if c.head.reduction == "none" else _added(losses), "grads": [p[1] for p in pieces],
        }

    def piece_weight(self, c: Any, y: Any, sw: Any, dtype: str) -> Any:
        """One piece's ``loss_weight``."""
        return c.loss_weight(y, sw, dtype=dtype)

    def piece(self, c: Any, z: Any, y: Any, sw: Any, big_w: Any) -> tuple[Any, Any, Any, Any]:
        """One piece: its loss (``normalizer=W`` for a mean), the gradient, and its
        ``loss_terms``."""
        loss, grad = self.value_and_grad(c, z, y, sw, big_w if c.head.reduction == "mean" else None)
        total, weight = c.loss_terms(z, y, sw)
        return loss, grad, total, weight

    def fuses(self, c: Any) -> bool:
        """Whether this backend's head ``c`` has the fused linear loss (``linear_loss``) and the
        case's identity kernel is small enough (:data:`FUSED_MAX_CLASSES`)."""
        from unihead import _fused

        return (hasattr(c, "linear_loss") and _fused.unsupported(c.head) is None
                and c.head.num_outputs <= FUSED_MAX_CLASSES)

    def fused_value_and_grad(self, c: Any, h: Any, w: Any, y: Any, sw: Any, chunk: int) -> tuple[Any, Any]:
        """``c.linear_loss(h, w, y, None, sw)`` and its gradient with respect to ``h`` (of the sum
        for ``reduction="none"``) by the framework's autodiff; None where it has none."""
        return c.linear_loss(h, w, y, None, sw, chunk_size=chunk), None

    def fused_outputs(self, case: Case, c: Any) -> dict[str, Any]:
        """The fused columns (``FUSED_NOTE`` in the suite): the case's logits as ``hidden`` times
        the identity kernel, in chunks of a third of the classes (the last one narrower)."""
        if not np.all(np.isfinite(case.logits)):
            return {}
        k = case.head.num_outputs
        h = self.logits(case.logits, case.dtype)
        w = self.logits(np.eye(k, dtype=np.float32), case.dtype)
        chunk = max(1, (k + 2) // 3)
        y, sw = case.labels, case.sample_weight
        per = self.compiled(case.head.replace(reduction="none")).linear_loss(h, w, y, None, sw, chunk_size=chunk)
        loss, grad = self.fused_value_and_grad(c, h, w, y, sw, chunk)
        out = {"fused_none": per, "fused_loss": loss, "fused_grad": grad}
        return {k_: self.to_numpy(v) for k_, v in out.items() if v is not None}

    def shards(self, c: Any) -> bool:
        """Whether this backend's head ``c`` has the class-sharded loss (``CompiledHead._class_sharded``
        with the backend's ops: the public functions add only their collectives)."""
        from unihead import _sharded

        return hasattr(c, "_class_sharded") and hasattr(c, "ops") and _sharded.unsupported(c.head, "") is None

    def sharded_outputs(self, case: Case, c: Any) -> dict[str, Any]:
        """The sharded column (``SHARDED_NOTE`` in the suite): the case's classes in 2-3 uneven
        shards, their statistics merged by :func:`unihead._sharded.stacked_rows` (the reduction
        the collectives run), through the head's weights and reduction."""
        from unihead import _fused, _sharded

        k = case.head.num_outputs
        bounds = sharded_bounds(k)
        spec = _fused.row_spec(c._engine())

        def rows(z: Any, y: Any, start: Any) -> Any:
            shards = [z[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            return _sharded.stacked_rows(c.ops, shards, y, list(bounds[:-1]), spec=spec).loss

        z = self.logits(case.logits, case.dtype)
        y, sw = case.labels, case.sample_weight
        none = self.compiled(case.head.replace(reduction="none"))
        out = {"sharded_none": none._class_sharded("sharded", z, y, sw, 0, rows),
               "sharded_loss": c._class_sharded("sharded", z, y, sw, 0, rows)}
        return {k_: self.to_numpy(v) for k_, v in out.items()}

    def split_outputs(self, case: Case, c: Any) -> dict[str, Any]:
        """:meth:`split` of :func:`split_pieces` of ``case`` (on the host, NumPy)."""
        pieces = split_pieces(case)
        sw = case.sample_weight
        res = self.split(c, [self.logits(case.logits[i], case.dtype) for i in pieces],
                         [case.labels[i] for i in pieces], [None if sw is None else sw[i] for i in pieces], case.dtype)
        return self.assemble(case, pieces, res)

    def assemble(self, case: Case, pieces: list[np.ndarray], res: dict[str, Any]) -> dict[str, np.ndarray]:
        """The pieces' results in the whole batch's places (host copies: no arithmetic)."""
        order = np.concatenate(pieces).astype(np.int64)
        out = {"split_W": self.to_numpy(res["W"]), "split_weight": self.to_numpy(res["terms_weight"])}
        total, weight = (np.float64(self.to_numpy(res[k])) for k in ("terms_total", "terms_weight"))
        if case.head.reduction == "mean":  # the mean the terms give, 0 for a weight of 0
            out["split_terms"] = np.asarray(total / weight if weight > 0 else 0.0)
        else:
            out["split_terms"] = np.asarray(total)
        if case.head.reduction == "none":
            values = [self.to_numpy(v) for v in res["loss"]]
            full = np.zeros(case.logits.shape[:-1], values[0].dtype)
            full[order] = np.concatenate(values)
            out["split_loss"] = full
        else:
            out["split_loss"] = self.to_numpy(res["loss"])
        if all(g is not None for g in res["grads"]):
            grads = [self.to_numpy(g) for g in res["grads"]]
            full = np.zeros(case.logits.shape, grads[0].dtype)
            full[order] = np.concatenate(grads)
            out["split_grad"] = full
        return out

    def run(self, case: Case) -> dict[str, np.ndarray]:
        c = self.compiled(case.head)
        none = self.compiled(case.head.replace(reduction="none"))
        z = self.logits(case.logits, case.dtype)
        y, sw = case.labels, case.sample_weight
        out = {
            "probabilities": c.probabilities(z),
            "log_probabilities": c.log_probabilities(z),
            "none": none.loss(z, y, sw),
            "predict": c.predict(z),
        }
        loss, grad = self.value_and_grad(c, self.logits(case.logits, case.dtype), y, sw)
        out["loss"], out["grad"] = loss, grad
        out = {k: self.to_numpy(v) for k, v in out.items() if v is not None}
        out.update(self.contract_outputs(case, c))
        return out

    def contract_outputs(self, case: Case, c: Any) -> dict[str, np.ndarray]:
        """The case through the contract's other routes, where this backend's head has them:
        in pieces (split), as a fused linear + loss, over class shards."""
        out: dict[str, np.ndarray] = {}
        if self.splits(c):
            out.update(self.split_outputs(case, c))
        if self.fuses(c):
            out.update(self.fused_outputs(case, c))
        if self.shards(c):
            out.update(self.sharded_outputs(case, c))
        return out


def _added(values: list) -> Any:
    """The values added up in order, by the framework's own ``+`` (how a training loop adds a
    step's micro-batches)."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _bf16_numpy(z: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return z.astype(ml_dtypes.bfloat16)


class NumpyAdapter(Adapter):
    name = "numpy"

    def compile(self, head: Any) -> Any:
        import unihead

        return unihead.compile(head, "numpy")

    def logits(self, z: np.ndarray, dtype: str) -> Any:
        return _bf16_numpy(z) if dtype == "bfloat16" else z.astype(dtype)

    def value_and_grad(self, compiled: Any, z: Any, y: Any, sw: Any, normalizer: Any = None) -> tuple[Any, Any]:
        return _analytic(self, compiled, z, y, sw, normalizer)


def _analytic(adapter: Adapter, compiled: Any, z: Any, y: Any, sw: Any, normalizer: Any) -> tuple[Any, Any]:
    """``loss_and_gradient`` (NumPy-style, analytic); with ``normalizer``, the loss of
    ``loss(..., normalizer=W)`` and the gradient of that quotient by the chain rule: the
    gradient of the total (the head with ``reduction="sum"``) over ``W`` (0 where ``W`` is 0)."""
    if normalizer is None:
        return compiled.loss_and_gradient(z, y, sw)
    loss = compiled.loss(z, y, sw, normalizer=normalizer)
    _, g = adapter.compiled(compiled.head.replace(reduction="sum")).loss_and_gradient(z, y, sw)
    w = np.asarray(normalizer).astype(g.dtype)
    return loss, (g / w if w > 0 else np.zeros_like(g))


class TorchAdapter(Adapter):
    name = "torch"

    def compile(self, head: Any) -> Any:
        import unihead

        return unihead.compile(head, "torch")

    def logits(self, z: np.ndarray, dtype: str) -> Any:
        import torch

        t = torch.as_tensor(np.asarray(z, np.float64 if dtype == "float64" else np.float32))
        return t.to({"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[dtype])

    def value_and_grad(self, compiled: Any, z: Any, y: Any, sw: Any, normalizer: Any = None) -> tuple[Any, Any]:
        z = z.detach().requires_grad_()
        loss = compiled.loss(z, y, sw) if normalizer is None else compiled.loss(z, y, sw, normalizer=normalizer)
        loss.sum().backward()
        return loss.detach(), z.grad

    def fused_value_and_grad(self, c: Any, h: Any, w: Any, y: Any, sw: Any, chunk: int) -> tuple[Any, Any]:
        h = h.detach().requires_grad_()
        loss = c.linear_loss(h, w, y, None, sw, chunk_size=chunk)
        loss.sum().backward()
        return loss.detach(), h.grad


class JaxAdapter(Adapter):
    name = "jax"

    def compile(self, head: Any) -> Any:
        import unihead

        return unihead.compile(head, "jax")

    def logits(self, z: np.ndarray, dtype: str) -> Any:
        import jax.numpy as jnp

        return jnp.asarray(np.asarray(z, np.float32 if dtype != "float64" else np.float64), dtype=getattr(jnp, dtype))

    def value_and_grad(self, compiled: Any, z: Any, y: Any, sw: Any, normalizer: Any = None) -> tuple[Any, Any]:
        import jax

        def loss(t: Any) -> Any:
            return compiled.loss(t, y, sw) if normalizer is None else compiled.loss(t, y, sw, normalizer=normalizer)

        return loss(z), jax.grad(lambda t: loss(t).sum())(z)

    def jitted(self, head: Any) -> Any:
        """All outputs of one head as one ``jax.jit`` program (how JAX training runs a loss; one
        compilation per head and input signature instead of one per primitive)."""
        key = ("jit", head)
        if key not in self._cache:
            import jax

            c, none = self.compiled(head), self.compiled(head.replace(reduction="none"))

            def outputs(z: Any, y: Any, sw: Any) -> dict[str, Any]:
                loss, grad = self.value_and_grad(c, z, y, sw)
                return {"probabilities": c.probabilities(z), "log_probabilities": c.log_probabilities(z),
                        "none": none.loss(z, y, sw), "predict": c.predict(z), "loss": loss, "grad": grad}

            self._cache[key] = jax.jit(outputs)
        return self._cache[key]

    def split(self, c: Any, zs: list, ys: list, sws: list, dtype: str) -> dict[str, Any]:
        """The split as one ``jax.jit`` program per head and piece shapes (as a JAX step that
        accumulates its micro-batches runs: ``W`` and every piece traced together), one
        compilation per case instead of two per piece."""
        key = ("split", c.head, dtype)
        if key not in self._cache:
            import jax

            self._cache[key] = jax.jit(lambda zs, ys, sws: Adapter.split(self, c, zs, ys, sws, dtype))
        return self._cache[key](zs, ys, sws)

    def fused_outputs(self, case: Case, c: Any) -> dict[str, Any]:
        key = ("fused", case.head)
        if key not in self._cache:  # one jax.jit program per head (loss, per-example, gradient)
            import jax

            none = self.compiled(case.head.replace(reduction="none"))
            k = case.head.num_outputs
            chunk = max(1, (k + 2) // 3)

            def outputs(h: Any, w: Any, y: Any, sw: Any) -> dict[str, Any]:
                loss = lambda t: c.linear_loss(t, w, y, None, sw, chunk_size=chunk)
                return {"fused_none": none.linear_loss(h, w, y, None, sw, chunk_size=chunk),
                        "fused_loss": loss(h), "fused_grad": jax.grad(lambda t: loss(t).sum())(h)}

            self._cache[key] = jax.jit(outputs)
        if not np.all(np.isfinite(case.logits)):
            return {}
        k = case.head.num_outputs
        out = self._cache[key](self.logits(case.logits, case.dtype), self.logits(np.eye(k, dtype=np.float32), case.dtype),
                               case.labels, case.sample_weight)
        return {k_: self.to_numpy(v) for k_, v in out.items()}

    def run(self, case: Case) -> dict[str, np.ndarray]:
        import jax

        with jax.enable_x64(case.dtype == "float64"):
            out = self.jitted(case.head)(self.logits(case.logits, case.dtype), case.labels, case.sample_weight)
            out = {k: self.to_numpy(v) for k, v in out.items()}
            out.update(self.contract_outputs(case, self.compiled(case.head)))
            return out


class FlaxAdapter(JaxAdapter):
    """The Flax layer in the loop: each case's logits are computed by the head's ``nnx`` layer
    (:class:`unihead.backends.flax.HeadLinear` of ``K`` inputs holding the known kernel ``I`` and
    bias ``0``: ``x @ I + 0`` is ``x`` exactly, in every dtype), under ``nnx.jit``, and the
    gradient is the one with respect to the layer's input (``jax.grad`` through the layer, the
    loss's ``custom_vjp`` and the matmul's transpose: ``g @ I``, exact).  A case with infinite
    logits (the masked regime) cannot come out of a finite layer (``-inf * 0`` is NaN), and a
    case of more than :data:`FUSED_MAX_CLASSES` classes would need a ``K x K`` kernel (4 GB at
    32000 classes, with its copies in the jitted program: a full run ran out of memory on 24 GB):
    both run on the compiled head directly, as on ``jax``.  The split columns run the compiled
    head's ``loss_weight``/``loss_terms`` as on ``jax``."""

    name = "flax"

    def compile(self, head: Any) -> Any:
        import unihead

        return unihead.compile(head, "flax")

    def layered(self, head: Any, dtype: str) -> tuple[Any, Any]:
        """``(layer, program)``: the identity layer of ``head`` in ``dtype`` and the ``nnx.jit``
        program of all outputs from the layer's input."""
        key = ("layer", head, dtype)
        if key not in self._cache:
            import jax
            import jax.numpy as jnp
            from flax import nnx

            c, none = self.compiled(head), self.compiled(head.replace(reduction="none"))
            k = head.num_outputs
            # one layer at a time: the identity kernel of 32000 classes is 4 GB (a full run kept
            # every case's layer and ran out of memory)
            for old in [key_ for key_ in self._cache if isinstance(key_, tuple) and key_[0] == "layer"]:
                del self._cache[old]
            wdt = np.float64 if dtype == "float64" else np.float32  # exact for bfloat16 too
            layer = c.layer(k, weights=(np.eye(k, dtype=wdt), np.zeros(k, wdt)), param_dtype=getattr(jnp, dtype))

            @nnx.jit
            def outputs(layer: Any, x: Any, y: Any, sw: Any) -> dict[str, Any]:
                z = layer(x)
                grad = jax.grad(lambda t: c.loss(layer(t), y, sw).sum())(x)
                return {"probabilities": c.probabilities(z), "log_probabilities": c.log_probabilities(z),
                        "none": none.loss(z, y, sw), "predict": c.predict(z), "loss": c.loss(z, y, sw),
                        "grad": grad}

            self._cache[key] = (layer, outputs)
        return self._cache[key]

    def run(self, case: Case) -> dict[str, np.ndarray]:
        if not np.all(np.isfinite(case.logits)) or case.head.num_outputs > FUSED_MAX_CLASSES:
            return JaxAdapter.run(self, case)
        import jax

        with jax.enable_x64(case.dtype == "float64"):
            layer, outputs = self.layered(case.head, case.dtype)
            out = outputs(layer, self.logits(case.logits, case.dtype), case.labels, case.sample_weight)
            out = {k: self.to_numpy(v) for k, v in out.items()}
            c = self.compiled(case.head)
            if self.splits(c):
                out.update(self.split_outputs(case, c))
            return out


class KerasAdapter(Adapter):
    """Keras on the backend this process runs (``KERAS_BACKEND``)."""

    def __init__(self, xla: bool = False) -> None:
        super().__init__()
        import keras

        self.backend = keras.backend.backend()
        self.name = f"keras-{self.backend}"
        # TensorFlow: run each case as one tf.function(jit_compile=True) program, as Keras' train
        # step does (unihead takes XLA's float32 log and log1p there, Eigen's float64 ones outside)
        self.xla = xla and self.backend == "tensorflow"

    def compile(self, head: Any) -> Any:
        import unihead

        return unihead.compile(head, "keras")

    def logits(self, z: np.ndarray, dtype: str) -> Any:
        from keras import ops

        return ops.cast(ops.convert_to_tensor(np.asarray(z, np.float64 if dtype == "float64" else np.float32)), dtype)

    def value_and_grad(self, compiled: Any, z: Any, y: Any, sw: Any, normalizer: Any = None) -> tuple[Any, Any]:
        if self.backend == "jax":
            return JaxAdapter.value_and_grad(self, compiled, z, y, sw, normalizer)
        if self.backend == "torch":
            return TorchAdapter.value_and_grad(self, compiled, z, y, sw, normalizer)
        import tensorflow as tf

        v = tf.Variable(z)
        with tf.GradientTape() as tape:
            loss = compiled.loss(v, y, sw) if normalizer is None else compiled.loss(v, y, sw, normalizer=normalizer)
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, v)

    def run(self, case: Case) -> dict[str, np.ndarray]:
        if self.backend == "jax":  # Keras trains jitted on JAX: run the case as one program
            return JaxAdapter.run(self, case)
        if self.xla:
            return self._run_xla(case)
        return super().run(case)

    jitted = JaxAdapter.jitted

    def fused_outputs(self, case: Case, c: Any) -> dict[str, Any]:
        if self.backend == "jax":  # one jax.jit program per head, as JAX (and Keras' trainer) runs it
            return JaxAdapter.fused_outputs(self, case, c)
        return super().fused_outputs(case, c)

    def fused_value_and_grad(self, c: Any, h: Any, w: Any, y: Any, sw: Any, chunk: int) -> tuple[Any, Any]:
        if self.backend == "torch":
            return TorchAdapter.fused_value_and_grad(self, c, h, w, y, sw, chunk)
        import tensorflow as tf

        v = tf.Variable(h)
        with tf.GradientTape() as tape:
            loss = c.linear_loss(v, w, y, None, sw, chunk_size=chunk)
            total = tf.reduce_sum(loss)
        return loss, tape.gradient(total, v)

    def shards(self, c: Any) -> bool:
        return False  # the class-sharded loss is PyTorch's and JAX's (docs/large-vocabulary.md)

    def split(self, c: Any, zs: list, ys: list, sws: list, dtype: str) -> dict[str, Any]:
        if self.backend == "jax":
            return JaxAdapter.split(self, c, zs, ys, sws, dtype)
        return super().split(c, zs, ys, sws, dtype)

    def _run_xla(self, case: Case) -> dict[str, np.ndarray]:
        import tensorflow as tf

        c, none = self.compiled(case.head), self.compiled(case.head.replace(reduction="none"))
        y = tf.constant(case.labels)
        sw = None if case.sample_weight is None else tf.constant(case.sample_weight)

        @tf.function(jit_compile=True)
        def outputs(z: Any) -> dict[str, Any]:
            with tf.GradientTape() as tape:
                tape.watch(z)
                loss = c.loss(z, y, sw)
                total = tf.reduce_sum(loss)
            return {"probabilities": c.probabilities(z), "log_probabilities": c.log_probabilities(z),
                    "none": none.loss(z, y, sw), "predict": c.predict(z), "loss": loss,
                    "grad": tape.gradient(total, z)}

        out = outputs(self.logits(case.logits, case.dtype))
        out = {k: self.to_numpy(v) for k, v in out.items()}
        out.update(self.contract_outputs(case, c))  # eager, as a loop over micro-batches runs
        return out


class ThirdPartyAdapter(Adapter):
    """An implementation given as ``compile_head(head)`` (entry point or ``module:object``)."""

    def __init__(self, name: str, compile_head: Callable[..., Any]):
        super().__init__()
        self.name = name
        self._compile_head = compile_head
        self.has_grad = None  # decided by the first compiled head

    def compile(self, head: Any) -> Any:
        compiled = self._compile_head(head)
        if self.has_grad is None:
            self.has_grad = hasattr(compiled, "loss_and_gradient")
        return compiled

    def logits(self, z: np.ndarray, dtype: str) -> Any:
        return _bf16_numpy(z) if dtype == "bfloat16" else z.astype(dtype)

    def value_and_grad(self, compiled: Any, z: Any, y: Any, sw: Any, normalizer: Any = None) -> tuple[Any, Any]:
        if hasattr(compiled, "loss_and_gradient"):
            return _analytic(self, compiled, z, y, sw, normalizer)
        if normalizer is None:
            return compiled.loss(z, y, sw), None
        return compiled.loss(z, y, sw, normalizer=normalizer), None


def make_adapter(name: str) -> Adapter:
    """The adapter for a built-in backend name (Keras: the one this process runs on), a
    ``unihead.backends`` entry point, or ``module:object``."""
    if name == "numpy":
        return NumpyAdapter()
    if name == "torch":
        return TorchAdapter()
    if name == "jax":
        return JaxAdapter()
    if name == "flax":
        return FlaxAdapter()
    if name.startswith("keras"):
        return KerasAdapter()
    from unihead._registry import load_backend

    return ThirdPartyAdapter(name, load_backend(name))
