"""The shared formulas on TensorFlow tensors (used by Keras on its TensorFlow backend).

TensorFlow has no Array API namespace, so :class:`TFNamespace` maps the few Array API functions
the formulas use onto TensorFlow ops; :class:`TFHead` attaches the analytic gradient with
``tf.custom_gradient``.  Value checks run in eager mode and are skipped inside ``tf.function``
(Keras' compiled train step), where tensors have no values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from unihead._ops import Ops
from unihead.compiled import CompiledHead
from unihead.spec import ClassificationHead

__all__ = ["TFHead", "TFOps", "TFNamespace"]


def _in_xla() -> bool:
    """Whether the ops being built will be compiled by XLA (a ``tf.function(jit_compile=True)``,
    Keras' default train step on TensorFlow)."""
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))
    except Exception:  # a TensorFlow without this internal: the float64 path is always correct
        return False


@tf.custom_gradient
def _xla_barrier(x: Any) -> Any:
    """``x``, computed before anything that uses it is (XLA's ``opt-barrier``: XLA neither merges
    nor fuses across it); the gradient passes through.  Only inside an XLA compilation."""
    from tensorflow.compiler.tf2xla.python.xla import optimization_barrier

    return optimization_barrier(x)[0], lambda g: g


#: Under XLA, float32 sums in float64 over this many elements or more are taken in blocks
#: (:meth:`TFOps.row_sum`, :meth:`TFOps.total`).
BLOCKED_SUM_FROM = 1 << 16
_BLOCKED_ROW = 256  # row sums over fewer classes are not
_BLOCK = 32


def _blocked(x: Any, rows: bool) -> bool:
    """Whether float64 sums of the float32 ``x`` (row sums, or a total) are taken in blocks: under
    XLA, over 2**16 elements or more, or over a class axis of 256 or more whose rows are not
    counted when the function is traced (Keras' ``fit`` traces its step for any batch size)."""
    if x.dtype != tf.float32 or not _in_xla():
        return False
    k, size = x.shape[-1] if x.shape.rank else None, x.shape.num_elements()
    wide = k is not None and k >= _BLOCKED_ROW
    if size is not None:
        return size >= BLOCKED_SUM_FROM and (wide or not rows)
    return wide


