"""The main job on an embedded default, as `make demo` runs it:

    rdhpc demo --run-dir runs/demo          # about a minute on 2 CPU cores

The whole pipeline on 2 CPU cores: a corpus from the Python standard library's own sources (real
text already on the machine, never downloaded), `rdhpc prep tokenizer` and `rdhpc prep shards`
(verified Arrow shards), the DeepSpeed trainer on 2 local ranks (gloo) with the paper's depth sampler
and truncated backpropagation, checkpoints and TensorBoard, validation loss against recurrence depth
(the run fails unless more depth helps), and an export to the released Huginn checkpoint layout that
is read back and checked for identical logits. Everything is written under the run folder; a second
run reuses the tokenizer, the shards and the finished training.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import ShardSettings, run_shards
from data_prep.tokenizer_train import train_tokenizer
from rdhpc.config import load_config, save_config
from rdhpc.launch.local import launch_local
from rdhpc.data.format import verify_folder
from rdhpc.data.loader import ShardDataset, inputs_and_labels
from rdhpc.model import IGNORE_INDEX, RecurrentDepthModel, load_huginn, save_huginn

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
CORPUS_BYTES = 4_000_000
NUM_RANKS = 2


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


@torch.no_grad()
def loss_at_depth(model, rows: np.ndarray, depth: int, batch_size: int, seed: int, pad_id: int) -> float:
    """Mean token loss over `rows` at a fixed recurrence depth, with a seeded random initial state."""
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        inputs, labels = inputs_and_labels(rows[start:start + batch_size], pad_id)
        out = model(inputs, num_steps=depth, labels=labels)
        n = int((labels != IGNORE_INDEX).sum())
        total += float(out.loss) * n
        count += n
    return total / count


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
    val = ShardDataset(shards, "val")
    val_rows = val.rows(np.arange(min(64, len(val))))
    print(f"[demo] shards verified: {manifest.totals('train')['rows']} train rows, {len(val_rows)} validation rows used, "
          f"{mc.max_seq_len + 1} tokens each")

    # 2-3. The DeepSpeed trainer on 2 local ranks (gloo): depth drawn per step from the step number,
    # truncated backpropagation, checkpoints and TensorBoard. A second demo run resumes at the end.
    train_dir = run_dir / "train"
    command = ["train", str(DEMO_CONFIG), f"--set=data.train_dir={shards}", f"--set=logging.run_dir={train_dir}",
               f"--set=train.max_steps={steps}", *[f"--set={o}" for o in overrides]]
    status = launch_local(command, nproc=NUM_RANKS)
    if status:
        print(f"[demo] FAILED: training exited with status {status}")
        return 1
    losses = [json.loads(line)["loss"] for line in open(train_dir / "metrics.jsonl")]
    checkpoints = train_dir / "checkpoints"
    tag = (checkpoints / "latest").read_text().strip()
    # Our own checkpoint (ZeRO stage 1 keeps the whole module in rank 0's model states).
    state = torch.load(checkpoints / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    model = RecurrentDepthModel(mc)
    model.load_state_dict(state["module"])
    print(f"[demo] trained {len(losses)} steps on {NUM_RANKS} ranks; checkpoint {checkpoints / tag}")

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
    probe = torch.from_numpy(val_rows[:2, :-1])
    same = torch.equal(model(probe, num_steps=4, init_scale=0).logits, reloaded(probe, num_steps=4, init_scale=0).logits)
    print(f"[demo] exported {export_dir}/ (config.json + model.safetensors); reloaded logits identical: {same}")

    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    results = {"train_loss_first10": first, "train_loss_last10": last, "val_loss_by_depth": curve,
               "steps": steps, "export_roundtrip_identical": same}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"[demo] train loss {first:.3f} -> {last:.3f}; results in {run_dir / 'results.json'}")
    print(f"[demo] watch the run:  tensorboard --logdir {train_dir / 'tensorboard'} --host 127.0.0.1 --port 6006")
    deeper_helps = curve[max(d for d in curve if d <= 8)] < curve[min(curve)]
    ok = same and last < first and deeper_helps
    if not ok:
        print("[demo] FAILED: the loss did not fall, more depth did not help, or the export did not round-trip")
    return 0 if ok else 1
