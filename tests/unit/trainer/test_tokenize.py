"""Tokenisation (classification, chat-template generation with prompt masking), cache, collation."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported

import pytest
import torch
from transformers import AutoTokenizer

from services.common.errors import InvalidArgument
from services.evaluator.core.bertscore import packaged_minilm_path
from services.trainer.core.tokenize import (
    IGNORE_INDEX,
    TokenizationCache,
    collate,
    collate_prompts,
    encode,
)
from services.trainer.core.types import EncodedExample, Example, PreparedData, Task

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The generation prompt adds a newline the assistant turn does not have: not a prefix.
MISMATCHED_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|assistant|>\n"
)
# Qwen3's shape: the answer's turn carries an (empty) reasoning block; the generation
# prompt carries it only with thinking off, else the model opens the block itself.
THINKING_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|><think></think>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def bert() -> Any:
    return AutoTokenizer.from_pretrained(packaged_minilm_path())


@pytest.fixture(scope="module")
def chat() -> Any:
    """MiniLM's tokenizer with turn markers, an EOS and a small chat template."""
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    tokenizer.add_tokens(["<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    tokenizer.add_tokens(["<think>", "</think>"])  # as Qwen3's: added, not special
    tokenizer.eos_token = "<|end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _bare(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _classification(texts: list[tuple[str, str]], fingerprint: str = "f1") -> PreparedData:
    examples = tuple(Example(text=text, label=label) for text, label in texts)
    labels = tuple(sorted({label for _text, label in texts}))
    return PreparedData(
        task=Task.CLASSIFICATION,
        train=examples,
        validation=examples[:1],
        labels=labels,
        stats=None,
        fingerprint=fingerprint,
    )


def _generation(pairs: list[tuple[str, str]]) -> PreparedData:
    examples = tuple(Example(prompt=prompt, target=target) for prompt, target in pairs)
    return PreparedData(
        task=Task.GENERATION,
        train=examples,
        validation=examples,
        labels=(),
        stats=None,
        fingerprint="g1",
    )


# ---- classification --------------------------------------------------------------------


def test_classification_ids_labels_and_truncation(bert: Any) -> None:
    long_text = " ".join(["payment"] * 100)
    data = _classification([("paid invoice 17", "62"), (long_text, "60"), ("salary", "70")])
    encoded = encode(data, bert, max_length=16)
    first, long, third = encoded.train
    assert list(first.input_ids) == list(bert("paid invoice 17")["input_ids"])
    assert first.attention_mask == (1,) * len(first.input_ids)
    assert [e.label_id for e in encoded.train] == [1, 0, 2]  # index in ("60", "62", "70")
    assert len(long.input_ids) == 16
    assert long.input_ids[0] == bert.cls_token_id
    assert long.input_ids[-1] == bert.sep_token_id
    assert len(third.input_ids) < 16  # no padding before the collator
    assert list(encoded.validation) == [first]


def test_cyrillic_text_survives_minilm_up_to_its_normalisation(bert: Any) -> None:
    data = _classification([("Оплата по счёту № 17", "62"), ("Зарплата", "70")])
    ids = encode(data, bert, max_length=32).train[0].input_ids
    assert bert.unk_token_id not in ids
    # MiniLM is uncased and strips accents: "ё" comes back as "е".
    assert bert.decode(ids, skip_special_tokens=True) == "оплата по счету № 17"


def test_classification_label_outside_the_label_set_is_rejected(bert: Any) -> None:
    data = PreparedData(
        task=Task.CLASSIFICATION,
        train=(Example(text="x", label="a"), Example(text="y", label="zzz")),
        validation=(),
        labels=("a", "b"),
        stats=None,
        fingerprint="f",
    )
    with pytest.raises(InvalidArgument) as caught:
        encode(data, bert, max_length=8)
    assert caught.value.field == "dataset.label_field"
    assert "zzz" in str(caught.value)


def test_max_length_under_two_is_rejected(bert: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        encode(_classification([("a", "x"), ("b", "y")]), bert, max_length=1)
    assert caught.value.field == "training.max_seq_length"


# ---- generation ------------------------------------------------------------------------


def test_chat_template_masks_exactly_the_prompt(chat: Any) -> None:
    user, assistant, end = chat.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])
    question, answer = "What is two plus two?", "Four, of course."
    encoded = encode(_generation([(question, answer)]), chat, max_length=64).train[0]

    prompt = [user, *_bare(chat, question), assistant]
    response = [*_bare(chat, answer), end]  # the template closes the turn with EOS itself
    assert list(encoded.input_ids) == prompt + response
    assert list(encoded.labels) == [IGNORE_INDEX] * len(prompt) + response
    assert list(encoded.prompt_ids) == prompt
    assert encoded.attention_mask == (1,) * len(prompt + response)
    assert chat.decode(response, skip_special_tokens=True) == "four, of course."


def test_thinking_is_off_so_the_reasoning_block_is_prompt_not_response(chat: Any) -> None:
    think, think_end, assistant = chat.convert_tokens_to_ids(
        ["<think>", "</think>", "<|assistant|>"]
    )
    chat.chat_template = THINKING_TEMPLATE
    try:
        encoded = encode(_generation([("Capital of France?", "Paris")]), chat, max_length=64)
    finally:
        chat.chat_template = CHAT_TEMPLATE
    row = encoded.train[0]
    # The empty block ends the prompt the model generates from; the loss is on the answer.
    assert list(row.prompt_ids[-3:]) == [assistant, think, think_end]
    response = [label for label in row.labels if label != IGNORE_INDEX]
    assert response == [*_bare(chat, "Paris"), chat.eos_token_id]
    assert think not in response and think_end not in response


def test_template_whose_prompt_is_not_a_prefix_falls_back_to_plain_text(
    chat: Any, caplog: pytest.LogCaptureFixture
) -> None:
    chat.chat_template = MISMATCHED_TEMPLATE
    try:
        encoded = encode(_generation([("Name a colour", "Blue")]), chat, max_length=64).train[0]
    finally:
        chat.chat_template = CHAT_TEMPLATE
    # Plain format: BERT's leading [CLS], prompt + "\n", target, EOS.
    prompt = [chat.cls_token_id, *_bare(chat, "Name a colour\n")]
    response = [*_bare(chat, "Blue"), chat.eos_token_id]
    assert list(encoded.input_ids) == prompt + response
    assert list(encoded.labels) == [IGNORE_INDEX] * len(prompt) + response
    assert "not a prefix" in caplog.text


def test_no_chat_template_uses_prompt_newline_target_eos() -> None:
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_path())
    tokenizer.eos_token = "[SEP]"
    assert not tokenizer.chat_template
    encoded = encode(_generation([("Say hi", "hi there")]), tokenizer, max_length=64).train[0]
    prompt = [tokenizer.cls_token_id, *_bare(tokenizer, "Say hi\n")]
    assert list(encoded.prompt_ids) == prompt
    assert list(encoded.input_ids) == [
        *prompt,
        *_bare(tokenizer, "hi there"),
        tokenizer.sep_token_id,
    ]


