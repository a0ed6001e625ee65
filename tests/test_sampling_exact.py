"""Exactness of speculative sampling by enumeration: no randomness, float64, vocabulary <= 6, gamma <= 3.

The draft's and the verifier's outputs are piecewise constant in their uniform draws, so
[0, 1) is cut at every breakpoint (the draft's CDF, the thresholds p(d)/q(d), the CDFs of every
distribution the last token can come from), each function is evaluated once per cell at its
midpoint, and each outcome is weighted by the cell's length. The law of the first gamma + 1
emitted tokens (continued from the target after a short step) must equal the target's own
joint law within 1e-9, for hypothesis-generated toy language models with zeros, disjoint
supports, p = q, one-hot distributions and temperature / top-k / top-p warping.

Negative controls: each known-wrong variant, the real `verify` with one of its steps (module
functions) replaced, or written as the wrong draft it describes, must make the same check fail.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from reference import sampling
from reference.sampling import Sampling, acceptance_probability, sample, verify, warp

NEG_INF = float("-inf")
TOLERANCE = 1e-9


@dataclass(frozen=True)
class ToyLM:
    """logits(prefix) = base + trans[last token] + pos[len(prefix)], with -inf where banned."""

    base: tuple[float, ...]
    trans: tuple[tuple[float, ...], ...]  # [V + 1, V]; row V is "no last token"
    pos: tuple[tuple[float, ...], ...]  # [gamma + 1, V]
    allowed: tuple[int, ...]  # tokens this LM may ever give mass to (disjoint supports)

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        V = len(self.base)
        last = prefix[-1] if prefix else V
        z = torch.tensor(self.base, dtype=torch.float64) + torch.tensor(self.trans[last], dtype=torch.float64)
        z = z + torch.tensor(self.pos[min(len(prefix), len(self.pos) - 1)], dtype=torch.float64)
        banned = torch.ones(V, dtype=torch.bool)
        banned[list(self.allowed)] = False
        z = z.masked_fill(banned, NEG_INF)
        if torch.isinf(z).all():  # keep at least one token
            z[self.allowed[0]] = 0.0
        return z


@dataclass(frozen=True)
class Case:
    target: ToyLM
    draft: ToyLM
    gamma: int
    s: Sampling

    @property
    def vocab(self) -> int:
        return len(self.target.base)


# values on a half-integer grid, so ties (argmax, top-k, top-p boundaries) happen often
value = st.one_of(st.integers(-6, 6).map(lambda k: k / 2), st.just(NEG_INF))


@st.composite
def toy_lm(draw, V: int, gamma: int, allowed: tuple[int, ...], one_hot: bool = False) -> ToyLM:
    vec = st.lists(value, min_size=V, max_size=V).map(tuple)
    base = draw(vec)
    trans = tuple(draw(vec) for _ in range(V + 1))
    pos = tuple(draw(vec) for _ in range(gamma + 1))
    lm = ToyLM(base, trans, pos, allowed)
    if one_hot:  # keep only each context's argmax: a point mass that still depends on the context
        return OneHotLM(lm.base, lm.trans, lm.pos, lm.allowed)
    return lm


class OneHotLM(ToyLM):
    def logits(self, prefix):
        z = ToyLM.logits(self, prefix)
        return torch.where(torch.arange(len(z)) == z.argmax(), 0.0, NEG_INF).to(torch.float64)


samplings = st.builds(
    Sampling,
    temperature=st.sampled_from([1.0, 1.0, 0.0, 0.5, 1.7]),
    top_k=st.sampled_from([None, None, 1, 2, 3]),
    top_p=st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.2]),
)


@st.composite
def cases(draw) -> Case:
    V = draw(st.integers(2, 6))
    gamma = draw(st.integers(1, 3))
    everything = tuple(range(V))
    relation = draw(st.sampled_from(["independent", "equal", "disjoint", "one_hot_target", "one_hot_draft", "close"]))
    if relation == "disjoint":
        k = draw(st.integers(1, V - 1))
        target = draw(toy_lm(V, gamma, everything[:k]))
        draft = draw(toy_lm(V, gamma, everything[k:]))
    else:
        target = draw(toy_lm(V, gamma, everything, one_hot=relation == "one_hot_target"))
        draft = draw(toy_lm(V, gamma, everything, one_hot=relation == "one_hot_draft"))
        if relation == "equal":
            draft = target
        elif relation == "close":  # the draft is the target with one context's logits nudged
            nudge = tuple(tuple(x + (0.5 if i == 0 else 0.0) for x in row) for i, row in enumerate(target.trans))
            draft = ToyLM(target.base, nudge, target.pos, target.allowed)
    return Case(target, draft, gamma, draw(samplings))


# ---- the draft side: one drafting step, as ModelDraft.propose does it, and its wrong variants ----


def draft_step(logits: torch.Tensor, s: Sampling, w: float) -> tuple[int, torch.Tensor]:
    """Warp, draw by inverse CDF, report the distribution drawn from (reference/drafts.py)."""
    q = warp(logits, s)
    return int(sample(q, torch.tensor(w, dtype=torch.float64))), q


def draft_step_prewarp(logits, s, w):
    """Wrong: draws from the warped q but reports the probabilities before warping."""
    q = warp(logits, s)
    return int(sample(q, torch.tensor(w, dtype=torch.float64))), logits.softmax(-1)


def draft_step_greedy(logits, s, w):
    """Wrong: takes the argmax but reports the distribution it claims to sample from."""
    q = warp(logits, s)
    return int(q.argmax()), q


def always_accept(u, p_d, q_d):
    """Wrong: accepts every draft token."""
    return torch.ones_like(p_d, dtype=torch.bool)


def draw_without_scaling(mass, v):
    """Wrong: draws from the residual as if it summed to 1."""
    return torch.searchsorted(mass.cumsum(-1), v[:, None].to(mass.dtype), right=True)[:, 0]


def bonus_from_wrong_position(p, q):
    """Wrong: the bonus token from p_{gamma-1}, the distribution of the last draft position."""
    gamma = q.shape[1]
    return torch.cat(((p[:, :gamma] - q).clamp_min(0), p[:, gamma - 1 : gamma]), dim=1)


def bonus_from_q(p, q):
    """Wrong: the bonus token from the draft's q_{gamma-1} instead of the target's p_gamma."""
    gamma = q.shape[1]
    return torch.cat(((p[:, :gamma] - q).clamp_min(0), q[:, gamma - 1 : gamma]), dim=1)


# name -> (the verifier's seams replaced: {function name in reference.sampling: wrong variant}, draft step)
MUTANTS = {
    "always_accept": ({"accept": always_accept}, draft_step),
    "unnormalised_residual": ({"sample_unnormalised": draw_without_scaling}, draft_step),
    "bonus_from_wrong_position": ({"next_token_sources": bonus_from_wrong_position}, draft_step),
    "bonus_from_q": ({"next_token_sources": bonus_from_q}, draft_step),
    "draft_probs_before_warping": ({}, draft_step_prewarp),
    "greedy_draft_reported_as_sampled": ({}, draft_step_greedy),
}


# ---- the enumeration ----


def cells(breakpoints: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut [0, 1) at the breakpoints: (midpoints, lengths) of the non-empty cells."""
    edges = torch.tensor(sorted({0.0, 1.0, *(b for b in breakpoints if 0.0 < b < 1.0)}), dtype=torch.float64)
    return (edges[1:] + edges[:-1]) / 2, edges[1:] - edges[:-1]


