"""The class-sharded (vocab-parallel) loss: each worker holds the logits of a contiguous range of
classes, ``z[:, start : start + C]`` (its slice of the kernel's columns times the hidden state),
and the loss of the whole row is formed from the per-row statistics of every worker's classes
(docs/large-vocabulary.md, "Class-sharded (vocab-parallel) loss").

The statistics and their merge are :mod:`unihead._fused`'s (:class:`~unihead._fused.RowStats`):
a worker's classes are one more "set of classes", and the collectives reduce the same fields a
chunk merge combines.  :func:`reduce_stats` is that reduction, written once over two collective
callables, so that the PyTorch process group (``all_reduce`` MAX and SUM), JAX's ``lax.pmax`` /
``lax.psum`` inside ``shard_map`` and the one-process simulation of the conformance suite
(:func:`stacked_collectives`: the shards' statistics stacked on a leading axis) run the same code:

1. MAX over the workers of the row maxima ``m`` and of the target logits ``zy`` (the worker
   holding the target has it, every other one ``-inf``: the maximum *is* the target logit, with
   no rounding), one collective for both;
2. each worker rescales its sums to the global maximum (:func:`unihead._fused.rescale_stats`);
3. SUM over the workers of ``s``, ``s_lo`` (the shifted sums of exponentials, other than the
   target's, and their rounding errors) and ``t``, ``t_lo`` (label smoothing's sum of ``z - m``),
   one collective for the four (and for whatever the caller adds: the backends add the number
   of classes, which validation compares with the head's).

Every worker then holds the same statistics, hence the same per-row losses
(:func:`unihead._fused.finish_rows`, the z-loss included: ``lse`` comes from the reduced sums):
the loss is replicated, and the gradient with respect to a
worker's logits is local (:func:`unihead._fused.chunk_grad` on its own classes), with no
collective in the backward pass.  The gradient of the hidden state that produced the logits
(``hidden @ kernel[:, shard]``) is each worker's partial ``dz @ kernel[:, shard].T``: the sum over
the workers is the caller's (Megatron's column-parallel linear all-reduces it in its backward
pass; under ``shard_map`` JAX sums it where the hidden state is replicated).  A soft-capped head's
workers cap their own logits (:func:`unihead._fused.chunk_stats` / ``chunk_grad`` with the
head's :class:`~unihead._fused.RowSpec`): the cap is elementwise, so the shards' capped logits
are the capped logits of the whole row.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from . import _fused
from ._fused import RowFinal, RowSpec, RowStats
from ._ops import Ops

__all__ = [
    "unsupported",
    "check_shard",
    "reduce_stats",
    "rows_forward",
    "rows_grad",
    "stacked_collectives",
    "stacked_rows",
]

Collective = Callable[..., Sequence[Any]]


def unsupported(head: Any, name: str) -> str | None:
    """Why ``head``'s loss cannot be class-sharded (a sentence saying what to write instead), or
    None: the heads :func:`unihead._fused.unsupported` accepts (softmax heads with class ids),
    whose loss needs only the per-row statistics."""
    problem = _fused.unsupported(head)
    if problem is None:
        return None
    what = problem.split("; this is ", 1)[1].split(":", 1)[0]
    return (
        f"{name} shards softmax heads whose labels are class ids (multiclass with sparse labels); "
        f"this is {what}: gather the logits of every class and use compiled.loss(logits, labels)."
    )


def check_shard(name: str, k: int, width: int, start: Any) -> None:
    """``start`` (a Python int; traced starts are checked by the caller where they exist) must
    place ``width`` classes inside the head's ``k``."""
    import numbers

    if isinstance(start, bool) or not isinstance(start, numbers.Integral):
        raise TypeError(
            f"{name}: class_start must be the id of this worker's first class (an int, e.g. "
            f"rank * local_classes); got {type(start).__name__}."
        )
    if width < 1 or start < 0 or start + width > k:
        raise ValueError(
            f"{name}: this worker's logits hold the classes {start} .. {start + width - 1} "
            f"(class_start={start}, {width} local classes), outside the head's {k} classes "
            f"(0 .. {k - 1}). class_start is the id of the worker's first class; the workers' "
            f"local classes together must be exactly the head's num_outputs."
        )


