"""How many CPUs this server sizes its pools for: the CPUs it may run on, bounded by its cgroup's CPU quota.

Why the quota: a container with a CPU limit (a Kubernetes pod's `resources.limits.cpu`) runs on every CPU
of its node but may only use the limit's worth of CPU time per period (the CFS quota). TF Serving counts
the affinity mask only (its NumSchedulableCPUs), so on a 64-CPU node a pod limited to 2 CPUs would get
pools sized for 64: 256 gRPC request threads (1,024 for a split master), TensorFlow intra- and inter-op
pools of 64, and TFLite interpreters and batch slots for 64 CPUs. Those threads do not add throughput; they
spend the quota sooner, and the kernel then stops every thread of the container until the next period
(100 ms by default): a request that would take a few ms waits for the period instead. The JVM, .NET and
Go runtimes count a container's limit for the same reason.

The count is the quota rounded up (a limit of 1.5 CPUs gets pools for 2: rounding down would leave the
half unused), never more than the affinity mask allows, at least 1. Every cgroup from the process's own
up to its hierarchy's root may limit it; the smallest limit holds. cgroup v1's `cpu` controller
(`cpu.cfs_quota_us`, `cpu.cfs_period_us`) and v2's `cpu.max` are both read; a file that cannot be read
counts as no limit, so a host without cgroups gets the affinity mask, as TF Serving does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

Reader = Callable[[str], str | None]  # a file's text, or None when it cannot be read


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError:
        return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (`\\040`)."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup this mount shows at its mount point (a container sees its own as "/")
    point: str
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1: the controllers the hierarchy binds


def _mounts(mountinfo: str) -> list[_Mount]:
    mounts = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        version = 2 if tail[0] == "cgroup2" else 1
        controllers = frozenset(tail[2].split(",")) if version == 1 else frozenset()
        mounts.append(_Mount(_unescape(fields[3]), _unescape(fields[4]), version, controllers))
    return mounts


def _directory(mount: _Mount, path: str) -> str | None:
    """The directory of cgroup `path` under `mount`, or None when the mount does not show it."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    return mount.point.rstrip("/") + path[len(root):]


def _v1_limit(directory: str, read: Reader) -> float | None:
    quota = read(os.path.join(directory, "cpu.cfs_quota_us"))
    period = read(os.path.join(directory, "cpu.cfs_period_us"))
    try:
        quota_us, period_us = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _v2_limit(directory: str, read: Reader) -> float | None:
    text = read(os.path.join(directory, "cpu.max"))
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota_us, period_us = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def cgroup_cpu_limit(cgroup: str, mountinfo: str, read: Reader = _read) -> float | None:
    """The CPUs a process may use by its cgroups' CPU quotas (None: no quota), from the text of its
    /proc/<pid>/cgroup and /proc/<pid>/mountinfo; `read` reads the cgroup files."""
    paths: dict[int, str] = {}  # 1: the v1 hierarchy holding `cpu`; 2: the unified hierarchy
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            paths.setdefault(2, path)
        elif "cpu" in controllers.split(","):
            paths[1] = path
    # The cpu controller belongs to one hierarchy: v1's when a v1 hierarchy binds it (a hybrid host).
    version = 1 if 1 in paths else 2
    path = paths.get(version)
    if path is None:
        return None
    limits = []
    for mount in _mounts(mountinfo):
        if mount.version != version or (version == 1 and "cpu" not in mount.controllers):
            continue
        directory = _directory(mount, path)
        if directory is None:
            continue
        limit = _v1_limit if version == 1 else _v2_limit
        while True:  # this cgroup and each ancestor the mount shows
            found = limit(directory, read)
            if found is not None:
                limits.append(found)
            if os.path.normpath(directory) == os.path.normpath(mount.point):
                break
            directory = os.path.dirname(directory)
        break
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """The CPUs this process may run on (the affinity mask: a container's cpuset, not the host's CPUs)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuBudget:
    affinity: int  # CPUs the process may run on
    quota: float | None  # CPUs its cgroup's quota allows (None: no quota)

    @property
    def cpus(self) -> int:
        if self.quota is None:
            return self.affinity
        return max(1, min(self.affinity, math.ceil(round(self.quota, 6))))

    def describe(self) -> str:
        counted = f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"
        if self.quota is None or self.cpus == self.affinity:
            return counted
        return f"{counted} (a CPU quota of {self.quota:g}, of {self.affinity} it may run on)"


def budget() -> CpuBudget:
    """This process's CPUs, read now."""
    quota = cgroup_cpu_limit(_read("/proc/self/cgroup") or "", _read("/proc/self/mountinfo") or "")
    return CpuBudget(affinity_cpus(), quota)


BUDGET = budget()  # read once, at import: flag defaults and pool sizes are decided from it
