"""calibrate -> compare round trip on the local CPU (a few shapes), and its error paths."""

from __future__ import annotations

import math

import pytest
import yaml

pytest.importorskip("torch")

from simulator import calibration  # noqa: E402
from simulator.__main__ import main  # noqa: E402
from simulator.hardware import load_profile  # noqa: E402


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "local.yaml"
    assert main(["calibrate", "--out", str(out), "--quick", "--repeats", "2"]) == 0
    return out


def test_calibrated_profile_loads_like_a_shipped_one(calibrated):
    hw = load_profile(str(calibrated))
    assert hw.kind == "cpu" and hw.calibration["date"] and hw.calibration["device"]
    assert 0 < hw.achievable.matmul <= 1 and hw.launch_overhead_s > 0 and hw.ops_per_kernel >= 1
    for group in hw.calibration["fit_residuals"].values():
        assert group["n"] >= 1 and math.isfinite(group["mape"])
    executor = hw.calibration["executor"]
    assert {"softmax_s_per_element", "op_s_hot", "op_s_cold", "loop_overhead_s", "fresh_fraction"} <= set(executor)
    assert executor["op_s_cold"] >= executor["op_s_hot"] > 0 and set(executor["sources"]) <= set(executor)
    assert executor["gemv_weight_bytes_per_s"] > 0 and executor["gemm_weight_bytes_per_s"] > 0  # the quick suite has both kinds
    assert 0.5 <= executor["pass_op_scale"] <= 2.0
    curve = hw.copy_bytes_per_s_by_size  # copies inside the caches and the large one, by bytes moved
    assert len(curve) >= 3 and max(curve) >= 2 * (256 << 20) and curve[max(curve)] == hw.hbm_bytes_per_s
    assert "speculative decoding" in hw.calibration["fit_residuals"] and "tree speculation" in hw.calibration["fit_residuals"]
    tree_loop = executor["loop_overhead_s"]["tree"]  # the quick suite runs one tree of each proposer
    assert set(tree_loop) == {"medusa", "tree"} and all(o["per_step"] >= 0 and o["per_verify_iteration"] == 0 for o in tree_loop.values())
    assert main(["plan", "--gpu", str(calibrated), "--model", "llama-68m", "--draft", "llama-68m", "--dtype", "fp32"]) == 0


def test_compare_reports_finite_errors_per_group(calibrated, capsys, tmp_path):
    capsys.readouterr()
    plot = tmp_path / "cmp.png"
    assert main(["compare", "--gpu", str(calibrated), "--quick", "--repeats", "2", "--json", "--plot", str(plot)]) == 0
    import json

    from reference.tree_decode import expected_tokens_per_step

    result = json.loads(capsys.readouterr().out)
    groups = {r["group"] for r in result["rows"]}
    assert {"attention", "forward (decode/verify)", "speculative decoding"} <= groups
    assert all(math.isfinite(r["error"]) and r["predicted_s"] > 0 and r["measured_s"] > 0 for r in result["rows"])
    assert set(result["groups"]) == groups and plot.stat().st_size > 10_000
    # the calibration's own decode passes, timed again, tell how far the host drifted since (not held-out rows)
    drift = result["drift"]
    assert drift["n"] == len(load_profile(str(calibrated)).calibration["reference_passes"]) >= 2
    assert 0 < drift["min_ratio"] <= drift["median_ratio"] <= drift["max_ratio"] < math.inf
    references = {(r["batch"], r["context"], r["query_tokens"]) for r in load_profile(str(calibrated)).calibration["reference_passes"]}
    held_out = [(c["batch"], c["context"], c["query_tokens"]) for c in (r["config"] for r in result["rows"]) if c.get("kind") == "forward"]
    assert held_out and not references & set(held_out)
    # tree speculation: Medusa and draft-model trees, tokens/s measured and predicted from the run's own acceptance
    trees = [r for r in result["rows"] if r["group"] == "tree speculation"]
    assert {r["config"]["draft"] for r in trees} == {"medusa", "tree"}
    for r in trees:
        t = r["tokens_per_s"]
        assert t["measured"] == pytest.approx(1 / r["measured_s"]) and t["predicted"] == pytest.approx(1 / r["predicted_s"])
        assert t["ratio"] == pytest.approx(t["measured"] / t["predicted"]) and r["speedup"]["predicted"] > 0
        # E[tokens per step] read through the contract is the executor's own formula on the run's table
        paths = [tuple(p) for p in r["paths"]]
        assert len(paths) == r["config"]["nodes"] and len(r["acceptance"]) == max(map(len, paths))
        assert r["expected_tokens_per_step"] == pytest.approx(expected_tokens_per_step(r["acceptance"], paths), rel=1e-12)
    text = calibration.format_compare(result)
    assert "tokens/s measured" in text and "medusa best:8" in text and "tree 2x1" in text


