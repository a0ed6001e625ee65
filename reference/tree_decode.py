"""Speculative decoding with token trees: a draft model samples a tree, the target scores every node
in one pass with a tree attention mask, `tree.verify_tree` accepts a path (Miao et al. 2024, SpecInfer).

The target cache holds each row's committed tokens but the last (the root of the next tree), as in
`specdec.speculative_generate`. A tree pass writes the N tree nodes at the slots after it, in index
order, each at the RoPE position of its depth and attending to the committed slots and its
ancestors' slots only: node i's logits are those of decoding its root-to-node path one token after
another. The accepted path's K and V are then moved to the slots right after the root and the rest
dropped by the cache's length, so the cache again holds exactly the committed sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reference.model import KVCache, Transformer
from reference.sampling import Sampling, fixed_token_probs, sample, warp
from reference.specdec import Draw, start_generation, tokens_per_step
from reference.tree import TokenTree, TreeVerdict, verify_tree


def tree_attention(tree: TokenTree, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `tree` argument of `Transformer.forward` for a pass over all of the tree's nodes written
    from slot base[b]: (base [B], positions base + depth [B, N], ancestors [B, N, N])."""
    anc = tree.ancestors()
    return base, base[:, None] + anc.sum(-1) - 1, anc


def keep_path(cache: KVCache, src: torch.Tensor, dst: torch.Tensor, lengths: torch.Tensor, limit: int) -> None:
    """Move every layer's K and V at slots src[b, j] to dst[b, j] ([B, m]; all read before any is
    written), then keep the first lengths[b] slots of row b (attention reads below `limit`)."""
    L, B, H, _, dh = cache.k.shape
    m = src.shape[1]
    at_src = src[None, :, None, :, None].expand(L, B, H, m, dh)
    at_dst = dst[None, :, None, :, None].expand(L, B, H, m, dh)
    for kv in (cache.k, cache.v):
        kv.scatter_(3, at_dst, kv.gather(3, at_src))
    cache.rollback(lengths, limit)


