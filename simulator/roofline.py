"""Roofline time of one kernel on a profile: the slower of compute and memory, plus launch overhead.

    t = max(F / (P_peak * f_compute), Q / (BW_peak * f_bw)) + n_launch * t_launch

F in FLOPs, Q in HBM bytes moved (read + written), P_peak in FLOP/s, BW_peak in bytes/s; the
fractions f are the profile's achievable fractions of peak (Williams et al. 2009, "Roofline").
A GEMM on a CPU adds the two terms instead (`gemm`).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from simulator.hardware import DTYPE_BYTES, HardwareProfile


@dataclass(frozen=True)
class KernelCost:
    """FLOPs, HBM bytes and predicted seconds of one kernel (or a sum of kernels). `low_s` and
    `high_s` bound an 80% prediction interval where the device model has one (None: no interval)."""

    name: str
    flops: float
    hbm_bytes: float
    time_s: float
    launches: int = 1
    low_s: float | None = None
    high_s: float | None = None

    def __add__(self, other: KernelCost) -> KernelCost:
        interval = self.low_s is not None or other.low_s is not None
        return KernelCost(
            self.name if self.name == other.name else f"{self.name}+{other.name}",
            self.flops + other.flops,
            self.hbm_bytes + other.hbm_bytes,
            self.time_s + other.time_s,
            self.launches + other.launches,
            self.low + other.low if interval else None,
            self.high + other.high if interval else None,
        )

    @property
    def low(self) -> float:
        return self.time_s if self.low_s is None else self.low_s

    @property
    def high(self) -> float:
        return self.time_s if self.high_s is None else self.high_s

    def scaled(self, n: int, name: str | None = None) -> KernelCost:
        """The same kernel run `n` times (e.g. once per layer)."""
        low = None if self.low_s is None else n * self.low_s
        high = None if self.high_s is None else n * self.high_s
        return KernelCost(name or self.name, n * self.flops, n * self.hbm_bytes, n * self.time_s, n * self.launches, low, high)

    @property
    def intensity_flops_per_byte(self) -> float:
        return self.flops / self.hbm_bytes if self.hbm_bytes else float("inf")


def memory_bytes_per_s(hw: HardwareProfile, n_bytes: float) -> float:
    """Achievable bandwidth for a kernel moving `n_bytes`. On a CPU whose copy speed was measured by
    size (`copy_bytes_per_s_by_size`), that speed at `n_bytes`, interpolated linearly in log(size)
    between the measured sizes and held at the end points beyond them: a cache that other tenants
    share gives a kernel less of itself the more it moves, with no sharp edge. On a CPU without it,
    a kernel whose data fit in the last-level cache (`l2_bytes`) runs from it when the profile has
    its bandwidth: an executor runs the same weights step after step, and CPU caches are large next
    to small models. On a GPU, whose L2 is small next to what decoding streams, every byte counts at
    HBM speed."""
    if hw.kind == "cpu" and hw.copy_bytes_per_s_by_size:
        sizes = sorted(hw.copy_bytes_per_s_by_size)
        speeds = [hw.copy_bytes_per_s_by_size[n] for n in sizes]
        at = bisect.bisect_right(sizes, n_bytes)
        if at == 0 or at == len(sizes):
            speed = speeds[min(at, len(sizes) - 1)]
        else:
            w = math.log(n_bytes / sizes[at - 1]) / math.log(sizes[at] / sizes[at - 1])
            speed = speeds[at - 1] + w * (speeds[at] - speeds[at - 1])
        return speed * hw.achievable.bandwidth
    if hw.kind == "cpu" and hw.l2_bytes_per_s and n_bytes <= hw.l2_bytes:
        return hw.l2_bytes_per_s * hw.achievable.bandwidth
    return hw.hbm_bytes_per_s * hw.achievable.bandwidth


def roofline_time_s(
    flops: float, hbm_bytes: float, hw: HardwareProfile, dtype: str, compute_fraction: float, launches: int = 1
) -> float:
    compute_s = flops / (hw.peak_flops(dtype) * compute_fraction)
    memory_s = hbm_bytes / memory_bytes_per_s(hw, hbm_bytes)
    return max(compute_s, memory_s) + launches * hw.launch_overhead_s


def gemm(m: int, n: int, k: int, hw: HardwareProfile, dtype: str = "fp16", name: str = "gemm") -> KernelCost:
    """[m, k] @ [k, n] -> [m, n]: 2mnk FLOPs; A, B read once and C written once from/to HBM.

    On a CPU the two terms add instead of overlapping: a BLAS packs the panels of A and B into
    contiguous buffers before its micro-kernel computes on them (Goto & van de Geijn 2008, "Anatomy
    of high-performance matrix multiplication"), and one core does both in turn; so a
    small-m GEMM pays for streaming B and for its FLOPs."""
    e = DTYPE_BYTES[dtype]
    flops = 2.0 * m * n * k
    hbm_bytes = float(e * (m * k + k * n + m * n))
    if hw.kind == "cpu":
        time_s = flops / (hw.peak_flops(dtype) * hw.achievable.matmul) + hbm_bytes / memory_bytes_per_s(hw, hbm_bytes)
        return KernelCost(name, flops, hbm_bytes, time_s + hw.launch_overhead_s)
    return KernelCost(name, flops, hbm_bytes, roofline_time_s(flops, hbm_bytes, hw, dtype, hw.achievable.matmul))


def elementwise(
    n_elements: int,
    hw: HardwareProfile,
    dtype: str = "fp16",
    reads: int = 1,
    writes: int = 1,
    flops_per_element: float = 1.0,
    name: str = "elementwise",
) -> KernelCost:
    """A memory-bound kernel over `n_elements`: `reads` input and `writes` output tensors of that size."""
    e = DTYPE_BYTES[dtype]
    flops = flops_per_element * n_elements
    hbm_bytes = float(e * n_elements * (reads + writes))
    # Elementwise work runs on the vector units, not tensor cores: fp32 peak is its ceiling.
    compute_fraction = hw.achievable.matmul * hw.peak_flops("fp32") / hw.peak_flops(dtype)
    return KernelCost(name, flops, hbm_bytes, roofline_time_s(flops, hbm_bytes, hw, dtype, compute_fraction))
