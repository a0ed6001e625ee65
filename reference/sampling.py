"""Sampling: logit warping, inverse-CDF draws, and the exact speculative verifier.

Everything here takes its randomness as uniform draws in [0, 1), so the law of every output is a
function of the inputs alone and can be computed exactly by enumeration (tests/test_sampling_exact.py).
Warping is one function applied to draft and target alike: the verifier is exact only when the
draft probabilities it is given are the ones the draft tokens were really drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simulator.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k None and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def check(self) -> Sampling:
        if not self.temperature >= 0:  # also rejects NaN
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p must lie in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top-k must be >= 1, got {self.top_k}")
        return self


def warp(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Logits [..., V] -> the distribution actually sampled from, [..., V].

    temperature 0: one-hot at the argmax (first on ties). Otherwise softmax(logits / T) restricted
    to the top_k largest (ties with the k-th kept) and then to the smallest prefix, in descending
    order, whose mass reaches top_p (the nucleus; Holtzman et al. 2020), renormalised. A T below the
    smallest normal number of the logits' dtype (1.2e-38 in float32 and bfloat16, 6.1e-5 in float16)
    gives the limit T -> 0: the argmax, ties sharing its mass (such a T is a subnormal number, which
    flush-to-zero arithmetic reads as 0, or its reciprocal overflows); a small T otherwise divides
    the logits after their maximum is taken off (softmax does not change), so that no logit / T
    overflows into NaN."""
    if s.temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    if s.temperature < torch.finfo(logits.dtype).tiny:  # then 1 / T may overflow, or T flush to 0 (0 / 0 = NaN)
        top = (logits == logits.amax(-1, keepdim=True)).to(logits.dtype)
        return top / top.sum(-1, keepdim=True)
    z = logits if s.temperature == 1 else (logits - logits.amax(-1, keepdim=True)) / s.temperature
    if s.top_k is not None and s.top_k < z.shape[-1]:
        kth = z.topk(s.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if s.top_p < 1:
        sorted_p, order = z.softmax(-1).sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        drop_sorted = mass_before >= s.top_p  # never the first: mass_before = 0 < top_p
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return z.softmax(-1)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: probs [..., V] summing to 1, u [...] uniform in [0, 1) -> tokens [...], the smallest
    x with u < cdf(x). Does not renormalise: if u falls past the total mass (by float rounding, or
    because probs lacks mass) the token is the most likely one, never one of probability 0."""
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, u.to(cdf.dtype).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return torch.where(token < probs.shape[-1], token, probs.argmax(-1))


def fixed_token_probs(tokens: torch.Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed-token rule for drafts without probabilities (n-grams, lookup): treat each proposed
    token as drawn from a point mass, q = one_hot(token). The verifier then accepts d with
    probability min(1, p(d)/1) = p(d) and on rejection resamples from norm(p with d removed):
    exact whatever produced the token, as long as it did not look at the verifier's draws."""
    return F.one_hot(tokens, vocab_size).to(dtype)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """beta = sum_x min(p(x), q(x)) = 1 - TV(p, q): the chance a draft token drawn from q is accepted
    (Leviathan et al. 2023, Def. 3.1); alpha = E[beta]. [..., V] -> [...]."""
    return torch.minimum(p, q).sum(-1)


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """The verifier's arithmetic: float64, or float32 on Apple's MPS, which has no float64. The
    residual's running sum and the scaled uniform in float16 / bfloat16 would be off by up to 5e-4
    (an 11-bit / 8-bit significand); after the upcast the law is that of the inputs' own values."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def accept(u: torch.Tensor, p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """Accept d_i with probability min(1, p_i(d_i) / q_i(d_i)): u_i < p/q <=> u_i q < p, with no
    division (q_i(d_i) > 0, since d_i was drawn from q_i). [B, gamma] -> bool [B, gamma]."""
    return u * q_d < p_d


def next_token_sources(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What the token after n accepted drafts is drawn from, for every n, unnormalised: on a rejection
    at position n < gamma the residual max(0, p_n - q_n); after gamma acceptances p_gamma itself,
    the bonus token. p [B, gamma+1, V], q [B, gamma, V] -> [B, gamma+1, V]."""
    gamma = q.shape[1]
    return torch.cat(((p[:, :gamma] - q).clamp_min(0), p[:, gamma:]), dim=1)


def sample_unnormalised(mass: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of norm(mass), as in `sample`, with the draw scaled instead of the mass: the
    smallest x with v * total < cdf(x). mass [B, V] >= 0, v [B] -> [B]; V where no x qualifies."""
    cdf = mass.cumsum(-1)
    return torch.searchsorted(cdf, v[:, None].to(cdf.dtype) * cdf[:, -1:], right=True)[:, 0]


def verify(
    p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023): emits n accepted draft
    tokens plus one more, together distributed exactly as gamma + 1 autoregressive draws from p.

    p [B, gamma+1, V]: warped target distributions after the prefix and after each draft token;
    q [B, gamma, V]: the warped draft distributions each draft token was drawn from;
    draft_tokens [B, gamma]; u [B, gamma], v [B]: uniform draws in [0, 1).
    Returns n_accepted [B] in 0..gamma and next_token [B].
    Computed in `working_dtype` (float64; float32 on MPS) whatever the inputs' dtype. Its steps
    (`accept`, `next_token_sources`, `sample_unnormalised`) are module functions, so a test can
    replace one with a known-wrong variant."""
    B, gamma = draft_tokens.shape
    work = working_dtype(p)
    p, q, u, v = p.to(work), q.to(work), u.to(work), v.to(work)
    at_d = draft_tokens[..., None]
    # p_i(d_i) and q_i(d_i): [B, gamma]
    p_d = p[:, :gamma].gather(-1, at_d)[..., 0]
    q_d = q.gather(-1, at_d)[..., 0]
    accepted = accept(u, p_d, q_d)
    # n = length of the run of acceptances from the start; later positions are discarded
    n = accepted.cumprod(-1).sum(-1)  # [B] int64
    # the next token comes from position n: one gather from the residuals and the bonus distribution
    at_n = n[:, None, None].expand(B, 1, p.shape[-1])
    token = sample_unnormalised(next_token_sources(p, q).gather(1, at_n)[:, 0], v)  # [B]
    # a rejection means p_n(d) < q_n(d), so some x has p_n(x) > q_n(x) and the mass is > 0; float
    # rounding can leave none (p_n = q_n but for rounding), and then the token is p_n's most likely
    return n, torch.where(token < p.shape[-1], token, p.gather(1, at_n)[:, 0].argmax(-1))
