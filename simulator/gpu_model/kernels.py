"""Device time of GPU kernels, as pure vectorised functions of the datasheet (`Dev`) and the
model's parameters (`P`, a mapping name -> array, see `params.FAMILIES`).

Notation: S SMs at clock f; P_mma the dense tensor-core peak of the operand dtype; BW the DRAM
bandwidth, L2 its size. A kernel is a grid of programs (CTAs) dealt to the SMs; a program's time
is its fixed cost plus its main loop, the slower of its MMAs and its operand loads per iteration.

GEMM [m, k] @ [k, n] (cuBLAS/CUTLASS as vLLM calls them). For a tile config (B_M, B_N, split-K s):
    tiles  T = ceil(m / B_M) ceil(n / B_N) s,      waves w = ceil(T / S)
    tile   t = max(2 B_M B_N k_s / (f_mma P_mma / S),  (B_M + B_N) k_s e / (load_bpf P_bf16 / S))
               + (1 - overlap) B_M B_N e_C / (BW f_bw / min(T, S))  + c_tile / f
    time     max(w t, DRAM bytes / (f_bw BW), operand bytes / (min(T, S) bw_sm smem / 100 KiB),
                 k_s (e / 2) t_k / (smem / 100 KiB))
               + [split-K: the fp32 partials' traffic and the reduction step's t_split]
    then slowed by the board's power limit where the MMAs draw more than the TDP (`power_limited`)
B_M also takes 32 for bf16 (small-M kernels), whose tiles fetch only the rows inside the matrix.
One SM streams operands at a rate set by the bytes its pipeline keeps in flight over the memory
latency; the kernels fill the shared memory with pipeline stages, so the rate is stated per 100 KiB
of it (`bw_sm`): an SM of Hopper or Blackwell (228 KiB) keeps 2.3x the bytes in flight of one of
Ada or RTX Blackwell (100 KiB), as its share of DRAM bandwidth asks. A split-K call ends with a
reduction of the slices' partials that no slice can start before the others are done (cuBLAS's
second, reducing kernel or the last slice's fix-up): a fixed `t_split_us` on top of the partials'
traffic, so the library splits only where the parallelism it gains pays for it. A program's k
loop is a chain of steps, each waiting on its loads: whatever its tile, it spends at least t_k per
element of k, a memory latency over the stages the shared memory holds (a step is a fixed number of
bytes deep, so an fp8 element costs half). It binds where few programs walk a long k: cuBLAS on Ada
and RTX Blackwell keeps calls under 2^21 multiply-adds unsplit up to k = 8192 (`NO_SPLIT_GENERATIONS`),
and its matrix-vector path (m = 1 there) reduces its slices inside the kernel, with no t_split.
Quantized GEMMs (vLLM's scaled-MM kernels, csrc/quantization/w8a8/cutlass) never split K (s = 1)
and take the tile their dispatch gives for (m, n) where it is known (`scaled_mm_tile`: Ada, RTX Blackwell),
else the best of B_M >= 64 on TMA-fed GPUs; their operand loads run at a rate of their own, the
bytes their pipeline stages hold over a memory latency, per 100 KiB of the shared memory the stages
fill (`bw_load_scaled`; CUTLASS 3.x sizes its stages to the shared memory, the sm89 configs take
45-80 KiB of Ada's 100), where cuBLAS's bf16 loads keep pace with its MMAs (`load_bpf`, per FLOP of
the bf16 peak).
Otherwise the library is taken to pick the best config: the time is a soft minimum over configs (a
log-sum-exp in log time, smooth for the fit; configs that nearly tie pull it below the best one: over
the bf16 tables at the shipped fit it sits 2.5% below the hard minimum in the median, 7.3% at the
90th percentile, 13% at most, and the fitted efficiencies absorb that: at 100 for 30 the bf16
leave-one-GPU-out errors went 9.41, 12.04, 14.19, 14.91% -> 9.78, 12.22, 14.20, 14.99% on A100,
GB200, L40S, RTX PRO 6000, and at 20 they moved by 0.25 points at most; a softmin-weighted mean
of the configs' log times, which ties leave at the best one, gave 10.05, 12.07, 14.53, 15.06%).
DRAM bytes are the compulsory A, W, C minus what stays L2-resident between calls (`resident`); the
resident bytes stream at the L2's rate, never slower than DRAM's (`l2_rate`).

Attention (FlashAttention-2 as vLLM builds it, FlashInfer): a call runs Q rows against a paged K/V
cache. The library decides the programs: query rows per program (B_r), K/V rows per iteration (B_c),
GQA query heads packed into one program's rows, split-KV for decode. Per program:
    t_prog + sum over its K/V blocks of max((4 B_r B_c d / (P_mma / S) + B_r B_c / (16 f)) / f_cta, 2 B_c d e_kv / bw_cta)
and over the grid: max(longest program, total work / S + gamma x longest), with the compulsory
traffic (Q, O, the cache) at DRAM or L2 speed as a floor. B_r B_c / (16 f) is the scores' exp2 at
the SFUs' 16 per clock per SM, after the MMAs in FlashAttention-2-style kernels, overlapped with
them in warp-specialised ones (FA3, TensorRT-LLM's): an SM of A100 does 2048 dense bf16 FLOP per
clock, one of Ada or RTX Blackwell 1024, so the exp2 is a larger share of a block on A100. f_cta,
the fraction of its pipes' peaks a program's instruction stream reaches, slows both alike: the
barriers, bubbles and issue slots that keep the MMAs from their peak stall the exp2 too. A split
call's combine reads its partials and, where it walks a row's partials one split after another
(FlashAttention's combine kernel, TensorRT-LLM's multi-CTA reduction), waits t_merge per split. The
measured per-program streaming rate bw_cta (~26-30 GB/s) and fixed time (~3-4 us) are the same in
seconds on A100, L40S and RTX PRO 6000, not in cycles: they are set by memory latency, not by the
clock.
"""

from __future__ import annotations

import functools

import numpy as np

from simulator.gpu_model.device import GEMM_DTYPES, Dev

Params = dict[str, np.ndarray]

SOFTMIN_SHARPNESS = 30.0  # in log time: configs 10% slower than the best weigh e^-3 of it; N that tie sit log(N) / 30 below it
OCCUPANCY_SMEM = 100.0 * 1024  # bytes of shared memory FlashInfer's `ctas_per_sm`, a GEMM's `bw_sm` and `bw_load_scaled` are stated per
POWER_EXPONENT = 2.0  # board draw ~ f^2 under load (see `power_limited`)
POWER_ONSET = 2.0  # the power controller's share felt by a burst b: 1 / (1 + (t_power / b)^2)
POWER_KNEE = 8.0  # the power limit's max(demand, 1) is (1 + demand^8)^(1/8): 1.003 at 0.7 of the limit, 1.09 at it
# exp2 results per clock per SM on the special function units: 16 on every compute capability from 5.0
# (CUDA C++ Programming Guide, throughput of native arithmetic instructions); FlashAttention-3 (Shah et
# al. 2024, section 3.1) quotes H100 SXM5's 3.9 TFLOPS of special functions, 16 x 132 SMs x 1.83 GHz
SFU_PER_CLOCK = 16.0
OVERLAP_POWER = 6.0  # two overlapped activities take (a^p + b^p)^(1/p): their max, +12% when they are equal


def overlapped(a, b):
    """The time of two activities that overlap: a smooth maximum (exact when one dominates)."""
    hi = np.maximum(a, b)
    r = np.minimum(a, b)
    if OVERLAP_POWER == 6.0 and isinstance(r, np.ndarray) and r.ndim and r.dtype.kind == "f":  # the same, in place (a third faster)
        r /= np.maximum(hi, 1e-300)
        np.multiply(r, r, out=r)
        x = r * r
        x *= r
        x += 1.0
        np.sqrt(x, out=x)
        np.cbrt(x, out=x)
        x *= hi
        return x
    return hi * (1.0 + (r / np.maximum(hi, 1e-300)) ** OVERLAP_POWER) ** (1.0 / OVERLAP_POWER)


def resident(working_set_bytes, cache_bytes):
    """Fraction of a working set that stays in a cache of `cache_bytes` between calls: 1 well below
    the capacity, 0 well above it, a steep smooth step at it (LRU keeps all or nothing of a
    streamed set)."""
    ratio = np.maximum(working_set_bytes, 1.0) / np.maximum(cache_bytes, 1.0)
    return 1.0 / (1.0 + ratio**8)


