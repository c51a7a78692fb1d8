"""JAX backend: ``unihead.compile(head, "jax")``.

Pure functions over arrays and pytrees, the way JAX code is written:

* ``compiled.loss(logits, labels, sample_weight=None)`` is a pure function with a
  ``jax.custom_vjp`` carrying the analytic gradient; it works under ``jax.jit``, ``jax.grad``,
  ``jax.value_and_grad`` and ``jax.vmap``, with ``jax_enable_x64`` on or off;
* ``compiled.layer(in_features)`` gives :class:`Dense` with ``init(key) -> params`` (the
  ``{"kernel": (in, out), "bias": (out,)}`` layout of ``flax.linen.Dense`` / ``flax.nnx.Linear``)
  and ``apply(params, x) -> logits``;
* bfloat16/float16 logits are computed in float32.

The math is the shared formula code running on ``jax.numpy`` (an Array API namespace).  Under
XLA the backward pass recomputes the softmax statistics from the logits instead of saving them:
the recomputation fuses into the backward kernel and saves a ``(..., K)`` buffer.  float32
exponentials of shifted logits use the shared polynomial exponential
(:func:`unihead.formulas.shifted_exp`, ``JaxOps.poly_exp``), which XLA fuses into one loop at
about the cost of its own ``exp(z - m)``; this module adds only ``2**n`` from exponent bits.

Validation: shape and dtype checks always run (shapes are static).  Values are checked eagerly
where they exist (eager calls; constants inside ``jit``).  Where labels or weights are traced
(``jit``, ``vmap``, ``scan``) the loss emits the same checks, with the same messages, as
``jax.experimental.checkify`` checks (``checkify.debug_check``): they run when the caller wraps
the function with ``checkify.checkify``, and are dropped otherwise (nothing of them is left in the
compiled program, and a traced call never raises a ``ConcretizationTypeError``)::

    step = checkify.checkify(jax.jit(train_step))
    err, out = step(params, x, y)
    err.throw()  # ValueError: labels[2] = 7 is not a class id: ... (`check` failed)

Without ``checkify``, values inside ``jit`` are unchecked; ``validate=False`` (or
``unihead.set_validation(False)`` when the function is traced) emits no checks at all
(docs/semantics.md §9).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from unihead._ops import Ops
from unihead.compiled import CompiledHead, canonical_weights
from unihead.spec import ClassificationHead
from unihead._validation import logits_dtype_error

__all__ = ["compile_head", "JaxHead", "JaxOps", "Dense"]

_HALF = (jnp.float16, jnp.bfloat16)


class JaxOps(Ops):
    name = "jax"
    poly_exp = True  # XLA fuses the polynomial exponential into one loop (see Ops.poly_exp)
    flushes_subnormals = True  # XLA on CPU

    def __init__(self) -> None:
        super().__init__(jnp)

    def device(self, x: Any) -> Any:
        return None  # JAX places results like their inputs (and on the default device otherwise)

    def scalar(self, value: float, like: Any) -> Any:
        return jnp.asarray(value, dtype=like.dtype)

    def asarray(self, x: Any, like: Any = None, dtype: Any = None) -> Any:
        if like is not None:
            return jnp.asarray(x, dtype=dtype if dtype is not None else like.dtype)
        return jnp.asarray(x, dtype=dtype)

    def accumulate64(self, x: Any) -> bool:
        return bool(jax.config.jax_enable_x64)  # without it there is no float64 under jit

    def pow2(self, n: Any) -> Any:
        # n + 1.5 * 2**23 holds n in its low mantissa bits (exactly, |n| < 2**22); shifted up by 23
        # they are n in the exponent field, the rest shifted out: + bits(1.0) gives (n + 127) << 23,
        # which is 0.0 at n = -127.  (A float-to-int conversion is five instructions in XLA: it
        # saturates and maps NaN.)
        bits = jax.lax.bitcast_convert_type(n + 12582912.0, jnp.int32)
        return jax.lax.bitcast_convert_type(jax.lax.shift_left(bits, 23) + 0x3F800000, jnp.float32)

    def index_dtype(self) -> Any:
        return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32

    def put_last(self, x: Any, idx: Any, values: Any) -> Any:
        # a scatter, which XLA runs in place on a buffer nothing else reads; the portable
        # compare-with-iota select costs a full pass of index arithmetic over (..., K)
        return jnp.put_along_axis(
            x, idx[..., None], values[..., None].astype(x.dtype), axis=-1, inplace=False
        )

    def eager(self) -> Any:
        return jax.ensure_compile_time_eval()

    def is_concrete(self, x: Any) -> bool:
        return not isinstance(x, jax.core.Tracer)

    traced_checks = True

    def check(self, ok: Any, message: str, **values: Any) -> None:
        # a no-op unless the caller functionalises the checks with checkify.checkify (a plain
        # checkify.check would make jit refuse to trace the loss); XLA drops its operands then
        checkify.debug_check(ok, message, **values)

    def to_numpy(self, x: Any) -> Any:
        if x.dtype in _HALF:
            x = x.astype(jnp.float32)
        return np.asarray(x)


_OPS = JaxOps()


class JaxHead(CompiledHead):
    """The compiled head on JAX (see :class:`unihead.CompiledHead` for the methods).

    ``keep="inputs"`` (default) recomputes the softmax/sigmoid statistics in the backward pass,
    which XLA fuses; ``keep="stats"`` saves them instead."""

    backend = "jax"
    ops = _OPS

    def __init__(self, head: ClassificationHead, *, validate: bool = True, keep: str = "inputs"):
        super().__init__(head, validate=validate)
        if keep not in ("inputs", "stats"):
            raise ValueError(f"keep must be 'inputs' or 'stats'; got {keep!r}.")
        self.keep = keep
        self._loss_fn = self._make_loss()

    def options(self) -> dict[str, Any]:
        return {"validate": self.validate, "keep": self.keep}

    def _logits(self, logits: Any) -> Any:
        z = jnp.asarray(logits)
        if not jnp.issubdtype(z.dtype, jnp.floating):
            raise logits_dtype_error(z.dtype)
        if z.dtype in _HALF:
            z = z.astype(jnp.float32)
        return self._check(z)

    def _as_array(self, x: Any, like: Any) -> Any:
        return jnp.asarray(x)

    def _make_loss(self) -> Any:
        engine = self._engine()
        path = engine.path_of()
        keep = self.keep
        # A 1-unit head's custom_vjp takes its logits without the class axis of length 1, behind
        # an optimization barrier: XLA on CPU otherwise computes every fusion in the (N, 1)
        # layout of the input, whatever reshapes follow, and that is scalar code (measured:
        # log1p(exp(-|z|)) over 4M logits 31.6 ms as (N, 1), 4.4 ms squeezed behind the barrier)
        unit = self.head.num_outputs == 1

        def full(z: Any) -> Any:
            return z[..., None] if unit else z

        @jax.custom_vjp
        def loss(z: Any, labels: Any, sw: Any) -> Any:
            return engine.loss_forward(full(z), labels, sw, keep=keep)[0]

        def fwd(z: Any, labels: Any, sw: Any) -> Any:
            value, res = engine.loss_forward(full(z), labels, sw, keep=keep)
            return value, (res, labels, sw)

        def bwd(saved: Any, g: Any) -> Any:
            res, labels, sw = saved
            grad = engine.loss_backward(res, labels, sw, g, path)
            return (grad[..., 0] if unit else grad), None, None

        loss.defvjp(fwd, bwd)
        if unit:
            return lambda z, labels, sw: loss(jax.lax.optimization_barrier(z[..., 0]), labels, sw)
        return loss

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None) -> Any:
        """The loss (0-d array, or ``(...)`` for ``reduction="none"``): a pure function of its
        arrays, differentiable with respect to ``logits`` (``jax.grad``); float32 for
        half-precision logits, whose gradient comes back in their own dtype."""
        z = self._logits(logits)
        labels, sample_weight = self._inputs(z, labels, sample_weight)
        return self._loss_fn(z, labels, sample_weight)

    def layer(self, in_features: int, weights: Any = None, *, dtype: Any = jnp.float32) -> "Dense":
        """The output layer as pure functions: ``init(key) -> params``, ``apply(params, x)``."""
        return Dense(self.head, in_features, weights, dtype=dtype)


class Dense:
    """``logits = x @ params["kernel"] + params["bias"]`` with ``kernel (in, out)``, ``bias (out,)``:
    the parameter layout of ``flax.linen.Dense`` and ``flax.nnx.Linear``, so ``params`` drop into
    Flax code and optax optimisers as they are."""

    def __init__(self, head: ClassificationHead, in_features: int, weights: Any = None, *, dtype: Any = jnp.float32):
        self.head = head
        self.in_features = int(in_features)
        self.out_features = head.num_outputs
        self.dtype = dtype
        self._weights = None if weights is None else canonical_weights(head, in_features, weights)

    def init(self, key: Any) -> dict[str, Any]:
        """Parameters: the given weights, or Flax's defaults (LeCun-normal kernel, zero bias)."""
        if self._weights is not None:
            kernel, bias = self._weights
            return {"kernel": jnp.asarray(kernel, self.dtype), "bias": jnp.asarray(bias, self.dtype)}
        init = jax.nn.initializers.lecun_normal()
        return {
            "kernel": init(key, (self.in_features, self.out_features), self.dtype),
            "bias": jnp.zeros((self.out_features,), self.dtype),
        }

    def apply(self, params: dict[str, Any], x: Any) -> Any:
        return jnp.matmul(x, params["kernel"]) + params["bias"]

    __call__ = apply

    @staticmethod
    def get_weights(params: dict[str, Any]) -> dict[str, np.ndarray]:
        """Parameters in the canonical layout as NumPy arrays (they already are (in, out))."""
        return {"kernel": _OPS.to_numpy(params["kernel"]), "bias": _OPS.to_numpy(params["bias"])}

    def __repr__(self) -> str:
        return f"Dense(in_features={self.in_features}, out_features={self.out_features}, head={self.head!r})"


def compile_head(head: ClassificationHead, *, validate: bool = True, keep: str = "inputs") -> JaxHead:
    return JaxHead(head, validate=validate, keep=keep)
