"""`simulate`: a serving engine under a request stream, with and without speculative decoding.

`simulate(...)` runs the same workload (same seed, same requests) through an engine that
speculates with the draft and through one that decodes without it, and returns one report dict;
`format_report`, `write_csv` and `write_plot` render it. `add_parsers` registers the CLI commands
`simulate` and `bench simulate`; everything they print comes from these functions.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import numpy as np

from simulator import bild
from simulator import plan as plan_lib
from simulator.engine import DEFAULT_ENGINE, ENGINE_NAMES, engine_overhead
from simulator.errors import UserError, finite_json
from simulator.hardware import HardwareProfile, load_profile
from simulator.models import ModelSpec, load_model
from simulator.paths import check_plot_path, check_writable_file, read_json, write_atomically
from simulator.serving import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCHED_TOKENS,
    SIMULATOR_BATCHING,
    AcceptanceModel,
    Engine,
    ServingConfig,
    check_pair,
    draft_tp,
    interval_scales,
    kv_cache_blocks,
    server_batching,
    simulate_serving,
    span,
)
from simulator.tree import MEDUSA, TreeSpeculation, speculation_from_args, tree_kv_cache_blocks
from simulator.units import parse_duration_s
from simulator.workload import Trace, WorkloadSpec, load_trace, make_stream, request_count

DEFAULT_GAMMA = 4
DEFAULT_REQUESTS = 1000
DEFAULT_RATE_PER_S = 8.0  # open loop without --rate
BENCH_REQUESTS = 100_000  # the speed target: 100k requests of Llama-2-7B on an A100 with speculation
MILLION = 1_000_000  # bench simulate --million: the memory and completeness target
RUNS = ("speculative", "autoregressive")
NO_DRAFT = "none"  # --draft none: plain decoding only


def parse_alpha(text: str) -> AcceptanceModel:
    """'0.7' -> i.i.d. acceptance; '0.9,0.8,0.7,0.6' -> one rate per draft position."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--alpha takes a number in [0, 1] or a comma-separated list of them, got {text!r}") from None
    if not values:
        raise UserError(f"--alpha takes a number in [0, 1] or a comma-separated list of them, got {text!r}")
    if len(values) == 1:
        return AcceptanceModel(kind="iid", alpha=values[0])
    return AcceptanceModel(kind="positional", alphas=values)


def load_acceptance(path: str | Path) -> AcceptanceModel:
    """An acceptance measurement in JSON: {"accepted_length_counts": [c_0, ..., c_gamma]} (how often
    0..gamma drafts were accepted; a bare list means the same), {"alpha_per_position": [...]} or
    {"alpha": a}."""
    path = Path(path)
    data = read_json(path, "an acceptance file")
    if isinstance(data, list):
        data = {"accepted_length_counts": data}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with accepted_length_counts, alpha_per_position or alpha")
    try:
        if data.get("accepted_length_counts") is not None:
            return AcceptanceModel(kind="empirical", counts=[float(c) for c in data["accepted_length_counts"]])
        if data.get("alpha_per_position"):
            return AcceptanceModel(kind="positional", alphas=[float(a) for a in data["alpha_per_position"]])
        if data.get("alpha") is not None:
            return AcceptanceModel(kind="iid", alpha=float(data["alpha"]))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: acceptance values must be numbers") from None
    raise UserError(f"{path}: none of accepted_length_counts, alpha_per_position, alpha found")


