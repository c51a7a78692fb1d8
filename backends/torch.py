"""PyTorch backend: ``unihead.compile(head, "torch")``.

The math is the shared formula code (:mod:`unihead.formulas`) running on torch tensors through
the Array API; this module adds what is PyTorch-specific:

* a ``torch.autograd.Function`` that attaches the analytic gradient (so autodiff never
  differentiates through the accurate formulas, and the backward pass is one multiply);
  it supports ``torch.func`` (``grad``, ``vmap``) and ``torch.compile(fullgraph=True)``;
* dtype and device handling: float16/bfloat16 logits are computed in float32, labels and
  weights move to the logits' device, gradients come back in the logits' dtype;
* the output layer (:class:`HeadLinear`, an ``nn.Linear`` that carries its spec; it loads the
  state dict of a plain ``nn.Linear``) and a loss module (:class:`HeadLoss`, from
  ``compiled.loss_fn()``) for code that expects ``criterion(logits, target)``; both compute with
  the options of the compiled head they came from;
* weights in and out in unihead's canonical layout (``kernel (in, out)``, ``bias (out,)``),
  transposing PyTorch's ``(out, in)``;
* data parallelism (``torch.distributed``: DDP, FSDP): :func:`global_normalizer`, the weight
  of a step all-reduced over the workers with the gradient averaging compensated, and
  :func:`global_loss`, the step's global loss for logging (docs/scaling-out.md);
* speed: float32 logits on the CPU are evaluated in float64 and rounded once (the wide formulas,
  a dozen native kernels); a head called often gets its loss and gradient compiled into one
  kernel in the background (:mod:`._torch_aot`: the same wide formulas for a softmax head, the
  float32 ones for a sigmoid head); large inputs run fused float32 kernels (``torch.compile``)
  (:class:`_Kernels`; docs/benchmarks.md, "Compilation").

Validation of label values reads them (a device synchronisation on accelerators): it runs by
default, is skipped with ``compile(head, "torch", validate=False)`` or
``unihead.set_validation(False)``, and is skipped automatically under ``torch.compile`` and
``torch.func`` transforms, where values do not exist yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import types
import warnings
import weakref
from typing import Any

import array_api_compat.torch as _compat
import numpy as np
import torch
from torch import nn

from unihead import _fused, _sharded
from unihead._engine import Engine, broadcast_prefix
from unihead._ops import Ops
from unihead.compiled import CompiledHead, canonical_weights, check_choice, compiled_head, weights_mismatch
from unihead.spec import ClassificationHead
from unihead._validation import has_class_axis, label_kinds, validation_enabled

from . import _torch_aot

__all__ = [
    "compile_head", "TorchHead", "TorchOps", "HeadLinear", "HeadLoss", "global_normalizer", "global_loss",
    "class_sharded_loss",
]


def _namespace() -> Any:
    """``array_api_compat.torch`` with native functions where the compat wrapper is slower or
    cannot be batched by ``torch.func.vmap`` (its ``sign`` assigns through a boolean mask)."""
    ns = types.SimpleNamespace(**{k: getattr(_compat, k) for k in dir(_compat) if not k.startswith("__")})
    ns.sign = torch.sign  # NaN -> 0 here; a NaN row is NaN through exp() anyway
    ns.exp = torch.exp
    ns.expm1 = torch.expm1
    ns.log1p = torch.log1p
    ns.abs = torch.abs
    ns.minimum = torch.minimum
    ns.maximum = torch.maximum
    ns.where = torch.where
    ns.sum = lambda x, axis=None, keepdims=False, dtype=None: torch.sum(x, dim=axis, keepdim=keepdims, dtype=dtype)
    ns.max = lambda x, axis=None, keepdims=False: (
        torch.amax(x, dim=axis, keepdim=keepdims) if axis is not None else torch.amax(x)
    )
    return ns


_XP = _namespace()


def _inplace_ok(x: Any) -> bool:
    """Whether a formula may write into the tensor it just created: not while Dynamo traces
    (functional graphs) or under ``torch.func`` transforms (no batching rule for ``scatter_``)."""
    return not (torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(x))


#: Inside ``torch.compile``, a row's entry at the label is replaced with a compare-with-iota select
#: for 9 to 32 classes, with a scatter otherwise.  Inductor fuses the select into the loop that
#: computes the row; a scatter is a loop of its own, between writing the array and reading it
#: again.  Measured, forward and backward of a softmax head's loss at 4096 rows against the
#: native loss, scatter -> select: 10 classes 1.6x -> 1.3-1.4x, 16 classes 1.42x -> 1.29x, 32
#: classes 1.30x -> 1.10x; but 100 classes 0.93x -> 1.22x and 1000 classes 0.95x -> 1.25x (the
#: select compares every element's index), 2 and 4 classes 0.99x -> 2.1x and 0.83x -> 2.2x
#: (Inductor's loops over such short rows are another shape), 8 classes 1.74x either way.
SELECT_MIN_CLASSES, SELECT_MAX_CLASSES = 9, 32


def _select_last(x: Any) -> bool:
    """Whether :meth:`TorchOps.put_last` selects: while traced, for a class axis of
    ``SELECT_MIN_CLASSES`` to ``SELECT_MAX_CLASSES`` (comparisons, which Dynamo records as guards
    where the axis is symbolic; it cannot test a symbolic length's membership of a range)."""
    return torch.compiler.is_compiling() and SELECT_MIN_CLASSES <= x.shape[-1] <= SELECT_MAX_CLASSES


#: Inside ``torch.compile`` on the CPU, a float32 row sum over 3 to 11 classes (accumulated in
#: float64, as everywhere) adds the columns one by one rather than reducing each row: Inductor then
#: runs the sum in the loop over rows, vectorised across rows, where a float64 reduction of so
#: short a row is a masked partial vector and a horizontal sum per row (about half the forward
#: kernel's time at 10 classes).  Measured, forward and backward of a softmax head's loss at 4096
#: rows against the native loss, row reduction -> column sums: 8 classes 2.0x -> 1.09x (Inductor
#: had recomputed the reduction in the backward kernel), 9 classes 1.34x -> 1.15x, 10 classes
#: 1.41x -> 1.08x, 11 classes 1.42x -> 1.30x, 3 to 7 classes within noise (0.90-1.10x either way);
#: at 12 and 16 classes Inductor no longer vectorises a loop with so many strided loads (1.33x ->
#: 1.36x, 1.21x -> 1.25x), and at 2 classes the row reduction was faster (0.90x against 1.05x).
COLUMN_SUM_MIN_CLASSES, COLUMN_SUM_MAX_CLASSES = 3, 11


def _column_sum(x: Any) -> bool:
    """Whether :meth:`TorchOps.row_sum` adds ``x``'s columns: while traced, for float32 on the
    CPU with a class axis of a known length from ``COLUMN_SUM_MIN_CLASSES`` to
    ``COLUMN_SUM_MAX_CLASSES`` (a symbolic length keeps the reduction: no guard, no unrolling)."""
    k = x.shape[-1]
    return (
        torch.compiler.is_compiling() and type(k) is int and COLUMN_SUM_MIN_CLASSES <= k <= COLUMN_SUM_MAX_CLASSES
        and x.dtype == torch.float32 and x.device.type == "cpu"
    )


_SMALL_INTS = (torch.int32, torch.int16, torch.int8, torch.uint8)


def _kernel_labels(head: ClassificationHead) -> tuple:
    """The label dtypes the compiled kernel takes as they come (converting them itself), for
    ``head``'s label format: those of validation's rule (:func:`~unihead._validation.label_kinds`)
    among the dtypes the kernel is built for.  Labels validation converts first (sparse ids as
    floats) and labels with a trailing axis of 1 take the general path."""
    kinds = label_kinds(head)
    built = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.float32, torch.float64, torch.bool)
    kind = lambda d: "bool" if d is torch.bool else "real floating" if d.is_floating_point else "integral"
    return tuple(d for d in built if kind(d) in kinds)


