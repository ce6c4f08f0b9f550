"""LoRA targets: "attention" and "all-linear" resolved on tiny models of every family we train."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from services.common.errors import InvalidArgument
from services.trainer.core import models, targets
from services.trainer.core.artifacts import training_config
from services.trainer.core.loop import LoopResult
from services.trainer.core.models import BaseModelCache, check_base_model
from services.trainer.core.targets import (
    attention_module_names,
    linear_module_names,
    resolve_targets,
)
from services.trainer.core.types import LoraSpec, Task
from tests.unit.trainer.conftest import (
    PAD,
    UNK,
    WORDS,
    classification_data,
    make_spec,
    sentiment_rows,
)

FIELD = "hyperparameters.lora.target_modules"
LAYERS = 2
_SIZES: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
_DECODER_SIZES: dict[str, Any] = {**_SIZES, "num_key_value_heads": 2, "head_dim": 8}


@dataclass(frozen=True)
class Arch:
    """A tiny model of one family and where its attention projections are."""

    name: str
    config: Callable[[], Any]
    causal: bool  # build it as AutoModelForCausalLM (else ...ForSequenceClassification)
    attention: tuple[str, ...]  # expected suffixes for "attention", sorted
    layer: str  # full name of layer {i}'s attention block
    projections: tuple[str, ...]  # the attention projections under `layer`


def _config(name: str, **kwargs: Any) -> Callable[[], Any]:
    def build() -> Any:
        import transformers

        return getattr(transformers, name)(**kwargs)

    return build


_BERT_LIKE = ("attention.output.dense", "key", "query", "value")
_BERT_PROJECTIONS = ("self.query", "self.key", "self.value", "output.dense")
_DECODER = ("k_proj", "o_proj", "q_proj", "v_proj")
_DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")

ARCHS = [
    Arch(
        "bert",
        _config("BertConfig", **_SIZES),
        False,
        _BERT_LIKE,
        "bert.encoder.layer.{i}.attention",
        _BERT_PROJECTIONS,
    ),
    Arch(
        "distilbert",
        _config(
            "DistilBertConfig", vocab_size=64, dim=32, n_layers=LAYERS, n_heads=4, hidden_dim=64
        ),
        False,
        ("k_lin", "out_lin", "q_lin", "v_lin"),
        "distilbert.transformer.layer.{i}.attention",
        ("q_lin", "k_lin", "v_lin", "out_lin"),
    ),
    Arch(
        "roberta",
        _config("RobertaConfig", **_SIZES),
        False,
        _BERT_LIKE,
        "roberta.encoder.layer.{i}.attention",
        _BERT_PROJECTIONS,
    ),
    Arch(
        "xlm-roberta",
        _config("XLMRobertaConfig", **_SIZES),
        False,
        _BERT_LIKE,
        "roberta.encoder.layer.{i}.attention",
        _BERT_PROJECTIONS,
    ),
    Arch(
        # Relative attention with its own position projections, which are not q/k/v/o.
        "deberta-v2",
        _config(
            "DebertaV2Config",
            **_SIZES,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            share_att_key=False,
        ),
        False,
        ("attention.output.dense", "key_proj", "query_proj", "value_proj"),
        "deberta.encoder.layer.{i}.attention",
        ("self.query_proj", "self.key_proj", "self.value_proj", "output.dense"),
    ),
    *(
        Arch(
            name,
            _config(config, **_DECODER_SIZES),
            True,
            _DECODER,
            "model.layers.{i}.self_attn",
            _DECODER_PROJECTIONS,
        )
        for name, config in (
            ("llama", "LlamaConfig"),
            ("qwen2", "Qwen2Config"),
            ("qwen3", "Qwen3Config"),
            ("gemma", "GemmaConfig"),
            ("mistral", "MistralConfig"),
        )
    ),
    Arch(
        # A decoder as a classifier: the `score` head is never a target.
        "qwen3-classifier",
        _config("Qwen3Config", **_DECODER_SIZES),
        False,
        _DECODER,
        "model.layers.{i}.self_attn",
        _DECODER_PROJECTIONS,
    ),
    Arch(
        # Conv1D layers; q, k and v fused in c_attn; the MLP has a c_proj too.
        "gpt2",
        _config("GPT2Config", vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64),
        True,
        ("attn.c_proj", "c_attn"),
        "transformer.h.{i}.attn",
        ("c_attn", "c_proj"),
    ),
]
BY_NAME = {arch.name: arch for arch in ARCHS}


def build(arch: Arch) -> nn.Module:
    """The tiny model, seeded."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    auto = AutoModelForCausalLM if arch.causal else AutoModelForSequenceClassification
    model: nn.Module = auto.from_config(arch.config())
    return model


