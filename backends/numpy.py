"""NumPy backend: ``unihead.compile(head, "numpy")``.

Computes in the logits' dtype (float32 or float64; float16 and bfloat16 in float32) with the
shared formulas.  NumPy has no autodiff, so the compiled head also offers
:meth:`NumpyHead.loss_and_gradient`, the analytic gradient every other backend plugs into its
own autodiff.  The output layer is a small :class:`Dense` object holding ``kernel (in, out)``
and ``bias (out,)``; ``compiled.loss_fn()`` is the loss as a function.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as xp_numpy
import numpy as np

from unihead._ops import Ops
from unihead.compiled import CompiledHead, canonical_weights, glorot_uniform
from unihead.spec import ClassificationHead

__all__ = ["compile_head", "NumpyHead", "NumpyOps", "Dense"]


def _accurate(f64: Any) -> Any:
    """A float32 elementary function correctly rounded: NumPy's own float32 ``exp``, ``log`` and
    ``log1p`` (SIMD) err by up to 2.2, 2.7 and 1.7 ulp (measured); in float64 and rounded once
    they err by at most 0.5 ulp + 2**-29."""

    def f(x: Any) -> Any:
        x = np.asarray(x)
        if x.dtype == np.float32:
            return f64(x.astype(np.float64)).astype(np.float32)
        return f64(x)

    return f


def _namespace() -> Any:
    """``array_api_compat.numpy`` with accurate float32 ``exp``/``log``/``log1p``."""
    import types

    ns = types.SimpleNamespace(**{k: getattr(xp_numpy, k) for k in dir(xp_numpy) if not k.startswith("__")})
    ns.exp, ns.log, ns.log1p = _accurate(np.exp), _accurate(np.log), _accurate(np.log1p)
    return ns


class NumpyOps(Ops):
    name = "numpy"
    wide = True  # float32 in float64, rounded once (see Ops.wide)

    def __init__(self) -> None:
        super().__init__(_namespace())

    def take_last(self, x: Any, idx: Any) -> Any:
        return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]

    def put_last(self, x: Any, idx: Any, values: Any) -> Any:
        np.put_along_axis(x, idx[..., None], values[..., None], axis=-1)
        return x

    def device(self, x: Any) -> Any:
        return None

    def index_dtype(self) -> Any:
        return np.int64

    def convert(self, x: Any, like: Any = None) -> Any:
        return np.asarray(x)

    def is_half(self, x: Any) -> bool:
        # bfloat16 is ml_dtypes', when installed: known by name, without importing it
        return x.dtype == np.float16 or x.dtype.name == "bfloat16"


_OPS = NumpyOps()


class Dense:
    """The NumPy output layer: ``logits = x @ kernel + bias``; ``kernel (in, out)``, ``bias (out,)``.

    ``head``: the spec, or the compiled :class:`NumpyHead` it came from (:meth:`compiled`)."""

    def __init__(self, head: Any, kernel: np.ndarray, bias: np.ndarray):
        self._compiled = head if isinstance(head, NumpyHead) else None
        self.head = head.head if self._compiled is not None else head
        self.kernel = kernel
        self.bias = bias

    @property
    def in_features(self) -> int:
        return int(self.kernel.shape[0])

    def __call__(self, x: Any) -> np.ndarray:
        return np.asarray(x) @ self.kernel + self.bias

    def get_weights(self) -> dict[str, np.ndarray]:
        """Weights in the canonical layout (copies)."""
        return {"kernel": self.kernel.copy(), "bias": self.bias.copy()}

    def set_weights(self, weights: Any) -> None:
        """Load canonical-layout weights: a ``{"kernel", "bias"}`` mapping or a ``(kernel, bias)``
        pair, from any backend's layer (kept in this layer's dtype)."""
        kernel, bias = canonical_weights(self.head, self.in_features, weights)
        self.kernel = kernel.astype(self.kernel.dtype)
        self.bias = bias.astype(self.bias.dtype)

    # the names every backend's layer has (Keras' own get_weights/set_weights are Keras' lists)
    get_canonical_weights = get_weights
    set_canonical_weights = set_weights

    def compiled(self, **options: Any) -> "NumpyHead":
        """The compiled head of this layer: the one it was built from, with its options;
        ``options`` change some of them."""
        if self._compiled is None:
            self._compiled = NumpyHead(self.head)
        return self._compiled._with_options(**options)

    def __repr__(self) -> str:
        return f"Dense(in_features={self.in_features}, out_features={self.kernel.shape[1]}, head={self.head!r})"


def _quiet(method):
    """NaN/inf logits have documented results (docs/semantics.md §8): no RuntimeWarnings."""
    import functools

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return method(*args, **kwargs)

    return wrapper


class NumpyHead(CompiledHead):
    backend = "numpy"
    ops = _OPS

    probabilities = _quiet(CompiledHead.probabilities)
    log_probabilities = _quiet(CompiledHead.log_probabilities)
    predict = _quiet(CompiledHead.predict)
    loss_terms = _quiet(CompiledHead.loss_terms)
    linear_loss_terms = _quiet(CompiledHead.linear_loss_terms)
    _class_sharded = _quiet(CompiledHead._class_sharded)

    @_quiet
    def loss(self, logits: Any, labels: Any, sample_weight: Any = None, *, normalizer: Any = None) -> np.ndarray:
        """The loss (0-d array, or ``(...)`` per example for ``reduction="none"``); ``normalizer``:
        see :meth:`unihead.CompiledHead.loss`."""
        if normalizer is not None:
            return np.asarray(self._normalized(logits, labels, sample_weight, normalizer))
        z = self._logits(logits)
        labels, sample_weight = self._inputs(z, labels, sample_weight)
        return np.asarray(self._engine().loss_and_grad(z, labels, sample_weight, grad=False)[0])

    @_quiet
    def linear_loss(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any = None, sample_weight: Any = None, *,
        normalizer: Any = None, chunk_size: int | None = None,
    ) -> np.ndarray:
        """The loss of ``hidden @ kernel + bias`` computed through chunks of classes (see
        :meth:`unihead.CompiledHead.linear_loss`; NumPy has no autodiff: the value only)."""
        return np.asarray(super().linear_loss(
            hidden, kernel, labels, bias, sample_weight, normalizer=normalizer, chunk_size=chunk_size
        ))

    @_quiet
    def loss_and_gradient(
        self, logits: Any, labels: Any, sample_weight: Any = None, upstream: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The loss and its gradient with respect to the logits (analytic), in the compute dtype.

        ``upstream`` multiplies the gradient: a scalar (default 1), or one value per example
        for ``reduction="none"`` (default all ones)."""
        z = self._logits(logits)
        labels, sample_weight = self._inputs(z, labels, sample_weight)
        loss, grad = self._engine().loss_and_grad(z, labels, sample_weight)
        if upstream is not None:
            grad = self.ops.times_upstream(grad, np.broadcast_to(np.asarray(upstream, dtype=z.dtype), np.shape(loss)))
        return np.asarray(loss), np.asarray(grad)

    def layer(
        self,
        in_features: int,
        weights: Any = None,
        *,
        dtype: Any = np.float32,
        seed: int | None = None,
    ) -> Dense:
        """A :class:`Dense` output layer of shape ``(in_features, num_outputs)``: the given weights
        (canonical layout), or Glorot-uniform kernel and zero bias (Keras' defaults)."""
        k = self.head.num_outputs
        if weights is not None:
            kernel, bias = canonical_weights(self.head, in_features, weights)
            return Dense(self, kernel.astype(dtype), bias.astype(dtype))
        rng = np.random.default_rng(seed)
        return Dense(self, glorot_uniform(rng, in_features, k, dtype), np.zeros(k, dtype=dtype))


def compile_head(head: ClassificationHead, *, validate: bool = True) -> NumpyHead:
    return NumpyHead(head, validate=validate)
