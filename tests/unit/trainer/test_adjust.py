"""Logit adjustment: the post-hoc tau chosen on validation, folded into the saved head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.trainer.core import loop
from services.trainer.core.adjust import (
    TAU_GRID,
    LogitAdjustedLoss,
    choose_tau,
    folded,
    log_prior,
)
from services.trainer.core.artifacts import (
    LoadedAdapter,
    load_adapter_for_inference,
    predict_labels,
    save_artifacts,
)
from services.trainer.core.balancing import FocalLoss
from services.trainer.core.models import BaseModelCache
from services.trainer.core.types import (
    BalancingSpec,
    EvaluationEvent,
    RunContext,
    Task,
    TrainingSpec,
)
from tests.unit.trainer.conftest import Recorder, classification_data, make_spec


def test_the_prior_is_the_training_frequencies_in_label_order() -> None:
    prior = log_prior({"a": 30, "b": 10}, ["b", "a"])
    torch.testing.assert_close(prior.exp(), torch.tensor([0.25, 0.75]))


def test_choose_tau_undoes_a_bias_towards_the_head_class() -> None:
    # Logits favour the frequent class "a" by a margin; the rare class "b" is never predicted.
    truth = ["a"] * 30 + ["b"] * 10
    scores = torch.tensor([[2.0, 0.5]] * 30 + [[1.5, 1.0]] * 10)
    prior = log_prior({"a": 90, "b": 10}, ["a", "b"])
    tau, predictions = choose_tau(scores, prior, truth, ["a", "b"])
    assert tau > 0 and tau in TAU_GRID
    assert predictions == truth  # the adjustment moves the rare rows over, not the head rows
    # Already balanced logits keep tau 0 (the smallest of equals).
    tau, _ = choose_tau(
        torch.tensor([[2.0, 0.0]] * 30 + [[0.0, 2.0]] * 10), prior, truth, ["a", "b"]
    )
    assert tau == 0.0


def test_the_adjusted_loss_is_the_inner_loss_on_shifted_logits() -> None:
    prior = log_prior({"a": 3, "b": 1}, ["a", "b"])
    inner = FocalLoss(0.0)
    loss = LogitAdjustedLoss(inner, prior, 1.0)
    logits, targets = torch.randn(5, 2), torch.tensor([0, 1, 1, 0, 1])
    torch.testing.assert_close(loss(logits, targets), inner(logits + prior, targets))


def test_folded_adds_the_offsets_only_while_inside() -> None:
    head = torch.nn.Linear(3, 2)
    before = head.bias.detach().clone()
    offsets = torch.tensor([0.5, -1.0])
    with folded(head, offsets):
        torch.testing.assert_close(head.bias.detach(), before + offsets)
    torch.testing.assert_close(head.bias.detach(), before)


def _tail_rows() -> list[tuple[str, str]]:
    # "rare" shares words with "common"; the frozen probe leans to the common class.
    common = [(f"please pay the card bill w{i % 9} today", "common") for i in range(40)]
    rare = [(f"please pay the card bill w{i % 9} fee", "rare") for i in range(6)]
    return common + rare


def test_the_saved_adapter_predicts_what_the_adjusted_evaluation_scored(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The frozen features separate these rows, so the grid would keep tau 0: force tau 2 to
    # see the fold carry the adjustment into the saved head.
    real = loop.choose_tau
    monkeypatch.setattr(loop, "choose_tau", lambda *a, **k: real(*a, grid=(2.0,)))
    rows = _tail_rows()
    train_rows = rows[:34] + rows[40:43]
    validation = rows[34:40] + rows[43:]
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        tmp_path,
        training=TrainingSpec(learning_rate=1e-3, num_epochs=1, batch_size=8, probe_only=True),
        balancing=BalancingSpec(
            focal_gamma=0.0, use_class_weights=False, posthoc_logit_adjustment=True
        ),
    )
    cache = BaseModelCache("cpu")
    prepared = cache.acquire(spec, ["common", "rare"])
    data, encoded = classification_data(train_rows, validation, prepared.tokenizer)
    recorder = Recorder()
    result = loop.train(
        prepared, data, encoded, spec, RunContext(recorder.emit, recorder.should_stop)
    )
    [evaluation] = recorder.of(EvaluationEvent)
    assert evaluation.posthoc_tau == 2.0
    save_artifacts(prepared, data, spec, result, tmp_path)
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["result"]["posthoc_logit_adjustment_tau"] == evaluation.posthoc_tau
    loaded = load_adapter_for_inference(tmp_path, "cpu")
    texts = [text for text, _ in validation]
    assert predict_labels(loaded, texts, max_length=64) == list(evaluation.predictions)
    # The model in memory has no adjustment (it was folded only while saving): it differs.
    raw = LoadedAdapter(prepared.model, prepared.tokenizer, prepared.labels, Task.CLASSIFICATION)
    assert predict_labels(raw, texts, max_length=64) != list(evaluation.predictions)


def test_two_stage_refits_the_head_for_evaluation_without_changing_training(
    minilm_dir: Path, tmp_path: Path
) -> None:
    from services.trainer.core.probe import final_linear
    from services.trainer.core.types import ProgressEvent

    rows = _tail_rows()
    train_rows, validation = rows[:34] + rows[40:43], rows[34:40] + rows[43:]

    def job(two_stage: bool, out: Path) -> tuple[list[float], torch.Tensor, Recorder, object]:
        spec = make_spec(
            minilm_dir,
            Task.CLASSIFICATION,
            out,
            training=TrainingSpec(learning_rate=2e-3, num_epochs=2, batch_size=8, seed=4),
            balancing=BalancingSpec(focal_gamma=0.0, use_class_weights=False, two_stage=two_stage),
        )
        cache = BaseModelCache("cpu")
        prepared = cache.acquire(spec, ["common", "rare"])
        data, encoded = classification_data(train_rows, validation, prepared.tokenizer)
        recorder = Recorder()
        result = loop.train(
            prepared, data, encoded, spec, RunContext(recorder.emit, recorder.should_stop, 1)
        )
        save_artifacts(prepared, data, spec, result, out)
        head = final_linear(prepared.model, 2)
        assert head is not None
        losses = [e.loss for e in recorder.of(ProgressEvent)]
        return losses, head.weight.detach().clone(), recorder, prepared

    plain_losses, plain_head, _, _ = job(False, tmp_path / "plain")
    losses, head, recorder, _ = job(True, tmp_path / "two")
    # Every step trains exactly as without the re-fit: the trained head comes back after
    # each earlier epoch's evaluation.
    assert losses == plain_losses
    # The last epoch keeps the re-fitted, class-balanced head.
    assert not torch.allclose(head, plain_head)
    last = recorder.of(EvaluationEvent)[-1]
    loaded = load_adapter_for_inference(tmp_path / "two", "cpu")
    texts = [text for text, _ in validation]
    assert predict_labels(loaded, texts, max_length=64) == list(last.predictions)
