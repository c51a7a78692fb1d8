"""Conformance cases, generated deterministically from a seed.

Every task x label format x option (label smoothing, class weights, pos_weight, ignore_index
including an all-ignored batch, focal gamma, sample weights including zeros, each reduction)
meets every logit regime (ordinary; large scale +-30 and +-1e4; huge, +-1e12, where float32
spacing exceeds exp's underflow gap; a confident correct class whose
true loss is tiny; ties; -inf masked classes where defined; leading dimensions (N, T, K)), in
float32, float64 and bfloat16 inputs.  Class counts: 1 and 2 outputs for binary heads; 2, 3, 10,
1000 and 32000 for the others.  The z-loss and logit soft-capping options get cases of their own
(:data:`ZSOFT_HEADS`: several coefficients and caps, alone and with smoothing, weights, ignored
labels and focal loss, through the logit regimes, where ``+-30``, ``+-1e4`` and ``+-1e12`` saturate
the caps' ``tanh``).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Iterator

import numpy as np

from unihead.spec import ClassificationHead

__all__ = ["Case", "generate", "split_pieces", "sharded_bounds", "REGIMES", "DTYPES", "SPLITS"]

#: The numbers of pieces a case's batch is split into (the "split" dimension: one per case)
SPLITS = (2, 3, 7)
REGIMES = ("ordinary", "large30", "large1e4", "confident", "ties", "masked", "leading", "huge")
DTYPES = ("float32", "float64", "bfloat16")


@dataclasses.dataclass
class Case:
    """One input: a head, logits (values exactly representable in ``dtype``), labels and sample
    weights.  bfloat16 logits are stored as float32 arrays of bfloat16 values."""

    id: str
    head: ClassificationHead
    dtype: str
    regime: str
    logits: np.ndarray
    labels: np.ndarray
    sample_weight: np.ndarray | None

    @property
    def tolerance(self) -> float:
        """docs/semantics.md §11: 4 ulp for values; focal loss 4 + 2 gamma."""
        return 4.0 + 2.0 * self.head.focal_gamma

    def tolerance_of(self, column: str) -> float:
        """The tolerance of one output (docs/semantics.md §11): gradients get 2 ulp more than
        values (a gradient entry is a probability times w / sum(w) and the upstream gradient).
        The split dimension is held to the same: ``split_loss`` as ``loss``, ``split_grad`` as
        ``grad``; so is the fused linear loss: ``fused`` as ``loss``, ``fused_grad`` as ``grad``."""
        return self.tolerance + (2.0 if column in ("grad", "split_grad", "fused_grad") else 0.0)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float64":
        return x.astype(np.float64)
    if dtype == "float32":
        return x.astype(np.float32)
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _exact(x: np.ndarray, dtype: str) -> np.ndarray:
    """Floating labels and weights as values of the compute dtype (float32 for float32 and
    bfloat16 logits): the backends compute with exactly the values the reference sees.  Rows of
    soft labels are renormalised in that dtype."""
    if not np.issubdtype(np.asarray(x).dtype, np.floating):
        return x
    return np.asarray(x, np.float64 if dtype == "float64" else np.float32)


def _heads(quick: bool) -> Iterator[tuple[str, ClassificationHead, dict]]:
    """(name, head, extras) for every task x format x option; extras: sample weights on/off."""
    formats = [
        ("binary", "binary", 1), ("binary", "binary", 2), ("binary", "probabilities", 1),
        ("binary", "probabilities", 2), ("multiclass", "sparse", None), ("multiclass", "one_hot", None),
        ("multiclass", "probabilities", None), ("multilabel", "multi_hot", None),
        ("multilabel", "probabilities", None),
    ]
    options = [
        ("plain", {}),
        ("smooth", {"label_smoothing": 0.1}),
        ("cw", {"class_weights": True}),
        ("pw", {"pos_weight": True}),
        ("ignore", {"ignore_index": -100}),
        ("focal", {"focal_gamma": 2.0}),
        ("sw", {"sample_weight": True}),
        ("sum", {"reduction": "sum"}),
        ("none", {"reduction": "none"}),
        ("all", {"label_smoothing": 0.2, "class_weights": True, "pos_weight": True, "ignore_index": -100,
                 "focal_gamma": 0.5, "sample_weight": True}),
    ]
    if quick:  # every format with no option and with all options at once
        options = [o for o in options if o[0] in ("plain", "all")]
    for task, fmt, units in formats:
        for oname, opts in options:
            kw: dict[str, Any] = {"label_format": fmt}
            if units is not None:
                kw["binary_units"] = units
            extras = {"sample_weight": bool(opts.get("sample_weight"))}
            for key, value in opts.items():
                if key == "sample_weight":
                    continue
                if key == "pos_weight" and task == "multiclass":
                    continue
                if key == "ignore_index" and fmt not in ("sparse", "binary"):
                    continue
                kw[key] = value
            if oname in ("pw",) and task == "multiclass" or oname == "ignore" and fmt not in ("sparse", "binary"):
                continue
            name = f"{task}-{fmt}" + (f"-{units}u" if units else "") + f"/{oname}"
            yield name, kw, extras


def _class_weights(k: int, rng: np.random.Generator) -> list[float]:
    return [float(v) for v in np.round(rng.uniform(0.25, 4.0, k), 3)]


def regime_logits(regime: str, shape: tuple[int, ...], rng: np.random.Generator, softmax: bool) -> np.ndarray:
    k = shape[-1]
    if regime == "ordinary":
        z = rng.normal(size=shape) * 3
    elif regime == "large30":
        z = rng.uniform(-30, 30, size=shape)
    elif regime == "large1e4":
        z = rng.uniform(-1e4, 1e4, size=shape)
    elif regime == "huge":  # float32 spacing (65536 at 1e12) far beyond exp's underflow gap
        z = rng.uniform(-1e12, 1e12, size=shape)
    elif regime == "confident":
        z = rng.normal(size=shape)
        gap = rng.choice([20.0, 30.0, 60.0, 89.0], size=shape[:-1])
        if k == 1:
            z[..., 0] = np.where(rng.uniform(size=shape[:-1]) < 0.5, 1, -1) * gap
        else:
            z[..., 0] = z.max(-1) + gap
    elif regime == "ties":
        z = np.round(rng.normal(size=shape)) * 2
        z[..., : max(1, k // 2)] = z.max(-1, keepdims=True)
    elif regime == "masked":
        z = rng.normal(size=shape) * 3
        mask = rng.uniform(size=shape) < 0.3
        mask[..., 0] = False  # at least one class stays possible
        z = np.where(mask, -np.inf, z)
    else:  # leading
        z = rng.normal(size=shape) * 3
    return z


def _labels(head: ClassificationHead, z: np.ndarray, rng: np.random.Generator, confident: bool) -> np.ndarray:
    lead = z.shape[:-1]
    k = head.num_classes
    fmt = head.label_format
    if head.task == "multiclass":
        ids = rng.integers(0, k, lead)
        if confident:
            ids = np.where(rng.uniform(size=lead) < 0.6, 0, ids)  # mostly the confident class
        if not np.all(np.isfinite(z)):  # masked regime: labels on possible classes
            ids = np.where(np.isfinite(np.take_along_axis(z, ids[..., None], -1)[..., 0]), ids, 0)
        if fmt == "sparse":
            if head.ignore_index is not None:
                ids = np.where(rng.uniform(size=lead) < 0.2, head.ignore_index, ids)
            return ids
        if fmt == "one_hot":
            return np.eye(k)[ids]
        t = rng.dirichlet(np.ones(k), size=lead)
        if not np.all(np.isfinite(z)):  # soft labels only on possible classes
            t = np.where(np.isfinite(z), t, 0.0)
            t = t / t.sum(-1, keepdims=True)
        return t
    if head.task == "binary":
        if fmt == "binary":
            y = (rng.uniform(size=lead) < 0.5).astype(np.float64)
            if confident:
                y = (z[..., -1] - (z[..., 0] if z.shape[-1] == 2 else 0) > 0).astype(np.float64)
            if head.ignore_index is not None:
                y = np.where(rng.uniform(size=lead) < 0.2, float(head.ignore_index), y)
            return y
        return rng.uniform(size=lead)
    if fmt == "multi_hot":
        y = (rng.uniform(size=lead + (k,)) < 0.4).astype(np.float64)
        if confident:
            y = (z > 0).astype(np.float64)
        return y
    return rng.uniform(size=lead + (k,))


def generate(seed: int = 0, quick: bool = False, tasks: tuple[str, ...] | None = None) -> list[Case]:
    """All cases for ``seed`` (``quick``: a small subset that runs in seconds)."""
    cases: list[Case] = []
    for i, (name, kw, extras) in enumerate(_heads(quick)):
        task = name.split("-")[0]
        if tasks and task not in tasks:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        # one class count per option, cycling through 2, 3 and 10 (1000 and 32000 below)
        ks = [kw.get("binary_units", 1)] if task == "binary" else [(2, 3, 10)[i % 3]]
        for k in ks:
            head_kw = dict(kw)
            if task != "binary":
                head_kw["num_classes"] = k
            if head_kw.get("class_weights") is True:
                head_kw["class_weights"] = _class_weights(2 if task == "binary" else k, rng)
            if head_kw.get("pos_weight") is True:
                head_kw["pos_weight"] = float(np.round(rng.uniform(0.5, 3.0), 3)) if task == "binary" else [
                    float(v) for v in np.round(rng.uniform(0.5, 3.0, k), 3)]
            head = ClassificationHead(task, **head_kw)
            softmax = head.activation == "softmax"
            regimes = ("ordinary", "confident") if quick else REGIMES
            for regime in regimes:
                if regime == "masked" and not softmax:
                    continue
                dtypes = ["float32"]
                if not quick and regime in ("ordinary", "confident"):
                    dtypes.append("float64")
                if not quick and regime == "ordinary":
                    dtypes.append("bfloat16")
                for dtype in dtypes:
                    shape = (3, 4, head.num_outputs) if regime == "leading" else (6, head.num_outputs)
                    z = _round_to(regime_logits(regime, shape, rng, softmax), dtype)
                    y = _exact(_labels(head, z, rng, regime == "confident"), dtype)
                    sw = None
                    if extras["sample_weight"]:
                        full = shape[:-1] + ((k,) if task == "multilabel" else ())
                        sw = _exact(np.round(rng.uniform(0.0, 2.0, full), 3), dtype)
                        sw.reshape(-1)[::5] = 0.0  # zeros included
                    cases.append(Case(f"{name}/K{head.num_outputs}/{regime}/{dtype}", head, dtype, regime, z, y, sw))
    # an all-ignored batch
    for head in (ClassificationHead.multiclass(4, ignore_index=-100),
                 ClassificationHead.binary(binary_units=2, ignore_index=-1)):
        rng = np.random.default_rng([seed, 7])
        z = _round_to(rng.normal(size=(5, head.num_outputs)) * 3, "float32")
        y = np.full(5, head.ignore_index, dtype=np.int64 if head.task == "multiclass" else np.float64)
        cases.append(Case(f"{head.task}/all-ignored/K{head.num_outputs}/ordinary/float32", head, "float32", "ordinary", z, y, None))
    if not quick:  # large class counts (float32: checked against the float64 reference)
        for k in (1000, 32000):
            for head in (ClassificationHead.multiclass(k), ClassificationHead.multiclass(k, label_smoothing=0.1),
                         ClassificationHead.multilabel(k)):
                if tasks and head.task not in tasks:
                    continue
                for regime in ("ordinary", "confident"):
                    rng = np.random.default_rng([seed, k, zlib.crc32(repr(head).encode()), len(regime)])
                    n = 4 if k == 32000 else 8
                    z = _round_to(regime_logits(regime, (n, k), rng, head.activation == "softmax"), "float32")
                    y = _exact(_labels(head, z, rng, regime == "confident"), "float32")
                    cases.append(Case(f"{head!r}/K{k}/{regime}/float32", head, "float32", regime, z, y, None))
    cases += _zsoft_cases(seed, quick)
    if tasks:
        cases = [c for c in cases if c.head.task in tasks]
    return cases


#: (name, task, spec options, with sample weights) of the z-loss / soft-cap cases: each
#: coefficient and cap alone, and with the options they interact with (smoothing, class and
#: positive weights, ignored labels, focal loss, each reduction).  ``class_weights`` and
#: ``pos_weight`` ``True``: drawn per case, as above.
ZSOFT_HEADS: tuple[tuple[str, str, dict, bool], ...] = (
    ("multiclass-sparse/zloss", "multiclass", {"num_classes": 10, "z_loss": 1e-4}, False),
    ("multiclass-sparse/softcap", "multiclass", {"num_classes": 10, "logit_softcap": 30.0}, False),
    ("multiclass-sparse/zsoft-all", "multiclass", {
        "num_classes": 3, "z_loss": 0.01, "logit_softcap": 5.0, "label_smoothing": 0.1,
        "class_weights": True, "ignore_index": -100}, True),
    ("multiclass-one_hot/zsoft-focal", "multiclass", {
        "num_classes": 10, "label_format": "one_hot", "z_loss": 1e-3, "logit_softcap": 15.0,
        "focal_gamma": 2.0, "reduction": "sum"}, False),
    ("multiclass-probabilities/zloss-none", "multiclass", {
        "num_classes": 3, "label_format": "probabilities", "z_loss": 0.5, "reduction": "none"}, False),
    ("binary-binary-2u/zsoft", "binary", {
        "binary_units": 2, "z_loss": 0.01, "logit_softcap": 2.5, "pos_weight": True, "ignore_index": -1}, True),
    ("binary-binary-1u/softcap", "binary", {"logit_softcap": 0.75, "label_smoothing": 0.1}, False),
    ("multilabel-multi_hot/softcap", "multilabel", {
        "num_classes": 10, "logit_softcap": 5.0, "pos_weight": True, "class_weights": True,
        "reduction": "sum"}, True),
    ("multilabel-probabilities/softcap-focal", "multilabel", {
        "num_classes": 3, "label_format": "probabilities", "logit_softcap": 50.0, "focal_gamma": 0.5}, False),
)


def _zsoft_cases(seed: int, quick: bool) -> list[Case]:
    """The cases of :data:`ZSOFT_HEADS` (``quick``: ordinary logits, float32)."""
    out: list[Case] = []
    for name, task, opts, weighted in ZSOFT_HEADS:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 18])
        kw = dict(opts)
        k = 2 if task == "binary" else kw["num_classes"]
        if kw.get("class_weights") is True:
            kw["class_weights"] = _class_weights(k, rng)
        if kw.get("pos_weight") is True:
            kw["pos_weight"] = float(np.round(rng.uniform(0.5, 3.0), 3)) if task == "binary" else [
                float(v) for v in np.round(rng.uniform(0.5, 3.0, k), 3)]
        head = ClassificationHead(task, **kw)
        softmax = head.activation == "softmax"
        regimes = ("ordinary",) if quick else ("ordinary", "large30", "large1e4", "huge", "confident",
                                               "ties", "masked")
        for regime in regimes:
            if regime == "masked" and not softmax:
                continue
            dtypes = ["float32"] + (["float64"] if not quick and regime in ("ordinary", "confident") else [])
            for dtype in dtypes:
                shape = (6, head.num_outputs)
                z = _round_to(regime_logits(regime, shape, rng, softmax), dtype)
                y = _exact(_labels(head, z, rng, regime == "confident"), dtype)
                sw = None
                if weighted:
                    full = shape[:-1] + ((k,) if task == "multilabel" else ())
                    sw = _exact(np.round(rng.uniform(0.0, 2.0, full), 3), dtype)
                    sw.reshape(-1)[::5] = 0.0
                out.append(Case(f"{name}/K{head.num_outputs}/{regime}/{dtype}", head, dtype, regime, z, y, sw))
    if not quick:  # a language-model head: PaLM's coefficient, Gemma 2's cap, a large vocabulary
        head = ClassificationHead.multiclass(32000, z_loss=1e-4, logit_softcap=30.0, ignore_index=-100)
        for regime in ("ordinary", "confident"):
            rng = np.random.default_rng([seed, 32000, 18, len(regime)])
            z = _round_to(regime_logits(regime, (4, 32000), rng, True), "float32")
            y = _exact(_labels(head, z, rng, regime == "confident"), "float32")
            out.append(Case(f"{head!r}/K32000/{regime}/float32", head, "float32", regime, z, y, None))
    return out


def _dead_rows(case: Case) -> np.ndarray:
    """Which examples along the first axis weigh nothing at all: every label ignored, or every
    sample weight 0."""
    n = case.logits.shape[0]
    dead = np.zeros(n, bool)
    head = case.head
    if head.ignore_index is not None:  # sparse or binary labels: one per example
        dead |= (case.labels == head.ignore_index).reshape(n, -1).all(-1)
    if case.sample_weight is not None:
        dead |= (case.sample_weight == 0).reshape(n, -1).all(-1)
    return dead


def sharded_bounds(k: int) -> tuple[int, ...]:
    """The class shards of the ``sharded`` column for ``k`` classes: ``(0, b1, ..., k)``, 2-3
    uneven shards, the first holding one class (a shard without most rows' targets), the last
    about a third."""
    inner = sorted({1, max(2, (2 * k) // 3)} & set(range(1, k)))
    return (0, *inner, k)


def split_pieces(case: Case) -> list[np.ndarray]:
    """The uneven pieces (micro-batches) a case is also evaluated in: index arrays along the
    first axis that together cover every example once.

    Deterministic, from the case.  The number of pieces (2, 3 or 7, at most the number of
    examples for 2 and 3) and their sizes depend only on the head, dtype and shape (a JIT
    compiles one program per head and input signature; the split keeps it so); 7 pieces of a
    batch of 6 include empty ones (a worker or micro-batch with no example).  Where the case can
    weigh an example 0 (an ignore_index, a sample weight), the first piece has one example: an
    example weighing nothing when the batch has one (a piece of weight 0).  Pieces hold
    consecutive examples, that one moved first."""
    n = case.logits.shape[0]
    key = zlib.crc32(f"{case.head!r}/{case.dtype}/{case.logits.shape}".encode())
    rng = np.random.default_rng(key)
    p = SPLITS[key % len(SPLITS)]
    single = case.head.ignore_index is not None or case.sample_weight is not None
    rest = n - 1 if single else n
    parts = p - 1 if single else p
    if p < 7:  # every piece holds an example
        parts = max(1, min(parts, rest))
        cuts = np.sort(rng.choice(np.arange(1, rest), parts - 1, replace=False)) if parts > 1 else np.array([], int)
    else:  # pieces may be empty
        cuts = np.sort(rng.integers(0, rest + 1, parts - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [rest]])).astype(int)
    if len(sizes) > 1 and len(set(sizes.tolist())) == 1 and sizes[-1] > 1:  # uneven
        sizes[0], sizes[-1] = sizes[0] + 1, sizes[-1] - 1
    sizes = ([1] if single else []) + sizes.tolist()
    order = np.arange(n)
    dead = np.flatnonzero(_dead_rows(case))
    if single and dead.size:
        order = np.concatenate([[dead[0]], np.delete(order, dead[0])])
    bounds = np.cumsum([0] + sizes)
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
