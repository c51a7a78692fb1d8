"""The fused linear + loss: the loss of ``hidden @ kernel + bias`` for a softmax head with integer
targets, computed through chunks of classes without ever holding the ``(N, V)`` logits or their
gradient (docs/api.md, ``linear_loss``).  Written once on the Array API with the backend's
:class:`~unihead._ops.Ops`, like :mod:`unihead.formulas`, whose formulas it uses chunk by chunk.

Two layers:

* **Row statistics and their merge** (:class:`RowStats`, :func:`chunk_stats`, :func:`merge_stats`,
  :func:`rescale_stats`, :func:`finish_rows`): what a set of classes (a chunk of the kernel's
  columns, or one worker's shard of them) contributes to each row's softmax, and how two disjoint
  sets combine.  A class-sharded (vocab-parallel) loss reduces the same fields over workers: the
  maximum of ``m``, then, after :func:`rescale_stats` to that maximum, the sums of ``s``/``s_lo``
  and ``t``/``t_lo``, and the maximum of ``zy``.
* **The chunked passes** (:func:`rows_forward`, :func:`rows_backward`): per-row losses from one
  pass over the class chunks, and a backward pass that recomputes each chunk's logits and
  accumulates the gradients of ``hidden``, ``kernel`` and ``bias``.  Backends wrap them in their
  autodiff (``torch.autograd.Function``, ``jax.custom_vjp``) as a function of per-row losses;
  weights and the reduction are the head's own (:meth:`unihead._engine.Engine._reduce`), applied
  to those rows by the framework's autodiff.

Accuracy (see docs/semantics.md §11 and tests/test_fused.py).  Each chunk's exponentials are
those of the dense path (:func:`unihead.formulas.shifted_exp`: the subtraction's rounding error
restored), relative to the chunk's maximum; the sums accumulate in float64 where the backend has
it for the logits' device (``Ops.accumulate64``), otherwise in the logits' dtype with every
merge's rounding error kept (TwoSum) in a second term.  The rescaling of a chunk's sum to the
row maximum, ``exp(m_chunk - m)``, is exactly 1 for the chunk holding the maximum and an
``exp`` of an exact float64 difference otherwise.  The per-row results (``log1p`` of the
other classes' mass for a confident row, the smoothing sum, ``1 - p`` of the target) are
formed in the accumulation dtype from these sums and rounded once.

The head's constants reach every step as one :class:`RowSpec` (:func:`row_spec`: the number of
classes, label smoothing, the focal exponent, the z-loss coefficient and the soft-cap), so an
option of the head cannot be dropped by one caller.  The two options (docs/semantics.md §5), each
in one place, shared by the fused and the class-sharded paths:

* ``logit_softcap = s``: each chunk's (each shard's) logits are capped, ``s tanh(z / s)``, before
  their statistics (:func:`chunk_stats`) and before the gradient's recomputation
  (:func:`chunk_grad`), whose result, the gradient with respect to the capped logits, is then
  multiplied by the cap's slope ``sech(z / s)**2`` (:func:`unihead.formulas.softcap_slope`)
  before the two matmuls.
* ``z_loss = c``: ``c * lse**2`` with ``lse = m + log(den)`` from the merged statistics (no second
  pass) is added to each row's loss after the focal factor (:func:`finish_rows`), as the dense
  path adds it; its gradient ``2 c lse p_j`` is one more per-row multiple of the chunk's
  exponentials (``RowFinal.zinv``, in :func:`chunk_grad`), the target's entry included.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from . import formulas as F
from ._ops import Ops, two_sum_error

__all__ = [
    "RowStats",
    "RowSpec",
    "row_spec",
    "unsupported",
    "check_linear",
    "check_chunk_size",
    "RowFinal",
    "accumulation_dtype",
    "chunk_stats",
    "rescale_stats",
    "merge_stats",
    "finish_rows",
    "chunk_grad",
    "chunk_size_for",
    "logits_stats",
    "logits_grad",
    "rows_forward",
    "rows_backward",
    "DEFAULT_CHUNK_ELEMENTS",
    "UNKNOWN_ROWS",
]

#: The number of logits one chunk holds (rows x classes) by default: 2**22 (16 MiB in float32).
#: Large enough that each chunk's matmul runs at the BLAS library's full rate and the Python
#: steps per chunk cost nothing next to it; small enough that a chunk and its few temporaries stay
#: far below the ``(N, V)`` logits (the point of the fused call).
DEFAULT_CHUNK_ELEMENTS = 1 << 22
#: The number of rows the default chunk size assumes where it is unknown while tracing (a
#: TensorFlow graph whose batch dimension is None): 1024 classes a chunk (:func:`chunk_size_for`).
UNKNOWN_ROWS = 4096
#: Chunks have at least this many classes (unless the head has fewer): narrower matmuls lose rate.
MIN_CHUNK_CLASSES = 128


def unsupported(head: Any) -> str | None:
    """Why ``head``'s loss cannot be fused (a sentence saying what to write instead), or None.

    Fused: softmax heads whose labels are class ids, the engine's ``sparse`` path (multiclass
    with ``sparse`` labels, a 2-unit binary head with binary labels and no ``pos_weight``), and
    focal loss on such heads without label smoothing (its gradient is the cross-entropy's times
    one factor per row).  The rest needs every class's target weight in every chunk."""
    instead = (
        "compute the logits and use compiled.loss(hidden @ kernel + bias, labels) (the dense "
        "path, which holds the (N, num_outputs) logits)"
    )
    what = None
    if head.activation != "softmax":
        what = (
            f"a {head.task} head with independent sigmoids"
            + (" (binary_units=1)" if head.task == "binary" else "")
        )
    elif head.task == "binary" and head.pos_weight is not None:
        what = "a binary head with pos_weight (a target weight on every class)"
    elif head.task == "binary" and head.label_format != "binary":
        what = f"a binary head with {head.label_format!r} labels (soft targets on both classes)"
    elif head.task == "multiclass" and head.label_format != "sparse":
        what = f"a head with {head.label_format!r} labels (a target weight on every class)"
    elif float(head.focal_gamma) != 0.0 and float(head.label_smoothing) != 0.0:
        what = "a focal head with label smoothing (focal factors on every class)"
    if what is None:
        return None
    return (
        f"linear_loss fuses softmax heads whose labels are class ids; this is {what}: {instead}."
    )


