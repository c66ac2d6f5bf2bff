"""What versions exist: TF Serving's layout, `base_path/<integer version>/saved_model.pb`."""

from __future__ import annotations

import os


def list_versions(base_path: str) -> dict[int, str]:
    """Version number -> directory, for every child directory whose name is a non-negative integer.

    Raises FileNotFoundError when `base_path` itself is missing.
    """
    versions: dict[int, str] = {}
    with os.scandir(base_path) as entries:
        for entry in entries:
            name = entry.name
            if not name.isdigit() or not entry.is_dir():
                continue
            version = int(name)
            if version < (1 << 63):
                versions[version] = entry.path
    return versions


def fingerprint(path: str) -> int:
    """Changes when a version directory is replaced, so a version that failed to load is retried."""
    try:
        marker = os.path.join(path, "saved_model.pb")
        stat = os.stat(marker if os.path.exists(marker) else path)
        return stat.st_mtime_ns ^ stat.st_ino
    except OSError:
        return 0
