"""`python -m reference device-check --out DIR`: one short run that measures on the local device what a
GPU check needs, and writes it as files to commit as measured data.

Steps, in this order, each timed:
1. `calibrate`: simulator.calibration.calibrate -> DIR/profile.yaml;
2. `compare`: simulator.calibration.compare against that profile -> DIR/compare.json, DIR/compare.png;
3. `triton-attention`: the Triton FlashAttention kernels on a few shapes, checked against the fp64 reference
   as `reference attention` checks them (reference.cli_attention.compare_attention), and timed with torch's
   scaled_dot_product_attention beside them -> DIR/triton_attention.json.
DIR/device_check.json holds the date, the device, torch, Triton and CUDA versions, the checkout's commit, and
per step its status (ran, failed with its error, skipped with the reason), seconds and files; it is rewritten
after every step, so a run killed from outside still leaves the record of the steps it finished.

Time: a step starts only if its estimated seconds fit in what is left of the budget, and a running step is
stopped at the budget (a SIGALRM timer raising `OutOfTime`); the attention step checks the time before each
shape and keeps the shapes it finished. Without CUDA everything runs on the CPU, the Triton kernels in
Triton's interpreter (TRITON_INTERPRET=1: fp16 and fp32 only, no bfloat16).
"""

from __future__ import annotations

import datetime
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from simulator.errors import UserError, finite_json
from simulator.paths import write_atomically

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480.0  # 8 minutes of steps: with start-up, well inside a 10-minute slot on a machine
FILES = {"calibrate": ["profile.yaml"], "compare": ["compare.json", "compare.png"], "triton-attention": ["triton_attention.json"]}
RECORD = "device_check.json"
# Seconds a step is expected to take, quick / full: calibrate and compare took 12 s and 6 s quick, 27-29 s and
# 21-22 s full on a 2-core CPU; no GPU run has been timed, so GPU runs are given three times as long. The
# attention step's figure is for its first shape; before each further shape it checks the time left itself.
ESTIMATE_S = {"calibrate": {True: 25.0, False: 90.0}, "compare": {True: 15.0, False: 60.0}, "triton-attention": {True: 10.0, False: 30.0}}
REPEATS = {True: 2, False: 5}  # timed repeats per measurement, quick / full

# Triton attention, (B, H, N, d, causal). Checked against fp64 (and timed): N = 1000 leaves a ragged last
# block. Timed only: FlashAttention-2's benchmark shapes (Dao 2023, Fig. 4: B N = 16k tokens, H d = 2048).
CUDA_CHECKED = [(1, 4, 1000, 64, False), (2, 8, 2048, 64, True), (1, 8, 1024, 128, True)]
CUDA_TIMED = [(4, 32, 4096, 64, False), (4, 32, 4096, 64, True), (4, 16, 4096, 128, False), (4, 16, 4096, 128, True)]
CPU_CHECKED = [(1, 2, 64, 32, True), (1, 2, 100, 32, False)]  # the interpreter runs a program at a time, in numpy
CPU_TIMED = [(1, 2, 128, 32, True)]
DTYPES = {"cuda": ("fp16", "bf16"), "cpu": ("fp16", "fp32")}  # the interpreter has no bfloat16
FIRST_CASE_ESTIMATE_S = {"cuda": 20.0, "cpu": 3.0}  # a shape's first run on CUDA includes compiling its kernels
A100_TILES = "a100"  # without CUDA the tiles are sized as `reference attention` sizes them by default


class OutOfTime(BaseException):
    """A step ran into the end of the budget. A BaseException, so that no `except Exception` inside a
    measurement swallows it."""


@dataclass(frozen=True)
class Step:
    name: str
    estimate_s: float
    run: Callable[[float], dict]  # deadline (clock seconds) -> {"files": [...], "ok": bool, ...}
    needs: str | None = None  # a step whose output this one reads


# --- input, time and files ---------------------------------------------------------------------------------


def check_budget(budget_s: float) -> float:
    if not math.isfinite(budget_s) or budget_s < 0:
        raise UserError(f"--budget-s must be a finite number of seconds >= 0, got {budget_s}")
    return budget_s