class TreeDraft:
    """A draft model that proposes a token tree: every node at depth d gets branching[d] children,
    sampled i.i.d. from the draft's warped distribution after the node's path (Miao et al. 2024's
    expansion; branching (1,) * gamma is `drafts.ModelDraft`, draw for draw; with
    `replacement=False` each child is drawn from that distribution without its earlier siblings'
    tokens, renormalised, so siblings differ while tokens remain), or with `top=True`
    the draft's branching[d] most likely tokens there by its logits, fixed candidates verified as
    point masses (as Medusa verifies its heads' top-k, Cai et al. 2024). One draft pass per level
    but the last, each over all of the level's nodes with a tree attention mask.

    The tree is the same for every row, in breadth-first order: node 0 the root, then depth 1, 2, ...
    Invariant between steps, as `drafts.ModelDraft`'s: the cache holds each row's tokens except its
    last two, which the next `propose` feeds first."""

    def __init__(
        self,
        model: Transformer,
        branching: tuple[int, ...],
        layers: list[int] | None = None,
        top: bool = False,
        replacement: bool = True,
    ):
        if not branching or min(branching) < 1:
            raise ValueError(f"a tree needs depth >= 1 and branching >= 1 at every depth, got {branching}")
        if top and max(branching) > model.spec.vocab_size:
            raise ValueError(f"top-{max(branching)} candidates out of a vocabulary of {model.spec.vocab_size}")
        self.model, self.layers, self.branching = model, layers, tuple(branching)
        self.top, self.replacement = top, replacement
        skipped = "" if layers is None else f" ({len(layers)} of {model.spec.n_layers} layers)"
        kind = "top-k " if top else "" if replacement else "distinct "
        self.name = f"{model.spec.name}{skipped} {kind}tree {'x'.join(map(str, branching))}"
        self.vocab_size = model.spec.vocab_size
        # breadth-first layout: level d holds prod(branching[:d]) nodes from level_start[d]
        sizes = [1]
        for b in branching:
            sizes.append(sizes[-1] * b)
        self.level_start = [sum(sizes[:d]) for d in range(len(sizes) + 1)]  # [depth + 2]
        self.parent = [-1] + [
            self.level_start[d] + k // branching[d] for d in range(len(branching)) for k in range(sizes[d + 1])
        ]
        self.n_nodes = len(self.parent)
        self.depth = len(branching)
        one = TokenTree(torch.zeros(1, self.n_nodes, dtype=torch.long), torch.tensor([self.parent]), torch.zeros(1, self.n_nodes, 1), torch.tensor([self.n_nodes]))  # fmt: skip
        self._ancestors = one.ancestors()[0, 1:, 1:]  # [N-1, N-1]: among the non-root nodes, as the draft's slots hold them
        self.cache: KVCache | None = None
        self.pending = 2
        self._base = None  # [B] the slot of the first level's nodes in the last `propose`

    def start(self, prompt: torch.Tensor, max_len: int) -> None:
        """prompt [B, P]: prefill all but its last two tokens."""
        B, P = prompt.shape
        self.cache = self.model.new_cache(B, max_len, None if self.layers is None else len(self.layers))
        self.pending = min(P, 2)
        if P > 2:
            self.model(prompt[:, :-2], self.cache, self.layers)

    def propose(self, tokens: torch.Tensor, lengths: torch.Tensor, s: Sampling, w: torch.Tensor) -> TokenTree:
        """tokens [B, S] (row b valid up to lengths[b]), w [B, N] uniforms (node i's draw; w[:, 0]
        and all of them with `top` unused) -> the `TokenTree`, its root each row's last token, q of
        every node the distribution it was drawn from: the warped draft distribution at its parent,
        or the point mass of a fixed candidate."""
        B, dev, V, N = tokens.shape[0], tokens.device, self.vocab_size, self.n_nodes
        back = torch.arange(-self.pending, 0, device=dev)
        x = tokens.gather(1, lengths[:, None] + back)  # [B, pending]: each row's last `pending` tokens
        tree_tokens = torch.empty(B, N, dtype=torch.long, device=dev)
        tree_tokens[:, 0] = x[:, -1]
        q = torch.zeros(B, N, V, dtype=self.model.embed.weight.dtype, device=dev)
        parent = torch.tensor(self.parent, device=dev).expand(B, N)
        tree = TokenTree(tree_tokens, parent, q, torch.full((B,), N, device=dev))
        anc = self._ancestors.to(dev).expand(B, N - 1, N - 1)
        depth = anc.sum(-1)  # [B, N-1]: a node's depth, 1 at the first level
        z = self.model(x, self.cache, self.layers)[:, -1:]  # [B, 1, V]: the draft's logits at the root
        base = self._base = self.cache.lengths  # the first level's slot: the draft writes node i at base + i - 1
        for d, b in enumerate(self.branching):
            lo, hi = self.level_start[d + 1], self.level_start[d + 2]  # the children's nodes
            if self.top:  # the parent's b most likely tokens by its logits (also when greedy), the first tried first
                tree_tokens[:, lo:hi] = z.topk(b, dim=-1).indices.flatten(1)
                q[:, lo:hi] = fixed_token_probs(tree_tokens[:, lo:hi], V, q.dtype)
            elif self.replacement:
                q_children = warp(z, s).repeat_interleave(b, dim=1)  # [B, hi - lo, V]: each child's parent's q
                q[:, lo:hi] = q_children
                tree_tokens[:, lo:hi] = sample(q_children, w[:, lo:hi])
            else:  # child k from the parent's q without its earlier siblings' tokens, renormalised
                q_parent = warp(z, s)  # [B, M, V], M = the parents' level's nodes
                taken = torch.zeros_like(q_parent, dtype=torch.bool)
                w_children = w[:, lo:hi].unflatten(1, (-1, b))  # [B, M, b]
                q_k, x_k = [], []
                for k in range(b):
                    rest = q_parent.masked_fill(taken, 0.0)
                    mass = rest.sum(-1, keepdim=True)
                    # no mass left (fewer tokens than children): the rest are drawn from q itself
                    q_k.append(torch.where(mass > 0, rest / torch.where(mass > 0, mass, 1.0), q_parent))
                    x_k.append(sample(q_k[-1], w_children[:, :, k]))
                    taken.scatter_(-1, x_k[-1][..., None], True)
                q[:, lo:hi] = torch.stack(q_k, 2).flatten(1, 2)  # [B, M * b, V] in child order
                tree_tokens[:, lo:hi] = torch.stack(x_k, 2).flatten(1)
            if d + 1 < self.depth:  # the leaves need no draft pass
                level = slice(lo - 1, hi - 1)  # the same nodes among the non-root ones
                attention = (base, base[:, None] + depth[:, level] - 1, anc[:, level, : hi - 1])
                z = self.model(tree_tokens[:, lo:hi], self.cache, self.layers, attention)  # [B, hi - lo, V]
        return tree

    def rollback(self, path: torch.Tensor, lengths: torch.Tensor, max_length: int) -> None:
        """The verifier accepted `path` [B, D] (node ids, -1 past its end) and rows now hold
        lengths[b] tokens (at most max_length): keep all but the last two in the cache. Those are the
        committed tokens before the step and the accepted nodes but the last, all inner nodes the
        draft has run: their K and V move from their tree slots to the slots after the committed ones."""
        if self.depth > 1:
            inner = path[:, : self.depth - 1].clamp_min(1)  # [B, D-1]: a padding entry moves junk past the end
            j = torch.arange(self.depth - 1, device=path.device)
            keep_path(self.cache, self._base[:, None] + inner - 1, self._base[:, None] + j, lengths - 2, max(max_length - 2, 0))
        else:
            self.cache.rollback(lengths - 2, max(max_length - 2, 0))
        self.pending = 2


