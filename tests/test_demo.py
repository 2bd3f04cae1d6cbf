"""`make demo` must not rot: the same entry point at a reduced step count."""

import json
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path, repo_root):
    run_dir = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "demo", "--run-dir", str(run_dir), "--steps", "40",
                           "--set", "train.log_interval=10"],
                          capture_output=True, text=True, cwd=repo_root, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "corpus:" in done.stdout and "reloaded logits identical: True" in done.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train_loss_last10"] < results["train_loss_first10"]
    assert set(results["val_loss_by_depth"]) == {"1", "2", "4", "8", "16"}
    assert (run_dir / "config.yaml").is_file() and (run_dir / "huginn" / "model.safetensors").is_file()
