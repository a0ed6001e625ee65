"""CLI of `python -m reference specdec` and `python -m reference bench specdec` (to be written)."""


def add_parsers(sub, bench) -> None:
    """Register the run command on `sub` and the benchmark on `bench`; each sets `run=callable(args)`."""
