"""Autoregressive and speculative generation, and their measurement as a `SpecDecResult`.

Both loops are batched; in the speculative one each row accepts its own number of draft tokens
per step, so rows drift apart, and every cache keeps per-row lengths. The only host sync per step
reads the shortest and longest row length: whether every row is done, and how far attention reads.
Statistics are kept as tensors per step and reduced once at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from reference.drafts import ModelDraft, NgramDraft
from reference.model import Transformer
from reference.sampling import Sampling, acceptance_probability, fixed_token_probs, sample, verify, warp
from reference.timing import measure
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
        """Mean tokens a row gains per target pass, n + 1 (counting overshoot past the end)."""
        n = torch.arange(len(self.n_hist), dtype=torch.float64)
        return float(((n + 1) * self.n_hist).sum() / self.n_hist.sum())


@torch.inference_mode()
def speculative_generate(
    target: Transformer, draft: Draft, prompt: torch.Tensor, max_new_tokens: int, gamma: int, s: Sampling, draw: Draw
) -> SpecRun:
    """prompt [B, P] -> `SpecRun` with tokens [B, P + max_new_tokens], distributed exactly as
    `autoregressive_generate` with the target (and equal to it token for token when greedy).

    Invariant per row b, holding lengths[b] tokens: the target cache holds all but the last one."""
    B, P = prompt.shape
    dev, V = prompt.device, target.spec.vocab_size
    total = P + max_new_tokens
    room = total + gamma + 1  # finished rows keep stepping in place; their writes land past `total`
    buf = torch.zeros(B, room, dtype=torch.long, device=dev)
    buf[:, :P] = prompt
    lengths = torch.full((B,), P, dtype=torch.long, device=dev)
    cache = target.new_cache(B, room)
    if P > 1:
        target(prompt[:, :-1], cache)
    draft.start(prompt, room)
    history = []  # per step (beta [B, gamma], n [B], active [B]): statistics, reduced after the loop
    ahead = torch.arange(gamma + 1, device=dev)
    while True:
        u = draw(2 * gamma + 1)  # [B, 2 gamma + 1]: gamma for drafting, gamma for accepting, 1 for the last token
        d, q = draft.propose(buf, lengths, gamma, s, u[:, :gamma])  # [B, gamma], [B, gamma, V]
        if q is None:
            q = fixed_token_probs(d, V, target.embed.weight.dtype)
        x = torch.cat((buf.gather(1, lengths[:, None] - 1), d), dim=1)  # [B, gamma+1]: last token, drafts
        p = warp(target(x, cache), s)  # [B, gamma+1, V]: one target pass scores every draft position
        n, nxt = verify(p, q, d, u[:, gamma : 2 * gamma], u[:, 2 * gamma])
        history.append((acceptance_probability(p[:, :gamma], q), n, lengths < total))
        # emit d_1..d_n then the next token, at positions lengths .. lengths + n; beyond that is scratch
        out = torch.where(ahead < n[:, None], torch.cat((d, d[:, :1]), dim=1), nxt[:, None])
        buf.scatter_(1, lengths[:, None] + ahead, out)
        lengths = torch.clamp_max(lengths + n + 1, total)  # finished rows step in place
        shortest, longest = torch.stack(lengths.aminmax()).tolist()  # the host sync of the step
        cache.rollback(lengths - 1, longest - 1)  # drop the target's entries of rejected drafts, per row
        draft.rollback(lengths, longest)
        if shortest == total:
            break
    # statistics of the rows still active at each step: draft position i was looked at iff n >= i
    beta, n, active = (torch.stack(h) for h in zip(*history, strict=True))  # [steps, B, gamma], [steps, B] x 2
    reached = (ahead[:gamma] <= n[..., None]) & active[..., None]
    beta_sum = (beta.double() * reached).sum((0, 1))
    n_hist = torch.zeros(gamma + 1, dtype=torch.long, device=dev).index_add_(0, n[active], torch.ones_like(n[active]))
    return SpecRun(buf[:, :total], len(history), beta_sum.cpu(), n_hist.cpu())


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


def draft_step_time_s(
    draft: Draft, prompt: torch.Tensor, max_new_tokens: int, s: Sampling, seed: int, repeats: int
) -> float:
    """Time of one draft step, the numerator of Leviathan's c: a decode step of the draft network
    (autoregressive, like the target's step it is divided by), or for the n-gram draft one lookup
    over a history as long as the generation."""
    B, P = prompt.shape
    if isinstance(draft, ModelDraft):

        def run():
            autoregressive_generate(
                draft.model, prompt, max_new_tokens, s, seeded_draws(B, seed, prompt.device), draft.layers
            )

        return measure(run, repeats).median_s / max_new_tokens
    history = prompt.repeat(1, -(-(P + max_new_tokens) // P))  # [B, >= P + max_new]: the prompt, repeated
    lengths = torch.full((B,), history.shape[1], dtype=torch.long, device=prompt.device)
    w = seeded_draws(B, seed, prompt.device)(1)
    return measure(lambda: draft.propose(history, lengths, 1, s, w), 20 * repeats).median_s


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
    """Medians of `repeats` timed runs of the autoregressive target, of the draft, and of speculative
    decoding at each gamma. One run generates `sequences` continuations of the prompt one after the
    other, with seeds seed, seed + 1, ...: every repeat does the same work, and alpha and the tokens
    per step average over several sequences.

    alpha is E[beta] over the draft positions the verifier reached, pooled over all gammas;
    c = draft step time / target step time; the formula column is Leviathan's walltime improvement
    (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1)) from those two measured numbers."""
    B, dev = prompt.shape[0], prompt.device
    new_tokens = sequences * B * max_new_tokens
    seeds = range(seed, seed + sequences)

    def autoregressive():
        for k in seeds:
            autoregressive_generate(target, prompt, max_new_tokens, s, seeded_draws(B, k, dev))

    ar_s = measure(autoregressive, repeats).median_s
    c = draft_step_time_s(draft, prompt, max_new_tokens, s, seed, repeats) / (ar_s / sequences / max_new_tokens)

    runs: dict[int, list[SpecRun]] = {}
    times: dict[int, float] = {}
    for gamma in gammas:

        def speculative(gamma=gamma):
            runs[gamma] = [
                speculative_generate(target, draft, prompt, max_new_tokens, gamma, s, seeded_draws(B, k, dev))
                for k in seeds
            ]

        times[gamma] = measure(speculative, repeats).median_s
    g_max = max(gammas)
    beta, reached = torch.zeros(g_max, dtype=torch.float64), torch.zeros(g_max, dtype=torch.long)
    for gamma, rs in runs.items():
        for r in rs:
            beta[:gamma] += r.beta_sum
            reached[:gamma] += r.reached
    alpha = float(beta.sum() / reached.sum())
    # positions no step reached (all earlier drafts never accepted together) have no estimate: left off
    alpha_per_position = [float(b / n) for b, n in zip(beta, reached, strict=True) if n]
    ar_tps = new_tokens / ar_s
    rows = [
        SpecDecRow(
            gamma=gamma,
            expected_tokens_per_step=float(sum(r.tokens_per_step for r in runs[gamma]) / sequences),
            tokens_per_s=new_tokens / times[gamma],
            speedup=(new_tokens / times[gamma]) / ar_tps,
            speedup_formula=walltime_improvement(alpha, gamma, c),
        )
        for gamma in gammas
    ]
    return SpecDecResult(
        kind="measured",
        device=str(dev),
        target=target.spec.name,
        draft=draft.name,
        alpha=alpha,
        alpha_per_position=alpha_per_position,
        c=c,
        autoregressive_tokens_per_s=ar_tps,
        rows=rows,
        best_gamma=max(rows, key=lambda r: r.speedup).gamma,
    )
