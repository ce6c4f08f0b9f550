"""Tokenisation of prepared data (cached per data, tokenizer and length) and batch collation."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from services.common.errors import InvalidArgument
from services.trainer.core.types import EncodedData, EncodedExample, Example, PreparedData, Task

__all__ = ["IGNORE_INDEX", "TokenizationCache", "collate", "collate_prompts", "encode"]

logger = logging.getLogger(__name__)

# The label cross-entropy skips (torch's and transformers' default ignore_index).
# A validation row whose label the model was not trained on (scored as a miss, no loss).
UNTRAINED_LABEL_ID = -1
IGNORE_INDEX = -100


class TokenizationCache:
    """Tokenised datasets per (data, tokenizer, length, task, labels), least recently used out.

    Trials of one study share their data and usually their tokenizer: tokenising once and
    reusing the result saves the work in every later trial. ``tokenizer_id`` is the
    caller's name for the tokenizer (model path or hub name plus revision), so a key is
    cheap to build and compare. Thread-safe: a cache hit never waits for another
    thread's tokenisation, and tokenisations run one at a time because a fast tokenizer
    shared between threads fails with "Already borrowed".
    """

    def __init__(self, max_entries: int = 8) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, EncodedData] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries and the counters
        self._work_lock = threading.Lock()  # one tokenisation at a time

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def encode(
        self, data: PreparedData, tokenizer: Any, tokenizer_id: str, max_length: int
    ) -> EncodedData:
        """Return ``data`` tokenised, from the cache when this key was tokenised before.

        See ``encode`` (the module function) for what the examples hold.
        """
        key = (data.fingerprint, tokenizer_id, max_length, data.task, tuple(data.labels))
        cached = self._lookup(key)
        if cached is not None:
            return cached
        with self._work_lock:
            # Another thread may have tokenised this key while we waited.
            cached = self._lookup(key)
            if cached is not None:
                return cached
            encoded = encode(data, tokenizer, max_length)
            with self._lock:
                self.misses += 1
                self._entries[key] = encoded
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return encoded

    def _lookup(self, key: Hashable) -> EncodedData | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return found


def encode(data: PreparedData, tokenizer: Any, max_length: int) -> EncodedData:
    """Tokenise both splits of ``data``, without padding (the collator pads per batch).

    Classification: ``input_ids`` / ``attention_mask`` of the text with the tokenizer's
    special tokens, truncated to ``max_length``; ``label_id`` = index in ``data.labels``.

    Generation: prompt and target rendered through the tokenizer's chat template when it
    has one (a user turn, then an assistant turn; thinking off), else as ``prompt + "\\n" + target``
    after the tokenizer's leading special tokens (BOS), and closed with EOS when the
    rendering lacks it, so the model learns to stop. ``labels`` are the ids with
    ``IGNORE_INDEX`` on every prompt token: loss on the response only. Truncation keeps
    the prompt and cuts the response's end; a prompt of ``max_length`` tokens or more
    keeps its last ``max_length - 1`` (the end holds the turn marker generation starts
    from) and one response token. ``prompt_ids`` = the (possibly cut) prompt's ids, for
    greedy generation.

    Raises:
        InvalidArgument: ``max_length`` under 2 (``training.max_seq_length``), or a label
            not in ``data.labels`` (``dataset.label_field``).
    """
    if max_length < 2:
        raise InvalidArgument(
            f"must be at least 2, got {max_length}", field="training.max_seq_length"
        )
    if data.task is Task.CLASSIFICATION:
        label_ids = {label: index for index, label in enumerate(data.labels)}
        return EncodedData(
            train=_encode_classification(data.train, tokenizer, max_length, label_ids),
            validation=_encode_classification(
                data.validation, tokenizer, max_length, label_ids, untrained_ok=True
            ),
        )
    return EncodedData(
        train=_encode_generation(data.train, tokenizer, max_length),
        validation=_encode_generation(data.validation, tokenizer, max_length),
    )


def _encode_classification(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    label_ids: dict[str, int],
    *,
    untrained_ok: bool = False,
) -> list[EncodedExample]:
    """`untrained_ok` (validation): a label not trained on gets UNTRAINED_LABEL_ID, a row
    that is scored as a miss and left out of the loss."""
    if not examples:
        return []
    unknown = sorted({example.label for example in examples} - label_ids.keys())
    if unknown and not untrained_ok:
        raise InvalidArgument(
            f"labels {unknown[:10]} are not among the {len(label_ids)} prepared labels",
            field="dataset.label_field",
        )
    encoded = tokenizer(
        [example.text for example in examples], truncation=True, max_length=max_length
    )
    return [
        EncodedExample(
            input_ids=tuple(ids),
            attention_mask=tuple(mask),
            label_id=label_ids.get(example.label, UNTRAINED_LABEL_ID),
        )
        for ids, mask, example in zip(
            encoded["input_ids"], encoded["attention_mask"], examples, strict=True
        )
    ]


def _encode_generation(
    examples: Sequence[Example], tokenizer: Any, max_length: int
) -> list[EncodedExample]:
    if not examples:
        return []
    rendered = [_render(tokenizer, example.prompt, example.target) for example in examples]
    prompt_ids = _ids(tokenizer, [prompt for prompt, _response, _template in rendered])
    response_ids = _ids(tokenizer, [response for _prompt, response, _template in rendered])
    leading = _leading_special_ids(tokenizer)
    eos_token = getattr(tokenizer, "eos_token", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    encoded: list[EncodedExample] = []
    cut_prompts = 0
    for (_prompt, response_text, templated), prompt, response in zip(
        rendered, prompt_ids, response_ids, strict=True
    ):
        if not templated:
            # A chat template writes its own BOS; plain text gets the tokenizer's.
            prompt = leading + prompt
        if eos_id is not None and not (eos_token and eos_token in response_text):
            response = [*response, eos_id]
        if len(prompt) >= max_length:
            cut_prompts += 1
            prompt = prompt[len(prompt) - (max_length - 1) :]
        response = response[: max_length - len(prompt)]
        ids = (*prompt, *response)
        encoded.append(
            EncodedExample(
                input_ids=ids,
                attention_mask=(1,) * len(ids),
                labels=(IGNORE_INDEX,) * len(prompt) + tuple(response),
                prompt_ids=tuple(prompt),
            )
        )
    if getattr(tokenizer, "chat_template", None):
        plain = sum(1 for _prompt, _response, templated in rendered if not templated)
        if plain:
            logger.warning(
                "%d of %d examples: the chat template's prompt is not a prefix of its full "
                "text, so they use the plain prompt / response format",
                plain,
                len(examples),
            )
    if cut_prompts:
        logger.warning(
            "%d of %d prompts are %d tokens or longer: kept their last %d tokens",
            cut_prompts,
            len(examples),
            max_length,
            max_length - 1,
        )
    return encoded


def _render(tokenizer: Any, prompt: str, target: str) -> tuple[str, str, bool]:
    """Return (prompt text, response text, whether the chat template made them).

    Thinking is off (`enable_thinking=False`): Qwen3's template otherwise leaves the
    reasoning block to the model, and the prompt lacks the empty `<think></think>` its
    rendering of the answer has. Templates without the variable ignore it.
    """
    if getattr(tokenizer, "chat_template", None):
        user = {"role": "user", "content": prompt}
        prompt_text = tokenizer.apply_chat_template(
            [user], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        full_text = tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": target}],
            tokenize=False,
            enable_thinking=False,
        )
        # Some templates render the last assistant turn differently from the generation
        # prompt (e.g. inserting a reasoning block): then the prompt the model sees at
        # evaluation would not be the one it trained on, so plain text is the safer format.
        if (
            isinstance(prompt_text, str)
            and isinstance(full_text, str)
            and full_text.startswith(prompt_text)
        ):
            return prompt_text, full_text[len(prompt_text) :], True
    return prompt + "\n", target, False


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text by itself (BOS, or BERT's [CLS]; often none)."""
    with_special = list(tokenizer("a")["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start]
    return []


# ---- batches ---------------------------------------------------------------------------


def collate(
    batch: Sequence[EncodedExample], pad_token_id: int, task: Task, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example: ``input_ids``, ``attention_mask``, ``labels``.

    Classification ``labels`` are the class ids (N,); generation ``labels`` are per token
    (N, L), padded with ``IGNORE_INDEX``. Training pads on the right (the default).

    Raises:
        ValueError: an empty batch, or ``padding_side`` other than "left" / "right".
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    left = padding_side == "left"
    longest = max(len(example.input_ids) for example in batch)
    result = {
        "input_ids": _pad([e.input_ids for e in batch], longest, pad_token_id, left),
        "attention_mask": _pad([e.attention_mask for e in batch], longest, 0, left),
    }
    if task is Task.CLASSIFICATION:
        result["labels"] = torch.tensor([e.label_id for e in batch], dtype=torch.long)
    else:
        result["labels"] = _pad([e.labels for e in batch], longest, IGNORE_INDEX, left)
    return result


def collate_prompts(
    prompt_ids: Sequence[Sequence[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched greedy generation: ``input_ids``, ``attention_mask``.

    Left padding puts every prompt's last token in the last column, where a decoder
    appends the next token.

    Raises:
        ValueError: no prompts.
    """
    if not prompt_ids:
        raise ValueError("cannot collate an empty batch of prompts")
    longest = max(len(ids) for ids in prompt_ids)
    return {
        "input_ids": _pad(prompt_ids, longest, pad_token_id, left=True),
        "attention_mask": _pad([[1] * len(ids) for ids in prompt_ids], longest, 0, left=True),
    }


def _pad(rows: Sequence[Sequence[int]], length: int, value: int, left: bool) -> torch.Tensor:
    padded = torch.full((len(rows), length), value, dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            values = torch.as_tensor(list(row), dtype=torch.long)
            if left:
                padded[index, length - len(row) :] = values
            else:
                padded[index, : len(row)] = values
    return padded
