"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a name, a file, a value out of range.

    The message is a single line that says what is wrong and, where it helps, what would be right.
    """


def run_command(args) -> int:
    """Run a parsed command (`args.run(args)`): a `UserError` or Ctrl-C becomes one line on stderr
    and exit code 2, never a traceback."""
    import sys

    try:
        return args.run(args) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