def simulate(
    hw: HardwareProfile,
    target: ModelSpec,
    draft: ModelSpec | TreeSpeculation | None,
    acceptance: AcceptanceModel,
    serving: ServingConfig,
    workload: WorkloadSpec,
    seed: int = 0,
    progress=None,
    runs: tuple[str, ...] = RUNS,
    trace: Trace | None = None,
    intervals: bool = True,
) -> dict:
    """Run `workload` through the engine with speculation ('speculative') and without it
    ('autoregressive': no draft in memory, one token per step), from one seed.
    `progress(n)` is called as requests complete or are rejected; `trace`: the workload's trace, if
    already loaded. With `intervals` (on a GPU profile) each run is repeated with every pass at
    the low and at the high end of the device model's 80% interval (`serving.interval_scales`, at
    the run's mean batch and the workload's mean context), same seeds: its report's `interval`
    bounds each latency statistic and the throughput. `draft`: the draft model, or a tree
    (`tree.TreeSpeculation`, from --tree / --draft medusa) whose engine verifies N = gamma nodes;
    None (or gamma 0): plain decoding, the 'autoregressive' run only."""
    serving.check()
    if draft is None or serving.gamma == 0:
        runs = tuple(r for r in runs if r != "speculative")
    workload.check()
    acceptance.check(serving.gamma)
    if workload.arrival == "trace" and trace is None:
        trace = load_trace(workload.trace_path, workload.requests)
    speculation = None if draft is None or isinstance(draft, ModelSpec) else draft  # a tree, or BiLD (simulator.bild)
    configs = {
        "speculative": (draft, serving) if speculation is None else (speculation.draft, serving),
        "autoregressive": (None, serving.model_copy(update={"gamma": 0, "spec_off_above_batch": None})),
    }
    engines = {"speculative": speculation.engine if speculation else Engine, "autoregressive": Engine}
    workload_seed, acceptance_seed = np.random.SeedSequence(seed).spawn(2)
    reports = {}
    for name in runs:
        run_draft, run_cfg = configs[name]

        def run(scale: float = 1.0, report_progress=None, run_draft=run_draft, run_cfg=run_cfg, engine=engines[name]):
            requests = make_stream(workload, np.random.default_rng(workload_seed), trace)
            return simulate_serving(hw, target, run_draft, acceptance, run_cfg, requests, np.random.default_rng(acceptance_seed),
                                    report_progress, scale, engine, workload.concurrency)  # fmt: skip

        reports[name] = run(report_progress=progress)
        scales = interval_scales(hw, target, run_cfg, reports[name]["batch"]["mean"], _mean_context(workload, trace)) if intervals else None
        if scales:
            reports[name]["interval"] = run_interval(reports[name], run(scales[0]), run(scales[1]), scales)
    report = {
        "config": {
            "gpu": hw.name,
            "model": target.name,
            "draft": NO_DRAFT if draft is None else draft.name,
            "dtype": serving.dtype,
            "tp": serving.tp,
            "draft_tp": None if draft is None else draft_tp(draft, serving.tp) if speculation is None else draft_tp(speculation.draft, serving.tp) if speculation.draft else None,
            "gamma": serving.gamma,
            "engine": serving.engine.model_dump(),
            "acceptance": acceptance.model_dump(),
            "workload": workload.model_dump(),
            "requests": request_count(workload, trace),
            "max_batch": serving.max_batch,
            "max_batched_tokens": serving.max_batched_tokens,
            "chunked_prefill": serving.chunked_prefill,
            "prefill_apart": serving.prefill_apart,
            "scheduler_steps": serving.scheduler_steps,
            "spec_off_above_batch": serving.spec_off_above_batch,
            "block_tokens": serving.block_tokens,
            "memory_utilization": serving.memory_utilization,
            "slo_ttft_s": serving.slo_ttft_s,
            "slo_tpot_s": serving.slo_tpot_s,
            "seed": seed,
            **({"bild" if hasattr(speculation, "rates") else "tree": speculation.summary(target)} if speculation else {}),
            "kernel_model": plan_lib.kernel_model_of(hw),
        },
        **reports,
    }
    if set(RUNS) <= set(reports):
        report["comparison"] = _compare(reports["speculative"], reports["autoregressive"])
    return report


def _mean_context(workload: WorkloadSpec, trace: Trace | None) -> float:
    """Tokens in a request's context halfway through its output, on average."""
    if trace is not None:
        return float(np.mean(trace.prompt_tokens) + np.mean(trace.output_tokens) / 2)
    return workload.prompt_tokens + workload.output_tokens / 2


def run_interval(run: dict, fast: dict, slow: dict, scales: tuple[float, float]) -> dict:
    """The 80% interval of a run from its two bound runs: every pass at the low end (`fast`) and at
    the high end (`slow`) of the device model's interval."""
    latency = {metric: {stat: span(*(r["latency_s"][metric][stat] for r in (run, fast, slow)))
                        for stat in ("mean", "p50", "p90", "p99")} for metric in ("ttft", "tpot", "e2e", "queue")}  # fmt: skip
    throughput = {"output_tokens_per_s": span(*(r["throughput"]["output_tokens_per_s"] for r in (run, fast, slow)))}
    return {"level": plan_lib.INTERVAL_LEVEL, "time_scale": {"low": scales[0], "high": scales[1]}, "latency_s": latency, "throughput": throughput}


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def _compare(spec: dict, base: dict) -> dict:
    """Speculative over autoregressive: above 1 means speculation gives more (throughput) or takes longer (latency)."""
    lat_s, lat_b = spec["latency_s"], base["latency_s"]
    return {
        "output_tokens_per_s_ratio": _ratio(spec["throughput"]["output_tokens_per_s"], base["throughput"]["output_tokens_per_s"]),
        "goodput_ratio": _ratio(spec["goodput"]["requests_per_s"], base["goodput"]["requests_per_s"]),
        "tpot_mean_ratio": _ratio(lat_s["tpot"]["mean"], lat_b["tpot"]["mean"]),
        "ttft_p99_ratio": _ratio(lat_s["ttft"]["p99"], lat_b["ttft"]["p99"]),
        "e2e_mean_ratio": _ratio(lat_s["e2e"]["mean"], lat_b["e2e"]["mean"]),
        "e2e_p99_ratio": _ratio(lat_s["e2e"]["p99"], lat_b["e2e"]["p99"]),
    }


