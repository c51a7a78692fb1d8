"""PyTorch backend: ``unihead.compile(head, "torch")``.

The math is the shared formula code (:mod:`unihead.formulas`) running on torch tensors through
the Array API; this module adds what is PyTorch-specific:

* a ``torch.autograd.Function`` that attaches the analytic gradient (so autodiff never
  differentiates through the accurate formulas, and the backward pass is one multiply);
  it supports ``torch.func`` (``grad``, ``vmap``) and ``torch.compile(fullgraph=True)``;
* dtype and device handling: float16/bfloat16 logits are computed in float32, labels and
  weights move to the logits' device, gradients come back in the logits' dtype;
* the output layer (:class:`HeadLinear`, an ``nn.Linear`` that carries its spec) and a loss
  module (:class:`HeadLoss`) for code that expects ``criterion(logits, target)``;
* weights in and out in unihead's canonical layout (``kernel (in, out)``, ``bias (out,)``),
  transposing PyTorch's ``(out, in)``.

Validation of label values reads them (a device synchronisation on accelerators): it runs by
default, is skipped with ``compile(head, "torch", validate=False)`` or
``unihead.set_validation(False)``, and is skipped automatically under ``torch.compile`` and
``torch.func`` transforms, where values do not exist yet.
"""

from __future__ import annotations

import os
import types
from typing import Any

import array_api_compat.torch as _compat
import numpy as np
import torch
from torch import nn

from unihead._engine import Engine
from unihead._ops import Ops
from unihead.compiled import CompiledHead, canonical_weights
from unihead.spec import ClassificationHead
from unihead.validation import logits_dtype_error

__all__ = ["compile_head", "TorchHead", "TorchOps", "HeadLinear", "HeadLoss"]


def _namespace() -> Any:
    """``array_api_compat.torch`` with native functions where the compat wrapper is slower or
    cannot be batched by ``torch.func.vmap`` (its ``sign`` assigns through a boolean mask)."""
    ns = types.SimpleNamespace(**{k: getattr(_compat, k) for k in dir(_compat) if not k.startswith("__")})
    ns.sign = torch.sign  # NaN -> 0 here; a NaN row is NaN through exp() anyway
    ns.exp = torch.exp
    ns.log1p = torch.log1p
    ns.abs = torch.abs
    ns.minimum = torch.minimum
    ns.maximum = torch.maximum
    ns.where = torch.where
    ns.max = lambda x, axis=None, keepdims=False: (
        torch.amax(x, dim=axis, keepdim=keepdims) if axis is not None else torch.amax(x)
    )
    return ns


_XP = _namespace()
_HALF = (torch.float16, torch.bfloat16)


class TorchOps(Ops):
    name = "torch"

    def __init__(self) -> None:
        super().__init__(_XP)

    def bits(self, x: Any) -> int:
        return torch.finfo(x.dtype).bits

    def is_floating(self, x: Any) -> bool:
        return x.dtype.is_floating_point

    def is_integer(self, x: Any) -> bool:
        return not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool

    def is_bool(self, x: Any) -> bool:
        return x.dtype == torch.bool

    def device(self, x: Any) -> Any:
        return x.device

    def scalar(self, value: float, like: Any) -> Any:
        return torch.full((), value, dtype=like.dtype, device=like.device)

    def where0(self, cond: Any, x: Any) -> Any:
        return torch.where(cond, x, x.new_zeros(()))

    def mul_add(self, x: Any, y: Any, z: Any) -> Any:
        return torch.addcmul(x, y, z)

    def take_last(self, x: Any, idx: Any) -> Any:
        return torch.gather(x, -1, idx.unsqueeze(-1)).squeeze(-1)

    def put_last(self, x: Any, idx: Any, values: Any) -> Any:
        idx, values = idx.unsqueeze(-1), values.unsqueeze(-1).to(x.dtype)
        if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x):
            return torch.scatter(x, -1, idx, values)  # has a vmap batching rule
        return x.scatter_(-1, idx, values)  # x is a tensor the caller just created

    def row_sum(self, x: Any) -> Any:
        # float32 sums over the class axis accumulate in float64: torch's float32 row sums lose up
        # to ~3 ulp at K = 1000 (measured), which every probability would inherit
        if x.dtype == torch.float32 and x.device.type != "mps":
            return torch.sum(x, dim=-1, keepdim=True, dtype=torch.float64).to(torch.float32)
        if x.dtype == torch.float64:
            return self.compensated_row_sum(x)
        return torch.sum(x, dim=-1, keepdim=True)

    def total(self, x: Any) -> Any:
        if x.dtype == torch.float64 or x.device.type == "mps":  # nothing wider (MPS: no float64)
            return self.compensated_total(x)
        return torch.sum(x, dtype=torch.float64).to(x.dtype)

    def index_dtype(self) -> Any:
        return torch.int64

    def is_concrete(self, x: Any) -> bool:
        if torch.compiler.is_compiling():
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False
        return not (x.is_meta or isinstance(x, torch._subclasses.FakeTensor))

    def to_numpy(self, x: Any) -> Any:
        x = x.detach()
        if x.dtype in _HALF:
            x = x.float()
        return x.cpu().numpy()


