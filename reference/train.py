"""Train the executor's draft/target pair on the Python standard library's own source files.

    python -m reference.train            # writes reference/weights/{target,draft}.pt and manifest.json
    python -m reference.train medusa     # then Medusa heads for that target: medusa.pt, in manifest.json

Every machine with Python has this text, so the pair is reproducible anywhere: bytes are the
vocabulary (256), the files are read in sorted order, batches come from a seeded generator, and
the thread count is fixed. On the same Python (the corpus), torch version and CPU type the weights
come out bit for bit the same; manifest.json records the corpus and weight hashes to check that.
About 8 minutes on 2 idle CPU cores for the pair.

The target also learns to exit early after half its layers (LayerSkip, Elhoushi et al. 2024), so
the target with its top layers skipped is a usable self-speculative draft. The draft model is
distilled from the target (soft labels; DistillSpec, Zhou et al. 2024), since the acceptance rate
is 1 - TV(p, q) and matching the target's distribution is exactly what raises it.

The Medusa stage trains K heads on the frozen target's last hidden state (Medusa-1, Cai et al. 2024;
`reference.medusa`) on the same corpus and split, seeded, and records in the manifest the sha256 of
the target they were trained for, so heads are never used with another target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

if __name__ == "__main__":  # before torch loads: fixed thread counts, so every run splits its reductions alike
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    os.environ.setdefault("OMP_DYNAMIC", "FALSE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from reference.medusa import MedusaHeads, best_tree, file_sha256, head_accuracy, medusa_loss, save_heads  # noqa: E402
from reference.model import WEIGHTS_DIR, Transformer, load_weights, save_weights  # noqa: E402
from simulator.models import ModelSpec  # noqa: E402

TARGET_SPEC = ModelSpec(
    name="stdlib-target-3m", d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768, vocab_size=256,
    max_seq_len=1024, source="reference/train.py: bytes of the Python standard library",
)  # fmt: skip
DRAFT_SPEC = ModelSpec(
    name="stdlib-draft-0.3m", d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=384, vocab_size=256,
    max_seq_len=1024, source="reference/train.py: distilled from stdlib-target-3m",
)  # fmt: skip
EXIT_LAYER = TARGET_SPEC.n_layers // 2  # the layer-skip draft runs layers [0, EXIT_LAYER) then the head
EXIT_LOSS_WEIGHT = 0.5

SEQ_LEN = 256
BATCH = 16
TARGET_STEPS = 1400
DRAFT_STEPS = 1200
SEED = 1234
THREADS = 2
MEDUSA_HEADS = 4  # Medusa-1 used 5 on Vicuna; 4 fit the 10-minute budget on 2 cores with room
MEDUSA_STEPS = 600
MEDUSA_TOP = 10  # held-out accuracy reported for the top 1 .. 10 candidates of each head
MEDUSA_TREE_NODES = 32  # issue 15's node budget for the Medusa tree
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no test suites, no site-packages), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))


def stdlib_corpus() -> bytes:
    """The standard library's .py files (`stdlib_files`) as one byte string, joined by newlines."""
    return b"\n".join(p.read_bytes() for p in stdlib_files())


def batches(data: torch.Tensor, steps: int, seed: int, extra: int = 0):
    """`steps` batches of [BATCH, SEQ_LEN + 1 + extra] byte windows at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    span = torch.arange(SEQ_LEN + 1 + extra)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=g)
        yield data[starts[:, None] + span]


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over 100 steps, then cosine decay to peak / 10."""
    if step < 100:
        return peak * (step + 1) / 100
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 100) / max(1, steps - 100))))


