"""TrainerService over a real socket: every kind of job on CPU, events, cancel, reuse, bad input."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from loratune.common.v1 import common_pb2
from loratune.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.config import CommonSettings
from services.common.defaults import TrainingDefaults
from services.common.logging import JsonFormatter, PlainFormatter
from services.common.server import RunningServer, start_server
from services.evaluator.core.bertscore import packaged_minilm_path
from services.trainer.config import TrainerSettings
from services.trainer.main import build_manager, service_definition
from tests.unit.trainer.conftest import build_tiny_qwen

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLS = common_pb2.TASK_TYPE_CLASSIFICATION
GEN = common_pb2.TASK_TYPE_GENERATION

# Payment comments -> accounting codes, a head class and a rare one.
PAYMENTS = [
    ("Оплата аренды офиса за март", "20.01"),
    ("Аренда склада, счёт 17", "20.01"),
    ("Оплата аренды помещения по договору", "20.01"),
    ("Арендная плата за апрель", "20.01"),
    ("Зарплата сотрудникам за март", "70.00"),
    ("Выплата заработной платы", "70.00"),
    ("Аванс по зарплате", "70.00"),
    ("НДС за первый квартал", "68.02"),
    ("Уплата налога на прибыль", "68.02"),
    ("Комиссия банка за обслуживание", "91.02"),
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture
def payments(tmp_path: Path) -> Path:
    rows = [{"text": t, "label": lab} for _ in range(3) for t, lab in PAYMENTS]
    return write_jsonl(tmp_path / "payments.jsonl", rows)


@pytest.fixture
def sentiment(tmp_path: Path) -> Path:
    words = ["good", "great", "bad", "awful"]
    rows = [
        {"text": f"w{i % 7} {words[i % 4]} w{i % 5}", "label": "pos" if i % 4 < 2 else "neg"}
        for i in range(24)
    ]
    return write_jsonl(tmp_path / "sentiment.jsonl", rows)


@pytest.fixture
def dialogues(tmp_path: Path) -> Path:
    rows = [{"prompt": f"w{i} is good", "response": f"yes w{i} great"} for i in range(16)]
    return write_jsonl(tmp_path / "dialogues.jsonl", rows)


@pytest.fixture
async def trainer(tmp_path: Path) -> AsyncIterator[tuple[Any, RunningServer]]:
    # Every output folder of these tests lies inside the artifact root, as it must.
    settings = TrainerSettings(artifact_root=tmp_path, trainer_progress_every_steps=1)
    manager = build_manager(settings)
    server = await start_server(
        [service_definition(manager, settings, TrainingDefaults())],
        CommonSettings(),
        host="127.0.0.1",
        metrics_port=0,
    )
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel), server
    await server.stop(5)


def job(
    job_id: str,
    base_model: Path | str,
    dataset: Path,
    task: int,
    out: Path,
    **overrides: Any,
) -> trainer_pb2.StartTrainingRequest:
    lora: dict[str, Any] = dict(rank=4, alpha=8, dropout=0.0)
    training: dict[str, Any] = dict(
        learning_rate=5e-3, num_epochs=2, batch_size=4, max_seq_length=32, seed=3
    )
    balancing: dict[str, Any] = dict(focal_gamma=2.0, use_class_weights=True)
    groups = {
        **dict.fromkeys(("rank", "alpha", "dropout", "target_modules", "use_rslora"), lora),
        **dict.fromkeys(
            ("learning_rate", "num_epochs", "batch_size", "seed", "quantize_4bit"), training
        ),
        **dict.fromkeys(
            (
                "focal_gamma",
                "use_class_weights",
                "use_weighted_sampler",
                "min_samples_per_class",
                "group_separator",
            ),
            balancing,
        ),
    }
    for key, value in overrides.items():
        groups[key][key] = value
    return trainer_pb2.StartTrainingRequest(
        job_id=job_id,
        base_model=str(base_model),
        dataset=common_pb2.DatasetSpec(uri=str(dataset), task_type=task, validation_fraction=0.25),
        hyperparameters=common_pb2.Hyperparameters(
            lora=common_pb2.LoraParams(**lora),
            training=common_pb2.TrainingParams(**training),
            balancing=common_pb2.BalancingParams(**balancing),
        ),
        output_dir=str(out),
        max_new_tokens=6,
        max_eval_samples=8,
    )


async def events_of(stub: Any, job_id: str) -> list[trainer_pb2.TrainingEvent]:
    return [e async for e in stub.WatchTraining(trainer_pb2.WatchTrainingRequest(job_id=job_id))]


def kinds(events: list[trainer_pb2.TrainingEvent]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


async def test_encoder_classification_with_balancing(
    trainer: Any, payments: Path, tmp_path: Path
) -> None:
    stub, server = trainer
    out = tmp_path / "enc"
    request = job("enc", packaged_minilm_path(), payments, CLS, out, min_samples_per_class=4)
    started = await stub.StartTraining(request)
    assert started.job.job_id == "enc"
    assert started.job.state in (trainer_pb2.JOB_STATE_PENDING, trainer_pb2.JOB_STATE_RUNNING)
    events = await events_of(stub, "enc")
    names = kinds(events)
    assert names[0] == "dataset_prepared" and names[-1] == "completed", names
    assert names.count("evaluation") == 2 and "progress" in names
    prepared = events[0].dataset_prepared
    assert list(prepared.excluded_classes) == ["91.02"]  # 3 rows < 4
    assert set(prepared.labels) == {"20.01", "70.00", "68.02"}
    evaluation = [e.evaluation for e in events if e.WhichOneof("event") == "evaluation"][-1]
    assert len(evaluation.predictions) == len(evaluation.references) > 0
    assert set(evaluation.predictions) <= set(evaluation.labels)
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert progress[-1].step == progress[-1].total_steps and progress[-1].samples_per_second > 0
    assert [e.sequence for e in events] == list(range(len(events)))
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_config.json",
        "class_weights.json",
    ):
        assert (out / name).is_file(), name
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    weights = json.loads((out / "class_weights.json").read_text())
    assert "91.02" in json.dumps(weights)
    config = json.loads((out / "training_config.json").read_text())
    assert "transformers" in json.dumps(config) and "peft" in json.dumps(config)
    metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    assert 'loratune_trainer_jobs_total{outcome="completed"}' in metrics
    assert "loratune_trainer_step_seconds_count" in metrics


async def test_decoder_classification_reattach_and_warm_reuse(
    trainer: Any, sentiment: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    stub, server = trainer
    await stub.StartTraining(job("dec-1", tiny_qwen, sentiment, CLS, tmp_path / "d1"))
    # A client that loses its stream after the first events reattaches and loses nothing.
    first: list[trainer_pb2.TrainingEvent] = []
    async for event in stub.WatchTraining(trainer_pb2.WatchTrainingRequest(job_id="dec-1")):
        first.append(event)
        if len(first) == 2:
            break
    replay = await events_of(stub, "dec-1")
    assert [e.sequence for e in replay] == list(range(len(replay)))
    assert replay[:2] == first
    assert kinds(replay)[-1] == "completed"
    status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
    assert status.loaded_base_model == str(tiny_qwen) and not status.busy
    assert status.loaded_base.name == str(tiny_qwen)
    assert status.loaded_base.format == trainer_pb2.BASE_MODEL_FORMAT_TRANSFORMERS
    assert not status.loaded_base.dequantized and not status.loaded_base.gguf_file
    assert status.device.startswith("cpu")
    # The same base again: reused, and the tokenised data comes from the cache.
    await stub.StartTraining(job("dec-2", tiny_qwen, sentiment, CLS, tmp_path / "d2", seed=4))
    assert kinds(await events_of(stub, "dec-2"))[-1] == "completed"
    metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    hits = [
        line
        for line in metrics.splitlines()
        if line.startswith("loratune_trainer_tokenization_cache_hits_total ")
    ]
    assert hits and float(hits[0].split()[1]) >= 1


async def test_generation_and_qlora(
    trainer: Any, dialogues: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    stub, _ = trainer
    await stub.StartTraining(job("gen", tiny_qwen, dialogues, GEN, tmp_path / "gen", num_epochs=1))
    events = await events_of(stub, "gen")
    assert kinds(events)[-1] == "completed", events[-1]
    evaluation = next(e.evaluation for e in events if e.WhichOneof("event") == "evaluation")
    assert len(evaluation.prompts) == len(evaluation.predictions) == len(evaluation.references) > 0
    assert all(isinstance(p, str) for p in evaluation.predictions)
    await stub.StartTraining(
        job("qlora", tiny_qwen, dialogues, GEN, tmp_path / "q", num_epochs=1, quantize_4bit=True)
    )
    q_events = await events_of(stub, "qlora")
    assert kinds(q_events)[-1] == "completed", q_events[-1]
    config = json.loads((tmp_path / "q" / "training_config.json").read_text())
    assert "quantize_4bit" in json.dumps(config)


async def test_busy_idempotent_and_cancel(
    trainer: Any, sentiment: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    stub, _ = trainer
    long_job = job(
        "long", tiny_qwen, sentiment, CLS, tmp_path / "long", num_epochs=200, batch_size=1
    )
    await stub.StartTraining(long_job)
    again = await stub.StartTraining(long_job)
    assert again.job.job_id == "long"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartTraining(job("other", tiny_qwen, sentiment, CLS, tmp_path / "o"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
    assert status.busy and status.current_job_id == "long"
    async for event in stub.WatchTraining(trainer_pb2.WatchTrainingRequest(job_id="long")):
        if event.WhichOneof("event") == "progress":
            break
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stub.CancelTraining(trainer_pb2.CancelTrainingRequest(job_id="long"))
    events = await events_of(stub, "long")
    assert loop.time() - started < 10
    assert events[-1].failed.reason == trainer_pb2.FAILURE_REASON_CANCELLED
    status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
    assert not status.busy
    # Free again for the next job.
    await stub.StartTraining(job("after", tiny_qwen, sentiment, CLS, tmp_path / "a", num_epochs=1))
    assert kinds(await events_of(stub, "after"))[-1] == "completed"


def _bad(tmp_path: Path, sentiment: Path, tiny_qwen: Path) -> list[tuple[Any, str]]:
    good = dict(
        job_id="bad", base_model=tiny_qwen, dataset=sentiment, task=CLS, out=tmp_path / "bad"
    )
    single = write_jsonl(tmp_path / "one_class.jsonl", [{"text": "w1", "label": "a"}] * 6)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nofield = write_jsonl(tmp_path / "nofield.jsonl", [{"comment": "w1", "label": "a"}] * 6)
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    return [
        (job(**{**good, "base_model": tmp_path / "no-such-model"}), "base_model"),
        (job(**{**good, "dataset": tmp_path / "missing.jsonl"}), "dataset.uri"),
        (job(**{**good, "dataset": empty}), "dataset"),
        (job(**{**good, "dataset": nofield}), "dataset.text_field"),
        (job(**{**good, "dataset": single}), "dataset.label_field"),
        (job(**good, min_samples_per_class=100), "balancing.min_samples_per_class"),
        (job(**good, group_separator="\t"), "hyperparameters.balancing.group_separator"),
        (job(**good, group_separator="-----"), "hyperparameters.balancing.group_separator"),
        (job(**good, rank=0), "hyperparameters.lora.rank"),
        (job(**good, alpha=0), "hyperparameters.lora.alpha"),
        (job(**good, learning_rate=0), "hyperparameters.training.learning_rate"),
        (job(**good, batch_size=0), "hyperparameters.training.batch_size"),
        (job(**good, num_epochs=0), "hyperparameters.training.num_epochs"),
        (job(**good, dropout=1.0), "hyperparameters.lora.dropout"),
        (job(**good, target_modules=["q_proj", "nonsense"]), "hyperparameters.lora.target_modules"),
        (job(**{**good, "out": blocked / "sub"}), "output_dir"),
    ]


async def test_bad_input_names_the_field_and_trainer_keeps_serving(
    trainer: Any, sentiment: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    stub, _ = trainer
    for request, field in _bad(tmp_path, sentiment, tiny_qwen):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.StartTraining(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, caught.value)
        assert field in caught.value.details(), (field, caught.value.details())
    status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
    assert not status.busy
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CancelTraining(trainer_pb2.CancelTrainingRequest(job_id="never-started"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def raw_controls(text: str) -> list[str]:
    """Characters that forge log lines or drive a terminal (C0, DEL, C1, U+2028/9)."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")]


