"""What the reference executor's own kernels cost on a CPU profile, composed from the cost model's
primitives (roofline GEMMs and memory passes). The kernels in simulator.attention model what a GPU
library runs; these model, pass for pass, what `reference/` runs eagerly in torch on a CPU, so
that `calibrate` and `compare` check the cost model against the executor that was really timed.

Two facts of the local device enter besides the profile's fields, both measured by `calibrate`
(reference/microbench.py) and kept in the profile's `calibration.executor` block:
- `first_touch_bytes_per_s`: a tensor of 32 MiB or more is allocated from fresh pages of the OS,
  and its first write faults every page in (glibc serves allocations above M_MMAP_THRESHOLD with
  mmap and never raises that threshold past DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit systems:
  mallopt(3)); naive attention writes S and P into such tensors on every call at long sequences.
  Below that size freed memory is reused once the threshold has risen (the microbenchmark raises
  it first). `fresh_fraction`, the share of the S, P and mask bytes below that size priced at the
  first-touch rate too, is fitted by `calibrate` to its naive-attention runs: it stands for what
  the pass model leaves out at those sizes (masked_fill over a broadcast mask, for one, runs below
  copy bandwidth), not for measured page faults;
- `softmax_s_per_element`: a row softmax (max, exp, sum, scale) over a tile that stays in cache,
  as torch's fused CPU attention kernel computes it on every score tile;
- `sdpa_program_s`: the fixed cost of one (batch, head, query block) program of that kernel;
- `scatter_s_per_element`, `silu_s_per_element`, `rope_s_per_element`, `rms_norm_s_per_element`,
  `mask_s_per_element`: the forward pass's operators that run below memory speed, as the executor
  calls them (writing K and V into the cache with scatter_, SiLU of the gate, RoPE as a complex
  product, RMSNorm as torch decomposes it, the additive mask built from positions), per element
  (per complex element for RoPE, per mask entry); simulator.forward prices those passes no faster;
- `op_s_hot`, `op_s_cold`: seconds per dispatched operator of the executor's forward pass, with
  the core's cache warm, and cold as every layer finds it when the layers' weights overflow it
  (simulator.forward prices a forward pass's operators with them);
- `gemv_weight_bytes_per_s`, `gemm_weight_bytes_per_s`: the rate at which the weight GEMMs of a
  forward pass get through their weights, for one row (a matrix-vector kernel) and for more
  (a GEMM kernel), fitted by `calibrate` to its forward passes. Weight GEMMs timed one after the
  other with nothing between them get through their weights about twice as fast as inside a pass,
  where the operators between two GEMMs refill the core's cache that the last weight stream emptied
  (measured on the trained target: 0.45 ms alone, 0.98 ms in a one-row pass); and the small-row
  GEMM kernels run well below the peak of large ones (`pass_gemm`);
- `pass_op_scale`: the per-operator costs above as the same fit finds them inside those passes,
  over what their own microbenchmark measured (1: as measured). On a shared host a pass's speed
  drifts by 20-30% between spells of a few seconds, and the two are timed seconds apart.
A profile without them (every GPU profile) prices none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from simulator.errors import UserError
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.roofline import KernelCost, elementwise, gemm, memory_bytes_per_s, roofline_time_s

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit (mallopt(3))
# torch's CPU flash-attention kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp):
# query blocks of 256 rows from N_q >= 768, of 64 from N_q >= 192, else 32; key blocks of 512.
SDPA_CPU_KV_SPLIT = 512


@dataclass(frozen=True)
class ExecutorFacts:
    """Measured facts of the local device that only the eager executor's kernels need."""

    first_touch_bytes_per_s: float | None = None
    fresh_fraction: float = 0.0
    softmax_s_per_element: float = 0.0
    sdpa_program_s: float = 0.0
    op_s_hot: float | None = None
    op_s_cold: float | None = None
    scatter_s_per_element: float = 0.0
    silu_s_per_element: float = 0.0
    rope_s_per_element: float = 0.0
    rms_norm_s_per_element: float = 0.0
    mask_s_per_element: float = 0.0
    gemv_weight_bytes_per_s: float | None = None
    gemm_weight_bytes_per_s: float | None = None
    pass_op_scale: float = 1.0

    @classmethod
    def of(cls, hw: HardwareProfile) -> ExecutorFacts:
        """The facts in the profile's `calibration.executor` block; a missing or zero one takes its default."""
        facts = (hw.calibration or {}).get("executor") or {}
        return cls(**{f.name: facts.get(f.name) or f.default for f in fields(cls)})

    def weight_bytes_per_s(self, rows: int) -> float | None:
        """The fitted in-pass weight rate of a GEMM over `rows` rows (None where not fitted)."""
        return self.gemv_weight_bytes_per_s if rows == 1 else self.gemm_weight_bytes_per_s


