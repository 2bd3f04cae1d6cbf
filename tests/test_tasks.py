"""Task accuracy against depth (rdhpc/eval/tasks.py): teacher-forced exact match agrees with greedy
decoding, multiple choice with the model's own log-likelihoods, any split of the examples over
ranks gives the same sums, early exit at threshold 0 is the deepest depth, and bad task files are
named line by line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import trained_runs
from rdhpc.data.tokenizer import TextTokenizer
from rdhpc.eval.tasks import (GENERATE, Task, TaskError, TaskExample, TaskScorer, load_task, score_examples)
from rdhpc.generate import GenerationConfig, Generator
from test_generate import model  # noqa: F401  (module fixture: the seeded debug-size model)


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(trained_runs.shards().parent / "tok.json")


PROMPTS = ["def main(", "import os\nimport", "class Foo:\n    ", "x = [1, 2, 3]\nprint(", "return self."]


def forward_of(model):
    def forward(*args, **kwargs):
        return model(*args, **kwargs)
    return forward


def score(model, scorer, examples, depths, thresholds=(), init_scale=0.0, real=None, seed=0):
    return score_examples(forward_of(model), scorer, list(examples), len(examples) if real is None else real, depths,
                          list(thresholds), pad_id=0, seed=seed, device="cpu", batch_examples=2, init_scale=init_scale)


def test_exact_match_by_teacher_forcing_is_greedy_decoding(model, tokenizer, monkeypatch):
    """A target whose tokens are the greedy continuation at depth d (zero initial state, as
    rdhpc.generate's cached decoding equals the full forward) scores 1 at d; one token changed, 0."""
    depth, length = 3, 3
    task = Task("greedy", "none.jsonl", GENERATE, [TaskExample(p, target="x") for p in PROMPTS])
    scorer = TaskScorer(task, tokenizer, max_seq_len=model.config.max_seq_len, max_new_tokens=8)
    generator = Generator(model, GenerationConfig(num_steps=depth, max_new_tokens=length + 1, init_scale=0.0))
    wrong = TaskScorer(task, tokenizer, max_seq_len=model.config.max_seq_len, max_new_tokens=8)
    for e, candidates in enumerate(scorer.rows):
        ids, start = candidates[0]
        prompt = ids[:start]
        out = generator.generate(torch.from_numpy(prompt)[None]).tokens[0].tolist()
        scorer.rows[e] = [(np.concatenate([prompt, out[:length]]), start)]
        changed = out[:length - 1] + [(out[length - 1] + 1) % tokenizer.vocab_size]
        wrong.rows[e] = [(np.concatenate([prompt, changed]), start)]
        # the stop after the target: here the token greedy decoding gives next
        monkeypatch.setattr(scorer, "is_stop", lambda token, stops={}: True)
    monkeypatch.setattr(wrong, "is_stop", lambda token: True)
    monkeypatch.setattr(scorer, "too_long", [False] * len(PROMPTS))
    monkeypatch.setattr(wrong, "too_long", [False] * len(PROMPTS))
    right = score(model, scorer, range(len(PROMPTS)), [depth])
    assert right.accuracy() == {depth: 1.0}
    assert score(model, wrong, range(len(PROMPTS)), [depth]).accuracy() == {depth: 0.0}


def test_multiple_choice_picks_the_most_likely_choice(model, tokenizer):
    depth = 2
    choices = (" a", " b = 1", "(self)")
    task = Task("mc", "none.jsonl", "multiple_choice",
                [TaskExample(p, choices=choices, answer=i % 3) for i, p in enumerate(PROMPTS)])
    scorer = TaskScorer(task, tokenizer, max_seq_len=model.config.max_seq_len)
    expected = 0
    for e, example in enumerate(task.examples):
        scores = []
        for ids, start in scorer.rows[e]:
            with torch.no_grad():
                logits = model(torch.from_numpy(ids)[None], num_steps=depth, init_scale=0.0).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            scores.append(float(logp[torch.arange(start - 1, len(ids) - 1), torch.from_numpy(ids[start:])].sum()))
        expected += int(np.argmax(scores)) == example.answer
    assert score(model, scorer, range(len(PROMPTS)), [depth]).accuracy()[depth] == pytest.approx(expected / len(PROMPTS))


def test_any_split_over_ranks_gives_the_same_sums_and_exit_at_zero_is_the_deepest(model, tokenizer):
    task = Task("mc", "none.jsonl", "multiple_choice",
                [TaskExample(p, choices=(" a", " b = 1", "(self)"), answer=i % 3) for i, p in enumerate(PROMPTS * 2)])
    scorer = TaskScorer(task, tokenizer, max_seq_len=model.config.max_seq_len)
    depths, n = [1, 2, 4], len(task.examples)
    whole = score(model, scorer, range(n), depths, thresholds=[0.0, 1e9], init_scale=1.0)
    # two "ranks": the first 6 and the last 4 examples, the second padded with fillers to 6
    first = score(model, scorer, range(0, 6), depths, thresholds=[0.0, 1e9], init_scale=1.0)
    second = score(model, scorer, list(range(6, n)) + [0, 0], depths, thresholds=[0.0, 1e9], init_scale=1.0,
                   real=4)
    assert second.examples == 4
    summed = whole.from_list([a + b for a, b in zip(first.to_list(), second.to_list())])
    # each example's noise is keyed by its index in the task: the split changes nothing
    assert summed.examples == whole.examples == n
    assert summed.correct == whole.correct and summed.exit_correct == whole.exit_correct
    assert summed.exit_depth_sum == whole.exit_depth_sum
    assert whole.exit_mean_depth()[0.0] == 4.0 and whole.exit_accuracy()[0.0] == whole.accuracy()[4]
    assert whole.exit_mean_depth()[1e9] == 2.0
    assert 0 < sum(whole.correct.values()) < len(depths) * n  # not a trivial comparison


def test_bad_task_files_are_named_line_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "a", "target": "b"}), "{not json",
                               json.dumps({"prompt": "a", "choices": ["x"], "answer": 0}),
                               json.dumps({"prompt": "a", "choices": ["x", "y"], "answer": 5}),
                               json.dumps({"target": "b"}), json.dumps([1])]) + "\n")
    with pytest.raises(TaskError) as raised:
        load_task(path)
    message = str(raised.value)
    for line, what in ((2, "not JSON"), (3, "at least 2"), (4, "0 to 1, got 5"), (5, "'prompt'"), (6, "JSON object")):
        assert f"{path}:{line}: " in message and what in message, message
    with pytest.raises(TaskError, match="task file not found"):
        load_task(tmp_path / "none.jsonl")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "a", "target": "b"}) + "\n"
                     + json.dumps({"prompt": "a", "choices": ["x", "y"], "answer": 1}) + "\n")
    with pytest.raises(TaskError, match="one kind per file"):
        load_task(mixed)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"q{i}", "target": " 7"}) + "\n" for i in range(5)))
    task = load_task(good, max_examples=3)
    assert task.name == "good" and task.kind == GENERATE and len(task.examples) == 3