def prepare_output(out: Path) -> Path:
    """The output folder, created if missing; a UserError if it cannot be written or already holds the
    results of a device check (old and new files would mix)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise UserError(f"{out}: cannot write there: {exc.strerror or exc}") from None
    present = [name for name in [RECORD, *(f for files in FILES.values() for f in files)] if (out / name).exists()]
    if present:
        raise UserError(f"{out}: already holds results of a device check ({', '.join(present)}); give an empty or new folder")
    return out


@contextmanager
def stop_at(deadline: float, clock=time.monotonic):
    """Raise OutOfTime in this thread when `clock()` passes `deadline`. A SIGALRM timer does it, so only in
    the main thread of a platform that has one; elsewhere the block runs to its end."""
    left_s = deadline - clock()
    if left_s <= 0:
        raise OutOfTime
    if math.isinf(left_s) or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def ring(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, left_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON, atomically; a NaN or infinity (a failed or empty measurement) is written as null,
    which every JSON reader takes, where `NaN` would stop a strict one."""
    write_atomically(path, lambda tmp: tmp.write_text(finite_json(data) + "\n"))


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- what ran where -----------------------------------------------------------------------------------------


def git_commit(root: Path = REPO_ROOT) -> tuple[str, bool | None]:
    """(`git rev-parse HEAD` of the checkout, whether tracked files differ from it); ("unknown", None)
    outside a git checkout or without git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def package_version(name: str) -> str | None:
    """The installed version, read without importing the package (importing triton before TRITON_INTERPRET
    is set would fix it to the compiler)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    import platform

    import torch

    from reference import microbench as mb

    commit, dirty = git_commit()
    facts = mb.gpu_facts() if device == "cuda" else mb.cpu_facts()
    return {"date": datetime.date.today().isoformat(), "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device, "device_name": mb.device_name(device), "device_facts": facts,
            "torch": torch.__version__, "triton": package_version("triton"), "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": commit, "uncommitted_changes": dirty}  # fmt: skip


