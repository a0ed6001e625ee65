"""`python -m reference attention` and `python -m reference bench attention`.

`attention` runs naive attention, the tiled FlashAttention reference (FA1 and FA2 loop orders) and the
Triton kernel on the same inputs; checks each against an fp64 reference with flash-attention's tolerance
(2x the same-precision naive error, 3x in fp32, plus a rounding floor), forward and gradients; and prints
time, peak memory and the HBM bytes each tiled loop counted next to the cost model's prediction for the
same shape and SRAM size, plus split-KV decode. `bench attention` measures CPU time and peak memory of naive vs
tiled over N and fits the exponent of peak memory in N (2 for naive, 1 for tiled).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from reference.timing import check_seed, torch_threads
from simulator.attention import (
    Tiles,
    flash_backward_hbm_bytes,
    flash_decoding_hbm_bytes,
    flash_hbm_bytes,
    split_kv,
    standard_hbm_bytes,
)
from simulator.errors import UserError, finite_json
from simulator.hardware import load_profile
from simulator.paths import check_plot_path, write_atomically

DTYPES = ("fp16", "fp32", "bf16")
BENCH_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def peak_memory_bytes(fn, device: str = "cpu") -> int:
    """Largest number of bytes the tensor allocator held during `fn()` above what it held before.
    CUDA: the allocator's peak counter. CPU: the allocation and free events of torch's profiler, replayed."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base_bytes
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"),
        key=lambda e: e.start_ns(),
    )
    live_bytes = peak_bytes = 0
    for event in events:
        live_bytes += event.nbytes()
        peak_bytes = max(peak_bytes, live_bytes)
    return peak_bytes


def fit_exponent(xs, ys) -> float:
    """p in y ~ x^p, least squares in log-log."""
    slope, _ = np.polyfit(np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float)), 1)
    return float(slope)


def fit_growth_exponent(xs, ys) -> float:
    """p in y = a + b x^p, free of the constant a: for x growing by a fixed ratio r, consecutive differences
    are b x^p (r^p - 1), so p is the log-log slope of the differences against x."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    growth = np.diff(y)
    if len(x) < 3 or np.any(growth <= 0):
        raise UserError("the growth exponent needs at least three sequence lengths with strictly growing values")
    return fit_exponent(x[:-1], growth)


@contextmanager
def _triton_interpreter(device: str):
    """TRITON_INTERPRET=1 while Triton is imported and launched without CUDA: Triton reads it when it
    decorates functions (its own library when triton is first imported) and again in imports it makes lazily
    at a launch. The variable is restored afterwards."""
    saved = os.environ.get("TRITON_INTERPRET")
    if device != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _triton_module(device: str):
    """(reference.triton_attention, None) or (None, why Triton cannot run here)."""
    with _triton_interpreter(device):
        try:
            import reference.triton_attention as module
        except ImportError as exc:
            return None, f"triton is not importable ({exc})"
    if device != "cuda" and not module.INTERPRETED:
        return None, "no CUDA device, and triton was imported before TRITON_INTERPRET=1 could be set"
    return module, None


def make_inputs(batch: int, heads: int, seqlen: int, head_dim: int, dtype: str, seed: int, device: str = "cpu"):
    """q, k, v ~ N(0, 1) of shape [batch, heads, seqlen, head_dim]."""
    import torch

    if min(batch, heads, seqlen, head_dim) < 1:
        raise UserError(
            f"batch, heads, seqlen and head dim must be positive, got {batch}, {heads}, {seqlen}, {head_dim}"
        )
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, seqlen, head_dim)
    return tuple(torch.randn(shape, generator=gen).to(device=device, dtype=_torch_dtype(dtype)) for _ in range(3))


def load_inputs(path: str):
    """q, k, v from a torch file holding {'q': ..., 'k': ..., 'v': ...}."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as exc:  # torch raises several types for files it cannot unpickle
        raise UserError(f"{path}: not a torch file of tensors ({type(exc).__name__})") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(key), torch.Tensor) for key in "qkv"):
        raise UserError(f"{path}: expected a dict with tensors 'q', 'k', 'v'")
    return data["q"], data["k"], data["v"]


def _dtype_name(t) -> str:
    import torch

    names = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}
    if t.dtype not in names:
        raise UserError(f"inputs must be fp16, bf16 or fp32 for the cost model, got {t.dtype}")
    return names[t.dtype]