def reduce_stats(
    ops: Ops, st: RowStats, pmax: Collective, psum: Collective, extra: Sequence[Any] = ()
) -> tuple[RowStats, tuple]:
    """The statistics of every worker's classes from this worker's ``st``: ``pmax(*arrays)`` and
    ``psum(*arrays)`` reduce each of their arrays elementwise over the workers (a backend's
    collectives; every worker calls this in the same order).  ``extra``: arrays summed in the
    same collective as the sums (returned second).  ``n`` of the result is this worker's own
    (:func:`unihead._fused.finish_rows` does not use it)."""
    xp = ops.xp
    m, zy = pmax(st.m, st.zy)
    m_lo = None
    if st.m_lo is not None:  # soft-cap: the low part of the maximum, from a worker holding it
        (m_lo,) = pmax(xp.where(st.m == m, st.m_lo, ops.scalar(-float("inf"), st.m_lo)))
    st = _fused.rescale_stats(ops, st, m, m_lo)
    lows = () if st.zy_lo is None else (st.zy_lo,)  # 0 on the workers without the target
    s, s_lo, t, t_lo, *more = psum(st.s, st.s_lo, st.t, st.t_lo, *lows, *extra)
    zy_lo = more.pop(0) if lows else None
    return RowStats(m, s, s_lo, zy, t, t_lo, st.n, m_lo, zy_lo), tuple(more)


def _stats(ops: Ops, z: Any, y: Any, start: Any, spec: RowSpec) -> RowStats:
    """This worker's :class:`~unihead._fused.RowStats` (half precision computed in float32)."""
    return _fused.chunk_stats(ops, ops.widen_half(z), y, start, smoothing=spec.smoothing, cap=spec.cap)


def rows_forward(
    ops: Ops, z: Any, y: Any, start: Any, *, spec: RowSpec,
    pmax: Collective, psum: Collective, extra: Sequence[Any] = (),
) -> tuple[RowFinal, tuple]:
    """Per-row losses over all ``spec.k`` classes (the head's constants:
    :func:`unihead._fused.row_spec`) from this worker's logits ``z`` ``(N, C)`` (the classes
    ``start .. start + C - 1``) and the global class ids ``y`` ``(N,)``, with what
    :func:`rows_grad` needs (:class:`unihead._fused.RowFinal`, the same on every worker), and the
    sums of ``extra``.  Half-precision logits are computed in float32."""
    st, more = reduce_stats(ops, _stats(ops, z, y, start, spec), pmax, psum, extra)
    return _fused.finish_rows(ops, st, spec), more


def rows_grad(ops: Ops, z: Any, y: Any, start: Any, fin: RowFinal, g: Any, *, spec: RowSpec) -> Any:
    """The gradient of ``sum_i g_i loss_i`` with respect to this worker's logits ``z`` (local: no
    collective), in ``z``'s dtype; exactly 0 in rows where ``g`` is 0."""
    zc = ops.widen_half(z)
    g = g if g.dtype == zc.dtype else ops.xp.astype(g, zc.dtype)
    dz = _fused.chunk_grad(ops, zc, y, start, fin, g, spec, g != 0)
    return dz if dz.dtype == z.dtype else ops.xp.astype(dz, z.dtype)


def stacked_collectives(ops: Ops) -> tuple[Collective, Collective]:
    """``(pmax, psum)`` for statistics stacked on a leading axis of shards, ``(P, N)`` each: the
    workers simulated in one process (the conformance suite's ``sharded`` column).  The MAX
    returns ``(N,)`` (broadcast against the stack by the rescaling), the SUM adds the shards in
    order, as ``all_reduce`` would."""
    xp = ops.xp

    def pmax(*xs: Any) -> list:
        return [xp.max(x, axis=0) for x in xs]

    def psum(*xs: Any) -> list:
        return [xp.sum(x, axis=0) for x in xs]

    return pmax, psum


def stacked_rows(ops: Ops, shards: Sequence[Any], y: Any, starts: Sequence[int], *, spec: RowSpec) -> RowFinal:
    """:func:`rows_forward` for every shard at once in one process: the logits of each shard
    (``shards[i]`` ``(N, C_i)``, classes from ``starts[i]``), their statistics stacked and
    reduced by :func:`reduce_stats` with :func:`stacked_collectives`."""
    xp = ops.xp
    sts = [_stats(ops, z, y, s, spec) for z, s in zip(shards, starts)]
    stack = lambda f: xp.stack([getattr(s, f) for s in sts], axis=0)
    acc = sts[0].s.dtype
    n = xp.asarray([[float(s.n)] for s in sts], dtype=acc)
    lo = lambda f: None if getattr(sts[0], f) is None else stack(f)
    st = RowStats(stack("m"), stack("s"), stack("s_lo"), stack("zy"), stack("t"), stack("t_lo"), n,
                  lo("m_lo"), lo("zy_lo"))
    pmax, psum = stacked_collectives(ops)
    st = reduce_stats(ops, st, pmax, psum)[0]
    return _fused.finish_rows(ops, st, spec)
