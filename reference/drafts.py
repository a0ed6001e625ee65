"""Drafts: what proposes the gamma tokens the target verifies.

- `ModelDraft(model)`: a separate small model, sampling from its own warped distribution;
- `ModelDraft(target, layers=[0, 1])`: self-speculative drafting, the target with its other layers
  skipped (Zhang et al. 2023 "Draft & Verify"; here the skipped layers are the top ones, an early
  exit the target was trained for, as in LayerSkip);
- `NgramDraft()`: prompt lookup (Saxena 2023), copying what followed the last occurrence of the
  current suffix; it gives tokens without probabilities, verified by the fixed-token rule.

A draft keeps its own state across steps: `start(prompt)`, then per step `propose(...)` and
`rollback(lengths)` once the verifier has decided how many of its tokens each row keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.model import Transformer
from reference.sampling import Sampling, sample, warp


class ModelDraft:
    """A transformer (or a subset of its layers) drafting by sampling, with its own KV cache.

    Invariant between steps: the cache holds each row's tokens except its last two (`pending`),
    which the next `propose` feeds first. Two, because after a fully accepted step the draft never
    saw its own last token d_gamma, and after a rejection the last token is new to it; feeding the
    same two every time keeps the step shape uniform across rows with different accepted lengths."""

    def __init__(self, model: Transformer, layers: list[int] | None = None, name: str | None = None):
        self.model, self.layers = model, layers
        skipped = "" if layers is None else f" ({len(layers)} of {model.spec.n_layers} layers)"
        self.name = name or model.spec.name + skipped
        self.vocab_size = model.spec.vocab_size
        self.cache = None
        self.pending = 2
        self._back = None  # offsets -pending .. -1 of the tokens fed first, kept between steps

    def start(self, prompt: torch.Tensor, max_len: int) -> None:
        """prompt [B, P]: prefill all but its last two tokens."""
        B, P = prompt.shape
        n_layers = None if self.layers is None else len(self.layers)
        self.cache = self.model.new_cache(B, max_len, n_layers)
        self.pending = min(P, 2)
        if P > 2:
            self.model(prompt[:, :-2], self.cache, self.layers)

    def propose(
        self, tokens: torch.Tensor, lengths: torch.Tensor, gamma: int, s: Sampling, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, S] (row b valid up to lengths[b]), w [B, gamma] uniforms ->
        draft tokens [B, gamma] and the warped distributions q [B, gamma, V] they were drawn from."""
        if self._back is None or len(self._back) != self.pending:
            self._back = torch.arange(-self.pending, 0, device=tokens.device)
        x = tokens.gather(1, lengths[:, None] + self._back)  # [B, pending]: each row's last `pending` tokens
        drafted, qs = [], []
        for i in range(gamma):
            logits = self.model(x, self.cache, self.layers)[:, -1]  # [B, V]
            q = warp(logits, s)
            d = sample(q, w[:, i])
            drafted.append(d)
            qs.append(q)
            x = d[:, None]
        return torch.stack(drafted, 1), torch.stack(qs, 1)

    def rollback(self, lengths: torch.Tensor, max_length: int | None = None) -> None:
        """Rows now hold lengths[b] tokens (at most max_length); keep all but the last two in the cache."""
        self.cache.rollback(lengths - 2, None if max_length is None else max(max_length - 2, 0))
        self.pending = 2


class NgramDraft:
    """Prompt lookup: find the latest earlier occurrence of the row's last n tokens (n = max_n down
    to 1, longest first) and propose the gamma tokens that followed it. No probabilities."""

    def __init__(self, vocab_size: int, max_n: int = 3):
        self.vocab_size, self.max_n = vocab_size, max_n
        self.name = f"ngram(n<={max_n})"

    def start(self, prompt: torch.Tensor, max_len: int) -> None:
        pass

    def rollback(self, lengths: torch.Tensor, max_length: int | None = None) -> None:
        pass

    def propose(
        self, tokens: torch.Tensor, lengths: torch.Tensor, gamma: int, s: Sampling, w: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        B, S = tokens.shape
        pos = torch.arange(S, device=tokens.device)
        last_idx = lengths[:, None] - 1  # [B, 1]
        # fallback when nothing matches: pretend the match ended at L-2, i.e. repeat the last token
        match_end = (lengths - 2).clamp_min(-1)
        found = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        for n in range(self.max_n, 0, -1):
            # match[b, j]: tokens[b, j-n+1 .. j] == tokens[b, L-n .. L-1], for an earlier end n-1 <= j <= L-2
            match = (pos >= n - 1) & (pos <= last_idx - 1)
            for t in range(n):
                suffix_t = tokens.gather(1, (last_idx - t).clamp_min(0))  # [B, 1]
                match &= F.pad(tokens, (t, 0))[:, :S] == suffix_t  # shifted[b, j] = tokens[b, j - t]
            latest = torch.where(match, pos, -1).amax(-1)  # [B], -1: none
            take = ~found & (latest >= 0)
            match_end = torch.where(take, latest, match_end)
            found |= take
        # copy positions j*+1, j*+2, ...; past the row's end the copy repeats with period L-1-j*, as
        # it would if the proposed tokens themselves were part of the text being matched
        period = (last_idx[:, 0] - match_end).clamp_min(1)
        src = match_end[:, None] + 1 + torch.arange(gamma, device=tokens.device) % period[:, None]
        return tokens.gather(1, src.clamp(0, S - 1)), None
