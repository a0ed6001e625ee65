"""The published end-to-end serving table (simulator/e2e): the shipped rows, the loader's answers to bad
input, and the fit / held-out split."""

from __future__ import annotations

import csv
import dataclasses
import math
import random
import re
import tempfile
from pathlib import Path

import pytest
from cli_run import one_error_line, run_main
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import e2e
from simulator.e2e.__main__ import main as e2e_main
from simulator.errors import UserError

URL = "https://example.org/bench"
GOOD = {
    "gpu": "h100", "n_gpus": "2", "tp": "2", "pp": "1", "dp": "1", "model": "Qwen/Qwen3-8B", "engine": "vllm",
    "engine_version": "0.11.0", "dtype": "bf16", "dataset": "random", "input_len": "1024", "output_len": "128",
    "request_rate": "inf", "max_concurrency": "", "num_scheduler_steps": "", "num_prompts": "200", "ttft_median_ms": "52.5",
    "output_tok_per_s": "1800", "url": URL, "quote_locator": "table 1, row 1", "notes": "",
}  # fmt: skip


def write(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def good_file(tmp_path: Path, **changes) -> Path:
    return write(tmp_path / "results.csv", [GOOD, {**GOOD, **changes}])


# --- the shipped table --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> list[e2e.ServingResult]:
    return e2e.load()


def test_shipped_table_covers_gpus_sizes_and_loads(shipped):
    assert len(shipped) >= 25
    assert len({r.profile.name for r in shipped}) >= 3
    assert {r.size_class for r in shipped} == {"small", "mid", "large"}
    light = [r for r in shipped if (r.max_concurrency or math.inf) <= 8 or math.isfinite(r.request_rate_per_s)]
    saturating = [r for r in shipped if r.max_concurrency is None and math.isinf(r.request_rate_per_s)]
    assert light and saturating
    assert len({r.engine for r in shipped}) >= 2


def test_every_shipped_row_names_its_source(shipped):
    for r in shipped:
        assert r.url.startswith("https://"), r.row
        assert r.quote_locator, r.row
        assert r.engine_version, r.row


def test_a_shipped_rows_scheduler_steps_are_its_servers_flag(shipped):
    """`num_scheduler_steps` is set exactly where the notes quote the server's --num-scheduler-steps."""
    for r in shipped:
        flag = re.search(r"--num-scheduler-steps (\d+)", r.notes)
        assert r.num_scheduler_steps == (int(flag.group(1)) if flag else None), r.row
    assert sum(r.num_scheduler_steps is not None for r in shipped) == 6  # SGLang's vLLM 0.6.0 comparison


def test_shipped_rows_are_distinct_points(shipped):
    keys = [e2e.split_key(r) for r in shipped]
    assert len(set(keys)) == len(keys)


def test_shipped_figures_agree_with_each_other(shipped):
    """Copying slips show as figures of one row that contradict each other: the printed totals against
    the printed rates (requests/s is printed to 2 decimals, so a mean output length lies between the
    throughputs' ratio at requests/s +- 0.005), percentiles out of order, a request done before its first
    token. Rows whose client ignored EOS generate exactly output_len tokens."""
    for r in shipped:
        m = r.metrics
        if {"request_per_s", "output_tok_per_s"} <= m.keys():
            rps, tok = m["request_per_s"], m["output_tok_per_s"]
            half_step = 0.005 if rps >= 0.1 else 0.0005
            low, high = tok / (rps + half_step), tok / max(rps - half_step, 1e-9)
            if r.total_output_tokens and r.num_prompts:
                assert low <= r.total_output_tokens / r.num_prompts <= high, r.row
            if "--ignore-eos" in r.notes:
                assert low * 0.95 <= r.output_len <= high * 1.05, r.row  # the table's req/s has 1 decimal
        for name in ("ttft", "tpot", "itl"):
            if f"{name}_median_ms" in m and f"{name}_p99_ms" in m:
                assert m[f"{name}_median_ms"] <= m[f"{name}_p99_ms"], (r.row, name)
            if f"{name}_mean_ms" in m and f"{name}_p99_ms" in m:
                assert m[f"{name}_mean_ms"] <= m[f"{name}_p99_ms"], (r.row, name)
        if "e2el_median_ms" in m and "ttft_median_ms" in m:
            assert m["e2el_median_ms"] > m["ttft_median_ms"], r.row
        if r.dataset == "random" and r.total_input_tokens and r.num_prompts:
            assert r.total_input_tokens / r.num_prompts == pytest.approx(r.input_len, rel=0.01), r.row


def test_shipped_models_resolve_to_their_published_shapes(shipped):
    by_id = {r.model_id: r.spec for r in shipped}
    assert by_id["meta-llama/Llama-3.1-8B-Instruct"].name == "llama-3-8b"
    assert by_id["Qwen/Qwen3-14B-FP8"] is by_id["Qwen/Qwen3-14B"]
    assert by_id["Qwen/Qwen2.5-0.5B-Instruct"].n_params < 1e9 and by_id["Qwen/Qwen2.5-0.5B-Instruct"].tied_embeddings


def test_summary_cli_prints_the_coverage():
    code, out, err = run_main(e2e_main, [])
    assert code == 0 and not err
    assert "37 rows from 4 sources" in out and "small 6" in out
    code, out, _ = run_main(e2e_main, ["--json"])
    assert code == 0 and '"held_out"' in out


# --- bad input: one line naming the row and its URL -------------------------------------------


def test_good_fixture_loads(tmp_path):
    rows = e2e.load(good_file(tmp_path))
    assert len(rows) == 2 and rows[1].profile.name == "H100-SXM" and rows[1].spec.name == "qwen3-8b"
    assert rows[1].metrics == {"ttft_median_ms": 52.5, "output_tok_per_s": 1800.0}
    assert math.isinf(rows[1].request_rate_per_s) and rows[1].max_concurrency is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"gpu": "h1000"}, "unknown GPU 'h1000'"),
        ({"model": "meta-llama/Llama-9-8B"}, "unknown model 'meta-llama/Llama-9-8B'"),
        ({"engine_version": ""}, "engine_version is empty"),
        ({"gpu": " "}, "gpu is empty"),
        ({"ttft_median_ms": "fast"}, "ttft_median_ms 'fast' is not a number"),
        ({"ttft_median_ms": "0"}, "ttft_median_ms '0' must be > 0"),
        ({"output_tok_per_s": "-3"}, "output_tok_per_s '-3' must be > 0"),
        ({"output_tok_per_s": "nan"}, "is not a finite number"),
        ({"ttft_median_ms": "inf"}, "is not a finite number"),
        ({"num_prompts": "2.5"}, "num_prompts '2.5' is not a whole number"),
        ({"num_scheduler_steps": "0"}, "num_scheduler_steps '0' must be > 0"),
        ({"request_rate": "-inf"}, "request_rate '-inf' is not a finite number"),
        ({"request_rate": "0"}, "request_rate '0' must be > 0"),
        ({"n_gpus": "4"}, "n_gpus 4 is not tp x pp x dp = 2"),
        ({"engine": "ollama"}, "unknown engine 'ollama'"),
        ({"dtype": "int3"}, "unknown dtype 'int3'"),
        ({"dataset": "sonnet"}, "unknown dataset 'sonnet'"),
        ({"input_len": ""}, "a random dataset needs input_len and output_len"),
        ({"num_prompts": ""}, "only a closed-loop point (max_concurrency set) may leave it out"),
        ({"ttft_median_ms": "", "output_tok_per_s": ""}, "no metric reported"),
    ],
)
def test_bad_row_is_one_line_naming_row_and_url(tmp_path, changes, message):
    path = good_file(tmp_path, **changes)
    with pytest.raises(UserError) as exc:
        e2e.load(path)
    text = str(exc.value)
    assert message in text
    assert f"{path} row 2 ({URL})" in text and "\n" not in text
    code, out, err = run_main(e2e_main, [path])
    assert code == 2 and not out
    assert message in one_error_line(err)


