"""Linear probing of a fresh head before fine-tuning: the fit, the head it sets, when it skips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from services.trainer.core import loop
from services.trainer.core import probe as probe_module
from services.trainer.core.models import BaseModelCache, PreparedModel
from services.trainer.core.probe import (
    ProbeFeatureCache,
    final_linear,
    fit_linear_probe,
    linear_probe_head,
)
from services.trainer.core.tokenize import collate
from services.trainer.core.types import LoopOptions, RunContext, Task, TrainingSpec
from tests.unit.trainer.conftest import (
    Recorder,
    classification_data,
    make_spec,
    sentiment_rows,
)


def _blobs(n_per_class: tuple[int, ...], dim: int = 6, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 2.0, size=(len(n_per_class), dim))
    x = np.concatenate(
        [rng.normal(c, 1.5, size=(n, dim)) for c, n in zip(centres, n_per_class, strict=True)]
    )
    y = np.concatenate([np.full(n, k) for k, n in enumerate(n_per_class)])
    return x.astype(np.float32), y


@pytest.mark.parametrize("balanced", [False, True])
def test_the_fit_is_scikit_learns_logistic_regression(balanced: bool) -> None:
    x, y = _blobs((60, 25, 8))
    n, k = len(y), 3
    counts = np.bincount(y)
    weight = torch.tensor(n / (k * counts), dtype=torch.float32) if balanced else None
    w, b = fit_linear_probe(
        torch.from_numpy(x), torch.from_numpy(y), k, class_weight=weight, max_iterations=500
    )
    assert b is not None
    reference = LogisticRegression(
        C=1.0, class_weight="balanced" if balanced else None, max_iter=5000, tol=1e-8
    ).fit(x, y)
    # Softmax logits are defined up to a per-row constant: compare centred logits.
    ours = (torch.from_numpy(x) @ w.T + b).numpy()
    theirs = reference.decision_function(x)
    ours -= ours.mean(axis=1, keepdims=True)
    theirs -= theirs.mean(axis=1, keepdims=True)
    assert np.abs(ours - theirs).max() < 2e-2 * np.abs(theirs).max()
    assert (ours.argmax(1) == reference.predict(x)).mean() >= 0.99


def test_the_head_is_set_to_the_probe_and_then_predicts_what_it_fits(minilm_dir: Path) -> None:
    spec = make_spec(minilm_dir, Task.CLASSIFICATION)
    cache = BaseModelCache("cpu")
    rows = sentiment_rows(32, seed=3)
    prepared = cache.acquire(spec, ["negative", "positive"])
    model = prepared.model
    head = final_linear(model, 2)
    assert head is not None and head.weight.requires_grad
    before = head.weight.detach().clone()
    _, encoded = classification_data(rows, rows[:2], prepared.tokenizer)
    pad = int(prepared.tokenizer.pad_token_id)
    batches = [collate(encoded.train[i : i + 8], pad, Task.CLASSIFICATION) for i in range(0, 32, 8)]
    result = linear_probe_head(
        model, batches, 2, prepared.device, class_weight=None, amp=loop._autocast(prepared.device)
    )
    assert result is not None and result.rows == 32
    assert not torch.equal(before, head.weight)
    model.eval()
    with torch.no_grad():
        logits = [
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            for b in batches
        ]
        predicted = torch.cat(logits).argmax(-1)
    labels = torch.cat([b["labels"] for b in batches])
    accuracy = float((predicted == labels).float().mean())
    # The model now predicts with the probed head exactly what the probe reported.
    assert accuracy == pytest.approx(result.train_accuracy)
    assert accuracy >= 0.9  # one word decides the label: frozen MiniLM features separate it
    cache.release()


def _one_batch(model_dir: Path) -> tuple[BaseModelCache, PreparedModel, dict[str, torch.Tensor]]:
    """A fresh classifier on `model_dir` and one collated batch of 8 sentiment rows."""
    cache = BaseModelCache("cpu")
    prepared = cache.acquire(make_spec(model_dir, Task.CLASSIFICATION), ["negative", "positive"])
    rows = sentiment_rows(8)
    _, encoded = classification_data(rows, rows[:2], prepared.tokenizer)
    batch = collate(encoded.train, int(prepared.tokenizer.pad_token_id), Task.CLASSIFICATION)
    return cache, prepared, batch


def test_a_stop_request_leaves_the_head_untouched(minilm_dir: Path) -> None:
    cache, prepared, batch = _one_batch(minilm_dir)
    head = final_linear(prepared.model, 2)
    assert head is not None
    before = head.weight.detach().clone()
    result = linear_probe_head(
        prepared.model,
        [batch],
        2,
        prepared.device,
        class_weight=None,
        amp=loop._autocast(prepared.device),
        should_stop=lambda: True,
    )
    assert result is None and torch.equal(before, head.weight)
    cache.release()


def test_a_decoder_head_over_every_position_is_left_as_it_is(tiny_qwen_dir: Path) -> None:
    cache, prepared, batch = _one_batch(tiny_qwen_dir)
    # Qwen's `score` sees (batch, length, hidden), not one vector per row: no probe, and
    # not even a forward pass spent finding that out.
    assert final_linear(prepared.model, 2) is None
    forwards = 0

    def count(*_: object) -> None:
        nonlocal forwards
        forwards += 1

    prepared.model.get_input_embeddings().register_forward_hook(count)
    before = [p.detach().clone() for p in prepared.model.parameters()]
    result = linear_probe_head(
        prepared.model,
        [batch],
        2,
        prepared.device,
        class_weight=None,
        amp=loop._autocast(prepared.device),
    )
    assert result is None and forwards == 0
    after = list(prepared.model.parameters())
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    cache.release()


def test_training_starts_from_the_probe(minilm_dir: Path) -> None:
    """With the probe, the first epoch's evaluation is already right on a task the frozen
    features separate; the probe's accuracy goes to TensorBoard at step 0."""
    rows = sentiment_rows(48, seed=5)

    def first_eval(probe: bool) -> tuple[float, dict[str, float]]:
        spec = make_spec(
            minilm_dir,
            Task.CLASSIFICATION,
            training=TrainingSpec(learning_rate=1e-5, num_epochs=1, batch_size=8, seed=7),
        )
        cache = BaseModelCache("cpu")
        prepared = cache.acquire(spec, ["negative", "positive"])
        data, encoded = classification_data(rows[:32], rows[32:], prepared.tokenizer)
        recorder = Recorder()
        scalars: dict[str, float] = {}

        class Scalars:
            def scalar(self, tag: str, value: float, step: int) -> None:
                scalars.setdefault(tag, value)

        result = loop.train(
            prepared,
            data,
            encoded,
            spec,
            RunContext(emit=recorder.emit, should_stop=recorder.should_stop),
            scalar_logger=Scalars(),
            options=LoopOptions(linear_probe=probe),
        )
        cache.release()
        assert result.last_eval is not None
        right = sum(
            p == r
            for p, r in zip(result.last_eval.predictions, result.last_eval.references, strict=True)
        )
        return right / len(result.last_eval.references), scalars

    with_probe, scalars = first_eval(True)
    assert "train/probe_accuracy" in scalars
    assert with_probe >= 0.8
    without_probe, scalars = first_eval(False)
    assert "train/probe_accuracy" not in scalars
    # At a tiny learning rate one epoch cannot train a random head (the head's own minimum
    # rate, 5e-3, for 4 steps): it stays near chance where the probe is already right.
    assert with_probe > without_probe


