"""Plots a person would rather look at than read. matplotlib with the Agg backend (no screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simulator.batching import speculative_speedup, verify_roofline_points  # noqa: E402
from simulator.errors import UserError  # noqa: E402
from simulator.hardware import HardwareProfile  # noqa: E402
from simulator.models import ModelSpec  # noqa: E402
from simulator.paths import write_atomically  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    except OSError as exc:
        raise UserError(f"{path}: cannot write the plot: {exc.strerror or exc}") from None
    except ValueError as exc:  # a format matplotlib does not know
        raise UserError(f"{path}: cannot write the plot: {exc}") from None
    finally:
        plt.close(fig)
    return path


def plot_speedup_over_gamma_and_alpha(
    path: Path,
    hw: HardwareProfile,
    target: ModelSpec,
    draft: ModelSpec | None,
    context_len: int,
    batch: int = 1,
    alphas: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9),
    gamma_max: int = 12,
    draft_layers_fraction: float | None = None,
) -> Path:
    """Predicted speedup over gamma, one line per alpha, at one batch size."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    gammas = list(range(gamma_max + 1))
    for alpha in alphas:
        s = [speculative_speedup(target, draft, hw, alpha, g, batch, context_len, draft_layers_fraction=draft_layers_fraction) for g in gammas]
        best = max(range(len(s)), key=s.__getitem__)
        (line,) = ax.plot(gammas, s, marker="o", ms=3, label=f"alpha = {alpha:g}")
        ax.plot([best], [s[best]], marker="*", ms=12, color=line.get_color())
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    draft_name = f"{target.name} layer skip {draft_layers_fraction:g}" if draft_layers_fraction else (draft.name if draft else "none")
    ax.set(xlabel="gamma (draft tokens per step)", ylabel="speedup over autoregressive",
           title=f"{target.name} on {hw.name}, draft {draft_name}, batch {batch}")  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_verify_roofline(
    path: Path,
    hw: HardwareProfile,
    target: ModelSpec,
    draft: ModelSpec | None,
    alpha: float,
    context_len: int,
    gammas: tuple[int, ...] = (1, 2, 4, 8),
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    dtype: str = "fp16",
) -> Path:
    """Left: the roofline with the verify pass at each batch x (gamma + 1). Right: speedup over
    batch for each gamma: where the pass leaves the memory roof, speculation stops paying."""
    fig, (ax_roof, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    peak = hw.peak_flops(dtype) * hw.achievable.matmul
    bw = hw.hbm_bytes_per_s * hw.achievable.bandwidth
    ridge = peak / bw
    xs = [ridge / 100, ridge, ridge * 100]
    ax_roof.loglog(xs, [min(peak, x * bw) for x in xs], color="black", lw=1.5, label="achievable roof")
    ax_roof.axvline(ridge, color="grey", ls=":", lw=0.8)
    ax_roof.annotate(f"ridge {ridge:.0f} FLOP/B", (ridge, min(peak, ridge * bw) / 30), fontsize=7, rotation=90, ha="right", va="bottom")
    for g in (0, *gammas):
        pts = verify_roofline_points(target, hw, g, list(batches), context_len, dtype)
        ax_roof.loglog([p["intensity_flops_per_byte"] for p in pts], [p["flops_per_s"] for p in pts], marker="o", ms=3,
                       label="decode step" if g == 0 else f"verify, gamma = {g}")  # fmt: skip
        if g:
            s = [speculative_speedup(target, draft, hw, alpha, g, b, context_len, dtype) for b in batches]
            ax_speed.semilogx(batches, s, marker="o", ms=3, label=f"gamma = {g}")
    ax_roof.set(xlabel="arithmetic intensity (FLOP/byte)", ylabel="achieved FLOP/s",
                title=f"Verify pass of {target.name} on {hw.name} (ridge {ridge:.0f} FLOP/B)")  # fmt: skip
    ax_roof.text(0.02, 0.88, f"along each curve: batch {batches[0]} to {batches[-1]}, left to right", transform=ax_roof.transAxes,
                 fontsize=7, va="top")  # fmt: skip
    ax_roof.legend(fontsize=7)
    ax_speed.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_speed.set(xlabel="batch size", ylabel="speedup over autoregressive",
                 title=f"alpha = {alpha:g}, draft {draft.name if draft else 'none'}, context {context_len}")  # fmt: skip
    ax_speed.legend(fontsize=8)
    for ax in (ax_roof, ax_speed):
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def plot_pareto(path: Path, candidates: list[dict], x_key: str, y_key: str, title: str, slo: float | None = None,
                chosen: str | None = None) -> Path:
    """Throughput vs p99 latency of the simulated candidates, the Pareto front joined and marked.
    Each candidate is a dict with `label`, `meets_slo`, `binding` (the constraint it misses most, for
    one that misses), `x_key` (higher is better) and `y_key` (lower is better). `slo`: the bound on
    `y_key`, drawn as a line; `chosen`: the label of the recommendation, ringed and named."""
    fig, ax = plt.subplots(figsize=(7.6, 5.0))
    ok = [c for c in candidates if c.get("meets_slo")]
    ax.scatter([c[x_key] for c in ok], [c[y_key] for c in ok], c="tab:blue", s=20, label="meets the SLO")
    misses: dict[str, list[dict]] = {}
    for c in candidates:
        if not c.get("meets_slo"):
            misses.setdefault(c.get("binding") or "SLO", []).append(c)
    for (binding, group), marker in zip(sorted(misses.items()), "xv^sD", strict=False):
        ax.scatter([c[x_key] for c in group], [c[y_key] for c in group], c="grey", marker=marker, s=22,
                   label=f"misses: {binding.upper()} p99 over its SLO" if binding in ("ttft", "tpot") else f"misses: {binding}")  # fmt: skip
    front = pareto_front(candidates, x_key, y_key)
    ax.plot([c[x_key] for c in front], [c[y_key] for c in front], color="tab:red", marker="*", ms=10, lw=1, label="Pareto front")
    for c in front:
        ax.annotate(c["label"], (c[x_key], c[y_key]), fontsize=7, xytext=(4, 4), textcoords="offset points",
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
    if slo is not None:
        ax.axhline(slo, color="tab:orange", ls="--", lw=1, label=f"SLO: {y_key.replace('_', ' ')} <= {slo:g}")
    best = next((c for c in candidates if c["label"] == chosen), None)
    if best is not None:
        ax.scatter([best[x_key]], [best[y_key]], s=260, facecolors="none", edgecolors="tab:green", lw=2, label=f"recommended: {best['label']}")
    ax.set(xlabel=x_key.replace("_", " "), ylabel=y_key.replace("_", " "), title=title)
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def pareto_front(candidates: list[dict], x_key: str, y_key: str) -> list[dict]:
    """Candidates no other beats on both axes (higher x, lower y), sorted by x."""
    front = [
        c for c in candidates
        if not any(o[x_key] >= c[x_key] and o[y_key] <= c[y_key] and (o[x_key] > c[x_key] or o[y_key] < c[y_key]) for o in candidates)
    ]  # fmt: skip
    return sorted(front, key=lambda c: c[x_key])