# Two things keep Inductor's per-row loop of a softmax head with integer targets vectorised and
# short (inside ``torch.compile`` on the CPU; measured at 10 classes, 4096 rows, forward and
# backward against the native loss in one process: 1.09-1.14x before, 1.02-1.05x after):
#
# * The target's logit is materialized (TorchOps.materialize).  Inductor inlines a gather into
#   every expression that reads it, and it counts each inlined load: the loop over rows read
#   ``z[y]`` 16 times in its nodes' bodies, 26 strided loads in 218 operations, against the 0.12
#   beyond which Inductor gives up vectorising a loop across rows.  Materialized: 11 in 335.
# * The gradient's branch at the target (``gap == 0``) blends by ``sign(gap)``
#   (TorchOps.where_top).  With a boolean, AOTAutograd's partitioner saves the boolean (the
#   smallest tensor that carries the branch), and Inductor writes a vector's boolean lanes one
#   by one: half the time of that loop.  Without one, the partitioner saves the target's
#   gradient itself, one float a row, and the backward pass is one vectorised loop.


class TorchOps(Ops):
    name = "torch"
    wide = True  # on CPU: float32 in float64, rounded once (see Ops.wide and TorchHead.loss)


    def __init__(self, wide: bool = True) -> None:
        super().__init__(_XP)
        self.wide = wide  # False: the float32 formulas (the compiled kernels, _torch_aot)

    def wide_dtype(self, x: Any) -> Any:
        # CPU only: float64 is 1/32 to 1/64 of float32's rate on most GPUs
        if self.wide and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.float64
        return None

    def add_matmul(self, acc: Any, a: Any, b: Any) -> Any:
        if a.dtype == acc.dtype and (self.writes_in_place or _inplace_ok(acc)):
            return acc.addmm_(a, b)  # the accumulator the fused loss made: no temporary
        return acc + self.widen_half(torch.matmul(a, b))

    def row_sum(self, x: Any) -> Any:
        if not _column_sum(x):
            return super().row_sum(x)
        # float64 accumulation as Ops.row_sum, in column order (COLUMN_SUM_MAX_CLASSES)
        s = x[..., :1].to(torch.float64)
        for j in range(1, x.shape[-1]):
            s = s + x[..., j : j + 1].to(torch.float64)
        return s.to(x.dtype)

    def reciprocal(self, x: Any) -> Any:
        return torch.reciprocal(x)  # Python's 1.0 / tensor is two kernels and a Python frame

    def log_softmax(self, x: Any) -> Any:
        return torch.log_softmax(x, -1)

    def sigmoid(self, x: Any) -> Any:
        return torch.sigmoid(x)

    def log_sigmoid(self, x: Any) -> Any:
        return torch.nn.functional.logsigmoid(x)

    def softplus(self, x: Any) -> Any:
        # above the threshold softplus returns x, dropping log1p(exp(-x)): below 1e-19 of the value
        # at 40 (PyTorch's default, 20, would drop 1e-10 of it: too much for float64 results)
        return torch.nn.functional.softplus(x, threshold=40.0)

    def last_index(self, idx: Any) -> Any:
        return idx.unsqueeze(-1)  # the (..., 1) index of gather and scatter

    def zero_last(self, x: Any, idx: Any) -> Any:
        if _select_last(x):
            return self.put_last(x, idx, torch.zeros_like(x[..., 0]))
        if idx.dim() < x.dim():
            idx = idx.unsqueeze(-1)
        if self.writes_in_place or _inplace_ok(x):
            return x.scatter_(-1, idx, 0.0)  # x is a tensor the caller just created
        return torch.scatter(x, -1, idx, 0.0)

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

    def where_top(self, gap: Any, a: Any, b: Any) -> Any:
        if not torch.compiler.is_compiling():
            return super().where_top(gap, a, b)
        # traced: a blend by w = sign(gap), 0 at a maximum and -1 elsewhere, exact for finite a
        # and b but for the sign of a zero b (NaN rows: sign(NaN) = 0 takes a, NaN there too).
        # The gradient's branch then needs no boolean, which AOTAutograd's partitioner would save
        # (see the note above TorchOps)
        w = torch.sign(gap)
        return a * (1.0 + w) - b * w

    def materialize(self, x: Any) -> Any:
        if torch.compiler.is_compiling() and not x.requires_grad:
            # as_strided needs storage, so Inductor writes x out once and its readers load it
            # (see the note above TorchOps); with grad (torch.func, double backward) x stays as it is
            return x.as_strided(x.shape, x.stride())
        return x

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    def mul_add(self, x: Any, y: Any, z: Any) -> Any:
        return torch.addcmul(x, y, z)

    def take_last(self, x: Any, idx: Any) -> Any:
        if idx.dim() < x.dim():
            idx = idx.unsqueeze(-1)
        return torch.gather(x, -1, idx).squeeze(-1)

    def put_last(self, x: Any, idx: Any, values: Any) -> Any:
        if _select_last(x):
            # traced, 9 to 32 classes: the compare-with-iota select, which Inductor fuses into
            # the loop computing x; a scatter is a loop of its own, after x is written out and
            # before it is read again (SELECT_MIN_CLASSES)
            idx = idx.squeeze(-1) if idx.dim() == x.dim() else idx
            return super().put_last(x, idx, values.to(x.dtype))
        if idx.dim() < x.dim():
            idx = idx.unsqueeze(-1)
        values = values.unsqueeze(-1)
        if values.dtype != x.dtype:
            values = values.to(x.dtype)
        if self.writes_in_place or _inplace_ok(x):
            return x.scatter_(-1, idx, values)  # x is a tensor the caller just created
        return torch.scatter(x, -1, idx, values)  # has a vmap batching rule

    def accumulate64(self, x: Any) -> bool:
        return x.device.type != "mps"  # MPS has no float64

    def index_dtype(self) -> Any:
        return torch.int64

    def is_concrete(self, x: Any) -> bool:
        if torch.compiler.is_compiling():
            return False
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False
        return not (x.is_meta or isinstance(x, torch._subclasses.FakeTensor))

    half_dtypes = (torch.float16, torch.bfloat16)

    def convert(self, x: Any, like: Any = None) -> Any:
        device = None if like is None else like.device
        if isinstance(x, torch.Tensor):
            return x.to(device) if device is not None and x.device != device else x
        return torch.as_tensor(np.asarray(x), device=device)

    def host(self, x: Any) -> Any:
        return x.detach().cpu().numpy()


_OPS = TorchOps()


#: ``fused="auto"`` compiles the kernels for logits with at least this many elements.
FUSED_MIN_ELEMENTS = 1 << 18


