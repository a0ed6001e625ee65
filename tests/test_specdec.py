"""Speculative decoding end to end with the real executor: greedy equals autoregressive token for
token, batched equals unbatched, the output law passes a powered G-test, and bad input exits 2."""

from __future__ import annotations

import copy
import json
import math
import time
import weakref

import pytest
import torch
from scipy import optimize, stats

from reference import drafts, sampling, specdec
from reference.__main__ import main
from reference.drafts import ModelDraft, NgramDraft
from reference.model import WEIGHTS_DIR, Transformer, load_weights, save_weights
from reference.sampling import Sampling, warp
from reference.specdec import autoregressive_generate, seeded_draws, speculative_generate
from reference.timing import Stopwatch, measure_interleaved
from simulator.models import ModelSpec
from simulator.speculative import SpecDecResult, walltime_improvement

V = 5  # toy vocabulary: 25 cells for the joint law of two tokens


def toy(name: str, d_model: int, n_layers: int, seed: int, vocab: int = V, sharpness: float = 1.0) -> Transformer:
    spec = ModelSpec(name=name, d_model=d_model, n_layers=n_layers, n_heads=2, n_kv_heads=1, d_ff=2 * d_model,
                     vocab_size=vocab, max_seq_len=128)  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(spec).eval()
    with torch.no_grad():  # scale the logits: the default init gives near-uniform distributions
        model.head.weight.mul_(sharpness)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[Transformer, Transformer]:
    return toy("toy-target", 16, 3, seed=0, sharpness=2.0), toy("toy-draft", 8, 1, seed=1)


def all_drafts(target, draft):
    return [ModelDraft(draft), ModelDraft(target, layers=[0]), NgramDraft(target.spec.vocab_size)]


PROMPTS = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 4], [3, 1, 0, 2]])


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_speculative_equals_autoregressive_token_for_token(pair, gamma):
    target, draft = pair
    greedy = Sampling(0.0)
    want = autoregressive_generate(target, PROMPTS, 30, greedy, seeded_draws(3, 0))
    for d in all_drafts(target, draft):
        got = speculative_generate(target, d, PROMPTS, 30, gamma, greedy, seeded_draws(3, 1)).tokens
        assert torch.equal(got, want), d.name


@pytest.mark.skipif(not (WEIGHTS_DIR / "target.pt").is_file(), reason="trained pair not present")
def test_greedy_equals_autoregressive_with_the_trained_pair():
    target, draft = load_weights(WEIGHTS_DIR / "target.pt"), load_weights(WEIGHTS_DIR / "draft.pt")
    prompts = torch.tensor([list(b"import os\n"), list(b"def main(a"), list(b"    return")])
    greedy = Sampling(0.0)
    want = autoregressive_generate(target, prompts, 40, greedy, seeded_draws(3, 0))
    for d in [ModelDraft(draft), ModelDraft(target, layers=[0, 1]), NgramDraft(256)]:
        got = speculative_generate(target, d, prompts, 40, 4, greedy, seeded_draws(3, 0)).tokens
        assert torch.equal(got, want), d.name


