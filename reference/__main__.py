"""`python -m reference {specdec,attention,datastore,bild,bench,device-check}`: argument parsing only; the work is in library modules."""

from __future__ import annotations

import sys

from simulator.errors import Parser, missing_extra, run_command


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m reference", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks that print measured figures", description="Benchmarks of the executor on this device.").add_subparsers(
        dest="bench", required=True
    )
    try:
        from reference import cli_attention, cli_drafts, cli_specdec, device_check
    except ModuleNotFoundError as exc:  # the core install has no torch
        if missing_extra(exc) is None:
            raise
        print(f"error: {missing_extra(exc)}", file=sys.stderr)
        return 2

    cli_specdec.add_parsers(sub, bench)
    cli_attention.add_parsers(sub, bench)
    cli_drafts.add_parsers(sub, bench)
    device_check.add_parsers(sub)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
