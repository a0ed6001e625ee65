"""Output paths checked before any work is done, and files written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from simulator.errors import UserError


def check_writable_dir(directory: Path) -> None:
    """A folder that exists (or can be made) and takes a new file; else one UserError line."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{directory}: cannot write there: {exc.strerror or exc}") from None


def check_writable_file(path: Path) -> None:
    """A file whose folder takes a new file (it is written through a temporary file beside it)."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a file")
    check_writable_dir(path.parent if str(path.parent) else Path("."))


def write_json_atomic(path: Path, data: dict) -> None:
    """JSON to `path` through a temporary file in the same folder: an interrupted run leaves the
    old file (or none), never half a file. NaN and infinities are refused (they are not JSON)."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
