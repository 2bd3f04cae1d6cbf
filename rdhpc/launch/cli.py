"""The `rdhpc submit` and `rdhpc status` command lines. The commands live in rdhpc.launch.slurm and
rdhpc.launch.status, imported only when one of them runs: every other rdhpc command starts without them."""


def _cmd_submit(args) -> int:
    from rdhpc.launch.slurm import cmd_submit

    return cmd_submit(args)


def _cmd_status(args) -> int:
    from rdhpc.launch.status import cmd_status

    return cmd_status(args)


def add_submit_parser(sub):
    import argparse

    p = sub.add_parser("submit", help="submit training (or a prep stage) to Slurm through submitit",
                       description="Submit training, or with --prep a prep stage, to Slurm. Prints the job id, "
                                   "the log paths and the TensorBoard folder.")
    p.add_argument("config", nargs="?", help="YAML run configuration (its slurm section is the job's default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--cluster", help="preset: frontier, nvidia, local, your own name, or a preset file")
    p.add_argument("--nodes", type=int)
    p.add_argument("--tasks-per-node", type=int)
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--time", help="time limit of one segment (HH:MM:SS, MM, D-HH:MM:SS)")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--qos")
    p.add_argument("--exclude", help="nodes to leave out (a Slurm host list)")
    p.add_argument("--job-name")
    p.add_argument("--max-segments", type=int)
    p.add_argument("--stop-margin", type=int, metavar="SECONDS", help="checkpoint this long before the time limit")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra job environment")
    p.add_argument("--staging", action=argparse.BooleanOptionalAction, default=None,
                   help="node-local staging of the environment (the preset's staging section)")
    p.add_argument("--log-dir", help="submitit folder: scripts, pickles, per-task logs (default RUN_DIR/slurm)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and environment; submit nothing")
    p.add_argument("--no-space-check", action="store_true",
                   help="submit even if the checkpoint folder's file system has less free space than the checkpoints need")
    p.add_argument("--wait", action="store_true", help="wait for the end of the job (all its segments)")
    p.add_argument("--timeout", type=float, default=7 * 24 * 3600, help="seconds --wait waits at most")
    p.add_argument("--prep", nargs=argparse.REMAINDER, metavar="STAGE ARGS",
                   help="submit `rdhpc prep STAGE ARGS...` instead of training (must come last)")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("status", help="state, step and loss, checkpoints and logs of a run (a submitted job "
                                      "or a local run folder)")
    p.add_argument("job", help="job id, run folder (a local run or its latest submission) or submitit folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
