"""Every decoding policy of the executor on the same prompts: tokens/s, tokens per target pass, and
quality against the target decoding alone.

Prompts come from standard-library files the training corpus leaves out (the test suites under
`test/`, which `reference.train.SKIP_DIRS` skips), so they are in neither the pair's training data
nor the default retrieval datastore (`heldout_files` checks it). A policy is a function
prompt -> (tokens, statistics) run once per prompt, batch 1; all policies are timed in turns
(`measure_interleaved`) and compared with the autoregressive target on the same rounds.

Quality, against the target alone: `token_match`, the share of generated positions whose token
equals the target's (greedy: its greedy output); `sequence_match`, the share of prompts whose whole
continuation equals it; `nll`, the target's mean negative log-likelihood (nats per token,
temperature 1) of the generated tokens.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reference.model import Transformer
from reference.sampling import Sampling
from reference.specdec import autoregressive_generate, seeded_draws, speculative_generate
from reference.timing import Stopwatch, measure_interleaved
from reference.train import stdlib_files
from simulator.errors import UserError

HELD_OUT_FILES = 8
PROMPT_BYTES = 192

Run = Callable[[torch.Tensor, int, Stopwatch], tuple[torch.Tensor, dict]]  # (prompt [1, P], seed, draft timer) -> (tokens [1, P + n], statistics)


def heldout_files(n: int = HELD_OUT_FILES) -> list[Path]:
    """n of the standard library's `test/test_*.py` files, evenly spaced in sorted order; none is a
    file of the training corpus (`reference.train.stdlib_files`)."""
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(p for p in root.glob("test_*.py") if p.stat().st_size > 4 * PROMPT_BYTES)
    if len(files) < n:
        raise UserError(f"{root}: {len(files)} test files, fewer than the {n} held-out prompts asked for")
    chosen = [files[(i * len(files)) // n] for i in range(n)]
    overlap = set(chosen) & set(stdlib_files())
    if overlap:  # the corpus would have to include test/ for this
        raise UserError(f"held-out files are in the training corpus: {sorted(map(str, overlap))}")
    return chosen


def heldout_prompts(n: int = HELD_OUT_FILES, prompt_bytes: int = PROMPT_BYTES) -> list[tuple[str, list[int]]]:
    """(file name, prompt tokens): from each held-out file, `prompt_bytes` bytes from the first line
    that starts past its middle."""
    out = []
    for path in heldout_files(n):
        data = path.read_bytes()
        start = data.find(b"\n", len(data) // 2) + 1
        out.append((path.name, list(data[start : start + prompt_bytes])))
    return out


@dataclass
class Policy:
    name: str
    exact: bool  # output law (greedy: output) equal to the target's by construction
    run: Run
    info: dict = field(default_factory=dict)


def speculative_policy(name: str, target: Transformer, draft, gamma: int, s: Sampling, new_tokens: int) -> Policy:
    def run(prompt, seed, watch):
        r = speculative_generate(target, draft, prompt, new_tokens, gamma, s, seeded_draws(1, seed, prompt.device), watch)
        return r.tokens, {"steps": r.steps, "drafted": gamma * r.steps}

    return Policy(name, True, run, {"gamma": gamma, "draft": draft.name})


def bild_policy(big: Transformer, small: Transformer, fallback: float, rollback: float, s: Sampling, new_tokens: int) -> Policy:
    from reference.bild import MAX_RUN, bild_generate

    def run(prompt, seed, watch):
        r = bild_generate(big, small, prompt, new_tokens, fallback, rollback, s, seeded_draws(1, seed, prompt.device))
        return r.tokens, {k: v for k, v in vars(r).items() if k != "tokens"}

    return Policy(f"BiLD f={fallback:g} r={rollback:g}", False, run, {"fallback": fallback, "rollback": rollback, "max_run": MAX_RUN})


@torch.inference_mode()
def target_nll(target: Transformer, tokens: torch.Tensor, prompt_len: int) -> tuple[float, int]:
    """(sum of -log p_target(x_t | x_<t) over the generated positions, their count); temperature 1."""
    logp = target(tokens[:, :-1]).double().log_softmax(-1)  # [1, L - 1, V]
    gen = tokens[:, prompt_len:]
    return float(-logp[:, prompt_len - 1 :].gather(-1, gen[..., None]).sum()), gen.numel()


def measure_policies(
    target: Transformer, policies: list[Policy], prompts: list[list[int]], new_tokens: int, s: Sampling, seed: int,
    repeats: int, device: str = "cpu", log=None,
) -> dict:  # fmt: skip
    """Each policy over every prompt (seed `seed` for each), timed in turns with the autoregressive
    target; returns {"autoregressive": row, name: row, ...} with tokens/s (median of `repeats`
    rounds), speedup, pooled statistics and quality against the autoregressive output."""
    ps = [torch.tensor([p], device=device) for p in prompts]
    outputs: dict[str, list] = {}
    stats: dict[str, dict] = {}

    def autoregressive():
        outputs["autoregressive"] = [autoregressive_generate(target, p, new_tokens, s, seeded_draws(1, seed, device)) for p in ps]

    def runner(pol: Policy):
        def go():
            watch = Stopwatch(device)
            res = [pol.run(p, seed, watch) for p in ps]
            outputs[pol.name] = [t for t, _ in res]
            stats[pol.name] = {k: (np.sum([st[k] for _, st in res], axis=0).tolist() if isinstance(res[0][1][k], list) else sum(st[k] for _, st in res))
                               for k in res[0][1]}  # fmt: skip
            stats[pol.name]["draft_s"] = watch.seconds

        return go

    fns = {"autoregressive": autoregressive} | {pol.name: runner(pol) for pol in policies}
    if log:
        log(f"timing {len(fns)} policies x {len(ps)} prompts x {new_tokens} tokens, {repeats} rounds (+1 warm-up)")
    timings = measure_interleaved(fns, repeats)
    generated = len(ps) * new_tokens
    ar_tps = generated / timings["autoregressive"].median_s
    rows = {}
    for name in fns:
        out = outputs[name]
        match = [(o[0, len(p) :] == a[0, len(p) :]) for o, a, p in zip(out, outputs["autoregressive"], prompts, strict=True)]
        nll = [target_nll(target, o, len(p)) for o, p in zip(out, prompts, strict=True)]
        tps = generated / timings[name].median_s
        pol = next((q for q in policies if q.name == name), None)
        row = {"name": name, "exact": True if pol is None else pol.exact, "tokens_per_s": tps, "speedup": tps / ar_tps,
               "spread": timings[name].spread, "round_s": list(timings[name].samples_s), "token_match": float(torch.cat(match).float().mean()),
               "sequence_match": sum(bool(m.all()) for m in match) / len(match),
               "nll": sum(x for x, _ in nll) / sum(k for _, k in nll), "generated": generated}  # fmt: skip
        st = stats.get(name, {})
        if "steps" in st:
            row["tokens_per_step"] = generated / st["steps"]  # tokens per target pass (the last pass may overshoot)
            if "drafted" in st:  # a linear draft, timed where it ran
                row["draft_s_per_step"] = st["draft_s"] / st["steps"]
            elif st.get("host_s"):  # a host tree draft, timed by itself
                row["draft_s_per_step"] = st["host_s"] / st["steps"]
        if "big_passes" in st:
            row["rates"] = {"small_steps_per_token": st["small_steps"] / generated, "big_passes_per_token": st["big_passes"] / generated,
                            "big_query_tokens_per_pass": st["big_query_tokens"] / max(st["big_passes"], 1),
                            "fallback_rate": st["fallbacks"] / max(st["small_steps"], 1),
                            "rollback_rate": st["rollbacks"] / max(st["big_passes"], 1),
                            "small_token_share": st["small_kept"] / generated, "kept_per_pass_counts": st["kept_hist"]}  # fmt: skip
        if pol is not None:
            row |= pol.info
        rows[name] = row
    return rows


def bild_first_token_tv(big: Transformer, small: Transformer, prompts: list[list[int]], fallback: float, rollback: float,
                        s: Sampling, device: str = "cpu") -> float:  # fmt: skip
    """Mean over the prompts of TV(BiLD's first-token law, the target's), both exact (`bild.first_token_law`)."""
    from reference.bild import first_token_law
    from reference.sampling import warp

    tvs = []
    with torch.inference_mode():
        for p in prompts:
            x = torch.tensor([p], device=device)
            pl, ql = big(x)[0, -1], small(x)[0, -1]
            law = first_token_law(pl, ql, fallback, rollback, s)
            tvs.append(0.5 * float((law - warp(pl.double(), s)).abs().sum()))
    return sum(tvs) / len(tvs)


def tree_policy(name: str, target: Transformer, draft, s: Sampling, new_tokens: int) -> Policy:
    from reference.tree_decode import tree_generate

    def run(prompt, seed, watch):
        before = getattr(draft, "seconds", 0.0)  # a host draft times its own proposals
        r = tree_generate(target, draft, prompt, new_tokens, s, seeded_draws(1, seed, prompt.device))
        return r.tokens, {"steps": r.steps, "host_s": getattr(draft, "seconds", 0.0) - before}

    return Policy(name, True, run, {"draft": draft.name, "nodes": draft.n_nodes})
