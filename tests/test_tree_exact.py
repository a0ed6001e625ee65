"""Exactness of tree verification by enumeration: no randomness, float64, vocabulary <= 5, depth <= 3,
branching <= 3.

A hypothesis-generated tree of up to 6 candidates below the root, each one either sampled from the
toy draft's warped distribution at its parent (siblings i.i.d., as SpecInfer drafts), sampled
without replacement (its earlier siblings' tokens removed from q), or a fixed candidate (the
draft's k-th most likely token, a point mass, as Medusa's top-k): every draft outcome is listed with
its probability. For each, the verifier's output is piecewise constant in its uniforms: node i's
draw is compared with one threshold (min(1, r(x)/q(x)) against the residual r its earlier siblings
left), and the last draw with the CDFs of every distribution the last token may come from. [0, 1)
is cut there for every node at once, the verifier runs once per cell of the product at the
midpoints, and each outcome is weighted by the cell's volume. The law of the first depth + 1
emitted tokens (continued from the target after a short path) must equal the target's own joint law
within 1e-9, with temperature / top-k / top-p warping applied to draft and target alike.

Negative controls: each known-wrong variant, built through the verifier's `Rule` or by what it is
given as q, must make the same check fail. The cells are cut at each variant's own thresholds, so
what is compared for a variant is its exact law too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st
from test_sampling_exact import NEG_INF, OneHotLM, ToyLM, cells

from reference.sampling import Sampling, warp
from reference.tree import EXACT, Rule, TokenTree, min_ratio, take_accepted, verify_tree

TOLERANCE = 1e-9
MAX_DEPTH, MAX_BRANCHING, MAX_NODES = 3, 3, 6
KINDS = ("sampled", "unique", "top")  # i.i.d. from the draft; without replacement; the draft's k-th most likely


@dataclass(frozen=True)
class TreeCase:
    target: ToyLM
    draft: ToyLM
    parent: tuple[int, ...]  # parent of node i, i = 0..N; -1 at the root
    kind: tuple[str, ...]  # per node; the root's is unused
    rank: tuple[int, ...]  # per node: which of the draft's tokens a "top" candidate takes, 0 the most likely
    s: Sampling

    @property
    def vocab(self) -> int:
        return len(self.target.base)

    def depth(self, i: int) -> int:
        return 0 if i == 0 else 1 + self.depth(self.parent[i])

    def children(self, j: int) -> list[int]:
        return [i for i in range(1, len(self.parent)) if self.parent[i] == j]


# logits on a grid of quarters, so ties (argmax, top-k, top-p boundaries) happen often, and small
# enough that the sum of three stays far from one-hot; now and then a token banned everywhere
finite = st.sampled_from([k / 4 for k in range(-4, 5)])
value = st.sampled_from([k / 4 for k in range(-4, 5)] + [NEG_INF])


# every filter, alone and together; plain sampling most often, whose distributions are the least degenerate
samplings = st.builds(
    Sampling,
    temperature=st.sampled_from([1.0, 1.0, 1.0, 0.0, 0.5, 1.7]),
    top_k=st.sampled_from([None, None, None, 2, 3]),
    top_p=st.sampled_from([1.0, 1.0, 1.0, 0.9, 0.6]),
)


@st.composite
def toy_lm(draw, V: int, allowed: tuple[int, ...], one_hot: bool = False) -> ToyLM:
    vec = st.lists(finite, min_size=V, max_size=V).map(tuple)
    base = tuple(draw(st.lists(value, min_size=V, max_size=V)))
    lm = ToyLM(base, tuple(draw(vec) for _ in range(V + 1)), tuple(draw(vec) for _ in range(MAX_DEPTH + 1)), allowed)
    return OneHotLM(lm.base, lm.trans, lm.pos, lm.allowed) if one_hot else lm


@st.composite
def tree_cases(draw) -> TreeCase:
    V = draw(st.integers(2, 5))
    everything = tuple(range(V))
    n = draw(st.integers(1, MAX_NODES))
    parent, depth, branches = [-1], [0], [0]
    for _ in range(n):
        j = draw(st.sampled_from([j for j in range(len(parent)) if depth[j] < MAX_DEPTH and branches[j] < MAX_BRANCHING]))
        parent.append(j)
        depth.append(depth[j] + 1)
        branches[j] += 1
        branches.append(0)
    kind = ["root"] + draw(st.lists(st.sampled_from(KINDS), min_size=n, max_size=n))
    # at most ~150 draft outcomes: V^sampled, so that the enumeration stays small
    budget = {2: 7, 3: 4, 4: 3, 5: 3}[V]
    for i in range(1, n + 1):
        if kind[i] != "top":
            budget -= 1
            if budget < 0:
                kind[i] = "top"
    rank = (0,) + tuple(draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n)))
    relation = draw(st.sampled_from(["independent", "independent", "equal", "one_hot_target", "one_hot_draft", "disjoint"]))
    if relation == "disjoint":
        k = draw(st.integers(1, V - 1))
        target, draft = draw(toy_lm(V, everything[:k])), draw(toy_lm(V, everything[k:]))
    else:
        target = draw(toy_lm(V, everything, one_hot=relation == "one_hot_target"))
        draft = target if relation == "equal" else draw(toy_lm(V, everything, one_hot=relation == "one_hot_draft"))
    return TreeCase(target, draft, tuple(parent), tuple(kind), rank, draw(samplings))


# ---- the draft side: every tree the draft can propose, with its probability ----


def draft_outcomes(case: TreeCase) -> list[tuple[tuple[int, ...], torch.Tensor, float]]:
    """(tokens [N+1] with the root 0, q [N+1, V] each node was drawn from, probability) for every outcome."""
    N, V = len(case.parent), case.vocab
    out = []

    def path(tokens, i):
        return () if i == 0 else (*path(tokens, case.parent[i]), tokens[i])

    def extend(tokens, qs, weight):
        i = len(tokens)
        if i == N:
            out.append((tokens, torch.stack(qs), weight))
            return
        q = warp(case.draft.logits(path(tokens, case.parent[i])), case.s)
        if case.kind[i] == "top":
            x = int(q.sort(descending=True, stable=True).indices[case.rank[i]])
            extend((*tokens, x), [*qs, torch.nn.functional.one_hot(torch.tensor(x), V).double()], weight)
            return
        if case.kind[i] == "unique":  # without replacement: the earlier siblings' tokens removed
            taken = [tokens[j] for j in range(1, i) if case.parent[j] == case.parent[i]]
            rest = q.clone()
            rest[taken] = 0.0
            q = rest / rest.sum() if rest.sum() > 0 else q
        for x in range(V):
            if q[x] > 0:
                extend((*tokens, x), [*qs, q], weight * float(q[x]))

    extend((0,), [torch.full((V,), 1.0 / V, dtype=torch.float64)], 1.0)
    return out


def first_sibling_q(case: TreeCase, q: torch.Tensor) -> torch.Tensor:
    """Wrong: every child reported with its first sibling's q (one q per parent, as a drafter that
    samples i.i.d. would report it)."""
    first = [i if i == 0 else case.children(case.parent[i])[0] for i in range(len(case.parent))]
    return q[first]


# ---- the enumeration ----


def normalised(r: torch.Tensor) -> torch.Tensor:
    """r / sum(r); zeros where nothing is left (as the verifier does)."""
    return r / r.sum() if r.sum() > 0 else torch.zeros_like(r)


def target_joint(case: TreeCase, prefix: tuple[int, ...], m: int) -> torch.Tensor:
    return _target_joint(case, prefix, m)


@cache
def _target_joint(case: TreeCase, prefix: tuple[int, ...], m: int) -> torch.Tensor:
    if m == 0:
        return torch.ones((), dtype=torch.float64)
    p = warp(case.target.logits(prefix), case.s)
    return torch.stack([p[x] * _target_joint(case, (*prefix, x), m - 1) for x in range(case.vocab)])


def tree_law(case: TreeCase, rule: Rule = EXACT, report=None) -> tuple[dict[tuple[int, ...], float], float]:
    """(law of the block the verifier emits: accepted tokens + the next one, P(a first-level candidate
    is accepted) as multi-step speculative sampling gives it), by enumeration over draft outcomes
    and the verifier's uniforms. `report` maps the true q [N+1, V] to the q the verifier is given."""
    N = len(case.parent)
    rows = {"p": [], "q": [], "tokens": [], "u": [], "v": [], "w": []}
    expected_accept = 0.0
    for tokens, q, weight in draft_outcomes(case):
        prefixes = [()]
        for i in range(1, N):
            prefixes.append((*prefixes[case.parent[i]], tokens[i]))
        p = torch.stack([warp(case.target.logits(prefix), case.s) for prefix in prefixes])  # [N+1, V]
        q_given = q if report is None else report(case, q)
        # node i's threshold under `rule`, against the residual its earlier siblings left; and every
        # distribution the last token can come from: p at each node and each residual
        threshold = [0.5] * N
        finals = [p[i] for i in range(N)]
        reject_all = 1.0
        for j in range(N):
            r = p[j]
            for c in case.children(j):
                a = rule.accept(r, q_given[c])
                threshold[c] = float(a[tokens[c]])
                if j == 0:  # the exact rule's chance of rejecting c, given the tokens
                    reject_all *= 1 - float(min_ratio(r, q_given[c])[tokens[c]])
                r = normalised(rule.reject(r, q_given[c], a))
                finals.append(r)
        expected_accept += weight * (1 - reject_all)
        u_cells = [cells([t]) for t in threshold]
        v_mid, v_len = cells([float(x) for f in finals for x in f.cumsum(-1)])
        for combo in itertools.product(*[range(len(c[0])) for c in u_cells]):
            u = torch.tensor([float(u_cells[i][0][k]) for i, k in enumerate(combo)], dtype=torch.float64)
            volume = weight * float(torch.prod(torch.stack([u_cells[i][1][k] for i, k in enumerate(combo)])))
            rows["p"].append(p.expand(len(v_mid), -1, -1))
            rows["q"].append(q_given.expand(len(v_mid), -1, -1))
            rows["tokens"].append(torch.tensor(tokens).expand(len(v_mid), -1))
            rows["u"].append(u.expand(len(v_mid), -1))
            rows["v"].append(v_mid)
            rows["w"].append(volume * v_len)
    p, q, tokens, u, v, w = (torch.cat(rows[k]) for k in ("p", "q", "tokens", "u", "v", "w"))
    B = len(w)
    tree = TokenTree(tokens, torch.tensor(case.parent).expand(B, -1), q, torch.full((B,), N))
    verdict = verify_tree(tree, p, u, v, rule)
    law: dict[tuple[int, ...], float] = {}
    for path, t, weight in zip(verdict.tokens(tree).tolist(), verdict.next_token.tolist(), w.tolist(), strict=True):
        block = (*(x for x in path if x >= 0), t)
        law[block] = law.get(block, 0.0) + weight
    return law, expected_accept


