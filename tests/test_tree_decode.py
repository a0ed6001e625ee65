"""Tree speculation end to end with the real executor: one tree pass gives every node the logits of
decoding its path, the kept path's cache continues as a plain one, the draft reports the q each
node was drawn from (sampled or top-k candidates), greedy equals autoregressive token for token,
batched equals unbatched with ragged trees, the acceptance per depth and rank adds up, and the
output law passes a powered G-test that catches wrong verifiers."""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
from test_specdec import PROMPT, SIGNIFICANCE, TV_DETECTED, g_test, per_row_draws, rows_needed, toy, two_token_law

from reference import tree_decode
from reference.drafts import ModelDraft
from reference.model import WEIGHTS_DIR, Transformer, load_weights
from reference.sampling import Sampling, sample, warp
from reference.specdec import autoregressive_generate, seeded_draws, speculative_generate
from reference.tree import Rule, TokenTree, verify_tree
from reference.tree_decode import TreeDraft, keep_path, tree_attention, tree_generate
from simulator.models import ModelSpec


def _model(seed: int) -> Transformer:
    spec = ModelSpec(name="toy", d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=11, max_seq_len=64)
    torch.manual_seed(seed)
    return Transformer(spec).double().eval()


def _path(parent: list[int], i: int) -> list[int]:
    """Nodes from the root to i, both included."""
    return [i] if i == 0 else [*_path(parent, parent[i]), i]


# three ragged trees: 7, 4 and 6 nodes, padded to 7 (a padding node's parent is -1)
PARENTS = [[-1, 0, 0, 1, 1, 2, 4], [-1, 0, 1, 1, -1, -1, -1], [-1, 0, 0, 0, 3, 3, -1]]
SIZES = [7, 4, 6]


@torch.no_grad()
def test_tree_pass_gives_each_node_the_logits_of_its_path_and_keeps_the_accepted_one():
    """Rows at different cache lengths, ragged trees: node i's logits equal a causal pass over the
    committed tokens and i's root-to-node path; after keep_path, decoding on equals a causal pass
    over the committed tokens and the accepted path."""
    model = _model(0)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, 11, (3, 12), generator=g)
    cache = model.new_cache(3, 40)
    model(seqs[:, :8], cache)
    cache.rollback(torch.tensor([5, 8, 3]), 8)  # rows hold 5, 8, 3 committed tokens
    committed = [seqs[b, : int(cache.lengths[b])].tolist() for b in range(3)]
    tokens = torch.randint(0, 11, (3, 7), generator=g)
    tree = TokenTree(tokens, torch.tensor(PARENTS), torch.zeros(3, 7, 11, dtype=torch.float64), torch.tensor(SIZES))
    base = cache.lengths
    logits = model(tokens, cache, tree=tree_attention(tree, base))  # [3, 7, V]
    for b in range(3):
        for i in range(SIZES[b]):
            path = tokens[b, _path(PARENTS[b], i)].tolist()
            want = model(torch.tensor([committed[b] + path]))[0, -1]
            torch.testing.assert_close(logits[b, i], want, rtol=1e-10, atol=1e-10)
    # accept a path per row (node ids below the root), keep its K and V, decode two more tokens
    paths, n = torch.tensor([[2, 5], [1, -1], [3, 5]]), torch.tensor([2, 1, 2])
    j = torch.arange(2)
    lengths = base + 1 + n
    keep_path(cache, base[:, None] + paths.clamp_min(0), base[:, None] + 1 + j, lengths, int(lengths.max()))
    more = torch.randint(0, 11, (3, 2), generator=g)
    got = model(more, cache)
    for b in range(3):
        kept = [int(tokens[b, 0])] + tokens[b, paths[b, : int(n[b])]].tolist()
        want = model(torch.tensor([committed[b] + kept + more[b].tolist()]))[0, -2:]
        torch.testing.assert_close(got[b], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["sampled", "distinct", "top-k"])
