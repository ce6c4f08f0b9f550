"""Bases saved as classifiers of other label sets, and bases whose config cannot be used."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.errors import InvalidArgument
from services.trainer.core.models import BaseModelCache, check_base_model, load_base_model
from services.trainer.core.probe import final_linear
from services.trainer.core.types import Task
from tests.unit.trainer.conftest import make_spec

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>", "good", "bad", "fine"]


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[SEP]"
    ).save_pretrained(folder)


def _classifier(kind: str, labels: int) -> Any:
    """A tiny `<kind>ForSequenceClassification` with `labels` outputs."""
    import transformers as t

    size = {"vocab_size": len(WORDS), "max_position_embeddings": 64}
    if kind == "distilbert":
        config: Any = t.DistilBertConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, **size)
        return t.DistilBertForSequenceClassification(
            config.__class__(**config.to_dict(), num_labels=labels)
        )
    common = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    if kind == "bert":
        return t.BertForSequenceClassification(t.BertConfig(**size, **common, num_labels=labels))
    return t.RobertaForSequenceClassification(
        t.RobertaConfig(
            **{**size, "max_position_embeddings": 70}, **common, num_labels=labels, pad_token_id=0
        )
    )


def _checkpoint(folder: Path, kind: str, labels: int) -> Path:
    torch.manual_seed(3)
    _classifier(kind, labels).save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _output_layer(model: torch.nn.Module) -> torch.nn.Linear:
    head = model.classifier
    layers = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    return layers[-1]


@pytest.mark.parametrize("kind", ["distilbert", "bert", "roberta"])
def test_a_head_of_another_size_is_replaced_once_and_logged(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _checkpoint(tmp_path / kind, kind, labels=2)
    labels = ["a", "b", "c", "d"]
    with caplog.at_level(logging.INFO, logger="services.trainer.core.models"):
        model, _ = load_base_model(str(folder), Task.CLASSIFICATION, labels, device="cpu")
    assert _output_layer(model).out_features == 4
    said = [
        r.getMessage()
        for r in caplog.records
        if "classification head of 2 labels" in r.getMessage()
    ]
    assert len(said) == 1 and "this task has 4" in said[0]
    # Through the trainer's cache, as a job gets it: a probe-able fresh head of 4 outputs.
    prepared = BaseModelCache("cpu").acquire(make_spec(folder, Task.CLASSIFICATION), labels)
    head = final_linear(prepared.model, 4)
    assert head is not None and head.out_features == 4


def test_a_fresh_composite_head_passes_the_pooled_features_to_its_output_layer(
    tmp_path: Path,
) -> None:
    # RoBERTa's head is dense -> tanh -> out_proj: the dense layer starts as the identity,
    # so the probe fits out_proj on (tanh of) the pooled features, not on a random
    # projection of them; the output layer starts random, as transformers starts it.
    folder = _checkpoint(tmp_path / "roberta", "roberta", labels=2)
    prepared = BaseModelCache("cpu").acquire(make_spec(folder, Task.CLASSIFICATION), ["a", "b"])
    base = prepared.model.get_base_model()
    trainable = [m for m in base.classifier.modules() if isinstance(m, torch.nn.Linear)]
    dense, out = [m for m in trainable if m.weight.requires_grad]
    assert torch.equal(dense.weight.detach(), torch.eye(16))
    assert dense.bias is not None and not bool(dense.bias.detach().any())
    assert out.out_features == 2 and 0.005 < float(out.weight.detach().std()) < 0.05
    assert final_linear(prepared.model, 2) is out


@pytest.mark.parametrize("kind", ["distilbert", "bert"])
def test_a_head_that_fits_is_kept(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _checkpoint(tmp_path / kind, kind, labels=3)
    saved = _output_layer(_classifier(kind, 3).from_pretrained(folder)).weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="services.trainer.core.models"):
        model, _ = load_base_model(str(folder), Task.CLASSIFICATION, ["x", "y", "z"], device="cpu")
    assert torch.equal(_output_layer(model).weight.detach(), saved)
    assert not [r for r in caplog.records if "classification head of" in r.getMessage()]


def test_a_config_that_cannot_be_used_is_a_clear_error_about_the_base(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "broken", "bert", labels=2)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = "not a number"
    (folder / "config.json").write_text(json.dumps(config))
    spec = make_spec(folder, Task.CLASSIFICATION)
    for call in (
        lambda: check_base_model(spec),
        lambda: load_base_model(str(folder), Task.CLASSIFICATION, ["a", "b"], device="cpu"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            call()
        assert caught.value.field == "base_model"
        assert "config.json cannot be used" in caught.value.message, caught.value.message
