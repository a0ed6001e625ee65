"""Engine overheads (simulator.engine) in the serving engine, the fit that finds them, and
`validate --e2e` / `fit-engine` / `simulate --engine` on their inputs."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from cli_run import one_error_line, simulator_cli

from simulator import e2e, engine
from simulator import e2e_validate as ev
from simulator.engine import IDEAL, EngineOverhead, engine_overhead
from simulator.errors import UserError
from simulator.hardware import load_profile
from simulator.models import BUILTIN_MODELS
from simulator.serving import AcceptanceModel, ServingConfig, simulate_serving
from simulator.workload import SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN, Request
from tests.test_e2e_data import GOOD, write

L4 = load_profile("L4")
SMALL = BUILTIN_MODELS["qwen2.5-0.5b"]


def serve(engine: EngineOverhead, requests: list[Request], concurrency=None) -> dict:
    cfg = ServingConfig(gamma=0, dtype="bf16", engine=engine, check_invariants=True)
    return simulate_serving(L4, SMALL, None, AcceptanceModel(), cfg, iter(requests), np.random.default_rng(0), concurrency=concurrency)


def test_step_host_time_is_the_documented_sum():
    e = EngineOverhead(step_s=1e-3, step_s_per_sequence=2e-5, step_s_per_token=3e-6, eager_s_per_layer=4e-5, graph_max_batch=8,
                       speculative_s_per_draft_pass=5e-4)  # fmt: skip
    host = 1e-3 + 4 * 2e-5 + 4 * 3e-6
    assert e.step_host_s(4, 4) == pytest.approx(host)
    assert e.step_time_s(1e-4, 4, 4, 24, prefill=False) == pytest.approx(host + 1e-4)  # a graph replay: no launch term
    # above the graphs the 24 layers' launches (0.96 ms) bound a short step and hide under a long one
    assert e.step_time_s(1e-4, 9, 9, 24, prefill=False) == pytest.approx(1e-3 + 9 * 2e-5 + 9 * 3e-6 + 24 * 4e-5)
    assert e.step_time_s(5e-3, 9, 9, 24, prefill=False) == pytest.approx(1e-3 + 9 * 2e-5 + 9 * 3e-6 + 5e-3)
    assert e.step_time_s(1e-4, 1, 500, 24, prefill=True) == pytest.approx(1e-3 + 2e-5 + 500 * 3e-6 + 24 * 4e-5)
    assert e.step_time_s(np.array([1e-4, 5e-3]), 1, 500, 24, prefill=True) == pytest.approx(1e-3 + 2e-5 + 500 * 3e-6 + np.array([24 * 4e-5, 5e-3]))
    assert e.step_host_s(4, 20, draft_passes=4) == pytest.approx(1e-3 + 4 * 2e-5 + 20 * 3e-6 + 4 * 5e-4)
    assert IDEAL.ideal and IDEAL.step_time_s(2e-3, 64, 4096, 80, prefill=True) == 2e-3 and IDEAL.request_in_s(10_000) == 0.0


def test_request_time_adds_to_ttft_only():
    one = [Request(0, 0.0, 256, 32)]
    base = serve(IDEAL, one)["latency_s"]
    api = serve(EngineOverhead(name="x", request_s=0.02, request_s_per_prompt_token=1e-5), one)["latency_s"]
    assert api["ttft"]["mean"] == pytest.approx(base["ttft"]["mean"] + 0.02 + 256e-5, rel=1e-9)
    assert api["tpot"]["mean"] == pytest.approx(base["tpot"]["mean"], rel=1e-12)


def test_step_time_adds_to_every_step():
    one = [Request(0, 0.0, 256, 32)]
    base = serve(IDEAL, one)["latency_s"]
    step = serve(EngineOverhead(name="x", step_s=1e-3, graph_max_batch=256), one)["latency_s"]
    assert step["ttft"]["mean"] == pytest.approx(base["ttft"]["mean"] + 1e-3, rel=1e-9)  # the prefill step
    assert step["tpot"]["mean"] == pytest.approx(base["tpot"]["mean"] + 1e-3, rel=1e-9)  # every decode step


def test_a_multi_step_call_spreads_the_step_host_time_over_its_decode_steps():
    """vLLM V0's --num-scheduler-steps 10: the call schedules once and overlaps its output processing,
    so each of its decode steps carries a tenth of the step host time; the prefill step all of it."""
    one = [Request(0, 0.0, 256, 32)]
    e = EngineOverhead(name="x", step_s=1e-3, step_s_per_sequence=2e-4, graph_max_batch=256)
    assert e.step_time_s(1e-4, 1, 1, 24, prefill=False, steps_per_call=10) == pytest.approx(1.2e-4 + 1e-4)
    assert e.step_time_s(1e-4, 1, 256, 24, prefill=True, steps_per_call=10) == pytest.approx(1.2e-3 + 1e-4)

    def latency(engine, steps):
        cfg = ServingConfig(gamma=0, dtype="bf16", engine=engine, check_invariants=True, scheduler_steps=steps)
        return simulate_serving(L4, SMALL, None, AcceptanceModel(), cfg, iter(one), np.random.default_rng(0))["latency_s"]

    base, ten = latency(IDEAL, 10), latency(e, 10)
    assert ten["tpot"]["mean"] == pytest.approx(base["tpot"]["mean"] + 1.2e-4, rel=1e-9)
    assert ten["ttft"]["mean"] == pytest.approx(base["ttft"]["mean"] + 1.2e-3, rel=1e-9)
    assert latency(e, 1)["tpot"]["mean"] == pytest.approx(latency(IDEAL, 1)["tpot"]["mean"] + 1.2e-3, rel=1e-9)


def test_the_api_server_takes_one_request_at_a_time():
    """Ten requests sent at once through a 10 ms API server: the last reaches the engine 100 ms after it was sent."""
    many = [Request(i, 0.0, 64, 4) for i in range(10)]
    report = serve(EngineOverhead(name="x", request_s=0.01), many)
    ttft = report["latency_s"]["ttft"]
    assert ttft["max"] >= 0.1 and ttft["p50"] >= 0.05  # a mutant with ten servers in parallel: all near 10 ms



def test_a_request_latency_is_waited_by_requests_in_flight_together():
    """Ten requests sent at once with a 10 ms latency and no API work: each reaches the engine 10 ms
    after it was sent, so each TTFT is kernels-only's plus 10 ms, not up to 100 ms more as through the
    API server; one request: the latency adds to its TTFT and nothing to its TPOT."""
    many = [Request(i, 0.0, 64, 4) for i in range(10)]
    base = serve(IDEAL, many)["latency_s"]["ttft"]
    lat = serve(EngineOverhead(name="x", request_latency_s=0.01), many)["latency_s"]["ttft"]
    assert lat["max"] == pytest.approx(base["max"] + 0.01, rel=1e-9) and lat["p50"] == pytest.approx(base["p50"] + 0.01, rel=1e-9)
    one = [Request(0, 0.0, 256, 32)]
    base, lat = (serve(e, one)["latency_s"] for e in (IDEAL, EngineOverhead(name="x", request_s=0.02, request_latency_s=0.005)))
    assert lat["ttft"]["mean"] == pytest.approx(base["ttft"]["mean"] + 0.025, rel=1e-9)
    assert lat["tpot"]["mean"] == pytest.approx(base["tpot"]["mean"], rel=1e-12)
    assert not EngineOverhead(request_latency_s=1e-3).ideal

def test_engine_names():
    assert engine_overhead("ideal") is IDEAL
    for name in ("vllm", "vLLM-V0", "SGLang"):
        e = engine_overhead(name)
        assert e.name == name.lower() and not e.ideal and e.graph_max_batch > 0
    with pytest.raises(UserError, match="unknown engine 'trt'"):
        engine_overhead("trt")


def test_fit_recovers_a_known_engine(tmp_path):
    """Rows measured on a simulated engine with known overheads: the fit cuts the rms log error to under a
    third of the kernels-only one and finds the per-step time within 20%. (TTFT's terms, API time and eager
    prefill layers, trade against each other on three rows: the fit finds a local optimum, not the truth.)
    A fit that leaves the coefficients at zero, or that ignores TPOT, fails."""
    truth = EngineOverhead(name="vllm", step_s=2e-3, request_s=0.02, graph_max_batch=256)
    rows_in = []
    for users in (1, 4, 16):
        row = {**GOOD, "gpu": "L4", "n_gpus": "1", "tp": "1", "model": "Qwen/Qwen2.5-0.5B-Instruct", "input_len": "256", "output_len": "64",
               "max_concurrency": str(users), "num_prompts": str(4 * users), "url": f"{GOOD['url']}/{users}"}  # fmt: skip
        rows_in.append(row)
    path = write(tmp_path / "synthetic.csv", rows_in)
    rows = e2e.load(path)
    setups = [ev.row_setup(r, (200, 200)) for r in rows]
    measured_rows = []
    for r, s, raw in zip(rows, setups, rows_in, strict=True):
        pred = ev.predict(r, s, truth)
        measured_rows.append({**raw, "ttft_median_ms": pred["ttft"] * 1e3, "tpot_median_ms": pred["tpot"] * 1e3, "output_tok_per_s": pred["throughput"]})
    rows = e2e.load(write(tmp_path / "measured.csv", measured_rows))
    before = ev._log_errors(rows, setups, IDEAL.model_copy(update={"name": "vllm"}))
    fitted = ev.fit_engine("vllm", rows, setups)
    after = ev._log_errors(rows, setups, fitted)
    rms_before, rms_after = (math.sqrt(e @ e / e.size) for e in (before, after))
    assert rms_before > 0.3 and rms_after < rms_before / 3
    assert fitted.step_s == pytest.approx(truth.step_s, rel=0.2)


def test_the_fit_keeps_the_lowest_optimum_of_its_starts_and_pays_the_prior(monkeypatch):
    """The engine fit runs from every start in FIT_STARTS, from zero with an active set and from the
    shipped preset, and keeps the run with the lowest objective, wherever it sits in the list; its
    residuals end with the prior, PRIOR_WEIGHT x each coefficient over its scale."""
    objectives = {3: 0.5, 1: 0.2, 4: 0.9}  # run index -> objective; the others 1.0
    calls = []

    def fake_run(name, rows, setups, base, active_set, progress, x0=None):
        calls.append((tuple(x0), active_set))
        i = len(calls) - 1
        return np.full(len(ev.FIT_PARAMS), float(i)), objectives.get(i, 1.0)

    monkeypatch.setattr(ev, "_levenberg_marquardt", fake_run)
    fitted = ev.fit_engine("vllm", [], [])
    shipped = engine_overhead("vllm")
    assert len(calls) == len(ev.FIT_STARTS) + 2 and calls[-2] == (tuple(np.zeros(len(ev.FIT_PARAMS))), True)
    assert calls[-1] == (tuple(np.array([getattr(shipped, p) for p in ev.FIT_PARAMS]) / ev.PARAM_SCALE), False)
    assert fitted.request_s == pytest.approx(1.0 * ev.PARAM_SCALE[ev.FIT_PARAMS.index("request_s")])  # run 1's x
    monkeypatch.setattr(ev, "_log_errors", lambda rows, setups, eng: np.array([0.1, -0.2]))
    x = np.arange(len(ev.FIT_PARAMS), dtype=float)
    res = ev._fit_residuals([], [], EngineOverhead(name="vllm"), x)
    assert res.tolist() == pytest.approx([0.1, -0.2, *(ev.PRIOR_WEIGHT * x)])


def test_a_refit_starts_one_run_from_the_shipped_preset_where_there_is_one(tmp_path):
    """The last start is the engine's shipped coefficients (over PARAM_SCALE), so a refit after a change
    elsewhere ends no higher than they sit; without a file, or without that engine in it, the fixed
    starts alone run."""
    fixed = len(ev.FIT_STARTS) + 1
    shipped = {name: {p: 0.0 for p in ev.FIT_PARAMS} for name in ("vllm", "sglang")}
    shipped["vllm"].update(step_s_per_token=3e-5, request_latency_s=0.011)
    path = tmp_path / "engine_fitted.json"
    path.write_text(json.dumps({"engines": shipped}))
    starts = ev._starts("vllm", path)
    assert len(starts) == fixed + 1 and not starts[-1][1]
    x = dict(zip(ev.FIT_PARAMS, starts[-1][0] * ev.PARAM_SCALE, strict=True))
    assert x["step_s_per_token"] == pytest.approx(3e-5) and x["request_latency_s"] == pytest.approx(0.011) and x["step_s"] == 0.0
    assert len(ev._starts("vllm-v0", path)) == fixed
    assert len(ev._starts("vllm", tmp_path / "absent.json")) == fixed
    path.write_text("not json")
    assert len(ev._starts("vllm", path)) == fixed


def test_fit_engines_spreads_the_runs_over_processes_and_keeps_what_one_process_keeps(monkeypatch):
    """`fit_engines` runs every engine's starts as independent tasks on worker processes: with two
    workers it writes what it writes with one, which is each engine's `fit_engine` (the lowest of its
    runs, the first of equals). The runs here are a stand-in whose objective depends on the engine and
    the start (the real ones simulate the rows for minutes); a pool that mixed engines up, lost a run
    or kept a later equal would change the answer."""

    def fake_run(name, rows, setups, base, active_set, progress, x0=None):
        i = next(j for j, (x, a) in enumerate(ev._starts(name)) if a == active_set and np.array_equal(x, x0))
        best = {"vllm": 2, "vllm-v0": 4, "sglang": 0}[name]
        return np.full(len(ev.FIT_PARAMS), 10.0 * len(name) + i), 0.1 if i in (best, best + 1) else 1.0 + i  # a tie after the best

    monkeypatch.setattr(ev, "_levenberg_marquardt", fake_run)
    one = ev.fit_engines(workers=1)
    two = ev.fit_engines(workers=2)
    assert one == two
    rows = e2e.load()
    fit_rows, _ = e2e.split(rows)
    for name, values in one["engines"].items():
        mine = [r for r in fit_rows if ev.preset_name(r) == name]
        alone = ev.fit_engine(name, mine, [ev.row_setup(r, ev.sharegpt_means(rows)) for r in mine])
        assert values["request_s"] == alone.request_s == pytest.approx((10.0 * len(name) + {"vllm": 2, "vllm-v0": 4, "sglang": 0}[name]) * ev.PARAM_SCALE[ev.FIT_PARAMS.index("request_s")])


# --- the CLI --------------------------------------------------------------------------------------


def test_validate_e2e_on_a_small_file(tmp_path):
    row = {**GOOD, "gpu": "L4", "n_gpus": "1", "tp": "1", "model": "Qwen/Qwen2.5-0.5B-Instruct", "input_len": "256", "output_len": "32",
           "max_concurrency": "2", "num_prompts": "8", "ttft_median_ms": "30", "itl_median_ms": "5.5", "output_tok_per_s": "300"}  # fmt: skip
    rows = [row, {**row, "max_concurrency": "4", "url": GOOD["url"] + "/2"}, {**row, "engine": "sglang", "url": GOOD["url"] + "/3"}]
    path = write(tmp_path / "r.csv", rows)
    code, out, err = simulator_cli(["validate", "--e2e", "--results", str(path), "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert len(report["rows"]) == 3 and sorted(report["fit_rows"] + report["held_out_rows"]) == [1, 2, 3]
    for e in report["rows"]:
        pred, meas = e["engine"]["predicted"]["ttft"], e["measured"]["ttft"]
        assert e["engine"]["ape"]["ttft"] == pytest.approx(abs(pred - meas) / meas)
        assert e["ideal"]["predicted"]["ttft"] < pred  # the API server's time is on top of the kernels
    code, text, err = simulator_cli(["validate", "--e2e", "--results", str(path)])
    assert code == 0 and "held out, all" in text and "targets (held-out rows)" in text


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["validate", "--e2e", "--max-requests", "0"], "--max-requests must be >= 1"),
        (["validate", "--e2e", "--fit-gpu", "A100"], "--fit-gpu is an option of the kernel validation"),
        (["validate", "--max-requests", "5"], "go with --e2e"),
        (["fit-engine", "--max-requests", "0"], "--max-requests must be >= 1"),
        (["simulate", "--engine", "tgi", "--draft", "none"], "unknown engine 'tgi'"),
    ],
)
def test_bad_input_is_one_line(argv, needle):
    code, out, err = simulator_cli(argv)
    assert code == 2 and out == "" and needle in one_error_line(err)


@pytest.mark.parametrize("change,needle", [({"gpu": "TPU-v9"}, "row 2 (https://example.org/bench)"), ({"model": "acme/llm-9b"}, "unknown model"),
                                           ({"dataset": ""}, "dataset is empty")])  # fmt: skip
def test_bad_results_file_names_the_row_and_url(tmp_path, change, needle):
    path = write(tmp_path / "bad.csv", [GOOD, {**GOOD, **change}])
    code, out, err = simulator_cli(["validate", "--e2e", "--results", str(path)])
    line = one_error_line(err)
    assert code == 2 and out == "" and needle in line and "row 2" in line and GOOD["url"] in line


def test_simulate_engine_preset_reports_its_coefficients(capsys):
    from tests.test_serving_cli import cli

    code, out, _ = cli(["simulate", "--draft", "none", "--engine", "vllm", "--requests", "20", "--prompt-len", "64", "--output-len", "8",
                        "--json", "--no-interval"], capsys)  # fmt: skip
    assert code == 0
    assert json.loads(out)["config"]["engine"] == engine_overhead("vllm").model_dump()


def test_shipped_fit_matches_the_shipped_data():
    fitted = json.loads(Path(ev.FITTED_PATH).read_text())
    assert fitted["data_sha256"] == ev.data_sha256(e2e.PUBLISHED_CSV)
    assert fitted["fit_rows"] == [r.row for r in e2e.split(e2e.load())[0]]


def test_vllm_v1_scheduler_defaults_follow_the_device():
    """vLLM's V1 API server takes 1024 sequences and 8192 batched tokens on GPUs of >= 70 GiB but
    the A100, else 256 and 2048; V0 (before 0.7) takes 256 without chunked prefill."""
    from types import SimpleNamespace

    def limits(gpu, version="0.11.0", engine="vllm"):
        return ev.scheduler_limits(SimpleNamespace(engine=engine, engine_version=version, profile=load_profile(gpu)))

    assert limits("h100")["max_batch"] == 1024 and limits("h100")["max_batched_tokens"] == 8192
    assert limits("a100")["max_batch"] == 256 and limits("a100")["max_batched_tokens"] == 2048
    assert limits("l4")["max_batch"] == 256
    assert limits("h100", "0.6.0") == {"max_batch": 256, "max_batched_tokens": 8192, "chunked_prefill": False, "prefill_apart": False}
    assert limits("h100", "0.5.3", "sglang")["prefill_apart"] and not limits("h100")["prefill_apart"]  # SGLang mixes no chunk by default
    assert limits("h100", "1.2.0", "tensorrt-llm") == {"max_batch": 2048, "max_batched_tokens": 8192, "chunked_prefill": True}
    assert engine.scheduler_defaults("ideal", load_profile("h100")) == {}
    with pytest.raises(UserError, match="unknown engine 'tgi'"):
        engine.scheduler_defaults("tgi", load_profile("h100"))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--engine", "ideal"], (256, 8192, False, False)),  # the simulator's own batching
        (["--engine", "sglang"], (4096, 8192, True, True)),  # SGLang's server: chunks in steps of their own
        (["--engine", "vllm"], (1024, 8192, True, False)),  # V1 on an H100: 1024 sequences, mixed chunks
        (["--engine", "vllm-v0"], (256, 8192, False, False)),
        (["--engine", "sglang", "--max-batch", "64", "--no-prefill-apart"], (64, 8192, True, False)),  # flags win
        (["--engine", "sglang", "--no-chunked-prefill"], (4096, 8192, False, False)),  # no chunks, none apart
        (["--engine", "ideal", "--chunked-prefill", "--max-batched-tokens", "512"], (256, 512, True, False)),
    ],
)
def test_simulate_takes_the_engines_batching_unless_a_flag_sets_it(flags, expected):
    from simulator import simulate

    parser = argparse.ArgumentParser()
    simulate._add_options(parser, None)
    serving = simulate.config_from_args(parser.parse_args(["--gpu", "h100", "--draft", "none", *flags]))[4]
    assert (serving.max_batch, serving.max_batched_tokens, serving.chunked_prefill, serving.prefill_apart) == expected


def test_a_vllm_row_takes_the_preset_of_its_engine_generation():
    """vLLM before 0.7 runs its V0 engine (`vllm-v0`), from 0.7 the V1 engine (`vllm`); other engines their own name."""
    from types import SimpleNamespace

    def preset(engine, version):
        return ev.preset_name(SimpleNamespace(engine=engine, engine_version=version))

    assert [preset("vllm", v) for v in ("0.5.4", "0.6.3.post1", "0.7.0", "0.11.0")] == ["vllm-v0", "vllm-v0", "vllm", "vllm"]
    assert preset("sglang", "0.3.0") == "sglang" and preset("tensorrt-llm", "1.0") == "tensorrt-llm"
    engines = {"vllm": engine_overhead("vllm"), "vllm-v0": engine_overhead("vllm-v0")}
    assert ev.preset_for(SimpleNamespace(engine="vllm", engine_version="0.6.0"), engines) is engines["vllm-v0"]
    assert ev.preset_for(SimpleNamespace(engine="tensorrt-llm", engine_version="1.0"), engines) is IDEAL


def test_the_light_load_probe_serves_one_user_and_sees_only_per_step_time():
    """`light_load_gap_pct`: one user, one request after another, on a row's setup. A host time per
    sequence in the step moves the median TPOT by itself over the kernels-only step (one sequence
    runs; at the row's own 4 requests/s several would, and the gap would be several times as
    large), a tenth of it here, where the row's server ran calls of 10 decode steps; a per-request
    time moves it not at all (it adds to TTFT)."""
    rows = e2e.load()
    row = next(r for r in rows if r.row == 6)  # Llama-3.1-70B, 4 x H100, vLLM 0.6 at 4 requests/s
    setup = ev.row_setup(row, ev.sharegpt_means(rows))
    assert ev.light_load_gap_pct(row, setup, IDEAL) == 0.0
    assert ev.light_load_gap_pct(row, setup, EngineOverhead(name="x", request_s=0.05)) == pytest.approx(0.0, abs=1e-9)
    step = EngineOverhead(name="x", step_s_per_sequence=1e-2)
    workload = setup.workload.model_copy(update={"rate_per_s": math.inf, "concurrency": 1, "requests": ev.LIGHT_LOAD_REQUESTS})
    report = simulate_serving(row.profile, row.spec, None, AcceptanceModel(), setup.serving, ev.make_stream(workload, np.random.default_rng(0)),
                              np.random.default_rng(0), concurrency=1)  # fmt: skip
    kernels_tpot = report["latency_s"]["tpot"]["p50"]
    assert setup.serving.scheduler_steps == 10
    assert ev.light_load_gap_pct(row, setup, step) == pytest.approx(100 * 1e-3 / kernels_tpot, rel=0.05)


def test_sharegpt_rows_draw_sharegpts_law_and_a_burst_runs_whole():
    """A ShareGPT row's requests take ShareGPT's long-tailed outputs: the median over the mean that
    the light-load rows show (recomputed from the shipped file, within rounding of the constant
    `workload` keeps), and an all-at-once row runs every prompt it sent, since its throughput ends
    with the longest replies decoding on their own. A random-dataset row keeps its fixed lengths."""
    rows = e2e.load()
    assert ev.sharegpt_output_median_ratio(rows) == pytest.approx(SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN, abs=0.005)
    means = ev.sharegpt_means(rows)
    by_row = {r.row: r for r in rows}
    for row, requests in ((19, 1000), (9, 5000), (1, ev.DEFAULT_MAX_REQUESTS)):
        setup = ev.row_setup(by_row[row], means)
        assert setup.workload.lengths == "sharegpt" and setup.workload.requests == requests
    assert ev.row_setup(by_row[23], means).workload.lengths == "fixed"
    assert ev.sharegpt_output_median_ratio([r for r in rows if r.dataset != "sharegpt"]) is None
