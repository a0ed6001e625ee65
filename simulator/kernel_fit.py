"""Fitting the GPU kernel model to measured tables, and the splits that say how well it predicts.

A fit group is one kernel family on the rows it explains (GEMMs of one dtype; prefill and decode
attention of one library, fitted together since they run the same kernels; collectives). Its
parameters are fitted by robust least squares on log(predicted / measured) (a soft-L1 loss, so a
few wild cells do not steer it), every GPU in the fit weighing the same; a parameter marked
per-generation gets a log-deviation per generation present, with a Gaussian prior of width
`GENERATION_PRIOR` pulling it to the common value (`GROUP_GENERATION_PRIOR` for one a group marks
per generation beyond its family's). A source's timer parameters (`sources`) also
hold the host its harness ran on (its Python and launch work, its graph replays), and every GPU's
table was measured on a host of its own: they get a log-deviation per GPU in the fit, with a wider
prior (`HOST_PRIOR`); a GPU the fit never saw takes the common value.

Splits (`evaluate`): `leave_one_gpu_out` fits on every other GPU's rows and predicts this GPU's;
`in_gpu` fits on every third row of each of this GPU's files (in file order) and predicts the
rest; `few_shot` adds K rows of the predicted GPU, spread evenly over its table, to a
leave-one-GPU-out fit. A split never reads rows it predicts (a test poisons them to show it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from simulator.errors import UserError
from simulator.gpu_model import collectives, kernels, sources
from simulator.gpu_model.device import GEMM_DTYPES, Dev
from simulator.gpu_model.params import Fitted, family
from simulator.hardware import HardwareProfile

GENERATION_PRIOR = 0.3  # prior width of a per-generation log-deviation (a factor of e^0.3 = 1.35)
HOST_PRIOR = 1.0  # prior width of a per-host log-deviation of a timer parameter (hosts differ by factors, not percents)
GROUP_GENERATION_PRIOR = 1.0  # of the deviation of a parameter a group marks per generation (`Group.per_generation`: its generations differ by factors)
HOST_RANGE = 5.0  # a host parameter's log-deviation may lower it to e^-5 of its start
FIT_ROWS_PER_GPU = 600  # rows of each GPU a fit samples (fixed seed); every row is predicted
LOSS_SCALE = 0.1  # soft-L1 scale of the log residual: residuals beyond ~10% count linearly
CALIBRATION_EVERY = 3  # in-GPU split: every third row of each file fits, the rest is held out
SEED = 0


@dataclass(frozen=True)
class Group:
    name: str
    family: str
    kinds: tuple[str, ...]
    select: Callable[[pd.DataFrame], np.ndarray]
    predict: Callable[[dict, dict, Dev, pd.DataFrame, dict], np.ndarray]
    timer_params: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # groups whose fits (of the same split) its predictions use
    uses_family: Callable[[pd.DataFrame], np.ndarray] | None = None  # rows priced with the group's own parameters (default: all)
    held: tuple[str, ...] = ()  # family parameters the group's rows never use: held at their start, not fitted
    unidentified: Callable[[pd.DataFrame, Dev], tuple[str, ...]] | None = None  # parameters a frame's rows cannot tell apart: held too
    per_generation: tuple[str, ...] = ()  # family parameters this group fits per generation besides the family's own

    def own_rows(self, frame: pd.DataFrame) -> np.ndarray:
        return self.uses_family(frame) if self.uses_family else np.ones(len(frame), dtype=bool)


def quantized_params(P_own: dict, base: dict) -> dict:
    """A quantized GEMM's parameters: the bf16 GEMM's (memory system, tiles, L2) with the
    quantized path's own MMA efficiency and kernel costs over them."""
    return {**base, **{k: v for k, v in P_own.items() if k in sources.QUANTIZED_OWN}}


_SOURCE_ROWS: dict[int, tuple] = {}


def source_rows(f: pd.DataFrame) -> dict:
    """{(framework, version): row indices} of a frame (version "" where it has none), computed once
    per frame: a fit predicts the same frame at every step, and grouping it each time cost ~1 ms."""
    hit = _SOURCE_ROWS.get(id(f))
    if hit is not None and hit[0]() is f and hit[1] == len(f):
        return hit[2]
    versions = f["version"] if "version" in f else pd.Series("", index=f.index)
    rows = f.groupby([f["framework"], versions], dropna=False).indices
    if len(_SOURCE_ROWS) > 256:
        _SOURCE_ROWS.clear()
    _SOURCE_ROWS[id(f)] = (weakref.ref(f), len(f), rows)
    return rows


