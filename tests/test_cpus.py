"""The CPUs a server sizes its pools for: its affinity mask, bounded by its cgroup's CPU quota (cpus.py)."""

from __future__ import annotations

import contextlib
import os
import re

import numpy as np
import pytest

import cgroups
from helpers import HALF_PLUS_TWO, ServerProcess
from remote_predict.serving.cpus import CpuBudget, cgroup_cpu_limit


def _reader(files: dict[str, str]):
    return files.get


V1_MOUNTS = """\
25 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 {root} /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
27 25 0:24 {root} /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory
"""


def test_a_v1_quota_is_read_where_the_cpu_hierarchy_is_mounted():
    cgroup = "5:memory:/kubepods/pod1/c1\n3:cpu,cpuacct:/kubepods/pod1/c1\n0::/\n"
    # A container sees its own cgroup at the mount point (the mount's root is its cgroup).
    mounts = V1_MOUNTS.format(root="/kubepods/pod1/c1")
    files = {"/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "150000\n",
             "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
    assert cgroup_cpu_limit(cgroup, mounts, _reader(files)) == 1.5
    # The host sees the whole hierarchy: the same cgroup under its path, its parent limiting it harder.
    mounts = V1_MOUNTS.format(root="/")
    base = "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1"
    files = {f"{base}/c1/cpu.cfs_quota_us": "-1\n", f"{base}/c1/cpu.cfs_period_us": "100000\n",
             f"{base}/cpu.cfs_quota_us": "50000\n", f"{base}/cpu.cfs_period_us": "100000\n"}
    assert cgroup_cpu_limit(cgroup, mounts, _reader(files)) == 0.5


def test_a_v2_quota_is_the_smallest_along_the_path():
    cgroup = "0::/app/worker\n"
    mounts = "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    files = {"/sys/fs/cgroup/app/worker/cpu.max": "400000 100000\n", "/sys/fs/cgroup/app/cpu.max": "250000 100000\n",
             "/sys/fs/cgroup/cpu.max": "max 100000\n"}
    assert cgroup_cpu_limit(cgroup, mounts, _reader(files)) == 2.5
    files["/sys/fs/cgroup/app/cpu.max"] = "max 100000\n"
    assert cgroup_cpu_limit(cgroup, mounts, _reader(files)) == 4.0


def test_no_quota_no_cgroups_or_unreadable_files_count_as_no_limit():
    v2 = "30 25 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert cgroup_cpu_limit("0::/\n", v2, _reader({"/sys/fs/cgroup/cpu.max": "max 100000\n"})) is None
    assert cgroup_cpu_limit("0::/\n", v2, _reader({})) is None
    assert cgroup_cpu_limit("", "", _reader({})) is None
    assert cgroup_cpu_limit("0::/\n", v2, _reader({"/sys/fs/cgroup/cpu.max": "garbage\n"})) is None
    # A hybrid host: the cpu controller is v1's; a v2 hierarchy without it says nothing about CPUs.
    hybrid = V1_MOUNTS.format(root="/") + "31 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    files = {"/sys/fs/cgroup/unified/cpu.max": "100000 100000\n"}
    assert cgroup_cpu_limit("3:cpu,cpuacct:/\n0::/\n", hybrid, _reader(files)) is None


def test_the_budget_rounds_a_quota_up_and_never_exceeds_the_affinity_mask():
    assert CpuBudget(affinity=64, quota=None).cpus == 64
    assert CpuBudget(affinity=64, quota=2.0).cpus == 2
    assert CpuBudget(affinity=64, quota=1.5).cpus == 2
    assert CpuBudget(affinity=64, quota=0.1).cpus == 1
    assert CpuBudget(affinity=4, quota=16.0).cpus == 4
    assert CpuBudget(affinity=64, quota=2.0).describe() == "2 CPUs (a CPU quota of 2, of 64 it may run on)"
    assert CpuBudget(affinity=1, quota=None).describe() == "1 CPU"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to limit a server to fewer")
def test_a_server_in_a_cpu_limited_cgroup_sizes_its_pools_for_its_quota():
    """A container with a CPU limit (a pod's `limits.cpu`): the pools are sized for the limit, not the node."""
    with contextlib.ExitStack() as stack:
        try:
            prefix = stack.enter_context(cgroups.cpu_quota(0.5))
        except OSError as e:
            pytest.skip(f"no writable cgroup cpu controller here: {e}")
        with ServerProcess(f"--model_base_path={HALF_PLUS_TWO}", "--model_name=half_plus_two", prefix=prefix) as s:
            assert s.predict("half_plus_two", {"x": np.array([[2.0]], np.float32)}).outputs["y"].float_val == [3.0]
            started = next(line for line in s.output().splitlines() if "Serving models" in line)
    cpus = len(os.sched_getaffinity(0))
    assert f"on 1 CPU (a CPU quota of 0.5, of {cpus} it may run on)" in started, started
    # TF Serving's 4 request threads per CPU, for one CPU.
    assert re.search(r"gRPC on 127\.0\.0\.1:\d+ \(4 threads\), REST on 127\.0\.0\.1:\d+ \(4 threads\)",
                     started), started
