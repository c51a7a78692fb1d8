"""The fused linear + loss (``compiled.linear_loss``): values and gradients against the dense path
on the same inputs and against an independent float64 reference written here; every option of a
sparse softmax head; chunks that do not divide the classes; confident rows; PyTorch eager,
``torch.compile(fullgraph=True)`` and bfloat16; JAX ``jit`` + ``grad``; hostile inputs.

The accuracy bound.  The float32 matmul sets the floor: a logit ``z_ij = sum_d h_id k_dj + b_j``
computed in float32 errs by at most ``gamma_D * a_ij`` with ``a_ij = sum_d |h_id k_dj| + |b_j|``
and ``gamma_D = D u / (1 - D u)``, ``u = 2**-24`` (any summation order).  A row's loss is
1-Lipschitz per unit change of any one logit in the sup norm times ``||p - t'||_1 <= 2``, so
``|loss_i - ref_i| <= 2 gamma_D max_j a_ij + 4 u |ref_i|`` (the last term: the loss formula's own
few roundings).  Both paths must satisfy it; and the fused path's worst error (in units of
``u max_j a_ij``) must not exceed the dense path's by more than the matmul's own
order-dependence (a factor 1.5 + 2 units: the chunked matmul sums in its own order)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as CH

U = 2.0**-24


# ---------------------------------------------------------------- the independent float64 reference
def ref_rows(h, w, b, y, head):
    """Per-row losses and d(loss_i)/dz in float64 for a softmax head with integer targets:
    ``t' = (1 - eps) onehot(y) + eps / K``, ``l = -sum_c t'_c (1 - p_c)**gamma log p_c +
    c lse(z')**2`` on the capped logits ``z' = s tanh(z / s)`` (``logit_softcap = s``, else
    ``z' = z``; ``z_loss = c``); ignored rows have loss 0 and weight 0.  Written from the
    definitions (docs/semantics.md §5), sharing nothing with unihead."""
    z = h.astype(np.float64) @ w.astype(np.float64) + (0.0 if b is None else b.astype(np.float64))
    cap, zl = head.logit_softcap, float(head.z_loss)
    slope = 1.0
    if cap is not None:
        z, slope = cap * np.tanh(z / cap), 1.0 / np.cosh(z / cap) ** 2
    n, k = z.shape
    eps, gamma = float(head.label_smoothing), float(head.focal_gamma)
    valid = np.ones(n, bool) if head.ignore_index is None else (y != head.ignore_index)
    yv = np.where(valid, y, 0)
    m = z.max(1, keepdims=True)
    e = np.exp(z - m)
    lse = np.log(e.sum(1, keepdims=True))
    logp = z - m - lse
    p = np.exp(logp)
    t = np.full((n, k), eps / k)
    t[np.arange(n), yv] += 1.0 - eps
    q = 1.0 - p
    f = q**gamma
    loss = -(t * f * logp).sum(1)
    # gradient of l = -sum_c t_c q_c**g log p_c:  dl/dz_j = sum_c t_c [g q_c**(g-1) (dp_c/dz_j) log p_c - q_c**g (delta_cj - p_j)]
    # with dp_c/dz_j = p_c (delta_cj - p_j)
    if gamma == 0.0:
        dz = p * t.sum(1, keepdims=True) - t
    else:
        a = t * (gamma * q ** (gamma - 1) * p * logp)  # coefficient of (delta_cj - p_j) from the q factor
        bcoef = -t * f  # from log p_c
        coef = a + bcoef
        dz = coef - p * coef.sum(1, keepdims=True)
    lse = (m + lse)[:, 0]
    loss = loss + zl * lse**2  # PaLM's z-loss, after the focal factor
    dz = (dz + 2 * zl * lse[:, None] * p) * slope
    loss = np.where(valid, loss, 0.0)
    dz = np.where(valid[:, None], dz, 0.0)
    return loss, dz, valid


def ref_loss_grads(h, w, b, y, head, sw=None):
    """The head's reduced loss and its gradients w.r.t. ``h``, ``w``, ``b`` in float64."""
    per, dz, valid = ref_rows(h, w, b, y, head)
    n, k = dz.shape
    wt = valid.astype(np.float64)
    if sw is not None:
        wt = wt * sw
    if head.class_weights is not None:
        wt = wt * np.asarray(head.class_weights, np.float64)[np.where(valid, y, 0)]
    if head.reduction == "none":
        loss, scale = per * wt, wt
    elif head.reduction == "sum":
        loss, scale = (per * wt).sum(), wt
    else:
        loss, scale = (per * wt).sum() / wt.sum(), wt / wt.sum()
    g = dz * scale[:, None]  # d(sum of the outputs)/dz
    return loss, g @ w.astype(np.float64).T, h.astype(np.float64).T @ g, g.sum(0)


def data(n=48, d=40, k=700, seed=0, scale=1.0, ignore=None):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d)).astype(np.float32)
    w = (rng.standard_normal((d, k)) * scale / math.sqrt(d)).astype(np.float32) * 4
    b = rng.standard_normal(k).astype(np.float32)
    y = rng.integers(0, k, n)
    if ignore is not None:
        y[::7] = ignore
    sw = rng.uniform(0.5, 2.0, n).astype(np.float32)
    return h, w, b, y, sw


