"""Speculative decoding arithmetic (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023).

alpha: acceptance rate, E[sum_x min(p(x), q(x))]; gamma: draft tokens per step;
c: cost ratio, time of a draft step over time of a target step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel

from simulator.errors import UserError


def _check(alpha: float, gamma: int) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must lie in [0, 1], got {alpha}")
    if gamma < 0 or int(gamma) != gamma:
        raise UserError(f"gamma must be a whole number >= 0, got {gamma}")


def expected_tokens(alpha: float, gamma: int) -> float:
    """E[tokens per step] = (1 - alpha^(gamma+1)) / (1 - alpha)  (Leviathan eq. 1).

    Summed as the geometric series 1 + alpha + ... + alpha^gamma, which is exact at alpha = 1
    (gamma + 1) and alpha = 0 (1) and never divides by zero."""
    _check(alpha, gamma)
    return float(sum(alpha**i for i in range(gamma + 1)))


def expected_tokens_positional(alphas: Sequence[float]) -> float:
    """E[tokens per step] when draft position i is accepted with probability alphas[i], given all
    before it were: 1 + a_0 + a_0 a_1 + ... + a_0 ... a_(gamma-1)."""
    for a in alphas:
        _check(a, 0)
    return float(1.0 + np.cumprod(np.asarray(alphas, dtype=float)).sum()) if len(alphas) else 1.0


def walltime_improvement(alpha: float, gamma: int, c: float) -> float:
    """(1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1))  (Leviathan Thm. 3.8)."""
    if c < 0:
        raise UserError(f"cost ratio c must be >= 0, got {c}")
    return expected_tokens(alpha, gamma) / (gamma * c + 1.0)


def operation_increase(alpha: float, gamma: int, c_hat: float) -> float:
    """Factor by which arithmetic operations grow: (1 - alpha)(gamma c_hat + gamma + 1) / (1 - alpha^(gamma+1))
    (Leviathan Thm. 3.11); c_hat is the draft/target ratio of arithmetic operations per token."""
    if c_hat < 0:
        raise UserError(f"operation ratio c_hat must be >= 0, got {c_hat}")
    return (gamma * c_hat + gamma + 1.0) / expected_tokens(alpha, gamma)


def best_gamma(alpha: float, c: float, gamma_max: int = 16) -> int:
    """The gamma in [0, gamma_max] that maximises the walltime improvement (smallest on ties)."""
    improvements = [walltime_improvement(alpha, g, c) for g in range(gamma_max + 1)]
    return int(np.argmax(improvements))


def acceptance_rate(p: np.ndarray, q: np.ndarray) -> float:
    """alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q), for target p and draft q over one vocabulary."""
    return float(np.minimum(p, q).sum())


class SpecDecRow(BaseModel):
    """One gamma of a speculative-decoding result, predicted or measured."""

    gamma: int
    expected_tokens_per_step: float  # mean tokens emitted per target pass
    tokens_per_s: float
    speedup: float  # tokens_per_s over autoregressive tokens_per_s
    speedup_formula: float  # Leviathan's walltime improvement from alpha and c (this row's c where given)
    c: float | None = None  # measured: the cost ratio at this gamma, the draft timed inside the runs


class SpecDecResult(BaseModel):
    """The schema shared by `simulator plan --json` (kind 'predicted') and
    `reference specdec --json` (kind 'measured'), so the two compare key for key."""

    kind: Literal["predicted", "measured"]
    device: str
    target: str
    draft: str
    alpha: float
    alpha_per_position: list[float] | None = None
    c: float  # draft step time / target step time (measured: pooled over the rows' c)
    c_isolated: float | None = None  # measured: the draft's step timed in a loop of its own, no target between
    autoregressive_tokens_per_s: float
    rows: list[SpecDecRow]
    best_gamma: int
