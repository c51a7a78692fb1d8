"""PyTorch backend: numbers, autograd, transforms, modules, devices and dtypes, validation,
native equivalence and end-to-end training."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .backend_checks import assert_agrees_with_numpy64
from .cases import HEADS, labels_for
from .conftest import require

torch = require("torch")
nn = torch.nn
F = torch.nn.functional
from unihead.backends.torch import HeadLinear, HeadLoss, TorchHead  # noqa: E402


def compiled(head, **kw):
    return unihead.compile(head, "torch", **kw)


def runner(fused):
    def run(head, z, y, sw):
        c = compiled(head, fused=fused)
        zt = torch.tensor(z, requires_grad=True)
        yt = torch.as_tensor(y)
        swt = None if sw is None else torch.as_tensor(sw)
        loss = c.loss(zt, yt, swt)
        loss.sum().backward()
        none = compiled(head.replace(reduction="none"), fused=fused).loss(torch.tensor(z), yt, swt)
        return {
            "probabilities": c.probabilities(torch.tensor(z)).numpy(),
            "log_probabilities": c.log_probabilities(torch.tensor(z)).numpy(),
            "loss": loss.detach().numpy(),
            "none": none.numpy(),
            "grad": zt.grad.numpy(),
            "predict": c.predict(torch.tensor(z)).numpy(),
        }

    return run


# ------------------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("head", HEADS, ids=repr)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "sample_weight"])
def test_float32_agrees_with_numpy_float64_on_extreme_logits(head, weighted):
    assert_agrees_with_numpy64(head, runner(fused=False), weighted)


FUSED_HEADS = [
    H.multiclass(4, label_smoothing=0.1, class_weights=[0.5, 2.0, 1.0, 3.0], ignore_index=-100),
    H.multiclass(5, label_format="probabilities", focal_gamma=1.0),
    H.multilabel(4, pos_weight=[1.0, 2.0, 0.5, 4.0], class_weights=[1, 0, 2, 1], reduction="sum"),
    H.binary(binary_units=2, label_smoothing=0.2, pos_weight=3.0),
]


@pytest.mark.slow
@pytest.mark.parametrize("head", FUSED_HEADS, ids=repr)
def test_fused_kernels_agree_with_numpy_float64(head):
    """The compiled (fused) kernels: the same formulas, the same accuracy."""
    assert_agrees_with_numpy64(head, runner(fused=True), weighted=True)


@pytest.mark.slow
def test_fused_path_is_used_for_large_inputs_and_is_as_accurate():
    head = H.multiclass(1000, reduction="sum")  # hard labels: a gradient's ulp is the value's own
    auto, eager = compiled(head), compiled(head, fused=False)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 1000, generator=g) * 8
    z[::7, 3] += 40  # confident rows: tiny losses and gradients
    y = torch.randint(0, 1000, (512,), generator=g)
    y[::14] = 3
    assert auto._use_fused(z) and not eager._use_fused(z) and not auto._use_fused(z[:8])
    ref_loss, ref_grad = unihead.compile(head, "numpy").loss_and_gradient(z.double().numpy(), y.numpy())
    for c in (auto, eager):
        zz = z.clone().requires_grad_()
        loss = c.loss(zz, y)
        loss.backward()
        ulp = np.spacing(np.abs(ref_grad).astype(np.float32)).astype(np.float64)
        err = np.abs(zz.grad.double().numpy() - ref_grad) / ulp
        assert err.max() <= 4, (c.fused, err.max())
        assert abs(loss.item() - ref_loss) <= 4 * np.spacing(np.float32(ref_loss))
    assert auto._kernels._fused is not None and not auto._kernels.failed


# ------------------------------------------------------------------------------ autograd
def _float64_case(head, n=5, seed=0):
    rng = np.random.default_rng(seed)
    z = torch.tensor(rng.normal(size=(n, head.num_outputs)) * 2, dtype=torch.float64, requires_grad=True)
    y = torch.as_tensor(labels_for(head, n, rng))
    sw = torch.as_tensor(rng.uniform(0.5, 2.0, size=(n, head.num_classes) if head.task == "multilabel" else n))
    return z, y, sw


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_gradcheck_float64(head):
    z, y, sw = _float64_case(head)
    c = compiled(head, fused=False)
    assert torch.autograd.gradcheck(lambda t: c.loss(t, y, sw), (z,))
    if head.reduction == "none":
        assert torch.autograd.gradcheck(lambda t: c.loss(t, y), (z,))


def test_gradients_reach_the_layer_and_have_the_logits_dtype():
    head = H.multiclass(3)
    c = compiled(head)
    layer = c.layer(4)
    x = torch.randn(6, 4)
    loss = c.loss(layer(x), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (3, 4)
    for dt in (torch.float16, torch.bfloat16):
        z = torch.randn(6, 3).to(dt).requires_grad_()
        out = c.loss(z, torch.tensor([0, 1, 2, 0, 1, 2]))
        assert out.dtype == torch.float32  # computed in float32, as autocast does for losses
        out.backward()
        assert z.grad.dtype == dt
        ref = c.loss(z.detach().float(), torch.tensor([0, 1, 2, 0, 1, 2]))
        assert out.item() == ref.item()
    assert c.probabilities(torch.randn(2, 3).bfloat16()).dtype == torch.float32


def test_no_grad_and_inference_mode():
    c = compiled(H.multilabel(3))
    z, y = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    ref = c.loss(z, y)
    with torch.no_grad():
        assert c.loss(z.requires_grad_(), y).item() == ref.item()
    with torch.inference_mode():
        assert c.loss(torch.randn(4, 3), y).requires_grad is False
        assert c.probabilities(z).shape == (4, 3)


# ------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize(
    "head", [H.multiclass(5, label_smoothing=0.1), H.multilabel(3, focal_gamma=2.0), H.binary(binary_units=2)], ids=repr
)
def test_torch_func_grad_and_vmap(head):
    c = compiled(head)
    rng = np.random.default_rng(1)
    zs = torch.tensor(rng.normal(size=(3, 6, head.num_outputs)), dtype=torch.float32)
    ys = torch.stack([torch.as_tensor(labels_for(head, 6, rng)) for _ in range(3)])
    batched = torch.func.vmap(lambda z, y: c.loss(z, y))(zs, ys)
    looped = torch.stack([c.loss(zs[i], ys[i]) for i in range(3)])
    torch.testing.assert_close(batched, looped)
    grads = torch.func.vmap(torch.func.grad(lambda z, y: c.loss(z, y)))(zs, ys)
    for i in range(3):
        z = zs[i].clone().requires_grad_()
        c.loss(z, ys[i]).backward()
        torch.testing.assert_close(grads[i], z.grad)


@pytest.mark.slow
@pytest.mark.parametrize("head", [H.multiclass(5, label_smoothing=0.1, ignore_index=-1), H.multilabel(3),
                                  # 9 to 32 classes: the label's entry put with a select when traced
                                  H.multiclass(12, label_smoothing=0.1, ignore_index=-1),
                                  # 3 to 11 classes: the row sum adds columns when traced
                                  H.multiclass(10, ignore_index=-1)], ids=repr)
def test_torch_compile_fullgraph(head):
    c = compiled(head)
    torch.manual_seed(2)
    layer = c.layer(8)
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.normal(size=(6, 8)), dtype=torch.float32)
    y = torch.as_tensor(labels_for(head, 6, rng))
    if head.task == "multiclass":  # a row whose label is its maximum: the gradient's other branch
        with torch.no_grad():
            y[0] = layer(x)[0].argmax()

    def step(x, y):
        return c.loss(layer(x), y)

    eager = step(x, y)
    eager.backward()
    grad = layer.weight.grad.clone()
    layer.weight.grad = None
    out = torch.compile(step, fullgraph=True)(x, y)  # fullgraph: a graph break is an error
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(layer.weight.grad, grad)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_traced_target_branch_and_materialized_values_are_the_eager_ones(dtype):
    """Traced, ``TorchOps.where_top`` blends by ``sign(gap)`` and ``materialize`` writes its input
    out (the note above ``TorchOps``): the values are those of ``where(gap == 0, a, b)`` and of the
    input itself, for each kind of distance from the row maximum (0, subnormal, tiny, ordinary,
    far, a masked target's -inf) and values of either sign, zeros among them: the signs of zeros
    too, but for a zero ``b`` (the formulas pass no -0.0; ``Ops.where_top``)."""
    from unihead.backends.torch import TorchOps

    ops = TorchOps(wide=False)
    tiny = torch.finfo(dtype).smallest_normal
    gap = torch.tensor([0.0, -tiny / 4, -tiny, -1e-7, -1.0, -100.0, -float("inf")], dtype=dtype).repeat(4)
    rng = np.random.default_rng(7)
    a = torch.tensor(rng.normal(size=gap.shape) * 10.0 ** rng.integers(-30, 30, size=gap.shape), dtype=dtype)
    b = torch.tensor(rng.normal(size=gap.shape), dtype=dtype)
    a[::5], b[::3] = 0.0, -0.0
    x = torch.tensor(rng.normal(size=(gap.shape[0], 4)), dtype=dtype)
    idx = torch.as_tensor(rng.integers(0, 4, size=gap.shape[0]))

    def f(gap, a, b, x, idx):
        picked = ops.materialize(ops.take_last(x, idx))
        return ops.where_top(gap, a, b), picked * 2.0 + picked

    got, picked3 = torch.compile(f, fullgraph=True)(gap, a, b, x, idx)
    want = torch.where(gap == 0, a, b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # -0.0 == 0.0 here: the signs below
    signed = ~((gap != 0) & (b == 0))  # a zero b comes back as a * 0 + b: a's sign if b is -0.0
    assert torch.equal(torch.signbit(got)[signed], torch.signbit(want)[signed])
    torch.testing.assert_close(picked3, x[torch.arange(x.shape[0]), idx] * 3.0, rtol=0, atol=0)


@pytest.mark.slow
def test_torch_compile_keeps_heads_with_other_options_apart():
    """One compiled function called with heads that differ only in an option: each gets its own
    loss (Dynamo guards the head's key; the opaque loss in the graph is a closure it would match
    by its code alone), and equal heads share the compiled code."""
    import torch._dynamo.testing

    heads = [compiled(H.multiclass(6)), compiled(H.multiclass(6, label_smoothing=0.3)),
             compiled(H.multiclass(6, class_weights=[1, 2, 3, 4, 5, 6])), compiled(H.multiclass(6))]
    rng = np.random.default_rng(4)
    z = torch.tensor(rng.normal(size=(8, 6)), dtype=torch.float32)
    y = torch.as_tensor(rng.integers(0, 6, size=8))
    counter = torch._dynamo.testing.CompileCounter()
    f = torch.compile(lambda c, z, y: c.loss(z, y), backend=counter, fullgraph=True)
    for c in heads:
        torch.testing.assert_close(f(c, z, y), c.loss(z, y))
    assert len({c.loss(z, y).item() for c in heads[:3]}) == 3  # three different losses
    assert counter.frame_count == 3  # the fourth head equals the first


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize(
    "head, y_form",
    [(H.multiclass(5, ignore_index=-1), "ids (N, 1) int32"), (H.binary(), "floats (N, 1)"),
     (H.multilabel(3), "bool (N, K), per-label weights"), (H.multiclass(4, label_format="one_hot"), "float64 rows")],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_torch_compile_checks_and_converts_inputs_as_eager(head, y_form, dynamic):
    """Traced, the static checks run outside the trace for static shapes and in it for symbolic
    ones: either way the labels are converted as in eager mode (a trailing axis of 1 dropped,
    the dtype the engine takes), the loss and gradient are eager's, and a wrong label shape
    raises unihead's error."""
    rng = np.random.default_rng(6)
    c = compiled(head)
    n, k = 7, head.num_outputs
    z = torch.tensor(rng.normal(size=(n, k)), dtype=torch.float32)
    y = torch.as_tensor(labels_for(head, n, rng))
    w = None
    if y_form.startswith("ids"):
        y = y.to(torch.int32)[:, None]
    elif y_form.startswith("floats"):
        y = y.to(torch.float32).reshape(n, 1)
    elif y_form.startswith("bool"):
        y = y.to(torch.bool)
        w = torch.tensor(rng.uniform(0.5, 2.0, size=(n, k)), dtype=torch.float32)
    else:
        y = y.to(torch.float64)

    def grads(fn):
        x = z.clone().requires_grad_()
        out = fn(x, y, w)
        out.backward()
        return out, x.grad

    # the checks' result for these dtypes and shapes, as the trace of static shapes takes it
    meta = [(t.dtype, tuple(t.shape)) if t is not None else (None, None) for t in (z, y, w)]
    plan = c._traced_plan(c._trace_key, *meta[0], *meta[1], *meta[2])
    y_engine = c._inputs(z, y, w)[0]
    assert plan == (torch.float32, y_engine.dtype, tuple(y_engine.shape), None if w is None else torch.float32)
    assert c._traced_plan("another head", *meta[0], *meta[1], *meta[2]) is None
    f = torch.compile(lambda z, y, w: c.loss(z, y, w), dynamic=dynamic, fullgraph=True)
    want, want_grad = grads(lambda z, y, w: c.loss(z, y, w))
    seen = []  # the device of the logits the checks get: meta in the plan, traced ones otherwise
    checks = c._inputs

    def spy(z, *args, **kwargs):
        seen.append(z.device.type)
        return checks(z, *args, **kwargs)

    c._inputs = spy
    got, got_grad = grads(f)
    assert set(seen) == ({"cpu"} if dynamic else {"meta"})
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    bad = y[:, :1] if y.dim() == 2 and y.shape[1] > 1 else torch.zeros(n, 2, dtype=y.dtype)
    with pytest.raises(ValueError) as eager_error:
        c.loss(z, bad, w)
    assert c._traced_plan(c._trace_key, *meta[0], bad.dtype, tuple(bad.shape), *meta[2]) is None
    traced = torch.compile(lambda z, y, w: c.loss(z, y, w), dynamic=dynamic)  # the error ends the trace
    with pytest.raises(ValueError) as traced_error:
        traced(z, bad, w)
    assert str(traced_error.value) == str(eager_error.value)


class OneBasedHead(TorchHead):
    """A subclass that converts the labels its own way: class ids counted from 1."""

    def _as_array(self, x, like):
        a = super()._as_array(x, like)
        return a - 1 if not a.is_floating_point() else a


class OneBasedOps(type(TorchHead.ops)):
    """Ops whose conversion counts class ids from 1."""

    def convert(self, x, like=None):
        a = super().convert(x, like)
        return a - 1 if like is not None and not a.is_floating_point() else a


class OneBasedOpsHead(TorchHead):
    ops = OneBasedOps()


@pytest.mark.slow
@pytest.mark.parametrize("cls", [OneBasedHead, OneBasedOpsHead], ids=lambda c: c.__name__)
def test_torch_compile_keeps_a_subclass_conversion_of_the_inputs(cls):
    """A subclass that replaces how the inputs are converted (a method, or its ops) has its
    conversion traced (the plan of static shapes runs TorchHead's), and equal subclass heads
    still run each its own loss."""
    head = H.multiclass(4, label_smoothing=0.1)
    z = torch.tensor(np.random.default_rng(7).normal(size=(6, 4)), dtype=torch.float32)
    ids = torch.tensor([0, 1, 2, 3, 0, 1])
    sub, other = cls(head, fused=False), cls(H.multiclass(4), fused=False)
    want = compiled(head).loss(z, ids)
    torch.testing.assert_close(sub.loss(z, ids + 1), want)
    f = torch.compile(lambda c, z, y: c.loss(z, y), fullgraph=True)
    torch.testing.assert_close(f(sub, z, ids + 1), want)
    torch.testing.assert_close(f(other, z, ids + 1), compiled(H.multiclass(4)).loss(z, ids))


@pytest.mark.slow
def test_traced_float32_row_sums_are_correctly_rounded():
    """Inside torch.compile a float32 row sum adds the columns in float64 for 3 to 11 classes
    (COLUMN_SUM_MAX_CLASSES) and reduces each row otherwise: both give math.fsum's exact sum
    rounded to float32, on rows mixing magnitudes from subnormal to 2**60 and with cancelling signs."""
    import math

    from unihead.backends.torch import COLUMN_SUM_MAX_CLASSES, COLUMN_SUM_MIN_CLASSES, TorchOps

    ops = TorchOps()
    summed = torch.compile(ops.row_sum, fullgraph=True)
    rng = np.random.default_rng(5)
    for k in (2, COLUMN_SUM_MIN_CLASSES, 10, COLUMN_SUM_MAX_CLASSES, COLUMN_SUM_MAX_CLASSES + 1):
        x = (rng.normal(size=(257, k)) * 2.0 ** rng.integers(-140, 60, size=(257, k))).astype(np.float32)
        x[::3] = np.abs(x[::3])  # positive rows (a softmax's masses)
        got = summed(torch.from_numpy(x))
        assert got.shape == (257, 1) and got.dtype == torch.float32
        want = np.array([[math.fsum(map(float, row))] for row in x]).astype(np.float32)
        np.testing.assert_array_equal(got.numpy(), want, err_msg=f"{k} classes")


# ------------------------------------------------------------------------------ modules
def test_layer_is_an_ordinary_module(tmp_path):
    head = H.multiclass(4, label_smoothing=0.1)
    c = compiled(head)
    layer = c.layer(8)
    assert isinstance(layer, nn.Linear) and layer.head == head
    assert layer(torch.randn(2, 3, 8)).shape == (2, 3, 4)
    assert "head=ClassificationHead.multiclass(4" in repr(layer)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()
    c.loss(layer(torch.randn(5, 8)), torch.tensor([0, 1, 2, 3, 0])).backward()
    opt.step()
    assert not torch.equal(before, layer.weight)
    # state dict round trip (the spec travels as extra state and is checked on load)
    sd = layer.state_dict()
    other = c.layer(8)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, layer.weight)
    with pytest.raises(ValueError, match="saved from a layer with head"):
        compiled(H.multilabel(4)).layer(8).load_state_dict(sd)
    # pickling with torch.save / torch.load, and .to(dtype)
    path = tmp_path / "layer.pt"
    torch.save(layer, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.head == head and torch.equal(loaded.weight, layer.weight)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    assert set(torch.load(buf, weights_only=True)) >= {"weight", "bias"}
    assert pickle.loads(pickle.dumps(c)).head == head
    l64 = layer.to(torch.float64)
    assert l64.weight.dtype == torch.float64 and l64(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_weights_in_and_out_in_the_canonical_layout():
    head = H.multiclass(3)
    c = compiled(head)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(5, 3)).astype(np.float32)
    bias = rng.normal(size=3).astype(np.float32)
    layer = c.layer(5, {"kernel": kernel, "bias": bias})
    np.testing.assert_array_equal(layer.weight.detach().numpy(), kernel.T)  # PyTorch stores (out, in)
    w = layer.get_weights()
    np.testing.assert_array_equal(w["kernel"], kernel)
    np.testing.assert_array_equal(w["bias"], bias)
    canonical = layer.get_canonical_weights()  # the name every backend's layer has
    assert canonical.keys() == w.keys() and all(np.array_equal(canonical[k], w[k]) for k in w)
    other = c.layer(5)
    other.set_canonical_weights((kernel, bias))  # a pair, as Keras' get_weights() lists them
    assert torch.equal(other.weight, layer.weight) and torch.equal(other.bias, layer.bias)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    # float32 matmuls of two libraries: same products, summed in another order
    np.testing.assert_allclose(layer(torch.tensor(x)).detach().numpy(), x @ kernel + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        unihead.compile(head, "numpy").layer(5, w)(x), layer(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="looks transposed"):
        c.layer(5, {"kernel": kernel.T, "bias": bias})
    # binary heads: one or two outputs
    assert compiled(H.binary()).layer(5).out_features == 1
    assert compiled(H.binary(binary_units=2)).layer(5).out_features == 2


def test_loss_fn_is_a_module_computing_with_the_compiled_heads_options(tmp_path):
    head = H.binary(pos_weight=2.0)
    c = compiled(head, validate=False, fused=False)
    crit = c.loss_fn()
    assert isinstance(crit, nn.Module) and crit.head == head
    z, y = torch.randn(5, 1), torch.tensor([0.0, 1, 1, 0, 1])
    assert crit(z, y).item() == compiled(head).loss(z, y).item()
    assert crit(z, y, torch.ones(5)).item() == pytest.approx(crit(z, y).item(), rel=1e-7)
    # the options travel with the module: the very compiled head, through pickling and torch.save
    assert crit.compiled() is c
    assert pickle.loads(pickle.dumps(crit)).compiled().options() == {"validate": False, "fused": False}
    torch.save(crit, tmp_path / "crit.pt")
    assert torch.load(tmp_path / "crit.pt", weights_only=False).compiled().options() == c.options()
    # validate=False reaches the loss: an invalid label is not read (it would raise otherwise)
    with pytest.raises(ValueError, match="not a binary label"):
        compiled(head).loss_fn()(z, torch.tensor([0.0, 1, 3, 0, 1]))
    assert torch.isfinite(crit(z, torch.tensor([0.0, 1, 3, 0, 1])))
    # the module alone, from a spec, with options overriding a compiled head's
    assert HeadLoss(head).compiled().options() == {"validate": True, "fused": "auto"}
    assert HeadLoss(c, validate=True).compiled().options() == {"validate": True, "fused": False}
    with pytest.raises(TypeError, match="compiled for numpy"):
        HeadLoss(unihead.compile(head, "numpy"))
    # the old name still works, with a DeprecationWarning naming the new one
    with pytest.warns(DeprecationWarning, match="loss_fn"):
        old = c.loss_module()
    assert isinstance(old, type(crit)) and old.compiled() is c


def test_layer_keeps_the_compiled_heads_options():
    c = compiled(H.multiclass(3), validate=False, fused=False)
    layer = c.layer(4)
    assert layer.compiled() is c
    assert layer.compiled(validate=True).options() == {"validate": True, "fused": False}
    assert pickle.loads(pickle.dumps(layer)).compiled().options() == c.options()
    assert HeadLinear(H.multiclass(3), 4).compiled().options() == {"validate": True, "fused": "auto"}


# ------------------------------------------------------------------------------ state dicts
def test_loads_the_state_dict_of_a_plain_linear_layer():
    """The porting case: an ``nn.Linear``'s state dict has no spec (``_extra_state``)."""
    plain = nn.Linear(6, 4)
    layer = compiled(H.multiclass(4)).layer(6)
    result = layer.load_state_dict(plain.state_dict())  # strict=True
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(layer.weight, plain.weight) and torch.equal(layer.bias, plain.bias)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), plain(x))
    # inside a model too (prefixed keys)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4))
    ported = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), compiled(H.multiclass(4)).layer(6))
    ported.load_state_dict(model.state_dict())
    assert torch.equal(ported(torch.ones(2, 5)), model(torch.ones(2, 5)))
    # a missing weight is still missing
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"weight": plain.weight.detach()})
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(nn.Linear(6, 3).state_dict())


