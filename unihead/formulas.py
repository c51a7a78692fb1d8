"""The shared formulas: probabilities, losses and their analytic gradients, written once.

Every function takes an :class:`~unihead._ops.Ops` (an Array API namespace plus a few primitives)
and arrays of one floating dtype, and is pure: NumPy, PyTorch, JAX and Keras-on-TensorFlow
arrays all run this code.  The backends only add what is framework-specific (autodiff hooks,
layers, dtype/device handling).  ``docs/semantics.md`` states what is computed; this module is
how it is computed accurately.

Accuracy notes (float32, measured against 50-digit mpmath in the tests):

* Softmax.  With ``m = max(z)`` and ``d_j = z_j - m``, the loss of a confident, correct class is
  ``log(1 + S)`` with ``S = sum_{j not max} exp(d_j)`` tiny; ``logsumexp(z) - z_y`` returns 0 or
  noise there.  We sum ``S`` over the other classes only (the non-maximal ones for probabilities,
  the non-target ones for integer targets) and take ``log1p``.  What is left is
  the rounding of ``fl(z_j - m)``: for ``|d_j| ~ 30`` it costs ~15 ulp in ``exp(d_j)``.  That
  rounding error is recovered exactly by an error-free subtraction (TwoSum) and applied as
  ``exp(d_j) * (1 + err_j)``; or, where the backend fuses the formula into one loop (XLA), a
  float32 exponential of our own takes the error into its reduced argument, which costs fewer
  operations than ``exp`` and the correction (:func:`shifted_exp`).  Probabilities and losses then
  stay within a few ulp.
* Sigmoid.  ``softplus(x) = max(x, 0) + log1p(exp(-|x|))`` and ``sigmoid`` from ``exp(-|z|)`` on the
  side that does not cancel.
* Gradients are analytic (``p - t`` forms) with ``1 - p`` of the most probable class computed as
  ``S / (1 + S)``, never as a difference: autodiff through the accurate loss would reintroduce the
  cancellation.

Masked classes: a logit of ``-inf`` is a class with probability 0.  Logits further than
``exp_underflow_gap`` below the row maximum contribute exactly 0 and are clamped there before the
error-free subtraction (which would otherwise see ``-inf - -inf``).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, NamedTuple

from ._ops import Ops, exp_underflow_gap, two_sum_error

__all__ = [
    "SoftmaxStats",
    "SigmoidStats",
    "focal_power",
    "subtraction_error",
    "low_part_shift",
    "softmax_stats",
    "softmax_probabilities",
    "softmax_log_probabilities",
    "shifted_exp",
    "exp_poly_coefficients",
    "SparseStats",
    "softmax_sparse_stats",
    "softmax_sparse_loss",
    "softmax_sparse_grad",
    "sparse_loss_terms",
    "sparse_target_grad",
    "softmax_dense_loss",
    "softmax_dense_grad",
    "sigmoid_probabilities",
    "sigmoid_stats",
    "sigmoid_loss",
    "sigmoid_grad",
    "sparse_nll_wide",
    "sigmoid_hard_wide",
    "softcap",
    "softcap2",
    "softcap_slope",
    "z_loss_grad_sparse",
]


def focal_power(ops: Ops, x: Any, gamma: float) -> Any:
    """``x ** gamma`` for the focal factors.

    For gamma a multiple of 1/2 (0.5, 1, 1.5, 2, 3, ...) it is computed from ``sqrt`` and
    multiplications, which are correctly rounded everywhere: ``pow`` is less accurate on some
    backends (XLA's is ~2 ulp worse than libm's), and a float32 ``pow`` with a Python-float
    exponent rounds the exponent to float32.  Other exponents use ``x ** gamma`` (see
    docs/semantics.md §11)."""
    twice = 2.0 * gamma
    if twice != int(twice) or twice > 64:
        return x**gamma
    whole, half = int(twice) // 2, int(twice) % 2  # (Dynamo cannot trace divmod)
    result = ops.xp.sqrt(x) if half else None
    base = x
    while whole:  # binary powering of x**whole
        if whole & 1:
            result = base if result is None else result * base
        whole >>= 1
        if whole:
            base = base * base
    return result if result is not None else ops.xp.ones_like(x)


# ----------------------------------------------------------------------------------- softmax
def subtraction_error(ops: Ops, z: Any, m: Any, d: Any) -> Any:
    """Exact rounding error of ``d = fl(z - m)``: ``z - m == d + err`` exactly.

    TwoSum of ``z`` and ``-m`` (:func:`~unihead._ops.two_sum_error`): it needs no ordering of
    the operands by magnitude, so it is additions only, no compare or select (a Fast2Sum ordered
    by ``min``/``max`` costs more where ``min``/``max`` propagate NaN, as XLA's do); nothing
    overflows (``|d| <= 1024`` here).
    """
    return two_sum_error(z, -m, d)


def low_part_shift(ops: Ops, z: Any, m: Any, z_lo: Any, m_lo: Any) -> Any:
    """What the low parts of double-length logits add to ``z - m`` (:func:`softcap2`: the
    soft-capped logits are ``z + z_lo``, their row maximum ``m + m_lo``): ``z_lo - m_lo``, and 0
    where ``z == m``, so that a maximum's ``Y`` stays exactly 1 (logits equal in their rounded
    parts are taken as equal: their low parts differ by less than an ulp, and where the cap
    saturates, where such ties occur, by far less).  None when ``z_lo`` is None (no low parts:
    every formula then runs exactly what it runs without them)."""
    if z_lo is None:
        return None
    return ops.where0(z < m, z_lo - m_lo)


def _shift(z: Any, m: Any, dl: Any) -> Any:
    """``(z - m) + dl``: a logit's distance from the row maximum, with the low parts' share ``dl``
    (:func:`low_part_shift`) when there is one."""
    return z - m if dl is None else (z - m) + dl


def _row_max_low(ops: Ops, z: Any, z_lo: Any) -> Any:
    """The low part of the row maximum of double-length logits ``z + z_lo`` (at the first maximum of
    ``z``; keepdims), or None without low parts."""
    if z_lo is None:
        return None
    return ops.take_last(z_lo, ops.xp.argmax(z, axis=-1))[..., None]


def shifted_exp(ops: Ops, z: Any, m: Any, dl: Any = None) -> Any:
    """``Y = exp(z - m)`` with the subtraction's rounding error restored (``Y`` is exactly 1 where
    ``z == m``, 0 where ``z - m`` underflows); ``m`` broadcasts against ``z``.  ``dl``: what the
    low parts of double-length logits add to ``z - m`` (:func:`low_part_shift`; it is 0 where
    ``z == m``), applied to first order with the rounding error (``dl**2`` is below rounding).

    float32 on a backend with ``ops.poly_exp`` (XLA) takes :func:`_shifted_exp_poly`; otherwise
    ``exp(d)`` of ``d = fl(z - m)`` is corrected by the exact error of ``d`` (TwoSum), as follows.

    Logits below ``lo = m - exp_underflow_gap - |m| 2**-20`` are clamped to it first (their ``Y``
    is 0 either way; a ``-inf`` logit would give ``-inf - -inf`` in the error term).  The ``|m|``
    term keeps ``lo`` below ``m`` where ``m`` is so large (``|m| >= 2**31`` in float32) that
    ``m - exp_underflow_gap`` rounds back to ``m``: clamping there would give every logit of the
    row ``Y = 1``.  (Within 16 ulp of the most negative float, ``lo`` overflows to ``-inf`` and a
    ``-inf`` logit in that row gives NaN.)  The clamp keeps NaN (``where(z < lo, lo, z)``), so a
    NaN logit gives a NaN row even where a row maximum skips NaN."""
    xp = ops.xp
    bits = ops.bits(z)
    if bits == 64 and not ops.compensate:  # float64 carrying float32 results: 29 bits to spare
        return xp.exp(_shift(z, m, dl))
    if bits == 32 and ops.poly_exp:
        return _shifted_exp_poly(ops, z, m, dl)
    lo = (m - exp_underflow_gap(bits)) - xp.abs(m) * 2.0**-20
    zc = xp.where(z < lo, lo, z)
    d = zc - m
    err = subtraction_error(ops, zc, m, d)
    # exp(d + err) = exp(d) (1 + err) to within err**2 (below rounding); see Ops.corrected_exp for
    # the flush-to-zero-safe form on backends that flush subnormals (XLA on CPU).
    return ops.corrected_exp(xp.exp(d), err if dl is None else err + dl)


# A float32 exponential by Cody-Waite range reduction: exp(x) = 2**n exp(r), n = round(x / ln 2),
# r = x - n ln 2 with ln 2 split in two so that n * _LN2_HI is exact (15 significant bits, |n| <= 2**9).
_LOG2E = 1.4426950408889634
_LN2_HI = float.fromhex("0x1.62e4p-1")
_LN2_LO = float.fromhex("0x1.7f7d1cp-20")  # ln 2 - _LN2_HI, rounded to float32
#: ``exp(r) ~ 1 + r + r**2 Q(r)`` on ``|r| <= 0.3468`` (``ln(2)/2`` and a margin for the rounding
#: of ``n``): the coefficients of ``Q``, lowest degree first, float32 values of the minimax fit
#: (relative error 3.1e-9 before rounding) made by ``tools/fit_exp_polynomial.py``.
_EXP_Q = tuple(float.fromhex(h) for h in (
    "0x1.fffffcp-2", "0x1.555490p-3", "0x1.5558f4p-5", "0x1.123a36p-7", "0x1.6a23a8p-10"))


def exp_poly_coefficients() -> dict[str, Any]:
    """The constants of the float32 exponential of :func:`_shifted_exp_poly` (for tests/tools)."""
    return {"log2e": _LOG2E, "ln2_hi": _LN2_HI, "ln2_lo": _LN2_LO, "q": _EXP_Q}


def _shifted_exp_poly(ops: Ops, z: Any, m: Any, dl: Any = None) -> Any:
    """``exp(z - m)`` for float32 ``z`` with an exponential of our own that takes the rounding
    error of the subtraction into its reduced argument: within about 1 ulp (the polynomial's
    0.74 and one rounding of the argument), exactly 1 at ``z == m``.

    Per element it costs about what ``exp(z - m)`` alone costs in XLA (whose ``exp`` is the same
    kind of polynomial with clamps), where ``exp`` plus the TwoSum correction costs ~11 more
    operations.  Steps:

    * Shift by ``s``, ``m`` rounded to a multiple of ``2**-16`` (``s = m`` from ``|m| >= 2**8``):
      ``d = fl(z - s)``, and ``rr = m - s`` exactly (``|rr| <= 2**-17``).
    * Because ``s`` is a multiple of ``ulp(d)`` (``|d| < 128`` where it matters), the error of
      ``d`` is ``err = z - (d + s)`` exactly, two operations where TwoSum needs five.  Proof: ``d +
      s`` is a multiple of ``ulp(d)``; if ``z - s`` is inexact, ``z`` has bits below ``ulp(d)``,
      so ``|z| < |d|`` and ``|d + s| = |z - err| < 2**24 ulp(d)``: ``d + s`` is a float, computed
      exactly, and ``z - (d + s)`` is the rounding error of a sum, itself a float.
    * ``z - m = d + (err - rr)``.  ``n = round(d log2 e)``, ``r = (d - n LN2_HI) + ((err - rr) -
      n LN2_LO)``: the first part is exact (Sterbenz), the second tiny, one rounding in the sum.
      At ``z == m``, ``d = rr``, ``err = 0``, ``n = 0`` and ``r = 0`` exactly, so ``Y = 1``.
    * ``Y = (1 + r + r**2 Q(r)) * 2**n`` (``ops.pow2``).
    * ``d < -88`` (including ``-inf`` logits and rows so large that ``d`` overflows) is replaced by
      ``d = -88, err = 0``: then ``n = -127`` and ``2**n`` is exactly 0, so ``Y = 0``.  Results
      below ``2**-126.5`` are 0 (subnormal: flushed on XLA on CPU anyway); between that and
      ``2**-126`` they are subnormal products, flushed where the backend flushes.
    * NaN in ``z`` or ``m`` gives NaN; ``m = +-inf`` gives NaN (a row with ``+inf``, or only
      ``-inf``).
    * Above, ``z - m <= 88`` (every caller has ``z <= m``): ``2**n`` has no exponent for more.
    """
    xp = ops.xp
    big = xp.abs(m) >= 2.0**24  # integers already (and m * 2**16 could overflow)
    s = xp.where(big, m, xp.round(xp.where(big, 0.0, m) * 2.0**16) * 2.0**-16)
    rr = m - s
    d = z - s
    low = d < -88.0
    x = xp.where(low, ops.scalar(-88.0, d), d)
    err = ops.where0(~low, z - (x + s))
    if dl is not None:  # the low parts of double-length logits (0 at z == m)
        err = err + dl
    n = xp.round(x * _LOG2E)
    r = (x - n * _LN2_HI) + ((err - rr) - n * _LN2_LO)
    q = _EXP_Q
    p = q[4] * r + q[3]
    for c in (q[2], q[1], q[0], 1.0, 1.0):
        p = p * r + c
    return p * ops.pow2(n)


class SoftmaxStats(NamedTuple):
    """Per-row quantities of a softmax over the last axis (``...`` = leading dims, keepdims).

    ``m``: row maximum ``(..., 1)``.  ``Y``: ``exp(z - m)`` with the subtraction's rounding error
    restored, exactly 1 at the maxima, 0 for masked/underflowing classes ``(..., K)``.
    ``mask``: 1 where ``z < m``, 0 at the maxima ``(..., K)`` (a float 0/1 mask: compilers
    vectorise a multiply far better than a select inside a reduction).  ``sp``: sum of ``Y``
    over non-maximal classes; ``n``: number of maxima; ``den = sum Y = n + sp``;
    ``L = log(den)`` computed as ``log1p(n - 1 + sp)`` (all ``(..., 1)``).
    For double-length logits ``z + z_lo`` (:func:`softcap2`), ``z_lo`` and the row maximum's low
    part ``m_lo`` ``(..., 1)``; else None.
    """

    m: Any
    Y: Any
    mask: Any
    sp: Any
    n: Any
    den: Any
    L: Any
    z_lo: Any = None
    m_lo: Any = None


def softmax_stats(ops: Ops, z: Any, z_lo: Any = None) -> SoftmaxStats:
    """Accurate softmax statistics of logits ``z`` (``(..., K)``, float32 or float64), or of
    double-length logits ``z + z_lo`` (:func:`softcap2`).

    ``p_j = Y_j / den``; ``log p_j = (z_j - m) - L``; ``1 - p_j`` at a unique maximum is
    ``sp / den`` (no cancellation).  A row containing NaN or ``+inf``, or only ``-inf``, gives NaN.
    """
    xp = ops.xp
    m = xp.max(z, axis=-1, keepdims=True)
    m_lo = _row_max_low(ops, z, z_lo)
    Y = shifted_exp(ops, z, m, low_part_shift(ops, z, m, z_lo, m_lo))
    mask = xp.astype(z < m, z.dtype)
    sp = ops.row_sum(Y * mask)
    # The maxima contribute exactly 1 each to sum(Y); the sums are pairwise, so their rounding
    # (about log2(K) ulp of the row sum) is far below 1/2 and n is exact.  Summing Y rather than
    # the mask saves a (..., K) array where reductions need materialised inputs (XLA on CPU).
    den = ops.row_sum(Y)
    n = xp.round(den - sp)
    L = xp.log1p((n - 1) + sp)
    return SoftmaxStats(m, Y, mask, sp, n, den, L, z_lo, m_lo)


def softmax_probabilities(ops: Ops, st: SoftmaxStats) -> Any:
    """``p = softmax(z) = Y / den``."""
    return st.Y / st.den


def softmax_log_probabilities(ops: Ops, z: Any, st: SoftmaxStats) -> Any:
    """``log p_j = (z_j - m) - L``: a sum of two non-positive terms (``-inf`` for masked classes)."""
    return _shift(z, st.m, low_part_shift(ops, z, st.m, st.z_lo, st.m_lo)) - st.L


class SparseStats(NamedTuple):
    """What a softmax over integer targets ``y`` needs (``...`` = leading dims, no class axis
    except ``m`` ``(..., 1)`` and ``A`` ``(..., K)``).

    ``m``: row maximum.  ``A``: ``Y = exp(z - m)`` (as in :class:`SoftmaxStats`) off the target;
    its entry at the target is 0, or ``Yy`` where the backend keeps ``Y`` whole
    (:attr:`~unihead._ops.Ops.keep_whole_exp`), and every consumer overwrites it.  ``S``: the
    sum of ``Y`` over the other classes, their mass.  ``gap``: ``z_y - m`` (``<= 0``; exactly 0
    when the target is a maximum).  ``Yy``: ``Y`` at the target (exactly 1
    when ``gap == 0``).  ``den = Yy + S = sum Y``.  ``L = log(den)``, as ``log1p(S)`` when
    ``gap == 0``.  ``z_lo``, ``m_lo``: as in :class:`SoftmaxStats` (``gap`` includes them).
    """

    m: Any
    A: Any
    S: Any
    gap: Any
    Yy: Any
    den: Any
    L: Any
    z_lo: Any = None
    m_lo: Any = None


def softmax_sparse_stats(ops: Ops, z: Any, y: Any, z_lo: Any = None) -> SparseStats:
    """:class:`SparseStats` of logits ``z`` ``(..., K)`` for integer targets ``y`` ``(...)``.

    Summing the classes *other than the target* is what keeps a confident, correct prediction
    accurate: there ``p_y = 1 / (1 + S)`` and ``-log p_y = log1p(S)``, ``1 - p_y = S / (1 + S)``,
    with ``S`` tiny and summed directly (never ``sum(Y) - 1``).  Other maxima tied with the
    target are in ``S`` with ``Y = 1`` each, as they should be.  When the target is not a
    maximum, ``den >= 1 + Yy`` and ``-log p_y = log(den) - gap`` is a sum of two non-negative
    terms, the larger at least ``log 2``.  One ``(..., K)`` array and one reduction over it: the
    same passes as the plain ``logsumexp`` cross-entropy.  ``z_lo``: the low parts of
    double-length logits ``z + z_lo`` (:func:`softcap2`), or None."""
    xp = ops.xp
    m = xp.max(z, axis=-1, keepdims=True)
    m_lo = _row_max_low(ops, z, z_lo)
    Y = shifted_exp(ops, z, m, low_part_shift(ops, z, m, z_lo, m_lo))
    zy = ops.materialize(ops.take_last(z, y))  # read by gap, Yy and, through them, the loss
    dly = None if z_lo is None else low_part_shift(ops, zy, m[..., 0], ops.take_last(z_lo, y), m_lo[..., 0])
    gap = _shift(zy, m[..., 0], dly)  # unclamped: -inf for a masked target
    # Y at the target (exactly 1 when gap == 0), read before its entry is zeroed, and the other
    # classes' mass; whether the gradient gets Y whole or the zeroed copy (it overwrites the
    # target's entry) is the backend's choice (Ops.keep_whole_exp): the values are the same.  The
    # zeros come from Yy, not from a slice of Y (JAX refuses a slice of a class axis split over a
    # mesh's explicit axes).
    keep = ops.keep_whole_exp
    Yy = ops.take_last(Y, y) if keep else shifted_exp(ops, zy, m[..., 0], dly)
    others = ops.put_last(Y, y, xp.zeros_like(Yy))
    A = Y if keep else others
    S = ops.row_sum(others)[..., 0]
    den = Yy + S
    L = xp.where(gap == 0, xp.log1p(S), xp.log(den))
    return SparseStats(m, A, S, gap, Yy, den, L, z_lo, m_lo)


def softmax_sparse_loss(ops: Ops, z: Any, st: SparseStats, eps: float) -> Any:
    """Cross-entropy per row for integer targets with label smoothing ``eps``:

        l = -sum_c t'_c log p_c,   t' = (1 - eps) onehot(y) + eps / K
          = L - (1 - eps) (z_y - m) - (eps / K) sum_c (z_c - m)

    Every term is non-negative, so the sum keeps full relative accuracy.
    """
    dsum = None if eps == 0.0 else ops.xp.sum(
        _shift(z, st.m, low_part_shift(ops, z, st.m, st.z_lo, st.m_lo)), axis=-1)
    return sparse_loss_terms(ops, st.L, st.gap, eps, z.shape[-1], dsum)


def sparse_loss_terms(ops: Ops, L: Any, gap: Any, eps: float, k: int, dsum: Any = None) -> Any:
    """:func:`softmax_sparse_loss` from its per-row terms: ``L = log sum exp(z - m)``, ``gap = z_y -
    m`` and (with smoothing ``eps``) ``dsum = sum_c (z_c - m)`` over the ``k`` classes; shared with
    the fused linear loss (:mod:`unihead._fused`), which has the terms but not the logits."""
    if eps == 0.0:
        return L - gap
    return (L - (1.0 - eps) * gap) - (eps / k) * dsum


def sparse_target_grad(ops: Ops, S: Any, Yy: Any, den: Any, gap: Any, eps: float, k: int) -> Any:
    """``p_y - t'_y`` at the target for a unit scale, from the other classes' mass ``S``, the
    target's ``Yy`` and ``den = Yy + S``: ``eps (k-1)/k - q`` with ``q = S / den`` (``1 - p_y``
    without cancellation) where the target is a maximum (``gap == 0``), else ``p_y - (1 - eps +
    eps / k)`` with ``p_y = Yy / den`` (``<= 1/2``, the difference exact).  One quotient per row:
    the row's branch picks its numerator before the division."""
    r = ops.where_top(gap, S, Yy) / den
    return ops.where_top(gap, (eps * (k - 1) / k) - r, r - (1.0 - eps + eps / k))


