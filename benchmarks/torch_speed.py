"""Forward+backward time of unihead's PyTorch loss vs the native loss (eager), interleaved.

    python benchmarks/torch_speed.py [--rows 4096] [--classes 1000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import unihead
from unihead import ClassificationHead as H


def timeit(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=150)
    args = ap.parse_args()
    n, k = args.rows, args.classes
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, k, generator=g) * 3
    y = torch.randint(0, k, (n,), generator=g)
    ym = (torch.rand(n, k, generator=g) < 0.1).float()
    cases = {
        "multiclass sparse": (
            unihead.compile(H.multiclass(k), "torch", validate=False), y,
            lambda x: F.cross_entropy(x, y)),
        "multilabel": (
            unihead.compile(H.multilabel(k), "torch", validate=False), ym,
            lambda x: F.binary_cross_entropy_with_logits(x, ym)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, logits {n} x {k} float32")
    for name, (head, labels, native) in cases.items():
        def ours():
            x = z.detach().requires_grad_()
            head.loss(x, labels).backward()

        def nat():
            x = z.detach().requires_grad_()
            native(x).backward()

        for _ in range(3):
            ours(), nat()
        # Alternate blocks: steady state inside a block, the machine's drift cancels across
        # blocks; the ratio is the median of the per-block ratios of medians.
        a, b, ratios = [], [], []
        block = 15
        for _ in range(max(1, args.repeats // block)):
            ta, tb = timeit(ours, block), timeit(nat, block)
            a += ta
            b += tb
            ratios.append(statistics.median(ta) / statistics.median(tb))
        ratio = statistics.median(ratios)
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name:18s} unihead {ma * 1e3:7.2f} ms   native {mb * 1e3:7.2f} ms   ratio {ratio:5.2f}")


if __name__ == "__main__":
    main()
