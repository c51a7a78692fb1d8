"""JAX backend: ``unihead.compile(head, "jax")``.

Pure functions over arrays and pytrees, the way JAX code is written:

* ``compiled.loss(logits, labels, sample_weight=None)`` is a pure function with a
  ``jax.custom_vjp`` carrying the analytic gradient; it works under ``jax.jit``, ``jax.grad``,
  ``jax.value_and_grad`` and ``jax.vmap``, with ``jax_enable_x64`` on or off;
  ``compiled.loss_fn()`` is the same function, for code that takes a loss function (optax
  style: ``loss_fn(logits, labels)``);
* ``compiled.layer(in_features)`` gives :class:`Dense` with ``init(key[, x]) -> params`` (the
  ``{"kernel": (in, out), "bias": (out,)}`` layout of ``flax.linen.Dense`` / ``flax.nnx.Linear``)
  and ``apply(params, x) -> logits``; ``get_weights(params)`` / ``set_weights(params, weights)
  -> params`` move canonical weights out of and into a params pytree (nothing is mutated);
* bfloat16/float16 logits are computed in float32;
* at scale (docs/scaling-out.md): under ``jax.jit`` over batch-sharded arrays (a ``Mesh`` of
  automatic or explicit axes) ``compiled.loss`` is the global batch's mean as it is; inside
  ``jax.shard_map`` or ``jax.pmap``, :func:`global_normalizer` makes each device's loss its share
  of the global mean (``normalizer=global_normalizer(compiled.loss_weight(y), "batch")``).

The math is the shared formula code running on ``jax.numpy`` (an Array API namespace).  Under
XLA the backward pass recomputes the softmax statistics from the logits instead of saving them:
the recomputation fuses into the backward kernel and saves a ``(..., K)`` buffer.  float32
exponentials of shifted logits use the shared polynomial exponential
(:func:`unihead.formulas.shifted_exp`, ``JaxOps.poly_exp``), which XLA fuses into one loop at
about the cost of its own ``exp(z - m)``; this module adds only ``2**n`` from exponent bits.

Validation: shape and dtype checks always run (shapes are static).  Values are checked eagerly
where they exist (eager calls; constants inside ``jit``, but not inside ``shard_map``, where
they are traced like the rest: see ``JaxOps.eager``).  Where labels or weights are traced
(``jit``, ``vmap``, ``scan``) they are not checked, unless the head is compiled with
``checkify=True``: the loss then emits the same checks, with the same messages, as
``jax.experimental.checkify`` checks (``checkify.debug_check``), which run when the caller wraps
the function with ``checkify.checkify`` (a traced call never raises a
``ConcretizationTypeError``)::

    compiled = unihead.compile(head, "jax", checkify=True)
    step = checkify.checkify(jax.jit(train_step))
    err, out = step(params, x, y)
    err.throw()  # ValueError: labels[2] = 7 is not a class id: ... (`check` failed)

They are opt-in because an effect in a jitted function takes its calls off ``jax.jit``'s C++
dispatch path (+80 us a call here, checked or not); ``validate=False`` (or
``unihead.set_validation(False)`` when the function is traced) emits no checks at all
(docs/semantics.md §9).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from unihead._ops import Ops
from unihead.compiled import CompiledHead, canonical_weights, check_choice
from unihead.spec import ClassificationHead

__all__ = ["compile_head", "JaxHead", "JaxOps", "Dense", "global_normalizer", "class_sharded_loss"]

class JaxOps(Ops):
    name = "jax"
    poly_exp = True  # XLA fuses the polynomial exponential into one loop (see Ops.poly_exp)
    flushes_subnormals = True  # XLA on CPU
    half_dtypes = (jnp.float16, jnp.bfloat16)
    pair_tree_upto = 1024  # a training batch's mean (see Ops.pair_tree_upto)

    def __init__(self, traced_checks: bool = False) -> None:
        super().__init__(jnp)
        # value checks of traced labels and weights, as checkify checks: only on request
        # (JaxHead's checkify=True), since an effect in a jitted function's jaxpr takes every call
        # of it off jit's C++ dispatch path (measured: +80 us a step, 4x a small MLP's step)
        self.traced_checks = traced_checks

    def device(self, x: Any) -> Any:
        return None  # JAX places results like their inputs (and on the default device otherwise)

    def accumulate64(self, x: Any) -> bool:
        return bool(jax.config.jax_enable_x64)  # without it there is no float64 under jit

    def pow2(self, n: Any) -> Any:
        # n + 1.5 * 2**23 holds n in its low mantissa bits (exactly, |n| < 2**22); shifted up by 23
        # they are n in the exponent field, the rest shifted out: + bits(1.0) gives (n + 127) << 23,
        # which is 0.0 at n = -127.  (A float-to-int conversion is five instructions in XLA: it
        # saturates and maps NaN.)
        bits = jax.lax.bitcast_convert_type(n + 12582912.0, jnp.int32)
        return jax.lax.bitcast_convert_type(jax.lax.shift_left(bits, np.int32(23)) + 0x3F800000, jnp.float32)

    def index_dtype(self) -> Any:
        return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32

    # put_last is the portable compare-with-iota select (Ops.put_last), not a scatter: XLA fuses
    # the select into the loop that computes the array, where a scatter is a loop of its own with
    # an index array (row, label) that stays live from the forward pass to the backward one (JAX
    # multiclass (4096, 10) memory, docs/benchmarks.md).  It also keeps the sharding of arrays
    # split over a mesh's explicit axes (put_along_axis drops the indices' sharding).
    #
    # Under jax.jit over arrays sharded along a mesh's explicit axes (jax.make_mesh's default),
    # the sharding is part of the arrays' types, and JAX refuses what it cannot place by type:
    # the methods below place their results (or avoid what JAX cannot place).

    def ones_rows(self, x: Any) -> Any:
        # not from the slice x[..., 0], which JAX refuses where the class axis is split over a
        # mesh's explicit axes (a slice of a sharded dimension narrower than the mesh axis)
        return jnp.ones_like(x, shape=x.shape[:-1])

    def take_last(self, x: Any, idx: Any) -> Any:
        sharding = _explicit_sharding(x)
        if sharding is not None and sharding.spec[-1:] != (None,) and len(sharding.spec) == x.ndim:
            # the class axis is split over devices: a gather along it has no placement by type;
            # the one-hot select and a sum over the classes (exact: one term is not 0) does
            k = x.shape[-1]
            hit = jnp.arange(k, dtype=idx.dtype) == idx[..., None]
            return jnp.sum(jnp.where(hit, x, jnp.zeros((), x.dtype)), axis=-1)
        return super().take_last(x, idx)

    def unsharded(self, x: Any) -> Any:
        # halves of the batch axis that do not split evenly over the devices: the per-example
        # values (a number an example) are gathered, and the sum is the single-device one
        sharding = _explicit_sharding(x)
        if sharding is None:
            return x
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))

    def lookup(self, table: Any, idx: Any) -> Any:
        # table[idx] (class weights by label): the result is placed like the indices
        sharding = _explicit_sharding(idx)
        if sharding is None:
            return super().lookup(table, idx)
        return table.at[idx].get(out_sharding=sharding)

    def stop_gradient(self, x: Any) -> Any:
        return jax.lax.stop_gradient(x)

    # chunks of the class axis at traced offsets (the fused linear loss's lax.fori_loop)
    def columns(self, x: Any, start: Any, width: int) -> Any:
        return jax.lax.dynamic_slice_in_dim(x, start, width, axis=x.ndim - 1)

    def put_columns(self, buf: Any, start: Any, values: Any) -> Any:
        return jax.lax.dynamic_update_slice_in_dim(buf, values.astype(buf.dtype), start, axis=buf.ndim - 1)

    def empty_like_columns(self, x: Any) -> Any:
        return jnp.zeros_like(x)

    def eager(self) -> Any:
        if jax.sharding.get_abstract_mesh().manual_axes:
            # inside `shard_map`, JAX evaluates at once the implicit `pvary` that makes such a
            # constant per-device where it meets a per-device array (in `!=`, `%`, indexing),
            # and refuses to ("pvary should be called under jax.shard_map"); there, constants
            # are traced like the rest (their values checked by checkify, as traced values are)
            return contextlib.nullcontext()
        return jax.ensure_compile_time_eval()

    def is_concrete(self, x: Any) -> bool:
        return not isinstance(x, jax.core.Tracer)

    def check(self, ok: Any, message: str, **values: Any) -> None:
        # a no-op unless the caller functionalises the checks with checkify.checkify (a plain
        # checkify.check would make jit refuse to trace the loss); XLA drops its operands then
        checkify.debug_check(ok, message, **values)


def _explicit_sharding(x: Any) -> Any:
    """``x``'s sharding where its type has one that splits an axis (a ``NamedSharding`` over a
    mesh's explicit axes), else None (one device, a mesh's automatic axes, inside ``shard_map``)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return None if spec is None or all(axis is None for axis in spec) else sharding


