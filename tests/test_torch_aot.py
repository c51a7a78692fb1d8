"""The compiled PyTorch kernels (backends/_torch_aot.py): within the tolerances of the float64
reference, built in the background once a head is hot, loaded from the cache, and not needed at
all: a machine without a C++ compiler gets numbers within the same tolerances from the eager
formulas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .conftest import REQUIRE_ALL, require

torch = require("torch")


def _aot():
    from unihead.backends import _torch_aot

    return _torch_aot


@pytest.fixture
def compiler():
    """Building kernels needs a C++ compiler: skipped without one (the no-compiler test covers
    such machines), except in CI, which has one and must run these tests."""
    if not _aot().compiler_available():
        if REQUIRE_ALL:
            pytest.fail("CI must have a C++ compiler to test the compiled kernels")
        pytest.skip("no C++ compiler on this machine (test_no_compiler_* covers that case)")

# One kernel per (head, sample-weight rank): each build takes seconds, so few heads, many inputs.
HEADS = [
    (H.multiclass(10), False),
    (H.binary(), False),
    (H.multilabel(6), False),
    (H.multiclass(7, label_smoothing=0.1, class_weights=[1, 2, 3, 1, 1, 0.5, 2], ignore_index=-100), True),
]


def _inputs(head, n, regime, rng, weighted):
    k = head.num_outputs
    z = rng.normal(size=(n, k)) * 3
    if regime == "large30":
        z = rng.uniform(-30, 30, size=(n, k))
    elif regime == "confident":  # the right class 20..89 above the others: tiny losses
        z = rng.normal(size=(n, k))
    elif regime == "masked" and head.task == "multiclass":
        z[:, 1] = -np.inf
    z = z.astype(np.float32)
    if head.task == "multiclass":
        y = rng.integers(0, k, n)
        if regime == "masked":
            y = np.where(y == 1, 0, y)
        if regime == "confident":
            z[np.arange(n), y] = z.max(-1) + rng.choice([20.0, 30.0, 60.0, 89.0], size=n)
        if head.ignore_index is not None:
            y[::5] = head.ignore_index
        y = torch.as_tensor(y)
    elif head.task == "binary":
        y = torch.as_tensor((rng.uniform(size=n) < 0.5).astype(np.float32))
        if regime == "confident":  # losses down to e**-100: subnormal from e**-87.3 on
            z[:, 0] = np.where(y.numpy() > 0, 1, -1) * rng.choice([20.0, 40.0, 89.0, 100.0], size=n)
    else:
        y = torch.as_tensor((rng.uniform(size=(n, k)) < 0.3).astype(np.float32))
        if regime == "confident":
            z = (np.where(y.numpy() > 0, 1, -1) * rng.choice([20.0, 40.0, 89.0, 100.0], size=(n, k))).astype(np.float32)
    sw = torch.as_tensor(rng.uniform(0, 2, n).astype(np.float32)) if weighted else None
    if sw is not None:
        sw[::7] = 0
    return torch.as_tensor(z), y, sw


def _loss_and_grad(compiled, z, y, sw):
    x = z.clone().requires_grad_()
    loss = compiled.loss(x, y, sw)
    loss.sum().backward()
    return loss.detach(), x.grad


def _reference_errors(head, z, y, sw, loss, grad):
    """The worst ulp errors of a loss and its gradient against the float64 reference of the
    conformance suite (conformance/reference.py; no formula code shared with the backends): the
    reduced loss and the per-example losses at their own size, gradients at the size of their
    terms (docs/semantics.md §11)."""
    from unihead._ulp import ulp_error
    from unihead.conformance.reference import F64Reference

    ref = F64Reference(head).evaluate(z.double().numpy(), y.numpy(), None if sw is None else sw.double().numpy())
    key = "none" if head.reduction == "none" else "loss"
    return (ulp_error(loss.numpy(), np.asarray(ref[key])),
            ulp_error(grad.numpy(), np.asarray(ref["grad"]), scale=np.asarray(ref["grad_scale"])))


@pytest.mark.slow
@pytest.mark.parametrize("head, weighted", HEADS, ids=lambda v: repr(v) if isinstance(v, H) else str(v))
def test_compiled_kernel_gives_the_eager_numbers_or_the_float32_formulas_within_tolerance(head, weighted, compiler):
    """A softmax head's kernel runs the eager path's wide formulas: the same numbers bit for bit.
    A sigmoid head's runs the float32 formulas (error-free transformations): within
    docs/semantics.md §11 of the float64 reference (4 ulp for values, 6 for gradients at the size
    of their terms), as the eager formulas are, not bit for bit.  Every size the kernel takes
    (up to FUSED_MIN_ELEMENTS logits for a sigmoid head), every regime."""
    from unihead.backends import _torch_aot, torch as backend

    same_numbers = not _torch_aot.float32_formulas(head)
    heads = (head, head.replace(reduction="none"))
    compiled = {}
    for h in heads:
        compiled["kernel", h] = unihead.compile(h, "torch", fused=True)
        assert compiled["kernel", h].warmup(sample_weight=weighted)  # built (or loaded) and in use
        compiled["eager", h] = unihead.compile(h, "torch", fused=False)
    fused = compiled["kernel", head]
    rng = np.random.default_rng(0)
    rows = (1, 3, 64, 256, 4096)  # one-thread and parallel kernels
    if not same_numbers:  # a sigmoid head's kernels take every size below FUSED_MIN_ELEMENTS
        rows += ((backend.FUSED_MIN_ELEMENTS - 1) // head.num_outputs,)
    worst = {"kernel": [0.0, 0.0], "eager": [0.0, 0.0]}
    for regime in ("ordinary", "large30", "confident", "masked"):
        for n in rows:
            z, y, sw = _inputs(head, n, regime, rng, weighted)
            for h in heads:
                out = {}
                for name in ("kernel", "eager"):
                    out[name] = loss, grad = _loss_and_grad(compiled[name, h], z, y, sw)
                    errs = _reference_errors(h, z, y, sw, loss, grad)
                    assert errs[0] <= 4 and errs[1] <= 6, (name, regime, n, h.reduction, errs)
                    worst[name] = [max(a, b) for a, b in zip(worst[name], errs)]
                if same_numbers:
                    (lf, gf), (le, ge) = out["kernel"], out["eager"]
                    assert torch.equal(lf, le), (regime, n, lf, le)
                    assert torch.equal(gf, ge), (regime, n, (gf - ge).abs().max())
    print(head, "worst ulp (loss, gradient):", worst)
    # strided logits and labels (a slice of a wider output, a column of a matrix) are read as
    # what they are, not as the memory under them: the same numbers as their dense copies
    z, y, sw = _inputs(head, 16, "ordinary", rng, weighted)
    wide = torch.cat([z, torch.randn_like(z)], dim=-1)[:, : z.shape[-1]]
    y2 = torch.stack([y, y], dim=-1)[..., 0] if y.dim() == 1 else torch.cat([y, y], dim=-1)[:, : y.shape[-1]]
    assert not wide.is_contiguous() and not y2.is_contiguous()
    lf, gf = _loss_and_grad(fused, wide, y2, sw)
    le, ge = _loss_and_grad(fused, z, y, sw)
    assert torch.equal(lf, le) and torch.equal(gf, ge)
    # leading dimensions are flattened into the kernel's rows
    z, y, sw = _inputs(head, 12, "ordinary", rng, weighted)
    z3 = z.reshape(3, 4, -1)
    y3 = y.reshape(3, 4, *y.shape[1:])
    sw3 = None if sw is None else sw.reshape(3, 4)
    lf, gf = _loss_and_grad(fused, z3, y3, sw3)
    le, ge = _loss_and_grad(fused, z, y, sw)
    assert torch.equal(lf, le) and torch.equal(gf.reshape(ge.shape), ge)
    if weighted:  # one weight per sequence: broadcast over the positions before flattening
        lf, gf = _loss_and_grad(fused, z3, y3, sw3[:, 0])
        le, ge = _loss_and_grad(fused, z, y, sw3[:, 0].repeat_interleave(4))
        assert torch.equal(lf, le) and torch.equal(gf.reshape(ge.shape), ge)
    entries = [e for (ndim, _), e in fused._kernels.aot._entries.items() if ndim == (1 if weighted else 0)]
    assert entries and all(e.state == "ready" for e in entries)


@pytest.mark.slow
def test_a_hot_sigmoid_head_keeps_only_its_inputs_for_the_backward_pass(compiler):
    """As BCEWithLogits: between the forward and the backward pass a sigmoid head with its
    compiled kernels keeps nothing but the logits and labels (the gradient kernel recomputes from
    them), on the short path of TorchHead.loss and the general one (leading dimensions); the
    gradient is the eager formulas' within the tolerances (reference: docs/semantics.md §11).
    A softmax head keeps its gradient, as F.cross_entropy keeps its log-softmax."""
    rng = np.random.default_rng(3)
    for head, shape in ((H.binary(), (40960, 1)), (H.multilabel(10), (4096, 10)), (H.multiclass(10), (256, 10))):
        c = unihead.compile(head, "torch", fused=True)
        assert c.warmup()
        z, y, _ = _inputs(head, shape[0], "ordinary", rng, False)
        for lead in ((shape[0],), (4, shape[0] // 4)):
            zl, yl = z.reshape(*lead, -1), y.reshape(*lead, *y.shape[1:])
            x = zl.clone().requires_grad_()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                loss = c.loss(x, yl)
            kept = {t.untyped_storage().data_ptr() for t in saved} - {
                x.untyped_storage().data_ptr(), yl.untyped_storage().data_ptr()}
            if head.activation == "sigmoid":
                assert not kept, (head, lead)
            else:
                assert sum(t.untyped_storage().nbytes() for t in saved) == x.numel() * 4, (head, lead)
            loss.backward()
            grad = x.grad.reshape(-1, shape[1])
            errs = _reference_errors(head, zl.reshape(-1, shape[1]), y, None, loss.detach(), grad)
            assert errs[0] <= 4 and errs[1] <= 6, (head, lead, errs)


@pytest.mark.slow
def test_a_heads_parallel_kernels_give_the_numbers_of_its_serial_ones(compiler):
    """A head's kernels exist twice, exported with a small and a large example (Inductor spreads
    only the second's loops over the cores); inputs of parallel_from(head) logits or more run
    the parallel ones.  Both compute the same function: per-example losses and gradients bit for
    bit, the mean within one ulp (its float64 sum, taken in another order, may round to the
    neighbouring float32)."""
    from unihead._ulp import ulp_error
    from unihead.backends import _torch_aot as A

    rng = np.random.default_rng(5)
    for head in (H.binary(), H.multilabel(6), H.multiclass(10)):  # of HEADS: kernels built once a session
        label_dtype = torch.int64 if head.label_format == "sparse" else torch.float32
        runners = {}
        for h in (head, head.replace(reduction="none")):
            c = unihead.compile(h, "torch", fused=True)
            assert c.warmup()
            runners[h.reduction] = c._kernels.aot.runner(0, label_dtype)
            assert isinstance(runners[h.reduction], A._Runner)
        sigmoid = head.activation == "sigmoid"
        for n in (1, 7, 256, 4096):
            z, y, _ = _inputs(head, n, "ordinary", rng, False)
            args = [z, y]
            r = runners["none"]
            pairs = [(r._run, r._run_parallel)] + ([(r._grad, r._grad_parallel)] if sigmoid else [])
            for serial, parallel in pairs:
                for x, x_par in zip(serial(args), parallel(args)):
                    assert torch.equal(x, x_par), (head, n)
            r = runners["mean"]
            (m, *rest), (m_par, *rest_par) = r._run(args), r._run_parallel(args)
            assert ulp_error(m.numpy(), m_par.numpy()) <= 1, (head, n)
            for x, x_par in zip(rest, rest_par):  # the gradient and the flags of bad values
                assert torch.equal(x, x_par), (head, n)
        # the parallel kernels' loops are OpenMP regions with the caller's thread count, the others' not
        entry = next(iter(c._kernels.aot._entries.values()))
        for part in entry.parts:
            with zipfile.ZipFile(A.part_path(entry.path, part)) as package:
                code = "".join(package.read(name).decode() for name in package.namelist()
                               if name.endswith(".kernel.cpp"))
            assert ("#pragma omp parallel" in code) == part.endswith("-parallel"), (head, part)
            assert "num_threads(" not in code, (head, part)
        # which one runs
        calls = []
        r = runners["none"]
        r._run, r._run_parallel = (lambda a: calls.append("serial")), (lambda a: calls.append("parallel"))
        r._grad, r._grad_parallel = r._run, r._run_parallel
        first = A.parallel_from(head)
        assert first == (8192 if sigmoid else 2048)
        for k in (first - 1, first):
            r.run([torch.zeros(k, 1)])
            r.grad([torch.zeros(k // 2, 2)])
        assert calls == ["serial", "serial", "parallel", "parallel"]


def test_a_parallel_kernel_is_exported_with_at_least_two_rows():
    """torch.export fixes a dimension whose example size is 1 to a constant: a head of 2**17
    classes or more still gets a parallel kernel for any number of rows."""
    A = _aot()
    for k, rows in ((10, 13108), (2**17, 2), (256000, 2)):
        sig = A.Signature(H.multiclass(k).to_json(), 0, "int64")
        z, labels = A.example_inputs(sig, "main-parallel")
        assert z.shape == (rows, k) and labels.shape == (rows,)
        assert A.example_inputs(sig, "main")[0].shape == (16, k)


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_the_kernel_is_only_offered_inputs_it_is_fast_for(monkeypatch, task):
    """A softmax head's kernels (the wide formulas) run up to 256 rows below 2048 logits (the
    one-thread kernel) and up to 8192 rows from there on (the parallel one): Inductor's code for
    them costs more per row than the eager kernels; a sigmoid head's (the float32 formulas) run
    at every size.  Neither takes 2**18 logits or more (those take the torch.compile kernels).
    Both the short path of TorchHead.loss and the general one ask for them then, and only then.
    (A regression: 256 rows of 32000 classes went to it.)"""
    offered = {  # (rows, classes, weighted): asked for the kernel
        (64, 200, False): True, (64, 200, True): True, (256, 200, False): True, (1310, 200, False): True,
        (1311, 200, False): False, (1311, 200, True): False, (5, 32000, False): True, (9, 32000, False): False,
        (256, 4, False): True, (300, 4, False): task == "multilabel", (512, 4, False): True,
        (8192, 4, True): True, (8193, 4, False): task == "multilabel", (65535, 4, False): task == "multilabel",
        (65536, 4, False): False, (1023, 2, False): task == "multilabel", (1024, 2, False): True,
    }
    compiled, asked = {}, []
    for (n, k, weighted), expected in offered.items():
        if k not in compiled:
            head = H.multiclass(k) if task == "multiclass" else H.multilabel(k)
            compiled[k] = unihead.compile(head, "torch")
            monkeypatch.setattr(compiled[k]._kernels.aot, "runner", lambda *a, **kw: asked.append(a) or None)
        asked.clear()
        z = torch.randn(n, k)
        sw = torch.ones(n) if weighted else None
        y = torch.randint(0, k, (n,)) if task == "multiclass" else (torch.rand(n, k) < 0.5).float()
        compiled[k].loss(z, y, sw)
        assert bool(asked) == expected, (n, k, weighted)


def test_labels_in_other_dtypes_take_kernels_of_their_own(compiler):
    """int32 ids, integer 0/1 labels of a binary head: the kernel converts them itself, with the
    numbers of the eager path; what validation refuses never reaches a kernel."""
    z = torch.randn(16, 2)
    for head, y in ((H.multiclass(2), torch.randint(0, 2, (16,), dtype=torch.int32)),
                    (H.binary(binary_units=2), torch.randint(0, 2, (16,)))):
        c = unihead.compile(head, "torch", fused=True)
        assert c.warmup(label_dtype=y.dtype)
        lf, gf = _loss_and_grad(c, z, y, None)
        le, ge = _loss_and_grad(unihead.compile(head, "torch", fused=False), z, y, None)
        assert torch.equal(lf, le) and torch.equal(gf, ge)
        assert c._kernels.aot._entries[(0, y.dtype)].state == "ready"
    with pytest.raises(TypeError, match="class ids for label_format='sparse'"):  # refused, not converted
        unihead.compile(H.multiclass(2), "torch", fused=True).loss(z, torch.zeros(16, dtype=torch.bool))


@pytest.mark.slow
def test_bad_labels_through_the_kernel_get_the_same_errors(compiler):
    c = unihead.compile(H.multiclass(10), "torch", fused=True)
    assert c.warmup()
    z = torch.zeros(5, 10)
    for bad, message in (([0, 1, 10, 2, 0], r"labels\[2\] = 10 is not a class id"),
                         ([0, -1, 1, 2, 0], r"labels\[1\] = -1 is not a class id")):
        with pytest.raises(ValueError, match=message) as err:
            c.loss(z, torch.tensor(bad))
        with pytest.raises(ValueError) as eager_err:
            unihead.compile(H.multiclass(10), "numpy").loss(z.numpy(), np.array(bad))
        assert str(err.value) == str(eager_err.value)
        # validation off: an id out of range is still unihead's error, not the kernel's
        with pytest.raises(ValueError, match=message):
            unihead.compile(H.multiclass(10), "torch", fused=True, validate=False).loss(z, torch.tensor(bad))
    b = unihead.compile(H.binary(), "torch", fused=True)
    assert b.warmup()
    with pytest.raises(ValueError, match=r"labels\[2\] = 3 is not a binary label"):
        b.loss(torch.zeros(5, 1), torch.tensor([0, 1, 3, 1, 0]))


@pytest.mark.slow
def test_a_hot_head_is_compiled_in_the_background_and_then_used(tmp_path, monkeypatch, compiler):
    A = _aot()
    monkeypatch.setenv("UNIHEAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(A, "HOT_CALLS", 5)
    monkeypatch.setattr(A, "POLL_EVERY", 1)
    head = H.multiclass(5)
    c = unihead.compile(head, "torch")  # fused="auto"
    eager = unihead.compile(head, "torch", fused=False)
    z, y = torch.randn(32, 5), torch.randint(0, 5, (32,))
    want = eager.loss(z, y)
    other = unihead.compile(head, "torch")  # say, another process: it must not build it again
    t0 = time.time()
    calls = 0
    while True:  # every call answers at once, with the same numbers, before and after
        assert torch.equal(c.loss(z, y), want)
        calls += 1
        entry = c._kernels.aot._entries[(0, y.dtype)]
        if entry.state == "building":
            break
        assert calls <= A.HOT_CALLS, "no build started"
    assert calls == A.HOT_CALLS  # counted once per call
    for _ in range(A.HOT_CALLS):
        assert torch.equal(other.loss(z, y), want)
    assert other._kernels.aot._entries[(0, y.dtype)].state == "waiting"  # the lock file
    assert c.warmup()  # waits for the build that is running
    assert entry.state == "ready" and time.time() - t0 < 300
    for _ in range(A.POLL_EVERY):
        other.loss(z, y)
    assert other._kernels.aot._entries[(0, y.dtype)].state == "ready"  # loaded, not rebuilt
    assert torch.equal(c.loss(z, y), want)
    assert list(Path(tmp_path, "torch-aot").glob("*.pt2"))
    # a new head of the same spec (or a new process) loads the kernel at its first call
    again = unihead.compile(head, "torch")
    assert torch.equal(again.loss(z, y), want)
    assert again._kernels.aot._entries[(0, y.dtype)].state == "ready"


@pytest.mark.slow
def test_no_compiler_every_path_gives_the_same_numbers(tmp_path):
    """With no C++ compiler on PATH (a subprocess), compiled kernels are not built and the
    eager formulas run: every path (small and large inputs, fused on or off) gives the numbers the
    eager formulas give here, where a compiler may be present, and large inputs numbers within
    the tolerances."""
    cases = [
        (H.multiclass(10), (64, 10)),
        (H.binary(), (64, 1)),
        (H.multilabel(6, label_smoothing=0.1), (16, 6)),
        (H.multiclass(1000), (300, 1000)),  # above FUSED_MIN_ELEMENTS: the fused float32 kernels
        (H.multilabel(600), (500, 600)),  # ... and without them a sigmoid head's gradient is recomputed
    ]
    script = r'''
import json, sys, warnings
import numpy as np, torch, unihead
from unihead.backends import _torch_aot
warnings.simplefilter("ignore")
assert not _torch_aot.compiler_available()
data = np.load(sys.argv[2])
out = {}
for i, spec in enumerate(json.loads(sys.argv[1])):
    head = unihead.ClassificationHead.from_json(spec)
    z, y = torch.as_tensor(data[f"z{i}"]), torch.as_tensor(data[f"y{i}"])
    for fused in ("auto", True, False):
        c = unihead.compile(head, "torch", fused=fused)
        if fused is not False:
            assert c.warmup() is False  # nothing to build with
        x = z.clone().requires_grad_()
        loss = c.loss(x, y)
        loss.backward()
        out[f"{i}-{fused}"] = [loss.item(), x.grad.numpy().tolist()]
print(json.dumps(out))
'''
    inputs = {}
    for i, (head, shape) in enumerate(cases):
        rng = np.random.default_rng(i)
        inputs[f"z{i}"] = (rng.normal(size=shape) * 4).astype(np.float32)
        if head.task == "multiclass":
            inputs[f"y{i}"] = rng.integers(0, shape[1], shape[0])
        elif head.task == "binary":
            inputs[f"y{i}"] = (rng.uniform(size=shape[0]) < 0.5).astype(np.float32)
        else:
            inputs[f"y{i}"] = (rng.uniform(size=shape) < 0.3).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", **inputs)
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CC")}
    env.update(PATH=str(empty), UNIHEAD_CACHE_DIR=str(tmp_path / "cache"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ind"))
    specs = json.dumps([h.to_json() for h, _ in cases])
    res = subprocess.run([sys.executable, "-c", script, specs, str(tmp_path / "inputs.npz")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads(res.stdout.strip().splitlines()[-1])
    for i, (head, shape) in enumerate(cases):
        z, y = torch.as_tensor(inputs[f"z{i}"]), torch.as_tensor(inputs[f"y{i}"])
        ref_loss, ref_grad = unihead.compile(head, "numpy").loss_and_gradient(z.double().numpy(), y.numpy())
        c = unihead.compile(head, "torch", fused=False)  # the eager formulas (a kernel built by
        x = z.clone().requires_grad_()                    # an earlier test may be in the cache)
        loss = c.loss(x, y)
        loss.backward()
        for fused in ("auto", "True", "False"):
            t_loss, t_grad = theirs[f"{i}-{fused}"]
            t_grad = np.asarray(t_grad, np.float32)
            if x.numel() < (1 << 18):  # the eager wide formulas on both sides: bit for bit
                assert t_loss == loss.item() and np.array_equal(t_grad, x.grad.numpy()), (head, fused)
            # and within the tolerance of docs/semantics.md §11 of the float64 reference, always
            ulp = np.spacing(np.float32(abs(ref_loss)))
            assert abs(t_loss - ref_loss) <= 4 * ulp, (head, fused, t_loss, ref_loss)
            gulp = np.spacing(np.abs(ref_grad).astype(np.float32)).astype(np.float64)
            assert (np.abs(t_grad - ref_grad) / gulp).max() <= 6, (head, fused)


def test_background_builds_take_the_machines_build_slots(tmp_path, monkeypatch):
    """Many hot heads at once (a sweep, the conformance suite) start one background build at a
    time (``BUILD_SLOTS``), not one per head: a head that finds the slots taken keeps its eager
    formulas and asks again every ``POLL_EVERY`` calls; a build frees its slot when it ends."""
    A = _aot()
    monkeypatch.setenv("UNIHEAD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(A, "HOT_CALLS", 3)
    monkeypatch.setattr(A, "POLL_EVERY", 2)
    monkeypatch.setattr(A, "compiler_available", lambda: True)
    started: list = []

    class FakeBuild:  # the build process: records its argv, ends when told to
        def __init__(self, argv, **kw):
            self.argv, self.returncode = argv, None
            started.append(self)

        def poll(self):
            return self.returncode

        def wait(self):
            self.returncode = 1
            return 1

    monkeypatch.setattr(A, "subprocess", types.SimpleNamespace(Popen=FakeBuild, DEVNULL=subprocess.DEVNULL))
    sigs = [A.Signature(head=H.multiclass(k).to_json(), weight_ndim=0, label_dtype="int64") for k in (3, 4, 5)]
    entries = [A._Entry(s) for s in sigs]
    for _ in range(A.HOT_CALLS):
        for e in entries:
            e.get("auto")
    assert [e.state for e in entries] == ["building", "new", "new"] and len(started) == 1
    slot = Path(started[0].argv[-1])
    assert slot.exists() and slot.name == "build-slot-0.lock"
    for _ in range(4):  # the slot is taken: the others ask again, and wait
        for e in entries[1:]:
            e.get("auto")
    assert len(started) == 1
    started[0].returncode = 1  # the build ends (here: failed); its parent sees it when it polls
    for _ in range(A.POLL_EVERY):
        entries[0].get("auto")
    assert entries[0].state == "off" and not slot.exists()
    for _ in range(A.POLL_EVERY):
        entries[1].get("auto")
    assert entries[1].state == "building" and len(started) == 2


def test_a_kernel_cache_pickles_with_its_formulas():
    """A pickled kernel cache knows again which formulas its head's kernels run (derived from the
    head, not stored)."""
    import pickle

    for head, narrow in ((H.multilabel(4), True), (H.binary(), True), (H.multiclass(4), False)):
        cache = pickle.loads(pickle.dumps(_aot().KernelCache(head, "auto")))
        assert cache.float32_formulas is narrow and cache.head_json == head.to_json()
        entry = cache._entry(0, torch.float32)
        assert entry.parts == (("loss", "grad", "loss-parallel", "grad-parallel") if narrow
                               else ("main", "main-parallel"))
