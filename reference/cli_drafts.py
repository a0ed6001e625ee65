"""CLI of `python -m reference datastore`, `python -m reference bild` and `python -m reference bench drafts`:
argument parsing and printing; the work is in reference.retrieval, reference.bild and reference.draft_bench."""

from __future__ import annotations

import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from reference import draft_bench as db
from reference.model import WEIGHTS_DIR, load_weights
from reference.retrieval import Datastore, Lookup, build_datastore, load_datastore, read_corpus, save_datastore
from reference.sampling import Sampling
from reference.timing import check_seed, torch_threads
from simulator.errors import UserError, finite_json
from simulator.paths import check_plot_path, check_writable_file, write_json_atomic

DEFAULT_GRID = "0.2,0.3,0.4,0.5,0.7:0.1,0.3,0.5"  # fallback thresholds : rollback thresholds
BENCH_BILD = "0.3:0.5,0.3:0.2,0.5:0.1"  # the pairs `bench drafts` shows
MATCH_REQUIRED = 0.9  # issue 16: greedy token match with the target >= 0.9 ...
LOOKUP_SAMPLES = 2000  # contexts timed for the datastore's lookup time
RETRIEVAL_TREE = "3x2x1"  # the retrieval tree of `bench drafts`: the draft model's tree's shape


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_parsers(sub, bench) -> None:
    d = sub.add_parser("datastore", help="build a retrieval datastore (suffix array) and time its lookups",
                       description="Build the datastore of retrieval drafts (REST, He et al. 2024): the corpus's bytes and their "
                       "suffix array, sorted by the first 64 bytes of each suffix (numpy prefix doubling). Prints the build "
                       "time, the size and the median time of one draft lookup (longest suffix of the context, most frequent "
                       "continuation) over contexts from held-out standard-library test files.")  # fmt: skip
    _corpus_args(d)
    d.add_argument("--out", default=None, help="write the datastore here (.npz; read by --datastore)")
    d.add_argument("--gamma", type=int, default=4, help="tokens per timed lookup (default 4)")
    d.add_argument("--json", action="store_true", help="print the figures as JSON")
    d.set_defaults(run=run_datastore)

    b = sub.add_parser("bild", help="Big Little Decoder over a grid of thresholds: tokens/s and quality vs the target",
                       description="BiLD (Kim et al. 2023) with the trained pair on held-out prompts: the small model writes until its "
                       "max probability falls below the fallback threshold; the big model then checks the small tokens in one pass "
                       "and rolls back from the first whose probability under it is below the rollback threshold (the paper's "
                       "distance -log p(y) above -log r). Measures tokens/s, the speedup over the target alone and over exact "
                       "speculative sampling (the reference point), the share of generated tokens equal to the target's (greedy: "
                       "exact match), the target's NLL of the text, and the total variation of the first token's law from the "
                       "target's at temperature 1 (exact, from both models' distributions). BiLD is not exact.")  # fmt: skip
    _bench_args(b, gamma=False)
    b.add_argument("--spec-gammas", default="3,4,5,6", help="gammas of exact speculative sampling, the reference: the fastest counts (default 3,4,5,6)")
    b.add_argument("--fallback", type=float, default=None, help="one fallback threshold in [0, 1] (with --rollback; default: the grid)")
    b.add_argument("--rollback", type=float, default=None, help="one rollback threshold in [0, 1] (with --fallback)")
    b.add_argument("--grid", default=DEFAULT_GRID, help=f"fallbacks:rollbacks, comma-separated, every pair run (default {DEFAULT_GRID})")
    b.add_argument("--rates-out", default=None, help="write the measured rates and quality per pair (bild_rates JSON, read by `simulator plan --policy bild`)")
    b.set_defaults(run=run_bild)

    r = bench.add_parser("drafts", help="every draft kind on the same held-out prompts, measured and predicted",
                         description="Every draft kind of the executor on the same held-out prompts (standard-library test files, "
                         "in neither the training corpus nor the datastore): the draft model, layer skip, n-gram prompt lookup, "
                         "retrieval (linear, and a token tree from its trie), a draft-model token tree, Medusa heads, and BiLD at a few thresholds; tokens per target pass, "
                         "tokens/s, speedup, exact or not, token match with the target, the target's NLL, and the simulator's "
                         "prediction beside each (with --profile).")  # fmt: skip
    _bench_args(r)
    _corpus_args(r)
    r.add_argument("--bild", default=BENCH_BILD, help=f"BiLD threshold pairs fallback:rollback, comma-separated (default {BENCH_BILD})")
    r.add_argument("--profile", default=None, help="a profile `python -m simulator calibrate` wrote on this device: predictions beside the measurements")
    r.set_defaults(run=run_bench_drafts)