def floor(h, w, b):
    """Per row, ``u * max_j a_ij`` (the unit of the bound)."""
    a = np.abs(h.astype(np.float64)) @ np.abs(w.astype(np.float64)) + np.abs(b.astype(np.float64))
    return U * a.max(1)


HEADS = {
    "plain": CH.multiclass(700),
    "smooth": CH.multiclass(700, label_smoothing=0.1),
    "weights": CH.multiclass(700, class_weights=[0.5 + (i % 5) / 4 for i in range(700)], ignore_index=-100),
    "focal": CH.multiclass(700, focal_gamma=2.0, ignore_index=-100),
    "sum": CH.multiclass(700, label_smoothing=0.05, reduction="sum"),
    "none": CH.multiclass(700, reduction="none", ignore_index=-100),
}


CW = [0.5 + (i % 5) / 4 for i in range(700)]
#: z_loss and logit_softcap (docs/semantics.md §5) alone, together, and with every other option;
#: the logits of ``data`` have a spread of ~4, so a cap of 5 saturates tanh on many of them
ZHEADS = {
    "zloss": CH.multiclass(700, z_loss=1e-2),
    "softcap": CH.multiclass(700, logit_softcap=5.0),
    "both": CH.multiclass(700, z_loss=1e-2, logit_softcap=5.0),
    "both_smooth_cw": CH.multiclass(700, z_loss=1e-3, logit_softcap=8.0, label_smoothing=0.1,
                                    class_weights=CW, ignore_index=-100),
    "both_focal_none": CH.multiclass(700, z_loss=1e-2, logit_softcap=5.0, focal_gamma=2.0,
                                     reduction="none", ignore_index=-100),
    "zloss_sum_sw": CH.multiclass(700, z_loss=1e-2, reduction="sum", label_smoothing=0.05),
}


def lipschitz(h, w, b, head):
    """``1 + c max|lse|`` (see :func:`check_errors`), from the float64 logits (capped if so)."""
    z = h.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    if head.logit_softcap is not None:
        z = head.logit_softcap * np.tanh(z / head.logit_softcap)
    m = z.max(1)
    return 1.0 + float(head.z_loss) * np.abs(m + np.log(np.exp(z - m[:, None]).sum(1))).max()


# ------------------------------------------------------------------------------------------ torch
torch = pytest.importorskip("torch")


def _torch_run(head, h, w, b, y, sw, fused, chunk=None, dtype=torch.float32):
    c = unihead.compile(head, "torch")
    th = torch.tensor(h, dtype=dtype, requires_grad=True)
    lin = torch.nn.Linear(h.shape[1], w.shape[1], dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w.T))
        lin.bias.copy_(torch.tensor(b))
    ty, tsw = torch.tensor(y), None if sw is None else torch.tensor(sw)
    if fused:
        loss = c.linear_loss(th, lin.weight.T, ty, lin.bias, tsw, chunk_size=chunk)
    else:
        loss = c.loss(th @ lin.weight.T + lin.bias, ty, tsw)
    loss.sum().backward()
    f = lambda t: t.detach().double().numpy()
    return f(loss), f(th.grad), f(lin.weight.grad).T, f(lin.bias.grad)


@pytest.mark.parametrize("name", list(HEADS))
def test_torch_matches_dense_and_float64(name):
    head = HEADS[name]
    h, w, b, y, sw = data(ignore=head.ignore_index)
    use_sw = sw if name in ("weights", "sum", "none") else None
    ref = ref_loss_grads(h, w, b, y, head, use_sw)
    fused = _torch_run(head, h, w, b, y, use_sw, True, chunk=128)
    dense = _torch_run(head, h, w, b, y, use_sw, False)
    check_errors(name, h, w, b, fused, dense, ref, per_row=head.reduction == "none")