_OPS = JaxOps()
_OPS_CHECKIFY = JaxOps(traced_checks=True)


class JaxHead(CompiledHead):
    """The compiled head on JAX (see :class:`unihead.CompiledHead` for the methods).

    ``keep="inputs"`` (default) recomputes the softmax/sigmoid statistics in the backward pass,
    which XLA fuses; ``keep="stats"`` saves them instead.

    ``checkify=True``: where labels or weights are traced (``jit``, ``vmap``, ``scan``), the
    loss emits its value checks as ``jax.experimental.checkify`` checks, which run when the
    caller wraps the step with ``checkify.checkify``.  Off by default: such checks are an effect
    of the traced function, and ``jax.jit`` dispatches a function with effects on its slower
    Python path (about +80 us a call on CPU, whether or not ``checkify`` runs them)."""

    backend = "jax"
    ops = _OPS

    def __init__(self, head: ClassificationHead, *, validate: bool = True, keep: str = "inputs",
                 checkify: bool = False):
        super().__init__(head, validate=validate)
        self.keep = check_choice("keep", keep, ("inputs", "stats"))
        self.checkify = check_choice("checkify", checkify, (False, True))
        if self.checkify:
            self.ops = _OPS_CHECKIFY
        self._loss_fn = self._make_loss()

    def options(self) -> dict[str, Any]:
        return {"validate": self.validate, "keep": self.keep, "checkify": self.checkify}

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

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None, *, normalizer: Any = None) -> Any:
        """The loss (0-d array, or ``(...)`` for ``reduction="none"``): a pure function of its
        arrays, differentiable with respect to ``logits`` (``jax.grad``); float32 for
        half-precision logits, whose gradient comes back in their own dtype.  ``normalizer``:
        see :meth:`unihead.CompiledHead.loss` (the total over ``normalizer``)."""
        if normalizer is not None:
            return self._normalized(logits, labels, sample_weight, normalizer)
        z = self._logits(logits)
        labels, sample_weight = self._inputs(z, labels, sample_weight)
        return self._loss_fn(z, labels, sample_weight)

    def _fused_rows(self, h: Any, w: Any, b: Any, y: Any, chunk: int) -> Any:
        key = (chunk, b is None)
        fns = self.__dict__.setdefault("_fused_fns", {})
        if key not in fns:
            fns[key] = _fused_rows_fn(self._engine(), chunk)
        return fns[key](h, w, b, y)

    def linear_loss(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any = None, sample_weight: Any = None, *,
        normalizer: Any = None, chunk_size: int | None = None,
    ) -> Any:
        """The loss of ``hidden @ kernel + bias`` without the ``(N, V)`` logits (see
        :meth:`unihead.CompiledHead.linear_loss`): a pure function of its arrays with a
        ``jax.custom_vjp`` whose backward pass recomputes each chunk's logits; the chunks run
        through ``lax.fori_loop`` (one chunk's code in the traced program), under ``jax.jit``,
        ``jax.grad`` and ``jax.value_and_grad``.  ``kernel`` is ``params["kernel"]`` of
        :class:`Dense` (``flax.linen.Dense``'s layout)."""
        return super().linear_loss(
            hidden, kernel, labels, bias, sample_weight, normalizer=normalizer, chunk_size=chunk_size
        )

    def layer(self, in_features: int, weights: Any = None, *, dtype: Any = jnp.float32) -> "Dense":
        """The output layer as pure functions: ``init(key[, x]) -> params``, ``apply(params, x)``
        (see :class:`Dense`)."""
        return Dense(self, in_features, weights, dtype=dtype)