def _grads(fn, q, k, v, do):
    """O and (dQ, dK, dV) of fn(q, k, v) for the output gradient do."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def compare_attention(
    q,
    k,
    v,
    causal: bool = False,
    *,
    sram_bytes: int | None = None,
    br: int | None = None,
    bc: int | None = None,
    tiles_source: str = "",
    orders: tuple[str, ...] = ("fa2", "fa1"),
    decode_queries: int = 1,
    splits: int = 4,
    triton: bool = True,
    backward: bool = True,
    repeats: int = 3,
) -> dict:
    """Run every implementation on q, k, v; return errors, bounds, times, peak memory and HBM bytes counted
    vs predicted (whole tensors: B H times the per-head formulas)."""
    import torch

    from reference import attention as ref_attn
    from reference.timing import measure

    ref_attn.check_inputs(q, k, v, same_length=True)
    dtype = _dtype_name(q)
    b, h, n, d = q.shape
    device = q.device.type
    br, bc = ref_attn.block_sizes(d, q.element_size(), sram_bytes, br, bc)
    if decode_queries:
        if not 1 <= decode_queries <= n:
            raise UserError(f"decode queries must be in 1..{n} (the cached keys), got {decode_queries}")
        split_kv(n, bc, splits)  # a bad split count fails here, before any work
    triton_kernels = _triton_module(device) if triton else None  # before anything else imports triton
    programs = b * h
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(q.shape, generator=gen).to(q.device, q.dtype)

    def naive(q_, k_, v_):
        return ref_attn.naive_attention(q_, k_, v_, causal)

    ref_out, ref_grads = _grads(naive, q.double(), k.double(), v.double(), do)
    pt_out, pt_grads = _grads(naive, q, k, v, do)
    bound = ref_attn.error_bound(ref_out, pt_out, q.dtype)
    grad_bounds = [ref_attn.error_bound(r, p, q.dtype) for r, p in zip(ref_grads, pt_grads, strict=True)]

    def row(name, fn, counted=None, predicted=None):
        out, grads = _grads(fn, q, k, v, do) if backward else (fn(q, k, v).detach(), None)
        with torch.no_grad():
            fwd_s = measure(lambda: fn(q, k, v), repeats=repeats).median_s
        entry = {
            "impl": name,
            "fwd_ms": 1e3 * fwd_s,
            "peak_bytes": peak_memory_bytes(lambda: _no_grad(fn, q, k, v), device),
            **_accuracy(out, grads, ref_out, ref_grads, bound, grad_bounds),
        }
        if counted is not None:
            entry.update(_bytes(counted, predicted, programs))
        return entry

    rows = []
    counted = ref_attn.Traffic()
    ref_attn.naive_attention(q, k, v, causal, traffic=counted)
    rows.append(row("naive", naive, counted, standard_hbm_bytes(n, d, dtype)))
    rows[0]["agrees"] = True  # the same-precision baseline the bounds are built from
    backward_rows, sram_counted = [], {}
    for order in orders:

        def tiled(q_, k_, v_, order=order):
            return ref_attn.flash_attention(q_, k_, v_, causal, br=br, bc=bc, order=order)

        fwd, bwd = ref_attn.Traffic(), ref_attn.Traffic()
        ref_attn.flash_attention(
            *(t.detach().clone().requires_grad_() for t in (q, k, v)),
            causal, br=br, bc=bc, order=order, traffic=fwd, backward_traffic=bwd,
        ).backward(do)  # fmt: skip
        rows.append(row(f"tiled-{order}", tiled, fwd, flash_hbm_bytes(n, d, br, bc, causal, dtype, order)))
        if backward:
            predicted = flash_backward_hbm_bytes(n, d, br, bc, causal, dtype, order)
            backward_rows.append({"impl": f"tiled-{order} backward", **_bytes(bwd, predicted, programs)})
        sram_counted[order] = fwd.sram_peak_elements
    clipped = Tiles(br=min(br, n), bc=min(bc, n), bc_paper=bc, sram_elements=0)  # blocks no longer than N
    sram = {"counted_elements": sram_counted, "predicted_elements": clipped.working_set_elements(d)}
    sram["match"] = all(c == sram["predicted_elements"] for c in sram_counted.values())
    if triton:
        with _triton_interpreter(device):
            rows.append(
                _triton_row(
                    triton_kernels, q, k, v, causal, br, bc, ref_out, ref_grads, bound, grad_bounds, do, backward
                )
            )
    decode = _decode(q, k, v, causal, bc, dtype, decode_queries, splits) if decode_queries else None
    ok = all(r["agrees"] and r.get("bytes_match", True) for r in rows)
    ok = ok and all(r["bytes_match"] for r in backward_rows) and sram["match"]
    ok = ok and (decode is None or (decode["agrees"] and decode["bytes_match"]))
    return {
        "shape": {"batch": b, "heads": h, "seqlen": n, "head_dim": d, "causal": causal, "dtype": dtype},
        "device": device,
        "tiles": {"br": br, "bc": bc, "source": tiles_source or f"explicit Br={br}, Bc={bc}"},
        "sram_working_set": sram,
        "forward": rows,
        "backward": backward_rows,
        "decode": decode,
        "ok": ok,
    }


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


def _bytes(counted, predicted: dict, programs: int) -> dict:
    entry = {
        "hbm_read_bytes": counted.hbm_read_bytes,
        "hbm_written_bytes": counted.hbm_written_bytes,
        "predicted_read_bytes": programs * predicted["read"],
        "predicted_written_bytes": programs * predicted["written"],
    }
    entry["bytes_match"] = (
        entry["hbm_read_bytes"] == entry["predicted_read_bytes"]
        and entry["hbm_written_bytes"] == entry["predicted_written_bytes"]
    )
    return entry


def _accuracy(out, grads, ref_out, ref_grads, bound, grad_bounds) -> dict:
    """max_err and bound of the output against the fp64 reference, the worst gradient error over
    its bound when `grads` were computed, and whether all are within their bounds."""
    acc = {"max_err": (out.double() - ref_out).abs().max().item(), "bound": bound}
    acc["agrees"] = acc["max_err"] <= bound
    if grads is not None:
        errs = [(g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads, strict=True)]
        acc["grad_err_over_bound"] = max(e / gb for e, gb in zip(errs, grad_bounds, strict=True))
        acc["agrees"] = acc["agrees"] and acc["grad_err_over_bound"] <= 1.0
    return acc


def _triton_row(kernels, q, k, v, causal, br, bc, ref_out, ref_grads, bound, grad_bounds, do, backward) -> dict:
    import torch

    from reference.timing import measure

    module, why = kernels
    if module is None or (module.INTERPRETED and q.dtype == torch.bfloat16):
        return {"impl": "triton", "skipped": why or "Triton's interpreter has no bfloat16", "agrees": True}
    n, d = q.shape[2], q.shape[3]
    block_m, block_n = module.triton_blocks(br, bc, d)
    name = f"triton {block_m}x{block_n}" + (" (interpreted)" if module.INTERPRETED else "")

    def fn(q_, k_, v_):
        return module.triton_attention(q_, k_, v_, causal, block_m=block_m, block_n=block_n)

    out, grads = _grads(fn, q, k, v, do) if backward else (_no_grad(fn, q, k, v), None)
    entry = {
        "impl": name,
        "fwd_ms": 1e3 * measure(lambda: _no_grad(fn, q, k, v), repeats=1, warmup=0).median_s,
        "peak_bytes": peak_memory_bytes(lambda: _no_grad(fn, q, k, v), "cuda") if q.is_cuda else None,
        **_accuracy(out, grads, ref_out, ref_grads, bound, grad_bounds),
    }
    predicted = flash_hbm_bytes(n, d, block_m, block_n, causal, _dtype_name(q), "fa2")
    programs = q.shape[0] * q.shape[1]
    entry["predicted_read_bytes"] = programs * predicted["read"]
    entry["predicted_written_bytes"] = programs * predicted["written"]
    return entry


def _decode(q, k, v, causal, bc, dtype, decode_queries, splits) -> dict:
    """The last `decode_queries` rows of q against the whole K/V cache, split-KV, vs naive."""
    from reference import attention as ref_attn

    n_kv = k.shape[2]
    q_dec = q[:, :, n_kv - decode_queries :]
    traffic = ref_attn.Traffic()
    out = ref_attn.flash_decoding(q_dec, k, v, splits, bc=bc, causal=causal, traffic=traffic)
    ref = ref_attn.naive_attention(q_dec.double(), k.double(), v.double(), causal)
    pt = ref_attn.naive_attention(q_dec, k, v, causal)
    bound = ref_attn.error_bound(ref, pt, q.dtype)
    predicted = flash_decoding_hbm_bytes(decode_queries, n_kv, q.shape[3], bc, splits, dtype)
    splits_used, keys_per_split = split_kv(n_kv, bc, splits)
    entry = {"queries": decode_queries, "kv_seqlen": n_kv, "splits_requested": splits, "splits": splits_used}
    entry.update(keys_per_split=keys_per_split, bc=bc)
    entry.update(max_err=(out.double() - ref).abs().max().item(), bound=bound)
    entry["agrees"] = entry["max_err"] <= bound
    entry.update(_bytes(traffic, predicted, q.shape[0] * q.shape[1]))
    return entry


def format_comparison(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"attention B={s['batch']} H={s['heads']} N={s['seqlen']} d={s['head_dim']} {s['dtype']} "
        f"causal={s['causal']} on {result['device']}; tiles Br={result['tiles']['br']} Bc={result['tiles']['bc']} "
        f"({result['tiles']['source']})",
        f"{'impl':<30}{'fwd ms':>9}{'peak MiB':>10}{'max err':>11}{'bound':>11}{'grad err/bnd':>13}  "
        f"{'HBM read B':>13}{'predicted':>13}{'written B':>13}{'predicted':>13}  ok",
    ]
    for r in result["forward"] + result["backward"]:
        if "skipped" in r:
            lines.append(f"{r['impl']:<30}skipped: {r['skipped']}")
            continue
        peak = f"{r['peak_bytes'] / 2**20:10.2f}" if r.get("peak_bytes") is not None else f"{'-':>10}"
        timing = f"{r['fwd_ms']:9.2f}{peak}" if "fwd_ms" in r else f"{'':>19}"
        errors = f"{r['max_err']:11.2e}{r['bound']:11.2e}" if "max_err" in r else f"{'':>22}"
        grad = f"{r['grad_err_over_bound']:13.2f}" if "grad_err_over_bound" in r else f"{'':>13}"
        counted_r = r.get("hbm_read_bytes", "n/a")
        counted_w = r.get("hbm_written_bytes", "n/a")
        ok = r.get("agrees", True) and r.get("bytes_match", True)
        lines.append(
            f"{r['impl']:<30}{timing}{errors}{grad}  {counted_r:>13}{r['predicted_read_bytes']:>13}"
            f"{counted_w:>13}{r['predicted_written_bytes']:>13}  {'yes' if ok else 'NO'}"
        )
    sram = result["sram_working_set"]
    lines.append(
        f"SRAM working set per program (elements): counted "
        f"{', '.join(f'{o} {c}' for o, c in sram['counted_elements'].items())}; "
        f"Tiles.working_set_elements {sram['predicted_elements']}  {'yes' if sram['match'] else 'NO'}"
    )
    dec = result["decode"]
    if dec is not None:
        lines.append(
            f"split-KV decode: {dec['queries']} quer{'y' if dec['queries'] == 1 else 'ies'} x {dec['kv_seqlen']} keys, "
            f"{dec['splits']} split{'s' if dec['splits'] != 1 else ''} of {dec['keys_per_split']} keys (Bc={dec['bc']}): max err {dec['max_err']:.2e} (bound {dec['bound']:.2e}); "
            f"HBM read {dec['hbm_read_bytes']} (predicted {dec['predicted_read_bytes']}), "
            f"written {dec['hbm_written_bytes']} (predicted {dec['predicted_written_bytes']})  "
            f"{'yes' if dec['agrees'] and dec['bytes_match'] else 'NO'}"
        )
    lines.append("all implementations agree and every byte count matches the cost model" if result["ok"] else "FAILED")
    return "\n".join(lines)


def bench_attention(
    seqlens=BENCH_SEQLENS, head_dim: int = 64, dtype: str = "fp32", sram_bytes: int = 167936, repeats: int = 3
) -> dict:
    """Forward time and peak memory, naive vs tiled FA2, B = H = 1, at each N, with tiles sized from
    `sram_bytes`; exponents p of peak memory ~ N^p, over the whole peak and over its growth."""
    import torch

    from reference import attention as ref_attn
    from reference.timing import measure

    if len(seqlens) < 3 or min(seqlens) < 1:
        raise UserError(f"give at least three positive sequence lengths, got {list(seqlens)}")
    if repeats < 1:
        raise UserError(f"repeats must be positive, got {repeats}")
    element_bytes = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
    br, bc = ref_attn.block_sizes(head_dim, element_bytes, sram_bytes)
    rows = []
    for n in sorted(seqlens):
        q, k, v = make_inputs(1, 1, n, head_dim, dtype, seed=n)
        impls = {
            "naive": lambda q=q, k=k, v=v: ref_attn.naive_attention(q, k, v),
            "tiled": lambda q=q, k=k, v=v: ref_attn.flash_attention(q, k, v, br=br, bc=bc),
        }
        row = {"seqlen": n}
        with torch.no_grad():
            for name, fn in impls.items():
                row[f"{name}_ms"] = 1e3 * measure(fn, repeats=repeats).median_s
                row[f"{name}_peak_bytes"] = peak_memory_bytes(fn)
        rows.append(row)
    ns = [r["seqlen"] for r in rows]
    result = {"head_dim": head_dim, "dtype": dtype, "sram_bytes": sram_bytes, "br": br, "bc": bc, "rows": rows}
    for name in ("naive", "tiled"):
        peaks = [r[f"{name}_peak_bytes"] for r in rows]
        result[f"peak_exponent_{name}"] = fit_exponent(ns, peaks)
        result[f"peak_growth_exponent_{name}"] = fit_growth_exponent(ns, peaks)
        result[f"time_exponent_{name}"] = fit_exponent(ns, [r[f"{name}_ms"] for r in rows])
    return result


def format_bench(result: dict) -> str:
    lines = [
        f"attention forward on the CPU, B=H=1, d={result['head_dim']}, {result['dtype']}; tiled FA2 with "
        f"Br={result['br']}, Bc={result['bc']} (SRAM {result['sram_bytes']} bytes)",
        f"{'N':>7}{'naive ms':>11}{'naive peak MiB':>16}{'tiled ms':>11}{'tiled peak MiB':>16}{'peak ratio':>12}",
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['seqlen']:>7}{r['naive_ms']:11.2f}{r['naive_peak_bytes'] / 2**20:16.2f}{r['tiled_ms']:11.2f}"
            f"{r['tiled_peak_bytes'] / 2**20:16.2f}{r['naive_peak_bytes'] / r['tiled_peak_bytes']:12.1f}"
        )
    lines += [
        f"peak memory growth ~ N^p (differences between consecutive N, free of the fixed tile working set): "
        f"naive p = {result['peak_growth_exponent_naive']:.2f}, tiled p = {result['peak_growth_exponent_tiled']:.2f}",
        f"peak memory ~ N^p (log-log slope of the whole peak): naive p = {result['peak_exponent_naive']:.2f}, "
        f"tiled p = {result['peak_exponent_tiled']:.2f}",
        f"time ~ N^p: naive p = {result['time_exponent_naive']:.2f}, tiled p = {result['time_exponent_tiled']:.2f}",
    ]
    return "\n".join(lines)


def plot_bench(result: dict, path: str) -> None:
    """Peak memory and time vs N, log-log, written as a PNG by matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ns = [r["seqlen"] for r in result["rows"]]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    memory, timing = fig.subplots(1, 2)
    for name in ("naive", "tiled"):
        p_mem, p_time = result[f"peak_growth_exponent_{name}"], result[f"time_exponent_{name}"]
        memory.loglog(
            ns, [r[f"{name}_peak_bytes"] / 2**20 for r in result["rows"]], "o-", label=f"{name} (N^{p_mem:.2f})"
        )
        timing.loglog(ns, [r[f"{name}_ms"] for r in result["rows"]], "o-", label=f"{name} (N^{p_time:.2f})")
    memory.set(xlabel="sequence length N", ylabel="peak memory (MiB)", title="peak memory (growth exponent)")
    timing.set(xlabel="sequence length N", ylabel="forward time (ms)", title="CPU time")
    for ax in (memory, timing):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"attention forward, d={result['head_dim']}, {result['dtype']}, Br={result['br']}, Bc={result['bc']}")
    fig.tight_layout()
    try:
        write_atomically(Path(path), lambda tmp: fig.savefig(tmp, dpi=120))
    except OSError as exc:
        raise UserError(f"{path}: cannot write the plot: {exc.strerror}") from None


