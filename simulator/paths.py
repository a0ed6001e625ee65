"""Output paths checked before any work is done, files written whole or not at all, and JSON input
files read with one line for whatever is wrong with them."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
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
    try:
        check_writable_dir(path.parent if str(path.parent) else Path("."))
    except UserError as exc:
        raise UserError(f"{path}: cannot write this file ({exc})") from None


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary file beside `path` (same suffix, so writers that read the format
    off it still can), then rename: an interrupted write leaves the old file (or none), never half
    a file. The file gets the permissions a plain open() would have given it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)  # read the umask (setting it is the only way), then put it back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a temporary file is private to its owner
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    """JSON to `path`, written atomically (`write_atomically`). NaN and infinities are refused
    (they are not JSON)."""
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def check_plot_path(path: Path) -> None:
    """A plot's file: writable (`check_writable_file`) and of a format matplotlib can write, named
    by its extension (none: PNG)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().removeprefix(".")
    if suffix and suffix not in formats:
        raise UserError(f"{path}: cannot write a plot as .{suffix}; use one of {', '.join('.' + f for f in sorted(formats))}")
    check_writable_file(path)


def read_json(path: Path, what: str):
    """The JSON value in `path` (`what` names the kind of file in the message); a file that cannot
    be read, is not UTF-8 or is not JSON is one UserError line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); {what} is JSON") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno}: malformed JSON: {exc.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: malformed JSON: nested too deep") from None
    except ValueError:  # JSON allows any number of digits; int() refuses past Python's limit
        raise UserError(f"{path}: a number in it has more than {sys.get_int_max_str_digits()} digits") from None