def l2_rate(dev: Dev, f_l2, dram_bytes_per_s):
    """Bytes/s of L2-resident traffic at the share f_l2 of the L2's bandwidth: never slower than the
    DRAM rate `dram_bytes_per_s` it would otherwise go at."""
    return np.maximum(dev.l2_bytes_per_s * f_l2, dram_bytes_per_s)


def memory_time(nbytes, dev: Dev, f_bw, f_l2, u_l2, working_set=None):
    """A memory-bound transfer of `nbytes`: the L2-resident share at the L2 rate, the rest at the
    DRAM rate. `working_set`: the bytes the call keeps live (default the transfer itself)."""
    ws = nbytes if working_set is None else working_set
    hit = resident(ws, dev.l2_bytes * u_l2)
    dram = dev.hbm_bytes_per_s * f_bw
    l2 = l2_rate(dev, f_l2, dram)
    return nbytes * (hit / l2 + (1.0 - hit) / dram)


def operator_time(P_mem: Params, P_op: Params, c_kernel, dev: Dev, op_kernel: np.ndarray, nbytes):
    """A memory-bound operator (norm, rope, swiglu, embed, add): its bytes at the attention family's
    DRAM/L2 rates (`P_mem`) scaled by the operator's efficiency (`P_op`, the `operators` family's
    eff_<op>), plus one kernel's device time of `c_kernel` cycles."""
    eff = np.ones(len(op_kernel))
    for name in np.unique(op_kernel):
        eff = np.where(op_kernel == name, P_op[f"eff_{name}"], eff)
    return memory_time(nbytes, dev, P_mem["f_bw"] * eff, P_mem["f_l2"] * eff, P_mem["u_l2"]) + c_kernel / dev.clock_hz


# --- GEMM -------------------------------------------------------------------------------------

GEMM_TILES_M = (32, 64, 128, 256)  # 32: cuBLAS's small-M kernels (and on Hopper on, the swap of A and B that puts a small m in the MMA's N)
SCALED_MM_TILES_M = (16, 32, 64, 128, 256)  # vLLM's scaled-MM tiles along m (csrc/quantization/w8a8/cutlass)
SCALED_MM_MIN_TILE_M_C3X = 64  # a TMA-fed generation without a dispatch table below: no tile under 64 rows
GEMM_TILES_N = (64, 128, 256)
GEMM_SPLITS = (1, 2, 4, 8, 16, 32, 64)
UNQUANTIZED = ("bf16", "fp16")
# cuBLAS on Ada and RTX Blackwell (sm89, sm120) runs a GEMM of fewer than 2^21 multiply-adds (m n k)
# unsplit, one program per tile walking all of k, unless k is past 8192; m = 1 takes its matrix-vector
# path instead. Each GPU's table shows it alone: on L40S and on RTX PRO 6000 a bf16 GEMM with
# 2 <= m <= 16 and n <= 512 takes ~2 us + 4.1 ns per element of k up to the first k where m n k
# reaches 2^21 (or k = 10240), and 3.5-5.6 us there (m = 2, n = 32: 35.1 us at k = 8192, 5.1-5.5
# at 10240; m = 4, n = 128: 16.4-16.8 us at 3584, 4.0-4.4 at 4096). A100 and GB200 split such calls.
NO_SPLIT_GENERATIONS = ("ada", "blackwell-rtx")
NO_SPLIT_MULTIPLY_ADDS = 2.0**21
NO_SPLIT_MAX_K = 8192


def _configs(tiles_m, splits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.asarray(c, dtype=float) for c in zip(*[(bm, bn, s) for bm in tiles_m for bn in GEMM_TILES_N for s in splits], strict=True))


_GEMM_CONFIGS = _configs(GEMM_TILES_M, GEMM_SPLITS)
_UNSPLIT_CONFIGS = _configs(SCALED_MM_TILES_M, (1,))  # the scaled-MM kernels of quantized GEMMs never split K (their tile: `scaled_mm_tile`)


def _next_pow2(x):
    return 2.0 ** np.ceil(np.log2(np.maximum(x, 1.0)))


def _by_n(np2, lo, hi, a, b, c):
    """a where next_pow2(n) <= lo, b where it is <= hi, c above."""
    return np.where(np2 <= lo, a, np.where(np2 <= hi, b, c))


def scaled_mm_tile(generation, m, n, dtype: str = "fp8") -> tuple[np.ndarray, np.ndarray]:
    """(B_M, B_N) of the tile vLLM's scaled-MM kernel of `dtype` takes for an [m, k] @ [k, n] GEMM,
    where its dispatch for the generation is known here; NaN elsewhere (the model then takes the
    best of its configs). The dispatch picks one config and tries no other:

    Ada fp8 (sm89, CUTLASS 2.x; w8a8/cutlass/scaled_mm_c2x_sm89_fp8_dispatch.cuh), by m, then
    next_pow2(n) = N2:
        m <= 16: 16 x 64 (N2 <= 8192), 16 x 128 (<= 24576), 32 x 64
        m <= 32: 32 x 64, 32 x 128 (8192 < N2 <= 16384);  m <= 64: 64 x 64, 64 x 128 (same N2)
        m <= 128: 64 x 128 (N2 <= 8192), 128 x 128 (<= 16384), 128 x 64
        m <= 256: 64 x 128 (N2 <= 4096), 128 x 128;  above: 128 x 128, 256 x 128 (4096 < N2 <= 8192)
    The L40S tables show the buckets (an fp8 GEMM of m = 4096 with n from 5120 to 8192, the
    256 x 128 config, runs at half the rate of its neighbours up to k ~ 2048).

    RTX Blackwell (sm120) fp8 and nvfp4: one 128 x 128 tile for every shape, as the RTX PRO 6000
    tables (vLLM 0.19) show: at n <= 256 an fp8 call takes ~7.4 ns per element of k and an nvfp4
    one ~3.8 ns whatever m is (1 to 128), one program's 128 x 128 MMAs at 0.89 and 0.87 of an SM's
    share of the dtype's peak. That is c3x/scaled_mm_sm120_fp8_dispatch.cuh's default config and
    fp4/nvfp4_scaled_mm_sm120_kernels.cu's only one; vLLM PR #34424 (opened 2026-02-12) adds fp8
    configs for m <= 256 (16, 32 and 64 rows), of which these tables show none, so they are not
    modelled here.

    Hopper's and Blackwell's (sm90, sm100) fp8 tables, with swap-AB configs for small m, changed
    between releases; the one at hand fits the GB200 tables worse than the best-config rule (in-GPU
    14.7% against 7.7%, fitted on every third row). Those generations keep the rule."""
    gen = np.asarray(generation, dtype=object)
    m, n = np.broadcast_arrays(*(np.asarray(x, dtype=float) for x in (m, n)))
    ada = (gen == "ada") & (dtype == "fp8")
    rtx = (gen == "blackwell-rtx") & (dtype in ("fp8", "nvfp4"))
    other = np.broadcast_to(np.where(rtx, 128.0, np.nan), np.broadcast_shapes(m.shape, ada.shape))  # RTX Blackwell's one tile, else NaN
    if not np.any(ada):  # no row has a dispatch table by shape
        return other.copy(), other.copy()
    N2 = _next_pow2(n)
    buckets = [m <= 16, m <= 32, m <= 64, m <= 128, m <= 256]
    ada_m = np.select(buckets, [_by_n(N2, 8192, 24576, 16, 16, 32), 32, 64, _by_n(N2, 8192, 16384, 64, 128, 128), np.where(N2 <= 4096, 64, 128)],
                      _by_n(N2, 4096, 8192, 128, 256, 128))  # fmt: skip
    ada_n = np.select(buckets, [_by_n(N2, 8192, 24576, 64, 128, 64), _by_n(N2, 8192, 16384, 64, 128, 64), _by_n(N2, 8192, 16384, 64, 128, 64),
                                _by_n(N2, 8192, 16384, 128, 128, 64), 128], 128)  # fmt: skip
    return np.where(ada, ada_m, other), np.where(ada, ada_n, other)


