"""The small interface between a transformer pass (`simulator.forward`) and a device.

`forward` knows which kernels a decoder layer runs (norms, the QKV/O/MLP GEMMs, RoPE, attention,
SwiGLU, all-reduces, the embedding and the LM head); what each costs on a device is the device
model's business. Two device models implement the interface:

- `simulator.gpu_model.model.GpuDeviceModel`: the fitted GPU kernel model (programs and waves
  over SMs, tiles, L2 residency, per-library attention kernels, NCCL collectives), for profiles
  of kind `gpu`; every time it returns carries an 80% interval from leave-one-GPU-out residuals;
- `simulator.eager.CpuEagerModel`: torch operators as the reference executor runs them eagerly
  on a CPU, priced by the roofline and the executor's measured costs (`calibrate`).

Neither imports `forward`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from simulator.hardware import HardwareProfile
from simulator.roofline import KernelCost


class DeviceModel(Protocol):
    hw: HardwareProfile

    def gemm(self, m: int, n: int, k: int, dtype: str, name: str, weight_matrices: int = 1) -> KernelCost:
        """[m, k] @ [k, n]; `weight_matrices`: distinct weights the pass cycles through (L2 reuse)."""

    def attention(self, batch: int, context_len: int, query_tokens: int, heads: int, kv_heads: int, d_head: int, dtype: str) -> KernelCost:
        """One layer's attention for `query_tokens` new tokens per sequence over `context_len`
        cached ones, and the write of their K and V into the cache."""

    def attention_s(self, batch: int, query_tokens: int, context_len: np.ndarray, heads: int, kv_heads: int, d_head: int, dtype: str) -> np.ndarray:
        """`attention(...).time_s` over an array of contexts (a span of decode steps)."""

    def norm(self, tokens: int, width: int, dtype: str, residual: bool = True) -> KernelCost:
        """RMSNorm over [tokens, width], with the residual add before it when `residual`."""

    def rope(self, tokens: int, width: int, dtype: str) -> KernelCost:
        """Rotary embedding of the [tokens, width] query and key activations."""

    def swiglu(self, tokens: int, width: int, dtype: str) -> KernelCost:
        """SiLU(gate) x up over [tokens, width]."""

    def embed(self, tokens: int, d_model: int, dtype: str, mask_elements: int = 0) -> KernelCost:
        """The embedding lookup of `tokens` rows (a gather), and any attention mask the executor
        builds per pass (`mask_elements` entries; GPU kernels mask inside attention)."""

    def all_reduce(self, nbytes: float, tp: int) -> KernelCost:
        """All-reduce of `nbytes` over a `tp`-GPU tensor-parallel group (zero when tp = 1)."""

    def pass_overhead_s(self, params_per_layer_bytes: float, launches: int) -> float:
        """Time a pass of `launches` kernels costs beyond its kernels (an eager executor's
        per-operator host work; nothing for a GPU engine replaying a CUDA graph)."""


def device_model(hw: HardwareProfile) -> DeviceModel:
    """The device model of a profile: the GPU kernel model for a GPU, the eager model for a CPU."""
    if hw.kind == "gpu":
        from simulator.gpu_model.model import GpuDeviceModel

        return GpuDeviceModel.of(hw)
    from simulator.eager import CpuEagerModel

    return CpuEagerModel(hw)