def target_joint(case: Case, prefix: tuple[int, ...], m: int) -> torch.Tensor:
    """The target's own law of the next m tokens after `prefix`: a tensor of shape [V] * m."""
    return _target_joint(case, prefix, m)


@cache
def _target_joint(case: Case, prefix: tuple[int, ...], m: int) -> torch.Tensor:
    if m == 0:
        return torch.ones((), dtype=torch.float64)
    p = warp(case.target.logits(prefix), case.s)
    return torch.stack([p[x] * _target_joint(case, (*prefix, x), m - 1) for x in range(case.vocab)])


def draft_trajectories(case: Case, step) -> list[tuple[tuple[int, ...], torch.Tensor, float]]:
    """Every outcome of gamma drafting steps: (tokens, reported q [gamma, V], probability), by cutting
    each step's draw at the CDF of the distribution the draft reports."""
    out = []

    def extend(tokens, qs, weight):
        if len(tokens) == case.gamma:
            out.append((tokens, torch.stack(qs), weight))
            return
        logits = case.draft.logits(tokens)
        _, q_reported = step(logits, case.s, 0.5)
        for w, length in zip(*cells(q_reported.cumsum(-1).tolist()), strict=True):
            d, q = step(logits, case.s, float(w))
            extend((*tokens, d), [*qs, q], weight * float(length))

    extend((), [], 1.0)
    return out


