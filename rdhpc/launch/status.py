"""`rdhpc status`: what Slurm and the run folder say about a run, submitted or local.

    rdhpc status 1234            # a job id (the registry in RDHPC_JOBS_DIR or ~/.rdhpc/jobs)
    rdhpc status runs/x          # a run folder: its latest submission, or the local run in it
    rdhpc status 1234 --json

Slurm's view comes from `scontrol show job` (live and recently finished jobs) or `sacct`; the run's
from RUN_DIR/run_state.json and metrics.jsonl; a failed task's error from its submitit result or
the traceback at the end of its stderr log.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from rdhpc.errors import UserError
from rdhpc.run_folder import RunFolder

# Slurm job states after which nothing more happens to the job.
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED")
# States in which the job may still run (its task errors are not final yet).
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING")
JOB_RECORD = "rdhpc_job.json"  # <job id>_rdhpc_job.json in the submitit folder


class StatusError(UserError):
    pass


def jobs_dir() -> Path:
    """The registry of submitted jobs: one <job id>.json each."""
    return Path(os.environ.get("RDHPC_JOBS_DIR") or Path.home() / ".rdhpc" / "jobs")


def _parse_scontrol(line: str) -> dict:
    record, key = {}, None
    for token in line.split(" "):
        name, sep, value = token.partition("=")
        if sep and name and name[0].isupper():
            key = name
            record[key] = value
        elif key is not None:
            record[key] += " " + token
    return record


def slurm_job_info(job_id: str, timeout: float = 30) -> dict | None:
    """Slurm's view of a job: scontrol (live jobs and recently finished ones), else sacct."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        info = _parse_scontrol(out.stdout.strip().splitlines()[0])
        return {"state": info.get("JobState", "UNKNOWN"), "reason": info.get("Reason"),
                "exit_code": info.get("ExitCode"), "restarts": int(info.get("Restarts") or 0),
                "nodes": info.get("NodeList"), "run_time": info.get("RunTime"), "source": "scontrol"}
    try:
        out = subprocess.run(["sacct", "-j", str(job_id), "-X", "-P", "-n", "-o", "JobID,State,ExitCode,NodeList"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        fields = line.split("|")
        if len(fields) >= 4 and fields[0] == str(job_id):
            return {"state": fields[1].split()[0], "exit_code": fields[2], "nodes": fields[3], "restarts": None,
                    "source": "sacct"}
    return None


def load_record(target: str) -> dict | None:
    """A job record from a job id (the registry in RDHPC_JOBS_DIR / ~/.rdhpc/jobs), a run folder
    (its latest submission) or a submitit folder; None for a run folder no job was submitted from."""
    path = Path(target)
    if path.is_dir():
        jobs = RunFolder(path).slurm_jobs
        if jobs.is_file():
            lines = jobs.read_text().splitlines()
            if lines:
                return json.loads(lines[-1])
        records = sorted(path.glob(f"*_{JOB_RECORD}"), key=lambda p: p.stat().st_mtime)
        if records:
            return json.loads(records[-1].read_text())
        run = RunFolder(path)
        if _is_run_folder(run):
            return None
        marks = ", ".join(p.name for p in _run_marks(run))
        raise StatusError(f"{path}: neither a run folder (none of {marks}) nor a folder an rdhpc job was "
                          f"submitted from ({jobs.name} or *_{JOB_RECORD} missing)")
    if not target.replace("_", "").isdigit():
        raise StatusError(f"{target!r} is neither a job id nor a folder")
    registry = jobs_dir() / f"{target}.json"
    if registry.is_file():
        return json.loads(registry.read_text())
    return {"job_id": target, "folder": None, "logs": [], "errors": [], "run_dir": None, "tensorboard": None}


def _task_errors(record: dict) -> list[tuple[int, str]]:
    """(task, error text) of every task that recorded an error: its submitit result, else the
    end of its stderr log when that holds a traceback."""
    import pickle

    out = []
    folder = Path(record["folder"]) if record.get("folder") else None
    for task in range(record.get("num_tasks") or 0):
        text = None
        if folder is not None:
            result = folder / f"{record['job_id']}_{task}_result.pkl"
            if result.is_file():
                try:
                    outcome, payload = pickle.loads(result.read_bytes())
                    if outcome == "error":
                        text = str(payload)
                except Exception:  # a result pickle we cannot read says nothing more
                    pass
        if text is None and task < len(record.get("errors", [])):
            err = Path(record["errors"][task])
            if err.is_file():
                content = err.read_text(errors="replace")
                if "Traceback" in content:
                    text = content[content.rfind("Traceback"):]
        if text:
            lines = [line for line in text.strip().splitlines() if line.strip()]
            out.append((task, "\n".join(lines[-6:])))
    return out


def _run_marks(run: RunFolder) -> tuple:
    return run.config, run.run_state, run.metrics, run.checkpoints


def _is_run_folder(run: RunFolder) -> bool:
    return any(path.exists() for path in _run_marks(run))


def _local_state(run_state: dict, lock: dict | None, heartbeat_age: float | None) -> str:
    """A local run's state: the trainer holding the lock is alive (running), or the end it recorded."""
    from rdhpc.run_folder import RunLock

    if lock:
        me = RunLock._record()
        if RunLock.gone(lock, me) is None and lock.get("host") == me["host"]:
            return "running"
        if lock.get("host") != me["host"]:
            beat = f", last heartbeat {heartbeat_age:.0f} s ago" if heartbeat_age is not None else ""
            return f"running or dead on {lock.get('host')} (its lock is held{beat})"
        return "interrupted (its trainer is gone without recording an end)"
    return run_state.get("state") or "not started"


def run_folder_status(root: str | Path) -> dict:
    """What a run folder says of itself: its end (run_state.json), its last step and loss
    (metrics.jsonl), its checkpoints, who holds it (rdhpc.lock), its heartbeats and where to look."""
    from rdhpc.train.checkpoint import TAG_PATTERN, UNIVERSAL_SUFFIX, is_tag_folder, read_latest

    run = RunFolder(Path(root).absolute())
    status = {"run_dir": str(run.root), "run_state": run.read_run_state()}
    metrics = run.metrics_lines()
    if metrics:
        status.update(last_step=metrics[-1].get("step"), last_loss=metrics[-1].get("loss"),
                      last_step_time=metrics[-1].get("time"), steps_logged=len(metrics))
    tags = sorted(p.name for p in run.checkpoints.glob(TAG_PATTERN)
                  if not p.name.endswith(UNIVERSAL_SUFFIX) and is_tag_folder(p)) if run.checkpoints.is_dir() else []
    status["checkpoints"] = {"folder": str(run.checkpoints), "tags": tags,
                             "latest": read_latest(run.checkpoints) if run.checkpoints.is_dir() else None}
    lock = None
    if run.lock.is_file():
        try:
            lock = json.loads(run.lock.read_text())
        except (OSError, ValueError):
            lock = {}
    beats = list(run.heartbeats.glob("rank*.json")) if run.heartbeats.is_dir() else []
    heartbeat_age = time.time() - max(p.stat().st_mtime for p in beats) if beats else None
    status["failure_requeues"] = run.failure_records()
    status["lock"], status["heartbeat_age_s"] = lock, heartbeat_age
    status["state"] = _local_state(status["run_state"], lock, heartbeat_age)
    status["files"] = {name: str(path) for name, path in (
        ("log", run.train_log), ("metrics", run.metrics), ("config", run.config), ("tensorboard", run.tensorboard),
        ("slurm logs", run.slurm)) if path.exists()}
    return status


def job_status(target: str) -> dict:
    """A job's status (Slurm's and its run folder's), or a local run's from its folder alone."""
    record = load_record(target)
    if record is None:
        local = run_folder_status(target)
        return {"job_id": None, "state": local["state"], "run": local, **_run_summary(local)}
    info = slurm_job_info(record["job_id"]) or {"state": "UNKNOWN"}
    status = {"job_id": record["job_id"], "state": info["state"], "slurm": info, "record": record}
    if record.get("run_dir"):
        status["run"] = run_folder_status(record["run_dir"])
        status.update(_run_summary(status["run"]))
    if info["state"] not in LIVE_STATES:
        status["errors"] = _task_errors(record)
    return status


def _run_summary(run: dict) -> dict:
    """The keys scripts read first: run_state, last_step, last_loss."""
    out = {"run_state": run["run_state"]} if run["run_state"] else {}
    if "last_step" in run:
        out.update(last_step=run["last_step"], last_loss=run["last_loss"])
    return out


def _format_run(status: dict, lines: list[str]) -> None:
    if "run_state" in status:
        rs = status["run_state"]
        lines.append(f"  run: {rs.get('state')} at step {rs.get('step')}" + (f" ({rs['reason']})" if rs.get("reason") else ""))
        if rs.get("error"):
            lines.append(f"  run error: {rs['error'].splitlines()[0]}")
    if status.get("last_step") is not None:
        lines.append(f"  last step {status['last_step']}, loss {status['last_loss']:.4f}")
    run = status.get("run")
    if not run:
        return
    ckpt = run["checkpoints"]
    if ckpt["tags"]:
        shown = ", ".join(ckpt["tags"][-3:]) + (f" (and {len(ckpt['tags']) - 3} older)" if len(ckpt["tags"]) > 3 else "")
        lines.append(f"  checkpoints: {shown}; latest {ckpt['latest']} in {ckpt['folder']}")
    else:
        lines.append(f"  checkpoints: none in {ckpt['folder']}")
    for record in run.get("failure_requeues", []):
        lines.append(f"  requeued itself after segment {record['segment']} of job {record['job_id']} failed: "
                     f"{record['reason']}")
    if run["heartbeat_age_s"] is not None and status["state"] in LIVE_STATES + ("running",):
        lines.append(f"  last heartbeat {run['heartbeat_age_s']:.0f} s ago")
    named_by_job = {"tensorboard"} if status.get("record", {}).get("tensorboard") else set()
    for name, path in run["files"].items():
        if name not in named_by_job:
            lines.append(f"  {name}: {path}")


def format_status(status: dict) -> str:
    if status["job_id"] is None:
        lines = [f"run {status['run']['run_dir']}: {status['state']} (a local run: no Slurm job was submitted "
                 f"from this folder)"]
        _format_run(status, lines)
        return "\n".join(lines)
    record, info = status["record"], status["slurm"]
    restarts = info.get("restarts")
    segments = f", segment {restarts + 1}" if restarts is not None else ""
    reason = f" (reason {info['reason']})" if info.get("reason") not in (None, "None") else ""
    exit_code = f", exit code {info['exit_code']}" if info.get("exit_code") not in (None, "0:0") else ""
    lines = [f"job {status['job_id']}: {status['state']}{segments}{reason}{exit_code}"]
    if record.get("cluster"):
        lines.append(f"  cluster {record['cluster']}, {record.get('num_tasks')} task(s), "
                     f"nodes {info.get('nodes') or '-'}")
    _format_run(status, lines)
    for task, text in status.get("errors", []):
        lines.append(f"  error of task {task} (rank {task}): {text.splitlines()[-1]}")
        lines += [f"    {line}" for line in text.splitlines()[:-1]]
    logs = record.get("logs") or []
    if logs:
        more = f" (and {len(logs) - 1} more)" if len(logs) > 1 else ""
        lines.append(f"  logs: {logs[0]}{more}")
        lines.append(f"  errors: {record['errors'][0]}")
    if record.get("run_dir"):
        lines.append(f"  run folder: {record['run_dir']}")
    if record.get("tensorboard"):
        lines.append(f"  tensorboard: {record['tensorboard']}")
    return "\n".join(lines)


def wait_for_job(job_id: str, timeout: float, poll_s: float = 2.0) -> str:
    """Poll until the job reaches a terminal state; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        info = slurm_job_info(job_id)
        state = (info or {}).get("state", "UNKNOWN")
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(poll_s)


def cmd_status(args) -> int:
    status = job_status(args.job)
    if args.json:
        print(json.dumps(status, indent=1, default=str))
    else:
        print(format_status(status))
    return 0
