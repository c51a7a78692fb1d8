"""Head-level computation shared by every backend: labels -> targets and weights, the per-example
loss, the reduction, and the analytic backward pass, on top of :mod:`unihead.formulas`.

``Engine.forward`` returns the loss and the residuals the backward pass needs;
``Engine.backward`` maps an upstream gradient to the gradient with respect to the logits.
Backends plug these into their own autodiff (``torch.autograd.Function``, ``jax.custom_vjp``,
``tf.custom_gradient``); the NumPy backend calls both directly.

Inputs are already validated (:mod:`unihead._validation`): logits are float32/float64 of shape
``(..., num_outputs)``, labels have the documented shape and values, the sample weight is
broadcastable as documented, and everything floating is in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import formulas as F
from ._ops import Ops
from .spec import ClassificationHead

__all__ = ["Engine", "Prepared", "broadcast_prefix"]


class Prepared(NamedTuple):
    """Targets and weights in the form the formulas take.

    ``path``: ``"sparse"`` (softmax, integer targets ``y``), ``"dense"`` (softmax, target weights
    ``tau`` of shape ``(..., K)``) or ``"sigmoid"`` (elementwise positive/negative target weights
    ``a``, ``b`` of shape ``(..., K)``).  ``w``: the example weights (sample weight x class weight x
    ignore mask), shape ``(...)`` for softmax paths and ``(..., K)`` for the sigmoid path.
    """

    path: str
    y: Any = None
    tau: Any = None
    a: Any = None
    b: Any = None
    w: Any = None


class Engine:
    """The computation of one head over one array namespace."""

    def __init__(self, head: ClassificationHead, ops: Ops):
        self.head = head
        self.ops = ops
        self.gamma = float(head.focal_gamma)
        self.eps = float(head.label_smoothing)
        self.cap = head.logit_softcap  # None, or s of s * tanh(z / s)
        self.zl = float(head.z_loss)  # c of c * logsumexp(z)**2
        self._wide_engine: Engine | None = None
        self._path = self.path_of()
        # a 1-unit (sigmoid) head computes on its logits without the class axis of length 1:
        # compilers vectorise along the last axis (XLA on CPU: 2-3x faster on (N,) than on (N, 1))
        self._unit = head.num_outputs == 1
        self._lean = "sparse" if self._path == "sparse" else "sigmoid" if self.hard_sigmoid() else None
        if self.cap is not None or self.zl != 0.0:  # the lean formulas have neither option
            self._lean = None

    # ------------------------------------------------------------------ the wide policy
    @property
    def wide(self) -> "Engine":
        """This head's engine over :meth:`Ops.widened` (float64 arrays carrying float32 results)."""
        if self._wide_engine is None:
            self._wide_engine = Engine(self.head, self.ops.widened())
        return self._wide_engine

    def _widen(self, z: Any) -> Any:
        """``z`` in the dtype it is evaluated in under ``ops.wide``, or None (its own dtype)."""
        dtype = self.ops.wide_dtype(z)
        return None if dtype is None else self.ops.xp.astype(z, dtype)

    def hard_sigmoid(self) -> bool:
        """Sigmoid targets that are the labels themselves (0/1, no smoothing, ``pos_weight`` or
        focal factor): :func:`unihead.formulas.sigmoid_hard_wide` applies."""
        head = self.head
        return (
            head.activation == "sigmoid"
            and head.label_format in ("binary", "multi_hot")
            and self.eps == 0.0
            and self.gamma == 0.0
            and head.pos_weight is None
        )

    def loss_and_grad(self, z: Any, labels: Any, sample_weight: Any = None, grad: bool = True) -> tuple[Any, Any]:
        """The loss of validated inputs and its gradient with respect to ``z`` for a unit upstream
        gradient (per example for ``reduction="none"``: the gradient for upstream ``g`` is then
        ``grad * g[..., None]``), in ``z``'s dtype.  ``grad=False`` skips the gradient (None).

        Under the wide policy (``ops.wide_dtype(z)`` is not None) everything is evaluated in the
        wider dtype and rounded once; plain sparse-target and hard-label sigmoid heads then take
        the lean formulas (:func:`~unihead.formulas.sparse_nll_wide`,
        :func:`~unihead.formulas.sigmoid_hard_wide`).  Every other case runs :meth:`forward`
        and :meth:`backward`."""
        zw = self._widen(z)
        eng = self if zw is None else self.wide
        xp = eng.ops.xp
        if zw is None:
            zw = z
        prep = eng.prepare(zw, labels, sample_weight)
        lean = self._lean if eng is not self else None
        if lean == "sparse":  # zw is a fresh array: the formula may overwrite it
            per, g0 = F.sparse_nll_wide(eng.ops, zw, prep.y, self.eps, grad)
        elif lean == "sigmoid":
            per, g0 = F.sigmoid_hard_wide(eng.ops, zw[..., 0] if self._unit else zw, prep.a, grad)
        else:
            loss, res = eng.forward(zw, prep, keep="stats")
            g = eng.backward(res, prep, eng._unit_upstream(loss, array=True)) if grad else None
            return xp.astype(loss, z.dtype), (None if g is None else xp.astype(g, z.dtype))
        loss, norm = eng._reduce(per, prep.w)
        if not grad:
            return xp.astype(loss, z.dtype), None
        if isinstance(norm, _Count):  # the unweighted mean: one multiply
            g0 *= 1.0 / norm.n
        else:
            g0 = eng._apply_scale(g0, eng._scale(prep, eng._unit_upstream(loss), norm), prep)
        if self._unit:
            g0 = g0[..., None]
        return xp.astype(loss, z.dtype), xp.astype(g0, z.dtype)

    def _unit_upstream(self, loss: Any, array: bool = False) -> Any:
        """An upstream gradient of ones shaped like ``loss`` (for a scalar loss the number 1.0, or
        a 0-d array with ``array``)."""
        if len(loss.shape) == 0:
            return self.ops.scalar(1.0, loss) if array else 1.0
        return self.ops.xp.ones_like(loss)

    # ------------------------------------------------------------------ probabilities
    def capped(self, z: Any, ops: Ops | None = None) -> Any:
        """The logits the head reads: ``s * tanh(z / s)`` with ``logit_softcap = s``, else ``z``
        (docs/semantics.md §5), rounded to ``z``'s dtype (:meth:`capped2` for the formulas)."""
        return z if self.cap is None else F.softcap(ops or self.ops, z, self.cap)

    def capped2(self, z: Any, ops: Ops | None = None) -> tuple[Any, Any]:
        """The logits the head reads as the formulas take them: ``(hi, lo)``, ``lo`` None where
        the capped logits are carried in one array.

        A capped logit rounded to the dtype is off by up to half an ulp of the cap ``s``, and
        every formula reads differences of logits (``exp(z_j - m)``, ``z_y - m``): that is
        ``s/2`` ulp of relative error in a probability.  So where the result's own dtype is the
        compute dtype, the cap is carried in double length (:func:`~unihead.formulas.softcap2`)
        and the formulas add ``lo`` to first order.  Under the wide policy (float64 arrays
        carrying float32 results, ``ops.compensate`` false) the rounded float64 cap has 29 bits
        to spare: ``lo`` is None there, as it is without a cap."""
        ops = ops or self.ops
        if self.cap is None:
            return z, None
        if not ops.compensate or ops.bits(z) not in (32, 64):
            return F.softcap(ops, z, self.cap), None
        return F.softcap2(ops, z, self.cap)

    def probabilities(self, z: Any) -> Any:
        zw = self._widen(z)
        if zw is not None:  # sigmoid, or exp(log_softmax): a few float64 roundings, rounded once
            ops = self.wide.ops
            zw = self.capped(zw, ops)
            p = ops.xp.exp(ops.log_softmax(zw)) if self.head.activation == "softmax" else ops.sigmoid(zw)
            return ops.xp.astype(p, z.dtype)
        zc, lo = self.capped2(z)
        if self.head.activation == "softmax":
            return F.softmax_probabilities(self.ops, F.softmax_stats(self.ops, zc, lo))
        return F.sigmoid_probabilities(self.ops, zc, lo)[0]

    def log_probabilities(self, z: Any) -> Any:
        zw = self._widen(z)
        if zw is not None:  # the top class's log p is -log1p(off-maximum mass): the stats, not log_softmax
            ops = self.wide.ops
            zw = self.capped(zw, ops)
            if self.head.activation == "softmax":
                lp = F.softmax_log_probabilities(ops, zw, F.softmax_stats(ops, zw))
            else:
                lp = ops.log_sigmoid(zw)
            return ops.xp.astype(lp, z.dtype)
        z, lo = self.capped2(z)
        if self.head.activation == "softmax":
            return F.softmax_log_probabilities(self.ops, z, F.softmax_stats(self.ops, z, lo))
        return -F.sigmoid_stats(self.ops, z, lo).nlp

    def predict(self, z: Any) -> Any:
        """Class ids ``(...)`` (binary, multiclass) or 0/1 ``(..., K)`` (multilabel).

        Sigmoid outputs: 1 where ``z > logit(threshold)``; a 2-unit binary head: 1 where
        ``z_1 - z_0 > logit(threshold)``; multiclass: the first index of the maximum.

        A soft-capped head decides on its capped logits ``c(z) = s tanh(z / s)``.  ``c`` is
        increasing, so the argmax and a 1-unit cut ``c(z) > t`` are decided on ``z`` itself
        (``z > s atanh(t / s)``; never for ``t >= s``): exact, where rounded capped logits could
        tie.  A 2-unit head compares ``c(z_1) - c(z_0)`` with ``t`` (``z_1 > z_0`` for the
        default threshold)."""
        xp, head = self.ops.xp, self.head
        if head.task == "multiclass":
            return xp.argmax(z, axis=-1)
        cut = math.log(head.threshold / (1.0 - head.threshold))
        if self.cap is not None and not (head.task == "binary" and head.binary_units == 2):
            s = self.cap
            cut = math.inf if cut >= s else -math.inf if cut <= -s else s * math.atanh(cut / s)
        if head.task == "binary":
            if head.binary_units == 2:
                d = z[..., 1] - z[..., 0] if (self.cap is None or cut == 0.0) else self._capped_difference(z)
            else:
                d = z[..., 0]
            return xp.astype(d > cut, self.ops.index_dtype())
        return xp.astype(z > cut, self.ops.index_dtype())

    def _capped_difference(self, z: Any) -> Any:
        """``c(z_1) - c(z_0)`` of a soft-capped 2-unit head's logits ``z`` ``(..., 2)``, with the
        capped logits' low parts (:meth:`capped2`)."""
        hi, lo = self.capped2(z)
        d = hi[..., 1] - hi[..., 0]
        return d if lo is None else d + (lo[..., 1] - lo[..., 0])

    # ------------------------------------------------------------------ targets and weights
    def prepare(self, z: Any, labels: Any, sample_weight: Any = None) -> Prepared:
        """Turn validated labels and sample weights into :class:`Prepared` targets/weights.
        ``w`` is None where every weight is 1 (no sample or class weights, no ignored labels):
        the unweighted mean needs no multiplications."""
        ops, xp, head = self.ops, self.ops.xp, self.head
        path = self._path
        if path == "sparse" and sample_weight is None and head.class_weights is None and head.ignore_index is None:
            # the common case first, with nothing to multiply (every weight 1)
            y = labels if head.task == "multiclass" else xp.astype(labels, ops.index_dtype())
            return Prepared("sparse", y=y if y.dtype == ops.index_dtype() else xp.astype(y, ops.index_dtype()))
        k = head.num_outputs
        w, q = self.example_weights(labels, sample_weight, z)
        if head.task == "multilabel":
            a, b = self._binary_targets(q)
            if head.pos_weight is not None:
                a = a * ops.asarray(head.pos_weight, like=z)
            return Prepared("sigmoid", a=a, b=b, w=w)
        if head.task == "binary":
            if path == "sparse":
                return Prepared("sparse", y=xp.astype(q, ops.index_dtype()), w=w)
            a, b = self._binary_targets(q)
            if head.pos_weight is not None:
                a = a * head.pos_weight
            if path == "sigmoid":  # a 1-unit head: targets and weights of the leading shape
                return Prepared("sigmoid", a=a, b=b, w=w)
            return Prepared("dense", tau=xp.stack([b, a], axis=-1), w=w)
        if head.label_format == "sparse":  # multiclass
            if path == "sparse":
                return Prepared("sparse", y=q, w=w)
            t = xp.astype(xp.expand_dims(q, axis=-1) == xp.arange(k, device=ops.device(z)), z.dtype)
            return Prepared("dense", tau=self._smooth(t), w=w)
        return Prepared("dense", tau=self._smooth(q), w=w)

    def example_weights(self, labels: Any, sample_weight: Any, z: Any, ones: Any = None) -> tuple[Any, Any]:
        """The weight of each example (of each (example, label) of a multilabel head): sample
        weight x class weight x 0 for an ignored label, or None where every weight is 1; and the
        labels with ignored ones replaced by a valid value (class 0, negative), ids as
        ``ops.index_dtype()``.

        ``z``: the logits, or anything with their ``shape``, ``dtype`` and ``device``
        (:meth:`loss_weight` has no logits); ``ones``: a function returning ones of the weights'
        shape in ``z``'s dtype (default: from ``z``, whose batch size may be unknown while
        tracing)."""
        ops, xp, head = self.ops, self.ops.xp, self.head
        multilabel = head.task == "multilabel"
        if ones is None:
            ones = (lambda: xp.ones_like(z)) if multilabel else (lambda: ops.ones_rows(z))
        shape = tuple(z.shape) if multilabel else tuple(z.shape[:-1])
        cw = None if head.class_weights is None else ops.asarray(head.class_weights, like=z)
        w = None
        if sample_weight is not None:  # times ones: to the weights' shape
            w = broadcast_prefix(xp, sample_weight, shape) * ones()
        if multilabel:
            if cw is not None:
                w = cw * ones() if w is None else w * cw
            return w, labels
        q = labels
        if head.ignore_index is not None:
            valid = labels != head.ignore_index
            w = xp.astype(valid, z.dtype) if w is None else ops.where0(valid, w)
            q = ops.where0(valid, q) if head.task == "binary" else xp.where(valid, q, xp.zeros_like(q))
        if head.task == "binary":
            if cw is not None:
                cwq = cw[0] * (1 - q) + cw[1] * q
                w = cwq if w is None else w * cwq
            return w, q
        if head.label_format == "sparse":
            if q.dtype != ops.index_dtype():
                q = xp.astype(q, ops.index_dtype())
            if cw is not None:
                cwy = ops.lookup(cw, q)
                w = cwy if w is None else w * cwy
            return w, q
        if cw is not None:
            cwt = xp.sum(q * cw, axis=-1)
            w = cwt if w is None else w * cwt
        return w, q

    def loss_weight(self, labels: Any, sample_weight: Any, z: Any, ones: Any = None) -> Any:
        """What ``reduction="mean"`` divides the total by (docs/semantics.md §7): the sum of the
        example weights (:meth:`example_weights`; a multilabel example's weight is the mean of
        its labels' weights), the number of examples where nothing is weighted; a 0-d array of
        ``z``'s dtype.  The total over examples is what ``reduction="sum"`` gives, so a mean is
        ``total / loss_weight`` (0 for a zero weight), whichever pieces the batch comes in."""
        ops = self.ops
        w, _ = self.example_weights(labels, sample_weight, z, ones)
        per_label = self.head.task == "multilabel"
        k = self.head.num_outputs if per_label else 1
        if w is None:
            n = _size(z)
            if n is None or type(n) is not int:  # a dimension unknown while tracing
                return ops.count(ones()) / k
            return ops.scalar(float(n // self.head.num_outputs), z)
        total = ops.total(w)
        return total / k if k > 1 else total

    def _smooth(self, t: Any) -> Any:
        eps = self.eps
        if eps == 0.0:
            return t
        return (1.0 - eps) * t + eps / t.shape[-1]

    def _binary_targets(self, q: Any) -> tuple[Any, Any]:
        """Positive and negative target weights ``(y', 1 - y')`` with ``y' = y(1-eps) + eps/2``,
        the negative one formed from ``1 - y`` (no cancellation)."""
        eps = self.eps
        if eps == 0.0:
            return q, 1 - q
        return (1.0 - eps) * q + eps / 2, (1.0 - eps) * (1 - q) + eps / 2

    # ------------------------------------------------------------------ loss
    def residual_names(self, path: str, keep: str = "stats") -> list[str]:
        """Names of the residuals :meth:`forward` returns for ``path`` (fixed by the head, so
        frameworks that trace can rely on them)."""
        focal = self.gamma != 0.0
        if keep != "stats":  # the logits as given ("z"): everything is recomputed
            names = ["z"]
        else:
            if path == "sigmoid":
                names = ["p", "q"] + (["nlp", "nlq"] if focal else [])
            elif path == "sparse":
                names = ["A", "den", "S", "gap", "Yy"]
            else:
                names = ["Y", "mask", "sp", "n", "den"] + (["zc", "m", "L"] if focal else [])
                if focal and self._carries_low_parts():  # the capped logits' low parts
                    names += ["z_lo", "m_lo"]
            # the logits as given for the soft-cap's slope; logsumexp for the z-loss gradient
            names += (["z"] if self.cap is not None else []) + (["lse"] if self.zl != 0.0 else [])
        return names + (["norm"] if self.head.reduction == "mean" else [])

    def _carries_low_parts(self) -> bool:
        """Whether :meth:`capped2` gives low parts with this engine's ops (for float32 or float64
        logits)."""
        return self.cap is not None and self.ops.compensate

    def forward(self, z: Any, prep: Prepared, keep: str = "stats") -> tuple[Any, dict[str, Any]]:
        """The reduced loss and the residuals for :meth:`backward` (named by
        :meth:`residual_names`).

        ``keep="stats"`` saves the softmax/sigmoid statistics the backward pass needs (eager
        frameworks: the backward pass is one multiply and a scatter; the sparse softmax path
        saves one ``(..., K)`` tensor, like ``F.cross_entropy``).  ``keep="inputs"`` saves only the
        logits and recomputes the rest (compilers such as XLA fuse the recomputation into the
        backward kernel)."""
        ops = self.ops
        gamma = self.gamma
        if self._unit:
            z = z[..., 0]
        found: dict[str, Any] = {"z": z}
        zc, lo = self.capped2(z)
        found["zc"] = zc
        if prep.path == "sigmoid":
            st = F.sigmoid_stats(ops, zc, lo)
            per = F.sigmoid_loss(ops, st, prep.a, prep.b, gamma)
            found.update(st._asdict())
        elif prep.path == "sparse":
            sst = F.softmax_sparse_stats(ops, zc, prep.y, lo)
            found.update(sst._asdict())
            per = F.softmax_sparse_loss(ops, zc, sst, self.eps)
            if self.zl != 0.0:
                found["lse"] = _lse(sst.m, sst.m_lo, sst.L[..., None])[..., 0]
        else:
            st = F.softmax_stats(ops, zc, lo)
            found.update(st._asdict())
            per = F.softmax_dense_loss(ops, zc, st, prep.tau, gamma)
            if self.zl != 0.0:
                found["lse"] = _lse(st.m, st.m_lo, st.L)[..., 0]
        if self.zl != 0.0:  # PaLM's z-loss, per example: two non-negative terms
            per = per + self.zl * (found["lse"] * found["lse"])
        loss, norm = self._reduce(per, prep.w)
        # residuals are arrays (frameworks save them for the backward pass)
        found["norm"] = ops.scalar(norm.n, loss) if isinstance(norm, _Count) else norm
        return loss, {name: found[name] for name in self.residual_names(prep.path, keep)}

    def loss_forward(
        self, z: Any, labels: Any, sample_weight: Any = None, keep: str = "stats"
    ) -> tuple[Any, dict[str, Any]]:
        """:meth:`prepare` then :meth:`forward`: the loss and residuals from validated inputs."""
        return self.forward(z, self.prepare(z, labels, sample_weight), keep=keep)

    def loss_backward(
        self, res: dict[str, Any], labels: Any, sample_weight: Any, g: Any, path: str
    ) -> Any:
        """:meth:`backward`, re-preparing the targets from the labels (cheaper to recompute than to
        keep: a multilabel head's targets are as large as the logits)."""
        like = next(res[name] for name in ("z", "Y", "A", "p", "q") if name in res)  # the logits' shape
        if self._unit:
            like = like[..., None]
        return self.backward(res, self.prepare(like, labels, sample_weight), g)

    def path_of(self) -> str:
        """Which formula family this head uses: ``"sigmoid"``, ``"sparse"`` (softmax over integer
        targets) or ``"dense"`` (softmax over target weights: one-hot, soft labels, a 2-unit
        binary head's ``pos_weight``, and focal loss, which needs every class's probability)."""
        head = self.head
        if head.activation == "sigmoid":
            return "sigmoid"
        if self.gamma != 0.0:
            return "dense"
        if head.task == "multiclass":
            return "sparse" if head.label_format == "sparse" else "dense"
        return "sparse" if (head.label_format == "binary" and head.pos_weight is None) else "dense"

    def _reduce(self, per: Any, w: Any) -> tuple[Any, Any]:
        """Weighted reduction.  Returns the loss and the normaliser the backward pass divides by
        (None for ``sum`` and ``none``; a :class:`_Count` for an unweighted mean)."""
        ops, xp = self.ops, self.ops.xp
        v = per if w is None else ops.where0(w > 0, w * per)
        sigmoid = self.head.activation == "sigmoid"
        k = self.head.num_outputs if sigmoid else 1
        red = self.head.reduction
        if red == "none":  # per example: the mean over the labels, summed accurately
            return (ops.row_sum(v)[..., 0] / k if k > 1 else v), None
        total = ops.total(v)
        if red == "sum":
            return (total / k if k > 1 else total), None
        if w is None:
            n = _size(per)
            if n is not None and (type(n) is not int or n > 0):  # every weight 1: divide by the count
                return total / n, _Count(n)
            wsum = ops.count(per)
        else:
            wsum = ops.total(w)
        safe = xp.where(wsum > 0, wsum, ops.scalar(1.0, wsum))
        return ops.where0(wsum > 0, total / safe), safe

    def _scale(self, prep: Prepared, g: Any, norm: Any) -> Any:
        """What the gradient of each example's (each element's) loss is multiplied by: the
        upstream gradient ``g`` (per example for ``none``) times its weight, over the normaliser
        for ``mean``, over K for a sigmoid head's ``sum`` and ``none`` (a Python number, 0-d or
        per-example array)."""
        xp = self.ops.xp
        labels_axis = prep.path == "sigmoid" and not self._unit  # one loss per (example, label)
        red = self.head.reduction
        if red == "none" and labels_axis:
            g = xp.expand_dims(g, axis=-1)
        elif red == "mean":
            g = g / norm
        if labels_axis and red != "mean":
            g = g / self.head.num_outputs
        return g if prep.w is None else prep.w * g

    def _apply_scale(self, grad: Any, scale: Any, prep: Prepared) -> Any:
        """``grad * scale`` (the scale broadcast over the class axis), and exactly 0 where the
        weight is 0 (even for non-finite logits)."""
        xp = self.ops.xp
        if prep.path != "sigmoid" and len(getattr(scale, "shape", ())) > 0:
            scale = xp.expand_dims(scale, axis=-1)
        grad = grad * scale
        if prep.w is None:
            return grad
        w = prep.w if prep.path == "sigmoid" else xp.expand_dims(prep.w, axis=-1)
        return self.ops.where0(w > 0, grad)

    def backward(self, res: dict[str, Any], prep: Prepared, g: Any) -> Any:
        """Gradient of the loss with respect to the logits, times the upstream gradient ``g``
        (a scalar, or per example for ``reduction="none"``), from :meth:`forward`'s residuals.

        With the z-loss, ``2 c lse p`` (times the example's scale) is added to the gradient with
        respect to the capped logits; with the soft-cap, that gradient is multiplied by the
        cap's slope ``sech(z / s)**2`` (:func:`~unihead.formulas.softcap_slope`)."""
        ops, xp = self.ops, self.ops.xp
        w = prep.w
        scale = self._scale(prep, g, res.get("norm"))
        recompute = set(res) <= {"z", "norm"}  # keep="inputs": only the logits were saved
        z = res.get("z")  # the logits as given (for the cap's slope)
        zc, lo = self.capped2(z) if recompute else (None, None)
        options = self.cap is not None or self.zl != 0.0
        if prep.path == "sigmoid":
            if recompute:
                st = F.sigmoid_stats(ops, zc, lo)
            else:
                st = F.SigmoidStats(res["p"], res["q"], res.get("nlp"), res.get("nlq"))
            grad = self._chain(F.sigmoid_grad(ops, st, prep.a, prep.b, self.gamma, scale), z)
            if w is not None:
                grad = ops.where0(w > 0, grad)
            return grad[..., None] if self._unit else grad
        if prep.path == "sparse":
            if recompute:
                sst = F.softmax_sparse_stats(ops, zc, prep.y, lo)
                res = dict(sst._asdict(), lse=_lse(sst.m, sst.m_lo, sst.L[..., None])[..., 0])
            live = None if w is None else w > 0
            # the ignored rows are zeroed before the scatter: one elementwise pass, not two
            grad = F.softmax_sparse_grad(
                ops, res["A"], res["den"], res["S"], prep.y, res["gap"], res["Yy"], self.eps, scale,
                live=None if options else live,
            )
            if not options:
                return grad
            if self.zl != 0.0:
                coef = (2.0 * self.zl) * (scale * res["lse"])
                grad = grad + F.z_loss_grad_sparse(ops, res["A"], res["den"], prep.y, res["Yy"], coef)
            grad = self._chain(grad, z)
            return grad if live is None else ops.where0(xp.expand_dims(live, axis=-1), grad)
        if recompute:
            st = F.softmax_stats(ops, zc, lo)
            res = dict(st._asdict(), zc=zc, lse=_lse(st.m, st.m_lo, st.L)[..., 0])
        st = F.SoftmaxStats(
            res.get("m"), res["Y"], res["mask"], res["sp"], res["n"], res["den"], res.get("L"),
            res.get("z_lo"), res.get("m_lo"),
        )
        grad = F.softmax_dense_grad(ops, res.get("zc"), st, prep.tau, self.gamma, scale)
        if self.zl != 0.0:
            coef = (2.0 * self.zl) * (scale * res["lse"])
            grad = grad + xp.expand_dims(coef, axis=-1) * (st.Y / st.den)
        grad = self._chain(grad, z)
        return grad if w is None else ops.where0(xp.expand_dims(w, axis=-1) > 0, grad)

    def _chain(self, grad: Any, z: Any) -> Any:
        """``grad`` (with respect to the capped logits) times the cap's slope at the logits ``z``
        as given: the gradient with respect to ``z``.  ``grad`` itself without a cap."""
        return grad if self.cap is None else grad * F.softcap_slope(self.ops, z, self.cap)


def _lse(m: Any, m_lo: Any, L: Any) -> Any:
    """``logsumexp`` of a row from its statistics ``(..., 1)``: ``m + L``, with the row maximum's
    low part (double-length capped logits) when there is one."""
    return m + L if m_lo is None else m + (m_lo + L)


class _Count:
    """The normaliser of an unweighted mean: the number of elements ``n`` (a Python int, or a
    symbolic size while tracing with dynamic shapes), not an array."""

    __slots__ = ("n",)

    def __init__(self, n: Any):
        self.n = n


def _size(x: Any) -> Any:
    """The number of elements of ``x``: a Python int, a symbolic size while a framework traces with
    dynamic shapes (divisions by it stay symbolic), or None where a dimension is unknown."""
    n = 1
    for d in x.shape:
        if d is None:
            return None
        n = n * d
    return n


def broadcast_prefix(xp: Any, x: Any, shape: tuple[int, ...]) -> Any:
    """Add trailing axes to ``x`` (whose shape is a prefix of ``shape``) to broadcast against it."""
    for _ in range(len(shape) - len(x.shape)):
        x = xp.expand_dims(x, axis=-1)
    return x
