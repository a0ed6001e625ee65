"""Retrieval as the draft (REST, He et al. 2024): a datastore of text, its suffix array, and a
draft that proposes what most often followed the longest suffix of the context found there.

A datastore is the token sequence t[0..n) and its suffix array: the start positions sorted by the
first `depth` tokens of the suffix they start (ties kept in text order), built by prefix doubling
(Manber & Myers 1993) in numpy: rank by 1, 2, 4, ... tokens, each round one sort of the pairs
(rank of t[i..i+h), rank of t[i+h..i+2h)). Suffixes starting with a pattern of m <= depth tokens are
one contiguous range of the array, found by two binary searches.

The draft (`RetrievalDraft`) takes the longest suffix of the context, of at most `max_match`
tokens, that occurs in the datastore (binary search over its length: a suffix that occurs has
every shorter suffix occurring too), gathers the continuations of (a strided sample of at most
`max_candidates` of) its occurrences, and builds the linear draft token by token from the most
frequent next token among the continuations still agreeing with the draft so far (REST's trie,
walked along its most frequent branch). Its tokens come without probabilities and are verified by
the fixed-token rule (`reference.sampling.fixed_token_probs`): exact whatever the datastore holds.
"""

from __future__ import annotations

import hashlib
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from simulator.errors import UserError

DEPTH = 64  # suffixes sorted by their first 64 tokens: matches longer than that are not told apart
MAX_MATCH = 32  # longest context suffix looked up
MAX_CANDIDATES = 1024  # occurrences whose continuations vote (a strided sample of the range)
FORMAT = "specsim-datastore-1"


@dataclass(frozen=True)
class Datastore:
    tokens: np.ndarray  # [n] unsigned ints < vocab_size
    suffixes: np.ndarray  # [n] int32 (int64 past 2**31 tokens) start positions, sorted by their first `depth` tokens
    vocab_size: int
    depth: int
    source: str  # what the tokens were read from
    build_s: float  # seconds the suffix array took to build

    @property
    def size_bytes(self) -> int:
        return self.tokens.nbytes + self.suffixes.nbytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tokens.tobytes()).hexdigest()


def suffix_array(tokens: np.ndarray, depth: int = DEPTH) -> np.ndarray:
    """[n] tokens -> [n] start positions sorted by their first `depth` tokens (a suffix shorter than
    that sorts before every longer one it is a prefix of), in fact by their first h tokens, h the
    power of two >= depth; ties past h in text order. Prefix doubling: after the round of width h,
    rank[i] orders t[i .. i + h); one round is one sort."""
    n = len(tokens)
    rank = tokens.astype(np.int64) + 1  # 0 is kept for "past the end"
    h = 1
    while h < depth:
        nxt = np.zeros(n, dtype=np.int64)
        nxt[: max(n - h, 0)] = rank[h:]
        key = rank * (int(rank.max()) + 1) + nxt  # ranks < n + 2, so the key stays below 2**63 for n < 3e9
        uniq, inverse = np.unique(key, return_inverse=True)
        rank = inverse.astype(np.int64) + 1
        h *= 2
        if len(uniq) == n:  # every prefix already distinct
            break
    order = np.argsort(rank, kind="stable")
    return order.astype(np.int32) if n < 2**31 else order


def build_datastore(tokens, vocab_size: int, source: str, depth: int = DEPTH) -> Datastore:
    """A datastore of `tokens` (a sequence of ints in [0, vocab_size)); UserError if empty or out of range."""
    t = np.asarray(tokens)
    if t.size == 0:
        raise UserError(f"{source}: the corpus is empty; a datastore needs at least one token")
    if t.min() < 0 or t.max() >= vocab_size:
        raise UserError(f"{source}: token {int(t.max())} is outside the vocabulary of {vocab_size}")
    t = t.astype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)
    t0 = time.perf_counter()
    sa = suffix_array(t, depth)
    return Datastore(t, sa, vocab_size, depth, source, time.perf_counter() - t0)


def read_corpus(paths: list[Path]) -> bytes:
    """The bytes of text files, joined by newlines; UserError (one line) if one cannot be read or all are empty."""
    parts = []
    for p in paths:
        try:
            parts.append(Path(p).read_bytes())
        except OSError as exc:
            raise UserError(f"{p}: cannot read the corpus file: {exc.strerror or exc}") from None
    data = b"\n".join(parts)
    if not data.strip():
        raise UserError(f"the corpus ({', '.join(str(p) for p in paths)}) is empty; a datastore needs text")
    return data


