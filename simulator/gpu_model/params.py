"""The GPU kernel model's parameters: what each one means, its unit, its range, and the fitted values.

Parameters meant to transfer between GPUs are stated relative to the datasheet or in units that
do not belong to one GPU: fractions of a peak, cycles at the profile's boost clock, or times that
physics fixes (a memory round trip). A parameter marked `per_generation` may take a value of its
own for each architecture generation present in the fit (a multiplicative deviation from the
common value, shrunk towards it by a prior); a GPU of a generation the fit never saw gets the
common value, except in a parameter marked `mma`: the fraction of the tensor-core peak a kernel's
MMAs reach, which the instruction its generation issues decides (warp-level `mma.sync`, Hopper's
`wgmma`, datacenter Blackwell's `tcgen05.mma`; `device.MMA_CLASS`), so such a GPU takes the mean
deviation of the fitted generations of its class where the fit has any. A parameter marked
`host` belongs to the machine a GPU sat in when its table was measured (the PCIe topology a ring
crosses), not to the GPU: it is not fitted in common but held at its `start`, the value taken for
a machine never measured, and each generation in the fit gets its own deviation from it under the
wider prior of a host. Fitted values live in `fitted.json` beside
this file, written by `python -m simulator fit-kernels` (see `simulator.kernel_fit`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.errors import UserError
from simulator.gpu_model.device import MMA_CLASS

FITTED_PATH = Path(__file__).resolve().parent / "fitted.json"


@dataclass(frozen=True)
class Param:
    name: str
    unit: str
    start: float
    low: float
    high: float
    doc: str
    per_generation: bool = False
    host: bool = False  # a property of the machine, not of the GPU: `start` for a GPU the fit never saw (see below)
    mma: bool = False  # a property of the tensor-core instruction class: a generation the fit never saw takes its class's (see below)

    def __post_init__(self) -> None:
        if not self.low <= self.start <= self.high:
            raise ValueError(f"parameter {self.name}: start {self.start} outside [{self.low}, {self.high}]")
        if self.host and not self.per_generation:  # a host's own value is its deviation: without one it would be held at start
            raise ValueError(f"parameter {self.name}: a host parameter must also be per_generation")
        if self.mma and (self.host or not self.per_generation):
            raise ValueError(f"parameter {self.name}: a tensor-core class parameter must be per_generation and not the host's")


def _family(*params: Param) -> dict[str, Param]:
    return {p.name: p for p in params}


# Each family is fitted on the tables of one kind; `timer` parameters belong to the data
# source (how its harness times a call), not to a GPU.
FAMILIES: dict[str, dict[str, Param]] = {
    "gemm": _family(
        Param("f_mma", "fraction", 0.85, 0.3, 1.0, "of the dense tensor-core peak a GEMM tile's main loop reaches", True, mma=True),
        Param("f_bw", "fraction", 0.75, 0.3, 1.0, "of the DRAM bandwidth a streaming GEMM reaches", True),
        Param("load_bpf", "B/FLOP", 0.03, 0.002, 1.0, "operand bytes one SM loads into a tile per dense bf16 FLOP it can do (L2 to shared memory; kernels are built so loads keep pace with the MMAs, so this scales with the SM's MMA rate)"),
        Param("bw_sm", "GB/s per 100 KiB", 40.0, 2.0, 1000.0, "operand bytes one SM streams per second from DRAM (bytes in flight over memory latency), per 100 KiB of its shared memory (the pipeline stages that hold them)"),
        Param("l2_speedup", "x", 2.0, 1.0, 20.0, "how much faster one SM streams operands resident in L2 than from DRAM (L2 latency is shorter)"),
        Param("t_dram_us", "us", 0.5, 0.0, 5.0, "a DRAM round trip a kernel waits for before its first operands arrive (none when they are L2-resident)"),
        Param("c_tile", "cycles", 1500.0, 1.0, 20000.0, "fixed cost of one output tile: prologue, pipeline fill, epilogue", True),
        Param("overlap", "fraction", 0.5, 0.0, 1.0, "of a tile's epilogue (writing C) hidden behind the next tile's main loop", True),
        Param("k_slice", "elements", 256.0, 16.0, 8192.0, "the shortest K slice the library's heuristics split K into (cuBLAS ships heuristics per architecture)", True),
        Param("t_k_ns", "ns", 3.0, 0.01, 50.0, "least time a program's k loop spends per element of k: one step's load-to-MMA latency over the stages in flight (memory latency, so in seconds, not cycles)"),
        Param("t_split_us", "us", 1.0, 0.0, 10.0, "fixed time of a split-K call's reduction of its slices' partials (a second kernel, or the last slice's wait and fix-up)"),
        Param("u_l2", "fraction", 0.7, 0.05, 1.0, "of the L2 that holds operands between calls"),
        Param("f_l2", "fraction", 0.2, 0.01, 1.0, "of the L2 bandwidth operands resident there stream at"),
        Param("c_kernel", "cycles", 2000.0, 1.0, 20000.0, "device time of launching and draining one kernel, the part that runs at the SM clock", True),
        Param("t_kernel_us", "us", 1.0, 0.0, 10.0, "the part of it that does not (the front end's launch latency)"),
        Param("x_tma", "x", 1.2, 0.3, 4.0, "c_kernel's factor for a TMA-fed kernel (Hopper on: tensor-map prefetch, barrier setup, warp-specialised roles; `device.TMA_GENERATIONS`)"),
        Param("e_mma", "pJ/FLOP", 2.0, 0.1, 10.0, "energy of one dense FLOP at the bf16 tensor-core peak and the boost clock, the operand traffic feeding it included (the power limit's demand, see `kernels.power_limited`)"),
        Param("t_power_ms", "ms", 20.0, 0.1, 1000.0, "how long a kernel runs back to back before the power controller's lower clock takes hold"),
    ),
    "gemm_quantized": _family(
        Param("f_mma", "fraction", 0.6, 0.05, 1.0, "of the dense tensor-core peak of the quantized dtype a tile's main loop reaches", True, mma=True),
        Param("c_kernel", "cycles", 4000.0, 1.0, 40000.0, "device time of the quantized path's kernels (activation quantization and the scaled GEMM) at the SM clock", True),
        Param("t_kernel_us", "us", 1.0, 0.0, 20.0, "the part of it that does not run at the SM clock"),
        Param("c_tile", "cycles", 1500.0, 1.0, 20000.0, "fixed cost of one output tile, scales applied in the epilogue", True),
        Param("bw_load_scaled", "GB/s per 100 KiB", 100.0, 20.0, 10000.0, "operand bytes one SM loads into its tiles per second in vLLM's scaled-MM kernels, per 100 KiB of its shared memory: the bytes their pipeline stages hold (they fill it) over a memory latency (100 KiB per microsecond: 100)"),
        Param("bw_ew", "GB/s per SM", 40.0, 3.0, 400.0, "bytes one SM streams per second through PyTorch's elementwise kernels (bytes in flight over memory latency): fp8's op-by-op quantization (`kernels.quantize_time`)"),
        Param("q_rate", "elements/cycle", 1.0, 0.01, 16.0, "activation elements one SM quantizes per cycle in the activation-quantization kernel (a scale per token: the row's max, then the row scaled and written)"),
    ),
    "fa2": _family(
        Param("f_cta", "fraction", 0.6, 0.05, 1.0, "of one SM's share of the tensor-core peak a 4-warp program reaches, and of its SFUs' exp2 rate (one instruction stream)", True, mma=True),
        Param("bw_cta", "GB/s", 26.0, 2.0, 512.0, "K/V bytes one program streams per second from DRAM (latency-bound)"),
        Param("l2_speedup", "x", 1.1, 1.0, 20.0, "how much faster a program streams K/V when the call's working set is L2-resident"),
        Param("t_prog_us", "us", 3.0, 0.1, 20.0, "fixed time of one program: block-table, Q and first K/V loads, output and statistics"),
        Param("gamma", "fraction", 0.5, 0.0, 1.0, "of the longest program added to the work per SM when programs outnumber the SMs (the tail of list scheduling)"),
        Param("f_bw", "fraction", 0.8, 0.2, 1.0, "of the DRAM bandwidth the attention kernels' compulsory traffic reaches"),
        Param("u_l2", "fraction", 0.9, 0.05, 1.5, "of the L2 that keeps a call's working set between calls"),
        Param("f_l2", "fraction", 0.3, 0.01, 1.0, "of the L2 bandwidth L2-resident compulsory traffic reaches"),
        Param("c_kernel", "cycles", 5000.0, 100.0, 20000.0, "device time of one kernel of the call (launch, ramp, drain)"),
        Param("t_merge_ns", "ns", 100.0, 1.0, 2000.0, "time per K/V split of a split call's reduction where it walks a row's partial outputs one split "
              "after another (FlashAttention's combine kernel; TensorRT-LLM's multi-CTA reduction takes the same value, `kernels.attention_time`): "
              "a memory latency, so in seconds"),
    ),
    "flashinfer": _family(
        Param("f_cta", "fraction", 0.6, 0.05, 1.0, "of one SM's share of the tensor-core peak a program reaches, and of its SFUs' exp2 rate (one instruction stream)", True, mma=True),
        Param("ctas_per_sm", "programs", 2.0, 0.5, 8.0, "programs resident at once per 100 KiB of an SM's shared memory (the kernels' occupancy)"),
        Param("bw_cta", "GB/s", 40.0, 2.0, 1000.0, "K/V bytes one program streams per second from DRAM"),
        Param("l2_speedup", "x", 1.5, 1.0, 20.0, "how much faster a program streams K/V when the call's working set is L2-resident"),
        Param("t_prog_us", "us", 2.0, 0.1, 20.0, "fixed time of one program"),
        Param("gamma", "fraction", 0.5, 0.0, 1.0, "tail of list scheduling, as for fa2"),
        Param("f_bw", "fraction", 0.8, 0.2, 1.0, "of the DRAM bandwidth the compulsory traffic reaches"),
        Param("u_l2", "fraction", 0.9, 0.05, 1.5, "of the L2 that keeps a call's working set between calls"),
        Param("f_l2", "fraction", 0.3, 0.01, 1.0, "of the L2 bandwidth L2-resident traffic reaches"),
        Param("c_kernel", "cycles", 5000.0, 100.0, 20000.0, "device time of one kernel of the call", True),
        Param("x_sfu", "ops", 1.0, 0.5, 4.0, "SFU-rate instructions per score: its exp2 (1, the start) and what else of the softmax runs at that rate; "
              "told from f_cta only by kernels that overlap the softmax with the MMAs, held at the start where a fit has none (`kernel_fit`)"),
    ),
    "nccl": _family(
        Param("alpha_nvlink_LL", "us", 8.8, 0.5, 40.0, "base latency (launch and synchronisation), NVLink, LL protocol"),
        Param("alpha_nvlink_LL128", "us", 10.8, 0.5, 40.0, "base latency, NVLink, LL128"),
        Param("alpha_nvlink_Simple", "us", 25.0, 0.5, 60.0, "base latency, NVLink, Simple"),
        Param("alpha_pcie_LL", "us", 4.9, 0.5, 40.0, "base latency, PCIe, LL"),
        Param("alpha_pcie_Simple", "us", 8.3, 0.5, 60.0, "base latency, PCIe, Simple"),
        Param("beta_nvlink_LL", "us", 0.9, 0.05, 10.0, "latency per ring step, NVLink, LL"),
        Param("beta_nvlink_LL128", "us", 0.9, 0.05, 10.0, "latency per ring step, NVLink, LL128"),
        Param("beta_nvlink_Simple", "us", 2.6, 0.05, 20.0, "latency per ring step, NVLink, Simple"),
        Param("beta_pcie_LL", "us", 1.3, 0.05, 10.0, "latency per ring step, PCIe, LL"),
        Param("beta_pcie_Simple", "us", 3.6, 0.05, 20.0, "latency per ring step, PCIe, Simple"),
        Param("eff_nvlink_LL", "fraction", 0.03, 0.001, 0.2, "of the per-direction link bandwidth, NVLink, LL (half of each 8-byte word is a flag)"),
        Param("eff_nvlink_LL128", "fraction", 0.32, 0.05, 0.7, "of the link bandwidth, NVLink, LL128"),
        Param("eff_nvlink_Simple", "fraction", 0.71, 0.3, 1.2, "of the link bandwidth, NVLink, Simple"),
        Param("eff_pcie_LL", "fraction", 0.44, 0.001, 0.7, "of the link bandwidth, PCIe, LL"),
        Param("eff_pcie_Simple", "fraction", 0.74, 0.3, 1.2, "of the link bandwidth, PCIe, Simple"),
        Param("c_steps", "chunks", 0.4, 1e-6, 4.0, "non-overlapped chunk steps per rank"),
        Param("fill_Simple", "bytes", 1.2e5, 1e3, 1e8, "Simple protocol pipeline fill"),
        Param("int8_red_penalty", "fraction", 0.012, 1e-6, 0.5, "extra wire time of int8 reductions"),
        Param("eff_cross", "fraction", 1.0, 0.001, 1.0, "PCIe: bandwidth factor of a ring leaving one PCIe switch (host platform; 1 on a host never measured)", True, host=True),
        Param("eff_socket", "fraction", 1.0, 0.001, 1.0, "PCIe: bandwidth factor of a ring leaving one CPU socket (host platform; 1 on a host never measured)", True, host=True),
    ),
    "operators": _family(
        Param("eff_norm", "fraction", 0.5, 0.02, 2.0, "of the attention family's memory rate a residual add + RMSNorm kernel reaches"),
        Param("eff_rope", "fraction", 0.5, 0.02, 2.0, "the same for the rotary embedding kernel"),
        Param("eff_swiglu", "fraction", 0.5, 0.02, 2.0, "the same for SiLU(gate) x up"),
        Param("eff_embed", "fraction", 0.2, 0.01, 2.0, "the same for the embedding lookup, a gather of table rows"),
        Param("eff_add", "fraction", 1.0, 0.02, 2.0, "the same for a plain residual add"),
    ),
}

# The fit groups (see `simulator.kernel_fit.GROUPS`) and the family each one fits.
GROUP_FAMILIES = {
    "gemm:bf16": "gemm",
    "gemm:fp8": "gemm_quantized",
    "gemm:fp8_block": "gemm_quantized",
    "gemm:nvfp4": "gemm_quantized",
    "attention:fa2": "fa2",
    "attention:flashinfer-prefill": "flashinfer",
    "attention:flashinfer-decode": "flashinfer",
    "collective": "nccl",
    "operators": "operators",
}


def family(name: str) -> dict[str, Param]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UserError(f"unknown kernel family {name!r}; known: {', '.join(FAMILIES)}") from None


@dataclass(frozen=True)
class Fitted:
    """Fitted values of one family: the common value of every parameter, and per architecture
    generation the log-deviation of each `per_generation` parameter from it."""

    family: str
    common: dict[str, float]
    generation: dict[str, dict[str, float]]

    def deviations(self, generation: str) -> dict[str, float]:
        """The log-deviations a generation takes: its own where the fit saw it; else, for the
        parameters of its tensor-core class (`mma`), the mean of those of the fitted generations
        of its class (`device.MMA_CLASS`), where there are any; else none (the common values)."""
        if generation in self.generation:
            return self.generation[generation]
        cls = MMA_CLASS.get(generation)
        peers = [d for g, d in self.generation.items() if cls is not None and MMA_CLASS.get(g) == cls]
        if not peers:
            return {}
        spec = family(self.family)
        names = {n for d in peers for n in d if spec[n].mma}
        return {n: float(np.mean([d.get(n, 0.0) for d in peers])) for n in names}

    def values(self, generations) -> dict[str, np.ndarray]:
        """Every parameter as an array over rows of the given generation labels."""
        gens = np.asarray(generations, dtype=object)
        spec = family(self.family)
        out = {name: np.full(len(gens), value, dtype=float) for name, value in self.common.items()}
        for gen in set(gens.tolist()):
            rows = gens == gen
            for name, delta in self.deviations(gen).items():
                value = self.common[name]
                out[name][rows] = min(max(value * math.exp(delta), spec[name].low), spec[name].high)
        return out

    def for_generation(self, generation: str) -> dict[str, float]:
        deltas = self.deviations(generation)
        spec = family(self.family)
        return {k: min(max(v * math.exp(deltas.get(k, 0.0)), spec[k].low), spec[k].high) for k, v in self.common.items()}

    def to_json(self) -> dict:
        return {"common": self.common, "generation": self.generation}

    @classmethod
    def from_json(cls, family_name: str, data: dict) -> Fitted:
        spec = family(family_name)
        common = {k: float(data["common"].get(k, p.start)) for k, p in spec.items()}
        generation = {g: {k: float(v) for k, v in d.items() if k in spec} for g, d in data.get("generation", {}).items()}
        return cls(family_name, common, generation)

    @classmethod
    def start(cls, family_name: str) -> Fitted:
        return cls(family_name, {k: p.start for k, p in family(family_name).items()}, {})


def load_fitted(path: Path = FITTED_PATH) -> dict:
    """The shipped fit: {"families": {group: Fitted}, "timers": {group: {...}}, "intervals": {kind:
    {"low", "high"}}, "data": {...}, "gpus": {group: [the GPUs whose tables it was fitted on]}}. A
    group the file lacks (or a missing file, in a checkout before the first fit) takes every
    parameter's start value."""
    raw: dict = {}
    if path.exists():
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read the fitted kernel model: {exc}") from None
    groups = raw.get("groups", {})
    families = {g: Fitted.from_json(f, groups[g]) if g in groups else Fitted.start(f) for g, f in GROUP_FAMILIES.items() if f in FAMILIES}
    timers = {g: groups[g].get("timer", {}) for g in groups}
    gpus = {g: list(groups[g].get("gpus", [])) for g in groups}
    return {"families": families, "timers": timers, "intervals": raw.get("intervals", {}), "data": raw.get("data", {}), "gpus": gpus}