_OPS = TorchOps()


#: ``fused="auto"`` compiles the kernels for logits with at least this many elements.
FUSED_MIN_ELEMENTS = 1 << 18


def _own_code(fn: Any) -> Any:
    """A copy of function ``fn`` with a code object of its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _Kernels:
    """Forward and backward passes of one head, eager or fused.

    Eager runs the shared formulas op by op.  Fused runs the *same functions* through
    ``torch.compile`` (dynamic shapes), which fuses the ~20 elementwise steps of the accurate
    formulas (error-free subtraction, corrected exponentials, masked sums) into one or two loops;
    Inductor keeps IEEE semantics (no fast-math, no FP contraction on CPU), so the error-free
    transformations survive.  A compilation failure (no C++ compiler, an unsupported device)
    falls back to eager once, with a warning."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # sigmoid heads keep only the logits and recompute the statistics in the backward pass
        # (saving them would hold two more (..., K) tensors than BCEWithLogits); softmax heads
        # keep the statistics: one (..., K) tensor, like F.cross_entropy's log-softmax output
        self.keep = "inputs" if engine.path_of() == "sigmoid" else "stats"
        self._fused: tuple[Any, Any] | None = None
        self.failed = False

    def _forward(self, z: Any, labels: Any, sw: Any) -> tuple[Any, tuple]:
        loss, res = self.engine.loss_forward(z, labels, sw, keep=self.keep)
        # an input returned as an output must be a view of it (autograd.Function rule)
        return loss, tuple(r.view_as(r) if r is z else r for r in res.values())

    def _backward(self, res: tuple, labels: Any, sw: Any, g: Any, path: str) -> Any:
        names = self.engine.residual_names(path, self.keep)
        return self.engine.loss_backward(dict(zip(names, res)), labels, sw, g, path)

    def _compiled(self) -> tuple[Any, Any]:
        if self._fused is None:
            # Dynamo keeps one compile cache per code object (with a recompile limit): give each
            # head's kernels their own code objects, so heads do not evict each other.
            self._fused = tuple(
                torch.compile(types.MethodType(_own_code(fn), self), dynamic=True, fullgraph=True)
                for fn in (_Kernels._forward, _Kernels._backward)
            )
        return self._fused

    def run(self, which: int, fused: bool, *args: Any) -> Any:
        eager = (self._forward, self._backward)[which]
        if not fused or self.failed:
            return eager(*args)
        try:
            return self._compiled()[which](*args)
        except Exception as exc:  # compilation failed: the eager functions are the same math
            try:
                out = eager(*args)
            except Exception:
                raise exc from None
            self.failed = True
            import warnings

            warnings.warn(
                f"unihead: compiling the fused PyTorch loss kernels failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); using the eager kernels (same "
                f"numbers, slower). Pass fused=False to unihead.compile(..., 'torch') to skip this.",
                RuntimeWarning,
                stacklevel=4,
            )
            return out