@pytest.mark.parametrize("name", list(ZHEADS))
def test_torch_zloss_softcap_match_dense_and_float64(name):
    head = ZHEADS[name]
    h, w, b, y, sw = data(ignore=head.ignore_index)
    use_sw = sw if name in ("both_smooth_cw", "zloss_sum_sw", "both_focal_none") else None
    ref = ref_loss_grads(h, w, b, y, head, use_sw)
    fused = _torch_run(head, h, w, b, y, use_sw, True, chunk=128)
    dense = _torch_run(head, h, w, b, y, use_sw, False)
    check_errors(name, h, w, b, fused, dense, ref, per_row=head.reduction == "none",
                 lip=lipschitz(h, w, b, head))
    # the options change the numbers: the same inputs without them differ by far more than the bound
    plain = _torch_run(head.replace(z_loss=0.0, logit_softcap=None), h, w, b, y, use_sw, True, chunk=128)
    assert np.max(np.abs(plain[0] - fused[0])) > 1e-3 * np.max(np.abs(ref[0]))


def check_errors(name, h, w, b, fused, dense, ref, per_row, lip=1.0):
    """The accuracy bound of the module docstring for the loss (per row, or the reduced value
    against the reduced bound), and for each gradient: within ``D u max|g|`` of the float64
    reference (the logits' matmul error, gamma_D, carried into ``p - t'`` and through the
    gradient matmuls, measured at up to ~25 ulp here), and the fused error no larger than the dense
    path's (x1.5 + 4 ulp of the scale: the chunked matmuls sum in their own order).  ``lip``: the
    loss's Lipschitz factor over the cross-entropy's (a z-loss ``c lse**2`` adds ``2 c |lse| p``
    to the gradient: ``1 + c max|lse|``; the soft-cap's slope is at most 1)."""
    unit = floor(h, w, b) * lip
    d = h.shape[1]
    gamma_d = d * U / (1 - d * U)
    e_f, e_d = np.abs(fused[0] - ref[0]), np.abs(dense[0] - ref[0])
    if per_row:
        bound = 2 * gamma_d * unit / U + 4 * U * np.abs(ref[0])
        assert np.all(e_f <= bound) and np.all(e_d <= bound), name
        assert (e_f / unit).max() <= 1.5 * (e_d / unit).max() + 2, name
    else:  # a weighted mean or sum of rows: the worst row's bound times the total weight factor
        assert e_f <= 1.5 * e_d + 8 * U * abs(ref[0]) + 2 * unit.max(), name
    for got_f, got_d, want in zip(fused[1:], dense[1:], ref[1:]):
        scale = np.abs(want).max()
        e_f, e_d = np.abs(got_f - want).max(), np.abs(got_d - want).max()
        assert e_f <= d * U * scale, (name, e_f / U / scale)
        assert e_f <= 1.5 * e_d + 4 * U * scale, (name, e_f, e_d)


@pytest.mark.parametrize("chunk", [1, 7, 128, 699, 700, 4096])
def test_torch_chunk_boundaries(chunk):
    head = HEADS["smooth"]
    h, w, b, y, sw = data(n=16, d=12, seed=3)
    ref = _torch_run(head, h, w, b, y, None, True, chunk=700)
    got = _torch_run(head, h, w, b, y, None, True, chunk=chunk)
    want = ref_loss_grads(h, w, b, y, head)
    for g, r, x in zip(got, ref, want):
        assert np.abs(g - x).max() <= 1.5 * np.abs(r - x).max() + 8 * U * np.abs(x).max()


def test_confident_rows_keep_tiny_losses():
    """Logits through an exact factorisation (kernel = I, bias 0): a row whose target leads by 69
    has loss (K - 1) e**-69 ~ 1e-27; the fused path must give it to a few ulp, not 0."""
    k = 300
    z = np.full((3, k), -69.0, np.float32)
    z[:, 5] = 0.0
    z[1, 7] = -30.0  # a second, less tiny term
    z[2, :] = np.linspace(-80, 0, k, dtype=np.float32)
    y = np.array([5, 5, k - 1])
    import mpmath

    mpmath.mp.dps = 50
    want = []
    for row, t in zip(z.astype(np.float64), y):
        s = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - mpmath.mpf(float(row[t]))) for i, v in enumerate(row) if i != t)
        want.append(float(mpmath.log1p(s)))
    want = np.array(want)
    eye = np.eye(k, dtype=np.float32)
    c = unihead.compile(CH.multiclass(k, reduction="none"), "torch")
    for chunk in (64, 300):
        got = c.linear_loss(torch.tensor(z), torch.tensor(eye), torch.tensor(y), chunk_size=chunk).numpy()
        assert np.all(got > 0)
        assert np.all(np.abs(got - want) <= 4 * U * want), (got, want)
    got = unihead.compile(CH.multiclass(k, reduction="none"), "numpy").linear_loss(z, eye, y, chunk_size=64)
    assert np.all(np.abs(got - want) <= 4 * U * want)


