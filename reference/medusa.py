"""Medusa heads (Cai et al. 2024, Medusa-1): K extra decoding heads on the frozen target's last
hidden state, their top-k candidates assembled into a sparse token tree, verified in one pass.

The target's head reads h_t (its final normed hidden state at position t) and predicts the token at
t + 1; Medusa head k (k = 1..K) reads the same h_t and predicts the token at t + 1 + k:

    head_k(h) = W2_k (h + SiLU(W1_k h))          # a residual block, then a linear layer to the vocabulary

In a speculative loop the root of the next tree is the token the verifier just drew at t + 1, so
head k's candidates sit at depth k below it. A tree is given as rank paths (Medusa's notation): the
path (r_1, ..., r_d) is the node whose token is head d's r_d-th most likely token, a child of the
node (r_1, ..., r_{d-1}). Candidates are deterministic, so the exact verifier takes them as point
masses (`tree.verify_tree` with q = one-hot) and the output law stays the target's.
`verify_typical` is Medusa's inexact alternative, typical acceptance.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reference.model import Transformer, read_torch_file
from reference.sampling import Sampling, fixed_token_probs
from reference.tree import TokenTree, TreeVerdict
from simulator.errors import UserError


class MedusaHeads(nn.Module):
    """K heads of d -> V, each `W2 (h + SiLU(W1 h))` (Cai et al. 2024, eq. 1). At initialisation W1 is
    zero and W2 a copy of the target's unembedding, as Medusa-1 starts its heads (so each head begins
    by predicting what the target predicts next)."""

    def __init__(self, d_model: int, vocab_size: int, n_heads: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(n_heads, d_model, d_model))  # [K, d_out, d_in]
        self.b1 = nn.Parameter(torch.zeros(n_heads, d_model))
        self.w2 = nn.Parameter(torch.zeros(n_heads, vocab_size, d_model))  # [K, V, d]

    @property
    def n_heads(self) -> int:
        return self.w1.shape[0]

    def init_from(self, target: Transformer) -> MedusaHeads:
        unembed = target.embed.weight if target.head is None else target.head.weight
        with torch.no_grad():
            self.w2.copy_(unembed.detach().float().expand_as(self.w2))
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., d] the target's final normed hidden state -> logits [..., K, V]; head k (0-based
        index k - 1) predicts the token k positions after the one the target's own head predicts."""
        h = h[..., None, :]  # [..., 1, d]
        r = h + F.silu(torch.einsum("kod,...kd->...ko", self.w1, h.expand(*h.shape[:-2], self.n_heads, h.shape[-1])) + self.b1)
        return torch.einsum("kvd,...kd->...kv", self.w2, r)


def medusa_loss(heads: MedusaHeads, h: torch.Tensor, x: torch.Tensor, decay: float = 0.8) -> torch.Tensor:
    """Medusa-1's loss (Cai et al. 2024, eq. 2): sum over heads k of decay^k CE(head_k(h_t), x_{t+1+k}),
    on text x [B, T + 1 + K'] and the target's hidden states h [B, T, d] at its first T positions."""
    logits = heads(h)  # [B, T, K, V]
    T = h.shape[1]
    loss = h.new_zeros(())
    for k in range(heads.n_heads):
        y = x[:, k + 2 : k + 2 + T]  # [B, T]: the token at t + 2 + k, 0-based head k
        loss = loss + decay ** (k + 1) * F.cross_entropy(logits[:, :, k].flatten(0, 1), y.flatten())
    return loss


@torch.no_grad()
def head_accuracy(heads: MedusaHeads, target: Transformer, data: torch.Tensor, seq_len: int, top: int) -> list[list[float]]:
    """Held-out accuracy per head: acc[k][j] = P(the true token at t + 2 + k is among head k's j + 1
    most likely), j < top, over every window position of `data` cut into windows of seq_len + 1 + K."""
    K = heads.n_heads
    n = (len(data) - K - 1) // seq_len
    x = data[torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + K + 1)]  # [n, seq_len + K + 1]
    ranks = []
    for chunk in x.split(32):
        with torch.enable_grad():  # F.linear in the target's layers (see `reference.linear`), as in training; no graph: its weights are frozen
            h = target(chunk[:, :seq_len], hidden=True)[1]
        ranks.append(heads(h.detach()).topk(top, dim=-1).indices)
    ranks = torch.cat(ranks)  # [n, T, K, top]
    acc = []
    for k in range(K):
        y = x[:, k + 2 : k + 2 + seq_len]
        hit = (ranks[:, :, k] == y[..., None]).cumsum(-1).clamp_max(1).float()  # [n, T, top]
        acc.append([round(float(v), 4) for v in hit.mean((0, 1))])
    return acc


