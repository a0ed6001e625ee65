"""`python -m simulator`: argument parsing only; every figure printed comes from library calls."""

from __future__ import annotations

import argparse
import sys

from simulator import plan as plan_lib
from simulator.errors import Parser, UserError, finite_json, run_command
from simulator.hardware import load_profile, shipped_profiles
from simulator.models import load_model

SEARCH_OPTIONS = ("rate", "slo_ttft_p99", "slo_tpot_p99", "max_gpus", "requests", "seed", "plot_dir", "price")


def _run_plan(args: argparse.Namespace) -> int:
    from simulator import bild

    if bild.wants_bild(args):
        return _run_bild_plan(args)
    if args.tree is not None or args.draft == "medusa":
        return _run_tree_plan(args)
    if args.acceptance is not None:
        raise UserError("--acceptance takes a tree acceptance table and goes with --tree")
    if any(getattr(args, name) is not None for name in SEARCH_OPTIONS):
        return _run_plan_search(args)
    hw = load_profile(args.gpu)
    target, draft = load_model(args.model), load_model(args.draft or plan_lib.DEFAULT_DRAFT)
    batch = 1 if args.batch is None else args.batch
    result = plan_lib.build_plan(
        hw, target, draft, args.alpha, args.gamma, batch, args.prompt_len, args.output_len, args.dtype
    )
    print(finite_json(result) if args.json else plan_lib.format_plan(result))
    return 0


def _run_bild_plan(args: argparse.Namespace) -> int:
    from simulator import bild

    if any(getattr(args, name) is not None for name in (*SEARCH_OPTIONS, "tree", "acceptance", "gamma")) or args.batch not in (None, 1):
        raise UserError("--policy bild prices one sequence (batch 1) from measured rates; the search, --tree, --acceptance, --gamma and --batch do not apply")
    data, row = bild.load_rates(args.bild_rates, args.fallback, args.rollback)
    target, small = bild.pair_of(data) if args.draft is None else (load_model(args.model), load_model(args.draft))
    result = bild.bild_plan(load_profile(args.gpu), target, small, data, row, args.prompt_len, args.output_len, args.dtype)
    print(finite_json(result) if args.json else bild.format_bild_plan(result))
    return 0


def _run_tree_plan(args: argparse.Namespace) -> int:
    from simulator import tree

    if any(getattr(args, name) is not None for name in SEARCH_OPTIONS):
        raise UserError("--tree and --draft medusa price one configuration; the search (--rate with an SLO) takes linear drafts only")
    result = tree.tree_plan_from_args(args)
    print(finite_json(result) if args.json else tree.format_tree_plan(result))
    return 0


def _run_plan_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulator import capacity, gpu_choice
    from simulator.parallel import Runner
    from simulator.paths import check_writable_dir

    plot_dir = Path(args.plot_dir or capacity.DEFAULT_PLOT_DIR)
    queries = {}
    for gpu in gpu_choice.parse_gpus(args.gpu):
        query = capacity.build_query(
            gpu, args.model, args.rate, args.slo_ttft_p99, args.slo_tpot_p99, args.prompt_len, args.output_len,
            args.max_gpus, args.alpha, args.dtype, args.requests, args.seed, args.engine,
        )  # fmt: skip
        queries.setdefault(query.hw.name, query)
    if args.gamma is not None:
        plan_lib.check_gamma_fits(args.gamma, query.prompt_tokens, query.output_tokens, query.target)
    prices = gpu_choice.parse_prices(args.price or [], list(queries))
    drafts = None if args.draft is None else [capacity.NO_DRAFT, args.draft]
    cross = len(queries) > 1 or bool(prices)
    runner = Runner(args.workers, ray=args.ray, ray_address=args.ray_address)
    check_writable_dir(plot_dir)
    reports, jobs = {}, []
    for name, query in queries.items():
        reports[name] = capacity.search(
            query,
            drafts=drafts,
            gammas=capacity.GAMMAS if args.gamma is None else (args.gamma,),
            max_batches=capacity.MAX_BATCHES if args.batch is None else (args.batch,),
            runner=runner,
        )
        jobs += capacity.plot_jobs(reports[name], query, plot_dir / name if cross else plot_dir, drafts)
    if cross:
        report = gpu_choice.cross_report(reports, prices)
        failed = report["fewest_gpus"] is None
        formatted = gpu_choice.format_cross
    else:
        report = reports[name]
        failed = report["recommendation"] is None
        formatted = capacity.format_search
    report["plots"] = [path for path, _ in jobs]
    print(finite_json(report) if args.json else formatted(report), flush=True)
    for _, draw in jobs:  # after the result (which names them): a plot that fails loses no figure
        draw()
    if failed:
        raise UserError(report["verdict"])
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from simulator import sweep
    from simulator.parallel import Runner
    from simulator.paths import check_writable_file

    out = Path(args.out)
    check_writable_file(out)
    points = sweep.expand(sweep.load_spec(args.spec), args.spec)
    sweep.check_points(points, args.spec)
    runner = Runner(args.workers, ray=args.ray, ray_address=args.ray_address)
    with tqdm(total=0, desc="sweep", unit="point", file=sys.stderr, mininterval=0.5, leave=False) as bar:

        def on_total(todo: int, skipped: int) -> None:
            bar.total = todo
            bar.refresh()

        counts = sweep.run_sweep(points, out, resume=args.resume, runner=runner, progress=bar.update, on_total=on_total)
    print(f"sweep: {counts['simulated']} points simulated, {counts['skipped']} already in {out}; {counts['rows']} rows "
          f"({runner.backend})")  # fmt: skip
    return 0


