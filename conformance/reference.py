"""The independent reference: docs/semantics.md evaluated with plain formulas in mpmath.

This module shares no code with ``unihead.formulas`` or the backends: it is the second, plain
implementation that catches the first one's bugs.  (It measures in the library's unit, the ulp
of :mod:`unihead._ulp`: a unit of measure, not a formula.)  It uses the textbook definitions
(``p = exp(z) / sum exp(z)``, ``log p = z - log sum exp(z)``, ``p = 1 / (1 + exp(-z))``, the
derivative written out by hand) and gets accuracy from precision instead of from formula tricks:
every value is computed with :data:`DIGITS` significant decimal digits, enough that any result
representable in float64 (down to 1e-330, after cancellations between terms up to 1e+4350) is
exact to at least 50 digits.  It is slow (pure Python, one row at a time) and meant for small
cases; :mod:`unihead.conformance` derives float64 values for large cases from it.

Conventions written in docs/semantics.md: a soft-capped head reads ``s * tanh(z / s)`` (``s`` in
the logits' dtype) wherever it reads logits, ``+-inf`` giving ``+-s``; the z-loss adds
``c * logsumexp(z)**2`` to each example's loss before weighting; ``0 * log 0 = 0``; a softmax row with ``+inf`` or NaN,
or with every logit ``-inf``, is undefined (NaN); sigmoid logits ``+-inf`` are limits; an example
with weight 0 contributes exactly 0 to the loss and its gradient.
"""

from __future__ import annotations

import math
from typing import Any

import mpmath
import numpy as np

from unihead import _ulp
from unihead.spec import ClassificationHead

__all__ = ["DIGITS", "FLT_MIN", "DBL_MIN", "MPReference", "ulp32", "ulp64", "ulp_error"]

#: Working precision (decimal digits) of the reference.
DIGITS = 400

_NAN = mpmath.mpf("nan")
_INF = mpmath.mpf("inf")


def _mp(x: Any) -> Any:
    """Exact conversion of a float (float16/32/64 values are exactly representable)."""
    return mpmath.mpf(float(x))


def _isnan(x: Any) -> bool:
    return mpmath.isnan(x)


def ulp32(ref: Any) -> float:
    """Spacing of float32 at the magnitude of ``ref`` (subnormal spacing near 0): the float32
    ulp of :func:`unihead._ulp.spacing`."""
    return float(_ulp.spacing(float(ref), "float32"))


def ulp64(ref: Any) -> float:
    """Spacing of float64 at the magnitude of ``ref``: the float64 ulp of :func:`unihead._ulp.spacing`."""
    return float(_ulp.spacing(float(ref), "float64"))


#: Smallest normal float32 and float64: backends that flush subnormal numbers to zero (XLA on
#: CPU) cannot represent values below these (docs/semantics.md §11).
FLT_MIN = 2.0**-126
DBL_MIN = 2.0**-1022


def ulp_error(value: Any, ref: Any, dtype: str = "float32", scale: Any = None, floor: float = 0.0) -> float:
    """The largest ``|value - ref|`` in ulp of ``dtype`` (:func:`unihead._ulp.ulp_errors`: at
    ``max(|ref|, |scale|)``, after subtracting an absolute allowance ``floor``, the flush-to-zero
    allowance; non-finite values compare exactly), each difference taken exactly: ``ref`` is
    this reference's (mpf numbers), ``value`` floats or mpf, scalars or arrays alike."""
    v = [x if isinstance(x, mpmath.mpf) else _mp(x) for x in np.ravel(np.asarray(value, dtype=object))]
    r = np.ravel(np.asarray(ref, dtype=object))
    s = None if scale is None else [math.nan if x is None else float(x) for x in np.ravel(np.asarray(scale, dtype=object))]
    diff = [float(abs(a - b)) for a, b in zip(v, r)]  # rounded once, to float64's 53 bits
    return _ulp.ulp_error([float(a) for a in v], [float(b) for b in r], dtype, scale=s, floor=floor, difference=diff)


