"""The training loop: LoRA steps with balancing, progress events, cancellation, evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, Sampler

from services.common.errors import InvalidArgument
from services.common.reasoning import strip_reasoning
from services.trainer import metrics
from services.trainer.core.adjust import LogitAdjustedLoss, choose_tau, log_prior
from services.trainer.core.balancing import FocalLoss, class_weights, weighted_sampler
from services.trainer.core.hierarchy import HierarchicalLoss, build_group_head
from services.trainer.core.models import (
    PreparedModel,
    autocast_dtype,
    free_accelerator_memory,
    head_parameters,
)
from services.trainer.core.probe import (
    PROBE_MAX_ROWS,
    ProbeFeatureCache,
    balanced_class_weight,
    final_linear,
    linear_probe_head,
)
from services.trainer.core.tokenize import (
    IGNORE_INDEX,
    UNTRAINED_LABEL_ID,
    collate,
    collate_prompts,
)
from services.trainer.core.types import (
    DEFAULT_LOOP_OPTIONS,
    Cancelled,
    EncodedData,
    EncodedExample,
    EvaluationEvent,
    JobSpec,
    LoopOptions,
    NanLoss,
    PreparedData,
    ProgressEvent,
    RunContext,
    Task,
    TrainingSpec,
)

__all__ = [
    "DEFAULT_GENERATION_EVAL_SAMPLES",
    "TENSORBOARD_KEY",
    "LengthGroupedBatchSampler",
    "LoopResult",
    "ScalarLogger",
    "build_train_loader",
    "head_learning_rate",
    "parameter_groups",
    "train",
]

logger = logging.getLogger(__name__)

# Generation evaluates on this many validation rows when the job says 0: greedy decoding
# is far slower than a forward pass, and the evaluator scores a sample anyway.
DEFAULT_GENERATION_EVAL_SAMPLES = 64
# `RunContext.extra[TENSORBOARD_KEY]` may hold a ScalarLogger (artifacts.TensorBoardLogger).
TENSORBOARD_KEY = "tensorboard"
_MAX_GRAD_NORM = 1.0
_Amp = Callable[[], contextlib.AbstractContextManager[Any]]
# Batches sorted together by length: large enough to cut most padding, small enough that
# the order stays random across the epoch.
_GROUP_BATCHES = 50


class ScalarLogger(Protocol):
    """Where the loop writes scalar curves (TensorBoard in production)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Record `value` of the curve `tag` at optimizer step `step`."""
        ...


@dataclass(frozen=True)
class LoopResult:
    """What a finished training run reports."""

    train_seconds: float  # wall time of the whole loop, evaluations included
    steps: int  # optimizer steps taken
    final_loss: float  # mean training loss over the last epoch
    last_eval: EvaluationEvent | None
    samples_per_second: float  # training rows per second of training steps (no evaluation)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length drawn from any index sampler, in random order.

    The indices the inner sampler yields (a seeded shuffle or the weighted sampler, so
    class balancing is untouched) are cut into groups of `batch_size * group_batches`,
    each group sorted by length and split into batches; the batches are then shuffled.
    Similar lengths mean little padding, which is most of the speed-up HF Trainer's
    `group_by_length` gives. The longest batch goes first so an out-of-memory error
    surfaces in the first step, not an hour in.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        lengths: Sequence[int],
        batch_size: int,
        generator: torch.Generator,
        group_batches: int = _GROUP_BATCHES,
    ) -> None:
        self.sampler = sampler
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.group_batches = group_batches

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        indices = list(iter(self.sampler))
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(indices), group):
            chunk = sorted(indices[start : start + group], key=lambda i: -self.lengths[i])
            batches.extend(
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            )
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        batches = [batches[i] for i in order]
        if batches:
            # Each batch is sorted longest first, so its first row gives its padded length.
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches.insert(0, batches.pop(longest))
        yield from batches


def build_train_loader(
    examples: Sequence[EncodedExample],
    task: Task,
    pad_token_id: int,
    batch_size: int,
    seed: int,
    *,
    n_classes: int = 0,
    use_weighted_sampler: bool = False,
    sampler_power: float = 0.0,
    pin_memory: bool = False,
) -> DataLoader[EncodedExample]:
    """The training DataLoader: seeded shuffle (or class-balanced draws), length-grouped.

    With `use_weighted_sampler` (classification) the rows are drawn by
    `balancing.weighted_sampler`, so every class comes up equally often; it is the
    loader's `batch_sampler.sampler`.
    """
    index_sampler: Sampler[int]
    if use_weighted_sampler and task is Task.CLASSIFICATION:
        index_sampler = weighted_sampler(
            [e.label_id for e in examples], n_classes, seed, sampler_power
        )
    else:
        index_sampler = RandomSampler(examples, generator=torch.Generator().manual_seed(seed))
    batch_sampler = LengthGroupedBatchSampler(
        index_sampler,
        [len(e.input_ids) for e in examples],
        batch_size,
        # A separate stream for batch order, so the draws above stay what balancing made.
        generator=torch.Generator().manual_seed(seed + 1),
    )

    def collate_batch(batch: list[EncodedExample]) -> dict[str, torch.Tensor]:
        return collate(batch, pad_token_id, task)

    return DataLoader(
        examples,  # type: ignore[arg-type]  # any Sequence indexes like a map-style Dataset
        batch_sampler=batch_sampler,
        collate_fn=collate_batch,
        # Page-locked batches let the copies to the GPU overlap with compute.
        pin_memory=pin_memory,
    )


def train(
    prepared: PreparedModel,
    data: PreparedData,
    encoded: EncodedData,
    spec: JobSpec,
    ctx: RunContext,
    *,
    scalar_logger: ScalarLogger | None = None,
    probe_cache: ProbeFeatureCache | None = None,
    checkpoint: Callable[[int, EvaluationEvent], str] | None = None,
    options: LoopOptions = DEFAULT_LOOP_OPTIONS,
) -> LoopResult:
    """Train the prepared adapter on `encoded.train`, evaluating at the end of each epoch.

    A fresh encoder head is first fitted by the linear probe (`options.linear_probe`);
    with `probe_cache`, the frozen features of an earlier job on the same base and rows
    are reused instead of a forward pass. `options` also sets the head-only phase and the
    learning rate of an unprobed head. With `balancing.group_separator`, a group head is
    built for the job (`prepared.group_head`, core/hierarchy.py): probed with the code head,
    trained with it, and combined with it in every evaluation.

    `checkpoint(epoch, evaluation)`, when given, saves the adapter as it is after each
    evaluated epoch and returns its folder, which the EvaluationEvent then carries
    (`adapter_dir`): the caller can keep the best epoch, not only the last.

    Emits a ProgressEvent every `ctx.progress_every_steps` optimizer steps (and at the last
    step) and an EvaluationEvent per epoch. Curves go to `scalar_logger`, or to
    `ctx.extra["tensorboard"]` when no logger is passed.

    Raises:
        Cancelled: `ctx.should_stop()` turned true (checked before every optimizer step
            and between evaluation batches).
        NanLoss: the loss or the gradient norm stopped being finite.
        InvalidArgument: there is nothing to train on.
        torch.cuda.OutOfMemoryError: propagated as is; optimizer state and gradients are
            freed on the way out.
    """
    started = time.perf_counter()
    if not encoded.train:
        raise InvalidArgument("the training split is empty", field="dataset")
    scalars = scalar_logger if scalar_logger is not None else ctx.extra.get(TENSORBOARD_KEY)
    model = prepared.model
    device = prepared.device
    task = prepared.task
    training = spec.training
    pad_id = int(prepared.tokenizer.pad_token_id)
    torch.manual_seed(training.seed)
    if prepared.group_head is not None:
        prepared.group_head.detach()  # an earlier run's on this model
    # Hierarchical codes (core/hierarchy.py): None unless the job's labels form groups.
    group_head = prepared.group_head = (
        build_group_head(model, data.labels, spec.balancing.group_separator, training.seed, device)
        if task is Task.CLASSIFICATION
        else None
    )

    loader = build_train_loader(
        encoded.train,
        task,
        pad_id,
        training.batch_size,
        training.seed,
        n_classes=len(data.labels),
        use_weighted_sampler=spec.balancing.use_weighted_sampler,
        sampler_power=spec.balancing.sampler_power,
        pin_memory=device.type == "cuda",
    )
    accumulation = max(1, training.gradient_accumulation)
    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = steps_per_epoch * training.num_epochs
    loss_fn = _classification_loss(prepared, data, spec) if task is Task.CLASSIFICATION else None
    amp = _autocast(device, options.cpu_bf16)
    _cpu_bf16_attention(
        model,
        device.type == "cpu" and autocast_dtype(device, cpu_bf16=options.cpu_bf16) is not None,
    )
    probed = None
    # Only an encoder head is probed: a decoder job builds no probe batches and hashes no rows.
    if (
        task is Task.CLASSIFICATION
        and (options.linear_probe or training.probe_only)
        and final_linear(model, len(data.labels)) is not None
    ):
        probed = linear_probe_head(
            model,
            _probe_batches(encoded.train, pad_id, training.batch_size, training.seed),
            len(data.labels),
            device,
            # The frozen baseline is a class-balanced logistic regression whatever the trial's
            # loss: a floor is what a careful user fits (and then depends on nothing a
            # probe-only trial's other dimensions change).
            class_weight=_probe_class_weight(loss_fn, training, encoded, len(data.labels)),
            amp=amp,
            should_stop=ctx.should_stop,
            cache=probe_cache,
            cache_key=_probe_cache_key(prepared, data, encoded, spec),
            also_fit=group_head.fit if group_head is not None else None,
        )
        if ctx.should_stop():
            raise Cancelled("cancelled before the first step")
        if probed is not None and scalars is not None:
            scalars.scalar("train/probe_accuracy", probed.train_accuracy, 0)
            scalars.scalar("train/probe_c", probed.c, 0)
            if probed.cv_macro_f1 is not None:
                scalars.scalar("train/probe_cv_macro_f1", probed.cv_macro_f1, 0)

    if training.probe_only:
        # The frozen baseline as a trial: the probed head (a decoder's fresh head when it
        # cannot be probed), evaluated once, no fine-tuning step.
        model.eval()
        baseline = _evaluate(prepared, data, encoded, spec, ctx, 1, 0, amp)
        if baseline is not None:
            if checkpoint is not None:
                baseline = dataclasses.replace(baseline, adapter_dir=checkpoint(1, baseline))
            ctx.emit(baseline)
        model.eval()
        return LoopResult(
            train_seconds=time.perf_counter() - started,
            steps=0,
            final_loss=float("nan"),
            last_eval=baseline,
            samples_per_second=0.0,
        )

    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer | None = torch.optim.AdamW(
        parameter_groups(
            model,
            training.learning_rate,
            task,
            head_probed=probed is not None,
            options=options,
            extra_head=list(group_head.parameters()) if group_head is not None else (),
        ),
        lr=training.learning_rate,
        weight_decay=training.weight_decay,
        # One fused kernel for all parameters on CUDA (the trainable ones are float32 there).
        fused=device.type == "cuda",
    )
    scheduler: Any = get_linear_schedule_with_warmup(
        optimizer, round(training.warmup_ratio * total_steps), total_steps
    )
    # The head-only phase: the adapter's parameters stop requiring gradients (so no backward
    # runs through the backbone) and come back when the phase ends, or on the way out.
    head_ids = {id(p) for p in head_parameters(model)} if task is Task.CLASSIFICATION else set()
    adapter = [p for p in trainable if id(p) not in head_ids]
    head_only_steps = int(options.head_only_fraction * total_steps) if head_ids and adapter else 0
    if head_only_steps:
        for parameter in adapter:
            parameter.requires_grad_(False)

    step = 0
    train_time = 0.0
    train_samples = 0
    window_losses: list[float] = []
    window_samples = 0
    window_started = time.perf_counter()
    epoch_losses: list[float] = []
    last_eval: EvaluationEvent | None = None
    try:
        for epoch in range(training.num_epochs):
            model.train()
            epoch_losses = []
            batches = iter(loader)
            done_batches = 0
            while True:
                step_started = time.perf_counter()  # batch collation counts as training time
                group = list(islice(batches, accumulation))
                if not group:
                    break
                if ctx.should_stop():
                    raise Cancelled(f"cancelled before step {step + 1} of {total_steps}")
                assert optimizer is not None
                if step == head_only_steps:
                    for parameter in adapter:
                        parameter.requires_grad_(True)
                loss_value, samples = _optimizer_step(
                    model, group, task, loss_fn, amp, device, optimizer
                )
                step += 1
                done_batches += len(group)
                elapsed = time.perf_counter() - step_started
                train_time += elapsed
                train_samples += samples
                metrics.SAMPLES.inc(samples)
                window_losses.append(loss_value)
                epoch_losses.append(loss_value)
                window_samples += samples
                learning_rate = float(optimizer.param_groups[0]["lr"])
                if scalars is not None:
                    scalars.scalar("train/loss", loss_value, step)
                    scalars.scalar("train/learning_rate", learning_rate, step)
                if step % max(1, ctx.progress_every_steps) == 0 or step == total_steps:
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_started, 1e-9)
                    ctx.emit(
                        ProgressEvent(
                            epoch=epoch + done_batches / batches_per_epoch,
                            step=step,
                            total_steps=total_steps,
                            loss=sum(window_losses) / len(window_losses),
                            learning_rate=learning_rate,
                            samples_per_second=rate,
                        )
                    )
                    if scalars is not None:
                        scalars.scalar("train/samples_per_second", rate, step)
                    window_losses, window_samples, window_started = [], 0, now
                # The scheduler's lr of the step just taken was reported above; advance now.
                scheduler.step()
            restore = _two_stage_head(prepared, data, encoded, spec, ctx, amp)
            last_eval = _evaluate(prepared, data, encoded, spec, ctx, epoch + 1, step, amp)
            if last_eval is not None:
                if checkpoint is not None:
                    last_eval = dataclasses.replace(
                        last_eval, adapter_dir=checkpoint(epoch + 1, last_eval)
                    )
                ctx.emit(last_eval)
                if scalars is not None:
                    scalars.scalar("eval/loss", last_eval.eval_loss, step)
            if restore is not None and epoch + 1 < training.num_epochs:
                restore()  # training goes on with its own head; the last epoch keeps the re-fit
            window_started = time.perf_counter()  # evaluation time is not training throughput
    finally:
        # Free the optimizer state and gradients whether training ended, failed or ran out
        # of memory: the job manager may retry or load another base in this process.
        model.zero_grad(set_to_none=True)
        for parameter in adapter:
            parameter.requires_grad_(True)
        optimizer = None
        scheduler = None
        del trainable, adapter
        free_accelerator_memory()
    model.eval()
    final_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan")
    return LoopResult(
        train_seconds=time.perf_counter() - started,
        steps=step,
        final_loss=final_loss,
        last_eval=last_eval,
        samples_per_second=train_samples / train_time if train_time > 0 else 0.0,
    )


def head_learning_rate(learning_rate: float, options: LoopOptions = DEFAULT_LOOP_OPTIONS) -> float:
    """The classification head's peak learning rate for an adapter trained at `learning_rate`:
    `options.head_lr_multiplier` times it, and at least `options.head_min_learning_rate`
    (never below the adapter's own)."""
    return max(
        learning_rate * options.head_lr_multiplier, options.head_min_learning_rate, learning_rate
    )


def parameter_groups(
    model: torch.nn.Module,
    learning_rate: float,
    task: Task,
    *,
    head_probed: bool = False,
    options: LoopOptions = DEFAULT_LOOP_OPTIONS,
    extra_head: Sequence[torch.nn.Parameter] = (),
) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the adapter at `learning_rate`, a classification head at
    `head_learning_rate(learning_rate, options)`, or at `learning_rate` when the linear
    probe has already fitted it (`head_probed`: fine-tuning then refines a solution, as in
    LP-FT; measured on bench/banking77_longtail.py, probe + head at 10x: macro-F1 0.8825,
    probe + head at the adapter's rate: 0.8854).

    The adapter's group comes first, so `param_groups[0]["lr"]` is the learning rate the
    job asked for (what progress events and TensorBoard report). `extra_head` (the group
    head of hierarchical codes, outside the model) trains in the head's group.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    head_ids = (
        {id(p) for p in head_parameters(model)} if task is Task.CLASSIFICATION else set[int]()
    )
    groups = [
        {"params": [p for p in trainable if id(p) not in head_ids], "lr": learning_rate},
        {
            "params": [p for p in trainable if id(p) in head_ids] + list(extra_head),
            "lr": learning_rate if head_probed else head_learning_rate(learning_rate, options),
        },
    ]
    return [group for group in groups if group["params"]]


# ---- one step ------------------------------------------------------------------------------


def _optimizer_step(
    model: torch.nn.Module,
    group: list[dict[str, torch.Tensor]],
    task: Task,
    loss_fn: FocalLoss | LogitAdjustedLoss | HierarchicalLoss | None,
    amp: _Amp,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
) -> tuple[float, int]:
    """Forward and backward over the accumulation group, clip, step. Returns (loss, rows).

    Each of the optimizer's parameter groups (adapter, head) is clipped to `_MAX_GRAD_NORM`
    by its own norm: a fresh head's gradients are far larger than the adapter's, and one
    joint norm would scale the adapter's updates by whatever the head's gradient is at that
    step (measured: macro-F1 0.871 with a joint norm, 0.882 without one on
    bench/banking77_longtail.py).
    """
    samples = sum(int(batch["input_ids"].shape[0]) for batch in group)
    if task is Task.GENERATION:
        # Token-level mean over the whole group (what `num_items_in_batch` does in HF), so
        # accumulation gives the same loss as one big batch.
        denominator = float(sum(_response_tokens(batch["labels"]) for batch in group))
    total = torch.zeros((), device=device)
    for batch in group:
        inputs = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        with amp():
            if task is Task.CLASSIFICATION:
                assert loss_fn is not None
                logits = _classification_logits(model, inputs)
                # Each micro-batch's mean weighted by its share of the group's rows.
                loss = loss_fn(logits, inputs["labels"]) * (inputs["labels"].shape[0] / samples)
            else:
                loss = _causal_lm_loss_sum(model, inputs) / max(denominator, 1.0)
        loss.backward()  # type: ignore[no-untyped-call]
        total += loss.detach().float()
    group_norms = [
        torch.nn.utils.clip_grad_norm_(param_group["params"], _MAX_GRAD_NORM).to(device)
        for param_group in optimizer.param_groups
    ]
    grad_norm = torch.linalg.vector_norm(torch.stack(group_norms).float())
    # One device sync per step for both checks (and the value progress reports).
    loss_value, norm_value = torch.stack([total, grad_norm.detach().float().to(device)]).tolist()
    if not math.isfinite(loss_value):
        raise NanLoss(f"the training loss became {loss_value}; lower the learning rate")
    if not math.isfinite(norm_value):
        raise NanLoss(f"the gradient norm became {norm_value}; lower the learning rate")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_value), samples


