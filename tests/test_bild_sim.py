"""BiLD and host drafts in the simulator: the pricing's limits and monotonicity, the rates file's
bad input in one line, `plan --policy bild`, and a BiLD serving run under load."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import executor_loop as el
from simulator.bild import BildSpeculation, load_rates
from simulator.errors import UserError
from simulator.forward import step_time_s
from simulator.hardware import load_profile
from simulator.models import ModelSpec
from tests.cli_run import simulator_cli

TARGET = ModelSpec(name="t", d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768, vocab_size=256, max_seq_len=1024)
SMALL = ModelSpec(name="s", d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=384, vocab_size=256, max_seq_len=1024)
HW = load_profile("a100")


def rates(s=1.1, b=0.3, k=3.5, counts=(5, 3, 2, 1, 0, 0, 0, 0, 0, 0, 1)) -> dict:
    return {"small_steps_per_token": s, "big_passes_per_token": b, "big_query_tokens_per_pass": k, "fallback_rate": 0.2,
            "rollback_rate": 0.1, "kept_per_pass_counts": list(counts)}  # fmt: skip


def test_bild_with_every_token_from_the_big_model_costs_one_decode_step_per_token():
    # s = 0, b = 1, k = 1: the target alone, one one-token pass per token (the prefill aside)
    t = el.bild_s_per_token(TARGET, SMALL, HW, rates(s=0.0, b=1.0, k=1.0), 100, 10**6)
    assert t == pytest.approx(step_time_s(TARGET, HW, 1, 100 + 10**6 // 2, 1, "fp32"), rel=1e-3)


@settings(max_examples=30)
@given(st.floats(0.0, 3.0), st.floats(0.01, 1.0), st.floats(1.0, 11.0), st.floats(0.0, 1.0))
def test_more_steps_or_passes_per_token_never_make_bild_faster(s, b, k, more):
    # (not more query tokens per pass: the device model may price a pass over 2 tokens below one over 1)
    base = el.bild_s_per_token(TARGET, SMALL, HW, rates(s, b, k), 192, 128)
    for bigger in (rates(s + more, b, k), rates(s, b + more, k)):
        assert el.bild_s_per_token(TARGET, SMALL, HW, bigger, 192, 128) >= base * (1 - 1e-12)


def test_a_host_draft_costs_its_lookup_time_and_no_model_pass():
    kw = dict(gamma=4, tokens_per_step=3.0, prompt=192, new_tokens=128)
    free = el.linear_s_per_token(TARGET, HW, **kw)
    slow = el.linear_s_per_token(TARGET, HW, **kw, host_draft_s=1e-3)
    assert slow - free == pytest.approx(1e-3 * 128 / 3.0 / 128)
    # a model draft with the same tokens per step costs its gamma decode steps on top
    assert el.linear_s_per_token(TARGET, HW, **kw, draft=SMALL) > free


def test_bad_rates_are_refused():
    with pytest.raises(UserError, match="big_passes_per_token"):
        el.bild_s_per_token(TARGET, SMALL, HW, rates(b=-1.0), 10, 10)


def rates_file(tmp_path, **change) -> str:
    data = {"kind": "bild_rates", "device": "test", "target": TARGET.model_dump(), "small": SMALL.model_dump(), "best": "BiLD f=0.4 r=0.5",
            "rows": [{"name": "autoregressive", "tokens_per_s": 100.0},
                     {"name": "BiLD f=0.4 r=0.5", "fallback": 0.4, "rollback": 0.5, "tokens_per_s": 150.0, "speedup": 1.5, "token_match": 1.0,
                      "sequence_match": 1.0, "nll": 0.4, "first_token_tv_t1": 0.02, "rates": rates()}]} | change  # fmt: skip
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_rates_files_best_row_is_read_by_default(tmp_path):
    _, row = load_rates(rates_file(tmp_path))
    assert row["name"] == "BiLD f=0.4 r=0.5"
    assert BildSpeculation(SMALL, row["rates"], 0.4, 0.5, "x").max_run == 10


@pytest.mark.parametrize(
    "change,args,message",
    [
        ({"kind": "other"}, [], "not a BiLD rates file"),
        ({"rows": [{"name": "autoregressive"}]}, [], "no BiLD rows"),
        ({}, ["--fallback", "0.3", "--rollback", "0.5"], "no row for fallback 0.3"),
        ({}, ["--fallback", "1.5", "--rollback", "0.5"], "--fallback must lie in [0, 1]"),
        ({}, ["--fallback", "0.4", "--rollback", "-1"], "--rollback must lie in [0, 1]"),
        ({}, ["--fallback", "0.4"], "together"),
        ({"small": {"name": "x"}}, [], "small is not a model spec"),
    ],
)
def test_bad_rates_input_exits_2_with_one_line(tmp_path, change, args, message):
    code, _, err = simulator_cli(["plan", "--policy", "bild", "--bild-rates", rates_file(tmp_path, **change), *args])
    assert code == 2 and err.count("\n") == 1 and message in err


def test_plan_bild_prints_the_prediction_and_the_measured_quality(tmp_path):
    code, out, _ = simulator_cli(["plan", "--policy", "bild", "--bild-rates", rates_file(tmp_path), "--json"])
    assert code == 0
    p = json.loads(out)
    assert p["predicted"]["tokens_per_s"] == pytest.approx(1.0 / el.bild_s_per_token(TARGET, SMALL, load_profile("a100"), rates(), 512, 256, "fp16"))
    assert p["quality"] == {"token_match": 1.0, "sequence_match": 1.0, "nll": 0.4, "first_token_tv_t1": 0.02} and p["exact"] is False
    code, out, _ = simulator_cli(["plan", "--policy", "bild", "--bild-rates", rates_file(tmp_path)])
    assert code == 0 and "INEXACT" in out and "token_match 1.000" in out


def test_bild_flags_need_the_policy(tmp_path):
    code, _, err = simulator_cli(["plan", "--bild-rates", rates_file(tmp_path)])
    assert code == 2 and "go with --policy bild" in err
    code, _, err = simulator_cli(["simulate", "--policy", "bild"])
    assert code == 2 and "needs --bild-rates" in err


def test_a_bild_serving_run_under_load_emits_the_measured_tokens_per_pass(tmp_path):
    argv = ["simulate", "--policy", "bild", "--bild-rates", rates_file(tmp_path), "--model", "llama-2-7b", "--draft", "llama-68m",
            "--requests", "60", "--rate", "4", "--no-interval", "--json"]  # fmt: skip
    code, out, err = simulator_cli(argv)
    assert code == 0, err
    report = json.loads(out)
    counts = rates()["kept_per_pass_counts"]
    mean_emitted = sum((n + 1) * c for n, c in enumerate(counts)) / sum(counts)
    spec = report["speculative"]["engine"]
    assert report["config"]["bild"]["max_run"] == 10
    assert report["speculative"]["requests"]["completed"] == 60
    # the engine's tokens per verify step follow the measured kept-per-pass law
    assert spec["tokens_per_verify"] == pytest.approx(mean_emitted, rel=0.1)


def test_a_bild_serving_report_names_the_policy_and_its_rates(tmp_path):
    argv = ["simulate", "--policy", "bild", "--bild-rates", rates_file(tmp_path), "--requests", "20", "--no-interval"]
    code, out, err = simulator_cli(argv)
    assert code == 0, err
    assert "BiLD fallback 0.4 rollback 0.5 (INEXACT; 1.100 small steps and 0.300 big passes per token, 3.50 query tokens per pass" in out
    assert ", gamma" not in out.splitlines()[0]  # BiLD's cycle has no gamma to report
