"""Microbenchmarks of the local device, each measuring one thing the cost model prices.

Every function returns plain dicts: the configuration, the measured median seconds (of `repeats`
runs), and what the cost model needs to predict it (shape, dtype). `simulator.calibration` fits a
profile to them and predicts them back.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reference.attention import naive_attention
from reference.linear import Linear
from reference.model import Transformer
from reference.timing import Timing, measure_interleaved
from reference.timing import measure as measure_repeats
from simulator.models import ModelSpec

TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


MIN_TOTAL_S = 0.05  # a short kernel is repeated until its samples span this many seconds


def measure(fn, repeats: int) -> Timing:
    """Median of at least `repeats` timed runs, and of enough more for a short kernel that its runs
    span MIN_TOTAL_S (at most 50x `repeats`): on a shared machine one run of 100 us is noise."""
    start = time.perf_counter()
    fn()
    once_s = time.perf_counter() - start
    return measure_repeats(fn, min(50 * repeats, max(repeats, math.ceil(MIN_TOTAL_S / max(once_s, 1e-7)))))


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


def gpu_facts() -> dict:
    """SMs, shared memory per SM, L2 (`llc_bytes`), memory, clock and compute capability of the
    current CUDA device from torch's device properties, and the board's power limit from
    nvidia-smi; None where unreadable (older torch releases lack some properties)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz = getattr(props, "clock_rate", None)  # kHz
    return {"sm_count": props.multi_processor_count, "smem_bytes_per_sm": getattr(props, "shared_memory_per_multiprocessor", None),
            "llc_bytes": getattr(props, "L2_cache_size", None) or None, "memory_bytes": props.total_memory,
            "clock_hz": clock_khz * 1e3 if clock_khz else None, "compute_capability": f"{props.major}.{props.minor}",
            "power_limit_w": nvidia_smi_power_limit_w()}  # fmt: skip


def nvidia_smi_power_limit_w() -> float | None:
    """The power limit of the first GPU as nvidia-smi reports it, in watts; None without nvidia-smi."""
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=power.limit", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        return float(done.stdout.splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def count_ops(fn) -> int:
    """Operators `fn` dispatches to torch's kernels (views and copies included): what an eager
    executor pays a fixed per-op overhead for. Counted on a second call: the first one may do
    one-time work (the executor's linear layers lay out their weight copies on first use)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            return func(*args, **(kwargs or {}))

    fn()
    with Counter():
        fn()
    return Counter.ops


@torch.inference_mode()
def gemm(shapes: list[tuple[int, int, int]], dtype: str, device: str, repeats: int) -> list[dict]:
    """[m, k] @ [k, n] for each shape, through the executor's own linear layer (the kernel it
    chooses for m rows, as the transformer's forward pass runs it)."""
    out = []
    for m, n, k in shapes:
        a = torch.randn(m, k, dtype=TORCH_DTYPE[dtype], device=device)
        layer = Linear(k, n).to(device=device, dtype=TORCH_DTYPE[dtype]).eval()
        t = measure(lambda a=a, layer=layer: layer(a), repeats)
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


def first_touch_bytes_per_s(n_bytes: int, device: str, repeats: int) -> float | None:
    """Bytes per second at which freshly allocated memory is first written, beyond writing memory
    already mapped: allocating and filling a tensor of `n_bytes` against filling an existing one.
    On a CPU an allocation this large gets new pages from the OS, each faulted in on its first
    write. None on CUDA (its caching allocator reuses memory) or when no extra time shows."""
    if device != "cpu":
        return None
    n = n_bytes // 4
    mapped = torch.empty(n)
    fresh_s = measure(lambda: torch.empty(n).fill_(1.0), repeats).median_s
    extra_s = fresh_s - measure(lambda: mapped.fill_(1.0), repeats).median_s
    return n * 4 / extra_s if extra_s > 0 else None


