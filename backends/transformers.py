"""Hugging Face ``transformers.Trainer`` with a unihead head as its loss, normalized over the
whole optimizer step (docs/scaling-out.md, "Hugging Face `Trainer`").

How Trainer (transformers >= 5) computes a step, as this module relies on it:

* ``get_batch_samples`` takes the step's ``gradient_accumulation_steps`` micro-batches before
  any forward pass and counts ``num_items_in_batch``: the label elements ``!= -100`` over all of
  them (and, with ``average_tokens_across_devices=True``, the default, over all processes).
* ``compute_loss`` pops ``labels``, runs the model, and calls
  ``compute_loss_func(outputs, labels, num_items_in_batch=...)``; with a ``compute_loss_func``
  the loss counts as already scaled for accumulation (it is *not* divided by the number of
  micro-batches), and with ``average_tokens_across_devices`` it is multiplied by the number of
  processes, which undoes DDP's gradient average.
* each micro-batch's ``loss.backward()`` adds to the gradients; one optimizer step follows.

So a micro-batch's loss must be ``total_i / W``, with ``W`` the weight of the whole step:
:func:`trainer_loss` returns that callable (``compiled.loss(logits, labels, normalizer=W)``).
Trainer's count is ``W`` only when every example's weight is 1 or 0 (ignored) and it has one
label element: for rows of labels (one-hot, multilabel) the callable divides the count by the
row width, exactly; class weights and sample weights are not in the count, and the callable
refuses them under a plain ``Trainer``: :class:`HeadTrainer` (or :class:`HeadTrainerMixin` in a
Trainer subclass of your own) counts the head's own weight, ``compiled.loss_weight``, over the
step's micro-batches instead, and reads sample weights from the batches.

**The head a model's config implies.**  ``trainer_loss(model)`` takes a transformers model and
computes the head its config means (:func:`unihead._hf.config_head`: ``num_labels``,
``problem_type``, ``id2label``), the one line a Trainer user writes.  Where the model's own
``forward`` would silently change its loss with the labels (float one-hot rows turning a
single-label model into a multi-label one, ``num_labels=1`` into a regression), the callable
refuses instead: labels that do not fit the config's head raise unihead's error, naming the
config, before anything is trained.  :func:`hf_config` is the reverse: the config fields that
make a model agree with a head.

Nothing here is imported by ``import unihead`` or ``unihead.backends.torch``; importing this
module imports ``transformers`` (``pip install unihead[hf]``).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import transformers
except ImportError as e:  # pragma: no cover - the test extra installs it
    raise ImportError(
        "unihead.backends.transformers needs Hugging Face transformers (>= 5): "
        "pip install unihead[transformers]"
    ) from e

from unihead._hf import HFInfo, config_head, hf_config, is_hf_model
from unihead.backends.torch import TorchHead
from unihead.compiled import compiled_head
from unihead.errors import HeadSpecError
from unihead.spec import ClassificationHead

__all__ = ["HF_IGNORE_INDEX", "trainer_loss", "TrainerLoss", "HeadTrainerMixin", "HeadTrainer", "hf_config",
           "config_head_of"]

HF_IGNORE_INDEX = -100
"""The label value Hugging Face leaves out: Trainer's ``num_items_in_batch`` counts labels
``!= -100``, and its collators pad labels with it (``DataCollatorForTokenClassification``)."""


def _logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: a ``ModelOutput``'s ``logits``, a dict's ``"logits"``, or
    a plain tensor (a model of your own that returns its logits)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if hasattr(outputs, "get") else getattr(outputs, "logits", None)
    if logits is None:
        raise TypeError(
            f"trainer_loss: the model's outputs ({type(outputs).__name__}) have no 'logits'; a unihead "
            "head's loss needs the model's logits (a ModelOutput or dict with 'logits', or a tensor)."
        )
    return logits


class TrainerLoss:
    """``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for ``transformers.Trainer``,
    from :func:`trainer_loss`: the head's loss of one micro-batch, divided by the weight of the
    whole step (``compiled.loss(logits, labels, normalizer=W)``), so that the gradients the
    Trainer accumulates over the step's micro-batches (and averages over processes) are the
    gradient of the whole step's weighted mean.

    Under a plain ``Trainer``, ``W`` comes from Trainer's ``num_items_in_batch`` (see the module
    docstring): exact for heads without class weights whose ignored label is -100 (or none).
    :class:`HeadTrainer` passes the head's own weight instead, and sample weights.
    ``num_items_in_batch=None`` (Trainer counted nothing) gives the micro-batch's own mean."""

    def __init__(self, compiled: TorchHead, config: HFInfo | None = None):
        head = compiled.head
        if head.reduction == "none":
            raise ValueError(
                f"trainer_loss: {head!r} has reduction='none' (a loss per example), but Trainer "
                "back-propagates one number per micro-batch; use reduction='mean' (the default)."
            )
        if head.ignore_index is not None and head.ignore_index != HF_IGNORE_INDEX:
            raise ValueError(
                f"trainer_loss: {head!r} ignores the label {head.ignore_index}, but Hugging Face marks the "
                f"labels to leave out with {HF_IGNORE_INDEX}: its collators pad labels with it and Trainer counts "
                f"the labels != {HF_IGNORE_INDEX}. Write the head with ignore_index={HF_IGNORE_INDEX} "
                f"(head.replace(ignore_index={HF_IGNORE_INDEX})) and mark ignored labels -100 in the data."
            )
        self.compiled = compiled
        self.head = head
        self.config = config  # the model config the head was read from (trainer_loss(model)), or None

    def _checked(self, compute: Any, labels: Any) -> Any:
        """``compute()``, with labels that do not fit a head read from a model's config reported
        against the config (transformers' own forward would have changed its loss instead)."""
        if self.config is None:
            return compute()
        try:
            return compute()
        except (HeadSpecError, ValueError, TypeError) as e:
            shape = tuple(getattr(labels, "shape", ()))
            dtype = str(getattr(labels, "dtype", type(labels).__name__)).replace("torch.", "")
            raise ValueError(
                f"trainer_loss: the labels ({dtype}, shape {shape}) do not fit {self.head!r}, the head "
                f"{self.config.describe()}'s config implies: {e} Not trained: transformers' own forward would "
                "silently switch its loss instead (float rows: multi-label BCE). Either make the labels fit the "
                "config (int64 class ids for single_label_classification), or build the model with the config of "
                "the head the labels mean: from_pretrained(checkpoint, **hf_config(head)) "
                "(unihead.backends.transformers.hf_config), then trainer_loss(model) again."
            ) from None

    # -- what Trainer's count means for this head -------------------------------------------
    def count_is_weight(self) -> bool:
        """Whether Trainer's ``num_items_in_batch`` (label elements ``!= -100``, divided by the
        row width for rows of labels) is this head's weight: true unless it has class weights
        (sample weights never reach a plain Trainer's ``compute_loss_func``)."""
        return self.head.class_weights is None

    def _per_example(self) -> int:
        """Label elements per example: ids and binary labels 1, rows of labels K."""
        h = self.head
        rows = h.task == "multilabel" or (h.task == "multiclass" and h.label_format != "sparse")
        return h.num_outputs if rows else 1

    def weight(self, labels: Any, sample_weight: Any = None) -> torch.Tensor:
        """The head's weight of one micro-batch, ``compiled.loss_weight(labels, sample_weight)``:
        what :class:`HeadTrainer` adds up over a step."""
        return self._checked(lambda: self.compiled.loss_weight(labels, sample_weight), labels)

    # -- the loss ---------------------------------------------------------------------------
    def loss(self, outputs: Any, labels: Any, normalizer: Any = None, sample_weight: Any = None) -> torch.Tensor:
        """``compiled.loss(logits, labels, sample_weight, normalizer=normalizer)``, with the logits
        taken from ``outputs``; ``normalizer=None`` is the micro-batch's own mean."""
        if labels is None:
            raise ValueError(
                "trainer_loss: the batch has no 'labels': Trainer passes a batch's 'labels' to "
                "compute_loss_func; give the dataset a 'labels' column (or set TrainingArguments.label_names)."
            )
        logits = _logits_of(outputs)
        if self.head.reduction == "sum":  # nothing to normalize: the step's gradient is the sum's
            normalizer = None
        return self._checked(lambda: self.compiled.loss(logits, labels, sample_weight, normalizer=normalizer),
                             labels)

    def __call__(self, outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        if num_items_in_batch is None:
            return self.loss(outputs, labels)
        if not self.count_is_weight():
            raise ValueError(
                f"trainer_loss: {self.head!r} has class weights, but Trainer's num_items_in_batch counts labels "
                "(!= -100), not their weights, so the step's loss would be divided by the wrong number. Use "
                "unihead.backends.transformers.HeadTrainer in place of transformers.Trainer (or add "
                "HeadTrainerMixin to your Trainer subclass): it divides by the head's own weight, summed over "
                "the step's micro-batches."
            )
        return self.loss(outputs, labels, _count_to_weight(num_items_in_batch, self._per_example()))

    def __repr__(self) -> str:
        of = f", from {self.config.describe()}" if self.config is not None else ""
        return f"trainer_loss({self.compiled!r}{of})"


def _count_to_weight(count: Any, per_example: int) -> Any:
    """Trainer's count of label elements as a number of examples (exact: the count of rows of
    labels is a multiple of their width)."""
    return count if per_example == 1 else count / per_example


def config_head_of(model: Any) -> ClassificationHead:
    """The head a transformers model's config implies (what ``trainer_loss(model)`` computes):
    ``num_labels`` outputs; softmax cross-entropy for ``problem_type`` unset (``num_labels >= 2``)
    or ``"single_label_classification"`` and for token classifiers (labels -100 ignored,
    ``binary(binary_units=2)`` for 2 labels); sigmoids for ``"multi_label_classification"``
    (``binary()`` for one label); ``class_names`` from ``id2label``.  A regression config
    (``num_labels=1`` without ``problem_type``, or ``"regression"``) is refused with a
    :class:`~unihead.HeadSpecError` that says which config to write."""
    from unihead._readers import read_model

    if not is_hf_model(model):
        raise TypeError(f"config_head_of takes a transformers PreTrainedModel; got {type(model).__name__}.")
    return config_head(read_model(model).hf)


def trainer_loss(head: Any) -> TrainerLoss:
    """The ``compute_loss_func`` for ``transformers.Trainer(compute_loss_func=...)`` computing
    ``head``'s loss, divided by the weight of the whole optimizer step (gradient accumulation and
    processes included): see :class:`TrainerLoss`.  Ignored labels must be -100, as in Hugging
    Face's data.

    ``head``: a :class:`ClassificationHead`, a head compiled for ``"torch"``, or the transformers
    model itself: then the head its config implies (:func:`config_head_of`), and labels that do
    not fit it are refused (a ``ValueError`` naming the config) rather than trained with another
    loss, as the model's own ``forward`` would."""
    if is_hf_model(head):
        from unihead._readers import read_model

        info = read_model(head).hf
        return TrainerLoss(compiled_head(config_head(info), TorchHead, {}), config=info)
    if isinstance(head, ClassificationHead):
        return TrainerLoss(compiled_head(head, TorchHead, {}))
    if isinstance(head, TorchHead):
        return TrainerLoss(head)
    raise TypeError(
        "trainer_loss takes a ClassificationHead, a head compiled for torch "
        f"(unihead.compile(head, 'torch')) or a transformers model; got {type(head).__name__}."
    )


class HeadTrainerMixin:
    """Make a ``transformers.Trainer`` (subclass) divide a unihead head's loss by the head's own
    weight of the whole step: ``class MyTrainer(HeadTrainerMixin, Trainer)``, built with
    ``compute_loss_func=trainer_loss(compiled)``.

    * ``num_items_in_batch`` becomes ``sum(compiled.loss_weight(labels_i, sample_weight_i))`` over
      the step's micro-batches (for evaluation: over the batch), summed over the processes as
      Trainer sums its count; class weights, ignored labels and sample weights all count;
    * a batch's ``sample_weight_key`` entry (default ``"sample_weight"``, one weight per example)
      is taken out of the model's inputs and passed to the loss; the column is kept by
      ``remove_unused_columns``.

    The loss is then exact with gradient accumulation and with several processes
    (``average_tokens_across_devices=True``, Trainer's default); settings where it could not be
    (``nn.DataParallel`` over several GPUs, several processes without that option, Trainer's own
    label smoothing on top of the head's) are refused when the Trainer is built."""

    sample_weight_key: str = "sample_weight"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        loss = self.compute_loss_func
        if not isinstance(loss, TrainerLoss):
            raise TypeError(
                f"{type(self).__name__} divides a unihead head's loss by the head's weight: build it with "
                "compute_loss_func=unihead.backends.transformers.trainer_loss(compiled)"
                + (f"; got compute_loss_func={loss!r}." if loss is not None else ".")
            )
        if not hasattr(transformers.Trainer, "_get_num_items_in_batch"):  # pragma: no cover - version guard
            raise TypeError(
                f"{type(self).__name__} needs transformers >= 5 (Trainer._get_num_items_in_batch); "
                f"this is transformers {transformers.__version__}."
            )
        args_ = self.args
        if args_.label_smoothing_factor:
            raise ValueError(
                f"TrainingArguments(label_smoothing_factor={args_.label_smoothing_factor}) smooths labels in "
                "Trainer's own loss, which a unihead head replaces: put the smoothing in the head "
                f"(ClassificationHead...(label_smoothing={args_.label_smoothing_factor}))."
            )
        if args_.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__}: {args_.n_gpu} GPUs in one process (nn.DataParallel) split each batch "
                "after Trainer counted it; run one process per GPU instead (torchrun / accelerate launch: "
                "DistributedDataParallel), where the step's weight is summed over the processes."
            )
        if args_.world_size > 1 and not args_.average_tokens_across_devices:
            raise ValueError(
                f"{type(self).__name__}: with {args_.world_size} processes the step's weight must be summed over "
                "all of them (and DDP's gradient average undone): set "
                "TrainingArguments(average_tokens_across_devices=True), Trainer's default."
            )

    @property
    def head_loss(self) -> TrainerLoss:
        """The :class:`TrainerLoss` this Trainer computes with."""
        return self.compute_loss_func

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.sample_weight_key not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.sample_weight_key]

    def _get_num_items_in_batch(self, batch_samples: list, device: Any) -> Any:
        """The head's weight of ``batch_samples`` (Trainer's hook for ``num_items_in_batch``, used
        for a training step's micro-batches and for an evaluation batch), summed over processes."""
        if not batch_samples or any(not hasattr(b, "get") or b.get("labels") is None for b in batch_samples):
            return None
        loss = self.head_loss
        key = self.sample_weight_key
        weight = sum(loss.weight(b["labels"], b.get(key)).to(device) for b in batch_samples)
        if self.args.world_size > 1:  # average_tokens_across_devices (checked when built)
            weight = self.accelerator.gather(weight.reshape(1)).sum()
            # ranks that share one batch (tensor, context, sequence parallelism) count it once each
            weight = weight / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())
        return weight

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        sample_weight = inputs.pop(self.sample_weight_key, None)
        outputs = model(**inputs)
        loss = self.head_loss.loss(outputs, labels, num_items_in_batch, sample_weight)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # DDP averages the processes' gradients; the normalizer is the global weight: undo the average
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss


class HeadTrainer(HeadTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that divides a unihead head's loss by the head's own weight of
    each step (class weights, ignored labels and sample weights included):
    ``HeadTrainer(model, args, train_dataset=..., compute_loss_func=trainer_loss(compiled))``.
    See :class:`HeadTrainerMixin`."""
