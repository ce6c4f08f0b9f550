"""The training loop and artifacts on tiny real models: training, events, cancel, NaN, saving."""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from services.common.errors import InvalidArgument
from services.trainer.core import loop
from services.trainer.core.artifacts import (
    TensorBoardLogger,
    check_output_dir,
    load_adapter_for_inference,
    predict_labels,
    save_artifacts,
)
from services.trainer.core.loop import build_train_loader, train
from services.trainer.core.models import BaseModelCache, PreparedModel
from services.trainer.core.types import (
    BalancingSpec,
    Cancelled,
    EncodedExample,
    EvaluationEvent,
    LoopOptions,
    LoraSpec,
    NanLoss,
    ProgressEvent,
    RunContext,
    Task,
    TrainingSpec,
)
from tests.unit.trainer.conftest import (
    Recorder,
    classification_data,
    echo_rows,
    generation_data,
    make_spec,
    sentiment_rows,
)


def _context(recorder: Recorder, every: int = 1, **extra: object) -> RunContext:
    return RunContext(
        emit=recorder.emit,
        should_stop=recorder.should_stop,
        progress_every_steps=every,
        extra=dict(extra),
    )


# ---- training on real tiny models ----------------------------------------------------------


def test_encoder_classifier_minilm_learns_in_two_epochs(minilm_dir: Path) -> None:
    # The steps alone must learn: with the linear probe the head is right before step 1.
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        lora=LoraSpec(rank=8, alpha=16.0, dropout=0.0),
        training=TrainingSpec(learning_rate=2e-3, num_epochs=2, batch_size=8, seed=3),
        balancing=BalancingSpec(focal_gamma=0.0, use_class_weights=True),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(48, seed=1)
    data, encoded = classification_data(rows[:40], rows[40:], prepared.tokenizer)
    recorder = Recorder()

    result = train(
        prepared, data, encoded, spec, _context(recorder), options=LoopOptions(linear_probe=False)
    )

    progress = recorder.of(ProgressEvent)
    assert [e.step for e in progress] == list(range(1, 11))  # 40 rows / 8, two epochs
    first_epoch = [e.loss for e in progress[:5]]
    second_epoch = [e.loss for e in progress[5:]]
    assert sum(second_epoch) / 5 < sum(first_epoch) / 5
    evaluations = recorder.of(EvaluationEvent)
    assert [e.epoch for e in evaluations] == [1.0, 2.0]
    assert evaluations[1].eval_loss < evaluations[0].eval_loss
    assert evaluations[1].references == [label for _, label in rows[40:]]
    assert set(evaluations[1].predictions) <= {"negative", "positive"}
    assert list(evaluations[1].labels) == ["negative", "positive"]
    assert result.steps == 10 and result.last_eval == evaluations[1]


def test_decoder_classifier_trains_with_focal_loss_weights_and_sampler(tiny_qwen_dir: Path) -> None:
    spec = make_spec(
        tiny_qwen_dir,
        Task.CLASSIFICATION,
        training=TrainingSpec(learning_rate=1e-2, num_epochs=2, batch_size=4, seed=5),
        balancing=BalancingSpec(focal_gamma=2.0, use_class_weights=True, use_weighted_sampler=True),
        max_eval_samples=5,
    )
    rows = sentiment_rows(24, seed=2)
    rows = [*rows, ("w1 okay w2", "neutral"), ("okay w3", "neutral")]  # a rare class
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "neutral", "positive"])
    data, encoded = classification_data(rows[:20] + rows[24:], rows[20:24], prepared.tokenizer)
    recorder = Recorder()

    result = train(prepared, data, encoded, spec, _context(recorder, every=2))

    assert math.isfinite(result.final_loss)
    evaluation = recorder.of(EvaluationEvent)[-1]
    assert len(evaluation.predictions) == 4  # max_eval_samples caps at the 4 validation rows
    assert set(evaluation.predictions) <= {"negative", "neutral", "positive"}


