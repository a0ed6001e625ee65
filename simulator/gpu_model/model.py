"""`GpuDeviceModel`: the GPU kernel model behind `simulator.device_model.DeviceModel`.

It prices the kernels of a transformer pass as an inference engine runs them on one GPU, inside
a CUDA graph (so no host launch cost per kernel; each kernel's own launch and drain is in its
device time), with the parameters fitted to the measured tables (`fitted.json`):

- GEMMs: `kernels.gemm_time` with the family of their dtype (fp16/bf16 share `gemm:bf16`; fp8
  GEMMs include the activation-quantization kernel); a pass cycles through all its layers' weight
  matrices, so a weight is L2-resident between steps only if the whole stack fits;
- attention: `kernels.attention_time` of the library vLLM runs on the generation (FlashInfer, that
  is TensorRT-LLM's kernels, on datacenter Blackwell; vLLM's flash-attn build elsewhere:
  FlashAttention-3's tiles on Hopper, whose programs pack a KV group's query heads into 64-192
  rows, split K/V by vLLM's scheduler metadata for every pass and stream K/V through two pipeline
  stages, at FA2's fitted per-program rates, and a call of at most vLLM's largest CUDA-graph capture
  size, 512 tokens, takes the 32 splits vLLM's full graphs give it as its static count;
  FlashAttention-2's kernels on the rest); a pass of
  2 to `SPEC_VERIFY_MAX_QUERY` query tokens over a cache is a speculative verify pass, which vLLM
  runs on TensorRT-LLM's generation kernels where FlashInfer calls them;
- memory-bound kernels (norms, RoPE, SwiGLU, the embedding gather): their bytes at the
  FlashAttention-2 family's fitted DRAM/L2 rates (fractions of the datasheet, common to every
  generation), scaled by each operator's fitted efficiency (`operators`), which was fitted over
  those same rates -- whichever attention library the GPU runs;
- all-reduce: the fitted NCCL model over the profile's interconnect.

Every cost carries an 80% interval: its time times exp(+-q), q the 80th percentile of
|log(measured / predicted)| over the held-out GPUs of the leave-one-GPU-out validation of its kind
(`simulator.validate.interval_bounds`: symmetric, as the sign of a new GPU's bias is unknown).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np

from simulator.errors import UserError
from simulator.gpu_model import collectives, kernels, sources
from simulator.gpu_model.device import MMA_CLASS, Dev
from simulator.gpu_model.params import load_fitted
from simulator.gpu_model.sources import QUANTIZED_OWN
from simulator.hardware import DTYPE_BYTES, HardwareProfile, load_profile
from simulator.roofline import KernelCost

# A pass of at most this many query tokens per sequence over a cache is a speculative verify pass
# (gamma + 1 tokens; vLLM counts a request of at most 1 + num_speculative_tokens tokens as a decode):
# an assumption of the model, as a pass's caller does not say which it is
SPEC_VERIFY_MAX_QUERY = 16
# vLLM's default attention backend is FlashInfer where FlashInfer runs TensorRT-LLM's kernels (compute capability 10.x)
FLASHINFER_GENERATIONS = kernels.TRTLLM_GENERATIONS
GEMM_FAMILY = {"fp16": "gemm:bf16", "bf16": "gemm:bf16", "fp32": "gemm:bf16", "fp8": "gemm:fp8"}
OPERATOR_BYTES = {  # bytes moved per element (bf16/fp16 elements): reads + writes
    "norm": 2 * 2 + 2,  # residual add: x, residual in, sum out; RMSNorm reads it back in-kernel
    "final_norm": 2 + 2,
    "rope": 2 + 2,
    "swiglu": 2 * 2 + 2,
    "embed": 2 + 2,
}


@lru_cache(maxsize=1)
def _fitted() -> dict:
    return load_fitted()


@cache
def _generation_of(gpu: str) -> str | None:
    """The tensor-core generation of a GPU the fit names (None where no profile has that name)."""
    try:
        return load_profile(gpu).generation
    except UserError:
        return None


def interval_class(hw: HardwareProfile):
    """The interval a kind's times on this GPU take (a function of the kind): the kind's own, and
    for collectives one per link kind (NVLink and PCIe systems err differently: a PCIe ring's speed
    is the host's topology)."""
    link = hw.interconnect or "pcie"
    return lambda kind: f"{kind}:{link}" if kind == "collective" else kind


@dataclass
class GpuDeviceModel:
    hw: HardwareProfile
    dev: Dev
    fitted: dict
    _param_memo: dict = field(default_factory=dict, repr=False)
    _attention_memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, hw: HardwareProfile, fitted: dict | None = None) -> GpuDeviceModel:
        return cls(hw, Dev.of([hw]), fitted if fitted is not None else _fitted())

    # --- parameters and intervals --------------------------------------------------------------

    def _params(self, group: str) -> dict:
        if group not in self._param_memo:
            fam = self.fitted["families"][group]
            values = {k: np.asarray([v]) for k, v in fam.for_generation(self.hw.generation).items()}
            if fam.family == "flashinfer":  # TensorRT-LLM's multi-CTA reduction at FlashAttention's per-split latency (`kernel_fit.merge_latency`)
                values["t_merge_ns"] = self._params("attention:fa2")["t_merge_ns"]
            self._param_memo[group] = values
        return self._param_memo[group]

    def provenance(self) -> dict:
        """Where this GPU stands with the shipped fit: `fitted_on`, the measured GPUs whose tables it
        was fitted on; `measured`, whether this GPU is one of them; `generation_measured_on`, those
        of its tensor-core generation, whose fitted values it takes (none: it takes the values
        common to every generation, and its times are the model's prediction for a GPU it never saw);
        `mma_class` (`device.MMA_CLASS`) and `mma_class_measured_on`, the GPUs of other generations
        of its class, whose tensor-core efficiencies it takes where none of its generation was
        measured (`params.Fitted.deviations`)."""
        fitted_on = sorted({g for gpus in self.fitted.get("gpus", {}).values() for g in gpus})
        gens = {g: _generation_of(g) for g in fitted_on}
        same = [g for g in fitted_on if gens[g] == self.hw.generation]
        cls = MMA_CLASS.get(self.hw.generation)
        kin = [g for g in fitted_on if cls is not None and not same and MMA_CLASS.get(gens[g]) == cls]
        return {"fitted_on": fitted_on, "measured": self.hw.name in fitted_on, "generation": self.hw.generation, "generation_measured_on": same,
                "mma_class": cls, "mma_class_measured_on": kin}  # fmt: skip

    def library(self) -> str:
        return "flashinfer" if self.hw.generation in FLASHINFER_GENERATIONS else "fa2"

    def interval(self, kind: str) -> tuple[float, float]:
        """Factors (low, high) of an 80% interval on a time of this kind (`validate`'s kinds:
        gemm:bf16, decode-attention:fa2, collective, operators, ...; 1, 1 where none was fitted)."""
        intervals = self.fitted.get("intervals", {})
        q = intervals.get(interval_class(self.hw)(kind)) or intervals.get(kind)
        return (q["low"], q["high"]) if q else (1.0, 1.0)

    def _cost(self, name: str, kind: str, time_s: float, flops: float = 0.0, hbm_bytes: float = 0.0, launches: int = 1) -> KernelCost:
        lo, hi = self.interval(kind)
        return KernelCost(name, flops, hbm_bytes, float(time_s), launches, float(time_s) * lo, float(time_s) * hi)

    # --- kernels -------------------------------------------------------------------------------

    def gemm(self, m, n, k, dtype, name, weight_matrices=1) -> KernelCost:
        group = GEMM_FAMILY.get(dtype, "gemm:bf16")
        P = self._params("gemm:bf16")
        if group != "gemm:bf16":  # the quantized path's own MMA rate and kernel costs over the bf16 GEMM's
            P = {**P, **{k: v for k, v in self._params(group).items() if k in QUANTIZED_OWN}}
        e = DTYPE_BYTES[dtype]
        t = sources.gemm_call(P, self.dev, [m], [n], [k], dtype if dtype != "fp32" else "bf16", weight_matrices)[0]
        return self._cost(name, group, t, 2.0 * m * n * k, float(e * (m * k + k * n + m * n)))

    def attention_s(self, batch, query_tokens, context_len, heads, kv_heads, d_head, dtype) -> np.ndarray:
        ctx = np.asarray(context_len, dtype=float)
        if ctx.ndim == 0 or ctx.size == 1:  # scalar calls repeat (a screen's batch search, a plan's table): memoised
            key = (batch, query_tokens, float(ctx.ravel()[0]), heads, kv_heads, d_head, dtype)
            if key not in self._attention_memo:
                self._attention_memo[key] = float(self._attention(batch, query_tokens, ctx.reshape(1), heads, kv_heads, d_head, dtype)[0])
            return np.full(ctx.shape, self._attention_memo[key])
        return self._attention(batch, query_tokens, ctx.ravel(), heads, kv_heads, d_head, dtype).reshape(ctx.shape)

    def _attention(self, batch, query_tokens, ctx, heads, kv_heads, d_head, dtype) -> np.ndarray:
        library = self.library()
        verify = (1 < query_tokens <= SPEC_VERIFY_MAX_QUERY) & (ctx > 0)
        generation_kernels = library == "flashinfer" and np.isin(self.dev.generation, kernels.TRTLLM_GENERATIONS).all()
        if generation_kernels and verify.any() and not verify.all():  # verify passes and prefills: each with its kernels' parameters
            out = np.empty(ctx.shape)
            for rows in (verify, ~verify):
                out[rows] = self._attention(batch, query_tokens, ctx[rows], heads, kv_heads, d_head, dtype)
            return out
        if library == "fa2":
            group = "attention:fa2"
        elif query_tokens == 1 or (generation_kernels and verify.all()):
            group = "attention:flashinfer-decode"
        else:
            group = "attention:flashinfer-prefill"
        P = self._params(group)  # one-element arrays: they and the one-row Dev broadcast over the contexts
        kv_bytes = 1.0 if dtype == "fp8" else 2.0
        return np.asarray(kernels.attention_time(P, self.dev, library, batch, heads, kv_heads, d_head, query_tokens, ctx + query_tokens, kv_bytes,
                                                 verify=verify, graph_tokens=kernels.VLLM_MAX_CAPTURE_TOKENS))  # fmt: skip

    def attention(self, batch, context_len, query_tokens, heads, kv_heads, d_head, dtype) -> KernelCost:
        e = DTYPE_BYTES[dtype]
        keys = context_len + query_tokens
        tokens = batch * query_tokens
        flops = 4.0 * batch * heads * query_tokens * keys * d_head / (2.0 if query_tokens > 1 and context_len == 0 else 1.0)
        hbm_bytes = float(2 * batch * keys * kv_heads * d_head * e + 2 * tokens * (kv_heads + heads) * d_head * e)
        t = float(self.attention_s(batch, query_tokens, np.asarray([context_len]), heads, kv_heads, d_head, dtype)[0])
        kind = ("decode-attention" if query_tokens == 1 else "prefill-attention") + ":" + self.library()
        return self._cost("attention", kind, t, flops, hbm_bytes)

    def _memory_kernel(self, name: str, elements: float) -> KernelCost:
        att = self._params("attention:fa2")  # the rates the operators' efficiencies were fitted over
        op = self._params("operators") if "operators" in self.fitted["families"] else {}
        kernel = name.removeprefix("final_")
        op = {f"eff_{kernel}": op.get(f"eff_{kernel}", np.ones(1))}  # unfitted: the attention family's rate as it is
        nbytes = np.asarray([elements * OPERATOR_BYTES[name]], dtype=float)
        c_kernel = self._params(GEMM_FAMILY["bf16"])["c_kernel"]
        t = kernels.operator_time(att, op, c_kernel, self.dev, np.asarray([kernel], dtype=object), nbytes)[0]
        return self._cost(name, "operators", t, 0.0, float(nbytes[0]))

    def norm(self, tokens, width, dtype, residual=True) -> KernelCost:
        return self._memory_kernel("norm" if residual else "final_norm", tokens * width)

    def rope(self, tokens, width, dtype) -> KernelCost:
        return self._memory_kernel("rope", tokens * width)

    def swiglu(self, tokens, width, dtype) -> KernelCost:
        return self._memory_kernel("swiglu", tokens * width)

    def embed(self, tokens, d_model, dtype, mask_elements=0) -> KernelCost:
        return self._memory_kernel("embed", tokens * d_model)

    def all_reduce(self, nbytes, tp) -> KernelCost:
        if tp == 1:
            return KernelCost("all_reduce", 0.0, 0.0, 0.0, launches=0)
        t = collectives.collective_time(self._params("collective"), self.dev, np.asarray(["all_reduce"]), np.asarray([float(tp)]), np.asarray([float(nbytes)]),
                                        link=collectives.link_of([self.hw]))[0]  # fmt: skip
        return self._cost("all_reduce", "collective", t)

    def pass_overhead_s(self, layer_bytes, launches) -> float:
        return 0.0