def folder_name(date: str, device_name: str) -> str:
    """measured/<date>-<device>: 'NVIDIA H200' on 2026-11-30 -> measured/2026-11-30-nvidia-h200."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"measured/{date}-{slug}"


# --- the steps ----------------------------------------------------------------------------------------------


def run_steps(steps: list[Step], budget_s: float, log=print, clock=time.monotonic, after_step=None) -> dict[str, dict]:
    """Run `steps` in order within `budget_s` seconds from now; returns per step its record: `status`
    (ran, failed, skipped), `seconds`, and `error` or `reason`, with what the step returned.
    `after_step(records)` is called after every step (to write down what is done so far)."""
    start = clock()
    records: dict[str, dict] = {}
    for step in steps:
        left_s = start + budget_s - clock()
        need = records.get(step.needs) if step.needs else None
        if need is not None and need["status"] != "ran":
            record = {"status": "skipped", "reason": f"needs {step.needs}, which {'was skipped' if need['status'] == 'skipped' else 'failed'}"}
        elif step.estimate_s > left_s:
            record = {"status": "skipped", "reason": f"out of time: {max(left_s, 0.0):.0f} s of the {budget_s:g} s budget left, "
                                                      f"the step takes about {step.estimate_s:.0f} s"}  # fmt: skip
        else:
            log(f"device-check: {step.name} ({left_s:.0f} s of the budget left)")
            t0, result = clock(), None
            try:
                with stop_at(start + budget_s, clock):
                    result = step.run(start + budget_s)
            except OutOfTime:
                if result is None:
                    result = {"error": f"stopped at the end of the {budget_s:g} s budget"}
            except Exception as exc:  # a step's failure is recorded; the next step still runs
                log("".join(traceback.format_exception(exc)).rstrip())
                result = {"error": one_line(exc)}
            record = {"status": "failed" if "error" in result else "ran", "seconds": round(clock() - t0, 3), **result}
        records[step.name] = record
        log(f"device-check: {step.name} {record['status']}" + (f" in {record['seconds']:.1f} s" if "seconds" in record else "")
            + "".join(f": {record[key]}" for key in ("error", "reason") if key in record))  # fmt: skip
        if after_step is not None:
            after_step(records)
    return records


def calibrate_step(out: Path, quick: bool, log) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        from simulator.calibration import calibrate

        data = calibrate(out / "profile.yaml", quick=quick, repeats=REPEATS[quick], log=log)
        cal = data["calibration"]
        return {"files": FILES["calibrate"], "ok": True, "device": cal["device"], "fit_residuals": cal["fit_residuals"]}

    return run


def compare_step(out: Path, quick: bool, log) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        from simulator.calibration import compare, plot_compare
        from simulator.hardware import load_profile

        result = compare(load_profile(str(out / "profile.yaml")), quick=quick, repeats=REPEATS[quick], log=log)
        write_json(out / "compare.json", result)
        write_atomically(out / "compare.png", lambda tmp: plot_compare(result, tmp))
        return {"files": FILES["compare"], "ok": True, "groups": result["groups"], "drift": result["drift"]}

    return run


def attention_cases(device: str, quick: bool) -> list[dict]:
    """The Triton shapes to run on `device`, each in every dtype the device's Triton runs: checked against
    fp64 (and timed), then timed only."""
    if device == "cuda":
        checked, timed = (CUDA_CHECKED[:1], CUDA_TIMED[1:2]) if quick else (CUDA_CHECKED, CUDA_TIMED)
    else:
        checked, timed = CPU_CHECKED, CPU_TIMED
    return [{"batch": b, "heads": h, "seqlen": n, "head_dim": d, "causal": causal, "dtype": dtype, "checked": checked_}
            for shapes, checked_ in ((checked, True), (timed, False)) for b, h, n, d, causal in shapes for dtype in DTYPES[device]]  # fmt: skip


def time_attention(q, k, v, causal: bool, block_m: int, block_n: int, repeats: int) -> dict:
    """Median seconds of forward and forward + backward of the Triton kernels and of torch's
    scaled_dot_product_attention on the same inputs, and the FLOP/s they reach (4 B H N^2 d forward,
    halved when causal; backward 2.5x forward, as flash-attention's benchmarks count)."""
    import torch
    import torch.nn.functional as F

    from reference import triton_attention as kernels
    from reference.microbench import measure
    from simulator.attention import attention_flops

    b, h, n, d = q.shape
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.device, q.dtype)
    impls = {"triton": lambda q_, k_, v_: kernels.triton_attention(q_, k_, v_, causal, block_m=block_m, block_n=block_n),
             "sdpa": lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)}  # fmt: skip
    fwd_flops = attention_flops(b, h, n, d, causal)
    timing = {"triton_block_m": block_m, "triton_block_n": block_n, "fwd_flops": fwd_flops, "fwd_bwd_flops": 3.5 * fwd_flops}
    for name, fn in impls.items():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def forward(fn=fn):
            with torch.no_grad():
                fn(q, k, v)

        def forward_backward(fn=fn, leaves=leaves):
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(do)

        forward(), forward_backward()  # compiled (CUDA) before `measure` sizes its repeats on a first run
        fwd_s = measure(forward, repeats).median_s
        fwd_bwd_s = measure(forward_backward, repeats).median_s
        timing |= {f"{name}_fwd_s": fwd_s, f"{name}_fwd_bwd_s": fwd_bwd_s,
                   f"{name}_fwd_flops_per_s": fwd_flops / fwd_s, f"{name}_fwd_bwd_flops_per_s": 3.5 * fwd_flops / fwd_bwd_s}  # fmt: skip
    return timing


