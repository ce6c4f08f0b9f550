"""The search space: documented defaults, validation, and trial parameters -> hyperparameters."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from services.common.defaults import TrainingDefaults
from services.common.errors import InvalidArgument

# The abstract target-module choices. The optimizer does not know the base model's module
# names: it sends the choice itself, and the trainer, which has the model loaded, resolves it
# (services/trainer/core/targets.py): "attention" = the query, key, value and output
# projections of the attention blocks; "all-linear" = every linear layer but the heads, sent
# as an empty list (the trainer's "all linear layers").
ATTENTION = "attention"
ALL_LINEAR = "all-linear"
# num_epochs 0: no fine-tuning step, the classification head fitted by the linear probe.
PROBE_ONLY = 0
# A module name as PEFT matches it: a leaf name or a dotted suffix such as
# "attention.output.dense" or "layers.0.self_attn.q_proj".
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
MAX_MODULE_NAME_LENGTH = 200
MAX_CHOICE_NAME_LENGTH = 64
MAX_MODULES_PER_SET = 256


@dataclass(frozen=True)
class FloatRange:
    """A float dimension."""

    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class SearchSpace:
    """What the sampler may vary; a field with one value is fixed.

    Defaults (documented in the README): rank {8, 16, 32, 64}; alpha = rank x {1, 2};
    dropout 0-0.1; learning rate 1e-5..5e-4 log (generation) or 5e-5..2e-3 log
    (classification, whose new head learns from scratch); epochs {2, 3, 4}; target
    modules attention-only or all linear layers; rsLoRA on / off; for classification
    focal gamma 0-3, class weights on / off, weighted sampler on / off.
    """

    rank: tuple[int, ...] = (8, 16, 32, 64)
    alpha_multiplier: tuple[float, ...] = (1.0, 2.0)
    dropout: FloatRange = FloatRange(0.0, 0.1)
    learning_rate: FloatRange = FloatRange(1e-5, 5e-4, log=True)
    num_epochs: tuple[int, ...] = (2, 3, 4)
    target_modules: tuple[str, ...] = (ATTENTION, ALL_LINEAR)
    use_rslora: tuple[bool, ...] = (False, True)
    batch_size: tuple[int, ...] = ()  # empty = LORA_BATCH_SIZE, fixed
    focal_gamma: FloatRange = FloatRange(0.0, 3.0)
    use_class_weights: tuple[bool, ...] = (True, False)
    use_weighted_sampler: tuple[bool, ...] = (False, True)
    posthoc_logit_adjustment: tuple[bool, ...] = (False,)
    logit_adjust_tau: FloatRange = FloatRange(0.0, 0.0)
    sampler_power: FloatRange = FloatRange(0.0, 0.0)
    two_stage: tuple[bool, ...] = (False,)
    # Hierarchical codes: label separators of a group head ("" = off).
    group_separator: tuple[str, ...] = ("",)
    # Named choices of target_modules with their module names (the request's choices that
    # list modules); "attention" and "all-linear" need none, the trainer resolves them.
    module_sets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The base models searched, when a study names several (FineTuningParams.base_model_names);
    # empty: the study's one base. Set by the optimizer, not by a request's search space.
    base_model: tuple[str, ...] = ()


def default_space(classification: bool) -> SearchSpace:
    """The documented default space for the task."""
    if classification:
        # 0 epochs = the linear probe alone (the frozen-encoder baseline): a point of the
        # space, evaluated first, so a study never selects below what the frozen encoder
        # gives (measured on banking77-LT: the frozen probe beat a 20-trial default study).
        # Post-hoc logit adjustment costs no training and raised test macro-F1 on
        # banking77-LT in every seed (0.8857 -> 0.8911, 3 seeds): always on. Two-stage
        # (0.8918) is left to the search. Measured by bench/banking77_longtail.py.
        return SearchSpace(
            learning_rate=FloatRange(5e-5, 2e-3, log=True),
            num_epochs=(PROBE_ONLY, 2, 3, 4),
            posthoc_logit_adjustment=(True,),
            two_stage=(False, True),
        )
    return SearchSpace()


def _check_range(name: str, value: FloatRange, minimum: float = 0.0) -> None:
    if not (math.isfinite(value.low) and math.isfinite(value.high)):
        raise InvalidArgument("bounds must be finite numbers", field=f"search_space.{name}")
    if value.low > value.high:
        raise InvalidArgument(
            f"is inverted (low {value.low:g} > high {value.high:g})", field=f"search_space.{name}"
        )
    if value.low < minimum or (value.log and value.low <= 0):
        raise InvalidArgument(
            f"low must be {'> 0 for a log scale' if value.log else f'>= {minimum:g}'} "
            f"(got {value.low:g})",
            field=f"search_space.{name}",
        )


def validate(space: SearchSpace) -> None:
    """Raises InvalidArgument naming the first bad dimension."""
    for name, values in (
        ("rank", space.rank),
        ("alpha_multiplier", space.alpha_multiplier),
        ("num_epochs", space.num_epochs),
        ("target_modules", space.target_modules),
        ("use_rslora", space.use_rslora),
        ("use_class_weights", space.use_class_weights),
        ("use_weighted_sampler", space.use_weighted_sampler),
    ):
        if not values:
            raise InvalidArgument("needs at least one choice", field=f"search_space.{name}")
    if any(r < 1 for r in space.rank):
        raise InvalidArgument("ranks must be >= 1", field="search_space.rank")
    if any(m <= 0 for m in space.alpha_multiplier):
        raise InvalidArgument("multipliers must be > 0", field="search_space.alpha_multiplier")
    if any(e < 0 for e in space.num_epochs):
        raise InvalidArgument(
            "epochs must be >= 1, or 0 for the linear probe alone",
            field="search_space.num_epochs",
        )
    if any(b < 1 for b in space.batch_size):
        raise InvalidArgument("batch sizes must be >= 1", field="search_space.batch_size")
    _check_range("dropout", space.dropout)
    if space.dropout.high >= 1:
        raise InvalidArgument("high must be < 1", field="search_space.dropout")
    _check_range("learning_rate", space.learning_rate)
    if space.learning_rate.low <= 0:
        raise InvalidArgument("low must be > 0", field="search_space.learning_rate")
    _check_range("focal_gamma", space.focal_gamma)
    _check_range("logit_adjust_tau", space.logit_adjust_tau)
    _check_range("sampler_power", space.sampler_power)
    if space.sampler_power.high > 1:
        raise InvalidArgument("high must be <= 1", field="search_space.sampler_power")
    if space.logit_adjust_tau.high > 5:
        raise InvalidArgument("high must be <= 5", field="search_space.logit_adjust_tau")
    if not space.two_stage:
        raise InvalidArgument("needs at least one choice", field="search_space.two_stage")
    if not space.group_separator:
        raise InvalidArgument("needs at least one choice", field="search_space.group_separator")
    # As the trainer checks them: a bad separator fails here, not in every trial.
    if any(
        len(separator) > 4 or any(unicodedata.category(c) in ("Cc", "Cf") for c in separator)
        for separator in space.group_separator
    ):
        raise InvalidArgument(
            "separators must be at most 4 characters, none of them a control character",
            field="search_space.group_separator",
        )
    if not space.posthoc_logit_adjustment:
        raise InvalidArgument(
            "needs at least one choice", field="search_space.posthoc_logit_adjustment"
        )
    _check_module_sets(space)


def _check_module_sets(space: SearchSpace) -> None:
    """Named sets well-formed, every choice known; whether the model has them is the trainer's."""
    where = "search_space.target_modules"
    for name, modules in space.module_sets.items():
        if not name.strip() or len(name) > MAX_CHOICE_NAME_LENGTH:
            raise InvalidArgument(
                f"a choice needs a name of 1 to {MAX_CHOICE_NAME_LENGTH} characters, "
                f"got {name[:80]!r}",
                field=where,
            )
        if not modules:
            raise InvalidArgument(f"the module set '{name}' names no module", field=where)
        if len(modules) > MAX_MODULES_PER_SET:
            raise InvalidArgument(
                f"the module set '{name}' names {len(modules)} modules "
                f"(at most {MAX_MODULES_PER_SET})",
                field=where,
            )
        bad = [
            module
            for module in modules
            if len(module) > MAX_MODULE_NAME_LENGTH or not _MODULE_NAME.fullmatch(module)
        ]
        if bad:
            raise InvalidArgument(
                f"the module set '{name}' has malformed module names {[b[:80] for b in bad]}: "
                f"a name is a layer's name or dotted path such as 'q_proj' or "
                f"'attention.output.dense' (at most {MAX_MODULE_NAME_LENGTH} characters)",
                field=where,
            )
    known = {ATTENTION, ALL_LINEAR, *space.module_sets}
    for choice in space.target_modules:
        if choice not in known:
            raise InvalidArgument(
                f"unknown choice '{choice}' (known: {', '.join(sorted(known))}; a choice of your "
                f"own needs its module names)",
                field=where,
            )