def gemm_time(P: Params, dev: Dev, m, n, k, dtype: str = "bf16", weight_copies=1.0, repeats=None):
    """Device seconds of one GEMM [m, k] @ [k, n] -> [m, n] (bf16 output) in `dtype` (see
    GEMM_DTYPES). `weight_copies`: how many distinct weight matrices the caller cycles through
    between two uses of this one (an engine: every layer's; a benchmark: its copies), which decides
    whether W is still in L2 when it is read again; the activations A and the output C live in
    buffers the caller reuses call after call (an engine's activation buffers; a benchmark's input
    and the allocator's recycled output block), so they stay L2-resident when they fit with W."""
    e, peak_dtype = GEMM_DTYPES[dtype]
    m, n, k = (np.asarray(x, dtype=float) for x in (m, n, k))
    S, f = dev.sm_count, dev.clock_hz
    bw = dev.hbm_bytes_per_s * P["f_bw"]
    mma = dev.peak(peak_dtype) / S * P["f_mma"]
    unquantized = dtype in UNQUANTIZED
    if unquantized or "bw_load_scaled" not in P:  # cuBLAS: loads keep pace with the MMAs (per FLOP of the bf16 peak)
        load = P["load_bpf"] * dev.peak("bf16") / S
    else:  # vLLM's scaled-MM kernels: the bytes their stages hold over a memory latency, per 100 KiB of the shared memory they fill
        load = P["bw_load_scaled"] * 1e9 * dev.sram_bytes_per_sm / OCCUPANCY_SMEM
    W, A, C = e * k * n, e * m * k, 2.0 * m * n
    l2 = dev.l2_bytes * P["u_l2"]
    hit_a = resident(A + W + C, l2)  # the input and the output buffer are the caller's, reused call after call
    hit_w = resident(A + C + weight_copies * W, l2)
    kernel_s = P["c_kernel"] * np.where(dev.tma, P["x_tma"], 1.0) / f + P["t_kernel_us"] * 1e-6
    # every tile config at once: configs along axis 0, rows along axis 1
    configs = _GEMM_CONFIGS if unquantized else _UNSPLIT_CONFIGS
    bm, bn, s = (c[:, None] for c in configs)
    # what depends on the split alone is computed once per split count and gathered (`at`): the same numbers
    splits, at = np.unique(configs[2], return_inverse=True)
    s_only = splits[:, None]
    split = s > 1
    tiles = np.ceil(m / bm) * np.ceil(n / bn) * s
    ks_only = np.ceil(k / s_only)
    ks = ks_only[at]
    waves = np.ceil(tiles / S)
    active = np.minimum(tiles, S)
    t_mma = 2.0 * bm * bn * ks / mma
    # a bf16 tile fetches only the rows and columns inside the matrix (cp.async / TMA fill the rest with
    # zeros); the scaled-MM kernels are priced with their full tile, which their tables fit better
    t_load = ((np.minimum(bm, m) + np.minimum(bn, n)) if unquantized else (bm + bn)) * ks * e / load
    # the output tile goes out at the SM's load rate or its share of the memory that takes it: the L2 when
    # the output stays resident there (written back after the call, if ever), else DRAM
    t_epilogue = bm * bn * np.where(split, 4.0, 2.0) * (hit_a / np.minimum(load, l2_rate(dev, P["f_l2"], bw) / active) + (1.0 - hit_a) / np.minimum(load, bw / active))
    tile = overlapped(t_mma, t_load) + (1.0 - P["overlap"]) * t_epilogue + P["c_tile"] / f
    dram_bytes = (A + np.where(split, 0.0, C)) * (1 - hit_a) + W * (1 - hit_w)
    l2_bytes = A * hit_a + W * hit_w
    bw_sm = P["bw_sm"] * 1e9 * dev.sram_bytes_per_sm / OCCUPANCY_SMEM  # bytes in flight scale with the shared memory they fill
    stream = (A * (1 - hit_a) + W * (1 - hit_w) + l2_bytes / P["l2_speedup"]) / (active * bw_sm)
    memory = overlapped(np.maximum(dram_bytes / bw, stream), l2_bytes / l2_rate(dev, P["f_l2"], bw))
    t = overlapped(waves * tile, memory)
    # a program's k loop is a chain of dependent steps (load, then MMA), each a memory latency over the
    # stages in flight, whatever the tile's size or the SM's rate: stages fill the shared memory, and a
    # step's depth is a number of bytes per row (twice the elements in fp8), so per element of k
    t = overlapped(t, ks * (e / 2.0) * P["t_k_ns"] * 1e-9 * OCCUPANCY_SMEM / dev.sram_bytes_per_sm)
    # split-K: fp32 partials written and read back for the reduction, through L2 when they fit, and the
    # reduction step's own fixed time (it waits for every slice)
    small_lib = np.isin(dev.generation, NO_SPLIT_GENERATIONS) if unquantized else np.zeros(np.shape(m), dtype=bool)
    gemv = small_lib & (m == 1)  # the matrix-vector path reduces its slices inside the kernel: no reduction step
    reduction = (2.0 * s_only * 4.0 * m * n + C) * (1 - resident(A + W + C + 8.0 * s_only * m * n, l2)) / bw + np.where(gemv, 0.0, P["t_split_us"] * 1e-6)
    t = t + np.where(split, reduction[at], 0.0)
    # the library's heuristics split K only into slices of at least ~k_slice (a smooth penalty)
    t = t * np.where(split, (1.0 + (P["k_slice"] / ks_only) ** 4)[at], 1.0)
    if unquantized:  # small calls the library keeps unsplit (NO_SPLIT_GENERATIONS)
        whole = small_lib & (m > 1) & (m * n * k < NO_SPLIT_MULTIPLY_ADDS) & (k <= NO_SPLIT_MAX_K)
        t = np.where(split & whole, np.inf, t)
    else:  # the dispatch table's tile where the generation has one, else the best at least 64 rows high on TMA-fed GPUs
        tile_m, tile_n = scaled_mm_tile(dev.generation, m, n, dtype)
        table = np.isfinite(tile_m)
        other = np.where(table, (bm != tile_m) | (bn != tile_n), (bm < SCALED_MM_MIN_TILE_M_C3X) & dev.tma)
        t = np.where(other, np.inf, t)
    L = np.log(t)
    low = L.min(axis=0)
    L -= low
    L *= -SOFTMIN_SHARPNESS
    soft = low - np.log(np.exp(L, out=L).sum(axis=0)) / SOFTMIN_SHARPNESS
    first_load = P["t_dram_us"] * 1e-6 * (1.0 - hit_w * hit_a)
    t = np.exp(soft) + kernel_s + first_load
    return power_limited(P, dev, t, 2.0 * m * n * k, dev.peak(peak_dtype), None if repeats is None else repeats * t)


def power_limited(P: Params, dev: Dev, device_s, flops, peak_flops_per_s, burst_s=None):
    """`device_s` of a kernel doing `flops` at the boost clock, slowed by the board's power limit.

    At full tensor-core load the newer GPUs draw more than their power limit feeds (the
    datasheet's TDP over the dense bf16 peak is 1.28 pJ/FLOP on A100 and on RTX PRO 6000, 0.97
    on L40S, 0.48 on GB200), and the power controller lowers the clock until the draw fits. A
    kernel's demand, as a fraction of the limit, is
        D = (flops / device_s) / peak_dtype  x  e_mma  x  P_bf16 / TDP
    (its share of its dtype's peak at e_mma joules per dense bf16 FLOP, operand traffic included; a
    full-rate fp8 or fp4 MMA is taken to draw what a full-rate bf16 one does). The draw grows as
    f^POWER_EXPONENT: f V^2 with the voltage following the clock would be cubic; the share of the
    memory and of leakage, which does not follow the clock, makes it less, and 2 is taken. Above
    the limit the clock falls by D^(1/POWER_EXPONENT) and the kernel takes that much longer. One
    e_mma serves every GPU: at the shipped fit (1.4 pJ) a sustained 8192^3 bf16 GEMM takes 1.04x
    its unthrottled time on RTX PRO 6000, 1.06x on A100, 1.15x on L40S and 1.63x on GB200; the
    tables show compute-bound GEMMs past 1 ms slowing by ~10% on L40S and ~25% on GB200 and not
    at all on the other two (whose per-generation MMA efficiency takes up the difference).

    The controller answers within about t_power_ms: a kernel repeated back to back for `burst_s`
    seconds feels the share 1 / (1 + (t_power / burst)^2) of it; None: all of it, as a busy
    server's GEMMs do. Where the profile has no TDP nothing is slowed."""
    t = np.asarray(device_s, dtype=float)
    demand = flops / np.maximum(t * peak_flops_per_s, 1e-300) * P["e_mma"] * 1e-12 * dev.peak("bf16") / dev.tdp_w
    over = (1.0 + np.maximum(demand, 0.0) ** POWER_KNEE) ** (1.0 / POWER_KNEE)  # max(D, 1), smooth at the limit
    slow = np.where(np.isfinite(demand), over ** (1.0 / POWER_EXPONENT), 1.0)
    if burst_s is None:
        return t * slow
    felt = 1.0 / (1.0 + (P["t_power_ms"] * 1e-3 / np.maximum(np.asarray(burst_s, dtype=float), 1e-30)) ** POWER_ONSET)
    return t * (1.0 + felt * (slow - 1.0))


