"""The optimizer's TensorBoard scalars: written without torch, read by TensorBoard itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.optimizer.core.results import write_scalars


def test_each_epochs_scalars_are_appended_and_tensorboard_reads_them(tmp_path: Path) -> None:
    folder = tmp_path / "logs" / "evaluation"
    write_scalars(folder, {"eval/objective": 0.5, "eval/accuracy": 0.6}, 1)
    write_scalars(folder, {"eval/objective": 0.75, "eval/accuracy": 0.8}, 2)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(folder))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/accuracy", "eval/objective"]
    objective = [(e.step, e.value) for e in events.Scalars("eval/objective")]
    assert objective == [(1, 0.5), (2, 0.75)]
    assert [e.value for e in events.Scalars("eval/accuracy")] == [
        float.fromhex("0x1.3333340000000p-1"),  # 0.6 as float32
        float.fromhex("0x1.99999a0000000p-1"),
    ]


def test_writing_scalars_does_not_import_torch(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path\n"
        "from services.optimizer.core.results import write_scalars\n"
        f"write_scalars(Path({str(tmp_path)!r}), {{'eval/objective': 1.0}}, 1)\n"
        "print('torch' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
