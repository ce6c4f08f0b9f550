"""Peak host memory (RSS) of a QLoRA vs an unquantised LoRA job on SmolLM2-135M (GGUF), CPU.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/qlora_memory.py [--rows 8] [--steps-batch 2]

Each job runs in a fresh Python process (so one job's allocations never hide the
other's): load the packaged SmolLM2-135M-Instruct Q4_1 GGUF through the trainer's
BaseModelCache (de-quantised to float32; QLoRA then NF4 with double quantisation), train a
generation adapter for 1 epoch on a handful of rows, evaluate (loss + greedy generation),
save, reload the adapter with load_adapter_for_inference, generate. Reported per job:
the model's state (weights and buffers as held), the RSS right after loading once freed
memory is handed back (malloc_trim), ru_maxrss of the process (the peak over everything,
loading included: a GGUF load de-quantises the whole file first, so both jobs peak there)
and the peak RSS sampled (every 10 ms) during each phase ("load" is the peak before the
trim).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class PeakSampler:
    """Samples this process's RSS in a thread; `phase(name)` starts a new phase."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._process.memory_info().rss
            self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), rss)
            time.sleep(0.01)

    def rss(self) -> int:
        """The resident memory now."""
        return int(self._process.memory_info().rss)

    def phase(self, name: str) -> None:
        """Close the current phase and start `name`."""
        rss = self._process.memory_info().rss
        self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), rss)
        self._phase = name
        self.peaks[name] = rss

    def stop(self) -> None:
        """Close the last phase and stop sampling."""
        self.phase("end")
        self._stop.set()
        self._thread.join()


def child(quantize_4bit: bool, rows: int) -> dict[str, object]:
    """One job in this process; returns the numbers as a dict."""
    sys.path.insert(0, str(REPO))
    sampler = PeakSampler()
    import torch

    torch.set_num_threads(1)
    from services.trainer.core.artifacts import load_adapter_for_inference, save_artifacts
    from services.trainer.core.gguf import packaged_smollm2_path
    from services.trainer.core.loop import train
    from services.trainer.core.models import BaseModelCache
    from services.trainer.core.tokenize import encode
    from services.trainer.core.types import (
        BalancingSpec,
        DatasetSpec,
        Example,
        JobSpec,
        LoraSpec,
        PreparedData,
        RunContext,
        Task,
        TrainingSpec,
    )

    gguf = packaged_smollm2_path()
    out = Path(tempfile.mkdtemp(prefix="smollm2-memory-"))
    spec = JobSpec(
        job_id="memory",
        base_model=str(gguf.parent),
        dataset=DatasetSpec(uri="unused.jsonl", task=Task.GENERATION),
        lora=LoraSpec(rank=8, alpha=16.0, dropout=0.0),
        training=TrainingSpec(
            learning_rate=1e-3,
            num_epochs=1,
            batch_size=2,
            max_seq_length=64,
            quantize_4bit=quantize_4bit,
            seed=1,
        ),
        balancing=BalancingSpec(),
        output_dir=str(out),
        max_eval_samples=2,
        max_new_tokens=8,
    )
    pairs = [(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(rows + 2)]
    data = PreparedData(
        task=Task.GENERATION,
        train=[Example(prompt=p, target=t) for p, t in pairs[:rows]],
        validation=[Example(prompt=p, target=t) for p, t in pairs[rows:]],
        labels=(),
        stats=None,
        fingerprint="memory",
    )
    sampler.phase("load")
    started = time.perf_counter()
    cache = BaseModelCache("cpu")
    prepared = cache.acquire(spec, [])
    load_seconds = time.perf_counter() - started
    # What the load freed (GGUF tensors, the dense copy QLoRA quantised) stays in the
    # process unless handed back: trim it, so the phases below show the model's own footprint.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_after_load = sampler.rss()
    state = prepared.model.state_dict().values()  # the tied LM head once, by storage
    weights = sum({t.data_ptr(): t.numel() * t.element_size() for t in state}.values())
    sampler.phase("train+evaluate")
    encoded = encode(data, prepared.tokenizer, spec.training.max_seq_length)
    started = time.perf_counter()
    result = train(prepared, data, encoded, spec, RunContext(lambda e: None, lambda: False))
    train_seconds = time.perf_counter() - started
    sampler.phase("save")
    save_artifacts(prepared, data, spec, result, out)
    del prepared
    cache.release()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the reload loads the base again
    sampler.phase("reload+generate")
    loaded = load_adapter_for_inference(out, "cpu")
    prompt = torch.tensor([list(encoded.validation[0].prompt_ids)])
    with torch.inference_mode():
        generated = loaded.model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
    answer = loaded.tokenizer.decode(generated[0, prompt.shape[1] :], skip_special_tokens=True)
    sampler.stop()
    mib = 1024 * 1024
    return {
        "quantize_4bit": quantize_4bit,
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mib_by_phase": {k: round(v / mib, 1) for k, v in sampler.peaks.items()},
        "rss_after_load_trimmed_mib": round(rss_after_load / mib, 1),
        "model_state_mib": round(weights / mib, 1),
        "load_seconds": round(load_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "steps": result.steps,
        "final_loss": round(result.final_loss, 4),
        "eval_predictions": list(result.last_eval.predictions) if result.last_eval else [],
        "reloaded_answer": answer,
    }


def main() -> None:
    """Run both jobs in fresh processes and print their peaks side by side."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=8, help="training rows (default 8)")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child == "qlora", args.rows)), flush=True)
        return
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    results = {}
    for mode in ("lora", "qlora"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--rows", str(args.rows)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{mode} job failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        results[mode] = json.loads(lines[-1].removeprefix("RESULT "))
    print(json.dumps(results, indent=2))
    phases = ["load", "train+evaluate", "save", "reload+generate"]
    print(f"\n{'peak RSS (MiB)':<22}{'LoRA fp32':>12}{'QLoRA NF4':>12}{'ratio':>8}")
    rows = ("model state (weights)", "RSS after load, trimmed", "ru_maxrss (whole run)", *phases)
    keys = {
        "model state (weights)": "model_state_mib",
        "RSS after load, trimmed": "rss_after_load_trimmed_mib",
        "ru_maxrss (whole run)": "ru_maxrss_mib",
    }
    for name in rows:
        if name in keys:
            a, b = results["lora"][keys[name]], results["qlora"][keys[name]]
        else:
            a = results["lora"]["peak_rss_mib_by_phase"].get(name, 0.0)
            b = results["qlora"]["peak_rss_mib_by_phase"].get(name, 0.0)
        print(f"{name:<22}{a:>12.1f}{b:>12.1f}{(b / a if a else 0):>8.2f}")


if __name__ == "__main__":
    main()