def _predict_gemm(dtype: str):
    def predict(P, T, dev, f, ctx):
        if dtype not in ("bf16", "fp16"):
            if "gemm:bf16" not in ctx:
                return np.full(len(f), np.nan)
            P = quantized_params(P, ctx["gemm:bf16"].fitted.values(dev.generation))
        out = np.empty(len(f))
        for (framework, version), idx in source_rows(f).items():
            timer = sources.gemm_timer(framework, dtype, version)
            sub = f.iloc[idx]
            Pi = {k: v[idx] for k, v in P.items()}
            di = dev.take(idx)
            t = sources.gemm_call(Pi, di, sub["m"].to_numpy(), sub["n"].to_numpy(), sub["k"].to_numpy(), dtype, timer.weight_copies,
                                 timer.replays * timer.calls_per_replay, timer.fp8_quant)
            out[idx] = sources.timed(t, timer, {k: v[idx] for k, v in T.items()}, di)
        return out

    return predict


def merge_latency(dev: Dev, ctx: dict) -> np.ndarray:
    """t_merge_ns per row: the FlashAttention family's (its fit in `ctx`, else its start), which
    TensorRT-LLM's multi-CTA reduction shares with FlashAttention's combine kernel (both walk a
    row's partials one split after another; `kernels.attention_time`)."""
    fit = ctx.get("attention:fa2")
    if fit is None:
        return np.full(len(dev.generation), family("fa2")["t_merge_ns"].start)
    return fit.fitted.values(dev.generation)["t_merge_ns"]


def _predict_attention(library: str):
    def predict(P, T, dev, f, ctx):
        if library == "flashinfer":
            P = {**P, "t_merge_ns": merge_latency(dev, ctx)}
        # one timer per (framework, version) a table names, not per row: this runs at every step of a fit
        write, graph, query = (np.ones(len(f), dtype=bool) for _ in range(3))
        plan_h, plan_hk, graph_tokens = (np.full(len(f), np.nan) for _ in range(3))
        b = f["b"].to_numpy()
        for (framework, version), idx in source_rows(f).items():
            timer = sources.attention_timer(framework, library, version)
            write[idx], graph[idx], query[idx] = timer.cache_write, timer.graph, timer.query_quant
            graph_tokens[idx] = timer.graph_tokens(b[idx])
            if timer.plan_heads is not None:
                plan_h[idx], plan_hk[idx] = timer.plan_heads
        t = kernels.attention_time(P, dev, library, *(f[c].to_numpy() for c in ("b", "h", "hk", "d", "n_q", "n_kv", "kv_bytes")), cache_write=write,
                                   query_quant=query, plan_heads=(plan_h, plan_hk), graph_tokens=graph_tokens)  # fmt: skip
        return np.where(graph, sources.timed(t, sources.attention_timer("vllm"), T, dev), t)

    return predict


def _predict_collective(P, T, dev, f, ctx):
    link = (f["link_bytes_per_s"].to_numpy(), f["link"].to_numpy())
    return collectives.collective_time(P, dev, f["op"].to_numpy(), f["n_gpus"].to_numpy(), f["bytes"].to_numpy(), link, f["element_bytes"].to_numpy())


# vidur's operators (profiled one kernel at a time by CUPTI: kernel time only): its GEMMs, and the
# memory-bound kernels as (model kernel, bytes moved per element of the op's width, width).
VIDUR_GEMMS = {"attn_pre_proj": "qkv", "attn_post_proj": "o", "mlp_up_proj": "up", "mlp_down_proj": "down"}
VIDUR_MEMORY = {"emb": ("embed", 4.0), "input_layernorm": ("norm", 4.0), "post_attention_layernorm": ("norm", 4.0),
                "attn_rope": ("rope", 4.0), "mlp_act": ("swiglu", 6.0), "add": ("add", 6.0)}  # fmt: skip


def _vidur_shapes(f: pd.DataFrame):
    """(m, n, k) of each GEMM op and the element count of each memory op, dims split by TP."""
    t, tp = f["tokens"].to_numpy(float), f["tp"].to_numpy(float)
    d, h, hk, d_ff = (f[c].to_numpy(float) for c in ("d_model", "heads", "kv_heads", "d_ff"))
    d_head = d / h
    d_q, d_kv, d_ffp = h / tp * d_head, np.maximum(1.0, hk / tp) * d_head, d_ff / tp
    op = f["op"].to_numpy()
    n = np.select([op == "attn_pre_proj", op == "attn_post_proj", op == "mlp_up_proj", op == "mlp_down_proj"], [d_q + 2 * d_kv, d, 2 * d_ffp, d], d)
    k = np.select([op == "attn_pre_proj", op == "attn_post_proj", op == "mlp_up_proj", op == "mlp_down_proj"], [d, d_q, d, d_ffp], d)
    width = np.select([op == "attn_rope", op == "mlp_act"], [d_q + d_kv, d_ffp], d)
    return t, n, k, t * width