def _fori(n: int, body: Any, carry: Any) -> Any:
    return jax.lax.fori_loop(0, n, body, carry)


def _fused_rows_fn(engine: Any, chunk: int) -> Any:
    """Per-row losses of ``h @ w + b`` for class ids ``y`` (:mod:`unihead._fused`) as a
    ``jax.custom_vjp`` function ``(h, w, b, y) -> (N,)``; the backward pass recomputes the
    chunks' logits (nothing of size ``(N, V)`` is saved)."""
    from unihead import _fused

    consts = dict(spec=_fused.row_spec(engine), chunk=chunk)

    def forward(h: Any, w: Any, b: Any, y: Any) -> Any:
        return _fused.rows_forward(_OPS, h, w, b, y, loop=_fori, **consts)

    @jax.custom_vjp
    def rows(h: Any, w: Any, b: Any, y: Any) -> Any:
        return forward(h, w, b, y).loss

    def fwd(h: Any, w: Any, b: Any, y: Any) -> Any:
        fin = forward(h, w, b, y)
        return fin.loss, (h, w, b, y, fin)

    def bwd(saved: Any, g: Any) -> Any:
        h, w, b, y, fin = saved
        gh, gw, gb = _fused.rows_backward(_OPS, h, w, b, y, fin, g.astype(fin.m.dtype), loop=_fori, **consts)
        return gh, gw, gb, None

    rows.defvjp(fwd, bwd)
    return rows