def test_torch_normalizer_and_terms():
    head = CH.multiclass(700, ignore_index=-100, label_smoothing=0.1)
    h, w, b, y, sw = data(ignore=-100)
    c = unihead.compile(head, "torch")
    th, tw, tb, ty, tsw = (torch.tensor(a) for a in (h, w, b, y, sw))
    total, weight = c.linear_loss_terms(th, tw, ty, tb, tsw, chunk_size=200)
    dtotal, dweight = c.loss_terms(th @ tw + tb, ty, tsw)
    assert float(weight) == float(dweight)
    assert abs(float(total) - float(dtotal)) <= 1e-5 * abs(float(dtotal))
    mean = c.linear_loss(th, tw, ty, tb, tsw, chunk_size=200)
    assert abs(float(mean) - float(total) / float(weight)) <= 4 * U * abs(float(mean))
    half = c.linear_loss(th, tw, ty, tb, tsw, normalizer=2 * weight, chunk_size=200)
    assert abs(float(half) - float(mean) / 2) <= 4 * U * abs(float(mean))
    with pytest.raises(ValueError, match="normalizer"):
        unihead.compile(CH.multiclass(700, reduction="none"), "torch").linear_loss(th, tw, ty.abs(), normalizer=1.0)


def test_torch_leading_dims_and_no_bias():
    head = CH.multiclass(700, reduction="none")
    h, w, b, y, _ = data(n=12)
    c = unihead.compile(head, "torch")
    got = c.linear_loss(torch.tensor(h.reshape(3, 4, -1)), torch.tensor(w), torch.tensor(y.reshape(3, 4)))
    want = c.loss(torch.tensor(h) @ torch.tensor(w), torch.tensor(y))
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got.reshape(-1).numpy(), want.numpy(), rtol=4e-6)


def test_torch_bfloat16():
    head = CH.multiclass(700, label_smoothing=0.1)
    h, w, b, y, _ = data(n=32)
    bf = torch.bfloat16
    fused = _torch_run(head, h, w, b, y, None, True, chunk=128, dtype=bf)
    dense = _torch_run(head, h, w, b, y, None, False, dtype=bf)
    c = unihead.compile(head, "torch")
    th = torch.tensor(h, dtype=bf)
    assert c.linear_loss(th, torch.tensor(w, dtype=bf), torch.tensor(y)).dtype == torch.float32
    # the same bfloat16 logits (one rounding of a float32-accumulated dot product either way)
    assert abs(fused[0] - dense[0]) <= 8 * U * abs(dense[0])
    ref = ref_loss_grads(h.astype(bf16_np()), w.astype(bf16_np()), b.astype(bf16_np()), y, head)
    for got_f, got_d, want in zip(fused[1:], dense[1:], ref[1:]):
        e_f, e_d = np.abs(got_f - want).max(), np.abs(got_d - want).max()
        assert e_f <= 1.5 * e_d + 2.0**-8 * np.abs(want).max()


def bf16_np():
    import ml_dtypes

    return ml_dtypes.bfloat16


def test_torch_compile_fullgraph():
    head = CH.multiclass(300, label_smoothing=0.1, ignore_index=-100)
    h, w, b, y, sw = data(n=16, d=8, k=300, ignore=-100)
    c = unihead.compile(head, "torch")

    def step(th, tw, tb, ty, tsw):
        return c.linear_loss(th, tw, ty, tb, tsw, chunk_size=128)

    args = [torch.tensor(a) for a in (h, w, b, y, sw)]
    for a in args[:3]:
        a.requires_grad_()
    loss = torch.compile(step, fullgraph=True)(*args)
    grads = torch.autograd.grad(loss, args[:3])
    eager = step(*args)
    egrads = torch.autograd.grad(eager, args[:3])
    loss, eager = loss.detach(), eager.detach()
    assert abs(float(loss) - float(eager)) <= 4 * U * abs(float(eager))
    for g, e in zip(grads, egrads):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)