class _Loss(torch.autograd.Function):
    """The loss with its analytic gradient.  Inputs: the kernels, the target path, whether to run
    fused, the logits, the validated labels and sample weight (not differentiated).  Outputs: the
    loss and the residuals named by ``engine.residual_names(path)`` (marked non-differentiable;
    ``TorchHead.loss`` returns only the loss)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(kernels: _Kernels, path: str, fused: bool, z: Any, labels: Any, sw: Any):
        loss, res = kernels.run(0, fused, z, labels, sw)
        return (loss, *res)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        kernels, path, fused, z, labels, sw = inputs
        ctx.kernels, ctx.path, ctx.fused = kernels, path, fused
        ctx.z_dtype = z.dtype
        ctx.has_sw = sw is not None
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the residual outputs get no gradient: no zero tensors
        ctx.save_for_backward(labels, *((sw,) if sw is not None else ()), *output[1:])

    @staticmethod
    def backward(ctx: Any, g: Any, *_: Any):
        if g is None:  # the loss itself received no gradient
            return None, None, None, None, None, None
        saved = ctx.saved_tensors
        labels, sw = saved[0], (saved[1] if ctx.has_sw else None)
        res = tuple(saved[2 if ctx.has_sw else 1 :])
        grad = ctx.kernels.run(1, ctx.fused, res, labels, sw, g, ctx.path)
        return None, None, None, grad.to(ctx.z_dtype), None, None


_APPLY = super(torch.autograd.Function, _Loss).apply  # torch._C._FunctionBase.apply, bound to _Loss


class TorchHead(CompiledHead):
    """The compiled head on PyTorch (see :class:`unihead.CompiledHead` for the methods)."""

    backend = "torch"
    ops = _OPS

    def _logits(self, logits: Any) -> Any:
        z = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
        if not z.dtype.is_floating_point:
            raise logits_dtype_error(z.dtype)
        if z.dtype in _HALF:
            z = z.float()
        return self._check(z)

    def _as_array(self, x: Any, like: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(like.device) if x.device != like.device else x
        return torch.as_tensor(np.asarray(x), device=like.device)

    def __init__(self, head: ClassificationHead, *, validate: bool = True, fused: Any = "auto"):
        super().__init__(head, validate=validate)
        if fused not in ("auto", True, False):
            raise ValueError(f"fused must be 'auto', True or False; got {fused!r}.")
        if fused == "auto" and os.environ.get("UNIHEAD_TORCH_FUSED", "1") == "0":
            fused = False
        self.fused = fused
        self._kernels = _Kernels(self._engine())

    def options(self) -> dict[str, Any]:
        return {"validate": self.validate, "fused": self.fused}

    def _use_fused(self, z: Any) -> bool:
        """Fused kernels for large, plain tensors; the eager ones inside ``torch.compile`` (which
        fuses them itself) and ``torch.func`` transforms."""
        if self.fused is False or self._kernels.failed or z.device.type not in ("cpu", "cuda"):
            return False
        if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(z):
            return False
        return self.fused is True or z.numel() >= FUSED_MIN_ELEMENTS

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None) -> torch.Tensor:
        """The loss (0-d tensor, or ``(...)`` for ``reduction="none"``), differentiable with
        respect to ``logits``; float32 for half-precision logits."""
        z0 = logits if isinstance(logits, torch.Tensor) else None
        z = self._logits(logits)
        labels, sample_weight = self._inputs(z, labels, sample_weight)
        if z0 is not None and z0.dtype in _HALF and z0.requires_grad:
            z = z0.float()  # keep the graph to the half-precision logits
        path = self._kernels.engine.path_of()
        args = (self._kernels, path, self._use_fused(z), z, labels, sample_weight)
        if torch._C._are_functorch_transforms_active():
            out = _Loss.apply(*args)
        else:
            # Function.apply binds default arguments with inspect.signature on every call (for
            # torch.func); every argument is given here, so go straight to the C implementation
            # (tens of microseconds per call at small sizes)
            out = _APPLY(*args)
        return out[0]

    def loss_module(self) -> "HeadLoss":
        """An ``nn.Module`` computing :meth:`loss`: ``criterion(logits, target[, sample_weight])``."""
        return HeadLoss(self.head, validate=self.validate)

    def layer(
        self,
        in_features: int,
        weights: Any = None,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> "HeadLinear":
        """The output layer: an ``nn.Linear(in_features, num_outputs)`` producing logits, with
        ``module.head`` set.  ``weights`` in the canonical layout (``kernel (in, out)``,
        ``bias (out,)``); without them PyTorch's default initialisation."""
        layer = HeadLinear(self.head, in_features, device=device, dtype=dtype)
        if weights is not None:
            layer.set_weights(weights)
        return layer


