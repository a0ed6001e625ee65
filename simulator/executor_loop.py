"""What the reference executor's generation loops cost on a calibrated CPU profile: the passes of
`simulator.forward` plus the loops' own measured work (sampling, verification, cache bookkeeping)."""

from __future__ import annotations

from collections import Counter

from simulator import tree as trees
from simulator.errors import UserError
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
    configurations (`calibration.executor.loop_overhead_s`; 0 where not measured): `linear_s_per_token`
    at Leviathan's E."""
    return linear_s_per_token(target, hw, gamma, expected_tokens(alpha, gamma), prompt, new_tokens, draft=draft, dtype=dtype)


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


def tree_parts(
    target: ModelSpec, draft: ModelSpec | None, hw: HardwareProfile, tree, prompt: int, new_tokens: int,
    medusa_heads: int | None = None, dtype: str = "fp32",
) -> dict:  # fmt: skip
    """The priced parts of reference.tree_decode.tree_generate, batch 1: `prefill_s`, and per step
    `propose_s` and `verify_s`, with the tree's node count (`nodes`).

    `draft` None is Medusa: the proposer is the heads (`tree.medusa_heads_cost`, `medusa_heads` of
    them, default one per depth of the tree) and the prefill is the target's over P - 1 tokens
    twice (the loop's prefill, and `MedusaDraft.start` for the first hidden state); a draft model
    grows the tree level by level (`tree.draft_tree_cost`) after its prefill of P - 2 tokens. The
    verify pass reads N + 1 query tokens (the root and the N nodes) at the middle context P + n/2."""
    context = prompt + new_tokens // 2
    if draft is None:
        propose_s = trees.medusa_heads_cost(target, hw, 1, medusa_heads or trees.depth(tree), dtype).time_s
        verify_s = trees.verify_pass(target, hw, 1, context, len(tree), dtype)["total"].time_s
        prefill_s = 2 * step_time_s(target, hw, 1, 0, prompt - 1, dtype) if prompt > 1 else 0.0
    else:
        propose_s, verify_s = trees.tree_step_s(target, draft, hw, 1, context, tree, dtype)
        prefill_s = specdec_prefill_s(target, draft, hw, prompt, dtype)
    return {"prefill_s": prefill_s, "propose_s": propose_s, "verify_s": verify_s, "nodes": len(tree)}


def verify_iterations(tree) -> int:
    """Passes of `reference.tree.verify_tree`'s inner loop per step: it walks the D depths and at
    each tries the K slots of the widest node's children (vectorised over the batch, no early
    exit), so D x K fixed rounds of tensor work whatever is accepted."""
    fan_out = Counter(tuple(p[:-1]) for p in tree)
    return trees.depth(tree) * max(fan_out.values())


def tree_loop_overhead_s(hw: HardwareProfile, proposer: str, tree) -> float:
    """The tree loop's own seconds per step besides its passes: o_step + I o_iter with I the
    verifier's iterations (`verify_iterations`), fitted per proposer ("medusa" or "tree") by
    `calibrate` on its own tree runs (`calibration.executor.loop_overhead_s.tree`). A profile
    calibrated before that has none: the linear loop's o_step + D o_draft stands in."""
    o = _overheads(hw)
    fitted = (o.get("tree") or {}).get(proposer)
    if fitted:
        return fitted["per_step"] + verify_iterations(tree) * fitted["per_verify_iteration"]
    return o.get("per_step", 0.0) + (trees.depth(tree) if proposer == "tree" else 0) * o.get("per_draft_token", 0.0)


def tree_s_per_token(
    target: ModelSpec, draft: ModelSpec | None, hw: HardwareProfile, tree, tokens_per_step: float, prompt: int, new_tokens: int,
    medusa_heads: int | None = None, dtype: str = "fp32",
) -> float:  # fmt: skip
    """Seconds per generated token of reference.tree_decode.tree_generate, batch 1, priced by the
    simulator's tree pricing (`tree_parts`) and the tree loop's calibrated work (`tree_loop_overhead_s`):

        t = [prefill + steps (t_propose + t_verify(N + 1 tokens) + o_step + I o_iter)] / n,  steps = n / E[tokens per step]

    E[tokens per step] is the acceptance's (a measured run's table, or its own count of steps)."""
    parts = tree_parts(target, draft, hw, tree, prompt, new_tokens, medusa_heads, dtype)
    overhead_s = tree_loop_overhead_s(hw, "medusa" if draft is None else "tree", tree)
    step_s = parts["propose_s"] + parts["verify_s"] + overhead_s
    return (parts["prefill_s"] + new_tokens / tokens_per_step * step_s) / new_tokens