@pytest.mark.parametrize(
    "saved, target",
    [
        (H.multiclass(4), H.multiclass(4, label_smoothing=0.1)),
        (H.multiclass(4, label_smoothing=0.1), H.multiclass(4)),
        (H.multiclass(4), H.multiclass(4, class_weights=[1, 2, 3, 4], ignore_index=-1, focal_gamma=2.0, reduction="sum")),
        (H.multiclass(4), H.multiclass(4, label_format="one_hot")),
        (H.binary(), H.binary(pos_weight=3.0, threshold=0.3, label_smoothing=0.2)),
        (H.multilabel(4, pos_weight=[1, 2, 3, 4]), H.multilabel(4, reduction="none")),
    ],
    ids=repr,
)
@pytest.mark.parametrize("strict", [True, False])
def test_a_state_dict_saved_with_other_loss_options_loads(saved, target, strict):
    source = compiled(saved).layer(6)
    layer = compiled(target).layer(6)
    layer.load_state_dict(source.state_dict(), strict=strict)
    assert torch.equal(layer.weight, source.weight) and torch.equal(layer.bias, source.bias)
    assert layer.head == target  # the layer keeps its own spec: it defines the loss
    assert H.from_json(layer.state_dict()["_extra_state"]) == target


@pytest.mark.parametrize(
    "saved, target, what",
    [
        (H.multiclass(4), H.multilabel(4), "task 'multiclass' vs 'multilabel'"),
        (H.binary(binary_units=2), H.multiclass(2), "task 'binary' vs 'multiclass'"),
        (H.multiclass(4), H.multiclass(5), "4 outputs vs 5"),
        (H.binary(), H.binary(binary_units=2), "binary_units=1 vs 2"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("strict", [True, False])
def test_a_state_dict_whose_weights_mean_something_else_is_refused(saved, target, what, strict):
    source = compiled(saved).layer(6)
    layer = compiled(target).layer(6)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError) as err:
        layer.load_state_dict(source.state_dict(), strict=strict)
    message = str(err.value)
    assert what in message and "saved from a layer with head" in message
    assert "unihead.compile(saved_head, 'torch').layer(in_features)" in message  # what to do
    assert torch.equal(layer.weight, before)  # refused before any weight was copied
    if saved.task == target.task == "binary":
        assert "binary_units=2" in message and "unihead.port(" in message
        # and what it says works
        sd = source.state_dict()
        saved_head = H.from_json(sd["_extra_state"])
        ported = unihead.port((saved_head, {"kernel": sd["weight"].T, "bias": sd["bias"]}), to="torch", binary_units=2)
        layer.load_state_dict(ported.layer.state_dict())
        x = torch.randn(3, 6)
        p1 = torch.sigmoid(source(x))[:, 0]
        torch.testing.assert_close(torch.softmax(layer(x), -1)[:, 1], p1)


# ------------------------------------------------------------------------------ pickling
class TemperatureHead(TorchHead):
    """A subclass with an option of its own: logits divided by a temperature."""

    def __init__(self, head, *, temperature=1.0, **options):
        super().__init__(head, **options)
        self.temperature = temperature

    def options(self):
        return {**super().options(), "temperature": self.temperature}

    def probabilities(self, logits):
        return super().probabilities(torch.as_tensor(logits) / self.temperature)


def test_compiled_heads_pickle_as_their_class_with_their_options():
    head = H.multiclass(3, label_smoothing=0.1)
    c = compiled(head, validate=False, fused=False)
    back = pickle.loads(pickle.dumps(c))
    assert type(back) is type(c) and back.head == head and back.options() == c.options()
    sub = TemperatureHead(head, temperature=2.0, fused=False)
    back = pickle.loads(pickle.dumps(sub))
    assert type(back) is TemperatureHead and back.options() == {"validate": True, "fused": False, "temperature": 2.0}
    z = torch.randn(2, 3)
    torch.testing.assert_close(back.probabilities(z), torch.softmax(z / 2.0, -1))
    # layers and loss modules built from a subclass keep it
    assert type(pickle.loads(pickle.dumps(sub.layer(4))).compiled()) is TemperatureHead
    # heads pickled by earlier versions (by backend name) still load
    from unihead.compiled import _rebuild

    old = _rebuild("torch", head, {"validate": False})
    assert type(old) is type(c) and old.options() == {"validate": False, "fused": "auto"}


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "head, z, y, message",
    [
        (H.multiclass(4), torch.zeros(5, 4), torch.tensor([0, 1, 4, 2, 0]), r"labels\[2\] = 4 is not a class id"),
        (H.multiclass(4), torch.zeros(5, 4), torch.tensor([0.0, 1.0, 2.5, 1.0, 0.0]), r"labels\[2\] = 2\.5 is not a class id"),
        (H.multiclass(4), torch.zeros(5, 4), torch.zeros(5, dtype=torch.bool), "class ids for label_format='sparse'"),
        (H.multiclass(4), torch.zeros(5, 4), torch.tensor([[0], [1], [4], [2], [0]]), r"labels\[2, 0\] = 4 is not a class id"),
        (H.binary(), torch.zeros(5, 1), torch.tensor([0, 1, 3, 1, 0]), r"labels\[2\] = 3 is not a binary label"),
        (H.multiclass(4), torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), r"shape \(\.\.\., 4\)"),
        (H.multiclass(4), torch.zeros(5, 4, dtype=torch.long), torch.zeros(5, dtype=torch.long), "floating-point"),
        (H.multiclass(4, label_format="one_hot"), torch.zeros(2, 4), torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]]),
         "is not one-hot"),
        # a head whose path builds one-hot rows (no indexing kernel to catch an id out of range)
        (H.multiclass(4, focal_gamma=2.0), torch.zeros(5, 4), torch.tensor([0, 1, 4, 2, 0]), r"labels\[2\] = 4 is not a class id"),
        # checked as given: float64 values that would round to a valid float32 one are refused
        (H.binary(), torch.zeros(3, 1), torch.tensor([0.0, 1.0 + 1e-12, 1.0], dtype=torch.float64), "is not a binary label"),
        (H.multilabel(2, label_format="probabilities"), torch.zeros(2, 2),
         torch.tensor([[0.5, 1.0 + 1e-9], [0.0, 1.0]], dtype=torch.float64), "is not a probability"),
    ],
)
def test_same_errors_as_numpy(head, z, y, message):
    with pytest.raises((ValueError, TypeError), match=message) as torch_err:
        compiled(head).loss(z, y)
    with pytest.raises((ValueError, TypeError)) as numpy_err:
        unihead.compile(head, "numpy").loss(z.numpy(), y.numpy())
    assert str(torch_err.value) == str(numpy_err.value)
    assert type(torch_err.value) is type(numpy_err.value)