def test_truncation_keeps_the_prompt_and_cuts_the_response(chat: Any) -> None:
    answer = " ".join(["word"] * 40)
    encoded = encode(_generation([("short question", answer)]), chat, max_length=12).train[0]
    prompt_length = len(encoded.prompt_ids)
    assert prompt_length == 4  # <|user|> short question <|assistant|>
    assert len(encoded.input_ids) == 12
    assert list(encoded.input_ids[:prompt_length]) == list(encoded.prompt_ids)
    assert list(encoded.labels) == [IGNORE_INDEX] * 4 + list(encoded.input_ids[4:])


def test_an_overlong_prompt_keeps_its_end_and_one_response_token(chat: Any) -> None:
    assistant = chat.convert_tokens_to_ids("<|assistant|>")
    question = " ".join(f"w{i}" for i in range(50))
    encoded = encode(_generation([(question, "yes")]), chat, max_length=10).train[0]
    assert len(encoded.input_ids) == 10
    assert len(encoded.prompt_ids) == 9
    assert encoded.prompt_ids[-1] == assistant
    assert list(encoded.labels) == [IGNORE_INDEX] * 9 + [_bare(chat, "yes")[0]]


# ---- the cache -------------------------------------------------------------------------


class CountingTokenizer:
    """A tokenizer that counts its calls and is slow enough for threads to overlap."""

    chat_template = None

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.calls += 1
        time.sleep(0.02)
        return self.inner(*args, **kwargs)


