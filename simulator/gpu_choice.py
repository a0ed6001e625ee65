"""Which GPU type to buy: the capacity search of `capacity.py` run for several GPU types, then
compared on the fewest GPUs that meet the SLO and, given prices, on the cost per million output
tokens.

Cost: a deployment of n GPUs serving the offered load emits `output_tokens_per_s` tokens per
second, so a million output tokens take n x 1e6 / output_tokens_per_s GPU-seconds
(`gpu_s_per_million_output_tokens` of a candidate row); at a price of P USD per GPU-hour they
cost that / 3600 x P. Prices are the user's (`--price GPU=USD_PER_HOUR`): no built-in price,
since no cited source fixes one. On one GPU type the cheapest deployment that meets the SLO is
taken over every simulated candidate, not only the fewest-GPU one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from simulator.errors import UserError
from simulator.hardware import load_profile
from simulator.plan import fitted_on_text, standing_text

S_PER_HOUR = 3600.0


def parse_gpus(text: str) -> list[str]:
    """'a100,h100' -> ['a100', 'h100'] (names as given; each is resolved by `load_profile`)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--gpu takes a device name or a comma-separated list of them, got {text!r}")
    return names


def parse_prices(items: Sequence[str], gpu_names: Sequence[str]) -> dict[str, float]:
    """`GPU=USD_PER_HOUR` items -> {profile name: USD per GPU-hour}. The GPU must be one of
    `gpu_names` (profile names of the GPUs searched) and the price a finite number > 0."""
    prices: dict[str, float] = {}
    for item in items:
        gpu, sep, value = item.partition("=")
        if not sep or not gpu.strip():
            raise UserError(f"--price takes GPU=USD_PER_HOUR (e.g. h100=2.5), got {item!r}")
        name = load_profile(gpu.strip()).name
        if name not in gpu_names:
            raise UserError(f"--price {item}: {name} is not among the GPUs searched ({', '.join(gpu_names)})")
        try:
            usd = float(value)
        except ValueError:
            raise UserError(f"--price {item}: the price must be a number of USD per GPU-hour") from None
        if not (usd > 0 and math.isfinite(usd)):
            raise UserError(f"--price {item}: the price must be a finite number of USD per GPU-hour > 0")
        if name in prices:
            raise UserError(f"--price: {name} is priced twice")
        prices[name] = usd
    return prices


def usd_per_million_output_tokens(row: dict, usd_per_gpu_hour: float) -> float | None:
    """What a million output tokens cost on a candidate: GPU-seconds per million / 3600 x price."""
    gpu_s = row["gpu_s_per_million_output_tokens"]
    return None if gpu_s is None else gpu_s / S_PER_HOUR * usd_per_gpu_hour


def compare(reports: dict[str, dict], prices: dict[str, float]) -> dict:
    """One capacity-search report per GPU type (by profile name) -> the comparison: per type the
    fewest GPUs that meet the SLO and the cheapest deployment that meets it; the type with the
    fewest GPUs (ties: lower GPU-seconds per million tokens) and, among priced types, the one with
    the lowest USD per million output tokens."""
    per_gpu = []
    for name, report in reports.items():
        meeting = [r for r in report["candidates"] if r["meets_slo"]]
        rec = report["recommendation"]
        entry = {
            "gpu": name,
            "meets_slo": rec is not None,
            "gpus": rec["gpus"] if rec else None,
            "deployment": rec["label"] if rec else None,
            "gpu_s_per_million_output_tokens": rec["gpu_s_per_million_output_tokens"] if rec else None,
            "usd_per_gpu_hour": prices.get(name),
            "cheapest": None,
            "verdict": report["verdict"],
        }
        if name in prices and meeting:
            costed = [(usd_per_million_output_tokens(r, prices[name]), r) for r in meeting]
            costed = [(usd, r) for usd, r in costed if usd is not None]
            if costed:
                usd, row = min(costed, key=lambda ur: (ur[0], ur[1]["gpus"], ur[1]["label"]))
                entry["cheapest"] = {"deployment": row["label"], "gpus": row["gpus"], "usd_per_million_output_tokens": usd,
                                     "usd_per_hour": row["gpus"] * prices[name]}  # fmt: skip
        per_gpu.append(entry)
    meeting_types = [e for e in per_gpu if e["meets_slo"]]
    fewest = min(meeting_types, key=lambda e: (e["gpus"], e["gpu_s_per_million_output_tokens"] or math.inf, e["gpu"]), default=None)
    priced = [e for e in per_gpu if e["cheapest"] is not None]
    cheapest = min(priced, key=lambda e: (e["cheapest"]["usd_per_million_output_tokens"], e["gpu"]), default=None)
    return {
        "per_gpu": per_gpu,
        "fewest_gpus": None if fewest is None else {"gpu": fewest["gpu"], "gpus": fewest["gpus"], "deployment": fewest["deployment"]},
        "lowest_cost": None if cheapest is None else {"gpu": cheapest["gpu"], **cheapest["cheapest"]},
    }