def per_row_draws(seeds: list[int]) -> specdec.Draw:
    """Row b draws from its own stream, so a row's draws do not depend on the rest of the batch."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda n: torch.stack([torch.rand(n, generator=g) for g in gens])


@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.7, top_k=3, top_p=0.9)])
def test_batched_equals_unbatched(pair, s):
    """Each row of a batch, whose neighbours accept different numbers of drafts, produces exactly
    what it produces alone from the same draws: so in particular the same law."""
    target, draft = pair
    seeds = [11, 12, 13]
    for d in all_drafts(target, draft):
        batched = speculative_generate(target, d, PROMPTS, 25, 3, s, per_row_draws(seeds))
        for b in range(3):
            alone = speculative_generate(target, d, PROMPTS[b : b + 1], 25, 3, s, per_row_draws(seeds[b : b + 1]))
            assert torch.equal(alone.tokens[0], batched.tokens[b]), (d.name, b)


def test_rows_accept_different_lengths(pair):
    target, draft = pair
    run = speculative_generate(
        target, ModelDraft(draft), PROMPTS.repeat(50, 1), 12, 4, Sampling(), seeded_draws(150, 0)
    )
    assert 0 < int(run.accepted.sum()) < int(run.reached.sum())  # some drafts rejected, some accepted
    assert 1.0 < run.tokens_per_step < 5.0


def test_a_run_keeps_no_distributions_of_past_steps(pair, monkeypatch):
    """The acceptance statistics are running sums: a step's p [B, gamma+1, V] and q [B, gamma, V] are
    freed once the next step has made its own, so a run's memory does not grow as steps x batch x
    gamma x vocabulary. Counted with weak references to every p and q the run makes."""
    target, draft = pair
    made, most_alive = [], []

    def track(t: torch.Tensor) -> torch.Tensor:
        made.append(weakref.ref(t))
        most_alive.append(sum(r() is not None for r in made))
        return t

    real_warp = specdec.warp
    monkeypatch.setattr(specdec, "warp", lambda logits, s: track(real_warp(logits, s)))
    d = ModelDraft(draft)
    real_propose = d.propose
    d.propose = lambda *args: (lambda dq: (dq[0], track(dq[1])))(real_propose(*args))
    run = speculative_generate(target, d, PROMPTS, 60, 3, Sampling(), seeded_draws(3, 0))
    assert run.steps >= 20 and len(made) == 2 * run.steps
    assert max(most_alive) <= 4  # this step's p and q, and the last step's until the names are rebound


def test_ngram_draft_copies_what_followed_the_last_match():
    hist = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2, 0, 0], [5, 6, 7, 8, 0, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([8, 4])
    d, q = NgramDraft(9).propose(hist, lengths, 5, Sampling(), torch.zeros(2, 5))
    assert q is None
    assert d[0].tolist() == [3, 1, 2, 3, 1]  # ...3,1,2 last seen ending at 4; continues periodically
    assert d[1].tolist() == [8, 8, 8, 8, 8]  # no match: repeat the last token


# ---- statistical end-to-end test: G-test on the joint law of the first two tokens ----

SIGNIFICANCE = 1e-6
POWER = 0.99
TV_DETECTED = 0.02


def sample_size(tv: float, df: int, significance: float = SIGNIFICANCE, power: float = POWER) -> int:
    """Smallest N at which the G-test (asymptotically chi-square with df degrees of freedom) at level
    `significance` rejects every alternative at total-variation distance `tv` with probability `power`.

    Under an alternative p1 the statistic is noncentral chi-square with lambda = N sum (p1 - p0)^2 / p0.
    By Cauchy-Schwarz, (sum |p1 - p0|)^2 <= sum (p1 - p0)^2 / p0 * sum p0, so lambda >= N (2 tv)^2 for
    every p1 with TV(p0, p1) = tv: the worst case, and it does not depend on p0."""
    critical = stats.chi2.isf(significance, df)
    lam = optimize.brentq(lambda lam: stats.ncx2.sf(critical, df, lam) - power, 1e-6, 1e4)
    return math.ceil(lam / (2 * tv) ** 2)


def test_sample_size_meets_the_power():
    n = sample_size(TV_DETECTED, 24)
    critical = stats.chi2.isf(SIGNIFICANCE, 24)
    assert stats.ncx2.sf(critical, 24, n * (2 * TV_DETECTED) ** 2) >= POWER
    assert stats.ncx2.sf(critical, 24, (n - 50) * (2 * TV_DETECTED) ** 2) < POWER


@torch.no_grad()
def two_token_law(target: Transformer, prompt: list[int], s: Sampling) -> torch.Tensor:
    """The target's own joint law of the next two tokens, [V, V], in float64."""
    model = copy.deepcopy(target).double()
    vocab = target.spec.vocab_size
    p1 = warp(model(torch.tensor([prompt]))[0, -1], s)
    nxt = torch.tensor([[*prompt, x] for x in range(vocab)])
    return p1[:, None] * warp(model(nxt)[:, -1], s)


def rows_needed(law: torch.Tensor) -> int:
    """The sample size for the G-test against `law`: df = cells of positive probability - 1."""
    return sample_size(TV_DETECTED, int((law > 0).sum()) - 1)


def g_test(counts: torch.Tensor, law: torch.Tensor) -> tuple[float, float]:
    """(p-value, empirical TV) of the counts against the law. A count where the law is 0 is a p-value of 0."""
    counts, law = counts.flatten().double(), law.flatten()
    n = float(counts.sum())
    tv = 0.5 * float((counts / n - law).abs().sum())
    support = law > 0
    if counts[~support].sum() > 0:
        return 0.0, tv
    o, e = counts[support], n * law[support]
    g = 2 * float((o[o > 0] * (o[o > 0] / e[o > 0]).log()).sum())
    return float(stats.chi2.sf(g, int(support.sum()) - 1)), tv


