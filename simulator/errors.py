"""The one exception type the CLI turns into a one-line message and exit code 2, and the argument
parser and runner that keep every answer to bad input on one line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

# Modules only the `reference` extra installs; a command that needs one says how to get it.
EXTRA_MODULES = ("torch", "triton")
EXTRA_HINT = "pip install -e '.[reference]'"
CLOSED_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


class UserError(ValueError):
    """Bad input from the user: a name, a file, a value out of range.

    The message is a single line that says what is wrong and, where it helps, what would be right.
    """


class Parser(argparse.ArgumentParser):
    """argparse with its complaints on one line (`error: ...; see PROG --help`) and exit code 2,
    instead of the usage block followed by the error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def validation_message(exc, names: dict[str, str] | None = None) -> str:
    """pydantic's first complaint in one line: the field (by `names`, where given) and the reason, and
    how many more there are."""
    names = names or {}
    first = exc.errors()[0]
    field = ".".join(names.get(str(p), str(p)) for p in first["loc"])
    reason = first["msg"].removeprefix("Value error, ")
    if not field:  # a check across fields names its fields in its message
        for ours, theirs in names.items():
            reason = reason.replace(ours, theirs)
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return (f"field {field}: {reason}" if field else reason) + more


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line answer to a missing module of the `reference` extra; None for any other module."""
    if (exc.name or "").split(".")[0] not in EXTRA_MODULES:
        return None
    return f"this command needs {exc.name}, which the core install leaves out; install it with {EXTRA_HINT}"


def finite_json(data) -> str:
    """JSON text of `data` with every NaN or infinity written as null: they have no JSON spelling, and
    a reader that gets `NaN` or `Infinity` fails on it."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), indent=2, allow_nan=False, default=str)


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null, so that the interpreter's last flush at exit
    finds nowhere to fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (captured output)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def run_command(args) -> int:
    """Run a parsed command (`args.run(args)`): a `UserError`, Ctrl-C or a missing `reference` extra
    becomes one line on stderr and exit code 2, never a traceback; a reader that closed the pipe
    (`... --json | head`) ends the command quietly."""
    try:
        return args.run(args) or 0
    except UserError as exc:
        message = " ".join(str(exc).splitlines())  # one line, whatever a value quoted in it holds
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return CLOSED_PIPE_EXIT