def write_tasks(folder) -> dict[str, str]:
    """A generation task and a multiple-choice one, from lines of the standard library's sources."""
    import sysconfig
    from pathlib import Path

    lines = [line.strip() for line in (Path(sysconfig.get_paths()["stdlib"]) / "os.py").read_text().splitlines()
             if 12 < len(line.strip()) < 60][:40]
    gen = folder / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": line[:-4], "target": line[-4:]}) + "\n" for line in lines[:20]))
    mc = folder / "mc.jsonl"
    mc.write_text("".join(json.dumps({"prompt": line[:-6], "choices": [line[-6:], " = None", "():"], "answer": 0})
                          + "\n" for line in lines[20:]))
    return {"gen": str(gen), "mc": str(mc)}


def test_in_loop_task_accuracy_equals_the_eval_command_and_reaches_tensorboard(tmp_path):
    """2 ranks in the loop, one process offline: the same accuracies at every depth and under early
    exit (keyed noise, the run's seed); TensorBoard has the scalars and the image; a bad task file
    stops `rdhpc eval` with exit 2 naming the line."""
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = write_tasks(tmp_path)
    tasks = "[" + ", ".join(f"{{name: {name}, file: {path}}}" for name, path in files.items()) + "]"
    run = trained_runs.trained_run(4, 1, "fp32", 2, "eval.interval=2", f"eval.tasks={tasks}",
                                   "eval.task_depths=[1,2,4]", "eval.task_exit_thresholds=[0.01]",
                                   "eval.task_examples=12", "eval.task_batch_examples=5")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/mc/acc_r4")] == [2, 4]
    assert [e.step for e in events.Images("eval/tasks")] == [2, 4]
    in_loop = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("eval/")
               and "/task_seconds" not in tag}
    assert len(in_loop) == 2 * 5  # 3 depths, early-exit accuracy and depth, per task
    assert 1.0 <= in_loop["eval/gen/depth_exit0.01"] <= 4.0
    log = (run / "train.log").read_text()
    assert "task gen (12 examples) r=1:" in log and "task mc (12 examples)" in log

    out = tmp_path / "offline"
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "eval", str(run / "checkpoints"), "--tasks",
                           *(f"{n}={p}" for n, p in files.items()), "--steps", "1,2,4", "--exit-threshold", "0.01",
                           "--examples", "12", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    offline = {}
    for task in json.loads((out / "tasks.json").read_text())["tasks"]:
        offline |= {f"eval/{task['task']}/acc_r{d}": v for d, v in task["accuracy"].items()}
        offline |= {f"eval/{task['task']}/acc_exit{t}": v for t, v in task["exit_accuracy"].items()}
        offline |= {f"eval/{task['task']}/depth_exit{t}": v for t, v in task["exit_mean_depth"].items()}
    assert offline == pytest.approx(in_loop, abs=1e-6)
    assert (out / "accuracy_vs_depth.png").stat().st_size > 1000 and "r=1" in done.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "choices": ["a", "b"], "answer": 2}) + "\n")
    refused = subprocess.run([sys.executable, "-m", "rdhpc.cli", "eval", str(run / "checkpoints"), "--tasks", str(bad)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and f"{bad}:1: 'answer' must be the index" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
