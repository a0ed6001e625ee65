"""`simulate --draft none` / `--gamma 0`: plain decoding only; a config.json model named by its id or type and size."""

from __future__ import annotations

import json

import pytest

from simulator.models import load_model
from tests.test_serving_cli import SMALL, cli

HF = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
      "vocab_size": 32000, "max_position_embeddings": 2048}  # fmt: skip


@pytest.mark.parametrize("flags", [["--draft", "none"], ["--draft", "NONE"], ["--gamma", "0"]])
def test_no_draft_runs_plain_decoding_only(flags, capsys):
    code, out, err = cli(["simulate", *SMALL, *flags, "--json", "--no-interval"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == {"config", "autoregressive"}
    assert report["config"]["draft"] == "none" and report["config"]["gamma"] == 0
    assert report["autoregressive"]["requests"]["completed"] == 150
    assert report["autoregressive"]["engine"]["speculative_steps"] == 0


def test_no_draft_matches_the_autoregressive_run_of_a_speculative_simulation(capsys):
    _, plain, _ = cli(["simulate", *SMALL, "--draft", "none", "--json", "--no-interval"], capsys)
    _, both, _ = cli(["simulate", *SMALL, "--json", "--no-interval"], capsys)
    assert json.loads(plain)["autoregressive"] == json.loads(both)["autoregressive"]


def test_no_draft_text_report(capsys):
    code, out, _ = cli(["simulate", *SMALL, "--draft", "none", "--no-interval"], capsys)
    assert code == 0
    assert "no speculation (plain decoding)" in out and "autoregressive" in out and "speculation: output" not in out


def test_config_json_named_by_its_id_then_type_and_size(tmp_path):
    folder = tmp_path / "checkpoint-folder"
    folder.mkdir()
    path = folder / "config.json"
    path.write_text(json.dumps(HF | {"_name_or_path": "org/tiny-llama"}))
    assert load_model(str(path)).name == "org/tiny-llama"
    path.write_text(json.dumps(HF | {"model_type": "llama"}))
    spec = load_model(str(path))
    assert spec.name == f"llama-{spec.n_params / 1e6:.3g}M" and "checkpoint-folder" not in spec.name
    path.write_text(json.dumps(HF | {"num_hidden_layers": 200, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                                     "intermediate_size": 14336}))  # fmt: skip
    spec = load_model(str(path))
    assert spec.name == f"model-{spec.n_params / 1e9:.3g}B"