def step_law(case: Case, verifier=verify, step=draft_step) -> dict[tuple[int, ...], float]:
    """Law of the block one speculative step emits (n accepted drafts + one token), by enumeration."""
    gamma = case.gamma
    P, Q, D, U, W, Vd = [], [], [], [], [], []
    for tokens, q, weight in draft_trajectories(case, step):
        p = torch.stack([warp(case.target.logits(tokens[:i]), case.s) for i in range(gamma + 1)])  # [gamma+1, V]
        d = torch.tensor(tokens)
        ratio = p[torch.arange(gamma), d] / q[torch.arange(gamma), d]
        u_cells = [cells([float(r)]) for r in ratio]
        # every distribution the last token may come from: residuals (normalised or not), p itself
        residuals = (p[:gamma] - q).clamp_min(0)
        cdfs = [p.cumsum(-1), residuals.cumsum(-1), (residuals / residuals.sum(-1, keepdim=True)).cumsum(-1)]
        v_mid, v_len = cells([float(x) for c in cdfs for x in c.flatten() if x == x])
        for combo in itertools.product(*[range(len(c[0])) for c in u_cells]):
            u = torch.tensor([float(u_cells[i][0][j]) for i, j in enumerate(combo)], dtype=torch.float64)
            u_weight = weight * float(torch.prod(torch.stack([u_cells[i][1][j] for i, j in enumerate(combo)])))
            n_v = len(v_mid)
            P.append(p.expand(n_v, -1, -1))
            Q.append(q.expand(n_v, -1, -1))
            D.append(d.expand(n_v, -1))
            U.append(u.expand(n_v, -1))
            Vd.append(v_mid)
            W.append(u_weight * v_len)
    n, nxt = verifier(torch.cat(P), torch.cat(Q), torch.cat(D), torch.cat(U), torch.cat(Vd))
    weights, drafts = torch.cat(W), torch.cat(D)
    law: dict[tuple[int, ...], float] = {}
    for k, t, w, d in zip(n.tolist(), nxt.tolist(), weights.tolist(), drafts.tolist(), strict=True):
        block = (*d[:k], t)
        law[block] = law.get(block, 0.0) + w
    return law


def law_error(case: Case, verifier=verify, step=draft_step) -> float:
    """max |law of the first gamma+1 tokens - target's| and |P(first draft accepted) - sum min(p, q)|."""
    _target_joint.cache_clear()
    V, m = case.vocab, case.gamma + 1
    law = step_law(case, verifier, step)
    joint = torch.zeros([V] * m, dtype=torch.float64)
    for block, w in law.items():
        joint[block] += w * target_joint(case, block, m - len(block))
    error = float((joint - target_joint(case, (), m)).abs().max())
    # efficiency as well as exactness: the first draft is accepted with probability sum_x min(p, q)
    beta = acceptance_probability(warp(case.target.logits(()), case.s), warp(case.draft.logits(()), case.s))
    p_accept = sum(w for block, w in law.items() if len(block) >= 2)
    return max(error, abs(p_accept - float(beta)))