def cross_report(reports: dict[str, dict], prices: dict[str, float]) -> dict:
    """The report of a search over GPU types: each type's search report and their comparison."""
    first = next(iter(reports.values()))
    report = {
        "mode": "cross-gpu",
        "gpus": list(reports),
        "model": first["model"],
        "rate_per_s": first["rate_per_s"],
        "slo": first["slo"],
        "max_gpus": first["max_gpus"],
        "prices_usd_per_gpu_hour": prices,
        **compare(reports, prices),
        "kernel_model": {name: r.get("kernel_model") for name, r in reports.items()},
        "searches": reports,
    }
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict) -> str:
    """One line: the GPU type with the fewest GPUs and the cheapest one, or that none meets the SLO."""
    slo = report["slo"]
    target = f"TTFT p99 <= {slo['ttft_p99_s'] * 1e3:.4g} ms and TPOT p99 <= {slo['tpot_p99_s'] * 1e3:.4g} ms at {report['rate_per_s']:g} requests/s"
    fewest, cheapest = report["fewest_gpus"], report["lowest_cost"]
    if fewest is None:
        return f"no GPU type of {', '.join(report['gpus'])} meets {target} with at most {report['max_gpus']} GPUs"
    text = f"fewest GPUs: {fewest['gpus']} x {fewest['gpu']} ({fewest['deployment']}) meet {target}"
    if cheapest is not None:
        text += (f"; lowest cost: {cheapest['gpu']} at {cheapest['usd_per_million_output_tokens']:.3g} USD per million output tokens "
                 f"({cheapest['deployment']}, {cheapest['usd_per_hour']:.4g} USD/hour)")  # fmt: skip
    elif report["prices_usd_per_gpu_hour"]:
        text += "; no priced GPU type meets the SLO"
    return text


def format_cross(report: dict) -> str:
    lines = [
        f"Capacity plan across GPU types: {report['model']}, {report['rate_per_s']:g} requests/s, "
        f"SLO TTFT p99 <= {report['slo']['ttft_p99_s'] * 1e3:.4g} ms, TPOT p99 <= {report['slo']['tpot_p99_s'] * 1e3:.4g} ms, "
        f"at most {report['max_gpus']} GPUs of a type",
        "",
        f"{'GPU':<20} {'meets':>5} {'GPUs':>5}  {'deployment':<34} {'GPU-s/Mtok':>10} {'USD/GPU-h':>9} {'USD/Mtok':>9}  cheapest",
    ]
    for e in report["per_gpu"]:
        cheap = e["cheapest"]
        lines.append(
            f"{e['gpu']:<20} {'yes' if e['meets_slo'] else 'no':>5} {e['gpus'] if e['gpus'] else '-':>5}  {e['deployment'] or '-':<34} "
            f"{e['gpu_s_per_million_output_tokens'] or math.nan:>10.0f} "
            f"{'-' if e['usd_per_gpu_hour'] is None else format(e['usd_per_gpu_hour'], '.4g'):>9} "
            f"{'-' if cheap is None else format(cheap['usd_per_million_output_tokens'], '.3g'):>9}  {'-' if cheap is None else cheap['deployment']}"
        )
    models = {name: km for name, km in report.get("kernel_model", {}).items() if km}
    if models:
        lines += ["", f"Kernel model {fitted_on_text(next(iter(models.values())))}: " + "; ".join(standing_text(name, km) for name, km in models.items())]
    lines += ["", *(f"{e['gpu']}: {e['verdict']}" for e in report["per_gpu"] if not e["meets_slo"])]
    lines.append("Answer: " + report["verdict"])
    lines += [f"Plot: {path}" for path in report.get("plots", [])]
    return "\n".join(lines)
