"""Engine overheads: the host time a serving engine adds to the GPU kernels it launches.

A real engine (vLLM, SGLang) spends CPU time around every step it runs and every request it serves:

    step host time   t_step = a_0 + a_seq b + a_tok T + [no CUDA graph] a_layer L
    request time     t_req  = r_0 + r_tok P        (API server: HTTP, tokenising, handing to the engine)
    speculative step t_spec = a_spec gamma          (proposing: one more engine pass per draft token)

with b sequences and T tokens in the step, L layers, and P prompt tokens. a_0 is the scheduler, input
preparation and the sampler's fixed cost; a_seq the per-sequence work (sampling, detokenising and
streaming one chunk of output: this is how a request's output length enters, token by token); a_tok the
per-token input preparation (positions, slot mapping); a_layer the launch time of one layer's kernels when
the step runs eagerly (a prefill step, or a decode batch above `graph_max_batch`, runs without a CUDA
graph); r_0 and r_tok delay a request's entry into the engine's queue and so add to its TTFT.

Presets (`PRESETS`): `ideal` (kernels only, all zero; the default of `simulate`, so its figures are the
kernel model's), and `vllm` / `sglang`, whose coefficients are fitted by `python -m simulator fit-engine`
to the fit rows of the published serving measurements (`simulator.e2e.split`) and shipped in
`engine_fitted.json` with the data's SHA-256. `graph_max_batch` is read from the engines' sources:
vLLM's largest captured batch (`_BATCH_SIZES_TO_CAPTURE`, up to 256 in vLLM 0.6, vllm/worker/model_runner.py)
and SGLang's default `cuda_graph_max_bs` (160 on an H100 in 0.3-0.5, python/sglang/srt/server_args.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from simulator.errors import UserError

FITTED_PATH = Path(__file__).resolve().parent / "engine_fitted.json"
ENGINE_NAMES = ("ideal", "vllm", "sglang")
DEFAULT_ENGINE = "ideal"  # kernels only: `simulate` keeps the kernel model's figures unless --engine is given

# Largest decode batch replayed as a CUDA graph, from each engine's source (see the module docstring).
GRAPH_MAX_BATCH = {"vllm": 256, "sglang": 160}

NonNegative = Field(default=0.0, ge=0.0, allow_inf_nan=False)


class EngineOverhead(BaseModel):
    """Host-time coefficients of one engine, in seconds (per step, per sequence, per token, per layer,
    per request, per prompt token, per draft pass); all zero is `ideal`: kernels only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = DEFAULT_ENGINE
    step_s: float = NonNegative  # a_0
    step_s_per_sequence: float = NonNegative  # a_seq
    step_s_per_token: float = NonNegative  # a_tok
    eager_s_per_layer: float = NonNegative  # a_layer, only in a step that runs without a CUDA graph
    graph_max_batch: int = Field(default=0, ge=0)  # decode steps of at most this many sequences replay a graph
    request_s: float = NonNegative  # r_0
    request_s_per_prompt_token: float = NonNegative  # r_tok
    speculative_s_per_draft_pass: float = NonNegative  # a_spec, per draft pass of a speculative step
    source: str = "kernels only: no host time"

    @property
    def ideal(self) -> bool:
        return not any((self.step_s, self.step_s_per_sequence, self.step_s_per_token, self.eager_s_per_layer,
                        self.request_s, self.request_s_per_prompt_token, self.speculative_s_per_draft_pass))  # fmt: skip

    def step_host_s(self, sequences: int, tokens: int, n_layers: int, prefill: bool, draft_passes: int = 0) -> float:
        """t_step (+ t_spec) of one engine step: `sequences` in the batch bringing `tokens` tokens, a
        prefill (or mixed) step or a decode step, `draft_passes` draft passes run before it (gamma in a speculative step)."""
        if self.ideal or sequences == 0:
            return 0.0
        graphed = not prefill and sequences <= self.graph_max_batch
        eager_s = 0.0 if graphed else self.eager_s_per_layer * n_layers
        return (self.step_s + self.step_s_per_sequence * sequences + self.step_s_per_token * tokens + eager_s
                + self.speculative_s_per_draft_pass * draft_passes)  # fmt: skip

    def request_in_s(self, prompt_tokens: int) -> float:
        """t_req: API-server time before a request of `prompt_tokens` reaches the engine's queue."""
        return self.request_s + self.request_s_per_prompt_token * prompt_tokens


IDEAL = EngineOverhead()


def load_fitted(path: Path = FITTED_PATH) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no fitted engine coefficients; run `python -m simulator fit-engine`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the fitted engine coefficients: {exc}") from None
    return data


def engine_overhead(name: str, path: Path = FITTED_PATH) -> EngineOverhead:
    """The named preset: `ideal`, or an engine fitted by `fit-engine` (read from `path`)."""
    key = name.strip().lower()
    if key not in ENGINE_NAMES:
        raise UserError(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")
    if key == "ideal":
        return IDEAL
    fitted = load_fitted(path)
    if key not in fitted.get("engines", {}):
        raise UserError(f"{path}: no coefficients for engine {key}; run `python -m simulator fit-engine`")
    try:
        return EngineOverhead(**fitted["engines"][key])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: engine {key}: {' '.join(str(exc).split())}") from None