def _own_code(fn: Any) -> Any:
    """A copy of function ``fn`` with a code object of its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _Kernels:
    """Forward and backward passes of one head, in one of three modes.

    * ``"wide"`` (float32 on the CPU, except large inputs with fused kernels): the compiled
      kernels (:mod:`._torch_aot`) where they have been built, else the wide formulas (float64,
      rounded once; a dozen native kernels).  A softmax head's kernels run the wide formulas
      too, up to :data:`AOT_PARALLEL_MAX_ROWS` rows (:func:`_aot_size`); they and the wide
      formulas form the gradient in the forward pass (float32, what the backward pass scales),
      so the backward pass is one multiply.  A
      sigmoid head's kernels run the float32 formulas: the loss in the forward pass, the
      gradient recomputed in the backward pass (:meth:`wide_grad`).  The wide formulas are also
      what large inputs take when nothing can be compiled: two to three times faster in eager
      mode than the float32 formulas op by op.
    * ``"eager"``: the float32 formulas with error-free transformations, op by op (CUDA, float64
      logits, ``torch.func`` transforms, and inside ``torch.compile``, which fuses them itself).
    * ``"fused"``: the *same functions* as ``"eager"`` through ``torch.compile`` (dynamic shapes)
      for inputs of at least :data:`FUSED_MIN_ELEMENTS` elements, fused into one or two loops;
      Inductor keeps IEEE semantics (no fast-math, no FP contraction on CPU), so the error-free
      transformations survive.  A compilation failure (no C++ compiler, an unsupported device)
      falls back to ``"wide"`` (CPU) or ``"eager"`` once, with a warning: numbers within the
      tolerances of docs/semantics.md §11, as every path's."""

    def __init__(self, engine: Engine, aot: Any = None):
        self.engine = engine
        self.aot = aot  # _torch_aot.KernelCache: the loss and gradient as one compiled kernel
        self.path = engine.path_of()
        self.narrow = aot is not None and aot.float32_formulas
        # The wide forward pass forms the gradient.  A softmax head keeps it: one (..., K) tensor,
        # what F.cross_entropy keeps (its log-softmax).  BCEWithLogits keeps nothing of its own (it
        # recomputes from the logits and targets), so a sigmoid head's gradient is recomputed in the
        # backward pass for large inputs (the wide formulas run there only when nothing can be
        # compiled); below FUSED_MIN_ELEMENTS it is kept (at most 1 MiB): the float64 recomputation
        # would cost 1.7x the time (measured at (40960, 1)).
        self.recompute_large = self.path == "sigmoid"
        # sigmoid heads keep only the logits and recompute the statistics in the backward pass
        # (saving them would hold two more (..., K) tensors than BCEWithLogits); softmax heads
        # keep the statistics: one (..., K) tensor, like F.cross_entropy's log-softmax output
        self.keep = "inputs" if self.path == "sigmoid" else "stats"
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

    def forward(self, mode: str, z: Any, labels: Any, sw: Any) -> tuple[Any, tuple]:
        if mode.startswith("wide"):
            return self.wide(z, labels, sw, count=mode == "wide")
        return self.run(0, mode == "fused", z, labels, sw)

    def wide(self, z: Any, labels: Any, sw: Any, count: bool = True) -> tuple[Any, tuple]:
        """The loss of validated inputs and the residuals of the backward pass: the compiled
        kernel where there is one, else the wide formulas op by op.  ``count``: this call counts
        towards building the kernel (not when the short path of :meth:`TorchHead.loss` already
        counted it).  The residuals: the gradient, or none where :meth:`wide_grad` recomputes it
        (a sigmoid head's compiled kernels, and large sigmoid inputs: :meth:`keeps_grad`)."""
        runner, args = self._runner(z, labels, sw, count)
        if runner is None:
            loss, grad = self.engine.loss_and_grad(z, labels, sw)
            return loss, ((grad,) if self.keeps_grad(z) else ())
        if self.narrow:  # the loss kernel; the gradient kernel runs in the backward pass
            return self._shaped_loss(runner.run(args)[0], z), ()
        loss, grad, _ = runner.run(args)  # values checked before
        return self._shaped_loss(loss, z), (grad if z.dim() == 2 else grad.reshape(z.shape),)

    def keeps_grad(self, z: Any) -> bool:
        """Whether the wide formulas' forward pass keeps its gradient (else it is recomputed)."""
        return not (self.recompute_large and z.numel() >= FUSED_MIN_ELEMENTS)

    def wide_grad(self, z: Any, labels: Any, sw: Any) -> Any:
        """The gradient for a unit upstream gradient, recomputed (as :meth:`wide`)."""
        runner, args = self._runner(z, labels, sw, False)
        if runner is None:
            return self.engine.loss_and_grad(z, labels, sw)[1]
        grad = runner.grad(args)[0] if self.narrow else runner.run(args)[1]
        return grad if z.dim() == 2 else grad.reshape(z.shape)

    def _runner(self, z: Any, labels: Any, sw: Any, count: bool) -> tuple[Any, list]:
        """The compiled kernel for these inputs (or None) and its arguments."""
        if self.aot is None or not _aot_size(z, self.narrow) or torch.compiler.is_compiling():
            return None, []
        flat = _flatten(self.engine.head, z, labels, sw)
        runner = self.aot.runner(0 if flat[2] is None else flat[2].dim(), flat[1].dtype, count=count)
        return runner, [t for t in flat if t is not None]

    @staticmethod
    def _shaped_loss(loss: Any, z: Any) -> Any:
        return loss.reshape(z.shape[:-1]) if loss.dim() and z.dim() != 2 else loss

    def backward(self, mode: str, res: tuple, labels: Any, sw: Any, g: Any) -> Any:
        return self.run(1, mode == "fused", res, labels, sw, g, self.path)

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
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the loss runs eagerly from now on "
                f"(slower, within the same tolerances). Pass fused=False to unihead.compile(..., "
                f"'torch') to skip this.",
                RuntimeWarning,
                stacklevel=5,
            )
            return out


class _InvalidValues(Exception):
    """A label or weight value is invalid: ``TorchHead.loss`` runs the checks that say which."""


#: The compiled kernels of a softmax head (the wide formulas) are used for at most this many
#: rows: below :func:`._torch_aot.parallel_from` logits AOT_MAX_ROWS (the one-thread kernel; a
#: (1000, 5) input goes to the eager kernels), from there on AOT_PARALLEL_MAX_ROWS (the parallel
#: kernel).  Inductor's code costs about 150 ns a row at K = 10 on one thread and 80 on two
#: (masked vectors, per-row float64 transcendentals), where the eager kernels cost ~40 us a call
#: plus ~40 ns a row: on 2 cores the two cost the same at 8192 rows of 10 classes (measured;
#: docs/benchmarks.md).  A sigmoid head's kernels (the float32 formulas) are faster than the
#: eager ones at every size.  Both take nothing from :data:`FUSED_MIN_ELEMENTS` logits on.
AOT_MAX_ROWS = 256
AOT_PARALLEL_MAX_ROWS = 8192


def _aot_size(z: Any, narrow: bool) -> bool:
    """Whether logits ``z`` take the compiled kernels (:mod:`._torch_aot`) of a head whose kernels
    run the float32 formulas (``narrow``) or the wide ones."""
    n = z.numel()
    if n >= FUSED_MIN_ELEMENTS:
        return False
    if narrow:
        return True
    parallel = n >= _torch_aot.PARALLEL_FROM_SOFTMAX
    return n <= (AOT_PARALLEL_MAX_ROWS if parallel else AOT_MAX_ROWS) * z.shape[-1]


def _flatten(head: ClassificationHead, z: Any, labels: Any, sw: Any) -> tuple[Any, Any, Any]:
    """Logits, labels and sample weight in the layout of the compiled kernels: leading dimensions
    flattened into one, sparse ids as int64, the sample weight over every leading dimension."""
    if labels.dtype in _SMALL_INTS:
        labels = labels.long()
    if z.dim() == 2 and (sw is None or sw.dim() == 1 or sw.shape == z.shape):  # dense arrays:
        return z.contiguous(), labels.contiguous(), None if sw is None else sw.contiguous()  # free if so
    k = z.shape[-1]
    lead = z.shape[:-1]
    z2 = z.reshape(-1, k).contiguous()
    y = (labels.reshape(-1) if labels.dim() == len(lead) else labels.reshape(-1, k)).contiguous()
    if sw is None:
        return z2, y, None
    if sw.dim() <= len(lead):  # one weight per example, possibly for a leading part of them
        w = broadcast_prefix(_XP, sw, lead).expand(lead).reshape(-1)
    else:  # one per label
        w = sw.expand(z.shape).reshape(-1, k)
    return z2, y, w


