"""The tiled reference moves exactly the HBM bytes the cost model predicts, and holds exactly the SRAM
working set the cost model sizes its tiles by, for hypothesis-generated shapes: N not a multiple of the
block, causal or not, d in 16..256, both loop orders, forward and backward; split-KV decode too."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.attention import Traffic, flash_attention, flash_decoding, naive_attention
from simulator.attention import (
    Tiles,
    flash_backward_hbm_bytes,
    flash_decoding_hbm_bytes,
    flash_hbm_bytes,
    flash_tiles,
    split_kv,
    standard_hbm_bytes,
)
from simulator.errors import UserError
from simulator.hardware import DTYPE_BYTES

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@st.composite
def shapes(draw):
    """d in 16..256; tiles from an SRAM size (as the cost model picks them) or explicit; N spanning a few
    K/V blocks and usually ending part-way through one. The pair count stays small so each example is fast."""
    d = draw(st.integers(16, 256))
    if draw(st.booleans()):
        smallest = Tiles(1, 1, 1, 0).working_set_elements(d)
        tiles = flash_tiles(d, draw(st.integers(smallest, 24_000)))
        br, bc = tiles.br, tiles.bc
    else:
        br, bc = draw(st.integers(1, 48)), draw(st.integers(1, 96))
    k_blocks = draw(st.integers(1, 4))
    n = (k_blocks - 1) * bc + draw(st.integers(1, bc))  # the last K block holds 1..Bc rows
    if math.ceil(n / br) * k_blocks > 400:
        n = min(n, 400 // k_blocks * br)
    return {
        "b": draw(st.integers(1, 2)),
        "h": draw(st.integers(1, 2)),
        "n": n,
        "d": d,
        "br": br,
        "bc": bc,
        "causal": draw(st.booleans()),
        "order": draw(st.sampled_from(["fa1", "fa2"])),
        "dtype": draw(st.sampled_from(list(TORCH_DTYPES))),
    }


def inputs(s, requires_grad=False):
    gen = torch.Generator().manual_seed(s["n"] * 1000 + s["d"])
    shape = (s["b"], s["h"], s["n"], s["d"])
    return [torch.randn(shape, generator=gen).to(TORCH_DTYPES[s["dtype"]]).requires_grad_(requires_grad) for _ in "qkv"]


@settings(max_examples=60, deadline=None)
@given(shapes())
def test_forward_and_backward_bytes_and_sram_equal_the_cost_model(s):
    q, k, v = inputs(s, requires_grad=True)
    fwd, bwd = Traffic(), Traffic()
    out = flash_attention(
        q, k, v, s["causal"], br=s["br"], bc=s["bc"], order=s["order"], traffic=fwd, backward_traffic=bwd
    )
    out.backward(torch.ones_like(out))
    programs = s["b"] * s["h"]
    args = (s["n"], s["d"], s["br"], s["bc"], s["causal"], s["dtype"], s["order"])
    predicted = flash_hbm_bytes(*args)
    assert fwd.hbm_read_bytes == programs * predicted["read"]
    assert fwd.hbm_written_bytes == programs * predicted["written"]
    predicted = flash_backward_hbm_bytes(*args)
    assert bwd.hbm_read_bytes == programs * predicted["read"]
    assert bwd.hbm_written_bytes == programs * predicted["written"]
    # One program holds K_j, V_j, Q_i, O_i, S_ij, l_i, m_i: Tiles.working_set_elements, blocks clipped to N.
    held = Tiles(min(s["br"], s["n"]), min(s["bc"], s["n"]), s["bc"], 0).working_set_elements(s["d"])
    assert fwd.sram_peak_elements == held
    if s["n"] >= max(s["br"], s["bc"]):
        assert fwd.sram_peak_elements == Tiles(s["br"], s["bc"], s["bc"], 0).working_set_elements(s["d"])


@settings(max_examples=30, deadline=None)
@given(d=st.integers(16, 256), sram_kib=st.integers(16, 228), extra=st.integers(1, 500), causal=st.booleans())
def test_tiles_from_an_sram_size_fill_it_exactly_as_the_cost_model_says(d, sram_kib, extra, causal):
    """Block sizes from `sram_bytes`: the working set held is flash_tiles(...).working_set_elements(d),
    which fits in the SRAM."""
    sram_bytes = sram_kib * 1024
    tiles = flash_tiles(d, sram_bytes // 2)
    n = tiles.bc + extra
    if math.ceil(n / tiles.br) * math.ceil(n / tiles.bc) > 300:
        n = tiles.bc + 1
    q, k, v = (torch.randn(1, 1, n, d).half() for _ in "qkv")
    traffic = Traffic()
    flash_attention(q, k, v, causal, sram_bytes=sram_bytes, traffic=traffic)
    assert traffic.sram_peak_elements == tiles.working_set_elements(d) <= tiles.sram_elements
    predicted = flash_hbm_bytes(n, d, tiles.br, tiles.bc, causal, "fp16", "fa2")
    assert (traffic.hbm_read_bytes, traffic.hbm_written_bytes) == (predicted["read"], predicted["written"])


@settings(max_examples=60, deadline=None)
@given(
    n_q=st.integers(1, 6),
    n_kv=st.integers(1, 600),
    d=st.integers(16, 256),
    bc=st.integers(1, 128),
    splits=st.integers(1, 16),
    causal=st.booleans(),
    dtype=st.sampled_from(list(TORCH_DTYPES)),
)
def test_split_kv_decode_bytes_equal_the_cost_model(n_q, n_kv, d, bc, splits, causal, dtype):
    if causal:
        n_q = min(n_q, n_kv)
    gen = torch.Generator().manual_seed(n_kv)
    q = torch.randn(2, 1, n_q, d, generator=gen).to(TORCH_DTYPES[dtype])
    k, v = (torch.randn(2, 1, n_kv, d, generator=gen).to(TORCH_DTYPES[dtype]) for _ in "kv")
    traffic = Traffic()
    flash_decoding(q, k, v, splits, bc=bc, causal=causal, traffic=traffic)
    predicted = flash_decoding_hbm_bytes(n_q, n_kv, d, bc, splits, dtype)
    assert traffic.hbm_read_bytes == 2 * predicted["read"]
    assert traffic.hbm_written_bytes == 2 * predicted["written"]


@settings(max_examples=200, deadline=None)
@given(n_kv=st.integers(1, 10_000), bc=st.integers(1, 512), splits=st.integers(1, 64))
def test_split_kv_covers_the_cache_with_no_empty_split(n_kv, bc, splits):
    used, keys_per_split = split_kv(n_kv, bc, splits)
    assert 1 <= used <= splits
    assert keys_per_split % bc == 0
    assert (used - 1) * keys_per_split < n_kv <= used * keys_per_split


def test_one_split_is_plain_flash_decoding_and_more_splits_cost_partials():
    one = flash_decoding_hbm_bytes(1, 4096, 128, 64, 1)
    four = flash_decoding_hbm_bytes(1, 4096, 128, 64, 4)
    e = DTYPE_BYTES["fp16"]
    assert one == {"read": e * (128 + 2 * 4096 * 128), "written": e * 128}
    partials = 4 * 4 * (128 + 1)  # fp32 O_s and LSE_s per split
    assert four["read"] - one["read"] == 3 * e * 128 + partials
    assert four["written"] - one["written"] == partials


@pytest.mark.parametrize("causal", [False, True])
def test_naive_counts_standard_attention_bytes(causal):
    q, k, v = (torch.randn(2, 3, 50, 32).half() for _ in "qkv")
    traffic = Traffic()
    naive_attention(q, k, v, causal, traffic=traffic)
    predicted = standard_hbm_bytes(50, 32, "fp16")
    assert (traffic.hbm_read_bytes, traffic.hbm_written_bytes) == (6 * predicted["read"], 6 * predicted["written"])


def test_backward_byte_count_rejects_an_unknown_order():
    with pytest.raises(UserError, match="loop order"):
        flash_backward_hbm_bytes(128, 64, 64, 64, False, "fp16", "fa3")


def test_flash_decoding_kernel_cost_counts_two_launches_only_when_split():
    from simulator.attention import flash_decoding
    from simulator.hardware import load_profile

    hw = load_profile("a100")
    split = flash_decoding(8, 32, 1, 8192, 128, hw, num_splits=8)
    whole = flash_decoding(8, 32, 1, 8192, 128, hw, num_splits=1)
    assert (split.launches, whole.launches) == (2, 1)
    assert split.flops == whole.flops == 4.0 * 8 * 32 * 8192 * 128
    assert split.hbm_bytes > whole.hbm_bytes
