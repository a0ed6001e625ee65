"""Published attention measurements (FlashAttention and FlashAttention-2 papers, the Triton
fused-attention tutorial, the Flash-Decoding blog; `published-attention` tables): each row priced
with what its source states was run, by the analytical attention model of `simulator.attention`.

The eager PyTorch baseline's passes over the N x N matrix (`PYTORCH_PASSES`), FA2's unsplit forward
kernel for the Flash-Decoding blog's FlashAttention column, split-KV decode for its Flash-Decoding
column, and for its PyTorch column the copies torch.matmul makes of xFormers' [B, N, H, d] K and V.
Fused kernels run with the block sizes their releases launch (`RELEASED_BLOCKS`): the programs
they deal to the SMs, their padded and causal-diagonal tiles and FA1's split-K sums follow from
them (`simulator.attention.fused_kernel_s`). A timed Python call takes max(device time, host
time), host time = the operators its benchmark code issues and the kernels they launch
(`HOST_OPS`) x one per-operator host time. Fitted (`fit`) on every third point of each series (a
series is one source, kernel, pass and GPU, in file order): the A100 profiles' achievable
fractions, launch overhead, the per-operator host time and one efficiency per kernel
implementation (FA1 and PyTorch's unfused attention in two releases each, FA2, the Triton
tutorial kernel, Flash-Decoding), minimising the mean absolute percentage error; the error is
reported on the other two thirds, which the fit never sees. All the published rows are A100s
(40 and 80 GB: one chip), so they have no leave-one-GPU-out split."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from simulator import attention as att
from simulator.hardware import HardwareProfile

CALIBRATION_EVERY = 3  # every third point of a series calibrates; the rest is held out


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
    host_ops: int = 0  # host-side operators one timed call issues (HOST_OPS); 0: device time only


# --- reading the data -----------------------------------------------------------------------


def _flops(pass_: str, b: int, h: int, n: int, d: int, causal: bool) -> float:
    """flash-attention's benchmark convention: fwd 4 B H N^2 d (half if causal), bwd 2.5x fwd."""
    fwd = att.attention_flops(b, h, n, d, causal)
    return {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_] * fwd


# What each source's eager PyTorch baseline did to the N x N matrix (besides the GEMMs):
# FlashAttention paper App. E.5: Tables 18-20 are "with dropout and masking" (dropout 0.1, a padding
#   mask); the repository's benchmark of mid-2022 (benchmarks/benchmark_flash_attention.py,
#   attention_ref) runs scores.masked_fill_(mask), softmax, F.dropout. The dropout cannot have been
#   a materialised pass in the PyTorch rows: Table 18 times a forward at N = 8192 on the 40 GB card,
#   and S, P, dropout(P) and its keep-mask of that shape take 60 GB (`att.unfused_forward_peak_bytes`;
#   S and P alone, 34 GB, fit), and the forward's time at N = 4096 with the dropout pass would need
#   more than the card's peak bandwidth. So the rows are priced with masked_fill_ and softmax only,
#   forward and backward alike (one function is timed for both).
# FlashAttention-2 paper Fig. 4 (benchmarks/benchmark_flash_attention.py): baddbmm with alpha (the
#   scale folded in), when causal an fp32 [N, N] mask built by torch.full/triu and added, softmax,
#   dropout_p = 0 (a no-op).
PYTORCH_PASSES: dict[str, Callable[[bool], att.UnfusedPasses]] = {
    "FlashAttention paper": lambda causal: att.UnfusedPasses(mask="fill"),
    "FlashAttention-2 paper Fig.4 / flash-attention README": lambda causal: att.UnfusedPasses(mask="add" if causal else "none"),
}
# Whose efficiency applies to a published kernel. The Flash-Decoding blog's "FlashAttention" column
# is FA2's forward kernel; "Flash-Decoding" is its own split-KV kernel (xFormers). FA1 comes in two
# releases: the FlashAttention paper's own kernels (2022, run with dropout and masking on an
# A100-40GB) and flash-attn 1.x as the FlashAttention-2 paper benchmarks it. Their eager PyTorch
# baselines differ as well: the PyTorch of mid-2022 on the 40 GB card, and that of 2023.
IMPLEMENTATION = {"triton-tutorial": "triton", "flash-decoding": "flash-decoding"}
RELEASE = {("FlashAttention paper", "fa1"): "fa1-2022", ("FlashAttention paper", "pytorch"): "pytorch-2022"}

