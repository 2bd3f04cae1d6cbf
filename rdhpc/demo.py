"""The main job on an embedded default, as `make demo` runs it:

    rdhpc demo --run-dir runs/demo          # about 6 minutes on 2 CPU cores (1,000 steps)
    rdhpc demo --gpu                        # the same on this machine's GPUs (bf16, one rank per GPU)

The whole pipeline: a corpus from the Python standard library's own sources (real text already on
the machine, never downloaded) and a built-in reasoning task whose difficulty needs depth
(`rdhpc prep synthetic --task compose`: a digit through a word of k fixed digit permutations),
`rdhpc prep tokenizer` on both and `rdhpc prep shards` of each (verified Arrow shards), the
DeepSpeed trainer on 2 local ranks (gloo) blending the two sources (data.sources) with the paper's
depth sampler and truncated backpropagation, the task's accuracy against depth evaluated in the
loop (TensorBoard), checkpoints, then from the final checkpoint: validation loss at depths 1 to 32
(`rdhpc eval`; the demo fails unless depth 8 beats depth 1) and task accuracy at the same depths
and under early exit (`rdhpc eval --tasks`), one figure of both beside the training loss, and an
export to the released Huginn checkpoint layout that is read back and checked for identical logits.
Everything is written under the run folder; a second run reuses the corpus, the task, the
tokenizer, the shards and the finished training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from data_prep.shards import ShardSettings, run_shards
from data_prep.synthetic import SyntheticSettings, generate
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
# The task: train on words of 1-8 operations, evaluate 1-12 (9-12: more than any training problem).
# Words up to 8 need more than the 4 layers of one iteration: trained on 1-4 only, the model solved
# them in its first iteration and never gained from depth. Two operations, not three: with three the
# model learnt to iterate only after ~1,300 steps; with two, by step 500-750 in three runs of five,
# inside the demo's 1,000, and not by 1,000 in the other two (docs/synthetic_task.md has every probe).
TASK = SyntheticSettings(task="compose", train_docs=40000, eval_examples=200, train_difficulty=(1, 8),
                         eval_difficulty=(1, 12), operations=2, traced=0.3, seed=0)
TASK_WEIGHT = 3.0  # rows of the task per row of text in every global batch (data.sources weights 1 : 3)
IN_LOOP_TASKS = [4, 6, 8, 12]  # difficulties evaluated during training
EXIT_THRESHOLD = 5e-4  # the paper's early-exit KL threshold
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


def demo_figure(path: Path, metrics: list[dict], curve, accuracy, trained: tuple[int, int]) -> Path:
    """The demo's one picture: the training loss over steps, the text's validation loss against
    depth, and the task's accuracy against depth, a line per difficulty (dashed: longer than any
    training problem), early exit as a point at the mean depth it used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_depth, ax_task) = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    steps = [m["step"] for m in metrics]
    ax_loss.plot(steps, [m["loss"] for m in metrics], lw=0.8)
    ax_loss.set(xlabel="training step", ylabel="training loss (text and task)", title="training")
    ax_depth.plot(curve.depths, [curve.loss[d] for d in curve.depths], marker="o")
    ax_depth.set(xscale="log", xlabel="recurrence depth r", ylabel="validation loss (text)",
                 title="text: loss against depth")
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(accuracy)))
    for result, color in zip(accuracy, colors):
        depths = sorted(result.accuracy)
        k = _difficulty(result.task)
        ax_task.plot(depths, [result.accuracy[d] for d in depths], marker="o", color=color,
                     ls="-" if k <= trained[1] else "--",
                     label=f"{k} op{'s' if k > 1 else ''} (n={result.examples})")
        for t, acc in result.exit_accuracy.items():
            ax_task.scatter([result.exit_mean_depth[t]], [acc], marker="*", s=90, color=color, edgecolor="black",
                            zorder=3)
    ax_task.axhline(0.1, color="gray", lw=0.8, ls=":", label="chance")
    ax_task.set(xscale="log", ylim=(0, 1), xlabel="recurrence depth r (star: early exit at its mean depth)",
                ylabel="exact match", title=f"task: accuracy against depth (trained on {trained[0]}-{trained[1]} ops)")
    ax_task.legend(fontsize=7, ncol=2)
    for ax in (ax_depth, ax_task):
        ax.set_xticks(curve.depths, [str(d) for d in curve.depths])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _difficulty(task_name: str) -> int:
    """'compose-h7' -> 7."""
    return int(task_name.rsplit("h", 1)[1])


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

    # 1-2. Data: real text on this machine and the synthetic task -> tokenizer -> verified shards.
    corpus = run_dir / "corpus" / "stdlib.jsonl"
    _stage(1, "corpus, task and tokenizer")
    if corpus.exists():
        print(f"[demo] corpus: reusing {corpus} ({corpus.stat().st_size / 1e6:.1f} MB)")
    else:
        num_docs, num_bytes = write_stdlib_corpus(corpus, CORPUS_BYTES)
        print(f"[demo] corpus: {num_docs} documents (the Python standard library's files cut at top-level "
              f"definitions), "
              f"{num_bytes / 1e6:.1f} MB -> {corpus}")
    # the standard library differs between Python versions and builds, and so do the demo's losses
    corpus_id = {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
                 "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()}
    print(f"[demo] corpus sha256 {corpus_id['sha256'][:16]} (Python {corpus_id['python']}'s standard library: "
          f"another Python gives another corpus and other losses)")
    task_dir = run_dir / "task"
    if (task_dir / "tasks.json").exists():
        print(f"[demo] task: reusing {task_dir}")
    else:
        # enough documents that the task's rows never repeat (about one row of 129 tokens per 2 documents)
        docs = max(TASK.train_docs, 40 * steps)
        generate(dataclasses.replace(TASK, out=str(task_dir), train_docs=docs),
                 log=lambda m: print(m.replace("[prep]", "[demo]")))
    tokenizer_path = run_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        train_tokenizer([str(corpus), str(task_dir / "train.jsonl")], mc.vocab_size, tokenizer_path,
                        sample_bytes=CORPUS_BYTES + (task_dir / "train.jsonl").stat().st_size,
                        log=lambda m: print(m.replace("[prep]", "[demo]")))
    _stage(2, "token shards")
    shards = {"text": run_dir / "shards", "task": run_dir / "shards-task"}
    for name, source in (("text", corpus), ("task", task_dir / "train.jsonl")):
        # carry packing keeps every token of the small corpus (the paper's drop packing would keep
        # only the first row of each long source file at this sequence length)
        run_shards(ShardSettings(inputs=[str(source)], tokenizer=str(tokenizer_path), seq_len=mc.max_seq_len,
                                 out=str(shards[name]), pack="carry", val_fraction=0.05 if name == "text" else 0.02,
                                 seed=config.data.shuffle_seed, rows_per_shard=4096),
                   log=lambda m: print(m.replace("[prep]", "[demo]")))
        manifest, problems = verify_folder(shards[name])
        if problems:
            print(f"[demo] FAILED: shard verification of {shards[name]}:\n  " + "\n  ".join(problems))
            return 1
        print(f"[demo] {name} shards verified: {manifest.totals('train')['rows']} train rows, "
              f"{manifest.totals('val')['rows']} validation rows of {mc.max_seq_len + 1} tokens")

    # 3. The DeepSpeed trainer on local ranks: text and task blended by weight, depth drawn per step
    # from the step number, truncated backpropagation, task accuracy by depth in the loop,
    # checkpoints and TensorBoard. A finished run is reused as it is.
    train_dir = run_dir / "train"
    _stage(3, f"training: {steps} steps on {nproc} rank(s) ({'GPU, bf16' if gpu else 'CPU, gloo'}), text and "
              f"task 1 : {TASK_WEIGHT:g}")
    if _finished(train_dir, steps):
        print(f"[demo] training: reusing the finished run in {train_dir}")
    else:
        sources = [{"name": "text", "dir": str(shards["text"]), "weight": 1.0},
                   {"name": "task", "dir": str(shards["task"]), "weight": TASK_WEIGHT}]
        tasks = [{"file": str(task_dir / f"eval-{TASK.task}-h{k}.jsonl"), "name": f"{TASK.task}-h{k}"}
                 for k in IN_LOOP_TASKS]
        command = ["train", str(DEMO_CONFIG), f"--set=data.sources={json.dumps(sources)}",
                   f"--set=eval.tasks={json.dumps(tasks)}", f"--set=eval.task_exit_thresholds=[{EXIT_THRESHOLD}]",
                   f"--set=logging.run_dir={train_dir}", f"--set=train.max_steps={steps}",
                   "--set=data.on_exhausted=new_epoch",  # a longer run (--steps) reads the text again
                   *[f"--set={o}" for o in overrides]]
        status = launch_local(command, nproc=nproc)
        if status:
            print(f"[demo] FAILED: training exited with status {status}")
            return 1
    train_run = RunFolder(train_dir)
    metrics = train_run.metrics_lines()
    losses = [m["loss"] for m in metrics]
    checkpoints = train_run.checkpoints

    # 4. Validation loss (text) and task accuracy against recurrence depth from the final checkpoint.
    from rdhpc.eval.depth_eval import run_eval
    from rdhpc.eval.tasks import run_task_eval
    from rdhpc.export import export_checkpoint, load_checkpoint

    def say(message: str):
        print(message if not message.startswith("[eval]") else message.replace("[eval]", "[demo]"))

    _stage(4, f"evaluation at depths {', '.join(map(str, EVAL_DEPTHS))}: text ({EVAL_ROWS} validation rows) and "
              f"the task (held-out problems of 1-{TASK.eval_difficulty[1]} operations, and early exit)")
    device = "cuda" if gpu else "cpu"
    curve = run_eval(str(checkpoints), str(shards["text"]), EVAL_DEPTHS, out=str(run_dir / "eval"),
                     max_rows=EVAL_ROWS, batch_size=tc.micro_batch_size, seed=tc.seed, device=device, log=say)
    lo, hi = TASK.eval_difficulty
    accuracy = run_task_eval(str(checkpoints), [f"{TASK.task}-h{k}={task_dir / f'eval-{TASK.task}-h{k}.jsonl'}"
                                                for k in range(lo, hi + 1)],
                             EVAL_DEPTHS, [EXIT_THRESHOLD], out=str(run_dir / "eval"), examples=TASK.eval_examples,
                             batch_examples=64, seed=tc.seed, device=device, log=say)
    figure = demo_figure(run_dir / "demo.png", metrics, curve, accuracy, TASK.train_difficulty)

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
    # exact match by depth over the held-out problems of the trained word lengths, and of longer ones:
    # pooled (the share of the group's problems answered right), the headline, and the mean over
    # lengths, which gives a file of 2 problems (one operation) the weight of one of 200
    longest_trained = TASK.train_difficulty[1]  # lo, hi: the held-out difficulties evaluated above
    groups = {"trained_lengths": (lo, longest_trained, "the trained word lengths"),
              "longer": (longest_trained + 1, hi, "words longer than any trained on")}
    pooled, means, sizes = {}, {}, {}
    for name, (first_k, last_k, _) in groups.items():
        group = [r for r in accuracy if first_k <= _difficulty(r.task) <= last_k]
        if group:
            sizes[name] = sum(r.examples for r in group)
            pooled[name] = {d: sum(r.accuracy[d] * r.examples for r in group) / sizes[name] for d in EVAL_DEPTHS}
            means[name] = {d: float(np.mean([r.accuracy[d] for r in group])) for d in EVAL_DEPTHS}
    results = {"train_loss_first10": first, "train_loss_last10": last, "steps": steps, "ranks": nproc,
               "val_loss_by_depth": {str(d): curve.loss[d] for d in curve.depths},
               "val_perplexity_by_depth": {str(d): curve.perplexity[d] for d in curve.depths},
               "eval_tokens": curve.tokens, "plot": curve.files["png"], "figure": str(figure),
               "task": {"settings": {k: v for k, v in dataclasses.asdict(TASK).items() if k != "out"},
                        "accuracy_by_depth": {r.task: {str(d): v for d, v in r.accuracy.items()} for r in accuracy},
                        "early_exit": {r.task: {"threshold": EXIT_THRESHOLD,
                                                "accuracy": r.exit_accuracy[EXIT_THRESHOLD],
                                                "mean_depth": r.exit_mean_depth[EXIT_THRESHOLD]} for r in accuracy},
                        "examples": {r.task: r.examples for r in accuracy},
                        "pooled_accuracy_by_depth": {name: {str(d): v for d, v in by_depth.items()}
                                                     for name, by_depth in pooled.items()},
                        "pooled_examples": sizes,
                        "mean_accuracy_by_depth": {name: {str(d): v for d, v in by_depth.items()}
                                                   for name, by_depth in means.items()}},
               "export_roundtrip_identical": same, "corpus": corpus_id}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    deeper_helps = curve.loss[8] < curve.loss[1]
    print(f"[demo] train loss {first:.3f} -> {last:.3f}; validation loss {curve.loss[1]:.3f} at depth 1, "
          f"{curve.loss[8]:.3f} at 8, {curve.loss[32]:.3f} at 32")
    for name, by_depth in pooled.items():
        first_k, last_k, what = groups[name]
        print(f"[demo] task, held-out problems of {first_k}-{last_k} operations ({what}), {sizes[name]} problems, "
              "exact match: " + ", ".join(f"r={d} {by_depth[d]:.3f}" for d in EVAL_DEPTHS) + " (chance 0.1; "
              f"mean over the {last_k - first_k + 1} lengths r=1 {means[name][1]:.3f}, r=16 {means[name][16]:.3f})")
    print("[demo] where everything is:")
    for what, where in [("config", run_dir / "config.yaml"), ("corpus", corpus), ("tokenizer", tokenizer_path),
                        ("text shards", shards["text"]), ("task", task_dir), ("task shards", shards["task"]),
                        ("checkpoints", checkpoints), ("TensorBoard events", train_run.tensorboard),
                        ("per-step metrics", train_run.metrics), ("loss vs depth plot", curve.files["png"]),
                        ("loss vs depth table", curve.files["json"]),
                        ("task accuracy table", run_dir / "eval" / "tasks.json"), ("demo figure", figure),
                        ("Huginn export", export_dir),
                        ("results", run_dir / "results.json")]:
        print(f"[demo]   {what:<20} {where}")
    print(f"[demo] open TensorBoard:  rdhpc tensorboard {train_dir}")
    ok = same and last < first and deeper_helps
    if not ok:
        print("[demo] FAILED: the loss did not fall, depth 8 did not beat depth 1, or the export did not round-trip")
    return 0 if ok else 1
