"""What a data source's number is, given the kernels' device times: the source's timer.

A kernel's device time is a property of the GPU; what a benchmark reports around it is a property
of the benchmark. The sources the model knows, from their published harness code:

- aiconfigurator's vLLM collectors (ai-dynamo/aiconfigurator, collector/vllm/collect_gemm.py,
  collect_attn.py, collector/helper.py `benchmark_with_power`): the call is captured in a CUDA
  graph and the graph replayed back to back between two CUDA events; latency = elapsed / replays
  / calls per replay. A GEMM replay runs 6 layers (6 weight copies, one shared input) for bf16 and
  fp8, 1 for fp8_block and nvfp4; fp8_block runs eagerly (no graph), so the host's Python and
  launch work bounds it. An attention replay is one `impl.forward` of the backend
  (collector/vllm/collect_attn.py), which writes the new tokens' K/V into the cache, except where
  the backend moved the write out of `forward` into `do_kv_cache_update` (tracking issue
  vllm-project/vllm#32335): FlashAttention from vLLM 0.16 (PR #25954), FlashInfer from 0.17 (PR
  #35422, merged 2026-02-26, days before 0.16 shipped: 0.17 is the first release sure to carry it;
  the earlier attempts #32514 and #32551 were closed unmerged). The tables here, of 0.14 and 0.19,
  lie on either side of both. Over an fp8 cache the collector casts the query to fp8 before the
  timed call (vLLM's attention layer quantizes it before calling the backend too), so no row
  holds the query's quantization.
  Replaying a small graph costs the host and the GPU's front end a fixed time per replay that no
  kernel can go below (`c_floor`, in cycles of the GPU clock: it is ~15-19 k cycles on every GPU
  measured, 7-12 us); fp8 activations are quantized inside the call, as the release runs it
  (`FUSED_FP8_QUANT`: op by op before vLLM 0.19, one kernel at its bytes' cost from 0.19 on).
  Both floors are partly the host's, and each GPU's tables were measured on a host of its own, so
  the fit gives the replay floor a deviation per GPU and the eager host time one per kind of host
  CPU (`HOST_TIMER_PARAMS`, `HardwareProfile.host_cpu`), which a GPU the fit never saw inherits
  (`simulator.kernel_fit.timer_keys`).
  The collector builds the backend's attention metadata from a small model config of its own
  (collector/vllm_v1/fake_hf_model/config.json: a Qwen3 with 16 query heads, 8 KV heads, head
  dimension 128; `COLLECTOR_MODEL_HEADS`), not from the heads and head dimension of the call it
  times, where its `create_vllm_config` takes no override of them (collector/vllm/utils.py at
  070f5af; later versions pass the call's, `hf_config_override`), and the tables show it.
  FlashInfer's own planner lays out every such call for 8 KV heads and a group of 2, and the
  kernel runs the call's heads over that plan (`kernels._flashinfer_geometry`): a
  decode call's K/V splits are those of 8 KV heads (on RTX PRO 6000 one sequence of 131071
  tokens takes 43.5, 43.7 and 47.2 us with 1, 2 and 4 KV heads), and the kernel module is the
  one for head dimension 128 (FlashInfer's d = 256 rows on RTX PRO 6000 take their d = 128 twins'
  time, `kernel_fit.head_dim_ignored`). TensorRT-LLM's kernels (GB200) and FlashAttention-2 take
  their work from the call's tensors. FlashAttention-3 on Hopper takes its K/V splits (a
  decode's, a verify pass's, a prefill's) from scheduler metadata vLLM's builder computes ahead of
  the call from the same config's heads
  (`get_scheduler_metadata`; flash_api.cpp `mha_fwd` then skips its own), and the model prices
  them with those heads (`kernels.fa3_varlen_splits`); no Hopper table is in the data to show it.
  That config is vLLM's default one from 0.11 on (collector/vllm/utils.py `create_vllm_config`: a
  `CompilationConfig()`, no eager flag), whose CUDA-graph mode is FULL_AND_PIECEWISE and whose
  largest capture size is min(2 x max_num_seqs, 512) tokens, max_num_seqs being the call's batch
  (`Timer.graph_seqs`): its FlashAttention builder gives FA3 32 splits as the static count of any
  call within that size (`kernels.VLLM_GRAPH_FA3_SPLITS`), every decode row of 512 sequences or
  fewer and the prefills of one token.
- nccl-tests (collector/collect_nccl.py): the out-of-place time column of `*_perf`, see
  `simulator.gpu_model.collectives`.
- anything else: the device time of the call, as a kernel-level timer (CUDA events around one
  kernel, a profiler) reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator import units
from simulator.gpu_model import kernels as K
from simulator.gpu_model.device import Dev


@dataclass(frozen=True)
class Timer:
    graph: bool = False  # replayed in a CUDA graph (per-replay floor) or run eagerly (host floor)
    calls_per_replay: int = 1
    weight_copies: int = 1  # distinct weight matrices cycled through between two uses of one
    eager_host: bool = False  # an eager call whose host work can bound it
    cache_write: bool = True  # an attention call's time includes writing the new tokens' K/V into the cache
    query_quant: bool = True  # an fp8 attention call's time includes quantizing its query (`kernels.attention_time`)
    replays: int = 1  # replays run back to back per measurement, warm-up included (how long the GPU works flat out)
    fp8_quant: str = "fused"  # how an fp8 call's activations are quantized (`kernels.quantize_time`'s path)
    plan_heads: tuple[float, float] | None = None  # (query, KV) heads FlashInfer's planner (FA3's scheduler) was given, where not the call's
    graph_seqs: bool = False  # attention metadata built under vLLM's full CUDA graphs with max_num_seqs the call's sequences (`graph_tokens`)

    def graph_tokens(self, b) -> np.ndarray:
        """Per call of `b` sequences, the largest call in tokens its metadata treats as one to replay
        in a full CUDA graph (`kernels.attention_time`'s `graph_tokens`); NaN where none."""
        b = np.asarray(b, dtype=float)
        return K.vllm_capture_tokens(b) if self.graph_seqs else np.full(b.shape, np.nan)


KERNEL_ONLY = Timer()
AIC_REPLAYS = 3 + 6  # collector/helper.py `benchmark_with_power`: num_warmups=3 replays, then num_runs=6 timed ones


# The first vLLM release whose fp8 GEMM tables show the activation quantization at its bytes' cost
# (RTX PRO 6000's, 0.19); the tables of 0.14 (L40S, GB200) show PyTorch's op-by-op reference
# (`kernels.NATIVE_FP8_QUANT_BYTES`), which vLLM runs where its configuration turns custom ops off:
# the collector's `VllmConfig()` defaults to compiling with inductor, whose default is custom_ops
# "none", and the benchmarked layer is never compiled. Where between the two releases that changed,
# the tables do not say; the releases before 0.19 are taken to run the reference.
FUSED_FP8_QUANT = (0, 19)


def gemm_timer(framework: str, dtype: str, version: str = "") -> Timer:
    """What a GEMM row of `framework` (at `version`) timed, for `dtype`."""
    if framework == "vllm":
        if dtype == "fp8_block":
            return Timer(graph=False, calls_per_replay=1, weight_copies=1, eager_host=True, replays=AIC_REPLAYS)
        copies = 1 if dtype == "nvfp4" else 6
        fp8_quant = "fused" if units.release(version) >= FUSED_FP8_QUANT else "native"  # no release named: () sorts before all
        return Timer(graph=True, calls_per_replay=copies, weight_copies=copies, replays=AIC_REPLAYS, fp8_quant=fp8_quant)
    return KERNEL_ONLY


# the first vLLM release whose backend's `forward` leaves the cache write out, per kernel library
SPLIT_CACHE_WRITE = {"fa2": (0, 16), "flashinfer": (0, 17)}


# the first vLLM release whose configs default to full CUDA graphs (cudagraph_mode FULL_AND_PIECEWISE)
FULL_GRAPH_DEFAULT = (0, 11)


def attention_timer(framework: str, library: str = "fa2", version: str = "") -> Timer:
    """What an attention row of `framework` (at `version`, running `library`) timed."""
    if framework != "vllm":
        return KERNEL_ONLY
    split = library in SPLIT_CACHE_WRITE and units.release(version) >= SPLIT_CACHE_WRITE[library]
    graphs = units.release(version) >= FULL_GRAPH_DEFAULT
    return Timer(graph=True, cache_write=not split, query_quant=False, plan_heads=COLLECTOR_MODEL_HEADS, graph_seqs=graphs)


# The heads of the model config aiconfigurator's vLLM collector builds its attention metadata from
# (collector/vllm_v1/fake_hf_model/config.json, a small Qwen3: 16 query heads, 8 KV heads, head
# dimension 128), whatever heads the timed call has.
COLLECTOR_MODEL_HEADS = (16.0, 8.0)

TIMER_PARAMS = ("c_floor", "t_host_us")
HOST_TIMER_PARAMS = ("t_host_us",)  # the host CPU's own work: shared by the GPUs measured on one kind of host (`HardwareProfile.host_cpu`)
TIMER_START = {"c_floor": 16000.0, "t_host_us": 100.0}
TIMER_BOUNDS = {"c_floor": (100.0, 100000.0), "t_host_us": (1.0, 2000.0)}


def timed(device_s, timer: Timer, T: dict, dev: Dev):
    """What the source reports for calls of `device_s` seconds on the device."""
    t = np.asarray(device_s, dtype=float)
    if timer.graph:
        return np.maximum(t, T["c_floor"] / dev.clock_hz / timer.calls_per_replay)
    if timer.eager_host:
        return np.maximum(t, T["t_host_us"] * 1e-6)
    return t


QUANTIZED_OWN = ("f_mma", "c_kernel", "t_kernel_us", "c_tile", "bw_load_scaled", "q_rate", "bw_ew")  # a quantized GEMM's own parameters; the rest are the bf16 GEMM's
QUANTIZED_OUT_BYTES = {"fp8": 1.0, "fp8_block": 1.0 + 4.0 / 128, "nvfp4": 0.5 + 1.0 / 16}


def gemm_call(P: dict, dev: Dev, m, n, k, dtype: str, weight_copies=1.0, repeats=None, fp8_quant: str = "fused"):
    """Device seconds of one linear layer call in `dtype`: for quantized dtypes the activation
    quantization (bf16 in, the dtype and its scales out; for fp8 by `fp8_quant`, a path of
    `kernels.quantize_time`) and the GEMM. `repeats`: how many such calls run back to back (a
    benchmark's; None: for good, see `kernels.power_limited`)."""
    t = K.gemm_time(P, dev, m, n, k, dtype, weight_copies, repeats)
    if dtype in QUANTIZED_OUT_BYTES:
        path = fp8_quant if dtype == "fp8" else "kernel"
        t = t + K.quantize_time(P, dev, np.asarray(m, dtype=float) * np.asarray(k, dtype=float), QUANTIZED_OUT_BYTES[dtype], path)
    return t

