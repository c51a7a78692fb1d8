"""Hugging Face ``transformers.Trainer`` with a unihead head (unihead.backends.transformers).

A tiny BERT token classifier built from a config (random weights, nothing downloaded: no hub,
no tokenizer; input ids are fed directly) is trained for ONE optimizer step by the real
``Trainer``: 12 sequences in 3 micro-batches of 4 (``gradient_accumulation_steps=3``), whose
kept (not -100) labels are uneven: 32, 3 and 13 tokens.  The reference is the same model, the
same step, on the whole batch at once: the gradient of the full batch's weighted mean, computed
by the head's own loss in one call, and plain SGD.

The measure: the accumulated gradient Trainer hands to the optimizer (read by a callback just
before the step) against the full batch's, as ``max |g - g_ref| / max |g_ref|`` over all the
model's parameter entries.  Exact means within float32 summation order, bounded by
``BOUND`` (the micro-batches go through the model's matmuls in other shapes, which sum in
another order); the measured value is printed.  The weights after the step are compared the
same way (``max |w - w_ref| <= lr * BOUND * max |g_ref|``).  Beside it, Trainer's own default loss and
a naive mean of micro-batch means are measured on the same data: they are far off.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import unihead
from unihead import ClassificationHead

from .conftest import require

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded (set before transformers is imported)
transformers = require("transformers")
require("accelerate")
from unihead.backends.transformers import HeadTrainer, TrainerLoss, trainer_loss  # noqa: E402

K, T, VOCAB, N = 3, 8, 40, 12
MICRO, STEPS = 4, 3
LR = 0.5
BOUND = 4e-6  # relative to the largest gradient entry: ~100 float32 ulp of it
KEPT = [8, 8, 8, 8, 1, 0, 2, 0, 4, 3, 3, 3]  # kept labels per sequence: micro-batches 32, 3, 13


def data(seed: int = 0, sample_weight: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (N, T), generator=g)
    labels = torch.randint(0, K, (N, T), generator=g)
    kept = torch.arange(T)[None, :] < torch.tensor(KEPT)[:, None]
    out = {"input_ids": ids, "labels": torch.where(kept, labels, torch.full_like(labels, -100))}
    if sample_weight:  # one weight per token (the head's examples), zeros included
        w = torch.rand((N, T), generator=g) * 2
        w[::5] = 0.0
        out["sample_weight"] = w
    return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def tiny_model(auto=None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=T, num_labels=K, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return (auto or transformers.AutoModelForTokenClassification).from_config(config)


class Grads(transformers.TrainerCallback):
    """The accumulated gradient the optimizer is about to apply."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def one_step(tmp_path, columns, trainer_cls=transformers.Trainer, auto=None, **trainer_kwargs):
    """One optimizer step of Trainer over 3 micro-batches: (gradients, weights after the step)."""
    model = tiny_model(auto)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=STEPS,
        max_steps=1, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True, report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    grads = Grads(model)
    trainer = trainer_cls(model=model, args=args, train_dataset=Rows(columns), callbacks=[grads], **trainer_kwargs)
    trainer.train()
    return grads.grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def full_batch_step(head: ClassificationHead, columns, auto=None):
    """The reference: the full batch's weighted mean (the head's loss in one call), one SGD step."""
    model = tiny_model(auto)
    compiled = unihead.compile(head, "torch")
    logits = model(input_ids=columns["input_ids"]).logits
    compiled.loss(logits, columns["labels"], columns.get("sample_weight")).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        weights = {n: p - LR * p.grad for n, p in model.named_parameters()}
    return grads, weights


def scale(ref) -> float:
    """The largest gradient entry of the model (a gradient that is 0 in exact arithmetic, such as
    attention's key bias, is rounding noise: it is measured against the model's scale)."""
    return max(float(g.abs().max()) for g in ref.values())


def worst(grads, ref) -> float:
    """max |g - g_ref| over every parameter entry, relative to the largest gradient entry."""
    return max(float((grads[n] - ref[n]).abs().max()) for n in ref) / scale(ref)


def assert_same_step(got, ref):
    (g, w), (g_ref, w_ref) = got, ref
    err = worst(g, g_ref)
    print(f"accumulated gradient vs full batch: {err:.2e} (bound {BOUND:.0e})")
    assert err <= BOUND, err
    for n in w_ref:
        assert float((w[n] - w_ref[n]).abs().max()) <= LR * BOUND * scale(g_ref), n
    return err


