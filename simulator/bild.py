"""BiLD (Kim et al. 2023, Big Little Decoder) priced by the cost model, from rates the executor measured.

A BiLD run is a sequence of cycles: the small model writes tokens one decode step at a time until
its confidence falls below the fallback threshold (that step's token is not taken), then the big
model runs one pass over the k - 1 small tokens since its last pass plus one position, keeps those
before the first it rolls back, and writes one token. What a cycle costs and emits depends on the
thresholds and the pair, so it is measured (`python -m reference bild --rates-out FILE`: a
`bild_rates` JSON, one row per threshold pair) and read here:

    s  small-model steps per generated token      b  big-model passes per generated token
    k  query tokens per big pass                  kept_per_pass_counts: passes by small tokens kept

Batch 1, on a calibrated profile, a token costs s t_small(1) + b t_big(k) plus the loops' calibrated
overheads (`executor_loop.bild_s_per_token`). Under load, `BildEngine` runs the serving engine's
speculative step with the big pass over k query tokens, s / b small-model passes, and the number of
small tokens a pass keeps drawn from the measured counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator import executor_loop
from simulator.errors import UserError
from simulator.forward import step_time_s
from simulator.hardware import HardwareProfile
from simulator.models import ModelSpec
from simulator.paths import read_json

QUALITY = ("token_match", "sequence_match", "nll", "first_token_tv_t1")


def add_policy_options(p, policy_help: str, rates_help: str) -> None:
    """`--policy speculative|bild` and BiLD's options (`plan` and `simulate` each say what --policy
    bild and --bild-rates do there)."""
    p.add_argument("--policy", choices=["speculative", "bild"], default="speculative", help=f"{policy_help} (default: %(default)s)")
    p.add_argument("--bild-rates", metavar="FILE", default=None, help=rates_help)
    p.add_argument("--fallback", type=float, default=None, help="--policy bild: the threshold pair's row (with --rollback; default: the file's best)")
    p.add_argument("--rollback", type=float, default=None, help="--policy bild: see --fallback")


def wants_bild(args) -> bool:
    """Whether the options ask for BiLD: --policy bild, which needs --bild-rates; BiLD's options
    without it are refused."""
    if args.policy != "bild":
        if args.bild_rates is not None or args.fallback is not None or args.rollback is not None:
            raise UserError("--bild-rates, --fallback and --rollback go with --policy bild")
        return False
    if args.bild_rates is None:
        raise UserError("--policy bild needs --bild-rates FILE (written by `python -m reference bild --rates-out FILE`)")
    return True


def load_rates(path: str | Path, fallback: float | None = None, rollback: float | None = None) -> tuple[dict, dict]:
    """(the file, the row of the threshold pair): the pair given, else the file's `best` row (the
    fastest with the issue's token match), else the first BiLD row. One UserError line for anything wrong."""
    data = read_json(Path(path), "a BiLD rates file")
    if not isinstance(data, dict) or data.get("kind") != "bild_rates" or not isinstance(data.get("rows"), list):
        raise UserError(f"{path}: not a BiLD rates file (write one with `python -m reference bild --rates-out FILE`)")
    rows = [r for r in data["rows"] if isinstance(r, dict) and "rates" in r]
    if not rows:
        raise UserError(f"{path}: no BiLD rows in it")
    for name, x in (("--fallback", fallback), ("--rollback", rollback)):
        if x is not None and not 0.0 <= x <= 1.0:
            raise UserError(f"{name} must lie in [0, 1], got {x}")
    if (fallback is None) != (rollback is None):
        raise UserError("give --fallback and --rollback together (or neither: the file's best pair)")
    if fallback is not None:
        row = next((r for r in rows if math.isclose(r.get("fallback", -1), fallback) and math.isclose(r.get("rollback", -1), rollback)), None)
        if row is None:
            have = ", ".join(f"{r.get('fallback')}:{r.get('rollback')}" for r in rows)
            raise UserError(f"{path}: no row for fallback {fallback} and rollback {rollback} (it has {have})")
    else:
        row = next((r for r in rows if r.get("name") == data.get("best")), rows[0])
    rates = row["rates"]
    for key in (*executor_loop.BILD_RATES, "kept_per_pass_counts"):
        if key not in rates:
            raise UserError(f"{path}: row {row.get('name')!r} lacks the rate {key}")
    counts = rates["kept_per_pass_counts"]
    if not isinstance(counts, list) or not counts or any(not isinstance(c, (int, float)) or c < 0 for c in counts) or not sum(counts) > 0:
        raise UserError(f"{path}: kept_per_pass_counts must be counts >= 0, not all zero")
    for key in ("target", "small"):
        try:
            ModelSpec.model_validate(data.get(key))
        except Exception:  # pydantic's ValidationError, or a missing entry
            raise UserError(f"{path}: {key} is not a model spec") from None
    return data, row