# vLLM's fp8 activation quantization (static per-tensor scale) as PyTorch's op-by-op reference,
# QuantFP8.forward_native, which vLLM runs where its configuration turns custom ops off: x.to(float32)
# (2 bytes read, 4 written per element), times the scale's reciprocal (4, 4), clamp to the fp8 range
# (4, 4), .to(fp8) (4, 1). Its first op keeps 6 bytes per element live.
NATIVE_FP8_QUANT_BYTES = (2.0 + 4.0) + (4.0 + 4.0) + (4.0 + 4.0) + (4.0 + 1.0)
NATIVE_FP8_QUANT_WORKING_SET = 2.0 + 4.0


def quantize_time(P: Params, dev: Dev, elements, out_bytes_per_element, path: str = "kernel"):
    """Activations quantized before a scaled-MM GEMM (bf16 in, the dtype and its scales out), by
    `path`:
    - "kernel": vLLM's quantization kernel (nvfp4, fp8_block): its bytes at the DRAM rate,
      overlapped with its per-element work at `q_rate` elements per cycle per SM where the
      parameters have it;
    - "fused": its bytes at the DRAM rate and no more: fp8 in the vLLM releases whose tables show it
      so (`sources.FUSED_FP8_QUANT`; RTX PRO 6000's, vLLM 0.19: ~5 bytes of DRAM traffic per
      element), and fp8 in a serving engine, whose compiler fuses the quantization into the op
      before it;
    - "native": fp8 op by op (`NATIVE_FP8_QUANT_BYTES`), the releases before: their traffic at the
      DRAM or L2 rate as its working set fits the L2, and no faster than the SMs keep bytes in
      flight (`bw_ew` per SM). The vLLM 0.14 tables show it: an fp8 GEMM with n = 32 costs 42 ps per
      element of A on L40S (36 bytes at its DRAM's datasheet rate), 16.5 ps while the fp32
      intermediate fits its L2, and 6.9 ps on GB200."""
    elements = np.asarray(elements, dtype=float)
    if path == "native":
        nbytes = elements * NATIVE_FP8_QUANT_BYTES
        t = memory_time(nbytes, dev, P["f_bw"], P["f_l2"], P["u_l2"], elements * NATIVE_FP8_QUANT_WORKING_SET)
        t = overlapped(t, nbytes / (dev.sm_count * P["bw_ew"] * 1e9))
    else:
        t = memory_time(elements * (2.0 + out_bytes_per_element), dev, P["f_bw"], 1.0, P["u_l2"])
        if path == "kernel" and "q_rate" in P:
            t = overlapped(t, elements / (dev.sm_count * dev.clock_hz * P["q_rate"]))
    return t + P["c_kernel"] / dev.clock_hz + P["t_kernel_us"] * 1e-6


# --- attention --------------------------------------------------------------------------------


def fa2_num_splits(programs, sms2, kv_blocks, max_splits: int = 128):
    """FlashAttention-2's split-KV heuristic (flash_api.cpp, num_splits_heuristic): one split when
    the programs nearly fill the SMs (>= 80% of `sms2`, twice the SM count); else the fewest splits
    whose wave efficiency (n_waves / ceil(n_waves)) is within 85% of the best over 1..max, skipping
    split counts that give the same blocks per split as one fewer."""
    programs = np.asarray(programs, dtype=float)
    kv_blocks = np.asarray(kv_blocks, dtype=float)
    sms2 = np.broadcast_to(np.asarray(sms2, dtype=float), programs.shape)
    need = programs < 0.8 * sms2
    limit = np.minimum(np.minimum(max_splits, sms2), kv_blocks)
    top = int(limit[need].max()) if need.any() else 1
    effs = []
    for s in range(1, top + 1):
        eligible = (s <= limit) & ((s == 1) | (np.ceil(kv_blocks / s) != np.ceil(kv_blocks / max(s - 1, 1))))
        waves = programs * s / sms2
        effs.append(np.where(eligible, waves / np.ceil(waves), 0.0))
    E = np.asarray(effs)
    good = 0.85 * E.max(axis=0) <= E
    return np.where(need, np.argmax(good, axis=0) + 1, 1).astype(float)


FA3_MAX_BATCH_DYNAMIC = 992  # sequences one program of FA3's scheduler-prepare kernel covers; beyond them no K/V split (flash_prepare_scheduler.cu)
FA3_DYNAMIC_MARGIN = 1.1  # the prepare kernel's margin on the blocks each SM takes ("10% margin")
# vLLM's FlashAttention backend under full CUDA graphs (its default compilation mode from 0.11): for a
# call of at most the largest capture size in tokens it gives FA3's scheduler metadata and the call
# num_splits = 32 (`VLLM_FLASH_ATTN_MAX_NUM_SPLITS_FOR_CUDA_GRAPH`, later `attention_config.
# flash_attn_max_num_splits_for_cuda_graph`), so the buffers for that many splits exist at capture:
# the static count, which caps the per-sequence splits and launches the combine kernel
VLLM_GRAPH_FA3_SPLITS = 32.0
VLLM_MAX_CAPTURE_TOKENS = 512.0  # vLLM's default largest capture size: min(2 x max_num_seqs x decode query length, 512) tokens


def vllm_capture_tokens(max_num_seqs, decode_query_len=1.0):
    """The largest CUDA-graph capture size, in tokens, vLLM's config takes by default
    (`VllmConfig._set_cudagraph_sizes`): min(2 x max_num_seqs x the decode query length, 512)."""
    return np.minimum(2.0 * np.asarray(max_num_seqs, dtype=float) * decode_query_len, VLLM_MAX_CAPTURE_TOKENS)


def fa3_num_splits(total_mblocks, sms, kv_blocks, max_splits: int = 128):
    """FlashAttention-3's split-KV heuristic (hopper/heuristics.h, num_splits_heuristic, for a
    causal call): one split when the query blocks nearly fill the SMs (>= 80% of `sms`) or K/V has
    at most 4 blocks; else the fewest splits whose wave efficiency (n_waves / ceil(n_waves)) is
    within 85% of the best over 1..min(max_splits, sms, kv_blocks). Unlike FA2's it counts one
    program per SM and skips no split count."""
    total, sms, kv_blocks = (np.asarray(x, dtype=float) for x in np.broadcast_arrays(total_mblocks, sms, kv_blocks))
    if total.size == 1:  # one call (a simulation's step): the same few shapes recur, so remember them
        return np.full(total.shape, _fa3_num_splits_one(float(total.flat[0]), float(sms.flat[0]), float(kv_blocks.flat[0]), max_splits))
    return _fa3_num_splits_rows(total, sms, kv_blocks, max_splits)


def _fa3_num_splits_rows(total: np.ndarray, sms: np.ndarray, kv_blocks: np.ndarray, max_splits: int) -> np.ndarray:
    need = (total < 0.8 * sms) & (kv_blocks > 4)
    limit = np.minimum(np.minimum(max_splits, sms), kv_blocks)
    top = int(limit[need].max()) if need.any() else 1
    s = np.arange(1, top + 1, dtype=float)[:, None]
    waves = total * s / sms
    E = np.where(s <= limit, waves / np.ceil(waves), 0.0)
    good = 0.85 * E.max(axis=0) <= E
    return np.where(need, np.argmax(good, axis=0) + 1, 1).astype(float)


@functools.lru_cache(maxsize=4096)
def _fa3_num_splits_one(total: float, sms: float, kv_blocks: float, max_splits: int) -> float:
    return float(_fa3_num_splits_rows(*(np.array([x]) for x in (total, sms, kv_blocks)), max_splits)[0])