def floating(ops: Ops, x: Any) -> bool:
    """Whether ``x`` has a floating dtype the fused and class-sharded paths take (float16,
    bfloat16, float32, float64).  Half precision is asked first: NumPy's ``isdtype`` raises a
    raw TypeError on ml_dtypes' bfloat16."""
    return ops.is_half(x) or ops.is_floating(x)


def check_chunk_size(chunk_size: Any) -> int:
    """``chunk_size`` (classes per chunk) if it is a positive integer, else unihead's error."""
    import numbers

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive number of classes per chunk (or None: chosen from the "
            f"sizes); got {chunk_size!r}."
        )
    return int(chunk_size)


def check_linear(ops: Ops, head: Any, h: Any, w: Any, b: Any) -> None:
    """Shapes and dtypes of :meth:`~unihead.CompiledHead.linear_loss`'s arrays: ``h`` ``(...,
    D)``, ``w`` ``(D, num_outputs)`` (a transposed kernel gets the hint), ``b``
    ``(num_outputs,)``; one floating dtype for all three (float16, bfloat16, float32, float64)."""
    from ._validation import logits_dtype_error

    k = head.num_outputs
    for name, x in (("hidden", h), ("kernel", w), ("bias", b)):
        if x is not None and not floating(ops, x):
            err = logits_dtype_error(x.dtype)
            raise TypeError(str(err).replace("logits", name, 1).replace(
                "(the output layer's values before any activation)", "(the matmul's operands)"))
    hs, ws = tuple(h.shape), tuple(w.shape)
    if len(hs) == 0:
        raise ValueError(
            "hidden must have shape (..., in_features): the features of each example (a 0-d "
            "array has none)."
        )
    d = hs[-1]
    if len(ws) != 2 or ws != (d, k):
        hint = ""
        if len(ws) == 2 and ws == (k, d):
            hint = (
                " It looks transposed: the kernel's layout is (in_features, num_outputs), like "
                "Keras and Flax; a PyTorch nn.Linear.weight is (out, in), so pass linear.weight.T."
            )
        elif len(ws) == 2 and ws[1] == k:
            hint = f" The kernel has {ws[0]} input features and hidden has {d} (its last dimension)."
        raise ValueError(
            f"kernel must have shape (in_features, num_outputs) = ({d}, {k}) for this head "
            f"(num_outputs={k}) and hidden of shape {hs}; got {ws}.{hint}"
        )
    if b is not None and tuple(b.shape) != (k,):
        raise ValueError(f"bias must have shape (num_outputs,) = ({k},); got {tuple(b.shape)}.")
    dtypes = {str(x.dtype) for x in (h, w, b) if x is not None}
    if len(dtypes) > 1:
        raise TypeError(
            f"hidden, kernel and bias must have one dtype (the matmul's); got "
            f"{', '.join(f'{n} {x.dtype}' for n, x in (('hidden', h), ('kernel', w), ('bias', b)) if x is not None)}. "
            f"Cast them to one (e.g. hidden.to(kernel.dtype) or hidden.astype(kernel.dtype))."
        )


