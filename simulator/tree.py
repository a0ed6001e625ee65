"""Tree speculation: a tree of candidate tokens verified in one target pass (Medusa, Cai et al.
2024; SpecInfer, Miao et al. 2024), priced by the cost model and scored by a measured acceptance
table.

A tree T of N nodes (the root, the last accepted token, excluded) is a set of rank paths: path
(r_1, ..., r_k) is the candidate of rank r_k (0 = the most likely) among the children of the node
(r_1, ..., r_(k-1)), at depth k; every prefix of a path is in T. One step of a tree-speculative
engine:

- proposes the tree: Medusa's K heads (K = the tree's depth) each run a residual block and a
  d x vocab linear layer on the target's last hidden state, one per sequence; a draft model runs
  one pass per level, over that level's nodes (the root at level 0);
- verifies it: one target pass with N + 1 query tokens per sequence (the root and every node), so
  every weight GEMM sees batch x (N + 1) tokens and turns compute-bound once that passes the
  profile's ridge point; each query attends to the cached context and its own ancestors (a tree
  mask). Attention libraries run such a mask as a prefill-style kernel over context + N + 1 keys
  whose mask tiles are evaluated, not skipped; it is priced as the device model's attention of
  N + 1 new tokens over the cache (the causal case): the tree mask keeps fewer query-key pairs
  within the N + 1 new tokens than the causal one, an approximation that is small when the
  context holds many more keys than the tree has nodes;
- writes N + 1 KV entries per sequence (the lookahead the cache reserves) and keeps those of the
  root and the accepted path only.

Acceptance (the shared contract): accept[d-1][r] = P(the candidate of rank r at depth d is the
accepted child | its parent was accepted), measured by `python -m reference specdec --draft
medusa|tree --acceptance-out FILE`. At most one child of a node is accepted, so the events
"node n accepted" of the nodes at one depth are disjoint and

    E[tokens per step] = 1 + sum_{n in T} prod_{m on root -> n} accept[depth(m) - 1][rank(m)].
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.device_model import DeviceModel, device_model
from simulator.errors import UserError
from simulator.forward import forward, kv_bytes_per_token
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.models import ModelSpec
from simulator.paths import read_json
from simulator.roofline import KernelCost

Tree = tuple[tuple[int, ...], ...]  # rank paths, by depth, then by rank order

MEDUSA = "medusa"  # `--draft medusa`: heads on the target, no draft model
# The measured acceptance the executor writes (`reference specdec --draft medusa --acceptance-out`).
DEFAULT_MEDUSA_ACCEPTANCE = Path(__file__).resolve().parent.parent / "reference" / "weights" / "medusa_acceptance.json"
SUM_TOLERANCE = 1e-9  # accept[d] sums over ranks to at most 1 within float rounding
PATHS_PRINTED = 128  # rank paths `plan --tree` prints; --json carries all
MAX_BATCH_SEARCH = 4096  # where the tree stops paying is searched up to this batch (as `batching.crossover_batch`)
SHAPE = re.compile(r"[0-9]+(x[0-9]+)*")


# ---------------------------------------------------------------------------------------------
# Tree shapes


def full_tree(branching: tuple[int, ...]) -> Tree:
    """`AxBxC`: every node at depth d has branching[d] children (`reference.tree_decode.TreeDraft`)."""
    levels: list[tuple[int, ...]] = [()]
    paths: list[tuple[int, ...]] = []
    for b in branching:
        levels = [p + (r,) for p in levels for r in range(b)]
        paths += levels
    return tuple(paths)


def full_tree_nodes(branching: tuple[int, ...]) -> int:
    """Nodes of the full tree: b_1 + b_1 b_2 + ... (no root)."""
    return sum(math.prod(branching[: d + 1]) for d in range(len(branching)))


def check_tree(paths, what: str = "--tree") -> Tree:
    """Rank paths as a user gives them (a JSON list of lists of ranks) checked and sorted: each a
    non-empty list of whole numbers >= 0, none twice, every prefix listed (else 'not a tree')."""
    if not isinstance(paths, list) or not paths:
        raise UserError(f"{what}: a tree is a non-empty JSON list of rank paths such as [[0], [1], [0, 0]]")
    seen: set[tuple[int, ...]] = set()
    for p in paths:
        if not isinstance(p, list) or not p or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in p):
            raise UserError(f"{what}: every rank path is a non-empty list of ranks >= 0 (0 = most likely), got {_quote(p)}")
        if tuple(p) in seen:
            raise UserError(f"{what}: rank path {_quote(p)} is listed twice")
        seen.add(tuple(p))
    for p in seen:
        if len(p) > 1 and p[:-1] not in seen:
            raise UserError(f"{what}: not a tree: {_quote(list(p))} is listed but its parent {_quote(list(p[:-1]))} is not")
    return tuple(sorted(seen, key=lambda p: (len(p), p)))


def parse_tree(spec: str, acceptance: TreeAcceptance | None = None, max_nodes: int | None = None) -> Tree:
    """A tree from `--tree SPEC`: `AxBxC` (a full tree), rank paths as inline JSON or a JSON file,
    or `best:N` (`best_tree` of N nodes from `acceptance`). `max_nodes`: the most the context
    holds (a one-line error past it, checked before a full tree is built)."""
    spec = spec.strip()
    shown = _shown(spec)
    if spec.startswith("best:"):
        count = spec.removeprefix("best:")
        if not re.fullmatch("[0-9]+", count) or not count.strip("0"):
            raise UserError(f"--tree {shown}: best:N takes a whole number of nodes N >= 1")
        n = _count(count, shown)
        _check_size(shown, n, max_nodes)
        if acceptance is None:
            raise UserError(f"--tree {shown}: best:N needs an acceptance table (--acceptance FILE)")
        return best_tree(acceptance, n)
    if SHAPE.fullmatch(spec):
        branching = tuple(_count(b, shown) for b in spec.split("x"))
        if min(branching) < 1:
            raise UserError(f"--tree {shown}: every branching factor must be >= 1")
        _check_size(shown, full_tree_nodes(branching), max_nodes)
        return full_tree(branching)
    if spec.startswith("["):
        try:
            paths = json.loads(spec)
        except (ValueError, RecursionError):  # malformed, or a number past Python's digit limit
            raise UserError(f"--tree {shown}: not valid JSON; rank paths look like [[0],[1],[0,0]]") from None
        tree = check_tree(paths, "--tree")
    elif _is_file(spec):
        tree = check_tree(read_json(Path(spec), "a tree file"), shown)
    else:
        raise UserError(f"--tree {shown}: not a shape AxBxC (e.g. 3x2x1), best:N, a JSON list of rank paths or a JSON file of one")
    _check_size(shown, len(tree), max_nodes)
    return tree


COUNT_DIGITS = 15  # node counts and branching factors past 10^15 fit no context


def _count(text: str, shown: str) -> int:
    digits = text.lstrip("0") or "0"
    if len(digits) > COUNT_DIGITS:
        raise UserError(f"--tree {shown}: a count of {len(digits)} digits; no context holds that many nodes")
    return int(digits)


def _shown(spec: str, width: int = 60) -> str:
    """The spec as an error message quotes it: at most `width` characters."""
    return spec if len(spec) <= width else spec[:width] + f"... ({len(spec)} characters)"


def _quote(value) -> str:
    """A JSON value as an error message quotes it (`_shown`)."""
    return _shown(json.dumps(value))


def _is_file(spec: str) -> bool:
    try:
        return Path(spec).is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        return False


def _check_size(shown: str, nodes: int, max_nodes: int | None) -> None:
    if max_nodes is not None and nodes > max_nodes:
        room = f"at most {max_nodes} fit" if max_nodes >= 0 else "the prompt and output alone fill it"
        raise UserError(f"--tree {shown}: {nodes} nodes do not fit the context ({room} beside the prompt, the output and the root)")


def depth(tree: Tree) -> int:
    return max(len(p) for p in tree)


def level_sizes(tree: Tree) -> list[int]:
    """[D] nodes at depths 1..D."""
    return np.bincount([len(p) for p in tree], minlength=depth(tree) + 1)[1:].tolist()


# ---------------------------------------------------------------------------------------------
# Acceptance


@dataclass(frozen=True)
class TreeAcceptance:
    """A tree acceptance table (the shared contract's JSON), validated."""

    accept: tuple[tuple[float, ...], ...]  # accept[d-1][r]: rank r at depth d accepted given its parent was
    draft: str  # "medusa" or "tree": what proposed the candidates
    target: str
    target_sha256: str
    temperature: float
    steps: int  # verify steps measured
    tree: Tree  # the tree measured with
    source: str  # the command that produced it
    path: str  # the file it was read from

    def rate(self, d: int, r: int) -> float:
        """accept[d-1][r], 0 for a rank past those measured."""
        row = self.accept[d - 1]
        return row[r] if r < len(row) else 0.0


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_tree_acceptance(data, path: str) -> TreeAcceptance:
    """The contract's JSON checked field by field; one UserError line naming the file and the field."""

    def bad(field: str, why: str) -> UserError:
        return UserError(f"{path}: field {field}: {why}")

    if not isinstance(data, dict):
        raise UserError(f"{path}: a tree acceptance file is a JSON object with kind 'tree_acceptance'")
    if data.get("kind") != "tree_acceptance":
        raise bad("kind", f"must be 'tree_acceptance', got {_quote(data.get('kind'))}")
    if data.get("draft") not in ("medusa", "tree"):
        raise bad("draft", f"must be 'medusa' or 'tree', got {_quote(data.get('draft'))}")
    for field in ("target", "target_sha256", "source"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise bad(field, "must be a non-empty string")
    if not _number(data.get("temperature")) or data["temperature"] < 0:
        raise bad("temperature", f"must be a number >= 0, got {_quote(data.get('temperature'))}")
    steps = data.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise bad("steps", f"must be a whole number of verify steps >= 1, got {_quote(steps)}")
    accept = data.get("accept")
    if not isinstance(accept, list) or not accept or not all(isinstance(row, list) for row in accept):
        raise bad("accept", "must be a non-empty list with one list of per-rank rates per depth")
    for d, row in enumerate(accept):
        for r, a in enumerate(row):
            if not _number(a) or not 0.0 <= a <= 1.0:
                raise bad(f"accept[{d}][{r}]", f"must be a probability in [0, 1], got {_quote(a)}")
        if sum(row) > 1.0 + SUM_TOLERANCE:
            raise bad(f"accept[{d}]", f"rates over ranks at depth {d + 1} sum to {sum(row):.6g} > 1 (at most one child is accepted)")
    tree = check_tree(data.get("tree"), f"{path}: field tree")
    if depth(tree) > len(accept):
        raise bad("tree", f"reaches depth {depth(tree)} but accept covers depths 1..{len(accept)}")
    return TreeAcceptance(tuple(tuple(float(a) for a in row) for row in accept), data["draft"], data["target"], data["target_sha256"],
                          float(data["temperature"]), steps, tree, data["source"], str(path))  # fmt: skip


def load_tree_acceptance(path: str | Path) -> TreeAcceptance:
    return check_tree_acceptance(read_json(Path(path), "a tree acceptance file"), str(path))


def check_covers(tree: Tree, acc: TreeAcceptance) -> None:
    """The table must have measured every depth the tree reaches."""
    if depth(tree) > len(acc.accept):
        raise UserError(f"{acc.path}: field accept: covers depths 1..{len(acc.accept)} but the tree reaches depth {depth(tree)}")


def path_probability(acc: TreeAcceptance, path: tuple[int, ...]) -> float:
    """P(the node at `path` is accepted) = prod over its path of accept[depth - 1][rank]."""
    return math.prod(acc.rate(d + 1, r) for d, r in enumerate(path))


def survival(tree: Tree, acc: TreeAcceptance) -> np.ndarray:
    """[D + 1] P(at least k candidates accepted), k = 0..D: the sum of path probabilities of the
    nodes at depth k (disjoint events: one node per depth at most is accepted)."""
    check_covers(tree, acc)
    s = np.zeros(depth(tree) + 1)
    s[0] = 1.0
    for p in tree:
        s[len(p)] += path_probability(acc, p)
    return np.minimum(s, 1.0)  # rounding only: the contract's sums are <= 1 + 1e-9


def accepted_length_pmf(tree: Tree, acc: TreeAcceptance) -> np.ndarray:
    """[D + 1] P(exactly k candidates accepted); the step emits k + 1 tokens."""
    s = survival(tree, acc)
    return np.maximum(s - np.append(s[1:], 0.0), 0.0)


def expected_tokens(tree: Tree, acc: TreeAcceptance) -> float:
    """E[tokens per step] = 1 + sum over nodes of their path probability (bonus token included)."""
    check_covers(tree, acc)
    return 1.0 + sum(path_probability(acc, p) for p in tree)


def candidate_nodes(acc: TreeAcceptance, cap: int) -> int:
    """Nodes a tree can draw from the table (every measured rank at every measured depth), counted up to `cap`."""
    total, level = 0, 1
    for row in acc.accept:
        level *= len(row)
        total += level
        if total >= cap or level == 0:
            break
    return min(total, cap)


def best_tree(acc: TreeAcceptance, n: int) -> Tree:
    """The tree of `n` nodes with the largest expected tokens per step, built as Medusa builds its
    sparse trees: start from the root and repeatedly add the frontier node (a child, of a measured
    rank, of a node already in) with the largest path probability; ties go to the shallower node,
    then to the lower ranks.

    Greedy is optimal here: a child's path probability never exceeds its parent's (each factor is
    <= 1), so the n largest path probabilities can always be taken closed under prefixes, and the
    expected length is 1 + their sum (tests hold it to brute force over all trees)."""
    available = candidate_nodes(acc, n)
    if available < n:
        raise UserError(f"--tree best:{n}: {acc.path} measures only {available} candidate nodes "
                        f"(ranks per depth {[len(row) for row in acc.accept]}); ask for at most {available}")  # fmt: skip
    frontier = [(-acc.rate(1, r), 1, (r,)) for r in range(len(acc.accept[0]))]
    heapq.heapify(frontier)
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < n:
        neg_p, d, path = heapq.heappop(frontier)
        chosen.append(path)
        if d < len(acc.accept):
            for r in range(len(acc.accept[d])):
                heapq.heappush(frontier, (neg_p * acc.rate(d + 1, r), d + 1, path + (r,)))
    return tuple(sorted(chosen, key=lambda p: (len(p), p)))


def all_trees(candidates: list[tuple[int, ...]], n: int):
    """Every tree of `n` nodes drawn from `candidates` (prefix-closed subsets): the brute-force
    reference `best_tree` is tested against (exponential; tiny tables only)."""
    for subset in itertools.combinations(candidates, n):
        chosen = set(subset)
        if all(len(p) == 1 or p[:-1] in chosen for p in chosen):
            yield tuple(sorted(chosen, key=lambda p: (len(p), p)))


# ---------------------------------------------------------------------------------------------
# Pricing


def _device(hw: HardwareProfile | DeviceModel) -> DeviceModel:
    return hw if not isinstance(hw, HardwareProfile) else device_model(hw)


def verify_pass(target: ModelSpec, hw: HardwareProfile, batch: int, context_len: int, nodes: int,
                dtype: str = "fp16", tp: int = 1) -> dict[str, KernelCost]:  # fmt: skip
    """One target pass verifying a tree of `nodes` nodes per sequence: `nodes` + 1 query tokens per
    sequence (the root and every node) through every GEMM and the LM head, attention over the
    `context_len` cached keys plus the tree (the module docstring states the mask's
    approximation), `nodes` + 1 KV entries written. Seconds per GPU of a `tp`-way group."""
    return forward(target, hw, batch, context_len, nodes + 1, dtype, tp=tp)


def medusa_heads_cost(target: ModelSpec, hw: HardwareProfile | DeviceModel, batch: int, heads: int,
                      dtype: str = "fp16", tp: int = 1) -> KernelCost:  # fmt: skip
    """Medusa-1 heads (Cai et al. 2024, eq. 1): head k maps the last hidden state h [batch, d] to
    softmax(W_k (h + SiLU(U_k h))), U_k [d, d], W_k [d, vocab]: two GEMMs per head, one row per
    sequence. Under tensor parallelism W_k splits the vocabulary like the LM head and U_k is
    replicated. The SiLU, the residual add and the top-k over each head's logits are elementwise
    over [batch, d] or [batch, vocab] and left out (a few microseconds against the heads' weight
    reads, 2 d (d + vocab) bytes per head in fp16)."""
    dev = _device(hw)
    d = target.d_model
    block = dev.gemm(batch, d, d, dtype, "medusa_resblock")
    head = dev.gemm(batch, -(-target.vocab_size // tp), d, dtype, "medusa_head")
    return (block + head).scaled(heads, "medusa_heads")


def medusa_heads_bytes(target: ModelSpec, heads: int, dtype: str = "fp16", tp: int = 1) -> int:
    """Weight bytes of `heads` Medusa heads on each GPU: U_k [d, d] + W_k [d, vocab / tp] each."""
    d = target.d_model
    return heads * (d * d + d * -(-target.vocab_size // tp)) * DTYPE_BYTES[dtype]


def draft_tree_cost(draft: ModelSpec, hw: HardwareProfile, batch: int, context_len: int, tree: Tree,
                    dtype: str = "fp16", tp: int = 1) -> KernelCost:  # fmt: skip
    """A draft model growing `tree` level by level: pass l (l = 0..D-1) reads the L_l nodes of depth
    l (L_0 = 1, the root) as query tokens over the cache of `context_len` plus the L_0 + ... +
    L_(l-1) nodes before them, and proposes their children (`reference.tree_decode.TreeDraft`)."""
    sizes = [1, *level_sizes(tree)]
    total = None
    for lvl in range(depth(tree)):
        cost = forward(draft, hw, batch, context_len + sum(sizes[:lvl]), sizes[lvl], dtype, tp=tp)["total"]
        total = cost if total is None else total + cost
    return KernelCost("draft_tree", total.flops, total.hbm_bytes, total.time_s, total.launches, total.low_s, total.high_s)


def proposer_cost(target: ModelSpec, draft: ModelSpec | None, hw: HardwareProfile, batch: int, context_len: int, tree: Tree,
                  dtype: str = "fp16", tp: int = 1) -> KernelCost:  # fmt: skip
    """What proposes the tree per step: Medusa heads (`draft` None, one head per depth) or a draft model."""
    if draft is None:
        return medusa_heads_cost(target, hw, batch, depth(tree), dtype, tp)
    return draft_tree_cost(draft, hw, batch, context_len, tree, dtype, tp)


def tree_step_s(target: ModelSpec, draft: ModelSpec | None, hw: HardwareProfile, batch: int, context_len: int, tree: Tree,
                dtype: str = "fp16", tp: int = 1) -> tuple[float, float]:  # fmt: skip
    """(proposer seconds, verify seconds) of one tree-speculative step."""
    propose = proposer_cost(target, draft, hw, batch, context_len, tree, dtype, tp)
    verify = verify_pass(target, hw, batch, context_len, len(tree), dtype, tp)["total"]
    return propose.time_s, verify.time_s


def kv_lookahead_bytes(target: ModelSpec, draft: ModelSpec | None, batch: int, nodes: int, dtype: str = "fp16", tp: int = 1) -> int:
    """KV bytes a step writes beyond the accepted tokens, at most: `nodes` + 1 entries per sequence
    in the target's cache (and the draft's, for a draft-model tree), of which the root's and the
    accepted path's are kept and the rest dropped after the step."""
    per_token = kv_bytes_per_token(target, dtype, tp) + (kv_bytes_per_token(draft, dtype, tp) if draft is not None else 0)
    return batch * (nodes + 1) * per_token


# ---------------------------------------------------------------------------------------------
# `plan --tree`


def check_proposer(acc: TreeAcceptance, draft: ModelSpec | None, target: ModelSpec) -> None:
    """The table must come from the same kind of proposer, and a draft model must share the vocabulary."""
    kind = "medusa" if draft is None else "tree"
    if acc.draft != kind:
        uses = "Medusa heads (--draft medusa)" if draft is None else f"a draft-model tree ({draft.name})"
        raise UserError(f"{acc.path}: field draft: the table was measured with draft '{acc.draft}' candidates but this run uses {uses}")
    if draft is not None and draft.vocab_size != target.vocab_size:
        raise UserError(f"draft {draft.name} has vocabulary {draft.vocab_size}, target {target.name} has {target.vocab_size}; speculative decoding needs one vocabulary")


def acceptance_summary(acc: TreeAcceptance, target: ModelSpec) -> dict:
    """Where the acceptance comes from, and whether it was measured on the target planned for."""
    same = acc.target == target.name
    note = (f"measured on {target.name}" if same else
            f"measured on {acc.target}, not on {target.name}: the prediction assumes {target.name} accepts the candidates as often")  # fmt: skip
    return {"file": acc.path, "draft": acc.draft, "target": acc.target, "target_sha256": acc.target_sha256, "temperature": acc.temperature,
            "steps": acc.steps, "measured_tree_nodes": len(acc.tree), "source": acc.source, "accept": [list(r) for r in acc.accept],
            "measured_on_plan_target": same, "note": note}  # fmt: skip


def stops_paying_at_batch(target: ModelSpec, draft: ModelSpec | None, hw: HardwareProfile, context_len: int, tree: Tree,
                          tokens_per_step: float, dtype: str = "fp16", limit: int = MAX_BATCH_SEARCH) -> int | None:  # fmt: skip
    """The smallest batch at which the tree's tokens/s is at most autoregressive decoding's (speedup
    <= 1), or None if it still pays at `limit`. Searched by doubling, then bisection between the
    last batch that pays and the first that does not: it assumes the speedup, once at or below 1,
    stays there as the batch grows (the verify pass only gets more compute-bound)."""

    def pays(batch: int) -> bool:
        propose_s, verify_s = tree_step_s(target, draft, hw, batch, context_len, tree, dtype)
        ar_s = forward(target, hw, batch, context_len, 1, dtype)["total"].time_s
        return tokens_per_step / (propose_s + verify_s) > 1.0 / ar_s

    hi = 1
    while hi <= limit and pays(hi):
        hi *= 2
    if hi > limit:
        return None
    lo = hi // 2  # pays (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if pays(mid) else (lo, mid)
    return hi


def build_tree_plan(
    hw: HardwareProfile,
    target: ModelSpec,
    draft: ModelSpec | None,
    tree: Tree,
    acc: TreeAcceptance,
    tree_spec: str,
    linear_draft: ModelSpec,
    alpha: float,
    batch: int = 1,
    prompt_len: int = 512,
    output_len: int = 256,
    dtype: str = "fp16",
) -> dict:
    """Predicted tree-speculative decoding of `target` on `hw` (Medusa heads when `draft` is None,
    else a draft-model tree), beside autoregressive decoding and linear drafting with
    `linear_draft` at acceptance `alpha` and its best gamma (`plan.build_plan`). Steps are priced at
    the mean context of the generation, prompt_len + output_len / 2, as `plan` does."""
    from simulator import plan as plan_lib
    from simulator.forward import weight_bytes

    plan_lib.check_plan_inputs(alpha, None, batch, prompt_len, output_len)
    if prompt_len + output_len > target.max_seq_len:
        raise UserError(f"--prompt-len {prompt_len} + --output-len {output_len} exceed {target.name}'s {target.max_seq_len} positions")
    _check_size(_shown(tree_spec), len(tree), target.max_seq_len - prompt_len - output_len - 1)
    check_proposer(acc, draft, target)
    check_covers(tree, acc)
    context_len = prompt_len + output_len // 2
    ar = forward(target, hw, batch, context_len, 1, dtype)["total"]
    propose = proposer_cost(target, draft, hw, batch, context_len, tree, dtype)
    verify = verify_pass(target, hw, batch, context_len, len(tree), dtype)["total"]
    tokens = expected_tokens(tree, acc)
    step_s = propose.time_s + verify.time_s
    tree_tps, ar_tps = batch * tokens / step_s, batch / ar.time_s
    linear = plan_lib.build_plan(hw, target, linear_draft, alpha, None, batch, prompt_len, output_len, dtype)
    best = linear["speculative"]["rows"][linear["recommended_gamma"]]
    weights = weight_bytes(target, dtype) + (medusa_heads_bytes(target, depth(tree), dtype) if draft is None else weight_bytes(draft, dtype))
    kv = batch * (prompt_len + output_len) * (kv_bytes_per_token(target, dtype) + (kv_bytes_per_token(draft, dtype) if draft else 0))
    memory = weights + kv + kv_lookahead_bytes(target, draft, batch, len(tree), dtype)
    return {
        "gpu": hw.name,
        "target": target.name,
        "draft": MEDUSA if draft is None else draft.name,
        "dtype": dtype,
        "batch": batch,
        "prompt_len": prompt_len,
        "output_len": output_len,
        "context_len_mean": context_len,
        "tree": {"spec": tree_spec, "nodes": len(tree), "depth": depth(tree), "nodes_per_depth": level_sizes(tree),
                 "paths": [list(p) for p in tree], "medusa_heads": depth(tree) if draft is None else None},  # fmt: skip
        "acceptance": acceptance_summary(acc, target),
        "expected_tokens_per_step": tokens,
        "accepted_length_pmf": accepted_length_pmf(tree, acc).tolist(),
        "autoregressive_step_time_s": ar.time_s,
        "propose_time_s": propose.time_s,
        "verify_time_s": verify.time_s,
        "verify_query_tokens": batch * (len(tree) + 1),
        "verify_compute_bound_from_tokens": plan_lib.memory_bound_until_tokens(target, hw, dtype),
        "step_time_s": step_s,
        "autoregressive_tokens_per_s": ar_tps,
        "tokens_per_s": tree_tps,
        "speedup_over_autoregressive": tree_tps / ar_tps,
        "linear": {"draft": linear_draft.name, "alpha": alpha, "alpha_assumed": True, "best_gamma": best["gamma"],
                   "expected_tokens_per_step": best["expected_tokens_per_step"], "tokens_per_s": best["tokens_per_s"],
                   "speedup_over_autoregressive": best["speedup"]},  # fmt: skip
        "speedup_over_linear": tree_tps / best["tokens_per_s"],
        "stops_paying_at_batch": stops_paying_at_batch(target, draft, hw, context_len, tree, tokens, dtype),
        "stops_paying_search_limit": MAX_BATCH_SEARCH,
        "weights_kv_and_lookahead_bytes": memory,
        "fits_in_memory": memory <= hw.memory_bytes,
    }


def format_tree_plan(p: dict) -> str:
    t, a, lin = p["tree"], p["acceptance"], p["linear"]
    proposer = f"Medusa heads on {p['target']} ({t['medusa_heads']} heads, one per depth)" if p["draft"] == MEDUSA else f"draft model {p['draft']}, one pass per level"
    stop = (f"at batch {p['stops_paying_at_batch']} (speedup over autoregressive <= 1 from there)" if p["stops_paying_at_batch"] is not None
            else f"not up to batch {p['stops_paying_search_limit']}")  # fmt: skip
    shown = [("[" + ",".join(map(str, q)) + "]") for q in t["paths"][:PATHS_PRINTED]]
    if t["nodes"] > PATHS_PRINTED:
        shown.append(f"... {t['nodes'] - PATHS_PRINTED} more in --json")
    wrapped = textwrap.wrap(" ".join(shown), 100, break_on_hyphens=False)
    lines = [
        f"Tree        {t['spec']}: {t['nodes']} nodes, depth {t['depth']}, nodes per depth {t['nodes_per_depth']}; proposed by {proposer}",
        *(f"{'rank paths' if i == 0 else '':<12}{line}" for i, line in enumerate(wrapped)),
        f"Acceptance  {a['file']}: {a['draft']} candidates on {a['target']}, temperature {a['temperature']:g}, {a['steps']} verify steps",
        f"            {a['note']}",
        f"            produced by: {a['source']}",
        f"Workload    {p['target']} on {p['gpu']}, batch {p['batch']}, prompt {p['prompt_len']}, output {p['output_len']} tokens, {p['dtype']}"
        + ("" if p["fits_in_memory"] else "  (weights + KV cache DO NOT FIT)"),
        "",
        f"Expected tokens per step  {p['expected_tokens_per_step']:.3f} (accepted candidates + the target's token)",
        f"Step at context {p['context_len_mean']}: propose {p['propose_time_s'] * 1e3:.3f} ms + verify {p['verify_time_s'] * 1e3:.3f} ms "
        f"({p['verify_query_tokens']} query tokens; compute-bound from ~{p['verify_compute_bound_from_tokens']}); "
        f"autoregressive step {p['autoregressive_step_time_s'] * 1e3:.3f} ms",
        f"Autoregressive      {p['autoregressive_tokens_per_s']:.1f} tokens/s",
        f"Tree                {p['tokens_per_s']:.1f} tokens/s, speedup {p['speedup_over_autoregressive']:.3f}x over autoregressive",
        f"Linear drafting     {lin['tokens_per_s']:.1f} tokens/s, speedup {lin['speedup_over_autoregressive']:.3f}x "
        f"(draft {lin['draft']}, alpha {lin['alpha']:g} assumed, best gamma {lin['best_gamma']})",
        f"Tree over linear    {p['speedup_over_linear']:.3f}x",
        f"The tree stops paying {stop}",
    ]
    return "\n".join(lines)


def resolve_acceptance(path: str | None, medusa: bool) -> TreeAcceptance:
    """`--acceptance FILE`, or for Medusa the executor's measured table where the project has one."""
    if path is None:
        if not medusa or not DEFAULT_MEDUSA_ACCEPTANCE.is_file():
            raise UserError("--tree needs a measured acceptance table: give --acceptance FILE "
                            "(written by python -m reference specdec --draft medusa|tree --acceptance-out FILE)")  # fmt: skip
        path = str(DEFAULT_MEDUSA_ACCEPTANCE)
    return load_tree_acceptance(path)


def tree_plan_from_args(args) -> dict:
    """`plan --tree` / `plan --draft medusa` from parsed options (`simulator.__main__`)."""
    from simulator import plan as plan_lib
    from simulator.hardware import load_profile
    from simulator.models import load_model

    medusa = args.draft == MEDUSA
    if args.tree is None:
        raise UserError("--draft medusa needs --tree: a shape such as 3x2x1, rank paths such as [[0],[1],[0,0]], or best:N")
    if args.gamma is not None:
        raise UserError("--gamma does not apply to a tree (--tree sets the candidates verified per step)")
    hw = load_profile(args.gpu)
    target = load_model(args.model)
    draft = None if medusa else load_model(args.draft or plan_lib.DEFAULT_DRAFT)
    room = target.max_seq_len - args.prompt_len - args.output_len - 1
    acc = resolve_acceptance(args.acceptance, medusa)
    tree = parse_tree(args.tree, acc, max_nodes=room)
    linear_draft = draft if draft is not None else load_model(plan_lib.DEFAULT_DRAFT)
    batch = 1 if args.batch is None else args.batch
    return build_tree_plan(hw, target, draft, tree, acc, args.tree, linear_draft, args.alpha, batch, args.prompt_len, args.output_len, args.dtype)


# ---------------------------------------------------------------------------------------------
# `simulate --tree`: a serving engine that speculates with a tree


@dataclass(frozen=True)
class TreeSpeculation:
    """What speculates in a tree-speculative engine: `tree` proposed by Medusa heads (`draft` None)
    or by a draft model, scored by `acceptance`."""

    tree: Tree
    draft: ModelSpec | None
    acceptance: TreeAcceptance
    spec: str  # the --tree text

    @property
    def name(self) -> str:
        return MEDUSA if self.draft is None else self.draft.name

    def acceptance_model(self):
        """The accepted-length law as the engine draws it: `serving.AcceptanceModel` of kind
        'empirical' over 0..N accepted (zero past the tree's depth), N the tree's nodes."""
        from simulator.serving import AcceptanceModel

        pmf = accepted_length_pmf(self.tree, self.acceptance)
        return AcceptanceModel(kind="empirical", counts=[*pmf.tolist(), *[0.0] * (len(self.tree) + 1 - pmf.size)])

    def summary(self, target: ModelSpec) -> dict:
        return {"spec": self.spec, "nodes": len(self.tree), "depth": depth(self.tree), "nodes_per_depth": level_sizes(self.tree),
                "proposer": self.name, "expected_tokens_per_step": expected_tokens(self.tree, self.acceptance),
                "acceptance": acceptance_summary(self.acceptance, target)}  # fmt: skip

    def engine(self, *args, **kwargs):
        """A `TreeEngine` with `serving.Engine`'s arguments (`serving.simulate_serving(engine=...)`)."""
        return TreeEngine(*args, speculation=self, **kwargs)


def speculation_from_args(tree_spec: str | None, draft_name: str | None, acceptance_path: str | None, target: ModelSpec) -> TreeSpeculation:
    """`--tree` / `--draft medusa` / `--acceptance` of `simulate`, checked: the smallest request (one
    prompt and one output token) must leave room for the tree's N + 1 positions."""
    from simulator.models import load_model

    medusa = draft_name == MEDUSA
    if tree_spec is None:
        raise UserError("--draft medusa needs --tree: a shape such as 3x2x1, rank paths such as [[0],[1],[0,0]], or best:N")
    draft = None if medusa else load_model(draft_name)
    acc = resolve_acceptance(acceptance_path, medusa)
    tree = parse_tree(tree_spec, acc, max_nodes=target.max_seq_len - 3)
    check_proposer(acc, draft, target)
    check_covers(tree, acc)
    return TreeSpeculation(tree, draft, acc, tree_spec)


def tree_kv_cache_blocks(hw: HardwareProfile, target: ModelSpec, speculation: TreeSpeculation, cfg) -> tuple[int, int]:
    """(blocks, bytes per block per GPU) of a tree engine: `serving.kv_cache_blocks` with the draft
    model's weights and KV cache, or with Medusa's heads' weights (no KV cache of their own)."""
    from simulator.forward import weight_bytes
    from simulator.serving import kv_cache_blocks

    if speculation.draft is not None:
        return kv_cache_blocks(hw, target, speculation.draft, cfg)
    blocks, bytes_per_block = kv_cache_blocks(hw, target, None, cfg)  # checks the target alone fits
    usable_bytes = hw.memory_bytes * cfg.memory_utilization - weight_bytes(target, cfg.dtype, cfg.tp)
    heads = medusa_heads_bytes(target, depth(speculation.tree), cfg.dtype, cfg.tp)
    blocks = int((usable_bytes - heads) // bytes_per_block)
    if blocks < 1:
        raise UserError(f"{target.name} + {depth(speculation.tree)} Medusa heads ({heads / 1e9:.2f} GB) leave no room on {hw.name} "
                        f"for one KV block of {cfg.block_tokens} tokens")  # fmt: skip
    return blocks, bytes_per_block


def _engine_base():
    from simulator.serving import Engine

    return Engine


class TreeEngine(_engine_base()):
    """`serving.Engine` speculating with a tree of N nodes: gamma = N, so each verify pass carries
    N + 1 query tokens per sequence and reserves N + 1 KV entries of lookahead (released but for
    the accepted path after the step), the number accepted drawn from the tree's accepted-length
    law, and each speculative step's time grown by the proposer's: Medusa heads over the batch, or
    one draft pass per tree level. Without speculation (above `spec_off_above_batch`) a draft model
    runs one pass to keep its cache in step, as the linear engine's does; Medusa's heads do not run.
    The base engine plans and commits the steps; only their prices (`_decode_s_direct`,
    `_mixed_s`) are grown here."""

    def __init__(self, env, hw, target, draft, acceptance, cfg, rng, on_progress=None, time_scale=1.0, *, speculation: TreeSpeculation):
        from simulator.serving import PassCost, draft_tp

        if cfg.gamma != len(speculation.tree):
            raise UserError(f"a tree engine verifies the tree's {len(speculation.tree)} nodes per step, not gamma {cfg.gamma}")
        super().__init__(env, hw, target, None, acceptance, cfg, rng, on_progress, time_scale)  # no draft model of the base's
        self.speculation = speculation
        self.gamma = cfg.gamma
        acceptance.check(self.gamma)
        self.accept_cdf = np.cumsum(acceptance.pmf(self.gamma))
        self.accept_cdf[-1] = 1.0
        self.mean_tokens = acceptance.mean_tokens(self.gamma)
        self.n_blocks, self.bytes_per_block = tree_kv_cache_blocks(hw, target, speculation, cfg)
        self.watermark_blocks = int(cfg.watermark_fraction * self.n_blocks)
        self.levels = [1, *level_sizes(speculation.tree)][:-1]  # query tokens of draft pass l: the nodes of depth l
        d = speculation.draft
        self.tree_draft_cost = PassCost(d, hw, cfg.dtype, draft_tp(d, cfg.tp), time_scale) if d is not None else None
        self._time_scale, self._heads_s = time_scale, {}

    def _medusa_s(self, batch: int) -> float:
        t = self._heads_s.get(batch)
        if t is None:
            cost = medusa_heads_cost(self.target, self.target_cost.device, batch, depth(self.speculation.tree), self.cfg.dtype, self.cfg.tp)
            t = self._heads_s[batch] = self._time_scale * cost.time_s
        return t

    def _propose_s(self, q: int, n: int, ctx_sum):
        """Proposer seconds of steps over `n` decoding sequences whose contexts sum to `ctx_sum` (an array, one per step)."""
        ctx_sum = np.asarray(ctx_sum, dtype=float)
        if n == 0:
            return np.zeros(ctx_sum.shape)
        if self.tree_draft_cost is None:
            return np.full(ctx_sum.shape, self._medusa_s(n) if q > 1 else 0.0)
        levels = self.levels if q > 1 else [1]
        before = np.cumsum([0, *levels[:-1]])  # nodes in the draft's cache ahead of level l
        return sum(self.tree_draft_cost.uniform_s(n, size, ctx_sum + n * b) for size, b in zip(levels, before, strict=True))

    def _decode_s_direct(self, n: int, q: int, ctx_sum: np.ndarray) -> np.ndarray:
        return super()._decode_s_direct(n, q, ctx_sum) + self._propose_s(q, n, ctx_sum)

    def _mixed_s(self, q: int, n_dec: int, ctx_dec: int, n_chunks: int, chunk_tokens: int, chunk_keys: int, finishing: int) -> float:
        step_s = super()._mixed_s(q, n_dec, ctx_dec, n_chunks, chunk_tokens, chunk_keys, finishing)
        if self.tree_draft_cost is not None:  # the draft reads the prompts too: its first pass carries the chunks
            step_s += float(self.tree_draft_cost.mixed_s(n_dec, 1, ctx_dec + n_dec, n_chunks, chunk_tokens, chunk_keys, n_dec + finishing))
            if q > 1 and n_dec:
                levels = self.levels[1:]
                before = np.cumsum([1, *levels[:-1]]) if levels else []
                step_s += sum(float(self.tree_draft_cost.uniform_s(n_dec, size, ctx_dec + n_dec * b)) for size, b in zip(levels, before, strict=True))
        elif q > 1 and n_dec:
            step_s += self._medusa_s(n_dec)
        return float(step_s)