def linear_s_per_token(
    target: ModelSpec, hw: HardwareProfile, gamma: int, tokens_per_step: float, prompt: int, new_tokens: int,
    draft: ModelSpec | None = None, host_draft_s: float = 0.0, dtype: str = "fp32",
) -> float:  # fmt: skip
    """Seconds per generated token of reference.specdec.speculative_generate, batch 1, from a
    measured tokens per step (accepted + 1):

        t = [prefill + steps (t_propose + t_verify(gamma + 1) + o_step)] / n,  steps = n / tokens_per_step

    A model draft (`draft`: a small model, or the target's first layers as their own spec) proposes
    with gamma decode steps plus the calibrated o_draft each; a host draft (prompt lookup,
    retrieval: `draft` None) costs its measured seconds per step `host_draft_s`, no model pass."""
    o = _overheads(hw)
    context = prompt + new_tokens // 2
    if draft is not None:
        propose_s = gamma * (step_time_s(draft, hw, 1, context, 1, dtype) + o.get("per_draft_token", 0.0))
        prefill_s = specdec_prefill_s(target, draft, hw, prompt, dtype)
    else:
        propose_s = host_draft_s
        prefill_s = step_time_s(target, hw, 1, 0, prompt - 1, dtype) if prompt > 1 else 0.0
    step_s = propose_s + step_time_s(target, hw, 1, context, gamma + 1, dtype) + o.get("per_step", 0.0)
    return (prefill_s + new_tokens / tokens_per_step * step_s) / new_tokens


BILD_RATES = ("small_steps_per_token", "big_passes_per_token", "big_query_tokens_per_pass")


def bild_s_per_token(target: ModelSpec, small: ModelSpec, hw: HardwareProfile, rates: dict, prompt: int, new_tokens: int,
                     dtype: str = "fp32") -> float:  # fmt: skip
    """Seconds per generated token of reference.bild.bild_generate (Kim et al. 2023), batch 1, from
    its measured rates per generated token:

        t = [prefill + n (s t_small(1) + b t_big(k) + s o_draft + b o_step)] / n

    s small-model steps per token (each one decode step and one draw: o_draft, the calibrated loop
    overhead per drafted token), b big-model passes per token over k query tokens each (the small
    tokens they check, rolled back or kept, plus one; o_step, the overhead per verify step), at the
    middle context; the prefills are the big model's over P - 1 tokens and the small model's
    first step over the whole prompt."""
    for key in BILD_RATES:
        if not (isinstance(rates.get(key), (int, float)) and rates[key] >= 0):
            raise UserError(f"BiLD rates: {key} must be a number >= 0, got {rates.get(key)!r}")
    o = _overheads(hw)
    context = prompt + new_tokens // 2
    s, b, k = rates["small_steps_per_token"], rates["big_passes_per_token"], max(1.0, rates["big_query_tokens_per_pass"])
    lo = int(k)  # a mean of k query tokens: the pass's time interpolated between the whole counts around it
    big_s = step_time_s(target, hw, 1, context, lo, dtype) * (lo + 1 - k) + step_time_s(target, hw, 1, context, lo + 1, dtype) * (k - lo)
    per_token_s = s * (step_time_s(small, hw, 1, context, 1, dtype) + o.get("per_draft_token", 0.0)) + b * (big_s + o.get("per_step", 0.0))
    prefill_s = (step_time_s(target, hw, 1, 0, prompt - 1, dtype) if prompt > 1 else 0.0) + step_time_s(small, hw, 1, 0, prompt, dtype)
    return (prefill_s + new_tokens * per_token_s) / new_tokens


def host_tree_s_per_token(target: ModelSpec, hw: HardwareProfile, tree, tokens_per_step: float, prompt: int, new_tokens: int,
                          host_propose_s: float, dtype: str = "fp32") -> float:  # fmt: skip
    """Seconds per generated token of reference.tree_decode.tree_generate with a tree proposed on
    the host (retrieval: `reference.retrieval.RetrievalTreeDraft`), batch 1: its measured seconds
    per proposal, no model pass, then the verify pass over N + 1 query tokens (`tree.verify_pass`)
    and the tree loop's calibrated work per step for fixed candidates (`tree_loop_overhead_s`, as
    fitted on Medusa's point-mass trees, whose loop is the same but for the heads):

        t = [prefill_target(P - 1) + steps (t_host + t_verify(N + 1) + o_step + I o_iter)] / n,  steps = n / E[tokens per step]"""
    context = prompt + new_tokens // 2
    verify_s = trees.verify_pass(target, hw, 1, context, len(tree), dtype)["total"].time_s
    prefill_s = step_time_s(target, hw, 1, 0, prompt - 1, dtype) if prompt > 1 else 0.0
    step_s = host_propose_s + verify_s + tree_loop_overhead_s(hw, "medusa", tree)
    return (prefill_s + new_tokens / tokens_per_step * step_s) / new_tokens