def test_validate_false_reads_no_values(monkeypatch):
    """With validation off, the loss never reads a tensor's value on the host (on an accelerator
    that would be a device synchronisation)."""
    head = H.multiclass(4, ignore_index=-100, class_weights=[1, 2, 3, 4])
    z, y = torch.randn(6, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, -100, 1])
    c = compiled(head, validate=False)
    expected = compiled(head).loss(z, y)

    def forbidden(*a, **k):
        raise AssertionError("a tensor value was read on the host")

    reads = ("__bool__", "item", "tolist", "numpy", "__float__", "__int__")
    for name in reads:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = c.loss(z, y)
    loss.backward()
    monkeypatch.undo()
    assert loss.item() == expected.item()
    # and with validation on, values are read (that is what validation is)
    for name in reads:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with pytest.raises(AssertionError, match="read on the host"):
        compiled(head).loss(z, y)


def test_labels_on_another_device_or_as_numpy_are_accepted():
    c = compiled(H.multiclass(3))
    z = torch.randn(4, 3)
    y = np.array([0, 1, 2, 1])
    assert c.loss(z, y).item() == c.loss(z, torch.as_tensor(y)).item()
    assert c.loss(z.numpy(), y).item() == c.loss(z, y).item()


# ------------------------------------------------------------------------------ native rows
def test_pytorch_rows_of_the_native_equivalence_table_on_the_torch_backend():
    """The PyTorch column of docs/semantics.md §10, computed by unihead's torch backend."""
    from . import test_native_equivalence as T

    z, y, yi = torch.as_tensor(T.Z), torch.as_tensor(T.Y), torch.as_tensor(T.Y_IGN)
    w = torch.as_tensor(T.W)

    def ours(head, zz, yy, sw=None):
        return compiled(head).loss(torch.as_tensor(zz), torch.as_tensor(yy), sw)

    pairs = [
        (ours(H.multiclass(T.K), z, y), F.cross_entropy(z, y)),
        (ours(H.multiclass(T.K, class_weights=T.W, ignore_index=-100), z, yi),
         F.cross_entropy(z, yi, weight=w, ignore_index=-100)),
        (ours(H.multiclass(T.K, label_smoothing=T.EPS), z, y), F.cross_entropy(z, y, label_smoothing=T.EPS)),
        (ours(H.multiclass(T.K, label_format="probabilities"), z, T.T_SOFT), F.cross_entropy(z, torch.as_tensor(T.T_SOFT))),
        (ours(H.multiclass(T.K, reduction="none"), z, y), F.cross_entropy(z, y, reduction="none")),
        (ours(H.multiclass(T.K), T.Z3, T.Y3), F.cross_entropy(torch.as_tensor(T.Z3).movedim(-1, 1), torch.as_tensor(T.Y3))),
        (ours(H.binary(pos_weight=T.PW), T.ZB[:, None], T.YB),
         F.binary_cross_entropy_with_logits(torch.as_tensor(T.ZB), torch.as_tensor(T.YB), pos_weight=torch.tensor(T.PW, dtype=torch.float64))),
        (ours(H.binary(binary_units=2), T.Z[:, :2], T.YB), F.cross_entropy(z[:, :2], torch.as_tensor(T.YB).long())),
        (ours(H.multilabel(T.K, pos_weight=T.PWM), T.ZM, T.YM),
         F.binary_cross_entropy_with_logits(torch.as_tensor(T.ZM), torch.as_tensor(T.YM), pos_weight=torch.as_tensor(T.PWM))),
        (ours(H.multilabel(T.K, class_weights=T.W), T.ZM, T.YM),
         F.binary_cross_entropy_with_logits(torch.as_tensor(T.ZM), torch.as_tensor(T.YM), weight=w / w.mean())),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ end to end
def _train(head, x, y, epochs=60):
    torch.manual_seed(0)
    c = compiled(head)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), c.layer(32))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(epochs):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            c.loss(model(xt[i : i + 64]), yt[i : i + 64]).backward()
            opt.step()
    with torch.no_grad():
        return c.predict(model(xt)).numpy()


def synthetic(task, n=512, d=6, k=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, k))
    s = x @ w + 0.3 * np.sin(3 * x[:, :k])
    if task == "multiclass":
        return x, s.argmax(-1)
    if task == "binary":
        return x, (s[:, 0] > 0).astype(np.float32)
    return x, (s > 0).astype(np.float32)


@pytest.mark.parametrize(
    "head",
    [H.multiclass(4), H.binary(), H.binary(binary_units=2), H.multilabel(4)],
    ids=["multiclass", "binary-1", "binary-2", "multilabel"],
)
def test_small_mlp_trains_to_95_percent(head):
    x, y = synthetic(head.task)
    pred = _train(head, x, y)
    acc = (pred == y).mean()
    assert acc > 0.95, acc
