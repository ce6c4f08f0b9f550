"""QLoRA on the CPU trains the same whether or not the CPU has AVX512-BF16.

bitsandbytes decides from the CPU's flags (`has_avx512bf16()`, read into each Linear4bit's
`support_avx512bf16_for_cpu`) whether an eval-mode forward repacks the 4-bit weights. These
tests force that decision on and off, so both paths run on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.trainer.core.artifacts import load_adapter_for_inference, save_artifacts
from services.trainer.core.loop import train
from services.trainer.core.models import BaseModelCache
from services.trainer.core.quantized import (
    REPACK_SWITCH,
    disable_cpu_repacking,
    four_bit_layers,
    has_repacked_weights,
)
from services.trainer.core.types import EvaluationEvent, RunContext, Task, TrainingSpec
from tests.unit.trainer.conftest import (
    Recorder,
    build_tiny_qwen,
    echo_rows,
    generation_data,
    make_spec,
)

bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")
bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(scope="module")
def qwen64_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 of hidden size 64: the block size, so repacking is possible on it."""
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3-h64"), hidden_size=64)


@pytest.fixture(params=["flag-on", "flag-off"])
def cpu_flag(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Linear4bit layers built from now on see a CPU with (or without) AVX512-BF16."""
    forced = request.param == "flag-on"
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: forced)
    yield forced


@pytest.fixture
def repack_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts bitsandbytes' repacking (and still repacks, for the control test)."""
    calls: list[int] = []
    real = bnb_modules._convert_weight_packed_for_cpu

    def spy(weight: torch.Tensor, state: object) -> object:
        calls.append(1)
        return real(weight, state)

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", spy)
    return calls


def _context(recorder: Recorder) -> RunContext:
    return RunContext(emit=recorder.emit, should_stop=recorder.should_stop)


def _qlora_spec(base: Path, out: Path, epochs: int = 2) -> object:
    return make_spec(
        base,
        Task.GENERATION,
        out,
        training=TrainingSpec(
            learning_rate=1e-2, num_epochs=epochs, batch_size=4, quantize_4bit=True, seed=3
        ),
        max_new_tokens=2,
    )


def _job(base: Path, out: Path) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Train 2 epochs (evaluating after each), save, reload: eval losses and both logits."""
    spec = _qlora_spec(base, out)
    prepared = BaseModelCache("cpu").acquire(spec, [])  # type: ignore[arg-type]
    assert four_bit_layers(prepared.model)
    assert not any(getattr(layer, REPACK_SWITCH) for layer in four_bit_layers(prepared.model))
    rows = echo_rows(16, seed=11)
    data, encoded = generation_data(rows[:12], rows[12:], prepared.tokenizer)
    recorder = Recorder()
    result = train(prepared, data, encoded, spec, _context(recorder))  # type: ignore[arg-type]
    assert not has_repacked_weights(prepared.model)
    save_artifacts(prepared, data, spec, result, out)  # type: ignore[arg-type]
    inputs = torch.tensor([list(encoded.validation[0].input_ids)])
    prepared.model.eval()
    with torch.inference_mode():
        before = prepared.model(input_ids=inputs).logits
    loaded = load_adapter_for_inference(out, "cpu")
    with torch.inference_mode():
        after = loaded.model(input_ids=inputs).logits
    assert not has_repacked_weights(loaded.model)
    return [e.eval_loss for e in recorder.of(EvaluationEvent)], before, after


@pytest.mark.slow
def test_a_qlora_job_trains_evaluates_trains_saves_and_reloads_the_same_on_any_cpu(
    qwen64_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repack_calls: list[int]
) -> None:
    runs = {}
    for forced in (True, False):
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda forced=forced: forced)
        runs[forced] = _job(qwen64_dir, tmp_path / f"flag-{forced}")
    assert repack_calls == []  # no forward of the job (eval, generate, reload) repacked
    (on_losses, on_before, on_after), (off_losses, off_before, off_after) = runs[True], runs[False]
    assert len(on_losses) == 2
    # Training after the first evaluation is the training a fresh job does: identical.
    assert on_losses == off_losses
    torch.testing.assert_close(on_before, off_before, atol=0, rtol=0)
    torch.testing.assert_close(on_after, on_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off_after, off_before, atol=1e-5, rtol=1e-5)


def test_bitsandbytes_repacks_an_eval_forward_when_the_flag_is_on(
    cpu_flag: bool, repack_calls: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: without the trainer's switch, bitsandbytes repacks in eval (flag on)."""
    layer = bnb_modules.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32)
    layer = layer.to("cpu")
    layer.weight = bnb_modules.Params4bit(
        torch.randn(64, 64), requires_grad=False, quant_type="nf4", module=layer
    ).to("cpu")
    assert getattr(layer, REPACK_SWITCH) is cpu_flag
    layer.eval()
    # The packed kernel needs the real instructions: only the decision is exercised here.
    monkeypatch.setattr(bnb_modules.bnb, "matmul_4bit", lambda x, w, bias=None, quant_state=None: x)
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert len(repack_calls) == (1 if cpu_flag else 0)
    assert has_repacked_weights(layer) is cpu_flag
    disable_cpu_repacking(layer)
    assert getattr(layer, REPACK_SWITCH) is False


