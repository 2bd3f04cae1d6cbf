"""`rdhpc submit`: training (or a prep stage) as a Slurm job through submitit: the plan, the script, the
submission. What runs inside the job is rdhpc.launch.job; `rdhpc status` is rdhpc.launch.status.

    rdhpc submit configs/huginn-3.5b-frontier.yaml --cluster frontier --nodes 512 --account ABC123
    rdhpc submit configs/debug.yaml --cluster local --set data.train_dir=shards/ --wait    # here
    rdhpc submit --cluster local --tasks-per-node 2 --prep shards --input docs/ --tokenizer tok.json ...
    rdhpc submit ... --dry-run          # the exact sbatch script and environment, nothing submitted

One code path for every cluster: a preset (slurm/clusters/*.yaml, rdhpc.launch.presets) fixes the
layout (tasks, GPUs, cores per node), the modules and the environment; submitit writes the sbatch
script (the dry run prints the very text it would submit) and starts one Python process per task
with `srun`.

Segments, preemption and time limits (the paper ran 21 segments of up to 12 h):

- The batch script exports RDHPC_STOP_AT = job start + time limit - stop margin, and asks Slurm for
  SIGUSR2 `stop_margin_s` before the limit (`--signal=USR2@margin`, what submitit does). Whichever
  comes first, the trainer's own handler (it replaces submitit's once set-up runs) makes every rank
  save a checkpoint at the next step boundary, and train() returns `completed=False`.
- The task then decides whether to requeue its own job (rdhpc.launch.job.decide_requeue, rank 0
  acts) and exits without a result, so submitit's `job.result()` keeps waiting across segments. The
  requeued job keeps its id, reruns the same pickled task, and the trainer resumes from the latest
  complete checkpoint (checkpoint.resume = auto). SLURM_RESTART_COUNT bounds the chain
  (slurm.max_segments).
- A signal during start-up, before the trainer took over, reaches submitit's handler, which calls
  the task's `checkpoint()` and requeues: nothing was trained since the last checkpoint, so an
  immediate requeue loses nothing. A preemption that kills without warning, or `scontrol requeue`
  from outside, loses only the steps after the last periodic checkpoint.
- srun runs with --kill-on-bad-exit: one failing rank ends the job (FAILED, its error in its
  result and log) instead of leaving its peers waiting in a collective; unless the failure was
  the machines' (a rank killed by a signal, hung, on a dead node, a broken collective): then the
  task guard (rdhpc.launch.guard) or a surviving rank requeues the job first, excluding the host at
  fault, at most slurm.max_failure_requeues times (rdhpc.launch.job.decide_failure_requeue).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rdhpc.errors import UserError
# TrainTask and CommandTask are imported here too: jobs pickled by an earlier rdhpc name them here.
from rdhpc.launch.job import CommandTask, TrainTask  # noqa: F401
from rdhpc.launch.presets import ClusterPreset, load_preset
from rdhpc.launch.quoting import (check_env_value, check_job_name, check_sbatch_path, check_sbatch_value,
                                  export_line, quote_env_value, shell_quote)
from rdhpc.launch.status import JOB_RECORD, format_status, job_status, jobs_dir, wait_for_job
from rdhpc.run_folder import STOP_AT_VARIABLE, RunFolder

CONFIG_SNAPSHOT = "rdhpc_config.yaml"
PREP_STAGES = ("shards", "tokenizer", "verify")


class SubmitError(UserError):
    pass


# ---- the plan: everything a submission needs, from preset + config + command line ---------------
@dataclass
class JobPlan:
    kind: str  # "train" or "prep"
    preset: ClusterPreset
    job_name: str
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    time_s: int
    stop_margin_s: int
    max_segments: int
    folder: Path
    python: str  # a shell word (quoted already)
    max_failure_requeues: int = 0
    account: str | None = None
    partition: str | None = None
    qos: str | None = None
    exclude: str | None = None
    env: dict = field(default_factory=dict)  # NAME -> value (${NAME} expanded in the job)
    staging: bool = False
    run_dir: Path | None = None
    config_overrides: list = field(default_factory=list)  # the preset's, applied before the user's
    command: list = field(default_factory=list)  # prep: rdhpc arguments
    config_path: Path | None = None  # train: the resolved config snapshot the job loads

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def time_minutes(self) -> int:
        return max(1, math.ceil(self.time_s / 60))

    @property
    def tensorboard_dir(self) -> Path | None:
        return RunFolder(self.run_dir).tensorboard if self.run_dir else None


def walltime_problems(preset, nodes: int, asked: str, time_s: int) -> list[str]:
    """A time above the site's limit for this many nodes would wait in the queue forever: the
    preset's max_time_by_nodes ({up to N nodes: limit}) refuses it, naming the limit."""
    from rdhpc.config.schema import slurm_time_seconds

    if not preset.max_time_by_nodes:
        return []
    fitting = sorted(n for n in preset.max_time_by_nodes if n >= nodes)
    if not fitting:
        return [f"slurm.nodes: {nodes} nodes is more than the {preset.name} preset allows "
                f"({max(preset.max_time_by_nodes)}, its max_time_by_nodes)"]
    limit = preset.max_time_by_nodes[fitting[0]]
    if time_s > slurm_time_seconds(limit):
        return [f"slurm.time: {asked} is above the {preset.name} limit of {limit} for {nodes} node(s) "
                f"(max_time_by_nodes in {preset.path}); ask for at most --time {limit}, or more nodes"]
    return []