def exit_logits(model: Transformer, x: torch.Tensor, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the full model and of the early exit after `exit_layer` blocks, from one pass. x [B, T]."""
    B, T = x.shape
    cis = torch.view_as_complex(model.rope[:T])[None, :, None]
    h = model.embed(x)
    early = None
    for i, block in enumerate(model.layers):
        if i == exit_layer:
            early = model.logits(h)
        h = block(h, cis, None, None)
    return model.logits(h), early


def train(
    model: Transformer, data: torch.Tensor, steps: int, peak_lr: float, seed: int, teacher: Transformer | None = None
) -> Transformer:
    """AdamW on next-byte cross-entropy (plus the early-exit loss for the target; soft labels from
    `teacher` for the draft), bf16 autocast on CPU."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    t0 = time.perf_counter()
    for step, xy in enumerate(batches(data, steps, seed)):
        x, y = xy[:, :-1], xy[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if teacher is None:
                logits, early = exit_logits(model, x, EXIT_LAYER)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                loss = loss + EXIT_LOSS_WEIGHT * F.cross_entropy(early.float().flatten(0, 1), y.flatten())
            else:
                with torch.no_grad():
                    p = teacher(x).float().softmax(-1)
                loss = F.cross_entropy(model(x).float().flatten(0, 1), p.flatten(0, 1))  # = KL(p || q) + H(p)
        descend(opt, loss, model.parameters(), step, steps, t0, every=200)
    return model.eval()


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, params, step: int, steps: int, t0: float, every: int) -> None:
    """One optimiser step on `loss` (gradients clipped to norm 1), and a progress line every `every` steps and at the last."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % every == 0 or step == steps - 1:
        print(f"  step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.0f} s", flush=True)


@torch.no_grad()
def evaluate(target: Transformer, draft: Transformer, data: torch.Tensor) -> dict[str, float]:
    """Held-out bits per byte of each model, and teacher-forced acceptance rates on held-out text:
    alpha = E[sum_x min(p, q)] at temperature 1 and E[argmax p == argmax q] at temperature 0."""
    n = (len(data) - 1) // SEQ_LEN
    xy = data[: n * SEQ_LEN + 1]
    x, y = xy[:-1].view(n, SEQ_LEN), xy[1:].view(n, SEQ_LEN)
    lp, lq, le = target(x), draft(x), target(x, layers=list(range(EXIT_LAYER)))
    bits = {
        name: F.cross_entropy(lg.flatten(0, 1), y.flatten()).item() / math.log(2)
        for name, lg in (("target", lp), ("draft", lq), ("layer_skip", le))
    }
    p = lp.softmax(-1)
    out = {f"{k}_bits_per_byte": round(v, 4) for k, v in bits.items()}
    for name, lg in (("draft", lq), ("layer_skip", le)):
        out[f"{name}_alpha_t1"] = round(torch.minimum(p, lg.softmax(-1)).sum(-1).mean().item(), 4)
        out[f"{name}_alpha_t0"] = round((lp.argmax(-1) == lg.argmax(-1)).float().mean().item(), 4)
    return out


def train_medusa(target: Transformer, data: torch.Tensor, steps: int, n_heads: int, peak_lr: float, seed: int) -> MedusaHeads:
    """AdamW on Medusa-1's loss (`medusa.medusa_loss`), the target frozen and run in float32 as at
    inference (its hidden states are what the heads will read), the heads' W2 started from its unembedding."""
    target.requires_grad_(False)
    torch.manual_seed(seed)
    heads = MedusaHeads(target.spec.d_model, target.spec.vocab_size, n_heads).init_from(target)
    opt = torch.optim.AdamW(heads.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.0)
    t0 = time.perf_counter()
    for step, x in enumerate(batches(data, steps, seed, extra=n_heads)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        # the target's weights do not require grad, so no graph is kept; with grad mode on, its layers
        # take F.linear rather than timing kernels per row count, so every run computes alike
        _, h = target(x[:, :SEQ_LEN], hidden=True)  # [BATCH, SEQ_LEN, d]
        loss = medusa_loss(heads, h, x)
        descend(opt, loss, heads.parameters(), step, steps, t0, every=100)
    return heads.eval()


def write_medusa_tree(accuracy: list[list[float]], path: Path, n_nodes: int = MEDUSA_TREE_NODES) -> list[tuple[int, ...]]:
    """The sparse tree `specdec --draft medusa` uses by default: Medusa's greedy choice of n_nodes
    from the heads' held-out accuracy per rank (`medusa.best_tree`), as rank paths."""
    paths = best_tree(accuracy, n_nodes)
    path.write_text(json.dumps([list(p) for p in paths]) + "\n")
    return paths


def main_medusa(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.train medusa", description="Train Medusa heads for the trained target.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder holding target.pt and manifest.json; medusa.pt goes there")
    parser.add_argument("--heads", type=int, default=MEDUSA_HEADS, help=f"number of heads K (default {MEDUSA_HEADS})")
    parser.add_argument("--steps", type=int, default=MEDUSA_STEPS, help=f"training steps (default {MEDUSA_STEPS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    manifest_path, target_path = args.out / "manifest.json", args.out / "target.pt"
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = manifest["weights_sha256"]["target"]
        target_sha = file_sha256(target_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {args.out}: needs target.pt and the manifest.json that describes it (`python -m reference.train`): {exc}", file=sys.stderr)
        return 2
    if recorded != target_sha:
        print(f"error: {target_path} is not the target manifest.json describes (sha256 differs)", file=sys.stderr)
        return 2
    target = load_weights(target_path).requires_grad_(False)
    corpus = stdlib_corpus()
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    n_val = len(data) // 50  # the pair's split: the last 2% held out
    t0, cpu0 = time.perf_counter(), time.process_time()
    heads = train_medusa(target, data[:-n_val], args.steps, args.heads, 1e-3, SEED + 2)
    t_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    save_heads(heads, target_sha, args.out / "medusa.pt")
    accuracy = head_accuracy(heads, target, data[-n_val:], SEQ_LEN, MEDUSA_TOP)
    manifest["medusa"] = {
        "heads": args.heads,
        "steps": args.steps,
        "seed": SEED + 2,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
        "target_sha256": target_sha,
        "weights_sha256": file_sha256(args.out / "medusa.pt"),
        "params": sum(p.numel() for p in heads.parameters()),
        "train_time_s": round(t_s, 1),
        "train_cpu_s": round(cpu_s, 1),  # CPU seconds over both threads: what the run costs whatever else shares the machine
        "threads": THREADS,
        "held_out_accuracy": {"top": MEDUSA_TOP, "per_head": accuracy},
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    write_medusa_tree(accuracy, args.out / "medusa_tree.json")
    for k, acc in enumerate(accuracy):
        print(f"head {k + 1} (token t+{k + 2}): top-1 {acc[0]:.3f}  top-3 {acc[2]:.3f}  top-{MEDUSA_TOP} {acc[-1]:.3f}")
    print(f"{t_s:.0f} s ({cpu_s:.0f} CPU s) for {args.steps} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["medusa"]:
        return main_medusa(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m reference.train", description=__doc__.split("\n\n")[0],
                                     epilog="`python -m reference.train medusa --help`: the Medusa heads stage")  # fmt: skip
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder for target.pt, draft.pt, manifest.json")
    parser.add_argument("--target-steps", type=int, default=TARGET_STEPS)
    parser.add_argument("--draft-steps", type=int, default=DRAFT_STEPS)
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    corpus = stdlib_corpus()
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
    n_val = len(data) // 50  # the last 2% is held out
    train_data, val_data = data[:-n_val], data[-n_val:]
    print(f"corpus: {len(corpus) / 1e6:.1f} MB of standard-library source, {n_val / 1e3:.0f} kB held out", flush=True)

    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    target = train(Transformer(TARGET_SPEC), train_data, args.target_steps, 2e-3, SEED)
    t_target_s = time.perf_counter() - t0
    print(f"target: {target.n_params / 1e6:.2f} M params, {t_target_s:.0f} s", flush=True)
    torch.manual_seed(SEED + 1)
    draft = train(Transformer(DRAFT_SPEC), train_data, args.draft_steps, 3e-3, SEED + 1, teacher=target)
    t_draft_s = time.perf_counter() - t0 - t_target_s
    print(f"draft: {draft.n_params / 1e6:.2f} M params, {t_draft_s:.0f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(target, args.out / "target.pt")
    save_weights(draft, args.out / "draft.pt")
    manifest = {
        "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
        "corpus_bytes": len(corpus),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": THREADS,
        "seed": SEED,
        "seq_len": SEQ_LEN,
        "batch": BATCH,
        "target_steps": args.target_steps,
        "draft_steps": args.draft_steps,
        "exit_layer": EXIT_LAYER,
        "train_time_s": {"target": round(t_target_s, 1), "draft": round(t_draft_s, 1)},
        "params": {"target": target.n_params, "draft": draft.n_params},
        "weights_sha256": {
            name: hashlib.sha256((args.out / f"{name}.pt").read_bytes()).hexdigest() for name in ("target", "draft")
        },
        "held_out": evaluate(target, draft, val_data),
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest["held_out"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