def law_errors(case: TreeCase, rule: Rule = EXACT, report=None) -> tuple[float, float]:
    """(max |law of the first depth+1 tokens - target's|, |P(a first-level candidate accepted) -
    multi-step speculative sampling's|): exactness, and that the verifier accepts as often as it should."""
    _target_joint.cache_clear()
    V, m = case.vocab, max(case.depth(i) for i in range(len(case.parent))) + 1
    law, expected_accept = tree_law(case, rule, report)
    joint = torch.zeros([V] * m, dtype=torch.float64)
    for block, w in law.items():
        joint[block] += w * target_joint(case, block, m - len(block))
    accepted = sum(w for block, w in law.items() if len(block) >= 2)
    return float((joint - target_joint(case, (), m)).abs().max()), abs(accepted - expected_accept)


# ---- tests ----

EXACT_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@EXACT_SETTINGS
@given(tree_cases())
def test_joint_law_of_the_first_depth_plus_one_tokens_is_the_targets(case):
    law_error, accept_error = law_errors(case)
    assert law_error <= TOLERANCE
    assert accept_error <= TOLERANCE


def _random_lm(V: int, seed: int, allowed: tuple[int, ...] | None = None) -> ToyLM:
    g = torch.Generator().manual_seed(seed)
    table = lambda rows: tuple(map(tuple, (torch.randn(rows, V, generator=g, dtype=torch.float64) * 1.5).tolist()))  # noqa: E731
    return ToyLM(table(1)[0], table(V + 1), table(MAX_DEPTH + 1), allowed or tuple(range(V)))