def plan_job(preset_name: str, slurm, kind: str, run_dir: Path | None, folder: Path | None,
             command: list[str] | None = None) -> JobPlan:
    """Combine the preset with the config's slurm section (whose values, when set, win) and check
    every value that will reach the script. Raises SubmitError / QuotingError naming the key."""
    from rdhpc.config.schema import slurm_time_seconds

    preset = load_preset(preset_name)
    problems: list[str] = []
    account = slurm.account or preset.account
    if preset.account_required and not account:
        problems.append(f"slurm.account: the {preset.name} preset needs an account (--account PROJECT or "
                        f"--set slurm.account=PROJECT)")
    for key, value in (("account", account), ("partition", slurm.partition or preset.partition),
                       ("qos", slurm.qos or preset.qos), ("exclude", slurm.exclude)):
        if value is not None:
            problems += [f"slurm.{key}: {m}" for m in check_sbatch_value(str(value))]
    problems += [f"slurm.job_name: {m}" for m in check_job_name(slurm.job_name)]
    time_s = 60 * max(1, math.ceil(slurm_time_seconds(slurm.time) / 60))  # Slurm counts whole minutes
    problems += walltime_problems(preset, slurm.nodes, slurm.time, time_s)
    margin = slurm.stop_margin_s if slurm.stop_margin_s is not None else preset.stop_margin_s
    if margin >= time_s:
        problems.append(f"slurm.stop_margin_s: {margin} s is not shorter than slurm.time = {slurm.time} "
                        f"({time_s} s): the job would stop before it starts")
    folder = Path(folder or (RunFolder(run_dir).slurm if run_dir else Path("runs") / "slurm")).absolute()
    problems += [f"slurm.folder: {m}" for m in check_sbatch_path(str(folder))]

    env = preset.job_env()
    for item in slurm.env:
        name, _, value = item.partition("=")
        env[name] = value
    for name, value in env.items():
        problems += [f"slurm.env: {m}" for m in check_env_value(name, value)]
    gpus = slurm.gpus_per_node if slurm.gpus_per_node is not None else preset.gpus_per_node
    cpus = slurm.cpus_per_task or preset.cpus_per_task
    env.setdefault("OMP_NUM_THREADS", str(cpus))

    staging = preset.staging.enabled if slurm.staging is None else slurm.staging
    if staging and not preset.staging.archive:
        problems.append(f"slurm.staging: the {preset.name} preset's staging section names no archive "
                        f"({preset.path}: staging.archive)")
    if staging:
        python = quote_env_value(preset.staging.dest.rstrip("/") + "/" + preset.staging.python)
    elif slurm.python or preset.python:
        python = shell_quote(slurm.python or preset.python)
    else:
        python = shell_quote(sys.executable)
    if problems:
        raise SubmitError(f"{len(problems)} problem(s) with the job:\n" + "\n".join(f"  - {p}" for p in problems))
    return JobPlan(kind=kind, preset=preset, job_name=slurm.job_name, nodes=slurm.nodes,
                   tasks_per_node=slurm.tasks_per_node or preset.tasks_per_node, gpus_per_node=gpus,
                   cpus_per_task=cpus, time_s=time_s, stop_margin_s=margin, max_segments=slurm.max_segments,
                   max_failure_requeues=slurm.max_failure_requeues, folder=folder, python=python, account=account, partition=slurm.partition or preset.partition,
                   qos=slurm.qos or preset.qos, exclude=slurm.exclude, env=env, staging=staging,
                   run_dir=Path(run_dir).absolute() if run_dir else None,
                   config_overrides=preset.config_overrides() if kind == "train" else [],
                   command=list(command or []))


