"""Calibration of a profile on the local device and comparison on held-out configurations."""


def add_parsers(sub) -> None:
    """Register `calibrate` and `compare` on the argparse subparsers `sub`."""
