"""`validate`: predict every published and measured GPU point in the shared data from the profiles,
and report the error per source and per kernel.

The data are read where they lie (default `../shared/data` beside the repository), never copied.
Calibration: the A100 profiles' achievable fractions, launch overhead and one efficiency per
kernel implementation (FA1, FA2, the Triton tutorial kernel, PyTorch's unfused attention, vLLM's
kernels) are fitted by least squares on log(predicted / measured) over the calibration part, which
is every third point of each series (a series is one source, kernel, pass and GPU, in file
order); the error is reported on the other two thirds, which the fit never sees.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulator import attention as att
from simulator.errors import UserError
from simulator.hardware import HardwareProfile, load_profile
from simulator.roofline import elementwise, gemm

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CALIBRATION_EVERY = 3  # every third point of a series calibrates; the rest is held out

PUBLISHED_GPU = {"a100-80gb-sxm": "A100-80GB-SXM", "a100-40gb-sxm": "A100-40GB-SXM", "a100": "A100-80GB-SXM"}


@dataclass
class Point:
    source: str
    kernel: str  # implementation and pass, e.g. "fa2 fwd+bwd", "gemm", "decode attention"
    implementation: str  # whose efficiency factor applies: fa1, fa2, triton, pytorch, vllm, gemm, ...
    gpu: str
    shape: dict
    measured_s: float
    predict: Callable[[HardwareProfile], float] = field(repr=False)
    calibration: bool = False
    dataset: str = "measured"  # "published" (papers, blogs, docs) or "measured" (profiler dumps)


# --- reading the data -----------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None


def _flops(pass_: str, b: int, h: int, n: int, d: int, causal: bool) -> float:
    """flash-attention's benchmark convention: fwd 4 B H N^2 d (half if causal), bwd 2.5x fwd."""
    fwd = att.attention_flops(b, h, n, d, causal)
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_] * fwd


def published_points(data_dir: Path) -> list[Point]:
    path = data_dir / "published" / "a100-attention.csv"
    points = []
    for row in _read_csv(path):
        b, h, hk, n, d = (int(row[k]) for k in ("batch", "heads", "kv_heads", "seqlen", "head_dim"))
        causal, pass_, kernel = row["causal"] == "1", row["pass"], row["kernel"]
        value = float(row["value"])
        if row["metric"] == "tflops":
            measured_s = _flops(pass_, b, h, n, d, causal) / (value * 1e12)
        else:
            measured_s = value * {"ms": 1e-3, "us": 1e-6}[row["metric"]]
        impl = {"triton-tutorial": "triton", "flash-decoding": "fa2"}.get(kernel, kernel)
        predict = _attention_predictor(kernel, pass_, b, h, hk, n, d, causal, row["dtype"])
        points.append(
            Point(row["source"].split(" (")[0], f"{kernel} {pass_}", impl, PUBLISHED_GPU[row["gpu"]],
                  {"batch": b, "heads": h, "kv_heads": hk, "seqlen": n, "head_dim": d, "causal": causal}, measured_s, predict,
                  dataset="published")
        )  # fmt: skip
    return points


def _attention_predictor(kernel, pass_, b, h, hk, n, d, causal, dtype) -> Callable[[HardwareProfile], float]:
    if pass_ == "decode":  # one query token per sequence against n cached keys
        splits = {"flash-decoding": None, "fa2": 1, "pytorch": None}[kernel]
        if kernel == "pytorch":
            return lambda hw: att.standard_decode(b, h, hk, n, d, hw, dtype).time_s
        return lambda hw: att.flash_decoding(b, h, 1, n, d, hw, splits, dtype, h_kv=hk).time_s
    order = "fa1" if kernel == "fa1" else "fa2"
    if kernel == "pytorch":
        fwd = lambda hw: att.standard_attention(b, h, n, d, hw, causal, dtype).time_s  # noqa: E731
        bwd = lambda hw: att.standard_attention_backward(b, h, n, d, hw, causal, dtype).time_s  # noqa: E731
    else:
        fwd = lambda hw: att.flash_attention(b, h, n, d, hw, causal, dtype, order).time_s  # noqa: E731
        bwd = lambda hw: att.flash_attention_backward(b, h, n, d, hw, causal, dtype, order).time_s  # noqa: E731
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda hw: fwd(hw) + bwd(hw)}[pass_]


