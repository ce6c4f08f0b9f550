"""Classification quality defaults: mean pooling for encoders, a faster head, reload parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from services.trainer.core.artifacts import (
    load_adapter_for_inference,
    predict_labels,
    save_artifacts,
)
from services.trainer.core.loop import head_learning_rate, parameter_groups, train
from services.trainer.core.models import (
    POOLING_MEAN,
    POOLING_NATIVE,
    BaseModelCache,
    default_pooling,
    head_parameters,
    masked_mean,
    pooling_of,
    use_mean_pooling,
)
from services.trainer.core.types import (
    BalancingSpec,
    LoopOptions,
    LoraSpec,
    RunContext,
    Task,
    TrainingSpec,
)
from tests.unit.trainer.conftest import (
    Recorder,
    classification_data,
    make_spec,
    sentiment_rows,
)


def _context(recorder: Recorder) -> RunContext:
    return RunContext(emit=recorder.emit, should_stop=recorder.should_stop)


# ---- masked mean ---------------------------------------------------------------------------


def test_masked_mean_averages_only_the_attended_positions() -> None:
    hidden = torch.tensor(
        [
            [[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
            [[5.0, -1.0], [-7.0, 7.0], [9.0, 9.0]],
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # Row 0: mean of (1, 2) and (3, 4); the padded (100, 100) is ignored. Row 1: (5, -1) alone.
    expected = torch.tensor([[2.0, 3.0], [5.0, -1.0]])
    torch.testing.assert_close(masked_mean(hidden, mask), expected)
    # No mask: every position counts; a row without attended positions gives zeros.
    torch.testing.assert_close(masked_mean(hidden[:1], None), torch.tensor([[104 / 3, 106 / 3]]))
    torch.testing.assert_close(
        masked_mean(hidden[:1], torch.tensor([[0, 0, 0]])), torch.zeros(1, 2)
    )
    halves = masked_mean(hidden.to(torch.bfloat16), mask)
    assert halves.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        masked_mean(hidden, mask[:, :2])


# ---- which pooling, and that it is what the head reads ---------------------------------------


def test_an_encoder_classifier_reads_the_masked_mean_and_ignores_padding(
    minilm_dir: Path,
) -> None:
    spec = make_spec(minilm_dir, Task.CLASSIFICATION)
    prepared = BaseModelCache("cpu").acquire(spec, ["a", "b", "c"])
    assert prepared.pooling == POOLING_MEAN
    assert pooling_of(prepared.model) == POOLING_MEAN
    # BERT's [CLS] pooler (dense + tanh) is gone: not computed, not a LoRA target.
    assert not [name for name, _ in prepared.model.named_modules() if ".pooler" in name]

    model = prepared.model.eval()
    texts = ["my card has not arrived yet", "hi"]
    batch = prepared.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits
        hidden = model.get_base_model().bert(**batch).last_hidden_state
        expected = model.get_base_model().classifier(masked_mean(hidden, batch["attention_mask"]))
        alone = model(**prepared.tokenizer(texts[1:], return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_a_first_token_head_gets_the_mean_in_place_of_the_first_token() -> None:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=3,
    )
    torch.manual_seed(0)
    native = RobertaForSequenceClassification(config).eval()
    pooled = RobertaForSequenceClassification(config).eval()
    pooled.load_state_dict(native.state_dict())
    use_mean_pooling(pooled)
    use_mean_pooling(pooled)  # idempotent: one hook
    assert pooling_of(pooled) == POOLING_MEAN and pooling_of(native) == POOLING_NATIVE

    input_ids = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 2, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.inference_mode():
        hidden = native.roberta(input_ids, attention_mask=mask).last_hidden_state
        features = torch.cat([masked_mean(hidden, mask).unsqueeze(1), hidden[:, 1:]], dim=1)
        expected = native.classifier(features)
        got = pooled(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected)


def test_decoder_classifiers_keep_last_token_pooling(tiny_qwen_dir: Path) -> None:
    prepared = BaseModelCache("cpu").acquire(
        make_spec(tiny_qwen_dir, Task.CLASSIFICATION), ["neg", "pos"]
    )
    assert prepared.pooling == POOLING_NATIVE
    assert pooling_of(prepared.model) == POOLING_NATIVE


def test_a_sentence_transformers_model_trained_on_cls_keeps_its_cls_pooling(
    tmp_path: Path,
) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        )
    )
    assert default_pooling(str(tmp_path), model) == POOLING_MEAN  # no pooling config: mean
    pooling = tmp_path / "1_Pooling"
    pooling.mkdir()
    (pooling / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    assert default_pooling(str(tmp_path), model) == POOLING_NATIVE
    (pooling / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True})
    )
    assert default_pooling(str(tmp_path), model) == POOLING_MEAN


# ---- the head's learning rate ----------------------------------------------------------------


def test_the_head_trains_at_a_higher_learning_rate_than_the_adapter(minilm_dir: Path) -> None:
    spec = make_spec(minilm_dir, Task.CLASSIFICATION)
    prepared = BaseModelCache("cpu").acquire(spec, ["a", "b", "c"])
    head = head_parameters(prepared.model)
    assert head and all(p.requires_grad for p in head)
    names = {id(p): n for n, p in prepared.model.named_parameters()}
    assert all("classifier.modules_to_save" in names[id(p)] for p in head)

    groups = parameter_groups(prepared.model, 1e-4, Task.CLASSIFICATION)
    adapter, head_group = groups
    assert adapter["lr"] == 1e-4  # first: the rate progress events report
    assert head_group["lr"] == head_learning_rate(1e-4) == LoopOptions().head_min_learning_rate
    assert {id(p) for p in head_group["params"]} == {id(p) for p in head}
    assert all("lora_" in names[id(p)] for p in adapter["params"])
    trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == trainable
    # Well above the floor the multiplier rules.
    assert head_learning_rate(2e-3) == pytest.approx(2e-3 * LoopOptions().head_lr_multiplier)
    assert head_learning_rate(1.0) >= 1.0
    # A head the linear probe has fitted is refined at the adapter's own rate.
    probed = parameter_groups(prepared.model, 1e-4, Task.CLASSIFICATION, head_probed=True)
    assert [g["lr"] for g in probed] == [1e-4, 1e-4]


def test_generation_has_a_single_parameter_group(tiny_qwen_dir: Path) -> None:
    prepared = BaseModelCache("cpu").acquire(make_spec(tiny_qwen_dir, Task.GENERATION), [])
    groups = parameter_groups(prepared.model, 3e-4, Task.GENERATION)
    assert len(groups) == 1 and groups[0]["lr"] == 3e-4


def test_the_head_moves_faster_than_at_the_adapter_rate(minilm_dir: Path) -> None:
    no_probe = LoopOptions(linear_probe=False)  # the probe would move it before step 1
    # One step, no warmup: AdamW's first update is about lr per weight, so the head's
    # largest change tracks its own learning rate, not the adapter's.
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        lora=LoraSpec(rank=4, alpha=8.0, dropout=0.0),
        training=TrainingSpec(learning_rate=1e-4, num_epochs=2, batch_size=8, seed=1),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(8, seed=4)
    data, encoded = classification_data(rows, rows[:2], prepared.tokenizer)
    head = head_parameters(prepared.model)
    before = [p.detach().clone() for p in head]
    train(prepared, data, encoded, spec, _context(Recorder()), options=no_probe)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(head, before, strict=True))
    # Two steps at peak rates lr and lr / 2 (linear decay): at most 1.5 x lr per weight.
    assert moved > 1.5 * 1e-4 * 5
    assert moved <= 1.5 * head_learning_rate(1e-4) * 1.01


# ---- save and reload ---------------------------------------------------------------------------


def test_a_saved_and_reloaded_encoder_classifier_gives_identical_logits(
    minilm_dir: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        tmp_path,
        lora=LoraSpec(rank=4, alpha=8.0, dropout=0.0),
        training=TrainingSpec(learning_rate=2e-3, num_epochs=1, batch_size=8, seed=2),
        balancing=BalancingSpec(focal_gamma=2.0, use_class_weights=True),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(20, seed=6)
    data, encoded = classification_data(rows[:16], rows[16:], prepared.tokenizer)
    result = train(prepared, data, encoded, spec, _context(Recorder()))
    save_artifacts(prepared, data, spec, result, tmp_path, {"torch": "x"})

    texts = ["w1 good w2 w3 w4", "bad", "w5 awful", "great w6 w7"]
    batch = prepared.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        before = prepared.model.eval()(**batch).logits

    loaded = load_adapter_for_inference(tmp_path, "cpu")
    assert pooling_of(loaded.model) == POOLING_MEAN
    with torch.inference_mode():
        after = loaded.model(**loaded.tokenizer(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    assert predict_labels(loaded, texts, batch_size=3) == [
        loaded.labels[i] for i in before.argmax(-1).tolist()
    ]
    # The head that was trained is the head that came back.
    trained = prepared.model.get_base_model().classifier.modules_to_save["default"]
    reloaded = loaded.model.get_base_model().classifier.modules_to_save["default"]
    assert isinstance(trained, nn.Linear) and isinstance(reloaded, nn.Linear)
    torch.testing.assert_close(reloaded.weight, trained.weight)
