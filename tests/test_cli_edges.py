"""The rough edges a new user hits, each answered as a user would expect: bad input in one line on
stderr with exit code 2 and nothing written; output paths checked before any work; the result printed
before a plot that fails; a closed pipe that ends the command quietly; a missing torch named with the
install that brings it; JSON without NaN or Infinity."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml
from cli_run import one_error_line, reference_cli, run_python, simulator_cli

from simulator import calibration, capacity, simulate
from simulator import validate as val
from simulator.errors import CLOSED_PIPE_EXIT, EXTRA_HINT, finite_json
from simulator.hardware import PROFILE_DIR

A100_YAML = PROFILE_DIR / "a100-80gb-sxm.yaml"
TRACE_HEADER = "arrival_time_s,prompt_tokens,output_tokens\n"
FAST_SIMULATE = ["simulate", "--requests", "5", "--no-interval"]
SMALL_SEARCH = ["plan", "--gpu", "a100", "--model", "llama-2-7b", "--rate", "4", "--prompt-len", "256", "--output-len", "64",
                "--max-gpus", "1", "--requests", "40", "--draft", "llama-68m", "--gamma", "2", "--batch", "16",
                "--slo-ttft-p99", "1s", "--slo-tpot-p99", "30ms"]  # fmt: skip


def strict_json(text: str):
    """JSON as a strict reader takes it: NaN and Infinity are errors."""

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


def profile_with(tmp_path: Path, **fields) -> Path:
    data = yaml.safe_load(A100_YAML.read_text()) | fields
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def nothing_left(folder: Path) -> None:
    """No file, finished or half-written, in `folder` (a test's own output folder)."""
    assert not folder.exists() or list(folder.iterdir()) == []


def forbid(monkeypatch, module, name: str) -> None:
    """Make `module.name` fail the test if called: the work it does must not start."""

    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran before the bad output path was refused")

    monkeypatch.setattr(module, name, called)


# --- profiles ----------------------------------------------------------------------------------


def test_a_profile_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(A100_YAML.read_bytes()[:200] + b"\xff\xfe\x00 garbage\n")
    code, out, err = simulator_cli(["plan", "--gpu", path])
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(path) in line and "UTF-8" in line


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("hbm_bytes_per_s", float("inf"), "finite"),
        ("hbm_bytes_per_s", float("nan"), "finite"),
        ("hbm_bytes_per_s", 1e30, "less than or equal"),
        ("clock_hz", 1.0, "greater than or equal"),
        ("launch_overhead_s", 1e-300, "greater than or equal"),
        ("memory_bytes", 2**80, "less than or equal"),
        ("peak_flops_per_s", {"fp32": 1e13, "fp16": float("inf")}, "finite"),
    ],
)
def test_profiles_refuse_infinities_and_unphysical_values_naming_the_field(tmp_path, field, value, needle):
    path = profile_with(tmp_path, **{field: value})
    code, out, err = simulator_cli(["plan", "--gpu", path, "--json"])
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(path) in line and f"field {field}" in line and needle in line


def test_plan_json_is_strict_json():
    code, out, err = simulator_cli(["plan", "--json"])
    assert code == 0, err
    assert strict_json(out)["gpu"]["hbm_bytes_per_s"] == yaml.safe_load(A100_YAML.read_text())["hbm_bytes_per_s"]


def test_finite_json_writes_nan_and_infinity_as_null():
    data = {"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf")}], "d": (2, "x")}
    assert strict_json(finite_json(data)) == {"a": None, "b": [1.5, None, {"c": None}], "d": [2, "x"]}


# --- model specs (config.json) -------------------------------------------------------------------


def hf_config(tmp_path: Path, **fields) -> Path:
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 32000} | fields
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "fields, needles",
    [
        ({"hidden_size": 0}, ["field hidden_size", "greater than or equal to 1"]),
        ({"hidden_size": 66}, ["hidden_size 66 is not a multiple of num_attention_heads 4"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads 4 is not a multiple of num_key_value_heads 3"]),
        ({"num_hidden_layers": 10**9}, ["field num_hidden_layers", "less than or equal"]),
        ({"rope_theta": -1.0}, ["field rope_theta", "greater than 0"]),
        ({"vocab_size": "many"}, ["field vocab_size", "valid integer"]),
    ],
)
def test_config_json_errors_name_the_field_and_the_reason(tmp_path, fields, needles):
    path = hf_config(tmp_path, **fields)
    code, out, err = simulator_cli(["plan", "--model", path])
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(path) in line and all(n in line for n in needles), line


def test_config_json_with_infinity_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, '
                    '"vocab_size": 32000, "rope_theta": Infinity}')  # fmt: skip
    code, _, err = simulator_cli(["plan", "--model", path])
    assert code == 2 and "field rope_theta" in one_error_line(err)