# ---- tests ----

EXACT = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@EXACT
@given(cases())
def test_joint_law_of_first_gamma_plus_one_tokens_is_the_targets(case):
    assert law_error(case) <= TOLERANCE


def _random_lm(V: int, gamma: int, seed: int, allowed: tuple[int, ...] | None = None) -> ToyLM:
    g = torch.Generator().manual_seed(seed)
    table = lambda rows: tuple(map(tuple, (torch.randn(rows, V, generator=g, dtype=torch.float64) * 1.5).tolist()))  # noqa: E731
    return ToyLM(table(1)[0], table(V + 1), table(gamma + 1), allowed or tuple(range(V)))


@pytest.mark.parametrize(
    "label,case",
    [
        ("p = q", Case(_random_lm(4, 3, 1), _random_lm(4, 3, 1), 3, Sampling())),
        ("disjoint supports", Case(_random_lm(5, 2, 2, (0, 1)), _random_lm(5, 2, 3, (2, 3, 4)), 2, Sampling())),
        ("one-hot target", Case(OneHotLM(*vars(_random_lm(6, 3, 4)).values()), _random_lm(6, 3, 5), 3, Sampling())),
        ("greedy", Case(_random_lm(6, 3, 6), _random_lm(6, 3, 7), 3, Sampling(0.0))),
        ("all warps", Case(_random_lm(6, 3, 8), _random_lm(6, 3, 9), 3, Sampling(0.7, 4, 0.8))),
    ],
)
def test_named_corner_cases(label, case):
    assert law_error(case) <= TOLERANCE, label


def test_fixed_token_rule_is_the_verifier_with_a_point_mass():
    """Drafts without probabilities: q = one_hot(d) accepts d with probability p(d), else resamples
    from p with d removed; enumerated exactly over u and v."""
    p = torch.tensor([[[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.4, 0.4]]], dtype=torch.float64)
    d = torch.tensor([[1]])
    q = sampling.fixed_token_probs(d, 4, torch.float64)
    law = torch.zeros(2, 4, dtype=torch.float64)  # [n, token]
    u_mid, u_len = cells([0.3])
    v_mid, v_len = cells([x for row in p[0] for x in row.cumsum(-1).tolist()] + [5 / 7, 1.0])
    for u, lu in zip(u_mid, u_len, strict=True):
        n, t = verify(p.expand(len(v_mid), -1, -1), q.expand(len(v_mid), -1, -1), d.expand(len(v_mid), -1),
                      u.expand(len(v_mid), 1), v_mid)  # fmt: skip
        law.index_put_((n, t), lu * v_len, accumulate=True)
    assert torch.allclose(law[1], 0.3 * p[0, 1], atol=1e-12)  # accept 1, then the bonus from p_1
    assert torch.allclose(law[0], torch.tensor([0.5, 0.0, 0.2, 0.0], dtype=torch.float64), atol=1e-12)


def test_greedy_verifier_accepts_exactly_the_argmax_whatever_the_draws():
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(64, 4, 9, generator=g), torch.randn(64, 3, 9, generator=g)
    s = Sampling(0.0)
    p, q = warp(logits_p, s), warp(logits_q, s)
    d = q.argmax(-1)
    n, t = verify(p, q, d, torch.rand(64, 3, generator=g), torch.rand(64, generator=g))
    agree = (d == logits_p[:, :3].argmax(-1)).long().cumprod(-1).sum(-1)
    assert torch.equal(n, agree)
    assert torch.equal(t, logits_p.argmax(-1).gather(1, n[:, None]).squeeze(1))


@st.composite
def logits_and_sampling(draw):
    V = draw(st.integers(1, 8))
    z = torch.tensor(draw(st.lists(value, min_size=V, max_size=V)), dtype=torch.float64)
    if torch.isinf(z).all():
        z[0] = 0.0
    return z, draw(samplings)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(logits_and_sampling())
