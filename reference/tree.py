"""Token trees and their exact verification: multi-step speculative sampling (Miao et al. 2024, SpecInfer).

A tree per row, padded to N nodes: node 0 is the root, the row's last token (the target cache
lacks it, as in the linear loop); node i > 0 holds a candidate token, a child of parent[i] < i;
siblings are tried in index order. q[i] is the distribution node i's token was drawn from, given
its ancestors and its earlier siblings: the draft's warped distribution at the parent for a sampled
child (Miao et al. 2024), a point mass for a fixed candidate such as a head's top-k (Cai et al.
2024, Medusa; `sampling.fixed_token_probs`). p[i] is the target's warped distribution after the
path root..i, all N from one pass with a tree attention mask (`ancestors`).

Like `sampling.verify`, the verifier takes its uniform draws as input, so the law of its output is
a function of its inputs and tests/test_tree_exact.py computes it exactly by enumeration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from reference.sampling import sample


@dataclass(frozen=True)
class TokenTree:
    """B ragged trees padded to N nodes; nodes i >= size[b] of row b are padding."""

    tokens: torch.Tensor  # [B, N] int64; tokens[:, 0] is the root, the row's last token
    parent: torch.Tensor  # [B, N] int64; parent[b, i] < i for 0 < i < size[b]; -1 at the root and padding
    q: torch.Tensor  # [B, N, V] the distribution each node's token was drawn from; q[:, 0] unused
    size: torch.Tensor  # [B] int64: nodes per row, the root included

    def valid(self) -> torch.Tensor:
        """[B, N] bool: real nodes other than the root."""
        i = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (i > 0) & (i < self.size[:, None])

    def children(self) -> torch.Tensor:
        """[B, N, K] the children of every node in index order, -1 past the last; K >= 1."""
        B, N = self.parent.shape
        i = torch.arange(N, device=self.parent.device)
        is_child = (self.parent[:, None, :] == i[:, None]) & self.valid()[:, None, :]  # [B, parent, child]
        rank = is_child.long().cumsum(-1) - 1  # [B, parent, child]: a child's place among its siblings
        K = max(int(is_child.sum(-1).max()), 1)
        table = torch.full((B, N, K + 1), -1, dtype=torch.long, device=self.parent.device)
        # non-children all land in the extra column K, cut off below
        table.scatter_(2, torch.where(is_child, rank, K), i.expand(B, N, N).contiguous())
        return table[..., :K]

    def rank(self) -> torch.Tensor:
        """[B, N] each node's place among its siblings, 0 for the first tried; 0 at the root and padding."""
        kids = self.children()  # [B, N, K]
        B, N, K = kids.shape
        place = torch.arange(K, device=kids.device).expand(B, N, K)
        rank = torch.zeros(B, N, dtype=torch.long, device=kids.device)
        # missing children write 0 into node 0, the root, whose rank is 0 anyway
        return rank.scatter_(1, kids.clamp_min(0).flatten(1), torch.where(kids >= 0, place, 0).flatten(1))

    def ancestors(self) -> torch.Tensor:
        """[B, N, N] bool: node j is node i's ancestor or i itself; padding nodes see only themselves.
        Row i of this matrix is what node i's query attends to among the tree's nodes."""
        B, N = self.parent.shape
        eye = torch.eye(N, dtype=torch.bool, device=self.parent.device).expand(B, N, N)
        anc = eye.clone()
        has_parent = self.valid()
        for i in range(1, N):  # parents come first, so their rows are complete
            up = anc[torch.arange(B), self.parent[:, i].clamp_min(0)]  # [B, N]
            anc[:, i] |= up & has_parent[:, i, None]
        return anc

    def depth(self) -> torch.Tensor:
        """[B, N] edges from the root (0 at the root and at padding)."""
        return self.ancestors().sum(-1) - 1