def _probe_cache_key(
    prepared: PreparedModel, data: PreparedData, encoded: EncodedData, spec: JobSpec
) -> tuple[Any, ...]:
    """Everything the probe's frozen features depend on (a fresh adapter changes nothing):
    the base as loaded, its pooling, and the token ids and labels of the rows themselves."""
    rows = encoded.train
    return (
        spec.base_model,
        spec.training.quantize_4bit,
        str(prepared.device),
        prepared.pooling,
        spec.lora.use_dora,
        data.labels,
        hash(tuple((e.input_ids, e.label_id) for e in rows)),
        spec.training.seed if len(rows) > PROBE_MAX_ROWS else None,  # picks the subset
    )


def _probe_class_weight(
    loss_fn: Any, training: TrainingSpec, encoded: Any, n_classes: int
) -> torch.Tensor | None:
    """The probe's class weights: balanced for a probe-only trial (the floor), else the loss's."""
    if training.probe_only:
        labels = torch.tensor([e.label_id for e in encoded.train], dtype=torch.long)
        return balanced_class_weight(labels, n_classes)
    return loss_fn.weight if loss_fn is not None else None


def _probe_batches(
    rows: Sequence[EncodedExample], pad_token_id: int, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The training rows (at most PROBE_MAX_ROWS, a seeded subset) in batches by length,
    collated as they are read (not at all when the probe's features are cached)."""
    order = list(range(len(rows)))
    if len(order) > PROBE_MAX_ROWS:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(order), generator=generator)[:PROBE_MAX_ROWS].tolist()
    order.sort(key=lambda i: len(rows[i].input_ids))
    size = max(batch_size, 32)
    for start in range(0, len(order), size):
        batch = [rows[i] for i in order[start : start + size]]
        yield collate(batch, pad_token_id, Task.CLASSIFICATION)


def _classification_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    logits: torch.Tensor = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).logits
    return logits