def pair_of(data: dict) -> tuple[ModelSpec, ModelSpec]:
    return ModelSpec.model_validate(data["target"]), ModelSpec.model_validate(data["small"])


def bild_plan(hw: HardwareProfile, target: ModelSpec, small: ModelSpec, data: dict, row: dict, prompt: int, new_tokens: int,
              dtype: str = "fp32") -> dict:  # fmt: skip
    """Predicted tokens/s of BiLD and of the target alone at batch 1 from the row's measured rates,
    beside the row's measured tokens/s and quality figures."""
    rates = row["rates"]
    bild_s = executor_loop.bild_s_per_token(target, small, hw, rates, prompt, new_tokens, dtype)
    ar_s = executor_loop.autoregressive_s_per_token(target, hw, prompt, new_tokens, dtype)
    context = prompt + new_tokens // 2
    measured = {"tokens_per_s": row.get("tokens_per_s"), "speedup": row.get("speedup")}
    return {"policy": "bild", "gpu": hw.name, "model": target.name, "small": small.name, "dtype": dtype, "prompt_len": prompt,
            "output_len": new_tokens, "fallback": row.get("fallback"), "rollback": row.get("rollback"), "rates": rates,
            "small_step_s": step_time_s(small, hw, 1, context, 1, dtype),
            "big_pass_s": step_time_s(target, hw, 1, context, max(1, round(rates["big_query_tokens_per_pass"])), dtype),
            "predicted": {"tokens_per_s": 1.0 / bild_s, "autoregressive_tokens_per_s": 1.0 / ar_s, "speedup": ar_s / bild_s},
            "measured": measured, "measured_on": f"{data.get('target', {}).get('name')} on {data.get('device', 'an unnamed device')}",
            "quality": {q: row.get(q) for q in QUALITY}, "exact": False}  # fmt: skip


def format_bild_plan(p: dict) -> str:
    r, pr, m, q = p["rates"], p["predicted"], p["measured"], p["quality"]
    lines = [f"BiLD: {p['model']} with {p['small']} on {p['gpu']} ({p['dtype']}), prompt {p['prompt_len']}, output {p['output_len']}, batch 1",
             f"thresholds       fallback {p['fallback']}  rollback {p['rollback']}   (INEXACT: not the target's law)",
             f"measured rates   {r['small_steps_per_token']:.3f} small steps and {r['big_passes_per_token']:.3f} big passes per token, "
             f"{r['big_query_tokens_per_pass']:.2f} query tokens per big pass; fallback rate {r.get('fallback_rate', float('nan')):.3f}, "
             f"rollback rate {r.get('rollback_rate', float('nan')):.3f}",
             f"step costs       small step {p['small_step_s'] * 1e3:.3f} ms, big pass {p['big_pass_s'] * 1e3:.3f} ms",
             f"predicted        {pr['tokens_per_s']:.1f} tokens/s, speedup {pr['speedup']:.3f} over the target alone ({pr['autoregressive_tokens_per_s']:.1f} tokens/s)"]  # fmt: skip
    if m.get("tokens_per_s") is not None:
        lines.append(f"measured         {m['tokens_per_s']:.1f} tokens/s, speedup {m['speedup']:.3f} (on {p['measured_on']}; the rates' own run)")
    qs = ", ".join(f"{k} {v:.3f}" for k, v in q.items() if v is not None)
    lines.append(f"quality (measured, vs the target alone): {qs}")
    return "\n".join(lines)


