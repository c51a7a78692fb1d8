"""Porting a trained head between frameworks: :func:`port`.

The source is a Keras model or ``Dense``, a PyTorch module or ``nn.Linear`` (read by
:func:`unihead.diagnose`; a head with an error is refused, with the findings), a head file
(:func:`unihead.save`), or a ``(head, weights)`` pair.  The result is the compiled head and the
target framework's layer holding the same weights, checked by :func:`port` itself.

**The check.**  Probabilities of the ported layer must agree with the source's within 4 float32
ulp.  The features are random *basis-vector* features ``x = s * e_i`` (``s`` in
``{±1/2, ±1, ±2}``): their logits ``s * kernel[i] + bias`` are exact products plus one rounded
addition, so every framework computes the same logits bit for bit, and what is compared is the
head itself (weights, layout, unit conversion, activation).  With dense random features the
frameworks' matrix products sum in different orders and their logits already differ by
rounding; those differences (tens to hundreds of ulp in the probabilities, measured) come from
the matmul, not from the port, and are reported beside the check as ``dense_ulp``.

"The source's probabilities" are unihead's probabilities computed in the source framework from
the source layer's logits.  The source's own activation (``keras.ops.softmax``,
``torch.sigmoid``, ...) is measured against the float64 values too and reported as
``source_native_ulp``: native activations are up to several ulp off on ordinary logits, and far
more where probabilities underflow.

**Binary units.**  ``binary_units=2`` turns a 1-unit head into 2 units exactly (kernel
``[0, w]``, bias ``[0, b]``: ``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``).  The reverse,
``binary_units=1``, computes ``w1 - w0`` and ``b1 - b0`` in float64 and rounds once; the
rounding can move a logit by an ulp, so that direction is checked against the float64
probabilities of the converted weights, and its distance from the source is reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from ._ulp import ulp_error, ulp_errors
from .compiled import canonical_weights, host_weights
from .errors import HeadSpecError, PortCheckError
from .spec import ClassificationHead

__all__ = ["port", "Ported", "PortCheck", "TOLERANCE_ULP"]

#: The port check's criterion (float32 ulp).
TOLERANCE_ULP = 4.0
_FLT_MIN = 2.0**-126  # backends that flush subnormals to zero (XLA, TF on CPU) cannot go below it


@dataclasses.dataclass(frozen=True)
class PortCheck:
    """What :func:`port` measured (float32 ulp; differences below the smallest normal float32 do
    not count, as XLA and TensorFlow flush subnormals to zero on CPU)."""

    source: str
    target: str
    worst_ulp: float  # the criterion: ported probabilities vs the source's (or vs exact, 2 -> 1 units)
    exact_ulp: float  # ported probabilities vs float64 probabilities of the ported logits
    source_ulp: float  # ported probabilities vs the source's (equals worst_ulp unless 2 -> 1 units)
    source_native_ulp: float | None  # the source framework's own activation vs float64
    dense_ulp: float  # ported vs source on dense Gaussian features (matmul summation order)
    logits_identical: bool  # basis-vector logits bit-identical in source and target
    n_features: int
    tolerance: float = TOLERANCE_ULP
    worst_abs: float = 0.0  # |ported - reference| where worst_ulp is measured
    worst_where: str = ""  # that point in words: output, feature, the two values

    @property
    def passed(self) -> bool:
        return self.worst_ulp <= self.tolerance

    def failure(self) -> str:
        """Why the check failed, with its figures (the message of :class:`~unihead.PortCheckError`)."""
        logits = ("bit-identical: the difference is in the probabilities the target computes from them"
                  if self.logits_identical else
                  "NOT bit-identical: the ported layer does not compute the source's x @ kernel + bias "
                  "(its weights or their layout changed on the way)")
        return (f"port {self.source} -> {self.target} failed its check: the ported probabilities are "
                f"{self.worst_ulp:.4g} float32 ulp ({self.worst_abs:.3g} absolute) from the reference "
                f"on {self.n_features} basis-vector features; the tolerance is {self.tolerance:g} ulp. "
                f"Worst: {self.worst_where}. The logits are {logits}.")

    def __str__(self) -> str:
        native = "" if self.source_native_ulp is None else \
            f"; the {self.source} activation itself is {self.source_native_ulp:.3g} ulp from exact"
        return (
            f"port {self.source} -> {self.target}: probabilities within {self.worst_ulp:.3g} ulp of the "
            f"source (criterion <= {self.tolerance:g}) on {self.n_features} basis-vector features, "
            f"{self.exact_ulp:.3g} ulp from exact; logits "
            f"{'bit-identical' if self.logits_identical else 'NOT bit-identical'}{native}; "
            f"dense Gaussian features: {self.dense_ulp:.3g} ulp (matmul summation order)"
        )


@dataclasses.dataclass
class Ported:
    """What :func:`port` returns.  ``layer`` is the target's output layer (``nn.Module``, Keras
    ``Layer``, JAX ``Dense`` with ``params``, Flax ``nnx`` module (``HeadLinear``), NumPy
    ``Dense``), ``compiled`` its compiled head
    (loss, probabilities, predict), ``weights`` the canonical weights it holds."""

    head: ClassificationHead
    compiled: Any
    layer: Any
    weights: dict[str, np.ndarray]
    params: Any = None
    check: PortCheck | None = None
    source: str = ""


# ------------------------------------------------------------------------------ sources
def _resolve(source: Any, loss: Any) -> tuple[ClassificationHead, dict[str, np.ndarray], str, Any]:
    """``(head, weights, framework, layer)`` of a source; ``layer`` computes source logits."""
    if isinstance(source, (str, os.PathLike)):
        from .headfile import load

        hf = load(source)
        return hf.head, dict(hf.weights), "numpy", None
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], ClassificationHead):
        head, weights = source
        weights = host_weights(weights)
        kernel, bias = canonical_weights(head, None, weights)
        return head, {"kernel": kernel, "bias": bias}, "numpy", None
    from ._diagnose import diagnose

    d = diagnose(source, loss)
    if not d.ok:
        raise HeadSpecError(
            "this head has errors, so it has no well-defined numbers to port; fix them first:\n" + str(d)
        )
    if d.weights is None:
        raise ValueError("the source layer is not built yet (it has no weights): call it on data first.")
    from ._readers import read_model

    r = read_model(source, loss)
    return d.head, {k: np.asarray(v) for k, v in d.weights.items()}, d.framework, r.layer


def _convert_units(head: ClassificationHead, w: dict[str, np.ndarray], units: int | None
                   ) -> tuple[ClassificationHead, dict[str, np.ndarray]]:
    if units is None or head.task != "binary" or units == head.binary_units:
        if units is not None and head.task != "binary":
            raise HeadSpecError(f"binary_units applies to binary heads; this head is {head!r}.")
        return head, w
    k, b = w["kernel"], w["bias"]
    if units == 1 and head.logit_softcap is not None:
        raise HeadSpecError(
            f"A soft-capped 2-unit head reads c(z1) - c(z0) with c(z) = s tanh(z / s), which no single "
            f"capped logit gives: {head!r} cannot become a 1-unit head with the same probabilities. "
            f"Port it with binary_units=2 (or leave binary_units out)."
        )
    if units == 2:  # exact: logit z <=> logits [0, z] (capped: [0, c(z)])
        return head.with_binary_units(2), {
            "kernel": np.concatenate([np.zeros_like(k), k], axis=1),
            "bias": np.concatenate([np.zeros_like(b), b]),
        }
    k64, b64 = k.astype(np.float64), b.astype(np.float64)
    return head.with_binary_units(1), {
        "kernel": (k64[:, 1:] - k64[:, :1]).astype(k.dtype),
        "bias": (b64[1:] - b64[:1]).astype(b.dtype),
    }


# ------------------------------------------------------------------------------ logits per framework
def _source_logits(framework: str, layer: Any, weights: dict[str, np.ndarray], x: np.ndarray) -> Any:
    """The source layer's logits for ``x``, computed by the source framework (a native array)."""
    if framework == "torch" and layer is not None:
        import torch

        with torch.no_grad():
            xt = torch.as_tensor(x, dtype=layer.weight.dtype, device=layer.weight.device)
            return torch.nn.functional.linear(xt, layer.weight, layer.bias)
    if framework == "keras" and layer is not None:
        import keras

        xk = keras.ops.convert_to_tensor(x.astype(layer.kernel.dtype))
        out = keras.ops.matmul(xk, layer.kernel)
        return out + layer.bias if layer.use_bias else out
    return x.astype(weights["kernel"].dtype) @ weights["kernel"] + weights["bias"]


