"""Issue 18, the class-sharded (vocab-parallel) loss on JAX, in a child process with 8 host
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``; this process has initialised
JAX with one):

* ``jax.shard_map`` with the classes split over the mesh axis ``"vocab"`` (8 devices of 5
  classes): :func:`unihead.backends.jax.class_sharded_loss` (explicit ``lax.pmax``/``lax.psum``),
  every case of tests/vocab_cases.py (every multiclass sparse option, the three reductions,
  ``normalizer=``), gradients taken outside the ``shard_map`` with respect to the full (sharded)
  logits; and a kernel split by columns with a replicated hidden state and bias slices
  (gradients of all three).
* a plain ``jax.jit`` of ``compiled.loss`` over logits sharded on the class axis
  (``NamedSharding(mesh, P(None, "vocab"))``) and of ``compiled.loss(x @ W + b)`` with ``W`` sharded
  by columns: the same values, and the compiled program gathers no ``(N, V)`` array (its HLO
  has no all-gather of that shape); the same on a mesh of *explicit* axes (``jax.make_mesh``'s
  default, where shardings are part of the arrays' types), batch and classes both split.

Against the float64 reference of tests/vocab_cases.py with the tolerance table (docs/semantics.md
§11); the linear case against float64 NumPy of the same formula, bound: twice the unsharded
float32 jit's own error plus 4 ulp.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H
from unihead._ulp import ulp_error

from .conftest import require
from .spawned import device_child
from .vocab_cases import CASES, D, N, V, data, reference, tolerance

ROOT = Path(__file__).resolve().parents[1]
DEVICES = 8


def _linear_data() -> tuple:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D)).astype(np.float32)
    W = (rng.normal(size=(D, V)) * 0.8).astype(np.float32)
    b = (rng.normal(size=V) * 0.3).astype(np.float32)
    y = rng.integers(0, V, N)
    return x, W, b, y


LINEAR_HEAD = dict(task="multiclass", num_classes=V, label_smoothing=0.1)


def _child() -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from unihead.backends.jax import class_sharded_loss

    start = time.perf_counter()
    assert len(jax.devices()) == DEVICES, jax.devices()
    mesh = jax.make_mesh((DEVICES,), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,))
    cols = NamedSharding(mesh, P(None, "vocab"))
    explicit = jax.make_mesh((2, DEVICES // 2), ("data", "vocab"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    tolist = lambda a: np.asarray(a, np.float64).tolist()
    report: dict = {"cases": {}, "hlo": {}}
    for name in CASES:
        z, y, sw = data(name)
        c = unihead.compile(H(**CASES[name]), "jax")
        zs = jax.device_put(z, cols)
        norms = (None, 10.0) if CASES[name].get("reduction", "mean") != "none" else (None,)
        for norm in norms:
            def local(zl, y, *sw, norm=norm):
                return class_sharded_loss(c, zl, y, *sw, axis_name="vocab", normalizer=norm)

            extra = () if sw is None else (sw,)
            f = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "vocab"), P(), *([P()] * len(extra))),
                              out_specs=P())
            both = lambda loss: jax.jit(lambda z, *a: (loss(z, *a), jax.grad(lambda t: loss(t, *a).sum())(z)))
            per, g = both(f)(zs, y, *extra)
            # the plain jit of the unsharded loss over the class-sharded logits
            dense = both(lambda z, *a: c.loss(z, *a, normalizer=norm)).lower(zs, y, *extra).compile()
            dv, dg = dense(zs, y, *extra)
            # explicit axes, batch over 2 devices and classes over 4: shardings are types there
            with jax.set_mesh(explicit):
                put = lambda a, *spec: jax.device_put(a, NamedSharding(explicit, P(*spec)))
                ea = (put(y, "data"),) + (() if sw is None else (put(sw, "data"),))
                ev, eg = both(lambda z, *a: c.loss(z, *a, normalizer=norm))(put(z, "data", "vocab"), *ea)
            report["cases"][f"{name}|{norm}"] = {"shard_map": [tolist(per), tolist(g)], "jit": [tolist(dv), tolist(dg)],
                                                 "explicit jit": [tolist(ev), tolist(eg)]}
            if norm is None:
                hlo = dense.as_text()
                report["hlo"][name] = _gathers(hlo)
    # a kernel split by columns, the hidden state replicated
    x, W, b, y = _linear_data()
    c = unihead.compile(H(**LINEAR_HEAD), "jax")

    def local(x, w, bb, y):
        return class_sharded_loss(c, x @ w + bb, y, axis_name="vocab")

    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "vocab"), P("vocab"), P()), out_specs=P())
    args = (x, jax.device_put(W, cols), jax.device_put(b, NamedSharding(mesh, P("vocab"))), y)
    v, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
    report["linear"] = [float(v), *(tolist(t) for t in g)]
    plain = jax.jit(jax.value_and_grad(lambda x, w, bb, y: c.loss(x @ w + bb, y), argnums=(0, 1, 2)))
    v, g = plain(*args)
    report["linear_jit"] = [float(v), *(tolist(t) for t in g)]
    report["hlo"]["linear"] = _gathers(plain.lower(*args).compile().as_text())
    with jax.set_mesh(explicit):
        put = lambda a, *spec: jax.device_put(a, NamedSharding(explicit, P(*spec)))
        v, g = plain(put(x, "data", None), put(W, None, "vocab"), put(b, "vocab"), put(y, "data"))
    report["linear_explicit"] = [float(v), *(tolist(t) for t in g)]
    v, g = jax.jit(jax.value_and_grad(lambda x, w, bb, y: c.loss(x @ w + bb, y), argnums=(0, 1, 2)))(x, W, b, y)
    report["linear_one_device"] = [float(v), *(tolist(t) for t in g)]
    # errors: no axis bound; uneven default shards
    try:
        class_sharded_loss(c, jnp.zeros((2, V)), np.zeros(2, np.int32), axis_name="vocab")
        report["unbound"] = "returned"
    except ValueError as e:
        report["unbound"] = str(e)
    try:
        jax.shard_map(lambda z: class_sharded_loss(c, z[:, :3], np.zeros(N, np.int32), axis_name="vocab"),
                      mesh=mesh, in_specs=P(None, "vocab"), out_specs=P())(jnp.zeros((N, V)))
        report["uneven"] = "returned"
    except ValueError as e:
        report["uneven"] = str(e)
    report["seconds"] = time.perf_counter() - start
    return report


def _gathers(hlo: str) -> list[str]:
    """The result shapes of the all-gather ops of a compiled program."""
    return re.findall(r"= (\S+) all-gather(?:-start)?\(", hlo)


if __name__ == "__main__":
    print(json.dumps(_child()))


@pytest.fixture(scope="module")
def devices() -> dict:
    require("jax")
    return device_child("tests.test_vocab_parallel_jax", DEVICES, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_shard_map_and_sharded_jit_give_the_unsharded_loss(devices, name):
    z, y, sw = data(name)
    for key, r in devices["cases"].items():
        case, norm = key.split("|")
        if case != name:
            continue
        ref = reference(name, z, y, sw, None if norm == "None" else float(norm))
        for how in ("shard_map", "jit", "explicit jit"):
            loss, grad = (np.asarray(a) for a in r[how])
            assert ulp_error(loss, ref["loss"]) <= tolerance(name, "loss"), (key, how)
            err = ulp_error(grad, ref["grad"], scale=ref["scale"])
            assert err <= tolerance(name, "grad"), (key, how, err)


def test_sharded_jit_gathers_no_full_logits(devices):
    full = f"f32[{N},{V}]"
    for name, shapes in devices["hlo"].items():
        assert not any(s.startswith(full) for s in shapes), (name, shapes)


def test_shard_map_column_parallel_linear(devices):
    x, W, b, y = _linear_data()
    # float64 reference of the same head (NumPy's dense path; the linear's gradients by hand)
    c = unihead.compile(H(**LINEAR_HEAD), "numpy")
    z = x.astype(np.float64) @ W.astype(np.float64) + b
    loss, gz = c.loss_and_gradient(z, y)
    ref = [float(loss), gz @ W.T.astype(np.float64), x.T.astype(np.float64) @ gz, gz.sum(0)]
    got, one = devices["linear"], devices["linear_one_device"]
    for i in range(4):
        err_one = np.max(np.abs(np.asarray(one[i]) - ref[i]))
        err = np.max(np.abs(np.asarray(got[i]) - ref[i]))
        assert err <= 2 * err_one + 4 * np.max(np.spacing(np.abs(np.float32(ref[i])))), (i, err, err_one)
        for how in ("linear_jit", "linear_explicit"):
            err_jit = np.max(np.abs(np.asarray(devices[how][i]) - ref[i]))
            assert err_jit <= 2 * err_one + 4 * np.max(np.spacing(np.abs(np.float32(ref[i])))), (how, i, err_jit)


def test_errors_say_what_to_write(devices):
    assert "no axis 'vocab' is bound here" in devices["unbound"] and "shard_map" in devices["unbound"]
    assert "pass class_start=" in devices["uneven"], devices["uneven"]
