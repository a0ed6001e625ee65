"""Timing harness: medians of repeats, because single timings on shared machines are noise."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