def aiconfigurator_points(data_dir: Path) -> list[Point]:
    base = data_dir / "measured"
    source = "aiconfigurator (vLLM 0.14, A100-SXM4-80GB)"
    points = []
    for row in _read_csv(base / "aiconfigurator-a100-vllm-gemm.csv"):
        m, n, k = int(row["m"]), int(row["n"]), int(row["k"])
        points.append(Point(source, "gemm", "gemm", "A100-80GB-SXM", {"m": m, "n": n, "k": k},
                            float(row["latency_ms"]) * 1e-3, lambda hw, m=m, n=n, k=k: gemm(m, n, k, hw, "bf16").time_s))  # fmt: skip
    for row in _read_csv(base / "aiconfigurator-a100-vllm-prefill-attention.csv"):
        b, n, h, hk, d = (int(row[k]) for k in ("batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim"))
        points.append(Point(source, "prefill attention", "vllm", "A100-80GB-SXM",
                            {"batch": b, "heads": h, "kv_heads": hk, "seqlen": n, "head_dim": d}, float(row["latency_ms"]) * 1e-3,
                            lambda hw, b=b, h=h, n=n, d=d: att.flash_attention(b, h, n, d, hw, True, "bf16", "fa2").time_s))  # fmt: skip
    for row in _read_csv(base / "aiconfigurator-a100-vllm-decode-attention.csv"):
        b, h, hk, d, ctx = (int(row[k]) for k in ("batch_size", "num_heads", "num_key_value_heads", "head_dim", "step"))
        points.append(Point(source, "decode attention", "vllm", "A100-80GB-SXM",
                            {"batch": b, "heads": h, "kv_heads": hk, "context": ctx, "head_dim": d}, float(row["latency_ms"]) * 1e-3,
                            lambda hw, b=b, h=h, hk=hk, ctx=ctx, d=d: att.flash_decoding(b, h, 1, ctx + 1, d, hw, None, "bf16", h_kv=hk).time_s))  # fmt: skip
    return points


VIDUR_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")  # fmt: skip


def _vidur_op(op: str, t: int, d: int, d_q: int, d_kv: int, d_ff: int, hw: HardwareProfile) -> float:
    """One Llama-2-7B operator as vidur profiles it, on T tokens, dims already split by TP."""
    if op in ("emb", "input_layernorm", "post_attention_layernorm"):
        return elementwise(t * d, hw, "fp16", reads=1, writes=1, flops_per_element=4).time_s
    if op == "add":
        return elementwise(t * d, hw, "fp16", reads=2, writes=1).time_s
    if op == "attn_rope":
        return elementwise(t * (d_q + d_kv), hw, "fp16", flops_per_element=3).time_s
    if op == "mlp_act":
        return elementwise(t * d_ff, hw, "fp16", reads=2, writes=1, flops_per_element=5).time_s
    m, n, k = {"attn_pre_proj": (t, d_q + 2 * d_kv, d), "attn_post_proj": (t, d, d_q),
               "mlp_up_proj": (t, 2 * d_ff, d), "mlp_down_proj": (t, d, d_ff)}[op]  # fmt: skip
    return gemm(m, n, k, hw, "fp16").time_s


