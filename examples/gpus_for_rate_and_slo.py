"""How many GPUs hold a request rate within a latency SLO, and with which draft, gamma and max batch?

Runs the same search as `python -m simulator plan --rate ... --slo-ttft-p99 ... --slo-tpot-p99 ...`:
a cost-model screen of replicas x tensor parallelism x draft x gamma x max batch, then SimPy
simulations of the survivors from the fewest GPUs up. Each replica is simulated at rate / replicas
(random load balancing splits a Poisson stream into independent Poisson streams).

    python examples/gpus_for_rate_and_slo.py            # Llama-3-70B on H100s, 20 requests/s
    python examples/gpus_for_rate_and_slo.py --small    # Llama-2-7B on A100s, seconds (or EXAMPLES_SMALL=1)
"""

from __future__ import annotations

import os
import sys

from simulator import capacity

GPU = "h100"
MODEL = "llama-3-70b"
RATE_PER_S = 20.0  # requests per second, Poisson
PROMPT_TOKENS = 1024
OUTPUT_TOKENS = 256
SLO_TTFT_P99 = "2s"  # p99 time to first token
SLO_TPOT_P99 = "50ms"  # p99 time per output token
MAX_GPUS = 16
REQUESTS_PER_REPLICA = 1000
SEED = 0
MAX_WORKERS = None  # processes for the simulations (None: one per core)

SMALL = {  # a 7B model on at most two A100s, few requests: runs in seconds
    "GPU": "a100", "MODEL": "llama-2-7b", "RATE_PER_S": 4.0, "PROMPT_TOKENS": 256, "OUTPUT_TOKENS": 64,
    "SLO_TTFT_P99": "1s", "SLO_TPOT_P99": "30ms", "MAX_GPUS": 2, "REQUESTS_PER_REPLICA": 100, "MAX_WORKERS": 2,
}  # fmt: skip


def main(small: bool = False) -> int:
    c = {**globals(), **(SMALL if small else {})}
    query = capacity.build_query(
        c["GPU"], c["MODEL"], c["RATE_PER_S"], c["SLO_TTFT_P99"], c["SLO_TPOT_P99"], c["PROMPT_TOKENS"],
        c["OUTPUT_TOKENS"], c["MAX_GPUS"], requests=c["REQUESTS_PER_REPLICA"], seed=SEED,
    )  # fmt: skip
    report = capacity.search(query, max_workers=c["MAX_WORKERS"], progress=False)
    print(capacity.format_search(report, top=10))
    rec = report["recommendation"]
    print()
    if rec is None:
        print(f"Answer: none. {report['verdict']}")
        return 1
    print(f"Answer: {report['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(small="--small" in sys.argv[1:] or os.environ.get("EXAMPLES_SMALL") == "1"))
