"""Issue 18, the class-sharded (vocab-parallel) loss: the classes split over workers, each holding
the logits of its own classes, give the unsharded loss and gradients.

* **PyTorch** (:func:`unihead.backends.torch.class_sharded_loss`): gloo on 127.0.0.1, 2 and 4
  processes spawned by the test (``torch.multiprocessing.spawn``), uneven shards of 40 classes;
  every multiclass sparse option (ignore_index, smoothing, class weights, focal, sample weights,
  the three reductions, ``normalizer=``); the logits' gradient of each rank, and the gradients of
  a kernel split by columns and of the shared hidden state (its partial gradients all-reduced).
* **One process** (:func:`unihead._sharded.stacked_rows`, the code the collectives run on the
  shards' statistics stacked): 2 and 3 uneven shards.
* **JAX**: in tests/test_vocab_parallel_jax.py (a child process with 8 host devices).

Against the float64 loss of the full logits (the unsharded dense path on float64 inputs, exact to
float32's resolution), with the tolerance table of docs/semantics.md §11: the loss and the
per-example losses within 4 ulp, the gradient within 6 ulp of the larger of its two terms
(``scale * p`` and the target's term, taken here as ``max(|g|, scale * p)``), + 2γ for focal
heads.  The unsharded float32 loss (``compiled.loss`` of the full logits) is measured beside it
and held to the same bound.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead._ulp import ulp_error

from .conftest import require
from .spawned import gloo_group, spawn_gloo

torch = require("torch")
from unihead.backends.torch import class_sharded_loss  # noqa: E402

from .vocab_cases import BOUNDS, CASES, D, N, V, data, reference, tolerance  # noqa: E402


# ----------------------------------------------------------------------------- the gloo workers
def _worker_steps(rank: int, world: int) -> dict:
    """Every case on this rank's classes; returns this rank's losses and gradients."""
    a, b = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    out: dict[str, Any] = {"bounds": (a, b)}
    for name in CASES:
        z, y, sw = data(name)
        c = unihead.compile(H(**CASES[name]), "torch")
        for norm in ((None, 10.0) if CASES[name].get("reduction", "mean") != "none" else (None,)):
            zl = torch.tensor(z[:, a:b]).requires_grad_()
            loss = class_sharded_loss(c, zl, torch.tensor(y), None if sw is None else torch.tensor(sw),
                                      class_start=a, normalizer=norm)
            loss.sum().backward()
            out[(name, norm)] = (loss.detach().numpy(), zl.grad.numpy())
    # a kernel split by columns and the hidden state the ranks share (Megatron's column-parallel
    # linear): the hidden state's partial gradients all-reduced
    import torch.distributed as dist

    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D)).astype(np.float32)
    W = (rng.normal(size=(D, V)) * 0.8).astype(np.float32)
    bias = (rng.normal(size=V) * 0.3).astype(np.float32)
    y = rng.integers(0, V, N)
    c = unihead.compile(H(task="multiclass", num_classes=V, label_smoothing=0.1), "torch")
    h = torch.tensor(x, requires_grad=True)
    wl = torch.tensor(W[:, a:b], requires_grad=True)
    bl = torch.tensor(bias[a:b], requires_grad=True)
    loss = class_sharded_loss(c, h @ wl + bl, torch.tensor(y), class_start=a)
    loss.backward()
    dist.all_reduce(h.grad)
    out["linear"] = (float(loss), h.grad.numpy(), wl.grad.numpy(), bl.grad.numpy())
    # shards that do not cover the head's classes: every rank raises
    try:
        class_sharded_loss(c, torch.zeros(N, 2), torch.tensor(y), class_start=2 * rank)
        out["gap"] = "returned"
    except ValueError as exc:
        out["gap"] = str(exc)
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist

    with gloo_group(rank, world, port):
        res = _worker_steps(rank, world)
        seen: list[Any] = [None] * world
        dist.all_gather_object(seen, res)
        if rank == 0:
            with open(path, "wb") as f:
                pickle.dump(seen, f)


TIMEOUT = 180  # seconds; the workers take a few (2 shared cores)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w} processes")
def gloo_run(request, tmp_path_factory) -> tuple[int, list]:
    world = request.param
    path = str(tmp_path_factory.mktemp("vocab") / "ranks.pkl")
    seconds = spawn_gloo(_worker, world, path, TIMEOUT, "class-sharded")
    print(f"\n[vocab] {world} processes in {seconds:.1f} s")
    with open(path, "rb") as f:
        return world, pickle.load(f)


@pytest.mark.parametrize("name", list(CASES))
def test_gloo_shards_give_the_unsharded_loss_and_gradient(gloo_run, name):
    world, ranks = gloo_run
    z, y, sw = data(name)
    unsharded = unihead.compile(H(**CASES[name]), "torch")
    for norm in ((None, 10.0) if CASES[name].get("reduction", "mean") != "none" else (None,)):
        ref = reference(name, z, y, sw, norm)
        grad = np.concatenate([r[(name, norm)][1] for r in ranks], axis=-1)
        for r in ranks:  # every rank has the whole loss
            assert ulp_error(r[(name, norm)][0], ref["loss"]) <= tolerance(name, "loss"), (name, norm)
        err = ulp_error(grad, ref["grad"], scale=ref["scale"])
        assert err <= tolerance(name, "grad"), (name, norm, err)
        # the unsharded float32 path, beside it
        t = torch.tensor(z, requires_grad=True)
        dense = unsharded.loss(t, torch.tensor(y), None if sw is None else torch.tensor(sw), normalizer=norm)
        dense.sum().backward()
        assert ulp_error(dense.detach().numpy(), ref["loss"]) <= tolerance(name, "loss")
        assert ulp_error(t.grad.numpy(), ref["grad"], scale=ref["scale"]) <= tolerance(name, "grad")


def test_gloo_column_parallel_linear(gloo_run):
    """hidden @ kernel[:, shard] + bias[shard] on each rank: the loss, the kernel's and bias's
    gradients (concatenated over the ranks) and the hidden state's (all-reduced) equal the
    unsharded ones (float64 reference; float32 matmuls: the bound is the float32 dense path's own
    error times 2, plus 4 ulp)."""
    world, ranks = gloo_run
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D)).astype(np.float32)
    W = (rng.normal(size=(D, V)) * 0.8).astype(np.float32)
    bias = (rng.normal(size=V) * 0.3).astype(np.float32)
    y = rng.integers(0, V, N)
    head = H(task="multiclass", num_classes=V, label_smoothing=0.1)

    def run(dtype):
        c = unihead.compile(head, "torch")
        h, w, b = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (x, W, bias))
        loss = c.loss(h @ w + b, torch.tensor(y))
        loss.backward()
        return loss.item(), h.grad.numpy(), w.grad.numpy(), b.grad.numpy()

    ref, dense = run(torch.float64), run(torch.float32)
    got = (ranks[0]["linear"][0], ranks[0]["linear"][1],
           np.concatenate([r["linear"][2] for r in ranks], -1), np.concatenate([r["linear"][3] for r in ranks]))
    for r in ranks:
        assert r["linear"][0] == got[0] and np.array_equal(r["linear"][1], got[1])  # replicated
    for i in range(4):
        err_dense = np.max(np.abs(dense[i] - ref[i]))
        err = np.max(np.abs(got[i] - ref[i]))
        assert err <= 2 * err_dense + 4 * np.max(np.spacing(np.abs(np.float32(ref[i])))), (i, err, err_dense)


def test_gloo_shards_missing_classes_raise_on_every_rank(gloo_run):
    world, ranks = gloo_run
    for r in ranks:
        assert r["gap"].startswith("class_sharded_loss: the processes' local logits hold"), r["gap"]
        assert f"{2 * world} classes" in r["gap"]


# ----------------------------------------------------------------------------- one process
@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_stacked_shards_merge_like_the_collectives(name, shards):
    """The shards' statistics stacked and reduced in one process (the conformance column's code):
    per-example losses within the table of the float64 reference."""
    from unihead import _fused, _sharded
    from unihead.backends.torch import _OPS

    z, y, sw = data(name, seed=3)
    c = unihead.compile(H(**dict(CASES[name], reduction="none")), "torch")
    spec = _fused.row_spec(c._engine())
    b = BOUNDS[shards]
    zt = torch.tensor(z)
    yq = torch.tensor(np.where(y == (CASES[name].get("ignore_index") or -1), 0, y))
    fin = _sharded.stacked_rows(_OPS, [zt[:, b[i]:b[i + 1]] for i in range(shards)], yq, list(b[:-1]),
                                spec=spec)
    ref = unihead.compile(H(**dict(CASES[name], reduction="none", class_weights=None, ignore_index=None)),
                          "torch").loss(torch.tensor(z, dtype=torch.float64), yq)
    assert ulp_error(fin.loss.numpy(), ref.numpy()) <= tolerance(name, "loss")


def test_one_process_without_distributed_is_the_loss():
    c = unihead.compile(H(**CASES["smooth_ignore_cw"]), "torch")
    z, y, sw = data("smooth_ignore_cw")
    got = class_sharded_loss(c, torch.tensor(z), torch.tensor(y), class_start=0)
    assert ulp_error(got.numpy(), c.loss(torch.tensor(z), torch.tensor(y)).numpy()) <= 2


@pytest.mark.parametrize("head, says", [
    (H(task="multilabel", num_classes=5), "class_sharded_loss shards softmax heads"),
    (H(task="multiclass", num_classes=5, label_format="one_hot"), "'one_hot' labels"),
])
def test_refused_heads_say_what_to_write(head, says):
    c = unihead.compile(head, "torch")
    with pytest.raises(ValueError, match=says):
        class_sharded_loss(c, torch.zeros(2, 5), torch.zeros(2, 5), class_start=0)


def test_hostile_shards():
    c = unihead.compile(H(task="multiclass", num_classes=5), "torch")
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="outside the head's 5 classes"):
        class_sharded_loss(c, torch.zeros(2, 3), y, class_start=3)
    with pytest.raises(TypeError, match="class_start must be the id"):
        class_sharded_loss(c, torch.zeros(2, 3), y, class_start=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        class_sharded_loss(c, torch.zeros(2, 5, dtype=torch.int64), y, class_start=0)
    with pytest.raises(TypeError, match="PyTorch head"):
        class_sharded_loss(unihead.compile(H(task="multiclass", num_classes=5), "numpy"), torch.zeros(2, 5), y, class_start=0)
    with pytest.raises(ValueError, match="not a class id|class id"):
        class_sharded_loss(c, torch.zeros(2, 5), torch.tensor([0, 9]), class_start=0)
