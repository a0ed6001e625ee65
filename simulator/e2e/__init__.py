"""Published end-to-end serving measurements (`vllm bench serve`, SGLang's `bench_serving`, and the same
client against TensorRT-LLM): one row per measured point, with every setting a simulation needs to
run it again and the latencies and throughputs the benchmark printed.

The shipped table is `published_serving.csv` beside this file; its columns, their units and how the
rows were chosen are in `README.md` there. `load` reads it (or a user's file with the same columns),
resolves each GPU to a hardware profile and each model to a model spec, and returns typed rows. Bad
input is one `UserError` line naming the file, the row and its URL: a missing column or setting, an
unknown GPU, model, engine, dtype or dataset, a count or metric that is not a positive number, GPUs
that do not match TP x PP x DP.

`is_fit_row` splits the rows for a fit: a row calibrates when a stable hash of its URL and settings
falls on every third value (`FIT_EVERY`), and is held out otherwise. The split depends on nothing
else (not the file's order, not the measured figures), so a row keeps its side when rows are added.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from simulator.errors import UserError
from simulator.hardware import DTYPE_BYTES, HardwareProfile, load_profile
from simulator.models import BUILTIN_MODELS, ModelSpec

PUBLISHED_CSV = Path(__file__).resolve().parent / "published_serving.csv"

ENGINES = ("vllm", "sglang", "tensorrt-llm")
DATASETS = ("sharegpt", "random")  # ShareGPT conversations (their own lengths), or fixed random lengths
REQUIRED = ("gpu", "n_gpus", "tp", "pp", "dp", "model", "engine", "engine_version", "dtype", "dataset", "request_rate", "url")
COUNTS = ("input_len", "output_len", "max_concurrency", "num_scheduler_steps", "num_prompts", "total_input_tokens", "total_output_tokens")
METRICS = (
    "ttft_mean_ms", "ttft_median_ms", "ttft_p99_ms", "tpot_mean_ms", "tpot_median_ms", "tpot_p99_ms",
    "itl_mean_ms", "itl_median_ms", "itl_p99_ms", "e2el_median_ms", "request_per_s", "output_tok_per_s",
)  # fmt: skip
TEXT = ("quote_locator", "notes")
COLUMNS = (*REQUIRED, *COUNTS, *METRICS, *TEXT)

# Published model ids -> the catalogue's specs (simulator.models.BUILTIN_MODELS). An FP8 checkpoint has
# its model's shapes (the row's dtype says fp8). Llama 3.1 has Llama 3's shapes in its config.json
# (hidden, layers, heads, KV heads, FFN, vocabulary); only its context (131072) and RoPE scaling differ.
MODEL_IDS = {
    "meta-llama/llama-3.1-8b-instruct": "llama-3-8b",
    "meta-llama/llama-3.1-70b-instruct": "llama-3-70b",
    "qwen/qwen2.5-0.5b-instruct": "qwen2.5-0.5b",
    "qwen/qwen3-8b": "qwen3-8b",
    "qwen/qwen3-8b-fp8": "qwen3-8b",
    "qwen/qwen3-14b": "qwen3-14b",
    "qwen/qwen3-14b-fp8": "qwen3-14b",
}

# Model size classes by parameter count (ModelSpec.n_params): the classes the validation reports on.
SMALL_MAX_PARAMS = 2e9  # below: small
LARGE_MIN_PARAMS = 70e9  # at or above: large; between: mid
FIT_EVERY = 3  # every third row (by hash) calibrates; the rest is held out


@dataclass(frozen=True)
class ServingResult:
    """One published `bench serve` point. Lengths are tokens; a rate is requests per second (inf: all
    requests sent at once); `metrics` holds only what the source reported, in the units its key names."""

    row: int  # 1-based data row of the file
    gpu: str  # as the source names it
    profile: HardwareProfile = field(repr=False)
    n_gpus: int
    tp: int
    pp: int
    dp: int
    model_id: str  # as published (a HuggingFace id)
    spec: ModelSpec = field(repr=False)
    engine: str
    engine_version: str
    dtype: str
    dataset: str
    input_len: int | None  # random dataset: the fixed prompt length; ShareGPT: None
    output_len: int | None
    request_rate_per_s: float
    max_concurrency: int | None  # closed loop: this many users, each sending its next request when the last ends
    num_scheduler_steps: int | None  # the server's --num-scheduler-steps (vLLM before 0.7) where set; None: one
    num_prompts: int | None  # None only for a closed-loop point whose source does not state it
    total_input_tokens: int | None  # as the benchmark printed them (ShareGPT: the sampled prompts' total)
    total_output_tokens: int | None
    metrics: dict[str, float]
    url: str
    quote_locator: str
    notes: str

    @property
    def size_class(self) -> str:
        n = self.spec.n_params
        return "small" if n < SMALL_MAX_PARAMS else "large" if n >= LARGE_MIN_PARAMS else "mid"

    @property
    def closed_loop(self) -> bool:
        return self.max_concurrency is not None


def resolve_model(model_id: str) -> ModelSpec:
    """A published model id (`MODEL_IDS`) or a catalogue name; UserError when neither."""
    key = model_id.strip().lower()
    name = MODEL_IDS.get(key, key)
    if name not in BUILTIN_MODELS:
        known = ", ".join([*sorted({k for k in MODEL_IDS}), *BUILTIN_MODELS])
        raise UserError(f"unknown model {model_id!r}; known: {known} (add its spec to simulator/models.py and its id to MODEL_IDS)")
    return BUILTIN_MODELS[name]


def _read(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a CSV file") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read as CSV: {' '.join(str(exc).split())}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserError(f"{path}: column {missing[0]} is missing; a results file needs {', '.join(REQUIRED)}")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise UserError(f"{path}: unknown column {unknown[0]!r}; the columns are {', '.join(COLUMNS)}")
    if df.empty:
        raise UserError(f"{path}: no rows")
    return df


def _number(text: str, where: str, column: str, integer: bool = False, allow_inf: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: {column} {text!r} is not a number") from None
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise UserError(f"{where}: {column} {text!r} is not a finite number")
    if value <= 0:
        raise UserError(f"{where}: {column} {text!r} must be > 0")
    if integer and value != int(value):
        raise UserError(f"{where}: {column} {text!r} is not a whole number")
    return int(value) if integer else value


def _row(values: dict[str, str], n: int, path: Path, profiles: dict[str, HardwareProfile]) -> ServingResult:
    url = values["url"].strip()
    where = f"{path} row {n} ({url or 'no url'})"
    for column in REQUIRED:
        if not values[column].strip():
            raise UserError(f"{where}: {column} is empty; every row needs {', '.join(REQUIRED)}")
    counts = {c: _number(values[c], where, c, integer=True) if values.get(c, "").strip() else None for c in COUNTS}
    n_gpus, tp, pp, dp = (_number(values[c], where, c, integer=True) for c in ("n_gpus", "tp", "pp", "dp"))
    if n_gpus != tp * pp * dp:
        raise UserError(f"{where}: n_gpus {n_gpus} is not tp x pp x dp = {tp * pp * dp}")
    rate = _number(values["request_rate"], where, "request_rate", allow_inf=True)
    engine, dtype, dataset = (values[c].strip().lower() for c in ("engine", "dtype", "dataset"))
    for column, value, known in (("engine", engine, ENGINES), ("dtype", dtype, tuple(DTYPE_BYTES)), ("dataset", dataset, DATASETS)):
        if value not in known:
            raise UserError(f"{where}: unknown {column} {values[column]!r}; known: {', '.join(known)}")
    if dataset == "random" and (counts["input_len"] is None or counts["output_len"] is None):
        raise UserError(f"{where}: a random dataset needs input_len and output_len")
    if counts["num_prompts"] is None and counts["max_concurrency"] is None:
        raise UserError(f"{where}: num_prompts is empty; only a closed-loop point (max_concurrency set) may leave it out")
    metrics = {c: _number(values[c], where, c) for c in METRICS if values[c].strip()}
    if not metrics:
        raise UserError(f"{where}: no metric reported; a row needs at least one of {', '.join(METRICS)}")
    gpu = values["gpu"].strip()
    if gpu not in profiles:
        try:
            profiles[gpu] = load_profile(gpu)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    try:
        spec = resolve_model(values["model"])
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return ServingResult(
        row=n, gpu=gpu, profile=profiles[gpu], n_gpus=n_gpus, tp=tp, pp=pp, dp=dp, model_id=values["model"].strip(),
        spec=spec, engine=engine, engine_version=values["engine_version"].strip(), dtype=dtype, dataset=dataset,
        input_len=counts["input_len"], output_len=counts["output_len"], request_rate_per_s=rate,
        max_concurrency=counts["max_concurrency"], num_scheduler_steps=counts["num_scheduler_steps"], num_prompts=counts["num_prompts"],
        total_input_tokens=counts["total_input_tokens"], total_output_tokens=counts["total_output_tokens"],
        metrics=metrics, url=url, quote_locator=values.get("quote_locator", "").strip(), notes=values.get("notes", "").strip(),
    )  # fmt: skip


def load(path: Path | str | None = None) -> list[ServingResult]:
    """The rows of a published-results CSV (default: the shipped `published_serving.csv`), each checked
    and resolved; the whole file or a UserError, never part of it."""
    path = Path(path) if path is not None else PUBLISHED_CSV
    df = _read(path)
    profiles: dict[str, HardwareProfile] = {}
    records = df.to_dict(orient="records")
    return [_row({c: str(r.get(c, "")) for c in COLUMNS}, i, path, profiles) for i, r in enumerate(records, start=1)]


def split_key(r: ServingResult) -> str:
    """What a row's side of the split is decided by: its source and its settings (never its metrics)."""
    settings = (r.url, r.profile.name, r.n_gpus, r.tp, r.pp, r.dp, r.model_id.lower(), r.engine, r.engine_version, r.dtype,
                r.dataset, r.input_len, r.output_len, r.request_rate_per_s, r.max_concurrency, r.num_prompts)  # fmt: skip
    return "|".join(str(s) for s in settings)


