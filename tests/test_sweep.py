"""`sweep`: spec expansion and its errors (each naming its key), one row per point equal to the
`simulate` report of that point, resume, atomic output, and the same rows from the process pool,
in-process and on a local Ray."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest
from cli_run import run_python, simulator_cli

from simulator import simulate as sim
from simulator import sweep
from simulator.errors import UserError
from simulator.parallel import Runner

SMALL = {"requests": 30, "prompt_len": 128, "output_len": 32, "rate": 4.0}
SPEC = {"fixed": SMALL, "grid": {"gpu": ["a100", "h100"], "gamma": [2, 4]}}


def write_spec(tmp_path, spec: dict, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


# --- the spec ---------------------------------------------------------------------------------


def test_grid_expands_to_every_combination_over_the_fixed_options():
    points = sweep.expand({"fixed": {"seed": 3}, "grid": {"gpu": ["a100", "h100"], "gamma": [1, 2, 3]}})
    assert [(p["gpu"], p["gamma"]) for p in points] == [(g, k) for g in ("a100", "h100") for k in (1, 2, 3)]
    assert all(p["seed"] == 3 and p["max_batch"] is None and p["interval"] is False for p in points)  # None: the engine's default
    assert len({sweep.point_id(p) for p in points}) == 6


def test_points_combine_with_the_grid():
    points = sweep.expand({"points": [{"tp": 1}, {"tp": 2, "chunked_prefill": True}], "grid": {"rate": [1, 2]}})
    assert [(p["tp"], p["chunked_prefill"], p["rate"]) for p in points] == [(1, None, 1.0), (1, None, 2.0), (2, True, 1.0), (2, True, 2.0)]


@pytest.mark.parametrize(
    "spec, names",
    [
        ({"grid": {"gama": [1]}}, "grid: unknown key 'gama'"),
        ({"grids": {"gamma": [1]}}, "unknown key 'grids'"),
        ({"fixed": {"rate": 1}}, "no grid and no points"),
        ({"grid": {"gpu": []}}, "grid.gpu is empty"),
        ({"grid": {"gamma": [2, "four"]}}, "grid.gamma[1]: expected a whole number"),
        ({"grid": {"chunked_prefill": ["yes"]}}, "grid.chunked_prefill[0]: expected true or false"),
        ({"grid": {"lengths": ["zipf"]}}, "grid.lengths[0]: must be one of fixed, uniform, sharegpt"),
        ({"points": [{"max_batch": 8}, {"maxbatch": 8}]}, "points[1]: unknown key 'maxbatch'"),
        ({"points": []}, "points must be a non-empty list"),
    ],
)
def test_spec_errors_name_the_key(spec, names):
    with pytest.raises(UserError, match="^spec: ") as err:
        sweep.expand(spec)
    assert names in str(err.value)


def test_points_are_checked_as_simulate_checks_its_flags():
    with pytest.raises(UserError, match="gpu: unknown GPU 'zz9'"):
        sweep.check_points(sweep.expand({"grid": {"gpu": ["a100", "zz9"]}}))
    with pytest.raises(UserError, match=r"point 1 \(tp=3\): tensor-parallel degree 3"):
        sweep.check_points(sweep.expand({"grid": {"tp": [1, 3]}}))


# --- rows ---------------------------------------------------------------------------------------


def test_a_row_is_the_point_and_its_simulate_report_flattened(tmp_path):
    point = sweep.expand({"fixed": SMALL, "points": [{"gamma": 3, "lengths": "uniform"}]})[0]
    row = sweep.run_point((0, point))
    hw, target, draft, acceptance, serving, workload = sim.config_from_args(sweep._args(point))
    report = json.loads(sim.finite_json(sim.simulate(hw, target, draft, acceptance, serving, workload, point["seed"], intervals=False)))
    assert row["gamma"] == 3 and row["lengths"] == "uniform" and row["point"] == 0
    assert row["speculative.latency_s.tpot.p99"] == report["speculative"]["latency_s"]["tpot"]["p99"]
    assert row["autoregressive.engine.steps"] == report["autoregressive"]["engine"]["steps"]
    assert row["comparison.output_tokens_per_s_ratio"] == report["comparison"]["output_tokens_per_s_ratio"]
    assert json.loads(row["speculative.requests.rejected_by_reason"]) == report["speculative"]["requests"]["rejected_by_reason"]
    assert not any(k.startswith(("speculative.timeline", "autoregressive.timeline")) for k in row)
    assert row["speculative.requests.completed"] + row["speculative.requests.rejected"] == SMALL["requests"]


def test_cli_writes_parquet_that_pandas_reads_and_resume_skips_done_points(tmp_path):
    spec, out = write_spec(tmp_path, SPEC), tmp_path / "out.parquet"
    code, stdout, err = simulator_cli(["sweep", spec, "--out", out, "--workers", "1"])
    assert code == 0, err
    first = pd.read_parquet(out)
    assert len(first) == 4 and list(first["point"]) == [0, 1, 2, 3]
    assert list(zip(first["gpu"], first["gamma"], strict=True)) == [("a100", 2), ("a100", 4), ("h100", 2), ("h100", 4)]
    assert "4 points simulated" in stdout

    bigger = {**SPEC, "grid": {**SPEC["grid"], "gamma": [2, 4, 6]}}
    code, stdout, err = simulator_cli(["sweep", write_spec(tmp_path, bigger), "--out", out, "--resume", "--workers", "1"])
    assert code == 0, err
    assert "2 points simulated, 4 already in" in stdout
    both = pd.read_parquet(out)
    assert len(both) == 6
    kept = both[both["point_id"].isin(first["point_id"])].drop(columns="point").reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, first.drop(columns="point"))


def test_an_interrupted_sweep_keeps_every_completed_point(tmp_path):
    points = sweep.expand({"fixed": SMALL, "grid": {"gamma": [1, 2, 3]}})
    out = tmp_path / "out.parquet"
    seen = []

    def stop_after_two(_):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(points, out, progress=stop_after_two)
    assert len(pd.read_parquet(out)) == 2
    assert sweep.run_sweep(points, out, resume=True)["simulated"] == 1
    assert len(pd.read_parquet(out)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]  # no temporary file left behind


@pytest.mark.parametrize(
    "spec, out, message",
    [
        ({"grid": {"gama": [1]}}, "out.parquet", "unknown key 'gama'"),
        ({"grid": {"gpu": ["a100", "nope-gpu"]}}, "out.parquet", "unknown GPU 'nope-gpu'"),
        ({"grid": {"gpu": []}}, "out.parquet", "grid.gpu is empty"),
        (SPEC, "spec.yaml/out.parquet", "cannot write"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, spec, out, message):
    path = write_spec(tmp_path, spec)
    code, stdout, err = simulator_cli(["sweep", path, "--out", tmp_path / out, "--workers", "1"])
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_resume_refuses_a_file_that_is_not_a_sweep(tmp_path):
    out = tmp_path / "other.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(out)
    code, _, err = simulator_cli(["sweep", write_spec(tmp_path, SPEC), "--out", out, "--resume"])
    assert code == 2 and "not the output of a sweep" in err


# --- backends -----------------------------------------------------------------------------------


def test_process_pool_gives_the_rows_of_one_process(tmp_path):
    points = sweep.expand({"fixed": SMALL, "grid": {"gamma": [2, 4], "chunked_prefill": [False, True]}})
    one, pool = tmp_path / "one.parquet", tmp_path / "pool.parquet"
    sweep.run_sweep(points, one, runner=Runner(workers=1))
    sweep.run_sweep(points, pool, runner=Runner(workers=2))
    pd.testing.assert_frame_equal(pd.read_parquet(one), pd.read_parquet(pool))


def _where(job):
    time.sleep(0.2)  # long enough for both processes to start their first job
    return job[0], os.getpid(), time.monotonic()


def test_grouped_jobs_keep_each_process_to_one_group_first():
    """With `group`, a free process takes a group no other works on: the two processes start on
    the two groups (a plain pool hands both the first group's jobs), and every job runs once."""
    jobs = {i: ("ab"[i // 4], i) for i in range(8)}
    with Runner(workers=2) as runner:
        done = dict(runner.unordered(_where, jobs, group=lambda job: job[0]))
    assert sorted(done) == list(range(8))
    first_group = {}
    for group, pid, _ in sorted(done.values(), key=lambda v: v[2]):
        first_group.setdefault(pid, group)
    assert sorted(first_group.values()) == ["a", "b"]


def test_points_of_two_gpus_give_the_rows_of_one_process_on_the_grouped_pool(tmp_path):
    points = sweep.expand({"fixed": SMALL, "grid": {"gpu": ["a100", "l40s"], "gamma": [2, 4]}})
    one, pool = tmp_path / "one.parquet", tmp_path / "pool.parquet"
    sweep.run_sweep(points, one, runner=Runner(workers=1))
    sweep.run_sweep(points, pool, runner=Runner(workers=2))
    pd.testing.assert_frame_equal(pd.read_parquet(one), pd.read_parquet(pool))


def test_without_ray_the_flag_is_one_line_naming_the_extra(tmp_path):
    spec = write_spec(tmp_path, SPEC)
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from simulator.__main__ import main\n"
        f"sys.exit(main(['sweep', {str(spec)!r}, '--out', {str(tmp_path / 'o.parquet')!r}, '--ray']))\n"
    )
    done = run_python(code)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "pip install -e '.[ray]'" in done.stderr


def test_an_unreachable_ray_address_is_one_line(tmp_path):
    pytest.importorskip("ray")
    code, _, err = simulator_cli(["sweep", write_spec(tmp_path, SPEC), "--out", tmp_path / "o.parquet", "--ray-address", "127.0.0.1:1"])
    assert code == 2 and err.count("\n") == 1 and "cannot reach Ray at 127.0.0.1:1" in err
    assert not (tmp_path / "o.parquet").exists()


def test_ray_gives_the_rows_of_the_process_pool(tmp_path):
    pytest.importorskip("ray")
    points = sweep.expand({"fixed": SMALL, "grid": {"gpu": ["a100", "l40s"], "gamma": [2, 4]}})
    pool, on_ray = tmp_path / "pool.parquet", tmp_path / "ray.parquet"
    sweep.run_sweep(points, pool, runner=Runner(workers=2))
    sweep.run_sweep(points, on_ray, runner=Runner(workers=2, ray=True))
    a, b = pd.read_parquet(pool), pd.read_parquet(on_ray)
    assert len(a) == 4
    pd.testing.assert_frame_equal(a, b)


def test_tree_points_sweep_like_simulate_runs_them(tmp_path):
    """A grid over Medusa trees: `draft: medusa` is the target's heads, not a model to look up; each
    row is the `simulate` report of its tree."""
    acceptance = "tests/data/tree_acceptance_fixture.json"
    spec = {"fixed": {**SMALL, "draft": "medusa", "acceptance": acceptance}, "grid": {"tree": ["best:4", "best:8"]}}
    points = sweep.expand(spec)
    sweep.check_points(points)
    rows = [sweep.run_point((i, p)) for i, p in enumerate(points)]
    assert [r["tree"] for r in rows] == ["best:4", "best:8"]
    code, out, err = simulator_cli(["simulate", "--draft", "medusa", "--tree", "best:8", "--acceptance", acceptance, "--requests", "30",
                                    "--prompt-len", "128", "--output-len", "32", "--rate", "4", "--json"])  # fmt: skip
    assert code == 0, err
    report = sweep.flatten(json.loads(out))  # with its intervals, which a sweep leaves out by default
    shared = report.keys() & rows[1].keys()
    assert len(shared) > 100 and all(report[k] == rows[1][k] for k in shared)
    with pytest.raises(UserError, match="tree"):
        sweep.check_points(sweep.expand({"fixed": {**SMALL, "draft": "medusa", "acceptance": acceptance}, "grid": {"tree": ["best:0"]}}))