def _causal_lm_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens (labels != -100).

    Computed here rather than by the model: only the response positions are upcast to
    float32 (a full (batch, length, vocab) float copy is the largest tensor of a step
    with a 150k vocabulary), and no keyword such as `num_items_in_batch` has to make it
    through PEFT and transformers' signatures.
    """
    logits: torch.Tensor = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
    ).logits
    shift_labels = inputs["labels"][:, 1:]
    selected = shift_labels != IGNORE_INDEX
    predicted = logits[:, :-1][selected].float()
    return F.cross_entropy(predicted, shift_labels[selected], reduction="sum")


def _response_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _classification_loss(
    prepared: PreparedModel, data: PreparedData, spec: JobSpec
) -> FocalLoss | LogitAdjustedLoss | HierarchicalLoss:
    """The code loss the job asks for; with a group head, plus its weighted group loss."""
    weight = None
    if spec.balancing.use_class_weights and data.stats is not None:
        weight = torch.tensor(class_weights(data.stats.counts, data.labels), dtype=torch.float32)
    loss: FocalLoss | LogitAdjustedLoss = FocalLoss(spec.balancing.focal_gamma, weight=weight).to(
        prepared.device
    )
    if spec.balancing.logit_adjust_tau > 0 and data.stats is not None:
        prior = log_prior(data.stats.counts, data.labels)
        loss = LogitAdjustedLoss(loss, prior, spec.balancing.logit_adjust_tau).to(prepared.device)
    if prepared.group_head is not None:
        return HierarchicalLoss(loss, prepared.group_head)
    return loss


def _autocast(device: torch.device, cpu_bf16: bool | None = False) -> _Amp:
    """A factory of fresh autocast contexts: bfloat16 on CUDA; on the CPU, bfloat16 as
    ``LoopOptions.cpu_bf16`` says (None: where the CPU has it natively), else none."""
    dtype = autocast_dtype(device, cpu_bf16=cpu_bf16)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# The attention a model was loaded with, before a CPU bfloat16 job switched it.
_LOADED_ATTENTION = "_loratune_loaded_attention"


def _cpu_bf16_attention(model: torch.nn.Module, bf16_on_cpu: bool) -> None:
    """Eager attention for a CPU bfloat16 job; the loaded implementation otherwise.

    torch's CPU flash-attention kernel (what ``sdpa`` picks on the CPU) has a bfloat16
    backward about 10x slower than its float32 one (MiniLM, batch 16 x 24 tokens: 380 ms
    against 37 ms a step), which ate the whole gain of the bfloat16 matrix products;
    eager attention's products run in bfloat16 like the rest (125 ms a step against
    205 ms in float32). The base model is cached between jobs, so the switch is undone for
    a job that does not autocast.
    """
    unwrap: Callable[[], Any] | None = getattr(model, "get_base_model", None)
    base: Any = unwrap() if unwrap is not None else model
    config = getattr(base, "config", None)
    setter: Callable[[str], None] | None = getattr(base, "set_attn_implementation", None)
    if config is None or setter is None:
        return
    current = getattr(config, "_attn_implementation", None)
    loaded = getattr(base, _LOADED_ATTENTION, current)
    wanted = "eager" if bf16_on_cpu else loaded
    if wanted is None or wanted == current:
        return
    try:
        setter(wanted)
    except (ValueError, ImportError) as err:  # a model that cannot switch keeps its own
        logger.debug("attention stays %s: %s", current, err)
        return
    setattr(base, _LOADED_ATTENTION, loaded)


# ---- evaluation ----------------------------------------------------------------------------


def _evaluate(
    prepared: PreparedModel,
    data: PreparedData,
    encoded: EncodedData,
    spec: JobSpec,
    ctx: RunContext,
    epoch: int,
    step: int,
    amp: _Amp,
) -> EvaluationEvent | None:
    """Validation loss and predictions on up to `max_eval_samples` rows (None: no rows)."""
    limit = spec.max_eval_samples
    if limit <= 0 and prepared.task is Task.CLASSIFICATION:
        limit = len(encoded.validation)
    elif limit <= 0:
        limit = DEFAULT_GENERATION_EVAL_SAMPLES
    rows = list(encoded.validation[:limit])
    raw = list(data.validation[: len(rows)])
    if not rows:
        return None
    model = prepared.model
    model.eval()
    batch_size = max(1, spec.training.batch_size * 2)  # no activations kept: room for more
    try:
        with torch.inference_mode():
            if prepared.task is Task.CLASSIFICATION:
                eval_loss, logits = _evaluate_classification(prepared, rows, batch_size, ctx, amp)
                references = [example.label for example in raw]
                labels = prepared.labels
                predictions = [labels[i] for i in logits.argmax(-1).tolist()]
                tau = 0.0
                adjusted = logits
                if posthoc_adjustable(prepared, data, spec) and data.stats is not None:
                    prior = log_prior(data.stats.counts, labels)
                    tau, predictions = choose_tau(logits, prior, references, labels)
                    adjusted = logits - tau * prior
                return EvaluationEvent(
                    epoch=float(epoch),
                    step=step,
                    eval_loss=eval_loss,
                    predictions=predictions,
                    references=references,
                    labels=list(data.labels),
                    posthoc_tau=tau,
                    scores=torch.log_softmax(adjusted.float(), dim=-1).half(),
                )
            eval_loss = _generation_loss(prepared, rows, batch_size, ctx, amp)
            outputs = _generate(prepared, rows, batch_size, spec.max_new_tokens, ctx, amp)
            return EvaluationEvent(
                epoch=float(epoch),
                step=step,
                eval_loss=eval_loss,
                predictions=outputs,
                references=[example.target for example in raw],
                prompts=[example.prompt for example in raw],
            )
    finally:
        model.train()


def _length_order(rows: Sequence[EncodedExample], key: str = "input_ids") -> list[int]:
    """Row indices, longest first: batches of similar length pad little."""
    return sorted(range(len(rows)), key=lambda i: -len(getattr(rows[i], key)))


def _evaluate_classification(
    prepared: PreparedModel,
    rows: Sequence[EncodedExample],
    batch_size: int,
    ctx: RunContext,
    amp: _Amp,
) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy of the code logits (unweighted, gamma 0: comparable across the
    trials of a study, whatever balancing each one uses) and every row's scores (float32,
    in row order): the code logits, or with a group head the combined
    log_softmax(code logits)[code] + log_softmax(group logits)[group(code)]."""
    pad_id = int(prepared.tokenizer.pad_token_id)
    all_logits = torch.zeros(len(rows), len(prepared.labels))
    loss_sum = 0.0
    scored = 0
    order = _length_order(rows)
    for start in range(0, len(order), batch_size):
        if ctx.should_stop():
            raise Cancelled("cancelled during evaluation")
        indices = order[start : start + batch_size]
        batch = collate([rows[i] for i in indices], pad_id, Task.CLASSIFICATION)
        inputs = {key: value.to(prepared.device) for key, value in batch.items()}
        with amp():
            logits = _classification_logits(prepared.model, inputs).float()
            scores = logits if prepared.group_head is None else prepared.group_head.scores(logits)
        # Rows of a class not trained on have no target the head can score: no loss.
        targets = inputs["labels"]
        loss_sum += float(
            F.cross_entropy(logits, targets, reduction="sum", ignore_index=UNTRAINED_LABEL_ID)
        )
        scored += int((targets != UNTRAINED_LABEL_ID).sum())
        all_logits[indices] = scores.detach().cpu()
    return loss_sum / max(scored, 1), all_logits