def _pass_s(n_bytes: float, hw: HardwareProfile) -> float:
    """A memory pass over `n_bytes` (read + written) at the achievable bandwidth for that size."""
    return n_bytes / memory_bytes_per_s(hw, n_bytes)


def pass_gemm(m: int, n: int, k: int, hw: HardwareProfile, dtype: str = "fp16", name: str = "gemm") -> KernelCost:
    """A weight GEMM [m, k] @ [k, n] inside a forward pass. On a CPU profile with the executor's
    fitted in-pass weight rates, as `simulator.roofline.gemm` prices it (FLOPs and data in turn) but
    with the k n weights at the rate of its kind (one row or more); elsewhere `gemm` itself."""
    cost = gemm(m, n, k, hw, dtype, name)
    rate = ExecutorFacts.of(hw).weight_bytes_per_s(m)
    if hw.kind != "cpu" or not rate:
        return cost
    e = DTYPE_BYTES[dtype]
    activations = float(e * (m * k + m * n))
    time_s = cost.flops / (hw.peak_flops(dtype) * hw.achievable.matmul) + activations / memory_bytes_per_s(hw, activations)
    return replace(cost, time_s=time_s + e * k * n / rate + hw.launch_overhead_s)


def first_touch_s(n_bytes: float, hw: HardwareProfile) -> float:
    """Faulting in the pages of a freshly allocated tensor of `n_bytes`: all of them from the largest
    mmap threshold up, the fitted fresh fraction below it (0 without a measured rate)."""
    facts = ExecutorFacts.of(hw)
    if not facts.first_touch_bytes_per_s:
        return 0.0
    return n_bytes * (1.0 if n_bytes >= MMAP_THRESHOLD_BYTES else facts.fresh_fraction) / facts.first_touch_bytes_per_s


def naive_attention_executor(
    b: int, h: int, n_q: int, n_kv: int, d: int, hw: HardwareProfile, causal: bool, dtype: str = "fp32"
) -> KernelCost:
    """reference.attention.naive_attention as torch runs it eagerly; E = B H N_q N_kv scores:

    1. Q * scale                   elementwise over B H N_q d (read, write)
    2. S = (Q scale) K^T           batched GEMM, 2 E d FLOPs; writes S (E elements, fresh pages)
    3. causal mask                 two aranges and a compare: N_q N_kv bools written (fresh pages)
    4. S.masked_fill_(mask, -inf)  reads S and the mask, writes S
    5. P = softmax(S)              reads S, writes P (E elements, fresh pages, while S is alive)
    6. O = P V                     batched GEMM, 2 E d FLOPs; reads P and V, writes O
    Steps 3 and 4 only when causal. Every pass is priced at the profile's roofline; the softmax
    no faster than the measured in-cache softmax rate; fresh pages at the measured first-touch rate.
    """
    e = DTYPE_BYTES[dtype]
    scores = b * h * n_q * n_kv
    q_bytes, kv_bytes = e * b * h * n_q * d, e * b * h * n_kv * d
    s_bytes, mask_bytes = e * scores, n_q * n_kv if causal else 0
    gemm_flops = 2.0 * scores * d
    scale_s = roofline_time_s(b * h * n_q * d, 2 * q_bytes, hw, "fp32", hw.achievable.matmul)
    qk_s = roofline_time_s(gemm_flops, q_bytes + kv_bytes + s_bytes, hw, dtype, hw.achievable.matmul)
    mask_s = 0.0
    if causal:
        mask_s = roofline_time_s(0.0, mask_bytes, hw, dtype, 1.0, launches=3)  # arange, arange, gt
        mask_s += roofline_time_s(0.0, 2 * s_bytes + mask_bytes, hw, dtype, 1.0)  # masked_fill_
    softmax_rate = ExecutorFacts.of(hw).softmax_s_per_element
    softmax_s = max(_pass_s(2 * s_bytes, hw), scores * softmax_rate) + hw.launch_overhead_s
    pv_s = roofline_time_s(gemm_flops, s_bytes + kv_bytes + q_bytes, hw, dtype, hw.achievable.matmul)
    fresh_s = 2 * first_touch_s(s_bytes, hw) + first_touch_s(mask_bytes, hw)
    # passes 1-6: Q r+w; Q, K, S; mask; S r+w, mask; S, P; P, V, O
    hbm_bytes = float(2 * q_bytes + (q_bytes + kv_bytes + s_bytes) + 2 * mask_bytes + (2 if causal else 0) * s_bytes
                      + 2 * s_bytes + (s_bytes + kv_bytes + q_bytes))  # fmt: skip
    launches = 6 + (4 if causal else 0)
    time_s = scale_s + qk_s + mask_s + softmax_s + pv_s + fresh_s
    return KernelCost("naive-executor", 2 * gemm_flops, hbm_bytes, time_s, launches)


