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

from simulator.eager import ExecutorFacts, pass_gemm, sdpa_cpu_q_split
from simulator.errors import UserError
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.models import ModelSpec
from simulator.roofline import KernelCost, elementwise, roofline_time_s


def all_reduce(n_bytes: float, hw: HardwareProfile, tp: int, name: str = "all_reduce") -> KernelCost:
    """Ring all-reduce of `n_bytes` over `tp` GPUs: each GPU sends and receives 2 (tp-1)/tp of the
    buffer (Patarasuk & Yuan 2009) at half the profile's total link bandwidth per direction."""
    if tp == 1:
        return KernelCost(name, 0.0, 0.0, 0.0, launches=0)
    if hw.interconnect_bytes_per_s is None:
        raise UserError(f"{hw.name} has no interconnect bandwidth: tensor parallelism needs one")
    per_direction_bytes_per_s = hw.interconnect_bytes_per_s / 2 * hw.achievable.bandwidth
    moved = 2.0 * (tp - 1) / tp * n_bytes
    return KernelCost(name, 0.0, 0.0, moved / per_direction_bytes_per_s + hw.launch_overhead_s)


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    """KV heads each GPU holds: split when there are at least `tp`, else one replicated head."""
    return max(1, model.n_kv_heads // tp)


def attention_decode(
    model: ModelSpec,
    hw: HardwareProfile,
    batch: int,
    context_len: int,
    query_tokens: int,
    dtype: str = "fp16",
    tp: int = 1,
) -> KernelCost:
    """Attention of `query_tokens` new tokens per sequence over the cache plus themselves, one layer.

    Reads K, V of every cached and new position once per KV head (GQA groups share them), reads Q
    and writes O; writes the new tokens' K, V into the cache. FLOPs 4 B H q (ctx + q) d_head.
    """
    e = DTYPE_BYTES[dtype]
    keys = context_len + query_tokens
    tokens = batch * query_tokens
    d_kv = kv_heads_per_gpu(model, tp) * model.d_head
    heads = model.n_heads // tp
    kv_read = 2 * batch * keys * d_kv * e
    kv_write = 2 * tokens * d_kv * e
    q_o = 2 * tokens * heads * model.d_head * e
    hbm_bytes = float(kv_read + kv_write + q_o)
    flops = 4.0 * batch * heads * query_tokens * keys * model.d_head
    time_s = roofline_time_s(flops, hbm_bytes, hw, dtype, hw.achievable.attention)
    # a CPU profile calibrated with torch's fused kernel (simulator.eager): the softmax over every
    # score tile (max, exp, sum) costs more than its FLOPs on the vector units, and every
    # (sequence, head, query block) program has a fixed cost; both priced at their measured rates
    facts = ExecutorFacts.of(hw)
    time_s += batch * heads * query_tokens * keys * facts.softmax_s_per_element
    time_s += batch * heads * -(-query_tokens // sdpa_cpu_q_split(query_tokens)) * facts.sdpa_program_s
    return KernelCost("attention", flops, hbm_bytes, time_s)


def layer_costs(
    model: ModelSpec,
    hw: HardwareProfile,
    batch: int,
    context_len: int,
    query_tokens: int,
    dtype: str = "fp16",
    tp: int = 1,
) -> list[KernelCost]:
    """The kernels of one decoder layer on one GPU of a `tp`-way group (RMSNorm, QKV, RoPE,
    attention, O, all-reduce, RMSNorm, SwiGLU MLP, all-reduce)."""
    t = batch * query_tokens
    d, d_ff = model.d_model, model.d_ff
    d_q = model.n_heads // tp * model.d_head  # this GPU's query heads
    d_kv = kv_heads_per_gpu(model, tp) * model.d_head
    activations = t * d * DTYPE_BYTES[dtype]
    facts = ExecutorFacts.of(hw)
    rope = elementwise(t * (d_q + d_kv), hw, dtype, flops_per_element=3, name="rope")
    swiglu = elementwise(t * d_ff // tp, hw, dtype, reads=2, writes=1, flops_per_element=5, name="swiglu")
    attention = attention_decode(model, hw, batch, context_len, query_tokens, dtype, tp)
    # a CPU calibrated with the executor (simulator.eager): RoPE's complex product, SiLU's exp and
    # the scatter of the new K and V into the cache run below memory speed, at their measured rates
    rope = replace(rope, time_s=max(rope.time_s, t * (d_q + d_kv) // 2 * facts.rope_s_per_element + hw.launch_overhead_s))
    swiglu = replace(swiglu, time_s=swiglu.time_s + t * d_ff // tp * facts.silu_s_per_element)
    attention = replace(attention, time_s=attention.time_s + 2 * t * d_kv * facts.scatter_s_per_element)
    norm = elementwise(t * d, hw, dtype, reads=2, writes=2, flops_per_element=4, name="norm")  # residual add + RMSNorm
    norm = replace(norm, time_s=norm.time_s + t * d * facts.rms_norm_s_per_element)
    return [
        norm,
        pass_gemm(t, d_q + 2 * d_kv, d, hw, dtype, name="qkv"),
        rope,
        attention,
        pass_gemm(t, d, d_q, hw, dtype, name="o_proj"),
        all_reduce(activations, hw, tp),
        norm,
        pass_gemm(t, 2 * d_ff // tp, d, hw, dtype, name="mlp_up"),  # W1 and W3 fused
        swiglu,
        pass_gemm(t, d, d_ff // tp, hw, dtype, name="mlp_down"),
        all_reduce(activations, hw, tp),
    ]


def forward(
    model: ModelSpec,
    hw: HardwareProfile,
    batch: int,
    context_len: int,
    query_tokens: int,
    dtype: str = "fp16",
    logits_tokens: int | None = None,
    tp: int = 1,
) -> dict[str, KernelCost]:
    """Cost of one forward pass on each GPU of a `tp`-way group, by kernel name, summed over
    layers, plus 'total'.

    `logits_tokens`: tokens that go through the LM head (default all query tokens; a prefill
    needs only the last token of each sequence)."""
    check_tp(model, tp)
    t = batch * query_tokens
    logits_tokens = t if logits_tokens is None else logits_tokens
    by_name: dict[str, KernelCost] = {}
    for k in layer_costs(model, hw, batch, context_len, query_tokens, dtype, tp):
        scaled = k.scaled(model.n_layers)
        by_name[k.name] = by_name[k.name] + scaled if k.name in by_name else scaled
    by_name["embed"] = elementwise(t * model.d_model, hw, dtype, reads=1, writes=1, flops_per_element=0, name="embed")
    # the executor's additive mask [B, 1, T, context + T], built once per pass (0 without a measured rate)
    mask_s = t * (context_len + query_tokens) * ExecutorFacts.of(hw).mask_s_per_element
    by_name["embed"] = replace(by_name["embed"], time_s=by_name["embed"].time_s + mask_s)
    by_name["final_norm"] = elementwise(
        logits_tokens * model.d_model, hw, dtype, flops_per_element=4, name="final_norm"
    )
    by_name["lm_head"] = pass_gemm(logits_tokens, -(-model.vocab_size // tp), model.d_model, hw, dtype, name="lm_head")
    total = None
    for k in by_name.values():
        total = k if total is None else total + k
    # an eager executor pays the fixed overhead for each of the several operators one kernel stands for
    eager_s = (hw.ops_per_kernel - 1.0) * total.launches * hw.launch_overhead_s
    facts = ExecutorFacts.of(hw)
    if facts.op_s_hot and facts.op_s_cold:
        # a CPU calibrated with the executor: each operator costs what it was measured to cost in
        # the executor's forward pass, warm, plus the cold penalty in proportion to the share of a
        # core's cache (`sram_bytes_per_sm` on a CPU) each layer's weight stream evicts (all of it
        # once a layer's weights overflow it)
        layer_bytes = -(-model.params_per_layer * DTYPE_BYTES[dtype] // tp)
        evicted = min(1.0, layer_bytes / hw.sram_bytes_per_sm)
        op_s = (facts.op_s_hot + evicted * (facts.op_s_cold - facts.op_s_hot)) * facts.pass_op_scale
        eager_s = hw.ops_per_kernel * total.launches * op_s - total.launches * hw.launch_overhead_s
    by_name["total"] = KernelCost("total", total.flops, total.hbm_bytes, total.time_s + eager_s, total.launches)
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