def test_optional_columns_may_be_absent(tmp_path):
    columns = [c for c in GOOD if c not in ("num_scheduler_steps", "max_concurrency", "quote_locator", "notes")]
    rows = e2e.load(write(tmp_path / "results.csv", [GOOD, {**GOOD, "num_scheduler_steps": "10"}], columns))
    assert [r.num_scheduler_steps for r in rows] == [None, None] and rows[0].max_concurrency is None
    rows = e2e.load(good_file(tmp_path, num_scheduler_steps="10"))
    assert [r.num_scheduler_steps for r in rows] == [None, 10]


def test_closed_loop_row_may_omit_the_number_of_prompts(tmp_path):
    rows = e2e.load(good_file(tmp_path, num_prompts="", max_concurrency="8"))
    assert rows[1].num_prompts is None and rows[1].closed_loop


def test_sharegpt_row_needs_no_lengths(tmp_path):
    rows = e2e.load(good_file(tmp_path, dataset="ShareGPT", input_len="", output_len=""))
    assert rows[1].dataset == "sharegpt" and rows[1].input_len is None


def test_missing_or_unknown_column(tmp_path):
    columns = [c for c in GOOD if c != "model"]
    path = write(tmp_path / "no_model.csv", [GOOD], columns)
    with pytest.raises(UserError, match="column model is missing"):
        e2e.load(path)
    path = write(tmp_path / "typo.csv", [{**GOOD, "ttft_med_ms": "3"}], [*GOOD, "ttft_med_ms"])
    with pytest.raises(UserError, match="unknown column 'ttft_med_ms'"):
        e2e.load(path)


