"""Engine overheads: the host time a serving engine adds to the GPU kernels it launches.

A real engine (vLLM, SGLang) spends CPU time around every step it runs and every request it serves:

    step time        t = t_host + max(t_gpu, [no CUDA graph] a_layer L)
    step host time   t_host = a_0 + a_seq b + a_tok T   (/ N for a decode step in a call of N, see below)
    request time     t_req  = r_0 + r_tok P        (API server: HTTP, tokenising, handing to the engine)
    request latency  t_lat  = r_lat                (a wait no process is busy for: passing between processes)
    speculative step t_spec = a_spec gamma          (proposing: one more engine pass per draft token, in t_host)

with b sequences and T tokens in the step, L layers, and P prompt tokens. a_0 is the scheduler, input
preparation and the sampler's fixed cost; a_seq the per-sequence work (sampling, detokenising and
streaming one chunk of output: this is how a request's output length enters, token by token); a_tok the
per-token input preparation (positions, slot mapping); a_layer the launch time of one layer's kernels when
the step runs eagerly (a prefill step, or a decode batch above `graph_max_batch`, runs without a CUDA
graph). Launching is asynchronous: the host queues kernels while the GPU runs the ones before them, so
an eager step takes the longer of its kernels and its launches (launch-bound for a small model, hidden
under a large model's kernels), while the host work before the launches (t_host) adds to both. r_0 and
r_tok delay a request's entry into the engine's queue and so add to its TTFT; they are work of the API
server, one process, so requests pass it one at a time (a burst of requests queues there). r_lat also
delays the entry but occupies nothing: the hops between the API server and the engine's process and back
(vLLM's V1 engine runs in a process of its own, spoken to over ZeroMQ sockets), which requests in flight
take at the same time; it is modelled as one wait before the engine's queue (the way back adds to TTFT
and to a closed loop's cycle alike, and to every token the same, so not to TPOT). A closed-loop sweep
tells the two apart: serial time grows a round's TTFT with the number of users, a latency does not.
vLLM V0's multi-step scheduling (`--num-scheduler-steps N`, vLLM 0.6) runs N decode steps per call:
the scheduler and the input preparation run once per call and the output processing of a step
overlaps the next step's kernels ("vLLM v0.6.0: 2.7x Throughput Improvement and 5x Latency
Reduction", vLLM blog, 2024-09-05), so a decode step inside such a call carries t_host / N.

Each preset also brings its server's batching (`scheduler_defaults`: running-request cap, step token
budget, chunked prefill mixed with the decodes or run apart), which `simulate --engine` takes unless its
flags say otherwise and under which the presets were fitted. Presets: `ideal` (kernels only, all zero;
the default of `simulate`, so its figures are the kernel model's, under the simulator's own
batching), and `vllm` (the V1 engine, vLLM 0.7 on), `vllm-v0` (vLLM before 0.7) and `sglang`, whose
coefficients are fitted by `python -m simulator fit-engine` to the fit rows of the published serving
measurements (`simulator.e2e.split`) and shipped in `engine_fitted.json` with the data's SHA-256. vLLM's
two engines are two presets: V1 rewrote the scheduler and the input preparation and overlaps them with
the GPU, so its host time per step is not V0's. `graph_max_batch` is read from the engines' sources:
vLLM V0's largest captured batch (`_BATCH_SIZES_TO_CAPTURE`, up to 256 in vLLM 0.6,
vllm/worker/model_runner.py), V1's (min(2 max_num_seqs, 512) by default, vllm/config.py
`set_cudagraph_sizes`), and SGLang's default `cuda_graph_max_bs` (160 on an H100 in 0.3-0.5,
python/sglang/srt/server_args.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simulator.errors import UserError
from simulator.hardware import HardwareProfile

FITTED_PATH = Path(__file__).resolve().parent / "engine_fitted.json"
ENGINE_NAMES = ("ideal", "vllm", "vllm-v0", "sglang")
DEFAULT_ENGINE = "ideal"  # kernels only: `simulate` keeps the kernel model's figures unless --engine is given

# Largest decode batch replayed as a CUDA graph, from each engine's source (see the module docstring).
GRAPH_MAX_BATCH = {"vllm": 512, "vllm-v0": 256, "sglang": 160}

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
    request_latency_s: float = NonNegative  # r_lat, taken by requests in flight at the same time
    speculative_s_per_draft_pass: float = NonNegative  # a_spec, per draft pass of a speculative step
    source: str = "kernels only: no host time"

    @property
    def ideal(self) -> bool:
        return not any((self.step_s, self.step_s_per_sequence, self.step_s_per_token, self.eager_s_per_layer,
                        self.request_s, self.request_s_per_prompt_token, self.request_latency_s, self.speculative_s_per_draft_pass))  # fmt: skip

    def step_host_s(self, sequences: int, tokens: int, draft_passes: int = 0) -> float:
        """t_host (+ t_spec) of one engine step: `sequences` in the batch bringing `tokens` tokens,
        `draft_passes` draft passes run before it (gamma in a speculative step)."""
        if self.ideal or sequences == 0:
            return 0.0
        return self.step_s + self.step_s_per_sequence * sequences + self.step_s_per_token * tokens + self.speculative_s_per_draft_pass * draft_passes

    def launch_s(self, sequences: int, n_layers: int, prefill: bool) -> float:
        """a_layer L for a step that runs eagerly: a prefill (or mixed) step, or a decode batch above the captured graphs; else 0."""
        graphed = not prefill and sequences <= self.graph_max_batch
        return 0.0 if graphed or sequences == 0 else self.eager_s_per_layer * n_layers

    def step_time_s(self, gpu_s, sequences: int, tokens: int, n_layers: int, prefill: bool, draft_passes: int = 0, steps_per_call: int = 1):
        """t of one step whose kernels take `gpu_s` (a float, or an array of steps): the host work
        before the launches, then the longer of the kernels and their launches. A decode step inside
        a call of `steps_per_call` steps (vLLM V0's --num-scheduler-steps) carries 1 / steps_per_call
        of the host work: the call schedules and prepares its inputs once, and its output processing
        runs behind the next step's kernels (vLLM's v0.6.0 release post, "multi-step scheduling" and
        "asynchronous output processing")."""
        if self.ideal:
            return gpu_s
        host = self.step_host_s(sequences, tokens, draft_passes) / (1 if prefill else max(1, steps_per_call))
        return host + np.maximum(gpu_s, self.launch_s(sequences, n_layers, prefill))

    def request_in_s(self, prompt_tokens: int) -> float:
        """t_req: API-server time before a request of `prompt_tokens` reaches the engine's queue."""
        return self.request_s + self.request_s_per_prompt_token * prompt_tokens


