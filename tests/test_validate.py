"""`simulator validate`: leave-one-GPU-out, in-GPU and naive splits per GPU and kind, their JSON,
plots and intervals; a held-out GPU's rows are never read by the fit that predicts them."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from gpu_tables import write_tables

from simulator.__main__ import main
from simulator.validate import DEFAULT_DATA_DIR, validate

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="shared GPU data not present beside the repository")
METRICS = {"n", "median_ape", "mape", "p90_ape"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tables(tmp_path_factory.mktemp("gpu") / "data", rows=40)


@pytest.fixture(scope="module")
def result(folder):
    return validate([folder], per_gpu=40, workers=1)


def test_every_gpu_and_kind_is_reported_in_every_split(result):
    gpus = {"A100-80GB-SXM", "L40S", "H100-SXM"}
    kinds = {"gemm:bf16", "decode-attention:fa2", "collective"}
    for split in ("leave_one_gpu_out", "in_gpu", "naive_roofline"):
        assert set(result[split]) == gpus
        for gpu in gpus:
            assert set(result[split][gpu]) == kinds
            for m in result[split][gpu].values():
                assert set(m) == METRICS and m["n"] > 0 and all(math.isfinite(m[k]) for k in METRICS)
    for gpu in gpus:
        assert set(result["interval_coverage"][gpu]) == kinds and all(0 <= c <= 1 for c in result["interval_coverage"][gpu].values())
    assert all(0 < v["low"] <= 1 <= v["high"] for v in result["intervals"].values())


def test_the_model_recovers_tables_it_generated(result):
    """Tables made by the model at its start parameters (times a factor per GPU, 3% noise): fitted
    on the other GPUs it predicts each within the factors' spread, far better than the naive roofline."""
    for gpu, kinds in result["leave_one_gpu_out"].items():
        assert kinds["decode-attention:fa2"]["mape"] < 15 < result["naive_roofline"][gpu]["decode-attention:fa2"]["mape"]


def test_a_held_out_gpus_rows_are_never_read(folder, tmp_path):
    """Poison every row of the held-out GPU: its leave-one-GPU-out predictions do not change."""
    first = validate([folder], holdout_gpus=["l40s"], per_gpu=40, workers=1, in_gpu=False)
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for path in folder.rglob("*.csv"):
        target = poisoned / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.read_csv(path)
        if path.name.startswith("l40s-"):
            frame["latency_ms"] *= 1000.0
        frame.to_csv(target, index=False)
    second = validate([poisoned], holdout_gpus=["l40s"], per_gpu=40, workers=1, in_gpu=False)
    for key, (pred, *_) in first["_logo"].items():
        assert np.array_equal(pred, second["_logo"][key][0])
    assert second["leave_one_gpu_out"]["L40S"]["gemm:bf16"]["mape"] > 90  # the poison is there, and scored


def test_fit_and_holdout_gpus_select_the_split(folder):
    out = validate([folder], fit_gpus=["a100"], holdout_gpus=["h100"], per_gpu=40, workers=1, in_gpu=False)
    assert set(out["leave_one_gpu_out"]) == {"H100-SXM"}
    from simulator.errors import UserError

    with pytest.raises(UserError, match="has no tables"):
        validate([folder], holdout_gpus=["b200"], per_gpu=40, workers=1)


def test_few_shot_scores_the_rest_of_the_gpu(folder):
    out = validate([folder], holdout_gpus=["l40s"], few_shot=5, per_gpu=40, workers=1)
    assert out["few_shot"]["k"] == 5
    assert out["few_shot"]["L40S"]["gemm:bf16"]["n"] == out["leave_one_gpu_out"]["L40S"]["gemm:bf16"]["n"] - 5


