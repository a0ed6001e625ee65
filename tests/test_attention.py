"""Tiled FlashAttention and split-KV decode in torch agree with naive attention, in flash-attention's style:
max error against an fp64 reference <= 2x (3x in fp32, see reference.attention.error_factor) the error of a
same-precision naive implementation plus a rounding floor, forward and dQ, dK, dV. Online softmax over any
split of a vector equals softmax."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.attention import (
    error_bound,
    flash_attention,
    flash_decoding,
    naive_attention,
    online_softmax,
)
from simulator.errors import UserError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def qkv(shape, dtype, seed=0, kv_len=None):
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    kv_shape = (b, h, kv_len or n, d)
    return (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(kv_shape, generator=gen).to(dtype),
        torch.randn(kv_shape, generator=gen).to(dtype),
    )


def out_and_grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("order", ["fa2", "fa1"])
def test_tiled_forward_and_gradients_within_flash_attention_tolerance(dtype, causal, order):
    q, k, v = qkv((2, 2, 113, 40), DTYPES[dtype], seed=hash((dtype, causal, order)) % 1000)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)

    def naive(*t):
        return naive_attention(*t, causal)

    def tiled(*t):
        return flash_attention(*t, causal, br=16, bc=48, order=order)  # N = 113: no block size divides it

    ref, ref_grads = out_and_grads(naive, q.double(), k.double(), v.double(), do)
    same, same_grads = out_and_grads(naive, q, k, v, do)
    out, grads = out_and_grads(tiled, q, k, v, do)
    assert out.dtype == q.dtype
    assert max_err(out, ref) <= error_bound(ref, same, q.dtype)
    for name, g, r, s in zip("qkv", grads, ref_grads, same_grads, strict=True):
        assert g.dtype == q.dtype
        assert max_err(g, r) <= error_bound(r, s, q.dtype), f"d{name}"


@pytest.mark.parametrize("order", ["fa2", "fa1"])
def test_block_sizes_from_sram_give_the_same_result_as_explicit_ones(order):
    q, k, v = qkv((1, 2, 200, 64), torch.float32)
    from simulator.attention import flash_tiles

    tiles = flash_tiles(64, 167936 // 4)
    by_sram = flash_attention(q, k, v, True, sram_bytes=167936, order=order)
    explicit = flash_attention(q, k, v, True, br=tiles.br, bc=tiles.bc, order=order)
    assert torch.equal(by_sram, explicit)


def test_fp64_tiled_matches_naive_to_rounding():
    q, k, v = qkv((1, 1, 70, 16), torch.float64)
    for causal in (False, True):
        for order in ("fa1", "fa2"):
            out = flash_attention(q, k, v, causal, br=8, bc=24, order=order)
            torch.testing.assert_close(out, naive_attention(q, k, v, causal), rtol=1e-12, atol=1e-12)


def test_softmax_statistics_are_fp32_and_backward_stores_no_n_by_n_tensor():
    """The autograd graph keeps q, k, v, O and [B, H, N] statistics only: nothing of size N x N."""
    n = 96
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, n, 16), torch.float16))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flash_attention(q, k, v, True, br=16, bc=32)
    assert all(t.numel() <= 2 * n * 16 for t in saved)
    stats = [t for t in saved if t.dim() == 3]
    assert stats and all(t.dtype == torch.float32 for t in stats)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("causal", [False, True])
def test_split_kv_decode_within_flash_attention_tolerance(dtype, causal):
    q, k, v = qkv((2, 3, 4, 64), DTYPES[dtype], seed=3, kv_len=333)
    ref = naive_attention(q.double(), k.double(), v.double(), causal)
    same = naive_attention(q, k, v, causal)
    for splits in (1, 2, 5, 64):
        out = flash_decoding(q, k, v, splits, bc=32, causal=causal)
        assert max_err(out, ref) <= error_bound(ref, same, q.dtype), splits


@settings(max_examples=40, deadline=None)
@given(
    n_q=st.integers(1, 5),
    n_kv=st.integers(5, 200),
    bc=st.integers(1, 64),
    splits=st.integers(1, 12),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_split_kv_decode_equals_naive_for_any_split(n_q, n_kv, bc, splits, causal, seed):
    """Merging partial results by logsumexp is exact: fp64 decode equals fp64 naive for every split."""
    q, k, v = qkv((1, 2, n_q, 8), torch.float64, seed=seed, kv_len=n_kv)
    out = flash_decoding(q, k, v, splits, bc=bc, causal=causal)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal), rtol=1e-10, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-80.0, 80.0, allow_nan=False), min_size=1, max_size=64).flatmap(
        lambda xs: st.tuples(
            st.just(xs), st.lists(st.integers(1, len(xs)), min_size=0, max_size=len(xs) - 1, unique=True)
        )
    )
)
def test_online_softmax_over_any_split_equals_softmax(case):
    values, cuts = case
    x = torch.tensor(values, dtype=torch.float64)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(values)), len(values)]
    sizes = [b - a for a, b in itertools.pairwise(bounds) if b > a]
    torch.testing.assert_close(online_softmax(x, sizes), torch.softmax(x, dim=-1), rtol=1e-12, atol=1e-300)


def test_online_softmax_rejects_a_split_that_does_not_cover_the_vector():
    with pytest.raises(UserError):
        online_softmax(torch.zeros(5), [2, 2])


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((1, 2, 8, 16), (1, 2, 9, 16), (1, 2, 9, 16)), "same sequence length"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 32)), "head dimension"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 7, 16)), "k and v"),
        (((1, 2, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), "batch and heads"),
        (((2, 8, 16), (2, 8, 16), (2, 8, 16)), "[batch, heads, seqlen, head_dim]"),
        (((1, 2, 0, 16), (1, 2, 0, 16), (1, 2, 0, 16)), "positive"),
    ],
)
def test_bad_shapes_are_one_line_user_errors(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        flash_attention(q, k, v, br=4, bc=4)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sram_bytes": 64}, "cannot hold one FlashAttention block"),
        ({"sram_bytes": 1}, "holds no element"),
        ({"br": 4}, "both Br and Bc"),
        ({"br": 0, "bc": 4}, "both Br and Bc"),
        ({}, "SRAM size"),
        ({"br": 4, "bc": 4, "order": "fa3"}, "loop order"),
    ],
)
def test_bad_tiles_are_user_errors(kwargs, message):
    q, k, v = qkv((1, 1, 8, 16), torch.float32)
    with pytest.raises(UserError, match=message):
        flash_attention(q, k, v, **kwargs)


def test_decode_rejects_bad_splits_and_more_causal_queries_than_keys():
    q, k, v = qkv((1, 1, 4, 16), torch.float32, kv_len=3)
    with pytest.raises(UserError, match="splits"):
        flash_decoding(q, k, v, 0, bc=4)
    with pytest.raises(UserError, match="no more queries"):
        flash_decoding(q, k, v, 2, bc=4, causal=True)