# Host side of a timed call: the sources time Python calls (torch.utils.benchmark / CUDA events
# around a Python loop), so a call takes max(device time, host time), host time = the operators
# its Python issues x one per-operator host time fitted on the calibration part (`host_op_s`).
# A host operator is a Python-level call, and each CUDA kernel a call launches counts once more (the
# launch and PyTorch's per-kernel set-up cost the host about what a call does), so a call that
# launches no kernel (a slice, an allocation) counts 1 and an einsum that copies both operands and
# runs a bmm counts 1 + 3. Counted from the benchmark code each source ran, per forward and
# backward; a fwd+bwd call adds 2 (flash-attention's benchmark_combined draws the output gradient
# with torch.randn_like, a call and its kernel).
# - FlashAttention paper, PyTorch (attention_ref): forward unbind, k / sqrt(d), einsum, ~mask,
#   rearrange, masked_fill_, softmax, F.dropout, einsum, .to (10 calls); kernels: the scale of K,
#   the first einsum's copies of its two permuted operands and its bmm, ~mask, masked_fill_,
#   softmax, the second einsum's copy of V and its bmm (9; no dropout pass ran, see
#   PYTORCH_PASSES, and .to is to the same dtype). Backward y.backward plus one autograd node per
#   differentiable op: unbind, div, einsum, masked_fill_, softmax, dropout, einsum (8 calls);
#   kernels: two bmm per einsum, the softmax and masked_fill_ backward, the scale's, the stack of
#   dq, dk, dv into the qkv gradient and its accumulation into qkv.grad, which the harness of 2022
#   never clears (9).
# - FlashAttention paper, FA1 (flash_attn_unpadded_qkvpacked_func, 2022): forward Function.apply,
#   cuda.get_rng_state, qkv[:, 0..2] and the slice for empty_like, empty_like, the extension call
#   and its softmax_lse allocation (9 calls), one kernel; backward y.backward, the node,
#   get/set_rng_state and the restore, empty_like(qkv) and its three slices, the extension call
#   and its softmax_d allocation (11 calls); kernels: the backward, the copy of its fp32 dQ into
#   the gradient, the accumulation into qkv.grad (3).
# - FlashAttention-2 paper Fig. 4, PyTorch (attention_pytorch): forward unbind, two rearranges of two
#   ops each, torch.empty, baddbmm, rearrange, softmax, F.dropout, einsum, .to (12 calls); kernels:
#   the copies the rearranges of Q and K make, baddbmm, softmax, the einsum's copy of V and its bmm
#   (6; dropout_p = 0 launches none); causal adds torch.full, triu, .to and the add, a kernel each
#   (4 + 4). Backward y.backward plus a node each for unbind, the rearranges, baddbmm, the add,
#   softmax, dropout, einsum (9 calls); kernels: two bmm for the einsum, the softmax backward,
#   baddbmm's two bmm and their scaling by alpha, the stack into the qkv gradient (8; the harness
#   sets .grad to None before each backward, so nothing accumulates).
# - FlashAttention-2 paper Fig. 4, FA1 / FA2 (flash_attn_qkvpacked_func): forward Function.apply,
#   three slices and their detach, the extension call and its out, lse, rng_state allocations (11
#   calls), one kernel; backward y.backward, the node, empty_like for dq, dk, dv, three slices, the
#   extension call and its two fp32 buffers (10 calls); kernels: FA2's D pass (which zeroes dQ's
#   accumulator), main kernel and dQ cast (3), FA1's main kernel and dQ copy (2).
# - Triton tutorial: one forward, the autograd Function, empty_like for O, the LSE buffer and the
#   kernel launch (4 calls), one kernel.
# The Flash-Decoding blog's rows come from xFormers' benchmarks/benchmark_attn_decoding.py (B =
# 2^(16-i), N = 2^i, 16 query and 2 KV heads, d = 128), whose harness (benchmark_main_helper2)
# captures each call in a CUDA graph and times its replays: device time only, no host operators.
HOST_OPS: dict[tuple[str, str], dict[str, int]] = {
    ("FlashAttention paper", "pytorch"): {"fwd": 19, "bwd": 17},
    ("FlashAttention paper", "fa1"): {"fwd": 10, "bwd": 14},
    ("FlashAttention-2 paper Fig.4 / flash-attention README", "pytorch"): {"fwd": 18, "bwd": 17, "causal": 8},
    ("FlashAttention-2 paper Fig.4 / flash-attention README", "fa1"): {"fwd": 12, "bwd": 12},
    ("FlashAttention-2 paper Fig.4 / flash-attention README", "fa2"): {"fwd": 12, "bwd": 13},
    ("Triton tutorial 06-fused-attention", "triton-tutorial"): {"fwd": 5, "bwd": 0},
}