class _Loss(torch.autograd.Function):
    """The loss with its analytic gradient.  Inputs: the kernels, the mode (see :class:`_Kernels`),
    the logits, the validated labels and sample weight (not differentiated).  Outputs: the loss
    and the residuals of the mode (marked non-differentiable; ``TorchHead.loss`` returns only the
    loss)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(kernels: _Kernels, mode: str, z: Any, labels: Any, sw: Any):
        loss, res = kernels.forward(mode, z, labels, sw)
        return (loss, *res)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        kernels, mode, z, labels, sw = inputs
        ctx.kernels, ctx.mode = kernels, mode
        ctx.z_dtype = z.dtype
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the residual outputs get no gradient: no zero tensors
        ctx.has_sw = sw is not None
        ctx.kept = mode.startswith("wide") and len(output) > 1  # the forward pass kept the gradient
        if ctx.kept:  # the gradient itself: nothing else
            ctx.save_for_backward(*output[1:])
            return
        if mode.startswith("wide"):  # the gradient is recomputed from the inputs
            ctx.save_for_backward(z, labels, *((sw,) if sw is not None else ()))
            return
        ctx.save_for_backward(labels, *((sw,) if sw is not None else ()), *output[1:])

    @staticmethod
    def backward(ctx: Any, g: Any, *_: Any):
        if g is None:  # the loss itself received no gradient
            return None, None, None, None, None
        saved = ctx.saved_tensors
        if ctx.mode.startswith("wide"):
            if ctx.kept:
                grad = saved[0]
            else:
                grad = ctx.kernels.wide_grad(saved[0], saved[1], saved[2] if ctx.has_sw else None)
            grad = _OPS.times_upstream(grad, g)
        else:
            labels, sw = saved[0], (saved[1] if ctx.has_sw else None)
            res = tuple(saved[2 if ctx.has_sw else 1 :])
            grad = ctx.kernels.backward(ctx.mode, res, labels, sw, g)
        return None, None, grad.to(ctx.z_dtype), None, None


_APPLY = super(torch.autograd.Function, _Loss).apply  # torch._C._FunctionBase.apply, bound to _Loss


class _LinearRows(torch.autograd.Function):
    """Per-row losses of ``h @ w + b`` (:func:`unihead._fused.rows_forward`) with the chunked
    backward pass (:func:`unihead._fused.rows_backward`): nothing of size ``(N, V)`` is saved,
    only the inputs and five numbers a row.  Inputs: ``h (N, D)``, ``w (D, V)`` (any strides:
    ``linear.weight.T`` is a view), ``b (V,)`` or None, class ids ``y (N,)``, the head's
    constants (:class:`unihead._fused.RowSpec`) and the chunk width.  Outputs: the losses and the per-row values of the
    backward pass (non-differentiable)."""

    @staticmethod
    def forward(h: Any, w: Any, b: Any, y: Any, spec: Any, chunk: int, kernels: Any):
        fin = _fused.rows_forward(
            _OPS, h, w, b, y, spec=spec, chunk=chunk,
            kernels=None if kernels is None else kernels.fns(),
        )
        return tuple(fin)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        h, w, b, y, spec, chunk, kernels = inputs
        ctx.consts = (spec, chunk)
        ctx.kernels = kernels
        ctx.has_bias = b is not None
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, w, *((b,) if b is not None else ()), y, *output[1:])

    @staticmethod
    def backward(ctx: Any, g: Any, *_: Any):
        if g is None:
            return (None,) * 7
        saved = ctx.saved_tensors
        h, w = saved[0], saved[1]
        b = saved[2] if ctx.has_bias else None
        y = saved[3 if ctx.has_bias else 2]
        fin = _fused.RowFinal(g.new_zeros(()), *saved[4 if ctx.has_bias else 3 :])
        spec, chunk = ctx.consts
        needs = ctx.needs_input_grad
        gh, gw, gb = _fused.rows_backward(
            _OPS, h, w, b, y, fin, g.to(fin.m.dtype), spec=spec, chunk=chunk,
            kernels=None if ctx.kernels is None else ctx.kernels.fns(),
        )
        return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None,
                None, None, None, None)


def _stats_kernel(zmm: Any, bc: Any, y: Any, start: Any, spec: Any) -> Any:
    return _fused.logits_stats(_OPS, zmm, bc, y, start, spec)


def _grad_kernel(zmm: Any, bc: Any, y: Any, start: Any, fin: Any, g: Any, live: Any, spec: Any) -> Any:
    return _fused.logits_grad(_OPS, zmm, bc, y, start, fin, g, live, spec)


class _ChunkKernels:
    """The elementwise part of each chunk of the fused linear loss (:func:`unihead._fused.logits_stats`,
    :func:`~unihead._fused.logits_grad`: a dozen passes over the chunk op by op) compiled by
    ``torch.compile`` (dynamic shapes) into one loop each, for :meth:`TorchHead.linear_loss` on
    inputs of at least :data:`FUSED_MIN_ELEMENTS` logits (``fused`` not False).  The same
    functions run eagerly when compilation fails (once, with a warning), as :class:`_Kernels`."""

    def __init__(self) -> None:
        self._compiled: tuple[Any, Any] | None = None
        self.failed = False

    def fns(self) -> tuple[Any, Any]:
        if self._compiled is None:
            # per head: Dynamo keeps one cache per code object (see _Kernels._compiled)
            self._compiled = tuple(
                torch.compile(_own_code(fn), dynamic=True, fullgraph=True) for fn in (_stats_kernel, _grad_kernel)
            )
        return tuple(self._guarded(i) for i in range(2))

    def _guarded(self, which: int) -> Any:
        eager = (_stats_kernel, _grad_kernel)[which]

        def run(*args: Any) -> Any:
            if self.failed:
                return eager(*args)
            try:
                return self._compiled[which](*args)
            except Exception as exc:
                out = eager(*args)  # the same math (raises its own error if the inputs are at fault)
                self.failed = True
                warnings.warn(
                    f"unihead: compiling the fused linear loss's chunk kernels failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); they run eagerly from now on "
                    f"(slower, the same numbers). Pass fused=False to unihead.compile(..., 'torch') to skip this.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return out

        return run


class _Kernel(torch.autograd.Function):
    """The compiled kernel, called with the fewest Python steps (the common case of
    :meth:`TorchHead.loss`): ``(runner, check, z, labels) -> loss``; the gradient it returned,
    times the upstream gradient, is the backward pass."""

    @staticmethod
    def forward(ctx: Any, runner: Any, check: bool, z: Any, labels: Any) -> Any:
        loss, grad, bad = runner.run([z, labels])
        if check and bad.item():
            raise _InvalidValues
        ctx.save_for_backward(grad)  # kept (see _Kernels.keeps_grad), and seen by saved-tensor hooks
        return loss

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        return None, None, _OPS.times_upstream(ctx.saved_tensors[0], g), None


_KERNEL = super(torch.autograd.Function, _Kernel).apply


class _SplitKernel(torch.autograd.Function):
    """A sigmoid head's compiled kernels, called as :class:`_Kernel`: the loss in the forward
    pass, the gradient recomputed from the logits and labels in the backward pass.  Nothing of
    the logits' size is kept, as ``BCEWithLogits`` keeps nothing (the gradient is the price of
    one more pass: one ``exp`` a logit)."""

    @staticmethod
    def forward(ctx: Any, runner: Any, check: bool, z: Any, labels: Any) -> Any:
        loss, bad = runner.run([z, labels])
        if check and bad.item():
            raise _InvalidValues
        ctx.runner = runner
        ctx.save_for_backward(z, labels)
        return loss

    @staticmethod
    def backward(ctx: Any, g: Any) -> Any:
        z, labels = ctx.saved_tensors
        return None, None, _OPS.times_upstream(ctx.runner.grad([z, labels])[0], g), None


_SPLIT_KERNEL = super(torch.autograd.Function, _SplitKernel).apply


def _in_graph(kernels: _Kernels) -> Any:
    """The loss on checked tensors as one opaque call for Dynamo, transparent to what follows.

    Dynamo guards every Python value the code it traces reads, and checks the guards on each
    call of the compiled function: traced through the engine, the formulas and the array
    namespace, the loss added ~140 guards (~25 us a call, more than the loss itself at small
    sizes).  ``allow_in_graph`` makes the call one node of Dynamo's graph; AOTAutograd then
    traces through it to ATen operations (forward and backward), which Inductor fuses with the
    rest of the model as before.  One function per head: its identity is the only guard."""

    def loss(z: Any, y: Any, sw: Any) -> Any:
        return _APPLY(kernels, "eager", z, y, sw)[0]

    return torch.compiler.allow_in_graph(loss)


_TRACE_KEYS = itertools.count(1)
# what the plan of a traced call runs (_traced_plan), and a subclass must not have replaced
# (nor its ops: their conversion)
_PLANNED = ("_logits", "_check", "_as_array", "_inputs")


try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _hint
    from torch.fx.experimental.symbolic_shapes import statically_known_true as _known
except ImportError:  # older PyTorch: traced calls run the checks in the trace
    _hint = _known = None


def _static_shape(x: Any) -> tuple[int, ...] | None:
    """``x``'s shape if it is a tensor whose sizes are plain ints in the trace, else None.

    Dynamo presents a symbolic size (dynamic shapes) as an ``int`` to the code it traces; such a
    size is not known to equal its hint (the value it was traced with), a static one is (both
    functions are evaluated by Dynamo without a guard)."""
    if _known is None or not isinstance(x, torch.Tensor):
        return None
    shape = tuple(x.shape)
    for d in shape:
        if not (type(d) is int and _known(d == _hint(d, -1))):
            return None
    return shape


def _traced_plan(compiled: "TorchHead") -> Any:
    """The static checks of a traced loss call, run once per traced signature outside Dynamo.

    ``plan(key, z_dtype, z_shape, y_dtype, y_shape, w_dtype, w_shape)`` runs the checks every
    path runs (:meth:`CompiledHead._logits`, :meth:`CompiledHead._inputs` without value checks)
    on meta tensors of those dtypes and shapes, and returns what they make of the inputs: the
    logits' dtype, the labels' dtype and shape, the weight's dtype (each reachable from the
    input by a cast and a reshape).  ``torch.compiler.assume_constant_result``: Dynamo calls it
    while tracing and keeps the result as a constant, so the checks' code adds no guards (traced,
    every head option, ops method and helper function they read is one, checked on every call:
    ~14 us a call at (32, 4), more than the loss's kernels).  None where the inputs fail a check
    or a shape is symbolic: the caller traces the checks then, which raise unihead's error.

    ``key`` is the head's string (``TorchHead._trace_key``: a digest of the head and its options),
    which Dynamo guards by value: the graph calls this head's opaque loss (:func:`_in_graph`), a
    closure Dynamo guards by its code only, so without it a head with other options (a label
    smoothing, a class weight) would run the first head's loss in a function compiled for it."""
    ref = weakref.ref(compiled)

    def plan(key: str, z_dtype: Any, z_shape: Any, y_dtype: Any, y_shape: Any, w_dtype: Any, w_shape: Any) -> Any:
        c = ref()
        if c is None or key != c._trace_key or z_shape is None or y_shape is None:
            return None

        def meta(dtype: Any, shape: Any) -> Any:
            return None if dtype is None else torch.empty(shape, dtype=dtype, device="meta")

        try:
            z = c._logits(meta(z_dtype, z_shape))
            y, w = c._inputs(z, meta(y_dtype, y_shape), meta(w_dtype, w_shape), validate=False)
        except (TypeError, ValueError):  # traced, the checks raise it
            return None
        return z.dtype, y.dtype, tuple(y.shape), None if w is None else w.dtype

    return torch.compiler.assume_constant_result(plan)