def test_a_kind_only_one_gpu_has_is_scored_in_gpu_and_not_left_one_out(tmp_path):
    """A GEMM dtype that one GPU of the data alone has (fp8 here, half of H100's rows): nothing to fit
    it on when that GPU is held out, so it has no leave-one-GPU-out entry, while its in-GPU split is
    scored; a quantized group's prediction without a fit of its own must not fail on the timers it
    lacks."""
    folder = write_tables(tmp_path / "data", rows=60, kinds=("gemm",))
    path = folder / "measured" / "h100-gemm.csv"
    frame = pd.read_csv(path)
    frame.loc[frame.index % 2 == 1, "gemm_dtype"] = "fp8"
    frame.to_csv(path, index=False)
    out = validate([folder], per_gpu=60, workers=1)
    assert "gemm:fp8" not in out["leave_one_gpu_out"].get("H100-SXM", {})
    assert out["in_gpu"]["H100-SXM"]["gemm:fp8"]["n"] > 0 and math.isfinite(out["in_gpu"]["H100-SXM"]["gemm:fp8"]["mape"])
    assert set(out["leave_one_gpu_out"]["L40S"]) == {"gemm:bf16"}


def test_a_gemm_dtype_the_gpu_has_no_peak_for_is_unsupported(tmp_path):
    """nvfp4 rows of L40S (no fp4 tensor cores in its profile): no rate to price them at, so they are
    counted under `unsupported` (gemm) and neither fitted nor scored; the GPU's other rows are."""
    from simulator import kernel_fit as kf
    from simulator.data import load_tables

    folder = write_tables(tmp_path / "data", rows=60, kinds=("gemm",))
    path = folder / "measured" / "l40s-gemm.csv"
    frame = pd.read_csv(path)
    frame.loc[frame.index < 10, "gemm_dtype"] = "nvfp4"
    frame.to_csv(path, index=False)
    tables = load_tables([folder])
    gemm = kf.group_rows(tables.kinds, kf.GROUPS["gemm:nvfp4"], tables.profiles)
    assert kf.unpriced(gemm, tables.profiles).sum() == 10
    out = validate([folder], per_gpu=60, workers=1)
    assert out["unsupported"] == {"L40S": {"gemm": 10}}
    assert "gemm:nvfp4" not in out["in_gpu"].get("L40S", {}) and out["in_gpu"]["L40S"]["gemm:bf16"]["n"] > 0


def test_workers_give_the_same_result(folder, result):
    parallel = validate([folder], per_gpu=40, workers=2)
    assert parallel["leave_one_gpu_out"] == result["leave_one_gpu_out"] and parallel["in_gpu"] == result["in_gpu"]


def test_validate_cli_json_and_plots(folder, tmp_path, capsys):
    code = main(["validate", "--data", str(folder), "--fit-rows", "40", "--json", "--plot-dir", str(tmp_path / "plots")])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0 and {"leave_one_gpu_out", "in_gpu", "naive_roofline", "interval_coverage", "targets"} <= set(out)
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["validate_collective.png", "validate_decode-attention_fa2.png", "validate_gemm_bf16.png"]
    assert all((tmp_path / "plots" / p).stat().st_size > 10_000 for p in plots)
    assert "validate:" in captured.err  # progress on stderr, the result alone on stdout


def test_fit_kernels_writes_a_fit_the_device_model_reads(folder, tmp_path, capsys):
    from simulator.gpu_model.model import GpuDeviceModel
    from simulator.gpu_model.params import load_fitted
    from simulator.hardware import load_profile

    path = tmp_path / "fit.json"
    assert main(["fit-kernels", "--data", str(folder), "--fit-rows", "40", "--out", str(path)]) == 0
    fitted = json.loads(path.read_text())
    assert {"created", "data", "groups", "intervals"} <= set(fitted) and fitted["data"][0]["manifest_sha256"]
    loaded = load_fitted(path)
    device = GpuDeviceModel.of(load_profile("a100"), loaded)
    cost = device.gemm(16, 4096, 4096, "bf16", "qkv")
    lo, hi = loaded["intervals"]["gemm:bf16"]["low"], loaded["intervals"]["gemm:bf16"]["high"]
    assert cost.low_s == pytest.approx(cost.time_s * lo) and cost.high_s == pytest.approx(cost.time_s * hi)


@needs_data
def test_the_shared_data_validates(capsys):
    """One held-out GPU of the shared data, small fits: every kind it has is reported, finite."""
    out = validate([DEFAULT_DATA_DIR], holdout_gpus=["l40s"], per_gpu=80, in_gpu=False)
    kinds = out["leave_one_gpu_out"]["L40S"]
    assert {"gemm:bf16", "gemm:fp8", "prefill-attention:fa2", "decode-attention:fa2", "collective"} <= set(kinds)
    assert all(math.isfinite(m["mape"]) for m in kinds.values())
    assert out["excluded"]["L40S"]["prefill-attention:flashinfer"] > 0  # FlashInfer fp8 prefill rows faster than physics


