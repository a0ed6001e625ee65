"""`python -m reference device-check` end to end on the CPU (--quick: calibrate, compare, the Triton kernels
in Triton's interpreter), its files and their keys, the time budget, bad input; and the CUDA parts that can
be exercised without a GPU: a GPU calibration's profile from stand-in measurements, the device facts."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import stat
import time
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("torch")

from reference import device_check as dc  # noqa: E402
from reference.__main__ import main  # noqa: E402
from simulator import calibration  # noqa: E402
from simulator.errors import UserError  # noqa: E402
from simulator.hardware import load_profile  # noqa: E402

FILES = {"device_check.json", "profile.yaml", "compare.json", "compare.png", "triton_attention.json"}


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One quick device check on this machine's CPU, into a folder it creates."""
    folder = tmp_path_factory.mktemp("check") / "measured" / "here"
    start = time.monotonic()
    code, out, err = run(["device-check", "--out", str(folder), "--quick"])
    return SimpleNamespace(code=code, out=out, err=err, folder=folder, seconds=time.monotonic() - start,
                           record=json.loads((folder / "device_check.json").read_text()))  # fmt: skip


def test_quick_check_writes_every_file_and_says_what_ran(checked):
    assert checked.code == 0, checked.err
    assert {p.name for p in checked.folder.iterdir()} == FILES  # no temporary file left beside them
    r = checked.record
    assert {"date", "started_utc", "device", "device_name", "device_facts", "torch", "triton", "cuda", "python", "commit",
            "uncommitted_changes", "quick", "budget_s", "command", "setup_s", "steps", "total_s", "complete", "ok"} <= set(r)  # fmt: skip
    assert r["device"] == "cpu" and r["cuda"] is None and r["quick"] and r["complete"] and r["ok"] and r["budget_s"] == dc.DEFAULT_BUDGET_S
    assert r["commit"] == "unknown" or (len(r["commit"]) == 40 and int(r["commit"], 16) >= 0)
    assert list(r["steps"]) == ["calibrate", "compare", "triton-attention"]
    for name, step in r["steps"].items():
        assert step["status"] == "ran" and step["seconds"] > 0 and step["files"] == dc.FILES[name] and step["ok"]
    assert sum(s["seconds"] for s in r["steps"].values()) <= r["total_s"] < checked.seconds
    # progress on stderr, a short summary on stdout
    assert "device-check: calibrate" in checked.err and "device-check: Triton attention" in checked.err
    lines = checked.out.strip().splitlines()
    assert len(lines) <= 8 and lines[0].startswith(f"device check on {r['device_name']} (cpu)") and "ok" in lines[0]
    assert f"measured/{r['date']}-" in lines[-1]


def test_quick_check_profile_and_comparison_are_the_calibration_commands(checked):
    hw = load_profile(str(checked.folder / "profile.yaml"))
    assert hw.kind == "cpu" and hw.calibration["device"] == checked.record["steps"]["calibrate"]["device"]
    compare = json.loads((checked.folder / "compare.json").read_text())
    assert {"profile", "device", "rows", "groups", "drift"} <= set(compare) and compare["device"] == hw.calibration["device"]
    assert all(math.isfinite(row["error"]) for row in compare["rows"]) and compare["groups"] == checked.record["steps"]["compare"]["groups"]
    assert (checked.folder / "compare.png").stat().st_size > 10_000


def test_quick_check_runs_the_triton_kernels_interpreted_and_checks_them_against_fp64(checked):
    report = json.loads((checked.folder / "triton_attention.json").read_text())
    assert report["device"] == "cpu" and report["interpreted"] and report["ok"]
    cases = report["cases"]
    assert {c["dtype"] for c in cases} == {"fp16", "fp32"} and len(cases) == len(dc.attention_cases("cpu", quick=True))
    for c in cases:
        assert c["status"] == "ran" and c["seconds"] > 0
        t = c["timing"]
        assert t["fwd_flops"] > 0 and t["fwd_bwd_flops"] == 3.5 * t["fwd_flops"]
        for impl in ("triton", "sdpa"):
            assert t[f"{impl}_fwd_s"] > 0 and t[f"{impl}_fwd_bwd_s"] > 0
            assert t[f"{impl}_fwd_flops_per_s"] == pytest.approx(t["fwd_flops"] / t[f"{impl}_fwd_s"])
    checked_cases = [c for c in cases if c["checked"]]
    assert checked_cases and all(c["agrees"] and c["all_ok"] for c in checked_cases)
    for c in checked_cases:  # the whole `reference attention` result, its Triton row within its fp64 bound
        triton_row = next(r for r in c["check"]["forward"] if r["impl"].startswith("triton"))
        assert "(interpreted)" in triton_row["impl"] and triton_row["max_err"] <= triton_row["bound"]
        assert c["check"]["shape"]["dtype"] == c["dtype"] and c["check"]["ok"]
    assert checked.record["steps"]["triton-attention"]["checked_agree"] == f"{len(checked_cases)}/{len(checked_cases)}"


