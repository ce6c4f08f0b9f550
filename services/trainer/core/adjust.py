"""Logit adjustment for long-tailed classification (Menon et al., ICLR 2021).

- As a loss: train on `logits + tau * log(prior)`, so the head learns margins that favour
  rare classes (`BalancingSpec.logit_adjust_tau`).
- Post hoc: predict `argmax(logits - tau * log(prior))`. It needs no retraining, so each
  evaluation chooses `tau` from a grid by macro-F1 on the validation predictions
  (`BalancingSpec.posthoc_logit_adjustment`); the chosen `tau` travels with the adapter
  folded into the head's bias (`-tau * log(prior)` added to it when the adapter is saved),
  so whoever loads the adapter predicts exactly what the evaluation scored.

The prior is the training split's class frequencies (after class filtering).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from services.common.classification import classification_report

# Post-hoc tau candidates: 0 (no adjustment) .. 2 (beyond the Bayes-optimal 1 for a
# balanced target, which noisy heads sometimes need).
TAU_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def log_prior(counts: Mapping[str, int], labels: Sequence[str]) -> torch.Tensor:
    """log(n_c / n) per label, in the head's label order."""
    total = sum(counts[label] for label in labels)
    return torch.tensor([counts[label] / total for label in labels], dtype=torch.float32).log()


def choose_tau(
    logits: torch.Tensor,
    prior: torch.Tensor,
    references: Sequence[str],
    labels: Sequence[str],
    grid: Sequence[float] = TAU_GRID,
) -> tuple[float, list[str]]:
    """The tau of `grid` whose adjusted predictions score the best macro-F1 on `references`
    (the smallest of equals), and those predictions."""
    best_tau, best_f1, best_predictions = 0.0, -1.0, [labels[0]] * len(references)
    logits = logits.float()
    for tau in grid:
        ids = (logits - tau * prior).argmax(-1).tolist()
        predictions = [labels[i] for i in ids]
        f1 = classification_report(predictions, list(references), list(labels)).f1_macro
        if f1 > best_f1 + 1e-12:
            best_tau, best_f1, best_predictions = float(tau), f1, predictions
    return best_tau, best_predictions


class LogitAdjustedLoss(nn.Module):
    """`inner(logits + tau * log_prior, targets)`: the logit-adjusted training loss."""

    def __init__(self, inner: nn.Module, prior: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("offset", tau * prior)
        # The inner loss's class weights, for whoever reads them (the linear probe).
        self.weight = getattr(inner, "weight", None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The inner loss on the adjusted logits."""
        offset = self.get_buffer("offset")
        result: torch.Tensor = self.inner(logits + offset.to(logits.dtype), targets)
        return result


@contextlib.contextmanager
def folded(head: nn.Linear | None, offsets: torch.Tensor | None) -> Iterator[None]:
    """While inside, the head's bias includes `offsets` (to save an adjusted adapter)."""
    if head is None or head.bias is None or offsets is None:
        yield
        return
    with torch.no_grad():
        head.bias.add_(offsets.to(head.bias.device, head.bias.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            head.bias.sub_(offsets.to(head.bias.device, head.bias.dtype))