def _suggest_float(trial: Any, name: str, value: FloatRange) -> float:
    if value.low == value.high:
        return value.low
    return float(trial.suggest_float(name, value.low, value.high, log=value.log))


def _suggest_choice(trial: Any, name: str, values: Sequence[Any]) -> Any:
    return values[0] if len(values) == 1 else trial.suggest_categorical(name, list(values))


@dataclass(frozen=True)
class TrialParameters:
    """One trial's hyperparameters, as the trainer takes them."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    learning_rate: float
    num_epochs: int
    batch_size: int
    focal_gamma: float
    use_class_weights: bool
    use_weighted_sampler: bool
    posthoc_logit_adjustment: bool = False
    logit_adjust_tau: float = 0.0
    sampler_power: float = 0.0
    two_stage: bool = False
    group_separator: str = ""
    base_model: str = ""  # "" = the study's one base

    def as_log_dict(self) -> dict[str, Any]:
        """The parameters in the form of the users' log lines."""
        return {
            "rank": self.rank,
            "lora_alpha": self.alpha,
            "dropout": round(self.dropout, 4),
            "learning_rate": float(f"{self.learning_rate:.3g}"),
            "epochs": self.num_epochs,
            "target_modules": list(self.target_modules) or ALL_LINEAR,
            "use_rslora": self.use_rslora,
        }