def host_ops(source: str, kernel: str, pass_: str, causal: bool) -> int:
    """Host-side operators of one timed call (see HOST_OPS); 0 where the harness is unknown."""
    ops = HOST_OPS.get((source, kernel))
    if ops is None or pass_ == "decode":
        return 0
    fwd = ops["fwd"] + (ops.get("causal", 0) if causal else 0)
    return {"fwd": fwd, "bwd": ops["bwd"], "fwd+bwd": fwd + ops["bwd"] + 2}[pass_]


def published_points(table: pd.DataFrame) -> list[Point]:
    """One Point per published row (`simulator.data`'s `published-attention` table, GPUs resolved)."""
    points = []
    for row in table.to_dict("records"):
        b, h, hk, n, d = (int(row[k]) for k in ("batch", "heads", "kv_heads", "seqlen", "head_dim"))
        causal, pass_, kernel = str(row["causal"]) == "1", row["pass"], row["kernel"]
        value = float(row["measured_value"])
        if row["metric"] == "tflops":
            measured_s = _flops(pass_, b, h, n, d, causal) / (value * 1e12)
        else:
            measured_s = value * {"ms": 1e-3, "us": 1e-6}[row["metric"]]
        source = row["source"].split(" (")[0]
        impl = RELEASE.get((source, kernel), IMPLEMENTATION.get(kernel, kernel))
        passes = PYTORCH_PASSES.get(source, lambda causal: att.DEFAULT_PASSES)(causal)
        predict = _attention_predictor(kernel, pass_, b, h, hk, n, d, causal, row["dtype"], passes)
        points.append(
            Point(source, f"{kernel} {pass_}", impl, row["gpu"],
                  {"batch": b, "heads": h, "kv_heads": hk, "seqlen": n, "head_dim": d, "causal": causal}, measured_s, predict,
                  dataset="published", host_ops=host_ops(source, kernel, pass_, causal))
        )  # fmt: skip
    series: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        series[(p.source, p.kernel, p.gpu)].append(p)
    for members in series.values():
        for i, p in enumerate(members):
            p.calibration = i % CALIBRATION_EVERY == 0
    return points


