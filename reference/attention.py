"""Attention in plain torch: the naive reference and FlashAttention, tiled the way the cost model counts it.

Shapes: q [B, H, N_q, d], k and v [B, H, N_kv, d]; one (batch, head) is one "program" of a GPU kernel.
The full tensors stand for HBM. A tiled loop loads block tiles from them ("SRAM"), computes on the tiles
in fp32 (fp64 for fp64 inputs) and stores results back; `Traffic` counts every byte loaded and stored
and the largest working set one program holds, so the counts can be checked exactly against
simulator.attention (flash_hbm_bytes, flash_backward_hbm_bytes, flash_decoding_hbm_bytes, Tiles).

- naive_attention: standard attention (Dao et al. 2022, Alg. 0), S and P materialised in the input dtype.
- flash_forward_fa1 / flash_backward_fa1: Dao et al. 2022, Alg. 1 (K/V outer) and Alg. 4.
- flash_forward_fa2 / flash_backward_fa2: Dao 2023 (FlashAttention-2), Alg. 1 (Q outer) and Alg. 2.
- flash_attention: either order as a torch.autograd.Function (backward recomputes P; nothing N x N stored).
- flash_decoding: split-KV decode (Flash-Decoding), partial results merged by logsumexp.
Causal masks are aligned to the bottom right: query t of N_q sees keys 0 .. N_kv - N_q + t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from simulator.attention import flash_tiles, split_kv
from simulator.errors import UserError

ORDERS = ("fa1", "fa2")


@dataclass
class Traffic:
    """Bytes moved between the full tensors ("HBM") and block tiles ("SRAM") by one call, summed over
    all (batch, head) programs, and the largest working set one program holds at once, in elements."""

    hbm_read_bytes: int = 0
    hbm_written_bytes: int = 0
    sram_peak_elements: int = 0

    def load(self, hbm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """HBM -> SRAM: a private copy of the tile, in the on-chip compute dtype."""
        self.hbm_read_bytes += hbm.numel() * hbm.element_size()
        return hbm.to(dtype, copy=True)

    def store(self, hbm: torch.Tensor, value: torch.Tensor) -> None:
        """SRAM -> HBM: write `value` into the HBM view, in the HBM tensor's dtype."""
        self.hbm_written_bytes += hbm.numel() * hbm.element_size()
        hbm.copy_(value)

    def hold(self, *tiles: torch.Tensor) -> None:
        """Record the tiles one program holds together; each tile is [B, H, ...], one program's share is [...]."""
        elements = sum(math.prod(t.shape[2:]) for t in tiles)
        self.sram_peak_elements = max(self.sram_peak_elements, elements)

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_written_bytes


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """On-chip accumulators and softmax statistics: fp32, as on a GPU; fp64 inputs stay fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, same_length: bool) -> None:
    """One-line UserError for shapes the kernels cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise UserError(f"{name} must be [batch, heads, seqlen, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise UserError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise UserError(f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype}")
    if k.shape != v.shape:
        raise UserError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise UserError(f"q and k must agree in batch and heads, got {tuple(q.shape[:2])} and {tuple(k.shape[:2])}")
    if q.shape[-1] != k.shape[-1]:
        raise UserError(f"head dimension d of q ({q.shape[-1]}) does not match k and v ({k.shape[-1]})")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise UserError(f"every dimension must be positive, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if same_length and q.shape[2] != k.shape[2]:
        raise UserError(f"q and k must have the same sequence length N, got {q.shape[2]} and {k.shape[2]}")


def block_sizes(
    d: int, element_bytes: int, sram_bytes: int | None = None, br: int | None = None, bc: int | None = None
) -> tuple[int, int]:
    """(Br, Bc): given explicitly, or chosen from an SRAM size the way the cost model does (flash_tiles)."""
    if br is not None or bc is not None:
        if br is None or bc is None or br < 1 or bc < 1:
            raise UserError(f"explicit block sizes need both Br and Bc positive, got Br={br}, Bc={bc}")
        return br, bc
    if sram_bytes is None:
        raise UserError("give an SRAM size in bytes or both block sizes Br and Bc")
    if sram_bytes < element_bytes:
        raise UserError(f"SRAM of {sram_bytes} bytes holds no element of {element_bytes} bytes")
    tiles = flash_tiles(d, sram_bytes // element_bytes)
    return tiles.br, tiles.bc


def _causal_mask(r0: int, r1: int, c0: int, c1: int, offset: int, device: torch.device) -> torch.Tensor | None:
    """[rows, cols] True where key c lies after query r (c > r + offset); None if the tile has no such pair."""
    if not c1 - 1 > r0 + offset:
        return None
    rows = torch.arange(r0, r1, device=device)[:, None]
    cols = torch.arange(c0, c1, device=device)[None, :]
    return cols > rows + offset


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    sm_scale: float | None = None,
    traffic: Traffic | None = None,
) -> torch.Tensor:
    """Standard attention, every step a pass over HBM in the input dtype (FA paper Alg. 0):
    S = Q K^T written; S read, P = softmax(S) written; P, V read, O = P V written."""
    check_inputs(q, k, v, same_length=False)
    traffic = traffic if traffic is not None else Traffic()
    n_q, n_kv = q.shape[2], k.shape[2]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q * scale, k.transpose(-2, -1))  # [B, H, N_q, N_kv] in HBM
    mask = _causal_mask(0, n_q, 0, n_kv, n_kv - n_q, q.device) if causal else None
    if mask is not None:
        s.masked_fill_(mask, float("-inf"))
    traffic.hbm_read_bytes += (q.numel() + k.numel()) * q.element_size()
    traffic.hbm_written_bytes += s.numel() * s.element_size()
    p = torch.softmax(s, dim=-1)  # [B, H, N_q, N_kv] in HBM
    traffic.hbm_read_bytes += s.numel() * s.element_size()
    traffic.hbm_written_bytes += p.numel() * p.element_size()
    del s
    o = torch.matmul(p, v)
    traffic.hbm_read_bytes += (p.numel() + v.numel()) * p.element_size()
    traffic.hbm_written_bytes += o.numel() * o.element_size()
    return o