def with_lora(model: nn.Module, arch: Arch, target_modules: list[str]) -> PeftModel:
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=target_modules,
        task_type=TaskType.CAUSAL_LM if arch.causal else TaskType.SEQ_CLS,
    )
    peft_model = get_peft_model(model, config)
    assert isinstance(peft_model, PeftModel)
    return peft_model


def adapted(peft_model: PeftModel) -> set[str]:
    """Full names (in the base model) of the modules that carry a LoRA layer."""
    base = peft_model.get_base_model()
    return {name for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}


def linear_layers(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}


def expected_attention(arch: Arch) -> set[str]:
    return {
        f"{arch.layer.format(i=i)}.{projection}"
        for i in range(LAYERS)
        for projection in arch.projections
    }


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_attention_resolves_to_the_q_k_v_and_output_projections(arch: Arch) -> None:
    model = build(arch)

    resolved = resolve_targets(model, ["attention"])

    assert resolved == list(arch.attention)
    assert set(attention_module_names(model)) == expected_attention(arch)
    # PEFT takes the suffixes, and LoRA lands on exactly those layers in every block.
    assert adapted(with_lora(model, arch, resolved)) == expected_attention(arch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_all_linear_is_every_linear_layer_but_the_heads(arch: Arch) -> None:
    model = build(arch)
    heads = ("lm_head", "score", "classifier", "pre_classifier")
    wanted = {name for name in linear_layers(model) if not name.split(".")[0].endswith(heads)}

    resolved = resolve_targets(model, [])

    assert resolve_targets(model, ["all-linear"]) == resolved
    assert resolve_targets(model, ["All-Linear"]) == resolved
    on_model = adapted(with_lora(model, arch, resolved))
    assert on_model == wanted
    assert expected_attention(arch) < on_model  # attention and the MLP


def test_attention_is_matched_case_insensitively_and_mixes_with_names() -> None:
    model = build(BY_NAME["llama"])

    assert resolve_targets(model, ["Attention"]) == list(_DECODER)
    assert resolve_targets(model, ["attention", "up_proj", "q_proj"]) == [*_DECODER, "up_proj"]


def test_named_sets_pass_through_when_the_model_has_them() -> None:
    distilbert = build(BY_NAME["distilbert"])

    assert resolve_targets(distilbert, ["q_lin", "v_lin"]) == ["q_lin", "v_lin"]
    assert resolve_targets(distilbert, ["attention.q_lin"]) == ["attention.q_lin"]


@pytest.mark.parametrize(
    "requested",
    [
        ["q_proj", "v_proj"],  # a decoder's names on an encoder: the old optimizer's guess
        ["q_lin", "qkv"],  # one name right, one wrong
        ["attention", "nonsense"],  # the abstract choice does not excuse a bad name
    ],
)
def test_a_named_set_the_model_lacks_is_refused_naming_its_linear_layers(
    requested: list[str],
) -> None:
    model = build(BY_NAME["distilbert"])

    with pytest.raises(InvalidArgument) as caught:
        resolve_targets(model, requested)

    assert caught.value.field == FIELD
    listed = caught.value.message.split("linear layers are: ")[1].split(" (")[0].split(", ")
    assert {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"} <= set(listed)
    assert "classifier" not in listed  # the head is trained whole, never a LoRA target


def test_a_name_that_is_no_linear_layer_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_targets(build(BY_NAME["deberta-v2"]), ["attention.self"])  # a whole block
    assert caught.value.field == FIELD
    assert "query_proj" in caught.value.message


def test_all_linear_mixed_with_names_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        resolve_targets(build(BY_NAME["llama"]), ["all-linear", "q_proj"])
    assert caught.value.field == FIELD
    assert "q_proj" in caught.value.message


def test_attention_on_a_model_without_attention_is_refused() -> None:
    class Mixer(nn.Module):
        """A model of linear layers only (think of a state-space or MLP-mixer model)."""

        def __init__(self) -> None:
            super().__init__()
            self.in_proj = nn.Linear(4, 8)
            self.out_proj = nn.Linear(8, 4)

    with pytest.raises(InvalidArgument) as caught:
        resolve_targets(Mixer(), ["attention"])

    assert caught.value.field == FIELD
    assert "'attention' matches no layer" in caught.value.message
    assert "in_proj, out_proj" in caught.value.message
    # Every linear layer is still there to train.
    assert resolve_targets(Mixer(), []) == ["in_proj", "out_proj"]


def test_deberta_position_projections_are_not_attention_but_are_linear() -> None:
    model = build(BY_NAME["deberta-v2"])

    attention = attention_module_names(model)

    assert not any("pos_" in name for name in attention)
    assert {"pos_key_proj", "pos_query_proj"} <= set(resolve_targets(model, []))


def test_linear_module_names_is_still_importable_from_models() -> None:
    assert models.linear_module_names is targets.linear_module_names
    assert linear_module_names(build(BY_NAME["distilbert"])) == [
        "k_lin",
        "lin1",
        "lin2",
        "out_lin",
        "pre_classifier",
        "q_lin",
        "v_lin",
    ]


# ---- end to end: BaseModelCache on saved encoders that are neither BERT nor a decoder ------


def save_tiny_encoder(folder: Path, arch: Arch) -> Path:
    """Save `arch`'s tiny classifier and a word-level tokenizer beside it (loadable by path)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, UNK, "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, pad_token=PAD, cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(folder)
    config = arch.config()
    config.vocab_size = len(vocab)
    config.pad_token_id = vocab[PAD]
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["distilbert", "deberta-v2"])
def test_attention_trains_a_saved_encoder_through_the_cache(tmp_path: Path, name: str) -> None:
    arch = BY_NAME[name]
    folder = save_tiny_encoder(tmp_path / arch.name, arch)
    spec = make_spec(
        folder, Task.CLASSIFICATION, lora=LoraSpec(rank=2, alpha=4.0, target_modules=("attention",))
    )
    check_base_model(spec)  # accepted before the load, on the meta-device skeleton

    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])

    assert prepared.target_modules == arch.attention
    assert adapted(prepared.model) == expected_attention(arch)
    # The adapter trains: a backward pass reaches LoRA's B matrices on q, k, v and output.
    rows = sentiment_rows(8)
    data, encoded = classification_data(rows, rows[:4], prepared.tokenizer)
    batch = prepared.tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([data.labels.index(label) for _, label in rows])
    prepared.model.train()
    loss = prepared.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
    ).loss
    loss.backward()
    lora_b = [p for n, p in prepared.model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == len(expected_attention(arch))
    assert all(p.grad is not None for p in lora_b)
    assert encoded.train  # tokenised by the tokenizer saved beside the model
    # The record of the job says what "attention" became.
    result = LoopResult(
        train_seconds=1.0, steps=1, final_loss=loss.item(), last_eval=None, samples_per_second=8.0
    )
    record = training_config(prepared, data, spec, result, {})
    lora = record["hyperparameters"]["lora"]
    assert lora["target_modules"] == ["attention"]
    assert lora["resolved_target_modules"] == list(arch.attention)
    assert math.isfinite(loss.item())


def test_check_base_model_refuses_a_named_set_the_saved_model_lacks(tmp_path: Path) -> None:
    folder = save_tiny_encoder(tmp_path / "deberta", BY_NAME["deberta-v2"])
    spec = make_spec(
        folder, Task.CLASSIFICATION, lora=LoraSpec(target_modules=("query", "key", "value"))
    )

    with pytest.raises(InvalidArgument) as caught:
        check_base_model(spec)

    assert caught.value.field == FIELD
    assert "query_proj" in caught.value.message