def softmax_sparse_grad(
    ops: Ops, A: Any, den: Any, S: Any, y: Any, gap: Any, Yy: Any, eps: float, scale: Any,
    live: Any = None,
) -> Any:
    """``d(scale * l) / dz`` for :func:`softmax_sparse_loss`: ``scale * (p - t')``, from the
    :class:`SparseStats` fields ``A``, ``den``, ``S``, ``gap``, ``Yy``.

    Off the target ``p_j = A_j / den``.  At the target: if it is a maximum (``gap == 0``),
    ``p_y - t'_y = eps (K-1)/K - S / den`` (no cancellation as ``p_y -> 1``); otherwise
    ``p_y = Yy / den <= 1/2`` and the direct form is exact.  Rows where the boolean ``live``
    ``(...)`` is false get exactly 0 (even with non-finite logits).
    """
    xp = ops.xp
    k = A.shape[-1]
    c = xp.expand_dims(scale / den, axis=-1)
    if eps == 0.0:
        g = A * c
    else:
        g = ops.mul_add(xp.expand_dims(scale * (-eps / k), axis=-1), A, c)
    g_y = scale * sparse_target_grad(ops, S, Yy, den, gap, eps, k)
    if live is not None:
        g = ops.where0(xp.expand_dims(live, axis=-1), g)
        g_y = ops.where0(live, g_y)
    return ops.put_last(g, y, g_y)