def _resolve_tiles(args) -> tuple[int | None, int | None, int | None, str]:
    """(sram_bytes, br, bc, description) from --block-rows/--block-cols, --sram-bytes or --gpu."""
    if args.block_rows is not None or args.block_cols is not None:
        return None, args.block_rows, args.block_cols, f"explicit Br={args.block_rows}, Bc={args.block_cols}"
    if args.sram_bytes is not None:
        if args.sram_bytes < 1:
            raise UserError(f"--sram-bytes must be positive, got {args.sram_bytes}")
        return args.sram_bytes, None, None, f"SRAM {args.sram_bytes} bytes"
    hw = load_profile(args.gpu)
    return hw.sram_bytes_per_sm, None, None, f"SRAM {hw.sram_bytes_per_sm} bytes per SM of {hw.name}"


def _run_attention(args) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    check_seed(args.seed)
    if args.inputs:
        q, k, v = (t.to(device) for t in load_inputs(args.inputs))
    else:
        q, k, v = make_inputs(args.batch, args.heads, args.seqlen, args.head_dim, args.dtype, args.seed, device)
    if args.repeats < 1:
        raise UserError(f"repeats must be positive, got {args.repeats}")
    sram_bytes, br, bc, source = _resolve_tiles(args)
    with torch_threads(args.threads):
        result = compare_attention(
            q, k, v, args.causal,
            sram_bytes=sram_bytes, br=br, bc=bc, tiles_source=source,
            orders=("fa2", "fa1") if args.order == "both" else (args.order,),
            decode_queries=args.decode_queries, splits=args.splits,
            triton=not args.no_triton, backward=not args.no_backward, repeats=args.repeats,
        )  # fmt: skip
    print(finite_json(result) if args.json else format_comparison(result))
    return 0 if result["ok"] else 1


