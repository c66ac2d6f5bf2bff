"""benchmarks/RESULTS.md holds the latest figures of several benchmarks, each in a region of its own.

Each benchmark's `--write` replaces only its own region (between `<!-- begin NAME -->` and
`<!-- end NAME -->`), or appends it when the file has none yet, so running one benchmark again never
drops another's figures.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

TITLE = "# Benchmark results\n"


def command_line() -> str:
    """How the running benchmark was started, as a command from the repository root (for its region)."""
    return shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def write_region(path: str | Path, name: str, text: str) -> None:
    """Put `text` in region `name` of the Markdown file at `path` (created with a title if missing)."""
    path = Path(path)
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    region = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else TITLE
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = head + region + tail
    else:
        new = old.rstrip() + "\n\n" + region + "\n"
    path.write_text(new, encoding="utf-8")
