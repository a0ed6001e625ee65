"""What the reference executor's generation loops cost on a calibrated CPU profile: the passes of
`simulator.forward` plus the loops' own measured work (sampling, verification, cache bookkeeping)."""

from __future__ import annotations

from simulator.forward import step_time_s
from simulator.hardware import HardwareProfile
from simulator.models import ModelSpec
from simulator.speculative import expected_tokens


def _overheads(hw: HardwareProfile) -> dict:
    return ((hw.calibration or {}).get("executor") or {}).get("loop_overhead_s") or {}


def speculative_s_per_token(
    target: ModelSpec, draft: ModelSpec, hw: HardwareProfile, alpha: float, gamma: int, prompt: int, new_tokens: int,
    dtype: str = "fp32",
) -> float:  # fmt: skip
    """Seconds per generated token of reference.specdec.speculative_generate with a model draft, batch 1:

        t = [prefill_target(P - 1) + prefill_draft(P - 2) + steps (gamma t_draft + t_verify + o_step + gamma o_draft)] / n
        steps = n / E[tokens per step],  E = (1 - alpha^(gamma+1)) / (1 - alpha)  (Leviathan et al. 2023)

    t_draft: a draft decode step, t_verify: a target pass over gamma + 1 tokens, both at the middle
    context P + n/2 (simulator.forward); o_step and o_draft: the loop's own work per step and per
    drafted token (sampling, verification, cache bookkeeping), measured by `calibrate` on its own
    configurations (`calibration.executor.loop_overhead_s`; 0 where not measured)."""
    o = _overheads(hw)
    context = prompt + new_tokens // 2
    step_s = (gamma * step_time_s(draft, hw, 1, context, 1, dtype) + step_time_s(target, hw, 1, context, gamma + 1, dtype)
              + o.get("per_step", 0.0) + gamma * o.get("per_draft_token", 0.0))  # fmt: skip
    steps = new_tokens / expected_tokens(alpha, gamma)
    return (specdec_prefill_s(target, draft, hw, prompt, dtype) + steps * step_s) / new_tokens


def specdec_prefill_s(target: ModelSpec, draft: ModelSpec, hw: HardwareProfile, prompt: int, dtype: str = "fp32") -> float:
    """The target prefills all but the last prompt token, the draft all but the last two (reference.specdec)."""
    t_s = step_time_s(target, hw, 1, 0, prompt - 1, dtype) if prompt > 1 else 0.0
    return t_s + (step_time_s(draft, hw, 1, 0, prompt - 2, dtype) if prompt > 2 else 0.0)


def autoregressive_s_per_token(target: ModelSpec, hw: HardwareProfile, prompt: int, new_tokens: int, dtype: str = "fp32") -> float:
    """Seconds per generated token of reference.specdec.autoregressive_generate, batch 1: a prefill of
    the prompt, then n - 1 decode steps at the middle context, each with the loop's measured
    sampling overhead o_token (`calibration.executor.loop_overhead_s.per_token`)."""
    step_s = step_time_s(target, hw, 1, prompt + new_tokens // 2, 1, dtype) + _overheads(hw).get("per_token", 0.0)
    return (step_time_s(target, hw, 1, 0, prompt, dtype) + (new_tokens - 1) * step_s) / new_tokens
