"""Microbenchmarks of the local device, each measuring one thing the cost model prices.

Every function returns plain dicts: the configuration, the measured median seconds (of `repeats`
runs), and what the cost model needs to predict it (shape, dtype). `simulator.calibration` fits a
profile to them and predicts them back.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from reference.attention import naive_attention
from reference.model import Transformer
from reference.timing import measure
from simulator.models import ModelSpec

TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def local_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    """What this device is, as a person would recognise it: the GPU name or the CPU model and cores."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def cpu_facts() -> dict:
    """Cache sizes, memory and clock of the local CPU, read from the kernel; None where unreadable."""

    def cache_bytes(index: int) -> int | None:
        try:
            text = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read_text().strip()
        except OSError:
            return None
        scale = {"K": 1024, "M": 1024**2}.get(text[-1], 1)
        return int(text.rstrip("KM")) * scale

    def meminfo_bytes() -> int | None:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def clock_hz() -> float | None:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("cpu MHz"):
                    return float(line.split(":", 1)[1]) * 1e6
        except (OSError, ValueError):
            pass
        return None

    return {"l2_bytes_per_core": cache_bytes(2), "llc_bytes": cache_bytes(3), "memory_bytes": meminfo_bytes(),
            "clock_hz": clock_hz(), "threads": torch.get_num_threads(), "cpus": os.cpu_count()}  # fmt: skip


def count_ops(fn) -> int:
    """Operators `fn` dispatches to torch's kernels (views and copies included): what an eager
    executor pays a fixed per-op overhead for."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.ops


def gemm(shapes: list[tuple[int, int, int]], dtype: str, device: str, repeats: int) -> list[dict]:
    """[m, k] @ [k, n] for each shape."""
    out = []
    for m, n, k in shapes:
        a = torch.randn(m, k, dtype=TORCH_DTYPE[dtype], device=device)
        b = torch.randn(k, n, dtype=TORCH_DTYPE[dtype], device=device)
        t = measure(lambda a=a, b=b: a @ b, repeats)
        out.append({"kind": "gemm", "m": m, "n": n, "k": k, "dtype": dtype, "measured_s": t.median_s})
    return out


def elementwise(sizes: list[int], dtype: str, device: str, repeats: int) -> list[dict]:
    """out = x + y over n elements: two reads and one write per element."""
    out = []
    for n in sizes:
        x = torch.randn(n, dtype=TORCH_DTYPE[dtype], device=device)
        y = torch.randn(n, dtype=TORCH_DTYPE[dtype], device=device)
        z = torch.empty_like(x)
        t = measure(lambda x=x, y=y, z=z: torch.add(x, y, out=z), repeats)
        out.append({"kind": "elementwise", "n": n, "dtype": dtype, "measured_s": t.median_s})
    return out


def copy_bandwidth_bytes_per_s(n_bytes: int, device: str, repeats: int) -> float:
    """Bytes moved per second by a large copy (one read and one write of every byte)."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), repeats)
    return 2 * x.numel() * 4 / t.median_s


def attention(shapes: list[tuple[int, int, int, int]], dtype: str, device: str, repeats: int) -> list[dict]:
    """Naive attention (S and P materialised) and the fused kernel torch ships
    (scaled_dot_product_attention), causal, for each (B, H, N, d)."""
    out = []
    for b, h, n, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, dtype=TORCH_DTYPE[dtype], device=device) for _ in range(3))
        naive = measure(lambda q=q, k=k, v=v: naive_attention(q, k, v, causal=True), repeats)
        fused = measure(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
        shape = {"batch": b, "heads": h, "seqlen": n, "head_dim": d, "dtype": dtype}
        out.append({"kind": "attention-naive", **shape, "measured_s": naive.median_s})
        out.append({"kind": "attention-fused", **shape, "measured_s": fused.median_s})
    return out


@torch.inference_mode()
def forward_steps(spec: ModelSpec, configs: list[tuple[int, int, int]], dtype: str, device: str, repeats: int) -> list[dict]:
    """One forward pass of a randomly initialised `spec` for each (batch, context, query tokens):
    query tokens appended to a KV cache already holding `context` tokens per row."""
    torch.manual_seed(0)
    model = Transformer(spec).to(device=device, dtype=TORCH_DTYPE[dtype]).eval()
    out = []
    for batch, context, query in configs:
        cache = model.new_cache(batch, context + query)
        tokens = torch.randint(0, spec.vocab_size, (batch, query), device=device)

        def step(cache=cache, tokens=tokens, context=context):
            cache.lengths.fill_(context)
            model(tokens, cache)

        t = measure(step, repeats)
        out.append({"kind": "forward", "model": spec.model_dump(), "batch": batch, "context": context,
                    "query_tokens": query, "dtype": dtype, "measured_s": t.median_s, "ops": count_ops(step)})  # fmt: skip
    return out