def test_warp_is_a_distribution_within_the_filters(zs):
    z, s = zs
    p = warp(z, s)
    assert abs(float(p.sum()) - 1) < 1e-12 and bool((p >= 0).all())
    assert bool((p[torch.isinf(z)] == 0).all())  # zeros stay zeros
    if s.top_k is not None and s.temperature > 0:  # at most the tokens tied with or above the k-th largest
        kth = z.topk(min(s.top_k, len(z))).values[-1]
        assert bool((p[z < kth] == 0).all())
    if s.temperature > 0 and s.top_p < 1:  # the kept set is the smallest prefix reaching top_p
        kept = p > 0
        base = warp(z, Sampling(s.temperature, s.top_k))
        assert float(base[kept].sum()) >= s.top_p - 1e-12 or bool(kept.all())


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# around every dtype's thresholds: 1 / max (the reciprocal overflows below it) and its smallest normal number
EDGES = sorted({x for d in DTYPES for t in (1 / torch.finfo(d).max, torch.finfo(d).tiny) for x in (t / 2, t, t * 2)})


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    z=st.lists(st.one_of(value, st.sampled_from([1e4, -1e4, 3e38, -3e38])), min_size=1, max_size=8),
    temperature=st.one_of(st.floats(5e-324, 1e-2), st.sampled_from(EDGES)),
    dtype=st.sampled_from(DTYPES),
    top=st.sampled_from([(None, 1.0), (2, 1.0), (None, 0.5)]),
    flush_denormal=st.booleans(),
)
def test_warp_at_tiny_temperatures_is_never_nan(z, temperature, dtype, top, flush_denormal):
    """Below the dtype's smallest normal number T acts as T -> 0; above it the logits are divided.
    Either way a distribution, also where subnormal numbers are flushed to zero."""
    most = torch.finfo(dtype).max  # finite logits stay finite in the dtype (3e38 is inf in float16)
    logits = torch.tensor([x if abs(x) == float("inf") else min(max(x, -most), most) for x in z], dtype=torch.float64).to(dtype)
    if torch.isinf(logits).all():
        logits[0] = 0.0
    torch.set_flush_denormal(flush_denormal)
    try:
        p = warp(logits, Sampling(temperature, *top))
    finally:
        torch.set_flush_denormal(False)
    assert not p.isnan().any() and bool((p >= 0).all())
    assert abs(float(p.double().sum()) - 1) < 1e-2  # bfloat16's 8-bit significand
    assert bool((p[torch.isinf(logits)] == 0).all())
    assert float(p[logits.argmax()]) == float(p.max())  # the most likely token keeps the most mass


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["subnormals", "flushed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_warp_at_every_threshold_is_the_argmax(dtype, flush_denormal):
    """At and around the thresholds of every dtype (a subnormal T read as 0 gave 0 / 0 = NaN)."""
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9, float("-inf")], dtype=dtype)
    torch.set_flush_denormal(flush_denormal)
    try:
        ps = [warp(logits, Sampling(t)) for t in EDGES]
    finally:
        torch.set_flush_denormal(False)
    for t, p in zip(EDGES, ps, strict=True):
        assert p.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0], t


@pytest.mark.parametrize("name", list(MUTANTS))
def test_negative_control_is_caught(name, monkeypatch):
    """The property test above fails on each wrong variant: hypothesis finds a case it gets wrong.
    A wrong verifier is the real `verify` with one of its steps replaced through its module name."""
    seams, step = MUTANTS[name]
    for seam, wrong in seams.items():
        assert callable(getattr(sampling, seam)), f"verify's step {seam} is gone; update the negative control"
        monkeypatch.setattr(sampling, seam, wrong)
    bad = find(
        cases(),
        lambda case: law_error(case, verify, step) > 1e-3,
        settings=settings(max_examples=400, deadline=None, derandomize=True, database=None, phases=[Phase.generate]),
    )
    assert law_error(bad, verify, step) > 1e-3