def _target_logits(target: str, layer: Any, params: Any, x: np.ndarray, dtype: Any) -> Any:
    xs = x.astype(dtype)
    if target == "torch":
        import torch

        with torch.no_grad():
            return layer(torch.as_tensor(xs, device=layer.weight.device))
    if target == "jax":
        return layer.apply(params, xs)
    return layer(xs)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if type(x).__module__.startswith("tensorflow") or "keras" in type(x).__module__:
        import keras

        x = keras.ops.convert_to_numpy(x)
    return np.asarray(x)


def _native_activation(framework: str, head: ClassificationHead, logits: Any) -> Any:
    """The source framework's own softmax/sigmoid (what users of it call), of the logits capped
    with the framework's own ``tanh`` for a soft-capped head (docs/semantics.md §10, row sc1)."""
    soft = head.activation == "softmax"
    s = head.logit_softcap
    if framework == "torch":
        import torch

        if s is not None:
            logits = s * torch.tanh(logits / s)
        return torch.softmax(logits, -1) if soft else torch.sigmoid(logits)
    if framework == "keras":
        import keras

        if s is not None:
            logits = s * keras.ops.tanh(logits / s)
        return keras.ops.softmax(logits, axis=-1) if soft else keras.ops.sigmoid(logits)
    return None