def test_a_hosts_timer_floor_is_its_own(tmp_path):
    """Each GPU's table was measured on its own host: a replay floor 2.5x the others' on one host is
    fitted as that host's (its rows predicted within the noise once a few of them are in the fit),
    while a GPU the fit never saw takes the common value."""
    from simulator import data
    from simulator import kernel_fit as kf

    folder = write_tables(tmp_path / "data", rows=60, kinds=("decode-attention",), floors={"a100": 40000.0})
    tables = data.load_tables([folder])
    group = kf.GROUPS["attention:fa2"]
    frame = kf.group_rows(tables.kinds, group, tables.profiles)
    fit = kf.fit_group(group, frame, tables.profiles)
    from simulator.hardware import load_profile

    floors = fit.timer_values(pd.DataFrame({"gpu": ["A100-80GB-SXM", "H100-SXM", "L40S", "B200"]}), {**tables.profiles, "B200": load_profile("b200")})["c_floor"]
    assert floors[0] == pytest.approx(40000.0, rel=0.1)
    assert floors[1] == pytest.approx(16000.0, rel=0.15)  # the tables' factor per GPU scales the floor too
    assert floors[2] == pytest.approx(16000.0 * 1.08, rel=0.15)
    assert floors[3] == fit.timer["c_floor"]  # never seen: the common value
    few = validate([folder], holdout_gpus=["a100"], few_shot=20, per_gpu=60, workers=1, in_gpu=True)
    kind = "decode-attention:fa2"
    assert few["few_shot"]["A100-80GB-SXM"][kind]["mape"] < 6 < few["leave_one_gpu_out"]["A100-80GB-SXM"][kind]["mape"]


def test_a_groups_held_parameters_stay_at_their_start(tmp_path):
    """A family parameter a group's rows never use (fp8's q_rate, nvfp4's bw_ew) is held at its start
    instead of fitted: a flat direction would only move the fit's path."""
    import dataclasses

    from simulator import data
    from simulator import kernel_fit as kf
    from simulator.gpu_model.params import family

    folder = write_tables(tmp_path / "data", rows=40, kinds=("collective",))
    tables = data.load_tables([folder])
    group = kf.GROUPS["collective"]
    frame = kf.group_rows(tables.kinds, group, tables.profiles)
    free = kf.fit_group(group, frame, tables.profiles)
    start = family("nccl")["c_steps"].start
    assert free.fitted.common["c_steps"] != pytest.approx(start, rel=1e-3)  # the rows do move it
    held = kf.fit_group(dataclasses.replace(group, held=("c_steps",)), frame, tables.profiles)
    assert held.fitted.common["c_steps"] == start


def test_a_group_fits_per_generation_the_family_parameters_it_marks(tmp_path, monkeypatch):
    """A group may fit a family parameter per generation that the family keeps common (FlashInfer's
    prefill its DRAM share, not its decode): each generation in the fit gets a deviation of it, under
    a prior of its own width (`GROUP_GENERATION_PRIOR`), a generation the fit never saw the common
    value; unmarked, it stays one common value."""
    import dataclasses

    from simulator import data
    from simulator import kernel_fit as kf
    from simulator.gpu_model.params import family

    assert kf.GROUPS["attention:flashinfer-prefill"].per_generation == ("f_bw",) and kf.GROUPS["attention:flashinfer-decode"].per_generation == ()
    assert not family("flashinfer")["f_bw"].per_generation
    folder = write_tables(tmp_path / "data", rows=40, kinds=("collective",))
    tables = data.load_tables([folder])
    group = kf.GROUPS["collective"]
    frame = kf.group_rows(tables.kinds, group, tables.profiles)
    plain = kf.fit_group(group, frame, tables.profiles)
    assert all("c_steps" not in d for d in plain.fitted.generation.values())
    marked = kf.fit_group(dataclasses.replace(group, per_generation=("c_steps",)), frame, tables.profiles)
    gens = set(frame["generation"])
    assert set(marked.fitted.generation) == gens and all("c_steps" in marked.fitted.generation[g] for g in gens)
    assert any(abs(marked.fitted.generation[g]["c_steps"]) > 1e-4 for g in gens)  # the rows move it
    assert marked.fitted.for_generation("cdna3")["c_steps"] == marked.fitted.common["c_steps"]
    monkeypatch.setattr(kf, "GROUP_GENERATION_PRIOR", 1e-4)  # a prior that pins it: every deviation ~0
    pinned = kf.fit_group(dataclasses.replace(group, per_generation=("c_steps",)), frame, tables.profiles)
    widest = max(abs(marked.fitted.generation[g]["c_steps"]) for g in gens)
    assert max(abs(pinned.fitted.generation[g]["c_steps"]) for g in gens) < 0.05 * widest


