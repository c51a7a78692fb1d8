"""Flax backend: ``unihead.compile(head, "flax")``, the head as a Flax module.

The compiled head is the JAX backend's (:class:`FlaxHead` is a :class:`~unihead.backends.jax.JaxHead`:
the same pure loss function with its ``custom_vjp``, the same numbers); what this module adds is
the output layer a Flax user puts in a model:

* :class:`HeadLinear`, an ``nnx.Linear(in_features, head.num_outputs)`` (Flax NNX, the API Flax
  recommends) that carries its :class:`~unihead.ClassificationHead`.  Its parameters are
  ``nnx.Linear``'s (``kernel (in, out)`` and ``bias (out,)`` as ``nnx.Param``, the same
  initializers, ``dtype``/``param_dtype``, ``rngs=``), so it trains with ``nnx.Optimizer``, runs
  under ``nnx.jit`` and ``nnx.grad``, and saves with ``nnx.state``/``nnx.split`` and orbax like
  any layer; ``compiled.layer(in_features, rngs=nnx.Rngs(0))`` builds one;
* :class:`HeadDense`, the same for ``flax.linen``: ``params["kernel"]``, ``params["bias"]`` as
  ``linen.Dense`` names them (``compiled.linen_layer()`` builds one).

Both have ``get_canonical_weights()``/``set_canonical_weights(weights)`` (every backend's layer's
names: canonical weights are ``{"kernel": (in, out), "bias": (out,)}``, already Flax's layout)
and ``compiled()``, the compiled head whose ``loss`` the model trains with.

Without Flax, ``unihead.compile(head, "jax")`` and its plain ``Dense`` (``init``/``apply`` over
a params pytree) compute the same logits and loss; ``unihead.backends.jax`` never imports Flax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from unihead.backends.jax import JaxHead, _like
from unihead.compiled import CompiledHead, canonical_weights
from unihead.spec import ClassificationHead

__all__ = ["compile_head", "FlaxHead", "HeadLinear", "HeadDense"]

#: ``nnx.Linear`` options a head's layer fixes itself.
_FIXED = {"out_features": "head.num_outputs", "use_bias": "True: a head's logits have a bias"}


class FlaxHead(JaxHead):
    """The compiled head on Flax: :class:`~unihead.backends.jax.JaxHead` (its loss is a pure JAX
    function, usable inside ``nnx.jit``/``nnx.grad`` and ``linen`` ``apply``), whose
    :meth:`layer` is a Flax NNX module and :meth:`linen_layer` a ``linen`` one."""

    backend = "flax"

    # Equal when they compute the same (class, spec, options): a Flax module holds its compiled
    # head as static data, part of its graph definition, which nnx.jit compares to reuse a trace;
    # a model rebuilt with the same head (a restore, another compile() call) reuses it.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompiledHead):
            return NotImplemented
        return type(self) is type(other) and self.head == other.head and self.options() == other.options()

    def __hash__(self) -> int:
        return hash((type(self), self.head, tuple(sorted(self.options().items()))))

    def layer(self, in_features: int, weights: Any = None, *, rngs: Any = None, **options: Any) -> "HeadLinear":
        """The output layer as :class:`HeadLinear` (an ``nnx.Module``) with ``weights`` (canonical
        layout) or ``nnx.Linear``'s initialisation from ``rngs``; ``options``: ``nnx.Linear``'s
        (``dtype``, ``param_dtype``, ``kernel_init``, ``precision``, ...).  ``rngs`` may be left
        out when ``weights`` are given."""
        if rngs is None:
            if weights is None:
                raise TypeError(
                    "compiled.layer(in_features, rngs=nnx.Rngs(0)): a Flax layer draws its initial "
                    "kernel from rngs; pass rngs=..., or weights= to load trained weights."
                )
            rngs = nnx.Rngs(0)  # the weights given replace what it draws
        layer = HeadLinear(self, in_features, rngs=rngs, **options)
        if weights is not None:
            layer.set_canonical_weights(weights)
        return layer

    def linen_layer(self, **options: Any) -> "HeadDense":
        """The output layer as :class:`HeadDense` (a ``flax.linen`` module; its input size is
        read from the data at ``init``, as ``linen.Dense``'s); ``options``: its fields
        (``dtype``, ``param_dtype``, ``kernel_init``, ...)."""
        return HeadDense(self, **options)


def _spec_and_compiled(head: Any, where: str) -> tuple[ClassificationHead, FlaxHead | None]:
    if isinstance(head, FlaxHead):
        return head.head, head
    if isinstance(head, ClassificationHead):
        return head, None
    kind = "a JaxHead: compile it for Flax, unihead.compile(compiled.head, 'flax')" \
        if isinstance(head, JaxHead) else type(head).__name__
    raise TypeError(f"{where} takes a ClassificationHead or a FlaxHead (unihead.compile(head, 'flax')); got {kind}.")


class HeadLinear(nnx.Linear):
    """``nnx.Linear(in_features, head.num_outputs)`` that carries its :class:`ClassificationHead`:
    ``logits = layer(x)``, ``loss = layer.compiled().loss(logits, labels)``.

    ``head``: the spec, or a :class:`FlaxHead` (what ``compiled.layer()`` passes), whose options
    :meth:`compiled` keeps.  ``rngs``, ``dtype``, ``param_dtype`` and ``linear_options``
    (``kernel_init``, ``bias_init``, ``precision``, ``dot_general``, ...) are ``nnx.Linear``'s;
    the number of outputs and the bias are the head's.  The parameters are ``nnx.Linear``'s
    ``kernel (in, out)`` and ``bias (out,)`` (``nnx.Param``): ``nnx.Optimizer``, ``nnx.jit``,
    ``nnx.grad``, ``nnx.state`` and orbax checkpoints treat them as any layer's.  The spec is
    static (part of the module's graph definition, not of its state): a checkpoint holds the
    weights, and the model rebuilt to restore it brings its head."""

    def __init__(self, head: Any, in_features: int, *, rngs: Any, dtype: Any = None,
                 param_dtype: Any = jnp.float32, **linear_options: Any):
        spec, compiled = _spec_and_compiled(head, "HeadLinear")
        fixed = sorted(set(linear_options) & set(_FIXED))
        if fixed:
            raise TypeError(
                f"HeadLinear: {', '.join(fixed)} cannot be set: "
                + "; ".join(f"{k} is {_FIXED[k]}" for k in fixed) + ". Leave them out."
            )
        if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or in_features < 1:
            raise ValueError(f"HeadLinear: in_features must be a positive int (the features' last dimension); got {in_features!r}.")
        if not callable(getattr(rngs, "params", None)):
            raise TypeError(
                f"HeadLinear: rngs must be an nnx.Rngs, as for nnx.Linear (rngs=nnx.Rngs(0), or "
                f"nnx.Rngs(params=key) for a jax.random key); got {type(rngs).__name__}."
            )
        super().__init__(int(in_features), spec.num_outputs, use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs, **linear_options)
        self.head = spec
        self._compiled_head = compiled if compiled is not None else FlaxHead(spec)  # static: see FlaxHead.__eq__

    def get_canonical_weights(self) -> dict[str, np.ndarray]:
        """``{"kernel": (in, out), "bias": (out,)}`` as NumPy arrays on the host (Flax's layout
        is the canonical one): what every backend's layer loads."""
        from unihead.backends.jax import _OPS

        return {"kernel": _OPS.to_numpy(self.kernel[...]), "bias": _OPS.to_numpy(self.bias[...])}

    def set_canonical_weights(self, weights: Any) -> None:
        """Load canonical-layout weights in place (a ``{"kernel", "bias"}`` mapping or a
        ``(kernel, bias)`` pair, e.g. another backend's ``layer.get_canonical_weights()``), in
        this layer's ``param_dtype`` and on its parameters' devices."""
        kernel, bias = canonical_weights(self.head, self.in_features, weights)
        self.kernel[...] = _like(kernel, self.kernel[...])
        self.bias[...] = _like(bias, self.bias[...])

    def compiled(self, **options: Any) -> FlaxHead:
        """The compiled head of this layer (its ``loss``, ``probabilities``, ``predict``): the one
        it was built from, with its options; ``options`` change some of them."""
        return self._compiled_head._with_options(**options)


class HeadDense(linen.Module):
    """``flax.linen`` output layer of a :class:`ClassificationHead`: ``logits = x @ kernel +
    bias`` with ``linen.Dense``'s parameter names, shapes, initializers and dtype options
    (``kernel (in, out)``, ``bias (out,)``; ``in`` read from the input at ``init``).

    ``head``: the spec, or a :class:`FlaxHead`.  As every ``linen`` module it holds no state:
    the params are the pytree ``init`` returns, and the canonical weights move out of and into it
    with :meth:`get_canonical_weights` / :meth:`set_canonical_weights` (pure: a new pytree)."""

    head: Any
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = linen.initializers.lecun_normal()
    bias_init: Any = linen.initializers.zeros_init()

    def __post_init__(self) -> None:
        _spec_and_compiled(self.head, "HeadDense")
        super().__post_init__()

    @linen.compact
    def __call__(self, inputs: Any) -> Any:
        k = _spec_and_compiled(self.head, "HeadDense")[0].num_outputs
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], k), self.param_dtype)
        bias = self.param("bias", self.bias_init, (k,), self.param_dtype)
        inputs, kernel, bias = linen.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return y + bias

    @staticmethod
    def get_canonical_weights(params: Any) -> dict[str, np.ndarray]:
        """This layer's params (``variables["params"]`` of the layer alone, or its entry of a
        model's params) in the canonical layout as NumPy arrays."""
        from unihead.backends.jax import Dense

        return Dense.get_weights(params)

    def set_canonical_weights(self, params: Any, weights: Any) -> dict[str, Any]:
        """New params holding canonical-layout ``weights``, in the dtype and on the devices of
        ``params`` (not changed: use the result)."""
        from unihead.backends.jax import Dense, _check_params

        _check_params(params)
        spec, _ = _spec_and_compiled(self.head, "HeadDense")
        return Dense(spec, int(np.shape(params["kernel"])[0])).set_weights(params, weights)

    def compiled(self, **options: Any) -> FlaxHead:
        """The compiled head of this layer (the one it was built from, with its options)."""
        spec, compiled = _spec_and_compiled(self.head, "HeadDense")
        return (compiled or FlaxHead(spec))._with_options(**options)


def compile_head(head: ClassificationHead, *, validate: bool = True, keep: str = "inputs",
                 checkify: bool = False) -> FlaxHead:
    """``unihead.compile(head, "flax", validate=True, keep="inputs", checkify=False)``: the JAX
    backend's options."""
    return FlaxHead(head, validate=validate, keep=keep, checkify=checkify)