class Dense:
    """``logits = x @ params["kernel"] + params["bias"]`` with ``kernel (in, out)``, ``bias (out,)``:
    the parameter layout of ``flax.linen.Dense`` and ``flax.nnx.Linear``, so ``params`` drop into
    Flax code and optax optimisers as they are.

    The layer holds no state: its parameters are a pytree you keep, as everywhere in JAX.  The
    head's params are one entry of a model's params, and one optax optimiser trains them all::

        compiled = unihead.compile(ClassificationHead.multiclass(10), "jax")
        head = compiled.layer(128)
        k1, k2 = jax.random.split(jax.random.key(0))
        params = {"encoder": init_encoder(k1), "head": head.init(k2, features)}  # features (N, 128)

        def loss(params, x, y):
            return compiled.loss(head.apply(params["head"], encoder(params["encoder"], x)), y)

        tx = optax.adam(1e-3)
        opt_state = tx.init(params)

        @jax.jit
        def step(params, opt_state, x, y):
            value, grads = jax.value_and_grad(loss)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

    In a Flax ``linen`` module, ``params["head"]`` is what ``nn.Dense(num_outputs, name="head")``
    holds: ``head.apply(variables["params"]["head"], h)`` computes the same logits.

    ``head``: the spec, or the compiled :class:`JaxHead` it came from (:meth:`compiled`)."""

    def __init__(self, head: Any, in_features: int, weights: Any = None, *, dtype: Any = jnp.float32):
        self._compiled = head if isinstance(head, JaxHead) else None
        self.head = head = head.head if self._compiled is not None else head
        self.in_features = int(in_features)
        self.out_features = head.num_outputs
        self.dtype = dtype
        self._weights = None if weights is None else canonical_weights(head, in_features, weights)

    def init(self, key: Any, x: Any = None) -> dict[str, Any]:
        """Parameters ``{"kernel": (in, out), "bias": (out,)}``: the weights given to the layer,
        or Flax's defaults (LeCun-normal kernel from ``key``, zero bias).

        ``x`` (optional, as in Flax's ``init(key, x)``): a sample input (an array, or anything
        with a ``shape`` such as ``jax.ShapeDtypeStruct``), checked to have ``in_features``
        features in its last dimension.  The result is the params themselves, not Flax's
        ``{"params": ...}`` variables: they are one entry of your model's params."""
        if x is not None:
            shape = tuple(getattr(x, "shape", None) or np.shape(x))
            if not shape or shape[-1] != self.in_features:
                got = f"{shape[-1]} features (its last dimension; shape {shape})" if shape else "no feature axis (a scalar)"
                raise ValueError(
                    f"init(key, x): x has {got}, but this layer takes in_features={self.in_features}. "
                    f"Build the layer for your features: compiled.layer({shape[-1] if shape else 'in_features'})."
                )
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
        """``params`` in the canonical layout as NumPy arrays on the host (they already are
        ``(in, out)``): what every backend's layer loads with ``set_weights``."""
        _check_params(params)
        return {"kernel": _OPS.to_numpy(params["kernel"]), "bias": _OPS.to_numpy(params["bias"])}

    def set_weights(self, params: dict[str, Any], weights: Any) -> dict[str, Any]:
        """New params holding canonical-layout ``weights`` (a ``{"kernel", "bias"}`` mapping or a
        ``(kernel, bias)`` pair, e.g. another backend's ``layer.get_weights()``), in the dtype
        and on the devices of ``params``.  Pure, like ``x.at[i].set(v)``: ``params`` is not
        changed; use the result (``params["head"] = head.set_weights(params["head"], w)``)."""
        _check_params(params)
        kernel, bias = canonical_weights(self.head, self.in_features, weights)
        return {"kernel": _like(kernel, params["kernel"]), "bias": _like(bias, params["bias"])}

    # the names every backend's layer has (Keras' own get_weights/set_weights are Keras' lists)
    get_canonical_weights = get_weights
    set_canonical_weights = set_weights

    def compiled(self, **options: Any) -> JaxHead:
        """The compiled head of this layer: the one it was built from, with its options;
        ``options`` change some of them."""
        if self._compiled is None:
            self._compiled = JaxHead(self.head)
        return self._compiled._with_options(**options)

    def __repr__(self) -> str:
        return f"Dense(in_features={self.in_features}, out_features={self.out_features}, head={self.head!r})"