def test_a_pcie_hosts_topology_is_its_own_and_an_unmeasured_host_has_none(tmp_path):
    """The factors a PCIe ring pays for leaving a switch or a socket belong to the machine: fitted
    on a host that pays 0.3 for each, that GPU keeps them, while a PCIe GPU the fit never saw (RTX
    PRO 6000, another generation) takes 1, a ring at the link's rate, not the measured host's."""
    from simulator import data
    from simulator import kernel_fit as kf
    from simulator.hardware import load_profile

    folder = write_tables(tmp_path / "data", rows=80, kinds=("collective",), hosts={"l40s": {"eff_cross": 0.3, "eff_socket": 0.3}})
    tables = data.load_tables([folder])
    group = kf.GROUPS["collective"]
    frame = kf.group_rows(tables.kinds, group, tables.profiles)
    fit = kf.fit_group(group, frame, tables.profiles)
    assert fit.fitted.common["eff_cross"] == 1.0 and fit.fitted.common["eff_socket"] == 1.0
    l40s, unseen = (fit.fitted.for_generation(load_profile(name).generation) for name in ("l40s", "rtx-pro-6000"))
    assert l40s["eff_cross"] * l40s["eff_socket"] == pytest.approx(0.09, rel=0.25)
    assert unseen["eff_cross"] == 1.0 and unseen["eff_socket"] == 1.0
    rows = frame[frame["gpu"] == "L40S"]
    assert np.median(np.abs(np.log(kf.predict(group, fit, rows, tables.profiles) / rows["measured_s"].to_numpy()))) < 0.1


def test_a_parameter_declaration_keeps_its_invariants():
    """A host parameter's value on a measured machine is its per-generation deviation: one that
    is not per_generation would sit at its start everywhere; a start outside the bounds never fits."""
    from simulator.gpu_model.params import FAMILIES, Param

    assert all(p.per_generation for f in FAMILIES.values() for p in f.values() if p.host)
    with pytest.raises(ValueError, match="must also be per_generation"):
        Param("eff_x", "fraction", 1.0, 0.001, 1.0, "a host factor", per_generation=False, host=True)
    with pytest.raises(ValueError, match="outside"):
        Param("f_x", "fraction", 1.5, 0.0, 1.0, "a fraction")


def test_the_interval_is_symmetric_and_each_gpu_weighs_the_same():
    """exp(+-q), q the 80th percentile of |log ratio| with every GPU weighing the same: a GPU whose
    model ran 2x slow (log 2 on each row) makes the interval +-log 2 for the next one, whichever
    way it errs; a GPU with ten times the rows does not outweigh a GPU with few."""
    from simulator.validate import interval_bounds

    lo, hi = interval_bounds(np.full(50, math.log(2.0)), np.full(50, "A", dtype=object))
    assert (lo, hi) == pytest.approx((-math.log(2.0), math.log(2.0)))
    many = np.concatenate([np.zeros(1000), np.full(10, math.log(4.0))])
    gpus = np.array(["big"] * 1000 + ["small"] * 10, dtype=object)
    lo, hi = interval_bounds(many, gpus)
    assert hi == -lo and math.log(2.0) < hi <= math.log(4.0)  # pooled unweighted, the 80th percentile would be 0