@pytest.mark.parametrize("branching", [(3,), (2, 2), (1, 3, 2)])
@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.7, top_k=4, top_p=0.9), Sampling(0.0)])
@torch.no_grad()
def test_draft_tree_reports_what_each_node_was_drawn_from(branching, s, mode):
    """Over two steps (the second after the draft keeps an accepted path): every node's q is the
    draft's warped distribution after its parent's path (without its earlier siblings' tokens,
    renormalised, when drawing distinct children), and its token is drawn from that q by its own
    uniform; or, for top-k candidates, the siblings are the parent's most likely tokens in order
    and each q is its token's point mass."""
    model = _model(2)
    g = torch.Generator().manual_seed(3)
    top = mode == "top-k"
    draft = TreeDraft(model, branching, top=top, replacement=mode != "distinct")
    B, P, N = 3, 6, draft.n_nodes
    buf = torch.zeros(B, 40, dtype=torch.long)
    buf[:, :P] = torch.randint(0, 11, (B, P), generator=g)
    lengths = torch.full((B,), P)
    draft.start(buf[:, :P], 40)
    for _ in range(2):
        w = torch.rand(B, N, generator=g, dtype=torch.float64)
        tree = draft.propose(buf, lengths, s, w)
        assert tree.tokens[:, 0].tolist() == buf.gather(1, lengths[:, None] - 1)[:, 0].tolist()
        for b in range(B):
            prefix = buf[b, : int(lengths[b])].tolist()
            for i in range(1, N):
                above = tree.tokens[b, _path(draft.parent, draft.parent[i])[1:]].tolist()
                z = model(torch.tensor([prefix + above]))[0, -1]
                want = warp(z, s)
                siblings = [j for j in range(1, N) if draft.parent[j] == draft.parent[i]]
                k = siblings.index(i)
                if mode == "distinct":
                    rest = want.clone()
                    rest[tree.tokens[b, siblings[:k]]] = 0.0
                    want = rest / rest.sum() if rest.sum() > 0 else want
                    if int((warp(z, s) > 0).sum()) >= len(siblings):  # enough tokens: the siblings differ
                        assert len(set(tree.tokens[b, siblings[: k + 1]].tolist())) == k + 1
                if top:  # the k-th child holds the k-th largest logit (ties in any order)
                    assert float(z[tree.tokens[b, i]]) == pytest.approx(float(z.sort(descending=True).values[k]), abs=1e-10)
                    assert len(set(tree.tokens[b, siblings].tolist())) == len(siblings)
                    assert tree.q[b, i].tolist() == torch.nn.functional.one_hot(tree.tokens[b, i], 11).tolist()
                    continue
                torch.testing.assert_close(tree.q[b, i], want, rtol=1e-10, atol=1e-10)
                assert int(tree.tokens[b, i]) == int(sample(tree.q[b, i], w[b, i]))
        # accept a different path per row: none, the first child's line, the last leaf's line
        leaf = N - 1
        lines = [[], _path(draft.parent, draft.level_start[1])[1:], _path(draft.parent, leaf)[1:]]
        path = torch.full((B, draft.depth), -1)
        for b, line in enumerate(lines):
            path[b, : len(line)] = torch.tensor(line, dtype=torch.long)
            emitted = [*tree.tokens[b, line].tolist(), int(torch.randint(0, 11, (), generator=g))]
            buf[b, int(lengths[b]) : int(lengths[b]) + len(emitted)] = torch.tensor(emitted)
            lengths[b] += len(emitted)
        draft.rollback(path, lengths, int(lengths.max()))


@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.7, top_k=3, top_p=0.9), Sampling(0.0)])
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_a_chain_is_the_linear_draft_draw_for_draw(pair, s, gamma):
    """A tree of one child per node, drawing its uniforms where `speculative_generate` does, emits
    the same tokens and accepts the same lengths as the linear verifier (whose law
    tests/test_sampling_exact.py proves) at every step: the tree pass, the tree verifier and the
    kept caches reduce to the linear ones."""
    target, draft = pair
    for linear, chain in [(ModelDraft(draft), TreeDraft(draft, (1,) * gamma)),
                          (ModelDraft(target, layers=[0]), TreeDraft(target, (1,) * gamma, layers=[0]))]:  # fmt: skip
        want = speculative_generate(target, linear, PROMPTS.repeat(4, 1), 40, gamma, s, seeded_draws(12, 5))
        got = tree_generate(target, chain, PROMPTS.repeat(4, 1), 40, s, seeded_draws(12, 5))
        assert torch.equal(got.tokens, want.tokens)
        assert got.n_hist.tolist() == want.n_hist.tolist() and got.steps == want.steps