def _predict_operators(P, T, dev, f, ctx):
    t, n, k, elements = _vidur_shapes(f)
    op = f["op"].to_numpy()
    gemm_rows = np.isin(op, list(VIDUR_GEMMS))
    out = np.full(len(f), np.nan)
    if "gemm:bf16" in ctx and gemm_rows.any():
        idx = np.flatnonzero(gemm_rows)
        fit = ctx["gemm:bf16"]
        di = dev.take(idx)
        Pg = fit.fitted.values(di.generation)
        out[idx] = sources.gemm_call(Pg, di, t[idx], n[idx], k[idx], "fp16", 1.0, sources.KERNEL_ONLY.replays)
    memory = ~gemm_rows
    if "attention:fa2" in ctx and memory.any():
        idx = np.flatnonzero(memory)
        di = dev.take(idx)
        P_mem = ctx["attention:fa2"].fitted.values(di.generation)
        c_kernel = ctx["gemm:bf16"].fitted.values(di.generation)["c_kernel"] if "gemm:bf16" in ctx else 2000.0
        kernel = np.asarray([VIDUR_MEMORY[o][0] for o in op[idx]], dtype=object)
        per_element = np.asarray([VIDUR_MEMORY[o][1] for o in op[idx]])
        P_op = {name: v[idx] for name, v in P.items()}
        out[idx] = kernels.operator_time(P_mem, P_op, c_kernel, di, kernel, elements[idx] * per_element)
    return out


def _is(column: str, value: str) -> Callable[[pd.DataFrame], np.ndarray]:
    return lambda f: (f[column] == value).to_numpy()


def _softmax_unidentified(frame: pd.DataFrame, dev: Dev) -> tuple[str, ...]:
    """x_sfu, the softmax's SFU-rate instructions per score, where no prefill row's kernels overlap
    the softmax with the MMAs: a program that does one after the other at one head dimension only
    scales its iteration, as a lower f_cta does, and a decode call's few scores per byte of K/V
    leave it to absorb what is not the softmax."""
    cols = [frame[c].to_numpy(float) for c in ("b", "h", "hk", "d", "n_q", "n_kv", "kv_bytes")]
    return () if (kernels.softmax_overlapped("flashinfer", dev, *cols) & (cols[4] > 1)).any() else ("x_sfu",)


GROUPS: dict[str, Group] = {
    "gemm:bf16": Group("gemm:bf16", "gemm", ("gemm",), _is("dtype", "bf16"), _predict_gemm("bf16"), ("c_floor",)),
    # quantized GEMMs run on the bf16 GEMM's memory system and tiles: only their MMA rate and kernel
    # costs (the activation quantization's included) are their own; fp8's quantization runs fused or
    # op by op (no q_rate), the others' in their kernels (no bw_ew): `kernels.quantize_time`
    **{f"gemm:{d}": Group(f"gemm:{d}", "gemm_quantized", ("gemm",), _is("dtype", d), _predict_gemm(d),
                          ("c_floor", "t_host_us") if d == "fp8_block" else ("c_floor",), needs=("gemm:bf16",),
                          held=("q_rate",) if d == "fp8" else ("bw_ew",))
       for d in ("fp8", "fp8_block", "nvfp4")},  # fmt: skip
    # FlashAttention-2 runs prefill and decode through one kernel (its split-KV kernel): one fit.
    "attention:fa2": Group("attention:fa2", "fa2", ("prefill-attention", "decode-attention"), _is("library", "fa2"), _predict_attention("fa2"), ("c_floor",)),
    # FlashInfer decodes with its decode kernel and prefills with its prefill kernel: a fit each.
    # A prefill's compulsory traffic (Q, O, the new K/V) reaches a fraction of DRAM of each generation's
    # own: GB200's TensorRT-LLM context kernels reach a quarter to a third of what FlashInfer's own
    # kernels do on Ada and RTX Blackwell. A decode's long K/V stream reaches the same fraction on
    # all three: a common one.
    # Decode on TensorRT-LLM's kernels reduces its K/V splits at FlashAttention's per-split latency (`merge_latency`).
    **{f"attention:flashinfer-{k}": Group(f"attention:flashinfer-{k}", "flashinfer", (f"{k}-attention",), _is("library", "flashinfer"), _predict_attention("flashinfer"), ("c_floor",),
                                          unidentified=_softmax_unidentified, per_generation=("f_bw",) if k == "prefill" else (),
                                          needs=("attention:fa2",) if k == "decode" else ())
       for k in ("prefill", "decode")},  # fmt: skip
    "collective": Group("collective", "nccl", ("collective",), lambda f: np.ones(len(f), dtype=bool), _predict_collective),
    "operators": Group("operators", "operators", ("operators",), lambda f: np.ones(len(f), dtype=bool), _predict_operators,
                       needs=("gemm:bf16", "attention:fa2"), uses_family=lambda f: ~f["op"].isin(list(VIDUR_GEMMS)).to_numpy()),
}
# Reported kind of each group's rows (validate's JSON keys).
REPORT_KIND = {
    "gemm:bf16": "gemm:bf16", "gemm:fp8": "gemm:fp8", "gemm:fp8_block": "gemm:fp8_block", "gemm:nvfp4": "gemm:nvfp4",
    "collective": "collective", "operators": "operators",
}  # fmt: skip


def report_kinds(group: Group, frame: pd.DataFrame) -> np.ndarray:
    """`prefill-attention:fa2`, `decode-attention:flashinfer`, `gemm:bf16`, `collective`, ..."""
    if group.name in REPORT_KIND:
        return np.full(len(frame), REPORT_KIND[group.name], dtype=object)
    return (frame["kind"] + ":" + frame["library"]).to_numpy()