# ---- the script -------------------------------------------------------------------------------
def setup_lines(plan: JobPlan) -> list[str]:
    """Shell lines of the batch script before `srun` (submitit's `setup`)."""
    from rdhpc.distributed.ranks import STALE_RANK_VARIABLES

    p = plan.preset
    lines = [f"# rdhpc {plan.kind}: cluster preset {p.name} ({p.path}); {plan.num_tasks} ranks, backend {p.backend}"]
    lines += [f"module load {m}" for m in p.modules]  # module names are checked to be plain words
    lines += list(p.setup)
    lines.append("# sbatch exports the submitter's environment: drop what a launcher there left behind")
    lines.append("unset " + " ".join(STALE_RANK_VARIABLES))
    lines += [export_line(name, value) for name, value in plan.env.items()]
    lines.append("# checkpoint and stop before the time limit (the same margin as Slurm's USR2 warning): the")
    lines.append("# end Slurm gives the job, not a clock read once the set-up has run (else: now + the limit)")
    lines.append(f"export {STOP_AT_VARIABLE}=$(( ${{SLURM_JOB_END_TIME:-$(( $(date +%s) + {plan.time_minutes * 60} ))}}"
                 f" - {plan.stop_margin_s} ))")
    if plan.staging:
        s = p.staging
        dest = quote_env_value(s.dest)
        archive = shell_quote(s.archive)
        local = quote_env_value(s.dest.rstrip("/") + "/rdhpc-env.tar")
        # one task per node (-n as many as nodes: the job's own SLURM_NTASKS would otherwise start
        # several per node, racing on one folder); any failure ends the job before a rank starts
        per_node = '--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1'
        lines += ["# node-local staging: the environment to every node's local disk (sbcast), unpacked once per node",
                  "rdhpc_staging_failed() { echo \"rdhpc: node-local staging failed at $1 (the error above names "
                  "the node); no rank was started\" >&2; exit 1; }",
                  "staging_started=$(date +%s)",
                  f"srun {per_node} mkdir -p {dest} || rdhpc_staging_failed mkdir",
                  f"sbcast --force --preserve {archive} {local} || rdhpc_staging_failed sbcast",
                  f"srun {per_node} tar -xf {local} -C {dest} || rdhpc_staging_failed unpacking",
                  'echo "rdhpc: environment staged on $SLURM_JOB_NUM_NODES node(s) in '
                  '$(( $(date +%s) - staging_started )) s"']
    return lines


def gpu_bind_args(plan: JobPlan) -> list[str]:
    """srun's per-task options of the preset: GPU binding (each task its closest GPU, one device
    visible per rank), the MPI plugin, the pyxis container."""
    p = plan.preset
    args = p.gpu_binding_args(plan.gpus_per_node)
    if p.mpi:
        args.append(f"--mpi={p.mpi}")
    if p.container_image:  # submitit shell-quotes each srun argument itself
        args.append(f"--container-image={p.container_image}")
        if p.container_mounts:
            args.append(f"--container-mounts={','.join(p.container_mounts)}")
    return args


def submitit_parameters(plan: JobPlan) -> dict:
    """Parameters of submitit's SlurmExecutor (its names); the dry run renders the same ones."""
    extra = {"requeue": True}  # allow `scontrol requeue` of this job even where JobRequeue=0
    extra.update(plan.preset.sbatch)
    if plan.staging:
        extra.update(plan.preset.staging.sbatch)
    params = {
        "job_name": plan.job_name,
        "nodes": plan.nodes,
        "ntasks_per_node": plan.tasks_per_node,
        "cpus_per_task": plan.cpus_per_task,
        "time": plan.time_minutes,
        "signal_delay_s": min(plan.preset.signal_margin_s or plan.stop_margin_s, plan.stop_margin_s),
        "setup": setup_lines(plan),
        # one failing rank ends the step instead of leaving the others in a collective; srun does
        # not inherit --cpus-per-task on Slurm 22.05-23.02, so it is passed again (the paper: -c7)
        "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={plan.cpus_per_task}", *gpu_bind_args(plan),
                      *plan.preset.srun_args],
        "additional_parameters": extra,
        "wckey": plan.preset.wckey,  # None: no --wckey line (submitit's default would be "submitit")
    }
    if plan.gpus_per_node:
        params["gpus_per_node"] = plan.gpus_per_node
    for key in ("account", "partition", "qos", "exclude"):
        if getattr(plan, key):
            params[key] = getattr(plan, key)
    return params