class TorchHead(CompiledHead):
    """The compiled head on PyTorch (see :class:`unihead.CompiledHead` for the methods)."""

    backend = "torch"
    ops = _OPS

    def __init__(self, head: ClassificationHead, *, validate: bool = True, fused: Any = "auto"):
        super().__init__(head, validate=validate)
        check_choice("fused", fused, ("auto", True, False))
        if fused == "auto" and os.environ.get("UNIHEAD_TORCH_FUSED", "1") == "0":
            fused = False
        self.fused = fused
        self._k = head.num_outputs
        # the labels the compiled kernel takes as they are (validation's normal form)
        self._label_dtype = torch.int64 if head.label_format == "sparse" else torch.float32
        self._kernel_labels = _kernel_labels(head)
        self._dense_labels = has_class_axis(head)
        aot = None
        if fused is not False:
            aot = _torch_aot.KernelCache(head, fused)
        self._kernels = _Kernels(self._engine(), aot)
        self._in_graph = _in_graph(self._kernels)
        # built now: Dynamo cannot build them while tracing (see _traced_plan).  Equal heads with
        # equal options compute the same loss, and share a key (a function compiled for one runs
        # for the other); a subclass may have options of its own, set after this __init__: a key
        # of its own
        if type(self) is TorchHead:
            spec = repr((dataclasses.astuple(head), sorted(self.options().items())))
            self._trace_key = "unihead.TorchHead:" + hashlib.sha256(spec.encode()).hexdigest()[:32]
        else:
            self._trace_key = f"unihead.{type(self).__qualname__}#{next(_TRACE_KEYS)}"
        self._traced_plan = _traced_plan(self)
        # the plan runs this class's checks and conversions outside the trace, and the trace then
        # only casts and reshapes: a subclass that converts the inputs its own way has them traced
        self._plans = type(self).ops is TorchHead.ops and all(
            getattr(type(self), m) is getattr(TorchHead, m) for m in _PLANNED
        )
        # loss_terms and normalizer= compute with this head's reduction="sum" twin: built now,
        # not on a first call inside torch.compile (Dynamo cannot construct a head).  A subclass
        # may set its own options after this __init__ (the twin is built with options()): its
        # twin is built on first use
        if type(self) is TorchHead:
            self._summed()

    def options(self) -> dict[str, Any]:
        return {"validate": self.validate, "fused": self.fused}

    def _validate_values(self) -> bool:
        return self.validate and not torch.compiler.is_compiling()  # no values while tracing

    def _fused_rows(self, h: Any, w: Any, b: Any, y: Any, chunk: int) -> Any:
        # the autograd.Function: works in eager mode and under torch.compile(fullgraph=True), whose
        # trace holds every chunk's code (a Python loop over the chunks)
        e = self._engine()
        kernels = None
        if (
            self.fused is not False
            and h.shape[0] * w.shape[1] >= FUSED_MIN_ELEMENTS
            and h.device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling()  # inside torch.compile: Inductor fuses them itself
            and not torch._C._are_functorch_transforms_active()
        ):
            kernels = self.__dict__.get("_chunk_kernels")
            if kernels is None:
                kernels = self.__dict__["_chunk_kernels"] = _ChunkKernels()
        return _LinearRows.apply(h, w, b, y, _fused.row_spec(e), chunk, kernels)[0]

    def linear_loss(
        self, hidden: Any, kernel: Any, labels: Any, bias: Any = None, sample_weight: Any = None, *,
        normalizer: Any = None, chunk_size: int | None = None,
    ) -> torch.Tensor:
        """The loss of ``hidden @ kernel + bias`` without the ``(N, V)`` logits (see
        :meth:`unihead.CompiledHead.linear_loss`), differentiable with respect to ``hidden``,
        ``kernel`` and ``bias`` by a ``torch.autograd.Function`` whose backward pass recomputes
        each chunk's logits.  With an ``nn.Linear`` ``linear`` (weight ``(out, in)``) pass
        ``kernel=linear.weight.T`` and ``bias=linear.bias``: the view costs nothing, and its
        gradient lands in ``linear.weight.grad``.  bfloat16/float16 ``hidden``/``kernel``: half
        matmuls (float32 accumulation inside, as PyTorch's), statistics and the loss in float32."""
        return super().linear_loss(
            hidden, kernel, labels, bias, sample_weight, normalizer=normalizer, chunk_size=chunk_size
        )

    def _use_fused(self, z: Any) -> bool:
        """Whether ``z`` takes the fused float32 kernels (large plain tensors on CPU and CUDA)."""
        return self._mode(z) == "fused"

    def _mode(self, z: Any) -> str:
        """``"fused"``, ``"wide"`` or ``"eager"`` (see :class:`_Kernels`) for logits ``z``."""
        if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(z):
            # Dynamo fuses the float32 formulas itself; the wide ones write into their own
            # arrays, which torch.func has no batching rules for
            return "eager"
        if z.numel() >= FUSED_MIN_ELEMENTS and self.fused is not False and not self._kernels.failed \
                and z.device.type in ("cpu", "cuda"):
            return "fused"
        return "eager" if _OPS.wide_dtype(z) is None else "wide"

    def loss(self, logits: Any, labels: Any, sample_weight: Any = None, *, normalizer: Any = None) -> torch.Tensor:
        """The loss (0-d tensor, or ``(...)`` for ``reduction="none"``), differentiable with
        respect to ``logits``; float32 for half-precision logits.  ``normalizer``: see
        :meth:`unihead.CompiledHead.loss` (the total over ``normalizer``)."""
        if normalizer is not None:
            return self._normalized(logits, labels, sample_weight, normalizer)
        # The common call first, in as few Python steps as possible (in a training step the
        # interpreter's caches are cold, and every line costs): a (N, K) float32 CPU tensor, a
        # tensor of labels, no sample weight, the compiled kernel ready.  Anything else, and any
        # doubt, takes the general path below, which checks and converts.
        if torch.compiler.is_compiling():  # traced: shapes and dtypes, then the formulas
            return self._traced_loss(logits, labels, sample_weight)
        aot = self._kernels.aot
        counted = False
        if (
            aot is not None
            and sample_weight is None
            and type(logits) is torch.Tensor
            and type(labels) is torch.Tensor
            and logits.dtype is torch.float32
            and logits.dim() == 2
            and logits.shape[1] == self._k
            and _aot_size(logits, self._kernels.narrow)
            and logits.is_cpu
            and labels.is_cpu
            and labels.shape == (logits.shape if self._dense_labels else logits.shape[:1])
            and logits.is_contiguous()  # the kernel reads them as dense arrays
            and labels.is_contiguous()
            and labels.dtype in self._kernel_labels
            and not torch._C._are_functorch_transforms_active()
        ):
            runner = aot.runner(0, labels.dtype)
            counted = True
            if runner is not None:
                check = self.validate and validation_enabled()
                try:
                    return (_SPLIT_KERNEL if self._kernels.narrow else _KERNEL)(runner, check, logits, labels)
                except (_InvalidValues, RuntimeError) as exc:
                    self._inputs(logits, labels, None, validate=True)  # raises the error that says which
                    if isinstance(exc, _InvalidValues):  # the same checks on the same values: unreachable
                        raise AssertionError("unihead: the kernel's value check and validation disagree") from None
                    raise
        z0 = logits if isinstance(logits, torch.Tensor) else None
        z = self._logits(logits)
        mode = self._mode(z)
        y, sw = self._inputs(z, labels, sample_weight)  # one reduction and one read for the values
        if mode == "wide" and counted:
            mode = "wide:counted"
        if z0 is not None and z0.requires_grad and _OPS.is_half(z0):
            z = z0.float()  # keep the graph to the half-precision logits
        args = (self._kernels, mode, z, y, sw)
        try:
            if torch._C._are_functorch_transforms_active():
                out = _Loss.apply(*args)
            else:
                # Function.apply binds default arguments with inspect.signature on every call
                # (for torch.func); every argument is given here, so go straight to the C
                # implementation (tens of microseconds per call at small sizes)
                out = _APPLY(*args)
        except (RuntimeError, IndexError):
            if mode.startswith("wide"):  # with validation off: an id out of range (gather's check)
                self._inputs(z, labels, sample_weight, validate=True)
            raise
        return out[0]

    def _traced_loss(self, logits: Any, labels: Any, sample_weight: Any) -> Any:
        """The loss while Dynamo traces (``torch.compile``): the static checks (values cannot be
        read while tracing), run outside the trace where the shapes are static
        (:func:`_traced_plan`), then the float32 formulas as one node of the graph, which Inductor
        fuses (:func:`_in_graph`)."""
        w = sample_weight
        z_shape = y_shape = w_shape = None
        # by Dynamo only (torch.export's non-strict tracing would record the plan's meta tensors)
        if self._plans and torch.compiler.is_dynamo_compiling():
            z_shape, y_shape = _static_shape(logits), _static_shape(labels)
            w_shape = None if w is None else _static_shape(w)
            if w is not None and w_shape is None:
                z_shape = None  # nothing to plan with: the checks are traced
        plan = self._traced_plan(  # called also when it cannot plan: it guards this head's key
            self._trace_key,
            None if z_shape is None else logits.dtype, z_shape,
            None if y_shape is None else labels.dtype, y_shape,
            None if w_shape is None else w.dtype, w_shape,
        )
        if plan is None:
            z = self._logits(logits)
            y, sw = self._inputs(z, labels, sample_weight, validate=False)
        else:
            z_dtype, y_dtype, y_new_shape, w_dtype = plan
            z = logits if logits.dtype == z_dtype else logits.to(z_dtype)
            y = labels if y_new_shape == y_shape else labels.reshape(y_new_shape)
            if y.dtype != y_dtype or y.device != z.device:
                y = y.to(z.device, y_dtype)
            sw = w
            if w is not None and (w.dtype != w_dtype or w.device != z.device):
                sw = w.to(z.device, w_dtype)
        return self._in_graph(z, y, sw)

    def warmup(self, sample_weight: Any = False, label_dtype: Any = None) -> bool:
        """Build the compiled kernels of this head's loss now and wait for them (or load them from
        the cache): the kernels ``fused="auto"`` builds in the background after a head's first
        calls.  ``sample_weight``: for calls without one (False), with one weight per example
        (True), or one per label of a multilabel head (``"per_label"``).  ``label_dtype``: the
        dtype the labels come in (default: int64 ids for ``sparse`` labels, float32 otherwise);
        each kind of input has kernels of its own.  Returns whether they are in use (False
        without a C++ compiler, or with ``fused=False``).  See docs/benchmarks.md,
        "Compilation"."""
        if self._kernels.aot is None:
            return False
        ndim = 0 if sample_weight is False else 2 if sample_weight == "per_label" else 1
        if label_dtype is None:
            label_dtype = self._label_dtype
        return self._kernels.aot.warmup(ndim, label_dtype)

    def loss_fn(self) -> "HeadLoss":
        """The loss as an ``nn.Module``, ``criterion(logits, target[, sample_weight])``: a
        :class:`HeadLoss` computing with this compiled head (its options and its kernels)."""
        return HeadLoss(self)

    def loss_module(self) -> "HeadLoss":
        """Deprecated: :meth:`loss_fn`."""
        warnings.warn("TorchHead.loss_module() is deprecated; use loss_fn().", DeprecationWarning, stacklevel=2)
        return self.loss_fn()

    def layer(
        self,
        in_features: int,
        weights: Any = None,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> "HeadLinear":
        """The output layer: an ``nn.Linear(in_features, num_outputs)`` producing logits, with
        ``module.head`` set and ``module.compiled()`` this compiled head.  ``weights`` in the
        canonical layout (``kernel (in, out)``, ``bias (out,)``); without them PyTorch's default
        initialisation."""
        layer = HeadLinear(self, in_features, device=device, dtype=dtype)
        if weights is not None:
            layer.set_weights(weights)
        return layer


#: ``state_dict`` key suffix of a module's extra state (``nn.Module.get_extra_state``).
_EXTRA_STATE = "_extra_state"


class HeadLinear(nn.Linear):
    """``nn.Linear(in_features, head.num_outputs)`` that carries its :class:`ClassificationHead`.

    ``head``: the spec, or a compiled :class:`TorchHead` (what ``compiled.layer()`` passes), whose
    options :meth:`compiled` keeps.  An ordinary module (``state_dict``, ``.to()``, optimisers,
    ``torch.save``).  The spec travels in the state dict as extra state; on load:

    * the state dict of a plain ``nn.Linear`` of the same shape loads (``strict=True`` too): it
      has no spec to check, and porting a model's last layer is what this layer is for;
    * a state dict saved with a head that differs only in its loss or decision options
      (smoothing, weights, focal loss, reduction, label format, threshold) loads: the weights
      mean the same; this layer keeps its own head;
    * a head whose logits mean something else (another task, number of outputs or binary units)
      is refused before any weight is copied, with what to do instead."""

    def __init__(self, head: Any, in_features: int, *, device: Any = None, dtype: Any = None):
        compiled = head if isinstance(head, TorchHead) else None
        head = compiled.head if compiled is not None else head
        if not isinstance(head, ClassificationHead):
            raise TypeError(f"HeadLinear takes a ClassificationHead or a TorchHead; got {type(head).__name__}.")
        super().__init__(in_features, head.num_outputs, bias=True, device=device, dtype=dtype)
        self.head = head
        self._compiled_head = compiled  # built on first use otherwise

    def get_weights(self) -> dict[str, np.ndarray]:
        """``{"kernel": (in, out), "bias": (out,)}`` as NumPy arrays (PyTorch stores ``(out, in)``)."""
        to_np = _OPS.to_numpy
        return {"kernel": to_np(self.weight).T.copy(), "bias": to_np(self.bias).copy()}

    def set_weights(self, weights: Any) -> None:
        """Load canonical-layout weights (``kernel (in, out)`` is transposed into ``weight``): a
        ``{"kernel", "bias"}`` mapping or a ``(kernel, bias)`` pair, from any backend's layer."""
        kernel, bias = canonical_weights(self.head, self.in_features, weights)
        with torch.no_grad():
            # torch.tensor copies: the arrays may be read-only views (JAX's, for one)
            self.weight.copy_(torch.tensor(kernel.T))
            self.bias.copy_(torch.tensor(bias))

    # the names every backend's layer has (Keras' own get_weights/set_weights are Keras' lists)
    get_canonical_weights = get_weights
    set_canonical_weights = set_weights

    def get_extra_state(self) -> str:
        return self.head.to_json()

    def set_extra_state(self, state: Any) -> None:
        saved = ClassificationHead.from_json(state)
        problem = weights_mismatch(saved, self.head)
        if problem is not None:
            unit_hint = ""
            if saved.task == self.head.task == "binary":
                unit_hint = (
                    " To turn a binary head's weights from 1 unit into 2 (exactly), port them: "
                    "unihead.port((saved_head, {'kernel': sd['weight'].T, 'bias': sd['bias']}), "
                    f"to='torch', binary_units={self.head.binary_units})."
                )
            raise ValueError(
                f"This state dict was saved from a layer with head {saved!r}; this layer's head is "
                f"{self.head!r}. Their logits mean different things ({problem}), so the weights do "
                f"not carry over. To load them, build the layer for the saved head: saved_head = "
                f"unihead.ClassificationHead.from_json(sd['{_EXTRA_STATE}']); "
                f"layer = unihead.compile(saved_head, 'torch').layer(in_features).{unit_hint} "
                f"(Heads that differ only in loss options, such as label_smoothing, class_weights, "
                f"focal_gamma or reduction, load into each other.)"
            )

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + _EXTRA_STATE
        if key in state_dict:
            self.set_extra_state(state_dict[key])  # refuse before any weight is copied
        n = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key not in state_dict and key in missing_keys[n:]:
            missing_keys.remove(key)  # a plain nn.Linear's state dict: nothing to check

    def compiled(self, **options: Any) -> "TorchHead":
        """The compiled head of this layer (for its loss, probabilities, predict): the one it was
        built from, with its options (``fused``, ``validate``); ``options`` change some of them."""
        compiled = self.__dict__.get("_compiled_head")  # absent in modules pickled before it existed
        if compiled is None:
            compiled = self._compiled_head = TorchHead(self.head)
        return compiled._with_options(**options)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head={self.head!r}"


class HeadLoss(nn.Module):
    """``criterion(logits, target, sample_weight=None, *, normalizer=None)`` for a
    :class:`ClassificationHead` (``normalizer``: see :meth:`unihead.CompiledHead.loss`).

    ``head``: the spec, or a compiled :class:`TorchHead` (what ``compiled.loss_fn()`` passes),
    whose options and kernels the module uses; ``validate``/``fused`` override them."""

    def __init__(self, head: Any, *, validate: bool | None = None, fused: Any = None):
        super().__init__()
        options = {k: v for k, v in (("validate", validate), ("fused", fused)) if v is not None}
        self._compiled = compiled_head(head, TorchHead, options)
        self.head = self._compiled.head

    def forward(
        self, logits: torch.Tensor, target: Any, sample_weight: Any = None, *, normalizer: Any = None
    ) -> torch.Tensor:
        return self._compiled.loss(logits, target, sample_weight, normalizer=normalizer)

    def compiled(self) -> "TorchHead":
        """The compiled head this module computes with."""
        return self._compiled

    def extra_repr(self) -> str:
        return f"head={self.head!r}"


def compile_head(head: ClassificationHead, *, validate: bool = True, fused: Any = "auto") -> TorchHead:
    """``unihead.compile(head, "torch", validate=True, fused="auto")``.

    ``fused`` (docs/benchmarks.md, "Compilation"):

    * ``"auto"``: logits of at least :data:`FUSED_MIN_ELEMENTS` elements (CPU, CUDA) run through
      kernels compiled by ``torch.compile`` at their first call (a few seconds per head, then
      PyTorch's disk cache); smaller float32 CPU inputs run the wide formulas, and once a head
      has been called :data:`~unihead.backends._torch_aot.HOT_CALLS` times with one kind of
      input, its kernels compiled in a background process (cached on disk; one thread for small
      inputs, parallel for larger ones): a softmax head's the same function (bit for bit), a
      sigmoid head's the float32 formulas (within docs/semantics.md §11 of the wide ones);
    * ``True``: as ``"auto"``, but the small-input kernels are built (or loaded) at the first call,
      which waits for them (:meth:`TorchHead.warmup` does it ahead);
    * ``False``: nothing is compiled (also: environment variable ``UNIHEAD_TORCH_FUSED=0``):
      float32 logits on the CPU always take the wide formulas (the same numbers, bit for bit, on
      every machine), slower."""
    return TorchHead(head, validate=validate, fused=fused)


# ----------------------------------------------------------------------------- data parallelism
def _scalar(x: Any, name: str, example: str, hint: str) -> torch.Tensor:
    """``x`` (a 0-d real tensor or a Python/NumPy real number) as a detached 0-d floating tensor
    of its own (the collectives write in place): float32 and float64 tensors keep their dtype,
    half precision and integers become float32 (a half-precision sum overflows at 65504)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray) and x.dtype.kind in "biufc":
        t = torch.from_numpy(np.array(x))  # dtype and shape checked below
    elif isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} takes a 0-d tensor or a real number ({example}); got {type(x).__name__}.")
    else:
        try:
            t = torch.tensor(float(x), dtype=torch.float32)
        except OverflowError:
            raise ValueError(f"{name} takes a finite real number ({example}); got {x!r:.40}.") from None
    if t.dim() != 0:
        raise ValueError(
            f"{name} takes a scalar ({example}); got a tensor of shape {tuple(t.shape)}. {hint}"
        )
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} takes a real number ({example}); got a {t.dtype} tensor.")
    if t.dtype not in (torch.float32, torch.float64):
        return t.to(torch.float32)
    return t.clone()


def _all_reduce_sum(t: torch.Tensor, group: Any, name: str) -> tuple[torch.Tensor, int]:
    """``t`` summed over the processes of ``group`` (in place) and the group's size; ``t`` and 1
    without ``torch.distributed`` (not initialised: one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                f"{name}: a process group was given but torch.distributed is not initialised; call "
                f"torch.distributed.init_process_group(...) first (or pass group=None in a single process)."
            )
        return t, 1
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"{name}: this process is not a member of the process group it was given; call it on "
            f"the group's members only (the ones whose gradients the group reduces)."
        )
    world = dist.get_world_size(group)
    if world == 1:
        return t, 1
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))  # NCCL reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t, world


