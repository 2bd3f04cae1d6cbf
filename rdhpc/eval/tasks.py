"""Task accuracy against recurrence depth: does thinking longer give better answers?

    rdhpc eval runs/x/checkpoints --tasks held_out=tasks/eval-hops6.jsonl --steps 1,2,4,8,16,32
    eval: {tasks: [{name: hops6, file: tasks/eval-hops6.jsonl}], task_depths: [1, 4, 16]}   # in the loop

A task file is JSON lines, one example per line, in the fields lm-evaluation-harness tasks use:
- generation: {"prompt": str, "target": str}, scored by exact match of greedy decoding, which stops
  at a newline or EOS;
- multiple choice: {"prompt": str, "choices": [str, ...], "answer": int}, scored by the choice with
  the highest summed log-likelihood after the prompt (ties: the first).

Every depth comes from ONE trajectory per batch (the model's forward with `readout_depths` and
`readout_logits`): the core runs to the deepest depth and the coda and head read the state out at
each. Greedy exact match is decided by teacher forcing: greedy decoding yields the target exactly
when, at every target token, that token is the argmax given the prompt and the target before it,
and the argmax after the target is a stop (a token starting with a newline, or EOS); one forward
per example instead of one per generated token. (A greedy decode that spells the target with other
tokens counts as wrong here.) Early exit (`exit_thresholds`) is the paper's rule applied to each
answer position on that trajectory: stop at the first depth d >= 2 with KL(p_d || p_{d-1}) below
the threshold (the deepest depth otherwise) and answer from depth d; the mean of those depths is
the compute the answer used. (The context is read out at the deepest depth, as a prefill would.)

Each example's initial-state noise is keyed by its index in the file (the same for its choices), so
the accuracy is the same on any number of ranks, in the loop and offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rdhpc.errors import UserError
from rdhpc.model.recurrent_depth import IGNORE_INDEX

GENERATE, MULTIPLE_CHOICE = "generate", "multiple_choice"
TASK_NOISE = 3  # the row-noise stream of task examples (0-2: training, validation, generation)


class TaskError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    target: str | None = None
    choices: tuple[str, ...] | None = None
    answer: int | None = None


@dataclass
class Task:
    name: str
    path: str
    kind: str
    examples: list[TaskExample]


def load_task(path: str | Path, name: str | None = None, max_examples: int | None = None) -> Task:
    """Read a task file, checking every line; all problems are reported at once, each as file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskError(f"{path}: task file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: cannot read the task file: {exc}") from None
    examples, kinds, problems = [], set(), []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            problems.append(f"{where}: not JSON ({exc})")
            continue
        example, kind, problem = _example(record)
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        kinds.add(kind)
        examples.append(example)
    if len(kinds) > 1:
        problems.append(f"{path}: mixes generation examples (prompt, target) and multiple-choice ones (prompt, "
                        f"choices, answer); one kind per file")
    if not examples and not problems:
        problems.append(f"{path}: no examples")
    if problems:
        raise TaskError(f"{len(problems)} problem(s) in task file {path}:\n  - " + "\n  - ".join(problems[:10])
                        + ("\n  - ..." if len(problems) > 10 else ""))
    if max_examples is not None:
        examples = examples[:max_examples]
    return Task(name or path.stem, str(path), kinds.pop(), examples)


def _example(record) -> tuple[TaskExample | None, str | None, str | None]:
    if not isinstance(record, dict):
        return None, None, "an example must be a JSON object"
    prompt = record.get("prompt")
    if not isinstance(prompt, str):
        return None, None, "needs a string 'prompt'"
    if "choices" in record or "answer" in record:
        choices, answer = record.get("choices"), record.get("answer")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            return None, None, "'choices' must be a list of at least 2 non-empty strings"
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            return None, None, (f"'answer' must be the index of the right choice, 0 to {len(choices) - 1}, "
                                f"got {answer!r}")
        return TaskExample(prompt, choices=tuple(choices), answer=answer), MULTIPLE_CHOICE, None
    target = record.get("target")
    if not (isinstance(target, str) and target.strip()):
        return None, None, "needs a non-empty string 'target' (generation) or 'choices' and 'answer' (multiple choice)"
    return TaskExample(prompt, target=target), GENERATE, None


# ---- scoring -------------------------------------------------------------------------------------

