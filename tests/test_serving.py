"""The serving engine: its fast step time held to forward(), acceptance laws, fixed-size metrics,
and the engine's invariants (nothing lost, KV within capacity, spans equal single steps, seeds)."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import simpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.errors import UserError
from simulator.forward import forward, prefill_time_s
from simulator.hardware import load_profile
from simulator.models import BUILTIN_MODELS, ModelSpec, load_model
from simulator.serving import (
    AcceptanceModel,
    Engine,
    LatencySummary,
    PassCost,
    ServingConfig,
    Timeline,
    kv_cache_blocks,
    simulate_serving,
)
from simulator.speculative import expected_tokens, expected_tokens_positional
from simulator.workload import Request, WorkloadSpec, make_stream

A100 = load_profile("a100")
LLAMA_7B = load_model("llama-2-7b")
LLAMA_68M = load_model("llama-68m")
# A two-layer model and a device whose memory holds it plus a few dozen KV blocks: preemption
# and rejection happen within a few requests, and every step is cheap to price.
TINY = ModelSpec(name="tiny", d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, vocab_size=32000, max_seq_len=2048)
TINY_DRAFT = ModelSpec(name="tiny-draft", d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=256, vocab_size=32000, max_seq_len=2048)


def small_device(blocks: int, draft: bool = True):
    """A100 with just enough memory for TINY (+ TINY_DRAFT) and `blocks` KV blocks of 16 tokens."""
    cfg = ServingConfig()
    models = [TINY, TINY_DRAFT] if draft else [TINY]
    weights = sum(m.n_params * 2 for m in models)
    per_block = 16 * sum(m.kv_bytes_per_token(2) for m in models)
    memory = math.ceil((weights + (blocks + 0.5) * per_block) / cfg.memory_utilization)
    return A100.model_copy(update={"memory_bytes": memory})


def run(hw, target, draft, cfg, requests, alpha=0.7, seed=1, acceptance=None):
    return simulate_serving(hw, target, draft, acceptance or AcceptanceModel(alpha=alpha), cfg, iter(requests), np.random.default_rng(seed))


def poisson(n, rate, prompt, output, lengths="uniform", seed=0, arrival="poisson", burstiness=1.0):
    spec = WorkloadSpec(arrival=arrival, rate_per_s=rate, burstiness=burstiness, requests=n,
                        prompt_tokens=prompt, output_tokens=output, lengths=lengths)  # fmt: skip
    return list(make_stream(spec, np.random.default_rng(seed)))


# --- the fast step time is forward() regrouped ------------------------------------------------


def _tp_choices(model: ModelSpec):
    return [tp for tp in (1, 2, 4, 8) if model.n_heads % tp == 0 and model.d_ff % tp == 0]


@settings(max_examples=200, deadline=None)
@given(
    model=st.sampled_from(list(BUILTIN_MODELS.values())),
    batch=st.integers(1, 256),
    ctx=st.integers(0, 8192),
    q=st.integers(1, 17),
    dtype=st.sampled_from(["fp16", "fp32"]),
    tp_index=st.integers(0, 3),
)
def test_pass_cost_equals_forward(model, batch, ctx, q, dtype, tp_index):
    """A decode or verify pass of a uniform batch: PassCost and forward() agree to 1e-9."""
    tps = _tp_choices(model)
    tp = tps[tp_index % len(tps)]
    cost = PassCost(model, A100, dtype, tp)
    expected = forward(model, A100, batch, ctx, q, dtype, tp=tp)["total"].time_s
    assert cost.uniform_s(batch, q, batch * ctx) == pytest.approx(expected, rel=1e-9)
    # the array form prices many steps at once, each as the scalar form does
    ctxs = np.array([0, ctx, 2 * ctx + 1])
    many = cost.uniform_s(batch, q, batch * ctxs)
    for c, t in zip(ctxs, many, strict=True):
        assert t == pytest.approx(forward(model, A100, batch, int(c), q, dtype, tp=tp)["total"].time_s, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(model=st.sampled_from(list(BUILTIN_MODELS.values())), batch=st.integers(1, 32), prompt=st.integers(1, 4096))
def test_pass_cost_prefill_equals_prefill_time(model, batch, prompt):
    cost = PassCost(model, A100)
    got = cost.uniform_s(batch, prompt, 0, logits_tokens=batch)  # keys = prompt per sequence
    assert got == pytest.approx(prefill_time_s(model, A100, batch, prompt), rel=1e-9)


@given(ctx=st.lists(st.integers(0, 4000), min_size=1, max_size=16), q=st.integers(1, 9))
def test_mixed_batch_attention_is_additive(ctx, q):
    """A batch of sequences of different contexts in one attention call (priced at their mean
    context): no dearer than the sequences one call each, no cheaper than the shortest alone."""
    cost = PassCost(LLAMA_7B, A100)
    keys = [c + q for c in ctx]
    alone = [cost.attention_s(1, q, k) for k in keys]
    together = cost.attention_s(len(ctx), q * len(ctx), sum(keys))
    assert min(alone) * (1 - 1e-12) <= together <= sum(alone) * (1 + 1e-12)


# --- acceptance laws ---------------------------------------------------------------------------


@given(alpha=st.floats(0.0, 1.0), gamma=st.integers(0, 12))
def test_iid_acceptance_mean_is_leviathan(alpha, gamma):
    model = AcceptanceModel(alpha=alpha)
    pmf = model.pmf(gamma)
    assert pmf.sum() == pytest.approx(1.0) and (pmf >= -1e-15).all()
    assert model.mean_tokens(gamma) == pytest.approx(expected_tokens(alpha, gamma), rel=1e-12, abs=1e-12)


@given(alphas=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8))
def test_positional_acceptance_mean(alphas):
    model = AcceptanceModel(kind="positional", alphas=alphas)
    assert model.mean_tokens(len(alphas)) == pytest.approx(expected_tokens_positional(alphas), rel=1e-12)


def test_empirical_acceptance_truncates_to_fewer_drafts():
    counts = [10, 20, 30, 40]  # measured with gamma 3
    model = AcceptanceModel(kind="empirical", counts=counts)
    assert model.pmf(3) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert model.pmf(1) == pytest.approx([0.1, 0.9])  # n = min(n_measured, 1)
    with pytest.raises(UserError, match="measured with gamma 3"):
        model.check(4)


def test_acceptance_draws_follow_the_law():
    """The engine's accepted lengths, pooled over a long batch-1 run, match the pmf:
    chi-square with 4 degrees of freedom, 99.9% quantile 18.47, fixed seed."""
    pmf = AcceptanceModel(kind="positional", alphas=[0.9, 0.8, 0.5, 0.3]).pmf(4)
    cdf = np.cumsum(pmf)
    cdf[-1] = 1.0
    draws = np.searchsorted(cdf, np.random.default_rng(3).random(200_000), side="right")
    observed = np.bincount(draws, minlength=5)
    expected = pmf * draws.size
    assert ((observed - expected) ** 2 / expected).sum() < 18.47


def test_bad_acceptance_is_a_user_error():
    with pytest.raises(UserError, match="alpha must lie"):
        AcceptanceModel(alpha=1.5).check(4)
    with pytest.raises(UserError, match="one per draft position"):
        AcceptanceModel(kind="positional", alphas=[0.5, 0.5]).check(4)


# --- fixed-size summaries ----------------------------------------------------------------------


def test_latency_summary_quantiles_within_half_a_percent():
    rng = np.random.default_rng(0)
    values = rng.lognormal(mean=-3.0, sigma=1.5, size=50_000)
    s = LatencySummary()
    for chunk in np.array_split(values, 997):  # many small adds, as the engine makes them
        s.add(chunk)
    assert s.counts.size == LatencySummary.N_BINS  # memory does not grow with the stream
    summary = s.summary()
    assert summary["count"] == values.size
    assert summary["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert summary["max"] == values.max()
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        exact = np.quantile(values, q, method="inverted_cdf")
        assert summary[key] == pytest.approx(exact, rel=0.005)


def test_latency_summary_zero_values_report_the_minimum():
    s = LatencySummary()
    s.add(np.zeros(10))
    s.add(np.array([1.0]))
    assert s.quantile(0.5) == 0.0 and s.quantile(1.0) == pytest.approx(1.0, rel=0.005)


def test_timeline_merges_and_keeps_totals():
    tl = Timeline(width_s=1e-3)
    starts = np.arange(0, 100.0, 0.01)
    dt = np.full(starts.size, 0.01)
    tl.add(starts, dt, 3, np.full(starts.size, 7.0), np.ones(starts.size))
    tl.flush()
    assert tl.busy_s.size == Timeline.N_BUCKETS
    assert tl.busy_s.sum() == pytest.approx(100.0)
    assert tl.sequence_s.sum() == pytest.approx(300.0)
    assert tl.output_tokens.sum() == starts.size
    assert tl.kv_peak_blocks.max() == 7.0
    assert tl.width_s * Timeline.N_BUCKETS > 99.99


def test_a_step_longer_than_its_bucket_never_shows_more_kv_in_use_than_its_peak():
    """A step is booked to the bucket where it starts; one that outlasts the bucket (a long prefill)
    books more step time there than the bucket is wide. The bucket's mean KV use is taken over the
    time booked to it, not its width, so it stays within the peak: 10 blocks held for 3 ms from
    0.5 ms into 1 ms buckets read 10 blocks on average, not 30."""
    tl = Timeline(width_s=1e-3)
    tl.add_one(0.5e-3, 3e-3, 2, 10, 1)
    summary = tl.summary(capacity_blocks=100, end_s=3.5e-3)
    assert summary["kv_used_fraction_mean"][0] == pytest.approx(0.1)
    assert summary["kv_used_fraction_peak"][0] == pytest.approx(0.1)
    assert max(summary["kv_used_fraction_mean"]) <= max(summary["kv_used_fraction_peak"])


# --- KV capacity -----------------------------------------------------------------------------


def test_kv_capacity_from_memory_minus_weights():
    cfg = ServingConfig()
    blocks, per_block = kv_cache_blocks(A100, LLAMA_7B, LLAMA_68M, cfg)
    usable = A100.memory_bytes * cfg.memory_utilization - 2 * (LLAMA_7B.n_params + LLAMA_68M.n_params)
    assert per_block == 16 * (LLAMA_7B.kv_bytes_per_token(2) + LLAMA_68M.kv_bytes_per_token(2))
    assert blocks == int(usable // per_block)
    alone, _ = kv_cache_blocks(A100, LLAMA_7B, None, cfg)
    assert alone > blocks  # no draft: its weights and KV free room


def test_model_that_does_not_fit_says_by_how_much():
    big = load_model("llama-2-70b")
    with pytest.raises(UserError, match=r"short by 6[0-9]\.[0-9] GB"):
        kv_cache_blocks(A100, big, None, ServingConfig())
    # split over 4 GPUs it fits
    blocks, _ = kv_cache_blocks(A100, big, None, ServingConfig(tp=4))
    assert blocks > 0


# --- the engine's invariants -------------------------------------------------------------------

engine_configs = st.fixed_dictionaries(
    {
        "blocks": st.integers(40, 200),
        "max_batch": st.integers(1, 24),
        "max_batched_tokens": st.integers(64, 1024),
        "chunked": st.booleans(),
        "gamma": st.integers(0, 5),
        "spec_off": st.sampled_from([None, 0, 2, 8]),
        "alpha": st.floats(0.0, 1.0),
        "rate": st.floats(5.0, 2000.0),
        "prompt": st.integers(1, 300),
        "output": st.integers(1, 120),
        "seed": st.integers(0, 2**16),
        "burstiness": st.sampled_from([0.2, 1.0, 4.0]),
    }
)


def _engine_case(c, span_steps=1 << 20, memo=True):
    if not memo:  # the reference: every step priced by the device model on the spot, arrivals met as events
        direct = lambda self, sequences, tokens, keys, memo=True: (  # noqa: E731
            PassCost.attention_s_direct(self, sequences, max(1, round(tokens / sequences)), keys) if sequences and tokens
            else (np.zeros(np.shape(keys)) if np.ndim(keys) else 0.0))  # fmt: skip
        unannounced = property(lambda self: None, lambda self, value: None)
        with (mock.patch.object(PassCost, "attention_s", direct), mock.patch.object(Engine, "_decode_s", Engine._decode_s_direct),
              mock.patch.object(Engine, "_pricing", lambda self, hw, scale: None),
              mock.patch.object(Engine, "next_arrival_s", unannounced, create=True)):  # fmt: skip
            return _engine_case(c, span_steps)
    cfg = ServingConfig(
        max_batch=c["max_batch"], max_batched_tokens=c["max_batched_tokens"], chunked_prefill=c["chunked"],
        gamma=c["gamma"], spec_off_above_batch=c["spec_off"], max_span_steps=span_steps, check_invariants=True,
    )  # fmt: skip
    hw = small_device(c["blocks"])
    requests = poisson(40, c["rate"], c["prompt"], c["output"], seed=c["seed"], arrival="gamma", burstiness=c["burstiness"])
    return run(hw, TINY, TINY_DRAFT, cfg, requests, alpha=c["alpha"], seed=c["seed"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=engine_configs)
def test_every_request_completes_or_is_rejected_and_kv_stays_within_capacity(c):
    """Under memory pressure, bursts, chunking and speculation: none lost, KV use within capacity
    (the engine also asserts its accounting after every step)."""
    report = _engine_case(c)
    req = report["requests"]
    assert req["arrived"] == 40
    assert req["completed"] + req["rejected"] == req["arrived"]
    assert req["rejected"] == sum(r["count"] for r in req["rejected_by_reason"].values())
    kv = report["kv_cache"]
    assert kv["peak_used_blocks"] <= kv["capacity_blocks"]
    assert report["latency_s"]["e2e"]["count"] == req["completed"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=engine_configs)
def test_spans_equal_single_steps(c):
    """The fast path (spans of decode steps planned at once from the ledger, cut where the next
    arrival is known, the engine running ahead of the clock between arrivals, step times from the
    memo) gives the result of planning every step alone, pricing every step afresh and meeting
    every arrival as a SimPy event."""
    fast, slow = _engine_case(c), _engine_case(c, span_steps=1, memo=False)
    assert fast["requests"] == slow["requests"]
    assert fast["engine"]["steps"] == slow["engine"]["steps"]
    assert fast["engine"]["speculative_steps"] == slow["engine"]["speculative_steps"]
    assert fast["engine"]["output_tokens"] == slow["engine"]["output_tokens"]
    assert fast["kv_cache"]["peak_used_blocks"] == slow["kv_cache"]["peak_used_blocks"]
    assert fast["duration_s"] == pytest.approx(slow["duration_s"], rel=1e-9)
    for metric in ("ttft", "tpot", "e2e", "queue"):
        a, b = fast["latency_s"][metric], slow["latency_s"][metric]
        assert a["count"] == b["count"]
        for key in ("mean", "p50", "p99", "max"):
            assert a[key] == (None if b[key] is None else pytest.approx(b[key], rel=1e-9, abs=1e-12))


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(["llama-2-7b", "llama-68m", "llama-3-8b"]),
    sequences=st.integers(1, 300),
    q=st.integers(1, 8),
    keys=st.lists(st.integers(0, 3 * 2**20), min_size=1, max_size=50),
    shape=st.sampled_from(["scalar", "1d", "2d"]),
)
def test_attention_memo_gives_the_device_models_values(model, sequences, q, keys, shape):
    """Memoised attention equals a fresh call of the device model, bit for bit, whatever the calls
    before it filled the memo with (a second call reads what the first priced)."""
    cost = PassCost(load_model(model), A100)
    keys_in = {"scalar": keys[0], "1d": np.array(keys), "2d": np.array(keys * 2).reshape(2, -1)}[shape]
    direct = cost.attention_s_direct(sequences, q, keys_in)
    for _ in range(2):
        memo = cost.attention_s(sequences, sequences * q, keys_in)
        assert np.shape(memo) == np.shape(direct)
        assert np.array_equal(memo, direct)


def test_preemption_under_memory_pressure_and_everyone_finishes():
    cfg = ServingConfig(max_batch=64, gamma=4, check_invariants=True)
    requests = [Request(i, 0.0, 100, 150) for i in range(30)]  # a burst that outgrows the cache mid-decode
    report = run(small_device(120), TINY, TINY_DRAFT, cfg, requests)
    assert report["requests"]["preemptions"] > 0
    assert report["requests"]["completed"] == 30
    assert report["kv_cache"]["peak_used_fraction"] <= 1.0


def test_rejections_carry_reasons():
    cfg = ServingConfig(max_batched_tokens=256)
    requests = [
        Request(0, 0.0, 10, 10),
        Request(1, 0.1, 2000, 100),  # past max_seq_len 2048
        Request(2, 0.2, 300, 10),  # prompt over the 256-token step budget
        Request(3, 0.3, 200, 1500),  # more KV than the 50-block cache holds
    ]
    report = run(small_device(50), TINY, TINY_DRAFT, cfg, requests)
    reasons = report["requests"]["rejected_by_reason"]
    assert reasons["longer_than_max_seq_len"] == {"count": 1, "first_ids": [1]}
    assert reasons["prompt_exceeds_max_batched_tokens"] == {"count": 1, "first_ids": [2]}
    assert reasons["larger_than_kv_cache"] == {"count": 1, "first_ids": [3]}
    assert report["requests"]["completed"] == 1


def test_speculation_switches_off_above_the_batch_limit():
    requests = poisson(200, 400.0, 64, 64, lengths="fixed")
    common = dict(max_batch=64, gamma=4, check_invariants=True)
    always = run(A100, LLAMA_7B, LLAMA_68M, ServingConfig(**common), requests)
    never = run(A100, LLAMA_7B, LLAMA_68M, ServingConfig(**common, spec_off_above_batch=0), requests)
    sometimes = run(A100, LLAMA_7B, LLAMA_68M, ServingConfig(**common, spec_off_above_batch=8), requests)
    assert never["engine"]["speculative_steps"] == 0
    assert always["engine"]["speculative_steps"] > 0
    assert 0 < sometimes["engine"]["speculative_steps"] < sometimes["engine"]["steps"]
    assert never["engine"]["tokens_per_verify"] is None
    baseline = run(A100, LLAMA_7B, None, ServingConfig(max_batch=64, gamma=0), requests)
    # off, the draft still reads every token to keep its cache: never faster than no draft at all
    assert never["latency_s"]["tpot"]["mean"] > baseline["latency_s"]["tpot"]["mean"]


def test_chunked_prefill_splits_prompts_over_the_step_budget():
    """With chunking, a prompt longer than the step's token budget is prefilled over several steps
    beside the running decode; without chunking it is rejected, as vLLM does."""
    requests = [Request(0, 0.0, 16, 400)] + [Request(i, 0.5, 1500, 8) for i in range(1, 4)]
    cfg = dict(max_batched_tokens=256, gamma=0, check_invariants=True)
    chunked = run(A100, LLAMA_7B, None, ServingConfig(chunked_prefill=True, **cfg), requests)
    whole = run(A100, LLAMA_7B, None, ServingConfig(chunked_prefill=False, **cfg), requests)
    assert chunked["requests"]["completed"] == 4
    assert whole["requests"]["rejected_by_reason"]["prompt_exceeds_max_batched_tokens"]["count"] == 3
    assert chunked["batch"]["max"] == 4  # the decode kept running while the prompts were chunked
    # 4500 prompt tokens at most 255 a step beside the decode: the last first token waits for all of them
    assert chunked["latency_s"]["ttft"]["max"] > 2 * prefill_time_s(LLAMA_7B, A100, 1, 1500)


def test_prefill_apart_runs_chunks_in_steps_of_their_own():
    """SGLang's scheduling: prefill chunks take the whole step budget in steps of their own while
    the decodes wait. The long-running decode (one prefill step and 399 decode steps in both runs)
    sits out 4500 / 250 = 18 chunk-only steps (19 were the decode's token taken from the budget),
    where mixed steps carried 249 chunk tokens beside it: 18 steps more, its request done later,
    and the prompts' first tokens sooner."""
    requests = [Request(0, 0.0, 16, 400)] + [Request(i, 0.5, 1500, 8) for i in range(1, 4)]
    cfg = dict(max_batched_tokens=250, gamma=0, check_invariants=True, chunked_prefill=True)
    mixed = run(A100, LLAMA_7B, None, ServingConfig(**cfg), requests)
    apart = run(A100, LLAMA_7B, None, ServingConfig(prefill_apart=True, **cfg), requests)
    assert mixed["requests"]["completed"] == apart["requests"]["completed"] == 4
    assert mixed["engine"]["steps"] == 400 and apart["engine"]["steps"] == 400 + 4500 // 250
    assert apart["batch"]["max"] == 4  # the decode was admitted and kept, only paused
    assert apart["latency_s"]["e2e"]["max"] > mixed["latency_s"]["e2e"]["max"]
    assert apart["latency_s"]["ttft"]["max"] < mixed["latency_s"]["ttft"]["max"]
    with pytest.raises(UserError, match="--prefill-apart needs --chunked-prefill"):
        ServingConfig(prefill_apart=True, chunked_prefill=False).check()


def test_a_multi_step_call_keeps_an_arrival_waiting_to_its_end():
    """vLLM V0's --num-scheduler-steps 10: a request arriving during a call of 10 decode steps starts
    its prefill when the call ends, not when the step under way ends. Over arrivals spread evenly
    across one call, the extra wait is a whole number of decode steps, 0 to 9, and 4.5 on average."""
    extra = []
    for i in range(20):
        requests = [Request(0, 0.0, 16, 400), Request(1, 0.5 + i * 0.1 / 20, 16, 8)]
        one, ten = (run(A100, LLAMA_7B, None, ServingConfig(gamma=0, check_invariants=True, scheduler_steps=k), requests) for k in (1, 10))
        assert one["engine"]["steps"] == ten["engine"]["steps"] == 401  # the same steps, only the prefill's place differs
        step_s = one["latency_s"]["tpot"]["mean"]  # one sequence decoding: each of its steps (the second's few ride along)
        extra.append((ten["latency_s"]["ttft"]["max"] - one["latency_s"]["ttft"]["max"]) / step_s)
    extra = np.asarray(extra)
    assert np.all(np.abs(extra - extra.round()) < 0.1) and extra.min() > -0.1 and extra.max() < 9.1
    assert np.mean(extra) == pytest.approx(4.5, abs=0.3)
    # A request finishing inside a call ends the call's span there, but not the call: a request
    # arriving in step 22 of 30 (third call) still waits for step 30, not for the finish at step 24.
    pair = [Request(0, 0.0, 16, 400), Request(2, 0.0, 16, 25)]  # prefilled together; request 2's last decode step is 24
    base = run(A100, LLAMA_7B, None, ServingConfig(gamma=0), pair)
    prefill_s, step_s = base["latency_s"]["ttft"]["max"], base["latency_s"]["tpot"]["max"]
    late = [*pair, Request(1, prefill_s + 21.5 * step_s, 16, 8)]
    one, ten = (run(A100, LLAMA_7B, None, ServingConfig(gamma=0, check_invariants=True, scheduler_steps=k), late) for k in (1, 10))
    assert (ten["latency_s"]["ttft"]["max"] - one["latency_s"]["ttft"]["max"]) / step_s == pytest.approx(8.0, abs=0.5)
    with pytest.raises(UserError, match="--scheduler-steps must be >= 1"):
        ServingConfig(scheduler_steps=0).check()


def test_same_seed_same_result_and_seeds_matter():
    def once(seed):
        requests = poisson(300, 30.0, 200, 100, seed=seed)
        return run(A100, LLAMA_7B, LLAMA_68M, ServingConfig(), requests, seed=seed)

    assert once(5) == once(5)
    assert once(5) != once(6)


def test_shared_memos_do_not_change_a_result():
    """A run gives the same report whether this process priced its steps before (the memos that
    engines pricing alike share) or not, and whatever other runs filled them with meanwhile."""
    from simulator import serving

    def once(gamma=4, scale=1.0):
        requests = poisson(200, 25.0, 300, 80, seed=3)
        return simulate_serving(A100, LLAMA_7B, LLAMA_68M, AcceptanceModel(alpha=0.6), ServingConfig(gamma=gamma), requests,
                                np.random.default_rng(3), time_scale=scale)  # fmt: skip

    serving._shared_memos.clear()
    cold = once()
    once(gamma=2), once(scale=1.3)  # other entries in the memos
    assert once() == cold
    serving._shared_memos.clear()
    assert once() == cold


def test_a_requests_draws_follow_the_acceptance_law_and_are_its_own():
    """Each request draws its tokens per step when it starts decoding, from a pool whose draws
    past a request's last step go to the next request. Per-step tokens (the capped last step
    left out) follow the law: 2000 requests give ~130k steps, where a shift of 0.01 in one
    probability moves chi-square by ~50 against a critical value of 18.5 (df 4, p 0.001); and no
    two consecutive requests share their draws (a pool handing the same draws out again would
    make nearly every pair's first five steps equal; by chance it is ~0.3% of pairs). Mutants
    caught: uniforms scaled by 0.98 (the law), the unused draws all handed out again (sharing)."""
    from scipy.stats import chisquare

    env = simpy.Environment()
    acceptance = AcceptanceModel(alpha=0.6)
    engine = Engine(env, A100, LLAMA_7B, LLAMA_68M, acceptance, ServingConfig(gamma=4), np.random.default_rng(7))
    remaining = np.random.default_rng(8).integers(1, 300, size=2000)
    draws = [engine._draw_gains(int(r)) for r in remaining]
    assert all(g[-1] == r and np.all(np.diff(g) >= 1) and np.all(np.diff(g) <= 5) for g, r in zip(draws, remaining, strict=True))
    steps = np.concatenate([np.diff(g, prepend=0)[:-1] for g in draws])
    observed = np.bincount(steps - 1, minlength=5)
    assert steps.size > 100_000
    assert chisquare(observed, acceptance.pmf(4) * steps.size).pvalue > 1e-3
    firsts = [tuple(np.diff(g, prepend=0)[:5]) for g in draws if g.size > 5]
    shared = np.mean([a == b for a, b in zip(firsts[:-1], firsts[1:], strict=True)])
    assert shared < 0.02


def test_report_streams_into_fixed_size_summaries():
    """The report's size does not grow with the number of requests."""
    import json

    small = run(A100, LLAMA_7B, LLAMA_68M, ServingConfig(), poisson(50, 20.0, 100, 50))
    large = run(A100, LLAMA_7B, LLAMA_68M, ServingConfig(), poisson(5000, 20.0, 100, 50))
    assert len(large["timeline"]["start_s"]) <= Timeline.N_BUCKETS
    large.pop("timeline"), small.pop("timeline")
    assert len(json.dumps(large)) <= len(json.dumps(small)) * 1.2


def test_vocabulary_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="one vocabulary"):
        run(A100, load_model("llama-3-8b"), LLAMA_68M, ServingConfig(), [Request(0, 0.0, 10, 10)])