# The block sizes (Br, Bc) the released kernels are launched with on an A100, fp16, by pass and head
# dimension. FlashAttention-2 on compute capability 8.0 (flash-attention v2,
# csrc/flash_attn/src/flash_fwd_launch_template.h, run_mha_fwd_hdim64/128: kBlockM x kBlockN
# 128 x 128 and 128 x 64; run_mha_fwd_splitkv_dispatch, the split-KV kernel: 64 x 256 and 64 x 128;
# flash_bwd_launch_template.h, run_mha_bwd_hdim64/128 with 163 KB of shared memory per block:
# 128 x 128 and 64 x 128). The Triton tutorial of 2023 (python/tutorials/06-fused-attention.py):
# BLOCK_M = 128, BLOCK_N = 64 for d <= 64, else 32. FA1 (flash-attention 1.x,
# csrc/flash_attn/fmha_api.cpp: blocksize_c = 256 keys per step for d <= 64, else 128; its rows are
# priced with the paper's Br = min(Bc, d) = d, its kernels stepping through them 16 at a time).
RELEASED_BLOCKS: dict[tuple[str, str, int], tuple[int, int]] = {
    ("fa2", "fwd", 64): (128, 128), ("fa2", "fwd", 128): (128, 64),
    ("fa2", "bwd", 64): (128, 128), ("fa2", "bwd", 128): (64, 128),
    ("flash-decoding", "fwd", 64): (64, 256), ("flash-decoding", "fwd", 128): (64, 128),
    ("triton-tutorial", "fwd", 64): (128, 64), ("triton-tutorial", "fwd", 128): (128, 32),
    ("fa1", "fwd", 64): (64, 256), ("fa1", "fwd", 128): (128, 128),
    ("fa1", "bwd", 64): (64, 256), ("fa1", "bwd", 128): (128, 128),
}  # fmt: skip


def _attention_predictor(kernel, pass_, b, h, hk, n, d, causal, dtype, passes=att.DEFAULT_PASSES) -> Callable[[HardwareProfile], float]:
    if pass_ == "decode":  # one query token per sequence against n cached keys
        if kernel == "pytorch":  # xFormers' benchmark holds K, V as [B, N, H, d] and permutes them
            return lambda hw: att.standard_decode(b, h, hk, n, d, hw, dtype, kv_layout="bnhd").time_s
        if kernel == "fa2":
            blocks = RELEASED_BLOCKS.get(("fa2", "fwd", d))
            return lambda hw: att.flash_forward_decode(b, h, hk, 1, n, d, hw, dtype, blocks).time_s
        split = RELEASED_BLOCKS.get(("flash-decoding", "fwd", d))
        return lambda hw: att.flash_decoding(b, h, 1, n, d, hw, None, dtype, h_kv=hk, blocks=split).time_s
    order = "fa1" if kernel == "fa1" else "fa2"
    if kernel == "pytorch":
        fwd = lambda hw: att.standard_attention(b, h, n, d, hw, causal, dtype, passes).time_s  # noqa: E731
        bwd = lambda hw: att.standard_attention_backward(b, h, n, d, hw, causal, dtype, passes).time_s  # noqa: E731
    else:
        fb, bb = (RELEASED_BLOCKS.get((kernel, p, d)) for p in ("fwd", "bwd"))
        fwd = lambda hw: att.flash_attention(b, h, n, d, hw, causal, dtype, order, fb).time_s  # noqa: E731
        bwd = lambda hw: att.flash_attention_backward(b, h, n, d, hw, causal, dtype, order, bb).time_s  # noqa: E731
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda hw: fwd(hw) + bwd(hw)}[pass_]


# --- calibration and report -----------------------------------------------------------------

FITTED_FRACTIONS = ("bandwidth", "matmul", "attention")
# The fractions an implementation's efficiency scales: fused attention kernels and GEMMs are
# limited by their tensor-core work; eager PyTorch passes, elementwise kernels and split-KV decode
# (one query row per sequence) by HBM traffic.
MEMORY_BOUND_IMPLEMENTATIONS = {
    "pytorch": ("bandwidth", "matmul"),
    "pytorch-2022": ("bandwidth", "matmul"),
    "elementwise": ("bandwidth", "matmul"),
    "flash-decoding": ("bandwidth",),
}
COMPUTE_FRACTIONS = ("attention", "matmul")
HOST_OP_START_S = 10e-6  # starting point of the fitted per-operator host time: eager PyTorch ops cost microseconds on the host
APE_SMOOTHING = 0.01  # |r| is fitted as sqrt(r^2 + 0.01^2): the MAPE, made differentiable at r = 0


