"""`plan`: what decoding one model looks like on one GPU, with and without speculative decoding,
and how FlashAttention tiles there. A library function that returns data; `format_plan` prints it."""

from __future__ import annotations

import bisect

from simulator.attention import attention_summary
from simulator.device_model import device_model
from simulator.errors import UserError
from simulator.forward import forward, kv_bytes_per_token, step_time_s, weight_bytes
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.models import ModelSpec
from simulator.speculative import SpecDecResult, SpecDecRow, expected_tokens, walltime_improvement
from simulator.workload import MAX_TOKENS

DEFAULT_GPU = "a100"
DEFAULT_TARGET = "llama-2-7b"
DEFAULT_DRAFT = "llama-68m"  # shares Llama-2's 32000-token vocabulary (SpecInfer's draft)
# An assumed acceptance rate, not a measurement: Leviathan et al. (2023, Table 3) report alpha
# from 0.5 to 0.9 across their model pairs. Measure your own pair with `python -m reference specdec`.
DEFAULT_ALPHA = 0.7
DEFAULT_GAMMA_MAX = 8  # the table spans at least 0..8
GAMMA_SEARCH_MAX = 32  # the recommended gamma is searched over 0..32


def check_plan_inputs(alpha: float, gamma: int | None, batch: int, prompt_len: int, output_len: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must lie in [0, 1], got {alpha}")
    if gamma is not None and gamma < 0:
        raise UserError(f"--gamma must be >= 0, got {gamma}")
    for flag, count in (("--batch", batch), ("--prompt-len", prompt_len), ("--output-len", output_len)):
        if count < 1:
            raise UserError(f"{flag} must be >= 1, got {count}")
        if count > MAX_TOKENS:  # past it a float no longer keeps the count whole
            raise UserError(f"{flag} must be at most 2**53, got {count}")


def check_gamma_fits(gamma: int, prompt_len: int, output_len: int, *models: ModelSpec) -> None:
    """The last verify pass reads prompt + output + gamma positions and writes one more: each model
    must hold them."""
    for model in models:
        room = model.max_seq_len - prompt_len - output_len - 1
        if gamma > room:
            why = f"at most {room} fits" if room >= 0 else "the prompt and output alone exceed it"
            raise UserError(f"--gamma {gamma} is too large for the context: prompt {prompt_len} + output {output_len} + gamma + 1 "
                            f"exceed {model.name}'s {model.max_seq_len} positions ({why})")


def memory_bound_until_tokens(model: ModelSpec, hw: HardwareProfile, dtype: str = "fp16", limit: int = 1 << 16) -> int:
    """Smallest token count T at which the largest weight GEMM (the MLP up-projection) of a pass
    turns compute-bound: 2 T k n / (P f_mm) >= bytes / (BW f_bw). Below it, more query tokens per
    pass (a longer verify) cost almost nothing; above it they cost in proportion."""
    k, n = model.d_model, 2 * model.d_ff
    e = DTYPE_BYTES[dtype]
    peak = hw.peak_flops(dtype) * hw.achievable.matmul
    bw = hw.hbm_bytes_per_s * hw.achievable.bandwidth

    def compute_bound(t: int) -> bool:
        return 2.0 * t * k * n / peak >= e * (t * k + k * n + t * n) / bw

    if not compute_bound(limit):
        return limit
    return 1 + bisect.bisect_left(range(1, limit + 1), True, key=compute_bound)  # compute_bound is monotone in t


def build_plan(
    hw: HardwareProfile,
    target: ModelSpec,
    draft: ModelSpec,
    alpha: float = DEFAULT_ALPHA,
    gamma: int | None = None,
    batch: int = 1,
    prompt_len: int = 512,
    output_len: int = 256,
    dtype: str = "fp16",
) -> dict:
    """Predicted decoding of `target` on `hw`, autoregressive and speculative with `draft`.

    Decode steps are priced at the mean context of the generation, prompt_len + output_len / 2
    (a decode step's time is linear in context while it is memory-bound)."""
    check_plan_inputs(alpha, gamma, batch, prompt_len, output_len)
    if draft.vocab_size != target.vocab_size:
        raise UserError(f"draft {draft.name} has vocabulary {draft.vocab_size}, target {target.name} has {target.vocab_size}; speculative decoding needs one vocabulary")
    if prompt_len + output_len > target.max_seq_len:  # the rule the serving simulation applies to a request
        raise UserError(f"--prompt-len {prompt_len} + --output-len {output_len} exceed {target.name}'s {target.max_seq_len} positions")
    if gamma is not None:
        check_gamma_fits(gamma, prompt_len, output_len, target)
    context_len = prompt_len + output_len // 2
    target_step = forward(target, hw, batch, context_len, 1, dtype)
    draft_step = forward(draft, hw, batch, context_len, 1, dtype)["total"]
    t_target_s, t_draft_s = target_step["total"].time_s, draft_step.time_s
    c = t_draft_s / t_target_s
    ar_tokens_per_s = batch / t_target_s

    rows = []
    for g in range(max(GAMMA_SEARCH_MAX, gamma or 0) + 1):
        step_s = g * t_draft_s + step_time_s(target, hw, batch, context_len, g + 1, dtype)
        tokens = expected_tokens(alpha, g)
        tokens_per_s = batch * tokens / step_s
        rows.append(
            SpecDecRow(
                gamma=g,
                expected_tokens_per_step=tokens,
                tokens_per_s=tokens_per_s,
                speedup=tokens_per_s / ar_tokens_per_s,
                speedup_formula=walltime_improvement(alpha, g, c),
            )
        )
    best = max(rows, key=lambda r: (r.speedup, -r.gamma))
    shown = max(DEFAULT_GAMMA_MAX, best.gamma, gamma or 0)
    chosen = rows[gamma if gamma is not None else best.gamma]
    rows = rows[: shown + 1]
    spec = SpecDecResult(
        kind="predicted",
        device=hw.name,
        target=target.name,
        draft=draft.name,
        alpha=alpha,
        c=c,
        autoregressive_tokens_per_s=ar_tokens_per_s,
        rows=rows,
        best_gamma=best.gamma,
    )
    prefill = forward(target, hw, batch, 0, prompt_len, dtype, logits_tokens=batch)["total"]
    ttft_s = prefill.time_s
    decode_s = output_len / (chosen.tokens_per_s / batch)
    verify = forward(target, hw, batch, context_len, chosen.gamma + 1, dtype)["total"]
    steps = output_len / chosen.expected_tokens_per_step
    intervals = {}
    if target_step["total"].low_s is not None:
        intervals = {
            "prefill_time_s": interval(prefill.low, prefill.high),
            "target_step_time_s": interval(target_step["total"].low, target_step["total"].high),
            "draft_step_time_s": interval(draft_step.low, draft_step.high),
            "autoregressive_tokens_per_s": interval(batch / target_step["total"].high, batch / target_step["total"].low),
            "request_latency_s": interval(prefill.low + steps * (chosen.gamma * draft_step.low + verify.low),
                                          prefill.high + steps * (chosen.gamma * draft_step.high + verify.high)),
        }  # fmt: skip
    memory = weight_bytes(target, dtype) + weight_bytes(draft, dtype)
    kv = batch * (prompt_len + output_len) * (kv_bytes_per_token(target, dtype) + kv_bytes_per_token(draft, dtype))
    return {
        "gpu": {
            "name": hw.name,
            "hbm_bytes_per_s": hw.hbm_bytes_per_s,
            "peak_flops_per_s": hw.peak_flops(dtype),
            "sram_bytes_per_sm": hw.sram_bytes_per_sm,
            "memory_bytes": hw.memory_bytes,
            "ridge_flops_per_byte": hw.ridge_flops_per_byte(dtype),
            "estimates": list(hw.estimates),
        },
        "target": target.name,
        "draft": draft.name,
        "dtype": dtype,
        "alpha": alpha,
        "batch": batch,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "context_len_mean": context_len,
        "weights_and_kv_bytes": memory + kv,
        "fits_in_memory": memory + kv <= hw.memory_bytes,
        "prefill_time_s": ttft_s,
        "target_step_time_s": t_target_s,
        "draft_step_time_s": t_draft_s,
        "target_step_breakdown_s": {k: v.time_s for k, v in target_step.items() if k != "total"},
        "autoregressive_tokens_per_s": ar_tokens_per_s,
        "speculative": spec.model_dump(),
        "recommended_gamma": best.gamma,
        "chosen_gamma": chosen.gamma,
        "request_latency_s": ttft_s + decode_s,
        "verify_compute_bound_from_tokens": memory_bound_until_tokens(target, hw, dtype),
        "attention": attention_summary(batch, target.n_heads, prompt_len, target.d_head, hw, causal=True, dtype=dtype),
        "intervals": intervals,
        "kernel_model": kernel_model_of(hw),
    }


def kernel_model_of(hw: HardwareProfile) -> dict | None:
    """Where a GPU stands with the shipped kernel model's fit (`GpuDeviceModel.provenance`); None
    for a CPU profile, which the kernel model does not price."""
    return device_model(hw).provenance() if hw.kind == "gpu" else None


def fitted_on_text(kernel_model: dict) -> str:
    """`fitted on A100-80GB-SXM, GB200, ...`: the GPUs whose tables the kernel model was fitted on."""
    return f"fitted on {', '.join(kernel_model['fitted_on']) or 'no measured GPU (start values)'}"


def standing_text(name: str, kernel_model: dict) -> str:
    """Where GPU `name` stands with the GPUs the kernel model was fitted on."""
    if kernel_model["measured"]:
        return f"{name} is one of them"
    same = kernel_model["generation_measured_on"]
    if same:
        return f"{name} is not: it takes its generation's ({kernel_model['generation']}) values, fitted on {', '.join(same)}"
    kin = kernel_model.get("mma_class_measured_on")
    if kin:
        return (f"{name} is not, nor is any {kernel_model['generation']} GPU: it takes the tensor-core efficiencies of its class "
                f"({kernel_model['mma_class']}), fitted on {', '.join(kin)}, and the values common to every generation")  # fmt: skip
    return f"{name} is not, nor is any {kernel_model['generation']} GPU: it takes the values common to every generation"


def format_provenance(name: str, kernel_model: dict) -> str:
    """One line: the GPUs the kernel model was fitted on, and where `name` stands with them."""
    return f"{fitted_on_text(kernel_model)}; {standing_text(name, kernel_model)}"


INTERVAL_LEVEL = 0.8


def interval(low: float, high: float) -> dict:
    """An 80% prediction interval: the kernels' times scaled by the bounds of measured / predicted
    on held-out GPUs (`simulator validate`, leave-one-GPU-out; `validate.interval_bounds`) of their kinds."""
    return {"low": float(low), "high": float(high), "level": INTERVAL_LEVEL}


def with_interval(value: float, band: dict | None, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """`12.34 ms (80%: 11.02-14.10)` (the interval omitted where the device model has none)."""
    text = f"{value * scale:.{digits}f}{' ' + unit if unit else ''}"
    if band:
        text += f" (80%: {band['low'] * scale:.{digits}f}-{band['high'] * scale:.{digits}f})"
    return text


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "u"), (1e-9, "n")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_plan(plan: dict) -> str:
    gpu, spec, att, iv = plan["gpu"], plan["speculative"], plan["attention"], plan.get("intervals", {})
    lines = [
        f"GPU       {gpu['name']}: {_si(gpu['hbm_bytes_per_s'], 'B/s')} memory bandwidth, "
        f"{_si(gpu['peak_flops_per_s'], 'FLOP/s')} {plan['dtype']} peak, ridge {gpu['ridge_flops_per_byte']:.0f} FLOP/B"
        + (f" (estimates: {', '.join(gpu['estimates'])})" if gpu["estimates"] else ""),
        *([f"Kernels   {format_provenance(gpu['name'], plan['kernel_model'])}"] if plan.get("kernel_model") else []),
        f"Workload  target {plan['target']}, draft {plan['draft']}, alpha {plan['alpha']:g} (assumed), batch {plan['batch']}, "
        f"prompt {plan['prompt_len']}, output {plan['output_len']} tokens, {plan['dtype']}",
        f"Memory    weights + KV cache {_si(plan['weights_and_kv_bytes'], 'B')} of {_si(gpu['memory_bytes'], 'B')}"
        + ("" if plan["fits_in_memory"] else "  DOES NOT FIT"),
        "",
        f"Prefill (time to first token)   {with_interval(plan['prefill_time_s'], iv.get('prefill_time_s'), 1e3, unit='ms')}",
        f"Decode step at context {plan['context_len_mean']}: target {with_interval(plan['target_step_time_s'], iv.get('target_step_time_s'), 1e3, 3, 'ms')}, "
        f"draft {with_interval(plan['draft_step_time_s'], iv.get('draft_step_time_s'), 1e3, 3, 'ms')}, cost ratio c = {spec['c']:.4f}",
        f"Autoregressive                  {with_interval(plan['autoregressive_tokens_per_s'], iv.get('autoregressive_tokens_per_s'), 1.0, 1, 'tokens/s')}",
        "",
        "Speculative decoding (cost model: gamma draft steps + one verify pass of gamma+1 tokens)",
        f"  {'gamma':>5}  {'tokens/step':>11}  {'tokens/s':>10}  {'speedup':>8}  {'Leviathan formula':>17}",
    ]
    for r in spec["rows"]:
        mark = "  <- recommended" if r["gamma"] == plan["recommended_gamma"] else ""
        if r["gamma"] == plan["chosen_gamma"] and plan["chosen_gamma"] != plan["recommended_gamma"]:
            mark = "  <- chosen"
        lines.append(
            f"  {r['gamma']:>5}  {r['expected_tokens_per_step']:>11.3f}  {r['tokens_per_s']:>10.1f}  "
            f"{r['speedup']:>7.3f}x  {r['speedup_formula']:>16.3f}x{mark}"
        )
    lines += [
        f"Recommended gamma {plan['recommended_gamma']}; request latency at gamma {plan['chosen_gamma']}: "
        f"{with_interval(plan['request_latency_s'], iv.get('request_latency_s'), 1e3, 1, 'ms')}",
        f"The verify pass stays memory-bound up to ~{plan['verify_compute_bound_from_tokens']} tokens per pass "
        f"(batch x (gamma+1)); past that, speculation costs compute in proportion.",
        "",
        f"Attention at the prompt (batch {att['shape']['batch']}, {att['shape']['heads']} heads, N = {att['shape']['seqlen']}, "
        f"d = {att['shape']['head_dim']}, causal, {att['shape']['dtype']})",
        f"  SRAM {att['sram_bytes'] // 1024} KiB/SM -> blocks Br = {att['block_rows_br']}, Bc = {att['block_cols_bc']} "
        f"(paper ceil(M/4d) = {att['block_cols_bc_paper']}); working set {att['sram_working_set_bytes'] // 1024} KiB",
        f"  {'':<22}{'HBM bytes':>12}  {'time':>10}",
    ]
    for key, label in (("standard", "standard"), ("flash_fa1", "FlashAttention (FA1)"), ("flash_fa2", "FlashAttention-2")):
        lines.append(f"  {label:<22}{_si(att[key]['hbm_bytes'], 'B'):>12}  {att[key]['time_s'] * 1e6:>8.1f} us")
    lines.append(f"  standard moves {att['hbm_bytes_ratio_standard_over_fa2']:.1f}x the HBM bytes of FlashAttention-2")
    return "\n".join(lines)


def profiles_table(profiles: dict[str, HardwareProfile], dtype: str = "fp16") -> list[dict]:
    return [
        {
            "name": p.name,
            "aliases": p.aliases,
            "sm_count": p.sm_count,
            "sram_bytes_per_sm": p.sram_bytes_per_sm,
            "memory_bytes": p.memory_bytes,
            "hbm_bytes_per_s": p.hbm_bytes_per_s,
            "peak_flops_per_s": p.peak_flops(dtype),
            "ridge_flops_per_byte": p.ridge_flops_per_byte(dtype),
            "estimates": len(p.estimates),
            "kernel_model": kernel_model_of(p),
        }
        for p in profiles.values()
    ]


def fit_column(kernel_model: dict | None) -> str:
    """`measured`, `via L40S` (a measured GPU of its generation), `common` (none: the values common
    to every generation), `-` on a CPU."""
    if kernel_model is None:
        return "-"
    if kernel_model["measured"]:
        return "measured"
    if kernel_model["generation_measured_on"]:
        return f"via {', '.join(kernel_model['generation_measured_on'])}"
    return f"common, {kernel_model['mma_class']}" if kernel_model.get("mma_class_measured_on") else "common"


def format_profiles(rows: list[dict]) -> str:
    width = max([16, *(len(r["name"]) for r in rows)])
    fits = [fit_column(r.get("kernel_model")) for r in rows]
    fit_width = max([10, *(len(f) for f in fits)])
    head = (f"{'name':<{width}} {'SMs':>4} {'SRAM/SM':>8} {'memory':>9} {'bandwidth':>11} {'fp16 peak':>13} {'ridge':>7} {'estimates':>9}  "
            f"{'kernel fit':<{fit_width}}  aliases")  # fmt: skip
    out = [head]
    for r, fit in zip(rows, fits, strict=True):
        out.append(
            f"{r['name']:<{width}} {r['sm_count']:>4} {r['sram_bytes_per_sm'] // 1024:>5} KiB "
            f"{r['memory_bytes'] / 2**30:>5.0f} GiB {_si(r['hbm_bytes_per_s'], 'B/s'):>11} {_si(r['peak_flops_per_s'], 'FLOP/s'):>13} "
            f"{r['ridge_flops_per_byte']:>7.0f} {r['estimates']:>9}  {fit:<{fit_width}}  {', '.join(r['aliases'])}"
        )
    rules = ("kernel fit: measured, the kernel model was fitted on this GPU's tables; via X, on X's, a GPU of its generation, "
             "whose fitted values it takes; common, on no GPU of its generation: the values common to every generation "
             "(common, mma.sync: but the tensor-core efficiencies of the measured GPUs of its tensor-core class)")  # fmt: skip
    return "\n".join([*out, "", rules])
