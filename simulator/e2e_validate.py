"""End to end against real serving engines: simulate every published `bench serve` point
(`simulator.e2e`), fit the engines' host overheads (`simulator.engine`) to the fit rows, and report the
error on the held-out ones, beside the kernels-only simulation (`--engine ideal`).

A row becomes a simulation (`row_setup`):
- the row's GPU profile, model spec, TP and dtype; requests as the client sent them: Poisson at the
  row's rate, every request at once (rate inf), or closed loop with `max_concurrency` users;
- lengths: a `random` row's fixed input and output lengths (the client's default range ratio 0); a
  ShareGPT row's mean prompt and output lengths are its own printed totals / num_prompts where it printed
  them, else the pooled totals of every ShareGPT row that did (`sharegpt_means`), drawn as
  `workload.WorkloadSpec(lengths="sharegpt")` draws them: prompts uniform on [1, 2 n - 1], outputs of the
  long-tailed law whose median over mean the light-load rows show (`sharegpt_output_median_ratio`);
- requests: num_prompts, at most `max_requests` for open-loop and closed-loop rows (their latencies are
  steady-state figures), at most `MAX_AT_ONCE` for an all-at-once row (every prompt of the rows here:
  its TTFT is the time to drain the queue, and its throughput ends with the longest outputs decoding
  on their own, which a part of the burst would not hold in proportion);
  a closed-loop row without num_prompts sends `CLOSED_LOOP_REQUESTS_PER_USER` per user;
- the engine's scheduler limits (`scheduler_limits`), from each engine's documented defaults, and the
  row's `num_scheduler_steps` (decode steps per scheduler call) where its server set one.

Scored metrics: TTFT (median where printed, else mean), TPOT (median, else mean, else the median ITL,
which equals TPOT when every streamed chunk holds one token), output tokens/s. APE = |pred - meas| / meas.

The fit (`fit_engines`): per engine, Levenberg-Marquardt on the log errors of every scored metric of the
engine's fit rows and a weak prior on each coefficient (`PRIOR_WEIGHT`), the simulation in the loop
(forward differences), coefficients kept >= 0, each run to convergence (`FIT_TOLERANCE`), from several
starts (`FIT_STARTS`, from zero with an active set as well, and from the shipped preset where
`engine_fitted.json` has one); the lowest objective is kept (`fit_engine`). The objective is a simulation
with TTFT terms that trade against each other, so runs stop at different local optima; starting one
from the shipped coefficients means a refit after a change elsewhere (the kernel model) ends no higher
than where they already sit. The runs are independent: `fit_engines` spreads every engine's over the machine's cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator import e2e
from simulator.engine import (
    FITTED_PATH,
    GRAPH_MAX_BATCH,
    IDEAL,
    TENSORRT_LLM_SCHEDULER,
    EngineOverhead,
    engine_overhead,
    load_fitted,
    scheduler_defaults,
)
from simulator.errors import UserError
from simulator.serving import AcceptanceModel, ServingConfig, simulate_serving
from simulator.units import release
from simulator.workload import WorkloadSpec, make_stream

DEFAULT_MAX_REQUESTS = 200  # per open- or closed-loop row: enough for steady-state medians, fast on 2 cores
MAX_AT_ONCE = 5000  # requests of an all-at-once row: its TTFT grows with the queue and its tail with the burst, so up to here every prompt
CLOSED_LOOP_REQUESTS_PER_USER = 10
LIGHT_LOAD_REQUESTS = 20  # requests one user sends one after another in the light-load probe (`light_load_gap_pct`)
SEED = 0
METRICS = ("ttft", "tpot", "throughput")

# Fitted coefficients, their scales (the size of a forward-difference step and of the damping) and units.
FIT_PARAMS = ("step_s", "step_s_per_sequence", "step_s_per_token", "eager_s_per_layer", "request_s", "request_s_per_prompt_token", "request_latency_s")
PARAM_SCALE = np.array([1e-3, 1e-5, 1e-6, 1e-5, 1e-3, 1e-5, 1e-3])
FIT_ITERATIONS = 30  # at most; a run stops once an iteration improves its objective by less than FIT_TOLERANCE
FIT_TOLERANCE = 1e-3
# Each coefficient also pays PRIOR_WEIGHT x (coefficient / its scale): with 3-6 fit rows an engine's seven
# coefficients are underdetermined, and this settles the directions the rows do not see (a coefficient at
# ten times its scale costs what a 1% error on one metric does) without moving what they do.
PRIOR_WEIGHT = 1e-3
# Where the runs start, in units of PARAM_SCALE (FIT_PARAMS order): kernels only, then each family of terms
# alone explaining the host time (the request path, the per-step work, the per-token work). The fit's
# objective has several basins; the lowest of the runs' optima is kept.
FIT_STARTS = (
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 5.0),
    (1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 20.0, 0.0, 0.0, 2.0, 0.0),
)
LM_TRIES = 6  # damping increases (x10) tried before an iteration gives up


@dataclass(frozen=True)
class Setup:
    """What one published row becomes: its workload and engine limits (before the engine overhead)."""

    workload: WorkloadSpec
    serving: ServingConfig
    lengths: str  # where the lengths came from


def sharegpt_output_median_ratio(rows: list[e2e.ServingResult]) -> float | None:
    """ShareGPT's median output over its mean output, as the rows show it (None: they do not): the
    median output of each open-loop ShareGPT row that prints its median end-to-end latency and its
    scored TTFT and TPOT (`measured`), (e2el - TTFT) / TPOT + 1 (a request's latency is its first
    token and one TPOT per token after it), over the rows' mean output (`sharegpt_means`); the median
    of those rows. `workload.SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN` is its value on the shipped file."""
    means = sharegpt_means(rows)
    medians = []
    for r in rows:
        if r.dataset != "sharegpt" or not math.isfinite(r.request_rate_per_s) or r.max_concurrency is not None or "e2el_median_ms" not in r.metrics:
            continue
        m = measured(r)
        if m["ttft"] and m["tpot"]:
            medians.append((r.metrics["e2el_median_ms"] / 1e3 - m["ttft"]) / m["tpot"] + 1.0)
    if means is None or not medians:
        return None
    return float(np.median(medians)) / means[1]


def sharegpt_means(rows: list[e2e.ServingResult]) -> tuple[float, float] | None:
    """(prompt, output) tokens per ShareGPT request, pooled over the rows that printed their totals (None: none did)."""
    printed = [r for r in rows if r.dataset == "sharegpt" and r.total_input_tokens and r.total_output_tokens and r.num_prompts]
    if not printed:
        return None
    prompts = sum(r.num_prompts for r in printed)
    return sum(r.total_input_tokens for r in printed) / prompts, sum(r.total_output_tokens for r in printed) / prompts


def scheduler_limits(r: e2e.ServingResult) -> dict:
    """The row's engine's batching at its server's defaults: its preset's (`engine.scheduler_defaults`),
    or for TensorRT-LLM (trtllm-serve, no preset) max_batch_size 2048, max_num_tokens 8192, chunked prefill."""
    if r.engine == "tensorrt-llm":
        return dict(TENSORRT_LLM_SCHEDULER)
    return scheduler_defaults(preset_name(r), r.profile)


def row_setup(r: e2e.ServingResult, means: tuple[float, float] | None, max_requests: int = DEFAULT_MAX_REQUESTS) -> Setup:
    where = f"row {r.row} ({r.url})"
    if r.pp != 1 or r.dp != 1:
        raise UserError(f"{where}: pipeline or data parallelism (pp {r.pp}, dp {r.dp}) is not modelled; only tp")
    if r.dataset == "random":
        prompt, output, lengths, how = r.input_len, r.output_len, "fixed", "fixed (random dataset)"
    elif r.total_input_tokens and r.total_output_tokens and r.num_prompts:
        prompt, output = r.total_input_tokens / r.num_prompts, r.total_output_tokens / r.num_prompts
        lengths, how = "sharegpt", "ShareGPT's law, the row's own means"
    else:
        if means is None:
            raise UserError(f"{where}: a ShareGPT row without total_input_tokens and total_output_tokens needs another ShareGPT row "
                            "in the file that prints them (the mean lengths are taken from it)")
        prompt, output = means
        lengths, how = "sharegpt", "ShareGPT's law, pooled ShareGPT means"
    at_once = math.isinf(r.request_rate_per_s) and r.max_concurrency is None
    if r.num_prompts is None:
        requests = CLOSED_LOOP_REQUESTS_PER_USER * r.max_concurrency
    else:
        requests = r.num_prompts
    requests = min(requests, MAX_AT_ONCE if at_once else max_requests)
    workload = WorkloadSpec(rate_per_s=r.request_rate_per_s, requests=requests, prompt_tokens=max(1, round(prompt)),
                            output_tokens=max(1, round(output)), lengths=lengths, concurrency=r.max_concurrency).check()  # fmt: skip
    serving = ServingConfig(gamma=0, dtype=r.dtype, tp=r.tp, scheduler_steps=r.num_scheduler_steps or 1, **scheduler_limits(r)).check()
    return Setup(workload, serving, how)


def measured(r: e2e.ServingResult) -> dict[str, float | None]:
    """The row's scored figures in seconds and tokens/s (None where not printed)."""
    m = r.metrics
    ttft = m.get("ttft_median_ms", m.get("ttft_mean_ms"))
    tpot = m.get("tpot_median_ms", m.get("tpot_mean_ms", m.get("itl_median_ms")))
    return {"ttft": None if ttft is None else ttft / 1e3, "tpot": None if tpot is None else tpot / 1e3, "throughput": m.get("output_tok_per_s")}