@dataclass
class TaskSums:
    """What a rank counted; summed over ranks, then divided (`accuracy`)."""
    depths: list[int]
    thresholds: list[float]
    correct: dict[int, float] = field(default_factory=dict)
    examples: float = 0.0
    exit_correct: dict[float, float] = field(default_factory=dict)
    exit_depth_sum: dict[float, float] = field(default_factory=dict)
    exit_positions: float = 0.0

    def to_list(self) -> list[float]:
        return ([self.correct.get(d, 0.0) for d in self.depths] + [self.examples]
                + [self.exit_correct.get(t, 0.0) for t in self.thresholds]
                + [self.exit_depth_sum.get(t, 0.0) for t in self.thresholds] + [self.exit_positions])

    def from_list(self, values: list[float]) -> "TaskSums":
        d, t = len(self.depths), len(self.thresholds)
        return TaskSums(self.depths, self.thresholds, dict(zip(self.depths, values[:d])), values[d],
                        dict(zip(self.thresholds, values[d + 1:d + 1 + t])),
                        dict(zip(self.thresholds, values[d + 1 + t:d + 1 + 2 * t])), values[-1])

    def accuracy(self) -> dict[int, float]:
        return {d: self.correct.get(d, 0.0) / max(self.examples, 1.0) for d in self.depths}

    def exit_accuracy(self) -> dict[float, float]:
        return {t: self.exit_correct.get(t, 0.0) / max(self.examples, 1.0) for t in self.thresholds}

    def exit_mean_depth(self) -> dict[float, float]:
        return {t: self.exit_depth_sum.get(t, 0.0) / max(self.exit_positions, 1.0) for t in self.thresholds}