def _check_params(params: Any) -> None:
    if not (hasattr(params, "keys") and "kernel" in params and "bias" in params):
        raise TypeError(
            "params must be this layer's {'kernel': (in, out), 'bias': (out,)} (what layer.init "
            f"returns); got {type(params).__name__}"
            + (f" with keys {sorted(map(str, params.keys()))}" if hasattr(params, "keys") else "") + "."
        )


def _like(value: np.ndarray, old: Any) -> Any:
    """``value`` as a JAX array with ``old``'s dtype, on ``old``'s devices when it has some."""
    new = jnp.asarray(value, dtype=old.dtype)
    if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
        new = jax.device_put(new, old.sharding)
    return new


def global_normalizer(weight: Any, axis_name: Any, *, average_gradients: bool = True) -> Any:
    """The normalizer that makes a data-parallel step's loss the global weighted mean: this
    device's ``weight`` summed over the devices of ``axis_name`` (``lax.psum``), divided by their
    number when ``average_gradients``; a 0-d float array, not differentiated.

    Call it inside the function mapped over the devices (``jax.shard_map`` with a mesh axis
    ``axis_name``, or ``jax.pmap(..., axis_name=...)``), with the weight of this device's shard
    (``compiled.loss_weight(labels, sample_weight)``, or the ``weight`` of ``loss_terms``)::

        w = global_normalizer(compiled.loss_weight(y, sw), "batch")
        loss = compiled.loss(logits, y, sw, normalizer=w)  # this shard's sum / the global weight

    Each device's loss is then its share of the global mean, counted in the global weight: an
    all-ignored shard contributes 0, a shard with more weight more.  ``average_gradients`` says
    how the step combines the devices:

    * ``True`` (default): it averages them, ``lax.pmean`` of the loss or of the gradients (the
      ``pmap`` step, JAX's own data-parallel ``shard_map`` example); the normalizer is then the
      global weight / the number of devices, which the average multiplies back;
    * ``False``: it sums them, ``lax.psum`` of the loss, or gradients taken inside ``shard_map``
      with respect to replicated parameters, which JAX already sums over the axis (the
      transpose of their implicit broadcast, under ``shard_map``'s default ``check_vma=True``).

    Under a plain ``jax.jit`` over batch-sharded arrays (``NamedSharding`` on a ``Mesh``) no
    normalizer is needed: ``compiled.loss(logits, labels)`` is the global mean already, since
    the program is the single-device one that XLA partitions."""
    if not isinstance(average_gradients, bool):
        raise TypeError(
            f"global_normalizer: average_gradients must be True or False; got {average_gradients!r}. "
            "True when the step averages over the devices (lax.pmean of the loss or gradients), "
            "False when it sums them (lax.psum, or gradients inside shard_map)."
        )
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or any(n is None or not _hashable(n) for n in names):
        raise TypeError(
            "global_normalizer: axis_name is the name of the mesh axis the batch is split over "
            f"(a string such as 'batch', or a tuple of names); got {axis_name!r}."
        )
    w = jnp.asarray(weight)
    if w.ndim != 0:
        raise ValueError(
            f"global_normalizer: weight must be this device's total weight, a number or 0-d array "
            f"(compiled.loss_weight(labels, sample_weight), or the weight of loss_terms); got shape "
            f"{tuple(w.shape)}. Sum per-example weights first."
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):  # a count: the float dtype computations use
        w = w.astype(jnp.result_type(float))
    try:  # the name first: psum of a per-device value over a name shard_map lacks fails an assert
        size = jax.lax.axis_size(axis_name)
    except NameError as e:
        bound = jax.sharding.get_abstract_mesh().axis_names
        here = f" (the mesh here has the axes {bound})" if bound else ""
        raise ValueError(
            f"global_normalizer(weight, {axis_name!r}): no axis {axis_name!r} is bound here{here}. Call it "
            f"inside the function mapped over the devices: jax.shard_map(step, mesh=mesh, "
            f"in_specs=..., out_specs=...) with mesh = jax.make_mesh((n,), ({axis_name!r},)), or "
            f"jax.pmap(step, axis_name={axis_name!r}); the name must be the mesh's (or pmap's) axis "
            f"name. Under a plain jax.jit over batch-sharded arrays, no normalizer is needed: "
            f"compiled.loss(logits, labels) is the global mean already. (JAX: {e})"
        ) from None
    total = jax.lax.psum(w, axis_name)
    return jax.lax.stop_gradient(total / size if average_gradients else total)