def sdpa_cpu_q_split(n_q: int) -> int:
    """Query rows per block of torch's CPU flash-attention kernel."""
    return 256 if n_q >= 768 else 64 if n_q >= 192 else 32


def sdpa_cpu_blocks(n_q: int, n_kv: int, causal: bool) -> tuple[int, int]:
    """(query block rows, score elements computed) of torch's CPU flash-attention kernel for one
    (batch, head): query blocks of q_split rows; each visits key blocks of 512 from 0 until it
    passes its last causal key (top-left aligned), whole blocks, so causality saves little below
    N = 512."""
    q_split = sdpa_cpu_q_split(n_q)
    scores = 0
    for m in range(0, n_q, q_split):
        rows = min(q_split, n_q - m)
        num_keys = min(m + rows, n_kv) if causal else n_kv
        visited = sum(min(SDPA_CPU_KV_SPLIT, n_kv - n) for n in range(0, num_keys, SDPA_CPU_KV_SPLIT))
        scores += rows * visited
    return q_split, scores


def sdpa_cpu(
    b: int, h: int, n_q: int, n_kv: int, d: int, hw: HardwareProfile, causal: bool, dtype: str = "fp32"
) -> KernelCost:
    """torch.nn.functional.scaled_dot_product_attention on a CPU: torch's fused flash kernel.
    Per (batch, head, query block): QK^T of the block against each visited key block (GEMM), scale,
    mask, running max, exp and sum over the score tile in cache, P V (GEMM); O written once.
    GEMMs at the profile's `achievable.attention` fraction of peak, the score tiles at the measured
    softmax rate (a roofline elementwise pass where none was measured), Q, K, V read and O written
    at the roofline's memory speed, K and V once per query block; plus the measured fixed cost of
    each (batch, head, query block) program."""
    e = DTYPE_BYTES[dtype]
    q_split, scores_per_head = sdpa_cpu_blocks(n_q, n_kv, causal)
    scores = b * h * scores_per_head
    flops = 4.0 * scores * d
    q_blocks = -(-n_q // q_split)
    hbm_bytes = float(e * b * h * d * (2 * n_q + 2 * n_kv * q_blocks))
    gemm_s = flops / (hw.peak_flops(dtype) * hw.achievable.attention)
    facts = ExecutorFacts.of(hw)
    rate = facts.softmax_s_per_element
    tile_s = scores * rate if rate else roofline_time_s(5.0 * scores, 0.0, hw, "fp32", hw.achievable.matmul, launches=0)
    programs_s = b * h * q_blocks * facts.sdpa_program_s
    time_s = max(gemm_s + tile_s, _pass_s(hbm_bytes, hw)) + programs_s + hw.launch_overhead_s
    return KernelCost("sdpa-cpu", flops, hbm_bytes, time_s)


# --- the CPU eager device model -------------------------------------------------------------


class CpuEagerModel:
    """The device model (`simulator.device_model.DeviceModel`) of a CPU running the executor's
    torch operators eagerly: roofline GEMMs and memory passes at the profile's achievable fractions,
    and, where `calibrate` measured them (`ExecutorFacts`), the operators that run below memory
    speed at their measured rates, weight GEMMs at the fitted in-pass rates, torch's fused attention
    kernel's programs and softmax, and the per-operator cost of an eager pass. No intervals."""

    def __init__(self, hw: HardwareProfile):
        self.hw = hw
        self.facts = ExecutorFacts.of(hw)

    def gemm(self, m: int, n: int, k: int, dtype: str, name: str, weight_matrices: int = 1) -> KernelCost:
        return pass_gemm(m, n, k, self.hw, dtype, name)

    def attention(self, batch, context_len, query_tokens, heads, kv_heads, d_head, dtype) -> KernelCost:
        """Attention of `query_tokens` new tokens per sequence over the cache plus themselves, one
        layer: K, V of every cached and new position read once per KV head (GQA groups share them),
        Q read and O written, the new tokens' K, V written into the cache (scatter_, at its
        measured rate). FLOPs 4 B H q (ctx + q) d_head; the softmax over every score tile and every
        (sequence, head, query block) program of torch's fused kernel at their measured costs."""
        hw, facts = self.hw, self.facts
        e = DTYPE_BYTES[dtype]
        keys = context_len + query_tokens
        tokens = batch * query_tokens
        d_kv = kv_heads * d_head
        hbm_bytes = float(2 * batch * keys * d_kv * e + 2 * tokens * d_kv * e + 2 * tokens * heads * d_head * e)
        flops = 4.0 * batch * heads * query_tokens * keys * d_head
        time_s = roofline_time_s(flops, hbm_bytes, hw, dtype, hw.achievable.attention)
        time_s += batch * heads * query_tokens * keys * facts.softmax_s_per_element
        time_s += batch * heads * -(-query_tokens // sdpa_cpu_q_split(query_tokens)) * facts.sdpa_program_s
        time_s += 2 * tokens * d_kv * facts.scatter_s_per_element
        return KernelCost("attention", flops, hbm_bytes, time_s)

    def attention_s(self, batch, query_tokens, context_len, heads, kv_heads, d_head, dtype) -> np.ndarray:
        ctx = np.asarray(context_len)
        return np.array([self.attention(batch, int(c), query_tokens, heads, kv_heads, d_head, dtype).time_s for c in ctx.ravel()]).reshape(ctx.shape)

    def norm(self, tokens, width, dtype, residual=True) -> KernelCost:
        """Residual add + RMSNorm as torch decomposes it (at its measured per-element rate)."""
        if not residual:
            return elementwise(tokens * width, self.hw, dtype, flops_per_element=4, name="final_norm")
        cost = elementwise(tokens * width, self.hw, dtype, reads=2, writes=2, flops_per_element=4, name="norm")
        return replace(cost, time_s=cost.time_s + tokens * width * self.facts.rms_norm_s_per_element)

    def rope(self, tokens, width, dtype) -> KernelCost:
        """RoPE as the executor computes it, a complex product: no faster than its measured rate."""
        cost = elementwise(tokens * width, self.hw, dtype, flops_per_element=3, name="rope")
        return replace(cost, time_s=max(cost.time_s, tokens * width // 2 * self.facts.rope_s_per_element + self.hw.launch_overhead_s))

    def swiglu(self, tokens, width, dtype) -> KernelCost:
        cost = elementwise(tokens * width, self.hw, dtype, reads=2, writes=1, flops_per_element=5, name="swiglu")
        return replace(cost, time_s=cost.time_s + tokens * width * self.facts.silu_s_per_element)

    def embed(self, tokens, d_model, dtype, mask_elements=0) -> KernelCost:
        """The embedding rows copied out, and the executor's additive mask [B, 1, T, context + T]
        built once per pass (0 without a measured rate)."""
        cost = elementwise(tokens * d_model, self.hw, dtype, reads=1, writes=1, flops_per_element=0, name="embed")
        return replace(cost, time_s=cost.time_s + mask_elements * self.facts.mask_s_per_element)

    def all_reduce(self, nbytes, tp) -> KernelCost:
        """Ring all-reduce of `nbytes` over `tp` devices: each sends and receives 2 (tp-1)/tp of the
        buffer (Patarasuk & Yuan 2009) at half the profile's total link bandwidth per direction."""
        if tp == 1:
            return KernelCost("all_reduce", 0.0, 0.0, 0.0, launches=0)
        if self.hw.interconnect_bytes_per_s is None:
            raise UserError(f"{self.hw.name} has no interconnect bandwidth: tensor parallelism needs one")
        per_direction = self.hw.interconnect_bytes_per_s / 2 * self.hw.achievable.bandwidth
        return KernelCost("all_reduce", 0.0, 0.0, 2.0 * (tp - 1) / tp * nbytes / per_direction + self.hw.launch_overhead_s)

    def pass_overhead_s(self, layer_bytes: float, launches: int) -> float:
        """An eager executor pays the fixed overhead for each of the several operators one kernel
        stands for. Calibrated with the executor: each operator costs what it was measured to cost
        in the executor's forward pass, warm, plus the cold penalty in proportion to the share of a
        core's cache (`sram_bytes_per_sm` on a CPU) each layer's weight stream evicts (all of it once
        a layer's weights overflow it)."""
        hw, facts = self.hw, self.facts
        if facts.op_s_hot and facts.op_s_cold:
            evicted = min(1.0, layer_bytes / hw.sram_bytes_per_sm)
            op_s = (facts.op_s_hot + evicted * (facts.op_s_cold - facts.op_s_hot)) * facts.pass_op_scale
            return hw.ops_per_kernel * launches * op_s - launches * hw.launch_overhead_s
        return (hw.ops_per_kernel - 1.0) * launches * hw.launch_overhead_s
