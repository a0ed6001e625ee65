"""The executor's linear layer: `nn.Linear` without bias, whose inference path on a CPU picks the
fastest of torch's kernels for each row count, as an inference engine autotunes its GEMMs.

Candidates, each on a copy of the weight laid out for it once:
- `linear`: `F.linear(x, W)`, which hands BLAS the weight as a transposed operand;
- `transposed`: x @ W^T over a row-major copy of W^T [d_in, d_out] (one row: a matrix-vector
  product that streams W in memory order);
- `packed`: oneDNN's matmul on a copy of W prepacked into its blocked layout, as torch.compile's
  weight freezing does, so no call repacks W.
Why it matters, measured on a 1-thread AMD EPYC over the trained target's 17 weight matrices
(12.8 MB) per pass: `linear` takes 406 / 839 / 1132 us at 1 / 2 / 3 rows (about one one-row time
per row below 4 rows), `transposed` 376 us at one row, `packed` 566 / 584 us at 2 / 3 rows;
but `packed` costs some 20 us per call more than the others on a draft-sized (128-wide) weight.
So the choice is timed, not fixed: on the first call with a given number of rows (exact up to 8,
then by power of two) each candidate runs a few times and the fastest serves that row count from
then on. A row count so large that one call takes seconds (a long prefill) is timed with fewer
calls, to fit TUNE_BUDGET_S, and a tuning expected to last over TUNE_NOTICE_S says so on stderr. Autograd, other devices and dtypes take `F.linear`. The copies and choices are rebuilt
when the weight changes (its storage, or its version counter: a weight made under
`torch.inference_mode` has none, so changing one in place is not seen there).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = {
    "linear": lambda x, w: F.linear(x, w),
    "transposed": lambda x, wt: x @ wt,
    "packed": lambda x, p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""),
}
PACK_ROWS = 4  # the row count oneDNN lays the weight out for; its kernel serves any other count too
TUNE_SAMPLES = 5  # timed samples per candidate, of TUNE_CALLS calls each; the median decides
TUNE_CALLS = 3
TUNE_BUDGET_S = 5.0  # fewer samples and calls where one round of the candidates is this slow (at least 1 x 1)
TUNE_NOTICE_S = 5.0  # a tuning expected to take longer (one round over the budget) prints one line on stderr


def row_bucket(rows: int) -> int:
    return rows if rows <= 8 else 1 << (rows - 1).bit_length()


def tune_plan(round_s: float) -> tuple[int, int]:
    """(samples, calls per sample) for candidates whose one round, one call each, takes `round_s`
    seconds: TUNE_SAMPLES x TUNE_CALLS, cut to fit TUNE_BUDGET_S, never below one call."""
    fit = int(TUNE_BUDGET_S // round_s) if round_s > 0 else TUNE_SAMPLES * TUNE_CALLS
    calls = max(1, min(TUNE_CALLS, fit // TUNE_SAMPLES))
    return max(1, min(TUNE_SAMPLES, fit // calls)), calls


def fastest(copies: dict[str, torch.Tensor], x: torch.Tensor) -> str:
    """The candidate with the lowest median time on `x`, the candidates timed in turns."""

    def timed(kind: str, calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            KERNELS[kind](x, copies[kind])
        return time.perf_counter() - start

    for kind in copies:
        timed(kind, 1)  # warm-up: first-call setup (oneDNN builds its primitive) stays out
    first = {kind: timed(kind, 1) for kind in copies}  # one round, one call each: sizes the tuning
    samples, calls = tune_plan(sum(first.values()))
    if samples * calls * sum(first.values()) > TUNE_NOTICE_S:
        d_out, d_in = copies["linear"].shape
        print(f"tuning the linear layer {d_in}x{d_out} for {x.numel() // d_in} rows: about "
              f"{samples * calls * sum(first.values()):.0f} s (once per shape)", file=sys.stderr, flush=True)  # fmt: skip
    reused = calls == 1  # a round of single calls is a sample already
    times = {kind: [first[kind]] if reused else [] for kind in copies}
    for _ in range(samples - reused):
        for kind in copies:
            times[kind].append(timed(kind, calls))
    return min(times, key=lambda kind: statistics.median(times[kind]))


class Linear(nn.Linear):
    """`nn.Linear(d_in, d_out, bias=False)` with the tuned inference path of this module."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)
        self._tuned: tuple[tuple[int, int], dict[str, torch.Tensor], dict[int, str]] | None = None

    def __getstate__(self):  # copies and pickles re-tune (oneDNN's packed copy has no storage to copy)
        return {**super().__getstate__(), "_tuned": None}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[int, str]]:
        w = self.weight.detach()
        key = (w.data_ptr(), -1 if w.is_inference() else w._version)
        if self._tuned is None or self._tuned[0] != key:
            copies = {"linear": w, "transposed": w.T.contiguous()}
            if torch.backends.mkldnn.is_available():
                copies["packed"] = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
            self._tuned = (key, copies, {})
        return self._tuned[1], self._tuned[2]

    def kernel_choices(self) -> dict[int, str]:
        """Row bucket -> the kernel chosen for it so far."""
        return dict(self._tuned[2]) if self._tuned else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() or w.device.type != "cpu" or w.dtype != torch.float32 or x.dtype != torch.float32:
            return F.linear(x, w)
        copies, choice = self._state()
        bucket = row_bucket(x.numel() // x.shape[-1])
        kind = choice.get(bucket)
        if kind is None:
            kind = choice[bucket] = fastest(copies, x)
        return KERNELS[kind](x, copies[kind])
