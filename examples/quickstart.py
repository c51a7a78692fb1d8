"""The seed questions, answered with unihead (NumPy backend: runs anywhere).

    python examples/quickstart.py
"""

from __future__ import annotations

import numpy as np

import unihead
from unihead import ClassificationHead

rng = np.random.default_rng(0)


def show(title: str) -> None:
    print(f"\n== {title}")


show("Binary: Dense(1) or Dense(2)?  Both, with the same numbers; the labels stay 0/1.")
z = rng.normal(size=(6, 1)).astype(np.float32)
y = np.array([0, 1, 1, 0, 1, 0])
one = unihead.compile(ClassificationHead.binary(), "numpy")
two = unihead.compile(ClassificationHead.binary(binary_units=2), "numpy")
z2 = np.concatenate([np.zeros_like(z), z], axis=-1)  # logit z  <=>  logits [0, z]
print("1 unit + sigmoid :", one.loss(z, y))
print("2 units + softmax:", two.loss(z2, y))

show("Dense(1, activation='softmax') always outputs 1.0: it cannot be written")
try:
    ClassificationHead("multiclass", num_classes=1)
except unihead.HeadSpecError as err:
    print("HeadSpecError:", err)

show("binary_crossentropy on 4 classes gives negative losses: rejected, with the fix")
try:
    one.loss(z, np.array([0, 3, 1, 2, 0, 1]))
except ValueError as err:
    print("ValueError:", err)

show("3 sigmoids with categorical cross-entropy: pick the head by what the labels mean")
print("one class per example  ->", ClassificationHead.multiclass(3), "(softmax, rows sum to 1)")
print("any subset of labels   ->", ClassificationHead.multilabel(3), "(a sigmoid per label)")

show("One-hot vs integer labels: say which, and the head checks it")
logits = rng.normal(size=(4, 3)).astype(np.float32)
ids = np.array([0, 2, 1, 2])
sparse = unihead.compile(ClassificationHead.multiclass(3), "numpy")
onehot = unihead.compile(ClassificationHead.multiclass(3, label_format="one_hot"), "numpy")
print("sparse ids:", sparse.loss(logits, ids), " one-hot rows:", onehot.loss(logits, np.eye(3)[ids]))
try:
    sparse.loss(logits, np.eye(3)[ids])
except ValueError as err:
    print("ValueError:", err)

show("from_logits: layers emit logits and losses take logits; probabilities are separate")
print("probabilities:\n", sparse.probabilities(logits))

show("Accuracy where native losses return 0: a confident, correct prediction")
confident = np.array([[30.0, 0.0, 0.0]], np.float32)
naive = np.log(np.exp(confident - confident.max()).sum()) - 0.0  # logsumexp(z) - z_y
print("logsumexp(z) - z_y :", naive)
print("unihead            :", sparse.loss(confident, np.array([0])), " (true: 2 e^-30 = 1.87e-13)")