def _add_runner_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--workers", type=int, default=None, help=f"{what} run on this many local processes, or CPUs of a local Ray (default: the cores this process may use)")
    p.add_argument("--ray", action="store_true", help=f"run the {what} on a local Ray started for this command (needs {'.[ray]'!r})")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help=f"run the {what} on the Ray cluster at ADDR (host:port or ray://host:port; its nodes need this package)")


def _run_profiles(args: argparse.Namespace) -> int:
    rows = plan_lib.profiles_table(shipped_profiles())
    print(finite_json(rows) if args.json else plan_lib.format_profiles(rows))
    return 0


def _check_fit_counts(args: argparse.Namespace) -> None:
    if args.fit_rows < 1:
        raise UserError(f"--fit-rows must be >= 1, got {args.fit_rows}")
    if getattr(args, "few_shot", 0) < 0:
        raise UserError(f"--few-shot must be >= 0, got {args.few_shot}")


def _run_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulator import validate as val
    from simulator.paths import check_writable_dir

    if args.e2e:
        return _run_validate_e2e(args)
    if args.results is not None or args.max_requests is not None:
        raise UserError("--results and --max-requests go with --e2e")
    _check_fit_counts(args)
    if args.plot_dir:
        check_writable_dir(Path(args.plot_dir))
    folders = [Path(d) for d in (args.data or [str(val.DEFAULT_DATA_DIR)])]
    out = val.validate(folders, args.fit_gpu, args.holdout_gpu, args.few_shot, args.fit_rows, progress=val.progress_to_stderr)
    print(finite_json(val.public(out)) if args.json else val.format_validation(out))
    if args.plot_dir:
        for path in val.plot_validation(out, Path(args.plot_dir)):
            print(f"validate: wrote {path}", file=sys.stderr)
    return 0


def _run_validate_e2e(args: argparse.Namespace) -> int:
    from simulator import e2e_validate as ev
    from simulator import validate as val

    kernel_flags = [flag for flag, v in (("--data", args.data), ("--fit-gpu", args.fit_gpu), ("--holdout-gpu", args.holdout_gpu),
                                         ("--few-shot", args.few_shot), ("--plot-dir", args.plot_dir)) if v]  # fmt: skip
    if kernel_flags:
        raise UserError(f"{kernel_flags[0]} is an option of the kernel validation, not of --e2e")
    max_requests = ev.DEFAULT_MAX_REQUESTS if args.max_requests is None else args.max_requests
    out = ev.validate_e2e(args.results, max_requests, progress=val.progress_to_stderr)
    print(finite_json(out) if args.json else ev.format_e2e(out))
    return 0


