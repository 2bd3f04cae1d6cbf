"""Plain sbatch scripts, for users who don't want submitit: slurm/templates/<preset>.sbatch.

    python -m rdhpc.launch.templates            # rewrite slurm/templates/ from slurm/clusters/*.yaml
    sbatch --nodes 4 --account ABC123 slurm/templates/frontier.sbatch configs/my-run.yaml --set ...

They are generated from the presets (a test checks that they are up to date), so the modules,
environment and layout are the ones `rdhpc submit` uses. Each runs `srun rdhpc train "$@"`, with
the rendezvous on the allocation's first node, the same time budget (RDHPC_STOP_AT = end of the
job - stop margin) and Slurm's USR2 warning; afterwards `python -m rdhpc.launch.templates
--after-segment "$@"` requeues the job when the run stopped early and is not finished.
"""

from __future__ import annotations

import os
import sys

from rdhpc.launch.presets import REPO_CLUSTERS, load_preset
from rdhpc.launch.quoting import export_line
from rdhpc.run_folder import STOP_AT_VARIABLE

TEMPLATES = REPO_CLUSTERS.parent / "templates"
PRESETS = ("frontier", "nvidia", "local")


def render_template(name: str) -> str:
    from rdhpc.distributed.ranks import PORT_BASE, PORT_SPAN, STALE_RANK_VARIABLES

    p = load_preset(name)
    margin = p.stop_margin_s
    signal = min(p.signal_margin_s or margin, margin)
    lines = [
        "#!/bin/bash",
        f"# rdhpc training on {p.description}, without submitit.",
        f"# Generated from slurm/clusters/{name}.yaml by `python -m rdhpc.launch.templates`: edit the preset.",
        "#",
        f"#   sbatch --nodes N{' --account PROJECT' if p.account_required else ''} "
        f"slurm/templates/{name}.sbatch CONFIG [--set SECTION.KEY=VALUE ...]",
        "#",
        "# The arguments are those of `rdhpc train`. Every segment stops and checkpoints "
        f"{margin} s before the time limit",
        "# and requeues the job until the run is complete (at most slurm.max_segments segments).",
        "#SBATCH --job-name=rdhpc",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks-per-node={p.tasks_per_node}",
        f"#SBATCH --cpus-per-task={p.cpus_per_task}",
    ]
    if p.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={p.gpus_per_node}")
    if p.partition:
        lines.append(f"#SBATCH --partition={p.partition}")
    lines += ["#SBATCH --time=12:00:00", f"#SBATCH --signal=USR2@{signal}", "#SBATCH --requeue",
              "#SBATCH --open-mode=append", "#SBATCH --output=rdhpc-%j.out"]
    lines += [f"#SBATCH --{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in p.sbatch.items()]
    lines.append("")
    lines += [f"module load {m}" for m in p.modules]
    lines += list(p.setup)
    lines += ["# your environment: activate it here, or set RDHPC_PYTHON to its python",
              ': "${RDHPC_PYTHON:=python}"', "",
              "# sbatch exports the submitter's environment: drop what a launcher there left behind",
              "unset " + " ".join(STALE_RANK_VARIABLES)]
    env = p.job_env()
    env.setdefault("OMP_NUM_THREADS", str(p.cpus_per_task))
    # srun does not inherit --cpus-per-task on Slurm 22.05-23.02; the preset's GPU binding
    srun_args = [f"--cpus-per-task={p.cpus_per_task}", *p.gpu_binding_args(p.gpus_per_node)]
    lines += [export_line(k, v) for k, v in env.items()]
    # the preset's run config goes before the user's --set, which may override it
    preset_sets = " ".join(f"--set {o}" for o in p.config_overrides())
    train_args = f'"$1" {preset_sets} "${{@:2}}"' if preset_sets else '"$@"'
    preset_note = [f"# the preset's run config (before the user's --set): {p.name}'s fixed gradient buckets"] \
        if preset_sets else []
    lines += [
        "",
        "# the rendezvous: the first node of the allocation, a port from the job id",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
        "# the time budget: checkpoint and stop before the limit (Slurm's USR2 warning does the same)",
        'end_s=${SLURM_JOB_END_TIME:-$(date -d "$(scontrol show job "$SLURM_JOB_ID" | '
        "grep -o 'EndTime=[^ ]*' | cut -d= -f2)\" +%s)}",
        f"export {STOP_AT_VARIABLE}=$(( end_s - {margin} ))",
        "",
        *preset_note,
        f'srun --kill-on-bad-exit=1 {" ".join(srun_args)} "$RDHPC_PYTHON" -u -m rdhpc.cli train {train_args}',
        'status=$?',
        '[ "$status" -eq 0 ] || exit "$status"',
        '"$RDHPC_PYTHON" -m rdhpc.launch.templates --after-segment "$@"',
        "",
    ]
    return "\n".join(lines)


def after_segment(argv: list[str]) -> int:
    """In the batch script, after `srun rdhpc train`: requeue when the run stopped early, by the same
    rule as the submitit task (rdhpc.launch.job.decide_requeue), read from the run folder."""
    import argparse

    from rdhpc.config import load_config
    from rdhpc.launch.job import FAIL, SegmentEnd, current_segment, decide_requeue, requeue_job
    from rdhpc.run_folder import RunFolder

    parser = argparse.ArgumentParser(prog="rdhpc.launch.templates --after-segment")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = parser.parse_known_args(argv)
    overrides = [o.split("=", 1)[1] if o.startswith("--set=") else o for o in args.overrides]
    run = load_config(args.config, overrides)
    end = SegmentEnd.from_run_state(RunFolder(run.logging.run_dir).read_run_state())
    decision = decide_requeue(end, current_segment(), run.slurm.max_segments)
    job = os.environ["SLURM_JOB_ID"]
    if not decision.requeue:
        print(f"[slurm] {decision.reason}", flush=True)
        return 1 if decision.action == FAIL else 0
    print(f"[slurm] {decision.reason}: requeueing job {job}", flush=True)
    requeue_job(job)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--after-segment"]:
        return after_segment(argv[1:])
    TEMPLATES.mkdir(exist_ok=True)
    for name in PRESETS:
        (TEMPLATES / f"{name}.sbatch").write_text(render_template(name))
        print(TEMPLATES / f"{name}.sbatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