def is_fit_row(r: ServingResult, every: int = FIT_EVERY) -> bool:
    """True for a row the fit may see: the first 8 bytes of SHA-256(split_key), as an integer, are a
    multiple of `every`. Held-out rows (False) are for reporting only."""
    if every < 1:
        raise UserError(f"every must be >= 1, got {every}")
    digest = hashlib.sha256(split_key(r).encode()).digest()
    return int.from_bytes(digest[:8], "big") % every == 0


def split(rows: list[ServingResult], every: int = FIT_EVERY) -> tuple[list[ServingResult], list[ServingResult]]:
    """(fit rows, held-out rows), each in file order."""
    fit = [r for r in rows if is_fit_row(r, every)]
    return fit, [r for r in rows if not is_fit_row(r, every)]


def frame(rows: list[ServingResult]) -> pd.DataFrame:
    """The rows as a table: settings (GPU by profile name, model by catalogue name), size class, split
    side and one column per metric (NaN where the source did not report it)."""
    return pd.DataFrame(
        [{"row": r.row, "gpu": r.profile.name, "n_gpus": r.n_gpus, "tp": r.tp, "model": r.spec.name, "model_id": r.model_id,
          "size_class": r.size_class, "engine": r.engine, "engine_version": r.engine_version, "dtype": r.dtype,
          "dataset": r.dataset, "input_len": r.input_len, "output_len": r.output_len, "request_rate": r.request_rate_per_s,
          "max_concurrency": r.max_concurrency, "num_scheduler_steps": r.num_scheduler_steps, "num_prompts": r.num_prompts, "fit": is_fit_row(r),
          **{m: r.metrics.get(m, math.nan) for m in METRICS}, "url": r.url} for r in rows]
    )  # fmt: skip


def summary(rows: list[ServingResult]) -> dict:
    """Counts by GPU, size class, engine and split side: what the table covers."""
    df = frame(rows)
    return {
        "rows": len(rows),
        "sources": int(df["url"].nunique()),
        "by_gpu": {k: int(v) for k, v in df["gpu"].value_counts().sort_index().items()},
        "by_size_class": {k: int(v) for k, v in df["size_class"].value_counts().sort_index().items()},
        "by_engine": {k: int(v) for k, v in df["engine"].value_counts().sort_index().items()},
        "by_model": {k: int(v) for k, v in df["model"].value_counts().sort_index().items()},
        "closed_loop": int(df["max_concurrency"].notna().sum()),
        "fit": int(df["fit"].sum()),
        "held_out": int((~df["fit"]).sum()),
    }
