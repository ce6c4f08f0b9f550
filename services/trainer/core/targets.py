"""LoRA target modules: the abstract choices ("attention", "all-linear") resolved on the model.

The optimizer does not know a model's module names; it asks for "attention", "all-linear"
(or nothing, which means the same), or names modules itself. The trainer, which has the
model, turns the request into PEFT's `target_modules`: dotted name suffixes, each matching
only the modules meant (PEFT matches a suffix at a dot boundary), checked against the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from services.common.errors import InvalidArgument

__all__ = [
    "ALL_LINEAR",
    "ATTENTION",
    "HEAD_NAMES",
    "NEVER_TARGETED",
    "attention_module_names",
    "linear_module_names",
    "resolve_targets",
    "target_suffixes",
]

ATTENTION = "attention"
ALL_LINEAR = "all-linear"
_FIELD = "hyperparameters.lora.target_modules"

# Attribute names of the classification head in transformers' *ForSequenceClassification
# models (`score` for decoders such as Qwen / Llama, `classifier` for encoders such as BERT).
# PEFT's SEQ_CLS task type puts exactly these into `modules_to_save`, so the head trains and
# lands in the adapter file.
HEAD_NAMES: tuple[str, ...] = ("score", "classifier")
# Never a LoRA target: the heads above and the LM head of causal models.
NEVER_TARGETED: tuple[str, ...] = ("lm_head", *HEAD_NAMES)

# Attribute names of attention blocks, for classes whose name does not say "Attention".
_ATTENTION_ATTRIBUTES = frozenset(
    {"attention", "self_attn", "attn", "self_attention", "cross_attn", "crossattention"}
)
# Linear layers inside an attention block that are not q / k / v / output projections, per
# `config.model_type`: DeBERTa's projections of the relative-position embeddings (v1 always,
# v2 when `share_att_key` is off) work on positions, not on the tokens' hidden states.
_NOT_PROJECTIONS: dict[str, frozenset[str]] = {
    "deberta": frozenset({"pos_proj", "pos_q_proj"}),
    "deberta-v2": frozenset({"pos_key_proj", "pos_query_proj"}),
}


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted leaf names of the linear layers LoRA may target (heads excluded).

    `bnb.nn.Linear4bit` subclasses `nn.Linear`, so quantised layers are listed too; GPT-2
    style `Conv1D` layers count as linear, as they do for PEFT.
    """
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_layers(model)})


def attention_module_names(model: nn.Module) -> list[str]:
    """Full names of the attention projections: what "attention" means, in module order.

    "attention" is every linear layer (or GPT-2 `Conv1D`) inside an attention block: the
    query, key and value projections (separate or fused, e.g. GPT-2's `c_attn`) and the
    output projection that maps the heads back to the hidden size (`o_proj`, DistilBERT's
    `out_lin`, BERT's `attention.output.dense`, GPT-2's `attn.c_proj`). The MLP, embeddings,
    poolers and heads are not. An attention block is a module whose class name contains
    "Attention" (not a whole layer or block such as `JambaAttentionDecoderLayer`) or whose
    attribute name is `self_attn`, `attention`, `attn` or the like. Where a model keeps other
    linear layers inside its attention (DeBERTa's relative-position projections), a table
    keyed by `config.model_type` leaves them out.

    Empty for a model without attention (e.g. a state-space model).
    """
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    excluded = _NOT_PROJECTIONS.get(model_type, frozenset())
    blocks = {
        name for name, module in model.named_modules() if name and _is_attention(name, module)
    }
    selected: list[str] = []
    for name in _linear_layers(model):
        parts = name.split(".")
        if parts[-1] in excluded:
            continue
        ancestors = (".".join(parts[:i]) for i in range(1, len(parts)))
        if any(ancestor in blocks for ancestor in ancestors):
            selected.append(name)
    return selected


def resolve_targets(model: nn.Module, requested: Sequence[str]) -> list[str]:
    """PEFT's `target_modules` for a request, checked against `model`.

    - empty, or "all-linear" alone: every linear layer but the heads (and anything PEFT
      would wrap as a head, e.g. DistilBERT's `pre_classifier`, which then trains in full);
    - "attention": the attention projections (see `attention_module_names`);
    - module names (leaf names or dotted suffixes): taken as they are once each names a
      linear layer of the model; "attention" may be mixed with names (the union).

    The tokens are matched case-insensitively. Returns dotted suffixes that PEFT matches
    against exactly the modules meant (e.g. BERT's attention: `query`, `key`, `value`,
    `attention.output.dense`, never the MLP's `output.dense`).

    Raises:
        InvalidArgument (field "hyperparameters.lora.target_modules"): a name the model does
            not have or that is no linear layer, "all-linear" mixed with names, or a choice
            that resolves to nothing here (a model without attention); the message lists the
            model's linear layers.
    """
    tokens = [name.strip().lower() for name in requested]
    if not requested or tokens == [ALL_LINEAR]:
        return _checked(model, _all_linear(model), ALL_LINEAR)
    if ALL_LINEAR in tokens:
        others = [
            name for name, token in zip(requested, tokens, strict=True) if token != ALL_LINEAR
        ]
        raise InvalidArgument(
            f"'{ALL_LINEAR}' already means every linear layer: it cannot be combined with {others}",
            field=_FIELD,
        )
    names = [name for name, token in zip(requested, tokens, strict=True) if token != ATTENTION]
    _check_names(model, names)
    if ATTENTION not in tokens:
        return list(requested)
    attention = _checked(model, attention_module_names(model), ATTENTION)
    return [*attention, *(name for name in names if name not in attention)]