# --- traces --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, needle",
    [
        ("0,1e26,10", "prompt_tokens must be a whole number >= 1 (at most 2**53)"),
        ("0,10," + "9" * 400, "output_tokens must be a whole number >= 1 (at most 2**53)"),
        ("1e18,100,10", "arrival_time_s must be a number of seconds >= 0 (at most 2**22)"),
    ],
)
def test_trace_cells_beyond_what_a_float_keeps_are_refused(tmp_path, row, needle):
    path = tmp_path / "trace.csv"
    path.write_text(TRACE_HEADER + "0,10,5\n" + row + "\n")
    code, out, err = simulator_cli([*FAST_SIMULATE, "--trace", path])
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert f"{path}:3:" in line and needle in line


def test_a_jsonl_trace_with_a_huge_integer_is_refused(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_time_s": 0, "prompt_tokens": ' + "9" * 400 + ', "output_tokens": 4}\n')
    code, _, err = simulator_cli([*FAST_SIMULATE, "--trace", path])
    assert code == 2 and f"{path}:1: prompt_tokens" in one_error_line(err)


def test_a_trace_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_bytes(TRACE_HEADER.encode() + b"0,\xff,1\n")
    code, _, err = simulator_cli([*FAST_SIMULATE, "--trace", path])
    assert code == 2 and str(path) in one_error_line(err)


def test_the_latest_arrival_a_trace_may_have_still_gives_real_latencies(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(TRACE_HEADER + f"{2.0**22},100,10\n")
    code, out, err = simulator_cli([*FAST_SIMULATE, "--trace", path, "--json"])
    assert code == 0, err
    ttft = strict_json(out)["speculative"]["latency_s"]["ttft"]["mean"]
    assert ttft > 1e-4  # a prefill of 100 tokens of Llama-2-7B; at 1e18 s it rounded to 0.0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--rate", "1e-6"], "--rate: 5 requests at 1e-06/s arrive over"),
        (["--rate", "1e12"], "--rate must be at most 1e+09"),
        (["--prompt-len", str(2**60)], "--prompt-len must be >= 1 (at most 2**53)"),
    ],
)
def test_rates_and_lengths_beyond_what_a_float_keeps_are_refused(argv, needle):
    code, out, err = simulator_cli([*FAST_SIMULATE, *argv])
    assert code == 2 and out == "" and needle in one_error_line(err)


# --- messages that help --------------------------------------------------------------------------


def test_lengths_past_the_models_positions_are_refused():
    code, _, err = simulator_cli(["plan", "--prompt-len", str(2**53)])
    assert code == 2 and f"--prompt-len {2**53} + --output-len 256 exceed llama-2-7b's 4096 positions" in one_error_line(err)


def test_a_gamma_too_large_for_the_context_says_so():
    code, _, err = simulator_cli(["plan", "--gamma", "4000"])
    line = one_error_line(err)
    assert code == 2 and "--gamma 4000 is too large for the context" in line and "at most 3327 fits" in line  # llama-2-7b: 4096 positions


@pytest.mark.parametrize("argv", [["plan", "--rate", "2", "--slo-ttft-p99=-2s", "--slo-tpot-p99", "50ms"],
                                  [*FAST_SIMULATE, "--slo-ttft", "-1"]])  # fmt: skip
def test_a_negative_slo_must_be_positive(argv):
    code, _, err = simulator_cli(argv)
    assert code == 2 and "must be positive" in one_error_line(err)


def test_an_argument_error_is_one_line_with_the_way_to_help():
    code, out, err = simulator_cli(["plan", "--gamma", "many"])
    assert code == 2 and out == ""
    assert one_error_line(err) == "error: argument --gamma: invalid int value: 'many'; see python -m simulator plan --help"


# --- output paths: checked before any work, results before plots ---------------------------------


