"""Ensembles: each trial's saved validation log-probabilities, and a published ensemble
reloaded as one model that predicts what the study scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.ensembles import ENSEMBLE_FILE, SCORES_KEY, VALIDATION_SCORES_FILE
from services.common.errors import InvalidArgument
from services.optimizer.core.results import publish_ensemble
from services.trainer.core.artifacts import (
    LoadedAdapter,
    LoadedEnsemble,
    load_adapter_for_inference,
    predict_labels,
    save_artifacts,
)
from services.trainer.core.loop import train
from services.trainer.core.models import BaseModelCache
from services.trainer.core.types import EvaluationEvent, RunContext, Task, TrainingSpec
from tests.unit.trainer.conftest import Recorder, classification_data, make_spec, sentiment_rows

LABELS = ["negative", "positive"]


def _trial(base: Path, out_dir: Path, seed: int, lr: float) -> tuple[list[str], EvaluationEvent]:
    """Trains and saves a tiny classifier; (validation texts, its last evaluation)."""
    spec = make_spec(
        base,
        Task.CLASSIFICATION,
        out_dir,
        training=TrainingSpec(learning_rate=lr, num_epochs=1, batch_size=4, seed=seed),
    )
    prepared = BaseModelCache("cpu").acquire(spec, LABELS)
    rows = sentiment_rows(28, seed=seed)
    data, encoded = classification_data(rows[:16], rows[16:], prepared.tokenizer)
    recorder = Recorder()
    context = RunContext(emit=recorder.emit, should_stop=recorder.should_stop)
    result = train(prepared, data, encoded, spec, context)
    save_artifacts(prepared, data, spec, result, out_dir, {"torch": "x"})
    assert result.last_eval is not None
    return [text for text, _ in rows[16:]], result.last_eval


def _log_probs(loaded: LoadedAdapter, texts: list[str]) -> torch.Tensor:
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return torch.log_softmax(loaded.model(**batch).logits.float(), dim=-1)


def test_a_trial_saves_the_log_probabilities_it_was_scored_with(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    texts, evaluation = _trial(tiny_qwen_dir, tmp_path / "trial-0", seed=3, lr=2e-2)
    saved = load_file(str(tmp_path / "trial-0" / VALIDATION_SCORES_FILE))[SCORES_KEY]
    assert saved.dtype == torch.float16 and saved.shape == (len(texts), 2)
    # Rows in validation order; the argmax is what the evaluation predicted.
    assert [LABELS[i] for i in saved.argmax(-1).tolist()] == list(evaluation.predictions)
    # And the reloaded adapter gives the same log-probabilities.
    loaded = load_adapter_for_inference(tmp_path / "trial-0", "cpu")
    assert isinstance(loaded, LoadedAdapter)
    torch.testing.assert_close(_log_probs(loaded, texts), saved.float(), atol=2e-2, rtol=0)


def test_a_published_ensemble_reloads_and_predicts_its_members_mean(
    tiny_qwen_dir: Path, tmp_path: Path
) -> None:
    texts, _ = _trial(tiny_qwen_dir, tmp_path / "trial-2", seed=5, lr=2e-2)
    _trial(tiny_qwen_dir, tmp_path / "trial-7", seed=6, lr=5e-3)
    folder = publish_ensemble(
        [(7, tmp_path / "trial-7"), (2, tmp_path / "trial-2")], tmp_path / "models", "study"
    )
    manifest = json.loads((folder / ENSEMBLE_FILE).read_text())
    assert manifest["members"] == ["trial-7", "trial-2"] and manifest["trials"] == [7, 2]
    assert (folder / "trial-2" / "adapter_config.json").is_file()
    ensemble = load_adapter_for_inference(folder, "cpu")
    assert isinstance(ensemble, LoadedEnsemble)
    assert ensemble.labels == tuple(LABELS) and ensemble.trials == (7, 2)
    members = [load_adapter_for_inference(tmp_path / n, "cpu") for n in ("trial-7", "trial-2")]
    mean = sum(_log_probs(m, texts) for m in members if isinstance(m, LoadedAdapter))
    assert isinstance(mean, torch.Tensor)
    assert predict_labels(ensemble, texts) == [LABELS[i] for i in mean.argmax(-1).tolist()]


@pytest.mark.parametrize(
    "manifest",
    [
        {"members": ["../elsewhere"]},
        {"members": []},
        {"members": ["trial-0"], "combine": "vote"},
        ["trial-0"],
    ],
)
def test_a_manifest_that_cannot_be_used_is_a_clear_error(tmp_path: Path, manifest: object) -> None:
    (tmp_path / ENSEMBLE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(InvalidArgument) as caught:
        load_adapter_for_inference(tmp_path, "cpu")
    assert caught.value.field == "adapter_dir" and ENSEMBLE_FILE in caught.value.message
