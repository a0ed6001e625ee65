"""Hardware profiles: one validated YAML file per device, every number with its unit and source.

A profile is data, not a class per device (STYLE 2). Units are in the field names, SI only
(STYLE 3): bytes, seconds, FLOP/s, hertz, watts. A decimal TFLOP/s is 1e12.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulator.errors import UserError, validation_message

PROFILE_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles"

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "fp4")  # fp4: NVFP4 (4-bit values, an fp8 scale per 16)
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}  # dtypes a model's weights and activations take
# Architecture generations: the kernel model's per-generation parameters are keyed by these.
GENERATIONS = ("volta", "turing", "ampere", "ada", "hopper", "blackwell", "blackwell-rtx", "cdna3")
INTERCONNECTS = ("nvlink", "pcie", "infinity-fabric")
HOST_CPUS = ("x86-64", "grace")  # the CPU a GPU's system pairs it with: a benchmark's host-side time is that CPU's

# Physical ranges. A figure outside one is a typo or a slip of units, not a device: each bound lies
# orders of magnitude past the extremes of the shipped profiles (in brackets), so it refuses only the
# impossible, and the floors keep every time the cost model derives from a profile finite.
Count = Annotated[int, Field(ge=1, le=10**6)]  # SMs, cores, L2 partitions [304]
Bytes = Annotated[int, Field(ge=1, le=2**50)]  # up to 1 PiB [2.9e11 of HBM]
BytesPerS = Annotated[float, Field(ge=1e6, le=1e15)]  # 1 MB/s to 1 PB/s [3.0e13 of L2]
FlopsPerS = Annotated[float, Field(ge=1e6, le=1e18)]  # 1 MFLOP/s to 1 EFLOP/s [1.35e16 in fp4]
Fraction = Field(ge=1e-3, le=1.0)  # of a peak; calibrate's fit keeps to [0.01, 1]


class Achievable(BaseModel):
    """Fractions of peak that real kernels reach on this device, each in (0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    bandwidth: float = Fraction  # of hbm_bytes_per_s, by a streaming kernel
    matmul: float = Fraction  # of peak_flops_per_s, by a large GEMM
    attention: float = Fraction  # of peak_flops_per_s, by a fused attention kernel


class HardwareProfile(BaseModel):
    """One device. `sources` holds a citation for every number; `estimates` lists the numbers
    that no primary source confirms (they are used, but flagged)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    kind: Literal["gpu", "cpu"] = "gpu"
    aliases: list[str] = []
    generation: str | None = None  # architecture generation (GENERATIONS); required for a GPU
    compute_capability: str | None = None  # CUDA compute capability, e.g. "8.0"
    sm_count: Count  # streaming multiprocessors (NVIDIA), compute units (AMD), cores (CPU)
    sram_bytes_per_sm: int = Field(ge=1024, le=2**50)  # at least a few rows of a tile (1 KiB); shared memory (SMEM/LDS) per SM usable by one kernel; a core's L2 on a CPU
    l2_bytes: Bytes
    l2_partitions: Count | None = None  # L2 partitions that each cache what their own SMs read (data every SM reads is held in each); absent: one
    memory_bytes: Bytes  # device memory (HBM/GDDR) capacity
    hbm_bytes_per_s: BytesPerS  # peak device-memory bandwidth
    l2_bytes_per_s: BytesPerS | None = None  # peak L2 read bandwidth; absent: re-reads priced at HBM speed
    # a CPU's measured copy speed (bytes moved per second) by the bytes a copy moves (read + written),
    # from inside the caches to main memory; absent: one speed inside the last-level cache, one past it
    copy_bytes_per_s_by_size: dict[Bytes, BytesPerS] | None = None
    peak_flops_per_s: dict[str, FlopsPerS]  # dense, by dtype; tensor-core figures where they exist
    clock_hz: float = Field(ge=1e6, le=1e10)  # boost clock
    tdp_w: float | None = Field(default=None, ge=1.0, le=1e5)  # required for a GPU
    interconnect_bytes_per_s: BytesPerS | None = None  # per-GPU link (NVLink, Infinity Fabric, else PCIe), both directions; required for a GPU
    interconnect: str | None = None  # the link kind (INTERCONNECTS); required for a GPU
    host_cpu: str = "x86-64"  # HOST_CPUS: "grace" where the GPU comes in a Grace superchip (GB200, GB300), else an x86-64 server's
    launch_overhead_s: float = Field(ge=1e-9, le=1.0)  # fixed cost of one kernel launch
    ops_per_kernel: float = Field(default=1.0, ge=1.0, le=1e6)  # operators an executor issues per cost-model kernel (1: fused kernels; an eager executor issues several)
    achievable: Achievable
    sources: dict[str, str]
    estimates: list[str] = []
    calibration: dict | None = None  # written by `simulator calibrate`: date, device, fit residuals

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        unknown = sorted(set(self.peak_flops_per_s) - set(DTYPES))
        if unknown:
            raise ValueError(f"peak_flops_per_s: unknown dtype {unknown[0]!r}; known: {', '.join(DTYPES)}")
        if self.kind == "gpu":
            for needed in ("tdp_w", "interconnect_bytes_per_s", "interconnect", "generation", "l2_bytes_per_s"):
                if getattr(self, needed) is None:
                    raise ValueError(f"{needed} is required for a GPU")
            if self.generation not in GENERATIONS:
                raise ValueError(f"generation: unknown {self.generation!r}; known: {', '.join(GENERATIONS)}")
            if self.interconnect not in INTERCONNECTS:
                raise ValueError(f"interconnect: unknown {self.interconnect!r}; known: {', '.join(INTERCONNECTS)}")
            if self.host_cpu not in HOST_CPUS:
                raise ValueError(f"host_cpu: unknown {self.host_cpu!r}; known: {', '.join(HOST_CPUS)}")
        for needed in ("fp32", "fp16"):
            if needed not in self.peak_flops_per_s:
                raise ValueError(f"peak_flops_per_s.{needed} is missing")
        flops = self.peak_flops_per_s
        if "fp8" in flops and flops["fp8"] < flops["fp16"]:
            raise ValueError("peak_flops_per_s.fp8 is below fp16; an fp8 path is never slower")
        if "fp4" in flops and flops["fp4"] < flops.get("fp8", flops["fp16"]):
            raise ValueError("peak_flops_per_s.fp4 is below fp8; an fp4 path is never slower")
        if self.sram_bytes_per_sm * self.sm_count > self.memory_bytes:
            raise ValueError("sram_bytes_per_sm x sm_count exceeds memory_bytes")
        numbers = set(_number_paths(self))
        for path in sorted(numbers):
            if not any(path == key or path.startswith(key + ".") for key in self.sources):
                raise ValueError(f"sources: no source for {path}")
        for key in self.sources:
            if not any(n == key or n.startswith(key + ".") for n in numbers):
                raise ValueError(f"sources: {key!r} names no number in the profile")
        for key in self.estimates:
            if not any(n == key or n.startswith(key + ".") for n in numbers):
                raise ValueError(f"estimates: {key!r} names no number in the profile")
        return self

    def peak_flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for `dtype`; bf16 falls back to fp16 where only one is listed."""
        if dtype in self.peak_flops_per_s:
            return self.peak_flops_per_s[dtype]
        if dtype == "bf16":
            return self.peak_flops_per_s["fp16"]
        raise UserError(f"{self.name} has no peak FLOP/s for {dtype}; it lists {', '.join(self.peak_flops_per_s)}")

    def with_fit(self, params: dict) -> HardwareProfile:
        """This profile with fitted achievable fractions (`bandwidth`, `matmul`, `attention`) and
        `launch_overhead_s` taken from `params`."""
        achievable = self.achievable.model_copy(update={k: params[k] for k in ("bandwidth", "matmul", "attention")})
        return self.model_copy(update={"achievable": achievable, "launch_overhead_s": params["launch_overhead_s"]})

    @property
    def sram_bytes_total(self) -> int:
        return self.sram_bytes_per_sm * self.sm_count

    def ridge_flops_per_byte(self, dtype: str = "fp16") -> float:
        """Arithmetic intensity where achievable compute equals achievable bandwidth (roofline ridge)."""
        return (self.peak_flops(dtype) * self.achievable.matmul) / (self.hbm_bytes_per_s * self.achievable.bandwidth)


def _number_paths(profile: HardwareProfile) -> list[str]:
    paths = []
    for field in type(profile).model_fields:
        value = getattr(profile, field)
        if field == "calibration" or field not in profile.model_fields_set:
            continue  # a default is a definition, not a fact to cite
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            paths.append(field)
        elif isinstance(value, dict) and field not in ("sources",):
            paths.extend(f"{field}.{k}" for k in value)
        elif isinstance(value, BaseModel):
            paths.extend(f"{field}.{k}" for k in type(value).model_fields)
    return paths


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


VENDOR_WORDS = {"nvidia", "amd", "tesla", "geforce"}  # words of a name that do not change the part


def _words(name: str) -> frozenset[str]:
    """A name's words in any order, the vendor's left out and an SXM socket's generation with them
    (`H100-SXM5-80GB`, `h100-80gb-sxm` and `h100-sxm-80gb` are one part)."""
    words = (re.sub(r"^sxm\d$", "sxm", w) for w in re.split(r"[^0-9a-z]+", name.lower()) if w)
    return frozenset(w for w in words if w not in VENDOR_WORDS)


def _memory_fits(name: str, memory_bytes: float) -> bool:
    """Whether every memory size a name states (`141gb`) is the profile's, in GB or GiB, within 8%."""
    sizes = [float(w[:-2]) for w in _words(name) if re.fullmatch(r"\d+gb", w)]
    return all(any(abs(size / (memory_bytes / unit) - 1.0) <= 0.08 for unit in (1e9, 2**30)) for size in sizes)


def _part_words(name: str) -> frozenset[str]:
    """`_words` less those of the memory (`141gb`, `hbm3e`, `gddr7`) and the SXM socket: what is left
    names the part where one profile has it (`NVIDIA H200 141GB HBM3e`, `b200-sxm-180gb`)."""
    return frozenset(w for w in _words(name) if w != "sxm" and not re.fullmatch(r"\d+gb|hbm\d*e?|gddr\d*x?", w))


_loaded: dict[tuple[Path, str], HardwareProfile] = {}  # (file, its text) -> profile: a sweep asks for the same few again and again


def profile_from_file(path: Path) -> HardwareProfile:
    """Load and validate one YAML file; every failure is a one-line UserError naming file and field.
    A file read before with the same text gives the profile parsed then (profiles are frozen)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); a profile is a YAML file") from None
    key = (path.resolve(), text)
    if key in _loaded:
        return _loaded[key]
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise UserError(f"{path}:{line} malformed YAML: {problem}") from None
    except RecursionError:
        raise UserError(f"{path}: malformed YAML: nested too deep") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a profile is a YAML mapping of fields, got {type(data).__name__}")
    try:
        profile = HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {validation_message(exc)}") from None
    _loaded[key] = profile
    return profile


def shipped_profiles(directory: Path = PROFILE_DIR) -> dict[str, HardwareProfile]:
    """All profiles in `directory`, by name, in file order."""
    return {p.name: p for p in (profile_from_file(f) for f in sorted(directory.glob("*.yaml")))}


def load_profile(name_or_path: str, directory: Path = PROFILE_DIR) -> HardwareProfile:
    """Resolve a device name, an alias (`a100`, `h100`) or a path to a user's own YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.exists():
            raise UserError(f"{name_or_path}: no such profile file")
        return profile_from_file(candidate)
    profiles = shipped_profiles(directory)
    index: dict[str, HardwareProfile] = {}
    for profile in profiles.values():
        for key in (profile.name, *profile.aliases):
            index[_normalise(key)] = profile
    wanted = _normalise(name_or_path)
    if wanted in index:
        return index[wanted]
    # naming noise that does not change the part: a vendor prefix, an SXM form-factor suffix
    plain = re.sub(r"sxm\d?$", "", wanted.removeprefix("nvidia"))
    if plain and plain in index:
        return index[plain]
    # the same words in another order, then without the memory's kind and the SXM socket and with a
    # memory size only as a check on the profile's (`h100-94gb` is not the 80 GB part): each taken
    # only where it names one profile
    for words_of in (_words, _part_words):
        words = words_of(name_or_path)
        same = {p.name for p in profiles.values() for key in (p.name, *p.aliases) if words and words_of(key) == words}
        same = {n for n in same if _memory_fits(name_or_path, profiles[n].memory_bytes)}
        if len(same) == 1:
            return profiles[same.pop()]
    names = list(profiles)
    close = difflib.get_close_matches(
        name_or_path.upper(),
        [n.upper() for n in names] + [a.upper() for p in profiles.values() for a in p.aliases],
        n=1,
        cutoff=0.4,
    )
    hint = f"; closest: {close[0].lower()}" if close else ""
    raise UserError(f"unknown GPU {name_or_path!r}{hint}; known: {', '.join(names)} (or a path to a YAML profile)")