def test_the_loaded_base_never_repacks_whatever_the_cpu(
    qwen64_dir: Path, cpu_flag: bool, repack_calls: list[int]
) -> None:
    spec = _qlora_spec(qwen64_dir, Path(""), epochs=1)
    prepared = BaseModelCache("cpu").acquire(spec, [])  # type: ignore[arg-type]
    layers = four_bit_layers(prepared.model)
    assert len(layers) == 14  # 7 linear layers x 2 decoder layers, never lm_head
    assert not any(getattr(layer, REPACK_SWITCH) for layer in layers)
    prepared.model.eval()
    with torch.inference_mode():
        prepared.model(input_ids=torch.tensor([[4, 5, 6, 7]]))
    assert repack_calls == []


def test_a_cached_base_with_repacked_weights_is_loaded_again(qwen64_dir: Path) -> None:
    spec = _qlora_spec(qwen64_dir, Path(""), epochs=1)
    cache = BaseModelCache("cpu")
    first = cache.acquire(spec, [])  # type: ignore[arg-type]
    inputs = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.inference_mode():
        fresh = first.model(input_ids=inputs).logits
    # Something outside the trainer's control repacks one layer (pure torch: any CPU).
    layer = four_bit_layers(first.model)[0]
    layer.weight.data, layer.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    assert has_repacked_weights(first.model)
    second = cache.acquire(spec, [])  # type: ignore[arg-type]
    assert not second.base_reused
    assert not has_repacked_weights(second.model)
    with torch.inference_mode():
        again = second.model(input_ids=inputs).logits
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)
    # And a clean base is reused as before.
    assert cache.acquire(spec, []).base_reused  # type: ignore[arg-type]


def _bf16_losses(base: Path, cpu_bf16: bool) -> tuple[list[float], set[torch.dtype]]:
    """Two epochs of a QLoRA job on a cache with `cpu_bf16`: eval losses, 4-bit compute dtypes."""
    from services.trainer.core.types import LoopOptions

    spec = _qlora_spec(base, Path(""))
    cache = BaseModelCache("cpu", cpu_bf16=cpu_bf16)
    prepared = cache.acquire(spec, [])  # type: ignore[arg-type]
    layers = four_bit_layers(prepared.model)
    assert layers and not any(getattr(layer, REPACK_SWITCH) for layer in layers)
    rows = echo_rows(16, seed=11)
    data, encoded = generation_data(rows[:12], rows[12:], prepared.tokenizer)
    recorder = Recorder()
    options = LoopOptions(cpu_bf16=cpu_bf16)
    train(prepared, data, encoded, spec, _context(recorder), options=options)  # type: ignore[arg-type]
    assert not has_repacked_weights(prepared.model)
    dtypes = {layer.compute_dtype for layer in layers}
    cache.release()
    return [e.eval_loss for e in recorder.of(EvaluationEvent)], dtypes


@pytest.mark.slow
def test_a_bf16_qlora_job_computes_in_bf16_never_repacks_and_learns_like_float32(
    qwen64_dir: Path, monkeypatch: pytest.MonkeyPatch, repack_calls: list[int]
) -> None:
    fp32, fp32_dtypes = _bf16_losses(qwen64_dir, cpu_bf16=False)
    assert fp32_dtypes == {torch.float32}
    for forced in (True, False):  # bitsandbytes' bfloat16 repacking needs AVX512-BF16
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda forced=forced: forced)
        bf16, dtypes = _bf16_losses(qwen64_dir, cpu_bf16=True)
        assert dtypes == {torch.bfloat16}
        assert len(bf16) == 2 and bf16[1] < bf16[0]
        # The same learning within bfloat16's rounding.
        assert bf16 == pytest.approx(fp32, rel=0.05)
    assert repack_calls == []