# `simulate --policy bild`: a serving engine whose speculative step is a BiLD cycle


@dataclass(frozen=True)
class BildSpeculation:
    draft: ModelSpec  # the small model
    rates: dict
    fallback: float | None
    rollback: float | None
    source: str

    @property
    def name(self) -> str:
        return self.draft.name

    @property
    def max_run(self) -> int:
        return len(self.rates["kept_per_pass_counts"]) - 1

    def acceptance_model(self):
        """Small tokens a big pass keeps (0..max_run), as measured: `serving.AcceptanceModel` 'empirical'."""
        from simulator.serving import AcceptanceModel

        return AcceptanceModel(kind="empirical", counts=[float(c) for c in self.rates["kept_per_pass_counts"]])

    def summary(self, target: ModelSpec) -> dict:
        return {"fallback": self.fallback, "rollback": self.rollback, "rates": {k: self.rates[k] for k in executor_loop.BILD_RATES},
                "max_run": self.max_run, "source": self.source, "small": self.draft.name}  # fmt: skip

    def engine(self, *args, **kwargs):
        return BildEngine(*args, speculation=self, **kwargs)


def _engine_base():
    from simulator.serving import Engine

    return Engine


class BildEngine(_engine_base()):
    """`serving.Engine` with BiLD cycles for speculative steps: KV lookahead reserved for max_run + 1
    tokens (the longest cycle), the tokens a step emits drawn from the measured kept-per-pass counts
    (kept + 1), and the step priced as a big pass over round(k) query tokens and round(s / b) small
    passes (the measured means) instead of gamma drafts and a pass over gamma + 1."""

    def __init__(self, env, hw, target, draft, acceptance, cfg, rng, on_progress=None, time_scale=1.0, *, speculation: BildSpeculation):
        if cfg.gamma != speculation.max_run:
            raise UserError(f"a BiLD engine reserves max_run + 1 = {speculation.max_run + 1} positions per step, not gamma {cfg.gamma} + 1")
        super().__init__(env, hw, target, speculation.draft, acceptance, cfg, rng, on_progress, time_scale)
        r = speculation.rates
        self.verify_tokens = max(2, round(r["big_query_tokens_per_pass"]))
        self.small_passes = max(1, round(r["small_steps_per_token"] / max(r["big_passes_per_token"], 1e-12)))

    def _priced(self, price, q: int, *rest):
        """`price` (a base-engine pricing method) of a speculative step as one BiLD cycle."""
        if q == 1:
            return price(q, *rest)
        gamma, self.gamma = self.gamma, self.small_passes  # the base prices `gamma` draft passes
        try:
            return price(self.verify_tokens, *rest)
        finally:
            self.gamma = gamma

    def _decode_s_direct(self, n: int, q: int, ctx_sum: np.ndarray) -> np.ndarray:
        return self._priced(lambda q: super(BildEngine, self)._decode_s_direct(n, q, ctx_sum), q)

    def _mixed_s(self, q: int, *rest) -> float:
        return self._priced(super()._mixed_s, q, *rest)


def speculation_from_args(path: str, fallback: float | None, rollback: float | None, small: ModelSpec | None) -> tuple[BildSpeculation, dict]:
    data, row = load_rates(path, fallback, rollback)
    _, measured_small = pair_of(data)
    return BildSpeculation(small or measured_small, row["rates"], row.get("fallback"), row.get("rollback"), str(path)), data