# ---------------------------------------------------------------------------------------------
# Output


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def format_report(report: dict) -> str:
    c = report["config"]
    w = c["workload"]
    runs = [r for r in RUNS if r in report]
    acc = c["acceptance"]
    alpha = {"iid": f"alpha {acc['alpha']:g}", "positional": f"alpha_i {acc['alphas']}", "empirical": "measured accepted lengths"}[acc["kind"]]
    if w["arrival"] == "trace":
        stream = f"{c['requests']} requests replayed from {w['trace_path']}"
    else:
        kind = "Poisson" if w["arrival"] == "poisson" else f"gamma-process (burstiness {w['burstiness']:g})"
        pace = "requests sent at once" if math.isinf(w["rate_per_s"]) else f"{kind} requests at {w['rate_per_s']:g}/s"
        stream = f"{c['requests']} {pace}, prompt {w['prompt_tokens']}, output {w['output_tokens']} tokens ({w['lengths']})"
    if w["concurrency"] is not None:
        stream += f"; closed loop, {w['concurrency']} users (each sends its next request when its last completes)"
    first = report[runs[0]]["kv_cache"]
    slo = [f"TTFT <= {_ms(c['slo_ttft_s'])} ms" if c["slo_ttft_s"] else "", f"TPOT <= {_ms(c['slo_tpot_s'])} ms" if c["slo_tpot_s"] else ""]
    if "bild" in c:
        b = c["bild"]
        alpha = (f"BiLD fallback {b['fallback']} rollback {b['rollback']} (INEXACT; {b['rates']['small_steps_per_token']:.3f} small steps and "
                 f"{b['rates']['big_passes_per_token']:.3f} big passes per token, {b['rates']['big_query_tokens_per_pass']:.2f} query tokens per pass, "
                 f"measured: {b['source']})")  # fmt: skip
    if "tree" in c:
        tree, tacc = c["tree"], c["tree"]["acceptance"]
        alpha = (f"tree {tree['spec']} ({tree['nodes']} nodes, depth {tree['depth']}, {tree['expected_tokens_per_step']:.3f} tokens/step expected), "
                 f"acceptance from {tacc['file']} ({tacc['note']})")  # fmt: skip
    lines = [
        f"{c['model']} on {c['gpu']}" + (f" x{c['tp']} (tensor parallel)" if c["tp"] > 1 else "") + f" ({c['dtype']}), "
        + (f"draft {c['draft']}" + (f", gamma {c['gamma']}" if "tree" not in c and "bild" not in c else "") + f", {alpha}" if c["gamma"] else "no speculation (plain decoding)"),
        f"{stream}; engine {c['engine']['name']}" + (" (kernels only)" if c["engine"]["name"] == "ideal" else " (host overheads added)")
        + f"; max batch {c['max_batch']}, max batched tokens {c['max_batched_tokens']}"
        + (", chunked prefill" + (" in steps of its own" if c["prefill_apart"] else "") if c["chunked_prefill"] else "")
        + (f", {c['scheduler_steps']} decode steps per scheduler call" if c["scheduler_steps"] > 1 else "")
        + (f", speculation off above batch {c['spec_off_above_batch']}" if c["spec_off_above_batch"] is not None else ""),
        f"KV cache ({runs[0]}): {first['capacity_blocks']} blocks x {first['block_tokens']} tokens = {first['capacity_tokens']} tokens",
        "SLO: " + (" and ".join(x for x in slo if x) or "none (goodput counts every completed request)"),
        *([f"Kernels: {plan_lib.format_provenance(c['gpu'], c['kernel_model'])}"] if c.get("kernel_model") else []),
    ]
    table: list[tuple[str, list[str]]] = []

    def row(label, get):
        table.append((label, [get(report[r]) for r in runs]))

    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "end-to-end"), ("queue", "queueing")):
        row(f"{label} mean / p50 / p90 / p99 (ms)", lambda r, k=key: " / ".join(_ms(r["latency_s"][k][s]) for s in ("mean", "p50", "p90", "p99")))
    row("output tokens/s", lambda r: f"{r['throughput']['output_tokens_per_s']:.1f}")
    row("requests/s", lambda r: f"{r['throughput']['requests_per_s']:.3f}")
    row("goodput requests/s (in SLO)", lambda r: f"{r['goodput']['requests_per_s']:.3f}")
    row("completed / rejected", lambda r: f"{r['requests']['completed']} / {r['requests']['rejected']}")
    row("preemptions", lambda r: str(r["requests"]["preemptions"]))
    row("GPU busy", lambda r: f"{r['gpu_busy_fraction']:.1%}")
    row("batch mean / max", lambda r: f"{r['batch']['mean']:.1f} / {r['batch']['max']}")
    row("KV cache used mean / peak", lambda r: f"{r['kv_cache']['mean_used_fraction']:.1%} / {r['kv_cache']['peak_used_fraction']:.1%}")
    row("engine steps", lambda r: str(r["engine"]["steps"]))
    row("tokens per verify (expected)", lambda r: "-" if r["engine"]["tokens_per_verify"] is None
        else f"{r['engine']['tokens_per_verify']:.2f} ({r['engine']['expected_tokens_per_verify']:.2f})")  # fmt: skip
    label_w = max(len(label) for label, _ in table) + 2
    col_w = [max(len(runs[j]), *(len(cells[j]) for _, cells in table)) + 3 for j in range(len(runs))]
    lines += ["", " " * label_w + "".join(f"{name:>{w}}" for name, w in zip(runs, col_w, strict=True))]
    lines += [f"{label:<{label_w}}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, col_w, strict=True)) for label, cells in table]
    if any("interval" in report[r] for r in runs):
        lines += ["", "80% intervals (every pass at the ends of the kernel model's leave-one-GPU-out interval):"]
        for r in runs:
            iv = report[r].get("interval")
            if not iv:
                continue
            lat, tps = report[r]["latency_s"], report[r]["throughput"]["output_tokens_per_s"]
            parts = [f"{label} {stat} {_ms(lat[key][stat])} ms ({_ms(iv['latency_s'][key][stat]['low'])}-{_ms(iv['latency_s'][key][stat]['high'])})"
                     for key, label in (("ttft", "TTFT"), ("tpot", "TPOT")) for stat in ("p50", "p99")]  # fmt: skip
            band = iv["throughput"]["output_tokens_per_s"]
            parts.append(f"output tokens/s {tps:.1f} ({band['low']:.1f}-{band['high']:.1f})")
            lines.append(f"  {r}: " + ", ".join(parts))
    for reason_run in runs:
        for reason, info in report[reason_run]["requests"]["rejected_by_reason"].items():
            lines.append(f"  {reason_run}: {info['count']} rejected, {reason} (first ids {info['first_ids']})")
    if "comparison" in report:
        cmp = report["comparison"]
        tps = cmp["output_tokens_per_s_ratio"]
        tpot = cmp["tpot_mean_ratio"]
        lines += [
            "",
            f"speculation: output tokens/s x{tps:.3f}" if tps is not None else "speculation: no output",
            f"             mean TPOT x{tpot:.3f}, mean end-to-end x{cmp['e2e_mean_ratio']:.3f}" if tpot is not None else "",
        ]
    return "\n".join(lines).rstrip()


def csv_rows(report: dict) -> list[dict]:
    """One row per run, every summary figure a column."""
    rows = []
    for name in (r for r in RUNS if r in report):
        r = report[name]
        row = {
            "run": name,
            "requests_arrived": r["requests"]["arrived"],
            "requests_completed": r["requests"]["completed"],
            "requests_rejected": r["requests"]["rejected"],
            "preemptions": r["requests"]["preemptions"],
            "duration_s": r["duration_s"],
        }
        for metric, summary in r["latency_s"].items():
            for stat in ("mean", "p50", "p90", "p99", "max"):
                row[f"{metric}_{stat}_s"] = summary[stat]
        row.update(
            output_tokens_per_s=r["throughput"]["output_tokens_per_s"],
            requests_per_s=r["throughput"]["requests_per_s"],
            goodput_requests_per_s=r["goodput"]["requests_per_s"],
            gpu_busy_fraction=r["gpu_busy_fraction"],
            batch_mean=r["batch"]["mean"],
            batch_max=r["batch"]["max"],
            kv_capacity_blocks=r["kv_cache"]["capacity_blocks"],
            kv_peak_used_fraction=r["kv_cache"]["peak_used_fraction"],
            kv_mean_used_fraction=r["kv_cache"]["mean_used_fraction"],
            engine_steps=r["engine"]["steps"],
            tokens_per_verify=r["engine"]["tokens_per_verify"],
        )
        rows.append(row)
    return rows


def write_csv(report: dict, path: str | Path) -> None:
    rows = csv_rows(report)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    try:
        write_atomically(Path(path), write)
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror or exc}") from None


