"""Capacity planning: the candidate space, the cost-model screen, the simulated search (ranking,
reproducibility, the honest "nothing meets it"), and `plan` in search mode through the CLI."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import capacity
from simulator.__main__ import main
from simulator.hardware import load_profile
from simulator.models import load_model
from simulator.plan import build_plan, format_plan
from simulator.serving import DEFAULT_MAX_BATCHED_TOKENS, ServingConfig, kv_cache_blocks

A100, H100 = load_profile("a100"), load_profile("h100")
LLAMA_7B, LLAMA3_70B = load_model("llama-2-7b"), load_model("llama-3-70b")
SMALL_SPACE = {"drafts": ["none", "llama-68m", "layer-skip"], "tp_degrees": (1, 2), "gammas": (2, 4), "max_batches": (8, 16, 32)}
SMALL_CLI = ["plan", "--gpu", "a100", "--model", "llama-2-7b", "--rate", "4", "--prompt-len", "256", "--output-len", "64",
             "--max-gpus", "1", "--requests", "40", "--draft", "llama-68m", "--gamma", "2", "--batch", "16"]  # fmt: skip


def small_query(**change) -> capacity.CapacityQuery:
    fields = {"hw": A100, "target": LLAMA_7B, "rate_per_s": 4.0, "prompt_tokens": 256, "output_tokens": 64,
              "slo_ttft_p99_s": 1.0, "slo_tpot_p99_s": 0.03, "max_gpus": 2, "requests": 60}  # fmt: skip
    return capacity.CapacityQuery(**{**fields, **change})


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# --- the space -------------------------------------------------------------------------------


def test_drafts_share_the_vocabulary_and_are_much_smaller():
    assert list(capacity.draft_models(LLAMA3_70B)) == ["none", "llama-3-8b", "llama-3.2-1b", "layer-skip"]
    drafts = capacity.draft_models(LLAMA_7B)
    assert "llama-68m" in drafts and "tinyllama-1.1b" in drafts
    assert "mistral-7b" not in drafts and "llama-3.2-1b" not in drafts  # too large; other vocabulary
    assert "mistral-7b" not in capacity.draft_models(load_model("llama-2-70b"))  # 32000 tokens, another tokenizer
    assert list(capacity.draft_models(load_model("mistral-7b"))) == ["none", "layer-skip"]
    skip = drafts["layer-skip"]
    assert skip.n_layers == LLAMA_7B.n_layers // 2 and skip.d_model == LLAMA_7B.d_model


def test_candidate_space_is_the_comprehension_it_says():
    space = capacity.candidate_space(LLAMA3_70B, ["none", "llama-3.2-1b"], 8, (1, 2, 3, 4, 8), (2, 4), (16, 64))
    assert all(c.gpus <= 8 for c in space)
    assert {c.tp for c in space} == {1, 2, 4, 8}  # 3 does not divide 64 heads
    assert all(c.gamma == 0 for c in space if c.draft == "none")
    assert {c.gamma for c in space if c.draft != "none"} == {2, 4}
    # tp 1: 8 replica counts, tp 2: 4, tp 4: 2, tp 8: 1; x (1 + 2 gammas) drafts x 2 max batches
    assert len(space) == (8 + 4 + 2 + 1) * 3 * 2
    assert len(set(space)) == len(space)


def test_layer_skip_simulation_gets_the_target_alone_kv_cache():
    skip = capacity.layer_skip_draft(LLAMA3_70B)
    for tp in (2, 4, 8):
        cfg = ServingConfig(tp=tp, gamma=4)
        device = capacity.simulated_device(H100, LLAMA3_70B, skip, cfg)
        assert kv_cache_blocks(device, LLAMA3_70B, skip, cfg)[0] == kv_cache_blocks(H100, LLAMA3_70B, None, cfg)[0]


# --- the screen ------------------------------------------------------------------------------


def _screen(c, query=None):
    query = query or small_query(target=LLAMA3_70B, hw=H100, rate_per_s=20.0, prompt_tokens=1024, output_tokens=256,
                                 slo_ttft_p99_s=2.0, slo_tpot_p99_s=0.05, max_gpus=16)  # fmt: skip
    drafts = capacity.draft_models(query.target)
    return capacity.screen(c, query, drafts, capacity._Costs(query.hw, query.dtype))


def test_screen_names_the_constraint_that_fails():
    assert _screen(capacity.Candidate(1, 1, "none", 0, 16)).reason in ("memory", "throughput")
    assert _screen(capacity.Candidate(1, 1, "none", 0, 16)).ratios["memory"] > 1  # 141 GB of weights on 80 GB
    kv = _screen(capacity.Candidate(2, 2, "none", 0, 256))  # weights fit, 256 sequences of KV do not
    assert kv.ratios["memory"] > 1 and kv.reason == max(kv.ratios, key=kv.ratios.get)  # the worst failing constraint is named
    s = _screen(capacity.Candidate(4, 4, "llama-3.2-1b", 4, 64))
    assert s.passes and s.reason is None and s.expected_batch <= 64 and s.tpot_estimate_s < 0.05


@settings(max_examples=25, deadline=None)
@given(replicas=st.integers(1, 4), tp=st.sampled_from([4, 8]), draft=st.sampled_from(["none", "llama-3.2-1b", "layer-skip"]),
       max_batch=st.sampled_from([16, 64, 256]))  # fmt: skip
def test_screen_properties(replicas, tp, draft, max_batch):
    """More replicas never make the per-replica load heavier; a layer-skip draft needs no memory of its own;
    a larger max batch never needs less memory."""
    gamma = 0 if draft == "none" else 4
    s = _screen(capacity.Candidate(replicas, tp, draft, gamma, max_batch))
    more = _screen(capacity.Candidate(replicas + 1, tp, draft, gamma, max_batch))
    assert more.ratios["throughput"] <= s.ratios["throughput"]
    if s.tpot_estimate_s is not None:
        assert more.tpot_estimate_s <= s.tpot_estimate_s * (1 + 1e-12)
    if draft == "layer-skip":
        assert s.memory_bytes_per_gpu == pytest.approx(_screen(capacity.Candidate(replicas, tp, "none", 4, max_batch)).memory_bytes_per_gpu)
    bigger = _screen(capacity.Candidate(replicas, tp, draft, gamma, 2 * max_batch))
    assert bigger.memory_bytes_per_gpu > s.memory_bytes_per_gpu


# --- the search ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_report():
    return capacity.search(small_query(), max_workers=2, progress=False, **SMALL_SPACE)


def test_search_recommends_the_fewest_gpus_that_meet_the_slo(small_report):
    r = small_report
    rows, rec = r["candidates"], r["recommendation"]
    assert rec is not None and rec["meets_slo"] and rows[0] == rec
    assert rec["gpus"] == min(x["gpus"] for x in rows if x["meets_slo"])
    assert rows == sorted(rows, key=capacity.rank_key)
    assert rec["ttft_p99_s"] <= 1.0 and rec["tpot_p99_s"] <= 0.03 and rec["rejected"] == 0
    assert r["simulated"] == len(rows) <= r["passed_screen"] <= r["candidates_total"]
    assert r["passed_screen"] + sum(r["screened_out"].values()) == r["candidates_total"]
    # cost: GPU-seconds per million output tokens = GPUs / cluster output tokens per s x 1e6
    assert rec["gpu_s_per_million_output_tokens"] == pytest.approx(rec["gpus"] * 1e6 / rec["output_tokens_per_s"])
    assert rec["output_tokens_per_s"] == pytest.approx(4.0 * 64, rel=0.25)  # serves the offered load
    assert r["verdict"].startswith(f"{rec['gpus']} x A100-80GB-SXM")


def test_every_simulated_latency_has_its_80_percent_interval(small_report):
    for row in small_report["candidates"]:
        for key in capacity.INTERVAL_FIGURES:
            assert row["intervals"][key]["low"] <= row[key] <= row["intervals"][key]["high"], (row["label"], key)


def test_the_slo_verdict_at_the_slow_end_of_the_interval(small_report):
    q = small_query()
    for row in small_report["candidates"]:
        high = row["intervals"]
        expect = row["meets_slo"] and high["ttft_p99_s"]["high"] <= q.slo_ttft_p99_s and high["tpot_p99_s"]["high"] <= q.slo_tpot_p99_s
        assert row["meets_slo_at_interval_high"] is expect, row["label"]
    # a candidate within the SLO whose slow-end TPOT is not
    sim = {"rejected": 0, "completed": 60, "ttft_p99_s": 0.5, "tpot_p99_s": 0.02, "output_tokens_per_s_per_replica": 100.0,
           "gpu_busy_fraction": 0.5, "intervals": {"ttft_p99_s": {"low": 0.4, "high": 0.6}, "tpot_p99_s": {"low": 0.015, "high": 0.04}}}  # fmt: skip
    screen = capacity.Screen(True, None, 0.5, {}, 1.0, 2.0, 0.01, 0.01, 4)
    row = capacity.candidate_row(capacity.Candidate(1, 1, "none", 0, 8), sim, screen, q)
    assert row["meets_slo"] and row["meets_slo_at_interval_high"] is False


def test_screen_estimate_tracks_the_simulation(small_report):
    for row in small_report["candidates"]:
        estimate = row["screen"]["tpot_estimate_s"]
        assert 0.5 <= estimate / row["tpot_p50_s"] <= 1.5, row["label"]


def test_search_is_reproducible_and_independent_of_the_pool(small_report):
    again = capacity.search(small_query(), max_workers=1, progress=False, **SMALL_SPACE)
    assert again == small_report
    other_seed = capacity.search(small_query(seed=1), max_workers=2, progress=False, **SMALL_SPACE)
    assert other_seed["candidates"] != small_report["candidates"]


def test_nothing_meets_a_ttft_just_above_the_prefill(small_report):
    """The screen lets candidates through (prefill alone fits the SLO); the simulation shows the
    wait for the step in progress breaks it. The report says TTFT binds and names the closest."""
    prefill_s = min(row["screen"]["prefill_s"] for row in small_report["candidates"] if row["tp"] == 1)
    r = capacity.search(small_query(slo_ttft_p99_s=prefill_s * 1.01, max_gpus=1), max_workers=2, progress=False, **SMALL_SPACE)
    assert r["recommendation"] is None and r["simulated"] > 0
    assert r["binding_constraint"] == "ttft" and r["closest"]["source"] == "simulation"
    assert r["closest"]["slo_ratio"] == min(row["slo_ratio"] for row in r["candidates"])
    assert "TTFT binds" in r["verdict"] and "closest:" in r["verdict"] and "\n" not in r["verdict"]


def test_format_search_shows_table_and_recommendation(small_report):
    text = capacity.format_search(small_report)
    for needle in ("Capacity plan: llama-2-7b on A100-80GB-SXM", "rank  GPUs", "Recommendation:", "GPU-seconds per million output tokens",
                   "rate / r", "Poisson", "alpha = 0.7"):  # fmt: skip
        assert needle in text


# --- the CLI ---------------------------------------------------------------------------------


def test_plan_without_search_options_keeps_the_quick_view(capsys):
    code, out, _ = run(["plan"], capsys)
    assert code == 0
    assert out.rstrip("\n") == format_plan(build_plan(A100, LLAMA_7B, load_model("llama-68m")))


def test_plan_search_prints_table_writes_three_plots(tmp_path, capsys):
    code, out, err = run([*SMALL_CLI, "--slo-ttft-p99", "1s", "--slo-tpot-p99", "30ms", "--plot-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert "Recommendation: 1 x A100-80GB-SXM" in out and "rank  GPUs" in out
    assert "plan search" in err  # the progress bar, on stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["pareto_throughput_vs_p99_tpot.png", "speedup_over_gamma_and_alpha.png", "verify_roofline.png"]
    assert all((tmp_path / n).stat().st_size > 10_000 for n in names)


@pytest.mark.parametrize("ttft,tpot,expected", [("2s", "50 ms", (2.0, 0.05)), ("0.5", "0.05", (0.5, 0.05)), ("500ms", "50ms", (0.5, 0.05))])
def test_plan_search_json_understands_units(tmp_path, capsys, ttft, tpot, expected):
    code, out, err = run([*SMALL_CLI, "--slo-ttft-p99", ttft, "--slo-tpot-p99", tpot, "--json", "--plot-dir", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert (report["slo"]["ttft_p99_s"], report["slo"]["tpot_p99_s"]) == pytest.approx(expected)
    assert {"candidates", "recommendation", "closest", "binding_constraint", "verdict", "screened_out", "space", "plots",
            "speculation_stops_paying"} <= set(report)  # fmt: skip
    assert report["space"]["drafts"] == ["none", "llama-68m"] and report["space"]["gammas"] == [2]
    assert len(report["plots"]) == 3


@pytest.mark.parametrize(
    "flag,value",
    [("--slo-ttft-p99", "fast"), ("--slo-ttft-p99", "2 hours"), ("--slo-tpot-p99", "50 mss"), ("--slo-tpot-p99", "0ms")],
)
def test_unparseable_units_are_refused_in_one_line(tmp_path, capsys, flag, value):
    slos = {"--slo-ttft-p99": "2s", "--slo-tpot-p99": "50ms", flag: value}
    code, out, err = run([*SMALL_CLI, *(x for kv in slos.items() for x in kv), "--plot-dir", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {flag}: ") and repr(value) in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_an_slo_nobody_meets_exits_2_naming_the_binding_constraint(tmp_path, capsys):
    code, out, err = run([*SMALL_CLI, "--slo-ttft-p99", "2s", "--slo-tpot-p99", "0.1ms", "--plot-dir", str(tmp_path)], capsys)
    assert code == 2
    message = err.rsplit("\r", 1)[-1]  # after the progress bar's last redraw
    assert message.startswith("error: no configuration of at most 1 A100-80GB-SXM GPU meets") and message.count("\n") == 1
    assert "TPOT binds" in message and "closest: 1 x A100-80GB-SXM" in message and "Traceback" not in err
    assert "No recommendation:" in out  # the table of what was tried stays on stdout


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["plan", "--rate", "4", "--slo-ttft-p99", "2s"], "missing --slo-tpot-p99"),
        (["plan", "--max-gpus", "4"], "missing --rate, --slo-ttft-p99, --slo-tpot-p99"),
        (["plan", "--rate", "0", "--slo-ttft-p99", "2s", "--slo-tpot-p99", "50ms"], "--rate must be"),
        (["plan", "--rate", "4", "--slo-ttft-p99", "2s", "--slo-tpot-p99", "50ms", "--max-gpus", "0"], "--max-gpus must be >= 1"),
        (["plan", "--rate", "4", "--slo-ttft-p99", "2s", "--slo-tpot-p99", "50ms", "--prompt-len", "8000"], "exceed llama-2-7b's context"),
        (["plan", "--rate", "4", "--slo-ttft-p99", "2s", "--slo-tpot-p99", "50ms", "--draft", "llama-3.2-1b"], "one vocabulary"),
        (["plan", "--rate", "4", "--slo-ttft-p99", "2s", "--slo-tpot-p99", "50ms", "--engine", "tgi"], "unknown engine 'tgi'"),
    ],
)
def test_search_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1


def test_a_search_simulates_with_the_engines_overheads_and_batching(tmp_path, capsys):
    """--engine X: each candidate's simulation runs X's host overheads and its server's batching
    (SGLang: chunked prefill of 8192 tokens in steps of its own) at the candidate's max batch; the
    default, ideal, keeps the kernels-only, unchunked engine. The JSON says which."""
    c = capacity.Candidate(replicas=1, tp=1, draft=capacity.NO_DRAFT, gamma=0, max_batch=16)
    ideal = capacity.simulation_job(c, small_query(), {capacity.NO_DRAFT: None})[4]
    sglang = capacity.simulation_job(c, small_query(engine="sglang"), {capacity.NO_DRAFT: None})[4]
    assert ideal.engine.ideal and not ideal.chunked_prefill and ideal.max_batched_tokens == DEFAULT_MAX_BATCHED_TOKENS
    assert sglang.engine.name == "sglang" and not sglang.engine.ideal
    assert (sglang.chunked_prefill, sglang.prefill_apart, sglang.max_batched_tokens, sglang.max_batch) == (True, True, 8192, 16)
    code, out, err = run([*SMALL_CLI, "--slo-ttft-p99", "2s", "--slo-tpot-p99", "50ms", "--engine", "sglang", "--json", "--plot-dir", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["engine"] == "sglang" and any("sglang's host overheads" in a for a in report["assumptions"])
