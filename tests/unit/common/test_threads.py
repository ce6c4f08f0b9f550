"""torch's pool sized from the cgroup's CPU quota, not the host's cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from services.common.threads import configure_torch_threads, cpu_quota, torch_threads, usable_cpus


def cgroup_v2(tmp_path: Path, own: str, parent: str = "max 100000") -> tuple[Path, Path]:
    """A cgroup v2 tree with the process in /kubepods/pod1/ctr: (root, /proc/self/cgroup)."""
    root = tmp_path / "cgroup"
    (root / "kubepods" / "pod1" / "ctr").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text(parent + "\n")
    (root / "kubepods" / "pod1" / "ctr" / "cpu.max").write_text(own + "\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/kubepods/pod1/ctr\n")
    return root, self_cgroup


def test_v2_quota_is_the_smallest_of_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    root, me = cgroup_v2(tmp_path, own="400000 100000")
    assert cpu_quota(root, me) == 4.0
    root, me = cgroup_v2(tmp_path / "b", own="max 100000", parent="150000 100000")
    assert cpu_quota(root, me) == 1.5
    root, me = cgroup_v2(tmp_path / "c", own="max 100000")
    assert cpu_quota(root, me) is None


def test_v1_quota_and_no_cgroup(tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1, tmp_path / "none") == 2.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(v1, tmp_path / "none") is None
    assert cpu_quota(tmp_path / "nothing", tmp_path / "none") is None


def test_the_pool_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    root, me = cgroup_v2(tmp_path, own="50000 100000")  # half a CPU: still one thread
    assert usable_cpus(root, me) == 1
    root, me = cgroup_v2(tmp_path / "big", own="6400000 100000")  # 64 CPUs of quota
    assert usable_cpus(root, me) == affinity  # never more than the CPUs it may run on
    assert torch_threads(0, {}, root, me) == (affinity, "cgroup CPU quota 64")


def test_an_override_or_omp_num_threads_wins(tmp_path: Path) -> None:
    root, me = cgroup_v2(tmp_path, own="400000 100000")
    assert torch_threads(3, {"OMP_NUM_THREADS": "8"}, root, me) == (3, "LORATUNE_TORCH_THREADS")
    assert torch_threads(0, {"OMP_NUM_THREADS": "8"}, root, me) == (None, "OMP_NUM_THREADS")


def test_configure_sets_torch_and_says_where_from(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    before = torch.get_num_threads()
    try:
        assert configure_torch_threads(1) == 1 == torch.get_num_threads()
        assert "torch threads: 1 (from LORATUNE_TORCH_THREADS)" in caplog.text
    finally:
        torch.set_num_threads(before)