def write_plot(report: dict, path: str | Path) -> None:
    """Latency percentiles of each run, and throughput, batch and KV use over time."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    runs = [r for r in RUNS if r in report]
    fig = Figure(figsize=(11, 7), constrained_layout=True)
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    labels = [f"{m} {s}" for m in ("ttft", "tpot", "e2e") for s in ("p50", "p90", "p99")]
    width = 0.8 / len(runs)
    for j, name in enumerate(runs):
        lat = report[name]["latency_s"]
        values = [(lat[m][s] or math.nan) * 1e3 for m in ("ttft", "tpot", "e2e") for s in ("p50", "p90", "p99")]
        ax.bar(np.arange(len(labels)) + j * width, values, width, label=name)
    ax.set_xticks(np.arange(len(labels)) + width * (len(runs) - 1) / 2, labels, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.legend()
    for ax, key, ylabel in (
        (axes[0, 1], "output_tokens_per_s", "output tokens/s"),
        (axes[1, 0], "batch_mean", "running sequences (mean while busy)"),
        (axes[1, 1], "kv_used_fraction_mean", "KV cache used (fraction)"),
    ):
        for name in runs:
            tl = report[name]["timeline"]
            ax.step(tl["start_s"], tl[key], where="post", label=name)
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel(ylabel)
    axes[0, 1].legend()
    c = report["config"]
    spec = f"tree {c['tree']['spec']} ({c['tree']['nodes']} nodes)" if "tree" in c else f"gamma {c['gamma']}"
    fig.suptitle(f"{c['model']} on {c['gpu']}, draft {c['draft']}, {spec}")
    try:
        write_atomically(Path(path), fig.savefig)
    except OSError as exc:
        raise UserError(f"{path}: cannot write the plot: {exc.strerror or exc}") from None
    except ValueError as exc:  # an unknown image extension
        raise UserError(f"{path}: cannot write the plot: {exc}") from None


# ---------------------------------------------------------------------------------------------
# CLI glue


def _add_options(p: argparse.ArgumentParser, requests_default: int | None) -> None:
    p.add_argument("--gpu", default=plan_lib.DEFAULT_GPU, help="device name or alias, or a path to a YAML profile (default: %(default)s)")
    p.add_argument("--model", default=plan_lib.DEFAULT_TARGET, help="target model name or HuggingFace config.json (default: %(default)s)")
    p.add_argument("--draft", default=plan_lib.DEFAULT_DRAFT, help="draft model name or config.json, medusa (heads on the target; needs --tree), or none: plain decoding only, as does --gamma 0 (default: %(default)s)")
    p.add_argument("--gamma", type=int, default=None, help=f"draft tokens per speculative step (default: {DEFAULT_GAMMA}; not with --tree)")
    p.add_argument("--tree", default=None, metavar="SPEC", help="speculate with a tree: AxBxC, rank paths as JSON or a JSON file, or best:N; "
                   "proposed by --draft (medusa: heads on the target) and scored by --acceptance")
    p.add_argument("--alpha", default=None, help=f"acceptance rate in [0, 1], or comma-separated rates per draft position (default: {plan_lib.DEFAULT_ALPHA}, an assumption)")
    p.add_argument("--acceptance", metavar="FILE", default=None, help="JSON of measured accepted lengths ({\"accepted_length_counts\": [...]}); overrides --alpha; "
                   "with --tree: a tree acceptance table (default for --draft medusa: reference/weights/medusa_acceptance.json where present)")
    p.add_argument("--rate", type=float, default=None, help="mean arrival rate, requests per second, or inf: every request at once "
                   "(default: 8, or inf with --concurrency)")
    p.add_argument("--concurrency", type=int, default=None, metavar="N", help="closed loop, as `vllm bench serve --max-concurrency N`: "
                   "at most N requests in flight, each user sending its next request when its last completes (default: open loop)")
    p.add_argument("--requests", type=int, default=requests_default, help=f"requests to simulate (default: {requests_default or DEFAULT_REQUESTS}; with --trace: every row)")
    p.add_argument("--arrival", choices=["poisson", "gamma"], default="poisson", help="arrival process (default: %(default)s)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma-process shape: 1 is Poisson, below 1 burstier (default: %(default)s)")
    p.add_argument("--trace", metavar="FILE", default=None, help="replay a CSV or JSONL trace of arrival_time_s, prompt_tokens, output_tokens")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per request (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=256, help="output tokens per request (default: %(default)s)")
    p.add_argument("--lengths", choices=["fixed", "uniform", "sharegpt"], default="fixed",
                   help="prompt and output lengths: all equal; uniform with those means; or sharegpt: prompts uniform, outputs long-tailed as "
                        "ShareGPT's replies in `vllm bench serve` (median 0.58 of the mean, within the benchmark's 2048-token cap) (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"sequences running at once (default: the --engine's server default, {DEFAULT_MAX_BATCH} with --engine ideal)")
    p.add_argument("--max-batched-tokens", type=int, default=None,
                   help="prefill tokens per step; with --chunked-prefill all tokens per step "
                        f"(default: the --engine's server default, {DEFAULT_MAX_BATCHED_TOKENS} with --engine ideal)")
    p.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="split prompts into chunks that share steps with decodes (default: as the --engine's server does; "
                        "off with --engine ideal)")
    p.add_argument("--prefill-apart", action=argparse.BooleanOptionalAction, default=None,
                   help="with --chunked-prefill: run the chunks in steps of their own, ahead of the decodes, as SGLang does "
                        "unless started with --enable-mixed-chunk (default: on with --engine sglang)")  # fmt: skip
    p.add_argument("--scheduler-steps", type=int, default=1,
                   help="decode steps per scheduler call, as vLLM's --num-scheduler-steps (before 0.7): a request waits for "
                        "the call under way to end before its prefill, and each decode step of a call carries 1/N of the "
                        "--engine's step host time (default: %(default)s)")  # fmt: skip
    p.add_argument("--spec-off-above-batch", type=int, default=None, help="decode without speculation while more sequences than this run")
    p.add_argument("--slo-ttft", default=None, help="goodput SLO on time to first token: 2s, 500ms, or a bare number of seconds")
    p.add_argument("--slo-tpot", default=None, help="goodput SLO on time per output token: 50ms, or a bare number of seconds")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp8"], help="weight, activation and KV dtype (default: %(default)s)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per engine; the draft is split alike where its heads allow (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, lengths and acceptance draws (default: %(default)s)")
    bild.add_policy_options(p, "speculative: exact speculative decoding (linear or --tree); bild: Big Little Decoder (Kim et al. 2023), INEXACT, "
                            "its cycles from --bild-rates",
                            "--policy bild: rates measured by `python -m reference bild --rates-out FILE`; they are the measured pair's, "
                            "applied to --model and --draft (the small model)")  # fmt: skip
    p.add_argument("--engine", default=DEFAULT_ENGINE, help=f"host overheads of a serving engine added to the kernels, and its server's batching "
                   f"where no flag sets it: {', '.join(ENGINE_NAMES)} (ideal: kernels only, the simulator's own batching; vllm (V1 engine, "
                   "0.7 on), vllm-v0 (before 0.7) and sglang: fitted by `python -m simulator fit-engine`) (default: %(default)s)")


def batching(args: argparse.Namespace, hw: HardwareProfile) -> dict:
    """max_batch, max_batched_tokens, chunked_prefill and prefill_apart: each as its flag gives it, else
    as the --engine's server runs, else the simulator's own (`serving.server_batching`).
    Turning chunking off turns off the engine's running of chunks apart with it."""
    server = server_batching(args.engine, hw)
    out = {k: getattr(args, k) if getattr(args, k) is not None else server[k] for k in SIMULATOR_BATCHING}
    if args.prefill_apart is None and not out["chunked_prefill"]:
        out["prefill_apart"] = False
    return out