def suggest(
    trial: Any,
    space: SearchSpace,
    defaults: TrainingDefaults,
    classification: bool,
    *,
    epochs: Sequence[int] | None = None,
) -> TrialParameters:
    """Asks an Optuna trial for every dimension of `space` and builds its parameters.

    The target modules go out as the trainer resolves them (it has the model loaded):
    see `modules_for`. `epochs`: the epoch choices offered (default: the space's).
    """
    rank = int(_suggest_choice(trial, "rank", space.rank))
    multiplier = float(_suggest_choice(trial, "alpha_multiplier", space.alpha_multiplier))
    modules_choice = str(_suggest_choice(trial, "target_modules", space.target_modules))
    params = TrialParameters(
        rank=rank,
        alpha=rank * multiplier,
        dropout=_suggest_float(trial, "dropout", space.dropout),
        target_modules=modules_for(modules_choice, space),
        use_rslora=bool(_suggest_choice(trial, "use_rslora", space.use_rslora)),
        learning_rate=_suggest_float(trial, "learning_rate", space.learning_rate),
        num_epochs=int(
            _suggest_choice(trial, "num_epochs", space.num_epochs if epochs is None else epochs)
        ),
        batch_size=int(_suggest_choice(trial, "batch_size", space.batch_size))
        if space.batch_size
        else defaults.lora_batch_size,
        focal_gamma=defaults.focal_loss_gamma,
        use_class_weights=defaults.use_class_weights,
        use_weighted_sampler=defaults.use_weighted_sampler,
    )
    if len(space.base_model) > 1:
        params = replace(
            params, base_model=str(_suggest_choice(trial, "base_model", space.base_model))
        )
    if classification:
        params = replace(
            params,
            focal_gamma=_suggest_float(trial, "focal_gamma", space.focal_gamma),
            use_class_weights=bool(
                _suggest_choice(trial, "use_class_weights", space.use_class_weights)
            ),
            use_weighted_sampler=bool(
                _suggest_choice(trial, "use_weighted_sampler", space.use_weighted_sampler)
            ),
            posthoc_logit_adjustment=bool(
                _suggest_choice(trial, "posthoc_logit_adjustment", space.posthoc_logit_adjustment)
            ),
            logit_adjust_tau=_suggest_float(trial, "logit_adjust_tau", space.logit_adjust_tau),
            sampler_power=_suggest_float(trial, "sampler_power", space.sampler_power),
            two_stage=bool(_suggest_choice(trial, "two_stage", space.two_stage)),
            group_separator=str(_suggest_choice(trial, "group_separator", space.group_separator)),
        )
    return params


