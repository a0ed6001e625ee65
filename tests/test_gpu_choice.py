"""`plan` across GPU types: the comparison (fewest GPUs, lowest cost per million output tokens),
price parsing, the CLI in text and JSON, and the capacity search on Ray giving the process pool's
report."""

from __future__ import annotations

import json

import pytest
from cli_run import simulator_cli

from simulator import capacity, gpu_choice
from simulator.errors import UserError
from simulator.hardware import load_profile
from simulator.models import load_model
from simulator.parallel import Runner

SMALL_CLI = ["plan", "--model", "llama-2-7b", "--rate", "4", "--prompt-len", "256", "--output-len", "64", "--max-gpus", "1",
             "--requests", "30", "--draft", "llama-68m", "--gamma", "2", "--batch", "16", "--slo-ttft-p99", "1s",
             "--slo-tpot-p99", "30ms", "--workers", "1"]  # fmt: skip


def row(label: str, gpus: int, gpu_s: float | None, meets: bool = True) -> dict:
    return {"label": label, "gpus": gpus, "gpu_s_per_million_output_tokens": gpu_s, "meets_slo": meets}


def search_report(*rows: dict) -> dict:
    ranked = sorted(rows, key=lambda r: (not r["meets_slo"], r["gpus"], r["gpu_s_per_million_output_tokens"] or 0))
    rec = ranked[0] if ranked and ranked[0]["meets_slo"] else None
    return {"candidates": ranked, "recommendation": rec, "verdict": "v", "model": "m", "rate_per_s": 1.0,
            "slo": {"ttft_p99_s": 1.0, "tpot_p99_s": 0.05}, "max_gpus": 8}  # fmt: skip


def test_fewest_gpus_and_lowest_cost_can_be_different_types():
    reports = {
        "A": search_report(row("a2", 2, 2000.0), row("a4", 4, 3900.0)),
        "B": search_report(row("b1", 1, 1000.0), row("b2", 2, 1800.0, meets=False)),
        "C": search_report(row("c8", 8, 9000.0, meets=False)),
    }
    # USD per Mtok = GPU-s per Mtok / 3600 x USD per GPU-hour: A 2000/3600 x 1 = 0.556, B 1000/3600 x 3 = 0.833
    out = gpu_choice.compare(reports, {"A": 1.0, "B": 3.0})
    assert out["fewest_gpus"] == {"gpu": "B", "gpus": 1, "deployment": "b1"}
    assert out["lowest_cost"]["gpu"] == "A" and out["lowest_cost"]["deployment"] == "a2"
    assert out["lowest_cost"]["usd_per_million_output_tokens"] == pytest.approx(2000.0 / 3600.0)
    assert out["lowest_cost"]["usd_per_hour"] == 2.0
    by = {e["gpu"]: e for e in out["per_gpu"]}
    assert not by["C"]["meets_slo"] and by["C"]["cheapest"] is None and by["C"]["gpus"] is None
    assert by["B"]["cheapest"]["usd_per_million_output_tokens"] == pytest.approx(1000.0 / 3600.0 * 3.0)


def test_the_cheapest_deployment_of_a_type_need_not_be_its_fewest_gpu_one():
    reports = {"A": search_report(row("a2", 2, 3000.0), row("a3", 3, 2500.0))}
    out = gpu_choice.compare(reports, {"A": 2.0})
    assert out["fewest_gpus"]["deployment"] == "a2"
    assert out["lowest_cost"]["deployment"] == "a3"


def test_no_prices_no_cost_and_no_type_meeting_is_said():
    reports = {"A": search_report(row("a", 1, 100.0, meets=False)), "B": search_report(row("b", 1, 100.0, meets=False))}
    report = gpu_choice.cross_report(reports, {})
    assert report["fewest_gpus"] is None and report["lowest_cost"] is None
    assert report["verdict"].startswith("no GPU type of A, B meets")


