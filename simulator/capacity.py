"""Capacity planning: the fewest GPUs that hold a request rate within a latency SLO.

The candidate space is a comprehension plus a predicate (STYLE 11): replicas x tensor-parallel
degree, a draft (none, each compatible built-in draft model, the target itself with layers
skipped), gamma and max batch size. A fast analytical screen from the cost model drops what
cannot work (memory for the weights and the batch's KV cache, a TTFT bound, a TPOT estimate,
decode throughput); the survivors are simulated with the SimPy serving engine of `serving.py`,
in parallel over the machine's cores or on Ray (`parallel.Runner`), each from a seed fixed by the candidate, so a search is
reproducible. The search goes up in GPU count and stops `extra_gpu_counts` GPU counts after the
first one at which a candidate meets the SLO.

Load balancing: requests go to replicas at random. Splitting a Poisson stream of rate lambda
at random over r replicas gives r independent Poisson streams of rate lambda / r, so one replica
is simulated at rate / replicas and its latencies are the cluster's. A router that balances
load (least outstanding requests) does better than random; the plan is conservative there.

Ranking: meets the SLO, fewest GPUs, then cost. Cost is stated as the GPU count and as
GPU-seconds per million output tokens (provisioned GPUs x time over tokens); no prices, since
no cited source fixes one. At one offered load, candidates with the same GPU count cost about
the same, so cost is compared to two significant figures and ties go to the larger SLO margin.
"""

from __future__ import annotations

import bisect
import math
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict

from simulator.engine import DEFAULT_ENGINE, engine_overhead
from simulator.errors import UserError
from simulator.forward import kv_bytes_per_token, weight_bytes
from simulator.hardware import DTYPE_BYTES, HardwareProfile, load_profile
from simulator.models import BUILTIN_MODELS, ModelSpec, load_model
from simulator.plan import DEFAULT_ALPHA, format_provenance, kernel_model_of
from simulator.serving import (
    BLOCK_TOKENS,
    MEMORY_UTILIZATION,
    AcceptanceModel,
    PassCost,
    ServingConfig,
    check_pair,
    draft_tp,
    interval_scales,
    server_batching,
    simulate_serving,
    span,
)
from simulator.units import parse_duration_s
from simulator.workload import WorkloadSpec, make_stream

NO_DRAFT = "none"
LAYER_SKIP = "layer-skip"

TP_DEGREES = (1, 2, 4, 8)  # tensor parallelism inside one 8-GPU node, over the profile's interconnect
GAMMAS = (2, 4, 6)  # draft tokens per step
MAX_BATCHES = (16, 32, 64, 128, 256)  # 256: vLLM's default max_num_seqs
# Self-speculative decoding drafts with the target's own layers, skipping some (Zhang et al. 2023,
# "Draft & Verify"; Elhoushi et al. 2024, "LayerSkip"). Keeping half of them is an assumption.
LAYER_SKIP_FRACTION = 0.5
# A draft model is worth trying only if it is much cheaper than the target (an assumption: a
# quarter of the parameters; same vocabulary size is required, see `compatible_draft`).
DRAFT_PARAMS_FRACTION_MAX = 0.25
DEFAULT_MAX_GPUS = 16  # two 8-GPU nodes
# Simulated requests per replica: p99 is then about the 10th worst. A finite run cannot tell a load
# a few percent over capacity from one under it (the queue has little time to grow); the screen's
# utilisation bound and the TTFT SLO catch the rest.
DEFAULT_REQUESTS = 1000
EXTRA_GPU_COUNTS = 1  # GPU counts simulated past the first that meets the SLO (for the trade-off)
MAX_SIMULATIONS = 240  # a bound on one search's simulations
DEFAULT_PLOT_DIR = "capacity_plots"


