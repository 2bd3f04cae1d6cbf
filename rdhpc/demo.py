"""The main job on an embedded default, as `make demo` runs it:

    rdhpc demo --run-dir runs/demo          # about a minute on 2 CPU cores

Until the data-prep stages and the DeepSpeed trainer exist (issues 8 and 3), this is the longest
end-to-end path of the pipeline: a corpus from the Python standard library's own sources (real text
already on the machine, never downloaded), byte-level tokens, the recurrent-depth model trained in one
process with the paper's depth sampler and truncated backpropagation, validation loss against
recurrence depth, and an export to the released Huginn checkpoint layout that is read back and
checked for identical logits. The run's config and results are written under the run folder.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch

from rdhpc.config import load_config, save_config
from rdhpc.model import DepthSampler, RecurrentDepthModel, load_huginn, save_huginn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
# Byte-level vocabulary: 256 byte values, then the special tokens.
BOS, EOS, PAD = 256, 257, 258


def stdlib_documents(max_bytes: int) -> list[bytes]:
    """The standard library's .py files (sorted, so every machine with the same Python reads the
    same corpus), whole files, until max_bytes are collected."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        if not data:
            continue
        docs.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return docs


def pack_rows(docs: list[bytes], row_len: int) -> torch.Tensor:
    """BOS + bytes + EOS per document, concatenated, cut into rows of row_len (last row padded)."""
    stream = []
    for doc in docs:
        stream.append(BOS)
        stream.extend(doc)
        stream.append(EOS)
    num_rows = math.ceil(len(stream) / row_len)
    stream.extend([PAD] * (num_rows * row_len - len(stream)))
    return torch.tensor(stream, dtype=torch.long).view(num_rows, row_len)


def split_inputs_labels(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = rows[:, :-1], rows[:, 1:].clone()
    labels[labels == PAD] = -100  # pad positions do not count in the loss
    return inputs, labels


@torch.no_grad()
def loss_at_depth(model, rows: torch.Tensor, depth: int, batch_size: int, seed: int) -> float:
    """Mean token loss over `rows` at a fixed recurrence depth, with a seeded random initial state."""
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        inputs, labels = split_inputs_labels(rows[start:start + batch_size])
        out = model(inputs, num_steps=depth, labels=labels)
        n = int((labels != -100).sum())
        total += float(out.loss) * n
        count += n
    return total / count


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def run_demo(run_dir: str | Path, steps: int | None = None, overrides=()) -> int:
    config = load_config(DEMO_CONFIG, list(overrides))
    mc, tc = config.model, config.train
    steps = steps or tc.max_steps
    run_dir = Path(run_dir)
    save_config(config, run_dir)
    print(f"[demo] run folder: {run_dir.resolve()}")

    # 1. Data: real text on this machine, byte-level tokens, 95/5 document split.
    docs = stdlib_documents(max_bytes=4_000_000)
    random.Random(config.data.shuffle_seed).shuffle(docs)
    num_val = max(1, len(docs) // 20)
    train_rows = pack_rows(docs[num_val:], mc.max_seq_len + 1)
    val_rows = pack_rows(docs[:num_val], mc.max_seq_len + 1)[:64]
    print(f"[demo] corpus: {len(docs)} files of the Python standard library, "
          f"{sum(map(len, docs)) / 1e6:.1f} MB -> {len(train_rows)} train rows, {len(val_rows)} validation rows "
          f"of {mc.max_seq_len + 1} byte tokens")

    # 2. Model and optimizer.
    torch.manual_seed(tc.seed)
    model = RecurrentDepthModel(mc)
    print(f"[demo] model: {model.parameter_counts()['total']:,} parameters, "
          f"prelude/core/coda = {mc.num_prelude_layers}/{mc.num_core_layers}/{mc.num_coda_layers}, "
          f"mean depth {mc.mean_recurrence}, backprop depth {mc.mean_backprop_depth}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay, eps=config.optim.eps)
    sampler = DepthSampler.from_model_config(mc, seed=tc.seed)
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(config.data.shuffle_seed))

    # 3. Training: depth drawn per step from the step number, truncated backpropagation.
    losses = []
    start = time.perf_counter()
    tokens_seen = 0
    for step in range(steps):
        lr = lr_at(step, config.optim.lr, config.schedule.warmup_steps, steps, config.schedule.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = order[(torch.arange(tc.micro_batch_size) + step * tc.micro_batch_size) % len(order)]
        inputs, labels = split_inputs_labels(train_rows[index])
        num_steps = sampler(step)
        out = model(inputs, num_steps=num_steps, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        losses.append(out.loss.item())
        tokens_seen += inputs.numel()
        if step % tc.log_interval == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            print(f"[demo] step {step:4d}/{steps}  loss {losses[-1]:.3f}  r={sum(num_steps):2d} "
                  f"(no-grad {num_steps[0]}, grad {num_steps[1]})  lr {lr:.2e}  {tokens_seen / elapsed:,.0f} tok/s",
                  flush=True)

    # 4. Validation loss against recurrence depth: the test-time scaling curve.
    model.eval()
    curve = {d: loss_at_depth(model, val_rows, d, tc.micro_batch_size, seed=tc.seed) for d in tc.val_depths}
    print("[demo] validation loss by recurrence depth:")
    for depth, loss in curve.items():
        print(f"[demo]   r = {depth:3d}   loss {loss:.4f}   ppl {math.exp(loss):8.2f}")

    # 5. Export to the released Huginn layout and read it back.
    export_dir = save_huginn(model, run_dir / "huginn")
    reloaded = load_huginn(export_dir)
    probe = val_rows[:2, :-1]
    same = torch.equal(model(probe, num_steps=4, init_scale=0).logits, reloaded(probe, num_steps=4, init_scale=0).logits)
    print(f"[demo] exported {export_dir}/ (config.json + model.safetensors); reloaded logits identical: {same}")

    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    results = {"train_loss_first10": first, "train_loss_last10": last, "val_loss_by_depth": curve,
               "steps": steps, "export_roundtrip_identical": same}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"[demo] train loss {first:.3f} -> {last:.3f}; results in {run_dir / 'results.json'}")
    ok = same and last < first
    if not ok:
        print("[demo] FAILED: the loss did not fall or the export did not round-trip")
    return 0 if ok else 1