def _ulp(value: Any, ref: Any) -> float:
    return ulp_error(value, ref, "float32", floor=_FLT_MIN)


def _worst(value: np.ndarray, ref: np.ndarray, x: np.ndarray, reference: str) -> tuple[float, str]:
    """``|value - ref|`` where the ulp error is largest, and that point in words (``x`` is the
    basis-vector feature of each row, ``reference`` names ``ref``)."""
    r = np.asarray(ref, np.float64)
    v = np.asarray(value, np.float64).reshape(r.shape)
    e = ulp_errors(v, r, "float32", floor=_FLT_MIN).reshape(len(x), -1)
    row, col = np.unravel_index(int(np.argmax(e)), e.shape)
    nz = np.flatnonzero(x[row])
    feature = f"x = {x[row, nz[0]]:g} * e_{nz[0]}" if nz.size else "x = 0 (the bias alone)"
    a, b = v.reshape(len(x), -1)[row, col], r.reshape(len(x), -1)[row, col]
    output = "P(class 1)" if r.ndim == 1 else f"output {col}"
    return float(abs(a - b)), f"{output} at {feature}: {float(a)!r} ported vs {float(b)!r} ({reference})"


def _p1(p: np.ndarray, head: ClassificationHead) -> np.ndarray:
    """P(class 1) of a binary head whatever its units; other heads unchanged."""
    if head.task == "binary":
        return p[..., -1]
    return p