def formatted_logs(records: list[logging.LogRecord]) -> list[str]:
    """Each record as the services write it, plain and JSON; a plain traceback left out."""
    lines = []
    for record in records:
        plain = PlainFormatter().format(record)
        lines.append(plain.splitlines()[0] if record.exc_info or record.stack_info else plain)
        lines.append(JsonFormatter().format(record))
    return lines


async def test_names_and_paths_that_escape_the_artifact_root_are_refused(
    trainer: Any, sentiment: Path, tiny_qwen: Path, tmp_path: Path
) -> None:
    stub, _ = trainer
    good = dict(job_id="esc", base_model=tiny_qwen, dataset=sentiment, task=CLS, out=tmp_path / "e")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    os.symlink(outside, tmp_path / "link-out", target_is_directory=True)
    cases = [
        (job(**{**good, "out": Path("/etc/x")}), "output_dir"),
        (job(**{**good, "out": "../../etc"}), "output_dir"),
        (job(**{**good, "out": outside / "x"}), "output_dir"),
        (job(**{**good, "out": tmp_path / "link-out" / "x"}), "output_dir"),
        (job(**{**good, "out": tmp_path / "a\x00b"}), "output_dir"),
        (job(**{**good, "job_id": "../x"}), "job_id"),
        (job(**{**good, "job_id": "a/b"}), "job_id"),
        (job(**{**good, "job_id": ".."}), "job_id"),
        (job(**{**good, "job_id": "x" * 20_000}), "job_id"),
        (job(**{**good, "base_model": "Qwen/Qwen3\n\x1b[31m"}), "base_model"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.StartTraining(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, caught.value)
        assert caught.value.details().startswith(f"{field}: "), caught.value.details()
        assert len(caught.value.details()) < 400 and not raw_controls(caught.value.details())
    assert not outside.exists()
    for call in (
        stub.CancelTraining(trainer_pb2.CancelTrainingRequest(job_id="../x")),
        events_of(stub, "../../etc/passwd"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("job_id: ")
    status = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest())
    assert not status.busy


async def test_a_relative_output_dir_lands_under_the_root_and_logs_stay_one_line(
    trainer: Any,
    sentiment: Path,
    tiny_qwen: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    stub, _ = trainer
    forged = "\n2026-01-01 INFO forged\x1b[31m"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.StartTraining(job("bad" + forged, tiny_qwen, sentiment, CLS, tmp_path / "b"))
    assert caught.value.details().startswith("job_id: ")
    assert "bad\\n2026-01-01 INFO forged\\x1b" in caught.value.details()
    # A folder name may hold them: the path stays inside the root, and the log escapes it.
    out = f"rel/out{forged}"
    await stub.StartTraining(job("ctl", tiny_qwen, sentiment, CLS, Path(out), num_epochs=1))
    events = await events_of(stub, "ctl")
    assert kinds(events)[-1] == "completed", events[-1]
    assert events[-1].completed.artifact_dir == str((tmp_path / out).resolve())
    assert (tmp_path / out / "adapter_model.safetensors").is_file()
    lines = formatted_logs(caplog.records)
    assert any("saved adapter of job ctl" in line and "forged" in line for line in lines)
    assert any("bad\\n2026-01-01 INFO forged" in line for line in lines)
    for line in lines:
        assert not raw_controls(line), line