@dataclass
class TreeRun:
    """One tree-speculative generation: its tokens, how many candidates each step accepted, and
    which child was accepted at each depth: the acceptance per depth and candidate rank that
    Medusa's sparse trees are built from (Cai et al. 2024). A candidate's rank is its place among
    its siblings, or for a draft with `node_rank` (Medusa's rank paths) the rank its path names."""

    tokens: torch.Tensor  # [B, P + max_new_tokens]
    steps: int  # target passes
    n_hist: torch.Tensor  # [depth + 1] (row, step) pairs of active rows by number of accepted candidates
    tried: torch.Tensor  # [depth] pairs whose verifier tried the children of its node at depth d
    accepted_rank: torch.Tensor  # [depth, K] pairs that accepted there the child of rank k
    offered: torch.Tensor  # [depth, K] pairs whose accepted node at depth d had a child of rank k

    @property
    def acceptance(self) -> torch.Tensor:
        """[depth, K] P(the k-th child is the one accepted | its parent's children are tried), float64;
        NaN at a depth never tried. Summed over k: the chance some child is accepted there."""
        return self.accepted_rank.double() / self.tried.double()[:, None]

    @property
    def rank_acceptance(self) -> torch.Tensor:
        """[depth, K] P(the child of rank k is accepted | its parent was accepted and has it), float64,
        the tree acceptance file's `accept`; NaN where no accepted parent had such a child."""
        return self.accepted_rank.double() / self.offered.double()

    @property
    def tokens_per_step(self) -> float:
        return tokens_per_step(self.n_hist)


Verifier = Callable[[TokenTree, torch.Tensor, torch.Tensor, torch.Tensor], TreeVerdict]  # (tree, p, u [B, N], v [B])


