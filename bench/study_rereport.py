"""What the current selection rule publishes for a study that already ran, scored once on test.

`study_report.py` scores what a study published when it ran. When the rule that decides
what to publish changes (services/optimizer/core/report.py), the trials need not run again:
the rule reads only the trials' saved validation predictions and log-probabilities. This
re-reads a finished study from its run folder (the `optuna.db` and trial folders that
`study_report.py` leaves under its work folder), prints the current rule's report and
scores the model it publishes on test.csv: one read, or none with `--validation-only`.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/study_rereport.py --split-seed 7 \
        --runs /tmp/study-report-XXXX/31/runs --study tpe-pruned-seed31 [--validation-only]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import longtail_protocol as protocol  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    protocol.add_arguments(parser)
    parser.add_argument("--runs", type=Path, required=True, help="the study's runs folder")
    parser.add_argument("--study", required=True, help="the study's name (tpe-pruned-seed31)")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--validation-only", action="store_true", help="read no test row")
    args = parser.parse_args()

    import optuna
    import torch

    from services.optimizer.core import results
    from services.optimizer.core.report import selection_report

    torch.set_num_threads(args.threads)
    database = args.runs / "optuna.db"
    if not database.is_file():
        parser.error(f"--runs: no optuna.db in {args.runs}")
    study = optuna.load_study(study_name=args.study, storage=f"sqlite:///{database}")
    trials = study.get_trials(deepcopy=False)
    report = selection_report(trials)
    if report is None:
        parser.error(f"{args.study}: no COMPLETE trial")
    for key, value in report.to_json().items():
        print(f"{key}: {value}")
    if args.validation_only:
        return
    folders = {t.number: Path(str(t.user_attrs.get("artifact_dir", ""))) for t in trials}
    workdir = Path(tempfile.mkdtemp(prefix="study-rereport-"))
    data = protocol.prepare(workdir, protocol.options_from(args))
    if report.ensemble_published:
        members = [(n, folders[n]) for n in report.ensemble_trials]
        published = results.publish_ensemble(members, workdir / "models", args.study)
        what = f"the ensemble of {', '.join(f'#{n}' for n in report.ensemble_trials)}"
    else:
        published = folders[report.published_trial]
        what = f"trial #{report.published_trial}"
    score = protocol.score_adapter(published, data, args.max_seq_length)
    print(
        f"published {what}: test macro-F1 {score.macro_f1:.4f} "
        f"(tail {score.tail_f1:.4f}, head {score.head_f1:.4f})"
    )


if __name__ == "__main__":
    main()