def target_suffixes(model: nn.Module, selected: Iterable[str]) -> list[str]:
    """The shortest dotted suffixes that PEFT matches against `selected` and nothing else.

    `selected` are full module names of `model`. A suffix is lengthened (leaf, then parent
    and leaf, ...) until every module it matches is selected, so the list stays short
    (`q_proj`, not one name per layer) yet never reaches into the MLP or a head. Sorted.
    """
    chosen = set(selected)
    names = [name for name, _ in model.named_modules() if name]
    suffixes: set[str] = set()
    verdicts: dict[str, bool] = {}
    for full in chosen:
        parts = full.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            if suffix not in verdicts:
                verdicts[suffix] = all(n in chosen for n in names if _matches(n, suffix))
            if verdicts[suffix]:
                suffixes.add(suffix)
                break
    return sorted(suffixes)


# ---- helpers -------------------------------------------------------------------------------


def _checked(model: nn.Module, selected: list[str], choice: str) -> list[str]:
    if not selected:
        raise InvalidArgument(
            f"'{choice}' matches no layer of {type(model).__name__}; its linear layers are: "
            f"{', '.join(linear_module_names(model)) or 'none'}",
            field=_FIELD,
        )
    return target_suffixes(model, selected)


def _all_linear(model: nn.Module) -> list[str]:
    # PEFT wraps every module whose name ends with a head name (a plain string match, so
    # DistilBERT's `pre_classifier` too) as a trained-in-full head; LoRA on one of them
    # makes get_peft_model fail. An LM head not called `lm_head` (GPT-NeoX's `embed_out`) is
    # left out as PEFT's own "all-linear" leaves it out: by being the output embeddings.
    output = _output_embeddings(model)
    return [
        name
        for name in _linear_layers(model)
        if not name.endswith(HEAD_NAMES) and model.get_submodule(name) is not output
    ]


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        output = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):  # a model without an LM head may raise
        return None
    return output if isinstance(output, nn.Module) else None


def _check_names(model: nn.Module, requested: Sequence[str]) -> None:
    if not requested:
        return
    valid = linear_module_names(model)
    linear = _linear_layers(model)
    module_names = [name for name, _ in model.named_modules() if name and not _under_head(name)]
    unknown = [
        target
        for target in requested
        if target not in valid and not any(_matches(name, target) for name in module_names)
    ]
    if unknown:
        raise InvalidArgument(
            f"unknown module(s) {unknown}; this model's linear layers are: {', '.join(valid)} "
            f"(or leave empty for all of them, or ask for '{ATTENTION}')",
            field=_FIELD,
        )
    # A name that exists but is no linear layer (e.g. "self_attn") would make PEFT fail later.
    not_linear = [t for t in requested if not any(_matches(name, t) for name in linear)]
    if not_linear:
        raise InvalidArgument(
            f"{not_linear} are not linear layers; choose from: {', '.join(valid)}",
            field=_FIELD,
        )


def _linear_layers(model: nn.Module) -> list[str]:
    """Full names of the linear layers outside the heads, in module order."""
    linear_types: tuple[type[nn.Module], ...] = (nn.Linear, *_conv1d_types())
    return [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, linear_types) and not _under_head(name)
    ]


def _is_attention(name: str, module: nn.Module) -> bool:
    if isinstance(module, nn.Linear | nn.Embedding):
        return False
    attribute = name.rsplit(".", 1)[-1]
    if attribute in _ATTENTION_ATTRIBUTES:
        return True
    kind = type(module).__name__.lower()
    # A whole decoder layer can be named after its attention (JambaAttentionDecoderLayer):
    # it also holds the MLP, so it is no attention block.
    return "attention" in kind and not kind.endswith(("layer", "block"))


def _matches(name: str, suffix: str) -> bool:
    """PEFT's rule for a name in a `target_modules` list: equal, or a suffix after a dot."""
    return name == suffix or name.endswith("." + suffix)


def _under_head(module_name: str) -> bool:
    return module_name.split(".", 1)[0] in NEVER_TARGETED


def _conv1d_types() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - present in every supported transformers
        return ()
    return (Conv1D,)