class TaskScorer:
    """A task's examples as token rows for one tokenizer and context length, scored at depths."""

    def __init__(self, task: Task, tokenizer, max_seq_len: int, max_new_tokens: int = 32):
        self.task, self.tokenizer, self.max_new_tokens = task, tokenizer, max_new_tokens
        self.rows: list[list[tuple[np.ndarray, int]]] = []  # per example: (ids, first label position) per candidate
        for example in task.examples:
            prompt = [tokenizer.bos_id] + tokenizer.encode(example.prompt).tolist()
            continuations = ([example.target] if task.kind == GENERATE else list(example.choices))
            candidates = []
            for text in continuations:
                continuation = tokenizer.encode(text).tolist()
                if task.kind == GENERATE:
                    continuation = continuation[:max_new_tokens + 1]  # beyond the budget: wrong, as decoding would be
                # the context keeps its last tokens (a stop position follows a generation target)
                room = max_seq_len - len(continuation) - (1 if task.kind == GENERATE else 0)
                if room < 1:
                    raise TaskError(f"{task.path}: an answer of {len(continuation)} tokens does not fit the model's "
                                    f"context of {max_seq_len}")
                context = prompt[-room:]
                candidates.append((np.asarray(context + continuation, dtype=np.int64), len(context)))
            self.rows.append(candidates)
        self._stops: dict[int, bool] = {}
        # a generation target longer than the budget is wrong, as decoding would stop before its end
        self.too_long = [task.kind == GENERATE and len(tokenizer.encode(example.target)) > max_new_tokens
                         for example in task.examples]

    def is_stop(self, token: int) -> bool:
        if token not in self._stops:
            self._stops[token] = token == self.tokenizer.eos_id or self.tokenizer.decode([token]).startswith("\n")
        return self._stops[token]

    def batch(self, examples: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Right-padded inputs and labels of every candidate row of `examples` (padding after the
        text changes nothing before it: attention is causal); per row, the place in `examples` of
        the example it belongs to."""
        rows, owners = [], []
        for place, e in enumerate(examples):
            for ids, start in self.rows[e]:
                labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
                labels[start - 1:len(ids) - 1] = ids[start:]
                if self.task.kind == GENERATE:
                    labels[len(ids) - 1] = self.tokenizer.eos_id  # the stop position: any stop counts
                rows.append((ids, labels))
                owners.append(place)
        width = max(len(ids) for ids, _ in rows)
        inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, labels) in enumerate(rows):
            inputs[i, :len(ids)] = torch.from_numpy(ids)
            targets[i, :len(ids)] = torch.from_numpy(labels)
        return inputs, targets, owners


def task_seeds(seed: int, examples) -> list[int]:
    from rdhpc.model.sampling import row_noise_seeds

    return row_noise_seeds(seed, 0, examples, TASK_NOISE)


@torch.no_grad()
def score_examples(forward: Callable, scorer: TaskScorer, examples: list[int], real: int, depths: list[int],
                   thresholds: list[float], pad_id: int, seed: int, device, batch_examples: int = 8,
                   init_scale: float = 1.0) -> TaskSums:
    """Score `examples` (indices into the task; those from position `real` on are fillers that run
    but count nothing: under ZeRO 3 every rank must run as many forwards) at every depth, and under
    each early-exit threshold, in forwards of `batch_examples` examples."""
    depths = sorted(set(depths))
    deepest = max(depths)
    readout = sorted(set(depths) | (set(range(1, deepest + 1)) if thresholds else set()))
    sums = TaskSums(depths, list(thresholds))
    seeds = task_seeds(seed, examples)
    generate = scorer.task.kind == GENERATE
    for first in range(0, len(examples), batch_examples):
        chunk = examples[first:first + batch_examples]
        inputs, labels, owners = scorer.batch(chunk, pad_id)
        out = forward(inputs.to(device), labels=labels.to(device), readout_depths=readout, readout_logits=True,
                      init_scale=init_scale, state_seeds=[seeds[first + place] for place in owners])
        bounds = np.cumsum([0] + (labels != IGNORE_INDEX).sum(dim=1).tolist())
        label_ids = labels[labels != IGNORE_INDEX].tolist()
        logp = {d: torch.log_softmax(out.depth_logits[d].float().cpu(), dim=-1) for d in readout}
        exits = {}  # per threshold: each position's exit depth, and the log-probabilities read there
        for t in thresholds:
            at = _exit_depths(logp, deepest, t)
            exits[t] = (at, torch.stack([logp[int(d)][i] for i, d in enumerate(at)]) if len(at) else logp[deepest])
        for place, e in enumerate(chunk):
            if first + place >= real:
                continue
            spans = [(int(bounds[i]), int(bounds[i + 1])) for i, owner in enumerate(owners) if owner == place]
            # the positions that answer: a generation's target and stop, every choice's tokens
            answer_positions = [i for a, b in spans[:1 if generate else None] for i in range(a, b)]
            sums.examples += 1
            sums.exit_positions += len(answer_positions)
            for d in depths:
                sums.correct[d] = sums.correct.get(d, 0.0) + _is_correct(scorer, e, spans, label_ids, logp[d])
            for t, (at, chosen) in exits.items():
                sums.exit_correct[t] = sums.exit_correct.get(t, 0.0) + _is_correct(scorer, e, spans, label_ids, chosen)
                sums.exit_depth_sum[t] = sums.exit_depth_sum.get(t, 0.0) + float(sum(at[i] for i in answer_positions))
    return sums


def _exit_depths(logp: dict[int, torch.Tensor], deepest: int, threshold: float) -> np.ndarray:
    """Per labelled position, the first depth d >= 2 where KL(p_d || p_{d-1}) < threshold, else
    the deepest."""
    count = logp[deepest].shape[0]
    exit_at = np.full(count, deepest, dtype=np.int64)
    active = np.ones(count, dtype=bool)
    for d in range(2, deepest + 1):
        kl = (logp[d].exp() * (logp[d] - logp[d - 1])).sum(-1).clamp_min(0).numpy()
        stop = active & (kl < threshold)
        exit_at[stop] = d
        active &= ~stop
    return exit_at


def _is_correct(scorer: TaskScorer, example: int, spans, label_ids, logp: torch.Tensor) -> float:
    """`logp`: (N, V) log-probabilities at every labelled position of the batch."""
    if scorer.task.kind == GENERATE:
        if scorer.too_long[example]:
            return 0.0
        a, b = spans[0]
        predicted = logp[a:b].argmax(-1).tolist()
        return float(predicted[:-1] == label_ids[a:b - 1] and scorer.is_stop(predicted[-1]))
    scores = [float(logp[torch.arange(a, b), torch.tensor(label_ids[a:b])].sum()) for a, b in spans]
    return float(int(np.argmax(scores)) == scorer.task.examples[example].answer)


@dataclass
class TaskAccuracy:
    """A task's accuracy by depth (and under early exit), summed over every rank's examples."""
    task: str
    kind: str
    examples: int
    accuracy: dict[int, float]
    exit_accuracy: dict[float, float]
    exit_mean_depth: dict[float, float]

    @classmethod
    def of(cls, task: Task, sums: TaskSums) -> "TaskAccuracy":
        return cls(task.name, task.kind, int(sums.examples), sums.accuracy(), sums.exit_accuracy(),
                   sums.exit_mean_depth())

    def scalars(self, prefix: str = "eval") -> dict[str, float]:
        out = {f"{prefix}/{self.task}/acc_r{d}": v for d, v in self.accuracy.items()}
        for t, v in self.exit_accuracy.items():
            out[f"{prefix}/{self.task}/acc_exit{t:g}"] = v
            out[f"{prefix}/{self.task}/depth_exit{t:g}"] = self.exit_mean_depth[t]
        return out

    def summary(self) -> str:
        parts = [f"r={d}: {v:.3f}" for d, v in self.accuracy.items()]
        parts += [f"exit {t:g}: {v:.3f} at mean depth {self.exit_mean_depth[t]:.1f}"
                  for t, v in self.exit_accuracy.items()]
        return f"task {self.task} ({self.examples} examples) " + "  ".join(parts)

    def to_dict(self) -> dict:
        return {"task": self.task, "kind": self.kind, "examples": self.examples,
                "accuracy": {str(d): v for d, v in self.accuracy.items()},
                "exit_accuracy": {f"{t:g}": v for t, v in self.exit_accuracy.items()},
                "exit_mean_depth": {f"{t:g}": v for t, v in self.exit_mean_depth.items()}}


# ---- sharing, tokenizer, pictures ---------------------------------------------------------------

def rank_share(num_examples: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """This rank's contiguous share of the examples, padded with fillers (example 0, counted
    nothing) to the share of rank 0, so every rank runs as many forwards (ZeRO 3 gathers in each);
    and how many of them count."""
    per_rank = -(-num_examples // world_size)
    first = min(rank * per_rank, num_examples)
    real = min(per_rank, num_examples - first)
    return list(range(first, first + real)) + [0] * (per_rank - real), real


def task_tokenizer(run):
    """The tokenizer that encodes the tasks: eval.tokenizer, or the one the training data's
    manifest names (the run's own)."""
    from rdhpc.data.format import read_manifest
    from rdhpc.data.tokenizer import TextTokenizer

    if run.eval.tokenizer:
        if not Path(run.eval.tokenizer).is_file():
            raise TaskError(f"eval.tokenizer: {run.eval.tokenizer} not found")
        return TextTokenizer(run.eval.tokenizer)
    data = run.data.first_dir()
    path = read_manifest(data).tokenizer.path
    if not Path(path).is_file():
        raise TaskError(f"eval.tasks: the tokenizer that {data}/manifest.json names, {path}, is not found; set "
                        f"eval.tokenizer")
    return TextTokenizer(path)


def task_figure(history: list[tuple[int, list["TaskAccuracy"]]]) -> np.ndarray:
    """Accuracy against depth at the last evaluation (a line per task, early exit as points at the
    mean depth it used), and per task a heatmap of accuracy over (training step, depth): the
    image TensorBoard shows as `eval/tasks`. (H, W, 3) uint8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step, last = history[-1]
    fig, axes = plt.subplots(1, 1 + len(last), figsize=(4.2 * (1 + len(last)), 3.4), dpi=90, squeeze=False)
    ax = axes[0][0]
    for result in last:
        depths = sorted(result.accuracy)
        line, = ax.plot(depths, [result.accuracy[d] for d in depths], marker="o", label=result.task)
        for t, acc in result.exit_accuracy.items():
            ax.scatter([result.exit_mean_depth[t]], [acc], marker="*", s=90, color=line.get_color(),
                       label=f"{result.task}, early exit {t:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recurrence depth r")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"step {step}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    for ax, index in zip(axes[0][1:], range(len(last))):
        depths = sorted(last[index].accuracy)
        grid = np.array([[results[index].accuracy.get(d, np.nan) for d in depths] for _, results in history])
        image = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(depths)), [str(d) for d in depths])
        ax.set_yticks(range(len(history)), [str(s) for s, _ in history])
        if len(history) > 12:
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(8, integer=True))
        ax.set_xlabel("recurrence depth r")
        ax.set_ylabel("training step")
        ax.set_title(f"{last[index].task}: accuracy")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return pixels


# ---- offline: `rdhpc eval CHECKPOINT --tasks ...` -----------------------------------------------

def parse_task_args(values: list[str]) -> list[tuple[str, str]]:
    """[NAME=]FILE -> (name, file); the name defaults to the file's stem."""
    out = []
    for value in values:
        name, sep, file = value.partition("=")
        if not sep:
            name, file = Path(value).stem, value
        out.append((name, file))
    return out


def run_task_eval(checkpoint: str, tasks: list[str], depths: list[int], thresholds: list[float], out: str | None = None,
                  examples: int = 256, max_new_tokens: int = 16, batch_examples: int = 8, tokenizer: str | None = None,
                  seed: int | None = None, device: str = "cpu", log=print) -> list[TaskAccuracy]:
    """Task accuracy of a checkpoint by depth: the in-loop evaluation's numbers at that step
    (the same examples, noise and scoring; `seed` defaults to the run's train.seed, as in the loop)."""
    import math

    from rdhpc.data.tokenizer import TextTokenizer
    from rdhpc.export import load_checkpoint

    if examples < 1 or max_new_tokens < 1 or batch_examples < 1:
        raise TaskError("--examples, --max-new-tokens and --batch-size must be >= 1")
    bad = [t for t in thresholds if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise TaskError(f"--exit-threshold: thresholds must be finite and >= 0, got {bad}")
    loaded = load_checkpoint(checkpoint, device=device)
    run = loaded.run_config
    if tokenizer is None:
        tokenizer, missing = loaded.tokenizer_or_none_with_reason()
        if tokenizer is None:
            raise TaskError(f"{loaded.path}: {missing}; pass --tokenizer PATH")
    if seed is None:
        seed = run.train.seed if run is not None else 0
    text_tokenizer = TextTokenizer(tokenizer)
    model = loaded.model
    pad_id = text_tokenizer.pad_id
    results = []
    for name, file in parse_task_args(tasks):
        scorer = TaskScorer(load_task(file, name, examples), text_tokenizer, model.config.max_seq_len, max_new_tokens)
        every = list(range(len(scorer.task.examples)))
        sums = score_examples(model, scorer, every, len(every), depths, thresholds, pad_id, seed, device,
                              batch_examples)
        results.append(TaskAccuracy.of(scorer.task, sums))
    if out is None:
        out = (loaded.path.parent.parent / "eval" / loaded.path.name if loaded.kind == "deepspeed"
               else loaded.path.parent / f"{loaded.path.stem}-eval")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step = loaded.step or 0
    (out / "tasks.json").write_text(json.dumps({"checkpoint": str(loaded.path), "step": loaded.step, "seed": seed,
                                                "tasks": [r.to_dict() for r in results]}, indent=2) + "\n")
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    picture = task_figure([(step, results)])
    Image.fromarray(picture).save(out / "accuracy_vs_depth.png")
    writer = SummaryWriter(str(out / "tensorboard"))
    for result in results:
        for tag, value in result.scalars().items():
            writer.add_scalar(tag, value, step)
    writer.add_image("eval/tasks", picture, step, dataformats="HWC")
    writer.close()
    log(f"[eval] {loaded.kind} checkpoint {loaded.path}" + (f" (step {loaded.step})" if loaded.step is not None else "")
        + f", tasks at depths {sorted(set(depths))}, noise seed {seed}")
    log(accuracy_table(results))
    log(f"[eval] wrote {out / 'tasks.json'}, {out / 'accuracy_vs_depth.png'}, {out / 'tensorboard'}")
    return results


def accuracy_table(results: list[TaskAccuracy]) -> str:
    depths = sorted({d for r in results for d in r.accuracy})
    thresholds = sorted({t for r in results for t in r.exit_accuracy})
    header = f"{'task':<16} {'n':>5} " + " ".join(f"{'r=' + str(d):>7}" for d in depths)
    header += "".join(f"  {'exit ' + format(t, 'g'):>12}" for t in thresholds)
    lines = [header]
    for r in results:
        line = f"{r.task:<16} {r.examples:>5} " + " ".join(f"{r.accuracy[d]:>7.3f}" for d in depths)
        line += "".join(f"  {r.exit_accuracy[t]:>5.3f} @{r.exit_mean_depth[t]:>5.1f}" for t in thresholds)
        lines.append(line)
    return "\n".join(lines)
