"""Measured and published GPU tables, read where they lie through their folder's `manifest.csv`.

A data folder holds `manifest.csv` (columns `file, gpu, device, kind, framework, version, rows,
source, licence`; `file`, `gpu` and `kind` are required) and the files it lists. Any number of
folders can be read together. Each manifest `gpu` resolves to a hardware profile by name or alias,
else its `device` (the name the driver reports); `(per row ...)` means the file has a `gpu` column of
its own. Every kind becomes one table with the same columns whatever its source, ready for the
kernel model:

- `gemm`: dtype (bf16, fp8, fp8_block, nvfp4), m, n, k
- `prefill-attention`, `decode-attention`: library (fa2, flashinfer), b, h, hk, d, n_q, n_kv,
  kv_bytes. A GEMM dtype, kernel source or KV-cache dtype the model does not price (a newer
  table's) is read as `unsupported`: the row is kept, and `validate` counts it without fitting or
  scoring it. A decode row's context is the table's `step` (its `isl` is 1): the collector runs
  sequences of `step` tokens with one new query each, so the call reads `step` keys
- `collective`: op, n_gpus, bytes. NCCL tables' `message_size` counts elements (the collector
  divides the byte size it ran by the element size), so bytes = message_size x element size
- `operators`: op, tokens, tp and the model's dimensions (vidur's per-operator profiles)
- `published-attention`: the published rows as they are (see `simulator.published`)
plus, on every row: gpu (profile name), generation, framework, manifest_source, file, row (1-based data
row of the file) and measured_s.

Bad input ends in one `UserError` line naming the file (and row): no manifest, a listed file
missing, a missing column, a latency that is not a positive number. A manifest row of a kind this
project does not know, or whose GPU has no profile (named with the closest profiles), is left out
and named in `Tables.not_read`, so a folder with a newer collector's tables or a part without a
profile still gives the rest; a folder with nothing else is the same error.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.errors import UserError
from simulator.hardware import HardwareProfile, load_profile, shipped_profiles

MANIFEST = "manifest.csv"
MANIFEST_REQUIRED = ("file", "gpu", "kind")
PER_ROW_GPU = "(per row"

KIND_COLUMNS: dict[str, tuple[str, ...]] = {
    "gemm": ("gemm_dtype", "m", "n", "k", "latency_ms"),
    "prefill-attention": ("kernel_source", "batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim", "kv_cache_dtype", "latency_ms"),
    "decode-attention": ("kernel_source", "batch_size", "step", "num_heads", "num_key_value_heads", "head_dim", "kv_cache_dtype", "latency_ms"),
    "collective": ("op_name", "nccl_dtype", "num_gpus", "message_size", "latency_ms"),
    "operators": ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "num_tokens", "num_tensor_parallel_workers"),
    "published-attention": ("source", "gpu", "kernel", "pass", "causal", "batch", "heads", "kv_heads", "seqlen", "head_dim", "dtype", "metric", "value"),
}
GEMM_DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "nvfp4"}
ATTENTION_LIBRARIES = {"vllm_flash_attn": "fa2", "flash_attn": "fa2", "fa2": "fa2", "vllm_flashinfer": "flashinfer", "flashinfer": "flashinfer"}
KV_BYTES = {"bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp8_e4m3": 1.0, "fp8_e5m2": 1.0}  # vLLM's --kv-cache-dtype names
NCCL_ELEMENT_BYTES = {"half": 2, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "float": 4, "float32": 4}
VIDUR_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")  # fmt: skip


@dataclass
class Tables:
    """The tables of every kind read from one or more data folders, and the profiles they name."""

    kinds: dict[str, pd.DataFrame]
    profiles: dict[str, HardwareProfile]
    folders: list[Path]
    not_read: list[str] = field(default_factory=list)  # manifest rows left out, each with its reason

    def gpus(self, kind: str | None = None) -> list[str]:
        frames = [self.kinds[kind]] if kind else list(self.kinds.values())
        return sorted({g for f in frames if f is not None and len(f) for g in f["gpu"].unique()})


def _resolve_gpu(name: str, where: str, cache: dict[str, HardwareProfile]) -> HardwareProfile:
    key = name.strip()
    if key not in cache:
        try:
            cache[key] = load_profile(key)
        except UserError:
            names = list(shipped_profiles())
            aliases = [a for p in shipped_profiles().values() for a in p.aliases]
            close = difflib.get_close_matches(key.lower(), [n.lower() for n in names] + aliases, n=3, cutoff=0.3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise UserError(f"{where}: unknown GPU {key!r}{hint} (add a profile to hardware_profiles/ or an alias)") from None
    if cache[key].kind != "gpu":
        raise UserError(f"{where}: {key!r} names a {cache[key].kind} profile, not a GPU")
    return cache[key]


def _resolve_manifest_gpu(entry: dict, where: str, cache: dict[str, HardwareProfile]) -> HardwareProfile:
    """A manifest row's GPU: its `gpu`, else its `device` (the name the driver reports, e.g. `NVIDIA
    H100 80GB HBM3`), so a folder whose `gpu` ids this project does not know still resolves."""
    device = (entry.get("device") or "").strip()
    try:
        return _resolve_gpu(entry["gpu"], where, cache)
    except UserError as unknown:
        error = unknown
    if device:
        try:
            return _resolve_gpu(device, where, cache)
        except UserError:
            pass
    raise error


def _read_table(path: Path, kind: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise UserError(f"{path}: listed in {MANIFEST} but missing") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read as CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in KIND_COLUMNS[kind] if c not in df.columns]
    if missing:
        raise UserError(f"{path}: kind {kind} needs column {missing[0]!r} (has {', '.join(map(str, df.columns))})")
    return df


def _positive(df: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{path}: row {i + 1}: {column} must be a positive number, got {df[column].iloc[i]!r}")
    return values


def _integers(df: pd.DataFrame, columns, path: Path) -> dict[str, np.ndarray]:
    out = {}
    for c in columns:
        out[c] = _positive(df, c, path)
    return out


UNSUPPORTED = "unsupported"  # a GEMM dtype, attention library or KV dtype the model does not price: kept, never fitted or scored


def _mapped(df: pd.DataFrame, column: str, mapping: dict, path: Path, strict: bool = True) -> np.ndarray:
    """`column` through `mapping`; an unknown value is an error, or with `strict=False` UNSUPPORTED
    (a measurement of something the model does not price, such as a GEMM dtype of a newer table)."""
    raw = df[column].astype(str).str.strip()
    values = raw.str.lower()  # the mappings' names are lower case
    unknown = ~values.isin(list(mapping))
    if not strict:
        return np.where(unknown.to_numpy(), UNSUPPORTED, values.map(mapping).to_numpy(dtype=object))
    if unknown.any():
        i = int(np.argmax(unknown.to_numpy()))
        raise UserError(f"{path}: row {i + 1}: unknown {column} {raw.iloc[i]!r}; known: {', '.join(sorted(set(mapping)))}")
    return values.map(mapping).to_numpy()


def _standardise(kind: str, df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The kind's table in the model's terms (see the module docstring)."""
    if kind == "gemm":
        n = _integers(df, ("m", "n", "k"), path)
        return pd.DataFrame({"dtype": _mapped(df, "gemm_dtype", GEMM_DTYPE_NAMES, path, strict=False), **n,
                             "measured_s": _positive(df, "latency_ms", path) * 1e-3})  # fmt: skip
    if kind in ("prefill-attention", "decode-attention"):
        n = _integers(df, ("batch_size", "num_heads", "num_key_value_heads", "head_dim"), path)
        if kind == "prefill-attention":
            n_q = n_kv = _positive(df, "isl", path)
        else:
            n_kv = _positive(df, "step", path)
            n_q = np.ones(len(df))
        h, hk = n["num_heads"], n["num_key_value_heads"]
        if (h % hk).any():
            i = int(np.argmax(h % hk != 0))
            raise UserError(f"{path}: row {i + 1}: num_heads {h[i]:g} is not a multiple of num_key_value_heads {hk[i]:g}")
        library = _mapped(df, "kernel_source", ATTENTION_LIBRARIES, path, strict=False)
        kv_dtype = _mapped(df, "kv_cache_dtype", KV_BYTES, path, strict=False)
        supported = (library != UNSUPPORTED) & (kv_dtype != UNSUPPORTED)
        return pd.DataFrame({"library": np.where(supported, library, UNSUPPORTED), "b": n["batch_size"], "h": h,
                             "hk": hk, "d": n["head_dim"], "n_q": n_q, "n_kv": n_kv,
                             "kv_bytes": np.where(supported, kv_dtype, 2.0).astype(float),
                             "measured_s": _positive(df, "latency_ms", path) * 1e-3})  # fmt: skip
    if kind == "collective":
        element = _mapped(df, "nccl_dtype", NCCL_ELEMENT_BYTES, path).astype(float)
        n = _integers(df, ("num_gpus", "message_size"), path)
        return pd.DataFrame({"op": df["op_name"].astype(str).str.strip().to_numpy(), "n_gpus": n["num_gpus"],
                             "bytes": n["message_size"] * element, "element_bytes": element,
                             "measured_s": _positive(df, "latency_ms", path) * 1e-3})  # fmt: skip
    if kind == "operators":
        n = _integers(df, KIND_COLUMNS["operators"][:7], path)
        frames = []
        for op in VIDUR_OPS:
            column = f"time_stats.{op}.median"
            if column not in df.columns:
                raise UserError(f"{path}: kind operators needs column {column!r}")
            frames.append(pd.DataFrame({"op": op, "tokens": n["num_tokens"], "tp": n["num_tensor_parallel_workers"],
                                        "d_model": n["n_embd"], "heads": n["n_head"], "kv_heads": n["n_kv_head"],
                                        "d_ff": n["n_expanded_embd"], "vocab": n["vocab_size"],
                                        "measured_s": _positive(df, column, path) * 1e-3, "row": np.arange(1, len(df) + 1)}))  # fmt: skip
        return pd.concat(frames, ignore_index=True)
    if kind == "published-attention":
        out = df.copy()
        out["measured_value"] = _positive(df, "value", path)
        return out
    raise UserError(f"{path}: unknown kind {kind!r}; known: {', '.join(KIND_COLUMNS)}")


def read_folder(folder: Path, profiles: dict[str, HardwareProfile], cache: dict, not_read: list[str] | None = None) -> dict[str, list[pd.DataFrame]]:
    """The tables of one folder, by kind. A manifest row of a kind this project does not know, or
    whose GPU resolves to no profile (a newer collector's, a part without a profile yet), is left
    out with its reason appended to `not_read`, so the rest of the folder is still read; without
    `not_read` it is an error."""
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise UserError(f"{folder}: no such data folder (pass --data DIR)")
    if not manifest.is_file():
        raise UserError(f"{folder}: no {MANIFEST} (a data folder lists its files in {MANIFEST})")
    try:
        rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{manifest}: cannot read as CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in MANIFEST_REQUIRED if c not in rows.columns]
    if missing:
        raise UserError(f"{manifest}: needs column {missing[0]!r} (has {', '.join(rows.columns)})")
    out: dict[str, list[pd.DataFrame]] = {}
    for i, entry in enumerate(rows.to_dict("records"), start=1):
        where = f"{manifest}: row {i}"
        kind = entry["kind"].strip()
        path = folder / entry["file"].strip()
        try:
            if kind not in KIND_COLUMNS:
                raise UserError(f"{where}: unknown kind {kind!r}; known: {', '.join(KIND_COLUMNS)}")
            p = None if entry["gpu"].strip().startswith(PER_ROW_GPU) else _resolve_manifest_gpu(entry, where, cache)
        except UserError as unknown:
            if not_read is None:
                raise
            not_read.append(f"{unknown} ({entry['file'].strip()})")
            continue
        if not path.is_file():
            raise UserError(f"{where}: file {entry['file']!r} does not exist")
        table = _standardise(kind, _read_table(path, kind), path)
        if p is None:
            gpu_values = table["gpu"].astype(str)
            resolved = {g: _resolve_gpu(g, f"{path}: gpu column", cache) for g in gpu_values.unique()}
            table["gpu"] = gpu_values.map({g: p.name for g, p in resolved.items()})
            for p in resolved.values():
                profiles[p.name] = p
        else:
            profiles[p.name] = p
            table["gpu"] = p.name
        table["generation"] = table["gpu"].map(lambda g: profiles[g].generation)
        table["framework"] = entry.get("framework", "").strip()
        table["version"] = entry.get("version", "").strip()
        table["manifest_source"] = entry.get("source", "").strip()
        table["file"] = str(path)
        if "row" not in table.columns:
            table["row"] = np.arange(1, len(table) + 1)
        out.setdefault(kind, []).append(table)
    return out


def load_tables(folders: list[Path], kinds: tuple[str, ...] | None = None) -> Tables:
    """Every file listed in each folder's manifest, by kind (only `kinds` if given). Rows of an
    unknown kind or GPU are left out and named in `not_read` (`read_folder`); if nothing else is
    left, the first of them is the error."""
    profiles: dict[str, HardwareProfile] = {}
    cache: dict[str, HardwareProfile] = {}
    merged: dict[str, list[pd.DataFrame]] = {}
    not_read: list[str] = []
    for folder in folders:
        for kind, frames in read_folder(Path(folder), profiles, cache, not_read).items():
            if kinds is None or kind in kinds:
                merged.setdefault(kind, []).extend(frames)
    if not_read and not merged:
        raise UserError(not_read[0] + (f" (and {len(not_read) - 1} more rows; nothing else to read)" if len(not_read) > 1 else " (nothing else to read)"))
    tables = {k: pd.concat(v, ignore_index=True) for k, v in merged.items()}
    return Tables(tables, profiles, [Path(f) for f in folders], not_read)
