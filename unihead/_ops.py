"""The few array primitives the shared formulas need beyond the Array API standard.

The formulas in :mod:`unihead.formulas` are written once against the Array API standard (through
``array-api-compat``), so NumPy, PyTorch and JAX arrays run the same code.  A handful of
operations are not in the standard (a scatter along the last axis) or have a much faster native
form (a fused multiply-add, a gather); :class:`Ops` gives them a portable default and each backend
may override just those methods — the same split einops uses between its core and its backends.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Ops", "exp_underflow_gap", "two_sum_error"]


def exp_underflow_gap(dtype_bits: int) -> float:
    """A shift ``g`` with ``exp(-g) == 0`` in a float of this width: logits further than ``g``
    below the row maximum contribute exactly nothing to a softmax, so they may be clamped there."""
    return {16: 32.0, 32: 128.0, 64: 1024.0}[dtype_bits]


def two_sum_error(a: Any, b: Any, s: Any) -> Any:
    """The exact rounding error of ``s = fl(a + b)``: ``a + b == s + err`` exactly (Knuth's
    TwoSum, six additions in all, no ordering of ``a`` and ``b`` by magnitude needed; exact
    unless an intermediate overflows)."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


class Ops:
    """Array primitives over one Array API namespace ``xp``.

    Backends subclass this and override what they can do better natively; everything the
    formulas compute is expressed with ``self.xp`` plus these methods.
    """

    name = "array-api"

    #: Whether float32 exponentials of shifted logits use the library's own polynomial, which takes
    #: the subtraction's rounding error into its argument (:func:`unihead.formulas.shifted_exp`),
    #: instead of ``xp.exp`` and a correction.  It is fewer operations per element, which pays
    #: where a compiler fuses the formula into one loop (XLA); where every operation is a kernel
    #: of its own (eager NumPy and PyTorch) it is more kernels, and ``xp.exp`` is faster.
    poly_exp = False

    #: Whether float32 arrays are evaluated in float64 and rounded once at the end (the *wide*
    #: policy, :meth:`wide_dtype`).  float64 has 29 bits more than float32, so plain float64
    #: formulas (a handful of native kernels: ``log_softmax``, ``exp``, one reduction) give
    #: float32 results that are correctly rounded in nearly every case, where float32 evaluation
    #: needs error-free transformations (about three times as many operations).  It pays where
    #: every operation is a kernel of its own and a kernel's cost is its dispatch (eager NumPy and
    #: PyTorch on CPU at moderate sizes); where a compiler fuses the formulas (XLA, Inductor) and
    #: the pass is compute-bound, float64 transcendentals cost two to four times float32's.
    wide = False

    #: Whether the softmax over integer targets (:func:`unihead.formulas.softmax_sparse_stats`)
    #: reads ``Y`` at the target from its exponentials ``Y`` and gives the gradient ``Y`` whole
    #: (the gradient overwrites the target's entry).  Otherwise it evaluates ``Y`` at the target
    #: again from ``z_y`` and gives the gradient the copy of ``Y`` with the target's entry zeroed,
    #: the one the other classes' mass is summed over (in place where the backend writes).  The
    #: values are the same either way.  The first pays where the masked sum is one
    #: loop that reads ``Y`` and a compiler would otherwise evaluate the target's exponential
    #: again in every per-row loop that uses it (TensorFlow's XLA, whose float32 sums accumulate
    #: in float64 in XLA's own loops); the second where a sum takes its input written out (JAX:
    #: float32 sums on CPU are YNNPACK calls, so keeping ``Y`` whole costs a second array of the
    #: logits' size) or the zeroing is a scatter that would copy ``Y`` (Inductor, past 32
    #: classes), and in eager execution, where zeroing in place costs nothing.
    keep_whole_exp = False

    #: The longest sum (number of terms: the per-example values summed, after any sum over the
    #: class axis, so the rows of a batch) whose :meth:`compensated_total` keeps, from the tree's
    #: second level on, each level's sums and carried errors in one array ``(2, m)``: the same
    #: operations and result, a copy a level, and another graph of kernels for a compiler.  For
    #: XLA on CPU, whose runtime runs a step's kernels as a graph and hands kernels that become
    #: ready together to its other threads: with the pairs, the graph of a small MLP's training
    #: step at batch 256 keeps the backward pass's matmuls on the calling thread, as the native
    #: loss's does (with two arrays a level XLA ran the first layer's weight-gradient matmul on a
    #: worker thread, and the step took 0.99-1.10x optax's from process to process, over 1.05x
    #: in most; with the pairs 0.99-1.01x; docs/benchmarks.md).  Longer sums were slower with it
    #: (4096 terms) and pay the copies (a few hundred bytes of XLA's buffers at 256 terms).
    #: 0: never.
    pair_tree_upto = 0

    #: Whether the backend's float32 arithmetic flushes subnormal results to zero (XLA and
    #: TensorFlow on CPU do): formulas then keep intermediates of normal results normal.
    flushes_subnormals = False

    #: Whether float64 arrays are the accuracy target: compensated row sums and totals, corrected
    #: exponentials.  False in the view :meth:`widened` returns, whose float64 arrays carry float32
    #: results and have 29 bits to spare.
    compensate = True

    #: Whether formulas may write into the arrays they create (``put_last``, ``zero_last``):
    #: backends that cannot tell a functional trace from eager execution cheaply say False and
    #: check per call.  The :meth:`widened` view is used in eager execution only and says True.
    writes_in_place = False

    def __init__(self, xp: Any):
        self.xp = xp

    def wide_dtype(self, x: Any) -> Any:
        """The dtype in which the floating array ``x`` is evaluated under the wide policy
        (float64 for float32 ``x``), or None: ``x`` is evaluated in its own dtype."""
        if self.wide and x.dtype == self.xp.float32:
            return self.xp.float64
        return None

    def widened(self) -> "Ops":
        """This backend's primitives for float64 arrays that carry float32 results: plain float64
        sums and exponentials, no compensation (see :attr:`wide`)."""
        import copy

        view = copy.copy(self)
        view.compensate = False
        view.writes_in_place = True
        return view

    # -- dtypes --------------------------------------------------------------------------
    def bits(self, x: Any) -> int:
        """Width in bits of the floating dtype of ``x`` (16, 32 or 64)."""
        xp = self.xp
        return int(xp.finfo(x.dtype).bits)

    def is_floating(self, x: Any) -> bool:
        return self.xp.isdtype(x.dtype, "real floating")

    def is_integer(self, x: Any) -> bool:
        return self.xp.isdtype(x.dtype, "integral")

    def is_bool(self, x: Any) -> bool:
        return self.xp.isdtype(x.dtype, "bool")

    def scalar(self, value: float, like: Any) -> Any:
        """A 0-d array of ``like``'s dtype (and device): avoids slow Python-scalar paths."""
        return self.xp.asarray(value, dtype=like.dtype, device=self.device(like))

    def device(self, x: Any) -> Any:
        return getattr(x, "device", None)

    def shape(self, x: Any) -> tuple:
        """``x``'s shape, a dimension unknown while tracing as a 0-d integer array of its size
        (what ``reshape`` and ``ones`` take); the static shape where the library has no unknown
        dimensions."""
        return tuple(x.shape)

    def unsharded(self, x: Any) -> Any:
        """``x`` whole on each device holding a part of it: what :meth:`compensated_total` slices
        in halves (a backend whose arrays' types carry a sharding refuses halves that do not
        split evenly over the devices).  The identity here."""
        return x

    def astype(self, x: Any, like: Any) -> Any:
        xp = self.xp
        if x.dtype == like.dtype:
            return x
        return xp.astype(x, like.dtype)

    def asarray(self, x: Any, like: Any = None, dtype: Any = None) -> Any:
        xp = self.xp
        if like is not None:
            return xp.asarray(x, dtype=dtype if dtype is not None else like.dtype, device=self.device(like))
        return xp.asarray(x) if dtype is None else xp.asarray(x, dtype=dtype)

    def index_dtype(self) -> Any:
        return self.xp.int64

    # -- arrays in and out -------------------------------------------------------------------
    def convert(self, x: Any, like: Any = None) -> Any:
        """``x`` (this library's array, another library's, or nested sequences) as this library's
        array, in the dtype it has (no copy where it already is one); on ``like``'s device where
        the library places arrays on devices (labels and weights follow the logits)."""
        return self.xp.asarray(x)

    #: The floating dtypes computed in float32 (half precision: results are float32, gradients
    #: come back in the logits' own dtype); compared with ``==``, so a backend lists its
    #: library's dtype objects.  A backend whose half dtypes cannot be listed overrides
    #: :meth:`is_half`.
    half_dtypes: tuple = ()

    def is_half(self, x: Any) -> bool:
        """Whether ``x`` is half precision (float16, bfloat16): computed in float32."""
        return x.dtype in self.half_dtypes

    def widen_half(self, x: Any) -> Any:
        """``x`` in float32 if it is half precision (:meth:`is_half`), else ``x`` itself: the one
        rule for logits, and for values read on the host (:meth:`to_numpy`).  The conversion is
        differentiable where the library differentiates."""
        return self.xp.astype(x, self.xp.float32) if self.is_half(x) else x

    def host(self, x: Any) -> Any:
        """``x`` as a NumPy array on the host, in its own dtype (the library's own transfer)."""
        import numpy as np

        return np.asarray(x)

    def to_numpy(self, x: Any) -> Any:
        """``x`` as a NumPy array on the host, half precision as float32 (NumPy has no bfloat16
        of its own): how validation reads values for its messages, and layers their weights."""
        return self.host(self.widen_half(x))

    # -- elementwise -----------------------------------------------------------------------
    def mul_add(self, x: Any, y: Any, z: Any) -> Any:
        """``x + y * z`` (a fused kernel where the backend has one)."""
        return x + y * z

    def where0(self, cond: Any, x: Any) -> Any:
        """``where(cond, x, 0)``."""
        return self.xp.where(cond, x, self.scalar(0.0, x))

    def where_top(self, gap: Any, a: Any, b: Any) -> Any:
        """``where(gap == 0, a, b)`` for ``gap = z_y - m``, the target's distance from its row's
        maximum (``<= 0``; ``-inf`` for a masked target, NaN in a NaN row) and finite ``a``, ``b``:
        ``a`` where the target is a maximum.  A backend may select by arithmetic instead: the same
        values, but for the sign of a zero (the formulas pass no ``-0.0``) and the branch a NaN row
        takes (its values are NaN either way)."""
        return self.xp.where(gap == 0, a, b)

    def materialize(self, x: Any) -> Any:
        """``x`` itself: a per-row value many later expressions read (the target's logit).  A
        backend whose compiler would otherwise evaluate it again inside each of them (a gather
        inlined into every reader) has it computed once, into an array."""
        return x

    def stop_gradient(self, x: Any) -> Any:
        """``x`` as a constant of differentiation (a weight, a normaliser): the library's own
        stop-gradient; NumPy has no autodiff."""
        return x

    def count(self, x: Any) -> Any:
        """The number of elements of ``x`` as a 0-d array of its dtype (the divisor of an
        unweighted mean); counted on the device where a dimension is unknown while tracing."""
        n = 1
        for d in x.shape:
            if type(d) is not int:  # unknown (None) or symbolic while tracing
                return self.xp.sum(self.xp.ones_like(x))
            n *= d
        return self.scalar(float(n), x)

    def reciprocal(self, x: Any) -> Any:
        """``1 / x``."""
        return 1.0 / x

    # -- functions with a fused native kernel in most libraries --------------------------------
    def log_softmax(self, x: Any) -> Any:
        """``log softmax(x)`` over the last axis: ``(x - m) - log(sum(exp(x - m)))``, ``m`` the
        row maximum (NaN for a row with NaN or ``+inf``, or with every entry ``-inf``)."""
        xp = self.xp
        d = x - xp.max(x, axis=-1, keepdims=True)
        return d - xp.log(xp.sum(xp.exp(d), axis=-1, keepdims=True))

    def sigmoid(self, x: Any) -> Any:
        """``1 / (1 + exp(-x))``, from ``t = exp(-|x|)`` on the side that does not overflow."""
        xp = self.xp
        t = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1 / (1 + t), t / (1 + t))

    def softplus(self, x: Any) -> Any:
        """``log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))`` (a sum of two non-negative terms)."""
        xp = self.xp
        return xp.maximum(x, self.scalar(0.0, x)) + xp.log1p(xp.exp(-xp.abs(x)))

    def log_sigmoid(self, x: Any) -> Any:
        """``log sigmoid(x) = min(x, 0) - log1p(exp(-|x|))`` (a sum of two non-positive terms)."""
        xp = self.xp
        return xp.minimum(x, self.scalar(0.0, x)) - xp.log1p(xp.exp(-xp.abs(x)))

    # -- indexing along the class axis --------------------------------------------------------
    def ones_rows(self, x: Any) -> Any:
        """Ones shaped like ``x[..., 0]``, in ``x``'s dtype and on its device (``x``'s leading
        dimensions may be unknown while a graph is traced)."""
        return self.xp.ones_like(x[..., 0])

    def take_last(self, x: Any, idx: Any) -> Any:
        """``x[..., idx]`` for one index per row: ``(..., K), (...) -> (...)``."""
        xp = self.xp
        return xp.take_along_axis(x, xp.expand_dims(idx, axis=-1), axis=-1)[..., 0]

    def last_index(self, idx: Any) -> Any:
        """``idx`` (one index per row) in the form :meth:`take_last`, :meth:`put_last` and
        :meth:`zero_last` take fastest, for a formula that indexes with it several times (they
        also take ``idx`` itself)."""
        return idx

    def times_upstream(self, grad: Any, g: Any) -> Any:
        """``grad`` (the gradient for a unit upstream gradient) times the upstream gradient ``g``:
        a scalar, or one value per example of a ``reduction="none"`` loss (the loss is linear in
        it, so this is the gradient for ``g``)."""
        if len(getattr(g, "shape", ())) == 0:
            return grad * g
        return grad * self.xp.expand_dims(g, axis=-1)

    def zero_last(self, x: Any, idx: Any) -> Any:
        """``x`` with ``x[..., idx] = 0`` (one index per row); may write into ``x``."""
        return self.put_last(x, idx, self.xp.zeros_like(x[..., 0]))

    def put_last(self, x: Any, idx: Any, values: Any) -> Any:
        """``x`` with ``x[..., idx] = values`` (one index per row).  May write into ``x`` when the
        backend can (callers only pass arrays they created)."""
        xp = self.xp
        k = x.shape[-1]
        iota = xp.arange(k, dtype=idx.dtype, device=self.device(x))
        return xp.where(iota == xp.expand_dims(idx, axis=-1), xp.expand_dims(values, axis=-1), x)

    def lookup(self, table: Any, idx: Any) -> Any:
        """``table[idx]`` elementwise for a 1-D ``table`` and integer ``idx`` of any shape."""
        xp = self.xp
        return xp.reshape(xp.take(table, xp.reshape(idx, (-1,))), idx.shape)

    # -- chunks of the class axis (the fused linear loss, unihead._fused) -------------------------
    def columns(self, x: Any, start: Any, width: int) -> Any:
        """``x[..., start:start + width]``: ``start`` a number, or a 0-d integer array inside a
        compiled loop (backends whose slices need static bounds override this)."""
        return x[..., start : start + width]

    def put_columns(self, buf: Any, start: Any, values: Any) -> Any:
        """``buf`` with ``buf[..., start:start + width] = values``; may write into ``buf`` (callers
        pass buffers they created, :meth:`empty_like_columns`)."""
        buf[..., start : start + values.shape[-1]] = values
        return buf

    def add_matmul(self, acc: Any, a: Any, b: Any) -> Any:
        """``acc + a @ b`` with ``acc`` in the compute dtype (float32 for half-precision ``a``,
        ``b``: the product widened first); may write into ``acc`` (an accumulator the caller made)."""
        return acc + self.widen_half(self.xp.matmul(a, b))

    def empty_like_columns(self, x: Any) -> Any:
        """An uninitialised array like ``x`` that :meth:`put_columns` fills chunk by chunk."""
        return self.xp.empty_like(x)

    def finish_columns(self, buf: Any) -> Any:
        """The array :meth:`put_columns` filled, once every chunk is in (``buf`` itself here; a
        backend whose arrays cannot be written into keeps the chunks and joins them here)."""
        return buf

    # -- reductions ---------------------------------------------------------------------------
    def accumulate64(self, x: Any) -> bool:
        """Whether sums of the float32 array ``x`` can accumulate in float64 (the namespace has
        float64 on ``x``'s device).  Where they cannot, totals are compensated instead."""
        return True

    def row_sum(self, x: Any) -> Any:
        """Sum over the class axis, keeping it: ``(..., K) -> (..., 1)``.

        float32 sums accumulate in float64 where :meth:`accumulate64` (a library's float32 row sum
        loses up to ~3 ulp at K = 1000, measured on PyTorch, which every probability would
        inherit).  float64 sums have no wider type and are compensated (float64 results are the
        accuracy path, not the speed path), except in the :meth:`widened` view."""
        xp = self.xp
        if x.dtype == xp.float64:
            return self.compensated_row_sum(x) if self.compensate else xp.sum(x, axis=-1, keepdims=True)
        if x.dtype == xp.float32 and self.accumulate64(x):
            return xp.astype(xp.sum(x, axis=-1, keepdims=True, dtype=xp.float64), x.dtype)
        return xp.sum(x, axis=-1, keepdims=True)

    def compensated_row_sum(self, x: Any) -> Any:
        """:meth:`row_sum`, pairwise over contiguous halves of the class axis, each level's
        rounding errors recovered (TwoSum) and added back."""
        xp = self.xp
        err = None
        while x.shape[-1] > 1:
            if x.shape[-1] % 2:
                x = xp.concat([x, xp.zeros_like(x[..., :1])], axis=-1)
            half = x.shape[-1] // 2
            a, b = x[..., :half], x[..., half:]
            s = a + b
            e = two_sum_error(a, b, s)
            e = xp.sum(self.where0(xp.isfinite(e), e), axis=-1, keepdims=True)
            err = e if err is None else err + e
            x = s
        return x if err is None else x + err

    def total(self, x: Any) -> Any:
        """Accurate sum of every element (the reductions over examples): float32 accumulates in
        float64 where :meth:`accumulate64`, otherwise (and for float64, except in the
        :meth:`widened` view) the sum is compensated (:meth:`compensated_total`)."""
        xp = self.xp
        if x.dtype == xp.float64:  # nothing wider to accumulate in
            return self.compensated_total(x) if self.compensate else xp.sum(x)
        if self.accumulate64(x):
            return xp.astype(xp.sum(x, dtype=xp.float64), x.dtype)
        return self.compensated_total(x)

    def compensated_total(self, x: Any) -> Any:
        """Sum of every element without a wider type: pairwise over contiguous halves, each
        level's rounding errors recovered exactly (TwoSum) and carried, added pairwise with the
        next level's, to the end (one elementwise step per level, no reduction per level).
        Nearly correctly rounded; infinities and NaN come through as in a plain sum.

        The pairwise tree needs a power-of-two length.  A length within 1/16 of the next power
        of two is padded with zeros (a copy of the input, but XLA fuses a power-of-two tree's
        levels two at a time: 57 against 68 MiB of buffers for the loss and gradient of 4096000
        one-logit rows under ``jax.jit``); any other length is cut into power-of-two pieces, one
        per bit of the length (no copy: 0.6 against 0.7 MiB at 40960 rows), whose totals and
        carried errors are added at the end with their TwoSum errors.  Up to
        :attr:`pair_tree_upto` terms the tree from its second level keeps sums and errors in one
        array (the same operations, the same result)."""
        xp = self.xp
        if len(x.shape) > 1 and x.shape[-1] != 1:  # the class axis with the library's pairwise sum
            x = xp.sum(x, axis=-1)  # (a length-1 axis is dropped, not reduced: compilers make a
        x = self.unsharded(xp.reshape(x, (-1,)))  # reduction over it a scalar loop)
        n = x.shape[0]
        if n == 0:
            return xp.sum(x)

        def exact(e: Any) -> Any:  # inf - inf in an error term is not an error
            return self.where0(xp.isfinite(e), e)

        paired = n <= self.pair_tree_upto

        def tree(t: Any) -> tuple[Any, Any]:  # a power-of-two length: (total, carried error)
            err = None
            while t.shape[0] > 1 and (err is None or not paired):
                half = t.shape[0] // 2
                a, b = t[:half], t[half:]
                s = a + b
                e = exact(two_sum_error(a, b, s))
                err = e if err is None else e + (err[:half] + err[half:])
                t = s
            if t.shape[0] == 1:
                return t[0], (None if err is None else err[0])
            p = xp.stack([t, err], axis=0)  # the same operations on the pairs (pair_tree_upto)
            while p.shape[1] > 1:
                half = p.shape[1] // 2
                a, b = p[:, :half], p[:, half:]
                s = a[0] + b[0]
                p = xp.stack([s, exact(two_sum_error(a[0], b[0], s)) + (a[1] + b[1])], axis=0)
            return p[0, 0], p[1, 0]

        size = 1 << (n - 1).bit_length()
        if size != n and (size - n) * 16 <= n:
            x, n = xp.concat([x, xp.zeros_like(x[: size - n])]), size
        parts, start = [], 0
        while start < n:
            piece = 1 << ((n - start).bit_length() - 1)
            parts.append(tree(x[start:start + piece]))
            start += piece
        total, err = parts[0]
        for value, carried in parts[1:]:
            s = total + value
            for extra in (exact(two_sum_error(total, value, s)), carried):
                if extra is not None:
                    err = extra if err is None else err + extra
            total = s
        return total if err is None else total + err

    def pow2(self, n: Any) -> Any:
        """``2**n`` for integer-valued ``n`` in ``[-127, 127]`` (a float32 array), exactly 0 at
        ``n = -127`` (the polynomial exponential uses it for "underflowed").  Backends with a
        bit cast build it from the exponent bits."""
        xp = self.xp
        return xp.where(n < -126.5, self.scalar(0.0, n), xp.pow(self.scalar(2.0, n), n))

    def corrected_exp(self, x: Any, err: Any) -> Any:
        """``x * (1 + err)`` for ``x = exp(d)`` and the rounding error ``err`` of ``d``, as
        ``x + x * err`` (one rounding); :meth:`corrected_exp_ftz` where the backend
        :attr:`flushes_subnormals`."""
        if self.flushes_subnormals:
            return self.corrected_exp_ftz(x, err)
        return x + x * err

    def corrected_exp_ftz(self, x: Any, err: Any) -> Any:
        """:meth:`corrected_exp` where subnormals are flushed to zero: ``x * err`` is subnormal for
        small ``x`` (``x < 2**-109`` at the largest ``err``) and would be lost, so the correction is
        made at a scale of ``2**64`` and scaled back, ``(x' + x' * err) * 2**-64`` with
        ``x' = x * 2**64``.  Both scalings are exact (``x' <= 2**64``; the result is subnormal only
        where it is flushed anyway) and ``x' * err`` stays normal, so the one rounding is the
        addition's, as in ``x + x * err``.  (``x * (1 + err)`` is cheaper but rounds ``1 + err``:
        up to one more ulp, which put probabilities over 4 ulp at K = 1000 on XLA; a select
        between the two forms by the size of ``x`` is dearer than the scaling.)"""
        up = x * 2.0**64
        return (up + up * err) * 2.0**-64

    # -- value inspection (validation only; never on the compute path) -------------------------
    def eager(self) -> Any:
        """Context in which operations on concrete arrays give concrete results (validation),
        even inside a tracing context."""
        import contextlib

        return contextlib.nullcontext()

    def is_concrete(self, x: Any) -> bool:
        """False when ``x`` has no values yet (a tracer): its values are checked by
        :meth:`check` where the backend has :attr:`traced_checks`, else not at all."""
        return True

    #: Whether :meth:`check` puts value checks into a traced computation (JAX: ``checkify``).
    traced_checks = False

    def check(self, ok: Any, message: str, **values: Any) -> None:
        """A value check inside a traced computation: ``ok`` a 0-d boolean array, ``message`` a
        ``str.format`` template of the error and ``values`` its fields (arrays of the trace)."""
        raise NotImplementedError  # pragma: no cover - only called where traced_checks
