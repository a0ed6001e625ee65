"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: a name, a file, a value out of range.

    The message is a single line that says what is wrong and, where it helps, what would be right.
    """
