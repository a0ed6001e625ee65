"""The simulator's tree speculation: shapes, the acceptance table, the expected length of a tree,
the best tree of a node budget against brute force, the pricing of a tree step, `plan --tree`
and its answers to bad input. Acceptance tables here are test fixtures, not measurements."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import tree as T
from simulator.errors import UserError
from simulator.forward import forward
from simulator.hardware import load_profile
from simulator.models import load_model
from simulator.speculative import expected_tokens_positional
from tests.cli_run import ROOT, simulator_cli

ACCEPT = [[0.6, 0.15, 0.08, 0.04], [0.5, 0.15, 0.07], [0.4, 0.12, 0.06], [0.35, 0.1], [0.3, 0.1]]


def table(accept=ACCEPT, **over) -> dict:
    data = {"kind": "tree_acceptance", "draft": "medusa", "target": "tiny-target", "target_sha256": "ab12", "temperature": 0.0,
            "accept": accept, "steps": 400, "tree": [[0], [1], [0, 0]], "source": "test fixture"}  # fmt: skip
    data.update(over)
    return data


def acc_of(accept=ACCEPT, **over) -> T.TreeAcceptance:
    return T.check_tree_acceptance(table(accept, **over), "fixture.json")


@pytest.fixture
def acc_file(tmp_path):
    def write(**over):
        path = tmp_path / "acc.json"
        path.write_text(json.dumps(table(**over)))
        return path

    return write


# --- shapes --------------------------------------------------------------------------------


def test_full_tree_shape_and_count():
    tree = T.parse_tree("3x2x1")
    assert len(tree) == T.full_tree_nodes((3, 2, 1)) == 3 + 6 + 6
    assert T.level_sizes(tree) == [3, 6, 6]
    assert T.check_tree([list(p) for p in tree]) == tree
    assert T.parse_tree("[[0],[1],[0,0]]") == ((0,), (1,), (0, 0))


@pytest.mark.parametrize(("spec", "words"), [
    ("[[0],[0,0],[1,0]]", "not a tree"),
    ("[[0],[0]]", "listed twice"),
    ("[[0],[-1]]", "ranks >= 0"),
    ("[]", "non-empty"),
    ("[[0],[]]", "non-empty list of ranks"),
    ("[[0],", "not valid JSON"),
    ("3x0", "branching factor must be >= 1"),
    ("best:0", "N >= 1"),
    ("best:x", "N >= 1"),
    ("best:\u00b2", "N >= 1"),  # a digit to str.isdigit, not to int()
    ("best:000", "N >= 1"),
    ("best:" + "9" * 5000, "no context holds"),  # past int()'s digit limit
    ("3x" + "9" * 5000, "no context holds"),
    ("[[" + "9" * 5000 + "]]", "not valid JSON"),
    ("a" * 5000, "not a shape"),  # too long a name for a file
    ("tree", "not a shape"),
])  # fmt: skip
def test_bad_tree_specs_are_one_line(spec, words):
    with pytest.raises(UserError, match=words):
        T.parse_tree(spec, acc_of())


def test_a_tree_larger_than_the_context_is_refused_before_it_is_built():
    with pytest.raises(UserError, match="do not fit the context"):
        T.parse_tree("1000x1000x1000", max_nodes=4000)  # 10^9 nodes: counted, never built
    assert len(T.parse_tree("2x2", max_nodes=6)) == 6


# --- acceptance ----------------------------------------------------------------------------


@pytest.mark.parametrize(("over", "field"), [
    ({"kind": "acceptance"}, "field kind"),
    ({"draft": "linear"}, "field draft"),
    ({"target": ""}, "field target"),
    ({"temperature": -1}, "field temperature"),
    ({"steps": 0}, "field steps"),
    ({"steps": True}, "field steps"),
    ({"accept": []}, "field accept"),
    ({"accept": [[0.5], 0.3]}, "field accept"),
    ({"accept": [[0.5, 1.2]]}, r"field accept\[0\]\[1\]"),
    ({"accept": [[0.5, "x"]]}, r"field accept\[0\]\[1\]"),
    ({"accept": [[0.6, 0.5]]}, r"field accept\[0\]: .*sum to 1.1"),
    ({"tree": [[0, 0]]}, "field tree: not a tree"),
    ({"tree": [[0], [0, 0]], "accept": [[0.5]]}, "field tree: reaches depth 2"),
])  # fmt: skip
def test_bad_acceptance_tables_name_the_file_and_field(over, field):
    with pytest.raises(UserError, match=f"fixture.json: {field}"):
        acc_of(**over)


def test_expected_tokens_by_hand_and_its_law():
    acc = acc_of([[0.6, 0.2], [0.5, 0.1]])
    tree = ((0,), (1,), (0, 0))
    assert T.expected_tokens(tree, acc) == pytest.approx(1 + 0.6 + 0.2 + 0.6 * 0.5, abs=1e-15)
    pmf = T.accepted_length_pmf(tree, acc)
    assert pmf == pytest.approx([1 - 0.8, 0.8 - 0.3, 0.3], abs=1e-15)
    assert sum(pmf * [1, 2, 3]) == pytest.approx(T.expected_tokens(tree, acc), abs=1e-12)
    with pytest.raises(UserError, match="covers depths 1..2 but the tree reaches depth 3"):
        T.expected_tokens(((0,), (0, 0), (0, 0, 0)), acc)


def test_a_chain_is_linear_speculation_with_positional_rates():
    acc = acc_of()
    chain = tuple((0,) * k for k in range(1, 6))
    assert T.expected_tokens(chain, acc) == pytest.approx(expected_tokens_positional([row[0] for row in ACCEPT]), abs=1e-12)


# --- the best tree of a budget ---------------------------------------------------------------

rows = st.lists(st.floats(0, 1), min_size=1, max_size=3).map(lambda r: [x / max(1.0, sum(r)) for x in r])


@given(st.lists(rows, min_size=1, max_size=3), st.integers(1, 5))
def test_greedy_best_tree_equals_brute_force(accept, n):
    acc = acc_of(accept, tree=[[0]])
    candidates = [p for d in range(1, len(accept) + 1) for p in _paths(accept, d)]
    if len(candidates) < n:
        with pytest.raises(UserError, match="measures only"):
            T.best_tree(acc, n)
        return
    best = T.best_tree(acc, n)
    assert len(best) == n and T.check_tree([list(p) for p in best]) == best
    brute = max(T.expected_tokens(t, acc) for t in T.all_trees(candidates, n))
    assert T.expected_tokens(best, acc) == pytest.approx(brute, abs=1e-12)


def _paths(accept, d):
    return [tuple(p) for p in itertools.product(*(range(len(accept[i])) for i in range(d)))]


def test_brute_force_catches_a_greedy_that_ranks_by_the_local_rate():
    """The mutant: add the frontier node with the largest own rate, not path probability."""
    accept = [[0.6, 0.3], [0.5], [0.9]]
    acc = acc_of(accept, tree=[[0]])
    frontier, chosen = [(0,), (1,)], []
    for _ in range(3):
        node = max(frontier, key=lambda p: acc.rate(len(p), p[-1]))
        frontier.remove(node)
        chosen.append(node)
        frontier += [node + (r,) for r in range(len(accept[len(node)]))] if len(node) < len(accept) else []
    mutant = tuple(sorted(chosen, key=lambda p: (len(p), p)))
    assert T.expected_tokens(mutant, acc) == pytest.approx(2.17) and T.expected_tokens(T.best_tree(acc, 3), acc) == pytest.approx(2.2)


def test_best_tree_grows_monotonically_and_beats_the_chain():
    acc = acc_of()
    lengths = [T.expected_tokens(T.best_tree(acc, n), acc) for n in range(1, 65)]
    assert all(b >= a for a, b in zip(lengths, lengths[1:], strict=False))
    for n in range(1, 6):
        chain = tuple((0,) * k for k in range(1, n + 1))
        assert lengths[n - 1] >= T.expected_tokens(chain, acc) - 1e-12


# --- pricing -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def a100():
    return load_profile("a100")


def test_verify_pass_prices_root_plus_nodes(a100):
    m = load_model("llama-2-7b")
    assert T.verify_pass(m, a100, 2, 640, 15)["total"].time_s == forward(m, a100, 2, 640, 16)["total"].time_s


def test_the_verify_pass_turns_compute_bound_at_batch_times_nodes(a100):
    m = load_model("llama-2-7b")
    t = {(b, n): T.verify_pass(m, a100, b, 640, n)["total"].time_s for b in (1, 128) for n in (0, 15)}
    assert t[1, 15] / t[1, 0] < 1.1  # 16 tokens: memory-bound, almost free
    assert t[128, 15] / t[128, 0] > 3  # 2048 tokens: past the ridge, the tree's 16x tokens cost compute


def test_medusa_heads_and_draft_tree_costs(a100):
    m, d = load_model("llama-2-7b"), load_model("llama-68m")
    one = T.medusa_heads_cost(m, a100, 4, 1)
    assert T.medusa_heads_cost(m, a100, 4, 3).time_s == pytest.approx(3 * one.time_s)
    assert one.flops == 2 * 4 * (m.d_model * m.d_model + m.d_model * m.vocab_size)
    assert T.medusa_heads_bytes(m, 2) == 2 * 2 * (4096 * 4096 + 4096 * 32000)
    chain = T.parse_tree("1x1x1")
    passes = sum(forward(d, a100, 4, 640 + j, 1)["total"].time_s for j in range(3))
    assert T.draft_tree_cost(d, a100, 4, 640, chain).time_s == pytest.approx(passes)
    wide = T.draft_tree_cost(d, a100, 4, 640, T.parse_tree("4x4x4")).time_s
    assert wide == pytest.approx(sum(forward(d, a100, 4, 640 + c, q)["total"].time_s for c, q in ((0, 1), (1, 4), (5, 16))))


def test_stops_paying_is_the_first_batch_without_a_speedup(a100):
    m = load_model("llama-2-7b")
    acc = acc_of()
    tree = T.best_tree(acc, 64)
    tokens = T.expected_tokens(tree, acc)
    b = T.stops_paying_at_batch(m, None, a100, 640, tree, tokens)
    assert b is not None and b > 1

    def speedup(batch):
        propose, verify = T.tree_step_s(m, None, a100, batch, 640, tree)
        return tokens / (propose + verify) * forward(m, a100, batch, 640, 1)["total"].time_s

    assert speedup(b - 1) > 1 >= speedup(b)


# --- plan --tree ---------------------------------------------------------------------------


def test_plan_medusa_best_tree_json(acc_file):
    path = acc_file()
    code, out, err = simulator_cli(["plan", "--draft", "medusa", "--tree", "best:64", "--gpu", "a100", "--model", "llama-2-7b",
                                    "--acceptance", path, "--json"])  # fmt: skip
    assert code == 0, err
    p = json.loads(out)
    assert p["tree"]["nodes"] == 64 and len(p["tree"]["paths"]) == 64
    acc = T.load_tree_acceptance(path)
    assert p["expected_tokens_per_step"] == pytest.approx(T.expected_tokens(T.best_tree(acc, 64), acc))
    assert p["acceptance"]["target"] == "tiny-target" and not p["acceptance"]["measured_on_plan_target"]
    assert p["acceptance"]["source"] == "test fixture"
    assert p["speedup_over_autoregressive"] == pytest.approx(p["tokens_per_s"] / p["autoregressive_tokens_per_s"])
    assert p["speedup_over_linear"] == pytest.approx(p["tokens_per_s"] / p["linear"]["tokens_per_s"])
    assert p["linear"]["alpha_assumed"] and p["stops_paying_at_batch"] >= 1
    code, text, _ = simulator_cli(["plan", "--draft", "medusa", "--tree", "best:64", "--acceptance", path])
    assert code == 0 and "not on llama-2-7b" in text and "stops paying at batch" in text


def test_plan_draft_model_tree(acc_file):
    path = acc_file(draft="tree")
    code, out, err = simulator_cli(["plan", "--draft", "llama-68m", "--tree", "3x2x1", "--acceptance", path, "--json"])
    assert code == 0, err
    p = json.loads(out)
    assert p["draft"] == "llama-68m" and p["tree"]["nodes"] == 15 and p["tree"]["medusa_heads"] is None


@pytest.mark.parametrize(("args", "words"), [
    (["--draft", "medusa"], "needs --tree"),
    (["--draft", "medusa", "--tree", "best:0"], "N >= 1"),
    (["--draft", "medusa", "--tree", "[[1,0]]"], "not a tree"),
    (["--draft", "medusa", "--tree", "3x3x3x3x3x3x3x3"], "do not fit the context"),
    (["--draft", "medusa", "--tree", "1x1x1x1x1x1"], "covers depths 1..5 but the tree reaches depth 6"),
    (["--draft", "medusa", "--tree", "best:1000"], "measures only"),
    (["--draft", "llama-68m", "--tree", "2x2"], "measured with draft 'medusa'"),
    (["--draft", "medusa", "--tree", "2x2", "--gamma", "3"], "--gamma does not apply"),
    (["--draft", "medusa", "--tree", "2x2", "--rate", "5"], "search"),
    (["--draft", "medusa", "--tree", "2x2", "--batch", "0"], "--batch must be >= 1"),
])  # fmt: skip
def test_plan_tree_bad_input_is_one_line_exit_2(acc_file, args, words):
    code, out, err = simulator_cli(["plan", *args, "--acceptance", acc_file()])
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err


def test_plan_tree_without_a_table_asks_for_one(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "DEFAULT_MEDUSA_ACCEPTANCE", tmp_path / "absent.json")
    code, _, err = simulator_cli(["plan", "--draft", "medusa", "--tree", "2x2"])
    assert code == 2 and "--acceptance FILE" in err
    code, _, err = simulator_cli(["plan", "--draft", "llama-68m", "--tree", "2x2"])
    assert code == 2 and "--acceptance FILE" in err
    code, _, err = simulator_cli(["plan", "--acceptance", str(tmp_path / "a.json")])
    assert code == 2 and "goes with --tree" in err


def test_a_number_past_the_digit_limit_is_one_line(tmp_path):
    path = tmp_path / "acc.json"
    path.write_text('{"kind": ' + "9" * 5000 + "}")
    code, out, err = simulator_cli(["plan", "--draft", "medusa", "--tree", "2x2", "--acceptance", path])
    assert code == 2 and out == "" and err.count("\n") == 1 and "digits" in err and str(path) in err


def test_default_table_is_the_executors_measured_file():
    assert T.DEFAULT_MEDUSA_ACCEPTANCE.parts[-3:] == ("reference", "weights", "medusa_acceptance.json")
    assert math.isfinite(T.SUM_TOLERANCE)


# --- simulate --tree: a tree-speculative serving engine ---------------------------------------


def _stream(n=60, rate=30.0, seed=3):
    from simulator.workload import WorkloadSpec, make_stream

    spec = WorkloadSpec(arrival="poisson", rate_per_s=rate, requests=n, prompt_tokens=200, output_tokens=60, lengths="uniform")
    return list(make_stream(spec, np.random.default_rng(seed)))


def _serve(speculation, cfg, stream, seed=5):
    from simulator.serving import simulate_serving

    return simulate_serving(load_profile("a100"), load_model("llama-2-7b"), speculation.draft, speculation.acceptance_model(), cfg,
                            iter(stream), np.random.default_rng(seed), engine=speculation.engine)  # fmt: skip


def _figures(r):
    return [r["throughput"]["output_tokens_per_s"], r["engine"]["steps"], r["kv_cache"]["capacity_blocks"], r["requests"]["preemptions"],
            *(r["latency_s"][m][s] for m in ("ttft", "tpot", "e2e") for s in ("mean", "p99"))]  # fmt: skip


@pytest.mark.parametrize("chunked", [False, True])
def test_a_draft_chain_tree_serves_as_linear_drafting(chunked):
    """A draft model's 1x1x1x1 tree is linear drafting with gamma 4 and per-position rates: one
    draft pass of one token per level, the same lookahead, the same accepted-length law, so the
    same run, draw for draw."""
    from simulator.serving import AcceptanceModel, ServingConfig, simulate_serving

    rates = [0.8, 0.6, 0.5, 0.3]
    acc = acc_of([[a] for a in rates], draft="tree")
    sp = T.TreeSpeculation(T.parse_tree("1x1x1x1"), load_model("llama-68m"), acc, "1x1x1x1")
    cfg = ServingConfig(gamma=4, chunked_prefill=chunked, max_batched_tokens=1024)
    stream = _stream()
    tree = _serve(sp, cfg, stream)
    linear = simulate_serving(load_profile("a100"), load_model("llama-2-7b"), load_model("llama-68m"), AcceptanceModel(kind="positional", alphas=rates),
                              cfg, iter(stream), np.random.default_rng(5))  # fmt: skip
    assert _figures(tree) == pytest.approx(_figures(linear), rel=1e-9)
    assert tree["engine"]["expected_tokens_per_verify"] == pytest.approx(expected_tokens_positional(rates))


def test_medusa_engine_spans_equal_single_steps_and_pay_for_heads():
    from simulator.serving import ServingConfig, kv_cache_blocks

    acc = acc_of()
    sp = T.TreeSpeculation(T.best_tree(acc, 16), None, acc, "best:16")
    stream = _stream()
    fast = _serve(sp, ServingConfig(gamma=16, check_invariants=True), stream)
    slow = _serve(sp, ServingConfig(gamma=16, max_span_steps=1, check_invariants=True), stream)
    assert _figures(fast) == pytest.approx(_figures(slow), rel=1e-9)
    assert fast["requests"]["completed"] == len(stream)
    assert abs(fast["engine"]["tokens_per_verify"] - T.expected_tokens(sp.tree, acc)) < 0.1
    m, hw = load_model("llama-2-7b"), load_profile("a100")
    blocks, per_block = kv_cache_blocks(hw, m, None, ServingConfig(gamma=16))
    heads = T.medusa_heads_bytes(m, T.depth(sp.tree))
    usable = hw.memory_bytes * ServingConfig().memory_utilization - 2 * m.n_params
    assert fast["kv_cache"]["capacity_blocks"] == int((usable - heads) // per_block) < blocks


def test_simulate_tree_cli(acc_file):
    path = acc_file()
    code, out, err = simulator_cli(["simulate", "--draft", "medusa", "--tree", "best:16", "--acceptance", path, "--requests", "40",
                                    "--rate", "2", "--no-interval", "--json"])  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["config"]["draft"] == "medusa" and r["config"]["gamma"] == 16 and r["config"]["tree"]["nodes"] == 16
    assert r["config"]["tree"]["acceptance"]["source"] == "test fixture"
    assert r["speculative"]["requests"]["completed"] == 40
    code, text, _ = simulator_cli(["simulate", "--draft", "medusa", "--tree", "2x2", "--acceptance", path, "--requests", "10", "--no-interval"])
    assert code == 0 and "tree 2x2 (6 nodes" in text and "not on llama-2-7b" in text


@pytest.mark.parametrize(("args", "words"), [
    (["--draft", "medusa"], "needs --tree"),
    (["--draft", "medusa", "--tree", "2x2", "--gamma", "3"], "do not apply to a tree"),
    (["--draft", "medusa", "--tree", "2x2", "--alpha", "0.5"], "do not apply to a tree"),
    (["--draft", "medusa", "--tree", "best:0"], "N >= 1"),
    (["--draft", "medusa", "--tree", "[[0],[2,0]]"], "not a tree"),
    (["--draft", "medusa", "--tree", "4096x1"], "do not fit the context"),
    (["--draft", "medusa", "--tree", "2x2x2x2x2x2"], "covers depths 1..5 but the tree reaches depth 6"),
    (["--draft", "llama-68m", "--tree", "2x2"], "measured with draft 'medusa'"),
])  # fmt: skip
def test_simulate_tree_bad_input_is_one_line_exit_2(acc_file, args, words):
    code, out, err = simulator_cli(["simulate", *args, "--acceptance", acc_file(), "--requests", "5", "--no-interval"])
    assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err


def test_the_readme_example_is_what_plan_prints(monkeypatch):
    """The README's `plan --draft medusa --tree best:64` example, line for line (the fixture table)."""
    monkeypatch.chdir(ROOT)  # the example names the table by its path from the repository root
    readme = (ROOT / "README.md").read_text()
    block = readme.split("$ python -m simulator plan --draft medusa --tree best:64", 1)[1].split("```", 1)[0]
    expected = [line for line in block.splitlines()[2:] if line.strip() and "(64 paths)" not in line]
    code, out, err = simulator_cli(["plan", "--draft", "medusa", "--tree", "best:64", "--gpu", "a100", "--model", "llama-2-7b",
                                    "--acceptance", "tests/data/tree_acceptance_fixture.json"])  # fmt: skip
    assert code == 0, err
    assert len(expected) > 10 and all(line in out.splitlines() for line in expected)


