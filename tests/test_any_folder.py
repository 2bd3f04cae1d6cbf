"""A run started with relative paths is used from another folder by every command: the run folder,
its checkpoints and its exports record paths absolutely, so nothing depends on where a command runs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from tests.trained_runs import REPO_ROOT, write_debug_shards


def rdhpc(*args, cwd, check=True):
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    if check:
        assert done.returncode == 0, f"rdhpc {' '.join(map(str, args))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """PROJECT/shards and PROJECT/runs/rel, trained from PROJECT with relative paths only."""
    project = tmp_path_factory.mktemp("project")
    write_debug_shards(project)
    rdhpc("launch", "local", REPO_ROOT / "configs" / "debug.yaml", "--nproc", "1",
          "--set", "data.train_dir=shards", "--set", "logging.run_dir=runs/rel", "--set", "model.max_seq_len=64",
          "--set", "train.max_steps=3", "--set", "eval.interval=1000", "--set", "checkpoint.interval=1000",
          "--set", "schedule.warmup_steps=1", cwd=project)
    return project


@pytest.fixture()
def elsewhere(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def test_what_a_run_saves_names_its_paths_absolutely(project):
    run = project / "runs" / "rel"
    for config in [run / "config.yaml", run / "checkpoints" / "step00000003" / "rdhpc" / "config.yaml"]:
        saved = yaml.safe_load(config.read_text())
        assert saved["data"]["train_dir"] == str(project / "shards"), config
        assert saved["logging"]["run_dir"] == str(run), config
    log = (run / "train.log").read_text()
    assert "[train] step      3" in log and "[train] saved checkpoint" in log, log[-2000:]


def test_every_command_works_from_another_folder(project, elsewhere):
    run = project / "runs" / "rel"
    status = rdhpc("status", run, cwd=elsewhere).stdout
    assert f"run {run}: completed" in status and "last step 3" in status, status
    assert "checkpoints: step00000003; latest step00000003" in status and f"log: {run / 'train.log'}" in status, status
    info = json.loads(rdhpc("status", run, "--json", cwd=elsewhere).stdout)
    assert info["state"] == "completed" and info["last_step"] == 3 and info["run"]["checkpoints"]["tags"] == ["step00000003"]

    out = rdhpc("generate", run, "--prompt", "def main", "--max-new-tokens", "3", "--steps", "2", cwd=elsewhere).stdout
    assert out.startswith("def main") and "[generate] 3 tokens" in out, out

    done = rdhpc("eval", run, "--steps", "1,2", "--max-rows", "4", cwd=elsewhere)  # --data: the run's own
    assert f"data: {project / 'shards'}" in done.stdout
    assert json.loads((run / "eval" / "step00000003" / "eval.json").read_text())["step"] == 3

    rdhpc("export", run, "--format", "huginn", "--out", "huginn", cwd=elsewhere)
    assert (elsewhere / "huginn" / "tokenizer.json").read_bytes() == (project / "tok.json").read_bytes()
    rdhpc("export", run, "--out", "model.safetensors", cwd=elsewhere)
    umask = os.umask(0o022)
    os.umask(umask)
    for weights in [elsewhere / "huginn" / "model.safetensors", elsewhere / "model.safetensors"]:
        assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask, weights  # not safetensors' 0600
    other = elsewhere / "other"
    other.mkdir()
    for exported in [elsewhere / "model.safetensors", elsewhere / "huginn"]:  # their tokenizer, from yet elsewhere
        rdhpc("generate", exported, "--prompt", "x", "--max-new-tokens", "2", "--steps", "1", cwd=other)

    from rdhpc.eval.lm_eval_adapter import RdhpcLM

    cwd = os.getcwd()
    os.chdir(other)
    try:
        model = RdhpcLM(checkpoint=str(run), num_steps=2)
    finally:
        os.chdir(cwd)
    assert model.tok.vocab_size == 512

    rdhpc("prep", "inspect", project / "shards", "--rows", "1", cwd=elsewhere)
    plan = rdhpc("plan", run / "config.yaml", "--gpus", "1", "--gpu-type", "h100", "--tokens", "1e6", cwd=elsewhere)
    assert "memory per GPU" in plan.stdout


def test_a_run_resumes_from_another_folder_with_its_saved_config(project, elsewhere):
    copy = elsewhere / "runs"
    shutil.copytree(project / "runs" / "rel", copy / "rel")
    config = copy / "rel" / "config.yaml"  # names the original run folder: point it at the copy
    saved = yaml.safe_load(config.read_text())
    saved["logging"]["run_dir"] = str(copy / "rel")
    config.write_text(yaml.safe_dump(saved))
    done = rdhpc("launch", "local", config, "--nproc", "1", "--set", "train.max_steps=4", cwd=elsewhere / "runs")
    assert "resumed from" in done.stdout and "step00000003" in done.stdout, done.stdout[-3000:]
    metrics = [json.loads(line) for line in (copy / "rel" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]


def test_a_checkpoint_with_relative_paths_says_why_it_has_no_tokenizer(project, elsewhere):
    """Checkpoints written before paths were absolute: a warning on export, an error naming the
    folder to run from on generate; never a silent omission."""
    old = elsewhere / "old"
    shutil.copytree(project / "runs" / "rel" / "checkpoints", old)
    config = old / "step00000003" / "rdhpc" / "config.yaml"
    saved = yaml.safe_load(config.read_text())
    saved["data"]["train_dir"] = "shards"
    config.write_text(yaml.safe_dump(saved))

    done = rdhpc("export", old, "--format", "huginn", "--out", "huginn", cwd=elsewhere)
    assert not (elsewhere / "huginn" / "tokenizer.json").exists()
    assert "warning: " in done.stdout and "shards/manifest.json is not found from" in done.stdout, done.stdout
    assert "tokenizer.json is not written; pass --tokenizer PATH" in done.stdout, done.stdout

    failed = rdhpc("generate", old, "--prompt", "x", "--max-new-tokens", "2", cwd=elsewhere, check=False)
    assert failed.returncode == 2 and "relative to the folder the run was started from" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr
    # from the folder it was trained in, the relative path still works
    rdhpc("generate", old, "--prompt", "x", "--max-new-tokens", "2", "--steps", "1", cwd=project)


def test_status_of_a_folder_that_is_no_run(elsewhere):
    done = rdhpc("status", elsewhere, cwd=elsewhere, check=False)
    assert done.returncode == 2 and "neither a run folder" in done.stderr


def test_status_of_a_run_in_progress_and_of_one_whose_trainer_died(project, elsewhere):
    from rdhpc.launch.status import run_folder_status
    from rdhpc.run_folder import RunLock

    run = elsewhere / "run"
    shutil.copytree(project / "runs" / "rel", run)
    (run / "rdhpc.lock").write_text(json.dumps(RunLock._record()))  # this live process holds it
    assert run_folder_status(run)["state"] == "running"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "rdhpc.lock").write_text(json.dumps({**RunLock._record(), "pid": int(dead.stdout)}))
    assert run_folder_status(run)["state"].startswith("interrupted")