def _served(r: e2e.ServingResult, workload: WorkloadSpec, serving: ServingConfig, engine: EngineOverhead) -> dict:
    """The simulation report of the row's GPU and model serving `workload` with `engine`."""
    cfg = serving.model_copy(update={"engine": engine})
    requests = make_stream(workload, np.random.default_rng(SEED))
    return simulate_serving(r.profile, r.spec, None, AcceptanceModel(), cfg, requests, np.random.default_rng(SEED), concurrency=workload.concurrency)


def predict(r: e2e.ServingResult, setup: Setup, engine: EngineOverhead) -> dict[str, float | None]:
    """The simulated figures of a row (median TTFT and TPOT where the row printed medians, else means)."""
    report = _served(r, setup.workload, setup.serving, engine)
    lat = report["latency_s"]
    m = r.metrics
    ttft_stat = "p50" if "ttft_median_ms" in m or "ttft_mean_ms" not in m else "mean"
    tpot_stat = "mean" if "tpot_median_ms" not in m and "tpot_mean_ms" in m else "p50"
    return {"ttft": lat["ttft"][ttft_stat], "tpot": lat["tpot"][tpot_stat], "throughput": report["throughput"]["output_tokens_per_s"]}


def light_load_gap_pct(r: e2e.ServingResult, setup: Setup, engine: EngineOverhead) -> float:
    """How far `engine` moves the row's median TPOT from kernels only at light load: its setup (GPU,
    model, TP, lengths, batching) served to one user, one request after another."""
    workload = setup.workload.model_copy(update={"rate_per_s": math.inf, "concurrency": 1, "requests": LIGHT_LOAD_REQUESTS}).check()
    with_engine, kernels_only = (_served(r, workload, setup.serving, e)["latency_s"]["tpot"]["p50"] for e in (engine, IDEAL))
    return abs(with_engine / kernels_only - 1.0) * 100.0