def test_a_second_job_reuses_the_frozen_features_and_gets_the_same_head(
    minilm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh adapter changes nothing before its first step, so the next trial on the same
    base and rows probes from cached features: no forward pass, the same fitted head."""
    rows = sentiment_rows(24, seed=9)
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        training=TrainingSpec(learning_rate=1e-3, num_epochs=1, batch_size=8, seed=7),
    )
    probed: list[tuple[probe_module.ProbeResult | None, torch.Tensor]] = []
    real = loop.linear_probe_head

    def spy(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        result = real(model, *args, **kwargs)  # type: ignore[arg-type]
        head = final_linear(model, 2)
        assert head is not None
        probed.append((result, head.weight.detach().clone()))
        return result

    monkeypatch.setattr(loop, "linear_probe_head", spy)
    cache = ProbeFeatureCache()
    models = BaseModelCache("cpu")

    def job(max_length: int = 32) -> None:
        prepared = models.acquire(spec, ["negative", "positive"])
        data, encoded = classification_data(rows[:16], rows[16:], prepared.tokenizer, max_length)
        recorder = Recorder()
        context = RunContext(emit=recorder.emit, should_stop=recorder.should_stop)
        loop.train(prepared, data, encoded, spec, context, probe_cache=cache)

    job()
    job()
    (first, first_head), (second, second_head) = probed
    assert first is not None and not first.cached
    assert second is not None and second.cached and second.rows == first.rows == 16
    assert cache.hits == 1 and cache.misses == 1
    assert second.train_accuracy == first.train_accuracy
    torch.testing.assert_close(second_head, first_head, rtol=0, atol=1e-6)
    # Other rows (here: another max length) are another key: computed, not reused.
    job(max_length=6)
    assert probed[2][0] is not None and not probed[2][0].cached
    models.release()


def test_the_feature_cache_keeps_the_most_recent_entries() -> None:
    cache = ProbeFeatureCache(entries=2)
    for key in ("a", "b", "c"):
        cache.put(key, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    assert cache.get("a") is None and cache.get("b") is not None
    cache.put("d", torch.ones(1, 2), torch.zeros(1, dtype=torch.long))
    assert cache.get("c") is None and cache.get("b") is not None  # b was used, c was not
    cache.clear()
    assert cache.get("b") is None
    off = ProbeFeatureCache(entries=0)
    off.put("a", torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    assert off.get("a") is None


def test_probe_only_is_the_frozen_baseline_as_a_job(minilm_dir: Path, tmp_path: Path) -> None:
    """`probe_only`: the probed head, no fine-tuning step, one evaluation, a saved adapter
    whose predictions are the evaluation's (the optimizer's baseline trial)."""
    from services.common.errors import InvalidArgument
    from services.trainer.core.artifacts import (
        load_adapter_for_inference,
        predict_labels,
        save_artifacts,
    )
    from services.trainer.core.types import EvaluationEvent, ProgressEvent
    from services.trainer.core.validation import validate_parameters

    rows = sentiment_rows(48, seed=5)
    spec = make_spec(
        minilm_dir,
        Task.CLASSIFICATION,
        tmp_path,
        training=TrainingSpec(learning_rate=1e-3, num_epochs=3, batch_size=8, probe_only=True),
    )
    validate_parameters(spec)
    cache = BaseModelCache("cpu")
    prepared = cache.acquire(spec, ["negative", "positive"])
    lora_before = {
        n: p.detach().clone() for n, p in prepared.model.named_parameters() if "lora_" in n
    }
    data, encoded = classification_data(rows[:32], rows[32:], prepared.tokenizer)
    recorder = Recorder()
    result = loop.train(
        prepared,
        data,
        encoded,
        spec,
        RunContext(emit=recorder.emit, should_stop=recorder.should_stop),
        options=LoopOptions(linear_probe=False),  # probe_only probes regardless
    )
    assert result.steps == 0 and not recorder.of(ProgressEvent)
    [evaluation] = recorder.of(EvaluationEvent)
    right = sum(p == r for p, r in zip(evaluation.predictions, evaluation.references, strict=True))
    assert right / len(evaluation.references) >= 0.8  # the frozen features separate this
    for name, parameter in prepared.model.named_parameters():
        if name in lora_before:
            assert torch.equal(parameter, lora_before[name]), name  # nothing fine-tuned
    save_artifacts(prepared, data, spec, result, tmp_path)
    loaded = load_adapter_for_inference(tmp_path, "cpu")
    texts = [text for text, _ in rows[32:]]
    assert predict_labels(loaded, texts, max_length=64) == list(evaluation.predictions)
    generation = make_spec(
        minilm_dir, Task.GENERATION, training=TrainingSpec(probe_only=True, num_epochs=1)
    )
    with pytest.raises(InvalidArgument) as caught:
        validate_parameters(generation)
    assert caught.value.field == "hyperparameters.training.probe_only"


def test_the_probe_embeds_without_computing_the_fresh_adapter(minilm_dir: Path) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    cache, prepared, batch = _one_batch(minilm_dir)
    model = prepared.model
    head = final_linear(model, 2)
    assert head is not None
    lora_calls: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_: lora_calls.append("lora_A"))
        for name, module in model.named_modules()
        if name.endswith("lora_A.default")
    ]
    assert hooks
    amp = loop._autocast(prepared.device)
    skipped = probe_module._embed(model, head, [batch], prepared.device, amp, lambda: False)
    assert skipped is not None and not lora_calls  # no LoRA matrix was computed
    # ... and the LoRA layers are back on for training, their gradients untouched.
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.disable_adapters for m in layers)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    # A fresh adapter adds exactly nothing: the features are those the adapter gives.
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    for hook in hooks:
        hook.remove()
    assert lora_calls  # this pass did go through the adapter
    torch.testing.assert_close(skipped[0], captured[0].float(), rtol=0, atol=0)
    cache.release()


def _sklearn_cv_choice(x: np.ndarray, y: np.ndarray, grid: tuple[float, ...]) -> float:
    """scikit-learn's balanced logistic regression, C by stratified 5-fold out-of-fold
    macro-F1 (the smallest C of the best): what a careful user fits as a baseline."""
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    scores = []
    for c in grid:
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        predicted = cross_val_predict(model, x, y, cv=folds)
        scores.append(f1_score(y, predicted, average="macro"))
    return grid[int(np.argmax(scores))]


def test_the_cross_validation_picks_the_regularisation_a_careful_user_would() -> None:
    # Many dimensions, few rows of the rare classes: unregularised overfits, heavy
    # regularisation underfits, so the choice matters and both ends of the grid lose.
    x, y = _blobs((80, 30, 12, 9), dim=40, seed=4)
    k = 4
    grid = probe_module.PROBE_C_GRID
    selection = probe_module.choose_probe_c(
        torch.from_numpy(x), torch.from_numpy(y), k, weighted=True
    )
    assert selection is not None
    assert set(selection.scores) == set(grid) and selection.folds == 5
    assert selection.cv_macro_f1 == max(selection.scores.values())
    # The smallest C of the best.
    assert all(selection.scores[c] < selection.cv_macro_f1 for c in grid if c < selection.c)
    # Different folds, same answer to within one step of the grid as scikit-learn's.
    theirs = _sklearn_cv_choice(x, y, grid)
    assert abs(grid.index(selection.c) - grid.index(theirs)) <= 1, (selection.c, theirs)
    # And what it fits at that C predicts held-out rows as scikit-learn's does at its C.
    x_new, y_new = _blobs((40, 40, 40, 40), dim=40, seed=4)  # same centres, new draws
    weight = probe_module.balanced_class_weight(torch.from_numpy(y), k)
    w, b = fit_linear_probe(
        torch.from_numpy(x), torch.from_numpy(y), k, class_weight=weight, c=selection.c
    )
    assert b is not None
    ours = (torch.from_numpy(x_new) @ w.T + b).argmax(-1).numpy()
    reference = LogisticRegression(C=theirs, class_weight="balanced", max_iter=5000).fit(x, y)
    from sklearn.metrics import f1_score

    assert (
        f1_score(y_new, ours, average="macro")
        >= f1_score(y_new, reference.predict(x_new), average="macro") - 0.03
    )


def test_the_weights_follow_each_folds_rows_and_the_trainers_formula() -> None:
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    weight = probe_module.balanced_class_weight(labels, 4)
    assert weight.tolist() == pytest.approx([10 / 18, 10 / 9, 10 / 3, 0.0])
    # A fold deals each class's rows round-robin: every fold holds 1-2 of the 6, and the
    # single row of class 2 is in exactly one.
    folds = probe_module._stratified_folds(labels, 3, seed=1)
    for f in range(3):
        assert int(((folds == f) & (labels == 0)).sum()) == 2
    assert int((labels == 2).sum()) == 1


def test_no_cross_validation_without_two_rows_of_any_class() -> None:
    x = torch.randn(3, 4)
    assert probe_module.choose_probe_c(x, torch.tensor([0, 1, 2]), 3, weighted=True) is None


def test_a_large_set_is_cross_validated_on_a_subset_that_keeps_every_rare_row() -> None:
    labels = torch.tensor([0] * 5000 + [1] * 3000 + [2] * 7)
    subset = probe_module._cv_subset(labels, 1000, seed=0)
    kept = torch.bincount(labels[subset], minlength=3)
    assert int(kept[2]) == 7
    assert int(subset.numel()) <= 1000 + 7
    assert int(kept[0]) == int(kept[1])  # an equal share of each large class
    assert torch.equal(subset, probe_module._cv_subset(labels, 1000, seed=0))


def test_the_chosen_c_is_kept_beside_its_features() -> None:
    cache = ProbeFeatureCache(entries=1)
    features, targets = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    selection = probe_module.ProbeSelection(c=3.0, scores={3.0: 0.9}, folds=5, rows=10)
    cache.put_selection("a", True, selection)  # no features under "a": not kept
    assert cache.selection("a", True) is None
    cache.put("a", features, targets)
    cache.put_selection("a", True, selection)
    assert cache.selection("a", True) == selection
    assert cache.selection("a", False) is None
    cache.put("b", features, targets)  # "a" dropped, its choice with it
    assert cache.selection("a", True) is None