def attention_step(out: Path, quick: bool, device: str, log, clock=time.monotonic) -> Callable[[float], dict]:
    def run(deadline: float) -> dict:
        from reference.cli_attention import _triton_interpreter, _triton_module
        from reference.timing import torch_threads

        module, why = _triton_module(device)
        if module is None:
            raise RuntimeError(why)
        sram_bytes, tiles_source = attention_tiles(device)
        report = {"device": device, "interpreted": module.INTERPRETED, "tiles_source": tiles_source, "cases": []}
        path = out / "triton_attention.json"
        last_s = {True: FIRST_CASE_ESTIMATE_S[device], False: FIRST_CASE_ESTIMATE_S[device]}
        cases = attention_cases(device, quick)
        stopped = False
        for case in cases:
            left_s = deadline - clock()
            if stopped or last_s[case["checked"]] > left_s:
                report["cases"].append(case | {"status": "skipped", "reason": f"out of time: {max(left_s, 0.0):.0f} s of the budget left"})
                continue
            log(f"device-check: Triton attention B={case['batch']} H={case['heads']} N={case['seqlen']} d={case['head_dim']} "
                f"{case['dtype']} causal={case['causal']}" + (" (checked against fp64)" if case["checked"] else " (timed)"))  # fmt: skip
            t0 = clock()
            try:
                with torch_threads(1), _triton_interpreter(device):
                    entry = case | {"status": "ran", **run_case(case, device, sram_bytes, tiles_source, REPEATS[quick], module)}
            except OutOfTime:
                entry, stopped = case | {"status": "failed", "error": "stopped at the end of the budget"}, True
            except Exception as exc:  # one shape's failure (a compile error, say) does not end the others
                log("".join(traceback.format_exception(exc)).rstrip())
                entry = case | {"status": "failed", "error": one_line(exc)}
            entry["seconds"] = round(clock() - t0, 3)
            last_s[case["checked"]] = entry["seconds"]
            report["cases"].append(entry)
            write_json(path, report)
        ran = [c for c in report["cases"] if c["status"] == "ran"]
        report["ok"] = all(c["status"] != "failed" for c in report["cases"]) and all(c["agrees"] and c["all_ok"] for c in ran if c["checked"])
        write_json(path, report)
        counts = {s: sum(c["status"] == s for c in report["cases"]) for s in ("ran", "failed", "skipped")}
        checked = [c for c in ran if c["checked"]]
        best = max((c["timing"]["triton_fwd_flops_per_s"] for c in ran), default=None)
        return {"files": FILES["triton-attention"], "ok": report["ok"], "interpreted": module.INTERPRETED, "cases": counts,
                "checked_agree": f"{sum(c['agrees'] for c in checked)}/{len(checked)}", "best_triton_fwd_flops_per_s": best}  # fmt: skip

    return run


def attention_tiles(device: str) -> tuple[int, str]:
    """SRAM bytes that size the tiles: this GPU's shared memory per SM, as the cost model sizes them for its
    profile; without CUDA the A100 profile's, as `reference attention` does by default."""
    if device == "cuda":
        from reference.microbench import gpu_facts

        smem = gpu_facts()["smem_bytes_per_sm"]
        if smem:
            return smem, f"SRAM {smem} bytes per SM of this GPU (torch.cuda.get_device_properties)"
    from simulator.hardware import load_profile

    hw = load_profile(A100_TILES)
    return hw.sram_bytes_per_sm, f"SRAM {hw.sram_bytes_per_sm} bytes per SM of {hw.name}"


def run_case(case: dict, device: str, sram_bytes: int, tiles_source: str, repeats: int, module) -> dict:
    """One shape on fresh N(0, 1) inputs: the check `reference attention` makes (checked cases), then the
    timings. `module`: reference.triton_attention, imported for this device."""
    from reference import attention as ref_attn
    from reference.cli_attention import compare_attention, make_inputs

    q, k, v = make_inputs(case["batch"], case["heads"], case["seqlen"], case["head_dim"], case["dtype"], seed=0, device=device)
    br, bc = ref_attn.block_sizes(case["head_dim"], q.element_size(), sram_bytes)
    block_m, block_n = module.triton_blocks(br, bc, case["head_dim"])
    entry = {}
    if case["checked"]:
        result = compare_attention(q, k, v, case["causal"], sram_bytes=sram_bytes, tiles_source=tiles_source, repeats=repeats)
        triton_row = next(r for r in result["forward"] if r["impl"].startswith("triton"))
        entry |= {"agrees": bool(triton_row["agrees"] and "skipped" not in triton_row), "all_ok": result["ok"], "check": result}
    entry["timing"] = time_attention(q, k, v, case["causal"], block_m, block_n, repeats)
    return entry