def test_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        e2e.load(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="is a folder"):
        e2e.load(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="cannot read as CSV"):
        e2e.load(tmp_path / "empty.csv")
    write(tmp_path / "header.csv", [GOOD]).write_text(",".join(GOOD) + "\n")
    with pytest.raises(UserError, match="no rows"):
        e2e.load(tmp_path / "header.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00gpu\n")
    code, _, err = run_main(e2e_main, [tmp_path / "binary.csv"])
    assert code == 2 and one_error_line(err)


@settings(max_examples=40, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_a_metric_loads_exactly_when_positive(value):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder) / "r.csv", [{**GOOD, "ttft_median_ms": repr(value)}])
        if value > 0:
            assert e2e.load(path)[0].metrics["ttft_median_ms"] == float(repr(value))
        else:
            with pytest.raises(UserError, match="must be > 0"):
                e2e.load(path)


# --- the split ----------------------------------------------------------------------------------


def test_split_ignores_order_and_metrics(shipped):
    fit, held = e2e.split(shipped)
    assert fit and held and len(fit) + len(held) == len(shipped)
    shuffled = shipped[:]
    random.Random(0).shuffle(shuffled)
    assert {e2e.split_key(r) for r in e2e.split(shuffled)[0]} == {e2e.split_key(r) for r in fit}
    for r in shipped:
        remeasured = dataclasses.replace(r, metrics={k: 2 * v for k, v in r.metrics.items()}, row=r.row + 100, notes="")
        assert e2e.is_fit_row(remeasured) == e2e.is_fit_row(r)


def test_split_takes_one_row_in_every(shipped):
    """3000 rows that differ in one setting: the fit count is Binomial(3000, 1/3), mean 1000, sd 25.8;
    the test accepts 1000 +- 4 sd (false alarm < 1e-4). A split by halves (mean 1500) or one that keeps
    or drops every row lies more than 19 sd away, so the test catches it with certainty."""
    base = shipped[0]
    rows = [dataclasses.replace(base, request_rate_per_s=1.0 + i / 7) for i in range(3000)]
    n_fit = sum(e2e.is_fit_row(r) for r in rows)
    assert 1000 - 4 * 25.8 <= n_fit <= 1000 + 4 * 25.8
    assert sum(e2e.is_fit_row(r, every=2) for r in rows) == pytest.approx(1500, abs=4 * 27.4)
    assert all(e2e.is_fit_row(r, every=1) for r in rows[:50])
    with pytest.raises(UserError):
        e2e.is_fit_row(base, every=0)