def runs_of(draft, serving: ServingConfig) -> tuple[str, ...]:
    """The runs `simulate` makes: both, or only 'autoregressive' without a draft (or with gamma 0)."""
    return RUNS if draft is not None and serving.gamma > 0 else ("autoregressive",)


def config_from_args(args: argparse.Namespace):
    """(hw, target, draft, acceptance, serving, workload) from parsed options; UserError on bad input."""
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    hw = load_profile(args.gpu)
    tree = args.tree is not None or args.draft == MEDUSA
    if bild.wants_bild(args):
        return _bild_config(args, hw)
    if tree:  # the draft is a tree (Medusa heads or a draft model's), scored by a tree acceptance table
        if args.gamma is not None or args.alpha is not None:
            raise UserError("--gamma and --alpha do not apply to a tree: --tree sets the nodes verified per step, --acceptance their acceptance")
        target = load_model(args.model)
        draft = speculation_from_args(args.tree, args.draft, args.acceptance, target)
        acceptance = draft.acceptance_model()
    else:
        target = load_model(args.model)
        draft = None if args.draft.strip().lower() == NO_DRAFT or args.gamma == 0 else load_model(args.draft)
        if args.acceptance:
            acceptance = load_acceptance(args.acceptance)
        else:
            acceptance = parse_alpha(args.alpha if args.alpha is not None else str(plan_lib.DEFAULT_ALPHA))
    serving = ServingConfig(
        engine=engine_overhead(args.engine),
        **batching(args, hw),
        scheduler_steps=args.scheduler_steps,
        gamma=len(draft.tree) if tree else 0 if draft is None else DEFAULT_GAMMA if args.gamma is None else args.gamma,
        spec_off_above_batch=args.spec_off_above_batch,
        dtype=args.dtype,
        tp=args.tp,
        slo_ttft_s=None if args.slo_ttft is None else parse_duration_s(args.slo_ttft, "--slo-ttft"),
        slo_tpot_s=None if args.slo_tpot is None else parse_duration_s(args.slo_tpot, "--slo-tpot"),
    ).check()
    workload = _workload(args)
    try:
        acceptance.check(serving.gamma)
    except UserError as exc:
        raise UserError(f"{args.acceptance}: {exc}" if args.acceptance else str(exc)) from None
    if tree:  # parse_tree left room for a request of one prompt and one output token
        tree_kv_cache_blocks(hw, target, draft, serving)
        return hw, target, draft, acceptance, serving, workload
    check_pair(target, draft)
    if draft is None:
        kv_cache_blocks(hw, target, None, serving)
        return hw, target, draft, acceptance, serving, workload
    if serving.gamma + 2 > target.max_seq_len:  # a request of one prompt token and one output token, verified over gamma + 1
        raise UserError(f"--gamma {serving.gamma} is too large for the context: no request fits {target.name}'s {target.max_seq_len} positions with it")
    kv_cache_blocks(hw, target, draft if serving.gamma > 0 else None, serving)  # fits, or says by how much
    return hw, target, draft, acceptance, serving, workload