def device_check(out: Path, budget_s: float = DEFAULT_BUDGET_S, quick: bool = False, log=print, clock=time.monotonic) -> dict:
    """Run the steps into `out` (checked by prepare_output) within `budget_s` seconds; returns the record
    written to out/device_check.json."""
    from reference.cli_attention import _triton_module
    from reference.microbench import local_device

    t0 = clock()
    device = local_device()
    _triton_module(device)  # Triton imported now, under its interpreter without CUDA, before anything else imports it
    record = {**environment(device), "quick": quick, "budget_s": budget_s, "command": command_line(quick, budget_s)}
    record["setup_s"] = round(clock() - t0, 3)
    log(f"device-check: {record['device_name']} ({device}), torch {record['torch']}, triton {record['triton']}, "
        f"CUDA {record['cuda']}, commit {record['commit'][:12]}; budget {budget_s:g} s")  # fmt: skip

    def write(records: dict, complete: bool = False) -> None:
        ok = all(r["status"] != "failed" and r.get("ok", True) for r in records.values())
        write_json(out / RECORD, record | {"steps": records, "total_s": round(clock() - t0, 3), "complete": complete, "ok": ok})

    steps = [Step("calibrate", ESTIMATE_S["calibrate"][quick], calibrate_step(out, quick, log)),
             Step("compare", ESTIMATE_S["compare"][quick], compare_step(out, quick, log), needs="calibrate"),
             Step("triton-attention", ESTIMATE_S["triton-attention"][quick], attention_step(out, quick, device, log, clock))]  # fmt: skip
    left_s = max(0.0, budget_s - (clock() - t0))
    records = run_steps(steps, left_s, log, clock, after_step=write)
    write(records, complete=True)
    return json.loads((out / RECORD).read_text())


def command_line(quick: bool, budget_s: float) -> str:
    return "python -m reference device-check --out DIR" + (f" --budget-s {budget_s:g}" if budget_s != DEFAULT_BUDGET_S else "") + (" --quick" if quick else "")


def format_summary(record: dict, out: Path) -> str:
    dirty = {True: " (with uncommitted changes)", False: "", None: ""}[record["uncommitted_changes"]]
    lines = [f"device check on {record['device_name']} ({record['device']}), {record['date']}, commit {record['commit'][:12]}{dirty}: "
             f"{'ok' if record['ok'] else 'FAILED'} in {record['total_s']:.0f} s"]  # fmt: skip
    for name, r in record["steps"].items():
        what = ", ".join(r.get("files", [])) if r["status"] == "ran" else r.get("error") or r.get("reason", "")
        seconds = f"{r['seconds']:7.1f} s" if "seconds" in r else f"{'':>9}"
        lines.append(f"  {name:<18}{r['status']:<9}{seconds}  {what}")
    compare = record["steps"].get("compare", {})
    if compare.get("status") == "ran":
        lines.append("  compare MAPE: " + ", ".join(f"{g} {s['mape']:.1%}" for g, s in compare["groups"].items()))
    attention = record["steps"].get("triton-attention", {})
    if attention.get("status") == "ran":
        best = attention["best_triton_fwd_flops_per_s"]
        counts = ", ".join(f"{n} {status}" for status, n in attention["cases"].items() if n)
        lines.append(f"  Triton attention{' (interpreted)' if attention['interpreted'] else ''}: {attention['checked_agree']} checked "
                     f"shapes agree with fp64 ({counts})" + (f"; fastest forward {best / 1e12:.3g} TFLOP/s" if best else ""))  # fmt: skip
    lines.append(f"wrote {out}; to keep them, commit the files under {folder_name(record['date'], record['device_name'])}/")
    return "\n".join(lines)


# --- CLI --------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(args) -> int:
    budget_s = check_budget(args.budget_s)  # bad input fails here, before anything is measured
    out = prepare_output(Path(args.out))
    record = device_check(out, budget_s, args.quick, _log)
    print(format_summary(record, out))
    return 0 if record["ok"] else 1


def add_parsers(sub) -> None:
    p = sub.add_parser("device-check", help="calibrate, compare and the Triton kernels on this device, in one timed run, written as files",
                       description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the result files (created if missing; must not hold an earlier check's)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds the steps may take; steps that no longer fit are skipped (default: %(default)g)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="small suites and few shapes (seconds on a CPU; for tests)")
    p.set_defaults(run=_run)
