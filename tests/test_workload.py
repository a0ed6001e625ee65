"""Request streams: Poisson and gamma-process arrivals have their stated rate and burstiness, a
seed fixes the stream, and trace files are read strictly (every malformed row names file and line)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import simpy

from simulator.errors import UserError
from simulator.workload import (
    SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN,
    WorkloadSpec,
    load_trace,
    make_stream,
    random_stream,
    request_source,
    sharegpt_output_cap,
    truncated_lognormal,
)


def gaps(spec: WorkloadSpec, seed: int = 0) -> np.ndarray:
    arrivals = np.array([r.arrival_s for r in random_stream(spec, np.random.default_rng(seed))])
    return np.diff(np.concatenate([[0.0], arrivals]))


def test_poisson_gaps_have_mean_one_over_rate_and_unit_cv():
    """20 000 exponential gaps: the mean's relative standard error is 0.7%, so 3% is over 4 SE;
    the squared coefficient of variation is 1 for exponential gaps (SE about 2% here)."""
    g = gaps(WorkloadSpec(arrival="poisson", rate_per_s=5.0, requests=20_000))
    assert g.mean() == pytest.approx(0.2, rel=0.03)
    assert g.var() / g.mean() ** 2 == pytest.approx(1.0, rel=0.1)
    assert (g > 0).all()


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_gaps_keep_the_rate_and_set_the_burstiness(burstiness):
    """Gamma gaps with shape k: mean 1 / rate whatever k, squared CV 1 / k."""
    g = gaps(WorkloadSpec(arrival="gamma", rate_per_s=2.0, burstiness=burstiness, requests=40_000), seed=1)
    assert g.mean() == pytest.approx(0.5, rel=0.04)
    assert g.var() / g.mean() ** 2 == pytest.approx(1.0 / burstiness, rel=0.1)


def test_lengths_fixed_and_uniform():
    fixed = list(random_stream(WorkloadSpec(requests=100, prompt_tokens=300, output_tokens=20), np.random.default_rng(0)))
    assert {(r.prompt_tokens, r.output_tokens) for r in fixed} == {(300, 20)}
    spec = WorkloadSpec(requests=20_000, prompt_tokens=300, output_tokens=20, lengths="uniform")
    uniform = list(random_stream(spec, np.random.default_rng(0)))
    prompts = np.array([r.prompt_tokens for r in uniform])
    outputs = np.array([r.output_tokens for r in uniform])
    assert prompts.min() >= 1 and prompts.max() <= 599 and prompts.mean() == pytest.approx(300, rel=0.02)
    assert outputs.min() >= 1 and outputs.max() <= 39 and outputs.mean() == pytest.approx(20, rel=0.02)


def test_sharegpt_outputs_keep_the_mean_the_median_and_the_benchmarks_filter():
    """40 000 requests of ShareGPT's means in the published rows (prompt 220, output 204 tokens). The
    outputs' coefficient of variation is about 1.2, so the mean's standard error is 0.6% and 2% is over
    3 SE; the median's is under 1%, so 3% is over 3 SE as well. Mutants caught: uniform outputs
    (median = mean, 72% off), exponential ones (median 0.69 of the mean, 19% off), a tail left
    uncut (outputs past 2048 - longest prompt). Prompts are drawn as 'uniform' draws them: the same
    numbers from the same seed."""
    spec = WorkloadSpec(requests=40_000, prompt_tokens=220, output_tokens=204, lengths="sharegpt").check()
    reqs = list(random_stream(spec, np.random.default_rng(0)))
    prompts = np.array([r.prompt_tokens for r in reqs])
    outputs = np.array([r.output_tokens for r in reqs])
    assert outputs.mean() == pytest.approx(204, rel=0.02)
    assert np.median(outputs) == pytest.approx(SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN * 204, rel=0.03)
    assert outputs.min() >= 4 and outputs.max() <= sharegpt_output_cap(220) == 2048 - 439
    assert (prompts + outputs).max() <= 2048
    assert 0.01 < (outputs > 5 * 204).mean() < 0.03  # the long tail that ends a burst
    uniform = random_stream(spec.model_copy(update={"lengths": "uniform"}), np.random.default_rng(0))
    assert [next(uniform).prompt_tokens for _ in range(100)] == prompts[:100].tolist()  # the first chunk's prompts come first


def test_the_truncated_log_normal_has_the_mean_and_median_asked_for():
    """Without a cut the law is the plain log-normal: median e^mu, mean e^(mu + sigma^2 / 2); with one,
    the part inside keeps the mean and median asked for (a wide draw's moments, to 1%)."""
    mu, sigma = truncated_lognormal(100.0, 58.0, 1e-6, 1e12)
    assert math.exp(mu) == pytest.approx(58.0, rel=1e-6) and sigma == pytest.approx(math.sqrt(2 * math.log(100 / 58)), rel=1e-6)
    mu, sigma = truncated_lognormal(204.0, 118.32, 3.5, 1609.5)
    x = np.exp(np.random.default_rng(1).normal(mu, sigma, size=2_000_000))
    x = x[(x >= 3.5) & (x <= 1609.5)]
    assert x.mean() == pytest.approx(204.0, rel=0.01) and np.median(x) == pytest.approx(118.32, rel=0.01)
    with pytest.raises(UserError, match="no log-normal law"):
        truncated_lognormal(100.0, 120.0, 1.0, 1000.0)


@pytest.mark.parametrize("lengths", ["uniform", "sharegpt"])
def test_same_seed_same_stream_and_ids_count_up(lengths):
    spec = WorkloadSpec(requests=5000, prompt_tokens=256, output_tokens=128, lengths=lengths)
    a = list(make_stream(spec, np.random.default_rng(42)))
    b = list(make_stream(spec, np.random.default_rng(42)))
    c = list(make_stream(spec, np.random.default_rng(43)))
    assert a == b and a != c
    assert [r.rid for r in a] == list(range(5000))
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:], strict=False))


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), 2e9])
def test_rate_must_be_positive_and_at_most_a_nanosecond_apart(rate):  # inf: every request at once (test_closed_loop)
    with pytest.raises(UserError, match="--rate must be"):
        WorkloadSpec(rate_per_s=rate).check()


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"burstiness": 0.0}, "--burstiness"),
        ({"requests": 0}, "--requests"),
        ({"prompt_tokens": 0}, "--prompt-len"),
        ({"output_tokens": 0}, "--output-len"),
        ({"arrival": "trace"}, "--trace FILE"),
        ({"lengths": "sharegpt", "prompt_tokens": 513, "output_tokens": 100}, "--prompt-len at most 512"),
        ({"lengths": "sharegpt", "prompt_tokens": 220, "output_tokens": 269}, "--output-len from 16 to 1/6"),
        ({"lengths": "sharegpt", "prompt_tokens": 220, "output_tokens": 15}, "--output-len from 16"),
    ],
)
def test_other_bad_workloads(fields, message):
    with pytest.raises(UserError, match=message):
        WorkloadSpec(**fields).check()