class MPReference:
    """Reference values of one head for given logits, labels and sample weights."""

    def __init__(self, head: ClassificationHead):
        self.head = head

    # ------------------------------------------------------------------ activations
    def _softmax_row(self, z: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
        """(p, log p, 1 - p) of one row, plain definitions."""
        if any(_isnan(v) or v == _INF for v in z) or all(v == -_INF for v in z):
            nan = [_NAN] * len(z)
            return nan, nan, nan
        e = [mpmath.exp(v) for v in z]
        s = mpmath.fsum(e)
        p = [x / s for x in e]
        logs = mpmath.log(s)
        logp = [v - logs if v != -_INF else -_INF for v in z]
        others = [mpmath.fsum(e[:j] + e[j + 1 :]) / s for j in range(len(z))]
        return p, logp, others

    @staticmethod
    def _sigmoid(v: Any) -> tuple[Any, Any, Any, Any]:
        """(p, 1 - p, log p, log(1 - p)) of one logit, plain definitions."""
        if _isnan(v):
            return _NAN, _NAN, _NAN, _NAN
        if v == _INF:
            return mpmath.mpf(1), mpmath.mpf(0), mpmath.mpf(0), -_INF
        if v == -_INF:
            return mpmath.mpf(0), mpmath.mpf(1), -_INF, mpmath.mpf(0)
        p = 1 / (1 + mpmath.exp(-v))
        q = 1 / (1 + mpmath.exp(v))
        return p, q, -mpmath.log(1 + mpmath.exp(-v)), -mpmath.log(1 + mpmath.exp(v))

    def _rows(self, z: np.ndarray) -> list[list[Any]]:
        """The logits the head reads, row by row: soft-capped when the head says so."""
        rows = [[_mp(v) for v in row] for row in z.reshape(-1, z.shape[-1])]
        s = self._cap(z)
        if s is None:
            return rows
        return [[v if _isnan(v) else s * mpmath.tanh(v / s) for v in row] for row in rows]

    def _cap(self, z: np.ndarray) -> Any:
        """The cap ``s`` as the compute dtype holds it (float32 for float32/bfloat16 logits), or None."""
        cap = self.head.logit_softcap
        if cap is None:
            return None
        return _mp(np.float64(cap) if np.asarray(z).dtype == np.float64 else np.float32(cap))

    def _slopes(self, z: np.ndarray) -> list[list[Any]] | None:
        """``d/dz s tanh(z / s) = 1 / cosh(z / s)**2`` per logit (0 at +-inf), or None without a cap."""
        s = self._cap(z)
        if s is None:
            return None
        out = []
        for row in z.reshape(-1, z.shape[-1]):
            out.append([
                _NAN if math.isnan(v) else mpmath.mpf(0) if math.isinf(v) else 1 / mpmath.cosh(_mp(v) / s) ** 2
                for v in row
            ])
        return out

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        with mpmath.workdps(DIGITS):
            out = []
            for row in self._rows(z):
                if self.head.activation == "softmax":
                    out.append(self._softmax_row(row)[0])
                else:
                    out.append([self._sigmoid(v)[0] for v in row])
        return np.array(out, dtype=object).reshape(z.shape)

    def log_probabilities(self, z: np.ndarray) -> np.ndarray:
        with mpmath.workdps(DIGITS):
            out = []
            for row in self._rows(z):
                if self.head.activation == "softmax":
                    out.append(self._softmax_row(row)[1])
                else:
                    out.append([self._sigmoid(v)[2] for v in row])
        return np.array(out, dtype=object).reshape(z.shape)

    def predict(self, z: np.ndarray) -> np.ndarray:
        head = self.head
        if head.task == "multiclass":  # s tanh(z / s) is increasing: the same first maximum
            return np.array([int(np.argmax(r)) for r in z.reshape(-1, z.shape[-1])]).reshape(z.shape[:-1])
        cut = z.dtype.type(math.log(head.threshold / (1 - head.threshold)))
        if head.logit_softcap is not None:  # compared exactly on the capped logits
            with mpmath.workdps(DIGITS):
                c = self._rows(z)
                if head.task == "binary" and head.binary_units == 2:
                    # s tanh(z / s) is increasing: at cut 0, z1 > z0 decides (the capped values of
                    # huge logits differ below any working precision)
                    out = [int(r[1] - r[0] > _mp(cut)) if cut != 0 else int(zr[1] > zr[0])
                           for r, zr in zip(c, z.reshape(-1, 2))]
                    return np.array(out, np.int64).reshape(z.shape[:-1])
                out = [[int(v > _mp(cut)) for v in r] for r in c]
                shape = z.shape[:-1] if head.task == "binary" else z.shape
                return np.array(out, np.int64).reshape(shape)
        if head.task == "binary":
            d = (z[..., 1] - z[..., 0]) if head.binary_units == 2 else z[..., 0]
            return (d > cut).astype(np.int64)
        return (z > cut).astype(np.int64)

    # ------------------------------------------------------------------ targets and weights
    def _targets(self, labels: np.ndarray, lead: tuple[int, ...], sw: np.ndarray | None):
        """Per example: (tau or (a, b) per output, weight(s)) as mpf lists."""
        head = self.head
        eps = _mp(head.label_smoothing)
        k = head.num_classes
        n = int(np.prod(lead, dtype=np.int64))
        if sw is None:
            s = np.ones(lead + ((k,) if head.task == "multilabel" else ()), dtype=np.float64)
        else:
            sw = np.asarray(sw, dtype=np.float64)
            full = lead + ((k,) if head.task == "multilabel" else ())
            s = np.broadcast_to(sw.reshape(sw.shape + (1,) * (len(full) - sw.ndim)), full)
        cw = [_mp(w) for w in head.class_weights] if head.class_weights is not None else None
        pw = head.pos_weight
        out = []
        if head.task == "multiclass":
            lab = labels.reshape(n, -1) if head.label_format != "sparse" else labels.reshape(n)
            s = s.reshape(n)
            for i in range(n):
                if head.label_format == "sparse":
                    y = int(lab[i])
                    if head.ignore_index is not None and y == head.ignore_index:
                        out.append((None, mpmath.mpf(0)))
                        continue
                    t = [mpmath.mpf(1 if c == y else 0) for c in range(k)]
                else:
                    t = [_mp(v) for v in lab[i]]
                tau = [(1 - eps) * tc + eps / k for tc in t]
                w = _mp(s[i]) * (mpmath.fsum(wc * tc for wc, tc in zip(cw, t)) if cw else 1)
                out.append((tau, w))
            return out
        if head.task == "binary":
            lab = labels.reshape(n)
            s = s.reshape(n)
            for i in range(n):
                if head.ignore_index is not None and lab[i] == head.ignore_index:
                    out.append((None, mpmath.mpf(0)))
                    continue
                q = _mp(lab[i])
                pos = (1 - eps) * q + eps / 2
                neg = 1 - pos
                if pw is not None:
                    pos = pos * _mp(pw)
                w = _mp(s[i]) * ((cw[0] * (1 - q) + cw[1] * q) if cw else 1)
                out.append(([neg, pos], w))
            return out
        lab = labels.reshape(n, k)
        s = s.reshape(n, k)
        pws = [_mp(pw)] * k if isinstance(pw, float) else ([_mp(v) for v in pw] if pw else None)
        for i in range(n):
            a, b, w = [], [], []
            for c in range(k):
                q = _mp(lab[i, c])
                pos = (1 - eps) * q + eps / 2
                a.append(pos * (pws[c] if pws else 1))
                b.append(1 - pos)
                w.append(_mp(s[i, c]) * (cw[c] if cw else 1))
            out.append(((a, b), w))
        return out

    # ------------------------------------------------------------------ losses and gradients
    def evaluate(
        self, z: np.ndarray, labels: Any, sample_weight: Any = None
    ) -> dict[str, Any]:
        """Per-example values (``reduction="none"``), the reduced loss, the gradient of the
        reduced loss (of the sum of per-example values for ``"none"``) with respect to ``z``, and
        ``grad_scale``: per gradient entry, the larger magnitude of the two terms whose difference
        it is (``p_j (V - v_j)`` and ``v_j (1 - p_j)``; equal to ``|grad|`` for hard labels), the
        scale at which a float computation can resolve it."""
        head = self.head
        z = np.asarray(z)
        labels = np.asarray(labels)
        lead = tuple(z.shape[:-1])
        if head.label_format in ("binary", "probabilities") and head.task == "binary" and labels.shape == lead + (1,):
            labels = labels[..., 0]
        gamma = _mp(head.focal_gamma)
        with mpmath.workdps(DIGITS):
            rows = self._rows(z)
            slopes = self._slopes(z)
            targets = self._targets(labels, lead, sample_weight)
            per, dper, sizes, weights = [], [], [], []
            for i, (row, (tgt, w)) in enumerate(zip(rows, targets)):
                if head.activation == "softmax":
                    l, d, sz = self._softmax_loss(row, tgt, gamma, w)
                else:
                    l, d, sz = self._sigmoid_loss(row, tgt, gamma, w)
                if slopes is not None:  # the chain rule through the cap
                    d = [g * c for g, c in zip(d, slopes[i])]
                    sz = [g * c for g, c in zip(sz, slopes[i])]
                per.append(l)
                dper.append(d)
                sizes.append(sz)
                weights.append(w if (head.activation == "softmax" or isinstance(w, list)) else [w])
            k = z.shape[-1]
            sig = head.activation == "sigmoid"
            if sig:
                none = [mpmath.fsum(li) / k for li in per]
                wtot = mpmath.fsum(mpmath.fsum(wi) for wi in weights)
            else:
                none = per
                wtot = mpmath.fsum(weights)
            total = mpmath.fsum(none)
            if head.reduction == "none":
                loss: Any = np.array(none, dtype=object).reshape(lead)
                scale = mpmath.mpf(1)
            elif head.reduction == "sum":
                loss = total
                scale = mpmath.mpf(1)
            else:
                loss = total * k / wtot if (sig and wtot > 0) else (total / wtot if wtot > 0 else mpmath.mpf(0))
                scale = (mpmath.mpf(k) / wtot if sig else 1 / wtot) if wtot > 0 else mpmath.mpf(0)
            f = scale / (k if sig else 1)
            grad = np.array([[g * f for g in d] for d in dper], dtype=object).reshape(z.shape)
            size = np.array([[g * f for g in d] for d in sizes], dtype=object).reshape(z.shape)
        return {
            "none": np.array(none, dtype=object).reshape(lead),
            "loss": loss,
            "grad": grad,
            "grad_scale": size,
        }

    def _softmax_loss(self, z: list[Any], tau: list[Any] | None, gamma: Any, w: Any):
        """Weighted per-example loss ``w * l`` and its gradient ``w * dl/dz`` (0 if ``w == 0``)."""
        k = len(z)
        if w == 0 or tau is None:
            return mpmath.mpf(0), [mpmath.mpf(0)] * k, [mpmath.mpf(0)] * k
        p, logp, q = self._softmax_row(z)
        if _isnan(p[0]):
            return _NAN, [_NAN] * k, [_NAN] * k

        def term(c: int) -> Any:  # -tau_c (1-p_c)^gamma log p_c with 0 log 0 = 0
            if tau[c] == 0:
                return mpmath.mpf(0)
            return -tau[c] * q[c] ** gamma * logp[c]

        loss = w * mpmath.fsum(term(c) for c in range(k))
        zc = _mp(self.head.z_loss)
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in z)) if zc != 0 else 0  # PaLM's log Z
        if zc != 0:
            loss = loss + w * zc * lse**2
        # d/dz_j of -(1-p_c)^gamma log p_c = -(delta_cj - p_j) g_c,
        # g_c = (1-p_c)^gamma - gamma p_c (1-p_c)^(gamma-1) log p_c
        g = []
        for c in range(k):
            if tau[c] == 0:
                g.append(mpmath.mpf(0))
            elif gamma == 0:
                g.append(mpmath.mpf(1))
            elif q[c] == 0:
                g.append(mpmath.mpf(0))
            else:
                g.append(q[c] ** gamma - gamma * p[c] * q[c] ** (gamma - 1) * (logp[c] if p[c] > 0 else 0))
        v = [tau[c] * g[c] for c in range(k)]
        grad, size = [], []
        for j in range(k):
            others = mpmath.fsum(v[:j] + v[j + 1 :])
            zterm = 2 * zc * lse * p[j]  # d(c lse**2)/dz_j
            grad.append(w * (p[j] * others - v[j] * q[j] + zterm))
            size.append(w * max(p[j] * others, v[j] * q[j], abs(zterm)))
        return loss, grad, size

    def _sigmoid_loss(self, z: list[Any], tgt: Any, gamma: Any, w: Any):
        k = len(z)
        if isinstance(w, list):  # multilabel: per-element weights
            a, b = tgt
            ws = w
        else:  # binary, one unit
            if w == 0 or tgt is None:
                return [mpmath.mpf(0)], [mpmath.mpf(0)], [mpmath.mpf(0)]
            neg, pos = tgt
            a, b, ws = [pos], [neg], [w]
        losses, grads, sizes = [], [], []
        for c in range(k):
            if ws[c] == 0:
                losses.append(mpmath.mpf(0))
                grads.append(mpmath.mpf(0))
                sizes.append(mpmath.mpf(0))
                continue
            p, q, logp, logq = self._sigmoid(z[c])
            if _isnan(p):
                losses.append(_NAN)
                grads.append(_NAN)
                sizes.append(_NAN)
                continue
            ta = 0 if a[c] == 0 else -a[c] * q**gamma * logp
            tb = 0 if b[c] == 0 else -b[c] * p**gamma * logq
            losses.append(ws[c] * (ta + tb))
            # d/dz: -a (1-p)^g [(1-p) - g p log p] - b p^g [g (1-p) log(1-p) - p]
            da = 0 if a[c] == 0 else -a[c] * q**gamma * (q - gamma * (p * logp if p > 0 else 0))
            db = 0 if b[c] == 0 else -b[c] * p**gamma * (gamma * (q * logq if q > 0 else 0) - p)
            grads.append(ws[c] * (da + db))
            sizes.append(ws[c] * max(abs(da), abs(db)))
        return losses, grads, sizes


