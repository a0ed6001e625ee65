"""Running a command-line entry point in this process, its output captured: (exit code, stdout, stderr).
An exception that escapes the entry point escapes this too: a test sees it as the traceback a user would."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_main(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse leaves through SystemExit
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def simulator_cli(argv: list[str]) -> tuple[int, str, str]:
    from simulator.__main__ import main

    return run_main(main, argv)


def reference_cli(argv: list[str]) -> tuple[int, str, str]:
    from reference.__main__ import main

    return run_main(main, argv)


def run_python(code: str, stdout=subprocess.PIPE, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter at the repository root (for what must not share this
    process: a module hidden from imports, a closed pipe)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout_s)


def one_error_line(err: str) -> str:
    """The single line of an answer to bad input; fails when stderr holds anything else."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line, got {err!r}"
    assert "Traceback" not in err and "errors.pydantic.dev" not in err
    return lines[0]
