"""Closed-loop load (`--concurrency N`, as `vllm bench serve --max-concurrency N`) and every request at
once (`--rate inf`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.errors import UserError
from simulator.hardware import load_profile
from simulator.models import BUILTIN_MODELS
from simulator.serving import AcceptanceModel, ServingConfig, simulate_serving
from simulator.workload import WorkloadSpec, make_stream
from tests.test_serving_cli import cli

HW = load_profile("A100-80GB")
MODEL = BUILTIN_MODELS["llama-2-7b"]


def run(workload: WorkloadSpec, seed: int = 0) -> dict:
    requests = make_stream(workload, np.random.default_rng(seed))
    return simulate_serving(HW, MODEL, None, AcceptanceModel(), ServingConfig(gamma=0, check_invariants=True), requests,
                            np.random.default_rng(seed), concurrency=workload.concurrency)  # fmt: skip


@settings(max_examples=8, deadline=None)
@given(users=st.integers(1, 6), requests=st.integers(1, 30), lengths=st.sampled_from(["fixed", "uniform"]))
def test_closed_loop_never_runs_more_than_its_users(users, requests, lengths):
    report = run(WorkloadSpec(rate_per_s=math.inf, requests=requests, prompt_tokens=64, output_tokens=16, lengths=lengths, concurrency=users))
    assert report["requests"]["completed"] == requests
    assert report["batch"]["max"] == min(users, requests)


def test_one_user_sends_requests_back_to_back():
    """One user: no queueing, and the run lasts the sum of the requests' end-to-end latencies."""
    report = run(WorkloadSpec(rate_per_s=math.inf, requests=5, prompt_tokens=128, output_tokens=32, concurrency=1))
    lat = report["latency_s"]
    assert lat["queue"]["max"] == 0.0
    assert report["duration_s"] == pytest.approx(5 * lat["e2e"]["mean"], rel=1e-9)


def test_as_many_users_as_requests_is_every_request_at_once():
    at_once = run(WorkloadSpec(rate_per_s=math.inf, requests=12, prompt_tokens=96, output_tokens=24))
    closed = run(WorkloadSpec(rate_per_s=math.inf, requests=12, prompt_tokens=96, output_tokens=24, concurrency=12))
    for metric, stats in at_once["latency_s"].items():  # the same schedule: equal but for the last bit of a sum
        assert stats == pytest.approx(closed["latency_s"][metric], rel=1e-12, abs=0.0), metric
    assert at_once["duration_s"] == pytest.approx(closed["duration_s"], rel=1e-12)


def test_more_users_queue_longer_and_serve_more():
    """A mutant that ignores the user limit (every request at once) fails the first assertion."""
    few = run(WorkloadSpec(rate_per_s=math.inf, requests=40, prompt_tokens=128, output_tokens=64, concurrency=2))
    many = run(WorkloadSpec(rate_per_s=math.inf, requests=40, prompt_tokens=128, output_tokens=64, concurrency=16))
    assert few["batch"]["max"] == 2 and many["batch"]["max"] == 16
    assert many["throughput"]["output_tokens_per_s"] > few["throughput"]["output_tokens_per_s"]
    assert many["latency_s"]["tpot"]["mean"] > few["latency_s"]["tpot"]["mean"]


def test_rate_inf_sends_every_request_at_time_zero():
    stream = list(make_stream(WorkloadSpec(rate_per_s=math.inf, requests=20, lengths="uniform"), np.random.default_rng(1)))
    assert [r.arrival_s for r in stream] == [0.0] * 20


@pytest.mark.parametrize("users", [0, -3])
def test_concurrency_below_one_is_refused(users, capsys):
    with pytest.raises(UserError, match="--concurrency must be >= 1"):
        WorkloadSpec(concurrency=users).check()
    code, out, err = cli(["simulate", "--concurrency", str(users), "--draft", "none"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--concurrency must be >= 1" in err


def test_cli_closed_loop_report(capsys):
    code, out, err = cli(["simulate", "--draft", "none", "--concurrency", "3", "--requests", "30", "--prompt-len", "64",
                          "--output-len", "16", "--json", "--no-interval"], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["config"]["workload"]["concurrency"] == 3 and report["config"]["workload"]["rate_per_s"] is None  # inf: null in JSON
    assert report["autoregressive"]["batch"]["max"] == 3
