"""Medusa heads and their drafts: the target's hidden state, the heads' shape and start, tree specs
as rank paths, candidates where the tree says, greedy equal to autoregressive, batched equal to
unbatched, heads files checked against their target, typical acceptance's rule, and the output law
of exact verification with Medusa candidates through a powered G-test that catches a wrong verifier."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from cli_run import reference_cli, run_main
from hypothesis import given
from hypothesis import strategies as st
from test_specdec import PROMPT, SIGNIFICANCE, TV_DETECTED, g_test, per_row_draws, rows_needed, toy, two_token_law

from reference import tree_decode
from reference.medusa import (
    MedusaDraft,
    MedusaHeads,
    best_tree,
    file_sha256,
    full_tree_paths,
    load_heads,
    medusa_loss,
    parse_tree_spec,
    save_heads,
    tree_layout,
    verify_typical,
)
from reference.model import WEIGHTS_DIR, Transformer, load_weights
from reference.sampling import Sampling, fixed_token_probs, warp
from reference.specdec import autoregressive_generate, seeded_draws
from reference.tree import Rule, TokenTree, verify_tree
from reference.tree_decode import expected_tokens_per_step, tree_generate
from simulator.errors import UserError
from simulator.models import ModelSpec

PROMPTS = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 4], [3, 1, 0, 2]])
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]  # a sparse tree: 7 nodes, depth 3


def random_heads(target, n_heads: int, seed: int, scale: float = 1.0) -> MedusaHeads:
    """Heads with random weights (not trained: their candidates are wrong often, which exercises rejection)."""
    torch.manual_seed(seed)
    heads = MedusaHeads(target.spec.d_model, target.spec.vocab_size, n_heads)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, scale / target.spec.d_model**0.5)
    return heads.to(target.embed.weight.dtype)


@pytest.fixture(scope="module")
def target():
    return toy("toy-target", 16, 3, seed=0, sharpness=2.0)


@torch.no_grad()
def test_hidden_state_is_what_the_unembedding_reads(target):
    cache = target.new_cache(3, 16)
    logits, h = target(PROMPTS, cache, hidden=True)
    assert torch.equal(logits, target(PROMPTS)) or torch.allclose(logits, target(PROMPTS), atol=1e-5)
    assert torch.allclose(target.unembed(h), logits, atol=1e-6) and h.shape == (3, 4, target.spec.d_model)


@torch.no_grad()
def test_heads_start_as_the_target_head_and_the_loss_aims_each_head_further_ahead(target):
    heads = MedusaHeads(target.spec.d_model, target.spec.vocab_size, 3).init_from(target)
    _, h = target(PROMPTS, hidden=True)
    out = heads(h)  # [B, T, K, V]
    assert out.shape == (3, 4, 3, target.spec.vocab_size)
    for k in range(3):  # W1 = 0: every head is the target's own unembedding at the start
        assert torch.allclose(out[:, :, k], target.unembed(h), atol=1e-5)
    # the loss of head k is the cross-entropy against the token k + 2 ahead: a head that puts all its
    # mass there has loss 0 (cross-entropy of a one-hot at an infinite logit)
    x = torch.randint(0, target.spec.vocab_size, (2, 10 + 3 + 1))
    _, h = target(x[:, :10], hidden=True)
    perfect = MedusaHeads(target.spec.d_model, target.spec.vocab_size, 3)
    perfect.forward = lambda hh: 1e4 * torch.stack([torch.nn.functional.one_hot(x[:, k + 2 : k + 12], target.spec.vocab_size) for k in range(3)], 2).float()  # fmt: skip
    assert float(medusa_loss(perfect, h, x)) == 0.0


def test_tree_specs():
    assert parse_tree_spec("2x1") == [(0,), (1,), (0, 0), (1, 0)]
    assert parse_tree_spec("[[1],[0],[0,0]]") == [(0,), (1,), (0, 0)]  # breadth-first, rank by rank
    parent, depth, rank = tree_layout(parse_tree_spec("[[0],[1],[1,0],[1,1]]"))
    assert parent == [-1, 0, 0, 2, 2] and depth == [0, 1, 1, 2, 2] and rank == [0, 0, 1, 0, 1]
    bad = {"[[0],[0,1,0]]": "not a tree", "[[0],[1,0]]": "not a tree", "3x0": ">= 1", "2x-1": ">= 1", "[]": "non-empty",
           "[[0],[0]]": "twice", "[[-1]]": ">= 0", "[[0], [0.5]]": "whole numbers", "[[0]": "not valid JSON", "nope": "readable file",
           "4x4x4": "more than the 32"}  # fmt: skip
    for spec, why in bad.items():
        with pytest.raises(UserError, match=why):
            parse_tree_spec(spec, max_nodes=32)


def test_tree_spec_from_a_file(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text(json.dumps([[0], [0, 0], [1]]))
    assert parse_tree_spec(str(path)) == [(0,), (1,), (0, 0)]


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_full_tree_paths_lay_out_a_tree(branching):
    paths = parse_tree_spec("x".join(map(str, branching)))
    sizes = [1]
    for b in branching:
        sizes.append(sizes[-1] * b)
    assert len(paths) == sum(sizes[1:]) == len(full_tree_paths(tuple(branching)))
    parent, depth, _ = tree_layout(paths)
    assert all(parent[i] < i and depth[parent[i]] == depth[i] - 1 for i in range(1, len(parent)))


@given(st.lists(st.lists(st.floats(0, 1), min_size=1, max_size=3), min_size=1, max_size=3), st.integers(1, 12))
def test_best_tree_is_a_tree_of_the_most_valuable_nodes(steps, n_nodes):
    """Medusa's greedy tree: prefix-closed, of min(n_nodes, all) nodes, and worth as much as the
    n_nodes most valuable nodes of all (so no tree of that size is worth more)."""
    top_accuracy = []
    for row in steps:  # cumulative accuracies: nondecreasing, at most 1
        cum, total = [], 0.0
        for x in row:
            total = min(1.0, total + x / len(row))
            cum.append(total)
        top_accuracy.append(cum)
    paths = best_tree(top_accuracy, n_nodes)
    width = [len(r) for r in top_accuracy]
    everything = parse_tree_spec("x".join(map(str, width)))
    assert len(paths) == min(n_nodes, len(everything)) and len(set(paths)) == len(paths)
    assert all(p[:-1] in paths for p in paths if len(p) > 1)
    rank_acc = [[c[r] - (c[r - 1] if r else 0.0) for r in range(len(c))] for c in top_accuracy]

    def value(p):
        v = 1.0
        for d, r in enumerate(p):
            v *= rank_acc[d][r]
        return v

    best = sorted((value(p) for p in everything), reverse=True)[: len(paths)]
    assert sum(value(p) for p in paths) == pytest.approx(sum(best), abs=1e-12)
    assert expected_tokens_per_step(rank_acc, paths) == pytest.approx(1 + sum(best), abs=1e-12)


@torch.no_grad()
def test_candidates_are_each_heads_ranked_tokens(target):
    heads = random_heads(target, 3, seed=3)
    draft = MedusaDraft(target, heads, TREE)
    draft.start(PROMPTS, 32)
    _, h = target(PROMPTS[:, :-1], hidden=True)
    assert torch.equal(draft.hidden, h[:, -1])
    tree = draft.propose(PROMPTS, torch.full((3,), 4), Sampling(), torch.zeros(3, 8))
    order = heads(h[:, -1]).argsort(-1, descending=True)  # [B, K, V]
    assert torch.equal(tree.tokens[:, 0], PROMPTS[:, -1])
    for i, path in enumerate(TREE, start=1):
        assert torch.equal(tree.tokens[:, i], order[:, len(path) - 1, path[-1]])
    assert torch.equal(tree.q[:, 1:], fixed_token_probs(tree.tokens[:, 1:], target.spec.vocab_size, tree.q.dtype))
    assert tree.parent[0].tolist() == [-1, 0, 0, 0, 1, 1, 2, 4]


def test_medusa_draft_rejects_trees_it_cannot_fill(target):
    heads = random_heads(target, 2, seed=3)
    with pytest.raises(UserError, match="3 deep but there are 2"):
        MedusaDraft(target, heads, TREE)
    with pytest.raises(UserError, match="at least 2 tokens"):
        MedusaDraft(target, heads, [(0,)]).start(PROMPTS[:, :1], 8)


@pytest.mark.parametrize("tree", [TREE, full_tree_paths((1,)), full_tree_paths((3, 2))])
def test_greedy_medusa_equals_autoregressive_token_for_token(target, tree):
    greedy = Sampling(0.0)
    want = autoregressive_generate(target, PROMPTS, 30, greedy, seeded_draws(3, 0))
    run = tree_generate(target, MedusaDraft(target, random_heads(target, 3, seed=4), tree), PROMPTS, 30, greedy, seeded_draws(3, 1))
    assert torch.equal(run.tokens, want)
    # heads that copy the target's own next-token head one step behind are right sometimes: the
    # statistics add up whatever was accepted
    more_than = run.n_hist.flip(0).cumsum(0).flip(0)
    assert run.accepted_rank.sum(1).tolist() == more_than[1:].tolist()
    assert bool((run.accepted_rank <= run.offered).all())


def test_batched_equals_unbatched_with_medusa(target):
    s, seeds = Sampling(0.9, top_k=5), [21, 22, 23]
    heads = random_heads(target, 3, seed=5)
    batched = tree_generate(target, MedusaDraft(target, heads, TREE), PROMPTS, 25, s, per_row_draws(seeds))
    for b in range(3):
        alone = tree_generate(target, MedusaDraft(target, heads, TREE), PROMPTS[b : b + 1], 25, s, per_row_draws(seeds[b : b + 1]))
        assert torch.equal(alone.tokens[0], batched.tokens[b]), b


def test_heads_files_are_checked_against_their_target(target, tmp_path):
    weights = tmp_path / "target.bin"
    weights.write_bytes(b"the target's weights")
    other = tmp_path / "other.bin"
    other.write_bytes(b"another target")
    heads = random_heads(target, 3, seed=6).float()
    save_heads(heads, file_sha256(weights), tmp_path / "medusa.pt")
    loaded = load_heads(tmp_path / "medusa.pt", target, weights)
    assert loaded.n_heads == 3 and torch.allclose(loaded.w2, heads.w2.half().to(loaded.w2.dtype))
    with pytest.raises(UserError, match="trained for another target"):
        load_heads(tmp_path / "medusa.pt", target, other)
    (tmp_path / "junk.pt").write_bytes(b"\x00not a torch file")
    with pytest.raises(UserError, match="not a Medusa heads file"):
        load_heads(tmp_path / "junk.pt", target, weights)
    wide = MedusaHeads(target.spec.d_model + 1, target.spec.vocab_size, 3)
    save_heads(wide, file_sha256(weights), tmp_path / "wide.pt")
    with pytest.raises(UserError, match="need shape"):
        load_heads(tmp_path / "wide.pt", target, weights)
    with pytest.raises(UserError, match="no such"):
        load_heads(tmp_path / "missing.pt", target, weights)


# ---- typical acceptance ----


def _chain_tree(tokens: list[list[int]], parent: list[int], V: int) -> TokenTree:
    t = torch.tensor(tokens)
    B, N = t.shape
    return TokenTree(t, torch.tensor([parent] * B), fixed_token_probs(t, V, torch.float64), torch.full((B,), N))


def test_typical_acceptance_takes_the_deepest_path_above_the_threshold():
    V = 4
    # root -> a (1), b (2); a -> c (3); node 0 flat (H = ln 4), nodes 1, 2 peaked
    tree = _chain_tree([[0, 1, 2, 3]], [-1, 0, 0, 1], V)
    p = torch.tensor([[[0.25] * 4, [0.02, 0.02, 0.02, 0.94], [0.97, 0.01, 0.01, 0.01], [0.1, 0.2, 0.3, 0.4]]], dtype=torch.float64)
    # at the root the threshold is min(eps, delta / 4): both children pass with delta = 0.9 (0.225 < 0.25)
    v = verify_typical(tree, p, eps=0.3, delta=0.9)
    assert v.n.tolist() == [2] and v.path.tolist() == [[1, 3]] and v.next_token.tolist() == [3]  # the deeper path; then argmax at node 3
    # eps caps the threshold: at node 1 min(0.3, 0.9 exp(-H)) < 0.94, but with eps 0.95 node 3 fails
    v = verify_typical(tree, p, eps=0.95, delta=10.0)
    assert v.n.tolist() == [0] and v.next_token.tolist() == [0]  # nothing passes 0.25 > 0.95: greedy at the root (first of ties)
    v = verify_typical(tree, p, eps=0.2, delta=10.0)
    assert v.n.tolist() == [2]


@given(st.integers(0, 2**31 - 1))
def test_typical_acceptance_at_temperature_zero_is_greedy(seed):
    """With one-hot p (temperature 0) exp(-H) = 1, so a candidate passes iff it is the argmax: typical
    acceptance accepts exactly what exact verification accepts when siblings differ."""
    g = torch.Generator().manual_seed(seed)
    V, parent = 3, [-1, 0, 0, 1, 1, 2]
    # siblings distinct, as a head's top-k are
    tokens = [[0, *torch.randperm(V, generator=g)[:2].tolist(), *torch.randperm(V, generator=g)[:2].tolist(), int(torch.randint(0, V, (), generator=g))] for _ in range(4)]  # fmt: skip
    tree = _chain_tree(tokens, parent, V)
    p = warp(torch.randn(4, 6, V, generator=g, dtype=torch.float64), Sampling(0.0))
    typical = verify_typical(tree, p, eps=0.3, delta=0.09)
    exact = verify_tree(tree, p, torch.rand(4, 6, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64))
    assert torch.equal(typical.n, exact.n) and torch.equal(typical.next_token, exact.next_token)


# ---- statistical end-to-end test: G-test on the joint law of the first two tokens ----
# the significance, power and detected TV of test_specdec's and test_tree_decode's G-tests:
# 56962 rows at temperature 1 (25 cells) make every law at TV 0.02 from the target's rejected with
# probability 0.99 at significance 1e-6.

MEDUSA_TREE_G = [(0,), (1,), (0, 0), (1, 0), (1, 1)]


def run_two_tokens_medusa(target, heads, s: Sampling, rows: int, seed: int) -> torch.Tensor:
    prompt = torch.tensor([PROMPT]).expand(rows, -1)
    out = tree_generate(target, MedusaDraft(target, heads, MEDUSA_TREE_G), prompt, 2, s, seeded_draws(rows, seed))
    first, second = out.tokens[:, len(PROMPT)], out.tokens[:, len(PROMPT) + 1]
    return torch.bincount(first * target.spec.vocab_size + second, minlength=target.spec.vocab_size**2)


@pytest.fixture(scope="module")
def double_target():
    target = toy("toy-target", 16, 3, seed=0, sharpness=2.0).double()
    return target, random_heads(target, 2, seed=8, scale=3.0)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["t1", "warped"])
def test_medusa_output_law_passes_a_powered_g_test(double_target, setting, record_property):
    target, heads = double_target
    s = {"t1": Sampling(1.0), "warped": Sampling(0.8, top_k=4, top_p=0.9)}[setting]
    law = two_token_law(target, PROMPT, s)
    rows = rows_needed(law)
    counts = run_two_tokens_medusa(target, heads, s, rows, seed=2026)
    p_value, tv = g_test(counts, law)
    record_property("empirical_tv", tv)
    print(f"\nmedusa tree of 5 {setting}: N={rows} rows (df={int((law > 0).sum()) - 1}, TV {TV_DETECTED} at power 0.99), TV={tv:.4f}, p={p_value:.3g}")
    assert p_value > SIGNIFICANCE


@pytest.mark.slow
def test_g_test_catches_a_wrong_verifier_of_medusa_candidates(double_target, monkeypatch):
    """Wrong: the residual kept unchanged between siblings, so a rejected candidate can still be drawn."""
    target, heads = double_target
    monkeypatch.setattr(tree_decode, "verify_tree", functools.partial(verify_tree, rule=Rule(reject=lambda r, q, a: r)))
    law = two_token_law(target, PROMPT, Sampling(1.0))
    p_value, tv = g_test(run_two_tokens_medusa(target, heads, Sampling(1.0), rows_needed(law), seed=7), law)
    assert p_value < SIGNIFICANCE, f"mutant not caught (TV {tv:.4f})"


# ---- the command line ----

TARGET_FILE = WEIGHTS_DIR / "target.pt"
needs_pair = pytest.mark.skipif(not TARGET_FILE.is_file(), reason="trained pair not present")


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory):
    """Random heads recorded for the committed target (the CLI's checks and plumbing, not their quality)."""
    path = tmp_path_factory.mktemp("heads") / "medusa.pt"
    real = load_weights(TARGET_FILE)
    save_heads(random_heads(real, 3, seed=9).float(), file_sha256(TARGET_FILE), path)
    return path


QUICK = ["--max-new-tokens", "6", "--repeats", "1", "--threads", "1"]


@needs_pair
def test_cli_medusa_reports_and_writes_the_acceptance_file(heads_file, tmp_path):
    out_file = tmp_path / "acc.json"
    code, out, err = reference_cli(["specdec", "--draft", "medusa", "--heads", heads_file, "--tree", "[[0],[1],[0,0]]", "--temperature", "0",
                                    "--batch", "2", "--acceptance-out", out_file, "--tv-samples", "20", "--json", *QUICK])  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["exact"] is True and result["acceptance"] == "exact" and result["tree"] == [[0], [1], [0, 0]]
    assert result["tokens_per_step"] >= 1 and result["speedup"] > 0 and len(result["reach"]) == 2
    assert result["tv_samples"] == 20 and 0 <= result["first_token_tv"] <= 1 and "typical_eps" not in result
    acc = json.loads(out_file.read_text())
    assert acc["kind"] == "tree_acceptance" and acc["draft"] == "medusa" and acc["target_sha256"] == file_sha256(TARGET_FILE)
    assert acc["temperature"] == 0.0 and acc["tree"] == [[0], [1], [0, 0]] and acc["steps"] == result["steps"]
    assert len(acc["accept"][0]) == 2 and all(0 <= a <= 1 for row in acc["accept"] for a in row)
    assert acc["source"].startswith("python -m reference specdec")
    # the contract's expected length from the table is the measured mean when acceptance does not
    # depend on the parent beyond what the table records: here it is reported beside it
    assert result["expected_tokens_per_step"] >= 1


@needs_pair
def test_cli_typical_is_labelled_inexact_and_reports_its_divergence(heads_file):
    code, out, err = reference_cli(["specdec", "--draft", "medusa", "--heads", heads_file, "--tree", "2x1", "--acceptance", "typical",
                                    "--tv-samples", "50", *QUICK])  # fmt: skip
    assert code == 0, err
    assert "INEXACT" in out and "TV from the target's law" in out and "50 runs" in out
    code, out, err = reference_cli(["specdec", "--draft", "tree", "--tree", "2x1", "--tree-top", "--acceptance", "typical", "--json",
                                    "--tv-samples", "50", *QUICK])  # fmt: skip
    result = json.loads(out)
    assert code == 0 and result["exact"] is False and result["tv_samples"] == 50 and 0 <= result["first_token_tv"] <= 1


@needs_pair
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--draft", "medusa", "--tree", "[[0],[1,0]]"], "not a tree"),
        (["--draft", "medusa", "--tree", "2x0"], ">= 1"),
        (["--draft", "medusa", "--tree", "2x-2"], ">= 1"),
        (["--draft", "tree", "--tree", "40x25"], "more than the"),
        (["--draft", "tree", "--tree", "300", "--tree-top"], "vocabulary of 256"),
        (["--draft", "medusa", "--tree", "[[300]]"], "vocabulary of 256"),
        (["--draft", "tree", "--tree", "[[0],[0,0],[1]]"], "full tree"),
        (["--draft", "tree", "--acceptance", "typical"], "fixed candidates"),
        (["--draft", "model", "--tree", "2x2"], "for tree drafts"),
        (["--draft", "model", "--acceptance-out", "x.json"], "for tree drafts"),
        (["--draft", "ngram", "--tv-samples", "10"], "for tree drafts"),
        (["--draft", "medusa", "--tv-samples", "0"], "--tv-samples must be"),
        (["--draft", "medusa", "--tree-top"], "for --draft tree"),
        (["--draft", "medusa", "--acceptance", "typical", "--typical-eps", "0"], "typical-eps"),
        (["--draft", "medusa", "--tree", "[[0],[0,0],[0,0,0],[0,0,0,0]]"], "Medusa heads"),
        (["--draft", "medusa", "--heads", "no-such-heads.pt"], "no such Medusa heads file"),
        (["--draft", "tree", "--acceptance-out", "/proc/no/such/dir/acc.json"], "cannot write"),
    ],
)
def test_cli_bad_tree_input_is_one_line(heads_file, argv, needle):
    argv = [*argv, "--heads", heads_file] if "--heads" not in argv else argv
    code, out, err = reference_cli(["specdec", *QUICK, *argv])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out, err