def _bild_config(args: argparse.Namespace, hw):
    """`--policy bild`: --model and --draft (the small model) running the BiLD cycle of a bild_rates file:
    the rates are the measured pair's (the report names the file), applied to this pair."""
    if args.tree is not None or args.gamma is not None or args.alpha is not None or args.acceptance is not None:
        raise UserError("--policy bild takes its steps from --bild-rates; --tree, --gamma, --alpha and --acceptance do not apply")
    target = load_model(args.model)
    speculation, _ = bild.speculation_from_args(args.bild_rates, args.fallback, args.rollback, load_model(args.draft))
    check_pair(target, speculation.draft)
    serving = ServingConfig(
        engine=engine_overhead(args.engine), **batching(args, hw), scheduler_steps=args.scheduler_steps,
        gamma=speculation.max_run, spec_off_above_batch=args.spec_off_above_batch,
        dtype=args.dtype, tp=args.tp, slo_ttft_s=None if args.slo_ttft is None else parse_duration_s(args.slo_ttft, "--slo-ttft"),
        slo_tpot_s=None if args.slo_tpot is None else parse_duration_s(args.slo_tpot, "--slo-tpot"),
    ).check()  # fmt: skip
    workload = _workload(args)
    if serving.gamma + 2 > target.max_seq_len:
        raise UserError(f"BiLD's cycles of up to {serving.gamma + 1} tokens do not fit {target.name}'s {target.max_seq_len} positions")
    kv_cache_blocks(hw, target, speculation.draft, serving)
    return hw, target, speculation, speculation.acceptance_model(), serving, workload


