"""`sweep`: many `simulate` runs from one spec file, one Parquet row per point.

A spec is YAML with up to three keys:

    fixed:  {requests: 10000, seed: 0}          # options every point shares
    grid:   {gpu: [a100, h100], gamma: [2, 4]}  # every combination of these values
    points: [{gpu: a100, tp: 2}, ...]           # or an explicit list of points

Every option key is a `simulate` option, spelled as its flag without the dashes and with `_` for
`-` (`--max-batch` -> `max_batch`); `interval: true` adds the two interval runs `simulate` makes
by default (a sweep leaves them out: three times faster). `grid` and `points` may be given
together: each listed point is combined with every grid combination. The expansion is a
comprehension (STYLE 11); a point's options are checked exactly as `simulate` checks its flags,
before any point runs.

A row holds the point's resolved options (every option, defaults filled in), `point` (its index
in the expansion) and `point_id` (a hash of its options: what `--resume` matches on), followed by
the `simulate --json` report flattened with `.` between keys (`speculative.latency_s.ttft.p99`);
the per-bucket timeline is left out, and lists (and the rejected-by-reason table) are JSON text.
The file is rewritten atomically after every completed point, so an interruption loses at most
the points still running.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import yaml

from simulator.errors import UserError, finite_json
from simulator.paths import check_writable_file, write_atomically

SPEC_SECTIONS = ("fixed", "grid", "points")
EXTRA_KEYS = {"interval": False}  # sweep-only options and their defaults
LEFT_OUT = ("timeline",)  # report keys not flattened into a row (a time series, not a summary)


def option_defaults() -> dict[str, object]:
    """Every `simulate` option a point may set, with its default (as the CLI parses it)."""
    from simulator import simulate

    parser = argparse.ArgumentParser(add_help=False)
    simulate._add_options(parser, None)
    return {a.dest: a.default for a in parser._actions} | EXTRA_KEYS


def _option_kinds() -> dict[str, tuple[type, tuple | None]]:
    """(type, choices) of each option: bool for switches, else the parser's type (str if none)."""
    from simulator import simulate

    parser = argparse.ArgumentParser(add_help=False)
    simulate._add_options(parser, None)
    kinds: dict[str, tuple[type, tuple | None]] = {}
    for a in parser._actions:
        kind = bool if isinstance(a, argparse._StoreTrueAction | argparse.BooleanOptionalAction) else (a.type or str)
        kinds[a.dest] = (kind, tuple(a.choices) if a.choices else None)
    return kinds | {k: (type(v), None) for k, v in EXTRA_KEYS.items()}


def _value(key: str, value, where: str, kinds: dict, defaults: dict):
    """`value` of option `key` as the CLI would hold it, or a UserError naming `where`."""
    kind, choices = kinds[key]
    if value is None and defaults[key] is None:
        return None
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:  # text options: durations and acceptance rates may be written as bare numbers
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise UserError(f"{where}: expected {'true or false' if kind is bool else 'a whole number' if kind is int else 'a number' if kind is float else 'text'}, got {value!r}")
    if choices and value not in choices:
        raise UserError(f"{where}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _known(key, where: str, defaults: dict) -> str:
    if not isinstance(key, str) or key not in defaults:
        raise UserError(f"{where}: unknown key {key!r}; options are {', '.join(sorted(defaults))}")
    return key


def load_spec(path: str | Path) -> dict:
    """The spec's YAML as a dict, or one UserError line naming what is wrong."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise UserError(f"{path}:{line} malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a sweep spec is a mapping with keys {', '.join(SPEC_SECTIONS)}")
    return data


def expand(spec: dict, name: str = "spec") -> list[dict]:
    """Every point of `spec` as a full option dict (defaults filled in), in grid order; a key,
    value or shape error is a UserError naming the key."""
    defaults, kinds = option_defaults(), _option_kinds()
    for section in spec:
        if section not in SPEC_SECTIONS:
            raise UserError(f"{name}: unknown key {section!r}; a spec has {', '.join(SPEC_SECTIONS)}")
    if "grid" not in spec and "points" not in spec:
        raise UserError(f"{name}: no grid and no points: nothing to simulate")
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{name}: fixed must be a mapping of option: value")
    base = dict(defaults)
    for key, value in fixed.items():
        base[_known(key, f"{name}: fixed", defaults)] = _value(key, value, f"{name}: fixed.{key}", kinds, defaults)

    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise UserError(f"{name}: grid must be a mapping of option: [values]")
    axes = []
    for key, values in grid.items():
        _known(key, f"{name}: grid", defaults)
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise UserError(f"{name}: grid.{key} is empty: the grid has no points")
        axes.append([(key, _value(key, v, f"{name}: grid.{key}[{i}]", kinds, defaults)) for i, v in enumerate(values)])

    listed = spec.get("points")
    if listed is None:
        listed = [{}]
    if not isinstance(listed, list) or not listed:
        raise UserError(f"{name}: points must be a non-empty list of mappings of option: value")
    rows = []
    for i, point in enumerate(listed):
        if not isinstance(point, dict):
            raise UserError(f"{name}: points[{i}] must be a mapping of option: value")
        rows.append({_known(k, f"{name}: points[{i}]", defaults): _value(k, v, f"{name}: points[{i}].{k}", kinds, defaults)
                     for k, v in point.items()})  # fmt: skip
    return [base | point | dict(combo) for point in rows for combo in itertools.product(*axes)]


def point_id(point: dict) -> str:
    """A stable hash of a point's options: what `--resume` matches rows on."""
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]