# ---- low-precision inputs: the law of the inputs' own values, not of float16 arithmetic ----

LOW_V, LOW_GAMMA, GRID = 8, 2, 1 << 16
GRID_TOLERANCE = LOW_V / (2 * GRID)  # TV of a midpoint grid's law: each token's interval of v is off by <= 1 / GRID


def verifier_law_closed_form(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(law [gamma+1, V] of (n, next token), acceptance thresholds a [gamma]) of the verifier on p, q,
    d as given (float64): n = k with probability a_0 ... a_{k-1} (1 - a_k), a_i = min(1, p_i(d_i) / q_i(d_i)),
    then the token from norm(max(0, p_k - q_k)), or from norm(p_gamma) after gamma acceptances."""
    gamma = q.shape[0]
    a = (p[torch.arange(gamma), d] / q[torch.arange(gamma), d]).clamp(max=1)
    reach = torch.cumprod(torch.cat((torch.ones(1, dtype=p.dtype), a)), 0)  # [gamma+1] P(n >= k)
    p_n = reach - torch.cat((reach[1:], torch.zeros(1, dtype=p.dtype)))  # [gamma+1] P(n = k)
    sources = torch.cat(((p[:gamma] - q).clamp_min(0), p[gamma:]))
    return p_n[:, None] * sources / sources.sum(-1, keepdim=True), a


def verifier_law_on_a_grid(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The law of `verify(p, q, d, u, v)` [gamma+1, V]: u at the midpoints of the cells [0, 1) is cut
    into by the thresholds a, v on a grid of GRID midpoints (uniforms passed as float32, as drawn)."""
    gamma, V = q.shape
    law = torch.zeros(gamma + 1, V, dtype=torch.float64)
    v = ((torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID).float()
    mids, lengths = zip(*(cells([float(x)]) for x in a), strict=True)
    for combo in itertools.product(*(range(len(m)) for m in mids)):
        u = torch.tensor([float(mids[i][j]) for i, j in enumerate(combo)], dtype=torch.float32)
        weight = float(torch.prod(torch.stack([lengths[i][j] for i, j in enumerate(combo)])))
        n, t = verify(p.expand(GRID, -1, -1), q.expand(GRID, -1, -1), d.expand(GRID, -1), u.expand(GRID, -1), v)
        law.index_put_((n, t), torch.full((GRID,), weight / GRID, dtype=torch.float64), accumulate=True)
    return law


def low_precision_errors(dtype: torch.dtype, trials: int = 3) -> list[float]:
    """TV between the law of `verify` on float16 / bfloat16 inputs and the exact law of those same
    values upcast, for seeded random distributions."""
    g = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(trials):
        p = (torch.randn(LOW_GAMMA + 1, LOW_V, generator=g, dtype=torch.float64) * 1.5).softmax(-1).to(dtype)
        q = (torch.randn(LOW_GAMMA, LOW_V, generator=g, dtype=torch.float64) * 1.5).softmax(-1).to(dtype)
        d = torch.multinomial(q.double(), 1, generator=g)[:, 0]
        want, a = verifier_law_closed_form(p.double(), q.double(), d)
        errors.append(0.5 * float((verifier_law_on_a_grid(p, q, d, a) - want).abs().sum()))
    return errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_inputs_give_the_law_of_their_upcast_values(dtype):
    assert max(low_precision_errors(dtype)) <= GRID_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_the_same_check_catches_a_verifier_without_the_upcast(dtype, monkeypatch):
    """Negative control: residual sums and the scaled uniform in the inputs' dtype are off by
    2.6e-4 to 3e-3 in TV here, some 4 to 50 times the grid's tolerance of 6.1e-5."""
    monkeypatch.setattr(sampling, "working_dtype", lambda x: x.dtype)
    assert min(low_precision_errors(dtype)) > GRID_TOLERANCE