def test_cache_tokenises_once_per_key_and_evicts_least_recently_used(bert: Any) -> None:
    tokenizer = CountingTokenizer(bert)
    cache = TokenizationCache(max_entries=2)
    data = _classification([("a b c", "x"), ("d e", "y")])
    first = cache.encode(data, tokenizer, "minilm@main", 32)
    calls = tokenizer.calls
    assert cache.encode(data, tokenizer, "minilm@main", 32) is first
    assert tokenizer.calls == calls
    assert (cache.hits, cache.misses) == (1, 1)

    cache.encode(data, tokenizer, "minilm@main", 16)  # another length: a new key
    assert cache.encode(data, tokenizer, "minilm@main", 32) is first  # refreshes it
    other = _classification([("a b c", "x"), ("d e", "y")], fingerprint="f2")
    cache.encode(other, tokenizer, "minilm@main", 32)  # evicts length 16, the oldest
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 2)
    cache.encode(data, tokenizer, "minilm@main", 16)
    assert cache.misses == 4
    cache.encode(data, tokenizer, "other-tokenizer", 32)
    assert cache.misses == 5


def test_cache_tokenises_once_under_concurrent_callers(bert: Any) -> None:
    tokenizer = CountingTokenizer(bert)
    cache = TokenizationCache()
    data = _classification([("a b c", "x"), ("d e", "y")])
    results: list[object] = []
    barrier = threading.Barrier(6)

    def worker() -> None:
        barrier.wait()
        results.append(cache.encode(data, tokenizer, "minilm", 32))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6
    assert all(result is results[0] for result in results)
    assert (cache.misses, cache.hits) == (1, 5)
    assert tokenizer.calls == 2  # the train and the validation split, once each


# ---- collation -------------------------------------------------------------------------


def test_collate_classification_pads_right() -> None:
    batch = [
        EncodedExample(input_ids=(5, 6, 7), attention_mask=(1, 1, 1), label_id=2),
        EncodedExample(input_ids=(8,), attention_mask=(1,), label_id=0),
    ]
    out = collate(batch, pad_token_id=0, task=Task.CLASSIFICATION)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [2, 0]
    assert out["input_ids"].dtype == torch.long


def test_collate_generation_pads_labels_with_ignore_index() -> None:
    batch = [
        EncodedExample(input_ids=(1, 2, 3, 4), attention_mask=(1,) * 4, labels=(-100, -100, 3, 4)),
        EncodedExample(input_ids=(1, 9), attention_mask=(1, 1), labels=(-100, 9)),
    ]
    out = collate(batch, pad_token_id=99, task=Task.GENERATION)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [1, 9, 99, 99]]
    assert out["labels"].tolist() == [[-100, -100, 3, 4], [-100, 9, -100, -100]]
    left = collate(batch, pad_token_id=99, task=Task.GENERATION, padding_side="left")
    assert left["input_ids"].tolist()[1] == [99, 99, 1, 9]
    assert left["attention_mask"].tolist()[1] == [0, 0, 1, 1]
    assert left["labels"].tolist()[1] == [-100, -100, -100, 9]
    with pytest.raises(ValueError, match="padding_side"):
        collate(batch, pad_token_id=0, task=Task.GENERATION, padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=0, task=Task.GENERATION)


def test_collate_prompts_pads_left_for_generation() -> None:
    out = collate_prompts([(1, 2, 3), (4,)], pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    # Every prompt's last token sits in the last column, where generation continues.
    assert out["input_ids"][:, -1].tolist() == [3, 4]
