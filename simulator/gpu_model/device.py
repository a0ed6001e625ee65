"""The datasheet facts of GPUs as arrays, one entry per row of a table (or one row for a single call).

Every kernel function of the model takes a `Dev` and the parameters as arrays of the same length,
so a whole measured table is predicted in one vectorised call and a single kernel in a call of
length one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from simulator.hardware import HardwareProfile

# What a GEMM dtype of the tables reads per operand element and which peak its MMAs run at.
GEMM_DTYPES = {
    "bf16": (2.0, "bf16"),
    "fp16": (2.0, "fp16"),
    "fp8": (1.0, "fp8"),
    "fp8_block": (1.0, "fp8"),
    "nvfp4": (0.5 + 1.0 / 16, "fp4"),  # 4-bit values and one fp8 scale per 16 (NVFP4 block size)
}

# Generations with the Tensor Memory Accelerator (compute capability 9.0 on): their GEMM libraries
# (cuBLAS, CUTLASS 3.x) run warp-specialised kernels fed by TMA copies, whose prologue (tensor-map
# prefetch, barrier setup, producer/consumer warp roles) differs from the cp.async pipelines of
# Ampere and Ada (CUTLASS 2.x).
TMA_GENERATIONS = ("hopper", "blackwell", "blackwell-rtx")

# The tensor-core instruction class of each generation. Ampere, Ada and RTX Blackwell (sm_120) issue
# warp-level `mma.sync` with operands and accumulators in registers; Hopper issues warpgroup
# `wgmma` reading operands from shared memory; datacenter Blackwell (sm_100) issues `tcgen05.mma`
# from one thread with accumulators in tensor memory (PTX ISA 8.x, "Warp Level Matrix Multiply-
# Accumulate Instructions", "Asynchronous Warpgroup Level Matrix Multiply-Accumulate
# Instructions", "TensorCore 5th Generation Family Instructions").
MMA_CLASS = {
    "volta": "mma.sync",
    "turing": "mma.sync",
    "ampere": "mma.sync",
    "ada": "mma.sync",
    "blackwell-rtx": "mma.sync",
    "hopper": "wgmma",
    "blackwell": "tcgen05",
    "cdna3": "mfma",
}


@dataclass(frozen=True)
class Dev:
    sm_count: np.ndarray
    clock_hz: np.ndarray
    hbm_bytes_per_s: np.ndarray
    l2_bytes: np.ndarray  # what one L2 partition holds of data every SM reads (the L2 over its partitions)
    l2_bytes_per_s: np.ndarray
    sram_bytes_per_sm: np.ndarray
    tma: np.ndarray  # bool: the GPU has a Tensor Memory Accelerator (Hopper on), its GEMM libraries' kernels are TMA-fed
    tdp_w: np.ndarray  # board power limit (nan where the profile has none: no power limit is modelled)
    peaks: dict[str, np.ndarray]  # dense tensor-core FLOP/s by dtype (nan where the GPU has none)
    generation: np.ndarray  # architecture generation labels (object array)

    def __len__(self) -> int:
        return len(self.sm_count)

    def peak(self, dtype: str) -> np.ndarray:
        return self.peaks[dtype]

    def take(self, idx) -> Dev:
        """The rows `idx` (an index array or a boolean mask)."""
        return Dev(**{f.name: {k: v[idx] for k, v in self.peaks.items()} if f.name == "peaks" else getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def of(cls, profiles: list[HardwareProfile]) -> Dev:
        """One row per profile (repeat a profile to predict many rows on it)."""
        uniq: dict[int, HardwareProfile] = {}
        idx = np.empty(len(profiles), dtype=np.int64)
        keys: dict[str, int] = {}
        for i, p in enumerate(profiles):
            j = keys.setdefault(p.name, len(keys))
            uniq[j] = p
            idx[i] = j
        base = [uniq[j] for j in range(len(uniq))]
        return cls.repeat(base, idx)

    @classmethod
    def repeat(cls, profiles: list[HardwareProfile], index: np.ndarray) -> Dev:
        """Rows `index` into `profiles` (each row takes the facts of profiles[index[row]])."""

        def col(fn, dtype=float):
            return np.asarray([fn(p) for p in profiles], dtype=dtype)[index]

        dtypes = ("fp16", "bf16", "fp8", "fp4", "fp32")
        peaks = {d: col(lambda p, d=d: p.peak_flops_per_s.get(d, p.peak_flops_per_s["fp16"] if d == "bf16" else np.nan)) for d in dtypes}
        return cls(
            sm_count=col(lambda p: p.sm_count),
            clock_hz=col(lambda p: p.clock_hz),
            hbm_bytes_per_s=col(lambda p: p.hbm_bytes_per_s),
            l2_bytes=col(lambda p: p.l2_bytes / (p.l2_partitions or 1)),
            l2_bytes_per_s=col(lambda p: p.l2_bytes_per_s or p.hbm_bytes_per_s),
            sram_bytes_per_sm=col(lambda p: p.sram_bytes_per_sm),
            tma=col(lambda p: p.generation in TMA_GENERATIONS, dtype=bool),
            tdp_w=col(lambda p: p.tdp_w if p.tdp_w else np.nan),
            peaks=peaks,
            generation=col(lambda p: p.generation, dtype=object),
        )
