"""A trial's artifacts: the adapter, its training record, class weights, TensorBoard curves."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from torch import nn

from services.common.ensembles import (
    ENSEMBLE_FILE,
    MAX_SCORE_CELLS,
    SCORES_KEY,
    VALIDATION_SCORES_FILE,
    read_manifest,
)
from services.common.errors import InvalidArgument
from services.trainer.core.adjust import folded, log_prior
from services.trainer.core.gguf import resolve_gguf
from services.trainer.core.hierarchy import GROUP_HEAD_FILE, GroupHead, load_group_head
from services.trainer.core.loop import LoopResult
from services.trainer.core.models import (
    HEAD_NAMES,
    PreparedModel,
    autocast_dtype,
    base_model_info,
    default_device,
    load_base_model,
)
from services.trainer.core.probe import final_linear
from services.trainer.core.tokenize import collate
from services.trainer.core.types import (
    BaseModelFormat,
    ClassStats,
    EncodedExample,
    JobSpec,
    PreparedData,
    Task,
)

__all__ = [
    "CLASS_WEIGHTS_FILE",
    "LOGS_DIR",
    "TRAINING_CONFIG_FILE",
    "LoadedAdapter",
    "LoadedEnsemble",
    "TensorBoardLogger",
    "check_output_dir",
    "epoch_dir",
    "library_versions",
    "load_adapter_for_inference",
    "load_single_adapter",
    "predict_labels",
    "save_artifacts",
]

logger = logging.getLogger(__name__)

TRAINING_CONFIG_FILE = "training_config.json"
CLASS_WEIGHTS_FILE = "class_weights.json"
LOGS_DIR = "logs"
EPOCHS_DIR = "epochs"  # <output_dir>/epochs/epoch-<n>/: the adapter after each earlier epoch
# Bumped when training_config.json changes shape, so readers can tell old files apart.
_CONFIG_FORMAT = 1
_VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "loratune")


class TensorBoardLogger:
    """Scalar curves under `log_dir` (train/loss, train/learning_rate, eval/loss, ...).

    Implements the loop's `ScalarLogger`: pass it to `loop.train(scalar_logger=...)` or put
    it in `RunContext.extra["tensorboard"]`. Use it as a context manager, or `close()` it.
    """

    def __init__(self, log_dir: Path | str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Record one point; non-finite values are skipped (TensorBoard draws them badly)."""
        if math.isfinite(value):
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Write pending events to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the events file."""
        self._writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def epoch_dir(out_dir: Path | str, epoch: int) -> Path:
    """Where the adapter after `epoch` (1-based) is saved when it is not the last one."""
    return Path(out_dir) / EPOCHS_DIR / f"epoch-{epoch}"


def check_output_dir(path: Path | str) -> None:
    """Make sure artifacts can be written under `path` (created if missing).

    Call before accepting a job, so a bad folder fails the request, not the job an hour in.

    Raises:
        InvalidArgument: `path` is empty, is a file, or cannot be created or written.
    """
    if not str(path).strip():
        raise InvalidArgument("must name a folder for the artifacts", field="output_dir")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise InvalidArgument(f"{folder} exists and is not a folder", field="output_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise InvalidArgument(
            f"cannot write to {folder}: {err.strerror or err}", field="output_dir"
        ) from err


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide how an adapter trains and loads."""
    versions: dict[str, str] = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def save_artifacts(
    prepared: PreparedModel,
    data: PreparedData,
    spec: JobSpec,
    result: LoopResult,
    out_dir: Path,
    versions: Mapping[str, str] | None = None,
) -> Path:
    """Write the trained adapter and its records into `out_dir`; returns `out_dir`.

    - `adapter_config.json`, `adapter_model.safetensors` (PEFT; a classification head is
      inside, saved through `modules_to_save`), the tokenizer's files;
    - `training_config.json`: every hyperparameter (with the LoRA target modules the request
      resolved to), base model (as named, its format, and `base_model_source`: what was
      loaded, e.g. the GGUF file, its folder and quantisation type, de-quantised), dataset
      fingerprint, label map, split sizes, excluded classes, library versions (`versions`,
      default: the installed ones), train seconds and final loss;
    - `class_weights.json` (classification): counts, weights and excluded classes;
    - `group_head.safetensors` (hierarchical codes, core/hierarchy.py): the group head, whose
      group map is training_config.json's `hierarchy`.

    TensorBoard events go to `out_dir/logs/` during training (see TensorBoardLogger).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_options: dict[str, Any] = {}
    if prepared.base is not None and prepared.base.format is BaseModelFormat.GGUF:
        # PEFT's "auto" looks for the base's config.json (a GGUF base has none), then asks
        # the hub about the file's path. No job resizes or trains the embeddings anyway.
        save_options["save_embedding_layers"] = False
    with folded(*_posthoc_offsets(prepared, data, result)):
        # The evaluation's post-hoc logit adjustment travels in the head's bias.
        prepared.model.save_pretrained(str(out_dir), **save_options)
    prepared.tokenizer.save_pretrained(str(out_dir))
    if prepared.group_head is not None:
        prepared.group_head.save(out_dir)
    else:
        (out_dir / GROUP_HEAD_FILE).unlink(missing_ok=True)  # an earlier run's in this folder
    config = training_config(prepared, data, spec, result, versions or library_versions())
    _write_json(out_dir / TRAINING_CONFIG_FILE, config)
    if data.task is Task.CLASSIFICATION and data.stats is not None:
        _write_json(out_dir / CLASS_WEIGHTS_FILE, _class_weights_document(data.stats))
    _save_validation_scores(result, out_dir)
    logger.info("saved adapter of job %s to %s", spec.job_id, out_dir)
    return out_dir


def training_config(
    prepared: PreparedModel,
    data: PreparedData,
    spec: JobSpec,
    result: LoopResult,
    versions: Mapping[str, str],
) -> dict[str, Any]:
    """The content of training_config.json (JSON-ready)."""
    labels = list(prepared.labels)
    excluded = dict(data.stats.excluded) if data.stats is not None else {}
    last_eval = result.last_eval
    base = prepared.base or base_model_info(
        spec.base_model, quantize_4bit=spec.training.quantize_4bit
    )
    return {
        "format": _CONFIG_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "job_id": spec.job_id,
        "task": data.task.value,
        # As the request named it; `base_model_source` says what that resolved to.
        "base_model": spec.base_model,
        "base_model_format": base.format.value,
        "base_model_source": base.to_json(),
        "tokenizer_id": prepared.tokenizer_id,
        "labels": labels,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "dataset": {
            **_plain(dataclasses.asdict(spec.dataset)),
            "fingerprint": data.fingerprint,
            "train_rows": len(data.train),
            "validation_rows": len(data.validation),
            "excluded_classes": excluded,
        },
        "hyperparameters": {
            # As asked (target_modules) and as resolved on the model ("attention", "all-linear").
            "lora": {
                **_plain(dataclasses.asdict(spec.lora)),
                "resolved_target_modules": list(prepared.target_modules),
            },
            "training": _plain(dataclasses.asdict(spec.training)),
            "balancing": _plain(dataclasses.asdict(spec.balancing)),
            "max_eval_samples": spec.max_eval_samples,
            "max_new_tokens": spec.max_new_tokens,
        },
        "parameters": {
            "trainable": prepared.trainable_parameters,
            "total": prepared.total_parameters,
        },
        "result": {
            "train_seconds": result.train_seconds,
            "steps": result.steps,
            "final_loss": _finite_or_none(result.final_loss),
            "samples_per_second": result.samples_per_second,
            "eval_loss": _finite_or_none(last_eval.eval_loss) if last_eval else None,
            "epoch": int(last_eval.epoch) if last_eval else None,
            # tau > 0: -tau * log(prior) is folded into the saved head's bias.
            "posthoc_logit_adjustment_tau": last_eval.posthoc_tau if last_eval else 0.0,
        },
        "versions": dict(versions),
        # Hierarchical codes: the group map of group_head.safetensors (None = no group head).
        "hierarchy": (
            prepared.group_head.groups.to_json(labels) if prepared.group_head is not None else None
        ),
    }


class LoadedAdapter(NamedTuple):
    """A saved adapter on its base, ready for inference."""

    model: PeftModel
    tokenizer: Any
    labels: tuple[str, ...]  # classification: index = class id; generation: ()
    task: Task
    # Hierarchical codes: the group head, attached to the code head (None = none saved).
    group_head: GroupHead | None = None


class LoadedEnsemble(NamedTuple):
    """Saved adapters that predict together: the argmax of their mean log-probabilities
    (a study's published ensemble, services/common/ensembles.py)."""

    members: tuple[LoadedAdapter, ...]
    labels: tuple[str, ...]
    task: Task
    trials: tuple[int, ...] = ()  # the study's trial numbers of the members, when known


def load_adapter_for_inference(
    adapter_dir: Path | str, device: torch.device | str | None = None
) -> LoadedAdapter | LoadedEnsemble:
    """A saved adapter, or a saved ensemble of adapters, ready to predict.

    A folder with `ensemble.json` is an ensemble: each member sub-folder is loaded as below
    and a `LoadedEnsemble` returned (its members must share one label set).
    """
    folder = Path(adapter_dir)
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as err:
        raise InvalidArgument(
            f"{folder / ENSEMBLE_FILE} cannot be read: {err}", field="adapter_dir"
        ) from err
    if manifest is None:
        return load_single_adapter(folder, device)
    members = tuple(load_single_adapter(folder / name, device) for name in manifest.members)
    labels, task = members[0].labels, members[0].task
    if task is not Task.CLASSIFICATION or any(
        m.labels != labels or m.task is not task for m in members
    ):
        raise InvalidArgument(
            f"the members of the ensemble in {folder} are not classifiers of one label set",
            field="adapter_dir",
        )
    return LoadedEnsemble(members=members, labels=labels, task=task, trials=manifest.trials)


def load_single_adapter(
    adapter_dir: Path | str, device: torch.device | str | None = None
) -> LoadedAdapter:
    """Load the base named in `training_config.json` with the saved adapter (and head).

    Unpacks as `(model, tokenizer, labels, task, group_head)`. The model is in eval mode.
    The base is quantised to 4 bits again when the adapter was trained that way, so the
    layers the adapter learnt on are the ones it runs on. A GGUF base is loaded from the
    name the job was given, or, when that no longer resolves from here (a relative path
    and another working folder), from the file's absolute path recorded at training. A
    group head saved with the adapter (hierarchical codes) is loaded and attached to the
    code head.

    Raises:
        InvalidArgument: the folder holds no training_config.json / adapter, or the base
            model cannot be found (field "adapter_dir" / "base_model").
    """
    folder = Path(adapter_dir)
    config_path = folder / TRAINING_CONFIG_FILE
    if not config_path.is_file() or not (folder / "adapter_config.json").is_file():
        raise InvalidArgument(
            f"{folder} holds no saved adapter (adapter_config.json and {TRAINING_CONFIG_FILE})",
            field="adapter_dir",
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        task = Task(config["task"])
        labels = tuple(str(label) for label in config.get("labels", ()))
        base_model = _saved_base_model(config)
        quantize_4bit = bool(config["hyperparameters"]["training"].get("quantize_4bit", False))
        hierarchy = config.get("hierarchy")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InvalidArgument(f"{config_path} cannot be read: {err}", field="adapter_dir") from err
    target = torch.device(device) if device is not None else default_device()
    has_tokenizer = any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    base, tokenizer = load_base_model(
        base_model,
        task,
        labels,
        device=target,
        quantize_4bit=quantize_4bit,
        tokenizer_path=str(folder) if has_tokenizer else None,
    )
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
    _match_head_dtype(model, task)
    model.eval()
    group_head = None
    if hierarchy and task is Task.CLASSIFICATION:
        try:
            group_head = load_group_head(model, labels, hierarchy, folder, target)
        except (OSError, LookupError, ValueError, TypeError, RuntimeError) as err:
            raise InvalidArgument(
                f"the group head in {folder} cannot be loaded: {err}", field="adapter_dir"
            ) from err
    return LoadedAdapter(
        model=model, tokenizer=tokenizer, labels=labels, task=task, group_head=group_head
    )


def predict_labels(
    loaded: LoadedAdapter | LoadedEnsemble,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
) -> list[str]:
    """Label names a saved classification adapter (or ensemble) predicts for `texts`.

    With a group head (hierarchical codes) each code scores
    log_softmax(code logits)[code] + log_softmax(group logits)[group(code)], as the
    evaluation scored it; the argmax is the prediction. An ensemble predicts the argmax of
    its members' mean log-probabilities.
    """
    if loaded.task is not Task.CLASSIFICATION:
        raise InvalidArgument("the adapter was trained for generation", field="adapter_dir")
    if isinstance(loaded, LoadedEnsemble):
        total = sum(
            torch.log_softmax(_class_scores(m, texts, max_length, batch_size), dim=-1)
            for m in loaded.members
        )
        assert isinstance(total, torch.Tensor)
        return [loaded.labels[i] for i in total.argmax(-1).tolist()]
    scores = _class_scores(loaded, texts, max_length, batch_size)
    return [loaded.labels[i] for i in scores.argmax(-1).tolist()]


def _class_scores(
    loaded: LoadedAdapter, texts: Sequence[str], max_length: int, batch_size: int
) -> torch.Tensor:
    """(rows, classes) float32 scores of `texts`: the logits, or a group head's scores."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    dtype = autocast_dtype(device)
    scores = torch.zeros(len(texts), len(loaded.labels))
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(
                list(texts[start : start + batch_size]), truncation=True, max_length=max_length
            )
            rows = [
                EncodedExample(input_ids=ids, attention_mask=mask, label_id=0)
                for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
            ]
            batch = collate(rows, int(tokenizer.pad_token_id), Task.CLASSIFICATION)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                ).logits
                if loaded.group_head is not None:
                    logits = loaded.group_head.scores(logits)
            scores[start : start + len(rows)] = logits.float().cpu()
    return scores


# ---- helpers -------------------------------------------------------------------------------


def _saved_base_model(config: Mapping[str, Any]) -> str:
    """The base model a saved adapter names: as the job named it, unless that was a GGUF
    file that no longer resolves from here and the absolute path recorded still does."""
    named = str(config["base_model"])
    source = config.get("base_model_source") or {}
    if source.get("format") != BaseModelFormat.GGUF.value:
        return named
    try:
        if resolve_gguf(named) is not None:
            return named
    except InvalidArgument:
        pass
    recorded = str(source.get("name") or "")
    if recorded and Path(recorded).is_file():
        logger.info("base model %s not found from here; loading the recorded %s", named, recorded)
        return recorded
    return named  # loading it reports what is wrong


def _posthoc_offsets(
    prepared: PreparedModel, data: PreparedData, result: LoopResult
) -> tuple[torch.nn.Linear | None, torch.Tensor | None]:
    """The head and the bias offsets (-tau * log prior) of the evaluation's adjustment."""
    tau = result.last_eval.posthoc_tau if result.last_eval is not None else 0.0
    if tau <= 0 or data.task is not Task.CLASSIFICATION or data.stats is None:
        return None, None
    head = final_linear(prepared.model, len(prepared.labels))
    return head, -tau * log_prior(data.stats.counts, prepared.labels)


def _save_validation_scores(result: LoopResult, out_dir: Path) -> None:
    """The evaluation's log-probabilities beside the adapter they came from (for the study's
    ensemble); an earlier run's are removed when this one has none or too many."""
    path = out_dir / VALIDATION_SCORES_FILE
    scores = result.last_eval.scores if result.last_eval is not None else None
    if scores is None or scores.numel() > MAX_SCORE_CELLS:
        path.unlink(missing_ok=True)
        return
    from safetensors.torch import save_file

    save_file({SCORES_KEY: scores.detach().to("cpu", torch.float16).contiguous()}, str(path))


def _match_head_dtype(model: PeftModel, task: Task) -> None:
    """Give the loaded head the backbone's dtype (bfloat16 on CUDA), so no autocast is needed."""
    if task is not Task.CLASSIFICATION:
        return
    dtype = model.get_input_embeddings().weight.dtype
    base = model.get_base_model()
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            head.to(dtype)


def _class_weights_document(stats: ClassStats) -> dict[str, Any]:
    try:
        from services.trainer.core.data import class_weights_json
    except ImportError:  # pragma: no cover - data.py ships with this module
        return {
            "labels": {
                label: {"count": count, "weight": stats.weights.get(label)}
                for label, count in stats.counts.items()
            },
            "excluded": dict(stats.excluded),
        }
    return class_weights_json(stats)


def _plain(value: Any) -> Any:
    """dataclasses.asdict output made JSON-ready (enums as values, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    """Write atomically: a reader (the optimizer, a user) never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(temporary, path)