def test_collective_intervals_are_per_link_kind(result):
    """NVLink and PCIe systems err differently: a collective's interval is its link kind's, from
    the GPUs of that kind, and a device model takes its own link kind's (pooled where none was fitted)."""
    from simulator.gpu_model.model import GpuDeviceModel
    from simulator.hardware import load_profile

    iv = result["intervals"]
    assert iv["collective:nvlink"]["gpus"] == ["A100-80GB-SXM", "H100-SXM"]
    assert iv["collective:pcie"]["gpus"] == ["L40S"]
    assert iv["collective"]["gpus"] == ["A100-80GB-SXM", "H100-SXM", "L40S"]
    assert "gemm:bf16:nvlink" not in iv and "gemm:bf16" in iv
    # L40S is its link kind's only GPU: its coverage is scored with the pooled interval
    assert set(result["interval_coverage"]["L40S"]) == {"gemm:bf16", "decode-attention:fa2", "collective"}
    fitted = {"families": {}, "intervals": {"collective": {"low": 0.5, "high": 2.0}, "collective:nvlink": {"low": 0.9, "high": 1.1},
                                             "collective:pcie": {"low": 0.4, "high": 3.0}}}  # fmt: skip
    assert GpuDeviceModel.of(load_profile("h100"), fitted).interval("collective") == (0.9, 1.1)
    assert GpuDeviceModel.of(load_profile("l40s"), fitted).interval("collective") == (0.4, 3.0)
    assert GpuDeviceModel.of(load_profile("mi300x"), fitted).interval("collective") == (0.5, 2.0)
    assert GpuDeviceModel.of(load_profile("h100"), fitted).interval("gemm:bf16") == (1.0, 1.0)


def test_operators_run_at_the_rates_their_efficiencies_were_fitted_over():
    """The operators' efficiencies are fitted over the FlashAttention-2 family's memory rates: a GPU
    whose attention runs FlashInfer (GB200) prices its norms with those same rates, not FlashInfer's."""
    from simulator.gpu_model import kernels
    from simulator.gpu_model.model import GpuDeviceModel
    from simulator.gpu_model.params import load_fitted
    from simulator.hardware import load_profile

    fitted = load_fitted()
    device = GpuDeviceModel.of(load_profile("gb200"), fitted)
    assert device.library() == "flashinfer"
    fa2 = {k: np.asarray([v]) for k, v in fitted["families"]["attention:fa2"].for_generation("blackwell").items()}
    eff = {"eff_norm": np.asarray([fitted["families"]["operators"].for_generation("blackwell")["eff_norm"]])}
    c_kernel = fitted["families"]["gemm:bf16"].for_generation("blackwell")["c_kernel"]
    tokens, width = 4096, 8192
    expected = kernels.operator_time(fa2, eff, c_kernel, device.dev, np.asarray(["norm"], dtype=object), np.asarray([tokens * width * 6.0]))[0]
    assert device.norm(tokens, width, "bf16").time_s == pytest.approx(expected, rel=1e-12)


def test_rows_of_a_dtype_or_library_the_model_does_not_price_are_counted_not_fatal(tmp_path):
    """A newer table may hold GEMM dtypes or attention kernels the model does not know: validate
    reads the rest, and counts those rows under `unsupported` (never fitted or scored)."""
    folder = write_tables(tmp_path / "data", rows=12, kinds=("gemm", "decode-attention"), gpus={"a100": 1.0, "l40s": 1.08})
    gemm = pd.read_csv(folder / "measured/a100-gemm.csv")
    gemm.loc[:2, "gemm_dtype"] = "int4_wo"
    gemm.to_csv(folder / "measured/a100-gemm.csv", index=False)
    attention = pd.read_csv(folder / "measured/l40s-decode-attention.csv")
    attention.loc[:1, "kernel_source"] = "vllm_triton_attn"
    attention.loc[2:4, "kv_cache_dtype"] = "nvfp4"
    attention.to_csv(folder / "measured/l40s-decode-attention.csv", index=False)
    out = validate([folder], per_gpu=12, workers=1)
    assert out["unsupported"] == {"A100-80GB-SXM": {"gemm": 3}, "L40S": {"decode-attention": 5}}
    assert out["leave_one_gpu_out"]["A100-80GB-SXM"]["gemm:bf16"]["n"] == 9
    assert out["in_gpu"]["L40S"]["decode-attention:fa2"]["n"] + 5 < 12  # the rest, less the calibration third
    from simulator.validate import format_validation

    assert "Not priced by the model" in format_validation(out) and "L40S decode-attention 5" in format_validation(out)


