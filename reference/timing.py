"""Timing harness: medians of repeats, because single timings on shared machines are noise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median_s: float
    samples_s: tuple[float, ...]

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples: how noisy this measurement was."""
        return (max(self.samples_s) - min(self.samples_s)) / self.median_s if self.median_s else 0.0


def _sync() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Run `fn` `warmup` times, then `repeats` times, and return the median wall-clock seconds.
    CUDA work is synchronised before each clock read."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), tuple(samples))


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Like `measure` for several functions at once, run in turns (a, b, c, a, b, c, ...), so that a
    shared machine's drifts over the minutes of a benchmark fall on every function alike and
    ratios of the medians compare like with like."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            if i >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(x), tuple(x)) for name, x in samples.items()}


class Stopwatch:
    """Total time of bracketed sections of a loop that keeps running: start() ... stop(), repeated.

    On CUDA the brackets are events, read once at the end, so timing adds no host sync to the loop;
    elsewhere the host clock, since CPU work is done when the call returns."""

    def __init__(self, device: str | object = "cpu"):
        import torch

        self._cuda = torch.device(device).type == "cuda"
        self._events: list = []
        self._host_s = 0.0
        self._started = 0.0

    def start(self) -> None:
        if self._cuda:
            import torch

            self._events.append(torch.cuda.Event(enable_timing=True))
            self._events[-1].record()
        else:
            self._started = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            import torch

            self._events.append(torch.cuda.Event(enable_timing=True))
            self._events[-1].record()
        else:
            self._host_s += time.perf_counter() - self._started

    @property
    def seconds(self) -> float:
        if not self._cuda:
            return self._host_s
        _sync()
        pairs = zip(self._events[::2], self._events[1::2], strict=True)
        return sum(a.elapsed_time(b) for a, b in pairs) / 1e3


MAX_THREADS = 4096  # torch takes a C int; no host has more cores


def check_seed(seed: int) -> int:
    """A seed torch's generators take: a 64-bit count (numpy's take any whole number >= 0)."""
    from simulator.errors import UserError

    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be a whole number in [0, 2**63), got {seed}")
    return seed


@contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count for one run (0 keeps torch's own), restored afterwards."""
    import torch

    from simulator.errors import UserError

    if not 0 <= threads <= MAX_THREADS:
        raise UserError(f"--threads must be 0 (torch's default) or a positive count up to {MAX_THREADS}, got {threads}")
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
