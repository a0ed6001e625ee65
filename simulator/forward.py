"""Time of one transformer forward pass: a decode step, a verify pass, or a prefill.

A pass over `batch` sequences, each with `context_len` tokens already in the KV cache and
`query_tokens` new tokens (1 for a decode step, gamma + 1 for a verify pass, the prompt for a
prefill) reads every weight once and the KV cache of every sequence (DESIGN: facts). With
T = batch x query_tokens tokens, a weight GEMM does 2 T k n FLOPs on k n weights: its intensity is
about T FLOP/byte in fp16, so the pass turns from memory- to compute-bound once T passes the
profile's ridge point.

Tensor parallelism over `tp` GPUs (Megatron-LM, Shoeybi et al. 2019): the QKV and MLP-up GEMMs
split their output columns, O and MLP-down their input rows, attention splits heads (KV heads are
replicated when there are fewer than `tp`), the LM head splits the vocabulary; each layer ends its
attention and its MLP with an all-reduce of the [T, d_model] activations over the interconnect.
Times are per GPU; all GPUs of the group run in lockstep.
"""

from __future__ import annotations

from dataclasses import replace

from simulator.device_model import DeviceModel, device_model
from simulator.errors import UserError
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.models import ModelSpec
from simulator.roofline import KernelCost


