"""A fuzz suite over every entry point that reads user input: profiles (YAML text and values), traces
(CSV and JSONL), HuggingFace config.json files, acceptance files, weights files, data manifests and
tables, sweep specs, and the numeric flags of every command.

The property, for each generated input: the command exits 0 with valid output (JSON a strict reader
takes, files whole) or exits 2 with one line on stderr that names the input; never a traceback, never
a hang (hypothesis's deadline bounds each case), never a half-written file.

Budget: the `ci` profile (the default) runs each test's stated number of examples,
derandomized so that CI is reproducible (384 examples; on two cores the file takes 40-60 s).
`FUZZ_PROFILE=long` runs twenty times as many, each from fresh random draws.

Commands whose valid runs measure or search for minutes (calibrate, compare, device-check, plan's
search, the benchmarks) have their flags fuzzed up to the seam where the work starts: the work is
replaced by a stand-in that stops the command, so a case shows that a bad value is refused before
any work, and that a good one gets to the work. Flags that size the work itself (lengths, shapes,
request counts) are drawn from ranges a test can afford and from invalid values; the valid runs of
the cheap commands (plan, simulate, specdec, attention, validate, fit-kernels) run whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from cli_run import reference_cli, simulator_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from simulator.hardware import PROFILE_DIR

PROFILES = {"ci": {"scale": 1, "derandomize": True}, "long": {"scale": 20, "derandomize": False}}
PROFILE = PROFILES[os.environ.get("FUZZ_PROFILE", "ci")]
DEADLINE_S = 60.0  # a case that takes longer is a hang; the slowest valid case here takes a few seconds


def fuzz(examples: int):
    return settings(max_examples=examples * PROFILE["scale"], derandomize=PROFILE["derandomize"], deadline=DEADLINE_S * 1e3,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)  # fmt: skip


# --- values ---------------------------------------------------------------------------------------

EDGE_NUMBERS = [0, -1, 1, 2, 0.5, -0.0, 1e-320, 1e308, 2**53, 2**53 + 1, 2**63, 10**30, float("nan"), float("inf"), -float("inf")]
NUMBERS = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
NASTY = st.one_of(NUMBERS, TEXT, st.none(), st.booleans(), st.lists(st.integers(-3, 3), max_size=3),
                  st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2))  # fmt: skip
FLAG_TEXT = st.one_of(
    NUMBERS.map(str),
    st.sampled_from(["", "nan", "inf", "-inf", "1e309", "0x10", "1_000", "1,2", "2s", "-5ms", " 3 ", "1e-400", "٣"]),
    TEXT,
)


def small_ints(low: int, high: int):
    """Affordable valid values and their neighbours, or anything a flag may be given."""
    return st.one_of(st.integers(low, high).map(str), FLAG_TEXT)


def sizes(low: int, high: int):
    """For a flag that sizes the work (repeats, tokens, requests, batch): affordable values, or
    values no count can take (negative, fractional, not a number); a huge valid count is a long run
    the user asked for, not bad input."""
    invalid = FLAG_TEXT.filter(lambda t: not t.strip().isdigit() and not (t.strip().startswith("+") and t.strip()[1:].isdigit()))
    return st.one_of(st.integers(low, high).map(str), st.integers(max_value=-1).map(str), invalid)


# --- the property --------------------------------------------------------------------------------


def strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


def check_answer(code, out: str, err: str, names: list[str], json_out: bool = True, outputs: tuple[Path, ...] = ()) -> None:
    """Exit 0 with valid output, or 2 with one line on stderr naming one of `names`; `outputs`: files the
    command writes, whole when it succeeded and absent, with no temporary file beside them, when not."""
    assert "Traceback" not in err, err
    if code == 0:
        if json_out:
            strict_json(out)
        else:
            assert out.strip()
        for path in outputs:
            assert path.is_file() and path.stat().st_size > 0
    else:
        assert code == 2, f"exit code {code}: {err[-500:]}"
        tail = err.rsplit("\r", 1)[-1].lstrip()  # after a progress bar's last redraw
        lines = tail.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err[-500:]!r}"
        assert any(name in lines[0] for name in names), f"{lines[0]!r} names none of {names}"
        for path in outputs:
            assert not path.exists()
    for path in outputs:
        strays = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.stem}.")]
        assert not strays, f"temporary files left: {strays}"


FLAG_WORDS = {"--tp": ["tensor-parallel degree"], "--prompt-len": ["prompt"], "--output-len": ["output"]}  # other words messages name a flag by


def flag_names(flag: str) -> list[str]:
    bare = flag.lstrip("-")
    return [flag, bare, bare.replace("-", "_"), *FLAG_WORDS.get(flag, [])]


@contextmanager
def workdir():
    folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Reached(Exception):
    """The command got past its checks to the work a stand-in replaced."""


@contextmanager
def work_replaced(module, name: str):
    def stand_in(*args, **kwargs):
        raise Reached(name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, name, stand_in)
        yield


def run_to_seam(cli, argv: list[str]):
    """(code, out, err), with code "reached" when the command got to its replaced work."""
    try:
        return cli(argv)
    except Reached:
        return "reached", "", ""


# --- profiles ------------------------------------------------------------------------------------

A100 = yaml.safe_load((PROFILE_DIR / "a100-80gb-sxm.yaml").read_text())
PROFILE_KEYS = [k for k in A100 if k not in ("sources", "estimates")] + ["achievable.bandwidth", "peak_flops_per_s.fp16", "peak_flops_per_s.fp8"]


def set_path(data: dict, dotted: str, value) -> dict:
    data = json.loads(json.dumps(data))
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return data


@fuzz(30)
@given(text=st.one_of(st.binary(max_size=200), TEXT.map(str.encode), st.just((PROFILE_DIR / "a100-80gb-sxm.yaml").read_bytes()).flatmap(
    lambda base: st.tuples(st.integers(0, len(base)), st.binary(min_size=1, max_size=12)).map(lambda c: base[: c[0]] + c[1] + base[c[0] :]))))  # fmt: skip
def test_profile_yaml_text(text):
    with workdir() as d:
        path = d / "profile.yaml"
        path.write_bytes(text)
        code, out, err = simulator_cli(["plan", "--gpu", path, "--json"])
        check_answer(code, out, err, [str(path)])


@fuzz(40)
@given(key=st.sampled_from(PROFILE_KEYS), value=NASTY)
def test_profile_values(key, value):
    with workdir() as d:
        path = d / "profile.yaml"
        data = set_path(A100, key, value)
        if key == "peak_flops_per_s.fp8":
            data["sources"][key] = "fuzz"  # a new number needs its source
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
        code, out, err = simulator_cli(["plan", "--gpu", path, "--json"])
        check_answer(code, out, err, [str(path)])


# --- config.json ---------------------------------------------------------------------------------

HF = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
      "vocab_size": 32000, "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip


@fuzz(40)
@given(changes=st.dictionaries(st.sampled_from([*HF, "_name_or_path"]), st.one_of(NASTY, st.integers(1, 4096)), min_size=1, max_size=3),
       drop=st.sets(st.sampled_from(list(HF)), max_size=1), raw=st.one_of(st.none(), st.binary(max_size=60)))  # fmt: skip
def test_config_json(changes, drop, raw):
    with workdir() as d:
        path = d / "config.json"
        if raw is not None:
            path.write_bytes(raw)
        else:
            cfg = {k: v for k, v in (HF | changes).items() if k not in drop}
            path.write_text(json.dumps(cfg))  # NaN and Infinity as Python's json writes them
        code, out, err = simulator_cli(["plan", "--model", path, "--draft", path, "--json"])
        check_answer(code, out, err, [str(path)])


# --- traces --------------------------------------------------------------------------------------

CELL = st.one_of(NUMBERS, st.integers(0, 3000), st.floats(0, 100), TEXT, st.none(), st.booleans())


@fuzz(30)
@given(rows=st.lists(st.tuples(CELL, CELL, CELL), min_size=0, max_size=4), jsonl=st.booleans(),
       header=st.sampled_from(["arrival_time_s,prompt_tokens,output_tokens", "prompt_tokens,arrival_time_s,output_tokens", "a,b", ""]))  # fmt: skip
def test_traces(rows, jsonl, header):
    with workdir() as d:
        if jsonl:
            path = d / "trace.jsonl"
            path.write_text("".join(json.dumps(dict(zip(("arrival_time_s", "prompt_tokens", "output_tokens"), r, strict=True))) + "\n" for r in rows))
        else:
            path = d / "trace.csv"
            path.write_text(header + "\n" + "".join(",".join("" if c is None else str(c) for c in r) + "\n" for r in rows))
        csv_out = d / "runs.csv"
        code, out, err = simulator_cli(["simulate", "--trace", path, "--no-interval", "--json", "--csv", csv_out])
        check_answer(code, out, err, [str(path)], outputs=(csv_out,))


# --- acceptance files ----------------------------------------------------------------------------

ACCEPTANCE = st.one_of(
    st.fixed_dictionaries({"accepted_length_counts": st.lists(st.one_of(NUMBERS, st.integers(0, 50)), max_size=6)}),
    st.fixed_dictionaries({"alpha_per_position": st.lists(st.one_of(NUMBERS, st.floats(0, 1)), max_size=6)}),
    st.fixed_dictionaries({"alpha": st.one_of(NASTY, st.floats(0, 1))}),
    st.lists(st.one_of(NUMBERS, st.integers(0, 50)), max_size=6),
    NASTY,
)


SWEEP_KEYS = st.sampled_from(["gpu", "model", "draft", "gamma", "max_batch", "tp", "chunked_prefill", "rate", "lengths", "seed",
                               "prompt_len", "output_len", "tree", "gama", "fixed", "grid", "points", ""])  # fmt: skip
SWEEP_VALUES = st.one_of(NASTY, st.sampled_from(["a100", "h100", "llama-2-7b", "llama-68m", "medusa", "none", "best:4", "fixed", True]))
SWEEP_SPECS = st.one_of(
    st.fixed_dictionaries({"grid": st.dictionaries(SWEEP_KEYS, st.one_of(st.lists(SWEEP_VALUES, max_size=2), SWEEP_VALUES), max_size=2)},
                          optional={"fixed": st.dictionaries(SWEEP_KEYS, SWEEP_VALUES, max_size=2),
                                    "points": st.one_of(st.lists(st.dictionaries(SWEEP_KEYS, SWEEP_VALUES, max_size=2), max_size=2), NASTY)}),
    NASTY,
)  # fmt: skip


@fuzz(25)
@given(spec=SWEEP_SPECS, raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_sweep_specs(spec, raw):
    """A sweep spec (YAML; kept to small simulations): rows in a Parquet file pandas reads, or one
    line naming the spec, and no output file."""
    import pandas as pd

    with workdir() as d:
        path, out_path = d / "spec.yaml", d / "rows.parquet"
        if raw is not None:
            path.write_bytes(raw)
        else:
            if isinstance(spec, dict):
                spec = {**spec, "fixed": {**(spec.get("fixed") if isinstance(spec.get("fixed"), dict) else {}),
                                          "requests": 6, "prompt_len": 64, "output_len": 8}}  # fmt: skip
            path.write_text(yaml.safe_dump(spec))
        code, out, err = simulator_cli(["sweep", path, "--out", out_path, "--workers", "1"])
        event(f"exit {code}")
        check_answer(code, out, err, [str(path), "spec"], json_out=False, outputs=(out_path,))
        if code == 0:
            assert len(pd.read_parquet(out_path)) >= 1


@fuzz(25)
@given(data=ACCEPTANCE, raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_acceptance_files(data, raw):
    with workdir() as d:
        path = d / "acceptance.json"
        if raw is not None:
            path.write_bytes(raw)
        else:
            path.write_text(json.dumps(data))
        code, out, err = simulator_cli(["simulate", "--acceptance", path, "--requests", "4", "--no-interval", "--json"])
        check_answer(code, out, err, [str(path)])


# --- weights files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_blob():
    torch = pytest.importorskip("torch")
    from reference.model import WEIGHTS_DIR

    return torch.load(WEIGHTS_DIR / "draft.pt", weights_only=True)


@fuzz(15)
@given(data=st.data())
def test_weights_files(draft_blob, data):
    import torch

    spec, state = draft_blob["spec"], draft_blob["state_dict"]
    kind = data.draw(st.sampled_from(["bytes", "object", "spec", "state", "tensor"]))
    if kind == "bytes":
        blob = data.draw(st.binary(max_size=300))
    elif kind == "object":
        blob = data.draw(NASTY)
    elif kind == "spec":
        blob = {"spec": spec | data.draw(st.dictionaries(st.sampled_from(list(spec)), st.one_of(NASTY, st.integers(1, 2048)), min_size=1, max_size=2)),
                "state_dict": state}  # fmt: skip
    elif kind == "state":
        gone = data.draw(st.sets(st.sampled_from(sorted(state)), max_size=2))
        blob = {"spec": spec, "state_dict": {k: v for k, v in state.items() if k not in gone}}
    else:
        key = data.draw(st.sampled_from(sorted(state)))
        shape = data.draw(st.lists(st.integers(0, 4), max_size=3))
        fill = data.draw(st.sampled_from([0.0, float("nan"), float("inf"), 1.0]))
        blob = {"spec": spec, "state_dict": state | {key: torch.full(shape, fill)}}
    with workdir() as d:
        path = d / "draft.pt"
        if isinstance(blob, bytes):
            path.write_bytes(blob)
        else:
            torch.save(blob, path)
        code, out, err = reference_cli(["specdec", "--draft-model", path, "--max-new-tokens", "2", "--repeats", "1", "--prompt", "ab", "--json"])
        check_answer(code, out, err, [str(path)])


# --- data manifests and tables --------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    from gpu_tables import write_tables

    return write_tables(tmp_path_factory.mktemp("fuzz-data") / "data", rows=12, kinds=("gemm",), gpus={"a100": 1.0, "l40s": 1.08})


@fuzz(12)
@given(data=st.data())
def test_data_manifests_and_tables(data_folder, data):
    files = sorted(p.relative_to(data_folder) for p in data_folder.rglob("*.csv"))
    target = data.draw(st.sampled_from(files))
    command = data.draw(st.sampled_from(["validate", "fit-kernels"]))
    with workdir() as d:
        folder = d / "data"
        shutil.copytree(data_folder, folder)
        path = folder / target
        if data.draw(st.booleans()):
            path.write_bytes(data.draw(st.binary(max_size=120)))
        else:
            lines = path.read_text().splitlines()
            row = data.draw(st.integers(0, len(lines) - 1))
            cells = lines[row].split(",")
            col = data.draw(st.integers(0, len(cells) - 1))
            cells[col] = data.draw(st.one_of(NUMBERS.map(str), TEXT.filter(lambda t: "\n" not in t and "\r" not in t), st.just("")))
            lines[row] = ",".join(cells)
            path.write_text("\n".join(lines) + "\n")
        fit = d / "fit.json"
        argv = ["validate", "--data", folder, "--fit-rows", "10", "--json"] if command == "validate" else ["fit-kernels", "--data", folder, "--fit-rows", "10", "--out", fit]
        code, out, err = simulator_cli(argv)
        check_answer(code, out, err, [str(folder)], json_out=command == "validate", outputs=(fit,) if command == "fit-kernels" else ())


# --- numeric flags -------------------------------------------------------------------------------

PLAN_FLAGS = {"--alpha": FLAG_TEXT, "--gamma": small_ints(-2, 40), "--batch": small_ints(-2, 4096), "--prompt-len": small_ints(-2, 8192),
              "--output-len": small_ints(-2, 8192)}  # fmt: skip


@fuzz(40)
@given(flags=st.dictionaries(st.sampled_from(list(PLAN_FLAGS)), st.none(), min_size=1, max_size=2).flatmap(
    lambda chosen: st.fixed_dictionaries({f: PLAN_FLAGS[f] for f in chosen})))  # fmt: skip
def test_plan_flags(flags):
    code, out, err = simulator_cli(["plan", "--json", *(f"{f}={v}" for f, v in flags.items())])
    check_answer(code, out, err, [n for f in flags for n in flag_names(f)])


SIMULATE_FLAGS = {"--gamma": small_ints(-2, 12), "--alpha": FLAG_TEXT, "--rate": FLAG_TEXT, "--requests": sizes(-2, 12),
                  "--burstiness": FLAG_TEXT, "--prompt-len": small_ints(-2, 5000), "--output-len": sizes(-2, 300),
                  "--max-batch": small_ints(-2, 64), "--max-batched-tokens": small_ints(-2, 9000), "--spec-off-above-batch": small_ints(-2, 8),
                  "--slo-ttft": FLAG_TEXT, "--slo-tpot": FLAG_TEXT, "--tp": small_ints(-2, 16), "--seed": small_ints(-2, 2**40),
                  "--concurrency": small_ints(-2, 8), "--engine": st.sampled_from(["ideal", "vllm", "sglang", "trt", ""])}  # fmt: skip


@fuzz(40)
@given(flags=st.dictionaries(st.sampled_from(list(SIMULATE_FLAGS)), st.none(), min_size=1, max_size=2).flatmap(
    lambda chosen: st.fixed_dictionaries({f: SIMULATE_FLAGS[f] for f in chosen})), arrival=st.sampled_from(["poisson", "gamma"]))  # fmt: skip
def test_simulate_flags(flags, arrival):
    argv = {"--requests": "6", "--output-len": "64", **flags}
    code, out, err = simulator_cli(["simulate", "--no-interval", "--json", "--arrival", arrival, *(f"{f}={v}" for f, v in argv.items())])
    check_answer(code, out, err, [n for f in flags for n in flag_names(f)])


SPECDEC_FLAGS = {"--gamma": small_ints(-2, 6), "--temperature": FLAG_TEXT, "--top-k": small_ints(-2, 300), "--top-p": FLAG_TEXT,
                 "--max-new-tokens": sizes(-2, 6), "--batch": sizes(-2, 3), "--repeats": sizes(-2, 2),
                 "--seed": small_ints(-2, 2**40), "--threads": small_ints(-2, 2)}  # fmt: skip


@fuzz(10)
@given(flags=st.dictionaries(st.sampled_from(list(SPECDEC_FLAGS)), st.none(), min_size=1, max_size=2).flatmap(
    lambda chosen: st.fixed_dictionaries({f: SPECDEC_FLAGS[f] for f in chosen})))  # fmt: skip
def test_specdec_flags(flags):
    pytest.importorskip("torch")
    argv = {"--max-new-tokens": "3", "--repeats": "1", **flags}
    code, out, err = reference_cli(["specdec", "--json", "--prompt", "ab", *(f"{f}={v}" for f, v in argv.items())])
    check_answer(code, out, err, [n for f in flags for n in flag_names(f)] + ["top_k", "top_p", "temperature", "gamma"])


TREE_TEXT = st.one_of(st.sampled_from(["2x1", "3x2x1", "0x2", "[[0],[1],[0,0]]", "[[0,0]]", "[[1]]", "[]", "1x" * 40 + "1", "best:4"]), TEXT,
                      st.lists(st.lists(st.integers(-2, 4), max_size=3), max_size=3).map(json.dumps))  # fmt: skip
TREE_SPECDEC_FLAGS = {"--tree": TREE_TEXT, "--typical-eps": FLAG_TEXT, "--typical-delta": FLAG_TEXT, "--tv-samples": small_ints(-2, 3),
                      "--temperature": FLAG_TEXT, "--batch": sizes(-2, 2)}  # fmt: skip


@fuzz(10)
@given(flags=st.dictionaries(st.sampled_from(list(TREE_SPECDEC_FLAGS)), st.none(), min_size=1, max_size=2).flatmap(
    lambda chosen: st.fixed_dictionaries({f: TREE_SPECDEC_FLAGS[f] for f in chosen})),
    draft=st.sampled_from(["medusa", "tree"]), acceptance=st.sampled_from(["exact", "typical"]))  # fmt: skip
def test_specdec_tree_flags(flags, draft, acceptance):
    pytest.importorskip("torch")
    argv = {"--max-new-tokens": "3", "--repeats": "1", "--tree": "2x1", **flags}
    code, out, err = reference_cli(["specdec", "--json", "--prompt", "abc", "--draft", draft, "--acceptance", acceptance,
                                    *(f"{f}={v}" for f, v in argv.items())])  # fmt: skip
    event(f"exit {code}")
    check_answer(code, out, err, [n for f in flags for n in flag_names(f)] + ["tree", "typical", "temperature", "acceptance", "draft", "batch"])


ATTENTION_FLAGS = {"--batch": sizes(-1, 2), "--heads": sizes(-1, 2), "--seqlen": sizes(-1, 40), "--head-dim": sizes(-1, 16),
                   "--sram-bytes": small_ints(-1, 70000), "--block-rows": sizes(-1, 64), "--block-cols": sizes(-1, 64),
                   "--decode-queries": small_ints(-1, 40), "--splits": small_ints(-1, 8), "--repeats": sizes(-1, 2),
                   "--threads": small_ints(-1, 2), "--seed": small_ints(-1, 2**40)}  # fmt: skip


@fuzz(15)
@given(flags=st.dictionaries(st.sampled_from(list(ATTENTION_FLAGS)), st.none(), min_size=1, max_size=2).flatmap(
    lambda chosen: st.fixed_dictionaries({f: ATTENTION_FLAGS[f] for f in chosen})))  # fmt: skip
def test_attention_flags(flags):
    pytest.importorskip("torch")
    argv = {"--seqlen": "24", "--head-dim": "16", "--repeats": "1", "--dtype": "fp32", **flags}
    code, out, err = reference_cli(["attention", "--no-triton", "--no-backward", "--cpu", "--json", *(f"{f}={v}" for f, v in argv.items())])
    if code == 1:  # the comparison ran and reported a disagreement: a valid answer, not bad input
        strict_json(out)
        return
    check_answer(code, out, err, [n for f in flags for n in flag_names(f)] + ["Br", "Bc", "SRAM", "decode queries", "dimension", "repeats"])


def seam_cases():
    """(command line, flags to fuzz, module and function where its work starts)."""
    from reference import cli_attention, cli_drafts, device_check, draft_bench
    from simulator import calibration, capacity

    corpus = str(Path(__file__).resolve().parent / "conftest.py")  # a small text file: the datastore builds in milliseconds
    bench = ["--prompts", "--prompt-bytes", "--max-new-tokens", "--temperature", "--repeats", "--seed", "--threads"]

    search = ["plan", "--rate", "4", "--slo-ttft-p99", "2s", "--slo-tpot-p99", "50ms"]
    return {
        "calibrate": (["calibrate", "--quick", "--out", "{d}/profile.yaml"], ["--repeats", "--threads"], calibration, "measure_calibration_suite"),
        "compare": (["compare", "--gpu", "a100", "--quick", "--plot", "{d}/compare.png"], ["--repeats"], calibration, "_compare"),
        "device-check": (["device-check", "--out", "{d}/check"], ["--budget-s"], device_check, "device_check"),
        "plan search": (search, ["--rate", "--slo-ttft-p99", "--slo-tpot-p99", "--max-gpus", "--requests", "--seed", "--alpha",
                                 "--prompt-len", "--output-len"], capacity, "search"),
        "bench attention": (["bench", "attention", "--out", "{d}/bench.png"], ["--head-dim", "--sram-bytes", "--repeats", "--threads"],
                            cli_attention, "bench_attention"),
        "bild": (["bild", "--rates-out", "{d}/rates.json"], ["--fallback", "--rollback", "--grid", "--spec-gammas", *bench], draft_bench, "measure_policies"),
        "bench drafts": (["bench", "drafts", "--corpus", corpus, "--plot", "{d}/drafts.png"], ["--bild", "--gamma", *bench], cli_drafts, "measure_all"),
        "datastore": (["datastore", "--corpus", corpus, "--out", "{d}/ds.npz"], ["--gamma"], cli_drafts, "lookup_time_s"),
    }  # fmt: skip


@fuzz(40)
@given(data=st.data())
def test_flags_of_the_long_commands_up_to_their_work(data):
    pytest.importorskip("torch")
    cases = seam_cases()
    name = data.draw(st.sampled_from(sorted(cases)))
    argv, flags, module, work = cases[name]
    flag = data.draw(st.sampled_from(flags))
    value = data.draw(FLAG_TEXT)
    with workdir() as d, work_replaced(module, work):
        line = [a.format(d=d) for a in argv] + [f"{flag}={value}"]
        cli = simulator_cli if name in ("calibrate", "compare", "plan search") else reference_cli
        code, out, err = run_to_seam(cli, line)
        if code == "reached":
            return
        check_answer(code, out, err, flag_names(flag))
        assert code == 2  # nothing ran, so nothing could succeed
        assert not any(p.name.startswith(".") for p in d.rglob("*")), "a temporary file was left"


@fuzz(12)
@given(flag=st.sampled_from(["--few-shot", "--fit-rows"]), value=sizes(-2, 30))
def test_validate_flags(data_folder, flag, value):
    code, out, err = simulator_cli(["validate", "--data", data_folder, "--json", f"{flag}={value}"])
    check_answer(code, out, err, flag_names(flag))


def test_the_property_catches_what_it_should():
    """The checker itself: a traceback, two lines, an unnamed input and a stray file all fail it."""
    with pytest.raises(AssertionError):
        check_answer(1, "", "Traceback (most recent call last):\n", ["x"])
    with pytest.raises(AssertionError):
        check_answer(2, "", "error: x is bad\nerror: and more\n", ["x"])
    with pytest.raises(AssertionError):
        check_answer(2, "", "error: something is bad\n", ["--gamma"])
    with pytest.raises(AssertionError):
        check_answer(0, '{"a": NaN}', "", [])
    with workdir() as d:
        (d / ".out.tmp123.csv").write_text("half")
        with pytest.raises(AssertionError):
            check_answer(2, "", "error: --rate is bad\n", ["--rate"], outputs=(d / "out.csv",))
    check_answer(2, "", "sim 10%\r\rerror: --rate is bad\n", ["--rate"])
    assert math.isfinite(DEADLINE_S)
