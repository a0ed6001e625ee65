"""Parsing durations given on the command line (`2s`, `50ms`, `50 ms`, `0.05` (seconds), `800us`) and
software versions (`0.19.0`, `v0.14.0rc1`)."""

from __future__ import annotations

import math
import re

from simulator.errors import UserError

_SECONDS_PER_UNIT = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "min": 60.0}
_DURATION = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zµ]*)\s*$")


def parse_duration_s(text: str, what: str = "duration") -> float:
    """A positive duration in seconds. A bare number is seconds; units s, ms, us, min."""
    match = _DURATION.match(str(text))
    if not match or match.group(2) not in _SECONDS_PER_UNIT:
        units = ", ".join(u for u in _SECONDS_PER_UNIT if u and u != "µs")
        raise UserError(f"{what}: cannot read {text!r} as a duration; write a number with a unit ({units}), e.g. 2s or 50ms; a bare number is seconds")
    value = float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]
    if value <= 0:
        raise UserError(f"{what}: must be positive, got {text!r}")
    if not math.isfinite(value):
        raise UserError(f"{what}: must be a finite duration, got {text!r}")
    return value


_RELEASE = re.compile(r"v?(\d+)\.(\d+)")


def release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "0.19.0" or "v0.14.0rc1"; () when it names none
    (which sorts before every release)."""
    m = _RELEASE.match(str(version))
    return (int(m[1]), int(m[2])) if m else ()
