"""The executor's transformer: shape from a ModelSpec, cached decoding equal to a full pass, per-row rollback."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from reference import train
from reference.model import WEIGHTS_DIR, Transformer, apply_rope, load_weights, save_weights
from simulator.errors import UserError
from simulator.models import ModelSpec


def spec(**kw) -> ModelSpec:
    base = dict(name="toy", d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, vocab_size=11, max_seq_len=64)
    return ModelSpec(**(base | kw))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1}, {"tied_embeddings": True}])
def test_parameter_count_is_the_specs(kw):
    s = spec(**kw)
    assert Transformer(s).n_params == s.n_params


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(spec(**kw)).double().eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}])
def test_cached_decoding_equals_a_full_pass_with_rows_at_different_lengths(kw):
    model = _model(**kw)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, 11, (3, 20), generator=g)
    full = model(seqs)  # [3, 20, V], plain causal attention
    cache = model.new_cache(3, 32)
    # rows roll back to different lengths, then advance in chunks of 1..3 tokens each
    model(seqs[:, :5], cache)
    cache.rollback(torch.tensor([3, 5, 5]))  # rows now hold 3, 5, 5 tokens
    lengths = cache.lengths.clone()
    for chunk in (2, 1, 3, 1):
        idx = lengths[:, None] + torch.arange(chunk)
        logits = model(seqs.gather(1, idx), cache)
        want = full.gather(1, idx[..., None].expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10)
        lengths = lengths + chunk
    assert torch.equal(cache.lengths, lengths)


def test_rollback_forgets_rejected_positions():
    model = _model()
    g = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, 11, (2, 12), generator=g)
    junk = torch.randint(0, 11, (2, 4), generator=g)
    cache = model.new_cache(2, 24)
    model(seqs[:, :8], cache)
    model(junk, cache)  # 4 draft tokens; the verifier rejects all of row 0's and keeps 2 of row 1's
    cache.rollback(torch.tensor([8, 10]))
    got = model(seqs[:, 8:10], cache)
    torch.testing.assert_close(got[0], model(seqs[:1, :10])[0, 8:10], rtol=1e-10, atol=1e-10)
    kept1 = torch.cat((seqs[1, :8], junk[1, :2], seqs[1, 8:10]))
    torch.testing.assert_close(got[1], model(kept1[None])[0, 10:12], rtol=1e-10, atol=1e-10)


def test_layer_subset_is_the_early_exit():
    model = _model()
    x = torch.randint(0, 11, (2, 9))
    h = model.embed(x)
    cis = torch.view_as_complex(model.rope[:9])[None, :, None]
    h = model.layers[0](h, cis, None, None)
    torch.testing.assert_close(model(x, layers=[0]), model.logits(h))
    cache = model.new_cache(2, 16, n_layers=1)
    torch.testing.assert_close(model(x, cache, layers=[0]), model(x, layers=[0]), rtol=1e-10, atol=1e-10)


def test_rope_is_relative():
    """Attention scores depend on positions only through their difference."""
    model = _model()
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        ci, cj = (torch.view_as_complex(model.rope[t])[None, None, None] for t in (i, j))
        return float((apply_rope(q, ci) * apply_rope(k, cj)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-6)  # the angle table is float32


def test_weights_round_trip(tmp_path):
    model = _model().float()
    save_weights(model, tmp_path / "m.pt")
    loaded = load_weights(tmp_path / "m.pt")
    assert loaded.spec == model.spec
    x = torch.randint(0, 11, (2, 7))
    torch.testing.assert_close(loaded(x), model(x), rtol=2e-3, atol=2e-3)  # stored as float16


def test_missing_or_foreign_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such weights file"):
        load_weights(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a weights file"):
        load_weights(tmp_path / "junk.pt")


def test_training_is_deterministic():
    data = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0))
    tiny = spec(vocab_size=256, max_seq_len=train.SEQ_LEN)

    def run():
        torch.manual_seed(3)
        model = train.train(Transformer(tiny), data, steps=2, peak_lr=1e-3, seed=4)
        return [p.detach().clone() for p in model.parameters()]

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.skipif(not (WEIGHTS_DIR / "manifest.json").is_file(), reason="trained pair not present")
def test_committed_pair_matches_its_manifest():
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    total_bytes = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir())
    assert total_bytes <= 20e6
    for name, want in manifest["weights_sha256"].items():
        assert hashlib.sha256((WEIGHTS_DIR / f"{name}.pt").read_bytes()).hexdigest() == want
    target, draft = load_weights(WEIGHTS_DIR / "target.pt"), load_weights(WEIGHTS_DIR / "draft.pt")
    assert target.spec == train.TARGET_SPEC and draft.spec == train.DRAFT_SPEC
    assert draft.n_params * 5 < target.n_params
