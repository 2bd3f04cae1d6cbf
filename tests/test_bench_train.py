"""tools/bench_train.py at the debug size on the CPU (one process, DeepSpeed over gloo): it runs, its
JSON holds every figure, and every path's losses agree on the same batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "tools/bench_train.py", "--shape", "debug", "--seq-len", "64",
                           "--steps", "3", "--warmup", "1", "--json", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def test_fp32_engine_and_plain_paths_agree_exactly(tmp_path):
    result, stdout = bench(tmp_path, "--depth", "3,2", "--set", "train.compile_backend=aot_eager",
                           "--plain", "eager", "--plain", "core",
                           "--engine", "engine", "--engine", "fused: optim.fused=true")
    assert result["precision"] == "fp32" and result["depth"] == [3, 2] and result["tokens_per_step"] == 64
    assert result["flops_per_token"] > 0 and result["peak_tflops"] > 0 and result["max_rss_gib"] > 0
    assert list(result["paths"]) == ["plain-eager", "plain-core", "engine", "fused"]
    for name, path in result["paths"].items():
        assert len(path["losses"]) == len(path["step_s_all"]) == 4, name
        assert path["tokens_per_s"] == pytest.approx(64 / path["step_s"])
        assert path["mfu"] == pytest.approx(path["tflops"] / result["peak_tflops"])
        assert path["peak_memory_gib"] is None  # CPU: only the process's peak RSS
        assert f"[bench] {name}" in stdout
    assert result["paths"]["engine"]["deepspeed_config"]["zero_optimization"]["stage"] == 1
    reference = result["paths"]["plain-eager"]["losses"]
    # ZeRO 1 in fp32 against the plain loop (AdamW, clipping), 4 steps: equal up to the order of float sums
    for name in ("plain-core", "engine", "fused"):
        assert result["paths"][name]["losses"] == pytest.approx(reference, rel=1e-5), name
    assert result["first_loss_rel_diff"]["engine"] < 1e-6
    assert result["speedup_vs"]["plain-eager"]["engine"] > 0


def test_bf16_engine_with_every_switch_tracks_the_autocast_reference(tmp_path):
    """DeepSpeed's bf16 weights against the paper's recipe (float32 weights under bf16 autocast):
    the same losses within bf16 noise; and each switch leaves the engine's losses where they were."""
    switches = ("train.compile=core model.loss_chunk_size=16 model.no_grad_mode=inference_mode model.hoist_injection=true "
                "train.bf16_immediate_grad_update=true train.sdpa_backend=math")
    result, _ = bench(tmp_path, "--precision", "bf16", "--set", "train.compile_backend=aot_eager",
                      "--engine", "engine", "--engine", f"fast: {switches}")
    assert result["precision"] == "bf16"
    paths = result["paths"]
    assert paths["fast"]["overrides"] == switches.split()
    assert paths["fast"]["deepspeed_config"]["bf16"] == {"enabled": True, "immediate_grad_update": True}
    reference = paths["plain-eager"]["losses"]
    assert paths["engine"]["losses"] == pytest.approx(reference, rel=1e-2)
    assert paths["fast"]["losses"] == pytest.approx(paths["engine"]["losses"], rel=2e-3)


def test_activation_memory_tool_counts_what_backward_keeps(tmp_path):
    def total(*args):
        out = tmp_path / "mem.json"
        done = subprocess.run([sys.executable, "tools/activation_memory.py", "--shape", "debug", "--seq-len", "64",
                               "--depth", "3,2", "--json", str(out), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "saved for backward" in done.stdout
        return json.loads(out.read_text())["total_bytes"]

    plain = total()
    assert 0 < total("--set", "model.activation_checkpointing=true") < plain
    assert 0 < total("--set", "model.loss_chunk_size=16", "--set", "model.hoist_injection=true") < plain
    # k = 2 iterations with gradient keep twice what k = 1 keeps of the core
    assert total("--depth", "3,1") < plain < total("--depth", "3,4")


def test_device_script_rehearses_on_the_cpu(tmp_path):
    """tools/device_bench.sh, the prepared H200 check, at the debug shape: every stage runs and
    leaves its JSON, and no more files than the device tool brings back (8)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path), "RDHPC_BENCH_SHAPE": "debug",
           "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "tools/device_bench.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("attention", "main", "parts"):
        assert f"[device] {name}: exit 0" in done.stdout, done.stdout[-3000:]
    main = json.loads((tmp_path / "main.json").read_text())
    assert list(main["paths"]) == ["plain-eager", "fast"] and main["precision"] == "bf16"
    parts = json.loads((tmp_path / "parts.json").read_text())
    assert list(parts["paths"]) == ["plain-core", "uncompiled", "autocast"]  # bf16 and the paper's precision
    assert json.loads((tmp_path / "attention.json").read_text())["backends"]["math"]["available"]
    assert "reference (the paper's released code, one H200)" in (tmp_path / "summary.txt").read_text()
    assert len(list(tmp_path.iterdir())) <= 8
