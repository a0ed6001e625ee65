"""Data folders read through their manifest: any GPU and kind, and every bad input one line naming
the file (and row), exit code 2, nothing written."""

from __future__ import annotations

import pandas as pd
import pytest
from gpu_tables import write_tables

from simulator.__main__ import main
from simulator.data import load_tables
from simulator.errors import UserError


@pytest.fixture()
def folder(tmp_path):
    return write_tables(tmp_path / "data", rows=12)


def test_every_listed_file_is_read_in_the_models_terms(folder):
    tables = load_tables([folder])
    assert set(tables.kinds) == {"gemm", "decode-attention", "collective"}
    assert tables.gpus() == ["A100-80GB-SXM", "H100-SXM", "L40S"]  # aliases resolved to profile names
    decode = tables.kinds["decode-attention"]
    raw = pd.read_csv(folder / "measured" / "a100-decode-attention.csv")
    mine = decode[decode["gpu"] == "A100-80GB-SXM"]
    assert list(mine["n_kv"]) == list(raw["step"]) and set(mine["n_q"]) == {1.0}  # a decode row's context is its step
    coll = tables.kinds["collective"]
    raw = pd.read_csv(folder / "measured" / "a100-collective.csv")
    assert list(coll[coll["gpu"] == "A100-80GB-SXM"]["bytes"]) == list(raw["message_size"] * 2)  # elements of half
    assert (tables.kinds["gemm"]["measured_s"] > 0).all() and set(tables.kinds["gemm"]["generation"]) == {"ampere", "ada", "hopper"}


def test_two_folders_are_read_together(tmp_path):
    a = write_tables(tmp_path / "a", rows=5, kinds=("gemm",), gpus={"a100": 1.0})
    b = write_tables(tmp_path / "b", rows=5, kinds=("gemm",), gpus={"l40s": 1.0})
    assert load_tables([a, b]).gpus() == ["A100-80GB-SXM", "L40S"]