def save_heads(heads: MedusaHeads, target_sha256: str, path: Path) -> None:
    """Heads (float16) and the sha256 of the target weights file they were trained on."""
    state = {k: v.detach().to(torch.float16) for k, v in heads.state_dict().items()}
    torch.save({"kind": "medusa_heads", "target_sha256": target_sha256, "state_dict": state}, path)


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_heads(path: Path | str, target: Transformer, target_path: Path | str) -> MedusaHeads:
    """Heads written by `save_heads`, for the target whose weights are in `target_path`. A file that
    is not a heads file, of shapes that do not fit the target, or trained for another target (its
    recorded hash differs from target_path's sha256) is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such Medusa heads file; `python -m reference.train medusa` writes reference/weights/medusa.pt")
    not_ours = f"{path}: not a Medusa heads file written by save_heads"
    blob = read_torch_file(path, not_ours)
    if not (isinstance(blob, dict) and blob.get("kind") == "medusa_heads" and isinstance(blob.get("state_dict"), dict)):
        raise UserError(not_ours)
    want = file_sha256(target_path)
    if blob.get("target_sha256") != want:
        raise UserError(f"{path}: heads trained for another target (target sha256 {str(blob.get('target_sha256'))[:12]}..., "
                        f"{target_path} has {want[:12]}...); train them for it with `python -m reference.train medusa`")  # fmt: skip
    state = blob["state_dict"]
    w1 = state.get("w1")
    if not isinstance(w1, torch.Tensor) or w1.dim() != 3:
        raise UserError(f"{path}: state_dict.w1 is not a [K, d, d] tensor")
    heads = MedusaHeads(target.spec.d_model, target.spec.vocab_size, w1.shape[0])
    for key, param in heads.state_dict().items():
        tensor = state.get(key)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(param.shape):
            got = "nothing" if tensor is None else list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{path}: state_dict.{key} is {got}; heads for {target.spec.name} need shape {list(param.shape)}")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: state_dict.{key} is not all finite floating-point numbers")
    heads.load_state_dict({k: v.float() for k, v in state.items()})
    return heads.to(target.embed.weight.device, target.embed.weight.dtype).eval()


# ---- trees as rank paths ----


def full_tree_paths(branching: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The rank paths of the full tree `AxBxC`: every path (r_1, ..., r_d) with r_i < branching[i-1]."""
    paths: list[tuple[int, ...]] = []
    level: list[tuple[int, ...]] = [()]
    for b in branching:
        level = [p + (r,) for p in level for r in range(b)]
        paths += level
    return paths