@torch.inference_mode()
def tree_generate(
    target: Transformer, draft, prompt: torch.Tensor, max_new_tokens: int, s: Sampling, draw: Draw,
    verifier: Verifier | None = None,
) -> TreeRun:  # fmt: skip
    """prompt [B, P] -> `TreeRun` with tokens [B, P + max_new_tokens], distributed exactly as
    `specdec.autoregressive_generate` with the target (and equal to it token for token when greedy).
    Per step: the draft's tree (its trees may be ragged: size[b] nodes in row b), one target pass
    over every node, `verify_tree` (or `verifier`, e.g. Medusa's inexact typical acceptance), the
    accepted path's K and V kept. A draft with `needs_hidden` (`medusa.MedusaDraft`) gets the
    target's hidden state at each row's last accepted node, where the next token was drawn.

    Invariant per row b, holding lengths[b] tokens: the target cache holds all but the last one."""
    B, P = prompt.shape
    dev, N, D = prompt.device, draft.n_nodes, draft.depth
    needs_hidden = getattr(draft, "needs_hidden", False)
    rows = torch.arange(B, device=dev)
    total = P + max_new_tokens
    room = total + N + 1  # finished rows keep stepping in place; their writes land past `total`
    buf, lengths, cache = start_generation(target, draft, prompt, room)
    history = []  # per step (tree, accepted path, n, lengths before the step)
    ahead = torch.arange(D, device=dev)
    while True:
        # [B, 2(N-1) + 1]: one per candidate for drafting, one per candidate for accepting, one for the
        # last token; laid out as `speculative_generate` lays out gamma = N - 1, so a chain draws as it does
        u = draw(2 * (N - 1) + 1)
        at_nodes = F.pad(u[:, : 2 * (N - 1)].unflatten(1, (2, N - 1)), (1, 0))  # [B, 2, N]: node 0, the root, draws nothing
        tree = draft.propose(buf, lengths, s, at_nodes[:, 0])
        base = cache.lengths  # the root's slot: lengths - 1
        out = target(tree.tokens, cache, tree=tree_attention(tree, base), hidden=needs_hidden)  # one pass scores every node
        logits, h = out if needs_hidden else (out, None)  # [B, N, V], [B, N, d]
        p = warp(logits, s)
        verdict = (verifier or verify_tree)(tree, p, at_nodes[:, 1], u[:, -1])
        n = verdict.n
        path = F.pad(verdict.path, (0, D - verdict.path.shape[1]), value=-1)  # [B, D]: pruned trees may be shallower
        history.append((tree, path, n, lengths))  # statistics are reduced after the loop, off the critical path
        # emit the path's tokens then the next token at position lengths + n (overwriting the path's padding)
        buf.scatter_(1, lengths[:, None] + ahead, tree.tokens.gather(1, path.clamp_min(0)))
        buf.scatter_(1, (lengths + n)[:, None], verdict.next_token[:, None])
        lengths = (lengths + n + 1).clamp_max(total)  # finished rows step in place
        per_row = lengths.tolist()  # the host sync of the step
        shortest, longest = min(per_row), max(per_row)
        # the root stays at its slot; the accepted nodes move to the slots after it
        keep_path(cache, base[:, None] + path.clamp_min(0), base[:, None] + 1 + ahead, lengths - 1, longest - 1)
        if needs_hidden:  # the hidden state at the last accepted node (the root if none), which drew the next token
            end = torch.where(n > 0, path.gather(1, (n - 1).clamp_min(0)[:, None])[:, 0], 0)
            draft.rollback(path, lengths, longest, h[rows, end])
        else:
            draft.rollback(path, lengths, longest)
        if shortest == total:
            break
    # statistics of the rows still active at each step
    fixed_rank = getattr(draft, "node_rank", None)
    labels = [tree.rank() if fixed_rank is None else torch.tensor(fixed_rank, device=dev).expand(B, -1) for tree, *_ in history]
    width = max(int(label.max()) for label in labels) + 1  # the largest rank any node had, plus one
    n_hist = torch.zeros(D + 1, dtype=torch.long, device=dev)
    tried = torch.zeros(D, dtype=torch.long, device=dev)
    accepted_rank = torch.zeros(D, width, dtype=torch.long, device=dev)
    offered = torch.zeros(D, width, dtype=torch.long, device=dev)
    ranks = torch.arange(width, device=dev)
    for (tree, path, n, before), label in zip(history, labels, strict=True):
        active = before < total  # [B]
        n_hist.index_add_(0, n[active], torch.ones_like(n[active]))
        # depth d tried the children of the path's node at depth d, if it had any: [B, D]
        at = torch.cat((torch.zeros_like(path[:, :1]), path[:, :-1]), 1).clamp_min(0)
        kids = tree.children()  # [B, N, K]
        kids_at = kids.gather(1, at[..., None].expand(-1, -1, kids.shape[-1]))  # [B, D, K]: the children tried at depth d
        reached = (ahead <= n[:, None]) & active[:, None]  # [B, D]
        tried += (reached & (kids_at[..., 0] >= 0)).sum(0)
        kid_rank = torch.where(kids_at >= 0, label.gather(1, kids_at.clamp_min(0).flatten(1)).view_as(kids_at), -1)
        offered += ((kid_rank[..., None] == ranks) & reached[..., None, None]).any(2).sum(0)
        rank = torch.where(path >= 0, label.gather(1, path.clamp_min(0)), -1)  # [B, D]: -1 where none was accepted
        accepted_rank += ((rank[..., None] == ranks) & active[:, None, None]).sum(0)
    return TreeRun(buf[:, :total], len(history), n_hist.cpu(), tried.cpu(), accepted_rank.cpu(), offered.cpu())


@dataclass
class TreeMeasurement:
    """Tree speculation measured against autoregressive decoding on one device (`measure_tree`).
    tokens_per_step counts the token after the accepted path (Medusa's acceptance length);
    reach[d - 1] = P(a step accepts d candidates or more); accept[d - 1][r] = P(the candidate of
    rank r at depth d is accepted | its parent was accepted and has it), ranks no step offered left off."""

    device: str
    target: str
    draft: str
    tree: list[list[int]]  # the rank paths measured with
    exact: bool
    acceptance: str  # "exact" (multi-step speculative sampling) or "typical" (Medusa's, inexact)
    temperature: float
    steps: int  # verify steps, all rows and repeats' sequences
    tokens_per_step: float
    reach: list[float]
    accept: list[list[float]]
    expected_tokens_per_step: float  # from accept and the tree by the contract's formula (`expected_tokens_per_step`)
    autoregressive_tokens_per_s: float
    tokens_per_s: float
    speedup: float