def preset_name(r: e2e.ServingResult) -> str:
    """The preset of the row's engine and version: `vllm-v0` for vLLM before 0.7 (its V0 engine),
    else the engine's name."""
    return "vllm-v0" if r.engine == "vllm" and release(r.engine_version) < (0, 7) else r.engine


def preset_for(r: e2e.ServingResult, engines: dict[str, EngineOverhead]) -> EngineOverhead:
    """The row's engine preset; an engine without one (TensorRT-LLM) runs kernels only."""
    return engines.get(preset_name(r), IDEAL)


# ---------------------------------------------------------------------------------------------
# Fit


def _with(base: EngineOverhead, theta: np.ndarray) -> EngineOverhead:
    values = {name: float(max(0.0, v)) for name, v in zip(FIT_PARAMS, theta, strict=True)}
    values["speculative_s_per_draft_pass"] = values["step_s"]  # a draft pass is one more engine pass: its fixed host time
    return base.model_copy(update=values)


def _log_errors(rows, setups, engine: EngineOverhead) -> np.ndarray:
    out = []
    for r, s in zip(rows, setups, strict=True):
        pred, meas = predict(r, s, engine), measured(r)
        out += [math.log(pred[k] / meas[k]) for k in METRICS if meas[k] is not None and pred[k]]
    return np.array(out)