# ------------------------------------------------------------- the class-sharded (vocab-parallel) loss
def class_sharded_loss(
    compiled: Any, local_logits: Any, labels: Any, sample_weight: Any = None, *, axis_name: Any,
    class_start: Any = None, normalizer: Any = None,
) -> Any:
    """The loss of a head whose classes are split over the devices of the mesh axis
    ``axis_name``, called inside ``jax.shard_map``: each device passes the logits of its own
    classes, ``local_logits`` ``(..., local_classes)`` (e.g. ``hidden @ kernel_shard`` with the
    kernel's spec ``P(None, axis_name)``), and the same ``labels`` (global class ids) and
    ``sample_weight``; every device gets the loss of the whole row, exactly ``compiled.loss`` of
    the full logits (every option of the head, ``reduction``, ``normalizer=``).

    The collectives are explicit (docs/large-vocabulary.md): one ``lax.pmax`` of the row maxima and
    target logits, one ``lax.psum`` of the shifted sums of exponentials (and label smoothing's
    sums) over ``axis_name``; the ``jax.custom_vjp``'s backward pass is local (each device's
    gradient of its own logits).  A hidden state replicated over ``axis_name`` gets the sum of the
    devices' partial gradients from JAX itself (the transpose of its implicit broadcast under
    ``shard_map``'s default ``check_vma=True``).  ``class_start``: the id of this device's first
    class; by default ``lax.axis_index(axis_name) * local_classes`` (equal shards, in the axis's
    order, covering the head's ``num_outputs``: checked).  Under a plain ``jax.jit`` over logits
    sharded on the class axis of a mesh of automatic axes, ``compiled.loss`` needs none of this
    (XLA partitions it)."""
    from unihead import _sharded

    name = "class_sharded_loss"
    if not isinstance(compiled, JaxHead):
        raise TypeError(
            f"{name}: compiled must be a JAX head (unihead.compile(head, 'jax')); got {type(compiled).__name__}."
        )
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or any(n is None or not _hashable(n) for n in names):
        raise TypeError(
            f"{name}: axis_name is the name of the mesh axis the classes are split over (a string "
            f"such as 'vocab'); got {axis_name!r}."
        )
    try:
        size = jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{name}(..., axis_name={axis_name!r}): no axis {axis_name!r} is bound here. Call it inside "
            f"jax.shard_map(step, mesh=mesh, in_specs=..., out_specs=...) with the classes split over the "
            f"mesh axis {axis_name!r} (the kernel's spec P(None, {axis_name!r}))."
        ) from None
    if class_start is None:
        width = jnp.shape(local_logits)[-1] if jnp.ndim(local_logits) else 0
        k = compiled.head.num_outputs
        if width * size != k and _sharded.unsupported(compiled.head, name) is None:
            raise ValueError(
                f"{name}: {size} devices of {width} classes each hold {width * size} classes and the head "
                f"has num_outputs={k}: split the kernel's classes evenly over {axis_name!r}, or pass "
                f"class_start= (the id of each device's first class) for uneven shards."
            )
        class_start = jax.lax.axis_index(axis_name) * width
    fns = compiled.__dict__.setdefault("_sharded_fns", {})
    if axis_name not in fns:
        fns[axis_name] = _sharded_rows_fn(compiled._engine(), axis_name)
    return compiled._class_sharded(name, local_logits, labels, sample_weight, class_start, fns[axis_name], normalizer)