def _workload(args: argparse.Namespace) -> WorkloadSpec:
    """The request stream of the options (a trace, or arrivals and lengths), checked."""
    if args.trace:
        workload = WorkloadSpec(arrival="trace", trace_path=args.trace, requests=args.requests, concurrency=args.concurrency)
    else:
        workload = WorkloadSpec(
            arrival=args.arrival,
            rate_per_s=args.rate if args.rate is not None else DEFAULT_RATE_PER_S if args.concurrency is None else math.inf,
            concurrency=args.concurrency,
            burstiness=args.burstiness,
            requests=args.requests if args.requests is not None else DEFAULT_REQUESTS,
            prompt_tokens=args.prompt_len,
            output_tokens=args.output_len,
            lengths=args.lengths,
        )
    return workload.check()


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, mininterval=0.5, leave=False)


def run_simulate(args: argparse.Namespace) -> int:
    hw, target, draft, acceptance, serving, workload = config_from_args(args)
    if args.csv:
        check_writable_file(Path(args.csv))
    if args.plot:
        check_plot_path(Path(args.plot))
    trace = load_trace(workload.trace_path, workload.requests) if workload.arrival == "trace" else None
    with _progress_bar(len(runs_of(draft, serving)) * request_count(workload, trace), "simulate") as bar:
        report = simulate(hw, target, draft, acceptance, serving, workload, args.seed, progress=bar.update, trace=trace,
                          intervals=not args.no_interval)  # fmt: skip
    print(finite_json(report) if args.json else format_report(report), flush=True)
    for path, write in ((args.csv, write_csv), (args.plot, write_plot)):
        if path:
            write(report, path)
            print(f"simulate: wrote {path}", file=sys.stderr)
    return 0


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (getrusage: KiB on Linux, bytes on macOS); None where
    the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_bench(args: argparse.Namespace) -> int:
    """Wall-clock speed of the simulator: simulated requests and engine steps per second, per run;
    with --million, one speculative run of a million requests and the process's peak memory."""
    if args.million:
        args.requests = MILLION
    hw, target, draft, acceptance, serving, workload = config_from_args(args)
    speculation = f"tree {draft.spec} ({serving.gamma} nodes)" if isinstance(draft, TreeSpeculation) else f"gamma {serving.gamma}"
    print(f"bench simulate: {target.name} on {hw.name}, draft {NO_DRAFT if draft is None else draft.name}, {speculation}, "
          f"{workload.requests if workload.arrival != 'trace' else 'trace'} requests")  # fmt: skip
    # CPU seconds beside wall seconds: on a shared machine the wall clock counts other processes' time too
    print(f"{'run':<16}{'wall s':>10}{'cpu s':>10}{'requests':>10}{'engine steps':>14}{'requests/s':>13}{'steps/s':>12}")
    for name in ("speculative",) if args.million else runs_of(draft, serving):
        t0, c0 = time.perf_counter(), time.process_time()
        report = simulate(hw, target, draft, acceptance, serving, workload, args.seed, runs=(name,), intervals=False)
        wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        r = report[name]
        done = r["requests"]["completed"] + r["requests"]["rejected"]
        steps = r["engine"]["steps"]
        print(f"{name:<16}{wall_s:>10.2f}{cpu_s:>10.2f}{done:>10}{steps:>14}{done / wall_s:>13.0f}{steps / wall_s:>12.0f}")
        if done != r["requests"]["arrived"]:
            raise UserError(f"{name}: {r['requests']['arrived']} requests arrived but {done} completed or were rejected")
    if args.million:
        peak = peak_rss_bytes()
        r = report["speculative"]["requests"]
        print(f"completed {r['completed']} + rejected {r['rejected']} == arrived {r['arrived']}; "
              f"peak RSS {'unknown' if peak is None else f'{peak / 2**20:.0f} MiB'}")  # fmt: skip
    return 0