PROMPT = [0, 3, 1]
SETTINGS = {"t1": Sampling(1.0), "warped": Sampling(0.8, top_k=4, top_p=0.9)}


def run_two_tokens(target, d, s: Sampling, rows: int, seed: int, gamma: int = 3) -> torch.Tensor:
    """Counts [V * V] of the first two tokens of `rows` independent speculative generations, one batch."""
    prompt = torch.tensor([PROMPT]).expand(rows, -1)
    out = speculative_generate(target, d, prompt, 2, gamma, s, seeded_draws(rows, seed)).tokens[:, len(PROMPT) :]
    return torch.bincount(out[:, 0] * target.spec.vocab_size + out[:, 1], minlength=target.spec.vocab_size**2)


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["model", "layer-skip", "ngram"])
def test_output_law_passes_a_powered_g_test(pair, kind, setting, record_property):
    target, draft = pair
    s = SETTINGS[setting]
    law = two_token_law(target, PROMPT, s)
    d = all_drafts(target, draft)[kind]
    rows = rows_needed(law)
    p_value, tv = g_test(run_two_tokens(target, d, s, rows, seed=2024 + kind), law)
    record_property("empirical_tv", tv)
    print(
        f"\n{d.name} {setting}: N={rows} rows (power calculation, df={int((law > 0).sum()) - 1}), TV={tv:.4f}, p={p_value:.3g}"
    )
    assert p_value > SIGNIFICANCE


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_bonus_token_passes_a_powered_g_test(pair, setting):
    """gamma 1 and the first two tokens: whenever the first draft is accepted, the second token is
    the bonus token drawn from p after it, which the test above (gamma 3) never reaches."""
    target, draft = pair
    s = SETTINGS[setting]
    law = two_token_law(target, PROMPT, s)
    p_value, tv = g_test(run_two_tokens(target, ModelDraft(draft), s, rows_needed(law), seed=99, gamma=1), law)
    assert p_value > SIGNIFICANCE, f"TV {tv:.4f}"


# ---- negative controls: known-wrong samplers, made by replacing one step of the real code ----


def always_accept(u, p_d, q_d):
    return torch.ones_like(p_d, dtype=torch.bool)


def bonus_from_q(p, q):
    """The bonus token drawn from the draft's last distribution q_gamma instead of the target's p."""
    gamma = q.shape[1]
    return torch.cat(((p[:, :gamma] - q).clamp_min(0), q[:, gamma - 1 :]), dim=1)


def draft_reports_prewarp_q(monkeypatch):
    """The draft samples from the warped q but reports softmax(logits), the distribution before warping."""
    warped = {}

    def report_unwarped(logits, s):
        warped["q"] = warp(logits, s)
        return logits.softmax(-1)

    monkeypatch.setattr(drafts, "warp", report_unwarped)
    monkeypatch.setattr(drafts, "sample", lambda q, w: sampling.sample(warped["q"], w))


def draft_takes_argmax(monkeypatch):
    """The draft takes q's argmax but reports q as the distribution it sampled from."""
    monkeypatch.setattr(drafts, "sample", lambda q, w: q.argmax(-1))


MUTANTS = {
    "always-accept": lambda mp: mp.setattr(sampling, "accept", always_accept),
    "prewarp-q": draft_reports_prewarp_q,
    "greedy-draft": draft_takes_argmax,
}


@pytest.mark.slow
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_g_test_catches_wrong_samplers(pair, mutant, monkeypatch):
    target, draft = pair
    MUTANTS[mutant](monkeypatch)
    s = SETTINGS["warped"]
    law = two_token_law(target, PROMPT, s)
    p_value, tv = g_test(run_two_tokens(target, ModelDraft(draft), s, rows_needed(law), seed=7), law)
    assert p_value < SIGNIFICANCE, f"{mutant} mutant not caught (TV {tv:.4f})"


@torch.no_grad()
def bonus_from_q_law(target: Transformer, draft: Transformer, prompt: list[int], s: Sampling) -> torch.Tensor:
    """The joint law [V, V] of the first two tokens, gamma 1, when the bonus comes from q: the first
    token x is the accepted draft with mass min(p, q)(x), followed by a draw from q; or the residual
    (p - min(p, q))(x), followed by the next step's first token, distributed as the target's p(. | x)."""
    p1 = two_token_law(target, prompt, s).sum(1)
    q1 = warp(copy.deepcopy(draft).double()(torch.tensor([prompt]))[0, -1], s)
    accepted = torch.minimum(p1, q1)
    after = two_token_law(target, prompt, s) / p1.clamp_min(1e-300)[:, None]  # [V, V] p(. | x)
    return accepted[:, None] * q1[None, :] + (p1 - accepted)[:, None] * after