def unwritable(tmp_path: Path) -> Path:
    """A folder that cannot be made: its parent is a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return blocker / "plots"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_calibrate_to_proc_is_refused_before_measuring(monkeypatch):
    forbid(monkeypatch, calibration, "measure_calibration_suite")
    code, out, err = simulator_cli(["calibrate", "--quick", "--out", "/proc/x.yaml"])
    assert code == 2 and out == "" and "/proc/x.yaml" in one_error_line(err)


def test_calibrate_bad_repeats_are_refused_before_measuring(monkeypatch, tmp_path):
    forbid(monkeypatch, calibration, "measure_calibration_suite")
    code, _, err = simulator_cli(["calibrate", "--quick", "--repeats", "0", "--out", tmp_path / "p.yaml"])
    assert code == 2 and "--repeats must be >= 1" in one_error_line(err)
    nothing_left(tmp_path)


@pytest.mark.parametrize("flag", ["--plot", "--csv"])
def test_simulate_output_paths_are_checked_before_simulating(monkeypatch, tmp_path, flag):
    forbid(monkeypatch, simulate, "simulate")
    target = unwritable(tmp_path) / "out.png"
    code, out, err = simulator_cli([*FAST_SIMULATE, flag, target])
    assert code == 2 and out == "" and str(target) in one_error_line(err)


def test_simulate_plot_of_an_unknown_format_is_refused_before_simulating(monkeypatch, tmp_path):
    forbid(monkeypatch, simulate, "simulate")
    code, _, err = simulator_cli([*FAST_SIMULATE, "--plot", tmp_path / "latency.xyz"])
    assert code == 2 and "cannot write a plot as .xyz" in one_error_line(err)
    nothing_left(tmp_path)


def test_plan_search_plot_dir_is_checked_before_the_search(monkeypatch, tmp_path):
    forbid(monkeypatch, capacity, "search")
    target = unwritable(tmp_path)
    code, out, err = simulator_cli([*SMALL_SEARCH, "--plot-dir", target])
    assert code == 2 and out == "" and str(target) in one_error_line(err)


def test_validate_plot_dir_is_checked_before_validating(monkeypatch, tmp_path):
    forbid(monkeypatch, val, "validate")
    target = unwritable(tmp_path)
    code, out, err = simulator_cli(["validate", "--plot-dir", target])
    assert code == 2 and out == "" and str(target) in one_error_line(err)


def test_compare_plot_is_checked_before_measuring(monkeypatch, tmp_path):
    forbid(monkeypatch, calibration, "compare")
    target = unwritable(tmp_path) / "compare.png"
    code, out, err = simulator_cli(["compare", "--gpu", "a100", "--plot", target])
    assert code == 2 and out == "" and str(target) in one_error_line(err)


@pytest.fixture
def full_disk(monkeypatch):
    """Every figure fails to save, as on a full disk: what no check beforehand can foresee."""
    from matplotlib.figure import Figure

    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", no_space)


def test_a_simulate_plot_that_fails_comes_after_the_result(full_disk, tmp_path):
    plot = tmp_path / "latency.png"
    code, out, err = simulator_cli([*FAST_SIMULATE, "--json", "--plot", plot])
    assert code == 2
    assert strict_json(out)["speculative"]["requests"]["completed"] == 5  # the result, whole
    last = err.splitlines()[-1]
    assert last == f"error: {plot}: cannot write the plot: {os.strerror(errno.ENOSPC)}" and "Traceback" not in err
    nothing_left(tmp_path)


def test_a_search_plot_that_fails_comes_after_the_result(full_disk, tmp_path):
    code, out, err = simulator_cli([*SMALL_SEARCH, "--json", "--plot-dir", tmp_path])
    assert code == 2
    report = strict_json(out)
    assert report["recommendation"] is not None and report["plots"][0] == str(tmp_path / "pareto_throughput_vs_p99_tpot.png")
    assert err.splitlines()[-1] == f"error: {report['plots'][0]}: cannot write the plot: {os.strerror(errno.ENOSPC)}"
    nothing_left(tmp_path)


def test_simulate_csv_and_plot_are_written_after_the_report(tmp_path):
    csv_path, plot = tmp_path / "runs.csv", tmp_path / "latency.png"
    code, out, err = simulator_cli([*FAST_SIMULATE, "--csv", csv_path, "--plot", plot])
    assert code == 0, err
    assert "speculation: output tokens/s" in out
    assert f"simulate: wrote {csv_path}" in err and f"simulate: wrote {plot}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.png", "runs.csv"]  # no temporary file left


# --- closed pipe and missing torch (each in a fresh interpreter) -----------------------------------


@pytest.mark.parametrize("module, argv", [("simulator", ["plan", "--json"]), ("simulator", ["profiles", "--json"])])
def test_a_closed_pipe_ends_quietly(module, argv):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte: `... | head -c0`
    try:
        done = run_python(f"import sys; from {module}.__main__ import main; sys.exit(main({argv!r}))", stdout=write_end)
    finally:
        os.close(write_end)
    assert done.returncode == CLOSED_PIPE_EXIT and done.stderr == ""


HIDE_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['triton'] = None; "


@pytest.mark.parametrize(
    "code",
    [
        "from reference.__main__ import main; sys.exit(main(['specdec']))",
        "from simulator.__main__ import main; sys.exit(main(['calibrate', '--quick', '--out', {out!r}]))",
    ],
)
def test_a_missing_torch_names_the_reference_extra(tmp_path, code):
    done = run_python(HIDE_TORCH + code.format(out=str(tmp_path / "profile.yaml")))
    assert done.returncode == 2, done.stderr
    line = one_error_line(done.stderr)
    assert "torch" in line and EXTRA_HINT in line
    nothing_left(tmp_path)


# --- weights files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_blob():
    import torch

    from reference.model import WEIGHTS_DIR

    return torch.load(WEIGHTS_DIR / "draft.pt", weights_only=True)


def weights_cases(blob) -> dict:
    import torch

    state = blob["state_dict"]
    missing = {k: v for k, v in state.items() if k != "embed.weight"}
    transposed = state | {"embed.weight": state["embed.weight"].T.contiguous()}  # same parameter count, wrong shape
    not_finite = state | {"norm.weight": torch.full_like(state["norm.weight"], float("nan"))}
    huge = blob["spec"] | {"d_model": 2**16, "n_layers": 10_000, "d_ff": 2**20, "n_heads": 2**9, "n_kv_heads": 2**9}  # ~9000 TB
    return {
        "random bytes": (bytes(range(256)) * 40, "not a weights file"),
        "bare tensor": (torch.zeros(3), "expected a dict with `spec` and `state_dict`, got Tensor"),
        "missing keys": ({"spec": blob["spec"], "state_dict": missing}, "parameters, the state_dict"),
        "wrong shape": ({"spec": blob["spec"], "state_dict": transposed}, "state_dict.embed.weight has shape [128, 256]; the spec's model needs [256, 128]"),
        "extra key": ({"spec": blob["spec"], "state_dict": state | {"extra.weight": torch.zeros(0)}}, "state_dict has extra.weight"),
        "not finite": ({"spec": blob["spec"], "state_dict": not_finite}, "state_dict.norm.weight is not all finite"),
        "bad spec": ({"spec": blob["spec"] | {"n_heads": 0}, "state_dict": state}, "spec: field n_heads"),
        "40 TB spec": ({"spec": huge, "state_dict": state}, "more than this machine's"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["random bytes", "bare tensor", "missing keys", "wrong shape", "extra key", "not finite", "bad spec", "40 TB spec"])
def test_bad_weights_files_are_one_line_naming_the_file(tmp_path, draft_blob, case):
    import torch

    content, needle = weights_cases(draft_blob)[case]
    path = tmp_path / "draft.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    code, out, err = reference_cli(["specdec", "--draft-model", path, "--max-new-tokens", "4", "--repeats", "1"])
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert str(path) in line and needle in line, line


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--gamma", "1010"], "--gamma 1010 is too large for the context: at most 1003 fits"),
    ],
)
def test_specdec_bad_flags_are_one_line(argv, needle):
    code, out, err = reference_cli(["specdec", "--max-new-tokens", "4", *argv])
    assert code == 2 and out == "" and needle in one_error_line(err)



# --- help a user can trust -----------------------------------------------------------------------


def subcommands(parser, prefix: str = ""):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}".strip(), sub
                yield from subcommands(sub, f"{prefix} {name}")


def reference_parser(monkeypatch):
    """The parser `python -m reference` builds, taken at the moment it would parse."""
    import argparse

    from reference.__main__ import main

    taken = {}

    def take(self, argv=None, namespace=None):
        taken["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", take)
    with pytest.raises(SystemExit):
        main([])
    return taken["parser"]


def test_every_subcommand_has_a_description(monkeypatch):
    from simulator.__main__ import build_parser

    found = dict(subcommands(build_parser())) | {f"reference {k}": v for k, v in subcommands(reference_parser(monkeypatch))}
    assert {"plan", "compare", "profiles", "bench simulate", "reference specdec", "reference bench attention"} <= set(found)
    missing = [name for name, p in found.items() if not (p.description or "").strip()]
    assert missing == []


def test_plan_help_states_the_real_defaults_and_what_goes_together():
    code, out, _ = simulator_cli(["plan", "--help"])
    text = " ".join(out.split())
    assert code == 0
    assert f"(default: {capacity.DEFAULT_REQUESTS})" in text and f"(default: {capacity.DEFAULT_MAX_GPUS})" in text
    assert f"(default: {capacity.DEFAULT_PLOT_DIR})" in text
    assert text.count("--rate, --slo-ttft-p99 and --slo-tpot-p99 go together") == 3


def test_profiles_shows_every_alias_whole():
    from simulator.hardware import shipped_profiles

    code, out, _ = simulator_cli(["profiles"])
    assert code == 0
    profiles = shipped_profiles()
    lines = out.splitlines()[1 : len(profiles) + 1]
    for profile, line in zip(profiles.values(), lines, strict=True):
        assert line.startswith(profile.name + " ") and line.endswith(", ".join(profile.aliases))
    assert out.splitlines()[len(profiles) + 1 :][-1].startswith("kernel fit: measured, ")  # the column's key, after the table


def test_compare_tells_its_configurations_apart_with_units_per_row():
    config = {"kind": "forward", "model": "stdlib-target-3m", "batch": 1, "context": 200, "query_tokens": 5, "dtype": "fp32"}
    rows = [{"group": "forward", "config": config | {"query_tokens": q}, "predicted_s": 2e-3, "measured_s": 2.5e-3, "error": -0.2} for q in (5, 6)]
    text = calibration.format_compare({"profile": "p", "device": "cpu", "rows": rows, "groups": {"forward": {"n": 2, "mape": 0.2, "median_ape": 0.2}}, "drift": None})
    first, second = text.splitlines()[2:4]
    assert first != second and first.endswith("query_tokens=5") and second.endswith("query_tokens=6")
    assert first.count(" ms ") == 2 and "-20.0%" in first


# --- plots that answer their question --------------------------------------------------------------


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions build, kept instead of saved."""
    from simulator import plots

    figures = []

    def keep(fig, path):
        figures.append(fig)
        return Path(path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def legend_and_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in (*ax.texts, *(ax.get_legend().get_texts() if ax.get_legend() else ()))]