class _DenseTerms(NamedTuple):
    p: Any  # probabilities
    q: Any  # 1 - p, accurate at the maximum
    nlp: Any  # -log p
    f: Any  # per-class loss factor: (1-p)^gamma * (-log p)
    g: Any  # per-class gradient factor (1 when gamma == 0)


def _dense_terms(ops: Ops, z: Any, st: SoftmaxStats, gamma: float, need_nlp: bool) -> _DenseTerms:
    xp = ops.xp
    p = st.Y / st.den
    at_max = st.mask == 0
    q_max = ((st.n - 1) + st.sp) / st.den
    q = xp.where(at_max, q_max, 1 - p)
    if need_nlp or gamma != 0.0:
        nlp = st.L - _shift(z, st.m, low_part_shift(ops, z, st.m, st.z_lo, st.m_lo))
    if gamma == 0.0:
        return _DenseTerms(p, q, nlp if need_nlp else None, nlp if need_nlp else None, None)
    qg = focal_power(ops, q, gamma)
    f = qg * nlp
    # g = (1-p)^gamma * (1 + gamma * p * rho), rho = -log(p) / (1 - p)  (>= 1, -> 1 as p -> 1)
    one = ops.scalar(1.0, q)
    rho = xp.where(q > 0, nlp / xp.where(q > 0, q, one), one)
    prho = ops.where0(p > 0, p * rho)
    g = qg * (1 + gamma * prho)
    return _DenseTerms(p, q, nlp, f, g)


