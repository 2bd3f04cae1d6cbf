"""Does a tiny recurrent-depth model learn the synthetic task on 2 CPU cores, and does depth help?

    DS_ACCELERATOR=cpu .venv/bin/python tools/synthetic_probe.py --work runs/probe1 --steps 600
    DS_ACCELERATOR=cpu .venv/bin/python tools/synthetic_probe.py --work runs/probe3 --steps 2000 --task compose \
        --train-difficulty 1-8 --eval-difficulty 1-12 --task-arg traced=0.5
    DS_ACCELERATOR=cpu .venv/bin/python tools/synthetic_probe.py --work runs/probe2 --steps 600 \
        --set model.mean_recurrence=8 --set model.mean_backprop_depth=4 --mix-text 0.5

(a) `rdhpc prep synthetic` (task chains, or --task), (b) `rdhpc prep tokenizer` on the demo's real text (the
Python standard library's sources) plus the task, and `rdhpc prep shards` of the task (and of the
text with --mix-text: both as named sources of one folder, the text down-sampled to the share asked),
(c) `rdhpc launch local configs/demo.yaml --nproc 2` with the overrides given, (d) the final
checkpoint at the zero initial state: greedy exact match (the target, then a newline) on every
held-out difficulty at depths 1, 2, 4, 8, 16, 32, from one trajectory per batch, teacher-forced
(the same as greedy decoding that stops at the newline: every predicted token must be the target's).
Prints the table and writes WORK/probe.json. Each stage is reused when its output exists.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEPTHS = [1, 2, 4, 8, 16, 32]


def rdhpc(*args: str):
    started = time.time()
    subprocess.run([sys.executable, "-m", "rdhpc.cli", *args], check=True, cwd=REPO)
    return time.time() - started


@torch.no_grad()
def accuracy_by_depth(model, tok, examples: list[dict], depths=DEPTHS, batch_size: int = 64) -> dict[int, float]:
    """Fraction of examples whose target + newline every depth's argmax reproduces (zero initial state)."""
    rows, spans = [], []
    for ex in examples:
        prompt = [tok.bos_id] + tok.encode(ex["prompt"]).tolist()
        answer = tok.encode(ex["target"] + "\n").tolist()
        assert tok.encode(ex["prompt"] + ex["target"] + "\n").tolist() == prompt[1:] + answer, ex
        rows.append(prompt + answer)
        spans.append((len(prompt) - 1, len(prompt) - 1 + len(answer)))  # positions predicting the answer
    correct = {d: 0 for d in depths}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in batch])  # right padding: causal, harmless
        rope = model.rope(width, ids.device)
        embedded = model.embed(ids, rope)
        state = model.initial_state(embedded, 0.0)
        for depth in range(1, max(depths) + 1):
            state = model.core_iteration(state, embedded, rope)
            if depth not in depths:
                continue
            predicted = model.readout(state, rope).argmax(-1)  # (B, T)
            for b, (lo, hi) in enumerate(spans[start:start + batch_size]):
                row = ids[b]
                correct[depth] += int(torch.equal(predicted[b, lo:hi], row[lo + 1:hi + 1]))
    return {d: correct[d] / len(rows) for d in depths}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--task", default="chains", help="the synthetic task (rdhpc prep synthetic --task)")
    parser.add_argument("--task-arg", action="append", default=[], metavar="OPTION=VALUE",
                        help="another option of rdhpc prep synthetic, e.g. --task-arg traced=0.5")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the model and the depth draws")
    parser.add_argument("--train-docs", type=int, default=40000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--train-difficulty", default="1-4")
    parser.add_argument("--eval-difficulty", default="1-8")
    parser.add_argument("--mix-text", type=float, default=0.0,
                        help="share of the training rows from the demo's real text (0: the task alone)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    times = {}

    task = work / "task"
    if not (task / "tasks.json").exists():
        extra = [part for option in args.task_arg for part in ("--" + option.split("=", 1)[0], option.split("=", 1)[1])]
        times["synthetic"] = rdhpc("prep", "synthetic", "--task", args.task, *extra, "--out", str(task), "--train-docs",
                                   str(args.train_docs), "--eval-examples", str(args.eval_examples),
                                   "--train-difficulty", args.train_difficulty, "--eval-difficulty",
                                   args.eval_difficulty, "--seed", str(args.seed))
    corpus = work / "corpus" / "stdlib.jsonl"
    if not corpus.exists():
        from rdhpc.demo import CORPUS_BYTES, write_stdlib_corpus

        write_stdlib_corpus(corpus, CORPUS_BYTES)
    tokenizer = work / "tokenizer.json"
    if not tokenizer.exists():
        times["tokenizer"] = rdhpc("prep", "tokenizer", "--input", str(corpus), str(task / "train.jsonl"),
                                   "--vocab-size", "2048", "--out", str(tokenizer))
    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        inputs = ["--input", f"task={task / 'train.jsonl'}"]
        if args.mix_text > 0:
            # rows of the text per row of the task ~ (mix / (1 - mix)) * task bytes / text bytes
            ratio = args.mix_text / (1 - args.mix_text) * (task / "train.jsonl").stat().st_size / corpus.stat().st_size
            inputs += ["--input", f"text={corpus}", "--weight", f"text={ratio:.4f}", "--keep-all", "text"]
        times["shards"] = rdhpc("prep", "shards", *inputs, "--tokenizer", str(tokenizer), "--seq-len", "128",
                                "--out", str(shards), "--pack", "drop", "--val-fraction", "0.02",
                                "--seed", str(args.seed))
    train_dir = work / "train"
    state_file = train_dir / "run_state.json"
    if not (state_file.exists() and json.loads(state_file.read_text()).get("state") == "completed"):
        times["train"] = rdhpc("launch", "local", "configs/demo.yaml", "--nproc", "2",
                               f"--set=data.train_dir={shards}", f"--set=logging.run_dir={train_dir}",
                               f"--set=train.max_steps={args.steps}", f"--set=train.seed={args.seed}",
                               "--set=checkpoint.interval=100000", *[f"--set={o}" for o in args.overrides])

    from rdhpc.data.tokenizer import TextTokenizer
    from rdhpc.export import load_checkpoint

    started = time.time()
    torch.set_num_threads(2)
    model = load_checkpoint(train_dir / "checkpoints").model
    tok = TextTokenizer(tokenizer)
    info = json.loads((task / "tasks.json").read_text())
    table = {}
    for entry in info["eval"]:
        if entry["kind"] != "generate":
            continue
        examples = [json.loads(line) for line in (task / entry["file"]).read_text().splitlines()]
        table[entry["difficulty"]] = accuracy_by_depth(model, tok, examples)
    times["eval"] = time.time() - started
    chance = {}
    for entry in info["eval"]:
        if entry["kind"] == "multiple_choice":
            examples = [json.loads(line) for line in (task / entry["file"]).read_text().splitlines()]
            chance[entry["difficulty"]] = float(np.mean([1 / len(e["choices"]) for e in examples]))
    losses = [json.loads(line)["loss"] for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    header = "hops  chance " + " ".join(f"{'r=' + str(d):>6}" for d in DEPTHS)
    lines = [header] + [f"{k:>4}  {chance[k]:>6.2f} " + " ".join(f"{table[k][d]:>6.2f}" for d in DEPTHS)
                        for k in sorted(table)]
    train_lo, train_hi = info["settings"]["train_difficulty"]
    held = [k for k in table if k > train_hi]
    if held:
        lines.append(f"mean over hops {min(held)}-{max(held)} (beyond training): " + " ".join(
            f"r={d} {np.mean([table[k][d] for k in held]):.3f}" for d in DEPTHS))
    lines.append("mean over all hops: " + " ".join(f"r={d} {np.mean([table[k][d] for k in table]):.3f}"
                                                  for d in DEPTHS))
    print("\n".join(lines))
    print(f"train loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f} over {len(losses)} steps; "
          f"times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    result = {"args": vars(args), "accuracy": {str(k): {str(d): v for d, v in row.items()} for k, row in table.items()},
              "chance": {str(k): v for k, v in chance.items()}, "times_s": times,
              "train_loss_first10": float(np.mean(losses[:10])), "train_loss_last10": float(np.mean(losses[-10:])),
              "table": lines}
    (work / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