def test_generation_trains_and_evaluates_by_greedy_generation(tiny_qwen_dir: Path) -> None:
    spec = make_spec(
        tiny_qwen_dir,
        Task.GENERATION,
        training=TrainingSpec(learning_rate=1e-2, num_epochs=1, batch_size=4, seed=5),
        max_eval_samples=6,
        max_new_tokens=5,
    )
    prepared = BaseModelCache("cpu").acquire(spec, [])
    rows = echo_rows(24, seed=4)
    data, encoded = generation_data(rows[:16], rows[16:], prepared.tokenizer)
    recorder = Recorder()

    result = train(prepared, data, encoded, spec, _context(recorder))

    evaluation = recorder.of(EvaluationEvent)[-1]
    assert evaluation == result.last_eval
    assert len(evaluation.predictions) == 6
    assert evaluation.prompts == [p for p, _ in rows[16:22]]
    assert evaluation.references == [t for _, t in rows[16:22]]
    assert math.isfinite(evaluation.eval_loss) and evaluation.eval_loss > 0
    for text in evaluation.predictions:
        words = text.split()
        assert 0 < len(words) <= 5
        assert not any(w.startswith("<|") for w in words)  # special tokens skipped
        assert "user" not in words[:1]  # the prompt is not repeated back


def test_greedy_generation_is_the_same_batched_left_padded_or_one_by_one(
    tiny_qwen_dir: Path,
) -> None:
    prepared = BaseModelCache("cpu").acquire(make_spec(tiny_qwen_dir, Task.GENERATION), [])
    rows = echo_rows(6, seed=9)
    _, encoded = generation_data(rows, rows, prepared.tokenizer)
    recorder = Recorder()
    amp = loop._autocast(prepared.device)
    prepared.model.eval()
    with torch.inference_mode():
        batched = loop._generate(prepared, encoded.validation, 6, 4, _context(recorder), amp)
        single = loop._generate(prepared, encoded.validation, 1, 4, _context(recorder), amp)
    assert len({len(r.prompt_ids) for r in encoded.validation}) > 1  # padding really happens
    assert batched == single


