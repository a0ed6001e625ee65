"""What FlashAttention tile sizes does each GPU get, and how much HBM traffic do they save?

FlashAttention (Dao et al. 2022, Alg. 1) picks block sizes from the SRAM per SM, M elements:
Bc = ceil(M / 4d), Br = min(Bc, d) (shrunk here until the whole working set fits). Standard
attention moves Theta(N d + N^2) elements to and from HBM, FlashAttention Theta(N^2 d^2 / M): more
SRAM means bigger tiles, fewer passes over K and V, and less traffic. One prefill of a causal
attention layer, per GPU profile shipped in hardware_profiles/.

    python examples/flashattention_tiles_across_gpus.py
    python examples/flashattention_tiles_across_gpus.py --small    # or EXAMPLES_SMALL=1
"""

from __future__ import annotations

import os
import sys

from simulator.attention import attention_summary
from simulator.hardware import load_profile, shipped_profiles

BATCH = 1
HEADS = 32
SEQ_TOKENS = 4096  # N
HEAD_DIM = 128  # d
CAUSAL = True
DTYPE = "fp16"
GPUS = None  # None: every shipped profile

SMALL = {"SEQ_TOKENS": 1024, "GPUS": ("a100", "h100", "l4")}


def main(small: bool = False) -> int:
    n = SMALL["SEQ_TOKENS"] if small else SEQ_TOKENS
    names = SMALL["GPUS"] if small else GPUS
    profiles = [load_profile(g) for g in names] if names else list(shipped_profiles().values())
    print(f"Causal attention, batch {BATCH}, {HEADS} heads, N = {n}, d = {HEAD_DIM}, {DTYPE}")
    print(f"{'GPU':<16} {'SRAM/SM':>8} {'Br':>4} {'Bc':>4} {'working set':>11} {'standard HBM':>13} {'FA2 HBM':>10} "
          f"{'ratio':>6} {'standard':>10} {'FA2':>10}")  # fmt: skip
    for hw in profiles:
        a = attention_summary(BATCH, HEADS, n, HEAD_DIM, hw, CAUSAL, DTYPE)
        print(
            f"{hw.name:<16} {a['sram_bytes'] // 1024:>5} KiB {a['block_rows_br']:>4} {a['block_cols_bc']:>4} "
            f"{a['sram_working_set_bytes'] // 1024:>7} KiB {a['standard']['hbm_bytes'] / 1e6:>10.1f} MB "
            f"{a['flash_fa2']['hbm_bytes'] / 1e6:>7.1f} MB {a['hbm_bytes_ratio_standard_over_fa2']:>5.1f}x "
            f"{a['standard']['time_s'] * 1e6:>7.1f} us {a['flash_fa2']['time_s'] * 1e6:>7.1f} us"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(small="--small" in sys.argv[1:] or os.environ.get("EXAMPLES_SMALL") == "1"))
