"""bfloat16 autocast on the CPU (LoopOptions.cpu_bf16): detection, the attention switch,
and training to the same quality as float32, forced on whatever this CPU has (torch
emulates bfloat16 where the CPU lacks it: slower, same numbers)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from services.trainer.config import TrainerSettings
from services.trainer.core import models
from services.trainer.core.loop import _autocast, train
from services.trainer.core.models import BaseModelCache, autocast_dtype, cpu_has_native_bf16
from services.trainer.core.types import (
    BalancingSpec,
    EvaluationEvent,
    LoopOptions,
    LoraSpec,
    RunContext,
    Task,
    TrainingSpec,
)
from services.trainer.main import loop_options
from tests.unit.trainer.conftest import (
    Recorder,
    classification_data,
    make_spec,
    sentiment_rows,
)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f {extra}
bogomips\t: 4000.00
"""


@pytest.mark.parametrize(
    ("extra", "native"),
    [("avx512_bf16", True), ("amx_bf16 amx_tile", True), ("avx512vl", False), ("", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, extra: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=extra))
    assert cpu_has_native_bf16(cpuinfo) is native
    assert cpu_has_native_bf16(tmp_path / "missing") is False


def test_autocast_on_the_cpu_follows_the_option_and_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu) is None  # the default keeps float32 (load dtypes, exports)
    assert autocast_dtype(cpu, cpu_bf16=True) is torch.bfloat16
    assert autocast_dtype(cpu, cpu_bf16=False) is None
    monkeypatch.setattr(models, "_native_bf16", False)
    assert autocast_dtype(cpu, cpu_bf16=None) is None
    monkeypatch.setattr(models, "_native_bf16", True)
    assert autocast_dtype(cpu, cpu_bf16=None) is torch.bfloat16
    with _autocast(cpu, None)():
        assert torch.get_autocast_dtype("cpu") is torch.bfloat16
        assert torch.is_autocast_enabled("cpu")
    with _autocast(cpu, False)():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("true", True), ("false", False)])
def test_the_deployment_chooses_with_loratune_trainer_cpu_bf16(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool | None
) -> None:
    monkeypatch.setenv("LORATUNE_TRAINER_CPU_BF16", value)
    assert loop_options(TrainerSettings()).cpu_bf16 is expected


def _train(model_dir: Path, cache: BaseModelCache, cpu_bf16: bool) -> tuple[list[float], float]:
    """Two epochs of the sentiment task; (evaluation losses, validation accuracy)."""
    spec = make_spec(
        model_dir,
        Task.CLASSIFICATION,
        lora=LoraSpec(rank=8, alpha=16.0, dropout=0.0),
        training=TrainingSpec(learning_rate=2e-3, num_epochs=2, batch_size=8, seed=3),
        balancing=BalancingSpec(focal_gamma=0.0, use_class_weights=False),
    )
    prepared = cache.acquire(spec, ["negative", "positive"])
    rows = sentiment_rows(72, seed=4)
    data, encoded = classification_data(rows[:48], rows[48:], prepared.tokenizer)
    recorder = Recorder()
    context = RunContext(emit=recorder.emit, should_stop=recorder.should_stop)
    train(prepared, data, encoded, spec, context, options=LoopOptions(cpu_bf16=cpu_bf16))
    base = prepared.model.get_base_model()
    used = base.config._attn_implementation
    assert used == ("eager" if cpu_bf16 else "sdpa"), used
    evaluations = recorder.of(EvaluationEvent)
    last = evaluations[-1]
    accuracy = sum(p == r for p, r in zip(last.predictions, last.references, strict=True)) / len(
        last.references
    )
    return [e.eval_loss for e in evaluations], accuracy


def test_bf16_on_the_cpu_trains_minilm_to_the_same_quality(minilm_dir: Path) -> None:
    # One cached base for the three jobs: the bfloat16 job switches attention to eager and
    # the float32 job after it gets the loaded implementation back.
    cache = BaseModelCache("cpu")
    fp32_losses, fp32_accuracy = _train(minilm_dir, cache, cpu_bf16=False)
    bf16_losses, bf16_accuracy = _train(minilm_dir, cache, cpu_bf16=True)
    again_losses, _ = _train(minilm_dir, cache, cpu_bf16=False)
    assert again_losses == pytest.approx(fp32_losses, rel=1e-5)  # float32 is float32 again
    assert all(math.isfinite(loss) for loss in bf16_losses)
    # Same learning: both lower the loss, land within bfloat16's noise of each other, and
    # classify the held-out rows as well.
    assert bf16_losses[-1] < bf16_losses[0] or bf16_losses[-1] < 0.05
    assert bf16_losses[-1] == pytest.approx(fp32_losses[-1], abs=0.05)
    assert fp32_accuracy >= 0.9 and bf16_accuracy >= fp32_accuracy - 1 / 24


def test_a_bf16_cache_holds_the_frozen_base_in_bf16_and_trains_in_float32(
    minilm_dir: Path,
) -> None:
    cache = BaseModelCache("cpu", cpu_bf16=True)
    losses, accuracy = _train(minilm_dir, cache, cpu_bf16=True)
    model = cache.acquire(
        make_spec(minilm_dir, Task.CLASSIFICATION), ["negative", "positive"]
    ).model
    frozen = {
        p.dtype
        for name, p in model.named_parameters()
        if not p.requires_grad and "classifier" not in name
    }
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16}  # the encoder; the head is float32 throughout
    # LoRA and the head train in float32 (AdamW on bfloat16 weights loses small updates).
    assert trainable == {torch.float32}
    assert losses[-1] < losses[0] or losses[-1] < 0.05
    assert accuracy >= 0.9
    cache.release()
