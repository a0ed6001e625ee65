"""CLI of `python -m reference attention` and `python -m reference bench attention` (to be written)."""


def add_parsers(sub, bench) -> None:
    """Register the run command on `sub` and the benchmark on `bench`; each sets `run=callable(args)`."""
