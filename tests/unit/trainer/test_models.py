"""Base model cache: loading, 4-bit, LoRA validation, head swap, fresh weights for every job."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from services.common.errors import InvalidArgument
from services.trainer.core.loop import train
from services.trainer.core.models import (
    BaseModelCache,
    check_base_model,
    cuda_broken,
    device_info,
    linear_module_names,
    validate_lora,
)
from services.trainer.core.types import LoraSpec, RunContext, Task, TrainingSpec
from tests.unit.trainer.conftest import (
    EOS,
    Recorder,
    classification_data,
    echo_rows,
    generation_data,
    make_spec,
    sentiment_rows,
)

QWEN_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.mark.parametrize(
    ("lora", "field"),
    [
        (LoraSpec(rank=0), "hyperparameters.lora.rank"),
        (LoraSpec(alpha=0.0), "hyperparameters.lora.alpha"),
        (LoraSpec(alpha=float("nan")), "hyperparameters.lora.alpha"),
        (LoraSpec(dropout=1.0), "hyperparameters.lora.dropout"),
        (LoraSpec(dropout=-0.1), "hyperparameters.lora.dropout"),
        (LoraSpec(target_modules=("q_proj", " ")), "hyperparameters.lora.target_modules"),
    ],
)
def test_validate_lora_names_the_bad_field(lora: LoraSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_lora(lora)
    assert caught.value.field == field


def test_validate_lora_accepts_common_settings() -> None:
    validate_lora(LoraSpec(rank=8, alpha=16.0, dropout=0.0, use_rslora=True))
    validate_lora(LoraSpec(rank=64, alpha=128.0, dropout=0.1, target_modules=("q_proj",)))


def test_unknown_target_module_lists_the_models_linear_layers(tiny_qwen_dir: Path) -> None:
    spec = make_spec(
        tiny_qwen_dir, Task.CLASSIFICATION, lora=LoraSpec(target_modules=("q_proj", "qkv"))
    )
    cache = BaseModelCache("cpu")
    with pytest.raises(InvalidArgument) as caught:
        cache.acquire(spec, ["a", "b"])
    error = caught.value
    assert error.field == "hyperparameters.lora.target_modules"
    assert "qkv" in error.message
    for name in QWEN_LINEAR:
        assert name in error.message
    assert "score" not in error.message  # the head is trained whole, never a LoRA target
    # A typo costs no reload: the next job gets the base that is already loaded.
    assert cache.acquire(make_spec(tiny_qwen_dir, Task.CLASSIFICATION), ["a", "b"]).base_reused


def test_a_module_that_is_not_linear_is_refused(tiny_qwen_dir: Path) -> None:
    spec = make_spec(tiny_qwen_dir, Task.GENERATION, lora=LoraSpec(target_modules=("self_attn",)))
    with pytest.raises(InvalidArgument) as caught:
        BaseModelCache("cpu").acquire(spec, [])
    assert caught.value.field == "hyperparameters.lora.target_modules"
    assert "q_proj" in caught.value.message


def test_explicit_targets_get_lora_and_others_do_not(tiny_qwen_dir: Path) -> None:
    spec = make_spec(
        tiny_qwen_dir, Task.GENERATION, lora=LoraSpec(rank=2, target_modules=("q_proj", "v_proj"))
    )
    prepared = BaseModelCache("cpu").acquire(spec, [])
    adapted = {
        name.rsplit(".", 1)[-1]
        for name, m in prepared.model.named_modules()
        if hasattr(m, "lora_A")
    }
    assert adapted == {"q_proj", "v_proj"}


def test_missing_base_model_is_an_invalid_argument(tmp_path: Path) -> None:
    cache = BaseModelCache("cpu")
    for name in (str(tmp_path / "no-such-model"), "no-such-org/no-such-model-xyz"):
        with pytest.raises(InvalidArgument) as caught:
            cache.acquire(make_spec(name, Task.GENERATION), [])
        assert caught.value.field == "base_model"
        assert "not found (a local folder or a Hugging Face hub name)" in caught.value.message
    assert cache.loaded_base_model == ""


def test_decoder_classifier_pads_with_the_pad_token_and_pools_the_last_real_token(
    tiny_qwen_dir: Path,
) -> None:
    prepared = BaseModelCache("cpu").acquire(
        make_spec(tiny_qwen_dir, Task.CLASSIFICATION), ["neg", "pos", "neutral"]
    )
    tokenizer = prepared.tokenizer
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # the distinct pad is kept
    assert prepared.model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right"

    model = prepared.model.eval()
    texts = ["w1 w2 w3 w4 w5 good", "bad w7"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        batched = model(**batch).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    assert batched.shape == (2, 3)
    # Right padding must not move the pooled token: same logits with or without padding.
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_a_tokenizer_without_pad_falls_back_to_eos(tiny_qwen_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_qwen_dir, folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)

    prepared = BaseModelCache("cpu").acquire(make_spec(folder, Task.CLASSIFICATION), ["a", "b"])
    assert prepared.tokenizer.pad_token == EOS
    assert prepared.model.config.pad_token_id == prepared.tokenizer.eos_token_id


def test_qlora_quantises_the_linear_layers_but_never_the_head(tiny_qwen_dir: Path) -> None:
    import bitsandbytes as bnb

    spec = make_spec(
        tiny_qwen_dir,
        Task.CLASSIFICATION,
        training=TrainingSpec(learning_rate=5e-3, num_epochs=1, batch_size=4, quantize_4bit=True),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    base = prepared.model.get_base_model()
    projections = [m.base_layer for m in base.modules() if hasattr(m, "lora_A")]
    assert len(projections) == 2 * len(QWEN_LINEAR)
    assert all(isinstance(layer, bnb.nn.Linear4bit) for layer in projections)
    heads = [
        m
        for name, m in base.named_modules()
        if name.startswith("score") and isinstance(m, nn.Linear)
    ]
    assert heads, "no score head"
    assert not any(isinstance(head, bnb.nn.Linear4bit) for head in heads)
    assert all(head.weight.dtype == torch.float32 for head in heads)

    lora_before = {
        n: p.detach().clone() for n, p in prepared.model.named_parameters() if "lora_B" in n
    }
    rows = sentiment_rows(12)
    data, encoded = classification_data(rows[:8], rows[8:], prepared.tokenizer)
    recorder = Recorder()
    result = train(prepared, data, encoded, spec, RunContext(recorder.emit, recorder.should_stop))
    assert result.steps == 2
    assert torch.isfinite(torch.tensor(result.final_loss))
    after = dict(prepared.model.named_parameters())
    assert any(not torch.equal(after[n], before) for n, before in lora_before.items())


def test_the_head_follows_each_jobs_labels_on_one_loaded_base(tiny_qwen_dir: Path) -> None:
    cache = BaseModelCache("cpu")
    first = cache.acquire(make_spec(tiny_qwen_dir, Task.CLASSIFICATION), ["a", "b"])
    assert not first.base_reused and cache.loaded_base_model == str(tiny_qwen_dir)
    backbone = first.model.get_base_model().model

    second = cache.acquire(make_spec(tiny_qwen_dir, Task.CLASSIFICATION), ["x", "y", "z", "w"])
    assert second.base_reused and second.load_seconds == 0.0
    assert second.model.get_base_model().model is backbone  # not reloaded
    assert second.model.config.id2label == {0: "x", 1: "y", 2: "z", 3: "w"}
    with torch.inference_mode():
        logits = second.model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 4)

    generation = cache.acquire(make_spec(tiny_qwen_dir, Task.GENERATION), [])
    assert not generation.base_reused  # another task is another model class: reloaded
    cache.release()
    assert cache.loaded_base_model == ""


def _train_a_few_steps(prepared_spec: tuple, task: Task) -> None:  # type: ignore[type-arg]
    prepared, spec = prepared_spec
    if task is Task.CLASSIFICATION:
        rows = sentiment_rows(12, seed=3)
        data, encoded = classification_data(rows[:8], rows[8:], prepared.tokenizer)
    else:
        rows_g = echo_rows(12, seed=3)
        data, encoded = generation_data(rows_g[:8], rows_g[8:], prepared.tokenizer)
    recorder = Recorder()
    train(prepared, data, encoded, spec, RunContext(recorder.emit, recorder.should_stop))


@pytest.mark.parametrize(
    ("task", "quantize_4bit"),
    [(Task.CLASSIFICATION, False), (Task.CLASSIFICATION, True), (Task.GENERATION, False)],
)
def test_a_second_job_starts_from_exactly_the_weights_a_fresh_load_gives(
    tiny_qwen_dir: Path, task: Task, quantize_4bit: bool
) -> None:
    labels1 = ["negative", "positive", "neutral"] if task is Task.CLASSIFICATION else []
    labels2 = ["a", "b", "c", "d"] if task is Task.CLASSIFICATION else []
    spec1 = make_spec(
        tiny_qwen_dir,
        task,
        lora=LoraSpec(rank=4, alpha=8.0, dropout=0.1),
        training=TrainingSpec(
            learning_rate=5e-2, num_epochs=1, batch_size=4, seed=1, quantize_4bit=quantize_4bit
        ),
    )
    spec2 = make_spec(
        tiny_qwen_dir,
        task,
        lora=LoraSpec(rank=8, alpha=16.0, dropout=0.0, use_rslora=True),
        training=TrainingSpec(seed=99, quantize_4bit=quantize_4bit),
    )
    cache = BaseModelCache("cpu")
    job1 = cache.acquire(spec1, labels1)
    start1 = {k: v.detach().clone() for k, v in job1.model.state_dict().items()}
    _train_a_few_steps((job1, spec1), task)
    trained1 = job1.model.state_dict()
    assert any(not torch.equal(start1[k], trained1[k]) for k in start1), "job 1 did not train"

    job2 = cache.acquire(spec2, labels2)
    assert job2.base_reused
    fresh = BaseModelCache("cpu").acquire(spec2, labels2)
    assert not fresh.base_reused

    reused_state = job2.model.state_dict()
    fresh_state = fresh.model.state_dict()
    assert reused_state.keys() == fresh_state.keys()
    assert any("lora_A" in k for k in reused_state)
    if task is Task.CLASSIFICATION:
        assert any("modules_to_save" in k and "score" in k for k in reused_state)
    differing = [k for k in fresh_state if not torch.equal(reused_state[k], fresh_state[k])]
    assert differing == []


def test_device_info_and_cuda_health_on_the_cpu() -> None:
    info = device_info(torch.device("cpu"))
    assert info["device"] == "cpu"
    assert info["memory_allocated_bytes"] == info["memory_total_bytes"] == 0
    if not torch.cuda.is_available():
        assert cuda_broken() is False


def test_linear_module_names_of_bert_exclude_the_classifier(minilm_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    names = linear_module_names(model)
    assert {"query", "key", "value", "dense"} <= set(names)
    assert "classifier" not in names


def test_check_base_model_refuses_bad_names_before_any_weights_load(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    check_base_model(make_spec(tiny_qwen_dir, Task.CLASSIFICATION))
    check_base_model(
        make_spec(tiny_qwen_dir, Task.GENERATION, lora=LoraSpec(target_modules=("q_proj",)))
    )
    with pytest.raises(InvalidArgument) as caught:
        check_base_model(
            make_spec(tiny_qwen_dir, Task.GENERATION, lora=LoraSpec(target_modules=("c_attn",)))
        )
    assert caught.value.field == "hyperparameters.lora.target_modules"
    assert "gate_proj" in caught.value.message
    with pytest.raises(InvalidArgument) as caught:
        check_base_model(make_spec(tmp_path / "missing", Task.GENERATION))
    assert caught.value.field == "base_model"
    with pytest.raises(InvalidArgument) as caught:
        check_base_model(make_spec(tiny_qwen_dir, Task.GENERATION, lora=LoraSpec(rank=0)))
    assert caught.value.field == "hyperparameters.lora.rank"


def test_a_second_distilbert_job_gets_a_fresh_pre_classifier_not_the_last_jobs(
    tmp_path: Path,
) -> None:
    # PEFT's SEQ_CLS wraps every module whose name ends with "classifier" or "score" as
    # trained in full: on DistilBERT that is `pre_classifier` too, which no head rebuild
    # touches. The cached base must hand the next job the loaded one, not the trained copy.
    from transformers import AutoModelForSequenceClassification

    from tests.unit.trainer.test_targets import BY_NAME, save_tiny_encoder

    folder = save_tiny_encoder(tmp_path / "distilbert", BY_NAME["distilbert"])
    # Saved as a classifier, so `pre_classifier` is in the checkpoint: every load gives the
    # same weights (a missing one would be initialised anew at random on each load).
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).save_pretrained(folder)

    spec1 = make_spec(
        folder,
        Task.CLASSIFICATION,
        lora=LoraSpec(rank=4, alpha=8.0, dropout=0.1),
        training=TrainingSpec(learning_rate=5e-2, num_epochs=1, batch_size=4, seed=1),
    )
    spec2 = make_spec(
        folder,
        Task.CLASSIFICATION,
        lora=LoraSpec(rank=2, alpha=4.0, dropout=0.0, target_modules=("attention",)),
        training=TrainingSpec(seed=99),
    )
    labels = ["negative", "positive"]
    cache = BaseModelCache("cpu")
    job1 = cache.acquire(spec1, labels)
    assert not job1.base_reused
    start1 = {k: v.detach().clone() for k, v in job1.model.state_dict().items()}
    trained_in_full = [k for k in start1 if "modules_to_save" in k and "pre_classifier" in k]
    assert trained_in_full, "PEFT no longer trains DistilBERT's pre_classifier in full"
    _train_a_few_steps((job1, spec1), Task.CLASSIFICATION)
    trained1 = job1.model.state_dict()
    assert any(not torch.equal(start1[k], trained1[k]) for k in trained_in_full)

    job2 = cache.acquire(spec2, labels)
    assert job2.base_reused
    fresh = BaseModelCache("cpu").acquire(spec2, labels)
    assert not fresh.base_reused

    reused_params = dict(job2.model.named_parameters())
    fresh_params = dict(fresh.model.named_parameters())
    assert reused_params.keys() == fresh_params.keys()
    assert any("pre_classifier" in k for k in reused_params)
    differing = [k for k in fresh_params if not torch.equal(reused_params[k], fresh_params[k])]
    assert differing == []
    reused_state, fresh_state = job2.model.state_dict(), fresh.model.state_dict()
    assert reused_state.keys() == fresh_state.keys()
    assert [k for k in fresh_state if not torch.equal(reused_state[k], fresh_state[k])] == []