# What a probe-only trial's result depends on, of its parameters: no fine-tuning step runs,
# so the adapter's shape (rank, alpha, modules, rsLoRA, dropout), the learning rate and the
# training loss (focal gamma, class weights, weighted sampler and its power, the
# logit-adjusted loss's tau, two-stage) change nothing: its probe is class-balanced whatever
# `use_class_weights` says (the floor). The batch size (the padding of the frozen pass), the
# post-hoc adjustment chosen on validation and a group head fitted beside the probe do.
PROBE_ONLY_DIMENSIONS = frozenset(
    {"num_epochs", "batch_size", "posthoc_logit_adjustment", "group_separator", "base_model"}
)


def result_key(params: Mapping[str, Any]) -> str:
    """The trial parameters that decide its result, as a canonical string: two trials of a
    study with equal keys give the same result (the study's data, base model and seed are
    the same for all its trials), so the second takes the first's without a job."""
    if params.get("num_epochs") == PROBE_ONLY:
        params = {k: v for k, v in params.items() if k in PROBE_ONLY_DIMENSIONS}
    return json.dumps(dict(params), sort_keys=True, default=str)


def sampled_epochs(space: SearchSpace) -> tuple[int, ...]:
    """The epochs the sampler chooses among: the space's less the probe-only point, which is
    each base's floor, run once as a trial of its own outside the sampler (a sampler that
    may propose it learns from the floor's repeats and keeps proposing it: measured on
    banking77-LT, 15 of a 20-trial study's first 20 proposals were the floor again). A space
    of the probe-only point alone keeps it."""
    trained = tuple(e for e in space.num_epochs if e != PROBE_ONLY)
    return trained or space.num_epochs


def floor_parameters(
    space: SearchSpace, defaults: TrainingDefaults, classification: bool, base_model: str = ""
) -> TrialParameters:
    """A floor trial's parameters: the documented defaults with 0 epochs (the probe alone),
    on `base_model` when the study searches several; no sampler is asked."""
    import optuna

    fixed = {**default_trial(space, defaults, classification), "num_epochs": PROBE_ONLY}
    if base_model:
        fixed["base_model"] = base_model
    return suggest(
        optuna.trial.FixedTrial(fixed), space, defaults, classification, epochs=space.num_epochs
    )


def modules_for(choice: str, space: SearchSpace) -> tuple[str, ...]:
    """`LoraParams.target_modules` for a target-modules choice.

    A named set: its module names (a set may be called "attention" or "all-linear" too:
    its names win). "all-linear": empty, the trainer's "every linear layer".
    "attention": `("attention",)`, resolved by the trainer on the loaded model.
    """
    if choice in space.module_sets:
        return tuple(space.module_sets[choice])
    if choice == ALL_LINEAR:
        return ()
    return (choice,)