def group_rows(tables: dict[str, pd.DataFrame], group: Group, profiles: dict[str, HardwareProfile]) -> pd.DataFrame:
    """The rows a group explains, from every kind it spans (with a `kind` column; collectives also
    get their GPU's link bandwidth and kind)."""
    frames = []
    for kind in group.kinds:
        f = tables.get(kind)
        if f is None or not len(f):
            continue
        f = f[group.select(f)]
        if len(f):
            frames.append(f.assign(kind=kind))
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    if "collective" in group.kinds:
        names = sorted(out["gpu"].unique())
        bw, link = collectives.link_of([profiles[n] for n in names])
        out["link_bytes_per_s"] = out["gpu"].map(dict(zip(names, bw, strict=True)))
        out["link"] = out["gpu"].map(dict(zip(names, link, strict=True)))
    return out


def fp8_query(frame: pd.DataFrame, dev: Dev) -> np.ndarray:
    """Attention rows whose query is quantized to fp8 and whose MMAs run in fp8 (`kernels.fp8_attention`)."""
    return kernels.fp8_attention(frame["library"].to_numpy(), dev.generation, frame["kv_bytes"].to_numpy(float))


def mma_work(frame: pd.DataFrame, dev: Dev) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a GEMM or attention table: the FLOPs its shape says (2 m n k; 4 b h n_q n_kv d,
    halved for a causal prefill) and the datasheet's dense peak of the dtype its MMAs run at (fp8 or
    fp4 for quantized GEMMs, fp8 for an fp8 query (`fp8_query`), bf16 otherwise).
    Other kinds' rows: no FLOPs."""
    kind = frame["kind"].to_numpy()
    flops = np.zeros(len(frame))
    peak = dev.peak("bf16").copy()
    if "m" in frame:
        gemm = kind == "gemm"
        flops = np.where(gemm, 2.0 * frame["m"].to_numpy(float) * frame["n"].to_numpy(float) * frame["k"].to_numpy(float), flops)
        for dtype, peak_dtype in (("fp8", "fp8"), ("fp8_block", "fp8"), ("nvfp4", "fp4")):
            rows = gemm & (frame["dtype"].to_numpy() == dtype)
            peak = np.where(rows, dev.peak(peak_dtype), peak)
    if "n_q" in frame:
        att = np.isin(kind, ("prefill-attention", "decode-attention"))
        n_q, n_kv = frame["n_q"].to_numpy(float), frame["n_kv"].to_numpy(float)
        causal = np.where(n_q > 1, 0.5, 1.0)
        flops = np.where(att, 4.0 * frame["b"].to_numpy(float) * frame["h"].to_numpy(float) * n_q * n_kv * frame["d"].to_numpy(float) * causal, flops)
        fp8 = att & fp8_query(frame, dev)
        peak = np.where(fp8 & np.isfinite(dev.peak("fp8")), dev.peak("fp8"), peak)
    return flops, peak


def unpriced(frame: pd.DataFrame, profiles: dict[str, HardwareProfile]) -> np.ndarray:
    """GEMM rows of a dtype whose MMAs their GPU's profile has no peak for (an nvfp4 table of a GPU
    without fp4 tensor cores): the model has no rate to price them at, so, like a dtype it does not
    know, they are counted as unsupported and neither fitted nor scored."""
    if not len(frame) or "kind" not in frame or "m" not in frame:
        return np.zeros(len(frame), dtype=bool)
    _, peak = mma_work(frame, device_of(frame, profiles))
    return (frame["kind"].to_numpy() == "gemm") & ~np.isfinite(peak)


def gemm_bytes(frame: pd.DataFrame) -> np.ndarray:
    """Compulsory bytes of each GEMM row: A and W read once at their dtype's size, C written in bf16."""
    m, n, k = (frame[c].to_numpy(float) for c in ("m", "n", "k"))
    e = frame["dtype"].map(lambda d: GEMM_DTYPES[d][0]).to_numpy(float)
    return e * (m * k + k * n) + 2.0 * m * n