def test_pareto_plot_marks_the_slo_the_recommendation_and_why_others_miss(drawn, tmp_path):
    from simulator.plots import plot_pareto

    points = [{"label": "1 x TP 1, none", "meets_slo": True, "binding": "tpot", "x": 100.0, "y": 40.0},
              {"label": "1 x TP 2, llama-68m g4", "meets_slo": True, "binding": "ttft", "x": 150.0, "y": 45.0},
              {"label": "2 x TP 1, none", "meets_slo": False, "binding": "tpot", "x": 160.0, "y": 80.0},
              {"label": "1 x TP 1, layer-skip g2", "meets_slo": False, "binding": "ttft", "x": 90.0, "y": 30.0}]  # fmt: skip
    plot_pareto(tmp_path / "p.png", points, "x", "y", "t", slo=50.0, chosen="1 x TP 2, llama-68m g4")
    (fig,) = drawn
    texts = legend_and_texts(fig)
    assert "recommended: 1 x TP 2, llama-68m g4" in texts and "SLO: y <= 50" in texts
    assert "misses: TPOT p99 over its SLO" in texts and "misses: TTFT p99 over its SLO" in texts
    assert any(list(line.get_ydata()) == [50.0, 50.0] for line in fig.axes[0].lines)  # the SLO line
    assert {"1 x TP 2, llama-68m g4", "2 x TP 1, none"} <= set(texts)  # the front, labelled


def test_verify_roofline_labels_the_ridge_and_says_batch_varies_along_each_curve(drawn, tmp_path):
    from simulator.hardware import load_profile
    from simulator.models import load_model
    from simulator.plots import plot_verify_roofline

    hw = load_profile("a100")
    plot_verify_roofline(tmp_path / "r.png", hw, load_model("llama-2-7b"), load_model("llama-68m"), 0.7, 768)
    texts = legend_and_texts(drawn[0])
    assert f"ridge {hw.ridge_flops_per_byte():.0f} FLOP/B" in texts
    assert "along each curve: batch 1 to 512, left to right" in texts


# --- the executor's edges ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-324])
def test_a_vanishing_temperature_samples_the_argmax_not_nan(temperature):
    import torch

    from reference.sampling import Sampling, warp

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1.0, 1.0, 0.0, -2.0]])
    p = warp(logits, Sampling(temperature=temperature))
    assert torch.isfinite(p).all()
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]  # ties share the mass, as T -> 0 does
    assert torch.allclose(warp(logits, Sampling(temperature=0.7)), (logits / 0.7).softmax(-1), rtol=1e-6, atol=0)
