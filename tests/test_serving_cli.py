"""`simulate` and `bench simulate` through `simulate.add_parsers`, registered on a small argparse
harness shaped like the package's CLI: output formats, progress bar, and one-line errors (exit 2)."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from simulator import simulate
from simulator.errors import UserError

SMALL = ["--requests", "150", "--rate", "20", "--prompt-len", "128", "--output-len", "64"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench").add_subparsers(dest="benchmark", required=True)
    simulate.add_parsers(sub, bench)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"error: {exc}", file=__import__("sys").stderr)
        return 2


def cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_simulate_text_report(capsys):
    code, out, err = cli(["simulate", *SMALL], capsys)
    assert code == 0, err
    for needle in ("llama-2-7b on A100-80GB-SXM", "TTFT mean / p50 / p90 / p99", "TPOT", "end-to-end", "goodput",
                   "KV cache used", "GPU busy", "speculative", "autoregressive", "speculation: output tokens/s x"):  # fmt: skip
        assert needle in out
    assert "simulate" in err  # the progress bar is on stderr
    assert "80% intervals" in out and "TPOT p50" in out
    assert "\nKernels: fitted on " in out and "A100-80GB-SXM is one of them" in out


def test_simulate_without_intervals_runs_once(capsys):
    code, out, _ = cli(["simulate", *SMALL, "--json", "--no-interval"], capsys)
    assert code == 0 and "interval" not in json.loads(out)["speculative"]


def test_simulate_json_keys(capsys):
    code, out, _ = cli(["simulate", *SMALL, "--json", "--slo-ttft", "200ms", "--slo-tpot", "0.05"], capsys)
    assert code == 0
    report = json.loads(out)
    assert set(report) == {"config", "speculative", "autoregressive", "comparison"}
    assert report["config"]["slo_ttft_s"] == 0.2 and report["config"]["slo_tpot_s"] == 0.05
    assert report["config"]["kernel_model"]["measured"] and report["config"]["kernel_model"]["generation"] == "ampere"
    for name in ("speculative", "autoregressive"):
        run = report[name]
        assert set(run) == {"requests", "duration_s", "latency_s", "throughput", "goodput", "gpu_busy_fraction",
                            "batch", "kv_cache", "engine", "timeline", "interval"}  # fmt: skip
        assert run["requests"]["completed"] + run["requests"]["rejected"] == run["requests"]["arrived"] == 150
        for metric in ("ttft", "tpot", "e2e", "queue"):
            s = run["latency_s"][metric]
            assert s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        # the 80% interval brackets each latency statistic and the throughput
        iv = run["interval"]
        assert iv["level"] == 0.8 and iv["time_scale"]["low"] < 1 < iv["time_scale"]["high"]
        for metric in ("ttft", "tpot", "e2e"):
            for stat in ("mean", "p50", "p99"):
                assert iv["latency_s"][metric][stat]["low"] <= run["latency_s"][metric][stat] <= iv["latency_s"][metric][stat]["high"]
        tps = iv["throughput"]["output_tokens_per_s"]
        assert tps["low"] <= run["throughput"]["output_tokens_per_s"] <= tps["high"]
        assert 0 <= run["goodput"]["fraction_of_completed"] <= 1
        assert len(run["timeline"]["start_s"]) == len(run["timeline"]["batch_mean"]) <= 128
    assert report["speculative"]["engine"]["tokens_per_verify"] > 1
    assert report["autoregressive"]["engine"]["tokens_per_verify"] is None
    # speculation shortens the time per token at this light load
    assert report["comparison"]["tpot_mean_ratio"] < 1


def test_simulate_csv_and_plot_files(tmp_path, capsys):
    csv_path, png = tmp_path / "runs.csv", tmp_path / "latency.png"
    code, _, err = cli(["simulate", *SMALL, "--csv", str(csv_path), "--plot", str(png)], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["run"] for r in rows] == ["speculative", "autoregressive"]
    assert float(rows[0]["ttft_p99_s"]) > 0 and int(rows[0]["requests_completed"]) == 150
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_trace_and_measured_acceptance(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_time_s,prompt_tokens,output_tokens\n" + "".join(f"{i * 0.05},{100 + i},{20 + i % 7}\n" for i in range(60)))
    acceptance = tmp_path / "acc.json"
    acceptance.write_text(json.dumps({"accepted_length_counts": [30, 20, 20, 10, 10, 10]}))
    code, out, err = cli(["simulate", "--trace", str(trace), "--acceptance", str(acceptance), "--gamma", "3", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["config"]["requests"] == 60
    assert report["speculative"]["requests"]["completed"] == 60
    # n = min(n_measured, 3): P = .3, .2, .2, .3 -> E[tokens] = 1 + .7 + .5 + .3
    assert report["speculative"]["engine"]["expected_tokens_per_verify"] == pytest.approx(2.5)


def test_per_position_alpha_and_chunked_prefill(capsys):
    code, out, err = cli(["simulate", *SMALL, "--alpha", "0.9,0.8,0.7,0.6", "--chunked-prefill", "--max-batched-tokens", "512",
                          "--spec-off-above-batch", "4", "--arrival", "gamma", "--burstiness", "0.3", "--json"], capsys)  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["config"]["acceptance"]["kind"] == "positional"
    assert report["speculative"]["requests"]["completed"] == 150
    assert report["config"]["chunked_prefill"] and not report["config"]["prefill_apart"]
    code, out, err = cli(["simulate", *SMALL, "--chunked-prefill", "--prefill-apart", "--max-batched-tokens", "512"], capsys)
    assert code == 0, err
    assert "chunked prefill in steps of its own" in out
    code, out, err = cli(["simulate", *SMALL, "--scheduler-steps", "10", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["config"]["scheduler_steps"] == 10


def test_bench_simulate_prints_speeds(capsys):
    code, out, err = cli(["bench", "simulate", "--requests", "300", "--rate", "20"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "requests/s" in lines[1] and "steps/s" in lines[1]
    assert lines[2].split()[0] == "speculative" and lines[3].split()[0] == "autoregressive"
    assert all(float(x) > 0 for x in lines[2].split()[1:])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rate", "0"], "--rate must be a number of requests per second > 0 (inf: every request at once), got 0.0"),
        (["--rate", "-3"], "--rate must be"),
        (["--burstiness", "0", "--arrival", "gamma"], "--burstiness must be > 0"),
        (["--model", "llama-2-70b", "--draft", "tinyllama-1.1b"], "short by"),
        (["--tp", "3"], "tensor-parallel degree 3"),
        (["--gpu", "a1000"], "unknown GPU"),
        (["--alpha", "1.2"], "--alpha must lie in [0, 1]"),
        (["--alpha", "x"], "--alpha takes a number"),
        (["--model", "llama-3-8b"], "one vocabulary"),
        (["--slo-tpot", "fast"], "--slo-tpot: cannot read"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--prefill-apart"], "--prefill-apart needs --chunked-prefill"),
        (["--scheduler-steps", "0"], "--scheduler-steps must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    code, out, err = cli(["simulate", *argv], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert out == ""


def test_malformed_trace_row_names_file_and_line(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"arrival_time_s": 0, "prompt_tokens": 10, "output_tokens": 5}\n{"arrival_time_s": 1, "prompt_tokens": -4, "output_tokens": 5}\n')
    code, _, err = cli(["simulate", "--trace", str(trace)], capsys)
    assert code == 2 and f"{trace}:2: prompt_tokens must be a whole number >= 1" in err


def test_model_too_large_says_by_how_much(capsys):
    code, _, err = cli(["simulate", "--model", "llama-2-70b", "--draft", "llama-68m"], capsys)
    # 69B + 68M parameters in fp16 are 138.1 GB against 0.9 x 85.9 GB usable
    assert code == 2 and "weights need 138.1 GB" in err and "short by 60.8 GB" in err


def test_bench_simulate_prints_speeds_and_the_million_run_its_memory(monkeypatch, capsys):
    code, out, err = cli(["bench", "simulate", "--requests", "60", "--prompt-len", "64", "--output-len", "16"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"speculative", "autoregressive"}
    assert all(int(r[2]) == 60 and float(r[4]) > 0 for r in rows.values())  # requests done, requests/s
    monkeypatch.setattr(simulate, "MILLION", 50)  # the --million path, on a small count
    code, out, err = cli(["bench", "simulate", "--million", "--prompt-len", "64", "--output-len", "16"], capsys)
    assert code == 0, err
    assert "50 requests" in out.splitlines()[0] and "autoregressive" not in out
    assert "== arrived 50; peak RSS " in out and out.rstrip().endswith("MiB")