def save_datastore(ds: Datastore, path: Path) -> None:
    from simulator.paths import write_atomically

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, format=FORMAT, tokens=ds.tokens, suffixes=ds.suffixes, vocab_size=ds.vocab_size, depth=ds.depth,
                     source=ds.source, build_s=ds.build_s)  # fmt: skip

    write_atomically(Path(path), write)


def load_datastore(path: Path, vocab_size: int | None = None) -> Datastore:
    """A datastore file `save_datastore` wrote; UserError if it is not one, or was built for another
    vocabulary than `vocab_size`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or str(f["format"]) != FORMAT:
                raise UserError(f"{path}: not a datastore file (write one with `python -m reference datastore`)")
            ds = Datastore(f["tokens"], f["suffixes"], int(f["vocab_size"]), int(f["depth"]), str(f["source"]),
                           float(f["build_s"]))  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot read the datastore: {exc}") from None
    if vocab_size is not None and ds.vocab_size != vocab_size:
        raise UserError(f"{path}: the datastore was built for a vocabulary of {ds.vocab_size} tokens, the target has {vocab_size}")
    if len(ds.tokens) != len(ds.suffixes) or len(ds.tokens) == 0:
        raise UserError(f"{path}: a datastore's tokens and suffix array differ in length (or are empty)")
    return ds


class Lookup:
    """Longest-suffix lookup and continuation voting over one datastore."""

    def __init__(self, ds: Datastore, max_match: int = MAX_MATCH, max_candidates: int = MAX_CANDIDATES):
        self.ds, self.max_match, self.max_candidates = ds, min(max_match, ds.depth), max_candidates
        self.width = ds.tokens.dtype.itemsize
        self._raw = ds.tokens.astype(f">u{self.width}").tobytes()  # big-endian: bytes order = token order
        self._sa = ds.suffixes

    def _range(self, pattern: bytes) -> tuple[int, int]:
        """[lo, hi): the suffix-array positions whose suffix starts with `pattern` (m tokens, encoded)."""
        w, raw = self.width, self._raw
        m = len(pattern)

        def key(i):
            return raw[w * i : w * i + m]

        return bisect_left(self._sa, pattern, key=key), bisect_right(self._sa, pattern, key=key)

    def longest_match(self, context: list[int]) -> tuple[int, int, int]:
        """(m, lo, hi): the longest suffix of `context` (m tokens, at most max_match) found in the
        datastore and its range; m = 0 when not even the last token occurs."""
        ctx = np.asarray(context[-self.max_match :], dtype=f">u{self.width}").tobytes()
        w = self.width
        best = (0, 0, 0)
        lo_m, hi_m = 1, len(ctx) // w  # occurs(m) is monotone: search the largest m that occurs
        while lo_m <= hi_m:
            m = (lo_m + hi_m) // 2
            lo, hi = self._range(ctx[len(ctx) - w * m :])
            if hi > lo:
                best, lo_m = (m, lo, hi), m + 1
            else:
                hi_m = m - 1
        return best

    def continuation(self, context: list[int], gamma: int) -> tuple[list[int], int]:
        """(at most gamma tokens, match length m): the most frequent continuation, token by token,
        of the longest suffix of `context` found; [] when nothing matches."""
        m, lo, hi = self.longest_match(context)
        if m == 0:
            return [], 0
        cont = self._continuations(m, lo, hi, gamma)
        k = len(cont)
        out: list[int] = []
        alive = np.ones(k, dtype=bool)
        for j in range(gamma):
            col = cont[alive, j]
            col = col[col >= 0]
            if col.size == 0:
                break
            best = int(np.bincount(col).argmax())
            out.append(best)
            alive &= cont[:, j] == best
        return out, m

    def _continuations(self, m: int, lo: int, hi: int, length: int) -> np.ndarray:
        """[k, length] the `length` tokens after (a strided sample of at most max_candidates of) the
        occurrences in [lo, hi) of an m-token match; -1 past the datastore's end."""
        count = hi - lo
        k = min(count, self.max_candidates)
        starts = self._sa[lo + (np.arange(k) * count) // k].astype(np.int64) + m  # [k]
        n = len(self.ds.tokens)
        cols = starts[:, None] + np.arange(length)  # [k, length]
        return np.where(cols < n, self.ds.tokens[np.minimum(cols, n - 1)].astype(np.int64), -1)

    def tree(self, context: list[int], parent: list[int], node_rank: list[int], node_depth: list[int]) -> tuple[list[int], int]:
        """(tokens of a token tree's nodes, match length): node 0 the context's last token; node i,
        at depth d with rank r, the r-th most frequent token (ties: the smaller) at offset d among the
        continuations agreeing with its ancestors (REST's trie, its r-th branch); where they hold no
        such token, the parent's token again (a point mass the verifier then rejects for free)."""
        m, lo, hi = self.longest_match(context)
        cont = self._continuations(m, lo, hi, max(node_depth)) if m else np.zeros((0, max(node_depth)), dtype=np.int64)
        toks = [context[-1]] + [0] * (len(parent) - 1)
        alive = {0: np.ones(len(cont), dtype=bool)}
        for i in range(1, len(parent)):
            d, a = node_depth[i], alive[parent[i]]
            col = cont[a, d - 1]
            col = col[col >= 0]
            counts = np.bincount(col, minlength=self.ds.vocab_size) if col.size else None
            order = None if counts is None else np.argsort(-counts, kind="stable")
            r = node_rank[i]
            toks[i] = int(order[r]) if order is not None and r < len(order) and counts[order[r]] > 0 else toks[parent[i]]
            alive[i] = a & (cont[:, d - 1] == toks[i])
        return toks, m

    def draft(self, context: list[int], gamma: int) -> tuple[list[int], int]:
        """Exactly gamma tokens and the first lookup's match length: continuations looked up again
        from the context extended by the draft so far when one runs out (at the datastore's end, or
        where the votes thin out); the last token repeated when nothing matches at all."""
        out, m0 = self.continuation(context, gamma)
        while len(out) < gamma:
            more, m = self.continuation(context + out, gamma - len(out))
            if not more:
                last = (context + out)[-1]
                out += [last] * (gamma - len(out))
            out += more
        return out[:gamma], m0


class RetrievalDraft:
    """The draft interface of `reference.drafts` over a datastore: proposes tokens only (q None)."""

    def __init__(self, ds: Datastore, max_match: int = MAX_MATCH, max_candidates: int = MAX_CANDIDATES):
        self.lookup = Lookup(ds, max_match, max_candidates)
        self.vocab_size = ds.vocab_size
        self.name = f"retrieval({ds.source})"
        self.match_sum, self.lookups = 0, 0  # running statistics: mean matched suffix length

    def start(self, prompt: torch.Tensor, max_len: int) -> None:
        pass

    def rollback(self, lengths: torch.Tensor, max_length: int | None = None) -> None:
        pass

    def propose(self, tokens: torch.Tensor, lengths: torch.Tensor, gamma: int, s, w) -> tuple[torch.Tensor, None]:
        rows = []
        for b, n in enumerate(lengths.tolist()):
            d, m = self.lookup.draft(tokens[b, max(0, n - self.lookup.max_match) : n].tolist(), gamma)
            rows.append(d)
            self.match_sum += m
            self.lookups += 1
        return torch.tensor(rows, dtype=tokens.dtype, device=tokens.device), None


class RetrievalTreeDraft:
    """A token tree from the datastore (REST's trie): node (r_1, ..., r_d) of rank paths `paths` holds
    the r_d-th most frequent continuation token below its parent (`Lookup.tree`), the same shape for
    every row, each a point mass verified by `reference.tree.verify_tree` (exact). Host work only;
    `seconds` adds up the time of its proposals."""

    def __init__(self, ds: Datastore, paths: list[tuple[int, ...]], max_match: int = MAX_MATCH, max_candidates: int = MAX_CANDIDATES):
        from reference.medusa import tree_layout

        self.lookup = Lookup(ds, max_match, max_candidates)
        self.vocab_size = ds.vocab_size
        self.parent, self.node_depth, self.node_rank = tree_layout(paths)
        self.n_nodes, self.depth = len(self.parent), max(len(p) for p in paths)
        self.name = f"retrieval tree of {len(paths)} nodes ({ds.source})"
        self.seconds = 0.0

    def start(self, prompt: torch.Tensor, max_len: int) -> None:
        pass

    def rollback(self, path: torch.Tensor, lengths: torch.Tensor, max_length: int) -> None:
        pass

    def propose(self, tokens: torch.Tensor, lengths: torch.Tensor, s, w):
        from reference.sampling import fixed_token_probs
        from reference.tree import TokenTree

        t0 = time.perf_counter()
        rows = []
        for b, n in enumerate(lengths.tolist()):
            toks, _ = self.lookup.tree(tokens[b, max(0, n - self.lookup.max_match) : n].tolist(), self.parent, self.node_rank, self.node_depth)
            rows.append(toks)
        B, dev = tokens.shape[0], tokens.device
        tree_tokens = torch.tensor(rows, dtype=torch.long, device=dev)
        parent = torch.tensor(self.parent, device=dev).expand(B, self.n_nodes)
        tree = TokenTree(tree_tokens, parent, fixed_token_probs(tree_tokens, self.vocab_size), torch.full((B,), self.n_nodes, device=dev))
        self.seconds += time.perf_counter() - t0
        return tree
