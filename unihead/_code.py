"""Reading training code (parsed with :mod:`ast`, never run) for what a model file cannot hold:
how the loss of a step's micro-batches is combined (gradient accumulation).

:func:`read_accumulation` returns one :class:`Accumulation` per place where a loss reduced to a
mean *per micro-batch* is accumulated over several micro-batches before one optimizer step.
Each micro-batch then divides by its own weight, and the step's gradient is a mean of means
(or a sum of them): examples in micro-batches with many ignored labels, small sample or class
weights, or fewer examples, weigh more than the others.  :func:`unihead.diagnose_code` turns
each one into the ``mean_of_micro_batch_means`` finding.

What is read (docs/scaling-out.md, "What `diagnose` can see"):

* a PyTorch loop: ``X.backward()`` (also ``accelerator.backward(X)``, ``scaler.scale(X)``)
  inside a loop, where the optimizer's ``.step()`` is under an ``if`` in that loop, after it in
  an enclosing loop, or the loop body is ``with accelerator.accumulate(...)``; and ``X`` (or the
  name's assignments in the loop) is a mean-reduced loss: ``F.cross_entropy`` / ``nll_loss`` /
  ``binary_cross_entropy[_with_logits]`` without ``reduction=``, a criterion built in the file
  from ``nn.CrossEntropyLoss`` / ``NLLLoss`` / ``BCEWithLogitsLoss`` / ``BCELoss`` (default
  reduction), a model output's ``.loss`` (Hugging Face models), ``.mean()`` / ``torch.mean``,
  a ratio of sums (``(l * mask).sum() / mask.sum()``), or a unihead head's ``loss(...)``
  without ``normalizer=``; divided or multiplied by a number or not;
* Keras: an optimizer built with ``gradient_accumulation_steps=`` (not 1): Keras averages the
  micro-batches' gradients uniformly;
* optax: ``optax.MultiSteps`` (averages, or sums, the micro-steps' gradients) in a file whose
  loss function returns a mean.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Iterator

__all__ = ["Accumulation", "read_accumulation"]

_CRITERIA = ("CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss")
_FUNCTIONAL = ("cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits")


@dataclasses.dataclass(frozen=True)
class Accumulation:
    """One mean-reduced loss accumulated over micro-batches: where (``line``, ``text``), in
    which framework, how the micro-batches are combined (``how``), what the loss is (``loss``),
    and ``varies``: why each micro-batch's own normalizer differs with its content (ignored
    labels, weights), or ``None`` when only its size can differ."""

    line: int
    framework: str  # "torch" | "keras" | "jax"
    text: str
    how: str
    loss: str
    varies: str | None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return _dotted(node.func) + "()"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _const(node: ast.AST | None) -> object:
    return node.value if isinstance(node, ast.Constant) else ...


def _short(node: ast.AST, n: int = 90) -> str:
    text = ast.unparse(node)
    return text if len(text) <= n else text[: n - 3] + "..."


def _is_mean(call: ast.Call) -> bool:
    return _const(_kw(call, "reduction")) in (..., "mean") or _kw(call, "reduction") is None


def _weights_of(call: ast.Call) -> str | None:
    """Why a PyTorch loss call's mean divides by a count that depends on the labels."""
    parts = [f"{k}=" for k in ("ignore_index", "weight") if _kw(call, k) is not None]
    return (f"with {' and '.join(parts)}, {_short(call, 60)} divides each micro-batch's sum by that micro-batch's own "
            "weight (its labels not ignored, times their class weights)") if parts else None


class _Module:
    """Names bound in the file: criteria (``criterion = nn.CrossEntropyLoss(...)``), unihead
    compiled heads (``compiled = unihead.compile(...)``), model outputs (``out = model(...)``)."""

    def __init__(self, tree: ast.Module):
        self.criteria: dict[str, ast.Call] = {}
        self.compiled: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                name = _dotted(node.value.func)
                for target in node.targets:
                    t = _dotted(target)
                    if name.split(".")[-1] in _CRITERIA and _is_mean(node.value):
                        self.criteria[t] = node.value
                    if name.split(".")[-1] == "compile" and name != "torch.compile":
                        self.compiled.add(t)
                    if name.split(".")[-1] == "loss_fn" and name.rsplit(".", 1)[0] in self.compiled:
                        self.criteria[t] = node.value  # criterion = compiled.loss_fn(): the head's mean


def _mean_loss(e: ast.AST, m: _Module, assigned: dict[str, list[ast.AST]], depth: int = 0) -> tuple[str, str | None] | None:
    """``(what, varies)`` if ``e`` is a loss reduced to a mean over its micro-batch."""
    if depth > 4:
        return None
    if isinstance(e, ast.BinOp) and isinstance(e.op, (ast.Div, ast.Mult)):
        if isinstance(e.op, ast.Div) and all(
            isinstance(s, ast.Call) and (_dotted(s.func).endswith(".sum") or _dotted(s.func) == "sum")
            for s in (e.left, e.right)
        ):
            return _short(e), "the ratio of sums divides each micro-batch by its own weight"
        return _mean_loss(e.left, m, assigned, depth + 1) or (
            _mean_loss(e.right, m, assigned, depth + 1) if isinstance(e.op, ast.Mult) else None)
    if isinstance(e, ast.Name) and e.id in assigned:
        for value in assigned[e.id]:
            found = _mean_loss(value, m, assigned, depth + 1)
            if found:
                return found
        return None
    if isinstance(e, ast.Attribute) and e.attr == "loss":  # a Hugging Face model's output.loss
        return _short(e), ("a Hugging Face model's loss is the mean over the micro-batch's labels != -100, "
                           "its own count")
    if not isinstance(e, ast.Call):
        return None
    name = _dotted(e.func)
    last = name.split(".")[-1]
    if last in _FUNCTIONAL and _is_mean(e):
        return _short(e), _weights_of(e)
    if _kw(e, "normalizer") is not None:  # unihead's contract: divided by the step's weight
        return None
    if name in m.criteria:
        criterion = m.criteria[name]
        unihead_head = _dotted(criterion.func).split(".")[-1] == "loss_fn"
        return _short(e), None if unihead_head else _weights_of(criterion)
    if last == "loss" and name.rsplit(".", 1)[0] in m.compiled:
        return _short(e), None
    if last == "mean":  # torch.mean(x), jnp.mean(x), x.mean()
        return _short(e), ("where= masks each micro-batch's mean" if _kw(e, "where") is not None else None)
    return None