def test_a_prefill_row_much_faster_than_the_same_call_with_fewer_heads_is_implausible():
    """`fewer_heads_slower`: within one (GPU, library, KV dtype, batch, lengths, KV heads, head dim),
    a prefill row below 3/4 of the slowest row with fewer query heads is flagged; other groups,
    and decode rows, are left alone."""
    from simulator import kernel_fit as kf

    base = {"gpu": "L40S", "library": "flashinfer", "kv_bytes": 1.0, "b": 1.0, "n_q": 1024.0, "n_kv": 1024.0, "hk": 8.0, "d": 128.0}
    rows = [
        {**base, "kind": "prefill-attention", "h": 8.0, "measured_s": 1.0},
        {**base, "kind": "prefill-attention", "h": 32.0, "measured_s": 1.2},  # < 0.75 x 2.0 (h 16): flagged
        {**base, "kind": "prefill-attention", "h": 16.0, "measured_s": 2.0},
        {**base, "kind": "prefill-attention", "h": 64.0, "measured_s": 1.6},  # 0.75 x 2.0 = 1.5 <= 1.6: kept
        {**base, "kind": "prefill-attention", "b": 2.0, "h": 64.0, "measured_s": 0.1},  # its own group: nothing before it
        {**base, "kind": "decode-attention", "h": 64.0, "measured_s": 0.1},  # decode: exempt
    ]
    assert kf.fewer_heads_slower(pd.DataFrame(rows)).tolist() == [False, True, False, False, False, False]


def test_an_attention_row_faster_than_reading_its_cache_from_dram_is_implausible():
    """Every K and V row of the cache is read at least once: beyond what the L2 holds, that takes the
    bytes over the datasheet's DRAM bandwidth. A decode row below that is flagged, one above kept,
    and the floor doubles with the head dimension (the fp8 d = 256 decode rows on RTX PRO 6000
    that run as fast as d = 128)."""
    from simulator import kernel_fit as kf
    from simulator.hardware import load_profile

    l40s = load_profile("l40s")
    profiles = {l40s.name: l40s}
    base = {"gpu": l40s.name, "kind": "decode-attention", "library": "fa2", "kv_bytes": 2.0, "b": 64.0, "h": 32.0, "hk": 8.0,
            "n_q": 1.0, "n_kv": 8192.0, "d": 128.0}  # fmt: skip
    cache = 64 * 8 * 8192 * 128 * 2 * 2.0
    floor = (cache - l40s.l2_bytes) / l40s.hbm_bytes_per_s
    rows = [{**base, "measured_s": 0.9 * floor}, {**base, "measured_s": 1.1 * floor}, {**base, "d": 256.0, "measured_s": 1.1 * floor},
            {**base, "kv_bytes": 1.0, "measured_s": 0.9 * floor}]  # fmt: skip
    assert kf.implausible(pd.DataFrame(rows), profiles).tolist() == [True, False, True, False]


def test_a_table_whose_head_dimension_changes_nothing_is_implausible():
    """`head_dim_ignored`: a table's rows at head dimension 2d are flagged when the same calls at d
    take their median time (calls of at least 50 us); a table where doubling d costs 1.9x keeps its
    rows, and so does one whose only d / 2 twins are launch-bound."""
    from simulator import kernel_fit as kf

    rows = []
    for library, ratio, base_s in (("flashinfer", 1.0, 1e-4), ("fa2", 1.9, 1e-4), ("fa3", 1.0, 1e-6)):
        for b in (8.0, 16.0, 32.0):
            call = {"gpu": "RTX-PRO-6000-Blackwell-Server", "library": library, "kind": "decode-attention", "kv_bytes": 1.0, "b": b,
                    "h": 32.0, "hk": 8.0, "n_q": 1.0, "n_kv": 4096.0}  # fmt: skip
            rows += [{**call, "d": 128.0, "measured_s": base_s * b}, {**call, "d": 256.0, "measured_s": ratio * base_s * b}]
    flagged = kf.head_dim_ignored(pd.DataFrame(rows)).tolist()
    assert flagged == [False, True] * 3 + [False, False] * 3 + [False, False] * 3


