"""Invariants of the semantics, as property tests (NumPy backend; the other backends are held to
the NumPy values by the conformance suite).

* sparse labels == one-hot labels;
* 1-unit binary == 2-unit binary (logit z <=> logits [c, c + z]), with every option;
* unit class weights == no class weights; constant sample weight == none under "mean";
* permuting the classes of logits, labels and per-class options together changes nothing;
* adding a constant to softmax logits changes probabilities and losses by a few ulp at most.

float64 comparisons use a relative tolerance of 64 ulp and an absolute one scaled by the
example's weight: these are equalities of definitions, tested far below any formula error.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import unihead
from unihead import ClassificationHead as H

EPS64 = np.finfo(np.float64).eps


def close(a, b, ulps=64, atol=0.0, eps=EPS64):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=ulps * eps, atol=atol)


logit_values = st.floats(-40, 40, allow_nan=False, width=64)
options = st.fixed_dictionaries(
    {
        "label_smoothing": st.sampled_from([0.0, 0.1, 0.35]),
        "focal_gamma": st.sampled_from([0.0, 0.5, 2.0]),
        "reduction": st.sampled_from(["mean", "sum", "none"]),
    }
)


@st.composite
def multiclass_case(draw):
    n = draw(st.integers(1, 6))
    k = draw(st.integers(2, 6))
    z = draw(hnp.arrays(np.float64, (n, k), elements=logit_values))
    y = np.asarray(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)))
    cw = draw(st.none() | st.lists(st.floats(0.1, 5.0), min_size=k, max_size=k))
    sw = draw(st.none() | hnp.arrays(np.float64, (n,), elements=st.floats(0.0, 3.0)))
    return z, y, cw, sw, draw(options)


@given(multiclass_case())
def test_sparse_equals_one_hot(case):
    z, y, cw, sw, opts = case
    k = z.shape[-1]
    sparse = unihead.compile(H.multiclass(k, class_weights=cw, **opts))
    onehot = unihead.compile(H.multiclass(k, class_weights=cw, label_format="one_hot", **opts))
    t = np.eye(k)[y]
    l1, g1 = sparse.loss_and_gradient(z, y, sw)
    l2, g2 = onehot.loss_and_gradient(z, t, sw)
    close(l1, l2, atol=1e-300)
    close(g1, g2, atol=64 * EPS64 * np.abs(g1).max(initial=0.0))


@st.composite
def binary_case(draw):
    n = draw(st.integers(1, 8))
    z = draw(hnp.arrays(np.float64, (n,), elements=logit_values))
    soft = draw(st.booleans())
    if soft:
        y = draw(hnp.arrays(np.float64, (n,), elements=st.floats(0, 1)))
    else:
        y = np.asarray(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), np.float64)
    kw = dict(draw(options))
    kw["label_format"] = "probabilities" if soft else "binary"
    kw["class_weights"] = draw(st.none() | st.lists(st.floats(0.1, 5.0), min_size=2, max_size=2))
    kw["pos_weight"] = draw(st.none() | st.floats(0.0, 4.0))
    if not soft and draw(st.booleans()):
        kw["ignore_index"] = -1
        y = np.where(np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n))), -1.0, y)
    sw = draw(st.none() | hnp.arrays(np.float64, (n,), elements=st.floats(0.0, 3.0)))
    c = draw(st.sampled_from([0.0, -3.5, 12.25]))
    return z, y, sw, kw, c


@given(binary_case())
def test_one_unit_equals_two_units(case):
    z, y, sw, kw, c = case
    one = unihead.compile(H.binary(binary_units=1, **kw))
    two = unihead.compile(H.binary(binary_units=2, **kw))
    z1 = z[:, None]
    z2 = np.stack([np.full_like(z, c), c + z], axis=-1)
    assume(np.all(z2[:, 1] - z2[:, 0] == z))  # the shift is exact
    close(one.probabilities(z1)[:, 0], two.probabilities(z2)[:, 1], atol=1e-300)
    close(one.log_probabilities(z1)[:, 0], two.log_probabilities(z2)[:, 1], atol=1e-300)
    np.testing.assert_array_equal(one.predict(z1), two.predict(z2))
    l1, g1 = one.loss_and_gradient(z1, y, sw)
    l2, g2 = two.loss_and_gradient(z2, y, sw)
    close(l1, l2, atol=1e-300)
    scale = 64 * EPS64 * max(np.abs(g1).max(initial=0.0), 1e-300)
    close(g1[:, 0], g2[:, 1], atol=scale)
    close(g1[:, 0], -g2[:, 0], atol=scale)


@given(multiclass_case())
def test_unit_class_weights_and_constant_sample_weights_change_nothing(case):
    z, y, _, _, opts = case
    k = z.shape[-1]
    plain = unihead.compile(H.multiclass(k, **opts))
    ones = unihead.compile(H.multiclass(k, class_weights=[1.0] * k, **opts))
    l0, g0 = plain.loss_and_gradient(z, y)
    l1, g1 = ones.loss_and_gradient(z, y)
    np.testing.assert_array_equal(l0, l1)
    np.testing.assert_array_equal(g0, g1)
    if opts["reduction"] == "mean":
        l2, g2 = plain.loss_and_gradient(z, y, np.full(len(y), 2.5))
        close(l0, l2)
        close(g0, g2, atol=64 * EPS64 * np.abs(g0).max())
        # a constant class weight is a constant sample weight
        l3, g3 = unihead.compile(H.multiclass(k, class_weights=[0.3] * k, **opts)).loss_and_gradient(z, y)
        close(l0, l3)
        close(g0, g3, atol=64 * EPS64 * np.abs(g0).max())


@given(multiclass_case(), st.randoms(use_true_random=False))
def test_permuting_classes_changes_nothing(case, rnd):
    z, y, cw, sw, opts = case
    k = z.shape[-1]
    perm = list(range(k))
    rnd.shuffle(perm)
    perm = np.asarray(perm)
    inv = np.argsort(perm)
    cw_p = None if cw is None else list(np.asarray(cw)[perm])
    a = unihead.compile(H.multiclass(k, class_weights=cw, **opts))
    b = unihead.compile(H.multiclass(k, class_weights=cw_p, **opts))
    la, ga = a.loss_and_gradient(z, y, sw)
    lb, gb = b.loss_and_gradient(z[:, perm], inv[y], sw)
    close(la, lb, atol=1e-300)
    close(ga[:, perm], gb, atol=64 * EPS64 * np.abs(ga).max(initial=0.0))
    close(a.probabilities(z)[:, perm], b.probabilities(z[:, perm]), atol=1e-300)


@given(
    st.integers(1, 5).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float64, (n, 3), elements=logit_values),
            hnp.arrays(np.float64, (n, 3), elements=st.floats(0, 1)),
            st.sampled_from(["mean", "sum", "none"]),
            st.sampled_from([None, [0.5, 1.0, 2.0]]),
            st.sampled_from([None, 2.0, [1.0, 0.0, 3.0]]),
        )
    ),
    st.randoms(use_true_random=False),
)
def test_permuting_labels_of_a_multilabel_head_changes_nothing(case, rnd):
    z, q, reduction, cw, pw = case
    perm = np.asarray(rnd.sample(range(3), 3))
    pick = lambda v: v if not isinstance(v, list) else list(np.asarray(v)[perm])  # noqa: E731
    a = unihead.compile(H.multilabel(3, label_format="probabilities", reduction=reduction, class_weights=cw, pos_weight=pw))
    b = unihead.compile(H.multilabel(3, label_format="probabilities", reduction=reduction, class_weights=pick(cw), pos_weight=pick(pw)))
    la, ga = a.loss_and_gradient(z, q)
    lb, gb = b.loss_and_gradient(z[:, perm], q[:, perm])
    close(la, lb, atol=1e-300)
    close(ga[:, perm], gb, atol=64 * EPS64 * np.abs(ga).max(initial=0.0))


@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            # logits on a 2^-10 grid so that z + c is exact: the true values do not change
            hnp.arrays(np.int64, (n, 5), elements=st.integers(-40 * 1024, 40 * 1024)),
            st.lists(st.integers(0, 4), min_size=n, max_size=n),
        )
    ),
    st.sampled_from([np.float32, np.float64]),
    st.integers(-900, 900),
    options,
)
def test_adding_a_constant_to_softmax_logits_changes_little(case, dtype, shift, opts):
    zi, y = case
    z = (zi / 1024.0).astype(dtype)
    zs = (z + dtype(shift)).astype(dtype)
    assert np.all(zs - dtype(shift) == z)
    head = unihead.compile(H.multiclass(5, **opts))
    eps = np.finfo(dtype).eps
    p, ps = head.probabilities(z), head.probabilities(zs)
    np.testing.assert_allclose(ps, p, rtol=4 * eps, atol=0)
    l, ls = head.loss(z, np.asarray(y)), head.loss(zs, np.asarray(y))
    np.testing.assert_allclose(ls, l, rtol=4 * eps, atol=0)
