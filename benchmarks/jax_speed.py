"""jax.jit(jax.value_and_grad(loss)) of unihead vs the optax equivalent, alternating blocks.

    python benchmarks/jax_speed.py [--rows 4096] [--classes 1000] [--keep inputs|stats]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import unihead
from unihead import ClassificationHead as H


def timeit(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=150)
    ap.add_argument("--keep", default="inputs")
    args = ap.parse_args()
    n, k = args.rows, args.classes
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(n, k)).astype(np.float32) * 3)
    y = jnp.asarray(rng.integers(0, k, n))
    ym = jnp.asarray((rng.uniform(size=(n, k)) < 0.1).astype(np.float32))
    cases = {
        "multiclass sparse": (H.multiclass(k), y,
                              lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()),
        "multilabel": (H.multilabel(k), ym, lambda x: optax.sigmoid_binary_cross_entropy(x, ym).mean()),
    }
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, logits {n} x {k} float32, keep={args.keep}")
    for name, (head, labels, native) in cases.items():
        c = unihead.compile(head, "jax", keep=args.keep)
        ours = jax.jit(jax.value_and_grad(lambda x: c.loss(x, labels)))
        nat = jax.jit(jax.value_and_grad(native))
        for _ in range(3):
            jax.block_until_ready(ours(z)), jax.block_until_ready(nat(z))
        a, b, ratios = [], [], []
        for _ in range(max(1, args.repeats // 15)):
            ta, tb = timeit(lambda: ours(z), 15), timeit(lambda: nat(z), 15)
            a += ta
            b += tb
            ratios.append(statistics.median(ta) / statistics.median(tb))
        print(f"{name:18s} unihead {statistics.median(a) * 1e3:7.2f} ms   optax {statistics.median(b) * 1e3:7.2f} ms"
              f"   ratio {statistics.median(ratios):5.2f}")


if __name__ == "__main__":
    main()