def online_softmax(x: torch.Tensor, chunk_sizes: Sequence[int]) -> torch.Tensor:
    """softmax over the last dimension, read in chunks of the given sizes with a running max m and sum l
    (Milakov & Gimelshein 2018): m' = max(m, max x_c); l' = l e^(m - m') + sum e^(x_c - m'); p = e^(x - m) / l."""
    if sum(chunk_sizes) != x.shape[-1] or min(chunk_sizes, default=0) < 1:
        raise UserError(f"chunk sizes {list(chunk_sizes)} do not split a vector of {x.shape[-1]} elements")
    m_run = torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    l_run = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
    start = 0
    for size in chunk_sizes:
        chunk = x[..., start : start + size]
        m_new = torch.maximum(m_run, chunk.amax(dim=-1))
        l_run = l_run * torch.exp(m_run - m_new) + torch.exp(chunk - m_new[..., None]).sum(dim=-1)
        m_run, start = m_new, start + size
    return torch.exp(x - m_run[..., None]) / l_run[..., None]


def flash_forward_fa2(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, br: int, bc: int, traffic: Traffic
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward (Dao 2023, Alg. 1), Q outer: returns O [B, H, N, d] and the logsumexp
    L [B, H, N] (fp32) that the backward needs."""
    n = q.shape[2]
    cdt = _compute_dtype(q.dtype)
    neg_big = torch.finfo(cdt).min  # m never -inf, so e^(m - m') is never e^(-inf + inf)
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=cdt, device=q.device)
    for r0 in range(0, n, br):
        r1 = min(r0 + br, n)
        q_i = traffic.load(q[:, :, r0:r1], cdt)  # [B, H, Br, d]; stays in SRAM for the whole row block
        o_i = torch.zeros_like(q_i)  # unnormalised output accumulator
        l_i = torch.zeros(q_i.shape[:3], dtype=cdt, device=q.device)  # [B, H, Br] running sum
        m_i = torch.full_like(l_i, float("-inf"))  # [B, H, Br] running max
        kv_end = r1 if causal else n  # causal: K blocks starting at or before the last query row
        for c0 in range(0, kv_end, bc):
            c1 = min(c0 + bc, n)
            k_j = traffic.load(k[:, :, c0:c1], cdt)  # [B, H, Bc, d]
            v_j = traffic.load(v[:, :, c0:c1], cdt)
            s_ij = torch.matmul(q_i, k_j.transpose(-2, -1)) * scale  # S_ij = Q_i K_j^T  [B, H, Br, Bc]
            mask = _causal_mask(r0, r1, c0, c1, 0, q.device) if causal else None
            if mask is not None:
                s_ij.masked_fill_(mask, float("-inf"))
            traffic.hold(q_i, o_i, k_j, v_j, s_ij, l_i, m_i)
            m_new = torch.maximum(m_i, s_ij.amax(dim=-1)).clamp_min(neg_big)  # m_i^(j) = max(m_i^(j-1), rowmax S_ij)
            p_ij = torch.exp(s_ij - m_new[..., None])  # P~_ij = exp(S_ij - m_i^(j)); overwrites S_ij
            alpha = torch.exp(m_i - m_new)
            l_i = alpha * l_i + p_ij.sum(dim=-1)  # l_i^(j) = e^(m^(j-1) - m^(j)) l_i^(j-1) + rowsum P~_ij
            o_i = alpha[..., None] * o_i + torch.matmul(p_ij, v_j)  # O_i^(j) = diag(e^(..)) O_i^(j-1) + P~_ij V_j
            m_i = m_new
        traffic.store(o[:, :, r0:r1], o_i / l_i[..., None])  # O_i = diag(l_i)^-1 O_i^(Tc)
        traffic.store(lse[:, :, r0:r1], m_i + torch.log(l_i))  # L_i = m_i + log l_i
    return o, lse


def flash_forward_fa1(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, br: int, bc: int, traffic: Traffic
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention forward (Dao et al. 2022, Alg. 1), K/V outer: O, l, m live in HBM and every
    visited (j, i) block pair reads and rewrites O_i, l_i, m_i. Returns O, l, m (l, m fp32)."""
    n = q.shape[2]
    cdt = _compute_dtype(q.dtype)
    neg_big = torch.finfo(cdt).min  # rows masked out of a whole tile keep finite statistics
    o = torch.empty_like(q)
    l_hbm = torch.empty(q.shape[:3], dtype=cdt, device=q.device)  # l, m of Alg. 1 live in HBM
    m_hbm = torch.empty_like(l_hbm)
    traffic.store(o, torch.zeros_like(o))  # line 2: O = (0), l = (0), m = (-inf) in HBM
    traffic.store(l_hbm, torch.zeros_like(l_hbm))
    traffic.store(m_hbm, torch.full_like(m_hbm, float("-inf")))
    for c0 in range(0, n, bc):
        c1 = min(c0 + bc, n)
        k_j = traffic.load(k[:, :, c0:c1], cdt)  # [B, H, Bc, d]; stays in SRAM for the whole column block
        v_j = traffic.load(v[:, :, c0:c1], cdt)
        first_row = (c0 // br) * br if causal else 0  # causal: Q blocks whose last row is at or after c0
        for r0 in range(first_row, n, br):
            r1 = min(r0 + br, n)
            q_i = traffic.load(q[:, :, r0:r1], cdt)  # [B, H, Br, d]
            o_i = traffic.load(o[:, :, r0:r1], cdt)
            l_i = traffic.load(l_hbm[:, :, r0:r1], cdt)  # [B, H, Br]
            m_i = traffic.load(m_hbm[:, :, r0:r1], cdt)
            s_ij = torch.matmul(q_i, k_j.transpose(-2, -1)) * scale  # S_ij = Q_i K_j^T  [B, H, Br, Bc]
            mask = _causal_mask(r0, r1, c0, c1, 0, q.device) if causal else None
            if mask is not None:
                s_ij.masked_fill_(mask, float("-inf"))
            traffic.hold(k_j, v_j, q_i, o_i, s_ij, l_i, m_i)
            m_ij = s_ij.amax(dim=-1).clamp_min(neg_big)  # m~_ij = rowmax(S_ij)
            p_ij = torch.exp(s_ij - m_ij[..., None])  # P~_ij = exp(S_ij - m~_ij); overwrites S_ij
            l_ij = p_ij.sum(dim=-1)  # l~_ij = rowsum(P~_ij)
            m_new = torch.maximum(m_i, m_ij)  # m_i^new = max(m_i, m~_ij)
            alpha, beta = torch.exp(m_i - m_new), torch.exp(m_ij - m_new)
            l_new = alpha * l_i + beta * l_ij  # l_i^new = e^(m_i - m^new) l_i + e^(m~_ij - m^new) l~_ij
            # O_i = diag(l_i^new)^-1 (diag(l_i) e^(m_i - m_i^new) O_i + e^(m~_ij - m_i^new) P~_ij V_j)
            o_new = ((l_i * alpha)[..., None] * o_i + beta[..., None] * torch.matmul(p_ij, v_j)) / l_new[..., None]
            traffic.store(o[:, :, r0:r1], o_new)
            traffic.store(l_hbm[:, :, r0:r1], l_new)
            traffic.store(m_hbm[:, :, r0:r1], m_new)
    return o, l_hbm, m_hbm


def flash_backward_fa2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
    br: int,
    bc: int,
    traffic: Traffic,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward (Dao 2023, Alg. 2): P recomputed from L, K/V outer; dQ accumulated in
    an fp32 HBM buffer (read and rewritten per visited pair), cast to the input dtype at the end."""
    n = q.shape[2]
    cdt = _compute_dtype(q.dtype)
    delta = torch.empty(q.shape[:3], dtype=cdt, device=q.device)
    for r0 in range(0, n, br):  # preprocessing: D_i = rowsum(dO_i o O_i)
        o_i, do_i = traffic.load(o[:, :, r0 : r0 + br], cdt), traffic.load(do[:, :, r0 : r0 + br], cdt)
        traffic.store(delta[:, :, r0 : r0 + br], (do_i * o_i).sum(dim=-1))
    dq_acc = torch.empty(q.shape, dtype=cdt, device=q.device)
    traffic.store(dq_acc, torch.zeros_like(dq_acc))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for c0 in range(0, n, bc):
        c1 = min(c0 + bc, n)
        k_j, v_j = traffic.load(k[:, :, c0:c1], cdt), traffic.load(v[:, :, c0:c1], cdt)  # [B, H, Bc, d]
        dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)
        first_row = (c0 // br) * br if causal else 0
        for r0 in range(first_row, n, br):
            r1 = min(r0 + br, n)
            q_i, do_i = traffic.load(q[:, :, r0:r1], cdt), traffic.load(do[:, :, r0:r1], cdt)  # [B, H, Br, d]
            lse_i, delta_i = traffic.load(lse[:, :, r0:r1], cdt), traffic.load(delta[:, :, r0:r1], cdt)
            dq_i = traffic.load(dq_acc[:, :, r0:r1], cdt)
            s_ij = torch.matmul(q_i, k_j.transpose(-2, -1)) * scale
            mask = _causal_mask(r0, r1, c0, c1, 0, q.device) if causal else None
            if mask is not None:
                s_ij.masked_fill_(mask, float("-inf"))
            p_ij = torch.exp(s_ij - lse_i[..., None])  # P_ij = exp(S_ij - L_i)
            dv_j += torch.matmul(p_ij.transpose(-2, -1), do_i)  # dV_j += P_ij^T dO_i
            dp_ij = torch.matmul(do_i, v_j.transpose(-2, -1))  # dP_ij = dO_i V_j^T
            ds_ij = p_ij * (dp_ij - delta_i[..., None])  # dS_ij = P_ij o (dP_ij - D_i)
            traffic.store(dq_acc[:, :, r0:r1], dq_i + scale * torch.matmul(ds_ij, k_j))  # dQ_i += dS_ij K_j
            dk_j += scale * torch.matmul(ds_ij.transpose(-2, -1), q_i)  # dK_j += dS_ij^T Q_i
        traffic.store(dk[:, :, c0:c1], dk_j)
        traffic.store(dv[:, :, c0:c1], dv_j)
    dq = torch.empty_like(q)
    traffic.store(dq, traffic.load(dq_acc, cdt))
    return dq, dk, dv


def flash_backward_fa1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    l_hbm: torch.Tensor,
    m_hbm: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
    br: int,
    bc: int,
    traffic: Traffic,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention backward (Dao et al. 2022, Alg. 4): P recomputed from l, m; D_i = rowsum(dO_i o O_i)
    formed on chip per pair. dQ accumulated in fp32 as in flash_backward_fa2."""
    n = q.shape[2]
    cdt = _compute_dtype(q.dtype)
    dq_acc = torch.empty(q.shape, dtype=cdt, device=q.device)
    traffic.store(dq_acc, torch.zeros_like(dq_acc))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for c0 in range(0, n, bc):
        c1 = min(c0 + bc, n)
        k_j, v_j = traffic.load(k[:, :, c0:c1], cdt), traffic.load(v[:, :, c0:c1], cdt)  # [B, H, Bc, d]
        dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)
        first_row = (c0 // br) * br if causal else 0
        for r0 in range(first_row, n, br):
            r1 = min(r0 + br, n)
            q_i, o_i = traffic.load(q[:, :, r0:r1], cdt), traffic.load(o[:, :, r0:r1], cdt)  # [B, H, Br, d]
            do_i, dq_i = traffic.load(do[:, :, r0:r1], cdt), traffic.load(dq_acc[:, :, r0:r1], cdt)
            l_i, m_i = traffic.load(l_hbm[:, :, r0:r1], cdt), traffic.load(m_hbm[:, :, r0:r1], cdt)  # [B, H, Br]
            s_ij = torch.matmul(q_i, k_j.transpose(-2, -1)) * scale
            mask = _causal_mask(r0, r1, c0, c1, 0, q.device) if causal else None
            if mask is not None:
                s_ij.masked_fill_(mask, float("-inf"))
            p_ij = torch.exp(s_ij - m_i[..., None]) / l_i[..., None]  # P_ij = diag(l_i)^-1 exp(S_ij - m_i)
            dv_j += torch.matmul(p_ij.transpose(-2, -1), do_i)  # dV_j += P_ij^T dO_i
            dp_ij = torch.matmul(do_i, v_j.transpose(-2, -1))  # dP_ij = dO_i V_j^T
            d_i = (do_i * o_i).sum(dim=-1)  # D_i = rowsum(dO_i o O_i)
            ds_ij = p_ij * (dp_ij - d_i[..., None])  # dS_ij = P_ij o (dP_ij - D_i)
            traffic.store(dq_acc[:, :, r0:r1], dq_i + scale * torch.matmul(ds_ij, k_j))  # dQ_i += dS_ij K_j
            dk_j += scale * torch.matmul(ds_ij.transpose(-2, -1), q_i)  # dK_j += dS_ij^T Q_i
        traffic.store(dk[:, :, c0:c1], dk_j)
        traffic.store(dv[:, :, c0:c1], dv_j)
    dq = torch.empty_like(q)
    traffic.store(dq, traffic.load(dq_acc, cdt))
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Tiled forward in either loop order; the backward recomputes P from the saved statistics."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, br, bc, order, traffic, backward_traffic):
        if order == "fa2":
            o, *stats = flash_forward_fa2(q, k, v, causal, scale, br, bc, traffic)
        else:
            o, *stats = flash_forward_fa1(q, k, v, causal, scale, br, bc, traffic)
        ctx.save_for_backward(q, k, v, o, *stats)
        ctx.config = (causal, scale, br, bc, order, backward_traffic)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, *stats = ctx.saved_tensors
        causal, scale, br, bc, order, traffic = ctx.config
        traffic = traffic if traffic is not None else Traffic()
        if order == "fa2":
            grads = flash_backward_fa2(q, k, v, o, *stats, do, causal, scale, br, bc, traffic)
        else:
            grads = flash_backward_fa1(q, k, v, o, *stats, do, causal, scale, br, bc, traffic)
        return (*grads, None, None, None, None, None, None, None)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    *,
    sram_bytes: int | None = None,
    br: int | None = None,
    bc: int | None = None,
    order: str = "fa2",
    sm_scale: float | None = None,
    traffic: Traffic | None = None,
    backward_traffic: Traffic | None = None,
) -> torch.Tensor:
    """Tiled FlashAttention O = softmax(scale Q K^T) V with autograd. Blocks come from `sram_bytes`
    (as the cost model picks them) or explicit Br, Bc; `traffic` and `backward_traffic` collect counts."""
    check_inputs(q, k, v, same_length=True)
    if order not in ORDERS:
        raise UserError(f"unknown FlashAttention loop order {order!r}; known: {', '.join(ORDERS)}")
    br, bc = block_sizes(q.shape[-1], q.element_size(), sram_bytes, br, bc)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    traffic = traffic if traffic is not None else Traffic()
    return FlashAttentionFunction.apply(q, k, v, causal, scale, br, bc, order, traffic, backward_traffic)


def flash_decoding(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_splits: int,
    *,
    bc: int | None = None,
    sram_bytes: int | None = None,
    causal: bool = False,
    sm_scale: float | None = None,
    traffic: Traffic | None = None,
) -> torch.Tensor:
    """Split-KV decode attention (Flash-Decoding): the N_kv cached keys are dealt out to splits in whole
    Bc blocks (simulator.attention.split_kv); each split runs the online softmax over its keys and writes
    an fp32 partial O_s and LSE_s; a merge step forms LSE = log sum_s e^(LSE_s) and
    O = sum_s e^(LSE_s - LSE) O_s. With one split O is written directly."""
    check_inputs(q, k, v, same_length=False)
    n_q, n_kv, d = q.shape[2], k.shape[2], q.shape[3]
    if causal and n_q > n_kv:
        raise UserError(f"causal decode needs no more queries ({n_q}) than cached keys ({n_kv})")
    if bc is None:
        _, bc = block_sizes(d, q.element_size(), sram_bytes)
    splits, keys_per_split = split_kv(n_kv, bc, num_splits)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    traffic = traffic if traffic is not None else Traffic()
    cdt = _compute_dtype(q.dtype)
    neg_big = torch.finfo(cdt).min
    o = torch.empty_like(q)
    o_parts = torch.empty((splits, *q.shape), dtype=cdt, device=q.device)  # [S, B, H, N_q, d] fp32
    lse_parts = torch.empty((splits, *q.shape[:3]), dtype=cdt, device=q.device)  # [S, B, H, N_q]
    for split in range(splits):  # one program per (split, batch, head); on a GPU they run concurrently
        k0, k1 = split * keys_per_split, min((split + 1) * keys_per_split, n_kv)
        q_t = traffic.load(q, cdt)  # [B, H, N_q, d]: every split reads Q
        acc = torch.zeros_like(q_t)
        l_t = torch.zeros(q_t.shape[:3], dtype=cdt, device=q.device)
        m_t = torch.full_like(l_t, float("-inf"))
        for c0 in range(k0, k1, bc):
            c1 = min(c0 + bc, k1)
            k_j, v_j = traffic.load(k[:, :, c0:c1], cdt), traffic.load(v[:, :, c0:c1], cdt)  # [B, H, Bc, d]
            s_j = torch.matmul(q_t, k_j.transpose(-2, -1)) * scale  # [B, H, N_q, Bc]
            mask = _causal_mask(0, n_q, c0, c1, n_kv - n_q, q.device) if causal else None
            if mask is not None:
                s_j.masked_fill_(mask, float("-inf"))
            traffic.hold(q_t, acc, k_j, v_j, s_j, l_t, m_t)
            m_new = torch.maximum(m_t, s_j.amax(dim=-1)).clamp_min(neg_big)
            p_j = torch.exp(s_j - m_new[..., None])
            alpha = torch.exp(m_t - m_new)
            l_t = alpha * l_t + p_j.sum(dim=-1)
            acc = alpha[..., None] * acc + torch.matmul(p_j, v_j)
            m_t = m_new
        o_t = acc / l_t.clamp_min(torch.finfo(cdt).tiny)[..., None]  # a query that sees no key here: O_s = 0
        if splits == 1:
            traffic.store(o, o_t)
            return o
        traffic.store(o_parts[split], o_t)
        traffic.store(lse_parts[split], m_t + torch.log(l_t))  # LSE_s = m + log l; -inf if no key seen
    o_all, lse_all = traffic.load(o_parts, cdt), traffic.load(lse_parts, cdt)  # merge kernel
    lse = torch.logsumexp(lse_all, dim=0)  # [B, H, N_q]
    weights = torch.exp(lse_all - lse)  # [S, B, H, N_q]: e^(LSE_s - LSE)
    traffic.store(o, (weights[..., None] * o_all).sum(dim=0))
    return o


def error_factor(dtype: torch.dtype) -> float:
    """How many times the same-precision naive error an implementation may reach: 2, as in flash-attention's
    tests (which run fp16 and bf16), and 3 for fp32 (flash-attention's factor for dq/dk/dv in its kv and varlen
    tests). In fp32 the naive error is a few epsilons, while a FlashAttention backward or a split-KV merge
    scales a whole row by e^(S - L) or e^(LSE_s - LSE) with L stored in fp32, whose rounding (half an ulp of
    |L|) is itself several epsilons: measured fp32 errors reach 2.2x the naive error, fp16/bf16 stay below 1x."""
    return 3.0 if dtype == torch.float32 else 2.0


def error_bound(ref: torch.Tensor, same_precision: torch.Tensor, dtype: torch.dtype) -> float:
    """Tolerance in flash-attention's tests: error_factor(dtype) x the max error of a same-precision naive
    implementation against the fp64 reference, plus a rounding floor 2 max|(r + 0.3 - 0.3) - r| with r the
    reference in `dtype` (the floor of FlashAttention-3's tests)."""
    r = ref.to(dtype)
    floor = 2 * ((r + 0.3) - 0.3 - r).abs().max().item()
    return error_factor(dtype) * (same_precision.double() - ref.double()).abs().max().item() + floor