@needs_pair
def test_cli_heads_for_another_target_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    save_heads(random_heads(load_weights(TARGET_FILE), 3, seed=9).float(), "0" * 64, path)
    code, out, err = reference_cli(["specdec", "--draft", "medusa", "--heads", path, *QUICK])
    assert code == 2 and "another target" in err and len(err.strip().splitlines()) == 1


# ---- training ----


def test_medusa_training_is_seeded_and_lowers_the_loss():
    from reference import train

    spec = ModelSpec(name="toy-long", d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=8, max_seq_len=train.SEQ_LEN)
    torch.manual_seed(0)
    target = Transformer(spec).eval().requires_grad_(False)
    data = torch.arange(4000) % 8  # a cycle: the token k ahead is a function of the current one
    runs = [train.train_medusa(target, data, 12, 2, 1e-2, seed=5) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True))
    x = next(train.batches(data, 1, 9, extra=2))
    _, h = target(x[:, : train.SEQ_LEN], hidden=True)
    fresh = MedusaHeads(16, 8, 2).init_from(target)
    with torch.no_grad():
        assert float(medusa_loss(runs[0], h, x)) < float(medusa_loss(fresh, h, x))


def test_medusa_stage_refuses_a_target_the_manifest_does_not_describe(tmp_path):
    from reference import train

    (tmp_path / "target.pt").write_bytes(b"not the target")
    (tmp_path / "manifest.json").write_text(json.dumps({"weights_sha256": {"target": "0" * 64}}))
    code, out, err = run_main(train.main, ["medusa", "--out", tmp_path, "--steps", "1"])
    assert code == 2 and "sha256 differs" in err and not (tmp_path / "medusa.pt").exists()
    (tmp_path / "manifest.json").unlink()
    code, out, err = run_main(train.main, ["medusa", "--out", tmp_path, "--steps", "1"])
    assert code == 2 and "manifest.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not (WEIGHTS_DIR / "medusa.pt").is_file(), reason="trained heads not present")
def test_trained_heads_match_the_manifest_and_decode_greedily_as_the_target():
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())["medusa"]
    assert manifest["target_sha256"] == file_sha256(TARGET_FILE) and manifest["weights_sha256"] == file_sha256(WEIGHTS_DIR / "medusa.pt")
    target = load_weights(TARGET_FILE)
    heads = load_heads(WEIGHTS_DIR / "medusa.pt", target, TARGET_FILE)
    assert heads.n_heads == manifest["heads"]
    paths = parse_tree_spec(str(WEIGHTS_DIR / "medusa_tree.json"), max_nodes=32)
    prompts = torch.tensor([list(b"import os\n"), list(b"def main(a"), list(b"    return")])
    greedy = Sampling(0.0)
    want = autoregressive_generate(target, prompts, 40, greedy, seeded_draws(3, 0))
    run = tree_generate(target, MedusaDraft(target, heads, paths), prompts, 40, greedy, seeded_draws(3, 0))
    assert torch.equal(run.tokens, want)
    assert run.tokens_per_step > 1.5  # the heads' candidates are accepted often: their hidden state is the right one
