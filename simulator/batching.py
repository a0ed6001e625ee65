"""Speculative decoding under batching: where it stops paying as the batch grows.

A verify pass handles batch x (gamma + 1) tokens. While that stays under the profile's ridge
point the pass is memory-bound and costs about one decode step, so speculation is nearly free;
past it the pass costs compute in proportion and the speedup E[tokens] / (gamma c + t_verify/t_1)
falls below 1 (DESIGN: facts the cost model stands on).
"""

from __future__ import annotations

from simulator.forward import forward, step_time_s
from simulator.hardware import HardwareProfile
from simulator.models import ModelSpec
from simulator.speculative import expected_tokens


def speculative_speedup(
    target: ModelSpec,
    draft: ModelSpec | None,
    hw: HardwareProfile,
    alpha: float,
    gamma: int,
    batch: int,
    context_len: int,
    dtype: str = "fp16",
    tp: int = 1,
    draft_layers_fraction: float | None = None,
) -> float:
    """Tokens/s with speculation over tokens/s without, at one batch size.

    The draft is a separate model (`draft`) or, with `draft_layers_fraction`, the target itself
    with only that fraction of its layers (self-speculative layer skipping)."""
    t_ar = step_time_s(target, hw, batch, context_len, 1, dtype, tp)
    t_draft = draft_step_time_s(target, draft, hw, batch, context_len, dtype, tp, draft_layers_fraction)
    t_verify = step_time_s(target, hw, batch, context_len, gamma + 1, dtype, tp)
    return expected_tokens(alpha, gamma) * t_ar / (gamma * t_draft + t_verify)


def draft_step_time_s(
    target: ModelSpec,
    draft: ModelSpec | None,
    hw: HardwareProfile,
    batch: int,
    context_len: int,
    dtype: str = "fp16",
    tp: int = 1,
    draft_layers_fraction: float | None = None,
) -> float:
    """One draft step: a separate draft model (replicated on every GPU of the group, so tp = 1), or
    the target with a fraction of its layers."""
    if draft_layers_fraction is not None:
        layers = max(1, round(target.n_layers * draft_layers_fraction))
        skipped = target.model_copy(update={"n_layers": layers, "name": f"{target.name}-skip"})
        return step_time_s(skipped, hw, batch, context_len, 1, dtype, tp)
    if draft is None:
        return 0.0
    return step_time_s(draft, hw, batch, context_len, 1, dtype)


def crossover_batch(
    target: ModelSpec,
    draft: ModelSpec | None,
    hw: HardwareProfile,
    alpha: float,
    gamma: int,
    context_len: int,
    dtype: str = "fp16",
    max_batch: int = 4096,
    draft_layers_fraction: float | None = None,
) -> int | None:
    """Smallest batch size at which speculation no longer speeds decoding up (speedup <= 1),
    or None if it still pays at `max_batch`. Scans powers of two, then bisects."""

    def pays(b: int) -> bool:
        return speculative_speedup(target, draft, hw, alpha, gamma, b, context_len, dtype, 1, draft_layers_fraction) > 1.0

    if pays(max_batch):
        return None
    if not pays(1):
        return 1
    lo = 1
    while pays(lo * 2):
        lo *= 2
    hi = min(lo * 2, max_batch)
    while hi - lo > 1:  # pays(lo) and not pays(hi)
        mid = (lo + hi) // 2
        if pays(mid):
            lo = mid
        else:
            hi = mid
    return hi


def verify_roofline_points(
    target: ModelSpec, hw: HardwareProfile, gamma: int, batches: list[int], context_len: int, dtype: str = "fp16"
) -> list[dict]:
    """Arithmetic intensity and achieved FLOP/s of the verify pass (batch x (gamma+1) tokens)."""
    points = []
    for b in batches:
        total = forward(target, hw, b, context_len, gamma + 1, dtype)["total"]
        points.append(
            {
                "batch": b,
                "tokens": b * (gamma + 1),
                "intensity_flops_per_byte": total.intensity_flops_per_byte,
                "flops_per_s": total.flops / total.time_s,
                "time_s": total.time_s,
            }
        )
    return points