class Ragged:
    """A tree draft whose row b keeps only the first sizes[b % len(sizes)] nodes of its tree, in
    breadth-first order (parents come first, so it is still a tree): rows of one batch verify trees
    of different shapes."""

    def __init__(self, draft: TreeDraft, sizes: list[int]):
        self.draft, self.sizes = draft, sizes
        self.n_nodes, self.depth = draft.n_nodes, draft.depth

    def start(self, prompt, max_len):
        self.draft.start(prompt, max_len)

    def rollback(self, path, lengths, max_length):
        self.draft.rollback(path, lengths, max_length)

    def propose(self, tokens, lengths, s, w):
        tree = self.draft.propose(tokens, lengths, s, w)
        B, N = tree.tokens.shape
        size = torch.tensor([self.sizes[b % len(self.sizes)] for b in range(B)])
        parent = torch.where(torch.arange(N) < size[:, None], tree.parent, -1)
        return replace(tree, parent=parent, size=size)


PROMPTS = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 4], [3, 1, 0, 2]])


@pytest.fixture(scope="module")
def pair() -> tuple[Transformer, Transformer]:
    return toy("toy-target", 16, 3, seed=0, sharpness=2.0), toy("toy-draft", 8, 1, seed=1)


@pytest.mark.parametrize("branching", [(1,), (3, 2), (2, 2, 2)])
def test_greedy_tree_equals_autoregressive_token_for_token(pair, branching):
    target, draft = pair
    greedy = Sampling(0.0)
    want = autoregressive_generate(target, PROMPTS, 30, greedy, seeded_draws(3, 0))
    drafts = [TreeDraft(draft, branching), TreeDraft(draft, branching, top=True), TreeDraft(draft, branching, replacement=False),
              TreeDraft(target, branching), Ragged(TreeDraft(target, branching), [1, 3, 5])]  # fmt: skip
    for d in drafts:
        run = tree_generate(target, d, PROMPTS, 30, greedy, seeded_draws(3, 1))
        assert torch.equal(run.tokens, want)
    # the target drafting for itself is accepted whole at every step, always its first child: its
    # kept cache is right
    run = tree_generate(target, TreeDraft(target, branching, top=True), PROMPTS, 30, greedy, seeded_draws(3, 1))
    assert int(run.n_hist[:-1].sum()) == 0
    assert torch.equal(run.accepted_rank[:, 0], run.tried) and int(run.accepted_rank[:, 1:].sum()) == 0


def test_acceptance_per_depth_and_rank_adds_up(pair):
    """Depth d is tried by the pairs that accepted d candidates or more (full trees), and the child
    accepted there, of whatever rank, makes one pair with more than d accepted."""
    target, draft = pair
    run = tree_generate(target, TreeDraft(draft, (3, 2, 2)), PROMPTS.repeat(20, 1), 20, Sampling(), seeded_draws(60, 4))
    more_than = run.n_hist.flip(0).cumsum(0).flip(0)  # [D + 1]: pairs with n >= d
    assert run.tried.tolist() == more_than[:-1].tolist()
    assert run.accepted_rank.sum(1).tolist() == more_than[1:].tolist()
    assert run.accepted_rank.shape == (3, 3) and int(run.accepted_rank[0, 2]) > 0  # the third child at the root is used
    acceptance = run.acceptance
    assert bool((acceptance.sum(1) <= 1).all()) and bool((acceptance > 0).any())


@pytest.mark.skipif(not (WEIGHTS_DIR / "target.pt").is_file(), reason="trained pair not present")
def test_greedy_tree_equals_autoregressive_with_the_trained_pair():
    target, draft = load_weights(WEIGHTS_DIR / "target.pt"), load_weights(WEIGHTS_DIR / "draft.pt")
    prompts = torch.tensor([list(b"import os\n"), list(b"def main(a"), list(b"    return")])
    greedy = Sampling(0.0)
    want = autoregressive_generate(target, prompts, 40, greedy, seeded_draws(3, 0))
    for d in [TreeDraft(draft, (3, 2, 1)), TreeDraft(target, (2, 2), layers=[0, 1])]:
        run = tree_generate(target, d, prompts, 40, greedy, seeded_draws(3, 0))
        assert torch.equal(run.tokens, want), d.name
        assert run.tokens_per_step > 1.5  # the trees are accepted often: the pass and the kept caches work


@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.7, top_k=3, top_p=0.9)])
def test_batched_equals_unbatched_with_ragged_trees(pair, s):
    """Each row of a batch, whose neighbours verify other shapes and accept other lengths, produces
    exactly what it produces alone from the same draws."""
    target, draft = pair
    seeds, sizes = [11, 12, 13], [7, 2, 5]
    batched = tree_generate(target, Ragged(TreeDraft(draft, (2, 2)), sizes), PROMPTS, 25, s, per_row_draws(seeds))
    for b in range(3):
        alone = tree_generate(target, Ragged(TreeDraft(draft, (2, 2)), [sizes[b]]), PROMPTS[b : b + 1], 25, s,
                              per_row_draws(seeds[b : b + 1]))  # fmt: skip
        assert torch.equal(alone.tokens[0], batched.tokens[b]), b
    assert int(batched.n_hist[1:].sum()) > 0 and int(batched.n_hist[0]) > 0  # paths accepted and rejected


