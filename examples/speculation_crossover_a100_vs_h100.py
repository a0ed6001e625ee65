"""At what batch size does speculative decoding stop helping, on an A100 and on an H100?

A verify pass carries batch x (gamma + 1) tokens. While that stays under the GPU's roofline ridge
(peak FLOP/s over memory bandwidth) the pass is memory-bound and costs about one decode step, so
speculation is nearly free; past it the pass costs compute in proportion and the speedup falls
below 1. The H100's ridge sits about twice as high as the A100's (more FLOP/s per byte/s), which
alone would let speculation pay to twice the batch there; the GPU kernel model's tile waves, split
K/V and attention kernels bring the two much closer, and at some gammas the H100 stops first.
Cost model only (`simulator.batching.crossover_batch`), one GPU.

    python examples/speculation_crossover_a100_vs_h100.py
    python examples/speculation_crossover_a100_vs_h100.py --small    # or EXAMPLES_SMALL=1
"""

from __future__ import annotations

import os
import sys

from simulator.batching import crossover_batch, speculative_speedup
from simulator.hardware import load_profile
from simulator.models import load_model

GPUS = ("a100", "h100")
TARGET = "llama-3-8b"
DRAFT = "llama-3.2-1b"  # same 128256-token vocabulary as the target
ALPHA = 0.7  # assumed acceptance rate; measure yours with `python -m reference specdec`
CONTEXT_TOKENS = 1024  # tokens already in each sequence's KV cache
GAMMAS = (1, 2, 3, 4, 6, 8)  # draft tokens per step
DTYPE = "fp16"
MAX_BATCH = 4096  # largest batch searched

SMALL = {"GAMMAS": (2, 4), "MAX_BATCH": 1024}


def main(small: bool = False) -> int:
    gammas = SMALL["GAMMAS"] if small else GAMMAS
    max_batch = SMALL["MAX_BATCH"] if small else MAX_BATCH
    target, draft = load_model(TARGET), load_model(DRAFT)
    profiles = [load_profile(g) for g in GPUS]
    print(f"{TARGET} with draft {DRAFT}, alpha {ALPHA:g}, context {CONTEXT_TOKENS} tokens, {DTYPE}, one GPU")
    for hw in profiles:
        print(f"  {hw.name}: ridge {hw.ridge_flops_per_byte(DTYPE):.0f} FLOP/B")
    print()
    print(f"{'gamma':>5}" + "".join(f"  {hw.name + ' speedup@1':>24}  {'stops paying at batch':>21}" for hw in profiles))
    for gamma in gammas:
        cells = []
        for hw in profiles:
            at_one = speculative_speedup(target, draft, hw, ALPHA, gamma, 1, CONTEXT_TOKENS, DTYPE)
            batch = crossover_batch(target, draft, hw, ALPHA, gamma, CONTEXT_TOKENS, DTYPE, max_batch)
            where = f"{batch} ({batch * (gamma + 1)} tok)" if batch else f"> {max_batch}"
            cells.append(f"  {at_one:>23.2f}x  {where:>21}")
        print(f"{gamma:>5}" + "".join(cells))
    print()
    for gamma in gammas:
        parts = []
        for hw in profiles:
            batch = crossover_batch(target, draft, hw, ALPHA, gamma, CONTEXT_TOKENS, DTYPE, max_batch)
            if batch:
                parts.append(f"stops paying at batch {batch} on {hw.name}")
            else:
                at_max = speculative_speedup(target, draft, hw, ALPHA, gamma, max_batch, CONTEXT_TOKENS, DTYPE)
                parts.append(f"still pays at batch {max_batch} on {hw.name} ({at_max:.2f}x: attention's KV reads dominate)")
        print(f"gamma {gamma}: speculation " + "; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(small="--small" in sys.argv[1:] or os.environ.get("EXAMPLES_SMALL") == "1"))