def all_reduce(n_bytes: float, hw: HardwareProfile | DeviceModel, tp: int, name: str = "all_reduce") -> KernelCost:
    """All-reduce of `n_bytes` over `tp` devices, as the profile's device model prices it."""
    return replace(_device(hw).all_reduce(n_bytes, tp), name=name)


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    """KV heads each GPU holds: split when there are at least `tp`, else one replicated head."""
    return max(1, model.n_kv_heads // tp)


def _device(hw: HardwareProfile | DeviceModel) -> DeviceModel:
    return hw if not isinstance(hw, HardwareProfile) else device_model(hw)


def attention_decode(
    model: ModelSpec,
    hw: HardwareProfile | DeviceModel,
    batch: int,
    context_len: int,
    query_tokens: int,
    dtype: str = "fp16",
    tp: int = 1,
) -> KernelCost:
    """Attention of `query_tokens` new tokens per sequence over the cache plus themselves, one
    layer, on one GPU of a `tp`-way group (its share of the query and KV heads)."""
    return _device(hw).attention(batch, context_len, query_tokens, model.n_heads // tp, kv_heads_per_gpu(model, tp), model.d_head, dtype)


def layer_costs(
    model: ModelSpec,
    hw: HardwareProfile | DeviceModel,
    batch: int,
    context_len: int,
    query_tokens: int,
    dtype: str = "fp16",
    tp: int = 1,
) -> list[KernelCost]:
    """The kernels of one decoder layer on one GPU of a `tp`-way group (residual add + RMSNorm,
    QKV, RoPE, attention with the KV-cache write, O, all-reduce, residual add + RMSNorm, SwiGLU MLP,
    all-reduce), each priced by the device model."""
    dev = _device(hw)
    dense = dense_costs(model, dev, batch * query_tokens, dtype, tp)
    return [*dense[:3], attention_decode(model, dev, batch, context_len, query_tokens, dtype, tp), *dense[3:]]


def dense_costs(model: ModelSpec, hw: HardwareProfile | DeviceModel, tokens: int, dtype: str = "fp16", tp: int = 1) -> list[KernelCost]:
    """`layer_costs` but attention: the kernels whose cost depends on the layer's tokens alone."""
    dev = _device(hw)
    t = tokens
    d, d_ff = model.d_model, model.d_ff
    d_q = model.n_heads // tp * model.d_head  # this GPU's query heads
    d_kv = kv_heads_per_gpu(model, tp) * model.d_head
    activations = t * d * DTYPE_BYTES[dtype]
    matrices = 4 * model.n_layers  # weight matrices a pass streams through before it reuses one
    return [
        dev.norm(t, d, dtype),
        dev.gemm(t, d_q + 2 * d_kv, d, dtype, "qkv", matrices),
        dev.rope(t, d_q + d_kv, dtype),
        dev.gemm(t, d, d_q, dtype, "o_proj", matrices),
        dev.all_reduce(activations, tp),
        dev.norm(t, d, dtype),
        dev.gemm(t, 2 * d_ff // tp, d, dtype, "mlp_up", matrices),  # W1 and W3 fused
        dev.swiglu(t, d_ff // tp, dtype),
        dev.gemm(t, d, d_ff // tp, dtype, "mlp_down", matrices),
        dev.all_reduce(activations, tp),
    ]


def forward(
    model: ModelSpec,
    hw: HardwareProfile | DeviceModel,
    batch: int,
    context_len: int,
    query_tokens: int,
    dtype: str = "fp16",
    logits_tokens: int | None = None,
    tp: int = 1,
) -> dict[str, KernelCost]:
    """Cost of one forward pass on each GPU of a `tp`-way group, by kernel name, summed over
    layers, plus 'total' (with its 80% interval where the device model gives one).

    `logits_tokens`: tokens that go through the LM head (default all query tokens; a prefill
    needs only the last token of each sequence)."""
    check_tp(model, tp)
    dev = _device(hw)
    t = batch * query_tokens
    logits_tokens = t if logits_tokens is None else logits_tokens
    by_name: dict[str, KernelCost] = {}
    for k in layer_costs(model, dev, batch, context_len, query_tokens, dtype, tp):
        scaled = k.scaled(model.n_layers)
        by_name[k.name] = by_name[k.name] + scaled if k.name in by_name else scaled
    by_name["embed"] = dev.embed(t, model.d_model, dtype, mask_elements=t * (context_len + query_tokens))
    by_name["final_norm"] = dev.norm(logits_tokens, model.d_model, dtype, residual=False)
    by_name["lm_head"] = dev.gemm(logits_tokens, -(-model.vocab_size // tp), model.d_model, dtype, "lm_head")
    total = None
    for k in by_name.values():
        total = k if total is None else total + k
    layer_bytes = -(-model.params_per_layer * DTYPE_BYTES[dtype] // tp)
    extra_s = dev.pass_overhead_s(layer_bytes, total.launches)
    interval = total.low_s is not None
    by_name["total"] = KernelCost("total", total.flops, total.hbm_bytes, total.time_s + extra_s, total.launches,
                                  total.low + extra_s if interval else None, total.high + extra_s if interval else None)  # fmt: skip
    return by_name


def check_tp(model: ModelSpec, tp: int) -> None:
    if tp < 1 or model.n_heads % tp or model.d_ff % tp:
        raise UserError(f"tensor-parallel degree {tp} must be >= 1 and divide {model.name}'s {model.n_heads} heads and d_ff {model.d_ff}")


def step_time_s(
    model: ModelSpec,
    hw: HardwareProfile,
    batch: int,
    context_len: int,
    query_tokens: int = 1,
    dtype: str = "fp16",
    tp: int = 1,
) -> float:
    """Seconds of one decode step (query_tokens = 1) or verify pass (query_tokens = gamma + 1)."""
    return forward(model, hw, batch, context_len, query_tokens, dtype, tp=tp)["total"].time_s


def prefill_time_s(
    model: ModelSpec, hw: HardwareProfile, batch: int, prompt_len: int, dtype: str = "fp16", tp: int = 1
) -> float:
    """Seconds to process the prompts of `batch` sequences of `prompt_len` tokens (time to first token)."""
    return forward(model, hw, batch, 0, prompt_len, dtype, logits_tokens=batch, tp=tp)["total"].time_s


def weight_bytes(model: ModelSpec, dtype: str = "fp16", tp: int = 1) -> int:
    """Weight bytes held by each GPU of a `tp`-way group (the embedding table is split too)."""
    return -(-model.n_params * DTYPE_BYTES[dtype] // tp)


def kv_bytes_per_token(model: ModelSpec, dtype: str = "fp16", tp: int = 1) -> int:
    """KV-cache bytes one token occupies on each GPU of a `tp`-way group: this GPU's share of the
    model's KV heads."""
    return model.kv_bytes_per_token(DTYPE_BYTES[dtype]) * kv_heads_per_gpu(model, tp) // model.n_kv_heads
