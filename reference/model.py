"""A small Llama-style decoder (RMSNorm, RoPE, GQA, SwiGLU) with a batched, rollback-able KV cache.

Built from the simulator's `ModelSpec`, so the network the executor measures has exactly the
shape the cost model prices (`Transformer(spec).n_params == spec.n_params`).

The cache holds every row at its own length: a forward pass writes row b's T new tokens at
positions lengths[b] .. lengths[b] + T - 1 and masks everything at or past lengths[b] + t for
query t, so rolling back rejected draft positions is only `cache.lengths = kept` (the stale
entries are masked now and overwritten later).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from reference.linear import Linear
from simulator.errors import UserError, validation_message
from simulator.models import ModelSpec

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class KVCache:
    """K and V of every layer for B rows, and how many positions of each row are valid."""

    k: torch.Tensor  # [n_layers, B, n_kv_heads, max_len, d_head]
    v: torch.Tensor  # [n_layers, B, n_kv_heads, max_len, d_head]
    lengths: torch.Tensor  # [B] int64: valid positions per row
    limit: int = 0  # host-side bound, >= every length: attention reads only positions below it

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rollback(self, lengths: torch.Tensor, limit: int | None = None) -> None:
        """Keep the first lengths[b] positions of row b (lengths <= current lengths). `limit`, if the
        caller knows max(lengths) without a sync, lets attention skip the positions past it."""
        self.lengths = lengths
        if limit is not None:
            self.limit = limit


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d = spec.d_model
        self.embed = nn.Embedding(spec.vocab_size, d)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = nn.RMSNorm(d, eps=spec.norm_eps)
        self.head = None if spec.tied_embeddings else Linear(d, spec.vocab_size)
        # RoPE angles (Su et al. 2021): theta_i = rope_theta^(-2i/d_head); [max_seq_len, d_head/2]
        inv_freq = spec.rope_theta ** (-torch.arange(0, spec.d_head, 2, dtype=torch.float64) / spec.d_head)
        angles = torch.outer(torch.arange(spec.max_seq_len, dtype=torch.float64), inv_freq)
        # (cos, sin) pairs [max_seq_len, d_head/2, 2], real so that .to(dtype) keeps them
        self.register_buffer("rope", torch.stack((angles.cos(), angles.sin()), -1).float(), persistent=False)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int, n_layers: int | None = None) -> KVCache:
        s = self.spec
        if max_len > s.max_seq_len:
            raise UserError(f"{max_len} positions exceed the model's max_seq_len {s.max_seq_len}")
        shape = (n_layers or s.n_layers, batch, s.n_kv_heads, max_len, s.d_head)
        dev, dtype = self.embed.weight.device, self.embed.weight.dtype
        return KVCache(
            torch.zeros(shape, device=dev, dtype=dtype),
            torch.zeros(shape, device=dev, dtype=dtype),
            torch.zeros(batch, dtype=torch.long, device=dev),
        )

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        layers: list[int] | None = None,
        tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> logits [B, T, V]; with `hidden`, (logits, h) and h [B, T, d] the final
        normed hidden state the unembedding reads (what Medusa heads read, `reference.medusa`).

        With a cache, the tokens extend each row at its own length and the cache advances by T.
        `layers` runs only those blocks (a layer-skip draft); its cache then has len(layers) layers.
        `tree` = (base [B], positions [B, T], sees [B, T, W]) makes it a tree pass (Miao et al. 2024;
        `reference.tree_decode`): the tokens are still written at cache slots lengths[b] .. lengths[b] + T - 1,
        but token t of row b takes RoPE position positions[b, t] and attends to the slots below
        base[b] (the committed sequence) and to slot base[b] + j of the tree where sees[b, t, j]."""
        B, T = tokens.shape
        if tree is not None and cache is None:
            raise ValueError("a tree pass writes into a cache; give one")
        layer_ids = range(len(self.layers)) if layers is None else layers
        if cache is None:  # training / scoring whole sequences: plain causal attention
            pos = slots = torch.arange(T, device=tokens.device).expand(B, T)
            mask = None
        else:
            pos = slots = cache.lengths[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
            n_keys = min(cache.limit + T, cache.max_len)  # attention reads cache positions [0, n_keys)
            keys = torch.arange(n_keys, device=tokens.device)
            if tree is None:  # query t of row b sees cache positions <= pos[b, t]
                sees = keys <= pos[:, :, None]
            else:  # [B, T, n_keys]: the committed slots, and the tree slots `sees` names
                base, pos, in_tree = tree
                j = keys - base[:, None]  # [B, n_keys]: a slot's place in the tree, < 0 below it
                W = in_tree.shape[-1]
                named = in_tree.gather(2, j.clamp(0, W - 1)[:, None, :].expand(B, T, n_keys))
                sees = (j < 0)[:, None, :] | (named & (j < W)[:, None, :])
            # additive mask [B, 1, T, n_keys]
            mask = torch.where(sees, 0.0, float("-inf"))[:, None].to(self.embed.weight.dtype)
        cis = torch.view_as_complex(self.rope[pos])[:, :, None]  # [B, T, 1, d_head/2]: e^(i pos theta_j)
        x = self.embed(tokens)
        for slot, i in enumerate(layer_ids):
            kv = None if cache is None else (cache.k[slot], cache.v[slot], slots)
            x = self.layers[i](x, cis, mask, kv)
        if cache is not None:
            cache.lengths = cache.lengths + T
            cache.limit = n_keys
        if hidden:
            h = self.norm(x)
            return self.unembed(h), h
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding: [B, T, d] -> [B, T, V]."""
        return self.unembed(self.norm(x))

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The normed hidden state [..., d] -> logits [..., V]."""
        return h @ self.embed.weight.T if self.head is None else self.head(h)


def apply_rope(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2j, x_2j+1) of x [B, T, heads, d_head] by its position's angle pos theta_j,
    as the complex product (x_2j + i x_2j+1) e^(i pos theta_j); cis [B, T, 1, d_head/2]."""
    xc = torch.view_as_complex((x if x.dtype in (torch.float32, torch.float64) else x.float()).unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * cis).flatten(-2).type_as(x)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = spec.n_heads, spec.n_kv_heads, spec.d_head
        d, d_kv = spec.d_model, spec.d_kv
        self.attn_norm = nn.RMSNorm(d, eps=spec.norm_eps)
        self.wqkv = Linear(d, d + 2 * d_kv)
        self.wo = Linear(d, d)
        self.mlp_norm = nn.RMSNorm(d, eps=spec.norm_eps)
        self.w13 = Linear(d, 2 * spec.d_ff)  # SwiGLU W1 and W3, fused
        self.w2 = Linear(spec.d_ff, d)

    def forward(self, x, cis, mask, kv) -> torch.Tensor:
        B, T, d = x.shape
        H, Hkv, dh = self.n_heads, self.n_kv_heads, self.d_head
        qkv = self.wqkv(self.attn_norm(x)).view(B, T, H + 2 * Hkv, dh)
        qk = apply_rope(qkv[:, :, : H + Hkv], cis)  # [B, T, H + Hkv, d_head]: Q and K heads rotated together
        q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hkv :].transpose(1, 2)
        if kv is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
        else:
            k_cache, v_cache, slots = kv  # [B, Hkv, max_len, d_head]; slots [B, T] where the new K, V go
            index = slots[:, None, :, None].expand(B, Hkv, T, dh)
            k_cache.scatter_(2, index, k)
            v_cache.scatter_(2, index, v)
            n_keys = mask.shape[-1]
            o = F.scaled_dot_product_attention(
                q, k_cache[:, :, :n_keys], v_cache[:, :, :n_keys], attn_mask=mask, enable_gqa=Hkv != H
            )
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, d))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


def save_weights(model: Transformer, path: Path) -> None:
    """Spec and float16 weights in one file (float16 halves the size; the model computes in float32)."""
    state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    torch.save({"spec": model.spec.model_dump(), "state_dict": state}, path)


def read_torch_file(path: Path, not_ours: str):
    """What a torch file holds (tensors and plain containers only: no pickled code runs), or a
    UserError `not_ours` when its bytes are no such file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the bytes are, they are not the file asked for
        raise UserError(f"{not_ours} ({type(exc).__name__})") from None


def load_weights(path: Path | str, device: str = "cpu") -> Transformer:
    """A `Transformer` from a file written by `save_weights` (for example `reference/weights/target.pt`).
    Anything else (another format, a bare tensor, a spec that does not match its weights, weights that
    are not finite, a model too large for this machine) is a UserError naming the file, raised before
    the model is built."""
    path = Path(path)
    if not path.is_file():
        hint = "; `python -m reference.train` writes the trained pair" if path.parent == WEIGHTS_DIR else ""
        raise UserError(f"{path}: no such weights file{hint}")
    not_ours = f"{path}: not a weights file written by save_weights"
    blob = read_torch_file(path, not_ours)
    if not (isinstance(blob, dict) and isinstance(blob.get("spec"), dict) and isinstance(blob.get("state_dict"), dict)):
        raise UserError(f"{not_ours} (expected a dict with `spec` and `state_dict`, got {type(blob).__name__})")
    try:
        spec = ModelSpec(**{str(k): v for k, v in blob["spec"].items()})
    except ValidationError as exc:
        raise UserError(f"{path}: spec: {validation_message(exc)}") from None
    needed = model_bytes(spec)
    if needed > physical_memory_bytes():
        raise UserError(f"{path}: the spec's model needs {needed / 1e9:.3g} GB in float32, more than this machine's {physical_memory_bytes() / 1e9:.3g} GB")
    state = blob["state_dict"]
    held = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    if held != spec.n_params:  # before the shapes: a model of many layers takes a while to lay out
        raise UserError(f"{path}: the spec's model has {spec.n_params} parameters, the state_dict {held}")
    with torch.device("meta"):  # shapes without memory
        wanted = {k: tuple(v.shape) for k, v in Transformer(spec).state_dict().items()}
    for key, shape in wanted.items():
        tensor = state.get(key)
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path}: state_dict lacks {key}, which the spec's model has" if tensor is None else f"{path}: state_dict.{key} is not a tensor")
        if tuple(tensor.shape) != shape:
            raise UserError(f"{path}: state_dict.{key} has shape {list(tensor.shape)}; the spec's model needs {list(shape)}")
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: state_dict.{key} is not all finite floating-point numbers")
    extra = sorted(str(k) for k in set(state) - set(wanted))
    if extra:
        raise UserError(f"{path}: state_dict has {extra[0]}, which the spec's model has not" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    model = Transformer(spec)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def model_bytes(spec: ModelSpec) -> int:
    """Bytes a `Transformer(spec)` takes while it is built: float32 weights, and the RoPE table
    [max_seq_len, d_head/2, 2] in float32 with its float64 angles, cosines and sines beside it."""
    return 4 * spec.n_params + (4 + 3 * 8) * spec.max_seq_len * spec.d_head // 2


def kv_cache_bytes(spec: ModelSpec, batch: int, positions: int) -> int:
    """Bytes of a float32 `KVCache` of `batch` rows and `positions` positions: K and V of every layer."""
    return 2 * spec.n_layers * batch * spec.n_kv_heads * positions * spec.d_head * 4


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # a system without sysconf: no limit known
        return 2**63
