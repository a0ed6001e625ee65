"""Speculation under batching, duration parsing, and the plots built on them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator.batching import crossover_batch, speculative_speedup, verify_roofline_points
from simulator.errors import UserError
from simulator.hardware import load_profile
from simulator.models import BUILTIN_MODELS
from simulator.plots import pareto_front, plot_pareto, plot_speedup_over_gamma_and_alpha, plot_verify_roofline
from simulator.units import parse_duration_s

A100, H100 = load_profile("a100"), load_profile("h100")
TARGET, TINY = BUILTIN_MODELS["llama-2-7b"], BUILTIN_MODELS["tinyllama-1.1b"]
GQA_TARGET, GQA_DRAFT = BUILTIN_MODELS["llama-3-8b"], BUILTIN_MODELS["llama-3.2-1b"]


@pytest.mark.parametrize("text,seconds", [("2s", 2.0), ("50ms", 0.05), ("50 ms", 0.05), ("0.05", 0.05), (" 800us ", 8e-4), ("1.5e-3 s", 1.5e-3), ("1min", 60.0)])
def test_durations_are_understood(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["50 mss", "fast", "", "2 hours", "-1s", "0ms", "1..2s"])
def test_bad_durations_are_refused_in_one_line(text):
    with pytest.raises(UserError) as err:
        parse_duration_s(text, "--slo-tpot-p99")
    assert "--slo-tpot-p99" in str(err.value) and "\n" not in str(err.value)


@given(gamma=st.integers(0, 8), batch=st.integers(1, 256), alpha=st.floats(0.0, 1.0))
def test_gamma_zero_speedup_is_exactly_one_at_any_batch(gamma, batch, alpha):
    assert speculative_speedup(TARGET, TINY, A100, alpha, 0, batch, 512) == 1.0


def test_speculation_stops_paying_later_on_the_gpu_with_the_higher_ridge():
    """H100's ridge (~270 FLOP/B) is about twice A100's (~140): its verify pass stays memory-bound
    to larger batches, so the crossover batch is larger. (A grouped-query target: with one KV head
    per query head, attention's per-program cost dominates large batches and the padded query tile
    makes a verify pass's extra tokens nearly free, so speculation pays far longer on either GPU.)"""
    a = crossover_batch(GQA_TARGET, GQA_DRAFT, A100, 0.7, 4, 128)
    h = crossover_batch(GQA_TARGET, GQA_DRAFT, H100, 0.7, 4, 128)
    assert a is not None and h is not None and h > a
    assert speculative_speedup(GQA_TARGET, GQA_DRAFT, A100, 0.7, 4, a - 1, 128) > 1.0 >= speculative_speedup(GQA_TARGET, GQA_DRAFT, A100, 0.7, 4, a, 128)


def test_crossover_is_none_when_speculation_always_pays_and_one_when_never():
    assert crossover_batch(TARGET, TINY, A100, 1.0, 1, 128, max_batch=8) is None
    assert crossover_batch(TARGET, TINY, A100, 0.0, 4, 128) == 1


def test_verify_pass_turns_compute_bound_with_batch():
    pts = verify_roofline_points(TARGET, A100, 4, [1, 512], 512)
    assert pts[0]["intensity_flops_per_byte"] < A100.ridge_flops_per_byte() < pts[1]["intensity_flops_per_byte"]


def test_pareto_front():
    cands = [{"x": 1, "y": 1}, {"x": 2, "y": 2}, {"x": 1.5, "y": 3}, {"x": 0.5, "y": 0.5}]
    assert [c["x"] for c in pareto_front(cands, "x", "y")] == [0.5, 1, 2]


def test_plots_are_written(tmp_path):
    a = plot_verify_roofline(tmp_path / "roof.png", A100, TARGET, TINY, 0.7, 512, batches=(1, 16, 256))
    b = plot_speedup_over_gamma_and_alpha(tmp_path / "gamma.png", A100, TARGET, None, 512, draft_layers_fraction=0.5, gamma_max=4)
    c = plot_pareto(tmp_path / "p.png", [{"label": "a", "x": 1, "y": 1, "meets_slo": True}, {"label": "b", "x": 2, "y": 3}], "x", "y", "t")
    for path in (a, b, c):
        assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_unwritable_plot_path_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write"):
        plot_verify_roofline(blocker / "roof.png", A100, TARGET, TINY, 0.7, 512, batches=(1, 2))