def fit_engine(name: str, rows: list[e2e.ServingResult], setups: list[Setup], progress: Callable[[str], None] | None = None) -> EngineOverhead:
    """Levenberg-Marquardt on the log errors of `rows` (the engine's fit rows) and the prior
    (`_fit_residuals`) over FIT_PARAMS, from each of FIT_STARTS with plainly projected steps (a step is
    clipped at 0), from zero also with an active set (a coefficient at 0 whose gradient points below
    it is held there), and from the shipped preset (`_starts`), each to convergence; the runs stop at different local optima of a problem whose
    TTFT terms trade against each other, and the one with the lowest objective is kept."""
    starts = _starts(name)
    return _lowest(name, [_start_run(name, rows, setups, starts, i, progress) for i in range(len(starts))])


def _starts(name: str, fitted_path: Path = FITTED_PATH) -> list[tuple[np.ndarray, bool]]:
    """(x0 / PARAM_SCALE, active set) of each run of an engine's fit: FIT_STARTS, zero with an active
    set, then the engine's shipped coefficients where `fitted_path` has them."""
    starts = [(np.asarray(x0, dtype=float), False) for x0 in FIT_STARTS] + [(np.zeros(len(FIT_PARAMS)), True)]
    try:
        shipped = json.loads(fitted_path.read_text())["engines"][name]
        starts.append((np.asarray([float(shipped[p]) for p in FIT_PARAMS]) / PARAM_SCALE, False))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no shipped preset (a first fit, or a file of another layout): the fixed starts alone
    return starts


def _base(name: str) -> EngineOverhead:
    return EngineOverhead(name=name, graph_max_batch=GRAPH_MAX_BATCH[name])


def _start_run(name: str, rows, setups, starts: list[tuple[np.ndarray, bool]], i: int, progress) -> tuple[np.ndarray, float]:
    """Run `i` of the engine's fit from its `starts` (`_starts`)."""
    x0, active_set = starts[i]
    say = (lambda msg: progress(f"{msg} (run {i + 1} of {len(starts)})")) if progress else None
    return _levenberg_marquardt(name, rows, setups, _base(name), active_set, say, x0)


def _lowest(name: str, runs: list[tuple[np.ndarray, float]]) -> EngineOverhead:
    """The engine of the run with the lowest objective (the first of equals, in `_starts` order)."""
    x, _ = min(runs, key=lambda run: run[1])
    return _with(_base(name), x * PARAM_SCALE)


def _levenberg_marquardt(name, rows, setups, base: EngineOverhead, active_set: bool, progress, x0=None) -> tuple[np.ndarray, float]:
    """(coefficients / PARAM_SCALE, sum of squared residuals: log errors and the prior) of one run from
    `x0` (coefficients / PARAM_SCALE; default zero)."""
    x = np.zeros(len(FIT_PARAMS)) if x0 is None else np.asarray(x0, dtype=float).copy()  # theta / PARAM_SCALE

    def residuals(x):
        return _fit_residuals(rows, setups, base, x)

    res = residuals(x)
    lam = 1e-2
    for it in range(FIT_ITERATIONS):
        jac = np.empty((res.size, x.size))
        for j in range(x.size):
            step = np.zeros_like(x)
            step[j] = 0.5
            jac[:, j] = (residuals(x + step) - res) / 0.5
        grad = jac.T @ res
        free = (x > 0) | (grad < 0) if active_set else np.ones(x.size, dtype=bool)
        if not free.any():
            break
        jf = jac[:, free]
        improved = False
        for _ in range(LM_TRIES):
            a = jf.T @ jf + lam * np.diag(np.diag(jf.T @ jf) + 1e-9)
            x_new = x.copy()
            x_new[free] = np.maximum(x[free] - np.linalg.solve(a, grad[free]), 0.0)
            res_new = residuals(x_new)
            if res_new @ res_new < res @ res:
                gain = 1.0 - (res_new @ res_new) / (res @ res)
                x, res, lam, improved = x_new, res_new, lam / 3, True
                break
            lam *= 10
        if progress:
            kind = "active set" if active_set else "projected"
            progress(f"fit {name} ({kind}): iteration {it + 1}, rms residual {math.sqrt(res @ res / res.size):.3f}")
        if not improved or gain < FIT_TOLERANCE:
            break
    return x, float(res @ res)


