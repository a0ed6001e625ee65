"""Big Little Decoder (BiLD; Kim et al. 2023): the small model writes, the big model steps in.

Fallback: the small model proposes the next token from its distribution q; when its confidence
max_x q(x) is below the fallback threshold (or it has written `max_run` tokens the big model has
not seen), the token is not taken and the big model runs instead, one pass over every small-model
token since its last pass (non-autoregressive, like a verify pass) plus the position after them.
Rollback: in that pass the big model's distribution p_i at each small token y_i gives the paper's
distance d(p_i, y_i) = -log p_i(y_i), the cross-entropy between p_i and the one-hot of y_i; the
first y_i with d > -log(r), i.e. p_i(y_i) < r for the rollback threshold r in [0, 1], and
everything after it are dropped, and the big model's token replaces y_i. With no rollback the big
model's token follows the small tokens (the fallback token). Every pass writes one big-model token.
At the end a last pass checks the small tokens the big model has not seen, so every token kept
passed the rollback test.

The thresholds read each model's own distribution (softmax at temperature 1), as in the paper,
whatever the sampling settings; tokens are drawn from the warped distributions. Greedy, a rollback
threshold r >= 0.5 keeps only small tokens with p(y) >= 0.5, which are the big model's argmax: the
output equals the big model's greedy output (a self-adjusting draft length), while r < 0.5 keeps
some tokens the big model would not have chosen. BiLD is not exact: its output law is not the big
model's (`first_token_law` gives the first token's exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference.model import Transformer
from reference.sampling import Sampling, sample, warp
from simulator.errors import UserError

MAX_RUN = 10  # small-model tokens before the big model must look (the paper's implementation caps the run too)


def check_thresholds(fallback: float, rollback: float) -> None:
    for name, x in (("fallback", fallback), ("rollback", rollback)):
        if not 0.0 <= x <= 1.0:  # also NaN
            raise UserError(f"the {name} threshold must lie in [0, 1], got {x}")


@dataclass
class BildRun:
    tokens: torch.Tensor  # [1, P + max_new_tokens]
    small_steps: int  # small-model passes (one token each, two after a big pass that wrote one)
    big_passes: int  # big-model passes after the prefill
    big_query_tokens: int  # query tokens over those passes
    fallbacks: int  # passes called by low confidence
    forced: int  # passes called by the run cap or the end
    rollbacks: int  # passes that dropped small tokens
    small_kept: int  # small-model tokens in the output
    small_dropped: int  # small-model tokens rolled back
    kept_hist: list[int]  # [max_run + 1] big passes by the number of small tokens they kept (each pass emits those + 1)


@torch.inference_mode()
def bild_generate(
    big: Transformer, small: Transformer, prompt: torch.Tensor, max_new_tokens: int, fallback: float, rollback: float,
    s: Sampling, draw, max_run: int = MAX_RUN,
) -> BildRun:  # fmt: skip
    """prompt [1, P] -> BildRun with tokens [1, P + max_new_tokens]. `draw(n)` -> [1, n] uniforms.

    Caches: the big model's holds tokens [0, checked - 1), the small model's [0, small_len); tokens
    [checked, n) are the small model's, unseen by the big one."""
    check_thresholds(fallback, rollback)
    if max_run < 1:
        raise UserError(f"max_run (small-model tokens before the big model looks) must be >= 1, got {max_run}")
    if prompt.shape[0] != 1:
        raise UserError(f"BiLD runs one sequence at a time (batch 1), got {prompt.shape[0]} rows")
    P = prompt.shape[1]
    total = P + max_new_tokens
    room = total + 1
    buf = torch.zeros(1, room, dtype=torch.long, device=prompt.device)
    buf[:, :P] = prompt
    big_cache, small_cache = big.new_cache(1, room), small.new_cache(1, room)
    if P > 1:
        big(prompt[:, :-1], big_cache)
    n = checked = P
    small_len = 0
    st = dict(small_steps=0, big_passes=0, big_query_tokens=0, fallbacks=0, forced=0, rollbacks=0, small_kept=0, small_dropped=0)
    kept_hist = [0] * (max_run + 1)
    while n < total or checked < n:
        if n < total and n - checked < max_run:
            logits = small(buf[:, small_len:n], small_cache)[:, -1]  # [1, V]
            small_len = n
            st["small_steps"] += 1
            u = draw(1)[:, 0]
            if float(logits.softmax(-1).max()) >= fallback:  # confident: the small model's token stands
                buf[:, n] = sample(warp(logits, s), u)
                n += 1
                continue
            st["fallbacks"] += 1
        else:
            st["forced"] += 1
        k = n - checked  # small tokens the big model checks in this pass
        logits = big(buf[:, checked - 1 : n], big_cache)[0]  # [k + 1, V]: the distributions at checked .. n
        st["big_passes"] += 1
        st["big_query_tokens"] += k + 1
        y = buf[0, checked:n]
        p_y = logits[:k].softmax(-1).gather(-1, y[:, None])[:, 0]  # [k]
        bad = (p_y < rollback).nonzero()
        i = int(bad[0, 0]) if len(bad) else k  # first small token rolled back; k: none
        u = draw(1)[:, 0]
        if i < k:
            st["rollbacks"] += 1
            st["small_dropped"] += k - i
        st["small_kept"] += i
        kept_hist[i] += 1
        if i == k and n == total:  # the final check kept everything: nothing more to write
            checked = n
            break
        buf[:, checked + i] = sample(warp(logits[i : i + 1], s), u)
        n = checked = checked + i + 1
        big_cache.rollback(torch.tensor([n - 1], device=prompt.device), n - 1)
        if small_len > n - 1:
            small_len = n - 1
            small_cache.rollback(torch.tensor([small_len], device=prompt.device), small_len)
    return BildRun(buf[:, :total], **st, kept_hist=kept_hist)


def first_token_law(p_logits: torch.Tensor, q_logits: torch.Tensor, fallback: float, rollback: float, s: Sampling) -> torch.Tensor:
    """The law of BiLD's first generated token, [V], from the big and small models' logits at the
    prompt, [V] each (every small token is checked before the end, so the rollback test applies):

        max q_raw < f:  p
        otherwise:      q(x) [p_raw(x) >= r] + (sum_y q(y) [p_raw(y) < r]) p(x)

    q, p the warped distributions tokens are drawn from; q_raw, p_raw the models' softmax."""
    p_logits, q_logits = p_logits.detach().double(), q_logits.detach().double()
    p, q = warp(p_logits, s), warp(q_logits, s)
    if float(q_logits.softmax(-1).max()) < fallback:
        return p
    keep = p_logits.softmax(-1) >= rollback
    return q * keep + (q * ~keep).sum() * p
