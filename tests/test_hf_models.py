"""Hugging Face transformers models read by ``unihead.diagnose``/``infer``/``port`` (unihead._hf,
unihead._readers, unihead._diagnose) and ``trainer_loss(model)``.

Nothing is downloaded: every model is built from a tiny config with random weights, and input
ids are fed directly.  The expectations come from transformers itself, measured here on the
installed version: each model's own ``forward`` is run with the labels, and what it did (the
``problem_type`` it wrote into its config, its loss, or the error it raised) decides what
unihead must say:

* the forward raised -> ``diagnose`` reports an error (the model cannot train on these labels);
* it trained a regression -> ``hf_regression_head``;
* it trained a multi-label BCE on one-hot rows -> ``hf_one_hot_multilabel``;
* otherwise -> no error, and the loss of the head unihead read equals the forward's loss.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import unihead
from unihead import ClassificationHead as H

from .conftest import require

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded (set before transformers is imported)
torch = require("torch")
transformers = require("transformers")
from unihead.backends.transformers import config_head_of, hf_config, trainer_loss  # noqa: E402

transformers.logging.set_verbosity_error()
VOCAB, T, N = 30, 6, 4
BERT = dict(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


def bert(cls=None, **config):
    torch.manual_seed(0)
    return (cls or transformers.BertForSequenceClassification)(transformers.BertConfig(**BERT, **config)).eval()


def inputs(n: int = N) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, T), generator=torch.Generator().manual_seed(1))


def label_kinds(k: int) -> dict[str, torch.Tensor]:
    ids = torch.tensor([0, 1, 1, 0]) if k <= 2 else torch.tensor([0, 2, 1, 2])
    # transformers reads only int64/int32 as class ids: int16 ids and bool rows are "not int"
    out = {"int64 ids": ids, "int32 ids": ids.int(), "int16 ids": ids.short(), "float ids": ids.float()}
    if k >= 2:
        one_hot = torch.nn.functional.one_hot(ids % k, k)
        multi_hot = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1.0]])[:, :k]
        out |= {"float one-hot": one_hot.float(), "int64 one-hot": one_hot, "float multi-hot": multi_hot,
                "bool multi-hot": multi_hot.bool()}
    return out


def config_refused(pt, k) -> bool:
    try:
        transformers.BertConfig(**BERT, num_labels=k, problem_type=pt)
        return False
    except ValueError:
        return True


def combinations():
    """Every problem_type x num_labels x label kind whose config the installed transformers builds."""
    for pt, k in itertools.product(PROBLEM_TYPES, (1, 2, 3)):
        if not config_refused(pt, k):
            for kind in label_kinds(k):
                yield pt, k, kind


def test_which_configs_transformers_refuses():
    # measured on the installed transformers: only one-logit "single_label_classification" (which
    # older versions accepted, computing a cross-entropy over one logit: always 0); such a
    # combination needs no finding, the config never exists
    refused = [(pt, k) for pt, k in itertools.product(PROBLEM_TYPES, (1, 2, 3)) if config_refused(pt, k)]
    assert refused == [("single_label_classification", 1)]


@pytest.mark.parametrize("pt, k, kind", list(combinations()))
def test_sequence_classifier_problem_type_num_labels_and_labels(pt, k, kind):
    labels = label_kinds(k)[kind]
    model = bert(num_labels=k, problem_type=pt)
    diagnosis = unihead.diagnose(model, labels=labels)  # read before any forward (which changes the config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MSELoss warns about broadcasting before it raises
        try:
            out = model(input_ids=inputs(), labels=labels)
        except (ValueError, RuntimeError, IndexError):
            out = None
    done = model.config.problem_type  # what the forward chose (it writes it into the config)
    if out is None:
        assert not diagnosis.ok, diagnosis
    elif done == "regression":
        assert "hf_regression_head" in diagnosis.codes and not diagnosis.ok, diagnosis
        assert diagnosis.head.task != "regression"  # the head it was meant to be is still named
    elif done == "multi_label_classification" and kind.endswith("one-hot"):
        f = next(f for f in diagnosis.findings if f.code == "hf_one_hot_multilabel")
        assert f.severity == ("error" if pt is None else "warning"), diagnosis
        assert f.fix == H.multiclass(k, label_format="one_hot")
        assert "problem_type='single_label_classification'" in f.lines["transformers"]
    else:
        assert diagnosis.ok, diagnosis
        compiled = unihead.compile(diagnosis.head, "torch")
        torch.testing.assert_close(compiled.loss(out.logits, labels), out.loss, rtol=2e-6, atol=2e-7)
    if pt is None and k >= 2:  # the loss depends on the first labels' dtype: said, never an error
        assert "hf_problem_type_unset" in diagnosis.codes or not diagnosis.ok or "hf_one_hot_multilabel" in \
            diagnosis.codes


def test_num_labels_1_is_a_regression_not_binary_and_the_pipeline_changes_its_score():
    model = bert(num_labels=1)
    d = unihead.diagnose(model, labels=np.array([0, 1, 1, 0]))
    assert d.codes == ("hf_regression_head",) and "OK" not in str(d).splitlines()[0]
    assert d.errors[0].fix == H.binary(binary_units=2)
    # the pipeline applies a sigmoid until the first labelled forward writes problem_type="regression"
    pipe = text_pipeline(model)
    with torch.no_grad():
        z = float(model(input_ids=encode()).logits[0, 0])
    before = pipe("a b")[0]["score"]
    model(input_ids=inputs(), labels=torch.tensor([0, 1, 1, 0]))
    assert model.config.problem_type == "regression"
    after = pipe("a b")[0]["score"]
    assert before == pytest.approx(1 / (1 + np.exp(-z)), rel=1e-6) and after == pytest.approx(z, rel=1e-6)
    with pytest.raises(unihead.HeadSpecError, match="regression model.*num_labels=2"):
        trainer_loss(bert(num_labels=1))


# ------------------------------------------------------------------------------ pipelines
def encode() -> torch.Tensor:
    return torch.tensor([[2, 3]])  # "a b" in the tokenizer below


def text_pipeline(model):
    tokenizers = require("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "[PAD]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    return transformers.pipeline("text-classification", model=model, tokenizer=fast, device="cpu")


@pytest.mark.parametrize("head", [H.binary(class_names=["neg", "pos"]), H.binary(binary_units=2, class_names=["neg", "pos"]),
                                  H.multiclass(3, class_names=["a", "b", "c"]), H.multilabel(3, class_names=["x", "y", "z"])])
def test_hf_config_makes_the_model_the_pipeline_and_the_loss_agree_with_the_head(head):
    model = bert(**hf_config(head))
    assert unihead.diagnose(model).ok and unihead.diagnose(model, loss=trainer_loss(head)).codes == ()
    read = config_head_of(model)
    assert read.task == head.task and read.num_outputs == head.num_outputs
    assert read.class_names == (head.class_names if head.num_outputs == len(head.class_names) else None)
    # the pipeline applies the head's activation, names the outputs with its classes
    logits = model(input_ids=encode()).logits
    expected = unihead.compile(head, "torch").probabilities(logits)[0].detach().numpy()
    scores = {r["label"]: r["score"] for r in text_pipeline(model)("a b", top_k=None)}
    names = list(model.config.id2label.values())
    np.testing.assert_allclose([scores[n] for n in names], expected[-len(names):], rtol=1e-6)
    # the model's own forward computes the head's loss on the head's labels, in its format
    y = {"binary": torch.tensor([[1.0], [0.0], [1.0], [1.0]]) if head.binary_units == 1 else torch.tensor([1, 0, 1, 1]),
         "multiclass": torch.tensor([0, 2, 1, 2]),
         "multilabel": torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1.0]])}[head.task]
    out = model(input_ids=inputs(), labels=y)
    torch.testing.assert_close(unihead.compile(head, "torch").loss(out.logits, y), out.loss, rtol=2e-6, atol=2e-7)


def test_a_loss_the_config_does_not_describe_is_a_pipeline_mismatch():
    model = bert(num_labels=3)  # problem_type unset: pipelines apply a softmax
    d = unihead.diagnose(model, loss=trainer_loss(H.multilabel(3)))
    assert d.codes == ("hf_pipeline_activation",) and d.errors[0].fix == H.multilabel(3)
    assert "problem_type='multi_label_classification'" in d.errors[0].lines["transformers"]
    scores = [r["score"] for r in text_pipeline(model)("a b", top_k=None)]
    assert sum(scores) == pytest.approx(1.0, rel=1e-6)  # a softmax, measured: not 3 sigmoids
    assert unihead.diagnose(model, loss=torch.nn.BCEWithLogitsLoss()).codes == ("hf_pipeline_activation",)
    assert unihead.diagnose(model, loss=torch.nn.CrossEntropyLoss()).ok


# ------------------------------------------------------------------------------ config traps
def test_config_traps():
    # num_labels and id2label of another length: transformers keeps num_labels and silently
    # replaces the names with LABEL_i (measured); unihead then has no class names to carry
    config = transformers.BertConfig(**BERT, num_labels=3, id2label={0: "a", 1: "b"})
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert unihead.infer(bert(num_labels=3, id2label={0: "a", 1: "b"})).head == H.multiclass(3)
    # the config changed after the model was built: the classifier keeps its width
    model = bert(num_labels=3)
    model.config.num_labels = 5
    assert model.classifier.out_features == 3 and model.config.num_labels == 5
    assert "hf_num_labels_mismatch" in unihead.diagnose(model).codes
    # ids that are not 0..K-1 (accepted by transformers), and a label2id that is not the inverse
    assert transformers.BertConfig(**BERT, id2label={1: "a", 2: "b"}).num_labels == 2
    assert "hf_id2label_mismatch" in unihead.diagnose(bert(id2label={1: "a", 2: "b"})).codes
    swapped = bert(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 2, "c": 1})
    assert unihead.diagnose(swapped).errors[0].code == "hf_id2label_mismatch"
    assert unihead.diagnose(bert(id2label={0: "a", 1: "b", 2: "c"})).ok
    # names that do not name each output (accepted by transformers): duplicates, not strings, too long
    for id2label in ({0: "a", 1: "a"}, {0: ["a"], 1: None}):
        assert "hf_id2label_mismatch" in unihead.diagnose(bert(id2label=id2label)).codes
    long = bert(id2label={0: "a" * 5000, 1: "b"})
    d = unihead.diagnose(long)
    assert d.ok and d.head.class_names is None and "id2label not carried" in str(d)
    assert config_head_of(long).class_names is None


# ------------------------------------------------------------------------------ token and image models
def test_token_classifier():
    labels = torch.tensor([[0, 2, 1, -100, -100, -100], [1, 1, 0, 2, 0, -100], [2, 0, 0, 1, -100, -100],
                           [0, 0, 0, 0, 0, 0]])
    model = bert(transformers.BertForTokenClassification, num_labels=3)
    d = unihead.diagnose(model, labels=labels)
    assert d.ok and d.findings == () and d.head == H.multiclass(3, ignore_index=-100), d
    out = model(input_ids=inputs(), labels=labels)
    torch.testing.assert_close(unihead.compile(d.head, "torch").loss(out.logits, labels), out.loss)
    assert config_head_of(model) == d.head
    # one label: the forward's cross-entropy over one logit is 0 whatever the model does (measured)
    one = bert(transformers.BertForTokenClassification, num_labels=1)
    assert float(one(input_ids=inputs(), labels=torch.zeros(N, T, dtype=torch.long)).loss.detach()) == 0.0
    assert unihead.diagnose(one).codes == ("categorical_loss_one_unit",)
    # problem_type is ignored: a "multi-label" token model trains a cross-entropy (measured)
    multi = bert(transformers.BertForTokenClassification, num_labels=3, problem_type="multi_label_classification")
    out = multi(input_ids=inputs(), labels=labels)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(out.logits.reshape(-1, 3), labels.reshape(-1)),
                               out.loss)
    assert unihead.diagnose(multi).codes == ("hf_problem_type_ignored",)
    # trained with sigmoids of its own, it still gets the token pipeline's softmax
    assert unihead.diagnose(model, loss=trainer_loss(H.multilabel(3))).codes == ("hf_pipeline_activation",)
    assert unihead.diagnose(model, loss=trainer_loss(H.multiclass(3, ignore_index=-100))).codes == ()


def test_image_classifiers():
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=1)).eval()
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    vit(pixel_values=pixels, labels=torch.tensor([0, 1]))
    assert vit.config.problem_type == "regression"  # measured: int 0/1 labels, num_labels=1
    assert unihead.diagnose(bert(num_labels=1)).codes == unihead.diagnose(transformers.ViTForImageClassification(
        transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16, num_labels=1))).codes == ("hf_regression_head",)
    torch.manual_seed(0)
    convnext = transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "eel"})).eval()
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    d = unihead.diagnose(convnext, labels=one_hot)
    assert d.codes == ("hf_one_hot_multilabel",)
    ids = torch.tensor([0, 2])
    d = unihead.diagnose(convnext, labels=ids)
    assert d.ok and d.head == H.multiclass(3, class_names=["cat", "dog", "eel"])
    np.testing.assert_array_equal(d.weights["kernel"], convnext.classifier.weight.detach().numpy().T)
    out = convnext(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), labels=ids)
    torch.testing.assert_close(unihead.compile(d.head, "torch").loss(out.logits, ids), out.loss)
    compiled = unihead.compile(d.head, "numpy")
    np.testing.assert_array_equal(compiled.predict_names(out.logits.detach().numpy()),
                                  np.array(["cat", "dog", "eel"])[out.logits.argmax(-1).numpy()])


@pytest.mark.parametrize("cls, config, path", [
    ("RobertaForSequenceClassification", "RobertaConfig", "classifier.out_proj"),
    ("DistilBertForSequenceClassification", "DistilBertConfig", "classifier"),
    ("GPT2ForSequenceClassification", "GPT2Config", "score"),
    ("LlamaForSequenceClassification", "LlamaConfig", "score"),
])
def test_the_classification_layer_of_each_architecture(cls, config, path):
    small = {"RobertaConfig": BERT, "DistilBertConfig": dict(vocab_size=VOCAB, dim=8, n_layers=1, n_heads=2, hidden_dim=16),
             "GPT2Config": dict(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, pad_token_id=0),
             "LlamaConfig": dict(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)}[config]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config)(**small, num_labels=4))
    layer = model.get_submodule(path)
    inferred = unihead.infer(model)
    assert inferred.head == H.multiclass(4)
    np.testing.assert_array_equal(inferred.weights["kernel"], layer.weight.detach().numpy().T)
    bias = layer.bias.detach().numpy() if layer.bias is not None else np.zeros(4, np.float32)
    np.testing.assert_array_equal(inferred.weights["bias"], bias)
    assert f".{path} = nn.Linear" in unihead.diagnose(model).where


def test_a_model_without_a_classification_layer_is_explained():
    model = transformers.BertModel(transformers.BertConfig(**BERT))
    with pytest.raises(ValueError, match="no classification layer unihead knows"):
        unihead.diagnose(model)


# ------------------------------------------------------------------------------ Trainer
def test_trainer_loss_of_the_model_gives_the_full_batch_step(tmp_path):
    from .test_hf import HEAD, assert_same_step, data, full_batch_step, one_step, tiny_model

    model = tiny_model()  # the token classifier of tests/test_hf.py: num_labels=3
    assert config_head_of(model) == HEAD  # its config implies exactly the head that test trains
    columns = data(seed=4)
    ref = full_batch_step(HEAD, columns)
    assert_same_step(one_step(tmp_path, columns, compute_loss_func=trainer_loss(model)), ref)


def test_trainer_refuses_labels_the_config_does_not_describe(tmp_path):
    from .test_hf import Rows

    model = bert(num_labels=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    columns = {"input_ids": inputs(8), "labels": torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=1, use_cpu=True, report_to="none",
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(columns),
                                   compute_loss_func=trainer_loss(model))
    with pytest.raises(ValueError, match=r"do not fit ClassificationHead.multiclass\(3.*config implies.*Not trained"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.config.problem_type is None  # nothing ran the model's own loss either


# ------------------------------------------------------------------------------ ports
def test_port_to_jax_and_numpy_holds_the_check_and_the_class_names(tmp_path):
    require("jax")
    model = bert(transformers.RobertaForSequenceClassification, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    for to in ("jax", "numpy"):
        ported = unihead.port(model, to)
        assert ported.check.passed and ported.check.logits_identical
        assert ported.head.class_names == ("a", "b", "c")
    unihead.save(tmp_path / "head.safetensors", ported.head, ported.weights)
    back = unihead.load(tmp_path / "head.safetensors")
    assert back.head.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(back.weights["kernel"], model.classifier.out_proj.weight.detach().numpy().T)
    with pytest.raises(unihead.HeadSpecError, match="hf_regression_head"):
        unihead.port(bert(num_labels=1), "jax")


def port_to_keras() -> str:
    """Port a multilabel BERT classifier to Keras (this process's Keras backend): the 4-ulp check
    holds, and the class names travel in the ported layer's config.  Returns the backend."""
    import keras
    import torch
    import transformers

    import unihead
    from unihead.backends.transformers import hf_config

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16,
                                     **hf_config(unihead.ClassificationHead.multilabel(3, class_names=["x", "y", "z"])))
    ported = unihead.port(transformers.BertForSequenceClassification(config), "keras")
    assert ported.check.passed and ported.check.logits_identical, ported.check
    clone = type(ported.layer).from_config(ported.layer.get_config())
    assert clone.head.class_names == ("x", "y", "z") == ported.head.class_names
    return keras.backend.backend()


def test_port_to_keras_on_jax_holds_the_check():
    require("keras")
    assert port_to_keras() == os.environ["KERAS_BACKEND"] == "jax"  # conftest's Keras backend


def test_port_to_keras_on_torch_holds_the_check():
    # Keras binds its backend once per process: PyTorch's Keras runs in a child
    require("keras")
    code = "from tests.test_hf_models import port_to_keras; print(port_to_keras())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env=dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "torch", run.stdout
