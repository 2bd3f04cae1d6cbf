"""The main job on an embedded default, as `make demo` runs it:

    rdhpc demo --run-dir runs/demo          # about 3 minutes on 2 CPU cores
    rdhpc demo --gpu                        # the same on this machine's GPUs (bf16, one rank per GPU)

The whole pipeline: a corpus from the Python standard library's own sources (real text already on
the machine, never downloaded), `rdhpc prep tokenizer` and `rdhpc prep shards` (verified Arrow
shards), the DeepSpeed trainer on 2 local ranks (gloo) with the paper's depth sampler and truncated
backpropagation, checkpoints and TensorBoard, `rdhpc eval` of the final checkpoint at depths 1 to 32
(table, JSON, PNG: the test-time scaling curve; the demo fails unless depth 8 beats depth 1), and an
export to the released Huginn checkpoint layout that is read back and checked for identical logits.
Everything is written under the run folder; a second run reuses the corpus, the tokenizer, the
shards and the finished training.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import ShardSettings, run_shards
from data_prep.tokenizer_train import train_tokenizer
from rdhpc.config import load_config, save_config
from rdhpc.data.format import verify_folder
from rdhpc.errors import UserError
from rdhpc.launch.local import launch_local
from rdhpc.run_folder import RunFolder

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
CORPUS_BYTES = 4_000_000
NUM_RANKS = 2
EVAL_DEPTHS = [1, 2, 4, 8, 16, 32]
EVAL_ROWS = 64
# --gpu: the same run in bf16 on every GPU of this machine (ZeRO 1 keeps float32 master weights).
GPU_OVERRIDES = ["train.device=cuda", "train.precision=bf16"]


def write_stdlib_corpus(path: Path, max_bytes: int) -> tuple[int, int]:
    """The standard library's .py files (sorted, so every machine with the same Python reads the
    same corpus), cut into documents of a few KB at top-level definitions, one JSON line each,
    until max_bytes. Returns (documents, bytes). Whole files made ~270 documents of 15 KB on
    average, so the 5% validation split held 12-13 files and said more about them than about the
    corpus (its loss sat 0.4-1.5 nats from the training loss, either side, by Python version)."""
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
            for document in split_at_definitions(text):
                f.write(json.dumps({"text": document}) + "\n")
                docs, total = docs + 1, total + len(document.encode())
            if total >= max_bytes:
                break
    path.with_name(path.name + ".tmp").replace(path)
    return docs, total


def split_at_definitions(text: str, min_chars: int = 1000) -> list[str]:
    """A source file cut before top-level `def`, `class` or decorator lines, each piece at least
    `min_chars` long (the last may be shorter); joined, the pieces give back the file."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if size >= min_chars and line.startswith(("def ", "class ", "async def ", "@")):
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def _finished(train_dir: Path, steps: int) -> bool:
    """The trainer's run_state.json says this run completed exactly `steps` steps."""
    state = RunFolder(train_dir).read_run_state()
    return state.get("state") == "completed" and state.get("step") == steps


def _stage(number: int, text: str):
    print(f"[demo] ({number}/5) {text}", flush=True)


