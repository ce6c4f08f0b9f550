"""Class balancing for imbalanced classification: class weights, focal loss, weighted sampler."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch.utils.data import WeightedRandomSampler

from services.common.errors import InvalidArgument

__all__ = ["FocalLoss", "class_weights", "sampler_weights", "weighted_sampler"]


def class_weights(counts: Mapping[str, int], labels: Sequence[str]) -> list[float]:
    """Return ``w_i = n_samples / (n_classes * n_samples_i)`` for each label, in ``labels`` order.

    ``n_samples`` and ``n_classes`` are taken over ``labels`` only, so labels left out of
    training do not shift the weights of the kept ones. A perfectly balanced set gets 1.0
    everywhere; a class with half the average count gets 2.0.

    Raises:
        ValueError: ``labels`` is empty, or a label has no count or a count under 1.
    """
    if not labels:
        raise ValueError("class weights need at least one label")
    missing = [label for label in labels if counts.get(label, 0) < 1]
    if missing:
        raise ValueError(f"labels without training rows have no class weight: {missing[:10]}")
    n_samples = sum(counts[label] for label in labels)
    n_classes = len(labels)
    return [n_samples / (n_classes * counts[label]) for label in labels]


class FocalLoss(torch.nn.Module):
    """Focal loss ``FL = -alpha_t * (1 - p_t)^gamma * log(p_t)`` (Lin et al., 2017), mean-reduced.

    ``alpha_t = weight[target]`` when class weights are given, else 1. The mean divides by
    the sum of ``alpha_t`` over the batch when weights are given (by N otherwise), the same
    normalisation as ``torch.nn.functional.cross_entropy(weight=...)``: with ``gamma=0`` the
    loss is exactly weighted cross-entropy, so turning focusing off in the search space
    reproduces the plain baseline rather than a rescaled one.

    The arithmetic runs in float32 from ``log_softmax`` (half-precision logits are upcast),
    and ``1 - p_t`` is computed as ``-expm1(log p_t)``, so confident predictions neither
    take ``log(0)`` nor lose the small ``1 - p_t`` to rounding.
    """

    weight: torch.Tensor | None

    def __init__(self, gamma: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not math.isfinite(gamma) or gamma < 0:
            raise InvalidArgument(
                f"must be a finite number >= 0, got {gamma}", field="balancing.focal_gamma"
            )
        if weight is not None and (weight.dim() != 1 or not bool(torch.all(weight >= 0))):
            raise ValueError("class weights must be a 1-D tensor of non-negative values")
        self.gamma = float(gamma)
        # A buffer follows the module across .to(device) and lands in state_dict.
        self.register_buffer("weight", None if weight is None else weight.detach().float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the mean focal loss of ``logits`` (N, C) against class ids ``targets`` (N,)."""
        if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
            raise ValueError(
                f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} "
                f"and {tuple(targets.shape)}"
            )
        targets = targets.long()
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_p_t = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        terms = -log_p_t
        if self.gamma != 0.0:
            # The floor keeps the gradient of x^gamma finite at x = 0 when gamma < 1;
            # a term that small contributes nothing to the loss anyway.
            one_minus_p_t = (-torch.expm1(log_p_t)).clamp_min(torch.finfo(torch.float32).tiny)
            terms = one_minus_p_t.pow(self.gamma) * terms
        if self.weight is None:
            return terms.mean()
        alpha_t = self.weight.to(terms.device)[targets]
        return (alpha_t * terms).sum() / alpha_t.sum()


def sampler_weights(label_ids: Sequence[int], n_classes: int, power: float = 0.0) -> torch.Tensor:
    """Return per-example weights ``count(class) ** (power - 1)``.

    A class is then drawn with probability proportional to ``count(class) ** power``:
    ``power`` 0 draws every class equally often (class-balanced), 1 as often as it occurs
    (instance-balanced, a plain shuffle), and values between trade one for the other
    (square-root sampling at 0.5).

    Raises:
        ValueError: a label id is outside ``[0, n_classes)``.
    """
    ids = torch.as_tensor(list(label_ids), dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_classes):
        raise ValueError(
            f"label ids must lie in [0, {n_classes}), got {int(ids.min())}..{int(ids.max())}"
        )
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"power must lie in [0, 1], got {power}")
    counts = torch.bincount(ids, minlength=n_classes).double()
    return counts[ids] ** (power - 1.0)


def weighted_sampler(
    label_ids: Sequence[int], n_classes: int, seed: int, power: float = 0.0
) -> WeightedRandomSampler:
    """Return a sampler that draws ``len(label_ids)`` examples per epoch, each class with
    probability proportional to ``count ** power`` (0 = classes at equal rates).

    Draws are with replacement (a rare class's rows repeat within an epoch) and come from
    a generator seeded with ``seed``: the same seed gives the same sequence of epochs.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    # The sampler takes a tensor as it is (torch.as_tensor); its stub says Sequence[float].
    weights = cast(Sequence[float], sampler_weights(label_ids, n_classes, power))
    return WeightedRandomSampler(
        weights,
        num_samples=len(label_ids),
        replacement=True,
        generator=generator,
    )
