"""The Triton FlashAttention kernels (forward and backward) against fp64 naive attention, with flash-attention's
tolerance, on the CPU under TRITON_INTERPRET=1 (fp16 and fp32; the interpreter has no bfloat16).

Triton chooses interpreter or compiler when it decorates a function, and decorates its own library when
triton is first imported, so TRITON_INTERPRET=1 is set before that import; it is restored right after and
set again only while this module's tests run (Triton also reads it in imports it makes at a launch), so
other test modules see the environment they started with."""

from __future__ import annotations

import os

import pytest
import torch

_saved = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401

    from reference import triton_attention as kernels
except ImportError as exc:
    kernels, _why = None, str(exc)
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

pytestmark = pytest.mark.skipif(kernels is None, reason="triton is not importable")

from reference.attention import error_bound, flash_attention, naive_attention  # noqa: E402
from simulator.errors import UserError  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """The device the kernels run on; without CUDA, TRITON_INTERPRET=1 and one torch thread for the test."""
    if torch.cuda.is_available():
        yield "cuda"
        return
    assert kernels.INTERPRETED, "triton was imported before this module could set TRITON_INTERPRET=1"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield "cpu"
    torch.set_num_threads(saved)


def out_and_grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, d, block_m, block_n", [(77, 24, 16, 32), (64, 64, 32, 16)])
def test_forward_and_backward_within_flash_attention_tolerance(interpreter, dtype, causal, n, d, block_m, block_n):
    gen = torch.Generator().manual_seed(n + d)
    q, k, v, do = (torch.randn(1, 2, n, d, generator=gen).to(interpreter, dtype) for _ in range(4))

    def naive(*t):
        return naive_attention(*t, causal)

    def fused(*t):
        return kernels.triton_attention(*t, causal, block_m=block_m, block_n=block_n)

    ref, ref_grads = out_and_grads(naive, q.double(), k.double(), v.double(), do)
    same, same_grads = out_and_grads(naive, q, k, v, do)
    out, grads = out_and_grads(fused, q, k, v, do)
    assert out.dtype == dtype
    assert max_err(out, ref) <= error_bound(ref, same, dtype)
    for name, g, r, s in zip("qkv", grads, ref_grads, same_grads, strict=True):
        assert max_err(g, r) <= error_bound(r, s, dtype), f"d{name}"


def test_triton_matches_the_tiled_reference_in_fp32(interpreter):
    """Same FA2 loop order, same tiles: the two agree far below fp16 rounding."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 1, 50, 32, generator=gen).to(interpreter) for _ in "qkv")
    fused = kernels.triton_attention(q, k, v, True, block_m=16, block_n=16)
    tiled = flash_attention(q, k, v, True, br=16, bc=16)
    torch.testing.assert_close(fused, tiled, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_and_a_custom_scale(interpreter):
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=gen).to(interpreter).transpose(1, 2) for _ in "qkv")
    out = kernels.triton_attention(q, k, v, sm_scale=0.5, block_m=16, block_n=16)
    torch.testing.assert_close(out, naive_attention(q, k, v, sm_scale=0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"block_m": 8}, "power of two of at least 16"), ({"block_n": 48}, "power of two of at least 16")],
)
def test_bad_blocks_are_user_errors(interpreter, kwargs, message):
    q = torch.zeros(1, 1, 16, 16, device=interpreter)
    with pytest.raises(UserError, match=message):
        kernels.triton_attention(q, q, q, **kwargs)


def test_bfloat16_is_refused_by_the_interpreter_and_shapes_are_checked(interpreter):
    if kernels.INTERPRETED:
        q = torch.zeros(1, 1, 16, 16, dtype=torch.bfloat16)
        with pytest.raises(UserError, match="bfloat16"):
            kernels.triton_attention(q, q, q)
    q, k = torch.zeros(1, 1, 16, 16, device=interpreter), torch.zeros(1, 1, 16, 32, device=interpreter)
    with pytest.raises(UserError, match="head dimension"):
        kernels.triton_attention(q, k, k)


def test_triton_blocks_are_powers_of_two_within_the_cost_model_tiles():
    assert kernels.triton_blocks(64, 328, 64) == (64, 128)
    assert kernels.triton_blocks(64, 164, 128) == (64, 64)
    assert kernels.triton_blocks(18, 18, 64) == (16, 16)
    assert kernels.triton_blocks(5, 1000, 16) == (16, 128)
