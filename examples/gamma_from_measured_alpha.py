"""Which gamma (draft tokens per step) should I run, given the acceptance I measured?

From a measurement of how many drafts the target accepted per verify step (counts of 0..gamma_m
accepted), estimate alpha (with its standard error), then price every gamma with the cost model:
speedup = E[tokens per step] x t_decode / (gamma t_draft + t_verify(gamma + 1 tokens)). E comes
both from the fitted alpha, (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan et al. 2023), and from
the measured law itself. The best gamma shrinks as the batch grows (the verify pass turns
compute-bound). A short SimPy run checks the choice under load.

    python examples/gamma_from_measured_alpha.py [counts.json]    # {"accepted_length_counts": [...]}
    python examples/gamma_from_measured_alpha.py --small          # or EXAMPLES_SMALL=1
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from simulator.batching import draft_step_time_s
from simulator.forward import step_time_s
from simulator.hardware import load_profile
from simulator.models import load_model
from simulator.serving import AcceptanceModel, ServingConfig, simulate_serving
from simulator.simulate import load_acceptance
from simulator.speculative import expected_tokens
from simulator.workload import WorkloadSpec, make_stream

GPU = "a100"
TARGET = "llama-2-13b"
DRAFT = "tinyllama-1.1b"  # Llama-2 tokenizer, 32000 tokens
# Illustrative counts of 0..8 accepted drafts over 1000 verify steps at gamma 8 (not a measurement:
# they follow alpha = 0.65). Pass your own JSON in the same format as the first argument.
ACCEPTED_LENGTH_COUNTS = [350, 228, 148, 96, 62, 41, 26, 17, 32]
CONTEXT_TOKENS = 768  # mean context while decoding
BATCHES = (1, 16, 64, 256)  # sequences decoded together
DTYPE = "fp16"
RATE_PER_S = 6.0  # requests per second for the SimPy check
PROMPT_TOKENS = 512
OUTPUT_TOKENS = 256
REQUESTS = 400
SEED = 0

SMALL = {"BATCHES": (1, 64), "REQUESTS": 60}


def fitted_alpha(counts: list[float]) -> tuple[float, float]:
    """Maximum-likelihood alpha of i.i.d. acceptance from counts c_0..c_g of k accepted drafts:
    every draft position checked is a Bernoulli trial; a step with k < g accepted checked k + 1
    positions (k successes, one failure), one with k = g checked g. alpha = successes / trials."""
    g = len(counts) - 1
    successes = sum(k * c for k, c in enumerate(counts))
    failures = sum(counts[:g])
    trials = successes + failures
    alpha = successes / trials
    return alpha, math.sqrt(alpha * (1 - alpha) / trials)


def speedups(target, draft, hw, gamma: int, tokens_per_step: float, batch: int) -> float:
    t_ar = step_time_s(target, hw, batch, CONTEXT_TOKENS, 1, DTYPE)
    t_step = gamma * draft_step_time_s(target, draft, hw, batch, CONTEXT_TOKENS, DTYPE) + step_time_s(
        target, hw, batch, CONTEXT_TOKENS, gamma + 1, DTYPE
    )
    return tokens_per_step * t_ar / t_step


def main(small: bool = False, counts_path: str | None = None) -> int:
    batches = SMALL["BATCHES"] if small else BATCHES
    requests = SMALL["REQUESTS"] if small else REQUESTS
    measured = load_acceptance(counts_path) if counts_path else AcceptanceModel(kind="empirical", counts=ACCEPTED_LENGTH_COUNTS)
    counts = measured.counts if measured.kind == "empirical" else None
    hw, target, draft = load_profile(GPU), load_model(TARGET), load_model(DRAFT)
    if counts is not None:
        alpha, se = fitted_alpha(counts)
        gamma_max = len(counts) - 1
        print(f"measured: {int(sum(counts))} verify steps at gamma {gamma_max}; fitted alpha = {alpha:.3f} +- {se:.3f} (1 s.e.)")
    else:
        alpha, se, gamma_max = measured.alpha, 0.0, 8
        print(f"measured alpha = {alpha:.3f}")
    print(f"{TARGET} with draft {DRAFT} on {hw.name}, context {CONTEXT_TOKENS}, {DTYPE}")
    print()
    print(f"{'gamma':>5} {'E[tok] fit':>10} {'E[tok] law':>10}" + "".join(f" {'speedup@' + str(b):>12}" for b in batches))
    table = {}
    for gamma in range(gamma_max + 1):
        e_fit = expected_tokens(alpha, gamma)
        e_law = measured.mean_tokens(gamma) if counts is not None else e_fit
        table[gamma] = [speedups(target, draft, hw, gamma, e_law, b) for b in batches]
        print(f"{gamma:>5} {e_fit:>10.3f} {e_law:>10.3f}" + "".join(f" {s:>11.3f}x" for s in table[gamma]))
    print()
    best = {}
    for j, b in enumerate(batches):
        best[b] = max(table, key=lambda g, j=j: table[g][j])
        band = sorted({max(range(gamma_max + 1), key=lambda g, a=a: speedups(target, draft, hw, g, expected_tokens(a, g), b))
                       for a in (max(0.0, alpha - 2 * se), min(1.0, alpha + 2 * se))})  # fmt: skip
        print(f"batch {b}: best gamma {best[b]} ({table[best[b]][j]:.2f}x); over alpha +- 2 s.e.: gamma {' to '.join(map(str, band))}")

    # SimPy check at the serving load: gamma around the batch-1 choice
    g1 = best[batches[0]]
    print()
    print(f"SimPy check: {requests} Poisson requests at {RATE_PER_S:g}/s, prompt {PROMPT_TOKENS}, output {OUTPUT_TOKENS}")
    workload = WorkloadSpec(rate_per_s=RATE_PER_S, requests=requests, prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS)
    for gamma in sorted({0, max(1, g1 - 2), g1, min(gamma_max, g1 + 2)}):
        cfg = ServingConfig(gamma=gamma, dtype=DTYPE)
        rng_w, rng_a = (np.random.default_rng(s) for s in np.random.SeedSequence(SEED).spawn(2))
        r = simulate_serving(hw, target, draft if gamma else None, measured, cfg, make_stream(workload, rng_w), rng_a)
        tpot = r["latency_s"]["tpot"]
        print(f"  gamma {gamma}: TPOT p50 {tpot['p50'] * 1e3:.2f} ms, p99 {tpot['p99'] * 1e3:.2f} ms, mean batch {r['batch']['mean']:.1f}")
    print(f"Choose gamma {g1} at light load; gamma {best[batches[-1]]} if the batch runs near {batches[-1]}.")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    paths = [a for a in argv if not a.startswith("--")]
    sys.exit(main(small="--small" in argv or os.environ.get("EXAMPLES_SMALL") == "1", counts_path=paths[0] if paths else None))