def softmax_s_per_element(rows: int, cols: int, device: str, repeats: int) -> float:
    """Seconds per element of a row softmax (max, exp, sum, scale) over a block that stays in cache,
    as a fused attention kernel computes it on each score tile."""
    x = torch.randn(rows, cols, device=device)
    y = torch.empty_like(x)
    t = measure(lambda: torch.softmax(x, -1, out=y), 10 * repeats)
    return t.median_s / (rows * cols)


def sdpa_program_s(device: str, repeats: int, programs: int = 64) -> float:
    """Fixed seconds per (batch, head) program of scaled_dot_product_attention, with an additive
    mask as the executor's cached attention passes one: one query over 64 keys of d = 64 for
    `programs` programs against one program, per extra program."""

    def run(b: int) -> float:
        q, k, v = torch.randn(b, 1, 1, 64, device=device), torch.randn(b, 1, 64, 64, device=device), torch.randn(b, 1, 64, 64, device=device)
        mask = torch.zeros(b, 1, 1, 64, device=device)
        return measure(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats).median_s

    return max(0.0, (run(programs) - run(1)) / (programs - 1))


@torch.inference_mode()
def eager_op_s(flush_bytes: int, device: str, repeats: int) -> tuple[float, float]:
    """Seconds per dispatched torch operator of the executor's own forward pass, with its data
    negligible: a 4-layer `Transformer` of width 16 decoding one token, (hot) as it is, and (cold)
    with a stream over `flush_bytes` before every layer, as a model whose layer weights overflow
    the core's cache streams them, the stream's own time taken off. Returns (hot, cold)."""
    spec = ModelSpec(name="op-probe", d_model=16, n_layers=4, n_heads=2, n_kv_heads=1, d_ff=32, vocab_size=16,
                     max_seq_len=16, source="reference.microbench.eager_op_s")  # fmt: skip
    model = Transformer(spec).to(device).eval()
    cache, tokens = model.new_cache(1, 9), torch.zeros(1, 1, dtype=torch.long, device=device)
    lengths = torch.full((1,), 8, dtype=torch.long, device=device)
    streams = [torch.ones(1, device=device)]

    def step():
        cache.rollback(lengths, 8)
        model(tokens, cache)

    def stream(module, args) -> None:
        streams[0].sum()

    hooks = [block.register_forward_pre_hook(stream) for block in model.layers]
    try:
        ops = count_ops(step)
        hot_s = measure(step, repeats).median_s
        streams[0] = torch.ones(flush_bytes // 4, device=device)
        cold_s = measure(step, repeats).median_s - measure(lambda: [streams[0].sum() for _ in model.layers], repeats).median_s
    finally:
        for h in hooks:
            h.remove()
    return hot_s / ops, max(hot_s, cold_s) / ops


def copy_bandwidths_in_turns(sizes: list[int], device: str, repeats: int) -> list[float]:
    """Bytes moved per second by a copy of each of `sizes` bytes, the sizes timed in turns (each
    sample copies long enough to span MIN_TOTAL_S / 5), medians of `repeats` samples: on a machine
    whose last-level cache other tenants share, what a copy gets of it drifts, and the sizes are
    compared with each other, so the drift falls on all of them alike."""
    fns = {}
    for n_bytes in sizes:
        x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
        y = torch.empty_like(x)
        start = time.perf_counter()
        y.copy_(x)
        calls = max(1, math.ceil(MIN_TOTAL_S / 5 / max(time.perf_counter() - start, 1e-7)))

        def copies(x=x, y=y, calls=calls):
            for _ in range(calls):
                y.copy_(x)

        fns[n_bytes] = (copies, 2 * x.numel() * 4 * calls)
    timings = measure_interleaved({n: fn for n, (fn, _) in fns.items()}, repeats)
    return [fns[n][1] / timings[n].median_s for n in sizes]


def attention(shapes: list[tuple[int, int, int, int]], dtype: str, device: str, repeats: int) -> list[dict]:
    """Naive attention (S and P materialised) and the fused kernel torch ships
    (scaled_dot_product_attention), causal, for each (B, H, N, d)."""
    if device == "cpu":
        # glibc raises its mmap threshold to the size of a freed mapped chunk, up to 32 MiB
        # (mallopt(3)); below it, freed memory is reused instead of faulted in afresh. Raise it to
        # the top first, as any long-running process soon has: otherwise whether naive attention's
        # S and P land on fresh pages depends on what this process allocated before (2x swings).
        torch.empty((32 << 20) // 4 - 4096).fill_(0.0)
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
    query tokens appended to a KV cache already holding `context` tokens per row. The configurations
    are timed in turns, `repeats` rounds of `measure` each, and each keeps the median of its rounds'
    medians: a shared machine's drift over the seconds this takes falls on all of them alike."""
    torch.manual_seed(0)
    model = Transformer(spec).to(device=device, dtype=TORCH_DTYPE[dtype]).eval()
    steps = []
    for batch, context, query in configs:
        cache = model.new_cache(batch, context + query)
        tokens = torch.randint(0, spec.vocab_size, (batch, query), device=device)
        lengths = torch.full((batch,), context, dtype=torch.long, device=device)

        def step(cache=cache, tokens=tokens, context=context, lengths=lengths):
            cache.rollback(lengths, context)  # every repeat attends over exactly `context` cached tokens
            model(tokens, cache)

        steps.append(step)
    rounds = [[measure(step, 1).median_s for step in steps] for _ in range(repeats)]
    return [{"kind": "forward", "model": spec.model_dump(), "batch": batch, "context": context, "query_tokens": query,
             "dtype": dtype, "measured_s": statistics.median(r[i] for r in rounds), "ops": count_ops(steps[i])}
            for i, (batch, context, query) in enumerate(configs)]  # fmt: skip


def specdec(target: Transformer, draft: Transformer, prompt_len: int, new_tokens: int, gammas: list[int], seed: int,
            repeats: int) -> list[dict]:  # fmt: skip
    """Speculative decoding of `draft` -> `target` (temperature 1) at each gamma, and autoregressive
    decoding of the target, on one random prompt: seconds per generated token (median of `repeats`),
    the measured tokens per target pass and alpha."""
    from reference.drafts import ModelDraft
    from reference.sampling import Sampling
    from reference.specdec import measure_specdec

    device = target.embed.weight.device
    prompt = torch.randint(0, target.spec.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    result = measure_specdec(target, ModelDraft(draft), prompt.to(device), new_tokens, gammas, Sampling(temperature=1.0),
                             seed=seed, repeats=repeats)  # fmt: skip
    run = {"prompt": prompt_len, "new_tokens": new_tokens, "alpha": result.alpha, "target": target.spec.model_dump(), "draft": draft.spec.model_dump()}
    out = [{"kind": "specdec", "gamma": r.gamma, **run, "tokens_per_step": r.expected_tokens_per_step,
            "measured_s": 1.0 / r.tokens_per_s} for r in result.rows]  # fmt: skip
    out.append({"kind": "autoregressive", "gamma": 0, **run, "measured_s": 1.0 / result.autoregressive_tokens_per_s})
    return out


def layer_op_s_per_element(tokens: int, device: str, repeats: int) -> dict[str, float]:
    """Seconds per element of the executor's per-layer operators that run on the vector units at
    below memory speed (reference.model.Block), each as the executor calls it, over `tokens` rows
    of a width-256 layer with 2 KV heads of 64:
    - `scatter`: writing K (a strided view) into the cache at expanded int64 positions (scatter_);
    - `silu`: SiLU of the gate (an exp per element);
    - `rope`: the complex product of Q and K's pairs with e^(i pos theta), per complex element;
    - `rms_norm`: nn.RMSNorm over the [tokens, 256] activations;
    - `mask`: building the additive attention mask [1, 1, tokens, tokens] from positions, per entry."""
    heads, kv_heads, dh = 4, 2, 64
    qkv = torch.randn(1, tokens, heads + 2 * kv_heads, dh, device=device)
    k = qkv[:, :, heads:heads + kv_heads].transpose(1, 2)
    cache = torch.zeros(1, kv_heads, tokens, dh, device=device)
    index = torch.arange(tokens, device=device)[None, None, :, None].expand(1, kv_heads, tokens, dh)
    gate = torch.randn(tokens, 768, device=device)
    cis = torch.view_as_complex(torch.randn(1, tokens, 1, dh // 2, 2, device=device))
    pairs = qkv[:, :, : heads + kv_heads]
    norm, x = torch.nn.RMSNorm(256, eps=1e-5).to(device), torch.randn(1, tokens, 256, device=device)
    pos, keys = torch.arange(tokens, device=device)[None], torch.arange(tokens, device=device)

    def rope():
        xc = torch.view_as_complex(pairs.unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * cis).flatten(-2)

    with torch.inference_mode():
        return {"scatter": measure(lambda: cache.scatter_(2, index, k), repeats).median_s / k.numel(),
                "silu": measure(lambda: F.silu(gate), repeats).median_s / gate.numel(),
                "rope": measure(rope, repeats).median_s / (pairs.numel() // 2),
                "rms_norm": measure(lambda: norm(x), repeats).median_s / x.numel(),
                "mask": measure(lambda: torch.where(keys <= pos[:, :, None], 0.0, float("-inf"))[:, None].to(x.dtype), repeats).median_s / tokens**2}  # fmt: skip


def tree_specdec(target: Transformer, draft: Transformer, heads_path: Path, target_path: Path, configs: list[dict], prompt_len: int,
                 new_tokens: int, seed: int, repeats: int) -> list[dict]:  # fmt: skip
    """Tree speculation (reference.tree_decode.measure_tree, exact verification) on one random
    prompt, per config {"draft": "medusa" | "tree", "tree": rank paths, "temperature": T}: Medusa
    heads from `heads_path`, or `draft` growing a full tree of i.i.d. samples. Per config: seconds
    per generated token of the tree run and of autoregressive decoding timed in turns with it
    (medians of `repeats`), the measured tokens per step, and the run's acceptance per depth and
    rank in the tree acceptance file's format (reference.cli_specdec.acceptance_file)."""
    from reference.cli_specdec import acceptance_file
    from reference.medusa import MedusaDraft, file_sha256, load_heads
    from reference.sampling import Sampling
    from reference.tree_decode import TreeDraft, measure_tree

    device = target.embed.weight.device
    prompt = torch.randint(0, target.spec.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    target_sha256 = file_sha256(target_path)
    heads = load_heads(heads_path, target, target_path) if any(c["draft"] == "medusa" for c in configs) else None
    out = []
    for c in configs:
        paths = [tuple(p) for p in c["tree"]]
        if c["draft"] == "medusa":
            proposer = MedusaDraft(target, heads, paths)
        else:
            branching = tuple(1 + max(p[d] for p in paths if len(p) > d) for d in range(max(len(p) for p in paths)))
            proposer = TreeDraft(draft, branching)
        r = measure_tree(target, proposer, paths, prompt, new_tokens, Sampling(temperature=c["temperature"]), seed, repeats)
        source = f"simulator compare: {c['draft']} tree of {len(paths)} nodes, prompt {prompt_len}, {new_tokens} tokens, seed {seed}"
        out.append({"kind": "tree", "draft": c["draft"], "tree": [list(p) for p in paths], "temperature": c["temperature"],
                    "prompt": prompt_len, "new_tokens": new_tokens, "target": target.spec.model_dump(),
                    "draft_model": draft.spec.model_dump() if c["draft"] == "tree" else None,
                    "medusa_heads": heads.n_heads if c["draft"] == "medusa" else None,
                    "tokens_per_step": r.tokens_per_step, "steps": r.steps,
                    "acceptance": acceptance_file(r, c["draft"], target_sha256, source),
                    "measured_s": 1.0 / r.tokens_per_s, "autoregressive_s": 1.0 / r.autoregressive_tokens_per_s})  # fmt: skip
    return out
