"""BiLD: its limits (always fall back: the target alone; never: the small model alone), greedy with
a rollback threshold >= 0.5 equals the target's greedy output, the first token's law passes a
powered G-test against `first_token_law` (and a law without the rollback is caught), bad thresholds
exit 2."""

from __future__ import annotations

import pytest
import torch

from reference.__main__ import main
from reference.bild import bild_generate, first_token_law
from reference.model import WEIGHTS_DIR, load_weights
from reference.sampling import Sampling
from reference.specdec import autoregressive_generate, seeded_draws
from tests.test_specdec import g_test, sample_size, toy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = Sampling(0.0)
PROMPTS = [[0, 1, 2, 3], [4, 4, 4, 4], [3, 1, 0, 2]]


@pytest.fixture(scope="module")
def pair():
    return toy("toy-target", 16, 3, seed=0, sharpness=2.0), toy("toy-draft", 8, 1, seed=1, sharpness=2.0)


def greedy_of(model, prompt, n):
    return autoregressive_generate(model, torch.tensor([prompt]), n, GREEDY, seeded_draws(1, 0))


@pytest.mark.parametrize("rollback", [0.0, 0.3, 1.0])
def test_always_falling_back_is_the_target_alone(pair, rollback):
    big, small = pair
    for prompt in PROMPTS:
        r = bild_generate(big, small, torch.tensor([prompt]), 20, 1.0, rollback, GREEDY, seeded_draws(1, 0))
        assert torch.equal(r.tokens, greedy_of(big, prompt, 20))
        assert r.small_kept == 0 and r.big_passes == 20


def test_never_falling_back_nor_rolling_back_is_the_small_model_alone(pair):
    big, small = pair
    for prompt in PROMPTS:
        r = bild_generate(big, small, torch.tensor([prompt]), 20, 0.0, 0.0, GREEDY, seeded_draws(1, 0), max_run=100)
        assert torch.equal(r.tokens, greedy_of(small, prompt, 20))
        assert (r.big_passes, r.small_kept, r.rollbacks) == (1, 20, 0)  # one last pass checks them all and keeps them


@pytest.mark.parametrize("fallback", [0.0, 0.4, 0.8])
@pytest.mark.parametrize("max_run", [1, 3, 10])
def test_greedy_with_rollback_from_one_half_equals_the_targets_greedy_output(pair, fallback, max_run):
    big, small = pair
    for prompt in PROMPTS:
        r = bild_generate(big, small, torch.tensor([prompt]), 25, fallback, 0.5, GREEDY, seeded_draws(1, 0), max_run=max_run)
        assert torch.equal(r.tokens, greedy_of(big, prompt, 25))


def test_greedy_equals_the_target_with_the_trained_pair():
    big, small = load_weights(WEIGHTS_DIR / "target.pt"), load_weights(WEIGHTS_DIR / "draft.pt")
    prompt = list(b"import os\n\n\ndef ")
    r = bild_generate(big, small, torch.tensor([prompt]), 48, 0.3, 0.5, GREEDY, seeded_draws(1, 0))
    assert torch.equal(r.tokens, greedy_of(big, prompt, 48))
    assert r.small_kept > 0 and r.rollbacks > 0  # both mechanisms were exercised


# ---- the first token's law at temperature 1: G-test against the exact law ----

TV_DETECTED = 0.1  # V = 5 (df 4): N = 1553 runs from the noncentral chi-square power calculation (significance 1e-6, power 0.99)
SETTING = (0.45, 0.3)  # fallback, rollback: the small model is confident at PROMPT, and some of its tokens are rolled back
PROMPT = [0, 3, 1]


def first_tokens(big, small, fallback, rollback, n, seed):
    counts = torch.zeros(big.spec.vocab_size, dtype=torch.long)
    draw = seeded_draws(1, seed)
    for _ in range(n):
        r = bild_generate(big, small, torch.tensor([PROMPT]), 1, fallback, rollback, Sampling(1.0), draw)
        counts[r.tokens[0, -1]] += 1
    return counts


@pytest.fixture(scope="module")
def law_and_counts(pair):
    big, small = pair
    with torch.inference_mode():
        pl, ql = big(torch.tensor([PROMPT]))[0, -1], small(torch.tensor([PROMPT]))[0, -1]
    law = first_token_law(pl, ql, *SETTING, Sampling(1.0))
    n = sample_size(TV_DETECTED, int((law > 0).sum()) - 1)
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts = first_tokens(big, small, *SETTING, n, seed=7)
    finally:
        torch.set_num_threads(saved)
    return law, counts, (pl, ql)


def test_the_first_tokens_law_passes_a_powered_g_test(law_and_counts):
    law, counts, (pl, ql) = law_and_counts
    assert float(ql.softmax(-1).max()) >= SETTING[0]  # the small model writes the first token here
    p, q = pl.double().softmax(-1), ql.double().softmax(-1)
    assert float(((p < SETTING[1]) * q).sum()) > 0.1  # and the rollback replaces it often
    p_value, tv = g_test(counts, law)
    assert p_value > 1e-6, f"TV {tv:.4f}"


def no_rollback(p, q, keep):
    return q


def replaced_from_q(p, q, keep):
    return q * keep + (q * ~keep).sum() * q


def kept_when_unlikely(p, q, keep):
    return q * ~keep + (q * keep).sum() * p


@pytest.mark.parametrize("mutant", [no_rollback, replaced_from_q, kept_when_unlikely])
def test_the_g_test_catches_wrong_laws(law_and_counts, mutant):
    law, counts, (pl, ql) = law_and_counts
    p, q = pl.double().softmax(-1), ql.double().softmax(-1)
    wrong = mutant(p, q, p >= SETTING[1])
    assert 0.5 * float((wrong - law).abs().sum()) >= TV_DETECTED  # within the power calculation's reach
    p_value, _ = g_test(counts, wrong)
    assert p_value < 1e-6


@pytest.mark.parametrize(
    "args,message",
    [
        (["--fallback", "1.5", "--rollback", "0.5"], "fallback threshold must lie in [0, 1]"),
        (["--fallback", "0.5", "--rollback", "-0.1"], "rollback threshold must lie in [0, 1]"),
        (["--fallback", "nan", "--rollback", "0.5"], "fallback threshold"),
        (["--fallback", "0.5"], "together"),
        (["--grid", "0.2,2:0.5"], "fallback threshold must lie in [0, 1]"),
        (["--grid", "0.2"], "--grid takes"),
    ],
)
def test_bad_thresholds_exit_2_with_one_line(capsys, args, message):
    assert main(["bild", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_bench_drafts_refuses_bad_bild_pairs(capsys):
    assert main(["bench", "drafts", "--bild", "0.5:1.2"]) == 2
    assert "rollback threshold must lie in [0, 1]" in capsys.readouterr().err