def _refused(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    return err


def _edit_manifest(folder, **changes):
    m = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    for column, value in changes.items():
        m.loc[0, column] = value
    m.to_csv(folder / "manifest.csv", index=False)


def test_a_folder_without_a_manifest(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no manifest.csv" in _refused(["validate", "--data", str(tmp_path / "empty")], capsys)
    assert "no such data folder" in _refused(["validate", "--data", str(tmp_path / "nowhere")], capsys)


def test_a_manifest_row_naming_a_missing_file(folder, capsys):
    _edit_manifest(folder, file="measured/gone.csv")
    err = _refused(["validate", "--data", str(folder)], capsys)
    assert "manifest.csv: row 1" in err and "gone.csv" in err and "does not exist" in err


def test_a_table_of_an_unknown_gpu_is_left_out_named_with_the_closest_profiles(folder, capsys):
    """A manifest row whose GPU has no profile is not read, with its reason (row, name, closest
    profiles); the folder's other tables still are, and `validate` lists it. A folder with nothing
    else to read is refused with that reason."""
    from simulator.validate import format_validation

    _edit_manifest(folder, gpu="a100-80gb-sxn", device="NVIDIA A999")
    first = pd.read_csv(folder / "manifest.csv", dtype=str).loc[0]
    tables = load_tables([folder])
    [reason] = tables.not_read
    assert "row 1" in reason and "unknown GPU 'a100-80gb-sxn'" in reason and "a100" in reason.split("closest:")[1] and first["file"] in reason
    assert not tables.kinds[first["kind"]]["file"].str.endswith(first["file"]).any()
    files = {f for t in tables.kinds.values() for f in t["file"].unique()}
    assert len(files) == len(pd.read_csv(folder / "manifest.csv")) - 1  # every other table
    out = {"data": [str(folder)], "leave_one_gpu_out": {}, "in_gpu": {}, "naive_roofline": {}, "interval_coverage": {}, "targets": [],
           "not_read": tables.not_read}  # fmt: skip
    assert "Not read" in format_validation(out) and "a100-80gb-sxn" in format_validation(out)
    m = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    m["gpu"], m["device"] = "a999", ""
    m.to_csv(folder / "manifest.csv", index=False)
    err = _refused(["validate", "--data", str(folder)], capsys)
    assert "row 1" in err and "unknown GPU 'a999'" in err and "nothing else to read" in err


@pytest.mark.parametrize(("row", "gpu", "device", "profile"), [(0, "ampere_a100_80g", "NVIDIA A100-SXM4-80GB", "A100-80GB-SXM"),
                                                              (6, "hopper-h100", "NVIDIA H100 80GB HBM3", "H100-SXM")])
def test_a_gpu_id_the_project_does_not_know_resolves_through_the_driver_name(folder, row, gpu, device, profile):
    m = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    m.loc[row, ["gpu", "device"]] = [gpu, device]
    m.to_csv(folder / "manifest.csv", index=False)
    table = load_tables([folder]).kinds[m.loc[row, "kind"]]
    mine = table[table["file"].str.endswith(m.loc[row, "file"])]
    assert len(mine) and set(mine["gpu"]) == {profile}


def test_a_table_of_an_unknown_kind_is_left_out(folder):
    _edit_manifest(folder, kind="matmul")
    tables = load_tables([folder])
    [reason] = tables.not_read
    assert "row 1" in reason and "unknown kind 'matmul'" in reason and "gemm" in reason
    assert "matmul" not in tables.kinds and len(tables.kinds["gemm"])


def test_a_table_with_a_missing_column(folder, capsys):
    path = folder / "measured" / "a100-gemm.csv"
    pd.read_csv(path).drop(columns=["k"]).to_csv(path, index=False)
    err = _refused(["validate", "--data", str(folder)], capsys)
    assert str(path) in err and "'k'" in err


@pytest.mark.parametrize("bad", ["fast", "-0.5", "0", "inf", ""])
def test_a_latency_that_is_not_a_positive_number(folder, capsys, bad):
    path = folder / "measured" / "l40s-gemm.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[3, "latency_ms"] = bad
    frame.to_csv(path, index=False)
    err = _refused(["validate", "--data", str(folder)], capsys)
    assert str(path) in err and "row 4" in err and "latency_ms must be a positive number" in err


def test_bad_input_writes_nothing(folder, tmp_path, capsys):
    _edit_manifest(folder, file="measured/gone.csv")
    plots = tmp_path / "plots"
    _refused(["validate", "--data", str(folder), "--plot-dir", str(plots)], capsys)
    assert not any(plots.iterdir())  # checked for writability before the work, left empty
    out = tmp_path / "fit.json"
    _refused(["fit-kernels", "--data", str(folder), "--out", str(out)], capsys)
    assert not out.exists()


def test_per_row_gpus_resolve_through_the_file(tmp_path):
    folder = tmp_path / "pub"
    (folder / "published").mkdir(parents=True)
    pd.DataFrame([{"source": "s", "gpu": "a100-40gb-sxm", "kernel": "fa2", "pass": "fwd", "causal": 0, "batch": 1, "heads": 8,
                   "kv_heads": 8, "seqlen": 1024, "head_dim": 64, "dtype": "fp16", "metric": "ms", "value": 0.5}]).to_csv(
        folder / "published" / "p.csv", index=False)  # fmt: skip
    pd.DataFrame([{"file": "published/p.csv", "gpu": "(per row: see gpu column)", "kind": "published-attention"}]).to_csv(folder / "manifest.csv", index=False)
    assert load_tables([folder]).kinds["published-attention"]["gpu"].tolist() == ["A100-40GB-SXM"]
    with pytest.raises(UserError, match="unknown GPU 'a200'"):
        pd.DataFrame([{"file": "published/p.csv", "gpu": "(per row: see gpu column)", "kind": "published-attention"}]).to_csv(folder / "manifest.csv", index=False)
        frame = pd.read_csv(folder / "published" / "p.csv")
        frame["gpu"] = "a200"
        frame.to_csv(folder / "published" / "p.csv", index=False)
        load_tables([folder])


def test_dtype_and_library_names_read_in_any_case_and_vllms_fp8_spellings(folder):
    path = folder / "measured" / "l40s-decode-attention.csv"
    frame = pd.read_csv(path)
    frame["kv_cache_dtype"] = ["FP8_E4M3", "fp8_e5m2", "BFloat16"] * (len(frame) // 3) + ["fp8"] * (len(frame) % 3)
    frame["kernel_source"] = "VLLM_Flash_Attn"
    frame.to_csv(path, index=False)
    decode = load_tables([folder]).kinds["decode-attention"]
    mine = decode[decode["file"] == str(path)]
    assert list(mine["kv_bytes"][:3]) == [1.0, 1.0, 2.0] and set(mine["library"]) == {"fa2"}


def test_an_unknown_name_is_quoted_as_the_table_writes_it(folder, capsys):
    path = folder / "measured" / "a100-collective.csv"
    frame = pd.read_csv(path)
    frame.loc[2, "nccl_dtype"] = "Quarter"
    frame.to_csv(path, index=False)
    err = _refused(["validate", "--data", str(folder)], capsys)
    assert str(path) in err and "row 3" in err and "unknown nccl_dtype 'Quarter'" in err
