"""Checks shared by the backend test modules (PyTorch, JAX, Keras): a backend's float32 values
against the NumPy backend's float64 values on the extreme cases of the foundation issue."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import unihead
from unihead.conformance.reference import FLT_MIN, MPReference, ulp_error

from .cases import extreme_logits, labels_for, sample_weights_for

# run(head, z, y, sw) -> {"probabilities", "log_probabilities", "loss", "none", "grad", "predict"}
Runner = Callable[[Any, np.ndarray, np.ndarray, Any], dict]


def tolerance(head) -> float:
    """docs/semantics.md §11: 4 ulp (focal loss: 4 + 2 gamma)."""
    return 4.0 + 2.0 * head.focal_gamma


def numpy64(head, z, y, sw) -> dict:
    c = unihead.compile(head, "numpy")
    z64 = z.astype(np.float64)
    loss, grad = c.loss_and_gradient(z64, y, sw)
    return {
        "probabilities": c.probabilities(z64),
        "log_probabilities": c.log_probabilities(z64),
        "loss": loss,
        "none": unihead.compile(head.replace(reduction="none"), "numpy").loss(z64, y, sw),
        "grad": grad,
        "predict": c.predict(z),
    }


def worst_errors(head, run: Runner, weighted: bool, seed: int = 1234, ftz: bool = False) -> dict[str, float]:
    """Worst float32-ulp error of each output of ``run`` against NumPy float64 (gradients in ulp of
    the larger of their two terms, from the 400-digit reference).  ``ftz``: the backend flushes
    subnormal numbers to zero; values it cannot represent get the absolute allowance of
    docs/semantics.md §11 (K times the smallest normal float32)."""
    rng = np.random.default_rng(seed)
    z = extreme_logits(head.num_outputs, rng).astype(np.float32)
    y = labels_for(head, len(z), rng)
    sw = sample_weights_for(head, len(z), rng) if weighted else None
    want = numpy64(head, z, y, sw)
    got = run(head, z, y, sw)
    scale = MPReference(head).evaluate(z, y, sw)["grad_scale"]
    floor = head.num_outputs * FLT_MIN if ftz else 0.0
    out = {}
    for key in ("probabilities", "log_probabilities", "loss", "none", "grad"):
        g, w = np.asarray(got[key], np.float64), np.asarray(want[key])
        assert g.shape == w.shape, (key, g.shape, w.shape)
        out[key] = ulp_error(g, w, "float32", scale=scale if key == "grad" else None, floor=floor)
    np.testing.assert_array_equal(np.asarray(got["predict"]), want["predict"])
    return out


def assert_agrees_with_numpy64(head, run: Runner, weighted: bool, ftz: bool = False) -> dict[str, float]:
    errors = worst_errors(head, run, weighted, ftz=ftz)
    tol = tolerance(head)
    bad = {k: round(v, 2) for k, v in errors.items() if not v <= tol}
    assert not bad, f"{head!r}: errors above {tol} ulp: {bad} (all: {errors})"
    return errors