# --- the time budget ---------------------------------------------------------------------------------------


def test_a_zero_budget_skips_every_step_and_still_writes_the_record(tmp_path):
    code, out, err = run(["device-check", "--out", str(tmp_path), "--quick", "--budget-s", "0"])
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["device_check.json"]
    steps = json.loads((tmp_path / "device_check.json").read_text())["steps"]
    assert {s["status"] for s in steps.values()} == {"skipped"} and not any("seconds" in s for s in steps.values())
    assert steps["calibrate"]["reason"].startswith("out of time") and steps["triton-attention"]["reason"].startswith("out of time")
    assert steps["compare"]["reason"] == "needs calibrate, which was skipped"
    assert "skipped" in out


class FakeClock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_steps_that_no_longer_fit_the_budget_are_skipped_and_failures_recorded():
    clock, ran = FakeClock(), []

    def takes(seconds: float, fail: bool = False):
        def step(deadline: float) -> dict:
            ran.append(seconds)
            clock.now_s += seconds
            if fail:
                raise RuntimeError("no such kernel\nsecond line")
            return {"files": ["x.json"]}

        return step

    steps = [dc.Step("a", 5.0, takes(4.0)), dc.Step("b", 5.0, takes(4.0, fail=True)), dc.Step("c", 1.0, takes(1.0), needs="b"),
             dc.Step("d", 3.0, takes(1.0)), dc.Step("e", 1.0, takes(1.0))]  # fmt: skip
    seen = []
    records = dc.run_steps(steps, 10.0, log=lambda msg: None, clock=clock, after_step=lambda r: seen.append(list(r)))
    assert ran == [4.0, 4.0, 1.0]  # a (10 s left), b (6 s left), e (2 s left); d needs 3 s
    assert records["a"] == {"status": "ran", "seconds": 4.0, "files": ["x.json"]}
    assert records["b"] == {"status": "failed", "seconds": 4.0, "error": "RuntimeError: no such kernel"}
    assert records["c"] == {"status": "skipped", "reason": "needs b, which failed"}
    assert records["d"]["status"] == "skipped" and records["d"]["reason"].startswith("out of time: 2 s of the 10 s budget left")
    assert records["e"]["status"] == "ran"
    assert seen == [["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]]  # written after every step


def test_a_running_step_is_stopped_at_the_end_of_the_budget():
    before = signal.getsignal(signal.SIGALRM)
    start = time.monotonic()
    records = dc.run_steps([dc.Step("slow", 0.0, lambda deadline: time.sleep(30)), dc.Step("next", 0.0, lambda deadline: {})],
                           0.3, log=lambda msg: None)  # fmt: skip
    assert time.monotonic() - start < 5.0
    assert records["slow"]["status"] == "failed" and records["slow"]["error"] == "stopped at the end of the 0.3 s budget"
    assert records["next"]["status"] == "skipped"
    assert signal.getsignal(signal.SIGALRM) == before


def test_the_attention_step_skips_the_shapes_the_budget_leaves_no_time_for(tmp_path):
    result = dc.attention_step(tmp_path, True, "cpu", log=lambda msg: None)(time.monotonic())
    report = json.loads((tmp_path / "triton_attention.json").read_text())
    assert result["cases"] == {"ran": 0, "failed": 0, "skipped": len(report["cases"])} and report["ok"]
    assert all(c["reason"].startswith("out of time") for c in report["cases"])


# --- bad input: one line, exit code 2, before anything is measured ------------------------------------------


@pytest.fixture
def nothing_measured(monkeypatch):
    def measure(*args, **kwargs):
        raise AssertionError("measured despite bad input")

    monkeypatch.setattr(dc, "device_check", measure)


@pytest.mark.parametrize("budget", ["-1", "nan"])
def test_a_negative_budget_is_refused(tmp_path, nothing_measured, budget):
    code, out, err = run(["device-check", "--out", str(tmp_path / "new"), "--budget-s", budget])
    assert code == 2 and out == "" and err.count("\n") == 1 and "--budget-s" in err
    assert not (tmp_path / "new").exists()


def test_an_unwritable_output_folder_is_refused(tmp_path, nothing_measured):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out, says in ((a_file, "is not a folder"), (a_file / "below", "cannot write there")):
        code, stdout, err = run(["device-check", "--out", str(out), "--quick"])
        assert code == 2 and stdout == "" and err.count("\n") == 1 and says in err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "compare.json").write_text("{}")
    code, _, err = run(["device-check", "--out", str(tmp_path / "old"), "--quick"])
    assert code == 2 and "already holds results of a device check (compare.json)" in err


def test_an_interrupted_write_leaves_no_file(tmp_path):
    def interrupted(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dc.write_atomically(tmp_path / "x.json", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_a_written_file_has_the_permissions_open_would_give(tmp_path):
    """Not the temporary file's owner-only mode: others read results as they read any file."""
    umask = os.umask(0o022)
    try:
        dc.write_atomically(tmp_path / "x.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


# --- what only runs on CUDA, exercised with stand-ins -------------------------------------------------------


def test_cuda_runs_the_kernels_in_fp16_and_bf16_and_the_interpreter_in_fp16_and_fp32():
    assert {c["dtype"] for c in dc.attention_cases("cuda", quick=False)} == {"fp16", "bf16"}
    assert {c["dtype"] for c in dc.attention_cases("cpu", quick=True)} == {"fp16", "fp32"}
    quick, full = dc.attention_cases("cuda", quick=True), dc.attention_cases("cuda", quick=False)
    assert 0 < len(quick) < len(full) and {c["checked"] for c in quick} == {True, False}
    assert dc.folder_name("2026-11-30", "NVIDIA H200") == "measured/2026-11-30-nvidia-h200"


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path):
    assert dc.git_commit(tmp_path) == ("unknown", None)


def test_gpu_facts_come_from_torchs_device_properties(monkeypatch):
    import torch

    from reference import microbench as mb

    props = SimpleNamespace(multi_processor_count=132, shared_memory_per_multiprocessor=233472, L2_cache_size=50 << 20,
                            total_memory=150_000_000_000, clock_rate=1_980_000, major=9, minor=0)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(mb, "nvidia_smi_power_limit_w", lambda: 700.0)
    assert mb.gpu_facts() == {"sm_count": 132, "smem_bytes_per_sm": 233472, "llc_bytes": 50 << 20, "memory_bytes": 150_000_000_000,
                              "clock_hz": 1.98e9, "compute_capability": "9.0", "power_limit_w": 700.0}  # fmt: skip
    assert [calibration.generation_of(cc) for cc in ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")] == [
        "volta", "turing", "ampere", "ampere", "ada", "hopper", "blackwell", "blackwell-rtx"]  # fmt: skip
    with pytest.raises(UserError, match="compute capability 6.1"):
        calibration.generation_of("6.1")


def test_a_gpu_calibration_writes_a_valid_gpu_profile_that_predicts_the_held_out_suite(tmp_path, monkeypatch):
    """calibrate's CUDA branch, fed what measure_calibration_suite returns on a GPU: H200 facts, and
    timings 1.3x the shipped H200 profile's predictions of the quick suite."""
    from reference.train import DRAFT_SPEC, TARGET_SPEC

    h200, suite = load_profile("h200"), calibration.QUICK
    ms = [{"kind": "gemm", "m": m, "n": n, "k": k, "dtype": "fp32"} for m, n, k in suite["gemms"]]
    ms += [{"kind": "elementwise", "n": n, "dtype": "fp32"} for n in suite["elementwise"]]
    ms += [{"kind": kind, "batch": b, "heads": h, "seqlen": n, "head_dim": d, "dtype": "fp32"}
           for b, h, n, d in suite["attention"] for kind in ("attention-naive", "attention-fused")]  # fmt: skip
    ms += [{"kind": "forward", "model": spec.model_dump(), "batch": b, "context": c, "query_tokens": q, "dtype": "fp32", "ops": 150}
           for spec in (TARGET_SPEC, DRAFT_SPEC) for b, c, q in suite["forward"]]  # fmt: skip
    for m in ms:
        m["measured_s"] = 1.3 * calibration.predict_s(m, h200)
    run_ = {"prompt": 32, "new_tokens": 24, "alpha": 0.7, "target": TARGET_SPEC.model_dump(), "draft": DRAFT_SPEC.model_dump()}
    ms += [{"kind": "specdec", "gamma": 3, **run_, "tokens_per_step": 2.5, "measured_s": 2e-3},
           {"kind": "autoregressive", "gamma": 0, **run_, "measured_s": 1.5e-3}]  # fmt: skip
    facts = {"device": "cuda", "device_name": "NVIDIA H200", "sm_count": 132, "smem_bytes_per_sm": 233472, "llc_bytes": 50 << 20,
             "memory_bytes": 150_000_000_000, "clock_hz": 1.98e9, "compute_capability": "9.0", "power_limit_w": None,
             "copy_bytes_per_s": 4.0e12, "cache_copy_bytes_per_s": 9.0e12, "fp16_gemm_flops_per_s": 3.0e14,
             "first_touch_bytes_per_s": None, "softmax_s_per_element": 1e-12, "sdpa_program_s": 1e-7, "scatter_s_per_element": 1e-12}  # fmt: skip
    monkeypatch.setattr(calibration, "measure_calibration_suite", lambda quick, repeats, log: (facts, ms))
    out = tmp_path / "gpu.yaml"
    calibration.calibrate(out, quick=True, log=lambda msg: None)
    hw = load_profile(str(out))
    assert hw.kind == "gpu" and hw.generation == "hopper" and hw.compute_capability == "9.0" and hw.calibration["device"] == "NVIDIA H200"
    assert (hw.sm_count, hw.sram_bytes_per_sm, hw.l2_bytes, hw.l2_bytes_per_s, hw.hbm_bytes_per_s) == (132, 233472, 50 << 20, 9.0e12, 4.0e12)
    assert {"tdp_w", "interconnect_bytes_per_s"} <= set(hw.estimates) and hw.sources["tdp_w"].startswith("estimate: nvidia-smi")
    assert "get_device_properties" in hw.sources["sm_count"] and "clock_hz" not in hw.estimates
    assert yaml.safe_load(out.read_text())["calibration"]["fit_residuals"]
    # everything `compare` predicts on this device, priced by the GPU model
    shapes = [{"kind": kind, "batch": b, "heads": h, "seqlen": n, "head_dim": d, "dtype": "fp32"}
              for b, h, n, d in calibration.COMPARE_ATTENTION for kind in ("attention-naive", "attention-fused")]  # fmt: skip
    shapes += [{"kind": "forward", "model": TARGET_SPEC.model_dump(), "batch": b, "context": c, "query_tokens": q, "dtype": "fp32"}
               for b, c, q in calibration.COMPARE_FORWARD]  # fmt: skip
    assert all(0 < calibration.predict_s(m, hw) < math.inf for m in shapes)
    assert 0 < calibration.predict_loop_s({"kind": "specdec", "gamma": 2, **run_, "prompt": 64, "new_tokens": 64}, hw) < math.inf


def test_records_are_strict_json_even_with_a_failed_measurement(tmp_path):
    """A NaN or infinity (a measurement that failed or timed nothing) is written as null, so a strict
    reader (json.loads with no NaN, jq, a browser) takes the record; a mutant writing `NaN` fails here."""
    out = tmp_path / "record.json"
    dc.write_json(out, {"median_s": math.nan, "speedup": math.inf, "rows": [1.0, -math.inf], "ok": 2.5})

    def strict(token):
        raise ValueError(token)

    assert json.loads(out.read_text(), parse_constant=strict) == {"median_s": None, "speedup": None, "rows": [1.0, None], "ok": 2.5}
