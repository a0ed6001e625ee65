"""Serving simulation: a continuous-batching engine with speculative decoding, under a request
stream, as SimPy processes.

The engine (vLLM's design): requests wait in a FIFO queue; at each step boundary the scheduler
admits the head while a batch slot, the token budget and KV-cache blocks allow; a running
request holds blocks of `block_tokens` tokens of target and draft KV cache. A speculative step
runs gamma draft passes over every running request, then one target verify pass over
batch x (gamma + 1) tokens; each request keeps its accepted drafts plus one token from the
target. The blocks that the lookahead (gamma + 1 KV entries) needs are reserved before the step
and the unused ones released after it. When growth does not fit, the latest-admitted requests
are preempted: their blocks are freed and they return to the head of the queue, to be
recomputed (their prompt and the tokens generated so far prefilled again).

Speed: a step's time comes from `PassCost`, the cost model of `forward()` regrouped into a part
memoised by token count and an attention part memoised by batch size and key count, and a decode
step's whole time is memoised by batch size and context sum; memos are shared by every engine of
the process that prices alike (a sweep's points, a run's interval bounds). A request draws its
accepted lengths for every step when it starts decoding, and the `_Ledger` holds, for each future
decode step, the sums over the requests decoding in it (tokens emitted, cached tokens, KV blocks
with and without the lookahead), so a span of decode steps over the same batch (up to the next
finish, the cache running out, or an arrival that could join) is a slice of it, whatever the
batch. Where the request source announces its next arrival, the engine runs ahead of the SimPy
clock between arrivals (`engine_process`). `max_span_steps=1` plans every step on its own and,
with steps priced afresh and arrivals met as SimPy events, is the slow reference (a test holds
the two to the same result); `check_invariants` rebuilds every request's state from its own
draws after every plan's steps and checks the ledger's sums and the block count against it.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import simpy
from pydantic import BaseModel, ConfigDict

from simulator.device_model import device_model
from simulator.engine import IDEAL, EngineOverhead, scheduler_defaults
from simulator.errors import UserError
from simulator.forward import check_tp, dense_costs, forward, kv_bytes_per_token, kv_heads_per_gpu, weight_bytes
from simulator.hardware import HardwareProfile
from simulator.models import ModelSpec
from simulator.workload import Request, request_source

# Engine defaults from vLLM (vllm/config.py): CacheConfig.block_size = 16 tokens,
# gpu_memory_utilization = 0.9 of device memory for weights and KV cache, and the V0
# scheduler's watermark of 1% of blocks kept free at admission to avoid immediate preemption.
BLOCK_TOKENS = 16
MEMORY_UTILIZATION = 0.9
WATERMARK_FRACTION = 0.01
DEFAULT_MAX_BATCH = 256  # vLLM SchedulerConfig.max_num_seqs
DEFAULT_MAX_BATCHED_TOKENS = 8192  # an assumption: tokens one step may carry (vLLM's is per deployment)
SIMULATOR_BATCHING = {"max_batch": DEFAULT_MAX_BATCH, "max_batched_tokens": DEFAULT_MAX_BATCHED_TOKENS, "chunked_prefill": False, "prefill_apart": False}
ATTENTION_MEMO_KEYS = 1024  # key counts priced per call of the device model's attention (a block of the memo)
EMITTED_POOL = 1 << 14  # speculative steps' token counts drawn at once

# ---------------------------------------------------------------------------------------------
# Step time: forward() regrouped for speed


SHARED_MEMOS = 32  # pricing memos one process keeps for engines to come (a sweep's points, a run's interval bounds)
_shared_memos: dict[tuple, dict] = {}


def shared_memo(key: tuple) -> dict:
    """The process's memo for the pricing that `key` names in full (models, device, dtype, split,
    scale, ...): every engine and pass cost that prices the same thing fills and reads one memo,
    so a sweep's points and a run's interval bounds do not price it again. The oldest is dropped
    past SHARED_MEMOS. A memo only holds values of a pure function of its key and entries."""
    memo = _shared_memos.get(key)
    if memo is None:
        memo = _shared_memos[key] = {}
        if len(_shared_memos) > SHARED_MEMOS:
            del _shared_memos[next(iter(_shared_memos))]
    return memo


def memo_lookup(memo: dict[int, np.ndarray], keys, price: Callable[[np.ndarray], np.ndarray], width: int = ATTENTION_MEMO_KEYS):
    """Values of `price` at the non-negative integers `keys` (an int or an integer array), memoised
    in blocks of `width` consecutive keys, each priced in one call of `price` over the block. `price`
    must be elementwise, so a memoised value is the value a direct call gives."""
    arr = np.asarray(keys)
    flat = arr.ravel()
    block = flat // width
    offset = flat - block * width
    lo, hi = int(block.min()), int(block.max())
    if lo == hi:
        t = _memo_block(memo, lo, price, width)[offset]
    else:
        t = np.empty(flat.shape)
        for b in np.unique(block).tolist():
            sel = block == b
            t[sel] = _memo_block(memo, b, price, width)[offset[sel]]
    return t.reshape(arr.shape) if arr.ndim else float(t[0])


def _memo_block(memo: dict[int, np.ndarray], b: int, price, width: int) -> np.ndarray:
    table = memo.get(b)
    if table is None:
        table = memo[b] = np.asarray(price(np.arange(b * width, (b + 1) * width)), dtype=float)
    return table


class PassCost:
    """Seconds of one forward pass of `model` over a batch of sequences, sequence i bringing q_i
    new tokens on top of ctx_i cached ones, from four aggregates:

        T = sum q_i                 tokens through every weight GEMM and elementwise kernel
        K = sum (ctx_i + q_i)       keys: positions whose K and V each attention layer reads
        P = sum q_i (ctx_i + q_i)   query-key pairs: attention FLOPs are 4 H d_head P
        L                           tokens through the LM head

    This is `forward()` regrouped: every kernel but attention depends on T (or L) alone and is
    memoised per count; attention is priced by the device model over arrays of steps, for a batch
    of `sequences` sequences of equal query length taken at their mean context (K / n - q). For a
    uniform batch (q_i = q, ctx_i = ctx) it equals `forward(...)["total"].time_s` (a test holds
    it to 1e-9); a mixed batch (prefill chunks beside decodes) is priced as its decodes and its
    chunks in two attention calls. Times are per GPU of a `tp`-way tensor-parallel group, as in
    forward(). An eager executor's per-operator host work (`DeviceModel.pass_overhead_s`, a CPU's)
    is not in it: the engine simulated is a GPU server replaying CUDA graphs. `scale` multiplies
    every time (1; an interval bound runs the engine with the device model's low or high factor)."""

    def __init__(self, model: ModelSpec, hw: HardwareProfile, dtype: str = "fp16", tp: int = 1, scale: float = 1.0):
        check_tp(model, tp)
        self.model, self.hw, self.dtype, self.tp, self.scale = model, hw, dtype, tp, scale
        self.device = device_model(hw)
        self.n_layers = model.n_layers
        self.heads = model.n_heads // tp  # this GPU's query heads
        self.kv_heads = kv_heads_per_gpu(model, tp)
        key = (model, hw.model_dump_json(), dtype, tp)  # the memos hold times before `scale`
        self._dense_s: dict[int, float] = shared_memo(("dense", *key))
        self._head_s: dict[int, float] = shared_memo(("head", *key))
        self._attention_memo: dict[tuple[int, int], dict[int, np.ndarray]] = shared_memo(("attention", *key))  # (sequences, q) -> block -> [ATTENTION_MEMO_KEYS] s
        self._attention_one: dict[tuple[int, int, int], float] = shared_memo(("attention one", *key))  # (sequences, q, keys) -> s

    def dense_s(self, tokens: int) -> float:
        """Every kernel of every layer except attention, plus the embedding, for `tokens` tokens."""
        t = self._dense_s.get(tokens)
        if t is None:
            per_layer_s = sum(k.time_s for k in dense_costs(self.model, self.device, tokens, self.dtype, self.tp))
            embed_s = self.device.embed(tokens, self.model.d_model, self.dtype).time_s
            t = self._dense_s[tokens] = self.n_layers * per_layer_s + embed_s
        return t

    def head_s(self, logits_tokens: int) -> float:
        """Final RMSNorm and the LM-head GEMM [L, d] @ [d, vocab]; none when no token needs logits
        (a prefill chunk that does not end its prompt)."""
        if logits_tokens == 0:
            return 0.0
        t = self._head_s.get(logits_tokens)
        if t is None:
            d = self.model.d_model
            norm = self.device.norm(logits_tokens, d, self.dtype, residual=False)
            head = self.device.gemm(logits_tokens, -(-self.model.vocab_size // self.tp), d, self.dtype, "lm_head")
            t = self._head_s[logits_tokens] = norm.time_s + head.time_s
        return t

    def attention_s(self, sequences: int, tokens: int, keys, memo: bool = True):
        """All layers' attention for `sequences` sequences bringing `tokens` new tokens in all over
        `keys` keys in all; `keys` may be a numpy array (one value per step). `memo` False: priced
        on the spot (for a caller that memoises the whole step).

        Whole key counts are memoised per (sequences, q) in blocks of ATTENTION_MEMO_KEYS
        consecutive counts: a serving run meets the same batch sizes and nearby key counts again
        and again, and the device model's attention costs about a millisecond a call almost
        whatever its length, so a miss prices the whole block in one call. The device model
        prices each context on its own (elementwise), so a memoised value is the value a direct
        call gives (`attention_s_direct`; a test holds the two together)."""
        if sequences == 0 or tokens == 0:
            return np.zeros(np.shape(keys)) if np.ndim(keys) else 0.0
        q = max(1, round(tokens / sequences))
        arr = np.asarray(keys)
        if memo and arr.ndim == 0 and arr.dtype.kind in "iu":  # one key count (a prefill's chunks): memoised alone, as a block would price 1024
            key = (sequences, q, int(keys))
            t = self._attention_one.get(key)
            if t is None:
                t = self._attention_one[key] = self.attention_s_direct(sequences, q, keys)
            return t
        if not memo or arr.dtype.kind not in "iu" or arr.size == 0 or arr.min() < 0:
            return self.attention_s_direct(sequences, q, keys)
        memo = self._attention_memo.get((sequences, q))
        if memo is None:
            memo = self._attention_memo[(sequences, q)] = {}
        return memo_lookup(memo, arr, lambda k: self.attention_s_direct(sequences, q, k))

    def attention_s_direct(self, sequences: int, q: int, keys):
        """`attention_s` from the device model, without the memo (the reference)."""
        context = np.maximum(np.asarray(keys, dtype=float) / sequences - q, 0.0)
        t = self.device.attention_s(sequences, q, context, self.heads, self.kv_heads, self.model.d_head, self.dtype)
        return self.n_layers * (t if np.ndim(keys) else float(t))

    def mixed_s(self, decodes: int, q: int, decode_keys, chunks: int, chunk_tokens: int, chunk_keys: int, logits_tokens: int,
                memo: bool = True):  # fmt: skip
        """A step of `decodes` sequences bringing q tokens each over `decode_keys` keys in all (a
        numpy array: one value per step), beside `chunks` prefill chunks of `chunk_tokens` tokens
        over `chunk_keys` keys: one pass through the weights, two attention calls."""
        tokens = decodes * q + chunk_tokens
        attention = self.attention_s(decodes, decodes * q, decode_keys, memo) + self.attention_s(chunks, chunk_tokens, chunk_keys, memo)
        return self.scale * (self.dense_s(tokens) + attention + self.head_s(logits_tokens))

    def uniform_s(self, batch: int, query_tokens: int, context_sum, logits_tokens: int | None = None, memo: bool = True):
        """`batch` sequences of `query_tokens` new tokens each, cached contexts summing to `context_sum`."""
        tokens = batch * query_tokens
        keys = np.asarray(context_sum) + tokens if np.ndim(context_sum) else context_sum + tokens
        logits = tokens if logits_tokens is None else logits_tokens
        return self.mixed_s(batch, query_tokens, keys, 0, 0, 0, logits, memo)


# ---------------------------------------------------------------------------------------------
# Acceptance: how many of gamma drafts the target keeps


class AcceptanceModel(BaseModel):
    """Law of the number n in [0, gamma] of draft tokens accepted in one verify pass; the pass
    emits n + 1 tokens (the accepted drafts and the target's correction or bonus token).

    - 'iid': every position accepted with probability `alpha` given those before were
      (Leviathan et al. 2023): P(n = k) = alpha^k (1 - alpha) for k < gamma, P(n = gamma) = alpha^gamma.
    - 'positional': position i accepted with probability `alphas[i]` given those before were.
    - 'empirical': `counts[k]` = how often k drafts were accepted in a measurement with
      gamma_m = len(counts) - 1 drafts per step; with fewer drafts, n = min(n_m, gamma)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["iid", "positional", "empirical"] = "iid"
    alpha: float = 0.7
    alphas: list[float] = []
    counts: list[float] = []

    def check(self, gamma: int) -> AcceptanceModel:
        if gamma < 0:
            raise UserError(f"--gamma must be >= 0, got {gamma}")
        if self.kind == "iid" and not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.kind == "positional":
            if any(not 0.0 <= a <= 1.0 for a in self.alphas):
                raise UserError(f"every per-position alpha must lie in [0, 1], got {self.alphas}")
            if len(self.alphas) < gamma:
                raise UserError(f"--alpha gives {len(self.alphas)} per-position rates but --gamma is {gamma}; give one per draft position")
        if self.kind == "empirical":
            if not self.counts or any(c < 0 or not math.isfinite(c) for c in self.counts) or not 0 < sum(self.counts) < math.inf:
                raise UserError("accepted-length counts must be finite, >= 0 and not all zero")
            if len(self.counts) - 1 < gamma:
                raise UserError(f"the accepted-length counts were measured with gamma {len(self.counts) - 1}; --gamma {gamma} would need longer drafts")
        return self

    def pmf(self, gamma: int) -> np.ndarray:
        """[gamma + 1] probabilities of accepting 0..gamma drafts."""
        if self.kind == "empirical":
            counts = np.asarray(self.counts, dtype=float)
            pmf = np.append(counts[:gamma], counts[gamma:].sum())  # n = min(n_m, gamma)
            return pmf / pmf.sum()
        rates = np.full(gamma, self.alpha) if self.kind == "iid" else np.asarray(self.alphas[:gamma], dtype=float)
        survive = np.concatenate([[1.0], np.cumprod(rates)])  # P(n >= k), k = 0..gamma
        return survive - np.append(survive[1:], 0.0)

    def mean_tokens(self, gamma: int) -> float:
        """E[n + 1]: for 'iid' equal to (1 - alpha^(gamma+1)) / (1 - alpha) (Leviathan eq. 1)."""
        return float(np.dot(self.pmf(gamma), np.arange(1, gamma + 2)))


# ---------------------------------------------------------------------------------------------
# Fixed-size metrics


class LatencySummary:
    """Count, mean, extremes and quantiles of a stream of durations, in fixed memory: a histogram
    of log-spaced bins 1% wide from 1 us to 1e6 s, so quantiles are within 0.5% (relative) of the
    exact order statistic above 1 us; values below 1 us fall in one bin, reported as the minimum."""

    LO_S, HI_S, GROWTH = 1e-6, 1e6, 1.01
    N_BINS = math.ceil(math.log(HI_S / LO_S) / math.log(GROWTH)) + 2  # [below LO, ..., above HI]

    BUFFER = 4096  # values held before they are binned in bulk

    def __init__(self):
        self.counts = np.zeros(self.N_BINS, dtype=np.int64)
        self.count = 0
        self.total_s = 0.0
        self.min_s = math.inf
        self.max_s = -math.inf
        self._buffer: list[float] = []

    def add(self, values_s: np.ndarray) -> None:
        if values_s.size > self.BUFFER:
            self._flush()
            self._bin(values_s)
            return
        self._buffer.extend(values_s.tolist())
        if len(self._buffer) >= self.BUFFER:
            self._flush()

    def add_one(self, value_s: float) -> None:
        self._buffer.append(value_s)
        if len(self._buffer) >= self.BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._bin(np.array(self._buffer))
            self._buffer = []

    def _bin(self, values_s: np.ndarray) -> None:
        if values_s.size == 0:
            return
        scaled = np.maximum(values_s, self.LO_S * 0.5) / self.LO_S
        bins = np.clip(np.floor(np.log(scaled) / math.log(self.GROWTH)).astype(np.int64) + 1, 0, self.N_BINS - 1)
        self.counts += np.bincount(bins, minlength=self.N_BINS)
        self.count += values_s.size
        self.total_s += float(values_s.sum())
        self.min_s = min(self.min_s, float(values_s.min()))
        self.max_s = max(self.max_s, float(values_s.max()))

    def quantile(self, q: float) -> float:
        """Nearest-rank q-quantile: the centre of the bin holding rank ceil(q n)."""
        self._flush()
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q * self.count))
        b = int(np.searchsorted(np.cumsum(self.counts), rank))
        if b == 0:
            return self.min_s
        value = self.LO_S * self.GROWTH ** (b - 0.5)
        return min(max(value, self.min_s), self.max_s)

    def summary(self) -> dict:
        self._flush()
        if self.count == 0:
            return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
        return {
            "count": self.count,
            "mean": self.total_s / self.count,
            "p50": self.quantile(0.50),
            "p90": self.quantile(0.90),
            "p99": self.quantile(0.99),
            "max": self.max_s,
        }


class Timeline:
    """Engine state over time in at most N_BUCKETS equal buckets: time-weighted sums of busy time,
    running sequences and KV blocks, output tokens, and the peak of KV blocks, per bucket. When time
    outgrows the buckets, neighbours merge and the width doubles, so memory stays fixed. A step is
    booked to the bucket where it starts (a bucket's busy time can then exceed its width)."""

    N_BUCKETS = 128
    BUFFER = 4096  # steps held before they are booked in bulk

    def __init__(self, width_s: float = 1e-3):
        self._rows = np.empty((5, self.BUFFER))  # start_s, dt_s, sequences, kv_blocks, tokens
        self._buffered = 0
        self.width_s = width_s
        self.busy_s = np.zeros(self.N_BUCKETS)
        self.sequence_s = np.zeros(self.N_BUCKETS)  # sequences x seconds
        self.kv_block_s = np.zeros(self.N_BUCKETS)  # blocks x seconds
        self.output_tokens = np.zeros(self.N_BUCKETS)
        self.kv_peak_blocks = np.zeros(self.N_BUCKETS)
        self._direct = [[0.0] * self.N_BUCKETS for _ in range(5)]  # the five, booked one step or span at a time (then folded in)

    def _fold(self) -> None:
        """Add what was booked directly into the arrays (before the width changes, or a reader reads them)."""
        busy, sequence, kv, tokens, peak = (np.array(d) for d in self._direct)
        self.busy_s += busy
        self.sequence_s += sequence
        self.kv_block_s += kv
        self.output_tokens += tokens
        np.maximum(self.kv_peak_blocks, peak, out=self.kv_peak_blocks)
        self._direct = [[0.0] * self.N_BUCKETS for _ in range(5)]

    def _direct_bucket(self, start_s: float, end_s: float) -> int:
        """The bucket holding [start_s, end_s], if one does and it lies within the buckets; else -1."""
        w = self.width_s
        first = int(start_s / w)
        return first if first < self.N_BUCKETS and first == int(end_s / w) else -1

    def _merge(self) -> None:
        for name in ("busy_s", "sequence_s", "kv_block_s", "output_tokens"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr.reshape(-1, 2).sum(axis=1), np.zeros(self.N_BUCKETS // 2)]))
        peak = self.kv_peak_blocks.reshape(-1, 2).max(axis=1)
        self.kv_peak_blocks = np.concatenate([peak, np.zeros(self.N_BUCKETS // 2)])
        self.width_s *= 2.0

    def add(self, start_s: np.ndarray, dt_s: np.ndarray, sequences: float, kv_blocks: np.ndarray, tokens: np.ndarray) -> None:
        """Book steps starting at `start_s` (non-decreasing), lasting `dt_s`."""
        m = start_s.size
        if self._buffered + m > self.BUFFER:
            self.flush()
        if m > self.BUFFER:
            self._book(start_s, dt_s, np.full(m, float(sequences)), kv_blocks, tokens)
            return
        b, rows = self._buffered, self._rows
        rows[0, b : b + m] = start_s
        rows[1, b : b + m] = dt_s
        rows[2, b : b + m] = sequences
        rows[3, b : b + m] = kv_blocks
        rows[4, b : b + m] = tokens
        self._buffered += m

    def add_span(self, start_s: float, ends_s: np.ndarray, dt_s: np.ndarray, sequences: int, kv_blocks: np.ndarray, tokens: np.ndarray,
                 busy_s: float, total_tokens: int, peak_blocks: int) -> None:  # fmt: skip
        """Book the steps of a span that began at `start_s`: they end `ends_s` after it, last `dt_s`
        (`busy_s` in all) and emit `tokens` (`total_tokens` in all); the blocks they hold only grow,
        to `peak_blocks`."""
        b = self._direct_bucket(start_s, start_s + busy_s)
        if b >= 0:  # one bucket holds the whole span (the common case: a span is short beside a bucket): book it there
            busy, sequence, kv, tokens_in, peak = self._direct
            busy[b] += busy_s
            sequence[b] += busy_s * sequences
            kv[b] += float(kv_blocks.dot(dt_s))
            tokens_in[b] += total_tokens
            if peak_blocks > peak[b]:
                peak[b] = peak_blocks
            return
        self.add(start_s + ends_s - dt_s, dt_s, sequences, kv_blocks, tokens)  # across buckets: step by step

    def add_one(self, start_s: float, dt_s: float, sequences: int, kv_blocks: int, tokens: int) -> None:
        """Book one step."""
        i = self._direct_bucket(start_s, start_s)
        if i >= 0:
            busy, sequence, kv, tokens_in, peak = self._direct
            busy[i] += dt_s
            sequence[i] += dt_s * sequences
            kv[i] += dt_s * kv_blocks
            tokens_in[i] += tokens
            if kv_blocks > peak[i]:
                peak[i] = kv_blocks
            return
        if self._buffered == self.BUFFER:
            self.flush()
        b, rows = self._buffered, self._rows
        rows[0, b], rows[1, b], rows[2, b], rows[3, b], rows[4, b] = start_s, dt_s, sequences, kv_blocks, tokens
        self._buffered += 1

    def flush(self) -> None:
        self._fold()
        if self._buffered:
            self._book(*self._rows[:, : self._buffered])
            self._buffered = 0

    def _book(self, start_s, dt_s, sequences, kv_blocks, tokens) -> None:
        self._fold()
        while start_s[-1] >= self.N_BUCKETS * self.width_s:
            self._merge()
        idx = (start_s / self.width_s).astype(np.int64)
        n = self.N_BUCKETS
        self.busy_s += np.bincount(idx, dt_s, minlength=n)
        self.sequence_s += np.bincount(idx, dt_s * sequences, minlength=n)  # sequences: one per step
        self.kv_block_s += np.bincount(idx, dt_s * kv_blocks, minlength=n)
        self.output_tokens += np.bincount(idx, tokens, minlength=n)
        np.maximum.at(self.kv_peak_blocks, idx, kv_blocks)

    def summary(self, capacity_blocks: int, end_s: float) -> dict:
        self.flush()
        used = max(1, min(self.N_BUCKETS, math.ceil(end_s / self.width_s)))
        w = self.width_s
        busy = self.busy_s[:used]
        with np.errstate(invalid="ignore", divide="ignore"):
            batch = np.where(busy > 0, self.sequence_s[:used] / busy, 0.0)
        return {
            "bucket_s": w,
            "start_s": (np.arange(used) * w).tolist(),
            "batch_mean": batch.tolist(),
            # over the step time booked to the bucket where a step that began in it outlasts it (a long prefill), else its width
            "kv_used_fraction_mean": (self.kv_block_s[:used] / np.maximum(busy, w) / capacity_blocks).tolist(),
            "kv_used_fraction_peak": (self.kv_peak_blocks[:used] / capacity_blocks).tolist(),
            "output_tokens_per_s": (self.output_tokens[:used] / w).tolist(),
            "busy_fraction": np.minimum(busy / w, 1.0).tolist(),
        }


# ---------------------------------------------------------------------------------------------
# Configuration and KV-cache capacity


MAX_BATCH_LIMIT = 2**20  # sequences one engine runs at once: far past any KV cache


def server_batching(engine: str, hw: HardwareProfile) -> dict:
    """max_batch, max_batched_tokens, chunked_prefill and prefill_apart as the named engine's server
    runs them (`engine.scheduler_defaults`), else the simulator's own (`ideal`)."""
    return SIMULATOR_BATCHING | scheduler_defaults(engine, hw)


class ServingConfig(BaseModel):
    """The engine: batching limits, speculation, KV-cache layout, SLOs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = DEFAULT_MAX_BATCH  # sequences running at once
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS  # prefill tokens one step may add (with chunking: all tokens)
    chunked_prefill: bool = False  # split prompts into chunks that share steps with decodes
    prefill_apart: bool = False  # with chunked_prefill: chunks run in steps of their own, ahead of the decodes (SGLang's default)
    scheduler_steps: int = 1  # decode steps per scheduler call (vLLM V0's --num-scheduler-steps): requests enter only between calls, and a call's decode steps share its step host time
    gamma: int = 4  # draft tokens per speculative step; 0 or no draft: plain decoding
    spec_off_above_batch: int | None = None  # plain decoding while more sequences than this run
    block_tokens: int = BLOCK_TOKENS
    memory_utilization: float = MEMORY_UTILIZATION
    watermark_fraction: float = WATERMARK_FRACTION
    dtype: str = "fp16"
    tp: int = 1  # tensor-parallel GPUs the target (and, where its heads divide, the draft) is split over
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    max_span_steps: int = 1 << 20  # decode steps planned at once; 1 plans every step alone (the reference)
    check_invariants: bool = False  # assert KV and request accounting after every step (tests)
    engine: EngineOverhead = IDEAL  # host time added to the kernels per step and per request (simulator.engine)

    def check(self) -> ServingConfig:
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.max_batch > MAX_BATCH_LIMIT:
            raise UserError(f"--max-batch must be at most {MAX_BATCH_LIMIT} (far past any KV cache), got {self.max_batch}")
        if self.max_batched_tokens < 1:
            raise UserError(f"--max-batched-tokens must be >= 1, got {self.max_batched_tokens}")
        if self.gamma < 0:
            raise UserError(f"--gamma must be >= 0, got {self.gamma}")
        if self.spec_off_above_batch is not None and self.spec_off_above_batch < 0:
            raise UserError(f"--spec-off-above-batch must be >= 0, got {self.spec_off_above_batch}")
        if self.tp < 1:
            raise UserError(f"--tp must be >= 1, got {self.tp}")
        if self.block_tokens < 1:
            raise UserError(f"block_tokens must be >= 1, got {self.block_tokens}")
        if not 0.0 < self.memory_utilization <= 1.0:
            raise UserError(f"memory_utilization must lie in (0, 1], got {self.memory_utilization}")
        for flag, value in (("--slo-ttft", self.slo_ttft_s), ("--slo-tpot", self.slo_tpot_s)):
            if value is not None and not value > 0:
                raise UserError(f"{flag} must be a number of seconds > 0, got {value}")
        if self.max_span_steps < 1:
            raise UserError(f"max_span_steps must be >= 1, got {self.max_span_steps}")
        if self.scheduler_steps < 1:
            raise UserError(f"--scheduler-steps must be >= 1, got {self.scheduler_steps}")
        if self.prefill_apart and not self.chunked_prefill:
            raise UserError("--prefill-apart needs --chunked-prefill (without chunking, prefills always run in steps of their own)")
        return self


def draft_tp(draft: ModelSpec, tp: int) -> int:
    """The draft is split like the target when its heads and d_ff allow, else replicated on every GPU."""
    return tp if draft.n_heads % tp == 0 and draft.d_ff % tp == 0 else 1


def check_pair(target: ModelSpec, draft: ModelSpec | None) -> None:
    if draft is not None and draft.vocab_size != target.vocab_size:
        raise UserError(
            f"draft {draft.name} has vocabulary {draft.vocab_size}, target {target.name} has {target.vocab_size}; "
            "speculative decoding needs one vocabulary"
        )


def kv_cache_blocks(hw: HardwareProfile, target: ModelSpec, draft: ModelSpec | None, cfg: ServingConfig) -> tuple[int, int]:
    """(blocks, bytes per block per GPU): device memory x utilization, less target and draft
    weights, in blocks of `block_tokens` tokens of target plus draft KV cache, per GPU of the
    tensor-parallel group. A UserError says by how much the weights miss when they do not fit."""
    check_tp(target, cfg.tp)
    models = [(target, cfg.tp)] + ([(draft, draft_tp(draft, cfg.tp))] if draft is not None else [])
    usable_bytes = hw.memory_bytes * cfg.memory_utilization
    weights = sum(weight_bytes(m, cfg.dtype, tp) for m, tp in models)
    names = " + ".join(m.name for m, _ in models)
    per_gpu = f" per GPU over --tp {cfg.tp}" if cfg.tp > 1 else ""
    if weights > usable_bytes:
        raise UserError(
            f"{names} weights need {weights / 1e9:.1f} GB{per_gpu} in {cfg.dtype} but {hw.name} has {usable_bytes / 1e9:.1f} GB usable "
            f"({cfg.memory_utilization:.0%} of {hw.memory_bytes / 1e9:.1f} GB): short by {(weights - usable_bytes) / 1e9:.1f} GB "
            "(more GPUs with --tp, a smaller --dtype such as fp8, or a GPU with more memory would help)"
        )
    bytes_per_block = cfg.block_tokens * sum(kv_bytes_per_token(m, cfg.dtype, tp) for m, tp in models)
    blocks = int((usable_bytes - weights) // bytes_per_block)
    if blocks < 1:
        raise UserError(
            f"{names} weights leave {(usable_bytes - weights) / 1e6:.1f} MB of {hw.name} for the KV cache; "
            f"one block of {cfg.block_tokens} tokens needs {bytes_per_block / 1e6:.1f} MB: short by {(bytes_per_block - usable_bytes + weights) / 1e6:.1f} MB"
        )
    return blocks, bytes_per_block


# ---------------------------------------------------------------------------------------------
# The engine


def _ceil_div(a, b):
    return -(-a // b)


NOT_DECODING = 2**63 - 1  # `finish` of a slot that is empty or still prefilling


class _Slots:
    """Requests in the batch, one list per field, indexed by slot; a finished or preempted
    request's slot is reused (lowest first), so live slots stay below `hi`.

    A decoding request keeps no per-step state here: it joined the ledger at decode step `start`
    with `c0` cached tokens and `g0` tokens generated, and its cumulative gains per step from there
    are `Engine._gains[slot]`; `finish` is the decode step in which it emits its last token."""

    FIELDS = ("rid", "prompt", "output", "target", "prefilled", "blocks", "order", "start", "finish", "c0", "g0",
              "arrival_s", "admit_s", "first_s")  # fmt: skip

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, [])
        self.hi = 0
        self._free: list[int] = []  # a heap of free slots below hi

    def take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        for name in self.FIELDS:
            getattr(self, name).append(0)
        self.finish[-1] = NOT_DECODING
        self.hi += 1
        return self.hi - 1

    def give(self, slot: int) -> None:
        self.order[slot] = -1
        self.finish[slot] = NOT_DECODING
        heapq.heappush(self._free, slot)


class _Ledger:
    """Sums over the decoding requests of each decode step, indexed by the step's number t (the
    engine's count of decode steps so far): TOK tokens the step emits, CTX cached tokens at its start,
    RES KV blocks it holds with its lookahead (sum of ceil((ctx_i + q) / block)), HOLD blocks held
    just before it (sum of ceil(ctx_i / block)). A request adds its whole future when it starts
    decoding (its acceptance draws made then) and takes back what is left when it is preempted, so
    a span of steps reads its token counts, contexts and blocks as one slice, whatever the batch."""

    TOK, CTX, RES, HOLD = range(4)

    def __init__(self, size: int = 4096):
        self.base = 0  # step number of column 0
        self.rows = np.zeros((4, size), dtype=np.int64)
        self._offsets: dict[tuple[int, int], np.ndarray] = {}  # (q, block) -> what ceil() adds before dividing, RES and HOLD
        self._steps = np.arange(0, dtype=np.int64)  # 0, 1, 2, ...

    def add(self, now: int, start: int, c0: int, gains: np.ndarray, q: int, block: int, sign: int = 1, skip: int = 0) -> None:
        """Add (sign 1) or take back (-1) the steps of a request that joined at step `start` with
        `c0` cached tokens and has gained gains[j] tokens by the end of its j-th step, for steps
        start + skip on (>= now), running q query tokens each over blocks of `block` tokens."""
        m = gains.size - skip
        end = start + skip + m
        if end - self.base > self.rows.shape[1]:  # steps before `now` are never read again: drop them
            live = self.rows[:, now - self.base :]
            rows = np.zeros((4, max(self.rows.shape[1], 2 * (end - now))), dtype=np.int64)
            rows[:, : live.shape[1]] = live
            self.rows, self.base = rows, now
        rows = np.empty((4, m), dtype=np.int64)  # TOK, CTX, RES, HOLD of each step
        before = rows[self.CTX]
        if q == 1:  # one token a step: gains[j] = j + 1
            if self._steps.size < m:
                self._steps = np.arange(2 * m, dtype=np.int64)
            rows[self.TOK] = 1
            np.add(self._steps[:m], c0 + skip, out=before)
        else:
            before[0] = gains[skip - 1] if skip else 0
            before[1:] = gains[skip:-1]
            np.subtract(gains[skip:], before, out=rows[self.TOK])
            before += c0
        offsets = self._offsets.get((q, block))
        if offsets is None:
            offsets = self._offsets[(q, block)] = np.array([[q + block - 1], [block - 1]])
        blocks = rows[self.RES :]
        np.add(before, offsets, out=blocks)
        blocks //= block
        live = self.rows[:, end - m - self.base : end - self.base]
        if sign > 0:
            live += rows
        else:
            live -= rows

    def value(self, row: int, t: int) -> int:
        """One sum: `row` (TOK, CTX, RES or HOLD) of step t."""
        i = t - self.base
        return int(self.rows[row, i]) if i < self.rows.shape[1] else 0

    def at(self, t: int, k: int = 1) -> np.ndarray:
        """[4, k] sums of steps t .. t + k - 1 (zeros past every request's end)."""
        i = t - self.base
        if i + k > self.rows.shape[1]:
            return np.concatenate([self.rows[:, i:], np.zeros((4, i + k - self.rows.shape[1]), dtype=np.int64)], axis=1)
        return self.rows[:, i : i + k]


class Engine:
    """State and scheduler of one serving engine; `engine_process` drives it in simulated time.

    KV blocks: a decoding request holds ceil(ctx / block) blocks, and ceil((ctx + q) / block)
    during a step of q query tokens (the lookahead, taken before the step and given back after
    it); a request admitted for prefill holds its prompt's blocks from admission. The free blocks
    are the capacity less both (`free_blocks`), never negative: `_reserve` preempts first."""

    def __init__(
        self,
        env: simpy.Environment,
        hw: HardwareProfile,
        target: ModelSpec,
        draft: ModelSpec | None,
        acceptance: AcceptanceModel,
        cfg: ServingConfig,
        rng: np.random.Generator,
        on_progress: Callable[[int], None] | None = None,
        time_scale: float = 1.0,
    ):
        cfg.check()
        self.env, self.cfg, self.target, self.rng = env, cfg, target, rng
        self.draft = draft if cfg.gamma > 0 else None
        self.gamma = cfg.gamma if self.draft is not None else 0
        check_pair(target, self.draft)
        self.target_cost = PassCost(target, hw, cfg.dtype, cfg.tp, time_scale)
        self.draft_cost = PassCost(self.draft, hw, cfg.dtype, draft_tp(self.draft, cfg.tp), time_scale) if self.draft is not None else None
        if self.gamma:
            acceptance.check(self.gamma)
            pmf = acceptance.pmf(self.gamma)
            self.accept_cdf = np.cumsum(pmf)
            self.accept_cdf[-1] = 1.0
            self.mean_tokens = acceptance.mean_tokens(self.gamma)
        self.n_blocks, self.bytes_per_block = kv_cache_blocks(hw, target, self.draft, cfg)
        self.bs = cfg.block_tokens
        self.watermark_blocks = int(cfg.watermark_fraction * self.n_blocks)

        self.waiting: deque[tuple] = deque()  # (rid, arrival_s, prompt, output, generated, first_s, admit_s)
        self.arrival = env.event()  # succeeds when a request joins the queue; renewed by the engine loop
        self.listening = True  # the engine loop may wait on `arrival` (not while it knows when the next one comes)
        self.no_more_requests = env.event()
        self.next_arrival_s: float | None = None  # when the next request reaches the queue, where the source knows it
        self.run = _Slots()
        self.n_running = 0
        self._prefilling: list[int] = []  # slots admitted and not yet through their prompt, in admission order
        self._prefill_blocks = 0  # blocks those hold
        self._gains: dict[int, np.ndarray] = {}  # slot -> tokens gained by the end of each of its decode steps
        self.ledger = _Ledger()
        self.t = 0  # decode steps so far
        self._finishing: dict[int, list[int]] = {}  # decode step -> slots whose last step it is
        self._finish_steps: list[int] = []  # a heap of those steps (some stale: their slots left)
        self._pool, self._pool_at = np.zeros(0, dtype=np.int64), 0  # tokens per speculative step, drawn ahead
        self._q = self.gamma + 1 if self.gamma else 1  # query tokens per decode step the ledger was drawn for
        self._lookahead = False  # the next step's lookahead is reserved (between _reserve and the commit)
        self._call_left = 0  # decode steps left in the scheduler call under way (ServingConfig.scheduler_steps)
        # (batch, q) -> decode step seconds by context sum; prefill-only step seconds by its chunks.
        # Shared by every engine of this class that prices the same way (`_pricing`); None: its own.
        pricing = self._pricing(hw, time_scale)
        self._step_memo: dict[tuple[int, int], dict[int, np.ndarray]] = shared_memo(("step", *pricing)) if pricing else {}
        self._prefill_memo: dict[tuple, float] = shared_memo(("prefill", *pricing)) if pricing else {}
        self._admissions = 0
        self._on_progress = on_progress

        self.arrived = 0
        self.completed = 0
        self.rejected: dict[str, dict] = {}
        self.preemptions = 0
        self.steps = 0
        self.spec_steps = 0
        self.spec_request_steps = 0  # sum over speculative steps of the requests verified
        self.spec_tokens = 0  # tokens those verifications emitted
        self.busy_s = 0.0
        self.output_tokens = 0
        self.prompt_tokens = 0
        self.good = 0
        self.kv_peak_blocks = 0
        self.batch_peak = 0
        self.end_s = 0.0
        self.ttft = LatencySummary()
        self.tpot = LatencySummary()
        self.e2e = LatencySummary()
        self.queue = LatencySummary()
        self.timeline = Timeline()

    def _pricing(self, hw: HardwareProfile, time_scale: float) -> tuple | None:
        """Everything the step prices depend on, or None where a subclass prices steps its own way."""
        if type(self) is not Engine:
            return None
        cfg = self.cfg
        return (self.target, self.draft, hw.model_dump_json(), cfg.dtype, cfg.tp, time_scale, self.gamma, cfg.engine, cfg.scheduler_steps)

    # --- arrivals ----------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Called at the request's arrival: reject it with a reason, or queue it for the engine."""
        self.arrived += 1
        reason = self._rejection(request)
        if reason is not None:
            entry = self.rejected.setdefault(reason, {"count": 0, "first_ids": []})
            entry["count"] += 1
            if len(entry["first_ids"]) < 10:
                entry["first_ids"].append(request.rid)
            if self._on_progress:
                self._on_progress(1)
        else:
            self.waiting.append((request.rid, request.arrival_s, request.prompt_tokens, request.output_tokens, 0, math.nan, math.nan))
            if self.listening and not self.arrival.triggered:
                self.arrival.succeed()

    def _rejection(self, r: Request) -> str | None:
        if r.prompt_tokens + r.output_tokens > self.target.max_seq_len:
            return "longer_than_max_seq_len"
        if not self.cfg.chunked_prefill and r.prompt_tokens > self.cfg.max_batched_tokens:
            return "prompt_exceeds_max_batched_tokens"
        lookahead = self.gamma + 1
        if _ceil_div(r.prompt_tokens + r.output_tokens - 1 + lookahead, self.bs) > self.n_blocks - self.watermark_blocks:
            return "larger_than_kv_cache"
        return None

    @property
    def idle(self) -> bool:
        return self.n_running == 0 and not self.waiting

    # --- KV blocks and the ledger ------------------------------------------------------------

    def free_blocks(self) -> int:
        decoding = self.ledger.value(_Ledger.RES if self._lookahead else _Ledger.HOLD, self.t)
        return self.n_blocks - decoding - self._prefill_blocks

    def _fits(self, entry: tuple) -> bool:
        need = _ceil_div(entry[2] + entry[4], self.bs)  # prompt + generated, recomputed at admission
        return need <= self.free_blocks() - self.watermark_blocks

    def _draw_gains(self, remaining: int) -> np.ndarray:
        """Tokens gained by the end of each decode step until `remaining` are out: 1 a step without
        speculation; with it, each step's accepted drafts + 1 drawn from the acceptance law (the
        draws of a request made at once, when it starts decoding)."""
        if self._q == 1:
            return np.arange(1, remaining + 1, dtype=np.int64)
        gains = self._emitted(min(remaining, math.ceil(1.25 * remaining / self.mean_tokens) + 4)).cumsum()
        m = int(gains.searchsorted(remaining)) + 1
        if m <= gains.size:
            self._pool_at -= gains.size - m  # the draws past its last step are left for the next request
        else:  # acceptance ran well below its mean: draw on
            gains = np.concatenate([gains, gains[-1] + self._emitted(remaining).cumsum()])
            m = int(gains.searchsorted(remaining)) + 1
        gains = gains[:m]
        gains[-1] = remaining  # the last step emits only what the request still needed
        return gains

    def _emitted(self, count: int) -> np.ndarray:
        """`count` tokens emitted by speculative steps (accepted drafts + 1), iid from the
        acceptance law: the next ones of a pool drawn EMITTED_POOL at a time."""
        if self._pool_at + count > self._pool.size:
            self._pool = np.searchsorted(self.accept_cdf, self.rng.random(max(EMITTED_POOL, count)), side="right") + 1
            self._pool_at = 0
        self._pool_at += count
        return self._pool[self._pool_at - count : self._pool_at]

    def _start_decoding(self, slot: int, c0: int, g0: int) -> None:
        """The request in `slot` has `c0` tokens cached and `g0` generated and decodes from step t on."""
        R = self.run
        gains = self._draw_gains(R.output[slot] - g0)
        self.ledger.add(self.t, self.t, c0, gains, self._q, self.bs)
        self._gains[slot] = gains
        R.start[slot], R.c0[slot], R.g0[slot] = self.t, c0, g0
        R.finish[slot] = finish = self.t + gains.size - 1
        self._finishes_at(finish, slot)

    def _stop_decoding(self, slot: int) -> tuple[int, int]:
        """Take the rest of `slot`'s future out of the ledger: (cached, generated) tokens now."""
        R = self.run
        gains = self._gains.pop(slot)
        done = self.t - R.start[slot]  # its steps already run
        gained = int(gains[done - 1]) if done else 0
        c0 = R.c0[slot]
        self.ledger.add(self.t, R.start[slot], c0, gains, self._q, self.bs, sign=-1, skip=done)
        self._finishing[R.finish[slot]].remove(slot)
        R.finish[slot] = NOT_DECODING
        return c0 + gained, R.g0[slot] + gained

    def _decoding_slots(self) -> list[int]:
        R = self.run
        return [slot for slot in range(R.hi) if R.finish[slot] != NOT_DECODING]

    def _redraw(self, q: int) -> None:
        """Speculation turned on or off: every decoding request's future is drawn again for steps of q tokens."""
        slots = self._decoding_slots()
        states = [self._stop_decoding(slot) for slot in slots]  # taken back under the old q's lookahead
        self._q = q
        for slot, (c, g) in zip(slots, states, strict=True):
            self._start_decoding(slot, c, g)

    def _admit(self, entry: tuple, now: float) -> int:
        rid, arrival_s, prompt, output, generated, first_s, admit_s = entry
        R, i = self.run, self.run.take()
        target = prompt + generated
        blocks = _ceil_div(target, self.bs)
        R.rid[i], R.arrival_s[i], R.prompt[i], R.output[i], R.g0[i] = rid, arrival_s, prompt, output, generated
        R.first_s[i], R.admit_s[i] = first_s, now if math.isnan(admit_s) else admit_s
        R.target[i], R.prefilled[i], R.blocks[i] = target, 0, blocks
        R.order[i] = self._admissions
        self._admissions += 1
        self._prefilling.append(i)
        self._prefill_blocks += blocks
        self.n_running += 1
        return i

    def _preempt(self, victim: int) -> None:
        """Recompute: the request frees all its blocks and goes back to the head of the queue."""
        R = self.run
        if R.finish[victim] == NOT_DECODING:
            self._prefilling.remove(victim)
            self._prefill_blocks -= R.blocks[victim]
            generated = R.g0[victim]
        else:
            _, generated = self._stop_decoding(victim)
        self.waiting.appendleft(
            (R.rid[victim], R.arrival_s[victim], R.prompt[victim], R.output[victim], generated, R.first_s[victim], R.admit_s[victim])
        )  # fmt: skip
        R.give(victim)
        self.n_running -= 1
        self.preemptions += 1

    def _reserve(self) -> None:
        """Blocks for every decoding request's next step of lookahead; while they do not fit,
        preempt the latest-admitted request."""
        while self.ledger.value(_Ledger.RES, self.t) + self._prefill_blocks > self.n_blocks:
            order = self.run.order
            self._preempt(max(range(self.run.hi), key=order.__getitem__))
        self._lookahead = True

    def _speculating(self) -> bool:
        off = self.cfg.spec_off_above_batch
        return self.gamma > 0 and (off is None or self.n_running <= off)

    # --- planning ----------------------------------------------------------------------------

    def plan(self, now: float) -> tuple[np.ndarray | tuple[float], bool]:
        """Schedule the next step, or a span of decode steps over an unchanging batch.
        Returns the end offset (s) of each step and whether an arrival may cut the span short."""
        self._start_s = now
        R, cfg = self.run, self.cfg
        q = self.gamma + 1 if self._speculating() else 1
        if q != self._q:
            self._redraw(q)
        preempted_before = self.preemptions
        if self._call_left and self.n_running and not self._prefilling:  # inside a multi-step call: its decodes go on, nobody enters
            self._reserve()
            steps = min(self._call_left, self.cfg.max_span_steps if self.preemptions == preempted_before else 1)
            return self._plan_span(q, steps), False
        self._call_left = 0
        chunks: list[tuple[int, int]] = []  # (slot, prompt tokens this step)
        if cfg.chunked_prefill:
            apart = cfg.prefill_apart  # decodes sit out while prefill work remains: the whole budget is the chunks'
            if not apart:
                self._reserve()
            budget = cfg.max_batched_tokens - (0 if apart else (self.n_running - len(self._prefilling)) * q)
            for i in self._prefilling:
                if budget <= 0:
                    break
                c = min(R.target[i] - R.prefilled[i], budget)
                chunks.append((i, c))
                budget -= c
            while self.waiting and budget > 0 and self.n_running < cfg.max_batch and self._fits(self.waiting[0]):
                i = self._admit(self.waiting.popleft(), now)
                c = min(R.target[i], budget)
                chunks.append((i, c))
                budget -= c
            if apart and not chunks:
                self._reserve()
            open_to_arrivals = not self.waiting and self.n_running < cfg.max_batch and budget > 0
        else:
            tokens = 0
            while self.waiting and self.n_running < cfg.max_batch and self._fits(self.waiting[0]):
                head = self.waiting[0]
                if chunks and tokens + head[2] + head[4] > cfg.max_batched_tokens:
                    break
                i = self._admit(self.waiting.popleft(), now)
                chunks.append((i, R.target[i]))
                tokens += R.target[i]
            if not chunks:
                self._reserve()
            open_to_arrivals = not self.waiting and self.n_running < cfg.max_batch
        if chunks or self._prefilling:  # prefills to run, or starved of budget
            return self._plan_mixed(q, chunks), False
        # After a preemption the next step boundary may differ: the preempted request heads the
        # queue and may fit again once this step releases its lookahead, and a batch shrunk below
        # the speculation limit changes the next step's kind. Such a plan runs one step.
        steady = self.preemptions == preempted_before
        if cfg.scheduler_steps > 1:  # a call of that many decode steps, which no arrival cuts short
            self._call_left = cfg.scheduler_steps
            return self._plan_span(q, min(self._call_left, cfg.max_span_steps if steady else 1)), False
        return self._plan_span(q, self.cfg.max_span_steps if steady else 1), open_to_arrivals

    def _plan_mixed(self, q: int, chunks: list[tuple[int, int]]) -> tuple[float]:
        """One step of prefill chunks, beside a decode (or speculative) step of every decoding
        request when prefill is chunked and mixed; without chunking, or with prefill apart,
        decoding requests sit this step out."""
        R = self.run
        n_dec = self.n_running - len(self._prefilling) if self.cfg.chunked_prefill and not self.cfg.prefill_apart else 0
        chunk_tokens = chunk_keys = finishing = 0
        for i, c in chunks:
            done = R.prefilled[i] + c
            chunk_tokens += c
            chunk_keys += done
            finishing += done >= R.target[i]  # chunks that end a prefill emit a token
        ctx_dec = self.ledger.value(_Ledger.CTX, self.t) if n_dec else 0
        key = (q, n_dec, ctx_dec, len(chunks), chunk_tokens, chunk_keys, finishing)
        step_s = self._prefill_memo.get(key) if not n_dec else None
        if step_s is None:
            step_s = float(self._mixed_s(*key))
            if not n_dec:
                self._prefill_memo[key] = step_s
        self._kind = "mixed"
        self._mixed = (q, n_dec, chunks, step_s)
        return (step_s,)

    def _mixed_s(self, q: int, n_dec: int, ctx_dec: int, n_chunks: int, chunk_tokens: int, chunk_keys: int, finishing: int) -> float:
        """Seconds of a step of `n_dec` decoding sequences of q query tokens over `ctx_dec` cached
        tokens in all, beside `n_chunks` prefill chunks of `chunk_tokens` tokens over `chunk_keys`
        keys, `finishing` of which end their prompt: the target's pass, the engine's host work, and
        the draft's passes (it reads the same prompts and keeps its own KV cache)."""
        step_s = self.target_cost.mixed_s(n_dec, q, ctx_dec + n_dec * q, n_chunks, chunk_tokens, chunk_keys, n_dec * q + finishing)
        step_s = self.cfg.engine.step_time_s(step_s, n_dec + n_chunks, n_dec * q + chunk_tokens, self.target.n_layers, True, self.gamma if q > 1 else 0)
        if self.draft_cost is not None:
            passes = self.gamma if q > 1 else 1  # without speculation, one pass keeps its cache in step
            for j in range(passes):
                keys = ctx_dec + n_dec * (j + 1)
                if j == 0:
                    step_s += self.draft_cost.mixed_s(n_dec, 1, keys, n_chunks, chunk_tokens, chunk_keys, n_dec + finishing)
                elif n_dec:
                    step_s += self.draft_cost.mixed_s(n_dec, 1, keys, 0, 0, 0, n_dec)
        return step_s

    def _plan_span(self, q: int, max_steps: int) -> np.ndarray:
        """Decode steps over the whole batch until the first step in which a request finishes,
        the cache would overflow, or `max_steps`: [k] step end offsets (s)."""
        n = self.n_running
        k = min(self._next_finish() - self.t + 1, max_steps)
        rows = self.ledger.at(self.t, k)
        reserved = rows[_Ledger.RES]
        if int(reserved[-1]) > self.n_blocks:  # step 0 fits (reserved before planning): stop before the first that does not
            k = int((reserved > self.n_blocks).argmax())
            rows, reserved = rows[:, :k], reserved[:k]
        step_s = self._decode_s(n, q, rows[_Ledger.CTX])
        ends_s = step_s.cumsum()
        self._kind = "span"
        self._span = (q, rows[_Ledger.TOK], reserved, step_s, ends_s)
        return ends_s

    def _decode_s(self, n: int, q: int, ctx_sum: np.ndarray) -> np.ndarray:
        """Seconds of decode steps of `n` sequences of q query tokens whose cached contexts sum to
        `ctx_sum` (one per step), memoised per (n, q) by context sum (`memo_lookup`)."""
        memo = self._step_memo.get((n, q))
        if memo is None:
            memo = self._step_memo[(n, q)] = {}
        w = ATTENTION_MEMO_KEYS
        b, last = int(ctx_sum[0]) // w, int(ctx_sum[-1]) // w  # sums only grow within a span
        table = memo.get(b)
        if table is not None:
            if last == b:
                return table[ctx_sum - b * w]
            after = memo.get(last)
            if last == b + 1 and after is not None:
                cut = int(ctx_sum.searchsorted(last * w))
                return np.concatenate([table[ctx_sum[:cut] - b * w], after[ctx_sum[cut:] - last * w]])
        return memo_lookup(memo, ctx_sum, lambda c: self._decode_s_direct(n, q, c))

    def _decode_s_direct(self, n: int, q: int, ctx_sum: np.ndarray) -> np.ndarray:
        """`_decode_s` without the memo: the target's verify (or decode) pass and the engine's host
        work, then the draft's gamma passes, pass j reading contexts ctx_i + j."""
        target_s = self.target_cost.uniform_s(n, q, ctx_sum, memo=False)
        step_s = self.cfg.engine.step_time_s(target_s, n, n * q, self.target.n_layers, False, self.gamma if q > 1 else 0, self.cfg.scheduler_steps)
        if self.draft_cost is not None:
            passes = self.gamma if q > 1 else 1  # without speculation, one pass keeps the draft's cache in step
            step_s = step_s + self.draft_cost.uniform_s(n, 1, ctx_sum[:, None] + n * np.arange(passes), memo=False).sum(axis=1)
        return step_s

    # --- committing --------------------------------------------------------------------------

    def commit(self, steps_done: int, now: float) -> None:
        """Apply the first `steps_done` planned steps, which ended at `now`."""
        if self._kind == "mixed":
            self._commit_mixed()
        else:
            k, n = steps_done, self.n_running
            q, tokens, reserved, step_s, ends_s = self._span
            if k < ends_s.size:  # cut short by an arrival
                tokens, reserved, step_s, ends_s = tokens[:k], reserved[:k], step_s[:k], ends_s[:k]
            emitted = k * n if q == 1 else int(np.add.reduce(tokens))  # without speculation every request emits one a step
            busy_s, peak = float(ends_s[k - 1]), int(reserved[k - 1])  # reservations only grow within a span
            if q > 1:
                self.spec_steps += k
                self.spec_request_steps += k * n
                self.spec_tokens += emitted
            self.timeline.add_span(self._start_s, ends_s, step_s, n, reserved, tokens, busy_s, emitted, peak)
            self.steps += k
            self.busy_s += busy_s
            self.output_tokens += emitted
            self.kv_peak_blocks = max(self.kv_peak_blocks, peak)
            self.batch_peak = max(self.batch_peak, n)
            self.t += k
            self._call_left = max(self._call_left - k, 0)
        self._lookahead = False
        self._finish(now)
        if self.cfg.check_invariants:
            self._check()

    def _commit_mixed(self) -> None:
        q, n_dec, chunks, step_s = self._mixed
        R = self.run
        held = self.n_blocks - self.free_blocks()
        tokens = 0
        if n_dec:  # the decoding requests ran a step beside the chunks
            tokens = self.ledger.value(_Ledger.TOK, self.t)
            if q > 1:
                self.spec_steps += 1
                self.spec_request_steps += n_dec
                self.spec_tokens += tokens
            self.t += 1
        for i, c in chunks:
            R.prefilled[i] += c
            if R.prefilled[i] < R.target[i]:
                continue
            self._prefilling.remove(i)
            self._prefill_blocks -= R.blocks[i]
            if math.isnan(R.first_s[i]):
                R.first_s[i] = self._start_s + step_s
            tokens += 1
            generated = R.g0[i] + 1
            if generated < R.output[i]:
                self._start_decoding(i, R.target[i], generated)
            else:
                R.finish[i] = self.t - 1  # done at its prefill: retired with the steps' finishers
                self._finishes_at(self.t - 1, i)
        self.timeline.add_one(self._start_s, step_s, self.n_running, held, tokens)
        self.steps += 1
        self.busy_s += step_s
        self.output_tokens += tokens
        self.kv_peak_blocks = max(self.kv_peak_blocks, held)
        self.batch_peak = max(self.batch_peak, self.n_running)

    def _finishes_at(self, step: int, slot: int) -> None:
        bucket = self._finishing.get(step)
        if bucket is None:
            self._finishing[step] = [slot]
            heapq.heappush(self._finish_steps, step)
        else:
            bucket.append(slot)

    def _next_finish(self) -> int:
        """The earliest step in which a decoding request finishes (NOT_DECODING: none decodes)."""
        steps = self._finish_steps
        while steps and not self._finishing.get(steps[0]):
            self._finishing.pop(heapq.heappop(steps), None)  # its requests were preempted
        return steps[0] if steps else NOT_DECODING

    def _finish(self, now: float) -> None:
        """Retire the requests whose last step has run."""
        steps, R = self._finish_steps, self.run
        while steps and steps[0] < self.t:
            for slot in self._finishing.pop(heapq.heappop(steps), ()):
                self._retire(slot, now)
                self._gains.pop(slot, None)
                R.give(slot)
                self.n_running -= 1

    def _retire(self, slot: int, now: float) -> None:
        """Latency and goodput of the finished request in `slot`."""
        R = self.run
        arrival_s, first_s, output = R.arrival_s[slot], R.first_s[slot], R.output[slot]
        ttft = first_s - arrival_s
        self.ttft.add_one(ttft)
        self.e2e.add_one(now - arrival_s)
        self.queue.add_one(R.admit_s[slot] - arrival_s)
        good = self.cfg.slo_ttft_s is None or ttft <= self.cfg.slo_ttft_s
        if output > 1:
            tpot = (now - first_s) / (output - 1)
            self.tpot.add_one(tpot)
            good = good and (self.cfg.slo_tpot_s is None or tpot <= self.cfg.slo_tpot_s)
        self.good += good
        self.prompt_tokens += R.prompt[slot]
        self.completed += 1
        self.end_s = now
        if self._on_progress:
            self._on_progress(1)

    def _check(self) -> None:
        """Every request's state rebuilt from its own draws agrees with the ledger's sums and the block count."""
        R, t, bs = self.run, self.t, self.bs
        live = sum(order >= 0 for order in R.order)
        assert live == self.n_running, "running requests differ from the live slots"
        tok = ctx_sum = res = hold = 0
        for slot in self._decoding_slots():
            gains = self._gains[slot]
            done = t - R.start[slot]
            assert 0 <= done < gains.size, "a decoding request outlived its draws"
            before = int(gains[done - 1]) if done else 0
            ctx = R.c0[slot] + before
            assert R.g0[slot] + before < R.output[slot]
            tok += int(gains[done]) - before
            ctx_sum += ctx
            res += _ceil_div(ctx + self._q, bs)
            hold += _ceil_div(ctx, bs)
        assert [tok, ctx_sum, res, hold] == self.ledger.at(t)[:, 0].tolist(), "the ledger differs from its requests"
        prefill = [R.blocks[i] for i in self._prefilling]
        assert all(R.blocks[i] >= _ceil_div(R.target[i], bs) for i in self._prefilling)
        assert sum(prefill) == self._prefill_blocks
        assert 0 <= self.free_blocks() <= self.n_blocks
        assert self.kv_peak_blocks <= self.n_blocks, "KV use exceeded capacity"
        rejected = sum(v["count"] for v in self.rejected.values())
        assert self.arrived == self.completed + rejected + len(self.waiting) + self.n_running, "a request went missing"

    # --- report ------------------------------------------------------------------------------

    def report(self) -> dict:
        self.timeline.flush()
        duration_s = self.end_s
        rejected = sum(v["count"] for v in self.rejected.values())
        per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
        return {
            "requests": {
                "arrived": self.arrived,
                "completed": self.completed,
                "rejected": rejected,
                "rejected_by_reason": self.rejected,
                "preemptions": self.preemptions,
            },
            "duration_s": duration_s,
            "latency_s": {
                "ttft": self.ttft.summary(),
                "tpot": self.tpot.summary(),
                "e2e": self.e2e.summary(),
                "queue": self.queue.summary(),
            },
            "throughput": {
                "output_tokens_per_s": per_s(self.output_tokens),
                "total_tokens_per_s": per_s(self.output_tokens + self.prompt_tokens),
                "requests_per_s": per_s(self.completed),
            },
            "goodput": {
                "slo_ttft_s": self.cfg.slo_ttft_s,
                "slo_tpot_s": self.cfg.slo_tpot_s,
                "requests_per_s": per_s(self.good),
                "fraction_of_completed": self.good / self.completed if self.completed else 0.0,
            },
            "gpu_busy_fraction": self.busy_s / duration_s if duration_s > 0 else 0.0,
            "batch": {"mean": self._mean_batch(), "max": self.batch_peak},
            "kv_cache": {
                "capacity_blocks": self.n_blocks,
                "block_tokens": self.bs,
                "bytes_per_block": self.bytes_per_block,
                "capacity_tokens": self.n_blocks * self.bs,
                "peak_used_blocks": self.kv_peak_blocks,
                "peak_used_fraction": self.kv_peak_blocks / self.n_blocks,
                "mean_used_fraction": float(self.timeline.kv_block_s.sum()) / duration_s / self.n_blocks if duration_s > 0 else 0.0,
            },
            "engine": {
                "steps": self.steps,
                "speculative_steps": self.spec_steps,
                "tokens_per_verify": self.spec_tokens / self.spec_request_steps if self.spec_request_steps else None,
                "expected_tokens_per_verify": self.mean_tokens if self.gamma else None,
                "output_tokens": self.output_tokens,
            },
            "timeline": self.timeline.summary(self.n_blocks, duration_s),
        }

    def _mean_batch(self) -> float:
        return float(self.timeline.sequence_s.sum() / self.busy_s) if self.busy_s > 0 else 0.0


def engine_process(env: simpy.Environment, engine: Engine):
    """SimPy process: the engine loop. Each turn schedules one step, or a span of decode steps
    over an unchanging batch, and waits out its duration; an arrival that could join a running
    span cuts it at the end of the step in progress.

    Where the request source announces its next arrival (`Engine.next_arrival_s`: an open loop with
    no API server in front), the cut is known when the span is planned, and the engine runs ahead
    of the simulation clock on its own (`now`) through steps that end before the next arrival,
    waiting only for the step in progress when one comes; nothing else reads the engine's state
    in between. Otherwise it waits for each plan, or an arrival, whichever comes first."""
    now = env.now
    while True:
        if engine.arrival.triggered:
            engine.arrival = env.event()
        if engine.idle:
            if engine.no_more_requests.triggered:
                return
            engine.listening = True
            yield engine.arrival | engine.no_more_requests
            now = env.now
            continue
        engine.listening = engine.next_arrival_s is None
        ends_s, open_to_arrivals = engine.plan(now)
        total_s = float(ends_s[-1])
        steps_done = len(ends_s)
        next_s = engine.next_arrival_s
        if next_s is not None:
            if open_to_arrivals and steps_done > 1 and next_s - now < total_s:  # an arrival: the span ends with the step in progress then
                steps_done = int(ends_s.searchsorted(next_s - now)) + 1
            end_s = now + (total_s if steps_done == len(ends_s) else float(ends_s[steps_done - 1]))
            if next_s <= end_s:  # a request comes before the step ends: it joins the queue first
                yield env.timeout(end_s - env.now)
            now = end_s
        elif open_to_arrivals and steps_done > 1:
            yield env.timeout(total_s) | engine.arrival
            elapsed_s = env.now - now
            if elapsed_s < total_s:  # an arrival: finish the step in progress, then reschedule
                steps_done = int(np.searchsorted(ends_s, elapsed_s, side="left")) + 1
                yield env.timeout(float(ends_s[steps_done - 1]) - elapsed_s)
            now = env.now
        else:
            yield env.timeout(total_s)
            now = env.now
        engine.commit(steps_done, now)


def simulate_serving(
    hw: HardwareProfile,
    target: ModelSpec,
    draft: ModelSpec | None,
    acceptance: AcceptanceModel,
    cfg: ServingConfig,
    requests: Iterator[Request],
    rng: np.random.Generator,
    on_progress: Callable[[int], None] | None = None,
    time_scale: float = 1.0,
    engine: Callable[..., Engine] = Engine,
    concurrency: int | None = None,
) -> dict:
    """Run one engine over `requests` until every request has completed or been rejected.
    `time_scale` multiplies every pass's time (an interval bound: see `interval_scales`); `engine`
    makes the engine from `Engine`'s arguments (a tree engine: `tree.TreeSpeculation.engine`);
    `concurrency` N: closed loop, N users each sending its next request when its last completes."""
    env = simpy.Environment()
    users = simpy.Container(env, capacity=concurrency, init=concurrency) if concurrency else None

    def progress(n: int) -> None:  # requests completed or rejected: their users are free again
        if users is not None:
            users.put(n)
        if on_progress:
            on_progress(n)

    engine = engine(env, hw, target, draft, acceptance, cfg, rng, progress if users is not None else on_progress, time_scale)
    api_s = None if cfg.engine.ideal else (lambda r: cfg.engine.request_in_s(r.prompt_tokens))
    announce = None
    if users is None and api_s is None:  # requests reach the queue at their arrival times: the engine may look ahead

        def announce(arrival_s: float) -> None:
            engine.next_arrival_s = arrival_s

    env.process(request_source(env, requests, engine.submit, engine.no_more_requests.succeed, users, api_s, announce, cfg.engine.request_latency_s))
    env.process(engine_process(env, engine))
    env.run()
    rejected = sum(v["count"] for v in engine.rejected.values())
    if engine.completed + rejected != engine.arrived:  # pragma: no cover - an engine bug, not bad input
        raise RuntimeError(f"{engine.arrived - engine.completed - rejected} requests neither completed nor rejected")
    return engine.report()


def span(*values: float | None) -> dict | None:
    """`low`/`high` of the figures one statistic takes in a run and its bound runs. A queue's
    percentile need not move with its step times (faster steps can form other batches), so the
    interval spans all three runs and always holds the run's own figure."""
    if any(v is None for v in values):
        return None
    return {"low": min(values), "high": max(values)}


def interval_scales(hw: HardwareProfile, target: ModelSpec, cfg: ServingConfig, batch: float, context: float) -> tuple[float, float] | None:
    """(low, high) factors of an 80% interval on the engine's step times: the device model's
    interval on a decode step of the target at this batch and context, relative to its time (None
    where the device model has no interval, a CPU's). A serving run is repeated with every pass
    scaled by each factor to bound its latencies and throughput: a whole run is slower or faster
    together, as a GPU whose kernels all run slower than predicted would be."""
    total = forward(target, hw, max(1, round(batch)), max(0, round(context)), 1, cfg.dtype, tp=cfg.tp)["total"]
    if total.low_s is None:
        return None
    return total.low_s / total.time_s, total.high_s / total.time_s