def _concrete(t: torch.Tensor) -> bool:
    return _OPS.is_concrete(t) and not torch._C._are_functorch_transforms_active()


def global_normalizer(weight: Any, group: Any = None, *, average_gradients: bool = True) -> torch.Tensor:
    """The normalizer of a data-parallel step: this process's loss weight summed over the
    processes of ``group`` (``torch.distributed``, the default group when None), divided by
    their number when ``average_gradients`` (DistributedDataParallel and FSDP average the
    gradients over the processes; pass False for a reduction that sums them).

    ``compiled.loss(logits, labels, sample_weight, normalizer=global_normalizer(
    compiled.loss_weight(labels, sample_weight)))`` then gives, after DDP's gradient
    averaging, exactly the gradient of the weighted mean over the whole global batch, however
    the examples, ignored labels and weights are spread over the processes (each process's own
    mean would average means: docs/scaling-out.md).  The value each process sees is
    ``world * total_local / W``, not the global loss: :func:`global_loss` gives that.

    ``weight``: a 0-d tensor (the local weight, e.g. from ``compiled.loss_weight``, summed over
    the micro-batches of the step with gradient accumulation) or a number.  It is detached and
    copied (the argument is not modified); float16/bfloat16 and integers are summed in float32.
    Every process of the group must call this (it is a collective: one ``all_reduce`` of one
    number).  Without ``torch.distributed`` initialised, or in a group of one, it is the weight.
    Validation (on by default, :func:`unihead.set_validation`) checks that the summed weight is
    finite and not negative, after the reduction, so that every process raises alike."""
    check_choice("average_gradients", average_gradients, (True, False))
    example = "the local weight, compiled.loss_weight(labels, sample_weight)"
    hint = "Per-example weights are summed first: compiled.loss_weight(labels, sample_weight) does it."
    w, world = _all_reduce_sum(_scalar(weight, "global_normalizer", example, hint), group, "global_normalizer")
    if validation_enabled() and _concrete(w):
        value = float(w)
        if not (value >= 0.0 and value != float("inf")):
            raise ValueError(
                f"global_normalizer: the weight summed over the {world} process(es) is {value}; it must be "
                f"finite and >= 0 (a sum of loss weights). Pass each process's compiled.loss_weight(...)."
            )
    return w / world if average_gradients and world > 1 else w


