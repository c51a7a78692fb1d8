"""The data of tests/test_distributed_keras.py, shared with its child process
(tests/keras_distributed_child.py); imports no framework.

A multiclass head with every weighting at once (ignored labels, class weights, label smoothing,
sample weights with zeros), and a batch whose micro-batches of ``ceil(n / STEPS)`` examples
count very different weights: the second is all ignored labels, the third has five zero sample
weights, and with ``n=30`` the last is smaller than the others (fit's last batch)."""

from __future__ import annotations

import numpy as np

from unihead import ClassificationHead

HEAD = ClassificationHead.multiclass(
    4, ignore_index=-100, class_weights=[1.0, 2.0, 1.0, 0.5], label_smoothing=0.1).to_dict()
STEPS = 4  # micro-batches per update
LR = 0.5  # SGD's learning rate: the update is -LR x the gradient
FEATURES = 6


def training_data(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(17)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    sw = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    m = -(-n // STEPS)
    y[[1, 5]] = -100  # micro-batch 0: two ignored labels
    y[m:2 * m] = -100  # micro-batch 1: every label ignored
    sw[2 * m:2 * m + 5] = 0.0  # micro-batch 2: five zero sample weights
    y[3 * m + 1] = -100  # micro-batch 3: one ignored label
    return x, y, sw


def initial_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"kernel": (0.5 * rng.normal(size=(FEATURES, 4))).astype(np.float32),
            "bias": (0.5 * rng.normal(size=4)).astype(np.float32)}