@pytest.mark.slow
def test_the_bonus_g_test_catches_a_bonus_drawn_from_q(pair, monkeypatch):
    """The mutant's law is computed exactly: it lies farther than TV_DETECTED from the target's, so
    the sample size above gives at least the stated power against it."""
    target, draft = pair
    s = SETTINGS["warped"]
    law = two_token_law(target, PROMPT, s)
    mutant_tv = 0.5 * float((bonus_from_q_law(target, draft, PROMPT, s) - law).abs().sum())
    assert mutant_tv > TV_DETECTED
    monkeypatch.setattr(sampling, "next_token_sources", bonus_from_q)
    p_value, tv = g_test(run_two_tokens(target, ModelDraft(draft), s, rows_needed(law), seed=99, gamma=1), law)
    assert p_value < SIGNIFICANCE, f"bonus-from-q mutant not caught (TV {tv:.4f}, exact {mutant_tv:.4f})"


# ---- the CLI: bad input is one line on stderr and exit code 2 ----


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, pair):
    folder = tmp_path_factory.mktemp("weights")
    target, draft = pair
    save_weights(target, folder / "target.pt")
    save_weights(draft, folder / "draft.pt")
    save_weights(toy("other-vocab", 8, 1, seed=3, vocab=7), folder / "other.pt")
    return folder


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gamma", "0"], "gamma"),
        (["--temperature", "-0.5"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.5"], "top-p"),
        (["--prompt", ""], "prompt is empty"),
        (["--draft-model", "{w}/other.pt"], "vocabulary"),
        (["--target", "{w}/absent.pt"], "no such weights file"),
        (["--threads", "-1"], "threads must be"),
    ],
)
def test_bad_input_exits_2_with_one_line(weight_files, capsys, args, message):
    base = ["specdec", "--target", f"{weight_files}/target.pt", "--draft-model", f"{weight_files}/draft.pt"]
    argv = base + [a.format(w=weight_files) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_json_output_is_the_simulators_schema(weight_files, capsys):
    argv = ["specdec", "--target", f"{weight_files}/target.pt", "--draft-model", f"{weight_files}/draft.pt",
            "--prompt", "\x01\x02", "--max-new-tokens", "12", "--gamma", "3", "--repeats", "1", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = SpecDecResult.model_validate(json.loads(capsys.readouterr().out))
    assert result.kind == "measured" and result.target == "toy-target" and result.draft == "toy-draft"
    assert 0 <= result.alpha <= 1 and result.c > 0 and 1 <= len(result.alpha_per_position) <= 3
    assert result.c_isolated > 0
    (row,) = result.rows
    assert row.gamma == 3 and row.c == pytest.approx(result.c)  # one gamma: the pooled c is that row's
    assert row.speedup_formula == pytest.approx(walltime_improvement(result.alpha, 3, row.c))


def test_the_draft_is_timed_inside_the_runs(pair):
    """The stopwatch brackets exactly the draft's proposals: one start and one stop per step, and
    its total is part of the run's time."""
    target, draft = pair
    calls = []

    class Recording(Stopwatch):
        def start(self):
            calls.append("start")
            super().start()

        def stop(self):
            calls.append("stop")
            super().stop()

    watch = Recording()
    began = time.perf_counter()
    run = speculative_generate(target, ModelDraft(draft), PROMPTS, 20, 3, Sampling(), seeded_draws(3, 0), watch)
    elapsed = time.perf_counter() - began
    assert calls == ["start", "stop"] * run.steps
    assert 0 < watch.seconds < elapsed


def test_interleaved_measurement_takes_turns():
    order = []
    timings = measure_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3)
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed ones
    assert set(timings) == {"a", "b"} and all(len(t.samples_s) == 3 for t in timings.values())


def test_bench_prints_the_check(weight_files, capsys):
    argv = ["bench", "specdec", "--target", f"{weight_files}/target.pt", "--draft-model", f"{weight_files}/draft.pt",
            "--prompt", "\x01\x02", "--max-new-tokens", "8", "--gammas", "1,2", "--repeats", "1", "--draft", "ngram"]  # fmt: skip
    assert main(argv) in (0, 1)  # toy models: the figures, not the verdict, are what is checked here
    out = capsys.readouterr().out
    assert "best gamma" in out and "required >= 0.9" in out