def test_compare_refuses_a_profile_of_another_device(calibrated, tmp_path, capsys):
    data = yaml.safe_load(calibrated.read_text())
    data["calibration"]["device"] = "Some Other CPU (64 threads)"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    assert main(["compare", "--gpu", str(other), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "Some Other CPU" in err and "this device is" in err and err.count("\n") == 1
    assert main(["compare", "--gpu", "a100", "--quick"]) == 2
    assert "not calibrated on a device" in capsys.readouterr().err


def test_unwritable_output_fails_before_measuring(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["calibrate", "--out", str(tmp_path / "a-file" / "p.yaml"), "--quick"]) == 2
    assert "cannot write this file" in capsys.readouterr().err
    assert main(["calibrate", "--out", str(tmp_path), "--quick"]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err


def test_interrupted_calibration_leaves_no_file(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "measure_calibration_suite", interrupted)
    out = tmp_path / "p.yaml"
    assert main(["calibrate", "--out", str(out), "--quick"]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "interrupted" in capsys.readouterr().err


def test_interrupt_while_writing_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration.yaml, "safe_dump", boom)
    with pytest.raises(KeyboardInterrupt):
        calibration.write_profile_atomically({"name": "x"}, tmp_path / "p.yaml")
    assert list(tmp_path.iterdir()) == []


# --- the held-out suite, the executor's kernels and loops, without measuring -------------------


def cpu_profile(**executor):
    """A100 numbers relabelled as a CPU (caches, per-op costs), with the given executor facts."""
    hw = load_profile("a100")
    return hw.model_copy(update={"kind": "cpu", "sram_bytes_per_sm": 2 << 20, "calibration": {"executor": executor}})


def test_calibration_and_held_out_suites_are_disjoint(monkeypatch):
    assert all(not overlap for overlap in calibration.held_out_overlap().values())
    monkeypatch.setattr(calibration, "COMPARE_ATTENTION", [*calibration.COMPARE_ATTENTION, calibration.CALIB_ATTENTION[0]])
    monkeypatch.setattr(calibration, "COMPARE_SPECDEC", {**calibration.COMPARE_SPECDEC, "gammas": [calibration.CALIB_SPECDEC["gammas"][0]]})
    monkeypatch.setattr(calibration, "COMPARE_TREES", {**calibration.COMPARE_TREES, "configs": [calibration.CALIB_TREES["configs"][1]]})
    overlap = calibration.held_out_overlap()
    assert overlap["attention"] == [calibration.CALIB_ATTENTION[0]] and overlap["speculative decoding (gamma)"]
    assert overlap["tree speculation (proposer, tree)"] == [calibration.CALIB_TREES["configs"][1][:2]]


def test_naive_attention_prices_every_pass_the_executor_makes():
    from simulator import attention as att
    from simulator import eager

    hw = cpu_profile()
    b, h, n, d, e = 2, 4, 256, 64, 4
    cost = eager.naive_attention_executor(b, h, n, n, d, hw, causal=True, dtype="fp32")
    thin, square, mask = e * b * h * n * d, e * b * h * n * n, n * n
    # Q scaled (r+w), QK^T (Q, K in, S out), mask built, masked_fill (S r+w, mask), softmax (S in, P out), PV (P, V in, O out)
    assert cost.hbm_bytes == 2 * thin + (2 * thin + square) + mask + (2 * square + mask) + 2 * square + (square + 2 * thin)
    assert cost.launches == 10 and cost.time_s > att.standard_attention(b, h, n, d, hw, True, "fp32").time_s
    # fresh pages: always from the largest mmap threshold up, the fitted fraction below it
    big_n = 2048  # S of 2 x 4 x 2048^2 fp32 = 128 MiB
    plain = eager.naive_attention_executor(b, h, big_n, big_n, d, hw, True, "fp32").time_s
    touched = eager.naive_attention_executor(b, h, big_n, big_n, d, cpu_profile(first_touch_bytes_per_s=4e9), True, "fp32").time_s
    assert touched - plain == pytest.approx(2 * e * b * h * big_n**2 / 4e9)
    small = [eager.naive_attention_executor(b, h, n, n, d, cpu_profile(first_touch_bytes_per_s=4e9, fresh_fraction=f), True, "fp32").time_s
             for f in (0.0, 0.5)]  # fmt: skip
    assert small[1] - small[0] == pytest.approx(0.5 * (2 * square + mask) / 4e9)  # S, P and the mask


def test_torch_cpu_flash_kernel_visits_whole_key_blocks():
    from simulator import eager

    assert eager.sdpa_cpu_blocks(256, 256, causal=True) == (64, 256 * 256)  # one key block: causality saves nothing
    # query blocks of 256; block m visits keys up to m + 256 rounded up to a block of 512
    visited = sum(min(2048, -(-(m + 256) // 512) * 512) for m in range(0, 2048, 256))
    assert eager.sdpa_cpu_blocks(2048, 2048, causal=True) == (256, 256 * visited) and visited == 10240
    assert eager.sdpa_cpu_blocks(2048, 2048, causal=False)[1] == 2048 * 2048


def test_forward_prices_measured_operators_colder_as_layers_fill_the_cache():
    from reference.train import DRAFT_SPEC, TARGET_SPEC  # target layers 3 MiB fp32, draft 1 MiB: around a 2 MiB L2
    from simulator.forward import forward

    def step_s(spec, **facts):
        return calibration.step_time_s(spec, cpu_profile(**facts), 1, 64, 1, "fp32")

    hot, cold = {"op_s_hot": 2e-6, "op_s_cold": 5e-6}, {"op_s_hot": 2e-6, "op_s_cold": 9e-6}
    for spec, evicted in ((TARGET_SPEC, 1.0), (DRAFT_SPEC, spec_layer_bytes(DRAFT_SPEC) / (2 << 20))):
        ops = cpu_profile().ops_per_kernel * forward(spec, cpu_profile(), 1, 64, 1, "fp32")["total"].launches
        assert step_s(spec, **cold) - step_s(spec, **hot) == pytest.approx(ops * evicted * 4e-6)
    assert 0 < spec_layer_bytes(DRAFT_SPEC) < 2 << 20 < spec_layer_bytes(TARGET_SPEC)


def test_pass_gemms_stream_weights_at_the_fitted_rate_of_their_kind():
    from reference.train import TARGET_SPEC
    from simulator.eager import pass_gemm
    from simulator.forward import forward
    from simulator.roofline import gemm

    gpu, plain = load_profile("a100"), cpu_profile(op_s_hot=2e-6, op_s_cold=2e-6)
    rated = cpu_profile(op_s_hot=2e-6, op_s_cold=2e-6, gemv_weight_bytes_per_s=2e10, gemm_weight_bytes_per_s=5e9)
    m, n, k = 3, 1536, 256
    assert pass_gemm(m, n, k, gpu, "fp32") == gemm(m, n, k, gpu, "fp32") and pass_gemm(m, n, k, plain, "fp32") == gemm(m, n, k, plain, "fp32")
    # one row and more rows differ only in the weights' rate: the rest is the CPU GEMM of roofline.gemm less its weight bytes
    weights_s = {1: 4 * n * k / 2e10, m: 4 * n * k / 5e9}
    for rows, w_s in weights_s.items():
        free = cpu_profile(gemv_weight_bytes_per_s=1e30, gemm_weight_bytes_per_s=1e30)
        assert pass_gemm(rows, n, k, rated, "fp32").time_s == pytest.approx(pass_gemm(rows, n, k, free, "fp32").time_s + w_s, rel=1e-12)
    # a forward pass adds exactly its weight GEMMs' bytes at the rate (the embedding is a lookup)
    for rows in (1, 4):
        ideal = cpu_profile(op_s_hot=2e-6, op_s_cold=2e-6, gemv_weight_bytes_per_s=1e30, gemm_weight_bytes_per_s=1e30)
        gemm_bytes = 4 * (TARGET_SPEC.n_params - TARGET_SPEC.vocab_size * TARGET_SPEC.d_model - (2 * TARGET_SPEC.n_layers + 1) * TARGET_SPEC.d_model)
        extra = forward(TARGET_SPEC, rated, 1, 64, rows, "fp32")["total"].time_s - forward(TARGET_SPEC, ideal, 1, 64, rows, "fp32")["total"].time_s
        assert extra == pytest.approx(gemm_bytes / (2e10 if rows == 1 else 5e9), rel=1e-9)


def test_fit_recovers_the_in_pass_weight_rates_from_passes_they_generated():
    from reference.train import DRAFT_SPEC, TARGET_SPEC

    truth = {"gemv_weight_bytes_per_s": 2.2e10, "gemm_weight_bytes_per_s": 8.5e9, "pass_op_scale": 0.8}
    facts = {"op_s_hot": 3e-6, "op_s_cold": 4e-6}
    known = cpu_profile(**facts, **truth)
    runs = [{"kind": "forward", "model": spec.model_dump(), "batch": b, "context": c, "query_tokens": q, "dtype": "fp32"}
            for spec in (TARGET_SPEC, DRAFT_SPEC) for b, c, q in calibration.CALIB_FORWARD]  # fmt: skip
    for m in runs:
        m["measured_s"] = calibration.predict_s(m, known)
    # the kernels' microbenchmarks fit the fractions first (stage 1): the calibration suite's, as `known` runs them
    kernels = [{"kind": "elementwise", "n": n, "dtype": "fp32"} for n in calibration.CALIB_ELEMENTWISE]
    kernels += [{"kind": "gemm", "m": m, "n": n, "k": k, "dtype": "fp32"} for m, n, k in calibration.CALIB_GEMMS]
    kernels += [{"kind": kind, "batch": b, "heads": h, "seqlen": n, "head_dim": d, "dtype": "fp32"}
                for b, h, n, d in calibration.CALIB_ATTENTION for kind in ("attention-naive", "attention-fused")]  # fmt: skip
    for m in kernels:
        m["measured_s"] = calibration.predict_s(m, known)
    fitted, fit = calibration.fit_profile(cpu_profile(**facts), kernels + runs)
    executor = fitted.calibration["executor"]
    assert {k: executor[k] for k in truth} == pytest.approx(truth, rel=0.02)
    assert fit["residuals"]["forward (decode/verify)"]["mape"] < 0.01


def test_cpu_memory_speed_follows_the_measured_copy_speeds_by_size():
    from simulator.roofline import memory_bytes_per_s

    curve = {2 << 20: 80e9, 8 << 20: 60e9, 32 << 20: 30e9, 512 << 20: 24e9}
    hw = cpu_profile().model_copy(update={"copy_bytes_per_s_by_size": curve})
    f = hw.achievable.bandwidth
    assert memory_bytes_per_s(hw, 100) == memory_bytes_per_s(hw, 2 << 20) == pytest.approx(80e9 * f)  # held below the first size
    assert memory_bytes_per_s(hw, 4 << 30) == pytest.approx(24e9 * f)  # and past the last
    assert memory_bytes_per_s(hw, 8 << 20) == pytest.approx(60e9 * f)
    assert memory_bytes_per_s(hw, 16 << 20) == pytest.approx(45e9 * f)  # halfway in log(size) between 8 and 32 MiB
    speeds = [memory_bytes_per_s(hw, n) for n in (1 << 20, 3 << 20, 5 << 20, 12 << 20, 24 << 20, 64 << 20, 1 << 30)]
    assert speeds == sorted(speeds, reverse=True)  # no faster for moving more
    # a GPU profile, or a CPU one without the curve, keeps the two-level model
    assert memory_bytes_per_s(cpu_profile(), 16 << 20) == memory_bytes_per_s(cpu_profile(), 1 << 20)


def spec_layer_bytes(spec) -> int:
    return 4 * spec.params_per_layer


def test_loop_overheads_are_recovered_from_runs_they_generated():
    from reference.train import DRAFT_SPEC, TARGET_SPEC
    from simulator.speculative import expected_tokens

    truth = {"per_token": 7e-5, "per_step": 3e-4, "per_draft_token": 5e-5}
    known = cpu_profile(loop_overhead_s=truth)
    pair = {"target": TARGET_SPEC.model_dump(), "draft": DRAFT_SPEC.model_dump(), "prompt": 32, "new_tokens": 96, "alpha": 0.7}
    runs = [{"kind": "specdec", "gamma": g, **pair, "tokens_per_step": expected_tokens(0.7, g)} for g in (3, 5, 6)]
    runs.append({"kind": "autoregressive", "gamma": 0, **pair})
    for m in runs:
        m["measured_s"] = calibration.predict_loop_s(m, known)
    fitted = calibration.fit_loop_overheads(cpu_profile(), runs)
    assert fitted == pytest.approx(truth, rel=1e-6)
    # and a prediction without them is faster: the overheads enter the held-out prediction
    assert calibration.predict_loop_s(runs[0], cpu_profile()) < runs[0]["measured_s"]


def test_measured_layer_op_rates_price_the_executor_prefill():
    """The per-element rates of the executor's slow operators add exactly their priced seconds to a
    prefill (scatter of K and V, SiLU, RMSNorm, the mask; RoPE no faster than its rate), and a
    profile without them prices none."""
    from simulator.forward import forward
    from simulator.models import ModelSpec

    spec = ModelSpec(name="t", d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=768, vocab_size=256,
                     max_seq_len=512, source="test")  # fmt: skip
    hw = cpu_profile()  # the executor's measured rates belong to the CPU eager device model
    rates = {"scatter_s_per_element": 1e-9, "silu_s_per_element": 2e-9, "rms_norm_s_per_element": 3e-9, "mask_s_per_element": 4e-9}
    priced = cpu_profile(**rates)
    t = 128
    base, with_rates = forward(spec, hw, 1, 0, t, "fp32"), forward(spec, priced, 1, 0, t, "fp32")
    extra = spec.n_layers * (2 * t * 128 * 1e-9 + t * 768 * 2e-9 + 2 * t * 256 * 3e-9) + t * t * 4e-9
    assert with_rates["total"].time_s - base["total"].time_s == pytest.approx(extra, rel=1e-9)
    assert with_rates["total"].launches == base["total"].launches
    slow_rope = cpu_profile(rope_s_per_element=1e-6)
    assert forward(spec, slow_rope, 1, 0, t, "fp32")["rope"].time_s == pytest.approx(
        spec.n_layers * (t * (256 + 128) // 2 * 1e-6 + hw.launch_overhead_s))


# ---- tree speculation: the prediction from stand-in measurements, and `reference specdec --profile` ----


def tree_run(draft: str, tree, accept, prompt: int = 64, new_tokens: int = 64, heads: int | None = None) -> dict:
    """A stand-in for `reference.microbench.tree_specdec`'s record of one run (times filled in by the caller)."""
    from reference.train import DRAFT_SPEC, TARGET_SPEC

    acceptance = {"kind": "tree_acceptance", "draft": draft, "target": TARGET_SPEC.name, "target_sha256": "0" * 64, "temperature": 0.0,
                  "accept": accept, "steps": 10, "tree": [list(p) for p in tree], "source": "a test"}  # fmt: skip
    return {"kind": "tree", "draft": draft, "tree": [list(p) for p in tree], "temperature": 0.0, "prompt": prompt, "new_tokens": new_tokens,
            "target": TARGET_SPEC.model_dump(), "draft_model": DRAFT_SPEC.model_dump() if draft == "tree" else None,
            "medusa_heads": heads, "tokens_per_step": 1.0, "steps": 10, "acceptance": acceptance, "measured_s": 1e-3, "autoregressive_s": 2e-3}  # fmt: skip


def test_tree_prediction_prices_the_verify_pass_the_heads_and_the_loop():
    """A Medusa chain of g nodes with every candidate accepted: per step the heads (one per depth, or
    as many as the file has), a target pass over g + 1 tokens and the calibrated per-step overhead;
    g + 1 tokens a step; the prefill twice. Mutants caught: pricing N instead of N + 1 query tokens,
    dropping the heads, the overhead, or the second prefill."""
    from reference.train import TARGET_SPEC
    from simulator import executor_loop
    from simulator import tree as trees
    from simulator.forward import step_time_s

    o_step = 4e-4
    hw = cpu_profile(loop_overhead_s={"per_step": o_step, "per_draft_token": 1e-4})
    g, n, prompt = 3, 60, 64
    chain = tuple((0,) * d for d in range(1, g + 1))
    m = tree_run("medusa", chain, [[1.0]] * g, prompt, n)
    p = calibration.predict_tree(m, hw)
    assert p["expected_tokens_per_step"] == g + 1
    ctx = prompt + n // 2
    heads_s = trees.medusa_heads_cost(TARGET_SPEC, hw, 1, g, "fp32").time_s
    step_s = heads_s + step_time_s(TARGET_SPEC, hw, 1, ctx, g + 1, "fp32") + o_step
    prefill_s = 2 * step_time_s(TARGET_SPEC, hw, 1, 0, prompt - 1, "fp32")
    assert p["predicted_s"] == pytest.approx((prefill_s + n / (g + 1) * step_s) / n, rel=1e-12)
    assert p["tokens_per_s"]["ratio"] == pytest.approx(p["predicted_s"] / m["measured_s"], rel=1e-12)
    ar_s = executor_loop.autoregressive_s_per_token(TARGET_SPEC, hw, prompt, n, "fp32")
    assert p["speedup"]["predicted"] == pytest.approx(ar_s / p["predicted_s"]) and p["speedup"]["measured"] == 2.0
    # five heads in the file cost five heads' GEMMs, not three
    more = calibration.predict_tree({**m, "medusa_heads": 5}, hw)["predicted_s"]
    extra = trees.medusa_heads_cost(TARGET_SPEC, hw, 1, 5, "fp32").time_s - heads_s
    assert more - p["predicted_s"] == pytest.approx(extra / (g + 1), rel=1e-9)


def test_tree_prediction_follows_the_measured_acceptance_and_the_draft_passes():
    """Higher acceptance in the run's table predicts more tokens/s; a draft-model tree pays one
    draft pass per level plus the calibrated overhead per drafted level."""
    from reference.train import DRAFT_SPEC
    from simulator import tree as trees

    hw = cpu_profile(loop_overhead_s={"per_step": 3e-4, "per_draft_token": 1e-4})
    tree = trees.full_tree((3, 2, 1))
    low = calibration.predict_tree(tree_run("tree", tree, [[0.3, 0.1, 0.05], [0.4, 0.1], [0.5]]), hw)
    high = calibration.predict_tree(tree_run("tree", tree, [[0.6, 0.2, 0.1], [0.7, 0.2], [0.8]]), hw)
    assert high["expected_tokens_per_step"] > low["expected_tokens_per_step"] and high["predicted_s"] < low["predicted_s"]
    e = low["expected_tokens_per_step"]
    none = calibration.predict_tree(tree_run("tree", tree, [[0.3, 0.1, 0.05], [0.4, 0.1], [0.5]]), cpu_profile(loop_overhead_s={"per_step": 3e-4}))
    assert (low["predicted_s"] - none["predicted_s"]) * 64 == pytest.approx(64 / e * 3 * 1e-4, rel=1e-9)  # D = 3 drafted levels
    assert trees.draft_tree_cost(DRAFT_SPEC, hw, 1, 96, tree, "fp32").time_s > 0


def test_tree_loop_overheads_are_recovered_from_runs_they_generated():
    """Runs priced with a known o_step + I o_iter per proposer (I the verifier's depth x widest
    fan-out) give that back; the prediction then uses it, not the linear loop's overheads (mutants
    caught: the per-iteration term left out, the proposers' terms swapped, the linear loop's
    overheads kept)."""
    from simulator import executor_loop
    from simulator import tree as trees

    assert [executor_loop.verify_iterations(trees.full_tree(b)) for b in ((2,), (2, 2, 1), (3, 2, 1), (1, 1, 1))] == [2, 6, 9, 3]
    assert executor_loop.verify_iterations([(0,), (1,), (2,), (0, 0), (0, 0, 0), (1, 0)]) == 9  # 3 deep, the root's 3 children widest
    truth = {"medusa": {"per_step": 2e-3, "per_verify_iteration": 1e-4}, "tree": {"per_step": 1e-3, "per_verify_iteration": 3e-4}}
    known = cpu_profile(loop_overhead_s={"per_step": 5e-4, "per_draft_token": 2e-4, "tree": truth})
    runs = []
    for g in (4, 16):  # Medusa chains, every candidate accepted: g + 1 tokens a step
        runs.append(tree_run("medusa", tuple((0,) * d for d in range(1, g + 1)), [[1.0]] * g, prompt=32, heads=4))
    for branching in ((2,), (2, 2, 1)):
        tree = trees.full_tree(branching)
        runs.append(tree_run("tree", tree, [[0.6, 0.3], [0.5, 0.2], [0.4]][: len(branching)], prompt=32))
    for m in runs:
        m["tokens_per_step"] = trees.expected_tokens(trees.check_tree(m["tree"]), trees.check_tree_acceptance(m["acceptance"], "a test"))
        m["measured_s"] = calibration.predict_tree(m, known)["predicted_s"]
    fitted = calibration.fit_tree_overheads(cpu_profile(), runs)
    assert fitted == {k: pytest.approx(v, rel=1e-6) for k, v in truth.items()}
    linear_only = cpu_profile(loop_overhead_s={"per_step": 5e-4, "per_draft_token": 2e-4})
    assert all(calibration.predict_tree(m, linear_only)["predicted_s"] != pytest.approx(m["measured_s"], rel=1e-3) for m in runs)


def test_tree_prediction_refuses_a_table_that_does_not_cover_the_tree():
    from simulator import tree as trees
    from simulator.errors import UserError

    m = tree_run("medusa", trees.full_tree((2, 1)), [[0.5, 0.2]])
    with pytest.raises(UserError, match="depth"):
        calibration.predict_tree(m, cpu_profile())


def test_specdec_prints_the_prediction_beside_the_measurement(calibrated):
    import json

    from cli_run import reference_cli

    quick = ["--max-new-tokens", "8", "--repeats", "1", "--threads", "1", "--device", "cpu"]
    code, out, err = reference_cli(["specdec", "--draft", "tree", "--tree", "2x1", "--profile", calibrated, "--json", *quick])
    assert code == 0, err
    r = json.loads(out)
    p = r["prediction"]
    assert p["profile"] == load_profile(str(calibrated)).name and p["tokens_per_s"] > 0 and p["speedup"] > 0
    assert p["measured_over_predicted"] == pytest.approx(r["tokens_per_s"] / p["tokens_per_s"], rel=1e-9)
    code, out, err = reference_cli(["specdec", "--draft", "medusa", "--tree", "[[0],[1]]", "--temperature", "0", "--profile", calibrated, *quick])
    assert code == 0, err
    assert "predicted " in out and "measured / predicted tokens/s" in out and "calibrated on" in out
    code, out, err = reference_cli(["specdec", "--draft", "tree", "--tree", "2", *quick])
    assert code == 0 and "predicted        none (give --profile" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--draft", "model", "--profile", "CALIBRATED"], "for tree drafts"),
        (["--draft", "tree", "--batch", "2", "--profile", "CALIBRATED"], "batch 1"),
        (["--draft", "tree", "--profile", "a100"], "not calibrated on a device (no `calibration.device`); `specdec --profile` needs"),
        (["--draft", "medusa", "--profile", "OTHER"], "this device is"),
    ],
)
def test_specdec_profile_bad_input_is_one_line(calibrated, tmp_path, argv, needle):
    from cli_run import reference_cli

    data = yaml.safe_load(calibrated.read_text())
    data["calibration"]["device"] = "Some Other CPU (64 threads)"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    argv = [{"CALIBRATED": calibrated, "OTHER": other}.get(a, a) for a in argv]
    code, out, err = reference_cli(["specdec", "--max-new-tokens", "4", "--repeats", "1", "--device", "cpu", *argv])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and not out, err
