"""A cgroup with a CPU quota for a test's server (cgroup v1's `cpu` controller or v2's `cpu.max`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 100_000


def _cpu_hierarchy() -> tuple[int, Path] | None:
    """(version, mount point) of the hierarchy that holds this machine's cpu controller, if one is mounted."""
    v2 = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(tail) >= 3 and tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            return 1, Path(fields[4])
        if len(tail) >= 1 and tail[0] == "cgroup2":
            v2 = Path(fields[4])
    if v2 is not None and "cpu" in (v2 / "cgroup.controllers").read_text().split():
        return 2, v2
    return None


@contextlib.contextmanager
def cpu_quota(cpus: float) -> Iterator[tuple[str, ...]]:
    """A command prefix that runs a command in a new cgroup limited to `cpus` CPUs' time per period.

    Raises OSError where this machine gives no writable cpu controller (not root, or no cgroup mounted)."""
    found = _cpu_hierarchy()
    if found is None:
        raise OSError("no cgroup hierarchy holds the cpu controller")
    version, mount = found
    group = mount / f"remote-predict-test-{os.getpid()}"
    if version == 2:
        control = mount / "cgroup.subtree_control"
        if "cpu" not in control.read_text().split():
            control.write_text("+cpu")
    group.mkdir()
    try:
        if version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(int(cpus * PERIOD_US)))
        else:
            (group / "cpu.max").write_text(f"{int(cpus * PERIOD_US)} {PERIOD_US}")
        yield ("sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh")
    finally:
        group.rmdir()  # its processes have ended: the caller's server was stopped inside the block
