"""Outputs written whole or not at all: made inside a temporary sibling folder, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(
    out: str | Path, write: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Call `write(path)` to make a file or directory named like `out` inside a temporary
    sibling folder, then rename it to `out`, so a failed write leaves nothing half-written.

    Only the folder around it is private (mkdtemp's 0700): what `write` makes gets the umask's
    usual mode. An existing `out` is refused unless `overwrite`.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose a new output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp_dir / out.name)
        os.replace(tmp_dir / out.name, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out
