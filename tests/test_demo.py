"""`make demo` must not rot: the same entry point at a reduced step count, end to end."""

import json
import subprocess
import sys


def test_demo_runs_end_to_end_and_reuses_what_is_done(tmp_path, repo_root):
    run_dir = tmp_path / "demo"
    command = [sys.executable, "-m", "rdhpc.cli", "demo", "--run-dir", str(run_dir), "--steps", "60",
               "--set", "train.log_interval=10", "--set", "eval.interval=30", "--set", "checkpoint.interval=30"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=repo_root, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    for stage in range(1, 6):
        assert f"[demo] ({stage}/5)" in done.stdout
    assert "corpus: " in done.stdout and "reloaded logits identical: True" in done.stdout
    assert "open TensorBoard:  rdhpc tensorboard" in done.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train_loss_last10"] < results["train_loss_first10"]
    curve = {int(d): v for d, v in results["val_loss_by_depth"].items()}
    assert sorted(curve) == [1, 2, 4, 8, 16, 32] and curve[8] < curve[1]  # more depth helps
    evaluated = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert evaluated["step"] == 60 and evaluated["loss"]["8"] == results["val_loss_by_depth"]["8"]
    png = (run_dir / "eval" / "loss_vs_depth.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (run_dir / "config.yaml").is_file() and (run_dir / "huginn" / "model.safetensors").is_file()
    assert (run_dir / "train" / "tensorboard").is_dir()
    # the task: accuracy against depth for every held-out difficulty, offline and in the loop
    task = results["task"]
    assert sorted(task["accuracy_by_depth"]) == sorted(f"compose-h{k}" for k in range(1, 13))
    assert all(sorted(map(int, by_depth)) == [1, 2, 4, 8, 16, 32] for by_depth in task["accuracy_by_depth"].values())
    assert all(0 <= e["accuracy"] <= 1 and 1 <= e["mean_depth"] <= 32 for e in task["early_exit"].values())
    offline = json.loads((run_dir / "eval" / "tasks.json").read_text())
    assert offline["step"] == 60 and len(offline["tasks"]) == 12
    figure = (run_dir / "demo.png").read_bytes()
    assert figure.startswith(b"\x89PNG") and len(figure) > 20_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "train" / "tensorboard"), size_guidance={"images": 0}).Reload()
    in_loop = [e.step for e in events.Scalars("eval/compose-h4/acc_r16")]
    assert in_loop == [30, 60] and "eval/tasks" in events.Tags()["images"]  # every eval.interval, and the end
    assert "task, held-out problems of 1-8 operations (the trained word lengths)" in done.stdout
    assert "task, held-out problems of 9-12 operations (words longer than any trained on)" in done.stdout
    assert sorted(task["mean_accuracy_by_depth"]) == sorted(task["pooled_accuracy_by_depth"]) == ["longer",
                                                                                                "trained_lengths"]
    # pooled: the share of the group's held-out problems answered right, from the per-file table
    trained = [f"compose-h{k}" for k in range(1, 9)]
    assert task["pooled_examples"]["trained_lengths"] == sum(task["examples"][t] for t in trained)
    right = sum(task["accuracy_by_depth"][t]["16"] * task["examples"][t] for t in trained)
    assert abs(task["pooled_accuracy_by_depth"]["trained_lengths"]["16"] * task["pooled_examples"]["trained_lengths"]
               - right) < 1e-9

    # a second run reuses the corpus, the task, the tokenizer, the shards and the finished training
    again = subprocess.run(command, capture_output=True, text=True, cwd=repo_root, timeout=900)
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-3000:]
    assert "corpus: reusing" in again.stdout and again.stdout.count("nothing to do") == 2
    assert "task: reusing" in again.stdout
    assert "training: reusing the finished run" in again.stdout
    assert json.loads((run_dir / "results.json").read_text())["val_loss_by_depth"] == results["val_loss_by_depth"]


def test_gpu_demo_says_clearly_when_there_is_no_gpu(tmp_path, repo_root):
    import os

    # no device visible, whatever the machine has
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "demo", "--gpu", "--run-dir", str(tmp_path / "gpu")],
                          capture_output=True, text=True, cwd=repo_root, timeout=120, env=env)
    assert done.returncode == 2 and "no CUDA or ROCm device is visible" in done.stderr


def test_the_demo_corpus_cuts_files_at_definitions_and_gives_them_back():
    """Whole files made ~270 documents, so the 5% validation split was a dozen files; cut before
    top-level definitions (pieces of at least 1,000 characters), they are ~3.5x as many, and joined
    they give back each file exactly."""
    import sysconfig
    from pathlib import Path

    from rdhpc.demo import split_at_definitions

    for name in ("os.py", "textwrap.py", "json/__init__.py"):
        text = (Path(sysconfig.get_paths()["stdlib"]) / name).read_text(encoding="utf-8")
        pieces = split_at_definitions(text)
        assert "".join(pieces) == text and len(pieces) > 1
        assert all(len(p) >= 1000 for p in pieces[:-1])
        assert all(p.startswith(("def ", "class ", "async def ", "@")) for p in pieces[1:])