def min_ratio(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """a(x) = min(1, r(x)/q(x)), [..., V]: the chance a token x drawn from q is accepted under r.
    Where q(x) = 0 no such token is drawn; a = 1 there keeps r - q a = r."""
    return torch.where(q > 0, r / q, 1.0).clamp_max(1.0)


def take_accepted(r: torch.Tensor, q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What r keeps for the next sibling after a rejection, unnormalised:
    r - q a = r - min(q, r) = max(0, r - q) (Leviathan et al. 2023, Alg. 1), [..., V]."""
    return r - q * a


def bonus_from_leaf(p_leaf: torch.Tensor, r_parent: torch.Tensor) -> torch.Tensor:
    """At a leaf no child was tried: the next token comes from the target's p there."""
    return p_leaf


@dataclass(frozen=True)
class Rule:
    """The three choices multi-step speculative sampling makes, as functions of distributions.
    `EXACT` is the only right one; tests build known-wrong variants from other choices and show
    that the exactness check catches each of them."""

    accept: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = min_ratio  # (r, q) -> a [..., V]
    reject: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = take_accepted  # (r, q, a) -> r'
    bonus: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = bonus_from_leaf  # (p_leaf, r_parent) -> [.., V]


EXACT = Rule()


@dataclass(frozen=True)
class TreeVerdict:
    n: torch.Tensor  # [B] accepted candidates (the path's length below the root)
    path: torch.Tensor  # [B, D] the accepted nodes, root excluded, in order; -1 past n
    next_token: torch.Tensor  # [B] the token after the path: from the residual, or the bonus from p at a leaf

    def tokens(self, tree: TokenTree) -> torch.Tensor:
        """[B, D] the accepted candidates' tokens; -1 past n."""
        return torch.where(self.path >= 0, tree.tokens.gather(1, self.path.clamp_min(0)), -1)


def _normalise(r: torch.Tensor) -> torch.Tensor:
    """r / sum(r) over the last axis; all zeros stay zeros."""
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / torch.where(mass > 0, mass, 1.0), 0.0)


def verify_tree(
    tree: TokenTree, p: torch.Tensor, u: torch.Tensor, v: torch.Tensor, rule: Rule = EXACT
) -> TreeVerdict:
    """Multi-step speculative sampling over a token tree (Miao et al. 2024, SpecInfer): emits the
    accepted path's tokens and one more, together distributed exactly as autoregressive draws from
    the target, whatever the tree and whichever way its candidates were drawn.

    tree: B padded trees of N nodes; p [B, N, V] the target's warped distribution after each
    node's path; u [B, N]: node i's acceptance draw (u[:, 0] unused, the root is not tested);
    v [B]: the draw of the last token. All uniform in [0, 1).

    Walking down from the root, with r = p at the last accepted node:
        for each child c (token x, drawn from q_c), in index order:
            accept if u_c < min(1, r(x) / q_c(x))   -> c is accepted: r = p[c], go on from c
            else r = norm(max(0, r - q_c))           -> the next sibling is tried against this r
        no child accepted: the next token ~ r (the residual; at a leaf, p itself: the bonus token)
    Exact by induction over the siblings: if the output from a sibling on has law r given the
    history, a child drawn from q_c gives x with probability min(q_c(x), r(x)) by acceptance and
    (1 - sum_y min(q_c(y), r(y))) norm(max(0, r - q_c))(x) = max(0, r(x) - q_c(x)) after a rejection:
    r(x) in all. q_c may depend on the earlier siblings' tokens (sampling without replacement, fixed
    top-k candidates), as long as it is the law the token was really drawn from; at an accepted
    child the same holds one level down, with p there.
    Returns `TreeVerdict`: n [B], path [B, D] (D the deepest row's depth), next_token [B]."""
    B, N, V = p.shape
    rows = torch.arange(B, device=p.device)
    kids = tree.children()  # [B, N, K]
    D = int(tree.depth().max())
    node = torch.zeros(B, dtype=torch.long, device=p.device)  # the last accepted node, the root first
    r = p[:, 0]  # [B, V]: the law the next token must have: p at `node`, less what its rejected children took
    r_parent = r  # the law `node` itself was accepted under (for the rule's bonus)
    walking = torch.ones(B, dtype=torch.bool, device=p.device)  # `node` was just accepted
    path = torch.full((B, D), -1, dtype=torch.long, device=p.device)
    for depth in range(D):
        moved = torch.zeros(B, dtype=torch.bool, device=p.device)
        for k in range(kids.shape[-1]):
            child = kids[rows, node, k]  # [B]
            tried = walking & ~moved & (child >= 0)
            c = child.clamp_min(0)
            x, q_c = tree.tokens[rows, c], tree.q[rows, c]  # [B], [B, V]
            a = rule.accept(r, q_c)  # [B, V]
            ok = tried & (u[rows, c] < a[rows, x])
            rejected = tried & ~ok
            r_parent = torch.where(ok[:, None], r, r_parent)
            r = torch.where(
                ok[:, None], p[rows, c], torch.where(rejected[:, None], _normalise(rule.reject(r, q_c, a)), r)
            )
            node = torch.where(ok, child, node)
            moved |= ok
        path[:, depth] = torch.where(moved, node, -1)
        walking &= moved
    leaf = kids[rows, node, 0] < 0
    final = torch.where(leaf[:, None], rule.bonus(r, r_parent), r)  # [B, V]
    # a rejection leaves mass in the residual (sum r = sum q_c = 1 and r(x) < q_c(x) somewhere);
    # float rounding can leave none, and then the token is p's most likely at `node`, as in `verify`
    token = torch.where(final.sum(-1) > 0, sample(final, v), p[rows, node].argmax(-1))
    return TreeVerdict((path >= 0).sum(-1), path, token)
