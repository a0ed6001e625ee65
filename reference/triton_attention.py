"""FlashAttention-2 in Triton: forward and backward kernels, the same source for CUDA and the CPU interpreter.

Shapes: q, k, v [B, H, N, d], made contiguous, so row r of head (b, h) starts at ((b H + h) N + r) d.
Grid: one program per (row block, batch x head). A program keeps its Q block (forward, dQ) or its K/V
block (dK/dV) on chip and streams the other operand through in BLOCK_N / BLOCK_M tiles, as in
reference.attention.flash_forward_fa2 / flash_backward_fa2 (Dao 2023, Alg. 1 and 2); the backward is
split into a dK/dV kernel and a dQ kernel so no program needs atomics.

On a machine without CUDA, Triton runs the kernels in its numpy interpreter when TRITON_INTERPRET=1 is set
before triton is first imported: Triton picks interpreter or compiler when a function is decorated, and
its own library functions (tl.zeros, ...) are decorated when triton is imported. The interpreter has no
bfloat16; use fp16 or fp32. Dots use input_precision="ieee" so that fp32 inputs are
not rounded to tf32 on GPUs and the kernel meets the same error bound as the fp32 references.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime import JITFunction

from reference.attention import check_inputs
from simulator.errors import UserError

LOG2_E = tl.constexpr(1.4426950408889634)  # e^x = 2^(x log2 e): the kernels use exp2
LN_2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, LSE, sm_scale, H, N, D,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)  # b * H + h; int64 so head * N * D cannot overflow
    rows = start_m + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    base = head * N * D
    d_ok = cols_d[None, :] < D
    q = tl.load(Q + base + rows[:, None] * D + cols_d[None, :], mask=(rows[:, None] < N) & d_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # [BLOCK_M, d] unnormalised O_i
    qk_scale = sm_scale * LOG2_E
    hi = N
    if CAUSAL:  # K blocks that start at or before the last row of this Q block
        hi = tl.minimum(start_m + BLOCK_M, N)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (keys[:, None] < N) & d_ok
        k = tl.load(K + base + keys[:, None] * D + cols_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, d]
        v = tl.load(V + base + keys[:, None] * D + cols_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # S_ij log2 e, [BLOCK_M, BLOCK_N]
        valid = keys[None, :] < N
        if CAUSAL:
            valid = valid & (keys[None, :] <= rows[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is in the first block and visible to every row
        p = tl.math.exp2(s - m_new[:, None])  # P~_ij
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    acc = acc / l_i[:, None]
    out = base + rows[:, None] * D + cols_d[None, :]
    tl.store(Out + out, acc.to(Out.dtype.element_ty), mask=(rows[:, None] < N) & d_ok)  # O_i = diag(l_i)^-1 O_i
    tl.store(LSE + head * N + rows, (m_i + tl.math.log2(l_i)) * LN_2, mask=rows < N)  # L_i = m_i + log l_i


@triton.jit
def _flash_bwd_delta_kernel(Out, DO, DELTA, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols_d[None, :] < D)
    offsets = head * N * D + rows[:, None] * D + cols_d[None, :]
    o = tl.load(Out + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + head * N + rows, tl.sum(o * do, 1), mask=rows < N)  # D_i = rowsum(dO_i o O_i)


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, N, D,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BLOCK_N
    head = tl.program_id(1).to(tl.int64)
    base = head * N * D
    keys = start_n + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d[None, :] < D
    kv_mask = (keys[:, None] < N) & d_ok
    k = tl.load(K + base + keys[:, None] * D + cols_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, d] on chip
    v = tl.load(V + base + keys[:, None] * D + cols_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2_E
    lo = 0
    if CAUSAL:  # Q blocks whose last row is at or after this block's first key
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q_mask = (rows[:, None] < N) & d_ok
        q = tl.load(Q + base + rows[:, None] * D + cols_d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, d]
        do = tl.load(DO + base + rows[:, None] * D + cols_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + head * N + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + head * N + rows, mask=rows < N, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        valid = (rows[:, None] < N) & (keys[None, :] < N)
        if CAUSAL:
            valid = valid & (keys[None, :] <= rows[:, None])
        p = tl.where(valid, tl.math.exp2(s * qk_scale - lse[:, None] * LOG2_E), 0.0)  # P_ij = exp(S_ij - L_i)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")  # dV_j += P^T dO_i
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # dP_ij = dO_i V_j^T
        ds = p * (dp - delta[:, None])  # dS_ij = P_ij o (dP_ij - D_i)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")  # dK_j += dS^T Q_i
    out = base + keys[:, None] * D + cols_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, sm_scale, N, D,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    base = head * N * D
    rows = start_m + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d[None, :] < D
    q_mask = (rows[:, None] < N) & d_ok
    q = tl.load(Q + base + rows[:, None] * D + cols_d[None, :], mask=q_mask, other=0.0)  # [BLOCK_M, d] on chip
    do = tl.load(DO + base + rows[:, None] * D + cols_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + head * N + rows, mask=rows < N, other=0.0)
    delta = tl.load(DELTA + head * N + rows, mask=rows < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * LOG2_E
    hi = N
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, N)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (keys[:, None] < N) & d_ok
        k = tl.load(K + base + keys[:, None] * D + cols_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + keys[:, None] * D + cols_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        valid = (rows[:, None] < N) & (keys[None, :] < N)
        if CAUSAL:
            valid = valid & (keys[None, :] <= rows[:, None])
        p = tl.where(valid, tl.math.exp2(s * qk_scale - lse[:, None] * LOG2_E), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")  # dQ_i += dS_ij K_j
    tl.store(DQ + base + rows[:, None] * D + cols_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


# True when both these kernels and Triton's library were decorated for the interpreter.
INTERPRETED = not isinstance(_flash_fwd_kernel, JITFunction) and not isinstance(tl.zeros, JITFunction)


def _check_launch(q: torch.Tensor, block_m: int, block_n: int) -> None:
    if not q.is_cuda and not INTERPRETED:
        raise UserError("Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before triton is first imported")
    if q.dtype == torch.bfloat16 and INTERPRETED:
        raise UserError("Triton's interpreter has no bfloat16; use fp16 or fp32 on the CPU")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UserError(f"Triton attention takes fp16, bf16 or fp32, got {q.dtype}")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise UserError(f"{name} must be a power of two of at least 16 (tl.dot), got {block}")


class TritonFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, block_m, block_n):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, h, n, d = q.shape
        block_d = max(16, triton.next_power_of_2(d))
        o = torch.empty_like(q)
        lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(n, block_m), b * h)
        _flash_fwd_kernel[grid](
            q, k, v, o, lse, sm_scale, h, n, d,
            CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.config = (causal, sm_scale, block_m, block_n, block_d)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, sm_scale, block_m, block_n, block_d = ctx.config
        do = do.contiguous()
        b, h, n, d = q.shape
        delta = torch.empty_like(lse)
        _flash_bwd_delta_kernel[(triton.cdiv(n, block_m), b * h)](o, do, delta, n, d, BLOCK_M=block_m, BLOCK_D=block_d)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_bwd_dkdv_kernel[(triton.cdiv(n, block_n), b * h)](
            q, k, v, do, lse, delta, dk, dv, sm_scale, n, d,
            CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        _flash_bwd_dq_kernel[(triton.cdiv(n, block_m), b * h)](
            q, k, v, do, lse, delta, dq, sm_scale, n, d,
            CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """O = softmax(scale Q K^T) V by the Triton kernels, with autograd; BLOCK_M x BLOCK_N tiles."""
    check_inputs(q, k, v, same_length=True)
    _check_launch(q, block_m, block_n)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return TritonFlashAttention.apply(q, k, v, causal, scale, block_m, block_n)


def triton_blocks(br: int, bc: int, d: int) -> tuple[int, int]:
    """Power-of-two Triton tiles no larger than the cost model's Br, Bc: at least 16 (tl.dot's smallest
    operand) and at most 128, or 64 when d > 64 so that Q, K, V tiles of [block, d] fit in shared memory."""
    largest = 128 if d <= 64 else 64

    def fit(block: int) -> int:
        return max(16, min(largest, 1 << (max(block, 1).bit_length() - 1)))

    return fit(br), fit(bc)
