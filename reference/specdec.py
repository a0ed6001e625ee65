"""Autoregressive and speculative generation, and their measurement as a `SpecDecResult`.

Both loops are batched; in the speculative one each row accepts its own number of draft tokens
per step, so rows drift apart, and every cache keeps per-row lengths. The only host sync per step
reads the shortest and longest row length: whether every row is done, and how far attention reads.
Statistics are running sums kept on the device: a run's memory does not grow with its steps.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from reference.drafts import ModelDraft, NgramDraft
from reference.model import Transformer
from reference.sampling import Sampling, acceptance_probability, fixed_token_probs, sample, verify, warp
from reference.timing import Stopwatch, measure, measure_interleaved
from simulator.errors import UserError
from simulator.speculative import SpecDecResult, SpecDecRow, walltime_improvement

Draw = Callable[[int], torch.Tensor]  # n -> [B, n] uniforms in [0, 1)
Draft = ModelDraft | NgramDraft


def seeded_draws(batch: int, seed: int, device: str | torch.device = "cpu") -> Draw:
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda n: torch.rand(batch, n, generator=g, device=device)


@torch.inference_mode()
def autoregressive_generate(
    model: Transformer, prompt: torch.Tensor, max_new_tokens: int, s: Sampling, draw: Draw, layers=None
) -> torch.Tensor:
    """prompt [B, P] -> [B, P + max_new_tokens]: one forward pass and one draw per token."""
    B, P = prompt.shape
    cache = model.new_cache(B, P + max_new_tokens, None if layers is None else len(layers))
    out = torch.empty(B, P + max_new_tokens, dtype=torch.long, device=prompt.device)
    out[:, :P] = prompt
    logits = model(prompt, cache, layers)[:, -1]
    for i in range(max_new_tokens):
        token = sample(warp(logits, s), draw(1)[:, 0])
        out[:, P + i] = token
        if i + 1 < max_new_tokens:
            logits = model(token[:, None], cache, layers)[:, -1]
    return out


@dataclass
class SpecRun:
    """One speculative generation: its tokens and its per-draft-position statistics."""

    tokens: torch.Tensor  # [B, P + max_new_tokens]
    steps: int  # target passes
    beta_sum: torch.Tensor  # [gamma] sum of beta = sum_x min(p, q) over the (row, step) pairs reaching position i
    n_hist: torch.Tensor  # [gamma + 1] (row, step) pairs of active rows by number of accepted drafts

    @property
    def reached(self) -> torch.Tensor:
        """[gamma] pairs whose verifier looked at draft position i: n >= i."""
        return self.n_hist.flip(0).cumsum(0).flip(0)[:-1]

    @property
    def accepted(self) -> torch.Tensor:
        """[gamma] pairs that accepted draft position i: n > i."""
        return self.n_hist.flip(0).cumsum(0).flip(0)[1:]

    @property
    def tokens_per_step(self) -> float:
        return tokens_per_step(self.n_hist)


def tokens_per_step(n_hist: torch.Tensor) -> float:
    """Mean tokens a row gains per target pass, n + 1 (counting overshoot past the end), from the
    histogram of n, the draft tokens a pass accepted."""
    n = torch.arange(len(n_hist), dtype=torch.float64)
    return float(((n + 1) * n_hist).sum() / n_hist.sum())


def start_generation(target: Transformer, draft, prompt: torch.Tensor, room: int):
    """A speculative loop's state before its first step: the token buffer of `room` columns
    holding the prompt, each row's length, and the target's cache holding all of the prompt but
    its last token (which the first pass feeds); the draft started on the prompt."""
    B, P = prompt.shape
    buf = torch.zeros(B, room, dtype=torch.long, device=prompt.device)
    buf[:, :P] = prompt
    lengths = torch.full((B,), P, dtype=torch.long, device=prompt.device)
    cache = target.new_cache(B, room)
    if P > 1:
        target(prompt[:, :-1], cache)
    draft.start(prompt, room)
    return buf, lengths, cache


@torch.inference_mode()
def speculative_generate(
    target: Transformer,
    draft: Draft,
    prompt: torch.Tensor,
    max_new_tokens: int,
    gamma: int,
    s: Sampling,
    draw: Draw,
    stopwatch: Stopwatch | None = None,
) -> SpecRun:
    """prompt [B, P] -> `SpecRun` with tokens [B, P + max_new_tokens], distributed exactly as
    `autoregressive_generate` with the target (and equal to it token for token when greedy).
    A `stopwatch`, if given, times the draft's proposals where they run, between target passes.

    Invariant per row b, holding lengths[b] tokens: the target cache holds all but the last one."""
    B, P = prompt.shape
    dev, V = prompt.device, target.spec.vocab_size
    total = P + max_new_tokens
    room = total + gamma + 1  # finished rows keep stepping in place; their writes land past `total`
    buf, lengths, cache = start_generation(target, draft, prompt, room)
    # statistics as running sums on the device (no host sync), so no step's p or q outlives the next step
    beta_sum = torch.zeros(gamma, dtype=torch.float64, device=dev)
    n_hist = torch.zeros(gamma + 1, dtype=torch.long, device=dev)
    steps = 0
    ahead = torch.arange(gamma, device=dev)
    last = prompt[:, -1:]  # [B, 1]: each row's last token, the one the target cache lacks
    while True:
        u = draw(2 * gamma + 1)  # [B, 2 gamma + 1]: gamma for drafting, gamma for accepting, 1 for the last token
        if stopwatch is not None:
            stopwatch.start()
        d, q = draft.propose(buf, lengths, gamma, s, u[:, :gamma])  # [B, gamma], [B, gamma, V]
        if stopwatch is not None:
            stopwatch.stop()
        if q is None:
            q = fixed_token_probs(d, V, target.embed.weight.dtype)
        p = warp(target(torch.cat((last, d), dim=1), cache), s)  # [B, gamma+1, V]: one pass scores every draft
        n, nxt = verify(p, q, d, u[:, gamma : 2 * gamma], u[:, 2 * gamma])
        # rows still active before the step; draft position i was looked at iff n >= i
        active = lengths < total  # [B]
        reached = (ahead <= n[:, None]) & active[:, None]  # [B, gamma]
        beta_sum += (acceptance_probability(p[:, :gamma], q).double() * reached).sum(0)
        n_hist.index_add_(0, n, active.long())
        steps += 1
        # emit d_1..d_n then the next token at position lengths + n (overwriting d_n+1); past it is scratch
        buf.scatter_(1, lengths[:, None] + ahead, d)
        last = nxt[:, None]
        buf.scatter_(1, (lengths + n)[:, None], last)
        lengths = (lengths + n + 1).clamp_max(total)  # finished rows step in place (their `last` is scratch)
        per_row = lengths.tolist()  # the host sync of the step
        shortest, longest = min(per_row), max(per_row)
        cache.rollback(lengths - 1, longest - 1)  # drop the target's entries of rejected drafts, per row
        draft.rollback(lengths, longest)
        if shortest == total:
            break
    return SpecRun(buf[:, :total], steps, beta_sum.cpu(), n_hist.cpu())


def check_pair(target: Transformer, draft: Draft, prompt: list[int], gamma: int, s: Sampling) -> None:
    """Bad input caught before any work, as `UserError`."""
    if draft.vocab_size != target.spec.vocab_size:
        raise UserError(
            f"draft vocabulary ({draft.vocab_size} tokens) differs from the target's ({target.spec.vocab_size}); "
            "speculative sampling compares p and q token by token, so both must share one vocabulary"
        )
    if gamma < 1:
        raise UserError(f"gamma (draft tokens per step) must be >= 1, got {gamma}")
    if not prompt:
        raise UserError("the prompt is empty; give at least one character")
    if max(prompt) >= target.spec.vocab_size:
        raise UserError(f"prompt token {max(prompt)} is outside the target's vocabulary of {target.spec.vocab_size}")
    s.check()


def isolated_draft_step(draft: Draft, prompt: torch.Tensor, max_new_tokens: int, s: Sampling, seed: int):
    """(function, steps): `steps` draft steps with nothing else between them: the draft network
    decoding on its own, or for the n-gram draft lookups over a history as long as the generation."""
    B, P = prompt.shape
    if isinstance(draft, ModelDraft):

        def run():
            autoregressive_generate(
                draft.model, prompt, max_new_tokens, s, seeded_draws(B, seed, prompt.device), draft.layers
            )

        return run, max_new_tokens
    history = prompt.repeat(1, -(-(P + max_new_tokens) // P))  # [B, >= P + max_new]: the prompt, repeated
    lengths = torch.full((B,), history.shape[1], dtype=torch.long, device=prompt.device)
    w = seeded_draws(B, seed, prompt.device)(1)

    def lookups():
        for _ in range(max_new_tokens):
            draft.propose(history, lengths, 1, s, w)

    return lookups, max_new_tokens


@torch.inference_mode()
def verify_pass_ratio(target: Transformer, prompt: torch.Tensor, context: int, gamma: int, repeats: int) -> float:
    """v(gamma): time of one target pass over gamma + 1 new tokens over a one-token decode step, both
    after `context` cached tokens. Leviathan's formula takes v = 1 (a pass costs the same whatever
    the query length, true while the pass is memory-bound); on a CPU a small GEMM is not."""
    B = prompt.shape[0]
    cache = target.new_cache(B, context + gamma + 1)
    target(prompt.repeat(1, -(-context // prompt.shape[1]))[:, :context], cache)
    kept = cache.lengths

    def passes(tokens: int) -> float:
        x = prompt[:, :1].expand(B, tokens)

        def run():
            for _ in range(20):
                cache.rollback(kept, context)
                target(x, cache)

        return measure(run, repeats).median_s

    return passes(gamma + 1) / passes(1)


def measure_specdec(
    target: Transformer,
    draft: Draft,
    prompt: torch.Tensor,
    max_new_tokens: int,
    gammas: list[int],
    s: Sampling,
    seed: int,
    repeats: int = 5,
    sequences: int = 1,
) -> SpecDecResult:
    """Medians of `repeats` timed rounds; each round runs the autoregressive target, the draft alone,
    and speculative decoding at each gamma, in turns, so a shared machine's drifts fall on all alike.
    One run generates `sequences` continuations of the prompt one after the other, with seeds
    seed, seed + 1, ...: every repeat does the same work, and alpha and the tokens per step average
    over several sequences.

    alpha is E[beta] over the draft positions the verifier reached, pooled over all gammas.
    c is Leviathan's cost ratio, the draft's time per step over the target's time per token, with
    the draft timed where it runs: a stopwatch around its proposals inside the speculative runs,
    per gamma (row.c) and pooled (c). A draft step right after a target pass is slower than one in
    a loop of its own, whose caches stay warm; that tight-loop ratio is kept as `c_isolated`. The
    formula column is Leviathan's walltime improvement (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1))
    from alpha and the row's c: what the algorithm gains if the verifier, the bookkeeping and a pass
    over gamma + 1 tokens instead of 1 cost nothing extra."""
    B, dev = prompt.shape[0], prompt.device
    new_tokens = sequences * B * max_new_tokens
    seeds = range(seed, seed + sequences)

    def autoregressive():
        for k in seeds:
            autoregressive_generate(target, prompt, max_new_tokens, s, seeded_draws(B, k, dev))

    isolated, isolated_steps = isolated_draft_step(draft, prompt, max_new_tokens, s, seed)
    runs: dict[int, list[SpecRun]] = {}
    draft_s: dict[int, list[float]] = {gamma: [] for gamma in gammas}  # per round: seconds per draft step

    def speculative(gamma: int):
        def run():
            watch = Stopwatch(dev)
            runs[gamma] = [
                speculative_generate(target, draft, prompt, max_new_tokens, gamma, s, seeded_draws(B, k, dev), watch)
                for k in seeds
            ]
            draft_s[gamma].append(watch.seconds / (gamma * sum(r.steps for r in runs[gamma])))

        return run

    fns = {"autoregressive": autoregressive, "draft": isolated} | {g: speculative(g) for g in gammas}
    timings = measure_interleaved(fns, repeats)
    step_s = timings["autoregressive"].median_s / (sequences * max_new_tokens)
    row_c = {g: statistics.median(draft_s[g][-repeats:]) / step_s for g in gammas}  # the timed rounds'
    draft_steps = {g: g * sum(r.steps for r in runs[g]) for g in gammas}
    c = sum(row_c[g] * draft_steps[g] for g in gammas) / sum(draft_steps.values())
    g_max = max(gammas)
    beta, reached = torch.zeros(g_max, dtype=torch.float64), torch.zeros(g_max, dtype=torch.long)
    for gamma, rs in runs.items():
        for r in rs:
            beta[:gamma] += r.beta_sum
            reached[:gamma] += r.reached
    alpha = float(beta.sum() / reached.sum())
    # positions no step reached (all earlier drafts never accepted together) have no estimate: left off
    alpha_per_position = [float(b / n) for b, n in zip(beta, reached, strict=True) if n]
    ar_tps = new_tokens / timings["autoregressive"].median_s
    rows = []
    for gamma in gammas:
        tps = new_tokens / timings[gamma].median_s
        rows.append(
            SpecDecRow(
                gamma=gamma,
                expected_tokens_per_step=float(sum(r.tokens_per_step for r in runs[gamma]) / sequences),
                tokens_per_s=tps,
                speedup=tps / ar_tps,
                speedup_formula=walltime_improvement(alpha, gamma, row_c[gamma]),
                c=row_c[gamma],
            )
        )
    return SpecDecResult(
        kind="measured",
        device=str(dev),
        target=target.spec.name,
        draft=draft.name,
        alpha=alpha,
        alpha_per_position=alpha_per_position,
        c=c,
        c_isolated=timings["draft"].median_s / isolated_steps / step_s,
        autoregressive_tokens_per_s=ar_tps,
        rows=rows,
        best_gamma=max(rows, key=lambda r: r.speedup).gamma,
    )