def run_demo(run_dir: str | Path, steps: int | None = None, overrides=(), gpu: bool = False,
             nproc: int | None = None) -> int:
    overrides = list(overrides)
    if gpu:
        if not torch.cuda.is_available():
            raise UserError("rdhpc demo --gpu: no CUDA or ROCm device is visible to torch on this machine")
        overrides = GPU_OVERRIDES + overrides
        nproc = nproc or torch.cuda.device_count()
    nproc = nproc or NUM_RANKS
    config = load_config(DEMO_CONFIG, overrides)
    mc, tc = config.model, config.train
    steps = steps or tc.max_steps
    if tc.global_batch_size % (tc.micro_batch_size * nproc):
        # keep the global batch; fewer sequences per rank where there are more ranks
        overrides.append(f"train.micro_batch_size={max(1, tc.global_batch_size // nproc)}")
        config = load_config(DEMO_CONFIG, overrides)
    run_dir = Path(run_dir)
    save_config(config, run_dir)
    print(f"[demo] run folder: {run_dir.resolve()}")

    # 1-2. Data: real text on this machine -> tokenizer -> verified shards (95/5 document split).
    corpus = run_dir / "corpus" / "stdlib.jsonl"
    _stage(1, "corpus and tokenizer")
    if corpus.exists():
        print(f"[demo] corpus: reusing {corpus} ({corpus.stat().st_size / 1e6:.1f} MB)")
    else:
        num_docs, num_bytes = write_stdlib_corpus(corpus, CORPUS_BYTES)
        print(f"[demo] corpus: {num_docs} documents (the Python standard library's files cut at top-level definitions), "
              f"{num_bytes / 1e6:.1f} MB -> {corpus}")
    # the standard library differs between Python versions and builds, and so do the demo's losses
    corpus_id = {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
                 "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}
    print(f"[demo] corpus sha256 {corpus_id['sha256'][:16]} (Python {corpus_id['python']}'s standard library: "
          f"another Python gives another corpus and other losses)")
    tokenizer_path = run_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        train_tokenizer([str(corpus)], mc.vocab_size, tokenizer_path, sample_bytes=CORPUS_BYTES,
                        log=lambda m: print(m.replace("[prep]", "[demo]")))
    _stage(2, "token shards")
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
    print(f"[demo] shards verified: {manifest.totals('train')['rows']} train rows, {manifest.totals('val')['rows']} "
          f"validation rows of {mc.max_seq_len + 1} tokens")

    # 3. The DeepSpeed trainer on local ranks: depth drawn per step from the step number, truncated
    # backpropagation, checkpoints and TensorBoard. A finished run is reused as it is.
    train_dir = run_dir / "train"
    _stage(3, f"training: {steps} steps on {nproc} rank(s) ({'GPU, bf16' if gpu else 'CPU, gloo'})")
    if _finished(train_dir, steps):
        print(f"[demo] training: reusing the finished run in {train_dir}")
    else:
        command = ["train", str(DEMO_CONFIG), f"--set=data.train_dir={shards}", f"--set=logging.run_dir={train_dir}",
                   f"--set=train.max_steps={steps}", *[f"--set={o}" for o in overrides]]
        status = launch_local(command, nproc=nproc)
        if status:
            print(f"[demo] FAILED: training exited with status {status}")
            return 1
    train_run = RunFolder(train_dir)
    losses = [m["loss"] for m in train_run.metrics_lines()]
    checkpoints = train_run.checkpoints

    # 4. Validation loss against recurrence depth from the final checkpoint: the test-time scaling curve.
    from rdhpc.eval.depth_eval import run_eval
    from rdhpc.export import export_checkpoint, load_checkpoint

    _stage(4, f"evaluation at depths {', '.join(map(str, EVAL_DEPTHS))} ({EVAL_ROWS} validation rows)")
    device = "cuda" if gpu else "cpu"
    curve = run_eval(str(checkpoints), str(shards), EVAL_DEPTHS, out=str(run_dir / "eval"), max_rows=EVAL_ROWS,
                     batch_size=tc.micro_batch_size, seed=tc.seed, device=device,
                     log=lambda m: print(m if not m.startswith("[eval]") else m.replace("[eval]", "[demo]")))

    # 5. Export to the released Huginn layout and read it back.
    _stage(5, "export to the released Huginn layout")
    export_dir = export_checkpoint(checkpoints, run_dir / "huginn", fmt="huginn", log=lambda *a: None,
                                   force=True)  # the demo's own export of an earlier run
    trained, reloaded = load_checkpoint(checkpoints).model, load_checkpoint(export_dir).model
    probe = torch.from_numpy(np.stack([np.arange(mc.max_seq_len) % manifest.tokenizer.vocab_size] * 2))
    with torch.no_grad():
        same = torch.equal(trained(probe, num_steps=4, init_scale=0).logits,
                           reloaded(probe, num_steps=4, init_scale=0).logits)
    print(f"[demo] exported {export_dir}/ (config.json + model.safetensors + tokenizer.json); "
          f"reloaded logits identical: {same}")

    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-10:]))
    results = {"train_loss_first10": first, "train_loss_last10": last, "steps": steps, "ranks": nproc,
               "val_loss_by_depth": {str(d): curve.loss[d] for d in curve.depths},
               "val_perplexity_by_depth": {str(d): curve.perplexity[d] for d in curve.depths},
               "eval_tokens": curve.tokens, "plot": curve.files["png"], "export_roundtrip_identical": same,
               "corpus": corpus_id}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    deeper_helps = curve.loss[8] < curve.loss[1]
    print(f"[demo] train loss {first:.3f} -> {last:.3f}; validation loss {curve.loss[1]:.3f} at depth 1, "
          f"{curve.loss[8]:.3f} at 8, {curve.loss[32]:.3f} at 32")
    print("[demo] where everything is:")
    for what, where in [("config", run_dir / "config.yaml"), ("corpus", corpus), ("tokenizer", tokenizer_path),
                        ("shards", shards), ("checkpoints", checkpoints), ("TensorBoard events", train_run.tensorboard),
                        ("per-step metrics", train_run.metrics), ("loss vs depth plot", curve.files["png"]),
                        ("loss vs depth table", curve.files["json"]), ("Huginn export", export_dir),
                        ("results", run_dir / "results.json")]:
        print(f"[demo]   {what:<20} {where}")
    print(f"[demo] open TensorBoard:  rdhpc tensorboard {train_dir}")
    ok = same and last < first and deeper_helps
    if not ok:
        print("[demo] FAILED: the loss did not fall, depth 8 did not beat depth 1, or the export did not round-trip")
    return 0 if ok else 1