class F64Reference:
    """The same definitions in vectorised float64 NumPy, for cases too large for mpmath.

    Written plainly and independently of ``unihead.formulas`` (no error-free transformations:
    in float64 the rounding of ``z - max`` is ~1e-16, invisible at float32 resolution), but
    accurate where a plain float64 formula would not be: ``1 - p`` of a class is the probability
    of the *other* classes, and the log-partition is ``log1p`` of the non-maximal mass.  Used for
    float32 and bfloat16 cases (checked against :class:`MPReference` on a sample, see
    tests/test_conformance.py); float64 cases use :class:`MPReference`.
    """

    def __init__(self, head: ClassificationHead):
        self.head = head

    # -- activations ---------------------------------------------------------------------
    @staticmethod
    def _softmax(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, log p, 1 - p) over the last axis."""
        with np.errstate(all="ignore"):
            k = z.shape[-1]
            first = np.argmax(z, axis=-1)[..., None]
            m = np.take_along_axis(z, first, axis=-1)
            e = np.exp(z - m)
            is_first = np.arange(k) == first
            rest = np.where(is_first, 0.0, e).sum(-1, keepdims=True)  # mass of the others
            den = 1.0 + rest
            p = e / den
            logp = (z - m) - np.log1p(rest)
            # 1 - p_j: the other classes' mass; for the first maximum that is `rest`
            q = np.where(is_first, rest, den - e) / den
            bad = ~np.isfinite(m) | np.isnan(z).any(-1, keepdims=True) | (z == np.inf).any(-1, keepdims=True)
            nan = np.full_like(z, np.nan)
            return np.where(bad, nan, p), np.where(bad, nan, logp), np.where(bad, nan, q)

    @staticmethod
    def _sigmoid(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(p, 1 - p, log p, log(1 - p))."""
        with np.errstate(all="ignore"):
            p = 1.0 / (1.0 + np.exp(-z))
            q = 1.0 / (1.0 + np.exp(z))
            logp = -np.where(z >= 0, np.log1p(np.exp(-z)), -z + np.log1p(np.exp(z)))
            logq = -np.where(z >= 0, z + np.log1p(np.exp(-z)), np.log1p(np.exp(z)))
            return p, q, logp, logq

    def _capped(self, z: Any) -> np.ndarray:
        """The logits the head reads, in float64: ``s * tanh(z / s)`` with the cap ``s`` as the
        compute dtype holds it (float32 for float32/bfloat16 logits)."""
        dt = np.asarray(z).dtype
        z = np.asarray(z, np.float64)
        cap = self.head.logit_softcap
        if cap is None:
            return z
        s = float(np.float64(cap) if dt == np.float64 else np.float32(cap))
        return s * np.tanh(z / s)

    def _slope(self, z: Any) -> np.ndarray | float:
        """``1 / cosh(z / s)**2`` (the cap's derivative; 0 at +-inf), or 1 without a cap."""
        cap = self.head.logit_softcap
        if cap is None:
            return 1.0
        dt = np.asarray(z).dtype
        s = float(np.float64(cap) if dt == np.float64 else np.float32(cap))
        with np.errstate(over="ignore"):
            return 1.0 / np.cosh(np.asarray(z, np.float64) / s) ** 2

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        z = self._capped(z)
        return self._softmax(z)[0] if self.head.activation == "softmax" else self._sigmoid(z)[0]

    def log_probabilities(self, z: np.ndarray) -> np.ndarray:
        z = self._capped(z)
        return self._softmax(z)[1] if self.head.activation == "softmax" else self._sigmoid(z)[2]

    # -- targets ------------------------------------------------------------------------
    def _targets(self, labels: np.ndarray, lead: tuple, sw: Any) -> tuple:
        """Per-output positive/target weights and per-example (or per-element) weights."""
        head = self.head
        eps = head.label_smoothing
        k = head.num_classes
        full = lead + ((k,) if head.task == "multilabel" else ())
        s = np.ones(full) if sw is None else np.broadcast_to(
            np.asarray(sw, np.float64).reshape(np.shape(sw) + (1,) * (len(full) - np.ndim(sw))), full)
        cw = None if head.class_weights is None else np.asarray(head.class_weights, np.float64)
        pw = head.pos_weight
        if head.task == "multiclass":
            if head.label_format == "sparse":
                y = np.asarray(labels)
                valid = np.ones(lead, bool) if head.ignore_index is None else y != head.ignore_index
                t = np.eye(k)[np.where(valid, y, 0)]
            else:
                valid = np.ones(lead, bool)
                t = np.asarray(labels, np.float64)
            tau = (1 - eps) * t + eps / k
            w = s * valid * ((t * cw).sum(-1) if cw is not None else 1.0)
            return tau, w
        q = np.asarray(labels, np.float64)
        if head.task == "binary":
            valid = np.ones(lead, bool) if head.ignore_index is None else q != head.ignore_index
            q = np.where(valid, q, 0.0)
            pos = (1 - eps) * q + eps / 2
            neg = (1 - eps) * (1 - q) + eps / 2
            pos = pos * (pw if pw is not None else 1.0)
            w = s * valid * ((cw[0] * (1 - q) + cw[1] * q) if cw is not None else 1.0)
            return (pos, neg), w
        pos = (1 - eps) * q + eps / 2
        neg = (1 - eps) * (1 - q) + eps / 2
        if pw is not None:
            pos = pos * np.asarray(pw, np.float64)
        w = s * (cw if cw is not None else 1.0)
        return (pos, neg), w

    # -- losses and gradients --------------------------------------------------------------
    def evaluate(self, z: Any, labels: Any, sample_weight: Any = None) -> dict[str, Any]:
        """Like :meth:`MPReference.evaluate`, as float64 arrays."""
        head = self.head
        slope = self._slope(z)
        z = self._capped(z)
        labels = np.asarray(labels)
        lead = z.shape[:-1]
        if head.task == "binary" and labels.shape == lead + (1,):
            labels = labels[..., 0]
        gamma = head.focal_gamma
        with np.errstate(all="ignore"):
            targets, w = self._targets(labels, lead, sample_weight)
            if head.activation == "softmax":
                if head.task == "binary":
                    pos, neg = targets
                    tau = np.stack([neg, pos], -1)
                else:
                    tau = targets
                p, logp, q = self._softmax(z)
                f = np.where(tau > 0, tau * q**gamma * -logp, 0.0)
                per = f.sum(-1)
                if gamma == 0:
                    g = np.ones_like(p)
                else:
                    ratio = np.where(q > 0, -logp / np.where(q > 0, q, 1.0), 1.0)
                    g = q**gamma * (1 + gamma * np.where(p > 0, p * ratio, 0.0))
                v = np.where(tau > 0, tau * g, 0.0)
                # the others' total for each class: V - v_j, except at the first maximum (sum the others)
                first = (np.arange(z.shape[-1]) == np.argmax(z, axis=-1)[..., None])
                others = np.where(first, np.where(first, 0.0, v).sum(-1, keepdims=True), v.sum(-1, keepdims=True) - v)
                t1, t2 = p * others, v * q
                dper, size = t1 - t2, np.maximum(np.abs(t1), np.abs(t2))
                if head.z_loss:  # + c lse**2 per example; its gradient 2 c lse p
                    m = z.max(-1, keepdims=True)
                    lse = m + np.log(np.exp(z - m).sum(-1, keepdims=True))
                    per = per + head.z_loss * lse[..., 0] ** 2
                    t3 = 2.0 * head.z_loss * lse * p
                    dper, size = dper + t3, np.maximum(size, np.abs(t3))
                wv = np.where(w > 0, w * per, 0.0)
                w_el = w[..., None]
            else:
                pos, neg = targets
                if head.task == "binary":
                    pos, neg, w_el = pos[..., None], neg[..., None], w[..., None]
                else:
                    w_el = w
                p, q, logp, logq = self._sigmoid(z)
                ta = np.where(pos > 0, -pos * q**gamma * logp, 0.0)
                tb = np.where(neg > 0, -neg * p**gamma * logq, 0.0)
                el = ta + tb
                da = np.where(pos > 0, -pos * q**gamma * (q - gamma * np.where(p > 0, p * logp, 0.0)), 0.0)
                db = np.where(neg > 0, -neg * p**gamma * (gamma * np.where(q > 0, q * logq, 0.0) - p), 0.0)
                dper, size = da + db, np.maximum(np.abs(da), np.abs(db))
                wv = np.where(w_el > 0, w_el * el, 0.0).mean(-1)
                w = w_el.mean(-1)
            total, wsum = wv.sum(), w.sum()
            if head.reduction == "none":
                loss, scale = wv, 1.0
            elif head.reduction == "sum":
                loss, scale = total, 1.0
            else:
                loss = total / wsum if wsum > 0 else 0.0
                scale = 1.0 / wsum if wsum > 0 else 0.0
            k = z.shape[-1] if head.activation == "sigmoid" else 1  # per-example value: mean over labels
            grad = np.where(w_el > 0, w_el * dper * slope, 0.0) * scale / k
            gsize = np.where(w_el > 0, w_el * size * slope, 0.0) * scale / k
        return {"none": wv, "loss": np.asarray(loss, np.float64), "grad": grad, "grad_scale": gsize}