FULL = (-1, 0, 0, 0, 1, 1, 4)  # three children at the root, two below the first, a chain to depth 3
CHAIN = (-1, 0, 1, 2)  # a linear draft of three tokens


@pytest.mark.parametrize(
    "label,case",
    [
        ("i.i.d. siblings", TreeCase(_random_lm(5, 1), _random_lm(5, 2), FULL, ("root",) + ("sampled",) * 3 + ("top",) * 3, (0,) * 7, Sampling())),
        ("without replacement", TreeCase(_random_lm(4, 3), _random_lm(4, 4), FULL, ("root", "unique", "unique", "unique", "sampled", "sampled", "top"), (0,) * 7, Sampling(0.8))),
        ("top-k candidates", TreeCase(_random_lm(5, 5), _random_lm(5, 6), FULL, ("root",) + ("top",) * 6, (0, 0, 1, 2, 0, 1, 0), Sampling())),
        ("chain = linear", TreeCase(_random_lm(5, 7), _random_lm(5, 8), CHAIN, ("root",) + ("sampled",) * 3, (0,) * 4, Sampling(0.7, 4, 0.8))),
        ("greedy", TreeCase(_random_lm(5, 9), _random_lm(5, 10), FULL, ("root",) + ("sampled",) * 3 + ("top",) * 3, (0, 0, 0, 0, 1, 0, 0), Sampling(0.0))),
        ("disjoint supports", TreeCase(_random_lm(5, 11, (0, 1)), _random_lm(5, 12, (2, 3, 4)), FULL, ("root",) + ("sampled",) * 6, (0,) * 7, Sampling())),
        ("one-hot target", TreeCase(OneHotLM(*vars(_random_lm(4, 13)).values()), _random_lm(4, 14), FULL, ("root",) + ("sampled",) * 3 + ("top",) * 3, (0, 0, 0, 0, 1, 2, 0), Sampling())),
    ],
)  # fmt: skip
def test_named_corner_cases(label, case):
    assert max(law_errors(case)) <= TOLERANCE, label