def test_torch_compile_fullgraph_zloss_softcap():
    head = CH.multiclass(300, z_loss=1e-2, logit_softcap=5.0, label_smoothing=0.1, ignore_index=-100)
    h, w, b, y, sw = data(n=16, d=8, k=300, ignore=-100)
    c = unihead.compile(head, "torch")

    def step(th, tw, tb, ty, tsw):
        return c.linear_loss(th, tw, ty, tb, tsw, chunk_size=128)

    args = [torch.tensor(a) for a in (h, w, b, y, sw)]
    for a in args[:3]:
        a.requires_grad_()
    loss = torch.compile(step, fullgraph=True)(*args)
    grads = torch.autograd.grad(loss, args[:3])
    ref = ref_loss_grads(h, w, b, y, head, sw)
    dense = _torch_run(head, h, w, b, y, sw, False)
    f = lambda t: t.detach().double().numpy()
    check_errors("compiled", h, w, b, [f(loss), *(f(g) for g in grads[:1]), f(grads[1]), f(grads[2])],
                 dense, ref, per_row=False, lip=lipschitz(h, w, b, head))


def test_torch_bfloat16_zloss_softcap():
    """bfloat16 inputs, float32 statistics: the fused path against the dense path on the same
    bfloat16 logits and against float64 on the bfloat16-rounded inputs."""
    head = CH.multiclass(700, z_loss=1e-2, logit_softcap=5.0, label_smoothing=0.1)
    h, w, b, y, _ = data(n=32)
    bf = torch.bfloat16
    fused = _torch_run(head, h, w, b, y, None, True, chunk=128, dtype=bf)
    dense = _torch_run(head, h, w, b, y, None, False, dtype=bf)
    assert abs(fused[0] - dense[0]) <= 8 * U * abs(dense[0])
    ref = ref_loss_grads(h.astype(bf16_np()), w.astype(bf16_np()), b.astype(bf16_np()), y, head)
    for got_f, got_d, want in zip(fused[1:], dense[1:], ref[1:]):
        e_f, e_d = np.abs(got_f - want).max(), np.abs(got_d - want).max()
        assert e_f <= 1.5 * e_d + 2.0**-8 * np.abs(want).max()


# ------------------------------------------------------------------------------------------- jax
@pytest.mark.parametrize("names", [("plain", "smooth", "weights", "focal"), tuple(ZHEADS)], ids=["options", "zloss-softcap"])
def test_jax_jit_grad_matches_dense_and_float64(names):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    for name in names:
        head = {**HEADS, **ZHEADS}[name]
        h, w, b, y, sw = data(ignore=head.ignore_index)
        use_sw = sw if name in ("weights", "both_smooth_cw", "zloss_sum_sw") else None
        if head.reduction == "none":  # a scalar to differentiate: the weighted sum of the rows
            head = head.replace(reduction="sum")
        c = unihead.compile(head, "jax")
        args = [jnp.asarray(a) for a in (h, w, b)]
        ja = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
        lf, gf = ja(lambda h_, w_, b_: c.linear_loss(h_, w_, jnp.asarray(y), b_, use_sw, chunk_size=128))
        ld, gd = ja(lambda h_, w_, b_: c.loss(h_ @ w_ + b_, jnp.asarray(y), use_sw))
        ref = ref_loss_grads(h, w, b, y, head, use_sw)
        f64 = lambda xs: [np.asarray(x, np.float64) for x in xs]
        check_errors(name, h, w, b, f64([lf, *gf]), f64([ld, *gd]), ref, per_row=False,
                     lip=lipschitz(h, w, b, head))


def test_jax_chunks_are_a_loop_not_unrolled():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    h, w, b, y, _ = data(n=8, d=8, k=700)
    c = unihead.compile(CH.multiclass(700), "jax")
    f = jax.grad(lambda w_: c.linear_loss(jnp.asarray(h), w_, jnp.asarray(y), jnp.asarray(b), chunk_size=64))
    text = str(jax.make_jaxpr(f)(jnp.asarray(w)))
    # 11 chunks of 64 and one of 60: the first, the loop body and the last chunk, forward and
    # backward (three matmuls a chunk there), not one matmul per chunk
    assert text.count("dot_general") <= 3 + 3 * 3
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(w))), _torch_run(CH.multiclass(700), h, w, b, y, None, True)[2], rtol=2e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ numpy
def test_numpy_value():
    head = HEADS["weights"]
    h, w, b, y, sw = data(ignore=-100)
    c = unihead.compile(head, "numpy")
    got = c.linear_loss(h, w, y, b, sw, chunk_size=100)
    assert isinstance(got, np.ndarray) and got.shape == ()
    assert abs(float(got) - float(c.loss(h @ w + b, y, sw))) <= 8 * U * abs(float(got)) + 2 * floor(h, w, b).max()