def _sharded_rows_fn(engine: Any, axis_name: Any) -> Any:
    """Per-row losses over every class from this device's logits (:mod:`unihead._sharded`) as a
    ``jax.custom_vjp`` function ``(z, y, start) -> (N,)``, the collectives over ``axis_name``."""
    from unihead import _fused, _sharded

    consts = dict(spec=_fused.row_spec(engine))
    pmax = lambda *xs: jax.lax.pmax(xs, axis_name)
    psum = lambda *xs: jax.lax.psum(xs, axis_name)

    def forward(z: Any, y: Any, start: Any) -> Any:
        return _sharded.rows_forward(_OPS, z, y, start, pmax=pmax, psum=psum, **consts)[0]

    @jax.custom_vjp
    def rows(z: Any, y: Any, start: Any) -> Any:
        return forward(z, y, start).loss

    def fwd(z: Any, y: Any, start: Any) -> tuple:
        fin = forward(z, y, start)
        return fin.loss, (z, y, start, fin)

    def bwd(res: tuple, g: Any) -> tuple:
        z, y, start, fin = res
        return _sharded.rows_grad(_OPS, z, y, start, fin, g, **consts), None, None

    rows.defvjp(fwd, bwd)
    return rows


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def compile_head(head: ClassificationHead, *, validate: bool = True, keep: str = "inputs",
                 checkify: bool = False) -> JaxHead:
    return JaxHead(head, validate=validate, keep=keep, checkify=checkify)
