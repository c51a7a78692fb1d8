"""Issue 17 on PyTorch: one step over split batches gives the full batch's loss and gradients.

Two ways a step's batch is split, each checked on PyTorch's own machinery:

* **Gradient accumulation** (one process): the batch in 2, 3 and 7 uneven micro-batches, one of
  them all ignored (ignored labels or zero sample weights); ``W`` = the sum of the micro-batches'
  ``compiled.loss_weight``, each micro-batch's ``compiled.loss(..., normalizer=W)`` (or its
  ``loss_terms`` total, the summed gradients divided by ``W``) backpropagated and accumulated.
* **DistributedDataParallel** over gloo on 127.0.0.1, 2 and 4 processes spawned by the test
  (``torch.multiprocessing.spawn``, once per world size; every check runs inside the same
  workers), uneven shards with uneven numbers of ignored labels (in one case a whole shard
  ignored), zero sample weights, class weights: the loss with
  ``normalizer=global_normalizer(compiled.loss_weight(...))`` in a DDP-wrapped model, one SGD step
  (also through ``loss_terms``, and with two micro-batches per rank, the first under
  ``no_sync()``: ``W`` the step's weight over both and every rank).

Against the full batch in one process (unihead's ``reduction="mean"`` loss, one backward pass,
one SGD step; for the sparse multiclass heads that loss is itself checked against
``F.cross_entropy(weight=, ignore_index=)`` on the full batch, which computes the same weighted
mean independently).  The measures, all float32:

* **Loss values and the logits' gradients**: ulp of the full batch's value (elementwise for the
  gradients), at most ``2p + 4`` for a batch in ``p`` pieces.  Each example's gradient is the same
  formula on the same logits on both sides, scaled by ``1/W`` instead of the full batch's own
  ``1/sum(weights)``: the piece weights, totals and final values each carry a few roundings of
  their own (<= 4u relative on either side), and ``W`` and the step's loss add ``p - 1`` float32
  additions each (<= (p - 1)u); 1 ulp >= u of the value.
* **Parameter gradients and parameters after the step** (a linear model, ``g = sum_i dz_i x_i``):
  the two sides add the same n per-example terms in different orders (per micro-batch or per
  rank, then across).  Higham's bound for any order of summation, |error| <= gamma_{n-1} * A with
  ``A = sum_i |dz_i| |x_i|`` (elementwise) and gamma_m = m u / (1 - m u), gives
  ``|g_split - g_full| <= (2 gamma_{n-1} + 8u) A`` (8u: the roundings of the scale and of each
  product, on either side; u = 2^-24), and after ``p -= lr * g``:
  ``|p_split - p_full| <= lr (2 gamma_{n-1} + 8u) A + ulp(p)`` (the update's own rounding).
  Reported also as the worst error in ulp of ``A`` (the size of the terms).  The reference runs
  the model's forward pass on the same pieces (:func:`full_batch`): a matrix product's rows
  differ by an ulp between batch sizes (the BLAS kernel's blocking), an error of the model's
  forward pass, not of the loss; the distance to the plain one-call forward pass is reported.
* **The loss rank 0 logs** (``global_loss``): at most ``world + 3`` ulp of the full batch's
  (each rank's value <= 2u of itself, the all-reduce's world - 1 additions, the division).

Beside each, what the usual code gives (the "What each framework's default does" table of
docs/scaling-out.md has the numbers these tests print with ``pytest -s``): the mean of the
pieces' means (each micro-batch's or rank's ``reduction="mean"`` loss; DDP averages it over the
ranks), and under DDP ``F.cross_entropy(weight=, ignore_index=)``'s default mean on each rank.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead._ulp import spacing, ulp_error

from .conftest import require
from .spawned import gloo_group, spawn_gloo

torch = require("torch")
F = torch.nn.functional
from unihead.backends.torch import global_loss, global_normalizer  # noqa: E402

U = 2.0**-24  # float32's unit roundoff
LR = 0.5


def gamma(m: int) -> float:
    return m * U / (1 - m * U)


# ----------------------------------------------------------------------------- data
N, D = 48, 6  # examples of a step, features


@dataclass(frozen=True)
class Case:
    """A head and a step's batch: ``N`` examples; ``ignored``: the examples whose label is the
    ignore index (or, for heads without one, whose sample weights are 0)."""

    name: str
    head: Any
    ignored: tuple[int, ...]
    weighted: bool
    seed: int

    def data(self) -> tuple[Any, Any, Any]:
        """``(x (N, D) float32, labels, sample weights or None)`` as tensors."""
        rng = np.random.default_rng(self.seed)
        h = self.head
        x = rng.normal(size=(N, D)).astype(np.float32)
        k = h.num_classes
        ids = rng.integers(0, k, N)
        ign = np.zeros(N, bool)
        ign[list(self.ignored)] = True
        sw = rng.uniform(0.25, 2.0, size=N).astype(np.float32) if self.weighted else None
        if h.ignore_index is not None:
            ids = np.where(ign, h.ignore_index, ids)
        if h.label_format == "sparse":
            y = ids
        elif h.label_format == "binary":
            y = ids.astype(np.float32)
        elif h.label_format == "one_hot":
            y = np.eye(k, dtype=np.float32)[ids]
        elif h.label_format == "multi_hot":
            y = (rng.uniform(size=(N, k)) < 0.4).astype(np.float32)
        else:  # probabilities
            y = (rng.dirichlet(np.ones(k), N) if h.task == "multiclass"
                 else rng.uniform(size=(N, k) if h.task == "multilabel" else N)).astype(np.float32)
        if h.ignore_index is None and self.ignored:
            assert sw is not None, "a head without an ignore index ignores examples by zero weights"
            sw[ign] = 0.0
        if sw is not None:
            sw[[2, 11]] = 0.0  # zero weights among the others too
        return torch.from_numpy(x), torch.from_numpy(np.asarray(y)), None if sw is None else torch.from_numpy(sw)

    def compiled(self):
        return unihead.compile(self.head, "torch")

    def model(self):
        """The model: unihead's output layer on the features (a linear model), the same initial
        weights for every run of the case."""
        g = torch.Generator().manual_seed(self.seed)
        layer = self.compiled().layer(D)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.7)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.3)
        return layer


def full_batch(case: Case, chunks: tuple[int, ...] = (N,)) -> dict[str, Any]:
    """One process, the whole batch, unihead's mean loss: the reference step.  Also ``A`` (the
    size of the gradient's terms) and the logits' gradient.

    ``chunks``: the model's forward pass runs on these pieces of the batch (concatenated; the
    loss is one call on the whole batch).  A matrix product's rows differ by an ulp between
    batch sizes (the BLAS kernel's blocking): given the pieces the split step runs on, the
    reference has the same logits, and what is measured is the loss's split alone."""
    x, y, sw = case.data()
    model = case.model()
    z = torch.cat([model(xi) for xi in torch.split(x, list(chunks))])
    z.retain_grad()
    loss = case.compiled().loss(z, y, sw)
    loss.backward()
    dz = z.grad.detach()
    a_weight = dz.abs().T.double() @ x.abs().double()  # sum_i |dz_i| |x_i|, exactly enough
    a_bias = dz.abs().double().sum(0)
    grads = [model.weight.grad.clone(), model.bias.grad.clone()]
    with torch.no_grad():
        for p, g in zip((model.weight, model.bias), grads):
            p.sub_(LR * g)
    return {
        "loss": float(loss.detach()), "dz": dz.numpy(), "grads": [g.numpy() for g in grads],
        "params": [model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()],
        "A": [a_weight.numpy(), a_bias.numpy()],
    }


def param_errors(params: list, ref: dict) -> dict[str, float]:
    """The worst difference of parameters after the step, against the reference step: in ulp of
    the parameters, and as a fraction of the bound of this file's docstring (<= 1: within it)."""
    n = N
    ulp_p, of_bound = 0.0, 0.0
    for p, r, a in zip(params, ref["params"], ref["A"]):
        d = np.abs(np.asarray(p, np.float64) - r)
        bound = LR * (2 * gamma(n - 1) + 8 * U) * a + spacing(r)
        ulp_p = max(ulp_p, float(np.max(d / spacing(r))))
        of_bound = max(of_bound, float(np.max(d / bound)))
    return {"ulp": ulp_p, "of_bound": of_bound}


def grad_errors(grads: list, ref: dict) -> dict[str, float]:
    """The worst parameter-gradient difference in ulp of the terms' size ``A`` (bound:
    2 gamma_{n-1} + 8u of A, about 2n + 8 ulp), and the relative error of the whole gradient."""
    ulp_a, num, den = 0.0, 0.0, 0.0
    for g, r, a in zip(grads, ref["grads"], ref["A"]):
        g = np.asarray(g, np.float64)
        ulp_a = max(ulp_a, ulp_error(g, r, "float32", scale=a))
        num += float(np.sum((g - r) ** 2))
        den += float(np.sum(np.asarray(r, np.float64) ** 2))
    return {"ulp_of_terms": ulp_a, "relative": math.sqrt(num / den)}


def grad_bound_ulp(n: int) -> float:
    """``(2 gamma_{n-1} + 8u) A`` in ulp of ``A`` (1 ulp of A >= u A)."""
    return (2 * gamma(n - 1) + 8 * U) / U


# ----------------------------------------------------------------------------- gradient accumulation
# The batch's last 6 examples form the all-ignored micro-batch of every split; the others
# are uneven and some carry ignored examples too.
SPLITS = {2: (42, 6), 3: (11, 31, 6), 7: (3, 9, 1, 14, 2, 13, 6)}
IGNORED = (5, 7, 8, 20, 33, 42, 43, 44, 45, 46, 47)

ACCUMULATION_CASES = [
    Case("binary, 1 unit, ignore_index, class weights, sample weights",
         H.binary(ignore_index=-1, class_weights=[0.4, 1.6]), IGNORED, True, 1),
    Case("binary, 2 units, focal, smoothing, ignore_index",
         H.binary(binary_units=2, focal_gamma=2.0, label_smoothing=0.1, ignore_index=-1), IGNORED, False, 2),
    Case("multiclass sparse, ignore_index, class weights, smoothing, sample weights",
         H.multiclass(5, ignore_index=-100, class_weights=[0.5, 2.0, 1.0, 3.0, 0.25], label_smoothing=0.1),
         IGNORED, True, 3),
    Case("multiclass one-hot, focal, class weights, sample weights",
         H.multiclass(4, label_format="one_hot", focal_gamma=1.5, class_weights=[1.0, 2.0, 0.5, 1.5]),
         IGNORED, True, 4),
    Case("multiclass probabilities, smoothing, sample weights",
         H.multiclass(4, label_format="probabilities", label_smoothing=0.2), IGNORED, True, 5),
    Case("multilabel, focal, smoothing, class weights, sample weights",
         H.multilabel(4, focal_gamma=1.0, label_smoothing=0.1, class_weights=[1.0, 0.5, 2.0, 1.0]),
         IGNORED, True, 6),
]


def pieces(sizes: tuple[int, ...]) -> list[slice]:
    ends = np.cumsum((0,) + sizes)
    assert ends[-1] == N
    return [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]


def accumulate(case: Case, sizes: tuple[int, ...], how: str) -> dict[str, Any]:
    """One accumulated step: the summed loss values, the logits' gradients, the parameter
    gradients.  ``how``: "normalizer" (loss(normalizer=W)), "terms" (loss_terms' totals, the
    gradients divided by W at the end), "naive" (each micro-batch's mean, divided by the number
    of micro-batches: the mean of means)."""
    x, y, sw = case.data()
    c = case.compiled()
    model = case.model()
    parts = pieces(sizes)
    part = lambda t, s: None if t is None else t[s]  # noqa: E731
    w = sum(c.loss_weight(y[s], part(sw, s)) for s in parts)  # before any forward pass
    logged, dzs = 0.0, []
    for s in parts:
        z = model(x[s])
        z.retain_grad()
        if how == "normalizer":
            loss = c.loss(z, y[s], part(sw, s), normalizer=w)
        elif how == "terms":
            loss, _ = c.loss_terms(z, y[s], part(sw, s))
        else:
            loss = c.loss(z, y[s], part(sw, s)) / len(parts)
        loss.backward()
        logged += loss.detach()
        dzs.append(z.grad)
    grads = [model.weight.grad, model.bias.grad]
    dz = torch.cat(dzs)
    if how == "terms":
        grads, dz, logged = [g / w for g in grads], dz / w, logged / w
    return {"loss": float(logged), "dz": dz.numpy(), "grads": [g.numpy() for g in grads], "weight": w}


ACCUMULATION_REPORT: list[str] = []


@pytest.mark.parametrize("parts", sorted(SPLITS))
@pytest.mark.parametrize("case", ACCUMULATION_CASES, ids=[c.name for c in ACCUMULATION_CASES])
def test_accumulated_micro_batches_give_the_full_batch(case: Case, parts: int):
    sizes = SPLITS[parts]
    ref = full_batch(case, sizes)
    x, y, sw = case.data()
    c = case.compiled()
    last = slice(N - sizes[-1], N)
    assert float(c.loss_weight(y[last], None if sw is None else sw[last])) == 0.0  # all ignored
    assert float(c.loss_weight(y, sw)) > 0.0
    for how in ("normalizer", "terms"):
        got = accumulate(case, sizes, how)
        loss_ulp = ulp_error(got["loss"], ref["loss"])
        dz_ulp = ulp_error(got["dz"], ref["dz"])
        g = grad_errors(got["grads"], ref)
        assert loss_ulp <= 2 * parts + 4, (how, loss_ulp)
        assert dz_ulp <= 2 * parts + 4, (how, dz_ulp)
        assert g["ulp_of_terms"] <= grad_bound_ulp(N), (how, g)
    naive = accumulate(case, sizes, "naive")
    n_loss = abs(naive["loss"] - ref["loss"]) / ref["loss"]
    n_grad = grad_errors(naive["grads"], ref)
    # the mean of means is wrong by far more than the bound unihead's result is held to
    assert n_grad["ulp_of_terms"] > 100 * grad_bound_ulp(N), n_grad
    print(f"\n[accumulation] {case.name}, {parts} micro-batches: unihead loss {loss_ulp:.0f} ulp, logits' "
          f"gradient <= {dz_ulp:.0f} ulp, parameter gradient {g['ulp_of_terms']:.1f} ulp of its terms "
          f"(bound {grad_bound_ulp(N):.0f}); mean of means: loss {n_loss:.1%} off, gradient "
          f"{n_grad['relative']:.1%} off ({n_grad['ulp_of_terms']:.3g} ulp of its terms)")


def test_accumulation_with_the_loss_module_and_no_weights():
    """The ``HeadLoss`` module takes ``normalizer=`` too; without ignored labels or weights the
    mean of means of equal micro-batches is right, and unihead agrees with it (a control)."""
    case = Case("multiclass", H.multiclass(3), (), False, 7)
    ref = full_batch(case, (16, 16, 16))
    x, y, _ = case.data()
    c = case.compiled()
    criterion = c.loss_fn()
    model = case.model()
    parts = pieces((16, 16, 16))
    w = sum(c.loss_weight(y[s]) for s in parts)
    assert float(w) == N
    for s in parts:
        criterion(model(x[s]), y[s], normalizer=w).backward()
    g = grad_errors([model.weight.grad, model.bias.grad], ref)
    assert g["ulp_of_terms"] <= grad_bound_ulp(N)


# ----------------------------------------------------------------------------- DistributedDataParallel
# Rank shards: contiguous slices of the batch, uneven; every rank of both world sizes has a
# different number of ignored examples.  Case "one rank all ignored": the last shard of both
# world sizes (34..47 with 4 ranks, 30..47 with 2) is all ignored.
SHARDS = {2: (30, 18), 4: (5, 17, 12, 14)}
SCATTERED = (1, 7, 8, 9, 20, 21, 35, 40)
LAST_SHARD = tuple(range(30, 48)) + (3, 4, 12)
CW = [0.5, 2.0, 1.0, 3.0, 0.25]

DDP_CASES = [
    Case("multiclass, class weights, uneven ignored", H.multiclass(5, ignore_index=-100, class_weights=CW),
         SCATTERED, False, 11),
    Case("multiclass, class weights, one rank all ignored", H.multiclass(5, ignore_index=-100, class_weights=CW),
         LAST_SHARD, False, 12),
    Case("binary, focal, sample weights with zeros, ignore_index",
         H.binary(ignore_index=-1, focal_gamma=2.0, class_weights=[0.3, 1.7]), SCATTERED, True, 13),
    Case("multilabel, smoothing, sample weights with zeros", H.multilabel(4, label_smoothing=0.1),
         SCATTERED, True, 14),
]


def _default_torch_loss(case: Case, z: Any, y: Any) -> Any:
    """PyTorch's own loss for the sparse multiclass heads: the default reduction (a weighted
    mean over the tensor it is given: this rank's shard)."""
    h = case.head
    return F.cross_entropy(z, y, weight=torch.tensor(h.class_weights, dtype=torch.float32),
                           ignore_index=h.ignore_index)


def _variants(case: Case) -> tuple[str, ...]:
    torch_default = case.head.task == "multiclass" and case.head.label_format == "sparse"
    return ("unihead", "unihead_terms", "unihead_accum", "naive") + (("torch",) if torch_default else ())


UNIHEAD_VARIANTS = ("unihead", "unihead_terms", "unihead_accum")


def micro_batches(world: int) -> list[tuple[int, int]]:
    """Variant "unihead_accum": each rank's shard in two micro-batches, a third and the rest
    (one example on rank 0 of four), as ``(size of the first, size of the second)`` per rank."""
    return [(n // 3, n - n // 3) for n in SHARDS[world]]


def _ddp_steps(rank: int, world: int) -> dict[str, Any]:
    """Every case and variant, one DDP step each, on this rank's shard: what rank 0 saw."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    results: dict[str, Any] = {}
    shard = pieces(SHARDS[world])[rank]
    for case in DDP_CASES:
        x, y, sw = case.data()
        x, y = x[shard], y[shard]
        sw = None if sw is None else sw[shard]
        c = case.compiled()
        criterion = c.loss_fn()
        for variant in _variants(case):
            model = DDP(case.model())
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            opt.zero_grad()
            if variant == "unihead_accum":  # two micro-batches, the first without DDP's sync
                first = micro_batches(world)[rank][0]
                parts = [slice(0, first), slice(first, len(y))]
                sub = lambda t, m: None if t is None else t[m]  # noqa: E731
                w = global_normalizer(sum(c.loss_weight(y[m], sub(sw, m)) for m in parts))
                with model.no_sync():
                    loss = criterion(model(x[parts[0]]), y[parts[0]], sub(sw, parts[0]), normalizer=w)
                    loss.backward()
                last = criterion(model(x[parts[1]]), y[parts[1]], sub(sw, parts[1]), normalizer=w)
                last.backward()
                loss = loss.detach() + last.detach()
            else:
                z = model(x)
                if variant == "unihead":  # what docs/scaling-out.md tells a user to write
                    loss = criterion(z, y, sw, normalizer=global_normalizer(c.loss_weight(y, sw)))
                elif variant == "unihead_terms":  # Megatron's (loss_sum, num_tokens)
                    total, weight = c.loss_terms(z, y, sw)
                    loss = total / global_normalizer(weight)
                else:
                    loss = c.loss(z, y, sw) if variant == "naive" else _default_torch_loss(case, z, y)
                loss.backward()
            logged = global_loss(loss)  # naive, torch: the mean over the ranks of their means
            grads = [p.grad.clone() for p in model.module.parameters()]
            opt.step()
            if rank == 0:
                results[f"{case.name}/{variant}"] = {
                    "params": [p.detach().numpy().copy() for p in model.module.parameters()],
                    "grads": [g.numpy() for g in grads],
                    "rank0_loss": float(loss.detach()),
                    "logged": float(logged),
                }
    return results


def _collectives(rank: int, world: int) -> dict[str, Any]:
    """``global_normalizer`` and ``global_loss`` themselves on this rank: what they returned and
    raised (every rank's goes to rank 0)."""
    import torch.distributed as dist

    seen: dict[str, Any] = {}
    w = torch.tensor(float(rank + 1))
    seen["averaged"] = float(global_normalizer(w))
    seen["summed"] = float(global_normalizer(w, average_gradients=False))
    seen["argument after"] = float(w)
    seen["int64"] = str(global_normalizer(torch.tensor(rank + 1)).dtype)
    seen["number"] = float(global_normalizer(rank + 1))
    seen["loss"] = float(global_loss(torch.tensor(float(rank))))
    seen["loss summed"] = float(global_loss(torch.tensor(float(rank)), average_gradients=False))
    pair = dist.new_group([0, 1])  # every rank creates every group
    try:
        seen["pair"] = float(global_normalizer(w, pair))
    except ValueError as exc:
        seen["pair"] = str(exc)
    try:  # one rank's weight is NaN: every rank raises, none waits for the others
        global_normalizer(float("nan") if rank == world - 1 else 1.0)
        seen["nan"] = "returned"
    except ValueError as exc:
        seen["nan"] = str(exc)
    return seen


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of the gloo group; rank 0 pickles what it saw."""
    import torch.distributed as dist

    with gloo_group(rank, world, port):
        results = _ddp_steps(rank, world)
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, _collectives(rank, world))
        results["collectives"] = seen
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(results, f)


DDP_TIMEOUT = 240  # seconds; the workers take about 10 (2 shared cores)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w} processes")
def ddp_run(request, tmp_path_factory) -> tuple[int, dict]:
    """The DDP steps of every case on ``world`` gloo processes (spawned once) and their wall time."""
    world = request.param
    out = str(tmp_path_factory.mktemp("ddp") / "rank0.pkl")
    seconds = spawn_gloo(_ddp_worker, world, out, DDP_TIMEOUT, "DDP")
    print(f"\n[ddp] {world} processes: spawned, all cases run, in {seconds:.1f} s")
    with open(out, "rb") as f:
        return world, pickle.load(f)


@pytest.mark.parametrize("case", DDP_CASES, ids=[c.name for c in DDP_CASES])
def test_ddp_step_equals_the_full_batch_step(ddp_run, case: Case):
    world, results = ddp_run
    ref = full_batch(case, SHARDS[world])  # the ranks' logits (see full_batch)
    plain = full_batch(case)  # the model on the whole batch at once: reported beside
    if "torch" in _variants(case):  # the reference is the weighted mean PyTorch itself computes
        x, y, _ = case.data()
        z = case.model()(x).detach()
        assert ulp_error(float(_default_torch_loss(case, z, y)), ref["loss"]) <= 2
    report = []
    accumulated = full_batch(case, tuple(n for pair in micro_batches(world) for n in pair))
    for variant in UNIHEAD_VARIANTS:
        r = results[f"{case.name}/{variant}"]
        this = accumulated if variant == "unihead_accum" else ref
        p = param_errors(r["params"], this)
        g = grad_errors(r["grads"], this)
        assert p["of_bound"] <= 1.0, (variant, p)
        assert g["ulp_of_terms"] <= grad_bound_ulp(N), (variant, g)
        logged_ulp = ulp_error(r["logged"], this["loss"])
        # the loss rank 0 logs (with accumulation, a rank's value is a sum of two: one more u)
        assert logged_ulp <= world + 3 + (variant == "unihead_accum"), (variant, r["logged"], this["loss"])
        report.append(f"{variant}: parameters {p['ulp']:.0f} ulp ({p['of_bound']:.2f} of the bound; "
                      f"{param_errors(r['params'], plain)['ulp']:.0f} ulp from the plain full batch), gradient "
                      f"{g['ulp_of_terms']:.1f} ulp of its terms, logged loss {logged_ulp:.0f} ulp")
    # what rank 0 sees as its loss: world * (its weighted sum) / W, not the global mean
    assert results[f"{case.name}/unihead"]["rank0_loss"] != pytest.approx(ref["loss"], rel=1e-3)
    for variant in _variants(case)[len(UNIHEAD_VARIANTS):]:
        r = results[f"{case.name}/{variant}"]
        p = param_errors(r["params"], ref)
        g = grad_errors(r["grads"], ref)
        # the mean of means is wrong by far more than the bound unihead's step is held to
        assert p["of_bound"] > 100, (variant, p)
        if variant == "torch" and case.name.endswith("one rank all ignored"):
            # F.cross_entropy's mean of a shard whose labels are all ignored is 0/0 (its
            # gradient is 0): the loss averaged over the ranks is NaN
            assert math.isnan(r["logged"])
            logged = "NaN"
        else:
            logged = f"{abs(r['logged'] - ref['loss']) / ref['loss']:.1%} off"
        report.append(f"{variant}: parameters {p['ulp']:.3g} ulp off, gradient {g['relative']:.1%} off, "
                      f"logged loss {logged}")
    print(f"\n[ddp {world} processes] {case.name}:\n  " + "\n  ".join(report))


def test_global_normalizer_over_a_process_group(ddp_run):
    """Rank r's weight is r + 1: the sum is world (world + 1) / 2 on every rank."""
    world, results = ddp_run
    total = world * (world + 1) / 2
    for rank, seen in enumerate(results["collectives"]):
        assert seen["averaged"] == total / world and seen["summed"] == total and seen["number"] == total / world
        assert seen["argument after"] == rank + 1  # reduced in a copy
        assert seen["int64"] == "torch.float32"
        assert seen["loss"] == sum(range(world)) / world and seen["loss summed"] == sum(range(world))
        if rank < 2:
            assert seen["pair"] == (1 + 2) / 2  # the group's own size
        else:
            assert "not a member" in seen["pair"]
        assert "finite and >= 0" in seen["nan"] and f"over the {world} process" in seen["nan"]


# ----------------------------------------------------------------------------- global_normalizer itself
def test_global_normalizer_without_distributed_is_the_weight():
    w = torch.tensor(7.5, requires_grad=True)
    got = global_normalizer(w)
    assert float(got) == 7.5 and not got.requires_grad and got.dtype == torch.float32
    got.add_(1.0)  # a copy: the argument is not modified
    assert float(w.detach()) == 7.5
    assert float(global_normalizer(12)) == 12.0 and global_normalizer(12).dtype == torch.float32
    assert global_normalizer(torch.tensor(3.0, dtype=torch.float64)).dtype == torch.float64
    assert global_normalizer(torch.tensor(3, dtype=torch.int64)).dtype == torch.float32
    assert float(global_normalizer(np.float32(2.5), average_gradients=False)) == 2.5
    assert float(global_normalizer(np.array(4.0))) == 4.0  # a NumPy backend's loss_weight
    assert float(global_loss(torch.tensor(0.25))) == 0.25


@pytest.mark.parametrize("bad, error, says", [
    (torch.ones(3), ValueError, "compiled.loss_weight"),
    (torch.ones(1), ValueError, "shape (1,)"),
    (True, TypeError, "got bool"),
    ("3", TypeError, "got str"),
    (None, TypeError, "got NoneType"),
    (torch.tensor(True), TypeError, "torch.bool"),
    (torch.tensor(1 + 1j), TypeError, "complex"),
    (float("nan"), ValueError, "finite and >= 0"),
    (float("inf"), ValueError, "finite and >= 0"),
    (-1.0, ValueError, "finite and >= 0"),
    (10**400, ValueError, "finite real number"),
    (np.ones(2), ValueError, "shape (2,)"),
    (np.array(["1"]), TypeError, "got ndarray"),
])
def test_global_normalizer_refuses_what_is_not_a_weight(bad, error, says):
    with pytest.raises(error, match=None) as info:
        global_normalizer(bad)
    assert says in str(info.value), str(info.value)


def test_global_normalizer_options_are_checked():
    with pytest.raises(ValueError, match="average_gradients must be one of True, False"):
        global_normalizer(1.0, average_gradients=1)
    with pytest.raises(ValueError, match="init_process_group"):
        global_normalizer(1.0, group=object())
    with pytest.raises(ValueError, match="log the 0-d"):
        global_loss(torch.ones(4))
    with unihead.validation(False):  # the value check is validation's
        assert math.isnan(float(global_normalizer(float("nan"))))