def _sum64_in_blocks(x: Any) -> Any:
    """The float64 sum of float32 ``x`` over its last axis (of static length): sums of blocks of
    32 elements, then of the blocks (an XLA barrier between, or XLA merges them back into one
    reduction)."""
    n = x.shape[-1]
    cut = n - n % _BLOCK
    lead = tf.shape(x)[:-1]
    blocks = tf.reshape(x[..., :cut], tf.concat([lead, [cut // _BLOCK, _BLOCK]], axis=0))
    s = tf.reduce_sum(_xla_barrier(tf.reduce_sum(tf.cast(blocks, tf.float64), axis=-1)), axis=-1)
    if cut < n:
        s = s + tf.reduce_sum(tf.cast(x[..., cut:], tf.float64), axis=-1)
    return s


def _via_float64(f: Any, x: Any) -> Any:
    """TensorFlow's own (Eigen) float32 ``log`` and ``log1p`` err by up to 3.0 and 3.3 ulp
    (measured): outside XLA they are evaluated in float64 and rounded once.  Under XLA they are
    XLA's (1.1 and 2.2 ulp, the functions JAX computes with), and float64 transcendentals there
    cost four to five times float32's: the float32 functions are used."""
    if x.dtype == tf.float32 and not _in_xla():
        return tf.cast(f(tf.cast(x, tf.float64)), tf.float32)
    return f(x)


class TFNamespace:
    """The Array API subset of :mod:`unihead.formulas`, ``_engine`` and ``validation`` on TF."""

    float16, float32, float64 = tf.float16, tf.float32, tf.float64
    int32, int64, bool = tf.int32, tf.int64, tf.bool

    @staticmethod
    def _axis(axis: Any) -> Any:
        return axis

    @staticmethod
    def max(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return tf.reduce_max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def sum(x: Any, axis: Any = None, keepdims: bool = False, dtype: Any = None) -> Any:
        if dtype is not None:
            x = tf.cast(x, dtype)
        return tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return tf.reduce_mean(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def any(x: Any, axis: Any = None) -> Any:
        return tf.reduce_any(tf.cast(x, tf.bool), axis=axis)

    @staticmethod
    def argmax(x: Any, axis: int = -1) -> Any:
        return tf.argmax(x, axis=axis, output_type=tf.int64)

    exp = staticmethod(tf.exp)
    sqrt = staticmethod(tf.sqrt)

    @staticmethod
    def log1p(x: Any) -> Any:
        return _via_float64(tf.math.log1p, x)

    @staticmethod
    def log(x: Any) -> Any:
        return _via_float64(tf.math.log, x)

    @staticmethod
    def tanh(x: Any) -> Any:  # Eigen's float32 tanh is a rational approximation: as log, log1p
        return _via_float64(tf.math.tanh, x)
    abs = staticmethod(tf.abs)
    sign = staticmethod(tf.sign)
    round = staticmethod(tf.round)
    minimum = staticmethod(tf.minimum)
    maximum = staticmethod(tf.maximum)
    isnan = staticmethod(tf.math.is_nan)
    isfinite = staticmethod(tf.math.is_finite)
    expand_dims = staticmethod(lambda x, axis: tf.expand_dims(x, axis))
    concat = staticmethod(lambda xs, axis=0: tf.concat(xs, axis=axis))
    reshape = staticmethod(lambda x, shape: tf.reshape(x, shape))
    stack = staticmethod(lambda xs, axis=0: tf.stack(xs, axis=axis))

    @staticmethod
    def where(cond: Any, x: Any, y: Any) -> Any:
        return tf.where(cond, x, y)

    @staticmethod
    def astype(x: Any, dtype: Any) -> Any:
        return tf.cast(x, dtype)

    @staticmethod
    def asarray(x: Any, dtype: Any = None, device: Any = None) -> Any:
        return tf.convert_to_tensor(x, dtype=dtype)

    @staticmethod
    def ones(shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return tf.ones(shape, dtype=dtype or tf.float32)

    @staticmethod
    def zeros(shape: Any, dtype: Any = None, device: Any = None) -> Any:
        return tf.zeros(shape, dtype=dtype or tf.float32)

    @staticmethod
    def ones_like(x: Any) -> Any:
        return tf.ones_like(x)

    matmul = staticmethod(tf.linalg.matmul)

    @staticmethod
    def matrix_transpose(x: Any) -> Any:
        return tf.linalg.matrix_transpose(x)

    @staticmethod
    def zeros_like(x: Any) -> Any:
        return tf.zeros_like(x)

    @staticmethod
    def arange(n: int, dtype: Any = None, device: Any = None) -> Any:
        return tf.range(n, dtype=dtype or tf.int64)

    @staticmethod
    def take(x: Any, idx: Any, axis: int = 0) -> Any:
        return tf.gather(x, idx, axis=axis)

    @staticmethod
    def take_along_axis(x: Any, idx: Any, axis: int = -1) -> Any:
        return tf.gather(x, idx, axis=-1, batch_dims=len(x.shape) - 1)

    @staticmethod
    def finfo(dtype: Any) -> Any:
        import ml_dtypes  # TensorFlow's own dependency: its bfloat16 is ml_dtypes', unknown to np.finfo

        return ml_dtypes.finfo(tf.as_dtype(dtype).as_numpy_dtype)

    @staticmethod
    def isdtype(dtype: Any, kind: str) -> bool:
        d = tf.as_dtype(dtype)
        return {"real floating": d.is_floating, "integral": d.is_integer, "bool": d == tf.bool}[kind]


class TFOps(Ops):
    name = "tensorflow"
    flushes_subnormals = True  # TensorFlow on CPU

    @property
    def keep_whole_exp(self) -> bool:  # type: ignore[override]
        """Under XLA (:attr:`Ops.keep_whole_exp` says why; docs/benchmarks.md, the measurement)."""
        return _in_xla()

    @property
    def poly_exp(self) -> bool:  # type: ignore[override]
        """Under XLA (Keras' train step) the polynomial exponential, fused into one loop as on
        JAX (:attr:`Ops.poly_exp`); outside it every operation is a kernel of its own, and
        ``exp`` with a correction is fewer kernels."""
        return _in_xla()

    # Under XLA, a large float32 sum accumulated in float64 is taken in two stages.  XLA rewrites
    # a large reduction into a tree of reduce-windows, which it does not fuse with the operations
    # before them: the conversion to float64 was written out whole (a float64 array of the
    # input's size: 66 MB for (256, 32000) per-element losses, and the loss took 1.3x the native
    # one's time there).  A sum over blocks of 32 elements is a reduction XLA fuses with what
    # computes the elements, so one float64 per block is written.  The same float64 accumulation,
    # in another order.
    def row_sum(self, x: Any) -> Any:
        if not _blocked(x, rows=True):
            return super().row_sum(x)
        return tf.cast(_sum64_in_blocks(x)[..., None], tf.float32)

    def total(self, x: Any) -> Any:
        if not _blocked(x, rows=False):
            return super().total(x)
        if x.shape.num_elements() is None:  # a wide class axis, rows not counted when traced
            return tf.cast(tf.reduce_sum(_sum64_in_blocks(x)), tf.float32)
        return tf.cast(_sum64_in_blocks(tf.reshape(x, [-1])), tf.float32)

    def pow2(self, n: Any) -> Any:
        # as JaxOps.pow2: n + 1.5 * 2**23 holds n in its low mantissa bits; shifted up by 23 they
        # are the exponent field, + bits(1.0) gives (n + 127) << 23 (0.0 at n = -127)
        bits = tf.bitcast(n + 12582912.0, tf.int32)
        return tf.bitcast(tf.bitwise.left_shift(bits, 23) + 0x3F800000, tf.float32)
    half_dtypes = (tf.float16, tf.bfloat16)

    def __init__(self) -> None:
        super().__init__(TFNamespace)

    def bits(self, x: Any) -> int:
        return x.dtype.size * 8

    def device(self, x: Any) -> Any:
        return None

    def shape(self, x: Any) -> tuple:
        static = tuple(x.shape)
        if all(d is not None for d in static):
            return static
        dynamic = tf.shape(x)
        return tuple(d if d is not None else dynamic[i] for i, d in enumerate(static))

    def index_dtype(self) -> Any:
        return tf.int64

    def lookup(self, table: Any, idx: Any) -> Any:
        return tf.gather(table, idx)

    def is_concrete(self, x: Any) -> bool:
        return tf.executing_eagerly() and hasattr(x, "numpy")

    def stop_gradient(self, x: Any) -> Any:
        return tf.stop_gradient(x)

    # TF tensors cannot be written into: the fused loss's column chunks (visited in order) are
    # kept and joined once, rather than copying the whole (D, V) gradient for every chunk
    def empty_like_columns(self, x: Any) -> Any:
        return _Columns(x)

    def put_columns(self, buf: Any, start: Any, values: Any) -> Any:
        return buf.put(start, values)

    def finish_columns(self, buf: Any) -> Any:
        return buf.join()


class _Columns:
    """The chunks of an array like ``like`` along its last axis, filled in order by
    :meth:`TFOps.put_columns` and joined by :meth:`TFOps.finish_columns`."""

    def __init__(self, like: Any) -> None:
        self.dtype = like.dtype
        self.width = like.shape[-1]
        self.pieces: list = []
        self.filled = 0

    def put(self, start: Any, values: Any) -> "_Columns":
        if not isinstance(start, int) or start != self.filled:  # unihead._fused visits them in order
            raise AssertionError(f"column chunks out of order: at {start}, {self.filled} filled")
        self.pieces.append(tf.cast(values, self.dtype))
        self.filled += int(values.shape[-1])
        return self

    def join(self) -> Any:
        if self.filled != self.width:
            raise AssertionError(f"column chunks cover {self.filled} of {self.width} columns")
        return self.pieces[0] if len(self.pieces) == 1 else tf.concat(self.pieces, axis=-1)


_OPS = TFOps()


class TFHead(CompiledHead):
    """The shared formulas on TensorFlow tensors, with ``tf.custom_gradient``."""

    backend = "tensorflow"
    ops = _OPS

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None, *, normalizer: Any = None) -> Any:
        if normalizer is not None:
            return self._normalized(logits, labels, sample_weight, normalizer)
        z = self._logits(logits)
        labels, sample_weight = self._inputs(z, labels, sample_weight)
        engine = self._engine()
        path = engine.path_of()

        @tf.custom_gradient
        def loss(z: Any) -> Any:
            value, res = engine.loss_forward(z, labels, sample_weight, keep="stats")

            def grad(g: Any) -> Any:
                return engine.loss_backward(res, labels, sample_weight, g, path)

            return value, grad

        return loss(z)

    def _fused_rows(self, h: Any, w: Any, b: Any, y: Any, chunk: int) -> Any:
        """Per-row losses of ``h @ w + b`` (:mod:`unihead._fused`) with ``tf.custom_gradient``:
        the backward pass recomputes each chunk's logits (nothing of size ``(N, V)`` is kept).
        The chunks are a Python loop: unrolled in a ``tf.function`` graph, one chunk's ops each."""
        from unihead import _fused

        e = self._engine()
        consts = dict(spec=_fused.row_spec(e), chunk=chunk)

        def rows(h: Any, w: Any, b: Any) -> Any:
            fin = _fused.rows_forward(_OPS, h, w, b, y, **consts)

            def grad(g: Any) -> Any:
                grads = _fused.rows_backward(_OPS, h, w, b, y, fin, tf.cast(g, fin.m.dtype), **consts)
                return grads if b is not None else grads[:2]

            return fin.loss, grad

        if b is None:
            return tf.custom_gradient(lambda h, w: rows(h, w, None))(h, w)
        return tf.custom_gradient(rows)(h, w, b)


def compile_head(head: ClassificationHead, *, validate: bool = True) -> TFHead:
    return TFHead(head, validate=validate)
