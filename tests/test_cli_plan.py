"""`python -m simulator plan` and `profiles`: output, JSON, and every bad-input path (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simulator.__main__ import main
from simulator.hardware import PROFILE_DIR
from simulator.models import load_model

ROOT = Path(__file__).resolve().parent.parent


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_defaults_as_a_subprocess():
    """The README's main command, in a real process: exit 0, every section present."""
    proc = subprocess.run([sys.executable, "-m", "simulator", "plan", "--gpu", "a100"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for needle in ("A100-80GB-SXM", "Autoregressive", "tokens/s", "Recommended gamma", "Br =", "FlashAttention-2", "standard"):
        assert needle in proc.stdout


def test_plan_json_is_consistent(capsys):
    code, out, _ = run(["plan", "--gpu", "a100", "--json"], capsys)
    assert code == 0
    plan = json.loads(out)
    rows = plan["speculative"]["rows"]
    assert rows[0]["gamma"] == 0 and rows[0]["speedup"] == 1.0 and rows[0]["speedup_formula"] == 1.0
    assert plan["recommended_gamma"] == max(rows, key=lambda r: r["speedup"])["gamma"]
    assert plan["autoregressive_tokens_per_s"] == pytest.approx(1.0 / plan["target_step_time_s"])
    assert all(1.0 <= r["expected_tokens_per_step"] <= r["gamma"] + 1 for r in rows)
    att = plan["attention"]
    assert att["flash_fa2"]["hbm_bytes"] < att["standard"]["hbm_bytes"]
    assert att["sram_working_set_bytes"] <= att["sram_bytes"]
    assert plan["target"] == "llama-2-7b" and plan["gpu"]["name"] == "A100-80GB-SXM"


def test_plan_states_an_80_percent_interval_beside_each_time(capsys):
    code, out, _ = run(["plan", "--gpu", "h100", "--json"], capsys)
    plan = json.loads(out)
    assert set(plan["intervals"]) == {"prefill_time_s", "target_step_time_s", "draft_step_time_s", "autoregressive_tokens_per_s", "request_latency_s"}
    for key, band in plan["intervals"].items():
        assert band["level"] == 0.8 and band["low"] < plan[key] < band["high"], key
    code, text, _ = run(["plan", "--gpu", "h100"], capsys)
    assert code == 0 and "ms (80%: " in text and "tokens/s (80%: " in text


def test_a_cpu_profile_has_no_interval(capsys, tmp_path):
    import yaml

    data = yaml.safe_load((PROFILE_DIR / "a100-80gb-sxm.yaml").read_text())
    data.update(kind="cpu", name="some-cpu", aliases=[])
    for key in ("generation", "compute_capability", "interconnect", "tdp_w", "interconnect_bytes_per_s"):
        data.pop(key, None)
        data["sources"].pop(key, None)
    data["estimates"] = [e for e in data["estimates"] if e != "tdp_w"]
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = run(["plan", "--gpu", str(path), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["intervals"] == {}
    assert json.loads(out)["kernel_model"] is None  # the GPU kernel model does not price a CPU
    code, text, _ = run(["plan", "--gpu", str(path)], capsys)
    assert code == 0 and "\nKernels " not in text


def test_plan_says_which_gpus_the_kernel_model_was_fitted_on_and_where_this_one_stands(capsys):
    """One of them; of a generation one of them has (its fitted values); of one none has (the common values)."""
    from simulator.gpu_model.model import GpuDeviceModel
    from simulator.gpu_model.params import load_fitted
    from simulator.hardware import load_profile

    shipped = load_fitted()
    fitted_on = sorted({g for gpus in shipped["gpus"].values() for g in gpus})
    assert "A100-80GB-SXM" in fitted_on and "L40S" in fitted_on and "H100-SXM" not in fitted_on
    for gpu, needle in (("a100", "A100-80GB-SXM is one of them"), ("l4", "L4 is not: it takes its generation's (ada) values, fitted on L40S"),
                        ("h100", "H100-SXM is not, nor is any hopper GPU: it takes the values common to every generation")):  # fmt: skip
        code, text, _ = run(["plan", "--gpu", gpu], capsys)
        model_line = text.splitlines()[1]
        assert code == 0 and model_line.startswith("Kernels   fitted on " + ", ".join(fitted_on) + "; ")
        assert model_line.endswith(needle), model_line
    code, out, _ = run(["plan", "--gpu", "l4", "--json"], capsys)
    assert json.loads(out)["kernel_model"] == {"fitted_on": fitted_on, "measured": False, "generation": "ada", "generation_measured_on": ["L40S"],
                                               "mma_class": "mma.sync", "mma_class_measured_on": []}  # fmt: skip
    # a fit of other GPUs' tables: the same rules over its own list
    mine = {**shipped, "gpus": {"gemm:bf16": ["L40S", "GB200"], "collective": ["GB200", "A100-80GB-SXM"]}}
    rtx = GpuDeviceModel.of(load_profile("rtx-4090"), mine).provenance()
    assert rtx == {"fitted_on": ["A100-80GB-SXM", "GB200", "L40S"], "measured": False, "generation": "ada", "generation_measured_on": ["L40S"],
                   "mma_class": "mma.sync", "mma_class_measured_on": []}  # fmt: skip
    # a generation no GPU of the fit has borrows its tensor-core class's efficiencies where one has it
    v100 = GpuDeviceModel.of(load_profile("v100"), mine).provenance()
    assert v100["generation_measured_on"] == [] and v100["mma_class_measured_on"] == ["A100-80GB-SXM", "L40S"]
    b200 = GpuDeviceModel.of(load_profile("b200"), mine).provenance()
    assert not b200["measured"] and b200["generation_measured_on"] == ["GB200"]
    gb200 = GpuDeviceModel.of(load_profile("gb200"), mine).provenance()
    assert gb200["measured"] and gb200["generation_measured_on"] == ["GB200"]
    h100 = GpuDeviceModel.of(load_profile("h100"), {**shipped, "gpus": {"gemm:bf16": ["A100-80GB-SXM", "NO-SUCH-GPU"]}}).provenance()
    assert not h100["measured"] and h100["generation_measured_on"] == []  # a name no profile has counts for no generation
    assert h100["mma_class"] == "wgmma" and h100["mma_class_measured_on"] == []
    code, text, _ = run(["plan", "--gpu", "t4"], capsys)
    assert text.splitlines()[1].endswith("T4 is not, nor is any turing GPU: it takes the tensor-core efficiencies of its class (mma.sync), fitted on "
                                         + ", ".join(g for g in fitted_on if g != "GB200") + ", and the values common to every generation")  # fmt: skip


def test_plan_options_change_the_answer(capsys):
    _, base, _ = run(["plan", "--json"], capsys)
    _, other, _ = run(["plan", "--json", "--gpu", "a100", "--model", "llama-2-13b", "--draft", "tinyllama-1.1b",
                       "--alpha", "0.5", "--gamma", "3", "--batch", "4", "--prompt-len", "1024", "--output-len", "64"], capsys)  # fmt: skip
    a, b = json.loads(base), json.loads(other)
    assert b["chosen_gamma"] == 3 and b["batch"] == 4 and b["alpha"] == 0.5
    assert b["target_step_time_s"] > a["target_step_time_s"]
    assert b["attention"]["shape"]["seqlen"] == 1024


@pytest.mark.parametrize("alpha,expected_first", [("0", 1.0), ("1", 1.0)])
def test_plan_alpha_limits(capsys, alpha, expected_first):
    code, out, _ = run(["plan", "--json", "--alpha", alpha], capsys)
    rows = json.loads(out)["speculative"]["rows"]
    assert code == 0 and rows[0]["expected_tokens_per_step"] == expected_first
    if alpha == "0":
        assert json.loads(out)["recommended_gamma"] == 0
    else:
        assert all(r["expected_tokens_per_step"] == r["gamma"] + 1 for r in rows)


def test_plan_accepts_a_profile_path_and_a_hf_config(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
                               "intermediate_size": 5632, "vocab_size": 32000, "max_position_embeddings": 2048}))  # fmt: skip
    assert load_model(str(cfg)).n_kv_heads == 4
    code, out, err = run(["plan", "--gpu", str(PROFILE_DIR / "a100-80gb-sxm.yaml"), "--model", str(cfg), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["gpu"]["name"] == "A100-80GB-SXM"


def test_profiles_lists_every_device(capsys):
    code, out, _ = run(["profiles", "--json"], capsys)
    names = {r["name"] for r in json.loads(out)}
    assert code == 0 and "A100-80GB-SXM" in names
    code, out, _ = run(["profiles"], capsys)
    assert "A100-80GB-SXM" in out and "ridge" in out


def test_profiles_say_which_gpus_the_kernel_model_measured_and_which_borrow_a_generation(capsys):
    code, out, _ = run(["profiles", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["L40S"]["kernel_model"]["measured"] and rows["L4"]["kernel_model"]["generation_measured_on"] == ["L40S"]
    code, text, _ = run(["profiles"], capsys)
    cells = {line.split()[0]: line for line in text.splitlines()[1:] if line}
    assert " measured " in cells["A100-80GB-SXM"] and " via L40S " in cells["L4"] and " via GB200 " in cells["B200"]
    assert " common " in cells["H100-SXM"] and " common " in cells["MI300X"] and " common, mma.sync " in cells["T4"]


def _bad_profile(tmp_path, **change):
    data = yaml.safe_load((PROFILE_DIR / "a100-80gb-sxm.yaml").read_text())
    data.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["plan", "--gpu", "a10x"], "unknown GPU 'a10x'"),
        (["plan", "--model", "lama-2-7b"], "closest: llama-2-7b"),
        (["plan", "--draft", "nosuchmodel"], "unknown model"),
        (["plan", "--alpha", "1.5"], "--alpha must lie in [0, 1]"),
        (["plan", "--alpha", "-0.1"], "--alpha must lie in [0, 1]"),
        (["plan", "--gamma", "-1"], "--gamma must be >= 0"),
        (["plan", "--prompt-len", "-5"], "--prompt-len must be >= 1"),
        (["plan", "--output-len", "0"], "--output-len must be >= 1"),
        (["plan", "--batch", "0"], "--batch must be >= 1"),
        (["plan", "--gpu", "missing.yaml"], "no such profile file"),
        (["plan", "--model", "llama-3-8b", "--draft", "llama-68m"], "one vocabulary"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert out == ""


def test_unknown_gpu_lists_known_names(capsys):
    _, _, err = run(["plan", "--gpu", "a10x"], capsys)
    assert "known:" in err and "A100-80GB-SXM" in err


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"hbm_bytes_per_s": -1.0}, "field hbm_bytes_per_s"),
        ({"sm_count": 0}, "field sm_count"),
        ({"achievable": {"bandwidth": 1.2, "matmul": 0.8, "attention": 0.7}}, "field achievable.bandwidth"),
        ({"sources": {}}, "no source for"),
    ],
)
def test_invalid_profile_file_names_file_and_field(tmp_path, capsys, change, needle):
    path = _bad_profile(tmp_path, **change)
    code, _, err = run(["plan", "--gpu", str(path)], capsys)
    assert code == 2 and str(path) in err and needle in err and err.count("\n") == 1


def test_malformed_profile_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\nsm_count: 1\n")
    code, _, err = run(["plan", "--gpu", str(path)], capsys)
    assert code == 2 and "malformed YAML" in err and str(path) in err


def test_bad_input_in_a_real_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "simulator", "plan", "--alpha", "7"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
