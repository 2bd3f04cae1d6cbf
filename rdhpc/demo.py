"""The main job on an embedded default, as `make demo` runs it:

    rdhpc demo --run-dir runs/demo          # about a minute on 2 CPU cores

Until the DeepSpeed trainer exists (issue 3), this is the longest end-to-end path of the pipeline:
a corpus from the Python standard library's own sources (real text already on the machine, never
downloaded), `rdhpc prep tokenizer` and `rdhpc prep shards` (verified Arrow shards), the
recurrent-depth model trained in one process on those shards with the paper's depth sampler and
truncated backpropagation, validation loss against recurrence depth, and an export to the released
Huginn checkpoint layout that is read back and checked for identical logits. Everything is written
under the run folder; a second run reuses the tokenizer and shards.
"""

from __future__ import annotations

import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import ShardSettings, run_shards
from data_prep.tokenizer_train import train_tokenizer
from rdhpc.config import load_config, save_config
from rdhpc.data.format import open_shard, read_manifest, verify_folder
from rdhpc.model import IGNORE_INDEX, DepthSampler, RecurrentDepthModel, load_huginn, save_huginn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
CORPUS_BYTES = 4_000_000


def write_stdlib_corpus(path: Path, max_bytes: int) -> tuple[int, int]:
    """The standard library's .py files (sorted, so every machine with the same Python reads the
    same corpus), one JSON line per file, until max_bytes. Returns (documents, bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = total = 0
    with open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8") as f:
        for source in sorted(root.rglob("*.py")):
            if "site-packages" in source.parts or "test" in source.parts:
                continue
            try:
                text = source.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            f.write(json.dumps({"text": text}) + "\n")
            docs, total = docs + 1, total + len(text.encode())
            if total >= max_bytes:
                break
    path.with_name(path.name + ".tmp").replace(path)
    return docs, total


def load_split(folder: Path, split: str) -> torch.Tensor:
    manifest = read_manifest(folder)
    rows = [open_shard(folder, entry, manifest).all_rows() for entry in manifest.split_shards(split)]
    return torch.from_numpy(np.concatenate(rows).astype(np.int64))


def split_inputs_labels(rows: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = rows[:, :-1], rows[:, 1:].clone()
    labels[labels == pad_id] = IGNORE_INDEX  # pad positions do not count in the loss
    return inputs, labels


@torch.no_grad()
def loss_at_depth(model, rows: torch.Tensor, depth: int, batch_size: int, seed: int, pad_id: int) -> float:
    """Mean token loss over `rows` at a fixed recurrence depth, with a seeded random initial state."""
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        inputs, labels = split_inputs_labels(rows[start:start + batch_size], pad_id)
        out = model(inputs, num_steps=depth, labels=labels)
        n = int((labels != IGNORE_INDEX).sum())
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

    # 1. Data: real text on this machine -> tokenizer -> verified shards (95/5 document split).
    corpus = run_dir / "corpus" / "stdlib.jsonl"
    if not corpus.exists():
        num_docs, num_bytes = write_stdlib_corpus(corpus, CORPUS_BYTES)
        print(f"[demo] corpus: {num_docs} files of the Python standard library, {num_bytes / 1e6:.1f} MB -> {corpus}")
    tokenizer_path = run_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        train_tokenizer([str(corpus)], mc.vocab_size, tokenizer_path, sample_bytes=CORPUS_BYTES,
                        log=lambda m: print(m.replace("[prep]", "[demo]")))
    shards = run_dir / "shards"
    # carry packing keeps every token of the small corpus (the paper's drop packing would keep
    # only the first row of each long source file at this sequence length)
    run_shards(ShardSettings(inputs=[str(corpus)], tokenizer=str(tokenizer_path), seq_len=mc.max_seq_len,
                             out=str(shards), pack="carry", val_fraction=0.05, seed=config.data.shuffle_seed,
                             rows_per_shard=4096), log=lambda m: print(m.replace("[prep]", "[demo]")))
    manifest, problems = verify_folder(shards)
    if problems:
        print("[demo] FAILED: shard verification:\n  " + "\n  ".join(problems))
        return 1
    pad_id = manifest.tokenizer.pad_id
    train_rows, val_rows = load_split(shards, "train"), load_split(shards, "val")[:64]
    print(f"[demo] shards verified: {len(train_rows)} train rows, {len(val_rows)} validation rows used, "
          f"{mc.max_seq_len + 1} tokens each")

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
        inputs, labels = split_inputs_labels(train_rows[index], pad_id)
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
    curve = {d: loss_at_depth(model, val_rows, d, tc.micro_batch_size, seed=tc.seed, pad_id=pad_id)
             for d in tc.val_depths}
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
