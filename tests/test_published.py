"""Published A100 attention rows: each priced with what its source states was run, host time per
timed call, and a fit that never sees its held-out points."""

from __future__ import annotations

import pytest

from simulator.data import load_tables
from simulator.validate import DEFAULT_DATA_DIR

needs_data = pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="shared GPU data not present beside the repository")


def published_points():
    from simulator.published import published_points as points

    return points(load_tables([DEFAULT_DATA_DIR], kinds=("published-attention",)).kinds["published-attention"])


@needs_data
def test_every_series_is_split_into_calibration_and_held_out_points():
    points = published_points()
    series: dict[tuple, list] = {}
    for p in points:
        series.setdefault((p.source, p.kernel, p.gpu), []).append(p)
        assert p.measured_s > 0
    for members in series.values():
        assert [p.calibration for p in members][:3] == [True, False, False][: len(members)]


@needs_data
def test_the_fit_never_sees_held_out_points():
    from simulator.hardware import load_profile
    from simulator.published import fit

    points = published_points()
    profiles = {name: load_profile(name) for name in {p.gpu for p in points}}
    first = fit(points, profiles)
    for p in points:
        if not p.calibration:
            p.measured_s *= 10.0  # held-out values changed wildly: the fit must not move
    second = fit(points, profiles)
    assert first["params"] == second["params"] and first["efficiency"] == second["efficiency"]
    assert first["calibration_points"] == sum(p.calibration for p in points) < len(points)


def test_efficiency_scales_the_fractions_that_bound_the_implementation():
    from simulator.hardware import load_profile
    from simulator.published import _with_efficiency

    hw = load_profile("a100")
    memory = _with_efficiency(hw, 0.5, "elementwise").achievable
    compute = _with_efficiency(hw, 0.5, "fa2").achievable
    assert memory.bandwidth == pytest.approx(hw.achievable.bandwidth / 2) and memory.attention == hw.achievable.attention
    assert compute.bandwidth == hw.achievable.bandwidth and compute.attention == pytest.approx(hw.achievable.attention / 2)
    assert _with_efficiency(hw, 3.0, "fa2").achievable.attention == 1.0  # never above peak


@needs_data
def test_each_source_gets_the_passes_and_kernels_it_states():
    from simulator import attention as att
    from simulator.hardware import load_profile
    from simulator.published import RELEASED_BLOCKS

    hw = load_profile("a100-40gb-sxm")
    points = published_points()
    fa1_paper = [p for p in points if p.source == "FlashAttention paper" and p.kernel == "pytorch fwd"]
    s = fa1_paper[0].shape
    stated = att.UnfusedPasses(mask="fill")  # App. E.5's padding mask; its dropout did not run as a pass (see below)
    assert fa1_paper[0].predict(hw) == att.standard_attention(s["batch"], s["heads"], s["seqlen"], s["head_dim"], hw, False, "fp16", stated).time_s
    decode = [p for p in points if p.kernel == "fa2 decode"]
    assert decode and all(p.implementation == "fa2" for p in decode)
    s = decode[0].shape
    a100 = load_profile("a100")
    blocks = RELEASED_BLOCKS[("fa2", "fwd", s["head_dim"])]  # FA2's forward kernel, as released
    assert decode[0].predict(a100) == att.flash_forward_decode(s["batch"], s["heads"], s["kv_heads"], 1, s["seqlen"], s["head_dim"], a100, "fp16", blocks).time_s


def test_the_40gb_card_holds_the_fa1_papers_pytorch_forward_at_8192_only_without_a_dropout_pass():
    from simulator import attention as att
    from simulator.hardware import load_profile

    memory = load_profile("a100-40gb-sxm").memory_bytes
    b, h, n = 16, 8, 8192  # Table 18's largest PyTorch forward
    assert att.unfused_forward_peak_bytes(b, h, n, passes=att.UnfusedPasses(mask="fill")) < memory
    assert att.unfused_forward_peak_bytes(b, h, n, passes=att.UnfusedPasses(mask="fill", dropout=True)) > memory


def test_a_timed_call_takes_the_longer_of_device_and_host_time():
    from simulator.hardware import load_profile
    from simulator.published import Point, predict_all

    hw = load_profile("a100")
    points = [Point("s", "k", "fa2", hw.name, {}, 1.0, lambda hw: 2e-4, host_ops=ops) for ops in (0, 10, 30)]
    t = predict_all(points, {hw.name: hw}, {}, host_op_s=1e-5)
    assert list(t) == pytest.approx([2e-4, 2e-4, 3e-4])


def test_host_ops_are_counted_per_pass_and_only_where_the_harness_is_known():
    from simulator.published import HOST_OPS, host_ops

    src = "FlashAttention-2 paper Fig.4 / flash-attention README"
    ops = HOST_OPS[(src, "pytorch")]
    assert host_ops(src, "pytorch", "fwd+bwd", False) == ops["fwd"] + ops["bwd"] + 2  # + randn_like and its kernel
    assert host_ops(src, "pytorch", "fwd", True) == ops["fwd"] + ops["causal"]
    assert host_ops("Flash-Decoding blog", "flash-decoding", "decode", False) == 0  # CUDA-graph replays: device time


def test_an_eager_baseline_costs_the_host_more_per_call_than_a_fused_kernel():
    """Each kernel a call launches counts as a host operator besides the call: the eager PyTorch
    forward of 2022 launches nine kernels from ten calls, FA1's forward one from nine."""
    from simulator.published import HOST_OPS

    paper = "FlashAttention paper"
    assert HOST_OPS[(paper, "pytorch")]["fwd"] == 10 + 9
    assert HOST_OPS[(paper, "fa1")]["fwd"] == 9 + 1


@needs_data
def test_fused_kernels_run_with_their_released_blocks():
    from simulator import attention as att
    from simulator.hardware import load_profile
    from simulator.published import RELEASED_BLOCKS

    a100 = load_profile("a100")
    points = published_points()
    fa2 = next(p for p in points if p.kernel == "fa2 fwd+bwd" and p.shape["head_dim"] == 128)
    s = fa2.shape
    args = (s["batch"], s["heads"], s["seqlen"], 128, a100, s["causal"], "fp16", "fa2")
    expected = att.flash_attention(*args, RELEASED_BLOCKS[("fa2", "fwd", 128)]).time_s
    expected += att.flash_attention_backward(*args, RELEASED_BLOCKS[("fa2", "bwd", 128)]).time_s
    assert fa2.predict(a100) == pytest.approx(expected)
    assert expected != att.flash_attention(*args).time_s + att.flash_attention_backward(*args).time_s  # not the paper's blocks


@needs_data
def test_the_blogs_pytorch_decode_copies_k_and_v_unless_one_sequence():
    """xFormers' benchmark permutes [B, N, H, d] K and V: torch.matmul copies them before its bmm
    when B > 1, so at equal tokens B = 2 costs far more than B = 1 (the blog: 3.2 ms against 1.3)."""
    from simulator.hardware import load_profile

    a100 = load_profile("a100")
    rows = {p.shape["batch"]: p for p in published_points() if p.kernel == "pytorch decode" and p.shape["seqlen"] <= 65536}
    assert rows[2].predict(a100) > 1.8 * rows[1].predict(a100)