def default_trial(
    space: SearchSpace, defaults: TrainingDefaults, classification: bool
) -> dict[str, Any]:
    """The first trial's parameters: the environment's defaults, clipped into the space."""

    def nearest(values: Sequence[Any], wanted: Any) -> Any:
        return wanted if wanted in values else values[0]

    def clip(value: FloatRange, wanted: float) -> float:
        return min(max(wanted, value.low), value.high)

    params: dict[str, Any] = {
        "rank": nearest(space.rank, defaults.lora_rank),
        "alpha_multiplier": nearest(space.alpha_multiplier, 2.0),
        "dropout": clip(space.dropout, defaults.lora_dropout),
        "learning_rate": clip(space.learning_rate, defaults.lora_learning_rate),
        "num_epochs": nearest(space.num_epochs, defaults.lora_num_epochs),
        "target_modules": nearest(space.target_modules, ALL_LINEAR),
        "use_rslora": nearest(space.use_rslora, False),
    }
    if classification:
        params |= {
            "focal_gamma": clip(space.focal_gamma, defaults.focal_loss_gamma),
            "use_class_weights": nearest(space.use_class_weights, defaults.use_class_weights),
            "use_weighted_sampler": nearest(
                space.use_weighted_sampler, defaults.use_weighted_sampler
            ),
            "posthoc_logit_adjustment": nearest(space.posthoc_logit_adjustment, False),
            "logit_adjust_tau": clip(space.logit_adjust_tau, 0.0),
            "sampler_power": clip(space.sampler_power, 0.0),
            "two_stage": nearest(space.two_stage, False),
            "group_separator": nearest(space.group_separator, ""),
        }
    if space.batch_size:
        params["batch_size"] = nearest(space.batch_size, defaults.lora_batch_size)
    if len(space.base_model) > 1:
        params["base_model"] = space.base_model[0]
    return params


# The training variables a user may set in the environment, by the dimension each fixes.
ENVIRONMENT_DIMENSIONS: Mapping[str, str] = {
    "lora_num_epochs": "num_epochs",
    "lora_learning_rate": "learning_rate",
    "lora_batch_size": "batch_size",
    "focal_loss_gamma": "focal_gamma",
    "use_class_weights": "use_class_weights",
    "use_weighted_sampler": "use_weighted_sampler",
}
_CLASSIFICATION_ONLY = frozenset({"focal_gamma", "use_class_weights", "use_weighted_sampler"})


def pinned_by_environment(
    defaults: TrainingDefaults, searched: set[str], classification: bool
) -> dict[str, Any]:
    """The dimensions the user fixed with a variable (`LORA_NUM_EPOCHS`, ...) for a study.

    The rule: a training variable set explicitly in the environment holds for every trial
    of the study, unless the request's search space sets that dimension itself (then the
    request wins: it is the more specific). Variables left unset fix nothing; the default
    space is searched. Returned as {dimension: value}, to be stored with the study.
    """
    pinned: dict[str, Any] = {}
    for variable, dimension in ENVIRONMENT_DIMENSIONS.items():
        if variable not in defaults.model_fields_set or dimension in searched:
            continue
        if dimension in _CLASSIFICATION_ONLY and not classification:
            continue
        pinned[dimension] = getattr(defaults, variable)
    return pinned


def pin(space: SearchSpace, pinned: Mapping[str, Any]) -> SearchSpace:
    """`space` with each dimension of `pinned` reduced to its one value."""
    changes: dict[str, Any] = {}
    for dimension, value in pinned.items():
        if dimension in ("learning_rate", "focal_gamma"):
            changes[dimension] = FloatRange(float(value), float(value))
        elif dimension in ("num_epochs", "batch_size"):
            changes[dimension] = (int(value),)
        elif dimension in ("use_class_weights", "use_weighted_sampler"):
            changes[dimension] = (bool(value),)
        else:
            raise ValueError(f"unknown dimension {dimension!r}")
    return replace(space, **changes)