def task_python(plan: JobPlan) -> str:
    """What srun starts in each task in place of submitit's `python`: for training, the task guard
    (rdhpc.launch.guard: it requeues the job when the rank is killed) in front of the same python."""
    if plan.kind != "train" or plan.run_dir is None:
        return plan.python
    return (f"{plan.python} -m rdhpc.launch.guard --run-dir {shlex.quote(str(plan.run_dir))} "
            f"--max-failure-requeues {plan.max_failure_requeues} --max-segments {plan.max_segments} -- {plan.python}")


def submitit_command(plan: JobPlan) -> str:
    # exactly what submitit.SlurmExecutor._submitit_command_str writes
    return " ".join([task_python(plan), "-u -m submitit.core._submit", shlex.quote(str(plan.folder))])


def render_script(plan: JobPlan) -> str:
    """The sbatch script, as submitit will write it (same function, same parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submitit_command(plan), folder=plan.folder, **submitit_parameters(plan))


def dry_run_text(plan: JobPlan) -> str:
    from rdhpc.distributed.ranks import STALE_RANK_VARIABLES

    out = [f"# rdhpc submit --dry-run: nothing was submitted. Cluster preset {plan.preset.name}: "
           f"{plan.preset.description}",
           f"# {plan.nodes} node(s) x {plan.tasks_per_node} task(s) = {plan.num_tasks} rank(s); "
           f"{plan.gpus_per_node} GPU(s) per node, {plan.cpus_per_task} core(s) per task; backend "
           f"{plan.preset.backend}; {plan.time_minutes} min per segment, at most {plan.max_segments} segment(s)",
           f"# sbatch script ({plan.folder}/%j_submission.sh once submitted):", ""]
    out.append(render_script(plan))
    out += ["", "# environment of every rank: the submitting shell's (sbatch --export=ALL), without",
            "#   " + " ".join(STALE_RANK_VARIABLES), "# and with:"]
    out += [f"#   {name}={value if value.isprintable() else repr(value)}" for name, value in plan.env.items()]
    out += [f"#   {STOP_AT_VARIABLE}=<job start + {plan.time_minutes * 60} s - {plan.stop_margin_s} s>",
            "#   per rank, set in Python: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE from SLURM_PROCID, "
            "SLURM_STEP_NUM_TASKS, SLURM_LOCALID; MASTER_ADDR = first node of SLURM_JOB_NODELIST, "
            "MASTER_PORT = 15000 + job id % 15000"]
    if plan.config_overrides:
        out.append("# run config set by the preset (before --set): " + " ".join(plan.config_overrides))
    if plan.kind == "prep":
        out.append("# each task runs: rdhpc " + " ".join(shlex.quote(a) for a in plan.command))
    elif plan.config_path:
        out.append(f"# each task runs: rdhpc train {plan.config_path} (the resolved config, saved at submission)")
    return "\n".join(out) + "\n"


# ---- submission -------------------------------------------------------------------------------
def submit(plan: JobPlan) -> dict:
    """Submit through submitit; return the job record (id, logs, TensorBoard folder) that
    `rdhpc status` reads back."""
    import submitit

    plan.folder.mkdir(parents=True, exist_ok=True)
    try:
        executor = submitit.SlurmExecutor(folder=plan.folder, max_num_timeout=plan.max_segments,
                                          python=task_python(plan))
    except RuntimeError as exc:  # no srun on PATH
        raise SubmitError(f"no Slurm here ({exc}); `--dry-run` prints the script without submitting") from None
    executor.update_parameters(**submitit_parameters(plan))
    task = TrainTask(plan.config_path, plan.max_segments) if plan.kind == "train" else CommandTask(plan.command)
    try:
        job = executor.submit(task)
    except subprocess.CalledProcessError as exc:
        out = (exc.stderr or exc.output or b"").decode(errors="replace") if isinstance(exc.stderr or exc.output, bytes) \
            else str(exc.stderr or exc.output or "")
        raise SubmitError(f"sbatch refused the job: {out.strip() or exc}") from None
    except submitit.core.utils.FailedJobError as exc:
        raise SubmitError(f"sbatch refused the job: {exc}") from None
    record = {
        "job_id": job.job_id, "kind": plan.kind, "cluster": plan.preset.name, "submitted": time.time(),
        "folder": str(plan.folder), "num_tasks": plan.num_tasks,
        "script": str(plan.folder / f"{job.job_id}_submission.sh"),
        "logs": [str(plan.folder / f"{job.job_id}_{t}_log.out") for t in range(plan.num_tasks)],
        "errors": [str(plan.folder / f"{job.job_id}_{t}_log.err") for t in range(plan.num_tasks)],
        "run_dir": str(plan.run_dir) if plan.run_dir else None,
        "tensorboard": str(plan.tensorboard_dir) if plan.tensorboard_dir else None,
        "slurm_conf": os.environ.get("SLURM_CONF"), "command": plan.command or None,
        "max_segments": plan.max_segments,
    }
    (plan.folder / f"{job.job_id}_{JOB_RECORD}").write_text(json.dumps(record, indent=1))
    jobs_dir().mkdir(parents=True, exist_ok=True)
    (jobs_dir() / f"{job.job_id}.json").write_text(json.dumps(record, indent=1))
    if plan.run_dir:
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        with open(RunFolder(plan.run_dir).slurm_jobs, "a") as f:
            f.write(json.dumps(record) + "\n")
    return record


# ---- the commands -----------------------------------------------------------------------------
def _cli_overrides(args) -> list[str]:
    """--nodes, --time... as slurm.* overrides, so that the config checks them and saves them."""
    out = []
    for flag, key in (("cluster", "cluster"), ("nodes", "nodes"), ("tasks_per_node", "tasks_per_node"),
                      ("gpus_per_node", "gpus_per_node"), ("account", "account"), ("partition", "partition"),
                      ("qos", "qos"), ("job_name", "job_name"), ("max_segments", "max_segments"),
                      ("stop_margin", "stop_margin_s"), ("exclude", "exclude")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"slurm.{key}={json.dumps(value)}")
    if args.time is not None:
        out.append(f"slurm.time={json.dumps(str(args.time))}")  # "12:00:00" would be sexagesimal YAML
    if getattr(args, "staging", None) is not None:
        out.append(f"slurm.staging={'true' if args.staging else 'false'}")
    if args.env:
        out.append(f"slurm.env={json.dumps(args.env)}")
    return out


def partition_time_warning(plan: JobPlan) -> str | None:
    """A warning when the job asks for more time than its partition allows (sinfo's %l), if sinfo
    answers: such a job never starts. Silent when Slurm cannot be asked (a dry run elsewhere)."""
    from rdhpc.config.schema import slurm_time_seconds

    command = ["sinfo", "-h", "-o", "%P %l"] + (["-p", plan.partition] if plan.partition else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        name, _, limit = line.strip().partition(" ")
        if plan.partition is None and not name.endswith("*"):
            continue  # without --partition the job goes to the default one, marked with a *
        try:
            limit_s = slurm_time_seconds(limit)
        except ValueError:  # "infinite", "UNLIMITED", "n/a"
            continue
        if plan.time_s > limit_s:
            return (f"[submit] warning: --time {plan.time_minutes} min is above the limit of partition "
                    f"{name.rstrip('*')} ({limit}, sinfo): the job would never start; ask for less, or another "
                    f"partition")
    return None


def checkpoint_space(run, preset, check_free: bool) -> str:
    """What the run's checkpoints will take (`rdhpc plan`'s sizes x (checkpoint.keep_last + 1): the
    kept ones and the one being written), refused on a path the preset forbids (Frontier's home) or,
    when `check_free`, on a file system with less free space (statvfs). Returns the line it says."""
    from rdhpc.plan import checkpoint_bytes

    folder = Path(run.checkpoint.dir or RunFolder(run.logging.run_dir).checkpoints).absolute()
    for forbidden in preset.forbidden_run_paths:
        root = Path(os.path.expandvars(os.path.expanduser(forbidden)))
        if folder == root or root in folder.parents:
            raise SubmitError(f"checkpoint folder {folder} lies under {forbidden}, where the {preset.name} preset "
                              f"allows no runs: {preset.forbidden_run_paths_advice or 'choose another logging.run_dir'}")
    each = checkpoint_bytes(run.model, run.train.precision)
    need = each * (run.checkpoint.keep_last + 1)
    line = (f"[submit] checkpoints: {each / 1e9:,.2f} GB each, {run.checkpoint.keep_last} kept + 1 being written = "
            f"{need / 1e9:,.2f} GB in {folder}")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    stats = os.statvfs(existing)
    free = stats.f_bavail * stats.f_frsize
    if check_free and free < need:
        raise SubmitError(f"{line}, but the file system of {existing} has {free / 1e9:,.2f} GB free: the run would "
                          f"fail at its first saves. Choose logging.run_dir (or checkpoint.dir) on a larger file "
                          f"system, lower checkpoint.keep_last, or pass --no-space-check")
    return f"{line} ({free / 1e9:,.1f} GB free there)"


def cmd_submit(args) -> int:
    from rdhpc.config import ConfigError, config_from_dict, config_to_yaml, load_config

    prep = args.prep
    if prep is not None:
        if not prep or prep[0] not in PREP_STAGES:
            raise SubmitError(f"--prep: expected one of {', '.join(PREP_STAGES)} and its arguments, got "
                              f"{' '.join(prep) or 'nothing'}")
        run = load_config(args.config, args.overrides + _cli_overrides(args)) if args.config else \
            config_from_dict({}, _cli_overrides(args))
        plan = plan_job(run.slurm.cluster, run.slurm, "prep", None, args.log_dir or run.slurm.folder,
                        command=["prep", *prep])
    else:
        if not args.config:
            raise SubmitError("a run config is required (rdhpc submit CONFIG ...), or --prep STAGE ... for a prep stage")
        slurm_args = _cli_overrides(args)
        first = load_config(args.config, args.overrides + slurm_args)  # every problem reported once
        preset = load_preset(first.slurm.cluster)
        # preset-implied config (e.g. fixed gradient buckets) first, then the file's --set, then the CLI's
        overrides = preset.config_overrides() + args.overrides + slurm_args
        # the job may start in another folder (and the snapshot is read from anywhere): absolute paths
        run = load_config(args.config, overrides).with_absolute_paths()
        if run.training_problems():
            raise ConfigError(run.training_problems(), args.config)
        run_dir = Path(run.logging.run_dir)
        plan = plan_job(run.slurm.cluster, run.slurm, "train", run_dir, args.log_dir or run.slurm.folder)
        space = checkpoint_space(run, plan.preset, check_free=not args.dry_run and not args.no_space_check)
        print(space, file=sys.stderr)
        warning = partition_time_warning(plan)
        if warning:
            print(warning, file=sys.stderr)
        # one snapshot per submission: a pending or requeued job keeps its own config even when the
        # same run folder is submitted again with other settings
        plan.config_path = plan.folder / f"{CONFIG_SNAPSHOT[:-5]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.yaml"
        if not args.dry_run:
            # The job loads this resolved snapshot: every segment trains the config of submission
            # time, whatever happens to the YAML file meanwhile.
            plan.folder.mkdir(parents=True, exist_ok=True)
            plan.config_path.write_text(config_to_yaml(run))
    if args.dry_run:
        print(dry_run_text(plan), end="")
        return 0
    record = submit(plan)
    print(f"submitted job {record['job_id']} ({plan.num_tasks} task(s) on {plan.nodes} node(s), "
          f"cluster {plan.preset.name})")
    print(f"  logs: {record['logs'][0]}" + (f" ... {record['logs'][-1]}" if len(record["logs"]) > 1 else ""))
    print(f"  script: {record['script']}")
    if record["tensorboard"]:
        print(f"  tensorboard: {record['tensorboard']}")
    print(f"  status: rdhpc status {record['job_id']}")
    if not args.wait:
        return 0
    state = wait_for_job(record["job_id"], timeout=args.timeout)
    status = job_status(record["job_id"])
    print(format_status(status))
    run_ok = plan.kind == "prep" or status.get("run_state", {}).get("state") == "completed"
    return 0 if state == "COMPLETED" and run_ok else 1