def parse_tree_spec(spec: str, max_nodes: int | None = None) -> list[tuple[int, ...]]:
    """`--tree SPEC` (the executor/simulator contract) -> rank paths in breadth-first order
    (by depth, then rank by rank): `AxBxC` a full tree; an inline JSON list of rank paths, or a
    file holding one, e.g. [[0],[1],[0,0]]. Not a tree, zero or negative branching, or more than
    max_nodes nodes (root excluded): UserError."""
    text = spec.strip()
    if text and all(part.strip().lstrip("-").isdigit() for part in text.split("x")):
        branching = tuple(int(part) for part in text.split("x"))
        if min(branching) < 1:
            raise UserError(f"--tree {spec}: every branching must be >= 1, got {min(branching)}")
        if math.prod(branching) > 10**6:
            raise UserError(f"--tree {spec}: {math.prod(branching)} leaves is far more nodes than any context holds")
        paths = full_tree_paths(branching)
    else:
        if not text.startswith("["):
            try:
                text = Path(spec).read_text()
            except OSError as exc:
                raise UserError(f"--tree {spec}: neither a shape like 3x2x1, inline JSON rank paths, nor a readable file ({exc.strerror})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--tree {spec}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not (isinstance(raw, list) and raw and all(isinstance(p, list) and p and all(type(r) is int for r in p) for p in raw)):
            raise UserError(f"--tree {spec}: expected a non-empty list of rank paths, each a non-empty list of whole numbers, e.g. [[0],[1],[0,0]]")
        paths = [tuple(p) for p in raw]
        if min(min(p) for p in paths) < 0:
            raise UserError(f"--tree {spec}: ranks must be >= 0")
        if len(set(paths)) != len(paths):
            raise UserError(f"--tree {spec}: a rank path is listed twice")
        known = set(paths)
        for p in paths:
            if len(p) > 1 and p[:-1] not in known:
                raise UserError(f"--tree {spec}: not a tree: {list(p)} is listed but its prefix {list(p[:-1])} is not")
    if max_nodes is not None and len(paths) > max_nodes:
        raise UserError(f"--tree {spec}: {len(paths)} nodes, more than the {max_nodes} the context leaves room for")
    return sorted(paths, key=lambda p: (len(p), p))


def best_tree(top_accuracy: list[list[float]], n_nodes: int) -> list[tuple[int, ...]]:
    """Medusa's sparse tree of n_nodes (Cai et al. 2024, sec. 3.3.1): from each head's held-out
    accuracy at rank r, a_d(r) = P(the true token is head d's r-th candidate) (the differences of
    top_accuracy[d - 1], its cumulative top-1 .. top-k accuracies), take node (r_1, .., r_d) with
    value prod_d a_d(r_d), the chance it is on the accepted path if heads err independently, and
    add the most valuable node whose parent is in the tree until there are n_nodes. A node is worth
    no more than its parent, so the greedy choice is a tree and maximises the expected length
    1 + sum of the values over trees of n_nodes."""
    rank_accuracy = [[cum[r] - (cum[r - 1] if r else 0.0) for r in range(len(cum))] for cum in top_accuracy]
    chosen: list[tuple[int, ...]] = []
    value = {(): 1.0}
    frontier = {(r,): rank_accuracy[0][r] for r in range(len(rank_accuracy[0]))}
    while len(chosen) < n_nodes and frontier:
        node = max(frontier, key=lambda p: (frontier[p], [-r for r in p]))  # ties: shallower ranks first
        value[node] = frontier.pop(node)
        chosen.append(node)
        if len(node) < len(rank_accuracy):  # its children become candidates
            row = rank_accuracy[len(node)]
            frontier |= {node + (r,): value[node] * row[r] for r in range(len(row))}
    return sorted(chosen, key=lambda p: (len(p), p))


def tree_layout(paths: list[tuple[int, ...]]) -> tuple[list[int], list[int], list[int]]:
    """Rank paths in breadth-first order -> (parent, depth, rank) of nodes 0..N-1, node 0 the root:
    node i + 1 is paths[i]."""
    index = {(): 0} | {p: i + 1 for i, p in enumerate(paths)}
    parent = [-1] + [index[p[:-1]] for p in paths]
    return parent, [0] + [len(p) for p in paths], [0] + [p[-1] for p in paths]


class MedusaDraft:
    """Candidates from Medusa heads on the target's last hidden state: node (r_1, ..., r_d) holds head
    d's r_d-th most likely token (Cai et al. 2024), the same tree for every row, verified as point
    masses. No draft model runs: `tree_decode.tree_generate` hands the draft the target's hidden
    state at the node the next token was drawn from (`rollback`'s `hidden`), and the heads read it.
    `start` runs the target once more over the prompt but its last token, for the first hidden state."""

    needs_hidden = True

    def __init__(self, target: Transformer, heads: MedusaHeads, paths: list[tuple[int, ...]]):
        depth = max(len(p) for p in paths)
        if depth > heads.n_heads:
            raise UserError(f"the tree is {depth} deep but there are {heads.n_heads} Medusa heads (one per depth)")
        if max(max(p) for p in paths) >= target.spec.vocab_size:
            raise UserError(f"a rank path asks for rank {max(max(p) for p in paths)} of a vocabulary of {target.spec.vocab_size}")
        self.target, self.heads, self.paths = target, heads, paths
        self.parent, self.node_depth, self.node_rank = tree_layout(paths)
        self.n_nodes, self.depth = len(self.parent), depth
        self.vocab_size = target.spec.vocab_size
        self.name = f"{heads.n_heads} Medusa heads, tree of {len(paths)} nodes"
        self.hidden: torch.Tensor | None = None  # [B, d] the target's hidden state the heads read next

    def start(self, prompt: torch.Tensor, max_len: int) -> None:
        if prompt.shape[1] < 2:
            raise UserError("the Medusa draft needs a prompt of at least 2 tokens (its heads read the hidden state before the last)")
        _, h = self.target(prompt[:, :-1], hidden=True)
        self.hidden = h[:, -1]

    def propose(self, tokens: torch.Tensor, lengths: torch.Tensor, s: Sampling, w: torch.Tensor) -> TokenTree:
        """-> the `TokenTree` of every row: its root each row's last token, node i head depth(i)'s
        rank(i)-th candidate, q its point mass. `s` and the uniforms w are unused: the candidates are
        the heads' top-k whatever the sampling."""
        B, dev, N = tokens.shape[0], tokens.device, self.n_nodes
        width = max(self.node_rank) + 1
        top = self.heads(self.hidden).topk(width, dim=-1).indices  # [B, K, width]
        depth = torch.tensor(self.node_depth, device=dev)
        rank = torch.tensor(self.node_rank, device=dev)
        tree_tokens = top[:, (depth - 1).clamp_min(0), rank]  # [B, N]
        tree_tokens[:, 0] = tokens.gather(1, lengths[:, None] - 1)[:, 0]
        q = fixed_token_probs(tree_tokens, self.vocab_size, self.target.embed.weight.dtype)
        parent = torch.tensor(self.parent, device=dev).expand(B, N)
        return TokenTree(tree_tokens, parent, q, torch.full((B,), N, device=dev))

    def rollback(self, path: torch.Tensor, lengths: torch.Tensor, max_length: int, hidden: torch.Tensor | None = None) -> None:
        """hidden [B, d]: the target's hidden state at each row's last accepted node (the root if none)."""
        self.hidden = hidden


def verify_typical(tree: TokenTree, p: torch.Tensor, eps: float, delta: float) -> TreeVerdict:
    """Typical acceptance (Cai et al. 2024, sec. 2.3.1), inexact: a candidate x below node m is
    accepted when p_m(x) > min(eps, delta exp(-H(p_m))), H the entropy of the target's warped p_m in
    nats; the verdict is the deepest node whose whole path is accepted (the first in index order among
    equals), and the next token is the target's most likely after it (Medusa's greedy first token).
    p [B, N, V]. No draws: the output is a function of the target's distributions, not a sample of
    them, so its law is not the target's except at temperature 0, where it is greedy decoding."""
    B, N, V = p.shape
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum(-1)  # [B, N] nats
    threshold = torch.clamp(delta * torch.exp(-entropy), max=eps)  # [B, N]: at each node, for its children
    par = tree.parent.clamp_min(0)
    p_at_parent = p.gather(1, par[..., None].expand(B, N, V)).gather(2, tree.tokens[..., None])[..., 0]  # [B, N]
    ok = (p_at_parent > threshold.gather(1, par)) & tree.valid()  # [B, N]: accepted under its parent
    anc = tree.ancestors()  # [B, N, N]
    ok_path = (ok[:, None, :] | ~anc | (torch.arange(N, device=p.device) == 0)).all(-1)  # [B, N]: every node on its path accepted
    depth = anc.sum(-1) - 1
    score = torch.where(ok_path & ((torch.arange(N, device=p.device) == 0) | tree.valid()), depth, -1)
    best = score.argmax(-1)  # [B]: the first of the deepest
    D = int(tree.depth().max())
    on_path = anc[torch.arange(B), best]  # [B, N]
    levels = torch.arange(1, D + 1, device=p.device)
    at_level = on_path[:, None, :] & (depth[:, None, :] == levels[None, :, None])  # [B, D, N]
    path = torch.where(at_level.any(-1), at_level.long().argmax(-1), -1)
    next_token = p[torch.arange(B), best].argmax(-1)
    return TreeVerdict((path >= 0).sum(-1), path, next_token)
