"""The configs shipped for real runs hold up: they validate, `rdhpc plan` says they fit the GPUs they
name, and `rdhpc submit --dry-run` produces the job those clusters need."""

import subprocess
import sys

import pytest

from rdhpc.config import load_config
from rdhpc.plan import plan_from_config

# config, cluster, nodes, GPUs per node, GPU type, tokens of the run
REAL_RUNS = [
    ("configs/huginn-3.5b-frontier.yaml", "frontier", 512, 8, "mi250x", 800e9),
    ("configs/rd-1b-nvidia-8gpu.yaml", "nvidia", 1, 8, "h100", 20e9),
]


@pytest.mark.parametrize("path", ["configs/debug.yaml", "configs/demo.yaml"] + [r[0] for r in REAL_RUNS])
def test_every_shipped_config_validates(path, repo_root):
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "config", path, "--quiet"], capture_output=True,
                          text=True, cwd=repo_root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "parameters" in done.stdout


@pytest.mark.parametrize("path, cluster, nodes, gpus_per_node, gpu_type, tokens", REAL_RUNS)
def test_real_run_configs_fit_and_submit(path, cluster, nodes, gpus_per_node, gpu_type, tokens, repo_root, tmp_path):
    run = load_config(repo_root / path)
    gpus = nodes * gpus_per_node
    assert (run.slurm.cluster, run.slurm.nodes) == (cluster, nodes)
    assert run.train.global_batch_size % (run.train.micro_batch_size * gpus) == 0
    plan = plan_from_config(str(repo_root / path), gpus=gpus, gpu_type=gpu_type, tokens=tokens)
    assert plan.configured["fits"], f"{path}: ZeRO {run.zero.stage} needs {plan.configured['total_gib']} GiB per GPU"
    # the whole run in the time the config allows: segments x time limit
    hours, minutes, _ = map(int, run.slurm.time.split(":"))
    assert plan.time["days"] * 24 < run.slurm.max_segments * (hours + minutes / 60)
    if path.endswith("frontier.yaml"):  # the paper's run: ~47,000 steps of 16.8M tokens
        assert plan.time["steps"] == pytest.approx(run.train.max_steps, rel=0.02)

    command = [sys.executable, "-m", "rdhpc.cli", "submit", path, "--dry-run", "--account", "PRJ123",
               "--set", f"data.train_dir={tmp_path / 'shards'}", "--set", f"logging.run_dir={tmp_path / 'run'}"]
    if cluster == "nvidia":
        command += ["--partition", "gpu"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=repo_root, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    script = done.stdout
    assert f"#SBATCH --nodes={nodes}\n" in script
    assert f"#SBATCH --ntasks-per-node={gpus_per_node}\n" in script
    assert f"#SBATCH --gpus-per-node={gpus_per_node}\n" in script
    assert f"{nodes * gpus_per_node} rank(s)" in script and "backend nccl" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR2@" in script
    assert "export RDHPC_STOP_AT=" in script
