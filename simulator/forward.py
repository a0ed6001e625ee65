"""Time of one transformer forward pass: a decode step, a verify pass, or a prefill.

A pass over `batch` sequences, each with `context_len` tokens already in the KV cache and
`query_tokens` new tokens (1 for a decode step, gamma + 1 for a verify pass, the prompt for a
prefill) reads every weight once and the KV cache of every sequence (DESIGN: facts). With
T = batch x query_tokens tokens, a weight GEMM does 2 T k n FLOPs on k n weights: its intensity is
about T FLOP/byte in fp16, so the pass turns from memory- to compute-bound once T passes the
profile's ridge point.
"""

from __future__ import annotations

from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.models import ModelSpec
from simulator.roofline import KernelCost, elementwise, gemm, roofline_time_s


def attention_decode(
    model: ModelSpec, hw: HardwareProfile, batch: int, context_len: int, query_tokens: int, dtype: str = "fp16"
) -> KernelCost:
    """Attention of `query_tokens` new tokens per sequence over the cache plus themselves, one layer.

    Reads K, V of every cached and new position once per KV head (GQA groups share them), reads Q
    and writes O; writes the new tokens' K, V into the cache. FLOPs 4 B H q (ctx + q) d_head.
    """
    e = DTYPE_BYTES[dtype]
    keys = context_len + query_tokens
    tokens = batch * query_tokens
    kv_read = 2 * batch * keys * model.d_kv * e
    kv_write = 2 * tokens * model.d_kv * e
    q_o = 2 * tokens * model.d_model * e
    hbm_bytes = float(kv_read + kv_write + q_o)
    flops = 4.0 * batch * model.n_heads * query_tokens * keys * model.d_head
    return KernelCost(
        "attention", flops, hbm_bytes, roofline_time_s(flops, hbm_bytes, hw, dtype, hw.achievable.attention)
    )


def layer_costs(
    model: ModelSpec, hw: HardwareProfile, batch: int, context_len: int, query_tokens: int, dtype: str = "fp16"
) -> list[KernelCost]:
    """The kernels of one decoder layer (RMSNorm, QKV, RoPE, attention, O, RMSNorm, SwiGLU MLP)."""
    t = batch * query_tokens
    d, d_ff = model.d_model, model.d_ff
    return [
        elementwise(t * d, hw, dtype, reads=2, writes=2, flops_per_element=4, name="norm"),  # residual add + RMSNorm
        gemm(t, d + 2 * model.d_kv, d, hw, dtype, name="qkv"),
        elementwise(t * (d + model.d_kv), hw, dtype, flops_per_element=3, name="rope"),
        attention_decode(model, hw, batch, context_len, query_tokens, dtype),
        gemm(t, d, d, hw, dtype, name="o_proj"),
        elementwise(t * d, hw, dtype, reads=2, writes=2, flops_per_element=4, name="norm"),
        gemm(t, 2 * d_ff, d, hw, dtype, name="mlp_up"),  # W1 and W3 fused
        elementwise(t * d_ff, hw, dtype, reads=2, writes=1, flops_per_element=5, name="swiglu"),
        gemm(t, d, d_ff, hw, dtype, name="mlp_down"),
    ]


def forward(
    model: ModelSpec,
    hw: HardwareProfile,
    batch: int,
    context_len: int,
    query_tokens: int,
    dtype: str = "fp16",
    logits_tokens: int | None = None,
) -> dict[str, KernelCost]:
    """Cost of one forward pass, by kernel name, summed over layers, plus 'total'.

    `logits_tokens`: tokens that go through the LM head (default all query tokens; a prefill
    needs only the last token of each sequence)."""
    t = batch * query_tokens
    logits_tokens = t if logits_tokens is None else logits_tokens
    by_name: dict[str, KernelCost] = {}
    for k in layer_costs(model, hw, batch, context_len, query_tokens, dtype):
        scaled = k.scaled(model.n_layers)
        by_name[k.name] = by_name[k.name] + scaled if k.name in by_name else scaled
    by_name["embed"] = elementwise(t * model.d_model, hw, dtype, reads=1, writes=1, flops_per_element=0, name="embed")
    by_name["final_norm"] = elementwise(
        logits_tokens * model.d_model, hw, dtype, flops_per_element=4, name="final_norm"
    )
    by_name["lm_head"] = gemm(logits_tokens, model.vocab_size, model.d_model, hw, dtype, name="lm_head")
    total = None
    for k in by_name.values():
        total = k if total is None else total + k
    by_name["total"] = KernelCost("total", total.flops, total.hbm_bytes, total.time_s, total.launches)
    return by_name


def step_time_s(
    model: ModelSpec, hw: HardwareProfile, batch: int, context_len: int, query_tokens: int = 1, dtype: str = "fp16"
) -> float:
    """Seconds of one decode step (query_tokens = 1) or verify pass (query_tokens = gamma + 1)."""
    return forward(model, hw, batch, context_len, query_tokens, dtype)["total"].time_s


def prefill_time_s(model: ModelSpec, hw: HardwareProfile, batch: int, prompt_len: int, dtype: str = "fp16") -> float:
    """Seconds to process the prompts of `batch` sequences of `prompt_len` tokens (time to first token)."""
    return forward(model, hw, batch, 0, prompt_len, dtype, logits_tokens=batch)["total"].time_s


def weight_bytes(model: ModelSpec, dtype: str = "fp16") -> int:
    return model.n_params * DTYPE_BYTES[dtype]