def _fit_residuals(rows, setups, base: EngineOverhead, x: np.ndarray) -> np.ndarray:
    """What the fit minimises the squares of: every scored metric's log error on the rows, then
    PRIOR_WEIGHT x each coefficient / its scale (x = theta / PARAM_SCALE)."""
    return np.concatenate([_log_errors(rows, setups, _with(base, x * PARAM_SCALE)), PRIOR_WEIGHT * np.asarray(x, dtype=float)])


def data_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_FIT_JOBS: dict = {}  # engine -> (rows, setups, progress, starts): what the worker processes of `fit_engines` read (set before they fork)


def _fit_job(task: tuple[str, int]) -> tuple[np.ndarray, float]:
    name, i = task
    rows, setups, progress, starts = _FIT_JOBS[name]
    return _start_run(name, rows, setups, starts, i, progress)


def fit_engines(path: Path | None = None, max_requests: int = DEFAULT_MAX_REQUESTS, progress=None, workers: int | None = None) -> dict:
    """Fit each preset (`vllm`, `vllm-v0`, `sglang`) to its fit rows of the published set: the JSON `fit-engine` writes.
    Every engine's runs (`fit_engine`'s, one per start) are independent: they run on `workers` processes
    (default: the machine's cores), the engines whose rows simulate the most requests first, and each
    engine keeps its lowest run as `fit_engine` does, so the result is the same on any number."""
    path = Path(path) if path is not None else e2e.PUBLISHED_CSV
    rows = e2e.load(path)
    fit_rows, _ = e2e.split(rows)
    means = sharegpt_means(rows)
    jobs = {}
    for name in GRAPH_MAX_BATCH:
        mine = [r for r in fit_rows if preset_name(r) == name]
        if not mine:
            raise UserError(f"{path}: no fit row of engine {name}")
        jobs[name] = (mine, [row_setup(r, means, max_requests) for r in mine], progress, _starts(name))
    heaviest = sorted(jobs, key=lambda name: -sum(s.workload.requests for s in jobs[name][1]))
    tasks = [(name, i) for name in heaviest for i in range(len(jobs[name][3]))]
    _FIT_JOBS.clear()
    _FIT_JOBS.update(jobs)
    n = workers or min(len(tasks), os.cpu_count() or 1)
    if n <= 1:
        runs = [_fit_job(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork")) as pool:
            runs = list(pool.map(_fit_job, tasks))
    engines = {}
    for name in GRAPH_MAX_BATCH:
        mine = jobs[name][0]
        fitted = _lowest(name, [run for (task_name, _), run in zip(tasks, runs, strict=True) if task_name == name])
        engines[name] = fitted.model_copy(update={"source": f"fitted by `python -m simulator fit-engine` to rows {', '.join(str(r.row) for r in mine)}"
                                                            f" of {path.name}"}).model_dump()  # fmt: skip
    return {"data": path.name, "data_sha256": data_sha256(path), "fit_rows": [r.row for r in fit_rows], "max_requests": max_requests,
            "sharegpt_means": None if means is None else {"prompt_tokens": means[0], "output_tokens": means[1]}, "engines": engines}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Validation


def _ape(pred: float | None, meas: float | None) -> float | None:
    return None if pred is None or meas is None else abs(pred - meas) / meas


def _stats(values: list[float]) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"n": 0, "median_ape_pct": None, "mean_ape_pct": None}
    return {"n": int(v.size), "median_ape_pct": float(np.median(v) * 100), "mean_ape_pct": float(v.mean() * 100)}


def _summary(rows: list[dict]) -> dict:
    """Median and mean APE (%) of each metric, with the engine model and kernels only."""
    return {model: {k: _stats([r[model]["ape"][k] for r in rows]) for k in METRICS} for model in ("engine", "ideal")}


def validate_e2e(path: Path | str | None = None, max_requests: int = DEFAULT_MAX_REQUESTS, fitted_path: Path = FITTED_PATH,
                 progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Predict every row of a published-results file with its engine's preset and with `ideal`, and
    summarise the APEs of the held-out rows by GPU and model size class (fit rows reported apart)."""
    if max_requests < 1:
        raise UserError(f"--max-requests must be >= 1, got {max_requests}")
    path = Path(path) if path is not None else e2e.PUBLISHED_CSV
    rows = e2e.load(path)
    fitted = load_fitted(fitted_path)
    engines = {name: engine_overhead(name, fitted_path) for name in GRAPH_MAX_BATCH}
    means = sharegpt_means(rows)
    setups = [row_setup(r, means, max_requests) for r in rows]
    out_rows = []
    for r, s in zip(rows, setups, strict=True):
        meas = measured(r)
        preset = preset_for(r, engines)
        entry = {"row": r.row, "gpu": r.profile.name, "model": r.spec.name, "size_class": r.size_class, "engine_name": r.engine,
                 "engine_version": r.engine_version, "preset": preset.name, "fit": e2e.is_fit_row(r), "requests": s.workload.requests,
                 "lengths": s.lengths, "load": "closed loop" if r.closed_loop else "all at once" if math.isinf(r.request_rate_per_s) else "open loop",
                 "url": r.url, "measured": meas}  # fmt: skip
        for model, overhead in (("engine", preset), ("ideal", IDEAL)):
            pred = predict(r, s, overhead) if model == "engine" or not preset.ideal else entry["engine"]["predicted"]
            entry[model] = {"predicted": pred, "ape": {k: _ape(pred[k], meas[k]) for k in METRICS}}
        if r.size_class == "large" and not preset.ideal:
            entry["light_load_tpot_gap_pct"] = light_load_gap_pct(r, s, preset)
        out_rows.append(entry)
        if progress:
            progress(f"row {r.row}: {r.engine} {r.spec.name} on {r.profile.name}")
    held = [e for e in out_rows if not e["fit"]]
    fit = [e for e in out_rows if e["fit"]]
    by = {key: {v: _summary([e for e in held if e[key] == v]) for v in sorted({e[key] for e in held})} for key in ("gpu", "size_class")}
    return {
        "data": str(path), "data_sha256": data_sha256(path), "fitted": str(fitted_path.name),
        "fitted_data_sha256_matches": fitted.get("data_sha256") == data_sha256(path), "max_requests": max_requests,
        "fit_rows": [e["row"] for e in fit], "held_out_rows": [e["row"] for e in held],
        "held_out": _summary(held), "fit": _summary(fit), "by_gpu": by["gpu"], "by_size_class": by["size_class"],
        "targets": targets(held, out_rows), "rows": out_rows,
    }  # fmt: skip


def targets(held: list[dict], rows: list[dict]) -> dict:
    """The issue's targets: held-out median APE of TTFT and TPOT <= 20% and of throughput <= 15%; for
    models under 2B, TTFT median APE at least 3x better than kernels only; for models >= 70B at light
    load, where kernels dominate, the engine model within 5% of kernels only on TPOT: every >= 70B
    row's setup served to one user (`light_load_gap_pct`; the published 70B rows run 4-8 requests/s
    or every request at once, so their own gaps, `large_rows_tpot_gap_to_ideal_pct`, are a loaded
    system's and are reported beside it)."""
    s = _summary(held)["engine"]
    small = _summary([e for e in held if e["size_class"] == "small"])
    small_engine, small_ideal = small["engine"]["ttft"]["median_ape_pct"], small["ideal"]["ttft"]["median_ape_pct"]
    light = {e["row"]: e["light_load_tpot_gap_pct"] for e in rows if "light_load_tpot_gap_pct" in e}
    loaded = [e for e in rows if e["size_class"] == "large" and e["load"] != "all at once"]
    loaded_gaps = {e["row"]: abs(e["engine"]["predicted"]["tpot"] / e["ideal"]["predicted"]["tpot"] - 1) * 100 for e in loaded}
    ratio = small_ideal / small_engine if small_engine and small_ideal is not None else None
    out = {
        "ttft_median_ape_pct": {"value": s["ttft"]["median_ape_pct"], "target": 20.0},
        "tpot_median_ape_pct": {"value": s["tpot"]["median_ape_pct"], "target": 20.0},
        "throughput_median_ape_pct": {"value": s["throughput"]["median_ape_pct"], "target": 15.0},
        "small_ttft_ideal_over_engine_ape": {"value": ratio, "target": 3.0, "higher_is_better": True},
        "large_light_tpot_gap_to_ideal_pct": {"value": max(light.values()) if light else None, "target": 5.0, "rows": sorted(light),
                                              "large_rows_tpot_gap_to_ideal_pct": max(loaded_gaps.values()) if loaded_gaps else None,
                                              "large_rows": sorted(loaded_gaps)},
    }  # fmt: skip
    for t in out.values():
        v = t["value"]
        t["met"] = None if v is None else v >= t["target"] if t.get("higher_is_better") else v <= t["target"]
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def format_e2e(out: dict) -> str:
    lines = [f"{out['data']}: {len(out['rows'])} published bench-serve rows; fit on rows {', '.join(map(str, out['fit_rows']))} "
             f"(simulator.e2e.split), scored on the other {len(out['held_out_rows'])}",
             f"engine presets from {out['fitted']}" + ("" if out["fitted_data_sha256_matches"] else " (fitted to other data than this file)")
             + f"; at most {out['max_requests']} requests per open- or closed-loop row", ""]  # fmt: skip
    head = f"{'':<26}{'n':>4}" + "".join(f"{k + ' med/mean APE %':>28}" for k in ("TTFT", "TPOT", "output tok/s"))
    lines.append(head + "   (engine model | kernels only)")

    def line(label: str, s: dict) -> str:
        n = max(s["engine"][k]["n"] for k in METRICS)
        cells = [f"{_pct(s['engine'][k]['median_ape_pct'])}/{_pct(s['engine'][k]['mean_ape_pct'])} | "
                 f"{_pct(s['ideal'][k]['median_ape_pct'])}/{_pct(s['ideal'][k]['mean_ape_pct'])}" for k in METRICS]  # fmt: skip
        return f"{label:<26}{n:>4}" + "".join(f"{c:>28}" for c in cells)

    lines.append(line("held out, all", out["held_out"]))
    for key, title in (("by_gpu", "GPU"), ("by_size_class", "size")):
        for name, s in out[key].items():
            lines.append(line(f"  {title} {name}", s))
    lines.append(line("fit rows (in-sample)", out["fit"]))
    lines += ["", "targets (held-out rows):"]
    for name, t in out["targets"].items():
        mark = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        cmp = ">=" if t.get("higher_is_better") else "<="
        lines.append(f"  {name}: {_pct(t['value'])} (target {cmp} {t['target']:g}) {mark}")
        if "rows" in t:
            lines.append(f"    one user on the setups of rows {', '.join(map(str, t['rows']))}; rows "
                         f"{', '.join(map(str, t['large_rows']))} at their own load: {_pct(t['large_rows_tpot_gap_to_ideal_pct'])}")
    lines += ["", f"{'row':>4} {'fit':>3} {'engine':<13}{'model':<14}{'GPU':<15}{'load':<12}"
              f"{'TTFT ms meas/eng/ideal':>26}{'TPOT ms meas/eng/ideal':>26}{'tok/s meas/eng/ideal':>28}"]  # fmt: skip
    for e in out["rows"]:
        cells = []
        for k, scale, fmt in (("ttft", 1e3, ".1f"), ("tpot", 1e3, ".2f"), ("throughput", 1.0, ".0f")):
            vals = [e["measured"][k], e["engine"]["predicted"][k], e["ideal"]["predicted"][k]]
            cells.append("/".join("-" if v is None else format(v * scale, fmt) for v in vals) if e["measured"][k] is not None else "-")
        lines.append(f"{e['row']:>4} {'yes' if e['fit'] else '':>3} {e['engine_name']:<13}{e['model']:<14}{e['gpu']:<15}{e['load']:<12}"
                     f"{cells[0]:>26}{cells[1]:>26}{cells[2]:>28}")  # fmt: skip
    return "\n".join(lines)