def test_a_prefill_table_whose_calls_ignore_their_query_heads_loses_its_packed_rows():
    """`query_heads_ignored`: a prefill table whose calls take their median time at 2h query heads
    as at h (calls of at least 50 us) loses its rows with more query heads than KV heads and keeps
    those with one per KV head; a table where 2h costs 1.8x keeps every row, so does one whose only
    h / 2 twins are launch-bound, and decode rows are exempt (their time is their cache's bytes)."""
    from simulator import kernel_fit as kf

    rows = []
    for library, kind, ratio, base_s in (("flashinfer", "prefill-attention", 1.05, 1e-4), ("fa2", "prefill-attention", 1.8, 1e-4),
                                         ("fa3", "prefill-attention", 1.0, 1e-6), ("flashinfer", "decode-attention", 1.0, 1e-4)):  # fmt: skip
        for hk in (4.0, 8.0):
            call = {"gpu": "L40S", "library": library, "kind": kind, "kv_bytes": 1.0, "b": 4.0, "hk": hk, "d": 128.0,
                    "n_q": 1.0 if kind == "decode-attention" else 2048.0, "n_kv": 2048.0}  # fmt: skip
            rows += [{**call, "h": hk * g, "measured_s": base_s * hk * ratio ** np.log2(g)} for g in (1.0, 2.0, 4.0)]
    flagged = kf.query_heads_ignored(pd.DataFrame(rows)).tolist()
    assert flagged == [False, True, True] * 2 + [False, False, False] * 6


def test_a_host_timer_deviation_is_its_host_cpus_and_reaches_gpus_the_fit_never_saw():
    """`t_host_us` (the host's Python and launch work of an eager call) deviates per host CPU, so a
    GPU measured on an x86-64 server takes the x86-64 hosts' value; `c_floor` (a graph replay's
    floor, partly the GPU's front end) stays per GPU, and a GPU the fit never saw takes the common one."""
    from simulator import kernel_fit as kf
    from simulator.gpu_model.params import Fitted
    from simulator.hardware import load_profile

    profiles = {p.name: p for p in (load_profile(n) for n in ("h100", "gb300", "gb200", "rtx-pro-6000"))}
    fit = kf.GroupFit("gemm:fp8_block", Fitted("gemm_quantized", {}, {}), {"c_floor": 16000.0, "t_host_us": 200.0}, 0,
                      {"host:x86-64": {"t_host_us": -0.4}, "host:grace": {"t_host_us": 0.5}, "GB200": {"c_floor": 0.1}})  # fmt: skip
    frame = pd.DataFrame({"gpu": ["H100-SXM", "GB300", "GB200", "RTX-PRO-6000-Blackwell-Server"]})
    values = fit.timer_values(frame, profiles)
    assert values["t_host_us"] == pytest.approx(200.0 * np.exp([-0.4, 0.5, 0.5, -0.4]))
    assert values["c_floor"] == pytest.approx([16000.0, 16000.0, 16000.0 * math.exp(0.1), 16000.0])
    assert list(kf.timer_keys(frame, profiles, "t_host_us")) == ["host:x86-64", "host:grace", "host:grace", "host:x86-64"]


def test_a_frames_source_rows_are_its_own_and_grouped_once():
    """`kernel_fit.source_rows` groups a frame's rows by (framework, version) once per frame (a fit
    predicts one frame at every step); a frame made after another was dropped, even at its id,
    gets its own rows."""
    from simulator import kernel_fit as kf

    f = pd.DataFrame({"framework": ["vllm", "vllm", "x"], "version": ["0.14.0", "0.19.0", "0.14.0"]})
    rows = kf.source_rows(f)
    assert {k: list(v) for k, v in rows.items()} == {("vllm", "0.14.0"): [0], ("vllm", "0.19.0"): [1], ("x", "0.14.0"): [2]}
    assert kf.source_rows(f) is rows
    for i in range(50):
        g = pd.DataFrame({"framework": [f"engine-{i}"] * (i % 3 + 1)})  # no version column: ""
        assert {k: len(v) for k, v in kf.source_rows(g).items()} == {(f"engine-{i}", ""): i % 3 + 1}
        del g


