"""Retrieval drafts: the suffix array against a plain sort, the longest-suffix lookup against a scan,
the most frequent continuation, exact decoding with the draft, and bad input exiting 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.__main__ import main
from reference.model import save_weights
from reference.retrieval import Lookup, RetrievalDraft, build_datastore, load_datastore, save_datastore, suffix_array
from reference.sampling import Sampling
from reference.specdec import autoregressive_generate, seeded_draws, speculative_generate
from tests.test_specdec import toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=80), st.sampled_from([1, 2, 3, 8, 64]))
def test_suffix_array_sorts_suffixes_by_their_first_depth_tokens(tokens, depth):
    t = np.array(tokens, dtype=np.uint8)
    got = suffix_array(t, depth).tolist()
    assert sorted(got) == list(range(len(t)))
    keys = [tokens[i : i + depth] for i in got]
    assert keys == sorted(keys)
    h = 1 << (depth - 1).bit_length()  # the width the doubling reaches: sorted by h tokens, ties in text order
    assert got == sorted(range(len(t)), key=lambda i: (tokens[i : i + h], i))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=60), st.lists(st.integers(0, 2), min_size=1, max_size=12))
def test_longest_match_is_the_longest_context_suffix_in_the_text(text, context):
    ds = build_datastore(text, 3, "text", depth=16)
    m, lo, hi = Lookup(ds, max_match=16).longest_match(context)

    def occurs(k):
        pat = context[len(context) - k :]
        return [i for i in range(len(text)) if text[i : i + k] == pat]

    want = max((k for k in range(1, min(len(context), 16) + 1) if occurs(k)), default=0)
    assert m == want
    if m:
        assert sorted(ds.suffixes[lo:hi].tolist()) == occurs(m)


def test_the_draft_follows_the_most_frequent_continuation():
    # after "ab": "c d" twice, "c e" once, "x" once -> c, then d (2 of the 3 continuations still agreeing)
    text = list(b"abcd abcd abce abx")
    lookup = Lookup(build_datastore(text, 256, "text", depth=8))
    out, m = lookup.continuation(list(b"zab"), 2)
    assert (bytes(out), m) == (b"cd", 2)
    # nothing matches: the last token repeated
    d, m = lookup.draft([7, 7], 3)
    assert (d, m) == ([7, 7, 7], 0)
    # a continuation running into the end of the text is looked up again from where it stopped
    d, _ = lookup.draft(list(b"ab"), 6)
    assert len(d) == 6


def test_greedy_retrieval_decoding_equals_autoregressive_token_for_token():
    target = toy("toy-target", 16, 3, seed=0, sharpness=2.0)
    g = torch.Generator().manual_seed(0)
    corpus = torch.randint(0, 5, (400,), generator=g).tolist()
    draft = RetrievalDraft(build_datastore(corpus, 5, "random"))
    prompts = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 4], [3, 1, 0, 2]])
    greedy = Sampling(0.0)
    want = autoregressive_generate(target, prompts, 30, greedy, seeded_draws(3, 0))
    for gamma in (1, 4):
        got = speculative_generate(target, draft, prompts, 30, gamma, greedy, seeded_draws(3, 1))
        assert torch.equal(got.tokens, want)
    assert draft.lookups > 0 and draft.match_sum > 0


def test_the_tree_holds_the_ranked_continuations_of_the_trie():
    # after "ab": c (3 times: then d twice, e once), x (once, then y)
    lookup = Lookup(build_datastore(list(b"abcd abcd abce abxy"), 256, "text", depth=8))
    paths = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)]
    parent, depth, rank = [-1, 0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 2, 2, 2], [0, 0, 1, 2, 0, 1, 0]
    toks, m = lookup.tree(list(b"zab"), parent, rank, depth)
    assert m == 2
    # node 3 (rank 2 at depth 1): no third distinct token, so its parent's (the root's) again
    assert bytes(toks) == b"b" + b"cxb" + b"de" + b"y"
    from reference.medusa import tree_layout

    assert tree_layout(paths) == (parent, depth, rank)


def test_greedy_retrieval_tree_decoding_equals_autoregressive_token_for_token():
    from reference.medusa import parse_tree_spec
    from reference.retrieval import RetrievalTreeDraft
    from reference.tree_decode import tree_generate

    target = toy("toy-target", 16, 3, seed=0, sharpness=2.0)
    corpus = torch.randint(0, 5, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    draft = RetrievalTreeDraft(build_datastore(corpus, 5, "random"), parse_tree_spec("3x2x1"))
    prompts = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 4], [3, 1, 0, 2]])
    want = autoregressive_generate(target, prompts, 30, Sampling(0.0), seeded_draws(3, 0))
    run = tree_generate(target, draft, prompts, 30, Sampling(0.0), seeded_draws(3, 1))
    assert torch.equal(run.tokens, want) and draft.seconds > 0
    assert run.tokens_per_step > 1.0  # the trie's continuations of a random text still get accepted now and then


def test_a_datastore_file_round_trips(tmp_path):
    ds = build_datastore(list(b"hello world, hello there"), 256, "greeting")
    save_datastore(ds, tmp_path / "ds.npz")
    back = load_datastore(tmp_path / "ds.npz", 256)
    assert np.array_equal(back.tokens, ds.tokens) and np.array_equal(back.suffixes, ds.suffixes)
    assert (back.source, back.vocab_size, back.depth) == ("greeting", 256, ds.depth)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("retrieval")
    target = toy("toy-target", 16, 3, seed=0, vocab=256)
    save_weights(target, folder / "target.pt")
    save_datastore(build_datastore([1, 2, 300, 4], 301, "wide"), folder / "wide.npz")
    (folder / "empty.txt").write_text("")
    (folder / "notes.txt").write_text("def f(x):\n    return x\n")
    np.savez(folder / "other.npz", a=np.zeros(3))
    return folder


@pytest.mark.parametrize(
    "args,message",
    [
        (["--datastore", "{w}/wide.npz"], "vocabulary of 301"),
        (["--corpus", "{w}/empty.txt"], "is empty"),
        (["--corpus", "{w}/absent.txt"], "cannot read the corpus file"),
        (["--datastore", "{w}/other.npz"], "not a datastore file"),
        (["--datastore", "{w}/absent.npz"], "cannot read the datastore"),
        (["--datastore", "{w}/wide.npz", "--corpus", "{w}/notes.txt"], "not both"),
    ],
)
def test_bad_retrieval_input_exits_2_with_one_line(files, capsys, args, message):
    argv = ["specdec", "--draft", "retrieval", "--target", f"{files}/target.pt", "--max-new-tokens", "4", "--repeats", "1"]
    assert main(argv + [a.format(w=files) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_corpus_flags_need_the_retrieval_draft(files, capsys):
    assert main(["specdec", "--draft", "ngram", "--target", f"{files}/target.pt", "--corpus", f"{files}/notes.txt"]) == 2
    assert "for --draft retrieval" in capsys.readouterr().err


def test_specdec_runs_with_a_retrieval_draft_from_text_files(files, capsys):
    argv = ["specdec", "--draft", "retrieval", "--target", f"{files}/target.pt", "--corpus", f"{files}/notes.txt",
            "--prompt", "def f(", "--max-new-tokens", "8", "--gamma", "2", "--repeats", "1", "--temperature", "0", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert '"draft": "retrieval(notes.txt)"' in out.out and "building the datastore" in out.err


def test_datastore_command_writes_a_file_and_reports_its_figures(files, capsys, tmp_path):
    import json

    assert main(["datastore", "--corpus", f"{files}/notes.txt", "--out", f"{tmp_path}/ds.npz", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == len(b"def f(x):\n    return x\n") and out["size_bytes"] > out["tokens"]
    assert out["build_s"] >= 0 and out["lookup_s"] > 0
    assert load_datastore(tmp_path / "ds.npz", 256).source == "notes.txt"


def test_bench_drafts_measures_every_kind_on_the_same_prompts(files, tmp_path):
    import json

    from tests.cli_run import reference_cli

    argv = ["bench", "drafts", "--corpus", f"{files}/notes.txt", "--prompts", "1", "--prompt-bytes", "24", "--max-new-tokens", "6",
            "--repeats", "1", "--bild", "0.3:0.5", "--json", "--plot", f"{tmp_path}/d.png"]  # fmt: skip
    code, out, err = reference_cli(argv)
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["rows"]}
    kinds = ["autoregressive", "model gamma 4", "layer-skip gamma 4", "ngram gamma 4", "retrieval gamma 4", "tree 3x2x1 top", "retrieval tree 3x2x1",
             "BiLD f=0.3 r=0.5"]
    assert set(kinds) <= set(rows)
    for name in kinds[:-1]:  # exact kinds, greedy: the target's own output
        assert rows[name]["exact"] and rows[name]["token_match"] == 1.0 and rows[name]["nll"] == rows["autoregressive"]["nll"]
    bild = rows["BiLD f=0.3 r=0.5"]
    assert not bild["exact"] and bild["token_match"] == 1.0  # rollback 0.5 keeps only the target's argmax
    assert 0 <= bild["first_token_tv_t1"] <= 1 and sum(bild["rates"]["kept_per_pass_counts"]) > 0
    assert (tmp_path / "d.png").stat().st_size > 0