class HeadLinear(nn.Linear):
    """``nn.Linear(in_features, head.num_outputs)`` that carries its :class:`ClassificationHead`.

    An ordinary module (``state_dict``, ``.to()``, optimisers, ``torch.save``); the spec travels
    in the state dict as extra state and is checked on load."""

    def __init__(self, head: ClassificationHead, in_features: int, *, device: Any = None, dtype: Any = None):
        super().__init__(in_features, head.num_outputs, bias=True, device=device, dtype=dtype)
        self.head = head

    def get_weights(self) -> dict[str, np.ndarray]:
        """``{"kernel": (in, out), "bias": (out,)}`` as NumPy arrays (PyTorch stores ``(out, in)``)."""
        to_np = _OPS.to_numpy
        return {"kernel": to_np(self.weight).T.copy(), "bias": to_np(self.bias).copy()}

    def set_weights(self, weights: Any) -> None:
        """Load canonical-layout weights (``kernel (in, out)`` is transposed into ``weight``)."""
        kernel, bias = canonical_weights(self.head, self.in_features, weights)
        with torch.no_grad():
            self.weight.copy_(torch.as_tensor(np.ascontiguousarray(kernel.T)))
            self.bias.copy_(torch.as_tensor(bias))

    def get_extra_state(self) -> str:
        return self.head.to_json()

    def set_extra_state(self, state: Any) -> None:
        stored = ClassificationHead.from_json(state)
        if stored != self.head:
            raise ValueError(
                f"This state dict was saved from a layer with head {stored!r}; this layer's head is "
                f"{self.head!r}."
            )

    def compiled(self, **options: Any) -> "TorchHead":
        """The compiled head of this layer's spec (for its loss, probabilities, predict)."""
        return TorchHead(self.head, **options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head={self.head!r}"


class HeadLoss(nn.Module):
    """``criterion(logits, target, sample_weight=None)`` for a :class:`ClassificationHead`."""

    def __init__(self, head: ClassificationHead, *, validate: bool = True, fused: Any = "auto"):
        super().__init__()
        self.head = head
        self._compiled = TorchHead(head, validate=validate, fused=fused)

    def forward(self, logits: torch.Tensor, target: Any, sample_weight: Any = None) -> torch.Tensor:
        return self._compiled.loss(logits, target, sample_weight)

    def extra_repr(self) -> str:
        return f"head={self.head!r}"


def compile_head(head: ClassificationHead, *, validate: bool = True, fused: Any = "auto") -> TorchHead:
    """``unihead.compile(head, "torch", validate=True, fused="auto")``.

    ``fused``: ``"auto"`` runs the loss through kernels compiled by ``torch.compile`` (the same
    formulas, fused) for logits of at least :data:`FUSED_MIN_ELEMENTS` elements on CPU and CUDA,
    after a one-time compilation of a few seconds per head (cached on disk by PyTorch); ``True``
    for every size; ``False`` never (also: environment variable ``UNIHEAD_TORCH_FUSED=0``)."""
    return TorchHead(head, validate=validate, fused=fused)