def implausible(frame: pd.DataFrame, profiles: dict[str, HardwareProfile]) -> np.ndarray:
    """Rows whose measured time is shorter than their FLOPs take at the datasheet's dense peak of
    their MMA dtype, or than their compulsory bytes beyond the L2 take at the datasheet's DRAM
    bandwidth: no kernel can be that fast, so the call did not do the work its shape says (some
    FlashInfer fp8 prefill rows: up to 360x; FlashInfer's fp8 decode at head dimension 256 on RTX
    PRO 6000, whose times match the same calls at 128, up to 1.8x faster than reading its cache),
    or than the same call with fewer query heads (`fewer_heads_slower`), or whose head dimension
    (`head_dim_ignored`) or query heads past the KV heads (`query_heads_ignored`) the call did not
    apply. Such rows are neither fitted nor scored, and
    `validate` counts them."""
    if not len(frame) or "kind" not in frame:
        return np.zeros(len(frame), dtype=bool)
    dev = device_of(frame, profiles)
    kind = frame["kind"].to_numpy()
    flops, peak = mma_work(frame, dev)
    measured = frame["measured_s"].to_numpy()
    bad = flops / measured > np.nan_to_num(peak, nan=np.inf)
    # compulsory traffic (operands read, results written once) beyond what the L2 can hold must
    # cross the DRAM interface, at its datasheet bandwidth at best
    nbytes = np.zeros(len(frame))
    if "m" in frame:
        nbytes = np.where(kind == "gemm", gemm_bytes(frame), nbytes)
    if "n_q" in frame:
        b, h, hk, d, n_q, n_kv, e = (frame[c].to_numpy(float) for c in ("b", "h", "hk", "d", "n_q", "n_kv", "kv_bytes"))
        q_bytes = np.where(fp8_query(frame, dev), 1.0, 2.0)
        q_o = b * n_q * h * d * (q_bytes + 2.0)  # Q, O (bf16)
        cache = b * hk * n_kv * d * 2.0 * e  # the cache's K and V, each row read at least once
        nbytes = np.where(np.isin(kind, ("prefill-attention", "decode-attention")), q_o + cache, nbytes)
    bad |= np.maximum(nbytes - dev.l2_bytes, 0.0) / dev.hbm_bytes_per_s > measured
    if "n_q" in frame:
        bad |= fewer_heads_slower(frame) | head_dim_ignored(frame) | query_heads_ignored(frame)
    return bad


HEADS_SLACK = 0.75  # a prefill call may not take less than 3/4 of the same call with fewer query heads


def fewer_heads_slower(frame: pd.DataFrame) -> np.ndarray:
    """Prefill rows faster than `HEADS_SLACK` x the slowest row that differs only in having fewer
    query heads: the same kernel doing more heads' work cannot be that much faster. (Decode rows are
    exempt: FA2 takes another path when the query heads equal the KV heads.) On L40S and RTX PRO 6000
    a third of FlashInfer's fp8 prefill rows fail this, their time falling as heads are added."""
    if not len(frame):
        return np.zeros(0, dtype=bool)
    keys = ["gpu", "library", "kv_bytes", "b", "n_q", "n_kv", "hk", "d"]
    f = frame[keys + ["h", "measured_s"]].assign(pos=np.arange(len(frame)))
    f = f[frame["kind"].to_numpy() == "prefill-attention"].sort_values([*keys, "h"])
    group = f.groupby(keys, sort=False).ngroup()  # the slowest of the fewer-heads rows before each: a running max, shifted
    before = f["measured_s"].groupby(group).cummax().groupby(group).shift(1).to_numpy()
    out = np.zeros(len(frame), dtype=bool)
    out[f["pos"].to_numpy()] = f["measured_s"].to_numpy() < HEADS_SLACK * np.nan_to_num(before, nan=0.0)
    return out


HEAD_DIM_WORK_S = 50e-6  # calls this long are their work, not their launch: doubling d must show
HEAD_DIM_MIN_RATIO = 1.2  # the least median time ratio of such calls at 2d over d (FA2 on RTX PRO 6000: 1.9)


def _doubling_ignored(frame: pd.DataFrame, column: str, call: list[str], by: list[str], min_ratio: float, pairs_from=None) -> np.ndarray:
    """Rows of each `by` group whose calls do not grow with `column`: over the group's pairs of calls
    that differ only in `column` doubled (the other `call` columns equal; of the rows `pairs_from`,
    default all), with the smaller lasting at least `HEAD_DIM_WORK_S`, the median time ratio of the
    doubled call to its twin is below `min_ratio`."""
    out = np.zeros(len(frame), dtype=bool)
    keys = list(dict.fromkeys(by + call + [column]))
    f = frame[keys + ["measured_s"]] if pairs_from is None else frame.loc[pairs_from, keys + ["measured_s"]]
    half = f.assign(**{column: f[column] * 2.0}).rename(columns={"measured_s": "half_s"})
    pairs = f.merge(half, on=keys, how="inner")
    pairs = pairs[pairs["half_s"] >= HEAD_DIM_WORK_S]
    for key, grp in pairs.groupby(by, dropna=False):
        if np.median(grp["measured_s"] / grp["half_s"]) < min_ratio:
            rows = np.ones(len(frame), dtype=bool)
            for col, value in zip(by, key, strict=True):
                rows &= frame[col].to_numpy() == value
            out |= rows
    return out


def head_dim_ignored(frame: pd.DataFrame) -> np.ndarray:
    """Attention rows of a table (GPU, library, kind, KV dtype) whose head dimension d the call did
    not apply: the table's calls at d take the median time of the same calls at d / 2, where those
    last at least `HEAD_DIM_WORK_S` (twice the cache bytes and FLOPs), within `HEAD_DIM_MIN_RATIO`.
    FlashInfer's d = 256 rows on RTX PRO 6000 (decode and prefill, bf16 and fp8 caches) take the time
    of their d = 128 twins to the percent at every size, where FlashAttention's on the same GPU take
    1.9x; some are faster than reading their cache allows: the collector plans FlashInfer for its
    own model config, head dimension 128 (`sources`, `COLLECTOR_MODEL_HEADS`)."""
    if not len(frame) or "d" not in frame:
        return np.zeros(len(frame), dtype=bool)
    table = ["gpu", "library", "kind", "kv_bytes"]
    return _doubling_ignored(frame, "d", ["b", "h", "hk", "n_q", "n_kv"], table + ["d"], HEAD_DIM_MIN_RATIO)


