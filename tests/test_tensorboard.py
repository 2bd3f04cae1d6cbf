"""Watching runs: `rdhpc tensorboard` serves a run on loopback (queried over its HTTP API, stopped by
PID), tools/tb_export.py writes chosen scalars to CSV and PNG."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from rdhpc.monitor.tensorboard import tunnel_command


@pytest.fixture
def run_dir(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    writer = SummaryWriter(str(run / "tensorboard"))
    for step in range(1, 21):
        writer.add_scalar("train/loss", 6.0 - 0.1 * step, step)
        writer.add_scalar("train/lr", 1e-3, step)
        if step % 5 == 0:
            writer.add_scalar("val/loss_r1", 6.5 - 0.05 * step, step)
            writer.add_scalar("val/loss_r8", 6.0 - 0.1 * step, step)
    writer.close()
    writer = SummaryWriter(str(run / "eval" / "step00000020" / "tensorboard"))
    for depth in (1, 2, 4, 8):
        writer.add_scalar("eval/loss", 5.0 - 0.1 * depth ** 0.5, depth)
    writer.close()
    return run


def test_tensorboard_serves_the_run_on_loopback(run_dir, repo_root):
    process = subprocess.Popen([sys.executable, "-m", "rdhpc.cli", "tensorboard", str(run_dir), "--login-host",
                                "login.example"], cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("ssh " in line for line in lines):
            lines.append(process.stdout.readline())
        text = "".join(lines)
        url = re.search(r"at (http://127\.0\.0\.1:(\d+)/)", text)
        assert url, text
        port = int(url.group(2))
        assert "ssh -N -J " in text and "@login.example" in text and f"-L {port}:127.0.0.1:{port}" in text
        tags = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url.group(1) + "data/plugin/scalars/tags", timeout=5) as response:
                    tags = json.loads(response.read())
                if "tensorboard" in tags:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        assert set(tags["tensorboard"]) == {"train/loss", "train/lr", "val/loss_r1", "val/loss_r8"}
        assert set(tags["eval/step00000020/tensorboard"]) == {"eval/loss"}
        with urllib.request.urlopen(url.group(1) + "data/plugin/scalars/scalars?tag=train/loss&run=tensorboard",
                                    timeout=5) as response:
            points = json.loads(response.read())
        assert [p[1] for p in points] == list(range(1, 21))
    finally:
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert "stopped" in process.stdout.read()


def test_tunnel_command_forms():
    assert tunnel_command(6123, None, "ana", "node17") == "ssh -N -L 6123:127.0.0.1:6123 ana@node17"
    assert tunnel_command(6123, "login1", "ana", "node17") == \
        "ssh -N -J ana@login1 -L 6123:127.0.0.1:6123 ana@node17"


def test_missing_run_folder_is_a_user_error(tmp_path, capsys):
    from rdhpc.cli import main

    assert main(["tensorboard", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such run folder" in capsys.readouterr().err


def test_tb_export_writes_csv_and_png(run_dir, tmp_path, repo_root):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "tools/tb_export.py", str(run_dir), "--tags", "train/loss,val/loss_r*",
                           "--out", str(out), "--smooth", "0.5"], cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out / "scalars.csv")))
    assert {r["tag"] for r in rows} == {"train/loss", "val/loss_r1", "val/loss_r8"}
    loss = [(int(r["step"]), float(r["value"])) for r in rows if r["tag"] == "train/loss"]
    assert loss == [(s, pytest.approx(6.0 - 0.1 * s, rel=1e-6)) for s in range(1, 21)]
    assert [int(r["step"]) for r in rows if r["tag"] == "val/loss_r8"] == [5, 10, 15, 20]
    for name in ("train_loss.png", "val_loss_r1.png", "val_loss_r8.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    done = subprocess.run([sys.executable, "tools/tb_export.py", str(run_dir), "--tags", "train/nope",
                           "--out", str(out)], cwd=repo_root, capture_output=True, text=True)
    assert done.returncode == 2
    assert "no scalar matches ['train/nope']" in done.stderr and "train/loss" in done.stderr
