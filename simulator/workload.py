"""Request streams for the serving simulation: Poisson arrivals, bursty gamma-process arrivals,
every request at once (rate inf), and replay of a trace file (CSV or JSONL of arrival time, prompt
length, output length); open loop, or closed loop as `vllm bench serve --max-concurrency N` runs it
(N users, each sending its next request when its last one completes).

A stream is an iterator of `Request`s in arrival order; `request_source` is the SimPy process
that releases them into an engine at their arrival times. Random streams are drawn in chunks
from one numpy Generator, so a seed fixes the whole workload.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import NormalDist
from typing import Literal, NamedTuple

import numpy as np
import simpy
from pydantic import BaseModel, ConfigDict

from simulator.errors import UserError

TRACE_COLUMNS = ("arrival_time_s", "prompt_tokens", "output_tokens")
CHUNK = 4096  # requests drawn per numpy call
# What a float keeps exact: a clock of float seconds still tells nanoseconds apart up to 2**22 s (48.5
# days; its step there is 2**-30 s), and counts are whole up to 2**53. Past these a simulated latency
# rounds to zero and a token count to its neighbour, so such input is refused, not simulated.
MAX_TIME_S = 2.0**22
MAX_TOKENS = 2**53
MAX_RATE_PER_S = 1e9  # arrivals a nanosecond apart
# ShareGPT as `vllm bench serve` samples it (SGLang's bench_serving prunes alike): pairs of at least 4
# prompt and 4 output tokens, prompts of at most 1024 and prompt + output of at most 2048 tokens
# (vllm/benchmarks/datasets.py `is_valid_sequence`).
SHAREGPT_MIN_TOKENS, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048
# The median output over the mean output of its pairs. The published light-load ShareGPT rows
# (simulator/e2e/published_serving.csv rows 1-8, 4 and 8 requests/s) give the median
# output as (median end-to-end latency - TTFT) / TPOT + 1 = 114-123 tokens, 119 in their median, where
# the rows that print their totals average 204.5 output tokens per prompt: 0.58
# (`simulator.e2e_validate.sharegpt_output_median_ratio` recomputes it from the file).
SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN = 0.58
SHAREGPT_OUTPUT_MIN_MEAN = 16  # a mean output below this puts the law's median within a few tokens of the filter's 4
SHAREGPT_CAP_OVER_MEAN = 6  # and one above 1/6 of the output cap leaves too little of its tail to keep that median


class Request(NamedTuple):
    rid: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


class WorkloadSpec(BaseModel):
    """Where requests come from. `arrival`: 'poisson' (exponential gaps at `rate_per_s`),
    'gamma' (gamma-distributed gaps with mean 1 / rate_per_s and shape `burstiness`), or
    'trace' (rows of `trace_path`); a rate of inf sends every request at time 0. Random streams
    draw prompt and output lengths as `lengths` says: 'fixed' (every request the same),
    'uniform' (integers on [1, 2 n - 1], mean n), or 'sharegpt' (prompts as 'uniform' draws them,
    outputs as ShareGPT's replies run in a benchmark: see `sharegpt_outputs`). `concurrency` N closes the loop: at most N
    requests are in flight; a request due while N are is sent when one completes (the semaphore
    of `vllm bench serve --max-concurrency`, whose clock starts when the request is sent)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arrival: Literal["poisson", "gamma", "trace"] = "poisson"
    rate_per_s: float = 8.0
    burstiness: float = 1.0
    requests: int | None = 1000  # None: every row of the trace
    prompt_tokens: int = 512
    output_tokens: int = 256
    lengths: Literal["fixed", "uniform", "sharegpt"] = "fixed"
    trace_path: str | None = None
    concurrency: int | None = None  # closed loop: users; None: open loop

    def check(self) -> WorkloadSpec:
        """Raise a UserError naming the option that is out of range; return self."""
        if self.arrival == "trace":
            if not self.trace_path:
                raise UserError("arrival 'trace' needs a trace file (--trace FILE)")
        else:
            if not self.rate_per_s > 0:
                raise UserError(f"--rate must be a number of requests per second > 0 (inf: every request at once), got {self.rate_per_s}")
            if MAX_RATE_PER_S < self.rate_per_s < math.inf:
                raise UserError(f"--rate must be at most {MAX_RATE_PER_S:g} requests per second (arrivals a nanosecond apart), got {self.rate_per_s:g}")
            if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
                raise UserError(f"--burstiness must be > 0 (1 is Poisson, below 1 burstier), got {self.burstiness}")
            for flag, tokens in (("--prompt-len", self.prompt_tokens), ("--output-len", self.output_tokens)):
                if not 1 <= tokens <= MAX_TOKENS:
                    raise UserError(f"{flag} must be >= 1 (at most 2**53), got {tokens}")
            if self.requests is None:
                raise UserError("--requests is needed for a random arrival process")
            if self.requests / self.rate_per_s > MAX_TIME_S:
                raise UserError(f"--rate: {self.requests} requests at {self.rate_per_s:g}/s arrive over {self.requests / self.rate_per_s:.3g} s, "
                                f"past the {MAX_TIME_S:.0f} s a simulated clock keeps to the nanosecond; raise --rate or lower --requests")
            if self.lengths == "sharegpt":
                cap = sharegpt_output_cap(min(self.prompt_tokens, SHAREGPT_MAX_PROMPT))
                if not (self.prompt_tokens <= SHAREGPT_MAX_PROMPT // 2 and SHAREGPT_OUTPUT_MIN_MEAN <= self.output_tokens <= cap // SHAREGPT_CAP_OVER_MEAN):
                    raise UserError(f"--lengths sharegpt draws pairs inside the benchmark's filter (prompts of at most {SHAREGPT_MAX_PROMPT}, prompt + output "
                                    f"of at most {SHAREGPT_MAX_TOTAL} tokens): --prompt-len at most {SHAREGPT_MAX_PROMPT // 2} and --output-len from "
                                    f"{SHAREGPT_OUTPUT_MIN_MEAN} to 1/{SHAREGPT_CAP_OVER_MEAN} of {SHAREGPT_MAX_TOTAL} - (2 x prompt - 1), got {self.prompt_tokens} and {self.output_tokens}")
        if self.requests is not None and self.requests < 1:
            raise UserError(f"--requests must be >= 1, got {self.requests}")
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1 (users, each with one request in flight), got {self.concurrency}")
        return self


def _lengths(rng: np.random.Generator, mean_tokens: int, kind: str, n: int) -> np.ndarray:
    if kind == "fixed" or mean_tokens == 1:
        return np.full(n, mean_tokens, dtype=np.int64)
    return rng.integers(1, 2 * mean_tokens, size=n, endpoint=False)  # uniform on [1, 2 mean - 1]


def sharegpt_output_cap(prompt_tokens: int) -> int:
    """The longest output a 'sharegpt' stream draws beside prompts of mean `prompt_tokens`: the
    benchmark's prompt + output cap less the longest prompt 'uniform' draws (one cap for every
    request, so the law's mean is exact; the benchmark's own cap is at most 2 mean prompt tokens longer)."""
    return SHAREGPT_MAX_TOTAL - (2 * prompt_tokens - 1)


@functools.lru_cache(maxsize=256)
def truncated_lognormal(mean: float, median: float, low: float, high: float) -> tuple[float, float]:
    """(mu, sigma) of the log-normal law whose part on [low, high] has this mean and median.

    On [low, high] a log-normal (mu, sigma) with a = (ln low - mu) / sigma, b = (ln high - mu) / sigma
    has the mean e^(mu + sigma^2 / 2) (Phi(b - sigma) - Phi(a - sigma)) / (Phi(b) - Phi(a)) and the
    median e^(mu + sigma Phi^-1((Phi(a) + Phi(b)) / 2)). For each sigma the mean fixes mu (it grows
    with mu), and the median over the mean falls as sigma grows: two bisections."""
    if not low < median < mean < high:
        raise UserError(f"no log-normal law on [{low:g}, {high:g}] has the mean {mean:g} and the median {median:g} (it needs low < median < mean < high)")
    phi = NormalDist()
    lo_log, hi_log = math.log(low), math.log(high)

    def solve_mu(sigma: float) -> float:
        def trunc_mean(mu: float) -> float:
            a, b = (lo_log - mu) / sigma, (hi_log - mu) / sigma
            mass = phi.cdf(b) - phi.cdf(a)
            if mass <= 0.0:  # the whole law below low (a > 0) or above high
                return low if a > 0 else high
            return math.exp(mu + sigma * sigma / 2) * (phi.cdf(b - sigma) - phi.cdf(a - sigma)) / mass

        lo, hi = lo_log - 8.0 * sigma, hi_log + 8.0 * sigma
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if trunc_mean(mid) < mean else (lo, mid)
        return 0.5 * (lo + hi)

    def trunc_median(mu: float, sigma: float) -> float:
        a, b = (lo_log - mu) / sigma, (hi_log - mu) / sigma
        p = 0.5 * (phi.cdf(a) + phi.cdf(b))
        return math.exp(mu + sigma * phi.inv_cdf(min(max(p, 1e-300), 1.0 - 1e-16)))

    s_lo, s_hi = 1e-3, 5.0
    for _ in range(60):
        s_mid = 0.5 * (s_lo + s_hi)
        s_lo, s_hi = (s_mid, s_hi) if trunc_median(solve_mu(s_mid), s_mid) > median else (s_lo, s_mid)
    sigma = 0.5 * (s_lo + s_hi)
    return solve_mu(sigma), sigma


def sharegpt_outputs(rng: np.random.Generator, mean_tokens: int, prompt_tokens: int, n: int) -> np.ndarray:
    """Output lengths of ShareGPT pairs as a benchmark keeps them: a log-normal law whose part
    inside the benchmark's filter (SHAREGPT_MIN_TOKENS up to `sharegpt_output_cap`) has the mean
    `mean_tokens` and the median SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN of it; a draw outside is drawn
    again, as the benchmark passes over a pair it prunes. A long tail: the median reply is 0.58 of
    the mean and, at ShareGPT's own means (220 prompt, 204 output tokens), one in fifty is more
    than five times as long, which sets how long the last requests of a burst decode on their own."""
    low, high = SHAREGPT_MIN_TOKENS - 0.5, sharegpt_output_cap(prompt_tokens) + 0.5  # a draw rounds to the nearest whole token
    mu, sigma = truncated_lognormal(float(mean_tokens), SHAREGPT_OUTPUT_MEDIAN_OVER_MEAN * mean_tokens, low, high)
    out = np.exp(rng.normal(mu, sigma, size=n))
    bad = (out < low) | (out > high)
    while bad.any():
        out[bad] = np.exp(rng.normal(mu, sigma, size=int(bad.sum())))
        bad = (out < low) | (out > high)
    return np.rint(out).astype(np.int64)


def random_stream(spec: WorkloadSpec, rng: np.random.Generator) -> Iterator[Request]:
    """Poisson or gamma-process arrivals from time 0.

    Gamma gaps: shape k = burstiness, scale 1 / (rate k), so the mean gap is 1 / rate and the
    squared coefficient of variation is 1 / k; k = 1 is Poisson, k < 1 clusters arrivals
    (the convention of vLLM's `benchmark_serving.py --burstiness`). A rate of inf: every gap is 0."""
    spec.check()
    t_s, rid = 0.0, 0
    while rid < spec.requests:
        n = min(CHUNK, spec.requests - rid)
        if math.isinf(spec.rate_per_s):
            gaps_s = np.zeros(n)
        elif spec.arrival == "poisson":
            gaps_s = rng.exponential(1.0 / spec.rate_per_s, size=n)
        else:
            gaps_s = rng.gamma(spec.burstiness, 1.0 / (spec.rate_per_s * spec.burstiness), size=n)
        arrivals_s = t_s + np.cumsum(gaps_s)
        prompts = _lengths(rng, spec.prompt_tokens, "uniform" if spec.lengths == "sharegpt" else spec.lengths, n)
        if spec.lengths == "sharegpt":
            outputs = sharegpt_outputs(rng, spec.output_tokens, spec.prompt_tokens, n)
        else:
            outputs = _lengths(rng, spec.output_tokens, spec.lengths, n)
        for a, p, o in zip(arrivals_s.tolist(), prompts.tolist(), outputs.tolist(), strict=True):
            yield Request(rid, a, p, o)
            rid += 1
        t_s = float(arrivals_s[-1])


class Trace(NamedTuple):
    arrival_s: np.ndarray  # [n] float64, non-decreasing
    prompt_tokens: np.ndarray  # [n] int64 >= 1
    output_tokens: np.ndarray  # [n] int64 >= 1


def _whole(value: object, column: str, where: str) -> int:
    wrong = f"{where}: {column} must be a whole number >= 1 (at most 2**53), got {_shown(value)}"
    if isinstance(value, bool):
        raise UserError(wrong)
    try:
        number = float(value)  # accepts "512", "512.0", 512
    except (TypeError, ValueError, OverflowError):
        raise UserError(wrong) from None
    if not (1 <= number <= MAX_TOKENS) or number != int(number):
        raise UserError(wrong)
    return int(number)


def _shown(value: object) -> str:
    """A cell as an error message shows it: whole, unless it is long."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _time(value: object, where: str) -> float:
    wrong = f"{where}: arrival_time_s must be a number of seconds >= 0 (at most 2**22), got {_shown(value)}"
    if isinstance(value, bool):
        raise UserError(wrong)
    try:
        t_s = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(wrong) from None
    if not 0 <= t_s <= MAX_TIME_S:  # NaN fails this too
        raise UserError(wrong)
    return t_s


def _csv_fields(line: str, where: str) -> list[str]:
    try:
        return next(csv.reader([line]), [])
    except csv.Error as exc:
        raise UserError(f"{where}: malformed CSV: {exc}") from None


def _trace_rows(path: Path, text: str) -> Iterator[tuple[int, object, object, object]]:
    """(line number, arrival, prompt, output) of every data row; malformed rows raise UserError."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        lines = text.splitlines()
        header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
        if header_at is None:
            raise UserError(f"{path}: empty trace; a CSV trace needs the header {','.join(TRACE_COLUMNS)}")
        header = [h.strip() for h in _csv_fields(lines[header_at], f"{path}:{header_at + 1}")]
        missing = [c for c in TRACE_COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"{path}:{header_at + 1}: header lacks {', '.join(missing)}; a CSV trace needs the columns {','.join(TRACE_COLUMNS)}"
            )
        cols = [header.index(c) for c in TRACE_COLUMNS]
        for i in range(header_at + 1, len(lines)):
            if not lines[i].strip():
                continue
            fields = _csv_fields(lines[i], f"{path}:{i + 1}")
            if len(fields) != len(header):
                raise UserError(f"{path}:{i + 1}: {len(fields)} fields, the header has {len(header)}")
            yield (i + 1, *(fields[c].strip() for c in cols))
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{i + 1}: malformed JSON: {exc.msg}") from None
            except RecursionError:
                raise UserError(f"{path}:{i + 1}: malformed JSON: nested too deep") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{i + 1}: a JSONL row is an object with keys {', '.join(TRACE_COLUMNS)}")
            missing = [c for c in TRACE_COLUMNS if c not in row]
            if missing:
                raise UserError(f"{path}:{i + 1}: missing {', '.join(missing)}")
            yield (i + 1, *(row[c] for c in TRACE_COLUMNS))
    else:
        raise UserError(f"{path}: a trace is a .csv or .jsonl file, got {suffix or 'no extension'!r}")


def load_trace(path: str | Path, limit: int | None = None) -> Trace:
    """Read and check a trace; at most `limit` rows. Every malformed row is a UserError that names
    the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); a trace is a CSV or JSONL file") from None
    arrivals, prompts, outputs = [], [], []
    previous_s = 0.0
    for line, t, p, o in _trace_rows(path, text):
        where = f"{path}:{line}"
        t_s = _time(t, where)
        if t_s < previous_s:
            raise UserError(f"{where}: arrival_time_s {t_s:g} is earlier than the row before ({previous_s:g}); sort the trace by arrival time")
        arrivals.append(t_s)
        prompts.append(_whole(p, "prompt_tokens", where))
        outputs.append(_whole(o, "output_tokens", where))
        previous_s = t_s
        if limit is not None and len(arrivals) >= limit:
            break
    if not arrivals:
        raise UserError(f"{path}: the trace has no rows")
    return Trace(np.asarray(arrivals), np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64))


def trace_stream(trace: Trace) -> Iterator[Request]:
    for rid, (a, p, o) in enumerate(
        zip(trace.arrival_s.tolist(), trace.prompt_tokens.tolist(), trace.output_tokens.tolist(), strict=True)
    ):
        yield Request(rid, a, p, o)


def request_count(spec: WorkloadSpec, trace: Trace | None) -> int:
    return len(trace.arrival_s) if trace is not None else int(spec.requests)


def make_stream(spec: WorkloadSpec, rng: np.random.Generator, trace: Trace | None = None) -> Iterator[Request]:
    """The requests of `spec`: a trace (already loaded, so both runs of a comparison share it) or a random process."""
    if spec.arrival == "trace":
        if trace is None:
            trace = load_trace(spec.trace_path, spec.requests)
        return trace_stream(trace)
    return random_stream(spec, rng)


def request_source(env, requests: Iterator[Request], submit: Callable[[Request], None], done: Callable[[], None],
                   users=None, api_s: Callable[[Request], float] | None = None,
                   announce: Callable[[float], None] | None = None, api_latency_s: float = 0.0):  # fmt: skip
    """SimPy process: hand each request to `submit` at its arrival time, then call `done`.

    `users`: a `simpy.Container` of free users (closed loop): a request due when none is free waits
    for one and is sent, its arrival time set, when one is; whoever completes requests puts their
    users back. `api_s(request)`: seconds the API server spends on a request before the engine sees
    it (its arrival time stays the time it was sent); the server is one process (vLLM's and SGLang's
    front ends are single asyncio processes), so requests pass it one at a time, in order of sending;
    `done` waits for the last one to pass. `api_latency_s`: a further wait of every request before the
    engine sees it that occupies no server (requests in flight wait it at the same time). `announce(t)`:
    told the arrival time of the next request before each wait for it, and inf after the last one."""
    in_api = []
    server = simpy.Resource(env, capacity=1)
    for request in requests:
        if request.arrival_s > env.now:
            if announce is not None:
                announce(request.arrival_s)
            yield env.timeout(request.arrival_s - env.now)
        if users is not None:
            free = users.get(1)
            if not free.triggered:  # a free user sends at once, in the same instant as the requests before
                yield free
            request = request._replace(arrival_s=env.now)
        delay_s = api_s(request) if api_s is not None else 0.0
        if delay_s > 0 or api_latency_s > 0:
            if len(in_api) >= CHUNK:
                in_api = [p for p in in_api if p.is_alive]
            in_api.append(env.process(_through_api(env, server, delay_s, api_latency_s, submit, request)))
        else:
            submit(request)
    if announce is not None:
        announce(math.inf)
    if in_api:
        yield env.all_of(in_api)
    done()


def _through_api(env, server, delay_s: float, latency_s: float, submit: Callable[[Request], None], request: Request):
    if delay_s > 0:
        with server.request() as turn:
            yield turn
            yield env.timeout(delay_s)
    if latency_s > 0:
        yield env.timeout(latency_s)
    submit(request)
