"""torch's thread pool sized from the CPUs this process may use, not the host's cores.

torch sizes its intra-op pool from the host's cores (or OMP_NUM_THREADS). In a pod limited
to 4 CPUs on a 64-core node that is 64 threads sharing 4 CPUs' worth of time: the CFS quota
throttles them in turn and every parallel region waits for its slowest thread. So the
trainer and the evaluator size the pool from, in order:

1. ``LORATUNE_TORCH_THREADS`` when it is above 0 (the deployment's choice);
2. ``OMP_NUM_THREADS`` when it is set (torch's own variable: left as it is);
3. the CPUs the process may use: its CPU affinity, capped by the cgroup's CPU quota
   (cgroup v2 ``cpu.max`` of the process's cgroup and its parents, or v1
   ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded up, at least 1.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

__all__ = ["configure_torch_threads", "cpu_quota", "torch_threads", "usable_cpus"]

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _v2_quota(text: str | None) -> float | None:
    """``cpu.max`` ("max 100000" or "QUOTA PERIOD") -> CPUs, None when unlimited."""
    if not text:
        return None
    quota, _, period = text.partition(" ")
    try:
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    except (ValueError, ZeroDivisionError):
        return None


def cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPUs' worth of time the cgroup quota allows this process, None without a quota.

    cgroup v2: the smallest ``cpu.max`` of the process's cgroup (from ``/proc/self/cgroup``)
    and of its parents up to the root; inside a container the cgroup namespace makes the
    container's own cgroup the root, which is read too. cgroup v1: ``cpu.cfs_quota_us /
    cpu.cfs_period_us`` (``-1`` = none).
    """
    limits: list[float] = []
    if (root / "cgroup.controllers").exists():
        relative = ""
        for line in (_read(self_cgroup) or "").splitlines():
            if line.startswith("0::"):
                relative = line[3:].strip().lstrip("/")
        folder = root / relative if relative else root
        while True:
            limit = _v2_quota(_read(folder / "cpu.max"))
            if limit is not None:
                limits.append(limit)
            if folder == root or root not in folder.parents:
                break
            folder = folder.parent
    else:
        for v1 in (root / "cpu", root / "cpu,cpuacct", root):
            quota, period = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
            if quota is None or period is None:
                continue
            try:
                if int(quota) > 0 and int(period) > 0:
                    limits.append(int(quota) / int(period))
            except ValueError:
                pass
            break
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """The CPUs this process may use: its affinity, capped by the cgroup quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def torch_threads(
    override: int = 0,
    environ: dict[str, str] | None = None,
    root: Path = CGROUP_ROOT,
    self_cgroup: Path = PROC_SELF_CGROUP,
) -> tuple[int | None, str]:
    """(threads to set, where the number comes from); None = leave torch's pool as it is."""
    env = os.environ if environ is None else environ
    if override > 0:
        return override, "LORATUNE_TORCH_THREADS"
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, "OMP_NUM_THREADS"
    quota = cpu_quota(root, self_cgroup)
    cpus = usable_cpus(root, self_cgroup)
    where = f"cgroup CPU quota {quota:g}" if quota is not None else "CPU affinity"
    return cpus, where


def configure_torch_threads(override: int = 0) -> int:
    """Size torch's intra-op pool (see the module); returns the pool's size."""
    import torch

    threads, source = torch_threads(override)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    logger.info("torch threads: %d (from %s)", torch.get_num_threads(), source)
    return int(torch.get_num_threads())