def _two_stage_head(
    prepared: PreparedModel,
    data: PreparedData,
    encoded: EncodedData,
    spec: JobSpec,
    ctx: RunContext,
    amp: _Amp,
) -> Callable[[], None] | None:
    """Two-stage training (decoupled classifier re-training, Kang et al. 2020): re-fit the
    head's final layer on the fine-tuned model's frozen features with class-balanced
    weights, for this epoch's evaluation and saved adapter. Returns how to put the trained
    head back (None when the job does not ask for it or the head cannot be probed)."""
    if prepared.task is not Task.CLASSIFICATION or not spec.balancing.two_stage:
        return None
    model = prepared.model
    head = final_linear(model, len(data.labels))
    if head is None or data.stats is None:
        return None
    weight = head.weight.detach().clone()
    bias = head.bias.detach().clone() if head.bias is not None else None
    balanced = torch.tensor(class_weights(data.stats.counts, data.labels), dtype=torch.float32)
    training = spec.training
    model.eval()
    try:
        linear_probe_head(
            model,
            _probe_batches(
                encoded.train,
                int(prepared.tokenizer.pad_token_id),
                training.batch_size,
                training.seed,
            ),
            len(data.labels),
            prepared.device,
            class_weight=balanced,
            amp=amp,
            should_stop=ctx.should_stop,
        )
    finally:
        model.train()
    if ctx.should_stop():
        raise Cancelled("cancelled while re-fitting the head")

    def restore() -> None:
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None and head.bias is not None:
                head.bias.copy_(bias)

    return restore


