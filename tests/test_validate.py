"""`simulator validate` against the shared GPU data: structure, held-out split, finite errors."""

from __future__ import annotations

import json
import math

import pytest

from simulator.__main__ import main
from simulator.validate import DEFAULT_DATA_DIR, load_points, validate

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="shared GPU data not present beside the repository")


@needs_data
def test_every_series_is_split_into_calibration_and_held_out_points():
    points = load_points(DEFAULT_DATA_DIR)
    assert len(points) > 1000
    series: dict[tuple, list] = {}
    for p in points:
        series.setdefault((p.source, p.kernel, p.gpu), []).append(p)
        assert p.measured_s > 0 and math.isfinite(p.measured_s)
    for members in series.values():
        assert [p.calibration for p in members][:3] == [True, False, False][: len(members)]
    assert {p.dataset for p in points} == {"published", "measured"}


@needs_data
def test_quick_validation_reports_finite_errors_per_group():
    result = validate(DEFAULT_DATA_DIR, calibrate=True, per_series=6)
    assert result["groups"] and all(math.isfinite(g["mape"]) and g["n"] >= 1 for g in result["groups"])
    assert {g["part"] for g in result["groups"]} == {"calibration", "held-out"}
    params = result["fit"]["params"]
    assert all(0 < params[k] <= 1 for k in ("bandwidth", "matmul", "attention"))
    assert math.isfinite(result["held_out_mape_published"]) and math.isfinite(result["held_out_mape_measured"])


@needs_data
def test_validate_cli_json_and_plot(tmp_path, capsys):
    code = main(["validate", "--per-series", "4", "--json", "--plot", str(tmp_path / "v.png")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["points"] > 0 and (tmp_path / "v.png").stat().st_size > 10_000


def test_validate_missing_data_dir_is_exit_2(tmp_path, capsys):
    code = main(["validate", "--data", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "no such data directory" in err and err.count("\n") <= 2