def test_request_source_releases_requests_at_their_arrival_times():
    env = simpy.Environment()
    seen, done = [], []
    spec = WorkloadSpec(requests=50, rate_per_s=10.0)
    requests = list(make_stream(spec, np.random.default_rng(0)))
    env.process(request_source(env, iter(requests), lambda r: seen.append((env.now, r)), lambda: done.append(env.now)))
    env.run()
    assert [r for _, r in seen] == requests
    assert all(t == r.arrival_s for t, r in seen)
    assert done == [requests[-1].arrival_s]


# --- traces -----------------------------------------------------------------------------------


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_trace(tmp_path):
    path = write(tmp_path, "t.csv", "arrival_time_s,prompt_tokens,output_tokens,user\n0,10,5,a\n\n0.5,20.0,6,b\n0.5,30,7,c\n")
    trace = load_trace(path)
    assert trace.arrival_s.tolist() == [0.0, 0.5, 0.5]
    assert trace.prompt_tokens.tolist() == [10, 20, 30]
    assert trace.output_tokens.tolist() == [5, 6, 7]
    assert load_trace(path, limit=2).arrival_s.size == 2
    stream = list(make_stream(WorkloadSpec(arrival="trace", trace_path=str(path), requests=None), np.random.default_rng(0)))
    assert [(r.rid, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in stream] == [(0, 0.0, 10, 5), (1, 0.5, 20, 6), (2, 0.5, 30, 7)]


def test_jsonl_trace(tmp_path):
    rows = [{"arrival_time_s": 0.1, "prompt_tokens": 100, "output_tokens": 50}, {"arrival_time_s": 2, "prompt_tokens": 8, "output_tokens": 1, "extra": True}]
    path = write(tmp_path, "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    trace = load_trace(path)
    assert trace.arrival_s.tolist() == [0.1, 2.0] and trace.output_tokens.tolist() == [50, 1]


HEADER = "arrival_time_s,prompt_tokens,output_tokens\n"


@pytest.mark.parametrize(
    "name,text,where,message",
    [
        ("t.csv", HEADER + "0,10,5\nabc,10,5\n", ":3:", "arrival_time_s must be a number"),
        ("t.csv", HEADER + "0,10,5\n-1,10,5\n", ":3:", "arrival_time_s must be a number of seconds >= 0"),
        ("t.csv", HEADER + "0,0,5\n", ":2:", "prompt_tokens must be a whole number >= 1"),
        ("t.csv", HEADER + "0,10,2.5\n", ":2:", "output_tokens must be a whole number"),
        ("t.csv", HEADER + "0,10\n", ":2:", "2 fields, the header has 3"),
        ("t.csv", HEADER + "1,10,5\n0.5,10,5\n", ":3:", "earlier than the row before"),
        ("t.csv", "time,prompt,output\n0,1,1\n", ":1:", "header lacks arrival_time_s, prompt_tokens, output_tokens"),
        ("t.csv", HEADER + "0,nan,5\n", ":2:", "prompt_tokens must be a whole number"),
        ("t.jsonl", '{"arrival_time_s": 0, "prompt_tokens": 1, "output_tokens": 1}\n{"arrival_time_s": 1,\n', ":2:", "malformed JSON"),
        ("t.jsonl", '{"arrival_time_s": 0, "prompt_tokens": 1}\n', ":1:", "missing output_tokens"),
        ("t.jsonl", "[0, 1, 1]\n", ":1:", "a JSONL row is an object"),
        ("t.jsonl", '{"arrival_time_s": 0, "prompt_tokens": true, "output_tokens": 1}\n', ":1:", "prompt_tokens must be"),
    ],
)
def test_malformed_trace_rows_name_file_and_line(tmp_path, name, text, where, message):
    path = write(tmp_path, name, text)
    with pytest.raises(UserError, match=message) as err:
        load_trace(path)
    assert str(err.value).startswith(f"{path}{where}")


def test_unusable_trace_files(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_trace(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="a .csv or .jsonl file"):
        load_trace(write(tmp_path, "t.txt", HEADER))
    with pytest.raises(UserError, match="no rows"):
        load_trace(write(tmp_path, "t.csv", HEADER))
    with pytest.raises(UserError, match="empty trace"):
        load_trace(write(tmp_path, "e.csv", "\n\n"))
