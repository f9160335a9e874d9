"""Generated blocks of docs/performance.md: `<!-- aot:NAME -->` ... `<!-- /aot:NAME -->`, each
rewritten by the script that measures it (aot_report.py, accel_benchmark.py)."""

from __future__ import annotations

import re
from pathlib import Path

from cde_jax.outputs import atomic_file

PERFORMANCE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def write_section(path: Path, name: str, text: str) -> None:
    """Replaces block `name` of `path` with `text` (appended when the block is absent)."""
    begin, end = f"<!-- aot:{name} -->", f"<!-- /aot:{name} -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if begin in old else old.rstrip() + "\n\n" + block
    with atomic_file(path, "w") as f:
        f.write(new.strip() + "\n")  # one final newline, however often rewritten