def global_loss(loss: Any, group: Any = None, *, average_gradients: bool = True) -> torch.Tensor:
    """The loss of the whole global batch, for logging, from each process's ``loss`` computed
    with ``normalizer=global_normalizer(weight, group, average_gradients=...)`` (pass the same
    ``group`` and ``average_gradients``).

    Each process's value is ``world * total_local / W`` (with ``average_gradients``): the mean of
    them over the processes is ``sum(total) / W``, the global weighted mean; without
    ``average_gradients`` each is ``total_local / W`` and the global loss is their sum.  The
    result is detached (a collective: every process of the group calls it, and all get the same
    value).  ``torch.distributed``'s ``ReduceOp.AVG`` would do the averaging, but gloo (CPU) does
    not have it.  With gradient accumulation, pass the sum of the micro-batches' losses."""
    check_choice("average_gradients", average_gradients, (True, False))
    example = "the value of compiled.loss(..., normalizer=global_normalizer(weight))"
    hint = 'A per-example loss (reduction="none") has no global counterpart: log the 0-d loss of reduction="mean".'
    total, world = _all_reduce_sum(_scalar(loss, "global_loss", example, hint), group, "global_loss")
    return total / world if average_gradients and world > 1 else total


# ------------------------------------------------------------- the class-sharded (vocab-parallel) loss
class _ShardedRows(torch.autograd.Function):
    """Per-row losses over every class from this process's logits ``z (N, C)`` (the classes from
    ``start``) and the group's collectives (:func:`unihead._sharded.rows_forward`: one
    ``all_reduce`` MAX, one SUM); the backward pass is local (:func:`unihead._sharded.rows_grad`).
    Outputs: the losses, the number of classes over the group, and the per-row values of the
    backward pass (non-differentiable)."""

    @staticmethod
    def forward(z: Any, y: Any, start: int, spec: Any, group: Any):
        pmax, psum = _group_collectives(group)
        width = torch.full((1,), float(z.shape[-1]), dtype=torch.float64, device=z.device)
        fin, (classes,) = _sharded.rows_forward(
            _OPS, z, y, start, spec=spec, pmax=pmax, psum=psum, extra=(width,)
        )
        return (fin.loss, classes, *fin[1:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        z, y, start, spec, group = inputs
        ctx.consts = (start, spec)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(z, y, *output[2:])

    @staticmethod
    def backward(ctx: Any, g: Any, *_: Any):
        if g is None:
            return (None,) * 5
        z, y, *fin = ctx.saved_tensors
        start, spec = ctx.consts
        fin = _fused.RowFinal(g.new_zeros(()), *fin)
        dz = _sharded.rows_grad(_OPS, z, y, start, fin, g.to(fin.m.dtype), spec=spec)
        return (dz, None, None, None, None)


def _group_collectives(group: Any) -> tuple[Any, Any]:
    """``(pmax, psum)`` over the processes of ``group`` (:func:`unihead._sharded.reduce_stats`):
    each stacks its arrays (one dtype each call) into one tensor, one ``all_reduce``; the
    identity without ``torch.distributed`` initialised (one process holds every class)."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()

    def reduce(op: Any) -> Any:
        def collective(*xs: Any) -> list:
            if not on:
                return list(xs)
            sizes = [x.numel() for x in xs]
            dtype = torch.promote_types(xs[0].dtype, xs[-1].dtype)
            flat = torch.cat([x.reshape(-1).to(dtype) for x in xs])
            if flat.device.type == "cpu" and dist.get_backend(group) == "nccl":
                flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flat, op=op, group=group)
            flat = flat.to(xs[0].device)
            return [p.reshape(x.shape).to(x.dtype) for p, x in zip(flat.split(sizes), xs)]

        return collective

    return reduce(dist.ReduceOp.MAX if on else None), reduce(dist.ReduceOp.SUM if on else None)


def class_sharded_loss(
    compiled: Any, local_logits: Any, labels: Any, sample_weight: Any = None, *, class_start: int,
    group: Any = None, normalizer: Any = None,
) -> torch.Tensor:
    """The loss of a head whose classes are split over the processes of ``group`` (the default
    group when None): each process passes the logits of its own classes, ``local_logits`` ``(...,
    local_classes)`` (e.g. ``hidden @ kernel[:, shard]``), the classes ``class_start ..
    class_start + local_classes - 1`` (contiguous; the shards together are the head's
    ``num_outputs``, any sizes), and the same ``labels`` (global class ids) and
    ``sample_weight``.  Every process gets the loss of the whole row, exactly ``compiled.loss``
    of the full logits (every option of the head, ``reduction``, ``normalizer=``), without any
    process holding them.

    The collectives (docs/large-vocabulary.md): one ``all_reduce`` MAX of the row maxima and of
    the target logits (held by one process, ``-inf`` elsewhere), one ``all_reduce`` SUM of the
    shifted sums of exponentials, label smoothing's sums and the number of classes (validation
    compares it with the head's ``num_outputs``).  The backward pass is local: each process gets
    the gradient of its own logits.  The gradient of a hidden state the processes share is the
    sum of their partial gradients ``dz @ kernel[:, shard].T``: all-reduce it (``hidden.grad``,
    or in the backward pass of a column-parallel linear, as Megatron's does).

    ``compiled``: a PyTorch softmax head with class ids (multiclass ``sparse``; others are
    refused with what to write instead).  Every process of the group calls this (a collective).
    Without ``torch.distributed`` initialised it is ``compiled.loss`` of the logits it is given
    (which must then be every class)."""
    if not isinstance(compiled, TorchHead):
        raise TypeError(
            f"class_sharded_loss: compiled must be a PyTorch head (unihead.compile(head, 'torch')); "
            f"got {type(compiled).__name__}."
        )
    e = compiled._engine()
    name = "class_sharded_loss"

    def rows(z: Any, y: Any, start: int) -> Any:
        loss, classes, *_ = _ShardedRows.apply(z, y, start, _fused.row_spec(e), group)
        if compiled._validate_values() and float(classes[0]) != compiled.head.num_outputs:
            raise ValueError(
                f"{name}: the processes' local logits hold {int(classes[0])} classes together and the "
                f"head has num_outputs={compiled.head.num_outputs}: each process passes the logits of "
                f"its own classes (class_start, local_classes), the shards covering every class once."
            )
        return loss

    return compiled._class_sharded(name, local_logits, labels, sample_weight, class_start, rows, normalizer)