QUERY_HEADS_MIN_RATIO = 1.2  # the least median time ratio of prefill calls with 2h query heads over h


def query_heads_ignored(frame: pd.DataFrame) -> np.ndarray:
    """Prefill rows with more query heads than KV heads, of a table (GPU, library, KV dtype, head
    dimension) whose calls do not grow with their query heads: doubling h doubles a prefill call's
    FLOPs, so calls of at least `HEAD_DIM_WORK_S` must take `QUERY_HEADS_MIN_RATIO` times longer at 2h
    than at h, in the median over the table's pairs (FlashAttention on A100, L40S and RTX PRO 6000
    and FlashInfer on GB200: 1.5-1.9). FlashInfer's fp8 prefill on L40S and RTX PRO 6000 takes 1.1
    and 0.6: its calls with the query heads of a KV group packed run at a median 5x (up to 80x) the
    FLOP rate of the same call with one query head per KV head, where FlashAttention and FlashInfer
    elsewhere stay within 1.3x of it, and many above the datasheet peak: the collector's plan lays
    out the query blocks of a group of 2 (`sources.COLLECTOR_MODEL_HEADS`), and the kernel computes
    no more of a larger group's rows. The rows with
    h = h_kv keep their shape's work and stay. (Decode is exempt: its time is its cache's bytes,
    which the query heads do not change.)"""
    if not len(frame) or "h" not in frame:
        return np.zeros(len(frame), dtype=bool)
    prefill = frame["kind"].to_numpy() == "prefill-attention"
    packed = frame["h"].to_numpy(float) > frame["hk"].to_numpy(float)
    table = ["gpu", "library", "kind", "kv_bytes", "d"]
    return prefill & packed & _doubling_ignored(frame, "h", ["b", "hk", "n_q", "n_kv"], table, QUERY_HEADS_MIN_RATIO, pairs_from=prefill)


def device_of(frame: pd.DataFrame, profiles: dict[str, HardwareProfile]) -> Dev:
    names = sorted(frame["gpu"].unique())
    index = pd.Categorical(frame["gpu"], categories=names).codes.astype(np.int64)
    return Dev.repeat([profiles[n] for n in names], index)


@dataclass(frozen=True)
class GroupFit:
    group: str
    fitted: Fitted
    timer: dict[str, float]
    rows: int
    timer_host: dict[str, dict[str, float]] = field(default_factory=dict)  # host key (`timer_keys`) -> timer parameter -> log-deviation

    def to_json(self) -> dict:
        return {**self.fitted.to_json(), "timer": self.timer, "timer_host": self.timer_host, "rows": self.rows}

    def timer_values(self, frame: pd.DataFrame, profiles: dict[str, HardwareProfile]) -> dict[str, np.ndarray]:
        """Every timer parameter as an array over the rows, with the deviation of each row's host key
        (none for a key the fit did not see: the common value)."""
        deviation = {}
        for name in self.timer:
            keys = timer_keys(frame, profiles, name)
            deviation[name] = np.zeros(len(frame))
            for key, deltas in self.timer_host.items():
                if name in deltas:
                    deviation[name][keys == key] = deltas[name]
        return timer_rows(self.timer, deviation)


def timer_keys(frame: pd.DataFrame, profiles: dict[str, HardwareProfile], name: str) -> np.ndarray:
    """Whose deviation of timer parameter `name` each row takes: its host CPU's (`host:<cpu>`) for a
    parameter of the host's own work (`sources.HOST_TIMER_PARAMS`), which a GPU never measured on
    shares with the GPUs measured on the same kind of host; else its GPU's (each GPU's tables came
    from a system of its own)."""
    gpus = frame["gpu"].to_numpy()
    if name in sources.HOST_TIMER_PARAMS:
        hosts = {g: f"host:{profiles[g].host_cpu}" for g in np.unique(gpus)}
        return np.asarray([hosts[g] for g in gpus], dtype=object)
    return gpus.astype(object)


