"""Hierarchical codes: the group map, the group head trained beside the code head, and the
combined prediction the evaluation scores and the reloaded adapter repeats."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from services.trainer.core import loop
from services.trainer.core.artifacts import (
    load_adapter_for_inference,
    predict_labels,
    save_artifacts,
)
from services.trainer.core.hierarchy import (
    GROUP_HEAD_FILE,
    GroupHead,
    LabelGroups,
    combine,
    group_of,
)
from services.trainer.core.models import BaseModelCache
from services.trainer.core.types import (
    BalancingSpec,
    EvaluationEvent,
    RunContext,
    Task,
    TrainingSpec,
)
from tests.unit.trainer.conftest import Recorder, classification_data, make_spec, sentiment_rows


def test_a_labels_group_is_its_part_before_the_first_separator() -> None:
    assert group_of("60.01", ".") == "60"
    assert group_of("60.01.2", ".") == "60"
    assert group_of("card_arrival", "_") == "card"
    assert group_of("misc", ".") == "misc"  # no separator: its own group
    assert group_of("60.01", "") == "60.01"
    assert group_of("a::b", "::") == "a"


def test_the_group_map_follows_the_heads_label_order() -> None:
    groups = LabelGroups.from_labels(["60.02", "misc", "61.01", "60.01"], ".")
    assert groups.groups == ("60", "61", "misc")
    assert groups.code_groups == (0, 2, 1, 0)
    assert groups.useful
    labels = ["60.02", "misc", "61.01", "60.01"]
    assert LabelGroups.from_json(groups.to_json(labels), labels) == groups
    # One group, or as many groups as labels: the hierarchy says nothing.
    assert not LabelGroups.from_labels(["60.01", "60.02"], ".").useful
    assert not LabelGroups.from_labels(["a", "b", "c"], ".").useful


def test_the_score_adds_the_groups_log_probability_to_the_codes() -> None:
    code_logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    group_logits = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    code_groups = torch.tensor([0, 0, 1])  # codes 0 and 1 in group 0, code 2 in group 1

    scores = combine(code_logits, group_logits, code_groups)

    def log_softmax(row: list[float]) -> list[float]:
        total = math.log(sum(math.exp(v) for v in row))
        return [v - total for v in row]

    for row in range(2):
        codes = log_softmax(code_logits[row].tolist())
        groups = log_softmax(group_logits[row].tolist())
        expected = [codes[c] + groups[int(code_groups[c])] for c in range(3)]
        torch.testing.assert_close(scores[row], torch.tensor(expected))
    # The code head alone picks code 0; its group is unlikely, so the combination picks code 2.
    assert code_logits[0].argmax() == 0 and scores[0].argmax() == 2
    # Equal codes: the likelier group decides.
    assert scores[1].argmax() in (0, 1)


def test_the_group_head_keeps_what_the_code_heads_layer_sees() -> None:
    layer = torch.nn.Linear(4, 3)
    head = GroupHead(LabelGroups.from_labels(["a_x", "a_y", "b_x"], "_"), 4, seed=3)
    head.attach(layer)
    features = torch.randn(5, 4)
    code_logits = layer(features)
    scores = head.scores(code_logits)
    torch.testing.assert_close(scores, combine(code_logits, head(features), head.code_groups))
    with pytest.raises(RuntimeError):
        head.scores(torch.zeros(5, 3))  # each forward's features are used once
    # The same seed gives the same fresh head.
    again = GroupHead(head.groups, 4, seed=3)
    torch.testing.assert_close(again.linear.weight, head.linear.weight)
    head.detach()


def _intent_rows() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    # banking77-style intents: two groups ("card", "cash") of two codes each.
    templates = {
        "card_arrival": "my new card has not arrived yet {}",
        "card_lost": "i think i lost my card {}",
        "cash_fee": "why was i charged a fee for taking out cash {}",
        "cash_limit": "how much cash can i withdraw in one day {}",
    }
    fillers = ["today", "please", "again", "now", "sadly", "at once", "friend", "still"]
    train, validation = [], []
    for label, template in templates.items():
        rows = [(template.format(filler), label) for filler in fillers]
        train += rows[:6]
        validation += rows[6:]
    return train, validation


def test_a_job_with_a_separator_trains_a_group_head_the_reloaded_adapter_uses(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[torch.Tensor] = []
    real_fit = GroupHead.fit

    def fit_and_keep(self: GroupHead, features: torch.Tensor, targets: torch.Tensor) -> None:
        real_fit(self, features, targets)
        probed.append(self.linear.weight.detach().clone())

    monkeypatch.setattr(GroupHead, "fit", fit_and_keep)
    train_rows, validation = _intent_rows()
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        tmp_path,
        training=TrainingSpec(learning_rate=2e-3, num_epochs=2, batch_size=8, seed=5),
        balancing=BalancingSpec(focal_gamma=0.0, use_class_weights=False, group_separator="_"),
    )
    labels = sorted({label for _, label in train_rows})
    prepared = BaseModelCache("cpu").acquire(spec, labels)
    data, encoded = classification_data(train_rows, validation, prepared.tokenizer)
    recorder = Recorder()
    result = loop.train(
        prepared, data, encoded, spec, RunContext(recorder.emit, recorder.should_stop, 1)
    )

    head = prepared.group_head
    assert head is not None and head.groups.groups == ("card", "cash")
    # The linear probe fitted the group head on the frozen features, then training moved it.
    [after_probe] = probed
    assert not torch.allclose(head.linear.weight.detach(), after_probe)
    last = recorder.of(EvaluationEvent)[-1]
    save_artifacts(prepared, data, spec, result, tmp_path)
    assert (tmp_path / GROUP_HEAD_FILE).is_file()
    config = json.loads((tmp_path / "training_config.json").read_text())
    assert config["hierarchy"]["label_groups"] == {
        "card_arrival": "card",
        "card_lost": "card",
        "cash_fee": "cash",
        "cash_limit": "cash",
    }
    assert config["hyperparameters"]["balancing"]["group_separator"] == "_"

    loaded = load_adapter_for_inference(tmp_path, "cpu")
    assert loaded.group_head is not None and loaded.group_head.groups == head.groups
    torch.testing.assert_close(loaded.group_head.linear.weight, head.linear.weight)
    texts = [text for text, _ in validation]
    assert predict_labels(loaded, texts, max_length=64) == list(last.predictions)
    # The reloaded adapter combines both heads: its scores are the evaluation's formula.
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        code_logits = loaded.model(**batch).logits
        scores = loaded.group_head.scores(code_logits)
    assert [labels[i] for i in scores.argmax(-1).tolist()] == list(last.predictions)


def test_without_a_useful_hierarchy_nothing_changes(
    minilm_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = sentiment_rows(40, seed=2)

    def job(separator: str, out: Path) -> tuple[EvaluationEvent, object]:
        spec = make_spec(
            minilm_dir,
            Task.CLASSIFICATION,
            out,
            training=TrainingSpec(learning_rate=1e-3, num_epochs=1, batch_size=8, probe_only=True),
            balancing=BalancingSpec(
                focal_gamma=0.0, use_class_weights=False, group_separator=separator
            ),
        )
        prepared = BaseModelCache("cpu").acquire(spec, ["negative", "positive"])
        data, encoded = classification_data(rows[:28], rows[28:], prepared.tokenizer)
        recorder = Recorder()
        result = loop.train(
            prepared, data, encoded, spec, RunContext(recorder.emit, recorder.should_stop)
        )
        assert prepared.group_head is None
        out.mkdir(parents=True, exist_ok=True)
        (out / GROUP_HEAD_FILE).write_bytes(b"an earlier run's")
        save_artifacts(prepared, data, spec, result, out)
        [evaluation] = recorder.of(EvaluationEvent)
        return evaluation, json.loads((out / "training_config.json").read_text())

    off, off_config = job("", tmp_path / "off")
    with caplog.at_level(logging.INFO, logger="services.trainer.core.hierarchy"):
        # "negative" and "positive" have no "_": each is its own group, as many as labels.
        noop, noop_config = job("_", tmp_path / "noop")
    assert "no group head" in caplog.text
    assert list(noop.predictions) == list(off.predictions)
    assert noop.eval_loss == off.eval_loss
    for out, config in ((tmp_path / "off", off_config), (tmp_path / "noop", noop_config)):
        assert not (out / GROUP_HEAD_FILE).exists()
        assert config["hierarchy"] is None  # type: ignore[index]
        assert load_adapter_for_inference(out, "cpu").group_head is None


def test_the_evaluation_and_the_reloaded_adapter_both_follow_the_group_head(
    minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A group head certain of "cash" whatever the text: every prediction must be a cash
    # code, in the evaluation and from the reloaded adapter alike, though the code head
    # alone tells the card rows apart.
    def certain_of_cash(self: GroupHead, features: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(torch.tensor([0.0, 30.0]))

    monkeypatch.setattr(GroupHead, "fit", certain_of_cash)
    train_rows, validation = _intent_rows()
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        tmp_path,
        training=TrainingSpec(learning_rate=1e-3, num_epochs=1, batch_size=8, probe_only=True),
        balancing=BalancingSpec(focal_gamma=0.0, use_class_weights=False, group_separator="_"),
    )
    labels = sorted({label for _, label in train_rows})
    prepared = BaseModelCache("cpu").acquire(spec, labels)
    data, encoded = classification_data(train_rows, validation, prepared.tokenizer)
    recorder = Recorder()
    result = loop.train(
        prepared, data, encoded, spec, RunContext(recorder.emit, recorder.should_stop)
    )
    [evaluation] = recorder.of(EvaluationEvent)
    assert {p.split("_")[0] for p in evaluation.predictions} == {"cash"}
    assert any(r.startswith("card") for r in evaluation.references)
    save_artifacts(prepared, data, spec, result, tmp_path)
    loaded = load_adapter_for_inference(tmp_path, "cpu")
    texts = [text for text, _ in validation]
    assert predict_labels(loaded, texts, max_length=64) == list(evaluation.predictions)
    # Without its group head the same adapter predicts card codes for the card rows.
    alone = predict_labels(loaded._replace(group_head=None), texts, max_length=64)
    assert any(p.startswith("card") for p in alone)