def _run_fit_engine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulator import e2e_validate as ev
    from simulator.engine import FITTED_PATH
    from simulator.paths import check_writable_file, write_json_atomic

    if args.max_requests < 1:
        raise UserError(f"--max-requests must be >= 1, got {args.max_requests}")
    out_path = Path(args.out) if args.out else FITTED_PATH
    check_writable_file(out_path)
    fitted = ev.fit_engines(args.results, args.max_requests, progress=lambda msg: print(f"fit-engine: {msg}", file=sys.stderr, flush=True))
    write_json_atomic(out_path, fitted)
    print(f"fit-engine: wrote {out_path} (engines {', '.join(fitted['engines'])}, fit rows {', '.join(map(str, fitted['fit_rows']))})")
    return 0


def _run_fit_kernels(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulator import kernel_fit
    from simulator import validate as val
    from simulator.data import load_tables
    from simulator.gpu_model.params import FITTED_PATH
    from simulator.paths import check_writable_file, write_json_atomic

    _check_fit_counts(args)
    out_path = Path(args.out) if args.out else FITTED_PATH
    check_writable_file(out_path)
    folders = [Path(d) for d in (args.data or [str(val.DEFAULT_DATA_DIR)])]
    fitted = kernel_fit.fit_all(load_tables(folders), args.fit_rows, progress=val.progress_to_stderr)
    write_json_atomic(out_path, fitted)
    print(f"fit-kernels: wrote {out_path} ({len(fitted['groups'])} groups, intervals for {len(fitted['intervals'])} kinds)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from simulator import bild, capacity

    parser = Parser(
        prog="python -m simulator",
        description="Predict LLM decoding performance (speculative decoding, FlashAttention) on a GPU.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "plan",
        help="decoding of one model on one GPU; with --rate and an SLO, the fewest GPUs that meet it",
        description="Predict prefill time, autoregressive tokens/s, speculative decoding over gamma "
        "(expected tokens per step, tokens/s, speedup, recommended gamma) and FlashAttention tiling "
        "at the prompt length, from the GPU profile and the cost model. With --rate and --slo-ttft-p99 "
        "and/or --slo-tpot-p99: search replicas x tensor parallelism, draft, gamma and max batch, "
        "screen with the cost model, simulate the survivors in parallel, and recommend the fewest GPUs "
        "that meet the SLO (exit code 2 with the binding constraint when none does). With --gpu a100,h100,...: search each "
        "GPU type and name the one that needs the fewest GPUs and, given --price GPU=USD_PER_HOUR, the cheapest per million "
        "output tokens.",
    )
    p.add_argument("--gpu", default=plan_lib.DEFAULT_GPU, help="device name or alias (see `profiles`), or a path to a YAML profile (default: %(default)s); in a search: a comma-separated list compares GPU types")
    p.add_argument("--model", default=plan_lib.DEFAULT_TARGET, help="target model name or path to a HuggingFace config.json (default: %(default)s)")
    p.add_argument("--draft", default=None, help=f"draft model name or config.json, or medusa (heads on the target; needs --tree) (default: {plan_lib.DEFAULT_DRAFT}; in a search: every compatible draft and layer-skip, or none and this one)")
    p.add_argument("--alpha", type=float, default=plan_lib.DEFAULT_ALPHA, help="acceptance rate in [0, 1] (default: %(default)s, an assumption; measure yours with `python -m reference specdec`)")
    p.add_argument("--gamma", type=int, default=None, help="draft tokens per step to report on (default: the recommended one); the table spans 0..max(8, gamma); in a search: try only this gamma")
    p.add_argument("--batch", type=int, default=None, help="sequences decoded together (default: 1); in a search: try only this max batch")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens (default: %(default)s)")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32", "fp8"], help="weight and activation dtype (default: %(default)s)")
    p.add_argument("--tree", default=None, metavar="SPEC", help="tree speculation: a full tree AxBxC (e.g. 3x2x1), rank paths as JSON ([[0],[1],[0,0]]) "
                   "or a JSON file of them, or best:N (the best N-node tree for the acceptance table); with --draft medusa: Medusa heads, "
                   "else a draft-model tree; compared with linear drafting at --alpha")
    p.add_argument("--acceptance", default=None, metavar="FILE", help="with --tree: tree acceptance JSON written by `python -m reference specdec "
                   "--acceptance-out` (default for --draft medusa: reference/weights/medusa_acceptance.json where present)")
    together = "; --rate, --slo-ttft-p99 and --slo-tpot-p99 go together and start the search"
    p.add_argument("--rate", type=float, default=None, help=f"search: mean Poisson arrival rate, requests per second{together}")
    p.add_argument("--slo-ttft-p99", default=None, help=f"search: p99 time to first token, e.g. 2s, 500ms, or a bare number of seconds{together}")
    p.add_argument("--slo-tpot-p99", default=None, help=f"search: p99 time per output token, e.g. 50ms or 0.05{together}")
    p.add_argument("--max-gpus", type=int, default=None, help=f"search: most GPUs to consider (default: {capacity.DEFAULT_MAX_GPUS})")
    p.add_argument("--requests", type=int, default=None, help=f"search: requests simulated per replica (default: {capacity.DEFAULT_REQUESTS})")
    p.add_argument("--seed", type=int, default=None, help="search: seed of arrivals and acceptance draws (default: 0)")
    p.add_argument("--engine", default=None, help="search: simulate with a serving engine's host overheads and batching (its max batch "
                   "still searched): ideal (kernels only, unchunked), vllm, vllm-v0 or sglang, as `simulate --engine` (default: ideal)")
    p.add_argument("--plot-dir", default=None, help=f"search: folder the three plots are written to, one subfolder per GPU type when there are several (default: {capacity.DEFAULT_PLOT_DIR})")
    p.add_argument("--price", action="append", default=None, metavar="GPU=USD_PER_HOUR", help="search: price of one GPU of a type searched, USD per hour (repeatable; no built-in prices): adds the cost per million output tokens and the cheapest type")
    _add_runner_options(p, "search's simulations")
    bild.add_policy_options(p, "speculative: exact speculative decoding; bild: Big Little Decoder (Kim et al. 2023), INEXACT: predicted tokens/s at "
                            "batch 1 from the rates of --bild-rates, printed with the quality figures measured there",
                            "--policy bild: written by `python -m reference bild --rates-out FILE`; its pair is priced unless --draft is given "
                            "(then --model with --draft)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON (keys documented in the README)")
    p.set_defaults(run=_run_plan)

    from simulator.kernel_fit import FIT_ROWS_PER_GPU

    p = sub.add_parser(
        "validate",
        help="how well the GPU kernel model predicts GPUs it was not fitted to",
        description="Read every table listed in each data folder's manifest.csv and report, per GPU and kind (prefill and "
        "decode attention per kernel library, GEMM per dtype, collectives, operators, published attention): n, median "
        "APE, MAPE and p90 APE when the model is fitted on every other GPU and predicts this one (leave-one-GPU-out), when "
        "it is fitted on a third of this GPU's rows (in-GPU), and for the naive roofline max(FLOPs/peak, bytes/bandwidth)"
        "/0.7 + 5 us; the coverage of the 80% prediction interval on held-out GPUs; and the accuracy targets, met or not.",
    )
    p.add_argument("--data", action="append", metavar="DIR", help="a data folder with a manifest.csv; repeat for several (default: ../shared/data beside the repository)")
    p.add_argument("--fit-gpu", action="append", metavar="NAME", help="fit only on these GPUs' tables (repeatable; default: every GPU but the one predicted)")
    p.add_argument("--holdout-gpu", action="append", metavar="NAME", help="predict only these GPUs (repeatable; default: each GPU in turn)")
    p.add_argument("--few-shot", type=int, default=0, metavar="K", help="also fit with K rows of the predicted GPU added (what a user can measure with calibrate) and score the rest")
    p.add_argument("--fit-rows", type=int, default=FIT_ROWS_PER_GPU, metavar="N", help="rows of each GPU a fit samples, fixed seed (default: %(default)s); every row is predicted")
    p.add_argument("--plot-dir", default=None, help="write one predicted-vs-measured plot per kind (PNG) into this folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON (layout in the README)")
    p.add_argument("--e2e", action="store_true", help="instead: predict every published end-to-end serving result (bench serve: TTFT, TPOT, "
                   "output tokens/s) with its engine's preset and with --engine ideal, and report median and mean APE on the held-out rows")
    p.add_argument("--results", default=None, metavar="CSV", help="with --e2e: a results file with the columns of simulator/e2e/published_serving.csv (default: that file)")
    p.add_argument("--max-requests", type=int, default=None, metavar="N", help="with --e2e: requests simulated per open- or closed-loop row (default: 200)")
    p.set_defaults(run=_run_validate)

    p = sub.add_parser(
        "fit-engine",
        help="fit the vllm and sglang engine presets (host overheads) to the fit rows of the published serving results",
        description="Fit each engine's host-time coefficients (simulator.engine: per step, per sequence, per token, per eager layer, per "
        "request, per prompt token) by Levenberg-Marquardt on the log errors of TTFT, TPOT and output tokens/s of that engine's fit rows "
        "(simulator.e2e.split), simulating each row, from several fixed starts and from the shipped presets, and write them with the "
        "data's SHA-256 to simulator/engine_fitted.json (or --out).",
    )
    p.add_argument("--results", default=None, metavar="CSV", help="results file (default: simulator/e2e/published_serving.csv)")
    p.add_argument("--out", default=None, help="where to write the fit (default: the shipped simulator/engine_fitted.json)")
    p.add_argument("--max-requests", type=int, default=200, metavar="N", help="requests simulated per open- or closed-loop row (default: %(default)s)")
    p.set_defaults(run=_run_fit_engine)

    p = sub.add_parser(
        "fit-kernels",
        help="fit the GPU kernel model to the data and write the parameters plan and simulate use",
        description="Fit every kernel family on all GPUs' tables in the data folders, run the leave-one-GPU-out validation "
        "for the 80% intervals, and write the parameters, intervals and the data's fingerprint (hashes and upstream "
        "commits) to simulator/gpu_model/fitted.json (or --out).",
    )
    p.add_argument("--data", action="append", metavar="DIR", help="a data folder with a manifest.csv; repeat for several (default: ../shared/data)")
    p.add_argument("--out", default=None, help="where to write the fit (default: the shipped simulator/gpu_model/fitted.json)")
    p.add_argument("--fit-rows", type=int, default=FIT_ROWS_PER_GPU, metavar="N", help="rows of each GPU a fit samples (default: %(default)s)")
    p.set_defaults(run=_run_fit_kernels)

    from simulator import calibration, simulate

    calibration.add_parsers(sub)
    bench = sub.add_parser("bench", help="benchmarks that print measured figures",
                           description="Benchmarks of the simulator itself: each prints the figures it measured.").add_subparsers(dest="benchmark", required=True)  # fmt: skip
    simulate.add_parsers(sub, bench)

    p = sub.add_parser(
        "sweep",
        help="simulate every point of a grid or list of configurations, one Parquet row each",
        description="Read a YAML spec (fixed options, a grid of option: [values] and/or a list of points; keys are simulate's "
        "options: gpu, model, draft, gamma, alpha, max_batch, max_batched_tokens, tp, chunked_prefill, prefill_apart, scheduler_steps, rate, arrival, burstiness, "
        "requests, prompt_len, output_len, lengths, dtype, seed, ...), check every point, then simulate each (with and without "
        "speculation, as simulate does) and write one row per point (its options and the simulate --json report, flattened) "
        "to a Parquet file, rewritten atomically after every completed point.",
    )
    p.add_argument("spec", help="the sweep spec (YAML)")
    p.add_argument("--out", required=True, help="the Parquet file to write (read by pandas.read_parquet)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and simulate only the points missing there")
    _add_runner_options(p, "simulations")
    p.set_defaults(run=_run_sweep)

    p = sub.add_parser("profiles", help="list the shipped GPU profiles with key figures",
                       description="List the shipped hardware profiles (hardware_profiles/*.yaml): name, every alias, SMs, SRAM per SM, "
                       "memory, bandwidth, fp16 peak, the roofline ridge and how many figures are estimates.")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(run=_run_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