def softmax_dense_loss(ops: Ops, z: Any, st: SoftmaxStats, tau: Any, gamma: float) -> Any:
    """Per-row ``l = -sum_c tau_c (1 - p_c)^gamma log p_c`` for non-negative target weights ``tau``
    (``(..., K)``: smoothed one-hot or soft labels, times per-class factors such as a binary
    head's ``pos_weight``).  ``0 * log 0`` is 0: a masked class costs nothing unless it has target
    mass, then the loss is ``+inf``."""
    xp = ops.xp
    terms = _dense_terms(ops, z, st, gamma, need_nlp=True)
    return xp.sum(ops.where0(tau > 0, tau * terms.f), axis=-1)


def softmax_dense_grad(
    ops: Ops, z: Any, st: SoftmaxStats, tau: Any, gamma: float, scale: Any
) -> Any:
    """Gradient of ``scale * softmax_dense_loss``:

        dl/dz_j = p_j (V - v_j) - v_j (1 - p_j),   v_c = tau_c g_c,  V = sum_c v_c

    with ``g_c = (1-p_c)^gamma (1 + gamma p_c (-log p_c)/(1 - p_c))`` (``g = 1`` without focal,
    giving ``T p_j - tau_j``).  At a maximum, ``V - v_j`` is summed from the other classes
    (never formed as a difference) and ``1 - p_j`` is ``(n - 1 + sp)/den``.  ``z`` (with ``st.m``
    and ``st.L``) is only read with focal loss.
    """
    xp = ops.xp
    terms = _dense_terms(ops, z, st, gamma, need_nlp=False)
    v = tau if terms.g is None else tau * terms.g
    v = ops.where0(tau > 0, v)
    V = ops.row_sum(v)
    R = ops.row_sum(v * st.mask)  # over non-maximal classes
    M = ops.row_sum(v * (1 - st.mask))  # over maximal classes (exact for a unique maximum)
    others = xp.where(st.mask == 0, R + (M - v), V - v)
    return xp.expand_dims(scale, axis=-1) * (terms.p * others - v * terms.q)