# ---- statistical end-to-end test: G-test on the joint law of the first two tokens ----
# test_specdec's: significance 1e-6, and the sample size at which every law at total variation
# TV_DETECTED = 0.02 from the target's is rejected with probability 0.99 (noncentral chi-square,
# df = cells of positive probability - 1): 56962 rows at temperature 1 (25 cells), 42833 with the
# filters (8 cells).

SETTINGS = {"t1": Sampling(1.0), "warped": Sampling(0.8, top_k=4, top_p=0.9)}
SIZES_G = [7, 5, 3, 7, 6]  # ragged: the full 2 x 2 tree, and pruned ones


def run_two_tokens(target, draft, s: Sampling, rows: int, seed: int, candidates: str = "sampled") -> torch.Tensor:
    """Counts [V * V] of the first two tokens of `rows` independent tree-speculative generations, one batch."""
    prompt = torch.tensor([PROMPT]).expand(rows, -1)
    d = Ragged(TreeDraft(draft, (2, 2), top=candidates == "top-k", replacement=candidates != "distinct"), SIZES_G)
    out = tree_generate(target, d, prompt, 2, s, seeded_draws(rows, seed))
    first, second = out.tokens[:, len(PROMPT)], out.tokens[:, len(PROMPT) + 1]
    return torch.bincount(first * target.spec.vocab_size + second, minlength=target.spec.vocab_size**2)


@pytest.fixture(scope="module")
def double_pair() -> tuple[Transformer, Transformer]:
    """The pair in float64, as the law it is compared with (and float64 weights take F.linear, which
    saves `Linear` timing its candidates at these row counts)."""
    return toy("toy-target", 16, 3, seed=0, sharpness=2.0).double(), toy("toy-draft", 8, 1, seed=1).double()


@pytest.mark.slow
@pytest.mark.parametrize("candidates,setting", [("sampled", "t1"), ("sampled", "warped"), ("distinct", "t1"), ("top-k", "t1")])
def test_tree_output_law_passes_a_powered_g_test(double_pair, candidates, setting, record_property):
    target, draft = double_pair
    s = SETTINGS[setting]
    law = two_token_law(target, PROMPT, s)
    rows = rows_needed(law)
    p_value, tv = g_test(run_two_tokens(target, draft, s, rows, seed=2025, candidates=candidates), law)
    record_property("empirical_tv", tv)
    print(f"\n{candidates} tree 2x2 ragged {setting}: N={rows} rows (df={int((law > 0).sum()) - 1}, TV {TV_DETECTED} at power 0.99), TV={tv:.4f}, p={p_value:.3g}")
    assert p_value > SIGNIFICANCE


def verify_with_first_sibling_q(tree: TokenTree, p, u, v):
    """Wrong: every child verified with its first sibling's q, as if all siblings were drawn i.i.d."""
    B, N, V = tree.q.shape
    kids = tree.children()
    first = kids.gather(1, tree.parent.clamp_min(0)[..., None].expand(B, N, kids.shape[-1]))[..., 0]  # [B, N]
    first = torch.where(tree.parent >= 0, first, torch.arange(N))
    return verify_tree(replace(tree, q=tree.q.gather(1, first[..., None].expand(B, N, V))), p, u, v)


@pytest.mark.slow
@pytest.mark.parametrize(
    "wrong,candidates",
    [(functools.partial(verify_tree, rule=Rule(reject=lambda r, q, a: r)), "sampled"), (verify_with_first_sibling_q, "top-k")],
    ids=["p-kept-between-siblings", "first-sibling-q"],
)
def test_g_test_catches_wrong_tree_verifiers(double_pair, wrong, candidates, monkeypatch):
    target, draft = double_pair
    monkeypatch.setattr(tree_decode, "verify_tree", wrong)
    law = two_token_law(target, PROMPT, SETTINGS["t1"])
    p_value, tv = g_test(run_two_tokens(target, draft, SETTINGS["t1"], rows_needed(law), seed=7, candidates=candidates), law)
    assert p_value < SIGNIFICANCE, f"mutant not caught (TV {tv:.4f})"