def _args(point: dict) -> argparse.Namespace:
    return argparse.Namespace(**{k: v for k, v in point.items() if k not in EXTRA_KEYS})


def check_points(points: list[dict], name: str = "spec") -> None:
    """Check every point as `simulate` checks its flags (GPU, models, memory fit, ranges), before
    any runs; the first bad point is a UserError naming it and its options that differ from the
    defaults."""
    from simulator import simulate

    if not points:
        raise UserError(f"{name}: the grid has no points")
    for key, loader in (("gpu", "load_profile"), ("model", "load_model"), ("draft", "load_model")):
        for value in sorted({p[key] for p in points}):
            if key == "draft" and value == simulate.MEDUSA:  # heads on the target, not a model: checked with its tree below
                continue
            try:
                getattr(simulate, loader)(value)
            except UserError as exc:
                raise UserError(f"{name}: {key}: {exc}") from None
    defaults = option_defaults()
    for i, point in enumerate(points):
        try:
            simulate.config_from_args(_args(point))
        except UserError as exc:
            differs = ", ".join(f"{k}={v}" for k, v in point.items() if v != defaults[k]) or "all defaults"
            raise UserError(f"{name}: point {i} ({differs}): {exc}") from None


def flatten(report: dict, prefix: str = "") -> dict:
    """A `simulate` report as one flat row: nested keys joined by '.', lists and the rejected-by-reason
    table as JSON text, the timeline left out, NaN and infinities as None."""
    row: dict = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if key in LEFT_OUT:
            continue
        if key == "rejected_by_reason" or isinstance(value, (list, tuple)):
            row[name] = json.dumps(json.loads(finite_json(value)), separators=(",", ":"))
        elif isinstance(value, dict):
            row.update(flatten(value, f"{name}."))
        elif isinstance(value, float) and not math.isfinite(value):
            row[name] = None
        else:
            row[name] = value
    return row


def run_point(job: tuple[int, dict]) -> dict:
    """One point through `simulate` (both runs, from the point's seed): its row. Runs in a worker."""
    from simulator import simulate

    index, point = job
    hw, target, draft, acceptance, serving, workload = simulate.config_from_args(_args(point))
    report = simulate.simulate(hw, target, draft, acceptance, serving, workload, point["seed"], intervals=point["interval"])
    return {"point": index, "point_id": point_id(point), **point, **flatten(report)}


# ---------------------------------------------------------------------------------------------
# The Parquet file


def _pricing_group(job: tuple[int, dict]) -> tuple:
    """Points that price the same passes (a process's memos serve them all): one GPU, model pair, dtype and split."""
    point = job[1]
    return tuple(point[k] for k in ("gpu", "model", "draft", "dtype", "tp"))


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier sweep's output (none if there is no file); a file that is not one is a UserError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        return []
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read it as Parquet to resume: {' '.join(str(exc).split())[:160]}") from None
    if "point_id" not in table.column_names:
        raise UserError(f"{path}: not the output of a sweep (no point_id column); cannot resume from it")
    return table.to_pylist()


def write_rows(path: Path, rows: list[dict]) -> None:
    """All rows, sorted by point index, as one Parquet file written atomically; columns are the
    union of the rows' keys in first-seen order (a missing value is null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows, key=lambda r: (r["point"], r["point_id"]))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    try:
        write_atomically(path, lambda tmp: pq.write_table(table, tmp))
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from None


def run_sweep(
    points: list[dict],
    out: Path,
    resume: bool = False,
    runner=None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int, int], None] | None = None,
) -> dict:
    """Simulate every point not yet in `out` (with `resume`) on `runner` (a `parallel.Runner`,
    not yet entered; default: in this process), writing `out` after each completed point. `on_total(todo,
    skipped)` is called once before the first point runs. Returns counts."""
    from simulator.parallel import Runner

    check_writable_file(out)
    kept = read_rows(out) if resume else []
    done_ids = {r["point_id"] for r in kept}
    jobs = {i: (i, p) for i, p in enumerate(points) if point_id(p) not in done_ids}
    if on_total:
        on_total(len(jobs), len(points) - len(jobs))
    rows = list(kept)
    with runner or Runner(workers=1) as r:
        for _, row in r.unordered(run_point, jobs, group=_pricing_group):
            rows.append(row)
            write_rows(out, rows)
            if progress:
                progress(1)
    return {"points": len(points), "simulated": len(jobs), "skipped": len(points) - len(jobs), "rows": len(rows)}