# ----------------------------------------------------------------------------------- sigmoid
class SigmoidStats(NamedTuple):
    """Elementwise sigmoid quantities: ``p = sigmoid(z)``, ``q = 1 - p``,
    ``nlp = -log p = softplus(-z)``, ``nlq = -log(1 - p) = softplus(z)``."""

    p: Any
    q: Any
    nlp: Any
    nlq: Any


def sigmoid_probabilities(ops: Ops, z: Any, z_lo: Any = None) -> tuple[Any, Any, Any]:
    """``(p, 1 - p, t)`` with ``t = exp(-|z|)``: ``sigmoid(|z|) = 1/(1+t)``,
    ``sigmoid(-|z|) = t/(1+t)``, each taken on the side that does not cancel.  For double-length
    logits ``z + z_lo`` (:func:`softcap2`), ``t = exp(-|z|) (1 -+ z_lo)`` (``|z + z_lo| = |z| +-
    z_lo``; to first order)."""
    xp = ops.xp
    t = xp.exp(-xp.abs(z))
    if z_lo is not None:
        t = ops.corrected_exp(t, xp.where(z < 0, z_lo, -z_lo))
    inv = 1 / (1 + t)
    tinv = t * inv
    pos = z >= 0
    return xp.where(pos, inv, tinv), xp.where(pos, tinv, inv), t


def sigmoid_stats(ops: Ops, z: Any, z_lo: Any = None) -> SigmoidStats:
    """Sigmoid quantities with ``softplus(+-z) = max(+-z, 0) + log1p(exp(-|z|))``.
    ``z = +-inf`` give the limits (p in {0, 1}, one softplus 0, the other +inf).  ``z_lo``: the
    low parts of double-length logits ``z + z_lo`` (:func:`softcap2`), or None."""
    xp = ops.xp
    p, q, t = sigmoid_probabilities(ops, z, z_lo)
    l = xp.log1p(t)
    zero = ops.scalar(0.0, z)
    if z_lo is None:
        nlp = xp.maximum(-z, zero) + l
        nlq = xp.maximum(z, zero) + l
    else:  # max(-(z + z_lo), 0) = -z - z_lo where z < 0
        nlp = xp.maximum(-z, zero) + (l - ops.where0(z < 0, z_lo))
        nlq = xp.maximum(z, zero) + (l + ops.where0(z > 0, z_lo))
    return SigmoidStats(p, q, nlp, nlq)


def sigmoid_loss(ops: Ops, st: SigmoidStats, a: Any, b: Any, gamma: float) -> Any:
    """Elementwise ``l = a (1-p)^gamma (-log p) + b p^gamma (-log(1-p))``.

    ``a`` is the positive target weight (``pos_weight * y'``), ``b`` the negative one (``1 - y'``);
    a term with zero weight is 0 even where its log is infinite."""
    if gamma == 0.0:
        fa, fb = st.nlp, st.nlq
    else:
        fa = focal_power(ops, st.q, gamma) * st.nlp
        fb = focal_power(ops, st.p, gamma) * st.nlq
    return ops.where0(a > 0, a * fa) + ops.where0(b > 0, b * fb)


def sigmoid_grad(ops: Ops, st: SigmoidStats, a: Any, b: Any, gamma: float, scale: Any) -> Any:
    """Gradient of ``scale * sigmoid_loss`` (elementwise):

        gamma = 0:  -a (1 - p) + b p
        gamma > 0:  -a (1-p)^gamma (gamma p (-log p) + 1 - p) + b p^gamma (gamma (1-p) (-log(1-p)) + p)
    """
    if gamma == 0.0:
        return scale * (b * st.p - a * st.q)
    pnlp = ops.where0(st.p > 0, st.p * st.nlp)
    qnlq = ops.where0(st.q > 0, st.q * st.nlq)
    ga = focal_power(ops, st.q, gamma) * (gamma * pnlp + st.q)
    gb = focal_power(ops, st.p, gamma) * (gamma * qnlq + st.p)
    return scale * (b * gb - a * ga)


# ------------------------------------------------------------------- logit soft-capping, z-loss
def _split_quotient(ops: Ops, z: Any, s: float) -> tuple[Any, Any]:
    """``x = fl(z / s)`` and ``x_lo``, the division's rounding error: ``x + x_lo = z / s`` to far
    below ``x``'s last place.  ``s`` is taken in ``z``'s dtype (docs/semantics.md §5).

    ``x * s`` is formed exactly as a double-length product (Veltkamp's splits of ``x`` and ``s``,
    no FMA needed), so ``r = z - x s`` is exact (Sterbenz) and ``x_lo = r / s``.  Where
    ``sech(x)**2`` is a normal number (``|x| < 64`` in float32, ``< 400`` in float64; beyond, the
    slope underflows and ``tanh`` is 1), and for caps whose split cannot overflow; elsewhere (and
    for non-finite ``z``) ``x_lo`` is 0."""
    xp = ops.xp
    sd = ops.scalar(s, z)
    x = z / sd
    bits = ops.bits(x)
    if abs(s) > 2.0 ** (100 if bits == 32 else 900):  # the split of s would overflow
        return x, xp.zeros_like(x)
    split = float(2 ** (27 if bits == 64 else 12) + 1)  # Veltkamp: a = hi + lo, each half-length
    small = xp.abs(x) < (400.0 if bits == 64 else 64.0)
    xs = ops.where0(small, x)
    c = xs * split
    hi = c - (c - xs)
    lo = xs - hi
    c = sd * split
    s_hi = c - (c - sd)
    s_lo = sd - s_hi
    p = xs * sd
    err = ((hi * s_hi - p) + hi * s_lo + lo * s_hi) + lo * s_lo  # x s - fl(x s), exactly
    r = (ops.where0(small, z) - p) - err  # z - x s
    return x, r / sd


