"""`validate`: will the model be right on a GPU we never measured?

Every table listed in the data folders' manifests is predicted by the GPU kernel model
(`simulator.gpu_model`) under three splits, per GPU and kind (`simulator.kernel_fit`):

- `leave_one_gpu_out`: the model fitted on every other GPU's tables (or the `--fit-gpu` ones)
  predicts all of this GPU's rows -- the headline: a user's new GPU is one we did not measure;
- `in_gpu`: fitted on every third row of this GPU's files, predicting the other two thirds;
- `naive_roofline`: time = max(FLOPs / peak, bytes / DRAM bandwidth) / 0.7 + 5 us on the same rows
  (collectives: bus bytes over 0.7 of the per-direction link bandwidth + 5 us);
- `few_shot` (with `--few-shot K`): leave-one-GPU-out plus K rows of this GPU spread over its table
  (what a user measures on a new GPU), scored on its other rows.
Each reports n, median APE, MAPE and p90 APE in percent. `interval_coverage` is the fraction of a
held-out GPU's rows inside the 80% interval built from the other GPUs' leave-one-GPU-out residuals
of the same kind. Published attention measurements (A100 only) have the in-GPU split
(`simulator.published`). Rows no kernel could produce (`kernel_fit.implausible`) are counted in
`excluded` and neither fitted nor scored; rows of a dtype or kernel library the model does not
price (`unsupported` in `simulator.data`), or a GEMM dtype their GPU has no peak for
(`kernel_fit.unpriced`), are counted in `unsupported`; manifest rows of a kind the
project does not know or a GPU without a profile are listed in `not_read` (`data.read_folder`).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from simulator import kernel_fit as kf
from simulator.data import Tables, load_tables
from simulator.errors import UserError
from simulator.gpu_model import sources
from simulator.gpu_model.model import interval_class
from simulator.hardware import HardwareProfile
from simulator.plan import INTERVAL_LEVEL  # the prediction interval's nominal coverage, which plan reports beside it

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
NAIVE_FRACTION, NAIVE_OVERHEAD_S = 0.7, 5e-6


# --- metrics ----------------------------------------------------------------------------------


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict:
    ape = np.abs(predicted / measured - 1.0) * 100.0
    return {"n": int(len(ape)), "median_ape": float(np.median(ape)), "mape": float(np.mean(ape)), "p90_ape": float(np.quantile(ape, 0.9))}


def weighted_quantiles(values: np.ndarray, groups: np.ndarray, qs) -> list[float]:
    """Quantiles of `values` with every group (GPU) weighing the same."""
    order = np.argsort(values)
    v, g = values[order], groups[order]
    counts = pd.Series(g).map(pd.Series(g).value_counts()).to_numpy()
    w = 1.0 / counts
    cum = (np.cumsum(w) - 0.5 * w) / w.sum()
    return [float(np.interp(q, cum, v)) for q in qs]


def interval_bounds(log_ratios: np.ndarray, gpus: np.ndarray) -> tuple[float, float]:
    """(low, high) log bounds of the INTERVAL_LEVEL interval from leave-one-GPU-out log residuals
    (log measured / predicted) of other GPUs: +-q, q the INTERVAL_LEVEL quantile of their size,
    each GPU weighing the same. Symmetric because most of an unseen GPU's error is a bias of its own
    whose sign the GPUs before it do not tell (the fit sat between them): their residuals say how
    large it gets, not which way it goes. Measured on the shipped data, pooled over GPUs and kinds,
    this covers a held-out GPU's rows 82% of the time in the median, where the 10th-90th
    percentiles of the signed residuals cover 77%, and no kind falls to 0 for a bias the one other
    GPU of its kind had the other way round."""
    q = weighted_quantiles(np.abs(log_ratios), gpus, (INTERVAL_LEVEL,))[0]
    return -q, q


def naive_roofline(kind: str, frame: pd.DataFrame, profiles: dict[str, HardwareProfile]) -> np.ndarray:
    """The naive baseline: max(FLOPs / peak, bytes / DRAM bandwidth) / 0.7 + 5 us."""
    dev = kf.device_of(frame, profiles)
    bw = dev.hbm_bytes_per_s
    if kind.startswith("gemm"):
        flops, pk = kf.mma_work(frame, dev)
        return np.maximum(flops / pk, kf.gemm_bytes(frame) / bw) / NAIVE_FRACTION + NAIVE_OVERHEAD_S
    if "attention" in kind:
        b, h, hk, d, n_q, n_kv, e = (frame[c].to_numpy(float) for c in ("b", "h", "hk", "d", "n_q", "n_kv", "kv_bytes"))
        flops, pk = kf.mma_work(frame, dev)
        nbytes = 2 * b * n_q * h * d * 2 + 2 * b * n_kv * hk * d * e
        return np.maximum(flops / pk, nbytes / bw) / NAIVE_FRACTION + NAIVE_OVERHEAD_S
    if kind == "collective":
        n = frame["n_gpus"].to_numpy(float)
        factor = np.where(frame["op"] == "all_reduce", 2 * (n - 1) / n, (n - 1) / n)
        return frame["bytes"].to_numpy(float) * factor / (NAIVE_FRACTION * frame["link_bytes_per_s"].to_numpy(float)) + NAIVE_OVERHEAD_S
    if kind == "operators":
        t, n, k, elements = kf._vidur_shapes(frame)
        gemm = frame["op"].isin(list(kf.VIDUR_GEMMS)).to_numpy()
        flops = np.where(gemm, 2 * t * n * k, 0.0)
        nbytes = np.where(gemm, 2 * (t * k + k * n + t * n), 4.0 * elements)
        return np.maximum(flops / dev.peak("fp16"), nbytes / bw) / NAIVE_FRACTION + NAIVE_OVERHEAD_S
    raise UserError(f"no naive roofline for kind {kind!r}")


# --- the splits -------------------------------------------------------------------------------


def _fit(group: kf.Group, train: pd.DataFrame, profiles, ctx: dict, per_gpu: int) -> kf.GroupFit | None:
    if not len(train):
        return None
    sample = train.iloc[kf.sample_rows(train, per_gpu)].reset_index(drop=True)
    return kf.fit_group(group, sample, profiles, ctx=ctx)


def _predict(group, fit, frame, profiles, ctx) -> np.ndarray:
    if fit is None:  # no rows to fit this family on: only rows that need none of its parameters are predicted
        timer = {name: sources.TIMER_START[name] for name in group.timer_params}
        pred = kf.predict(group, kf.GroupFit(group.name, kf.Fitted.start(group.family), timer, 0), frame, profiles, ctx)
        return np.where(group.own_rows(frame), np.nan, pred)
    return kf.predict(group, fit, frame, profiles, ctx)


@dataclass
class _Split:
    """What one (group, GPU) task computed: per split, predictions and measurements of the GPU's
    rows with their reported kinds, and the fits (which later groups' predictions may need)."""

    group: str
    gpu: str
    results: dict = field(default_factory=dict)  # split -> (kinds, predicted, measured)
    naive: dict = field(default_factory=dict)  # kind -> metrics
    fits: dict = field(default_factory=dict)  # split -> GroupFit | None


_STATE: dict = {}  # what the worker processes read (set before they fork)


def _task(name: str, gpu: str, ctx_fits: dict, fit_only: bool = False) -> _Split:
    """Every split of one group on one held-out GPU. `fit_only`: the fit leaving it out and no more,
    for a GPU without rows of the group whose other groups need that fit."""
    st = _STATE
    group, frame, report, profiles = kf.GROUPS[name], st["frames"][name], st["reports"][name], st["profiles"]
    per_gpu, fit_names, few_shot, in_gpu = st["per_gpu"], st["fit_names"], st["few_shot"], st["in_gpu"]
    out = _Split(name, gpu)
    mine = (frame["gpu"] == gpu).to_numpy()
    test = frame[mine].reset_index(drop=True)
    kinds = report[mine]
    measured = test["measured_s"].to_numpy()
    others = frame[~mine & (frame["gpu"].isin(fit_names).to_numpy() if fit_names else True)].reset_index(drop=True)
    ctx = ctx_fits.get("logo", {})
    out.fits["logo"] = _fit(group, others, profiles, ctx, per_gpu)
    if fit_only:
        return out
    if len(others) or group.needs:
        out.results["logo"] = (kinds, _predict(group, out.fits["logo"], test, profiles, ctx), measured)
    if not in_gpu:
        return out
    cal = kf.calibration_mask(test)
    ctx = ctx_fits.get("in", {})
    out.fits["in"] = _fit(group, test[cal].reset_index(drop=True), profiles, ctx, per_gpu)
    held = test[~cal].reset_index(drop=True)
    out.results["in"] = (kinds[~cal], _predict(group, out.fits["in"], held, profiles, ctx), measured[~cal])
    for kind in np.unique(kinds):
        rows = kinds == kind
        naive_kind = kind.split(":")[0] if "attention" in kind else kind
        out.naive[kind] = metrics(naive_roofline(naive_kind, test[rows], profiles), measured[rows])
    if few_shot and len(others):
        shots = kf.few_shot_rows(test, few_shot)
        rest = np.ones(len(test), dtype=bool)
        rest[shots] = False
        train = pd.concat([others.iloc[kf.sample_rows(others, per_gpu)], test.iloc[shots]], ignore_index=True)
        ctx = ctx_fits.get("few", {})
        out.fits["few"] = kf.fit_group(group, train, profiles, ctx=ctx)
        scored = test[rest].reset_index(drop=True)
        out.results["few"] = (kinds[rest], _predict(group, out.fits["few"], scored, profiles, ctx), measured[rest])
    return out


def validate(folders: list[Path], fit_gpus: list[str] | None = None, holdout_gpus: list[str] | None = None, few_shot: int = 0,
             per_gpu: int = kf.FIT_ROWS_PER_GPU, progress=None, in_gpu: bool = True, tables: Tables | None = None,
             workers: int | None = None) -> dict:  # fmt: skip
    """Run every split over every group of the data; see the module docstring. `in_gpu=False`
    skips the in-GPU split and the published rows (what `fit-kernels` needs for its intervals).
    The (group, GPU) tasks run on `workers` processes (default: the machine's cores); a group
    whose predictions use other groups' fits (operators) runs after them."""
    tables = tables or load_tables(folders)
    profiles = tables.profiles
    fit_names = _resolve(fit_gpus, profiles, "--fit-gpu")
    hold_names = _resolve(holdout_gpus, profiles, "--holdout-gpu")
    out: dict = {"data": [str(f) for f in folders], "leave_one_gpu_out": {}, "in_gpu": {}, "naive_roofline": {}, "interval_coverage": {},
                 "excluded": {}, "unsupported": _unsupported(tables), "fit_rows_per_gpu": per_gpu}  # fmt: skip
    if few_shot:
        out["few_shot"] = {"k": few_shot}
    say = progress or (lambda msg: None)
    if tables.not_read:
        out["not_read"] = list(tables.not_read)
        for reason in tables.not_read:
            say(f"not read: {reason}")
    frames, reports = {}, {}
    for name, group in kf.GROUPS.items():
        frame = kf.group_rows(tables.kinds, group, profiles)
        if not len(frame):
            continue
        no_rate = kf.unpriced(frame, profiles)
        for (gpu, kind), n in frame.loc[no_rate, ["gpu", "kind"]].value_counts().items():
            out["unsupported"].setdefault(gpu, {})[kind] = out["unsupported"].get(gpu, {}).get(kind, 0) + int(n)
        frame = frame[~no_rate].reset_index(drop=True)
        if not len(frame):
            continue
        bad = kf.implausible(frame, profiles)
        kinds = kf.report_kinds(group, frame)
        for (gpu, kind), n in pd.Series(kinds[bad]).groupby(frame["gpu"].to_numpy()[bad]).value_counts().items():
            out["excluded"].setdefault(gpu, {})[kind] = int(n)
        frames[name] = frame[~bad].reset_index(drop=True)
        reports[name] = kinds[~bad]
    _STATE.update(frames=frames, reports=reports, profiles=profiles, per_gpu=per_gpu, fit_names=fit_names, few_shot=few_shot, in_gpu=in_gpu)
    tasks = [(name, gpu) for name in frames for gpu in sorted(frames[name]["gpu"].unique()) if not hold_names or gpu in hold_names]
    done: dict[tuple[str, str], _Split] = {}
    independent = [t for t in tasks if not kf.GROUPS[t[0]].needs]
    dependent = [t for t in tasks if kf.GROUPS[t[0]].needs]
    # fits a dependent task needs of a group its GPU has no rows of: that group fitted leaving the GPU out
    helpers = sorted({(g, gpu, True) for name, gpu in dependent for g in kf.GROUPS[name].needs if g in frames and (g, gpu) not in tasks})
    _run_tasks(independent + helpers, done, {}, workers, say)
    _run_tasks(dependent, done, done, workers, say)
    residuals: dict[str, list] = defaultdict(list)
    logo_pred: dict = {}
    for name, gpu in tasks:  # in a fixed order, whatever order the workers finished in
        split = done[(name, gpu)]
        for key, target in (("logo", "leave_one_gpu_out"), ("in", "in_gpu"), ("few", "few_shot")):
            if key in split.results:
                kinds, pred, measured = split.results[key]
                _record(out[target], gpu, kinds, pred, measured, residuals if key == "logo" else None, logo_pred if key == "logo" else None,
                        interval_class(profiles[gpu]))  # fmt: skip
        for kind, m in split.naive.items():
            out["naive_roofline"].setdefault(gpu, {})[kind] = m
    out["interval_coverage"], out["intervals"] = _coverage(residuals, logo_pred)
    out["_logo"] = logo_pred
    published = tables.kinds.get("published-attention")
    if in_gpu and published is not None and len(published) and (not hold_names or set(published["gpu"]) & set(hold_names)):
        say("published attention")
        out["published"] = _published(published, profiles, out)
    out["targets"] = targets(out)
    return out


def _unsupported(tables: Tables) -> dict:
    """{gpu: {kind: rows}} of the rows no group explains (a dtype or kernel library the model does not price)."""
    out: dict = {}
    for kind, frame in tables.kinds.items():
        if frame is None or not len(frame) or kind == "published-attention":
            continue
        covered = np.zeros(len(frame), dtype=bool)
        for group in kf.GROUPS.values():
            if kind in group.kinds:
                covered |= np.asarray(group.select(frame), dtype=bool)
        for gpu, n in frame.loc[~covered, "gpu"].value_counts().sort_index().items():
            out.setdefault(gpu, {})[kind] = int(n)
    return out


def _run_tasks(tasks, done: dict, earlier: dict, workers: int | None, say) -> None:
    """Run (group, GPU) tasks, in worker processes where there are several cores."""
    import os

    def ctx_of(name, gpu):
        needs = kf.GROUPS[name].needs

        def fit(g, split):  # a GPU without rows of g has no split of its own but the fit leaving it out
            found = earlier[(g, gpu)].fits if (g, gpu) in earlier else {}
            return found.get(split) or (found.get("logo") if split == "few" else None)

        return {split: {g: fit(g, split) for g in needs if fit(g, split)} for split in ("logo", "in", "few")}

    n = workers or min(len(tasks), os.cpu_count() or 1)
    if n <= 1 or len(tasks) <= 1:
        for name, gpu, *only in tasks:
            say(f"{name}: {gpu}")
            done[(name, gpu)] = _task(name, gpu, ctx_of(name, gpu), *only)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = {pool.submit(_task, name, gpu, ctx_of(name, gpu), *only): (name, gpu) for name, gpu, *only in tasks}
        for future in as_completed(futures):
            name, gpu = futures[future]
            done[(name, gpu)] = future.result()
            say(f"{name}: {gpu} done ({len(done)} of {len(done) + sum(not f.done() for f in futures)})")


def _resolve(names: list[str] | None, profiles: dict[str, HardwareProfile], option: str) -> list[str]:
    if not names:
        return []
    from simulator.hardware import load_profile

    resolved = []
    for name in names:
        p = load_profile(name)
        if p.name not in profiles:
            raise UserError(f"{option} {name}: {p.name} has no tables in the data (it has: {', '.join(sorted(profiles))})")
        resolved.append(p.name)
    return resolved


def _record(target: dict, gpu: str, kinds: np.ndarray, pred: np.ndarray, measured: np.ndarray, residuals=None, logo_pred=None,
            classify: Callable[[str], str] = lambda kind: kind) -> None:  # fmt: skip
    for kind in np.unique(kinds):
        rows = (kinds == kind) & np.isfinite(pred)
        if not rows.any():
            continue
        target.setdefault(gpu, {})[kind] = metrics(pred[rows], measured[rows])
        if residuals is not None:
            ratios = measured[rows] / pred[rows]
            residuals[kind].append((gpu, ratios))
            if classify(kind) != kind:
                residuals[classify(kind)].append((gpu, ratios))
            logo_pred[(gpu, kind)] = (pred[rows], measured[rows], classify(kind))


def _coverage(residuals: dict, logo_pred: dict) -> tuple[dict, dict]:
    """Coverage of each held-out GPU's rows by the 80% interval of its class (`interval_class`)
    from the other GPUs' residuals, and the intervals from every GPU's residuals (the ones the
    device model ships; a collective's per link kind and pooled, for a link no GPU in the data has)."""
    coverage: dict = {}
    intervals: dict = {}
    pooled: dict = {}  # key -> (GPU of each residual, log residuals)
    for key, per_gpu in residuals.items():
        gpus = np.concatenate([np.full(len(r), g, dtype=object) for g, r in per_gpu])
        ratios = np.log(np.concatenate([r for _, r in per_gpu]))
        pooled[key] = (gpus, ratios)
        lo, hi = interval_bounds(ratios, gpus)
        intervals[key] = {"low": float(np.exp(lo)), "high": float(np.exp(hi)), "gpus": sorted({g for g, _ in per_gpu})}
    for (gpu, kind), (pred, measured, key) in logo_pred.items():
        for k in (key, kind):  # the GPU's class where another GPU shares it, else the kind pooled
            gpus, ratios = pooled[k]
            others = gpus != gpu
            if others.any():
                lo, hi = interval_bounds(ratios[others], gpus[others])
                inside = (measured >= pred * np.exp(lo)) & (measured <= pred * np.exp(hi))
                coverage.setdefault(gpu, {})[kind] = float(inside.mean())
                break
    return coverage, intervals


def _published(table: pd.DataFrame, profiles: dict[str, HardwareProfile], out: dict) -> dict:
    from simulator import published as pub

    points = pub.published_points(table)
    by_name = {p.gpu: profiles[p.gpu] for p in points}
    fitted = pub.fit(points, by_name)
    tuned = {name: hw.with_fit(fitted["params"]) for name, hw in by_name.items()}
    predicted = pub.predict_all(points, tuned, fitted["efficiency"], fitted["params"]["host_op_s"])
    held = np.array([not p.calibration for p in points])
    measured = np.array([p.measured_s for p in points])
    gpus = np.array([p.gpu for p in points], dtype=object)
    for gpu in np.unique(gpus):
        rows = held & (gpus == gpu)
        out["in_gpu"].setdefault(gpu, {})["published-attention"] = metrics(predicted[rows], measured[rows])
    return {"fit": fitted, "groups": pub.summarise(points, predicted), "held_out": metrics(predicted[held], measured[held])}


# --- targets ----------------------------------------------------------------------------------

FA_KINDS = ("prefill-attention:fa2", "decode-attention:fa2")


def targets(out: dict) -> list[dict]:
    """The accuracy targets, each with the figure it is judged on and whether it is met."""
    rows = []

    def add(what: str, value: float | None, limit: float, ok: bool | None = None):
        if value is None:
            return
        rows.append({"target": what, "value": round(value, 2), "limit": limit, "met": bool(value <= limit) if ok is None else ok})

    logo, inside, naive = out["leave_one_gpu_out"], out["in_gpu"], out["naive_roofline"]
    for gpu, kinds in sorted(logo.items()):
        for kind, m in sorted(kinds.items()):
            if kind == "gemm:bf16" or kind in FA_KINDS:
                add(f"leave-one-GPU-out MAPE {kind} {gpu}", m["mape"], 15.0)
            elif kind in ("gemm:fp8", "collective"):
                add(f"leave-one-GPU-out MAPE {kind} {gpu}", m["mape"], 20.0)
    for gpu, kinds in sorted(inside.items()):
        for kind, m in sorted(kinds.items()):
            if kind == "gemm:bf16" or kind in FA_KINDS:
                add(f"in-GPU MAPE {kind} {gpu}", m["mape"], 10.0)
    for gpu, kinds in sorted(out.get("few_shot", {}).items()):
        if gpu == "k":
            continue
        for kind, m in sorted(kinds.items()):
            add(f"few-shot (K={out['few_shot']['k']}) MAPE {kind} {gpu}", m["mape"], 15.0)
    for gpu, kinds in sorted(logo.items()):
        for kind, m in sorted(kinds.items()):
            if "attention" in kind and kind in naive.get(gpu, {}):
                ratio = naive[gpu][kind]["mape"] / max(m["mape"], 1e-9)
                rows.append({"target": f"naive / leave-one-GPU-out MAPE, {kind} {gpu}", "value": round(ratio, 2), "limit": 3.0, "met": bool(ratio >= 3.0)})
    for gpu, kinds in sorted(out["interval_coverage"].items()):
        for kind, c in sorted(kinds.items()):
            rows.append({"target": f"80% interval coverage {kind} {gpu}", "value": round(100 * c, 1), "limit": "75-85", "met": bool(0.75 <= c <= 0.85)})
    if "published" in out:
        add("published A100 attention, held-out MAPE", out["published"]["held_out"]["mape"], 10.0)
    return rows


# --- output -----------------------------------------------------------------------------------


def format_validation(out: dict) -> str:
    lines = [f"data: {', '.join(out['data'])}"]
    kinds = sorted({k for split in ("leave_one_gpu_out", "in_gpu") for g in out[split].values() for k in g})
    gpus = sorted({g for split in ("leave_one_gpu_out", "in_gpu", "naive_roofline") for g in out[split]})
    header = f"{'gpu':<30} {'kind':<28} {'n':>6}  {'leave-one-GPU-out':>20}  {'in-GPU':>20}  {'naive roofline':>20}  {'80% cov':>7}"
    if "few_shot" in out:
        header += f"  {'few-shot K=' + str(out['few_shot']['k']):>20}"
    lines += ["MAPE / median / p90 APE in percent", header]

    def cell(m):
        return f"{m['mape']:6.1f} {m['median_ape']:6.1f} {m['p90_ape']:6.1f}" if m else f"{'-':>20}"

    for gpu in gpus:
        for kind in kinds:
            parts = [out[s].get(gpu, {}).get(kind) for s in ("leave_one_gpu_out", "in_gpu", "naive_roofline")]
            if not any(parts):
                continue
            n = next(m["n"] for m in parts if m)
            cov = out["interval_coverage"].get(gpu, {}).get(kind)
            line = f"{gpu[:30]:<30} {kind:<28} {n:>6}  {cell(parts[0])}  {cell(parts[1])}  {cell(parts[2])}  {(f'{100 * cov:6.1f}%' if cov is not None else '-'):>7}"
            if "few_shot" in out:
                line += f"  {cell(out['few_shot'].get(gpu, {}).get(kind))}"
            lines.append(line)
    for key, what in (("excluded", "Excluded as faster than any kernel could be (datasheet peak, DRAM bytes, fewer heads slower, head dimension not applied)"),
                      ("unsupported", "Not priced by the model (a dtype or kernel library it does not know, or a GEMM dtype the GPU has no tensor-core peak for), neither fitted nor scored")):  # fmt: skip
        if out.get(key):
            lines.append(f"{what}: " + "; ".join(f"{g} {k} {n}" for g, ks in sorted(out[key].items()) for k, n in sorted(ks.items())))
    if out.get("not_read"):
        lines.append("Not read (a kind the model does not know, or a GPU without a profile in hardware_profiles/): " + "; ".join(out["not_read"]))
    if "published" in out:
        m = out["published"]["held_out"]
        lines.append(f"Published A100 attention (FlashAttention papers, Triton tutorial, Flash-Decoding blog): held-out MAPE {m['mape']:.1f}% (n {m['n']})")
    met = sum(t["met"] for t in out["targets"])
    lines.append(f"Targets met: {met} of {len(out['targets'])}")
    for t in out["targets"]:
        if not t["met"]:
            lines.append(f"  not met: {t['target']}: {t['value']} (limit {t['limit']})")
    return "\n".join(lines)


def plot_validation(out: dict, directory: Path) -> list[Path]:
    """One predicted-vs-measured plot per kind (leave-one-GPU-out predictions, a colour per GPU),
    with the interval band of the kind; returns the files written."""
    from simulator.plots import plt, save_figure

    directory.mkdir(parents=True, exist_ok=True)
    by_kind: dict[str, list] = defaultdict(list)
    for (gpu, kind), (pred, measured, _) in out["_logo"].items():
        by_kind[kind].append((gpu, pred, measured))
    written = []
    for kind, series in sorted(by_kind.items()):
        fig, ax = plt.subplots(figsize=(6.0, 5.6))
        lo_all, hi_all = np.inf, 0.0
        for gpu, pred, measured in series:
            m = out["leave_one_gpu_out"][gpu][kind]
            ax.scatter(measured * 1e6, pred * 1e6, s=3, alpha=0.35, label=f"{gpu} (MAPE {m['mape']:.1f}%)")
            lo_all, hi_all = min(lo_all, measured.min(), pred.min()), max(hi_all, measured.max(), pred.max())
        line = np.array([lo_all, hi_all]) * 1e6
        ax.plot(line, line, color="black", lw=0.8, label="predicted = measured")
        band = out["intervals"].get(kind)
        if band:
            ax.fill_between(line, line / band["high"], line / band["low"], color="grey", alpha=0.15, label="80% interval")
        ax.set(xscale="log", yscale="log", xlabel="measured (us)", ylabel="predicted (us)", title=f"{kind}: each GPU predicted from the others")
        ax.legend(fontsize=6, markerscale=3)
        ax.grid(alpha=0.3, which="both")
        written.append(save_figure(fig, directory / f"validate_{kind.replace(':', '_')}.png"))
    return written


def public(out: dict) -> dict:
    return {k: v for k, v in out.items() if not k.startswith("_")}


def progress_to_stderr(msg: str) -> None:
    print(f"validate: {msg}", file=sys.stderr, flush=True)


__all__ = ["validate", "format_validation", "Tables"]