IDEAL = EngineOverhead()

TENSORRT_LLM_SCHEDULER = {"max_batch": 2048, "max_batched_tokens": 8192, "chunked_prefill": True}  # trtllm-serve's defaults


def scheduler_defaults(name: str, hw: HardwareProfile) -> dict:
    """The batching of the named engine's server at its defaults, as `ServingConfig` fields (`ideal`:
    none, the simulator's own):
    - `vllm-v0` (vLLM before 0.7): max_num_seqs 256, no chunked prefill below 32k context, and
      max_num_batched_tokens = max(max_model_len, 2048) (vllm/config.py SchedulerConfig); taken as 8192;
    - `vllm` (V1 engine, 0.7 on): chunked prefill; for the API server max_num_seqs 1024 and
      max_num_batched_tokens 8192 on GPUs of >= 70 GiB other than the A100 (larger budgets cost the
      A100 throughput, vllm-project/vllm PR #17885), else 256 and 2048 (vllm/engine/arg_utils.py, the
      usage-context defaults);
    - `sglang`: chunked prefill of 8192 tokens (server_args chunked_prefill_size) in batches of their
      own, run ahead of the decode batch whenever a prefill batch can be formed (server_args
      enable_mixed_chunk defaults to False; the scheduler's get_next_batch_to_run); no fixed cap on
      running requests (the KV pool bounds them), modelled as 4096."""
    key = name.strip().lower()
    if key not in ENGINE_NAMES:
        raise UserError(f"unknown engine {name!r}; known: {', '.join(ENGINE_NAMES)}")
    if key == "vllm-v0":
        return {"max_batch": 256, "max_batched_tokens": 8192, "chunked_prefill": False, "prefill_apart": False}
    if key == "vllm":
        big = hw.memory_bytes >= 70 * 2**30 and "a100" not in hw.name.lower()
        return {"max_batch": 1024 if big else 256, "max_batched_tokens": 8192 if big else 2048, "chunked_prefill": True, "prefill_apart": False}
    if key == "sglang":
        return {"max_batch": 4096, "max_batched_tokens": 8192, "chunked_prefill": True, "prefill_apart": True}
    return {}


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
