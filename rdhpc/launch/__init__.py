"""Starting ranks: N local processes (local.py); Slurm jobs through submitit: the plan, script and
submission (slurm.py), what runs inside the job and the requeue rule (job.py), `rdhpc status`
(status.py), cluster presets (presets.py), plain sbatch templates (templates.py)."""