def _corpus_args(p) -> None:
    p.add_argument("--corpus", nargs="+", default=None, metavar="FILE",
                   help="text files whose bytes make the datastore (default: the training corpus, the standard library's .py files)")  # fmt: skip
    p.add_argument("--datastore", default=None, help="a datastore file `python -m reference datastore --out` wrote (instead of --corpus)")


def _bench_args(p, gamma: bool = True) -> None:
    p.add_argument("--prompts", type=int, default=db.HELD_OUT_FILES, help=f"held-out files, one prompt each (default {db.HELD_OUT_FILES})")
    p.add_argument("--prompt-bytes", type=int, default=db.PROMPT_BYTES, help=f"prompt length (default {db.PROMPT_BYTES})")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    if gamma:
        p.add_argument("--gamma", type=int, default=4, help="draft tokens per step of the linear drafts (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds, median reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the uniform draws (default 0)")
    p.add_argument("--target", default=str(WEIGHTS_DIR / "target.pt"), help="target weights file")
    p.add_argument("--draft-model", default=str(WEIGHTS_DIR / "draft.pt"), help="small model's weights file")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--plot", default=None, help="write a plot (PNG): tokens/s against token match with the target")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def parse_pairs(text: str, flag: str) -> list[tuple[float, float]]:
    """'f:r,f:r' -> [(f, r)]; every threshold in [0, 1]."""
    try:
        pairs = [tuple(float(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} takes fallback:rollback pairs like 0.3:0.5,0.5:0.1, got {text!r}") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise UserError(f"{flag} takes fallback:rollback pairs like 0.3:0.5,0.5:0.1, got {text!r}")
    for f, r in pairs:
        _check_threshold(f, "fallback")
        _check_threshold(r, "rollback")
    return pairs


def parse_grid(text: str) -> list[tuple[float, float]]:
    """'f1,f2:r1,r2' -> every (f, r) pair."""
    parts = text.split(":")
    try:
        fs, rs = ([float(x) for x in part.split(",")] for part in parts) if len(parts) == 2 else ([], [])
    except ValueError:
        fs = rs = []
    if not fs or not rs:
        raise UserError(f"--grid takes fallbacks:rollbacks like 0.3,0.5:0.1,0.5, got {text!r}")
    for f in fs:
        _check_threshold(f, "fallback")
    for r in rs:
        _check_threshold(r, "rollback")
    return [(f, r) for f in fs for r in rs]


def _check_threshold(x: float, name: str) -> None:
    if not 0.0 <= x <= 1.0:
        raise UserError(f"the {name} threshold must lie in [0, 1], got {x}")


def datastore_of(args, vocab_size: int = 256) -> Datastore:
    """--datastore, else a datastore built from --corpus (default: the training corpus)."""
    if args.datastore is not None and args.corpus is not None:
        raise UserError("give --datastore or --corpus, not both")
    if args.datastore is not None:
        return load_datastore(Path(args.datastore), vocab_size)
    if args.corpus is None:
        from reference.train import stdlib_corpus

        data, source = stdlib_corpus(), "the standard library's .py files (the training corpus)"
    else:
        data, source = read_corpus([Path(p) for p in args.corpus]), ", ".join(Path(p).name for p in args.corpus)
    if vocab_size != 256:
        raise UserError(f"a corpus's bytes are a vocabulary of 256 tokens; the target has {vocab_size}")
    _log(f"building the datastore: {len(data) / 1e6:.2f} MB ...")
    ds = build_datastore(np.frombuffer(data, dtype=np.uint8), 256, source)
    _log(f"built in {ds.build_s:.1f} s")
    return ds


def lookup_time_s(ds: Datastore, contexts: list[list[int]], gamma: int) -> float:
    """Median seconds of one draft lookup (`Lookup.draft`) over the contexts."""
    lookup = Lookup(ds)
    times = []
    for ctx in contexts:
        t0 = time.perf_counter()
        lookup.draft(ctx, gamma)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def heldout_contexts(n: int, length: int = 64) -> list[list[int]]:
    """n contexts of `length` bytes ending at evenly spaced places of the held-out files."""
    data = [list(Path(f).read_bytes()) for f in db.heldout_files()]
    per = -(-n // len(data))
    return [d[e - length : e] for d in data for e in np.linspace(length, len(d), per, dtype=int)][:n]


def run_datastore(args) -> int:
    if args.out is not None:
        check_writable_file(Path(args.out))
    if args.gamma < 1:
        raise UserError(f"--gamma must be >= 1, got {args.gamma}")
    ds = datastore_of(args)
    if args.out is not None:
        save_datastore(ds, Path(args.out))
    lookup_s = lookup_time_s(ds, heldout_contexts(LOOKUP_SAMPLES), args.gamma)
    out = {"source": ds.source, "tokens": len(ds.tokens), "vocab_size": ds.vocab_size, "depth": ds.depth, "build_s": ds.build_s,
           "size_bytes": ds.size_bytes, "lookup_s": lookup_s, "lookup_samples": LOOKUP_SAMPLES, "gamma": args.gamma, "out": args.out}  # fmt: skip
    if args.json:
        print(finite_json(out))
        return 0
    print(f"datastore   {ds.source}: {len(ds.tokens)} tokens (vocabulary {ds.vocab_size}), suffixes sorted by their first {ds.depth}")
    print(f"build       {ds.build_s:.2f} s (suffix array, numpy prefix doubling)")
    print(f"size        {ds.size_bytes / 1e6:.1f} MB (tokens {ds.tokens.nbytes / 1e6:.1f} MB + suffix array {ds.suffixes.nbytes / 1e6:.1f} MB)")
    print(f"lookup      {lookup_s * 1e6:.1f} us median for {args.gamma} tokens ({LOOKUP_SAMPLES} contexts of 64 bytes from held-out test files)")
    if args.out is not None:
        print(f"written     {args.out}")
    return 0


def _setup(args):
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    check_seed(args.seed)
    for flag, x, least in (("--prompts", args.prompts, 1), ("--prompt-bytes", args.prompt_bytes, 2), ("--max-new-tokens", args.max_new_tokens, 1),
                           ("--gamma", getattr(args, "gamma", 1), 1), ("--repeats", args.repeats, 1)):  # fmt: skip
        if x < least:
            raise UserError(f"{flag} must be >= {least}, got {x}")
    s = Sampling(args.temperature).check()
    if args.plot is not None:
        check_plot_path(Path(args.plot))
    big, small = load_weights(args.target, args.device), load_weights(args.draft_model, args.device)
    if small.spec.vocab_size != big.spec.vocab_size:
        raise UserError(f"{args.draft_model}: the small model's vocabulary ({small.spec.vocab_size}) differs from the target's ({big.spec.vocab_size})")
    room = min(big.spec.max_seq_len, small.spec.max_seq_len) - args.prompt_bytes - args.max_new_tokens - 64
    if room < 0:
        raise UserError(f"--prompt-bytes {args.prompt_bytes} + --max-new-tokens {args.max_new_tokens} + a 64-token tree leave no room in the models' context")
    prompts = db.heldout_prompts(args.prompts, args.prompt_bytes)
    return big, small, prompts, s


def run_bild(args) -> int:
    args.device = "cpu"
    if (args.fallback is None) != (args.rollback is None):
        raise UserError("give --fallback and --rollback together (or neither, for the grid)")
    pairs = [(args.fallback, args.rollback)] if args.fallback is not None else parse_grid(args.grid)
    for f, r in pairs:
        _check_threshold(f, "fallback")
        _check_threshold(r, "rollback")
    try:
        gammas = sorted({int(g) for g in args.spec_gammas.split(",")})
    except ValueError:
        raise UserError(f"--spec-gammas must be comma-separated whole numbers, got {args.spec_gammas!r}") from None
    if min(gammas) < 1:
        raise UserError(f"--spec-gammas must be >= 1, got {args.spec_gammas}")
    if args.rates_out is not None:
        check_writable_file(Path(args.rates_out))
    with torch_threads(args.threads):
        big, small, prompts, s = _setup(args)
        toks = [p for _, p in prompts]
        from reference.drafts import ModelDraft

        pols = [db.speculative_policy(f"speculative gamma {g}", big, ModelDraft(small), g, s, args.max_new_tokens) for g in gammas]
        pols += [db.bild_policy(big, small, f, r, s, args.max_new_tokens) for f, r in pairs]
        rows = db.measure_policies(big, pols, toks, args.max_new_tokens, s, args.seed, args.repeats, log=_log)
        for f, r in pairs:
            rows[f"BiLD f={f:g} r={r:g}"]["first_token_tv_t1"] = db.bild_first_token_tv(big, small, toks, f, r, Sampling(1.0))
        from reference.microbench import device_name

        device = device_name("cpu")
    ref = max((rows[p.name] for p in pols[: len(gammas)]), key=lambda r: r["tokens_per_s"])  # the fastest exact speculative sampling
    for row in rows.values():  # tokens/s over the reference's, round by round (the rounds ran in turns): median and range
        ratios = [a / b for a, b in zip(ref["round_s"], row["round_s"], strict=True)]
        row["over_speculative"], row["over_speculative_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
    met = [row for row in rows.values() if "fallback" in row and row["token_match"] >= MATCH_REQUIRED and row["over_speculative"] > 1.0]
    best = max(met, key=lambda row: row["tokens_per_s"], default=None)
    out = {"kind": "bild_rates", "device": device, "threads": args.threads, "target": big.spec.model_dump(), "small": small.spec.model_dump(), "temperature": args.temperature,
           "prompts": [n for n, _ in prompts], "prompt_tokens": args.prompt_bytes, "new_tokens": args.max_new_tokens, "seed": args.seed,
           "rows": list(rows.values()), "best": None if best is None else best["name"], "match_required": MATCH_REQUIRED,
           "reference": ref["name"]}  # fmt: skip
    if args.rates_out is not None:
        write_json_atomic(Path(args.rates_out), out)
    if args.plot is not None:
        plot_quality(list(rows.values()), Path(args.plot), f"BiLD with {big.spec.name} / {small.spec.name}, T={args.temperature:g}")
    if args.json:
        print(finite_json(out))
        return 0
    print(f"target {big.spec.name}  small {small.spec.name}  {len(prompts)} held-out prompts x {args.max_new_tokens} tokens, "
          f"temperature {args.temperature:g}, medians of {args.repeats} rounds")  # fmt: skip
    print(format_bild(list(rows.values())))
    if best is not None:
        lo, hi = best["over_speculative_range"]
        print(f"\n{best['name']}: token match {best['token_match']:.3f} >= {MATCH_REQUIRED} and {best['over_speculative']:.3f}x the tokens/s of "
              f"the fastest exact speculative sampling ({ref['name']}), median of the rounds' ratios ({lo:.3f} to {hi:.3f}"
              f"{'' if lo > 1 else '; not faster in every round'})")  # fmt: skip
    else:
        print(f"\nno pair reached token match >= {MATCH_REQUIRED} with more tokens/s than the fastest exact speculative sampling ({ref['name']}) on these prompts")
    return 0


def format_bild(rows: list[dict]) -> str:
    lines = [f"{'policy':<24} {'tokens/s':>9} {'speedup':>8} {'vs spec':>8} {'match':>6} {'seq':>5} {'NLL':>6} {'TV1':>6} {'fallback':>8} {'rollback':>8} {'big/tok':>7}"]
    for r in rows:
        rt = r.get("rates") or {}
        tv = f"{r['first_token_tv_t1']:.3f}" if "first_token_tv_t1" in r else ("0" if r["exact"] else "")
        fb = f"{rt['fallback_rate']:.3f}" if rt else ""
        rb = f"{rt['rollback_rate']:.3f}" if rt else ""
        bp = f"{rt['big_passes_per_token']:.3f}" if rt else ""
        lines.append(f"{r['name']:<24} {r['tokens_per_s']:9.1f} {r['speedup']:8.3f} {r['over_speculative']:8.3f} {r['token_match']:6.3f} "
                     f"{r['sequence_match']:5.2f} {r['nll']:6.3f} {tv:>6} {fb:>8} {rb:>8} {bp:>7}")  # fmt: skip
    lines.append("match: share of generated tokens equal to the target's; seq: share of prompts whose continuation equals it; NLL: the "
                 "target's, nats per token; TV1: first-token law's total variation from the target's at temperature 1 (exact policies: 0 by construction); "
                 "vs spec: tokens/s over the fastest exact speculative sampling's, median of the rounds' ratios; "
                 "fallback: small steps that fell back; rollback: big passes that rolled back")  # fmt: skip
    return "\n".join(lines)


def plot_quality(rows: list[dict], path: Path, title: str) -> Path:
    """Left: measured tokens/s per policy (inexact ones in red), the simulator's prediction as a
    cross where there is one; right: tokens/s against the token match with the target alone."""
    from simulator.plots import plt, save_figure

    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.2, 1]})
    y = list(range(len(rows)))[::-1]
    colors = ["C0" if r["exact"] else "C3" for r in rows]
    bars.barh(y, [r["tokens_per_s"] for r in rows], color=colors, alpha=0.8, label="measured")
    pred = [(yi, r["predicted_tokens_per_s"]) for yi, r in zip(y, rows, strict=True) if "predicted_tokens_per_s" in r]
    if pred:
        bars.scatter([p for _, p in pred], [yi for yi, _ in pred], marker="x", color="k", zorder=3, label="predicted (simulator)")
        bars.legend(fontsize=7, loc="lower right")
    bars.set_yticks(y, [r["name"] for r in rows], fontsize=7)
    bars.set(xlabel="tokens/s", title=title)
    bars.grid(alpha=0.3, axis="x")
    for r, c in zip(rows, colors, strict=True):
        scatter.scatter([r["token_match"]], [r["tokens_per_s"]], marker="o" if r["exact"] else "^", color=c)
        scatter.annotate(r["name"], (r["token_match"], r["tokens_per_s"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    scatter.set(xlabel="token match with the target alone (exact: 1)", ylabel="tokens/s (measured)", title="speed against quality (red: inexact)")
    scatter.grid(alpha=0.3)
    return save_figure(fig, path)


def run_bench_drafts(args) -> int:
    args.device = "cpu"
    bild_pairs = parse_pairs(args.bild, "--bild")
    with torch_threads(args.threads):
        hw = None
        if args.profile is not None:
            from reference.microbench import device_name
            from simulator.calibration import check_same_device
            from simulator.hardware import load_profile

            hw = load_profile(args.profile)
            check_same_device(hw, device_name("cpu"), "bench drafts --profile")
        big, small, prompts, s = _setup(args)
        ds = datastore_of(args, big.spec.vocab_size)
        rows = measure_all(big, small, ds, prompts, s, args, bild_pairs)
    if hw is not None:
        predict_rows(rows, hw, big, small, args.prompt_bytes, args.max_new_tokens)
    out = {"kind": "draft_bench", "target": big.spec.name, "small": small.spec.name, "temperature": args.temperature,
           "prompts": [n for n, _ in prompts], "prompt_tokens": args.prompt_bytes, "new_tokens": args.max_new_tokens,
           "datastore": {"source": ds.source, "tokens": len(ds.tokens), "build_s": ds.build_s, "size_bytes": ds.size_bytes},
           "profile": args.profile, "rows": rows}  # fmt: skip
    if args.plot is not None:
        plot_quality(rows, Path(args.plot), f"draft kinds, {big.spec.name}, T={args.temperature:g}")
    if args.json:
        print(finite_json(out))
        return 0
    print(f"target {big.spec.name}  {len(prompts)} held-out prompts ({', '.join(n for n, _ in prompts)}) x {args.max_new_tokens} tokens, "
          f"temperature {args.temperature:g}, medians of {args.repeats} rounds in turns")  # fmt: skip
    print(f"datastore: {ds.source}, {len(ds.tokens)} tokens, {ds.size_bytes / 1e6:.1f} MB, built in {ds.build_s:.1f} s")
    print(format_drafts(rows))
    return 0


def measure_all(big, small, ds, prompts, s, args, bild_pairs) -> list[dict]:
    from reference.drafts import ModelDraft, NgramDraft
    from reference.medusa import MedusaDraft, load_heads, parse_tree_spec
    from reference.retrieval import RetrievalDraft, RetrievalTreeDraft
    from reference.tree_decode import TreeDraft

    n, g = args.max_new_tokens, args.gamma
    layers = list(range(big.spec.n_layers // 2))
    pols = [db.speculative_policy(f"model gamma {g}", big, ModelDraft(small), g, s, n),
            db.speculative_policy(f"layer-skip gamma {g}", big, ModelDraft(big, layers=layers), g, s, n),
            db.speculative_policy(f"ngram gamma {g}", big, NgramDraft(big.spec.vocab_size), g, s, n),
            db.speculative_policy(f"retrieval gamma {g}", big, RetrievalDraft(ds), g, s, n),
            db.tree_policy("tree 3x2x1 top", big, TreeDraft(small, (3, 2, 1), top=True), s, n)]  # fmt: skip
    pols[1].info["layers"] = len(layers)
    pols[4].info["paths"] = [list(p) for p in parse_tree_spec("3x2x1")]
    heads = WEIGHTS_DIR / "medusa.pt"
    tree_file = WEIGHTS_DIR / "medusa_tree.json"
    if Path(args.target) == WEIGHTS_DIR / "target.pt" and heads.is_file() and tree_file.is_file():
        paths = parse_tree_spec(str(tree_file))
        pols.append(db.tree_policy(f"medusa {len(paths)} nodes", big, MedusaDraft(big, load_heads(heads, big, args.target), paths), s, n))
        pols[-1].info |= {"paths": [list(p) for p in paths], "heads": 4}
    rtree = parse_tree_spec(RETRIEVAL_TREE)
    pols.append(db.tree_policy(f"retrieval tree {RETRIEVAL_TREE}", big, RetrievalTreeDraft(ds, rtree), s, n))
    pols[-1].info |= {"paths": [list(p) for p in rtree], "host": True}
    pols += [db.bild_policy(big, small, f, r, s, n) for f, r in bild_pairs]
    toks = [p for _, p in prompts]
    rows = db.measure_policies(big, pols, toks, n, s, args.seed, args.repeats, log=_log)
    for f, r in bild_pairs:
        rows[f"BiLD f={f:g} r={r:g}"]["first_token_tv_t1"] = db.bild_first_token_tv(big, small, toks, f, r, Sampling(1.0))
    return list(rows.values())


def predict_rows(rows: list[dict], hw, big, small, prompt: int, new_tokens: int) -> None:
    """The simulator's tokens/s beside each measured row (simulator.executor_loop), from the row's measured tokens per step,
    lookup time or BiLD rates."""
    from simulator import executor_loop as el

    dt = "fp32"
    ar_s = el.autoregressive_s_per_token(big.spec, hw, prompt, new_tokens, dt)
    for r in rows:
        name = r["name"]
        if name == "autoregressive":
            t = ar_s
        elif "rates" in r:
            t = el.bild_s_per_token(big.spec, small.spec, hw, r["rates"], prompt, new_tokens, dt)
        elif r.get("host"):
            t = el.host_tree_s_per_token(big.spec, hw, [tuple(p) for p in r["paths"]], r["tokens_per_step"], prompt, new_tokens,
                                         r["draft_s_per_step"], dt)  # fmt: skip
        elif "paths" in r:
            draft = None if name.startswith("medusa") else small.spec
            t = el.tree_s_per_token(big.spec, draft, hw, [tuple(p) for p in r["paths"]], r["tokens_per_step"], prompt, new_tokens,
                                    r.get("heads"), dt)  # fmt: skip
        elif name.startswith(("ngram", "retrieval")):
            t = el.linear_s_per_token(big.spec, hw, r["gamma"], r["tokens_per_step"], prompt, new_tokens, None, r["draft_s_per_step"], dt)
        else:
            spec = small.spec if name.startswith("model") else big.spec.model_copy(update={"n_layers": r["layers"], "name": big.spec.name + " first layers"})
            t = el.linear_s_per_token(big.spec, hw, r["gamma"], r["tokens_per_step"], prompt, new_tokens, spec, 0.0, dt)
        r["predicted_tokens_per_s"] = 1.0 / t
        r["predicted_speedup"] = ar_s / t
        r["measured_over_predicted"] = r["tokens_per_s"] * t


def format_drafts(rows: list[dict]) -> str:
    lines = [f"{'draft':<22} {'exact':>5} {'tok/step':>8} {'tokens/s':>9} {'speedup':>8} {'match':>6} {'NLL':>6} {'TV1':>6} {'predicted':>9} {'pred spd':>8} {'meas/pred':>9}"]
    for r in rows:
        tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else ""
        tv = f"{r['first_token_tv_t1']:.3f}" if "first_token_tv_t1" in r else ("0" if r["exact"] else "")
        pred = (f"{r['predicted_tokens_per_s']:9.1f} {r['predicted_speedup']:8.3f} {r['measured_over_predicted']:9.3f}"
                if "predicted_tokens_per_s" in r else f"{'-':>9} {'-':>8} {'-':>9}")  # fmt: skip
        lines.append(f"{r['name']:<22} {'yes' if r['exact'] else 'no':>5} {tps:>8} {r['tokens_per_s']:9.1f} {r['speedup']:8.3f} "
                     f"{r['token_match']:6.3f} {r['nll']:6.3f} {tv:>6} {pred}")  # fmt: skip
    lines.append("tok/step: tokens per target pass (accepted + 1); match: share of generated tokens equal to the target's alone; "
                 "NLL: the target's, nats per token; TV1: first-token law vs the target's at temperature 1 (exact kinds: 0 by construction); "
                 "predicted: the simulator's tokens/s from each row's measured tokens per step, lookup time or BiLD rates (--profile)")  # fmt: skip
    return "\n".join(lines)


def retrieval_draft(args, vocab_size: int):
    """`specdec --draft retrieval`: the datastore of --datastore or --corpus."""
    from reference.retrieval import RetrievalDraft

    return RetrievalDraft(datastore_of(args, vocab_size))