def expected_tokens_per_step(accept: list[list[float]], paths: list[tuple[int, ...]]) -> float:
    """1 + sum over the tree's nodes n of prod over the nodes m on the root-to-n path of
    accept[depth(m) - 1][rank(m)] (the executor/simulator contract; Cai et al. 2024's expected
    acceptance length of a sparse tree): the chance each node is on the accepted path, plus the
    token after it. Ranks past a depth's list count 0."""

    def a(d: int, r: int) -> float:
        row = accept[d - 1] if d - 1 < len(accept) else []
        return row[r] if r < len(row) else 0.0

    total = 1.0
    for path in paths:
        prob = 1.0
        for d, r in enumerate(path, start=1):
            prob *= a(d, r)
        total += prob
    return total


def pooled_accept(runs: list[TreeRun]) -> list[list[float]]:
    """accept[d - 1][r] over every run: accepted / offered, per depth up to the last rank offered."""
    width = max(r.offered.shape[1] for r in runs)
    D = max(r.offered.shape[0] for r in runs)
    accepted = torch.zeros(D, width, dtype=torch.float64)
    offered = torch.zeros(D, width, dtype=torch.float64)
    for r in runs:
        accepted[: r.offered.shape[0], : r.offered.shape[1]] += r.accepted_rank
        offered[: r.offered.shape[0], : r.offered.shape[1]] += r.offered
    table = []
    for d in range(D):
        seen = (offered[d] > 0).nonzero()
        last = int(seen.max()) + 1 if len(seen) else 0
        table.append([float(accepted[d, k] / offered[d, k]) if offered[d, k] > 0 else 0.0 for k in range(last)])
    return table


def measure_tree(
    target: Transformer, draft, paths: list[tuple[int, ...]], prompt: torch.Tensor, max_new_tokens: int, s: Sampling,
    seed: int, repeats: int, verifier: Verifier | None = None, sequences: int = 1,
) -> TreeMeasurement:  # fmt: skip
    """Medians of `repeats` rounds, autoregressive and tree-speculative in turns (`measure_interleaved`);
    each round generates `sequences` continuations (seeds seed, seed + 1, ...); acceptance pooled
    over the last round's sequences and rows."""
    from reference.specdec import autoregressive_generate, seeded_draws
    from reference.timing import measure_interleaved

    B, dev = prompt.shape[0], prompt.device
    seeds = range(seed, seed + sequences)
    runs: list[TreeRun] = []

    def autoregressive():
        for k in seeds:
            autoregressive_generate(target, prompt, max_new_tokens, s, seeded_draws(B, k, dev))

    def speculative():
        runs[:] = [tree_generate(target, draft, prompt, max_new_tokens, s, seeded_draws(B, k, dev), verifier) for k in seeds]

    timings = measure_interleaved({"autoregressive": autoregressive, "tree": speculative}, repeats)
    new_tokens = sequences * B * max_new_tokens
    ar_tps, tps = new_tokens / timings["autoregressive"].median_s, new_tokens / timings["tree"].median_s
    n_hist = sum(r.n_hist for r in runs)
    reach = n_hist.flip(0).cumsum(0).flip(0)[1:].double() / n_hist.sum()  # [D]: P(n >= d)
    accept = pooled_accept(runs)
    return TreeMeasurement(
        device=str(dev), target=target.spec.name, draft=draft.name, tree=[list(p) for p in paths],
        exact=verifier is None, acceptance="exact" if verifier is None else "typical", temperature=s.temperature,
        steps=int(n_hist.sum()), tokens_per_step=tokens_per_step(n_hist), reach=[float(x) for x in reach],
        accept=accept, expected_tokens_per_step=expected_tokens_per_step(accept, paths),
        autoregressive_tokens_per_s=ar_tps, tokens_per_s=tps, speedup=tps / ar_tps,
    )  # fmt: skip


@torch.inference_mode()
def first_token_tv(target: Transformer, draft, prompt: list[int], s: Sampling, samples: int, seed: int, verifier: Verifier | None = None) -> float:
    """Total variation between the law of the first generated token, estimated from `samples`
    independent tree-speculative runs, and the target's own warped distribution after the prompt:
    0.5 sum_x |count(x) / samples - p(x)|. Exact verification gives sampling noise only, about
    sqrt(V / samples) at most; an inexact rule adds its bias."""
    from reference.specdec import seeded_draws

    x = torch.tensor([prompt], device=target.embed.weight.device)
    run = tree_generate(target, draft, x.expand(samples, -1), 1, s, seeded_draws(samples, seed, x.device), verifier)
    counts = torch.bincount(run.tokens[:, -1], minlength=target.spec.vocab_size).double()
    p = warp(target(x)[0, -1].double(), s)
    return float(0.5 * (counts / samples - p).abs().sum())