class CapacityQuery(BaseModel):
    """What the planner is asked: a model on a GPU type under a Poisson request rate, within
    p99 SLOs on time to first token and time per output token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hw: HardwareProfile
    target: ModelSpec
    rate_per_s: float
    prompt_tokens: int = 1024
    output_tokens: int = 256
    slo_ttft_p99_s: float
    slo_tpot_p99_s: float
    max_gpus: int = DEFAULT_MAX_GPUS
    alpha: float = DEFAULT_ALPHA  # assumed acceptance rate of every draft
    dtype: str = "fp16"
    requests: int = DEFAULT_REQUESTS
    seed: int = 0
    engine: str = DEFAULT_ENGINE  # its host overheads and its server's batching in the simulations (simulator.engine)

    def check(self) -> CapacityQuery:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise UserError(f"--rate must be a finite number of requests per second > 0, got {self.rate_per_s}")
        for flag, value in (("--slo-ttft-p99", self.slo_ttft_p99_s), ("--slo-tpot-p99", self.slo_tpot_p99_s)):
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"{flag} must be a positive duration, got {value}")
        if self.prompt_tokens < 1:
            raise UserError(f"--prompt-len must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise UserError(f"--output-len must be >= 1, got {self.output_tokens}")
        if self.max_gpus < 1:
            raise UserError(f"--max-gpus must be >= 1, got {self.max_gpus}")
        engine_overhead(self.engine)  # a known preset, with its fitted coefficients
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.requests < 1:
            raise UserError(f"--requests must be >= 1, got {self.requests}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.dtype not in DTYPE_BYTES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.prompt_tokens + self.output_tokens > self.target.max_seq_len:
            raise UserError(
                f"prompt {self.prompt_tokens} + output {self.output_tokens} tokens exceed {self.target.name}'s "
                f"context of {self.target.max_seq_len} tokens"
            )
        return self


def build_query(
    gpu: str,
    model: str,
    rate_per_s: float | None,
    slo_ttft_p99: str | None,
    slo_tpot_p99: str | None,
    prompt_tokens: int = 1024,
    output_tokens: int = 256,
    max_gpus: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    dtype: str = "fp16",
    requests: int | None = None,
    seed: int | None = None,
    engine: str | None = None,
) -> CapacityQuery:
    """A checked query from command-line values; SLOs are durations such as `2s`, `50ms`, `0.05`."""
    missing = [flag for flag, v in (("--rate", rate_per_s), ("--slo-ttft-p99", slo_ttft_p99), ("--slo-tpot-p99", slo_tpot_p99)) if v is None]
    if missing:
        # Both SLOs: without a TTFT bound an overloaded engine, whose queue grows without end, could pass on TPOT alone.
        raise UserError(f"a capacity search needs --rate, --slo-ttft-p99 and --slo-tpot-p99; missing {', '.join(missing)}")
    return CapacityQuery(
        hw=load_profile(gpu),
        target=load_model(model),
        rate_per_s=rate_per_s,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        slo_ttft_p99_s=parse_duration_s(slo_ttft_p99, "--slo-ttft-p99"),
        slo_tpot_p99_s=parse_duration_s(slo_tpot_p99, "--slo-tpot-p99"),
        max_gpus=DEFAULT_MAX_GPUS if max_gpus is None else max_gpus,
        alpha=alpha,
        dtype=dtype,
        requests=DEFAULT_REQUESTS if requests is None else requests,
        seed=0 if seed is None else seed,
        engine=DEFAULT_ENGINE if engine is None else engine.strip().lower(),
    ).check()


class Candidate(NamedTuple):
    """One deployment: `replicas` engines of `tp` GPUs each, speculating with `draft` (a draft
    model's name, NO_DRAFT or LAYER_SKIP) `gamma` tokens per step, at most `max_batch` sequences."""

    replicas: int
    tp: int
    draft: str
    gamma: int
    max_batch: int

    @property
    def gpus(self) -> int:
        return self.replicas * self.tp

    @property
    def label(self) -> str:
        spec = "no draft" if self.draft == NO_DRAFT else f"{self.draft} g{self.gamma}"
        return f"{self.replicas}xTP{self.tp} {spec} mb{self.max_batch}"


# ---------------------------------------------------------------------------------------------
# The space


# Tokenizers of the built-in models: the same vocabulary size is not the same vocabulary (Mistral-7B
# and Llama-2 both have 32000 tokens). Llama 2 uses "the same tokenizer as Llama 1" (Touvron et al.
# 2023), which llama-68m was trained with (SpecInfer) and TinyLlama adopts ("the same architecture
# and tokenizer as Llama 2", its README); Llama 3.2 keeps Llama 3's 128256-token tokenizer.
TOKENIZER = {
    "llama-2-7b": "llama", "llama-2-13b": "llama", "llama-2-70b": "llama", "llama-68m": "llama", "tinyllama-1.1b": "llama",
    "llama-3-8b": "llama-3", "llama-3-70b": "llama-3", "llama-3.2-1b": "llama-3", "mistral-7b": "mistral",
}  # fmt: skip


def compatible_draft(target: ModelSpec, draft: ModelSpec) -> bool:
    """One tokenizer (by TOKENIZER where both are known, else the same vocabulary size) and at most
    DRAFT_PARAMS_FRACTION_MAX of the target's parameters."""
    if target.name in TOKENIZER and draft.name in TOKENIZER:
        same_tokens = TOKENIZER[target.name] == TOKENIZER[draft.name]
    else:
        same_tokens = draft.vocab_size == target.vocab_size
    return same_tokens and draft.n_params <= DRAFT_PARAMS_FRACTION_MAX * target.n_params


def layer_skip_draft(target: ModelSpec, fraction: float = LAYER_SKIP_FRACTION) -> ModelSpec:
    """The target with `fraction` of its layers: the self-speculative draft (as batching.draft_step_time_s)."""
    layers = max(1, round(target.n_layers * fraction))
    return target.model_copy(update={"n_layers": layers, "name": f"{target.name}-{LAYER_SKIP}"})


def draft_models(target: ModelSpec, names: Sequence[str] | None = None) -> dict[str, ModelSpec | None]:
    """Draft choices by name: NO_DRAFT, every compatible built-in draft model and LAYER_SKIP, or
    those `names` (a model name or config.json, NO_DRAFT, LAYER_SKIP)."""
    if names is None:
        names = [NO_DRAFT, *(m.name for m in BUILTIN_MODELS.values() if compatible_draft(target, m)), LAYER_SKIP]
    drafts: dict[str, ModelSpec | None] = {}
    for name in names:
        if name == NO_DRAFT:
            drafts[name] = None
        elif name == LAYER_SKIP:
            drafts[name] = layer_skip_draft(target)
        else:
            model = load_model(name)
            check_pair(target, model)
            drafts[model.name] = model
    return drafts


def tp_fits(model: ModelSpec, tp: int) -> bool:
    """The tensor-parallel degree splits the heads and the MLP evenly (forward.check_tp)."""
    return model.n_heads % tp == 0 and model.d_ff % tp == 0


def candidate_space(
    target: ModelSpec,
    drafts: Iterable[str],
    max_gpus: int,
    tp_degrees: Sequence[int] = TP_DEGREES,
    gammas: Sequence[int] = GAMMAS,
    max_batches: Sequence[int] = MAX_BATCHES,
) -> list[Candidate]:
    """Every deployment of at most `max_gpus` GPUs (the comprehension; `screen` is the predicate)."""
    drafts = list(drafts)
    return [
        Candidate(replicas, tp, draft, gamma, max_batch)
        for tp in tp_degrees
        if tp_fits(target, tp)
        for replicas in range(1, max_gpus // tp + 1)
        for draft in drafts
        for gamma in ((0,) if draft == NO_DRAFT else [g for g in gammas if g >= 1])
        for max_batch in max_batches
    ]


# ---------------------------------------------------------------------------------------------
# The analytical screen


class Screen(NamedTuple):
    """The cost model's verdict on one candidate. `ratios`: need / limit per constraint (above 1
    fails); `reason`: the worst failing constraint, 'redundant', or None when it passes."""

    passes: bool
    reason: str | None
    ratio: float
    ratios: dict[str, float]
    memory_bytes_per_gpu: float
    usable_bytes_per_gpu: float
    prefill_s: float
    tpot_estimate_s: float | None
    expected_batch: int | None


class _Costs:
    """PassCost per (model, tp): the step times the serving engine charges, memoised."""

    def __init__(self, hw: HardwareProfile, dtype: str):
        self.hw, self.dtype = hw, dtype
        self._by: dict[tuple[str, int, int], PassCost] = {}

    def __call__(self, model: ModelSpec, tp: int) -> PassCost:
        key = (model.name, model.n_layers, tp)
        if key not in self._by:
            self._by[key] = PassCost(model, self.hw, self.dtype, tp)
        return self._by[key]


def batch_headroom(expected_batch: float) -> float:
    """A max batch this large almost never binds: with Poisson arrivals the number of running
    sequences is about Poisson around its mean (M/G/inf), and B + 4 sqrt(B) lies past its 99.99th
    percentile; twice the mean covers the slow drift of a busy period."""
    return max(2.0 * expected_batch, expected_batch + 4.0 * math.sqrt(expected_batch))


def screen(
    c: Candidate,
    query: CapacityQuery,
    drafts: dict[str, ModelSpec | None],
    costs: _Costs,
    max_batches: Sequence[int] = MAX_BATCHES,
) -> Screen:
    """Memory fit, a TTFT lower bound, a mean-field TPOT estimate and decode throughput of one
    replica at rate / replicas, priced as the serving engine prices steps.

    Decode: prefill steps take the fraction u = lambda t_prefill of the time (prompts are prefilled
    in steps of their own); a batch of B decoding sequences emits B E / t_step(B) tokens/s in the
    rest, E = (1 - alpha^(gamma+1)) / (1 - alpha) tokens per step. The expected batch B* is the
    smallest that carries lambda x output tokens/s, and TPOT ~ t_step(B*) / (E (1 - u))."""
    target, draft = query.target, drafts[c.draft]
    separate = draft is not None and c.draft != LAYER_SKIP  # a layer-skip draft is the target's own weights and cache
    dtp = draft_tp(draft, c.tp) if draft is not None else 1
    p, o, dtype = query.prompt_tokens, query.output_tokens, query.dtype

    # [bytes per GPU] weights, and the KV cache of max_batch requests at full length plus lookahead
    weights = weight_bytes(target, dtype, c.tp) + (weight_bytes(draft, dtype, dtp) if separate else 0)
    kv_per_token = kv_bytes_per_token(target, dtype, c.tp) + (kv_bytes_per_token(draft, dtype, dtp) if separate else 0)
    blocks_per_request = -(-(p + o + c.gamma) // BLOCK_TOKENS)  # (p + o - 1) + (gamma + 1) entries
    memory = weights + c.max_batch * blocks_per_request * BLOCK_TOKENS * kv_per_token
    usable = query.hw.memory_bytes * MEMORY_UTILIZATION
    ratios = {"memory": memory / usable}

    t_cost = costs(target, c.tp)
    d_cost = costs(draft, dtp) if draft is not None else None
    # one prompt through the target (and the draft, which the engine runs over the prompt too)
    prefill_s = float(t_cost.uniform_s(1, p, 0, logits_tokens=1) + (d_cost.uniform_s(1, p, 0, logits_tokens=1) if d_cost else 0.0))
    ratios["ttft"] = prefill_s / query.slo_ttft_p99_s

    lam = query.rate_per_s / c.replicas
    tokens_per_step = AcceptanceModel(alpha=query.alpha).mean_tokens(c.gamma) if d_cost else 1.0
    ctx = p + o // 2  # mean context while decoding

    def step_s(b: int) -> float:
        if d_cost is None:
            return float(t_cost.uniform_s(b, 1, b * ctx))
        drafting = sum(float(d_cost.uniform_s(b, 1, b * (ctx + j))) for j in range(c.gamma))
        return drafting + float(t_cost.uniform_s(b, c.gamma + 1, b * ctx))

    prefill_share = lam * prefill_s
    # utilisation at max batch: prefill time plus decode time per second of arrivals
    ratios["throughput"] = prefill_share + lam * o * step_s(c.max_batch) / (c.max_batch * tokens_per_step)
    expected_batch = tpot_s = None
    if ratios["throughput"] <= 1.0:
        need = lam * o

        def carries(b: int) -> bool:
            return b * tokens_per_step / step_s(b) * (1.0 - prefill_share) >= need

        # carries(max_batch) holds and carries is monotone: the smallest batch that carries the load
        lo = 1 + bisect.bisect_left(range(1, c.max_batch + 1), True, key=carries)
        expected_batch = lo
        tpot_s = step_s(lo) / (tokens_per_step * (1.0 - prefill_share))
        ratios["tpot"] = tpot_s / query.slo_tpot_p99_s
    else:
        ratios["tpot"] = step_s(c.max_batch) / tokens_per_step / query.slo_tpot_p99_s  # at best, before queueing

    worst = max(ratios, key=ratios.get)
    reason = worst if ratios[worst] > 1.0 else None
    if reason is None and any(m < c.max_batch and m >= batch_headroom(expected_batch) for m in max_batches):
        reason = "redundant"  # a smaller max batch already never binds: same engine, less memory
    return Screen(reason is None, reason, ratios[worst], ratios, memory, usable, prefill_s, tpot_s, expected_batch)


# ---------------------------------------------------------------------------------------------
# Simulation


def simulated_device(hw: HardwareProfile, target: ModelSpec, draft: ModelSpec | None, cfg: ServingConfig) -> HardwareProfile:
    """The device the serving engine is given for a layer-skip draft.

    `serving.kv_cache_blocks` charges a draft its own weights and KV cache; a layer-skip draft is
    the target itself and has neither. The engine is given a device with exactly that much more
    memory, so its KV cache holds the blocks the target alone would get. (The engine still runs
    the draft over each prompt, so TTFT of layer-skip candidates is pessimistic by up to
    LAYER_SKIP_FRACTION of a prefill.)"""
    if draft is None:
        return hw
    tp, dtp, dtype = cfg.tp, draft_tp(draft, cfg.tp), cfg.dtype
    usable = hw.memory_bytes * cfg.memory_utilization
    w_target = weight_bytes(target, dtype, tp)
    block_target = cfg.block_tokens * kv_bytes_per_token(target, dtype, tp)
    block_both = block_target + cfg.block_tokens * kv_bytes_per_token(draft, dtype, dtp)
    blocks = max(0, int((usable - w_target) // block_target))
    enlarged_usable = w_target + weight_bytes(draft, dtype, dtp) + (blocks + 0.5) * block_both
    return hw.model_copy(update={"memory_bytes": math.ceil(enlarged_usable / cfg.memory_utilization)})


def seeds(seed: int, c: Candidate) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """(workload, acceptance) seeds. Candidates with the same replica count see the same request
    stream (common random numbers: differences between them are the configuration's, not the
    draw's); acceptance draws are seeded by the candidate itself."""
    return np.random.SeedSequence([seed, c.replicas]), np.random.SeedSequence([seed, zlib.crc32(c.label.encode())])


def simulation_job(c: Candidate, query: CapacityQuery, drafts: dict[str, ModelSpec | None]) -> tuple:
    """Everything one simulation needs, picklable for a worker process."""
    draft = drafts[c.draft]
    server = server_batching(query.engine, query.hw)  # the engine's batching, the candidate's max batch
    chunked = server["chunked_prefill"]
    cfg = ServingConfig(
        max_batch=c.max_batch,
        # unchunked, a prompt longer than the token budget gets a budget of its own length
        max_batched_tokens=server["max_batched_tokens"] if chunked else max(server["max_batched_tokens"], query.prompt_tokens),
        chunked_prefill=chunked,
        prefill_apart=server["prefill_apart"],
        engine=engine_overhead(query.engine),
        gamma=c.gamma,
        dtype=query.dtype,
        tp=c.tp,
        slo_ttft_s=query.slo_ttft_p99_s,
        slo_tpot_s=query.slo_tpot_p99_s,
    )
    hw = simulated_device(query.hw, query.target, draft, cfg) if c.draft == LAYER_SKIP else query.hw
    workload = WorkloadSpec(
        rate_per_s=query.rate_per_s / c.replicas,
        requests=query.requests,
        prompt_tokens=query.prompt_tokens,
        output_tokens=query.output_tokens,
    )
    workload_seed, acceptance_seed = seeds(query.seed, c)
    return (hw, query.target, draft, AcceptanceModel(alpha=query.alpha), cfg, workload, workload_seed, acceptance_seed)


INTERVAL_FIGURES = ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p99_s")


def run_simulation(job: tuple) -> dict:
    """One replica through the serving engine: the figures the plan needs (runs in a worker), with
    each latency's 80% interval from two more runs at the ends of the device model's interval
    (`serving.interval_scales`; none on a device model without intervals)."""
    hw, target, draft, acceptance, cfg, workload, workload_seed, acceptance_seed = job

    def run(scale: float = 1.0) -> dict:
        requests = make_stream(workload, np.random.default_rng(workload_seed))
        return _figures(simulate_serving(hw, target, draft, acceptance, cfg, requests, np.random.default_rng(acceptance_seed), time_scale=scale))

    figures = run()
    scales = interval_scales(hw, target, cfg, figures["batch_mean"], workload.prompt_tokens + workload.output_tokens / 2)
    figures["intervals"] = {}
    if scales:
        fast, slow = run(scales[0]), run(scales[1])
        figures["intervals"] = {k: span(figures[k], fast[k], slow[k]) for k in INTERVAL_FIGURES if figures[k] is not None}
    return figures


def _figures(r: dict) -> dict:
    lat = r["latency_s"]
    return {
        "ttft_p50_s": lat["ttft"]["p50"],
        "ttft_p99_s": lat["ttft"]["p99"],
        "tpot_p50_s": lat["tpot"]["p50"],
        "tpot_p99_s": lat["tpot"]["p99"],
        "e2e_p99_s": lat["e2e"]["p99"],
        "output_tokens_per_s_per_replica": r["throughput"]["output_tokens_per_s"],
        "gpu_busy_fraction": r["gpu_busy_fraction"],
        "batch_mean": r["batch"]["mean"],
        "batch_max": r["batch"]["max"],
        "kv_peak_used_fraction": r["kv_cache"]["peak_used_fraction"],
        "completed": r["requests"]["completed"],
        "rejected": r["requests"]["rejected"],
        "preemptions": r["requests"]["preemptions"],
        "tokens_per_verify": r["engine"]["tokens_per_verify"],
        "simulated_s": r["duration_s"],
    }


def _two_figures(x: float) -> float:
    return float(f"{x:.2g}")


def candidate_row(c: Candidate, sim: dict, s: Screen, query: CapacityQuery) -> dict:
    """A simulated candidate: SLO verdict, the constraint closest to binding, cost."""
    ratios: dict[str, float] = {}
    if sim["rejected"]:
        ratios["rejections"] = 1.0 + sim["rejected"] / (sim["completed"] + sim["rejected"])
    for key, slo in (("ttft", query.slo_ttft_p99_s), ("tpot", query.slo_tpot_p99_s)):
        value = sim[f"{key}_p99_s"]
        if value is not None:
            ratios[key] = value / slo
    binding = max(ratios, key=ratios.get) if ratios else None
    ratio = ratios[binding] if binding else 0.0
    # the same verdict at the slow end of the 80% interval (every pass at the kernel model's high bound)
    iv = sim.get("intervals") or {}
    slow = {key: iv[f"{key}_p99_s"]["high"] / slo for key, slo in (("ttft", query.slo_ttft_p99_s), ("tpot", query.slo_tpot_p99_s))
            if f"{key}_p99_s" in iv}  # fmt: skip
    tokens_per_s = sim["output_tokens_per_s_per_replica"] * c.replicas
    gpu_s_per_mtok = c.gpus * 1e6 / tokens_per_s if tokens_per_s > 0 else None
    return {
        "label": c.label,
        "replicas": c.replicas,
        "tp": c.tp,
        "gpus": c.gpus,
        "draft": c.draft,
        "gamma": c.gamma,
        "max_batch": c.max_batch,
        "rate_per_replica_per_s": query.rate_per_s / c.replicas,
        "meets_slo": ratio <= 1.0,
        "binding": binding,
        "slo_ratio": ratio,
        "ratios": ratios,
        "meets_slo_at_interval_high": (ratio <= 1.0 and max(slow.values()) <= 1.0) if slow else None,
        **{k: v for k, v in sim.items() if k != "output_tokens_per_s_per_replica"},
        "output_tokens_per_s": tokens_per_s,
        "output_tokens_per_s_per_gpu": tokens_per_s / c.gpus,
        "gpu_s_per_million_output_tokens": gpu_s_per_mtok,
        "busy_gpu_s_per_million_output_tokens": None if gpu_s_per_mtok is None else gpu_s_per_mtok * sim["gpu_busy_fraction"],
        "screen": {"tpot_estimate_s": s.tpot_estimate_s, "prefill_s": s.prefill_s, "expected_batch": s.expected_batch,
                   "memory_bytes_per_gpu": s.memory_bytes_per_gpu},  # fmt: skip
    }


def rank_key(row: dict) -> tuple:
    """Meets the SLO, fewest GPUs, then cost (two significant figures), then SLO margin."""
    cost = row["gpu_s_per_million_output_tokens"]
    return (not row["meets_slo"], row["gpus"], _two_figures(cost) if cost else math.inf, row["slo_ratio"], row["label"])


def _run_all(jobs: dict[Candidate, tuple], runner, bar) -> dict[Candidate, dict]:
    """Simulate `jobs` on `runner` (an entered `parallel.Runner`)."""
    results: dict[Candidate, dict] = {}
    for c, result in runner.unordered(run_simulation, jobs):
        results[c] = result
        bar.update(1)
    return results


def search(
    query: CapacityQuery,
    drafts: Sequence[str] | None = None,
    tp_degrees: Sequence[int] = TP_DEGREES,
    gammas: Sequence[int] = GAMMAS,
    max_batches: Sequence[int] = MAX_BATCHES,
    max_workers: int | None = None,
    progress: bool = True,
    extra_gpu_counts: int = EXTRA_GPU_COUNTS,
    max_simulations: int = MAX_SIMULATIONS,
    runner=None,
) -> dict:
    """Screen the candidate space, simulate the survivors from the fewest GPUs up, rank; a report dict.
    `runner`: a `parallel.Runner` (not yet entered) to simulate on; default: `max_workers` local processes."""
    from tqdm import tqdm

    from simulator.parallel import Runner

    query.check()
    for name, values in (("gamma", gammas), ("max batch", max_batches), ("tensor-parallel degree", tp_degrees)):
        if not values or min(values) < (0 if name == "gamma" else 1):
            raise UserError(f"{name} choices must be non-empty and >= {0 if name == 'gamma' else 1}, got {list(values)}")
    draft_specs = draft_models(query.target, drafts)
    space = candidate_space(query.target, draft_specs, query.max_gpus, tp_degrees, gammas, max_batches)
    if not space:
        raise UserError(f"no tensor-parallel degree in {list(tp_degrees)} up to {query.max_gpus} GPUs divides {query.target.name}'s heads and MLP")
    costs = _Costs(query.hw, query.dtype)
    screens = {c: screen(c, query, draft_specs, costs, max_batches) for c in space}
    passed = sorted((c for c in space if screens[c].passes), key=lambda c: (c.gpus, screens[c].ratio, c.label))
    levels = sorted({c.gpus for c in passed})
    runner = runner or Runner(max_workers)

    results: dict[Candidate, dict] = {}
    last_level = None
    truncated = False
    bar = tqdm(total=0, desc="plan search", unit="sim", file=sys.stderr, mininterval=0.5, leave=False, disable=not progress)
    with bar, runner:
        for i, gpus in enumerate(levels):
            if last_level is not None and i > last_level:
                break
            level = [c for c in passed if c.gpus == gpus]
            room = max_simulations - len(results)
            if room < len(level):
                truncated = True
                level = level[:room]
            if not level:
                break
            bar.total += len(level)
            bar.refresh()
            done = _run_all({c: simulation_job(c, query, draft_specs) for c in level}, runner, bar)
            results.update(done)
            if last_level is None and any(candidate_row(c, r, screens[c], query)["meets_slo"] for c, r in done.items()):
                last_level = i + extra_gpu_counts

    rows = sorted((candidate_row(c, r, screens[c], query) for c, r in results.items()), key=rank_key)
    recommendation = rows[0] if rows and rows[0]["meets_slo"] else None
    closest = None if recommendation else _closest(rows, space, screens)
    report = {
        "mode": "search",
        "gpu": query.hw.name,
        "model": query.target.name,
        "dtype": query.dtype,
        "alpha": query.alpha,
        "rate_per_s": query.rate_per_s,
        "prompt_len": query.prompt_tokens,
        "output_len": query.output_tokens,
        "slo": {"ttft_p99_s": query.slo_ttft_p99_s, "tpot_p99_s": query.slo_tpot_p99_s},
        "max_gpus": query.max_gpus,
        "requests_per_replica": query.requests,
        "seed": query.seed,
        "engine": query.engine,
        "space": {
            "tp_degrees": [tp for tp in tp_degrees if tp_fits(query.target, tp) and tp <= query.max_gpus],
            "drafts": list(draft_specs),
            "gammas": list(gammas),
            "max_batches": list(max_batches),
            "layer_skip_fraction": LAYER_SKIP_FRACTION,
        },
        "candidates_total": len(space),
        "screened_out": dict(Counter(s.reason for s in screens.values() if not s.passes)),
        "passed_screen": len(passed),
        "simulated": len(results),
        "simulation_limit_reached": truncated,
        "candidates": rows,
        "recommendation": recommendation,
        "closest": closest,
        "binding_constraint": None if recommendation else (closest or {}).get("binding"),
        "speculation_stops_paying": _crossover(query, draft_specs, recommendation or closest, rows),
        "assumptions": assumptions(query, draft_specs),
        "kernel_model": kernel_model_of(query.hw),
    }
    report["verdict"] = verdict(report)
    return report


def assumptions(query: CapacityQuery, drafts: dict[str, ModelSpec | None]) -> list[str]:
    """What the plan takes for granted, in words, for the report."""
    notes = [
        f"acceptance rate alpha = {query.alpha:g} for every draft, an assumption: measure yours with `python -m reference specdec`",
        "requests are spread over replicas at random: each of r replicas sees a Poisson stream at rate / r, simulated once",
        "a draft model is split over the tensor-parallel group where its heads allow, else replicated on every GPU",
        f"the serving engine's defaults: {MEMORY_UTILIZATION:.0%} of device memory for weights and KV cache, "
        f"{BLOCK_TOKENS}-token KV blocks, "
        + ("no chunked prefill, kernels only (--engine ideal)" if query.engine == DEFAULT_ENGINE
           else f"{query.engine}'s host overheads and batching (`simulator.engine`), its max batch searched"),
        "cost is GPU count and GPU-seconds per million output tokens; no prices",
    ]
    if LAYER_SKIP in drafts:
        notes.append(
            f"layer-skip keeps {LAYER_SKIP_FRACTION:.0%} of the target's layers and shares its weights and KV cache; the engine "
            f"also runs it over each prompt, so its TTFT is pessimistic by up to {LAYER_SKIP_FRACTION:.0%} of a prefill"
        )
    return notes


def _closest(rows: list[dict], space: list[Candidate], screens: dict[Candidate, Screen]) -> dict | None:
    """The simulated candidate nearest its SLO, else the screened-out one nearest to passing."""
    if rows:
        return dict(min(rows, key=lambda r: (r["slo_ratio"], r["gpus"], r["label"])), source="simulation")
    failed = [c for c in space if screens[c].reason not in (None, "redundant")]
    if not failed:
        return None
    c = min(failed, key=lambda c: (screens[c].ratio, c.gpus, c.label))
    s = screens[c]
    return {
        "label": c.label, "replicas": c.replicas, "tp": c.tp, "gpus": c.gpus, "draft": c.draft, "gamma": c.gamma,
        "max_batch": c.max_batch, "binding": s.reason, "slo_ratio": s.ratio, "ratios": s.ratios,
        "memory_bytes_per_gpu": s.memory_bytes_per_gpu, "usable_bytes_per_gpu": s.usable_bytes_per_gpu,
        "prefill_s": s.prefill_s, "tpot_estimate_s": s.tpot_estimate_s, "source": "cost model",
    }  # fmt: skip


def _crossover(query: CapacityQuery, drafts: dict[str, ModelSpec | None], chosen: dict | None, rows: list[dict]) -> dict | None:
    """Where speculation stops paying for the draft and gamma of the chosen candidate (or of the
    best-ranked speculative one, or the first draft), on one GPU, from the cost model."""
    from simulator.batching import crossover_batch

    name, gamma = _plot_draft(drafts, chosen, rows)
    if name is None:
        return None
    ctx = query.prompt_tokens + query.output_tokens // 2
    batch = crossover_batch(query.target, drafts[name], query.hw, query.alpha, gamma, ctx, query.dtype)
    return {"draft": name, "gamma": gamma, "batch": batch, "context_len": ctx}


def _plot_draft(drafts: dict[str, ModelSpec | None], chosen: dict | None, rows: list[dict]) -> tuple[str | None, int]:
    if chosen and chosen["draft"] != NO_DRAFT:
        return chosen["draft"], chosen["gamma"]
    spec_rows = [r for r in rows if r["draft"] != NO_DRAFT]
    if spec_rows:
        return spec_rows[0]["draft"], spec_rows[0]["gamma"]
    names = [n for n in drafts if n != NO_DRAFT]
    return (names[0], GAMMAS[1]) if names else (None, 0)


# ---------------------------------------------------------------------------------------------
# Output


def _slo_text(report: dict) -> str:
    slo = report["slo"]
    return f"TTFT p99 <= {_ms(slo['ttft_p99_s'])} ms and TPOT p99 <= {_ms(slo['tpot_p99_s'])} ms"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.4g}" if x * 1e3 < 1e4 else f"{x * 1e3:.0f}"


def _deployment(row: dict, gpu: str) -> str:
    draft = "no draft" if row["draft"] == NO_DRAFT else f"draft {row['draft']}, gamma {row['gamma']}"
    replicas = f"{row['replicas']} replica{'s' if row['replicas'] > 1 else ''}"
    return f"{row['gpus']} x {gpu} ({replicas} x tensor parallel {row['tp']}), {draft}, max batch {row['max_batch']}"


_CONSTRAINT_NAME = {"memory": "memory", "ttft": "TTFT", "tpot": "TPOT", "throughput": "throughput", "rejections": "KV-cache size"}
_CONSTRAINT_WHY = {
    "memory": " (weights and the batch's KV cache do not fit)",
    "throughput": " (the GPUs cannot serve the offered output tokens/s)",
    "rejections": " (requests are rejected)",
}


def _closest_figures(closest: dict) -> str:
    binding = closest["binding"]
    if closest["source"] == "simulation":
        return (f"simulated TTFT p99 {_ms(closest['ttft_p99_s'])} ms, TPOT p99 {_ms(closest['tpot_p99_s'])} ms, "
                f"{closest['slo_ratio']:.2f}x the {binding.upper()} SLO")  # fmt: skip
    if binding == "memory":
        return f"cost model: needs {closest['memory_bytes_per_gpu'] / 1e9:.1f} GB per GPU of {closest['usable_bytes_per_gpu'] / 1e9:.1f} GB usable"
    if binding == "ttft":
        return f"cost model: prefill alone takes {_ms(closest['prefill_s'])} ms, {closest['slo_ratio']:.2f}x the TTFT SLO"
    if binding == "tpot":
        return f"cost model: TPOT about {_ms(closest['tpot_estimate_s'] or math.nan)} ms, {closest['slo_ratio']:.2f}x the TPOT SLO"
    return f"cost model: needs {closest['slo_ratio']:.2f}x the GPU time there is"


def verdict(report: dict) -> str:
    """One line: the recommendation, or which constraint binds and which configuration came closest."""
    gpu, rec = report["gpu"], report["recommendation"]
    if rec is not None:
        return f"{_deployment(rec, gpu)} meets {_slo_text(report)} at {report['rate_per_s']:g} requests/s"
    gpus = f"{report['max_gpus']} {gpu} GPU{'s' if report['max_gpus'] > 1 else ''}"
    head = f"no configuration of at most {gpus} meets {_slo_text(report)} at {report['rate_per_s']:g} requests/s"
    closest = report["closest"]
    if closest is None:
        return f"{head}: no candidate to try (every one is redundant)"
    failing = [k for k, v in sorted(closest["ratios"].items(), key=lambda kv: -kv[1]) if v > 1.0]
    also = [k for k in failing if k != closest["binding"]]
    why = f"{_CONSTRAINT_NAME[closest['binding']]} binds{_CONSTRAINT_WHY.get(closest['binding'], '')}"
    if also:
        why += f"; {' and '.join(_CONSTRAINT_NAME[k] for k in also)} fail{'s' if len(also) == 1 else ''} too"
    return f"{head}: {why}; closest: {_deployment(closest, gpu)} ({_closest_figures(closest)})"


def format_search(report: dict, top: int = 20) -> str:
    sp = report["space"]
    out = report["screened_out"]
    lines = [
        f"Capacity plan: {report['model']} on {report['gpu']} ({report['dtype']}), {report['rate_per_s']:g} requests/s, "
        f"prompt {report['prompt_len']}, output {report['output_len']} tokens",
        f"SLO: {_slo_text(report)}; at most {report['max_gpus']} GPUs",
        *([f"Kernels: {format_provenance(report['gpu'], report['kernel_model'])}"] if report.get("kernel_model") else []),
        f"Space: {report['candidates_total']} candidates: replicas x tensor parallel {', '.join(map(str, sp['tp_degrees']))}; "
        f"drafts {', '.join(sp['drafts'])} (layer-skip keeps {sp['layer_skip_fraction']:.0%} of the layers); "
        f"gamma {', '.join(map(str, sp['gammas']))}; max batch {', '.join(map(str, sp['max_batches']))}",
        "Screen (cost model): " + (", ".join(f"{n} out on {k}" for k, n in sorted(out.items(), key=lambda kv: -kv[1])) or "none out")
        + f"; {report['passed_screen']} passed; {report['simulated']} simulated"
        + (" (simulation limit reached)" if report["simulation_limit_reached"] else "")
        + f", {report['requests_per_replica']} requests per replica, seed {report['seed']}",
        "Assumptions:",
        *(f"  - {note}" for note in report["assumptions"]),
    ]
    rows = report["candidates"]
    if rows:
        head = (f"{'rank':>4}  {'GPUs':>4}  {'repl x TP':>9}  {'draft':<20} {'gamma':>5} {'max batch':>9}  {'SLO':<4} "
                f"{'TTFT p99 ms':>11} {'TPOT p99 ms':>11} {'e2e p99 s':>9} {'out tok/s':>9} {'tok/s/GPU':>9} "
                f"{'GPU-s/Mtok':>10} {'busy':>5}")  # fmt: skip
        lines += ["", head]
        for i, r in enumerate(rows[:top], 1):
            cost = r["gpu_s_per_million_output_tokens"]
            lines.append(
                f"{i:>4}  {r['gpus']:>4}  {r['replicas']:>4} x {r['tp']:<2}  {r['draft']:<20} {r['gamma']:>5} {r['max_batch']:>9}  "
                f"{'yes' if r['meets_slo'] else 'no':<4} {_ms(r['ttft_p99_s']):>11} {_ms(r['tpot_p99_s']):>11} "
                f"{(r['e2e_p99_s'] or math.nan):>9.2f} {r['output_tokens_per_s']:>9.0f} {r['output_tokens_per_s_per_gpu']:>9.0f} "
                f"{(cost or math.nan):>10.0f} {r['gpu_busy_fraction']:>5.0%}"
            )
        if len(rows) > top:
            lines.append(f"  ... {len(rows) - top} more in --json")
    rec = report["recommendation"]
    lines.append("")
    if rec:
        lines += [
            f"Recommendation: {_deployment(rec, report['gpu'])}",
            f"  predicted (one replica at {rec['rate_per_replica_per_s']:.3g} requests/s): TTFT p50 / p99 {_ms(rec['ttft_p50_s'])} / "
            f"{_ms(rec['ttft_p99_s'])} ms, TPOT p50 / p99 {_ms(rec['tpot_p50_s'])} / {_ms(rec['tpot_p99_s'])} ms, "
            f"end-to-end p99 {rec['e2e_p99_s']:.2f} s",
            *(["  80% intervals: " + ", ".join(f"{label} {_ms(iv[k]['low'])}-{_ms(iv[k]['high'])} ms" for k, label in
                (("ttft_p50_s", "TTFT p50"), ("ttft_p99_s", "TTFT p99"), ("tpot_p50_s", "TPOT p50"), ("tpot_p99_s", "TPOT p99")) if k in iv)]
              if (iv := rec.get("intervals")) else []),  # fmt: skip
            *([f"  at the slow end of those intervals it {'still meets' if rec['meets_slo_at_interval_high'] else 'misses'} the SLO"
               + ("" if rec["meets_slo_at_interval_high"] else " (GPUs slower than predicted would need more replicas)")]
              if rec.get("meets_slo_at_interval_high") is not None else []),  # fmt: skip
            f"  {rec['output_tokens_per_s']:.0f} output tokens/s ({rec['output_tokens_per_s_per_gpu']:.0f} per GPU), "
            f"GPU busy {rec['gpu_busy_fraction']:.0%}, mean batch {rec['batch_mean']:.1f}, KV cache peak {rec['kv_peak_used_fraction']:.0%}"
            + (f", {rec['tokens_per_verify']:.2f} tokens per verify" if rec["tokens_per_verify"] else ""),
            f"  cost: {rec['gpus']} GPU{'s' if rec['gpus'] > 1 else ''}; {rec['gpu_s_per_million_output_tokens']:.0f} GPU-seconds per million output tokens "
            f"({rec['busy_gpu_s_per_million_output_tokens']:.0f} of them busy)",
        ]
    else:
        lines.append("No recommendation: " + report["verdict"])
    cross = report["speculation_stops_paying"]
    if cross:
        where = f"stops paying above batch {cross['batch'] - 1}" if cross["batch"] else "still pays at batch 4096"
        lines.append(f"Speculation with {cross['draft']} at gamma {cross['gamma']} {where} "
                     f"(cost model, one GPU, context {cross['context_len']}; see verify_roofline.png)")  # fmt: skip
    for path in report.get("plots", []):
        lines.append(f"Plot: {path}")
    return "\n".join(lines)


def plot_jobs(report: dict, query: CapacityQuery, plot_dir: str | Path, drafts: Sequence[str] | None = None) -> list[tuple[str, Callable[[], Path]]]:
    """The plots of a search, as (path, draw) pairs, so that their paths can be reported before any is
    drawn: throughput per GPU vs p99 TPOT (Pareto front marked), speedup over gamma and alpha, and the
    verify pass's roofline with speedup over batch. `drafts`: as given to `search`."""
    from simulator import plots

    plot_dir = Path(plot_dir)
    drafts = draft_models(query.target, drafts)
    chosen = report["recommendation"] or report["closest"]
    jobs = []
    points = [
        {"label": r["label"], "meets_slo": r["meets_slo"], "binding": r["binding"], "output_tokens_per_s_per_gpu": r["output_tokens_per_s_per_gpu"],
         "tpot_p99_ms": r["tpot_p99_s"] * 1e3}
        for r in report["candidates"] if r["tpot_p99_s"] is not None
    ]  # fmt: skip
    if points:
        path = plot_dir / "pareto_throughput_vs_p99_tpot.png"
        recommended = report["recommendation"]["label"] if report["recommendation"] else None
        jobs.append((str(path), lambda: plots.plot_pareto(path, points, "output_tokens_per_s_per_gpu", "tpot_p99_ms",
                                                          f"{query.target.name} on {query.hw.name} at {query.rate_per_s:g} requests/s",
                                                          slo=query.slo_tpot_p99_s * 1e3, chosen=recommended)))  # fmt: skip
    name, gamma = _plot_draft(drafts, chosen, report["candidates"])
    if name is not None:
        ctx = query.prompt_tokens + query.output_tokens // 2
        batch = max(1, round(chosen["batch_mean"])) if chosen and chosen.get("batch_mean") else 1
        speedup, roofline = plot_dir / "speedup_over_gamma_and_alpha.png", plot_dir / "verify_roofline.png"
        jobs.append((str(speedup), lambda: plots.plot_speedup_over_gamma_and_alpha(speedup, query.hw, query.target, drafts[name], ctx, batch)))
        jobs.append((str(roofline), lambda: plots.plot_verify_roofline(roofline, query.hw, query.target, drafts[name], query.alpha, ctx,
                                                                        dtype=query.dtype)))  # fmt: skip
    return jobs
