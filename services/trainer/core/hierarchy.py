"""Hierarchical classification codes: a group head trained beside the code head.

Codes of a long-tailed label set often share a prefix that means something: the
accounting codes `60.01` and `60.02` belong to the group `60`, banking77's intents group
by their first word (`card_arrival`, `card_not_working` -> `card`). A rare code then
borrows what its group's frequent codes teach. With `BalancingSpec.group_separator` set,
a label's group is its part before the first separator; a label without one is its own
group. The switch is a no-op (logged) unless the labels form at least 2 groups and fewer
groups than labels: otherwise the groups say nothing the codes do not.

Training: a forward pre-hook on the code head's final linear layer keeps the features that
layer sees (`probe.final_linear`, the same vectors the linear probe fits on); a second
linear layer, the group head (seeded by the job's seed), maps them to group logits, and
`GROUP_LOSS_WEIGHT * cross_entropy(group_logits, group(target))` is added to the code loss
(which keeps its focal / class-weight / logit-adjusted form). The group head trains in the
head's optimizer group, and the linear probe fits it on the frozen features as it fits
the code head.

Prediction (the evaluation and a reloaded adapter alike):

    score(code) = log_softmax(code_logits)[code] + log_softmax(group_logits)[group(code)]

and the predicted code is the argmax of the scores. A post-hoc logit adjustment, chosen on
these scores, still folds into the code head's bias: log_softmax only shifts a row by a
constant, so argmax(score - tau * log prior) is the argmax of the score of the adjusted
code logits. The saved adapter carries the group head in `group_head.safetensors` and the
group map in training_config.json (`hierarchy`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from services.trainer.core.probe import final_linear, fit_linear_probe
from services.trainer.core.targets import HEAD_NAMES

__all__ = [
    "GROUP_HEAD_FILE",
    "GROUP_LOSS_WEIGHT",
    "GroupHead",
    "HierarchicalLoss",
    "LabelGroups",
    "build_group_head",
    "combine",
    "group_of",
    "load_group_head",
]

logger = logging.getLogger(__name__)

GROUP_HEAD_FILE = "group_head.safetensors"
# The group loss's weight beside the code loss (a constant: one more dimension to search
# would cost trials before it pays).
GROUP_LOSS_WEIGHT = 0.5
# A new head's init, as transformers initialises a head missing from a checkpoint.
_INIT_STD = 0.02


def group_of(label: str, separator: str) -> str:
    """The label's part before the first `separator`; the label itself when it has none
    (or when `separator` is empty)."""
    if not separator or separator not in label:
        return label
    return label.split(separator, 1)[0]


@dataclass(frozen=True)
class LabelGroups:
    """The label hierarchy: group names (sorted) and each label's group index."""

    separator: str
    groups: tuple[str, ...]
    code_groups: tuple[int, ...]  # per label (the head's class id): its group's index

    @classmethod
    def from_labels(cls, labels: Sequence[str], separator: str) -> LabelGroups:
        """Group `labels` (in the head's order) by their part before `separator`."""
        names = [group_of(label, separator) for label in labels]
        groups = tuple(sorted(set(names)))
        index = {group: i for i, group in enumerate(groups)}
        return cls(separator, groups, tuple(index[name] for name in names))

    @property
    def useful(self) -> bool:
        """At least 2 groups and fewer groups than labels: the groups say something."""
        return 2 <= len(self.groups) < len(self.code_groups)

    def to_json(self, labels: Sequence[str]) -> dict[str, Any]:
        """The map as training_config.json keeps it (label -> group, readable)."""
        return {
            "separator": self.separator,
            "groups": list(self.groups),
            "label_groups": {
                label: self.groups[group]
                for label, group in zip(labels, self.code_groups, strict=True)
            },
        }

    @classmethod
    def from_json(cls, content: Mapping[str, Any], labels: Sequence[str]) -> LabelGroups:
        """The map `to_json` wrote, for `labels` in the head's order.

        Raises:
            KeyError, TypeError, ValueError: the content is not such a map.
        """
        groups = tuple(str(group) for group in content["groups"])
        index = {group: i for i, group in enumerate(groups)}
        of_label = content["label_groups"]
        return cls(
            str(content["separator"]), groups, tuple(index[str(of_label[lab])] for lab in labels)
        )