def add_parsers(sub, bench) -> None:
    """Register `simulate` on the command subparsers `sub` and on the benchmark subparsers `bench`."""
    p = sub.add_parser(
        "simulate",
        help="a serving engine under a request stream, with and without speculative decoding",
        description="Simulate continuous batching with speculative decoding under Poisson, bursty or traced "
        "arrivals: TTFT, TPOT and end-to-end latency (mean, p50, p90, p99), throughput, goodput under an SLO, "
        "KV-cache use and batch size over time, GPU busy fraction; the same run without speculation beside it.",
    )
    _add_options(p, None)
    p.add_argument("--json", action="store_true", help="print the report as JSON (keys documented in the README)")
    p.add_argument("--csv", metavar="FILE", default=None, help="write one row of summary figures per run to FILE")
    p.add_argument("--plot", metavar="FILE", default=None, help="write a figure of latency percentiles and throughput, batch and KV use over time (.png, .pdf, .svg)")
    p.add_argument("--no-interval", action="store_true", help="skip the two runs that bound each run's 80%% interval (three times faster)")
    p.set_defaults(run=run_simulate)

    b = bench.add_parser(
        "simulate",
        help="simulator speed: simulated requests/s and engine steps/s",
        description=f"Time the serving simulation (default {BENCH_REQUESTS} requests) with and without speculation; "
        f"--million: {MILLION} requests with speculation and the peak memory.",
    )
    _add_options(b, BENCH_REQUESTS)
    b.add_argument("--million", action="store_true", help=f"one speculative run of {MILLION} requests: wall time, peak RSS, and completed + rejected == arrived")
    b.set_defaults(run=run_bench)