def posthoc_adjustable(prepared: PreparedModel, data: PreparedData, spec: JobSpec) -> bool:
    """Whether this job's evaluations choose a post-hoc logit adjustment (the head needs a
    bias to carry it into the saved adapter)."""
    if prepared.task is not Task.CLASSIFICATION or not spec.balancing.posthoc_logit_adjustment:
        return False
    head = final_linear(prepared.model, len(data.labels))
    return head is not None and head.bias is not None


def _generation_loss(
    prepared: PreparedModel,
    rows: Sequence[EncodedExample],
    batch_size: int,
    ctx: RunContext,
    amp: _Amp,
) -> float:
    pad_id = int(prepared.tokenizer.pad_token_id)
    loss_sum = 0.0
    tokens = 0
    order = _length_order(rows)
    for start in range(0, len(order), batch_size):
        if ctx.should_stop():
            raise Cancelled("cancelled during evaluation")
        batch = collate(
            [rows[i] for i in order[start : start + batch_size]], pad_id, Task.GENERATION
        )
        inputs = {key: value.to(prepared.device) for key, value in batch.items()}
        with amp():
            loss_sum += float(_causal_lm_loss_sum(prepared.model, inputs))
        tokens += _response_tokens(inputs["labels"])
    return loss_sum / tokens if tokens else 0.0