def combine(
    code_logits: torch.Tensor, group_logits: torch.Tensor, code_groups: torch.Tensor
) -> torch.Tensor:
    """Each code's score: log_softmax(code_logits)[code] + log_softmax(group_logits)[group(code)].

    `code_logits` (N, codes), `group_logits` (N, groups), `code_groups` (codes,): each
    code's group index. Computed in float32.
    """
    code_log_probs = F.log_softmax(code_logits.float(), dim=-1)
    group_log_probs = F.log_softmax(group_logits.float(), dim=-1)
    return code_log_probs + group_log_probs[:, code_groups.to(group_log_probs.device)]


class GroupHead(nn.Module):
    """The group head: a linear layer from the features the code head's final linear layer
    sees to group logits, with the hook that keeps those features.

    `attach(layer)` registers the forward pre-hook on the code head's final layer; after
    each forward of the model, `loss(targets)` (training) or `scores(code_logits)`
    (prediction) consumes the features that forward kept. The hook lives as long as the
    layer (a job's head, or a loaded adapter's).
    """

    code_groups: torch.Tensor

    def __init__(self, groups: LabelGroups, in_features: int, seed: int = 0) -> None:
        super().__init__()
        self.groups = groups
        self.linear = nn.Linear(in_features, len(groups.groups))
        # Seeded by the job alone, and without drawing from torch's global generator: the
        # switch must not change the random stream the rest of the job sees.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            nn.init.normal_(self.linear.weight, mean=0.0, std=_INIT_STD, generator=generator)
            nn.init.zeros_(self.linear.bias)
        self.register_buffer("code_groups", torch.tensor(groups.code_groups, dtype=torch.long))
        self._features: torch.Tensor | None = None
        self._handle: Any = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Group logits of `features` (N, in_features)."""
        logits: torch.Tensor = self.linear(features.to(self.linear.weight.dtype))
        return logits

    # ---- the hook ------------------------------------------------------------------------

    def attach(self, layer: nn.Module) -> None:
        """Keep the input of every forward of `layer` (the code head's final linear layer)."""
        self.detach()
        self._handle = layer.register_forward_pre_hook(self._keep)

    def detach(self) -> None:
        """Stop keeping features (and drop the last ones)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._features = None

    def _keep(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # Not detached: in training the group loss backpropagates into the features.
        self._features = args[0]

    def _take(self) -> torch.Tensor:
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("the group head saw no features: attach it to the code head")
        if features.dim() != 2:
            raise RuntimeError("the code head sees more than one vector per row: no group head")
        return features

    # ---- after a forward -----------------------------------------------------------------

    def group_targets(self, code_targets: torch.Tensor) -> torch.Tensor:
        """Each row's group index from its code's class id."""
        return self.code_groups[code_targets]

    def loss(self, code_targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the group logits of the last forward's features against
        the groups of `code_targets`."""
        logits = self(self._take())
        return F.cross_entropy(logits.float(), self.group_targets(code_targets))

    def scores(self, code_logits: torch.Tensor) -> torch.Tensor:
        """`combine(code_logits, group logits of the last forward's features)`."""
        return combine(code_logits, self(self._take()), self.code_groups)

    # ---- the linear probe ----------------------------------------------------------------

    def fit(self, features: torch.Tensor, code_targets: torch.Tensor) -> None:
        """Fit the group head on frozen features (the linear probe's, unweighted like the
        group loss)."""
        targets = self.group_targets(code_targets.to(self.code_groups.device))
        weight, bias = fit_linear_probe(
            features, targets.to(features.device), len(self.groups.groups)
        )
        with torch.no_grad():
            self.linear.weight.copy_(weight.to(self.linear.weight.device))
            if bias is not None:
                self.linear.bias.copy_(bias.to(self.linear.bias.device))

    # ---- on disk -------------------------------------------------------------------------

    def save(self, folder: Path) -> Path:
        """Write the linear layer to `folder/GROUP_HEAD_FILE`; returns the file."""
        from safetensors.torch import save_file

        path = Path(folder) / GROUP_HEAD_FILE
        save_file(
            {
                "weight": self.linear.weight.detach().float().cpu().contiguous(),
                "bias": self.linear.bias.detach().float().cpu().contiguous(),
            },
            str(path),
        )
        return path


class HierarchicalLoss(nn.Module):
    """`inner(logits, targets) + weight * group_head.loss(targets)`: the code loss (focal,
    class-weighted or logit-adjusted, as the job asks) plus the group loss on the features
    the same forward gave the code head."""

    def __init__(
        self, inner: nn.Module, group_head: GroupHead, weight: float = GROUP_LOSS_WEIGHT
    ) -> None:
        super().__init__()
        self.inner = inner
        self.group_head = group_head
        self.group_weight = weight
        # The inner loss's class weights, for whoever reads them (the linear probe).
        self.weight = getattr(inner, "weight", None)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The code loss plus the weighted group loss."""
        code: torch.Tensor = self.inner(logits, targets)
        return code + self.group_weight * self.group_head.loss(targets)


def build_group_head(
    model: nn.Module,
    labels: Sequence[str],
    separator: str,
    seed: int,
    device: torch.device,
) -> GroupHead | None:
    """A fresh group head attached to `model`'s code head, or None (logged) when the
    separator is empty, the labels form no useful hierarchy, or the head cannot be tapped
    (a decoder's `score` sees every position)."""
    if not separator:
        return None
    groups = LabelGroups.from_labels(labels, separator)
    if not groups.useful:
        logger.info(
            "group_separator %r: %d labels form %d groups; no group head (it needs at least "
            "2 groups and fewer groups than labels)",
            separator,
            len(labels),
            len(groups.groups),
        )
        return None
    layer = final_linear(model, len(labels))
    if layer is None:
        logger.warning(
            "group_separator %r: the model's head has no final linear layer on pooled "
            "features; no group head",
            separator,
        )
        return None
    head = GroupHead(groups, layer.in_features, seed).to(device)
    head.attach(layer)
    logger.info(
        "group head: %d labels in %d groups by %r, group loss weight %g",
        len(labels),
        len(groups.groups),
        separator,
        GROUP_LOSS_WEIGHT,
    )
    return head


def load_group_head(
    model: nn.Module,
    labels: Sequence[str],
    content: Mapping[str, Any],
    folder: Path,
    device: torch.device,
) -> GroupHead:
    """The saved group head (`content`: training_config.json's `hierarchy`), attached to
    the loaded adapter's code head.

    Raises:
        FileNotFoundError: no group_head.safetensors in `folder`.
        KeyError, TypeError, ValueError: the map or the file does not fit the labels.
        LookupError: the loaded model has no code head to attach to.
    """
    from safetensors.torch import load_file

    groups = LabelGroups.from_json(content, labels)
    path = Path(folder) / GROUP_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    state = load_file(str(path))
    weight = state["weight"]
    if weight.dim() != 2 or weight.shape[0] != len(groups.groups):
        raise ValueError(f"{path} does not hold a head of the map's {len(groups.groups)} groups")
    layer = _code_head_layer(model, len(labels))
    if layer is None:
        raise LookupError("the loaded model has no code head for the group head")
    head = GroupHead(groups, int(weight.shape[1]))
    head.linear.load_state_dict(state)
    head.to(device)
    head.eval()
    head.attach(layer)
    return head


def _code_head_layer(model: nn.Module, n_classes: int) -> nn.Linear | None:
    """The code head's final linear layer as the model runs it: the trainable one of a
    training model (`probe.final_linear`), else (a loaded adapter, nothing trainable) the
    last `n_classes`-output linear layer of the head that is not PEFT's frozen original."""
    found = final_linear(model, n_classes)
    if found is not None:
        return found
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if not isinstance(head, nn.Module):
            continue
        layers = [
            module
            for path, module in head.named_modules()
            if isinstance(module, nn.Linear)
            and module.out_features == n_classes
            and "original_module" not in path.split(".")
        ]
        if layers:
            return layers[-1]
    return None