def _with_efficiency(hw: HardwareProfile, efficiency: float, implementation: str = "") -> HardwareProfile:
    """The profile as seen by one kernel implementation: the fractions that bound it (see
    MEMORY_BOUND_IMPLEMENTATIONS; compute fractions otherwise) scaled by its efficiency, never above 1."""
    a = hw.achievable
    scaled = MEMORY_BOUND_IMPLEMENTATIONS.get(implementation, COMPUTE_FRACTIONS)
    achievable = a.model_copy(update={k: min(1.0, getattr(a, k) * efficiency) for k in scaled})
    return hw.model_copy(update={"achievable": achievable})


def predict_all(
    points: list[Point], profiles: dict[str, HardwareProfile], efficiency: dict[str, float], host_op_s: float = 0.0
) -> np.ndarray:
    """Seconds per point: the device time on the profile as its implementation sees it, or the host
    time of the call (`host_ops` x `host_op_s`) where that is longer."""
    seen: dict[tuple[str, str], HardwareProfile] = {}  # one profile copy per (GPU, implementation)

    def profile(p: Point) -> HardwareProfile:
        key = (p.gpu, p.implementation)
        if key not in seen:
            seen[key] = _with_efficiency(profiles[p.gpu], efficiency.get(p.implementation, 1.0), p.implementation)
        return seen[key]

    return np.array([max(p.predict(profile(p)), p.host_ops * host_op_s) for p in points])


def fit_weights(points: list[Point]) -> np.ndarray:
    """Weight of each point in the fit: the published and the measured data weigh half each (they
    are reported apart, and the measured files hold a hundred times more points), and within
    each dataset every point the same, as the reported MAPE counts them."""
    count = defaultdict(int)
    for p in points:
        count[p.dataset] += 1
    return np.array([1.0 / (len(count) * count[p.dataset]) for p in points])


def fit(points: list[Point], profiles: dict[str, HardwareProfile]) -> dict:
    """Minimise the weighted mean absolute percentage error over the calibration points (scipy
    least squares on residuals sqrt(w_i) (r_i^2 + s^2)^(1/4), r_i = predicted/measured - 1, whose
    squares sum to the weighted, smoothed MAPE)."""
    from scipy.optimize import least_squares

    calib = [p for p in points if p.calibration]
    impls = sorted({p.implementation for p in calib})
    measured = np.array([p.measured_s for p in calib])
    root_weights = np.sqrt(fit_weights(calib))
    base = profiles["A100-80GB-SXM"] if "A100-80GB-SXM" in profiles else next(iter(profiles.values()))

    shared = (*FITTED_FRACTIONS, "launch_overhead_s", "host_op_s")

    def unpack(x):
        params = dict(zip(shared, (*x[:3], x[3] * 1e-6, x[4] * 1e-6), strict=True))
        eff = {impl: x[len(shared) + i] for i, impl in enumerate(impls)}
        return params, eff

    def residuals(x):
        params, eff = unpack(x)
        fitted = {name: hw.with_fit(params) for name, hw in profiles.items()}
        r = predict_all(calib, fitted, eff, params["host_op_s"]) / measured - 1.0
        return root_weights * (r * r + APE_SMOOTHING**2) ** 0.25

    # Each efficiency moves only its implementation's points: telling scipy so lets it difference
    # all of them in one evaluation instead of one each.
    sparsity = np.ones((len(calib), len(shared) + len(impls)), dtype=bool)
    sparsity[:, len(shared):] = [[p.implementation == impl for impl in impls] for p in calib]
    x0 = [base.achievable.bandwidth, base.achievable.matmul, base.achievable.attention, base.launch_overhead_s * 1e6,
          HOST_OP_START_S * 1e6] + [1.0] * len(impls)  # fmt: skip
    lower = [0.05, 0.05, 0.05, 0.1, 0.0] + [0.05] * len(impls)
    upper = [1.0, 1.0, 1.0, 50.0, 200.0] + [3.0] * len(impls)
    result = least_squares(residuals, x0, bounds=(lower, upper), x_scale="jac", ftol=1e-4, xtol=1e-4, jac_sparsity=sparsity)
    params, eff = unpack(result.x)
    return {"params": params, "efficiency": eff, "calibration_points": len(calib), "cost": float(result.cost),
            "evaluations": int(result.nfev)}  # fmt: skip


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


