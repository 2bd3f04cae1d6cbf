"""Small real training runs shared by the evaluation, generation and export tests.

Each run is the debug model trained for a few steps by `rdhpc launch local` (real DeepSpeed, 2 gloo
ranks on the CPU), made once per test session and cached by its settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_ROOT: Path | None = None
_DONE: dict[tuple, Path] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="trained-runs-"))
    return _ROOT


def write_debug_shards(root: Path) -> Path:
    """root/docs.jsonl (60 stdlib sources), root/tok.json (vocabulary 512) and root/shards
    (carry-packed rows of 64 tokens, 20% validation): the data of every debug training test."""
    from data_prep.shards import ShardSettings, run_shards
    from data_prep.tokenizer_train import train_tokenizer

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    with open(root / "docs.jsonl", "w") as f:
        for path in sources:
            f.write(json.dumps({"text": path.read_text(encoding="utf-8")}) + "\n")
    train_tokenizer([str(root / "docs.jsonl")], vocab_size=512, out=root / "tok.json", log=lambda *a: None)
    run_shards(ShardSettings(inputs=[str(root / "docs.jsonl")], tokenizer=str(root / "tok.json"), seq_len=64,
                             out=str(root / "shards"), pack="carry", rows_per_shard=512, val_fraction=0.2),
               log=lambda *a: None)
    return root / "shards"


def shards() -> Path:
    """The session's debug shards (write_debug_shards), made once."""
    out = _root() / "shards"
    if (out / "manifest.json").exists():
        return out
    return write_debug_shards(_root())


def trained_run(steps: int = 4, stage: int = 1, precision: str = "fp32", nproc: int = 2, *overrides) -> Path:
    """The run folder of a finished debug run (its checkpoints under RUN/checkpoints)."""
    key = (steps, stage, precision, nproc, overrides)
    if key in _DONE:
        return _DONE[key]
    data = shards()
    run_dir = _root() / f"run-s{steps}-z{stage}-{precision}-n{nproc}-{len(_DONE)}"
    command = [sys.executable, "-m", "rdhpc.cli", "launch", "local", "configs/debug.yaml", "--nproc", str(nproc),
               "--set", f"data.train_dir={data}", "--set", "model.max_seq_len=64",
               "--set", f"logging.run_dir={run_dir}", "--set", f"train.max_steps={steps}",
               "--set", f"zero.stage={stage}", "--set", f"train.precision={precision}",
               "--set", "eval.interval=1000", "--set", "checkpoint.interval=1000",
               "--set", "schedule.warmup_steps=2"]
    for o in overrides:
        command += ["--set", o]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"training failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    _DONE[key] = run_dir
    return run_dir