def _calls(node: ast.AST, attr: str) -> Iterator[ast.Call]:
    for n in ast.walk(node):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attr:
            yield n


def _inside(node: ast.AST, container: ast.AST) -> bool:
    return any(n is node for n in ast.walk(container))


def _torch_loops(tree: ast.Module, m: _Module) -> Iterator[Accumulation]:
    loops = [n for n in ast.walk(tree) if isinstance(n, (ast.For, ast.While, ast.AsyncFor))]
    parents = {id(child): n for n in loops for child in ast.walk(n) if child is not n}
    seen: set[int] = set()
    for loop in loops:
        inner = [n for n in loops if n is not loop and _inside(n, loop)]
        for call in _calls(loop, "backward"):
            if id(call) in seen or any(_inside(call, i) for i in inner):
                continue  # the innermost loop holding it reads it
            seen.add(id(call))
            target = call.args[0] if call.args else call.func.value  # accelerator.backward(x) / x.backward()
            if isinstance(target, ast.Call) and isinstance(target.func, ast.Attribute) and target.func.attr == "scale" \
                    and target.args:
                target = target.args[0]  # scaler.scale(loss).backward()
            how = _accumulates(loop, parents.get(id(loop)))
            if how is None:
                continue
            assigned: dict[str, list[ast.AST]] = {}
            for n in ast.walk(loop):
                if isinstance(n, ast.Assign):
                    for t in n.targets:
                        if isinstance(t, ast.Name):
                            assigned.setdefault(t.id, []).append(n.value)
                elif isinstance(n, ast.AugAssign) and isinstance(n.target, ast.Name):
                    assigned.setdefault(n.target.id, []).append(ast.BinOp(n.target, n.op, n.value))
            found = _mean_loss(target, m, {k: [v for v in vs if v is not target] for k, vs in assigned.items()})
            if found:
                yield Accumulation(call.lineno, "torch", _short(call), how, *found)


def _accumulates(loop: ast.AST, parent: ast.AST | None) -> str | None:
    """How the loop accumulates gradients over micro-batches before a step, or None."""
    for node in ast.walk(loop):
        if isinstance(node, ast.If) and any(True for _ in _calls(node, "step")):
            return f"optimizer.step() runs only if {_short(node.test, 50)}"
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and _dotted(i.context_expr.func).endswith(".accumulate")
                for i in node.items):
            return "accelerator.accumulate() steps every gradient_accumulation_steps micro-batches"
    if parent is not None and any(not _inside(c, loop) for c in _calls(parent, "step")):
        return "optimizer.step() runs after the loop over micro-batches"
    return None


def _keras_optax(tree: ast.Module, m: _Module) -> Iterator[Accumulation]:
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    masked = next((f"{_short(c)} masks ignored labels" for c in calls
                   if _kw(c, "ignore_class") is not None or _kw(c, "mask_zero") is not None
                   and _const(_kw(c, "mask_zero")) is not False
                   or _const(_kw(c, "reduction")) == "mean_with_sample_weight"), None)
    for c in calls:
        name = _dotted(c.func)
        steps = _kw(c, "gradient_accumulation_steps")
        if "optimizers." in f".{name}" and steps is not None and _const(steps) not in (None, 1):
            yield Accumulation(c.lineno, "keras", _short(c),
                               f"gradient_accumulation_steps={_short(steps, 30)}: Keras averages the micro-batches' "
                               "gradients uniformly", "the compiled loss (a mean over each micro-batch)", masked)
    multi = [c for c in calls if _dotted(c.func).split(".")[-1] == "MultiSteps"]
    if not multi:
        return
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))):
        returns = [fn.body] if isinstance(fn, ast.Lambda) else [r.value for r in ast.walk(fn)
                                                                 if isinstance(r, ast.Return) and r.value]
        for value in returns:
            found = _mean_loss(value, m, {})
            if found:
                c = multi[0]
                yield Accumulation(c.lineno, "jax", _short(c),
                                   "optax.MultiSteps combines the micro-steps' gradients (their mean by default)",
                                   f"{found[0]} (returned by {getattr(fn, 'name', 'a lambda')}, line {value.lineno})",
                                   found[1])
                return


def read_accumulation(source: str, filename: str = "<code>") -> list[Accumulation]:
    """Every mean-reduced loss accumulated over micro-batches in ``source`` (Python code, parsed,
    never run).  A ``SyntaxError`` becomes a ``ValueError`` naming the line."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        raise ValueError(f"{filename}: not Python code unihead can read: {e.msg} (line {e.lineno}).") from None
    m = _Module(tree)
    found = [*_torch_loops(tree, m), *_keras_optax(tree, m)]
    return sorted(found, key=lambda a: a.line)