def _run_bench(args) -> int:
    if args.sram_bytes is not None and args.sram_bytes < 1:
        raise UserError(f"--sram-bytes must be positive, got {args.sram_bytes}")
    sram_bytes = args.sram_bytes if args.sram_bytes is not None else load_profile(args.gpu).sram_bytes_per_sm
    check_plot_path(Path(args.out))
    with torch_threads(args.threads):
        result = bench_attention(args.seqlens, args.head_dim, args.dtype, sram_bytes, args.repeats)
    result["threads"] = args.threads
    result["plot"] = args.out
    print(finite_json(result) if args.json else format_bench(result) + f"\nplot: {args.out}")
    plot_bench(result, args.out)
    return 0


def add_parsers(sub, bench) -> None:
    """Register the run command on `sub` and the benchmark on `bench`; each sets `run=callable(args)`."""
    p = sub.add_parser("attention", help="naive vs tiled FlashAttention vs Triton: agreement, time, memory, HBM bytes",
                       description="Run naive attention, the tiled FlashAttention reference in both loop orders and the Triton kernel on "
                       "the same inputs; check each against fp64, and print forward time, peak memory and the HBM bytes each tiled "
                       "loop counted beside the cost model's prediction. Exit code 1 if anything disagrees.")  # fmt: skip
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=500, help="N, queries and keys (default 500)")
    p.add_argument("--head-dim", type=int, default=64, help="d (default 64)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--inputs", help="torch file with a dict of tensors q, k, v [B, H, N, d] (replaces the shape flags)")
    p.add_argument("--gpu", default="a100", help="profile whose SRAM per SM sizes the tiles (default a100)")
    p.add_argument("--sram-bytes", type=int, help="SRAM size in bytes instead of a profile's")
    p.add_argument("--block-rows", type=int, help="explicit Br (with --block-cols)")
    p.add_argument("--block-cols", type=int, help="explicit Bc (with --block-rows)")
    p.add_argument("--order", choices=("fa1", "fa2", "both"), default="both", help="tiled loop order (default both)")
    p.add_argument("--decode-queries", type=int, default=1, help="query rows of the split-KV decode check (0: skip)")
    p.add_argument("--splits", type=int, default=4, help="KV splits of the decode check (default 4)")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernel")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steady timings on a shared machine; 0: torch's default)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_run_attention)

    b = bench.add_parser("attention", help="CPU time and peak memory, naive vs tiled, over N; fits the memory exponent",
                         description="Time and peak memory of naive and tiled (FA2) attention forward over sequence lengths N, "
                         "the exponents of their growth, and a plot of both (--out).")  # fmt: skip
    b.add_argument("--seqlens", type=int, nargs="+", default=list(BENCH_SEQLENS), help="N values (default 512..16384)")
    b.add_argument("--head-dim", type=int, default=64)
    b.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    b.add_argument("--gpu", default="a100", help="profile whose SRAM per SM sizes the tiles (default a100)")
    b.add_argument("--sram-bytes", type=int, help="SRAM size in bytes instead of a profile's (e.g. a CPU core's L2)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: steady timings on a shared machine; 0: torch's default)",
    )
    b.add_argument("--out", default="attention_bench.png", help="PNG path of the plot")
    b.add_argument("--json", action="store_true")
    b.set_defaults(run=_run_bench)