@pytest.mark.parametrize("name", ["both_smooth_cw", "both_focal_none"])
def test_numpy_zloss_softcap(name):
    head = ZHEADS[name]
    h, w, b, y, sw = data(ignore=-100)
    c = unihead.compile(head, "numpy")
    got = np.asarray(c.linear_loss(h, w, y, b, sw, chunk_size=100), np.float64)
    want = ref_loss_grads(h, w, b, y, head, sw)[0]
    dense = np.asarray(c.loss(h @ w + b, y, sw), np.float64)
    lip = lipschitz(h, w, b, head)
    d = h.shape[1]
    unit = floor(h, w, b) * lip
    # a weighted mean errs at most as the worst row; a row of reduction="none" is weighted by sw
    # (the head has no class weights)
    row = 2 * d * U * unit / U
    bound = (row.max() if head.reduction != "none" else row * sw) + 8 * U * np.abs(want)
    assert np.all(np.abs(got - want) <= bound) and np.all(np.abs(dense - want) <= bound)


# --------------------------------------------------------------------------------------- hostile
def test_hostile_inputs():
    c = unihead.compile(CH.multiclass(700), "torch")
    h, w, b, y, _ = data(n=4)
    th, tw, tb, ty = (torch.tensor(a) for a in (h, w, b, y))
    with pytest.raises(ValueError, match=r"transposed.*weight\.T"):
        c.linear_loss(th, tw.T.contiguous(), ty, tb)
    with pytest.raises(ValueError, match="input features"):
        c.linear_loss(th[:, :5], tw, ty, tb)
    with pytest.raises(ValueError, match=r"bias must have shape \(num_outputs,\)"):
        c.linear_loss(th, tw, ty, tb[:5])
    with pytest.raises(ValueError, match="not a class id"):
        c.linear_loss(th, tw, torch.tensor([0, 1, 700, 3]), tb)
    with pytest.raises(ValueError, match="labels"):
        c.linear_loss(th, tw, ty[:3], tb)
    with pytest.raises(TypeError, match="one dtype"):
        c.linear_loss(th.double(), tw, ty, tb)
    with pytest.raises(TypeError, match="hidden must be a floating"):
        c.linear_loss(th.long(), tw.long(), ty)
    with pytest.raises(ValueError, match="chunk_size"):
        c.linear_loss(th, tw, ty, tb, chunk_size=0)
    for head in (CH.multilabel(700), CH.binary(), CH.multiclass(700, label_format="one_hot"),
                 CH.multiclass(700, focal_gamma=2.0, label_smoothing=0.1)):
        k = head.num_outputs
        with pytest.raises(ValueError, match=r"compiled\.loss\(hidden @ kernel \+ bias, labels\)"):
            unihead.compile(head, "torch").linear_loss(th, torch.zeros(h.shape[1], k), torch.zeros(4, dtype=torch.long))


def test_torch_compiled_chunk_kernels_match_eager():
    """Inputs of at least FUSED_MIN_ELEMENTS logits run each chunk's elementwise work through
    kernels compiled by torch.compile (fused="auto"); fused=False runs the same functions op by
    op: the same numbers (Inductor keeps IEEE semantics, so the error-free steps survive)."""
    from unihead.backends.torch import FUSED_MIN_ELEMENTS

    head = CH.multiclass(4096, label_smoothing=0.1, ignore_index=-100)
    h, w, b, y, sw = data(n=FUSED_MIN_ELEMENTS // 4096, d=16, k=4096, ignore=-100)
    out = {}
    for fused in ("auto", False):
        c = unihead.compile(head, "torch", fused=fused)
        th, tw, tb = (torch.tensor(a, requires_grad=True) for a in (h, w, b))
        loss = c.linear_loss(th, tw, torch.tensor(y), tb, torch.tensor(sw), chunk_size=1000)
        out[fused] = [loss.detach(), *torch.autograd.grad(loss, [th, tw, tb])]
        if fused == "auto":
            assert c.__dict__["_chunk_kernels"]._compiled is not None and not c.__dict__["_chunk_kernels"].failed
    for a, e in zip(out["auto"], out[False]):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=2e-6, atol=1e-9)
