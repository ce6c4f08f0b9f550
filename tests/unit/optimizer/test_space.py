"""The search space: validation, suggestions from a real Optuna trial, clipping of the defaults."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import optuna
import pytest

from services.common.defaults import TrainingDefaults
from services.common.errors import InvalidArgument
from services.optimizer.core.space import (
    FloatRange,
    SearchSpace,
    TrialParameters,
    default_space,
    default_trial,
    modules_for,
    result_key,
    suggest,
    validate,
)

DEFAULTS = TrainingDefaults()


def ask(space: SearchSpace, *, seed: int = 0, enqueue: dict[str, Any] | None = None) -> Any:
    """A trial of a fresh in-memory study (random sampler, so every dimension is drawn)."""
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    if enqueue is not None:
        study.enqueue_trial(enqueue)
    return study.ask()


# ---- validate -------------------------------------------------------------------------------


@pytest.mark.parametrize("classification", [True, False])
def test_the_default_spaces_are_valid(classification: bool) -> None:
    validate(default_space(classification))


def test_classification_learns_faster_by_default() -> None:
    # Its head is new and learns from scratch: a higher learning-rate range.
    assert default_space(True).learning_rate == FloatRange(5e-5, 2e-3, log=True)
    assert default_space(False).learning_rate == FloatRange(1e-5, 5e-4, log=True)


BAD_SPACES: list[tuple[str, dict[str, Any], str]] = [
    ("no rank", {"rank": ()}, "rank"),
    ("rank 0", {"rank": (8, 0)}, "rank"),
    ("no multiplier", {"alpha_multiplier": ()}, "alpha_multiplier"),
    ("multiplier 0", {"alpha_multiplier": (0.0,)}, "alpha_multiplier"),
    ("no epochs", {"num_epochs": ()}, "num_epochs"),
    ("negative epochs", {"num_epochs": (-1, 2)}, "num_epochs"),
    ("no modules", {"target_modules": ()}, "target_modules"),
    ("no rslora", {"use_rslora": ()}, "use_rslora"),
    ("no class weights", {"use_class_weights": ()}, "use_class_weights"),
    ("no sampler", {"use_weighted_sampler": ()}, "use_weighted_sampler"),
    ("batch 0", {"batch_size": (0,)}, "batch_size"),
    ("dropout inverted", {"dropout": FloatRange(0.2, 0.1)}, "dropout"),
    ("dropout 1", {"dropout": FloatRange(0.0, 1.0)}, "dropout"),
    ("dropout < 0", {"dropout": FloatRange(-0.1, 0.1)}, "dropout"),
    ("dropout nan", {"dropout": FloatRange(float("nan"), 0.1)}, "dropout"),
    ("lr inverted", {"learning_rate": FloatRange(1e-2, 1e-4, log=True)}, "learning_rate"),
    ("lr 0 on a log scale", {"learning_rate": FloatRange(0.0, 1e-3, log=True)}, "learning_rate"),
    ("lr 0", {"learning_rate": FloatRange(0.0, 1e-3)}, "learning_rate"),
    ("lr infinite", {"learning_rate": FloatRange(1e-4, float("inf"))}, "learning_rate"),
    ("gamma < 0", {"focal_gamma": FloatRange(-1.0, 2.0)}, "focal_gamma"),
    ("unknown choice", {"target_modules": ("attention", "made-up")}, "target_modules"),
    ("no separator choice", {"group_separator": ()}, "group_separator"),
    ("separator too long", {"group_separator": ("", "-----")}, "group_separator"),
    ("separator a tab", {"group_separator": ("\t",)}, "group_separator"),
]


@pytest.mark.parametrize(
    ("changes", "field"), [case[1:] for case in BAD_SPACES], ids=[case[0] for case in BAD_SPACES]
)
def test_validate_names_the_bad_dimension(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(replace(default_space(True), **changes))
    assert caught.value.field == f"search_space.{field}"


def test_an_unknown_choice_lists_the_known_ones() -> None:
    space = replace(
        default_space(True), target_modules=("mine", "qv"), module_sets={"qv": ("q_proj",)}
    )
    with pytest.raises(InvalidArgument) as caught:
        validate(space)
    assert "'mine'" in caught.value.message
    assert "all-linear, attention, qv" in caught.value.message


GOOD_SETS: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "bert attention out": ("attention.output.dense",),
    "layer 0 only": ("layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"),
    "attention+mlp": ("attention", "up_proj", "down_proj"),  # the trainer expands "attention"
}


def test_named_module_sets_that_are_well_formed_pass() -> None:
    validate(replace(default_space(False), target_modules=tuple(GOOD_SETS), module_sets=GOOD_SETS))


@pytest.mark.parametrize(
    ("name", "modules", "says"),
    [
        ("", ("q_proj",), "a choice needs a name"),
        ("   ", ("q_proj",), "a choice needs a name"),
        ("x" * 65, ("q_proj",), "a choice needs a name"),
        ("empty", (), "names no module"),
        ("many", tuple(f"m{i}" for i in range(257)), "at most 256"),
        ("space", ("q proj",), "malformed"),
        ("digit first", ("0_proj",), "malformed"),
        ("double dot", ("self_attn..q_proj",), "malformed"),
        ("leading dot", (".q_proj",), "malformed"),
        ("trailing dot", ("q_proj.",), "malformed"),
        ("empty name", ("q_proj", ""), "malformed"),
        ("wildcard", ("*proj",), "malformed"),
        ("too long", ("a" * 201,), "malformed"),
        ("hyphen", ("all-linear",), "malformed"),  # a token, not a module
    ],
)
def test_a_bad_module_set_is_refused_before_any_trial(
    name: str, modules: tuple[str, ...], says: str
) -> None:
    space = replace(default_space(False), target_modules=(name,), module_sets={name: modules})
    with pytest.raises(InvalidArgument) as caught:
        validate(space)
    assert caught.value.field == "search_space.target_modules"
    assert says in caught.value.message


def test_a_module_name_of_the_longest_allowed_length_passes() -> None:
    space = replace(
        default_space(False), target_modules=("long",), module_sets={"long": ("a" * 200,)}
    )
    validate(space)


# ---- suggest --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_suggestions_stay_inside_the_space(seed: int) -> None:
    space = replace(default_space(True), batch_size=(8, 16))
    trial = ask(space, seed=seed)

    params = suggest(trial, space, DEFAULTS, True)

    assert params.rank in space.rank
    assert params.alpha / params.rank in space.alpha_multiplier
    assert space.dropout.low <= params.dropout <= space.dropout.high
    assert space.learning_rate.low <= params.learning_rate <= space.learning_rate.high
    assert params.num_epochs in space.num_epochs
    assert params.batch_size in (8, 16)
    assert space.focal_gamma.low <= params.focal_gamma <= space.focal_gamma.high
    assert params.target_modules in {("attention",), ()}
    # Every dimension was asked of the trial, so the sampler learns from all of them.
    assert set(trial.params) == {
        "rank",
        "alpha_multiplier",
        "dropout",
        "learning_rate",
        "num_epochs",
        "batch_size",
        "target_modules",
        "use_rslora",
        "focal_gamma",
        "use_class_weights",
        "use_weighted_sampler",
        "two_stage",
    }


def test_generation_takes_balancing_from_the_defaults_and_asks_nothing_of_it() -> None:
    defaults = TrainingDefaults(
        focal_loss_gamma=1.5, use_class_weights=False, use_weighted_sampler=True
    )
    space = default_space(False)
    trial = ask(space)

    params = suggest(trial, space, defaults, False)

    assert (params.focal_gamma, params.use_class_weights, params.use_weighted_sampler) == (
        1.5,
        False,
        True,
    )
    assert not {"focal_gamma", "use_class_weights", "use_weighted_sampler"} & set(trial.params)


def test_fixed_dimensions_are_not_asked_and_batch_comes_from_the_defaults() -> None:
    space = SearchSpace(
        rank=(16,),
        alpha_multiplier=(2.0,),
        dropout=FloatRange(0.05, 0.05),
        learning_rate=FloatRange(3e-4, 3e-4, log=True),
        num_epochs=(2,),
        target_modules=("attention",),
        use_rslora=(True,),
    )
    trial = ask(space)

    params = suggest(trial, space, TrainingDefaults(lora_batch_size=12), False)

    assert params == TrialParameters(
        rank=16,
        alpha=32.0,
        dropout=0.05,
        target_modules=("attention",),
        use_rslora=True,
        learning_rate=3e-4,
        num_epochs=2,
        batch_size=12,
        focal_gamma=DEFAULTS.focal_loss_gamma,
        use_class_weights=DEFAULTS.use_class_weights,
        use_weighted_sampler=DEFAULTS.use_weighted_sampler,
    )
    assert trial.params == {}


@pytest.mark.parametrize("classification", [True, False])
def test_attention_is_sent_as_the_abstract_choice(classification: bool) -> None:
    space = replace(default_space(classification), target_modules=("attention",))

    params = suggest(ask(space), space, DEFAULTS, classification)

    assert params.target_modules == ("attention",)
    assert params.as_log_dict()["target_modules"] == ["attention"]


def test_all_linear_is_sent_as_no_names() -> None:
    space = replace(default_space(False), target_modules=("all-linear",))

    params = suggest(ask(space), space, DEFAULTS, False)

    assert params.target_modules == ()  # the trainer's "every linear layer"
    assert params.as_log_dict()["target_modules"] == "all-linear"


def test_a_named_set_is_sent_as_its_module_names() -> None:
    space = replace(
        default_space(False), target_modules=("qv",), module_sets={"qv": ("q_proj", "v_proj")}
    )

    params = suggest(ask(space), space, DEFAULTS, False)

    assert params.target_modules == ("q_proj", "v_proj")


def test_each_choice_maps_to_what_the_trainer_resolves() -> None:
    space = replace(
        default_space(False),
        target_modules=("attention", "all-linear", "qv", "mine"),
        module_sets={"qv": ("q_lin", "v_lin"), "mine": ("attention", "lin1")},
    )
    validate(space)

    assert modules_for("attention", space) == ("attention",)
    assert modules_for("all-linear", space) == ()
    assert modules_for("qv", space) == ("q_lin", "v_lin")
    assert modules_for("mine", space) == ("attention", "lin1")
    # A set the user named "attention" is theirs: its names win over the abstract choice.
    own = replace(space, module_sets={"attention": ("query", "value")})
    assert modules_for("attention", own) == ("query", "value")


def test_the_sampler_chooses_among_all_target_choices() -> None:
    space = replace(
        default_space(False),
        target_modules=("attention", "all-linear", "qv"),
        module_sets={"qv": ("q_proj", "v_proj")},
    )
    seen = {
        suggest(ask(space, seed=seed), space, DEFAULTS, False).target_modules for seed in range(30)
    }

    assert seen == {("attention",), (), ("q_proj", "v_proj")}


# ---- the first trial: the defaults, clipped into the space ----------------------------------


def test_the_first_trial_is_the_defaults_when_they_fit() -> None:
    space = replace(default_space(True), batch_size=(4, 8))

    first = default_trial(space, DEFAULTS, True)

    assert first == {
        "rank": DEFAULTS.lora_rank,
        "alpha_multiplier": 2.0,
        "dropout": DEFAULTS.lora_dropout,
        "learning_rate": DEFAULTS.lora_learning_rate,
        "num_epochs": DEFAULTS.lora_num_epochs,
        "target_modules": "all-linear",
        "use_rslora": False,
        "focal_gamma": DEFAULTS.focal_loss_gamma,
        "use_class_weights": DEFAULTS.use_class_weights,
        "use_weighted_sampler": DEFAULTS.use_weighted_sampler,
        "posthoc_logit_adjustment": True,
        "logit_adjust_tau": 0.0,
        "sampler_power": 0.0,
        "two_stage": False,
        "group_separator": "",
        "batch_size": DEFAULTS.lora_batch_size,
    }


def test_defaults_outside_the_space_are_clipped_into_it() -> None:
    # The demo's cut-down space: none of the documented defaults fits it.
    space = SearchSpace(
        rank=(4, 8),
        alpha_multiplier=(1.0,),
        dropout=FloatRange(0.1, 0.2),
        learning_rate=FloatRange(1e-3, 5e-3, log=True),
        num_epochs=(1, 2),
        target_modules=("attention",),
        use_rslora=(True,),
        batch_size=(16,),
        focal_gamma=FloatRange(0.0, 1.0),
        use_class_weights=(False,),
        use_weighted_sampler=(True,),
    )

    first = default_trial(space, DEFAULTS, True)

    assert first == {
        "rank": 4,  # 16 is no choice: the first choice
        "alpha_multiplier": 1.0,
        "dropout": 0.1,  # 0.05 raised to the low end
        "learning_rate": 1e-3,  # 1e-4 raised to the low end
        "num_epochs": 1,  # 3 is no choice
        "target_modules": "attention",
        "use_rslora": True,
        "focal_gamma": 1.0,  # 2.0 lowered to the high end
        "use_class_weights": False,
        "use_weighted_sampler": True,
        "posthoc_logit_adjustment": False,
        "logit_adjust_tau": 0.0,
        "sampler_power": 0.0,
        "two_stage": False,
        "group_separator": "",
        "batch_size": 16,  # 4 is no choice
    }
    # Enqueued as the optimizer does, the trial gets exactly these values.
    params = suggest(ask(space, enqueue=first), space, DEFAULTS, True)
    assert (params.rank, params.learning_rate, params.num_epochs, params.batch_size) == (
        4,
        1e-3,
        1,
        16,
    )
    assert (params.dropout, params.focal_gamma) == (0.1, 1.0)
    assert params.target_modules == ("attention",)


def test_the_first_generation_trial_leaves_balancing_and_batch_alone() -> None:
    first = default_trial(default_space(False), DEFAULTS, False)

    assert not {"focal_gamma", "use_class_weights", "use_weighted_sampler", "batch_size"} & set(
        first
    )


def test_a_probe_only_point_is_one_point_whatever_its_training_dimensions() -> None:
    point = {**default_trial(default_space(True), DEFAULTS, True), "num_epochs": 0}
    other = {
        **point,
        "rank": 64,
        "learning_rate": 1e-3,
        "focal_gamma": 0.5,
        "use_class_weights": not point["use_class_weights"],
        "use_weighted_sampler": not point["use_weighted_sampler"],
        "target_modules": "attention",
        "two_stage": True,
    }
    assert result_key(point) == result_key(other)
    # What a frozen pass and its evaluation depend on still tells points apart.
    assert result_key(point) != result_key({**point, "posthoc_logit_adjustment": False})
    assert result_key(point) != result_key({**point, "group_separator": "."})
    # A trial that fine-tunes is the same point only with every parameter equal.
    trained = {**point, "num_epochs": 2}
    assert result_key(trained) == result_key(dict(reversed(list(trained.items()))))
    assert result_key(trained) != result_key({**trained, "learning_rate": 1e-3})
