"""Model specs: the shape of a decoder-only transformer, shared by the simulator and the executor.

One config type, two consumers: the cost model prices a `ModelSpec`, the reference executor
builds a real network from the same object.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from simulator.errors import UserError, validation_message
from simulator.paths import read_json

# Sizes a transformer can have: each ceiling lies far past the largest published model (in brackets),
# so only a slip is refused, and every count the cost model derives stays exact in a float.
Width = Annotated[int, Field(ge=1, le=2**20)]  # d_model, d_ff [53248 of d_ff]
Heads = Annotated[int, Field(ge=1, le=2**14)]  # [128]
Layers = Annotated[int, Field(ge=1, le=2**14)]  # [126]
Vocab = Annotated[int, Field(ge=1, le=2**24)]  # [256k]
Positions = Annotated[int, Field(ge=1, le=2**27)]  # [10M]


class ModelSpec(BaseModel):
    """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    d_model: Width
    n_layers: Layers
    n_heads: Heads
    n_kv_heads: Heads
    d_ff: Width
    vocab_size: Vocab
    max_seq_len: Positions = 4096
    tied_embeddings: bool = False
    rope_theta: float = Field(default=10000.0, gt=0.0)
    norm_eps: float = Field(default=1e-5, gt=0.0, lt=1.0)
    source: str = ""

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        return self

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_kv(self) -> int:
        """Width of one of K or V for one token: n_kv_heads x d_head."""
        return self.n_kv_heads * self.d_head

    @property
    def params_per_layer(self) -> int:
        attn = self.d_model * (self.d_model + 2 * self.d_kv) + self.d_model * self.d_model  # Wqkv, Wo
        mlp = 3 * self.d_model * self.d_ff  # SwiGLU: W1, W3 up, W2 down
        norms = 2 * self.d_model
        return attn + mlp + norms

    @property
    def n_params(self) -> int:
        embed = self.vocab_size * self.d_model
        head = 0 if self.tied_embeddings else self.vocab_size * self.d_model
        return self.n_layers * self.params_per_layer + embed + head + self.d_model

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token occupies across all layers: 2 (K, V) x layers x n_kv_heads x d_head."""
        return 2 * self.n_layers * self.d_kv * dtype_bytes


def _spec(name, d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, max_len, source, **kw) -> ModelSpec:
    return ModelSpec(
        name=name, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        d_ff=d_ff, vocab_size=vocab, max_seq_len=max_len, source=source, **kw,
    )  # fmt: skip


# Sizes from each model's published HuggingFace config.json.
BUILTIN_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        _spec("llama-2-7b", 4096, 32, 32, 32, 11008, 32000, 4096, "meta-llama/Llama-2-7b-hf config.json"),
        _spec("llama-2-13b", 5120, 40, 40, 40, 13824, 32000, 4096, "meta-llama/Llama-2-13b-hf config.json"),
        _spec("llama-2-70b", 8192, 80, 64, 8, 28672, 32000, 4096, "meta-llama/Llama-2-70b-hf config.json"),
        _spec("llama-3-8b", 4096, 32, 32, 8, 14336, 128256, 8192, "meta-llama/Meta-Llama-3-8B config.json", rope_theta=500000.0),
        _spec("llama-3-70b", 8192, 80, 64, 8, 28672, 128256, 8192, "meta-llama/Meta-Llama-3-70B config.json", rope_theta=500000.0),
        _spec("mistral-7b", 4096, 32, 32, 8, 14336, 32000, 32768, "mistralai/Mistral-7B-v0.1 config.json"),
        _spec("llama-68m", 768, 2, 12, 12, 3072, 32000, 2048, "JackFram/llama-68m config.json (SpecInfer draft)"),
        _spec("tinyllama-1.1b", 2048, 22, 32, 4, 5632, 32000, 2048, "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json"),
        _spec("llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, 131072, "meta-llama/Llama-3.2-1B config.json", tied_embeddings=True, rope_theta=500000.0),
        # Models of the published serving measurements (simulator/e2e), from their config.json at
        # https://huggingface.co/{repo}/blob/main/config.json. Qwen2.5's QKV biases and Qwen3's q/k RMSNorms
        # are not priced (vectors per layer, under 0.1% of the weights). Llama 3.1 needs no entry of its
        # own: its config.json has Llama 3's shapes, only a longer context (131072) and RoPE scaling.
        _spec("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, 32768, "Qwen/Qwen2.5-0.5B-Instruct config.json", tied_embeddings=True, rope_theta=1000000.0, norm_eps=1e-6),
        _spec("qwen3-8b", 4096, 36, 32, 8, 12288, 151936, 40960, "Qwen/Qwen3-8B config.json (head_dim 128 = hidden / heads)", rope_theta=1000000.0, norm_eps=1e-6),
        _spec("qwen3-14b", 5120, 40, 40, 8, 17408, 151936, 40960, "Qwen/Qwen3-14B config.json (head_dim 128 = hidden / heads)", rope_theta=1000000.0, norm_eps=1e-6),
    )
}  # fmt: skip


# ModelSpec's fields by the names a HuggingFace config.json gives them (Llama/Mistral)
HF_FIELDS = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size", "vocab_size": "vocab_size",
             "max_seq_len": "max_position_embeddings", "tied_embeddings": "tie_word_embeddings",
             "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps"}  # fmt: skip


def spec_from_hf_config(path: Path, name: str | None = None) -> ModelSpec:
    """Read a local HuggingFace `config.json` (Llama/Mistral field names)."""
    cfg = read_json(path, "a config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a config.json is a JSON object of fields, got {type(cfg).__name__}")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise UserError(f"{path}: field {missing[0]} is missing; a Llama-style config.json needs {', '.join(required)}")
    fields = {ours: cfg[theirs] for ours, theirs in HF_FIELDS.items() if cfg.get(theirs) is not None}
    fields.setdefault("n_kv_heads", cfg["num_attention_heads"])
    try:
        spec = ModelSpec(name=name or "custom", source=str(path), **fields)
    except ValidationError as exc:
        raise UserError(f"{path}: {validation_message(exc, HF_FIELDS)}") from None
    return spec if name else spec.model_copy(update={"name": hf_model_name(cfg, spec.n_params)})


def hf_model_name(cfg: dict, n_params: int) -> str:
    """What a config.json calls its model: its `_name_or_path` (the HuggingFace id it was saved
    from), else its `model_type` and size (`llama-6.7B`), never the folder it sits in."""
    saved_as = cfg.get("_name_or_path")
    if isinstance(saved_as, str) and saved_as.strip():
        return saved_as.strip()
    model_type = cfg.get("model_type")
    kind = model_type.strip() if isinstance(model_type, str) and model_type.strip() else "model"
    size = f"{n_params / 1e9:.3g}B" if n_params >= 1e9 else f"{n_params / 1e6:.3g}M"
    return f"{kind}-{size}"


def load_model(name_or_path: str) -> ModelSpec:
    """A built-in model by name, or a path to a HuggingFace `config.json`."""
    if name_or_path.endswith(".json") or Path(name_or_path).is_file():
        if not Path(name_or_path).is_file():
            raise UserError(f"{name_or_path}: no such config file")
        return spec_from_hf_config(Path(name_or_path))
    key = name_or_path.lower()
    if key in BUILTIN_MODELS:
        return BUILTIN_MODELS[key]
    close = difflib.get_close_matches(key, list(BUILTIN_MODELS), n=1, cutoff=0.4)
    hint = f"; closest: {close[0]}" if close else ""
    raise UserError(
        f"unknown model {name_or_path!r}{hint}; known: {', '.join(BUILTIN_MODELS)} (or a path to a config.json)"
    )