def vidur_points(data_dir: Path) -> list[Point]:
    path = data_dir / "measured" / "vidur-a100-llama-2-7b-mlp.csv"
    source = "vidur (Llama-2-7B operators)"
    points = []
    for row in _read_csv(path):
        h, hk, d, d_ff = (int(row[k]) for k in ("n_head", "n_kv_head", "n_embd", "n_expanded_embd"))
        t, tp = int(row["num_tokens"]), int(row["num_tensor_parallel_workers"])
        d_head = d // h
        dims = (d, h // tp * d_head, max(1, hk // tp) * d_head, d_ff // tp)
        for op in VIDUR_OPS:
            kind = "gemm" if op.endswith("proj") else "elementwise"
            points.append(Point(source, op, kind, "A100-80GB-SXM", {"tokens": t, "tp": tp},
                                float(row[f"time_stats.{op}.median"]) * 1e-3,
                                lambda hw, op=op, t=t, dims=dims: _vidur_op(op, t, *dims, hw)))  # fmt: skip
    return points


def load_points(data_dir: Path = DEFAULT_DATA_DIR, per_series: int | None = None) -> list[Point]:
    """Every point of the shared data, each series split into calibration and held-out parts.
    `per_series` keeps at most that many evenly spaced points of each series (a quick run)."""
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such data directory (pass --data DIR)")
    series: dict[tuple, list[Point]] = defaultdict(list)
    for p in published_points(data_dir) + aiconfigurator_points(data_dir) + vidur_points(data_dir):
        series[(p.source, p.kernel, p.gpu)].append(p)
    points = []
    for members in series.values():
        if per_series is not None and len(members) > per_series:
            step = len(members) / per_series
            members = [members[int(i * step)] for i in range(per_series)]
        for i, p in enumerate(members):
            p.calibration = i % CALIBRATION_EVERY == 0
        points.extend(members)
    return points


# --- calibration and report -----------------------------------------------------------------

FITTED_FRACTIONS = ("bandwidth", "matmul", "attention")


def _with_efficiency(hw: HardwareProfile, efficiency: float) -> HardwareProfile:
    """The profile as seen by one kernel implementation: its attention and matmul fractions
    scaled by that implementation's efficiency (never above 1)."""
    a = hw.achievable
    achievable = a.model_copy(update={"attention": min(1.0, a.attention * efficiency), "matmul": min(1.0, a.matmul * efficiency)})
    return hw.model_copy(update={"achievable": achievable})


def predict_all(points: list[Point], profiles: dict[str, HardwareProfile], efficiency: dict[str, float]) -> np.ndarray:
    return np.array([p.predict(_with_efficiency(profiles[p.gpu], efficiency.get(p.implementation, 1.0))) for p in points])


def fit(points: list[Point], profiles: dict[str, HardwareProfile]) -> dict:
    """Least squares on log(predicted / measured) over the calibration points (scipy)."""
    from scipy.optimize import least_squares

    calib = [p for p in points if p.calibration]
    impls = sorted({p.implementation for p in calib})
    measured = np.array([p.measured_s for p in calib])
    # every series weighs the same in the fit, whether it has 4 points or 3000
    sizes: dict[tuple, int] = defaultdict(int)
    for p in calib:
        sizes[(p.source, p.kernel, p.gpu)] += 1
    weights = np.array([1.0 / math.sqrt(sizes[(p.source, p.kernel, p.gpu)]) for p in calib])
    base = profiles["A100-80GB-SXM"]

    def unpack(x):
        params = dict(zip((*FITTED_FRACTIONS, "launch_overhead_s"), (*x[:3], x[3] * 1e-6), strict=True))
        eff = {impl: x[4 + i] for i, impl in enumerate(impls)}
        return params, eff

    def residuals(x):
        params, eff = unpack(x)
        fitted = {name: hw.with_fit(params) for name, hw in profiles.items()}
        return weights * np.log(predict_all(calib, fitted, eff) / measured)

    x0 = [base.achievable.bandwidth, base.achievable.matmul, base.achievable.attention, base.launch_overhead_s * 1e6] + [1.0] * len(impls)
    lower = [0.05, 0.05, 0.05, 0.1] + [0.05] * len(impls)
    upper = [1.0, 1.0, 1.0, 50.0] + [3.0] * len(impls)
    result = least_squares(residuals, x0, bounds=(lower, upper), x_scale="jac")
    params, eff = unpack(result.x)
    return {"params": params, "efficiency": eff, "calibration_points": len(calib), "cost": float(result.cost)}


def summarise(points: list[Point], predicted: np.ndarray) -> list[dict]:
    """MAPE, median APE and worst case per (source, kernel, gpu), for calibration and held-out points."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(points):
        groups[(p.source, p.kernel, p.gpu, "calibration" if p.calibration else "held-out")].append(i)
    rows = []
    for (source, kernel, gpu, part), idx in sorted(groups.items()):
        ape = np.abs(predicted[idx] / np.array([points[i].measured_s for i in idx]) - 1.0)
        worst = idx[int(np.argmax(ape))]
        rows.append({"source": source, "kernel": kernel, "gpu": gpu, "part": part, "n": len(idx),
                     "mape": float(ape.mean()), "median_ape": float(np.median(ape)), "worst_ape": float(ape.max()),
                     "worst_shape": points[worst].shape})  # fmt: skip
    return rows


def validate(data_dir: Path = DEFAULT_DATA_DIR, calibrate: bool = True, per_series: int | None = None) -> dict:
    points = load_points(data_dir, per_series)
    profiles = {name: load_profile(name.lower()) for name in {p.gpu for p in points}}
    before = predict_all(points, profiles, {})
    result = {"data_dir": str(data_dir), "points": len(points), "calibration_rule": f"every {CALIBRATION_EVERY}rd point of each series"}
    if calibrate:
        fitted = fit(points, profiles)
        profiles = {name: hw.with_fit(fitted["params"]) for name, hw in profiles.items()}
        after = predict_all(points, profiles, fitted["efficiency"])
        result["fit"] = fitted
    else:
        after = before
    held = np.array([not p.calibration for p in points])
    published = np.array([p.dataset == "published" for p in points])
    ape_after = np.abs(after / np.array([p.measured_s for p in points]) - 1.0)
    ape_before = np.abs(before / np.array([p.measured_s for p in points]) - 1.0)
    result.update(
        {
            "held_out_mape": float(ape_after[held].mean()),
            "held_out_median_ape": float(np.median(ape_after[held])),
            "held_out_mape_published": float(ape_after[held & published].mean()),
            "held_out_mape_measured": float(ape_after[held & ~published].mean()),
            "uncalibrated_mape": float(ape_before.mean()),
            "groups": summarise(points, after),
        }
    )
    result["_points"], result["_predicted"] = points, after
    return result


def format_validation(result: dict) -> str:
    lines = [f"{result['points']} points from {result['data_dir']}; calibration on {result['calibration_rule']}"]
    if "fit" in result:
        p, eff = result["fit"]["params"], result["fit"]["efficiency"]
        lines.append("Fitted A100 fractions: " + ", ".join(f"{k} {p[k]:.3f}" for k in FITTED_FRACTIONS)
                     + f", launch overhead {p['launch_overhead_s'] * 1e6:.2f} us")  # fmt: skip
        lines.append("Kernel efficiency vs profile: " + ", ".join(f"{k} {v:.2f}" for k, v in eff.items()))
    lines.append(f"{'source':<36} {'kernel':<26} {'gpu':<14} {'part':<11} {'n':>5} {'MAPE':>7} {'median':>7} {'worst':>7}")
    for g in result["groups"]:
        lines.append(f"{g['source'][:36]:<36} {g['kernel'][:26]:<26} {g['gpu']:<14} {g['part']:<11} {g['n']:>5} "
                     f"{g['mape']:>6.1%} {g['median_ape']:>6.1%} {g['worst_ape']:>6.1%}")  # fmt: skip
    lines.append(f"Held-out MAPE: published {result['held_out_mape_published']:.1%}, measured {result['held_out_mape_measured']:.1%}; "
                 f"all {result['held_out_mape']:.1%} (median {result['held_out_median_ape']:.1%}); "
                 f"before calibration, all points: {result['uncalibrated_mape']:.1%}")  # fmt: skip
    return "\n".join(lines)


def plot_validation(result: dict, path: Path) -> Path:
    from simulator.plots import plt, save_figure

    points, predicted = result["_points"], result["_predicted"]
    fig, ax = plt.subplots(figsize=(6.4, 6.0))
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(points):
        by_source[p.source].append(i)
    for source, idx in by_source.items():
        held = [i for i in idx if not points[i].calibration]
        ax.scatter([points[i].measured_s for i in held], predicted[held], s=6, alpha=0.5, label=source)
    lo = min(min(p.measured_s for p in points), float(predicted.min()))
    hi = max(max(p.measured_s for p in points), float(predicted.max()))
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="y = x")
    ax.set(xscale="log", yscale="log", xlabel="measured (s)", ylabel="predicted (s)",
           title=f"A100 held-out points: MAPE {result['held_out_mape']:.1%}")  # fmt: skip
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)

