"""Which versions of a model should be loaded: a pure function of what is on disk.

`latest { num_versions }` (the default, N = 1), `all {}` and `specific { versions }`, as in TF Serving's
model config. Versions that failed to load are left out of the candidates, so a broken newest version
does not leave the model unserved: the policy falls back to the newest version that loads.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from tensorflow_serving.config import file_system_storage_path_source_pb2 as fs_pb2

VersionPolicy = fs_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy


def aspired_versions(policy: VersionPolicy, on_disk: Iterable[int], failed: Collection[int] = ()) -> set[int]:
    candidates = sorted((v for v in on_disk if v not in failed), reverse=True)
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(candidates)
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return {v for v in candidates if v in wanted}
    num = policy.latest.num_versions if choice == "latest" else 0
    return set(candidates[: max(num, 1)])


def describe(policy: VersionPolicy) -> str:
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return "all versions"
    if choice == "specific":
        return "versions " + ",".join(str(v) for v in sorted(policy.specific.versions))
    num = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return f"latest {num} version" + ("s" if num > 1 else "")
