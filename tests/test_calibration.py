"""calibrate -> compare round trip on the local CPU (a few shapes), and its error paths."""

from __future__ import annotations

import math

import pytest
import yaml

pytest.importorskip("torch")

from simulator import calibration  # noqa: E402
from simulator.__main__ import main  # noqa: E402
from simulator.hardware import load_profile  # noqa: E402


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "local.yaml"
    assert main(["calibrate", "--out", str(out), "--quick", "--repeats", "2"]) == 0
    return out


def test_calibrated_profile_loads_like_a_shipped_one(calibrated):
    hw = load_profile(str(calibrated))
    assert hw.kind == "cpu" and hw.calibration["date"] and hw.calibration["device"]
    assert 0 < hw.achievable.matmul <= 1 and hw.launch_overhead_s > 0 and hw.ops_per_kernel >= 1
    for group in hw.calibration["fit_residuals"].values():
        assert group["n"] >= 1 and math.isfinite(group["mape"])
    assert main(["plan", "--gpu", str(calibrated), "--model", "llama-68m", "--draft", "llama-68m", "--dtype", "fp32"]) == 0


def test_compare_reports_finite_errors_per_group(calibrated, capsys, tmp_path):
    capsys.readouterr()
    plot = tmp_path / "cmp.png"
    assert main(["compare", "--gpu", str(calibrated), "--quick", "--repeats", "2", "--json", "--plot", str(plot)]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    groups = {r["group"] for r in result["rows"]}
    assert {"attention", "forward (decode/verify)", "speculative decoding"} <= groups
    assert all(math.isfinite(r["error"]) and r["predicted_s"] > 0 and r["measured_s"] > 0 for r in result["rows"])
    assert set(result["groups"]) == groups and plot.stat().st_size > 10_000


def test_compare_refuses_a_profile_of_another_device(calibrated, tmp_path, capsys):
    data = yaml.safe_load(calibrated.read_text())
    data["calibration"]["device"] = "Some Other CPU (64 threads)"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    assert main(["compare", "--gpu", str(other), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "Some Other CPU" in err and "this device is" in err and err.count("\n") == 1
    assert main(["compare", "--gpu", "a100", "--quick"]) == 2
    assert "not calibrated on a device" in capsys.readouterr().err


def test_unwritable_output_fails_before_measuring(tmp_path, capsys):
    assert main(["calibrate", "--out", str(tmp_path / "missing-dir" / "p.yaml"), "--quick"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["calibrate", "--out", str(tmp_path), "--quick"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_interrupted_calibration_leaves_no_file(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "measure_calibration_suite", interrupted)
    out = tmp_path / "p.yaml"
    assert main(["calibrate", "--out", str(out), "--quick"]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "interrupted" in capsys.readouterr().err


def test_interrupt_while_writing_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration.yaml, "safe_dump", boom)
    with pytest.raises(KeyboardInterrupt):
        calibration.write_profile_atomically({"name": "x"}, tmp_path / "p.yaml")
    assert list(tmp_path.iterdir()) == []