class ThinkingModel(torch.nn.Module):
    """Greedy "generation" that answers every prompt with a reasoning block, then the answer."""

    def __init__(self, continuation: list[int], eos_id: int) -> None:
        super().__init__()
        self.continuation = torch.tensor([continuation])
        self.generation_config = GenerationConfig(eos_token_id=eos_id)

    def get_base_model(self) -> ThinkingModel:
        return self

    def generate(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        tail = self.continuation.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_predictions_are_scored_without_the_reasoning_block(tiny_qwen_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    tokenizer.add_tokens(["<think>", "</think>"])  # as Qwen3's: added, not special
    said = tokenizer("<think> w1 w2 maybe </think> yes great", add_special_tokens=False)
    model = ThinkingModel([*said["input_ids"], tokenizer.eos_token_id], tokenizer.eos_token_id)
    prepared = PreparedModel(
        model=model,  # type: ignore[arg-type]  # generates like a PeftModel
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        task=Task.GENERATION,
        labels=(),
        trainable_parameters=0,
        total_parameters=0,
        tokenizer_id=str(tiny_qwen_dir),
        load_seconds=0.0,
        base_reused=False,
    )
    rows = echo_rows(3, seed=2)
    _, encoded = generation_data(rows, rows, tokenizer)
    predictions = loop._generate(
        prepared, encoded.validation, 2, 12, _context(Recorder()), contextlib.nullcontext
    )
    assert predictions == ["yes great"] * 3


def test_gradient_accumulation_takes_the_same_step_as_one_big_batch(tiny_qwen_dir: Path) -> None:
    rows = echo_rows(8, seed=6)
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        spec = make_spec(
            tiny_qwen_dir,
            Task.GENERATION,
            training=TrainingSpec(
                learning_rate=1e-2,
                num_epochs=1,
                batch_size=batch_size,
                gradient_accumulation=accumulation,
                seed=5,
            ),
            max_eval_samples=1,
            max_new_tokens=1,
        )
        prepared = BaseModelCache("cpu").acquire(spec, [])
        data, encoded = generation_data(rows, rows[:1], prepared.tokenizer)
        recorder = Recorder()
        result = train(prepared, data, encoded, spec, _context(recorder))
        assert result.steps == 1
        lora = {n: p.detach().clone() for n, p in prepared.model.named_parameters() if "lora_" in n}
        results.append((result.final_loss, lora))
    (loss, reference), *others = results
    for other_loss, other in others:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        for name, value in reference.items():
            torch.testing.assert_close(other[name], value, atol=1e-6, rtol=1e-5)


# ---- events, cancellation, failures ----------------------------------------------------------


def test_progress_events_carry_sane_numbers(tiny_qwen_dir: Path) -> None:
    spec = make_spec(
        tiny_qwen_dir,
        Task.CLASSIFICATION,
        training=TrainingSpec(
            learning_rate=1e-3,
            num_epochs=2,
            batch_size=2,
            gradient_accumulation=2,
            warmup_ratio=0.3,
            seed=1,
        ),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(22, seed=3)
    data, encoded = classification_data(rows[:18], rows[18:], prepared.tokenizer)
    recorder = Recorder()

    result = train(prepared, data, encoded, spec, _context(recorder, every=2))

    # 18 rows / 2 = 9 batches, accumulated by 2 = 5 steps an epoch, 10 in all; events at
    # every second step and at the last.
    progress = recorder.of(ProgressEvent)
    assert [e.step for e in progress] == [2, 4, 6, 8, 10]
    assert all(e.total_steps == 10 for e in progress)
    assert [e.epoch for e in progress] == pytest.approx([4 / 9, 8 / 9, 1 + 2 / 9, 1 + 6 / 9, 2.0])
    assert all(math.isfinite(e.loss) and 0 < e.loss < 10 for e in progress)
    assert all(e.samples_per_second > 0 for e in progress)
    # Warmup over 3 steps then linear decay: step 2 is still warming up, then it falls.
    learning_rates = [e.learning_rate for e in progress]
    assert learning_rates[0] == pytest.approx(1e-3 / 3)  # step 1 runs at 0, as in HF
    assert learning_rates[1:] == sorted(learning_rates[1:], reverse=True)
    assert max(learning_rates) <= 1e-3
    assert result.steps == 10 and result.samples_per_second > 0 and result.train_seconds > 0
    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds.index("EvaluationEvent") == kinds.index("ProgressEvent") + 2  # after step 5


def test_cancellation_stops_within_one_step(tiny_qwen_dir: Path) -> None:
    spec = make_spec(
        tiny_qwen_dir,
        Task.CLASSIFICATION,
        training=TrainingSpec(learning_rate=1e-3, num_epochs=3, batch_size=2, seed=1),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(24)
    data, encoded = classification_data(rows[:20], rows[20:], prepared.tokenizer)
    forwards = 0

    def count(*_: object) -> None:
        nonlocal forwards
        forwards += 1

    prepared.model.get_input_embeddings().register_forward_hook(count)
    # Stop is requested as soon as step 3 is reported.
    recorder = Recorder(stop_when=lambda events: any(getattr(e, "step", 0) >= 3 for e in events))

    with pytest.raises(Cancelled):
        train(prepared, data, encoded, spec, _context(recorder))

    assert [e.step for e in recorder.of(ProgressEvent)] == [1, 2, 3]
    assert forwards == 3  # no fourth step was started
    assert not recorder.of(EvaluationEvent)
    assert all(p.grad is None for p in prepared.model.parameters())  # freed on the way out


def test_a_non_finite_loss_raises_nan_loss(tiny_qwen_dir: Path) -> None:
    spec = make_spec(tiny_qwen_dir, Task.GENERATION)
    prepared = BaseModelCache("cpu").acquire(spec, [])
    rows = echo_rows(8)
    data, encoded = generation_data(rows, rows[:2], prepared.tokenizer)
    prepared.model.get_input_embeddings().register_forward_hook(
        lambda _module, _inputs, output: output * float("nan")
    )
    recorder = Recorder()
    with pytest.raises(NanLoss):
        train(prepared, data, encoded, spec, _context(recorder))
    assert not recorder.of(ProgressEvent)


def test_a_huge_learning_rate_ends_in_nan_loss(tiny_qwen_dir: Path) -> None:
    spec = make_spec(
        tiny_qwen_dir,
        Task.CLASSIFICATION,
        training=TrainingSpec(learning_rate=1e30, num_epochs=3, batch_size=2, seed=1),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(12)
    data, encoded = classification_data(rows, rows[:2], prepared.tokenizer)
    with pytest.raises(NanLoss):
        train(prepared, data, encoded, spec, _context(Recorder()))


def test_an_empty_training_split_is_an_invalid_argument(tiny_qwen_dir: Path) -> None:
    spec = make_spec(tiny_qwen_dir, Task.GENERATION)
    prepared = BaseModelCache("cpu").acquire(spec, [])
    data, encoded = generation_data([], [], prepared.tokenizer)
    with pytest.raises(InvalidArgument):
        train(prepared, data, encoded, spec, _context(Recorder()))


# ---- the data loader ---------------------------------------------------------------------------


def _rows(label_ids: list[int], lengths: list[int]) -> list[EncodedExample]:
    return [
        EncodedExample(input_ids=(5,) * n, attention_mask=(1,) * n, label_id=label)
        for label, n in zip(label_ids, lengths, strict=True)
    ]


def test_the_weighted_sampler_draws_rare_classes_as_often_as_common_ones() -> None:
    label_ids = [0] * 90 + [1] * 8 + [2] * 2
    examples = _rows(label_ids, [3 + i % 7 for i in range(100)])
    loader = build_train_loader(
        examples, Task.CLASSIFICATION, 0, 10, seed=1, n_classes=3, use_weighted_sampler=True
    )
    drawn: Counter[int] = Counter()
    for _ in range(10):
        for batch in loader:
            drawn.update(batch["labels"].tolist())
    total = sum(drawn.values())
    assert total == 1000
    for label in (0, 1, 2):
        assert 0.25 < drawn[label] / total < 0.42  # about 1/3 each, not 90 / 8 / 2 %

    plain = build_train_loader(examples, Task.CLASSIFICATION, 0, 10, seed=1, n_classes=3)
    epoch = Counter(label for batch in plain for label in batch["labels"].tolist())
    assert epoch == Counter(label_ids)  # no sampler: every row exactly once


def test_the_loader_groups_by_length_and_puts_the_longest_batch_first() -> None:
    lengths = [1 + (i * 37) % 50 for i in range(64)]
    examples = _rows([0] * 64, lengths)
    loader = build_train_loader(examples, Task.CLASSIFICATION, 0, 8, seed=3, n_classes=1)
    first_epoch = [batch["input_ids"] for batch in loader]
    assert first_epoch[0].shape[1] == max(lengths)
    padding = sum(int((b == 0).sum()) for b in first_epoch)
    assert padding < 64 * 5  # random batches of 8 would pad about 64 * 17 tokens
    assert sum(b.shape[0] for b in first_epoch) == 64
    second_epoch = [batch["input_ids"] for batch in loader]
    assert [b.shape for b in first_epoch] != [b.shape for b in second_epoch]  # reshuffled
    again = [
        batch["input_ids"]
        for batch in build_train_loader(examples, Task.CLASSIFICATION, 0, 8, seed=3, n_classes=1)
    ]
    assert all(torch.equal(a, b) for a, b in zip(first_epoch, again, strict=True))  # seeded


# ---- artifacts -----------------------------------------------------------------------------


def test_artifacts_are_complete_and_a_reloaded_classifier_gives_the_same_logits(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "study" / "trial-0"
    check_output_dir(out_dir)
    spec = make_spec(
        tiny_qwen_dir,
        Task.CLASSIFICATION,
        out_dir,
        training=TrainingSpec(learning_rate=2e-2, num_epochs=2, batch_size=4, seed=11),
    )
    prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(20, seed=8)
    data, encoded = classification_data(rows[:16], rows[16:], prepared.tokenizer)
    recorder = Recorder()
    with TensorBoardLogger(out_dir / "logs") as tensorboard:
        result = train(prepared, data, encoded, spec, _context(recorder, tensorboard=tensorboard))
    save_artifacts(prepared, data, spec, result, out_dir, {"torch": "x"})

    names = {p.name for p in out_dir.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_config.json",
        "class_weights.json",
        "tokenizer.json",
        "logs",
    } <= names
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert "score" in adapter_config["modules_to_save"]

    config = json.loads((out_dir / "training_config.json").read_text())
    assert config["base_model"] == str(tiny_qwen_dir)
    assert config["task"] == "classification"
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["hyperparameters"]["lora"]["rank"] == 4
    assert config["hyperparameters"]["training"]["learning_rate"] == 2e-2
    assert config["hyperparameters"]["balancing"]["focal_gamma"] == 0.0
    assert config["dataset"]["fingerprint"] == "test-fingerprint"
    assert config["dataset"]["train_rows"] == 16 and config["dataset"]["validation_rows"] == 4
    assert config["dataset"]["excluded_classes"] == {"rare": 1}
    assert config["result"]["final_loss"] == pytest.approx(result.final_loss)
    assert config["result"]["steps"] == 8
    assert config["versions"] == {"torch": "x"}

    weights = json.loads((out_dir / "class_weights.json").read_text())
    assert weights["labels"]["negative"]["count"] == 8
    assert weights["excluded"] == {"rare": 1}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out_dir / "logs").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(out_dir / "logs"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/samples_per_second", "eval/loss"} <= tags
    assert len(accumulator.Scalars("train/loss")) == 8

    texts = ["w1 good w2", "bad", "w3 w4 awful w5 w6", "great"]
    batch = prepared.tokenizer(texts, padding=True, return_tensors="pt")
    prepared.model.eval()
    with torch.inference_mode():
        before = prepared.model(**batch).logits

    model, tokenizer, labels, task, group_head = load_adapter_for_inference(out_dir, "cpu")
    assert group_head is None  # no group_separator: no group head
    assert labels == ("negative", "positive") and task is Task.CLASSIFICATION
    with torch.inference_mode():
        after = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    loaded = load_adapter_for_inference(out_dir, "cpu")
    expected = [labels[i] for i in before.argmax(-1).tolist()]
    assert predict_labels(loaded, texts) == expected


def test_an_output_dir_that_cannot_be_written_is_an_invalid_argument(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for path in (a_file, a_file / "sub", ""):
        with pytest.raises(InvalidArgument) as caught:
            check_output_dir(path)
        assert caught.value.field == "output_dir"
    check_output_dir(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir()


def test_load_adapter_refuses_a_folder_without_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load_adapter_for_inference(tmp_path, "cpu")
    assert caught.value.field == "adapter_dir"


# ---- CUDA (bf16 autocast, 4-bit on the GPU) ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize_4bit", [False, True])
def test_classification_and_generation_train_on_cuda(
    tiny_qwen_dir: Path, tmp_path: Path, quantize_4bit: bool
) -> None:
    cache = BaseModelCache("cuda")
    training = TrainingSpec(
        learning_rate=1e-2, num_epochs=1, batch_size=4, seed=2, quantize_4bit=quantize_4bit
    )
    cls_spec = make_spec(tiny_qwen_dir, Task.CLASSIFICATION, tmp_path, training=training)
    prepared = cache.acquire(cls_spec, ["negative", "positive"])
    rows = sentiment_rows(12)
    data, encoded = classification_data(rows[:8], rows[8:], prepared.tokenizer)
    result = train(prepared, data, encoded, cls_spec, _context(Recorder()))
    assert result.last_eval is not None and math.isfinite(result.final_loss)
    save_artifacts(prepared, data, cls_spec, result, tmp_path, None)
    loaded = load_adapter_for_inference(tmp_path, "cuda")
    assert len(predict_labels(loaded, ["w1 good", "bad w2"])) == 2

    gen_spec = make_spec(tiny_qwen_dir, Task.GENERATION, training=training, max_new_tokens=3)
    prepared = cache.acquire(gen_spec, [])
    rows_g = echo_rows(12)
    data, encoded = generation_data(rows_g[:8], rows_g[8:], prepared.tokenizer)
    result = train(prepared, data, encoded, gen_spec, _context(Recorder()))
    assert result.last_eval is not None and len(result.last_eval.predictions) == 4

    again = cache.acquire(gen_spec, [])
    fresh = BaseModelCache("cuda").acquire(gen_spec, [])
    state, fresh_state = again.model.state_dict(), fresh.model.state_dict()
    assert [k for k in fresh_state if not torch.equal(state[k], fresh_state[k])] == []


def test_a_qlora_generation_adapter_reloads_with_the_same_logits(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        tiny_qwen_dir,
        Task.GENERATION,
        tmp_path,
        training=TrainingSpec(learning_rate=1e-2, num_epochs=1, batch_size=4, quantize_4bit=True),
        max_new_tokens=2,
    )
    prepared = BaseModelCache("cpu").acquire(spec, [])
    rows = echo_rows(10, seed=5)
    data, encoded = generation_data(rows[:8], rows[8:], prepared.tokenizer)
    result = train(prepared, data, encoded, spec, _context(Recorder()))
    save_artifacts(prepared, data, spec, result, tmp_path)
    assert not (tmp_path / "class_weights.json").exists()
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["hyperparameters"]["training"]["quantize_4bit"] is True
    assert set(config["versions"]) >= {"torch", "transformers", "peft", "bitsandbytes"}

    inputs = torch.tensor([list(encoded.validation[0].input_ids)])
    with torch.inference_mode():
        before = prepared.model(input_ids=inputs).logits
    model, _tokenizer, labels, task, _ = load_adapter_for_inference(tmp_path, "cpu")
    assert task is Task.GENERATION and labels == ()
    with torch.inference_mode():
        after = model(input_ids=inputs).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