@pytest.mark.parametrize(
    "items, needle",
    [
        (["a100=0"], "finite number of USD per GPU-hour > 0"),
        (["a100=-2"], "> 0"),
        (["a100=nan"], "> 0"),
        (["a100=cheap"], "must be a number"),
        (["a100"], "takes GPU=USD_PER_HOUR"),
        (["l4=1"], "L4 is not among the GPUs searched"),
        (["a100=1", "A100-80GB-SXM=2"], "priced twice"),
        (["nope=1"], "unknown GPU 'nope'"),
    ],
)
def test_bad_prices(items, needle):
    with pytest.raises(UserError, match=None) as err:
        gpu_choice.parse_prices(items, ["A100-80GB-SXM", "H100-SXM"])
    assert needle in str(err.value)


def test_prices_resolve_aliases():
    assert gpu_choice.parse_prices(["a100=2.5", "h100=4"], ["A100-80GB-SXM", "H100-SXM"]) == {"A100-80GB-SXM": 2.5, "H100-SXM": 4.0}


def test_cli_across_gpu_types_text_and_json(tmp_path):
    argv = [*SMALL_CLI, "--gpu", "a100,h100", "--price", "a100=2", "--price", "h100=3.5", "--plot-dir", tmp_path]
    code, out, err = simulator_cli([*argv, "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["mode"] == "cross-gpu" and report["gpus"] == ["A100-80GB-SXM", "H100-SXM"]
    for name in report["gpus"]:
        single = report["searches"][name]
        assert single["gpu"] == name and single["recommendation"] is not None
        entry = next(e for e in report["per_gpu"] if e["gpu"] == name)
        assert entry["gpus"] == single["recommendation"]["gpus"]
    best = min(report["per_gpu"], key=lambda e: e["cheapest"]["usd_per_million_output_tokens"])
    assert report["lowest_cost"]["gpu"] == best["gpu"]
    assert all((tmp_path / name).is_dir() for name in report["gpus"])
    text = gpu_choice.format_cross(report)
    assert "Answer: fewest GPUs: " in text and "lowest cost: " in text and "USD per million output tokens" in text
    # where each GPU stands with the kernel model's fit: A100 was measured, no Hopper GPU was
    assert report["kernel_model"]["A100-80GB-SXM"]["measured"] and not report["kernel_model"]["H100-SXM"]["measured"]
    assert report["kernel_model"]["H100-SXM"] == report["searches"]["H100-SXM"]["kernel_model"]
    line = next(x for x in text.splitlines() if x.startswith("Kernel model fitted on "))
    assert line.endswith(": A100-80GB-SXM is one of them; H100-SXM is not, nor is any hopper GPU: it takes the values common to every generation")
    single = capacity.format_search(report["searches"]["H100-SXM"])
    assert "\nKernels: fitted on " in single and "H100-SXM is not, nor is any hopper GPU" in single


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--gpu", "a100,h100", "--price", "l4=1"], "L4 is not among the GPUs searched"),
        (["--gpu", "a100,h100", "--price", "h100=0"], "> 0"),
        (["--gpu", "a100,zz9"], "unknown GPU 'zz9'"),
        (["--gpu", "a100", "--ray-address", "127.0.0.1:1"], "cannot reach Ray"),
    ],
)
def test_cli_bad_input_is_one_line_before_any_simulation(extra, needle, tmp_path):
    if "--ray-address" in extra:
        pytest.importorskip("ray")
    code, out, err = simulator_cli([*SMALL_CLI, *extra, "--plot-dir", tmp_path / "plots"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err


def test_capacity_search_on_ray_gives_the_process_pool_report():
    pytest.importorskip("ray")
    query = capacity.CapacityQuery(hw=load_profile("a100"), target=load_model("llama-2-7b"), rate_per_s=4.0, prompt_tokens=256,
                                   output_tokens=64, slo_ttft_p99_s=1.0, slo_tpot_p99_s=0.03, max_gpus=2, requests=40)  # fmt: skip
    space = {"drafts": ["none", "llama-68m"], "tp_degrees": (1, 2), "gammas": (2,), "max_batches": (8, 16)}
    pool = capacity.search(query, progress=False, runner=Runner(workers=2), **space)
    on_ray = capacity.search(query, progress=False, runner=Runner(workers=2, ray=True), **space)
    assert pool["simulated"] > 1
    assert on_ray == pool