# --- fuzz: tree specs and tree acceptance files --------------------------------------------------

NASTY = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=6), st.lists(st.integers(-2, 3), max_size=3), st.lists(st.lists(st.floats(-1, 2), max_size=3), max_size=3))  # fmt: skip
SPECS = st.one_of(
    st.text(max_size=12),
    st.builds(lambda n: f"best:{n}", st.integers(-3, 10**12)),
    st.lists(st.integers(0, 5000), min_size=1, max_size=4).map(lambda b: "x".join(map(str, b))),
    st.lists(st.lists(st.integers(-1, 10**20), max_size=4), max_size=5).map(json.dumps),
)


def _answer(code, out, err):
    """Exit 0 with JSON a strict reader takes, or exit 2 with one line on stderr and nothing on stdout."""
    if code == 0:
        json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    else:
        assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), (code, err)


@settings(max_examples=40)
@given(field=st.sampled_from(["kind", "draft", "target", "target_sha256", "temperature", "accept", "steps", "tree", "source"]),
       value=NASTY, drop=st.booleans())  # fmt: skip
def test_fuzz_tree_acceptance_files(tmp_path_factory, field, value, drop):
    data = table()
    if drop:
        del data[field]
    else:
        data[field] = value
    path = tmp_path_factory.mktemp("acc") / "acc.json"
    path.write_text(json.dumps(data))
    code, out, err = simulator_cli(["plan", "--draft", "medusa", "--tree", "2x2", "--acceptance", path, "--json"])
    _answer(code, out, err)
    if code == 2:
        assert str(path) in err


@settings(max_examples=40)
@given(spec=st.one_of(SPECS, st.sampled_from(["best:\u00b2", "best:" + "9" * 5000, "[[" + "9" * 5000 + "]]", "a" * 5000, "x", "1x", "best:"])))
def test_fuzz_tree_specs(tmp_path_factory, spec):
    path = tmp_path_factory.mktemp("acc") / "acc.json"
    path.write_text(json.dumps(table()))
    code, out, err = simulator_cli(["plan", "--draft", "medusa", "--tree", spec, "--acceptance", path, "--batch", "1", "--json"])
    _answer(code, out, err)
