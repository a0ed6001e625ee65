"""`python -m simulator.e2e [FILE]`: check a published-results CSV (default: the shipped one) and print
what it covers. Argument parsing only; the checks and counts are `simulator.e2e` library calls."""

from __future__ import annotations

import argparse
import sys

from simulator import e2e
from simulator.errors import Parser, finite_json, run_command


def _run(args: argparse.Namespace) -> int:
    rows = e2e.load(args.file)
    info = {"file": str(args.file or e2e.PUBLISHED_CSV), **e2e.summary(rows)}
    if args.json:
        print(finite_json(info))
        return 0
    print(f"{info['file']}: {info['rows']} rows from {info['sources']} sources, {info['closed_loop']} closed-loop")
    for key in ("by_gpu", "by_size_class", "by_model", "by_engine"):
        print(f"  {key[3:]}: " + ", ".join(f"{k} {v}" for k, v in info[key].items()))
    print(f"  split (1 row in {e2e.FIT_EVERY} by hash of URL + settings): fit {info['fit']}, held out {info['held_out']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        prog="python -m simulator.e2e",
        description="Check a file of published end-to-end serving results (bench serve points) and print what it "
        "covers: rows by GPU, model size class, model and engine, and the fit / held-out split.",
    )
    parser.add_argument("file", nargs="?", default=None, help="results CSV with the columns of the shipped table (default: the shipped published_serving.csv)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.set_defaults(run=_run)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