def softcap(ops: Ops, z: Any, s: float) -> Any:
    """The soft-capped logits ``s * tanh(z / s)`` (Gemma 2), in ``z``'s dtype.  ``z = +-inf``
    give ``+-s``, as the formula (and every native implementation) does; NaN stays NaN.

    ``tanh(z / s)`` is ``tanh(x) + x_lo sech**2(x)`` with ``x + x_lo = z / s``
    (:func:`_split_quotient`): the division's rounding, carried through ``tanh``'s slope, would
    otherwise cost up to an ulp more.  The result is a few roundings from exact; its error is
    *absolute* on the scale of ``s``, which the loss sees through differences of capped logits
    (docs/semantics.md §11)."""
    x, x_lo = _split_quotient(ops, z, s)
    return ops.scalar(s, z) * (ops.xp.tanh(x) + x_lo * _sech2(ops, x, None))


# ln(2)/4 as a sum of three float64 numbers (to ~2**-160) and 2**(-j/4), j = 1, 2, 3, as pairs (to
# ~2**-106): the constants of softcap2's exponential, rounded per dtype by _cap_constants.
_LN2_4 = ("0x1.62e42fefa39efp-3", "0x1.abc9e3b39803fp-58", "0x1.7b57a079a1934p-113")
_QUARTER_POW2 = (("0x1p0", "0x0p0"), ("0x1.ae89f995ad3adp-1", "0x1.7a1cd345dcc81p-55"),
                 ("0x1.6a09e667f3bcdp-1", "-0x1.bdd3413b26456p-55"),
                 ("0x1.306fe0a31b715p-1", "0x1.6f46ad23182e4p-56"))


def _exact(hexes: tuple[str, ...]) -> Fraction:
    return sum((Fraction(float.fromhex(h)) for h in hexes), Fraction(0))


def _round_bits(q: Fraction, p: int) -> float:
    """``q`` rounded to ``p`` significant bits (to nearest, ties to even), as a Python float."""
    if q == 0:
        return 0.0
    e = math.frexp(float(q))[1]  # 2**(e-1) <= |q| < 2**e, up to a rounding of float(q)
    while abs(q) >= Fraction(2) ** e:
        e += 1
    while abs(q) < Fraction(2) ** (e - 1):
        e -= 1
    return math.ldexp(round(q * Fraction(2) ** (p - e)), e - p)


class _CapConstants(NamedTuple):
    amax: float  # |x| beyond which u = exp(-2|x|) is taken as 0
    inv_c: float  # 1 / (ln 2 / 4)
    c: tuple[float, float, float]  # ln 2 / 4 in three pieces (Cody-Waite: k * c[0], k * c[1] exact)
    split: float  # Veltkamp's constant
    taylor: tuple[float, ...]  # 1/n! for n = 3, 4, ...
    pow_hi: tuple[float, ...]  # 2**(-k/4) = pow_hi[k] + pow_lo[k], k = 0 .. kmax
    pow_lo: tuple[float, ...]