def _generate(
    prepared: PreparedModel,
    rows: Sequence[EncodedExample],
    batch_size: int,
    max_new_tokens: int,
    ctx: RunContext,
    amp: _Amp,
) -> list[str]:
    """Greedy continuations of every row's prompt, without the prompt and special tokens.

    Prompts are left-padded (a decoder appends after the last column); rows are batched
    by prompt length so short prompts do not wait behind padding. Any reasoning block
    (`<think>...</think>`, services/common/reasoning.py) is cut from every prediction: a
    trial is scored on its answers, not on what the model printed while thinking.
    """
    from transformers import GenerationConfig

    tokenizer = prepared.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    # An explicit config: a checkpoint's own (sampling temperature, top_p, ...) must not
    # turn evaluation into sampling or fill the log with warnings about unused flags.
    config = GenerationConfig(
        max_new_tokens=max(1, max_new_tokens),
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=_eos_ids(prepared),
    )
    outputs = [""] * len(rows)
    order = _length_order(rows, "prompt_ids")
    started, generated_tokens = time.perf_counter(), 0
    for start in range(0, len(order), batch_size):
        if ctx.should_stop():
            raise Cancelled("cancelled during evaluation")
        indices = order[start : start + batch_size]
        batch = collate_prompts([rows[i].prompt_ids for i in indices], pad_id)
        inputs = {key: value.to(prepared.device) for key, value in batch.items()}
        with amp():
            generated = prepared.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                generation_config=config,
            )
        continuations = generated[:, inputs["input_ids"].shape[1] :]
        tokens = int((continuations != pad_id).sum().item())
        generated_tokens += tokens
        metrics.GENERATED_TOKENS.inc(tokens)
        texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
        for index, text in zip(indices, texts, strict=True):
            outputs[index] = strip_reasoning(str(text))
    seconds = time.perf_counter() - started
    if generated_tokens and seconds > 0:
        metrics.GENERATION_TOKENS_PER_SECOND.set(generated_tokens / seconds)
    return outputs


def _eos_ids(prepared: PreparedModel) -> list[int]:
    """Every id that ends a response: the checkpoint's EOS ids (Qwen has two), the tokenizer's."""
    ids: list[int] = []
    configured = getattr(prepared.model.get_base_model().generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, list | tuple):
        ids.extend(int(i) for i in configured)
    if prepared.tokenizer.eos_token_id is not None:
        ids.append(int(prepared.tokenizer.eos_token_id))
    return sorted(set(ids))
