"""Class weights, focal loss and the weighted sampler against hand arithmetic and torch."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from services.common.errors import InvalidArgument
from services.trainer.core.balancing import (
    FocalLoss,
    class_weights,
    sampler_weights,
    weighted_sampler,
)

LOGITS = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [-0.5, 0.0, 3.0]]
TARGETS = [0, 2, 1]
WEIGHTS = [0.5, 2.0, 1.0]


def _hand_focal(gamma: float, weights: list[float] | None) -> float:
    """The focal loss of LOGITS / TARGETS written out in Python floats."""
    total = 0.0
    weight_sum = 0.0
    for row, target in zip(LOGITS, TARGETS, strict=True):
        p_t = math.exp(row[target]) / sum(math.exp(x) for x in row)
        alpha = 1.0 if weights is None else weights[target]
        total += alpha * -((1.0 - p_t) ** gamma) * math.log(p_t)
        weight_sum += alpha
    return total / weight_sum


def test_focal_loss_equals_hand_computed_value_with_gamma_2() -> None:
    # Row 1: p_t = e^2 / (e^2 + e^0.5 + e^-1) = 0.7856; FL = 0.2144^2 * 0.2413 = 0.01109.
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    first_p = math.exp(2.0) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0))
    assert first_p == pytest.approx(0.78559, abs=1e-5)

    unweighted = FocalLoss(gamma=2.0)(logits, targets)
    assert unweighted.item() == pytest.approx(_hand_focal(2.0, None), abs=1e-6)

    weighted = FocalLoss(gamma=2.0, weight=torch.tensor(WEIGHTS))(logits, targets)
    expected = _hand_focal(2.0, WEIGHTS)
    assert weighted.item() == pytest.approx(expected, abs=1e-6)
    # The weights matter: the rare classes' misclassified rows pull the loss up.
    assert abs(expected - _hand_focal(2.0, None)) > 0.05


def test_focal_loss_down_weights_easy_examples_against_cross_entropy() -> None:
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    focal = FocalLoss(gamma=2.0)(logits, targets).item()
    assert focal < F.cross_entropy(logits, targets).item()


@pytest.mark.parametrize("with_weights", [False, True])
def test_focal_loss_with_gamma_0_is_cross_entropy(with_weights: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=generator) * 3
    targets = torch.randint(0, 5, (64,), generator=generator)
    weight = torch.tensor([0.2, 1.0, 3.5, 0.7, 9.0]) if with_weights else None
    focal = FocalLoss(gamma=0.0, weight=weight)(logits, targets)
    expected = F.cross_entropy(logits, targets, weight=weight)
    assert focal.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_focal_loss_gradient_is_finite_for_extreme_logits(gamma: float) -> None:
    # Row 0 is certain and right (p_t rounds to 1), row 1 certain and wrong (p_t rounds to 0).
    logits = torch.tensor(
        [[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [60.0, 0.0, -60.0]], requires_grad=True
    )
    targets = torch.tensor([0, 0, 0])
    loss = FocalLoss(gamma=gamma, weight=torch.tensor([1.0, 2.0, 3.0]))(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    # The wrong row still pushes its target's logit up.
    assert logits.grad[1, 0] < 0


def test_focal_loss_upcasts_half_precision_logits() -> None:
    logits = torch.tensor(LOGITS, dtype=torch.bfloat16)
    loss = FocalLoss(gamma=2.0)(logits, torch.tensor(TARGETS))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_hand_focal(2.0, None), abs=1e-2)


def test_focal_loss_rejects_negative_gamma_and_bad_shapes() -> None:
    with pytest.raises(InvalidArgument) as caught:
        FocalLoss(gamma=-1.0)
    assert caught.value.field == "balancing.focal_gamma"
    with pytest.raises(ValueError, match="expected logits"):
        FocalLoss(gamma=2.0)(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_focal_loss_weight_follows_the_module_and_is_saved() -> None:
    loss = FocalLoss(gamma=1.0, weight=torch.tensor([1.0, 2.0], dtype=torch.float64))
    saved = loss.state_dict()["weight"]
    assert saved.dtype == torch.float32
    assert saved.tolist() == [1.0, 2.0]


def test_class_weights_follow_the_formula_on_an_imbalanced_distribution() -> None:
    # 100 rows: the top class holds 26%, the rarest 4%.
    counts = {"51": 26, "60": 20, "62": 18, "68": 14, "70": 10, "76": 8, "91": 4}
    labels = sorted(counts)
    weights = class_weights(counts, labels)
    assert weights == pytest.approx([100 / (7 * counts[label]) for label in labels])
    assert weights[labels.index("51")] == pytest.approx(0.5495, abs=1e-4)
    assert weights[labels.index("91")] == pytest.approx(3.5714, abs=1e-4)
    # Every class ends up with the same total weight, n_samples / n_classes.
    for label, weight in zip(labels, weights, strict=True):
        assert weight * counts[label] == pytest.approx(100 / 7)


def test_class_weights_use_only_the_given_labels_in_their_order() -> None:
    counts = {"a": 30, "b": 10, "rare": 2}
    assert class_weights(counts, ["b", "a"]) == pytest.approx([40 / (2 * 10), 40 / (2 * 30)])
    assert class_weights({"a": 5, "b": 5}, ["a", "b"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="without training rows"):
        class_weights({"a": 5}, ["a", "b"])


def test_sampler_weights_are_inverse_class_counts() -> None:
    ids = [0, 0, 0, 1, 2, 2]
    weights = sampler_weights(ids, n_classes=3)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="label ids"):
        sampler_weights([0, 3], n_classes=3)


def test_weighted_sampler_draws_rare_classes_at_the_balanced_rate() -> None:
    label_ids = [0] * 200 + [1] * 20 + [2] * 8
    sampler = weighted_sampler(label_ids, n_classes=3, seed=1234)
    assert len(sampler) == len(label_ids)
    draws: list[int] = []
    while len(draws) < 20_000:  # one epoch is 228 draws; the generator moves on each epoch
        draws.extend(label_ids[index] for index in sampler)
    shares = {label: n / len(draws) for label, n in Counter(draws).items()}
    for label in (0, 1, 2):
        # Without the sampler the rarest class would be 8 / 228 = 3.5% of the draws.
        assert abs(shares[label] - 1 / 3) < 0.03, shares


def test_weighted_sampler_is_reproducible_from_its_seed() -> None:
    label_ids = [0] * 50 + [1] * 5
    first = list(weighted_sampler(label_ids, 2, seed=7))
    assert first == list(weighted_sampler(label_ids, 2, seed=7))
    assert first != list(weighted_sampler(label_ids, 2, seed=8))


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_the_sampler_power_draws_classes_in_proportion_to_count_to_that_power(
    power: float,
) -> None:
    counts = {0: 200, 1: 50, 2: 8}
    label_ids = [label for label, n in counts.items() for _ in range(n)]
    sampler = weighted_sampler(label_ids, n_classes=3, seed=99, power=power)
    draws: list[int] = []
    while len(draws) < 40_000:
        draws.extend(label_ids[index] for index in sampler)
    total = sum(n**power for n in counts.values())
    for label, n in counts.items():
        share = Counter(draws)[label] / len(draws)
        assert abs(share - n**power / total) < 0.02, (power, label, share)
    with pytest.raises(ValueError, match="power"):
        sampler_weights(label_ids, 3, power=1.5)
