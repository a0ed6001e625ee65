"""The serving simulation against theory: batch-1 throughput equals the cost model's analytic
formula, and with one server and deterministic service the mean wait is the M/D/1 formula."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.forward import prefill_time_s, step_time_s
from simulator.hardware import load_profile
from simulator.models import load_model
from simulator.plan import build_plan
from simulator.serving import AcceptanceModel, ServingConfig, simulate_serving
from simulator.workload import Request, WorkloadSpec, make_stream

A100 = load_profile("a100")
TARGET = load_model("llama-2-7b")
DRAFT = load_model("llama-68m")


def spaced(n: int, prompt: int, output: int, gap_s: float = 1000.0):
    """Requests far enough apart that none waits: batch 1, no queueing."""
    return iter([Request(i, i * gap_s, prompt, output) for i in range(n)])


def test_batch_one_decoding_is_the_sum_of_step_times():
    """Without speculation every step is deterministic: a request's decode time is exactly the sum
    of forward() step times over its contexts, and its TTFT is forward()'s prefill time."""
    prompt, output = 300, 200
    cfg = ServingConfig(gamma=0, max_batch=1)
    report = simulate_serving(A100, TARGET, None, AcceptanceModel(), cfg, spaced(5, prompt, output), np.random.default_rng(0))
    decode_s = sum(step_time_s(TARGET, A100, 1, prompt + s, 1) for s in range(output - 1))
    lat = report["latency_s"]
    assert lat["tpot"]["mean"] == pytest.approx(decode_s / (output - 1), rel=1e-9)
    assert lat["ttft"]["mean"] == pytest.approx(prefill_time_s(TARGET, A100, 1, prompt), rel=1e-9)
    assert lat["queue"]["max"] == 0.0


@pytest.mark.parametrize("alpha", [0.0, 0.6, 0.8, 1.0])
def test_batch_one_speculative_tokens_per_s_is_the_analytic_formula(alpha):
    """At batch 1 with no queueing, simulated decode tokens/s (1 / mean TPOT) is within 1% of the
    cost model's E[tokens per step] / (gamma t_draft + t_verify) at the mean context (`plan`).
    The step time is linear in context at batch 1 (memory-bound), so the mean context prices the
    mean step. 48 requests of 2047 decode tokens: the relative standard error from random
    acceptance is below 0.3%, and the capped last step of each request biases by under 0.2%."""
    prompt, output, gamma = 128, 2048, 4
    cfg = ServingConfig(gamma=gamma, max_batch=1)
    report = simulate_serving(A100, TARGET, DRAFT, AcceptanceModel(alpha=alpha), cfg, spaced(48, prompt, output), np.random.default_rng(7))
    simulated = 1.0 / report["latency_s"]["tpot"]["mean"]
    analytic = build_plan(A100, TARGET, DRAFT, alpha, gamma, 1, prompt, output)["speculative"]["rows"][gamma]["tokens_per_s"]
    assert simulated == pytest.approx(analytic, rel=0.01)
    assert report["latency_s"]["queue"]["max"] == 0.0
    assert report["batch"]["max"] == 1


def test_md1_mean_wait_matches_pollaczek_khinchine():
    """One server (max batch 1), speculation off, every request alike: service is deterministic,
    S = prefill + sum of decode steps, and arrivals are Poisson, so the mean wait in queue is
    Wq = rho S / (2 (1 - rho)) (Pollaczek-Khinchine for M/D/1).

    Tolerance from the run length: 10 independent replications of 5000 customers at rho = 0.5.
    One replication's mean wait has a relative SD of about 6% (measured), so the grand mean's
    standard error is about 1.8%; the test allows 4 standard errors as estimated from the
    replications themselves, and requires that estimate to stay under 3% so the check stays tight
    (a 10% error in the wait would fail it)."""
    prompt, output, rho = 64, 32, 0.5
    service_s = prefill_time_s(TARGET, A100, 1, prompt) + sum(step_time_s(TARGET, A100, 1, prompt + s, 1) for s in range(output - 1))
    rate = rho / service_s
    wq_s = rho * service_s / (2.0 * (1.0 - rho))
    cfg = ServingConfig(gamma=0, max_batch=1)
    waits = []
    for seed in range(10):
        spec = WorkloadSpec(requests=5000, rate_per_s=rate, prompt_tokens=prompt, output_tokens=output)
        report = simulate_serving(A100, TARGET, None, AcceptanceModel(), cfg, make_stream(spec, np.random.default_rng(seed)), np.random.default_rng(0))
        lat = report["latency_s"]
        assert report["requests"]["completed"] == 5000
        assert lat["e2e"]["mean"] - lat["queue"]["mean"] == pytest.approx(service_s, rel=1e-9)  # service is deterministic
        waits.append(lat["queue"]["mean"])
    waits = np.array(waits)
    se = waits.std(ddof=1) / np.sqrt(waits.size)
    assert se / wq_s < 0.03
    assert abs(waits.mean() - wq_s) < 4 * se