def _features(d: int, rng: np.random.Generator, n: int = 512) -> np.ndarray:
    scales = np.array([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
    m = min(n, 6 * d)
    picks = rng.choice(6 * d, size=m, replace=False)
    x = np.zeros((m + 1, d))
    x[np.arange(m), picks // 6] = scales[picks % 6]
    return x  # the last row is zero: logits = bias


# ------------------------------------------------------------------------------ port
def port(source: Any, to: str, loss: Any = None, *, binary_units: int | None = None,
         check: bool = True, seed: int = 0) -> Ported:
    """Move a trained head to framework ``to`` (``"torch"``, ``"jax"``, ``"flax"``, ``"keras"``,
    ``"numpy"``).

    ``source``: a Keras model/``Dense``, a PyTorch module/``nn.Linear`` (with its criterion as
    ``loss``), a head-file path, or ``(head, weights)``.  ``binary_units`` converts a binary head
    between 1 and 2 units.  With ``check=True`` (the default) the ported probabilities are
    compared with the source's (see the module docstring) and a failure raises
    :class:`~unihead.PortCheckError` with the figures (its ``check`` is the measurement);
    ``ported.check`` holds it."""
    from ._registry import compile

    head, weights, src_fw, src_layer = _resolve(source, loss)
    target_head, target_w = _convert_units(head, weights, binary_units)
    compiled = compile(target_head, to)
    d = int(target_w["kernel"].shape[0])
    layer = compiled.layer(d, weights=target_w)
    params = None
    if to == "jax":
        import jax

        params = layer.init(jax.random.key(seed))
    out = Ported(target_head, compiled, layer, target_w, params, None, src_fw)
    if check:
        out.check = _check(head, weights, src_fw, src_layer, out, to, seed)
        if not out.check.passed:
            raise PortCheckError(out.check.failure(), out.check)
    return out


def _check(head: ClassificationHead, weights: dict[str, np.ndarray], src_fw: str, src_layer: Any,
           out: Ported, to: str, seed: int) -> PortCheck:
    from ._registry import compile

    rng = np.random.default_rng(seed)
    d = int(weights["kernel"].shape[0])
    dtype = np.result_type(weights["kernel"].dtype, np.float32)
    src_fw_compile = src_fw if src_fw in ("torch", "keras") else "numpy"
    src_compiled = compile(head, src_fw_compile)
    x = _features(d, rng)
    dense = rng.standard_normal((256, d))

    def source_probs(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
        z = _source_logits(src_fw, src_layer, weights, feats)
        return _np(z), _np(src_compiled.probabilities(z)), z

    z_src, p_src, z_native = source_probs(x)
    z_tgt = _np(_target_logits(to, out.layer, out.params, x, dtype))
    p_tgt = _np(out.compiled.probabilities(_target_logits(to, out.layer, out.params, x, dtype)))
    exact = compile(out.head, "numpy")
    p_exact_tgt = exact.probabilities(z_tgt.astype(np.float64))
    p_exact_src = compile(head, "numpy").probabilities(z_src.astype(np.float64))
    converted_down = head.task == "binary" and head.binary_units == 2 and out.head.binary_units == 1
    converted_up = head.task == "binary" and head.binary_units == 1 and out.head.binary_units == 2
    if converted_up:
        identical = bool(np.array_equal(z_tgt[..., 1:], z_src) and not np.any(z_tgt[..., :1]))
    elif converted_down:
        identical = False  # the logit is a difference of the source's two
    else:
        identical = bool(np.array_equal(z_tgt, z_src))
    source_ulp = _ulp(_p1(p_tgt, out.head), _p1(p_src, head))
    exact_ulp = _ulp(p_tgt, p_exact_tgt)
    native = _native_activation(src_fw, head, z_native)
    native_ulp = None if native is None else _ulp(_np(native), p_exact_src)
    _, p_src_dense, _ = source_probs(dense)
    p_tgt_dense = _np(out.compiled.probabilities(_target_logits(to, out.layer, out.params, dense, dtype)))
    dense_ulp = _ulp(_p1(p_tgt_dense, out.head), _p1(p_src_dense, head))
    worst = exact_ulp if converted_down else source_ulp
    if not math.isfinite(worst):
        worst = math.inf
    worst_abs, where = (_worst(p_tgt, p_exact_tgt, x, "float64 probabilities of the converted weights")
                        if converted_down else
                        _worst(_p1(p_tgt, out.head), _p1(p_src, head), x, f"the {src_fw} source's"))
    return PortCheck(src_fw, to, worst, exact_ulp, source_ulp, native_ulp, dense_ulp, identical, len(x),
                     worst_abs=worst_abs, worst_where=where)