def fa3_varlen_splits(dev: Dev, b, hk_plan, rows_plan, n_kv, br, bc, graphed=None):
    """(K/V splits a FlashAttention-3 call runs per sequence, the metadata's static count) as vLLM
    runs it: varlen, with scheduler metadata built ahead of the call (`get_scheduler_metadata`) from
    the builder's model-config heads, `hk_plan` KV heads each over `rows_plan` packed query rows
    (PackGQA: the query positions times the group):
      cap    = fa3_num_splits(hk_plan * m, SMs, n)   (m = ceil(rows_plan / B_r) query blocks, n = ceil(n_kv / B_c);
               varlen: the batch counts as one sequence), 1 past FA3_MAX_BATCH_DYNAMIC sequences
      per SM = ceil(1.1 * hk_plan * b * m * n / SMs)  K/V blocks (prepare_varlen_num_blocks_kernel)
      splits = max(1, min(ceil(n / per SM), cap))
    The same for a decode, a verify pass or a prefill: every call of vLLM's FlashAttention backend
    on Hopper is one varlen call. The kernel reads the metadata's per-sequence splits (flash_api.cpp
    `mha_fwd` skips the prepare kernel when given metadata); the call's own `fa3_num_splits` on its
    tensors' heads only decides whether the combine kernel is launched. Where `graphed` (a bool per
    row: vLLM built the metadata for a call it may replay in a full CUDA graph) the cap is
    VLLM_GRAPH_FA3_SPLITS instead of the heuristic's count."""
    n = np.ceil(n_kv / bc)
    m = np.ceil(rows_plan / br)
    static = fa3_num_splits(hk_plan * m, dev.sm_count, n)
    if graphed is not None:
        static = np.where(graphed, VLLM_GRAPH_FA3_SPLITS, static)
    cap = np.where(b > FA3_MAX_BATCH_DYNAMIC, 1.0, static)
    per_sm = np.maximum(1.0, np.ceil(FA3_DYNAMIC_MARGIN * hk_plan * b * m * n / dev.sm_count))
    return np.where(cap > 1, np.maximum(1.0, np.minimum(np.ceil(n / per_sm), cap)), 1.0), static


def fa3_tile(d, packed_rows, n_q, kv_bytes=2.0):
    """(B_r, B_c) of FlashAttention-3's tile (hopper/tile_size.h `tile_size_fwd_sm90`) as vLLM calls
    it, for `packed_rows` query rows per (sequence, KV head): paged K/V through the path without
    TMA (`get_pagedkv_tma` wants pages a multiple of B_c, and vLLM's pages of 16-64 tokens are
    not), causal for more than one query (FA3 drops the mask for one), fp8 where the cache is (the
    query quantized too). bf16: 64 x 128 at d = 128 where the packed rows fit one MMA warpgroup
    (`use_one_mma_wg`), else 192 x 128 (d <= 64, 160 for one query), 192 x 128 (<= 96), 128 x 128
    (<= 128), 128 x 96 (<= 192), 128 x 80; fp8: 192 x 160, 192 x 128, 128 x 160, 128 x 160, 128 x 128."""
    fp8 = np.asarray(kv_bytes, dtype=float) < 2
    one_wg = (d == 128) & (packed_rows <= 64) & ~fp8
    br = np.where(one_wg, 64.0, np.where(d <= 96, 192.0, 128.0))
    bc16 = np.where(d <= 64, np.where(n_q > 1, 128.0, 160.0), np.where(d <= 128, 128.0, np.where(d <= 192, 96.0, 80.0)))
    bc8 = np.where(d <= 64, 160.0, np.where(d <= 96, 128.0, np.where(d <= 192, 160.0, 128.0)))
    return br, np.where(fp8, bc8, bc16)


def _planned_heads(plan_heads, h, hk, where=True):
    """(query, KV) heads a kernel's plan was laid out for: `plan_heads` (a pair of numbers or arrays,
    NaN: the call's) where `where` holds and both are given, else the call's `h`, `hk`."""
    if plan_heads is None:
        return h, hk
    given = [np.broadcast_to(np.asarray(x, dtype=float), h.shape) for x in plan_heads]
    told = where & np.isfinite(given[0]) & np.isfinite(given[1])
    return np.where(told, given[0], h), np.where(told, given[1], hk)


def _causal_blocks(n_q, n_kv, rows, bc, tiles=None):
    """Over the query blocks of `rows` rows of one (sequence, head), bottom-right causal (query i of
    n_q sees keys up to n_kv - n_q + i): (query blocks, K/V blocks visited in all, the most any
    block visits). `tiles`: the query blocks the kernel runs where its planner laid out another
    number (default ceil(n_q / rows)); a block past the last query sees every key: FlashInfer's
    kernels bound a block's keys by its last row's position and skip no block for having no rows."""
    n_q, n_kv, rows, bc = (np.asarray(x, dtype=float) for x in np.broadcast_arrays(n_q, n_kv, rows, bc))
    q_blocks = np.ceil(n_q / rows) if tiles is None else np.broadcast_to(np.asarray(tiles, dtype=float), n_q.shape)
    most = np.ceil(n_kv / bc)  # the last query block sees every key
    if (q_blocks <= 1).all() and (n_q <= rows).all():  # one query block each (decode, short verify passes): it sees every key
        return q_blocks, q_blocks * most, most
    key = np.stack([n_q.ravel(), n_kv.ravel(), rows.ravel(), bc.ravel(), q_blocks.ravel()], axis=1)
    shapes, inverse = np.unique(key, axis=0, return_inverse=True)
    sums = np.empty(len(shapes))
    for j, (nq, nkv, r, c, t) in enumerate(shapes):  # a table has few distinct shapes
        ends = np.minimum(np.arange(1, t + 1) * r, nq)
        sums[j] = np.ceil((nkv - nq + ends) / c).sum()
    total = sums[inverse.ravel()].reshape(n_q.shape)
    return q_blocks, total, most


FA3_GENERATIONS = ("hopper",)  # where vLLM's flash-attn build runs FlashAttention-3's kernels (sm90 only)
FA3_KV_STAGES = 2.0  # K/V tiles a FlashAttention-3 program keeps in flight (hopper/flash_fwd_launch_template.h: kStages = 2 on sm90); FA2's loads run one tile ahead