def timer_rows(timer: dict[str, float], deviation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Timer parameters per row: each common value times e^(the row's host deviation), within the
    parameter's bounds (the fit and its predictions both price rows so)."""
    return {name: np.clip(value * np.exp(deviation[name]), *sources.TIMER_BOUNDS[name]) for name, value in timer.items()}


def predict(group: Group, fit: GroupFit, frame: pd.DataFrame, profiles: dict[str, HardwareProfile], ctx: dict | None = None) -> np.ndarray:
    dev = device_of(frame, profiles)
    P = fit.fitted.values(dev.generation)
    return group.predict(P, fit.timer_values(frame, profiles), dev, frame, ctx or {})


def sample_rows(frame: pd.DataFrame, per_gpu: int = FIT_ROWS_PER_GPU, seed: int = SEED) -> np.ndarray:
    """Positions of up to `per_gpu` rows of each GPU, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picks = []
    for _, idx in frame.groupby("gpu").indices.items():
        picks.append(np.sort(rng.choice(idx, size=min(per_gpu, len(idx)), replace=False)))
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def fit_group(group: Group, frame: pd.DataFrame, profiles: dict[str, HardwareProfile], weights: np.ndarray | None = None,
              start: GroupFit | None = None, ctx: dict | None = None) -> GroupFit:  # fmt: skip
    """Fit a group's parameters to `frame` (all of its rows are used; sample beforehand)."""
    if not len(frame):
        raise UserError(f"{group.name}: no rows to fit")
    spec = family(group.family)
    dev = device_of(frame, profiles)
    held = set(group.held) | set(group.unidentified(frame, dev) if group.unidentified else ())
    names = [n for n in spec if not spec[n].host and n not in held]  # fitted in common; a host parameter stays at its start (`params`)
    fixed = {n: p.start for n, p in spec.items() if p.host or n in held}
    gens = sorted(frame["generation"].unique())
    per_gen = [n for n in spec if (spec[n].per_generation or n in group.per_generation) and n not in held] if len(gens) > 0 else []
    gen_index = pd.Categorical(frame["generation"], categories=gens).codes
    y = np.log(frame["measured_s"].to_numpy())
    w = np.ones(len(frame)) if weights is None else weights
    # every GPU weighs the same, whatever its row count
    counts = frame.groupby("gpu")["gpu"].transform("size").to_numpy()
    w = w / counts
    w = np.sqrt(w / w.mean())
    tnames = list(group.timer_params)
    x0 = [start.fitted.common[n] if start else spec[n].start for n in names] + [
        (start.timer.get(n) if start and n in start.timer else sources.TIMER_START[n]) for n in tnames
    ]
    lo = [spec[n].low for n in names] + [sources.TIMER_BOUNDS[n][0] for n in tnames]
    hi = [spec[n].high for n in names] + [sources.TIMER_BOUNDS[n][1] for n in tnames]
    # a deviation per host key of each timer parameter (`timer_keys`); one key's value is the common one
    keys = {n: timer_keys(frame, profiles, n) for n in tnames}
    slots = [(n, key) for n in tnames for key in (sorted(set(keys[n])) if len(set(keys[n])) > 1 else [])]
    slot_rows = [keys[n] == key for n, key in slots]
    nd, nh = len(gens) * len(per_gen), len(slots)
    # a host parameter's start is its upper bound (no penalty): its deviations can only lower it
    x0 += [(start.fitted.generation.get(g, {}).get(n, 0.0) if start else 0.0) for g in gens for n in per_gen]
    x0 += [start.timer_host.get(key, {}).get(n, 0.0) if start else _host_start(frame, dev, rows, n) for (n, key), rows in zip(slots, slot_rows, strict=True)]
    lo += [-HOST_RANGE if spec[n].host else -2.0 for _ in gens for n in per_gen] + [-2.0] * nh
    hi += [0.0 if spec[n].host else 2.0 for _ in gens for n in per_gen] + [2.0] * nh
    x0 = np.clip(np.asarray(x0, dtype=float), lo, hi)
    width = np.tile([HOST_PRIOR if spec[n].host else GROUP_GENERATION_PRIOR if n in group.per_generation else GENERATION_PRIOR for n in per_gen], len(gens))
    prior_weight = np.concatenate([np.sqrt(len(frame) / max(1, nd)) * 0.05 / width,
                                   np.full(nh, np.sqrt(len(frame) / max(1, nh)) * 0.05 / HOST_PRIOR)])  # fmt: skip
    ncommon = len(names) + len(tnames)

    def unpack(x):
        common = {**dict(zip(names, x[: len(names)], strict=True)), **fixed}
        timer = dict(zip(tnames, x[len(names) : ncommon], strict=True))
        deltas = x[ncommon : ncommon + nd].reshape(len(gens), len(per_gen))
        return common, timer, deltas, x[ncommon + nd :]

    def residuals(x):
        common, timer, deltas, host = unpack(x)
        P = {n: np.full(len(frame), v) for n, v in common.items()}
        for j, n in enumerate(per_gen):
            P[n] = np.clip(P[n] * np.exp(deltas[gen_index, j]), spec[n].low, spec[n].high)
        deviation = {n: np.zeros(len(frame)) for n in tnames}
        for (n, _), rows, value in zip(slots, slot_rows, host, strict=True):
            deviation[n] = np.where(rows, value, deviation[n])
        pred = group.predict(P, timer_rows(timer, deviation), dev, frame, ctx or {})
        r = w * np.nan_to_num(np.log(np.maximum(pred, 1e-30)) - y)
        return np.concatenate([r, prior_weight * x[ncommon:]])

    # a generation's (a host's) deviations move only its rows (and their prior): telling scipy so
    # lets it difference all generations' deviations of a parameter in one evaluation
    sparsity = np.zeros((len(frame) + nd + nh, ncommon + nd + nh), dtype=bool)
    sparsity[: len(frame), :ncommon] = True
    sparsity[len(frame) :, ncommon:] = np.eye(nd + nh, dtype=bool)
    for i in range(len(gens)):
        for j in range(len(per_gen)):
            sparsity[: len(frame), ncommon + i * len(per_gen) + j] = gen_index == i
    for i, rows in enumerate(slot_rows):
        sparsity[: len(frame), ncommon + nd + i] = rows
    result = least_squares(residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=LOSS_SCALE, x_scale="jac", diff_step=1e-3,
                           ftol=1e-5, xtol=1e-5, max_nfev=400, jac_sparsity=sparsity)
    common, timer, deltas, host = unpack(result.x)
    generation = {g: {n: float(deltas[i, j]) for j, n in enumerate(per_gen)} for i, g in enumerate(gens)}
    timer_host: dict[str, dict[str, float]] = {}
    for (n, key), value in zip(slots, host, strict=True):
        timer_host.setdefault(key, {})[n] = float(value)
    return GroupFit(group.name, Fitted(group.family, {k: float(v) for k, v in common.items()}, generation),
                    {k: float(v) for k, v in timer.items()}, len(frame), timer_host)  # fmt: skip


def _host_start(frame: pd.DataFrame, dev: Dev, rows: np.ndarray, name: str) -> float:
    """Where a host key's timer floor starts in the fit: at the shortest time its `rows` show (no
    floor can be longer), as a log-deviation from the common start. A floor started below every
    time the kernels take would bind on no row and give the fit no slope to follow."""
    shortest = frame["measured_s"].to_numpy()[rows].min()
    bound = shortest * dev.clock_hz[rows][0] if name == "c_floor" else shortest * 1e6
    return float(np.clip(np.log(bound / sources.TIMER_START[name]), -2.0, 2.0))


def calibration_mask(frame: pd.DataFrame) -> np.ndarray:
    """In-GPU split: every third row of each file, in file order."""
    return ((frame["row"].to_numpy() - 1) % CALIBRATION_EVERY) == 0


def few_shot_rows(frame: pd.DataFrame, k: int) -> np.ndarray:
    """Positions of `k` rows spread evenly over a GPU's table (in file order)."""
    n = len(frame)
    if k <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(np.int64))


# --- the shipped fit --------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_fingerprint(tables) -> list[dict]:
    """What the fit was made from: each folder's manifest hash, its files' hashes, and the upstream
    sources (repository@commit) the manifest names -- the data folders are not repositories."""
    out = []
    for folder in tables.folders:
        manifest = folder / "manifest.csv"
        rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        files = {r["file"]: _sha256(folder / r["file"])[:16] for r in rows.to_dict("records")}
        sources = sorted({r.get("source", "").split(":")[0] for r in rows.to_dict("records") if "@" in r.get("source", "")})
        out.append({"folder": folder.name, "manifest_sha256": _sha256(manifest), "files": files, "upstream": sources})
    return out


def fit_all(tables, per_gpu: int = FIT_ROWS_PER_GPU, progress=None) -> dict:
    """Every group fitted on all GPUs' plausible rows (what `plan` and `simulate` use), with the
    80% intervals from a leave-one-GPU-out run over the same data."""
    import datetime

    from simulator import validate as val

    say = progress or (lambda msg: None)
    say("leave-one-GPU-out run for the intervals")
    logo = val.validate(tables.folders, per_gpu=per_gpu, progress=progress, in_gpu=False, tables=tables)
    groups: dict = {}
    fits: dict = {}
    for name, group in GROUPS.items():
        frame = group_rows(tables.kinds, group, tables.profiles)
        if not len(frame):
            continue
        frame = frame[~unpriced(frame, tables.profiles)].reset_index(drop=True)
        frame = frame[~implausible(frame, tables.profiles)].reset_index(drop=True)
        say(f"{name}: all GPUs")
        ctx = {g: fits[g] for g in group.needs if g in fits}
        fits[name] = fit_group(group, frame.iloc[sample_rows(frame, per_gpu)].reset_index(drop=True), tables.profiles, ctx=ctx)
        groups[name] = {"family": group.family, **fits[name].to_json(), "gpus": sorted(frame["gpu"].unique())}
    summary = {gpu: {kind: round(m["mape"], 2) for kind, m in kinds.items()} for gpu, kinds in logo["leave_one_gpu_out"].items()}
    return {
        "created": datetime.date.today().isoformat(),
        "command": "python -m simulator fit-kernels",
        "data": data_fingerprint(tables),
        "fit_rows_per_gpu": per_gpu,
        "groups": groups,
        "intervals": logo["intervals"],
        "leave_one_gpu_out_mape": summary,
        "excluded": logo["excluded"],
        **({"not_read": list(tables.not_read)} if tables.not_read else {}),
    }
