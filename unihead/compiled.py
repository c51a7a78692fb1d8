"""The compiled head every backend returns, and the canonical weight layout they share."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from ._engine import Engine
from ._ops import Ops
from .spec import ClassificationHead
from ._validation import check_inputs, check_logits, has_class_axis

__all__ = ["CompiledHead", "canonical_weights", "host_weights", "glorot_uniform", "compiled_head", "check_choice", "weights_mismatch"]


class CompiledHead:
    """A :class:`~unihead.ClassificationHead` bound to one framework.

    Methods (the same on every backend):

    - ``probabilities(logits)`` -> ``(..., num_outputs)``: sigmoid or softmax of the logits;
    - ``log_probabilities(logits)``: their logarithm, computed directly (accurate where the
      probability rounds to 0 or 1);
    - ``loss(logits, labels, sample_weight=None, *, normalizer=None)`` -> scalar, or per example
      for ``reduction="none"``; differentiable with respect to the logits in frameworks with
      autodiff.  ``normalizer=W``: the total over the examples divided by ``W`` (0 where ``W`` is
      0) instead of by this batch's own weight: the exact mean of a batch split into
      micro-batches or over workers, ``W`` being the whole batch's weight (docs/scaling-out.md);
    - ``loss_terms(logits, labels, sample_weight=None)`` -> ``(total, weight)``: the sum of the
      weighted per-example losses (differentiable) and the weight a mean divides it by (not
      differentiated); ``reduction="mean"`` is ``total / weight``, 0 where ``weight`` is 0;
    - ``loss_weight(labels, sample_weight=None)`` -> ``weight``, from the labels alone: what to add
      up over a step's micro-batches before their forward passes;
    - ``predict(logits)`` -> class ids ``(...)`` (binary, multiclass) or 0/1 ``(..., K)``
      (multilabel);
    - ``loss_fn()`` -> the loss as the framework's own loss object: an ``nn.Module`` (PyTorch), a
      ``keras.losses.Loss`` (Keras), a function ``(logits, labels, sample_weight=None) -> loss``
      (JAX, NumPy); it computes with this head's options;
    - ``layer(in_features, weights=None)`` -> the framework's own output layer producing logits.
      Every layer has ``get_canonical_weights()`` / ``set_canonical_weights(weights)``: weights in
      unihead's canonical layout, ``{"kernel": (in, out), "bias": (out,)}`` (see
      :func:`canonical_weights`), and ``compiled()``, the compiled head it came from.

    A compiled head is its spec, its class and its options (:meth:`options`): it pickles as
    ``cls(head, **options)``, so a subclass taking the same arguments round-trips as itself.

    float16/bfloat16 logits are computed in float32 (results are float32); float32 and float64
    are computed in their own dtype.  ``validate=False`` skips the value checks of labels and
    weights (no device synchronisation); shape and dtype checks always run.
    """

    backend: str = "?"

    def __init__(self, head: ClassificationHead, *, validate: bool = True):
        if not isinstance(head, ClassificationHead):
            raise TypeError(f"compile() takes a ClassificationHead, got {type(head).__name__}.")
        self.head = head
        self.validate = bool(validate)

    # -- what a backend provides: its primitives (conversion, dtypes, the formulas' kernels) ----
    ops: Ops

    # -- shared implementation ---------------------------------------------------------------
    def _logits(self, logits: Any) -> Any:
        """The logits as the backend's array in the compute dtype (half precision in float32,
        :meth:`Ops.widen_half`), their dtype and shape checked."""
        ops = self.ops
        return self._check(ops.widen_half(ops.convert(logits)))

    def _as_array(self, x: Any, like: Any) -> Any:
        """Labels or weights as the backend's array, on the logits' (``like``'s) device."""
        return self.ops.convert(x, like)

    def _engine(self) -> Engine:
        """This head's engine, built once (it keeps what it derives from the spec)."""
        engine = self.__dict__.get("_engine_built")
        if engine is None or engine.ops is not self.ops:
            engine = self.__dict__["_engine_built"] = Engine(self.head, self.ops)
        return engine

    def _check(self, z: Any) -> Any:
        check_logits(self.ops, self.head, z)
        return z

    def _inputs(self, z: Any, labels: Any, sample_weight: Any, validate: bool | None = None) -> tuple[Any, Any]:
        """Labels and sample weight as the backend's arrays, checked and normalised
        (:func:`~unihead._validation.check_inputs`); ``validate`` overrides the head's option."""
        with self.ops.eager():  # constants stay concrete (checkable) even while tracing
            labels = self._as_array(labels, z)
            if sample_weight is not None:
                sample_weight = self._as_array(sample_weight, z)
            return check_inputs(
                self.ops, self.head, z, labels, sample_weight,
                validate=self.validate if validate is None else validate,
            )

    def probabilities(self, logits: Any) -> Any:
        return self._engine().probabilities(self._logits(logits))

    def log_probabilities(self, logits: Any) -> Any:
        return self._engine().log_probabilities(self._logits(logits))

    def predict(self, logits: Any) -> Any:
        return self._engine().predict(self._logits(logits))

    def predict_names(self, logits: Any) -> np.ndarray:
        """The predicted classes by name (the head's ``class_names``), as a NumPy array on the
        host: binary and multiclass heads ``(...)`` of ``str`` (the name of :meth:`predict`'s
        class id); multilabel heads ``(...)`` of ``object``, each a tuple of the names of the
        labels predicted on, in class order (``()`` for none), like scikit-learn's
        ``MultiLabelBinarizer.inverse_transform``.  Names are for people and files, not for
        graphs: this always returns host data, also under ``jax.jit`` (where it cannot run)."""
        names = self.head.class_names
        if names is None:
            raise ValueError(
                f"predict_names needs the head's class names, and {self.head!r} has none: compile "
                "head.replace(class_names=[...]) (one name per class), or use predict(logits) for class ids."
            )
        ids = np.asarray(self.ops.to_numpy(self.predict(logits)))
        table = np.asarray(names, dtype=str)
        if self.head.task != "multilabel":
            return table[ids.astype(np.intp)]
        flat = ids.reshape(-1, ids.shape[-1]).astype(bool)
        out = np.empty(len(flat), dtype=object)
        out[:] = [tuple(table[row].tolist()) for row in flat]
        return out.reshape(ids.shape[:-1])

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None, *, normalizer: Any = None) -> Any:
        raise NotImplementedError  # pragma: no cover

    # -- the loss in pieces: micro-batches and workers (docs/scaling-out.md) -----------------------
    def _summed(self) -> "CompiledHead":
        """This head with ``reduction="sum"`` (same class and options), built once: the total
        over the examples, with this backend's kernels and gradient."""
        summed = self.__dict__.get("_summed_head")
        if summed is None:
            if self.head.reduction == "sum":
                summed = self
            else:
                summed = type(self)(dataclasses.replace(self.head, reduction="sum"), **self.options())
            self.__dict__["_summed_head"] = summed
        return summed

    def loss_terms(self, logits: Any, labels: Any, sample_weight: Any = None) -> tuple[Any, Any]:
        """``(total, weight)``: the sum of the weighted per-example losses (what
        ``reduction="sum"`` gives; differentiable with respect to ``logits``) and the sum of the
        weights ``reduction="mean"`` divides it by (:meth:`loss_weight`; not differentiated).
        Whatever this head's reduction, ``total / weight`` is its mean (0 where ``weight`` is 0),
        and the totals and weights of a batch's pieces add up to the whole batch's."""
        total = self._summed().loss(logits, labels, sample_weight)
        z = self._logits(logits)
        y, sw = self._inputs(z, labels, sample_weight, validate=False)  # checked by the loss
        return total, self.ops.stop_gradient(self._engine().loss_weight(y, sw, z))

    def loss_weight(self, labels: Any, sample_weight: Any = None, *, dtype: Any = None) -> Any:
        """What ``reduction="mean"`` divides the total loss of these labels by, from the labels
        alone (no logits): the number of examples, ignored labels counting 0, each example
        counting its sample weight times its class weight (a multilabel example: the mean of
        its labels' weights).  A 0-d array of ``dtype``: the dtype the loss is computed in
        (float32 for half precision); by default float64 when the sample weight or floating
        labels are float64, else float32.  A float64 model with class weights and integer
        labels passes ``dtype`` (its logits' dtype): class weights summed in float32 are not
        the float64 mean's denominator.

        Add it up over the micro-batches of a step (and over workers) and pass the sum as
        ``loss(..., normalizer=...)`` to each piece: the pieces' gradients then add up to the
        whole batch's mean gradient (docs/scaling-out.md)."""
        ops, xp, head = self.ops, self.ops.xp, self.head
        with ops.eager():
            y = ops.convert(labels)
            sw = None if sample_weight is None else ops.convert(sample_weight, y)
            dtype = self._weight_dtype(dtype, y, sw)
            shape = tuple(y.shape)
            lead = shape[:-1] if has_class_axis(head) or (len(shape) >= 2 and shape[-1] == 1) else shape
            like = _LogitsLike(lead + (head.num_outputs,), dtype, ops.device(y))
            y, sw = check_inputs(ops, head, like, y, sw, validate=self.validate)
        base = y if head.task == "multilabel" or not has_class_axis(head) else y[..., 0]
        weight = self._engine().loss_weight(y, sw, like, ones=lambda: ops.astype(xp.ones_like(base), like))
        return ops.stop_gradient(weight)

    def _weight_dtype(self, dtype: Any, labels: Any, sample_weight: Any) -> Any:
        """:meth:`loss_weight`'s dtype (the backend's float32 or float64) for ``dtype`` (a name,
        a NumPy dtype or the framework's own; half precision computes in float32), or by default
        from the floating inputs."""
        xp = self.ops.xp
        if dtype is None:
            wide = any(x is not None and x.dtype == xp.float64 for x in (labels, sample_weight))
            return xp.float64 if wide else xp.float32
        name = getattr(dtype, "name", None)
        if not isinstance(name, str):
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = str(dtype).rsplit(".", 1)[-1]  # torch.float64
        if name in ("float16", "bfloat16", "float32"):
            return xp.float32
        if name == "float64":
            return xp.float64
        raise ValueError(
            f"dtype must be the floating dtype the loss is computed in (float32, float64, or "
            f"float16/bfloat16, computed in float32); got {dtype!r}."
        )

    def _normalized(self, logits: Any, labels: Any, sample_weight: Any, normalizer: Any) -> Any:
        """``loss(..., normalizer=W)``: the total over the examples over ``W``, 0 where ``W`` is 0."""
        return self._divided(lambda: self._summed().loss(logits, labels, sample_weight), normalizer)

    def _divided(self, total_fn: Any, normalizer: Any) -> Any:
        """``total_fn()`` (the total over the examples: :meth:`loss` or :meth:`linear_loss` of the
        ``reduction="sum"`` twin) over ``normalizer``, 0 where it is 0, the normalizer checked
        first."""
        if self.head.reduction == "none":
            raise ValueError(
                "normalizer= divides the total loss, and this head has reduction='none' (a loss "
                "per example): use a head with reduction='mean' (or 'sum'), or loss_terms(...) "
                "for the total and the weight."
            )
        if isinstance(normalizer, bool) or not (
            isinstance(normalizer, (int, float)) or hasattr(normalizer, "shape")
        ):
            raise TypeError(
                f"normalizer must be a number or a 0-d array (the whole batch's loss_weight); got "
                f"{type(normalizer).__name__}."
            )
        if isinstance(normalizer, (int, float)) and not (math.isfinite(normalizer) and normalizer >= 0):
            raise ValueError(
                f"normalizer must be finite and >= 0 (a sum of weights); got {normalizer!r}."
            )
        total = total_fn()
        ops, xp = self.ops, self.ops.xp
        if isinstance(normalizer, (int, float)):
            n = ops.scalar(float(normalizer), total)
        else:
            with ops.eager():
                n = ops.convert(normalizer, total)
            if len(n.shape) != 0:
                raise ValueError(
                    f"normalizer must be a scalar (the whole batch's loss_weight); got shape "
                    f"{tuple(n.shape)}."
                )
            if not (ops.is_floating(n) or ops.is_integer(n)) or ops.is_bool(n):
                raise TypeError(
                    f"normalizer must be a number or a 0-d array of numbers (the whole batch's "
                    f"loss_weight); got an array of {n.dtype}."
                )
            if self.validate and ops.is_concrete(n):
                value = float(ops.to_numpy(n))
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(
                        f"normalizer must be finite and >= 0 (a sum of weights); got {value!r}."
                    )
            n = ops.stop_gradient(ops.astype(n, total))
        safe = xp.where(n > 0, n, ops.scalar(1.0, n))
        return ops.where0(n > 0, total / safe)

    # -- the fused linear + loss (unihead._fused; docs/api.md, "linear_loss") ---------------------
    def linear_loss(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any = None, sample_weight: Any = None, *,
        normalizer: Any = None, chunk_size: int | None = None,
    ) -> Any:
        """The loss of the logits ``hidden @ kernel + bias`` against ``labels``, exactly
        :meth:`loss`'s (every option of the head, ``reduction``, ``normalizer=``), computed
        through chunks of classes without holding the ``(..., num_outputs)`` logits or their
        gradient; differentiable with respect to ``hidden``, ``kernel`` and ``bias``.

        ``hidden``: ``(..., in_features)``; ``kernel``: ``(in_features, num_outputs)``, the
        canonical layout (a PyTorch ``nn.Linear`` passes ``kernel=linear.weight.T``, a view, and
        ``bias=linear.bias``); ``bias``: ``(num_outputs,)`` or None.  The matmuls run in the
        inputs' dtype (half precision: half matmuls, statistics and results in float32).
        ``chunk_size``: classes per chunk (default :func:`unihead._fused.chunk_size_for`: about
        2**22 logits a chunk).  Softmax heads with integer class ids only (multiclass with
        ``sparse`` labels, a 2-unit binary head without ``pos_weight``; focal loss without label
        smoothing); others are refused with what to write instead."""
        if normalizer is not None:
            twin = self._summed()
            return self._divided(
                lambda: twin.linear_loss(hidden, kernel, labels, bias, sample_weight, chunk_size=chunk_size),
                normalizer,
            )
        per, w = self._linear_rows(hidden, kernel, labels, bias, sample_weight, chunk_size)[:2]
        return self._engine()._reduce(per, w)[0]

    def linear_loss_terms(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any = None, sample_weight: Any = None, *,
        chunk_size: int | None = None,
    ) -> tuple[Any, Any]:
        """``(total, weight)`` of the fused loss, as :meth:`loss_terms` is to :meth:`loss`: the
        sum of the weighted per-example losses of ``hidden @ kernel + bias`` (differentiable) and
        the weight a mean divides it by (not differentiated)."""
        twin = self._summed()
        per, w, like, y, sw = twin._linear_rows(hidden, kernel, labels, bias, sample_weight, chunk_size)
        total = twin._engine()._reduce(per, w)[0]
        xp = self.ops.xp
        ones = lambda: xp.ones(tuple(like.shape[:-1]), dtype=like.dtype, device=like.device)
        return total, self.ops.stop_gradient(self._engine().loss_weight(y, sw, like, ones=ones))

    def _rows_of(self, x: Any, labels: Any, sample_weight: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
        """What the fused and class-sharded paths need of the labels, for rows ``x`` of shape
        ``(..., width)`` (hidden states, or one worker's logits): ``(lead, like, labels,
        sample_weight, weights, ids)`` with ``lead`` the rows' shape, ``like`` a stand-in for the
        full logits (shape, dtype, device), the checked labels and sample weight, the example
        weights (None where every weight is 1) and the target ids in the index dtype."""
        ops, xp, head = self.ops, self.ops.xp, self.head
        lead = tuple(x.shape[:-1])
        dtype = xp.float32 if ops.is_half(x) else x.dtype
        like = _LogitsLike(lead + (head.num_outputs,), dtype, ops.device(x))
        with ops.eager():
            y = ops.convert(labels, x)
            sw = None if sample_weight is None else ops.convert(sample_weight, x)
        y, sw = check_inputs(ops, head, like, y, sw, validate=self._validate_values())
        sizes = lead if _count(lead) is not None else ops.shape(x)[:-1]  # unknown ones as 0-d arrays
        ones = lambda: xp.ones(sizes, dtype=dtype, device=ops.device(x))
        weights, q = self._engine().example_weights(y, sw, like, ones=ones)
        if q.dtype != ops.index_dtype():
            q = xp.astype(q, ops.index_dtype())
        return lead, like, y, sw, weights, q

    def _linear_rows(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any, sample_weight: Any, chunk_size: Any
    ) -> tuple[Any, Any, Any, Any, Any]:
        """The checked inputs of :meth:`linear_loss` through the backend's fused function
        (:meth:`_fused_rows`): the per-example losses ``(...)`` (differentiable), the example
        weights (None where every weight is 1), a stand-in for the logits (shape, dtype, device),
        and the checked labels and sample weight."""
        from . import _fused

        xp, head = self.ops.xp, self.head
        problem = _fused.unsupported(head)
        if problem is not None:
            raise ValueError(problem)
        h, w, b = self._linear_arrays(hidden, kernel, bias)
        lead, like, y, sw, weights, q = self._rows_of(h, labels, sample_weight)
        n = _count(lead)
        d, v = w.shape
        if chunk_size is not None:
            chunk = _fused.check_chunk_size(chunk_size)
        else:  # rows unknown while tracing (a TensorFlow graph's batch): sized for UNKNOWN_ROWS
            chunk = _fused.chunk_size_for(_fused.UNKNOWN_ROWS if n is None else n, v)
        rows = -1 if n is None else n
        per = self._fused_rows(xp.reshape(h, (rows, d)), w, b, xp.reshape(q, (rows,)), min(chunk, v))
        return xp.reshape(per, lead if n is not None else self.ops.shape(h)[:-1]), weights, like, y, sw

    def _validate_values(self) -> bool:
        """Whether :meth:`linear_loss` checks the values of labels and weights (the head's
        ``validate``; a backend turns it off where values do not exist, e.g. while tracing)."""
        return self.validate

    def _linear_arrays(self, hidden: Any, kernel: Any, bias: Any) -> tuple[Any, Any, Any]:
        """``hidden``, ``kernel``, ``bias`` as the backend's arrays, their shapes and dtypes checked
        (:func:`unihead._fused.check_linear`)."""
        from . import _fused

        ops = self.ops
        with ops.eager():
            h = ops.convert(hidden)
            w = ops.convert(kernel, h)
            b = None if bias is None else ops.convert(bias, h)
        _fused.check_linear(ops, self.head, h, w, b)
        return h, w, b

    def _fused_rows(self, h: Any, w: Any, b: Any, y: Any, chunk: int) -> Any:
        """Per-row losses ``(N,)`` of ``h @ w + b`` for class ids ``y`` (:func:`unihead._fused.rows_forward`),
        differentiable with respect to ``h``, ``w`` and ``b`` where the framework differentiates:
        what a backend wraps in its autodiff."""
        from . import _fused

        return _fused.rows_forward(self.ops, h, w, b, y, spec=_fused.row_spec(self._engine()), chunk=chunk).loss

    # -- the class-sharded loss (unihead._sharded; docs/large-vocabulary.md) ------------------
    def _class_sharded(
        self, name: str, local_logits: Any, labels: Any, sample_weight: Any, class_start: Any,
        rows: Any, normalizer: Any = None,
    ) -> Any:
        """The head's loss over every class from this worker's ``local_logits`` ``(...,
        local_classes)`` (the classes from ``class_start``): the checks, weights and reduction of
        :meth:`loss` around ``rows(z, y, start) -> (N,)``, the backend's differentiable per-row
        losses with its collectives (:func:`unihead._sharded.rows_forward`).  ``class_start``: an
        int (checked), or a traced integer the backend computed (e.g. from the device's index).
        ``name``: the public function's, for the errors."""
        from . import _fused, _sharded
        from ._validation import logits_dtype_error

        if normalizer is not None:
            twin = self._summed()
            return self._divided(
                lambda: twin._class_sharded(name, local_logits, labels, sample_weight, class_start, rows),
                normalizer,
            )
        ops, xp, head = self.ops, self.ops.xp, self.head
        problem = _sharded.unsupported(head, name)
        if problem is not None:
            raise ValueError(problem)
        with ops.eager():
            z = ops.convert(local_logits)
        if not _fused.floating(ops, z):
            raise logits_dtype_error(z.dtype)
        if len(z.shape) == 0:
            raise ValueError(
                f"{name}: local_logits must have shape (..., local_classes): this worker's logits "
                f"of its classes; got a 0-d array."
            )
        width = z.shape[-1]
        if isinstance(class_start, (int, np.integer)) or not hasattr(class_start, "dtype"):
            _sharded.check_shard(name, head.num_outputs, width, class_start)
            class_start = int(class_start)
        lead, like, y, sw, weights, q = self._rows_of(z, labels, sample_weight)
        n = _count(lead)
        per = rows(xp.reshape(z, (n, width)), xp.reshape(q, (n,)), class_start)
        return self._engine()._reduce(xp.reshape(per, lead), weights)[0]

    def loss_fn(self) -> Any:
        """The loss as a plain function ``(logits, labels, sample_weight=None) -> loss`` (this
        head's :meth:`loss`: a pure function of its arrays, usable in ``jax.jit``/``jax.grad`` and
        optax code on JAX).  PyTorch and Keras return their own loss objects instead."""
        return self.loss

    def layer(self, in_features: int, weights: Any = None, **kwargs: Any) -> Any:
        raise NotImplementedError  # pragma: no cover

    def options(self) -> dict[str, Any]:
        """The keyword options this head was compiled with: ``type(self)(head, **options)`` (and
        ``unihead.compile(head, backend, **options)``) rebuilds it.  A subclass with options of
        its own adds them here."""
        return {"validate": self.validate}

    def _with_options(self, **options: Any) -> "CompiledHead":
        """This head compiled with ``options`` changed: ``self`` when they change nothing (what a
        loss object or layer built from it shares, with its kernels), else a new head of the same
        class with the other options kept."""
        current = self.options()
        if all(k in current and current[k] == v for k, v in options.items()):
            return self
        return type(self)(self.head, **{**current, **options})

    def __reduce__(self) -> Any:
        # a compiled head is its class, spec and options: rebuild rather than pickle namespaces
        # (the class pickles by its qualified name, so a subclass rebuilds as itself)
        return (_rebuild, (type(self), self.head, self.options()))

    def __repr__(self) -> str:
        return f"<unihead {self.backend} head: {self.head!r}>"


def _count(shape: tuple) -> int | None:
    """The number of elements of an array of ``shape``; None where a dimension is unknown (a
    traced TensorFlow graph's batch)."""
    if any(d is None for d in shape):
        return None
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _LogitsLike:
    """What validation and :meth:`Engine.example_weights` read of logits that are not there
    (:meth:`CompiledHead.loss_weight`): their shape, dtype and device."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, shape: tuple, dtype: Any, device: Any):
        self.shape, self.dtype, self.device = shape, dtype, device


def _rebuild(cls: Any, head: ClassificationHead, options: dict[str, Any]) -> CompiledHead:
    if isinstance(cls, str):  # pickled by unihead <= 0.x: by backend name
        from ._registry import compile

        return compile(head, cls, **options)
    return cls(head, **options)


def compiled_head(head: Any, cls: type, options: dict[str, Any]) -> CompiledHead:
    """What a backend's layer or loss object computes with: ``head`` itself when it is a compiled
    head of class ``cls`` (with ``options`` changed, if any), else ``cls(head, **options)``."""
    if isinstance(head, cls):
        return head._with_options(**options)
    if isinstance(head, CompiledHead):
        raise TypeError(
            f"expected a ClassificationHead or a {cls.__name__}; got a {type(head).__name__} "
            f"(compiled for {head.backend}): pass its spec, compiled.head."
        )
    return cls(head, **options)


def check_choice(name: str, value: Any, choices: tuple) -> Any:
    """``value`` if it is one of ``choices`` (compared by equality and type: ``1`` is not
    ``True``), else a ``ValueError`` naming the option and its values."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def weights_mismatch(saved: ClassificationHead, head: ClassificationHead) -> str | None:
    """What makes weights trained for ``saved`` mean something else under ``head``, or None.

    A layer's weights produce logits; what a logit means is fixed by the task (softmax over
    classes, independent sigmoids, a yes/no score) and the number of outputs (for a binary head:
    its units).  Everything else in a spec (label format, smoothing, class and positive weights,
    ignore index, focal loss, reduction, threshold, z-loss, and the soft-cap ``s tanh(z / s)``)
    is how the loss, the probabilities or the decision read the same logits: weights move
    freely between such heads (a cap changes the probabilities read from them, so a port's
    check compares probabilities each computed with its own head's cap)."""
    if saved.task == head.task == "binary" and saved.binary_units != head.binary_units:
        return f"binary_units={saved.binary_units} vs {head.binary_units}"
    if saved.task != head.task:
        return f"task {saved.task!r} vs {head.task!r}"
    if saved.num_outputs != head.num_outputs:
        return f"{saved.num_outputs} outputs vs {head.num_outputs}"
    return None


def glorot_uniform(rng: np.random.Generator, fan_in: int, fan_out: int, dtype: Any) -> np.ndarray:
    """Keras' default kernel initialiser: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(dtype)


def host_weights(weights: Any) -> Any:
    """``weights`` (a ``{"kernel", "bias"}`` mapping or a pair) with every array copied to the
    host as NumPy (PyTorch tensors on any device, JAX and Keras arrays)."""

    def conv(x: Any) -> Any:
        if hasattr(x, "detach"):
            x = x.detach().cpu()
        return np.asarray(x)

    if isinstance(weights, Mapping):
        return {k: conv(v) for k, v in weights.items()}
    if isinstance(weights, (tuple, list)) and len(weights) == 2:
        return tuple(conv(v) for v in weights)
    return weights


def canonical_weights(
    head: ClassificationHead, in_features: int | None, weights: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Validate weights in unihead's canonical layout and return ``(kernel, bias)`` as NumPy arrays:
    ``kernel`` of shape ``(in_features, num_outputs)`` (Keras/Flax layout), ``bias`` of shape
    ``(num_outputs,)``.  Accepts a mapping with keys ``"kernel"`` and ``"bias"`` or a pair."""
    if isinstance(weights, Mapping):
        unknown = set(weights) - {"kernel", "bias"}
        if unknown or "kernel" not in weights or "bias" not in weights:
            raise ValueError(
                f"weights must have the keys 'kernel' (in_features, num_outputs) and 'bias' "
                f"(num_outputs,); got keys {sorted(map(str, weights))}."
            )
        kernel, bias = weights["kernel"], weights["bias"]
    elif isinstance(weights, (tuple, list)) and len(weights) == 2:
        kernel, bias = weights
    else:
        raise TypeError(
            "weights must be {'kernel': (in_features, num_outputs), 'bias': (num_outputs,)} or a "
            f"(kernel, bias) pair; got {type(weights).__name__}."
        )
    kernel = np.asarray(kernel)
    bias = np.asarray(bias)
    k = head.num_outputs
    if kernel.ndim != 2 or kernel.shape[1] != k or (in_features is not None and kernel.shape[0] != in_features):
        want = f"({in_features if in_features is not None else 'in_features'}, {k})"
        hint = ""
        if kernel.ndim == 2 and kernel.shape[0] == k and kernel.shape[1] != k:
            hint = (
                " It looks transposed: unihead's canonical layout is (in, out) like Keras and Flax; "
                "a PyTorch nn.Linear.weight is (out, in), so pass weight.T."
            )
        raise ValueError(
            f"kernel must have shape {want} (in_features, num_outputs); got {kernel.shape}.{hint}"
        )
    if bias.shape != (k,):
        raise ValueError(f"bias must have shape ({k},) (num_outputs,); got {bias.shape}.")
    if not (np.issubdtype(kernel.dtype, np.floating) and np.issubdtype(bias.dtype, np.floating)):
        raise TypeError(f"weights must be floating-point; got kernel {kernel.dtype}, bias {bias.dtype}.")
    return kernel, bias
