"""Attention cost: standard (materialised S, P) vs FlashAttention, in the notation of Dao et al.

Shapes: batch B, heads H, sequence N (queries and keys), head dimension d, SRAM of M elements.
FlashAttention (Dao et al. 2022, Alg. 1) tiles Q into Tr = ceil(N/Br) row blocks and K, V into
Tc = ceil(N/Bc) column blocks with Bc = ceil(M/4d), Br = min(Bc, d).

HBM bytes are counted exactly from the loop order, per (batch, head):
  FA1 (Alg. 1, K/V outer): K, V read once; for every visited (j, i) block pair Q_i, O_i, l_i, m_i
      are read and O_i, l_i, m_i written; O, l, m are initialised in HBM first.
  FA2 (Q outer): Q_i read once and O_i, L_i (logsumexp) written once; K_j, V_j read for every
      visited (i, j) pair.
  Causal: a block pair is visited unless every key in K_j lies after every query in Q_i.
Q, K, V, O are `dtype`; the softmax statistics l, m, L are fp32 (4 bytes).
FLOPs follow flash-attention's benchmark convention: forward 4 B H N^2 d, halved when causal.

Backward (recomputation, no stored P; K/V outer in both orders, dQ accumulated in an fp32 buffer
that is zeroed first and cast to `dtype` last):
  FA2 (Dao 2023, Alg. 2): D = rowsum(dO o O) first (read O, dO; write D); per visited pair read
      Q_i, dO_i, L_i, D_i and read/write dQ_i; K_j, V_j read and dK_j, dV_j written once.
  FA1 (Dao et al. 2022, Alg. 4): as FA2 but D_i is formed on chip, so per visited pair O_i, l_i, m_i
      are read instead of L_i, D_i, and there is no D pass.
Split-KV decode (Flash-Decoding): n_q query rows against n_kv cached keys; the K/V blocks are dealt
  out to splits, each split reads Q and its K/V rows once and writes an fp32 partial O_s and
  logsumexp LSE_s; a second kernel reads every partial and writes O. One split writes O directly.

Time of a fused kernel (`fused_kernel_s`): its programs (one per query block forward, per key block
backward, per split in decode) dealt to the S SMs. A program multiplies whole [Br, Bc] tiles (a
partial or causal-diagonal tile costs a whole one) at one SM's share of the achievable tensor-core
peak, then spends SM cycles on the softmax work the tensor cores do not do (`ProgramCosts`) and, in
FA1, on summing its warps' split-K partials; it has a fixed time besides. The busiest SM runs
ceil(P / S) programs (`busiest_sm_s`); the kernel is no faster than its compulsory bytes at HBM speed
or its re-reads at L2 speed. The backward's D = rowsum(dO o O) and dQ cast are kernels of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from simulator.errors import UserError
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.roofline import KernelCost, elementwise, roofline_time_s

STAT_BYTES = 4  # fp32 softmax statistics (l, m, L)
SPLIT_K_WARPS = 4  # warps FA1 splits each K/V block across (Dao 2023, Sec. 3.3)
SECTOR_BYTES = 32  # the unit L2 and DRAM move data in (CUDA C++ Best Practices Guide, coalesced access)
SMEM_BYTES_PER_CLOCK = 128  # one SM's shared memory: 32 banks x 4 bytes per clock (CUDA C++ Programming Guide)


@dataclass(frozen=True)
class Tiles:
    """FlashAttention block sizes for one head dimension and SRAM size (elements)."""

    br: int  # query rows per block
    bc: int  # key/value rows per block
    bc_paper: int  # ceil(M / 4d) before the working set was made to fit
    sram_elements: int  # M

    def working_set_elements(self, d: int) -> int:
        """SRAM held while one block pair is processed: K_j, V_j [Bc, d]; Q_i, O_i [Br, d];
        S_ij / P_ij [Br, Bc] (P overwrites S); l_i, m_i [Br]."""
        return 2 * self.bc * d + 2 * self.br * d + self.br * self.bc + 2 * self.br


@lru_cache(maxsize=4096)
def flash_tiles(d: int, sram_elements: int) -> Tiles:
    """Block sizes of Alg. 1: Bc = ceil(M/4d), Br = min(Bc, d).

    The paper's ceil can overshoot M and its count leaves out the S tile, so starting from the
    paper's Bc we shrink Bc until the whole working set of one block pair fits in M elements.
    """
    if d < 1 or sram_elements < 1:
        raise UserError(f"head dimension ({d}) and SRAM size ({sram_elements} elements) must be positive")
    bc_paper = math.ceil(sram_elements / (4 * d))
    bc = bc_paper
    while bc >= 1:
        tiles = Tiles(min(bc, d), bc, bc_paper, sram_elements)
        if tiles.working_set_elements(d) <= sram_elements:
            return tiles
        bc -= 1
    raise UserError(f"SRAM of {sram_elements} elements cannot hold one FlashAttention block at head dimension {d}")


def tiles_for(hw: HardwareProfile, d: int, dtype: str = "fp16") -> Tiles:
    """Tiles sized from the shared memory of one SM, counted in elements of `dtype`."""
    return flash_tiles(d, hw.sram_bytes_per_sm // DTYPE_BYTES[dtype])


def _paper_blocks(hw: HardwareProfile, d: int, dtype: str) -> tuple[int, int]:
    """(Br, Bc) of Alg. 1 for this SRAM: what a kernel runs with when no released blocks are given."""
    tiles = tiles_for(hw, d, dtype)
    return tiles.br, tiles.bc


def _blocks(n: int, size: int) -> np.ndarray:
    """Start index of each block of `size` rows over n rows."""
    return np.arange(0, n, size, dtype=np.int64)


def flash_hbm_bytes(n: int, d: int, br: int, bc: int, causal: bool, dtype: str = "fp16", order: str = "fa2") -> dict:
    """Exact HBM bytes {'read', 'written'} of one (batch, head) of the FlashAttention forward."""
    e = DTYPE_BYTES[dtype]
    q_starts, k_starts = _blocks(n, br), _blocks(n, bc)
    q_last = np.minimum(q_starts + br, n) - 1  # last query row of each Q block
    if order == "fa2":
        if causal:  # K/V rows visited by Q block i: every K block that starts at or before its last row
            kv_rows = np.minimum((q_last // bc + 1) * bc, n)
        else:
            kv_rows = np.full(len(q_starts), n)
        read = e * n * d + e * 2 * d * int(kv_rows.sum())
        written = e * n * d + STAT_BYTES * n
    elif order == "fa1":
        if causal:  # Q rows visited by K block j: every Q block whose last row is at or after its first key
            q_rows = n - (k_starts // br) * br
        else:
            q_rows = np.full(len(k_starts), n)
        visited_q_rows = int(q_rows.sum())
        read = e * 2 * n * d + visited_q_rows * (e * 2 * d + STAT_BYTES * 2)  # K, V; then Q_i, O_i, l_i, m_i
        written = (e * n * d + STAT_BYTES * 2 * n) + visited_q_rows * (e * d + STAT_BYTES * 2)  # init; O_i, l_i, m_i
    else:
        raise UserError(f"unknown FlashAttention loop order {order!r}; known: fa1, fa2")
    return {"read": int(read), "written": int(written)}


def standard_hbm_bytes(n: int, d: int, dtype: str = "fp16") -> dict:
    """Standard attention (FA paper Alg. 0), one (batch, head): S = QK^T written, read for softmax,
    P written, read with V for O. Causal masking is applied inside the softmax pass on the full S."""
    e = DTYPE_BYTES[dtype]
    read = e * (2 * n * d + n * n + n * n + n * d)  # Q, K; S; P, V
    written = e * (n * n + n * n + n * d)  # S; P; O
    return {"read": read, "written": written}


def _visited_q_rows(n: int, br: int, bc: int, causal: bool) -> int:
    """Q rows visited, summed over K blocks (K/V outer): every Q block whose last row is at or
    after the K block's first key when causal, all n rows otherwise."""
    k_starts = _blocks(n, bc)
    q_rows = n - (k_starts // br) * br if causal else np.full(len(k_starts), n)
    return int(q_rows.sum())


def flash_backward_hbm_bytes(
    n: int, d: int, br: int, bc: int, causal: bool, dtype: str = "fp16", order: str = "fa2"
) -> dict:
    """Exact HBM bytes {'read', 'written'} of one (batch, head) of the FlashAttention backward."""
    e = DTYPE_BYTES[dtype]
    rows = _visited_q_rows(n, br, bc, causal)
    dq_acc = STAT_BYTES * d  # one fp32 row of the dQ accumulator
    if order == "fa2":
        pre_read, pre_written = e * 2 * n * d, STAT_BYTES * n  # D = rowsum(dO o O)
        per_row_read = e * 2 * d + dq_acc + STAT_BYTES * 2  # Q_i, dO_i; dQ_i; L_i, D_i
    elif order == "fa1":
        pre_read, pre_written = 0, 0
        per_row_read = e * 3 * d + dq_acc + STAT_BYTES * 2  # Q_i, O_i, dO_i; dQ_i; l_i, m_i
    else:
        raise UserError(f"unknown FlashAttention loop order {order!r}; known: fa1, fa2")
    read = pre_read + e * 2 * n * d + rows * per_row_read + dq_acc * n  # ...; K, V; pairs; dQ cast
    written = pre_written + dq_acc * n + rows * dq_acc + e * 2 * n * d + e * n * d  # zero dQ; pairs; dK, dV; dQ
    return {"read": int(read), "written": int(written)}


def split_kv(n_kv: int, bc: int, num_splits: int) -> tuple[int, int]:
    """(splits used, keys per split): ceil(n_kv/Bc) K/V blocks dealt out in runs of
    ceil(blocks/num_splits), so no split is empty and every split but the last holds whole blocks."""
    if n_kv < 1 or bc < 1 or num_splits < 1:
        raise UserError(f"KV length ({n_kv}), block size ({bc}) and splits ({num_splits}) must be positive")
    blocks = math.ceil(n_kv / bc)
    keys_per_split = math.ceil(blocks / num_splits) * bc
    return math.ceil(n_kv / keys_per_split), keys_per_split


def flash_decoding_hbm_bytes(n_q: int, n_kv: int, d: int, bc: int, num_splits: int, dtype: str = "fp16") -> dict:
    """Exact HBM bytes {'read', 'written'} of one (batch, head) of split-KV decode attention."""
    e = DTYPE_BYTES[dtype]
    s, _ = split_kv(n_kv, bc, num_splits)
    read = s * e * n_q * d + e * 2 * n_kv * d  # Q once per split; K, V once
    if s == 1:
        return {"read": int(read), "written": int(e * n_q * d)}
    partial = STAT_BYTES * s * n_q * (d + 1)  # fp32 O_s [n_q, d] and LSE_s [n_q] per split
    return {"read": int(read + partial), "written": int(partial + e * n_q * d)}


def attention_flops(b: int, h: int, n: int, d: int, causal: bool) -> float:
    """Forward FLOPs, benchmark convention: 4 B H N^2 d (QK^T and PV), halved when causal."""
    flops = 4.0 * b * h * n * n * d
    return flops / 2 if causal else flops


# --- fused kernels: programs over the SMs ---------------------------------------------------


@dataclass(frozen=True)
class ProgramCosts:
    """What a program (thread block) of a fused attention kernel spends besides its matmuls and loads.

    - `program_s`: fixed seconds of one program. It waits a memory round trip for Q_i and its first
      K/V tile before its first matmul, and its SM a block launch before that: several hundred
      cycles each at 1.41 GHz, about a microsecond in all, set by latency rather than by the clock.
      (Fitted with the rest to the calibration part of the published A100 rows, `simulator.published`,
      it comes out at 0.86 us.)
    - `score_cycles_fwd`, `score_cycles_bwd`: SM cycles per score element of the softmax work the
      tensor cores do not do. The forward takes one exp2 per score and converts P to `dtype` for
      PV (two per conversion instruction, packed); the backward recomputes P by exp2 and converts
      P and dS = P o (dP - D) for its three matmuls. On compute capability 8.0 the exp2 and the
      conversions each run at 16 results per clock per SM (CUDA C++ Programming Guide, throughput
      of native arithmetic instructions), so 1.5 / 16 and 2 / 16 cycles; the max, the sums and the
      scaling run beside them on the FP32 pipes, four times faster. FlashAttention-2's warps do
      this work in turn with their matmuls, not beside them: the FlashAttention-3 paper (Shah et
      al. 2024, Sec. 3.1) overlaps the two on Hopper because FA2 does not."""

    program_s: float = 1e-6
    score_cycles_fwd: float = 1.5 / 16
    score_cycles_bwd: float = 2 / 16


DEFAULT_COSTS = ProgramCosts()


@dataclass(frozen=True)
class Grid:
    """The programs of one fused kernel: one entry per program of one (batch, head), and `copies`
    such lists in the launch (B H, or B h_kv)."""

    copies: int
    flops: np.ndarray  # tensor-core FLOPs of each program, over whole [Br, Bc] tiles (padding, causal diagonal)
    cycles: np.ndarray  # SM cycles of each program outside the tensor cores and its loads (softmax, split-K sums)
    hbm_bytes: np.ndarray  # bytes each program loads and stores

    @property
    def programs(self) -> int:
        return self.copies * len(self.flops)


def programs_per_sm(programs: int, sm_count: int) -> int:
    """Rounds of equal programs on `sm_count` SMs: the busiest SM runs ceil(programs / SMs) of
    them, however many it holds at once (they share its tensor cores and its memory port)."""
    if programs < 1 or sm_count < 1:
        raise UserError(f"programs ({programs}) and SMs ({sm_count}) must be positive")
    return -(-programs // sm_count)


def busiest_sm_s(grid: Grid, hw: HardwareProfile, dtype: str, compute_fraction: float, costs: ProgramCosts = DEFAULT_COSTS) -> float:
    """Seconds the busiest of S SMs works on the grid's P programs. Program i takes

        t_i = max(F_i / (P_peak f / S) + c_i / f_clock,  Q_i / (BW_L2 f_bw / S)) + t_prog

    (its matmuls at one SM's share of the achievable peak, then its other work in cycles; or its
    loads at one SM's share of the L2 bandwidth, which every load passes through; plus its fixed
    time), and the busiest SM runs ceil(P / S) programs of the mean time, never less than the
    longest one: with P <= S the longest program is the kernel (a causal kernel's last query
    block sees every key, so it takes as long as a non-causal one). What the SMs load together
    from HBM is bounded in `fused_kernel_s`."""
    sms = hw.sm_count
    rate = hw.peak_flops(dtype) * compute_fraction / sms
    bandwidth = (hw.l2_bytes_per_s or hw.hbm_bytes_per_s) * hw.achievable.bandwidth / sms
    t = np.maximum(grid.flops / rate + grid.cycles / hw.clock_hz, grid.hbm_bytes / bandwidth) + costs.program_s
    return float(max(programs_per_sm(grid.programs, sms) * t.mean(), t.max()))


def fused_kernel_s(
    grid: Grid,
    compulsory_bytes: float,
    program_bytes: float,
    hw: HardwareProfile,
    dtype: str,
    compute_fraction: float,
    costs: ProgramCosts = DEFAULT_COSTS,
) -> float:
    """One fused kernel: its busiest SM (`busiest_sm_s`), no faster than its compulsory bytes (each
    tensor once) at HBM speed and all the bytes its programs load and store (re-reads included,
    as the tiled algorithm counts them) at L2 speed, since re-read tiles are L2 hits; plus its
    launch. With a profile without `l2_bytes_per_s`, re-reads are priced at HBM speed."""
    hbm = hw.hbm_bytes_per_s * hw.achievable.bandwidth
    l2 = (hw.l2_bytes_per_s or hw.hbm_bytes_per_s) * hw.achievable.bandwidth
    busiest = busiest_sm_s(grid, hw, dtype, compute_fraction, costs)
    return max(busiest, compulsory_bytes / hbm, program_bytes / l2) + hw.launch_overhead_s


def memory_pass_s(n_bytes: float, hw: HardwareProfile) -> float:
    """A memory-bound kernel of its own (a reduction, a fill, a cast): its bytes at HBM speed and its launch."""
    return n_bytes / (hw.hbm_bytes_per_s * hw.achievable.bandwidth) + hw.launch_overhead_s


def split_k_cycles(d: int, bc: int, order: str) -> float:
    """SM cycles per score element that FA1's split of each K/V block across its warps costs. The
    FA2 paper (Dao 2023, Sec. 3.3, Fig. 3) describes FA1 splitting K_j, V_j across 4 warps (its
    kernels' second GEMM, PV, is split 4 ways along the keys); each warp then holds a partial
    [Br, d] of O_i (of dQ_i in the backward), and the warps sum them through shared memory in
    fp32, written and read: 8 w Br d bytes per [Br, Bc] tile, d / (4 Bc) cycles per score at the
    128 bytes per clock of one SM's shared memory. FA2 splits Q across its warps instead: none."""
    if order not in ("fa1", "fa2"):
        raise UserError(f"unknown FlashAttention loop order {order!r}; known: fa1, fa2")
    return SPLIT_K_WARPS * 8 * d / bc / SMEM_BYTES_PER_CLOCK if order == "fa1" else 0.0


def forward_grid(
    copies: int, n_q: int, n_kv: int, d: int, br: int, bc: int, causal: bool, dtype: str = "fp16",
    order: str = "fa2", costs: ProgramCosts = DEFAULT_COSTS,
) -> Grid:  # fmt: skip
    """The forward's programs, one per block of Br query rows (Dao 2023, Sec. 3.2; FA1 is priced
    the same way, see `flash_attention`). Block i multiplies whole [Br, Bc] tiles against the K/V
    blocks it visits (all; when causal, with n_q = n_kv, those starting at or before its last
    row, the diagonal one whole), loads Q_i and the K, V rows it visits, and stores O_i and L_i."""
    e = DTYPE_BYTES[dtype]
    q_starts = _blocks(n_q, br)
    rows = np.minimum(q_starts + br, n_q) - q_starts
    keys = np.minimum(((q_starts + rows - 1) // bc + 1) * bc, n_kv) if causal else np.full(len(q_starts), n_kv)
    scores = (br * -(-keys // bc) * bc).astype(float)  # [Br, Bc] tiles, the last one padded
    cycles = scores * (costs.score_cycles_fwd + split_k_cycles(d, bc, order))
    hbm_bytes = (e * (2 * rows * d + 2 * keys * d) + STAT_BYTES * rows).astype(float)
    return Grid(copies, 4.0 * d * scores, cycles, hbm_bytes)


def backward_grid(
    copies: int, n: int, d: int, br: int, bc: int, causal: bool, dtype: str = "fp16",
    order: str = "fa2", costs: ProgramCosts = DEFAULT_COSTS,
) -> Grid:  # fmt: skip
    """The backward's programs, one per block of Bc keys (K/V outer, Dao 2023 Alg. 2). Block j
    multiplies five [Br, Bc] tiles (S, dP, dV, dK, dQ) per query block it visits (all; when causal,
    those whose last row is at or after its first key), loads K_j, V_j and per visited query row
    Q_i, dO_i, L_i, D_i and the fp32 dQ_i it reads and writes back, and stores dK_j, dV_j."""
    e = DTYPE_BYTES[dtype]
    k_starts = _blocks(n, bc)
    cols = np.minimum(k_starts + bc, n) - k_starts
    rows = n - (k_starts // br) * br if causal else np.full(len(k_starts), n)
    scores = (bc * -(-rows // br) * br).astype(float)
    cycles = scores * (costs.score_cycles_bwd + split_k_cycles(d, bc, order))
    hbm_bytes = (e * 4 * cols * d + rows * (e * 2 * d + STAT_BYTES * (2 + 2 * d))).astype(float)
    return Grid(copies, 10.0 * d * scores, cycles, hbm_bytes)


def flash_attention(
    b: int, h: int, n: int, d: int, hw: HardwareProfile, causal: bool = False, dtype: str = "fp16", order: str = "fa2",
    blocks: tuple[int, int] | None = None, costs: ProgramCosts = DEFAULT_COSTS,
) -> KernelCost:  # fmt: skip
    """One fused FlashAttention forward kernel: exact HBM bytes of the loop order; time from
    `fused_kernel_s` over `forward_grid` (FLOPs at the attention fraction; compulsory bytes Q, K,
    V, O once; re-reads from L2). `blocks`: the (Br, Bc) a released kernel is launched with; None:
    the paper's, sized from the SRAM (`tiles_for`). Both loop orders are priced with one program
    per query block: FA1's released kernels also split work below (batch, head) -- the FA2
    paper's Fig. 4 has FA1 at 110 TFLOP/s on an A100 with B x H = 32 heads, more than 32
    programs on 108 SMs could reach."""
    br, bc = blocks or _paper_blocks(hw, d, dtype)
    per_head = flash_hbm_bytes(n, d, br, bc, causal, dtype, order)
    hbm_bytes = float(b * h * (per_head["read"] + per_head["written"]))
    flops = attention_flops(b, h, n, d, causal)
    compulsory = float(b * h * (4 * n * d * DTYPE_BYTES[dtype] + STAT_BYTES * n))
    grid = forward_grid(b * h, n, n, d, br, bc, causal, dtype, order, costs)
    time_s = fused_kernel_s(grid, compulsory, hbm_bytes, hw, dtype, hw.achievable.attention, costs)
    return KernelCost(f"flash-{order}", flops, hbm_bytes, time_s)


def flash_attention_backward(
    b: int, h: int, n: int, d: int, hw: HardwareProfile, causal: bool = False, dtype: str = "fp16", order: str = "fa2",
    blocks: tuple[int, int] | None = None, costs: ProgramCosts = DEFAULT_COSTS,
) -> KernelCost:  # fmt: skip
    """FlashAttention backward with recomputation: FLOPs 2.5x the forward (five N^2 d matmuls
    against two), exact HBM bytes of the loop order. Three kernels in turn: first FA2's
    D = rowsum(dO o O), which also zeroes the fp32 dQ accumulator (FA1: the zeroing alone); then
    the main kernel over `backward_grid`; last dQ cast to `dtype`. The first and last are
    memory-bound passes over the B H N rows that no matmul hides: at fixed B N they cost the same
    at every N while the main kernel grows with N."""
    br, bc = blocks or _paper_blocks(hw, d, dtype)
    per_head = flash_backward_hbm_bytes(n, d, br, bc, causal, dtype, order)
    hbm_bytes = float(b * h * (per_head["read"] + per_head["written"]))
    flops = 2.5 * attention_flops(b, h, n, d, causal)
    e, rows = DTYPE_BYTES[dtype], b * h * n
    first = rows * (STAT_BYTES * d + (e * 2 * d + STAT_BYTES if order == "fa2" else 0))  # zero dQ; FA2: O, dO in, D out
    last = rows * (STAT_BYTES * d + e * d)  # dQ: fp32 in, `dtype` out
    # Q, K, V, dO (and O for FA1) in, dK, dV out, the fp32 dQ read and written, L and D
    compulsory = float(rows * (e * (6 + (order == "fa1")) * d + 2 * STAT_BYTES * d + 2 * STAT_BYTES))
    grid = backward_grid(b * h, n, d, br, bc, causal, dtype, order, costs)
    main = fused_kernel_s(grid, compulsory, hbm_bytes - first - last, hw, dtype, hw.achievable.attention, costs)
    time_s = memory_pass_s(first, hw) + main + memory_pass_s(last, hw)
    return KernelCost(f"flash-{order}-bwd", flops, hbm_bytes, time_s, 3)


@dataclass(frozen=True)
class UnfusedPasses:
    """What an eager (unfused) attention does to the N x N score matrix besides the two GEMMs.

    Every pass below is one kernel that reads and/or writes the whole [B, H, N, N] matrix in HBM
    (elements of `dtype`, e bytes; a dropout keep-mask is one byte per element). The default is
    FlashAttention paper Alg. 0: S = QK^T written, softmax reads S and writes P, PV reads P, with
    scaling folded into the GEMM and any causal mask applied inside the softmax pass.

    - `scale`: S * softmax_scale as its own pass (r e, w e); backward the same.
    - `mask`: "fill" -- S.masked_fill_(mask, -inf) (r e, w e), backward grad.masked_fill (r e, w e);
      "add" -- S + M with an additive [N, N] mask built every call in fp32 (torch.full, torch.triu,
      .to(dtype): 4 + 4 + 4 + 4 + e bytes per mask element, once, not per head) then added
      (r e, w e; the broadcast mask is re-read from L2), backward the identity (no kernel).
    - `dropout`: native dropout (r e; w e and a 1-byte keep-mask); backward r e + 1, w e.
    Backward always has dP = dO V^T (w e), dV = P^T dO (r e), the softmax backward
    dS = P o (dP - rowsum(dP o P)) (r 2e, w e), dQ = dS K and dK = dS^T Q (r e each).
    """

    scale: bool = False
    mask: str = "none"  # "none" | "fill" | "add"
    dropout: bool = False

    def __post_init__(self):
        if self.mask not in ("none", "fill", "add"):
            raise UserError(f"unknown mask pass {self.mask!r}; known: none, fill, add")

    def elementwise_passes(self, e: int, backward: bool = False) -> list[tuple[str, float, float]]:
        """(name, bytes read, bytes written) per element of one [N, N] matrix, GEMMs excluded."""
        mask_pass = {"none": [], "fill": [("mask", e, e)], "add": [] if backward else [("mask", e, e)]}[self.mask]
        scale_pass = [("scale", e, e)] if self.scale else []
        if not backward:
            dropout = [("dropout", e, e + 1)] if self.dropout else []
            return [*scale_pass, *mask_pass, ("softmax", e, e), *dropout]
        dropout = [("dropout", e + 1, e)] if self.dropout else []
        return [*dropout, ("softmax", 2 * e, e), *mask_pass, *scale_pass]

    def gemm_nn_bytes(self, e: int, backward: bool = False) -> list[tuple[float, float]]:
        """(read, written) bytes per [N, N] element of each GEMM: S = QK^T, O = PV; backward
        dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q."""
        return [(0, e), (e, 0), (e, 0), (e, 0)] if backward else [(0, e), (e, 0)]

    def mask_build_bytes_per_element(self, e: int, backward: bool = False) -> tuple[float, float]:
        """(read, written) HBM bytes per element of the one [N, N] additive mask built per forward
        call: torch.full (w 4), torch.triu (r 4, w 4), .to(dtype) (r 4, w e)."""
        return (0.0, 0.0) if backward or self.mask != "add" else (4 + 4, 4 + 4 + e)

    def launches(self, backward: bool = False) -> int:
        build = 3 if self.mask == "add" and not backward else 0
        return len(self.gemm_nn_bytes(2, backward)) + len(self.elementwise_passes(2, backward)) + build


DEFAULT_PASSES = UnfusedPasses()


def unfused_forward_peak_bytes(b: int, h: int, n: int, dtype: str = "fp16", passes: UnfusedPasses = DEFAULT_PASSES) -> float:
    """Device memory the [B, H, N, N] tensors of one eager forward hold at once (bytes), as a Python
    function written S = ...; P = softmax(S); P_drop = dropout(P); O = P_drop V keeps them: S stays
    referenced until the call returns, P is made while S lives, and dropout adds P_drop and its
    1-byte keep-mask while S and P live. A masked_fill_ or scale in place adds nothing."""
    e = DTYPE_BYTES[dtype]
    square = b * h * n * n  # elements of one [B, H, N, N] matrix
    return float(square * (2 * e + (e + 1 if passes.dropout else 0)))


def _unfused_cost(
    b: int, h: int, n: int, d: int, hw: HardwareProfile, dtype: str, passes: UnfusedPasses, backward: bool
) -> tuple[float, float]:
    """(seconds, HBM bytes) of the unfused passes: GEMMs at the matmul fraction over the [N, N]
    matrix plus their thin operands, each elementwise pass a memory-bound kernel."""
    e = DTYPE_BYTES[dtype]
    square = b * h * n * n  # elements of one [B, H, N, N] matrix
    thin = e * b * h * n * d  # bytes of one [B, H, N, d] tensor
    gemm_flops = 2.0 * b * h * n * n * d
    time_s, hbm_bytes = 0.0, 0.0
    for read, written in passes.gemm_nn_bytes(e, backward):
        gemm_bytes = (read + written) * square + 2 * thin  # the N x N operand or result; two thin tensors
        time_s += roofline_time_s(gemm_flops, gemm_bytes, hw, dtype, hw.achievable.matmul)
        hbm_bytes += gemm_bytes
    for _, read, written in passes.elementwise_passes(e, backward):
        time_s += elementwise(square, hw, dtype, reads=read / e, writes=written / e, flops_per_element=5.0).time_s
        hbm_bytes += (read + written) * square
    build_read, build_written = passes.mask_build_bytes_per_element(e, backward)
    if build_read or build_written:  # three kernels over one [N, N] mask, priced as one pass plus two launches
        time_s += elementwise(n * n, hw, dtype, reads=build_read / e, writes=build_written / e, flops_per_element=0).time_s
        time_s += 2 * hw.launch_overhead_s
        hbm_bytes += (build_read + build_written) * n * n
    return time_s, hbm_bytes


def standard_attention(
    b: int,
    h: int,
    n: int,
    d: int,
    hw: HardwareProfile,
    causal: bool = False,
    dtype: str = "fp16",
    passes: UnfusedPasses = DEFAULT_PASSES,
) -> KernelCost:
    """Unfused forward: S = QK^T (batched GEMM), the elementwise passes of `passes` over [N, N]
    (by default only P = softmax(S)), O = PV (batched GEMM). The full N x N product is computed
    even when causal; the FLOPs reported follow the convention."""
    time_s, hbm_bytes = _unfused_cost(b, h, n, d, hw, dtype, passes, backward=False)
    return KernelCost("standard", attention_flops(b, h, n, d, causal), hbm_bytes, time_s, passes.launches())


def standard_attention_backward(
    b: int,
    h: int,
    n: int,
    d: int,
    hw: HardwareProfile,
    causal: bool = False,
    dtype: str = "fp16",
    passes: UnfusedPasses = DEFAULT_PASSES,
) -> KernelCost:
    """Unfused backward from the stored P: dV = P^T dO, dP = dO V^T, the backward of each
    elementwise pass of `passes` in reverse order (the softmax backward
    dS = P o (dP - rowsum(dP o P)) reads P and dP and writes dS), dQ = dS K, dK = dS^T Q."""
    time_s, hbm_bytes = _unfused_cost(b, h, n, d, hw, dtype, passes, backward=True)
    flops = 2.5 * attention_flops(b, h, n, d, causal)
    return KernelCost("standard-bwd", flops, hbm_bytes, time_s, passes.launches(backward=True))


def decode_splits(b: int, h_kv: int, n_kv: int, bc: int, sm_count: int, max_splits: int = 128) -> int:
    """Splits of the KV sequence so that about two programs run per SM, no more than there are K/V
    blocks and no more than `max_splits` (Flash-Decoding's aim: fill the GPU at small batch)."""
    wanted = -(-2 * sm_count // (b * h_kv))
    return max(1, min(wanted, -(-n_kv // bc), max_splits))


def flash_decoding(
    b: int,
    h: int,
    n_q: int,
    n_kv: int,
    d: int,
    hw: HardwareProfile,
    num_splits: int | None,
    dtype: str = "fp16",
    h_kv: int | None = None,
    blocks: tuple[int, int] | None = None,
    costs: ProgramCosts = DEFAULT_COSTS,
) -> KernelCost:
    """Split-KV decode: a split kernel and, with more than one split, a merge kernel.
    FLOPs 4 B H n_q n_kv d (QK^T and PV over every cached key).

    With grouped-query attention (`h_kv` < `h`) the H / h_kv query heads that share a KV head are
    processed as the rows of one program, so K and V are read once per KV head. `num_splits=None`
    chooses the splits with `decode_splits`. One program per (batch, KV head, split): its rows
    padded to a Br-row tile, its keys to whole Bc tiles; the merge kernel reads every partial
    O_s, LSE_s and writes O. `blocks`: the (Br, Bc) a released split kernel is launched with;
    None: the paper's, sized from the SRAM."""
    h_kv = h if h_kv is None else h_kv
    if h % h_kv:
        raise UserError(f"query heads ({h}) must be a multiple of KV heads ({h_kv})")
    e = DTYPE_BYTES[dtype]
    rows = n_q * (h // h_kv)  # query rows per program
    br, bc = blocks or _paper_blocks(hw, d, dtype)
    splits = decode_splits(b, h_kv, n_kv, bc, hw.sm_count) if num_splits is None else num_splits
    s, per_split_kv = split_kv(n_kv, bc, splits)
    per_head = flash_decoding_hbm_bytes(rows, n_kv, d, bc, splits, dtype)
    hbm_bytes = float(b * h_kv * (per_head["read"] + per_head["written"]))
    flops = 4.0 * b * h * n_q * n_kv * d
    keys = np.minimum(per_split_kv, n_kv - per_split_kv * np.arange(s))  # [s] keys per split; the last holds the rest
    scores = (-(-rows // br) * br * -(-keys // bc) * bc).astype(float)  # rows padded to Br, keys to whole Bc tiles
    out_bytes = STAT_BYTES * rows * (d + 1) if s > 1 else e * rows * d  # fp32 partial O_s, LSE_s; or O itself
    grid = Grid(b * h_kv, 4.0 * d * scores, scores * costs.score_cycles_fwd, e * (2 * keys * d + rows * d) + out_bytes)
    merge = float(b * h_kv * (STAT_BYTES * s * rows * (d + 1) + e * rows * d)) if s > 1 else 0.0  # partials in, O out
    compulsory = float(b * h_kv * 2 * n_kv * d * e + b * h * n_q * d * 2 * e)
    split_s = fused_kernel_s(grid, compulsory, hbm_bytes - merge, hw, dtype, hw.achievable.attention, costs)
    merge_s = memory_pass_s(merge, hw) if s > 1 else 0.0
    return KernelCost("flash-decoding", flops, hbm_bytes, split_s + merge_s, 1 if s == 1 else 2)


def flash_forward_decode(
    b: int, h: int, h_kv: int, n_q: int, n_kv: int, d: int, hw: HardwareProfile, dtype: str = "fp16",
    blocks: tuple[int, int] | None = None, costs: ProgramCosts = DEFAULT_COSTS,
) -> KernelCost:  # fmt: skip
    """FlashAttention-2's forward kernel applied to a decode step (no split of the keys), as the
    Flash-Decoding blog's FA2 baseline runs it (Dao 2023, Sec. 3.2: parallel over batch, heads and
    query blocks only). One program per (batch, query head, block of Br query rows)
    (`forward_grid`): its n_q rows are padded to the Br-row tile the tensor cores multiply, so it
    does 4 Br n_kv d FLOPs, an exp per padded score, and reads its KV head's K, V [n_kv, d] whole;
    query heads that share a KV head read it again (from L2). With B H ceil(n_q/Br) programs on
    the SMs, the busiest SM runs `programs_per_sm` of them. `blocks` as in `flash_attention`."""
    if h % h_kv:
        raise UserError(f"query heads ({h}) must be a multiple of KV heads ({h_kv})")
    e = DTYPE_BYTES[dtype]
    br, bc = blocks or _paper_blocks(hw, d, dtype)
    grid = forward_grid(b * h, n_q, n_kv, d, br, bc, False, dtype, costs=costs)
    compulsory = float(e * (b * h_kv * 2 * n_kv * d + b * h * n_q * d * 2))  # K, V once; Q in, O out
    program_bytes = float(grid.copies * grid.hbm_bytes.sum())
    time_s = fused_kernel_s(grid, compulsory, program_bytes, hw, dtype, hw.achievable.attention, costs)
    flops = 4.0 * b * h * n_q * n_kv * d  # useful FLOPs, as benchmarks count them
    return KernelCost("flash-fa2-decode", flops, program_bytes, time_s)


def standard_decode(
    b: int, h: int, h_kv: int, n_kv: int, d: int, hw: HardwareProfile, dtype: str = "fp16", kv_layout: str = "bhnd"
) -> KernelCost:
    """Unfused decode attention as eager PyTorch runs it, each step a kernel: K and V expanded to
    every query head when h_kv < H (a copy each: read once per KV head, as the broadcast re-reads
    hit in cache, and written once per query head), scores q K^T, softmax, the weighted sum P V.

    `kv_layout`: "bhnd", K and V held [B, H, N, d]; "bnhd", held [B, N, H, d] and permuted to
    [B, H, N, d] as a view (xFormers' decoding benchmark holds them so). torch.matmul folds the
    batch dimensions B and H into the one batch stride of the bmm it calls; in the permuted view
    they do not fold unless B = 1, so it first copies V, and K^T, to [B H, N, d] and [B H, d, N].
    The K^T copy transposes at element granularity: consecutive elements on one side of it lie
    H d elements apart on the other, so each e-byte element costs that side a whole 32-byte
    sector through L2 (`SECTOR_BYTES`)."""
    if kv_layout not in ("bhnd", "bnhd"):
        raise UserError(f"unknown K/V layout {kv_layout!r}; known: bhnd, bnhd")
    e = DTYPE_BYTES[dtype]
    kv = b * h * n_kv * d  # elements of K (or V) at every query head
    hbm = hw.hbm_bytes_per_s * hw.achievable.bandwidth
    l2 = (hw.l2_bytes_per_s or hw.hbm_bytes_per_s) * hw.achievable.bandwidth
    copies = []  # (HBM bytes, L2 sector bytes) of each copy kernel
    if h != h_kv:
        copies += 2 * [(e * (b * h_kv * n_kv * d + kv), 0.0)]
    if kv_layout == "bnhd" and b > 1:
        copies += [(e * 2 * kv, e * kv + SECTOR_BYTES * kv), (e * 2 * kv, 0.0)]  # K^T transposed, V
    copies_s = sum(max(q / hbm, sectors / l2) + hw.launch_overhead_s for q, sectors in copies)
    gemm_bytes = e * (kv + b * h * n_kv)  # K (or V) and the scores
    scores = roofline_time_s(2.0 * b * h * n_kv * d, gemm_bytes, hw, dtype, hw.achievable.matmul)
    softmax = elementwise(b * h * n_kv, hw, dtype, flops_per_element=5.0)
    weighted = roofline_time_s(2.0 * b * h * n_kv * d, gemm_bytes, hw, dtype, hw.achievable.matmul)
    hbm_bytes = float(sum(q for q, _ in copies) + 2 * gemm_bytes + softmax.hbm_bytes)
    time_s = copies_s + scores + softmax.time_s + weighted
    return KernelCost("standard-decode", 4.0 * b * h * n_kv * d, hbm_bytes, time_s, 3 + len(copies))


def attention_summary(b: int, h: int, n: int, d: int, hw: HardwareProfile, causal: bool, dtype: str = "fp16") -> dict:
    """Everything `plan` prints about attention at one shape: tiles, SRAM working set, bytes, time."""
    tiles = tiles_for(hw, d, dtype)
    e = DTYPE_BYTES[dtype]
    std = standard_attention(b, h, n, d, hw, causal, dtype)
    fa1 = flash_attention(b, h, n, d, hw, causal, dtype, "fa1")
    fa2 = flash_attention(b, h, n, d, hw, causal, dtype, "fa2")
    return {
        "shape": {"batch": b, "heads": h, "seqlen": n, "head_dim": d, "causal": causal, "dtype": dtype},
        "sram_bytes": hw.sram_bytes_per_sm,
        "block_rows_br": tiles.br,
        "block_cols_bc": tiles.bc,
        "block_cols_bc_paper": tiles.bc_paper,
        "sram_working_set_bytes": tiles.working_set_elements(d) * e,
        "flops": fa2.flops,
        "standard": {"hbm_bytes": std.hbm_bytes, "time_s": std.time_s},
        "flash_fa1": {"hbm_bytes": fa1.hbm_bytes, "time_s": fa1.time_s},
        "flash_fa2": {"hbm_bytes": fa2.hbm_bytes, "time_s": fa2.time_s},
        "hbm_bytes_ratio_standard_over_fa2": std.hbm_bytes / fa2.hbm_bytes,
    }