def _fa2_geometry(dev: Dev, b, h, hk, d, n_q, n_kv, ctas_per_sm=1.0, kv_bytes=2.0, plan_heads=None, verify=False, graph_tokens=None):
    """vLLM's FlashAttention-2 build (paged K/V, so always its split-KV kernel with B_r = 64 and
    B_c = 256 / 128 / 64 for d <= 64 / 128 / more). A decode call (one query per sequence) with
    grouped heads swaps the group into the rows (seqlenq_ngroups_swapped) and splits K/V by the
    heuristic; otherwise one program per (sequence, head, 64 query rows), no split.

    On Hopper the same build runs FlashAttention-3 (Shah et al. 2024): warp-specialised programs
    whose two consumer warpgroups share one K/V stream, with the tiles of its `tile_size_fwd_sm90`
    for paged K/V (`fa3_tile`; bf16, causal: B_r x B_c = 192 x 128 up to d = 96, 128 x 128 up to
    128, 128 x 96 up to 192, 128 x 80 up to 256). A program then does twice or three times FA2's
    MMAs per K/V byte it streams, and streams it FA3_KV_STAGES times as fast: its pipeline keeps
    that many K/V tiles in flight where FA2 keeps one, and a program's stream is latency-bound
    (bytes in flight over the memory latency). vLLM calls it varlen, with paged K/V, for a decode, a
    verify pass or a prefill alike: it packs a KV head's group into a program's rows (PackGQA,
    always on there: hopper/flash_api.cpp `get_pack_gqa`; no swap and none of its copies), 64 rows
    at d = 128 where the packed rows fit, and splits K/V as vLLM's scheduler metadata says
    (`fa3_varlen_splits`), computed for `plan_heads` where a harness built it from other heads than
    the call's (`sources.COLLECTOR_MODEL_HEADS`). A verify pass of a few tokens over a long context
    therefore splits like a decode on Hopper, where FA2's varlen call splits only a decode; so
    `verify` (a speculative verify pass, `attention_time`) changes nothing for either. A call of at
    most `graph_tokens` tokens (b x n_q; None or NaN: none), which vLLM may replay in a full CUDA
    graph, takes VLLM_GRAPH_FA3_SPLITS as its static split count on Hopper: its K/V splits are capped
    by it, and its combine kernel always runs (`fa3_varlen_splits`); FA2 takes no such count."""
    on_fa3 = np.isin(dev.generation, FA3_GENERATIONS)
    swapped = (n_q == 1) & (h > hk) & ~on_fa3
    heads = np.where(swapped, hk, h)
    rows_q = np.where(swapped, 1, n_q)  # query positions per (sequence, head)
    bc = np.where(d <= 64, 256, np.where(d <= 128, 128, 64)).astype(float)
    br = np.full(b.shape, 64.0)
    if on_fa3.any():  # (a fit of the other generations' tables skips this)
        # FA3 packs a KV head's query group into its rows (PackGQA: a block of B_r rows holds
        # B_r / group query positions of every head of the group), whatever the number of queries
        group = h / hk
        br3, bc3 = fa3_tile(d, n_q * group, n_q, kv_bytes)
        br, bc = np.where(on_fa3, br3, br), np.where(on_fa3, bc3, bc)
        heads = np.where(on_fa3, hk, heads)
        tiles = np.where(on_fa3, np.ceil(n_q * group / br), np.ceil(rows_q / br))
        q_blocks, total, most = _causal_blocks(rows_q, n_kv, np.where(on_fa3, br / group, br), bc, tiles)
    else:
        q_blocks, total, most = _causal_blocks(rows_q, n_kv, br, bc)
    q_blocks = np.where(swapped, np.ceil((h / hk) / br), q_blocks)
    kv_blocks = np.ceil(n_kv / bc)
    splits = np.where(swapped, fa2_num_splits(b * heads * q_blocks, 2 * dev.sm_count, kv_blocks), 1.0) if swapped.any() else np.ones(b.shape)
    combine = splits > 1
    packed = swapped  # one program per (sequence, KV head) over the group's rows, its K/V split evenly
    if on_fa3.any():
        plan_h, plan_hk = _planned_heads(plan_heads, h, hk)  # the heads vLLM's builder gave FA3's scheduler
        plan_rows = n_q * np.floor(plan_h / plan_hk)
        plan_br = br if plan_heads is None and (group == np.floor(group)).all() else fa3_tile(d, plan_rows, n_q, kv_bytes)[0]
        graphed = None if graph_tokens is None else on_fa3 & (b * n_q <= np.broadcast_to(np.asarray(graph_tokens, dtype=float), b.shape))
        planned, static = fa3_varlen_splits(dev, b, plan_hk, plan_rows, n_kv, plan_br, bc, graphed)
        splits = np.where(on_fa3, planned, splits)
        # the call's own static count (its tensors' heads) launches the combine kernel: the metadata's where the heads agree
        same = (plan_hk == hk) & (np.ceil(plan_rows / plan_br) == q_blocks)
        own = static if same.all() else np.where(same, static, fa3_num_splits(hk * q_blocks, dev.sm_count, kv_blocks))
        if graphed is not None:  # a graphed call is given the graph's count
            own = np.where(graphed, VLLM_GRAPH_FA3_SPLITS, own)
        combine = np.where(on_fa3, (own > 1) | (splits > 1), combine)
        packed = swapped | (on_fa3 & (splits > 1))  # a split block walks its share of K/V (FA3 splits each block's own range)
    per_split = np.ceil(kv_blocks / splits)
    total = np.where(packed, q_blocks * per_split * splits, total)
    most = np.where(packed, per_split, most)
    programs = b * heads * q_blocks * splits
    # kernels besides the attention kernel that pass over Q/O: Q in and O out transposed by copies
    # with several sequences and KV heads, and one more on every swapped call (the tables of all
    # three FlashAttention GPUs step up by one small kernel from MHA to grouped-query decode of the
    # same shape: 1.0-1.8 us at one sequence and <= 64 keys); FA3 packs inside the kernel, no copies
    copies = 2.0 * (swapped & (b > 1) & (hk > 1)) + swapped
    stages = np.where(on_fa3, FA3_KV_STAGES, 1.0)
    return dict(heads=heads, br=br, bc=bc, splits=splits, total=total, most=most, programs=programs, copies=copies, stages=stages, specialised=on_fa3,
                combine=combine, serial_merge=np.ones(b.shape, dtype=bool))  # fmt: skip