def chunk_size_for(n_rows: int, n_classes: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """The number of classes per chunk for ``n_rows`` rows: ``chunk_elements // n_rows`` rounded
    down to a multiple of :data:`MIN_CHUNK_CLASSES` (at least that, at most ``n_classes``).  At
    N = 4096 that is 1024 classes (128 chunks at V = 131072)."""
    c = max(int(chunk_elements) // max(int(n_rows), 1), MIN_CHUNK_CLASSES)
    c = (c // MIN_CHUNK_CLASSES) * MIN_CHUNK_CLASSES
    return max(1, min(c, int(n_classes)))


class RowSpec(NamedTuple):
    """The head's constants of the per-row loss (hashable: backends key compiled kernels by it and
    pass it to ``torch.autograd.Function`` / ``jax.custom_vjp`` as a static argument).

    ``k``: the number of classes; ``eps``: label smoothing; ``gamma``: the focal exponent;
    ``z_loss``: the coefficient ``c`` of ``c * lse**2``; ``cap``: ``s`` of the soft-cap
    ``s tanh(z / s)``, or None."""

    k: int
    eps: float
    gamma: float
    z_loss: float
    cap: float | None

    @property
    def smoothing(self) -> bool:
        return self.eps != 0.0


def row_spec(engine: Any) -> RowSpec:
    """The :class:`RowSpec` of a head's :class:`unihead._engine.Engine`: the one place the fused
    and class-sharded paths read the head's loss options."""
    cap = engine.cap
    return RowSpec(
        int(engine.head.num_outputs), float(engine.eps), float(engine.gamma), float(engine.zl),
        None if cap is None else float(cap),
    )


def capped(ops: Ops, z: Any, cap: float | None) -> tuple[Any, Any]:
    """The logits the head reads, ``(hi, lo)``: ``cap * tanh(z / cap)`` in double length
    (:func:`unihead.formulas.softcap2`: a capped logit is not a number of the dtype, and the loss
    reads differences of capped logits, so their rounding would cost ~``cap / 2`` ulp), or
    ``(z, None)`` without a cap."""
    return (z, None) if cap is None else F.softcap2(ops, z, cap)


class RowStats(NamedTuple):
    """What one set of classes contributes to each row's softmax (every field ``(N,)``).

    ``m``: the set's largest logit (``-inf`` where every logit of the set is ``-inf``), the
    logits' dtype.  ``s + s_lo``: the sum over the set's classes *other than the row's target* of
    ``exp(z - m)`` (each from :func:`unihead.formulas.shifted_exp`), in the accumulation dtype
    (:func:`accumulation_dtype`); ``s_lo`` carries the rounding errors of the merges.  ``zy``:
    the target's logit where the target is in the set, else ``-inf`` (the logits' dtype).
    ``t + t_lo``: the sum over the set of ``z - m`` (label smoothing; zeros without it), in the
    accumulation dtype.  ``n``: the number of classes in the set (a number, the same for every
    row).  ``m_lo``, ``zy_lo``: with a soft-cap, the low parts of the double-length capped logits
    ``m`` and ``zy`` (:func:`capped`; ``zy_lo`` is 0 where the target is not in the set; every
    exponential and ``t`` include the low parts, :func:`unihead.formulas.low_part_shift`), else None.

    Two disjoint sets merge with :func:`merge_stats`; merged over every class, the statistics
    give the loss and the gradient (:func:`finish_rows`).  The merge is associative and
    commutative up to rounding, so the sets can be chunks visited in any order or workers'
    shards reduced by collectives."""

    m: Any
    s: Any
    s_lo: Any
    zy: Any
    t: Any
    t_lo: Any
    n: Any
    m_lo: Any = None
    zy_lo: Any = None


def accumulation_dtype(ops: Ops, z: Any) -> Any:
    """The dtype the sums of :class:`RowStats` accumulate in for logits like ``z``: float64 for
    float32 logits where the backend has float64 on their device (``ops.accumulate64``), else
    the logits' own dtype (float64 logits; float32 without float64, e.g. JAX without x64)."""
    xp = ops.xp
    if z.dtype == xp.float32 and ops.accumulate64(z):
        return xp.float64
    return z.dtype


def _acc(ops: Ops, x: Any, acc: Any) -> Any:
    return x if x.dtype == acc else ops.xp.astype(x, acc)


def _row_sum(ops: Ops, x: Any, acc: Any) -> Any:
    """Sum over the class axis of a chunk, ``(N, C) -> (N,)``, in the accumulation dtype: a float64
    accumulation of float32 values, a compensated sum of float64 values (``Ops.row_sum``), or the
    library's float32 sum where there is no float64 (what the dense path does there)."""
    xp = ops.xp
    if acc != x.dtype:
        return xp.sum(x, axis=-1, dtype=acc)
    return ops.row_sum(x)[..., 0]


def chunk_stats(
    ops: Ops, z: Any, y: Any, start: Any, *, smoothing: bool = False, cap: float | None = None
) -> RowStats:
    """:class:`RowStats` of one chunk of logits ``z`` ``(N, C)``, the classes ``start ..
    start + C - 1``, for the targets ``y`` ``(N,)`` (global class ids; a row whose target is
    outside the chunk has ``zy = -inf`` and all of its classes in ``s``).  ``start``: a number,
    or a 0-d integer array (inside a compiled loop).  ``smoothing``: also sum ``z - m`` (``t``).
    ``cap``: the head's soft-cap (the statistics are those of the capped logits), or None.
    """
    xp = ops.xp
    z, z_lo = capped(ops, z, cap)
    acc = accumulation_dtype(ops, z)
    c = z.shape[-1]
    m = xp.max(z, axis=-1)
    # a chunk whose logits are all -inf has m = -inf: its exponentials are taken against 0 (they
    # are 0), so that no -inf - -inf appears; its t is -inf through z itself
    m0 = xp.where(m == -float("inf"), ops.scalar(0.0, m), m)
    m_lo = None if z_lo is None else ops.take_last(z_lo, xp.argmax(z, axis=-1))
    m0e = xp.expand_dims(m0, axis=-1)
    dl = None if z_lo is None else F.low_part_shift(ops, z, m0e, z_lo, xp.expand_dims(m_lo, axis=-1))
    Y = F.shifted_exp(ops, z, m0e, dl)
    yl = y - start
    iota = xp.arange(c, dtype=y.dtype, device=ops.device(y))
    hit = xp.expand_dims(yl, axis=-1) == iota  # (N, C): the target's column, if in the chunk
    s = _row_sum(ops, ops.where0(~hit, Y), acc)
    inside = (yl >= 0) & (yl < c)
    yi = xp.where(inside, yl, xp.zeros_like(yl))
    zy = xp.where(inside, ops.take_last(z, yi), ops.scalar(-float("inf"), m))
    zy_lo = None if z_lo is None else ops.where0(inside, ops.take_last(z_lo, yi))
    zero = xp.zeros_like(s)
    if smoothing:
        t = _row_sum(ops, _acc(ops, z, acc) - _acc(ops, m0e, acc), acc)
        if dl is not None:
            t = t + _row_sum(ops, _acc(ops, dl, acc), acc)
    else:
        t = zero
    return RowStats(m, s, zero, zy, t, zero, c, m_lo, zy_lo)


def _factor(ops: Ops, m_old: Any, m_new: Any, acc: Any, dl: Any = None) -> Any:
    """``exp(m_old - m_new + dl)`` (``m_old <= m_new``; ``dl``: the low parts' share,
    :func:`unihead.formulas.low_part_shift`, or None) in the accumulation dtype: exactly 1 where they are equal (also
    both ``-inf``), 0 for ``m_old = -inf``; NaN where ``m_new`` is NaN or ``+inf`` (the row is
    NaN, as on the dense path)."""
    xp = ops.xp
    if acc != m_old.dtype:  # float32 maxima: their difference is exact in float64
        d = _acc(ops, m_old, acc) - _acc(ops, m_new, acc)
        f = xp.exp(d if dl is None else d + _acc(ops, dl, acc))
    else:
        f = F.shifted_exp(ops, m_old, m_new, dl)  # the subtraction's rounding error restored
    return xp.where(m_old == m_new, xp.ones_like(f), f)


def rescale_stats(ops: Ops, st: RowStats, m: Any, m_lo: Any = None) -> RowStats:
    """``st`` relative to a larger maximum ``m`` (``(N,)``, ``m >= st.m``: the maximum over more
    classes, e.g. all-reduced over workers; ``m_lo`` its low part with a soft-cap): ``s`` times
    ``exp(st.m - m)``, ``t`` plus ``n (st.m - m)`` (the low parts' difference included).  Sets
    rescaled to the same ``m`` merge by adding ``s``, ``s_lo``, ``t``, ``t_lo``, ``n`` and
    ``zy_lo`` and taking the maximum of ``zy``."""
    xp = ops.xp
    acc = st.s.dtype
    dl = F.low_part_shift(ops, st.m, m, st.m_lo, m_lo)
    f = _factor(ops, st.m, m, acc, dl)
    same = st.m == m
    d = _acc(ops, st.m, acc) - _acc(ops, m, acc)
    if dl is not None:
        d = d + _acc(ops, dl, acc)
    shift = xp.where(same, xp.zeros_like(st.t), d)
    # n * shift: -inf for a set of -inf logits, whose t is -inf already
    return RowStats(m, st.s * f, st.s_lo * f, st.zy, st.t + st.n * shift, st.t_lo, st.n, m_lo, st.zy_lo)


def _add(ops: Ops, a: Any, a_lo: Any, b: Any, b_lo: Any) -> tuple[Any, Any]:
    """``(a + a_lo) + (b + b_lo)`` as a new ``(hi, lo)`` pair: the rounding error of ``a + b`` is
    recovered exactly (TwoSum) and kept in ``lo`` (where finite)."""
    s = a + b
    e = two_sum_error(a, b, s)
    e = ops.where0(ops.xp.isfinite(e), e)
    return s, (a_lo + b_lo) + e


def merge_stats(ops: Ops, a: RowStats, b: RowStats) -> RowStats:
    """The :class:`RowStats` of the union of two disjoint sets of classes: both rescaled to the
    larger maximum (:func:`rescale_stats`), their sums added with the rounding error kept, the
    target logit from whichever set holds it.  NaN in a row's logits gives NaN statistics."""
    xp = ops.xp
    m = xp.maximum(a.m, b.m)
    m_lo = None if a.m_lo is None else xp.where(a.m >= b.m, a.m_lo, b.m_lo)
    a, b = rescale_stats(ops, a, m, m_lo), rescale_stats(ops, b, m, m_lo)
    s, s_lo = _add(ops, a.s, a.s_lo, b.s, b.s_lo)
    t, t_lo = _add(ops, a.t, a.t_lo, b.t, b.t_lo)
    zy_lo = None if a.zy_lo is None else a.zy_lo + b.zy_lo  # 0 in the set without the target
    return RowStats(m, s, s_lo, xp.maximum(a.zy, b.zy), t, t_lo, a.n + b.n, m_lo, zy_lo)


class RowFinal(NamedTuple):
    """Per-row results of the statistics over every class (:func:`finish_rows`), ``(N,)`` each.

    ``loss``: the per-row loss (the logits' dtype).  What the gradient needs, in the logits'
    dtype: ``m`` (the row maximum), ``inv`` (``1 / sum exp(z - m)``), ``gy`` (``p_y - t'_y``, the
    gradient at the target for a unit scale, without cancellation), ``mult`` (a per-row factor of
    the cross-entropy's gradient: the focal factor, 1 otherwise), ``zinv`` (``2 c lse / sum
    exp(z - m)``: the z-loss gradient ``2 c lse p_j`` is ``zinv * exp(z_j - m)``; 0 without a
    z-loss), ``m_lo`` (the low part of the capped row maximum; 0 without a soft-cap)."""

    loss: Any
    m: Any
    inv: Any
    gy: Any
    mult: Any
    zinv: Any
    m_lo: Any


def finish_rows(ops: Ops, st: RowStats, spec: RowSpec) -> RowFinal:
    """The per-row loss of a softmax head with integer targets over every class from their merged
    statistics, and what :func:`chunk_grad` needs (:class:`RowFinal`): the formulas of the dense
    path (:func:`unihead.formulas.sparse_loss_terms`, :func:`unihead.formulas.sparse_target_grad`)
    in the accumulation dtype, rounded once.

    ``spec.eps``: label smoothing (over ``spec.k`` classes); ``spec.gamma``: the focal exponent
    (without smoothing: the loss is ``(1 - p_y)**gamma (-log p_y)`` and its gradient the
    cross-entropy's times one factor per row); ``spec.z_loss``: ``c``, the loss gains
    ``c * lse**2`` (after the focal factor, as on the dense path), ``lse = m + log(den)`` from
    the same sums."""
    xp = ops.xp
    k, eps, gamma = spec.k, spec.eps, spec.gamma
    acc = st.s.dtype
    out = st.m.dtype
    m, zy = _acc(ops, st.m, acc), _acc(ops, st.zy, acc)
    gap = zy - m  # exact in float64 (float32 operands); -inf for a masked target
    dly = F.low_part_shift(ops, st.zy, st.m, st.zy_lo, st.m_lo)  # 0 where the target is the maximum
    if dly is not None:
        gap = gap + _acc(ops, dly, acc)
    S = st.s + st.s_lo
    if acc != st.m.dtype:
        Yy = xp.exp(gap)
    else:
        Yy = F.shifted_exp(ops, st.zy, st.m, dly)
    den = Yy + S
    L = xp.where(gap == 0, xp.log1p(S), xp.log(den))
    dsum = (st.t + st.t_lo) if eps != 0.0 else None
    loss = F.sparse_loss_terms(ops, L, gap, eps, k, dsum)
    inv = 1.0 / den
    gy = F.sparse_target_grad(ops, S, Yy, den, gap, eps, k)
    mult = xp.ones_like(loss)
    if gamma != 0.0:
        if eps != 0.0:
            raise ValueError("focal loss with label smoothing is not fused")  # callers check first
        # the dense path's focal terms for a one-hot target: q = 1 - p_y = S / den (no
        # cancellation), loss q**gamma (-log p_y), gradient factor q**gamma (1 + gamma p_y rho)
        q, p = S * inv, Yy * inv
        nlp = loss
        qg = F.focal_power(ops, q, gamma)
        one = xp.ones_like(q)
        rho = xp.where(q > 0, nlp / xp.where(q > 0, q, one), one)
        mult = qg * (1 + gamma * ops.where0(p > 0, p * rho))
        loss = qg * nlp
    if spec.z_loss != 0.0:  # PaLM's z-loss: c * lse**2, lse from the merged sums
        lse = m + L if st.m_lo is None else (m + _acc(ops, st.m_lo, acc)) + L
        loss = loss + spec.z_loss * (lse * lse)
        zinv = (2.0 * spec.z_loss) * lse * inv
    else:
        zinv = xp.zeros_like(loss)
    cast = lambda x: x if x.dtype == out else xp.astype(x, out)
    m_lo = xp.zeros_like(st.m) if st.m_lo is None else st.m_lo
    return RowFinal(cast(loss), st.m, cast(inv), cast(gy), cast(mult), cast(zinv), m_lo)


def chunk_grad(
    ops: Ops, z: Any, y: Any, start: Any, fin: RowFinal, scale: Any, spec: RowSpec, live: Any
) -> Any:
    """The gradient of ``sum_i scale_i * loss_i`` with respect to one chunk of logits ``z``
    ``(N, C)`` (classes from ``start``): ``scale * (mult * (p - t') + 2 c lse p)`` with
    ``p = exp(z - m) / den`` and the target's entry ``gy`` (:class:`RowFinal`), exactly 0 in rows
    where ``live`` is false (even with non-finite logits).  The dense path's
    :func:`unihead.formulas.softmax_sparse_grad` (and z-loss term) on a slice of the classes.
    With ``spec.cap``, ``z`` are the logits as given: the gradient with respect to the capped
    logits times the cap's slope at ``z``."""
    xp = ops.xp
    c = z.shape[-1]
    zc, z_lo = capped(ops, z, spec.cap)
    m0 = xp.expand_dims(xp.where(fin.m == -float("inf"), ops.scalar(0.0, fin.m), fin.m), axis=-1)
    Y = F.shifted_exp(ops, zc, m0, F.low_part_shift(ops, zc, m0, z_lo, xp.expand_dims(fin.m_lo, axis=-1)))
    r = scale * fin.mult
    yl = y - start
    iota = xp.arange(c, dtype=y.dtype, device=ops.device(y))
    hit = xp.expand_dims(yl, axis=-1) == iota
    gt = r * fin.gy
    if spec.z_loss != 0.0:
        rz = scale * fin.zinv
        g = Y * xp.expand_dims(r * fin.inv + rz, axis=-1)
        inside = (yl >= 0) & (yl < c)
        gt = gt + rz * ops.take_last(Y, xp.where(inside, yl, xp.zeros_like(yl)))  # 2 c lse p_y
    else:
        g = Y * xp.expand_dims(r * fin.inv, axis=-1)
    if spec.eps != 0.0:
        g = g - xp.expand_dims(r * (spec.eps / spec.k), axis=-1)
    g = xp.where(hit, xp.expand_dims(gt, axis=-1), g)
    if spec.cap is not None:
        g = g * F.softcap_slope(ops, z, spec.cap)
    return ops.where0(xp.expand_dims(live, axis=-1), g)


# ---------------------------------------------------------------------------- the chunked passes
def _chunks(v: int, c: int) -> tuple[int, int]:
    """``(full, rest)``: the number of whole chunks of ``c`` classes and the width of the last."""
    return v // c, v % c


def logits_stats(ops: Ops, zmm: Any, bc: Any, y: Any, start: Any, spec: RowSpec) -> RowStats:
    """:func:`chunk_stats` of the chunk whose matmul gave ``zmm`` (``h @ w_c``, the inputs' dtype)
    and whose bias is ``bc`` (or None): the elementwise part of a forward step (soft-cap
    included), which a backend may compile into one loop (``kernels`` of :func:`rows_forward`)."""
    z = ops.widen_half(zmm if bc is None else zmm + bc)
    return chunk_stats(ops, z, y, start, smoothing=spec.smoothing, cap=spec.cap)


def logits_grad(
    ops: Ops, zmm: Any, bc: Any, y: Any, start: Any, fin: RowFinal, g: Any, live: Any, spec: RowSpec
) -> Any:
    """:func:`chunk_grad` of the chunk whose matmul gave ``zmm`` (bias ``bc`` or None), in
    ``zmm``'s dtype (the gradient matmuls' operand): the elementwise part of a backward step."""
    z = ops.widen_half(zmm if bc is None else zmm + bc)
    dz = chunk_grad(ops, z, y, start, fin, g, spec, live)
    return dz if dz.dtype == zmm.dtype else ops.xp.astype(dz, zmm.dtype)


def rows_forward(
    ops: Ops, h: Any, w: Any, b: Any, y: Any, *, spec: RowSpec, chunk: int,
    loop: Callable | None = None, kernels: tuple[Callable, Callable] | None = None,
) -> RowFinal:
    """Per-row losses of ``h @ w + b`` (``h`` ``(N, D)``, ``w`` ``(D, V)``, ``b`` ``(V,)`` or None)
    for targets ``y`` ``(N,)`` and the head's constants ``spec`` (:func:`row_spec`), one pass
    over chunks of ``chunk`` classes (the last may be narrower), and the per-row values the
    backward pass needs (:class:`RowFinal`).

    ``loop(n, body, carry)``: runs ``carry = body(i, carry)`` for ``i`` in ``range(n)`` (a Python
    loop by default; JAX passes ``lax.fori_loop``, so the traced program has one chunk's code).
    Chunk columns are read with ``ops.columns``.  ``kernels``: ``(logits_stats, logits_grad)``
    with the signatures of :func:`logits_stats` and :func:`logits_grad` minus ``ops`` (a
    backend's compiled versions; default those functions)."""
    loop = loop or _python_loop
    v = w.shape[-1]
    full, rest = _chunks(v, chunk)
    fstats = kernels[0] if kernels else (lambda *a: logits_stats(ops, *a))

    def stats(start: Any, width: int) -> RowStats:
        zmm = ops.xp.matmul(h, ops.columns(w, start, width))
        return fstats(zmm, None if b is None else ops.columns(b, start, width), y, start, spec)

    st = stats(0, chunk if full else rest)
    if full > 1:
        st = loop(full - 1, lambda i, acc: merge_stats(ops, acc, stats((i + 1) * chunk, chunk)), st)
    if full and rest:
        st = merge_stats(ops, st, stats(full * chunk, rest))
    return finish_rows(ops, st, spec)


def rows_backward(
    ops: Ops, h: Any, w: Any, b: Any, y: Any, fin: RowFinal, g: Any, *, spec: RowSpec,
    chunk: int, loop: Callable | None = None, kernels: tuple[Callable, Callable] | None = None,
) -> tuple[Any, Any, Any]:
    """The gradients of ``sum_i g_i loss_i`` (``g`` ``(N,)``, the upstream gradient of the per-row
    losses) with respect to ``h``, ``w`` and ``b`` (None without a bias), recomputing each chunk's
    logits: per chunk, ``dz`` (:func:`chunk_grad`), ``grad_h += dz @ w_c.T`` (accumulated in the
    compute dtype, float32 for half-precision inputs), ``grad_w[:, c] = h.T @ dz`` and
    ``grad_b[c] = sum(dz)``, the matmuls in the inputs' dtype.  Rows with ``g == 0`` contribute
    exactly nothing."""
    xp = ops.xp
    loop = loop or _python_loop
    v = w.shape[-1]
    full, rest = _chunks(v, chunk)
    live = g != 0
    dt = fin.m.dtype  # compute dtype
    low = h.dtype != dt  # half precision: matmuls in the inputs' dtype

    fgrad = kernels[1] if kernels else (lambda *a: logits_grad(ops, *a))

    def grads(start: Any, width: int, carry: tuple) -> tuple:
        gh, gw, gb = carry
        wc = ops.columns(w, start, width)
        dzm = fgrad(xp.matmul(h, wc), None if b is None else ops.columns(b, start, width), y, start, fin, g, live, spec)
        if gb is not None:
            gb = ops.put_columns(gb, start, xp.sum(dzm, axis=0, dtype=dt))
        gh = ops.add_matmul(gh, dzm, xp.matrix_transpose(wc))
        gw = ops.put_columns(gw, start, xp.matmul(xp.matrix_transpose(h), dzm))
        return gh, gw, gb

    gh = xp.zeros(ops.shape(h), dtype=dt, device=ops.device(h))
    gw = ops.empty_like_columns(w)
    gb = None if b is None else ops.empty_like_columns(xp.astype(b, dt) if low else b)
    carry = (gh, gw, gb)
    first = chunk if full else rest
    carry = grads(0, first, carry)
    if full > 1:
        carry = loop(full - 1, lambda i, c: grads((i + 1) * chunk, chunk, c), carry)
    if full and rest:
        carry = grads(full * chunk, rest, carry)
    gh, gw, gb = carry
    gw = ops.finish_columns(gw)
    gb = None if gb is None else ops.finish_columns(gb)
    gh = xp.astype(gh, h.dtype) if low else gh
    gb = None if gb is None else (xp.astype(gb, b.dtype) if gb.dtype != b.dtype else gb)
    return gh, gw, gb


def _python_loop(n: int, body: Callable, carry: Any) -> Any:
    for i in range(n):
        carry = body(i, carry)
    return carry