def test_the_softmax_rate_is_told_only_by_prefill_kernels_that_overlap_it(tmp_path):
    """x_sfu (SFU-rate instructions per score) is fitted only where some prefill row's kernels overlap
    the softmax with the MMAs (TensorRT-LLM's context kernels on GB200, FlashInfer's FlashAttention-3
    kernels on Hopper over a bf16 cache): where a program does one after the other at one head
    dimension, it only scales the iteration as a lower f_cta does, and is held at its start (1, the
    exp2 alone). A fit holds what `unidentified` names."""
    import dataclasses

    import pandas as pd

    from simulator import data
    from simulator import kernel_fit as kf
    from simulator.gpu_model import kernels
    from simulator.gpu_model.device import Dev
    from simulator.gpu_model.params import Fitted, family
    from simulator.hardware import load_profile

    def frame(n_q, kv_bytes):
        return pd.DataFrame({"b": [4.0], "h": [32.0], "hk": [8.0], "d": [128.0], "n_q": [float(n_q)], "n_kv": [4096.0], "kv_bytes": [kv_bytes]})

    unidentified = kf.GROUPS["attention:flashinfer-prefill"].unidentified
    for gpu, n_q, kv_bytes, told in (("gb200", 4096, 1.0, True), ("gb200", 1, 1.0, False), ("l40s", 4096, 1.0, False),
                                     ("rtx-pro-6000", 4096, 1.0, False), ("h100", 4096, 2.0, True), ("h100", 4096, 1.0, False)):  # fmt: skip
        assert unidentified(frame(n_q, kv_bytes), Dev.of([load_profile(gpu)])) == (() if told else ("x_sfu",)), (gpu, n_q, kv_bytes)
    assert family("flashinfer")["x_sfu"].start == 1.0
    # priced: more SFU work per score slows a compute-bound prefill, overlapped or not
    for gpu in ("gb200", "l40s"):
        dev = Dev.of([load_profile(gpu)])
        P = Fitted.start("flashinfer").values(dev.generation)
        t = [kernels.attention_time({**P, "x_sfu": np.array([x])}, dev, "flashinfer", 1, 64, 64, 128, 8192, 8192, cache_write=False)[0] for x in (1.0, 3.0)]
        assert t[1] > t[0], gpu
    # and a fit holds what the group's `unidentified` names
    folder = write_tables(tmp_path / "data", rows=40, kinds=("collective",))
    tables = data.load_tables([folder])
    group = kf.GROUPS["collective"]
    rows = kf.group_rows(tables.kinds, group, tables.profiles)
    held = kf.fit_group(dataclasses.replace(group, unidentified=lambda f, d: ("c_steps",)), rows, tables.profiles)
    assert held.fitted.common["c_steps"] == family("nccl")["c_steps"].start


def test_a_gpu_without_flashattention_rows_reduces_its_splits_at_flashattentions_fitted_latency(tmp_path, monkeypatch):
    """TensorRT-LLM's multi-CTA reduction (FlashInfer's decode on datacenter Blackwell) is priced at
    the FlashAttention family's per-split latency (`kernel_fit.merge_latency`). A GPU with FlashInfer
    decode rows and no FlashAttention rows takes it from FlashAttention fitted on the other GPUs (a
    fit of that group leaving it out, which nothing reports), and its own rows never enter that fit."""
    from simulator import kernel_fit as kf

    fa = write_tables(tmp_path / "fa", rows=40, kinds=("decode-attention",), gpus={"a100": 1.0, "l40s": 1.08})
    fi = write_tables(tmp_path / "fi", rows=40, kinds=("decode-attention:flashinfer",), gpus={"gb200": 1.0, "b200": 1.05})
    seen = []
    real = kf.merge_latency

    def spy(dev, ctx):
        if "blackwell" in set(dev.generation):
            seen.append(ctx.get("attention:fa2"))
        return real(dev, ctx)

    monkeypatch.setattr(kf, "merge_latency", spy)
    out = validate([fa, fi], per_gpu=40, workers=1)
    for gpu in ("GB200", "B200"):
        assert set(out["leave_one_gpu_out"][gpu]) == set(out["in_gpu"][gpu]) == {"decode-attention:flashinfer"}  # the helper fits report nothing
    assert seen and any(fit is not None and fit.rows == 80 for fit in seen)  # FlashAttention on A100 and L40S, 40 rows each
    assert all(fit is None or fit.rows == 80 for fit in seen)