def test_greedy_tree_accepts_the_argmax_path():
    """Temperature 0: the path follows the children that are the target's argmax, whatever the draws."""
    p = torch.tensor([[[0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]], dtype=torch.float64)  # [1, 5, 3]
    tree = TokenTree(
        torch.tensor([[2, 0, 1, 2, 0]]),
        torch.tensor([[-1, 0, 0, 2, 2]]),  # root -> (0, 1); 1 -> (2, 0)
        torch.nn.functional.one_hot(torch.tensor([[0, 0, 1, 2, 0]]), 3).double(),
        torch.tensor([5]),
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        verdict = verify_tree(tree, p, torch.rand(1, 5, generator=g, dtype=torch.float64), torch.rand(1, generator=g))
        # root's argmax is 1 (node 2); node 2's argmax is 0: node 4; node 4's argmax 2 is the bonus
        assert verdict.path.tolist() == [[2, 4]] and verdict.next_token.tolist() == [2]


def test_ragged_rows_verify_as_they_do_alone():
    """Rows of a batch, padded to the largest tree, give what each gives alone from the same draws."""
    g = torch.Generator().manual_seed(1)
    V, N = 6, 7
    parent = torch.tensor([[-1, 0, 0, 1, 1, 3, 5], [-1, 0, 1, -1, -1, -1, -1], [-1, 0, 0, 0, 2, -1, -1]])
    size = torch.tensor([7, 3, 5])
    p = torch.softmax(torch.randn(3, N, V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(3, N, V, generator=g, dtype=torch.float64), -1)
    for _ in range(50):
        tokens = torch.randint(0, V, (3, N), generator=g)
        u, v = torch.rand(3, N, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64)
        tree = TokenTree(tokens, parent, q, size)
        both = verify_tree(tree, p, u, v)
        for b in range(3):
            n = int(size[b])
            alone = verify_tree(TokenTree(tokens[b : b + 1, :n], parent[b : b + 1, :n], q[b : b + 1, :n], size[b : b + 1]),
                                p[b : b + 1, :n], u[b : b + 1, :n], v[b : b + 1])  # fmt: skip
            assert int(alone.n) == int(both.n[b]) and int(alone.next_token) == int(both.next_token[b])
            assert alone.path[0, : int(alone.n)].tolist() == both.path[b, : int(both.n[b])].tolist()


MUTANTS = {
    "no_residual_update_between_siblings": (Rule(reject=lambda r, q, a: r), None),
    "sibling_q_reused": (EXACT, first_sibling_q),
    "p_over_q_without_the_min": (Rule(accept=lambda r, q: torch.where(q > 0, r / q, 1.0)), None),
    "bonus_from_the_residual": (Rule(bonus=lambda p_leaf, r_parent: r_parent), None),
    "residual_without_the_clamp": (Rule(reject=lambda r, q, a: r - q), None),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_negative_control_is_caught(name):
    """The property test above fails on each wrong variant: hypothesis finds a case whose law is off."""
    rule, report = MUTANTS[name]
    bad = find(
        tree_cases(),
        lambda case: law_errors(case, rule, report)[0] > 1e-3,
        settings=settings(max_examples=300, deadline=None, derandomize=True, database=None, phases=[Phase.generate]),
    )
    assert law_errors(bad, rule, report)[0] > 1e-3


def test_the_exact_rule_takes_what_acceptance_took():
    """r - q min(1, r/q) = max(0, r - q), the residual of Leviathan et al. (2023)."""
    g = torch.Generator().manual_seed(2)
    r, q = torch.rand(100, 7, generator=g, dtype=torch.float64), torch.rand(100, 7, generator=g, dtype=torch.float64)
    q[q < 0.2] = 0
    torch.testing.assert_close(take_accepted(r, q, min_ratio(r, q)), (r - q).clamp_min(0), rtol=0, atol=1e-15)


def test_a_verifier_that_never_accepts_is_caught_by_the_acceptance_check():
    """Always drawing from the residual is exact but useless; the second half of the check sees it."""
    never = Rule(accept=lambda r, q: torch.zeros_like(r))
    case = TreeCase(_random_lm(4, 15), _random_lm(4, 16), FULL, ("root",) + ("sampled",) * 3 + ("top",) * 3, (0, 0, 0, 0, 1, 0, 0), Sampling())
    law_error, accept_error = law_errors(case, never)
    assert law_error <= TOLERANCE and accept_error > 0.1
