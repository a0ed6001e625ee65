"""`python -m reference attention` and `bench attention` through reference.__main__.main: agreement, byte
counts next to the cost model, JSON, the benchmark's memory exponents and plot, and every bad input
(one line on stderr, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from reference.__main__ import main
from reference.cli_attention import fit_exponent, fit_growth_exponent

SMALL = ["attention", "--seqlen", "40", "--heads", "2", "--head-dim", "16", "--repeats", "1", "--no-triton"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_attention_json_agrees_and_counts_match_the_cost_model(capsys):
    code, out, err = run([*SMALL, "--block-rows", "8", "--block-cols", "16", "--causal", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"]
    assert [r["impl"] for r in result["forward"]] == ["naive", "tiled-fa2", "tiled-fa1"]
    for r in result["forward"] + result["backward"]:
        assert r["hbm_read_bytes"] == r["predicted_read_bytes"] > 0
        assert r["hbm_written_bytes"] == r["predicted_written_bytes"] > 0
    for r in result["forward"]:
        assert r["max_err"] <= r["bound"] and r["grad_err_over_bound"] <= 1.0
        assert r["peak_bytes"] > 0
    assert result["sram_working_set"] == {
        "counted_elements": {
            "fa2": 8 * 16 * 2 + 16 * 16 * 2 + 8 * 16 + 2 * 8,
            "fa1": 8 * 16 * 2 + 16 * 16 * 2 + 8 * 16 + 2 * 8,
        },
        "predicted_elements": 8 * 16 * 2 + 16 * 16 * 2 + 8 * 16 + 2 * 8,
        "match": True,
    }
    assert result["decode"]["bytes_match"] and result["decode"]["agrees"]


def test_attention_table_with_tiles_from_a_profile_and_triton(capsys):
    code, out, err = run(
        ["attention", "--seqlen", "48", "--heads", "1", "--head-dim", "16", "--repeats", "1", "--gpu", "a100"], capsys
    )
    assert code == 0, err
    assert "SRAM 167936 bytes per SM of A100-80GB-SXM" in out
    assert "triton" in out and "tiled-fa1 backward" in out and "split-KV decode" in out
    assert out.rstrip().endswith("every byte count matches the cost model")


def test_attention_on_inputs_from_a_file(tmp_path, capsys):
    path = tmp_path / "qkv.pt"
    gen = torch.Generator().manual_seed(0)
    torch.save({name: torch.randn(1, 1, 33, 16, generator=gen) for name in "qkv"}, path)
    code, out, err = run(
        ["attention", "--inputs", str(path), "--sram-bytes", "8192", "--repeats", "1", "--no-triton"], capsys
    )
    assert code == 0, err
    assert "N=33 d=16 fp32" in out


def qkv_file(tmp_path, q_shape, k_shape, v_shape, dtype=torch.float32):
    path = tmp_path / "bad.pt"
    torch.save(
        {
            "q": torch.zeros(q_shape, dtype=dtype),
            "k": torch.zeros(k_shape, dtype=dtype),
            "v": torch.zeros(v_shape, dtype=dtype),
        },
        path,
    )
    return str(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*SMALL, "--seqlen", "0"], "must be positive"),
        ([*SMALL, "--seqlen", "-3"], "must be positive"),
        ([*SMALL, "--head-dim", "0"], "must be positive"),
        ([*SMALL, "--sram-bytes", "100"], "cannot hold one FlashAttention block"),
        ([*SMALL, "--sram-bytes", "0"], "--sram-bytes must be positive"),
        ([*SMALL, "--block-rows", "8"], "both Br and Bc"),
        ([*SMALL, "--block-rows", "0", "--block-cols", "8"], "both Br and Bc"),
        ([*SMALL, "--gpu", "no-such-gpu"], "unknown GPU"),
        ([*SMALL, "--splits", "0"], "splits"),
        ([*SMALL, "--decode-queries", "41"], "decode queries"),
        ([*SMALL, "--repeats", "0"], "repeats"),
        ([*SMALL, "--threads", "-1"], "threads"),
        (["attention", "--inputs", "/nonexistent/qkv.pt"], "no such file"),
        (["bench", "attention", "--seqlens", "64", "128"], "at least three"),
        (["bench", "attention", "--seqlens", "64", "128", "256", "--sram-bytes", "-1"], "--sram-bytes must be positive"),
        (["bench", "attention", "--seqlens", "64", "128", "256", "--sram-bytes", "50"], "cannot hold"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)), "same sequence length"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), "head dimension d of q (16) does not match"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 8)), "k and v must have the same shape"),
        (((1, 2, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16)), "batch and heads"),
        (((2, 8, 16), (2, 8, 16), (2, 8, 16)), "[batch, heads, seqlen, head_dim]"),
    ],
)
def test_mismatched_inputs_are_one_line_and_exit_2(tmp_path, shapes, message, capsys):
    code, _, err = run(
        ["attention", "--inputs", qkv_file(tmp_path, *shapes), "--block-rows", "4", "--block-cols", "4"], capsys
    )
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_inputs_of_a_dtype_the_cost_model_lacks_exit_2(tmp_path, capsys):
    path = qkv_file(tmp_path, (1, 1, 8, 16), (1, 1, 8, 16), (1, 1, 8, 16), dtype=torch.float64)
    code, _, err = run(["attention", "--inputs", path, "--block-rows", "4", "--block-cols", "4"], capsys)
    assert code == 2 and "fp16, bf16 or fp32" in err


def test_bench_prints_exponents_and_writes_the_plot(tmp_path, capsys):
    plot = tmp_path / "attention.png"
    argv = ["bench", "attention", "--seqlens", "128", "256", "512", "1024", "--sram-bytes", "65536"]
    code, out, err = run([*argv, "--repeats", "1", "--out", str(plot), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    naive = [r["naive_peak_bytes"] for r in result["rows"]]
    tiled = [r["tiled_peak_bytes"] for r in result["rows"]]
    # naive holds S and P: 2 N^2 fp32 elements at least; tiled holds fixed tiles plus O and L, N (d + 1)
    assert all(p >= 2 * 4 * r["seqlen"] ** 2 for p, r in zip(naive, result["rows"], strict=True))
    assert all(t >= 4 * r["seqlen"] * 65 for t, r in zip(tiled, result["rows"], strict=True))
    assert tiled[-1] < naive[-1] / 10
    assert result["peak_growth_exponent_naive"] == pytest.approx(2.0, abs=0.05)
    assert result["peak_growth_exponent_tiled"] == pytest.approx(1.0, abs=0.05)
    assert result["peak_exponent_naive"] > 1.8 and result["peak_exponent_tiled"] < 1.05


def test_bench_table(tmp_path, capsys):
    argv = ["bench", "attention", "--seqlens", "64", "128", "256", "--repeats", "1", "--out", str(tmp_path / "b.png")]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert "naive p = " in out and "tiled p = " in out and f"plot: {tmp_path / 'b.png'}" in out


def test_exponent_fits():
    ns = [512, 1024, 2048, 4096]
    assert fit_exponent(ns, [3.0 * n**2 for n in ns]) == pytest.approx(2.0)
    assert fit_growth_exponent(ns, [1e6 + 5.0 * n for n in ns]) == pytest.approx(1.0)
    assert fit_growth_exponent(ns, [1e6 + 5.0 * n**2 for n in ns]) == pytest.approx(2.0)