HEAD = ClassificationHead.multiclass(K, ignore_index=-100)  # nn.CrossEntropyLoss's numbers


def test_trainer_loss_makes_accumulation_exact_and_the_defaults_are_not(tmp_path):
    columns = data()
    ref = full_batch_step(HEAD, columns)
    exact = assert_same_step(one_step(tmp_path, columns, compute_loss_func=trainer_loss(HEAD)), ref)

    # Trainer's own default: the model's CrossEntropyLoss, a mean over each micro-batch's kept
    # tokens; BERT takes **kwargs, so Trainer counts its loss as already scaled for accumulation
    default = worst(one_step(tmp_path, columns)[0], ref[0])

    # a naive mean of the micro-batches' means (what dividing each mean by the steps gives)
    class MeanOfMeans(transformers.Trainer):
        loss_is_scaled_for_ga = False

    compiled = unihead.compile(HEAD, "torch")
    naive = worst(one_step(tmp_path, columns, MeanOfMeans,
                           compute_loss_func=lambda out, y, num_items_in_batch=None: compiled.loss(out.logits, y))[0],
                  ref[0])
    print(f"unihead {exact:.2e}, Trainer default {default:.3f}, naive mean of means {naive:.3f}")
    assert default > 0.1 and naive > 0.1, (default, naive)


def test_class_and_sample_weights_need_the_head_trainer(tmp_path):
    head = HEAD.replace(class_weights=[1.0, 3.0, 0.5], label_smoothing=0.1)
    columns = data(seed=1, sample_weight=True)
    ref = full_batch_step(head, columns)
    assert_same_step(one_step(tmp_path, columns, HeadTrainer, compute_loss_func=trainer_loss(head)), ref)

    # a plain Trainer counts labels, not weights: refused, naming what to use
    plain = data(seed=1)
    with pytest.raises(ValueError, match="class weights.*HeadTrainer"):
        one_step(tmp_path, plain, compute_loss_func=trainer_loss(head))


def test_an_all_ignored_micro_batch(tmp_path):
    # micro-batch 2 has no kept label: its loss is 0 (not NaN) and the step is still the full batch's
    columns = data(seed=2)
    columns["labels"][4:8] = -100
    ref = full_batch_step(HEAD, columns)
    assert_same_step(one_step(tmp_path, columns, compute_loss_func=trainer_loss(HEAD)), ref)


def test_trainer_loss_refuses_what_it_cannot_make_exact():
    with pytest.raises(ValueError, match="ignore_index=-100"):
        trainer_loss(ClassificationHead.multiclass(K, ignore_index=-1))
    with pytest.raises(ValueError, match="reduction='none'"):
        trainer_loss(ClassificationHead.multiclass(K, reduction="none"))
    with pytest.raises(TypeError, match="ClassificationHead, a head compiled for torch"):
        trainer_loss(unihead.compile(HEAD, "numpy"))
    with pytest.raises(TypeError, match="compute_loss_func=unihead.backends.transformers.trainer_loss"):
        HeadTrainer(model=tiny_model(), args=transformers.TrainingArguments(output_dir="unused", report_to="none"))
    loss = trainer_loss(unihead.compile(HEAD, "torch"))
    assert isinstance(loss, TrainerLoss) and loss.head == HEAD
    with pytest.raises(ValueError, match="no 'labels'"):
        loss({"logits": torch.zeros(2, K)}, None)


def test_importing_the_torch_backend_does_not_import_transformers():
    code = "import sys, unihead.backends.torch; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_rows_of_labels_multilabel_sequences(tmp_path):
    # Trainer counts label elements: K per multilabel row; the callable divides by K, exactly.
    # 11 sequences: micro-batches of 4, 4 and 3, so a mean of means would be off
    g = torch.Generator().manual_seed(3)
    columns = {"input_ids": torch.randint(1, VOCAB, (11, T), generator=g),
               "labels": (torch.rand((11, K), generator=g) < 0.4).float()}
    head, auto = ClassificationHead.multilabel(K, pos_weight=2.0), transformers.AutoModelForSequenceClassification
    ref = full_batch_step(head, columns, auto)
    assert_same_step(one_step(tmp_path, columns, auto=auto, compute_loss_func=trainer_loss(head)), ref)