def _cap_constants(bits: int) -> _CapConstants:
    """The constants of :func:`softcap2` in a dtype of ``bits`` (32 or 64), derived exactly (with
    fractions) from the hex values above; the table of ``2**(-k/4)`` scales four double-length
    constants by powers of two (exact: every entry is a normal number)."""
    p = 24 if bits == 32 else 53
    amax = 32.0 if bits == 32 else 64.0  # u <= exp(-64) ~ 2**-92 (float32), 2**-184 (float64)
    c = _exact(_LN2_4)
    kmax = int(2 * amax / c) + 2
    kb = kmax.bit_length()
    c1 = _round_bits(c, p - kb)
    c2 = _round_bits(c - Fraction(c1), p - kb)
    c3 = _round_bits(c - Fraction(c1) - Fraction(c2), p)
    terms = 8 if bits == 32 else 14  # the series' tail beyond r**(terms-1) / (terms-1)! is below 2**-p-16
    taylor = tuple(_round_bits(Fraction(1, math.factorial(n)), p) for n in range(3, terms))
    base = []
    for pair in _QUARTER_POW2:
        v = _exact(pair)
        h = _round_bits(v, p)
        base.append((h, _round_bits(v - Fraction(h), p)))
    hi = [math.ldexp(base[k % 4][0], -(k // 4)) for k in range(kmax + 1)]
    lo = [math.ldexp(base[k % 4][1], -(k // 4)) for k in range(kmax + 1)]
    split = float(2 ** (12 if bits == 32 else 27) + 1)
    return _CapConstants(amax, _round_bits(1 / c, p), (c1, c2, c3), split, taylor, tuple(hi), tuple(lo))


#: softcap2's constants by dtype width, made once at import (a few milliseconds): a plain constant
#: for tracers (Dynamo would otherwise trace the fraction arithmetic of a cached function).
_CAP_CONSTANTS = {bits: _cap_constants(bits) for bits in (32, 64)}


def _two_prod(a: Any, b: Any, split: float) -> tuple[Any, Any]:
    """``(p, err)`` with ``p = fl(a b)`` and ``a b = p + err`` exactly (Dekker's product from
    Veltkamp's splits: no FMA needed; exact unless a split overflows or a partial product
    underflows)."""
    p = a * b
    c = a * split
    ah = c - (c - a)
    al = a - ah
    c = b * split
    bh = c - (c - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _exp_neg2(ops: Ops, x: Any, x_lo: Any) -> tuple[Any, Any, Any, Any]:
    """``u = exp(-2|x + x_lo|)`` in double length for :func:`softcap2` and :func:`softcap_slope`:
    ``(ok, a, uh, ul)`` with ``uh + ul = u`` within ``2**-p-14`` (absolute) where ``ok`` (``a =
    |x| <= amax``; elsewhere, and for NaN, ``a = 0`` stands in and the caller selects).  The steps
    are :func:`softcap2`'s."""
    xp = ops.xp
    k_ = _CAP_CONSTANTS[ops.bits(x)]
    one = ops.scalar(1.0, x)
    a0 = xp.abs(x)
    ok = a0 <= k_.amax  # false beyond, and for NaN
    a = ops.where0(ok, a0)
    a_lo = ops.where0(ok, xp.where(x < 0, -x_lo, x_lo))
    # 2a = k c + r, r = rh + rl
    w = 2.0 * a
    k = xp.round(w * k_.inv_c)
    r1 = w - k * k_.c[0]  # exact (Sterbenz; k c[0] exact)
    kc2 = k * k_.c[1]
    rh = r1 - kc2
    rl = two_sum_error(r1, -kc2, rh) + (2.0 * a_lo - k * k_.c[2])
    # exp(v), v = -r: 1 + v + v**2/2 in double length, the tail P and v's low part to first order
    v = -rh
    sq, sqe = _two_prod(v, v, k_.split)
    h = 0.5 * sq
    s1 = one + v
    s1e = (one - s1) + v  # Fast2Sum, |v| < 1
    e_hi = s1 + h
    e2 = (s1 - e_hi) + h  # Fast2Sum, s1 > h
    tail = k_.taylor[-1]
    for coef in reversed(k_.taylor[:-1]):
        tail = tail * v + coef
    e_lo = ((s1e + e2) + 0.5 * sqe) + (sq * v * tail - rl * e_hi)
    e_new = e_hi + e_lo  # renormalised (Fast2Sum): the tail is far above e_hi's last place
    e_lo = e_lo - (e_new - e_hi)
    e_hi = e_new
    # u = exp(v) 2**(-k/4): the table's double-length constant
    idx = xp.astype(k, ops.index_dtype())
    th = ops.lookup(ops.asarray(k_.pow_hi, like=x), idx)
    tl = ops.lookup(ops.asarray(k_.pow_lo, like=x), idx)
    uh, ue = _two_prod(e_hi, th, k_.split)
    ul = ue + (e_hi * tl + e_lo * th)
    return ok, a, uh, ul


def softcap2(ops: Ops, z: Any, s: float) -> tuple[Any, Any]:
    """The soft-capped logits ``s tanh(z / s)`` in double length: ``(hi, lo)`` with ``hi =``
    the capped logit rounded to ``z``'s dtype (float32 or float64; no wider dtype needed) and
    ``hi + lo`` within ``2**-p / 16`` of the exact value for caps up to ``2**8`` (``p`` the
    dtype's precision, 24 or 53: an absolute bound, which is what differences of capped logits
    need; measured against mpmath: ``0.028 * 2**-p`` at ``s = 256``, ``0.003 * 2**-p`` at ``s =
    30``, growing about linearly with ``s``; ``|lo| <= ulp(hi) / 2``).  ``z = +-inf`` give
    ``(+-s, 0)``; NaN gives NaN.

    With ``x + x_lo = z / s`` (:func:`_split_quotient`), ``a = |x + x_lo|``:

    * ``a < 2**-8`` (float32; ``2**-17`` in float64): ``tanh(x) = x - x**3/3 + ...``, so ``hi +
      lo = z - z x**2 / 3`` (the ``x**5`` term is below ``2**-p-30`` of ``s`` there).
    * otherwise ``u = exp(-2a)`` in double length and ``tanh(a) = (1 - u) / (1 + u)``: ``2a = k
      ln(2)/4 + r`` (Cody-Waite, ``ln(2)/4`` in three pieces, ``|r| <= 0.087``), ``exp(-r) = 1 - r
      + r**2/2 + P`` with ``1 - r + r**2/2`` in double length (Fast2Sum, Dekker's product) and
      the Taylor tail ``P`` (``|P| < 2**-13``) in working precision, times ``2**(-k/4)`` from a
      table of double-length constants (exact power-of-two scalings made in Python, so no
      ``ldexp`` and no subnormal scale factor on any backend); the quotient in double length
      (the remainder from an exact product), then ``s t`` as an exact product plus ``s t_lo``.
      Every operation's error is below ``2**-p-12`` of ``t`` except the tail's rounding, under
      ``2**-p-14``.  Beyond ``a = 32`` (float32; 64 in float64) ``u < 2**-92`` is taken as 0.

    The error-free sequences rely on the compiler keeping the order of floating-point operations
    (XLA, Inductor and TensorFlow do, as for :func:`subtraction_error`)."""
    xp = ops.xp
    bits = ops.bits(z)
    if bits not in (32, 64):
        raise TypeError(f"softcap2 takes float32 or float64 logits, got {z.dtype}; cast the logits first")
    k_ = _CAP_CONSTANTS[bits]
    sd = ops.scalar(s, z)
    one = ops.scalar(1.0, z)
    x, x_lo = _split_quotient(ops, z, s)
    neg = x < 0
    ok, a, uh, ul = _exp_neg2(ops, x, x_lo)
    # t = (1 - u) / (1 + u), u <= 1
    nh = one - uh
    nl = ((one - nh) - uh) - ul
    dh = one + uh
    dl = ((one - dh) + uh) + ul
    t = nh / dh
    ph, pe = _two_prod(t, dh, k_.split)
    t_lo = (((nh - ph) - pe) + nl - t * dl) / dh
    # z' = s t, then the sign; tiny |x|: z - z x**2/3
    zh, ze = _two_prod(sd, t, k_.split)
    zl = ze + sd * t_lo
    zh = xp.where(neg, -zh, zh)
    zl = xp.where(neg, -zl, zl)
    tiny = a < 2.0 ** (-8 if bits == 32 else -17)
    zs, xs = ops.where0(ok, z), ops.where0(ok, x)  # finite: no inf - inf in the unselected branch
    zh = xp.where(tiny, zs, zh)
    zl = xp.where(tiny, -(zs * xs) * (xs * (1.0 / 3.0)), zl)
    hi = zh + zl
    lo = zl - (hi - zh)  # Fast2Sum: |zl| < |zh|
    # beyond amax: +-s (and NaN stays NaN)
    far = xp.abs(x) > k_.amax
    hi = xp.where(ok, hi, xp.where(far, xp.where(neg, -sd, sd), x))
    return hi, ops.where0(ok, lo)


def _sech2(ops: Ops, x: Any, x_lo: Any) -> Any:
    """``sech(x + x_lo)**2 = 4 u / (1 + u)**2`` with ``u = exp(-2|x + x_lo|)``, no cancellation
    at any ``x`` (``1 - tanh(x)**2`` loses every digit once ``tanh(x)`` rounds near 1).  The
    slope's relative condition number is ``2|x|``: ``x_lo`` (or None) goes into the
    exponential's argument, to first order (``x_lo**2`` is below rounding)."""
    xp = ops.xp
    u = xp.exp(-2.0 * xp.abs(x))
    if x_lo is not None:
        sgn = xp.where(x < 0, ops.scalar(-1.0, x), ops.scalar(1.0, x))
        u = u - u * (2.0 * sgn * x_lo)
    v = 1.0 + u
    return (4.0 * u) / (v * v)


def softcap_slope(ops: Ops, z: Any, s: float) -> Any:
    """``d/dz [s tanh(z / s)] = sech(z / s)**2`` to about an ulp at every ``z`` (0 at ``+-inf``,
    NaN at NaN), for the chain rule of a soft-capped head.

    ``4 u / (1 + u)**2`` from :func:`softcap2`'s double-length ``u = exp(-2|z/s|)``: two roundings
    (the square and the quotient; the low parts enter to first order), where ``exp`` of a
    rounded argument costs two to four ulp more (measured: 2.5 ulp at ``|z/s| <= 0.5``, 4.5 at
    ``|z/s| <= 5`` in float32 on XLA).  Beyond ``|z/s| = 32`` (float32; 64 in float64), where
    ``u`` is below double length's reach, and for other dtypes, :func:`_sech2`."""
    x, x_lo = _split_quotient(ops, z, s)
    if ops.bits(x) not in (32, 64):
        return _sech2(ops, x, x_lo)
    xp = ops.xp
    one = ops.scalar(1.0, x)
    ok, _, uh, ul = _exp_neg2(ops, x, x_lo)
    dh = one + uh
    dl = ((one - dh) + uh) + ul
    q = (4.0 * uh) / (dh * dh)
    q = q + q * (ul / uh - 2.0 * (dl / dh))
    return xp.where(ok, q, _sech2(ops, x, x_lo))


def z_loss_grad_sparse(ops: Ops, A: Any, den: Any, y: Any, Yy: Any, coef: Any) -> Any:
    """``coef * softmax(z)`` from the :class:`SparseStats` fields (``A`` off the target, ``Yy`` at
    it, over ``den``); ``coef`` ``(...)`` is ``scale * 2 c lse``: the z-loss term's gradient."""
    xp = ops.xp
    c = coef / den
    return ops.put_last(A * xp.expand_dims(c, axis=-1), y, Yy * c)


# ------------------------------------------------------------------------ the wide policy
# float32 logits evaluated in float64 (``Ops.wide``) and rounded once by the caller.  float64
# carries 29 bits more than the results need, so the plain formulas below, a few native kernels,
# give float32 values that are correctly rounded in nearly every case.  Two things still need care
# because float64 only moves a cancellation, it does not remove it: ``1 - p`` of a probable class
# (summed from the other classes, never formed as a difference) and a tiny loss (``log1p`` of that
# sum, never ``log`` of a number near 1).  These formulas are not accurate enough for float64
# *results*; float64 logits take the compensated formulas above.


def sparse_nll_wide(ops: Ops, z: Any, y: Any, eps: float, grad: bool = True) -> tuple[Any, Any]:
    """Per-row cross-entropy for integer targets ``y`` with label smoothing ``eps``, and its
    gradient ``p - t'`` (``t' = (1 - eps) onehot(y) + eps / K``), for float64 logits ``z`` that
    carry float32 values (``z`` is overwritten).  With ``d = z - max(z)``, ``e = exp(d)``:

        s = sum_{j != y} e_j              (the other classes' mass, summed directly)
        den = e_y + s,  L = log(den) = log1p(expm1(d_y) + s)
        -log p_y = L - d_y                (non-negative terms; log1p(s) when y is a maximum)
        l = (1 - eps) (L - d_y) + (eps / K) (K L - sum_c d_c)
        dl/dz_j = e_j / den - eps / K  (j != y),   dl/dz_y = (eps - eps / K) - s / den

    ``expm1(d_y) + s`` is ``s`` exactly when ``y`` is a maximum and at least ``e_y`` otherwise
    (then ``s >= 1``), so ``L`` keeps full relative accuracy; ``1 - p_y = s / den`` is never a
    difference.  Every value is a few float64 roundings from exact, far below float32's half ulp.
    A masked target (``z_y = -inf``) gives ``+inf``; a row with NaN or ``+inf``, or only ``-inf``,
    gives NaN.  Returns ``(l, grad)``, shapes ``(...)`` and ``(..., K)`` (``grad`` None unless
    asked for).  About twenty array operations, most of them in place: where each is a kernel
    launch (eager PyTorch), their number is the cost."""
    xp = ops.xp
    ix = ops.last_index(y)
    z -= xp.max(z, axis=-1, keepdims=True)
    dy = ops.take_last(z, ix)
    e = ops.zero_last(xp.exp(z), ix)
    s = xp.sum(e, axis=-1)
    t = xp.expm1(dy)
    t += s  # den - 1
    nll = xp.log1p(t)  # L
    if eps != 0.0:
        k = z.shape[-1]
        nll = (1.0 - eps) * (nll - dy) + (eps / k) * (k * nll - xp.sum(z, axis=-1))
    else:
        nll -= dy
    if not grad:
        return nll, None
    t += 1.0
    inv = ops.reciprocal(t)  # 1 / den
    s *= inv
    e *= xp.expand_dims(inv, axis=-1)
    if eps == 0.0:
        return nll, ops.put_last(e, ix, -s)
    k = z.shape[-1]
    e -= eps / k
    return nll, ops.put_last(e, ix, (eps - eps / k) - s)


def sigmoid_hard_wide(ops: Ops, z: Any, y: Any, grad: bool = True) -> tuple[Any, Any]:
    """Elementwise binary cross-entropy for hard labels ``y`` in {0, 1} and its gradient, for
    float64 logits ``z`` that carry float32 values (``z`` is overwritten).  With the sign
    ``r = 1 - 2y`` and ``v = r z``:

        l = softplus(v)          (softplus(-z) = -log p for y = 1, softplus(z) for y = 0)
        dl/dz = p - y = r sigmoid(v)   (1 - p taken as sigmoid(-z), never as a difference)

    ``z = +-inf`` give the limits (``l`` 0 or ``+inf``)."""
    r = 1.0 - 2.0 * y
    z *= r
    nll = ops.softplus(z)
    if not grad:
        return nll, None
    g = ops.sigmoid(z)
    g *= r
    return nll, g