TRTLLM_GENERATIONS = ("blackwell",)  # where vLLM's FlashInfer backend runs TensorRT-LLM's kernels (compute capability 10.x)
FLASHINFER_PAGE = 64  # tokens per KV page in the measured tables (vLLM's block size there)
TRTLLM_CONTEXT_TILES_PER_STEP = 2.0  # 128-row query tiles a TensorRT-LLM context program runs per K/V tile it loads (stepQ 256: its 256 rows)
TRTLLM_DECODE_STEP_KV = 256.0  # K/V rows a TensorRT-LLM generation CTA takes per step (stepKv of the Q8/Q16 kernels in their table)
TRTLLM_DECODE_TILE_KV = 128.0  # K/V rows of one of its tiles (tileKv in the same table): a step streams two
TRTLLM_DECODE_HEADS_PER_CTA = 16.0  # the most query heads of one KV head a generation CTA holds (its largest tileQ, 16)
FLASHINFER_MIN_CHUNK_PAGES = max(128 // FLASHINFER_PAGE, 1)  # the planner's smallest K/V chunk: 128 tokens
FLASHINFER_SM90_GENERATIONS = ("hopper",)  # where FlashInfer's prefill picks its own FlashAttention-3 kernels for a bf16 query and cache
FLASHINFER_SM90_STAGES = 2.0  # K/V tiles its paged prefill keeps in flight (NUM_STAGES 2, hopper/prefill_sm90.cuh)


def _chunk_pages(items, pages, slots):
    """FlashInfer's planners' binary search (scheduler.cuh): the fewest pages per K/V chunk such that
    items x ceil(pages / chunk) work items fit `slots` (the work items a sequence may take: the
    planner's limit over a batch of alike sequences), never below FLASHINFER_MIN_CHUNK_PAGES; the
    whole K/V where not even one chunk each fits. ceil(pages / c) <= k holds from c = ceil(pages / k)
    on, with k = floor(slots / items) chunks a sequence may take."""
    pages = np.maximum(pages, 1.0)
    per_sequence = np.floor(np.asarray(slots, dtype=float) / np.maximum(items, 1.0))
    chunk = np.where(per_sequence >= 1.0, np.ceil(pages / np.maximum(per_sequence, 1.0)), pages)
    chunk = np.maximum(chunk, FLASHINFER_MIN_CHUNK_PAGES)
    return np.minimum(chunk, np.maximum(pages, FLASHINFER_MIN_CHUNK_PAGES))


def _flashinfer_sm90_tiles(d):
    """(B_r, B_c) of FlashInfer's sm90 paged prefill (`BatchPrefillWithPagedKVCacheDispatched`,
    include/flashinfer/attention/hopper/prefill_sm90.cuh): 192 x 96 at head dimension 64, 128 x 96
    at 128, 128 x 32 at 256."""
    return np.where(d <= 64, 192.0, 128.0), np.where(d <= 128, 96.0, 32.0)


def _flashinfer_geometry(dev: Dev, b, h, hk, d, n_q, n_kv, ctas_per_sm, kv_bytes=2.0, plan_heads=None, verify=False, graph_tokens=None):
    """FlashInfer's batch attention over a paged cache, as its planners lay it out (FlashInfer
    include/flashinfer/attention/scheduler.cuh):
    - the query heads of a KV group packed into a program's rows (packed length n_q h / h_kv);
      query rows per program B_r = 128 / 64 / 16 by the packed length, 128 only below head
      dimension 256 (FA2DetermineCtaTileQ);
    - K/V in chunks: prefill splits when its (query tile, chunk) items would not fit
      floor(2 S / h_kv); the chunk is the fewest pages (>= 128 tokens) that keeps the items within
      those slots (`_chunk_pages`); split outputs are merged by one more kernel;
    - the heads the planner is given pick the query tile, the query blocks and the split, and the
      kernel runs the call's KV heads over that plan (`plan_heads`: a harness that plans with other
      heads than it calls with, `sources.COLLECTOR_MODEL_HEADS`; None: the call's). A query block the
      plan lays out past the call's last packed row still walks its whole K/V chunk (the kernel
      bounds a block's keys by its last row's position, `_causal_blocks`' `tiles`), and packed rows
      past the plan's blocks are not computed. Decode is the same call with one query per sequence:
      vLLM has decoded with FlashInfer's tensor-core path (its prefill kernels and planner) since
      0.10.2 (vllm-project/vllm#23214). Where the TensorRT-LLM kernels run (`TRTLLM_GENERATIONS`),
      decode takes their launcher's K/V split (FlashInfer include/flashinfer/trtllm/fmha/
      fmhaKernels.cuh, `computeCtaAndClusterConfig`): CTAs per sequence's K/V = min(ceil(n_kv /
      stepKv), max(1, floor(S / (b x head CTAs)))), one CTA per SM and at least a K/V step each,
      stepKv 256 for the generation kernels (their kernel table), a CTA holding up to 16 query
      heads of one KV head (`TRTLLM_DECODE_HEADS_PER_CTA`) and streaming its step's two 128-row K/V
      tiles (tileKv 128 in the same table) at twice a program's rate (`stages`).
      Their context (prefill) kernels tile one query head's tokens by 128 against 128 K/V rows per
      iteration, unsplit (trtllm-gen's `...CausalP64VarSeqQ128Kv128PersistentContext`), and a
      program steps two such query tiles per K/V tile it loads (stepQ 256 for tileQ 128 at head
      dimension 128, bf16 and fp8 alike, in the kernel table TensorRT-LLM and FlashInfer ship,
      `kernelMetaInfo.h`): a program takes 256 rows of one head (`TRTLLM_CONTEXT_TILES_PER_STEP`
      tiles), one K/V stream feeding both tiles' MMAs, and walks the K/V its last row sees.
    K/V rows per iteration B_c = 64.
    On Hopper (`FLASHINFER_SM90_GENERATIONS`) a prefill call over a bf16 cache runs FlashInfer's own
    FlashAttention-3 kernels: its backend "auto" picks them on sm90 where the query and the cache
    share a 16-bit dtype (flashinfer/utils.py, `determine_attention_backend` and
    `is_fa3_backend_supported`), so an fp8 cache under a bf16 query stays on the kernels above, and
    decode too (its tensor-core path asks for the "fa2" prefill module by name, flashinfer/decode.py).
    Those kernels are warp-specialised (producer warps load K/V, two consumer warpgroups run the
    MMAs and the softmax), take one query head's tokens per tile (`_flashinfer_sm90_tiles`), keep
    `FLASHINFER_SM90_STAGES` K/V tiles in flight and never split K/V. They are priced at FlashInfer's
    occupancy like its other kernels: one of their programs (~130 KiB at head dimension 128, one per
    SM) does the work of the several smaller ones the fitted `ctas_per_sm` and `f_cta` describe
    together, an SM's share of the peak being what the fits measure, not a program's.
    Occupancy: FlashInfer's own kernels hold `ctas_per_sm` programs per 100 KiB of an SM's shared
    memory (`attention_time`; an SM of Hopper or datacenter Blackwell, 228 KiB, holds 2.3 times what
    one of Ada or RTX Blackwell, 100 KiB, does). The TensorRT-LLM context kernels are persistent (a
    tile scheduler of their own; the fp8 one at head dimension 128 runs 512 threads and 82 KiB of
    shared memory per program, its accumulators in tensor memory: the trtllm fmha kernel table
    FlashInfer ships) and are priced at one program per SM (`persistent`), not at FlashInfer's
    occupancy. The TensorRT-LLM kernels, decode and context, are warp-specialised (load, MMA and
    softmax warps of their own): their scores' exp2 overlaps their MMAs (`specialised`).
    A speculative verify pass (`verify`, a bool or one per row: a few query tokens per sequence)
    runs on TensorRT-LLM's generation kernels where they run: vLLM's FlashInfer backend counts a
    request of at most 1 + its speculative tokens as a decode when those kernels can take it
    (`reorder_batch_threshold`; `use_trtllm_attention`: "Speculative decoding requires TRTLLM
    attention for decodes"). Their launcher gives a CTA the heads of one KV group and as many of
    the query tokens as fit its 16 rows (fmhaKernels.cuh, `computeCtaAndClusterConfig`,
    `mGroupsTokensHeadsQ`: stepQ / group tokens, at least one), and splits each CTA's K/V as it
    does for a decode. Elsewhere a verify pass is a prefill call. `graph_tokens` (FlashAttention-3's
    split count under vLLM's full CUDA graphs, `_fa2_geometry`) changes nothing here."""
    decode = n_q == 1
    trtllm = np.isin(dev.generation, TRTLLM_GENERATIONS)
    spec = np.broadcast_to(np.asarray(verify, dtype=bool), b.shape) & trtllm & ~decode  # a verify pass on the generation kernels
    planner = (decode | spec) & trtllm  # a decode planner of its own; elsewhere the prefill one
    context = ~decode & ~spec & trtllm
    sm90 = ~decode & np.isin(dev.generation, FLASHINFER_SM90_GENERATIONS) & (np.asarray(kv_bytes, dtype=float) >= 2)
    # the heads FlashInfer's own planner was given (`plan_heads`, NaN: the call's) pick the query
    # tile, the query blocks and the K/V split; the kernel's grid runs the call's KV heads over them
    plan_h, plan_hk = _planned_heads(plan_heads, h, hk, where=~planner & ~context & ~sm90)
    group = h / hk
    packed = n_q * plan_h / plan_hk
    br = np.where((packed > 64) & (d < 256), 128.0, np.where(packed > 16, 64.0, 16.0))
    bc = np.full(b.shape, 64.0)
    q_blocks = np.ceil(packed / br)
    if spec.any():  # the generation kernels' CTAs: tokens x heads of one KV group in 16 rows
        tokens_per_cta = np.maximum(1.0, np.floor(TRTLLM_DECODE_HEADS_PER_CTA / group))
        br = np.where(spec, tokens_per_cta * np.minimum(group, TRTLLM_DECODE_HEADS_PER_CTA), br)
        q_blocks = np.where(spec, np.ceil(n_q / tokens_per_cta) * np.ceil(group / TRTLLM_DECODE_HEADS_PER_CTA), q_blocks)
    pages = np.ceil(n_kv / FLASHINFER_PAGE)
    slots = np.floor(2.0 * dev.sm_count / plan_hk) / np.maximum(b, 1.0)  # PrefillPlan: max_grid_size / num_kv_heads, in integers
    chunk = _chunk_pages(q_blocks, pages, slots)
    head_ctas = hk * np.where(spec, q_blocks, np.ceil(group / TRTLLM_DECODE_HEADS_PER_CTA))
    kv_ctas = np.minimum(np.ceil(n_kv / TRTLLM_DECODE_STEP_KV), np.maximum(1.0, np.floor(dev.sm_count / np.maximum(b * head_ctas, 1.0))))
    splits = np.where(planner, kv_ctas, np.ceil(pages / chunk))
    chunk_tokens = np.where(planner, np.ceil(n_kv / kv_ctas), chunk * FLASHINFER_PAGE)  # each CTA a contiguous share of the K/V
    # causal visits per packed block: packed rows r cover query positions r / group
    _, total, most = _causal_blocks(n_q, n_kv, br / group, bc, q_blocks)
    chunk_blocks = np.ceil(chunk_tokens / bc)
    most = np.minimum(most, chunk_blocks)
    programs = b * hk * q_blocks * splits
    heads = hk
    per_head = context | sm90
    if per_head.any():  # kernels that tile each query head's tokens, unpacked and unsplit: TensorRT-LLM's
        # context kernels (...Q128Kv128PersistentContext: 128 by 128 tiles, two query tiles a program) and FlashInfer's FlashAttention-3 prefill
        br90, bc90 = _flashinfer_sm90_tiles(d)
        head_br, head_bc = np.where(context, 128.0 * TRTLLM_CONTEXT_TILES_PER_STEP, br90), np.where(context, 128.0, bc90)
        head_q_blocks, head_total, head_most = _causal_blocks(n_q, n_kv, head_br, head_bc)
        br, bc = np.where(per_head, head_br, br), np.where(per_head, head_bc, bc)
        total, most = np.where(per_head, head_total, total), np.where(per_head, head_most, most)
        splits = np.where(per_head, 1.0, splits)
        programs = np.where(per_head, b * h * head_q_blocks, programs)
        heads = np.where(per_head, h, hk)
    stages = np.select([context, sm90, planner], [1.0, FLASHINFER_SM90_STAGES, TRTLLM_DECODE_STEP_KV / TRTLLM_DECODE_TILE_KV], 1.0)
    return dict(heads=heads, br=br, bc=bc, splits=splits, total=total, most=most, programs=programs,
                copies=np.zeros(b.shape), persistent=context, specialised=context | planner | sm90, stages=stages, serial_merge=planner)  # fmt: skip


LIBRARIES = {"fa2": _fa2_geometry, "flashinfer": _flashinfer_geometry}


def softmax_overlapped(library: str, dev: Dev, b, h, hk, d, n_q, n_kv, kv_bytes=2.0) -> np.ndarray:
    """Calls whose kernels overlap the scores' softmax with their MMAs (warp-specialised: TensorRT-LLM's,
    FlashAttention-3's); elsewhere a program's warps do one after the other (`attention_time`)."""
    b, h, hk, d, n_q, n_kv = (np.asarray(x, dtype=float) for x in np.broadcast_arrays(b, h, hk, d, n_q, n_kv))
    kv_bytes = np.broadcast_to(np.asarray(kv_bytes, dtype=float), b.shape)
    return np.broadcast_to(np.asarray(LIBRARIES[library](dev, b, h, hk, d, n_q, n_kv, 1.0, kv_bytes)["specialised"], dtype=bool), b.shape)


def fp8_attention(library, generation, kv_bytes) -> np.ndarray:
    """Calls over an fp8 cache whose query vLLM quantizes to fp8 and whose MMAs run in fp8: FlashInfer
    where it calls TensorRT-LLM's kernels (`TRTLLM_GENERATIONS`), and FlashAttention-3 (vLLM's
    flash-attn build on `FA3_GENERATIONS`, whose fp8 path takes Q, K and V in fp8). `library`: one
    name or one per row."""
    library = np.asarray(library, dtype=object)
    fp8_kernels = ((library == "flashinfer") & np.isin(generation, TRTLLM_GENERATIONS)) | ((library == "fa2") & np.isin(generation, FA3_GENERATIONS))
    return (np.asarray(kv_bytes, dtype=float) < 2) & fp8_kernels


def attention_time(P: Params, dev: Dev, library: str, b, h, hk, d, n_q, n_kv, kv_bytes=2.0, cache_write=True, query_quant=True, plan_heads=None,
                   verify=False, graph_tokens=None):  # fmt: skip
    """Device seconds of one attention call of `library` ("fa2" or "flashinfer"): `b` sequences,
    `h` query and `hk` KV heads of dimension `d`, `n_q` new query tokens per sequence attending
    causally to `n_kv` cached keys (the new ones included); the call also writes the new tokens'
    K and V into the cache (`kv_bytes` per element: 2 bf16, 1 fp8). With an fp8 cache, vLLM
    quantizes the query to fp8 and runs fp8 MMAs only where its kernels take fp8 operands
    (`fp8_attention`); FlashInfer's own kernels keep a bf16 query, widen the fp8 K/V as they load it
    and run bf16 MMAs. vLLM's attention layer quantizes the query before it calls the backend, as a
    plain torch op that its compiled graph fuses into the op before (vllm `Attention.forward`,
    `query_quant`): that costs the query's bytes, not a kernel, and a timer of the backend's call
    alone does not see it (`query_quant` false, a bool or one per row, `sources.attention_timer`).
    Kernels: the cache write (left out where `cache_write`, a bool or one per row, is false: a
    timer that does not see it), the attention kernel, a combine kernel when K/V are split, and
    FA2's swapped decode's copies. `plan_heads`: the (query, KV) heads FlashInfer's own planner
    (FA3's scheduler metadata) was given where not the call's (a pair of numbers or of arrays, NaN:
    the call's; a source's `sources.Timer.plan_heads`); FlashAttention-2 takes its work from the
    call's tensors. `verify`: the call is a speculative verify pass (a bool or one per row), which
    FlashInfer runs on TensorRT-LLM's generation kernels where they run (`_flashinfer_geometry`).
    `graph_tokens`: the largest call, in tokens, vLLM built the metadata for as one it may replay in
    a full CUDA graph (a number or one per row; None or NaN: none), which on Hopper fixes FA3's
    static split count (`_fa2_geometry`)."""
    b, h, hk, d, n_q, n_kv = (np.asarray(x, dtype=float) for x in np.broadcast_arrays(b, h, hk, d, n_q, n_kv))
    kv_bytes = np.broadcast_to(np.asarray(kv_bytes, dtype=float), b.shape)
    # programs resident per SM: as many as its shared memory holds (the parameter is per 100 KiB)
    occupancy = P["ctas_per_sm"] * dev.sram_bytes_per_sm / OCCUPANCY_SMEM if "ctas_per_sm" in P else np.ones(b.shape)
    g = LIBRARIES[library](dev, b, h, hk, d, n_q, n_kv, occupancy, kv_bytes, plan_heads, verify, graph_tokens)
    occupancy = np.where(g.get("persistent", False), 1.0, occupancy)  # a persistent kernel: one program per SM, looping over its tiles
    S, f = dev.sm_count, dev.clock_hz
    fp8_mma = fp8_attention(library, dev.generation, kv_bytes)
    peak = np.where(fp8_mma, np.nan_to_num(dev.peak("fp8"), nan=0.0), 0.0)
    peak = np.where(peak > 0, peak, dev.peak("bf16"))
    tokens = b * n_q
    q_bytes = tokens * h * d * 2.0
    new_kv = tokens * hk * d * 2.0 * 2.0
    cache = b * n_kv * hk * d * 2.0 * kv_bytes
    working_set = 2.0 * q_bytes + new_kv + cache
    hit = resident(working_set, dev.l2_bytes * P["u_l2"])
    rate = g.get("stages", 1.0) * P["bw_cta"] * 1e9 / (hit / P["l2_speedup"] + (1.0 - hit))
    keys_per_block = np.minimum(g["bc"], n_kv)
    # the block's scores: two MMAs, then one exp2 each on the SFUs, both at the program's efficiency
    # f_cta. A FlashAttention-2-style program's warps do one after the other; warp-specialised
    # kernels (FA3, TensorRT-LLM's) overlap them
    mma = 4.0 * g["br"] * keys_per_block * d / (P["f_cta"] * peak / S)
    softmax = g["br"] * keys_per_block * P.get("x_sfu", 1.0) / (P["f_cta"] * SFU_PER_CLOCK * f)  # x_sfu SFU-rate instructions per score
    scores = np.where(g["specialised"], overlapped(mma, softmax), mma + softmax)
    iteration = np.maximum(scores, 2.0 * keys_per_block * d * kv_bytes / rate)
    t_prog = P["t_prog_us"] * 1e-6
    work = b * g["heads"] * g["total"] * iteration + g["programs"] * t_prog
    longest = g["most"] * iteration + t_prog
    slots = S * occupancy  # programs resident at once; each streams at its own latency-bound rate
    schedule = np.maximum(longest, work / slots + P["gamma"] * longest * (g["programs"] > slots))
    kernel_s = P["c_kernel"] / f

    def mem(nbytes):
        return memory_time(nbytes, dev, P["f_bw"], P["f_l2"], P["u_l2"], working_set)

    main = np.maximum(schedule, mem(2.0 * q_bytes + cache)) + kernel_s
    write = mem(new_kv + tokens * hk * d * 2.0 * kv_bytes) + kernel_s
    # the combine kernel: launched on a split call (FA3: wherever the call's own count splits, its
    # programs returning at once on sequences its scheduler left whole), reading the partials; where
    # it walks a row's partials one split after another (FlashAttention's combine, TensorRT-LLM's
    # multi-CTA reduction: `serial_merge`), t_merge per split on top
    partials = np.where(g["splits"] > 1, mem(g["splits"] * b * h * n_q * (d + 1) * 4.0 + q_bytes), 0.0)
    serial = np.where(g["serial_merge"], g["splits"] * P.get("t_merge_ns", 0.0) * 1e-9, 0.0)
    combine = np.where(g.get("combine", g["splits"] > 1), partials + serial + kernel_s, 0.0)
    copies = g["copies"] * (mem(2.0 * q_bytes) + kernel_s)
    quantize_q = np.where(fp8_mma & np.asarray(query_quant, dtype=bool), mem(q_bytes * 1.5), 0.0)  # fused: bf16 in, fp8 out
    return main + np.where(cache_write, write, 0.0) + combine + copies + quantize_q


def attention_kernels(library: str, b, h, hk, n_q, n_kv, d=128, kv_bytes=2.0, sm_count=108, generation="ampere", verify=False, graph_tokens=None):
    """How many kernels `attention_time` prices for one call (for the per-node cost of a CUDA graph)."""
    dev_like = Dev(np.atleast_1d(float(sm_count)), np.ones(1), np.ones(1), np.ones(1), np.ones(1), np.ones(1), np.zeros(1, dtype=bool), np.full(1, np.nan), {},
                   np.array([generation], dtype=object))  # fmt: skip
    b, h, hk, d, n_q, n_kv = (np.atleast_1d(np.asarray(x, dtype=float)) for x in (b, h, hk, d, n_q, n_kv))
    g = LIBRARIES[library](dev_like, b, h, hk, d, n_q, n_kv, 1.0, kv_bytes, None, verify, graph_tokens)
    return 2 + g.get("combine", g["splits"] > 1) + g["copies"]
