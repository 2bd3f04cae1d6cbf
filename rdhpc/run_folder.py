"""The files of a run folder (`logging.run_dir`), named in one place.

    RUN_DIR/
      config.yaml          the resolved run config (also inside every checkpoint)
      deepspeed.json       the exact DeepSpeed config the engine was built with
      run_state.json       how the last segment ended: completed, stopped (reason) or failed (error)
      metrics.jsonl        one line per optimizer step (step, loss, lr, depth, time)
      heartbeat/rank{r}.json   per-rank liveness (rdhpc.train.heartbeat)
      tensorboard/         TensorBoard events of the run
      checkpoints/         DeepSpeed checkpoints + rdhpc's state (rdhpc.train.checkpoint)
      eval/                `rdhpc eval` outputs, one folder per checkpoint tag
      COOLDOWN             `touch` it: a trapezoid schedule starts its cool-down at the next step
      slurm/               submitit's scripts, pickles and per-task logs (`rdhpc submit`)
      slurm_jobs.jsonl     one record per submission from this folder (`rdhpc status RUN_DIR`)

The trainer, the launcher, `rdhpc status`, export and the demo all reach these files through
RunFolder, so a rename happens here or nowhere.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Unix time at which a run saves a checkpoint and stops (the job's end minus a margin); the Slurm
# scripts export it, the trainer reads it.
STOP_AT_VARIABLE = "RDHPC_STOP_AT"


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    deepspeed_config = property(lambda self: self.root / "deepspeed.json")
    run_state = property(lambda self: self.root / "run_state.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    heartbeats = property(lambda self: self.root / "heartbeat")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    eval = property(lambda self: self.root / "eval")
    cooldown_request = property(lambda self: self.root / "COOLDOWN")
    slurm = property(lambda self: self.root / "slurm")
    slurm_jobs = property(lambda self: self.root / "slurm_jobs.jsonl")

    def read_run_state(self) -> dict:
        """The last run_state.json, {} when there is none (or it cannot be read)."""
        try:
            return json.loads(self.run_state.read_text())
        except (OSError, ValueError):
            return {}

    def write_run_state(self, state: str, step: int, **details) -> None:
        """Atomically (another process may read it at any moment)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.run_state.with_name(self.run_state.name + ".tmp")
        tmp.write_text(json.dumps({"state": state, "step": step, "time": time.time(), **details}))
        os.replace(tmp, self.run_state)

    def metrics_lines(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
